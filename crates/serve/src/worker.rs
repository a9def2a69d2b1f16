//! The model worker: a thin async layer over one [`EngineHandle`], speaking
//! FastChat's worker protocol. The engine thread does the batching; the worker
//! bounds how many requests it holds (`limit_worker_concurrency` in the batch,
//! `max_queue` waiting), registers with the controller and sends heartbeats.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use vicugna_chat::{ChatFormat, Conversation};
use vicugna_engine::{
    Constraint, EngineError, EngineHandle, Event, GenerateRequest, Prompt, SamplingParams, StopRules,
};

use crate::control::{self, ControlAuth};
use crate::metrics::WorkerMetrics;
use crate::protocol::{
    code, Chunk, EmbeddingParams, EmbeddingReply, GenerateParams, HeartBeat, HeartBeatReply, LogProbs, ModelDetails,
    RegisterWorker, UsageInfo, WorkerStatus,
};

/// FastChat's `FASTCHAT_WORKER_HEART_BEAT_INTERVAL` default.
pub const DEFAULT_HEART_BEAT_INTERVAL: Duration = Duration::from_secs(45);
/// Most alternatives per token a worker computes (the gateway's limit too).
pub const MAX_LOGPROBS: usize = crate::gateway::validate::MAX_TOP_LOGPROBS;
/// Most stop strings in one request: the gateway's limit, plus room for the
/// ones a chat template adds.
pub const MAX_STOP: usize = crate::gateway::validate::MAX_STOP * 2;
/// Most inputs in one `/worker_get_embeddings` call (OpenAI's limit per request).
pub const MAX_EMBEDDING_INPUTS: usize = 2048;

/// How often a request waiting for a batch slot sends an empty chunk.
const KEEP_ALIVE: Duration = Duration::from_secs(20);

/// Default of [`WorkerOptions::embed_max_request_tokens`].
pub const DEFAULT_EMBED_MAX_REQUEST_TOKENS: usize = 32768;

/// Worker settings.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// How the controller and the gateway reach this worker, e.g. `http://10.0.0.5:21002`.
    pub worker_address: String,
    pub controller_address: String,
    /// Names the model is served under (the first is the main one).
    pub model_names: Vec<String>,
    /// A FastChat template name that overrides the model's own format.
    pub conv_template: Option<String>,
    /// A Jinja chat template that replaces the model's own (vLLM's
    /// `--chat-template`); rendered with the model's BOS/EOS strings.
    pub chat_template: Option<String>,
    /// Requests in the engine's batch at once.
    pub limit_worker_concurrency: usize,
    /// Requests allowed to wait for a batch slot; more are refused (429 at the gateway).
    pub max_queue: usize,
    /// Send a chunk every this many tokens.
    pub stream_interval: usize,
    pub heart_beat_interval: Duration,
    /// Register with the controller and send heartbeats.
    pub register: bool,
    /// Embeddings: cut over-long inputs to the context instead of pooling chunks.
    pub embed_in_truncate: bool,
    /// The control secret: required of callers and sent to the controller.
    pub control: ControlAuth,
    /// Embeddings: most tokens of one input (0: the context length, also the most).
    pub embed_max_input_tokens: usize,
    /// Embeddings: most tokens of all inputs of one call together.
    pub embed_max_request_tokens: usize,
}

impl WorkerOptions {
    /// Defaults for a worker at `worker_address` reporting to `controller_address`.
    pub fn new(worker_address: &str, controller_address: &str, model_names: Vec<String>) -> Self {
        WorkerOptions {
            worker_address: worker_address.trim_end_matches('/').to_string(),
            controller_address: controller_address.trim_end_matches('/').to_string(),
            model_names,
            conv_template: None,
            chat_template: None,
            limit_worker_concurrency: 16,
            max_queue: 256,
            stream_interval: 1,
            heart_beat_interval: DEFAULT_HEART_BEAT_INTERVAL,
            register: true,
            embed_in_truncate: false,
            control: ControlAuth::default(),
            embed_max_input_tokens: 0,
            embed_max_request_tokens: DEFAULT_EMBED_MAX_REQUEST_TOKENS,
        }
    }
}

/// The default served name of a model: its file or directory name without `.gguf`.
pub fn default_model_name(engine: &EngineHandle) -> String {
    let name = &engine.info().name;
    name.strip_suffix(".gguf").unwrap_or(name).to_string()
}

