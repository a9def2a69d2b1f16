//! The model: one definition for every family (`arch.rs` says what sets each
//! apart) and every weight format — dense f32/f16/bf16 tensors (safetensors, or
//! trainable variables) and ggml-quantized GGUF blocks go through the same `Linear`.
//!
//! Two forwards share the weights: the fast one (`fast.rs`) that generation runs,
//! and the reference one (`reference.rs`), differentiable, that training runs and
//! that the fast one is tested against, family by family.
//!
//! A forward pass takes a ragged batch: each sequence brings its new tokens and its
//! own KV cache. The projections and the MLP run once over all tokens of all
//! sequences (that is where the weights are read, so batching pays); attention runs
//! per sequence against its own cache. Prefill chunks and single decode tokens mix
//! freely in one pass, which is what continuous batching needs.

pub mod arch;
mod attention;
mod cache;
pub mod config;
mod fast;
mod linear;
pub mod names;
mod reference;

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Tensor, D};

pub use cache::{KvCache, KvDType};
pub use linear::{Linear, Lora, WeightDType};
pub use reference::{Dropout, TrainInputs, LINEAR_MODULES};

use crate::config::{layer_inv_freq, rope_inv_freq, ModelConfig};
use crate::error::{EngineError, Result};
use crate::kernels::{QMatrix, KEY_BLOCK};
use crate::weights::{Weight, WeightSource};
use linear::{fuse, LinearWeight};

enum Embedding {
    Dense(Tensor),
    /// Rows dequantized on lookup; shares its blocks with a tied output layer.
    Kernel(QMatrix),
    Quantized(QMatMul),
}

/// A gated MLP: `down(act(gate(x)) · up(x))`.
struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
    /// gate and up as one matrix (the two are views of it), for one pass instead
    /// of two; `None` where the weights do not allow it.
    gate_up: Option<QMatrix>,
}

/// What follows the MLP norm: one MLP, or experts chosen per token by a router.
enum Ffn {
    Dense(Mlp),
    Moe {
        router: Linear,
        experts: Vec<Mlp>,
        per_token: usize,
    },
}

struct Block {
    attn_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    /// RMSNorm weights over each query / key head (qwen3, gemma3).
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    /// The norm of the attention output before the residual add (gemma3).
    attn_post_norm: Option<Tensor>,
    mlp_norm: Tensor,
    /// The norm of the MLP output before the residual add (gemma3).
    mlp_post_norm: Option<Tensor>,
    ffn: Ffn,
    /// q, k and v as one matrix (the three are views of it), for one pass per
    /// decode step instead of three; `None` where the weights do not allow it.
    qkv: Option<QMatrix>,
    /// Keys further back than this are not attended to in this layer.
    window: Option<usize>,
    /// This layer's inverse rotary frequencies (gemma3's sliding layers have
    /// their own base).
    inv_freq: Vec<f32>,
}

/// Token rows per block of the MLP in the fast forward: bounds its intermediates
/// (`gate`, `up`, their product) to this many rows of a prompt chunk.
const MLP_ROWS: usize = 128;

/// One sequence's place in a ragged batch: (offset in the batch, new tokens,
/// tokens already cached).
type Span = (usize, usize, usize);

/// A loaded model.
pub struct Model {
    cfg: ModelConfig,
    embed: Embedding,
    blocks: Vec<Block>,
    norm: Tensor,
    lm_head: Linear,
    inv_freq: Vec<f32>,
    device: Device,
    /// The output projection is the embedding matrix (one tensor, two uses).
    tied: bool,
    /// The element type of new caches.
    kv_dtype: KvDType,
}

/// New tokens of one sequence for a forward pass, and that sequence's cache.
pub struct SeqInput<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
}

fn load_norm(src: &dyn WeightSource, name: &str, size: usize, device: &Device) -> Result<Tensor> {
    src.get(name, &[size])?.to_dense(DType::F32, device)
}

