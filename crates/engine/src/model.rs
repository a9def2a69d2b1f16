//! The llama-family model (llama, mistral, qwen2), one definition for every weight
//! format: dense f32/f16/bf16 tensors (safetensors, or trainable variables) and
//! ggml-quantized GGUF blocks go through the same `Linear`.
//!
//! A forward pass takes a ragged batch: each sequence brings its new tokens and its
//! own KV cache. The projections and the MLP run once over all tokens of all
//! sequences (that is where the weights are read, so batching pays); attention runs
//! per sequence against its own cache. Prefill chunks and single decode tokens mix
//! freely in one pass, which is what continuous batching needs.

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Storage, Tensor, D};
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use crate::config::{rope_inv_freq, ModelConfig};
use crate::error::{EngineError, Result};
use crate::kernels::{key_index, Aligned, KvRows, QMatrix, KEY_BLOCK};
use crate::team::Team;
use crate::weights::{Weight, WeightSource};

/// How weights are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightDType {
    /// GGUF: keep quantized blocks; safetensors: f32.
    #[default]
    Auto,
    F32,
    F16,
    BF16,
}

impl std::str::FromStr for WeightDType {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "f32" | "float32" => Ok(Self::F32),
            "f16" | "float16" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::BF16),
            other => Err(format!("unknown dtype {other:?}; expected auto, f32, f16 or bf16")),
        }
    }
}

/// A linear layer `y = x Wᵀ + b` over dense or quantized weights.
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
    /// A low-rank adapter applied on top of the weight, never merged into it.
    lora: Option<Lora>,
}

/// A LoRA adapter on one linear layer: `y += scale · (x Aᵀ) Bᵀ`, with `A` `[r, in]`
/// and `B` `[out, r]` as PEFT stores them.
#[derive(Clone)]
pub struct Lora {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
}

enum LinearWeight {
    Dense(Tensor),
    /// Block types with our own kernels: f32 activations, never quantized.
    Kernel(QMatrix),
    /// Other block types: candle's `QMatMul`.
    Quantized(QMatMul),
}

impl Linear {
    /// Wraps a stored weight: quantized blocks stay quantized unless `dense` asks
    /// for plain values of that dtype.
    pub fn new(weight: Weight, bias: Option<Tensor>, dense: Option<DType>, device: &Device) -> Result<Self> {
        let weight = match (weight, dense) {
            (Weight::Quantized(q), None) => match QMatrix::from_qtensor(&q) {
                Some(m) => LinearWeight::Kernel(m),
                None => LinearWeight::Quantized(QMatMul::from_arc(q)?),
            },
            (w, dtype) => LinearWeight::Dense(w.to_dense(dtype.unwrap_or(DType::F32), device)?),
        };
        Ok(Linear {
            weight,
            bias,
            lora: None,
        })
    }

    /// From a plain weight tensor (e.g. a trainable variable).
    pub fn from_tensor(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear {
            weight: LinearWeight::Dense(weight),
            bias,
            lora: None,
        }
    }

    /// `x` is `[n, in]` f32; returns `[n, out]` f32.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            LinearWeight::Dense(w) if w.dtype() == x.dtype() => x.matmul(&w.t()?)?,
            LinearWeight::Dense(w) => x.to_dtype(w.dtype())?.matmul(&w.t()?)?.to_dtype(x.dtype())?,
            LinearWeight::Kernel(m) => m.forward(x)?,
            LinearWeight::Quantized(q) => q.forward(x)?,
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        match &self.lora {
            Some(l) => Ok((y + (x.matmul(&l.a.t()?)?.matmul(&l.b.t()?)? * l.scale)?)?),
            None => Ok(y),
        }
    }

    /// Our kernel's matrix, when this layer is exactly that (no adapter).
    fn kernel(&self) -> Option<&QMatrix> {
        match (&self.weight, &self.lora) {
            (LinearWeight::Kernel(m), None) => Some(m),
            _ => None,
        }
    }

    /// Weights (multiply-adds per input row) of this layer.
    pub fn weight_count(&self) -> usize {
        match &self.weight {
            LinearWeight::Dense(w) => w.elem_count(),
            LinearWeight::Kernel(m) => m.rows() * m.cols(),
            LinearWeight::Quantized(QMatMul::QTensor(q)) => q.shape().elem_count(),
            LinearWeight::Quantized(QMatMul::Tensor(w) | QMatMul::TensorF16(w)) => w.elem_count(),
        }
    }

    /// Bytes read from memory for one pass over this layer's weight.
    pub fn weight_bytes(&self) -> usize {
        match &self.weight {
            LinearWeight::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            LinearWeight::Kernel(m) => m.size_in_bytes(),
            LinearWeight::Quantized(QMatMul::QTensor(q)) => q.storage_size_in_bytes(),
            LinearWeight::Quantized(QMatMul::Tensor(w) | QMatMul::TensorF16(w)) => {
                w.elem_count() * w.dtype().size_in_bytes()
            }
        }
    }
}

enum Embedding {
    Dense(Tensor),
    /// Rows dequantized on lookup; shares its blocks with a tied output layer.
    Kernel(QMatrix),
    Quantized(QMatMul),
}

struct Block {
    attn_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    mlp_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
    /// q, k and v as one matrix (the three are views of it), for one pass per
    /// decode step instead of three; `None` where the weights do not allow it.
    qkv: Option<QMatrix>,
    /// gate and up as one matrix, likewise.
    gate_up: Option<QMatrix>,
}

/// Query rows per block in prompt attention: bounds the score matrix to
/// `heads × block × context` floats.
const PREFILL_QUERY_BLOCK: usize = 64;

/// Token rows per block of the MLP in `kernel_layers`: bounds its intermediates
/// (`gate`, `up`, their product) to this many rows of a prompt chunk.
const MLP_ROWS: usize = 128;

/// One sequence's place in a ragged batch: (offset in the batch, new tokens,
/// tokens already cached).
type Span = (usize, usize, usize);

/// A loaded llama-family model.
pub struct Model {
    cfg: ModelConfig,
    embed: Embedding,
    blocks: Vec<Block>,
    norm: Tensor,
    lm_head: Linear,
    inv_freq: Vec<f32>,
    device: Device,
    /// The output projection is the embedding matrix (one tensor, two uses).
    tied: bool,
    /// The element type of new caches.
    kv_dtype: KvDType,
}

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
enum KvBuf {
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
    /// Stores `src` at element `at`.
    fn write(&mut self, at: usize, src: &[f32]) {
        match self {
            KvBuf::F32(b) => b[at..at + src.len()].copy_from_slice(src),
            KvBuf::F16(b) => b[at..at + src.len()].convert_from_f32_slice(src),
        }
    }
    /// Stores key rows `src` (`[t, hd]`) at positions `p0 ..` of the head whose
    /// region starts at element `base`, in the key layout.
    fn write_keys(&mut self, base: usize, p0: usize, src: &[f32], hd: usize) {
        for (j, row) in src.chunks_exact(hd).enumerate() {
            for (c, &x) in row.iter().enumerate() {
                let i = base + key_index(p0 + j, c, hd);
                match self {
                    KvBuf::F32(b) => b[i] = x,
                    KvBuf::F16(b) => b[i] = f16::from_f32(x),
                }
            }
        }
    }
    /// Appends the keys of positions `0 .. len` of the head at `base`, as f32
    /// rows, to `out`.
    fn read_keys(&self, base: usize, len: usize, hd: usize, out: &mut Vec<f32>) {
        let start = out.len();
        out.resize(start + len * hd, 0.0);
        let blocks = len.div_ceil(KEY_BLOCK) * KEY_BLOCK * hd;
        let rows = match self {
            KvBuf::F32(b) => KvRows::F32(&b[base..base + blocks]),
            KvBuf::F16(b) => KvRows::F16(&b[base..base + blocks]),
        };
        for (j, row) in out[start..].chunks_exact_mut(hd).enumerate() {
            rows.key_into(j, hd, row);
        }
    }
    /// Appends `n` elements from `at`, as f32, to `out`.
    fn read(&self, at: usize, n: usize, out: &mut Vec<f32>) {
        match self {
            KvBuf::F32(b) => out.extend_from_slice(&b[at..at + n]),
            KvBuf::F16(b) => {
                let start = out.len();
                out.resize(start + n, 0.0);
                b[at..at + n].convert_to_f32_slice(&mut out[start..]);
            }
        }
    }
    /// `n` elements from `at`, for the attention kernels.
    fn rows(&self, at: usize, n: usize) -> KvRows<'_> {
        match self {
            KvBuf::F32(b) => KvRows::F32(&b[at..at + n]),
            KvBuf::F16(b) => KvRows::F16(&b[at..at + n]),
        }
    }
    /// Copies `n` elements of `src` (the same type) from `src_at` to `at`.
    fn copy_from(&mut self, at: usize, src: &KvBuf, src_at: usize, n: usize) {
        match (self, src) {
            (KvBuf::F32(d), KvBuf::F32(s)) => d[at..at + n].copy_from_slice(&s[src_at..src_at + n]),
            (KvBuf::F16(d), KvBuf::F16(s)) => d[at..at + n].copy_from_slice(&s[src_at..src_at + n]),
            _ => unreachable!("caches of one model share their element type"),
        }
    }
    /// A raw view for the parallel decode loop.
    fn ptr(&mut self) -> KvPtr {
        match self {
            KvBuf::F32(b) => KvPtr::F32(b.as_mut_ptr()),
            KvBuf::F16(b) => KvPtr::F16(b.as_mut_ptr()),
        }
    }
}

