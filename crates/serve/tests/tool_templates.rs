//! Tools through a model's own chat template: a worker whose template renders
//! `tools` (here Qwen 2.5's, Hermes-style `<tool_call>` tags) gets the tools,
//! assistant `tool_calls` and `tool` messages as HF passes them, instead of
//! the generic tool prompt; required calls come back parsed and valid through
//! the official `openai` client. One cluster for the whole file.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// Qwen2.5-Instruct's chat template. The default model (SmolLM2) speaks
/// ChatML with the same `<|im_start|>`/`<|im_end|>` tokens, so it renders
/// and tokenizes as it would for Qwen.
const QWEN25: &str = include_str!("../../chat/tests/data/qwen2.5-tools.jinja");

const SCRIPT: &str = r##"
import json, sys
from openai import OpenAI
base, model = sys.argv[1], sys.argv[2]
c = OpenAI(base_url=base + "/v1", api_key="none")
tools = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                         "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}}}]
q = [{"role": "user", "content": "What is the weather in Paris?"}]

def check(name, arguments):
    assert name == "get_weather", name
    a = json.loads(arguments)
    assert set(a) == {"city", "unit"} and isinstance(a["city"], str) and len(a["city"]) <= 20, a
    assert a["unit"] in ("celsius", "fahrenheit"), a
    return a

r = c.chat.completions.create(model=model, messages=q, tools=tools, tool_choice="required", temperature=0, max_tokens=60)
ch = r.choices[0]
assert ch.finish_reason == "tool_calls", r
call = ch.message.tool_calls[0]
assert call.id.startswith("call_"), call
check(call.function.name, call.function.arguments)

# Streamed, with the function named: the same call.
calls, finish = {}, None
for chunk in c.chat.completions.create(model=model, messages=q, tools=tools, temperature=0, max_tokens=60, stream=True,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}}):
    for tc in chunk.choices[0].delta.tool_calls or []:
        e = calls.setdefault(tc.index, {"name": None, "arguments": ""})
        if tc.function and tc.function.name: e["name"] = tc.function.name
        if tc.function and tc.function.arguments: e["arguments"] += tc.function.arguments
    finish = chunk.choices[0].finish_reason or finish
assert finish == "tool_calls", (finish, calls)
assert check(calls[0]["name"], calls[0]["arguments"]) == json.loads(call.function.arguments), calls

# The result goes back as a tool message, which the template renders.
history = q + [{"role": "assistant", "content": None, "tool_calls": [
                   {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
               {"role": "tool", "tool_call_id": call.id, "content": "21 C, sunny"}]
r = c.chat.completions.create(model=model, messages=history, tools=tools, temperature=0, max_tokens=10)
assert r.choices[0].finish_reason in ("stop", "length", "tool_calls"), r
print(json.dumps({"ok": True, "arguments": call.function.arguments}))
"##;

/// The prompt a worker renders for `body` (its echo, with one generated
/// token after it), and the prompt's token count.
async fn worker_prompt(worker: &str, body: Value) -> (String, u64) {
    let mut body = body;
    merge(&mut body, json!({"echo": true, "max_new_tokens": 1, "temperature": 0}));
    let r = control_http()
        .post(format!("{worker}/worker_generate_stream"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let chunks = parse_chunks(&r.bytes().await.unwrap());
    let last = chunks.last().expect("a chunk");
    assert_eq!(last["error_code"], 0, "{last}");
    let n = last["usage"]["prompt_tokens"].as_u64().unwrap();
    (last["text"].as_str().unwrap().to_string(), n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn model_template_renders_tools_and_calls_parse_back() {
    let c = Cluster::start(|o| o.chat_template = Some(QWEN25.to_string())).await;
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]);
    let user = json!({"role": "user", "content": "Weather in Paris?"});

    // The worker says how its template writes calls.
    let (s, v) = ctl_post(
        &format!("{}/worker_get_conv_template", c.worker),
        &json!({"model": c.model}),
    )
    .await;
    assert_eq!((s, v["tool_syntax"].as_str()), (200, Some("hermes")), "{v}");

    // The template's own tool section, not the generic prompt.
    let (prompt, n) = worker_prompt(&c.worker, json!({"model": c.model, "messages": [user], "tools": tools})).await;
    assert!(
        prompt.starts_with(
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n# Tools\n\n"
        ),
        "{prompt}"
    );
    assert!(
        prompt.contains(
            r#"<tools>
{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": "#
        ),
        "{prompt}"
    );
    assert!(!prompt.contains("You are a function calling AI model"), "{prompt}");
    // The gateway sends the same: its prompt has as many tokens.
    let body = json!({"model": c.model, "messages": [user], "tools": tools, "max_tokens": 1, "temperature": 0});
    let (s, v) = post(&c.url("/v1/chat/completions"), &body).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["usage"]["prompt_tokens"].as_u64(), Some(n), "{v}");

    // A call and its result as the template renders them, from the API's shapes.
    let call = json!({"role": "assistant", "content": null, "tool_calls": [{"id": "call_abc", "type": "function",
        "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]});
    let result = json!({"role": "tool", "tool_call_id": "call_abc", "content": "21 C"});
    let native = json!([user, {"role": "assistant", "content": "", "tool_calls": [{"id": "call_abc", "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}, result]);
    let (prompt, n) = worker_prompt(&c.worker, json!({"model": c.model, "messages": native, "tools": tools})).await;
    assert!(
        prompt.contains(concat!(
            "<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call><|im_end|>\n",
            "<|im_start|>user\n<tool_response>\n21 C\n</tool_response><|im_end|>\n<|im_start|>assistant\n",
        )),
        "{prompt}"
    );
    let body =
        json!({"model": c.model, "messages": [user, call, result], "tools": tools, "max_tokens": 1, "temperature": 0});
    let (s, v) = post(&c.url("/v1/chat/completions"), &body).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["usage"]["prompt_tokens"].as_u64(), Some(n), "{v}");

    // Required and named calls through the official client.
    let Some(py) = tokio::task::spawn_blocking(python).await.unwrap() else {
        return;
    };
    let out = tokio::time::timeout(
        Duration::from_secs(300),
        tokio::process::Command::new(py)
            .args(["-c", SCRIPT, &c.api, &c.model])
            .output(),
    )
    .await
    .expect("the openai client script hung")
    .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains(r#""ok": true"#), "{stdout}");
}
