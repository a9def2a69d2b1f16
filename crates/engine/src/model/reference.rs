//! The reference forward: the same blocks over a padded or packed batch `[b, t]`
//! without a KV cache, in candle ops that autograd can differentiate. Training
//! runs it; a test holds the fast forward to it for every family.

use candle_core::{DType, Device, Storage, Tensor, D};
use rayon::prelude::*;

use super::linear::LinearWeight;
use super::*;
use crate::config::Activation;

/// The seven projections of a block, by their HF module names.
pub const LINEAR_MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Token ids of a training batch with their positions and attention mask.
pub struct TrainInputs {
    /// `[b, t]` u32.
    pub ids: Tensor,
    /// Per distinct rope of the layers (global, then sliding where it differs):
    /// `cos`, `sin` `[b, 1, t, hd/2]`.
    ropes: Vec<(Tensor, Tensor)>,
    /// Additive `[b, 1, t, t]`: causal, and block-diagonal when sequences are
    /// packed; the second limited to the sliding window, for layers that slide.
    masks: Vec<Tensor>,
    b: usize,
    t: usize,
}

/// LoRA dropout for one training step: the probability and a seed from which
/// every mask is derived, so a recomputed block (or a resumed run) draws the
/// same masks.
#[derive(Debug, Clone, Copy)]
pub struct Dropout {
    pub p: f32,
    pub seed: u64,
}

impl Dropout {
    fn mask(&self, layer: usize, module: usize, shape: (usize, usize), device: &Device) -> Result<Tensor> {
        use rand::{Rng, SeedableRng};
        let stream = self.seed ^ ((layer as u64) << 32 | module as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut rng = rand::rngs::StdRng::seed_from_u64(stream);
        let keep = 1.0 / (1.0 - self.p);
        let n = shape.0 * shape.1;
        let v: Vec<f32> = (0..n)
            .map(|_| if rng.random::<f32>() < self.p { 0.0 } else { keep })
            .collect();
        Ok(Tensor::from_vec(v, shape, device)?)
    }
}

/// Each row's negative log-likelihood of its target under `softmax(h Wᵀ)`, for
/// `h` `[n, hidden]` and the output projection `W` `[vocab, hidden]`.
///
/// The logits are never whole: the vocabulary goes in slices of at most
/// `HEAD_SLICE` rows of `W`, with a running log-sum-exp per row, and the backward
/// pass recomputes each slice's logits. Written as one op because candle's
/// `log_softmax` + `gather` keep four `[n, vocab]` tensors alive until the
/// backward pass ends (and as many again during it): with 49,152 logits per
/// token that was the largest allocation of a step, growing with `--max-len`.
/// `W`'s gradient is computed only when `W` is trained.
struct HeadNll {
    w: Tensor,
    targets: Vec<u32>,
    /// Each row's log-sum-exp, from the forward pass for the backward pass.
    lse: std::sync::Mutex<Vec<f32>>,
}

/// Vocabulary rows per slice of the output projection in [`HeadNll`].
const HEAD_SLICE: usize = 8192;

impl HeadNll {
    /// `(start, len)` of each vocabulary slice: fewer columns when there are many rows,
    /// so one slice's logits stay near 4M floats.
    fn slices(&self, rows: usize) -> Vec<(usize, usize)> {
        let vocab = self.w.dim(0).unwrap_or(0);
        let width = ((4 << 20) / rows.max(1)).clamp(1024, HEAD_SLICE);
        (0..vocab).step_by(width).map(|j| (j, width.min(vocab - j))).collect()
    }

