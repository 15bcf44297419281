//! Whole-tensor reductions for gradient norms and overflow checks.

use super::*;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ReduceSpec {
    pub n: usize,
    pub checked: Checked,
}

fn spec<B: Backend>(be: &B, op: &'static str, x: &Tensor<B>, out: &Tensor<B>, out_dtype: DType) -> Result<ReduceSpec> {
    check_float(be, op, "x", x)?;
    check_nonempty(op, "x", x)?;
    check_dtype(op, "out", out, out_dtype)?;
    check_len(op, "out", out, 1, "a single value")?;
    let n = check_u32(op, "numel", x.numel())? as usize;
    Ok(ReduceSpec { n, checked: CHECKED })
}

/// `out[0] = Σ x²` in f32 (F32 `out` of one element).
pub fn sum_squares<B: Backend>(be: &B, x: &Tensor<B>, out: &mut Tensor<B>) -> Result<()> {
    let s = spec(be, "sum_squares", x, out, DType::F32)?;
    be.sum_squares(&s, x, out)
}

/// `out[0] = 1` when every element of `x` is finite, else `0` (U32 `out` of one element).
/// Inf and NaN are detected from the bit pattern, so fast-math cannot hide them.
pub fn all_finite<B: Backend>(be: &B, x: &Tensor<B>, out: &mut Tensor<B>) -> Result<()> {
    let s = spec(be, "all_finite", x, out, DType::U32)?;
    be.all_finite(&s, x, out)
}
