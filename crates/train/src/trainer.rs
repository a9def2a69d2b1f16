//! Fine-tuning: full or LoRA, on the engine's own model definition.
//!
//! The model is loaded exactly as the engine loads it (dense f32: a GGUF is
//! dequantized), its weights or adapters become candle variables, and the
//! loss is the mean cross-entropy over labelled tokens (see [`crate::mask`]).
//!
//! Determinism: the data order of epoch `e` is a seeded shuffle of `(seed, e)`,
//! micro-batch `k`'s dropout masks come from `(seed, k)`, and step `s` consumes
//! micro-batches `s·accum .. (s+1)·accum`. So the state of a run is the step
//! number, the tensors and the optimizer moments — exactly what a checkpoint
//! holds — and a resumed run computes the same numbers as an uninterrupted one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Tensor, Var};
use sha2::{Digest, Sha256};
use vicugna_chat::{ChatFormat, FormatSource};
use vicugna_engine::model::{Dropout, TrainInputs};
use vicugna_engine::{LoadOptions, LoadedModel, Model, WeightDType};

use crate::checkpoint::{self, TrainState};
use crate::data;
use crate::error::{Result, TrainError};
use crate::lora::{self, LoraConfig};
use crate::mask::{Encoded, Masker};
use crate::optim::{clip_grad_norm, cosine_lr, AdamW, AdamWConfig};

/// Full fine-tuning or LoRA.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    Full,
    Lora(LoraConfig),
}

/// Storage precision of the weights that are not trained.
///
/// Arithmetic is f32 either way (activations, products, the loss); trained
/// tensors (LoRA adapters, or every weight in full fine-tuning) and the AdamW
/// moments are always f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    #[default]
    F32,
    /// The frozen base of a LoRA run (projections and the embedding, which is
    /// also the tied output projection) is kept in bf16 and widened to f32 one
    /// matrix at a time as it is used: half the memory for the base weights.
    Bf16,
}

/// How much training to do.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Length {
    Steps(usize),
    Epochs(f64),
}

/// Every setting of a run.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub model: PathBuf,
    pub data: PathBuf,
    pub output: PathBuf,
    pub mode: Mode,
    /// LoRA only: adapt just the last this many decoder layers. The layers below
    /// are frozen, so their output is computed once per sample and reused in
    /// every epoch: each step runs only the adapted layers.
    pub lora_last_layers: Option<usize>,
    /// Storage precision of the frozen weights (LoRA only).
    pub precision: Precision,
    pub length: Length,
    pub lr: f64,
    pub warmup_ratio: f64,
    pub adam: AdamWConfig,
    pub micro_batch: usize,
    pub grad_accum: usize,
    pub max_grad_norm: f64,
    pub max_len: usize,
    /// Pack several conversations into each row instead of padding.
    pub packing: bool,
    pub seed: u64,
    /// Fraction of the data held out for eval loss (ignored with `eval_data`).
    pub eval_ratio: f64,
    pub eval_data: Option<PathBuf>,
    /// Measure eval loss every this many steps (and at the end); 0: only at the end.
    pub eval_steps: usize,
    /// Checkpoint every this many steps; 0: only on stop requests and at the end.
    pub save_steps: usize,
    pub save_total_limit: usize,
    /// Resume from the newest valid checkpoint in `output`, if there is one.
    pub resume: bool,
    /// Recompute each block in the backward pass instead of keeping its activations.
    pub gradient_checkpointing: bool,
    /// FastChat template name; default: the model's own chat template, else name matching.
    pub template: Option<String>,
    pub system: Option<String>,
}

