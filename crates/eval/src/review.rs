//! The original Vicuna-80 evaluation (FastChat's `fastchat/eval`, before
//! MT-bench): a reviewer model reads two assistants' answers and writes a
//! first line with two scores ("8 7"), then its reasons; the totals over
//! all questions give "Vicuna 638 vs ChatGPT 693 → 92%".

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::answer::short_id;
use crate::error::{EvalError, Result};
use crate::jsonl;
use crate::model::{ChatModel, ChatRequest, Guide, Message};
use crate::pool::{self, Progress};
use crate::prompt::py_format;
use crate::question::{Question, QuestionId};

/// A reviewer prompt in FastChat's `table/prompt.jsonl` layout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReviewPrompt {
    /// Its number (`reviewer_id` in the reviews).
    pub prompt_id: u32,
    /// The system message.
    pub system_prompt: String,
    /// With `{question}`, `{answer_1}`, `{answer_2}` and the `defaults` fields.
    pub prompt_template: String,
    /// Values for the template's other fields (`{prompt}`).
    #[serde(default)]
    pub defaults: BTreeMap<String, String>,
    /// The question category it reviews (`general` for the rest).
    #[serde(default)]
    pub category: String,
}

const TEMPLATE: &str = "[Question]\n{question}\n\n[The Start of Assistant 1's Answer]\n{answer_1}\n\n[The End of Assistant 1's Answer]\n\n[The Start of Assistant 2's Answer]\n{answer_2}\n\n[The End of Assistant 2's Answer]\n\n[System]\n{prompt}\n\n";
const SYSTEM: &str = "You are a careful and fair reviewer of answers written by AI assistants.";

/// vicugna's own reviewer prompts (general, coding, math), written for the
/// same method as the Vicuna-80 GPT-4 reviewer: a first line with the two
/// scores, then the reasons.
pub fn builtin_prompts() -> Vec<ReviewPrompt> {
    let p = |id: u32, category: &str, text: &str| ReviewPrompt {
        prompt_id: id,
        system_prompt: SYSTEM.into(),
        prompt_template: TEMPLATE.into(),
        defaults: BTreeMap::from([("prompt".to_string(), text.to_string())]),
        category: category.into(),
    };
    vec![
        p(1, "general", "Two AI assistants answered the question above. Judge how helpful, relevant, accurate and detailed each answer is, and give each assistant an overall score from 1 to 10, where higher is better.\nOn the first line, write only the two scores, for Assistant 1 and Assistant 2 in that order, separated by one space (for example: 7 9). From the next line on, explain your scores. Do not let the order in which the answers appear, or their length, sway you."),
        p(2, "coding", "Two AI assistants were asked to write a program for the problem above. Review their code: does it solve the stated problem correctly and efficiently, is it clearly structured and readable, does it carry useful comments, and does it follow good practice?\nOn the first line, write only two scores from 1 to 10 (1: no code or nonsense; 10: perfect), for Assistant 1 and Assistant 2 in that order, separated by one space. From the next line on, give your reasons, with the strengths and weaknesses of each answer."),
        p(3, "math", "Two AI assistants answered the math question above. First solve the problem yourself without looking at their answers. Then check each assistant's steps, one by one, and note any mistake; judge the working as well as the final answer.\nOn the first line, write only two scores from 1 to 10, for Assistant 1 and Assistant 2 in that order, separated by one space. From the next line on, explain the scores."),
    ]
}

/// Reads a reviewer prompt file (FastChat's `prompt.jsonl` layout).
pub fn load_review_prompts(path: &Path) -> Result<Vec<ReviewPrompt>> {
    let rows: Vec<(usize, ReviewPrompt)> = jsonl::read(path)?;
    if rows.is_empty() {
        return Err(EvalError::Input(format!("{}: no reviewer prompts", path.display())));
    }
    Ok(rows.into_iter().map(|(_, p)| p).collect())
}

/// The prompt for a category: the one made for it, else the `general` one,
/// else the first (FastChat's reviewer table picks the first prompt for
/// categories it does not list).
pub fn prompt_for<'a>(prompts: &'a [ReviewPrompt], category: &str) -> &'a ReviewPrompt {
    prompts
        .iter()
        .find(|p| p.category == category)
        .or_else(|| prompts.iter().find(|p| p.category == "general"))
        .unwrap_or(&prompts[0])
}

