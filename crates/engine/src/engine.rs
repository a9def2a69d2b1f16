//! The engine thread: owns the model, admits requests as they arrive, and runs one
//! batched forward pass per step over every active sequence (prefill chunks and
//! decode tokens together). Callers hold an [`EngineHandle`]; each request gets its
//! own stream of [`Event`]s. Dropping the stream cancels the request.
//!
//! Fairness: while any sequence shares the step with others, the prompt tokens run
//! per step are limited by a cost budget ([`EngineOptions::step_token_budget`]),
//! shortest remaining prompt first, so a long prompt is prefilled in slices and a
//! short request's first token is not held behind it; the requests of one group
//! (the `n` choices of one API call) hold at most [`EngineOptions::max_group_slots`]
//! batch slots; embeddings run in slices between steps, not as one long pass.

use std::cell::{OnceCell, RefCell};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::constraint::{mask_logits, CompiledConstraint, ConstraintState, Vocab};
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
    /// Prompt tokens run per step, over all sequences, while the step is shared
    /// (other sequences decode or prefill in it), counted in units of one token's
    /// weight work: a token late in a long prompt costs more for its attention.
    /// Bounds the time of a shared step (about this many milliseconds for
    /// SmolLM2-135M on 2 cores), so decoding sequences and short prompts keep moving.
    pub step_token_budget: usize,
    /// Batch slots the requests of one group may hold at once (0: half of
    /// `max_batch`); more of the group wait while other requests are admitted.
    pub max_group_slots: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            max_batch: 16,
            prefill_chunk: 512,
            prefix_cache: true,
            prefix_cache_bytes: 128 << 20,
            step_token_budget: 64,
            max_group_slots: 0,
        }
    }
}

impl EngineOptions {
    /// Slots one group may hold: `max_group_slots`, or half of `max_batch`.
    pub fn group_slots(&self) -> usize {
        match self.max_group_slots {
            0 => (self.max_batch / 2).max(1),
            n => n.min(self.max_batch.max(1)),
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
    /// Requests of one group share [`EngineOptions::max_group_slots`].
    group: Option<u64>,
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

/// An embedding in progress: run in slices between generation steps.
struct EmbedJob {
    ids: Vec<u32>,
    /// Tokens already run.
    done: usize,
    cache: Option<KvCache>,
    /// Sum of the last hidden state over the tokens run so far.
    sum: Vec<f32>,
    reply: tokio::sync::oneshot::Sender<Result<Vec<f32>>>,
}

/// A cheap, cloneable handle to a running engine.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Job>,
    tokenizer: Option<Arc<Tokenizer>>,
    info: Arc<ModelInfo>,
    stats: Arc<EngineStats>,
    /// The most text bytes one token stands for, computed on first use.
    max_token_bytes: Arc<OnceLock<usize>>,
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
    /// An event already sent, without waiting.
    pub fn try_next(&mut self) -> Option<Event> {
        self.rx.try_recv().ok()
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
        let attn_ratio = attention_ratio(&model);
        let worker = Worker {
            model,
            tokenizer: tokenizer.clone(),
            eos: info.eos_token_ids.clone(),
            attn_ratio,
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
            max_token_bytes: Arc::new(OnceLock::new()),
        }
    }

    /// The most bytes of text one token of this model stands for (its longest
    /// vocabulary entry or added token). A text of `b` bytes has at least
    /// `b / max_token_bytes` tokens, which bounds a prompt without tokenizing it.
    pub fn max_token_bytes(&self) -> usize {
        *self.max_token_bytes.get_or_init(|| match &self.tokenizer {
            None => usize::MAX,
            Some(t) => {
                let vocab = t.token_bytes().into_iter().flatten().map(|b| b.len());
                let added = t
                    .inner()
                    .get_added_tokens_decoder()
                    .into_values()
                    .map(|a| a.content.len());
                vocab.chain(added).max().unwrap_or(1).max(1)
            }
        })
    }

    /// Most bytes of text that can be `limit` tokens or fewer.
    pub fn max_text_bytes(&self, limit: usize) -> usize {
        limit.saturating_mul(self.max_token_bytes())
    }

    /// Refuses, without tokenizing it, a text that certainly has more than
    /// `limit` tokens: one longer than `limit` × the longest token's bytes. Cheap
    /// (a length check), so huge inputs cost no tokenizer time or memory.
    pub fn check_text_len(&self, text: &str, limit: usize) -> Result<()> {
        let max_bytes = self.max_text_bytes(limit);
        if text.len() > max_bytes {
            return Err(EngineError::TextTooLong {
                bytes: text.len(),
                limit,
                max_bytes,
            });
        }
        Ok(())
    }

    /// The end of `text` that holds its last `limit` tokens for sure (the last
    /// `limit` × longest-token bytes, from a character boundary), for left
    /// truncation without tokenizing the whole text.
    pub fn text_tail<'a>(&self, text: &'a str, limit: usize) -> &'a str {
        let max_bytes = self.max_text_bytes(limit);
        if text.len() <= max_bytes {
            return text;
        }
        let mut start = text.len() - max_bytes;
        while !text.is_char_boundary(start) {
            start += 1;
        }
        &text[start..]
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
        self.submit_in_group(req, None)
    }

