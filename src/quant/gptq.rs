//! GPTQ (Frantar et al. 2022): error-compensating rounding for int8 / int4,
//! and its pruning twin SparseGPT (Frantar & Alistarh 2023) for 2:4 ([`prune24`]).
//!
//! Round to nearest quantizes every weight on its own. GPTQ quantizes the
//! input channels of a row one after another and, after each, moves the
//! rounding error onto the channels not yet quantized, weighted by how the
//! input correlates them, so that the *output* error `‖X·(Ŵ − W)‖²` — the
//! objective AWQ's searches also minimise — is what gets minimised, not the
//! weight error. With `H = XᵀX + λI` (λ = [`DAMP`] × the mean of its diagonal)
//! and `U` the upper Cholesky factor of `H⁻¹` (`H⁻¹ = UᵀU`), channel `p` of a
//! row `w` (in channel order, `w` already updated by the channels before it):
//!
//! ```text
//! q_p = Q(w_p);   e = (w_p − q_p) / U_pp;   w_r ← w_r − e · U_pr  for r > p
//! ```
//!
//! (the optimal update of OBQ for the remaining channels, in closed form).
//! Rows are independent (they share `U`), so they run in parallel; the update
//! is in f64. Group parameters: int4 takes each group's scale (and zero point)
//! from the group's *current* weights when its first channel is reached —
//! GPTQ's "static groups" are not needed because the channel order is the
//! natural one; int8 takes each row's scale from the row before any update.
//! The codes and scales are stored in the contract's formats unchanged
//! ([`QMatrix::from_codes`]): every kernel runs GPTQ weights as it runs RTN
//! ones.
//!
//! In [`crate::quant::awq::compress_with`], `Method::Gptq` is *AWQ's scales
//! followed by GPTQ's rounding* (the combination the AWQ paper reports):
//! the α search and the folds are AWQ's; the rounding of the scaled weight
//! `diag(s)·W` uses the Gram matrix of its scaled input,
//! `diag(1/s)·H·diag(1/s)`. Should GPTQ's output error on the calibration
//! rows come out above round to nearest's for a weight (it should not), that
//! weight keeps round to nearest; both errors are reported.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::quant::format::{int4_group_params, round_clamp};
use crate::quant::{QFormat, QMatrix};

/// Dampening added to the Gram matrix's diagonal, as a fraction of the
/// diagonal's mean (GPTQ's `percdamp`).
pub const DAMP: f64 = 0.01;

/// `U` (row-major `[k, k]`, upper triangular) with `UᵀU = (H + λI)⁻¹` for the
/// Gram matrix `h = XᵀX`; channels no calibration row excites (`H_pp = 0`)
/// get `H_pp = 1`, as in GPTQ, so that the matrix stays invertible.
pub fn inverse_factor(h: &[f64], k: usize) -> Result<Vec<f64>> {
    if h.len() != k * k || k == 0 {
        return Err(Error::Shape(format!("gptq: a Gram matrix of {} values for k = {k}", h.len())));
    }
    if h.iter().any(|v| !v.is_finite()) {
        return Err(Error::Invalid("gptq: the calibration Gram matrix holds a non-finite value".into()));
    }
    let mut a = h.to_vec();
    for p in 0..k {
        if a[p * k + p] == 0.0 {
            a[p * k + p] = 1.0;
        }
    }
    let mean = (0..k).map(|p| a[p * k + p]).sum::<f64>() / k as f64;
    for p in 0..k {
        a[p * k + p] += DAMP * mean;
    }
    // H = L·Lᵀ; H⁻¹ = L⁻ᵀ·L⁻¹; H⁻¹ = L₂·L₂ᵀ; U = L₂ᵀ.
    cholesky(&mut a, k)?;
    // Columns of L⁻¹ (lower triangular): L·x = e_c, x_i = 0 for i < c.
    let cols: Vec<Vec<f64>> = (0..k)
        .into_par_iter()
        .map(|c| {
            let mut x = vec![0.0f64; k];
            for i in c..k {
                let row = &a[i * k..i * k + i];
                let s: f64 = row[c..i].iter().zip(&x[c..i]).map(|(l, v)| l * v).sum();
                x[i] = (if i == c { 1.0 } else { 0.0 } - s) / a[i * k + i];
            }
            x
        })
        .collect();
    // (H⁻¹)_ab = Σ_{i ≥ max(a, b)} L⁻¹_ia · L⁻¹_ib.
    let rows: Vec<Vec<f64>> = (0..k)
        .into_par_iter()
        .map(|r| {
            (0..k)
                .map(|b| {
                    let lo = r.max(b);
                    cols[r][lo..].iter().zip(&cols[b][lo..]).map(|(u, v)| u * v).sum()
                })
                .collect()
        })
        .collect();
    let mut inv: Vec<f64> = rows.into_iter().flatten().collect();
    cholesky(&mut inv, k)?;
    // U = L₂ᵀ.
    let mut u = vec![0.0f64; k * k];
    for i in 0..k {
        for j in 0..=i {
            u[j * k + i] = inv[i * k + j];
        }
    }
    Ok(u)
}

