//! AdamW on f32 master weights (math in `crate::ops::adamw`).

use rayon::prelude::*;

use super::CpuBackend;
use crate::Tensor;
use crate::ops::AdamWSpec;

type T = Tensor<CpuBackend>;

pub(super) fn step(s: &AdamWSpec, params: &mut T, grads: &T, m: &mut T, v: &mut T, copy: Option<&mut T>) {
    let g = grads.buf.f32s();
    // All four are F32 (checked), so these updates run in place.
    m.buf.update(|m| {
        v.buf.update(|v| {
            params.buf.update(|p| {
                p.par_iter_mut().zip(m.par_iter_mut()).zip(v.par_iter_mut()).zip(&g[..]).for_each(
                    |(((p, m), v), &g)| {
                        let g = g * s.grad_scale;
                        *m = s.beta1 * *m + (1.0 - s.beta1) * g;
                        *v = s.beta2 * *v + (1.0 - s.beta2) * g * g;
                        let update = (*m * s.bc1) / ((*v * s.bc2).sqrt() + s.eps) + s.weight_decay * *p;
                        *p -= s.lr * update;
                    },
                )
            })
        })
    });
    if let Some(c) = copy {
        c.buf.store(&params.buf.f32s());
    }
}

#[cfg(test)]
mod tests {
    use crate::backend::cpu::CpuBackend;
    use crate::ops::{self, adamw::AdamWConfig};
    use crate::{DType, Tensor};

    #[test]
    fn adamw_first_step_moves_each_weight_by_lr_against_its_gradient_sign() {
        let be = CpuBackend::new();
        let t = |v: &[f32]| Tensor::from_f32(&be, v, &[3], DType::F32).unwrap();
        let (mut p, g, mut m, mut v) = (t(&[1.0, 2.0, 3.0]), t(&[4.0, -8.0, 0.0]), t(&[0.0; 3]), t(&[0.0; 3]));
        let mut copy = Tensor::empty(&be, &[3], DType::BF16).unwrap();
        let cfg = AdamWConfig { lr: 0.1, eps: 1e-12, ..Default::default() };
        ops::adamw(&be, &cfg, 1, 0.5, &mut p, &g, &mut m, &mut v, Some(&mut copy)).unwrap();
        let p = p.to_f32_vec(&be).unwrap();
        // Bias correction makes the first update ±lr·sign(g) exactly.
        assert!((p[0] - 0.9).abs() < 1e-6 && (p[1] - 2.1).abs() < 1e-6 && p[2] == 3.0, "{p:?}");
        let m = m.to_f32_vec(&be).unwrap();
        assert!((m[0] - 0.2).abs() < 1e-6 && (m[1] + 0.4).abs() < 1e-6 && m[2] == 0.0, "{m:?}");
        assert_eq!(copy.to_f32_vec(&be).unwrap(), vec![0.898_437_5, 2.093_75, 3.0]);
    }
}
