//! vicugna-chat: turning a conversation into the prompt text a model expects.
//!
//! Two kinds of template, as FastChat and HF transformers have them:
//!
//! - **FastChat conversation templates** ([`Conversation`], [`get_template`]):
//!   FastChat 0.2.36's named templates, reproduced exactly (checked against
//!   624 prompts FastChat rendered). The templates are data (`templates.json`,
//!   one entry per template); the 20 ways of joining turns are code
//!   ([`SeparatorStyle`], one function per style).
//! - **HF Jinja chat templates** ([`HfChatTemplate`]): a model's own
//!   `chat_template` from `tokenizer_config.json` (or GGUF metadata), rendered
//!   as `tokenizer.apply_chat_template` does.
//!
//! [`match_template`] picks a FastChat template from a model name or path as
//! FastChat's model adapters do. Stop strings and stop token ids come with
//! each FastChat template ([`Conversation::stop_str`],
//! [`Conversation::stop_token_ids`]).
//!
//! ```
//! use vicugna_chat::{render_messages, ChatMessage};
//! let prompt = render_messages("vicuna_v1.1", &[ChatMessage::new("user", "Hi")], None).unwrap();
//! assert!(prompt.ends_with("USER: Hi ASSISTANT:"));
//! ```

#![warn(missing_docs)]

mod conversation;
mod error;
mod format;
mod hf;
mod matching;
mod style;
mod tools;

pub use conversation::{
    get_template, render_messages, template_names, ChatMessage, Conversation, SavedConversation, StopStr,
};
pub use error::ChatError;
pub use format::{ChatFormat, FormatSource, MODEL_TEMPLATE_NAME};
pub use hf::HfChatTemplate;
pub use matching::{match_template, DEFAULT_TEMPLATE};
pub use style::SeparatorStyle;
pub use tools::{FunctionCall, FunctionSpec, ToolCall, ToolSpec, ToolSyntax};
