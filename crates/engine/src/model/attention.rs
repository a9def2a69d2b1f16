//! Attention over the cache for one (token, kv head): whole, or in chunks merged
//! afterwards; and the row-wise RMSNorm and RoPE of the fast forward.

use crate::kernels::{KvRows, KEY_BLOCK};

thread_local! {
    /// Per thread: the query heads of one attention task and its working buffers.
    pub(super) static ATTENTION_SCRATCH: std::cell::RefCell<AttendScratch> = std::cell::RefCell::default();
}

/// Positions per attention chunk (a whole number of key blocks). A context longer
/// than this is attended chunk by chunk, each chunk with its own softmax, and the
/// partial results merged in position order (as flash-decoding does). That lets a
/// single stream's decode step spread its few (token, kv head) tasks over the team
/// as chunks: at 2K tokens SmolLM2 has 3 such tasks per layer for 2 threads, so
/// one thread idled through a third of attention. The chunks depend on positions
/// alone, so a token gets the same bits however they were scheduled; contexts
/// within one chunk take the plain softmax.
pub(super) const ATTENTION_CHUNK: usize = 512;
const _: () = assert!(ATTENTION_CHUNK.is_multiple_of(KEY_BLOCK));

/// The chunks `[a, b)` of positions `lo .. end`, split at multiples of
/// `ATTENTION_CHUNK`, in order.
pub(super) fn attention_chunks(lo: usize, end: usize) -> impl Iterator<Item = (usize, usize)> {
    (lo / ATTENTION_CHUNK..end.div_ceil(ATTENTION_CHUNK))
        .map(move |c| (lo.max(c * ATTENTION_CHUNK), end.min((c + 1) * ATTENTION_CHUNK)))
}

/// Floats of one chunk's partial result for `g` query heads: `[g, hd]` weighted
/// sums, then `g` maxima, then `g` sums of exponentials (`attend_part`).
pub(super) fn part_len(g: usize, hd: usize) -> usize {
    g * hd + 2 * g
}

#[derive(Default)]
pub(super) struct AttendScratch {
    pub(super) q: Vec<f32>,
    pub(super) scores: Vec<f32>,
    acc: Vec<f32>,
    part: Vec<f32>,
}

/// Attention of the query heads `q` (`[g, hd]`: the heads sharing one kv head)
/// over positions `lo .. end` of that kv head's keys and values, read in place,
/// into `out` (`[g, hd]`). `view(a, b)` gives positions `a .. b` (within one
/// chunk): the whole key blocks (`KEY_BLOCK`) holding them, the first position's
/// place in its block, and their value rows.
///
/// Decode steps dominate generation; going through candle here meant strided views
/// of the cache, a score tensor and a softmax tensor per head group per layer, which
/// cost more than the arithmetic once the context grows. Each key and value row is
/// read once for all the heads that share it.
#[allow(clippy::too_many_arguments)]
pub(super) fn attend<'a>(
    q: &[f32],
    lo: usize,
    end: usize,
    view: impl Fn(usize, usize) -> (KvRows<'a>, usize, KvRows<'a>),
    hd: usize,
    scale: f32,
    out: &mut [f32],
    s: &mut AttendScratch,
) {
    let g = q.len() / hd;
    s.acc.resize(part_len(g, hd), 0.0);
    s.part.resize(part_len(g, hd), 0.0);
    for (i, (a, b)) in attention_chunks(lo, end).enumerate() {
        let (k, first, v) = view(a, b);
        let dst = if i == 0 { &mut s.acc } else { &mut s.part };
        attend_part(q, k, first, v, hd, b - a, scale, dst, &mut s.scores);
        if i > 0 {
            fold_part(&mut s.acc, &s.part, g, hd);
        }
    }
    finish_part(&s.acc, g, hd, out);
}

