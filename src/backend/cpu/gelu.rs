//! GELU (tanh form) forward, backward and fused bias+GELU on the host: the
//! row kernels of [`vmath`](super::vmath) (math and error bounds there), in
//! parallel over chunks of elements (or rows, for the bias form), f16/bf16
//! converted per chunk ([`chunked`]).

use super::{CpuBackend, chunked, rd, simd, vmath};
use crate::Tensor;
use crate::ops::BiasSpec;

type T = Tensor<CpuBackend>;

/// Elements per parallel task.
const CHUNK: usize = 8192;

pub(super) fn gelu(x: &T, y: &mut T) {
    let v = simd::simd();
    chunked(&mut y.buf, [&x.buf], CHUNK, false, |_, [x], o| vmath::gelu(v, x, None, o));
}

pub(super) fn gelu_backward(x: &T, dy: &T, dx: &mut T) {
    let v = simd::simd();
    chunked(&mut dx.buf, [&x.buf, &dy.buf], CHUNK, false, |_, [x, dy], o| vmath::gelu_backward(v, x, dy, o));
}

pub(super) fn bias_gelu(s: &BiasSpec, x: &T, bias: &T, y: &mut T) {
    let (bias, v) = (rd(bias), simd::simd());
    if s.n == 0 {
        return;
    }
    let rows = (CHUNK / s.n).max(1) * s.n;
    chunked(&mut y.buf, [&x.buf], rows, false, |_, [x], o| {
        o.chunks_mut(s.n).zip(x.chunks(s.n)).for_each(|(o, x)| vmath::gelu(v, x, Some(&bias[..s.n]), o));
    });
}
