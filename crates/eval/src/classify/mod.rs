//! Text classification and corpus annotation with CARP (Sun et al. 2023,
//! "Text Classification via Large Language Models"): the model lists clues,
//! reasons from them, then decides; few-shot demonstrations carry clues and
//! reasoning the model wrote for their gold labels and are chosen by kNN over
//! embeddings; several sampled votes combine by majority or by probability.
//!
//! The pieces: [`labels`] and [`input`] read the task, [`prompt`] writes the
//! prompts (English and Chinese), [`local`] and [`api`] ask a model,
//! [`demos`] chooses and explains demonstrations, [`run`] classifies and
//! writes [`output`] records, [`metrics`] and [`plot`] score a labelled run.

pub mod api;
pub mod backend;
pub mod baseline;
pub mod demos;
pub mod error;
pub mod input;
pub mod labels;
pub mod local;
pub mod metrics;
pub mod output;
pub mod parallel;
pub mod parse;
pub mod plot;
pub mod prompt;
pub mod run;
pub mod score;
pub mod voting;

pub use backend::{Backend, BackendStats, Vote};
pub use error::{ClassifyError, Result};
pub use input::{read_items, Fields, InputFormat, Item};
pub use labels::{Label, LabelSet};
pub use metrics::Metrics;
pub use output::{Record, ResultsFile};
pub use prompt::{Demo, Lang, Method, Prompts};
pub use run::{classify_items, RunOptions, RunSummary};
pub use voting::VoteRule;
