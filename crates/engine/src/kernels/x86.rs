//! AVX-512 and AVX2 versions of the two building blocks in `scalar.rs`: dequantize
//! one row of ggml blocks to f32 (the same arithmetic, so the same bits), and the
//! `R × T` f32 dot-product micro-kernel.
//!
//! Soundness: every function here is `unsafe` for two reasons only, and both are
//! discharged by the callers in `mod.rs` and by the asserts at the top of each
//! function:
//! - it must run on a CPU with the features named in its `target_feature` (the
//!   callers check `is_x86_feature_detected!` first);
//! - it reads and writes through raw pointers; each function asserts the slice
//!   lengths it needs once, and all pointer offsets stay below those lengths.

use std::arch::x86_64::*;

use super::Kind;
use crate::kernels::scalar::scale_min_k4;

#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// The f16 at `p` as f32, by `vcvtph2ps`: no CPU check even in a build
/// without F16C as a compile-time feature, where `half` would check on every
/// call (this workspace enables it, `.cargo/config.toml`). For functions that
/// enable AVX-512 F, which implies F16C.
#[inline(always)]
unsafe fn f16_512(p: *const u8) -> f32 {
    let h = (p as *const u16).read_unaligned();
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)))
}

// ---------------------------------------------------------------- AVX-512 ----

/// 16 bytes at `p` zero-extended to 16 × i32.
#[inline(always)]
unsafe fn u8x16(p: *const u8) -> __m512i {
    _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i))
}

/// Dequantizes one row (see `scalar::dequant_row`) with AVX-512.
///
/// # Safety
/// The CPU must support AVX-512 F, VL, BW and DQ.
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq")]
pub(super) unsafe fn dequant_row_512(kind: Kind, src: &[u8], dst: &mut [f32]) {
    let (bs, bb) = (kind.block_elems(), kind.block_bytes());
    let nb = dst.len() / bs;
    assert!(dst.len() == nb * bs && src.len() >= nb * bb);
    let (s, y) = (src.as_ptr(), dst.as_mut_ptr());
    let m4 = _mm512_set1_epi32(0xF);
    let cvt = |v: __m512i| _mm512_cvtepi32_ps(v);
    for b in 0..nb {
        let blk = &src[b * bb..(b + 1) * bb];
        let (p, y) = (s.add(b * bb), y.add(b * bs));
        match kind {
            Kind::Q4_0 => {
                let d = _mm512_set1_ps(f16_at(blk, 0));
                let eight = _mm512_set1_epi32(8);
                let q = u8x16(p.add(2));
                let lo = _mm512_sub_epi32(_mm512_and_si512(q, m4), eight);
                let hi = _mm512_sub_epi32(_mm512_srli_epi32::<4>(q), eight);
                _mm512_storeu_ps(y, _mm512_mul_ps(cvt(lo), d));
                _mm512_storeu_ps(y.add(16), _mm512_mul_ps(cvt(hi), d));
            }
            Kind::Q4_1 => {
                let (d, m) = (_mm512_set1_ps(f16_at(blk, 0)), _mm512_set1_ps(f16_at(blk, 2)));
                let q = u8x16(p.add(4));
                let lo = _mm512_and_si512(q, m4);
                let hi = _mm512_srli_epi32::<4>(q);
                // mul then add (not fma): the same rounding as ggml's dequantization.
                _mm512_storeu_ps(y, _mm512_add_ps(_mm512_mul_ps(cvt(lo), d), m));
                _mm512_storeu_ps(y.add(16), _mm512_add_ps(_mm512_mul_ps(cvt(hi), d), m));
            }
            Kind::Q8_0 => {
                let d = _mm512_set1_ps(f16_512(p));
                for h in 0..2 {
                    let q = _mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(2 + 16 * h) as *const __m128i));
                    _mm512_storeu_ps(y.add(16 * h), _mm512_mul_ps(cvt(q), d));
                }
            }
            Kind::Q4K | Kind::Q5K => {
                let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
                let scales = &blk[4..16];
                let five = kind == Kind::Q5K;
                let qs = if five { p.add(48) } else { p.add(16) };
                for pair in 0..4 {
                    let (sc1, mn1) = scale_min_k4(2 * pair, scales);
                    let (sc2, mn2) = scale_min_k4(2 * pair + 1, scales);
                    let (d1, m1) = (_mm512_set1_ps(d * sc1 as f32), _mm512_set1_ps(dmin * mn1 as f32));
                    let (d2, m2) = (_mm512_set1_ps(d * sc2 as f32), _mm512_set1_ps(dmin * mn2 as f32));
                    for h in 0..2 {
                        let q = u8x16(qs.add(32 * pair + 16 * h));
                        let mut lo = _mm512_and_si512(q, m4);
                        let mut hi = _mm512_srli_epi32::<4>(q);
                        if five {
                            let qh = u8x16(p.add(16 + 16 * h));
                            let one = _mm512_set1_epi32(1);
                            let s1 = _mm512_srlv_epi32(qh, _mm512_set1_epi32(2 * pair as i32));
                            let s2 = _mm512_srli_epi32::<1>(s1);
                            lo = _mm512_or_si512(lo, _mm512_slli_epi32::<4>(_mm512_and_si512(s1, one)));
                            hi = _mm512_or_si512(hi, _mm512_slli_epi32::<4>(_mm512_and_si512(s2, one)));
                        }
                        let o = y.add(64 * pair + 16 * h);
                        _mm512_storeu_ps(o, _mm512_sub_ps(_mm512_mul_ps(d1, cvt(lo)), m1));
                        _mm512_storeu_ps(o.add(32), _mm512_sub_ps(_mm512_mul_ps(d2, cvt(hi)), m2));
                    }
                }
            }
            Kind::Q6K => {
                let d = f16_at(blk, 208);
                let sc = &blk[192..208];
                let (three, off) = (_mm512_set1_epi32(3), _mm512_set1_epi32(32));
                for h in 0..2 {
                    for c in 0..2 {
                        let qa = u8x16(p.add(64 * h + 16 * c));
                        let qb = u8x16(p.add(64 * h + 32 + 16 * c));
                        let qh = u8x16(p.add(128 + 32 * h + 16 * c));
                        let hbits = |shift: __m512i| {
                            _mm512_slli_epi32::<4>(_mm512_and_si512(_mm512_srlv_epi32(qh, shift), three))
                        };
                        let vals = [
                            _mm512_or_si512(_mm512_and_si512(qa, m4), hbits(_mm512_set1_epi32(0))),
                            _mm512_or_si512(_mm512_and_si512(qb, m4), hbits(_mm512_set1_epi32(2))),
                            _mm512_or_si512(_mm512_srli_epi32::<4>(qa), hbits(_mm512_set1_epi32(4))),
                            _mm512_or_si512(_mm512_srli_epi32::<4>(qb), hbits(_mm512_set1_epi32(6))),
                        ];
                        for (k, v) in vals.into_iter().enumerate() {
                            let scale = _mm512_set1_ps(d * sc[8 * h + c + 2 * k] as i8 as f32);
                            let q = cvt(_mm512_sub_epi32(v, off));
                            _mm512_storeu_ps(y.add(128 * h + 32 * k + 16 * c), _mm512_mul_ps(scale, q));
                        }
                    }
                }
            }
        }
    }
}

/// `out[r][t] = dot(W row r, x row t)` for `RR` rows of a K-quant matrix in
/// ggml's layout (`rows[r]`, one row's blocks each) and `T` activation rows,
/// without an f32 copy of the weights: each 256-value block is dequantized in
/// registers — Q4_K / Q5_K values through a 16-entry table per sub-block
/// (`d·sc·q − dmin·m`, ggml's two roundings), Q6_K as `d·sc·(q − 32)` — and used
/// at once for every activation row. The values are exactly `dequant_row_512`'s,
/// so the result is the dequantized-f32 product up to summation order.
/// Decode steps (small `T`) take this: the panel path's f32 copy of every row
/// was written and read back once per step, which cost more than the products.
///
/// # Safety
/// The CPU must support AVX-512 F, VL, BW and DQ.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq")]
pub(super) unsafe fn fused_kquant_512<const RR: usize, const T: usize>(
    kind: Kind,
    rows: &[&[u8]; RR],
    x: &[f32],
    cols: usize,
) -> [[f32; T]; RR] {
    let bb = kind.block_bytes();
    let nb = cols / 256;
    assert!(cols.is_multiple_of(256) && x.len() >= T * cols);
    assert!(rows.iter().all(|r| r.len() >= nb * bb));
    let iota = _mm512_setr_ps(0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12., 13., 14., 15.);
    let (m4, one, three, off) = (
        _mm512_set1_epi32(0xF),
        _mm512_set1_epi32(1),
        _mm512_set1_epi32(3),
        _mm512_set1_epi32(32),
    );
    let xp = x.as_ptr();
    let mut acc = [[_mm512_setzero_ps(); T]; RR];
    // `w` (16 values at offset `at` of the block) into every activation row's sums.
    macro_rules! use_w {
        ($r:expr, $w:expr, $at:expr, $b:expr) => {{
            let w = $w;
            for t in 0..T {
                let xq = xp.add(t * cols + 256 * $b + $at);
                acc[$r][t] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xq), acc[$r][t]);
            }
        }};
    }
    for b in 0..nb {
        for r in 0..RR {
            let blk = &rows[r][b * bb..(b + 1) * bb];
            let p = blk.as_ptr();
            if b + 1 < nb {
                _mm_prefetch::<_MM_HINT_T0>(p.add(bb) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(p.add(bb + 64) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(p.add(bb + 128) as *const i8);
            }
            match kind {
                Kind::Q4K | Kind::Q5K => {
                    let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
                    let scales = &blk[4..16];
                    let five = kind == Kind::Q5K;
                    let qs = if five { p.add(48) } else { p.add(16) };
                    for pair in 0..4 {
                        let (sc1, mn1) = scale_min_k4(2 * pair, scales);
                        let (sc2, mn2) = scale_min_k4(2 * pair + 1, scales);
                        let (d1, m1) = (_mm512_set1_ps(d * sc1 as f32), _mm512_set1_ps(dmin * mn1 as f32));
                        let (d2, m2) = (_mm512_set1_ps(d * sc2 as f32), _mm512_set1_ps(dmin * mn2 as f32));
                        if five {
                            for h in 0..2 {
                                let q = u8x16(qs.add(32 * pair + 16 * h));
                                let qh = u8x16(p.add(16 + 16 * h));
                                let s1 = _mm512_srlv_epi32(qh, _mm512_set1_epi32(2 * pair as i32));
                                let s2 = _mm512_srli_epi32::<1>(s1);
                                let lo = _mm512_or_si512(
                                    _mm512_and_si512(q, m4),
                                    _mm512_slli_epi32::<4>(_mm512_and_si512(s1, one)),
                                );
                                let hi = _mm512_or_si512(
                                    _mm512_srli_epi32::<4>(q),
                                    _mm512_slli_epi32::<4>(_mm512_and_si512(s2, one)),
                                );
                                let cvt = |v: __m512i| _mm512_cvtepi32_ps(v);
                                use_w!(r, _mm512_sub_ps(_mm512_mul_ps(d1, cvt(lo)), m1), 64 * pair + 16 * h, b);
                                use_w!(
                                    r,
                                    _mm512_sub_ps(_mm512_mul_ps(d2, cvt(hi)), m2),
                                    64 * pair + 32 + 16 * h,
                                    b
                                );
                            }
                        } else {
                            // q·d1 − m1 for q = 0..15, as ggml (mul, then sub).
                            let lut1 = _mm512_sub_ps(_mm512_mul_ps(d1, iota), m1);
                            let lut2 = _mm512_sub_ps(_mm512_mul_ps(d2, iota), m2);
                            for h in 0..2 {
                                let q = u8x16(qs.add(32 * pair + 16 * h));
                                // vpermps reads the low 4 bits of each index.
                                use_w!(r, _mm512_permutexvar_ps(q, lut1), 64 * pair + 16 * h, b);
                                use_w!(
                                    r,
                                    _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(q), lut2),
                                    64 * pair + 32 + 16 * h,
                                    b
                                );
                            }
                        }
                    }
                }
                Kind::Q6K => {
                    let d = f16_at(blk, 208);
                    let sc = &blk[192..208];
                    for h in 0..2 {
                        for c in 0..2 {
                            let qa = u8x16(p.add(64 * h + 16 * c));
                            let qb = u8x16(p.add(64 * h + 32 + 16 * c));
                            let qh = u8x16(p.add(128 + 32 * h + 16 * c));
                            let hbits = |shift: __m512i| {
                                _mm512_slli_epi32::<4>(_mm512_and_si512(_mm512_srlv_epi32(qh, shift), three))
                            };
                            let vals = [
                                _mm512_or_si512(_mm512_and_si512(qa, m4), hbits(_mm512_set1_epi32(0))),
                                _mm512_or_si512(_mm512_and_si512(qb, m4), hbits(_mm512_set1_epi32(2))),
                                _mm512_or_si512(_mm512_srli_epi32::<4>(qa), hbits(_mm512_set1_epi32(4))),
                                _mm512_or_si512(_mm512_srli_epi32::<4>(qb), hbits(_mm512_set1_epi32(6))),
                            ];
                            for (k, v) in vals.into_iter().enumerate() {
                                let scale = _mm512_set1_ps(d * sc[8 * h + c + 2 * k] as i8 as f32);
                                let q = _mm512_cvtepi32_ps(_mm512_sub_epi32(v, off));
                                use_w!(r, _mm512_mul_ps(scale, q), 128 * h + 32 * k + 16 * c, b);
                            }
                        }
                    }
                }
                _ => unreachable!("fused_kquant_512 is for K-quants"),
            }
        }
    }
    let mut out = [[0f32; T]; RR];
    for r in 0..RR {
        for t in 0..T {
            out[r][t] = _mm512_reduce_add_ps(acc[r][t]);
        }
    }
    out
}

