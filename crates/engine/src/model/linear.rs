//! Linear layers over dense or quantized weights, with optional LoRA adapters.

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Tensor};

use super::reference::{cpu_tensor, into_cpu_storage};
use crate::error::{EngineError, Result};
use crate::kernels::QMatrix;
use crate::weights::Weight;

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
    pub(super) weight: LinearWeight,
    pub(super) bias: Option<Tensor>,
    /// A low-rank adapter applied on top of the weight, never merged into it.
    pub(super) lora: Option<Lora>,
}

/// A LoRA adapter on one linear layer: `y += scale · (x Aᵀ) Bᵀ`, with `A` `[r, in]`
/// and `B` `[out, r]` as PEFT stores them.
#[derive(Clone)]
pub struct Lora {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
}

pub(super) enum LinearWeight {
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
            (Weight::Mapped(m), None) => match QMatrix::from_mapped(&m) {
                Some(k) => LinearWeight::Kernel(k),
                None => {
                    let q = m.to_qtensor()?;
                    m.release_pages();
                    LinearWeight::Quantized(QMatMul::from_arc(q)?)
                }
            },
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

    /// Layers over mapped GGUF blocks that are multiplied together (see
    /// `QMatrix::from_mapped_parts`), one per weight with its bias; `None`
    /// where they are not all mapped blocks repacked alike.
    pub fn mapped_parts(weights: &[Weight], biases: Vec<Option<Tensor>>) -> Option<Vec<Self>> {
        let blocks: Vec<_> = weights
            .iter()
            .map(|w| match w {
                Weight::Mapped(m) => Some(m),
                _ => None,
            })
            .collect::<Option<_>>()?;
        let views = QMatrix::from_mapped_parts(&blocks)?;
        Some(
            views
                .into_iter()
                .zip(biases)
                .map(|(m, bias)| Linear {
                    weight: LinearWeight::Kernel(m),
                    bias,
                    lora: None,
                })
                .collect(),
        )
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
    pub(super) fn kernel(&self) -> Option<&QMatrix> {
        match (&self.weight, &self.lora) {
            (LinearWeight::Kernel(m), None) => Some(m),
            _ => None,
        }
    }

    /// Rows of the weight (the width of the output).
    pub fn out_features(&self) -> usize {
        match &self.weight {
            LinearWeight::Dense(w) => w.dim(0).unwrap_or(0),
            LinearWeight::Kernel(m) => m.rows(),
            LinearWeight::Quantized(QMatMul::QTensor(q)) => q.shape().dims().first().copied().unwrap_or(0),
            LinearWeight::Quantized(QMatMul::Tensor(w) | QMatMul::TensorF16(w)) => w.dim(0).unwrap_or(0),
        }
    }

    /// `out[n, out] = x[n, in] · Wᵀ + b (+ adapter)` on plain buffers: our kernel
    /// where the layer is exactly one, else through candle.
    pub(super) fn matmul_into(&self, x: &[f32], n: usize, out: &mut [f32]) -> Result<()> {
        match (self.kernel(), &self.bias) {
            (Some(m), None) => m.matmul(x, n, out),
            (Some(m), Some(b)) => {
                m.matmul(x, n, out);
                let b = b.to_vec1::<f32>()?;
                for row in out.chunks_exact_mut(b.len()) {
                    row.iter_mut().zip(&b).for_each(|(o, b)| *o += b);
                }
            }
            (None, _) => {
                let cols = x.len() / n.max(1);
                let xt = Tensor::from_slice(x, (n, cols), &Device::Cpu)?;
                let y = self.forward(&xt)?.flatten_all()?.to_vec1::<f32>()?;
                out.copy_from_slice(&y);
            }
        }
        Ok(())
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
    pub(super) fn forward_train(&self, x: &Tensor, drop: Option<&Tensor>) -> Result<Tensor> {
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

/// `out[n, Σ rows] = x · [parts]ᵀ (+ their biases and adapters)`: one pass over
/// `fused` (the parts' rows stored together) where there is one and no part has
/// an adapter, else a pass per part.
pub(super) fn project(parts: &[&Linear], fused: Option<&QMatrix>, x: &[f32], n: usize, out: &mut [f32]) -> Result<()> {
    let widths: Vec<usize> = parts.iter().map(|l| l.out_features()).collect();
    let total: usize = widths.iter().sum();
    match fused.filter(|_| parts.iter().all(|l| l.kernel().is_some())) {
        Some(m) => {
            m.matmul(x, n, out);
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
        }
        None if parts.len() == 1 => parts[0].matmul_into(x, n, out)?,
        None => {
            let mut off = 0;
            for (l, &w) in parts.iter().zip(&widths) {
                let mut part = vec![0f32; n * w];
                l.matmul_into(x, n, &mut part)?;
                for (dst, src) in out.chunks_exact_mut(total).zip(part.chunks_exact(w)) {
                    dst[off..off + w].copy_from_slice(src);
                }
                off += w;
            }
        }
    }
    Ok(())
}

/// Replaces the weights of `parts` (our kernel's matrices, no adapters) with views
/// of one matrix holding all their rows, and returns that matrix.
pub(super) fn fuse(parts: &mut [&mut Linear]) -> Option<QMatrix> {
    let ms: Vec<QMatrix> = parts.iter().map(|l| l.kernel().cloned()).collect::<Option<_>>()?;
    let (whole, views) = QMatrix::concat(&ms.iter().collect::<Vec<_>>())?;
    for (l, v) in parts.iter_mut().zip(views) {
        l.weight = LinearWeight::Kernel(v);
    }
    Some(whole)
}
