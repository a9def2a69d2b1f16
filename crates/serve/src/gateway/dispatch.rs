//! Finding a worker through the controller (as FastChat's openai_api_server:
//! `get_worker_address`, then the worker itself), with retries around workers
//! that are dead or full, and reading a worker's stream of chunks.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use vicugna_chat::Conversation;

use super::error::ApiError;
use super::generate::{Job, JobInput};
use super::validate::GenRequest;
use super::Gateway;
use crate::protocol::{code, Chunk, ChunkSplitter, ModelList, WorkerAddress, WorkerAddressRequest};

/// How long a worker that could not be reached is avoided.
const BAD_WORKER_PENALTY: Duration = Duration::from_secs(10);
/// Workers tried for one request before giving up.
const MAX_ATTEMPTS: usize = 4;

/// What the gateway knows about one worker's model.
#[derive(Debug, Clone)]
pub struct WorkerModel {
    /// A vicugna worker: send `messages`, it applies the model's own format.
    pub renders_messages: bool,
    /// The FastChat template, to build the prompt for other workers.
    pub conv: Option<Conversation>,
    pub context_length: usize,
    /// How the model's own template writes tool calls, when it renders tools
    /// (vicugna workers); otherwise tools go in a generic system prompt.
    pub tool_syntax: Option<vicugna_chat::ToolSyntax>,
}

/// Caches and blacklists shared by requests.
#[derive(Default)]
pub struct DispatchState {
    pub worker_models: HashMap<(String, String), Arc<WorkerModel>>,
    pub bad_workers: HashMap<String, Instant>,
    /// Every model a controller has ever listed: an unknown name is a 404, a
    /// known one with no worker now is a 503.
    pub known_models: HashSet<String>,
}

/// A worker's stream of cumulative chunks.
pub struct WorkerStream {
    pub worker: String,
    pub info: Arc<WorkerModel>,
    body: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    split: ChunkSplitter,
    pending: std::collections::VecDeque<Vec<u8>>,
    /// The first chunk, read while dispatching.
    first: Option<Chunk>,
    timeout: Duration,
    ended: bool,
}

impl WorkerStream {
    /// The next chunk; `Ok(None)` at the end; `Err` if the worker failed.
    pub async fn next_chunk(&mut self) -> Result<Option<Chunk>, String> {
        if let Some(c) = self.first.take() {
            return Ok(Some(c));
        }
        loop {
            if let Some(raw) = self.pending.pop_front() {
                return serde_json::from_slice::<Chunk>(&raw).map(Some).map_err(|e| {
                    redact(
                        &self.worker,
                        format!("worker {} sent a malformed chunk: {e}", self.worker),
                    )
                });
            }
            if self.ended {
                return Ok(None);
            }
            match tokio::time::timeout(self.timeout, self.body.next()).await {
                Err(_) => {
                    return Err(redact(
                        &self.worker,
                        format!("worker {} sent nothing for {} s", self.worker, self.timeout.as_secs()),
                    ))
                }
                Ok(Some(Ok(bytes))) => self.pending.extend(self.split.push(&bytes)),
                Ok(Some(Err(e))) => {
                    return Err(redact(
                        &self.worker,
                        format!("the connection to worker {} failed: {e}", self.worker),
                    ))
                }
                Ok(None) => {
                    self.ended = true;
                    self.pending.extend(self.split.finish());
                }
            }
        }
    }
}

