//! What the classifier needs from a model, implemented by the local engine
//! ([`super::local::LocalBackend`]) and by an OpenAI-compatible API
//! ([`super::api::ApiBackend`]).

use super::error::Result;
use super::prompt::{Demo, Method, Prompts};

/// One answer of the model for one input.
#[derive(Debug, Clone, PartialEq)]
pub struct Vote {
    /// The label index; `None` only when an unconstrained answer could not be parsed.
    pub label: Option<usize>,
    /// Probability of each label, when the backend has logprobs.
    pub probs: Option<Vec<f64>>,
    pub clues: String,
    pub reasoning: String,
}

/// Counters a backend keeps over a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackendStats {
    /// Prompt tokens sent to the model.
    pub prompt_tokens: u64,
    /// Tokens generated.
    pub completion_tokens: u64,
    /// Prompt tokens whose KV cache the engine reused from an earlier request.
    pub reused_tokens: u64,
    /// Answers that could not be parsed into a label (before retries).
    pub parse_failures: u64,
}

/// A model that classifies.
pub trait Backend: Sync {
    /// One classification of `text`, shown `demos` (least similar first). `seed`
    /// set means sample (one vote of several); unset means greedy.
    fn classify(
        &self,
        prompts: &Prompts,
        method: Method,
        demos: &[Demo],
        text: &str,
        seed: Option<u64>,
    ) -> Result<Vote>;

    /// Clues and reasoning for a demonstration, written by the model knowing its gold label.
    fn explain(&self, prompts: &Prompts, text: &str, label: usize) -> Result<(String, String)>;

    /// A sentence embedding of `text`, for choosing demonstrations by similarity.
    fn embed(&self, text: &str) -> Result<Vec<f32>>;

    /// Tokens in a user turn, to keep prompts within the context (an estimate
    /// where the backend cannot tokenize).
    fn count_tokens(&self, user: &str) -> usize;

    /// Identifies the model (for the demonstration cache and the run settings).
    fn model_id(&self) -> String;

    /// Counters so far.
    fn stats(&self) -> BackendStats;
}

/// Softmax of log-scores, in f64.
pub fn normalize(logs: &[f64]) -> Vec<f64> {
    let max = logs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    if !max.is_finite() {
        return vec![1.0 / logs.len() as f64; logs.len()];
    }
    let exps: Vec<f64> = logs.iter().map(|l| (l - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|e| e / sum).collect()
}

/// Splits an answer written as `CLUES: … REASONING: … LABEL: …` into clues and reasoning.
pub fn split_sections(answer: &str, prompts: &Prompts) -> (String, String) {
    let find = |hay: &str, marker: &str| -> Option<usize> {
        let lower = hay.to_lowercase();
        lower.find(&marker.to_lowercase()).filter(|_| lower.len() == hay.len())
    };
    let (c, r, l) = (
        prompts.clues_marker(),
        prompts.reasoning_marker(),
        prompts.label_marker(),
    );
    let end_of = |s: &str| find(s, l).unwrap_or(s.len());
    let clues_start = find(answer, c).map(|p| p + c.len());
    let reason_start = find(answer, r);
    let clues = match (clues_start, reason_start) {
        (Some(s), Some(e)) if e >= s => answer[s..e].to_string(),
        (Some(s), _) => answer[s..end_of(answer)].to_string(),
        _ => String::new(),
    };
    let reasoning = match reason_start {
        Some(p) => {
            let rest = &answer[p + r.len()..];
            rest[..end_of(rest)].to_string()
        }
        None => String::new(),
    };
    (clues.trim().to_string(), reasoning.trim().to_string())
}
