//! LayerNorm forward/backward on the host (math in `crate::ops::layernorm`).

use rayon::prelude::*;

use super::{CpuBackend, chunked, rd};
use crate::Tensor;
use crate::ops::LayerNormSpec;

type T = Tensor<CpuBackend>;

/// Rows per parallel task: about [`CHUNK_ELEMS`] elements (f16/bf16 rows are
/// converted per task, see [`chunked`]).
fn rows_per_task(n: usize) -> usize {
    (CHUNK_ELEMS / n.max(1)).max(1)
}

const CHUNK_ELEMS: usize = 8192;

pub(super) fn forward(s: &LayerNormSpec, x: &T, gamma: &T, beta: &T, y: &mut T, mean: &mut T, rstd: &mut T) {
    let (g, b) = (rd(gamma), rd(beta));
    let n = s.n;
    if n == 0 {
        return;
    }
    let per = rows_per_task(n);
    let stats: Vec<(f32, f32)> = (0..s.rows.div_ceil(per))
        .into_par_iter()
        .flat_map_iter(|t| {
            let r0 = t * per;
            let rows = per.min(s.rows - r0);
            let xs = x.buf.f32_range(r0 * n, rows * n);
            xs.chunks(n)
                .map(|row| {
                    let mu = row.iter().sum::<f32>() / n as f32;
                    let var = row.iter().map(|v| (v - mu) * (v - mu)).sum::<f32>() / n as f32;
                    (mu, 1.0 / (var + s.eps).sqrt())
                })
                .collect::<Vec<_>>()
        })
        .collect();
    chunked(&mut y.buf, [&x.buf], per * n, false, |first, [xs], o| {
        let r0 = first / n;
        o.chunks_mut(n).zip(xs.chunks(n)).zip(&stats[r0..]).for_each(|((o, row), &(mu, rs))| {
            for j in 0..n {
                o[j] = (row[j] - mu) * rs * g[j] + b[j];
            }
        })
    });
    mean.buf.produce(|o| o.iter_mut().zip(&stats).for_each(|(o, s)| *o = s.0));
    rstd.buf.produce(|o| o.iter_mut().zip(&stats).for_each(|(o, s)| *o = s.1));
}

#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    s: &LayerNormSpec,
    dy: &T,
    x: &T,
    gamma: &T,
    mean: &T,
    rstd: &T,
    dx: &mut T,
    dgamma: &mut T,
    dbeta: &mut T,
) {
    let (g, mu, rs) = (rd(gamma), rd(mean), rd(rstd));
    let n = s.n;
    if n == 0 {
        return;
    }
    chunked(&mut dx.buf, [&x.buf, &dy.buf], rows_per_task(n) * n, false, |first, [xs, dys], o| {
        let r0 = first / n;
        o.chunks_mut(n).enumerate().for_each(|(i, o)| {
            let (xr, dyr) = (&xs[i * n..(i + 1) * n], &dys[i * n..(i + 1) * n]);
            let (m, rstd) = (mu[r0 + i], rs[r0 + i]);
            let mut mean_g = 0.0f32;
            let mut mean_gx = 0.0f32;
            for j in 0..n {
                let xhat = (xr[j] - m) * rstd;
                let gj = dyr[j] * g[j];
                mean_g += gj;
                mean_gx += gj * xhat;
            }
            mean_g /= n as f32;
            mean_gx /= n as f32;
            for j in 0..n {
                let xhat = (xr[j] - m) * rstd;
                o[j] = rstd * (dyr[j] * g[j] - mean_g - xhat * mean_gx);
            }
        })
    });
    // dγ_j = Σ_r dy[r,j]·x̂[r,j], dβ_j = Σ_r dy[r,j], in f64: per block of
    // ROWS rows a contiguous row-wise pass into 2n partials, then the blocks
    // added in order (fixed order: deterministic for any thread count).
    const ROWS: usize = 64;
    let parts: Vec<Vec<f64>> = (0..s.rows.div_ceil(ROWS))
        .into_par_iter()
        .map(|blk| {
            let mut acc = vec![0.0f64; 2 * n];
            let (ag, ab) = acc.split_at_mut(n);
            let (r0, r1) = (blk * ROWS, ((blk + 1) * ROWS).min(s.rows));
            let (xs, dys) = (x.buf.f32_range(r0 * n, (r1 - r0) * n), dy.buf.f32_range(r0 * n, (r1 - r0) * n));
            for r in r0..r1 {
                let (xr, dyr, m, rstd) =
                    (&xs[(r - r0) * n..(r - r0 + 1) * n], &dys[(r - r0) * n..(r - r0 + 1) * n], mu[r], rs[r]);
                for j in 0..n {
                    let xhat = (xr[j] - m) * rstd;
                    ag[j] += dyr[j] as f64 * xhat as f64;
                    ab[j] += dyr[j] as f64;
                }
            }
            acc
        })
        .collect();
    let mut sums = vec![0.0f64; 2 * n];
    for p in &parts {
        sums.iter_mut().zip(p).for_each(|(s, &v)| *s += v);
    }
    let (sg, sb) = sums.split_at(n);
    dgamma.buf.update(|o| o.iter_mut().zip(sg).for_each(|(o, s)| *o = (*o as f64 + s) as f32));
    dbeta.buf.update(|o| o.iter_mut().zip(sb).for_each(|(o, s)| *o = (*o as f64 + s) as f32));
}