/// A worker serving one engine.
pub struct Worker {
    engine: EngineHandle,
    opts: WorkerOptions,
    format: ChatFormat,
    /// What `/worker_get_conv_template` returns (a FastChat template).
    conv: Conversation,
    permits: Arc<Semaphore>,
    /// Slots of each group of requests (the choices of one API call) in flight.
    groups: std::sync::Mutex<HashMap<u64, Arc<Semaphore>>>,
    running: AtomicUsize,
    waiting: AtomicUsize,
    metrics: WorkerMetrics,
    http: reqwest::Client,
}

/// A batch slot; frees itself when dropped.
struct Slot {
    _permit: OwnedSemaphorePermit,
    /// The slot's share of its group, if it has one.
    group: Option<(u64, OwnedSemaphorePermit)>,
    worker: Arc<Worker>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.worker.running.fetch_sub(1, Ordering::SeqCst);
        if let Some((g, permit)) = self.group.take() {
            drop(permit);
            let mut groups = self.worker.groups.lock().unwrap_or_else(|e| e.into_inner());
            // The last request of the group forgets it.
            if groups.get(&g).is_some_and(|s| Arc::strong_count(s) == 1) {
                groups.remove(&g);
            }
        }
    }
}

struct WaitGuard<'a>(&'a AtomicUsize);

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A request the worker cannot take: FastChat error code and reason.
type Refusal = (i64, String);

impl Worker {
    /// A worker over `engine`; fails if `conv_template` names no template.
    pub fn new(engine: EngineHandle, opts: WorkerOptions) -> anyhow::Result<Arc<Self>> {
        let path = engine.info().path.display().to_string();
        let tok = engine.tokenizer();
        let (bos, eos) = tok.map_or(("", ""), |t| (t.bos_token().unwrap_or(""), t.eos_token().unwrap_or("")));
        let model_template = match &opts.chat_template {
            Some(src) => Some((src.as_str(), bos, eos)),
            None => tok.and_then(|t| t.chat_template()).map(|src| (src, bos, eos)),
        };
        let format = ChatFormat::select(opts.conv_template.as_deref(), model_template, &path)?;
        let conv = match &format {
            ChatFormat::Named(c) => c.clone(),
            ChatFormat::Hf { .. } => wire_template(model_template.map(|t| t.0), &path),
        };
        let limit = opts.limit_worker_concurrency.max(1);
        Ok(Arc::new(Worker {
            engine,
            format,
            conv,
            permits: Arc::new(Semaphore::new(limit)),
            groups: std::sync::Mutex::new(HashMap::new()),
            running: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            metrics: WorkerMetrics::default(),
            http: opts.control.client(Some(Duration::from_secs(5))),
            opts,
        }))
    }

    /// The options the worker runs with.
    pub fn options(&self) -> &WorkerOptions {
        &self.opts
    }

    /// The name of the prompt format in use.
    pub fn format_name(&self) -> &str {
        self.format.name()
    }

    /// Requests in the batch plus those waiting for it (FastChat's definition).
    pub fn queue_length(&self) -> usize {
        self.running.load(Ordering::SeqCst) + self.waiting.load(Ordering::SeqCst)
    }

    /// `/worker_get_status`.
    pub fn status(&self) -> WorkerStatus {
        WorkerStatus {
            model_names: self.opts.model_names.clone(),
            speed: 1.0,
            queue_length: self.queue_length(),
        }
    }

    /// Waits for a batch slot, or refuses at once when the waiting line is full.
    /// A request of a `group` first waits for one of the group's slots (half
    /// the batch), so one API call's `n` choices leave room for others.
    async fn acquire(self: &Arc<Self>, group: Option<u64>) -> Result<Slot, Refusal> {
        let waiting = self.waiting.fetch_add(1, Ordering::SeqCst);
        let guard = WaitGuard(&self.waiting);
        if self.permits.available_permits() == 0 && waiting >= self.opts.max_queue {
            self.metrics.rejected.fetch_add(1, Ordering::Relaxed);
            return Err((
                code::ENGINE_OVERLOADED,
                format!(
                    "the worker is full: {} requests running and {} waiting (limit {} + {})",
                    self.running.load(Ordering::SeqCst),
                    waiting,
                    self.opts.limit_worker_concurrency,
                    self.opts.max_queue
                ),
            ));
        }
        let closed = |_| (code::INTERNAL_ERROR, "the worker is shutting down".to_string());
        let group = match group {
            Some(g) => {
                let share = (self.opts.limit_worker_concurrency / 2).max(1);
                let sem = self
                    .groups
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(g)
                    .or_insert_with(|| Arc::new(Semaphore::new(share)))
                    .clone();
                Some((g, sem.acquire_owned().await.map_err(closed)?))
            }
            None => None,
        };
        let permit = self.permits.clone().acquire_owned().await.map_err(closed)?;
        self.running.fetch_add(1, Ordering::SeqCst);
        drop(guard);
        Ok(Slot {
            _permit: permit,
            group,
            worker: self.clone(),
        })
    }

