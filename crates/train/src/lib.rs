//! vicugna-train: ShareGPT data tools, loss masks, and full and LoRA fine-tuning
//! of the engine's own model, with checkpoints that survive being killed.

pub mod checkpoint;
pub mod clean;
pub mod data;
pub mod error;
pub mod hf_names;
pub mod lora;
pub mod mask;
pub mod optim;
pub mod plot;
pub mod trainer;

pub use error::{Result, TrainError};
