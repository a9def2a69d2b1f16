//! The web page in a real headless Chromium (Debian's `chromium`, driven by
//! `playwright-core` from tests/web/page.mjs) against a real `vicugna serve`
//! with the default model served under two names: a chat message gets a
//! streamed answer, an arena round with a vote is logged in the day's JSONL
//! file and changes the leaderboard, and the limits show their messages. The
//! server has `--api-keys`: the page asks for the key and sends it on /api/*.
//! Screenshots go to target/web-screenshots. Outside CI the test skips when
//! chromium, node or the `vicugna` binary is missing; with CI=true it fails.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// A tool the test needs, or why it is missing (a failure in CI, a skip elsewhere).
fn need(what: Result<PathBuf, String>) -> Option<PathBuf> {
    match what {
        Ok(p) => Some(p),
        Err(m) if in_ci() => panic!("{m}"),
        Err(m) => {
            eprintln!("skipping: {m}");
            None
        }
    }
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

fn chromium() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("CHROMIUM") {
        return Ok(PathBuf::from(p));
    }
    on_path("chromium")
        .or_else(|| on_path("chromium-browser"))
        .ok_or_else(|| "chromium is not installed (apt-get install chromium) and $CHROMIUM is not set".to_string())
}

/// tests/web with its node_modules (`npm ci` on first use).
fn web_test_dir() -> Result<PathBuf, String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/web");
    on_path("node").ok_or("node is not installed (apt-get install nodejs npm)")?;
    if !dir.join("node_modules/playwright-core/package.json").exists() {
        let ok = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Err(format!("`npm ci` in {} failed", dir.display()));
        }
    }
    Ok(dir)
}

fn vicugna_bin() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let bin = exe.parent().and_then(Path::parent).map(|d| d.join("vicugna"));
    match bin {
        Some(b) if b.exists() => Ok(b),
        _ => Err("the vicugna binary is missing beside the tests (cargo build -p vicugna-cli)".into()),
    }
}

/// `vicugna serve`, killed when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `vicugna serve` and returns it with the page's URL.
fn serve(bin: &Path, log_dir: &Path) -> (Server, String) {
    let mut child = Command::new(bin)
        .args(["serve", "--port", "0", "--controller-port", "0", "--worker-port", "0"])
        .args(["--model", "default", "--model-names", "smol-a,smol-b"])
        .arg("--log-dir")
        .arg(log_dir)
        .args(["--max-input-chars", "500", "--max-turns", "50", "--rate-limit", "8"])
        // The API needs a key; the page asks for it.
        .args(["--api-keys", KEY])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let server = Server(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let t0 = Instant::now();
    let url = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("vicugna serve printed no web page URL");
        if let Some(rest) = line.trim().strip_prefix("web page:") {
            break rest.trim().trim_end_matches('/').to_string();
        }
        assert!(t0.elapsed() < Duration::from_secs(120));
    };
    (server, url)
}

const KEY: &str = "test-key";

