//! Matrix products against ggml-quantized weights that do not quantize the
//! activations.
//!
//! `out[n × rows] = x[n × cols] · Wᵀ` where `W` is a ggml-quantized matrix (each of
//! its `rows` rows is `cols / block` blocks, ggml layout) and `x` is f32. Weight
//! blocks are dequantized on the fly, to exactly the values ggml's dequantization
//! gives, and multiplied with f32 FMAs: the result is the dequantized-f32 matmul
//! up to summation order — unlike candle's `QMatMul`, which rounds the
//! activations to 8 bits first (and moves near-ties in greedy decoding).
//!
//! Two schemes, both over tiles of `R` weight rows:
//! - fused (AVX-512; Q4_0, Q4_1, Q8_0; n ≤ `FUSED_MAX_N`, i.e. decode): each
//!   block is dequantized in registers (4-bit types through a 16-entry `vpermps`
//!   table) and used at once for all `n` activation rows; memory bound for n = 1.
//! - panel (every type and path; larger n, i.e. prefill): rows are dequantized
//!   once into an f32 panel that stays in L2, then an `R × T` f32 micro-kernel
//!   runs over it for every tile of `T` activation rows.
//!
//! Work is split over chunks of output rows, claimed dynamically by the calling
//! thread and `RAYON_NUM_THREADS - 1` helpers spawned on rayon's global pool. The
//! caller works too and never blocks on a sleeping worker: decode runs ~200 small
//! products per token, so a wake-up per product would dominate.
//!
//! Supported: Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K on CPU (`QMatrix::from_qtensor`
//! returns `None` for anything else; callers keep candle's `QMatMul` for those).
//! Paths: AVX-512 (F, VL, BW, DQ), AVX2 + FMA, and portable scalar code (the
//! reference), picked at run time.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Storage, Tensor};

mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;

/// Weight rows dequantized together: one f32 tile of `R × cols`.
const R: usize = 4;

/// The ggml block formats with kernels here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub(crate) enum Kind {
    Q4_0,
    Q4_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

impl Kind {
    fn from_dtype(d: GgmlDType) -> Option<Self> {
        Some(match d {
            GgmlDType::Q4_0 => Kind::Q4_0,
            GgmlDType::Q4_1 => Kind::Q4_1,
            GgmlDType::Q8_0 => Kind::Q8_0,
            GgmlDType::Q4K => Kind::Q4K,
            GgmlDType::Q5K => Kind::Q5K,
            GgmlDType::Q6K => Kind::Q6K,
            _ => return None,
        })
    }

    /// Values per block.
    pub(crate) fn block_elems(self) -> usize {
        match self {
            Kind::Q4_0 | Kind::Q4_1 | Kind::Q8_0 => 32,
            Kind::Q4K | Kind::Q5K | Kind::Q6K => 256,
        }
    }

    /// Bytes per block (ggml's `block_q*` structs).
    pub(crate) fn block_bytes(self) -> usize {
        match self {
            Kind::Q4_0 => 18,
            Kind::Q4_1 => 20,
            Kind::Q8_0 => 34,
            Kind::Q4K => 144,
            Kind::Q5K => 176,
            Kind::Q6K => 210,
        }
    }
}

/// Which instruction set runs the kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    Avx2,
    Avx512,
}

impl Isa {
    /// The best this CPU supports; `VICUGNA_KERNEL=scalar|avx2` caps it (for
    /// comparisons).
    pub fn detect() -> Isa {
        let cap = std::env::var("VICUGNA_KERNEL").ok();
        let best = Self::available().into_iter().last().unwrap_or(Isa::Scalar);
        match cap.as_deref() {
            Some("scalar") => Isa::Scalar,
            Some("avx2") if best != Isa::Scalar => Isa::Avx2,
            _ => best,
        }
    }

    /// Every path this CPU can run, slowest first.
    pub fn available() -> Vec<Isa> {
        [Isa::Scalar, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|i| i.supported())
            .collect()
    }

