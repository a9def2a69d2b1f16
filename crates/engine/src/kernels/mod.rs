//! Matrix products against ggml-quantized weights.
//!
//! `out[n × rows] = x[n × cols] · Wᵀ` where `W` is a ggml-quantized matrix (each of
//! its `rows` rows is `cols / block` blocks, ggml layout) and `x` is f32.
//!
//! On CPUs with AVX-512 VNNI, when asked for (see [`Int8Mode`]; the command
//! line asks for K-quants by default; int8 scheme): Q4_0 / Q4_1 / Q8_0 activations are
//! rounded to 8 bits per run of 8 values (scale = max|x| / 127; llama.cpp uses
//! runs of 32) and multiplied with the 4- or 8-bit values by `vpdpbusd`, 64
//! products per instruction; the integer sums are exact and are scaled per run
//! in f32. Q4_0 / Q4_1 weights are repacked at load into tiles of `Q` = 16 rows,
//! one row per i32 lane (see `Blocks::Int8`), so a tile's 16 results come out in
//! one vector with no horizontal sums. Q8_0 stays where it was loaded (its files
//! are the largest; a copy at load took seconds): products of `KTILE_MIN_N`
//! rows or more repack it 16 rows at a time into the same tiles
//! (`x86::q8_tile_512`; a batch of 8, which would read each tile once,
//! transposes the rows in registers instead: `x86::int8_q8_rows_tile_512`),
//! smaller ones multiply it row by row where it lies
//! (`x86::int8_q8_rows_512`), so Q8_0 has the K-quants' two size classes
//! below. K-quants (Q4_K / Q5_K / Q6_K) stay in ggml's
//! layout, where they were loaded: their activations are rounded per block of
//! 256 as llama.cpp's Q8_K, and `x86::int8_kquant_512` multiplies with
//! `vpmaddubsw` + `vpdpwssd` (the runs' 6- or 8-bit scales folded into the
//! integer sums). Products of `KTILE_MIN_N` rows or more (prompts, batches of
//! 8 sequences) repack 16 weight rows at a time into an int8 tile in L2
//! (`x86::kq_tile_512`; Q4_K's values stay packed there, two runs to a byte,
//! unpacked as they are read) and sum each run with `vpdpbusd` in one lane
//! per row (`x86::int8_ktile_512`), about twice the products per instruction. The two
//! K-quant kernels round differently, so there a row's bits depend on whether
//! its product had fewer than `KTILE_MIN_N` rows (as llama.cpp's do); within
//! each size class they do not depend on the batch (tested). CPUs with AVX2
//! but not AVX-512 VNNI get the scheme for K-quants only, through
//! `x86::int8_kquant_256` (one 32-value run per vector, `vpmaddubsw` +
//! `vpmaddwd`) at every size: one size class there. Every activation
//! row is rounded on its own and, for Q4_0 / Q4_1, every output element is
//! computed by the same instructions whatever `n` is, so a row's result does
//! not depend on the rows batched with it (prompt or decode, alone or batched:
//! the same bits). Its error against the dequantized-f32 product is
//! bounded by Σ_r Σ_k |w_rk| · max|x_r| / 254 over the runs `r` (tested). The
//! library leaves it off because rounding activations moves near-ties in greedy
//! decoding away from HF's choices (as llama.cpp's does).
//!
//! By default weight blocks are dequantized on the fly, to exactly the values
//! ggml's dequantization gives, and multiplied with f32 FMAs: the result is the
//! dequantized-f32 matmul up to summation order. Two schemes, both over tiles of
//! `R` weight rows:
//! - fused (AVX-512; Q4_0, Q4_1, Q8_0; n ≤ `FUSED_TILED_MAX_N`, i.e. decode):
//!   Q4_0 / Q4_1 are repacked at load into tiles of `R` rows (see
//!   `Blocks::Tiled`), Q8_0 is read where it lies, `R` rows at a time
//!   (`x86::fused_q8_rows_512`, the same values in the same order); each block
//!   is dequantized in registers (4-bit types through a 16-entry `vpermps`
//!   table) and used at once for all `n` activation rows.
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
use half::slice::HalfFloatSliceExt;

use rayon::prelude::*;

use crate::team::Team;

pub use aligned::{Aligned, Plain};

mod aligned;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;

/// Weight rows dequantized together: one f32 tile of `R × cols`.
const R: usize = 4;

/// Weight rows per tile of the int8 scheme: one per i32 lane of a 512-bit vector.
const Q: usize = 16;

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

    /// Q4_K, Q5_K or Q6_K (256-value super-blocks with per-run scales).
    fn is_kquant(self) -> bool {
        matches!(self, Kind::Q4K | Kind::Q5K | Kind::Q6K)
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
    /// comparisons; `avx512-novnni` keeps AVX-512 and hides VNNI, see `vnni`).
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
    /// K-quants or Q8_0 in ggml's layout under the int8 scheme (two size
    /// classes: row kernels below `KTILE_MIN_N` activation rows, int8 tiles
    /// repacked per product from there).
    kint8: bool,
}

