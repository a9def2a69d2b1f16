//! A client for OpenAI-compatible chat APIs (vicugna's gateway, FastChat's
//! `openai_api_server`, vLLM, hosted APIs), with the retry rules a long
//! evaluation needs: exponential backoff on connection errors, timeouts, 429
//! and 5xx, honouring `Retry-After`; other 4xx fail at once with the server's
//! message.

use std::time::Duration;

use rand::Rng;
use serde_json::{json, Value};

use crate::error::{EvalError, Result};
use crate::model::{ChatModel, ChatReply, ChatRequest, Guide};

/// How often and how patiently failed calls are retried.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Retries after the first try (FastChat tries 16 times in all).
    pub max_retries: u32,
    /// First backoff; doubled after each failure.
    pub base_delay: Duration,
    /// Longest backoff (and longest `Retry-After` honoured).
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 15,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// The wait before retry number `attempt` (0-based): the server's
    /// `Retry-After` when it sent one, else exponential backoff with jitter.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        if let Some(d) = retry_after {
            return d.min(self.max_delay);
        }
        let exp = self.base_delay.saturating_mul(1u32 << attempt.min(16));
        let capped = exp.min(self.max_delay);
        // Up to 25% jitter, so parallel callers do not retry in lockstep.
        let jitter = rand::rng().random_range(0.0..0.25);
        capped.mul_f64(1.0 + jitter).min(self.max_delay)
    }
}

/// What `GET /models` says about a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listing {
    /// Listed, with its `owned_by`.
    Served {
        /// `owned_by` (`vicugna` for vicugna's gateway).
        owner: String,
    },
    /// The server lists other models only.
    NotServed {
        /// The models it lists.
        models: Vec<String>,
    },
    /// No usable answer (no such endpoint, an error): calls will tell.
    Unknown,
}

/// An OpenAI-compatible chat model behind `base_url`.
pub struct OpenAiChat {
    url: String,
    base: String,
    model: String,
    api_key: Option<String>,
    http: reqwest::blocking::Client,
    retry: RetryPolicy,
    guided: bool,
}

impl OpenAiChat {
    /// A client for `model` at `api_base` (`http://host:port` or
    /// `http://host:port/v1`; a URL with another path is used as given).
    pub fn new(api_base: &str, model: &str, api_key: Option<String>, retry: RetryPolicy) -> Result<Self> {
        let base = normalize_base(api_base)?;
        let http = reqwest::blocking::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(600))
            .build()
            .map_err(|e| EvalError::Api(format!("HTTP client: {e}")))?;
        Ok(OpenAiChat {
            url: format!("{base}/chat/completions"),
            base,
            model: model.to_string(),
            api_key,
            http,
            retry,
            guided: false,
        })
    }

    /// Sends [`ChatRequest::guide`] as vLLM's `guided_choice` / `guided_regex`
    /// request fields (vicugna's gateway and vLLM understand them; OpenAI
    /// rejects them).
    pub fn with_guided(mut self, on: bool) -> Self {
        self.guided = on;
        self
    }

    /// The `/v1` base URL in use.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Asks `GET /models` about the model. vicugna's gateway lists itself as
    /// owner `vicugna`, so constrained decoding can be switched on for it.
    pub fn listing(&self) -> Listing {
        let Ok(v) = self.get_json(&format!("{}/models", self.base)) else {
            return Listing::Unknown;
        };
        let Some(data) = v["data"].as_array().filter(|d| !d.is_empty()) else {
            return Listing::Unknown;
        };
        match data.iter().find(|m| m["id"] == self.model.as_str()) {
            Some(m) => Listing::Served {
                owner: m["owned_by"].as_str().unwrap_or("").to_string(),
            },
            None => Listing::NotServed {
                models: data
                    .iter()
                    .filter_map(|m| m["id"].as_str().map(str::to_string))
                    .collect(),
            },
        }
    }

    fn get_json(&self, url: &str) -> Result<Value> {
        let mut req = self.http.get(url);
        if let Some(k) = &self.api_key {
            req = req.bearer_auth(k);
        }
        let r = req
            .send()
            .map_err(|e| EvalError::Api(format!("GET {url}: {}", error_chain(&e))))?;
        let status = r.status();
        let text = r.text().unwrap_or_default();
        if !status.is_success() {
            return Err(EvalError::Api(format!(
                "GET {url}: HTTP {status}: {}",
                api_message(&text)
            )));
        }
        serde_json::from_str(&text).map_err(|e| EvalError::Api(format!("GET {url}: not JSON ({e})")))
    }

    fn body(&self, req: &ChatRequest) -> Value {
        let mut body = json!({
            "model": self.model,
            "messages": req.messages,
            "temperature": req.temperature,
            "max_tokens": req.max_tokens,
            "n": 1,
        });
        if let Some(seed) = req.seed {
            body["seed"] = json!(seed);
        }
        match &req.guide {
            Some(Guide::Choice(c)) if self.guided => body["guided_choice"] = json!(c),
            Some(Guide::Regex(r)) if self.guided => body["guided_regex"] = json!(r),
            // OpenAI's own field: every compatible server is asked.
            Some(Guide::JsonSchema(schema)) => {
                body["response_format"] = json!({
                    "type": "json_schema",
                    "json_schema": {"name": "verdict", "strict": true, "schema": schema},
                })
            }
            _ => {}
        }
        body
    }

    /// One try: `Ok` reply, or the error with whether it is worth retrying
    /// and the server's `Retry-After`.
    fn try_once(&self, body: &Value) -> std::result::Result<ChatReply, (String, bool, Option<Duration>)> {
        let mut req = self.http.post(&self.url).json(body);
        if let Some(k) = &self.api_key {
            req = req.bearer_auth(k);
        }
        let r = match req.send() {
            Ok(r) => r,
            // Refused or reset connections and timeouts: the server may be
            // restarting or overloaded.
            Err(e) => return Err((error_chain(&e), true, None)),
        };
        let status = r.status();
        let retry_after = retry_after(r.headers());
        let text = match r.text() {
            Ok(t) => t,
            Err(e) => return Err((format!("reading the reply: {}", error_chain(&e)), true, None)),
        };
        if !status.is_success() {
            let retry = status.as_u16() == 429 || status.as_u16() == 408 || status.is_server_error();
            return Err((format!("HTTP {status}: {}", api_message(&text)), retry, retry_after));
        }
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| (format!("the reply is not JSON ({e}): {}", clip(&text)), true, None))?;
        let Some(content) = v["choices"][0]["message"]["content"].as_str() else {
            return Err((
                format!("the reply has no choices[0].message.content: {}", clip(&text)),
                false,
                None,
            ));
        };
        Ok(ChatReply {
            text: content.to_string(),
            prompt_tokens: v["usage"]["prompt_tokens"].as_u64(),
            completion_tokens: v["usage"]["completion_tokens"].as_u64(),
        })
    }
}