impl Model {
    /// Builds the model from a weight source. `dense` forces plain weights of that
    /// dtype; `None` keeps quantized weights quantized (and dense ones f32).
    pub fn load(cfg: ModelConfig, src: &dyn WeightSource, dense: Option<DType>, device: &Device) -> Result<Self> {
        let spec = cfg.arch.spec();
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (nh, nkv, ffn) = (cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size);
        let (qd, kvd) = (nh * hd, nkv * hd);
        let bias = |name: &str, out: usize| -> Result<Tensor> {
            src.get(&format!("{name}.bias"), &[out])?.to_dense(DType::F32, device)
        };
        let linear = |name: &str, out: usize, inp: usize, with_bias: bool| -> Result<Linear> {
            let w = src.get(&format!("{name}.weight"), &[out, inp])?;
            let b = if with_bias { Some(bias(name, out)?) } else { None };
            Linear::new(w, b, dense, device)
        };
        // Layers multiplied together (q, k, v; gate, up), each `(name, out)`:
        // mapped blocks that are repacked go straight into one buffer.
        let linears = |parts: &[(&str, usize)], inp: usize, with_bias: bool| -> Result<Vec<Linear>> {
            let mut ws = Vec::with_capacity(parts.len());
            let mut bs = Vec::with_capacity(parts.len());
            for &(name, out) in parts {
                ws.push(src.get(&format!("{name}.weight"), &[out, inp])?);
                bs.push(if with_bias { Some(bias(name, out)?) } else { None });
            }
            if dense.is_none() {
                if let Some(ls) = Linear::mapped_parts(&ws, bs.clone()) {
                    return Ok(ls);
                }
            }
            ws.into_iter()
                .zip(bs)
                .map(|(w, b)| Linear::new(w, b, dense, device))
                .collect()
        };
        // Rows `parts` of one stored matrix (a fused projection, stacked experts)
        // as separate layers; the bias split alike.
        let split = |w: Weight, b: Option<Tensor>, parts: &[(usize, usize)]| -> Result<Vec<Linear>> {
            parts
                .iter()
                .map(|&(start, len)| {
                    let b = b.as_ref().map(|b| b.narrow(0, start, len)).transpose()?;
                    Linear::new(w.rows(start, len)?, b, dense, device)
                })
                .collect()
        };
        // The vocabulary-sized matrices first: repacking one briefly holds two
        // copies, which then costs the least with nothing else loaded yet.
        let embed_w = src.get("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        let tied = cfg.tie_word_embeddings || !src.contains("lm_head.weight");
        let lm_head = if tied {
            Linear::new(embed_w.clone(), None, dense, device)?
        } else {
            linear("lm_head", cfg.vocab_size, h, false)?
        };
        let embed = match (embed_w, dense, &lm_head.weight) {
            (Weight::Quantized(_) | Weight::Mapped(_), None, LinearWeight::Kernel(m)) if tied => {
                Embedding::Kernel(m.clone())
            }
            (Weight::Mapped(m), None, _) => {
                match QMatrix::from_mapped_for_lookup(&m).or_else(|| QMatrix::from_mapped(&m)) {
                    Some(k) => Embedding::Kernel(k),
                    None => Embedding::Quantized(QMatMul::from_arc(m.to_qtensor()?)?),
                }
            }
            (Weight::Quantized(q), None, _) => match QMatrix::from_qtensor(&q) {
                Some(m) => Embedding::Kernel(m),
                None => Embedding::Quantized(QMatMul::from_arc(q)?),
            },
            (w, _, _) => Embedding::Dense(w.to_dense(DType::F32, device)?),
        };
        let mlp = |gate: Linear, up: Linear, down: Linear| {
            let (mut gate, mut up) = (gate, up);
            Mlp {
                gate_up: fuse(&mut [&mut gate, &mut up]),
                gate,
                up,
                down,
            }
        };
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("model.layers.{i}");
            let (mut q, mut k, mut v) = if spec.fused_qkv {
                let name = format!("{p}.self_attn.qkv_proj");
                let w = src.get(&format!("{name}.weight"), &[qd + 2 * kvd, h])?;
                let b = if cfg.qkv_bias {
                    Some(bias(&name, qd + 2 * kvd)?)
                } else {
                    None
                };
                let mut parts = split(w, b, &[(0, qd), (qd, kvd), (qd + kvd, kvd)])?.into_iter();
                let mut next = || parts.next().unwrap_or_else(|| unreachable!("three parts"));
                (next(), next(), next())
            } else {
                let names = ["q_proj", "k_proj", "v_proj"].map(|n| format!("{p}.self_attn.{n}"));
                let parts = [
                    (names[0].as_str(), qd),
                    (names[1].as_str(), kvd),
                    (names[2].as_str(), kvd),
                ];
                let mut parts = linears(&parts, h, cfg.qkv_bias)?.into_iter();
                let mut next = || parts.next().unwrap_or_else(|| unreachable!("three parts"));
                (next(), next(), next())
            };
            let dense_mlp = |prefix: &str| -> Result<Mlp> {
                let (gate, up) = if spec.fused_gate_up {
                    let w = src.get(&format!("{prefix}.gate_up_proj.weight"), &[2 * ffn, h])?;
                    let mut parts = split(w, None, &[(0, ffn), (ffn, ffn)])?.into_iter();
                    let mut next = || parts.next().unwrap_or_else(|| unreachable!("two parts"));
                    (next(), next())
                } else {
                    let (g, u) = (format!("{prefix}.gate_proj"), format!("{prefix}.up_proj"));
                    let mut parts = linears(&[(g.as_str(), ffn), (u.as_str(), ffn)], h, false)?.into_iter();
                    let mut next = || parts.next().unwrap_or_else(|| unreachable!("two parts"));
                    (next(), next())
                };
                Ok(mlp(gate, up, linear(&format!("{prefix}.down_proj"), h, ffn, false)?))
            };
            let ffn_part = match cfg.moe {
                None => Ffn::Dense(dense_mlp(&format!("{p}.mlp"))?),
                Some(m) => Ffn::Moe {
                    router: if src.contains(&format!("{p}.block_sparse_moe.gate.weight")) {
                        linear(&format!("{p}.block_sparse_moe.gate"), m.experts, h, false)?
                    } else {
                        linear(&format!("{p}.mlp.gate"), m.experts, h, false)?
                    },
                    experts: load_experts(src, &p, m.experts, h, ffn, &split, &linear)?
                        .into_iter()
                        .map(|(g, u, d)| mlp(g, u, d))
                        .collect(),
                    per_token: m.per_token,
                },
            };
            let norm = |name: &str, size: usize| load_norm(src, &format!("{p}.{name}.weight"), size, device);
            let (attn_post_norm, mlp_norm, mlp_post_norm) = if spec.sandwich_norms {
                (
                    Some(norm("post_attention_layernorm", h)?),
                    norm("pre_feedforward_layernorm", h)?,
                    Some(norm("post_feedforward_layernorm", h)?),
                )
            } else {
                (None, norm("post_attention_layernorm", h)?, None)
            };
            blocks.push(Block {
                attn_norm: norm("input_layernorm", h)?,
                qkv: fuse(&mut [&mut q, &mut k, &mut v]),
                q,
                k,
                v,
                o: linear(&format!("{p}.self_attn.o_proj"), h, qd, false)?,
                q_norm: spec.qk_norm.then(|| norm("self_attn.q_norm", hd)).transpose()?,
                k_norm: spec.qk_norm.then(|| norm("self_attn.k_norm", hd)).transpose()?,
                attn_post_norm,
                mlp_norm,
                mlp_post_norm,
                ffn: ffn_part,
                window: cfg.window_of(i),
                inv_freq: layer_inv_freq(&cfg, i),
            });
        }
        let norm = load_norm(src, "model.norm.weight", h, device)?;
        let inv_freq = rope_inv_freq(&cfg);
        // Weights kept quantized already move the logits far more than f16 keys
        // and values do (SmolLM2 Q4_1: HF's greedy ids unchanged, logprobs within
        // 0.003); plain weights keep HF's f32 arithmetic.
        let quantized = blocks.iter().any(|b| {
            b.linears()
                .iter()
                .any(|(_, l)| !matches!(l.weight, LinearWeight::Dense(_)))
        });
        let kv_dtype = if quantized { KvDType::F16 } else { KvDType::F32 };
        Ok(Model {
            cfg,
            embed,
            blocks,
            norm,
            lm_head,
            inv_freq,
            device: device.clone(),
            tied,
            kv_dtype,
        })
    }