/// What a run reports as it goes.
#[derive(Debug, Clone)]
pub enum Progress {
    Started {
        total_steps: usize,
        start_step: usize,
        train_samples: usize,
        eval_samples: usize,
        trainable_params: usize,
        notes: Vec<String>,
    },
    Step {
        step: usize,
        loss: f32,
        lr: f64,
        grad_norm: f64,
        tokens: usize,
        /// Tokens run through the model, padding included.
        input_tokens: usize,
        seconds: f64,
    },
    Eval {
        step: usize,
        loss: f32,
    },
    Checkpoint {
        step: usize,
        path: PathBuf,
    },
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct Summary {
    pub steps: usize,
    /// True when a stop request (SIGTERM) ended it early, after a checkpoint.
    pub stopped: bool,
    pub final_train_loss: Option<f32>,
    pub eval_loss: Vec<(usize, f32)>,
    pub output: PathBuf,
    pub tokens_per_second: f64,
}

/// One micro-batch: rows of equal length.
struct Batch {
    /// The training samples of each row (eval batches: empty).
    samples: Vec<Vec<usize>>,
    ids: Vec<Vec<u32>>,
    segments: Vec<Vec<u32>>,
    /// Flat positions (row·t + i) whose next token is a label, and that token.
    positions: Vec<u32>,
    targets: Vec<u32>,
}

/// A model being trained, with its data and optimizer.
pub struct Trainer {
    cfg: TrainConfig,
    model: Model,
    loaded_name: String,
    tokenizer: vicugna_engine::tokenizer::Tokenizer,
    format: ChatFormat,
    params: Vec<(String, Var)>,
    /// The adapter settings as saved (target modules as the checkpoint names them).
    saved_lora: Option<LoraConfig>,
    opt: AdamW,
    train: Vec<Encoded>,
    eval: Vec<Encoded>,
    pad_id: u32,
    epoch_cache: HashMap<usize, Vec<Vec<usize>>>,
    state: TrainState,
    notes: Vec<String>,
    /// (input tokens, seconds) of each step run by this process, for benchmarks.
    step_times: Vec<(usize, f64)>,
    /// Bottom layers with nothing to train (LoRA on the last layers only).
    frozen: usize,
    /// Each training sample's residual stream after the frozen layers, `[len, hidden]`,
    /// computed the first time the sample is used.
    frozen_out: std::sync::Mutex<HashMap<usize, Tensor>>,
    /// The frozen layers as generation runs them, on the file's quantized
    /// weights where it has them (a GGUF file): the same values as the
    /// dequantized copy, several times faster than the training forward.
    frozen_model: Option<Model>,
    _memory: vicugna_engine::loader::ReuseFreedMemory,
}

fn mix(seed: u64, k: u64) -> u64 {
    let mut h = Sha256::new();
    h.update(seed.to_le_bytes());
    h.update(k.to_le_bytes());
    let d = h.finalize();
    u64::from_le_bytes(d[..8].try_into().unwrap_or([0; 8]))
}

impl Trainer {
    /// Loads the model and data and prepares (or resumes) a run.
    pub fn new(mut cfg: TrainConfig) -> Result<Self> {
        validate(&cfg)?;
        let loaded = LoadedModel::load(
            &cfg.model,
            &LoadOptions {
                dtype: match cfg.precision {
                    Precision::F32 => WeightDType::F32,
                    Precision::Bf16 => WeightDType::BF16,
                },
            },
        )?;
        let tokenizer = loaded.tokenizer()?.clone();
        let model_template = tokenizer.chat_template().map(|t| {
            (
                t,
                tokenizer.bos_token().unwrap_or(""),
                tokenizer.eos_token().unwrap_or(""),
            )
        });
        let (format, source) =
            ChatFormat::select_with_source(cfg.template.as_deref(), model_template, &loaded.path.to_string_lossy())?;
        let mut notes = Vec::new();
        match source {
            // The fallback (one_shot) would put a long example conversation before
            // every sample, in a format the model never saw: refuse rather than
            // train on that.
            FormatSource::Default => {
                return Err(TrainError::setting(
                    "--template",
                    format!(
                        "{} has no chat template and its name matches no FastChat template; it may be a base \
                         model (such as gemma3-270m) that continues text rather than chats. Choose the \
                         conversation format to train it on with --template NAME (e.g. vicuna_v1.1, zero_shot, \
                         llama-3, mistral)",
                        loaded.path.display()
                    ),
                ))
            }
            FormatSource::Model => notes.push("conversation format: the model's own chat template".into()),
            FormatSource::Matched => notes.push(format!(
                "conversation format: FastChat template {} (matched from the model's name; --template chooses \
                 another)",
                format.name()
            )),
            FormatSource::Explicit => {}
        }
        let mut model = loaded.model;
        let pad_id = model.config().eos_token_ids.first().copied().unwrap_or(0);

        let (train, eval) = {
            let masker = Masker::new(&format, &tokenizer, cfg.system.as_deref());
            let encode_all = |path: &Path, notes: &mut Vec<String>| -> Result<Vec<Encoded>> {
                let l = data::load(path)?;
                if let Some(t) = &l.broken_tail {
                    notes.push(format!(
                        "{}: the file is cut off at byte {} ({} bytes ignored): {}",
                        path.display(),
                        t.offset,
                        t.bytes,
                        t.message
                    ));
                }
                let mut out = Vec::new();
                let (mut unlabelled, mut truncated) = (0, 0);
                for s in &l.samples {
                    let e = masker.encode(s, Some(cfg.max_len))?;
                    truncated += usize::from(e.truncated > 0);
                    if e.label_count() == 0 {
                        unlabelled += 1;
                        continue;
                    }
                    out.push(e);
                }
                if unlabelled + truncated > 0 {
                    notes.push(format!(
                        "{}: {truncated} conversations cut to --max-len {}, {unlabelled} skipped with no assistant \
                         tokens left",
                        path.display(),
                        cfg.max_len
                    ));
                }
                Ok(out)
            };
            let all = encode_all(&cfg.data, &mut notes)?;
            match &cfg.eval_data {
                Some(p) => (all, encode_all(p, &mut notes)?),
                None if cfg.eval_ratio > 0.0 => {
                    let n = all.len();
                    let n_eval = ((n as f64 * cfg.eval_ratio).round() as usize).clamp(1, n.saturating_sub(1));
                    let order = crate::clean::shuffled((0..n).collect::<Vec<_>>(), cfg.seed ^ 0xE7A1);
                    let mut is_eval = vec![false; n];
                    for &i in order.iter().take(n_eval) {
                        is_eval[i] = true;
                    }
                    let (mut t, mut e) = (Vec::new(), Vec::new());
                    for (x, ev) in all.into_iter().zip(is_eval) {
                        if ev {
                            e.push(x)
                        } else {
                            t.push(x)
                        }
                    }
                    (t, e)
                }
                None => (all, Vec::new()),
            }
        };
        if train.is_empty() {
            return Err(TrainError::BadData {
                path: cfg.data.clone(),
                message: "no conversation with an assistant turn to train on".into(),
            });
        }

        // Trainable variables: every weight (full) or fresh adapters (LoRA).
        let mut params: Vec<(String, Var)> = Vec::new();
        let mut saved_lora = None;
        match &mut cfg.mode {
            Mode::Full => {
                model.map_weights(&mut |name, w| {
                    let v = Var::from_tensor(w)?;
                    let t = v.as_tensor().clone();
                    params.push((name.to_string(), v));
                    Ok(t)
                })?;
            }
            Mode::Lora(lc) => {
                if let Some(n) = cfg.lora_last_layers {
                    let total = model.num_layers();
                    if n == 0 || n > total {
                        return Err(TrainError::setting(
                            "--lora-last-layers",
                            format!("must be between 1 and the model's {total} layers (got {n})"),
                        ));
                    }
                    lc.layers_to_transform = Some((total - n..total).collect());
                }
                // The loader dequantizes the embedding and a tied output projection
                // into two copies; pointing both at one tensor (optionally in
                // bf16) keeps one. Norms stay f32 (tiny, and applied elementwise).
                let store = match cfg.precision {
                    Precision::F32 => DType::F32,
                    Precision::Bf16 => DType::BF16,
                };
                model.map_weights(&mut |name, w| {
                    Ok(if name.ends_with("norm.weight") || name.ends_with(".bias") {
                        w.clone()
                    } else {
                        w.to_dtype(store)?
                    })
                })?;
                let attached = lora::attach_new(&mut model, lc, cfg.seed)?;
                notes.extend(attached.notes);
                saved_lora = Some(attached.saved);
                params = attached.params;
            }
        }
        // The lowest layer holding a trained tensor (PEFT names: `….layers.N.…`).
        let frozen = match &cfg.mode {
            Mode::Full => 0,
            Mode::Lora(_) => params
                .iter()
                .map(|(n, _)| lora::layer_of(n).unwrap_or(0))
                .min()
                .unwrap_or(0),
        };
        if frozen > 0 {
            // The kept outputs grow with the data: say how much memory they take.
            let tokens: usize = train.iter().map(|e| e.ids.len()).sum();
            let mib = (tokens * model.config().hidden_size * 4) >> 20;
            notes.push(format!(
                "layers 0..{frozen} are frozen: their output is computed once per sample and kept ({mib} MiB for \
                 {tokens} tokens), so steps run only layers {frozen}..{}",
                model.num_layers()
            ));
        }
        let frozen_model = if frozen > 0 && loaded.format.starts_with("gguf") {
            // Exact f32 products (no 8-bit activations): what the trained layers see.
            let mode = vicugna_engine::kernels::int8_mode();
            vicugna_engine::kernels::set_int8_mode(vicugna_engine::kernels::Int8Mode::Off);
            let quantized = LoadedModel::load(&cfg.model, &LoadOptions::default());
            vicugna_engine::kernels::set_int8_mode(mode);
            Some(quantized?.model)
        } else {
            None
        };
        let vars: Vec<Var> = params.iter().map(|(_, v)| v.clone()).collect();
        let opt = AdamW::new(cfg.adam, &vars)?;
        let settings = settings_digest(&cfg);
        let state = TrainState {
            step: 0,
            total_steps: 0,
            seed: cfg.seed,
            adam_t: 0,
            tokens: 0,
            train_loss: Vec::new(),
            eval_loss: Vec::new(),
            settings,
            threads: Some(candle_core::utils::get_num_threads()),
            files: HashMap::new(),
        };
        let mut t = Trainer {
            loaded_name: loaded.name,
            cfg,
            model,
            tokenizer,
            format,
            params,
            saved_lora,
            opt,
            train,
            eval,
            pad_id,
            epoch_cache: HashMap::new(),
            state,
            notes,
            step_times: Vec::new(),
            frozen,
            frozen_out: std::sync::Mutex::new(HashMap::new()),
            frozen_model,
            _memory: vicugna_engine::loader::ReuseFreedMemory::new(),
        };
        t.state.total_steps = t.total_steps();
        if t.cfg.resume {
            t.resume()?;
        }
        Ok(t)
    }