/// `out[r][t] = dot(w row r, x row t)` over `cols` (a multiple of 16), AVX-512.
///
/// # Safety
/// The CPU must support AVX-512 F, VL, BW and DQ.
// `acc[r][t]` indexed by both loops reads clearer than iterator chains.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq")]
pub(super) unsafe fn micro_512<const R: usize, const T: usize>(w: &[f32], x: &[f32], cols: usize) -> [[f32; T]; R] {
    assert!(cols.is_multiple_of(16) && w.len() >= R * cols && x.len() >= T * cols);
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    for k in (0..cols).step_by(16) {
        let mut wv = [_mm512_setzero_ps(); R];
        for (r, v) in wv.iter_mut().enumerate() {
            *v = _mm512_loadu_ps(wp.add(r * cols + k));
        }
        for t in 0..T {
            let xv = _mm512_loadu_ps(xp.add(t * cols + k));
            for r in 0..R {
                acc[r][t] = _mm512_fmadd_ps(wv[r], xv, acc[r][t]);
            }
        }
    }
    let mut out = [[0f32; T]; R];
    for r in 0..R {
        for t in 0..T {
            out[r][t] = _mm512_reduce_add_ps(acc[r][t]);
        }
    }
    out
}

/// `out[r][t]` = dot(w row r, activation row t) for the 8 rows of `w`
/// (`[8, cols]`) and `16·V` activation rows of one transposed block `xt`
/// (`[cols, 48]`): per column one broadcast weight times `V` vectors of 16
/// activations, into 8·V accumulators — no horizontal sums, and 8 + V loads per
/// 8·V multiply-adds (the dot-product kernel `micro_512` needs a load per
/// multiply-add pair and a reduction per output).
///
/// # Safety
/// The CPU must support AVX-512 F.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn outer_512<const V: usize>(w: &[f32], cols: usize, xt: &[f32], out: &mut [[f32; 48]; 8]) {
    assert!(V <= 3 && w.len() >= 8 * cols && xt.len() >= cols * 48);
    let (wp, xp) = (w.as_ptr(), xt.as_ptr());
    let mut acc = [[_mm512_setzero_ps(); V]; 8];
    for k in 0..cols {
        let mut xv = [_mm512_setzero_ps(); V];
        for (v, xv) in xv.iter_mut().enumerate() {
            *xv = _mm512_loadu_ps(xp.add(k * 48 + 16 * v));
        }
        for (r, acc) in acc.iter_mut().enumerate() {
            let wb = _mm512_set1_ps(*wp.add(r * cols + k));
            for (a, &xv) in acc.iter_mut().zip(&xv) {
                *a = _mm512_fmadd_ps(wb, xv, *a);
            }
        }
    }
    for (o, acc) in out.iter_mut().zip(&acc) {
        for (v, a) in acc.iter().enumerate() {
            _mm512_storeu_ps(o.as_mut_ptr().add(16 * v), *a);
        }
    }
}

// ------------------------------------------------------------------- AVX2 ----

/// 8 bytes at `p` zero-extended to 8 × i32.
#[inline(always)]
unsafe fn u8x8(p: *const u8) -> __m256i {
    _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i))
}

/// Dequantizes one row (see `scalar::dequant_row`) with AVX2.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn dequant_row_256(kind: Kind, src: &[u8], dst: &mut [f32]) {
    let (bs, bb) = (kind.block_elems(), kind.block_bytes());
    let nb = dst.len() / bs;
    assert!(dst.len() == nb * bs && src.len() >= nb * bb);
    let (s, y) = (src.as_ptr(), dst.as_mut_ptr());
    let m4 = _mm256_set1_epi32(0xF);
    let cvt = |v: __m256i| _mm256_cvtepi32_ps(v);
    for b in 0..nb {
        let blk = &src[b * bb..(b + 1) * bb];
        let (p, y) = (s.add(b * bb), y.add(b * bs));
        match kind {
            Kind::Q4_0 => {
                let d = _mm256_set1_ps(f16_at(blk, 0));
                let eight = _mm256_set1_epi32(8);
                for g in 0..2 {
                    let q = u8x8(p.add(2 + 8 * g));
                    let lo = _mm256_sub_epi32(_mm256_and_si256(q, m4), eight);
                    let hi = _mm256_sub_epi32(_mm256_srli_epi32::<4>(q), eight);
                    _mm256_storeu_ps(y.add(8 * g), _mm256_mul_ps(cvt(lo), d));
                    _mm256_storeu_ps(y.add(16 + 8 * g), _mm256_mul_ps(cvt(hi), d));
                }
            }
            Kind::Q4_1 => {
                let (d, m) = (_mm256_set1_ps(f16_at(blk, 0)), _mm256_set1_ps(f16_at(blk, 2)));
                for g in 0..2 {
                    let q = u8x8(p.add(4 + 8 * g));
                    let lo = _mm256_and_si256(q, m4);
                    let hi = _mm256_srli_epi32::<4>(q);
                    _mm256_storeu_ps(y.add(8 * g), _mm256_add_ps(_mm256_mul_ps(cvt(lo), d), m));
                    _mm256_storeu_ps(y.add(16 + 8 * g), _mm256_add_ps(_mm256_mul_ps(cvt(hi), d), m));
                }
            }
            Kind::Q8_0 => {
                let d = _mm256_set1_ps(f16_at(blk, 0));
                for g in 0..4 {
                    let q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(p.add(2 + 8 * g) as *const __m128i));
                    _mm256_storeu_ps(y.add(8 * g), _mm256_mul_ps(cvt(q), d));
                }
            }
            Kind::Q4K | Kind::Q5K => {
                let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
                let scales = &blk[4..16];
                let five = kind == Kind::Q5K;
                let qs = if five { p.add(48) } else { p.add(16) };
                let one = _mm256_set1_epi32(1);
                for pair in 0..4 {
                    let (sc1, mn1) = scale_min_k4(2 * pair, scales);
                    let (sc2, mn2) = scale_min_k4(2 * pair + 1, scales);
                    let (d1, m1) = (_mm256_set1_ps(d * sc1 as f32), _mm256_set1_ps(dmin * mn1 as f32));
                    let (d2, m2) = (_mm256_set1_ps(d * sc2 as f32), _mm256_set1_ps(dmin * mn2 as f32));
                    for g in 0..4 {
                        let q = u8x8(qs.add(32 * pair + 8 * g));
                        let mut lo = _mm256_and_si256(q, m4);
                        let mut hi = _mm256_srli_epi32::<4>(q);
                        if five {
                            let qh = u8x8(p.add(16 + 8 * g));
                            let s1 = _mm256_srlv_epi32(qh, _mm256_set1_epi32(2 * pair as i32));
                            let s2 = _mm256_srli_epi32::<1>(s1);
                            lo = _mm256_or_si256(lo, _mm256_slli_epi32::<4>(_mm256_and_si256(s1, one)));
                            hi = _mm256_or_si256(hi, _mm256_slli_epi32::<4>(_mm256_and_si256(s2, one)));
                        }
                        let o = y.add(64 * pair + 8 * g);
                        _mm256_storeu_ps(o, _mm256_sub_ps(_mm256_mul_ps(d1, cvt(lo)), m1));
                        _mm256_storeu_ps(o.add(32), _mm256_sub_ps(_mm256_mul_ps(d2, cvt(hi)), m2));
                    }
                }
            }
            Kind::Q6K => {
                let d = f16_at(blk, 208);
                let sc = &blk[192..208];
                let (three, off) = (_mm256_set1_epi32(3), _mm256_set1_epi32(32));
                for h in 0..2 {
                    for g in 0..4 {
                        let qa = u8x8(p.add(64 * h + 8 * g));
                        let qb = u8x8(p.add(64 * h + 32 + 8 * g));
                        let qh = u8x8(p.add(128 + 32 * h + 8 * g));
                        let hbits = |shift: __m256i| {
                            _mm256_slli_epi32::<4>(_mm256_and_si256(_mm256_srlv_epi32(qh, shift), three))
                        };
                        let vals = [
                            _mm256_or_si256(_mm256_and_si256(qa, m4), hbits(_mm256_set1_epi32(0))),
                            _mm256_or_si256(_mm256_and_si256(qb, m4), hbits(_mm256_set1_epi32(2))),
                            _mm256_or_si256(_mm256_srli_epi32::<4>(qa), hbits(_mm256_set1_epi32(4))),
                            _mm256_or_si256(_mm256_srli_epi32::<4>(qb), hbits(_mm256_set1_epi32(6))),
                        ];
                        let c = g / 2; // which 16-value scale group
                        for (k, v) in vals.into_iter().enumerate() {
                            let scale = _mm256_set1_ps(d * sc[8 * h + c + 2 * k] as i8 as f32);
                            let q = cvt(_mm256_sub_epi32(v, off));
                            _mm256_storeu_ps(y.add(128 * h + 32 * k + 8 * g), _mm256_mul_ps(scale, q));
                        }
                    }
                }
            }
        }
    }
}

/// `out[r][t] = dot(w row r, x row t)` over `cols` (a multiple of 8), AVX2 + FMA.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
// `acc[r][t]` indexed by both loops reads clearer than iterator chains.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn micro_256<const R: usize, const T: usize>(w: &[f32], x: &[f32], cols: usize) -> [[f32; T]; R] {
    assert!(cols.is_multiple_of(8) && w.len() >= R * cols && x.len() >= T * cols);
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    for k in (0..cols).step_by(8) {
        let mut wv = [_mm256_setzero_ps(); R];
        for (r, v) in wv.iter_mut().enumerate() {
            *v = _mm256_loadu_ps(wp.add(r * cols + k));
        }
        for t in 0..T {
            let xv = _mm256_loadu_ps(xp.add(t * cols + k));
            for r in 0..R {
                acc[r][t] = _mm256_fmadd_ps(wv[r], xv, acc[r][t]);
            }
        }
    }
    let mut out = [[0f32; T]; R];
    for r in 0..R {
        for t in 0..T {
            out[r][t] = hsum256(acc[r][t]);
        }
    }
    out
}

#[inline(always)]
unsafe fn hsum256(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
    _mm_cvtss_f32(s)
}

// ------------------------------------------------ AVX-512, fused (small n) ----

/// Block kinds of the tiled kernels (a const parameter).
pub(super) const FUSED_Q4_0: u8 = 0;
pub(super) const FUSED_Q4_1: u8 = 1;
pub(super) const FUSED_Q8_0: u8 = 2;

/// Bytes of one row's quantized values per block in the tiled layout.
pub(super) const fn tile_qbytes(k: u8) -> usize {
    if k == FUSED_Q8_0 {
        32
    } else {
        16
    }
}

/// f16 scales per row and block in the tiled layout (`d`, and `m` for Q4_1).
pub(super) const fn tile_nscales(k: u8) -> usize {
    if k == FUSED_Q4_1 {
        2
    } else {
        1
    }
}

/// Converts a tile's f16 scales (`count` of them, contiguous at its start) to
/// f32 in `out`, 16 per instruction.
///
/// # Safety
/// The CPU must support AVX-512 F, VL, BW and DQ.
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq")]
pub(super) unsafe fn tile_scales_512(tile: &[u8], count: usize, out: &mut Vec<f32>) {
    let padded = count.next_multiple_of(16);
    if out.len() < padded {
        out.resize(padded, 0.0);
    }
    assert!(tile.len() >= 2 * count);
    let (src, dst) = (tile.as_ptr() as *const u16, out.as_mut_ptr());
    for i in (0..count).step_by(16) {
        let mask: __mmask16 = if count - i >= 16 {
            0xFFFF
        } else {
            (1u16 << (count - i)) - 1
        };
        let h = _mm256_maskz_loadu_epi16(mask, src.add(i) as *const i16);
        _mm512_storeu_ps(dst.add(i), _mm512_cvtph_ps(h));
    }
}

/// The 32 values of one row's block in a tile as two vectors (elements 0-15 and
/// 16-31), from its quantized bytes at `p` and its f32 scale `d` (and, for Q4_1,
/// min `m`): the 4-bit types through a 16-entry table (`vpermps`) built with
/// ggml's own arithmetic, so the values are exactly ggml's dequantized ones.
#[inline(always)]
unsafe fn tile_block<const K: u8>(p: *const u8, d: f32, m: f32) -> (__m512, __m512) {
    let iota = _mm512_setr_ps(0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12., 13., 14., 15.);
    let d = _mm512_set1_ps(d);
    match K {
        FUSED_Q4_0 | FUSED_Q4_1 => {
            let lut = if K == FUSED_Q4_0 {
                // (q - 8) * d, as ggml.
                _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(8.0)), d)
            } else {
                // q * d + m, as ggml (two roundings).
                _mm512_add_ps(_mm512_mul_ps(iota, d), _mm512_set1_ps(m))
            };
            let q = u8x16(p);
            // vpermps reads the low 4 bits of each index: no mask needed.
            (
                _mm512_permutexvar_ps(q, lut),
                _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(q), lut),
            )
        }
        _ => {
            let q0 = _mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i));
            let q1 = _mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(16) as *const __m128i));
            (
                _mm512_mul_ps(_mm512_cvtepi32_ps(q0), d),
                _mm512_mul_ps(_mm512_cvtepi32_ps(q1), d),
            )
        }
    }
}

