//! vicugna-eval: measuring chatbots with an LLM judge, compatible with
//! FastChat's `llm_judge` files (MT-bench, Vicuna-80).
//!
//! - [`answer`]: answers to benchmark questions from any [`ChatModel`]
//!   (FastChat's answer layout, per-category temperatures, resumable);
//! - [`judge`]: single-answer grading and pairwise comparison with
//!   position swap, FastChat's prompts and verdict parsing;
//! - [`show`]: FastChat's result tables, per-category scores, [`chart`]s;
//! - [`review`]: the original Vicuna-80 reviewer ("8 7") and its totals.
//!
//! Models are reached through [`client::OpenAiChat`] (any OpenAI-compatible
//! server) or any other [`ChatModel`] (the `vicugna` binary adds a local
//! engine).

#![warn(missing_docs)]

pub mod answer;
pub mod chart;
// Field-level docs of the classification types are still to be written.
#[allow(missing_docs)]
pub mod classify;
pub mod client;
mod error;
pub mod jsonl;
pub mod judge;
pub mod model;
pub mod pool;
pub mod prompt;
pub mod question;
pub mod review;
pub mod show;

pub use error::{EvalError, Result};
pub use model::{ChatModel, ChatReply, ChatRequest, Guide, Message};
pub use question::{load_questions, Question, QuestionId};
