//! The LLM judge, as FastChat's `gen_judgment`: single-answer grading
//! (`[[rating]]`) or pairwise comparison (`[[A]]`/`[[B]]`/`[[C]]`, judged in
//! both orders), reference answers for math, reasoning and coding, the
//! multi-turn prompts for turn 2, and FastChat's judgment file layout.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::{Number, Value};

use crate::answer::{now, AnswerRecord, ERROR_OUTPUT};
use crate::error::{EvalError, Result};
use crate::jsonl;
use crate::model::{ChatModel, ChatRequest, Guide, Message};
use crate::pool::{self, Progress};
use crate::prompt::{py_format, JudgePrompt};
use crate::question::{Question, QuestionId};

/// How answers are judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Each answer gets a 1–10 rating.
    Single,
    /// Each model against one baseline model.
    PairwiseBaseline,
    /// Every pair of models.
    PairwiseAll,
}

impl Mode {
    /// FastChat's name for the mode.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Single => "single",
            Mode::PairwiseBaseline => "pairwise-baseline",
            Mode::PairwiseAll => "pairwise-all",
        }
    }

    /// The four prompt names FastChat uses: general turn 1, reference-based
    /// turn 1, general turn 2, reference-based turn 2.
    pub fn prompt_names(self) -> [&'static str; 4] {
        match self {
            Mode::Single => [
                "single-v1",
                "single-math-v1",
                "single-v1-multi-turn",
                "single-math-v1-multi-turn",
            ],
            _ => [
                "pair-v2",
                "pair-math-v1",
                "pair-v2-multi-turn",
                "pair-math-v1-multi-turn",
            ],
        }
    }
}

/// One judge call (or, for pairwise, the two calls of both orders) to make.
#[derive(Debug, Clone)]
pub struct Match {
    /// The question.
    pub question_id: QuestionId,
    /// Its category.
    pub category: String,
    /// The judged model (single) or `model_1` (pairwise).
    pub model_1: String,
    /// `model_2` (pairwise).
    pub model_2: Option<String>,
    /// 1 or 2.
    pub turn: u8,
    /// The judge prompt's name.
    pub prompt_name: String,
    /// The judge prompt's output format.
    pub output_format: String,
    /// The system message.
    pub system_prompt: String,
    /// The user message (single), or the two orders `(A=model_1, B=model_2)`
    /// and `(A=model_2, B=model_1)` (pairwise).
    pub user_prompts: Vec<String>,
}

impl Match {
    /// Identifies the judgment, to skip it when it is already in the output file.
    fn key(&self, judge: &str) -> String {
        key(
            &self.question_id,
            &self.model_1,
            self.model_2.as_deref(),
            judge,
            &self.prompt_name,
            self.turn,
        )
    }
}

fn key(q: &QuestionId, m1: &str, m2: Option<&str>, judge: &str, prompt: &str, turn: u8) -> String {
    serde_json::to_string(&(q, m1, m2, judge, prompt, turn)).expect("plain values serialize")
}

/// What the judge is given.
pub struct MatchInputs<'a> {
    /// Single or pairwise, and which baseline.
    pub mode: Mode,
    /// The questions to judge.
    pub questions: &'a [Question],
    /// The models judged, in order.
    pub models: &'a [String],
    /// Model → question id → answer.
    pub answers: &'a BTreeMap<String, BTreeMap<QuestionId, AnswerRecord>>,
    /// Reference answers (question id → answer), for the math/reasoning/coding prompts.
    pub references: Option<&'a BTreeMap<QuestionId, AnswerRecord>>,
    /// Judge prompts by name.
    pub prompts: &'a BTreeMap<String, JudgePrompt>,
    /// The baseline model for [`Mode::PairwiseBaseline`].
    pub baseline: Option<&'a str>,
}

