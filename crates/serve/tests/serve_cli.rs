//! `vicugna serve` as a user runs it: one command starts controller, worker and
//! API, prints the URLs, answers, and stops cleanly on SIGTERM while a request
//! is in flight. Needs the `vicugna` binary beside this test binary (built by
//! `cargo test --workspace`); outside CI the test skips without it.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

#[test]
fn vicugna_serve_prints_urls_answers_and_stops_on_sigterm() {
    let Some(bin) = vicugna_bin() else { return };
    model_path();
    let mut child = Command::new(bin)
        .args(["serve", "--port", "0", "--controller-port", "0", "--worker-port", "0"])
        .args(["--grace-seconds", "20"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut lines = Vec::new();
    let t0 = Instant::now();
    let api = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("vicugna serve printed no API URL");
        lines.push(line.clone());
        if let Some(rest) = line.trim().strip_prefix("API:") {
            break rest
                .split_whitespace()
                .next()
                .unwrap()
                .trim_end_matches("/v1")
                .to_string();
        }
        assert!(t0.elapsed() < Duration::from_secs(60));
    };
    for _ in 0..3 {
        lines.push(rx.recv_timeout(Duration::from_secs(10)).unwrap());
    }
    let all = lines.join("\n");
    assert!(all.contains("controller: http://127.0.0.1:"), "{all}");
    assert!(all.contains("worker:     http://127.0.0.1:"), "{all}");

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let model = {
            let mut found = None;
            for _ in 0..100 {
                if let Ok(r) = http().get(format!("{api}/v1/models")).send().await {
                    let v: serde_json::Value = r.json().await.unwrap();
                    if let Some(id) = v["data"][0]["id"].as_str() {
                        found = Some(id.to_string());
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            found.expect("the model was never listed")
        };
        let (s, r) = post(
            &format!("{api}/v1/chat/completions"),
            &json!({"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}),
        )
        .await;
        assert_eq!(s, 200, "{r}");

        // SIGTERM during a stream: the stream still ends properly, then the process exits.
        let body =
            json!({"model": model, "prompt": "Once upon a time", "max_tokens": 48, "stream": true, "ignore_eos": true});
        let pending = tokio::spawn({
            let url = format!("{api}/v1/completions");
            async move { http().post(url).json(&body).send().await.unwrap().text().await.unwrap() }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let pid = child.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        let text = tokio::time::timeout(Duration::from_secs(60), pending)
            .await
            .unwrap()
            .unwrap();
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    });
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("vicugna serve did not exit after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status}");
    let rest: Vec<String> = rx.try_iter().collect();
    assert!(rest.iter().any(|l| l.contains("stopped")), "{rest:?}");
}
