//! The one request type every caller uses, and the events a request produces.

use crate::constraint::Constraint;
use crate::error::{EngineError, Result};

/// What to continue: text (tokenized by the engine) or token ids.
#[derive(Debug, Clone)]
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Nucleus mass kept, in (0, 1].
    pub top_p: f32,
    /// Keep only the k most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// HF-style: divides positive (multiplies negative) logits of seen tokens; 1 is off.
    pub repetition_penalty: f32,
    /// OpenAI-style, on generated tokens: subtracted once a token has appeared.
    pub presence_penalty: f32,
    /// OpenAI-style, on generated tokens: subtracted per occurrence.
    pub frequency_penalty: f32,
    /// Same seed, same request → same text.
    pub seed: Option<u64>,
    /// Drops tokens less likely than `min_p` × the most likely one's probability
    /// (after temperature); 0 is off.
    pub min_p: f32,
    /// Added to these ids' logits before anything else (OpenAI's `logit_bias`,
    /// each in [-100, 100]: -100 bans a token, 100 all but forces it).
    pub logit_bias: Vec<(u32, f32)>,
}

impl SamplingParams {
    /// Always the most likely token.
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            min_p: 0.0,
            logit_bias: Vec::new(),
        }
    }

    /// Whether sampling reduces to argmax.
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 1e-5 || self.top_k == 1
    }
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.7,
            top_p: 1.0,
            ..SamplingParams::greedy()
        }
    }
}

/// When generation ends, besides the token budget.
#[derive(Debug, Clone, Default)]
pub struct StopRules {
    /// Generation stops before any of these strings; they are not returned.
    pub stop_strings: Vec<String>,
    /// Generation stops at these ids (in addition to the model's EOS).
    pub stop_token_ids: Vec<u32>,
    /// Keep going past the model's EOS tokens.
    pub ignore_eos: bool,
}

/// One generation request.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: Prompt,
    /// Tokens to generate at most.
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: StopRules,
    /// Also return the prompt (text, ids and, with `logprobs`, their logprobs).
    pub echo: bool,
    /// Return the log-probability of each chosen token and this many alternatives.
    pub logprobs: Option<usize>,
    /// Drop the oldest prompt tokens when the prompt does not fit, instead of failing.
    pub truncate_left: bool,
    /// Add the tokenizer's special tokens (BOS) to a text prompt.
    pub add_special_tokens: bool,
    /// The generated text must be one of a list of strings or match a regex.
    pub constraint: Option<Constraint>,
}

impl GenerateRequest {
    /// A greedy request for `max_new_tokens` tokens after `prompt`.
    pub fn new(prompt: Prompt, max_new_tokens: usize) -> Self {
        GenerateRequest {
            prompt,
            max_new_tokens,
            sampling: SamplingParams::greedy(),
            stop: StopRules::default(),
            echo: false,
            logprobs: None,
            truncate_left: false,
            add_special_tokens: true,
            constraint: None,
        }
    }

    /// Checks every field, with a message naming the field and the allowed range.
    pub fn validate(&self) -> Result<()> {
        let s = &self.sampling;
        let bad = |m: String| Err(EngineError::InvalidRequest(m));
        if !s.temperature.is_finite() || s.temperature < 0.0 {
            return bad(format!("temperature must be >= 0, got {}", s.temperature));
        }
        if !(s.top_p > 0.0 && s.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", s.top_p));
        }
        if !s.repetition_penalty.is_finite() || s.repetition_penalty <= 0.0 {
            return bad(format!("repetition_penalty must be > 0, got {}", s.repetition_penalty));
        }
        for (name, v) in [
            ("presence_penalty", s.presence_penalty),
            ("frequency_penalty", s.frequency_penalty),
        ] {
            if !v.is_finite() || !(-2.0..=2.0).contains(&v) {
                return bad(format!("{name} must be in [-2, 2], got {v}"));
            }
        }
        if !(0.0..=1.0).contains(&s.min_p) {
            return bad(format!("min_p must be in [0, 1], got {}", s.min_p));
        }
        if let Some((id, b)) = s.logit_bias.iter().find(|(_, b)| !(-100.0..=100.0).contains(b)) {
            return bad(format!("logit_bias[{id}] must be in [-100, 100], got {b}"));
        }
        if self.max_new_tokens == 0 && !self.echo {
            return bad("max_new_tokens must be at least 1 (0 is allowed only with echo, to score a prompt)".into());
        }
        if let Some(n) = self.logprobs {
            if n > 20 {
                return bad(format!("logprobs must be at most 20, got {n}"));
            }
        }
        if self.stop.stop_strings.iter().any(|s| s.is_empty()) {
            return bad("stop strings must not be empty".into());
        }
        if let Prompt::Ids(ids) = &self.prompt {
            if ids.is_empty() {
                return bad("the prompt has no tokens".into());
            }
        }
        Ok(())
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS, a stop token or a stop string.
    Stop,
    /// The token budget or the context ran out.
    Length,
}

impl FinishReason {
    /// The OpenAI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// A token's log-probability, with the most likely alternatives at its position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub text: String,
    pub logprob: f32,
    /// (id, text, logprob), most likely first.
    pub top: Vec<(u32, String, f32)>,
}

/// Token counts of a finished request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// What a request produces, in order: optionally `Prompt`, then `Token`s, then `Done`
/// (or `Error`).
#[derive(Debug, Clone)]
pub enum Event {
    /// The prompt, when `echo` was asked; logprobs of each prompt token after the
    /// first when `logprobs` was asked too.
    Prompt {
        text: String,
        ids: Vec<u32>,
        logprobs: Option<Vec<TokenLogprob>>,
    },
    /// One generated token. `text` is the new text it completes, which may be empty
    /// while a multi-byte character or a possible stop string is still open.
    Token {
        id: u32,
        text: String,
        logprob: Option<TokenLogprob>,
    },
    /// The end. `text` is what was held back and not yet sent (normally empty).
    Done {
        finish_reason: FinishReason,
        usage: Usage,
        text: String,
    },
    /// The request failed; nothing more follows.
    Error(String),
}