/// The matches FastChat's `gen_judgment` makes, in its order: general turn
/// 1, reference-based turn 1, general turn 2, reference-based turn 2 (turn
/// 2 only for two-turn questions). Fails, before any call, on a missing
/// answer, reference answer or prompt.
pub fn make_matches(inp: &MatchInputs) -> Result<Vec<Match>> {
    let names = inp.mode.prompt_names();
    let mut prompts = Vec::new();
    for name in names {
        let p = inp.prompts.get(name).ok_or_else(|| {
            EvalError::Input(format!(
                "the judge prompt file has no prompt named {name:?} (mode {} needs {})",
                inp.mode.as_str(),
                names.join(", ")
            ))
        })?;
        let want = if inp.mode == Mode::Single { "single" } else { "pairwise" };
        if p.kind != want {
            return Err(EvalError::Input(format!(
                "judge prompt {name:?} has type {:?}, expected {want:?}",
                p.kind
            )));
        }
        prompts.push(p);
    }
    let pairs: Vec<(String, Option<String>)> = match inp.mode {
        Mode::Single => inp.models.iter().map(|m| (m.clone(), None)).collect(),
        Mode::PairwiseBaseline => {
            let b = inp
                .baseline
                .ok_or_else(|| EvalError::Input("mode pairwise-baseline needs --baseline MODEL".into()))?;
            if !inp.answers.contains_key(b) {
                return Err(EvalError::Input(format!(
                    "baseline {b:?} has no answer file (models with answers: {})",
                    inp.answers.keys().cloned().collect::<Vec<_>>().join(", ")
                )));
            }
            inp.models
                .iter()
                .filter(|m| m.as_str() != b)
                .map(|m| (m.clone(), Some(b.to_string())))
                .collect()
        }
        Mode::PairwiseAll => {
            let mut v = Vec::new();
            for i in 0..inp.models.len() {
                for j in i + 1..inp.models.len() {
                    v.push((inp.models[i].clone(), Some(inp.models[j].clone())));
                }
            }
            v
        }
    };
    if pairs.is_empty() {
        return Err(EvalError::Input(format!(
            "nothing to judge: mode {} with models [{}]",
            inp.mode.as_str(),
            inp.models.join(", ")
        )));
    }
    check_answers(inp, &pairs)?;

    let (general, with_ref): (Vec<&Question>, Vec<&Question>) =
        inp.questions.iter().partition(|q| !q.needs_reference());
    let mut out = Vec::new();
    for (turn, prompt_idx, qs) in [
        (1u8, 0, &general),
        (1, 1, &with_ref),
        (2, 2, &general),
        (2, 3, &with_ref),
    ] {
        let prompt = prompts[prompt_idx];
        for q in qs.iter() {
            if turn == 2 && q.turns.len() != 2 {
                continue;
            }
            for (m1, m2) in &pairs {
                let answer = |m: &str| &inp.answers[m][&q.question_id];
                let reference = if prompt_idx % 2 == 1 {
                    Some(&inp.references.expect("checked in check_answers")[&q.question_id])
                } else {
                    None
                };
                let user_prompts = match m2 {
                    None => vec![single_prompt(prompt, q, answer(m1), reference, turn)?],
                    Some(m2) => vec![
                        pair_prompt(prompt, q, answer(m1), answer(m2), reference, turn)?,
                        pair_prompt(prompt, q, answer(m2), answer(m1), reference, turn)?,
                    ],
                };
                out.push(Match {
                    question_id: q.question_id.clone(),
                    category: q.category.clone(),
                    model_1: m1.clone(),
                    model_2: m2.clone(),
                    turn,
                    prompt_name: prompt.name.clone(),
                    output_format: prompt.output_format.clone(),
                    system_prompt: prompt.system_prompt.clone(),
                    user_prompts,
                });
            }
        }
    }
    Ok(out)
}

