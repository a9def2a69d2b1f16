//! Classification with a local model through the engine.
//!
//! CARP runs as three requests per vote, each continuing the previous one's
//! text: clues (after `CLUES:`), reasoning (after `REASONING:`), and the
//! decision after `LABEL:`. The decision is scored: each label's tokens are
//! scored as the continuation of the decision prompt and the label
//! probabilities are those scores normalised over the label set.
//!
//! Many inputs are classified at once from several threads; the engine batches
//! their requests (continuous batching).

use std::sync::atomic::{AtomicU64, Ordering};

use rand::{Rng, SeedableRng};
use vicugna_chat::{ChatFormat, ChatMessage};
use vicugna_engine::{EngineHandle, Event, GenerateRequest, Prompt, SamplingParams, StopRules};

use super::backend::{normalize, Backend, BackendStats, Vote};
use super::error::{ClassifyError, Result};
use super::prompt::{Demo, Method, Prompts};

/// Generation budgets and sampling for the local model.
#[derive(Debug, Clone)]
pub struct LocalOptions {
    /// Temperature of sampled votes (a single vote is greedy).
    pub temperature: f32,
    /// Tokens for the clues.
    pub clue_tokens: usize,
    /// Tokens for the reasoning (and for chain-of-thought).
    pub reasoning_tokens: usize,
    /// Tokens of a text used for its embedding.
    pub embed_tokens: usize,
}

impl Default for LocalOptions {
    fn default() -> Self {
        LocalOptions {
            temperature: 0.7,
            clue_tokens: 48,
            reasoning_tokens: 96,
            embed_tokens: 256,
        }
    }
}

/// The local engine as a classifier.
pub struct LocalBackend {
    engine: EngineHandle,
    format: ChatFormat,
    opts: LocalOptions,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    reused_tokens: AtomicU64,
}

impl LocalBackend {
    /// Wraps a started engine; `conv_template` names a FastChat template, else the
    /// model's own chat template is used (as `vicugna chat` chooses).
    pub fn new(engine: EngineHandle, conv_template: Option<&str>, opts: LocalOptions) -> Result<LocalBackend> {
        let tok = engine
            .tokenizer()
            .ok_or_else(|| ClassifyError::Setting("the model has no tokenizer; classification needs text".into()))?;
        let model_template = tok
            .chat_template()
            .map(|src| (src, tok.bos_token().unwrap_or(""), tok.eos_token().unwrap_or("")));
        let key = engine.info().path.display().to_string();
        let format = ChatFormat::select(conv_template, model_template, &key)?;
        Ok(LocalBackend {
            engine,
            format,
            opts,
            prompt_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
            reused_tokens: AtomicU64::new(0),
        })
    }

    /// The engine behind this backend.
    pub fn engine(&self) -> &EngineHandle {
        &self.engine
    }

    /// The chat-formatted prompt for one user turn, with the assistant's answer begun.
    fn render(&self, user: &str, assistant: &str) -> Result<String> {
        let text = self.format.render(&[ChatMessage::new("user", user)], None)?;
        Ok(text + assistant)
    }

    fn sampling(&self, seed: Option<u64>) -> SamplingParams {
        match seed {
            None => SamplingParams::greedy(),
            Some(s) => SamplingParams {
                temperature: self.opts.temperature,
                seed: Some(s),
                ..SamplingParams::greedy()
            },
        }
    }

    /// Generates up to `max_tokens` after `prompt`, stopping at any of `stops`.
    fn generate(&self, prompt: String, max_tokens: usize, stops: Vec<String>, seed: Option<u64>) -> Result<String> {
        let mut req = GenerateRequest::new(Prompt::Text(prompt), max_tokens);
        req.add_special_tokens = self.format.add_special_tokens();
        req.sampling = self.sampling(seed);
        let mut stop_strings = stops;
        stop_strings.extend(self.format.stop_strings());
        req.stop = StopRules {
            stop_strings,
            stop_token_ids: self.format.stop_token_ids(),
            ignore_eos: false,
        };
        let out = self.engine.generate(req)?;
        self.count(out.usage.prompt_tokens, out.usage.completion_tokens);
        Ok(out.text)
    }

    fn count(&self, prompt: usize, completion: usize) {
        self.prompt_tokens.fetch_add(prompt as u64, Ordering::Relaxed);
        self.completion_tokens.fetch_add(completion as u64, Ordering::Relaxed);
    }

    fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        let tok = self.engine.tokenizer().ok_or(vicugna_engine::EngineError::EngineStopped)?;
        Ok(tok.encode(text, special)?)
    }

    /// Log-probability of each label's tokens as the continuation of `prompt`.
    ///
    /// Each label is one request of the prompt ids followed by the label ids,
    /// scored with echo + logprobs and no new tokens; all labels are submitted
    /// before any is read, so the engine runs them in one batch.
    fn label_logprobs(&self, prompt: &str, prompts: &Prompts) -> Result<Vec<f64>> {
        let ids = self.encode(prompt, self.format.add_special_tokens())?;
        let mut streams = Vec::with_capacity(prompts.labels.len());
        for i in 0..prompts.labels.len() {
            let label_ids = self.encode(&prompts.label_choice(i), false)?;
            let mut all = ids.clone();
            all.extend_from_slice(&label_ids);
            let mut req = GenerateRequest::new(Prompt::Ids(all), 0);
            req.echo = true;
            req.logprobs = Some(0);
            streams.push((label_ids.len(), self.engine.submit(req)?));
        }
        let mut scores = Vec::with_capacity(streams.len());
        for (n, mut stream) in streams {
            let mut score = None;
            while let Some(ev) = stream.next_blocking() {
                match ev {
                    Event::Prompt { logprobs: Some(lps), .. } => {
                        let tail = &lps[lps.len().saturating_sub(n)..];
                        score = Some(tail.iter().map(|t| t.logprob as f64).sum::<f64>());
                    }
                    Event::Done { usage, .. } => {
                        self.count(usage.prompt_tokens, 0);
                        break;
                    }
                    Event::Error(e) => return Err(vicugna_engine::EngineError::InvalidRequest(e).into()),
                    _ => {}
                }
            }
            scores.push(score.ok_or(vicugna_engine::EngineError::EngineStopped)?);
        }
        Ok(scores)
    }

    /// The decision after `prompt` (which ends with the label marker): the label
    /// and every label's probability.
    fn decide(&self, prompt: &str, prompts: &Prompts, seed: Option<u64>) -> Result<(usize, Vec<f64>)> {
        let probs = normalize(&self.label_logprobs(prompt, prompts)?);
        let label = match seed {
            None => argmax(&probs),
            Some(s) => {
                // A sampled vote draws the label from the label distribution at the
                // vote temperature, as constrained sampling would.
                let t = self.opts.temperature.max(1e-3) as f64;
                let tempered = normalize(&probs.iter().map(|p| p.max(1e-300).ln() / t).collect::<Vec<_>>());
                let mut rng = rand::rngs::StdRng::seed_from_u64(s ^ 0x5eed);
                let mut r: f64 = rng.random();
                let mut pick = tempered.len() - 1;
                for (i, p) in tempered.iter().enumerate() {
                    if r < *p {
                        pick = i;
                        break;
                    }
                    r -= p;
                }
                pick
            }
        };
        Ok((label, probs))
    }
}

/// Index of the largest value (the first on ties).
pub fn argmax(v: &[f64]) -> usize {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best
}

impl Backend for LocalBackend {
    fn classify(
        &self,
        prompts: &Prompts,
        method: Method,
        demos: &[Demo],
        text: &str,
        seed: Option<u64>,
    ) -> Result<Vote> {
        let user = prompts.user_message(method, demos, text);
        let stops = prompts.section_stops();
        let (c, r, l) = (prompts.clues_marker(), prompts.reasoning_marker(), prompts.label_marker());
        let sub = |s: Option<u64>, k: u64| s.map(|s| s.wrapping_mul(31).wrapping_add(k));
        let (answer, clues, reasoning) = match method {
            Method::Vanilla => (l.to_string(), String::new(), String::new()),
            // Each step continues the previous one's text exactly (no trailing
            // space after a marker: the model writes the space with its first word).
            Method::Cot => {
                let head = prompts.cot_trigger().to_string();
                let thought = self.generate(self.render(&user, &head)?, self.opts.reasoning_tokens, stops, sub(seed, 1))?;
                let answer = format!("{head}{}\n{l}", thought.trim_end());
                (answer, String::new(), thought.trim().to_string())
            }
            Method::Carp => {
                let clues = self.generate(self.render(&user, c)?, self.opts.clue_tokens, stops.clone(), sub(seed, 1))?;
                let head = format!("{c}{}\n{r}", clues.trim_end());
                let reasoning = self.generate(self.render(&user, &head)?, self.opts.reasoning_tokens, stops, sub(seed, 2))?;
                let answer = format!("{head}{}\n{l}", reasoning.trim_end());
                (answer, clues.trim().to_string(), reasoning.trim().to_string())
            }
        };
        let (label, probs) = self.decide(&self.render(&user, &answer)?, prompts, sub(seed, 3))?;
        Ok(Vote {
            label: Some(label),
            probs: Some(probs),
            clues,
            reasoning,
        })
    }

    fn explain(&self, prompts: &Prompts, text: &str, label: usize) -> Result<(String, String)> {
        let stops = prompts.section_stops();
        let user = prompts.demo_clues_request(text, label);
        let clues = self.generate(self.render(&user, prompts.clues_marker())?, self.opts.clue_tokens, stops.clone(), None)?;
        let clues = clues.trim().to_string();
        let user = prompts.demo_reasoning_request(text, label, &clues);
        let reasoning = self.generate(self.render(&user, prompts.reasoning_marker())?, self.opts.reasoning_tokens, stops, None)?;
        Ok((clues, reasoning.trim().to_string()))
    }

    fn embed(&self, text: &str) -> Result<Vec<f32>> {
        let mut ids = self.encode(text, false)?;
        ids.truncate(self.opts.embed_tokens.max(1));
        if ids.is_empty() {
            ids = self.encode(" ", false)?;
        }
        // The engine's embedding call is async; a one-thread runtime drives it here.
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .map_err(|e| ClassifyError::Setting(format!("could not start a runtime: {e}")))?;
        Ok(rt.block_on(self.engine.embed(ids))?)
    }

    fn count_tokens(&self, user: &str) -> usize {
        self.render(user, "")
            .ok()
            .and_then(|t| self.encode(&t, self.format.add_special_tokens()).ok())
            .map_or(user.len() / 3, |ids| ids.len())
    }

    fn model_id(&self) -> String {
        let info = self.engine.info();
        format!("{} ({})", info.name, info.path.display())
    }

    fn stats(&self) -> BackendStats {
        BackendStats {
            prompt_tokens: self.prompt_tokens.load(Ordering::Relaxed),
            completion_tokens: self.completion_tokens.load(Ordering::Relaxed),
            reused_tokens: self.reused_tokens.load(Ordering::Relaxed),
            parse_failures: 0,
        }
    }
}