/// A layer buffer of one sequence's cache, shared by the tasks of the decode loop
/// (each touches only its own kv head's rows).
#[derive(Clone, Copy)]
enum KvPtr {
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
    unsafe fn write(self, at: usize, src: &[f32]) {
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
    unsafe fn write_key(self, base: usize, p: usize, src: &[f32]) {
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
    unsafe fn rows<'a>(self, at: usize, n: usize) -> KvRows<'a> {
        match self {
            KvPtr::F32(p) => KvRows::F32(std::slice::from_raw_parts(p.add(at), n)),
            KvPtr::F16(p) => KvRows::F16(std::slice::from_raw_parts(p.add(at), n)),
        }
    }
}

/// One sequence's attention keys and values, preallocated and written in place.
pub struct KvCache {
    /// Per layer, `[kv_heads, capacity, head_dim]`.
    k: Vec<KvBuf>,
    v: Vec<KvBuf>,
    len: usize,
    capacity: usize,
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
    fn gather(&self, layer: usize, len: usize) -> (Vec<f32>, Vec<f32>) {
        let (cap, hd) = (self.capacity, self.head_dim);
        let mut keys = Vec::with_capacity(self.heads * len * hd);
        let mut values = Vec::with_capacity(self.heads * len * hd);
        for g in 0..self.heads {
            self.k[layer].read_keys(g * cap * hd, len, hd, &mut keys);
            self.v[layer].read(g * cap * hd, len * hd, &mut values);
        }
        (keys, values)
    }

    /// Writes `t` positions of one layer's keys and values (each
    /// `[kv_heads, t, head_dim]`) at `start`: keys in the key layout, values
    /// position-major.
    fn write(&mut self, layer: usize, keys: &[f32], values: &[f32], t: usize, start: usize) {
        let (cap, hd) = (self.capacity, self.head_dim);
        for (g, (k, v)) in keys.chunks_exact(t * hd).zip(values.chunks_exact(t * hd)).enumerate() {
            self.k[layer].write_keys(g * cap * hd, start, k, hd);
            self.v[layer].write((g * cap + start) * hd, v);
        }
    }

    /// Copies the first `len` positions of `src` (same model) into `self`: for
    /// keys, the whole blocks holding them (both capacities are whole blocks).
    fn copy_from(&mut self, src: &KvCache, len: usize) {
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

/// New tokens of one sequence for a forward pass, and that sequence's cache.
pub struct SeqInput<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
}

fn load_norm(src: &dyn WeightSource, name: &str, size: usize, device: &Device) -> Result<Tensor> {
    src.get(name, &[size])?.to_dense(DType::F32, device)
}

impl Model {
    /// Builds the model from a weight source. `dense` forces plain weights of that
    /// dtype; `None` keeps quantized weights quantized (and dense ones f32).
    pub fn load(cfg: ModelConfig, src: &dyn WeightSource, dense: Option<DType>, device: &Device) -> Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (nh, nkv, ffn) = (cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size);
        let linear = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
            let w = src.get(&format!("{name}.weight"), &[out, inp])?;
            let b = if bias {
                Some(src.get(&format!("{name}.bias"), &[out])?.to_dense(DType::F32, device)?)
            } else {
                None
            };
            Linear::new(w, b, dense, device)
        };
        // The vocabulary-sized matrices first: repacking one briefly holds two
        // copies, which then costs the least with nothing else loaded yet.
        let embed_w = src.get("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        let tied = cfg.tie_word_embeddings || !src.contains("lm_head.weight");
        let lm_head = if tied {
            Linear::new(embed_w.clone(), None, dense, device)?
        } else {
            linear("lm_head", cfg.vocab_size, h, false)?
        };
        let embed = match (embed_w, dense, &lm_head.weight) {
            (Weight::Quantized(_), None, LinearWeight::Kernel(m)) if tied => Embedding::Kernel(m.clone()),
            (Weight::Quantized(q), None, _) => match QMatrix::from_qtensor(&q) {
                Some(m) => Embedding::Kernel(m),
                None => Embedding::Quantized(QMatMul::from_arc(q)?),
            },
            (w, _, _) => Embedding::Dense(w.to_dense(DType::F32, device)?),
        };
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("model.layers.{i}");
            let mut q = linear(&format!("{p}.self_attn.q_proj"), nh * hd, h, cfg.qkv_bias)?;
            let mut k = linear(&format!("{p}.self_attn.k_proj"), nkv * hd, h, cfg.qkv_bias)?;
            let mut v = linear(&format!("{p}.self_attn.v_proj"), nkv * hd, h, cfg.qkv_bias)?;
            let mut gate = linear(&format!("{p}.mlp.gate_proj"), ffn, h, false)?;
            let mut up = linear(&format!("{p}.mlp.up_proj"), ffn, h, false)?;
            blocks.push(Block {
                attn_norm: load_norm(src, &format!("{p}.input_layernorm.weight"), h, device)?,
                qkv: fuse(&mut [&mut q, &mut k, &mut v]),
                gate_up: fuse(&mut [&mut gate, &mut up]),
                q,
                k,
                v,
                o: linear(&format!("{p}.self_attn.o_proj"), h, nh * hd, false)?,
                mlp_norm: load_norm(src, &format!("{p}.post_attention_layernorm.weight"), h, device)?,
                gate,
                up,
                down: linear(&format!("{p}.mlp.down_proj"), h, ffn, false)?,
            });
        }
        let norm = load_norm(src, "model.norm.weight", h, device)?;
        let inv_freq = rope_inv_freq(&cfg);
        // Weights kept quantized already move the logits far more than f16 keys
        // and values do (SmolLM2 Q4_1: HF's greedy ids unchanged, logprobs within
        // 0.003); plain weights keep HF's f32 arithmetic.
        let quantized = blocks.iter().any(|b| {
            b.linears()
                .iter()
                .any(|(_, l)| !matches!(l.weight, LinearWeight::Dense(_)))
        });
        let kv_dtype = if quantized { KvDType::F16 } else { KvDType::F32 };
        Ok(Model {
            cfg,
            embed,
            blocks,
            norm,
            lm_head,
            inv_freq,
            device: device.clone(),
            tied,
            kv_dtype,
        })
    }

    /// The model's shape.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// `f` summed over every linear layer a token passes through.
    fn sum_linears(&self, f: impl Fn(&Linear) -> usize) -> usize {
        let per_block: usize = self
            .blocks
            .iter()
            .map(|b| {
                [&b.q, &b.k, &b.v, &b.o, &b.gate, &b.up, &b.down]
                    .into_iter()
                    .map(&f)
                    .sum::<usize>()
            })
            .sum();
        per_block + f(&self.lm_head)
    }

    /// Multiply-adds of the linear layers per token (attention's excluded).
    pub fn weight_macs_per_token(&self) -> usize {
        self.sum_linears(Linear::weight_count)
    }

    /// Bytes of weights read from memory to produce one token.
    pub fn weight_bytes_per_token(&self) -> usize {
        self.sum_linears(Linear::weight_bytes)
    }

    /// The element type of caches made from now on (`new_cache`).
    pub fn set_kv_dtype(&mut self, dtype: KvDType) {
        self.kv_dtype = dtype;
    }

    /// The element type of new caches.
    pub fn kv_dtype(&self) -> KvDType {
        self.kv_dtype
    }

    /// An empty cache with room for `capacity` tokens.
    pub fn new_cache(&self, capacity: usize) -> Result<KvCache> {
        // Whole blocks of the key layout.
        let capacity = capacity.max(1).next_multiple_of(KEY_BLOCK);
        let (heads, head_dim) = (self.cfg.num_kv_heads, self.cfg.head_dim);
        let layer = || KvBuf::zeros(self.kv_dtype, heads * capacity * head_dim);
        Ok(KvCache {
            k: (0..self.cfg.num_layers).map(|_| layer()).collect(),
            v: (0..self.cfg.num_layers).map(|_| layer()).collect(),
            len: 0,
            capacity,
            heads,
            head_dim,
        })
    }

    /// A new cache holding the first `len` tokens of `src`, with room for `capacity`.
    pub fn cache_prefix(&self, src: &KvCache, len: usize, capacity: usize) -> Result<KvCache> {
        let len = len.min(src.len);
        let mut dst = self.new_cache(capacity.max(len))?;
        dst.copy_from(src, len);
        dst.len = len;
        Ok(dst)
    }

    /// Makes room for `needed` tokens, copying into a larger buffer only when full.
    fn reserve(&self, cache: &mut KvCache, needed: usize) -> Result<()> {
        if needed <= cache.capacity {
            return Ok(());
        }
        let capacity = needed.max(cache.capacity * 2);
        let mut bigger = self.new_cache(capacity)?;
        bigger.copy_from(cache, cache.len);
        bigger.len = cache.len;
        *cache = bigger;
        Ok(())
    }

    fn rope_tables(&self, start: usize, len: usize) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for p in start..start + len {
            for &f in &self.inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Ok((
            Tensor::from_vec(cos, (len, half), &self.device)?,
            Tensor::from_vec(sin, (len, half), &self.device)?,
        ))
    }

    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(match &self.embed {
            Embedding::Dense(w) => w.index_select(ids, 0)?,
            Embedding::Kernel(m) => {
                let ids = ids.to_vec1::<u32>()?;
                let h = m.cols();
                let mut out = vec![0f32; ids.len() * h];
                for (&id, row) in ids.iter().zip(out.chunks_exact_mut(h)) {
                    m.dequantize_row(id as usize, row);
                }
                Tensor::from_vec(out, (ids.len(), h), &self.device)?
            }
            Embedding::Quantized(q) => q.embedding(ids)?,
        })
    }

