//! The core op set on wgpu: one function per `Backend` method, each a thin
//! launcher of the WGSL kernels in `shaders/<family>.wgsl`.

use super::kernel::grid1d;
use super::{Arg, KernelVariant, WgpuBackend};
use crate::error::Result;
use crate::ops::*;
use crate::{DType, Tensor};

type T = Tensor<WgpuBackend>;

/// `usize` sizes as the `u32` words of a parameter struct (the ops check
/// their shapes against the binding limits, which are far below 2³²).
fn w(v: usize) -> u32 {
    v as u32
}

crate::wgsl_params! {
    /// Kernels that take only an element count (or a count of partials):
    /// `shaders/common.wgsl`.
    pub struct CountParams { n: u32 }
}

crate::wgsl_params! {
    /// `bias_add` / `bias_gelu` (`shaders/common.wgsl`): n = rows·cols
    /// elements, a bias of `cols`.
    pub struct BiasParams { n: u32, cols: u32 }
}

crate::wgsl_params! {
    /// `pack_half` / `unpack_half` of `shaders/elementwise.wgsl`: n elements,
    /// bf16 = 1 for bf16, 0 for f16.
    pub struct HalfParams { n: u32, bf16: u32 }
}

crate::wgsl_params! {
    /// `fill` (x = value) and `scale` (x *= value) of `shaders/elementwise.wgsl`.
    pub struct ScalarParams { n: u32, value: f32 }
}

crate::wgsl_params! {
    /// `axpby` / `axpy0` of `shaders/elementwise.wgsl`: y = alpha·x + beta·y.
    pub struct AxpbyParams { n: u32, alpha: f32, beta: f32 }
}

crate::wgsl_params! {
    /// `sum_rows_part` of `shaders/reduce.wgsl`: `chunk` rows per partial.
    pub struct SumRowsPartParams { n: u32, rows: u32, chunk: u32 }
}

crate::wgsl_params! {
    /// `sum_rows_final` of `shaders/reduce.wgsl`: out = Σ partials + beta·out.
    pub struct SumRowsFinalParams { n: u32, chunks: u32, beta: f32 }
}

crate::wgsl_params! {
    /// `layernorm` and `layernorm_dx` (which ignores eps) of `shaders/layernorm.wgsl`.
    pub struct LayerNormParams { rows: u32, n: u32, eps: f32 }
}

crate::wgsl_params! {
    /// `ln_colpart` of `shaders/layernorm.wgsl`: `chunk` rows per partial.
    pub struct LnColPartParams { rows: u32, n: u32, chunk: u32 }
}

crate::wgsl_params! {
    /// `ln_colsum` of `shaders/layernorm.wgsl`.
    pub struct LnColSumParams { chunks: u32, n: u32 }
}

crate::wgsl_params! {
    /// `softmax` / `softmax_backward` of `shaders/softmax.wgsl`; causal is 0 or 1.
    pub struct SoftmaxParams { rows: u32, n: u32, t: u32, causal: u32 }
}

crate::wgsl_params! {
    /// `rope` of `shaders/rope.wgsl`: pairs = numel / 2, half = head_dim / 2;
    /// inverse = 1 negates sin.
    pub struct RopeParams { pairs: u32, half: u32, heads: u32, seq: u32, pos_offset: u32, inverse: u32 }
}

crate::wgsl_params! {
    /// `embedding` / `embedding_backward` of `shaders/embedding.wgsl`:
    /// total = n·dim elements, n tokens.
    pub struct EmbeddingParams { total: u32, dim: u32, vocab: u32, n: u32 }
}

crate::wgsl_params! {
    /// `cross_entropy` / `cross_entropy_backward` of `shaders/cross_entropy.wgsl`.
    pub struct CrossEntropyParams { rows: u32, vocab: u32, ignore_index: u32, grad_scale: f32 }
}

crate::wgsl_params! {
    /// `shaders/adamw.wgsl`; bc1/bc2 are the bias corrections.
    pub struct AdamWParams {
        n: u32,
        lr: f32,
        beta1: f32,
        beta2: f32,
        eps: f32,
        weight_decay: f32,
        bc1: f32,
        bc2: f32,
        grad_scale: f32,
    }
}

fn count(n: usize) -> CountParams {
    CountParams { n: w(n) }
}

pub(super) fn fill(be: &WgpuBackend, s: &FillSpec, x: &mut T) -> Result<()> {
    let p = ScalarParams { n: w(s.n), value: s.value };
    be.launch("elementwise", "fill", &mut [Arg::W(x)], &p, grid1d(s.n))
}

pub(super) fn add(be: &WgpuBackend, s: &ElementwiseSpec, a: &T, b: &T, out: &mut T) -> Result<()> {
    be.launch("elementwise", "add", &mut [Arg::R(a), Arg::R(b), Arg::W(out)], &count(s.n), grid1d(s.n))
}

pub(super) fn axpby(be: &WgpuBackend, s: &AxpbySpec, x: &T, y: &mut T) -> Result<()> {
    let name = if s.beta == 0.0 { "axpy0" } else { "axpby" };
    let p = AxpbyParams { n: w(s.n), alpha: s.alpha, beta: s.beta };
    be.launch("elementwise", name, &mut [Arg::R(x), Arg::W(y)], &p, grid1d(s.n))
}

