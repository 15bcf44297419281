//! GELU (tanh form) forward, backward and fused bias+GELU on the host: the
//! row kernels of [`vmath`](super::vmath) (math and error bounds there), in
//! parallel over chunks of elements (or rows, for the bias form).

use rayon::prelude::*;

use super::{CpuBackend, rd, simd, vmath};
use crate::Tensor;
use crate::ops::BiasSpec;

type T = Tensor<CpuBackend>;

/// Elements per parallel task.
const CHUNK: usize = 8192;

pub(super) fn gelu(x: &T, y: &mut T) {
    let (x, v) = (rd(x), simd::simd());
    y.buf.produce(|o| {
        o.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(o, x)| vmath::gelu(v, x, None, o));
    });
}

pub(super) fn gelu_backward(x: &T, dy: &T, dx: &mut T) {
    let (x, dy, v) = (rd(x), rd(dy), simd::simd());
    dx.buf.produce(|o| {
        o.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK)))
            .for_each(|(o, (x, dy))| vmath::gelu_backward(v, x, dy, o));
    });
}

pub(super) fn bias_gelu(s: &BiasSpec, x: &T, bias: &T, y: &mut T) {
    let (x, bias, v) = (rd(x), rd(bias), simd::simd());
    if s.n == 0 {
        return;
    }
    let rows = (CHUNK / s.n).max(1) * s.n;
    y.buf.produce(|o| {
        o.par_chunks_mut(rows).zip(x.par_chunks(rows)).for_each(|(o, x)| {
            o.chunks_mut(s.n).zip(x.chunks(s.n)).for_each(|(o, x)| vmath::gelu(v, x, Some(&bias[..s.n]), o));
        })
    });
}
