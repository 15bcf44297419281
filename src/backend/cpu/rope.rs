//! Rotary embedding on the host (half-split convention, see `crate::ops::rope`).

use rayon::prelude::*;

use super::{CpuBackend, rd};
use crate::Tensor;
use crate::ops::RopeSpec;

type T = Tensor<CpuBackend>;

pub(super) fn rope(s: &RopeSpec, x: &T, cos: &T, sin: &T, y: &mut T) {
    let (x, cos, sin) = (rd(x), rd(cos), rd(sin));
    let (hd, half) = (s.head_dim, s.head_dim / 2);
    let sign = if s.inverse { -1.0 } else { 1.0 };
    y.buf.produce(|o| {
        // One chunk per (batch, token, head) vector.
        o.par_chunks_mut(hd).enumerate().for_each(|(v, o)| {
            let pos = s.pos_offset + (v / s.heads) % s.seq;
            let xv = &x[v * hd..(v + 1) * hd];
            for i in 0..half {
                let (c, sn) = (cos[pos * half + i], sign * sin[pos * half + i]);
                let (a, b) = (xv[i], xv[i + half]);
                o[i] = a * c - b * sn;
                o[i + half] = a * sn + b * c;
            }
        })
    });
}

#[cfg(test)]
mod tests {
    use crate::backend::cpu::CpuBackend;
    use crate::ops::{self, RopeTable};
    use crate::util::rng::Rng;
    use crate::{DType, Tensor};

    #[test]
    fn rope_backward_inverts_forward_and_preserves_norms() {
        let be = CpuBackend::new();
        let table = RopeTable::new(&be, 64, 8, 10000.0).unwrap();
        let x = Rng::new(5).normal_vec(2 * 5 * 3 * 8);
        let xt = Tensor::from_f32(&be, &x, &[2, 5, 3, 8], DType::F32).unwrap();
        let mut y = Tensor::empty(&be, &[2, 5, 3, 8], DType::F32).unwrap();
        let mut back = Tensor::empty(&be, &[2, 5, 3, 8], DType::F32).unwrap();
        ops::rope(&be, &xt, &table, 7, &mut y).unwrap();
        ops::rope_backward(&be, &y, &table, 7, &mut back).unwrap();
        let (yv, bv) = (y.to_f32_vec(&be).unwrap(), back.to_f32_vec(&be).unwrap());
        for (a, b) in x.iter().zip(&bv) {
            assert!((a - b).abs() < 1e-5);
        }
        let norm = |v: &[f32]| v.iter().map(|e| e * e).sum::<f32>();
        assert!((norm(&x) - norm(&yv)).abs() < 1e-3);
        assert!(x.iter().zip(&yv).any(|(a, b)| (a - b).abs() > 1e-2), "rope must rotate");
    }
}