impl ChatModel for OpenAiChat {
    fn chat(&self, req: &ChatRequest) -> Result<ChatReply> {
        let body = self.body(req);
        let mut attempt = 0;
        loop {
            match self.try_once(&body) {
                Ok(r) => return Ok(r),
                Err((msg, retry, after)) => {
                    if !retry || attempt >= self.retry.max_retries {
                        let tries = attempt + 1;
                        return Err(EvalError::Api(format!(
                            "{} (model {}): {msg}{}",
                            self.url,
                            self.model,
                            if retry {
                                format!(" (gave up after {tries} tries)")
                            } else {
                                String::new()
                            }
                        )));
                    }
                    std::thread::sleep(self.retry.delay(attempt, after));
                    attempt += 1;
                }
            }
        }
    }

    fn supports_guide(&self) -> bool {
        self.guided
    }

    fn describe(&self) -> String {
        format!("{} at {}", self.model, self.base)
    }
}

fn normalize_base(api_base: &str) -> Result<String> {
    let trimmed = api_base.trim().trim_end_matches('/');
    let url = reqwest::Url::parse(trimmed)
        .map_err(|e| EvalError::Input(format!("API base {api_base:?} is not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(EvalError::Input(format!(
            "API base {api_base:?}: only http and https URLs work"
        )));
    }
    if url.path() == "/" || url.path().is_empty() {
        Ok(format!("{trimmed}/v1"))
    } else {
        Ok(trimmed.to_string())
    }
}

/// `Retry-After` in seconds (or `retry-after-ms`, which OpenAI also sends).
fn retry_after(h: &reqwest::header::HeaderMap) -> Option<Duration> {
    if let Some(ms) = h
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok()?.trim().parse::<f64>().ok())
    {
        return Some(Duration::from_secs_f64(ms.max(0.0) / 1000.0));
    }
    h.get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok()?.trim().parse::<f64>().ok())
        .map(|s| Duration::from_secs_f64(s.max(0.0)))
}

/// The `error.message` (OpenAI) or `message` (FastChat) of an error body, else the body.
fn api_message(text: &str) -> String {
    if let Ok(v) = serde_json::from_str::<Value>(text) {
        for m in [&v["error"]["message"], &v["message"], &v["detail"]] {
            if let Some(s) = m.as_str() {
                return s.to_string();
            }
        }
    }
    clip(text)
}

fn clip(text: &str) -> String {
    let t: String = text.chars().take(300).collect();
    if t.len() < text.len() {
        format!("{t}…")
    } else {
        t
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        src = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls() {
        assert_eq!(normalize_base("http://h:8000").unwrap(), "http://h:8000/v1");
        assert_eq!(normalize_base("http://h:8000/v1/").unwrap(), "http://h:8000/v1");
        assert_eq!(normalize_base("https://x/openai/v2").unwrap(), "https://x/openai/v2");
        assert!(normalize_base("h:8000").is_err());
    }

    #[test]
    fn backoff_doubles_and_honours_retry_after() {
        let p = RetryPolicy {
            max_retries: 5,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
        };
        let d0 = p.delay(0, None);
        let d3 = p.delay(3, None);
        assert!(
            d0 >= Duration::from_millis(100) && d0 <= Duration::from_millis(125),
            "{d0:?}"
        );
        assert!(
            d3 >= Duration::from_millis(800) && d3 <= Duration::from_secs(1),
            "{d3:?}"
        );
        assert_eq!(p.delay(10, None), Duration::from_secs(1));
        assert_eq!(p.delay(0, Some(Duration::from_millis(700))), Duration::from_millis(700));
        assert_eq!(p.delay(0, Some(Duration::from_secs(30))), Duration::from_secs(1));
    }
}
