//! The attention cache: keys in the kernels' block layout, values by row, f16 or f32.

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::kernels::{key_index, Aligned, KvRows, KEY_BLOCK};

/// The element type of the attention cache. A model loads with f16 when its
/// weights stay quantized and f32 when they are plain (`Model::set_kv_dtype`
/// changes it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvDType {
    /// The projections' f32 values as computed (HF's arithmetic).
    F32,
    /// Rounded to f16 (as llama.cpp stores it): half the memory, and decode
    /// attention, which streams the whole cache every step, reads half the bytes.
    F16,
}

impl KvDType {
    /// Bytes per element.
    pub fn bytes(self) -> usize {
        match self {
            KvDType::F32 => 4,
            KvDType::F16 => 2,
        }
    }
}

/// One layer's keys or values, `[kv_heads, capacity, head_dim]`; keys in the key
/// layout (`kernels::KEY_BLOCK`: each head's positions by blocks of 16, each block
/// dimension-major), values position-major.
/// On cache lines (`Aligned`): the attention kernels load a block's keys 32 or 64
/// bytes at a time.
pub(super) enum KvBuf {
    F32(Aligned<f32>),
    F16(Aligned<f16>),
}

impl KvBuf {
    /// Zeroed: pages are committed only as positions are written.
    fn zeros(dtype: KvDType, n: usize) -> Self {
        match dtype {
            KvDType::F32 => KvBuf::F32(Aligned::zeros(n)),
            KvDType::F16 => KvBuf::F16(Aligned::zeros(n)),
        }
    }
    fn bytes(&self) -> usize {
        match self {
            KvBuf::F32(b) => b.len() * 4,
            KvBuf::F16(b) => b.len() * 2,
        }
    }
    /// Copies `n` elements of `src` (the same type) from `src_at` to `at`.
    pub(super) fn copy_from(&mut self, at: usize, src: &KvBuf, src_at: usize, n: usize) {
        match (self, src) {
            (KvBuf::F32(d), KvBuf::F32(s)) => d[at..at + n].copy_from_slice(&s[src_at..src_at + n]),
            (KvBuf::F16(d), KvBuf::F16(s)) => d[at..at + n].copy_from_slice(&s[src_at..src_at + n]),
            _ => unreachable!("caches of one model share their element type"),
        }
    }
    /// A raw view for the parallel decode loop.
    pub(super) fn ptr(&mut self) -> KvPtr {
        match self {
            KvBuf::F32(b) => KvPtr::F32(b.as_mut_ptr()),
            KvBuf::F16(b) => KvPtr::F16(b.as_mut_ptr()),
        }
    }
}

/// A layer buffer of one sequence's cache, shared by the tasks of the decode loop
/// (each touches only its own kv head's rows).
#[derive(Clone, Copy)]
pub(super) enum KvPtr {
    F32(*mut f32),
    F16(*mut f16),
}

// SAFETY: only used inside `Team::run` loops whose tasks touch disjoint kv heads
// (see `kernel_layers`), while the owner of the cache waits.
unsafe impl Sync for KvPtr {}
unsafe impl Send for KvPtr {}

impl KvPtr {
    /// Stores `src` at element `at`.
    ///
    /// # Safety
    /// `at + src.len()` is within the buffer, and no other task touches that range.
    pub(super) unsafe fn write(self, at: usize, src: &[f32]) {
        match self {
            KvPtr::F32(p) => std::slice::from_raw_parts_mut(p.add(at), src.len()).copy_from_slice(src),
            KvPtr::F16(p) => std::slice::from_raw_parts_mut(p.add(at), src.len()).convert_from_f32_slice(src),
        }
    }
    /// Stores one key row `src` at position `p` of the head whose region starts at
    /// element `base`, in the key layout.
    ///
    /// # Safety
    /// The position is within the buffer's capacity, and no other task touches
    /// that head.
    pub(super) unsafe fn write_key(self, base: usize, p: usize, src: &[f32]) {
        let hd = src.len();
        for (c, &x) in src.iter().enumerate() {
            let i = base + key_index(p, c, hd);
            match self {
                KvPtr::F32(b) => *b.add(i) = x,
                KvPtr::F16(b) => *b.add(i) = f16::from_f32(x),
            }
        }
    }
    /// `n` elements from `at`.
    ///
    /// # Safety
    /// The range is within the buffer and no task writes it while the view lives.
    pub(super) unsafe fn rows<'a>(self, at: usize, n: usize) -> KvRows<'a> {
        match self {
            KvPtr::F32(p) => KvRows::F32(std::slice::from_raw_parts(p.add(at), n)),
            KvPtr::F16(p) => KvRows::F16(std::slice::from_raw_parts(p.add(at), n)),
        }
    }
}

/// One sequence's attention keys and values, preallocated and written in place.
pub struct KvCache {
    /// Per layer, `[kv_heads, capacity, head_dim]`.
    pub(super) k: Vec<KvBuf>,
    pub(super) v: Vec<KvBuf>,
    pub(super) len: usize,
    pub(super) capacity: usize,
    heads: usize,
    head_dim: usize,
}

impl KvCache {
    /// Tokens held.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether no token is held yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Tokens that fit before the cache must grow.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
    /// Forgets every token after the first `len` (for regenerating).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
    /// Bytes held by the cache.
    pub fn bytes(&self) -> usize {
        self.k.iter().chain(&self.v).map(KvBuf::bytes).sum()
    }

    /// Positions `0 .. len` of one layer's keys and values as f32, each
    /// `[kv_heads, len, head_dim]`.
    /// An empty cache (`capacity` a whole number of key blocks).
    pub(super) fn new(dtype: KvDType, layers: usize, heads: usize, head_dim: usize, capacity: usize) -> Self {
        let layer = || KvBuf::zeros(dtype, heads * capacity * head_dim);
        KvCache {
            k: (0..layers).map(|_| layer()).collect(),
            v: (0..layers).map(|_| layer()).collect(),
            len: 0,
            capacity,
            heads,
            head_dim,
        }
    }

    pub(super) fn copy_from(&mut self, src: &KvCache, len: usize) {
        let (hd, dc, sc) = (self.head_dim, self.capacity, src.capacity);
        let key_len = len.div_ceil(KEY_BLOCK) * KEY_BLOCK;
        let pairs = self.k.iter_mut().zip(&src.k).map(|p| (p, key_len));
        let pairs = pairs.chain(self.v.iter_mut().zip(&src.v).map(|p| (p, len)));
        for ((d, s), n) in pairs {
            for g in 0..self.heads {
                d.copy_from(g * dc * hd, s, g * sc * hd, n * hd);
            }
        }
    }
}