    /// The model's shape.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// `f` summed over every linear layer a token passes through (of a mixture
    /// of experts, the router and as many experts as a token uses).
    fn sum_linears(&self, f: impl Fn(&Linear) -> usize) -> usize {
        let per_block: usize = self
            .blocks
            .iter()
            .map(|b| {
                let attn: usize = [&b.q, &b.k, &b.v, &b.o].into_iter().map(&f).sum();
                let mlp = |m: &Mlp| f(&m.gate) + f(&m.up) + f(&m.down);
                attn + match &b.ffn {
                    Ffn::Dense(m) => mlp(m),
                    Ffn::Moe {
                        router,
                        experts,
                        per_token,
                    } => f(router) + experts.first().map_or(0, mlp) * per_token,
                }
            })
            .sum();
        per_block + f(&self.lm_head)
    }

    /// Multiply-adds of the linear layers per token (attention's excluded).
    pub fn weight_macs_per_token(&self) -> usize {
        self.sum_linears(Linear::weight_count)
    }

    /// Bytes of weights read from memory to produce one token.
    pub fn weight_bytes_per_token(&self) -> usize {
        self.sum_linears(Linear::weight_bytes)
    }

    /// The element type of caches made from now on (`new_cache`).
    pub fn set_kv_dtype(&mut self, dtype: KvDType) {
        self.kv_dtype = dtype;
    }

    /// The element type of new caches.
    pub fn kv_dtype(&self) -> KvDType {
        self.kv_dtype
    }

    /// An empty cache with room for `capacity` tokens.
    pub fn new_cache(&self, capacity: usize) -> Result<KvCache> {
        // Whole blocks of the key layout.
        let capacity = capacity.max(1).next_multiple_of(KEY_BLOCK);
        Ok(KvCache::new(
            self.kv_dtype,
            self.cfg.num_layers,
            self.cfg.num_kv_heads,
            self.cfg.head_dim,
            capacity,
        ))
    }

    /// A new cache holding the first `len` tokens of `src`, with room for `capacity`.
    pub fn cache_prefix(&self, src: &KvCache, len: usize, capacity: usize) -> Result<KvCache> {
        let len = len.min(src.len);
        let mut dst = self.new_cache(capacity.max(len))?;
        dst.copy_from(src, len);
        dst.len = len;
        Ok(dst)
    }

    /// Makes room for `needed` tokens, copying into a larger buffer only when full.
    fn reserve(&self, cache: &mut KvCache, needed: usize) -> Result<()> {
        if needed <= cache.capacity {
            return Ok(());
        }
        let capacity = needed.max(cache.capacity * 2);
        let mut bigger = self.new_cache(capacity)?;
        bigger.copy_from(cache, cache.len);
        bigger.len = cache.len;
        *cache = bigger;
        Ok(())
    }

    /// Token embeddings `[n, hidden]` (× √hidden where the family scales them).
    fn embed_rows(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let h = self.cfg.hidden_size;
        let mut out = match &self.embed {
            Embedding::Dense(w) => {
                let idx = Tensor::from_slice(ids, ids.len(), &self.device)?;
                w.index_select(&idx, 0)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?
            }
            Embedding::Kernel(m) => {
                let mut out = vec![0f32; ids.len() * h];
                for (&id, row) in ids.iter().zip(out.chunks_exact_mut(h)) {
                    m.dequantize_row(id as usize, row);
                }
                out
            }
            Embedding::Quantized(q) => {
                let idx = Tensor::from_slice(ids, ids.len(), &self.device)?;
                q.embedding(&idx)?.flatten_all()?.to_vec1::<f32>()?
            }
        };
        if let Some(s) = self.embed_scale() {
            out.iter_mut().for_each(|x| *x *= s);
        }
        Ok(out)
    }

    /// What embeddings are multiplied by, where the family scales them.
    fn embed_scale(&self) -> Option<f32> {
        self.cfg
            .arch
            .spec()
            .embed_scale
            .then(|| (self.cfg.hidden_size as f32).sqrt())
    }

    /// An RMSNorm weight as the forward multiplies by it (HF's weight plus the
    /// family's offset).
    fn norm_weight(&self, w: &Tensor) -> Result<Vec<f32>> {
        let offset = self.cfg.arch.spec().norm_offset;
        let mut v = w.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        if offset != 0.0 {
            v.iter_mut().for_each(|x| *x += offset);
        }
        Ok(v)
    }

