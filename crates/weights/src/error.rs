//! Errors of the weight tools: each names the file and, where there is one, the tensor.

use std::path::{Path, PathBuf};

/// What went wrong, and where.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path}: no space left on the device (the output needs {needed} bytes); nothing was written to the target"
    )]
    DiskFull { path: PathBuf, needed: u64 },
    #[error("{path}: not a valid {format} file: {message}")]
    BadFile {
        path: PathBuf,
        format: &'static str,
        message: String,
    },
    #[error("{path}: tensor {tensor}: {message}")]
    BadTensor {
        path: PathBuf,
        tensor: String,
        message: String,
    },
    #[error("{path}: {field}: {message}")]
    BadConfig {
        path: PathBuf,
        field: String,
        message: String,
    },
    #[error("{path}: {what}")]
    MissingFile { path: PathBuf, what: String },
    #[error("{what} do not match ({count} problems):\n{list}")]
    Mismatch { what: String, count: usize, list: String },
    #[error("{path}: already exists; choose another output path or remove it first")]
    TargetExists { path: PathBuf },
    #[error("verification failed: {0}")]
    Verify(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("tensor computation: {0}")]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Engine(#[from] vicugna_engine::EngineError),
}

/// Result of the weight tools.
pub type Result<T> = std::result::Result<T, WeightsError>;

impl WeightsError {
    /// An I/O error on `path`; a full disk gets its own message.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        WeightsError::Io {
            path: path.into(),
            source,
        }
    }
}
