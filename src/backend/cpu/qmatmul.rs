//! `y = x · Wᵀ` with a quantized weight: the reference of every backend's
//! quantized kernels (rule: [`crate::quant::format`]). Per output channel the
//! weight row is dequantized once, then every row of x takes its dot product
//! with it, summed in f32 over `p` in increasing order — one fixed order per
//! element whatever `m` is, so the product is batch invariant.

use super::{CpuBackend, rd};
use crate::Tensor;
use crate::ops::{QMatmulSpec, QWeight};
use crate::quant::QView;

pub(super) fn qmatmul(s: &QMatmulSpec, x: &Tensor<CpuBackend>, w: &QWeight<CpuBackend>, y: &mut Tensor<CpuBackend>) {
    use rayon::prelude::*;
    let (m, n, k) = (s.m, s.n, s.k);
    let xv = rd(x);
    let scale = w.scale.as_ref().map(rd);
    let view = QView {
        format: w.format,
        n,
        k,
        q: w.q.buf.u32s(),
        scale: scale.as_deref().unwrap_or(&[]),
        zero: w.zero.as_ref().map_or(&[][..], |t| t.buf.u32s()),
        meta: w.meta.as_ref().map_or(&[][..], |t| t.buf.u32s()),
    };
    // Columns of y per task: one dequantized weight row each, reused by all m rows.
    const COLS: usize = 16;
    let cols: Vec<(usize, Vec<f32>)> = (0..n)
        .step_by(COLS)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|j0| {
            let w_ = COLS.min(n - j0);
            let mut wr = vec![0.0f32; k];
            let mut out = vec![0.0f32; m * w_];
            for jj in 0..w_ {
                view.dequantize_row(j0 + jj, &mut wr);
                for i in 0..m {
                    let xr = &xv[i * k..(i + 1) * k];
                    let mut acc = 0.0f32;
                    for p in 0..k {
                        acc += xr[p] * wr[p];
                    }
                    out[i * w_ + jj] = acc;
                }
            }
            (j0, out)
        })
        .collect();
    y.buf.produce(|yv| {
        for (j0, out) in cols {
            let w_ = COLS.min(n - j0);
            for i in 0..m {
                yv[i * n + j0..i * n + j0 + w_].copy_from_slice(&out[i * w_..(i + 1) * w_]);
            }
        }
    });
}