    fn resume(&mut self) -> Result<()> {
        let (found, skipped) = checkpoint::latest(&self.cfg.output);
        self.notes.extend(skipped);
        let Some(ck) = found else {
            self.notes
                .push("no checkpoint to resume from; starting at step 0".into());
            return Ok(());
        };
        if ck.state.settings != self.state.settings {
            return Err(TrainError::BadCheckpoint {
                path: ck.path,
                message: "it was written by a run with different settings (model, data, mode, batch, lr, seed or \
                          length); resume with the same command or use a new --output"
                    .into(),
            });
        }
        for (i, (name, var)) in self.params.iter().enumerate() {
            let get = |map: &HashMap<String, Tensor>, key: &str| {
                map.get(key).cloned().ok_or_else(|| TrainError::BadCheckpoint {
                    path: ck.path.clone(),
                    message: format!("missing tensor {key}"),
                })
            };
            var.set(&get(&ck.params, name)?)?;
            self.opt.m[i] = get(&ck.optimizer, &format!("m.{name}"))?;
            self.opt.v[i] = get(&ck.optimizer, &format!("v.{name}"))?;
        }
        self.opt.t = ck.state.adam_t;
        self.notes
            .push(format!("resumed from {} (step {})", ck.path.display(), ck.state.step));
        // Sums split across threads round differently, so a resumed run is
        // bit-identical to an uninterrupted one only with the same thread count.
        // A different count is allowed (a preempted job may come back on another
        // machine) but said loudly.
        let now = self.state.threads;
        match (ck.state.threads, now) {
            (Some(then), Some(now)) if then != now => self.notes.push(format!(
                "warning: the checkpoint was written with --threads {then}, this run uses {now}: training \
                 continues, but the weights will not be bit-identical to an uninterrupted run (pass --threads \
                 {then} for that)"
            )),
            _ => {}
        }
        self.state = ck.state;
        self.state.threads = now;
        Ok(())
    }

