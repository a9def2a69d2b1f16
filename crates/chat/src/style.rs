//! Separator styles: the code half of a FastChat conversation template.
//!
//! A template's data (roles, separators, system text) lives in `templates.json`;
//! how those pieces are glued into one prompt string is decided by its
//! [`SeparatorStyle`], one rendering function per style below. Each function is
//! a faithful port of its branch of FastChat 0.2.36 `Conversation.get_prompt()`,
//! quirks included (they are what the models were trained on), and is checked
//! against FastChat's own output by the golden test.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::conversation::Conversation;

/// How a conversation's turns are joined into a prompt (FastChat's `SeparatorStyle`).
///
/// Variant names follow FastChat's enum members; [`SeparatorStyle::name`] gives
/// the exact FastChat spelling (`ADD_COLON_SINGLE`, `CHATML`, …) used in the
/// template table, and [`SeparatorStyle::fastchat_id`] the integer sent over JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SeparatorStyle {
    /// `{system}{sep}{role}: {msg}{sep}…{role}:`
    AddColonSingle,
    /// Like `AddColonSingle` but alternating `sep` (after user) and `sep2` (after assistant).
    AddColonTwo,
    /// Like `AddColonSingle` but an open turn ends in `"{role}: "` (trailing space).
    AddColonSpaceSingle,
    /// `{system}{role}{msg}{sep}…{role}` (the role string carries its own punctuation).
    NoColonSingle,
    /// Like `NoColonSingle` with alternating `sep`/`sep2`.
    NoColonTwo,
    /// `{system}{sep}{role}\n{msg}{sep}…{role}\n`, system part omitted when empty.
    AddNewLineSingle,
    /// Llama-2 `[INST] … [/INST]` format; the first user message follows the system block directly.
    Llama2,
    /// Llama-3 header format. Not in FastChat 0.2.36: ported from FastChat's main branch.
    Llama3,
    /// ChatGLM 1/2 `[Round n]` format (round numbering starts at 1 for `chatglm2`, else 0).
    ChatGlm,
    /// `<|im_start|>` ChatML: `{system}{sep}\n{role}\n{msg}{sep}\n…{role}\n`.
    ChatMl,
    /// InternLM: `<s>` before each user turn, `{role}:{msg}{sep}\n`.
    ChatIntern,
    /// Dolly v2: `{role}:\n{msg}{sep}` and an extra blank line after each assistant turn.
    Dolly,
    /// RWKV Raven: `{role}: {msg}\n\n` with blank lines inside messages collapsed.
    Rwkv,
    /// Phoenix: `{role}: <s>{msg}</s>`.
    Phoenix,
    /// Robin: `{system}{sep}{role}:\n{msg}{sep}`.
    Robin,
    /// Falcon-chat: system part only when a system message is set.
    FalconChat,
    /// ChatGLM3: `{role}\n{msg}` with no separators at all.
    ChatGlm3,
    /// DeepSeek chat: `{system}{role}: {msg}{sep|sep2}`.
    DeepseekChat,
    /// MetaMath: `sep2` prefixes the assistant's answer.
    MetaMath,
    /// Yuan 2: messages joined by `<n>`, roles not printed.
    Yuan2,
}

/// Every style, in FastChat's wire order; the single source for name/id lookups.
/// Row `i` holds the variant whose discriminant is `i` (checked by a test), so
/// `ALL[style as usize]` is that style's row.
const ALL: [(SeparatorStyle, &str, u32); 20] = [
    (SeparatorStyle::AddColonSingle, "ADD_COLON_SINGLE", 1),
    (SeparatorStyle::AddColonTwo, "ADD_COLON_TWO", 2),
    (SeparatorStyle::AddColonSpaceSingle, "ADD_COLON_SPACE_SINGLE", 3),
    (SeparatorStyle::NoColonSingle, "NO_COLON_SINGLE", 4),
    (SeparatorStyle::NoColonTwo, "NO_COLON_TWO", 5),
    (SeparatorStyle::AddNewLineSingle, "ADD_NEW_LINE_SINGLE", 6),
    (SeparatorStyle::Llama2, "LLAMA2", 7),
    (SeparatorStyle::Llama3, "LLAMA3", 8),
    (SeparatorStyle::ChatGlm, "CHATGLM", 9),
    (SeparatorStyle::ChatMl, "CHATML", 10),
    (SeparatorStyle::ChatIntern, "CHATINTERN", 11),
    (SeparatorStyle::Dolly, "DOLLY", 12),
    (SeparatorStyle::Rwkv, "RWKV", 13),
    (SeparatorStyle::Phoenix, "PHOENIX", 14),
    (SeparatorStyle::Robin, "ROBIN", 15),
    (SeparatorStyle::FalconChat, "FALCON_CHAT", 16),
    (SeparatorStyle::ChatGlm3, "CHATGLM3", 17),
    (SeparatorStyle::DeepseekChat, "DEEPSEEK_CHAT", 18),
    (SeparatorStyle::MetaMath, "METAMATH", 19),
    (SeparatorStyle::Yuan2, "YUAN2", 20),
];

