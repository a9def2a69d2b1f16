//! FastChat's wire protocol between the gateway, the controller and workers:
//! the JSON bodies of each endpoint and the NUL-delimited stream of cumulative
//! chunks. Field names and defaults are FastChat 0.2.36's, so a FastChat worker
//! can join a vicugna controller and the other way round.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// FastChat's catch-all error text; vicugna always appends the real reason.
pub const SERVER_ERROR_MSG: &str = "**NETWORK ERROR DUE TO HIGH TRAFFIC. PLEASE REGENERATE OR REFRESH THIS PAGE.**";

/// FastChat's error codes (`fastchat/constants.py`, `ErrorCode`).
pub mod code {
    /// The request body has the wrong shape.
    pub const VALIDATION_TYPE_ERROR: i64 = 40001;
    /// Missing or unknown API key.
    pub const INVALID_AUTH_KEY: i64 = 40101;
    /// No such model.
    pub const INVALID_MODEL: i64 = 40301;
    /// A parameter is outside its range.
    pub const PARAM_OUT_OF_RANGE: i64 = 40302;
    /// The prompt does not fit the context.
    pub const CONTEXT_OVERFLOW: i64 = 40303;
    /// Every worker's queue is full.
    pub const ENGINE_OVERLOADED: i64 = 42903;
    /// Anything else that failed inside a worker.
    pub const INTERNAL_ERROR: i64 = 50001;
    /// No worker serves the model.
    pub const CONTROLLER_NO_WORKER: i64 = 50005;
    /// A worker did not answer in time.
    pub const CONTROLLER_WORKER_TIMEOUT: i64 = 50006;
}

fn one() -> f64 {
    1.0
}

/// A worker's `/worker_get_status` reply.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkerStatus {
    pub model_names: Vec<String>,
    #[serde(default = "one")]
    pub speed: f64,
    #[serde(default)]
    pub queue_length: usize,
}

/// `/register_worker`: `worker_status: null` makes the controller ask the worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegisterWorker {
    pub worker_name: String,
    #[serde(default)]
    pub check_heart_beat: bool,
    #[serde(default)]
    pub worker_status: Option<WorkerStatus>,
    #[serde(default)]
    pub multimodal: bool,
}

/// `/receive_heart_beat`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeartBeat {
    pub worker_name: String,
    #[serde(default)]
    pub queue_length: usize,
}

/// `/receive_heart_beat` reply: `exist: false` tells the worker to register again.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeartBeatReply {
    pub exist: bool,
}

/// `/get_worker_address`. `exclude` is a vicugna extension (workers the caller
/// just failed to reach or found full); FastChat controllers ignore it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerAddressRequest {
    pub model: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
}

/// `/get_worker_address` reply; `""` when no worker serves the model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerAddress {
    pub address: String,
}

/// `/list_models` reply.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelList {
    pub models: Vec<String>,
}

/// Token counts in a chunk.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct UsageInfo {
    #[serde(default)]
    pub prompt_tokens: usize,
    #[serde(default)]
    pub completion_tokens: usize,
    #[serde(default)]
    pub total_tokens: usize,
}

/// Logprobs in FastChat's (and the legacy completions API's) layout, cumulative
/// like the text: one entry per token so far.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LogProbs {
    #[serde(default)]
    pub text_offset: Vec<usize>,
    #[serde(default)]
    pub tokens: Vec<String>,
    #[serde(default)]
    pub token_logprobs: Vec<Option<f32>>,
    #[serde(default)]
    pub top_logprobs: Vec<Option<HashMap<String, f32>>>,
}

/// One chunk of `/worker_generate_stream` (and the body of `/worker_generate`):
/// `text` is everything generated so far (the prompt too with `echo`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Chunk {
    pub text: String,
    #[serde(default)]
    pub error_code: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageInfo>,
    #[serde(default)]
    pub finish_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<LogProbs>,
}

impl Chunk {
    /// An error chunk: FastChat's message, then the actual reason.
    pub fn error(code: i64, reason: impl std::fmt::Display) -> Self {
        Chunk {
            text: format!("{SERVER_ERROR_MSG}\n\n({reason})"),
            error_code: code,
            ..Chunk::default()
        }
    }

    /// The reason of an error chunk, without FastChat's generic prefix.
    pub fn error_reason(&self) -> &str {
        let t = self.text.strip_prefix(SERVER_ERROR_MSG).unwrap_or(&self.text).trim();
        t.strip_prefix('(').and_then(|t| t.strip_suffix(')')).unwrap_or(t)
    }

    /// The chunk as it goes on the wire: JSON then a NUL byte.
    pub fn to_wire(&self) -> bytes::Bytes {
        let mut v = serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec());
        v.push(0);
        v.into()
    }
}

/// The message of a chat, as the gateway forwards it to a vicugna worker.
pub use vicugna_chat::ChatMessage;

