//! Fused softmax + cross-entropy over the vocabulary, with ignore-index.
//!
//! `logits` is `[..., V]` (rows of the last dimension), `targets` holds one
//! U32 class per row. A row is *ignored* when its target equals
//! `ignore_index` or is `>= V`.
//! Forward: `loss[r] = logsumexp(logits[r]) - logits[r, target[r]]`, 0 when ignored (F32).
//! Backward: `dlogits[r] = grad_scale·(softmax(logits[r]) - onehot(target[r]))`,
//! 0 for ignored rows (`grad_scale` is typically `loss_scale / valid_rows`).

use super::*;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CrossEntropySpec {
    pub rows: usize,
    pub vocab: usize,
    pub ignore_index: u32,
    pub grad_scale: f32,
    pub checked: Checked,
}

impl CrossEntropySpec {
    pub fn is_ignored(&self, target: u32) -> bool {
        target == self.ignore_index || target as usize >= self.vocab
    }
}

fn spec<B: Backend>(
    be: &B,
    op: &'static str,
    logits: &Tensor<B>,
    targets: &Tensor<B>,
    ignore_index: u32,
    grad_scale: f32,
) -> Result<CrossEntropySpec> {
    check_float(be, op, "logits", logits)?;
    check_dtype(op, "targets", targets, DType::U32)?;
    check_nonempty(op, "logits", logits)?;
    let (rows, vocab) = rows_of(logits);
    check_len(op, "targets", targets, rows, "one per row of `logits`")?;
    check_u32(op, "numel", logits.numel())?;
    if !grad_scale.is_finite() {
        return Err(Error::Invalid(format!("{op}: grad_scale = {grad_scale} must be finite")));
    }
    Ok(CrossEntropySpec { rows, vocab, ignore_index, grad_scale, checked: CHECKED })
}

/// Per-row losses (F32, one per row of `logits`).
pub fn cross_entropy<B: Backend>(
    be: &B,
    logits: &Tensor<B>,
    targets: &Tensor<B>,
    losses: &mut Tensor<B>,
    ignore_index: u32,
) -> Result<()> {
    const OP: &str = "cross_entropy";
    let s = spec(be, OP, logits, targets, ignore_index, 1.0)?;
    check_dtype(OP, "losses", losses, DType::F32)?;
    check_len(OP, "losses", losses, s.rows, "one per row of `logits`")?;
    be.cross_entropy(&s, logits, targets, losses)
}

/// `dlogits = grad_scale·(softmax(logits) - onehot(targets))`.
pub fn cross_entropy_backward<B: Backend>(
    be: &B,
    logits: &Tensor<B>,
    targets: &Tensor<B>,
    dlogits: &mut Tensor<B>,
    ignore_index: u32,
    grad_scale: f32,
) -> Result<()> {
    const OP: &str = "cross_entropy_backward";
    let s = spec(be, OP, logits, targets, ignore_index, grad_scale)?;
    check_same_dtype(OP, &[("logits", logits), ("dlogits", &*dlogits)])?;
    check_same_shape(OP, &[("logits", logits), ("dlogits", &*dlogits)])?;
    be.cross_entropy_backward(&s, logits, targets, dlogits)
}