/// One chunk of `attend`: `len` positions, `k` whole key blocks from whose first
/// position `first` on they are used, `v` their value rows (`[len, hd]`). Into
/// `part` (`part_len`): per head `Σ_j exp(s_j − max) · v_j`, the max score, and
/// `Σ_j exp(s_j − max)`.
#[allow(clippy::too_many_arguments)]
pub(super) fn attend_part(
    q: &[f32],
    k: KvRows<'_>,
    first: usize,
    v: KvRows<'_>,
    hd: usize,
    len: usize,
    scale: f32,
    part: &mut [f32],
    scores: &mut Vec<f32>,
) {
    let g = q.len() / hd;
    // `g × len` scores; grown, never cleared (every score is written before it is
    // read).
    if scores.len() < g * len {
        scores.resize(g * len, 0.0);
    }
    let sc = &mut scores[..g * len];
    let (out, rest) = part[..part_len(g, hd)].split_at_mut(g * hd);
    let (maxes, sums) = rest.split_at_mut(g);
    sums.fill(0.0);
    if !crate::kernels::attention_simd(q, k, first, v, hd, len, scale, sc, maxes, sums, out) {
        let mut row = vec![0f32; hd];
        for j in 0..len {
            k.key_into(first + j, hd, &mut row);
            for (h, qh) in q.chunks_exact(hd).enumerate() {
                sc[h * len + j] = dot(qh, &row) * scale;
            }
        }
        // Each head's scores to exp(s - max), keeping the max and the sum.
        for ((row, max), sum) in sc.chunks_exact_mut(len).zip(maxes.iter_mut()).zip(sums.iter_mut()) {
            *max = row.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
            for s in row.iter_mut() {
                *s = (*s - *max).exp();
                *sum += *s;
            }
        }
        out.fill(0.0);
        for j in 0..len {
            v.row_into(j, hd, &mut row);
            for (h, oh) in out.chunks_exact_mut(hd).enumerate() {
                let p = sc[h * len + j];
                for (o, x) in oh.iter_mut().zip(&row) {
                    *o += p * x;
                }
            }
        }
    }
}

/// Merges the next chunk's partial result `next` into `acc` (both as
/// `attend_part` writes them): rescaled to the larger of the two maxima.
pub(super) fn fold_part(acc: &mut [f32], next: &[f32], g: usize, hd: usize) {
    let (ao, arest) = acc.split_at_mut(g * hd);
    let (am, asum) = arest.split_at_mut(g);
    let (no, nrest) = next.split_at(g * hd);
    let (nm, nsum) = nrest.split_at(g);
    for h in 0..g {
        let m = am[h].max(nm[h]);
        let (ca, cn) = ((am[h] - m).exp(), (nm[h] - m).exp());
        for (a, n) in ao[h * hd..(h + 1) * hd].iter_mut().zip(&no[h * hd..(h + 1) * hd]) {
            *a = *a * ca + n * cn;
        }
        asum[h] = asum[h] * ca + nsum[h] * cn;
        am[h] = m;
    }
}

/// The attention output from a (merged) partial result: weighted sums over sums.
pub(super) fn finish_part(acc: &[f32], g: usize, hd: usize, out: &mut [f32]) {
    let sums = &acc[g * hd + g..][..g];
    for ((oh, ah), &sum) in out.chunks_exact_mut(hd).zip(acc.chunks_exact(hd)).zip(sums) {
        for (o, a) in oh.iter_mut().zip(ah) {
            *o = a / sum;
        }
    }
}

/// candle's `rms_norm` on each row of `x` (the same arithmetic, so the same bits).
pub(super) fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let n = w.len();
    for (src, dst) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let sum2 = src.iter().map(|&v| v * v).sum::<f32>();
        let m = (sum2 / n as f32 + eps).sqrt();
        for ((d, &s), &a) in dst.iter_mut().zip(src).zip(w) {
            *d = s / m * a;
        }
    }
}

/// candle's `rope` (halves rotated, as HF's `rotate_half`) on one head.
pub(super) fn rope_head(x: &[f32], cos: &[f32], sin: &[f32], out: &mut [f32]) {
    let half = cos.len();
    for i in 0..half {
        let (a, b) = (x[i], x[i + half]);
        out[i] = a * cos[i] - b * sin[i];
        out[i + half] = a * sin[i] + b * cos[i];
    }
}

/// A pointer shared by the tasks of one parallel loop, each touching its own part.
#[derive(Clone, Copy)]
pub(super) struct Shared(pub(super) *mut f32);

// SAFETY: only used inside `Team::run` loops whose tasks write disjoint ranges
// (see `kernel_layers`), while the owner of the buffer waits.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

impl Shared {
    /// The pointer (a method, so closures capture the `Sync` wrapper, not the field).
    pub(super) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Dot product with sixteen independent sums, so the compiler can keep them in one
/// vector register (a single running sum must be added in order, one at a time).
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}