    /// Notes gathered while preparing (truncated files, skipped checkpoints, resume point).
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// The chat format conversations are rendered with.
    pub fn format(&self) -> &ChatFormat {
        &self.format
    }

    /// Micro-batches of epoch `e`, as lists of sample indices.
    fn epoch(&mut self, e: usize) -> &Vec<Vec<usize>> {
        let (train, cfg) = (&self.train, &self.cfg);
        self.epoch_cache.entry(e).or_insert_with(|| {
            let order = crate::clean::shuffled((0..train.len()).collect::<Vec<_>>(), mix(cfg.seed, e as u64));
            if !cfg.packing {
                return order.chunks(cfg.micro_batch).map(<[usize]>::to_vec).collect();
            }
            // Greedy packing in shuffled order: rows of at most max_len tokens.
            let mut rows: Vec<Vec<usize>> = Vec::new();
            let mut cur: Vec<usize> = Vec::new();
            let mut len = 0;
            for i in order {
                let n = train[i].ids.len();
                if len + n > cfg.max_len && !cur.is_empty() {
                    rows.push(std::mem::take(&mut cur));
                    len = 0;
                }
                cur.push(i);
                len += n;
            }
            if !cur.is_empty() {
                rows.push(cur);
            }
            // Each micro-batch is `micro_batch` rows; a row boundary is marked by a
            // usize::MAX separator inside the list.
            rows.chunks(cfg.micro_batch).map(|c| c.join(&usize::MAX)).collect()
        })
    }

    fn micro_batches_per_epoch(&mut self) -> usize {
        self.epoch(0).len()
    }

    /// Optimizer steps the run will take.
    pub fn total_steps(&mut self) -> usize {
        let per_epoch = self.micro_batches_per_epoch().div_ceil(self.cfg.grad_accum);
        match self.cfg.length {
            Length::Steps(n) => n,
            Length::Epochs(e) => ((per_epoch as f64 * e).ceil() as usize).max(1),
        }
    }

    /// Sample indices of global micro-batch `k`.
    fn micro(&mut self, k: usize) -> Vec<usize> {
        let per = self.micro_batches_per_epoch().max(1);
        let (e, i) = (k / per, k % per);
        let ep = self.epoch(e);
        ep[i.min(ep.len() - 1)].clone()
    }