    /// Runs the new tokens of each sequence through the model, appending to their
    /// caches. Returns, per sequence, the logits of its last token (`[vocab]`), or
    /// of every new token (`[t, vocab]`) when `all_logits` is set.
    pub fn forward(&self, batch: &mut [SeqInput<'_>], all_logits: bool) -> Result<Vec<Tensor>> {
        if !all_logits {
            let mut out = Vec::new();
            self.forward_last_into(batch, &mut out)?;
            let vocab = out.len() / batch.len().max(1);
            return out
                .chunks_exact(vocab.max(1))
                .map(|row| Ok(Tensor::from_slice(row, vocab, &self.device)?))
                .collect();
        }
        let eps = self.cfg.rms_norm_eps as f32;
        let (x, spans) = self.transformer(batch)?;
        let logits = self.lm_head.forward(&candle_nn::ops::rms_norm(&x, &self.norm, eps)?)?;
        spans.iter().map(|&(off, t, _)| Ok(logits.narrow(0, off, t)?)).collect()
    }

    /// [`Self::forward`] for the last token of each sequence only, with the
    /// logits written into `out` (`[batch, vocab]`, row `i` for sequence `i`):
    /// the caller keeps `out` between steps. A fresh `[8, 49152]` result per
    /// decode step cost ~600 page faults (glibc maps buffers that large on
    /// their own and unmaps them on free).
    pub fn forward_last_into(&self, batch: &mut [SeqInput<'_>], out: &mut Vec<f32>) -> Result<()> {
        let eps = self.cfg.rms_norm_eps as f32;
        let (x, spans) = self.transformer(batch)?;
        let last: Vec<u32> = spans.iter().map(|&(off, t, _)| (off + t - 1) as u32).collect();
        let n = last.len();
        let x = x.index_select(&Tensor::from_vec(last, n, &self.device)?, 0)?;
        let h = candle_nn::ops::rms_norm(&x, &self.norm, eps)?;
        match self.lm_head.kernel() {
            Some(m) if self.device.is_cpu() && self.lm_head.bias.is_none() => {
                out.resize(n * m.rows(), 0.0);
                m.matmul(&h.flatten_all()?.to_vec1::<f32>()?, n, out);
            }
            _ => {
                out.clear();
                out.extend(self.lm_head.forward(&h)?.flatten_all()?.to_vec1::<f32>()?);
            }
        }
        Ok(())
    }

    /// Like [`Self::forward`], but returns the last hidden state (after the final
    /// norm, as HF's `hidden_states[-1]`) of every new token, `[t, hidden]` per
    /// sequence: what embeddings are pooled from.
    pub fn hidden_states(&self, batch: &mut [SeqInput<'_>]) -> Result<Vec<Tensor>> {
        let (x, spans) = self.transformer(batch)?;
        let x = candle_nn::ops::rms_norm(&x, &self.norm, self.cfg.rms_norm_eps as f32)?;
        spans.iter().map(|&(off, t, _)| Ok(x.narrow(0, off, t)?)).collect()
    }

    /// The decoder layers over a ragged batch: the residual stream `[tokens, hidden]`
    /// (before the final norm) and where each sequence's tokens sit in it.
    fn transformer(&self, batch: &mut [SeqInput<'_>]) -> Result<(Tensor, Vec<Span>)> {
        let cfg = &self.cfg;
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let groups = nh / nkv;
        let eps = cfg.rms_norm_eps as f32;
        let mut ids = Vec::new();
        let mut spans = Vec::with_capacity(batch.len());
        for s in batch.iter_mut() {
            if s.tokens.is_empty() {
                return Err(EngineError::InvalidRequest(
                    "a sequence in the batch has no new tokens".into(),
                ));
            }
            if let Some(&bad) = s.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
                return Err(EngineError::InvalidRequest(format!(
                    "token id {bad} is outside the vocabulary (size {})",
                    cfg.vocab_size
                )));
            }
            let start = s.cache.len;
            self.reserve(s.cache, start + s.tokens.len())?;
            spans.push((ids.len(), s.tokens.len(), start));
            ids.extend_from_slice(s.tokens);
        }
        let total = ids.len();
        let ids = Tensor::from_vec(ids, total, &self.device)?;
        let mut x = self.embed(&ids)?;
        if self.on_kernels() {
            let x = self.kernel_layers(batch, &spans, x.flatten_all()?.to_vec1::<f32>()?)?;
            for (s, &(_, t, _)) in batch.iter_mut().zip(&spans) {
                s.cache.len += t;
            }
            return Ok((Tensor::from_vec(x, (total, cfg.hidden_size), &self.device)?, spans));
        }
        let ropes = spans
            .iter()
            .map(|&(_, t, start)| self.rope_tables(start, t))
            .collect::<Result<Vec<_>>>()?;
        let scale = 1.0 / (hd as f64).sqrt();
        for (layer, b) in self.blocks.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &b.attn_norm, eps)?;
            let q = b.q.forward(&h)?;
            let k = b.k.forward(&h)?;
            let v = b.v.forward(&h)?;
            let mut outs = Vec::with_capacity(batch.len());
            for (s, (&(off, t, start), (cos, sin))) in batch.iter_mut().zip(spans.iter().zip(&ropes)) {
                let heads = |x: &Tensor, n: usize| -> candle_core::Result<Tensor> {
                    x.narrow(0, off, t)?.reshape((t, n, hd))?.transpose(0, 1)?.contiguous()
                };
                let qs = candle_nn::rotary_emb::rope(&heads(&q, nh)?.unsqueeze(0)?, cos, sin)?.squeeze(0)?;
                let ks = candle_nn::rotary_emb::rope(&heads(&k, nkv)?.unsqueeze(0)?, cos, sin)?.squeeze(0)?;
                let vs = heads(&v, nkv)?;
                let (cap, c) = (s.cache.capacity, &mut *s.cache);
                let (kv, vv) = (ks.flatten_all()?.to_vec1::<f32>()?, vs.flatten_all()?.to_vec1::<f32>()?);
                c.write(layer, &kv, &vv, t, start);
                let len = start + t;
                if t == 1 && self.cfg.sliding_window.is_none_or(|w| w >= len) {
                    let q = qs.flatten_all()?.to_vec1::<f32>()?;
                    let mut out = vec![0f32; nh * hd];
                    let mut scratch = AttendScratch::default();
                    for (g, (out, qg)) in out.chunks_mut(groups * hd).zip(q.chunks(groups * hd)).enumerate() {
                        let view = |a: usize, b: usize| {
                            let (b0, b1) = (a / KEY_BLOCK, b.div_ceil(KEY_BLOCK));
                            (
                                c.k[layer].rows((g * cap + b0 * KEY_BLOCK) * hd, (b1 - b0) * KEY_BLOCK * hd),
                                a % KEY_BLOCK,
                                c.v[layer].rows((g * cap + a) * hd, (b - a) * hd),
                            )
                        };
                        attend(qg, 0, len, view, hd, scale as f32, out, &mut scratch);
                    }
                    outs.push(Tensor::from_vec(out, (1, nh * hd), &self.device)?);
                    continue;
                }
                outs.push(self.prompt_attention(&qs, c, layer, start, t)?);
            }
            let attn = if outs.len() == 1 {
                outs.pop().unwrap_or_else(|| unreachable!())
            } else {
                Tensor::cat(&outs, 0)?
            };
            x = (x + b.o.forward(&attn)?)?;
            let h = candle_nn::ops::rms_norm(&x, &b.mlp_norm, eps)?;
            let mlp = (candle_nn::ops::silu(&b.gate.forward(&h)?)? * b.up.forward(&h)?)?;
            x = (x + b.down.forward(&mlp)?)?;
        }
        for (s, &(_, t, _)) in batch.iter_mut().zip(&spans) {
            s.cache.len += t;
        }
        Ok((x, spans))
    }

    /// Whether this model's products round activations to 8 bits (`--int8`).
    pub fn int8_activations(&self) -> bool {
        self.blocks
            .iter()
            .any(|b| b.linears().iter().any(|(_, l)| l.kernel().is_some_and(|m| m.int8())))
    }

    /// Whether every projection runs on our kernels without adapters: then the
    /// layers run on plain buffers (`kernel_layers`).
    fn on_kernels(&self) -> bool {
        self.blocks
            .iter()
            .all(|b| b.linears().iter().all(|(_, l)| l.kernel().is_some()))
    }

    /// Prompt attention of one sequence's `t` new tokens (`qs`, `[heads, t, hd]`,
    /// rope applied) over its cache of one layer, which already holds them after
    /// `start` others: `[t, heads · hd]`. Query rows go in blocks, each against only
    /// the keys it may see, so the score matrix of a long prompt never exists whole.
    fn prompt_attention(&self, qs: &Tensor, c: &KvCache, layer: usize, start: usize, t: usize) -> Result<Tensor> {
        let (nh, nkv, hd) = (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim);
        let groups = nh / nkv;
        let scale = 1.0 / (hd as f64).sqrt();
        let len = start + t;
        let (keys, values) = c.gather(layer, len);
        let kall = Tensor::from_vec(keys, (nkv, len, hd), &self.device)?;
        let vall = Tensor::from_vec(values, (nkv, len, hd), &self.device)?;
        let mut parts = Vec::with_capacity(t.div_ceil(PREFILL_QUERY_BLOCK));
        for i in (0..t).step_by(PREFILL_QUERY_BLOCK) {
            let bt = PREFILL_QUERY_BLOCK.min(t - i);
            let seen = start + i + bt;
            let kc = kall.narrow(1, 0, seen)?;
            let vc = vall.narrow(1, 0, seen)?;
            // Query heads sharing a kv head are adjacent, so they fold into rows.
            let qg = qs.narrow(1, i, bt)?.contiguous()?.reshape((nkv, groups * bt, hd))?;
            let mut att = (qg.matmul(&kc.t()?)? * scale)?;
            if let Some(mask) = self.mask(start + i, bt)? {
                att = att
                    .reshape((nkv, groups, bt, seen))?
                    .broadcast_add(&mask)?
                    .reshape((nkv, groups * bt, seen))?;
            }
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            parts.push(att.matmul(&vc)?.reshape((nh, bt, hd))?);
        }
        let o = if parts.len() == 1 {
            parts.pop().unwrap_or_else(|| unreachable!())
        } else {
            Tensor::cat(&parts, 1)?
        };
        Ok(o.transpose(0, 1)?.reshape((t, nh * hd))?)
    }

    /// The decoder layers on plain buffers, for a batch whose projections all run
    /// on our kernels: `x` is the embedded tokens, `[tokens, hidden]`; returns the
    /// residual stream.
    ///
    /// Generation is this loop. Through candle it cost an allocation and a
    /// dispatch per operation per sequence (rope, cache write, attention, the
    /// reshapes between them), about as much as the weights' arithmetic at batch
    /// 8. Here each layer is four matrix products over all tokens (q/k/v and
    /// gate/up fused where the weights allow), a parallel loop over (sequence,
    /// kv head) that writes the new keys and values, and one over (token, kv
    /// head) that attends, for prompt chunks and decode steps alike. (Prompt
    /// chunks went through candle's batched attention before: its matmuls and
    /// softmax on rayon's threads, contending with ours, were a quarter of
    /// prefill.) The formulas are candle's (rms_norm, rope, silu; exp and
    /// attention sums differ in the last bits), so both paths agree.
    fn kernel_layers(&self, batch: &mut [SeqInput<'_>], spans: &[Span], mut x: Vec<f32>) -> Result<Vec<f32>> {
        let cfg = &self.cfg;
        let (h, ffn) = (cfg.hidden_size, cfg.intermediate_size);
        let total = x.len() / h;
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let (groups, half, qdim, kvdim) = (nh / nkv, hd / 2, nh * hd, nkv * hd);
        let width = qdim + 2 * kvdim;
        let eps = cfg.rms_norm_eps as f32;
        let scale = (1.0 / (hd as f64).sqrt()) as f32;
        // Rope angles per token, shared by every layer (as `rope_tables`).
        let (mut cos, mut sin) = (vec![0f32; total * half], vec![0f32; total * half]);
        for &(off, t, start) in spans {
            for i in 0..t {
                for (j, &f) in self.inv_freq.iter().enumerate() {
                    let a = (start + i) as f32 * f;
                    cos[(off + i) * half + j] = a.cos();
                    sin[(off + i) * half + j] = a.sin();
                }
            }
        }
        // Each row's sequence and position.
        let rows: Vec<(usize, usize)> = spans
            .iter()
            .enumerate()
            .flat_map(|(si, &(_, t, start))| (start..start + t).map(move |p| (si, p)))
            .collect();
        let window = cfg.sliding_window;
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
        // busy (a single stream's decode step: as many as kv heads).
        let few = total * nkv < 4 * team.threads();
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
        let whole = work.len() == total * nkv;
        let mut partials = vec![0f32; if whole { 0 } else { work.len() * part_len(groups, hd) }];
        fn kernel(l: &Linear) -> &QMatrix {
            l.kernel().unwrap_or_else(|| unreachable!("checked by on_kernels"))
        }
        for (layer, b) in self.blocks.iter().enumerate() {
            rms_norm_rows(&x, &b.attn_norm.to_vec1::<f32>()?, eps, &mut hbuf);
            project(&[&b.q, &b.k, &b.v], b.qkv.as_ref(), &hbuf, total, &mut qkv)?;
            let caches: Vec<(KvPtr, KvPtr, usize)> = batch
                .iter_mut()
                .map(|s| {
                    let c = &mut *s.cache;
                    (c.k[layer].ptr(), c.v[layer].ptr(), c.capacity)
                })
                .collect();
            let (qkv_r, cos_r, sin_r) = (&qkv, &cos, &sin);
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
            kernel(&b.o).matmul(&att, total, &mut proj);
            x.iter_mut().zip(&proj).for_each(|(x, p)| *x += p);
            // The MLP in row blocks: its intermediates are the widest buffers.
            let mlp_norm = b.mlp_norm.to_vec1::<f32>()?;
            for r0 in (0..total).step_by(MLP_ROWS) {
                let rows = MLP_ROWS.min(total - r0);
                let xr = &mut x[r0 * h..(r0 + rows) * h];
                rms_norm_rows(xr, &mlp_norm, eps, &mut hbuf[..rows * h]);
                project(
                    &[&b.gate, &b.up],
                    b.gate_up.as_ref(),
                    &hbuf[..rows * h],
                    rows,
                    &mut gu[..rows * 2 * ffn],
                )?;
                // silu(gate) · up (candle's formula, exp to an ulp); rows in parallel.
                let (act_p, gu_r) = (Shared(act.as_mut_ptr()), &gu);
                // Up to 8 rows a task, a decode step's rows split over the team.
                let per_task = rows.div_ceil(team.threads()).clamp(1, 8);
                team.run(rows.div_ceil(per_task), &|c| {
                    for r in c * per_task..((c + 1) * per_task).min(rows) {
                        // SAFETY: each task writes its own rows of `act`, which
                        // outlives the loop.
                        let a = unsafe { std::slice::from_raw_parts_mut(act_p.get().add(r * ffn), ffn) };
                        let (g, u) = gu_r[r * 2 * ffn..(r + 1) * 2 * ffn].split_at(ffn);
                        crate::kernels::silu_mul(g, u, a);
                    }
                });
                kernel(&b.down).matmul(&act[..rows * ffn], rows, &mut proj[..rows * h]);
                xr.iter_mut().zip(&proj).for_each(|(x, p)| *x += p);
            }
        }
        Ok(x)
    }

    /// Additive mask `[t, start + t]` for `t` new tokens after `start` cached ones:
    /// causal, and limited to the sliding window when the model has one.
    fn mask(&self, start: usize, t: usize) -> Result<Option<Tensor>> {
        let len = start + t;
        let window = self.cfg.sliding_window.filter(|&w| w < len);
        if t == 1 && window.is_none() {
            return Ok(None);
        }
        let mut m = vec![0f32; t * len];
        for i in 0..t {
            let pos = start + i;
            for j in 0..len {
                let outside = window.is_some_and(|w| j + w <= pos);
                if j > pos || outside {
                    m[i * len + j] = f32::NEG_INFINITY;
                }
            }
        }
        Ok(Some(Tensor::from_vec(m, (t, len), &self.device)?))
    }

    /// The vocabulary size (width of the logits).
    pub fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }
}

// ---------------------------------------------------------------------------
// Training: the same blocks, run over a padded or packed batch `[b, t]` without a
// KV cache, using only candle ops that autograd can differentiate (plain RoPE,
// RMS norm and softmax written out of elementwise ops rather than the fused
// inference kernels, which have no backward pass).
// ---------------------------------------------------------------------------

/// The seven projections of a block, by their HF module names.
pub const LINEAR_MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Token ids of a training batch with their positions and attention mask.
pub struct TrainInputs {
    /// `[b, t]` u32.
    pub ids: Tensor,
    cos: Tensor,
    sin: Tensor,
    /// Additive `[b, 1, t, t]`: causal, and block-diagonal when sequences are packed.
    mask: Tensor,
    b: usize,
    t: usize,
}

/// LoRA dropout for one training step: the probability and a seed from which
/// every mask is derived, so a recomputed block (or a resumed run) draws the
/// same masks.
#[derive(Debug, Clone, Copy)]
pub struct Dropout {
    pub p: f32,
    pub seed: u64,
}

impl Dropout {
    fn mask(&self, layer: usize, module: usize, shape: (usize, usize), device: &Device) -> Result<Tensor> {
        use rand::{Rng, SeedableRng};
        let stream = self.seed ^ ((layer as u64) << 32 | module as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut rng = rand::rngs::StdRng::seed_from_u64(stream);
        let keep = 1.0 / (1.0 - self.p);
        let n = shape.0 * shape.1;
        let v: Vec<f32> = (0..n)
            .map(|_| if rng.random::<f32>() < self.p { 0.0 } else { keep })
            .collect();
        Ok(Tensor::from_vec(v, shape, device)?)
    }
}

impl Linear {
    /// The dense weight, for training (quantized weights cannot be differentiated).
    pub fn dense_weight(&self) -> Option<&Tensor> {
        match &self.weight {
            LinearWeight::Dense(w) => Some(w),
            _ => None,
        }
    }

