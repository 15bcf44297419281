//! The core op set on wgpu: one function per `Backend` method, each a thin
//! launcher of the WGSL kernels in `shaders/<family>.wgsl`.

use super::kernel::{Params, grid1d};
use super::{Arg, KernelVariant, WgpuBackend};
use crate::error::Result;
use crate::ops::*;
use crate::{DType, Tensor};

type T = Tensor<WgpuBackend>;

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

/// Rows one `sum_rows_part` invocation sums: about √rows, so both passes
/// loop about √rows times (10⁶ rows: 1000 each, not 10⁶ in one), at least
/// [`SUM_ROWS_MIN_CHUNK`]; raised where the adapter's grid height or largest
/// binding cannot hold that many partials.
pub(super) fn sum_rows_chunk(rows: usize, n: usize, max_groups: u32, max_binding: u64) -> usize {
    let mut chunk = (rows as f64).sqrt().ceil() as usize;
    chunk = chunk.max(SUM_ROWS_MIN_CHUNK).max(rows.div_ceil(max_groups.max(1) as usize));
    let max_chunks = (max_binding / 4 / n.max(1) as u64).max(1) as usize;
    chunk.max(rows.div_ceil(max_chunks)).max(1)
}

const SUM_ROWS_MIN_CHUNK: usize = 64;

pub(super) fn sum_rows(be: &WgpuBackend, s: &SumRowsSpec, x: &T, out: &mut T) -> Result<()> {
    let l = be.limits();
    let max_binding = l.max_storage_buffer_binding_size.min(l.max_buffer_size);
    let chunk = sum_rows_chunk(s.rows, s.n, l.max_compute_workgroups_per_dimension, max_binding);
    let chunks = s.rows.div_ceil(chunk).max(1);
    let mut part = T::empty(be, &[chunks * s.n], DType::F32)?;
    let p = Params::new().u(s.n).u(s.rows).u(chunk);
    let grid = [s.n.div_ceil(256) as u32, chunks as u32, 1];
    be.launch("reduce", "sum_rows_part", &mut [Arg::R(x), Arg::W(&mut part)], p, grid)?;
    let p = Params::new().u(s.n).u(chunks).f(s.beta);
    be.launch("reduce", "sum_rows_final", &mut [Arg::R(&part), Arg::W(out)], p, grid1d(s.n))
}

pub(super) fn cast(be: &WgpuBackend, s: &ElementwiseSpec, x: &T, y: &mut T) -> Result<()> {
    be.launch("elementwise", "cast", &mut [Arg::R(x), Arg::W(y)], Params::new().u(s.n), grid1d(s.n))
}

crate::wgsl_params! {
    /// `shaders/matmul.wgsl`: C = alpha·op(A)·op(B) + beta·C over a batch
    /// chunk starting at matrix z0; batch strides in elements (sb = 0 broadcasts B).
    pub struct MatmulParams {
        m: u32,
        n: u32,
        k: u32,
        trans_a: u32,
        trans_b: u32,
        sa: u32,
        sb: u32,
        sc: u32,
        alpha: f32,
        beta: f32,
        z0: u32,
    }
}

/// `s.row_invariant` needs nothing more here: the kernel has one path for
/// every shape, and element `C[i, j]` is `α·(Σ_p A[i, p]·B[p, j]) (+ β·C[i, j])`
/// with the sum always taken in `p` order (K slices of 16, one accumulator per
/// element, zero padding only past `k`); `m` only decides which tiles exist
/// and rows past `m` are padded, so no row's arithmetic depends on the others
/// (checked bit for bit by the conformance test `matmul_rows`).
pub(super) fn matmul(be: &WgpuBackend, s: &MatmulSpec, a: &T, b: &T, c: &mut T) -> Result<()> {
    const TILE: usize = 64;
    const MAX_Z: usize = 65_535;
    let (sa, sb, sc) = s.strides();
    let name = match (s.beta == 0.0, be.kernel_variant()) {
        (true, KernelVariant::Software) => "matmul",
        (false, KernelVariant::Software) => "matmul_acc",
        (true, KernelVariant::Hardware) => "matmul_hw",
        (false, KernelVariant::Hardware) => "matmul_acc_hw",
    };
    let gx = s.n.div_ceil(TILE) as u32;
    let gy = s.m.div_ceil(TILE) as u32;
    let mut z0 = 0;
    while z0 < s.batch {
        let nz = (s.batch - z0).min(MAX_Z);
        let p = MatmulParams {
            m: s.m as u32,
            n: s.n as u32,
            k: s.k as u32,
            trans_a: s.trans_a as u32,
            trans_b: s.trans_b as u32,
            sa: sa as u32,
            sb: sb as u32,
            sc: sc as u32,
            alpha: s.alpha,
            beta: s.beta,
            z0: z0 as u32,
        };
        be.launch("matmul", name, &mut [Arg::R(a), Arg::R(b), Arg::W(c)], &p, [gx, gy, nz as u32])?;
        z0 += nz;
    }
    Ok(())
}