    fn build(&self, items: &[usize], from_eval: bool) -> Batch {
        let src = if from_eval { &self.eval } else { &self.train };
        // Rows: without packing one sample per row; with packing rows are split at usize::MAX.
        let rows: Vec<Vec<usize>> = if self.cfg.packing && !from_eval {
            items.split(|&x| x == usize::MAX).map(<[usize]>::to_vec).collect()
        } else {
            items.iter().map(|&i| vec![i]).collect()
        };
        let t = rows
            .iter()
            .map(|r| r.iter().map(|&i| src[i].ids.len()).sum::<usize>())
            .max()
            .unwrap_or(1)
            .max(1);
        let mut b = Batch {
            samples: if from_eval { Vec::new() } else { rows.clone() },
            ids: Vec::new(),
            segments: Vec::new(),
            positions: Vec::new(),
            targets: Vec::new(),
        };
        for (r, row) in rows.iter().enumerate() {
            let (mut ids, mut seg, mut lab) = (Vec::with_capacity(t), Vec::with_capacity(t), Vec::with_capacity(t));
            for (s, &i) in row.iter().enumerate() {
                ids.extend_from_slice(&src[i].ids);
                lab.extend_from_slice(&src[i].labels);
                seg.extend(std::iter::repeat_n(s as u32, src[i].ids.len()));
            }
            let pad_seg = row.len() as u32;
            while ids.len() < t {
                ids.push(self.pad_id);
                lab.push(false);
                seg.push(pad_seg);
            }
            for i in 0..t - 1 {
                if lab[i + 1] && seg[i + 1] == seg[i] {
                    b.positions.push((r * t + i) as u32);
                    b.targets.push(ids[i + 1]);
                }
            }
            b.ids.push(ids);
            b.segments.push(seg);
        }
        b
    }

    /// Summed negative log-likelihood of the batch's targets, tracked for autograd.
    fn nll(&self, x: &Tensor, b: &Batch) -> Result<Tensor> {
        let n = b.positions.len();
        let dev = self.model.device();
        let pos = Tensor::from_vec(b.positions.clone(), n, dev)?;
        Ok(self.model.train_nll(&x.index_select(&pos, 0)?, &b.targets)?)
    }

    /// The residual stream entering the first trained layer, `[b·t, hidden]`,
    /// not tracked for autograd: the embedding and the frozen layers' output,
    /// from each sample's kept output when there are frozen layers. A row's
    /// padding is zeros there, which no real token attends to.
    fn trained_input(&self, b: &Batch, inp: &TrainInputs) -> Result<Tensor> {
        if self.frozen == 0 || b.samples.is_empty() {
            let mut x = self.model.train_embed(inp)?;
            for l in 0..self.frozen {
                x = self.model.train_block(l, &x, inp, None)?;
            }
            return Ok(x.detach());
        }
        let mut kept = self.frozen_out.lock().unwrap_or_else(|e| e.into_inner());
        let (t, hidden) = (b.ids[0].len(), self.model.config().hidden_size);
        let mut rows = Vec::with_capacity(b.samples.len());
        for row in &b.samples {
            let mut parts = Vec::with_capacity(row.len() + 1);
            let mut len = 0;
            for &i in row {
                let x = match kept.entry(i) {
                    std::collections::hash_map::Entry::Occupied(e) => e.get().clone(),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        // Alone, as in its own row: rows are causal and padded at the end.
                        let ids = &self.train[i].ids;
                        let m = self.frozen_model.as_ref().unwrap_or(&self.model);
                        let x = m.residual_after(ids, self.frozen)?;
                        e.insert(Tensor::from_vec(x, (ids.len(), hidden), self.model.device())?)
                            .clone()
                    }
                };
                len += x.dim(0)?;
                parts.push(x);
            }
            if len < t {
                parts.push(Tensor::zeros((t - len, hidden), DType::F32, self.model.device())?);
            }
            rows.push(Tensor::cat(&parts, 0)?);
        }
        Ok(Tensor::cat(&rows, 0)?)
    }

