//! Row softmax forward/backward on the host (`exp` and the row max from
//! [`vmath`](super::vmath)); masked (causal) columns are 0 and never read.

use rayon::prelude::*;

use super::{CpuBackend, rd, simd, vmath};
use crate::Tensor;
use crate::ops::SoftmaxSpec;

type T = Tensor<CpuBackend>;

pub(super) fn forward(s: &SoftmaxSpec, x: &T, y: &mut T) {
    let (x, v) = (rd(x), simd::simd());
    y.buf.produce(|o| {
        o.par_chunks_mut(s.n).enumerate().for_each(|(r, o)| {
            let vis = s.visible(r);
            o[..vis].copy_from_slice(&x[r * s.n..r * s.n + vis]);
            let max = vmath::max(v, &o[..vis]);
            let sum = vmath::exp_shift_sum(v, &mut o[..vis], max);
            o[..vis].iter_mut().for_each(|v| *v /= sum);
            o[vis..].fill(0.0);
        })
    });
}

pub(super) fn backward(s: &SoftmaxSpec, y: &T, dy: &T, dx: &mut T) {
    let (y, dy) = (rd(y), rd(dy));
    dx.buf.produce(|o| {
        o.par_chunks_mut(s.n).enumerate().for_each(|(r, o)| {
            let vis = s.visible(r);
            let (yr, dyr) = (&y[r * s.n..], &dy[r * s.n..]);
            let dot: f32 = (0..vis).map(|j| yr[j] * dyr[j]).sum();
            for j in 0..vis {
                o[j] = yr[j] * (dyr[j] - dot);
            }
            o[vis..].fill(0.0);
        })
    });
}

#[cfg(test)]
mod tests {
    use crate::backend::cpu::CpuBackend;
    use crate::{DType, Tensor, ops};

    #[test]
    fn causal_softmax_masks_future_keys_and_ignores_their_values() {
        let be = CpuBackend::new();
        // t = 2 queries over s = 3 keys: row 0 sees keys 0..=1, row 1 sees all.
        let x = [0.0, 0.0, f32::NAN, 1.0, 2.0, 3.0];
        let xt = Tensor::from_f32(&be, &x, &[2, 3], DType::F32).unwrap();
        let mut y = Tensor::from_f32(&be, &[f32::NAN; 6], &[2, 3], DType::F32).unwrap();
        ops::softmax(&be, &xt, &mut y, true).unwrap();
        let y = y.to_f32_vec(&be).unwrap();
        let e: Vec<f64> = [1.0f64, 2.0, 3.0].iter().map(|v| v.exp()).collect();
        let z: f64 = e.iter().sum();
        assert_eq!(&y[..3], &[0.5, 0.5, 0.0]);
        for j in 0..3 {
            assert!((y[3 + j] as f64 - e[j] / z).abs() < 1e-6);
        }
    }
}