#[cfg(test)]
mod tests {
    use crate::backend::cpu::CpuBackend;
    use crate::util::rng::Rng;
    use crate::{DType, Tensor, ops};

    /// LayerNorm of one row in f64, for finite differences.
    fn ln_f64(x: &[f64], g: &[f64], b: &[f64], eps: f64) -> Vec<f64> {
        let n = x.len() as f64;
        let mu = x.iter().sum::<f64>() / n;
        let var = x.iter().map(|v| (v - mu).powi(2)).sum::<f64>() / n;
        let rs = 1.0 / (var + eps).sqrt();
        x.iter().enumerate().map(|(j, v)| (v - mu) * rs * g[j] + b[j]).collect()
    }

    #[test]
    fn layernorm_forward_and_backward_match_f64_finite_differences() {
        let be = CpuBackend::new();
        let mut rng = Rng::new(11);
        let (rows, n) = (3, 13);
        let x = rng.normal_vec(rows * n);
        let g = rng.normal_vec(n);
        let b = rng.normal_vec(n);
        let dy = rng.normal_vec(rows * n);
        let t = |v: &[f32], s: &[usize]| Tensor::from_f32(&be, v, s, DType::F32).unwrap();
        let (xt, gt, bt, dyt) = (t(&x, &[rows, n]), t(&g, &[n]), t(&b, &[n]), t(&dy, &[rows, n]));
        let mut y = t(&vec![0.0; rows * n], &[rows, n]);
        let mut mean = t(&[0.0; 3], &[rows]);
        let mut rstd = t(&[0.0; 3], &[rows]);
        ops::layernorm(&be, &xt, &gt, &bt, &mut y, &mut mean, &mut rstd, 1e-5).unwrap();
        let mut dx = t(&vec![f32::NAN; rows * n], &[rows, n]);
        let mut dg = t(&vec![0.5; n], &[n]);
        let mut db = t(&vec![0.0; n], &[n]);
        ops::layernorm_backward(&be, &dyt, &xt, &gt, &mean, &rstd, &mut dx, &mut dg, &mut db).unwrap();
        let (y, dx, dg, db) = (
            y.to_f32_vec(&be).unwrap(),
            dx.to_f32_vec(&be).unwrap(),
            dg.to_f32_vec(&be).unwrap(),
            db.to_f32_vec(&be).unwrap(),
        );

        let f64v = |v: &[f32]| v.iter().map(|&e| e as f64).collect::<Vec<_>>();
        let (g64, b64) = (f64v(&g), f64v(&b));
        // L = Σ dy·y; check y, then dL/dx, dL/dgamma, dL/dbeta by central differences.
        let loss = |x: &[f64], g: &[f64], b: &[f64]| -> f64 {
            (0..rows)
                .map(|r| {
                    ln_f64(&x[r * n..(r + 1) * n], g, b, 1e-5)
                        .iter()
                        .zip(&dy[r * n..])
                        .map(|(y, d)| y * *d as f64)
                        .sum::<f64>()
                })
                .sum()
        };
        let x64 = f64v(&x);
        for r in 0..rows {
            let want = ln_f64(&x64[r * n..(r + 1) * n], &g64, &b64, 1e-5);
            for j in 0..n {
                assert!((y[r * n + j] as f64 - want[j]).abs() < 1e-5);
            }
        }
        let h = 1e-6;
        for i in 0..rows * n {
            let (mut p, mut m) = (x64.clone(), x64.clone());
            p[i] += h;
            m[i] -= h;
            let fd = (loss(&p, &g64, &b64) - loss(&m, &g64, &b64)) / (2.0 * h);
            assert!((dx[i] as f64 - fd).abs() < 1e-4 * (1.0 + fd.abs()), "dx[{i}] {} vs {fd}", dx[i]);
        }
        for j in 0..n {
            let (mut p, mut m) = (g64.clone(), g64.clone());
            p[j] += h;
            m[j] -= h;
            let fd = (loss(&x64, &p, &b64) - loss(&x64, &m, &b64)) / (2.0 * h) + 0.5;
            assert!((dg[j] as f64 - fd).abs() < 1e-4 * (1.0 + fd.abs()), "dgamma[{j}] accumulates");
            let (mut p, mut m) = (b64.clone(), b64.clone());
            p[j] += h;
            m[j] -= h;
            let fd = (loss(&x64, &g64, &p) - loss(&x64, &g64, &m)) / (2.0 * h);
            assert!((db[j] as f64 - fd).abs() < 1e-4 * (1.0 + fd.abs()));
        }
    }
}