    /// Logits of every row for one slice, flat `[rows, len]`, and the widened slice of `W`.
    fn logits(&self, h: &Tensor, (start, len): (usize, usize)) -> candle_core::Result<(Vec<f32>, Tensor)> {
        let w = self.w.narrow(0, start, len)?.to_dtype(DType::F32)?.contiguous()?;
        let l = h.matmul(&w.t()?)?.flatten_all()?.to_vec1::<f32>()?;
        Ok((l, w))
    }
}

impl candle_core::CustomOp2 for HeadNll {
    fn name(&self) -> &'static str {
        "head-nll"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
        _w: &candle_core::CpuStorage,
        _wl: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let h = cpu_tensor(storage, layout)?;
        let n = h.dim(0)?;
        if n != self.targets.len() {
            candle_core::bail!("head-nll: {n} rows but {} targets", self.targets.len());
        }
        // Per row: running max, running sum of exp(logit - max), the target's logit.
        let mut acc = vec![(f32::NEG_INFINITY, 0f32, 0f32); n];
        for (j, len) in self.slices(n) {
            let (l, _) = self.logits(&h, (j, len))?;
            acc.par_iter_mut()
                .zip(l.par_chunks(len))
                .zip(self.targets.par_iter())
                .for_each(|(((m, s, t), row), &target)| {
                    let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let new_m = m.max(mx);
                    *s = *s * (*m - new_m).exp() + row.iter().map(|&x| (x - new_m).exp()).sum::<f32>();
                    *m = new_m;
                    let k = target as usize;
                    if (j..j + len).contains(&k) {
                        *t = row[k - j];
                    }
                });
        }
        let lse: Vec<f32> = acc.iter().map(|&(m, s, _)| m + s.ln()).collect();
        let nll: Vec<f32> = lse.iter().zip(&acc).map(|(l, &(_, _, t))| l - t).collect();
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = lse;
        Ok((candle_core::CpuStorage::F32(nll), candle_core::Shape::from(n)))
    }

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        _nll: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let lse = self.lse.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let g = grad.to_vec1::<f32>()?;
        let h = h.detach();
        let n = h.dim(0)?;
        let train_w = w.is_variable() || w.track_op();
        let mut grad_h: Option<Tensor> = None;
        let mut grad_w = Vec::new();
        for (j, len) in self.slices(n) {
            let (mut d, wj) = self.logits(&h, (j, len))?;
            // d logit = (softmax - onehot(target)) · upstream gradient of the row.
            d.par_chunks_mut(len)
                .zip(self.targets.par_iter())
                .zip(lse.par_iter().zip(g.par_iter()))
                .for_each(|((row, &target), (&lse, &g))| {
                    row.iter_mut().for_each(|x| *x = (*x - lse).exp() * g);
                    let k = target as usize;
                    if (j..j + len).contains(&k) {
                        row[k - j] -= g;
                    }
                });
            let d = Tensor::from_vec(d, (n, len), h.device())?;
            let gh = d.matmul(&wj)?;
            grad_h = Some(match grad_h {
                Some(a) => (a + gh)?,
                None => gh,
            });
            if train_w {
                grad_w.push(d.t()?.matmul(&h)?);
            }
        }
        let grad_w = if train_w {
            Some(Tensor::cat(&grad_w, 0)?.to_dtype(w.dtype())?)
        } else {
            None
        };
        Ok((grad_h, grad_w))
    }
}

/// Attention probabilities `softmax(q kᵀ · scale + mask)` for `q`, `k`
/// `[b, heads, t, head_dim]`: `[b, heads, t, t]`.
///
/// One op so that only its output is kept for the backward pass (which needs
/// nothing else: `dS = scale · P ⊙ (dP − rowsum(dP ⊙ P))`). Composed of candle
/// ops, the scores, the scaled and masked scores and the softmax's own three
/// intermediates were all kept, plus a gradient for the constant mask: six
/// `t × t` tensors per head and layer where this keeps one.
struct AttentionProbs {
    /// Additive `[b, 1, t, t]`.
    mask: Tensor,
    scale: f64,
}

pub(super) fn cpu_tensor(
    storage: &candle_core::CpuStorage,
    layout: &candle_core::Layout,
) -> candle_core::Result<Tensor> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("training op: the input must be contiguous");
    };
    Tensor::from_slice(&storage.as_slice::<f32>()?[start..end], layout.shape(), &Device::Cpu)
}

