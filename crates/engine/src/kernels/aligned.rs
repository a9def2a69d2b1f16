//! Buffers that start on a cache line.
//!
//! The AVX-512 kernels load 64 bytes at a time; from a buffer that starts off a
//! 64-byte boundary (as `Vec`'s do: glibc aligns to 16) most of those loads
//! straddle two lines and cost two. Measured: a batch-8 decode product over
//! 576 columns ran ~25% slower from such activations, and the batched decode
//! ~7% slower overall.

use std::ops::{Deref, DerefMut};

/// Element types a [`Aligned`] buffer may hold: plain numbers for which every
/// bit pattern, all-zero included, is a valid value.
///
/// # Safety
/// Implementors must be `Copy` types with no padding, alignment at most 4, for
/// which every bit pattern is valid and all-zero bits mean zero.
pub unsafe trait Plain: Copy {}

// SAFETY: IEEE floats: any bits are a value, zero bits are +0.0.
unsafe impl Plain for f32 {}
// SAFETY: as above (half precision).
unsafe impl Plain for half::f16 {}

/// Bytes of one cache line.
pub const LINE: usize = 64;

/// A zeroed, fixed-length buffer of `T` whose first element sits on a 64-byte
/// boundary. Its storage is a zeroed `Vec<f32>` (allocated with `calloc`, so
/// large buffers commit their pages only as they are written) with up to one
/// line of slack in front.
pub struct Aligned<T: Plain> {
    raw: Vec<f32>,
    /// Byte offset of element 0 within `raw`.
    off: usize,
    len: usize,
    _t: std::marker::PhantomData<T>,
}

impl<T: Plain> Aligned<T> {
    /// `len` zeros.
    pub fn zeros(len: usize) -> Self {
        const { assert!(std::mem::align_of::<T>() <= 4) };
        let bytes = len * std::mem::size_of::<T>();
        let raw = vec![0f32; (bytes + LINE).div_ceil(4)];
        let off = (raw.as_ptr() as *const u8).align_offset(LINE);
        debug_assert!(off + bytes <= raw.len() * 4);
        Aligned {
            raw,
            off,
            len,
            _t: std::marker::PhantomData,
        }
    }

    /// Sets the length to `len`, as `Vec::resize` with zeros: new elements are
    /// zero, the first `min(len, old len)` keep their values.
    pub fn resize(&mut self, len: usize) {
        let capacity = (self.raw.len() * 4 - self.off) / std::mem::size_of::<T>();
        if len > capacity {
            let mut grown = Self::zeros(len);
            grown[..self.len].copy_from_slice(self);
            *self = grown;
            return;
        }
        let old = self.len;
        self.len = len;
        if len > old {
            // SAFETY: all-zero bits are a zero `T` (`Plain`).
            unsafe { std::ptr::write_bytes(self[old..].as_mut_ptr(), 0, len - old) };
        }
    }

    /// A copy of `src`.
    pub fn from_slice(src: &[T]) -> Self {
        let mut a = Self::zeros(src.len());
        a.copy_from_slice(src);
        a
    }
}

impl<T: Plain> Deref for Aligned<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: `off + len·size_of::<T>()` bytes lie within `raw` (`zeros`), the
        // start is 64-byte aligned (so aligned for `T`), and any bits are a `T`.
        unsafe { std::slice::from_raw_parts((self.raw.as_ptr() as *const u8).add(self.off) as *const T, self.len) }
    }
}

impl<T: Plain> DerefMut for Aligned<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`, and `&mut self` makes the view unique.
        unsafe { std::slice::from_raw_parts_mut((self.raw.as_mut_ptr() as *mut u8).add(self.off) as *mut T, self.len) }
    }
}

impl<T: Plain> Default for Aligned<T> {
    fn default() -> Self {
        Self::zeros(0)
    }
}

impl<T: Plain> Clone for Aligned<T> {
    /// A fresh allocation has its own offset, so not `Vec`'s clone.
    fn clone(&self) -> Self {
        Self::from_slice(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_on_a_line_and_holds_what_is_written() {
        for len in [0, 1, 7, 16, 1000, 100_003] {
            let mut a = Aligned::<half::f16>::zeros(len);
            assert_eq!(a.as_ptr() as usize % LINE, 0);
            assert_eq!(a.len(), len);
            assert!(a.iter().all(|v| v.to_f32() == 0.0));
            for (i, v) in a.iter_mut().enumerate() {
                *v = half::f16::from_f32(i as f32);
            }
            let b = a.clone();
            assert_eq!(b.as_ptr() as usize % LINE, 0);
            assert_eq!(&a[..], &b[..]);
            let mut f = Aligned::<f32>::from_slice(&[1.0, 2.0, 3.0]);
            f.resize(2);
            f.resize(3);
            assert_eq!(&f[..], &[1.0, 2.0, 0.0]);
            f.resize(5000);
            assert_eq!(&f[..4], &[1.0, 2.0, 0.0, 0.0]);
            assert_eq!(f.len(), 5000);
            f.resize(3);
            f[2] = 3.0;
            assert_eq!(f.as_ptr() as usize % LINE, 0);
            assert_eq!(&f[..], &[1.0, 2.0, 3.0]);
        }
    }
}