pub(super) fn scale(be: &WgpuBackend, s: &ScaleSpec, x: &mut T) -> Result<()> {
    let p = ScalarParams { n: w(s.n), value: s.s };
    be.launch("elementwise", "scale", &mut [Arg::W(x)], &p, grid1d(s.n))
}

pub(super) fn bias_add(be: &WgpuBackend, s: &BiasSpec, x: &mut T, bias: &T) -> Result<()> {
    let n = s.rows * s.n;
    let p = BiasParams { n: w(n), cols: w(s.n) };
    be.launch("elementwise", "bias_add", &mut [Arg::W(x), Arg::R(bias)], &p, grid1d(n))
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
    let p = SumRowsPartParams { n: w(s.n), rows: w(s.rows), chunk: w(chunk) };
    let grid = [s.n.div_ceil(256) as u32, chunks as u32, 1];
    be.launch("reduce", "sum_rows_part", &mut [Arg::R(x), Arg::W(&mut part)], &p, grid)?;
    let p = SumRowsFinalParams { n: w(s.n), chunks: w(chunks), beta: s.beta };
    be.launch("reduce", "sum_rows_final", &mut [Arg::R(&part), Arg::W(out)], &p, grid1d(s.n))
}

pub(super) fn cast(be: &WgpuBackend, s: &ElementwiseSpec, x: &T, y: &mut T) -> Result<()> {
    be.launch("elementwise", "cast", &mut [Arg::R(x), Arg::W(y)], &count(s.n), grid1d(s.n))
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
    be.launch("gelu", "gelu", &mut [Arg::R(x), Arg::W(y)], &count(s.n), grid1d(s.n))
}

pub(super) fn gelu_backward(be: &WgpuBackend, s: &ElementwiseSpec, x: &T, dy: &T, dx: &mut T) -> Result<()> {
    be.launch("gelu", "gelu_backward", &mut [Arg::R(x), Arg::R(dy), Arg::W(dx)], &count(s.n), grid1d(s.n))
}

pub(super) fn bias_gelu(be: &WgpuBackend, s: &BiasSpec, x: &T, bias: &T, y: &mut T) -> Result<()> {
    let n = s.rows * s.n;
    let p = BiasParams { n: w(n), cols: w(s.n) };
    be.launch("gelu", "bias_gelu", &mut [Arg::R(x), Arg::R(bias), Arg::W(y)], &p, grid1d(n))
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
    let p = LayerNormParams { rows: w(s.rows), n: w(s.n), eps: s.eps };
    let args = &mut [Arg::R(x), Arg::R(gamma), Arg::R(beta), Arg::W(y), Arg::W(mean), Arg::W(rstd)];
    be.launch("layernorm", "layernorm", args, &p, per_row(s.rows))
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
    let p = LayerNormParams { rows: w(s.rows), n: w(s.n), eps: s.eps };
    let args = &mut [Arg::R(dy), Arg::R(x), Arg::R(gamma), Arg::R(mean), Arg::R(rstd), Arg::W(dx)];
    be.launch("layernorm", "layernorm_dx", args, &p, per_row(s.rows))?;
    // Column sums of dy·xhat and dy: partial sums over chunks of rows, then
    // the partials of each column in chunk order (deterministic).
    let chunk = s.rows.div_ceil(65_535).max(64);
    let chunks = s.rows.div_ceil(chunk);
    let mut part = T::empty(be, &[2 * chunks * s.n], DType::F32)?;
    let p = LnColPartParams { rows: w(s.rows), n: w(s.n), chunk: w(chunk) };
    let grid = [s.n.div_ceil(256) as u32, chunks as u32, 1];
    let args = &mut [Arg::R(dy), Arg::R(x), Arg::R(mean), Arg::R(rstd), Arg::W(&mut part)];
    be.launch("layernorm", "ln_colpart", args, &p, grid)?;
    let p = LnColSumParams { chunks: w(chunks), n: w(s.n) };
    be.launch("layernorm", "ln_colsum", &mut [Arg::R(&part), Arg::W(dgamma), Arg::W(dbeta)], &p, grid1d(s.n))
}

fn softmax_params(s: &SoftmaxSpec) -> SoftmaxParams {
    SoftmaxParams { rows: w(s.rows), n: w(s.n), t: w(s.t), causal: s.causal as u32 }
}

pub(super) fn softmax(be: &WgpuBackend, s: &SoftmaxSpec, x: &T, y: &mut T) -> Result<()> {
    be.launch("softmax", "softmax", &mut [Arg::R(x), Arg::W(y)], &softmax_params(s), per_row(s.rows))
}

pub(super) fn softmax_backward(be: &WgpuBackend, s: &SoftmaxSpec, y: &T, dy: &T, dx: &mut T) -> Result<()> {
    let p = softmax_params(s);
    be.launch("softmax", "softmax_backward", &mut [Arg::R(y), Arg::R(dy), Arg::W(dx)], &p, per_row(s.rows))
}

