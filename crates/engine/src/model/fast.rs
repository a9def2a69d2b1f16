//! The fast forward: the decoder layers on plain buffers, what generation runs.
//!
//! Each layer is a few matrix products over all tokens of the batch (q/k/v and
//! gate/up fused where the weights allow), a parallel loop over (sequence, kv
//! head) that writes the new keys and values, and one over (token, kv head) that
//! attends, for prompt chunks and decode steps alike. Through candle this cost an
//! allocation and a dispatch per operation per sequence (rope, cache write,
//! attention, the reshapes between them), about as much as the weights'
//! arithmetic at batch 8; candle's batched prompt attention, on rayon's threads
//! contending with ours, was a quarter of prefill. Projections without one of our
//! kernels (plain weights, adapters, other block types) go through candle inside
//! the same loop. The formulas are HF's (rms_norm, rope, the activations; exp and
//! attention sums differ in the last bits), checked against the reference forward.

use super::attention::{
    attend, attend_part, attention_chunks, finish_part, fold_part, part_len, rms_norm_rows, rope_head, Shared,
    ATTENTION_SCRATCH,
};
use super::cache::KvPtr;
use super::linear::project;
use super::*;
use crate::config::Activation;
use crate::kernels::Aligned;
use crate::team::Team;

/// One attention task: (token row, kv head, positions a .. b).
type Task = (usize, usize, usize, usize);