fn check_answers(inp: &MatchInputs, pairs: &[(String, Option<String>)]) -> Result<()> {
    let mut models: Vec<&str> = pairs.iter().map(|(m, _)| m.as_str()).collect();
    models.extend(pairs.iter().filter_map(|(_, m)| m.as_deref()));
    models.sort();
    models.dedup();
    for m in models {
        let Some(answers) = inp.answers.get(m) else {
            return Err(EvalError::Input(format!("model {m:?} has no answer file ({m}.jsonl)")));
        };
        for q in inp.questions {
            let Some(a) = answers.get(&q.question_id) else {
                return Err(EvalError::Input(format!(
                    "{m}.jsonl has no answer to question {} (run `vicugna eval answer` again)",
                    q.question_id
                )));
            };
            if !a.is_complete(q.turns.len(), 1) {
                return Err(EvalError::Input(format!(
                    "{m}.jsonl: the answer to question {} failed or lacks turns{} (run `vicugna eval answer` again)",
                    q.question_id,
                    a.error.as_deref().map(|e| format!(" ({e})")).unwrap_or_default()
                )));
            }
        }
    }
    let need_ref: Vec<&Question> = inp.questions.iter().filter(|q| q.needs_reference()).collect();
    if !need_ref.is_empty() {
        let Some(refs) = inp.references else {
            return Err(EvalError::Input(format!(
                "questions {} (categories {}) are judged against reference answers: give --ref-answers",
                need_ref
                    .iter()
                    .map(|q| q.question_id.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                crate::question::NEED_REF_CATS.join(", ")
            )));
        };
        for q in need_ref {
            match refs.get(&q.question_id) {
                Some(r) if r.is_complete(q.turns.len(), 1) => {}
                _ => {
                    return Err(EvalError::Input(format!(
                        "the reference answers lack question {} (all {} turns)",
                        q.question_id,
                        q.turns.len()
                    )))
                }
            }
        }
    }
    Ok(())
}

fn turn_text(a: &AnswerRecord, i: usize) -> &str {
    a.turn(i).unwrap_or_default()
}

fn fill(prompt: &JudgePrompt, vars: &[(&str, &str)]) -> Result<String> {
    py_format(&prompt.prompt_template, vars)
        .map_err(|e| EvalError::Input(format!("judge prompt {:?}: {e}", prompt.name)))
}

fn single_prompt(
    prompt: &JudgePrompt,
    q: &Question,
    a: &AnswerRecord,
    r: Option<&AnswerRecord>,
    turn: u8,
) -> Result<String> {
    let mut vars = Vec::new();
    if let Some(r) = r {
        vars.push(("ref_answer_1", turn_text(r, 0)));
        if turn == 2 {
            vars.push(("ref_answer_2", turn_text(r, 1)));
        }
    }
    if turn == 2 {
        vars.extend([
            ("question_1", q.turns[0].as_str()),
            ("question_2", q.turns[1].as_str()),
            ("answer_1", turn_text(a, 0)),
            ("answer_2", turn_text(a, 1)),
        ]);
    } else {
        vars.extend([("question", q.turns[0].as_str()), ("answer", turn_text(a, 0))]);
    }
    fill(prompt, &vars)
}

fn pair_prompt(
    prompt: &JudgePrompt,
    q: &Question,
    a: &AnswerRecord,
    b: &AnswerRecord,
    r: Option<&AnswerRecord>,
    turn: u8,
) -> Result<String> {
    let mut vars = Vec::new();
    if let Some(r) = r {
        vars.push(("ref_answer_1", turn_text(r, 0)));
        if turn == 2 {
            vars.push(("ref_answer_2", turn_text(r, 1)));
        }
    }
    if turn == 2 {
        vars.extend([
            ("question_1", q.turns[0].as_str()),
            ("question_2", q.turns[1].as_str()),
            ("answer_a_1", turn_text(a, 0)),
            ("answer_b_1", turn_text(b, 0)),
            ("answer_a_2", turn_text(a, 1)),
            ("answer_b_2", turn_text(b, 1)),
        ]);
    } else {
        vars.extend([
            ("question", q.turns[0].as_str()),
            ("answer_a", turn_text(a, 0)),
            ("answer_b", turn_text(b, 0)),
        ]);
    }
    fill(prompt, &vars)
}

fn one_score() -> &'static (Regex, Regex) {
    static R: OnceLock<(Regex, Regex)> = OnceLock::new();
    R.get_or_init(|| {
        (
            Regex::new(r"\[\[(\d+\.?\d*)\]\]").expect("valid regex"),
            Regex::new(r"\[(\d+\.?\d*)\]").expect("valid regex"),
        )
    })
}

fn two_scores() -> &'static (Regex, Regex) {
    static R: OnceLock<(Regex, Regex)> = OnceLock::new();
    R.get_or_init(|| {
        (
            Regex::new(r"\[\[(\d+\.?\d*),\s?(\d+\.?\d*)\]\]").expect("valid regex"),
            Regex::new(r"\[(\d+\.?\d*),\s?(\d+\.?\d*)\]").expect("valid regex"),
        )
    })
}

/// Python's `ast.literal_eval` of `\d+\.?\d*`: an int, or a float when it has a dot.
fn literal(s: &str) -> Option<Number> {
    if s.contains('.') {
        Number::from_f64(s.parse::<f64>().ok()?)
    } else {
        // Python ints have no bound; a rating that does not fit is no rating.
        s.parse::<i64>().ok().map(Number::from)
    }
}

