//! GELU (tanh form) forward, backward and fused bias+GELU on the host.

use rayon::prelude::*;

use super::{CpuBackend, rd};
use crate::Tensor;
use crate::ops::BiasSpec;
use crate::ops::gelu::{gelu_f32, gelu_grad_f32};

type T = Tensor<CpuBackend>;

pub(super) fn gelu(x: &T, y: &mut T) {
    let x = rd(x);
    y.buf.produce(|o| o.par_iter_mut().zip(&x[..]).for_each(|(o, &x)| *o = gelu_f32(x)));
}

pub(super) fn gelu_backward(x: &T, dy: &T, dx: &mut T) {
    let (x, dy) = (rd(x), rd(dy));
    dx.buf.produce(|o| o.par_iter_mut().enumerate().for_each(|(i, o)| *o = dy[i] * gelu_grad_f32(x[i])));
}

pub(super) fn bias_gelu(s: &BiasSpec, x: &T, bias: &T, y: &mut T) {
    let (x, bias) = (rd(x), rd(bias));
    y.buf.produce(|o| o.par_iter_mut().enumerate().for_each(|(i, o)| *o = gelu_f32(x[i] + bias[i % s.n])));
}

#[cfg(test)]
mod tests {
    use crate::ops::gelu::{gelu_f32, gelu_grad_f32};

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
