//! The one error type of the evaluation library.

use std::path::PathBuf;

/// What went wrong, naming the file, line and field where there is one.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A line of a JSONL file is not what was expected.
    #[error("{}:{line}: {msg}", path.display())]
    BadLine {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What was wrong with it.
        msg: String,
    },
    /// Inputs that do not fit together (a missing answer, an unknown judge prompt, …).
    #[error("{0}")]
    Input(String),
    /// A model API call failed for good (after retries where retrying made sense).
    #[error("{0}")]
    Api(String),
    /// The chart could not be drawn.
    #[error("chart {}: {msg}", path.display())]
    Chart {
        /// The chart file.
        path: PathBuf,
        /// Why.
        msg: String,
    },
}

/// Shorthand for results of this crate.
pub type Result<T, E = EvalError> = std::result::Result<T, E>;

impl EvalError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        EvalError::Io {
            path: path.into(),
            source,
        }
    }
}