/// FastChat's reading of a `[[rating]]` verdict: the first `[[x]]`, else the
/// first `[x]`; `None` (FastChat writes -1) when there is neither.
pub fn parse_rating(judgment: &str) -> Option<Number> {
    let (main, backup) = one_score();
    let c = main.captures(judgment).or_else(|| backup.captures(judgment))?;
    literal(&c[1])
}

/// FastChat's reading of a pairwise verdict: `A`, `B`, `tie` or `error`.
/// `[[A]]` is looked for first, then `[[B]]`, then `[[C]]`; the
/// `[[rating_a,rating_b]]` format is a tie within 0.1.
pub fn parse_winner(judgment: &str, output_format: &str) -> &'static str {
    if output_format == "[[rating_a,rating_b]]" {
        let (main, backup) = two_scores();
        let Some(c) = main.captures(judgment).or_else(|| backup.captures(judgment)) else {
            return "error";
        };
        let (Ok(a), Ok(b)) = (c[1].parse::<f64>(), c[2].parse::<f64>()) else {
            return "error";
        };
        return if (a - b).abs() <= 0.1 {
            "tie"
        } else if a > b {
            "A"
        } else {
            "B"
        };
    }
    if judgment.contains("[[A]]") {
        "A"
    } else if judgment.contains("[[B]]") {
        "B"
    } else if judgment.contains("[[C]]") {
        "tie"
    } else {
        "error"
    }
}

/// A single-mode judgment line (FastChat's fields, plus `category`, and
/// `verdict_forced` / `error` when they apply).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SingleJudgment {
    /// The question.
    pub question_id: QuestionId,
    /// The judged model.
    pub model: String,
    /// `[judge model, prompt name]`.
    pub judge: (String, String),
    /// The user message sent to the judge.
    pub user_prompt: String,
    /// The judge's reply.
    pub judgment: String,
    /// The rating, -1 when none could be read.
    pub score: Number,
    /// 1 or 2.
    pub turn: u8,
    /// Unix time.
    pub tstamp: f64,
    /// The question's category.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    /// The verdict was asked for again with constrained decoding.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub verdict_forced: bool,
    /// Why the judge call failed; redone on the next run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A pairwise judgment line (FastChat's fields, plus `category`, and
/// `verdict_forced` / `error` when they apply).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairJudgment {
    /// The question.
    pub question_id: QuestionId,
    /// First model.
    pub model_1: String,
    /// Second model.
    pub model_2: String,
    /// Verdict with model_1 as assistant A: `model_1`, `model_2`, `tie` or `error`.
    pub g1_winner: String,
    /// Verdict with model_2 as assistant A, in the same terms.
    pub g2_winner: String,
    /// `[judge model, prompt name]`.
    pub judge: (String, String),
    /// Prompt with model_1 as A.
    pub g1_user_prompt: String,
    /// The judge's reply to it.
    pub g1_judgment: String,
    /// Prompt with model_2 as A.
    pub g2_user_prompt: String,
    /// The judge's reply to it.
    pub g2_judgment: String,
    /// 1 or 2.
    pub turn: u8,
    /// Unix time.
    pub tstamp: f64,
    /// The question's category.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    /// A verdict was asked for again with constrained decoding.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub verdict_forced: bool,
    /// Why a judge call failed; redone on the next run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// How to judge.
#[derive(Debug, Clone)]
pub struct JudgeOptions {
    /// The judge's name in the `judge` field.
    pub judge_name: String,
    /// Most tokens per judge reply (FastChat: 2048).
    pub max_tokens: usize,
    /// Concurrent judge calls.
    pub parallel: usize,
    /// When a verdict cannot be read and the judge supports constrained
    /// decoding, ask once more with the verdict forced to a valid one.
    pub force_verdict: bool,
    /// Ask for the verdict as JSON under a schema ([`verdict_schema`]) and
    /// write it into the judgment the way FastChat's judges write it.
    pub schema_verdicts: bool,
}

/// What a dry run would spend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Matches to judge (after those already in the output file).
    pub matches: usize,
    /// Matches already judged.
    pub done: usize,
    /// Judge calls (pairwise matches take two).
    pub calls: usize,
    /// Prompt characters of those calls.
    pub prompt_chars: usize,
}

