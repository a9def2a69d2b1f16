//! Fairness and cost limits of `vicugna serve` with the default model, as a user
//! sees them on loopback: a short chat answers within 2 s while a 16 × 8192
//! request and an 8K-token prompt run; costly requests (a pathological regex,
//! `n × max_tokens` over the cap, an over-long embeddings input, an 8 MB prompt)
//! are refused at once with a 400 that names the limit. Needs the `vicugna`
//! binary beside this test binary; outside CI the tests skip without it.
//!
//! The tests take turns (one server at a time): the latency bound is a stated
//! requirement and must not be measured against another test's load.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use serde_json::{json, Value};

/// One `vicugna serve` at a time.
static TURN: Mutex<()> = Mutex::new(());

struct Serve {
    child: Child,
    api: String,
    model: String,
    _turn: MutexGuard<'static, ()>,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Serve {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.api)
    }

    /// Resident memory of the server process, in MiB.
    fn rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    }
}

/// Starts `vicugna serve` on free ports and waits until it lists its model.
async fn serve(extra: &[&str]) -> Option<Serve> {
    let turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let bin = vicugna_bin()?;
    model_path();
    let mut child = Command::new(bin)
        .args([
            "serve",
            "--port",
            "0",
            "--controller-port",
            "0",
            "--worker-port",
            "0",
            "--no-log",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let api = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("vicugna serve printed no API URL");
        if let Some(rest) = line.trim().strip_prefix("API:") {
            break rest
                .split_whitespace()
                .next()
                .unwrap()
                .trim_end_matches("/v1")
                .to_string();
        }
    };
    let mut s = Serve {
        child,
        api,
        model: String::new(),
        _turn: turn,
    };
    for _ in 0..200 {
        if let Ok(r) = http().get(s.url("/v1/models")).send().await {
            if let Some(id) = r
                .json::<Value>()
                .await
                .ok()
                .and_then(|v| v["data"][0]["id"].as_str().map(String::from))
            {
                s.model = id;
                return Some(s);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("vicugna serve listed no model within 20 s");
}

/// Posts `body`; the status, the JSON answer and how long it took.
async fn timed_post(url: &str, body: &Value) -> (u16, Value, Duration) {
    let t0 = Instant::now();
    let (status, v) = post(url, body).await;
    (status, v, t0.elapsed())
}

/// A streaming request that runs until dropped; returns once its first token came,
/// and fails the test if it was refused or sent nothing (else the load would be missing).
async fn start_stream(url: String, body: Value) -> tokio::task::JoinHandle<()> {
    let (first_tx, first_rx) = tokio::sync::oneshot::channel::<Result<(), String>>();
    let h = tokio::spawn(async move {
        let r = match http().post(url).json(&body).send().await {
            Ok(r) => r,
            Err(e) => {
                let _ = first_tx.send(Err(e.to_string()));
                return;
            }
        };
        if r.status() != 200 {
            let status = r.status();
            let _ = first_tx.send(Err(format!("{status}: {}", r.text().await.unwrap_or_default())));
            return;
        }
        let mut s = r.bytes_stream();
        let mut first = Some(first_tx);
        while let Some(piece) = s.next().await {
            if piece.is_err() {
                break;
            }
            if let Some(tx) = first.take() {
                let _ = tx.send(Ok(()));
            }
        }
    });
    match tokio::time::timeout(Duration::from_secs(120), first_rx).await {
        Ok(Ok(Ok(()))) => h,
        other => panic!("the background request did not start streaming: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_chat_answers_within_2s_beside_a_16x8192_request_and_an_8k_prompt() {
    let Some(s) = serve(&[]).await else { return };
    let chat = |text: &str, max_tokens: usize| {
        json!({"model": s.model, "messages": [{"role": "user", "content": text}],
               "max_tokens": max_tokens, "temperature": 0})
    };
    // Unloaded, for the record.
    let (status, _, quiet) = timed_post(&s.url("/v1/chat/completions"), &chat("Say hi.", 4)).await;
    assert_eq!(status, 200);

    let mut heavy = chat("Tell me a very long story about a river.", 8192);
    merge(
        &mut heavy,
        json!({"n": 16, "ignore_eos": true, "stream": true, "temperature": 1.0}),
    );
    let heavy = start_stream(s.url("/v1/chat/completions"), heavy).await;
    // About 7.7K tokens of prompt.
    let long_body = json!({"model": s.model, "prompt": "The river carried boats past farms and mills to the sea. ".repeat(640),
                           "max_tokens": 8, "temperature": 0});
    let url = s.url("/v1/completions");
    let long_prompt = tokio::spawn(async move { post(&url, &long_body).await });
    // Let the long prompt's prefill get under way.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let mut times = Vec::new();
    for i in 0..3 {
        let (status, v, took) = timed_post(&s.url("/v1/chat/completions"), &chat("Say hi.", 4)).await;
        assert_eq!(status, 200, "{v}");
        assert!(v["usage"]["completion_tokens"].as_u64().unwrap() >= 1, "{v}");
        eprintln!("short chat {i} beside the load: {took:?} (unloaded {quiet:?})");
        times.push(took);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The pathological pattern is refused under load as well, without touching the engine.
    let mut bad = chat("Say hi.", 4);
    bad["guided_regex"] = json!("(a|aa)*b{1,1000}{1,1000}");
    let (status, v, took) = timed_post(&s.url("/v1/chat/completions"), &bad).await;
    eprintln!("pathological regex under load: {status} in {took:?}");
    assert_eq!(status, 400, "{v}");
    assert!(
        !heavy.is_finished(),
        "the 16 × 8192 request ended before the chats were measured"
    );
    assert!(
        !long_prompt.is_finished(),
        "the long prompt finished before the chats: the test did not measure beside it"
    );
    for (i, t) in times.iter().enumerate() {
        assert!(
            *t < Duration::from_secs(2),
            "short chat {i} took {t:?} beside a 16 × 8192 request and an 8K-token prompt (all: {times:?})"
        );
    }
    heavy.abort();
    long_prompt.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pathological_regex_is_refused_within_100ms_and_chat_goes_on() {
    let Some(s) = serve(&[]).await else { return };
    let mut body = json!({"model": s.model, "messages": [{"role": "user", "content": "Pick."}],
                          "max_tokens": 8, "guided_regex": "(a|aa)*b{1,1000}{1,1000}"});
    // The connection and the worker lookup are warm: only the refusal is timed.
    let (status, _, _) = timed_post(&s.url("/v1/chat/completions"), &body).await;
    assert_eq!(status, 400);
    let (status, v, took) = timed_post(&s.url("/v1/chat/completions"), &body).await;
    assert_eq!(status, 400, "{v}");
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("constraint pattern"), "{msg}");
    assert!(took < Duration::from_millis(100), "refused after {took:?}");
    // Sixteen at once, and a chat beside them.
    let url = s.url("/v1/chat/completions");
    let bad: Vec<_> = (0..16)
        .map(|_| {
            let (url, body) = (url.clone(), body.clone());
            tokio::spawn(async move { timed_post(&url, &body).await })
        })
        .collect();
    body.as_object_mut().unwrap().remove("guided_regex");
    body["max_tokens"] = json!(4);
    let (status, v, took) = timed_post(&url, &body).await;
    assert_eq!(status, 200, "{v}");
    for b in bad {
        let (status, _, t) = b.await.unwrap();
        assert_eq!(status, 400);
        assert!(t < Duration::from_secs(1), "{t:?}");
    }
    eprintln!("chat beside 16 pathological patterns: {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_times_max_tokens_over_the_cap_is_refused_naming_the_cap() {
    let Some(s) = serve(&[]).await else { return };
    let body = json!({"model": s.model, "messages": [{"role": "user", "content": "Hi"}], "n": 16, "max_tokens": 9000});
    let (status, v) = post(&s.url("/v1/chat/completions"), &body).await;
    assert_eq!(status, 400, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    for words in ["n = 16", "max_tokens = 9000", "144000", "131072"] {
        assert!(msg.contains(words), "{words}: {msg}");
    }
    assert_eq!(v["error"]["param"], "max_tokens");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_long_embeddings_inputs_are_refused_naming_the_limits() {
    let Some(s) = serve(&["--embed-max-request-tokens", "100"]).await else {
        return;
    };
    let url = s.url("/v1/embeddings");
    // About 10K tokens: over the context, the per-input limit by default.
    let long = "word ".repeat(10_000);
    let (status, v) = post(&url, &json!({"model": s.model, "input": long})).await;
    assert_eq!(status, 400, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("input[0]") && msg.contains("8192 tokens per input"),
        "{msg}"
    );
    // Three inputs of about 60 tokens: over a total of 100.
    let piece = "a cat sat on the mat ".repeat(10);
    let (status, v) = post(&url, &json!({"model": s.model, "input": [piece, piece, piece]})).await;
    assert_eq!(status, 400, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("more than 100 tokens in all"), "{msg}");
    // Within the limits, an embedding still comes back.
    let (status, v) = post(&url, &json!({"model": s.model, "input": "a cat"})).await;
    assert_eq!(status, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_prompt_is_refused_quickly_and_memory_returns() {
    let Some(s) = serve(&[]).await else { return };
    let url = s.url("/v1/chat/completions");
    let body = json!({"model": s.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
    assert_eq!(post(&url, &body).await.0, 200);
    let baseline = s.rss_mib();
    // Just under the 8 MiB body limit.
    let huge = json!({"model": s.model, "messages": [{"role": "user", "content": "lorem ipsum ".repeat(690_000)}]});
    let (status, v, took) = timed_post(&url, &huge).await;
    assert_eq!(status, 400, "{}", v.to_string().chars().take(300).collect::<String>());
    assert_eq!(v["error"]["code"], "context_length_exceeded", "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("maximum context length is 8192 tokens"), "{msg}");
    assert!(took < Duration::from_secs(2), "refused after {took:?}");
    let mut peak = s.rss_mib();
    // Four at once.
    let burst: Vec<_> = (0..4)
        .map(|_| {
            let (url, huge) = (url.clone(), huge.clone());
            tokio::spawn(async move { timed_post(&url, &huge).await })
        })
        .collect();
    for b in burst {
        let (status, _, took) = b.await.unwrap();
        assert_eq!(status, 400);
        peak = peak.max(s.rss_mib());
        eprintln!("8 MB prompt refused in {took:?}");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    // A small request lets the engine thread trim the heap too.
    assert_eq!(post(&url, &body).await.0, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = s.rss_mib();
    eprintln!("RSS: baseline {baseline:.0} MiB, peak seen {peak:.0} MiB, after the burst {after:.0} MiB");
    assert!(
        after < baseline + 128.0,
        "RSS stayed at {after:.0} MiB after the burst (baseline {baseline:.0} MiB)"
    );
}