pub(super) fn into_cpu_storage(t: &Tensor) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
    let t = t.contiguous()?;
    let (s, l) = t.storage_and_layout();
    match (&*s, l.contiguous_offsets()) {
        (Storage::Cpu(c), Some((0, end))) if end == c.as_slice::<f32>()?.len() => Ok((c.clone(), l.shape().clone())),
        (Storage::Cpu(_), _) => Ok((
            candle_core::CpuStorage::F32(t.flatten_all()?.to_vec1::<f32>()?),
            l.shape().clone(),
        )),
        _ => candle_core::bail!("training ops run on the CPU only"),
    }
}

impl candle_core::CustomOp2 for AttentionProbs {
    fn name(&self) -> &'static str {
        "attention-probs"
    }

    fn cpu_fwd(
        &self,
        qs: &candle_core::CpuStorage,
        ql: &candle_core::Layout,
        ks: &candle_core::CpuStorage,
        kl: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (q, k) = (cpu_tensor(qs, ql)?, cpu_tensor(ks, kl)?);
        let scores = (q.matmul(&k.t()?)? * self.scale)?.broadcast_add(&self.mask)?;
        into_cpu_storage(&candle_nn::ops::softmax_last_dim(&scores)?)
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        p: &Tensor,
        dp: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (q, k, p) = (q.detach(), k.detach(), p.detach());
        let row = (dp * &p)?.sum_keepdim(D::Minus1)?;
        let ds = ((dp.broadcast_sub(&row)? * &p)? * self.scale)?;
        Ok((Some(ds.matmul(&k)?), Some(ds.t()?.matmul(&q)?)))
    }
}

/// RMS norm out of elementwise ops (differentiable).
fn rms_norm_train(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let var = x.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(x.broadcast_div(&(var + eps)?.sqrt()?)?.broadcast_mul(w)?)
}

/// HF's rotate-half RoPE; `x` `[b, heads, t, hd]`, `cos`/`sin` `[b, 1, t, hd/2]`.
fn rope_train(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let r1 = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let r2 = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    Ok(Tensor::cat(&[r1, r2], D::Minus1)?)
}

/// An RMSNorm weight plus the family's offset, differentiable.
fn offset(w: &Tensor, offset: f32) -> Result<Tensor> {
    Ok(if offset == 0.0 {
        w.clone()
    } else {
        w.affine(1.0, f64::from(offset))?
    })
}

impl Model {
    /// Prepares a batch of equal-length rows. `segments[r][i]` says which packed
    /// sequence token `i` of row `r` belongs to (positions restart and attention
    /// stops at each new segment); all zeros for one sequence per row.
    pub fn train_inputs(&self, ids: &[Vec<u32>], segments: &[Vec<u32>]) -> Result<TrainInputs> {
        let b = ids.len();
        let t = ids.first().map_or(0, Vec::len);
        if b == 0 || t == 0 || ids.iter().any(|r| r.len() != t) || segments.len() != b {
            return Err(EngineError::InvalidRequest(
                "a training batch needs rows of equal, non-zero length".into(),
            ));
        }
        if let Some(&bad) = ids.iter().flatten().find(|&&x| x as usize >= self.cfg.vocab_size) {
            return Err(EngineError::InvalidRequest(format!(
                "token id {bad} is outside the vocabulary (size {})",
                self.cfg.vocab_size
            )));
        }
        let window = self.blocks.iter().find_map(|b| b.window);
        let freqs = self.rope_kinds();
        let half = self.inv_freq.len();
        let mut cs: Vec<(Vec<f32>, Vec<f32>)> = freqs
            .iter()
            .map(|_| (Vec::with_capacity(b * t * half), Vec::with_capacity(b * t * half)))
            .collect();
        let mut full = vec![0f32; b * t * t];
        let mut sliding = vec![0f32; if window.is_some() { b * t * t } else { 0 }];
        for (r, seg) in segments.iter().enumerate() {
            let mut pos = 0usize;
            let mut start = 0usize;
            for i in 0..t {
                if i > 0 && seg[i] != seg[i - 1] {
                    pos = 0;
                    start = i;
                }
                for (inv, (cos, sin)) in freqs.iter().zip(cs.iter_mut()) {
                    for &f in inv.iter() {
                        let a = pos as f32 * f;
                        cos.push(a.cos());
                        sin.push(a.sin());
                    }
                }
                for j in 0..t {
                    if j > i || j < start {
                        full[(r * t + i) * t + j] = f32::NEG_INFINITY;
                    }
                    if let Some(w) = window {
                        if j > i || j < start || j + w <= i {
                            sliding[(r * t + i) * t + j] = f32::NEG_INFINITY;
                        }
                    }
                }
                pos += 1;
            }
        }
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        let mut masks = vec![Tensor::from_vec(full, (b, 1, t, t), &self.device)?];
        if window.is_some() {
            masks.push(Tensor::from_vec(sliding, (b, 1, t, t), &self.device)?);
        }
        Ok(TrainInputs {
            ids: Tensor::from_vec(flat, (b, t), &self.device)?,
            ropes: cs
                .into_iter()
                .map(|(c, s)| {
                    Ok((
                        Tensor::from_vec(c, (b, 1, t, half), &self.device)?,
                        Tensor::from_vec(s, (b, 1, t, half), &self.device)?,
                    ))
                })
                .collect::<Result<_>>()?,
            masks,
            b,
            t,
        })
    }

