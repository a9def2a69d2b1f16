//! The OpenAI-compatible gateway over real sockets: endpoints, streaming, error
//! objects for bad input, limits, cancellation and continuous batching.

mod common;

use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use futures::StreamExt;
use serde_json::{json, Value};
use vicugna_serve::ControllerOptions;

const LIMIT: Duration = Duration::from_secs(180);

async fn within<F: std::future::Future<Output = ()>>(f: F) {
    tokio::time::timeout(LIMIT, f).await.expect("the test took too long");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn models_health_metrics_and_openapi() {
    within(async {
        let c = Cluster::start(|_| {}).await;
        let r: Value = http()
            .get(c.url("/v1/models"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(r["object"], "list");
        assert_eq!(r["data"][0]["id"], c.model.as_str());
        assert_eq!(r["data"][0]["object"], "model");
        let r = http()
            .get(c.url(&format!("/v1/models/{}", c.model)))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let r = http().get(c.url("/v1/models/nope")).send().await.unwrap();
        assert_eq!(r.status(), 404);

        let r = http().get(c.url("/health")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let doc: Value = http()
            .get(c.url("/openapi.json"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(doc["openapi"], "3.0.3");
        assert!(doc["paths"]["/v1/chat/completions"]["post"].is_object());

        let (s, _) = post(
            &c.url("/v1/chat/completions"),
            &c.chat_body("Hi", json!({"max_tokens": 4})),
        )
        .await;
        assert_eq!(s, 200);
        let m = http()
            .get(c.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        for name in [
            "vicugna_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"} 1",
            "vicugna_completion_tokens_total",
            "vicugna_time_to_first_token_seconds_bucket",
            "vicugna_inter_token_seconds_count",
            "vicugna_request_duration_seconds_sum",
            "vicugna_worker_queue_length 0",
        ] {
            assert!(m.contains(name), "/metrics lacks {name}:\n{m}");
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chat_completion_answers_and_counts_usage() {
    within(async {
        let c = Cluster::start(|_| {}).await;
        let (s, r) = post(
            &c.url("/v1/chat/completions"),
            &c.chat_body("What is the capital of France?", json!({"max_tokens": 12})),
        )
        .await;
        assert_eq!(s, 200, "{r}");
        assert_eq!(r["object"], "chat.completion");
        assert!(r["id"].as_str().unwrap().starts_with("chatcmpl-"));
        let choice = &r["choices"][0];
        assert_eq!(choice["message"]["role"], "assistant");
        let text = choice["message"]["content"].as_str().unwrap();
        assert!(text.contains("Paris"), "{text:?}");
        let u = &r["usage"];
        assert!(u["prompt_tokens"].as_u64().unwrap() > 5);
        assert!(u["completion_tokens"].as_u64().unwrap() <= 12);
        assert_eq!(
            u["total_tokens"].as_u64(),
            Some(u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap())
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chat_stream_is_sse_with_role_deltas_usage_and_done() {
    within(async {
        let c = Cluster::start(|_| {}).await;
        let body = c.chat_body(
            "Tell me a story.",
            json!({"max_tokens": 8, "stream": true, "stream_options": {"include_usage": true}}),
        );
        let r = http()
            .post(c.url("/v1/chat/completions"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "text/event-stream");
        let events = parse_sse(&r.text().await.unwrap());
        assert_eq!(events.last().unwrap(), "[DONE]");
        let chunks = &events[..events.len() - 1];
        let id = chunks[0]["id"].as_str().unwrap();
        assert!(chunks
            .iter()
            .all(|e| e["id"] == id && e["object"] == "chat.completion.chunk"));
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        let text: String = chunks
            .iter()
            .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert!(!text.is_empty());
        let finish: Vec<&Value> = chunks
            .iter()
            .filter(|e| !e["choices"][0]["finish_reason"].is_null())
            .collect();
        assert_eq!(finish.len(), 1);
        assert_eq!(finish[0]["choices"][0]["finish_reason"], "length");
        let usage = chunks.last().unwrap();
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["usage"]["completion_tokens"], 8);

        // The same request without streaming gives the same text (greedy).
        let mut plain = body.clone();
        plain["stream"] = json!(false);
        plain.as_object_mut().unwrap().remove("stream_options");
        let (_, r) = post(&c.url("/v1/chat/completions"), &plain).await;
        assert_eq!(r["choices"][0]["message"]["content"].as_str().unwrap(), text);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn completions_with_echo_logprobs_stop_n_and_seed() {
    within(async {
        let c = Cluster::start(|_| {}).await;
        let url = c.url("/v1/completions");
        let (s, r) = post(
            &url,
            &c.completion_body("The sky is", json!({"max_tokens": 4, "echo": true, "logprobs": 2})),
        )
        .await;
        assert_eq!(s, 200, "{r}");
        assert_eq!(r["object"], "text_completion");
        let ch = &r["choices"][0];
        assert!(ch["text"].as_str().unwrap().starts_with("The sky is"));
        let lp = &ch["logprobs"];
        let n = lp["tokens"].as_array().unwrap().len();
        assert_eq!(n, 3 + 4, "{lp}");
        assert!(lp["token_logprobs"][0].is_null());
        assert!(lp["token_logprobs"][3].as_f64().unwrap() <= 0.0);
        assert_eq!(lp["top_logprobs"][4].as_object().unwrap().len(), 2);

        // A stop string ends the text before it.
        let (_, full) = post(&url, &c.completion_body("1, 2, 3, 4,", json!({"max_tokens": 8}))).await;
        let full = full["choices"][0]["text"].as_str().unwrap().to_string();
        assert!(full.contains('6'), "{full:?}");
        let (_, r) = post(
            &url,
            &c.completion_body("1, 2, 3, 4,", json!({"max_tokens": 8, "stop": ["6"]})),
        )
        .await;
        assert_eq!(r["choices"][0]["finish_reason"], "stop");
        assert_eq!(
            r["choices"][0]["text"].as_str().unwrap(),
            &full[..full.find('6').unwrap()]
        );

        // n and seed: sampled choices, reproducible with the same seed.
        let body = c.completion_body(
            "Once upon a time",
            json!({"max_tokens": 8, "n": 2, "temperature": 1.0, "seed": 7}),
        );
        let (_, a) = post(&url, &body).await;
        let (_, b) = post(&url, &body).await;
        assert_eq!(a["choices"].as_array().unwrap().len(), 2);
        assert_eq!(a["choices"][1]["index"], 1);
        for i in 0..2 {
            assert_eq!(a["choices"][i]["text"], b["choices"][i]["text"]);
        }
        assert_eq!(a["usage"]["completion_tokens"], 16);

        // Token-id prompts and several prompts at once.
        let (s, r) = post(
            &url,
            &json!({"model": c.model, "prompt": [[504, 5356, 314], "Hello"], "max_tokens": 2}),
        )
        .await;
        assert_eq!(s, 200, "{r}");
        assert_eq!(r["choices"].as_array().unwrap().len(), 2);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chat_logprobs_and_streamed_completion_logprobs() {
    within(async {
        let c = Cluster::start(|_| {}).await;
        let (s, r) = post(
            &c.url("/v1/chat/completions"),
            &c.chat_body("Hi", json!({"max_tokens": 3, "logprobs": true, "top_logprobs": 2})),
        )
        .await;
        assert_eq!(s, 200, "{r}");
        let content = r["choices"][0]["logprobs"]["content"].as_array().unwrap();
        assert_eq!(content.len(), 3);
        let top = content[0]["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 2);
        assert!(top[0]["logprob"].as_f64() >= top[1]["logprob"].as_f64());
        // Greedy: the chosen token is the most likely one.
        assert_eq!(content[0]["token"], top[0]["token"]);

        let body = c.completion_body("The sky is", json!({"max_tokens": 4, "logprobs": 1, "stream": true}));
        let text = http()
            .post(c.url("/v1/completions"))
            .json(&body)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let events = parse_sse(&text);
        let tokens: usize = events
            .iter()
            .filter_map(|e| e["choices"][0]["logprobs"]["tokens"].as_array())
            .map(Vec::len)
            .sum();
        assert_eq!(tokens, 4);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embeddings_are_unit_vectors_in_float_and_base64() {
    within(async {
        let c = Cluster::start(|_| {}).await;
        let url = c.url("/v1/embeddings");
        let inputs: Vec<String> = (0..5).map(|i| format!("sentence number {i}")).collect();
        let (s, r) = post(&url, &json!({"model": c.model, "input": inputs})).await;
        assert_eq!(s, 200, "{r}");
        let data = r["data"].as_array().unwrap();
        assert_eq!(data.len(), 5);
        let v: Vec<f64> = data[0]["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let norm: f64 = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-3, "{norm}");
        assert_eq!(data[4]["index"], 4);
        assert!(r["usage"]["prompt_tokens"].as_u64().unwrap() >= 5);

        let (_, b) = post(
            &url,
            &json!({"model": c.model, "input": "sentence number 0", "encoding_format": "base64"}),
        )
        .await;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b["data"][0]["embedding"].as_str().unwrap())
            .unwrap();
        let w: Vec<f32> = bytes
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(w.len(), v.len());
        assert!(w.iter().zip(&v).all(|(a, b)| (*a as f64 - b).abs() < 1e-5));

        let (s, e) = post(&url, &json!({"model": c.model, "input": []})).await;
        assert_eq!((s, e["error"]["param"].as_str()), (400, Some("input")));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn guided_choice_and_regex_constrain_the_answer() {
    within(async {
        let c = Cluster::start(|_| {}).await;
        let labels = ["sports", "politics", "technology"];
        for seed in 0..4 {
            let (s, r) = post(
                &c.url("/v1/chat/completions"),
                &c.chat_body(
                    "Which topic: 'The new phone has a faster chip.'",
                    json!({"temperature": 1.2, "seed": seed, "guided_choice": labels}),
                ),
            )
            .await;
            assert_eq!(s, 200, "{r}");
            let text = r["choices"][0]["message"]["content"].as_str().unwrap();
            assert!(labels.contains(&text), "{text:?}");
            assert_eq!(r["choices"][0]["finish_reason"], "stop");
        }
        let (s, r) = post(
            &c.url("/v1/chat/completions"),
            &c.chat_body("Score it", json!({"guided_regex": "\\[\\[[1-5]\\]\\]"})),
        )
        .await;
        assert_eq!(s, 200, "{r}");
        let text = r["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(
            text.len() == 5 && text.starts_with("[[") && text.ends_with("]]"),
            "{text:?}"
        );

        for (body, field) in [
            (json!({"guided_choice": []}), "guided_choice"),
            (json!({"guided_choice": ["a", 3]}), "guided_choice[1]"),
            (json!({"guided_choice": ["a"], "guided_regex": "b"}), "guided_regex"),
        ] {
            let (s, r) = post(&c.url("/v1/chat/completions"), &c.chat_body("x", body)).await;
            assert_eq!(s, 400, "{r}");
            assert_eq!(r["error"]["param"], field, "{r}");
        }
        let (s, r) = post(
            &c.url("/v1/chat/completions"),
            &c.chat_body("x", json!({"guided_regex": "(unclosed"})),
        )
        .await;
        assert_eq!(s, 400, "{r}");
        assert!(
            r["error"]["message"].as_str().unwrap().contains("constraint pattern"),
            "{r}"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_openai_error_objects_naming_the_field() {
    within(async {
        let c = Cluster::start(|_| {}).await;
        let chat = c.url("/v1/chat/completions");
        let client = http();
        let r = client
            .post(&chat)
            .header("content-type", "application/json")
            .body("{\"model\": ")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["type"], "invalid_request_error");
        assert!(e["error"]["message"].as_str().unwrap().contains("not valid JSON"));

        let user = json!([{"role": "user", "content": "hi"}]);
        let cases: Vec<(Value, u16, Option<&str>)> = vec![
            (json!({"messages": []}), 400, Some("messages")),
            (
                json!({"messages": [{"role": "tool", "content": "x"}]}),
                400,
                Some("messages[0].role"),
            ),
            (
                json!({"messages": [{"role": "robot", "content": "x"}]}),
                400,
                Some("messages[0].role"),
            ),
            (json!({"messages": user, "max_tokens": -1}), 400, Some("max_tokens")),
            (
                json!({"messages": user, "max_tokens": 1_000_000}),
                400,
                Some("max_tokens"),
            ),
            (json!({"messages": user, "temperature": 3}), 400, Some("temperature")),
            (json!({"messages": user, "n": 0}), 400, Some("n")),
            (json!({"messages": user, "stop": vec!["x"; 100]}), 400, Some("stop")),
            (json!({"messages": user, "top_p": 1.5}), 400, Some("top_p")),
            (
                json!({"messages": user, "presence_penalty": -3}),
                400,
                Some("presence_penalty"),
            ),
            (json!({"messages": user, "model": "no-such-model"}), 404, Some("model")),
        ];
        for (extra, status, param) in cases {
            let mut body = json!({"model": c.model});
            merge(&mut body, extra.clone());
            let (s, e) = post(&chat, &body).await;
            assert_eq!(s, status, "{extra}: {e}");
            assert_eq!(e["error"]["param"].as_str(), param, "{extra}: {e}");
            assert!(!e["error"]["message"].as_str().unwrap().is_empty());
        }

        // A prompt longer than the context.
        let long = "hello ".repeat(10_000);
        let (s, e) = post(
            &c.url("/v1/completions"),
            &c.completion_body(&long, json!({"max_tokens": 4})),
        )
        .await;
        assert_eq!(s, 400, "{e}");
        assert_eq!(e["error"]["code"], "context_length_exceeded");
        assert_eq!(e["error"]["param"], "prompt");

        // 50 MB body: 413, as an error object.
        let big = vec![b'a'; 50 << 20];
        let r = client
            .post(&chat)
            .header("content-type", "application/json")
            .body(big)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 413);
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["code"], "request_too_large");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_keys_are_required_when_configured() {
    within(async {
        let c = Cluster::start_with(|_| {}, |g| g.api_keys = Some(vec!["k1".into(), "k2".into()])).await;
        let client = http();
        let r = client.get(c.url("/v1/models")).send().await.unwrap();
        assert_eq!(r.status(), 401);
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["code"], "invalid_api_key");
        let r = client
            .get(c.url("/v1/models"))
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        let r = client.get(c.url("/v1/models")).bearer_auth("k2").send().await.unwrap();
        assert_eq!(r.status(), 200);
        // Health and metrics stay open for probes.
        assert_eq!(client.get(c.url("/health")).send().await.unwrap().status(), 200);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_queue_is_429_with_retry_after_and_gone_worker_is_503() {
    within(async {
        let c = Cluster::start(|o| {
            o.limit_worker_concurrency = 1;
            o.max_queue = 0;
        })
        .await;
        // Hold the only slot with a long stream.
        let body = c.completion_body(
            "Once upon a time",
            json!({"max_tokens": 2000, "stream": true, "ignore_eos": true}),
        );
        let r = http().post(c.url("/v1/completions")).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let mut held = r.bytes_stream();
        held.next().await.unwrap().unwrap();
        let r = http()
            .post(c.url("/v1/completions"))
            .json(&c.completion_body("Hi", json!({"max_tokens": 2})))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["retry-after"], "1");
        let e: Value = r.json().await.unwrap();
        assert!(e["error"]["message"].as_str().unwrap().contains("busy"), "{e}");
        drop(held);
        // The client left: the slot frees and requests go through again.
        eventually(Duration::from_secs(20), "the slot to free", || async {
            c.worker_handle.queue_length() == 0
        })
        .await;
        let (s, _) = post(
            &c.url("/v1/completions"),
            &c.completion_body("Hi", json!({"max_tokens": 2})),
        )
        .await;
        assert_eq!(s, 200);
    })
    .await;

    within(async {
        // A model that was served but whose only worker is gone: 503, not 404.
        let (ctl, _tc) = controller(ControllerOptions {
            heart_beat_expiration: Duration::from_millis(600),
            ..ControllerOptions::default()
        })
        .await;
        let (_w, _wh, tw) = worker(&ctl, |o| o.heart_beat_interval = Duration::from_millis(200)).await;
        let (api, _tg) = gateway(&ctl, |_| {}).await;
        let model = model_name();
        wait_for_model(&ctl, &model, Duration::from_secs(20)).await;
        let body = json!({"model": model, "prompt": "Hi", "max_tokens": 2});
        let (s, _) = post(&format!("{api}/v1/completions"), &body).await;
        assert_eq!(s, 200);
        tw.fire();
        let url = format!("{api}/v1/completions");
        eventually(Duration::from_secs(20), "503 once the worker is gone", || {
            let (url, body) = (url.clone(), body.clone());
            async move {
                let r = http().post(&url).json(&body).send().await.unwrap();
                r.status() == 503 && r.headers().contains_key("retry-after")
            }
        })
        .await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_disconnect_cancels_the_generation() {
    within(async {
        let c = Cluster::start(|_| {}).await;
        let body = c.chat_body(
            "Write a long essay about llamas.",
            json!({"max_tokens": 2000, "stream": true, "ignore_eos": true}),
        );
        let r = http()
            .post(c.url("/v1/chat/completions"))
            .json(&body)
            .send()
            .await
            .unwrap();
        let mut s = r.bytes_stream();
        s.next().await.unwrap().unwrap();
        s.next().await.unwrap().unwrap();
        assert_eq!(c.worker_handle.queue_length(), 1);
        let t0 = Instant::now();
        drop(s);
        eventually(Duration::from_secs(10), "the worker to drop the request", || async {
            c.worker_handle.queue_length() == 0
        })
        .await;
        assert!(t0.elapsed() < Duration::from_secs(10));
    })
    .await
}

/// Requests run together: a later request's first token comes before an earlier
/// one finishes, and `queue_length` counts running plus waiting requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_share_the_batch_and_queue_length_is_truthful() {
    within(async {
        let c = Cluster::start(|o| o.limit_worker_concurrency = 4).await;
        let t0 = Instant::now();
        let one = |i: usize| {
            let body = c.completion_body(
                &format!("Story {i}: once upon a time"),
                json!({"max_tokens": 24, "stream": true, "ignore_eos": true}),
            );
            let url = c.url("/v1/completions");
            async move {
                let r = http().post(url).json(&body).send().await.unwrap();
                let mut s = r.bytes_stream();
                let mut first = None;
                let mut all = Vec::new();
                while let Some(b) = s.next().await {
                    let b = b.unwrap();
                    if first.is_none() && b.windows(6).any(|w| w == b"\"text\"") {
                        first = Some(t0.elapsed());
                    }
                    all.extend_from_slice(&b);
                }
                (first.unwrap(), t0.elapsed(), String::from_utf8(all).unwrap())
            }
        };
        let runs = futures::future::join_all((0..4).map(one)).await;
        let last_first = runs.iter().map(|r| r.0).max().unwrap();
        let first_done = runs.iter().map(|r| r.1).min().unwrap();
        assert!(
            last_first < first_done,
            "every request should start before any finishes (batched): {:?}",
            runs.iter().map(|r| (r.0, r.1)).collect::<Vec<_>>()
        );
        for r in &runs {
            assert!(r.2.ends_with("data: [DONE]\n\n"));
        }

        // With 2 slots, 4 requests: 2 run and 2 wait, and the worker says 4.
        // Long and without EOS so no request ends before all four are in.
        let c2 = Cluster::start(|o| o.limit_worker_concurrency = 2).await;
        let mut streams = Vec::new();
        for i in 0..4 {
            let body = c2.completion_body(
                &format!("Tale {i}"),
                json!({"max_tokens": 2000, "stream": true, "ignore_eos": true}),
            );
            let url = c2.url("/v1/completions");
            // Each client keeps reading its stream (dropping it would cancel the
            // request) until the test aborts it.
            streams.push(tokio::spawn(async move {
                let r = http().post(url).json(&body).send().await.unwrap();
                let mut s = r.bytes_stream();
                while s.next().await.is_some() {}
            }));
        }
        eventually(Duration::from_secs(30), "queue_length 4", || async {
            let (_, s) = ctl_post(&format!("{}/worker_get_status", c2.worker), &json!({})).await;
            s["queue_length"] == 4
        })
        .await;
        for s in streams {
            s.abort();
        }
    })
    .await
}

/// 1000 requests at once: each is answered 200 or 429, nothing else, and the
/// gateway keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_requests_at_once_get_200_or_429() {
    within(async {
        let c = Cluster::start(|o| {
            o.limit_worker_concurrency = 8;
            o.max_queue = 24;
        })
        .await;
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(150))
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        let url = c.url("/v1/completions");
        let body = c.completion_body("Hi", json!({"max_tokens": 1}));
        let statuses = futures::stream::iter(0..1000)
            .map(|_| {
                let (client, url, body) = (client.clone(), url.clone(), body.clone());
                async move {
                    match client.post(url).json(&body).send().await {
                        Ok(r) => r.status().as_u16(),
                        Err(e) => panic!("request failed: {e}"),
                    }
                }
            })
            .buffer_unordered(1000)
            .collect::<Vec<u16>>()
            .await;
        let ok = statuses.iter().filter(|&&s| s == 200).count();
        let busy = statuses.iter().filter(|&&s| s == 429).count();
        assert_eq!(
            ok + busy,
            1000,
            "other statuses: {:?}",
            statuses.iter().filter(|&&s| s != 200 && s != 429).collect::<Vec<_>>()
        );
        assert!(ok >= 8, "{ok} succeeded");
        let (s, _) = post(&url, &body).await;
        assert_eq!(s, 200);
    })
    .await
}