    /// Forward and backward of one micro-batch; adds `d(nll/denominator)/dθ` into `acc`.
    fn backward(&self, b: &Batch, denom: f64, drop: Option<Dropout>, acc: &mut [Option<Tensor>]) -> Result<f64> {
        let inp = self.model.train_inputs(&b.ids, &b.segments)?;
        let layers = self.model.num_layers();
        let first = self.frozen;
        let mut add = |grads: &candle_core::backprop::GradStore| -> Result<()> {
            for (i, (_, v)) in self.params.iter().enumerate() {
                if let Some(g) = grads.get(v.as_tensor()) {
                    let g = g.detach();
                    acc[i] = Some(match acc[i].take() {
                        Some(a) => (a + g)?,
                        None => g,
                    });
                }
            }
            Ok(())
        };
        if !self.cfg.gradient_checkpointing {
            let mut x = match self.cfg.mode {
                // Full fine-tuning trains the embedding too.
                Mode::Full => self.model.train_embed(&inp)?,
                Mode::Lora(_) => self.trained_input(b, &inp)?,
            };
            for l in first..layers {
                x = self.model.train_block(l, &x, &inp, drop)?;
            }
            let nll = self.nll(&x, b)?;
            let value = nll.to_scalar::<f32>()? as f64;
            add(&(nll / denom)?.backward()?)?;
            return Ok(value);
        }
        // Gradient checkpointing: keep only each block's input; in the backward
        // pass recompute one block at a time and push the gradient through it with
        // the surrogate loss sum(out · upstream), whose gradient is exactly the
        // chain rule's.
        let embedded = self.model.train_embed(&inp)?;
        let start = match self.cfg.mode {
            Mode::Full => embedded.detach(),
            Mode::Lora(_) => self.trained_input(b, &inp)?,
        };
        // inputs[l - first]: the input of layer l.
        let mut inputs = vec![start];
        for l in first..layers {
            let out = self.model.train_block(l, &inputs[l - first], &inp, drop)?.detach();
            inputs.push(out);
        }
        let top = Var::from_tensor(&inputs[layers - first])?;
        let nll = self.nll(top.as_tensor(), b)?;
        let value = nll.to_scalar::<f32>()? as f64;
        let grads = (nll / denom)?.backward()?;
        add(&grads)?;
        let mut upstream = grads
            .get(top.as_tensor())
            .ok_or_else(|| TrainError::setting("--gradient-checkpointing", "no gradient reached the last block"))?
            .detach();
        for l in (first..layers).rev() {
            let x = Var::from_tensor(&inputs[l - first])?;
            let out = self.model.train_block(l, x.as_tensor(), &inp, drop)?;
            let grads = (out * &upstream)?.sum_all()?.backward()?;
            add(&grads)?;
            upstream = match grads.get(x.as_tensor()) {
                Some(g) => g.detach(),
                None => upstream.zeros_like()?,
            };
        }
        if matches!(self.cfg.mode, Mode::Full) {
            add(&(embedded * &upstream)?.sum_all()?.backward()?)?;
        }
        Ok(value)
    }

    fn dropout(&self, k: usize) -> Option<Dropout> {
        match &self.cfg.mode {
            Mode::Lora(l) if l.lora_dropout > 0.0 => Some(Dropout {
                p: l.lora_dropout,
                seed: mix(self.cfg.seed ^ 0xD80F, k as u64),
            }),
            _ => None,
        }
    }

    /// Mean loss per labelled token over the eval split.
    pub fn evaluate(&self) -> Result<Option<f32>> {
        if self.eval.is_empty() {
            return Ok(None);
        }
        let (mut total, mut count) = (0f64, 0usize);
        let idx: Vec<usize> = (0..self.eval.len()).collect();
        for chunk in idx.chunks(self.cfg.micro_batch) {
            let b = self.build(chunk, true);
            if b.positions.is_empty() {
                continue;
            }
            let inp = self.model.train_inputs(&b.ids, &b.segments)?;
            let mut x = self.model.train_embed(&inp)?.detach();
            for l in 0..self.model.num_layers() {
                x = self.model.train_block(l, &x, &inp, None)?.detach();
            }
            total += self.nll(&x, &b)?.to_scalar::<f32>()? as f64;
            count += b.positions.len();
        }
        Ok((count > 0).then(|| (total / count as f64) as f32))
    }

    fn save_checkpoint(&self) -> Result<PathBuf> {
        let params: Vec<(String, Tensor)> = self
            .params
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
            .collect();
        let mut opt = Vec::new();
        for (i, (n, _)) in self.params.iter().enumerate() {
            opt.push((format!("m.{n}"), self.opt.m[i].clone()));
            opt.push((format!("v.{n}"), self.opt.v[i].clone()));
        }
        let mut state = self.state.clone();
        state.adam_t = self.opt.t;
        checkpoint::save(&self.cfg.output, &state, &params, &opt, self.cfg.save_total_limit)
    }

