//! The engine thread: owns the model, admits requests as they arrive, and runs one
//! batched forward pass per step over every active sequence (prefill chunks and
//! decode tokens together). Callers hold an [`EngineHandle`]; each request gets its
//! own stream of [`Event`]s. Dropping the stream cancels the request.

use std::cell::{OnceCell, RefCell};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::constraint::{mask_logits, CompiledConstraint, ConstraintState};
use crate::error::{EngineError, Result};
use crate::loader::{GenerationDefaults, LoadedModel};
use crate::model::{KvCache, Model, SeqInput};
use crate::request::{Event, FinishReason, GenerateRequest, Prompt, TokenLogprob, Usage};
use crate::sampler::{log_softmax, top_n, Sampler};
use crate::text_stream::TextState;
use crate::tokenizer::Tokenizer;

/// Scheduling limits.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Sequences decoded together at most; more wait in line.
    pub max_batch: usize,
    /// Prompt tokens of one sequence run per step, so a long prompt does not stall
    /// the sequences already decoding.
    pub prefill_chunk: usize,
    /// Reuse the KV cache of a recent or running request that shares a prompt
    /// prefix (a common instruction, few-shot demonstrations, the chat so far).
    pub prefix_cache: bool,
    /// Bytes of finished requests' KV caches kept for reuse.
    pub prefix_cache_bytes: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            max_batch: 16,
            prefill_chunk: 512,
            prefix_cache: true,
            prefix_cache_bytes: 128 << 20,
        }
    }
}

/// Shortest shared prefix worth copying a cache for.
const MIN_PREFIX_REUSE: usize = 4;

/// Counters since the engine started.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Prompt tokens of admitted requests.
    pub prompt_tokens: AtomicU64,
    /// Of those, tokens whose KV came from the prefix cache instead of a forward pass.
    pub reused_prompt_tokens: AtomicU64,
}

/// A snapshot of [`EngineStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub prompt_tokens: u64,
    pub reused_prompt_tokens: u64,
}

/// What callers may know about the model behind a handle.
pub struct ModelInfo {
    pub name: String,
    pub path: std::path::PathBuf,
    pub format: String,
    pub context_length: usize,
    pub vocab_size: usize,
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    pub weight_bytes_per_token: usize,
    /// Multiply-adds of the linear layers per token.
    pub weight_macs_per_token: usize,
    /// Bytes of keys and values one cached token takes, over all layers.
    pub kv_bytes_per_token: usize,
    pub load_seconds: f64,
    pub defaults: GenerationDefaults,
}

struct Submission {
    req: GenerateRequest,
    prompt: Vec<u32>,
    constraint: Option<CompiledConstraint>,
    events: UnboundedSender<Event>,
}

/// Work for the engine thread.
enum Job {
    Generate(Box<Submission>),
    /// Generations queued at once, so the worker admits them to the same step.
    Together(Vec<Submission>),
    /// Mean-pool the last hidden state over these tokens.
    Embed {
        ids: Vec<u32>,
        reply: tokio::sync::oneshot::Sender<Result<Vec<f32>>>,
    },
}

/// A cheap, cloneable handle to a running engine.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Job>,
    tokenizer: Option<Arc<Tokenizer>>,
    info: Arc<ModelInfo>,
    stats: Arc<EngineStats>,
}

/// The events of one request.
pub struct EventStream {
    rx: UnboundedReceiver<Event>,
    /// Prompt tokens after tokenization and truncation.
    pub prompt_tokens: usize,
}

impl EventStream {
    /// Next event, blocking (for threads that are not async).
    pub fn next_blocking(&mut self) -> Option<Event> {
        self.rx.blocking_recv()
    }
    /// Next event.
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }
}

/// A finished request, collected.
#[derive(Debug, Clone)]
pub struct Completion {
    pub text: String,
    pub ids: Vec<u32>,
    pub logprobs: Vec<TokenLogprob>,
    pub finish_reason: FinishReason,
    pub usage: Usage,
    pub prompt_text: Option<String>,
}