    /// The distinct inverse-frequency tables of the layers: the global one first.
    pub(super) fn rope_kinds(&self) -> Vec<&[f32]> {
        let mut out: Vec<&[f32]> = vec![&self.inv_freq];
        for b in &self.blocks {
            if !out.contains(&b.inv_freq.as_slice()) {
                out.push(&b.inv_freq);
            }
        }
        out
    }

    /// Number of decoder blocks.
    pub fn num_layers(&self) -> usize {
        self.blocks.len()
    }

    /// The token embeddings of a batch, `[b·t, hidden]`.
    pub fn train_embed(&self, inp: &TrainInputs) -> Result<Tensor> {
        let Embedding::Dense(w) = &self.embed else {
            return Err(EngineError::InvalidRequest(
                "training needs dense weights: load the model with dtype f32".into(),
            ));
        };
        // A frozen bf16 table is widened row by row (the residual stream is f32).
        let x = w.index_select(&inp.ids.flatten_all()?, 0)?.to_dtype(DType::F32)?;
        Ok(match self.embed_scale() {
            Some(s) => (x * f64::from(s))?,
            None => x,
        })
    }

    /// One decoder block over the residual stream `x` `[b·t, hidden]`.
    pub fn train_block(&self, layer: usize, x: &Tensor, inp: &TrainInputs, drop: Option<Dropout>) -> Result<Tensor> {
        let cfg = &self.cfg;
        let off = cfg.arch.spec().norm_offset;
        let blk = &self.blocks[layer];
        let (b, t) = (inp.b, inp.t);
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let groups = nh / nkv;
        let eps = cfg.rms_norm_eps;
        // Module numbers for the dropout streams: q k v o gate up down, then
        // router and experts.
        let masks = |m: usize, inp_dim: usize, l: &Linear| -> Result<Option<Tensor>> {
            match drop {
                Some(d) if d.p > 0.0 && l.lora.is_some() => {
                    Ok(Some(d.mask(layer, m, (b * t, inp_dim), &self.device)?))
                }
                _ => Ok(None),
            }
        };
        let norm = |x: &Tensor, w: &Tensor| rms_norm_train(x, &offset(w, off)?, eps);
        let h = norm(x, &blk.attn_norm)?;
        let (hs, is) = (cfg.hidden_size, cfg.intermediate_size);
        let q = blk.q.forward_train(&h, masks(0, hs, &blk.q)?.as_ref())?;
        let k = blk.k.forward_train(&h, masks(1, hs, &blk.k)?.as_ref())?;
        let v = blk.v.forward_train(&h, masks(2, hs, &blk.v)?.as_ref())?;
        let heads = |x: Tensor, n: usize, w: Option<&Tensor>| -> Result<Tensor> {
            let x = x.reshape((b, t, n, hd))?;
            let x = match w {
                Some(w) => norm(&x, w)?,
                None => x,
            };
            Ok(x.transpose(1, 2)?.contiguous()?)
        };
        let kinds = self.rope_kinds();
        let ri = kinds.iter().position(|f| *f == blk.inv_freq.as_slice()).unwrap_or(0);
        let (cos, sin) = &inp.ropes[ri];
        let q = rope_train(&heads(q, nh, blk.q_norm.as_ref())?, cos, sin)?;
        let mut k = rope_train(&heads(k, nkv, blk.k_norm.as_ref())?, cos, sin)?;
        let mut v = heads(v, nkv, None)?;
        if groups > 1 {
            let repeat = |x: Tensor| -> Result<Tensor> {
                Ok(x.unsqueeze(2)?
                    .broadcast_as((b, nkv, groups, t, hd))?
                    .reshape((b, nh, t, hd))?)
            };
            k = repeat(k)?;
            v = repeat(v)?;
        }
        let mask = if blk.window.is_some() {
            &inp.masks[1]
        } else {
            &inp.masks[0]
        };
        let att = q.contiguous()?.apply_op2(
            &k.contiguous()?,
            AttentionProbs {
                mask: mask.clone(),
                scale: cfg.attn_scale,
            },
        )?;
        let o = att.matmul(&v)?.transpose(1, 2)?.reshape((b * t, nh * hd))?;
        let mut o = blk.o.forward_train(&o, masks(3, nh * hd, &blk.o)?.as_ref())?;
        if let Some(w) = &blk.attn_post_norm {
            o = norm(&o, w)?;
        }
        let x = (x + o)?;
        let h = norm(&x, &blk.mlp_norm)?;
        let act = |g: Tensor| -> Result<Tensor> {
            Ok(match cfg.activation {
                Activation::Silu => g.silu()?,
                Activation::GeluTanh => g.gelu()?,
            })
        };
        let mlp = |m: &Mlp, base: usize| -> Result<Tensor> {
            let gate = act(m.gate.forward_train(&h, masks(base, hs, &m.gate)?.as_ref())?)?;
            let y = (gate * m.up.forward_train(&h, masks(base + 1, hs, &m.up)?.as_ref())?)?;
            m.down.forward_train(&y, masks(base + 2, is, &m.down)?.as_ref())
        };
        let mut y = match &blk.ffn {
            Ffn::Dense(m) => mlp(m, 4)?,
            Ffn::Moe {
                router,
                experts,
                per_token,
            } => {
                // Every expert over every row, weighted by the router's
                // renormalised top-k probabilities (zero elsewhere): the same sum
                // as running each row through its chosen experts, differentiable.
                let logits = router.forward_train(&h, masks(7, hs, router)?.as_ref())?;
                let probs = candle_nn::ops::softmax_last_dim(&logits)?;
                let rows = probs.to_vec2::<f32>()?;
                let n = experts.len();
                let mut keep = vec![0f32; rows.len() * n];
                for (r, row) in rows.iter().enumerate() {
                    for e in super::fast::top_k(row, *per_token) {
                        keep[r * n + e] = 1.0;
                    }
                }
                let keep = Tensor::from_vec(keep, (rows.len(), n), &self.device)?;
                let chosen = (probs * keep)?;
                let w = chosen.broadcast_div(&chosen.sum_keepdim(D::Minus1)?)?;
                let mut acc: Option<Tensor> = None;
                for (e, m) in experts.iter().enumerate() {
                    let y = mlp(m, 8 + 3 * e)?.broadcast_mul(&w.narrow(1, e, 1)?)?;
                    acc = Some(match acc {
                        Some(a) => (a + y)?,
                        None => y,
                    });
                }
                acc.ok_or_else(|| EngineError::InvalidRequest("a mixture of experts with no experts".into()))?
            }
        };
        if let Some(w) = &blk.mlp_post_norm {
            y = norm(&y, w)?;
        }
        Ok((x + y)?)
    }

