//! add, axpby, bias add and row sums on the host.

use rayon::prelude::*;

use super::{CpuBackend, CpuBuffer, chunked, rd};
use crate::Tensor;
use crate::ops::{AxpbySpec, BiasSpec, ScaleSpec, SumRowsSpec};

type T = Tensor<CpuBackend>;

/// Elements per parallel task (f16/bf16 converted per task, see [`chunked`]).
const CHUNK: usize = 8192;

pub(super) fn add(a: &T, b: &T, out: &mut T) {
    chunked(&mut out.buf, [&a.buf, &b.buf], CHUNK, false, |_, [a, b], o| {
        o.iter_mut().zip(a.iter().zip(b)).for_each(|(o, (a, b))| *o = a + b)
    });
}

pub(super) fn axpby(s: &AxpbySpec, x: &T, y: &mut T) {
    if s.beta == 0.0 {
        chunked(&mut y.buf, [&x.buf], CHUNK, false, |_, [x], o| {
            o.iter_mut().zip(x).for_each(|(o, &x)| *o = s.alpha * x)
        });
    } else {
        chunked(&mut y.buf, [&x.buf], CHUNK, true, |_, [x], o| {
            o.iter_mut().zip(x).for_each(|(o, &x)| *o = s.alpha * x + s.beta * *o)
        });
    }
}

pub(super) fn bias_add(s: &BiasSpec, x: &mut T, bias: &T) {
    let bias = rd(bias);
    if s.n == 0 {
        return;
    }
    let rows = (CHUNK / s.n).max(1) * s.n;
    chunked(&mut x.buf, [], rows, true, |_, [], v| {
        v.chunks_mut(s.n).for_each(|row| row.iter_mut().zip(&bias[..]).for_each(|(e, b)| *e += b))
    });
}

pub(super) fn scale(s: &ScaleSpec, x: &mut T) {
    chunked(&mut x.buf, [], CHUNK, true, |_, [], v| v.iter_mut().for_each(|e| *e *= s.s));
}

/// Rows per parallel task of the column sums.
const ROWS: usize = 64;

/// `Σ_r x[r, j]` in f64 for each column j: per block of [`ROWS`] rows a
/// row-wise pass (contiguous, vectorised) into n partial sums, then the
/// blocks' partials added in block order — a fixed order, so the result does
/// not depend on the thread count or on scheduling.
fn column_sums(x: &CpuBuffer, rows: usize, n: usize) -> Vec<f64> {
    if n == 0 {
        return Vec::new();
    }
    let parts: Vec<Vec<f64>> = (0..rows.div_ceil(ROWS))
        .into_par_iter()
        .map(|b| {
            let r0 = b * ROWS;
            let blk = x.f32_range(r0 * n, ROWS.min(rows - r0) * n);
            let mut acc = vec![0.0f64; n];
            for row in blk.chunks_exact(n) {
                acc.iter_mut().zip(row).for_each(|(a, &v)| *a += v as f64);
            }
            acc
        })
        .collect();
    let mut sums = vec![0.0f64; n];
    for p in &parts {
        sums.iter_mut().zip(p).for_each(|(s, &v)| *s += v);
    }
    sums
}

/// Column sums in f64, then `+ beta·out`, rounded once.
pub(super) fn sum_rows(s: &SumRowsSpec, x: &T, out: &mut T) {
    let sums = column_sums(&x.buf, s.rows, s.n);
    if s.beta == 0.0 {
        out.buf.produce(|o| o.iter_mut().zip(&sums).for_each(|(o, &v)| *o = v as f32));
    } else {
        out.buf.update(|o| o.iter_mut().zip(&sums).for_each(|(o, &v)| *o = (v + s.beta as f64 * *o as f64) as f32));
    }
}

#[cfg(test)]
mod tests {
    use crate::backend::cpu::CpuBackend;
    use crate::util::rng::Rng;
    use crate::{DType, Tensor, ops};

