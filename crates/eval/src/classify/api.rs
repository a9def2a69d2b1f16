//! Classification through an OpenAI-compatible chat completions API (vicugna's
//! own gateway, FastChat, or a hosted service). No constraint applies there, so
//! the answer is parsed ([`super::parse::parse_label`]); an answer with no
//! single label is retried with sampling, and counted as a parse failure.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{json, Value};

use super::backend::{split_sections, Backend, BackendStats, Vote};
use super::error::{ClassifyError, Result};
use super::parse::parse_label;
use super::prompt::{Demo, Method, Prompts};

/// How the API is called.
#[derive(Debug, Clone)]
pub struct ApiOptions {
    /// Temperature of sampled votes and retries (a single vote asks for 0).
    pub temperature: f32,
    /// `max_tokens` of an answer.
    pub max_tokens: usize,
    /// Further tries after an answer that names no single label.
    pub retries: usize,
    /// Seconds before a request is abandoned.
    pub timeout_s: u64,
}

impl Default for ApiOptions {
    fn default() -> Self {
        ApiOptions {
            temperature: 0.7,
            max_tokens: 256,
            retries: 2,
            timeout_s: 300,
        }
    }
}

/// An OpenAI-compatible API as a classifier.
pub struct ApiBackend {
    client: reqwest::blocking::Client,
    base: String,
    model: String,
    api_key: Option<String>,
    opts: ApiOptions,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    parse_failures: AtomicU64,
}

impl ApiBackend {
    /// `base` is the API root, e.g. `http://127.0.0.1:8000/v1`.
    pub fn new(base: &str, model: &str, api_key: Option<String>, opts: ApiOptions) -> Result<ApiBackend> {
        let client = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(opts.timeout_s))
            .build()
            .map_err(|e| ClassifyError::Api {
                url: base.into(),
                message: e.to_string(),
            })?;
        Ok(ApiBackend {
            client,
            base: base.trim_end_matches('/').to_string(),
            model: model.to_string(),
            api_key,
            opts,
            prompt_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
            parse_failures: AtomicU64::new(0),
        })
    }

    /// Chooses the server's model when it serves exactly one (`GET /models`);
    /// otherwise an error listing them, so that the user names one with --model.
    pub fn use_only_served_model(&mut self) -> Result<()> {
        let url = format!("{}/models", self.base);
        let err = |message: String| ClassifyError::Api {
            url: url.clone(),
            message,
        };
        let mut req = self.client.get(&url);
        if let Some(k) = &self.api_key {
            req = req.bearer_auth(k);
        }
        let resp = req.send().map_err(|e| err(format!("request failed: {e}")))?;
        let status = resp.status();
        let v: Value = resp
            .json()
            .map_err(|e| err(format!("HTTP {status}, not a model list: {e}")))?;
        let names: Vec<String> = v["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["id"].as_str().map(str::to_string))
            .collect();
        match names.as_slice() {
            [one] => {
                self.model = one.clone();
                Ok(())
            }
            [] => Err(err("the server lists no model; name one with --model".into())),
            many => Err(err(format!(
                "the server has {} models ({}); choose one with --model NAME",
                many.len(),
                many.join(", ")
            ))),
        }
    }

    fn post(&self, path: &str, body: &Value) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        let err = |message: String| ClassifyError::Api {
            url: url.clone(),
            message,
        };
        let mut req = self.client.post(&url).json(body);
        if let Some(k) = &self.api_key {
            req = req.bearer_auth(k);
        }
        let resp = req.send().map_err(|e| err(format!("request failed: {e}")))?;
        let status = resp.status();
        let text = resp.text().map_err(|e| err(format!("reading the response: {e}")))?;
        let v: Value = serde_json::from_str(&text).map_err(|_| {
            err(format!(
                "HTTP {status}, not JSON: {}",
                text.chars().take(200).collect::<String>()
            ))
        })?;
        if !status.is_success() {
            let msg = v["error"]["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| v.to_string());
            return Err(err(format!("HTTP {status}: {msg}")));
        }
        Ok(v)
    }

    /// One chat completion of a single user turn.
    fn chat(&self, user: &str, seed: Option<u64>) -> Result<String> {
        let mut body = json!({
            "model": self.model,
            "messages": [{"role": "user", "content": user}],
            "max_tokens": self.opts.max_tokens,
            "temperature": if seed.is_some() { self.opts.temperature } else { 0.0 },
        });
        if let Some(s) = seed {
            body["seed"] = json!(s);
        }
        let v = self.post("/chat/completions", &body)?;
        self.prompt_tokens
            .fetch_add(v["usage"]["prompt_tokens"].as_u64().unwrap_or(0), Ordering::Relaxed);
        self.completion_tokens
            .fetch_add(v["usage"]["completion_tokens"].as_u64().unwrap_or(0), Ordering::Relaxed);
        v["choices"][0]["message"]["content"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| ClassifyError::Api {
                url: format!("{}/chat/completions", self.base),
                message: format!(
                    "no choices[0].message.content in {}",
                    v.to_string().chars().take(200).collect::<String>()
                ),
            })
    }
}

