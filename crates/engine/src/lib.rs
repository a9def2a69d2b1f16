//! vicugna-engine: the model runtime. Loads HF-layout and GGUF models of the llama
//! family, tokenizes exactly as HF does, and generates text through one request
//! type and one stream of events. Knows nothing of HTTP or chat templates.

pub mod constraint;
pub mod default_model;
pub mod engine;
pub mod error;
pub mod json_schema;
pub mod kernels;
pub mod loader;
pub mod model;
pub use model::config;
pub mod request;
pub mod sampler;
pub mod team;
pub mod text_stream;
pub mod tokenizer;
pub mod torch_bin;
pub mod weights;

pub use constraint::Constraint;
pub use engine::{Completion, EngineHandle, EngineOptions, EngineStats, EventStream, ModelInfo, StatsSnapshot};
pub use error::{EngineError, Result};
pub use loader::{LoadOptions, LoadedModel};
pub use model::{KvCache, KvDType, Model, SeqInput, WeightDType};
pub use request::{Event, FinishReason, GenerateRequest, Prompt, SamplingParams, StopRules, TokenLogprob, Usage};