pub(super) fn rope(be: &WgpuBackend, s: &RopeSpec, x: &T, cos: &T, sin: &T, y: &mut T) -> Result<()> {
    let half = s.head_dim / 2;
    let pairs = s.batch * s.seq * s.heads * half;
    let p = RopeParams {
        pairs: w(pairs),
        half: w(half),
        heads: w(s.heads),
        seq: w(s.seq),
        pos_offset: w(s.pos_offset),
        inverse: s.inverse as u32,
    };
    be.launch("rope", "rope", &mut [Arg::R(x), Arg::R(cos), Arg::R(sin), Arg::W(y)], &p, grid1d(pairs))
}

pub(super) fn embedding(be: &WgpuBackend, s: &EmbeddingSpec, ids: &T, table: &T, out: &mut T) -> Result<()> {
    let total = s.n * s.dim;
    let p = EmbeddingParams { total: w(total), dim: w(s.dim), vocab: w(s.vocab), n: w(s.n) };
    be.launch("embedding", "embedding", &mut [Arg::R(ids), Arg::R(table), Arg::W(out)], &p, grid1d(total))
}

pub(super) fn embedding_backward(be: &WgpuBackend, s: &EmbeddingSpec, ids: &T, dout: &T, dtable: &mut T) -> Result<()> {
    // links[i]: the next token with the same id; links[n + i]: i is the first one.
    let mut links = T::empty(be, &[2 * s.n], DType::U32)?;
    be.launch("embedding", "emb_links", &mut [Arg::R(ids), Arg::W(&mut links)], &count(s.n), grid1d(s.n))?;
    let total = s.n * s.dim;
    let p = EmbeddingParams { total: w(total), dim: w(s.dim), vocab: w(s.vocab), n: w(s.n) };
    let args = &mut [Arg::R(ids), Arg::R(&links), Arg::R(dout), Arg::W(dtable)];
    be.launch("embedding", "embedding_backward", args, &p, grid1d(total))
}

fn ce_params(s: &CrossEntropySpec) -> CrossEntropyParams {
    CrossEntropyParams { rows: w(s.rows), vocab: w(s.vocab), ignore_index: s.ignore_index, grad_scale: s.grad_scale }
}

pub(super) fn cross_entropy(
    be: &WgpuBackend,
    s: &CrossEntropySpec,
    logits: &T,
    targets: &T,
    losses: &mut T,
) -> Result<()> {
    let args = &mut [Arg::R(logits), Arg::R(targets), Arg::W(losses)];
    be.launch("cross_entropy", "cross_entropy", args, &ce_params(s), per_row(s.rows))
}

pub(super) fn cross_entropy_backward(
    be: &WgpuBackend,
    s: &CrossEntropySpec,
    logits: &T,
    targets: &T,
    dlogits: &mut T,
) -> Result<()> {
    let args = &mut [Arg::R(logits), Arg::R(targets), Arg::W(dlogits)];
    be.launch("cross_entropy", "cross_entropy_backward", args, &ce_params(s), per_row(s.rows))
}

/// Workgroups of the first reduction pass (at most 256, so one workgroup finishes).
fn reduce_groups(n: usize) -> usize {
    n.div_ceil(256 * 4).clamp(1, 256)
}

pub(super) fn sum_squares(be: &WgpuBackend, s: &ReduceSpec, x: &T, out: &mut T) -> Result<()> {
    let g = reduce_groups(s.n);
    let mut part = T::empty(be, &[g], DType::F32)?;
    be.launch("reduce", "sum_squares_part", &mut [Arg::R(x), Arg::W(&mut part)], &count(s.n), [g as u32, 1, 1])?;
    be.launch("reduce", "sum_squares_final", &mut [Arg::R(&part), Arg::W(out)], &count(g), [1, 1, 1])
}

pub(super) fn all_finite(be: &WgpuBackend, s: &ReduceSpec, x: &T, out: &mut T) -> Result<()> {
    let g = reduce_groups(s.n);
    let mut part = T::empty(be, &[g], DType::U32)?;
    be.launch("reduce", "all_finite_part", &mut [Arg::R(x), Arg::W(&mut part)], &count(s.n), [g as u32, 1, 1])?;
    be.launch("reduce", "all_finite_final", &mut [Arg::R(&part), Arg::W(out)], &count(g), [1, 1, 1])
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
    let p = AdamWParams {
        n: w(s.n),
        lr: s.lr,
        beta1: s.beta1,
        beta2: s.beta2,
        eps: s.eps,
        weight_decay: s.weight_decay,
        bc1: s.bc1,
        bc2: s.bc2,
        grad_scale: s.grad_scale,
    };
    match copy {
        Some(c) => {
            let args = &mut [Arg::W(params), Arg::R(grads), Arg::W(m), Arg::W(v), Arg::W(c)];
            be.launch("adamw", "adamw_copy", args, &p, grid1d(s.n))
        }
        None => {
            be.launch("adamw", "adamw", &mut [Arg::W(params), Arg::R(grads), Arg::W(m), Arg::W(v)], &p, grid1d(s.n))
        }
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