impl Gateway {
    fn state(&self) -> std::sync::MutexGuard<'_, DispatchState> {
        self.dispatch.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// POSTs to the controller; 503 if it cannot be reached.
    pub(crate) async fn controller<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &Value,
        timeout: Duration,
    ) -> Result<T, ApiError> {
        let url = format!("{}{path}", self.opts.controller_address);
        let r = self
            .http
            .post(&url)
            .json(body)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| {
                ApiError::unavailable(format!(
                    "the controller at {} cannot be reached: {e}",
                    self.opts.controller_address
                ))
            })?;
        if !r.status().is_success() {
            return Err(ApiError::unavailable(format!(
                "the controller answered {path} with HTTP {}",
                r.status()
            )));
        }
        r.json()
            .await
            .map_err(|e| ApiError::unavailable(format!("the controller's answer to {path} is not valid: {e}")))
    }

    /// The models workers serve now (and remembers them).
    pub async fn list_models(&self) -> Result<Vec<String>, ApiError> {
        let list: ModelList = self
            .controller("/list_models", &json!({}), Duration::from_secs(5))
            .await?;
        self.state().known_models.extend(list.models.iter().cloned());
        Ok(list.models)
    }

    /// A worker address for `model`, avoiding `exclude`; 404/503 when there is none.
    async fn pick_worker(&self, model: &str, exclude: &[String]) -> Result<Option<String>, ApiError> {
        let t0 = Instant::now();
        let req = WorkerAddressRequest {
            model: model.to_string(),
            exclude: exclude.to_vec(),
        };
        let addr: WorkerAddress = self
            .controller("/get_worker_address", &json!(req), Duration::from_secs(5))
            .await?;
        self.metrics.dispatch.observe(t0.elapsed().as_secs_f64());
        if !addr.address.is_empty() {
            self.state().known_models.insert(model.to_string());
            return Ok(Some(addr.address.trim_end_matches('/').to_string()));
        }
        if !exclude.is_empty() {
            return Ok(None);
        }
        let models = self.list_models().await?;
        if self.state().known_models.contains(model) {
            return Err(ApiError::unavailable(format!(
                "no worker serves model `{model}` right now; try again shortly"
            )));
        }
        Err(ApiError::model_not_found(model, &models))
    }

    /// Checks that `model` is served (or was), for endpoints that fail early.
    pub async fn check_model(&self, model: &str) -> Result<(), ApiError> {
        if self.state().known_models.contains(model) {
            return Ok(());
        }
        let models = self.list_models().await?;
        if models.iter().any(|m| m == model) {
            Ok(())
        } else {
            Err(ApiError::model_not_found(model, &models))
        }
    }

    async fn worker_post(&self, worker: &str, path: &str, body: &Value) -> Result<Value, String> {
        let r = self
            .http
            .post(format!("{worker}{path}"))
            .json(body)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| redact(worker, format!("worker {worker} cannot be reached: {e}")))?;
        if !r.status().is_success() {
            return Err(redact(
                worker,
                format!("worker {worker} answered {path} with HTTP {}", r.status()),
            ));
        }
        r.json()
            .await
            .map_err(|e| redact(worker, format!("worker {worker}: bad answer to {path}: {e}")))
    }

    /// The worker's template and context length, cached per worker and model.
    pub(crate) async fn worker_model(&self, worker: &str, model: &str) -> Result<Arc<WorkerModel>, String> {
        let key = (worker.to_string(), model.to_string());
        if let Some(w) = self.state().worker_models.get(&key) {
            return Ok(w.clone());
        }
        let conv = self
            .worker_post(worker, "/worker_get_conv_template", &json!({"model": model}))
            .await?;
        let details = self
            .worker_post(worker, "/model_details", &json!({"model": model}))
            .await?;
        let renders_messages = conv.get("renders_messages").and_then(Value::as_bool) == Some(true);
        let tool_syntax = conv
            .get("tool_syntax")
            .and_then(Value::as_str)
            .and_then(vicugna_chat::ToolSyntax::from_name)
            .filter(|_| renders_messages);
        // A template that does not parse, or cannot render a plain user turn,
        // is no template: this worker cannot take chats until it sends a good one.
        let conv: Option<Conversation> = conv
            .get("conv")
            .and_then(|c| serde_json::from_value(c.clone()).ok())
            .filter(|c: &Conversation| {
                vicugna_chat::ChatFormat::Named(c.clone())
                    .render(&[vicugna_chat::ChatMessage::new("user", "hi")], None)
                    .is_ok()
            });
        let info = Arc::new(WorkerModel {
            renders_messages,
            conv,
            context_length: details.get("context_length").and_then(Value::as_u64).unwrap_or(2048) as usize,
            tool_syntax,
        });
        // Not cached when the template is unusable: a later request asks again
        // (the worker may have been fixed or replaced at the same address).
        if renders_messages || info.conv.is_some() {
            self.state().worker_models.insert(key, info.clone());
        }
        Ok(info)
    }

    /// `/count_token` on a worker (for workers that render no messages).
    pub(crate) async fn count_tokens(&self, worker: &str, model: &str, prompt: &str) -> Result<usize, ApiError> {
        let v = self
            .worker_post(worker, "/count_token", &json!({"model": model, "prompt": prompt}))
            .await
            .map_err(ApiError::worker_failed)?;
        v.get("count")
            .and_then(Value::as_u64)
            .map(|c| c as usize)
            .ok_or_else(|| {
                ApiError::worker_failed(redact(
                    worker,
                    format!("worker {worker}: /count_token gave no count: {v}"),
                ))
            })
    }

    fn mark_bad(&self, worker: &str) {
        self.state().bad_workers.insert(worker.to_string(), Instant::now());
        // Forget cached facts: a restarted worker may serve something else.
        self.state().worker_models.retain(|(w, _), _| w != worker);
    }

    fn is_bad(&self, worker: &str) -> bool {
        let mut st = self.state();
        match st.bad_workers.get(worker) {
            Some(t) if t.elapsed() < BAD_WORKER_PENALTY => true,
            Some(_) => {
                st.bad_workers.remove(worker);
                false
            }
            None => false,
        }
    }

    /// Opens a generation on some worker of `model`: `build` makes the worker's
    /// parameters once its kind is known. Returns after the first chunk, so that
    /// validation errors, a full queue or a dead worker are answered with the
    /// right status (and a dead or full worker is replaced by another).
    pub async fn open_stream(&self, req: &GenRequest, job: &Job) -> Result<WorkerStream, ApiError> {
        let model = req.model.as_str();
        let mut exclude: Vec<String> = Vec::new();
        // Workers that failed recently: tried only when no other is left.
        let mut skipped: Vec<String> = Vec::new();
        let mut last_err: Option<ApiError> = None;
        for _ in 0..MAX_ATTEMPTS + 2 {
            let worker = match self.pick_worker(model, &exclude).await? {
                Some(w) if self.is_bad(&w) => {
                    exclude.push(w.clone());
                    skipped.push(w);
                    continue;
                }
                Some(w) => w,
                None => match skipped.pop() {
                    Some(w) => w,
                    None => break,
                },
            };
            let info = match self.worker_model(&worker, model).await {
                Ok(i) => i,
                Err(e) => {
                    self.mark_bad(&worker);
                    exclude.push(worker);
                    last_err = Some(ApiError::unavailable(e));
                    continue;
                }
            };
            if matches!(job.input, JobInput::Chat(_)) && !info.renders_messages && info.conv.is_none() {
                // Another worker of the model may have a usable template.
                eprintln!("gateway: worker {worker} gave no usable conversation template for {model}");
                self.mark_bad(&worker);
                exclude.push(worker);
                last_err = Some(ApiError::worker_failed(format!(
                    "the worker of model `{model}` gave no usable conversation template"
                )));
                continue;
            }
            let params = self.gen_params(req, job, &worker, &info).await?;
            let sent = self
                .http
                .post(format!("{worker}/worker_generate_stream"))
                .json(&params)
                .send()
                .await;
            let resp = match sent {
                Ok(r) if r.status().is_success() => r,
                Ok(r) => {
                    last_err = Some(ApiError::worker_failed(redact(
                        &worker,
                        format!("worker {worker} answered HTTP {}", r.status()),
                    )));
                    exclude.push(worker);
                    continue;
                }
                Err(e) => {
                    self.mark_bad(&worker);
                    last_err = Some(ApiError::unavailable(redact(
                        &worker,
                        format!("worker {worker} cannot be reached: {e}"),
                    )));
                    exclude.push(worker);
                    continue;
                }
            };
            let mut stream = WorkerStream {
                worker: worker.clone(),
                info,
                body: resp.bytes_stream().boxed(),
                split: ChunkSplitter::default(),
                pending: Default::default(),
                first: None,
                timeout: self.opts.worker_timeout,
                ended: false,
            };
            match stream.next_chunk().await {
                Ok(Some(c)) if c.error_code == code::ENGINE_OVERLOADED => {
                    // The worker's reason names its internal address: not for clients.
                    last_err = Some(ApiError::overloaded(format!(
                        "every worker of model `{model}` is busy; try again shortly"
                    )));
                    exclude.push(worker);
                }
                Ok(Some(c)) if c.error_code != 0 => return Err(ApiError::from_worker(c.error_code, c.error_reason())),
                Ok(Some(c)) => {
                    stream.first = Some(c);
                    return Ok(stream);
                }
                Ok(None) => {
                    last_err = Some(ApiError::worker_failed(redact(
                        &worker,
                        format!("worker {worker} ended the stream at once"),
                    )));
                    exclude.push(worker);
                }
                Err(e) => {
                    self.mark_bad(&worker);
                    last_err = Some(ApiError::unavailable(e));
                    exclude.push(worker);
                }
            }
        }
        Err(last_err
            .unwrap_or_else(|| ApiError::unavailable(format!("no worker of model `{model}` could take the request"))))
    }

    /// POSTs to a worker of `model` (non-streaming endpoints), with the same retries.
    pub async fn call_worker(&self, model: &str, path: &str, body: &Value) -> Result<Value, ApiError> {
        let mut exclude: Vec<String> = Vec::new();
        let mut last_err = None;
        for _ in 0..MAX_ATTEMPTS {
            let Some(worker) = self.pick_worker(model, &exclude).await? else {
                break;
            };
            let sent = self
                .http
                .post(format!("{worker}{path}"))
                .json(body)
                .timeout(self.opts.worker_timeout)
                .send()
                .await;
            let v: Value = match sent {
                Ok(r) if r.status().is_success() => match r.json().await {
                    Ok(v) => v,
                    Err(e) => {
                        return Err(ApiError::worker_failed(redact(
                            &worker,
                            format!("worker {worker}: bad answer: {e}"),
                        )))
                    }
                },
                Ok(r) => {
                    last_err = Some(ApiError::worker_failed(redact(
                        &worker,
                        format!("worker {worker} answered HTTP {}", r.status()),
                    )));
                    exclude.push(worker);
                    continue;
                }
                Err(e) => {
                    self.mark_bad(&worker);
                    last_err = Some(ApiError::unavailable(redact(
                        &worker,
                        format!("worker {worker} cannot be reached: {e}"),
                    )));
                    exclude.push(worker);
                    continue;
                }
            };
            let err_code = v.get("error_code").and_then(Value::as_i64).unwrap_or(0);
            if err_code == code::ENGINE_OVERLOADED {
                last_err = Some(ApiError::overloaded(format!("every worker of model `{model}` is busy")));
                exclude.push(worker);
                continue;
            }
            if err_code != 0 {
                let c: Chunk = serde_json::from_value(v.clone()).unwrap_or_default();
                return Err(ApiError::from_worker(err_code, c.error_reason()));
            }
            return Ok(v);
        }
        Err(last_err
            .unwrap_or_else(|| ApiError::unavailable(format!("no worker of model `{model}` could take the request"))))
    }
}

/// A worker failure as clients see it: the worker's internal address (also inside
/// a transport error's URL) becomes "a worker"; the whole message goes to the log.
fn redact(worker: &str, msg: String) -> String {
    eprintln!("gateway: {msg}");
    msg.replace(&format!("worker {worker}"), "a worker")
        .replace(worker, "<worker>")
}

#[cfg(test)]
mod redact_tests {
    use super::redact;

    #[test]
    fn worker_addresses_do_not_reach_clients() {
        let w = "http://10.0.0.5:21002";
        let msg = redact(
            w,
            format!("worker {w} cannot be reached: error sending request for url ({w}/worker_generate_stream)"),
        );
        assert_eq!(
            msg,
            "a worker cannot be reached: error sending request for url (<worker>/worker_generate_stream)"
        );
    }
}