    /// The adapter, if one is attached.
    pub fn lora(&self) -> Option<&Lora> {
        self.lora.as_ref()
    }

    /// Attaches (or removes) an adapter.
    pub fn set_lora(&mut self, lora: Option<Lora>) {
        self.lora = lora;
    }

    /// `x` `[n, in]` → `[n, out]`, differentiable; `drop` multiplies the adapter's input.
    fn forward_train(&self, x: &Tensor, drop: Option<&Tensor>) -> Result<Tensor> {
        let LinearWeight::Dense(w) = &self.weight else {
            return Err(EngineError::InvalidRequest(
                "training needs dense weights: load the model with dtype f32".into(),
            ));
        };
        // A trainable weight goes through candle's matmul (whose backward yields
        // both gradients); a frozen one through `FrozenMatmul`, which yields only
        // the input's: candle would otherwise compute and keep a weight-sized
        // gradient for every frozen projection until the backward pass ends.
        let mut y = if w.is_variable() || w.track_op() {
            x.matmul(&w.t()?)?
        } else {
            x.contiguous()?.apply_op1(FrozenMatmul { w: w.clone() })?
        };
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        if let Some(l) = &self.lora {
            let xd = match drop {
                Some(m) => (x * m)?,
                None => x.clone(),
            };
            y = (y + (xd.matmul(&l.a.t()?)?.matmul(&l.b.t()?)? * l.scale)?)?;
        }
        Ok(y)
    }
}

/// `x Wᵀ` for a weight that gets no gradient: backward returns `grad · W` for
/// `x` only. A bf16 weight is widened to f32 for the product (one weight at a
/// time), so the frozen base can be stored in half the memory.
struct FrozenMatmul {
    w: Tensor,
}

impl FrozenMatmul {
    fn weight_f32(&self) -> candle_core::Result<Tensor> {
        self.w.to_dtype(DType::F32)
    }
}

impl candle_core::CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let x = cpu_tensor(storage, layout)?;
        into_cpu_storage(&x.matmul(&self.weight_f32()?.t()?)?)
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.weight_f32()?)?))
    }
}