impl EngineHandle {
    /// Starts the engine thread for a loaded model.
    pub fn start(loaded: LoadedModel, opts: EngineOptions) -> Self {
        let LoadedModel {
            model,
            tokenizer,
            defaults,
            name,
            path,
            format,
            load_seconds,
        } = loaded;
        let cfg = model.config();
        let info = Arc::new(ModelInfo {
            name,
            path,
            format,
            context_length: cfg.max_position_embeddings,
            vocab_size: cfg.vocab_size,
            eos_token_ids: cfg.eos_token_ids.clone(),
            bos_token_id: cfg.bos_token_id,
            weight_bytes_per_token: model.weight_bytes_per_token(),
            weight_macs_per_token: model.weight_macs_per_token(),
            kv_bytes_per_token: cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * model.kv_dtype().bytes(),
            load_seconds,
            defaults,
        });
        let tokenizer = tokenizer.map(Arc::new);
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(EngineStats::default());
        let worker = Worker {
            model,
            tokenizer: tokenizer.clone(),
            eos: info.eos_token_ids.clone(),
            opts,
            vocab_bytes: OnceCell::new(),
            pool: RefCell::new(VecDeque::new()),
            logits: RefCell::new(Vec::new()),
            stats: stats.clone(),
        };
        // Detached: the thread ends when the last handle (sender) is gone. If it
        // cannot start, every submit reports that the engine has stopped.
        let _ = std::thread::Builder::new()
            .name("vicugna-engine".into())
            .spawn(move || worker.run(rx));
        EngineHandle {
            tx,
            tokenizer,
            info,
            stats,
        }
    }

    /// Counters since the engine started (prefix-cache reuse among them).
    pub fn stats(&self) -> StatsSnapshot {
        StatsSnapshot {
            prompt_tokens: self.stats.prompt_tokens.load(Ordering::Relaxed),
            reused_prompt_tokens: self.stats.reused_prompt_tokens.load(Ordering::Relaxed),
        }
    }

    /// The model's tokenizer, if it has one.
    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        self.tokenizer.as_deref()
    }

    /// Facts about the model.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Validates and tokenizes the request (on the caller's thread) and queues it.
    pub fn submit(&self, req: GenerateRequest) -> Result<EventStream> {
        let (sub, stream) = self.prepare(req)?;
        self.tx
            .send(Job::Generate(Box::new(sub)))
            .map_err(|_| EngineError::EngineStopped)?;
        Ok(stream)
    }

    /// Like [`Self::submit`] for several requests that start in the same batch
    /// step (as far as `max_batch` allows): a benchmark's sequences decode
    /// together from their first token. If any request is invalid, none is queued.
    pub fn submit_together(&self, reqs: Vec<GenerateRequest>) -> Result<Vec<EventStream>> {
        let (subs, streams): (Vec<_>, Vec<_>) = reqs
            .into_iter()
            .map(|r| self.prepare(r))
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .unzip();
        self.tx
            .send(Job::Together(subs))
            .map_err(|_| EngineError::EngineStopped)?;
        Ok(streams)
    }

    /// Checks a request and tokenizes its prompt: the submission for the worker
    /// and the caller's end of its events.
    fn prepare(&self, req: GenerateRequest) -> Result<(Submission, EventStream)> {
        req.validate()?;
        let constraint = req.constraint.as_ref().map(|c| c.compile()).transpose()?;
        if constraint.is_some() && self.tokenizer.is_none() {
            return Err(EngineError::InvalidRequest(
                "constrained decoding needs the model's tokenizer".into(),
            ));
        }
        let mut prompt = match &req.prompt {
            Prompt::Ids(ids) => ids.clone(),
            Prompt::Text(text) => {
                let tok = self.tokenizer.as_ref().ok_or_else(|| {
                    EngineError::Tokenizer(format!(
                        "{} has no tokenizer: give the prompt as token ids",
                        self.info.path.display()
                    ))
                })?;
                tok.encode(text, req.add_special_tokens)?
            }
        };
        if prompt.is_empty() {
            return Err(EngineError::InvalidRequest("the prompt is empty".into()));
        }
        if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= self.info.vocab_size) {
            return Err(EngineError::InvalidRequest(format!(
                "prompt token id {bad} is outside the vocabulary (size {})",
                self.info.vocab_size
            )));
        }
        let ctx = self.info.context_length;
        // Room for at least one generated token.
        let room = ctx.saturating_sub(req.max_new_tokens.clamp(1, ctx / 2));
        if prompt.len() >= ctx || (req.truncate_left && prompt.len() > room) {
            if !req.truncate_left {
                return Err(EngineError::PromptTooLong {
                    prompt: prompt.len(),
                    context: ctx,
                });
            }
            prompt.drain(..prompt.len() - room);
        }
        let (events, rx) = unbounded_channel();
        let prompt_tokens = prompt.len();
        let sub = Submission {
            req,
            prompt,
            constraint,
            events,
        };
        Ok((sub, EventStream { rx, prompt_tokens }))
    }

    /// The mean over `ids` of the model's last hidden state (not normalised): a
    /// sentence embedding, as FastChat pools decoder models. `ids` must fit the
    /// context; it runs on the engine thread between batch steps.
    pub async fn embed(&self, ids: Vec<u32>) -> Result<Vec<f32>> {
        if ids.is_empty() {
            return Err(EngineError::InvalidRequest("the input to embed has no tokens".into()));
        }
        if ids.len() > self.info.context_length {
            return Err(EngineError::PromptTooLong {
                prompt: ids.len(),
                context: self.info.context_length,
            });
        }
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= self.info.vocab_size) {
            return Err(EngineError::InvalidRequest(format!(
                "token id {bad} is outside the vocabulary (size {})",
                self.info.vocab_size
            )));
        }
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(Job::Embed { ids, reply })
            .map_err(|_| EngineError::EngineStopped)?;
        rx.await.map_err(|_| EngineError::EngineStopped)?
    }

    /// Runs a request to the end and collects its output.
    pub fn generate(&self, req: GenerateRequest) -> Result<Completion> {
        let mut stream = self.submit(req)?;
        let mut out = Completion {
            text: String::new(),
            ids: vec![],
            logprobs: vec![],
            finish_reason: FinishReason::Length,
            usage: Usage::default(),
            prompt_text: None,
        };
        while let Some(ev) = stream.next_blocking() {
            match ev {
                Event::Prompt { text, .. } => out.prompt_text = Some(text),
                Event::Token { id, text, logprob } => {
                    out.ids.push(id);
                    out.text.push_str(&text);
                    out.logprobs.extend(logprob);
                }
                Event::Done {
                    finish_reason,
                    usage,
                    text,
                } => {
                    out.text.push_str(&text);
                    out.finish_reason = finish_reason;
                    out.usage = usage;
                    return Ok(out);
                }
                Event::Error(e) => return Err(EngineError::Generation(e)),
            }
        }
        Err(EngineError::EngineStopped)
    }
}

