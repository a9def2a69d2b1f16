//! vicugna-engine: the model runtime. Loads HF-layout and GGUF models of the llama
//! family, tokenizes exactly as HF does, and generates text through one request
//! type and one stream of events. Knows nothing of HTTP or chat templates.

pub mod default_model;
pub mod error;
pub mod tokenizer;

pub use error::{EngineError, Result};
