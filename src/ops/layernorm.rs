//! LayerNorm over the last dimension, statistics in f32.
//!
//! Forward: `mean_r = Σ_j x[r,j]/n`, `rstd_r = 1/√(Σ_j (x[r,j]-mean_r)²/n + eps)`,
//! `y[r,j] = (x[r,j]-mean_r)·rstd_r·gamma[j] + beta[j]`.
//!
//! Backward, with `xhat = (x-mean)·rstd` and `g = dy·gamma`:
//! `dx = rstd·(g - mean_j(g) - xhat·mean_j(g·xhat))` (overwritten),
//! `dgamma += Σ_r dy·xhat`, `dbeta += Σ_r dy` (accumulated).

use super::*;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerNormSpec {
    pub rows: usize,
    pub n: usize,
    pub eps: f32,
    pub checked: Checked,
}

fn spec<B: Backend>(
    be: &B,
    op: &'static str,
    x: &Tensor<B>,
    params: [(&str, &Tensor<B>); 2],
    mean: &Tensor<B>,
    rstd: &Tensor<B>,
    eps: f32,
) -> Result<LayerNormSpec> {
    check_float(be, op, "x", x)?;
    check_nonempty(op, "x", x)?;
    let (rows, n) = rows_of(x);
    for (name, p) in params {
        check_len(op, name, p, n, "the last dimension of `x`")?;
    }
    check_dtype(op, "mean", mean, DType::F32)?;
    check_dtype(op, "rstd", rstd, DType::F32)?;
    check_len(op, "mean", mean, rows, "one per row of `x`")?;
    check_len(op, "rstd", rstd, rows, "one per row of `x`")?;
    check_u32(op, "numel", x.numel())?;
    if !(eps > 0.0 && eps.is_finite()) {
        return Err(Error::Invalid(format!("{op}: eps = {eps} must be positive and finite")));
    }
    Ok(LayerNormSpec { rows, n, eps, checked: CHECKED })
}

/// `y = LayerNorm(x)·gamma + beta`; writes the f32 row statistics `mean`, `rstd`.
#[allow(clippy::too_many_arguments)]
pub fn layernorm<B: Backend>(
    be: &B,
    x: &Tensor<B>,
    gamma: &Tensor<B>,
    beta: &Tensor<B>,
    y: &mut Tensor<B>,
    mean: &mut Tensor<B>,
    rstd: &mut Tensor<B>,
    eps: f32,
) -> Result<()> {
    const OP: &str = "layernorm";
    check_same_dtype(OP, &[("x", x), ("gamma", gamma), ("beta", beta), ("y", &*y)])?;
    check_same_shape(OP, &[("x", x), ("y", &*y)])?;
    let s = spec(be, OP, x, [("gamma", gamma), ("beta", beta)], mean, rstd, eps)?;
    be.layernorm(&s, x, gamma, beta, y, mean, rstd)
}

/// Gradients of [`layernorm`]: `dx` is overwritten, `dgamma` and `dbeta` accumulate.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward<B: Backend>(
    be: &B,
    dy: &Tensor<B>,
    x: &Tensor<B>,
    gamma: &Tensor<B>,
    mean: &Tensor<B>,
    rstd: &Tensor<B>,
    dx: &mut Tensor<B>,
    dgamma: &mut Tensor<B>,
    dbeta: &mut Tensor<B>,
) -> Result<()> {
    const OP: &str = "layernorm_backward";
    check_same_dtype(
        OP,
        &[("x", x), ("dy", dy), ("gamma", gamma), ("dx", &*dx), ("dgamma", &*dgamma), ("dbeta", &*dbeta)],
    )?;
    check_same_shape(OP, &[("x", x), ("dy", dy), ("dx", &*dx)])?;
    check_same_shape(OP, &[("gamma", gamma), ("dgamma", &*dgamma), ("dbeta", &*dbeta)])?;
    let s = spec(be, OP, x, [("gamma", gamma), ("dgamma", &*dgamma)], mean, rstd, 1e-5)?;
    be.layernorm_backward(&s, dy, x, gamma, mean, rstd, dx, dgamma, dbeta)
}