/// Each row's negative log-likelihood of its target under `softmax(h Wᵀ)`, for
/// `h` `[n, hidden]` and the output projection `W` `[vocab, hidden]`.
///
/// The logits are never whole: the vocabulary goes in slices of at most
/// `HEAD_SLICE` rows of `W`, with a running log-sum-exp per row, and the backward
/// pass recomputes each slice's logits. Written as one op because candle's
/// `log_softmax` + `gather` keep four `[n, vocab]` tensors alive until the
/// backward pass ends (and as many again during it): with 49,152 logits per
/// token that was the largest allocation of a step, growing with `--max-len`.
/// `W`'s gradient is computed only when `W` is trained.
struct HeadNll {
    w: Tensor,
    targets: Vec<u32>,
    /// Each row's log-sum-exp, from the forward pass for the backward pass.
    lse: std::sync::Mutex<Vec<f32>>,
}

/// Vocabulary rows per slice of the output projection in [`HeadNll`].
const HEAD_SLICE: usize = 8192;

impl HeadNll {
    /// `(start, len)` of each vocabulary slice: fewer columns when there are many rows,
    /// so one slice's logits stay near 4M floats.
    fn slices(&self, rows: usize) -> Vec<(usize, usize)> {
        let vocab = self.w.dim(0).unwrap_or(0);
        let width = ((4 << 20) / rows.max(1)).clamp(1024, HEAD_SLICE);
        (0..vocab).step_by(width).map(|j| (j, width.min(vocab - j))).collect()
    }

    /// Logits of every row for one slice, flat `[rows, len]`, and the widened slice of `W`.
    fn logits(&self, h: &Tensor, (start, len): (usize, usize)) -> candle_core::Result<(Vec<f32>, Tensor)> {
        let w = self.w.narrow(0, start, len)?.to_dtype(DType::F32)?.contiguous()?;
        let l = h.matmul(&w.t()?)?.flatten_all()?.to_vec1::<f32>()?;
        Ok((l, w))
    }
}

impl candle_core::CustomOp2 for HeadNll {
    fn name(&self) -> &'static str {
        "head-nll"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
        _w: &candle_core::CpuStorage,
        _wl: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let h = cpu_tensor(storage, layout)?;
        let n = h.dim(0)?;
        if n != self.targets.len() {
            candle_core::bail!("head-nll: {n} rows but {} targets", self.targets.len());
        }
        // Per row: running max, running sum of exp(logit - max), the target's logit.
        let mut acc = vec![(f32::NEG_INFINITY, 0f32, 0f32); n];
        for (j, len) in self.slices(n) {
            let (l, _) = self.logits(&h, (j, len))?;
            acc.par_iter_mut()
                .zip(l.par_chunks(len))
                .zip(self.targets.par_iter())
                .for_each(|(((m, s, t), row), &target)| {
                    let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let new_m = m.max(mx);
                    *s = *s * (*m - new_m).exp() + row.iter().map(|&x| (x - new_m).exp()).sum::<f32>();
                    *m = new_m;
                    let k = target as usize;
                    if (j..j + len).contains(&k) {
                        *t = row[k - j];
                    }
                });
        }
        let lse: Vec<f32> = acc.iter().map(|&(m, s, _)| m + s.ln()).collect();
        let nll: Vec<f32> = lse.iter().zip(&acc).map(|(l, &(_, _, t))| l - t).collect();
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = lse;
        Ok((candle_core::CpuStorage::F32(nll), candle_core::Shape::from(n)))
    }

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        _nll: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let lse = self.lse.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let g = grad.to_vec1::<f32>()?;
        let h = h.detach();
        let n = h.dim(0)?;
        let train_w = w.is_variable() || w.track_op();
        let mut grad_h: Option<Tensor> = None;
        let mut grad_w = Vec::new();
        for (j, len) in self.slices(n) {
            let (mut d, wj) = self.logits(&h, (j, len))?;
            // d logit = (softmax - onehot(target)) · upstream gradient of the row.
            d.par_chunks_mut(len)
                .zip(self.targets.par_iter())
                .zip(lse.par_iter().zip(g.par_iter()))
                .for_each(|((row, &target), (&lse, &g))| {
                    row.iter_mut().for_each(|x| *x = (*x - lse).exp() * g);
                    let k = target as usize;
                    if (j..j + len).contains(&k) {
                        row[k - j] -= g;
                    }
                });
            let d = Tensor::from_vec(d, (n, len), h.device())?;
            let gh = d.matmul(&wj)?;
            grad_h = Some(match grad_h {
                Some(a) => (a + gh)?,
                None => gh,
            });
            if train_w {
                grad_w.push(d.t()?.matmul(&h)?);
            }
        }
        let grad_w = if train_w {
            Some(Tensor::cat(&grad_w, 0)?.to_dtype(w.dtype())?)
        } else {
            None
        };
        Ok((grad_h, grad_w))
    }
}

/// Attention probabilities `softmax(q kᵀ · scale + mask)` for `q`, `k`
/// `[b, heads, t, head_dim]`: `[b, heads, t, t]`.
///
/// One op so that only its output is kept for the backward pass (which needs
/// nothing else: `dS = scale · P ⊙ (dP − rowsum(dP ⊙ P))`). Composed of candle
/// ops, the scores, the scaled and masked scores and the softmax's own three
/// intermediates were all kept, plus a gradient for the constant mask: six
/// `t × t` tensors per head and layer where this keeps one.
struct AttentionProbs {
    /// Additive `[b, 1, t, t]`.
    mask: Tensor,
    scale: f64,
}

fn cpu_tensor(storage: &candle_core::CpuStorage, layout: &candle_core::Layout) -> candle_core::Result<Tensor> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("training op: the input must be contiguous");
    };
    Tensor::from_slice(&storage.as_slice::<f32>()?[start..end], layout.shape(), &Device::Cpu)
}

fn into_cpu_storage(t: &Tensor) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
    let t = t.contiguous()?;
    let (s, l) = t.storage_and_layout();
    match (&*s, l.contiguous_offsets()) {
        (Storage::Cpu(c), Some((0, end))) if end == c.as_slice::<f32>()?.len() => Ok((c.clone(), l.shape().clone())),
        (Storage::Cpu(_), _) => Ok((
            candle_core::CpuStorage::F32(t.flatten_all()?.to_vec1::<f32>()?),
            l.shape().clone(),
        )),
        _ => candle_core::bail!("training ops run on the CPU only"),
    }
}

impl candle_core::CustomOp2 for AttentionProbs {
    fn name(&self) -> &'static str {
        "attention-probs"
    }

    fn cpu_fwd(
        &self,
        qs: &candle_core::CpuStorage,
        ql: &candle_core::Layout,
        ks: &candle_core::CpuStorage,
        kl: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (q, k) = (cpu_tensor(qs, ql)?, cpu_tensor(ks, kl)?);
        let scores = (q.matmul(&k.t()?)? * self.scale)?.broadcast_add(&self.mask)?;
        into_cpu_storage(&candle_nn::ops::softmax_last_dim(&scores)?)
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        p: &Tensor,
        dp: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (q, k, p) = (q.detach(), k.detach(), p.detach());
        let row = (dp * &p)?.sum_keepdim(D::Minus1)?;
        let ds = ((dp.broadcast_sub(&row)? * &p)? * self.scale)?;
        Ok((Some(ds.matmul(&k)?), Some(ds.t()?.matmul(&q)?)))
    }
}

/// RMS norm out of elementwise ops (differentiable).
fn rms_norm_train(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let var = x.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(x.broadcast_div(&(var + eps)?.sqrt()?)?.broadcast_mul(w)?)
}

/// HF's rotate-half RoPE; `x` `[b, heads, t, hd]`, `cos`/`sin` `[b, 1, t, hd/2]`.
fn rope_train(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let r1 = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let r2 = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    Ok(Tensor::cat(&[r1, r2], D::Minus1)?)
}

