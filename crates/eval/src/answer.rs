//! Model answers in FastChat's layout (`gen_model_answer` / `gen_api_answer`):
//! one line per question, `{question_id, answer_id, model_id, choices:[{index,
//! turns}], tstamp}`, sorted by question id. A failed call still leaves a
//! record (turns `$ERROR$`, as FastChat writes, plus an `error` field); a
//! rerun redoes those and whatever is missing, and keeps the rest.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};
use crate::jsonl;
use crate::model::{ChatModel, ChatRequest, Message};
use crate::pool::{self, Progress};
use crate::question::{Question, QuestionId};

/// What FastChat writes in place of a reply that failed.
pub const ERROR_OUTPUT: &str = "$ERROR$";

/// One sampled conversation: the assistant's reply to each user turn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    /// 0-based choice number (`--num-choices`).
    pub index: usize,
    /// One reply per question turn.
    pub turns: Vec<String>,
}

/// One line of an answer file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnswerRecord {
    /// The question answered.
    pub question_id: QuestionId,
    /// A random id (22 characters, as FastChat's `shortuuid`).
    #[serde(default)]
    pub answer_id: String,
    /// The model's name in the results.
    #[serde(default)]
    pub model_id: String,
    /// `--num-choices` conversations.
    pub choices: Vec<Choice>,
    /// Unix time of the answer.
    #[serde(default)]
    pub tstamp: f64,
    /// Why a call failed; such a record is redone on the next run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl AnswerRecord {
    /// Whether every turn of the first `num_choices` choices was answered.
    pub fn is_complete(&self, turns: usize, num_choices: usize) -> bool {
        self.error.is_none()
            && self.choices.len() >= num_choices
            && self
                .choices
                .iter()
                .all(|c| c.turns.len() >= turns && c.turns.iter().all(|t| t != ERROR_OUTPUT))
    }

    /// The reply to turn `turn` (0-based) of the first choice.
    pub fn turn(&self, turn: usize) -> Option<&str> {
        self.choices.first()?.turns.get(turn).map(String::as_str)
    }
}

/// How to answer.
#[derive(Debug, Clone)]
pub struct AnswerOptions {
    /// Name written as `model_id`.
    pub model_id: String,
    /// Conversations per question.
    pub num_choices: usize,
    /// Most tokens per reply (FastChat: 1024).
    pub max_tokens: usize,
    /// One temperature for every question instead of FastChat's per-category ones.
    pub force_temperature: Option<f32>,
    /// A system message to send first.
    pub system: Option<String>,
    /// Concurrent calls.
    pub parallel: usize,
}

/// What a run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnswerSummary {
    /// The answer file.
    pub path: PathBuf,
    /// Questions already answered by an earlier run.
    pub kept: usize,
    /// Questions answered now.
    pub answered: usize,
    /// Questions whose calls failed (recorded with `error`; rerun to retry).
    pub failed: usize,
}

/// Answers the questions that `path` lacks (or holds as failed), appending
/// as each finishes, then rewrites the file sorted by question id.
pub fn generate_answers(
    model: &dyn ChatModel,
    questions: &[Question],
    path: &Path,
    opts: &AnswerOptions,
    progress: &mut dyn Progress,
) -> Result<AnswerSummary> {
    if opts.num_choices == 0 {
        return Err(EvalError::Input("--num-choices must be at least 1".into()));
    }
    let mut by_id: BTreeMap<QuestionId, AnswerRecord> = BTreeMap::new();
    if path.exists() {
        let (rows, _torn) = jsonl::read_resumable::<AnswerRecord>(path)?;
        for (_, r) in rows {
            by_id.insert(r.question_id.clone(), r);
        }
    }
    let turns_of: BTreeMap<&QuestionId, usize> = questions.iter().map(|q| (&q.question_id, q.turns.len())).collect();
    // Records to redo leave the file now, so that an interrupted rerun
    // cannot leave two records for one question.
    by_id.retain(|id, r| match turns_of.get(id) {
        Some(&n) => r.is_complete(n, opts.num_choices),
        None => true,
    });
    let pending: Vec<&Question> = questions
        .iter()
        .filter(|q| !by_id.contains_key(&q.question_id))
        .collect();
    let kept = questions.len() - pending.len();
    jsonl::write_atomic(path, &by_id.values().collect::<Vec<_>>())?;

    let mut out = jsonl::Appender::open(path)?;
    let (mut answered, mut failed) = (0, 0);
    progress.start(pending.len());
    pool::run(
        pending,
        opts.parallel,
        |q| answer_question(model, q, opts),
        |rec| -> Result<()> {
            out.push(&rec)?;
            let msg = match &rec.error {
                Some(e) => {
                    failed += 1;
                    format!("question {}: failed: {e}", rec.question_id)
                }
                None => {
                    answered += 1;
                    format!("question {}", rec.question_id)
                }
            };
            progress.advance(&msg);
            by_id.insert(rec.question_id.clone(), rec);
            Ok(())
        },
    )?;
    progress.finish();
    jsonl::write_atomic(path, &by_id.values().collect::<Vec<_>>())?;
    Ok(AnswerSummary {
        path: path.to_path_buf(),
        kept,
        answered,
        failed,
    })
}