    /// The final norm of rows `x` `[n, hidden]`.
    fn final_norm(&self, x: &[f32]) -> Result<Vec<f32>> {
        let mut out = vec![0f32; x.len()];
        attention::rms_norm_rows(
            x,
            &self.norm_weight(&self.norm)?,
            self.cfg.rms_norm_eps as f32,
            &mut out,
        );
        Ok(out)
    }

    /// Runs the new tokens of each sequence through the model, appending to their
    /// caches. Returns, per sequence, the logits of its last token (`[vocab]`), or
    /// of every new token (`[t, vocab]`) when `all_logits` is set.
    pub fn forward(&self, batch: &mut [SeqInput<'_>], all_logits: bool) -> Result<Vec<Tensor>> {
        if !all_logits {
            let mut out = Vec::new();
            self.forward_last_into(batch, &mut out)?;
            let vocab = out.len() / batch.len().max(1);
            return out
                .chunks_exact(vocab.max(1))
                .map(|row| Ok(Tensor::from_slice(row, vocab, &self.device)?))
                .collect();
        }
        let (x, spans) = self.transformer(batch)?;
        let n = x.len() / self.cfg.hidden_size;
        let h = Tensor::from_vec(self.final_norm(&x)?, (n, self.cfg.hidden_size), &self.device)?;
        let logits = self.lm_head.forward(&h)?;
        spans.iter().map(|&(off, t, _)| Ok(logits.narrow(0, off, t)?)).collect()
    }

    /// [`Self::forward`] for the last token of each sequence only, with the
    /// logits written into `out` (`[batch, vocab]`, row `i` for sequence `i`):
    /// the caller keeps `out` between steps. A fresh `[8, 49152]` result per
    /// decode step cost ~600 page faults (glibc maps buffers that large on
    /// their own and unmaps them on free).
    pub fn forward_last_into(&self, batch: &mut [SeqInput<'_>], out: &mut Vec<f32>) -> Result<()> {
        let hs = self.cfg.hidden_size;
        let (x, spans) = self.transformer(batch)?;
        let last: Vec<f32> = spans
            .iter()
            .flat_map(|&(off, t, _)| x[(off + t - 1) * hs..(off + t) * hs].iter().copied())
            .collect();
        let n = spans.len();
        let h = self.final_norm(&last)?;
        match self.lm_head.kernel() {
            Some(m) if self.device.is_cpu() && self.lm_head.bias.is_none() => {
                out.resize(n * m.rows(), 0.0);
                m.matmul(&h, n, out);
            }
            _ => {
                let h = Tensor::from_vec(h, (n, hs), &self.device)?;
                out.clear();
                out.extend(self.lm_head.forward(&h)?.flatten_all()?.to_vec1::<f32>()?);
            }
        }
        Ok(())
    }

    /// Like [`Self::forward`], but returns the last hidden state (after the final
    /// norm, as HF's `hidden_states[-1]`) of every new token, `[t, hidden]` per
    /// sequence: what embeddings are pooled from.
    pub fn hidden_states(&self, batch: &mut [SeqInput<'_>]) -> Result<Vec<Tensor>> {
        let (x, spans) = self.transformer(batch)?;
        let n = x.len() / self.cfg.hidden_size;
        let x = Tensor::from_vec(self.final_norm(&x)?, (n, self.cfg.hidden_size), &self.device)?;
        spans.iter().map(|&(off, t, _)| Ok(x.narrow(0, off, t)?)).collect()
    }

    /// The residual stream after the first `layers` decoder layers of one
    /// sequence, `[t, hidden]` row-major: the input of the layers above, for
    /// training those alone (see the trainer's frozen layers).
    pub fn residual_after(&self, tokens: &[u32], layers: usize) -> Result<Vec<f32>> {
        let mut cache = self.new_cache(tokens.len())?;
        let mut batch = [SeqInput {
            tokens,
            cache: &mut cache,
        }];
        Ok(self.transformer_upto(&mut batch, layers.min(self.blocks.len()))?.0)
    }

    /// The decoder layers over a ragged batch: the residual stream `[tokens, hidden]`
    /// (before the final norm) and where each sequence's tokens sit in it.
    fn transformer(&self, batch: &mut [SeqInput<'_>]) -> Result<(Vec<f32>, Vec<Span>)> {
        self.transformer_upto(batch, self.blocks.len())
    }

    /// [`Self::transformer`] through the first `upto` layers only.
    fn transformer_upto(&self, batch: &mut [SeqInput<'_>], upto: usize) -> Result<(Vec<f32>, Vec<Span>)> {
        let cfg = &self.cfg;
        let mut ids = Vec::new();
        let mut spans = Vec::with_capacity(batch.len());
        for s in batch.iter_mut() {
            if s.tokens.is_empty() {
                return Err(EngineError::InvalidRequest(
                    "a sequence in the batch has no new tokens".into(),
                ));
            }
            if let Some(&bad) = s.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
                return Err(EngineError::InvalidRequest(format!(
                    "token id {bad} is outside the vocabulary (size {})",
                    cfg.vocab_size
                )));
            }
            let start = s.cache.len;
            self.reserve(s.cache, start + s.tokens.len())?;
            spans.push((ids.len(), s.tokens.len(), start));
            ids.extend_from_slice(s.tokens);
        }
        let x = self.embed_rows(&ids)?;
        let x = self.layers(batch, &spans, x, upto)?;
        for (s, &(_, t, _)) in batch.iter_mut().zip(&spans) {
            s.cache.len += t;
        }
        Ok((x, spans))
    }

    /// Whether this model's products round activations to 8 bits (`--int8`).
    pub fn int8_activations(&self) -> bool {
        self.blocks
            .iter()
            .any(|b| b.linears().iter().any(|(_, l)| l.kernel().is_some_and(|m| m.int8())))
    }

    /// The vocabulary size (width of the logits).
    pub fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }
}

/// The experts of one layer as (gate, up, down), from whichever layout the
/// file has: transformers 5's stacked `gate_up_proj` / `down_proj`, llama.cpp's
/// stacked `*_exps` (asked for as `mlp.experts.{gate,up,down}_proj`), or
/// transformers 4's `block_sparse_moe.experts.E.w1/w3/w2`.
#[allow(clippy::type_complexity)]
fn load_experts(
    src: &dyn WeightSource,
    p: &str,
    n: usize,
    h: usize,
    ffn: usize,
    split: &dyn Fn(Weight, Option<Tensor>, &[(usize, usize)]) -> Result<Vec<Linear>>,
    linear: &dyn Fn(&str, usize, usize, bool) -> Result<Linear>,
) -> Result<Vec<(Linear, Linear, Linear)>> {
    let stacked = |name: &str, rows: usize, cols: usize, each: &[(usize, usize)]| -> Result<Vec<Vec<Linear>>> {
        let w = src.get(name, &[n, rows, cols])?;
        (0..n)
            .map(|e| {
                let parts: Vec<(usize, usize)> = each.iter().map(|&(s, l)| (e * rows + s, l)).collect();
                split(w.clone(), None, &parts)
            })
            .collect()
    };
    let mut out = Vec::with_capacity(n);
    if src.contains(&format!("{p}.mlp.experts.gate_up_proj")) {
        let gu = stacked(
            &format!("{p}.mlp.experts.gate_up_proj"),
            2 * ffn,
            h,
            &[(0, ffn), (ffn, ffn)],
        )?;
        let down = stacked(&format!("{p}.mlp.experts.down_proj"), h, ffn, &[(0, h)])?;
        for (mut gu, mut d) in gu.into_iter().zip(down) {
            let up = gu.pop();
            let gate = gu.pop();
            if let (Some(gate), Some(up), Some(down)) = (gate, up, d.pop()) {
                out.push((gate, up, down));
            }
        }
    } else if src.contains(&format!("{p}.mlp.experts.gate_proj")) {
        let gate = stacked(&format!("{p}.mlp.experts.gate_proj"), ffn, h, &[(0, ffn)])?;
        let up = stacked(&format!("{p}.mlp.experts.up_proj"), ffn, h, &[(0, ffn)])?;
        let down = stacked(&format!("{p}.mlp.experts.down_proj"), h, ffn, &[(0, h)])?;
        for ((mut g, mut u), mut d) in gate.into_iter().zip(up).zip(down) {
            if let (Some(g), Some(u), Some(d)) = (g.pop(), u.pop(), d.pop()) {
                out.push((g, u, d));
            }
        }
    } else {
        for e in 0..n {
            let q = format!("{p}.block_sparse_moe.experts.{e}");
            out.push((
                linear(&format!("{q}.w1"), ffn, h, false)?,
                linear(&format!("{q}.w3"), ffn, h, false)?,
                linear(&format!("{q}.w2"), h, ffn, false)?,
            ));
        }
    }
    Ok(out)
}

impl Block {
    /// Every projection by its module path within the layer.
    fn linears(&self) -> Vec<(String, &Linear)> {
        let mut out: Vec<(String, &Linear)> = vec![
            ("self_attn.q_proj".into(), &self.q),
            ("self_attn.k_proj".into(), &self.k),
            ("self_attn.v_proj".into(), &self.v),
            ("self_attn.o_proj".into(), &self.o),
        ];
        match &self.ffn {
            Ffn::Dense(m) => {
                out.push(("mlp.gate_proj".into(), &m.gate));
                out.push(("mlp.up_proj".into(), &m.up));
                out.push(("mlp.down_proj".into(), &m.down));
            }
            Ffn::Moe { router, experts, .. } => {
                out.push(("mlp.gate".into(), router));
                for (e, m) in experts.iter().enumerate() {
                    out.push((format!("mlp.experts.{e}.gate_proj"), &m.gate));
                    out.push((format!("mlp.experts.{e}.up_proj"), &m.up));
                    out.push((format!("mlp.experts.{e}.down_proj"), &m.down));
                }
            }
        }
        out
    }

    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out: Vec<(String, &mut Linear)> = vec![
            ("self_attn.q_proj".into(), &mut self.q),
            ("self_attn.k_proj".into(), &mut self.k),
            ("self_attn.v_proj".into(), &mut self.v),
            ("self_attn.o_proj".into(), &mut self.o),
        ];
        match &mut self.ffn {
            Ffn::Dense(m) => {
                out.push(("mlp.gate_proj".into(), &mut m.gate));
                out.push(("mlp.up_proj".into(), &mut m.up));
                out.push(("mlp.down_proj".into(), &mut m.down));
            }
            Ffn::Moe { router, experts, .. } => {
                out.push(("mlp.gate".into(), router));
                for (e, m) in experts.iter_mut().enumerate() {
                    out.push((format!("mlp.experts.{e}.gate_proj"), &mut m.gate));
                    out.push((format!("mlp.experts.{e}.up_proj"), &mut m.up));
                    out.push((format!("mlp.experts.{e}.down_proj"), &mut m.down));
                }
            }
        }
        out
    }

    /// The norm weights by HF name within the layer (what a checkpoint holds).
    fn norms_mut(&mut self, arch: arch::Arch) -> Vec<(&'static str, &mut Tensor)> {
        let sandwich = arch.spec().sandwich_norms;
        let mut out = vec![("input_layernorm.weight", &mut self.attn_norm)];
        if sandwich {
            out.push(("pre_feedforward_layernorm.weight", &mut self.mlp_norm));
        } else {
            out.push(("post_attention_layernorm.weight", &mut self.mlp_norm));
        }
        if let Some(n) = &mut self.attn_post_norm {
            out.push(("post_attention_layernorm.weight", n));
        }
        if let Some(n) = &mut self.mlp_post_norm {
            out.push(("post_feedforward_layernorm.weight", n));
        }
        if let Some(n) = &mut self.q_norm {
            out.push(("self_attn.q_norm.weight", n));
        }
        if let Some(n) = &mut self.k_norm {
            out.push(("self_attn.k_norm.weight", n));
        }
        out
    }
}

/// Index of the largest value (first on ties), as greedy decoding picks.
pub fn argmax(logits: &Tensor) -> Result<u32> {
    Ok(logits.argmax(D::Minus1)?.to_scalar::<u32>()?)
}

#[cfg(test)]
mod tests {
    use super::attention::{
        attend, attend_part, attention_chunks, finish_part, fold_part, part_len, AttendScratch, ATTENTION_CHUNK,
    };
    use super::*;
    use crate::kernels::{key_index, KvRows};
    use crate::weights::SafetensorsSource;
    use candle_core::quantized::{GgmlDType, QTensor};
    use std::path::PathBuf;
    use std::sync::Arc;

    /// Chunked attention (`ATTENTION_CHUNK`) against the softmax formula in f64,
    /// over a context of several chunks starting inside one (a sliding window);
    /// and the chunks computed apart and merged afterwards (how a single stream's
    /// decode step spreads them over the team) give the very bits of `attend`.
    #[test]
    fn chunked_attention_matches_the_formula_however_it_is_split() {
        let (g, hd) = (3, 64);
        let (lo, end) = (37, 2 * ATTENTION_CHUNK + 300);
        let mut rng = 7u64;
        let mut next = || {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((rng >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
        };
        let q: Vec<f32> = (0..g * hd).map(|_| next()).collect();
        let keys: Vec<f32> = (0..end * hd).map(|_| next()).collect();
        let values: Vec<f32> = (0..end * hd).map(|_| next()).collect();
        let mut kb = vec![0f32; end.next_multiple_of(KEY_BLOCK) * hd];
        for p in 0..end {
            for c in 0..hd {
                kb[key_index(p, c, hd)] = keys[p * hd + c];
            }
        }
        let view = |a: usize, b: usize| {
            let (b0, b1) = (a / KEY_BLOCK, b.div_ceil(KEY_BLOCK));
            (
                KvRows::F32(&kb[b0 * KEY_BLOCK * hd..b1 * KEY_BLOCK * hd]),
                a % KEY_BLOCK,
                KvRows::F32(&values[a * hd..b * hd]),
            )
        };
        let scale = 0.125;
        let mut out = vec![0f32; g * hd];
        attend(&q, lo, end, view, hd, scale, &mut out, &mut AttendScratch::default());
        assert_eq!(attention_chunks(lo, end).count(), 3);
        for h in 0..g {
            let s: Vec<f64> = (lo..end)
                .map(|p| (0..hd).map(|c| (q[h * hd + c] * keys[p * hd + c]) as f64).sum::<f64>() * scale as f64)
                .collect();
            let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = s.iter().map(|x| (x - max).exp()).sum();
            for c in 0..hd {
                let want: f64 = (lo..end)
                    .map(|p| (s[p - lo] - max).exp() * values[p * hd + c] as f64)
                    .sum::<f64>()
                    / sum;
                let got = out[h * hd + c] as f64;
                assert!((got - want).abs() < 1e-4, "head {h} dim {c}: {got} vs {want}");
            }
        }
        // Apart, then merged in order.
        let plen = part_len(g, hd);
        let chunks: Vec<(usize, usize)> = attention_chunks(lo, end).collect();
        let mut parts = vec![0f32; chunks.len() * plen];
        for (&(a, b), part) in chunks.iter().zip(parts.chunks_exact_mut(plen)) {
            let (k, first, v) = view(a, b);
            attend_part(&q, k, first, v, hd, b - a, scale, part, &mut Vec::new());
        }
        let (acc, rest) = parts.split_at_mut(plen);
        for next in rest.chunks_exact(plen) {
            fold_part(acc, next, g, hd);
        }
        let mut merged = vec![0f32; g * hd];
        finish_part(acc, g, hd, &mut merged);
        assert!(merged.iter().zip(&out).all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    /// Long-context decode: a token gets the same bits alone and in a batch of
    /// eight (one task per token and kv head, chunks in turn), and stays near the
    /// reference forward, which attends the whole context at once.
    #[test]
    fn long_context_decode_has_the_same_bits_alone_and_batched() {
        let mut m = tiny("tiny-llama", true);
        m.set_kv_dtype(KvDType::F32);
        let n = 2 * ATTENTION_CHUNK + 77;
        let tokens: Vec<u32> = (0..n).map(|i| (i * 37 % 500 + 3) as u32).collect();
        let (prompt, last) = tokens.split_at(n - 1);
        let mut base = m.new_cache(n).unwrap();
        m.forward(
            &mut [SeqInput {
                tokens: prompt,
                cache: &mut base,
            }],
            false,
        )
        .unwrap();
        let step = |batch: usize| {
            let mut caches: Vec<KvCache> = (0..batch).map(|_| m.cache_prefix(&base, n - 1, n).unwrap()).collect();
            let mut inputs: Vec<SeqInput> = caches.iter_mut().map(|c| SeqInput { tokens: last, cache: c }).collect();
            let out = m.forward(&mut inputs, false).unwrap();
            out.iter().map(|t| t.to_vec1::<f32>().unwrap()).collect::<Vec<_>>()
        };
        let alone = step(1).remove(0);
        for (i, row) in step(8).iter().enumerate() {
            assert!(
                row.iter().zip(&alone).all(|(a, b)| a.to_bits() == b.to_bits()),
                "sequence {i} of 8 differs from the same sequence alone"
            );
        }
        let reference = tiny("tiny-llama", false);
        let want = reference_logits(&reference, &tokens).pop().unwrap();
        let d = max_diff(&alone, &want);
        assert!(d < 1e-3, "logits {d} off the reference forward");
    }

    /// The tiny HF fixtures with every matrix quantized to Q8_0 at load (`keep`:
    /// kept quantized, so the fast forward runs our kernels), or quantized and
    /// dequantized again (the same values as plain f32, for the reference).
    struct Quantizing(SafetensorsSource, bool);

    impl WeightSource for Quantizing {
        fn get(&self, name: &str, shape: &[usize]) -> Result<Weight> {
            match self.0.get(name, shape)? {
                Weight::Dense(t) if shape.len() >= 2 && shape[shape.len() - 1].is_multiple_of(32) => {
                    let t = t.to_dtype(DType::F32)?;
                    let q = QTensor::quantize(&t, GgmlDType::Q8_0)?;
                    Ok(if self.1 {
                        Weight::Quantized(Arc::new(q))
                    } else {
                        Weight::Dense(q.dequantize(&Device::Cpu)?)
                    })
                }
                w => Ok(w),
            }
        }
        fn contains(&self, name: &str) -> bool {
            self.0.contains(name)
        }
    }

    fn dir(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/models")
            .join(name)
    }

    fn tiny(name: &str, quantized: bool) -> Model {
        let cfg = ModelConfig::from_hf_file(&dir(name).join("config.json")).unwrap();
        let src = Quantizing(
            SafetensorsSource::open_dir(&dir(name), &Device::Cpu).unwrap(),
            quantized,
        );
        Model::load(cfg, &src, None, &Device::Cpu).unwrap()
    }

    /// Logits of every prompt token through the reference forward.
    fn reference_logits(m: &Model, tokens: &[u32]) -> Vec<Vec<f32>> {
        let inp = m.train_inputs(&[tokens.to_vec()], &[vec![0; tokens.len()]]).unwrap();
        let mut x = m.train_embed(&inp).unwrap();
        for l in 0..m.num_layers() {
            x = m.train_block(l, &x, &inp, None).unwrap();
        }
        m.train_head(&x).unwrap().to_vec2::<f32>().unwrap()
    }

    fn fast_logits(m: &Model, tokens: &[u32], chunks: &[usize]) -> Vec<Vec<f32>> {
        let mut c = m.new_cache(tokens.len()).unwrap();
        let mut rows = Vec::new();
        let mut at = 0;
        for &n in chunks.iter().chain(std::iter::repeat(&1)) {
            if at >= tokens.len() {
                break;
            }
            let n = n.min(tokens.len() - at);
            let mut b = [SeqInput {
                tokens: &tokens[at..at + n],
                cache: &mut c,
            }];
            rows.extend(m.forward(&mut b, true).unwrap().remove(0).to_vec2::<f32>().unwrap());
            at += n;
        }
        rows
    }

    /// An f16 cache (the default for quantized weights) keeps the logits within
    /// f16's rounding of the f32 cache's.
    #[test]
    fn f16_cache_stays_near_the_f32_cache() {
        let tokens = [1u32, 17, 93, 5, 41, 8, 2, 60];
        for name in ["tiny-llama", "tiny-qwen2", "tiny-gemma3"] {
            let mut m = tiny(name, true);
            assert_eq!(m.kv_dtype(), KvDType::F16, "quantized weights get an f16 cache");
            let k16 = fast_logits(&m, &tokens, &[3, 2]);
            m.set_kv_dtype(KvDType::F32);
            let k32 = fast_logits(&m, &tokens, &[3, 2]);
            for step in 0..tokens.len() {
                let d = max_diff(&k16[step], &k32[step]);
                // f16 keeps 11 bits: each cached value moves by up to 2^-12 of itself.
                let scale = k32[step].iter().fold(0f32, |m, v| m.max(v.abs()));
                assert!(
                    d < 2e-3 * scale,
                    "{name} token {step}: f16 cache {d} off the f32 cache (logits up to {scale})"
                );
            }
        }
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max)
    }

    /// Every family: the fast forward gives the reference forward's logits, on
    /// our kernels (Q8_0) and on plain weights, for whole prompts, prompts in
    /// chunks, and decoding token by token in a batch whose sequences have
    /// different lengths, some still in their prompt while others decode; and
    /// with a sliding window shorter than the sequences (mistral's, set to 4).
    #[test]
    fn fast_forward_matches_reference_in_every_family() {
        let models = [
            ("tiny-llama", None),
            ("tiny-llama3-rope", None),
            ("tiny-mistral", None),
            ("tiny-mistral", Some(4)),
            ("tiny-qwen2", None),
            ("tiny-qwen3", None),
            ("tiny-gemma3", None),
            ("tiny-phi3", None),
            ("tiny-mixtral", None),
        ];
        for (name, window) in models {
            for quantized in [true, false] {
                let set_window = |m: &mut Model| {
                    if let Some(w) = window {
                        m.cfg.sliding_window = Some(w);
                        m.blocks.iter_mut().for_each(|b| b.window = Some(w));
                    }
                };
                let mut m = tiny(name, quantized);
                set_window(&mut m);
                let mut reference = tiny(name, false);
                set_window(&mut reference);
                // An f16 cache would round keys that differ in their last bit.
                m.set_kv_dtype(KvDType::F32);
                let what = format!("{name} window {window:?} quantized {quantized}");
                let seqs: Vec<Vec<u32>> = vec![vec![1, 17, 93, 5, 41, 8], vec![2, 60, 7], vec![3, 11, 12, 13, 14]];
                let want: Vec<Vec<Vec<f32>>> = seqs.iter().map(|s| reference_logits(&reference, s)).collect();
                if quantized && name != "tiny-phi3" {
                    assert!(
                        m.blocks.iter().all(|b| b.q.kernel().is_some()),
                        "{what}: not on our kernels"
                    );
                }
                for (i, s) in seqs.iter().enumerate() {
                    for chunks in [&[s.len()][..], &[2, 3]] {
                        let got = fast_logits(&m, s, chunks);
                        for (step, (g, w)) in got.iter().zip(&want[i]).enumerate() {
                            let d = max_diff(g, w);
                            assert!(
                                d < 1e-4,
                                "{what}: prompt {i} token {step} ({chunks:?}): logits differ by {d}"
                            );
                        }
                    }
                }
                // Sequence 1 feeds its first two tokens as a prompt chunk, the others
                // one token per step: steps mix a chunk with single tokens.
                let mut caches: Vec<KvCache> = seqs.iter().map(|_| m.new_cache(2).unwrap()).collect();
                let mut fed = vec![0usize; seqs.len()];
                while (0..seqs.len()).any(|i| fed[i] < seqs[i].len()) {
                    let mut batch: Vec<SeqInput> = Vec::new();
                    let mut live = Vec::new();
                    for (i, c) in caches.iter_mut().enumerate() {
                        if fed[i] < seqs[i].len() {
                            let n = if i == 1 && fed[i] == 0 { 2 } else { 1 };
                            batch.push(SeqInput {
                                tokens: &seqs[i][fed[i]..fed[i] + n],
                                cache: c,
                            });
                            live.push((i, n));
                        }
                    }
                    let got = m.forward(&mut batch, false).unwrap();
                    for (&(i, n), g) in live.iter().zip(got) {
                        fed[i] += n;
                        let d = max_diff(&g.to_vec1::<f32>().unwrap(), &want[i][fed[i] - 1]);
                        assert!(
                            d < 1e-4,
                            "{what}: sequence {i} after {} tokens: logits differ by {d}",
                            fed[i]
                        );
                    }
                }
            }
        }
    }

    /// transformers 4's Mixtral layout (`block_sparse_moe`, one tensor per expert:
    /// w1 gate, w3 up, w2 down), served from the transformers 5 fixture.
    struct MixtralV4(SafetensorsSource);

    impl MixtralV4 {
        fn v5_name(name: &str) -> Option<(String, usize, &'static str)> {
            let (p, rest) = name.split_once(".block_sparse_moe.")?;
            if rest == "gate.weight" {
                return Some((format!("{p}.mlp.gate.weight"), 0, "router"));
            }
            let (e, w) = rest.strip_prefix("experts.")?.split_once('.')?;
            let which = match w {
                "w1.weight" => "gate",
                "w3.weight" => "up",
                "w2.weight" => "down",
                _ => return None,
            };
            let stacked = if which == "down" { "down_proj" } else { "gate_up_proj" };
            Some((format!("{p}.mlp.experts.{stacked}"), e.parse().ok()?, which))
        }
    }

    impl WeightSource for MixtralV4 {
        fn get(&self, name: &str, shape: &[usize]) -> Result<Weight> {
            if name.contains(".mlp.") {
                return Err(EngineError::InvalidRequest(format!(
                    "{name}: not in the transformers 4 layout"
                )));
            }
            let Some((v5, e, which)) = Self::v5_name(name) else {
                return self.0.get(name, shape);
            };
            if which == "router" {
                return self.0.get(&v5, shape);
            }
            let (ffn, h) = (128, 64);
            let stacked_shape = if which == "down" { [4, h, ffn] } else { [4, 2 * ffn, h] };
            let w = self.0.get(&v5, &stacked_shape)?;
            let rows = stacked_shape[1];
            match which {
                "gate" => w.rows(e * rows, ffn),
                "up" => w.rows(e * rows + ffn, ffn),
                _ => w.rows(e * rows, h),
            }
        }
        fn contains(&self, name: &str) -> bool {
            !name.contains(".mlp.") && (Self::v5_name(name).is_some() || self.0.contains(name))
        }
    }

    #[test]
    fn mixtral_loads_from_the_transformers_4_layout_too() {
        let cfg = ModelConfig::from_hf_file(&dir("tiny-mixtral").join("config.json")).unwrap();
        let v4 = MixtralV4(SafetensorsSource::open_dir(&dir("tiny-mixtral"), &Device::Cpu).unwrap());
        let m = Model::load(cfg.clone(), &v4, None, &Device::Cpu).unwrap();
        let v5 = SafetensorsSource::open_dir(&dir("tiny-mixtral"), &Device::Cpu).unwrap();
        let want = Model::load(cfg, &v5, None, &Device::Cpu).unwrap();
        let tokens = [1u32, 17, 93, 5, 41, 8];
        assert_eq!(fast_logits(&m, &tokens, &[6]), fast_logits(&want, &tokens, &[6]));
    }
}