/// A JSON POST to /api/* with the key.
async fn post(url: &str, body: &Value) -> (u16, Value) {
    let r = http().post(url).bearer_auth(KEY).json(body).send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

fn log_rows(dir: &Path) -> Vec<Value> {
    let mut rows = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    for f in files {
        let name = f.file_name().unwrap().to_str().unwrap().to_string();
        assert!(
            name.ends_with("-conv.json"),
            "unexpected file {name} in the log directory"
        );
        let text = std::fs::read_to_string(&f).unwrap();
        assert!(text.is_empty() || text.ends_with('\n'), "{name} ends mid-row");
        for line in text.lines() {
            rows.push(serde_json::from_str(line).unwrap_or_else(|e| panic!("{name}: {e}: {line}")));
        }
    }
    rows
}

fn ratings(rows: &Value) -> Vec<(String, f64)> {
    rows.as_array()
        .unwrap()
        .iter()
        .map(|r| (r["model"].as_str().unwrap().to_string(), r["rating"].as_f64().unwrap()))
        .collect()
}

#[test]
fn chat_arena_vote_and_leaderboard_in_chromium() {
    let Some(chromium) = need(chromium()) else { return };
    let Some(web_dir) = need(web_test_dir()) else { return };
    let Some(bin) = need(vicugna_bin()) else { return };
    model_path();
    let log_dir = target_dir().join(format!("web-test-logs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&log_dir);
    let shots = target_dir().join("web-screenshots");
    let _ = std::fs::remove_dir_all(&shots);
    let (_server, url) = serve(&bin, &log_dir);

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        eventually(Duration::from_secs(60), "both names are served", || async {
            let Ok(r) = http().get(format!("{url}/api/models")).bearer_auth(KEY).send().await else {
                return false;
            };
            let v: Value = r.json().await.unwrap_or_default();
            v["models"].as_array().is_some_and(|d| d.len() == 2)
        })
        .await;
        let r = http().get(format!("{url}/v1/models")).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 401);
        // The page is the gateway's own, with no outside resources.
        let html = http()
            .get(format!("{url}/"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(html.contains("/static/app.js") && !html.contains("http://") && !html.contains("https://"));

        // The server's own limit checks (the page checks too, before sending).
        let (s, sess) = post(
            &format!("{url}/api/session"),
            &json!({"mode": "chat", "models": ["smol-a"]}),
        )
        .await;
        assert_eq!(s, 200, "{sess}");
        let sid = sess["session_id"].as_str().unwrap();
        let long = "y".repeat(501);
        let (s, r) = post(
            &format!("{url}/api/chat"),
            &json!({"session_id": sid, "messages": [{"role": "user", "content": long}]}),
        )
        .await;
        assert_eq!(s, 400, "{r}");
        assert!(
            r["error"]["message"].as_str().unwrap().contains("the limit is 500"),
            "{r}"
        );
        let mut many = Vec::new();
        for i in 0..51 {
            many.push(json!({"role": "user", "content": format!("q{i}")}));
            if i < 50 {
                many.push(json!({"role": "assistant", "content": "a"}));
            }
        }
        let (s, r) = post(
            &format!("{url}/api/chat"),
            &json!({"session_id": sid, "messages": many}),
        )
        .await;
        assert_eq!(s, 400, "{r}");
        assert!(
            r["error"]["message"].as_str().unwrap().contains("limit of 50 turns"),
            "{r}"
        );
        let (s, r) = post(
            &format!("{url}/api/vote"),
            &json!({"session_id": sid, "type": "upvote"}),
        )
        .await;
        assert_eq!(s, 400, "{r}");
        assert!(
            r["error"]["message"].as_str().unwrap().contains("no answer to vote on"),
            "{r}"
        );
    });

    let out = Command::new("node")
        .arg(web_dir.join("page.mjs"))
        .arg(&url)
        .arg(&shots)
        .env("CHROMIUM", &chromium)
        .env("API_KEY", KEY)
        .current_dir(&web_dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the browser script failed: {stderr}");
    let seen: Value = serde_json::from_slice(out.stdout.trim_ascii()).unwrap_or_else(|e| {
        panic!("{e}: {}\n{stderr}", String::from_utf8_lossy(&out.stdout));
    });
    eprintln!("seen in the browser: {seen:#}");

    // The key: asked for, a wrong one refused with the server's reason, the
    // right one kept in the browser and sent on every /api call after.
    assert!(
        seen["key_prompt"]
            .as_str()
            .unwrap()
            .contains("This server needs an API key"),
        "{seen}"
    );
    assert_eq!(seen["models_without_key"], 0);
    assert!(
        seen["wrong_key_notice"]
            .as_str()
            .unwrap()
            .contains("the API key is not valid"),
        "{seen}"
    );
    assert_eq!(seen["key_bar_hidden"], true);
    assert_eq!(seen["key_stored"], KEY);
    assert_eq!(seen["api_calls_without_key_after_entry"], 0);

    let html = seen["rendered_untrusted"].as_str().unwrap();
    assert!(html.contains("<strong>bold</strong>"), "{html}");
    assert!(!html.contains("<img") && html.contains("&lt;img"), "{html}");
    assert!(!html.contains("javascript:"), "{html}");
    let tc = &seen["rendered_tool_calls"];
    assert!(tc["head"].as_str().unwrap().contains("get_weather"), "{tc}");
    assert_eq!(tc["args"], "{\n  \"city\": \"<b>Paris</b>\",\n  \"days\": 2\n}", "{tc}");
    assert!(!tc["html"].as_str().unwrap().contains("<b>"), "{tc}");
    assert!(tc["tool"].as_str().unwrap().contains("\"temp_c\": 21"), "{tc}");

    // Chat: the answer arrived in pieces and was rendered as markdown.
    assert_eq!(seen["models"], json!(["smol-a", "smol-b"]));
    let lengths = seen["stream_lengths"].as_array().unwrap();
    assert!(lengths.len() >= 3, "the answer did not stream: {lengths:?}");
    assert!(!seen["chat_answer"].as_str().unwrap().trim().is_empty());
    assert_eq!(seen["chat_has_markdown"], json!(true));
    assert_eq!(seen["chat_bubbles_after_regen"], json!(["user", "assistant"]));
    assert!(seen["upvote_notice"].as_str().unwrap().contains("upvote"));
    assert!(
        seen["input_limit_notice"]
            .as_str()
            .unwrap()
            .contains("the limit is 500"),
        "{seen}"
    );
    assert!(seen["rate_limit_notice"]
        .as_str()
        .unwrap()
        .contains("Too many messages: the limit is 8 per minute"));

    // Arena: names hidden until the vote, then revealed (two different models).
    assert_eq!(seen["names_before_vote"], json!(["Model A", "Model B"]));
    let revealed: Vec<String> = seen["names_after_vote"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().split(": ").nth(1).unwrap().to_string())
        .collect();
    let mut pair = revealed.clone();
    pair.sort();
    assert_eq!(pair, ["smol-a", "smol-b"]);
    assert_eq!(seen["arena_input_disabled_after_vote"], json!(true));
    for a in seen["arena_answers"].as_array().unwrap() {
        assert!(!a.as_str().unwrap().trim().is_empty());
    }

    // Stop kept the part of the answer that had arrived.
    let stopped = seen["stopped_answer"].as_str().unwrap();
    assert!(stopped.len() > 20 && stopped.ends_with("(stopped)"), "{seen}");
    // Side by side: the picked models, voting does not end the conversation.
    assert_eq!(seen["named_models"], json!(["smol-a", "smol-b"]));
    assert!(seen["named_notice"].as_str().unwrap().contains("recorded"));
    assert_eq!(seen["named_input_disabled_after_vote"], json!(false));

    // The log: chat rows for the first answer and its regeneration, the
    // upvote, and the arena vote with both states, in FastChat's layout.
    let rows = log_rows(&log_dir);
    let question = "Write a Python function that adds two numbers, in a code block.";
    let chats: Vec<&Value> = rows
        .iter()
        .filter(|r| {
            r["type"] == "chat"
                && r["state"]["messages"][0][1] == question
                && r["state"]["messages"].as_array().unwrap().len() == 2
        })
        .collect();
    assert_eq!(chats.len(), 2, "{rows:#?}");
    for c in &chats {
        assert_eq!(c["model"], "smol-a");
        assert_eq!(c["ip"], "127.0.0.1");
        assert_eq!(c["gen_params"]["max_new_tokens"], 48);
        assert!(c["tstamp"].as_f64().unwrap() >= c["start"].as_f64().unwrap());
        let msgs = c["state"]["messages"].as_array().unwrap();
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[1][0], "assistant");
        assert!(!msgs[1][1].as_str().unwrap().is_empty());
    }
    let stop_rows: Vec<&Value> = rows
        .iter()
        .filter(|r| r["type"] == "chat" && r["finish_reason"] == "stopped_by_user")
        .collect();
    assert_eq!(stop_rows.len(), 1, "{rows:#?}");
    let msgs = stop_rows[0]["state"]["messages"].as_array().unwrap();
    assert_eq!(msgs[2][1], "Tell me a long story about a llama who learns to code.");
    assert!(msgs[3][1].as_str().unwrap().len() > 20);
    let up: Vec<&Value> = rows.iter().filter(|r| r["type"] == "upvote").collect();
    assert_eq!(up.len(), 1);
    // The vote is on the regenerated answer, the last one shown.
    assert_eq!(up[0]["state"], chats[1]["state"]);
    let votes: Vec<&Value> = rows.iter().filter(|r| r["type"] == "leftvote").collect();
    assert_eq!(votes.len(), 1, "{rows:#?}");
    let v = votes[0];
    assert_eq!(v["models"], json!(["", ""]));
    for (side, name) in revealed.iter().enumerate() {
        let st = &v["states"][side];
        assert_eq!(st["model_name"], json!(name));
        assert_eq!(st["messages"][0], json!(["user", "Name a fruit that is yellow."]));
        assert_eq!(st["messages"][1][0], "assistant");
    }

    let ties: Vec<&Value> = rows.iter().filter(|r| r["type"] == "tievote").collect();
    assert_eq!(ties.len(), 1, "{rows:#?}");
    assert_eq!(ties[0]["models"], json!(["smol-a", "smol-b"]));
    assert_eq!(ties[0]["states"][1]["model_name"], "smol-b");

    // The leaderboard: Model A won the one vote, on the page, from the API
    // and from `vicugna leaderboard` reading the same logs.
    let page_rows: Vec<(String, String, String)> = seen["leaderboard"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r[1].as_str().unwrap().to_string(),
                r[2].as_str().unwrap().to_string(),
                r[4].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        page_rows,
        [
            (revealed[0].clone(), "1002.0".into(), "1".into()),
            (revealed[1].clone(), "998.0".into(), "1".into())
        ]
    );
    assert_eq!(seen["matrix_cells"], json!(["–", "1.00", "0.00", "–"]));
    let api: Value = rt.block_on(async {
        http()
            .get(format!("{url}/api/leaderboard"))
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    });
    let cli = |extra: &[&str]| -> Value {
        let out = Command::new(&bin)
            .args(["leaderboard", "--json", "--logs"])
            .arg(&log_dir)
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    // Only the anonymous vote is rated; the named tie counts on request.
    let anony = cli(&[]);
    assert_eq!(anony["battles"], 1);
    assert_eq!(ratings(&api["rows"]), ratings(&anony["rows"]));
    assert_eq!(api["win_fraction"], anony["win_fraction"]);
    assert_eq!(
        ratings(&anony["rows"]),
        [(revealed[0].clone(), 1002.0), (revealed[1].clone(), 998.0)]
    );
    let all = cli(&["--include-named"]);
    assert_eq!(all["battles"], 2);
    assert_ne!(ratings(&all["rows"])[0].1, 1002.0, "the tie moved the ratings");

    for name in [
        "0-key-prompt.png",
        "1-chat.png",
        "2-chat-stopped.png",
        "3-chat-limit.png",
        "4-arena-before-vote.png",
        "5-arena-after-vote.png",
        "6-leaderboard.png",
        "7-side-by-side.png",
        "8-rate-limit.png",
    ] {
        let len = std::fs::metadata(shots.join(name)).map(|m| m.len()).unwrap_or(0);
        assert!(len > 10_000, "screenshot {name} missing or empty");
    }
    let _ = std::fs::remove_dir_all(&log_dir);
}

#[test]
fn unusable_log_dir_and_missing_logs_are_clear_errors() {
    let Some(bin) = need(vicugna_bin()) else { return };
    let out = Command::new(&bin)
        .args(["serve", "--port", "0", "--controller-port", "0", "--worker-port", "0"])
        .args(["--log-dir", "/dev/null/logs"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot create log directory /dev/null/logs"), "{err}");

    let out = Command::new(&bin)
        .args(["leaderboard", "--logs", "/nonexistent/vicugna-logs"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("log directory /nonexistent/vicugna-logs"), "{err}");

    let empty = target_dir().join(format!("web-empty-logs-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let out = Command::new(&bin)
        .args(["leaderboard", "--logs"])
        .arg(&empty)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&empty);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no log files (*-conv.json)"), "{err}");
}

#[test]
fn leaderboard_leaves_out_flagged_addresses() {
    let Some(bin) = need(vicugna_bin()) else { return };
    let dir = target_dir().join(format!("web-flagged-logs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let vote = |t: f64, ip: &str, kind: &str| {
        json!({"tstamp": t, "type": kind, "models": ["", ""],
            "states": [{"model_name": "a"}, {"model_name": "b"}], "ip": ip})
    };
    let rows = [
        vote(1.0, "198.51.100.7", "leftvote"),
        vote(2.0, "203.0.113.9", "rightvote"),
        vote(3.0, "203.0.113.9", "rightvote"),
        json!({"tstamp": 4.0, "type": "flagged_address", "ip": "203.0.113.9", "reason": "more than 2 votes in an hour"}),
    ];
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(dir.join("2026-01-01-conv.json"), text).unwrap();
    let run = |extra: &[&str]| {
        let out = Command::new(&bin)
            .args(["leaderboard", "--json", "--logs"])
            .arg(&dir)
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        (v, String::from_utf8_lossy(&out.stderr).to_string())
    };
    let (default, note) = run(&[]);
    assert_eq!(default["battles"], 1);
    assert!(
        note.contains("left out 2 vote(s) from 1 flagged address(es); --include-flagged counts them"),
        "{note}"
    );
    assert_eq!(run(&["--exclude-flagged"]).0["battles"], 1);
    assert_eq!(run(&["--include-flagged"]).0["battles"], 3);
    let _ = std::fs::remove_dir_all(&dir);
}