/// Markers that may introduce the answer in free text.
fn answer_markers(prompts: &Prompts) -> Vec<&'static str> {
    vec![
        prompts.label_marker(),
        "label:",
        "标签:",
        "answer:",
        "答案：",
        "sentiment:",
        "topic:",
    ]
}

impl Backend for ApiBackend {
    fn classify(
        &self,
        prompts: &Prompts,
        method: Method,
        demos: &[Demo],
        text: &str,
        seed: Option<u64>,
    ) -> Result<Vote> {
        let mut user = prompts.user_message(method, demos, text);
        if method == Method::Cot {
            user.push_str(&format!("\n\n{}", prompts.cot_trigger()));
        }
        let markers = answer_markers(prompts);
        let mut last = String::new();
        for attempt in 0..=self.opts.retries {
            // Retries sample, so that they can differ from the failed answer.
            let s = match (seed, attempt) {
                (s, 0) => s,
                (s, a) => Some(s.unwrap_or(0).wrapping_add(1000 + a as u64)),
            };
            let answer = self.chat(&user, s)?;
            let (clues, reasoning) = match method {
                Method::Carp => split_sections(&answer, prompts),
                Method::Cot => (String::new(), answer.trim().to_string()),
                Method::Vanilla => (String::new(), String::new()),
            };
            if let Some(label) = parse_label(&answer, &prompts.labels, &markers) {
                return Ok(Vote {
                    label: Some(label),
                    probs: None,
                    clues,
                    reasoning,
                });
            }
            self.parse_failures.fetch_add(1, Ordering::Relaxed);
            last = answer;
        }
        let (clues, reasoning) = split_sections(&last, prompts);
        Ok(Vote {
            label: None,
            probs: None,
            clues,
            reasoning: if reasoning.is_empty() {
                last.trim().to_string()
            } else {
                reasoning
            },
        })
    }

    fn explain(&self, prompts: &Prompts, text: &str, label: usize) -> Result<(String, String)> {
        let strip = |s: String, marker: &str| {
            let t = s.trim();
            t.strip_prefix(marker).unwrap_or(t).trim().to_string()
        };
        let clues = strip(
            self.chat(&prompts.demo_clues_request(text, label), None)?,
            prompts.clues_marker(),
        );
        let reasoning = strip(
            self.chat(&prompts.demo_reasoning_request(text, label, &clues), None)?,
            prompts.reasoning_marker(),
        );
        Ok((clues, reasoning))
    }

    fn embed(&self, text: &str) -> Result<Vec<f32>> {
        let v = self.post("/embeddings", &json!({"model": self.model, "input": text}))?;
        v["data"][0]["embedding"]
            .as_array()
            .map(|a| a.iter().map(|x| x.as_f64().unwrap_or(0.0) as f32).collect())
            .ok_or_else(|| ClassifyError::Api {
                url: format!("{}/embeddings", self.base),
                message: "no data[0].embedding in the response".into(),
            })
    }

    fn count_tokens(&self, user: &str) -> usize {
        // No tokenizer here: about 3 characters per token for English, 1 for Chinese.
        user.chars().map(|c| if c.is_ascii() { 1 } else { 3 }).sum::<usize>() / 3
    }

    fn model_id(&self) -> String {
        format!("{} at {}", self.model, self.base)
    }

    fn stats(&self) -> BackendStats {
        BackendStats {
            prompt_tokens: self.prompt_tokens.load(Ordering::Relaxed),
            completion_tokens: self.completion_tokens.load(Ordering::Relaxed),
            reused_tokens: 0,
            parse_failures: self.parse_failures.load(Ordering::Relaxed),
        }
    }
}