    /// Final norm and output projection for the rows of `x` `[n, hidden]`: logits `[n, vocab]`.
    pub fn train_head(&self, x: &Tensor) -> Result<Tensor> {
        let h = rms_norm_train(
            x,
            &offset(&self.norm, self.cfg.arch.spec().norm_offset)?,
            self.cfg.rms_norm_eps,
        )?;
        self.lm_head.forward_train(&h, None)
    }

    /// Summed negative log-likelihood of `targets[i]` after row `i` of `x` `[n, hidden]`
    /// (the final norm and output projection, then cross-entropy), differentiable,
    /// without holding the `[n, vocab]` logits: equal to `-Σ log_softmax(train_head(x))[i, targets[i]]`.
    pub fn train_nll(&self, x: &Tensor, targets: &[u32]) -> Result<Tensor> {
        if targets.iter().any(|&t| t as usize >= self.cfg.vocab_size) {
            return Err(EngineError::InvalidRequest(
                "a target id is outside the vocabulary".into(),
            ));
        }
        let h = rms_norm_train(
            x,
            &offset(&self.norm, self.cfg.arch.spec().norm_offset)?,
            self.cfg.rms_norm_eps,
        )?;
        let head = &self.lm_head;
        match (&head.weight, &head.bias, &head.lora) {
            (LinearWeight::Dense(w), None, None) => {
                let op = HeadNll {
                    w: w.clone(),
                    targets: targets.to_vec(),
                    lse: Default::default(),
                };
                Ok(h.contiguous()?.apply_op2(w, op)?.sum_all()?)
            }
            _ => {
                let logits = self.lm_head.forward_train(&h, None)?;
                let n = targets.len();
                let tgt = Tensor::from_vec(targets.to_vec(), (n, 1), &self.device)?;
                let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
                Ok(logp.gather(&tgt, 1)?.sum_all()?.neg()?)
            }
        }
    }