impl Plan {
    /// Prompt tokens, estimated at 4 characters a token (the usual figure
    /// for English with GPT tokenizers).
    pub fn prompt_tokens_estimate(&self) -> usize {
        self.prompt_chars.div_ceil(4)
    }
}

/// Which matches the output file already holds (without errors), and the plan for the rest.
pub fn plan(matches: &[Match], output: &Path, judge_name: &str) -> Result<(Vec<Match>, Plan)> {
    let done = done_keys(output)?;
    let pending: Vec<Match> = matches
        .iter()
        .filter(|m| !done.contains(&m.key(judge_name)))
        .cloned()
        .collect();
    let calls = pending.iter().map(|m| m.user_prompts.len()).sum();
    let prompt_chars = pending
        .iter()
        .map(|m| {
            m.user_prompts
                .iter()
                .map(|u| u.len() + m.system_prompt.len())
                .sum::<usize>()
        })
        .sum();
    Ok((
        pending.clone(),
        Plan {
            matches: pending.len(),
            done: matches.len() - pending.len(),
            calls,
            prompt_chars,
        },
    ))
}

/// A judgment row of either kind, as read back from an output file.
enum Row {
    Single(SingleJudgment),
    Pair(PairJudgment),
}

impl Row {
    fn ok(&self) -> bool {
        match self {
            Row::Single(j) => j.error.is_none() && j.judgment != ERROR_OUTPUT,
            Row::Pair(j) => j.error.is_none() && j.g1_judgment != ERROR_OUTPUT && j.g2_judgment != ERROR_OUTPUT,
        }
    }

    fn key(&self) -> String {
        match self {
            Row::Single(j) => key(&j.question_id, &j.model, None, &j.judge.0, &j.judge.1, j.turn),
            Row::Pair(j) => key(
                &j.question_id,
                &j.model_1,
                Some(&j.model_2),
                &j.judge.0,
                &j.judge.1,
                j.turn,
            ),
        }
    }

    fn to_value(&self) -> Value {
        match self {
            Row::Single(j) => serde_json::to_value(j),
            Row::Pair(j) => serde_json::to_value(j),
        }
        .expect("plain values serialize")
    }
}

fn read_rows(path: &Path) -> Result<(Vec<Row>, bool)> {
    if !path.exists() {
        return Ok((Vec::new(), false));
    }
    let (values, torn) = jsonl::read_resumable::<Value>(path)?;
    let mut rows = Vec::with_capacity(values.len());
    for (line, v) in values {
        let row = if v.get("model_1").is_some() {
            serde_json::from_value(v).map(Row::Pair)
        } else {
            serde_json::from_value(v).map(Row::Single)
        };
        rows.push(row.map_err(|e| EvalError::BadLine {
            path: path.to_path_buf(),
            line,
            msg: format!("not a judgment: {e}"),
        })?);
    }
    Ok((rows, torn))
}

fn done_keys(path: &Path) -> Result<HashSet<String>> {
    let (rows, _) = read_rows(path)?;
    Ok(rows.iter().filter(|r| r.ok()).map(Row::key).collect())
}

/// What a judging run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JudgeSummary {
    /// The output file.
    pub path: PathBuf,
    /// Matches judged now.
    pub judged: usize,
    /// Matches whose judge call failed (recorded with `error`; rerun to retry).
    pub failed: usize,
    /// Verdicts that could not be read (score -1 / winner `error`).
    pub unparsed: usize,
    /// Verdicts obtained by asking again with constrained decoding.
    pub forced: usize,
}