/// Rows `F .. F + RR` of one tile (`R` rows in the tiled layout, see
/// `kernels::Tiled`) dotted with the `T` rows of `x`, stored at
/// `out[t * stride + F + r]`. `sc` holds the tile's scales as f32
/// (`tile_scales_512`). Each block is dequantized in registers (`tile_block`).
/// Every block column also prefetches the line `prefetch` bytes further on.
///
/// # Safety
/// The CPU must support AVX-512 F, VL, BW and DQ; `out` must be valid for writes
/// at `t * stride + F + r` for every `t < T`, `r < RR`, and no other thread may
/// touch those elements.
// `acc[r][t]` indexed by both loops reads clearer than iterator chains.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq")]
pub(super) unsafe fn fused_tile_512<const K: u8, const R: usize, const F: usize, const RR: usize, const T: usize>(
    tile: &[u8],
    sc: &[f32],
    x: &[f32],
    cols: usize,
    prefetch: usize,
    out: *mut f32,
    stride: usize,
) {
    let (qb, ns) = (tile_qbytes(K), tile_nscales(K));
    let nb = cols / 32;
    let (col, sstride) = (R * qb, R * ns);
    let qoff = nb * sstride * 2;
    assert!(F + RR <= R && cols.is_multiple_of(32) && x.len() >= T * cols);
    assert!(tile.len() >= qoff + nb * col && sc.len() >= nb * sstride);
    let (q0, s0, xp) = (tile.as_ptr().add(qoff), sc.as_ptr(), x.as_ptr());
    // The block loop prefetches the quantized bytes `prefetch` ahead; the scales at
    // the start of that tile are fetched here (else they are demand misses when
    // `tile_scales_512` converts them).
    if F == 0 {
        let ahead = tile.as_ptr().wrapping_add(prefetch);
        for l in (0..=qoff).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(l) as *const i8);
        }
    }
    let mut acc = [[_mm512_setzero_ps(); T]; RR];
    for b in 0..nb {
        let qcol = q0.add(b * col);
        // A hint only: it never faults, so the address may lie past the matrix
        // (hence `wrapping_add`, which makes no in-bounds claim).
        _mm_prefetch::<_MM_HINT_T0>(qcol.wrapping_add(prefetch) as *const i8);
        if K == FUSED_Q8_0 {
            _mm_prefetch::<_MM_HINT_T0>(qcol.wrapping_add(prefetch + 64) as *const i8);
        }
        let s = s0.add(b * sstride);
        for r in 0..RR {
            let m = if K == FUSED_Q4_1 { *s.add(R + F + r) } else { 0.0 };
            let (lo, hi) = tile_block::<K>(qcol.add((F + r) * qb), *s.add(F + r), m);
            for t in 0..T {
                let xq = xp.add(t * cols + 32 * b);
                acc[r][t] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xq), acc[r][t]);
                acc[r][t] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xq.add(16)), acc[r][t]);
            }
        }
    }
    store_sums::<F, RR, T>(acc, out, stride)
}

/// Rows `F .. F + RR` of `R` = 4 consecutive ggml Q8_0 rows (`rb` bytes apart;
/// `rows` holds `nr` of them, later ones repeat the last) dotted with the `T`
/// rows of `x`: `fused_tile_512` for Q8_0 with each block and scale read where
/// it lies, so the same values meet `x` in the same order (the same bits as the
/// tiled layout's). `sc[r·nb + b]` is row `r`'s block-`b` scale as f32
/// (`q8_scales_512`, converted once for all passes over these rows), or `sc`
/// is empty and each scale is converted where it lies (one pass: the
/// gathers ahead of it cost more than they save). The rows
/// after them (the next calls') are prefetched `prefetch` bytes on from
/// `rows`, a block column's share each block.
///
/// # Safety
/// As `fused_tile_512`.
#[allow(clippy::needless_range_loop, clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq")]
pub(super) unsafe fn fused_q8_rows_512<const F: usize, const RR: usize, const T: usize>(
    rows: &[u8],
    rb: usize,
    nr: usize,
    sc: &[f32],
    x: &[f32],
    cols: usize,
    prefetch: usize,
    out: *mut f32,
    stride: usize,
) {
    const BB: usize = 34;
    let nb = cols / 32;
    assert!(F + RR <= 4 && (1..=4).contains(&nr) && cols.is_multiple_of(32) && x.len() >= T * cols);
    assert!(sc.is_empty() || sc.len() >= (F + RR) * nb);
    assert!(rb >= nb * BB && rows.len() >= (nr - 1) * rb + nb * BB);
    let row: [*const u8; RR] = std::array::from_fn(|r| rows.as_ptr().add((F + r).min(nr - 1) * rb));
    let xp = x.as_ptr();
    let mut acc = [[_mm512_setzero_ps(); T]; RR];
    let ahead = rows.as_ptr().wrapping_add(prefetch);
    for b in 0..nb {
        if F == 0 {
            // A hint only: it never faults (hence `wrapping_add`).
            for l in 0..3 {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(4 * BB * b + 64 * l) as *const i8);
            }
        }
        for r in 0..RR {
            let blk = row[r].add(b * BB);
            let d = if sc.is_empty() {
                f16_512(blk)
            } else {
                *sc.get_unchecked((F + r) * nb + b)
            };
            let (lo, hi) = tile_block::<FUSED_Q8_0>(blk.add(2), d, 0.0);
            for t in 0..T {
                let xq = xp.add(t * cols + 32 * b);
                acc[r][t] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xq), acc[r][t]);
                acc[r][t] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xq.add(16)), acc[r][t]);
            }
        }
    }
    store_sums::<F, RR, T>(acc, out, stride)
}

/// The scales of 4 consecutive ggml Q8_0 rows (`nr` of them in `rows`, `rb`
/// bytes apart; later ones repeat the last) as f32: `out[r·nb + b]`, sixteen
/// blocks per gather.
///
/// # Safety
/// The CPU must support AVX-512 F.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn q8_scales_512(rows: &[u8], rb: usize, nr: usize, nb: usize, out: &mut Vec<f32>) {
    const BB: usize = 34;
    assert!((1..=4).contains(&nr) && rb >= nb * BB && rows.len() >= (nr - 1) * rb + nb * BB);
    if out.len() < 4 * nb + 16 {
        out.resize(4 * nb + 16, 0.0);
    }
    let at = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(BB as i32),
    );
    for r in 0..4 {
        let row = rows.as_ptr().add(r.min(nr - 1) * rb);
        for b in (0..nb).step_by(16) {
            let live: __mmask16 = if nb - b >= 16 { 0xFFFF } else { (1u16 << (nb - b)) - 1 };
            // The dword at each block's start: its f16 `d`, then two values.
            let h = _mm512_mask_i32gather_epi32::<1>(_mm512_setzero_si512(), live, at, row.add(b * BB) as *const i32);
            _mm512_storeu_ps(
                out.as_mut_ptr().add(r * nb + b),
                _mm512_cvtph_ps(_mm512_cvtepi32_epi16(h)),
            );
        }
    }
}

/// The fused kernels' sums: `acc[r][t]` reduced and stored at
/// `out[t * stride + F + r]`.
#[inline(always)]
unsafe fn store_sums<const F: usize, const RR: usize, const T: usize>(
    acc: [[__m512; T]; RR],
    out: *mut f32,
    stride: usize,
) {
    // All RR·T sums in one transposing tree. Lane i's sum depends on acc i alone,
    // in an order fixed by `sum16`, so a row's result has the same bits for any T
    // (a sequence's logits do not move when it is batched).
    // Lane t·RR + r holds output (t, F + r): each t's RR sums are adjacent, one
    // masked store.
    const { assert!(RR * T <= 16) };
    let mut a = [_mm512_setzero_ps(); 16];
    for r in 0..RR {
        for t in 0..T {
            a[t * RR + r] = acc[r][t];
        }
    }
    let sums = sum16(&a);
    let mask: __mmask16 = (1 << RR) - 1;
    for t in 0..T {
        // `t * RR` as a lane rotation count: the permutation below moves lanes
        // t·RR .. t·RR + RR to the bottom.
        let idx = _mm512_add_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32((t * RR) as i32),
        );
        _mm512_mask_storeu_ps(out.add(t * stride + F), mask, _mm512_permutexvar_ps(idx, sums));
    }
}

/// Dequantizes the `R` rows of one tile (see `fused_tile_512`) into `dst`
/// (`R × cols`, row-major), with the same arithmetic, so the same bits as ggml.
///
/// # Safety
/// The CPU must support AVX-512 F, VL, BW and DQ.
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq")]
pub(super) unsafe fn dequant_tile_512<const K: u8, const R: usize>(tile: &[u8], sc: &[f32], dst: &mut [f32]) {
    let (qb, ns) = (tile_qbytes(K), tile_nscales(K));
    let cols = dst.len() / R;
    let nb = cols / 32;
    let (col, sstride) = (R * qb, R * ns);
    let qoff = nb * sstride * 2;
    assert!(dst.len() == R * cols && cols.is_multiple_of(32));
    assert!(tile.len() >= qoff + nb * col && sc.len() >= nb * sstride);
    let (q0, s0, y) = (tile.as_ptr().add(qoff), sc.as_ptr(), dst.as_mut_ptr());
    for b in 0..nb {
        let s = s0.add(b * sstride);
        for r in 0..R {
            let m = if K == FUSED_Q4_1 { *s.add(R + r) } else { 0.0 };
            let (lo, hi) = tile_block::<K>(q0.add(b * col + r * qb), *s.add(r), m);
            let o = y.add(r * cols + 32 * b);
            _mm512_storeu_ps(o, lo);
            _mm512_storeu_ps(o.add(16), hi);
        }
    }
}

// ------------------------------------------------- AVX-512 VNNI, int8 tiles ----

/// Rounds `x` (a multiple of 16 values) to 8 bits per run of 8: `q = x / d`
/// rounded to nearest (ties to even), `d = max|x| / 127`; per run `d` and Σq.
///
/// # Safety
/// The CPU must support AVX-512 F and BW.
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn quantize_int8_512(x: &[f32], q: &mut [i8], d: &mut [f32], qsum: &mut [i32]) {
    let nh = x.len() / 16;
    assert!(x.len() == nh * 16 && q.len() == x.len() && d.len() >= 2 * nh && qsum.len() >= 2 * nh);
    let (xp, qp) = (x.as_ptr(), q.as_mut_ptr());
    const LO: __mmask16 = 0x00FF;
    const HI: __mmask16 = 0xFF00;
    for h in 0..nh {
        let v = _mm512_loadu_ps(xp.add(16 * h));
        let a = _mm512_abs_ps(v);
        let d0 = _mm512_mask_reduce_max_ps(LO, a) / 127.0;
        let d1 = _mm512_mask_reduce_max_ps(HI, a) / 127.0;
        let inv = |d: f32| if d > 0.0 { 1.0 / d } else { 0.0 };
        let id = _mm512_mask_blend_ps(HI, _mm512_set1_ps(inv(d0)), _mm512_set1_ps(inv(d1)));
        let qv = _mm512_cvtps_epi32(_mm512_mul_ps(v, id));
        _mm_storeu_si128(qp.add(16 * h) as *mut __m128i, _mm512_cvtepi32_epi8(qv));
        d[2 * h] = d0;
        d[2 * h + 1] = d1;
        qsum[2 * h] = _mm512_mask_reduce_add_epi32(LO, qv);
        qsum[2 * h + 1] = _mm512_mask_reduce_add_epi32(HI, qv);
    }
}

/// How far ahead (in block columns) the int8 kernels prefetch their weights:
/// about one tile of 576 columns. Two ahead (as the f32 kernels do, which spend
/// longer per byte) left the loads waiting on memory; 4 to 32 measured alike,
/// batch-8 decode about 10% faster than 2.
const INT8_PREFETCH_BLOCKS: usize = 16;

/// Rows `0..16` of one int8-layout tile (see `kernels::Blocks::Int8`) dotted with
/// `T` rows of 8-bit activations: `out[t][r]`. `xq` holds the activation rows
/// (`cols` values each, 32 per block), `xd[4(t·nb + b) + e]` the scale of
/// run `e` of each block (values 8e .. 8e + 8), `xi[..]` (same
/// index) the integer sum's starting value (Q4_0: −8·Σq, which turns the stored
/// 0..15 into ggml's q − 8), `xs[t·nb + b]` the block's Σ d·q (Q4_1's `m` term).
/// Per block and row: `d·Σ_e xd_e·Σ q·xq (+ m·xs)`, the integer sums exact, so a
/// row's result does not depend on `T` or on the other rows.
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VNNI.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(super) unsafe fn int8_tile_512<const Q41: bool, const T: usize>(
    tile: &[u8],
    nb: usize,
    xq: &[i8],
    cols: usize,
    xd: &[f32],
    xi: &[i32],
    xs: &[f32],
    out: &mut [[f32; 16]; T],
) {
    let ns = if Q41 { 2 } else { 1 };
    let cb = 16 * (2 * ns + 16);
    assert!(T <= 8, "int8 kernel: at most 8 activation rows per call");
    assert!(tile.len() >= nb * cb && cols >= 32 * nb && xq.len() >= (T - 1) * cols + 32 * nb);
    assert!(xd.len() >= 4 * T * nb && xi.len() >= 4 * T * nb && (!Q41 || xs.len() >= T * nb));
    let (tp, xp) = (tile.as_ptr(), xq.as_ptr());
    let m4 = _mm512_set1_epi8(0x0F);
    let pf = INT8_PREFETCH_BLOCKS * cb;
    let mut acc = [_mm512_setzero_ps(); T];
    for b in 0..nb {
        let col = tp.add(b * cb);
        // A hint, never a fault (hence `wrapping_add`).
        _mm_prefetch::<_MM_HINT_T0>(col.wrapping_add(pf) as *const i8);
        _mm_prefetch::<_MM_HINT_T0>(col.wrapping_add(pf + 64) as *const i8);
        _mm_prefetch::<_MM_HINT_T0>(col.wrapping_add(pf + 128) as *const i8);
        _mm_prefetch::<_MM_HINT_T0>(col.wrapping_add(pf + 192) as *const i8);
        _mm_prefetch::<_MM_HINT_T0>(col.wrapping_add(pf + 256) as *const i8);
        let d = _mm512_cvtph_ps(_mm256_loadu_si256(col as *const __m256i));
        let m = if Q41 {
            _mm512_cvtph_ps(_mm256_loadu_si256(col.add(32) as *const __m256i))
        } else {
            _mm512_setzero_ps()
        };
        // Group g of the block: each row's bytes 4g..4g+4, whose low nibbles are
        // values 4g.. and high nibbles values 16 + 4g...
        let qs = col.add(32 * ns);
        let mut lo = [_mm512_setzero_si512(); 4];
        let mut hi = [_mm512_setzero_si512(); 4];
        for g in 0..4 {
            let v = _mm512_loadu_si512(qs.add(64 * g) as *const __m512i);
            lo[g] = _mm512_and_si512(v, m4);
            hi[g] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), m4);
        }
        // Spelled out per row (not a loop over `t`), so that every accumulator
        // stays in a register: LLVM kept a looped version's in memory.
        macro_rules! row {
            ($t:literal) => {
                if $t < T {
                    let x = xp.add($t * cols + 32 * b);
                    let at = $t * nb + b;
                    let x4 = |o: usize| _mm512_set1_epi32((x.add(o) as *const i32).read_unaligned());
                    // Runs of 8 values: lo groups 0-1, 2-3, hi groups 0-1, 2-3.
                    // Σ_e xd_e·Σq·xq first, then one multiply by the rows' d.
                    let mut r = _mm512_setzero_ps();
                    for (e, w) in [&lo[..2], &lo[2..], &hi[..2], &hi[2..]].into_iter().enumerate() {
                        let mut i = _mm512_set1_epi32(*xi.get_unchecked(4 * at + e));
                        i = _mm512_dpbusd_epi32(i, w[0], x4(8 * e));
                        i = _mm512_dpbusd_epi32(i, w[1], x4(8 * e + 4));
                        r = _mm512_fmadd_ps(
                            _mm512_cvtepi32_ps(i),
                            _mm512_set1_ps(*xd.get_unchecked(4 * at + e)),
                            r,
                        );
                    }
                    let mut a = _mm512_fmadd_ps(r, d, acc[$t]);
                    if Q41 {
                        a = _mm512_fmadd_ps(m, _mm512_set1_ps(*xs.get_unchecked(at)), a);
                    }
                    acc[$t] = a;
                }
            };
        }
        row!(0);
        row!(1);
        row!(2);
        row!(3);
        row!(4);
        row!(5);
        row!(6);
        row!(7);
    }
    for (o, a) in out.iter_mut().zip(acc) {
        _mm512_storeu_ps(o.as_mut_ptr(), a);
    }
}