    /// Whether a text prompt should get the tokenizer's special tokens: yes
    /// (as FastChat's `tokenizer(prompt)`), unless it already starts with BOS.
    fn add_special_for(&self, text: &str) -> bool {
        let bos = self.engine.tokenizer().and_then(|t| t.bos_token()).unwrap_or("");
        bos.is_empty() || !text.starts_with(bos)
    }

    fn tokenize(&self, text: &str, add_special: bool) -> Result<Vec<u32>, Refusal> {
        // A text that cannot fit the context is refused before the tokenizer
        // spends time and memory on it.
        let ctx = self.engine.info().context_length;
        self.engine.check_text_len(text, ctx).map_err(|e| engine_refusal(&e))?;
        let tok = self.engine.tokenizer().ok_or_else(|| {
            (
                code::PARAM_OUT_OF_RANGE,
                "this model has no tokenizer: send the prompt as token ids".to_string(),
            )
        })?;
        tok.encode(text, add_special)
            .map_err(|e| (code::INTERNAL_ERROR, e.to_string()))
    }

    /// [`Self::tokenize`] with special-token strings inside `spans` (untrusted
    /// text: message contents) encoded as text.
    fn tokenize_literal(
        &self,
        text: &str,
        spans: &[std::ops::Range<usize>],
        add_special: bool,
    ) -> Result<Vec<u32>, Refusal> {
        let ctx = self.engine.info().context_length;
        self.engine.check_text_len(text, ctx).map_err(|e| engine_refusal(&e))?;
        let tok = self.engine.tokenizer().ok_or_else(|| {
            (
                code::PARAM_OUT_OF_RANGE,
                "this model has no tokenizer: send the prompt as token ids".to_string(),
            )
        })?;
        tok.encode_with_literal_spans(text, spans, add_special)
            .map_err(|e| match e {
                EngineError::InvalidRequest(m) => (code::PARAM_OUT_OF_RANGE, format!("literal_spans: {m}")),
                e => (code::INTERNAL_ERROR, e.to_string()),
            })
    }

