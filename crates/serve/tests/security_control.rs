//! The control plane and the API's HTTP surface under attack, over real
//! sockets on loopback: hijacking the traffic with a fake worker, unsafe worker
//! URLs, the worker port used directly, browser cross-origin requests, keys on
//! every API, 405s, busy answers and slow-header connections.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use serde_json::{json, Value};
use vicugna_serve::ControllerOptions;

const LIMIT: Duration = Duration::from_secs(180);

async fn within<F: std::future::Future<Output = ()>>(f: F) {
    tokio::time::timeout(LIMIT, f).await.expect("the test took too long");
}

/// A fake worker: counts the calls it gets and answers every generation with
/// "HIJACKED". Returns its URL and the call counter.
async fn fake_worker(model: &str) -> (String, Arc<AtomicUsize>) {
    use axum::routing::post as route_post;
    use axum::{Json, Router};
    let calls = Arc::new(AtomicUsize::new(0));
    let model = model.to_string();
    let c = calls.clone();
    let app = Router::new()
        .route(
            "/worker_get_conv_template",
            route_post(|| async { Json(json!({"renders_messages": true})) }),
        )
        .route(
            "/model_details",
            route_post(|| async { Json(json!({"context_length": 2048})) }),
        )
        .route(
            "/worker_get_status",
            route_post(move || {
                let m = model.clone();
                async move { Json(json!({"model_names": [m], "speed": 1e6, "queue_length": 0})) }
            }),
        )
        .route(
            "/worker_generate_stream",
            route_post(move || {
                c.fetch_add(1, Ordering::SeqCst);
                async move {
                    let mut out =
                        serde_json::to_vec(&json!({"text": "HIJACKED", "error_code": 0, "finish_reason": "stop",
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}))
                        .unwrap();
                    out.push(0);
                    out
                }
            }),
        );
    let (l, url) = bind().await;
    tokio::spawn(async move { axum::serve(l, app).await });
    (url, calls)
}