/// Where a matrix's blocks live.
#[derive(Clone)]
enum Blocks {
    /// ggml's layout, row after row, inside the `QTensor` it came from (no copy).
    Ggml(Arc<QTensor>),
    /// ggml's layout, row after row, where the model file is mapped (no copy).
    Mapped(Arc<MappedBlocks>),
    /// Q4_0 / Q4_1 / Q8_0 on the AVX-512 path, repacked in tiles of `R` rows.
    /// A tile takes the bytes of its `R` ggml rows: first the f16 scales, block
    /// column by block column (the rows' `d`, then for Q4_1 their `m`), then the
    /// quantized values, block column by block column (each row's 16 or 32
    /// bytes). The fused kernel then reads one sequential stream per thread (a
    /// block column of four rows is one 64- or 128-byte run) and converts a
    /// tile's scales with a few contiguous loads, where ggml's layout needed a
    /// gather from every block. Rows past the last are zero.
    Tiled(Arc<Vec<u8>>),
    /// Q4_0 / Q4_1 / Q8_0 for the int8 scheme (AVX-512 VNNI), in tiles of `Q`
    /// rows. A tile is its block columns one after another; a block column is
    /// the rows' f16 `d` (then for Q4_1 their `m`), then 64-byte groups (four
    /// for Q4, eight for Q8_0): group `g` holds each row's quantized bytes
    /// `4g .. 4g + 4` (row `r` at `4r`) — Q4's low nibbles are values `4g..` and
    /// high nibbles values `16 + 4g..`, Q8_0's bytes values `4g..` — so one load
    /// (and for Q4 a mask) gives every row's next four values in its own i32
    /// lane. Rows past the last are zero.
    Int8(Arc<Vec<u8>>),
    /// Matrices used where they lie (`Ggml` / `Mapped`: K-quants, Q8_0), one
    /// after another, multiplied as one (see [`QMatrix::concat`]): one product
    /// (one rounding of the activations, one hand-out of tasks) for all.
    Joined(Arc<Vec<QMatrix>>),
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

/// Bytes of ggml's `block_q5_0`: f16 `d`, the 32 high bits `qh`, 16 bytes of low nibbles.
const Q5_0_BYTES: usize = 22;

/// `block_q5_0`s rewritten as `block_q8_0`s holding the same values: value `j`
/// is `d · (q_j - 16)`, `q_j` = low nibble (`qs[j]` low half for `j < 16`, else
/// `qs[j - 16]` high half) plus bit `j` of `qh` as its fifth bit.
fn q5_0_as_q8_0(src: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(src.len() / Q5_0_BYTES * 34);
    for blk in src.chunks_exact(Q5_0_BYTES) {
        out.extend_from_slice(&blk[..2]);
        let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
        let qs = &blk[6..];
        for j in 0..32 {
            let nibble = if j < 16 { qs[j] & 0x0F } else { qs[j - 16] >> 4 };
            let q = (nibble | ((((qh >> j) & 1) as u8) << 4)) as i8 - 16;
            out.push(q as u8);
        }
    }
    out
}

/// ggml rows (`rows × nb` blocks of `kind`) repacked into tiles (see
/// `Blocks::Tiled`) in `out` (`rows.div_ceil(R)` tiles, zero where no row is).
fn tile_rows_into(kind: Kind, src: &[u8], rows: usize, nb: usize, out: &mut [u8]) {
    match kind {
        Kind::Q4_0 => tile_rows_as::<2, 16, 1>(kind, src, rows, nb, out),
        Kind::Q4_1 => tile_rows_as::<4, 16, 2>(kind, src, rows, nb, out),
        _ => tile_rows_as::<2, 32, 1>(kind, src, rows, nb, out),
    }
}

/// `tile_rows_into` for a kind whose `block_parts` are `(QOFF, QB, NS)`:
/// constant sizes make each copy a few moves, not a `memcpy` call per block,
/// and the tiles are shared among the threads (a model's Q4_0 / Q4_1 blocks
/// are all repacked while it loads).
fn tile_rows_as<const QOFF: usize, const QB: usize, const NS: usize>(
    kind: Kind,
    src: &[u8],
    rows: usize,
    nb: usize,
    out: &mut [u8],
) {
    debug_assert_eq!(block_parts(kind), (QOFF, QB, NS));
    let bb = kind.block_bytes();
    let (rb, tb) = (nb * bb, R * nb * bb);
    assert_eq!(out.len(), rows.div_ceil(R) * tb, "tile buffer size");
    out.par_chunks_exact_mut(tb).enumerate().for_each(|(t, tile)| {
        let (scales, quants) = tile.split_at_mut(2 * nb * R * NS);
        for r in 0..R.min(rows - t * R) {
            let row = &src[(t * R + r) * rb..(t * R + r + 1) * rb];
            for (b, blk) in row.chunks_exact(bb).enumerate() {
                for j in 0..NS {
                    let at = 2 * (b * R * NS + j * R + r);
                    scales[at..at + 2].copy_from_slice(&blk[2 * j..2 * j + 2]);
                }
                let at = (b * R + r) * QB;
                let q: &[u8; QB] = blk[QOFF..QOFF + QB].try_into().expect("QB bytes");
                quants[at..at + QB].copy_from_slice(q);
            }
        }
    });
}

/// `len` zero bytes for a repacked matrix, asking Linux for transparent huge
/// pages (where they are given on request, `madvise` mode): the first write to
/// each 4 KiB page otherwise costs a fault (a quarter million per GB).
/// Advice only: without huge pages this is `vec![0; len]`.
fn zeroed_huge(len: usize) -> Vec<u8> {
    // Large zeroed allocations come from fresh mappings, untouched until written.
    let v = vec![0u8; len];
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let (start, end) = (v.as_ptr() as usize, v.as_ptr() as usize + len);
        let (start, end) = (start.next_multiple_of(HUGE), end / HUGE * HUGE);
        if end > start {
            // SAFETY: advice on whole pages inside `v`'s allocation; it changes
            // how they are backed, never their contents.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    v
}

/// The kind and bytes per row of `rows × cols` blocks of `dtype` held in
/// `len` bytes; `None` for a block type without kernels here or a size that
/// does not fit.
fn block_shape(dtype: GgmlDType, rows: usize, cols: usize, len: usize) -> Option<(Kind, usize)> {
    let kind = Kind::from_dtype(dtype)?;
    if cols == 0 || !cols.is_multiple_of(kind.block_elems()) {
        return None;
    }
    let row_bytes = cols / kind.block_elems() * kind.block_bytes();
    (len == rows * row_bytes).then_some((kind, row_bytes))
}

/// How a matrix of `kind` is held for products: repacked into int8 tiles of
/// `Q` rows (`Some(true)`), into f32-path tiles of `R` rows (`Some(false)`), or
/// used where it lies (`None`).
fn tiling(kind: Kind, isa: Isa, int8: bool) -> Option<bool> {
    match tiled_kind(kind) {
        // Q8_0 stays where it lies (see `matmul_with`): its files are the
        // largest (8.5 GB at 8B), and the copy made at load took 3.5-4.5 s.
        _ if kind == Kind::Q8_0 => None,
        Some(_) if int8 && int8_supported(isa, kind) => Some(true),
        Some(_) if isa == Isa::Avx512 => Some(false),
        _ => None,
    }
}

/// `rows` ggml rows (`nb` blocks of `kind` each) repacked into `out`, in int8
/// tiles or f32-path tiles (`tiling`); `out` holds whole tiles
/// (`tiled_bytes`).
fn tile_into(kind: Kind, int8_tiles: bool, src: &[u8], rows: usize, nb: usize, out: &mut [u8]) {
    if int8_tiles {
        int8_tile_rows_into(kind, src, rows, nb, out)
    } else {
        tile_rows_into(kind, src, rows, nb, out)
    }
}

/// Bytes of `rows` rows of `row_bytes` repacked: whole tiles, zero past the
/// last row.
fn tiled_bytes(rows: usize, row_bytes: usize, int8_tiles: bool) -> usize {
    let tile = if int8_tiles { Q } else { R };
    rows.div_ceil(tile) * tile * row_bytes
}

/// Which quantized products round their activations to 8 bits (llama.cpp's
/// scheme, on CPUs with AVX-512 VNNI; K-quants also on AVX2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Int8Mode {
    /// None: the exact f32 product everywhere (HF's greedy tokens).
    Off,
    /// Every kind with an int8 kernel (Q4_0 / Q4_1 / Q8_0 / Q4_K / Q5_K / Q6_K).
    On,
    /// K-quants only (Q4_K / Q5_K / Q6_K): there the f32 product dequantizes
    /// each 256-value block before multiplying and runs at half llama.cpp's
    /// speed, the int8 one at 1.5-1.8x; the Q4_0 / Q4_1 / Q8_0 f32 kernels
    /// already outrun llama.cpp and keep HF's tokens.
    KQuants,
}

static INT8_MODE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Makes matrices created from now on use the int8 scheme for the kinds `mode`
/// names, where the CPU has AVX-512 VNNI, or AVX2 for K-quants (`vicugna … --int8 on|off|auto`;
/// `VICUGNA_KERNEL=int8` forces it on). The library's default is `Off`.
pub fn set_int8_mode(mode: Int8Mode) {
    INT8_MODE.store(mode as u8, std::sync::atomic::Ordering::Relaxed);
}

/// The mode matrices created now get (see [`set_int8_mode`]).
pub fn int8_mode() -> Int8Mode {
    match INT8_MODE.load(std::sync::atomic::Ordering::Relaxed) {
        1 => Int8Mode::On,
        2 => Int8Mode::KQuants,
        _ => Int8Mode::Off,
    }
}

/// `set_int8_mode(On)` or `set_int8_mode(Off)`.
pub fn set_int8_activations(on: bool) {
    set_int8_mode(if on { Int8Mode::On } else { Int8Mode::Off });
}

/// Whether new matrices of `dtype` on `isa` use the int8 scheme.
fn int8_default(isa: Isa, dtype: GgmlDType) -> bool {
    static ENV: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let env = *ENV.get_or_init(|| std::env::var("VICUGNA_KERNEL").is_ok_and(|v| v == "int8"));
    let mode = int8_mode();
    let kind = Kind::from_dtype(dtype);
    let kquant = kind.is_some_and(Kind::is_kquant);
    kind.is_some_and(|k| int8_supported(isa, k))
        && (env || mode == Int8Mode::On || (mode == Int8Mode::KQuants && kquant))
}

/// Whether the CPU is AMD's (where a batch of eight prefetches its next
/// weight tile, see `kint8_rows_task`).
fn amd_cpu() -> bool {
    static AMD: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AMD.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            // Leaf 0: the vendor string, on every x86-64 CPU.
            let r = std::arch::x86_64::__cpuid(0);
            let vendor = [r.ebx, r.edx, r.ecx].map(u32::to_le_bytes).concat();
            vendor == b"AuthenticAMD"
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

/// Whether this CPU can run the int8 scheme for `kind` on `isa` (AVX-512 VNNI:
/// every kind here; AVX2, and AVX-512 without VNNI: the K-quants).
fn int8_supported(isa: Isa, kind: Kind) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let kquant = kind.is_kquant();
        match isa {
            Isa::Avx512 => vnni() || kquant,
            // The K-quant row kernel only (`x86::int8_kquant_256`).
            Isa::Avx2 => kquant,
            Isa::Scalar => false,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (isa, kind);
        false
    }
}

/// Whether this CPU has AVX-512 VNNI (`vpdpbusd`), which the int8 tiles and the
/// 512-bit int8 kernels need. `VICUGNA_KERNEL=avx512-novnni` hides it, so that a
/// VNNI CPU takes (and tests) the path of AVX-512 CPUs without it (Skylake-X
/// class: many cloud machines), whose K-quants take the 256-bit row kernel.
fn vnni() -> bool {
    static VNNI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *VNNI.get_or_init(|| {
        let hidden = std::env::var("VICUGNA_KERNEL").is_ok_and(|v| v == "avx512-novnni");
        #[cfg(target_arch = "x86_64")]
        {
            !hidden && is_x86_feature_detected!("avx512vnni")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = hidden;
            false
        }
    })
}

/// Whether K-quant products under the int8 scheme take the 256-bit row kernel
/// (`x86::int8_kquant_256`) at every size: on the AVX2 path, and on AVX-512
/// without VNNI. Those have no int8 tiles, so one size class.
fn kquant_256(isa: Isa) -> bool {
    isa == Isa::Avx2 || (isa == Isa::Avx512 && !vnni())
}

/// Byte offset of row `r`'s group-`g` bytes inside an int8 block column with `ns`
/// scales per row (see `Blocks::Int8`).
fn int8_at(ns: usize, g: usize, r: usize) -> usize {
    2 * ns * Q + 64 * g + 4 * r
}

/// ggml rows (`rows × nb` blocks of Q4_0 / Q4_1 / Q8_0) repacked into int8
/// tiles in `out` (`rows.div_ceil(Q)` tiles, zero where no row is).
fn int8_tile_rows_into(kind: Kind, src: &[u8], rows: usize, nb: usize, out: &mut [u8]) {
    let (qoff, qb, ns) = block_parts(kind);
    let bb = kind.block_bytes();
    let (rb, cb) = (nb * bb, Q * bb);
    assert_eq!(out.len(), rows.div_ceil(Q) * nb * cb, "tile buffer size");
    out.par_chunks_exact_mut(nb * cb).enumerate().for_each(|(t, tile)| {
        for r in 0..Q.min(rows - t * Q) {
            let row = &src[(t * Q + r) * rb..(t * Q + r + 1) * rb];
            for (blk, col) in row.chunks_exact(bb).zip(tile.chunks_exact_mut(cb)) {
                for j in 0..ns {
                    let at = 2 * (j * Q + r);
                    col[at..at + 2].copy_from_slice(&blk[2 * j..2 * j + 2]);
                }
                for g in 0..qb / 4 {
                    let at = int8_at(ns, g, r);
                    col[at..at + 4].copy_from_slice(&blk[qoff + 4 * g..qoff + 4 * g + 4]);
                }
            }
        }
    });
}

/// Row `r` of an int8 tile back in ggml's block layout.
fn int8_untile_row(kind: Kind, tile: &[u8], r: usize, nb: usize, dst: &mut Vec<u8>) {
    let (qoff, qb, ns) = block_parts(kind);
    let bb = kind.block_bytes();
    dst.clear();
    dst.resize(nb * bb, 0);
    for (blk, col) in dst.chunks_exact_mut(bb).zip(tile.chunks_exact(Q * bb)) {
        for j in 0..ns {
            let at = 2 * (j * Q + r);
            blk[2 * j..2 * j + 2].copy_from_slice(&col[at..at + 2]);
        }
        for g in 0..qb / 4 {
            let at = int8_at(ns, g, r);
            blk[qoff + 4 * g..qoff + 4 * g + 4].copy_from_slice(&col[at..at + 4]);
        }
    }
}

/// Activation rows rounded to 8 bits for the int8 scheme, each run of 8 values
/// with its own scale. One scale per block of 32 (llama.cpp's choice) lets the
/// few outlier channels of a normed hidden state coarsen their whole block; on
/// SmolLM2 runs of 8 keep the logits about twice as close to the f32 product's, for
/// three more scalings per block and row.
struct Int8Rows {
    /// `[n, cols]` values, each `round(x / d)` of its run's `d` (for Q8_0 plus
    /// 128, as unsigned bytes: VNNI multiplies unsigned by signed bytes, and
    /// Q8_0's weights are the signed side).
    q: Vec<i8>,
    /// `[n, 4·nb]`: each run's `d = max|x| / 127`.
    d: Vec<f32>,
    /// `[n, 4·nb]`: where each run's integer sum starts (Q4_0: −8·Σq; Q4_1 and
    /// Q8_0: 0).
    init: Vec<i32>,
    /// `[n, nb]`: each block's Σ d·q over its runs (Q4_1's `m` term).
    sum: Vec<f32>,
}

impl Int8Rows {
    /// Rounds each row on its own (ties to even), so a row's values never
    /// depend on the other rows. Large inputs (prompts) are split over the team.
    fn new(kind: Kind, x: &[f32], cols: usize) -> Self {
        let (n, nb) = (x.len() / cols, cols / 32);
        let mut r = Int8Rows {
            q: vec![0; n * cols],
            d: vec![0.0; 4 * n * nb],
            init: vec![0; 4 * n * nb],
            sum: vec![0.0; n * nb],
        };
        // ~16k values per task, but a decode step's few rows still split over
        // the team: alone, the caller quantized while the helper waited.
        let team = Team::global();
        let per_task = (1usize << 14).div_ceil(cols).min(n.div_ceil(team.threads())).max(1);
        let (q, d, init, sum) = (
            SharedOut(r.q.as_mut_ptr()),
            SharedOut(r.d.as_mut_ptr()),
            SharedOut(r.init.as_mut_ptr()),
            SharedOut(r.sum.as_mut_ptr()),
        );
        team.run(n.div_ceil(per_task), &|c| {
            let (t0, t1) = (c * per_task, ((c + 1) * per_task).min(n));
            // SAFETY: each task owns rows `t0..t1` of every buffer (disjoint), and
            // the buffers outlive the loop.
            let (q, d, init, sum) = unsafe {
                (
                    std::slice::from_raw_parts_mut(q.at(t0 * cols), (t1 - t0) * cols),
                    std::slice::from_raw_parts_mut(d.at(4 * t0 * nb), 4 * (t1 - t0) * nb),
                    std::slice::from_raw_parts_mut(init.at(4 * t0 * nb), 4 * (t1 - t0) * nb),
                    std::slice::from_raw_parts_mut(sum.at(t0 * nb), (t1 - t0) * nb),
                )
            };
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the int8 scheme only exists where the CPU has AVX-512 (and
            // VNNI, `int8_supported`); the function checks its slice lengths.
            unsafe {
                x86::quantize_int8_512(&x[t0 * cols..t1 * cols], q, d, init)
            };
            if kind == Kind::Q4_0 {
                init.iter_mut().for_each(|i| *i *= -8);
            } else if kind == Kind::Q8_0 {
                // x + 128 as an unsigned byte; the kernel takes 128·Σw back out.
                q.iter_mut().for_each(|v| *v ^= i8::MIN);
                init.fill(0);
            } else {
                // Q4_1's `m` term from the rounded x (Σ d·q, not Σx): then the
                // rounding error is weighted by the weights themselves (d·q + m),
                // not by d·q alone (all positive, about twice as large).
                for ((s, d), i) in sum.iter_mut().zip(d.chunks_exact(4)).zip(init.chunks_exact_mut(4)) {
                    *s = d.iter().zip(i.iter()).map(|(&d, &i)| d * i as f32).sum();
                    i.fill(0);
                }
            }
        });
        r
    }
}

/// Activation rows rounded to 8 bits per block of 256 values (llama.cpp's Q8_K)
/// for K-quant weights under the int8 scheme; see `x86::int8_kquant_512` for the
/// layout. Each row is rounded on its own, so its values never depend on the
/// other rows.
#[derive(Default)]
struct Int8KRows {
    /// `n` rows `stride` apart: `round(x / d)` (ties to even), each block's runs
    /// of 32 in the order the kernel for the weights' kind reads them.
    q: Vec<i8>,
    /// `cols` plus a cache line where `cols` is a multiple of 1024: rows a power
    /// of two apart fall into the same L1 sets (8B-shaped prompts, 4096 columns,
    /// ran at a third of the speed).
    stride: usize,
    /// `[n, nb]`: each block's `d = max|x| / 127`.
    d: Vec<f32>,
    /// `[n, nb, 16]`: Σq per run in natural order (Q4_K / Q5_K: 8 runs of 32;
    /// Q6_K: 16 of 16).
    sums: Vec<i16>,
}

impl Int8KRows {
    /// `x`'s rows rounded into this buffer (its vectors reused between products:
    /// fresh ones came back from the kernel as zeroed pages every product), the
    /// rows split over `team`.
    fn fill(&mut self, kind: Kind, x: &[f32], cols: usize, team: &Team) {
        let (n, nb) = (x.len() / cols, cols / 256);
        let stride = if cols.is_multiple_of(1024) { cols + 64 } else { cols };
        self.stride = stride;
        self.q.resize(n * stride, 0);
        self.d.resize(n * nb, 0.0);
        self.sums.resize(16 * n * nb, 0);
        let (q, d) = (SharedOut(self.q.as_mut_ptr()), SharedOut(self.d.as_mut_ptr()));
        let sums = SharedOut(self.sums.as_mut_ptr());
        // About 64k values per task.
        let per_task = (1usize << 16).div_ceil(cols).max(1);
        team.run(n.div_ceil(per_task), &|c| {
            for t in c * per_task..((c + 1) * per_task).min(n) {
                // SAFETY: row `t`'s parts of the three buffers (sized above) belong to
                // this task alone; the caller waits for every task.
                unsafe {
                    Self::round_row(
                        kind,
                        &x[t * cols..(t + 1) * cols],
                        std::slice::from_raw_parts_mut(q.at(t * stride), cols),
                        std::slice::from_raw_parts_mut(d.at(t * nb), nb),
                        std::slice::from_raw_parts_mut(sums.at(16 * t * nb), 16 * nb),
                    )
                }
            }
        });
    }

