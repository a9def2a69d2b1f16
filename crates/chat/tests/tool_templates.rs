//! A model's own chat template given the request's tools, assistant
//! `tool_calls` and `tool` messages the way HF's `apply_chat_template` passes
//! them, and the tool-call syntax read from the template.

use serde_json::json;
use vicugna_chat::{ChatFormat, ChatMessage, FunctionCall, FunctionSpec, ToolCall, ToolSpec, ToolSyntax};

/// Qwen2.5-Instruct's chat template (Hermes-style `<tool_call>` tags).
const QWEN25: &str = include_str!("data/qwen2.5-tools.jinja");

fn weather_tool() -> ToolSpec {
    ToolSpec {
        kind: "function".into(),
        function: FunctionSpec {
            name: "get_weather".into(),
            description: Some("Weather in a city".into()),
            parameters: json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
        },
    }
}

fn qwen() -> ChatFormat {
    ChatFormat::select(None, Some((QWEN25, "", "<|im_end|>")), "some/model").unwrap()
}

#[test]
fn qwen_template_renders_its_own_tool_section_calls_and_results() {
    let format = qwen();
    assert_eq!(format.tool_syntax(), Some(ToolSyntax::Hermes));
    let mut call = ChatMessage::new("assistant", "");
    call.tool_calls = Some(vec![ToolCall {
        id: "call_1".into(),
        kind: "function".into(),
        function: FunctionCall {
            name: "get_weather".into(),
            arguments: json!({"city": "Paris"}),
        },
    }]);
    let mut result = ChatMessage::new("tool", "22 C");
    result.tool_call_id = Some("call_1".into());
    let messages = vec![ChatMessage::new("user", "Weather in Paris?"), call, result];
    let tools = [weather_tool()];
    let (prompt, spans) = format.render_with_spans_tools(&messages, None, Some(&tools)).unwrap();
    // As HF renders it, except that the schema's keys come in sorted order
    // (the gateway reads request JSON into sorted maps).
    let expected = concat!(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n# Tools\n\n",
        "You may call one or more functions to assist with the user query.\n\n",
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n",
        r#"{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {"properties": {"city": {"type": "string"}}, "required": ["city"], "type": "object"}}}"#,
        "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n",
        "<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n",
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n",
        "<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call><|im_end|>\n",
        "<|im_start|>user\n<tool_response>\n22 C\n</tool_response><|im_end|>\n",
        "<|im_start|>assistant\n",
    );
    assert_eq!(prompt, expected);
    // The user's text, the tool's result, the call's arguments and the tools
    // are the caller's text.
    let spanned: Vec<&str> = spans.iter().map(|r| &prompt[r.clone()]).collect();
    assert_eq!(spanned[..3], ["Weather in Paris?", "22 C", r#"{"city": "Paris"}"#]);
    assert!(
        spanned[3].starts_with(r#"{"type": "function", "function": {"name": "get_weather""#),
        "{spanned:?}"
    );

    // Without tools the template's plain system prompt comes back.
    let plain = format.render(&[ChatMessage::new("user", "Hi")], None).unwrap();
    assert!(plain.starts_with("<|im_start|>system\nYou are Qwen"), "{plain}");
    assert!(!plain.contains("<tools>"), "{plain}");
}

#[test]
fn tool_messages_need_a_template_that_knows_tools() {
    let chatml = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}";
    let format = ChatFormat::select(None, Some((chatml, "", "")), "m").unwrap();
    assert_eq!(format.tool_syntax(), None);
    let err = format.render(&[ChatMessage::new("tool", "1")], None).unwrap_err();
    assert!(err.to_string().contains("tool"), "{err}");
    assert_eq!(ChatFormat::named("vicuna_v1.1").unwrap().tool_syntax(), None);
}

/// The constructs Llama 3.1's and Mistral's templates use on calls and
/// results: `'tool_calls' in message` (absent, not null, on other messages),
/// `tool_calls[0].function`, the function printed with `tojson` (name before
/// arguments) and cut with `[:-1]`, the call id, and `tool.items()`.
#[test]
fn calls_have_the_shape_llama_and_mistral_templates_read() {
    let template = concat!(
        "{%- for t in tools %}{% for k, v in t.function.items() %}{{ k }};{% endfor %}{% endfor %}|",
        "{%- for m in messages %}",
        "{%- if 'tool_calls' in m %}{% set out = m.tool_calls[0].function|tojson %}[TOOL_CALLS] [{{ out[:-1] }}, \"id\": \"{{ m.tool_calls[0].id }}\"}]",
        "{%- elif m.role == 'tool' %}[TOOL_RESULTS]{{ m.content }}@{{ m.tool_call_id }}",
        "{%- else %}[INST]{{ m.content }}{% endif %}{% endfor %}",
    );
    let format = ChatFormat::select(None, Some((template, "", "")), "m").unwrap();
    assert_eq!(format.tool_syntax(), Some(ToolSyntax::Mistral));
    let mut call = ChatMessage::new("assistant", "");
    call.tool_calls = Some(vec![ToolCall {
        id: "abcdef123".into(),
        kind: "function".into(),
        function: FunctionCall {
            name: "get_weather".into(),
            arguments: json!({"city": "Paris"}),
        },
    }]);
    let mut result = ChatMessage::new("tool", "22 C");
    result.tool_call_id = Some("abcdef123".into());
    let messages = vec![ChatMessage::new("user", "Weather?"), call, result];
    let prompt = format.render_tools(&messages, None, Some(&[weather_tool()])).unwrap();
    assert_eq!(
        prompt,
        r#"name;description;parameters;|[INST]Weather?[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abcdef123"}][TOOL_RESULTS]22 C@abcdef123"#
    );
}
