//! The wgpu backend at its buffer limits, and `sum_rows` split over rows.
//!
//! wgpu caps one storage binding at `max_storage_buffer_binding_size` (128 MiB
//! on lavapipe and under WebGPU's default limits, 2³¹−1 bytes on most
//! hardware). A tensor past it must be a clean error naming the size and the
//! limit, before anything is created, leaving the pending batch of recorded
//! kernels intact — also for half-precision outputs, which kernels write
//! through an f32 staging buffer twice their size.
//!
//! Like the conformance suite: "skipped" without an adapter, unless
//! `DYNSPARSE_REQUIRE_WGPU=1`.
#![cfg(feature = "wgpu")]

mod common;

use dynsparse::backend::cpu::CpuBackend;
use dynsparse::backend::wgpu::{AdapterPick, WgpuBackend};
use dynsparse::{Backend, DType, Error, Tensor, ops};
use std::sync::OnceLock;

fn gpu() -> Option<&'static WgpuBackend> {
    static GPU: OnceLock<Result<WgpuBackend, String>> = OnceLock::new();
    match GPU.get_or_init(|| {
        WgpuBackend::new(&AdapterPick::from_env().unwrap_or(AdapterPick::Any)).map_err(|e| e.to_string())
    }) {
        Ok(g) => Some(g),
        Err(why) => {
            common::skip("wgpu", why);
            None
        }
    }
}

fn max_binding(g: &WgpuBackend) -> usize {
    let l = g.limits();
    l.max_storage_buffer_binding_size.min(l.max_buffer_size) as usize
}

#[test]
fn a_half_precision_output_whose_f32_staging_passes_the_limit_is_a_clean_error_and_keeps_the_batch() {
    let Some(g) = gpu() else { return };
    let limit = max_binding(g);
    // The bf16 tensor itself fits (half the limit and a bit); its f32 staging does not.
    let n = limit / 4 + 1024;
    let mut small = Tensor::from_f32(g, &[1.0, 2.0, 3.0], &[3], DType::F32).unwrap();
    // Recorded, not yet submitted: the failure below must not discard it.
    ops::fill(g, &mut small, 7.0).unwrap();
    let mut big = Tensor::empty(g, &[n], DType::BF16).unwrap();
    let before = g.memory().allocated;
    let e = ops::fill(g, &mut big, 1.0).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::Device(_)), "{e:?}");
    assert!(msg.contains(&(n * 4).to_string()) && msg.contains(&limit.to_string()), "names size and limit: {msg}");
    assert_eq!(g.memory().allocated, before, "nothing allocated for the failed launch");
    assert_eq!(small.to_f32_vec(g).unwrap(), vec![7.0; 3], "the pending batch ran");
    // The backend still works after the error.
    let mut ok = Tensor::empty(g, &[1000], DType::BF16).unwrap();
    ops::fill(g, &mut ok, 0.5).unwrap();
    assert_eq!(ok.to_f32_vec(g).unwrap(), vec![0.5; 1000]);
}

#[test]
fn a_tensor_just_over_the_binding_limit_is_a_clean_error_and_one_at_it_works() {
    let Some(g) = gpu() else { return };
    let limit = max_binding(g);
    let Err(e) = Tensor::empty(g, &[limit / 4 + 1], DType::F32) else { panic!("one element past the limit must fail") };
    let msg = e.to_string();
    assert!(msg.contains(&(limit + 4).to_string()) && msg.contains(&limit.to_string()), "{msg}");
    // Exactly at the limit: allocated (the pool's rounding must not push it past), filled, read back.
    let n = limit / 4;
    let mut t = Tensor::empty(g, &[n], DType::F32).unwrap();
    ops::fill(g, &mut t, 3.0).unwrap();
    let v = t.to_f32_vec(g).unwrap();
    assert_eq!(v.len(), n);
    assert!(v[0] == 3.0 && v[n / 2] == 3.0 && v[n - 1] == 3.0);
}

fn sum_rows_on<B: Backend>(be: &B, x: &[f32], o: &[f32], rows: usize, n: usize, dt: DType) -> Vec<f32> {
    let xt = Tensor::from_f32(be, x, &[rows, n], dt).unwrap();
    let mut out = Tensor::from_f32(be, o, &[n], dt).unwrap();
    ops::sum_rows(be, &xt, &mut out, 0.5).unwrap();
    out.to_f32_vec(be).unwrap()
}

#[test]
fn sum_rows_over_many_row_chunks_matches_the_cpu() {
    let Some(g) = gpu() else { return };
    let cpu = CpuBackend::new();
    // 5000 rows: 71 rows per chunk, 71 chunks; 37 columns (not a workgroup multiple).
    let (rows, n) = (5000, 37);
    let x: Vec<f32> = (0..rows * n).map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 250.0).collect();
    let o0: Vec<f32> = (0..n).map(|j| j as f32 * 0.25 - 3.0).collect();
    for dt in DType::FLOATS {
        let tol = if dt == DType::F32 { 1e-5 } else { 1e-2 };
        let want = sum_rows_on(&cpu, &x, &o0, rows, n, dt);
        let got = sum_rows_on(g, &x, &o0, rows, n, dt);
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1.0);
        for (j, (w, gv)) in want.iter().zip(&got).enumerate() {
            assert!((w - gv).abs() <= tol * scale, "{dt} column {j}: cpu {w}, wgpu {gv}");
        }
    }
}