/// Judges `matches` (those not yet in `output`), appending each judgment as
/// it finishes; failed rows of earlier runs are replaced.
pub fn run_judge(
    judge: &dyn ChatModel,
    matches: &[Match],
    output: &Path,
    opts: &JudgeOptions,
    progress: &mut dyn Progress,
) -> Result<JudgeSummary> {
    let (pending, _) = plan(matches, output, &opts.judge_name)?;
    // Rewrite without failed rows and any torn last line, then append.
    let (rows, _) = read_rows(output)?;
    let kept: Vec<Value> = rows.iter().filter(|r| r.ok()).map(Row::to_value).collect();
    if output.exists() || !pending.is_empty() {
        jsonl::write_atomic(output, &kept)?;
    }
    let mut out = jsonl::Appender::open(output)?;
    let mut summary = JudgeSummary {
        path: output.to_path_buf(),
        judged: 0,
        failed: 0,
        unparsed: 0,
        forced: 0,
    };
    progress.start(pending.len());
    pool::run(
        pending,
        opts.parallel,
        |m| judge_match(judge, &m, opts),
        |row| -> Result<()> {
            let (msg, failed, unparsed, forced) = match &row {
                Row::Single(j) => (
                    format!(
                        "question {} turn {} {}: score {}",
                        j.question_id, j.turn, j.model, j.score
                    ),
                    j.error.is_some(),
                    j.score.as_f64() == Some(-1.0),
                    j.verdict_forced,
                ),
                Row::Pair(j) => (
                    format!(
                        "question {} turn {} {} vs {}: {} / {}",
                        j.question_id, j.turn, j.model_1, j.model_2, j.g1_winner, j.g2_winner
                    ),
                    j.error.is_some(),
                    j.g1_winner == "error" || j.g2_winner == "error",
                    j.verdict_forced,
                ),
            };
            out.push(&row.to_value())?;
            summary.judged += 1;
            summary.failed += failed as usize;
            summary.unparsed += (unparsed && !failed) as usize;
            summary.forced += forced as usize;
            progress.advance(&msg);
            Ok(())
        },
    )?;
    progress.finish();
    Ok(summary)
}

/// One judge call, with the constrained second ask when the verdict cannot
/// be read. Returns the judgment text, whether it was forced, and an error.
fn ask(
    judge: &dyn ChatModel,
    system: &str,
    user: &str,
    output_format: &str,
    opts: &JudgeOptions,
) -> (String, bool, Option<String>) {
    let schema = opts
        .schema_verdicts
        .then(|| verdict_schema(output_format, opts.max_tokens));
    let user = sent_prompt(user, output_format, opts);
    let mut messages = vec![Message::new("system", system), Message::new("user", user)];
    let req = ChatRequest {
        messages: messages.clone(),
        temperature: 0.0,
        max_tokens: opts.max_tokens,
        seed: None,
        guide: schema.map(|(s, _)| Guide::JsonSchema(s)),
    };
    let text = match judge.chat(&req) {
        Ok(r) if opts.schema_verdicts => render_verdict(&r.text, output_format).unwrap_or(r.text),
        Ok(r) => r.text,
        Err(e) => return (ERROR_OUTPUT.to_string(), false, Some(e.to_string())),
    };
    let readable = match output_format {
        "[[rating]]" => parse_rating(&text).is_some(),
        f => parse_winner(&text, f) != "error",
    };
    if readable || !opts.force_verdict || !judge.supports_guide() {
        return (text, false, None);
    }
    let (ask_again, guide) = verdict_guide(output_format);
    messages.push(Message::new("assistant", text.clone()));
    messages.push(Message::new("user", ask_again));
    let req = ChatRequest {
        messages,
        temperature: 0.0,
        max_tokens: 16,
        seed: None,
        guide: Some(guide),
    };
    match judge.chat(&req) {
        Ok(r) => {
            let full = format!("{text}\n\n{}", r.text);
            let forced = match output_format {
                "[[rating]]" => parse_rating(&r.text).is_some(),
                f => parse_winner(&r.text, f) != "error",
            };
            (full, forced, None)
        }
        // The first reply stands (unreadable, as FastChat would record it).
        Err(_) => (text, false, None),
    }
}

/// The user message sent to the judge: FastChat's prompt, and with
/// `--schema-verdicts` the sentence asking for the JSON verdict.
fn sent_prompt(user: &str, output_format: &str, opts: &JudgeOptions) -> String {
    if opts.schema_verdicts {
        let (_, ask) = verdict_schema(output_format, opts.max_tokens);
        format!("{user}\n\n{ask}")
    } else {
        user.to_string()
    }
}