struct Worker {
    model: Model,
    tokenizer: Option<Arc<Tokenizer>>,
    eos: Vec<u32>,
    opts: EngineOptions,
    /// Each id's text bytes, built on the first constrained request.
    vocab_bytes: OnceCell<Arc<Vec<Option<Vec<u8>>>>>,
    /// Finished requests' caches with the tokens they hold, oldest first.
    pool: RefCell<VecDeque<(Vec<u32>, KvCache)>>,
    stats: Arc<EngineStats>,
    /// Each step's last-token logits, `[active, vocab]`, kept between steps.
    logits: RefCell<Vec<f32>>,
}

/// One request in flight.
struct Sequence {
    sub: Submission,
    cache: KvCache,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    generated: Vec<u32>,
    /// Prompt and generated tokens, for the repetition penalty.
    seen: Vec<u32>,
    sampler: Sampler,
    text: TextState,
    prompt_logprobs: Vec<TokenLogprob>,
    /// Context limit of this sequence: prompt plus new tokens.
    limit: usize,
    constraint: Option<ConstraintState>,
}

impl Worker {
    fn run(self, rx: mpsc::Receiver<Job>) {
        let mut waiting: VecDeque<Submission> = VecDeque::new();
        let mut active: Vec<Sequence> = Vec::new();
        loop {
            if active.is_empty() && waiting.is_empty() {
                match rx.recv() {
                    Ok(job) => self.take(job, &mut waiting),
                    Err(_) => return,
                }
            }
            while let Ok(job) = rx.try_recv() {
                self.take(job, &mut waiting);
            }
            while active.len() < self.opts.max_batch {
                let Some(sub) = waiting.pop_front() else { break };
                if sub.events.is_closed() {
                    continue;
                }
                if let Some(seq) = self.admit(sub, &active) {
                    active.push(seq);
                }
            }
            active.retain(|s| !s.sub.events.is_closed());
            if active.is_empty() {
                continue;
            }
            if let Err(e) = self.step(&mut active) {
                for s in active.drain(..) {
                    let _ = s.sub.events.send(Event::Error(e.to_string()));
                }
            }
        }
    }