    /// Turns FastChat parameters into an engine request (tokenizes: call off the
    /// async threads). Returns the request and the prompt text, for echo.
    fn build_request(&self, p: &GenerateParams) -> Result<(GenerateRequest, String), Refusal> {
        let bad = |m: String| Err((code::PARAM_OUT_OF_RANGE, m));
        let mut stop_strings = Vec::new();
        let mut stop_token_ids = p.stop_token_ids.clone().unwrap_or_default();
        let (ids, text) = if let Some(messages) = &p.messages {
            // Message contents are untrusted text: special-token strings in them
            // are encoded as text unless the caller opted into FastChat's parsing.
            let (text, spans) = self
                .format
                .render_with_spans_tools(messages, None, p.tools.as_deref())
                .map_err(|e| (code::PARAM_OUT_OF_RANGE, e.to_string()))?;
            // Under a constraint the answer ends where the constraint completes;
            // the template's stop strings (text such as `<|im_end|>` that a
            // JSON string may spell out) would only cut it short and invalid.
            let constrained = p.guided_choice.is_some() || p.guided_regex.is_some() || p.guided_json.is_some();
            if !constrained {
                stop_strings.extend(self.format.stop_strings());
            }
            stop_token_ids.extend(self.format.stop_token_ids());
            let add_special = self.format.add_special_tokens();
            let ids = if p.parse_special_tokens_in_content {
                self.tokenize(&text, add_special)?
            } else {
                self.tokenize_literal(&text, &spans, add_special)?
            };
            (ids, text)
        } else {
            match &p.prompt {
                Value::String(text) => {
                    let add_special = self.add_special_for(text);
                    let ids = match &p.literal_spans {
                        Some(spans) => {
                            let spans: Vec<_> = spans.iter().map(|&(a, b)| a..b).collect();
                            self.tokenize_literal(text, &spans, add_special)?
                        }
                        None => self.tokenize(text, add_special)?,
                    };
                    (ids, text.clone())
                }
                Value::Array(items) => {
                    let ids: Option<Vec<u32>> = items
                        .iter()
                        .map(|v| v.as_u64().and_then(|n| u32::try_from(n).ok()))
                        .collect();
                    let Some(ids) = ids else {
                        return bad("prompt: a list prompt must hold token ids (integers)".into());
                    };
                    let text = self
                        .engine
                        .tokenizer()
                        .and_then(|t| t.decode(&ids, false).ok())
                        .unwrap_or_default();
                    (ids, text)
                }
                _ => {
                    return Err((
                        code::VALIDATION_TYPE_ERROR,
                        "prompt: expected a string or a list of token ids".into(),
                    ))
                }
            }
        };
        let ctx = self.engine.info().context_length;
        if ids.len() >= ctx {
            return Err((
                code::CONTEXT_OVERFLOW,
                format!(
                    "This model's maximum context length is {ctx} tokens. However, your messages resulted in {} tokens. Please reduce the length of the messages.",
                    ids.len()
                ),
            ));
        }
        if ids.is_empty() {
            return bad("prompt: the prompt is empty".into());
        }
        let room = ctx - ids.len();
        let echo = p.echo.unwrap_or(true);
        // Beyond the context is refused, as at the gateway; up to it, the
        // budget is clipped to the room the prompt leaves (FastChat's way).
        let max_new = match p.max_new_tokens {
            None => room,
            Some(n) if n < 0 => return bad(format!("max_new_tokens must be >= 0, got {n}")),
            Some(n) if n as u64 > ctx as u64 => {
                return bad(format!(
                    "max_new_tokens must be at most {ctx} (the context length of this model), got {n}"
                ))
            }
            Some(n) => (n as usize).min(room),
        };
        match &p.stop {
            Value::Null => {}
            Value::String(s) => stop_strings.push(s.clone()),
            Value::Array(items) => {
                for s in items {
                    match s.as_str() {
                        Some(s) => stop_strings.push(s.to_string()),
                        None => return bad("stop: expected a string or a list of strings".into()),
                    }
                }
            }
            _ => return bad("stop: expected a string or a list of strings".into()),
        }
        stop_strings.retain(|s| !s.is_empty());
        if stop_strings.len() > MAX_STOP {
            return bad(format!(
                "stop: at most {MAX_STOP} stop strings are allowed, got {}",
                stop_strings.len()
            ));
        }
        stop_strings.sort();
        stop_strings.dedup();
        let logprobs = match &p.logprobs {
            Value::Null | Value::Bool(false) => None,
            Value::Bool(true) => Some(0),
            Value::Number(n) => match n.as_u64() {
                Some(n) if n as usize > MAX_LOGPROBS => {
                    return bad(format!("logprobs must be at most {MAX_LOGPROBS}, got {n}"))
                }
                Some(n) => Some(n as usize),
                None => return bad(format!("logprobs must be a non-negative integer, got {n}")),
            },
            other => return bad(format!("logprobs must be an integer, got {other}")),
        };
        let mut sampling = SamplingParams {
            temperature: p.temperature.unwrap_or(1.0),
            top_p: p.top_p.unwrap_or(1.0),
            top_k: match p.top_k.unwrap_or(-1) {
                -1 | 0 => 0,
                k if k > 0 => k as usize,
                k => return bad(format!("top_k must be -1 (off) or at least 1, got {k}")),
            },
            repetition_penalty: p.repetition_penalty.unwrap_or(1.0),
            presence_penalty: p.presence_penalty.unwrap_or(0.0),
            frequency_penalty: p.frequency_penalty.unwrap_or(0.0),
            seed: p.seed,
            min_p: p.min_p.unwrap_or(0.0),
            logit_bias: p.logit_bias.clone().unwrap_or_default(),
        };
        // FastChat: a vanishing top_p means greedy.
        if sampling.top_p < 1e-8 && sampling.top_p >= 0.0 {
            sampling.top_p = 1.0;
            sampling.temperature = 0.0;
        }
        let req = GenerateRequest {
            prompt: Prompt::Ids(ids),
            max_new_tokens: max_new,
            sampling,
            stop: StopRules {
                stop_strings,
                stop_token_ids,
                ignore_eos: p.ignore_eos,
            },
            echo,
            logprobs,
            truncate_left: false,
            add_special_tokens: false,
            constraint: match (&p.guided_choice, &p.guided_regex, &p.guided_json) {
                (Some(choices), _, _) => Some(Constraint::Choice(choices.clone())),
                (None, Some(re), _) => Some(Constraint::Regex(re.clone())),
                (None, None, Some(Value::String(s))) if s == "object" => Some(Constraint::JsonObject),
                (None, None, Some(schema)) => Some(Constraint::JsonSchema(schema.clone())),
                (None, None, None) => None,
            },
        };
        Ok((req, text))
    }

