//! Fused softmax + cross-entropy forward/backward on the host.

use rayon::prelude::*;

use super::{CpuBackend, chunked, f32_part, simd, vmath};
use crate::Tensor;
use crate::ops::CrossEntropySpec;

type T = Tensor<CpuBackend>;

/// Logits per parallel task of the backward (f16/bf16 converted per task).
const CHUNK: usize = 8192;

pub(super) fn forward(s: &CrossEntropySpec, logits: &T, targets: &T, losses: &mut T) {
    let (gx, tg, v) = (logits.buf.lock(), targets.buf.u32s(), simd::simd());
    let x = gx.slice();
    losses.buf.produce(|o| {
        // f16/bf16 rows are widened one at a time into the task's scratch.
        o.par_iter_mut().enumerate().for_each_init(Vec::new, |scratch, (r, o)| {
            *o = if s.is_ignored(tg[r]) {
                0.0
            } else {
                let row = f32_part(&x, r * s.vocab, s.vocab, scratch);
                let max = vmath::max(v, row);
                max + vmath::sum_exp_shift(v, row, max).ln() - row[tg[r] as usize]
            }
        })
    });
}

pub(super) fn backward(s: &CrossEntropySpec, logits: &T, targets: &T, dlogits: &mut T) {
    let (tg, v) = (targets.buf.u32s(), simd::simd());
    if s.vocab == 0 {
        return;
    }
    let rows = (CHUNK / s.vocab).max(1) * s.vocab;
    chunked(&mut dlogits.buf, [&logits.buf], rows, false, |first, [x], out| {
        for (i, (o, xr)) in out.chunks_mut(s.vocab).zip(x.chunks(s.vocab)).enumerate() {
            let r = first / s.vocab + i;
            if s.is_ignored(tg[r]) {
                o.fill(0.0);
                continue;
            }
            // o = e^(x - max) in place, then grad_scale·(o/Σo − onehot).
            o.copy_from_slice(xr);
            let max = vmath::max(v, o);
            let sum = vmath::exp_shift_sum(v, o, max);
            o.iter_mut().for_each(|p| *p = s.grad_scale * (*p / sum));
            o[tg[r] as usize] -= s.grad_scale;
        }
    });
}

#[cfg(test)]
mod tests {
    use crate::backend::cpu::CpuBackend;
    use crate::util::rng::Rng;
    use crate::{DType, Tensor, ops};

    #[test]
    fn cross_entropy_gradient_matches_finite_differences_and_ignores_rows() {
        let be = CpuBackend::new();
        let (rows, v) = (4, 7);
        let x = Rng::new(2).normal_vec(rows * v);
        let targets = [3u32, 9999, 0, 6]; // row 1 is out of range: ignored
        let tt = Tensor::from_u32(&be, &targets, &[rows]).unwrap();
        let loss_of = |x: &[f32]| -> Vec<f64> {
            let xt = Tensor::from_f32(&be, x, &[rows, v], DType::F32).unwrap();
            let mut l = Tensor::empty(&be, &[rows], DType::F32).unwrap();
            ops::cross_entropy(&be, &xt, &tt, &mut l, u32::MAX).unwrap();
            l.to_f32_vec(&be).unwrap().iter().map(|&e| e as f64).collect()
        };
        let l = loss_of(&x);
        assert_eq!(l[1], 0.0);
        let row0: Vec<f64> = x[..v].iter().map(|&e| e as f64).collect();
        let lse = row0.iter().map(|e| e.exp()).sum::<f64>().ln();
        assert!((l[0] - (lse - row0[3])).abs() < 1e-5);

        let xt = Tensor::from_f32(&be, &x, &[rows, v], DType::F32).unwrap();
        let mut d = Tensor::empty(&be, &[rows, v], DType::F32).unwrap();
        ops::cross_entropy_backward(&be, &xt, &tt, &mut d, u32::MAX, 0.25).unwrap();
        let d = d.to_f32_vec(&be).unwrap();
        let h = 1e-2f32;
        for i in 0..rows * v {
            let (mut p, mut m) = (x.clone(), x.clone());
            p[i] += h;
            m[i] -= h;
            let fd = 0.25 * (loss_of(&p).iter().sum::<f64>() - loss_of(&m).iter().sum::<f64>()) / (2.0 * h as f64);
            assert!((d[i] as f64 - fd).abs() < 2e-3, "d[{i}] = {} vs {fd}", d[i]);
        }
    }
}
