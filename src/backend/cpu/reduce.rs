//! Whole-tensor reductions on the host.

use rayon::prelude::*;

/// `Σ x²` accumulated in f64 (per chunk, then across chunks), rounded to f32.
pub(super) fn sum_squares(x: &[f32]) -> f32 {
    x.par_chunks(4096).map(|c| c.iter().map(|&v| v as f64 * v as f64).sum::<f64>()).sum::<f64>() as f32
}