/// Rows `0..16` of one Q8_0 int8-layout tile (see `kernels::Blocks::Int8`, eight
/// groups per block column) dotted with `T` activation rows stored as
/// `round(x / d) + 128` in unsigned bytes (`xq`, `cols` each) with each run's
/// scale in `xd[4(t·nb + b) + e]`: `out[t][r]`. VNNI multiplies unsigned by
/// signed bytes, so the signed weights take the signed side and each run's
/// integer sum starts at −128·Σw, computed once per tile for all `T` rows.
/// Integer sums are exact, so a row's result does not depend on `T`.
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VNNI.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(super) unsafe fn int8_q8_tile_512<const T: usize>(
    tile: &[u8],
    nb: usize,
    xq: &[i8],
    cols: usize,
    xd: &[f32],
    out: &mut [[f32; 16]; T],
) {
    let cb = 16 * (2 + 32);
    assert!(tile.len() >= nb * cb);
    let tp = tile.as_ptr();
    int8_q8_512::<T>(nb, xq, cols, xd, out, |b| {
        let col = tp.add(b * cb);
        for l in (0..cb).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(col.wrapping_add(INT8_PREFETCH_BLOCKS * cb + l) as *const i8);
        }
        let d = _mm512_cvtph_ps(_mm256_loadu_si256(col as *const __m256i));
        let qs = col.add(32);
        (
            d,
            std::array::from_fn(|g| _mm512_loadu_si512(qs.add(64 * g) as *const __m512i)),
        )
    })
}

/// `int8_q8_tile_512` on up to 16 consecutive ggml Q8_0 rows (`nr` of them in
/// `rows`, `rb` bytes apart; lanes past the last repeat it) where they lie:
/// each block column transposed in registers as `q8_tile_512` lays it out
/// (its `d` gathered), so the same values meet the activations in the same
/// order, with no tile written and read back. For products of one group of
/// activation rows (a batch of 8), where a tile would be used once.
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VNNI.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(super) unsafe fn int8_q8_rows_tile_512<const T: usize>(
    rows: &[u8],
    rb: usize,
    nr: usize,
    nb: usize,
    xq: &[i8],
    cols: usize,
    xd: &[f32],
    out: &mut [[f32; 16]; T],
) {
    let q8 = Q8Rows::new(rows, rb, nr, nb);
    int8_q8_512::<T>(nb, xq, cols, xd, out, |b| {
        let (d, w) = q8.column(b);
        (_mm512_cvtph_ps(d), w)
    })
}

/// Up to 16 consecutive ggml Q8_0 rows (`nr` of `rows`, `rb` bytes apart;
/// lanes past the last repeat it) read a block column at a time in
/// `Blocks::Int8`'s layout (`q8_tile_512`, `int8_q8_rows_tile_512`).
struct Q8Rows {
    rows: *const u8,
    rb: usize,
    row: [*const u8; 16],
    /// Each lane's row offset, for the scales' gather.
    at: __m512i,
}

impl Q8Rows {
    /// # Safety
    /// The CPU must support AVX-512 F.
    #[inline(always)]
    unsafe fn new(rows: &[u8], rb: usize, nr: usize, nb: usize) -> Self {
        assert!((1..=16).contains(&nr) && rb >= nb * 34 && rows.len() >= (nr - 1) * rb + nb * 34);
        assert!(16 * rb < i32::MAX as usize);
        let iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        let at = _mm512_min_epi32(iota, _mm512_set1_epi32(nr as i32 - 1));
        Q8Rows {
            rows: rows.as_ptr(),
            rb,
            row: std::array::from_fn(|r| rows.as_ptr().add(r.min(nr - 1) * rb)),
            at: _mm512_mullo_epi32(at, _mm512_set1_epi32(rb as i32)),
        }
    }

    /// Block column `b`: the rows' f16 `d` (16 × u16) and their eight value
    /// groups (`q8_columns`). The 16 rows after these (the next tile's,
    /// contiguous) are prefetched into L2, a block column's share.
    ///
    /// # Safety
    /// `b` must be below the `nb` given to `new`; the CPU must support AVX-512 F.
    #[inline(always)]
    unsafe fn column(&self, b: usize) -> (__m256i, [__m512i; 8]) {
        const CB: usize = 16 * 34;
        let ahead = self.rows.wrapping_add(16 * self.rb + b * CB);
        for l in 0..CB.div_ceil(64) + 1 {
            // A hint, never a fault (hence `wrapping_add`).
            _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add(64 * l) as *const i8);
        }
        // The dword at each row's block start: its f16 `d`, then two values.
        let h = _mm512_i32gather_epi32::<1>(self.at, self.rows.add(b * 34) as *const i32);
        (_mm512_cvtepi32_epi16(h), q8_columns(&self.row, b))
    }
}

/// Block `b`'s 32 value bytes of 16 rows as `Blocks::Int8`'s eight groups
/// (group `g` lane `r` = row `r`'s bytes `4g .. 4g + 4`): the rows paired into
/// eight vectors, an 8 × 8 dword transpose within each 256-bit half
/// (unpacks), and 128-bit lane moves that put the rows in order.
#[inline(always)]
unsafe fn q8_columns(row: &[*const u8; 16], b: usize) -> [__m512i; 8] {
    const BB: usize = 34;
    let y = |r: usize| _mm256_loadu_si256(row[r].add(b * BB + 2) as *const __m256i);
    // z[i] = rows i | i + 4 and z[4 + i] = rows 8 + i | 12 + i (i < 4).
    let z: [__m512i; 8] = std::array::from_fn(|i| {
        let (lo, hi) = if i < 4 { (i, i + 4) } else { (i + 4, i + 8) };
        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(y(lo)), y(hi))
    });
    // u[k] (k < 4), per 128-bit lane: rows 0-3 dword k, rows 0-3 dword
    // 4 + k, rows 4-7 dword k, rows 4-7 dword 4 + k; u[4 + k] the same for
    // rows 8-15.
    let lo = transpose_4x4_lanes([z[0], z[1], z[2], z[3]]);
    let hi = transpose_4x4_lanes([z[4], z[5], z[6], z[7]]);
    let u = [lo[0], lo[1], lo[2], lo[3], hi[0], hi[1], hi[2], hi[3]];
    std::array::from_fn(|g| {
        let k = g & 3;
        if g < 4 {
            _mm512_shuffle_i32x4::<0b10_00_10_00>(u[k], u[4 + k])
        } else {
            _mm512_shuffle_i32x4::<0b11_01_11_01>(u[k], u[4 + k])
        }
    })
}

/// The body of `int8_q8_tile_512`, each block column's `d` (16 rows as f32)
/// and eight value groups from `col(b)`.
#[inline(always)]
unsafe fn int8_q8_512<const T: usize>(
    nb: usize,
    xq: &[i8],
    cols: usize,
    xd: &[f32],
    out: &mut [[f32; 16]; T],
    col: impl Fn(usize) -> (__m512, [__m512i; 8]),
) {
    assert!(T <= 8, "int8 kernel: at most 8 activation rows per call");
    assert!(cols >= 32 * nb && xq.len() >= (T - 1) * cols + 32 * nb);
    assert!(xd.len() >= 4 * T * nb);
    let xp = xq.as_ptr();
    let ones = _mm512_set1_epi8(1);
    let mut acc = [_mm512_setzero_ps(); T];
    for b in 0..nb {
        let (d, w) = col(b);
        // Per run of 8 values (groups 2e, 2e + 1): −128·Σw of each row.
        let mut init = [_mm512_setzero_si512(); 4];
        for (e, init) in init.iter_mut().enumerate() {
            let sw = _mm512_dpbusd_epi32(
                _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, w[2 * e]),
                ones,
                w[2 * e + 1],
            );
            *init = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32::<7>(sw));
        }
        // Spelled out per row so that every accumulator stays in a register.
        macro_rules! row {
            ($t:literal) => {
                if $t < T {
                    let x = xp.add($t * cols + 32 * b);
                    let at = $t * nb + b;
                    let x4 = |o: usize| _mm512_set1_epi32((x.add(o) as *const i32).read_unaligned());
                    let mut r = _mm512_setzero_ps();
                    for e in 0..4 {
                        let mut i = _mm512_dpbusd_epi32(init[e], x4(8 * e), w[2 * e]);
                        i = _mm512_dpbusd_epi32(i, x4(8 * e + 4), w[2 * e + 1]);
                        r = _mm512_fmadd_ps(
                            _mm512_cvtepi32_ps(i),
                            _mm512_set1_ps(*xd.get_unchecked(4 * at + e)),
                            r,
                        );
                    }
                    acc[$t] = _mm512_fmadd_ps(r, d, acc[$t]);
                }
            };
        }
        row!(0);
        row!(1);
        row!(2);
        row!(3);
        row!(4);
        row!(5);
        row!(6);
        row!(7);
    }
    for (o, a) in out.iter_mut().zip(acc) {
        _mm512_storeu_ps(o.as_mut_ptr(), a);
    }
}

/// Up to 16 consecutive ggml rows of Q8_0 (`nb` blocks each; `rows` holds `nr`
/// of them, `rb` bytes apart) repacked into one int8 tile in `out` (`nb · 544`
/// bytes, the layout of `kernels::Blocks::Int8`): per block column the rows'
/// f16 `d`, then eight 64-byte groups, group `g` holding each row's bytes
/// `4g .. 4g + 4` (row `r` at `4r`). Lanes past the last row repeat it
/// (clamped loads); the caller drops their results. Q8_0 matrices stay where
/// the file maps them and are repacked a tile at a time by every product. The
/// 16 rows after them (the next tile's, contiguous) are prefetched, a block
/// column's share each block.
///
/// Per block column: the rows' 32 value bytes paired into eight vectors, an
/// 8 × 8 dword transpose within each 256-bit half (unpacks), and 128-bit lane
/// moves that put the rows in order.
///
/// # Safety
/// The CPU must support AVX-512 F.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn q8_tile_512(rows: &[u8], rb: usize, nr: usize, nb: usize, out: &mut [u8]) {
    const CB: usize = 16 * 34;
    assert!(out.len() >= nb * CB);
    let q8 = Q8Rows::new(rows, rb, nr, nb);
    for b in 0..nb {
        let col = out.as_mut_ptr().add(b * CB);
        let (d, w) = q8.column(b);
        _mm256_storeu_si256(col as *mut __m256i, d);
        for (g, v) in w.iter().enumerate() {
            _mm512_storeu_si512(col.add(32 + 64 * g) as *mut __m512i, *v);
        }
    }
}

