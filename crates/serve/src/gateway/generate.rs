//! `POST /v1/chat/completions` and `POST /v1/completions`: one validated
//! request becomes one worker stream per choice; the chunks (cumulative text)
//! become OpenAI deltas, streamed as SSE or collected into one response.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use vicugna_chat::{ChatFormat, ChatMessage, ToolSyntax};

use super::dispatch::{WorkerModel, WorkerStream};
use super::error::ApiError;
use super::tools;
use super::validate::{self, GenRequest, Input, PromptInput};
use super::{Gateway, InFlight};
use crate::protocol::{Chunk, LogProbs, UsageInfo};

/// Which API a request came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Completion,
}

impl Kind {
    fn endpoint(self) -> &'static str {
        match self {
            Kind::Chat => "/v1/chat/completions",
            Kind::Completion => "/v1/completions",
        }
    }
}

/// One choice to generate.
#[derive(Debug, Clone)]
pub struct Job {
    pub index: usize,
    pub input: JobInput,
    pub seed: Option<u64>,
    /// The first choice of its prompt (its prompt tokens count in usage).
    pub counts_prompt: bool,
}

/// The input of one choice.
#[derive(Debug, Clone)]
pub enum JobInput {
    Chat(Vec<ChatMessage>),
    Prompt(PromptInput),
}