/// Indices of the `k` largest values, largest first (the first index on ties, as
/// torch's `topk` on CPU).
pub(super) fn top_k(row: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// `act(gate) · up` for `rows` rows of `gu` (`[rows, 2·ffn]`, gate then up) into
/// `act` (`[rows, ffn]`), rows split over the team.
fn activate(kind: Activation, gu: &[f32], rows: usize, ffn: usize, act: &mut [f32]) {
    let team = Team::global();
    let (act_p, gu_r) = (Shared(act.as_mut_ptr()), gu);
    // Up to 8 rows a task, a decode step's rows split over the team.
    let per_task = rows.div_ceil(team.threads()).clamp(1, 8);
    team.run(rows.div_ceil(per_task), &|c| {
        for r in c * per_task..((c + 1) * per_task).min(rows) {
            // SAFETY: each task writes its own rows of `act`, which outlives the loop.
            let a = unsafe { std::slice::from_raw_parts_mut(act_p.get().add(r * ffn), ffn) };
            let (g, u) = gu_r[r * 2 * ffn..(r + 1) * 2 * ffn].split_at(ffn);
            match kind {
                Activation::Silu => crate::kernels::silu_mul(g, u, a),
                Activation::GeluTanh => crate::kernels::gelu_tanh_mul(g, u, a),
            }
        }
    });
}

/// One MLP over `rows` rows of `h` (`[rows, hidden]`) into `out` (`[rows, hidden]`).
fn run_mlp(
    m: &Mlp,
    kind: Activation,
    h: &[f32],
    rows: usize,
    gu: &mut [f32],
    act: &mut [f32],
    out: &mut [f32],
) -> Result<()> {
    let ffn = m.gate.out_features();
    project(
        &[&m.gate, &m.up],
        m.gate_up.as_ref(),
        h,
        rows,
        &mut gu[..rows * 2 * ffn],
    )?;
    activate(kind, gu, rows, ffn, act);
    m.down.matmul_into(&act[..rows * ffn], rows, out)
}

/// RMSNorm in place over each `hd`-wide head of the first `heads` heads of a row.
fn norm_heads(row: &mut [f32], heads: usize, hd: usize, w: &[f32], eps: f32) {
    let mut tmp = vec![0f32; hd];
    for head in row[..heads * hd].chunks_exact_mut(hd) {
        rms_norm_rows(head, w, eps, &mut tmp);
        head.copy_from_slice(&tmp);
    }
}

impl Model {
    /// The first `upto` decoder layers over the embedded tokens `x` (`[tokens,
    /// hidden]`) of a ragged batch; returns the residual stream.
    pub(super) fn layers(
        &self,
        batch: &mut [SeqInput<'_>],
        spans: &[Span],
        mut x: Vec<f32>,
        upto: usize,
    ) -> Result<Vec<f32>> {
        // Elementwise work and activation rounding on this thread too (see
        // `DenormalsOff`).
        let _flush = crate::team::DenormalsOff::new();
        let cfg = &self.cfg;
        let (h, ffn) = (cfg.hidden_size, cfg.intermediate_size);
        let total = x.len() / h;
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let (groups, half, qdim, kvdim) = (nh / nkv, hd / 2, nh * hd, nkv * hd);
        let width = qdim + 2 * kvdim;
        let eps = cfg.rms_norm_eps as f32;
        let scale = cfg.attn_scale as f32;
        // Rope angles per token, shared by every layer of one rope (gemma3's
        // sliding layers have their own).
        let kinds = self.rope_kinds();
        let tables: Vec<(Vec<f32>, Vec<f32>)> = kinds
            .iter()
            .map(|inv| {
                let (mut cos, mut sin) = (vec![0f32; total * half], vec![0f32; total * half]);
                for &(off, t, start) in spans {
                    for i in 0..t {
                        for (j, &f) in inv.iter().enumerate() {
                            let a = (start + i) as f32 * f;
                            cos[(off + i) * half + j] = a.cos();
                            sin[(off + i) * half + j] = a.sin();
                        }
                    }
                }
                (cos, sin)
            })
            .collect();
        // Each row's sequence and position.
        let rows: Vec<(usize, usize)> = spans
            .iter()
            .enumerate()
            .flat_map(|(si, &(_, t, start))| (start..start + t).map(move |p| (si, p)))
            .collect();
        // Sequences with more than one new token (prompt chunks).
        let chunked: Vec<usize> = (0..spans.len()).filter(|&i| spans[i].1 > 1).collect();
        // The products' inputs on cache lines (`Aligned`).
        let (mut hbuf, mut qkv) = (Aligned::<f32>::zeros(total * h), vec![0f32; total * width]);
        let (mut att, mut proj) = (Aligned::<f32>::zeros(total * qdim), vec![0f32; total * h]);
        let mlp_rows = total.min(MLP_ROWS);
        let (mut gu, mut act) = (vec![0f32; mlp_rows * 2 * ffn], Aligned::<f32>::zeros(mlp_rows * ffn));
        let team = Team::global();
        // Attention tasks (token row, kv head, positions a .. b): a whole (token, kv
        // head) each, or a chunk each where those are too few to keep the team
        // busy (a single stream's decode step: as many as kv heads). One list per
        // window the layers use.
        let few = total * nkv < 4 * team.threads();
        let tasks = |window: Option<usize>| {
            let mut work = Vec::new();
            for (r, &(_, pos)) in rows.iter().enumerate() {
                let lo = window.map_or(0, |w| (pos + 1).saturating_sub(w));
                for g in 0..nkv {
                    if few {
                        work.extend(attention_chunks(lo, pos + 1).map(|(a, b)| (r, g, a, b)));
                    } else {
                        work.push((r, g, lo, pos + 1));
                    }
                }
            }
            work
        };
        let mut works: Vec<(Option<usize>, Vec<Task>)> = Vec::new();
        for b in &self.blocks {
            if !works.iter().any(|(w, _)| *w == b.window) {
                works.push((b.window, tasks(b.window)));
            }
        }
        let most = works.iter().map(|(_, w)| w.len()).max().unwrap_or(0);
        let mut partials = vec![0f32; if few { most * part_len(groups, hd) } else { 0 }];
        for (layer, b) in self.blocks.iter().enumerate().take(upto) {
            let work = &works
                .iter()
                .find(|(w, _)| *w == b.window)
                .unwrap_or_else(|| unreachable!("a list per window"))
                .1;
            let whole = work.len() == total * nkv;
            let ri = kinds.iter().position(|f| *f == b.inv_freq.as_slice()).unwrap_or(0);
            let (cos, sin) = (&tables[ri].0, &tables[ri].1);
            rms_norm_rows(&x, &self.norm_weight(&b.attn_norm)?, eps, &mut hbuf);
            project(&[&b.q, &b.k, &b.v], b.qkv.as_ref(), &hbuf, total, &mut qkv)?;
            if let (Some(qn), Some(kn)) = (&b.q_norm, &b.k_norm) {
                let (qn, kn) = (self.norm_weight(qn)?, self.norm_weight(kn)?);
                for row in qkv.chunks_exact_mut(width) {
                    let (q, k) = row.split_at_mut(qdim);
                    norm_heads(q, nh, hd, &qn, eps);
                    norm_heads(k, nkv, hd, &kn, eps);
                }
            }
            let caches: Vec<(KvPtr, KvPtr, usize)> = batch
                .iter_mut()
                .map(|s| {
                    let c = &mut *s.cache;
                    (c.k[layer].ptr(), c.v[layer].ptr(), c.capacity)
                })
                .collect();
            let (qkv_r, cos_r, sin_r) = (&qkv, cos, sin);
            // The keys (after rope) and values of prompt chunks into their
            // caches first: their tokens attend to each other's...
            let key_value = |si: usize, g: usize, r: usize, key: &mut [f32]| {
                let (k, v, cap) = caches[si];
                let (off, _, start) = spans[si];
                let row = &qkv_r[r * width..(r + 1) * width];
                rope_head(
                    &row[qdim + g * hd..][..hd],
                    &cos_r[r * half..][..half],
                    &sin_r[r * half..][..half],
                    key,
                );
                let p = start + r - off;
                // SAFETY: the caller alone touches kv head g of sequence si's
                // cache for this layer now, at positions below `cap` (`reserve`
                // made room); the cache outlives the loops.
                unsafe {
                    k.write_key(g * cap * hd, p, key);
                    v.write((g * cap + p) * hd, &row[qdim + kvdim + g * hd..][..hd]);
                }
            };
            if !chunked.is_empty() {
                team.run(chunked.len() * nkv, &|task| {
                    let (si, g) = (chunked[task / nkv], task % nkv);
                    let (off, t, _) = spans[si];
                    let mut key = vec![0f32; hd];
                    for r in off..off + t {
                        key_value(si, g, r, &mut key);
                    }
                });
            }
            // ...then every new token's attention over the positions it may see,
            // one task per (token, kv head), or per (token, kv head, chunk) where
            // there are too few of those for the team (`ATTENTION_CHUNK`); a
            // decode step's task that holds its last position writes its key and
            // value first (no other task reads that position). Prompt chunks and
            // decode steps take the same kernel, so a token's result does not
            // depend on whether it came in a chunk or alone.
            let out = Shared(att.as_mut_ptr());
            let parts = Shared(partials.as_mut_ptr());
            let plen = part_len(groups, hd);
            team.run(work.len(), &|task| {
                let (r, g, a, b) = work[task];
                let (si, pos) = rows[r];
                let (k, v, cap) = caches[si];
                let row = &qkv_r[r * width..(r + 1) * width];
                let (cs, sn) = (&cos_r[r * half..][..half], &sin_r[r * half..][..half]);
                ATTENTION_SCRATCH.with_borrow_mut(|s| {
                    let mut q = std::mem::take(&mut s.q);
                    if spans[si].1 == 1 && b == pos + 1 {
                        q.resize(hd, 0.0);
                        key_value(si, g, r, &mut q);
                    }
                    q.resize(groups * hd, 0.0);
                    for (j, qh) in q.chunks_exact_mut(hd).enumerate() {
                        rope_head(&row[(g * groups + j) * hd..][..hd], cs, sn, qh);
                    }
                    // Keys: the whole blocks holding a .. b (within `cap`, a whole
                    // number of blocks); values: rows a .. b.
                    // SAFETY: positions a..b of kv head g were written by the loop
                    // above, by this task, or by earlier steps, and nothing writes
                    // them now (a chunk ends at a block boundary or at `pos`).
                    let view = |a: usize, b: usize| unsafe {
                        let (b0, b1) = (a / KEY_BLOCK, b.div_ceil(KEY_BLOCK));
                        (
                            k.rows((g * cap + b0 * KEY_BLOCK) * hd, (b1 - b0) * KEY_BLOCK * hd),
                            a % KEY_BLOCK,
                            v.rows((g * cap + a) * hd, (b - a) * hd),
                        )
                    };
                    if whole {
                        // SAFETY: task (r, g) alone writes query heads g·groups ..
                        // (g+1)·groups of row r of `att`, which outlives the loop.
                        let o = unsafe {
                            std::slice::from_raw_parts_mut(out.get().add(r * qdim + g * groups * hd), groups * hd)
                        };
                        attend(&q, a, b, view, hd, scale, o, s);
                    } else {
                        // SAFETY: task `task` alone writes its slot of `partials`,
                        // which outlives the loop.
                        let part = unsafe { std::slice::from_raw_parts_mut(parts.get().add(task * plen), plen) };
                        let (kc, first, vc) = view(a, b);
                        attend_part(&q, kc, first, vc, hd, b - a, scale, part, &mut s.scores);
                    }
                    s.q = q;
                });
            });
            if !whole {
                // Each (token, kv head)'s chunks, in order, merged.
                let mut i = 0;
                while i < work.len() {
                    let (r, g, _, _) = work[i];
                    let n = work[i..].iter().take_while(|w| (w.0, w.1) == (r, g)).count();
                    let (acc, rest) = partials[i * plen..(i + n) * plen].split_at_mut(plen);
                    for next in rest.chunks_exact(plen) {
                        fold_part(acc, next, groups, hd);
                    }
                    finish_part(acc, groups, hd, &mut att[r * qdim + g * groups * hd..][..groups * hd]);
                    i += n;
                }
            }
            b.o.matmul_into(&att, total, &mut proj)?;
            if let Some(w) = &b.attn_post_norm {
                rms_norm_rows(&proj, &self.norm_weight(w)?, eps, &mut hbuf);
                proj[..total * h].copy_from_slice(&hbuf[..total * h]);
            }
            x.iter_mut().zip(&proj).for_each(|(x, p)| *x += p);
            // The MLP in row blocks: its intermediates are the widest buffers.
            let mlp_norm = self.norm_weight(&b.mlp_norm)?;
            let post = b.mlp_post_norm.as_ref().map(|w| self.norm_weight(w)).transpose()?;
            for r0 in (0..total).step_by(MLP_ROWS) {
                let rows = MLP_ROWS.min(total - r0);
                let xr = &mut x[r0 * h..(r0 + rows) * h];
                rms_norm_rows(xr, &mlp_norm, eps, &mut hbuf[..rows * h]);
                match &b.ffn {
                    Ffn::Dense(m) => run_mlp(
                        m,
                        cfg.activation,
                        &hbuf[..rows * h],
                        rows,
                        &mut gu,
                        &mut act,
                        &mut proj[..rows * h],
                    )?,
                    Ffn::Moe {
                        router,
                        experts,
                        per_token,
                    } => self.moe(
                        router,
                        experts,
                        *per_token,
                        &hbuf[..rows * h],
                        rows,
                        &mut gu,
                        &mut act,
                        &mut proj[..rows * h],
                    )?,
                }
                if let Some(w) = &post {
                    let mut normed = vec![0f32; rows * h];
                    rms_norm_rows(&proj[..rows * h], w, eps, &mut normed);
                    proj[..rows * h].copy_from_slice(&normed);
                }
                xr.iter_mut().zip(&proj).for_each(|(x, p)| *x += p);
            }
        }
        Ok(x)
    }

    /// A mixture of experts over `rows` rows of `h`: each row through its
    /// `per_token` best experts (the router's softmax, top-k, renormalised), each
    /// expert once over the rows that chose it, so only chosen experts' weights
    /// are read. Summed in expert order, as HF does.
    #[allow(clippy::too_many_arguments)]
    fn moe(
        &self,
        router: &Linear,
        experts: &[Mlp],
        per_token: usize,
        h: &[f32],
        rows: usize,
        gu: &mut [f32],
        act: &mut [f32],
        out: &mut [f32],
    ) -> Result<()> {
        let (hs, n) = (self.cfg.hidden_size, experts.len());
        let mut logits = vec![0f32; rows * n];
        router.matmul_into(h, rows, &mut logits)?;
        // Per expert: (row, weight).
        let mut chosen: Vec<Vec<(usize, f32)>> = vec![Vec::new(); n];
        for (r, l) in logits.chunks_exact(n).enumerate() {
            let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = l.iter().map(|&v| (v - max).exp()).collect();
            let sum: f32 = e.iter().sum();
            let probs: Vec<f32> = e.iter().map(|v| v / sum).collect();
            let top = top_k(&probs, per_token);
            let total: f32 = top.iter().map(|&i| probs[i]).sum();
            for i in top {
                chosen[i].push((r, probs[i] / total));
            }
        }
        out.iter_mut().for_each(|v| *v = 0.0);
        let (mut xin, mut y) = (Vec::new(), Vec::new());
        for (m, picks) in experts.iter().zip(&chosen) {
            if picks.is_empty() {
                continue;
            }
            let k = picks.len();
            xin.clear();
            for &(r, _) in picks {
                xin.extend_from_slice(&h[r * hs..(r + 1) * hs]);
            }
            y.resize(k * hs, 0.0);
            run_mlp(m, self.cfg.activation, &xin, k, gu, act, &mut y)?;
            for (i, &(r, w)) in picks.iter().enumerate() {
                out[r * hs..(r + 1) * hs]
                    .iter_mut()
                    .zip(&y[i * hs..(i + 1) * hs])
                    .for_each(|(o, v)| *o += w * v);
            }
        }
        Ok(())
    }
}