    /// Runs one generation, sending NUL-delimited chunks to `tx` until done, the
    /// receiver is gone (the client left: the request is cancelled) or an error.
    async fn generate(self: Arc<Self>, p: GenerateParams, tx: mpsc::Sender<Bytes>) {
        let queued = Instant::now();
        let group = p.group;
        let acquire = self.acquire(group);
        tokio::pin!(acquire);
        let slot = loop {
            tokio::select! {
                s = &mut acquire => break s,
                _ = tx.closed() => return,
                // A choice waiting for its group's share of the batch can wait
                // minutes: an empty chunk now and then keeps the gateway's
                // no-output timeout from cutting the request.
                _ = tokio::time::sleep(KEEP_ALIVE) => {
                    let empty = Chunk {
                        text: String::new(),
                        error_code: 0,
                        usage: None,
                        finish_reason: None,
                        logprobs: None,
                    };
                    if tx.send(empty.to_wire()).await.is_err() {
                        return;
                    }
                }
            }
        };
        let _slot = match slot {
            Ok(s) => s,
            Err((c, m)) => {
                let _ = tx.send(Chunk::error(c, m).to_wire()).await;
                return;
            }
        };
        self.metrics.queue.observe(queued.elapsed().as_secs_f64());
        self.metrics.requests.fetch_add(1, Ordering::Relaxed);
        let me = self.clone();
        let built = tokio::task::spawn_blocking(move || {
            let (req, text) = me.build_request(&p)?;
            let echo = req.echo;
            let want_logprobs = req.logprobs.is_some();
            let stream = me.engine.submit_in_group(req, group).map_err(|e| engine_refusal(&e))?;
            Ok::<_, Refusal>((stream, text, echo, want_logprobs))
        })
        .await
        .unwrap_or_else(|e| Err((code::INTERNAL_ERROR, format!("request setup failed: {e}"))));
        let (mut stream, prompt_text, echo, want_logprobs) = match built {
            Ok(b) => b,
            Err((c, m)) => {
                let _ = tx.send(Chunk::error(c, m).to_wire()).await;
                return;
            }
        };
        let started = Instant::now();
        let prompt_tokens = stream.prompt_tokens;
        self.metrics
            .prompt_tokens
            .fetch_add(prompt_tokens as u64, Ordering::Relaxed);
        let mut text = if echo { prompt_text } else { String::new() };
        let mut lp = want_logprobs.then(LogProbs::default);
        let mut n_tokens = 0usize;
        let mut since_sent = 0usize;
        let mut sent_len = usize::MAX;
        let mut first_token_at = None;
        let interval = self.opts.stream_interval.max(1);
        let chunk = |text: &str, n: usize, lp: &Option<LogProbs>, finish: Option<&str>| Chunk {
            text: text.to_string(),
            error_code: 0,
            usage: Some(UsageInfo {
                prompt_tokens,
                completion_tokens: n,
                total_tokens: prompt_tokens + n,
            }),
            finish_reason: finish.map(str::to_string),
            logprobs: lp.clone(),
        };
        while let Some(ev) = stream.next().await {
            match ev {
                Event::Prompt { ids, logprobs, .. } => {
                    if let (Some(lp), Some(plps)) = (lp.as_mut(), logprobs) {
                        let first = ids
                            .first()
                            .and_then(|&id| self.engine.tokenizer().and_then(|t| t.decode(&[id], false).ok()))
                            .unwrap_or_default();
                        let mut offset = 0;
                        lp.text_offset.push(offset);
                        offset += first.len();
                        lp.tokens.push(first);
                        lp.token_logprobs.push(None);
                        lp.top_logprobs.push(None);
                        for l in plps {
                            lp.text_offset.push(offset);
                            offset += l.text.len();
                            push_logprob(lp, l);
                        }
                    }
                }
                Event::Token {
                    text: piece, logprob, ..
                } => {
                    n_tokens += 1;
                    since_sent += 1;
                    if n_tokens == 1 {
                        self.metrics.prefill.observe(started.elapsed().as_secs_f64());
                        first_token_at = Some(Instant::now());
                    }
                    if let (Some(lp), Some(l)) = (lp.as_mut(), logprob) {
                        lp.text_offset.push(text.len());
                        push_logprob(lp, l);
                    }
                    text.push_str(&piece);
                    if (n_tokens == 1 || since_sent >= interval) && text.len() != sent_len {
                        since_sent = 0;
                        sent_len = text.len();
                        if tx.send(chunk(&text, n_tokens, &lp, None).to_wire()).await.is_err() {
                            return;
                        }
                    }
                }
                Event::Done {
                    finish_reason,
                    usage,
                    text: rest,
                } => {
                    text.push_str(&rest);
                    self.metrics
                        .completion_tokens
                        .fetch_add(usage.completion_tokens as u64, Ordering::Relaxed);
                    if let Some(t0) = first_token_at {
                        if usage.completion_tokens > 1 {
                            self.metrics
                                .decode_per_token
                                .observe(t0.elapsed().as_secs_f64() / (usage.completion_tokens - 1) as f64);
                        }
                    }
                    let _ = tx
                        .send(chunk(&text, usage.completion_tokens, &lp, Some(finish_reason.as_str())).to_wire())
                        .await;
                    return;
                }
                Event::Error(e) => {
                    let _ = tx.send(Chunk::error(code::INTERNAL_ERROR, e).to_wire()).await;
                    return;
                }
            }
        }
        let _ = tx
            .send(Chunk::error(code::INTERNAL_ERROR, "the engine stopped").to_wire())
            .await;
    }

