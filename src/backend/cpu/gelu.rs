//! GELU (tanh form) forward, backward and fused bias+GELU on the host.
//!
//! `0.5·(1 + tanh(u)) = σ(2u)`, so `gelu(x) = x / (1 + e^{-2u})` with
//! `u = √(2/π)·(x + 0.044715·x³)`, and `gelu'(x) = s + x·2s(1−s)·u'` with
//! `s = σ(2u)`: one [`vmath::exp`](super::vmath::exp) per element and no
//! cancellation near 0, in loops over chunks that vectorise (the scalar
//! `tanhf` took a third of a dense training step).

use rayon::prelude::*;

use super::vmath::exp;
use super::{CpuBackend, rd};
use crate::Tensor;
use crate::ops::BiasSpec;

type T = Tensor<CpuBackend>;

/// Elements per parallel task.
const CHUNK: usize = 4096;
const S: f32 = 0.797_884_6; // √(2/π)
const C: f32 = 0.044715;

#[inline(always)]
fn sigma_2u(x: f32) -> f32 {
    1.0 / (1.0 + exp(-2.0 * S * (x + C * x * x * x)))
}

#[inline(always)]
fn gelu1(x: f32) -> f32 {
    x * sigma_2u(x)
}

#[inline(always)]
fn grad1(x: f32) -> f32 {
    let s = sigma_2u(x);
    s + x * 2.0 * s * (1.0 - s) * S * (1.0 + 3.0 * C * x * x)
}

pub(super) fn gelu(x: &T, y: &mut T) {
    let x = rd(x);
    y.buf.produce(|o| {
        o.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(o, x)| {
            o.iter_mut().zip(x).for_each(|(o, &x)| *o = gelu1(x));
        })
    });
}

pub(super) fn gelu_backward(x: &T, dy: &T, dx: &mut T) {
    let (x, dy) = (rd(x), rd(dy));
    dx.buf.produce(|o| {
        o.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK))).for_each(|(o, (x, dy))| {
            o.iter_mut().zip(x.iter().zip(dy)).for_each(|(o, (&x, &g))| *o = g * grad1(x));
        })
    });
}

pub(super) fn bias_gelu(s: &BiasSpec, x: &T, bias: &T, y: &mut T) {
    let (x, bias) = (rd(x), rd(bias));
    y.buf.produce(|o| {
        o.par_chunks_mut(s.n).zip(x.par_chunks(s.n)).for_each(|(o, x)| {
            o.iter_mut().zip(x.iter().zip(&bias[..s.n])).for_each(|(o, (&x, &b))| *o = gelu1(x + b));
        })
    });
}

#[cfg(test)]
mod tests {
    use super::{gelu1 as gelu_f32, grad1 as gelu_grad_f32};

    #[test]
    fn gelu_grad_matches_central_differences_in_f64() {
        let g = |x: f64| 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh());
        for i in -40..=40 {
            let x = i as f64 * 0.1;
            let h = 1e-5;
            let fd = (g(x + h) - g(x - h)) / (2.0 * h);
            assert!((gelu_grad_f32(x as f32) as f64 - fd).abs() < 1e-5, "x={x}");
            assert!((gelu_f32(x as f32) as f64 - g(x)).abs() < 1e-5, "x={x}");
        }
    }
}
