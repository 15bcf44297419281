//! GELU, tanh form: `gelu(x) = 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.

use super::elementwise::bias_spec;
use super::*;

/// `y = gelu(x)`.
pub fn gelu<B: Backend>(be: &B, x: &Tensor<B>, y: &mut Tensor<B>) -> Result<()> {
    const OP: &str = "gelu";
    check_float(be, OP, "x", x)?;
    check_same_dtype(OP, &[("x", x), ("y", &*y)])?;
    check_same_shape(OP, &[("x", x), ("y", &*y)])?;
    check_nonempty(OP, "x", x)?;
    let n = check_u32(OP, "numel", x.numel())? as usize;
    be.gelu(&ElementwiseSpec { n, checked: CHECKED }, x, y)
}

/// `dx = dy · gelu'(x)` (`x` is the pre-activation saved by the forward pass).
pub fn gelu_backward<B: Backend>(be: &B, x: &Tensor<B>, dy: &Tensor<B>, dx: &mut Tensor<B>) -> Result<()> {
    const OP: &str = "gelu_backward";
    check_float(be, OP, "x", x)?;
    check_same_dtype(OP, &[("x", x), ("dy", dy), ("dx", &*dx)])?;
    check_same_shape(OP, &[("x", x), ("dy", dy), ("dx", &*dx)])?;
    check_nonempty(OP, "x", x)?;
    let n = check_u32(OP, "numel", x.numel())? as usize;
    be.gelu_backward(&ElementwiseSpec { n, checked: CHECKED }, x, dy, dx)
}

/// Fused `y = gelu(x + bias)`, bias broadcast over the rows of `x`. Its
/// backward is [`gelu_backward`] on `x + bias` followed by [`sum_rows`].
pub fn bias_gelu<B: Backend>(be: &B, x: &Tensor<B>, bias: &Tensor<B>, y: &mut Tensor<B>) -> Result<()> {
    const OP: &str = "bias_gelu";
    check_float(be, OP, "x", x)?;
    check_same_dtype(OP, &[("x", x), ("bias", bias), ("y", &*y)])?;
    check_same_shape(OP, &[("x", x), ("y", &*y)])?;
    let spec = bias_spec(OP, x, bias)?;
    be.bias_gelu(&spec, x, bias, y)
}