/// The JSON schema of a verdict in `output_format`, with the sentence that
/// asks for it. The explanation comes first (properties are written in key
/// order, and `explanation` sorts before `rating`/`verdict`), so the judge
/// reasons before it rates, as FastChat's prompts ask; its length is bounded
/// so the verdict still fits in `max_tokens`.
pub fn verdict_schema(output_format: &str, max_tokens: usize) -> (Value, &'static str) {
    // About 2 characters a token at worst, and room for the keys and the verdict.
    let explanation = serde_json::json!({"type": "string", "maxLength": max_tokens.saturating_sub(24) / 2});
    let rating = serde_json::json!({"type": "integer", "minimum": 1, "maximum": 10});
    let (props, ask) = match output_format {
        "[[rating]]" => (
            serde_json::json!({"explanation": explanation, "rating": rating}),
            "Write your evaluation as a JSON object: {\"explanation\": \"...\", \"rating\": an integer from 1 to 10}.",
        ),
        "[[rating_a,rating_b]]" => (
            serde_json::json!({"explanation": explanation, "rating_a": rating, "rating_b": rating}),
            "Write your evaluation as a JSON object: {\"explanation\": \"...\", \"rating_a\": an integer from 1 to 10, \"rating_b\": an integer from 1 to 10}.",
        ),
        _ => (
            serde_json::json!({"explanation": explanation, "verdict": {"enum": ["A", "B", "tie"]}}),
            "Write your evaluation as a JSON object: {\"explanation\": \"...\", \"verdict\": \"A\", \"B\" or \"tie\"}.",
        ),
    };
    let required: Vec<&String> = props.as_object().map(|o| o.keys().collect()).unwrap_or_default();
    let schema = serde_json::json!({
        "type": "object",
        "properties": props,
        "required": required,
        "additionalProperties": false,
    });
    (schema, ask)
}

/// A schema-shaped verdict written as FastChat's judges write theirs: the
/// explanation, then `Rating: [[7]]`, `[[A]]`/`[[B]]`/`[[C]]` (tie) or
/// `[[7,5]]`, so [`parse_rating`] and [`parse_winner`] read it as they read
/// free text. `None` when `reply` is not such a verdict (cut off by
/// `max_tokens`, or a server that ignored the schema).
pub fn render_verdict(reply: &str, output_format: &str) -> Option<String> {
    let v: Value = serde_json::from_str(reply.trim()).ok()?;
    let explanation = v["explanation"].as_str().unwrap_or_default().trim();
    let rating = |k: &str| v[k].as_u64().filter(|r| (1..=10).contains(r));
    let verdict = match output_format {
        "[[rating]]" => format!("Rating: [[{}]]", rating("rating")?),
        "[[rating_a,rating_b]]" => format!("[[{},{}]]", rating("rating_a")?, rating("rating_b")?),
        _ => match v["verdict"].as_str()? {
            "A" => "[[A]]".to_string(),
            "B" => "[[B]]".to_string(),
            "tie" => "[[C]]".to_string(),
            _ => return None,
        },
    };
    Some(if explanation.is_empty() {
        verdict
    } else {
        format!("{explanation}\n\n{verdict}")
    })
}

/// The follow-up question and the constraint that make a verdict readable.
pub fn verdict_guide(output_format: &str) -> (&'static str, Guide) {
    match output_format {
        "[[rating]]" => (
            "Give your final rating now, strictly in the format \"[[rating]]\", for example \"[[5]]\".",
            Guide::Choice((1..=10).map(|i| format!("[[{i}]]")).collect()),
        ),
        "[[rating_a,rating_b]]" => (
            "Give your final ratings now, strictly in the format \"[[rating_a,rating_b]]\", for example \"[[5,6]]\".",
            Guide::Regex(r"\[\[(10|[1-9]),(10|[1-9])\]\]".into()),
        ),
        _ => (
            "Give your final verdict now, strictly in the format \"[[A]]\", \"[[B]]\" or \"[[C]]\".",
            Guide::Choice(vec!["[[A]]".into(), "[[B]]".into(), "[[C]]".into()]),
        ),
    }
}

