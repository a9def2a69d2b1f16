//! Errors of the data tools and the trainer: each says which file, which record
//! or which setting, and what was expected.

use std::path::{Path, PathBuf};

/// What went wrong in data preparation or training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {path}: {message}")]
    Write { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    BadData { path: PathBuf, message: String },
    #[error("sample {id:?}: {message}")]
    BadSample { id: String, message: String },
    #[error("invalid setting {name}: {message}")]
    BadSetting { name: &'static str, message: String },
    #[error("checkpoint {path}: {message}")]
    BadCheckpoint { path: PathBuf, message: String },
    #[error(transparent)]
    Chat(#[from] vicugna_chat::ChatError),
    #[error(transparent)]
    Engine(#[from] vicugna_engine::EngineError),
    #[error(transparent)]
    Weights(#[from] vicugna_weights::WeightsError),
    #[error("tensor operation: {0}")]
    Tensor(#[from] candle_core::Error),
    #[error("plot {path}: {message}")]
    Plot { path: PathBuf, message: String },
}

impl TrainError {
    /// An I/O error on `path`.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        TrainError::Io {
            path: path.into(),
            source,
        }
    }

    /// A setting out of range.
    pub fn setting(name: &'static str, message: impl Into<String>) -> Self {
        TrainError::BadSetting {
            name,
            message: message.into(),
        }
    }
}

/// Result of the train crate.
pub type Result<T> = std::result::Result<T, TrainError>;
