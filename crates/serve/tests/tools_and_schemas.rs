//! Tool calling, structured output, logit_bias and min_p through the official
//! `openai` Python client (with pydantic 2, for `chat.completions.parse`), and
//! the 400s a bad schema, an unknown tool or a misplaced tool message get.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// A venv with `openai` and pydantic 2 (the serving tests' venv pins
/// pydantic 1 for FastChat). `$VICUGNA_TEST_PYTHON_V2` overrides it.
fn python_v2() -> Option<PathBuf> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if let Ok(p) = std::env::var("VICUGNA_TEST_PYTHON_V2") {
        return Some(PathBuf::from(p));
    }
    let dir = target_dir().join("tools-pyenv");
    let py = dir.join("bin/python");
    let ready = dir.join(".ready");
    if ready.exists() {
        return Some(py);
    }
    let fail = |m: &str| -> Option<PathBuf> {
        if in_ci() {
            panic!("{m}");
        }
        eprintln!("skipping: {m}");
        None
    };
    let venv = std::process::Command::new("python3")
        .args(["-m", "venv"])
        .arg(&dir)
        .status()
        .is_ok_and(|s| s.success());
    if !venv {
        return fail("python3 -m venv failed (install python3-venv)");
    }
    let pip = std::process::Command::new(&py)
        .args([
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "openai",
            "pydantic>=2",
        ])
        .status()
        .is_ok_and(|s| s.success());
    if !pip {
        return fail("pip install openai pydantic>=2 failed");
    }
    std::fs::write(&ready, "").ok()?;
    Some(py)
}

const SCRIPT: &str = r##"
import sys, json, typing, openai, pydantic
base, model = sys.argv[1], sys.argv[2]
c = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
user = lambda t: [{"role": "user", "content": t}]

# Structured output: parse() sends a strict json_schema and returns the model.
class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=24)
    country: typing.Literal["France", "Germany", "Italy"]
    population_millions: float
    capital: bool
    landmarks: typing.List[str] = pydantic.Field(max_length=2)
r = c.chat.completions.parse(model=model, messages=user("Describe Paris as JSON."), response_format=City,
                             temperature=0, max_tokens=120)
city = r.choices[0].message.parsed
assert isinstance(city, City), r
assert city.country in ("France", "Germany", "Italy") and len(city.landmarks) <= 2, city
print("parse:", city)

# Nested objects, $defs/$ref, optional fields and anyOf (pydantic Optional).
class Address(pydantic.BaseModel):
    street: str = pydantic.Field(max_length=30)
    zip: str = pydantic.Field(pattern=r"^[0-9]{5}$")
class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=20)
    age: int
    address: Address
    nickname: typing.Optional[str] = pydantic.Field(max_length=10)
r = c.chat.completions.parse(model=model, messages=user("Invent a person."), response_format=Person,
                             temperature=0, max_tokens=150)
p = r.choices[0].message.parsed
assert isinstance(p, Person) and len(p.address.zip) == 5, r
print("nested:", p)

# json_object: any JSON object.
r = c.chat.completions.create(model=model, messages=user("Give me a JSON object about cats."),
                              response_format={"type": "json_object"}, temperature=0, max_tokens=60)
print("json_object:", r.choices[0])
if r.choices[0].finish_reason == "stop":
    assert isinstance(json.loads(r.choices[0].message.content), dict), r
else:
    assert r.choices[0].message.content.startswith("{"), r

# Streaming under a schema gives the same text as without streaming.
schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "confidence": {"type": "integer", "minimum": 0}},
          "required": ["answer", "confidence"], "additionalProperties": False}
rf = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema, "strict": True}}
whole = c.chat.completions.create(model=model, messages=user("Is the sky blue?"), response_format=rf, temperature=0, max_tokens=60)
parts = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
    model=model, messages=user("Is the sky blue?"), response_format=rf, temperature=0, max_tokens=60, stream=True) if ch.choices)
print("verdict:", whole.choices[0], parts)
v = json.loads(whole.choices[0].message.content)
assert v["answer"] in ("yes", "no") and v["confidence"] >= 0 and parts == whole.choices[0].message.content, (whole, parts)

# /v1/completions takes response_format too.
r = c.completions.create(model=model, prompt="The verdict as JSON:", max_tokens=60, temperature=0, extra_body={"response_format": rf})
assert json.loads(r.choices[0].text)["answer"] in ("yes", "no"), r

# Tools.
tools = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
     "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}},
                    "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "add", "description": "Adds two integers",
     "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}},
]
q = user("What is the weather in Paris?")
r = c.chat.completions.create(model=model, messages=q, tools=tools, tool_choice="required", temperature=0, max_tokens=80)
ch = r.choices[0]
assert ch.finish_reason == "tool_calls", r
call = ch.message.tool_calls[0]
assert call.type == "function" and call.id.startswith("call_") and call.function.name in ("get_weather", "add"), call
args = json.loads(call.function.arguments)
if call.function.name == "get_weather":
    assert set(args) == {"city", "unit"} and args["unit"] in ("celsius", "fahrenheit"), args
else:
    assert isinstance(args["a"], int) and isinstance(args["b"], int), args
print("required:", call)

