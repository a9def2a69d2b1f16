//! Element conversions between stored bytes and f32, chunk by chunk.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

use crate::safetensors_io::Float;

/// Elements per parallel piece.
const PIECE: usize = 1 << 16;

/// Decodes little-endian `bytes` of `dtype` into `out` (same element count).
pub fn decode(dtype: Float, bytes: &[u8], out: &mut [f32]) {
    let size = dtype.size();
    debug_assert_eq!(bytes.len(), out.len() * size);
    out.par_chunks_mut(PIECE)
        .zip(bytes.par_chunks(PIECE * size))
        .for_each(|(o, b)| match dtype {
            Float::F32 => {
                for (x, c) in o.iter_mut().zip(b.chunks_exact(4)) {
                    *x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            Float::F16 => {
                let h: Vec<f16> = b.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]])).collect();
                h.convert_to_f32_slice(o);
            }
            Float::BF16 => {
                for (x, c) in o.iter_mut().zip(b.chunks_exact(2)) {
                    *x = bf16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
        });
}

/// Encodes `src` as little-endian `dtype` bytes into `out` (resized), rounding to
/// nearest even as torch does.
pub fn encode(dtype: Float, src: &[f32], out: &mut Vec<u8>) {
    let size = dtype.size();
    out.resize(src.len() * size, 0);
    out.par_chunks_mut(PIECE * size)
        .zip(src.par_chunks(PIECE))
        .for_each(|(o, s)| match dtype {
            Float::F32 => {
                for (c, x) in o.chunks_exact_mut(4).zip(s) {
                    c.copy_from_slice(&x.to_le_bytes());
                }
            }
            Float::F16 => {
                let mut h = vec![f16::ZERO; s.len()];
                h.convert_from_f32_slice(s);
                for (c, x) in o.chunks_exact_mut(2).zip(h) {
                    c.copy_from_slice(&x.to_le_bytes());
                }
            }
            Float::BF16 => {
                for (c, x) in o.chunks_exact_mut(2).zip(s) {
                    c.copy_from_slice(&bf16::from_f32(*x).to_le_bytes());
                }
            }
        });
}

/// Rounds every value to the nearest `dtype` value (kept as f32): what a cast to
/// `dtype` before the arithmetic does in torch.
pub fn round_to(dtype: Float, xs: &mut [f32]) {
    match dtype {
        Float::F32 => {}
        Float::F16 => xs.par_chunks_mut(PIECE).for_each(|c| {
            for x in c {
                *x = f16::from_f32(*x).to_f32();
            }
        }),
        Float::BF16 => xs.par_chunks_mut(PIECE).for_each(|c| {
            for x in c {
                *x = bf16::from_f32(*x).to_f32();
            }
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rounds_like_a_cast() {
        let xs = [0.0f32, 1.0, -2.5, 65504.0, 1e-8, 0.1, 2.71];
        for dt in [Float::F32, Float::F16, Float::BF16] {
            let mut bytes = Vec::new();
            encode(dt, &xs, &mut bytes);
            let mut back = vec![0f32; xs.len()];
            decode(dt, &bytes, &mut back);
            let mut rounded = xs.to_vec();
            round_to(dt, &mut rounded);
            assert_eq!(back, rounded, "{dt:?}");
        }
        // f16 addition through f32 is correctly rounded: 1 + 2^-11 is a tie, to even.
        let one_plus = f16::from_f32(1.0).to_f32() + f16::from_f32(2f32.powi(-11)).to_f32();
        assert_eq!(f16::from_f32(one_plus), f16::from_f32(1.0));
    }
}