/// Answers every turn of one question, `num_choices` times; the first failed
/// call ends that record (remaining turns read `$ERROR$`).
pub fn answer_question(model: &dyn ChatModel, q: &Question, opts: &AnswerOptions) -> AnswerRecord {
    let temperature = q.temperature(opts.force_temperature);
    let mut choices = Vec::with_capacity(opts.num_choices);
    let mut error = None;
    for index in 0..opts.num_choices {
        let mut messages = Vec::new();
        if let Some(s) = &opts.system {
            messages.push(Message::new("system", s.clone()));
        }
        let mut turns = Vec::with_capacity(q.turns.len());
        for turn in &q.turns {
            if error.is_some() {
                turns.push(ERROR_OUTPUT.to_string());
                continue;
            }
            messages.push(Message::new("user", turn.clone()));
            let req = ChatRequest {
                messages: messages.clone(),
                temperature,
                max_tokens: opts.max_tokens,
                // FastChat seeds choice i with i; greedy needs no seed.
                seed: (temperature >= 1e-4).then_some(index as u64),
                guide: None,
            };
            match model.chat(&req) {
                Ok(r) => {
                    messages.push(Message::new("assistant", r.text.clone()));
                    turns.push(r.text);
                }
                Err(e) => {
                    error = Some(e.to_string());
                    turns.push(ERROR_OUTPUT.to_string());
                }
            }
        }
        choices.push(Choice { index, turns });
    }
    AnswerRecord {
        question_id: q.question_id.clone(),
        answer_id: short_id(),
        model_id: opts.model_id.clone(),
        choices,
        tstamp: now(),
        error,
    }
}

/// Reads one answer file: question id → record (a later line for the same
/// question replaces an earlier one, as FastChat's loader does).
pub fn load_answer_file(path: &Path) -> Result<BTreeMap<QuestionId, AnswerRecord>> {
    let rows: Vec<(usize, AnswerRecord)> = jsonl::read(path)?;
    Ok(rows.into_iter().map(|(_, r)| (r.question_id.clone(), r)).collect())
}

/// Reads every `*.jsonl` in `dir`: model name (the file name without
/// `.jsonl`) → its answers, as FastChat's `load_model_answers`.
pub fn load_answer_dir(dir: &Path) -> Result<BTreeMap<String, BTreeMap<QuestionId, AnswerRecord>>> {
    let entries = std::fs::read_dir(dir).map_err(|e| EvalError::io(dir, e))?;
    let mut out = BTreeMap::new();
    for e in entries {
        let path = e.map_err(|e| EvalError::io(dir, e))?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if let Some(model) = name.strip_suffix(".jsonl") {
            out.insert(model.to_string(), load_answer_file(&path)?);
        }
    }
    Ok(out)
}

/// A random id of 22 characters from shortuuid's alphabet (FastChat's
/// `answer_id`); only its uniqueness matters, so no UUID crate.
pub fn short_id() -> String {
    const ALPHABET: &[u8] = b"23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";
    let mut rng = rand::rng();
    (0..22)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// Seconds since the Unix epoch.
pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}