    /// Trains until the planned step count or until `stop` is raised (then a
    /// checkpoint is written first), reporting through `report`.
    pub fn run(&mut self, stop: &Arc<AtomicBool>, report: &mut dyn FnMut(Progress)) -> Result<Summary> {
        let total = self.state.total_steps;
        let warmup = (self.cfg.warmup_ratio * total as f64).ceil() as usize;
        report(Progress::Started {
            total_steps: total,
            start_step: self.state.step,
            train_samples: self.train.len(),
            eval_samples: self.eval.len(),
            trainable_params: self.params.iter().map(|(_, v)| v.elem_count()).sum(),
            notes: self.notes.clone(),
        });
        if self.state.step == 0 && self.state.eval_loss.is_empty() {
            if let Some(l) = self.evaluate()? {
                self.state.eval_loss.push((0, l));
                report(Progress::Eval { step: 0, loss: l });
            }
        }
        let started = Instant::now();
        let start_tokens = self.state.tokens;
        let mut stopped = false;
        while self.state.step < total {
            let step = self.state.step;
            let t0 = Instant::now();
            let batches: Vec<Batch> = (0..self.cfg.grad_accum)
                .map(|j| {
                    let items = self.micro(step * self.cfg.grad_accum + j);
                    self.build(&items, false)
                })
                .collect();
            let denom = batches.iter().map(|b| b.positions.len()).sum::<usize>().max(1);
            let input_tokens: usize = batches.iter().map(|b| b.ids.len() * b.ids[0].len()).sum();
            let mut acc: Vec<Option<Tensor>> = vec![None; self.params.len()];
            let mut nll = 0f64;
            for (j, b) in batches.iter().enumerate() {
                if b.positions.is_empty() {
                    continue;
                }
                let drop = self.dropout(step * self.cfg.grad_accum + j);
                nll += self.backward(b, denom as f64, drop, &mut acc)?;
            }
            let mut grads: Vec<Tensor> = acc
                .into_iter()
                .zip(&self.params)
                .map(|(g, (_, v))| g.map_or_else(|| v.as_tensor().zeros_like(), Ok))
                .collect::<candle_core::Result<_>>()?;
            let grad_norm = clip_grad_norm(&mut grads, self.cfg.max_grad_norm)?;
            let lr = cosine_lr(self.cfg.lr, step, warmup, total);
            let vars: Vec<Var> = self.params.iter().map(|(_, v)| v.clone()).collect();
            self.opt.step(&vars, &grads, lr)?;
            let loss = (nll / denom as f64) as f32;
            self.state.step += 1;
            self.state.tokens += denom as u64;
            self.state.adam_t = self.opt.t;
            self.state.train_loss.push((self.state.step, loss));
            report(Progress::Step {
                step: self.state.step,
                loss,
                lr,
                grad_norm,
                tokens: denom,
                input_tokens,
                seconds: t0.elapsed().as_secs_f64(),
            });
            self.step_times.push((input_tokens, t0.elapsed().as_secs_f64()));
            let done = self.state.step == total;
            if (self.cfg.eval_steps > 0 && self.state.step.is_multiple_of(self.cfg.eval_steps)) || done {
                if let Some(l) = self.evaluate()? {
                    self.state.eval_loss.push((self.state.step, l));
                    report(Progress::Eval {
                        step: self.state.step,
                        loss: l,
                    });
                }
            }
            let stop_now = stop.load(Ordering::SeqCst);
            if (self.cfg.save_steps > 0 && self.state.step.is_multiple_of(self.cfg.save_steps)) || stop_now || done {
                let path = self.save_checkpoint()?;
                report(Progress::Checkpoint {
                    step: self.state.step,
                    path,
                });
            }
            if stop_now && !done {
                stopped = true;
                break;
            }
        }
        if !stopped {
            self.write_outputs()?;
        }
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        Ok(Summary {
            steps: self.state.step,
            stopped,
            final_train_loss: self.state.train_loss.last().map(|p| p.1),
            eval_loss: self.state.eval_loss.clone(),
            output: self.cfg.output.clone(),
            tokens_per_second: (self.state.tokens - start_tokens) as f64 / secs,
        })
    }

    /// The trained tensors by name (weights, or PEFT adapter tensors).
    pub fn trained_tensors(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
            .collect()
    }

    /// Final outputs: a PEFT adapter or an HF-layout model, plus the loss curve.
    fn write_outputs(&self) -> Result<()> {
        let out = &self.cfg.output;
        std::fs::create_dir_all(out).map_err(|e| TrainError::io(out, e))?;
        let tensors = self.trained_tensors();
        match &self.cfg.mode {
            Mode::Lora(lc) => lora::save_peft(
                out,
                self.saved_lora.as_ref().unwrap_or(lc),
                &self.cfg.model.to_string_lossy(),
                &tensors,
            )?,
            Mode::Full => self.save_hf(out, &tensors)?,
        }
        let curve = out.join("loss.png");
        if let Err(e) = crate::plot::loss_curve(&curve, &self.state.train_loss, &self.state.eval_loss) {
            eprintln!("warning: {e}");
        }
        let history = serde_json::json!({
            "train_loss": self.state.train_loss,
            "eval_loss": self.state.eval_loss,
            "steps": self.state.step,
            "tokens": self.state.tokens,
            "step_input_tokens_and_seconds": self.step_times,
            "base_model": self.loaded_name,
        });
        data::write_atomic(&out.join("trainer_state.json"), history.to_string().as_bytes())
    }