/// FastChat's `parse_score`: the first line, commas read as spaces, split on
/// single spaces, exactly two numbers; otherwise `[-1, -1]`.
pub fn parse_score_pair(review: &str) -> [f64; 2] {
    let first = review.split('\n').next().unwrap_or("").replace(',', " ");
    let parts: Vec<&str> = first.split(' ').collect();
    if parts.len() == 2 {
        if let (Ok(a), Ok(b)) = (parts[0].parse::<f64>(), parts[1].parse::<f64>()) {
            // Python's float() takes "nan"/"inf"; no reviewer means those.
            if a.is_finite() && b.is_finite() {
                return [a, b];
            }
        }
    }
    [-1.0, -1.0]
}

/// An answer for review: the Vicuna-80 layout (`text`) or FastChat's
/// llm_judge layout (first turn of the first choice).
#[derive(Debug, Clone)]
pub struct ReviewAnswer {
    /// `answer_id`, when the file has one.
    pub answer_id: String,
    /// The answer text.
    pub text: String,
}

/// Reads an answer file of either layout: question id → answer.
pub fn load_review_answers(path: &Path) -> Result<BTreeMap<QuestionId, ReviewAnswer>> {
    let rows: Vec<(usize, Value)> = jsonl::read(path)?;
    let mut out = BTreeMap::new();
    for (line, v) in rows {
        let bad = |msg: &str| EvalError::BadLine {
            path: path.to_path_buf(),
            line,
            msg: msg.to_string(),
        };
        let id: QuestionId = serde_json::from_value(
            v.get("question_id")
                .cloned()
                .ok_or_else(|| bad("missing field question_id"))?,
        )
        .map_err(|_| bad("question_id must be an integer or a string"))?;
        let text = v
            .get("text")
            .and_then(Value::as_str)
            .or_else(|| v["choices"][0]["turns"][0].as_str())
            .ok_or_else(|| bad("no answer text: expected text, or choices[0].turns[0]"))?;
        let answer_id = v
            .get("answer_id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        out.insert(
            id,
            ReviewAnswer {
                answer_id,
                text: text.to_string(),
            },
        );
    }
    Ok(out)
}

/// One review line, in FastChat's layout; `metadata` names the two models
/// and the category.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Review {
    /// Random id.
    pub review_id: String,
    /// The question.
    pub question_id: QuestionId,
    /// Assistant 1's answer id.
    pub answer1_id: String,
    /// Assistant 2's answer id.
    pub answer2_id: String,
    /// The prompt used.
    pub reviewer_id: u32,
    /// `{model_1, model_2, category}`.
    pub metadata: BTreeMap<String, String>,
    /// The reviewer's text.
    pub text: String,
    /// The two scores, `[-1, -1]` when they could not be read.
    pub score: [f64; 2],
    /// Why the call failed; redone on the next run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What to review.
pub struct ReviewJob<'a> {
    /// The questions (first turn is reviewed).
    pub questions: &'a [Question],
    /// Assistant 1 (the baseline in the Vicuna blog: ChatGPT): name and answers.
    pub model_1: (&'a str, &'a BTreeMap<QuestionId, ReviewAnswer>),
    /// Assistant 2: name and answers.
    pub model_2: (&'a str, &'a BTreeMap<QuestionId, ReviewAnswer>),
    /// Reviewer prompts.
    pub prompts: &'a [ReviewPrompt],
    /// Reviewer temperature (FastChat: 0.2).
    pub temperature: f32,
    /// Most tokens per review (FastChat: 1024).
    pub max_tokens: usize,
    /// Concurrent calls.
    pub parallel: usize,
    /// Ask again with constrained decoding when the scores cannot be read.
    pub force_verdict: bool,
}

struct Pending {
    question_id: QuestionId,
    category: String,
    prompt: ReviewPrompt,
    user: String,
    answer1_id: String,
    answer2_id: String,
}