/// Up to 16·k ggml Q8_0 rows (`nr` of them in `rows`, `rb` bytes apart) dotted
/// with `T` < 8 rows of 8-bit activations (`Int8Rows` for Q8_0: `xq` the
/// values plus 128 as unsigned bytes, `cols` apart; `xd[4(t·nb + b) + e]` the
/// scale of run `e` of block `b`): `out[r·T + t]`. Decode-sized products,
/// read where the file maps the rows, one row after another (one stream).
/// Per row, two blocks per vector: each i32 lane sums four products
/// (`vpdpbusd`, started at −128·Σw to take the activations' offset back out),
/// and is scaled by its run's `xd` times its block's `d`. Sixteen rows' sums are
/// reduced together (`sum16`). Each row's sum has a fixed order whatever `T`,
/// but not the int8 tiles' order: batches of 8 and more (tiles) round
/// differently, as the K-quants' kernels do.
///
/// # Safety
/// The CPU must support AVX-512 F, VL, BW and VNNI.
#[allow(clippy::needless_range_loop, clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512vnni")]
pub(super) unsafe fn int8_q8_rows_512<const T: usize>(
    rows: &[u8],
    rb: usize,
    nr: usize,
    xq: &[i8],
    xd: &[f32],
    cols: usize,
    out: &mut [f32],
) {
    const BB: usize = 34;
    let nb = cols / 32;
    assert!((1..8).contains(&T) && cols.is_multiple_of(32) && xq.len() >= T * cols && xd.len() >= 4 * T * nb);
    assert!(rb >= nb * BB && (nr == 0 || rows.len() >= (nr - 1) * rb + nb * BB));
    assert!(out.len() >= nr * T);
    let c128 = _mm512_set1_epi8(-128);
    // Lane l of a two-block vector takes run l / 2 of its 8 (two blocks' 4).
    let runs = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    let (xp, dp) = (xq.as_ptr(), xd.as_ptr());
    let mut acc = [[_mm512_setzero_ps(); 16]; T];
    for g in (0..nr).step_by(16) {
        let m = 16.min(nr - g);
        for r in 0..16 {
            let mut a = [_mm512_setzero_ps(); T];
            if r < m {
                let row = rows.as_ptr().add((g + r) * rb);
                for b in (0..nb).step_by(2) {
                    let two = b + 1 < nb;
                    let blk = row.add(b * BB);
                    // Well ahead, past the row's end into the next (a hint,
                    // never a fault: hence `wrapping_add`).
                    _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(Q8_ROW_PREFETCH) as *const i8);
                    _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(Q8_ROW_PREFETCH + 64) as *const i8);
                    let lo = _mm256_loadu_si256(blk.add(2) as *const __m256i);
                    let (w, dw) = if two {
                        let hi = _mm256_loadu_si256(blk.add(BB + 2) as *const __m256i);
                        let d = _mm256_inserti128_si256::<1>(
                            _mm256_castsi128_si256(_mm_set1_epi16((blk as *const i16).read_unaligned())),
                            _mm_set1_epi16((blk.add(BB) as *const i16).read_unaligned()),
                        );
                        (
                            _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi),
                            _mm512_cvtph_ps(d),
                        )
                    } else {
                        let d = _mm256_zextsi128_si256(_mm_set1_epi16((blk as *const i16).read_unaligned()));
                        (_mm512_zextsi256_si512(lo), _mm512_cvtph_ps(d))
                    };
                    let init = _mm512_sub_epi32(
                        _mm512_setzero_si512(),
                        _mm512_dpbusd_epi32(_mm512_setzero_si512(), c128, w),
                    );
                    let lanes: __mmask16 = if two { 0xFFFF } else { 0x00FF };
                    let runs8: __mmask8 = if two { 0xFF } else { 0x0F };
                    for t in 0..T {
                        let x = _mm512_maskz_loadu_epi32(lanes, xp.add(t * cols + 32 * b) as *const i32);
                        let d8 = _mm256_maskz_loadu_ps(runs8, dp.add(4 * (t * nb + b)));
                        let xd = _mm512_permutexvar_ps(runs, _mm512_castps256_ps512(d8));
                        let i = _mm512_dpbusd_epi32(init, x, w);
                        a[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), _mm512_mul_ps(xd, dw), a[t]);
                    }
                }
            }
            for t in 0..T {
                acc[t][r] = a[t];
            }
        }
        for t in 0..T {
            let mut sums = [0f32; 16];
            _mm512_storeu_ps(sums.as_mut_ptr(), sum16(&acc[t]));
            for r in 0..m {
                out[(g + r) * T + t] = sums[r];
            }
        }
    }
}

/// How far ahead `int8_q8_rows_512` prefetches its row.
const Q8_ROW_PREFETCH: usize = 1024;

// ------------------------------------------------------ AVX-512, attention ----

/// An element type of the KV cache: 16 of them at `p` as 16 × f32.
pub(super) trait KvLane: Copy {
    /// # Safety
    /// 16 elements must be readable at `p`; the CPU must support AVX-512 F.
    unsafe fn load16(p: *const Self) -> __m512;
}

impl KvLane for f32 {
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> __m512 {
        _mm512_loadu_ps(p)
    }
}

impl KvLane for half::f16 {
    #[inline(always)]
    unsafe fn load16(p: *const half::f16) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }
}

/// The 16 horizontal sums of `a` as one vector (lane `i` = Σ `a[i]`), by a
/// transposing tree: ~3 instructions per sum where `_mm512_reduce_add_ps` takes 8.
#[inline(always)]
unsafe fn sum16(a: &[__m512; 16]) -> __m512 {
    // Pairs: per 128-bit lane l, [a0(4l)+a0(4l+2), a1(..), a0(4l+1)+a0(4l+3), a1(..)].
    let mut x = [_mm512_setzero_ps(); 8];
    for (i, x) in x.iter_mut().enumerate() {
        let (p, q) = (a[2 * i], a[2 * i + 1]);
        *x = _mm512_add_ps(_mm512_unpacklo_ps(p, q), _mm512_unpackhi_ps(p, q));
    }
    // Quads: per 128-bit lane, the lane's partial sums of four inputs in order.
    let mut z = [_mm512_setzero_ps(); 4];
    for (i, z) in z.iter_mut().enumerate() {
        let (p, q) = (_mm512_castps_pd(x[2 * i]), _mm512_castps_pd(x[2 * i + 1]));
        let (lo, hi) = (_mm512_unpacklo_pd(p, q), _mm512_unpackhi_pd(p, q));
        *z = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
    }
    // Across the 128-bit lanes.
    let half = |p: __m512, q: __m512| {
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b10_00_10_00>(p, q),
            _mm512_shuffle_f32x4::<0b11_01_11_01>(p, q),
        )
    };
    half(half(z[0], z[1]), half(z[2], z[3]))
}

/// `scores[h * len + j] = scale · dot(q head h, key first + j)` for the `g` query
/// heads of `q` (`[g, hd]`) and `len` keys of `k`, which holds whole blocks of 16
/// positions in the cache's key layout (`kernels::KEY_BLOCK`: per block, `hd` rows
/// of 16 positions), starting `first` positions into its first block. One vector
/// holds a block's 16 scores: each dimension's 16 keys (one load) meet the query
/// value broadcast, so no horizontal sums. Four partial sums per head (dimensions
/// mod 4) keep enough independent multiply-adds in flight. The matching rows of
/// `v` (`[.., hd]`, from position `first`) are prefetched into L2 on the way, so
/// the values pass that follows finds them there.
///
/// # Safety
/// The CPU must support AVX-512 F, VL, BW and DQ.
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn attention_scores_512<T: KvLane>(
    q: &[f32],
    k: &[T],
    first: usize,
    v: &[T],
    hd: usize,
    len: usize,
    scale: f32,
    scores: &mut [f32],
) {
    let g = q.len() / hd;
    let blocks = (first + len).div_ceil(16);
    assert!(hd.is_multiple_of(16) && first < 16 && q.len() == g * hd && scores.len() >= g * len);
    assert!(k.len() >= blocks * 16 * hd && v.len() >= len * hd);
    let (qp, kp, vp, sp) = (q.as_ptr(), k.as_ptr(), v.as_ptr(), scores.as_mut_ptr());
    let sv = _mm512_set1_ps(scale);
    // Elements per 64-byte cache line.
    let line = 64 / std::mem::size_of::<T>();
    for b in 0..blocks {
        let kb = kp.add(b * 16 * hd);
        // The next block's keys, while this one is summed, and this block's values
        // (`v` starts at position `first`). Measured: spreading these through the
        // block's arithmetic changed nothing; at batch 8 the attention passes are
        // bound by reading the caches (the prefetches wait on full fill buffers).
        let vb = vp.wrapping_add((16 * b).saturating_sub(first) * hd);
        for l in (0..16 * hd).step_by(line) {
            _mm_prefetch::<_MM_HINT_T0>(kb.wrapping_add(16 * hd + l) as *const i8);
            _mm_prefetch::<_MM_HINT_T1>(vb.wrapping_add(l) as *const i8);
        }
        // Lanes of this block inside first .. first + len; score index of lane 0.
        let lo = if b == 0 { first } else { 0 };
        let hi = (first + len - 16 * b).min(16);
        let mask: __mmask16 = ((1u32 << hi) - (1u32 << lo)) as u16;
        let at = (16 * b).wrapping_sub(first);
        for h0 in (0..g).step_by(4) {
            let qh = qp.add(h0 * hd);
            // Masked stores: lanes outside the range are neither read nor
            // written, so the address may start before `scores` (hence wrapping).
            macro_rules! heads {
                ($gh:literal) => {
                    for (hh, sum) in block_scores::<T, $gh>(qh, kb, hd).iter().enumerate() {
                        let o = sp.wrapping_add((h0 + hh) * len).wrapping_add(at);
                        _mm512_mask_storeu_ps(o, mask, _mm512_mul_ps(*sum, sv));
                    }
                };
            }
            // The head count as a constant: no per-head branches in the loop.
            match g - h0 {
                1 => heads!(1),
                2 => heads!(2),
                3 => heads!(3),
                _ => heads!(4),
            }
        }
    }
}

/// One block's unscaled scores for `G` query heads (`q`, `[G, hd]`) against the
/// block of keys at `kb` (key layout: `hd` rows of 16 positions). Four partial
/// sums per head (dimensions mod 4) keep the multiply-adds independent.
#[inline(always)]
unsafe fn block_scores<T: KvLane, const G: usize>(q: *const f32, kb: *const T, hd: usize) -> [__m512; G] {
    let mut acc = [[_mm512_setzero_ps(); 4]; G];
    for c in (0..hd).step_by(4) {
        for u in 0..4 {
            let lane = T::load16(kb.add((c + u) * 16));
            for (h, acc) in acc.iter_mut().enumerate() {
                acc[u] = _mm512_fmadd_ps(_mm512_set1_ps(*q.add(h * hd + c + u)), lane, acc[u]);
            }
        }
    }
    let mut out = [_mm512_setzero_ps(); G];
    for (o, a) in out.iter_mut().zip(&acc) {
        *o = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
    }
    out
}

/// exp of each lane to about 1 ulp: `2^n · p(r)` with `r = x − n·ln 2`,
/// |r| ≤ ln2/2, `p` the degree-7 Taylor polynomial (error < 5e-9). Inputs are
/// clamped to [−87.3, 88.7]: below, the result is already under f32's normal
/// range; above, it would overflow.
#[inline(always)]
unsafe fn exp_512(x: __m512) -> __m512 {
    let x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3)), _mm512_set1_ps(88.7));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
        x,
        _mm512_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
    let mut p = _mm512_set1_ps(1.0 / 5040.0);
    for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    _mm512_scalef_ps(p, n)
}

/// `out = silu(g) · u = g / (1 + exp(−g)) · u`, element-wise.
///
/// # Safety
/// The CPU must support AVX-512 F.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn silu_mul_512(g: &[f32], u: &[f32], out: &mut [f32]) {
    let len = out.len();
    assert!(g.len() == len && u.len() == len);
    let (gp, up, op) = (g.as_ptr(), u.as_ptr(), out.as_mut_ptr());
    let one = _mm512_set1_ps(1.0);
    let step = |k: __mmask16, i: usize| {
        let gv = _mm512_maskz_loadu_ps(k, gp.add(i));
        let e = exp_512(_mm512_sub_ps(_mm512_setzero_ps(), gv));
        let s = _mm512_div_ps(gv, _mm512_add_ps(one, e));
        _mm512_mask_storeu_ps(op.add(i), k, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(k, up.add(i))));
    };
    let full = len / 16 * 16;
    for i in (0..full).step_by(16) {
        step(0xFFFF, i);
    }
    if full < len {
        step(((1u32 << (len - full)) - 1) as __mmask16, full);
    }
}

/// `row[i] = exp(row[i] - max)` in place (`exp_512`), returning Σ row (vector
/// lanes summed at the end).
///
/// # Safety
/// The CPU must support AVX-512 F.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn exp_shifted_512(row: &mut [f32], max: f32) -> f32 {
    let exp = |x: __m512| exp_512(x);
    let (len, rp) = (row.len(), row.as_mut_ptr());
    let m = _mm512_set1_ps(max);
    let mut sum = _mm512_setzero_ps();
    let full = len / 16 * 16;
    for i in (0..full).step_by(16) {
        let e = exp(_mm512_sub_ps(_mm512_loadu_ps(rp.add(i)), m));
        _mm512_storeu_ps(rp.add(i), e);
        sum = _mm512_add_ps(sum, e);
    }
    if full < len {
        let k: __mmask16 = (1u32 << (len - full)) as u16 - 1;
        let e = exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, rp.add(full)), m));
        _mm512_mask_storeu_ps(rp.add(full), k, e);
        sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(k, e));
    }
    _mm512_reduce_add_ps(sum)
}

/// The largest of `row` (non-empty).
///
/// # Safety
/// The CPU must support AVX-512 F.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn max_512(row: &[f32]) -> f32 {
    let (len, rp) = (row.len(), row.as_ptr());
    let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
    let full = len / 16 * 16;
    for i in (0..full).step_by(16) {
        m = _mm512_max_ps(m, _mm512_loadu_ps(rp.add(i)));
    }
    let mut m = _mm512_reduce_max_ps(m);
    for &v in &row[full..] {
        m = m.max(v);
    }
    m
}

/// `out[h] = Σ_j p[h * len + j] · v row j` for the `g` heads of `out` (`[g, hd]`),
/// `hd` a multiple of 16.
///
/// # Safety
/// The CPU must support AVX-512 F, VL, BW and DQ.
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq")]
pub(super) unsafe fn attention_values_512<T: KvLane>(p: &[f32], v: &[T], hd: usize, len: usize, out: &mut [f32]) {
    let g = out.len() / hd;
    assert!(hd.is_multiple_of(16) && out.len() == g * hd && v.len() >= len * hd && p.len() >= g * len);
    let (pp, vp, op) = (p.as_ptr(), v.as_ptr(), out.as_mut_ptr());
    // 64 values of every head at a time: 4 × g accumulators stay in registers.
    for c0 in (0..hd).step_by(64) {
        let w = (hd - c0).min(64) / 16;
        for h0 in (0..g).step_by(4) {
            let gh = (g - h0).min(4);
            let mut acc = [[_mm512_setzero_ps(); 4]; 4];
            for j in 0..len {
                let vj = vp.add(j * hd + c0);
                for (hh, acc) in acc.iter_mut().enumerate().take(gh) {
                    let pj = _mm512_set1_ps(*pp.add((h0 + hh) * len + j));
                    for (c, a) in acc.iter_mut().enumerate().take(w) {
                        *a = _mm512_fmadd_ps(pj, T::load16(vj.add(16 * c)), *a);
                    }
                }
            }
            for (hh, acc) in acc.iter().enumerate().take(gh) {
                for (c, a) in acc.iter().enumerate().take(w) {
                    _mm512_storeu_ps(op.add((h0 + hh) * hd + c0 + 16 * c), *a);
                }
            }
        }
    }
}

// ------------------------------------------- AVX-512 VNNI, int8 K-quants ----

