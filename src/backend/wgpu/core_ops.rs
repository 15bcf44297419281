//! The core op set on wgpu: one function per `Backend` method, each a thin
//! launcher of the WGSL kernels in `shaders/<family>.wgsl`.

use super::kernel::{Params, grid1d};
use super::{Arg, WgpuBackend};
use crate::Tensor;
use crate::error::{Error, Result};
use crate::ops::*;

type T = Tensor<WgpuBackend>;

fn todo(op: &str) -> Result<()> {
    Err(Error::Unavailable(format!("wgpu: {op} is not implemented yet")))
}

pub(super) fn fill(be: &WgpuBackend, s: &FillSpec, x: &mut T) -> Result<()> {
    be.launch("elementwise", "fill", &mut [Arg::W(x)], Params::new().u(s.n).f(s.value), grid1d(s.n))
}

pub(super) fn add(be: &WgpuBackend, s: &ElementwiseSpec, a: &T, b: &T, out: &mut T) -> Result<()> {
    be.launch("elementwise", "add", &mut [Arg::R(a), Arg::R(b), Arg::W(out)], Params::new().u(s.n), grid1d(s.n))
}

pub(super) fn axpby(be: &WgpuBackend, s: &AxpbySpec, x: &T, y: &mut T) -> Result<()> {
    let name = if s.beta == 0.0 { "axpy0" } else { "axpby" };
    let p = Params::new().u(s.n).f(s.alpha).f(s.beta);
    be.launch("elementwise", name, &mut [Arg::R(x), Arg::W(y)], p, grid1d(s.n))
}

pub(super) fn scale(be: &WgpuBackend, s: &ScaleSpec, x: &mut T) -> Result<()> {
    be.launch("elementwise", "scale", &mut [Arg::W(x)], Params::new().u(s.n).f(s.s), grid1d(s.n))
}

pub(super) fn bias_add(be: &WgpuBackend, s: &BiasSpec, x: &mut T, bias: &T) -> Result<()> {
    let n = s.rows * s.n;
    be.launch("elementwise", "bias_add", &mut [Arg::W(x), Arg::R(bias)], Params::new().u(n).u(s.n), grid1d(n))
}

pub(super) fn sum_rows(be: &WgpuBackend, s: &SumRowsSpec, x: &T, out: &mut T) -> Result<()> {
    let p = Params::new().u(s.n).u(s.rows).f(s.beta);
    be.launch("elementwise", "sum_rows", &mut [Arg::R(x), Arg::W(out)], p, grid1d(s.n))
}

pub(super) fn cast(be: &WgpuBackend, s: &ElementwiseSpec, x: &T, y: &mut T) -> Result<()> {
    be.launch("elementwise", "cast", &mut [Arg::R(x), Arg::W(y)], Params::new().u(s.n), grid1d(s.n))
}

pub(super) fn matmul(be: &WgpuBackend, s: &MatmulSpec, a: &T, b: &T, c: &mut T) -> Result<()> {
    const TILE: usize = 64;
    const MAX_Z: usize = 65_535;
    let (sa, sb, sc) = s.strides();
    let name = if s.beta == 0.0 { "matmul" } else { "matmul_acc" };
    let gx = s.n.div_ceil(TILE) as u32;
    let gy = s.m.div_ceil(TILE) as u32;
    let mut z0 = 0;
    while z0 < s.batch {
        let nz = (s.batch - z0).min(MAX_Z);
        let p = Params::new()
            .u(s.m)
            .u(s.n)
            .u(s.k)
            .b(s.trans_a)
            .b(s.trans_b)
            .u(sa)
            .u(sb)
            .u(sc)
            .f(s.alpha)
            .f(s.beta)
            .u(z0);
        be.launch("matmul", name, &mut [Arg::R(a), Arg::R(b), Arg::W(c)], p, [gx, gy, nz as u32])?;
        z0 += nz;
    }
    Ok(())
}

pub(super) fn gelu(_be: &WgpuBackend, _s: &ElementwiseSpec, _x: &T, _y: &mut T) -> Result<()> {
    todo("gelu")
}

pub(super) fn gelu_backward(_be: &WgpuBackend, _s: &ElementwiseSpec, _x: &T, _dy: &T, _dx: &mut T) -> Result<()> {
    todo("gelu_backward")
}

pub(super) fn bias_gelu(_be: &WgpuBackend, _s: &BiasSpec, _x: &T, _bias: &T, _y: &mut T) -> Result<()> {
    todo("bias_gelu")
}

#[allow(clippy::too_many_arguments)]
pub(super) fn layernorm(
    _be: &WgpuBackend,
    _s: &LayerNormSpec,
    _x: &T,
    _gamma: &T,
    _beta: &T,
    _y: &mut T,
    _mean: &mut T,
    _rstd: &mut T,
) -> Result<()> {
    todo("layernorm")
}

#[allow(clippy::too_many_arguments)]
pub(super) fn layernorm_backward(
    _be: &WgpuBackend,
    _s: &LayerNormSpec,
    _dy: &T,
    _x: &T,
    _gamma: &T,
    _mean: &T,
    _rstd: &T,
    _dx: &mut T,
    _dgamma: &mut T,
    _dbeta: &mut T,
) -> Result<()> {
    todo("layernorm_backward")
}

pub(super) fn softmax(_be: &WgpuBackend, _s: &SoftmaxSpec, _x: &T, _y: &mut T) -> Result<()> {
    todo("softmax")
}

pub(super) fn softmax_backward(_be: &WgpuBackend, _s: &SoftmaxSpec, _y: &T, _dy: &T, _dx: &mut T) -> Result<()> {
    todo("softmax_backward")
}

pub(super) fn rope(_be: &WgpuBackend, _s: &RopeSpec, _x: &T, _cos: &T, _sin: &T, _y: &mut T) -> Result<()> {
    todo("rope")
}

pub(super) fn embedding(_be: &WgpuBackend, _s: &EmbeddingSpec, _ids: &T, _table: &T, _out: &mut T) -> Result<()> {
    todo("embedding")
}

pub(super) fn embedding_backward(
    _be: &WgpuBackend,
    _s: &EmbeddingSpec,
    _ids: &T,
    _dout: &T,
    _dtable: &mut T,
) -> Result<()> {
    todo("embedding_backward")
}

pub(super) fn cross_entropy(
    _be: &WgpuBackend,
    _s: &CrossEntropySpec,
    _logits: &T,
    _targets: &T,
    _losses: &mut T,
) -> Result<()> {
    todo("cross_entropy")
}

pub(super) fn cross_entropy_backward(
    _be: &WgpuBackend,
    _s: &CrossEntropySpec,
    _logits: &T,
    _targets: &T,
    _dlogits: &mut T,
) -> Result<()> {
    todo("cross_entropy_backward")
}

pub(super) fn sum_squares(_be: &WgpuBackend, _s: &ReduceSpec, _x: &T, _out: &mut T) -> Result<()> {
    todo("sum_squares")
}

pub(super) fn all_finite(_be: &WgpuBackend, _s: &ReduceSpec, _x: &T, _out: &mut T) -> Result<()> {
    todo("all_finite")
}

pub(super) fn adamw(
    _be: &WgpuBackend,
    _s: &AdamWSpec,
    _params: &mut T,
    _grads: &T,
    _m: &mut T,
    _v: &mut T,
    _copy: Option<&mut T>,
) -> Result<()> {
    todo("adamw")
}