/// The reviews to make (those not yet in `output` without error).
fn pending(job: &ReviewJob, output: &Path) -> Result<(Vec<Pending>, Vec<Review>)> {
    let mut kept = Vec::new();
    if output.exists() {
        let (rows, _) = jsonl::read_resumable::<Review>(output)?;
        kept = rows.into_iter().map(|(_, r)| r).filter(|r| r.error.is_none()).collect();
    }
    let done: HashSet<&QuestionId> = kept.iter().map(|r| &r.question_id).collect();
    let mut out = Vec::new();
    for q in job.questions {
        if done.contains(&q.question_id) {
            continue;
        }
        let mut found = Vec::with_capacity(2);
        for (name, answers) in [job.model_1, job.model_2] {
            found.push(
                answers.get(&q.question_id).ok_or_else(|| {
                    EvalError::Input(format!("the answers of {name} lack question {}", q.question_id))
                })?,
            );
        }
        let (a1, a2) = (found[0], found[1]);
        let prompt = prompt_for(job.prompts, &q.category).clone();
        let mut vars: Vec<(&str, &str)> = vec![
            ("question", q.turns[0].as_str()),
            ("answer_1", a1.text.as_str()),
            ("answer_2", a2.text.as_str()),
        ];
        vars.extend(prompt.defaults.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let user = py_format(&prompt.prompt_template, &vars)
            .map_err(|e| EvalError::Input(format!("reviewer prompt {}: {e}", prompt.prompt_id)))?;
        out.push(Pending {
            question_id: q.question_id.clone(),
            category: q.category.clone(),
            prompt,
            user,
            answer1_id: a1.answer_id.clone(),
            answer2_id: a2.answer_id.clone(),
        });
    }
    Ok((out, kept))
}

/// Reviews calls still to make, and their prompt characters (for a dry run).
pub fn review_plan(job: &ReviewJob, output: &Path) -> Result<(usize, usize)> {
    let (p, _) = pending(job, output)?;
    Ok((
        p.len(),
        p.iter().map(|x| x.user.len() + x.prompt.system_prompt.len()).sum(),
    ))
}

/// What a review run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReviewSummary {
    /// The output file.
    pub path: PathBuf,
    /// Reviews written now.
    pub reviewed: usize,
    /// Failed calls (recorded with `error`).
    pub failed: usize,
    /// Reviews whose scores could not be read.
    pub unparsed: usize,
}

/// Reviews every question not yet reviewed in `output`, then rewrites it in question order.
pub fn run_review(
    reviewer: &dyn ChatModel,
    job: &ReviewJob,
    output: &Path,
    progress: &mut dyn Progress,
) -> Result<ReviewSummary> {
    let (todo, kept) = pending(job, output)?;
    jsonl::write_atomic(output, &kept)?;
    let mut all: BTreeMap<QuestionId, Review> = kept.into_iter().map(|r| (r.question_id.clone(), r)).collect();
    let mut out = jsonl::Appender::open(output)?;
    let mut summary = ReviewSummary {
        path: output.to_path_buf(),
        reviewed: 0,
        failed: 0,
        unparsed: 0,
    };
    progress.start(todo.len());
    pool::run(
        todo,
        job.parallel,
        |p| review_one(reviewer, job, p),
        |r: Review| -> Result<()> {
            out.push(&r)?;
            summary.reviewed += 1;
            if r.error.is_some() {
                summary.failed += 1;
            } else if r.score == [-1.0, -1.0] {
                summary.unparsed += 1;
            }
            progress.advance(&format!("question {}: {} {}", r.question_id, r.score[0], r.score[1]));
            all.insert(r.question_id.clone(), r);
            Ok(())
        },
    )?;
    progress.finish();
    jsonl::write_atomic(output, &all.values().collect::<Vec<_>>())?;
    Ok(summary)
}

fn review_one(reviewer: &dyn ChatModel, job: &ReviewJob, p: Pending) -> Review {
    let mut messages = vec![
        Message::new("system", p.prompt.system_prompt.clone()),
        Message::new("user", p.user.clone()),
    ];
    let req = ChatRequest {
        messages: messages.clone(),
        temperature: job.temperature,
        max_tokens: job.max_tokens,
        seed: None,
        guide: None,
    };
    let (mut text, mut error) = match reviewer.chat(&req) {
        Ok(r) => (r.text, None),
        Err(e) => ("error".to_string(), Some(e.to_string())),
    };
    let mut score = parse_score_pair(&text);
    if error.is_none() && score == [-1.0, -1.0] && job.force_verdict && reviewer.supports_guide() {
        // The scores must open the review: ask for them alone, constrained
        // to "a b", and put them first.
        messages.push(Message::new("assistant", text.clone()));
        messages.push(Message::new(
            "user",
            "Write only the two scores now, for Assistant 1 and Assistant 2, separated by one space.",
        ));
        let req = ChatRequest {
            messages,
            temperature: 0.0,
            max_tokens: 8,
            seed: None,
            guide: Some(Guide::Regex("(10|[1-9]) (10|[1-9])".into())),
        };
        match reviewer.chat(&req) {
            Ok(r) if parse_score_pair(&r.text) != [-1.0, -1.0] => {
                text = format!("{}\n{text}", r.text.trim());
                score = parse_score_pair(&text);
            }
            Ok(_) => {}
            Err(e) => error = Some(e.to_string()),
        }
    }
    Review {
        review_id: short_id(),
        question_id: p.question_id,
        answer1_id: p.answer1_id,
        answer2_id: p.answer2_id,
        reviewer_id: p.prompt.prompt_id,
        metadata: BTreeMap::from([
            ("model_1".to_string(), job.model_1.0.to_string()),
            ("model_2".to_string(), job.model_2.0.to_string()),
            ("category".to_string(), p.category),
        ]),
        text,
        score,
        error,
    }
}