    /// Whether this CPU can run this path (feature detection is cached by std).
    pub fn supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512dq")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Activation rows per micro-kernel call: `R × T` accumulators must fit in
    /// the vector registers next to the `R` weight vectors.
    fn tile_t(self) -> usize {
        match self {
            Isa::Scalar => 4,
            Isa::Avx2 => 2,
            Isa::Avx512 => 6,
        }
    }
}

/// A ggml-quantized `[rows, cols]` weight matrix, shared with the `QTensor` it
/// came from (no copy; cloning shares it too).
#[derive(Clone)]
pub struct QMatrix {
    kind: Kind,
    dtype: GgmlDType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    isa: Isa,
    tensor: Arc<QTensor>,
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "QMatrix({:?}, {}x{}, {:?})",
            self.dtype, self.rows, self.cols, self.isa
        )
    }
}

impl QMatrix {
    /// Wraps a 2-D CPU `QTensor` of a supported block type; `None` otherwise.
    pub fn from_qtensor(tensor: &Arc<QTensor>) -> Option<Self> {
        let kind = Kind::from_dtype(tensor.dtype())?;
        let &[rows, cols] = tensor.shape().dims() else {
            return None;
        };
        if cols == 0 || !cols.is_multiple_of(kind.block_elems()) || !tensor.device().is_cpu() {
            return None;
        }
        let row_bytes = cols / kind.block_elems() * kind.block_bytes();
        // CPU storage hands out a borrowed view of its blocks; `bytes` relies on it.
        match tensor.data() {
            Ok(Cow::Borrowed(b)) if b.len() == rows * row_bytes => {}
            _ => return None,
        }
        Some(QMatrix {
            kind,
            dtype: tensor.dtype(),
            rows,
            cols,
            row_bytes,
            isa: Isa::detect(),
            tensor: tensor.clone(),
        })
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn dtype(&self) -> GgmlDType {
        self.dtype
    }

    /// Bytes of quantized blocks (what one pass over the matrix reads).
    pub fn size_in_bytes(&self) -> usize {
        self.rows * self.row_bytes
    }

    /// The path `matmul` uses.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    fn bytes(&self) -> &[u8] {
        match self.tensor.data() {
            Ok(Cow::Borrowed(b)) => b,
            // `from_qtensor` checked that this CPU tensor lends its bytes.
            _ => unreachable!("CPU QTensor storage is borrowed"),
        }
    }

    /// `out[n × rows] = x[n × cols] · Wᵀ`, all row-major f32.
    pub fn matmul(&self, x: &[f32], n: usize, out: &mut [f32]) {
        self.matmul_with(self.isa, x, n, out, None)
    }

