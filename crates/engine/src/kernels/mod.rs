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
//! - fused (AVX-512; Q4_0, Q4_1, Q8_0; n ≤ `FUSED_TILED_MAX_N`, i.e. decode): the
//!   weights are repacked at load into tiles of `R` rows (see `Blocks::Tiled`);
//!   each block is dequantized in registers (4-bit types through a 16-entry
//!   `vpermps` table) and used at once for all `n` activation rows.
//! - panel (every type and path; larger n, i.e. prefill): rows are dequantized
//!   once into an f32 panel that stays in L2, then an `R × T` f32 micro-kernel
//!   runs over it for every tile of `T` activation rows.
//!
//! Work is split over chunks of output rows, claimed dynamically by the calling
//! thread and the engine's [`Team`] of helpers.
//!
//! Supported: Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K on CPU (`QMatrix::from_qtensor`
//! returns `None` for anything else; callers keep candle's `QMatMul` for those).
//! Paths: AVX-512 (F, VL, BW, DQ), AVX2 + FMA, and portable scalar code (the
//! reference), picked at run time.

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Storage, Tensor};

use crate::team::Team;

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

/// A ggml-quantized `[rows, cols]` weight matrix (or a run of rows of one, see
/// [`QMatrix::concat`]); cloning shares the blocks.
#[derive(Clone)]
pub struct QMatrix {
    kind: Kind,
    dtype: GgmlDType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    isa: Isa,
    blocks: Blocks,
    /// The first of this matrix's rows in `blocks` (a multiple of `R` when tiled).
    row0: usize,
}