impl SeparatorStyle {
    /// FastChat's member name, e.g. `"CHATML"`.
    pub fn name(self) -> &'static str {
        ALL[self as usize].1
    }

    /// Looks a style up by its FastChat member name (`"ADD_COLON_TWO"`).
    pub fn from_name(name: &str) -> Option<Self> {
        ALL.iter().find(|e| e.1 == name).map(|e| e.0)
    }

    /// The integer FastChat sends for this style in `/worker_get_conv_template`.
    ///
    /// These follow the numbering in `reference/fastchat.md` (FastChat's main
    /// branch, where `LLAMA3` = 8 and `CHATML` = 10). FastChat 0.2.36 on PyPI has
    /// no `LLAMA3`, so its numbers from `CHATGLM` on are one lower.
    pub fn fastchat_id(self) -> u32 {
        ALL[self as usize].2
    }

    /// Inverse of [`SeparatorStyle::fastchat_id`].
    pub fn from_fastchat_id(id: u32) -> Option<Self> {
        ALL.iter().find(|e| e.2 == id).map(|e| e.0)
    }

    /// Renders `conv` into a prompt with this style (FastChat's `get_prompt()` branch).
    pub(crate) fn render(self, conv: &Conversation) -> String {
        // FastChat formats the system template with str.format(system_message=…);
        // every template's only placeholder is `{system_message}`, so one
        // non-recursive replace is the same operation.
        let system = conv.system_template.replace("{system_message}", &conv.system_message);
        let r = Render { conv, system: &system };
        match self {
            Self::AddColonSingle => r.add_colon_single(),
            Self::AddColonTwo => r.add_colon_two(),
            Self::AddColonSpaceSingle => r.add_colon_space_single(),
            Self::NoColonSingle => r.no_colon_single(),
            Self::NoColonTwo => r.no_colon_two(),
            Self::AddNewLineSingle => r.add_new_line_single(),
            Self::Llama2 => r.llama2(),
            Self::Llama3 => r.llama3(),
            Self::ChatGlm => r.chatglm(),
            Self::ChatMl => r.chatml(),
            Self::ChatIntern => r.chatintern(),
            Self::Dolly => r.dolly(),
            Self::Rwkv => r.rwkv(),
            Self::Phoenix => r.phoenix(),
            Self::Robin => r.robin(),
            Self::FalconChat => r.falcon_chat(),
            Self::ChatGlm3 => r.chatglm3(),
            Self::DeepseekChat => r.deepseek_chat(),
            Self::MetaMath => r.metamath(),
            Self::Yuan2 => r.yuan2(),
        }
    }
}

impl std::fmt::Display for SeparatorStyle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Serialized as FastChat's integer, as its worker sends `sep_style` over JSON.
impl Serialize for SeparatorStyle {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(self.fastchat_id())
    }
}

/// Accepts FastChat's integer (wire form) or member name (template table form).
impl<'de> Deserialize<'de> for SeparatorStyle {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Id(u32),
            Name(String),
        }
        match Repr::deserialize(d)? {
            Repr::Id(id) => Self::from_fastchat_id(id)
                .ok_or_else(|| serde::de::Error::custom(format!("unknown FastChat sep_style id {id}"))),
            Repr::Name(name) => Self::from_name(&name)
                .ok_or_else(|| serde::de::Error::custom(format!("unknown FastChat sep_style {name:?}"))),
        }
    }
}

/// One rendering in progress: the conversation and its formatted system prompt.
struct Render<'a> {
    conv: &'a Conversation,
    system: &'a str,
}

/// A message as FastChat's `if message:` sees it: `None` and `""` both mean
/// "open turn", so an empty assistant reply renders like a generation prompt.
fn text(message: &Option<String>) -> Option<&str> {
    message.as_deref().filter(|m| !m.is_empty())
}

