//! The op vocabulary: one spec per op (shapes, dtypes, semantics) and one
//! checked entry point that validates its tensors and calls the backend.
//!
//! Every op accumulates in f32. Unless a spec says otherwise, the float
//! tensors of one call share one dtype (F32, F16 or BF16), statistics
//! (LayerNorm mean/rstd, losses, sums) are F32, and indices are U32.
//! Outputs are fully overwritten unless the spec says "accumulates".
//!
//! Backends implement the unchecked methods of [`crate::Backend`]; callers use
//! the functions here, which return an [`Error`] naming the offending shapes
//! instead of letting a kernel read out of bounds.

pub mod adamw;
pub mod cache;
pub mod cross_entropy;
pub mod elementwise;
pub mod embedding;
pub mod gelu;
pub mod layernorm;
pub mod matmul;
pub mod qmatmul;
pub mod reduce;
pub mod rope;
pub mod softmax;

pub use adamw::{AdamWSpec, adamw};
pub use cache::{CacheWriteSpec, cache_write};
pub use cross_entropy::{CrossEntropySpec, cross_entropy, cross_entropy_backward};
pub use elementwise::{
    AxpbySpec, BiasSpec, ElementwiseSpec, FillSpec, ScaleSpec, SumRowsSpec, add, axpby, bias_add, cast, fill, scale,
    sum_rows,
};
pub use embedding::{EmbeddingSpec, embedding, embedding_backward};
pub use gelu::{bias_gelu, gelu, gelu_backward};
pub use layernorm::{LayerNormSpec, layernorm, layernorm_backward};
pub use matmul::{MatmulSpec, matmul, matmul_rows};
pub use qmatmul::{QMatmulSpec, QWeight, qmatmul};
pub use reduce::{ReduceSpec, all_finite, sum_squares};
pub use rope::{RopeSpec, RopeTable, rope, rope_backward, rope_rows};
pub use softmax::{SoftmaxSpec, softmax, softmax_backward};

use crate::backend::Backend;
use crate::error::{Error, Result, fmt_shape};
use crate::{DType, Tensor};

/// Proof that a spec was built by its op's validation, so backends can trust
/// its sizes. Only this crate can make one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checked(());

pub(crate) const CHECKED: Checked = Checked(());

/// The tensor is a float tensor the backend supports.
pub(crate) fn check_float<B: Backend>(be: &B, op: &'static str, name: &str, t: &Tensor<B>) -> Result<()> {
    if !t.dtype().is_float() {
        return Err(Error::DType { op, dtype: t.dtype(), why: format!(" for `{name}` (expected a float dtype)") });
    }
    check_supported(be, op, t.dtype())
}

pub(crate) fn check_supported<B: Backend>(be: &B, op: &'static str, dtype: DType) -> Result<()> {
    if be.supports(dtype) {
        Ok(())
    } else {
        Err(Error::DType { op, dtype, why: format!(" by the {} backend ({})", be.kind(), be.device_name()) })
    }
}

pub(crate) fn check_dtype<B: Backend>(op: &'static str, name: &str, t: &Tensor<B>, want: DType) -> Result<()> {
    if t.dtype() != want {
        return Err(Error::DType { op, dtype: t.dtype(), why: format!(" for `{name}` (expected {want})") });
    }
    Ok(())
}

pub(crate) fn check_nonempty<B: Backend>(op: &'static str, name: &str, t: &Tensor<B>) -> Result<()> {
    if t.numel() == 0 {
        return Err(Error::Empty(format!("{op}: `{name}` has shape {}", fmt_shape(t.shape()))));
    }
    Ok(())
}

/// All named tensors have the same dtype.
pub(crate) fn check_same_dtype<B: Backend>(op: &'static str, ts: &[(&str, &Tensor<B>)]) -> Result<()> {
    let (n0, t0) = ts[0];
    for (n, t) in &ts[1..] {
        if t.dtype() != t0.dtype() {
            return Err(Error::DType {
                op,
                dtype: t.dtype(),
                why: format!(" for `{n}` here: `{n0}` is {} and they must match", t0.dtype()),
            });
        }
    }
    Ok(())
}

/// All named tensors have exactly the same shape.
pub(crate) fn check_same_shape<B: Backend>(op: &'static str, ts: &[(&str, &Tensor<B>)]) -> Result<()> {
    let (n0, t0) = ts[0];
    for (n, t) in &ts[1..] {
        if t.shape() != t0.shape() {
            return Err(Error::Shape(format!(
                "{op}: `{n0}` is {} but `{n}` is {}",
                fmt_shape(t0.shape()),
                fmt_shape(t.shape())
            )));
        }
    }
    Ok(())
}

/// The tensor has exactly `want` elements laid out as a vector of that length.
pub(crate) fn check_len<B: Backend>(
    op: &'static str,
    name: &str,
    t: &Tensor<B>,
    want: usize,
    what: &str,
) -> Result<()> {
    if t.numel() != want {
        return Err(Error::Shape(format!(
            "{op}: `{name}` is {} but must have {want} elements ({what})",
            fmt_shape(t.shape())
        )));
    }
    Ok(())
}

/// `(rows, n)` of a tensor seen as rows of its last dimension.
pub(crate) fn rows_of<B: Backend>(t: &Tensor<B>) -> (usize, usize) {
    let n = t.last_dim();
    let rows = t.numel().checked_div(n).unwrap_or(0);
    (rows, n)
}

/// Work sizes are passed to kernels as u32; refuse what does not fit.
pub(crate) fn check_u32(op: &'static str, what: &str, v: usize) -> Result<u32> {
    u32::try_from(v)
        .map_err(|_| Error::Shape(format!("{op}: {what} = {v} exceeds the 32-bit index range of the kernels")))
}
