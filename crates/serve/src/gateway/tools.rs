//! Tool calling on `/v1/chat/completions`: the request's `tools` and
//! `tool_choice`, tool calls and tool results in the conversation, and the
//! reply parsed back into `tool_calls`.
//!
//! The model sees the tools in the Hermes/Qwen format (a system message listing
//! the functions in `<tools></tools>`, calls written as `<tool_call>{"name": …,
//! "arguments": …}</tool_call>`, results as `<tool_response>` in a user turn),
//! which chat-tuned models of those families were trained on and any other
//! model can follow from the instructions. With `tool_choice` `required` or a
//! named function the reply is decoded under a constraint built from the
//! functions' JSON schemas, so a call always names a listed function and its
//! arguments always validate.
//!
//! A model whose own chat template renders `tools` (Qwen 2.5 / Hermes,
//! Llama 3.1, Mistral) gets them through that template instead, with its
//! assistant `tool_calls` and `tool` messages as HF passes them; the
//! constraint then spells calls in the template's syntax
//! ([`ToolSyntax`]), and replies are parsed in it.

use serde_json::{json, Map, Value};
use vicugna_chat::{ChatMessage, FunctionCall, FunctionSpec, ToolCall, ToolSpec, ToolSyntax};
use vicugna_engine::json_schema::{any_object_regex, literal, schema_to_regex};
use vicugna_engine::Constraint;

use super::error::ApiError;

/// Most tools one request may list.
pub const MAX_TOOLS: usize = 128;

const CALL_OPEN: &str = "<tool_call>";
const CALL_CLOSE: &str = "</tool_call>";
/// Llama 3.1's tag before a (built-in) tool call.
const PYTHON_TAG: &str = "<|python_tag|>";
/// Mistral's tag before its list of calls.
const TOOL_CALLS: &str = "[TOOL_CALLS]";

/// One function the model may call.
#[derive(Debug, Clone)]
pub struct Function {
    pub name: String,
    pub description: Option<String>,
    pub parameters: Value,
    /// The arguments' JSON as a regex (for constrained calls).
    args_regex: String,
}

/// What the model may or must do with the tools.
#[derive(Debug, Clone, PartialEq)]
pub enum Choice {
    Auto,
    None,
    Required,
    Named(String),
}

/// The validated `tools` and `tool_choice` of a request.
#[derive(Debug, Clone)]
pub struct ToolSet {
    pub functions: Vec<Function>,
    pub choice: Choice,
}

/// A call parsed from the model's reply.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub name: String,
    /// The arguments as a JSON text (OpenAI sends them as a string).
    pub arguments: String,
}