/// The totals of one review file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReviewTotals {
    /// The file.
    pub file: String,
    /// Assistant 1's name.
    pub model_1: String,
    /// Assistant 2's name.
    pub model_2: String,
    /// Sum of assistant 1's scores.
    pub total_1: f64,
    /// Sum of assistant 2's scores.
    pub total_2: f64,
    /// total_2 / total_1: assistant 2's quality relative to assistant 1.
    pub relative: f64,
    /// Questions where assistant 2 scored higher.
    pub wins_2: usize,
    /// Equal scores.
    pub ties: usize,
    /// Questions where assistant 1 scored higher.
    pub wins_1: usize,
    /// Reviews whose scores could not be read (left out of the totals).
    pub unparsed: usize,
}

/// Sums a review file (FastChat's layout; model names from `metadata`, else
/// from a `review_<model1>_<model2>.jsonl` file name, else "Assistant 1/2").
pub fn review_totals(path: &Path) -> Result<ReviewTotals> {
    let rows: Vec<(usize, Value)> = jsonl::read(path)?;
    if rows.is_empty() {
        return Err(EvalError::Input(format!("{}: no reviews", path.display())));
    }
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    let from_name = stem.strip_prefix("review_").and_then(|s| s.split_once('_'));
    let meta = |k: &str| rows[0].1["metadata"][k].as_str().map(str::to_string);
    let model_1 = meta("model_1")
        .or_else(|| from_name.map(|(a, _)| a.to_string()))
        .unwrap_or_else(|| "Assistant 1".into());
    let model_2 = meta("model_2")
        .or_else(|| from_name.map(|(_, b)| b.to_string()))
        .unwrap_or_else(|| "Assistant 2".into());
    let mut t = ReviewTotals {
        file: path.display().to_string(),
        model_1,
        model_2,
        total_1: 0.0,
        total_2: 0.0,
        relative: 0.0,
        wins_2: 0,
        ties: 0,
        wins_1: 0,
        unparsed: 0,
    };
    for (line, v) in &rows {
        let s = v["score"]
            .as_array()
            .filter(|a| a.len() == 2)
            .ok_or_else(|| EvalError::BadLine {
                path: path.to_path_buf(),
                line: *line,
                msg: "score must be a list of two numbers".into(),
            })?;
        let (Some(a), Some(b)) = (s[0].as_f64(), s[1].as_f64()) else {
            return Err(EvalError::BadLine {
                path: path.to_path_buf(),
                line: *line,
                msg: "score must be a list of two numbers".into(),
            });
        };
        if a == -1.0 && b == -1.0 {
            t.unparsed += 1;
            continue;
        }
        t.total_1 += a;
        t.total_2 += b;
        if b > a {
            t.wins_2 += 1;
        } else if a > b {
            t.wins_1 += 1;
        } else {
            t.ties += 1;
        }
    }
    t.relative = if t.total_1 > 0.0 { t.total_2 / t.total_1 } else { 0.0 };
    Ok(t)
}

/// The totals table: "model_2 638 vs model_1 693 → 92%" per file.
pub fn render_totals(rows: &[ReviewTotals]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<24} {:>8}   {:<24} {:>8}   {:>8}   {:>14}",
        "assistant 2", "total", "assistant 1", "total", "relative", "win/tie/loss"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:<24} {:>8} vs {:<24} {:>8} → {:>7.0}%   {:>14}",
            r.model_2,
            fmt_total(r.total_2),
            r.model_1,
            fmt_total(r.total_1),
            r.relative * 100.0,
            format!("{}/{}/{}", r.wins_2, r.ties, r.wins_1)
        );
        if r.unparsed > 0 {
            let _ = writeln!(out, "  ({} reviews without readable scores left out)", r.unparsed);
        }
    }
    out
}

fn fmt_total(x: f64) -> String {
    if x.fract() == 0.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn score_pairs_as_fastchat_reads_them() {
        assert_eq!(parse_score_pair("9 8.5\nBoth are good"), [9.0, 8.5]);
        assert_eq!(parse_score_pair("7,6\nx"), [7.0, 6.0]);
        assert_eq!(parse_score_pair("7, 6\nx"), [-1.0, -1.0]);
        assert_eq!(parse_score_pair("Scores: 7 6"), [-1.0, -1.0]);
        assert_eq!(parse_score_pair("8 7"), [8.0, 7.0]);
    }
}