    /// Every dense weight by its HF name (the tied output projection is not listed
    /// twice). Norms and embeddings included.
    pub fn named_weights(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        // `map_weights` walks every weight in this order; collect through it.
        let mut this = self.shallow_clone();
        let _ = this.map_weights(&mut |name, w| {
            out.push((name.to_string(), w.clone()));
            Ok(w.clone())
        });
        out
    }

    /// A copy sharing every tensor (tensors are reference-counted).
    fn shallow_clone(&self) -> Model {
        let lin = |l: &Linear| Linear {
            weight: match &l.weight {
                LinearWeight::Dense(w) => LinearWeight::Dense(w.clone()),
                LinearWeight::Kernel(m) => LinearWeight::Kernel(m.clone()),
                LinearWeight::Quantized(q) => LinearWeight::Quantized(q.clone()),
            },
            bias: l.bias.clone(),
            lora: l.lora.clone(),
        };
        let mlp = |m: &Mlp| Mlp {
            gate: lin(&m.gate),
            up: lin(&m.up),
            down: lin(&m.down),
            gate_up: m.gate_up.clone(),
        };
        Model {
            cfg: self.cfg.clone(),
            embed: match &self.embed {
                Embedding::Dense(w) => Embedding::Dense(w.clone()),
                Embedding::Kernel(m) => Embedding::Kernel(m.clone()),
                Embedding::Quantized(q) => Embedding::Quantized(q.clone()),
            },
            blocks: self
                .blocks
                .iter()
                .map(|b| Block {
                    attn_norm: b.attn_norm.clone(),
                    q: lin(&b.q),
                    k: lin(&b.k),
                    v: lin(&b.v),
                    o: lin(&b.o),
                    q_norm: b.q_norm.clone(),
                    k_norm: b.k_norm.clone(),
                    attn_post_norm: b.attn_post_norm.clone(),
                    mlp_norm: b.mlp_norm.clone(),
                    mlp_post_norm: b.mlp_post_norm.clone(),
                    ffn: match &b.ffn {
                        Ffn::Dense(m) => Ffn::Dense(mlp(m)),
                        Ffn::Moe {
                            router,
                            experts,
                            per_token,
                        } => Ffn::Moe {
                            router: lin(router),
                            experts: experts.iter().map(mlp).collect(),
                            per_token: *per_token,
                        },
                    },
                    qkv: b.qkv.clone(),
                    window: b.window,
                    inv_freq: b.inv_freq.clone(),
                })
                .collect(),
            norm: self.norm.clone(),
            lm_head: lin(&self.lm_head),
            inv_freq: self.inv_freq.clone(),
            device: self.device.clone(),
            tied: self.tied,
            kv_dtype: self.kv_dtype,
        }
    }