/// In-place lower Cholesky factor of the symmetric positive definite `a`
/// (its strict upper triangle is zeroed).
fn cholesky(a: &mut [f64], k: usize) -> Result<()> {
    for j in 0..k {
        let (done, below) = a.split_at_mut((j + 1) * k);
        let rj = &mut done[j * k..];
        let d = rj[j] - rj[..j].iter().map(|v| v * v).sum::<f64>();
        if d.is_nan() || d <= 0.0 {
            return Err(Error::Invalid(format!(
                "gptq: the damped Gram matrix is not positive definite (pivot {j} of {k})"
            )));
        }
        let d = d.sqrt();
        rj[j] = d;
        rj[j + 1..].fill(0.0);
        let rj = &done[j * k..j * k + j];
        // Rows below j: a[i][j] = (a[i][j] − Σ_{p<j} a[i][p]·a[j][p]) / d.
        below.par_chunks_exact_mut(k).for_each(|ri| {
            let s: f64 = ri[..j].iter().zip(rj).map(|(x, y)| x * y).sum();
            ri[j] = (ri[j] - s) / d;
        });
    }
    Ok(())
}

/// The stored code and its dequantized value of `x` under one group's
/// parameters (the rounding of [`QMatrix::quantize`]).
fn code_of(x: f32, format: QFormat, s: f32, z: i32) -> (i32, f32) {
    match format {
        QFormat::Int8 => {
            let c = if s > 0.0 { round_clamp(x / s, -127, 127) } else { 0 };
            (c, s * c as f32)
        }
        QFormat::Int4 { asym, .. } => {
            let u = if s > 0.0 {
                if asym { round_clamp(x / s + z as f32, 0, 15) } else { round_clamp(x / s, -8, 7) + 8 }
            } else {
                z
            };
            (u, s * (u - z) as f32)
        }
        QFormat::Sparse24 { .. } => unreachable!("checked by gptq"),
    }
}

/// GPTQ's rounding of the `[n, k]` weight `t` (rows = outputs) to `format`
/// (int8 or int4), with `u` from [`inverse_factor`] of the input's Gram matrix.
pub fn quantize(u: &[f64], t: &[f32], n: usize, k: usize, format: QFormat) -> Result<QMatrix> {
    if matches!(format, QFormat::Sparse24 { .. }) {
        return Err(Error::Invalid("gptq rounds int8/int4 weights; 2:4 takes magnitude, wanda or sparsegpt".into()));
    }
    format.check_shape(n, k)?;
    if t.len() != n * k || u.len() != k * k {
        return Err(Error::Shape(format!("gptq: weight {} / factor {} for [{n}, {k}]", t.len(), u.len())));
    }
    let (group, asym) = match format {
        QFormat::Int4 { group, asym } => (group, asym),
        _ => (k, false),
    };
    let sw = format.scales_per_row(k);
    let per_row: Vec<(Vec<i32>, Vec<f32>, Vec<u8>)> = t
        .par_chunks_exact(k)
        .map(|row| {
            let mut w: Vec<f64> = row.iter().map(|&v| v as f64).collect();
            let mut codes = vec![0i32; k];
            let mut scales = Vec::with_capacity(sw);
            let mut zeros = Vec::new();
            let int8_scale = row.iter().fold(0.0f32, |a, &x| a.max(x.abs())) / 127.0;
            for g0 in (0..k).step_by(group) {
                let (s, z) = if format == QFormat::Int8 {
                    (int8_scale, 0)
                } else {
                    let cur: Vec<f32> = w[g0..g0 + group].iter().map(|&v| v as f32).collect();
                    int4_group_params(&cur, asym)
                };
                scales.push(s);
                if asym {
                    zeros.push(z as u8);
                }
                for p in g0..g0 + group {
                    let (c, deq) = code_of(w[p] as f32, format, s, z);
                    codes[p] = c;
                    let e = (w[p] - deq as f64) / u[p * k + p];
                    let up = &u[p * k + p + 1..(p + 1) * k];
                    w[p + 1..].iter_mut().zip(up).for_each(|(x, &f)| *x -= e * f);
                }
            }
            (codes, scales, zeros)
        })
        .collect();
    let mut codes = Vec::with_capacity(n * k);
    let mut scale = Vec::with_capacity(n * sw);
    let mut zero = Vec::new();
    for (c, s, z) in per_row {
        codes.extend(c);
        scale.extend(s);
        zero.extend(z);
    }
    QMatrix::from_codes(format, n, k, &codes, &scale, &zero)
}

