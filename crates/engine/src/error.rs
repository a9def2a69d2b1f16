//! The engine's one error type: every variant says which file, tensor or field.

use std::path::PathBuf;

/// Errors from loading models and generating text.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{path}: file not found ({what})")]
    MissingFile { path: PathBuf, what: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {message}")]
    BadJson { path: PathBuf, message: String },
    #[error("{path}: field `{field}`: {message}")]
    BadConfig {
        path: PathBuf,
        field: String,
        message: String,
    },
    #[error("{path}: unsupported architecture `{arch}` (supported: {supported})")]
    UnsupportedArchitecture {
        path: PathBuf,
        arch: String,
        supported: String,
    },
    #[error("{path}: tensor `{tensor}`: {message}")]
    BadTensor {
        path: PathBuf,
        tensor: String,
        message: String,
    },
    #[error("{path}: not a valid {format} file: {message}")]
    BadFile {
        path: PathBuf,
        format: &'static str,
        message: String,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("the prompt has {prompt} tokens but the model's context holds {context} (ask for left truncation, or shorten it)")]
    PromptTooLong { prompt: usize, context: usize },
    /// A text refused before tokenizing: it has more than `limit` tokens for sure.
    #[error("the text is {bytes} bytes, more than {limit} tokens can hold (no token of this model stands for more than {} bytes, so {limit} tokens hold at most {max_bytes} bytes)", max_bytes / (*limit).max(1))]
    TextTooLong {
        bytes: usize,
        limit: usize,
        max_bytes: usize,
    },
    /// A named model (`default`, `gemma3-270m`) could not be fetched or checked;
    /// the message names the model.
    #[error("{0}")]
    DefaultModel(String),
    #[error("the engine has stopped")]
    EngineStopped,
    /// A request that was accepted failed while generating.
    #[error("generation failed: {0}")]
    Generation(String),
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Result with [`EngineError`].
pub type Result<T, E = EngineError> = std::result::Result<T, E>;

impl EngineError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::NotFound {
            let path = path.into();
            return EngineError::MissingFile {
                what: "no such file or directory".into(),
                path,
            };
        }
        EngineError::Io {
            path: path.into(),
            source,
        }
    }
}