fn field_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Reads `tools` and `tool_choice`; `None` when the request has no tools and
/// no choice that needs them.
pub fn parse(body: &Map<String, Value>) -> Result<Option<ToolSet>, ApiError> {
    let get = |k: &str| body.get(k).filter(|v| !v.is_null());
    let items: &[Value] = match get("tools") {
        None => &[],
        Some(Value::Array(a)) => a,
        Some(v) => {
            return Err(ApiError::bad_field(
                "tools",
                format!("expected an array of tools, got {}", field_type(v)),
            ))
        }
    };
    if items.len() > MAX_TOOLS {
        return Err(ApiError::bad_field(
            "tools",
            format!("at most {MAX_TOOLS} tools are allowed, got {}", items.len()),
        ));
    }
    let mut functions: Vec<Function> = Vec::with_capacity(items.len());
    for (i, t) in items.iter().enumerate() {
        let at = format!("tools[{i}]");
        if t.get("type").and_then(Value::as_str) != Some("function") {
            return Err(ApiError::bad_field(
                format!("{at}.type"),
                "only {\"type\": \"function\"} tools are supported",
            ));
        }
        let f = t
            .get("function")
            .and_then(Value::as_object)
            .ok_or_else(|| ApiError::bad_field(format!("{at}.function"), "is required (an object with a name)"))?;
        let name = f
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::bad_field(format!("{at}.function.name"), "is required"))?;
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !valid {
            return Err(ApiError::bad_field(
                format!("{at}.function.name"),
                format!("{name:?} must be 1 to 64 letters, digits, underscores or dashes"),
            ));
        }
        if functions.iter().any(|g| g.name == name) {
            return Err(ApiError::bad_field(
                format!("{at}.function.name"),
                format!("{name:?} is listed twice"),
            ));
        }
        let parameters = match f.get("parameters") {
            None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
            Some(p @ Value::Object(_)) => p.clone(),
            Some(v) => {
                return Err(ApiError::bad_field(
                    format!("{at}.function.parameters"),
                    format!("expected a JSON schema object, got {}", field_type(v)),
                ))
            }
        };
        let free = parameters.get("properties").is_none() && parameters.get("$ref").is_none();
        let args_regex = if free && parameters.get("anyOf").is_none() {
            any_object_regex()
        } else {
            schema_to_regex(&parameters).map_err(|e| ApiError::bad_field(format!("{at}.function.parameters"), e))?
        };
        functions.push(Function {
            name: name.to_string(),
            description: f.get("description").and_then(Value::as_str).map(str::to_string),
            parameters,
            args_regex,
        });
    }
    let choice = match get("tool_choice") {
        None if functions.is_empty() => return Ok(None),
        None => Choice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "auto" => Choice::Auto,
            "none" => Choice::None,
            "required" => Choice::Required,
            other => {
                return Err(ApiError::bad_field(
                    "tool_choice",
                    format!("expected \"auto\", \"none\", \"required\" or {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, got {other:?}"),
                ))
            }
        },
        Some(Value::Object(o)) => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| ApiError::bad_field("tool_choice.function.name", "is required"))?;
            Choice::Named(name.to_string())
        }
        Some(v) => {
            return Err(ApiError::bad_field(
                "tool_choice",
                format!("expected a string or an object, got {}", field_type(v)),
            ))
        }
    };
    match &choice {
        Choice::Required if functions.is_empty() => {
            return Err(ApiError::bad_field(
                "tool_choice",
                "\"required\" needs at least one tool in tools",
            ));
        }
        Choice::Named(n) if !functions.iter().any(|f| &f.name == n) => {
            let known: Vec<&str> = functions.iter().map(|f| f.name.as_str()).collect();
            return Err(ApiError::bad_field(
                "tool_choice.function.name",
                format!("there is no tool named {n:?} in tools (known: {})", known.join(", ")),
            ));
        }
        _ => {}
    }
    if functions.is_empty() {
        return Ok(None);
    }
    Ok(Some(ToolSet { functions, choice }))
}

impl ToolSet {
    /// Whether the model is told about the tools and its reply parsed for calls.
    pub fn active(&self) -> bool {
        self.choice != Choice::None
    }

    /// The constraint the reply is decoded under (`required` or a named
    /// function), in the generic (Hermes) syntax.
    pub fn constraint_regex(&self) -> Option<String> {
        self.constraint_regex_for(ToolSyntax::Hermes)
    }