/// Where a matrix's blocks live.
#[derive(Clone)]
enum Blocks {
    /// ggml's layout, row after row, inside the `QTensor` it came from (no copy).
    Ggml(Arc<QTensor>),
    /// Q4_0 / Q4_1 / Q8_0 on the AVX-512 path, repacked in tiles of `R` rows.
    /// A tile takes the bytes of its `R` ggml rows: first the f16 scales, block
    /// column by block column (the rows' `d`, then for Q4_1 their `m`), then the
    /// quantized values, block column by block column (each row's 16 or 32
    /// bytes). The fused kernel then reads one sequential stream per thread (a
    /// block column of four rows is one 64- or 128-byte run) and converts a
    /// tile's scales with a few contiguous loads, where ggml's layout needed a
    /// gather from every block. Rows past the last are zero.
    Tiled(Arc<Vec<u8>>),
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

/// The tiled kernels' code for a block kind, if it has one.
fn tiled_kind(kind: Kind) -> Option<u8> {
    #[cfg(target_arch = "x86_64")]
    {
        match kind {
            Kind::Q4_0 => Some(x86::FUSED_Q4_0),
            Kind::Q4_1 => Some(x86::FUSED_Q4_1),
            Kind::Q8_0 => Some(x86::FUSED_Q8_0),
            _ => None,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = kind;
        None
    }
}

/// Byte offsets inside a ggml block of `kind` (Q4_0 / Q4_1 / Q8_0): where its
/// quantized values start, how many bytes they take, and how many f16 scales
/// lead the block.
fn block_parts(kind: Kind) -> (usize, usize, usize) {
    match kind {
        Kind::Q4_0 => (2, 16, 1),
        Kind::Q4_1 => (4, 16, 2),
        _ => (2, 32, 1),
    }
}

/// ggml rows (`rows × nb` blocks of `kind`) repacked into tiles (see `Blocks::Tiled`).
fn tile_rows(kind: Kind, src: &[u8], rows: usize, nb: usize) -> Vec<u8> {
    let (qoff, qb, ns) = block_parts(kind);
    let bb = kind.block_bytes();
    let (rb, tb) = (nb * bb, R * nb * bb);
    let mut out = vec![0u8; rows.div_ceil(R) * tb];
    for (t, tile) in out.chunks_exact_mut(tb).enumerate() {
        let (scales, quants) = tile.split_at_mut(2 * nb * R * ns);
        for r in 0..R.min(rows - t * R) {
            let row = &src[(t * R + r) * rb..(t * R + r + 1) * rb];
            for (b, blk) in row.chunks_exact(bb).enumerate() {
                for j in 0..ns {
                    let at = 2 * (b * R * ns + j * R + r);
                    scales[at..at + 2].copy_from_slice(&blk[2 * j..2 * j + 2]);
                }
                let at = (b * R + r) * qb;
                quants[at..at + qb].copy_from_slice(&blk[qoff..qoff + qb]);
            }
        }
    }
    out
}

/// Row `r` of a tile (see `Blocks::Tiled`) back in ggml's block layout.
fn untile_row(kind: Kind, tile: &[u8], r: usize, nb: usize, dst: &mut Vec<u8>) {
    let (qoff, qb, ns) = block_parts(kind);
    let bb = kind.block_bytes();
    dst.clear();
    dst.resize(nb * bb, 0);
    let (scales, quants) = tile.split_at(2 * nb * R * ns);
    for (b, blk) in dst.chunks_exact_mut(bb).enumerate() {
        for j in 0..ns {
            let at = 2 * (b * R * ns + j * R + r);
            blk[2 * j..2 * j + 2].copy_from_slice(&scales[at..at + 2]);
        }
        let at = (b * R + r) * qb;
        blk[qoff..qoff + qb].copy_from_slice(&quants[at..at + qb]);
    }
}

impl QMatrix {
    /// Wraps a 2-D CPU `QTensor` of a supported block type; `None` otherwise.
    pub fn from_qtensor(tensor: &Arc<QTensor>) -> Option<Self> {
        Self::with_isa(tensor, Isa::detect())
    }

    /// Like [`Self::from_qtensor`], for a given path (which this CPU must support).
    pub fn with_isa(tensor: &Arc<QTensor>, isa: Isa) -> Option<Self> {
        let kind = Kind::from_dtype(tensor.dtype())?;
        let &[rows, cols] = tensor.shape().dims() else {
            return None;
        };
        if cols == 0 || !cols.is_multiple_of(kind.block_elems()) || !tensor.device().is_cpu() || !isa.supported() {
            return None;
        }
        let row_bytes = cols / kind.block_elems() * kind.block_bytes();
        // CPU storage hands out a borrowed view of its blocks; `bytes` relies on it.
        let blocks = match tensor.data() {
            Ok(Cow::Borrowed(b)) if b.len() == rows * row_bytes => match tiled_kind(kind) {
                Some(_) if isa == Isa::Avx512 => {
                    Blocks::Tiled(Arc::new(tile_rows(kind, b, rows, cols / kind.block_elems())))
                }
                _ => Blocks::Ggml(tensor.clone()),
            },
            _ => return None,
        };
        Some(QMatrix {
            kind,
            dtype: tensor.dtype(),
            rows,
            cols,
            row_bytes,
            isa,
            blocks,
            row0: 0,
        })
    }

    /// The rows of several matrices as one (for one pass over, e.g., the q, k and
    /// v projections), and each part as a view of it: the blocks are stored once.
    /// `None` unless all are tiled alike with row counts that are multiples of `R`.
    pub fn concat(parts: &[&QMatrix]) -> Option<(QMatrix, Vec<QMatrix>)> {
        let first = parts.first()?;
        let mut data = Vec::new();
        for p in parts {
            let Blocks::Tiled(t) = &p.blocks else { return None };
            let same = p.kind == first.kind && p.cols == first.cols && p.isa == first.isa;
            if !same || !p.rows.is_multiple_of(R) {
                return None;
            }
            data.extend_from_slice(&t[p.row0 * p.row_bytes..(p.row0 + p.rows) * p.row_bytes]);
        }
        let blocks = Blocks::Tiled(Arc::new(data));
        let rows = parts.iter().map(|p| p.rows).sum();
        let whole = QMatrix {
            rows,
            blocks: blocks.clone(),
            row0: 0,
            ..(*first).clone()
        };
        let mut row0 = 0;
        let views = parts
            .iter()
            .map(|p| {
                let v = QMatrix {
                    row0,
                    blocks: blocks.clone(),
                    ..(*p).clone()
                };
                row0 += p.rows;
                v
            })
            .collect();
        Some((whole, views))
    }

    /// Row `r`, dequantized exactly as ggml does (e.g. an embedding lookup).
    pub fn dequantize_row(&self, r: usize, dst: &mut [f32]) {
        assert!(r < self.rows && dst.len() == self.cols, "row {r} of {:?}", self);
        let nb = self.cols / self.kind.block_elems();
        match &self.blocks {
            Blocks::Ggml(_) => {
                let rb = self.row_bytes;
                scalar::dequant_row(self.kind, &self.ggml_bytes()[r * rb..(r + 1) * rb], dst)
            }
            Blocks::Tiled(t) => {
                let (row, tb) = (self.row0 + r, R * self.row_bytes);
                let mut blocks = Vec::new();
                untile_row(self.kind, &t[row / R * tb..][..tb], row % R, nb, &mut blocks);
                scalar::dequant_row(self.kind, &blocks, dst)
            }
        }
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

    /// The ggml rows of an untiled matrix.
    fn ggml_bytes(&self) -> &[u8] {
        let Blocks::Ggml(tensor) = &self.blocks else {
            unreachable!("ggml_bytes of a tiled matrix")
        };
        match tensor.data() {
            Ok(Cow::Borrowed(b)) => &b[self.row0 * self.row_bytes..(self.row0 + self.rows) * self.row_bytes],
            // `with_isa` checked that this CPU tensor lends its bytes.
            _ => unreachable!("CPU QTensor storage is borrowed"),
        }
    }

    /// `out[n × rows] = x[n × cols] · Wᵀ`, all row-major f32.
    pub fn matmul(&self, x: &[f32], n: usize, out: &mut [f32]) {
        self.matmul_with(x, n, out, None)
    }

    /// `matmul`, optionally with a given number of rows per task.
    pub fn matmul_with(&self, x: &[f32], n: usize, out: &mut [f32], rows_per_task: Option<usize>) {
        let (rows, cols) = (self.rows, self.cols);
        assert_eq!(x.len(), n * cols, "x must be [n, cols]");
        assert_eq!(out.len(), n * rows, "out must be [n, rows]");
        if n == 0 || rows == 0 {
            return;
        }
        let team = Team::global();
        let chunk_rows = rows_per_task
            .unwrap_or_else(|| self.rows_per_task(n, team.threads()))
            .max(1)
            .next_multiple_of(R);
        let chunks = rows.div_ceil(chunk_rows);
        let dst = SharedOut(out.as_mut_ptr());
        team.run(chunks, &|c| {
            let r0 = c * chunk_rows;
            let nr = chunk_rows.min(rows - r0);
            SCRATCH.with(|s| {
                self.rows_task(r0, nr, x, n, &mut s.borrow_mut(), &mut |t, i, v| {
                    // SAFETY: `out` is `[n, rows]` and outlives the loop; each
                    // output row belongs to exactly one chunk, so no two tasks
                    // write the same element.
                    unsafe { *dst.at(t * rows + r0 + i) = v }
                })
            });
        });
    }

    /// Rows per chunk of work: about eight chunks per thread for balance (they
    /// are claimed dynamically), but at least ~64k multiply-adds each.
    fn rows_per_task(&self, n: usize, threads: usize) -> usize {
        let balance = self.rows.div_ceil(8 * threads);
        let min_work = (1usize << 16).div_ceil(self.cols * n);
        balance.max(min_work).max(16).next_multiple_of(R)
    }

    /// Output rows `r0 .. r0 + nrows` (`r0` a multiple of `R`) for all `n`
    /// activation rows: `put(t, i, v)` receives row `r0 + i` of activation row `t`.
    fn rows_task<P: FnMut(usize, usize, f32)>(
        &self,
        r0: usize,
        nrows: usize,
        x: &[f32],
        n: usize,
        s: &mut Scratch,
        put: &mut P,
    ) {
        assert!(r0.is_multiple_of(R) && r0 + nrows <= self.rows);
        let (isa, cols, rb) = (self.isa, self.cols, self.row_bytes);
        let tmax = isa.tile_t();
        let panel = (PANEL_BYTES / (4 * cols)).clamp(R, 64) / R * R;
        #[cfg(target_arch = "x86_64")]
        if let (Blocks::Tiled(data), Some(k)) = (&self.blocks, tiled_kind(self.kind)) {
            let nb = cols / 32;
            let tb = R * rb;
            let tile = |row: usize| &data[(self.row0 + row) / R * tb..][..tb];
            let nscales = nb * R * x86::tile_nscales(k);
            if n <= FUSED_TILED_MAX_N {
                for rt in (0..nrows).step_by(R) {
                    let t = tile(r0 + rt);
                    // SAFETY (both): tiled matrices exist only on the AVX-512 path
                    // (`with_isa` checks the CPU); the kernels check slice lengths.
                    unsafe { x86::tile_scales_512(t, nscales, &mut s.scales) };
                    // Up to 8 activation rows per pass; the tile stays in L1
                    // between passes.
                    for t0 in (0..n).step_by(FUSED_MAX_N) {
                        let tn = FUSED_MAX_N.min(n - t0);
                        let xs = &x[t0 * cols..(t0 + tn) * cols];
                        // Prefetch two tiles ahead (measured best of one to four).
                        let res = fused(k, t, &s.scales, xs, cols, tn, 2 * tb);
                        for (i, res) in res.iter().enumerate().take(R.min(nrows - rt)) {
                            for (j, &v) in res[..tn].iter().enumerate() {
                                put(t0 + j, rt + i, v);
                            }
                        }
                    }
                }
                return;
            }
            // Larger n: dequantize a panel of tiles, then the f32 micro-kernel.
            s.w.resize(panel * cols, 0.0);
            for p0 in (0..nrows).step_by(panel) {
                let np = panel.min(nrows - p0);
                for i in (0..np).step_by(R) {
                    let t = tile(r0 + p0 + i);
                    let w = &mut s.w[i * cols..(i + R) * cols];
                    unsafe { x86::tile_scales_512(t, nscales, &mut s.scales) };
                    unsafe {
                        match k {
                            x86::FUSED_Q4_0 => x86::dequant_tile_512::<{ x86::FUSED_Q4_0 }, R>(t, &s.scales, w),
                            x86::FUSED_Q4_1 => x86::dequant_tile_512::<{ x86::FUSED_Q4_1 }, R>(t, &s.scales, w),
                            _ => x86::dequant_tile_512::<{ x86::FUSED_Q8_0 }, R>(t, &s.scales, w),
                        }
                    }
                }
                panel_products(isa, &s.w, p0, np, x, n, cols, tmax, put);
            }
            return;
        }
        // ggml rows: dequantize a panel of rows (≤ 128 KiB of f32, stays in L2)
        // once; then each tile of activation rows (in L1) meets every `R`-row
        // tile of it.
        let bytes = self.ggml_bytes();
        s.w.resize(panel * cols, 0.0);
        for p0 in (0..nrows).step_by(panel) {
            let np = panel.min(nrows - p0);
            for i in 0..np {
                let row = r0 + p0 + i;
                dequant_row(
                    isa,
                    self.kind,
                    &bytes[row * rb..(row + 1) * rb],
                    &mut s.w[i * cols..(i + 1) * cols],
                );
            }
            panel_products(isa, &s.w, p0, np, x, n, cols, tmax, put);
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

/// The caller's output buffer, written by the team's tasks at disjoint places.
struct SharedOut(*mut f32);

// SAFETY: tasks write disjoint elements (see `matmul_with`) while the caller
// waits for them.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// # Safety
    /// `i` must be in bounds of the buffer, and no other thread may touch it.
    unsafe fn at(&self, i: usize) -> *mut f32 {
        self.0.add(i)
    }
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

/// The dot products of a dequantized panel (`np` rows of `w`, output rows
/// `p0 ..`) with every activation row, `tmax` activation rows per micro-kernel call.
#[allow(clippy::too_many_arguments)]
fn panel_products<P: FnMut(usize, usize, f32)>(
    isa: Isa,
    w: &[f32],
    p0: usize,
    np: usize,
    x: &[f32],
    n: usize,
    cols: usize,
    tmax: usize,
    put: &mut P,
) {
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
                    put(t + j, p0 + rt + i, v);
                }
            }
        }
        t += tt;
    }
}

/// Per-thread buffers of `rows_task`.
#[derive(Default)]
struct Scratch {
    /// A panel of dequantized weight rows (the unfused path).
    w: Vec<f32>,
    /// A tile's block scales as f32.
    scales: Vec<f32>,
}

/// Up to this many activation rows, Q4_0 / Q4_1 / Q8_0 on AVX-512 use the fused
/// kernel (each block dequantized in registers once for all `n`); beyond it,
/// dequantizing a panel to f32 once and running the f32 micro-kernel over it is
/// cheaper.
const FUSED_MAX_N: usize = 8;

/// Tiled matrices use the fused kernel, 8 activation rows per pass, up to this
/// many rows (a decode step of a full batch); the panel path beyond (prompts).
/// Measured with `vicugna bench --batch 16`: 207 tok/s through the panel path,
/// 249 with fused passes.
const FUSED_TILED_MAX_N: usize = 32;

/// The fused AVX-512 kernel on one tile (`R` rows) for `n ≤ FUSED_MAX_N`
/// activation rows: one pass over the 4 rows for n ≤ 4, two passes of 2 rows (so
/// the accumulators fit in registers) for larger n.
#[cfg(target_arch = "x86_64")]
fn fused(k: u8, tile: &[u8], sc: &[f32], x: &[f32], cols: usize, n: usize, prefetch: usize) -> [[f32; FUSED_MAX_N]; R] {
    use x86::{fused_tile_512, FUSED_Q4_0, FUSED_Q4_1, FUSED_Q8_0};
    let mut out = [[0f32; FUSED_MAX_N]; R];
    // SAFETY (all calls): only reached for tiled matrices, which exist only on the
    // AVX-512 path (`QMatrix::with_isa` checks the CPU); the kernel checks its
    // slice lengths.
    macro_rules! go {
        ($kk:expr, [$($n:literal)*], [$($m:literal)*]) => {
            match n {
                $($n => {
                    let res = unsafe { fused_tile_512::<{ $kk }, R, 0, R, $n>(tile, sc, x, cols, prefetch) };
                    for (o, r) in out.iter_mut().zip(res) {
                        o[..$n].copy_from_slice(&r);
                    }
                })*
                $($m => {
                    let res = unsafe { fused_tile_512::<{ $kk }, R, 0, 2, $m>(tile, sc, x, cols, prefetch) };
                    for (o, r) in out.iter_mut().zip(res) {
                        o[..$m].copy_from_slice(&r);
                    }
                    let res = unsafe { fused_tile_512::<{ $kk }, R, 2, 2, $m>(tile, sc, x, cols, prefetch) };
                    for (o, r) in out[2..].iter_mut().zip(res) {
                        o[..$m].copy_from_slice(&r);
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

/// The path this process's kernels use (`Isa::detect`, once).
fn process_isa() -> Isa {
    static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *ISA.get_or_init(Isa::detect)
}

/// Decode attention's two products on AVX-512, when this process uses that path
/// and `hd` is a multiple of 16: `scores[h·len + j] = scale · q_h · k_j` for the
/// query heads `q` (`[g, hd]`), then, after `softmax` turns each row of scores
/// into weights, `out_h = Σ_j scores[h·len + j] · v_j`. Returns false (touching
/// nothing) where it does not apply.
#[allow(clippy::too_many_arguments)]
pub fn attention_simd(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    hd: usize,
    len: usize,
    scale: f32,
    scores: &mut [f32],
    softmax: &mut dyn FnMut(&mut [f32]),
    out: &mut [f32],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if process_isa() == Isa::Avx512 && hd.is_multiple_of(16) && hd > 0 {
        // SAFETY: the CPU supports the path (`Isa::detect` checked it); the
        // kernels check their slice lengths.
        unsafe {
            x86::attention_scores_512(q, k, hd, len, scale, scores);
            softmax(scores);
            x86::attention_values_512(scores, v, hd, len, out);
        }
        return true;
    }
    let _ = (q, k, v, hd, len, scale, scores, softmax, out);
    false
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

    /// Every row of `m`, dequantized by the code its matmul path uses.
    fn path_dequantize(m: &QMatrix) -> Vec<f32> {
        let (rows, cols, rb) = (m.rows, m.cols, m.row_bytes);
        let mut got = vec![0f32; rows.next_multiple_of(R) * cols];
        match &m.blocks {
            Blocks::Ggml(_) => {
                for r in 0..rows {
                    let src = &m.ggml_bytes()[r * rb..(r + 1) * rb];
                    dequant_row(m.isa, m.kind, src, &mut got[r * cols..(r + 1) * cols]);
                }
            }
            #[cfg(target_arch = "x86_64")]
            Blocks::Tiled(data) => {
                let k = tiled_kind(m.kind).unwrap();
                let mut sc = Vec::new();
                for (t, tile) in data.chunks_exact(R * rb).enumerate() {
                    let w = &mut got[t * R * cols..(t + 1) * R * cols];
                    unsafe {
                        x86::tile_scales_512(tile, cols / 32 * R * x86::tile_nscales(k), &mut sc);
                        match k {
                            x86::FUSED_Q4_0 => x86::dequant_tile_512::<{ x86::FUSED_Q4_0 }, R>(tile, &sc, w),
                            x86::FUSED_Q4_1 => x86::dequant_tile_512::<{ x86::FUSED_Q4_1 }, R>(tile, &sc, w),
                            _ => x86::dequant_tile_512::<{ x86::FUSED_Q8_0 }, R>(tile, &sc, w),
                        }
                    }
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            Blocks::Tiled(_) => unreachable!(),
        }
        got.truncate(rows * cols);
        got
    }

    #[test]
    fn views_of_a_concatenation_multiply_like_their_parts() {
        let dev = Device::Cpu;
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let parts: Vec<Arc<QTensor>> = [8usize, 12, 4]
                .iter()
                .enumerate()
                .map(|(i, &r)| quantized(r, 64, dtype, i as u64))
                .collect();
            let ms: Vec<QMatrix> = parts.iter().map(|q| QMatrix::from_qtensor(q).unwrap()).collect();
            let refs: Vec<&QMatrix> = ms.iter().collect();
            let Some((whole, views)) = QMatrix::concat(&refs) else {
                // Only tiled (AVX-512) matrices concatenate.
                assert!(!Isa::available().contains(&Isa::Avx512));
                continue;
            };
            assert_eq!(whole.rows(), 24);
            let x: Vec<f32> = Tensor::randn(0f32, 1.0, (3, 64), &dev)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let mut all = vec![0f32; 3 * 24];
            whole.matmul(&x, 3, &mut all);
            let mut off = 0;
            for (m, v) in ms.iter().zip(&views) {
                let (mut a, mut b) = (vec![0f32; 3 * m.rows()], vec![0f32; 3 * m.rows()]);
                m.matmul(&x, 3, &mut a);
                v.matmul(&x, 3, &mut b);
                assert_eq!(a, b, "{dtype:?}: a view differs from its part");
                for t in 0..3 {
                    assert_eq!(
                        a[t * m.rows()..(t + 1) * m.rows()],
                        all[t * 24 + off..t * 24 + off + m.rows()]
                    );
                }
                off += m.rows();
            }
        }
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
            for isa in Isa::available() {
                let m = QMatrix::with_isa(&q, isa).unwrap();
                let got = path_dequantize(&m);
                let mut row = vec![0f32; cols];
                for r in 0..rows {
                    m.dequantize_row(r, &mut row);
                    assert_eq!(row, want[r * cols..(r + 1) * cols], "{dtype:?} {isa:?}: row {r}");
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
                        let m = QMatrix::with_isa(&q, isa).unwrap();
                        for rpt in [None, Some(8), Some(rows)] {
                            let mut got = vec![f32::NAN; n * rows];
                            m.matmul_with(&xs, n, &mut got, rpt);
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