/// Python's `str.strip()`: Unicode whitespace plus the ASCII separators
/// U+001C..U+001F, which Python counts as space and Rust does not.
fn py_strip(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

impl Render<'_> {
    fn sep(&self) -> &str {
        &self.conv.sep
    }

    /// `sep2`; a template without one renders it as empty (FastChat would raise).
    fn sep2(&self) -> &str {
        self.conv.sep2.as_deref().unwrap_or("")
    }

    /// FastChat's `seps[i % 2]`.
    fn seps(&self, i: usize) -> &str {
        if i.is_multiple_of(2) {
            self.sep()
        } else {
            self.sep2()
        }
    }

    fn messages(&self) -> impl Iterator<Item = (usize, &str, Option<&str>)> {
        self.conv
            .messages
            .iter()
            .enumerate()
            .map(|(i, (role, m))| (i, role.as_str(), text(m)))
    }

    fn add_colon_single(&self) -> String {
        let mut ret = format!("{}{}", self.system, self.sep());
        for (_, role, msg) in self.messages() {
            match msg {
                Some(m) => ret += &format!("{role}: {m}{}", self.sep()),
                None => ret += &format!("{role}:"),
            }
        }
        ret
    }

    fn add_colon_two(&self) -> String {
        let mut ret = format!("{}{}", self.system, self.sep());
        for (i, role, msg) in self.messages() {
            match msg {
                Some(m) => ret += &format!("{role}: {m}{}", self.seps(i)),
                None => ret += &format!("{role}:"),
            }
        }
        ret
    }

    fn add_colon_space_single(&self) -> String {
        let mut ret = format!("{}{}", self.system, self.sep());
        for (_, role, msg) in self.messages() {
            match msg {
                Some(m) => ret += &format!("{role}: {m}{}", self.sep()),
                // The open turn must end with a space (the model continues after it).
                None => ret += &format!("{role}: "),
            }
        }
        ret
    }

    fn no_colon_single(&self) -> String {
        let mut ret = self.system.to_string();
        for (_, role, msg) in self.messages() {
            match msg {
                Some(m) => ret += &format!("{role}{m}{}", self.sep()),
                None => ret += role,
            }
        }
        ret
    }

    fn no_colon_two(&self) -> String {
        let mut ret = self.system.to_string();
        for (i, role, msg) in self.messages() {
            match msg {
                Some(m) => ret += &format!("{role}{m}{}", self.seps(i)),
                None => ret += role,
            }
        }
        ret
    }

    fn add_new_line_single(&self) -> String {
        let mut ret = if self.system.is_empty() {
            String::new()
        } else {
            format!("{}{}", self.system, self.sep())
        };
        for (_, role, msg) in self.messages() {
            match msg {
                Some(m) => ret += &format!("{role}\n{m}{}", self.sep()),
                None => ret += &format!("{role}\n"),
            }
        }
        ret
    }

    fn llama2(&self) -> String {
        // The system template opens the first `[INST]` itself; without a system
        // message FastChat opens it by hand. Tags come from `roles` by position,
        // not from the stored role, and the first message gets no tag at all.
        let mut ret = if self.conv.system_message.is_empty() {
            "[INST] ".to_string()
        } else {
            self.system.to_string()
        };
        for (i, _, msg) in self.messages() {
            let tag = self.conv.roles.get(i % 2).map(String::as_str).unwrap_or("");
            match msg {
                Some(m) if i == 0 => ret += &format!("{m} "),
                Some(m) => ret += &format!("{tag} {m}{}", self.seps(i)),
                None => ret += tag,
            }
        }
        ret
    }

    fn llama3(&self) -> String {
        let mut ret = "<|begin_of_text|>".to_string();
        if !self.conv.system_message.is_empty() {
            ret += self.system;
        }
        for (_, role, msg) in self.messages() {
            ret += &format!("<|start_header_id|>{role}<|end_header_id|>\n\n");
            if let Some(m) = msg {
                ret += &format!("{}<|eot_id|>", py_strip(m));
            }
        }
        ret
    }

    fn chatglm(&self) -> String {
        // ChatGLM2's own chat() numbers rounds from 1, ChatGLM's from 0; FastChat
        // keys this on the template name, and so do we.
        let round_add = usize::from(self.conv.name == "chatglm2");
        let mut ret = if self.system.is_empty() {
            String::new()
        } else {
            format!("{}{}", self.system, self.sep())
        };
        for (i, role, msg) in self.messages() {
            if i.is_multiple_of(2) {
                ret += &format!("[Round {}]{}", i / 2 + round_add, self.sep());
            }
            // Full-width colon, as in ChatGLM's own prompt builder.
            match msg {
                Some(m) => ret += &format!("{role}：{m}{}", self.sep()),
                None => ret += &format!("{role}："),
            }
        }
        ret
    }

    fn chatml(&self) -> String {
        let mut ret = if self.system.is_empty() {
            String::new()
        } else {
            format!("{}{}\n", self.system, self.sep())
        };
        for (_, role, msg) in self.messages() {
            match msg {
                Some(m) => ret += &format!("{role}\n{m}{}\n", self.sep()),
                None => ret += &format!("{role}\n"),
            }
        }
        ret
    }

    fn chatglm3(&self) -> String {
        let mut ret = String::new();
        if !self.conv.system_message.is_empty() {
            ret += self.system;
        }
        for (_, role, msg) in self.messages() {
            match msg {
                Some(m) => ret += &format!("{role}\n{m}"),
                None => ret += role,
            }
        }
        ret
    }

    fn chatintern(&self) -> String {
        let mut ret = self.system.to_string();
        for (i, role, msg) in self.messages() {
            if i.is_multiple_of(2) {
                ret += "<s>";
            }
            match msg {
                Some(m) => ret += &format!("{role}:{m}{}\n", self.seps(i)),
                None => ret += &format!("{role}:"),
            }
        }
        ret
    }

    fn dolly(&self) -> String {
        let mut ret = self.system.to_string();
        for (i, role, msg) in self.messages() {
            match msg {
                Some(m) => {
                    ret += &format!("{role}:\n{m}{}", self.seps(i));
                    if !i.is_multiple_of(2) {
                        ret += "\n\n";
                    }
                }
                None => ret += &format!("{role}:\n"),
            }
        }
        ret
    }

    fn rwkv(&self) -> String {
        let mut ret = self.system.to_string();
        for (_, role, msg) in self.messages() {
            match msg {
                // A blank line ends a turn in RWKV's format, so blank lines
                // inside a message are collapsed (one pass, as Python's replace).
                Some(m) => {
                    let m = m.replace("\r\n", "\n").replace("\n\n", "\n");
                    ret += &format!("{role}: {m}\n\n");
                }
                None => ret += &format!("{role}:"),
            }
        }
        ret
    }

    fn phoenix(&self) -> String {
        let mut ret = self.system.to_string();
        for (_, role, msg) in self.messages() {
            match msg {
                Some(m) => ret += &format!("{role}: <s>{m}</s>"),
                None => ret += &format!("{role}: <s>"),
            }
        }
        ret
    }

    fn robin(&self) -> String {
        let mut ret = format!("{}{}", self.system, self.sep());
        for (_, role, msg) in self.messages() {
            match msg {
                Some(m) => ret += &format!("{role}:\n{m}{}", self.sep()),
                None => ret += &format!("{role}:\n"),
            }
        }
        ret
    }

    fn falcon_chat(&self) -> String {
        let mut ret = String::new();
        if !self.conv.system_message.is_empty() {
            ret += &format!("{}{}", self.system, self.sep());
        }
        for (_, role, msg) in self.messages() {
            match msg {
                Some(m) => ret += &format!("{role}: {m}{}", self.sep()),
                None => ret += &format!("{role}:"),
            }
        }
        ret
    }

    fn metamath(&self) -> String {
        let mut ret = if self.system.is_empty() {
            String::new()
        } else {
            format!("{}{}", self.system, self.sep())
        };
        for (i, role, msg) in self.messages() {
            // sep2 prefixes the assistant's answer ("Let's think step by step.").
            let (start, end) = if i.is_multiple_of(2) {
                (":\n".to_string(), self.sep())
            } else {
                (format!(": {}", self.sep2()), "")
            };
            ret += &format!("{role}{start}");
            if let Some(m) = msg {
                ret += &format!("{m}{end}");
            }
        }
        ret
    }

    fn deepseek_chat(&self) -> String {
        let mut ret = self.system.to_string();
        for (i, role, msg) in self.messages() {
            match msg {
                Some(m) => ret += &format!("{role}: {m}{}", self.seps(i)),
                None => ret += &format!("{role}:"),
            }
        }
        ret
    }

    fn yuan2(&self) -> String {
        let mut ret = String::new();
        if !self.conv.system_message.is_empty() {
            ret += &format!("{}{}", self.system, self.sep2());
        }
        for (_, _, msg) in self.messages() {
            if let Some(m) = msg {
                ret += &format!("{m}<n>");
            }
        }
        // FastChat calls `ret.rstrip("<n>")`, which strips any trailing run of
        // the characters '<', 'n' and '>' (not the literal suffix), so a last
        // message ending in "n" loses it too. Reproduced on purpose.
        let kept = ret.trim_end_matches(['<', 'n', '>']).len();
        ret.truncate(kept);
        ret += self.sep();
        ret
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_rows_follow_discriminants() {
        for (i, (style, name, id)) in ALL.iter().enumerate() {
            assert_eq!(*style as usize, i);
            assert_eq!(SeparatorStyle::from_name(name), Some(*style));
            assert_eq!(SeparatorStyle::from_fastchat_id(*id), Some(*style));
        }
    }

    #[test]
    fn python_strip_includes_ascii_separators() {
        assert_eq!(py_strip("\u{1f} hi\n\u{3000}"), "hi");
    }
}