    /// Mean-pooled, L2-normalised embeddings (FastChat's recipe for decoder models).
    async fn embeddings(self: &Arc<Self>, p: EmbeddingParams) -> Result<EmbeddingReply, Refusal> {
        if p.input.len() > MAX_EMBEDDING_INPUTS {
            return Err((
                code::PARAM_OUT_OF_RANGE,
                format!(
                    "input: at most {MAX_EMBEDDING_INPUTS} inputs per call, got {}",
                    p.input.len()
                ),
            ));
        }
        let _slot = self.acquire(None).await?;
        let ctx = self.engine.info().context_length.max(1);
        let max_input = match self.opts.embed_max_input_tokens {
            0 => ctx,
            n => n.min(ctx),
        };
        let max_total = self.opts.embed_max_request_tokens.max(1);
        let too_long = |i: usize, what: String| {
            (
                code::PARAM_OUT_OF_RANGE,
                format!("input[{i}] {what}; at most {max_input} tokens per input are allowed (embed_max_input_tokens)"),
            )
        };
        let mut out = Vec::with_capacity(p.input.len());
        let mut token_num = 0;
        for (i, input) in p.input.iter().enumerate() {
            let ids = match input {
                Value::String(s) => {
                    let s = if self.opts.embed_in_truncate {
                        // Only the head can be kept: cut the text that certainly
                        // holds it before tokenizing.
                        let mut end = s.len().min(self.engine.max_text_bytes(max_input));
                        while !s.is_char_boundary(end) {
                            end -= 1;
                        }
                        &s[..end]
                    } else {
                        self.engine
                            .check_text_len(s, max_input)
                            .map_err(|_| too_long(i, format!("is {} bytes, more than {max_input} tokens", s.len())))?;
                        s
                    };
                    let me = self.clone();
                    let s = s.to_string();
                    tokio::task::spawn_blocking(move || me.tokenize(&s, true))
                        .await
                        .map_err(|e| (code::INTERNAL_ERROR, e.to_string()))??
                }
                Value::Array(items) => items
                    .iter()
                    .map(|v| v.as_u64().and_then(|n| u32::try_from(n).ok()))
                    .collect::<Option<Vec<u32>>>()
                    .ok_or_else(|| {
                        (
                            code::PARAM_OUT_OF_RANGE,
                            format!("input[{i}]: a list input must hold token ids"),
                        )
                    })?,
                _ => {
                    return Err((
                        code::VALIDATION_TYPE_ERROR,
                        format!("input[{i}]: expected a string or a list of token ids"),
                    ))
                }
            };
            if ids.is_empty() {
                return Err((code::PARAM_OUT_OF_RANGE, format!("input[{i}] is empty")));
            }
            let mut ids = ids;
            if self.opts.embed_in_truncate {
                ids.truncate(max_input);
            } else if ids.len() > max_input {
                return Err(too_long(i, format!("has {} tokens", ids.len())));
            }
            token_num += ids.len();
            if token_num > max_total {
                return Err((
                    code::PARAM_OUT_OF_RANGE,
                    format!("input: the inputs have more than {max_total} tokens in all (embed_max_request_tokens); send fewer or shorter inputs"),
                ));
            }
            // The engine runs a long input in slices between generation steps.
            let mean = self.engine.embed(ids).await.map_err(|e| engine_refusal(&e))?;
            let norm = mean.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
            let v: Vec<f32> = mean.iter().map(|m| m / norm).collect();
            out.push(if p.encoding_format.as_deref() == Some("base64") {
                let bytes: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            });
        }
        Ok(EmbeddingReply {
            embedding: out,
            token_num,
            text: None,
            error_code: 0,
        })
    }

