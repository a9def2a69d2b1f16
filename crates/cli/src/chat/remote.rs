//! `vicugna chat --api-base URL`: the conversation goes to a running
//! OpenAI-compatible server (`vicugna serve`, FastChat's API server, vLLM, a
//! hosted API) as streaming `/chat/completions` calls; the server applies the
//! model's template and its context limit.

use std::io::{BufRead, BufReader};
use std::sync::mpsc::Sender;
use std::time::Duration;

use anyhow::{bail, Result};
use serde_json::{json, Value};
use vicugna_chat::ChatMessage;

/// One piece of a streamed answer.
pub enum Piece {
    /// Text to append.
    Text(String),
    /// The answer is complete; the server's completion token count when it sent one.
    Done(Option<usize>),
    /// The call failed; the message says why.
    Error(String),
}

/// A chat model behind an OpenAI-compatible API.
#[derive(Clone)]
pub struct Remote {
    /// The `/v1` base URL.
    pub base: String,
    /// The model's name as the server lists it.
    pub model: String,
    api_key: Option<String>,
    http: reqwest::blocking::Client,
}

/// Sampling settings sent with every call.
pub struct RemoteSampling {
    pub temperature: f32,
    pub top_p: f32,
    pub repetition_penalty: f32,
    pub max_tokens: usize,
    pub seed: Option<u64>,
}

impl Remote {
    /// Connects to `api_base` (`http://host:port` or `…/v1`) and checks that
    /// it serves `model`. `model` of `None` picks the server's only model.
    pub fn connect(api_base: &str, model: Option<&str>, api_key: Option<String>) -> Result<Remote> {
        let base = normalize_base(api_base)?;
        let http = reqwest::blocking::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            // Answers stream for as long as they take; Ctrl-C ends them.
            .timeout(None)
            .build()?;
        let mut remote = Remote {
            base,
            model: String::new(),
            api_key,
            http,
        };
        let models = remote.models()?;
        remote.model = match model {
            Some(m) if models.iter().any(|x| x == m) => m.to_string(),
            Some(m) => bail!(
                "the server at {} does not serve model {m:?}; it serves: {} (choose one with --model)",
                remote.base,
                list(&models)
            ),
            None => match models.as_slice() {
                [one] => one.clone(),
                [] => bail!(
                    "the server at {} lists no models yet (are its workers up?); name one with --model",
                    remote.base
                ),
                _ => bail!(
                    "the server at {} serves several models: {}; choose one with --model",
                    remote.base,
                    list(&models)
                ),
            },
        };
        Ok(remote)
    }

    /// `GET /models`: the names the server serves.
    fn models(&self) -> Result<Vec<String>> {
        let url = format!("{}/models", self.base);
        let mut req = self.http.get(&url).timeout(Duration::from_secs(30));
        if let Some(k) = &self.api_key {
            req = req.bearer_auth(k);
        }
        let r = match req.send() {
            Ok(r) => r,
            Err(e) => bail!(
                "cannot reach the server at {}: {} (is `vicugna serve` running there?)",
                self.base,
                error_chain(&e)
            ),
        };
        let status = r.status();
        let text = r.text().unwrap_or_default();
        if !status.is_success() {
            bail!("GET {url}: HTTP {status}: {}", api_message(&text));
        }
        let v: Value = serde_json::from_str(&text).map_err(|e| {
            anyhow::anyhow!("GET {url}: the answer is not JSON ({e}); is this an OpenAI-compatible API?")
        })?;
        let Some(data) = v["data"].as_array() else {
            bail!("GET {url}: the answer has no `data` list; is this an OpenAI-compatible API?");
        };
        Ok(data
            .iter()
            .filter_map(|m| m["id"].as_str().map(str::to_string))
            .collect())
    }

    /// The request body for the conversation so far.
    pub fn body(&self, system: Option<&str>, messages: &[ChatMessage], s: &RemoteSampling) -> Value {
        let mut msgs = Vec::new();
        if let Some(sys) = system {
            msgs.push(json!({"role": "system", "content": sys}));
        }
        for m in messages {
            msgs.push(json!({"role": m.role, "content": m.content}));
        }
        let mut body = json!({
            "model": self.model,
            "messages": msgs,
            "stream": true,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "max_tokens": s.max_tokens,
        });
        if let Some(seed) = s.seed {
            body["seed"] = json!(seed);
        }
        // Not an OpenAI field (vLLM's and vicugna's): sent only when asked for.
        if s.repetition_penalty != 1.0 {
            body["repetition_penalty"] = json!(s.repetition_penalty);
        }
        body
    }

