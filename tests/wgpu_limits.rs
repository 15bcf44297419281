//! The wgpu backend at its buffer limits, and `sum_rows` split over rows.
//!
//! wgpu caps one storage binding at `max_storage_buffer_binding_size` (128 MiB
//! on lavapipe and under WebGPU's default limits, 2³¹−1 bytes on most
//! hardware). A tensor past it must be a clean error naming the size and the
//! limit, before anything is created, leaving the pending batch of recorded
//! kernels intact — also for half-precision outputs, which kernels write
//! through an f32 staging buffer twice their size.
//!
//! A training step whose logits (or indexer scores) pass the limit runs in
//! row chunks instead, on a device opened with a lowered binding limit so the
//! case stays small.
//!
//! Like the conformance suite: "skipped" without an adapter, unless
//! `DYNSPARSE_REQUIRE_WGPU=1`.
#![cfg(feature = "wgpu")]

mod common;

use dynsparse::backend::cpu::CpuBackend;
use dynsparse::backend::wgpu::{AdapterPick, WgpuBackend};
use dynsparse::data::synthetic::{SyntheticConfig, generate};
use dynsparse::model::{AttentionMode, Model, ModelConfig, Workspace};
use dynsparse::train::{LrSchedule, MemoryReport, TrainConfig, Trainer};
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

/// One training step (forward, backward, AdamW) of a small model on `be`:
/// the loss and the parameters after the update.
fn one_step<B: Backend>(be: &B, cfg: ModelConfig, seq: usize, warmup_frac: f64) -> (f64, f64, Vec<Vec<f32>>) {
    let data = generate(5, 20_000, SyntheticConfig::default());
    let tc = TrainConfig {
        steps: 2,
        batch: 1,
        seq,
        accum: 1,
        precision: DType::F32,
        lr: LrSchedule { lr: 1e-3, min_lr: 1e-4, warmup_steps: 1, total_steps: 2 },
        beta1: 0.9,
        beta2: 0.95,
        weight_decay: 0.1,
        grad_clip: 1.0,
        warmup_frac,
        ramp_frac: 0.0,
        kl_every: 1,
        seed: 3,
    };
    let model = Model::new(be, cfg, DType::F32, 7).unwrap();
    let mut tr = Trainer::new(be, model, tc, &mut MemoryReport::default()).unwrap();
    let st = tr.train_step(be, &data).unwrap();
    assert!(!st.skipped);
    (st.loss, st.indexer_kl, tr.master_values(be).unwrap())
}

/// A device whose largest binding is 4 bytes short of a `[256, 256]` f32
/// tensor: the step's logits (256 rows of a 256-token vocabulary) and the
/// indexer's `[1, 256, 256]` training scores pass it, so the LM head runs in
/// two row chunks and the indexer in two tiles of query rows (255 + 1), and
/// the step (dense warm-up with the indexer's KL, and sparse) trains like the CPU's.
#[test]
fn a_training_step_whose_logits_and_indexer_scores_pass_the_binding_limit_runs_in_pieces_and_matches_the_cpu() {
    let Some(_) = gpu() else { return };
    let seq = 256;
    let limit = (seq * 256 * 4 - 4) as u64;
    let g = WgpuBackend::with_max_binding(&AdapterPick::from_env().unwrap_or(AdapterPick::Any), limit).unwrap();
    assert_eq!(g.max_binding_bytes(), limit);
    // Unchunked, these logits are past the limit: a clean error.
    let e = Tensor::empty(&g, &[seq, 256], DType::F32).unwrap_err().to_string();
    assert!(e.contains(&limit.to_string()), "{e}");
    let cfg = ModelConfig {
        n_layers: 1,
        n_heads: 2,
        n_kv_heads: 1,
        d_model: 32,
        vocab: 256,
        context: seq,
        mlp_ratio: 2,
        rope_theta: 10000.0,
        attention: AttentionMode::Sparse { block: 32, keep_blocks: 3, index_heads: 2, index_dim: 8 },
    };
    let e = Tensor::empty(&g, &[1, seq, seq], DType::F32).unwrap_err().to_string();
    assert!(e.contains(&limit.to_string()), "{e}");
    let ws = Workspace::new(&g, &cfg, DType::F32, 1, seq).unwrap();
    assert_eq!((ws.lm_chunk_rows(), ws.indexer_tile_rows()), (seq - 1, Some(seq - 1)));
    drop(ws);
    for warm in [0.5, 0.0] {
        let t0 = std::time::Instant::now();
        let (loss, kl, params) = one_step(&g, cfg, seq, warm);
        eprintln!("warm-up {warm}: chunked step on {}: {:.2} s", g.device_name(), t0.elapsed().as_secs_f64());
        let (want_loss, want_kl, want) = one_step(&CpuBackend::new(), cfg, seq, warm);
        // The KL is small (the fresh indexer is near the attention): compared absolutely.
        let ok = loss.is_finite() && (loss - want_loss).abs() <= 1e-4 * want_loss && (kl - want_kl).abs() <= 1e-6;
        assert!(ok, "loss {loss} KL {kl}, cpu {want_loss} {want_kl}");
        assert!(kl > 0.0, "the indexer's KL was trained");
        let flat = |v: &[Vec<f32>]| v.iter().flatten().copied().collect::<Vec<_>>();
        common::assert_close("parameters after the chunked step", &flat(&params), &flat(&want), DType::F32);
    }
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
