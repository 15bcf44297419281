//! Rotary embedding on the host (half-split convention, see `crate::ops::rope`).

use super::{CpuBackend, chunked, rd};
use crate::Tensor;
use crate::ops::RopeSpec;

type T = Tensor<CpuBackend>;

/// Elements per parallel task (f16/bf16 converted per task, see [`chunked`]).
const CHUNK: usize = 8192;

pub(super) fn rope(s: &RopeSpec, x: &T, cos: &T, sin: &T, y: &mut T) {
    let (cos, sin) = (rd(cos), rd(sin));
    let (hd, half) = (s.head_dim, s.head_dim / 2);
    if hd == 0 {
        return;
    }
    let sign = if s.inverse { -1.0 } else { 1.0 };
    // Tasks of whole (batch, token, head) vectors.
    chunked(&mut y.buf, [&x.buf], (CHUNK / hd).max(1) * hd, false, |first, [x], o| {
        for (i, (o, xv)) in o.chunks_mut(hd).zip(x.chunks(hd)).enumerate() {
            let pos = s.pos_offset + ((first / hd + i) / s.heads) % s.seq;
            // Equal-length slices, so the loop below vectorises.
            let (c, sn) = (&cos[pos * half..(pos + 1) * half], &sin[pos * half..(pos + 1) * half]);
            let (xa, xb) = xv[..2 * half].split_at(half);
            let (oa, ob) = o[..2 * half].split_at_mut(half);
            for i in 0..half {
                let (c, sn) = (c[i], sign * sn[i]);
                let (a, b) = (xa[i], xb[i]);
                oa[i] = a * c - b * sn;
                ob[i] = a * sn + b * c;
            }
        }
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
