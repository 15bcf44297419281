//! Element-wise ops: fill, add, axpby (residual add, gradient accumulation),
//! scale, bias add, row sums (bias gradients) and dtype casts.

use super::*;

/// `x[i] = value` for every element.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FillSpec {
    pub n: usize,
    pub value: f32,
    pub checked: Checked,
}

/// An element-wise op over `n` elements of same-shaped tensors.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ElementwiseSpec {
    pub n: usize,
    pub checked: Checked,
}

/// `y = alpha·x + beta·y`; `x` and `y` may have different float dtypes
/// (e.g. an f16 gradient accumulated into an f32 one). When `beta == 0`, `y`
/// is not read.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AxpbySpec {
    pub n: usize,
    pub alpha: f32,
    pub beta: f32,
    pub checked: Checked,
}

/// `x = s·x` in place.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ScaleSpec {
    pub n: usize,
    pub s: f32,
    pub checked: Checked,
}

/// A `[rows, n]` tensor and a bias of `n` elements broadcast over its rows.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BiasSpec {
    pub rows: usize,
    pub n: usize,
    pub checked: Checked,
}

/// `out[j] = Σ_r x[r, j] + beta·out[j]` (the gradient of a bias). When
/// `beta == 0`, `out` is not read.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SumRowsSpec {
    pub rows: usize,
    pub n: usize,
    pub beta: f32,
    pub checked: Checked,
}

fn finite(op: &'static str, what: &str, v: f32) -> Result<()> {
    if v.is_finite() { Ok(()) } else { Err(Error::Invalid(format!("{op}: {what} = {v} must be finite"))) }
}

/// Sets every element of `x` to `value` (NaN allowed: used to poison outputs).
pub fn fill<B: Backend>(be: &B, x: &mut Tensor<B>, value: f32) -> Result<()> {
    check_float(be, "fill", "x", x)?;
    check_nonempty("fill", "x", x)?;
    let n = check_u32("fill", "numel", x.numel())? as usize;
    be.fill(&FillSpec { n, value, checked: CHECKED }, x)
}

/// `out = a + b` (same shape, same dtype).
pub fn add<B: Backend>(be: &B, a: &Tensor<B>, b: &Tensor<B>, out: &mut Tensor<B>) -> Result<()> {
    const OP: &str = "add";
    check_float(be, OP, "a", a)?;
    check_same_dtype(OP, &[("a", a), ("b", b), ("out", &*out)])?;
    check_same_shape(OP, &[("a", a), ("b", b), ("out", &*out)])?;
    check_nonempty(OP, "a", a)?;
    let n = check_u32(OP, "numel", a.numel())? as usize;
    be.add(&ElementwiseSpec { n, checked: CHECKED }, a, b, out)
}

/// `y = alpha·x + beta·y`: residual adds (`1, 1`) and gradient accumulation
/// into a wider dtype.
pub fn axpby<B: Backend>(be: &B, alpha: f32, x: &Tensor<B>, beta: f32, y: &mut Tensor<B>) -> Result<()> {
    const OP: &str = "axpby";
    check_float(be, OP, "x", x)?;
    check_float(be, OP, "y", y)?;
    check_same_shape(OP, &[("x", x), ("y", &*y)])?;
    check_nonempty(OP, "x", x)?;
    finite(OP, "alpha", alpha)?;
    finite(OP, "beta", beta)?;
    let n = check_u32(OP, "numel", x.numel())? as usize;
    be.axpby(&AxpbySpec { n, alpha, beta, checked: CHECKED }, x, y)
}

/// `x = s·x` in place.
pub fn scale<B: Backend>(be: &B, x: &mut Tensor<B>, s: f32) -> Result<()> {
    check_float(be, "scale", "x", x)?;
    check_nonempty("scale", "x", x)?;
    finite("scale", "s", s)?;
    let n = check_u32("scale", "numel", x.numel())? as usize;
    be.scale(&ScaleSpec { n, s, checked: CHECKED }, x)
}

pub(crate) fn bias_spec<B: Backend>(op: &'static str, x: &Tensor<B>, bias: &Tensor<B>) -> Result<BiasSpec> {
    check_nonempty(op, "x", x)?;
    let (rows, n) = rows_of(x);
    check_len(op, "bias", bias, n, "the last dimension of `x`")?;
    if bias.rank() != 1 {
        return Err(Error::Shape(format!("{op}: `bias` must be 1-D, got {}", fmt_shape(bias.shape()))));
    }
    check_u32(op, "numel", x.numel())?;
    Ok(BiasSpec { rows, n, checked: CHECKED })
}

/// `x[r, j] += bias[j]` in place (same dtype).
pub fn bias_add<B: Backend>(be: &B, x: &mut Tensor<B>, bias: &Tensor<B>) -> Result<()> {
    const OP: &str = "bias_add";
    check_float(be, OP, "x", x)?;
    check_same_dtype(OP, &[("x", &*x), ("bias", bias)])?;
    let spec = bias_spec(OP, x, bias)?;
    be.bias_add(&spec, x, bias)
}

/// `out[j] = Σ_r x[r, j] + beta·out[j]`, `x` seen as rows of its last dimension.
pub fn sum_rows<B: Backend>(be: &B, x: &Tensor<B>, out: &mut Tensor<B>, beta: f32) -> Result<()> {
    const OP: &str = "sum_rows";
    check_float(be, OP, "x", x)?;
    check_same_dtype(OP, &[("x", x), ("out", &*out)])?;
    check_nonempty(OP, "x", x)?;
    finite(OP, "beta", beta)?;
    let (rows, n) = rows_of(x);
    check_len(OP, "out", out, n, "the last dimension of `x`")?;
    check_u32(OP, "numel", x.numel())?;
    be.sum_rows(&SumRowsSpec { rows, n, beta, checked: CHECKED }, x, out)
}

/// `y = x` converted to `y`'s float dtype (round to nearest even).
pub fn cast<B: Backend>(be: &B, x: &Tensor<B>, y: &mut Tensor<B>) -> Result<()> {
    const OP: &str = "cast";
    check_float(be, OP, "x", x)?;
    check_float(be, OP, "y", y)?;
    check_same_shape(OP, &[("x", x), ("y", &*y)])?;
    check_nonempty(OP, "x", x)?;
    let n = check_u32(OP, "numel", x.numel())? as usize;
    be.cast(&ElementwiseSpec { n, checked: CHECKED }, x, y)
}