    /// Replaces every dense weight with `f(name, weight)` (e.g. a trainable
    /// variable holding the same values); a tied output projection follows the
    /// embedding. Names are those of [`Self::named_weights`].
    pub fn map_weights(&mut self, f: &mut dyn FnMut(&str, &Tensor) -> Result<Tensor>) -> Result<()> {
        if let Embedding::Dense(w) = &self.embed {
            let nw = f("model.embed_tokens.weight", w)?;
            if self.tied {
                self.lm_head.weight = LinearWeight::Dense(nw.clone());
            }
            self.embed = Embedding::Dense(nw);
        }
        let arch = self.cfg.arch;
        for (i, blk) in self.blocks.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            for (name, n) in blk.norms_mut(arch) {
                *n = f(&format!("{p}.{name}"), n)?;
            }
            for (name, l) in blk.linears_mut() {
                if let LinearWeight::Dense(w) = &l.weight {
                    l.weight = LinearWeight::Dense(f(&format!("{p}.{name}.weight"), w)?);
                }
                if let Some(bias) = &l.bias {
                    l.bias = Some(f(&format!("{p}.{name}.bias"), bias)?);
                }
            }
        }
        self.norm = f("model.norm.weight", &self.norm)?;
        if !self.tied {
            if let LinearWeight::Dense(w) = &self.lm_head.weight {
                self.lm_head.weight = LinearWeight::Dense(f("lm_head.weight", w)?);
            }
        }
        Ok(())
    }

    /// The projections of every block, by HF module path (`model.layers.3.self_attn.q_proj`).
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, blk) in self.blocks.iter_mut().enumerate() {
            for (name, l) in blk.linears_mut() {
                out.push((format!("model.layers.{i}.{name}"), l));
            }
        }
        out
    }

    /// For a projection the model keeps apart but the checkpoint stores fused
    /// (phi3's q/k/v in `qkv_proj`, gate/up in `gate_up_proj`): the stored
    /// module's path and this projection's rows in it. PEFT adapters name the
    /// stored module.
    pub fn stored_as(&self, path: &str) -> Option<(String, usize, usize)> {
        let spec = self.cfg.arch.spec();
        let (layer, module) = path.rsplit_once('.')?;
        let (prefix, _) = layer.rsplit_once('.')?;
        let (qd, kvd, ffn) = (
            self.cfg.num_heads * self.cfg.head_dim,
            self.cfg.num_kv_heads * self.cfg.head_dim,
            self.cfg.intermediate_size,
        );
        let (fused, start, len) = match (module, layer.ends_with(".self_attn"), layer.ends_with(".mlp")) {
            ("q_proj", true, _) if spec.fused_qkv => ("self_attn.qkv_proj", 0, qd),
            ("k_proj", true, _) if spec.fused_qkv => ("self_attn.qkv_proj", qd, kvd),
            ("v_proj", true, _) if spec.fused_qkv => ("self_attn.qkv_proj", qd + kvd, kvd),
            ("gate_proj", _, true) if spec.fused_gate_up => ("mlp.gate_up_proj", 0, ffn),
            ("up_proj", _, true) if spec.fused_gate_up => ("mlp.gate_up_proj", ffn, ffn),
            _ => return None,
        };
        Some((format!("{prefix}.{fused}"), start, len))
    }

    /// Whether the output projection shares the embedding matrix.
    pub fn tied_embeddings(&self) -> bool {
        self.tied
    }
}