/// SparseGPT's 2:4 pruning (Frantar & Alistarh 2023) of the `[n, k]` weight
/// `t` (2:4 or 2:4-int8), with `u` from [`inverse_factor`]: per row, each group
/// of four channels, when reached, keeps the two with the largest
/// `w_p² / U_pp²` (the OBS saliency of the *updated* weights; ties: the lower
/// position, as [`QMatrix::sparse24`]); then channel by channel the kept value
/// is rounded to f16 (what the format stores) or the pruned one set to 0, and
/// the difference is moved onto the channels not yet reached, exactly as
/// [`quantize`] does with rounding errors. 2:4-int8 quantizes the kept,
/// compensated values per row afterwards (round to nearest, no compensation
/// of that rounding).
pub fn prune24(u: &[f64], t: &[f32], n: usize, k: usize, format: QFormat) -> Result<QMatrix> {
    let QFormat::Sparse24 { .. } = format else {
        return Err(Error::Invalid(format!("sparsegpt prunes to 2:4, not {format}")));
    };
    format.check_shape(n, k)?;
    if t.len() != n * k || u.len() != k * k {
        return Err(Error::Shape(format!("sparsegpt: weight {} / factor {} for [{n}, {k}]", t.len(), u.len())));
    }
    let rows: Vec<(Vec<f32>, Vec<f32>)> = t
        .par_chunks_exact(k)
        .map(|row| {
            let mut w: Vec<f64> = row.iter().map(|&v| v as f64).collect();
            let mut vals = vec![0.0f32; k];
            let mut keep = vec![0.0f32; k];
            for g0 in (0..k).step_by(4) {
                let score = |p: usize| w[p] * w[p] / (u[p * k + p] * u[p * k + p]);
                let mut idx = [g0, g0 + 1, g0 + 2, g0 + 3];
                // Stable: ties keep the lower position.
                idx.sort_by(|&a, &b| score(b).total_cmp(&score(a)));
                keep[idx[0]] = 1.0;
                keep[idx[1]] = 1.0;
                for p in g0..g0 + 4 {
                    let q = if keep[p] > 0.0 { half::f16::from_f64(w[p]).to_f32() } else { 0.0 };
                    vals[p] = q;
                    let e = (w[p] - q as f64) / u[p * k + p];
                    let up = &u[p * k + p + 1..(p + 1) * k];
                    w[p + 1..].iter_mut().zip(up).for_each(|(x, &f)| *x -= e * f);
                }
            }
            (vals, keep)
        })
        .collect();
    let mut vals = Vec::with_capacity(n * k);
    let mut keep = Vec::with_capacity(n * k);
    for (v, m) in rows {
        vals.extend(v);
        keep.extend(m);
    }
    QMatrix::sparse24(&vals, &keep, n, k, format)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(rows: usize, k: usize, seed: u64) -> Vec<f32> {
        let mut st = seed;
        (0..rows * k)
            .map(|i| {
                st = st.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let r = ((st >> 33) as f32 / (1u64 << 31) as f32) - 0.5;
                // Correlated channels with a few large ones, as LayerNorm outputs have.
                r * if i % k < 3 { 8.0 } else { 1.0 } + 0.3 * ((i / k) as f32 * 0.37).sin()
            })
            .collect()
    }

    #[test]
    fn inverse_factor_times_its_transpose_inverts_the_damped_gram() {
        let k = 24;
        let x = sample(64, k, 3);
        let h = crate::quant::awq::gram(&x, k);
        let u = inverse_factor(&h, k).unwrap();
        let mean = (0..k).map(|p| h[p * k + p]).sum::<f64>() / k as f64;
        for i in 0..k {
            for j in 0..i {
                assert_eq!(u[i * k + j], 0.0, "U is upper triangular");
            }
        }
        // (UᵀU)(H + λI) = I.
        for a in 0..k {
            for b in 0..k {
                let v: f64 = (0..k)
                    .map(|c| {
                        let inv: f64 = (0..k).map(|r| u[r * k + a] * u[r * k + c]).sum();
                        inv * (h[c * k + b] + if c == b { DAMP * mean } else { 0.0 })
                    })
                    .sum();
                let want = if a == b { 1.0 } else { 0.0 };
                assert!((v - want).abs() < 1e-9, "({a}, {b}): {v}");
            }
        }
    }

    #[test]
    fn not_positive_definite_is_an_error() {
        let k = 2;
        // Negative diagonal: no damping makes it positive definite.
        let h = vec![-4.0, 0.0, 0.0, -4.0];
        assert!(inverse_factor(&h, k).is_err());
        assert!(inverse_factor(&[f64::NAN, 0.0, 0.0, 1.0], k).is_err());
    }
}