    /// One row: `q`, `d` and `sums` of its blocks (see the fields).
    fn round_row(kind: Kind, x: &[f32], q: &mut [i8], d: &mut [f32], sums: &mut [i16]) {
        // Q4_K / Q5_K: a 64-byte weight load holds runs 0 and 2 (low nibbles),
        // 1 and 3 (high nibbles), then 4, 6 and 5, 7.
        let order: [usize; 8] = if kind == Kind::Q6K {
            [0, 1, 2, 3, 4, 5, 6, 7]
        } else {
            [0, 2, 1, 3, 4, 6, 5, 7]
        };
        let per_sum = if kind == Kind::Q6K { 16 } else { 32 };
        let blocks = q.chunks_exact_mut(256).zip(d.iter_mut()).zip(sums.chunks_exact_mut(16));
        for (xb, ((q, d), sums)) in x.chunks_exact(256).zip(blocks) {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            *d = amax / 127.0;
            let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
            let mut qn = [0i8; 256];
            for (qv, &v) in qn.iter_mut().zip(xb) {
                *qv = (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8;
            }
            for (j, s) in sums.iter_mut().take(256 / per_sum).enumerate() {
                *s = qn[j * per_sum..(j + 1) * per_sum].iter().map(|&v| v as i16).sum();
            }
            for (slot, &run) in order.iter().enumerate() {
                q[32 * slot..32 * slot + 32].copy_from_slice(&qn[32 * run..32 * run + 32]);
            }
        }
    }
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

/// Drops bytes `start .. start + len` of a read-only file mapping from the
/// process once they have been copied out, so the file's pages and their copy
/// are not both counted while a model loads (the page cache keeps them; a later
/// read maps them in again).
pub fn release_mapped(map: &memmap2::Mmap, start: usize, len: usize) {
    #[cfg(unix)]
    {
        const PAGE: usize = 4096;
        let from = start / PAGE * PAGE;
        let to = ((start + len).div_ceil(PAGE) * PAGE).min(map.len());
        if to > from {
            // SAFETY: the mapping is read-only and file-backed; after DONTNEED a
            // read faults the same file bytes in again, so no slice changes.
            let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, from, to - from) };
        }
    }
    #[cfg(not(unix))]
    let _ = (map, start, len);
}

/// ggml blocks of one tensor inside a mapped model file: the weights are read
/// where the file lies, so a model takes its file's pages and no copy of them.
#[derive(Clone)]
pub struct MappedBlocks {
    map: Arc<memmap2::Mmap>,
    start: usize,
    len: usize,
    dtype: GgmlDType,
    dims: Vec<usize>,
}

impl MappedBlocks {
    /// `len` bytes of `dtype` blocks at `start` of `map`, a tensor of shape `dims`;
    /// `None` unless the range is inside the map and holds exactly that tensor.
    pub fn new(map: Arc<memmap2::Mmap>, start: usize, len: usize, dtype: GgmlDType, dims: &[usize]) -> Option<Self> {
        let elems: usize = dims.iter().product();
        let fits = start.checked_add(len).is_some_and(|end| end <= map.len());
        let whole = elems.is_multiple_of(dtype.block_size()) && elems / dtype.block_size() * dtype.type_size() == len;
        (fits && whole).then(|| MappedBlocks {
            map,
            start,
            len,
            dtype,
            dims: dims.to_vec(),
        })
    }

    /// The blocks.
    pub fn bytes(&self) -> &[u8] {
        &self.map[self.start..self.start + self.len]
    }

    pub fn dims(&self) -> &[usize] {
        &self.dims
    }

    /// Rows `start .. start + len` of the tensor seen as `[rows, cols]` (leading
    /// dimensions flattened), still in place.
    pub fn rows(&self, start: usize, len: usize) -> Option<Self> {
        let cols = *self.dims.last()?;
        let rows = self.dims.iter().product::<usize>() / cols.max(1);
        let row_bytes = self.len / rows.max(1);
        (start + len <= rows).then(|| MappedBlocks {
            map: self.map.clone(),
            start: self.start + start * row_bytes,
            len: len * row_bytes,
            dtype: self.dtype,
            dims: vec![len, cols],
        })
    }

    /// Drops the mapped pages of these blocks from the process, once they have
    /// been copied (see [`release_mapped`]).
    pub fn release_pages(&self) {
        release_mapped(&self.map, self.start, self.len)
    }

    /// A copy as a candle `QTensor` (for paths without our kernels).
    pub fn to_qtensor(&self) -> candle_core::Result<Arc<QTensor>> {
        let storage = candle_core::quantized::QStorage::from_data(
            Cow::Borrowed(self.bytes()),
            &candle_core::Device::Cpu,
            self.dtype,
        )?;
        Ok(Arc::new(QTensor::new(storage, self.dims.as_slice())?))
    }
}

impl QMatrix {
    /// Wraps a 2-D CPU `QTensor` of a supported block type; `None` otherwise.
    pub fn from_qtensor(tensor: &Arc<QTensor>) -> Option<Self> {
        Self::with_isa(tensor, Isa::detect())
    }

    /// Like [`Self::from_qtensor`], for a given path (which this CPU must support).
    pub fn with_isa(tensor: &Arc<QTensor>, isa: Isa) -> Option<Self> {
        Self::with_scheme(tensor, isa, int8_default(isa, tensor.dtype()))
    }

    /// Like [`Self::with_isa`], choosing whether to use the int8 scheme (where this
    /// CPU supports it; ignored otherwise).
    pub fn with_scheme(tensor: &Arc<QTensor>, isa: Isa, int8: bool) -> Option<Self> {
        let &[rows, cols] = tensor.shape().dims() else {
            return None;
        };
        if !tensor.device().is_cpu() {
            return None;
        }
        // CPU storage hands out a borrowed view of its blocks; `bytes` relies on it.
        let Ok(Cow::Borrowed(bytes)) = tensor.data() else {
            return None;
        };
        if tensor.dtype() == GgmlDType::Q5_0 {
            return Self::widened_q5_0(bytes, rows, cols, isa, int8);
        }
        Self::build(tensor.dtype(), rows, cols, bytes, isa, int8, || {
            Blocks::Ggml(tensor.clone())
        })
    }

    /// A matrix over ggml blocks in a mapped file: K-quants are used where they
    /// lie (the file's pages are the only copy), other kinds are repacked as
    /// [`Self::from_qtensor`] does. `None` for a block type without kernels here.
    pub fn from_mapped(blocks: &Arc<MappedBlocks>) -> Option<Self> {
        let isa = Isa::detect();
        Self::from_mapped_scheme(blocks, isa, int8_default(isa, blocks.dtype))
    }

    /// [`Self::from_mapped`] on `isa`, choosing whether to use the int8 scheme.
    fn from_mapped_scheme(blocks: &Arc<MappedBlocks>, isa: Isa, int8: bool) -> Option<Self> {
        let &[rows, cols] = &blocks.dims[..] else {
            return None;
        };
        if blocks.dtype == GgmlDType::Q5_0 {
            let m = Self::widened_q5_0(blocks.bytes(), rows, cols, isa, int8)?;
            blocks.release_pages();
            return Some(m);
        }
        let m = Self::build(blocks.dtype, rows, cols, blocks.bytes(), isa, int8, || {
            Blocks::Mapped(blocks.clone())
        })?;
        if !matches!(m.blocks, Blocks::Mapped(_)) {
            // Repacked: the file's pages are not needed again, so they do not
            // count twice while the model loads.
            blocks.release_pages();
        }
        Some(m)
    }

    /// A matrix over mapped ggml blocks left where they lie, for row lookups
    /// only (`dequantize_row`; an embedding that is not also the output
    /// layer): `from_mapped` would repack Q4_0 / Q4_1 for products, a copy of
    /// every row where a prompt reads a few. `None` for a block type without kernels here.
    pub fn from_mapped_for_lookup(blocks: &Arc<MappedBlocks>) -> Option<Self> {
        let &[rows, cols] = &blocks.dims[..] else {
            return None;
        };
        let (kind, row_bytes) = block_shape(blocks.dtype, rows, cols, blocks.bytes().len())?;
        Some(QMatrix {
            kind,
            dtype: blocks.dtype,
            rows,
            cols,
            row_bytes,
            isa: Isa::detect(),
            blocks: Blocks::Mapped(blocks.clone()),
            row0: 0,
            kint8: false,
        })
    }

    /// Matrices over mapped ggml blocks that are multiplied as one (the q, k
    /// and v projections; gate and up) repacked straight into one buffer, each
    /// a view of it: `concat` over them then copies nothing. Repacking them
    /// apart and concatenating held every part twice, above the memory bound
    /// of a mapped file. `None`
    /// where `from_mapped` would not repack them all alike with whole tiles.
    pub fn from_mapped_parts(parts: &[&Arc<MappedBlocks>]) -> Option<Vec<QMatrix>> {
        let isa = Isa::detect();
        let first = parts.first()?;
        let (dtype, cols) = (first.dtype, *first.dims.get(1)?);
        let int8_tiles = tiling(Kind::from_dtype(dtype)?, isa, int8_default(isa, dtype))?;
        let tile = if int8_tiles { Q } else { R };
        let mut shapes = Vec::with_capacity(parts.len());
        for p in parts {
            let &[rows, c] = &p.dims[..] else { return None };
            let (kind, row_bytes) = block_shape(p.dtype, rows, c, p.bytes().len())?;
            if p.dtype != dtype || c != cols || !rows.is_multiple_of(tile) || !isa.supported() {
                return None;
            }
            shapes.push((kind, rows, row_bytes));
        }
        let row_bytes = shapes[0].2;
        let nb = cols / shapes[0].0.block_elems();
        let mut data = zeroed_huge(shapes.iter().map(|&(_, rows, _)| rows).sum::<usize>() * row_bytes);
        let mut at = 0;
        for (p, &(kind, rows, _)) in parts.iter().zip(&shapes) {
            tile_into(
                kind,
                int8_tiles,
                p.bytes(),
                rows,
                nb,
                &mut data[at..at + rows * row_bytes],
            );
            p.release_pages();
            at += rows * row_bytes;
        }
        let data = Arc::new(data);
        let mut row0 = 0;
        Some(
            shapes
                .iter()
                .map(|&(kind, rows, row_bytes)| {
                    let m = QMatrix {
                        kind,
                        dtype,
                        rows,
                        cols,
                        row_bytes,
                        isa,
                        blocks: if int8_tiles {
                            Blocks::Int8(data.clone())
                        } else {
                            Blocks::Tiled(data.clone())
                        },
                        row0,
                        kint8: false,
                    };
                    row0 += rows;
                    m
                })
                .collect(),
        )
    }

    /// Q5_0 blocks (Gemma 3's Q4_K_M files keep the 262k-row embedding in
    /// them) as Q8_0, which has kernels here: candle's Q5_0 product was 60% of
    /// a prompt-logprob pass. Lossless: both formats are a block of 32 integers
    /// times one f16 scale, and Q5_0's 5-bit `q - 16` fits in Q8_0's i8.
    fn widened_q5_0(bytes: &[u8], rows: usize, cols: usize, isa: Isa, int8: bool) -> Option<Self> {
        if !bytes.len().is_multiple_of(Q5_0_BYTES) || bytes.len() / Q5_0_BYTES * 32 != rows * cols {
            return None;
        }
        let storage = candle_core::quantized::QStorage::from_data(
            Cow::Owned(q5_0_as_q8_0(bytes)),
            &candle_core::Device::Cpu,
            GgmlDType::Q8_0,
        )
        .ok()?;
        let q8 = Arc::new(QTensor::new(storage, (rows, cols)).ok()?);
        Self::with_scheme(&q8, isa, int8)
    }

    fn build(
        dtype: GgmlDType,
        rows: usize,
        cols: usize,
        bytes: &[u8],
        isa: Isa,
        int8: bool,
        in_place: impl FnOnce() -> Blocks,
    ) -> Option<Self> {
        if !isa.supported() {
            return None;
        }
        let (kind, row_bytes) = block_shape(dtype, rows, cols, bytes.len())?;
        let nb = cols / kind.block_elems();
        let blocks = match tiling(kind, isa, int8) {
            Some(int8_tiles) => {
                let mut t = zeroed_huge(tiled_bytes(rows, row_bytes, int8_tiles));
                tile_into(kind, int8_tiles, bytes, rows, nb, &mut t);
                let t = Arc::new(t);
                if int8_tiles {
                    Blocks::Int8(t)
                } else {
                    Blocks::Tiled(t)
                }
            }
            None => in_place(),
        };
        let kint8 = matches!(blocks, Blocks::Ggml(_) | Blocks::Mapped(_))
            && (kind.is_kquant() || kind == Kind::Q8_0)
            && int8
            && int8_supported(isa, kind);
        Some(QMatrix {
            kind,
            dtype,
            rows,
            cols,
            row_bytes,
            isa,
            blocks,
            row0: 0,
            kint8,
        })
    }