    /// Posts `body` and sends the streamed pieces to `tx` until the answer
    /// ends, fails, or `tx`'s receiver is gone (which closes the connection
    /// and so cancels the answer on the server).
    pub fn stream(&self, body: &Value, tx: &Sender<Piece>) {
        let url = format!("{}/chat/completions", self.base);
        let mut req = self.http.post(&url).json(body);
        if let Some(k) = &self.api_key {
            req = req.bearer_auth(k);
        }
        let r = match req.send() {
            Ok(r) => r,
            Err(e) => {
                let _ = tx.send(Piece::Error(format!("cannot reach {url}: {}", error_chain(&e))));
                return;
            }
        };
        let status = r.status();
        if !status.is_success() {
            let text = r.text().unwrap_or_default();
            let _ = tx.send(Piece::Error(format!("HTTP {status}: {}", api_message(&text))));
            return;
        }
        let mut tokens = None;
        for line in BufReader::new(r).lines() {
            let line = match line {
                Ok(l) => l,
                Err(e) => {
                    let _ = tx.send(Piece::Error(format!("the stream broke: {e}")));
                    return;
                }
            };
            let Some(data) = line.strip_prefix("data:").map(str::trim) else {
                continue;
            };
            if data == "[DONE]" {
                break;
            }
            let v: Value = match serde_json::from_str(data) {
                Ok(v) => v,
                Err(e) => {
                    let _ = tx.send(Piece::Error(format!("a streamed event is not JSON ({e}): {data}")));
                    return;
                }
            };
            if !v["error"].is_null() {
                let _ = tx.send(Piece::Error(api_message(data)));
                return;
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                tokens = Some(n as usize);
            }
            if let Some(text) = v["choices"][0]["delta"]["content"].as_str() {
                if !text.is_empty() && tx.send(Piece::Text(text.to_string())).is_err() {
                    return;
                }
            }
        }
        let _ = tx.send(Piece::Done(tokens));
    }
}

fn list(models: &[String]) -> String {
    if models.is_empty() {
        "none".to_string()
    } else {
        models.join(", ")
    }
}

/// `http://host:port` → `http://host:port/v1`; a URL with a path is kept.
fn normalize_base(api_base: &str) -> Result<String> {
    let trimmed = api_base.trim().trim_end_matches('/');
    let url = reqwest::Url::parse(trimmed).map_err(|e| anyhow::anyhow!("--api-base {api_base:?} is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        bail!("--api-base {api_base:?}: only http and https URLs work");
    }
    if url.path() == "/" || url.path().is_empty() {
        Ok(format!("{trimmed}/v1"))
    } else {
        Ok(trimmed.to_string())
    }
}

/// The error message of an OpenAI-style error body, else the body (clipped).
fn api_message(text: &str) -> String {
    if let Ok(v) = serde_json::from_str::<Value>(text) {
        for m in [&v["error"]["message"], &v["message"], &v["detail"], &v["error"]] {
            if let Some(s) = m.as_str() {
                return s.to_string();
            }
        }
    }
    let t: String = text.chars().take(300).collect();
    if t.len() < text.len() {
        format!("{t}…")
    } else {
        t
    }
}

/// An error with its causes ("error sending request: connection refused").
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
        assert_eq!(
            normalize_base("http://127.0.0.1:8000").unwrap(),
            "http://127.0.0.1:8000/v1"
        );
        assert_eq!(normalize_base("http://h:1/v1/").unwrap(), "http://h:1/v1");
        assert!(normalize_base("ftp://h").is_err());
        assert!(normalize_base("not a url").is_err());
    }

    #[test]
    fn error_messages_are_taken_from_the_body() {
        assert_eq!(api_message(r#"{"error":{"message":"no such model"}}"#), "no such model");
        assert_eq!(api_message(r#"{"object":"error","message":"m"}"#), "m");
        assert_eq!(api_message("plain"), "plain");
    }

    #[test]
    fn an_unreachable_server_is_named() {
        // A port just freed: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let e = Remote::connect(&format!("http://127.0.0.1:{port}"), None, None)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("cannot reach the server at http://127.0.0.1:"), "{e}");
    }
}
