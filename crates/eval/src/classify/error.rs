//! The classifier's one error type: every variant names the file, line or field at fault.

use std::path::PathBuf;

/// Errors from reading inputs, running a model and writing results.
#[derive(Debug, thiserror::Error)]
pub enum ClassifyError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A record of an input file (data, demonstrations, labels) is malformed.
    #[error("{path}:{line}: {message}")]
    Input {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("labels: {0}")]
    Labels(String),
    #[error("{path}: {message}")]
    Output { path: PathBuf, message: String },
    #[error("model: {0}")]
    Engine(#[from] vicugna_engine::EngineError),
    #[error("chat template: {0}")]
    Chat(#[from] vicugna_chat::ChatError),
    #[error("API {url}: {message}")]
    Api { url: String, message: String },
    #[error("plot {path}: {message}")]
    Plot { path: PathBuf, message: String },
    #[error("invalid setting: {0}")]
    Setting(String),
    #[error("interrupted")]
    Interrupted,
}

/// Result with [`ClassifyError`].
pub type Result<T, E = ClassifyError> = std::result::Result<T, E>;

impl ClassifyError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ClassifyError::Io {
            path: path.into(),
            source,
        }
    }

    /// A malformed record at `path:line`.
    pub fn input(path: impl Into<PathBuf>, line: usize, message: impl Into<String>) -> Self {
        ClassifyError::Input {
            path: path.into(),
            line,
            message: message.into(),
        }
    }
}