    /// `matmul` on a given path, optionally with a given number of rows per task.
    pub fn matmul_with(&self, isa: Isa, x: &[f32], n: usize, out: &mut [f32], rows_per_task: Option<usize>) {
        let (rows, cols) = (self.rows, self.cols);
        assert_eq!(x.len(), n * cols, "x must be [n, cols]");
        assert_eq!(out.len(), n * rows, "out must be [n, rows]");
        assert!(isa.supported(), "{isa:?} is not supported by this CPU");
        if n == 0 || rows == 0 {
            return;
        }
        let threads = rayon::current_num_threads().max(1);
        let chunk_rows = rows_per_task.unwrap_or_else(|| self.rows_per_task(n, threads)).max(1);
        let chunks = rows.div_ceil(chunk_rows);
        let helpers = (threads - 1).min(chunks - 1);
        if helpers == 0 {
            self.rows_task(isa, 0, rows, x, n, out, &mut Scratch::default());
            return;
        }
        let job = Arc::new(Job {
            m: self.clone(),
            isa,
            x: x.to_vec(),
            n,
            chunk_rows,
            chunks,
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            out: (0..n * rows).map(|_| AtomicU32::new(0)).collect(),
        });
        for _ in 0..helpers {
            let job = job.clone();
            rayon::spawn(move || job.work());
        }
        // The caller works too, so nothing waits for a helper to wake up: a
        // helper that arrives after the last chunk was claimed finds nothing to
        // do (it owns its `Arc`, so it may outlive this call).
        job.work();
        let mut spins = 0u32;
        while job.done.load(Ordering::Acquire) < chunks {
            // Only chunks a helper already claimed are outstanding: short waits.
            spins += 1;
            if spins < 1 << 12 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        for (o, v) in out.iter_mut().zip(&job.out) {
            *o = f32::from_bits(v.load(Ordering::Relaxed));
        }
    }

    /// Rows per chunk of work: about eight chunks per thread for balance (they
    /// are claimed dynamically), but at least ~64k multiply-adds each.
    fn rows_per_task(&self, n: usize, threads: usize) -> usize {
        let balance = self.rows.div_ceil(8 * threads);
        let min_work = (1usize << 16).div_ceil(self.cols * n);
        balance.max(min_work).max(16).next_multiple_of(R)
    }

    /// Output rows `r0 .. r0 + nrows` of all `n` activation rows: the value of
    /// row `r0 + i` for activation row `t` goes to `out[t * ld + i]`, where
    /// `ld = out.len() / n`.
    #[allow(clippy::too_many_arguments)]
    fn rows_task(&self, isa: Isa, r0: usize, nrows: usize, x: &[f32], n: usize, out: &mut [f32], s: &mut Scratch) {
        let (cols, rb) = (self.cols, self.row_bytes);
        let bytes = self.bytes();
        let ld = out.len() / n;
        assert!(nrows <= ld && r0 + nrows <= self.rows);
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Avx512 && n <= FUSED_MAX_N {
            let k = match self.kind {
                Kind::Q4_0 => Some(x86::FUSED_Q4_0),
                Kind::Q4_1 => Some(x86::FUSED_Q4_1),
                Kind::Q8_0 => Some(x86::FUSED_Q8_0),
                _ => None,
            };
            if let Some(k) = k {
                for rt in (0..nrows).step_by(R) {
                    let nr = R.min(nrows - rt);
                    // A partial tile repeats its last row; those results are dropped.
                    let row = |i: usize| {
                        let r = r0 + rt + i.min(nr - 1);
                        &bytes[r * rb..(r + 1) * rb]
                    };
                    // Prefetch two tiles ahead (measured best of 1 tile, 2 tiles, 1-4 KiB).
                    let res = fused(k, [row(0), row(1), row(2), row(3)], x, cols, n, 2 * R * rb, s);
                    for (i, res) in res.iter().enumerate().take(nr) {
                        for (t, &v) in res[..n].iter().enumerate() {
                            out[t * ld + rt + i] = v;
                        }
                    }
                }
                return;
            }
        }
        // Dequantize a panel of rows (≤ 128 KiB of f32, stays in L2) once; then
        // each tile of activation rows (in L1) meets every `R`-row tile of it.
        let tmax = isa.tile_t();
        let panel = (PANEL_BYTES / (4 * cols)).clamp(R, 64) / R * R;
        let w = &mut s.w;
        w.resize(panel * cols, 0.0);
        for p0 in (0..nrows).step_by(panel) {
            let np = panel.min(nrows - p0);
            for i in 0..np {
                let row = r0 + p0 + i;
                dequant_row(
                    isa,
                    self.kind,
                    &bytes[row * rb..(row + 1) * rb],
                    &mut w[i * cols..(i + 1) * cols],
                );
            }
            let mut t = 0;
            while t < n {
                let tt = tmax.min(n - t);
                let xt = &x[t * cols..(t + tt) * cols];
                for rt in (0..np).step_by(R) {
                    // A partial tile reads stale rows past `np` (finite or not, but
                    // initialized); their dot products are dropped.
                    let nr = R.min(np - rt);
                    let res = micro(isa, &w[rt * cols..(rt + R) * cols], xt, cols, tt);
                    for (i, res) in res.iter().enumerate().take(nr) {
                        for (j, &v) in res[..tt].iter().enumerate() {
                            out[(t + j) * ld + p0 + rt + i] = v;
                        }
                    }
                }
                t += tt;
            }
        }
    }

    /// `x` (`[..., cols]`, on the CPU) times `Wᵀ`: `[..., rows]` f32.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims();
        if dims.last() != Some(&self.cols) {
            candle_core::bail!("QMatrix: input {:?} does not end in {}", x.shape(), self.cols);
        }
        let n = x.elem_count() / self.cols;
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        let mut out = vec![0f32; n * self.rows];
        {
            let (storage, layout) = x.storage_and_layout();
            let Storage::Cpu(cpu) = &*storage else {
                candle_core::bail!("QMatrix: input is not on the CPU");
            };
            let Some((a, b)) = layout.contiguous_offsets() else {
                candle_core::bail!("QMatrix: input is not contiguous");
            };
            self.matmul(&cpu.as_slice::<f32>()?[a..b], n, &mut out);
        }
        let mut shape = dims.to_vec();
        if let Some(last) = shape.last_mut() {
            *last = self.rows;
        }
        Tensor::from_vec(out, shape, x.device())
    }
}