/// How far ahead `int8_kquant_512` prefetches its weight row (8B Q4_K_M decode,
/// medians of 3: 2 KiB 3.5, 4 KiB 3.7, 8 KiB 3.7 tok/s; 1B: 23.2, 25.3, 24.9).
const KQ_PREFETCH_BYTES: usize = 4096;

/// `int8_kquant_512`'s block kinds.
pub(super) const KQ4: u8 = 0;
pub(super) const KQ5: u8 = 1;
pub(super) const KQ6: u8 = 2;

/// 16 × i16 lane indices of `vpermw` picking, for the 32 i16 lanes of a product,
/// scale `a` for lanes `0..16` and `b` for lanes `16..32` (Q4_K / Q5_K: one scale
/// per 32 values) or scales `a, a+1, a+2, a+3` per 8 lanes (Q6_K: one per 16).
#[inline(always)]
unsafe fn scale_index(kq: u8, a: i16, b: i16) -> __m512i {
    let mut idx = [0i16; 32];
    for (i, v) in idx.iter_mut().enumerate() {
        *v = if kq == KQ6 {
            a + (i / 8) as i16
        } else if i < 16 {
            a
        } else {
            b
        };
    }
    _mm512_loadu_si512(idx.as_ptr() as *const __m512i)
}

/// ggml's packed 6-bit scales and mins of a Q4_K / Q5_K block (12 bytes at `p`)
/// as 8 + 8 bytes: `(scales, mins)`, each value in its own byte.
#[inline(always)]
unsafe fn k4_scales(p: *const u8) -> (u64, u64) {
    let u = |i: usize| (p.add(4 * i) as *const u32).read_unaligned();
    let (a, b, c) = (u(0), u(1), u(2));
    const M6: u32 = 0x3f3f_3f3f;
    const M4: u32 = 0x0f0f_0f0f;
    const M2: u32 = 0x0303_0303;
    let sc_lo = a & M6;
    let sc_hi = (c & M4) | (((a >> 6) & M2) << 4);
    let m_lo = b & M6;
    let m_hi = ((c >> 4) & M4) | (((b >> 6) & M2) << 4);
    (sc_lo as u64 | (sc_hi as u64) << 32, m_lo as u64 | (m_hi as u64) << 32)
}

/// `vpdpwssd` (`acc += a·b` over i16 pairs into i32 lanes), as one instruction.
/// LLVM splits `_mm512_dpwssd_epi32` into `vpmaddwd` + `vpaddd` unless it
/// knows the target CPU runs the fused form fast, and with a generic target
/// it knows none: one more instruction per use in the K-quant kernels' inner
/// loops. A macro, so the `asm!` sits in the caller, whose AVX-512 VNNI
/// target features it needs.
macro_rules! dpwssd {
    ($acc:expr, $a:expr, $b:expr) => {{
        let mut acc: __m512i = $acc;
        let (a, b): (__m512i, __m512i) = ($a, $b);
        std::arch::asm!(
            "vpdpwssd {acc}, {a}, {b}",
            acc = inout(zmm_reg) acc,
            a = in(zmm_reg) a,
            b = in(zmm_reg) b,
            options(pure, nomem, nostack, preserves_flags),
        );
        acc
    }};
}

/// The block bytes and blocks per row of an `int8_kquant_512` /
/// `int8_kquant_256` call, after checking its slices hold what it reads.
#[allow(clippy::too_many_arguments)]
fn kquant_rows_checked(
    kq: u8,
    t: usize,
    rows: &[u8],
    rb: usize,
    nr: usize,
    xq: &[i8],
    xd: &[f32],
    xs: &[i16],
    cols: usize,
    stride: usize,
    out: &[f32],
) -> (usize, usize) {
    let bb = kblock_bytes(kq);
    let nb = cols / 256;
    assert!(cols.is_multiple_of(256) && stride >= cols && xq.len() >= (t - 1) * stride + cols);
    assert!(xd.len() >= t * nb && xs.len() >= 16 * t * nb);
    assert!(rb >= nb * bb && (nr == 0 || rows.len() >= (nr - 1) * rb + nb * bb));
    assert!(out.len() >= nr * t);
    (bb, nb)
}

/// `out[i·T + t] = dot(weight row i, activation row t)` for `nr` consecutive
/// ggml rows of Q4_K / Q5_K / Q6_K (`KQ`; `rows` holds them, `rb` bytes apart)
/// and `T` activation rows rounded to 8 bits per
/// block of 256 (llama.cpp's Q8_K): `xq` (`stride` apart; for Q4_K / Q5_K each
/// block's 32-value runs in the order 0, 2, 1, 3, 4, 6, 5, 7, the order in which
/// the weights' nibbles come out of a 64-byte load), `xd[t·nb + b]` the block's
/// scale, `xs[16(t·nb + b) ..]` its sums of `q` (Q4_K / Q5_K: 8 sums over the
/// 32-value runs in natural order; Q6_K: 16 sums over runs of 16).
///
/// Per block: `vpmaddubsw` multiplies the unsigned weight values (0..15, 0..31,
/// 0..63) by the signed activations into i16 pairs, `vpdpwssd` weights those
/// by each run's scale into i32 lanes; the mins (Q4_K / Q5_K) or the −32 offset
/// (Q6_K) meet the activation sums. The integer sums are exact, so a result
/// does not depend on `T` or the other rows.
///
/// Sixteen rows' vector sums are reduced together (`sum16`, ~3 instructions a
/// row): decode rows are short (8 blocks at 2048 columns), and a call and an
/// `_mm512_reduce_add_ps` per row were a fifth of a row's time (Q4_K 2048 ×
/// 2048, one thread, in cache: 0.103 → 0.084 ms). Each lane sums its own row
/// in a fixed order, so a row's result does not depend on its neighbours.
///
/// # Safety
/// The CPU must support AVX-512 F, VL, BW and VNNI.
#[allow(clippy::needless_range_loop, clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512vnni")]
pub(super) unsafe fn int8_kquant_512<const KQ: u8, const T: usize>(
    rows: &[u8],
    rb: usize,
    nr: usize,
    xq: &[i8],
    xd: &[f32],
    xs: &[i16],
    cols: usize,
    stride: usize,
    out: &mut [f32],
) {
    let (_, nb) = kquant_rows_checked(KQ, T, rows, rb, nr, xq, xd, xs, cols, stride, out);
    // Q4_K / Q5_K: the products' scales (see `scale_index`); Q6_K: per half.
    let idx = if KQ == KQ6 {
        [
            scale_index(KQ, 0, 0),
            scale_index(KQ, 4, 0),
            scale_index(KQ, 8, 0),
            scale_index(KQ, 12, 0),
        ]
    } else {
        [
            scale_index(KQ, 0, 2),
            scale_index(KQ, 1, 3),
            scale_index(KQ, 4, 6),
            scale_index(KQ, 5, 7),
        ]
    };
    let mut acc = [[_mm512_setzero_ps(); 16]; T];
    for g in (0..nr).step_by(16) {
        let m = 16.min(nr - g);
        for r in 0..16 {
            let a = if r < m {
                kq_row_512::<KQ, T>(rows.as_ptr().add((g + r) * rb), nb, xq, xd, xs, stride, &idx)
            } else {
                [_mm512_setzero_ps(); T]
            };
            for t in 0..T {
                acc[t][r] = a[t];
            }
        }
        for t in 0..T {
            let mut sums = [0f32; 16];
            _mm512_storeu_ps(sums.as_mut_ptr(), sum16(&acc[t]));
            for r in 0..m {
                out[(g + r) * T + t] = sums[r];
            }
        }
    }
}

/// One row's per-lane sums for `int8_kquant_512` (`nb` blocks at
/// `blk0`; `idx` the scale indices).
#[allow(clippy::needless_range_loop, clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn kq_row_512<const KQ: u8, const T: usize>(
    blk0: *const u8,
    nb: usize,
    xq: &[i8],
    xd: &[f32],
    xs: &[i16],
    stride: usize,
    idx: &[__m512i; 4],
) -> [__m512; T] {
    let xp = xq.as_ptr();
    let [i0, i1, i2, i3] = *idx;
    let mut acc = [_mm512_setzero_ps(); T];
    for b in 0..nb {
        let blk = blk0.add(b * kblock_bytes(KQ));
        // Decode streams every weight from memory once: prefetch well ahead (past
        // the row's end into the next row, which comes next), a hint
        // that never faults (hence `wrapping_add`).
        for l in 0..3 {
            _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(KQ_PREFETCH_BYTES + 64 * l) as *const i8);
        }
        // The four 64-value weight vectors (unsigned bytes) and their scales.
        let (w, s, fix, d) = match KQ {
            KQ4 | KQ5 => {
                let d = f16_at(std::slice::from_raw_parts(blk, 4), 0);
                let dmin = f16_at(std::slice::from_raw_parts(blk, 4), 2);
                let (sc, mn) = k4_scales(blk.add(4));
                let sc16 = _mm512_zextsi128_si512(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(sc as i64)));
                let mn16 = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(mn as i64));
                let w = kq_bytes::<KQ>(blk);
                let s = [
                    _mm512_permutexvar_epi16(i0, sc16),
                    _mm512_permutexvar_epi16(i1, sc16),
                    _mm512_permutexvar_epi16(i2, sc16),
                    _mm512_permutexvar_epi16(i3, sc16),
                ];
                (w, s, (_mm256_zextsi128_si256(mn16), -dmin), d)
            }
            _ => {
                let sc = _mm256_cvtepi8_epi16(_mm_loadu_si128(blk.add(192) as *const __m128i));
                let d6 = f16_at(std::slice::from_raw_parts(blk.add(208), 2), 0);
                let w = kq_bytes::<KQ>(blk);
                let sc512 = _mm512_zextsi256_si512(sc);
                let s = [
                    _mm512_permutexvar_epi16(i0, sc512),
                    _mm512_permutexvar_epi16(i1, sc512),
                    _mm512_permutexvar_epi16(i2, sc512),
                    _mm512_permutexvar_epi16(i3, sc512),
                ];
                // The −32 of every value, through the runs' sums: −32·Σ sc·Σq.
                (w, s, (sc, 0.0), d6)
            }
        };
        let vd = _mm512_set1_ps(d);
        for t in 0..T {
            let x = xp.add(t * stride + 256 * b);
            let at = t * nb + b;
            let mut i = _mm512_setzero_si512();
            for k in 0..4 {
                let p = _mm512_maddubs_epi16(w[k], _mm512_loadu_si512(x.add(64 * k) as *const __m512i));
                i = dpwssd!(i, p, s[k]);
            }
            let sums = _mm256_loadu_si256(xs.as_ptr().add(16 * at) as *const __m256i);
            let dx = _mm512_set1_ps(*xd.get_unchecked(at));
            if KQ == KQ6 {
                // Σ_k sc_k·sums_k (8 i32 lanes), times 32, out of the integer sum.
                let off = _mm256_slli_epi32::<5>(_mm256_madd_epi16(fix.0, sums));
                i = _mm512_sub_epi32(i, _mm512_zextsi256_si512(off));
                acc[t] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(i), vd), dx, acc[t]);
            } else {
                // The mins: −dmin·Σ_j m_j·sums_j, in the first 8 lanes.
                let mins = _mm512_cvtepi32_ps(_mm512_zextsi256_si512(_mm256_madd_epi16(fix.0, sums)));
                let v = _mm512_fmadd_ps(mins, _mm512_set1_ps(fix.1), _mm512_mul_ps(_mm512_cvtepi32_ps(i), vd));
                acc[t] = _mm512_fmadd_ps(v, dx, acc[t]);
            }
        }
    }
    acc
}