/// Kills the child process when dropped (also on panic).
struct Reaper(std::process::Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `vicugna serve` with `args` on free ports; returns (API, controller, worker) URLs.
fn start_serve(bin: &std::path::Path, args: &[&str]) -> (Reaper, String, String, String) {
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
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let child = Reaper(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let (mut api, mut ctl, mut wrk) = (None, None, None);
    let t0 = Instant::now();
    while api.is_none() || ctl.is_none() || wrk.is_none() {
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("vicugna serve printed its URLs");
        let url = |rest: &str| {
            rest.split_whitespace()
                .next()
                .unwrap()
                .trim_end_matches("/v1")
                .to_string()
        };
        let line = line.trim();
        if let Some(r) = line.strip_prefix("API:") {
            api = Some(url(r));
        } else if let Some(r) = line.strip_prefix("controller:") {
            ctl = Some(url(r));
        } else if let Some(r) = line.strip_prefix("worker:") {
            wrk = Some(url(r));
        }
        assert!(t0.elapsed() < Duration::from_secs(120));
    }
    (child, api.unwrap(), ctl.unwrap(), wrk.unwrap())
}

/// The `error.message` of an OpenAI-style error body.
fn message(v: &Value) -> &str {
    v["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no error message in {v}"))
}

#[test]
fn unsigned_register_is_refused_and_traffic_stays_on_the_real_worker() {
    let Some(bin) = vicugna_bin() else { return };
    model_path();
    let (_child, api, ctl, _wrk) = start_serve(&bin, &["--api-keys", "k1"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(within(async {
        let model = model_name();
        let key = |r: reqwest::RequestBuilder| r.bearer_auth("k1");
        eventually(Duration::from_secs(60), "the model to be listed", || async {
            let r = key(http().get(format!("{api}/v1/models"))).send().await;
            match r {
                Ok(r) => r
                    .json::<Value>()
                    .await
                    .is_ok_and(|v| v["data"][0]["id"] == model.as_str()),
                Err(_) => false,
            }
        })
        .await;
        let (fake, calls) = fake_worker(&model).await;
        let hijack = json!({"worker_name": fake, "check_heart_beat": false,
            "worker_status": {"model_names": [model], "speed": 1000000, "queue_length": 0}});

        // The probe of the issue: no secret, as JSON and as a browser's text/plain.
        let r = http()
            .post(format!("{ctl}/register_worker"))
            .json(&hijack)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        let e: Value = r.json().await.unwrap();
        assert!(message(&e).contains("control secret"), "{e}");
        let r = http()
            .post(format!("{ctl}/register_worker"))
            .header("content-type", "text/plain")
            .body(hijack.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        // A guessed secret does no better.
        let r = http()
            .post(format!("{ctl}/register_worker"))
            .bearer_auth("k1")
            .json(&hijack)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        let e: Value = r.json().await.unwrap();
        assert!(message(&e).contains("not valid"), "{e}");

        // Key-holding clients still reach the real worker, and the fake hears nothing.
        for _ in 0..3 {
            let r = key(http().post(format!("{api}/v1/chat/completions")))
                .json(&json!({"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let v: Value = r.json().await.unwrap();
            assert_ne!(v["choices"][0]["message"]["content"], "HIJACKED", "{v}");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 0, "the fake worker got traffic");
    }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn registration_needs_json_and_an_allowed_http_url() {
    within(async {
        let (ctl, _tc) = controller(ControllerOptions {
            heart_beat_expiration: Duration::from_millis(900),
            ..ControllerOptions::default()
        })
        .await;
        let reg = |url: &str| {
            json!({"worker_name": url, "check_heart_beat": true,
                   "worker_status": {"model_names": ["m"], "speed": 1, "queue_length": 0}})
        };

        // With the secret but as text/plain (a form or a browser's simple request): 415.
        let r = control_http()
            .post(format!("{ctl}/register_worker"))
            .header("content-type", "text/plain")
            .body(reg("http://127.0.0.1:9").to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 415);
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["code"], "unsupported_media_type", "{e}");
        assert!(message(&e).contains("application/json"), "{e}");

        for (url, why) in [
            ("file:///etc/passwd", "scheme"),
            ("http://169.254.169.254/latest/meta-data", "link-local"),
            ("http://10.20.30.40:21002", "not in --allow-worker-hosts"),
            ("http://example.com:21002", "not in --allow-worker-hosts"),
        ] {
            let (s, e) = ctl_post(&format!("{ctl}/register_worker"), &reg(url)).await;
            assert_eq!(s, 403, "{url}: {e}");
            let m = message(&e);
            assert!(
                m.contains(url) && m.contains("--allow-worker-hosts") && m.contains(why),
                "{url}: {m}"
            );
        }
        let (_, m) = ctl_post(&format!("{ctl}/list_models"), &json!({})).await;
        assert_eq!(m, json!({"models": []}), "nothing was registered");

        // check_heart_beat: false does not make a registration immortal.
        let (fake, _) = fake_worker("m").await;
        let (s, _) = ctl_post(
            &format!("{ctl}/register_worker"),
            &json!({"worker_name": fake, "check_heart_beat": false,
                    "worker_status": {"model_names": ["m"], "speed": 1, "queue_length": 0}}),
        )
        .await;
        assert_eq!(s, 200);
        let (_, m) = ctl_post(&format!("{ctl}/list_models"), &json!({})).await;
        assert_eq!(m, json!({"models": ["m"]}));
        eventually(Duration::from_secs(10), "the silent worker to expire", || async {
            let (_, m) = ctl_post(&format!("{ctl}/list_models"), &json!({})).await;
            m == json!({"models": []})
        })
        .await;

        // Every other endpoint wants the secret too.
        for path in [
            "/list_models",
            "/get_worker_address",
            "/receive_heart_beat",
            "/worker_get_status",
        ] {
            let r = http()
                .post(format!("{ctl}{path}"))
                .json(&json!({}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 401, "{path}");
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worker_port_needs_the_secret_and_keeps_the_limits() {
    within(async {
        let (ctl, _tc) = controller(ControllerOptions::default()).await;
        let (w, _wh, _tw) = worker(&ctl, |o| o.register = false).await;
        let model = model_name();
        let gen = json!({"model": model, "prompt": "Hello", "max_new_tokens": 4});

        for path in [
            "/worker_generate",
            "/worker_generate_stream",
            "/worker_get_embeddings",
            "/count_token",
        ] {
            let r = http().post(format!("{w}{path}")).json(&gen).send().await.unwrap();
            assert_eq!(r.status(), 401, "{path}");
            let e: Value = r.json().await.unwrap();
            assert!(message(&e).contains("control secret"), "{path}: {e}");
        }
        let r = http().get(format!("{w}/metrics")).send().await.unwrap();
        assert_eq!(r.status(), 401);

        // With the secret: 10^9 new tokens is refused, naming the field and the limit.
        let (s, c) = ctl_post(
            &format!("{w}/worker_generate"),
            &json!({"model": model, "prompt": "Hello", "max_new_tokens": 1_000_000_000}),
        )
        .await;
        assert_eq!(s, 200);
        assert_eq!(c["error_code"], 40302, "{c}");
        let text = c["text"].as_str().unwrap();
        assert!(text.contains("max_new_tokens must be at most 8192"), "{text}");
        let (_, c) = ctl_post(
            &format!("{w}/worker_generate"),
            &json!({"model": model, "prompt": "Hello", "max_new_tokens": 2, "logprobs": 1000}),
        )
        .await;
        assert_eq!(c["error_code"], 40302, "{c}");
        assert!(
            c["text"].as_str().unwrap().contains("logprobs must be at most 20"),
            "{c}"
        );
        // Within the limits it generates, the budget clipped to the context.
        let (_, c) = ctl_post(
            &format!("{w}/worker_generate"),
            &json!({"model": model, "prompt": "Hello", "max_new_tokens": 3, "echo": false}),
        )
        .await;
        assert_eq!(c["error_code"], 0, "{c}");
        assert!(c["usage"]["completion_tokens"].as_u64().unwrap() <= 3, "{c}");
        // text/plain bodies are refused here too.
        let r = control_http()
            .post(format!("{w}/worker_generate"))
            .header("content-type", "text/plain")
            .body(gen.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 415);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cors_is_off_by_default_and_open_to_listed_origins_only() {
    within(async {
        let c = Cluster::start(|_| {}).await;
        let (open, _tg) = gateway(&c.controller, |g| g.allow_origins = vec!["https://app.example".into()]).await;
        let get = |base: String, origin: &'static str| async move {
            http()
                .get(format!("{base}/v1/models"))
                .header("origin", origin)
                .send()
                .await
                .unwrap()
        };
        let preflight = |base: String, origin: &'static str| async move {
            http()
                .request(reqwest::Method::OPTIONS, format!("{base}/v1/chat/completions"))
                .header("origin", origin)
                .header("access-control-request-method", "POST")
                .header("access-control-request-headers", "content-type,authorization")
                .send()
                .await
                .unwrap()
        };
        // Default: no CORS headers for anyone, and no preflight approval.
        let r = get(c.api.clone(), "https://evil.example").await;
        assert_eq!(r.status(), 200);
        assert!(
            r.headers().get("access-control-allow-origin").is_none(),
            "{:?}",
            r.headers()
        );
        let r = preflight(c.api.clone(), "https://evil.example").await;
        assert!(
            r.headers().get("access-control-allow-origin").is_none(),
            "{:?}",
            r.headers()
        );
        let r = preflight(c.api.clone(), "https://app.example").await;
        assert!(r.headers().get("access-control-allow-origin").is_none());

        // --allow-origins https://app.example: that origin only.
        let r = get(open.clone(), "https://app.example").await;
        assert_eq!(r.headers()["access-control-allow-origin"], "https://app.example");
        let r = preflight(open.clone(), "https://app.example").await;
        assert!(r.status().is_success(), "{}", r.status());
        assert_eq!(r.headers()["access-control-allow-origin"], "https://app.example");
        let r = get(open.clone(), "https://evil.example").await;
        assert!(r.headers().get("access-control-allow-origin").is_none());
        let r = preflight(open.clone(), "https://evil.example").await;
        assert!(r.headers().get("access-control-allow-origin").is_none());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_keys_cover_the_pages_api_and_metrics() {
    within(async {
        let c = Cluster::start_with(|_| {}, |g| g.api_keys = Some(vec!["k1".into()])).await;
        let status = |url: String, key: Option<&'static str>| async move {
            let mut r = http().get(url);
            if let Some(k) = key {
                r = r.bearer_auth(k);
            }
            r.send().await.unwrap().status().as_u16()
        };
        for path in ["/api/models", "/api/config", "/metrics", "/v1/models"] {
            assert_eq!(status(c.url(path), None).await, 401, "{path}");
            assert_eq!(status(c.url(path), Some("nope")).await, 401, "{path}");
            assert_eq!(status(c.url(path), Some("k1")).await, 200, "{path}");
        }
        let r = http()
            .post(c.url("/api/chat"))
            .json(&json!({"messages": [{"role": "user", "content": "Hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["code"], "invalid_api_key", "{e}");
        // The page itself loads, so it can ask for the key; /health stays open.
        for path in ["/", "/static/app.js", "/static/style.css", "/health"] {
            assert_eq!(status(c.url(path), None).await, 200, "{path}");
        }

        // --public-page and --public-metrics open those two, not the API.
        let (open, _tg) = gateway(&c.controller, |g| {
            g.api_keys = Some(vec!["k1".into()]);
            g.public_page = true;
            g.public_metrics = true;
        })
        .await;
        assert_eq!(status(format!("{open}/api/models"), None).await, 200);
        assert_eq!(status(format!("{open}/metrics"), None).await, 200);
        assert_eq!(status(format!("{open}/v1/models"), None).await, 401);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn non_json_bodies_are_415_and_wrong_methods_405_with_a_json_body() {
    within(async {
        let c = Cluster::start(|_| {}).await;
        for path in ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/api/chat"] {
            for ct in ["text/plain", "application/x-www-form-urlencoded"] {
                let r = http()
                    .post(c.url(path))
                    .header("content-type", ct)
                    .body(c.chat_body("Hi", json!({"max_tokens": 2})).to_string())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 415, "{path} {ct}");
                let e: Value = r.json().await.unwrap();
                assert_eq!(e["error"]["type"], "invalid_request_error", "{e}");
                assert!(message(&e).contains("Content-Type: application/json"), "{e}");
            }
        }
        // With the JSON type the same body is served.
        let (s, r) = post(
            &c.url("/v1/chat/completions"),
            &c.chat_body("Hi", json!({"max_tokens": 2})),
        )
        .await;
        assert_eq!(s, 200, "{r}");

        for (url, method) in [
            (c.url("/v1/chat/completions"), reqwest::Method::GET),
            (c.url("/v1/models"), reqwest::Method::DELETE),
            (format!("{}/register_worker", c.controller), reqwest::Method::GET),
            (format!("{}/worker_generate", c.worker), reqwest::Method::PUT),
        ] {
            let r = control_http().request(method.clone(), &url).send().await.unwrap();
            assert_eq!(r.status(), 405, "{method} {url}");
            let e: Value = r.json().await.unwrap();
            assert_eq!(e["error"]["code"], "method_not_allowed", "{e}");
            assert!(message(&e).contains(method.as_str()), "{e}");
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn busy_answer_does_not_name_the_worker() {
    within(async {
        let c = Cluster::start(|o| {
            o.limit_worker_concurrency = 1;
            o.max_queue = 0;
        })
        .await;
        let body = c.completion_body(
            "Once upon a time",
            json!({"max_tokens": 2000, "stream": true, "ignore_eos": true}),
        );
        let r = http().post(c.url("/v1/completions")).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let mut held = r.bytes_stream();
        held.next().await.unwrap().unwrap();
        let (s, e) = post(
            &c.url("/v1/completions"),
            &c.completion_body("Hi", json!({"max_tokens": 2})),
        )
        .await;
        assert_eq!(s, 429, "{e}");
        let m = message(&e);
        assert!(m.contains("busy"), "{m}");
        let port = c.worker.rsplit(':').next().unwrap();
        assert!(
            !m.contains(&c.worker) && !m.contains(port),
            "the internal worker address leaked: {m}"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_conversation_template_is_asked_again_not_cached() {
    // A FastChat-style worker whose first template is broken, then fixed.
    within(async {
        use axum::routing::post as route_post;
        use axum::{Json, Router};
        let asked = Arc::new(AtomicUsize::new(0));
        let a2 = asked.clone();
        let app = Router::new()
            .route(
                "/worker_get_conv_template",
                route_post(move || {
                    let n = a2.fetch_add(1, Ordering::SeqCst);
                    async move {
                        if n == 0 {
                            Json(json!({"conv": {"name": "broken", "sep_style": 999}}))
                        } else {
                            Json(json!({"conv": vicugna_chat::Conversation::from_template("vicuna_v1.1").unwrap()}))
                        }
                    }
                }),
            )
            .route(
                "/model_details",
                route_post(|| async { Json(json!({"context_length": 2048})) }),
            )
            .route(
                "/count_token",
                route_post(|| async { Json(json!({"count": 20, "error_code": 0})) }),
            )
            .route(
                "/worker_generate_stream",
                route_post(|| async {
                    let mut out =
                        serde_json::to_vec(&json!({"text": "Hello", "error_code": 0, "finish_reason": "stop",
                        "usage": {"prompt_tokens": 20, "completion_tokens": 1, "total_tokens": 21}}))
                        .unwrap();
                    out.push(0);
                    out
                }),
            );
        let (l, fake) = bind().await;
        tokio::spawn(async move { axum::serve(l, app).await });
        let (ctl, _tc) = controller(ControllerOptions::default()).await;
        let (s, _) = ctl_post(
            &format!("{ctl}/register_worker"),
            &json!({"worker_name": fake, "check_heart_beat": true,
                    "worker_status": {"model_names": ["fc"], "speed": 1, "queue_length": 0}}),
        )
        .await;
        assert_eq!(s, 200);
        let (api, _tg) = gateway(&ctl, |_| {}).await;
        let chat = json!({"model": "fc", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 10});
        let (s, e) = post(&format!("{api}/v1/chat/completions"), &chat).await;
        assert_eq!(s, 502, "{e}");
        assert!(message(&e).contains("no usable conversation template"), "{e}");
        // The next request asks the worker again and is served.
        let (s, r) = post(&format!("{api}/v1/chat/completions"), &chat).await;
        assert_eq!(s, 200, "{r}");
        assert_eq!(r["choices"][0]["message"]["content"], "Hello");
        assert_eq!(asked.load(Ordering::SeqCst), 2);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_header_connections_are_closed() {
    within(async {
        let (ctl, _tc) = controller(ControllerOptions::default()).await;
        let (api, _tg) = gateway(&ctl, |_| {}).await;
        let addr = api.trim_start_matches("http://").to_string();
        // One that never finishes its headers, one that sends nothing at all
        // (side by side: each waits for the server's timeout).
        let probes = [&b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: "[..], b""].map(|opening| {
            let addr = addr.clone();
            tokio::task::spawn_blocking(move || {
                use std::io::{Read, Write};
                let mut s = std::net::TcpStream::connect(&addr).unwrap();
                s.write_all(opening).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                let t0 = Instant::now();
                let mut buf = [0u8; 512];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) => return Some(t0.elapsed()),
                        Ok(_) => {} // an error response first is fine
                        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                            return None
                        }
                        Err(_) => return Some(t0.elapsed()),
                    }
                }
            })
        });
        for p in probes {
            let after = p
                .await
                .unwrap()
                .expect("the server kept a slow-header connection open for 30 s");
            eprintln!("slow-header connection closed after {after:?}");
        }
    })
    .await
}