/// One matmul shared by the calling thread and its rayon helpers: chunks of
/// `chunk_rows` output rows are claimed with `next`, counted in `done` once
/// written. Everything is owned, so a helper that starts late is harmless.
struct Job {
    m: QMatrix,
    isa: Isa,
    x: Vec<f32>,
    n: usize,
    chunk_rows: usize,
    chunks: usize,
    next: AtomicUsize,
    done: AtomicUsize,
    /// `[n, rows]` f32 bits; each chunk's rows are written by its one claimant.
    out: Vec<AtomicU32>,
}

impl Job {
    fn work(&self) {
        let (rows, n) = (self.m.rows, self.n);
        let mut s = Scratch::default();
        let mut t = Vec::new();
        loop {
            let c = self.next.fetch_add(1, Ordering::Relaxed);
            if c >= self.chunks {
                return;
            }
            let r0 = c * self.chunk_rows;
            let nr = self.chunk_rows.min(rows - r0);
            t.resize(nr * n, 0.0);
            self.m.rows_task(self.isa, r0, nr, &self.x, n, &mut t, &mut s);
            for (vals, dst) in t.chunks_exact(nr).zip(self.out.chunks_exact(rows)) {
                for (v, d) in vals.iter().zip(&dst[r0..r0 + nr]) {
                    d.store(v.to_bits(), Ordering::Relaxed);
                }
            }
            // Publishes this chunk's stores to the thread that sees `done` complete.
            self.done.fetch_add(1, Ordering::Release);
        }
    }
}

/// Per-thread buffers of `rows_task`.
#[derive(Default)]
struct Scratch {
    /// A panel of dequantized weight rows (the unfused path).
    w: Vec<f32>,
    /// Block scales for the fused kernels.
    scales: Vec<f32>,
}

/// Up to this many activation rows, Q4_0 / Q4_1 / Q8_0 on AVX-512 use the fused
/// kernel (each block dequantized in registers once for all `n`); beyond it,
/// dequantizing a panel to f32 once and running the f32 micro-kernel over it is
/// cheaper.
const FUSED_MAX_N: usize = 8;

