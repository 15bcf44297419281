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

/// Column sums in f64, then `+ beta·out`, rounded once.
pub(super) fn sum_rows(s: &SumRowsSpec, x: &T, out: &mut T) {
    let x = rd(x);
    let sums: Vec<f64> = (0..s.n).into_par_iter().map(|j| (0..s.rows).map(|r| x[r * s.n + j] as f64).sum()).collect();
    if s.beta == 0.0 {
        out.buf.produce(|o| o.iter_mut().zip(&sums).for_each(|(o, &v)| *o = v as f32));
    } else {
        out.buf.update(|o| o.iter_mut().zip(&sums).for_each(|(o, &v)| *o = (v + s.beta as f64 * *o as f64) as f32));
    }
}
