//! AdamW with decoupled weight decay, the cosine schedule with linear warmup, and
//! gradient clipping by global norm — as PyTorch's `AdamW`, HF's
//! `get_cosine_schedule_with_warmup` and `clip_grad_norm_` compute them.
//!
//! Written here rather than taken from candle-nn because a resumable run must
//! save and restore the moment estimates, which candle-nn's `AdamW` keeps private.

use candle_core::{Tensor, Var};

use crate::error::Result;

/// AdamW hyperparameters.
#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// AdamW state: one first and second moment per parameter.
pub struct AdamW {
    pub cfg: AdamWConfig,
    /// Updates taken so far (for bias correction).
    pub t: usize,
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
}

impl AdamW {
    /// Zero moments for `params`.
    pub fn new(cfg: AdamWConfig, params: &[Var]) -> Result<Self> {
        let zeros = |p: &Var| p.as_tensor().zeros_like();
        Ok(AdamW {
            cfg,
            t: 0,
            m: params.iter().map(zeros).collect::<candle_core::Result<_>>()?,
            v: params.iter().map(zeros).collect::<candle_core::Result<_>>()?,
        })
    }

    /// One update with learning rate `lr`. Weight decay applies to matrices only
    /// (not norms or biases), as HF's Trainer groups parameters.
    pub fn step(&mut self, params: &[Var], grads: &[Tensor], lr: f64) -> Result<()> {
        self.t += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        for (i, (p, g)) in params.iter().zip(grads).enumerate() {
            let m = ((&self.m[i] * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            let v = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let update = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + c.eps)?)?;
            let decay = if p.as_tensor().rank() >= 2 { c.weight_decay } else { 0.0 };
            let w = p.as_tensor().detach();
            let w = if decay > 0.0 { (w * (1.0 - lr * decay))? } else { w };
            p.set(&(w - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }
}

/// Learning rate of update `step` (0-based) out of `total`: linear warmup from 0
/// over `warmup` updates, then a half cosine down to 0.
pub fn cosine_lr(base: f64, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return base * step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    base * 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())
}

/// Scales `grads` so their global L2 norm is at most `max_norm`; returns the norm
/// before clipping.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads.iter() {
        sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    let norm = sq.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for g in grads.iter_mut() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}