    /// Queues a generation; runs an embedding at once (one forward pass).
    fn take(&self, job: Job, waiting: &mut VecDeque<Submission>) {
        match job {
            Job::Generate(sub) => waiting.push_back(*sub),
            Job::Together(subs) => waiting.extend(subs),
            Job::Embed { ids, reply } => {
                if !reply.is_closed() {
                    let _ = reply.send(self.embed(&ids));
                }
            }
        }
    }

    fn embed(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let mut cache = self.model.new_cache(ids.len())?;
        let mut batch = [SeqInput {
            tokens: ids,
            cache: &mut cache,
        }];
        let hidden = self.model.hidden_states(&mut batch)?;
        let h = hidden.into_iter().next().ok_or(EngineError::EngineStopped)?;
        Ok(h.mean(0)?.to_vec1::<f32>()?)
    }

    /// Starts a sequence; on failure the request gets the error and `None` returns.
    fn admit(&self, sub: Submission, active: &[Sequence]) -> Option<Sequence> {
        let ctx = self.model.config().max_position_embeddings;
        let limit = (sub.prompt.len() + sub.req.max_new_tokens).min(ctx);
        let (cache, prefilled) = match self.cache_for(&sub, limit, active) {
            Ok(c) => c,
            Err(e) => {
                let _ = sub.events.send(Event::Error(e.to_string()));
                return None;
            }
        };
        self.stats
            .prompt_tokens
            .fetch_add(sub.prompt.len() as u64, Ordering::Relaxed);
        self.stats
            .reused_prompt_tokens
            .fetch_add(prefilled as u64, Ordering::Relaxed);
        let sampler = Sampler::new(sub.req.sampling.clone());
        let constraint = sub.constraint.clone().map(ConstraintState::new);
        Some(Sequence {
            seen: sub.prompt.clone(),
            sampler,
            cache,
            prefilled,
            constraint,
            generated: vec![],
            text: TextState::new(sub.req.stop.stop_strings.clone()),
            prompt_logprobs: vec![],
            limit,
            sub,
        })
    }

    /// A cache for a new sequence: a copy of the longest cached prefix of its prompt
    /// (from a running or a recently finished request) when there is one, else
    /// empty. Returns the cache and how many prompt tokens it already holds.
    fn cache_for(&self, sub: &Submission, limit: usize, active: &[Sequence]) -> Result<(KvCache, usize)> {
        // Prompt logprobs need a forward pass over every prompt token.
        let wants_prompt_rows = sub.req.echo && sub.req.logprobs.is_some();
        if !self.opts.prefix_cache || wants_prompt_rows {
            return Ok((self.model.new_cache(limit)?, 0));
        }
        // One prompt token is always left to run, for the next-token logits.
        let most = sub.prompt.len() - 1;
        let common = |held: &[u32]| {
            held.iter()
                .zip(&sub.prompt)
                .take_while(|(a, b)| a == b)
                .count()
                .min(most)
        };
        let pool = self.pool.borrow();
        let best = active
            .iter()
            .map(|s| (common(&s.seen[..s.cache.len()]), &s.cache))
            .chain(pool.iter().map(|(held, cache)| (common(held), cache)))
            .max_by_key(|(n, _)| *n);
        match best {
            Some((n, src)) if n >= MIN_PREFIX_REUSE => Ok((self.model.cache_prefix(src, n, limit)?, n)),
            _ => Ok((self.model.new_cache(limit)?, 0)),
        }
    }