# A named function, streamed: index/id/name first, then argument fragments.
calls = {}
finish = None
for chunk in c.chat.completions.create(model=model, messages=user("What is 2 plus 3?"), tools=tools,
                                       tool_choice={"type": "function", "function": {"name": "add"}},
                                       temperature=0, max_tokens=60, stream=True):
    d = chunk.choices[0].delta
    for tc in d.tool_calls or []:
        e = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
        if tc.id: e["id"] = tc.id
        if tc.function and tc.function.name: e["name"] = tc.function.name
        if tc.function and tc.function.arguments: e["arguments"] += tc.function.arguments
    finish = chunk.choices[0].finish_reason or finish
assert finish == "tool_calls" and calls[0]["name"] == "add" and calls[0]["id"], calls
a = json.loads(calls[0]["arguments"])
assert isinstance(a["a"], int) and isinstance(a["b"], int), a
print("named, streamed:", calls)

# The result goes back as a tool message; the model answers in text.
history = q + [ch.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "sunny"})}]
r = c.chat.completions.create(model=model, messages=history, tools=tools, tool_choice="none", temperature=0, max_tokens=20)
assert r.choices[0].message.content and not r.choices[0].message.tool_calls, r
r = c.chat.completions.create(model=model, messages=history, tools=tools, temperature=0, max_tokens=20)
assert r.choices[0].finish_reason in ("stop", "length", "tool_calls"), r
print("continued:", r.choices[0].message)

# Errors name the field.
def refused(field, **kw):
    try:
        c.chat.completions.create(model=model, temperature=0, max_tokens=5, **kw)
    except openai.BadRequestError as ex:
        assert ex.status_code == 400 and field in str(ex), (field, ex)
        return str(ex)
    raise SystemExit(f"accepted: {kw}")
refused("tool_choice.function.name", messages=q, tools=tools, tool_choice={"type": "function", "function": {"name": "nope"}})
refused("messages[0].role", messages=[{"role": "tool", "tool_call_id": "x", "content": "1"}])
refused("messages[2].tool_call_id", messages=q + [ch.message.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": "other", "content": "1"}])
refused("messages", messages=q + [ch.message.model_dump(exclude_none=True)])
m = refused("response_format.json_schema.schema", messages=q, response_format={"type": "json_schema", "json_schema": {"name": "x",
            "schema": {"type": "object", "properties": {"a": {"type": "string", "not": {"const": "b"}}}}}})
assert "`not`" in m and "#/properties/a" in m, m
refused("response_format.json_schema.schema", messages=q, response_format={"type": "json_schema", "json_schema": {"name": "x",
        "schema": {"$defs": {"N": {"type": "object", "properties": {"next": {"$ref": "#/$defs/N"}}}}, "$ref": "#/$defs/N"}}})
refused("tools[0].function.parameters", messages=q, tools=[{"type": "function", "function": {"name": "f",
        "parameters": {"type": "object", "properties": {"x": {"type": "integer", "multipleOf": 3}}}}}])

# logit_bias and min_p are applied.
plain = c.completions.create(model=model, prompt="The sky is", max_tokens=3, temperature=0).choices[0].text
b1 = c.completions.create(model=model, prompt="The sky is", max_tokens=1, temperature=0, logit_bias={"28": 100}).choices[0].text
b2 = c.completions.create(model=model, prompt="The sky is", max_tokens=1, temperature=0, logit_bias={"29": 100}).choices[0].text
assert b1 != b2, (b1, b2)
mp = [c.completions.create(model=model, prompt="The sky is", max_tokens=3, temperature=1.5, seed=s, extra_body={"min_p": 1.0}).choices[0].text
      for s in range(3)]
assert all(t == plain for t in mp), (plain, mp)
print("tools and schemas OK")
"##;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn openai_client_tools_structured_output_and_sampling_fields() {
    let Some(py) = tokio::task::spawn_blocking(python_v2).await.unwrap() else {
        return;
    };
    let c = Cluster::start(|_| {}).await;
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
    assert!(stdout.contains("tools and schemas OK"), "{stdout}");
}

/// The raw wire shapes: a required call's message and finish reason, and the
/// streamed tool-call deltas, without any client in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tool_call_wire_shapes() {
    let c = Cluster::start(|_| {}).await;
    let tools = json!([{"type": "function", "function": {"name": "lookup",
        "parameters": {"type": "object", "properties": {"q": {"type": "string", "maxLength": 20}}, "required": ["q"]}}}]);
    let body = c.chat_body(
        "Look up the Eiffel tower.",
        json!({"tools": tools, "tool_choice": "required", "max_tokens": 60}),
    );
    let (status, v) = post(&c.url("/v1/chat/completions"), &body).await;
    assert_eq!(status, 200, "{v}");
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{v}");
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "lookup");
    let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!(args["q"].as_str().is_some_and(|q| q.chars().count() <= 20), "{args}");

    let mut body = body;
    body["stream"] = json!(true);
    let text = http()
        .post(c.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let events = parse_sse(&text);
    let deltas: Vec<&Value> = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["tool_calls"].as_array())
        .flatten()
        .collect();
    assert!(deltas.len() >= 2, "{text}");
    assert_eq!(deltas[0]["index"], 0);
    assert_eq!(deltas[0]["function"]["name"], "lookup");
    assert!(deltas[0]["id"].as_str().is_some_and(|id| id.starts_with("call_")));
    let args: String = deltas
        .iter()
        .filter_map(|d| d["function"]["arguments"].as_str())
        .collect();
    assert_eq!(
        args,
        call["function"]["arguments"].as_str().unwrap(),
        "same arguments streamed or not"
    );
    let last_reason = events
        .iter()
        .rev()
        .find_map(|e| e["choices"][0]["finish_reason"].as_str());
    assert_eq!(last_reason, Some("tool_calls"));
}
