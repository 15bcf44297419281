//! Batched matrix multiplication.

use super::{CHECKED, Checked, check_float, check_nonempty, check_same_dtype, check_u32};
use crate::Tensor;
use crate::backend::Backend;
use crate::error::{Error, Result, fmt_shape};

/// `C[i] = alpha · op(A[i]) · op(B[i or 0]) + beta · C[i]`, row-major, f32 accumulation.
///
/// - `A` is `[batch?, m, k]`, or `[batch?, k, m]` when `trans_a`.
/// - `B` is `[batch?, k, n]`, or `[batch?, n, k]` when `trans_b`; a 2-D `B`
///   (or a batch of 1) is shared by every batch entry (a weight matrix).
/// - `C` is `[batch?, m, n]` and has the dtype of `A` and `B`.
/// - When `beta == 0`, `C` is not read (it may hold NaN).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MatmulSpec {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub alpha: f32,
    pub beta: f32,
    /// Whether `B` has one matrix per batch entry (else it is broadcast).
    pub b_batched: bool,
    /// Every row of C must come out of the same arithmetic whatever `m` is
    /// (same kernel, same summation order), so a row's result does not
    /// depend on the other rows of the call; set by [`matmul_rows`].
    pub row_invariant: bool,
    pub checked: Checked,
}

impl MatmulSpec {
    /// Elements between consecutive matrices of A, B, C.
    pub fn strides(&self) -> (usize, usize, usize) {
        (self.m * self.k, if self.b_batched { self.k * self.n } else { 0 }, self.m * self.n)
    }
    /// Floating-point operations of one call (2·batch·m·n·k).
    pub fn flops(&self) -> f64 {
        2.0 * self.batch as f64 * self.m as f64 * self.n as f64 * self.k as f64
    }
}

fn split(op: &'static str, name: &str, shape: &[usize]) -> Result<(usize, usize, usize)> {
    match *shape {
        [r, c] => Ok((1, r, c)),
        [b, r, c] => Ok((b, r, c)),
        _ => Err(Error::Shape(format!("{op}: `{name}` must be 2-D or 3-D, got {}", fmt_shape(shape)))),
    }
}

/// `C = α·op(A)·op(B) + β·C`, 2-D or batched 3-D (a 2-D B broadcast over
/// the batch), f32 accumulation.
#[allow(clippy::too_many_arguments)]
pub fn matmul<B: Backend>(
    be: &B,
    a: &Tensor<B>,
    b: &Tensor<B>,
    c: &mut Tensor<B>,
    trans_a: bool,
    trans_b: bool,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    matmul_impl(be, a, b, c, trans_a, trans_b, alpha, beta, false)
}

/// `C = α·A·op(B) + β·C` for a 2-D A `[m, k]` whose rows are independent
/// requests (an inference step's tokens): each row of C is bit-identical to
/// what the same row gives in a call with any other rows, so a sequence's
/// output does not depend on what it was batched with.
pub fn matmul_rows<B: Backend>(
    be: &B,
    a: &Tensor<B>,
    b: &Tensor<B>,
    c: &mut Tensor<B>,
    trans_b: bool,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    if a.shape().len() != 2 || b.shape().len() != 2 {
        return Err(Error::Shape(format!(
            "matmul_rows: a and b must be 2-D, got {} and {}",
            fmt_shape(a.shape()),
            fmt_shape(b.shape())
        )));
    }
    matmul_impl(be, a, b, c, false, trans_b, alpha, beta, true)
}

#[allow(clippy::too_many_arguments)]
fn matmul_impl<B: Backend>(
    be: &B,
    a: &Tensor<B>,
    b: &Tensor<B>,
    c: &mut Tensor<B>,
    trans_a: bool,
    trans_b: bool,
    alpha: f32,
    beta: f32,
    row_invariant: bool,
) -> Result<()> {
    const OP: &str = "matmul";
    check_float(be, OP, "a", a)?;
    check_same_dtype(OP, &[("a", a), ("b", b), ("c", &*c)])?;
    for (n, t) in [("a", a), ("b", b), ("c", &*c)] {
        check_nonempty(OP, n, t)?;
    }
    let (ba, ar, ac) = split(OP, "a", a.shape())?;
    let (bb, br, bc) = split(OP, "b", b.shape())?;
    let (bc_, m, n) = split(OP, "c", c.shape())?;
    let (am, ak) = if trans_a { (ac, ar) } else { (ar, ac) };
    let (bk, bn) = if trans_b { (bc, br) } else { (br, bc) };
    let desc = || {
        format!(
            "a is {}{}, b is {}{}, c is {}",
            fmt_shape(a.shape()),
            if trans_a { "ᵀ" } else { "" },
            fmt_shape(b.shape()),
            if trans_b { "ᵀ" } else { "" },
            fmt_shape(c.shape())
        )
    };
    if ak != bk || am != m || bn != n {
        return Err(Error::Shape(format!("{OP}: inner or outer dimensions do not match: {}", desc())));
    }
    if ba != bc_ || (bb != 1 && bb != bc_) {
        return Err(Error::Shape(format!("{OP}: batch sizes do not match: {}", desc())));
    }
    for (what, v) in [("batch·m·k", ba * am * ak), ("batch·k·n", bb * bk * bn), ("batch·m·n", ba * m * n)] {
        check_u32(OP, what, v)?;
    }
    if !alpha.is_finite() || !beta.is_finite() {
        return Err(Error::Invalid(format!("{OP}: alpha = {alpha} and beta = {beta} must be finite")));
    }
    let spec = MatmulSpec {
        batch: ba,
        m,
        n,
        k: ak,
        trans_a,
        trans_b,
        alpha,
        beta,
        b_batched: bb != 1,
        row_invariant,
        checked: CHECKED,
    };
    be.matmul(&spec, a, b, c)
}