    /// Keeps a finished sequence's cache for later prompts that share its prefix,
    /// dropping the oldest ones beyond the byte budget.
    fn keep_for_reuse(&self, s: &Sequence) -> Result<()> {
        let len = s.cache.len();
        if !self.opts.prefix_cache || len < MIN_PREFIX_REUSE {
            return Ok(());
        }
        let tight = self.model.cache_prefix(&s.cache, len, len)?;
        if tight.bytes() > self.opts.prefix_cache_bytes {
            return Ok(());
        }
        let mut pool = self.pool.borrow_mut();
        // A kept prefix of this sequence's tokens adds nothing.
        pool.retain(|(held, _)| !(held.len() <= len && s.seen[..held.len()] == held[..]));
        pool.push_back((s.seen[..len].to_vec(), tight));
        let mut total: usize = pool.iter().map(|(_, c)| c.bytes()).sum();
        while total > self.opts.prefix_cache_bytes {
            match pool.pop_front() {
                Some((_, c)) => total -= c.bytes(),
                None => break,
            }
        }
        Ok(())
    }

    /// Each vocabulary id's text bytes (for constraints), built once.
    fn vocab_bytes(&self) -> Arc<Vec<Option<Vec<u8>>>> {
        self.vocab_bytes
            .get_or_init(|| Arc::new(self.tokenizer.as_ref().map(|t| t.token_bytes()).unwrap_or_default()))
            .clone()
    }

    /// One forward pass over every active sequence, then sampling and events.
    fn step(&self, active: &mut Vec<Sequence>) -> Result<()> {
        let chunk = self.opts.prefill_chunk.max(1);
        let need_all = active
            .iter()
            .any(|s| s.prefilled < s.sub.prompt.len() && s.sub.req.echo && s.sub.req.logprobs.is_some());
        let mut inputs = Vec::with_capacity(active.len());
        let mut fed = Vec::with_capacity(active.len());
        for s in active.iter_mut() {
            let tokens: &[u32] = if s.prefilled < s.sub.prompt.len() {
                let end = (s.prefilled + chunk).min(s.sub.prompt.len());
                &s.sub.prompt[s.prefilled..end]
            } else {
                std::slice::from_ref(
                    s.generated
                        .last()
                        .unwrap_or_else(|| unreachable!("decoding starts after a sampled token")),
                )
            };
            fed.push(tokens.len());
            inputs.push(SeqInput {
                tokens,
                cache: &mut s.cache,
            });
        }
        // Without prompt logprobs, only each sequence's last row, into a buffer
        // kept between steps.
        let mut buf = self.logits.borrow_mut();
        let mut all_rows = Vec::new();
        if need_all {
            for logits in self.model.forward(&mut inputs, true)? {
                all_rows.push(logits.to_vec2::<f32>()?);
            }
        } else {
            self.model.forward_last_into(&mut inputs, &mut buf)?;
        }
        drop(inputs);
        let vocab_size = buf.len() / active.len().max(1);
        let mut all_rows = all_rows.into_iter();
        let mut finished = vec![false; active.len()];
        for (i, s) in active.iter_mut().enumerate() {
            let in_prefill = s.prefilled < s.sub.prompt.len();
            let mut rows: Vec<Vec<f32>> = all_rows.next().unwrap_or_default();
            if in_prefill {
                let start = s.prefilled;
                s.prefilled += fed[i];
                if s.sub.req.echo && s.sub.req.logprobs.is_some() {
                    self.prompt_logprobs(s, start, &rows);
                }
                if s.prefilled < s.sub.prompt.len() {
                    continue;
                }
                if s.sub.req.echo {
                    self.send_prompt(s);
                }
                if s.sub.req.max_new_tokens == 0 {
                    finished[i] = self.finish(s, FinishReason::Length);
                    continue;
                }
            }
            let mut owned;
            let last: &mut [f32] = if need_all {
                owned = rows.pop().unwrap_or_default();
                &mut owned
            } else {
                &mut buf[i * vocab_size..(i + 1) * vocab_size]
            };
            // Logprobs are the model's own, before penalties and temperature.
            let lps = s.sub.req.logprobs.map(|n| (log_softmax(last), n));
            if let Some(c) = s.constraint.as_mut() {
                let vocab = self.vocab_bytes();
                let allowed = c.allowed(&vocab);
                if !mask_logits(last, &allowed, &self.eos) {
                    let _ = s.sub.events.send(Event::Error(
                        "the constraint cannot be completed with this model's vocabulary".into(),
                    ));
                    finished[i] = true;
                    continue;
                }
            }
            let id = s.sampler.sample(last, &s.seen);
            let logprob = lps.map(|(lps, n)| self.logprob_of(&lps, id, n));
            finished[i] = self.accept(s, id, logprob);
            if !finished[i] {
                if let Some(c) = s.constraint.as_mut() {
                    let vocab = self.vocab_bytes();
                    if let Some(Some(bytes)) = vocab.get(id as usize) {
                        c.advance(bytes);
                    }
                    // EOS ends a complete match even when the request ignores EOS.
                    if self.eos.contains(&id) || c.finished(&vocab) {
                        finished[i] = self.finish(s, FinishReason::Stop);
                    }
                }
            }
        }
        let mut kept = Vec::with_capacity(active.len());
        for (s, done) in active.drain(..).zip(finished) {
            if done {
                // A cache that cannot be copied is simply not kept.
                let _ = self.keep_for_reuse(&s);
            } else {
                kept.push(s);
            }
        }
        *active = kept;
        Ok(())
    }

