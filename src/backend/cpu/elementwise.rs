//! add, axpby, bias add and row sums on the host.

use rayon::prelude::*;

use super::{CpuBackend, rd};
use crate::Tensor;
use crate::ops::{AxpbySpec, BiasSpec, SumRowsSpec};

type T = Tensor<CpuBackend>;

pub(super) fn add(a: &T, b: &T, out: &mut T) {
    let (a, b) = (rd(a), rd(b));
    out.buf.produce(|o| o.par_iter_mut().enumerate().for_each(|(i, o)| *o = a[i] + b[i]));
}

pub(super) fn axpby(s: &AxpbySpec, x: &T, y: &mut T) {
    let x = rd(x);
    if s.beta == 0.0 {
        y.buf.produce(|o| o.par_iter_mut().zip(&x[..]).for_each(|(o, &x)| *o = s.alpha * x));
    } else {
        y.buf.update(|o| o.par_iter_mut().zip(&x[..]).for_each(|(o, &x)| *o = s.alpha * x + s.beta * *o));
    }
}

pub(super) fn bias_add(s: &BiasSpec, x: &mut T, bias: &T) {
    let bias = rd(bias);
    x.buf.update(|v| {
        v.par_chunks_mut(s.n).for_each(|row| row.iter_mut().zip(&bias[..]).for_each(|(e, b)| *e += b));
    });
}

/// Rows per parallel task of the column sums.
const ROWS: usize = 64;

/// `Σ_r x[r, j]` in f64 for each column j: per block of [`ROWS`] rows a
/// row-wise pass (contiguous, vectorised) into n partial sums, then the
/// blocks' partials added in block order — a fixed order, so the result does
/// not depend on the thread count or on scheduling.
fn column_sums(x: &[f32], n: usize) -> Vec<f64> {
    if n == 0 {
        return Vec::new();
    }
    let parts: Vec<Vec<f64>> = x
        .par_chunks(ROWS * n)
        .map(|blk| {
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
    let x = rd(x);
    let sums = column_sums(&x[..s.rows * s.n], s.n);
    if s.beta == 0.0 {
        out.buf.produce(|o| o.iter_mut().zip(&sums).for_each(|(o, &v)| *o = v as f32));
    } else {
        out.buf.update(|o| o.iter_mut().zip(&sums).for_each(|(o, &v)| *o = (v + s.beta as f64 * *o as f64) as f32));
    }
}
