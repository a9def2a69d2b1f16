//! Classification through an OpenAI-compatible chat completions API (vicugna's
//! own gateway, FastChat, or a hosted service). The answer is asked for as
//! JSON under a schema whose `label` is an enum of the labels
//! (`response_format: json_schema`), which vicugna's engine enforces, so it
//! always names exactly one label. A server that refuses `response_format`
//! with a 400 is asked again in free text (with one warning), and free text is
//! parsed ([`super::parse::parse_label`]); an answer with no single label is
//! retried with sampling, and counted as a parse failure.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    /// Ask for a schema-shaped answer (`{"label": enum}`) rather than free text.
    pub schema: bool,
}

impl Default for ApiOptions {
    fn default() -> Self {
        ApiOptions {
            temperature: 0.7,
            max_tokens: 256,
            retries: 2,
            timeout_s: 300,
            schema: true,
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
    /// Cleared (once, with a warning) when the server refuses `response_format`.
    schema: AtomicBool,
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
            schema: AtomicBool::new(opts.schema),
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
        match self.send(path, body)? {
            Ok(v) => Ok(v),
            Err((_, e)) => Err(e),
        }
    }

    /// Posts `body`; an HTTP error comes back as its status and the error to report.
    fn send(&self, path: &str, body: &Value) -> Result<std::result::Result<Value, (u16, ClassifyError)>> {
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
        let v: Value = match serde_json::from_str(&text) {
            Ok(v) => v,
            Err(_) if !status.is_success() => Value::String(text.chars().take(200).collect()),
            Err(_) => {
                return Err(err(format!(
                    "HTTP {status}, not JSON: {}",
                    text.chars().take(200).collect::<String>()
                )))
            }
        };
        if !status.is_success() {
            let msg = v["error"]["message"]
                .as_str()
                .or(v["detail"].as_str())
                .or(v.as_str())
                .map(str::to_string)
                .unwrap_or_else(|| v.to_string());
            return Ok(Err((status.as_u16(), err(format!("HTTP {status}: {msg}")))));
        }
        Ok(Ok(v))
    }

    /// One chat completion of a single user turn, in free text.
    fn chat(&self, user: &str, seed: Option<u64>) -> Result<String> {
        self.chat_as(user, seed, None)
    }

    /// One chat completion, asked to follow `format` (a `response_format`)
    /// when given and the server has not refused one before.
    fn chat_as(&self, user: &str, seed: Option<u64>, format: Option<&Value>) -> Result<String> {
        let mut body = json!({
            "model": self.model,
            "messages": [{"role": "user", "content": user}],
            "max_tokens": self.opts.max_tokens,
            "temperature": if seed.is_some() { self.opts.temperature } else { 0.0 },
        });
        if let Some(s) = seed {
            body["seed"] = json!(s);
        }
        let v = match format.filter(|_| self.schema.load(Ordering::Relaxed)) {
            None => self.post("/chat/completions", &body)?,
            Some(f) => {
                let mut with = body.clone();
                with["response_format"] = f.clone();
                match self.send("/chat/completions", &with)? {
                    Ok(v) => v,
                    // 400/422: perhaps a server without response_format. If the
                    // same request without it succeeds, that was the reason.
                    Err((400 | 422, refusal)) => {
                        let v = self.post("/chat/completions", &body)?;
                        if self.schema.swap(false, Ordering::Relaxed) {
                            eprintln!(
                                "warning: {} refused response_format ({refusal}); asking for free text and parsing the label out of it",
                                self.base
                            );
                        }
                        v
                    }
                    Err((_, e)) => return Err(e),
                }
            }
        };
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

/// Longest clues and reasoning asked for in a schema-shaped answer, in
/// characters, so that the label still fits in `max_tokens`.
const SCHEMA_CLUES_CHARS: usize = 300;
const SCHEMA_REASONING_CHARS: usize = 500;

/// The `response_format` asking for `{"label": one of the labels}`, after the
/// clues and reasoning that `method` writes first.
pub fn label_format(prompts: &Prompts, method: Method) -> Value {
    // The answer's properties come in the schema's order, and JSON maps here
    // (and in vicugna's server) keep keys sorted: `clues` < `explanation` <
    // `label` puts the reasoning before the label it leads to.
    let mut props = serde_json::Map::new();
    let text = |max: usize| json!({"type": "string", "maxLength": max});
    if method == Method::Carp {
        props.insert("clues".into(), text(SCHEMA_CLUES_CHARS));
    }
    if method != Method::Vanilla {
        props.insert("explanation".into(), text(SCHEMA_REASONING_CHARS));
    }
    props.insert("label".into(), json!({"enum": prompts.labels.names()}));
    let required: Vec<&String> = props.keys().collect();
    json!({
        "type": "json_schema",
        "json_schema": {
            "name": "label",
            "strict": true,
            "schema": {
                "type": "object",
                "properties": props,
                "required": required,
                "additionalProperties": false,
            },
        },
    })
}

/// The label, clues and reasoning of a schema-shaped answer; `None` when the
/// answer is not such JSON (a server that ignored `response_format`).
fn read_json_answer(answer: &str, prompts: &Prompts) -> Option<(usize, String, String)> {
    let v: Value = serde_json::from_str(answer.trim()).ok()?;
    let label = prompts.labels.index(v["label"].as_str()?)?;
    let field = |k: &str| v[k].as_str().unwrap_or_default().trim().to_string();
    Some((label, field("clues"), field("explanation")))
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
        let format = self.opts.schema.then(|| label_format(prompts, method));
        let mut last = String::new();
        for attempt in 0..=self.opts.retries {
            // Retries sample, so that they can differ from the failed answer.
            let s = match (seed, attempt) {
                (s, 0) => s,
                (s, a) => Some(s.unwrap_or(0).wrapping_add(1000 + a as u64)),
            };
            let answer = self.chat_as(&user, s, format.as_ref())?;
            if let Some((label, clues, reasoning)) = read_json_answer(&answer, prompts) {
                return Ok(Vote {
                    label: Some(label),
                    probs: None,
                    clues,
                    reasoning,
                });
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::labels::LabelSet;
    use crate::classify::prompt::Lang;

    fn prompts() -> Prompts {
        Prompts::new(LabelSet::from_list("positive,negative").unwrap(), Lang::En, None, 100)
    }

    #[test]
    fn the_schema_names_the_labels_after_the_reasoning() {
        let f = label_format(&prompts(), Method::Vanilla);
        let schema = &f["json_schema"]["schema"];
        assert_eq!(f["type"], "json_schema");
        assert_eq!(schema["properties"]["label"]["enum"], json!(["positive", "negative"]));
        assert_eq!(schema["required"], json!(["label"]));
        assert_eq!(schema["additionalProperties"], json!(false));
        let carp = label_format(&prompts(), Method::Carp);
        let keys: Vec<&String> = carp["json_schema"]["schema"]["properties"]
            .as_object()
            .unwrap()
            .keys()
            .collect();
        assert_eq!(keys, ["clues", "explanation", "label"]);
    }

    #[test]
    fn json_answers_are_read_and_others_left_to_the_text_parser() {
        let p = prompts();
        assert_eq!(
            read_json_answer(r#"{"clues": "love", "explanation": "happy", "label": "positive"}"#, &p),
            Some((0, "love".into(), "happy".into()))
        );
        assert_eq!(read_json_answer(r#"{"label": "negative"}"#, &p).map(|a| a.0), Some(1));
        assert_eq!(read_json_answer(r#"{"label": "neutral"}"#, &p), None);
        assert_eq!(read_json_answer("LABEL: positive", &p), None);
        assert_eq!(read_json_answer(r#"{"explanation": "cut of"#, &p), None);
    }
}