fn jobs(req: &GenRequest) -> Vec<Job> {
    let inputs: Vec<JobInput> = match &req.input {
        Input::Chat(m) => vec![JobInput::Chat(m.clone())],
        Input::Prompts(ps) => ps.iter().cloned().map(JobInput::Prompt).collect(),
    };
    let mut out = Vec::new();
    for input in inputs {
        for j in 0..req.n {
            out.push(Job {
                index: out.len(),
                input: input.clone(),
                // Different choices of one seeded request differ, reproducibly.
                seed: req.seed.map(|s| s.wrapping_add(j as u64)),
                counts_prompt: j == 0,
            });
        }
    }
    out
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn new_id(kind: Kind) -> String {
    let prefix = match kind {
        Kind::Chat => "chatcmpl",
        Kind::Completion => "cmpl",
    };
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

impl Gateway {
    /// The worker parameters for one choice, once the worker is known.
    pub(crate) async fn gen_params(
        &self,
        req: &GenRequest,
        job: &Job,
        worker: &str,
        info: &WorkerModel,
    ) -> Result<Value, ApiError> {
        let ctx = info.context_length;
        if let Some(m) = req.max_tokens {
            if m > ctx {
                let name = "max_tokens";
                return Err(ApiError::bad_field(
                    name,
                    format!("must be at most {ctx} (the context length of `{}`), got {m}", req.model),
                ));
            }
        }
        let mut stop = req.stop.clone();
        let mut p = json!({
            "model": req.model,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "top_k": req.top_k,
            "presence_penalty": req.presence_penalty,
            "frequency_penalty": req.frequency_penalty,
            "repetition_penalty": req.repetition_penalty,
            "echo": req.echo,
            "ignore_eos": req.ignore_eos,
            "logprobs": req.logprobs,
            "stop_token_ids": [],
        });
        if let Some(seed) = job.seed {
            p["seed"] = json!(seed);
        }
        if req.choices() > 1 {
            p["group"] = json!(req.group);
        }
        if let Some(choices) = &req.guided_choice {
            p["guided_choice"] = json!(choices);
        }
        if let Some(re) = &req.guided_regex {
            p["guided_regex"] = json!(re);
        }
        if let Some(schema) = &req.guided_json {
            p["guided_json"] = schema.clone();
        }
        if let Some(m) = req.min_p {
            p["min_p"] = json!(m);
        }
        if !req.logit_bias.is_empty() {
            p["logit_bias"] = json!(req.logit_bias);
        }
        if !info.renders_messages && (req.guided_json.is_some() || req.min_p.is_some() || !req.logit_bias.is_empty()) {
            // A FastChat worker would ignore these fields: refuse, never drop them.
            let field = if req.guided_json.is_some() {
                "response_format"
            } else if req.min_p.is_some() {
                "min_p"
            } else {
                "logit_bias"
            };
            return Err(ApiError::bad_field(
                field,
                format!(
                    "needs a vicugna worker; the worker of `{}` is a FastChat worker",
                    req.model
                ),
            ));
        }
        let prompt_text = match &job.input {
            JobInput::Chat(messages) if info.renders_messages => {
                match (info.tool_syntax, &req.tool_messages) {
                    // The model's own template shows the tools, calls and
                    // results; a constraint spells the call its way.
                    (Some(syntax), Some(native)) => {
                        let mut native = native.clone();
                        if syntax == ToolSyntax::Mistral {
                            tools::mistral_ids(&mut native);
                        }
                        p["messages"] = json!(native);
                        if let Some(t) = &req.tools {
                            p["tools"] = json!(t.specs());
                            if let Some(re) = t.constraint_regex_for(syntax) {
                                p["guided_regex"] = json!(re);
                            }
                        }
                    }
                    _ => p["messages"] = json!(messages),
                }
                p["prompt"] = json!("");
                // The worker encodes special-token strings in contents as text
                // unless the operator opted into FastChat's parsing.
                if self.opts.parse_special_tokens_in_content {
                    p["parse_special_tokens_in_content"] = json!(true);
                }
                None
            }
            JobInput::Chat(messages) => {
                // A FastChat worker: build the prompt from its template, as
                // FastChat's gateway does, with the template's stop rules.
                let conv = info
                    .conv
                    .clone()
                    .ok_or_else(|| ApiError::worker_failed(format!("worker {worker} gave no conversation template")))?;
                stop.extend(conv.stop_str().into_iter().map(str::to_string));
                p["stop_token_ids"] = json!(conv.stop_token_ids());
                let (text, spans) = ChatFormat::Named(conv)
                    .render_with_spans(messages, None)
                    .map_err(|e| ApiError::bad_field("messages", e))?;
                p["prompt"] = json!(text);
                // Where the contents are, for a worker that reads them as text
                // (FastChat's own workers ignore the field).
                if !self.opts.parse_special_tokens_in_content {
                    let spans: Vec<(usize, usize)> = spans.iter().map(|r| (r.start, r.end)).collect();
                    p["literal_spans"] = json!(spans);
                }
                Some(text)
            }
            JobInput::Prompt(PromptInput::Text(t)) => {
                p["prompt"] = json!(t);
                Some(t.clone())
            }
            JobInput::Prompt(PromptInput::Ids(ids)) => {
                if !info.renders_messages {
                    return Err(ApiError::bad_field(
                        "prompt",
                        "token-id prompts need a vicugna worker; this model's worker takes text only",
                    ));
                }
                p["prompt"] = json!(ids);
                None
            }
        };
        let mut max_new = req.max_tokens;
        if let (false, Some(text)) = (info.renders_messages, prompt_text) {
            // FastChat's check_length: the prompt must fit, the budget is clipped.
            let n = self.count_tokens(worker, &req.model, &text).await?;
            if n >= ctx {
                return Err(ApiError::from_worker(
                    crate::protocol::code::CONTEXT_OVERFLOW,
                    &format!("This model's maximum context length is {ctx} tokens. However, your messages resulted in {n} tokens. Please reduce the length of the messages."),
                ));
            }
            max_new = Some(max_new.unwrap_or(ctx).min(ctx - n));
        }
        p["max_new_tokens"] = json!(max_new);
        stop.sort();
        stop.dedup();
        p["stop"] = json!(stop);
        Ok(p)
    }

    async fn handle_gen(self: Arc<Self>, body: Body, kind: Kind) -> Response {
        let started = Instant::now();
        let in_flight = InFlight::new(self.clone());
        let result = async {
            let bytes = self.read_body(body).await?;
            let obj = validate::parse_json(&bytes)?;
            let req = match kind {
                Kind::Chat => validate::chat(&obj)?,
                Kind::Completion => validate::completion(&obj)?,
            };
            validate::check_cost(&req, self.opts.max_request_tokens)?;
            let jobs = jobs(&req);
            let streams = futures::future::try_join_all(jobs.iter().map(|j| self.open_stream(&req, j))).await?;
            self.metrics
                .time_to_first_token
                .observe(started.elapsed().as_secs_f64());
            if req.stream {
                Ok(self
                    .clone()
                    .stream_response(req, kind, jobs, streams, started, in_flight))
            } else {
                let r = self.collect(&req, kind, &jobs, streams).await;
                self.metrics.request_duration.observe(started.elapsed().as_secs_f64());
                r
            }
        }
        .await;
        let resp = result.unwrap_or_else(|mut e| {
            if kind == Kind::Completion && e.param.as_deref() == Some("messages") {
                e.param = Some("prompt".into());
            }
            e.into_response()
        });
        self.metrics.count_request(kind.endpoint(), resp.status().as_u16());
        resp
    }

    fn count_usage(&self, usage: &UsageInfo, counts_prompt: bool) {
        if counts_prompt {
            self.metrics
                .prompt_tokens
                .fetch_add(usage.prompt_tokens as u64, Ordering::Relaxed);
        }
        self.metrics
            .completion_tokens
            .fetch_add(usage.completion_tokens as u64, Ordering::Relaxed);
    }

    /// Non-streaming: runs every choice to its end.
    async fn collect(
        &self,
        req: &GenRequest,
        kind: Kind,
        jobs: &[Job],
        streams: Vec<WorkerStream>,
    ) -> Result<Response, ApiError> {
        let syntaxes: Vec<ToolSyntax> = streams.iter().map(|s| reply_syntax(req, &s.info)).collect();
        let finals = futures::future::join_all(streams.into_iter().map(drain)).await;
        let mut choices = Vec::with_capacity(jobs.len());
        let (mut prompt_tokens, mut completion_tokens) = (0, 0);
        for ((job, fin), syntax) in jobs.iter().zip(finals).zip(syntaxes) {
            let c = fin?;
            let usage = c.usage.unwrap_or_default();
            self.count_usage(&usage, job.counts_prompt);
            if job.counts_prompt {
                prompt_tokens += usage.prompt_tokens;
            }
            completion_tokens += usage.completion_tokens;
            let lp = c.logprobs.as_ref();
            choices.push(match kind {
                Kind::Chat if req.tools.is_some() => {
                    let (text, calls) = tools::parse_reply_in(syntax, &c.text);
                    let mut message = json!({"role": "assistant", "content": (!text.is_empty()).then_some(text)});
                    let mut finish = c.finish_reason.clone();
                    if !calls.is_empty() {
                        message["tool_calls"] = json!(tools::calls_json(&calls, false));
                        finish = Some("tool_calls".into());
                    }
                    json!({
                        "index": job.index,
                        "message": message,
                        "logprobs": lp.map(|l| chat_logprobs(l, 0)),
                        "finish_reason": finish,
                    })
                }
                Kind::Chat => json!({
                    "index": job.index,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": lp.map(|l| chat_logprobs(l, 0)),
                    "finish_reason": c.finish_reason,
                }),
                Kind::Completion => json!({
                    "index": job.index,
                    "text": c.text,
                    "logprobs": lp.map(|l| completion_logprobs(l, 0)),
                    "finish_reason": c.finish_reason,
                }),
            });
        }
        let object = match kind {
            Kind::Chat => "chat.completion",
            Kind::Completion => "text_completion",
        };
        Ok(Json(json!({
            "id": new_id(kind),
            "object": object,
            "created": now_secs(),
            "model": req.model,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }))
        .into_response())
    }

    /// Streaming: an SSE response fed by a task that merges the choices' streams.
    fn stream_response(
        self: Arc<Self>,
        req: GenRequest,
        kind: Kind,
        jobs: Vec<Job>,
        streams: Vec<WorkerStream>,
        started: Instant,
        in_flight: InFlight,
    ) -> Response {
        let (tx, rx) = mpsc::channel::<Bytes>(32);
        tokio::spawn(async move {
            self.pump(req, kind, jobs, streams, tx, started).await;
            drop(in_flight);
        });
        Response::builder()
            .header("content-type", "text/event-stream")
            .header("cache-control", "no-cache")
            .body(Body::from_stream(
                ReceiverStream::new(rx).map(Ok::<_, std::convert::Infallible>),
            ))
            .unwrap_or_else(|_| ApiError::internal("could not build the response").into_response())
    }

    async fn pump(
        &self,
        req: GenRequest,
        kind: Kind,
        jobs: Vec<Job>,
        streams: Vec<WorkerStream>,
        tx: mpsc::Sender<Bytes>,
        started: Instant,
    ) {
        let id = new_id(kind);
        let created = now_secs();
        let object = match kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        };
        let event = |choice: Value| {
            let mut v = json!({
                "id": id, "object": object, "created": created, "model": req.model,
                "choices": [choice],
            });
            if req.include_usage {
                v["usage"] = Value::Null;
            }
            Bytes::from(format!("data: {v}\n\n"))
        };
        if kind == Kind::Chat {
            for job in &jobs {
                let first = json!({"index": job.index, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null});
                if tx.send(event(first)).await.is_err() {
                    return;
                }
            }
        }
        let syntaxes: Vec<ToolSyntax> = streams.iter().map(|s| reply_syntax(&req, &s.info)).collect();
        let merged = futures::stream::select_all(streams.into_iter().enumerate().map(|(i, s)| {
            futures::stream::unfold(Some(s), move |state| async move {
                let mut s = state?;
                match s.next_chunk().await {
                    Ok(Some(c)) => Some(((i, Ok(Some(c))), Some(s))),
                    Ok(None) => Some(((i, Ok(None)), None)),
                    Err(e) => Some(((i, Err(e)), None)),
                }
            })
            .boxed()
        }));
        futures::pin_mut!(merged);
        let mut prev: Vec<String> = vec![String::new(); jobs.len()];
        let mut sent_tokens = vec![0usize; jobs.len()];
        let mut finished = vec![false; jobs.len()];
        let (mut prompt_tokens, mut completion_tokens) = (0, 0);
        let mut last_piece = Instant::now();
        let fail = |e: ApiError| Bytes::from(format!("data: {}\n\ndata: [DONE]\n\n", e.body()));
        while let Some((i, item)) = merged.next().await {
            let job = &jobs[i];
            let c = match item {
                Ok(Some(c)) if c.error_code != 0 => {
                    let _ = tx
                        .send(fail(ApiError::from_worker(c.error_code, c.error_reason())))
                        .await;
                    return;
                }
                Ok(Some(c)) => c,
                Ok(None) if finished[i] => continue,
                Ok(None) => {
                    let _ = tx
                        .send(fail(ApiError::worker_failed(
                            "the worker ended the stream before the generation finished",
                        )))
                        .await;
                    return;
                }
                Err(e) => {
                    let _ = tx.send(fail(ApiError::worker_failed(e))).await;
                    return;
                }
            };
            if finished[i] {
                continue;
            }
            // As FastChat: drop U+FFFD (a partial character) and send what is new.
            let mut text = c.text.replace('\u{FFFD}', "");
            if req.tools.is_some() {
                // Text up to a tool call streams as content; calls come at the end.
                text.truncate(tools::visible_prefix_in(syntaxes[i], &text).len());
            }
            let delta = if text.len() > prev[i].len() && text.is_char_boundary(prev[i].len()) {
                let d = text[prev[i].len()..].to_string();
                prev[i] = text;
                d
            } else {
                String::new()
            };
            let new_lp = c.logprobs.as_ref().filter(|l| l.tokens.len() > sent_tokens[i]);
            let lp_value = new_lp.map(|l| match kind {
                Kind::Chat => chat_logprobs(l, sent_tokens[i]),
                Kind::Completion => completion_logprobs(l, sent_tokens[i]),
            });
            if let Some(l) = new_lp {
                sent_tokens[i] = l.tokens.len();
            }
            if !delta.is_empty() || lp_value.is_some() {
                let choice = match kind {
                    Kind::Chat => {
                        json!({"index": job.index, "delta": {"content": delta}, "logprobs": lp_value, "finish_reason": null})
                    }
                    Kind::Completion => {
                        json!({"index": job.index, "text": delta, "logprobs": lp_value, "finish_reason": null})
                    }
                };
                self.metrics.inter_token.observe(last_piece.elapsed().as_secs_f64());
                last_piece = Instant::now();
                if tx.send(event(choice)).await.is_err() {
                    return;
                }
            }
            if let Some(reason) = &c.finish_reason {
                let mut reason = reason.clone();
                if req.tools.is_some() {
                    let (content, calls) = tools::parse_reply_in(syntaxes[i], &c.text.replace('\u{FFFD}', ""));
                    if !calls.is_empty() {
                        reason = "tool_calls".into();
                    }
                    // Text held back in case it began a call, and was not one.
                    if let Some(rest) = content.strip_prefix(prev[i].as_str()).filter(|r| !r.is_empty()) {
                        let choice = json!({"index": job.index, "delta": {"content": rest}, "logprobs": null, "finish_reason": null});
                        if tx.send(event(choice)).await.is_err() {
                            return;
                        }
                    }
                    // As OpenAI streams them: id, type and name with empty
                    // arguments first, then the arguments.
                    for call in tools::calls_json(&calls, true) {
                        let mut head = call.clone();
                        head["function"]["arguments"] = json!("");
                        let args =
                            json!([{"index": call["index"], "function": {"arguments": call["function"]["arguments"]}}]);
                        for delta in [json!({"tool_calls": [head]}), json!({"tool_calls": args})] {
                            let choice =
                                json!({"index": job.index, "delta": delta, "logprobs": null, "finish_reason": null});
                            if tx.send(event(choice)).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                let reason = &reason;
                finished[i] = true;
                let usage = c.usage.unwrap_or_default();
                self.count_usage(&usage, job.counts_prompt);
                if job.counts_prompt {
                    prompt_tokens += usage.prompt_tokens;
                }
                completion_tokens += usage.completion_tokens;
                let choice = match kind {
                    Kind::Chat => json!({"index": job.index, "delta": {}, "logprobs": null, "finish_reason": reason}),
                    Kind::Completion => {
                        json!({"index": job.index, "text": "", "logprobs": null, "finish_reason": reason})
                    }
                };
                if tx.send(event(choice)).await.is_err() {
                    return;
                }
            }
        }
        if req.include_usage {
            let v = json!({
                "id": id, "object": object, "created": created, "model": req.model, "choices": [],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens},
            });
            if tx.send(Bytes::from(format!("data: {v}\n\n"))).await.is_err() {
                return;
            }
        }
        let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
        self.metrics.request_duration.observe(started.elapsed().as_secs_f64());
    }
}

/// Reads a worker stream to its final chunk.
async fn drain(mut s: WorkerStream) -> Result<Chunk, ApiError> {
    let mut last: Option<Chunk> = None;
    loop {
        match s.next_chunk().await {
            Ok(Some(c)) if c.error_code != 0 => return Err(ApiError::from_worker(c.error_code, c.error_reason())),
            Ok(Some(c)) => {
                let done = c.finish_reason.is_some();
                last = Some(c);
                if done {
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => return Err(ApiError::worker_failed(e)),
        }
    }
    match last {
        Some(c) if c.finish_reason.is_some() => Ok(c),
        _ => Err(ApiError::worker_failed(format!(
            "worker {} ended the stream before the generation finished",
            s.worker
        ))),
    }
}

/// Chat-style logprobs of the tokens from `from` on.
fn chat_logprobs(lp: &LogProbs, from: usize) -> Value {
    let content: Vec<Value> = (from..lp.tokens.len())
        .map(|i| {
            let tok = &lp.tokens[i];
            let mut top: Vec<(&String, &f32)> = lp
                .top_logprobs
                .get(i)
                .and_then(|t| t.as_ref())
                .map(|m| m.iter().collect())
                .unwrap_or_default();
            top.sort_by(|a, b| b.1.total_cmp(a.1).then_with(|| a.0.cmp(b.0)));
            json!({
                "token": tok,
                "logprob": lp.token_logprobs.get(i).copied().flatten().unwrap_or(0.0),
                "bytes": tok.as_bytes(),
                "top_logprobs": top.iter().map(|(t, p)| json!({"token": t, "logprob": p, "bytes": t.as_bytes()})).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({ "content": content })
}

/// Legacy completions logprobs of the tokens from `from` on.
fn completion_logprobs(lp: &LogProbs, from: usize) -> Value {
    let from = from.min(lp.tokens.len());
    let slice = |n: usize| from.min(n)..n;
    json!({
        "tokens": lp.tokens[from..],
        "token_logprobs": lp.token_logprobs[slice(lp.token_logprobs.len())],
        "top_logprobs": lp.top_logprobs[slice(lp.top_logprobs.len())],
        "text_offset": lp.text_offset[slice(lp.text_offset.len())],
    })
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(State(g): State<Arc<Gateway>>, body: Body) -> Response {
    g.handle_gen(body, Kind::Chat).await
}

/// `POST /v1/completions`.
pub async fn completions(State(g): State<Arc<Gateway>>, body: Body) -> Response {
    g.handle_gen(body, Kind::Completion).await
}

/// The syntax a tool-using reply is written in: the model template's own
/// when the chat went to it natively, else the generic (Hermes) one.
fn reply_syntax(req: &GenRequest, info: &WorkerModel) -> ToolSyntax {
    match (info.tool_syntax, &req.tool_messages) {
        (Some(syntax), Some(_)) if info.renders_messages => syntax,
        _ => ToolSyntax::Hermes,
    }
}
