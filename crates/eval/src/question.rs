//! Benchmark questions in FastChat's layout: `{question_id, category, turns}`
//! (MT-bench, `vicuna_bench`), or the original Vicuna-80 `{question_id, text,
//! category}`, read as a one-turn question.

use std::collections::HashSet;
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{EvalError, Result};
use crate::jsonl;

/// A question id as FastChat writes it: a number (MT-bench) or a string
/// (other benches); the original type is kept when it is written back.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(untagged)]
pub enum QuestionId {
    /// `"question_id": 81`
    Int(i64),
    /// `"question_id": "abc"`
    Str(String),
}

impl fmt::Display for QuestionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QuestionId::Int(i) => write!(f, "{i}"),
            QuestionId::Str(s) => f.write_str(s),
        }
    }
}

/// One question: one or more user turns.
#[derive(Debug, Clone, PartialEq)]
pub struct Question {
    /// Its id.
    pub question_id: QuestionId,
    /// MT-bench category (`writing`, `math`, …); empty when the file has none.
    pub category: String,
    /// The user turns, in order.
    pub turns: Vec<String>,
    /// A temperature the question asks for (FastChat's `required_temperature`).
    pub required_temperature: Option<f32>,
}

/// The categories whose judge prompts compare against a reference answer
/// (FastChat's `NEED_REF_CATS`).
pub const NEED_REF_CATS: [&str; 4] = ["math", "reasoning", "coding", "arena-hard-200"];

impl Question {
    /// Whether the judge needs a reference answer for it.
    pub fn needs_reference(&self) -> bool {
        NEED_REF_CATS.contains(&self.category.as_str())
    }
}

/// FastChat's sampling temperature for a category (`temperature_config`,
/// 0.7 for categories it does not list).
pub fn category_temperature(category: &str) -> f32 {
    match category {
        "writing" | "roleplay" => 0.7,
        "extraction" | "math" | "coding" | "reasoning" | "arena-hard-200" => 0.0,
        "stem" | "humanities" => 0.1,
        _ => 0.7,
    }
}

impl Question {
    /// The temperature to answer it with: `force`, else its own
    /// `required_temperature`, else its category's (FastChat's order).
    pub fn temperature(&self, force: Option<f32>) -> f32 {
        force
            .or(self.required_temperature)
            .unwrap_or_else(|| category_temperature(&self.category))
    }
}

/// Reads a question file; fails on a malformed line (with its number), a
/// question without turns, or a repeated id.
pub fn load_questions(path: &Path) -> Result<Vec<Question>> {
    let rows: Vec<(usize, Value)> = jsonl::read(path)?;
    let mut out = Vec::with_capacity(rows.len());
    let mut seen = HashSet::new();
    for (line, v) in rows {
        let bad = |msg: String| EvalError::BadLine {
            path: path.to_path_buf(),
            line,
            msg,
        };
        let id: QuestionId = match v.get("question_id") {
            Some(id @ (Value::Number(_) | Value::String(_))) => serde_json::from_value(id.clone())
                .map_err(|_| bad(format!("question_id must be an integer or a string, got {id}")))?,
            Some(other) => return Err(bad(format!("question_id must be an integer or a string, got {other}"))),
            None => return Err(bad("missing field question_id".into())),
        };
        let turns = match (v.get("turns"), v.get("text")) {
            (Some(Value::Array(a)), _) => a
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    t.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| bad(format!("turns[{i}] must be a string")))
                })
                .collect::<Result<Vec<_>>>()?,
            (Some(_), _) => return Err(bad("turns must be a list of strings".into())),
            (None, Some(Value::String(t))) => vec![t.clone()],
            (None, _) => return Err(bad("missing field turns (or text, in the Vicuna-80 layout)".into())),
        };
        if turns.is_empty() {
            return Err(bad("turns is empty".into()));
        }
        let category = match v.get("category") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(c)) => c.clone(),
            Some(other) => return Err(bad(format!("category must be a string, got {other}"))),
        };
        let required_temperature = match v.get("required_temperature") {
            None | Some(Value::Null) => None,
            Some(t) => Some(
                t.as_f64()
                    .ok_or_else(|| bad(format!("required_temperature must be a number, got {t}")))?
                    as f32,
            ),
        };
        if !seen.insert(id.clone()) {
            return Err(bad(format!("question_id {id} appears twice")));
        }
        out.push(Question {
            question_id: id,
            category,
            turns,
            required_temperature,
        });
    }
    if out.is_empty() {
        return Err(EvalError::Input(format!("{}: no questions", path.display())));
    }
    Ok(out)
}
