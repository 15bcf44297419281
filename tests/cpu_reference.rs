//! The CPU backend (the suite's oracle) against naive f64 loops, for the ops
//! its unit tests do not already pin down.

use dynsparse::backend::cpu::CpuBackend;
use dynsparse::ops;
use dynsparse::util::rng::Rng;
use dynsparse::{DType, Tensor};

fn close(got: &[f32], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((*g as f64 - w).abs() <= tol * (1.0 + w.abs()), "{what}[{i}]: {g} vs {w}");
    }
}

#[test]
fn softmax_backward_matches_f64_jacobian_product() {
    let be = CpuBackend::new();
    let (t, s) = (5, 8);
    let mut rng = Rng::new(1);
    let (x, dy) = (rng.normal_vec(t * s), rng.normal_vec(t * s));
    let xt = Tensor::from_f32(&be, &x, &[t, s], DType::F32).unwrap();
    let dyt = Tensor::from_f32(&be, &dy, &[t, s], DType::F32).unwrap();
    let mut y = Tensor::empty(&be, &[t, s], DType::F32).unwrap();
    let mut dx = Tensor::empty(&be, &[t, s], DType::F32).unwrap();
    ops::softmax(&be, &xt, &mut y, true).unwrap();
    ops::softmax_backward(&be, &y, &dyt, &mut dx, true).unwrap();
    let mut want = vec![0.0f64; t * s];
    for r in 0..t {
        let vis = r + 1 + (s - t);
        let row: Vec<f64> = x[r * s..r * s + vis].iter().map(|&v| v as f64).collect();
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = row.iter().map(|v| (v - m).exp()).sum();
        let p: Vec<f64> = row.iter().map(|v| (v - m).exp() / z).collect();
        for i in 0..vis {
            // dx_i = Σ_j dy_j ∂p_j/∂x_i = p_i (dy_i - Σ_j p_j dy_j)
            let dot: f64 = (0..vis).map(|j| p[j] * dy[r * s + j] as f64).sum();
            want[r * s + i] = p[i] * (dy[r * s + i] as f64 - dot);
        }
    }
    close(&dx.to_f32_vec(&be).unwrap(), &want, 1e-5, "dx");
}

#[test]
fn embedding_scatter_add_matches_f64_loops() {
    let be = CpuBackend::new();
    let ids = [3u32, 1, 3, 9, 0];
    let (vocab, dim) = (4, 3);
    let dout = Rng::new(2).normal_vec(ids.len() * dim);
    let idt = Tensor::from_u32(&be, &ids, &[5]).unwrap();
    let dot = Tensor::from_f32(&be, &dout, &[5, dim], DType::F32).unwrap();
    let mut dtab = Tensor::from_f32(&be, &vec![1.0; vocab * dim], &[vocab, dim], DType::F32).unwrap();
    ops::embedding_backward(&be, &idt, &dot, &mut dtab).unwrap();
    let mut want = vec![1.0f64; vocab * dim];
    for (i, &id) in ids.iter().enumerate() {
        if (id as usize) < vocab {
            for d in 0..dim {
                want[id as usize * dim + d] += dout[i * dim + d] as f64;
            }
        }
    }
    close(&dtab.to_f32_vec(&be).unwrap(), &want, 1e-6, "dtable");
    let table = Tensor::from_f32(&be, &(0..12).map(|v| v as f32).collect::<Vec<_>>(), &[4, 3], DType::F32).unwrap();
    let mut out = Tensor::empty(&be, &[5, 3], DType::F32).unwrap();
    ops::embedding(&be, &idt, &table, &mut out).unwrap();
    let want = [9., 10., 11., 3., 4., 5., 9., 10., 11., 0., 0., 0., 0., 1., 2.];
    assert_eq!(out.to_f32_vec(&be).unwrap(), want, "id 9 is out of range: zero row");
}

#[test]
fn sums_axpby_cast_and_bias_gelu_match_f64() {
    let be = CpuBackend::new();
    let (rows, n) = (37, 11);
    let mut rng = Rng::new(3);
    let (x, bias, acc) = (rng.normal_vec(rows * n), rng.normal_vec(n), rng.normal_vec(n));
    let xt = Tensor::from_f32(&be, &x, &[rows, n], DType::F32).unwrap();
    let mut out = Tensor::from_f32(&be, &acc, &[n], DType::F32).unwrap();
    ops::sum_rows(&be, &xt, &mut out, 0.5).unwrap();
    let want: Vec<f64> =
        (0..n).map(|j| (0..rows).map(|r| x[r * n + j] as f64).sum::<f64>() + 0.5 * acc[j] as f64).collect();
    close(&out.to_f32_vec(&be).unwrap(), &want, 1e-6, "sum_rows");

    let mut ss = Tensor::empty(&be, &[1], DType::F32).unwrap();
    ops::sum_squares(&be, &xt, &mut ss).unwrap();
    close(&ss.to_f32_vec(&be).unwrap(), &[x.iter().map(|&v| (v as f64).powi(2)).sum()], 1e-6, "sum_squares");

    let mut y16 = Tensor::from_f32(&be, &vec![2.0; rows * n], &[rows, n], DType::F16).unwrap();
    ops::axpby(&be, 0.5, &xt, -1.0, &mut y16).unwrap();
    let want: Vec<f64> = x.iter().map(|&v| 0.5 * v as f64 - 2.0).collect();
    close(&y16.to_f32_vec(&be).unwrap(), &want, 1e-3, "axpby into f16");

    let mut c = Tensor::empty(&be, &[rows, n], DType::BF16).unwrap();
    ops::cast(&be, &xt, &mut c).unwrap();
    let want: Vec<f64> = x.iter().map(|&v| half::bf16::from_f32(v).to_f32() as f64).collect();
    close(&c.to_f32_vec(&be).unwrap(), &want, 0.0, "cast to bf16 rounds to nearest even");

    let bt = Tensor::from_f32(&be, &bias, &[n], DType::F32).unwrap();
    let mut y = Tensor::empty(&be, &[rows, n], DType::F32).unwrap();
    ops::bias_gelu(&be, &xt, &bt, &mut y).unwrap();
    let g = |v: f64| 0.5 * v * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v.powi(3))).tanh());
    let want: Vec<f64> = (0..rows * n).map(|i| g(x[i] as f64 + bias[i % n] as f64)).collect();
    close(&y.to_f32_vec(&be).unwrap(), &want, 1e-5, "bias_gelu");
}

#[test]
fn memory_counters_track_live_and_peak_bytes() {
    use dynsparse::Backend;
    let be = CpuBackend::new();
    let a = Tensor::zeros(&be, &[256], DType::F32).unwrap();
    {
        let _b = Tensor::zeros(&be, &[512], DType::F16).unwrap();
        assert_eq!(be.memory().allocated, 1024 + 1024);
    }
    assert_eq!(be.memory().allocated, 1024);
    assert_eq!(be.memory().peak, 2048);
    drop(a);
    assert_eq!(be.memory().allocated, 0);
}
