//! FastChat conversations: the named template table and the `Conversation` type.

use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use crate::error::ChatError;
use crate::style::SeparatorStyle;
use crate::tools::ToolCall;

/// The template table. Data, not code: each entry is one FastChat
/// `register_conv_template(...)` call, in FastChat's registration order.
const TEMPLATES_JSON: &str = include_str!("templates.json");

/// A template's stop string(s), in FastChat's shape: one string or a list.
///
/// Kept as FastChat has it (rather than always a list) so the wire form of a
/// conversation is byte-compatible; use [`Conversation::stop_str`] for a flat list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StopStr {
    /// A single stop string.
    One(String),
    /// Several stop strings; generation stops at any of them.
    Many(Vec<String>),
}

impl StopStr {
    /// The stop strings as a list.
    pub fn as_vec(&self) -> Vec<&str> {
        match self {
            Self::One(s) => vec![s.as_str()],
            Self::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

/// One OpenAI-style chat message: `role` is `system`, `user`, `assistant`
/// or (for templates that render tools) `tool`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `"system"`, `"user"` or `"assistant"`; kept as text so that a bad role
    /// from a request is reported as [`ChatError::BadRole`], not a parse error.
    pub role: String,
    /// The message text.
    pub content: String,
    /// An assistant message's tool calls, for templates that render them
    /// (absent, not null, on other messages: templates test `is defined`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// A `tool` message: the id of the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    /// A message with this role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            tool_calls: None,
            tool_call_id: None,
        }
    }
}

/// A conversation: a FastChat template plus the messages so far.
///
/// Field names and meaning are FastChat's `Conversation` dataclass, so serde
/// gives the same JSON object FastChat's worker returns from
/// `/worker_get_conv_template` (`sep_style` as FastChat's integer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conversation {
    /// The template's registered name, e.g. `"vicuna_v1.1"`.
    pub name: String,
    /// The system prompt with a `{system_message}` placeholder.
    pub system_template: String,
    /// The text put into `system_template`.
    pub system_message: String,
    /// Role strings as they appear in the prompt: `[user, assistant]` (a few
    /// templates list a third, unused, system role).
    pub roles: Vec<String>,
    /// `(role string, text)` in order; `None` (or `""`) is an open turn the
    /// model is to complete. The first `offset` are built-in few-shot examples.
    pub messages: Vec<(String, Option<String>)>,
    /// How many leading `messages` are the template's few-shot examples.
    pub offset: usize,
    /// How the pieces are joined into a prompt.
    pub sep_style: SeparatorStyle,
    /// Main separator.
    pub sep: String,
    /// Second separator, used by the styles that alternate separators.
    pub sep2: Option<String>,
    /// Text at which generation stops (besides EOS), if any.
    pub stop_str: Option<StopStr>,
    /// Token ids at which generation stops (besides EOS), if any.
    pub stop_token_ids: Option<Vec<u32>>,
}

/// The on-disk shape of the template table.
#[derive(Deserialize)]
struct TemplateFile {
    templates: Vec<Conversation>,
}

/// The parsed template table, built once on first use.
fn templates() -> &'static [Conversation] {
    static TABLE: OnceLock<Vec<Conversation>> = OnceLock::new();
    TABLE.get_or_init(|| {
        // The file is compiled in and checked by the tests, so a parse failure
        // here is a build defect, not a runtime condition to recover from.
        serde_json::from_str::<TemplateFile>(TEMPLATES_JSON)
            .expect("built-in templates.json must parse")
            .templates
    })
}

/// A fresh copy of the named template (FastChat's `get_conv_template`), or
/// `None` if there is no such template. Names are case-sensitive, as in FastChat.
pub fn get_template(name: &str) -> Option<Conversation> {
    templates().iter().find(|t| t.name == name).cloned()
}

/// The names of all built-in templates, in FastChat's registration order.
///
/// These are FastChat 0.2.36's 78 text templates (its API-only templates such
/// as `chatgpt` have no prompt format and are not included) plus `llama-3`.
pub fn template_names() -> Vec<&'static str> {
    templates().iter().map(|t| t.name.as_str()).collect()
}

/// Builds a prompt from OpenAI-style messages with a named template.
///
/// See [`Conversation::from_messages`] for how messages are mapped; a trailing
/// user message leaves the assistant turn open for generation.
pub fn render_messages(template: &str, messages: &[ChatMessage], system: Option<&str>) -> Result<String, ChatError> {
    Ok(Conversation::from_messages(template, messages, system)?.get_prompt())
}

impl Conversation {
    /// A fresh copy of the named template, or [`ChatError::UnknownTemplate`]
    /// listing similar names.
    pub fn from_template(name: &str) -> Result<Self, ChatError> {
        get_template(name).ok_or_else(|| ChatError::UnknownTemplate {
            name: name.to_string(),
            suggestions: close_names(name),
        })
    }

    /// Builds a conversation from OpenAI-style messages, as FastChat's API
    /// server does: `system` sets the system message (a system message in the
    /// list overrides it, the last one winning), `user` and `assistant` append
    /// turns with the template's role strings, and a trailing user message is
    /// followed by an open assistant turn. Turns are not checked for
    /// alternation, matching FastChat.
    pub fn from_messages(template: &str, messages: &[ChatMessage], system: Option<&str>) -> Result<Self, ChatError> {
        let mut conv = Self::from_template(template)?;
        if let Some(system) = system {
            conv.set_system_message(system);
        }
        for m in messages {
            match m.role.as_str() {
                "system" => conv.set_system_message(&m.content),
                "user" => conv.append_message(conv.user_role(), Some(&m.content)),
                "assistant" => conv.append_message(conv.assistant_role(), Some(&m.content)),
                other => {
                    return Err(ChatError::BadRole {
                        role: other.to_string(),
                    })
                }
            }
        }
        if messages.last().is_some_and(|m| m.role == "user") {
            conv.append_message(conv.assistant_role(), None);
        }
        Ok(conv)
    }

