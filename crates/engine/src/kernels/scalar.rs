//! Portable reference: dequantize one row of ggml blocks to f32, and a plain dot
//! product micro-kernel. The SIMD paths must agree with these (the dequantized
//! values bit for bit, the dot products up to summation order).

use super::Kind;

fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// The 6-bit (scale, min) pair `j` of a Q4_K / Q5_K super-block (ggml's
/// `get_scale_min_k4`).
pub(super) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Dequantizes the blocks of one row (`src`, exactly `dst.len() / block` blocks)
/// into `dst`, computing each value exactly as ggml / candle do.
pub(super) fn dequant_row(kind: Kind, src: &[u8], dst: &mut [f32]) {
    let (bs, bb) = (kind.block_elems(), kind.block_bytes());
    assert_eq!(dst.len() % bs, 0);
    assert!(src.len() >= dst.len() / bs * bb);
    for (blk, y) in src.chunks_exact(bb).zip(dst.chunks_exact_mut(bs)) {
        match kind {
            Kind::Q4_0 => {
                let d = f16_at(blk, 0);
                for j in 0..16 {
                    let q = blk[2 + j];
                    y[j] = ((q & 0xF) as i16 - 8) as f32 * d;
                    y[j + 16] = ((q >> 4) as i16 - 8) as f32 * d;
                }
            }
            Kind::Q4_1 => {
                let (d, m) = (f16_at(blk, 0), f16_at(blk, 2));
                for j in 0..16 {
                    let q = blk[4 + j];
                    y[j] = (q & 0xF) as f32 * d + m;
                    y[j + 16] = (q >> 4) as f32 * d + m;
                }
            }
            Kind::Q8_0 => {
                let d = f16_at(blk, 0);
                for j in 0..32 {
                    y[j] = blk[2 + j] as i8 as f32 * d;
                }
            }
            Kind::Q4K => {
                let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
                let (scales, qs) = (&blk[4..16], &blk[16..144]);
                for p in 0..4 {
                    let (sc1, m1) = scale_min_k4(2 * p, scales);
                    let (sc2, m2) = scale_min_k4(2 * p + 1, scales);
                    let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
                    let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
                    let q = &qs[32 * p..32 * p + 32];
                    for l in 0..32 {
                        y[64 * p + l] = d1 * (q[l] & 0xF) as f32 - m1;
                        y[64 * p + 32 + l] = d2 * (q[l] >> 4) as f32 - m2;
                    }
                }
            }
            Kind::Q5K => {
                let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
                let (scales, qh, qs) = (&blk[4..16], &blk[16..48], &blk[48..176]);
                for p in 0..4 {
                    let (sc1, m1) = scale_min_k4(2 * p, scales);
                    let (sc2, m2) = scale_min_k4(2 * p + 1, scales);
                    let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
                    let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
                    let q = &qs[32 * p..32 * p + 32];
                    for l in 0..32 {
                        let h1 = ((qh[l] >> (2 * p)) & 1) << 4;
                        let h2 = ((qh[l] >> (2 * p + 1)) & 1) << 4;
                        y[64 * p + l] = d1 * ((q[l] & 0xF) | h1) as f32 - m1;
                        y[64 * p + 32 + l] = d2 * ((q[l] >> 4) | h2) as f32 - m2;
                    }
                }
            }
            Kind::Q6K => {
                let (ql, qh, sc) = (&blk[0..128], &blk[128..192], &blk[192..208]);
                let d = f16_at(blk, 208);
                for h in 0..2 {
                    let (ql, qh, sc, y) = (&ql[64 * h..], &qh[32 * h..], &sc[8 * h..], &mut y[128 * h..]);
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 - 32;
                        let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
                        y[l] = d * sc[is] as i8 as f32 * q1 as f32;
                        y[l + 32] = d * sc[is + 2] as i8 as f32 * q2 as f32;
                        y[l + 64] = d * sc[is + 4] as i8 as f32 * q3 as f32;
                        y[l + 96] = d * sc[is + 6] as i8 as f32 * q4 as f32;
                    }
                }
            }
        }
    }
}

/// `out[r][t] = dot(w row r, x row t)` over `cols`, for `R` dequantized weight
/// rows and `T` activation rows (both row-major with stride `cols`).
pub(super) fn micro<const R: usize, const T: usize>(w: &[f32], x: &[f32], cols: usize) -> [[f32; T]; R] {
    let mut out = [[0f32; T]; R];
    for (r, o) in out.iter_mut().enumerate() {
        let wr = &w[r * cols..(r + 1) * cols];
        for (t, o) in o.iter_mut().enumerate() {
            *o = wr.iter().zip(&x[t * cols..(t + 1) * cols]).map(|(a, b)| a * b).sum();
        }
    }
    out
}
