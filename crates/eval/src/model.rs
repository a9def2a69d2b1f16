//! What answering and judging need from a model: one chat call. The OpenAI
//! client ([`crate::client::OpenAiChat`]) implements it for any compatible
//! server; the `vicugna` binary implements it over a local engine.

use serde::{Deserialize, Serialize};

use crate::error::Result;

/// One chat message (OpenAI roles `system`, `user`, `assistant`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl Message {
    /// A message with this role and text.
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Message {
            role: role.to_string(),
            content: content.into(),
        }
    }
}

/// A constraint on the reply, for models that support constrained decoding.
#[derive(Debug, Clone, PartialEq)]
pub enum Guide {
    /// The reply is exactly one of these strings.
    Choice(Vec<String>),
    /// The reply matches this regular expression.
    Regex(String),
    /// The reply is JSON valid under this schema: the standard
    /// `response_format: json_schema`, sent to any OpenAI-compatible server.
    JsonSchema(serde_json::Value),
}

/// One chat call.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    /// The conversation so far; the model answers the last user message.
    pub messages: Vec<Message>,
    /// 0 is greedy.
    pub temperature: f32,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Seed for sampling, where the model takes one.
    pub seed: Option<u64>,
    /// Constrained decoding, where the model supports it.
    pub guide: Option<Guide>,
}

/// A model's reply.
#[derive(Debug, Clone, Default)]
pub struct ChatReply {
    /// The generated text.
    pub text: String,
    /// Prompt tokens, when the model reports them.
    pub prompt_tokens: Option<u64>,
    /// Generated tokens, when the model reports them.
    pub completion_tokens: Option<u64>,
}

/// Something that answers chat calls. Called from several threads at once
/// (`--parallel`).
pub trait ChatModel: Send + Sync {
    /// Answers one call (retrying inside where that makes sense).
    fn chat(&self, req: &ChatRequest) -> Result<ChatReply>;
    /// Whether [`ChatRequest::guide`] is honoured (constrained decoding).
    fn supports_guide(&self) -> bool {
        false
    }
    /// A name for messages.
    fn describe(&self) -> String;
}