fn judge_match(judge: &dyn ChatModel, m: &Match, opts: &JudgeOptions) -> Row {
    let judge_field = (opts.judge_name.clone(), m.prompt_name.clone());
    match &m.model_2 {
        None => {
            let (judgment, forced, error) = ask(judge, &m.system_prompt, &m.user_prompts[0], &m.output_format, opts);
            let score = parse_rating(&judgment).unwrap_or_else(|| Number::from(-1));
            Row::Single(SingleJudgment {
                question_id: m.question_id.clone(),
                model: m.model_1.clone(),
                judge: judge_field,
                user_prompt: sent_prompt(&m.user_prompts[0], &m.output_format, opts),
                judgment,
                score,
                turn: m.turn,
                tstamp: now(),
                category: Some(m.category.clone()),
                verdict_forced: forced,
                error,
            })
        }
        Some(m2) => {
            let (j1, f1, e1) = ask(judge, &m.system_prompt, &m.user_prompts[0], &m.output_format, opts);
            let (j2, f2, e2) = ask(judge, &m.system_prompt, &m.user_prompts[1], &m.output_format, opts);
            let g1 = match parse_winner(&j1, &m.output_format) {
                "A" => "model_1",
                "B" => "model_2",
                w => w,
            };
            let g2 = match parse_winner(&j2, &m.output_format) {
                "A" => "model_2",
                "B" => "model_1",
                w => w,
            };
            Row::Pair(PairJudgment {
                question_id: m.question_id.clone(),
                model_1: m.model_1.clone(),
                model_2: m2.clone(),
                g1_winner: g1.to_string(),
                g2_winner: g2.to_string(),
                judge: judge_field,
                g1_user_prompt: sent_prompt(&m.user_prompts[0], &m.output_format, opts),
                g1_judgment: j1,
                g2_user_prompt: sent_prompt(&m.user_prompts[1], &m.output_format, opts),
                g2_judgment: j2,
                turn: m.turn,
                tstamp: now(),
                category: Some(m.category.clone()),
                verdict_forced: f1 || f2,
                error: e1.or(e2),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratings_as_fastchat_reads_them() {
        assert_eq!(parse_rating("Fine. Rating: [[7]]"), Some(Number::from(7)));
        assert_eq!(parse_rating("Rating: [[7.5]] and [[3]]").unwrap().as_f64(), Some(7.5));
        assert_eq!(parse_rating("score [8] only").unwrap(), Number::from(8));
        assert_eq!(parse_rating("[[8.]]").unwrap().as_f64(), Some(8.0));
        assert!(parse_rating("[[8.]]").unwrap().is_f64());
        assert_eq!(parse_rating("no verdict [[x]]"), None);
    }

    #[test]
    fn winners_as_fastchat_reads_them() {
        assert_eq!(parse_winner("... [[B]] ... [[A]]", "[[A]]"), "A");
        assert_eq!(parse_winner("[[C]]", "[[A]]"), "tie");
        assert_eq!(parse_winner("[[c]]", "[[A]]"), "error");
        assert_eq!(parse_winner("[[7, 7.05]]", "[[rating_a,rating_b]]"), "tie");
        assert_eq!(parse_winner("[6,8]", "[[rating_a,rating_b]]"), "B");
        assert_eq!(parse_winner("none", "[[rating_a,rating_b]]"), "error");
    }

    #[test]
    fn schema_verdicts_read_as_fastchat_text_verdicts() {
        let single = render_verdict(r#"{"explanation": "Accurate.", "rating": 7}"#, "[[rating]]").unwrap();
        assert_eq!(single, "Accurate.\n\nRating: [[7]]");
        assert_eq!(parse_rating(&single), Some(Number::from(7)));
        for (verdict, winner) in [("A", "A"), ("B", "B"), ("tie", "tie")] {
            let reply = format!(r#"{{"explanation": "", "verdict": "{verdict}"}}"#);
            let text = render_verdict(&reply, "[[A]]").unwrap();
            assert_eq!(parse_winner(&text, "[[A]]"), winner, "{text}");
        }
        let pair = render_verdict(
            r#"{"explanation": "x", "rating_a": 4, "rating_b": 9}"#,
            "[[rating_a,rating_b]]",
        )
        .unwrap();
        assert_eq!(parse_winner(&pair, "[[rating_a,rating_b]]"), "B");
        // Cut off, out of range, or not JSON: not a verdict.
        assert_eq!(render_verdict(r#"{"explanation": "Accur"#, "[[rating]]"), None);
        assert_eq!(render_verdict(r#"{"rating": 11}"#, "[[rating]]"), None);
        assert_eq!(render_verdict("Rating: [[7]]", "[[rating]]"), None);
        let (schema, ask) = verdict_schema("[[rating]]", 64);
        assert_eq!(schema["properties"]["rating"]["maximum"], 10);
        assert_eq!(schema["required"], serde_json::json!(["explanation", "rating"]));
        assert!(ask.contains("JSON"));
    }
}
