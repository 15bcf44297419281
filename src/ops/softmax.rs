//! Row softmax over the last dimension, optionally causal.
//!
//! With `causal`, the input is `[..., t, s]` (query rows, key columns) and
//! column `j` of query row `i` is masked when `j > i + (s - t)` (queries are
//! the last `t` of `s` positions). Masked outputs are exactly 0.
//! Backward: `dx = y·(dy - Σ_j y·dy)`.

use super::*;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SoftmaxSpec {
    pub rows: usize,
    /// Columns (keys) per row.
    pub n: usize,
    /// Query rows per causal block (the `t` of `[..., t, s]`); 0 when not causal.
    pub t: usize,
    pub causal: bool,
    pub checked: Checked,
}

impl SoftmaxSpec {
    /// Number of unmasked columns of row `r`.
    pub fn visible(&self, r: usize) -> usize {
        if self.causal { (r % self.t + 1 + (self.n - self.t)).min(self.n) } else { self.n }
    }
}

fn spec<B: Backend>(be: &B, op: &'static str, x: &Tensor<B>, causal: bool) -> Result<SoftmaxSpec> {
    check_float(be, op, "x", x)?;
    check_nonempty(op, "x", x)?;
    let (rows, n) = rows_of(x);
    check_u32(op, "numel", x.numel())?;
    let t = if causal {
        if x.rank() < 2 {
            return Err(Error::Shape(format!(
                "{op}: causal softmax needs a [..., t, s] tensor, got {}",
                fmt_shape(x.shape())
            )));
        }
        let t = x.shape()[x.rank() - 2];
        if t > n {
            return Err(Error::Shape(format!(
                "{op}: causal softmax over {} has more queries ({t}) than keys ({n})",
                fmt_shape(x.shape())
            )));
        }
        t
    } else {
        0
    };
    Ok(SoftmaxSpec { rows, n, t, causal, checked: CHECKED })
}

/// `y = softmax(x)` along the last dimension.
pub fn softmax<B: Backend>(be: &B, x: &Tensor<B>, y: &mut Tensor<B>, causal: bool) -> Result<()> {
    const OP: &str = "softmax";
    check_same_dtype(OP, &[("x", x), ("y", &*y)])?;
    check_same_shape(OP, &[("x", x), ("y", &*y)])?;
    let s = spec(be, OP, x, causal)?;
    be.softmax(&s, x, y)
}

/// `dx = y·(dy - Σ y·dy)` from the forward output `y`.
pub fn softmax_backward<B: Backend>(
    be: &B,
    y: &Tensor<B>,
    dy: &Tensor<B>,
    dx: &mut Tensor<B>,
    causal: bool,
) -> Result<()> {
    const OP: &str = "softmax_backward";
    check_same_dtype(OP, &[("y", y), ("dy", dy), ("dx", &*dx)])?;
    check_same_shape(OP, &[("y", y), ("dy", dy), ("dx", &*dx)])?;
    let s = spec(be, OP, y, causal)?;
    be.softmax_backward(&s, y, dy, dx)
}