    /// Like [`Self::submit`], for one of several requests of a `group` (the
    /// choices of one API call): a group holds at most
    /// [`EngineOptions::max_group_slots`] batch slots, so it cannot take them all.
    pub fn submit_in_group(&self, req: GenerateRequest, group: Option<u64>) -> Result<EventStream> {
        let (mut sub, stream) = self.prepare(req)?;
        sub.group = group;
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
                // Bounded before tokenizing: a huge text costs a length check,
                // not seconds of tokenizer time and memory.
                let ctx = self.info.context_length;
                let text = if req.truncate_left {
                    self.text_tail(text, ctx)
                } else {
                    self.check_text_len(text, ctx)?;
                    text
                };
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
            group: None,
            prompt,
            constraint,
            events,
        };
        Ok((sub, EventStream { rx, prompt_tokens }))
    }

    /// The mean over `ids` of the model's last hidden state (not normalised): a
    /// sentence embedding, as FastChat pools decoder models. `ids` must fit the
    /// context; it runs on the engine thread in slices between batch steps, so
    /// a long input does not hold up generation.
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
    /// Weight work of one token over the attention work per cached position: a
    /// prompt token at position `p` costs `1 + p / attn_ratio` budget units.
    attn_ratio: f64,
    /// Each id's text bytes, built on the first constrained request.
    vocab_bytes: OnceCell<Arc<Vocab>>,
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
        let mut embeds: VecDeque<EmbedJob> = VecDeque::new();
        loop {
            if active.is_empty() && waiting.is_empty() && embeds.is_empty() {
                // Idle: give a burst's freed memory back before waiting (never
                // between decode steps, where it would cost the step's time).
                trim_heap();
                match rx.recv() {
                    Ok(job) => self.take(job, &mut waiting, &mut embeds),
                    Err(_) => return,
                }
            }
            while let Ok(job) = rx.try_recv() {
                self.take(job, &mut waiting, &mut embeds);
            }
            self.admit_waiting(&mut waiting, &mut active);
            active.retain(|s| !s.sub.events.is_closed());
            embeds.retain(|j| !j.reply.is_closed());
            // One slice of the oldest embedding per step: generation and
            // embeddings take turns.
            let alone = active.is_empty() && embeds.len() == 1;
            if let Some(job) = embeds.front_mut() {
                let budget = if alone {
                    self.opts.prefill_chunk.max(1)
                } else {
                    self.tokens_within(job.done, self.opts.step_token_budget as f64)
                };
                match self.embed_slice(job, budget) {
                    Ok(false) => {}
                    Ok(true) => {
                        if let Some(job) = embeds.pop_front() {
                            let n = job.ids.len().max(1) as f32;
                            let mean = job.sum.iter().map(|v| v / n).collect();
                            let _ = job.reply.send(Ok(mean));
                        }
                    }
                    Err(e) => {
                        if let Some(job) = embeds.pop_front() {
                            let _ = job.reply.send(Err(e));
                        }
                    }
                }
            }
            if active.is_empty() {
                continue;
            }
            if let Err(e) = self.step(&mut active, !embeds.is_empty()) {
                for s in active.drain(..) {
                    let _ = s.sub.events.send(Event::Error(e.to_string()));
                }
            }
        }
    }

    /// Admits waiting requests in arrival order while the batch has room,
    /// passing over those whose group already holds its share of the slots.
    fn admit_waiting(&self, waiting: &mut VecDeque<Submission>, active: &mut Vec<Sequence>) {
        let share = self.opts.group_slots();
        let mut i = 0;
        while active.len() < self.opts.max_batch.max(1) && i < waiting.len() {
            if waiting[i].events.is_closed() {
                waiting.remove(i);
                continue;
            }
            if let Some(g) = waiting[i].group {
                if active.iter().filter(|s| s.sub.group == Some(g)).count() >= share {
                    i += 1;
                    continue;
                }
            }
            let Some(sub) = waiting.remove(i) else { break };
            if let Some(seq) = self.admit(sub, active) {
                active.push(seq);
            }
        }
    }

    /// Queues a generation or an embedding.
    fn take(&self, job: Job, waiting: &mut VecDeque<Submission>, embeds: &mut VecDeque<EmbedJob>) {
        match job {
            Job::Generate(sub) => waiting.push_back(*sub),
            Job::Together(subs) => waiting.extend(subs),
            Job::Embed { ids, reply } => {
                if !reply.is_closed() {
                    embeds.push_back(EmbedJob {
                        ids,
                        done: 0,
                        cache: None,
                        sum: Vec::new(),
                        reply,
                    });
                }
            }
        }
    }

    /// Runs the next `n` tokens of an embedding; true when it is complete.
    fn embed_slice(&self, job: &mut EmbedJob, n: usize) -> Result<bool> {
        let end = (job.done + n.max(1)).min(job.ids.len());
        let cache = match &mut job.cache {
            Some(c) => c,
            None => job.cache.insert(self.model.new_cache(job.ids.len())?),
        };
        let mut batch = [SeqInput {
            tokens: &job.ids[job.done..end],
            cache,
        }];
        let hidden = self.model.hidden_states(&mut batch)?;
        let h = hidden.into_iter().next().ok_or(EngineError::EngineStopped)?;
        let sum = h.sum(0)?.to_vec1::<f32>()?;
        if job.sum.is_empty() {
            job.sum = sum;
        } else {
            for (a, b) in job.sum.iter_mut().zip(&sum) {
                *a += b;
            }
        }
        job.done = end;
        Ok(job.done >= job.ids.len())
    }

    /// Prompt tokens from position `pos` on that fit `budget` units (at least one).
    fn tokens_within(&self, pos: usize, budget: f64) -> usize {
        tokens_within(pos, budget, self.attn_ratio)
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

    /// Each vocabulary id's text bytes (for constraints), indexed once.
    fn vocab_bytes(&self) -> Arc<Vocab> {
        self.vocab_bytes
            .get_or_init(|| {
                Arc::new(Vocab::new(
                    self.tokenizer.as_ref().map(|t| t.token_bytes()).unwrap_or_default(),
                ))
            })
            .clone()
    }

    /// One forward pass over the active sequences, then sampling and events.
    /// Sequences still prefilling run the slice of their prompt the plan gives
    /// them; one given nothing this step sits it out. `shared`: other work (an
    /// embedding) takes turns with this step, so it is kept short.
    fn step(&self, active: &mut Vec<Sequence>, shared: bool) -> Result<()> {
        let plan = plan_prefill(
            &active
                .iter()
                .map(|s| (s.prefilled < s.sub.prompt.len()).then_some((s.prefilled, s.sub.prompt.len())))
                .collect::<Vec<_>>(),
            shared,
            &self.opts,
            self.attn_ratio,
        );
        // Sequences that sit this step out keep their place, after it.
        let mut idle = Vec::new();
        let mut running = Vec::with_capacity(active.len());
        let mut slices = Vec::with_capacity(active.len());
        for (s, n) in active.drain(..).zip(plan) {
            if n == 0 {
                idle.push(s);
            } else {
                running.push(s);
                slices.push(n);
            }
        }
        *active = running;
        let r = self.step_batch(active, &slices);
        active.extend(idle);
        r
    }

    fn step_batch(&self, active: &mut Vec<Sequence>, plan: &[usize]) -> Result<()> {
        if active.is_empty() {
            return Ok(());
        }
        let need_all = active
            .iter()
            .any(|s| s.prefilled < s.sub.prompt.len() && s.sub.req.echo && s.sub.req.logprobs.is_some());
        let mut inputs = Vec::with_capacity(active.len());
        let mut fed = Vec::with_capacity(active.len());
        for (s, &n) in active.iter_mut().zip(plan) {
            let tokens: &[u32] = if s.prefilled < s.sub.prompt.len() {
                let end = (s.prefilled + n).min(s.sub.prompt.len());
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
                    if let Some(bytes) = vocab.bytes(id) {
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

/// Weight work of one token over attention work per cached position (both in
/// multiply-adds): how many positions of context cost as much as a token's weights.
fn attention_ratio(model: &Model) -> f64 {
    let cfg = model.config();
    let per_position = 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim;
    let weighted = per_position as f64 * ATTENTION_MAC_COST;
    (model.weight_macs_per_token().max(1) as f64 / weighted.max(1.0)).max(1.0)
}

/// Time of one attention multiply-add over one of the (quantized) weights, as
/// measured on the 2-core host with SmolLM2-135M: a 70-token slice at position
/// 4500 took as long as about 6 x its multiply-adds at the weights' rate.
const ATTENTION_MAC_COST: f64 = 6.0;

/// Cost, in units of one token's weight work, of running `n` prompt tokens from
/// position `pos`: each also attends to the positions before it.
fn prefill_cost(pos: usize, n: usize, attn_ratio: f64) -> f64 {
    n as f64 * (1.0 + (pos as f64 + n as f64 / 2.0) / attn_ratio)
}

/// Most prompt tokens from position `pos` whose cost fits `budget` (may be 0).
fn tokens_within(pos: usize, budget: f64, attn_ratio: f64) -> usize {
    if budget < 1.0 {
        return 0;
    }
    // n^2 / 2r + n (1 + pos / r) = budget.
    let b = 1.0 + pos as f64 / attn_ratio;
    let n = attn_ratio * (-b + (b * b + 2.0 * budget / attn_ratio).sqrt());
    let mut n = n.max(0.0).floor() as usize;
    while n > 0 && prefill_cost(pos, n, attn_ratio) > budget {
        n -= 1;
    }
    n
}

/// How many prompt tokens each sequence runs this step. `seqs[i]` is
/// `Some((prefilled, prompt_len))` for a sequence still prefilling, `None` for
/// one decoding (it runs its one token: 1). 0 means the sequence sits the step out.
///
/// Without anyone else waiting on the step (sequences alone, or several long
/// prompts together), each prompt runs a slice worth `prefill_chunk` tokens of
/// cost (at most `prefill_chunk` tokens). When sequences decode, or `shared`
/// (an embedding takes turns with the step), all prompt slices together fit
/// `step_token_budget`, shortest remaining prompt first, so the step stays short
/// and a new short request is prefilled at once; the first in line always runs.
/// Prompts that fit one chunk, waiting beside long ones with nothing decoding,
/// run whole in one step (their first tokens come next step) and the long ones
/// get what is left of the budget.
fn plan_prefill(seqs: &[Option<(usize, usize)>], shared: bool, opts: &EngineOptions, attn_ratio: f64) -> Vec<usize> {
    let chunk = opts.prefill_chunk.max(1);
    let mut plan: Vec<usize> = seqs.iter().map(|s| usize::from(s.is_none())).collect();
    let mut prefilling: Vec<(usize, usize, usize)> = seqs
        .iter()
        .enumerate()
        .filter_map(|(i, s)| s.map(|(pos, len)| (i, pos, len.saturating_sub(pos))))
        .collect();
    // Shortest remaining prompt first; arrival order among equals.
    prefilling.sort_by_key(|&(i, _, rem)| (rem, i));
    let decoding = seqs.len() - prefilling.len();
    let short = prefilling.iter().filter(|p| p.2 <= chunk).count();
    let mixed = short > 0 && short < prefilling.len();
    if !shared && decoding == 0 && !mixed {
        for &(i, pos, rem) in &prefilling {
            plan[i] = rem.min(chunk).min(tokens_within(pos, chunk as f64, attn_ratio).max(1));
        }
        return plan;
    }
    let mut budget = opts.step_token_budget.max(1) as f64;
    let strict = shared || decoding > 0;
    for (k, &(i, pos, rem)) in prefilling.iter().enumerate() {
        let n = if !strict && rem <= chunk {
            rem
        } else {
            let fit = tokens_within(pos, budget, attn_ratio);
            rem.min(chunk).min(if k == 0 { fit.max(1) } else { fit })
        };
        plan[i] = n;
        budget -= prefill_cost(pos, n, attn_ratio);
    }
    plan
}

/// Gives freed heap pages back to the system (glibc keeps them otherwise, and
/// a burst of large requests would leave the process at its peak size). Cheap
/// when there is nothing to give back; called when the engine goes idle.
fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::sync::atomic::AtomicU64;
        use std::time::{SystemTime, UNIX_EPOCH};
        // At most once a second.
        static LAST: AtomicU64 = AtomicU64::new(0);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        if LAST.swap(now, Ordering::Relaxed) != now {
            extern "C" {
                fn malloc_trim(pad: usize) -> std::ffi::c_int;
            }
            // SAFETY: malloc_trim only returns free memory of glibc's own heap.
            unsafe {
                malloc_trim(0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RATIO: f64 = 4000.0;

    fn opts() -> EngineOptions {
        EngineOptions::default()
    }

    fn o_budget() -> f64 {
        opts().step_token_budget as f64
    }

    #[test]
    fn a_prompt_alone_runs_in_chunks_as_before() {
        assert_eq!(plan_prefill(&[Some((0, 100))], false, &opts(), RATIO), vec![100]);
        let first = plan_prefill(&[Some((0, 8000))], false, &opts(), RATIO)[0];
        assert!((450..=512).contains(&first), "{first}");
        // Late in a long prompt a slice is shorter: its tokens attend to more.
        let late = plan_prefill(&[Some((7000, 8000))], false, &opts(), RATIO)[0];
        assert!(late < first / 2, "{late} vs {first}");
    }

    #[test]
    fn prompts_submitted_together_all_start_in_one_step() {
        let seqs = vec![Some((0, 128)); 8];
        assert_eq!(plan_prefill(&seqs, false, &opts(), RATIO), vec![128; 8]);
    }

    #[test]
    fn decoding_sequences_bound_the_prefill_of_a_step_shortest_first() {
        // A long prompt, eight decoding sequences, and a short prompt that just arrived.
        let mut seqs = vec![Some((4096, 8000))];
        seqs.extend(vec![None; 8]);
        seqs.push(Some((0, 30)));
        let o = opts();
        let plan = plan_prefill(&seqs, false, &o, RATIO);
        assert_eq!(plan[1..9], [1; 8], "decoding sequences run their token");
        assert_eq!(plan[9], 30, "the short prompt runs whole, first");
        let cost = prefill_cost(4096, plan[0], RATIO) + prefill_cost(0, 30, RATIO);
        assert!(cost <= o.step_token_budget as f64, "{plan:?}: {cost}");
        assert!(plan[0] > 0, "the long prompt gets what is left");
        // Without the short one the long prompt gets the whole budget, never more.
        let plan = plan_prefill(&seqs[..9], false, &o, RATIO);
        assert!(prefill_cost(4096, plan[0], RATIO) <= o.step_token_budget as f64);
        assert!(prefill_cost(4096, plan[0] + 1, RATIO) > o.step_token_budget as f64);
    }

    #[test]
    fn the_first_in_line_always_progresses() {
        // A budget too small for one late token still runs one.
        let o = EngineOptions {
            step_token_budget: 1,
            ..opts()
        };
        let plan = plan_prefill(&[Some((7900, 8000)), None, Some((7000, 8000))], false, &o, RATIO);
        assert_eq!(plan, vec![1, 1, 0]);
        // An embedding taking turns bounds a lone prompt too.
        let plan = plan_prefill(&[Some((0, 8000))], true, &opts(), RATIO);
        assert_eq!(plan, vec![tokens_within(0, o_budget(), RATIO)]);
    }

    #[test]
    fn a_short_prompt_beside_a_long_one_runs_whole_when_nothing_decodes() {
        let plan = plan_prefill(&[Some((2048, 8000)), Some((0, 40))], false, &opts(), RATIO);
        assert_eq!(plan[1], 40);
        assert!(plan[0] < 64, "{plan:?}");
    }

    #[test]
    fn groups_hold_half_the_batch_by_default() {
        assert_eq!(opts().group_slots(), 8);
        let o = EngineOptions { max_batch: 1, ..opts() };
        assert_eq!(o.group_slots(), 1);
        let o = EngineOptions {
            max_group_slots: 3,
            ..opts()
        };
        assert_eq!(o.group_slots(), 3);
    }
}