    fn token_text(&self, id: u32) -> String {
        self.tokenizer
            .as_ref()
            .and_then(|t| t.decode(&[id], false).ok())
            .unwrap_or_default()
    }

    /// Logprob of `id` and the `n` most likely alternatives, from log-softmaxed logits.
    fn logprob_of(&self, lps: &[f32], id: u32, n: usize) -> TokenLogprob {
        let top = top_n(lps, n)
            .into_iter()
            .map(|(t, lp)| (t, self.token_text(t), lp))
            .collect();
        TokenLogprob {
            id,
            text: self.token_text(id),
            logprob: lps.get(id as usize).copied().unwrap_or(f32::NEG_INFINITY),
            top,
        }
    }

    /// Logprobs of the prompt tokens that follow each row of logits.
    fn prompt_logprobs(&self, s: &mut Sequence, start: usize, rows: &[Vec<f32>]) {
        let n = s.sub.req.logprobs.unwrap_or(0);
        for (j, row) in rows.iter().enumerate() {
            if let Some(&id) = s.sub.prompt.get(start + j + 1) {
                let lp = self.logprob_of(&log_softmax(row), id, n);
                s.prompt_logprobs.push(lp);
            }
        }
    }

    fn send_prompt(&self, s: &mut Sequence) {
        let text = match &s.sub.req.prompt {
            Prompt::Text(t) => t.clone(),
            Prompt::Ids(ids) => self
                .tokenizer
                .as_ref()
                .and_then(|t| t.decode(ids, false).ok())
                .unwrap_or_default(),
        };
        let logprobs = s.sub.req.logprobs.map(|_| std::mem::take(&mut s.prompt_logprobs));
        let _ = s.sub.events.send(Event::Prompt {
            text,
            ids: s.sub.prompt.clone(),
            logprobs,
        });
    }

    /// Takes a sampled token: emits it and says whether the sequence is finished.
    fn accept(&self, s: &mut Sequence, id: u32, logprob: Option<TokenLogprob>) -> bool {
        s.generated.push(id);
        s.seen.push(id);
        s.sampler.observe(id);
        let stops = &s.sub.req.stop;
        let is_eos = !stops.ignore_eos && self.eos.contains(&id);
        let is_stop_id = stops.stop_token_ids.contains(&id);
        let mut text = String::new();
        let mut stop_hit = false;
        if !is_eos && !is_stop_id {
            if let Some(tok) = &self.tokenizer {
                let (delta, hit) = s.text.push(tok, id);
                text = delta;
                stop_hit = hit;
            }
        }
        let _ = s.sub.events.send(Event::Token { id, text, logprob });
        if is_eos || is_stop_id || stop_hit {
            return self.finish(s, FinishReason::Stop);
        }
        let total = s.sub.prompt.len() + s.generated.len();
        if s.generated.len() >= s.sub.req.max_new_tokens || total >= s.limit {
            return self.finish(s, FinishReason::Length);
        }
        false
    }

    fn finish(&self, s: &mut Sequence, reason: FinishReason) -> bool {
        let text = match (&self.tokenizer, reason) {
            (Some(tok), FinishReason::Length) => s.text.flush(tok),
            _ => String::new(),
        };
        let _ = s.sub.events.send(Event::Done {
            finish_reason: reason,
            usage: Usage {
                prompt_tokens: s.sub.prompt.len(),
                completion_tokens: s.generated.len(),
            },
            text,
        });
        true
    }
}
