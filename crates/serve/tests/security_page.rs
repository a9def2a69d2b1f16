//! The page's API attacked as a script would (issue 23): forwarded-for
//! headers from a client that is not a trusted proxy, model names leaking out
//! of the anonymous arena before the vote, scripted votes from one address,
//! and long system messages. A real controller, worker and gateway on
//! loopback, the default model served under two names.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use vicugna_serve::leaderboard;
use vicugna_serve::web::IpNet;
use vicugna_serve::WebOptions;

const NAMES: [&str; 2] = ["smol-a", "smol-b"];

/// A controller, a worker serving the default model as smol-a and smol-b,
/// and a gateway serving the page with `web`; stopped when dropped.
struct Page {
    api: String,
    _triggers: Vec<vicugna_serve::ShutdownTrigger>,
}

impl Page {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.api)
    }
}

async fn page_cluster(web: WebOptions) -> Page {
    let (c, tc) = controller(vicugna_serve::ControllerOptions::default()).await;
    let (_, _, tw) = worker(&c, |w| w.model_names = NAMES.iter().map(|s| s.to_string()).collect()).await;
    let (api, tg) = gateway(&c, |g| g.web = web).await;
    for name in NAMES {
        wait_for_model(&c, name, Duration::from_secs(20)).await;
    }
    Page {
        api,
        _triggers: vec![tc, tw, tg],
    }
}

fn log_dir(what: &str) -> PathBuf {
    let d = target_dir().join(format!("security-page-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn rows(dir: &Path) -> Vec<Value> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
        out.extend(text.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()));
    }
    out
}

async fn session(c: &Page, body: Value) -> String {
    let (s, r) = post(&c.url("/api/session"), &body).await;
    assert_eq!(s, 200, "{r}");
    r["session_id"].as_str().unwrap().to_string()
}

/// One `/api/chat` call with extra headers: the status and the whole body.
async fn chat(c: &Page, body: Value, headers: &[(&str, String)]) -> (u16, String) {
    let mut req = http().post(c.url("/api/chat")).json(&body);
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.text().await.unwrap())
}