impl Model {
    /// Prepares a batch of equal-length rows. `segments[r][i]` says which packed
    /// sequence token `i` of row `r` belongs to (positions restart and attention
    /// stops at each new segment); all zeros for one sequence per row.
    pub fn train_inputs(&self, ids: &[Vec<u32>], segments: &[Vec<u32>]) -> Result<TrainInputs> {
        let b = ids.len();
        let t = ids.first().map_or(0, Vec::len);
        if b == 0 || t == 0 || ids.iter().any(|r| r.len() != t) || segments.len() != b {
            return Err(EngineError::InvalidRequest(
                "a training batch needs rows of equal, non-zero length".into(),
            ));
        }
        if let Some(&bad) = ids.iter().flatten().find(|&&x| x as usize >= self.cfg.vocab_size) {
            return Err(EngineError::InvalidRequest(format!(
                "token id {bad} is outside the vocabulary (size {})",
                self.cfg.vocab_size
            )));
        }
        let half = self.inv_freq.len();
        let (mut cos, mut sin) = (Vec::with_capacity(b * t * half), Vec::with_capacity(b * t * half));
        let mut mask = vec![0f32; b * t * t];
        for (r, seg) in segments.iter().enumerate() {
            let mut pos = 0usize;
            let mut start = 0usize;
            for i in 0..t {
                if i > 0 && seg[i] != seg[i - 1] {
                    pos = 0;
                    start = i;
                }
                for &f in &self.inv_freq {
                    let a = pos as f32 * f;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
                for j in 0..t {
                    let outside = self.cfg.sliding_window.is_some_and(|w| j + w <= i);
                    if j > i || j < start || outside {
                        mask[(r * t + i) * t + j] = f32::NEG_INFINITY;
                    }
                }
                pos += 1;
            }
        }
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        Ok(TrainInputs {
            ids: Tensor::from_vec(flat, (b, t), &self.device)?,
            cos: Tensor::from_vec(cos, (b, 1, t, half), &self.device)?,
            sin: Tensor::from_vec(sin, (b, 1, t, half), &self.device)?,
            mask: Tensor::from_vec(mask, (b, 1, t, t), &self.device)?,
            b,
            t,
        })
    }

    /// Number of decoder blocks.
    pub fn num_layers(&self) -> usize {
        self.blocks.len()
    }

    /// The token embeddings of a batch, `[b·t, hidden]`.
    pub fn train_embed(&self, inp: &TrainInputs) -> Result<Tensor> {
        let Embedding::Dense(w) = &self.embed else {
            return Err(EngineError::InvalidRequest(
                "training needs dense weights: load the model with dtype f32".into(),
            ));
        };
        // A frozen bf16 table is widened row by row (the residual stream is f32).
        Ok(w.index_select(&inp.ids.flatten_all()?, 0)?.to_dtype(DType::F32)?)
    }

    /// One decoder block over the residual stream `x` `[b·t, hidden]`.
    pub fn train_block(&self, layer: usize, x: &Tensor, inp: &TrainInputs, drop: Option<Dropout>) -> Result<Tensor> {
        let cfg = &self.cfg;
        let blk = &self.blocks[layer];
        let (b, t) = (inp.b, inp.t);
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let groups = nh / nkv;
        let eps = cfg.rms_norm_eps;
        let masks = |m: usize, inp_dim: usize, l: &Linear| -> Result<Option<Tensor>> {
            match drop {
                Some(d) if d.p > 0.0 && l.lora.is_some() => {
                    Ok(Some(d.mask(layer, m, (b * t, inp_dim), &self.device)?))
                }
                _ => Ok(None),
            }
        };
        let h = rms_norm_train(x, &blk.attn_norm, eps)?;
        let (hs, is) = (cfg.hidden_size, cfg.intermediate_size);
        let q = blk.q.forward_train(&h, masks(0, hs, &blk.q)?.as_ref())?;
        let k = blk.k.forward_train(&h, masks(1, hs, &blk.k)?.as_ref())?;
        let v = blk.v.forward_train(&h, masks(2, hs, &blk.v)?.as_ref())?;
        let heads =
            |x: Tensor, n: usize| -> Result<Tensor> { Ok(x.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?) };
        let q = rope_train(&heads(q, nh)?, &inp.cos, &inp.sin)?;
        let mut k = rope_train(&heads(k, nkv)?, &inp.cos, &inp.sin)?;
        let mut v = heads(v, nkv)?;
        if groups > 1 {
            let repeat = |x: Tensor| -> Result<Tensor> {
                Ok(x.unsqueeze(2)?
                    .broadcast_as((b, nkv, groups, t, hd))?
                    .reshape((b, nh, t, hd))?)
            };
            k = repeat(k)?;
            v = repeat(v)?;
        }
        let att = q.contiguous()?.apply_op2(
            &k.contiguous()?,
            AttentionProbs {
                mask: inp.mask.clone(),
                scale: 1.0 / (hd as f64).sqrt(),
            },
        )?;
        let o = att.matmul(&v)?.transpose(1, 2)?.reshape((b * t, nh * hd))?;
        let x = (x + blk.o.forward_train(&o, masks(3, nh * hd, &blk.o)?.as_ref())?)?;
        let h = rms_norm_train(&x, &blk.mlp_norm, eps)?;
        let gate = blk.gate.forward_train(&h, masks(4, hs, &blk.gate)?.as_ref())?.silu()?;
        let mlp = (gate * blk.up.forward_train(&h, masks(5, hs, &blk.up)?.as_ref())?)?;
        let mlp = blk.down.forward_train(&mlp, masks(6, is, &blk.down)?.as_ref())?;
        Ok((x + mlp)?)
    }

    /// Final norm and output projection for the rows of `x` `[n, hidden]`: logits `[n, vocab]`.
    pub fn train_head(&self, x: &Tensor) -> Result<Tensor> {
        let h = rms_norm_train(x, &self.norm, self.cfg.rms_norm_eps)?;
        self.lm_head.forward_train(&h, None)
    }

    /// Summed negative log-likelihood of `targets[i]` after row `i` of `x` `[n, hidden]`
    /// (the final norm and output projection, then cross-entropy), differentiable,
    /// without holding the `[n, vocab]` logits: equal to `-Σ log_softmax(train_head(x))[i, targets[i]]`.
    pub fn train_nll(&self, x: &Tensor, targets: &[u32]) -> Result<Tensor> {
        if targets.iter().any(|&t| t as usize >= self.cfg.vocab_size) {
            return Err(EngineError::InvalidRequest(
                "a target id is outside the vocabulary".into(),
            ));
        }
        let h = rms_norm_train(x, &self.norm, self.cfg.rms_norm_eps)?;
        let head = &self.lm_head;
        match (&head.weight, &head.bias, &head.lora) {
            (LinearWeight::Dense(w), None, None) => {
                let op = HeadNll {
                    w: w.clone(),
                    targets: targets.to_vec(),
                    lse: Default::default(),
                };
                Ok(h.contiguous()?.apply_op2(w, op)?.sum_all()?)
            }
            _ => {
                let logits = self.lm_head.forward_train(&h, None)?;
                let n = targets.len();
                let tgt = Tensor::from_vec(targets.to_vec(), (n, 1), &self.device)?;
                let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
                Ok(logp.gather(&tgt, 1)?.sum_all()?.neg()?)
            }
        }
    }

    /// Every dense weight by its HF name (the tied output projection is not listed
    /// twice). Norms and embeddings included.
    pub fn named_weights(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        if let Embedding::Dense(w) = &self.embed {
            out.push(("model.embed_tokens.weight".to_string(), w.clone()));
        }
        for (i, blk) in self.blocks.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.push((format!("{p}.input_layernorm.weight"), blk.attn_norm.clone()));
            out.push((format!("{p}.post_attention_layernorm.weight"), blk.mlp_norm.clone()));
            for (name, l) in blk.linears() {
                if let Some(w) = l.dense_weight() {
                    out.push((format!("{p}.{name}.weight"), w.clone()));
                }
                if let Some(bias) = &l.bias {
                    out.push((format!("{p}.{name}.bias"), bias.clone()));
                }
            }
        }
        out.push(("model.norm.weight".to_string(), self.norm.clone()));
        if !self.tied {
            if let Some(w) = self.lm_head.dense_weight() {
                out.push(("lm_head.weight".to_string(), w.clone()));
            }
        }
        out
    }

    /// Replaces every dense weight with `f(name, weight)` (e.g. a trainable
    /// variable holding the same values); a tied output projection follows the
    /// embedding. Names are those of [`Self::named_weights`].
    pub fn map_weights(&mut self, f: &mut dyn FnMut(&str, &Tensor) -> Result<Tensor>) -> Result<()> {
        if let Embedding::Dense(w) = &self.embed {
            let nw = f("model.embed_tokens.weight", w)?;
            if self.tied {
                self.lm_head.weight = LinearWeight::Dense(nw.clone());
            }
            self.embed = Embedding::Dense(nw);
        }
        for (i, blk) in self.blocks.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            blk.attn_norm = f(&format!("{p}.input_layernorm.weight"), &blk.attn_norm)?;
            blk.mlp_norm = f(&format!("{p}.post_attention_layernorm.weight"), &blk.mlp_norm)?;
            for (name, l) in blk.linears_mut() {
                if let LinearWeight::Dense(w) = &l.weight {
                    l.weight = LinearWeight::Dense(f(&format!("{p}.{name}.weight"), w)?);
                }
                if let Some(bias) = &l.bias {
                    l.bias = Some(f(&format!("{p}.{name}.bias"), bias)?);
                }
            }
        }
        self.norm = f("model.norm.weight", &self.norm)?;
        if !self.tied {
            if let LinearWeight::Dense(w) = &self.lm_head.weight {
                self.lm_head.weight = LinearWeight::Dense(f("lm_head.weight", w)?);
            }
        }
        Ok(())
    }

    /// The projections of every block, by HF module path (`model.layers.3.self_attn.q_proj`).
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, blk) in self.blocks.iter_mut().enumerate() {
            for (name, l) in blk.linears_mut() {
                out.push((format!("model.layers.{i}.{name}"), l));
            }
        }
        out
    }

    /// Whether the output projection shares the embedding matrix.
    pub fn tied_embeddings(&self) -> bool {
        self.tied
    }
}