    /// The role string for user turns (`roles[0]`).
    pub fn user_role(&self) -> String {
        self.roles.first().cloned().unwrap_or_default()
    }

    /// The role string for assistant turns (`roles[1]`).
    pub fn assistant_role(&self) -> String {
        self.roles.get(1).cloned().unwrap_or_default()
    }

    /// Replaces the system message (the template's `{system_message}`).
    pub fn set_system_message(&mut self, system_message: impl Into<String>) {
        self.system_message = system_message.into();
    }

    /// Appends a turn; `role` is a template role string (see [`Self::user_role`]),
    /// `None` leaves the turn open for the model.
    pub fn append_message(&mut self, role: impl Into<String>, text: Option<&str>) {
        self.messages.push((role.into(), text.map(str::to_string)));
    }

    /// Sets the text of the last turn, typically the model's reply to the open
    /// turn; does nothing on an empty conversation.
    pub fn update_last_message(&mut self, text: Option<&str>) {
        if let Some(last) = self.messages.last_mut() {
            last.1 = text.map(str::to_string);
        }
    }

    /// The prompt text for the model, exactly as FastChat's `get_prompt()`.
    pub fn get_prompt(&self) -> String {
        self.sep_style.render(self)
    }

    /// The stop strings (empty when the template has none).
    pub fn stop_str(&self) -> Vec<&str> {
        self.stop_str.as_ref().map(StopStr::as_vec).unwrap_or_default()
    }

    /// The stop token ids (empty when the template has none).
    pub fn stop_token_ids(&self) -> &[u32] {
        self.stop_token_ids.as_deref().unwrap_or(&[])
    }

    /// The conversation as OpenAI chat messages (FastChat's
    /// `to_openai_api_messages`): the system message if not empty, then the
    /// turns after the few-shot examples by position, user/assistant
    /// alternating; open assistant turns are left out, an open user turn
    /// becomes empty content.
    pub fn to_openai_api_messages(&self) -> Vec<ChatMessage> {
        let mut out = Vec::new();
        if !self.system_message.is_empty() {
            out.push(ChatMessage::new("system", self.system_message.as_str()));
        }
        for (i, (_, msg)) in self.messages.iter().skip(self.offset).enumerate() {
            if i.is_multiple_of(2) {
                out.push(ChatMessage::new("user", msg.clone().unwrap_or_default()));
            } else if let Some(msg) = msg {
                out.push(ChatMessage::new("assistant", msg.as_str()));
            }
        }
        out
    }

    /// The conversation in FastChat's save layout (`conv.dict()`, what the CLI's
    /// `!!save` writes and the web UI logs).
    pub fn to_saved(&self) -> SavedConversation {
        SavedConversation {
            template_name: self.name.clone(),
            system_message: self.system_message.clone(),
            roles: self.roles.clone(),
            messages: self.messages.clone(),
            offset: self.offset,
        }
    }

    /// Rebuilds a conversation from FastChat's save layout, as the CLI's
    /// `!!load` does: the named template, then its system message and messages
    /// (few-shot examples included) taken from the file.
    pub fn from_saved(saved: &SavedConversation) -> Result<Self, ChatError> {
        let mut conv = Self::from_template(&saved.template_name)?;
        conv.set_system_message(saved.system_message.as_str());
        conv.messages = saved.messages.clone();
        Ok(conv)
    }
}

/// FastChat's saved-conversation JSON (`Conversation.dict()`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedConversation {
    /// The template the conversation uses.
    pub template_name: String,
    /// Its system message.
    pub system_message: String,
    /// The template's role strings (informational; loading uses the template's).
    pub roles: Vec<String>,
    /// All turns as `[role, text]` pairs, few-shot examples included.
    pub messages: Vec<(String, Option<String>)>,
    /// Number of few-shot examples at the start of `messages`.
    pub offset: usize,
}

/// Known template names close to `name`: same ignoring case, containing one
/// another, or within a small edit distance; best first, at most five.
fn close_names(name: &str) -> Vec<String> {
    let wanted = name.to_lowercase();
    let mut scored: Vec<(usize, &str)> = template_names()
        .into_iter()
        .filter_map(|known| {
            let k = known.to_lowercase();
            let d = edit_distance(&wanted, &k);
            let related = !wanted.is_empty() && (k.contains(&wanted) || wanted.contains(&k));
            (related || d <= (wanted.chars().count() / 3).max(2)).then_some((d, known))
        })
        .collect();
    scored.sort();
    scored.into_iter().take(5).map(|(_, n)| n.to_string()).collect()
}

/// Levenshtein distance over chars.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_parses_and_names_are_unique() {
        let names = template_names();
        assert_eq!(names.len(), 79);
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len());
    }

    #[test]
    fn unknown_template_suggests_close_names() {
        let err = Conversation::from_template("vicuna_v1").unwrap_err();
        match &err {
            ChatError::UnknownTemplate { suggestions, .. } => {
                assert_eq!(suggestions.first().map(String::as_str), Some("vicuna_v1.1"));
            }
            other => panic!("unexpected error {other:?}"),
        }
        assert!(err.to_string().contains("did you mean vicuna_v1.1"));
    }

    #[test]
    fn edit_distance_counts_edits() {
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
    }
}