fn ask(sid: &str, side: usize, text: &str) -> Value {
    json!({"session_id": sid, "side": side, "max_tokens": 2, "temperature": 0,
           "messages": [{"role": "user", "content": text}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forwarded_for_counts_only_from_a_trusted_proxy() {
    // Untrusted: rotating X-Forwarded-For (and friends) from loopback is one
    // address, rate limited after the limit, and logged as the peer.
    let dir = log_dir("xff");
    let c = page_cluster(WebOptions {
        rate_limit_per_minute: 3,
        log_dir: Some(dir.clone()),
        ..WebOptions::default()
    })
    .await;
    let sid = session(&c, json!({"mode": "chat", "models": ["smol-a"]})).await;
    let mut statuses = Vec::new();
    let mut refusal = String::new();
    for i in 0..6 {
        let spoof = format!("203.0.113.{i}");
        let headers = [
            ("x-forwarded-for", spoof.clone()),
            ("cf-connecting-ip", spoof.clone()),
            ("x-real-ip", spoof.clone()),
            ("forwarded", format!("for={spoof}")),
        ];
        let (s, body) = chat(&c, ask(&sid, 0, "Hi"), &headers).await;
        statuses.push(s);
        if s == 429 {
            refusal = body;
        }
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429, 429]);
    assert!(
        refusal.contains("the limit is 3 per minute from one address"),
        "{refusal}"
    );
    let chats: Vec<Value> = rows(&dir).into_iter().filter(|r| r["type"] == "chat").collect();
    assert_eq!(chats.len(), 3);
    assert!(chats.iter().all(|r| r["ip"] == "127.0.0.1"), "{chats:?}");

    // Trusted: the peer (loopback) is the operator's proxy, so the header's
    // address is the client: rotating ones are separate clients, one
    // repeated address is limited.
    let dir2 = log_dir("xff-trusted");
    let t = page_cluster(WebOptions {
        rate_limit_per_minute: 3,
        log_dir: Some(dir2.clone()),
        trusted_proxies: vec!["127.0.0.0/8".parse::<IpNet>().unwrap()],
        ..WebOptions::default()
    })
    .await;
    let sid = session(&t, json!({"mode": "chat", "models": ["smol-a"]})).await;
    for i in 0..5 {
        let (s, body) = chat(
            &t,
            ask(&sid, 0, "Hi"),
            &[("x-forwarded-for", format!("198.51.100.{i}"))],
        )
        .await;
        assert_eq!(s, 200, "{body}");
    }
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let (s, _) = chat(&t, ask(&sid, 0, "Hi"), &[("x-forwarded-for", "192.0.2.9".into())]).await;
        statuses.push(s);
    }
    assert_eq!(statuses, [200, 200, 200, 429]);
    let mut ips: Vec<String> = rows(&dir2)
        .iter()
        .filter(|r| r["type"] == "chat")
        .map(|r| r["ip"].as_str().unwrap().to_string())
        .collect();
    ips.sort();
    ips.dedup();
    assert!(ips.contains(&"198.51.100.4".to_string()) && ips.contains(&"192.0.2.9".to_string()));
    assert!(!ips.contains(&"127.0.0.1".to_string()), "{ips:?}");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&dir2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn arena_names_stay_hidden_until_the_vote() {
    let c = page_cluster(WebOptions {
        rate_limit_per_minute: 0,
        ..WebOptions::default()
    })
    .await;
    let (s, r) = post(&c.url("/api/session"), &json!({"mode": "arena"})).await;
    assert_eq!(s, 200);
    assert!(r["models"].is_null(), "{r}");
    let sid = r["session_id"].as_str().unwrap().to_string();
    for (side, alias) in ["model A", "model B"].iter().enumerate() {
        let (s, body) = chat(&c, ask(&sid, side, "Name a fruit."), &[]).await;
        assert_eq!(s, 200, "{body}");
        for name in NAMES {
            assert!(!body.contains(name), "side {side} named {name} before the vote: {body}");
        }
        let events = parse_sse(&body);
        let chunks: Vec<&Value> = events.iter().filter(|e| e.is_object()).collect();
        assert!(!chunks.is_empty(), "{body}");
        assert!(chunks.iter().all(|e| e["model"] == *alias), "{body}");
        assert_eq!(events.last().unwrap(), "[DONE]");
    }
    // Errors do not name the model either (the context error names the
    // model it measured).
    let mut big = ask(&sid, 0, "Hi");
    big["max_tokens"] = json!(10_000_000);
    let (s, body) = chat(&c, big, &[]).await;
    assert_eq!(s, 400, "{body}");
    assert!(NAMES.iter().all(|n| !body.contains(n)), "{body}");

    let (s, r) = post(&c.url("/api/vote"), &json!({"session_id": sid, "type": "leftvote"})).await;
    assert_eq!(s, 200, "{r}");
    let mut revealed: Vec<String> = r["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap().into())
        .collect();
    revealed.sort();
    assert_eq!(revealed, NAMES);
    // One vote per battle.
    let (s, r) = post(&c.url("/api/vote"), &json!({"session_id": sid, "type": "rightvote"})).await;
    assert_eq!(s, 400, "{r}");
    assert!(r["error"]["message"].as_str().unwrap().contains("already voted"), "{r}");
    let (s, body) = chat(&c, ask(&sid, 0, "More?"), &[]).await;
    assert_eq!(s, 400);
    assert!(body.contains("This battle is over"), "{body}");
}

/// One anonymous round from this address: a session, both answers, a vote.
async fn round(c: &Page) -> (u16, Value) {
    let sid = session(c, json!({"mode": "arena"})).await;
    for side in 0..2 {
        let (s, body) = chat(c, ask(&sid, side, "Pick a colour."), &[]).await;
        assert_eq!(s, 200, "{body}");
    }
    post(&c.url("/api/vote"), &json!({"session_id": sid, "type": "leftvote"})).await
}

async fn board(c: &Page) -> Value {
    http()
        .get(c.url("/api/leaderboard"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scripted_votes_from_one_address_are_refused_and_not_rated() {
    let dir = log_dir("votes");
    let c = page_cluster(WebOptions {
        rate_limit_per_minute: 0,
        vote_limit_per_hour: 3,
        log_dir: Some(dir.clone()),
        ..WebOptions::default()
    })
    .await;
    for i in 0..3 {
        let (s, r) = round(&c).await;
        assert_eq!(s, 200, "vote {i}: {r}");
    }
    let b = board(&c).await;
    assert_eq!(b["battles"], 3, "{b}");
    assert_ne!(b["rows"][0]["rating"], 1000.0, "{b}");

    let (s, r) = round(&c).await;
    assert_eq!(s, 429, "{r}");
    let msg = r["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("Too many votes: the limit is 3 per hour from one address"),
        "{msg}"
    );
    assert!(msg.contains("left out of the leaderboard"), "{msg}");
    // The refused vote did not count, and the address's earlier ones no
    // longer move the ratings.
    let b = board(&c).await;
    assert_eq!(b["battles"], 0, "{b}");
    assert_eq!(b["rows"], json!([]), "{b}");

    // The log: three votes, one flag, and `vicugna leaderboard`'s reading of
    // it leaves them out unless asked.
    let all = rows(&dir);
    assert_eq!(all.iter().filter(|r| r["type"] == "leftvote").count(), 3);
    let flags: Vec<&Value> = all.iter().filter(|r| r["type"] == leaderboard::FLAG_ROW).collect();
    assert_eq!(flags.len(), 1);
    assert_eq!(flags[0]["ip"], "127.0.0.1");
    let log = leaderboard::read_battles(&dir).unwrap();
    assert_eq!(leaderboard::counted(&log.battles, &log.flagged, false, false).len(), 0);
    assert_eq!(leaderboard::counted(&log.battles, &log.flagged, false, true).len(), 3);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_length_limit_covers_every_role() {
    let c = page_cluster(WebOptions {
        max_input_chars: 50,
        ..WebOptions::default()
    })
    .await;
    let sid = session(&c, json!({"mode": "chat", "models": ["smol-a"]})).await;
    let long = "s".repeat(51);
    for (role, at) in [("system", 0), ("assistant", 1)] {
        let mut messages = vec![json!({"role": "user", "content": "Hi"})];
        messages.insert(at, json!({"role": role, "content": long}));
        if role == "assistant" {
            messages.push(json!({"role": "user", "content": "And?"}));
        }
        let (s, r) = post(&c.url("/api/chat"), &json!({"session_id": sid, "messages": messages})).await;
        assert_eq!(s, 400, "{role}: {r}");
        let msg = r["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains(&format!(
                "messages[{at}] ({role}) is 51 characters long; the limit is 50"
            )),
            "{msg}"
        );
    }
    let (s, r) = post(
        &c.url("/api/chat"),
        &json!({"session_id": sid, "messages": [{"role": "user", "content": long}]}),
    )
    .await;
    assert_eq!(s, 400);
    assert!(
        r["error"]["message"].as_str().unwrap().contains("the limit is 50"),
        "{r}"
    );
}