    async fn register(&self) -> bool {
        let reg = RegisterWorker {
            worker_name: self.opts.worker_address.clone(),
            check_heart_beat: true,
            worker_status: Some(self.status()),
            multimodal: false,
        };
        let r = self
            .http
            .post(format!("{}/register_worker", self.opts.controller_address))
            .json(&reg)
            .send()
            .await;
        match r {
            Ok(r) if r.status().is_success() => {
                let ok = r.json::<Value>().await.map(|v| v != json!(false)).unwrap_or(true);
                if ok {
                    eprintln!(
                        "worker {}: registered with the controller at {}",
                        self.opts.worker_address, self.opts.controller_address
                    );
                }
                ok
            }
            Ok(r) => {
                let status = r.status();
                let why = r
                    .json::<Value>()
                    .await
                    .ok()
                    .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                    .unwrap_or_default();
                eprintln!("worker: the controller refused registration: HTTP {status} {why}");
                false
            }
            Err(e) => {
                eprintln!(
                    "worker: cannot reach the controller at {}: {e}",
                    self.opts.controller_address
                );
                false
            }
        }
    }

    /// `Some(exist)` from the controller, `None` if it did not answer.
    async fn heart_beat(&self) -> Option<bool> {
        let hb = HeartBeat {
            worker_name: self.opts.worker_address.clone(),
            queue_length: self.queue_length(),
        };
        let r = self
            .http
            .post(format!("{}/receive_heart_beat", self.opts.controller_address))
            .json(&hb)
            .send()
            .await
            .ok()?;
        r.json::<HeartBeatReply>().await.ok().map(|h| h.exist)
    }

    /// Registers, then heartbeats forever; registers again when the controller
    /// forgot this worker (it restarted, or expired us) or could not be reached.
    pub fn spawn_heartbeat(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let w = self.clone();
        tokio::spawn(async move {
            let retry = w.opts.heart_beat_interval.min(Duration::from_secs(5));
            let mut registered = w.register().await;
            loop {
                tokio::time::sleep(if registered { w.opts.heart_beat_interval } else { retry }).await;
                registered = match w.heart_beat().await {
                    Some(true) => true,
                    Some(false) => {
                        eprintln!("worker {}: the controller forgot this worker", w.opts.worker_address);
                        w.register().await
                    }
                    None => w.register().await,
                };
            }
        })
    }
}

/// A FastChat template for FastChat gateways when the model's own Jinja template
/// is in use: ChatML models get a ChatML template, others the name match.
fn wire_template(jinja: Option<&str>, path: &str) -> Conversation {
    let named = |n: &str| Conversation::from_template(n).ok();
    if jinja.is_some_and(|s| s.contains("<|im_start|>")) {
        if let Some(mut c) = named("qwen-7b-chat") {
            c.stop_str = Some(vicugna_chat::StopStr::One("<|im_end|>".into()));
            c.stop_token_ids = None;
            return c;
        }
    }
    vicugna_chat::match_template(path)
        .and_then(named)
        .or_else(|| named(vicugna_chat::DEFAULT_TEMPLATE))
        .unwrap_or_else(|| unreachable!("the default template is built in"))
}

fn push_logprob(lp: &mut LogProbs, l: vicugna_engine::TokenLogprob) {
    lp.tokens.push(l.text);
    lp.token_logprobs.push(Some(l.logprob));
    let top: HashMap<String, f32> = l.top.into_iter().map(|(_, t, p)| (t, p)).collect();
    lp.top_logprobs.push(Some(top));
}

fn engine_refusal(e: &EngineError) -> Refusal {
    match e {
        EngineError::InvalidRequest(m) => (code::PARAM_OUT_OF_RANGE, m.clone()),
        EngineError::PromptTooLong { prompt, context } => (
            code::CONTEXT_OVERFLOW,
            format!(
                "This model's maximum context length is {context} tokens. However, your messages resulted in {prompt} tokens. Please reduce the length of the messages."
            ),
        ),
        EngineError::TextTooLong { bytes, limit, max_bytes } => (
            code::CONTEXT_OVERFLOW,
            format!(
                "This model's maximum context length is {limit} tokens. However, your messages are {bytes} bytes, more than {limit} tokens can hold (at most {max_bytes} bytes with this model's vocabulary). Please reduce the length of the messages."
            ),
        ),
        other => (code::INTERNAL_ERROR, other.to_string()),
    }
}

