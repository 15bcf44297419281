//! Embedding lookup and its gradient.
//!
//! Forward: `out[i, :] = table[ids[i], :]`, and a zero row for `ids[i] >= vocab`.
//! Backward: `dtable[v, :] += Σ_{i: ids[i] = v} dout[i, :]` (accumulates; out of
//! range ids contribute nothing). Backends sum in increasing `i` so the result is
//! deterministic and identical everywhere up to rounding of the dtype.

use super::*;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EmbeddingSpec {
    /// Number of ids.
    pub n: usize,
    pub vocab: usize,
    pub dim: usize,
    pub checked: Checked,
}

fn spec<B: Backend>(
    be: &B,
    op: &'static str,
    ids: &Tensor<B>,
    table: &Tensor<B>,
    rows: &Tensor<B>,
) -> Result<EmbeddingSpec> {
    check_dtype(op, "ids", ids, DType::U32)?;
    check_float(be, op, "table", table)?;
    check_same_dtype(op, &[("table", table), ("rows", rows)])?;
    check_nonempty(op, "ids", ids)?;
    check_nonempty(op, "table", table)?;
    let [vocab, dim] = *table.shape() else {
        return Err(Error::Shape(format!("{op}: table must be [vocab, dim], got {}", fmt_shape(table.shape()))));
    };
    let n = ids.numel();
    let mut want = ids.shape().to_vec();
    want.push(dim);
    if rows.shape() != want.as_slice() {
        return Err(Error::Shape(format!(
            "{op}: ids {} and table {} need rows of shape {}, got {}",
            fmt_shape(ids.shape()),
            fmt_shape(table.shape()),
            fmt_shape(&want),
            fmt_shape(rows.shape())
        )));
    }
    check_u32(op, "n·dim", n * dim)?;
    check_u32(op, "vocab·dim", vocab * dim)?;
    Ok(EmbeddingSpec { n, vocab, dim, checked: CHECKED })
}

/// `out[.., :] = table[ids[..], :]`; `out` is `ids.shape() + [dim]`.
pub fn embedding<B: Backend>(be: &B, ids: &Tensor<B>, table: &Tensor<B>, out: &mut Tensor<B>) -> Result<()> {
    let s = spec(be, "embedding", ids, table, out)?;
    be.embedding(&s, ids, table, out)
}

/// `dtable[ids[i]] += dout[i]` (accumulates).
pub fn embedding_backward<B: Backend>(be: &B, ids: &Tensor<B>, dout: &Tensor<B>, dtable: &mut Tensor<B>) -> Result<()> {
    let s = spec(be, "embedding_backward", ids, dtable, dout)?;
    be.embedding_backward(&s, ids, dout, dtable)
}