    fn save_hf(&self, out: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
        let tensors = crate::hf_names::to_checkpoint_names(&self.model, tensors)?;
        checkpoint::save_safetensors(&out.join("model.safetensors"), &tensors)?;
        let cfg = self.model.config();
        let hf = cfg.to_hf_json(self.model.tied_embeddings());
        data::write_atomic(
            &out.join("config.json"),
            serde_json::to_vec_pretty(&hf).unwrap_or_default().as_slice(),
        )?;
        let tok_path = out.join("tokenizer.json");
        self.tokenizer
            .inner()
            .save(&tok_path, false)
            .map_err(|e| TrainError::setting("tokenizer", format!("saving {}: {e}", tok_path.display())))?;
        let mut tc = serde_json::json!({ "add_bos_token": self.tokenizer.add_bos() });
        if let Some(t) = self.tokenizer.chat_template() {
            tc["chat_template"] = t.into();
        }
        if let Some(t) = self.tokenizer.bos_token() {
            tc["bos_token"] = t.into();
        }
        if let Some(t) = self.tokenizer.eos_token() {
            tc["eos_token"] = t.into();
        }
        data::write_atomic(&out.join("tokenizer_config.json"), tc.to_string().as_bytes())?;
        let gc = serde_json::json!({ "eos_token_id": cfg.eos_token_ids, "bos_token_id": cfg.bos_token_id });
        data::write_atomic(&out.join("generation_config.json"), gc.to_string().as_bytes())
    }
}

fn validate(cfg: &TrainConfig) -> Result<()> {
    let pos = |name: &'static str, v: usize| {
        if v == 0 {
            Err(TrainError::setting(name, "must be at least 1"))
        } else {
            Ok(())
        }
    };
    if cfg.mode == Mode::Full && cfg.precision == Precision::Bf16 {
        return Err(TrainError::setting(
            "--dtype",
            "bf16 applies to the frozen base of a LoRA run; full fine-tuning keeps f32 weights (an update of \
             lr x gradient is below bf16's resolution, so trained weights need f32, and on the CPU a bf16 working \
             copy beside them would add memory, not save it)",
        ));
    }
    if cfg.lora_last_layers.is_some() && cfg.mode == Mode::Full {
        return Err(TrainError::setting(
            "--lora-last-layers",
            "chooses the layers a LoRA run adapts; full fine-tuning trains every weight (use --mode lora)",
        ));
    }
    pos("--micro-batch", cfg.micro_batch)?;
    pos("--grad-accum", cfg.grad_accum)?;
    pos("--max-len", cfg.max_len)?;
    pos("--save-total-limit", cfg.save_total_limit)?;
    if !(cfg.lr > 0.0 && cfg.lr.is_finite()) {
        return Err(TrainError::setting("--lr", format!("must be positive, got {}", cfg.lr)));
    }
    if !(0.0..1.0).contains(&cfg.warmup_ratio) {
        return Err(TrainError::setting("--warmup-ratio", "must be in [0, 1)"));
    }
    if !(0.0..1.0).contains(&cfg.eval_ratio) {
        return Err(TrainError::setting("--eval-ratio", "must be in [0, 1)"));
    }
    match cfg.length {
        Length::Steps(0) => return Err(TrainError::setting("--max-steps", "must be at least 1")),
        Length::Epochs(e) if !(e > 0.0 && e.is_finite()) => {
            return Err(TrainError::setting("--epochs", "must be positive"))
        }
        _ => {}
    }
    if !cfg.data.exists() {
        return Err(TrainError::io(&cfg.data, std::io::ErrorKind::NotFound.into()));
    }
    Ok(())
}

/// What must match for a checkpoint to be resumed by this run.
fn settings_digest(cfg: &TrainConfig) -> String {
    let text = format!(
        "{:?}|{:?}|{:?}|{:?}|{}|{:?}|{}|{}|{}|{}|{}|{}|{}|{:?}|{:?}|{}",
        cfg.model,
        cfg.data,
        cfg.mode,
        cfg.length,
        cfg.lr,
        cfg.adam,
        cfg.micro_batch,
        cfg.grad_accum,
        cfg.max_len,
        cfg.packing,
        cfg.seed,
        cfg.warmup_ratio,
        cfg.eval_ratio,
        cfg.template,
        cfg.system,
        cfg.max_grad_norm,
    );
    // Older checkpoints (f32 only) keep their digest.
    let text = match cfg.precision {
        Precision::F32 => text,
        Precision::Bf16 => format!("{text}|bf16"),
    };
    format!("{:x}", Sha256::digest(text.as_bytes()))
}