/// The worker's HTTP routes.
pub fn router(w: Arc<Worker>) -> Router {
    let auth = w.opts.control.clone();
    Router::new()
        .route("/worker_generate_stream", post(generate_stream))
        .route("/worker_generate", post(generate_once))
        .route("/worker_get_embeddings", post(get_embeddings))
        .route("/worker_get_status", post(get_status))
        .route("/count_token", post(count_token))
        .route("/worker_get_conv_template", post(get_conv_template))
        .route("/model_details", post(model_details))
        .route("/metrics", get(metrics))
        .method_not_allowed_fallback(control::method_not_allowed)
        .with_state(w)
        .layer(axum::extract::DefaultBodyLimit::max(64 << 20))
        .layer(axum::middleware::from_fn(control::require_json))
        .layer(axum::middleware::from_fn_with_state(auth, control::require_secret))
}

fn parse_params(body: &Bytes) -> Result<GenerateParams, Box<Chunk>> {
    serde_json::from_slice(body).map_err(|e| {
        Box::new(Chunk::error(
            code::VALIDATION_TYPE_ERROR,
            format!("invalid parameters: {e}"),
        ))
    })
}

async fn generate_stream(State(w): State<Arc<Worker>>, body: Bytes) -> Response {
    let p = match parse_params(&body) {
        Ok(p) => p,
        Err(c) => return Body::from(c.to_wire()).into_response(),
    };
    let (tx, rx) = mpsc::channel::<Bytes>(8);
    tokio::spawn(w.generate(p, tx));
    Body::from_stream(ReceiverStream::new(rx).map(Ok::<_, Infallible>)).into_response()
}

async fn generate_once(State(w): State<Arc<Worker>>, body: Bytes) -> Response {
    let p = match parse_params(&body) {
        Ok(p) => p,
        Err(c) => return Json(*c).into_response(),
    };
    let (tx, mut rx) = mpsc::channel::<Bytes>(8);
    tokio::spawn(w.generate(p, tx));
    let mut last = None;
    while let Some(b) = rx.recv().await {
        last = Some(b);
    }
    let chunk = last
        .and_then(|b| serde_json::from_slice::<Chunk>(&b[..b.len().saturating_sub(1)]).ok())
        .unwrap_or_else(|| Chunk::error(code::INTERNAL_ERROR, "the generation ended without output"));
    Json(chunk).into_response()
}

async fn get_embeddings(State(w): State<Arc<Worker>>, body: Bytes) -> Json<Value> {
    let p: EmbeddingParams = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => {
            return Json(json!(Chunk::error(
                code::VALIDATION_TYPE_ERROR,
                format!("invalid parameters: {e}")
            )))
        }
    };
    match w.embeddings(p).await {
        Ok(r) => Json(json!(r)),
        Err((c, m)) => Json(json!(Chunk::error(c, m))),
    }
}

async fn get_status(State(w): State<Arc<Worker>>) -> Json<WorkerStatus> {
    Json(w.status())
}

async fn count_token(State(w): State<Arc<Worker>>, body: Bytes) -> Json<Value> {
    let prompt = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("prompt").and_then(|p| p.as_str()).map(str::to_string));
    let Some(prompt) = prompt else {
        return Json(json!(Chunk::error(
            code::VALIDATION_TYPE_ERROR,
            "prompt: expected a string"
        )));
    };
    let me = w.clone();
    let r = tokio::task::spawn_blocking(move || me.tokenize(&prompt, me.add_special_for(&prompt))).await;
    match r {
        Ok(Ok(ids)) => Json(json!({"count": ids.len(), "error_code": 0})),
        Ok(Err((c, m))) => Json(json!(Chunk::error(c, m))),
        Err(e) => Json(json!(Chunk::error(code::INTERNAL_ERROR, e))),
    }
}

async fn get_conv_template(State(w): State<Arc<Worker>>) -> Json<Value> {
    // `renders_messages` (vicugna): send `messages` and this worker applies the
    // model's own format; FastChat gateways use `conv` as usual.
    // `tool_syntax` (vicugna): the model's template renders `tools` and writes
    // calls this way, so the gateway sends tools and tool messages as they are.
    Json(
        json!({"conv": w.conv, "renders_messages": true, "format": w.format.name(),
        "tool_syntax": w.format.tool_syntax().map(|s| s.name())}),
    )
}

async fn model_details(State(w): State<Arc<Worker>>) -> Json<ModelDetails> {
    Json(ModelDetails {
        context_length: w.engine.info().context_length,
    })
}

async fn metrics(State(w): State<Arc<Worker>>) -> String {
    w.metrics
        .render(w.running.load(Ordering::SeqCst), w.waiting.load(Ordering::SeqCst))
}
