//! 2:4 structured pruning by importance: magnitude (`|W|`, what
//! [`QMatrix::quantize`] does) and Wanda (Sun et al. 2023): `|W[j][p]| · ‖X_p‖₂`,
//! the weight's magnitude times the norm of the input channel it multiplies
//! over the calibration tokens, so a small weight on a loud channel can
//! outrank a larger one on a quiet channel. Both keep, per group of four
//! inputs of each output row, the two most important entries.

use crate::error::{Error, Result};
use crate::quant::{QFormat, QMatrix};

/// Wanda's importance of a row-major `[n, k]` weight `wt` for input-channel norms `norms` (`[k]`).
pub fn wanda_importance(wt: &[f32], n: usize, k: usize, norms: &[f32]) -> Result<Vec<f32>> {
    if wt.len() != n * k || norms.len() != k {
        return Err(Error::Shape(format!(
            "wanda: a weight of {} values and {} channel norms for {n}×{k}",
            wt.len(),
            norms.len()
        )));
    }
    Ok(wt.chunks_exact(k).flat_map(|row| row.iter().zip(norms).map(|(w, x)| w.abs() * x)).collect())
}

/// Wanda 2:4 pruning of `[n, k]` weight `wt` (`format` must be 2:4 or 2:4-int8).
pub fn wanda(wt: &[f32], n: usize, k: usize, norms: &[f32], format: QFormat) -> Result<QMatrix> {
    let imp = wanda_importance(wt, n, k, norms)?;
    QMatrix::sparse24(wt, &imp, n, k, format)
}