/// `/worker_generate_stream` parameters: FastChat's, plus vicugna extensions
/// (`messages`, `seed`, `max_new_tokens: null`, `prompt` as token ids) that a
/// FastChat worker ignores.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GenerateParams {
    #[serde(default)]
    pub model: String,
    /// Text, or (vicugna) a list of token ids.
    #[serde(default)]
    pub prompt: serde_json::Value,
    /// Chat messages the worker renders with its own template (vicugna).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<ChatMessage>>,
    /// Tools passed to the model's own chat template with `messages`
    /// (vicugna; sent only to a worker reporting a `tool_syntax`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<vicugna_chat::ToolSpec>>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub top_k: Option<i64>,
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    /// `null` (vicugna): as many as the context leaves.
    #[serde(default)]
    pub max_new_tokens: Option<i64>,
    /// A string or a list of strings.
    #[serde(default)]
    pub stop: serde_json::Value,
    #[serde(default)]
    pub stop_token_ids: Option<Vec<u32>>,
    /// FastChat's default is true.
    #[serde(default)]
    pub echo: Option<bool>,
    /// Alternatives per token (an integer; `true` means 0).
    #[serde(default)]
    pub logprobs: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Keep going past EOS (vicugna, as vLLM's worker).
    #[serde(default)]
    pub ignore_eos: bool,
    /// The output must be one of these strings (vLLM's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guided_choice: Option<Vec<String>>,
    /// The output must match this regex (vLLM's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guided_regex: Option<String>,
    /// The output must be JSON this schema accepts (vLLM's name); the string
    /// `"object"` (vicugna) asks for any JSON object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guided_json: Option<serde_json::Value>,
    /// Drops tokens below this fraction of the top token's probability (vLLM's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_p: Option<f32>,
    /// Bias added to token logits, as (id, bias) pairs (the gateway converts
    /// OpenAI's `{"id": bias}` map).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logit_bias: Option<Vec<(u32, f32)>>,
    /// The requests of one API call (its `n` choices) carry the same group
    /// (vicugna): a group holds at most half of the worker's batch slots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<u64>,
    /// Untrusted text (vicugna): with `messages`, `true` parses special-token
    /// strings typed in message contents as control tokens (FastChat's
    /// behaviour); by default they are encoded as text.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub parse_special_tokens_in_content: bool,
    /// Untrusted text (vicugna): `[start, end)` byte ranges of a text `prompt`
    /// (the message contents of a prompt the caller rendered) whose
    /// special-token strings are encoded as text. FastChat workers ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub literal_spans: Option<Vec<(usize, usize)>>,
}

/// `/worker_get_embeddings` parameters.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EmbeddingParams {
    #[serde(default)]
    pub model: String,
    /// Strings (FastChat), or (vicugna) token-id lists.
    pub input: Vec<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding_format: Option<String>,
}

/// `/worker_get_embeddings` reply: vectors (or base64 strings) and tokens used.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EmbeddingReply {
    #[serde(default)]
    pub embedding: Vec<serde_json::Value>,
    #[serde(default)]
    pub token_num: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default)]
    pub error_code: i64,
}

/// `/model_details` reply.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelDetails {
    pub context_length: usize,
}

/// Splits a NUL-delimited byte stream into chunks as bytes arrive.
#[derive(Default)]
pub struct ChunkSplitter {
    buf: Vec<u8>,
}

impl ChunkSplitter {
    /// Feeds bytes; returns the complete chunks they finish.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Vec<u8>> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(pos) = self.buf.iter().position(|&b| b == 0) {
            let rest = self.buf.split_off(pos + 1);
            let mut chunk = std::mem::replace(&mut self.buf, rest);
            chunk.pop();
            if !chunk.iter().all(u8::is_ascii_whitespace) {
                out.push(chunk);
            }
        }
        out
    }

    /// What is left after the stream ended (a last chunk without its NUL).
    pub fn finish(&mut self) -> Option<Vec<u8>> {
        let rest = std::mem::take(&mut self.buf);
        (!rest.iter().all(u8::is_ascii_whitespace)).then_some(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitter_handles_chunks_split_anywhere() {
        let wire = [
            Chunk {
                text: "a".into(),
                ..Chunk::default()
            }
            .to_wire(),
            Chunk {
                text: "ab".into(),
                finish_reason: Some("stop".into()),
                ..Chunk::default()
            }
            .to_wire(),
        ]
        .concat();
        for cut in 0..wire.len() {
            let mut s = ChunkSplitter::default();
            let mut got = s.push(&wire[..cut]);
            got.extend(s.push(&wire[cut..]));
            assert!(s.finish().is_none());
            let texts: Vec<String> = got
                .iter()
                .map(|c| serde_json::from_slice::<Chunk>(c).unwrap().text)
                .collect();
            assert_eq!(texts, ["a", "ab"]);
        }
    }

    #[test]
    fn error_chunk_keeps_the_reason() {
        let c = Chunk::error(code::CONTEXT_OVERFLOW, "too long");
        assert!(c.text.starts_with(SERVER_ERROR_MSG));
        assert_eq!(c.error_reason(), "too long");
    }
}
