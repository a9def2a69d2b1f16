//! Other people's code against our servers: the official `openai` Python client
//! against the gateway, and FastChat 0.2.36's own `openai_api_server` in front
//! of a vicugna controller and worker. The Python packages go into a venv under
//! target/ on first use (or `$VICUGNA_TEST_PYTHON`); outside CI the tests skip
//! when that cannot be made.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// Kills the child process when dropped (also on panic).
struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const OPENAI_SCRIPT: &str = r#"
import sys, openai
base, model = sys.argv[1], sys.argv[2]
c = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)

ids = [m.id for m in c.models.list().data]
assert model in ids, ids

r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
                              max_tokens=12, temperature=0)
assert "Paris" in r.choices[0].message.content, r
assert r.choices[0].finish_reason in ("stop", "length"), r
assert 0 < r.usage.completion_tokens <= 12, r.usage

parts, usage = [], None
for ch in c.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hi"}], max_tokens=8,
                                    stream=True, stream_options={"include_usage": True}):
    if ch.choices and ch.choices[0].delta.content:
        parts.append(ch.choices[0].delta.content)
    if ch.usage:
        usage = ch.usage
assert parts and usage and usage.completion_tokens > 0, (parts, usage)

r = c.completions.create(model=model, prompt="The sky is", max_tokens=4, logprobs=1, echo=True, temperature=0)
assert r.choices[0].text.startswith("The sky is"), r
assert len(r.choices[0].logprobs.tokens) == 7, r.choices[0].logprobs
text = "".join(x.choices[0].text for x in c.completions.create(model=model, prompt="Once", max_tokens=4, stream=True))
assert text, text

e = c.embeddings.create(model=model, input=["a cat", "a dog"])
assert len(e.data) == 2 and len(e.data[0].embedding) > 10, e

try:
    c.chat.completions.create(model=model, messages=[], max_tokens=4)
    raise SystemExit("an empty message list was accepted")
except openai.BadRequestError as ex:
    assert ex.status_code == 400 and "messages" in str(ex), ex
try:
    c.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    raise SystemExit("an unknown model was accepted")
except openai.NotFoundError:
    pass
print("openai client OK")
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn official_openai_python_client_works() {
    let Some(py) = tokio::task::spawn_blocking(python).await.unwrap() else {
        return;
    };
    let c = Cluster::start(|_| {}).await;
    let out = tokio::time::timeout(
        Duration::from_secs(180),
        tokio::process::Command::new(py)
            .args(["-c", OPENAI_SCRIPT, &c.api, &c.model])
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
    assert!(stdout.contains("openai client OK"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fastchat_openai_api_server_in_front_of_vicugna() {
    let Some(py) = tokio::task::spawn_blocking(python).await.unwrap() else {
        return;
    };
    // FastChat's server sends no control secret: the opt-in compat mode.
    let c = Cluster::start_fastchat_compat().await;
    let port = free_port();
    let child = Command::new(py)
        .args([
            "-m",
            "fastchat.serve.openai_api_server",
            "--host",
            "127.0.0.1",
            "--port",
        ])
        .arg(port.to_string())
        .args(["--controller-address", &c.controller])
        // FastChat writes its log file into $LOGDIR (default: the working directory).
        .env("LOGDIR", std::env::temp_dir())
        .current_dir(std::env::temp_dir())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start FastChat's openai_api_server");
    let mut child = Reaper(child);
    let fc = format!("http://127.0.0.1:{port}");
    let t0 = Instant::now();
    loop {
        if let Ok(r) = http().get(format!("{fc}/v1/models")).send().await {
            if r.status() == 200 {
                let v: Value = r.json().await.unwrap();
                assert_eq!(v["data"][0]["id"], c.model.as_str(), "{v}");
                break;
            }
        }
        if let Ok(Some(st)) = child.0.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.0.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            panic!("FastChat's server exited ({st}):\n{err}");
        }
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "FastChat's server did not come up"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (s, r) = post(
        &format!("{fc}/v1/chat/completions"),
        &json!({"model": c.model, "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "max_tokens": 16, "temperature": 0}),
    )
    .await;
    assert_eq!(s, 200, "{r}");
    let text = r["choices"][0]["message"]["content"].as_str().unwrap_or_default();
    assert!(!text.trim().is_empty(), "{r}");
    assert!(r["usage"]["completion_tokens"].as_u64().unwrap() > 0, "{r}");

    // Streaming through FastChat's gateway and our worker's NUL-delimited stream.
    let body = http()
        .post(format!("{fc}/v1/chat/completions"))
        .json(&json!({"model": c.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "stream": true}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let events = parse_sse(&body);
    assert_eq!(events.last().unwrap(), "[DONE]", "{body}");
    let streamed: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert!(!streamed.is_empty(), "{body}");

    let (s, r) = post(
        &format!("{fc}/v1/completions"),
        &json!({"model": c.model, "prompt": "The sky is", "max_tokens": 4, "temperature": 0}),
    )
    .await;
    assert_eq!(s, 200, "{r}");
    assert!(!r["choices"][0]["text"].as_str().unwrap().is_empty(), "{r}");
    drop(child);
}