    /// The row and elementwise kernels convert f16/bf16 per chunk instead of
    /// whole tensors; the arithmetic per element is unchanged, so a
    /// half-precision op must give exactly the f32 op on the same (rounded)
    /// inputs, rounded once. Shapes span several chunks with a ragged tail.
    #[test]
    fn half_precision_ops_equal_the_f32_op_rounded_once() {
        let be = CpuBackend::new();
        let mut rng = Rng::new(5);
        let (rows, n) = (131, 129);
        let len = rows * n;
        for dt in [DType::F16, DType::BF16] {
            // Inputs rounded to dt, then held both as dt and as f32.
            let round = |v: Vec<f32>| Tensor::from_f32(&be, &v, &[v.len()], dt).unwrap().to_f32_vec(&be).unwrap();
            let (x, y, bias) = (round(rng.normal_vec(len)), round(rng.normal_vec(len)), round(rng.normal_vec(n)));
            let t = |v: &[f32], shape: &[usize], d: DType| Tensor::from_f32(&be, v, shape, d).unwrap();
            let same = |what: &str, half: &Tensor<CpuBackend>, full: &Tensor<CpuBackend>| {
                let want = round(full.to_f32_vec(&be).unwrap());
                let got = half.to_f32_vec(&be).unwrap();
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(g.to_bits() == w.to_bits(), "{dt} {what}[{i}]: {g} vs {w}");
                }
            };
            let pair = |v: &[f32], shape: &[usize]| (t(v, shape, dt), t(v, shape, DType::F32));
            let (xh, xf) = pair(&x, &[rows, n]);
            let (yh, yf) = pair(&y, &[rows, n]);
            let (bh, bf) = pair(&bias, &[n]);

            let (mut oh, mut of) = pair(&vec![f32::NAN; len], &[rows, n]);
            ops::add(&be, &xh, &yh, &mut oh).unwrap();
            ops::add(&be, &xf, &yf, &mut of).unwrap();
            same("add", &oh, &of);

            let (mut oh, mut of) = pair(&y, &[rows, n]);
            ops::axpby(&be, 0.75, &xh, -1.5, &mut oh).unwrap();
            ops::axpby(&be, 0.75, &xf, -1.5, &mut of).unwrap();
            same("axpby", &oh, &of);
            let (mut sh, mut sf) = pair(&y, &[rows, n]);
            ops::scale(&be, &mut sh, 0.3).unwrap();
            ops::scale(&be, &mut sf, 0.3).unwrap();
            same("scale", &sh, &sf);

            let (mut oh, mut of) = pair(&x, &[rows, n]);
            ops::bias_add(&be, &mut oh, &bh).unwrap();
            ops::bias_add(&be, &mut of, &bf).unwrap();
            same("bias_add", &oh, &of);

            let (mut oh, mut of) = pair(&vec![f32::NAN; len], &[rows, n]);
            ops::gelu(&be, &xh, &mut oh).unwrap();
            ops::gelu(&be, &xf, &mut of).unwrap();
            same("gelu", &oh, &of);
            ops::gelu_backward(&be, &xh, &yh, &mut oh).unwrap();
            ops::gelu_backward(&be, &xf, &yf, &mut of).unwrap();
            same("gelu_backward", &oh, &of);
            ops::bias_gelu(&be, &xh, &bh, &mut oh).unwrap();
            ops::bias_gelu(&be, &xf, &bf, &mut of).unwrap();
            same("bias_gelu", &oh, &of);

            let (mut sh, mut sf) = pair(&bias, &[n]);
            ops::sum_rows(&be, &xh, &mut sh, 1.0).unwrap();
            ops::sum_rows(&be, &xf, &mut sf, 1.0).unwrap();
            same("sum_rows", &sh, &sf);

            let (gh, gf) = pair(&round(bias.iter().map(|b| 1.0 + 0.25 * b).collect()), &[n]);
            let (mut lh, mut lf) = pair(&vec![f32::NAN; len], &[rows, n]);
            let stats = || (t(&vec![0.0; rows], &[rows], DType::F32), t(&vec![0.0; rows], &[rows], DType::F32));
            let ((mut mh, mut rh), (mut mf, mut rf)) = (stats(), stats());
            ops::layernorm(&be, &xh, &gh, &bh, &mut lh, &mut mh, &mut rh, 1e-5).unwrap();
            ops::layernorm(&be, &xf, &gf, &bf, &mut lf, &mut mf, &mut rf, 1e-5).unwrap();
            same("layernorm", &lh, &lf);
            let (mut dxh, mut dxf) = pair(&vec![f32::NAN; len], &[rows, n]);
            let ((mut dgh, mut dgf), (mut dbh, mut dbf)) = (pair(&bias, &[n]), pair(&bias, &[n]));
            ops::layernorm_backward(&be, &yh, &xh, &gh, &mh, &rh, &mut dxh, &mut dgh, &mut dbh).unwrap();
            ops::layernorm_backward(&be, &yf, &xf, &gf, &mf, &rf, &mut dxf, &mut dgf, &mut dbf).unwrap();
            same("layernorm dx", &dxh, &dxf);
            same("layernorm dgamma", &dgh, &dgf);
            same("layernorm dbeta", &dbh, &dbf);
        }
    }
}