    /// The rows of several matrices as one (for one pass over, e.g., the q, k and
    /// v projections), and each part as a view of it: the blocks are stored once.
    /// Matrices used where they lie (K-quants, Q8_0) are joined, not copied.
    /// `None` unless all are tiled alike with row counts that are multiples of
    /// the tile's, or all used where they lie alike.
    pub fn concat(parts: &[&QMatrix]) -> Option<(QMatrix, Vec<QMatrix>)> {
        let first = parts.first()?;
        // Used where they lie: joined, nothing copied.
        let in_place = |m: &QMatrix| matches!(m.blocks, Blocks::Ggml(_) | Blocks::Mapped(_));
        if parts.iter().all(|p| in_place(p)) {
            let shape = |m: &QMatrix| (m.kind, m.cols, m.row_bytes, m.isa, m.kint8);
            if !parts.iter().all(|p| shape(p) == shape(first)) {
                return None;
            }
            let views: Vec<QMatrix> = parts.iter().map(|p| (*p).clone()).collect();
            let whole = QMatrix {
                rows: parts.iter().map(|p| p.rows).sum(),
                blocks: Blocks::Joined(Arc::new(views.clone())),
                row0: 0,
                ..(*first).clone()
            };
            return Some((whole, views));
        }
        let int8 = matches!(first.blocks, Blocks::Int8(_));
        let tile = if int8 { Q } else { R };
        // Consecutive views of one buffer (`from_mapped_parts`): already one.
        let buffer = |m: &QMatrix| match &m.blocks {
            Blocks::Tiled(t) | Blocks::Int8(t) => Some(Arc::as_ptr(t)),
            _ => None,
        };
        let adjacent = parts.windows(2).all(|w| {
            buffer(w[0]).is_some()
                && buffer(w[0]) == buffer(w[1])
                && w[0].row0 + w[0].rows == w[1].row0
                && (w[0].kind, w[0].cols, w[0].isa) == (w[1].kind, w[1].cols, w[1].isa)
        });
        if adjacent && buffer(first).is_some() {
            let rows = parts.iter().map(|p| p.rows).sum();
            let whole = QMatrix {
                rows,
                ..(*first).clone()
            };
            return Some((whole, parts.iter().map(|p| (*p).clone()).collect()));
        }
        let mut data = zeroed_huge(parts.iter().map(|p| p.rows * p.row_bytes).sum());
        let mut at = 0;
        for p in parts {
            let t = match &p.blocks {
                Blocks::Tiled(t) if !int8 => t,
                Blocks::Int8(t) if int8 => t,
                _ => return None,
            };
            let same = p.kind == first.kind && p.cols == first.cols && p.isa == first.isa;
            if !same || !p.rows.is_multiple_of(tile) {
                return None;
            }
            let part = &t[p.row0 * p.row_bytes..(p.row0 + p.rows) * p.row_bytes];
            data[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        let data = Arc::new(data);
        let blocks = if int8 { Blocks::Int8(data) } else { Blocks::Tiled(data) };
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
            Blocks::Joined(parts) => {
                let mut r = r;
                for p in parts.iter() {
                    if r < p.rows {
                        return p.dequantize_row(r, dst);
                    }
                    r -= p.rows;
                }
            }
            Blocks::Ggml(_) | Blocks::Mapped(_) => {
                let rb = self.row_bytes;
                scalar::dequant_row(self.kind, &self.ggml_bytes()[r * rb..(r + 1) * rb], dst)
            }
            Blocks::Tiled(t) => {
                let (row, tb) = (self.row0 + r, R * self.row_bytes);
                let mut blocks = Vec::new();
                untile_row(self.kind, &t[row / R * tb..][..tb], row % R, nb, &mut blocks);
                scalar::dequant_row(self.kind, &blocks, dst)
            }
            Blocks::Int8(t) => {
                let (row, tb) = (self.row0 + r, Q * self.row_bytes);
                let mut blocks = Vec::new();
                int8_untile_row(self.kind, &t[row / Q * tb..][..tb], row % Q, nb, &mut blocks);
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

    /// Whether products round the activations to 8 bits (the int8 scheme).
    pub fn int8(&self) -> bool {
        matches!(self.blocks, Blocks::Int8(_)) || self.kint8
    }

    /// Q8_0 in ggml's layout on the AVX-512 path, multiplied where it lies
    /// (see `tiling`).
    fn q8_in_place(&self) -> bool {
        self.kind == Kind::Q8_0 && self.isa == Isa::Avx512 && matches!(self.blocks, Blocks::Ggml(_) | Blocks::Mapped(_))
    }

    /// The path `matmul` uses.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// The ggml rows of an untiled matrix.
    fn ggml_bytes(&self) -> &[u8] {
        let all = match &self.blocks {
            Blocks::Ggml(tensor) => match tensor.data() {
                Ok(Cow::Borrowed(b)) => b,
                // `with_scheme` checked that this CPU tensor lends its bytes.
                _ => unreachable!("CPU QTensor storage is borrowed"),
            },
            Blocks::Mapped(m) => m.bytes(),
            _ => unreachable!("ggml_bytes of a tiled or joined matrix"),
        };
        &all[self.row0 * self.row_bytes..(self.row0 + self.rows) * self.row_bytes]
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
        // The matrices whose rows these are (this one, or the parts of a
        // joined matrix: all alike, see `concat`).
        let parts: &[QMatrix] = match &self.blocks {
            Blocks::Joined(parts) => parts,
            _ => std::slice::from_ref(self),
        };
        let first = &parts[0];
        let q8_in_place = first.q8_in_place();
        let int8 = matches!(first.blocks, Blocks::Int8(_)) || (first.kint8 && q8_in_place);
        let mut chunk_rows = rows_per_task
            .unwrap_or_else(|| self.rows_per_task(n, team.threads()))
            .max(1)
            .next_multiple_of(if int8 { Q } else { R });
        let kquant = first.kint8 && !q8_in_place;
        if kquant {
            chunk_rows = chunk_rows.next_multiple_of(if n >= KTILE_MIN_N { Q } else { R });
        }
        // Each task: (matrix, its first output row, first row in it, rows).
        let mut tasks: Vec<(&QMatrix, usize, usize, usize)> =
            Vec::with_capacity(rows.div_ceil(chunk_rows) + parts.len());
        let mut at = 0;
        for m in parts {
            tasks.extend(
                (0..m.rows)
                    .step_by(chunk_rows)
                    .map(|r0| (m, at, r0, chunk_rows.min(m.rows - r0))),
            );
            at += m.rows;
        }
        let dst = SharedOut(out.as_mut_ptr());
        if kquant {
            return INT8K.with_borrow_mut(|xq| {
                xq.fill(first.kind, x, cols, team);
                team.run(tasks.len(), &|c| {
                    let (m, at, r0, nr) = tasks[c];
                    m.kint8_rows_task(r0, nr, xq, n, &mut |t, i, v| {
                        // SAFETY: as below.
                        unsafe { *dst.at(t * rows + at + r0 + i) = v }
                    });
                });
            });
        }
        if int8 {
            let xq = Int8Rows::new(first.kind, x, cols);
            team.run(tasks.len(), &|c| {
                let (m, at, r0, nr) = tasks[c];
                m.int8_rows_task(r0, nr, &xq, n, &mut |t, i, v| {
                    // SAFETY: as below (`v` fits: `i + v.len() ≤ nr`).
                    unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), dst.at(t * rows + at + r0 + i), v.len()) }
                });
            });
            return;
        }
        // Decode products read each activation vector once per weight row: from
        // a cache line (see `Aligned`), copied there if the caller's buffer is
        // not on one (a prompt's products load them once per panel: no copy).
        let fused = first.isa == Isa::Avx512
            && n <= FUSED_TILED_MAX_N
            && (matches!(first.blocks, Blocks::Tiled(_)) || q8_in_place);
        if fused && !(x.as_ptr() as usize).is_multiple_of(aligned::LINE) {
            return ALIGNED_X.with_borrow_mut(|buf| {
                if buf.len() < x.len() {
                    *buf = Aligned::zeros(x.len());
                }
                buf[..x.len()].copy_from_slice(x);
                self.matmul_with(&buf[..x.len()], n, out, rows_per_task)
            });
        }
        // Prompts on AVX-512: the activations transposed once for the panel
        // kernel (`outer_512`), shared by every task; the buffer is the calling
        // thread's, kept between products (a fresh one cost page faults).
        TRANSPOSED.with_borrow_mut(|buf| {
            let outer = first.isa == Isa::Avx512 && n >= OUTER_MIN_N;
            if outer {
                transpose_blocks(x, n, cols, buf);
            }
            let xt = outer.then_some((&buf[..], OUTER_T));
            team.run(tasks.len(), &|c| {
                let (m, at, r0, nr) = tasks[c];
                SCRATCH.with(|s| {
                    // SAFETY: element (0, at + r0) of `out`; see the closure below.
                    let task_out = SharedOut(unsafe { dst.at(at + r0) });
                    m.rows_task(
                        r0,
                        nr,
                        x,
                        xt,
                        n,
                        &mut s.borrow_mut(),
                        &task_out,
                        rows,
                        &mut |t, i, v| {
                            // SAFETY: `out` is `[n, rows]` and outlives the loop; each
                            // output row belongs to exactly one task, so no two tasks
                            // write the same element.
                            unsafe { *dst.at(t * rows + at + r0 + i) = v }
                        },
                    )
                });
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

    /// The int8 scheme's `rows_task` for K-quants in ggml's layout: rows `r0 ..
    /// r0 + nrows`: decode-sized products up to 64 weight rows and eight
    /// activation rows per kernel call, prompt-sized ones 16-row tiles;
    /// `put(t, i, v)` receives row `r0 + i` of activation row `t`.
    fn kint8_rows_task<P: FnMut(usize, usize, f32)>(
        &self,
        r0: usize,
        nrows: usize,
        xq: &Int8KRows,
        n: usize,
        put: &mut P,
    ) {
        #[cfg(target_arch = "x86_64")]
        {
            let (cols, rb) = (self.cols, self.row_bytes);
            let nb = cols / 256;
            let bytes = self.ggml_bytes();
            let row256 = kquant_256(self.isa);
            if n >= KTILE_MIN_N && !row256 {
                // Prompts: 16 rows at a time repacked into an int8 tile (in L2),
                // then every group of eight activation rows meets it.
                let kq = match self.kind {
                    Kind::Q4K => x86::KQ4,
                    Kind::Q5K => x86::KQ5,
                    _ => x86::KQ6,
                };
                let tb = nb * x86::ktile_block_bytes(kq);
                return KTILE.with_borrow_mut(|tile| {
                    tile.resize(tb, 0);
                    for rt in (0..nrows).step_by(Q) {
                        let nr = Q.min(nrows - rt);
                        let rows = &bytes[(r0 + rt) * rb..(r0 + rt + nr) * rb];
                        // SAFETY (both): as below.
                        unsafe {
                            match kq {
                                x86::KQ4 => x86::kq_tile_512::<{ x86::KQ4 }>(rows, rb, nr, nb, tile),
                                x86::KQ5 => x86::kq_tile_512::<{ x86::KQ5 }>(rows, rb, nr, nb, tile),
                                _ => x86::kq_tile_512::<{ x86::KQ6 }>(rows, rb, nr, nb, tile),
                            }
                        }
                        // Prompts: the next tile's weights, fetched from memory
                        // while this one meets the first eight activation rows.
                        // A batch of eight (one group) gains on AMD's Zen 4 (8B,
                        // 18.1–18.5 → 20.0–20.9 tokens/s) and lost on the Intel
                        // Xeon (15.7 → 13.9: the prefetches held the fill
                        // buffers the products' tile reads from L2 needed).
                        let next = (rt + Q).min(nrows);
                        let ahead: &[u8] = if n > FUSED_MAX_N || (n >= KTILE_MIN_N && amd_cpu()) {
                            &bytes[(r0 + next) * rb..(r0 + (next + Q).min(nrows)) * rb]
                        } else {
                            &[]
                        };
                        for t0 in (0..n).step_by(FUSED_MAX_N) {
                            let tn = FUSED_MAX_N.min(n - t0);
                            let ahead = if t0 == 0 { ahead } else { &[] };
                            let (q, d, xs) = (&xq.q[t0 * xq.stride..], &xq.d[t0 * nb..], &xq.sums[16 * t0 * nb..]);
                            let mut res = [[0f32; Q]; FUSED_MAX_N];
                            macro_rules! go {
                                ($($t:literal)*) => {
                                    match (kq, tn) {
                                        $((x86::KQ4, $t) => {
                                            let o: &mut [[f32; Q]; $t] = (&mut res[..$t]).try_into().unwrap();
                                            unsafe { x86::int8_ktile_512::<{ x86::KQ4 }, $t>(tile, nb, q, xq.stride, d, xs, ahead, o) }
                                        })*
                                        $((x86::KQ5, $t) => {
                                            let o: &mut [[f32; Q]; $t] = (&mut res[..$t]).try_into().unwrap();
                                            unsafe { x86::int8_ktile_512::<{ x86::KQ5 }, $t>(tile, nb, q, xq.stride, d, xs, ahead, o) }
                                        })*
                                        $((_, $t) => {
                                            let o: &mut [[f32; Q]; $t] = (&mut res[..$t]).try_into().unwrap();
                                            unsafe { x86::int8_ktile_512::<{ x86::KQ6 }, $t>(tile, nb, q, xq.stride, d, xs, ahead, o) }
                                        })*
                                        _ => unreachable!("{tn} activation rows"),
                                    }
                                };
                            }
                            go!(1 2 3 4 5 6 7 8);
                            for (j, res) in res[..tn].iter().enumerate() {
                                for (i, &v) in res[..nr].iter().enumerate() {
                                    put(t0 + j, rt + i, v);
                                }
                            }
                        }
                    }
                });
            }
            // Activation rows outside: a group of eight stays in L1 while the
            // task's weight rows (in L2 after the first group) pass by; the
            // kernel takes up to `G` weight rows per call.
            const G: usize = 64;
            let mut res = [0f32; G * FUSED_MAX_N];
            for t0 in (0..n).step_by(FUSED_MAX_N) {
                let tn = FUSED_MAX_N.min(n - t0);
                let (q, d, s) = (&xq.q[t0 * xq.stride..], &xq.d[t0 * nb..], &xq.sums[16 * t0 * nb..]);
                for i0 in (0..nrows).step_by(G) {
                    let m = G.min(nrows - i0);
                    let rows = &bytes[(r0 + i0) * rb..(r0 + i0 + m) * rb];
                    macro_rules! go {
                        ($kq:expr, $($t:literal)*) => {{
                            match tn {
                                $($t => {
                                    // SAFETY: `kint8` is set only where the CPU has
                                    // AVX-512 VNNI, or AVX2 (`int8_supported`; every
                                    // AVX-512 CPU has it) where `kquant_256` picks
                                    // the 256-bit kernel; the kernels check their
                                    // slice lengths.
                                    unsafe {
                                        if row256 {
                                            x86::int8_kquant_256::<{ $kq }, $t>(rows, rb, m, q, d, s, cols, xq.stride, &mut res)
                                        } else {
                                            x86::int8_kquant_512::<{ $kq }, $t>(rows, rb, m, q, d, s, cols, xq.stride, &mut res)
                                        }
                                    }
                                })*
                                _ => unreachable!("{tn} activation rows"),
                            }
                        }};
                    }
                    match self.kind {
                        Kind::Q4K => go!(x86::KQ4, 1 2 3 4 5 6 7 8),
                        Kind::Q5K => go!(x86::KQ5, 1 2 3 4 5 6 7 8),
                        _ => go!(x86::KQ6, 1 2 3 4 5 6 7 8),
                    }
                    for i in 0..m {
                        for t in 0..tn {
                            put(t0 + t, i0 + i, res[i * tn + t]);
                        }
                    }
                }
            }
            return;
        }
        #[allow(unreachable_code)]
        {
            let _ = (r0, nrows, xq, n, put);
            unreachable!("kint8_rows_task without AVX2")
        }
    }

    /// The int8 scheme's `rows_task` for Q4_0 / Q4_1 tiles and Q8_0 in place:
    /// rows `r0 .. r0 + nrows` (`r0` a multiple of `Q`), activation rows 8 at a
    /// time; `put(t, i, v)` receives rows `r0 + i ..` of activation row `t`.
    fn int8_rows_task<P: FnMut(usize, usize, &[f32])>(
        &self,
        r0: usize,
        nrows: usize,
        xq: &Int8Rows,
        n: usize,
        put: &mut P,
    ) {
        // Q8_0 in place, fewer than `KTILE_MIN_N` activation rows (decode): row
        // by row where the rows lie, up to `G` rows per kernel call.
        #[cfg(target_arch = "x86_64")]
        if self.q8_in_place() && n < KTILE_MIN_N {
            const G: usize = 64;
            let (cols, rb) = (self.cols, self.row_bytes);
            let bytes = self.ggml_bytes();
            let mut res = [0f32; G * KTILE_MIN_N];
            for i0 in (0..nrows).step_by(G) {
                let m = G.min(nrows - i0);
                let rows = &bytes[(r0 + i0) * rb..(r0 + i0 + m) * rb];
                macro_rules! go {
                    ($($t:literal)*) => {
                        match n {
                            // SAFETY: Q8_0 uses the int8 scheme only where the CPU
                            // has AVX-512 VNNI (`int8_supported`); the kernel
                            // checks its slice lengths.
                            $($t => unsafe { x86::int8_q8_rows_512::<$t>(rows, rb, m, &xq.q, &xq.d, cols, &mut res) },)*
                            _ => unreachable!("{n} activation rows"),
                        }
                    };
                }
                go!(1 2 3 4 5 6 7);
                for i in 0..m {
                    for t in 0..n {
                        put(t, i0 + i, &res[i * n + t..][..1]);
                    }
                }
            }
            return;
        }
        // Q8_0 in place, one group of activation rows (a batch of 8): each
        // 16-row tile transposed in registers and used at once (the same bits
        // as through a repacked tile, which would be read once).
        #[cfg(target_arch = "x86_64")]
        if self.q8_in_place() && n <= FUSED_MAX_N {
            let (cols, nb, rb) = (self.cols, self.cols / 32, self.row_bytes);
            let bytes = self.ggml_bytes();
            for rt in (0..nrows).step_by(Q) {
                let nr = Q.min(nrows - rt);
                let rows = &bytes[(r0 + rt) * rb..(r0 + rt + nr) * rb];
                let mut res = [[0f32; Q]; FUSED_MAX_N];
                macro_rules! go {
                    ($($t:literal)*) => {
                        match n {
                            $($t => {
                                let o: &mut [[f32; Q]; $t] = (&mut res[..$t]).try_into().unwrap();
                                // SAFETY: Q8_0 uses the int8 scheme only where the CPU
                                // has AVX-512 VNNI (`int8_supported`); the kernel
                                // checks its slice lengths.
                                unsafe { x86::int8_q8_rows_tile_512::<$t>(rows, rb, nr, nb, &xq.q, cols, &xq.d, o) }
                            })*
                            _ => unreachable!("{n} activation rows"),
                        }
                    };
                }
                go!(1 2 3 4 5 6 7 8);
                for (t, res) in res[..n].iter().enumerate() {
                    put(t, rt, &res[..nr]);
                }
            }
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if matches!(self.blocks, Blocks::Int8(_)) || self.q8_in_place() {
            assert!(r0.is_multiple_of(Q) && r0 + nrows <= self.rows);
            let (cols, nb) = (self.cols, self.cols / 32);
            let tb = Q * self.row_bytes;
            let q41 = self.kind == Kind::Q4_1;
            let q8 = self.kind == Kind::Q8_0;
            // Q8_0 in place: each tile repacked into this thread's buffer (in
            // L2; the K-quants' tile buffer, free here: the two paths never nest).
            let mut repacked = KTILE.take();
            for rt in (0..nrows).step_by(Q) {
                let tile: &[u8] = match &self.blocks {
                    Blocks::Int8(data) => &data[(self.row0 + r0 + rt) / Q * tb..][..tb],
                    _ => {
                        let (rb, nr) = (self.row_bytes, Q.min(nrows - rt));
                        repacked.resize(tb, 0);
                        let rows = &self.ggml_bytes()[(r0 + rt) * rb..(r0 + rt + nr) * rb];
                        // SAFETY: Q8_0 uses the int8 scheme only where the CPU has
                        // AVX-512 VNNI (`int8_supported`); the function checks lengths.
                        unsafe { x86::q8_tile_512(rows, rb, nr, nb, &mut repacked) };
                        &repacked
                    }
                };
                for t0 in (0..n).step_by(FUSED_MAX_N) {
                    let tn = FUSED_MAX_N.min(n - t0);
                    let (q, d) = (&xq.q[t0 * cols..], &xq.d[4 * t0 * nb..]);
                    let (i, s) = (&xq.init[4 * t0 * nb..], &xq.sum[t0 * nb..]);
                    let mut res = [[0f32; Q]; FUSED_MAX_N];
                    macro_rules! go {
                        ($($t:literal)*) => {
                            match (q41, tn) {
                                $((false, $t) if q8 => {
                                    let o: &mut [[f32; Q]; $t] = (&mut res[..$t]).try_into().unwrap();
                                    // SAFETY: as below.
                                    unsafe { x86::int8_q8_tile_512::<$t>(tile, nb, q, cols, d, o) }
                                })*
                                $((true, $t) => {
                                    let o: &mut [[f32; Q]; $t] = (&mut res[..$t]).try_into().unwrap();
                                    // SAFETY: int8 matrices exist only where the CPU
                                    // has AVX-512 VNNI (`int8_supported`); the kernel
                                    // checks its slice lengths.
                                    unsafe { x86::int8_tile_512::<true, $t>(tile, nb, q, cols, d, i, s, o) }
                                })*
                                $((false, $t) => {
                                    let o: &mut [[f32; Q]; $t] = (&mut res[..$t]).try_into().unwrap();
                                    // SAFETY: as above.
                                    unsafe { x86::int8_tile_512::<false, $t>(tile, nb, q, cols, d, i, s, o) }
                                })*
                                _ => unreachable!("int8 kernel for {tn} rows"),
                            }
                        };
                    }
                    go!(1 2 3 4 5 6 7 8);
                    for (j, res) in res[..tn].iter().enumerate() {
                        put(t0 + j, rt, &res[..Q.min(nrows - rt)]);
                    }
                }
            }
            KTILE.set(repacked);
            return;
        }
        let _ = (r0, nrows, xq, n, put);
        unreachable!("int8_rows_task on a matrix without the int8 layout")
    }

    /// Output rows `r0 .. r0 + nrows` (`r0` a multiple of `R`) for all `n`
    /// activation rows: `put(t, i, v)` receives row `r0 + i` of activation row `t`,
    /// except where the fused kernel stores its results itself, at
    /// `out[t * out_rows + i]` (`out` at element (0, r0) of the `[n, out_rows]`
    /// result, writable there for this task alone).
    #[allow(clippy::too_many_arguments)]
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    fn rows_task<P: FnMut(usize, usize, f32)>(
        &self,
        r0: usize,
        nrows: usize,
        x: &[f32],
        xt: Option<(&[f32], usize)>,
        n: usize,
        s: &mut Scratch,
        out: &SharedOut,
        out_rows: usize,
        put: &mut P,
    ) {
        assert!(r0.is_multiple_of(R) && r0 + nrows <= self.rows);
        let (isa, cols, rb) = (self.isa, self.cols, self.row_bytes);
        let tmax = isa.tile_t();
        let panel = (PANEL_BYTES / (4 * cols)).clamp(R, 64) / R * R;
        // Q8_0 in place, decode-sized n: the fused kernel with each block read
        // where it lies (`x86::fused_q8_rows_512`).
        #[cfg(target_arch = "x86_64")]
        let in_place = self.q8_in_place() && n <= FUSED_TILED_MAX_N;
        #[cfg(target_arch = "x86_64")]
        if let (true, Some(k)) = (
            matches!(self.blocks, Blocks::Tiled(_)) || in_place,
            tiled_kind(self.kind),
        ) {
            let nb = cols / 32;
            let tb = R * rb;
            let data: &[u8] = match &self.blocks {
                Blocks::Tiled(data) => data,
                _ => self.ggml_bytes(),
            };
            let tile = |row: usize| &data[(self.row0 + row) / R * tb..][..tb];
            let nscales = nb * R * x86::tile_nscales(k);
            // Activation rows per pass: all 8 (two passes of two weight rows each)
            // while they fit in L1 beside the tile; else two passes of four rows
            // each over all four weight rows, so each pass reads half of them (for
            // 1536 columns: 24 KiB instead of 48 KiB per pass, -14% time).
            let g = if FUSED_MAX_N * cols * 4 <= FUSED_X_L1_BYTES {
                FUSED_MAX_N
            } else {
                FUSED_MAX_N / 2
            };
            if n <= FUSED_TILED_MAX_N {
                for rt in (0..nrows).step_by(R) {
                    let nr = R.min(nrows - rt);
                    let t = if in_place { &[][..] } else { tile(r0 + rt) };
                    // SAFETY (all four): tiled or in-place Q8_0 matrices reach
                    // here only on the AVX-512 path (`with_isa` checks the CPU);
                    // the kernels check slice lengths.
                    // In place, one pass (n ≤ 4): the kernel converts each scale.
                    let one_pass = n <= 4;
                    if in_place && !one_pass {
                        let rows = &data[(r0 + rt) * rb..(r0 + rt + nr) * rb];
                        unsafe { x86::q8_scales_512(rows, rb, nr, nb, &mut s.scales) };
                    } else if !in_place {
                        unsafe { x86::tile_scales_512(t, nscales, &mut s.scales) };
                    }
                    let scales = if in_place && one_pass { &[][..] } else { &s.scales[..] };
                    // Up to 8 activation rows per pass; the tile stays in L1
                    // between passes.
                    for t0 in (0..n).step_by(g) {
                        let tn = g.min(n - t0);
                        let xs = &x[t0 * cols..(t0 + tn) * cols];
                        // SAFETY: the caller vouches for `dst` (`tn` rows of
                        // `stride`, this task's alone).
                        let call = |dst: *mut f32, stride: usize| unsafe {
                            if in_place {
                                // `data` is this matrix's ggml rows.
                                let rows = &data[(r0 + rt) * rb..(r0 + rt + nr) * rb];
                                fused_q8_rows(rows, rb, nr, scales, xs, cols, tn, 2 * tb, dst, stride)
                            } else {
                                // Prefetch two tiles ahead (measured best of one to four).
                                fused(k, t, scales, xs, cols, tn, 2 * tb, dst, stride)
                            }
                        };
                        if nr == R {
                            // `out` covers rows `rt .. rt + R` of this task for
                            // activation rows `t0 .. t0 + tn` (`out_rows` apart).
                            call(unsafe { out.at(t0 * out_rows + rt) }, out_rows);
                        } else {
                            // A last, partial tile: through a buffer.
                            let mut buf = [0f32; FUSED_MAX_N * R];
                            call(buf.as_mut_ptr(), R);
                            for j in 0..tn {
                                for i in 0..nr {
                                    put(t0 + j, rt + i, buf[j * R + i]);
                                }
                            }
                        }
                    }
                }
                return;
            }
            // Larger n: dequantize a panel of tiles, then the f32 micro-kernel.
            s.w.resize(panel.next_multiple_of(OUTER_ROWS) * cols);
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
                panel_products(isa, &s.w, p0, np, x, xt, n, cols, tmax, put);
            }
            return;
        }
        // K-quants in ggml's layout on AVX-512, decode-sized n: dequantized in
        // registers and used at once (`fused_kquant_512`), `R` weight rows and up
        // to 4 activation rows at a time (16 accumulators).
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Avx512 && n <= FUSED_TILED_MAX_N && self.kind.is_kquant() {
            let bytes = self.ggml_bytes();
            let row = |i: usize| &bytes[(r0 + i) * rb..(r0 + i + 1) * rb];
            for i in (0..nrows).step_by(R) {
                let nr = R.min(nrows - i);
                for t0 in (0..n).step_by(4) {
                    let tn = 4.min(n - t0);
                    let xs = &x[t0 * cols..(t0 + tn) * cols];
                    macro_rules! go {
                        ($rr:literal, $($t:literal)*) => {{
                            let rows: [&[u8]; $rr] = std::array::from_fn(|j| row(i + j));
                            match tn {
                                $($t => {
                                    // SAFETY: the AVX-512 path exists only where the CPU
                                    // has it (`with_isa`); the kernel checks lengths.
                                    let res = unsafe { x86::fused_kquant_512::<$rr, $t>(self.kind, &rows, xs, cols) };
                                    for (j, res) in res.iter().enumerate() {
                                        for (t, &v) in res.iter().enumerate() {
                                            put(t0 + t, i + j, v);
                                        }
                                    }
                                })*
                                _ => unreachable!("{tn} activation rows"),
                            }
                        }};
                    }
                    match nr {
                        4 => go!(4, 1 2 3 4),
                        3 => go!(3, 1 2 3 4),
                        2 => go!(2, 1 2 3 4),
                        _ => go!(1, 1 2 3 4),
                    }
                }
            }
            return;
        }
        // ggml rows: dequantize a panel of rows (≤ 128 KiB of f32, stays in L2)
        // once; then each tile of activation rows (in L1) meets every `R`-row
        // tile of it.
        let bytes = self.ggml_bytes();
        s.w.resize(panel.next_multiple_of(OUTER_ROWS) * cols);
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
            panel_products(isa, &s.w, p0, np, x, xt, n, cols, tmax, put);
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
struct SharedOut<T = f32>(*mut T);

// SAFETY: tasks write disjoint elements (see `matmul_with`) while the caller
// waits for them.
unsafe impl<T> Sync for SharedOut<T> {}

impl<T> SharedOut<T> {
    /// # Safety
    /// `i` must be in bounds of the buffer, and no other thread may touch it.
    unsafe fn at(&self, i: usize) -> *mut T {
        self.0.add(i)
    }
}

thread_local! {
    /// A prompt product's int8 K-quant tile (`x86::kq_tile_512`).
    static KTILE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The calling thread's rounded activations for int8 K-quant products.
    static INT8K: std::cell::RefCell<Int8KRows> = std::cell::RefCell::default();
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
    /// The transposed activations of `matmul_with`'s caller (`transpose_blocks`).
    static TRANSPOSED: std::cell::RefCell<Aligned<f32>> = std::cell::RefCell::new(Aligned::default());
    /// A decode product's activations, where the caller's are not on a cache line.
    static ALIGNED_X: std::cell::RefCell<Aligned<f32>> = std::cell::RefCell::new(Aligned::default());
}

/// From this many activation rows on, int8 K-quant products repack their
/// weights into tiles (`x86::int8_ktile_512`): prompts, and decode steps of 8
/// sequences or more. With the repack's scales decoded 16 rows at a time, 8
/// rows are faster tiled (8B shapes, one thread: 14336 × 4096 Q4_K 6.4–6.6
/// against 7.3–7.4 ms; 16 rows 8.9 against 14.9), 4 are not (5.1–5.6 against
/// 4.1–4.5).
const KTILE_MIN_N: usize = 8;

/// From this many activation rows on, AVX-512 panels go through `outer_512`.
const OUTER_MIN_N: usize = 16;

/// Panel rows per `outer_512` call.
const OUTER_ROWS: usize = 8;

/// Activation rows per `outer_512` call.
const OUTER_T: usize = 48;

/// `x` (`[n, cols]`) into `xt` in blocks of `OUTER_T` rows, each block
/// transposed (`[cols, OUTER_T]`), so a kernel call streams one block
/// sequentially; blocks in parallel. The last block's lanes past `n` keep what
/// the buffer held (finite values from an earlier product, or zeros): lanes are
/// independent in `outer_512`, and their results are dropped.
fn transpose_blocks(x: &[f32], n: usize, cols: usize, xt: &mut Aligned<f32>) {
    let (blocks, bl) = (n.div_ceil(OUTER_T), cols * OUTER_T);
    if xt.len() < blocks * bl {
        xt.resize(blocks * bl);
    }
    let dst = SharedOut(xt.as_mut_ptr());
    Team::global().run(blocks, &|b| {
        // SAFETY: task `b` alone writes block `b` of `xt` (inside it, as
        // resized above), which outlives the loop.
        let out = unsafe { std::slice::from_raw_parts_mut(dst.at(b * bl), bl) };
        let rows = &x[b * OUTER_T * cols..n.min((b + 1) * OUTER_T) * cols];
        for (j, row) in rows.chunks_exact(cols).enumerate() {
            for (k, &v) in row.iter().enumerate() {
                out[k * OUTER_T + j] = v;
            }
        }
    });
}

/// The dot products of a dequantized panel (`np` rows of `w`, output rows
/// `p0 ..`) with every activation row: with the transposed activations `xt`
/// (blocks of `OUTER_T` rows, `transpose_blocks`), by `outer_512`; else `tmax` activation rows per
/// micro-kernel call.
#[allow(clippy::too_many_arguments)]
fn panel_products<P: FnMut(usize, usize, f32)>(
    isa: Isa,
    w: &[f32],
    p0: usize,
    np: usize,
    x: &[f32],
    xt: Option<(&[f32], usize)>,
    n: usize,
    cols: usize,
    tmax: usize,
    put: &mut P,
) {
    #[cfg(target_arch = "x86_64")]
    if let Some((xt, bt)) = xt {
        let mut res = [[0f32; OUTER_T]; OUTER_ROWS];
        for t0 in (0..n).step_by(bt) {
            let tn = bt.min(n - t0);
            let xb = &xt[t0 * cols..(t0 + bt) * cols];
            for rt in (0..np).step_by(OUTER_ROWS) {
                // A partial group reads stale rows past `np` (initialized: the
                // panel holds whole groups); their results are dropped.
                let wr = &w[rt * cols..(rt + OUTER_ROWS) * cols];
                // SAFETY: `xt` exists only on the AVX-512 path (`matmul_with`);
                // the kernel checks its slice lengths.
                unsafe {
                    match tn.div_ceil(16) {
                        1 => x86::outer_512::<1>(wr, cols, xb, &mut res),
                        2 => x86::outer_512::<2>(wr, cols, xb, &mut res),
                        _ => x86::outer_512::<3>(wr, cols, xb, &mut res),
                    }
                }
                // Token by token: each token's rows are adjacent in the output.
                let nr = OUTER_ROWS.min(np - rt);
                for j in 0..tn {
                    for (i, res) in res[..nr].iter().enumerate() {
                        put(t0 + j, p0 + rt + i, res[j]);
                    }
                }
            }
        }
        return;
    }
    let _ = xt;
    let mut t = 0;
    while t < n {
        let tt = tmax.min(n - t);
        let xt = &x[t * cols..(t + tt) * cols];
        for rt in (0..np).step_by(R) {
            // A partial tile reads stale rows past `np` (finite or not, but
            // initialized); their dot products are dropped.
            let nr = R.min(np - rt);
            let res = micro(isa, &w[rt * cols..(rt + R) * cols], xt, cols, tt);
            for j in 0..tt {
                for (i, res) in res[..nr].iter().enumerate() {
                    put(t + j, p0 + rt + i, res[j]);
                }
            }
        }
        t += tt;
    }
}

/// Per-thread buffers of `rows_task`.
#[derive(Default)]
struct Scratch {
    /// A panel of dequantized weight rows (the unfused path), on cache lines.
    w: Aligned<f32>,
    /// A tile's block scales as f32.
    scales: Vec<f32>,
}

/// Up to this many activation rows, Q4_0 / Q4_1 / Q8_0 on AVX-512 use the fused
/// kernel (each block dequantized in registers once for all `n`); beyond it,
/// dequantizing a panel to f32 once and running the f32 micro-kernel over it is
/// cheaper.
const FUSED_MAX_N: usize = 8;
/// The most activation bytes one pass of the fused kernel keeps reading (see
/// `rows_task`): L1 is 32-48 KiB on AVX-512 cores, and the tile streams through too.
const FUSED_X_L1_BYTES: usize = 24 * 1024;

/// Tiled matrices use the fused kernel, 8 activation rows per pass, up to this
/// many rows (a decode step of a full batch); the panel path beyond (prompts).
/// Measured with `vicugna bench --batch 16`: 207 tok/s through the panel path,
/// 249 with fused passes.
const FUSED_TILED_MAX_N: usize = 32;

/// The fused AVX-512 kernel on one tile (`R` rows) for `n ≤ FUSED_MAX_N`
/// activation rows: one pass over the 4 rows for n ≤ 4, two passes of 2 rows (so
/// the accumulators fit in registers) for larger n. Output (t, r) goes to
/// `out[t * stride + r]`.
///
/// # Safety
/// `out` must be valid for writes at `t * stride + r` (`t < n`, `r < R`), and no
/// other thread may touch those elements.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn fused(
    k: u8,
    tile: &[u8],
    sc: &[f32],
    x: &[f32],
    cols: usize,
    n: usize,
    prefetch: usize,
    out: *mut f32,
    stride: usize,
) {
    use x86::{fused_tile_512, FUSED_Q4_0, FUSED_Q4_1, FUSED_Q8_0};
    // SAFETY (all calls): only reached for tiled matrices, which exist only on the
    // AVX-512 path (`QMatrix::with_isa` checks the CPU); the kernel checks its
    // slice lengths, the caller vouches for `out`.
    macro_rules! go {
        ($kk:expr, [$($n:literal)*], [$($m:literal)*]) => {
            match n {
                $($n => unsafe { fused_tile_512::<{ $kk }, R, 0, R, $n>(tile, sc, x, cols, prefetch, out, stride) },)*
                $($m => unsafe {
                    fused_tile_512::<{ $kk }, R, 0, 2, $m>(tile, sc, x, cols, prefetch, out, stride);
                    fused_tile_512::<{ $kk }, R, 2, 2, $m>(tile, sc, x, cols, prefetch, out, stride);
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
}

/// `fused` for `R` consecutive Q8_0 rows in ggml's layout (`nr` of them in
/// `rows`, `rb` bytes apart), read where they lie.
///
/// # Safety
/// As `fused`.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn fused_q8_rows(
    rows: &[u8],
    rb: usize,
    nr: usize,
    sc: &[f32],
    x: &[f32],
    cols: usize,
    n: usize,
    prefetch: usize,
    out: *mut f32,
    stride: usize,
) {
    use x86::fused_q8_rows_512;
    // SAFETY (all calls): as in `fused`.
    macro_rules! go {
        ([$($n:literal)*], [$($m:literal)*]) => {
            match n {
                $($n => unsafe { fused_q8_rows_512::<0, R, $n>(rows, rb, nr, sc, x, cols, prefetch, out, stride) },)*
                $($m => unsafe {
                    fused_q8_rows_512::<0, 2, $m>(rows, rb, nr, sc, x, cols, prefetch, out, stride);
                    fused_q8_rows_512::<2, 2, $m>(rows, rb, nr, sc, x, cols, prefetch, out, stride);
                })*
                _ => unreachable!("fused kernel for {n} rows"),
            }
        };
    }
    go!([1 2 3 4], [5 6 7 8])
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

/// One kv head's cached keys or values, `[positions, head_dim]`, in the cache's
/// element type.
#[derive(Clone, Copy, Debug)]
pub enum KvRows<'a> {
    F32(&'a [f32]),
    F16(&'a [half::f16]),
}

impl KvRows<'_> {
    /// Row `j` (`hd` wide) as f32, into `out`.
    pub fn row_into(&self, j: usize, hd: usize, out: &mut [f32]) {
        match self {
            KvRows::F32(r) => out.copy_from_slice(&r[j * hd..(j + 1) * hd]),
            KvRows::F16(r) => r[j * hd..(j + 1) * hd].convert_to_f32_slice(out),
        }
    }

    /// Position `j`'s key (`hd` wide) as f32, into `out`, from whole blocks in the
    /// key layout (`KEY_BLOCK`).
    pub fn key_into(&self, j: usize, hd: usize, out: &mut [f32]) {
        for (c, o) in out.iter_mut().enumerate().take(hd) {
            let i = key_index(j, c, hd);
            *o = match self {
                KvRows::F32(r) => r[i],
                KvRows::F16(r) => r[i].to_f32(),
            };
        }
    }
}

/// Positions per block of the key layout. Cached keys are stored by blocks of
/// this many positions, each block dimension-major (`hd` rows of `KEY_BLOCK`
/// positions), so decode attention loads one dimension of 16 keys as one vector
/// and sums 16 scores at once instead of reducing 16 dot products horizontally.
/// Values stay position-major (`[positions, hd]`): the weighted sum over
/// positions reads them a row at a time.
pub const KEY_BLOCK: usize = 16;

/// Where dimension `c` of position `p`'s key lies in the key layout (`KEY_BLOCK`).
pub fn key_index(p: usize, c: usize, hd: usize) -> usize {
    (p / KEY_BLOCK * hd + c) * KEY_BLOCK + p % KEY_BLOCK
}

/// Decode attention on AVX-512, when this process uses that path and `hd` is a
/// multiple of 16: `scores[h·len + j] = scale · q_h · k_{first + j}` for the query
/// heads `q` (`[g, hd]`), with `k` whole blocks of the key layout (`KEY_BLOCK`)
/// and `first < KEY_BLOCK` the first position used; each head's row of scores
/// turned into `exp(s − max)` with its max in `maxes[h]` and sum in `sums[h]`, then
/// `out_h = Σ_j scores[h·len + j] · v_j` (`v` position-major from that first
/// position; not yet divided by the sum). Returns false (touching nothing) where
/// it does not apply.
#[allow(clippy::too_many_arguments)]
pub fn attention_simd(
    q: &[f32],
    k: KvRows<'_>,
    first: usize,
    v: KvRows<'_>,
    hd: usize,
    len: usize,
    scale: f32,
    scores: &mut [f32],
    maxes: &mut [f32],
    sums: &mut [f32],
    out: &mut [f32],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if process_isa() == Isa::Avx512 && hd.is_multiple_of(16) && hd > 0 && len > 0 {
        let g = q.len() / hd;
        assert!(scores.len() >= g * len && maxes.len() >= g && sums.len() >= g);
        // SAFETY: the CPU supports the path (`Isa::detect` checked it); the
        // kernels check their slice lengths.
        unsafe {
            match (k, v) {
                (KvRows::F32(k), KvRows::F32(v)) => x86::attention_scores_512(q, k, first, v, hd, len, scale, scores),
                (KvRows::F16(k), KvRows::F16(v)) => x86::attention_scores_512(q, k, first, v, hd, len, scale, scores),
                _ => return false,
            }
            for ((row, max), sum) in scores
                .chunks_exact_mut(len)
                .zip(maxes.iter_mut())
                .zip(sums.iter_mut())
                .take(g)
            {
                *max = x86::max_512(row);
                *sum = x86::exp_shifted_512(row, *max);
            }
            match v {
                KvRows::F32(v) => x86::attention_values_512(scores, v, hd, len, out),
                KvRows::F16(v) => x86::attention_values_512(scores, v, hd, len, out),
            }
        }
        return true;
    }
    let _ = (q, k, first, v, hd, len, scale, scores, maxes, sums, out);
    false
}

/// `out = silu(g) · u` element-wise (a SwiGLU MLP's activation), on AVX-512
/// where this process uses it, else with `f32::exp`.
pub fn silu_mul(g: &[f32], u: &[f32], out: &mut [f32]) {
    assert!(g.len() == out.len() && u.len() == out.len());
    #[cfg(target_arch = "x86_64")]
    if process_isa() == Isa::Avx512 {
        // SAFETY: the CPU supports the path (`Isa::detect` checked it); the
        // function checks its slice lengths.
        unsafe { x86::silu_mul_512(g, u, out) };
        return;
    }
    for ((a, &g), &u) in out.iter_mut().zip(g).zip(u) {
        *a = g / (1.0 + (-g).exp()) * u;
    }
}

/// `out = gelu(g) · u` element-wise with GELU's tanh approximation (gemma's
/// `gelu_pytorch_tanh`), in f32 as torch computes it.
pub fn gelu_tanh_mul(g: &[f32], u: &[f32], out: &mut [f32]) {
    assert!(g.len() == out.len() && u.len() == out.len());
    const C: f32 = 0.797_884_6; // √(2/π)
    for ((a, &g), &u) in out.iter_mut().zip(g).zip(u) {
        *a = 0.5 * g * (1.0 + (C * (g + 0.044715 * g * g * g)).tanh()) * u;
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

    /// Every row of `m`, dequantized by the code its matmul path uses.
    fn path_dequantize(m: &QMatrix) -> Vec<f32> {
        let (rows, cols, rb) = (m.rows, m.cols, m.row_bytes);
        let mut got = vec![0f32; rows.next_multiple_of(R) * cols];
        match &m.blocks {
            Blocks::Ggml(_) | Blocks::Mapped(_) => {
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
            Blocks::Int8(_) | Blocks::Joined(_) => {
                for r in 0..rows {
                    m.dequantize_row(r, &mut got[r * cols..(r + 1) * cols]);
                }
            }
        }
        got.truncate(rows * cols);
        got
    }

    #[test]
    fn mapped_parts_repacked_together_multiply_like_each_alone() {
        // Three matrices' ggml bytes in one mapped file, as a GGUF holds q, k, v.
        // (Q8_0 is not repacked at load: `q8_0_is_multiplied_where_the_file_maps_it`.)
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1] {
            let parts: Vec<Arc<QTensor>> = [32usize, 16, 16]
                .iter()
                .enumerate()
                .map(|(i, &r)| quantized(r, 256, dtype, 7 + i as u64))
                .collect();
            let path = std::env::temp_dir().join(format!("vicugna-mapped-parts-{}-{dtype:?}", std::process::id()));
            let bytes: Vec<Vec<u8>> = parts.iter().map(|q| q.data().unwrap().into_owned()).collect();
            std::fs::write(&path, bytes.concat()).unwrap();
            let file = std::fs::File::open(&path).unwrap();
            // SAFETY: a file this test wrote and nothing else changes.
            let map = Arc::new(unsafe { memmap2::Mmap::map(&file) }.unwrap());
            std::fs::remove_file(&path).unwrap();
            let mut start = 0;
            let blocks: Vec<Arc<MappedBlocks>> = parts
                .iter()
                .zip(&bytes)
                .map(|(q, b)| {
                    let m = MappedBlocks::new(map.clone(), start, b.len(), dtype, q.shape().dims()).unwrap();
                    start += b.len();
                    Arc::new(m)
                })
                .collect();
            let Some(views) = QMatrix::from_mapped_parts(&blocks.iter().collect::<Vec<_>>()) else {
                // Only tiled (AVX-512) matrices are repacked.
                assert_ne!(Isa::detect(), Isa::Avx512);
                continue;
            };
            let x: Vec<f32> = Tensor::randn(0f32, 1.0, (3, 256), &Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let (whole, _) = QMatrix::concat(&views.iter().collect::<Vec<_>>()).unwrap();
            assert_eq!(whole.rows(), 64);
            let mut all = vec![0f32; 3 * 64];
            whole.matmul(&x, 3, &mut all);
            let mut off = 0;
            for (b, v) in blocks.iter().zip(&views) {
                let alone = QMatrix::from_mapped(b).unwrap();
                let (mut a, mut got) = (vec![0f32; 3 * v.rows()], vec![0f32; 3 * v.rows()]);
                alone.matmul(&x, 3, &mut a);
                v.matmul(&x, 3, &mut got);
                assert_eq!(
                    a, got,
                    "{dtype:?}: a part repacked with the others differs from it alone"
                );
                for t in 0..3 {
                    assert_eq!(
                        a[t * v.rows()..(t + 1) * v.rows()],
                        all[t * 64 + off..t * 64 + off + v.rows()]
                    );
                }
                // Looked up where it lies: the same rows as repacked.
                let lookup = QMatrix::from_mapped_for_lookup(b).unwrap();
                let (mut want, mut row) = (vec![0f32; 256], vec![0f32; 256]);
                for r in [0, v.rows() - 1] {
                    alone.dequantize_row(r, &mut want);
                    lookup.dequantize_row(r, &mut row);
                    assert_eq!(want, row, "{dtype:?}: row {r} looked up in the map");
                }
                off += v.rows();
            }
        }
    }

    #[test]
    fn views_of_a_concatenation_multiply_like_their_parts() {
        // Q4_0 / Q4_1 are repacked (tiles copied together on AVX-512); Q8_0 and
        // the K-quants are used where they lie (joined).
        let dev = Device::Cpu;
        let cols = 256;
        for (dtype, int8) in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::Q6K,
        ]
        .into_iter()
        .flat_map(|d| [(d, false), (d, true)])
        {
            // Tiles concatenate whole; joined parts may end mid-tile.
            let sizes = if matches!(dtype, GgmlDType::Q4_0 | GgmlDType::Q4_1) {
                [16usize, 32, 16]
            } else {
                [16, 36, 12]
            };
            let parts: Vec<Arc<QTensor>> = sizes
                .iter()
                .enumerate()
                .map(|(i, &r)| quantized(r, cols, dtype, i as u64))
                .collect();
            let ms: Vec<QMatrix> = parts
                .iter()
                .map(|q| QMatrix::with_scheme(q, Isa::detect(), int8).unwrap())
                .collect();
            let refs: Vec<&QMatrix> = ms.iter().collect();
            let Some((whole, views)) = QMatrix::concat(&refs) else {
                panic!("{dtype:?}: parts alike did not concatenate");
            };
            assert_eq!(whole.rows(), 64);
            assert_eq!(whole.int8(), ms[0].int8());
            let mut row = vec![0f32; cols];
            let mut want = vec![0f32; cols];
            whole.dequantize_row(sizes[0] + sizes[1] + 2, &mut row);
            ms[2].dequantize_row(2, &mut want);
            assert_eq!(row, want, "{dtype:?}: row 2 of the third part, in the whole");
            // Decode, a batch of 8 (int8 tiles), a prompt (panels).
            for n in [3, 8, 40] {
                let x: Vec<f32> = Tensor::randn(0f32, 1.0, (n, cols), &dev)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let mut all = vec![0f32; n * 64];
                whole.matmul(&x, n, &mut all);
                let mut off = 0;
                for (m, v) in ms.iter().zip(&views) {
                    let (mut a, mut b) = (vec![0f32; n * m.rows()], vec![0f32; n * m.rows()]);
                    m.matmul(&x, n, &mut a);
                    v.matmul(&x, n, &mut b);
                    assert_eq!(a, b, "{dtype:?}: a view differs from its part");
                    for t in 0..n {
                        assert_eq!(
                            a[t * m.rows()..(t + 1) * m.rows()],
                            all[t * 64 + off..t * 64 + off + m.rows()],
                            "{dtype:?} int8 {int8}, n {n}: part at {off} inside the whole"
                        );
                    }
                    off += m.rows();
                }
            }
        }
    }

    #[test]
    fn q8_0_is_multiplied_where_the_file_maps_it() {
        let (rows, cols) = (40, 576);
        let q = quantized(rows, cols, GgmlDType::Q8_0, 11);
        let bytes = q.data().unwrap().into_owned();
        let path = std::env::temp_dir().join(format!("vicugna-mapped-q8-{}", std::process::id()));
        std::fs::write(&path, &bytes).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: a file this test wrote and nothing else changes.
        let map = Arc::new(unsafe { memmap2::Mmap::map(&file) }.unwrap());
        std::fs::remove_file(&path).unwrap();
        let blocks = Arc::new(MappedBlocks::new(map.clone(), 0, bytes.len(), GgmlDType::Q8_0, &[rows, cols]).unwrap());
        assert!(
            QMatrix::from_mapped_parts(&[&blocks]).is_none(),
            "Q8_0 parts are not repacked together"
        );
        let isa = Isa::detect();
        for int8 in [false, true] {
            let m = QMatrix::from_mapped_scheme(&blocks, isa, int8).unwrap();
            assert!(
                matches!(m.blocks, Blocks::Mapped(_)),
                "int8 {int8}: Q8_0 copied at load"
            );
            if isa != Isa::Avx512 || (int8 && !m.int8()) {
                continue; // no tiles to compare with on this CPU
            }
            // The same rows repacked at load, as before Q8_0 was read in place:
            // the f32 products keep their bits at every size, the int8 ones
            // from `KTILE_MIN_N` rows (below it the row kernel rounds apart).
            let row_bytes = cols / 32 * 34;
            let mut t = vec![0u8; tiled_bytes(rows, row_bytes, int8)];
            tile_into(Kind::Q8_0, int8, &bytes, rows, cols / 32, &mut t);
            let tiled = QMatrix {
                blocks: if int8 {
                    Blocks::Int8(Arc::new(t))
                } else {
                    Blocks::Tiled(Arc::new(t))
                },
                kint8: false,
                ..m.clone()
            };
            let sizes: &[usize] = if int8 { &[KTILE_MIN_N, 33] } else { &[1, 5, 8, 33] };
            for &n in sizes {
                let x: Vec<f32> = (0..n * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
                let (mut a, mut b) = (vec![0f32; n * rows], vec![0f32; n * rows]);
                m.matmul(&x, n, &mut a);
                tiled.matmul(&x, n, &mut b);
                assert_eq!(
                    a, b,
                    "int8 {int8}, n {n}: Q8_0 in place differs from its load-time tiles"
                );
            }
        }
    }

    /// Rows of Q8_0 repacked per product (`x86::q8_tile_512`) take exactly the
    /// bytes the load-time repack (`int8_tile_rows_into`) gives them.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn q8_0_tiles_repacked_per_product_match_the_int8_layout() {
        if !Isa::available().contains(&Isa::Avx512) {
            return;
        }
        let (rows, nb) = (16 + 11, 5);
        let q = quantized(rows, 32 * nb, GgmlDType::Q8_0, 13);
        let bytes = q.data().unwrap().into_owned();
        let rb = nb * 34;
        let mut want = vec![0u8; 2 * 16 * rb];
        int8_tile_rows_into(Kind::Q8_0, &bytes, rows, nb, &mut want);
        for (t, nr) in [(0, 16), (1, 11)] {
            let mut got = vec![0u8; 16 * rb];
            // SAFETY: the CPU has AVX-512 (checked above).
            unsafe { x86::q8_tile_512(&bytes[16 * t * rb..(16 * t + nr) * rb], rb, nr, nb, &mut got) };
            let want = &want[t * 16 * rb..(t + 1) * 16 * rb];
            for b in 0..nb {
                for r in 0..nr {
                    let (w, g) = (&want[b * 16 * 34..], &got[b * 16 * 34..]);
                    assert_eq!(
                        w[2 * r..2 * r + 2],
                        g[2 * r..2 * r + 2],
                        "tile {t} block {b} row {r}: d"
                    );
                    for gr in 0..8 {
                        let at = int8_at(1, gr, r);
                        assert_eq!(w[at..at + 4], g[at..at + 4], "tile {t} block {b} row {r} group {gr}");
                    }
                }
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
            for (isa, int8) in Isa::available().into_iter().flat_map(|i| [(i, false), (i, true)]) {
                let m = QMatrix::with_scheme(&q, isa, int8).unwrap();
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
            // 544: an odd number of 32-value blocks (the int8 Q8_0 row kernel
            // takes two per vector).
            for cols in [256, 544, 576, 1536] {
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
                    for (isa, want_int8) in Isa::available().into_iter().flat_map(|i| [(i, false), (i, true)]) {
                        let m = QMatrix::with_scheme(&q, isa, want_int8).unwrap();
                        let int8 = m.int8();
                        assert_eq!(
                            int8,
                            want_int8 && int8_supported(isa, m.kind),
                            "{dtype:?} {isa:?}: int8 scheme"
                        );
                        // Values per activation scale: runs of 8, or Q8_K's blocks of 256.
                        let run = if m.kint8 { 256 } else { 8 };
                        for rpt in [None, Some(8), Some(rows)] {
                            let mut got = vec![f32::NAN; n * rows];
                            m.matmul_with(&xs, n, &mut got, rpt);
                            for t in 0..n {
                                let xn = xv[t].iter().map(|v| v * v).sum::<f32>().sqrt();
                                for r in 0..rows {
                                    let wn = wv[r].iter().map(|v| v * v).sum::<f32>().sqrt();
                                    // Rounding x to 8 bits moves each value by at
                                    // most max|x of its run| / 254.
                                    let bound = if int8 {
                                        wv[r]
                                            .chunks(run)
                                            .zip(xv[t].chunks(run))
                                            .map(|(w, x)| {
                                                let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
                                                w.iter().map(|v| v.abs()).sum::<f32>() * amax / 254.0
                                            })
                                            .sum::<f32>()
                                            * 1.001
                                    } else {
                                        0.0
                                    };
                                    let (g, e) = (got[t * rows + r], want[t][r]);
                                    assert!(
                                        (g - e).abs() <= bound + 1e-4 * wn * xn,
                                        "{dtype:?} {isa:?} int8 {int8} cols {cols} n {n} rpt {rpt:?}: [{t},{r}] {g} vs {e}"
                                    );
                                }
                            }
                        }
                    }
                }
                // The tensor entry point, 3-D input: the same numbers as `matmul`.
                let x = Tensor::randn(0f32, 1.0, (2, 3, cols), &dev).unwrap();
                let got = m.forward(&x).unwrap();
                assert_eq!(got.dims(), &[2, 3, rows]);
                let mut want = vec![0f32; 6 * rows];
                m.matmul(&x.flatten_all().unwrap().to_vec1::<f32>().unwrap(), 6, &mut want);
                assert_eq!(
                    got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    want,
                    "{dtype:?}: forward"
                );
            }
        }
    }

    /// The int8 scheme rounds each activation row on its own and computes every
    /// output the same way for any `n`: a row batched with others (a decode step
    /// beside a prompt) gives the bits it gives alone.
    #[test]
    fn int8_rows_do_not_depend_on_their_batch() {
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
        ] {
            let (rows, cols) = (100, if dtype.block_size() == 256 { 512 } else { 576 });
            let q = quantized(rows, cols, dtype, 5);
            for isa in Isa::available() {
                let m = QMatrix::with_scheme(&q, isa, true).unwrap();
                if !m.int8() {
                    continue; // no int8 kernel for this kind on this path
                }
                let what = format!("{dtype:?} {isa:?}");
                // (K-quants on the 256-bit row kernel, `kquant_256`: AVX2, or AVX-512
                // without VNNI; every size, one class.)
                if m.kint8 && !kquant_256(isa) {
                    // K-quants and Q8_0: decode-sized products (row kernel) and prompt-sized
                    // ones (repacked tiles) each give a row the same bits in any
                    // batch of their size; the two kernels round differently.
                    assert_rows_alone_equal_batched(&m, KTILE_MIN_N - 1, &[0, 3, KTILE_MIN_N - 2], &what);
                    assert_runs_equal_batched(&m, 45, &[0, 3, 25], KTILE_MIN_N, &what);
                    continue;
                }
                assert_rows_alone_equal_batched(&m, 21, &[0, 7, 8, 20], &what);
            }
        }
    }

    /// Multiplies `n` random activation rows together, then each row of `rows`
    /// alone, and asserts the same bits.
    fn assert_rows_alone_equal_batched(m: &QMatrix, n: usize, rows: &[usize], what: &str) {
        assert_runs_equal_batched(m, n, rows, 1, what)
    }

    /// Runs of `len` activation rows starting at `starts`, multiplied on their
    /// own, give the same bits as inside a batch of `n`.
    fn assert_runs_equal_batched(m: &QMatrix, n: usize, starts: &[usize], len: usize, what: &str) {
        let (cols, out) = (m.cols(), m.rows());
        let x: Vec<f32> = Tensor::randn(0f32, 1.0, (n, cols), &Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut all = vec![0f32; n * out];
        m.matmul(&x, n, &mut all);
        for &t in starts {
            let mut some = vec![0f32; len * out];
            m.matmul(&x[t * cols..(t + len) * cols], len, &mut some);
            let same = some
                .iter()
                .zip(&all[t * out..])
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same,
                "{what}: rows {t}..{} alone differ from the same rows of {n}",
                t + len
            );
        }
    }

    /// The same for f32 activations up to `FUSED_TILED_MAX_N` rows (decode
    /// steps): with 4-row tiles of any length and either pass shape (8 activation
    /// rows per pass at 576 columns, 4 at 1536), each output has the bits it has
    /// alone, so batching never changes a sequence's greedy tokens.
    #[test]
    fn decode_rows_do_not_depend_on_their_batch() {
        for dtype in TYPES {
            for cols in [576, 1536] {
                if cols % dtype.block_size() != 0 {
                    continue;
                }
                let rows = 75;
                let q = quantized(rows, cols, dtype, 9);
                let m = QMatrix::with_scheme(&q, Isa::detect(), false).unwrap();
                for n in [2, 5, 8, 21] {
                    let all: Vec<usize> = (0..n).collect();
                    assert_rows_alone_equal_batched(&m, n, &all, &format!("{dtype:?} cols {cols}"));
                }
            }
        }
    }

    /// Activations off a cache line (copied onto one for decode products, read in
    /// place for prompts) give the same bits as activations on one.
    #[test]
    fn products_do_not_depend_on_where_the_activations_sit() {
        let (rows, cols) = (40, 576);
        let m = QMatrix::with_scheme(&quantized(rows, cols, GgmlDType::Q4_1, 3), Isa::detect(), false).unwrap();
        for n in [1, 8, 21] {
            let x: Vec<f32> = (0..n * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
            let mut want = vec![0f32; n * rows];
            m.matmul(&Aligned::from_slice(&x), n, &mut want);
            let mut buf = Aligned::<f32>::zeros(n * cols + 16);
            for skew in 1..16 {
                buf[skew..skew + n * cols].copy_from_slice(&x);
                let mut got = vec![0f32; n * rows];
                m.matmul(&buf[skew..skew + n * cols], n, &mut got);
                let same = got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same,
                    "n = {n}: activations {} bytes past a line give other results",
                    4 * skew
                );
            }
        }
    }

    /// Decode attention's AVX-512 path against the formula, for lengths with and
    /// without a partial block of 16 keys, starting at the first position of a
    /// block or inside one (a sliding window), over an f32 and an f16 cache.
    #[test]
    fn attention_simd_matches_the_formula() {
        let (g, hd) = (3, 64);
        let mut rng = 1u64;
        let mut next = || {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((rng >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
        };
        let round16 = |x: f32| half::f16::from_f32(x).to_f32();
        let cases = [
            (0, 1),
            (0, 5),
            (0, 16),
            (0, 37),
            (0, 64),
            (3, 1),
            (5, 11),
            (15, 2),
            (9, 40),
        ];
        for (first, len, f16) in cases.into_iter().flat_map(|(f, l)| [(f, l, false), (f, l, true)]) {
            let q: Vec<f32> = (0..g * hd).map(|_| next()).collect();
            let k: Vec<f32> = (0..len * hd).map(|_| next()).collect();
            let v: Vec<f32> = (0..len * hd).map(|_| next()).collect();
            let scale = 0.125;
            let (mut sc, mut sums, mut out) = (vec![0f32; g * len], vec![0f32; g], vec![0f32; g * hd]);
            let (k, v) = match f16 {
                false => (k, v),
                // The f16 cache: the formula on the rounded values.
                true => (
                    k.iter().map(|&x| round16(x)).collect(),
                    v.iter().map(|&x| round16(x)).collect(),
                ),
            };
            // Keys in the cache's layout, `first` positions into the first block;
            // the other positions of the blocks hold NaN (never read into a score).
            let blocks = (first + len).div_ceil(KEY_BLOCK);
            let mut kb = vec![f32::NAN; blocks * KEY_BLOCK * hd];
            for j in 0..len {
                for c in 0..hd {
                    kb[key_index(first + j, c, hd)] = k[j * hd + c];
                }
            }
            let (k16, v16): (Vec<half::f16>, Vec<half::f16>) = (
                kb.iter().map(|&x| half::f16::from_f32(x)).collect(),
                v.iter().map(|&x| half::f16::from_f32(x)).collect(),
            );
            let (kr, vr) = match f16 {
                false => (KvRows::F32(&kb), KvRows::F32(&v)),
                true => (KvRows::F16(&k16), KvRows::F16(&v16)),
            };
            let mut key = vec![0f32; hd];
            kr.key_into(first + len - 1, hd, &mut key);
            assert_eq!(key, k[(len - 1) * hd..], "key_into");
            let mut maxes = vec![0f32; g];
            if !attention_simd(
                &q, kr, first, vr, hd, len, scale, &mut sc, &mut maxes, &mut sums, &mut out,
            ) {
                return; // no AVX-512 here
            }
            for h in 0..g {
                let s: Vec<f64> = (0..len)
                    .map(|j| (0..hd).map(|c| (q[h * hd + c] * k[j * hd + c]) as f64).sum::<f64>() * scale as f64)
                    .collect();
                let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                assert!(
                    (maxes[h] as f64 - max).abs() < 1e-5 * max.abs().max(1.0),
                    "head {h}: max"
                );
                let p: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
                let sum: f64 = p.iter().sum();
                assert!(
                    ((sums[h] as f64) - sum).abs() < 1e-5 * sum,
                    "first {first} len {len} head {h}: sum {} vs {sum}",
                    sums[h]
                );
                for c in 0..hd {
                    let want: f64 = (0..len).map(|j| p[j] * v[j * hd + c] as f64).sum();
                    let got = out[h * hd + c] as f64;
                    assert!(
                        (got - want).abs() < 1e-4 * sum,
                        "first {first} len {len} head {h} [{c}]: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn silu_mul_matches_the_formula() {
        let g: Vec<f32> = (0..203)
            .map(|i| (i as f32 - 101.0) * 0.37)
            .chain([-100.0, 100.0])
            .collect();
        let u: Vec<f32> = (0..g.len()).map(|i| 1.0 + (i % 7) as f32 * 0.25).collect();
        let mut out = vec![f32::NAN; g.len()];
        silu_mul(&g, &u, &mut out);
        for i in 0..g.len() {
            let want = (g[i] as f64 / (1.0 + (-g[i] as f64).exp()) * u[i] as f64) as f32;
            let tol = 2e-6 * want.abs() + 1e-30;
            assert!(
                (out[i] - want).abs() <= tol,
                "silu({}) · {}: {} vs {want}",
                g[i],
                u[i],
                out[i]
            );
        }
    }

    #[test]
    fn q5_0_runs_as_the_same_values_in_q8_0() {
        let w = Tensor::randn(0f32, 1.0, (40, 256), &Device::Cpu).unwrap();
        let q5 = Arc::new(QTensor::quantize(&w, GgmlDType::Q5_0).unwrap());
        let want = q5.dequantize(&Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
        let Ok(Cow::Borrowed(bytes)) = q5.data() else {
            panic!("borrowed blocks")
        };
        let storage =
            candle_core::quantized::QStorage::from_data(Cow::Owned(q5_0_as_q8_0(bytes)), &Device::Cpu, GgmlDType::Q8_0)
                .unwrap();
        let q8 = QTensor::new(storage, (40, 256)).unwrap();
        let got = q8.dequantize(&Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(got, want, "widening is lossless");
        // The kernels take it, and give the dequantized weights' product.
        let x = Tensor::randn(0f32, 1.0, (3, 256), &Device::Cpu).unwrap();
        let exact = x
            .matmul(&Tensor::new(want, &Device::Cpu).unwrap().t().unwrap())
            .unwrap();
        for isa in Isa::available() {
            let m = QMatrix::with_scheme(&q5, isa, false).unwrap_or_else(|| panic!("{isa:?} refused Q5_0"));
            assert_eq!(m.dtype(), GgmlDType::Q8_0);
            let y = m.forward(&x).unwrap();
            let diff = (y - &exact)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-3, "{isa:?}: {diff}");
        }
    }

    #[test]
    fn unsupported_types_are_refused() {
        let w = Tensor::randn(0f32, 1.0, (4, 256), &Device::Cpu).unwrap();
        for dtype in [
            GgmlDType::F32,
            GgmlDType::F16,
            GgmlDType::Q5_1,
            GgmlDType::Q2K,
            GgmlDType::Q3K,
        ] {
            let q = Arc::new(QTensor::quantize(&w, dtype).unwrap());
            assert!(QMatrix::from_qtensor(&q).is_none(), "{dtype:?}");
        }
        // And candle's path still works for them.
        let q = Arc::new(QTensor::quantize(&w, GgmlDType::Q5_1).unwrap());
        let mm = candle_core::quantized::QMatMul::from_arc(q).unwrap();
        let x = Tensor::ones((1, 256), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(mm.forward(&x).unwrap().dims(), &[1, 4]);
    }
}