pub(super) fn gelu(be: &WgpuBackend, s: &ElementwiseSpec, x: &T, y: &mut T) -> Result<()> {
    be.launch("gelu", "gelu", &mut [Arg::R(x), Arg::W(y)], Params::new().u(s.n), grid1d(s.n))
}

pub(super) fn gelu_backward(be: &WgpuBackend, s: &ElementwiseSpec, x: &T, dy: &T, dx: &mut T) -> Result<()> {
    be.launch("gelu", "gelu_backward", &mut [Arg::R(x), Arg::R(dy), Arg::W(dx)], Params::new().u(s.n), grid1d(s.n))
}

pub(super) fn bias_gelu(be: &WgpuBackend, s: &BiasSpec, x: &T, bias: &T, y: &mut T) -> Result<()> {
    let n = s.rows * s.n;
    be.launch("gelu", "bias_gelu", &mut [Arg::R(x), Arg::R(bias), Arg::W(y)], Params::new().u(n).u(s.n), grid1d(n))
}

/// A launch of `groups` 256-wide workgroups, one per row (folded like [`grid1d`]).
fn per_row(groups: usize) -> [u32; 3] {
    grid1d(groups * 256)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn layernorm(
    be: &WgpuBackend,
    s: &LayerNormSpec,
    x: &T,
    gamma: &T,
    beta: &T,
    y: &mut T,
    mean: &mut T,
    rstd: &mut T,
) -> Result<()> {
    let p = Params::new().u(s.rows).u(s.n).f(s.eps);
    let args = &mut [Arg::R(x), Arg::R(gamma), Arg::R(beta), Arg::W(y), Arg::W(mean), Arg::W(rstd)];
    be.launch("layernorm", "layernorm", args, p, per_row(s.rows))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn layernorm_backward(
    be: &WgpuBackend,
    s: &LayerNormSpec,
    dy: &T,
    x: &T,
    gamma: &T,
    mean: &T,
    rstd: &T,
    dx: &mut T,
    dgamma: &mut T,
    dbeta: &mut T,
) -> Result<()> {
    let p = Params::new().u(s.rows).u(s.n);
    let args = &mut [Arg::R(dy), Arg::R(x), Arg::R(gamma), Arg::R(mean), Arg::R(rstd), Arg::W(dx)];
    be.launch("layernorm", "layernorm_dx", args, p, per_row(s.rows))?;
    // Column sums of dy·xhat and dy: partial sums over chunks of rows, then
    // the partials of each column in chunk order (deterministic).
    let chunk = s.rows.div_ceil(65_535).max(64);
    let chunks = s.rows.div_ceil(chunk);
    let mut part = T::empty(be, &[2 * chunks * s.n], DType::F32)?;
    let p = Params::new().u(s.rows).u(s.n).u(chunk);
    let grid = [s.n.div_ceil(256) as u32, chunks as u32, 1];
    let args = &mut [Arg::R(dy), Arg::R(x), Arg::R(mean), Arg::R(rstd), Arg::W(&mut part)];
    be.launch("layernorm", "ln_colpart", args, p, grid)?;
    let p = Params::new().u(chunks).u(s.n);
    be.launch("layernorm", "ln_colsum", &mut [Arg::R(&part), Arg::W(dgamma), Arg::W(dbeta)], p, grid1d(s.n))
}

pub(super) fn softmax(be: &WgpuBackend, s: &SoftmaxSpec, x: &T, y: &mut T) -> Result<()> {
    let p = Params::new().u(s.rows).u(s.n).u(s.t).b(s.causal);
    be.launch("softmax", "softmax", &mut [Arg::R(x), Arg::W(y)], p, per_row(s.rows))
}

pub(super) fn softmax_backward(be: &WgpuBackend, s: &SoftmaxSpec, y: &T, dy: &T, dx: &mut T) -> Result<()> {
    let p = Params::new().u(s.rows).u(s.n).u(s.t).b(s.causal);
    be.launch("softmax", "softmax_backward", &mut [Arg::R(y), Arg::R(dy), Arg::W(dx)], p, per_row(s.rows))
}

pub(super) fn rope(be: &WgpuBackend, s: &RopeSpec, x: &T, cos: &T, sin: &T, y: &mut T) -> Result<()> {
    let half = s.head_dim / 2;
    let pairs = s.batch * s.seq * s.heads * half;
    let p = Params::new().u(pairs).u(half).u(s.heads).u(s.seq).u(s.pos_offset).b(s.inverse);
    be.launch("rope", "rope", &mut [Arg::R(x), Arg::R(cos), Arg::R(sin), Arg::W(y)], p, grid1d(pairs))
}

pub(super) fn embedding(be: &WgpuBackend, s: &EmbeddingSpec, ids: &T, table: &T, out: &mut T) -> Result<()> {
    let total = s.n * s.dim;
    let p = Params::new().u(total).u(s.dim).u(s.vocab);
    be.launch("embedding", "embedding", &mut [Arg::R(ids), Arg::R(table), Arg::W(out)], p, grid1d(total))
}

pub(super) fn embedding_backward(be: &WgpuBackend, s: &EmbeddingSpec, ids: &T, dout: &T, dtable: &mut T) -> Result<()> {
    // links[i]: the next token with the same id; links[n + i]: i is the first one.
    let mut links = T::empty(be, &[2 * s.n], DType::U32)?;
    be.launch("embedding", "emb_links", &mut [Arg::R(ids), Arg::W(&mut links)], Params::new().u(s.n), grid1d(s.n))?;
    let total = s.n * s.dim;
    let p = Params::new().u(total).u(s.dim).u(s.vocab).u(s.n);
    let args = &mut [Arg::R(ids), Arg::R(&links), Arg::R(dout), Arg::W(dtable)];
    be.launch("embedding", "embedding_backward", args, p, grid1d(total))
}

pub(super) fn cross_entropy(
    be: &WgpuBackend,
    s: &CrossEntropySpec,
    logits: &T,
    targets: &T,
    losses: &mut T,
) -> Result<()> {
    let p = Params::new().u(s.rows).u(s.vocab).u(s.ignore_index as usize).f(s.grad_scale);
    let args = &mut [Arg::R(logits), Arg::R(targets), Arg::W(losses)];
    be.launch("cross_entropy", "cross_entropy", args, p, per_row(s.rows))
}

pub(super) fn cross_entropy_backward(
    be: &WgpuBackend,
    s: &CrossEntropySpec,
    logits: &T,
    targets: &T,
    dlogits: &mut T,
) -> Result<()> {
    let p = Params::new().u(s.rows).u(s.vocab).u(s.ignore_index as usize).f(s.grad_scale);
    let args = &mut [Arg::R(logits), Arg::R(targets), Arg::W(dlogits)];
    be.launch("cross_entropy", "cross_entropy_backward", args, p, per_row(s.rows))
}

/// Workgroups of the first reduction pass (at most 256, so one workgroup finishes).
fn reduce_groups(n: usize) -> usize {
    n.div_ceil(256 * 4).clamp(1, 256)
}

pub(super) fn sum_squares(be: &WgpuBackend, s: &ReduceSpec, x: &T, out: &mut T) -> Result<()> {
    let g = reduce_groups(s.n);
    let mut part = T::empty(be, &[g], DType::F32)?;
    be.launch(
        "reduce",
        "sum_squares_part",
        &mut [Arg::R(x), Arg::W(&mut part)],
        Params::new().u(s.n),
        [g as u32, 1, 1],
    )?;
    be.launch("reduce", "sum_squares_final", &mut [Arg::R(&part), Arg::W(out)], Params::new().u(g), [1, 1, 1])
}

pub(super) fn all_finite(be: &WgpuBackend, s: &ReduceSpec, x: &T, out: &mut T) -> Result<()> {
    let g = reduce_groups(s.n);
    let mut part = T::empty(be, &[g], DType::U32)?;
    be.launch(
        "reduce",
        "all_finite_part",
        &mut [Arg::R(x), Arg::W(&mut part)],
        Params::new().u(s.n),
        [g as u32, 1, 1],
    )?;
    be.launch("reduce", "all_finite_final", &mut [Arg::R(&part), Arg::W(out)], Params::new().u(g), [1, 1, 1])
}

pub(super) fn adamw(
    be: &WgpuBackend,
    s: &AdamWSpec,
    params: &mut T,
    grads: &T,
    m: &mut T,
    v: &mut T,
    copy: Option<&mut T>,
) -> Result<()> {
    let p =
        Params::new().u(s.n).f(s.lr).f(s.beta1).f(s.beta2).f(s.eps).f(s.weight_decay).f(s.bc1).f(s.bc2).f(s.grad_scale);
    match copy {
        Some(c) => {
            let args = &mut [Arg::W(params), Arg::R(grads), Arg::W(m), Arg::W(v), Arg::W(c)];
            be.launch("adamw", "adamw_copy", args, p, grid1d(s.n))
        }
        None => be.launch("adamw", "adamw", &mut [Arg::W(params), Arg::R(grads), Arg::W(m), Arg::W(v)], p, grid1d(s.n)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sum_rows_splits_long_row_loops() {
        let big = 1 << 30;
        // A million rows: about a thousand per invocation in each pass, not a million.
        let c = sum_rows_chunk(1_000_000, 768, 65_535, big);
        assert_eq!(c, 1000);
        assert_eq!(1_000_000usize.div_ceil(c), 1000);
        // Few rows: one chunk of at least the minimum.
        assert_eq!(sum_rows_chunk(10, 5, 65_535, big), SUM_ROWS_MIN_CHUNK);
        // The grid height and the partials' binding bound the number of chunks.
        let c = sum_rows_chunk(100_000_000, 1, 1000, big);
        assert!(100_000_000usize.div_ceil(c) <= 1000, "{c}");
        let c = sum_rows_chunk(1_000_000, 1 << 20, 65_535, 128 << 20);
        assert!((1_000_000usize.div_ceil(c) * (1 << 20) * 4) as u64 <= 128 << 20, "{c}");
    }
}
