//! FastChat's wire protocol, spoken over real sockets: the worker's and the
//! controller's endpoints, heartbeats, expiry, and re-registration after a
//! controller restart.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use vicugna_serve::{ControllerOptions, DispatchMethod};

const LIMIT: Duration = Duration::from_secs(120);

async fn within<F: std::future::Future<Output = ()>>(f: F) {
    tokio::time::timeout(LIMIT, f).await.expect("the test took too long");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worker_endpoints_speak_fastchat() {
    within(async {
        let (ctl, _tc) = controller(ControllerOptions::default()).await;
        let (w, _wh, _tw) = worker(&ctl, |_| {}).await;
        let model = model_name();

        // NUL-delimited JSON with cumulative text; echo defaults to true as in FastChat.
        let r = control_http()
            .post(format!("{w}/worker_generate_stream"))
            .json(&json!({"model": model, "prompt": "The capital of France is", "max_new_tokens": 6, "temperature": 0}))
            .send()
            .await
            .unwrap();
        let body = r.bytes().await.unwrap();
        assert_eq!(body.last(), Some(&0u8));
        let chunks = parse_chunks(&body);
        assert!(chunks.len() >= 2, "{chunks:?}");
        let texts: Vec<&str> = chunks.iter().map(|c| c["text"].as_str().unwrap()).collect();
        for pair in texts.windows(2) {
            assert!(pair[1].starts_with(pair[0]), "text is cumulative: {texts:?}");
        }
        assert!(texts[0].starts_with("The capital of France is"));
        let last = chunks.last().unwrap();
        assert_eq!(last["error_code"], 0);
        assert_eq!(last["finish_reason"], "length");
        assert_eq!(last["usage"]["completion_tokens"], 6);
        assert!(chunks[..chunks.len() - 1].iter().all(|c| c["finish_reason"].is_null()));

        // /worker_generate: the last chunk as one JSON object.
        let (s, g) = ctl_post(
            &format!("{w}/worker_generate"),
            &json!({"model": model, "prompt": "The capital of France is", "max_new_tokens": 6, "temperature": 0, "echo": false}),
        )
        .await;
        assert_eq!(s, 200);
        assert_eq!(
            format!("The capital of France is{}", g["text"].as_str().unwrap()),
            last["text"].as_str().unwrap()
        );

        let (_, st) = ctl_post(&format!("{w}/worker_get_status"), &json!({})).await;
        assert_eq!(st, json!({"model_names": [model], "speed": 1.0, "queue_length": 0}));
        let (_, n) = ctl_post(&format!("{w}/count_token"), &json!({"prompt": "Hello world"})).await;
        assert_eq!(n["error_code"], 0);
        assert_eq!(n["count"], 2);
        let (_, d) = ctl_post(&format!("{w}/model_details"), &json!({"model": model})).await;
        assert_eq!(d["context_length"], 8192);
        let (_, conv) = ctl_post(&format!("{w}/worker_get_conv_template"), &json!({"model": model})).await;
        let conv = &conv["conv"];
        for field in [
            "name",
            "system_template",
            "system_message",
            "roles",
            "messages",
            "offset",
            "sep_style",
            "sep",
            "sep2",
            "stop_str",
            "stop_token_ids",
        ] {
            assert!(conv.get(field).is_some(), "conv lacks {field}: {conv}");
        }
        assert!(conv["sep_style"].is_u64(), "sep_style is FastChat's integer: {conv}");

        let (_, e) = ctl_post(
            &format!("{w}/worker_get_embeddings"),
            &json!({"model": model, "input": ["hello", "hello world"]}),
        )
        .await;
        assert_eq!(e["embedding"].as_array().unwrap().len(), 2);
        assert_eq!(e["token_num"], 3);

        // Errors are chunks with FastChat's codes, not HTTP failures.
        let r = control_http()
            .post(format!("{w}/worker_generate_stream"))
            .json(&json!({"model": model, "prompt": "hi ".repeat(9000), "max_new_tokens": 4}))
            .send()
            .await
            .unwrap();
        let c = parse_chunks(&r.bytes().await.unwrap());
        assert_eq!(c[0]["error_code"], 40303, "{c:?}");
        assert!(c[0]["text"].as_str().unwrap().contains("maximum context length"));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn controller_endpoints_speak_fastchat() {
    within(async {
        let (ctl, _tc) = controller(ControllerOptions::default()).await;
        let r = control_http()
            .get(format!("{ctl}/test_connection"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.text().await.unwrap(), "\"success\"");
        // A worker registered with `worker_status: null` is asked for its status.
        let (w, _wh, _tw) = worker(&ctl, |o| o.register = false).await;
        let model = model_name();
        let (s, _) = ctl_post(
            &format!("{ctl}/register_worker"),
            &json!({"worker_name": w, "check_heart_beat": true, "worker_status": null}),
        )
        .await;
        assert_eq!(s, 200);
        let (_, m) = ctl_post(&format!("{ctl}/list_models"), &json!({})).await;
        assert_eq!(m, json!({"models": [model]}));
        let (_, m) = ctl_post(&format!("{ctl}/list_language_models"), &json!({})).await;
        assert_eq!(m, json!({"models": [model]}));
        let (_, m) = ctl_post(&format!("{ctl}/list_multimodal_models"), &json!({})).await;
        assert_eq!(m, json!({"models": []}));
        let (_, a) = ctl_post(&format!("{ctl}/get_worker_address"), &json!({"model": model})).await;
        assert_eq!(a["address"], w.as_str());
        let (_, a) = ctl_post(&format!("{ctl}/get_worker_address"), &json!({"model": "other"})).await;
        assert_eq!(a["address"], "");
        let (_, h) = ctl_post(
            &format!("{ctl}/receive_heart_beat"),
            &json!({"worker_name": w, "queue_length": 0}),
        )
        .await;
        assert_eq!(h, json!({"exist": true}));
        let (_, h) = ctl_post(
            &format!("{ctl}/receive_heart_beat"),
            &json!({"worker_name": "http://127.0.0.1:1", "queue_length": 0}),
        )
        .await;
        assert_eq!(h, json!({"exist": false}));
        let (_, st) = ctl_post(&format!("{ctl}/worker_get_status"), &json!({})).await;
        assert_eq!(st["model_names"], json!([model]));

        // The controller proxies a generation (controllers can nest).
        let r = control_http()
            .post(format!("{ctl}/worker_generate_stream"))
            .json(&json!({"model": model, "prompt": "Hi", "max_new_tokens": 2, "echo": false}))
            .send()
            .await
            .unwrap();
        let c = parse_chunks(&r.bytes().await.unwrap());
        assert!(c.last().unwrap()["finish_reason"].is_string());
        let r = control_http()
            .post(format!("{ctl}/worker_generate_stream"))
            .json(&json!({"model": "other", "prompt": "Hi"}))
            .send()
            .await
            .unwrap();
        let c = parse_chunks(&r.bytes().await.unwrap());
        assert_eq!(c[0]["error_code"], 50005);

        // refresh_all_workers drops a worker that no longer answers.
        let (_, _) = ctl_post(
            &format!("{ctl}/register_worker"),
            &json!({"worker_name": "http://127.0.0.1:9", "check_heart_beat": true,
                    "worker_status": {"model_names": ["ghost"], "speed": 1, "queue_length": 0}}),
        )
        .await;
        let (_, m) = ctl_post(&format!("{ctl}/list_models"), &json!({})).await;
        assert_eq!(m["models"].as_array().unwrap().len(), 2);
        ctl_post(&format!("{ctl}/refresh_all_workers"), &json!({})).await;
        let (_, m) = ctl_post(&format!("{ctl}/list_models"), &json!({})).await;
        assert_eq!(m, json!({"models": [model]}));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dispatch_methods_spread_requests_over_workers() {
    within(async {
        for method in [DispatchMethod::ShortestQueue, DispatchMethod::Lottery] {
            let (ctl, _tc) = controller(ControllerOptions {
                dispatch_method: method,
                ..ControllerOptions::default()
            })
            .await;
            let (a, _ah, _ta) = worker(&ctl, |_| {}).await;
            let (b, _bh, _tb) = worker(&ctl, |_| {}).await;
            let model = model_name();
            eventually(Duration::from_secs(20), "both workers registered", || async {
                let (_, st) = ctl_post(&format!("{ctl}/worker_get_status"), &json!({})).await;
                st["speed"].as_f64() == Some(2.0)
            })
            .await;
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..40 {
                let (_, r) = ctl_post(&format!("{ctl}/get_worker_address"), &json!({"model": model})).await;
                seen.insert(r["address"].as_str().unwrap().to_string());
            }
            let want: std::collections::BTreeSet<String> = [a, b].into_iter().collect();
            assert_eq!(seen, want, "{method:?}");
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_worker_expires_and_restarted_controller_is_repopulated_by_heartbeats() {
    within(async {
        let opts = ControllerOptions {
            heart_beat_expiration: Duration::from_millis(900),
            control: control(),
            ..ControllerOptions::default()
        };
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let ctl = format!("http://{addr}");
        let tc = spawn_controller(l, opts.clone());
        let (_w, _wh, tw) = worker(&ctl, |o| o.heart_beat_interval = Duration::from_millis(200)).await;
        let model = model_name();
        wait_for_model(&ctl, &model, Duration::from_secs(10)).await;

        // Restart the controller on the same port: the worker's next heartbeat
        // hears `exist: false` and registers again.
        tc.fire();
        drop(tc);
        let l = loop {
            match TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        let _tc = spawn_controller(l, opts);
        let (_, m) = ctl_post(&format!("{ctl}/list_models"), &json!({})).await;
        assert_eq!(m, json!({"models": []}), "a new controller starts empty");
        wait_for_model(&ctl, &model, Duration::from_secs(10)).await;

        // A worker that stops sending heartbeats is dropped within the expiry.
        tw.fire();
        eventually(Duration::from_secs(10), "the dead worker to expire", || async {
            let (_, m) = ctl_post(&format!("{ctl}/list_models"), &json!({})).await;
            m == json!({"models": []})
        })
        .await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gateway_works_with_a_worker_that_only_speaks_fastchat() {
    // A stand-in for a FastChat worker: takes `prompt` (built by the gateway
    // from the worker's conv template), ignores `messages`, and has no
    // `renders_messages` flag. The gateway must build the prompt itself.
    within(async {
        use axum::routing::post as route_post;
        use axum::{Json, Router};
        let seen: std::sync::Arc<std::sync::Mutex<Vec<Value>>> = Default::default();
        let s2 = seen.clone();
        let app = Router::new()
            .route(
                "/worker_get_conv_template",
                route_post(|| async {
                    let conv = vicugna_chat::Conversation::from_template("vicuna_v1.1").unwrap();
                    Json(json!({"conv": conv}))
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
                "/worker_get_status",
                route_post(|| async { Json(json!({"model_names": ["fc"], "speed": 1, "queue_length": 0})) }),
            )
            .route(
                "/worker_generate_stream",
                route_post(move |Json(p): Json<Value>| {
                    let s2 = s2.clone();
                    async move {
                        s2.lock().unwrap().push(p);
                        let mut out = Vec::new();
                        for (t, f) in [("Hel", Value::Null), ("Hello", json!("stop"))] {
                            out.extend(
                                serde_json::to_vec(&json!({"text": t, "error_code": 0, "finish_reason": f,
                                "usage": {"prompt_tokens": 20, "completion_tokens": 2, "total_tokens": 22}}))
                                .unwrap(),
                            );
                            out.push(0);
                        }
                        out
                    }
                }),
            );
        let (l, fake) = bind().await;
        tokio::spawn(async move { axum::serve(l, app).await });
        // A FastChat worker sends no control secret: the opt-in compat mode.
        let (ctl, _tc) = controller(ControllerOptions {
            control: vicugna_serve::ControlAuth::Open,
            ..ControllerOptions::default()
        })
        .await;
        let (s, _) = post(
            &format!("{ctl}/register_worker"),
            &json!({"worker_name": fake, "check_heart_beat": false, "worker_status": null}),
        )
        .await;
        assert_eq!(s, 200);
        let (api, _tg) = gateway(&ctl, |_| {}).await;
        let (s, r) = post(
            &format!("{api}/v1/chat/completions"),
            &json!({"model": "fc", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 100}),
        )
        .await;
        assert_eq!(s, 200, "{r}");
        assert_eq!(r["choices"][0]["message"]["content"], "Hello");
        let p = seen.lock().unwrap()[0].clone();
        assert!(p["prompt"].as_str().unwrap().ends_with("USER: Hi ASSISTANT:"), "{p}");
        // The message content's place in the prompt, for a worker that reads it
        // as untrusted text (a FastChat worker ignores the field).
        let span = &p["literal_spans"][0];
        let (a, b) = (span[0].as_u64().unwrap() as usize, span[1].as_u64().unwrap() as usize);
        assert_eq!(&p["prompt"].as_str().unwrap()[a..b], "Hi", "{p}");
        assert_eq!(p["echo"], false);
        assert_eq!(p["max_new_tokens"], 100);
        assert!(p.get("messages").is_none());
    })
    .await
}