/// `int8_kquant_512` for CPUs with AVX2 but not AVX-512 VNNI (most desktop
/// and laptop CPUs): the same arguments, activations and output. Each
/// 32-value run (Q6_K: two runs of 16) fills one vector, so its scale is one
/// broadcast: `vpmaddubsw` multiplies the unsigned weight values by the
/// signed activations into i16 pairs (at most 2 · 63 · 127, no saturation),
/// `vpmaddwd` weights them by the run's scale into i32 lanes. The integer sums
/// are exact and each row is summed on its own, so a result does not depend on
/// `T` or the other rows. Without it, AVX2 hosts dequantized K-quant rows to
/// f32 and decoded a 1B Q4_K_M model at a quarter of the memory's pace.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[allow(clippy::needless_range_loop, clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn int8_kquant_256<const KQ: u8, const T: usize>(
    rows: &[u8],
    rb: usize,
    nr: usize,
    xq: &[i8],
    xd: &[f32],
    xs: &[i16],
    cols: usize,
    stride: usize,
    out: &mut [f32],
) {
    let (bb, nb) = kquant_rows_checked(KQ, T, rows, rb, nr, xq, xd, xs, cols, stride, out);
    // Where natural run c's activations are (Q4_K / Q5_K: see `round_row`).
    const POS: [usize; 8] = [0, 2, 1, 3, 4, 6, 5, 7];
    let m4 = _mm256_set1_epi8(0x0F);
    let xp = xq.as_ptr();
    for r in 0..nr {
        let mut acc = [_mm256_setzero_ps(); T];
        for b in 0..nb {
            let blk = rows.as_ptr().add(r * rb + b * bb);
            // Decode streams the weights from memory once (see `kq_row_512`).
            for l in 0..bb.div_ceil(64) {
                _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(KQ_PREFETCH_BYTES + 64 * l) as *const i8);
            }
            // Values 32c .. 32c + 32 of the block as unsigned bytes, and their scales.
            let mut w = [_mm256_setzero_si256(); 8];
            let mut sc = [_mm256_setzero_si256(); 8];
            let hdr = std::slice::from_raw_parts(blk, bb);
            let (d, fix) = if KQ == KQ6 {
                let (ql, qh) = (blk, blk.add(128));
                let h30 = _mm256_set1_epi8(0x30);
                for h in 0..2 {
                    let l0 = _mm256_loadu_si256(ql.add(64 * h) as *const __m256i);
                    let l1 = _mm256_loadu_si256(ql.add(64 * h + 32) as *const __m256i);
                    let hh = _mm256_loadu_si256(qh.add(32 * h) as *const __m256i);
                    w[4 * h] = _mm256_or_si256(
                        _mm256_and_si256(l0, m4),
                        _mm256_and_si256(_mm256_slli_epi16::<4>(hh), h30),
                    );
                    w[4 * h + 1] = _mm256_or_si256(
                        _mm256_and_si256(l1, m4),
                        _mm256_and_si256(_mm256_slli_epi16::<2>(hh), h30),
                    );
                    w[4 * h + 2] = _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(l0), m4),
                        _mm256_and_si256(hh, h30),
                    );
                    w[4 * h + 3] = _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(l1), m4),
                        _mm256_and_si256(_mm256_srli_epi16::<2>(hh), h30),
                    );
                }
                let s = std::slice::from_raw_parts(blk.add(192) as *const i8, 16);
                for c in 0..8 {
                    sc[c] = _mm256_set_m128i(_mm_set1_epi16(s[2 * c + 1] as i16), _mm_set1_epi16(s[2 * c] as i16));
                }
                // The −32 of every value, through the runs' sums: 32·Σ sc·Σq.
                (
                    f16_at(hdr, 208),
                    _mm256_cvtepi8_epi16(_mm_loadu_si128(blk.add(192) as *const __m128i)),
                )
            } else {
                let (scs, mins) = k4_scales(blk.add(4));
                let qs = blk.add(if KQ == KQ4 { 16 } else { 48 });
                for j in 0..4 {
                    let q = _mm256_loadu_si256(qs.add(32 * j) as *const __m256i);
                    w[2 * j] = _mm256_and_si256(q, m4);
                    w[2 * j + 1] = _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4);
                }
                if KQ == KQ5 {
                    // qh bit c of each byte adds 16 to value c's run.
                    let qh = _mm256_loadu_si256(blk.add(16) as *const __m256i);
                    let one = _mm256_set1_epi8(1);
                    for c in 0..8 {
                        let bit = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(c as i32)), one);
                        w[c] = _mm256_or_si256(w[c], _mm256_slli_epi16::<4>(bit));
                    }
                }
                for c in 0..8 {
                    sc[c] = _mm256_set1_epi16(((scs >> (8 * c)) & 0xFF) as i16);
                }
                let mn = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(mins as i64));
                (f16_at(hdr, 0), _mm256_zextsi128_si256(mn))
            };
            let vd = _mm256_set1_ps(d);
            for t in 0..T {
                let at = t * nb + b;
                let x = xp.add(t * stride + 256 * b);
                let mut i = _mm256_setzero_si256();
                for c in 0..8 {
                    let xo = if KQ == KQ6 { 32 * c } else { 32 * POS[c] };
                    let p = _mm256_maddubs_epi16(w[c], _mm256_loadu_si256(x.add(xo) as *const __m256i));
                    i = _mm256_add_epi32(i, _mm256_madd_epi16(p, sc[c]));
                }
                let sums = _mm256_loadu_si256(xs.as_ptr().add(16 * at) as *const __m256i);
                let dx = _mm256_set1_ps(*xd.get_unchecked(at));
                if KQ == KQ6 {
                    i = _mm256_sub_epi32(i, _mm256_slli_epi32::<5>(_mm256_madd_epi16(fix, sums)));
                    acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(i), vd), dx, acc[t]);
                } else {
                    // The mins: −dmin·Σ_j m_j·sums_j (8 sums, the upper 8 i16 of
                    // `sums` meet zeros).
                    let dmin = _mm256_set1_ps(-f16_at(hdr, 2));
                    let mins = _mm256_cvtepi32_ps(_mm256_madd_epi16(fix, sums));
                    let v = _mm256_fmadd_ps(mins, dmin, _mm256_mul_ps(_mm256_cvtepi32_ps(i), vd));
                    acc[t] = _mm256_fmadd_ps(v, dx, acc[t]);
                }
            }
        }
        for t in 0..T {
            out[r * T + t] = hsum256(acc[t]);
        }
    }
}

/// Bytes per 256-value block of a K-quant kind (ggml's `block_q4_K`,
/// `block_q5_K`, `block_q6_K`).
const fn kblock_bytes(kq: u8) -> usize {
    match kq {
        KQ4 => 144,
        KQ5 => 176,
        _ => 210,
    }
}

/// Values per run (one scale) of a K-quant kind: 32 (Q4_K, Q5_K) or 16 (Q6_K).
pub(super) const fn krun(kq: u8) -> usize {
    if kq == KQ6 {
        16
    } else {
        32
    }
}

/// Bytes per run slot of a K-quant int8 tile with runs of `l` values: the 16
/// rows' values, then their run scales (see `kq_tile_512`).
const fn ktile_slot_bytes(l: usize) -> usize {
    16 * l + 64
}

/// Offset of a block column's tail in a K-quant int8 tile with runs of `l`
/// values: after the run slots come the runs' offset multipliers as i16 pairs
/// (one vector per pair of runs), then the 16 rows' offset scales at
/// `ktile_tail(l) + 32 · runs`.
const fn ktile_tail(l: usize) -> usize {
    256 / l * ktile_slot_bytes(l)
}

/// Bytes per block column of a K-quant int8 tile with runs of `l` values.
const fn ktile_bytes(l: usize) -> usize {
    ktile_tail(l) + 32 * (256 / l) + 64
}

/// Bytes per block column of a K-quant int8 tile (see `kq_tile_512`).
pub(super) const fn ktile_block_bytes(kq: u8) -> usize {
    ktile_bytes(krun(kq))
}

/// Up to 16 consecutive ggml rows of Q4_K / Q5_K / Q6_K (`KQ`, `nb` blocks
/// each; `rows` holds `nr` of them, `rb` bytes apart) repacked into one int8
/// tile in `out` (`nb · ktile_block_bytes(KQ)` bytes): per block, per run slot
/// `s` (the activations' run order of `int8_kquant_512`), `L/4` 64-byte groups
/// holding each row's values `4g .. 4g + 4` of the run as unsigned bytes (row
/// `r` at `4r`, as `Blocks::Int8`), then the rows' 16 run scales `d·sc` as f32;
/// after the slots, per pair of runs in natural order one vector of the rows'
/// offset multipliers as i16 pairs (Q4_K / Q5_K: the mins `m`; Q6_K: the
/// scales `sc`), then the rows' offset scales (`−dmin`; Q6_K: `−32·d`) as f32.
/// Q4_K keeps its values packed, two slots' in one (see the body). Rows past
/// the last have zero values. Used for prompts and batches: one
/// repack per tile and product, amortized over all the activation rows.
///
/// The scales are decoded for all 16 rows at once, one row per lane (loaded
/// from the block headers by `head16`; Q6_K's `d` gathered), and the next
/// blocks are prefetched: the weights come from the mapped file, cold.
///
/// # Safety
/// The CPU must support AVX-512 F, VL, BW and VNNI.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512vnni")]
pub(super) unsafe fn kq_tile_512<const KQ: u8>(rows: &[u8], rb: usize, nr: usize, nb: usize, out: &mut [u8]) {
    let bb = kblock_bytes(KQ);
    let (l, tb) = (krun(KQ), ktile_block_bytes(KQ));
    let sb = ktile_slot_bytes(l);
    let ns = 256 / l;
    assert!((1..=16).contains(&nr) && rb >= nb * bb && rows.len() >= (nr - 1) * rb + nb * bb);
    assert!(out.len() >= nb * tb && 16 * rb < i32::MAX as usize);
    // Natural run of each slot (Q4_K / Q5_K: a 64-byte load holds runs 0 and 2, ...).
    const ORDER: [usize; 8] = [0, 2, 1, 3, 4, 6, 5, 7];
    let live: __mmask16 = ((1u32 << nr) - 1) as __mmask16;
    let at = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(rb as i32),
    );
    // Four header bytes at `off` of every row's block `b`, one row per lane.
    let head = |b: usize, off: usize| {
        _mm512_mask_i32gather_epi32::<1>(
            _mm512_setzero_si512(),
            live,
            at,
            rows.as_ptr().add(b * bb + off) as *const i32,
        )
    };
    // The low or high f16 of each lane as f32.
    let f16s = |v: __m512i| _mm512_cvtph_ps(_mm512_cvtepi32_epi16(v));
    let sign = _mm512_set1_epi32(i32::MIN);
    // Q4_K transposes the rows' packed nibbles and leaves them packed: two
    // 16 × 16 transposes, not four of the unpacked values (8B shapes, batch
    // of 8, 14336 × 4096: 2.39–2.50 → 2.06–2.25 ms with the nibbles unpacked
    // after the transposes). Q6_K done the same way (three transposes, more
    // unpacking after them) was no faster (2.9 against 3.0 ms), nor with its
    // values left packed for the product to unpack (3% faster at 8 rows, 5%
    // slower at 128), so it and Q5_K unpack first.
    for b in 0..nb {
        for r in 0..nr {
            let blk = rows.as_ptr().add(r * rb + b * bb);
            for line in 0..bb.div_ceil(64) {
                _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(2 * bb + 64 * line) as *const i8);
            }
        }
        let mut sc = [_mm512_setzero_ps(); 16];
        // The offsets' multipliers, i16 pairs (runs 2p, 2p + 1), and scale.
        let mut pairs = [_mm512_setzero_si512(); 8];
        let lo16 = _mm512_set1_epi32(0xFFFF);
        let neg = if KQ == KQ6 {
            let d = f16s(_mm512_srli_epi32::<16>(head(b, 206)));
            // The 16 scale bytes by loads (`head16`), not four gathers (8B
            // shapes, batch of 8, 4096 × 14336: medians 3.07 → 2.87 ms).
            let q4 = head16(rows, rb, nr, b * bb + 192);
            // Byte i of each lane, sign-extended.
            let sbyte = |v: __m512i, i: usize| match i {
                0 => _mm512_srai_epi32::<24>(_mm512_slli_epi32::<24>(v)),
                1 => _mm512_srai_epi32::<24>(_mm512_slli_epi32::<16>(v)),
                2 => _mm512_srai_epi32::<24>(_mm512_slli_epi32::<8>(v)),
                _ => _mm512_srai_epi32::<24>(v),
            };
            for s in 0..16 {
                sc[s] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(sbyte(q4[s / 4], s % 4)));
            }
            for (p, pair) in pairs.iter_mut().enumerate() {
                let v = q4[p / 2];
                let (a, c) = (sbyte(v, 2 * (p % 2)), sbyte(v, 2 * (p % 2) + 1));
                *pair = _mm512_or_si512(_mm512_and_si512(a, lo16), _mm512_slli_epi32::<16>(c));
            }
            _mm512_mul_ps(_mm512_set1_ps(-32.0), d)
        } else {
            // ggml's get_scale_min_k4 on all rows at once (as `k4_scales`).
            // The 16-byte headers by loads and a transpose, not four gathers
            // (slow on Zen 4: ~23 cycles each, a tenth of a Q4_K tile block).
            let [hd, a4, b4, c4] = head16(rows, rb, nr, b * bb);
            let d = f16s(hd);
            let neg_dmin = _mm512_castsi512_ps(_mm512_xor_si512(
                _mm512_castps_si512(f16s(_mm512_srli_epi32::<16>(hd))),
                sign,
            ));
            let (m6, m4, m2) = (
                _mm512_set1_epi32(0x3f3f_3f3f),
                _mm512_set1_epi32(0x0f0f_0f0f),
                _mm512_set1_epi32(0x0303_0303),
            );
            let hi2 = |x: __m512i| _mm512_slli_epi32::<4>(_mm512_and_si512(_mm512_srli_epi32::<6>(x), m2));
            let scs = [
                _mm512_and_si512(a4, m6),
                _mm512_or_si512(_mm512_and_si512(c4, m4), hi2(a4)),
            ];
            let mins = [
                _mm512_and_si512(b4, m6),
                _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32::<4>(c4), m4), hi2(b4)),
            ];
            let byte = |v: __m512i, i: usize| {
                let v = match i {
                    0 => v,
                    1 => _mm512_srli_epi32::<8>(v),
                    2 => _mm512_srli_epi32::<16>(v),
                    _ => _mm512_srli_epi32::<24>(v),
                };
                _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(0xFF)))
            };
            for s in 0..8 {
                let j = ORDER[s];
                sc[s] = _mm512_mul_ps(d, byte(scs[j / 4], j % 4));
            }
            let ff = _mm512_set1_epi32(0xFF);
            for (p, pair) in pairs.iter_mut().take(4).enumerate() {
                let v = if p % 2 == 0 {
                    mins[p / 2]
                } else {
                    _mm512_srli_epi32::<16>(mins[p / 2])
                };
                let hi = _mm512_and_si512(_mm512_srli_epi32::<8>(v), ff);
                *pair = _mm512_or_si512(_mm512_and_si512(v, ff), _mm512_slli_epi32::<16>(hi));
            }
            neg_dmin
        };
        // Each group: the 16 rows' 4 bytes. Vector k of every row (64 values),
        // transposed by dwords, gives groups 16k .. 16k + 16 of the block.
        let col = out.as_mut_ptr().add(b * tb);
        // Group j of vector k (`kq_bytes`' order) to its run slot.
        let put = |k: usize, j: usize, v: __m512i| {
            let (s, g) = ((16 * k + j) / (l / 4), (16 * k + j) % (l / 4));
            _mm512_storeu_si512(col.add(s * sb + 64 * g) as *mut __m512i, v);
        };
        // 64 bytes at `off` of every row's block, transposed by dwords.
        let packed_at = |off: usize| {
            transpose_16x16(std::array::from_fn(|r| {
                if r < nr {
                    _mm512_loadu_si512(rows.as_ptr().add(r * rb + b * bb + off) as *const __m512i)
                } else {
                    _mm512_setzero_si512()
                }
            }))
        };
        if KQ == KQ4 {
            // As `kq_bytes`, vector 2h is the low nibbles of bytes 64h .., 2h + 1
            // the high. The bytes go transposed but packed where vector 2h's
            // values would (slots 4h, 4h + 1); slots 4h + 2, 4h + 3 (the high
            // nibbles) keep their scales but no values, and
            // `int8_ktile_512::<KQ4, _>` unpacks both as it reads them:
            // half the bytes written and read back (8B shapes, batch of 8,
            // 14336 × 4096: 2.31–2.42 → 2.03–2.11 ms).
            for h in 0..2 {
                for (j, t) in packed_at(16 + 64 * h).into_iter().enumerate() {
                    put(2 * h, j, t);
                }
            }
        } else {
            // Each row's vector k made and transposed in registers, not all
            // four stored and loaded back (8B shapes, batch of 8, 4096 ×
            // 14336 Q6_K, two threads: 3.10–3.12 → 2.91–3.05 ms).
            for k in 0..4 {
                let m: [__m512i; 16] = std::array::from_fn(|r| {
                    if r < nr {
                        kq_byte::<KQ>(rows.as_ptr().add(r * rb + b * bb), k)
                    } else {
                        _mm512_setzero_si512()
                    }
                });
                for (j, v) in transpose_16x16(m).into_iter().enumerate() {
                    put(k, j, v);
                }
            }
        }
        for s in 0..ns {
            _mm512_storeu_ps(col.add(s * sb + 16 * l) as *mut f32, sc[s]);
        }
        let tail = col.add(ktile_tail(l));
        for (p, pair) in pairs.iter().take(ns / 2).enumerate() {
            _mm512_storeu_si512(tail.add(64 * p) as *mut __m512i, *pair);
        }
        _mm512_storeu_ps(tail.add(32 * ns) as *mut f32, neg);
    }
}