/// The fused AVX-512 kernel on `R` rows for `n ≤ FUSED_MAX_N` activation rows:
/// one pass of 4 rows for n ≤ 4, two passes of 2 rows (so the accumulators fit
/// in registers) for larger n.
#[cfg(target_arch = "x86_64")]
fn fused(
    k: u8,
    rows: [&[u8]; R],
    x: &[f32],
    cols: usize,
    n: usize,
    prefetch: usize,
    s: &mut Scratch,
) -> [[f32; FUSED_MAX_N]; R] {
    use x86::{fused_512, scales_512, FUSED_Q4_0, FUSED_Q4_1, FUSED_Q8_0};
    let (bb, nb) = match k {
        FUSED_Q4_0 => (18, cols / 32),
        FUSED_Q4_1 => (20, cols / 32),
        _ => (34, cols / 32),
    };
    let nbp = nb.next_multiple_of(16);
    // SAFETY (all three `unsafe` blocks): only called on the `Isa::Avx512` path,
    // which `matmul_with` accepts only on CPUs with AVX-512 F, VL, BW and DQ; the
    // kernels check their slice lengths.
    unsafe { scales_512(&rows, bb, nb, k == FUSED_Q4_1, &mut s.scales) };
    let sc = &s.scales;
    let d: [&[f32]; R] = std::array::from_fn(|r| &sc[r * nbp..(r + 1) * nbp]);
    let m: [&[f32]; R] = if k == FUSED_Q4_1 {
        std::array::from_fn(|r| &sc[(R + r) * nbp..(R + r + 1) * nbp])
    } else {
        d
    };
    let mut out = [[0f32; FUSED_MAX_N]; R];
    macro_rules! go {
        ($kk:expr, [$($n:literal)*], [$($m:literal)*]) => {
            match n {
                $($n => {
                    let res = unsafe { fused_512::<{ $kk }, R, $n>(rows, x, cols, prefetch, d, m) };
                    for (o, r) in out.iter_mut().zip(res) {
                        o[..$n].copy_from_slice(&r);
                    }
                })*
                $($m => {
                    for h in [0, 2] {
                        let (dd, mm) = ([d[h], d[h + 1]], [m[h], m[h + 1]]);
                        let res = unsafe {
                            fused_512::<{ $kk }, 2, $m>([rows[h], rows[h + 1]], x, cols, prefetch, dd, mm)
                        };
                        for (o, r) in out[h..].iter_mut().zip(res) {
                            o[..$m].copy_from_slice(&r);
                        }
                    }
                })*
                _ => unreachable!("fused kernel for {n} rows"),
            }
        };
    }
    match k {
        FUSED_Q4_0 => go!(FUSED_Q4_0, [1 2 3 4], [5 6 7 8]),
        FUSED_Q4_1 => go!(FUSED_Q4_1, [1 2 3 4], [5 6 7 8]),
        _ => go!(FUSED_Q8_0, [1 2 3 4], [5 6 7 8]),
    }
    out
}

/// One row of blocks to f32 on the given path.
fn dequant_row(isa: Isa, kind: Kind, src: &[u8], dst: &mut [f32]) {
    match isa {
        // SAFETY: `matmul_with` only accepts paths this CPU supports
        // (`Isa::supported`); the kernels check their slice lengths.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::dequant_row_512(kind, src, dst) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::dequant_row_256(kind, src, dst) },
        _ => scalar::dequant_row(kind, src, dst),
    }
}

/// Target size of a dequantized f32 panel in the unfused path.
const PANEL_BYTES: usize = 128 << 10;

/// Largest `T` of any path.
const TMAX: usize = 6;

