//! AdamW on f32 master weights, with an optional low-precision copy written
//! in the same pass.
//!
//! With `g = grad·grad_scale` (un-scaling and clipping folded into one factor):
//! `m = β1·m + (1-β1)·g`, `v = β2·v + (1-β2)·g²`,
//! `p -= lr·( (m·bc1) / (√(v·bc2) + eps) + wd·p )`, `copy = p` in its dtype,
//! where `bc1 = 1/(1-β1^t)`, `bc2 = 1/(1-β2^t)` for the 1-based step `t`
//! (computed on the host in f64 so every backend uses the same f32 factors).

use super::*;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWSpec {
    pub n: usize,
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// `1/(1-β1^t)`.
    pub bc1: f32,
    /// `1/(1-β2^t)`.
    pub bc2: f32,
    pub grad_scale: f32,
    pub checked: Checked,
}

/// Hyper-parameters of one AdamW step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { lr: 1e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// One AdamW step at 1-based `step`. `params`, `grads`, `m`, `v` are F32 of one
/// shape; `copy`, if given, receives the updated weights in its own float dtype.
#[allow(clippy::too_many_arguments)]
pub fn adamw<B: Backend>(
    be: &B,
    cfg: &AdamWConfig,
    step: u64,
    grad_scale: f32,
    params: &mut Tensor<B>,
    grads: &Tensor<B>,
    m: &mut Tensor<B>,
    v: &mut Tensor<B>,
    copy: Option<&mut Tensor<B>>,
) -> Result<()> {
    const OP: &str = "adamw";
    for (name, t) in [("params", &*params), ("grads", grads), ("m", &*m), ("v", &*v)] {
        check_dtype(OP, name, t, DType::F32)?;
    }
    check_same_shape(OP, &[("params", &*params), ("grads", grads), ("m", &*m), ("v", &*v)])?;
    check_nonempty(OP, "params", params)?;
    if let Some(c) = copy.as_deref() {
        check_float(be, OP, "copy", c)?;
        check_same_shape(OP, &[("params", &*params), ("copy", c)])?;
    }
    if step == 0 {
        return Err(Error::Invalid(format!("{OP}: step is 1-based, got 0")));
    }
    let good = cfg.lr.is_finite()
        && (0.0..1.0).contains(&cfg.beta1)
        && (0.0..1.0).contains(&cfg.beta2)
        && cfg.eps > 0.0
        && cfg.weight_decay.is_finite()
        && grad_scale.is_finite();
    if !good {
        return Err(Error::Invalid(format!("{OP}: bad hyper-parameters {cfg:?}, grad_scale = {grad_scale}")));
    }
    let n = check_u32(OP, "numel", params.numel())? as usize;
    let t = step.min(i32::MAX as u64) as i32;
    let spec = AdamWSpec {
        n,
        lr: cfg.lr,
        beta1: cfg.beta1,
        beta2: cfg.beta2,
        eps: cfg.eps,
        weight_decay: cfg.weight_decay,
        bc1: (1.0 / (1.0 - (cfg.beta1 as f64).powi(t))) as f32,
        bc2: (1.0 / (1.0 - (cfg.beta2 as f64).powi(t))) as f32,
        grad_scale,
        checked: CHECKED,
    };
    be.adamw(&spec, params, grads, m, v, copy)
}