/// Dword `c` of the 16 bytes at `off` of each of `nr` rows (`rb` bytes apart;
/// lanes past the last row repeat it): `out[c]` lane `r` = row `r`'s. Sixteen
/// loads, twelve lane inserts and a 4 × 4 transpose within each 128-bit lane.
#[inline(always)]
unsafe fn head16(rows: &[u8], rb: usize, nr: usize, off: usize) -> [__m512i; 4] {
    // Clamped, not a branch to a zero vector: that built the vectors on the
    // stack and ran slower than the gathers.
    let row = |r: usize| _mm_loadu_si128(rows.as_ptr().add(r.min(nr - 1) * rb + off) as *const __m128i);
    // z[q] lane L = row 4L + q's header.
    let z: [__m512i; 4] = std::array::from_fn(|q| {
        let v = _mm512_castsi128_si512(row(q));
        let v = _mm512_inserti32x4::<1>(v, row(4 + q));
        let v = _mm512_inserti32x4::<2>(v, row(8 + q));
        _mm512_inserti32x4::<3>(v, row(12 + q))
    });
    transpose_4x4_lanes(z)
}

/// Within each 128-bit lane, a 4 × 4 transpose of dwords: `out[c]` lane `L`
/// holds dword `c` of lane `L` of `v[0]`, `v[1]`, `v[2]`, `v[3]`.
#[inline(always)]
unsafe fn transpose_4x4_lanes(v: [__m512i; 4]) -> [__m512i; 4] {
    let (t0, t1) = (_mm512_unpacklo_epi32(v[0], v[1]), _mm512_unpackhi_epi32(v[0], v[1]));
    let (t2, t3) = (_mm512_unpacklo_epi32(v[2], v[3]), _mm512_unpackhi_epi32(v[2], v[3]));
    [
        _mm512_unpacklo_epi64(t0, t2),
        _mm512_unpackhi_epi64(t0, t2),
        _mm512_unpacklo_epi64(t1, t3),
        _mm512_unpackhi_epi64(t1, t3),
    ]
}

/// `out[j]` lane `r` = `m[r]` lane `j`: a 16 × 16 transpose of 32-bit elements
/// in 64 two-source shuffles (unpacks within 128-bit lanes, then lane moves).
#[inline(always)]
unsafe fn transpose_16x16(m: [__m512i; 16]) -> [__m512i; 16] {
    // u[4i + c]: lane L holds rows 4i .. 4i + 4's dword 4L + c.
    let mut u = [_mm512_setzero_si512(); 16];
    for i in 0..4 {
        let q = transpose_4x4_lanes([m[4 * i], m[4 * i + 1], m[4 * i + 2], m[4 * i + 3]]);
        u[4 * i..4 * i + 4].copy_from_slice(&q);
    }
    // out[4L + c] = lane L of u[c], u[4 + c], u[8 + c], u[12 + c].
    let mut out = [_mm512_setzero_si512(); 16];
    for c in 0..4 {
        let p01 = _mm512_shuffle_i32x4::<0x44>(u[c], u[4 + c]);
        let q01 = _mm512_shuffle_i32x4::<0x44>(u[8 + c], u[12 + c]);
        let p23 = _mm512_shuffle_i32x4::<0xEE>(u[c], u[4 + c]);
        let q23 = _mm512_shuffle_i32x4::<0xEE>(u[8 + c], u[12 + c]);
        out[c] = _mm512_shuffle_i32x4::<0x88>(p01, q01);
        out[4 + c] = _mm512_shuffle_i32x4::<0xDD>(p01, q01);
        out[8 + c] = _mm512_shuffle_i32x4::<0x88>(p23, q23);
        out[12 + c] = _mm512_shuffle_i32x4::<0xDD>(p23, q23);
    }
    out
}

/// One K-quant block's 256 values as unsigned bytes, four 64-byte vectors in
/// the activations' run order (see `int8_kquant_512`).
#[inline(always)]
unsafe fn kq_bytes<const KQ: u8>(blk: *const u8) -> [__m512i; 4] {
    [
        kq_byte::<KQ>(blk, 0),
        kq_byte::<KQ>(blk, 1),
        kq_byte::<KQ>(blk, 2),
        kq_byte::<KQ>(blk, 3),
    ]
}

/// Vector `k` of `kq_bytes` alone (the loads it shares with its neighbour
/// are repeated). Built from it, `kq_bytes`' Q4_K code kept its size and the
/// decode rows of Q4_K, Q5_K and Q6_K kept their speed (EPYC, one thread, in
/// cache), so the compiler shares those loads there.
#[inline(always)]
unsafe fn kq_byte<const KQ: u8>(blk: *const u8, k: usize) -> __m512i {
    let m4 = _mm512_set1_epi8(0x0F);
    let halves = |a: i16, b: i16| {
        let mut v = [a; 32];
        v[16..].fill(b);
        _mm512_loadu_si512(v.as_ptr() as *const __m512i)
    };
    let h = k / 2;
    if KQ == KQ6 {
        let h30 = _mm512_set1_epi8(0x30);
        let l = _mm512_loadu_si512(blk.add(64 * h) as *const __m512i);
        let hh = _mm512_broadcast_i64x4(_mm256_loadu_si256(blk.add(128 + 32 * h) as *const __m256i));
        return if k.is_multiple_of(2) {
            _mm512_or_si512(
                _mm512_and_si512(l, m4),
                _mm512_and_si512(_mm512_sllv_epi16(hh, halves(4, 2)), h30),
            )
        } else {
            _mm512_or_si512(
                _mm512_and_si512(_mm512_srli_epi16::<4>(l), m4),
                _mm512_and_si512(_mm512_srlv_epi16(hh, halves(0, 2)), h30),
            )
        };
    }
    let qs = blk.add(if KQ == KQ4 { 16 } else { 48 });
    let q = _mm512_loadu_si512(qs.add(64 * h) as *const __m512i);
    let w = if k.is_multiple_of(2) {
        _mm512_and_si512(q, m4)
    } else {
        _mm512_and_si512(_mm512_srli_epi16::<4>(q), m4)
    };
    if KQ != KQ5 {
        return w;
    }
    // qh bit 2c (low nibbles of 32-byte chunk c) or 2c + 1 (high nibbles) adds 16.
    let qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(blk.add(16) as *const __m256i));
    let hb = match k {
        0 => _mm512_sllv_epi16(qh, halves(4, 2)),
        1 => _mm512_sllv_epi16(qh, halves(3, 1)),
        2 => _mm512_srlv_epi16(qh, halves(0, 2)),
        _ => _mm512_srlv_epi16(qh, halves(1, 3)),
    };
    _mm512_or_si512(w, _mm512_and_si512(hb, _mm512_set1_epi8(0x10)))
}

/// Rows `0..16` of one `KQ` int8 tile (see `kq_tile_512`; runs of `L` =
/// `krun(KQ)` values) dotted with `T` activation rows (`xq`, `xd` as for `int8_kquant_512`;
/// `xs[16(t·nb + b) ..]` the block's sums of `q` per run, natural order):
/// `out[t][r]`. Per run: `L/4` `vpdpbusd` sum each row's products in its own
/// i32 lane, one conversion and one multiply-add apply the run's scale; per
/// block the offsets come from one integer dot product of the rows' multipliers
/// with the activations' run sums (`vpdpwssd`), and the block's sum is scaled
/// by its activation scale once — about twice the products per instruction of
/// the row kernel, whose scales go through `vpdpwssd`. `ahead` (any bytes,
/// e.g. the weights the caller repacks next) is prefetched into L2 a little
/// per run slot. A Q4_K tile holds its values packed (`kq_tile_512`); its
/// runs are scaled in the order 0, 2, 1, 3, 4, 6, 5, 7 of their slots.
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VNNI.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(super) unsafe fn int8_ktile_512<const KQ: u8, const T: usize>(
    tile: &[u8],
    nb: usize,
    xq: &[i8],
    cols: usize,
    xd: &[f32],
    xs: &[i16],
    ahead: &[u8],
    out: &mut [[f32; 16]; T],
) {
    // Q4_K's tiles hold packed values (`kq_tile_512`).
    let (l, nibbles) = (krun(KQ), KQ == KQ4);
    assert!(T <= 8);
    let ns = 256 / l;
    let (sb, bb) = (ktile_slot_bytes(l), ktile_bytes(l));
    assert!(tile.len() >= nb * bb && cols >= 256 * nb && xq.len() >= (T - 1) * cols + 256 * nb);
    assert!(xd.len() >= T * nb && xs.len() >= 16 * T * nb);
    let (tp, xp) = (tile.as_ptr(), xq.as_ptr());
    let mut acc = [_mm512_setzero_ps(); T];
    let lines = ahead.len().div_ceil(64);
    let per_block = lines.div_ceil(nb.max(1));
    // A block's share of the prefetches, spread over its slots, not issued
    // at its start in one burst (8B shapes, batch of 8, EPYC, alternating
    // runs: medians 23.95 → 24.91 tokens/s over six, within noise over four).
    let per_slot = per_block.div_ceil(if nibbles { 4 } else { ns });
    for b in 0..nb {
        let (mut line, end) = (b * per_block, ((b + 1) * per_block).min(lines));
        let mut prefetch = || {
            for _ in 0..per_slot {
                if line < end {
                    _mm_prefetch::<_MM_HINT_T1>(ahead.as_ptr().add(64 * line) as *const i8);
                    line += 1;
                }
            }
        };
        let mut blk = [_mm512_setzero_ps(); T];
        if !nibbles {
            for s in 0..ns {
                prefetch();
                let base = tp.add(b * bb + s * sb);
                // Each group of four bytes across all rows: T independent `vpdpbusd`
                // chains in flight. The sums are exact, so the order does not matter.
                let mut i = [_mm512_setzero_si512(); T];
                for k in 0..l / 4 {
                    let w = _mm512_loadu_si512(base.add(64 * k) as *const __m512i);
                    for (t, i) in i.iter_mut().enumerate() {
                        let x = xp.add(t * cols + 256 * b + l * s + 4 * k);
                        *i = _mm512_dpbusd_epi32(*i, w, _mm512_set1_epi32((x as *const i32).read_unaligned()));
                    }
                }
                let sc = _mm512_loadu_ps(base.add(16 * l) as *const f32);
                for t in 0..T {
                    blk[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i[t]), sc, blk[t]);
                }
            }
        } else {
            // Q4_K: slot 4h + q holds the packed bytes of slots 4h + q (low
            // nibbles) and 4h + 2 + q (high nibbles); each load feeds both, in
            // 2T independent `vpdpbusd` chains.
            let m4 = _mm512_set1_epi8(0x0F);
            for s in [0usize, 1, 4, 5] {
                prefetch();
                let base = tp.add(b * bb + s * sb);
                let mut lo = [_mm512_setzero_si512(); T];
                let mut hi = [_mm512_setzero_si512(); T];
                for k in 0..8 {
                    let p = _mm512_loadu_si512(base.add(64 * k) as *const __m512i);
                    let (wl, wh) = (_mm512_and_si512(p, m4), _mm512_and_si512(_mm512_srli_epi16::<4>(p), m4));
                    for t in 0..T {
                        let x = xp.add(t * cols + 256 * b + 32 * s + 4 * k);
                        lo[t] = _mm512_dpbusd_epi32(lo[t], wl, _mm512_set1_epi32((x as *const i32).read_unaligned()));
                        let x = x.add(64);
                        hi[t] = _mm512_dpbusd_epi32(hi[t], wh, _mm512_set1_epi32((x as *const i32).read_unaligned()));
                    }
                }
                let scl = _mm512_loadu_ps(base.add(16 * l) as *const f32);
                let sch = _mm512_loadu_ps(base.add(2 * sb + 16 * l) as *const f32);
                for t in 0..T {
                    blk[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo[t]), scl, blk[t]);
                    blk[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi[t]), sch, blk[t]);
                }
            }
        }
        // The offsets: Σ_runs multiplier·Σq, exact in i32, times their scale.
        let tail = tp.add(b * bb + ktile_tail(l));
        let neg = _mm512_loadu_ps(tail.add(32 * ns) as *const f32);
        for t in 0..T {
            let sums = xs.as_ptr().add(16 * (t * nb + b));
            let mut o = _mm512_setzero_si512();
            for p in 0..ns / 2 {
                let pair = _mm512_loadu_si512(tail.add(64 * p) as *const __m512i);
                o = dpwssd!(
                    o,
                    pair,
                    _mm512_set1_epi32((sums.add(2 * p) as *const i32).read_unaligned())
                );
            }
            let v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(o), neg, blk[t]);
            acc[t] = _mm512_fmadd_ps(v, _mm512_set1_ps(*xd.get_unchecked(t * nb + b)), acc[t]);
        }
    }
    for (o, a) in out.iter_mut().zip(acc) {
        _mm512_storeu_ps(o.as_mut_ptr(), a);
    }
}