/// Dot products of the `R` rows of `w` with the `t` rows of `x` (`t ≤ isa.tile_t()`).
fn micro(isa: Isa, w: &[f32], x: &[f32], cols: usize, t: usize) -> [[f32; TMAX]; R] {
    let mut out = [[0f32; TMAX]; R];
    macro_rules! tile {
        ($($n:literal)*) => {
            match t {
                $($n => {
                    let res: [[f32; $n]; R] = match isa {
                        // SAFETY: as in `dequant_row`: the CPU supports the path.
                        #[cfg(target_arch = "x86_64")]
                        Isa::Avx512 => unsafe { x86::micro_512::<R, $n>(w, x, cols) },
                        #[cfg(target_arch = "x86_64")]
                        Isa::Avx2 => unsafe { x86::micro_256::<R, $n>(w, x, cols) },
                        _ => scalar::micro::<R, $n>(w, x, cols),
                    };
                    for (o, r) in out.iter_mut().zip(res) {
                        o[..$n].copy_from_slice(&r);
                    }
                })*
                _ => unreachable!("tile of {t} activation rows"),
            }
        };
    }
    tile!(1 2 3 4 5 6);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module};

    const TYPES: [GgmlDType; 6] = [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q8_0,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ];

    fn quantized(rows: usize, cols: usize, dtype: GgmlDType, seed: u64) -> Arc<QTensor> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (rows, cols), &dev).unwrap();
        // A per-row gain so the blocks' scales (and the K-quants' mins) vary.
        let gain: Vec<f32> = (0..rows)
            .map(|r| 0.1 + ((r as u64 * 7 + seed) % 13) as f32 / 4.0)
            .collect();
        let gain = Tensor::from_vec(gain, (rows, 1), &dev).unwrap();
        let w = (w.broadcast_mul(&gain).unwrap() + 0.05).unwrap();
        Arc::new(QTensor::quantize(&w, dtype).unwrap())
    }

    #[test]
    fn dequantization_is_bit_exact_on_every_path() {
        for dtype in TYPES {
            let (rows, cols) = (5, 512);
            let q = quantized(rows, cols, dtype, 3);
            let want = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let m = QMatrix::from_qtensor(&q).unwrap();
            for isa in Isa::available() {
                let mut got = vec![0f32; rows * cols];
                for r in 0..rows {
                    let src = &m.bytes()[r * m.row_bytes..(r + 1) * m.row_bytes];
                    dequant_row(isa, m.kind, src, &mut got[r * cols..(r + 1) * cols]);
                }
                let bad = got.iter().zip(&want).position(|(a, b)| a.to_bits() != b.to_bits());
                assert!(bad.is_none(), "{dtype:?} {isa:?}: value {bad:?} differs");
            }
        }
    }

    #[test]
    fn matmul_matches_dequantized_f32_matmul() {
        let dev = Device::Cpu;
        for dtype in TYPES {
            for cols in [256, 576, 1536] {
                if cols % dtype.block_size() != 0 {
                    continue; // 576 is 18 blocks of 32, not whole K-quant super-blocks
                }
                let rows = 75; // not a multiple of R nor of any task size
                let q = quantized(rows, cols, dtype, cols as u64);
                let m = QMatrix::from_qtensor(&q).expect("supported");
                let w = q.dequantize(&dev).unwrap();
                let wv = w.to_vec2::<f32>().unwrap();
                for n in [1, 3, 8, 33] {
                    let x = Tensor::randn(0f32, 1.0, (n, cols), &dev).unwrap();
                    let want = x.matmul(&w.t().unwrap()).unwrap().to_vec2::<f32>().unwrap();
                    let xv = x.to_vec2::<f32>().unwrap();
                    let xs: Vec<f32> = xv.concat();
                    for isa in Isa::available() {
                        for rpt in [None, Some(8), Some(rows)] {
                            let mut got = vec![f32::NAN; n * rows];
                            m.matmul_with(isa, &xs, n, &mut got, rpt);
                            for t in 0..n {
                                let xn = xv[t].iter().map(|v| v * v).sum::<f32>().sqrt();
                                for r in 0..rows {
                                    let wn = wv[r].iter().map(|v| v * v).sum::<f32>().sqrt();
                                    let (g, e) = (got[t * rows + r], want[t][r]);
                                    assert!(
                                        (g - e).abs() <= 1e-4 * wn * xn,
                                        "{dtype:?} {isa:?} cols {cols} n {n} rpt {rpt:?}: [{t},{r}] {g} vs {e}"
                                    );
                                }
                            }
                        }
                    }
                }
                // The tensor entry point, 3-D input.
                let x = Tensor::randn(0f32, 1.0, (2, 3, cols), &dev).unwrap();
                let want = x.broadcast_matmul(&w.t().unwrap()).unwrap();
                let got = m.forward(&x).unwrap();
                assert_eq!(got.dims(), &[2, 3, rows]);
                let diff = (got - want)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(diff < 1e-2, "{dtype:?}: forward differs by {diff}");
            }
        }
    }

    #[test]
    fn unsupported_types_are_refused() {
        let w = Tensor::randn(0f32, 1.0, (4, 256), &Device::Cpu).unwrap();
        for dtype in [
            GgmlDType::F32,
            GgmlDType::F16,
            GgmlDType::Q5_0,
            GgmlDType::Q2K,
            GgmlDType::Q3K,
        ] {
            let q = Arc::new(QTensor::quantize(&w, dtype).unwrap());
            assert!(QMatrix::from_qtensor(&q).is_none(), "{dtype:?}");
        }
        // And candle's path still works for them.
        let q = Arc::new(QTensor::quantize(&w, GgmlDType::Q5_0).unwrap());
        let mm = candle_core::quantized::QMatMul::from_arc(q).unwrap();
        let x = Tensor::ones((1, 256), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(mm.forward(&x).unwrap().dims(), &[1, 4]);
    }
}
