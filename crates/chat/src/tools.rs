//! Tool calling in a model's own chat template: the tool-call syntax a Jinja
//! template teaches its model, and the shapes HF's `apply_chat_template`
//! passes for tools and tool calls.
//!
//! The shapes are structs (not `serde_json::Value`) so that the keys reach the
//! template, and its `tojson`, in the order HF gives them (`type` before
//! `function`, `name` before `arguments`).

use serde::{Deserialize, Serialize};

/// How a chat template writes a tool call in the assistant's reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolSyntax {
    /// Hermes / Qwen 2.5: `<tool_call>\n{"name": …, "arguments": {…}}\n</tool_call>`.
    Hermes,
    /// Llama 3.1 / 3.2: the reply is `{"name": …, "parameters": {…}}`
    /// (built-in tools after `<|python_tag|>`).
    Llama3Json,
    /// Mistral: `[TOOL_CALLS] [{"name": …, "arguments": {…}}, …]`.
    Mistral,
}

impl ToolSyntax {
    /// The syntax a Jinja chat template uses, when it renders `tools` at all.
    ///
    /// Read from the template text: the tags or phrases each family's template
    /// writes for an assistant's tool calls.
    pub fn detect(template: &str) -> Option<ToolSyntax> {
        // A template that never looks at `tools` cannot show them to the model.
        if !template.contains("tools") {
            return None;
        }
        if template.contains("<tool_call>") {
            Some(ToolSyntax::Hermes)
        } else if template.contains("[TOOL_CALLS]") {
            Some(ToolSyntax::Mistral)
        } else if template.contains("<|python_tag|>")
            || (template.contains("\"parameters\": ") && template.contains("<|start_header_id|>"))
        {
            Some(ToolSyntax::Llama3Json)
        } else {
            None
        }
    }

    /// The wire name (`hermes`, `llama3_json`, `mistral`).
    pub fn name(self) -> &'static str {
        match self {
            ToolSyntax::Hermes => "hermes",
            ToolSyntax::Llama3Json => "llama3_json",
            ToolSyntax::Mistral => "mistral",
        }
    }

    /// The syntax of a wire name; `None` for names this version does not know.
    pub fn from_name(name: &str) -> Option<ToolSyntax> {
        [ToolSyntax::Hermes, ToolSyntax::Llama3Json, ToolSyntax::Mistral]
            .into_iter()
            .find(|s| s.name() == name)
    }
}

/// A tool as HF's `apply_chat_template(tools=…)` passes it (OpenAI's shape).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolSpec {
    /// Always `"function"`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The function.
    pub function: FunctionSpec,
}

/// A function the model may call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionSpec {
    /// The function's name.
    pub name: String,
    /// What it does, when the caller said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Its arguments' JSON schema.
    pub parameters: serde_json::Value,
}

/// A call in an assistant message's `tool_calls`, as HF templates read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    /// The call's id (tool messages answer it by `tool_call_id`).
    pub id: String,
    /// Always `"function"`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The function called.
    pub function: FunctionCall,
}

/// The function and arguments of a [`ToolCall`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionCall {
    /// The function's name.
    pub name: String,
    /// The arguments as a JSON value (a dict, as HF templates expect; they
    /// print it with `tojson`).
    pub arguments: serde_json::Value,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syntax_is_read_from_the_template() {
        let qwen = "{%- if tools %}<tools>{% for tool in tools %}{{ tool | tojson }}{% endfor %}</tools><tool_call>{% endif %}";
        assert_eq!(ToolSyntax::detect(qwen), Some(ToolSyntax::Hermes));
        let mistral = "{%- if tools is not none %}[AVAILABLE_TOOLS]{% endif %}{{ \"[TOOL_CALLS] [\" }}";
        assert_eq!(ToolSyntax::detect(mistral), Some(ToolSyntax::Mistral));
        let llama = "{%- if tools is not none %}<|start_header_id|>{{- '\"parameters\": ' }}{% endif %}";
        assert_eq!(ToolSyntax::detect(llama), Some(ToolSyntax::Llama3Json));
        // ChatML without tools.
        let chatml = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}";
        assert_eq!(ToolSyntax::detect(chatml), None);
        for s in [ToolSyntax::Hermes, ToolSyntax::Llama3Json, ToolSyntax::Mistral] {
            assert_eq!(ToolSyntax::from_name(s.name()), Some(s));
        }
    }
}