    /// The constraint for a model whose template writes calls in `syntax`, so
    /// that what it decodes parses back with [`parse_reply_in`].
    pub fn constraint_regex_for(&self, syntax: ToolSyntax) -> Option<String> {
        let calls: Vec<String> = self
            .functions
            .iter()
            .filter(|f| match &self.choice {
                Choice::Required => true,
                Choice::Named(n) => &f.name == n,
                _ => false,
            })
            .map(|f| {
                let name = literal(&Value::String(f.name.clone()));
                // Llama 3.1's template asks for "parameters".
                let key = if syntax == ToolSyntax::Llama3Json {
                    "parameters"
                } else {
                    "arguments"
                };
                format!(r#"\{{"name": {name}, "{key}": {}\}}"#, f.args_regex)
            })
            .collect();
        if calls.is_empty() {
            return None;
        }
        let calls = calls.join("|");
        Some(match syntax {
            // The tags hold no regex metacharacters.
            ToolSyntax::Hermes => format!("{CALL_OPEN}\n(?:{calls})\n{CALL_CLOSE}"),
            ToolSyntax::Llama3Json => format!("(?:{calls})"),
            // Written out in plain tokens: a constraint never admits special
            // tokens, and the text parses the same.
            ToolSyntax::Mistral => format!(r"\[TOOL_CALLS\] \[(?:{calls})\]"),
        })
    }

    /// The tools as HF's `apply_chat_template(tools=…)` takes them.
    pub fn specs(&self) -> Vec<ToolSpec> {
        self.functions
            .iter()
            .map(|f| ToolSpec {
                kind: "function".into(),
                function: FunctionSpec {
                    name: f.name.clone(),
                    description: f.description.clone(),
                    parameters: f.parameters.clone(),
                },
            })
            .collect()
    }

    /// Checks now that the constraint compiles within the engine's limits, so a
    /// too large schema is a 400 naming `tools`, not a failed generation.
    pub fn check_constraint(&self) -> Result<Option<String>, ApiError> {
        let Some(re) = self.constraint_regex() else {
            return Ok(None);
        };
        Constraint::Regex(re.clone())
            .compile()
            .map_err(|e| ApiError::bad_field("tools", format!("the tools' schemas are too large to enforce: {e}")))?;
        Ok(Some(re))
    }

    /// The system text that lists the tools and says how to call them.
    pub fn system_prompt(&self) -> String {
        let mut s = String::from(
            "You are a function calling AI model. You are provided with function signatures within <tools></tools> XML tags. \
You may call one or more functions to assist with the user query. Don't make assumptions about what values to plug into functions. \
Here are the available tools: <tools>\n",
        );
        for f in &self.functions {
            let mut func = json!({"name": f.name, "parameters": f.parameters});
            if let Some(d) = &f.description {
                func["description"] = json!(d);
            }
            s.push_str(&json!({"type": "function", "function": func}).to_string());
            s.push('\n');
        }
        s.push_str(
            "</tools>\nFor each function call return a json object with function name and arguments within <tool_call></tool_call> XML tags as follows:\n\
<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>",
        );
        if let Choice::Named(n) = &self.choice {
            s.push_str(&format!("\nCall the function {n:?} now."));
        } else if self.choice == Choice::Required {
            s.push_str("\nCall one of the functions now.");
        }
        s
    }

    /// Puts the tools in the conversation: in the system message, or a new one.
    pub fn add_to(&self, messages: &mut Vec<ChatMessage>) {
        let text = self.system_prompt();
        match messages.first_mut() {
            Some(m) if m.role == "system" => m.content = format!("{}\n\n{text}", m.content),
            _ => messages.insert(0, ChatMessage::new("system", text)),
        }
    }
}

/// How an assistant message's tool calls read in the conversation.
pub fn render_calls(calls: &[Call]) -> String {
    calls
        .iter()
        .map(|c| {
            let args = serde_json::from_str::<Value>(&c.arguments).unwrap_or_else(|_| json!(c.arguments));
            format!(
                "{CALL_OPEN}\n{}\n{CALL_CLOSE}",
                json!({"name": c.name, "arguments": args})
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A call as an assistant message's `tool_calls` entry for a chat template:
/// the arguments as a JSON value (templates print them with `tojson`).
pub fn template_call(id: &str, c: &Call) -> ToolCall {
    ToolCall {
        id: id.to_string(),
        kind: "function".into(),
        function: FunctionCall {
            name: c.name.clone(),
            arguments: serde_json::from_str(&c.arguments).unwrap_or_else(|_| json!(c.arguments)),
        },
    }
}

/// Mistral's templates refuse call ids other than 9 letters or digits:
/// each id becomes the last 9 of its letters and digits (zero-padded), in
/// calls and tool messages alike, as vLLM does.
pub fn mistral_ids(messages: &mut [ChatMessage]) {
    fn nine(id: &str) -> String {
        let alnum: Vec<char> = id.chars().filter(char::is_ascii_alphanumeric).collect();
        let tail: String = alnum[alnum.len().saturating_sub(9)..].iter().collect();
        format!("{tail:0>9}")
    }
    for m in messages {
        if let Some(calls) = &mut m.tool_calls {
            for c in calls {
                c.id = nine(&c.id);
            }
        }
        if let Some(id) = &mut m.tool_call_id {
            *id = nine(id);
        }
    }
}

/// How tool results read in the conversation (one user turn for consecutive ones).
pub fn render_results(results: &[String]) -> String {
    results
        .iter()
        .map(|r| format!("<tool_response>\n{r}\n</tool_response>"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Reads an assistant message's `tool_calls` (`messages[i].tool_calls`): the
/// calls and their ids.
pub fn message_calls(i: usize, v: &Value) -> Result<Vec<(String, Call)>, ApiError> {
    let at = format!("messages[{i}].tool_calls");
    let items = v
        .as_array()
        .ok_or_else(|| ApiError::bad_field(&at, format!("expected an array, got {}", field_type(v))))?;
    let mut out = Vec::with_capacity(items.len());
    for (j, c) in items.iter().enumerate() {
        let id = c
            .get("id")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::bad_field(format!("{at}[{j}].id"), "is required"))?;
        let f = c
            .get("function")
            .ok_or_else(|| ApiError::bad_field(format!("{at}[{j}].function"), "is required"))?;
        let name = f
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::bad_field(format!("{at}[{j}].function.name"), "is required"))?;
        let arguments = match f.get("arguments") {
            Some(Value::String(s)) => s.clone(),
            None | Some(Value::Null) => "{}".to_string(),
            Some(v @ Value::Object(_)) => v.to_string(),
            Some(v) => {
                return Err(ApiError::bad_field(
                    format!("{at}[{j}].function.arguments"),
                    format!("expected a JSON string, got {}", field_type(v)),
                ))
            }
        };
        out.push((
            id.to_string(),
            Call {
                name: name.to_string(),
                arguments,
            },
        ));
    }
    Ok(out)
}

/// Splits a reply into its text and the calls in it. A block that does not
/// parse stays in the text.
pub fn parse_reply(text: &str) -> (String, Vec<Call>) {
    let mut calls = Vec::new();
    let mut content = String::new();
    let mut rest = text;
    while let Some(start) = rest.find(CALL_OPEN) {
        let after = &rest[start + CALL_OPEN.len()..];
        let (inner, next) = match after.find(CALL_CLOSE) {
            Some(end) => (&after[..end], &after[end + CALL_CLOSE.len()..]),
            None => (after, ""),
        };
        match parse_call(inner) {
            Some(c) => {
                content.push_str(&rest[..start]);
                calls.push(c);
            }
            None => content.push_str(&rest[..rest.len() - next.len()]),
        }
        rest = next;
    }
    content.push_str(rest);
    (content.trim().to_string(), calls)
}

fn parse_call(inner: &str) -> Option<Call> {
    call_from_value(serde_json::from_str(inner.trim()).ok()?)
}

/// A call from `{"name": …, "arguments" or "parameters": …}`.
fn call_from_value(v: Value) -> Option<Call> {
    let name = v.get("name")?.as_str()?.to_string();
    let args = v
        .get("arguments")
        .or_else(|| v.get("parameters"))
        .cloned()
        .unwrap_or(json!({}));
    let arguments = match args {
        // Some models write the arguments as a JSON string already.
        Value::String(s) if serde_json::from_str::<Value>(&s).is_ok() => s,
        other => other.to_string(),
    };
    Some(Call { name, arguments })
}

/// Splits a reply written in `syntax` into its text and the calls in it.
/// Text that does not parse as calls stays text.
///
/// Llama 3.1 and Mistral tags are special tokens that the decoded text may
/// leave out, so a reply that is nothing but calls (a JSON object, or a JSON
/// list for Mistral) counts as calls without them.
pub fn parse_reply_in(syntax: ToolSyntax, text: &str) -> (String, Vec<Call>) {
    let plain = || (text.trim().to_string(), Vec::new());
    match syntax {
        ToolSyntax::Hermes => parse_reply(text),
        ToolSyntax::Llama3Json => {
            let body = text.trim_start();
            let body = body.strip_prefix(PYTHON_TAG).unwrap_or(body).trim();
            match body.starts_with('{').then(|| llama_calls(body)).flatten() {
                Some(calls) => (String::new(), calls),
                None => plain(),
            }
        }
        ToolSyntax::Mistral => {
            let (before, after) = match text.find(TOOL_CALLS) {
                Some(i) => (&text[..i], &text[i + TOOL_CALLS.len()..]),
                None if text.trim_start().starts_with('[') => ("", text),
                None => return plain(),
            };
            let mut items = serde_json::Deserializer::from_str(after.trim()).into_iter::<Value>();
            let calls: Option<Vec<Call>> = match items.next() {
                Some(Ok(Value::Array(list))) if !list.is_empty() => list.into_iter().map(call_from_value).collect(),
                _ => None,
            };
            match calls {
                Some(calls) => (before.trim().to_string(), calls),
                None => plain(),
            }
        }
    }
}

/// Llama 3.1 calls: JSON objects, one or more, separated by `;` or spaces.
fn llama_calls(body: &str) -> Option<Vec<Call>> {
    let mut calls = Vec::new();
    let mut rest = body;
    loop {
        rest = rest.trim_start_matches(|c: char| c.is_whitespace() || c == ';');
        if rest.is_empty() {
            return (!calls.is_empty()).then_some(calls);
        }
        let mut items = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
        let v = items.next()?.ok()?;
        calls.push(call_from_value(v)?);
        rest = &rest[items.byte_offset()..];
    }
}

/// How much of a streamed reply is plain text that can be sent already: up to
/// a tool call's opening tag, or a partial one at the end.
pub fn visible_prefix(text: &str) -> &str {
    before_tag(text, CALL_OPEN)
}

/// Text up to `tag`, or up to a partial `tag` at its end.
fn before_tag<'a>(text: &'a str, tag: &str) -> &'a str {
    if let Some(i) = text.find(tag) {
        return &text[..i];
    }
    for k in (1..tag.len()).rev() {
        if text.ends_with(&tag[..k]) {
            return &text[..text.len() - k];
        }
    }
    text
}

/// [`visible_prefix`] for a reply written in `syntax`. A reply that may be
/// nothing but calls (a JSON object for Llama 3.1, a list for Mistral) is
/// held back whole until it ends.
pub fn visible_prefix_in(syntax: ToolSyntax, text: &str) -> &str {
    let start = text.trim_start();
    match syntax {
        ToolSyntax::Hermes => visible_prefix(text),
        ToolSyntax::Llama3Json => {
            if start.is_empty()
                || start.starts_with('{')
                || start.starts_with(PYTHON_TAG)
                || PYTHON_TAG.starts_with(start)
            {
                ""
            } else {
                text
            }
        }
        ToolSyntax::Mistral
            if start.starts_with('[') && !text.contains(TOOL_CALLS) && !TOOL_CALLS.starts_with(start) =>
        {
            ""
        }
        ToolSyntax::Mistral => before_tag(text, TOOL_CALLS),
    }
}

/// A new call id in OpenAI's style.
pub fn new_call_id() -> String {
    let u = uuid::Uuid::new_v4().simple().to_string();
    format!("call_{}", &u[..24])
}

/// The calls as the API's `tool_calls` array (with an `index` when streamed).
pub fn calls_json(calls: &[Call], streamed: bool) -> Vec<Value> {
    calls
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut v = json!({
                "id": new_call_id(),
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments},
            });
            if streamed {
                v["index"] = json!(i);
            }
            v
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: Value) -> Result<Option<ToolSet>, ApiError> {
        parse(v.as_object().unwrap())
    }

    fn weather() -> Value {
        json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}}, "required": ["city"]}}}])
    }

    #[test]
    fn replies_parse_into_calls_and_text() {
        let (text, calls) =
            parse_reply("Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>");
        assert_eq!(text, "Let me check.");
        assert_eq!(
            calls,
            vec![Call {
                name: "get_weather".into(),
                arguments: r#"{"city":"Paris"}"#.into()
            }]
        );
        let (text, calls) = parse_reply("<tool_call>not json</tool_call> hi");
        assert!(calls.is_empty());
        assert_eq!(text, "<tool_call>not json</tool_call> hi");
        assert_eq!(visible_prefix("Hello <tool"), "Hello ");
        assert_eq!(visible_prefix("Hello <tool_call>{"), "Hello ");
        assert_eq!(visible_prefix("a < b"), "a < b");
    }

    #[test]
    fn llama3_replies_parse_into_calls() {
        let s = ToolSyntax::Llama3Json;
        let call = |args: &str| Call {
            name: "get_weather".into(),
            arguments: args.into(),
        };
        let (text, calls) = parse_reply_in(s, r#"{"name": "get_weather", "parameters": {"city": "Paris"}}"#);
        assert_eq!((text.as_str(), calls), ("", vec![call(r#"{"city":"Paris"}"#)]));
        // With the tag, and two calls separated by `;`.
        let (_, calls) = parse_reply_in(
            s,
            r#"<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_weather", "parameters": {"city": "Rome"}}"#,
        );
        assert_eq!(calls, vec![call(r#"{"city":"Paris"}"#), call(r#"{"city":"Rome"}"#)]);
        // Plain answers, JSON or not, stay text.
        assert_eq!(parse_reply_in(s, "It is sunny.").1, vec![]);
        let (text, calls) = parse_reply_in(s, r#"{"answer": 42}"#);
        assert_eq!((text.as_str(), calls.len()), (r#"{"answer": 42}"#, 0));
        assert_eq!(visible_prefix_in(s, "{\"name"), "");
        assert_eq!(visible_prefix_in(s, "<|pyth"), "");
        assert_eq!(visible_prefix_in(s, "Sunny {"), "Sunny {");
    }

    #[test]
    fn mistral_replies_parse_into_calls() {
        let s = ToolSyntax::Mistral;
        let (text, calls) = parse_reply_in(
            s,
            r#"Checking. [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}]"#,
        );
        assert_eq!(text, "Checking.");
        assert_eq!(
            calls,
            vec![
                Call {
                    name: "get_weather".into(),
                    arguments: r#"{"city":"Paris"}"#.into()
                },
                Call {
                    name: "get_time".into(),
                    arguments: "{}".into()
                }
            ]
        );
        // The tag is a special token that decoding may drop.
        let (_, calls) = parse_reply_in(s, r#"[{"name": "get_time", "arguments": {}}]"#);
        assert_eq!(calls.len(), 1);
        assert_eq!(parse_reply_in(s, "[1, 2]"), ("[1, 2]".to_string(), vec![]));
        assert_eq!(visible_prefix_in(s, "Checking. [TOOL_CA"), "Checking. ");
        assert_eq!(visible_prefix_in(s, "[{\"name"), "");
        let mut m = vec![ChatMessage::new("tool", "1")];
        m[0].tool_call_id = Some("call_0123456789abcdef".into());
        mistral_ids(&mut m);
        assert_eq!(m[0].tool_call_id.as_deref(), Some("789abcdef"));
    }

    #[test]
    fn constraints_spell_calls_in_the_template_syntax() {
        let t = set(json!({"tools": weather(), "tool_choice": "required"}))
            .unwrap()
            .unwrap();
        for s in [ToolSyntax::Hermes, ToolSyntax::Llama3Json, ToolSyntax::Mistral] {
            let re = t.constraint_regex_for(s).unwrap();
            let mut state =
                vicugna_engine::constraint::ConstraintState::new(Constraint::Regex(re.clone()).compile().unwrap());
            let sample = match s {
                ToolSyntax::Hermes => {
                    "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"
                }
                ToolSyntax::Llama3Json => r#"{"name": "get_weather", "parameters": {"city": "Paris"}}"#,
                ToolSyntax::Mistral => r#"[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]"#,
            };
            // The constraint admits the template's syntax, which parses back.
            state.advance(sample.as_bytes());
            let vocab = vicugna_engine::constraint::Vocab::new(Vec::new());
            assert!(state.allowed(&vocab).complete, "{s:?}: {sample} does not match {re}");
            let (_, calls) = parse_reply_in(s, sample);
            assert_eq!(calls.len(), 1, "{s:?}");
            assert!(
                re.contains(if s == ToolSyntax::Llama3Json {
                    "parameters"
                } else {
                    "arguments"
                }),
                "{re}"
            );
        }
    }

    #[test]
    fn constrained_calls_name_a_listed_function_with_valid_arguments() {
        let t = set(json!({"tools": weather(), "tool_choice": "required"}))
            .unwrap()
            .unwrap();
        let re = t.check_constraint().unwrap().unwrap();
        let c = Constraint::Regex(re).compile().unwrap();
        let _ = c;
        let e = set(json!({"tools": weather(), "tool_choice": {"type": "function", "function": {"name": "nope"}}}))
            .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("tool_choice.function.name"));
        let e = set(json!({"tool_choice": "required"})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("tool_choice"));
        let bad = json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "string", "not": {}}}}}}]);
        let e = set(json!({"tools": bad})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("tools[0].function.parameters"));
        assert!(e.message.contains("`not`"), "{}", e.message);
    }
}