impl Block {
    fn linears(&self) -> [(&'static str, &Linear); 7] {
        [
            ("self_attn.q_proj", &self.q),
            ("self_attn.k_proj", &self.k),
            ("self_attn.v_proj", &self.v),
            ("self_attn.o_proj", &self.o),
            ("mlp.gate_proj", &self.gate),
            ("mlp.up_proj", &self.up),
            ("mlp.down_proj", &self.down),
        ]
    }

    fn linears_mut(&mut self) -> [(&'static str, &mut Linear); 7] {
        [
            ("self_attn.q_proj", &mut self.q),
            ("self_attn.k_proj", &mut self.k),
            ("self_attn.v_proj", &mut self.v),
            ("self_attn.o_proj", &mut self.o),
            ("mlp.gate_proj", &mut self.gate),
            ("mlp.up_proj", &mut self.up),
            ("mlp.down_proj", &mut self.down),
        ]
    }
}

thread_local! {
    /// Per thread: the query heads of one attention task and its working buffers.
    static ATTENTION_SCRATCH: std::cell::RefCell<AttendScratch> = std::cell::RefCell::default();
}

/// Positions per attention chunk (a whole number of key blocks). A context longer
/// than this is attended chunk by chunk, each chunk with its own softmax, and the
/// partial results merged in position order (as flash-decoding does). That lets a
/// single stream's decode step spread its few (token, kv head) tasks over the team
/// as chunks: at 2K tokens SmolLM2 has 3 such tasks per layer for 2 threads, so
/// one thread idled through a third of attention. The chunks depend on positions
/// alone, so a token gets the same bits however they were scheduled; contexts
/// within one chunk take the plain softmax.
const ATTENTION_CHUNK: usize = 512;
const _: () = assert!(ATTENTION_CHUNK.is_multiple_of(KEY_BLOCK));

/// The chunks `[a, b)` of positions `lo .. end`, split at multiples of
/// `ATTENTION_CHUNK`, in order.
fn attention_chunks(lo: usize, end: usize) -> impl Iterator<Item = (usize, usize)> {
    (lo / ATTENTION_CHUNK..end.div_ceil(ATTENTION_CHUNK))
        .map(move |c| (lo.max(c * ATTENTION_CHUNK), end.min((c + 1) * ATTENTION_CHUNK)))
}

/// Floats of one chunk's partial result for `g` query heads: `[g, hd]` weighted
/// sums, then `g` maxima, then `g` sums of exponentials (`attend_part`).
fn part_len(g: usize, hd: usize) -> usize {
    g * hd + 2 * g
}

#[derive(Default)]
struct AttendScratch {
    q: Vec<f32>,
    scores: Vec<f32>,
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
fn attend<'a>(
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
fn attend_part(
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
fn fold_part(acc: &mut [f32], next: &[f32], g: usize, hd: usize) {
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
fn finish_part(acc: &[f32], g: usize, hd: usize, out: &mut [f32]) {
    let sums = &acc[g * hd + g..][..g];
    for ((oh, ah), &sum) in out.chunks_exact_mut(hd).zip(acc.chunks_exact(hd)).zip(sums) {
        for (o, a) in oh.iter_mut().zip(ah) {
            *o = a / sum;
        }
    }
}

/// candle's `rms_norm` on each row of `x` (the same arithmetic, so the same bits).
fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
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
fn rope_head(x: &[f32], cos: &[f32], sin: &[f32], out: &mut [f32]) {
    let half = cos.len();
    for i in 0..half {
        let (a, b) = (x[i], x[i + half]);
        out[i] = a * cos[i] - b * sin[i];
        out[i + half] = a * sin[i] + b * cos[i];
    }
}

/// `out[n, Σ rows] = x · [parts]ᵀ (+ their biases)`: one pass over `fused` (the
/// parts' rows stored together) where there is one, else a pass per part.
fn project(parts: &[&Linear], fused: Option<&QMatrix>, x: &[f32], n: usize, out: &mut [f32]) -> Result<()> {
    let widths: Vec<usize> = parts.iter().map(|l| l.kernel().map_or(0, |m| m.rows())).collect();
    let total: usize = widths.iter().sum();
    match fused {
        Some(m) => m.matmul(x, n, out),
        None => {
            let mut off = 0;
            for (l, &w) in parts.iter().zip(&widths) {
                let mut part = vec![0f32; n * w];
                if let Some(m) = l.kernel() {
                    m.matmul(x, n, &mut part);
                }
                for (dst, src) in out.chunks_exact_mut(total).zip(part.chunks_exact(w)) {
                    dst[off..off + w].copy_from_slice(src);
                }
                off += w;
            }
        }
    }
    let mut off = 0;
    for (l, &w) in parts.iter().zip(&widths) {
        if let Some(bias) = &l.bias {
            let bias = bias.to_vec1::<f32>()?;
            for row in out.chunks_exact_mut(total) {
                row[off..off + w].iter_mut().zip(&bias).for_each(|(o, b)| *o += b);
            }
        }
        off += w;
    }
    Ok(())
}

/// Replaces the weights of `parts` (our kernel's matrices, no adapters) with views
/// of one matrix holding all their rows, and returns that matrix.
fn fuse(parts: &mut [&mut Linear]) -> Option<QMatrix> {
    let ms: Vec<QMatrix> = parts.iter().map(|l| l.kernel().cloned()).collect::<Option<_>>()?;
    let (whole, views) = QMatrix::concat(&ms.iter().collect::<Vec<_>>())?;
    for (l, v) in parts.iter_mut().zip(views) {
        l.weight = LinearWeight::Kernel(v);
    }
    Some(whole)
}

/// A pointer shared by the tasks of one parallel loop, each touching its own part.
#[derive(Clone, Copy)]
struct Shared(*mut f32);

// SAFETY: only used inside `Team::run` loops whose tasks write disjoint ranges
// (see `kernel_layers`), while the owner of the buffer waits.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

impl Shared {
    /// The pointer (a method, so closures capture the `Sync` wrapper, not the field).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Dot product with sixteen independent sums, so the compiler can keep them in one
/// vector register (a single running sum must be added in order, one at a time).
fn dot(a: &[f32], b: &[f32]) -> f32 {
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

/// Index of the largest value (first on ties), as greedy decoding picks.
pub fn argmax(logits: &Tensor) -> Result<u32> {
    Ok(logits.argmax(D::Minus1)?.to_scalar::<u32>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::SafetensorsSource;
    use candle_core::quantized::{GgmlDType, QTensor};
    use std::path::PathBuf;
    use std::sync::Arc;

    /// Chunked attention (`ATTENTION_CHUNK`) against the softmax formula in f64,
    /// over a context of several chunks starting inside one (a sliding window);
    /// and the chunks computed apart and merged afterwards (how a single stream's
    /// decode step spreads them over the team) give the very bits of `attend`.
    #[test]
    fn chunked_attention_matches_the_formula_however_it_is_split() {
        let (g, hd) = (3, 64);
        let (lo, end) = (37, 2 * ATTENTION_CHUNK + 300);
        let mut rng = 7u64;
        let mut next = || {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((rng >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
        };
        let q: Vec<f32> = (0..g * hd).map(|_| next()).collect();
        let keys: Vec<f32> = (0..end * hd).map(|_| next()).collect();
        let values: Vec<f32> = (0..end * hd).map(|_| next()).collect();
        let mut kb = vec![0f32; end.next_multiple_of(KEY_BLOCK) * hd];
        for p in 0..end {
            for c in 0..hd {
                kb[key_index(p, c, hd)] = keys[p * hd + c];
            }
        }
        let view = |a: usize, b: usize| {
            let (b0, b1) = (a / KEY_BLOCK, b.div_ceil(KEY_BLOCK));
            (
                KvRows::F32(&kb[b0 * KEY_BLOCK * hd..b1 * KEY_BLOCK * hd]),
                a % KEY_BLOCK,
                KvRows::F32(&values[a * hd..b * hd]),
            )
        };
        let scale = 0.125;
        let mut out = vec![0f32; g * hd];
        attend(&q, lo, end, view, hd, scale, &mut out, &mut AttendScratch::default());
        assert_eq!(attention_chunks(lo, end).count(), 3);
        for h in 0..g {
            let s: Vec<f64> = (lo..end)
                .map(|p| (0..hd).map(|c| (q[h * hd + c] * keys[p * hd + c]) as f64).sum::<f64>() * scale as f64)
                .collect();
            let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = s.iter().map(|x| (x - max).exp()).sum();
            for c in 0..hd {
                let want: f64 = (lo..end)
                    .map(|p| (s[p - lo] - max).exp() * values[p * hd + c] as f64)
                    .sum::<f64>()
                    / sum;
                let got = out[h * hd + c] as f64;
                assert!((got - want).abs() < 1e-4, "head {h} dim {c}: {got} vs {want}");
            }
        }
        // Apart, then merged in order.
        let plen = part_len(g, hd);
        let chunks: Vec<(usize, usize)> = attention_chunks(lo, end).collect();
        let mut parts = vec![0f32; chunks.len() * plen];
        for (&(a, b), part) in chunks.iter().zip(parts.chunks_exact_mut(plen)) {
            let (k, first, v) = view(a, b);
            attend_part(&q, k, first, v, hd, b - a, scale, part, &mut Vec::new());
        }
        let (acc, rest) = parts.split_at_mut(plen);
        for next in rest.chunks_exact(plen) {
            fold_part(acc, next, g, hd);
        }
        let mut merged = vec![0f32; g * hd];
        finish_part(acc, g, hd, &mut merged);
        assert!(merged.iter().zip(&out).all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    /// A decode step past several attention chunks gives a sequence the same bits
    /// alone (few tasks: its chunks spread over the team) as in a batch of eight
    /// (one task per token and kv head, chunks in turn), and stays near candle's
    /// path, which attends the whole context at once.
    #[test]
    fn long_context_decode_has_the_same_bits_alone_and_batched() {
        let mut m = tiny("tiny-llama");
        m.set_kv_dtype(KvDType::F32);
        let n = 2 * ATTENTION_CHUNK + 77;
        let tokens: Vec<u32> = (0..n).map(|i| (i * 37 % 500 + 3) as u32).collect();
        let (prompt, last) = tokens.split_at(n - 1);
        let mut base = m.new_cache(n).unwrap();
        m.forward(
            &mut [SeqInput {
                tokens: prompt,
                cache: &mut base,
            }],
            false,
        )
        .unwrap();
        let step = |batch: usize| {
            let mut caches: Vec<KvCache> = (0..batch).map(|_| m.cache_prefix(&base, n - 1, n).unwrap()).collect();
            let mut inputs: Vec<SeqInput> = caches.iter_mut().map(|c| SeqInput { tokens: last, cache: c }).collect();
            let out = m.forward(&mut inputs, false).unwrap();
            out.iter().map(|t| t.to_vec1::<f32>().unwrap()).collect::<Vec<_>>()
        };
        let alone = step(1).remove(0);
        for (i, row) in step(8).iter().enumerate() {
            assert!(
                row.iter().zip(&alone).all(|(a, b)| a.to_bits() == b.to_bits()),
                "sequence {i} of 8 differs from the same sequence alone"
            );
        }
        let want = candle_logits(&mut m, &tokens).pop().unwrap();
        let d = max_diff(&alone, &want);
        assert!(d < 1e-3, "logits {d} off candle's path");
    }

    /// The tiny HF fixtures with every matrix quantized to Q8_0 at load, so that
    /// their decode steps take the plain-buffer path (`kernel_layers`).
    struct Quantizing(SafetensorsSource);

    impl WeightSource for Quantizing {
        fn get(&self, name: &str, shape: &[usize]) -> Result<Weight> {
            match self.0.get(name, shape)? {
                Weight::Dense(t) if shape.len() == 2 && shape[1].is_multiple_of(32) => {
                    let t = t.to_dtype(DType::F32)?;
                    Ok(Weight::Quantized(Arc::new(QTensor::quantize(&t, GgmlDType::Q8_0)?)))
                }
                w => Ok(w),
            }
        }
        fn contains(&self, name: &str) -> bool {
            self.0.contains(name)
        }
    }

    fn tiny(name: &str) -> Model {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/models")
            .join(name);
        let cfg = ModelConfig::from_hf_file(&dir.join("config.json")).unwrap();
        let src = Quantizing(SafetensorsSource::open_dir(&dir, &Device::Cpu).unwrap());
        Model::load(cfg, &src, None, &Device::Cpu).unwrap()
    }

    /// Logits of every prompt token through candle's path: a zero adapter on one
    /// projection (which adds exactly nothing) takes the model off its kernels.
    fn candle_logits(m: &mut Model, tokens: &[u32]) -> Vec<Vec<f32>> {
        let (h, dev) = (m.cfg.hidden_size, m.device.clone());
        let lora = Lora {
            a: Tensor::zeros((2, h), DType::F32, &dev).unwrap(),
            b: Tensor::zeros((m.cfg.num_heads * m.cfg.head_dim, 2), DType::F32, &dev).unwrap(),
            scale: 1.0,
        };
        m.linears_mut()[0].1.set_lora(Some(lora));
        assert!(!m.on_kernels());
        let mut c = m.new_cache(tokens.len()).unwrap();
        let mut b = [SeqInput { tokens, cache: &mut c }];
        let rows = m.forward(&mut b, true).unwrap().remove(0).to_vec2::<f32>().unwrap();
        m.linears_mut()[0].1.set_lora(None);
        rows
    }

    /// Both paths read and write an f16 cache (the default for quantized
    /// weights): their logits stay within f16's rounding of the f32 cache's.
    #[test]
    fn f16_cache_stays_near_the_f32_cache_on_both_paths() {
        let tokens = [1u32, 17, 93, 5, 41, 8, 2, 60];
        for name in ["tiny-llama", "tiny-qwen2"] {
            let mut m = tiny(name);
            assert_eq!(m.kv_dtype(), KvDType::F16, "quantized weights get an f16 cache");
            let kernel = |m: &Model| {
                let mut c = m.new_cache(tokens.len()).unwrap();
                // The prompt in two chunks, then the rest one token at a time.
                let mut rows = Vec::new();
                for part in [&tokens[..3], &tokens[3..5], &tokens[5..6], &tokens[6..7], &tokens[7..]] {
                    let mut b = [SeqInput {
                        tokens: part,
                        cache: &mut c,
                    }];
                    rows.extend(m.forward(&mut b, true).unwrap().remove(0).to_vec2::<f32>().unwrap());
                }
                rows
            };
            let (c16, k16) = (candle_logits(&mut m, &tokens), kernel(&m));
            m.set_kv_dtype(KvDType::F32);
            let (c32, k32) = (candle_logits(&mut m, &tokens), kernel(&m));
            for step in 0..tokens.len() {
                for (what, a, b) in [("candle", &c16, &c32), ("kernel", &k16, &k32)] {
                    let d = max_diff(&a[step], &b[step]);
                    // f16 keeps 11 bits: each cached value moves by up to 2^-12 of itself.
                    let scale = b[step].iter().fold(0f32, |m, v| m.max(v.abs()));
                    assert!(
                        d < 2e-3 * scale,
                        "{name} {what} path, token {step}: f16 cache {d} off the f32 cache (logits up to {scale})"
                    );
                }
            }
        }
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max)
    }

    /// The plain-buffer path (`kernel_layers`) gives candle's logits: for whole
    /// prompts, and decoding token by token in a batch whose sequences have
    /// different lengths, some still in their prompt while others decode; and
    /// with a sliding window shorter than the sequences (mistral's, set to 4).
    #[test]
    fn kernel_path_matches_candle_path() {
        let models = [
            ("tiny-llama", None),
            ("tiny-llama3-rope", None),
            ("tiny-mistral", None),
            ("tiny-mistral", Some(4)),
            ("tiny-qwen2", None),
        ];
        for (name, window) in models {
            let mut m = tiny(name);
            if window.is_some() {
                m.cfg.sliding_window = window;
            }
            // An f16 cache would round keys that differ in their last bit (the
            // two paths' ropes) to values an f16 step apart.
            m.set_kv_dtype(KvDType::F32);
            let seqs: Vec<Vec<u32>> = vec![vec![1, 17, 93, 5, 41, 8], vec![2, 60, 7], vec![3, 11, 12, 13, 14]];
            let want: Vec<Vec<Vec<f32>>> = seqs.iter().map(|s| candle_logits(&mut m, s)).collect();
            assert!(m.on_kernels(), "{name}: the kernel path is not taken");
            for (i, s) in seqs.iter().enumerate() {
                let mut c = m.new_cache(s.len()).unwrap();
                let mut b = [SeqInput {
                    tokens: s,
                    cache: &mut c,
                }];
                let got = m.forward(&mut b, true).unwrap().remove(0).to_vec2::<f32>().unwrap();
                for (step, (g, w)) in got.iter().zip(&want[i]).enumerate() {
                    let d = max_diff(g, w);
                    assert!(d < 1e-4, "{name}: prompt {i} token {step}: logits differ by {d}");
                }
            }
            // Sequence 1 feeds its first two tokens as a prompt chunk, the others
            // one token per step: steps mix a chunk with single tokens.
            let mut caches: Vec<KvCache> = seqs.iter().map(|_| m.new_cache(2).unwrap()).collect();
            let mut fed = vec![0usize; seqs.len()];
            while (0..seqs.len()).any(|i| fed[i] < seqs[i].len()) {
                let mut batch: Vec<SeqInput> = Vec::new();
                let mut live = Vec::new();
                for (i, c) in caches.iter_mut().enumerate() {
                    if fed[i] < seqs[i].len() {
                        let n = if i == 1 && fed[i] == 0 { 2 } else { 1 };
                        batch.push(SeqInput {
                            tokens: &seqs[i][fed[i]..fed[i] + n],
                            cache: c,
                        });
                        live.push((i, n));
                    }
                }
                let got = m.forward(&mut batch, false).unwrap();
                for (&(i, n), g) in live.iter().zip(got) {
                    fed[i] += n;
                    let d = max_diff(&g.to_vec1::<f32>().unwrap(), &want[i][fed[i] - 1]);
                    assert!(
                        d < 1e-4,
                        "{name}: sequence {i} after {} tokens: logits differ by {d}",
                        fed[i]
                    );
                }
            }
        }
    }
}
