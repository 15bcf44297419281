//! The training step on the CPU backend: loss scaling skips and growth,
//! gradient accumulation, checkpoint round trips and exact resumption.

use std::collections::BTreeMap;

use dynsparse::backend::cpu::CpuBackend;
use dynsparse::data::synthetic::{SyntheticConfig, generate};
use dynsparse::model::{AttentionMode, Model, ModelConfig};
use dynsparse::train::{LrSchedule, MemoryReport, TrainConfig, Trainer, checkpoint};
use dynsparse::{DType, Error};

fn small_model(sparse: bool) -> ModelConfig {
    ModelConfig {
        n_layers: 2,
        n_heads: 2,
        n_kv_heads: 1,
        d_model: 32,
        vocab: 256,
        context: 64,
        mlp_ratio: 2,
        rope_theta: 10000.0,
        attention: if sparse {
            AttentionMode::Sparse { block: 8, keep_blocks: 3, index_heads: 2, index_dim: 8 }
        } else {
            AttentionMode::Dense
        },
    }
}

fn small_train(precision: DType, batch: usize, accum: usize, steps: u64) -> TrainConfig {
    TrainConfig {
        steps,
        batch,
        seq: 48,
        accum,
        precision,
        lr: LrSchedule { lr: 3e-3, min_lr: 3e-4, warmup_steps: 2, total_steps: steps },
        beta1: 0.9,
        beta2: 0.95,
        weight_decay: 0.1,
        grad_clip: 1.0,
        warmup_frac: 0.2,
        ramp_frac: 0.3,
        kl_every: 1,
        seed: 9,
    }
}

fn trainer(be: &CpuBackend, m: ModelConfig, t: TrainConfig) -> Trainer<CpuBackend> {
    let model = Model::new(be, m, t.precision, 1).unwrap();
    Trainer::new(be, model, t, &mut MemoryReport::default()).unwrap()
}

#[test]
fn injected_inf_skips_the_step_halves_the_scale_and_training_continues() {
    let be = CpuBackend::new();
    let data = generate(1, 20_000, SyntheticConfig::default());
    let mut tr = trainer(&be, small_model(true), small_train(DType::F16, 2, 1, 20));
    tr.scaler.growth_interval = 3;
    tr.inject_inf_at = vec![1];
    let s0 = tr.train_step(&be, &data).unwrap();
    assert!(!s0.skipped && s0.loss_scale == 65536.0);
    let before = (tr.master_values(&be).unwrap(), tr.moments(&be).unwrap());
    let s1 = tr.train_step(&be, &data).unwrap();
    assert!(s1.skipped, "an inf gradient skips the step");
    assert_eq!(tr.scaler.scale, 32768.0, "and halves the scale");
    assert_eq!((tr.master_values(&be).unwrap(), tr.moments(&be).unwrap()), before, "weights and moments unchanged");
    for _ in 0..3 {
        assert!(!tr.train_step(&be, &data).unwrap().skipped);
    }
    assert_eq!(tr.scaler.scale, 65536.0, "three clean steps (the growth interval) double it again");
    assert_ne!(tr.master_values(&be).unwrap(), before.0, "training went on");
}

#[test]
fn accumulating_micro_batches_equals_one_larger_batch() {
    let be = CpuBackend::new();
    let data = generate(2, 20_000, SyntheticConfig::default());
    for precision in [DType::F32, DType::BF16] {
        let mut a = trainer(&be, small_model(false), small_train(precision, 4, 1, 10));
        let mut b = trainer(&be, small_model(false), small_train(precision, 1, 4, 10));
        let (sa, sb) = (a.train_step(&be, &data).unwrap(), b.train_step(&be, &data).unwrap());
        assert!((sa.loss - sb.loss).abs() < 1e-5 * sa.loss.abs(), "{precision}: loss {} vs {}", sa.loss, sb.loss);
        let (pa, pb) = (a.master_values(&be).unwrap(), b.master_values(&be).unwrap());
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for (x, y) in pa.iter().flatten().zip(pb.iter().flatten()) {
            num += (*x as f64 - *y as f64).powi(2);
            den += (*x as f64).powi(2);
        }
        let tol = if precision == DType::F32 { 1e-6 } else { 1e-3 };
        assert!((num / den).sqrt() < tol, "{precision}: parameters differ by {:.2e}", (num / den).sqrt());
    }
}

#[test]
fn resume_from_a_checkpoint_reproduces_the_uninterrupted_losses_exactly() {
    let be = CpuBackend::new();
    let data = generate(3, 20_000, SyntheticConfig::default());
    for precision in [DType::F32, DType::F16] {
        // f16 also trains the indexer KL on every 3rd query row: its phase must resume too.
        let kl_every = if precision == DType::F16 { 3 } else { 1 };
        let (m, t) = (small_model(true), TrainConfig { kl_every, ..small_train(precision, 2, 2, 8) });
        let mut full = trainer(&be, m, t);
        let losses: Vec<f64> = (0..8).map(|_| full.train_step(&be, &data).unwrap().loss).collect();

        let mut first = trainer(&be, m, t);
        for _ in 0..4 {
            first.train_step(&be, &data).unwrap();
        }
        let dir = std::env::temp_dir().join(format!("dynsparse-ckpt-{}-{precision}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.safetensors");
        let (mm, vv) = first.moments(&be).unwrap();
        let st = checkpoint::TrainState {
            params: first.master_values(&be).unwrap(),
            m: mm,
            v: vv,
            scaler: first.scaler,
            step: first.step,
            batcher_rng: first.batcher.rng.state(),
        };
        let mut extra = BTreeMap::new();
        extra.insert("data".to_string(), "synthetic".to_string());
        checkpoint::save(&path, &m, &t, &st, &extra).unwrap();
        let ck = checkpoint::load(&path).unwrap();
        assert_eq!((ck.model, ck.train, &ck.state, &ck.extra), (m, t, &st, &extra));
        let mut resumed = trainer(&be, ck.model, ck.train);
        resumed.restore(&be, &ck.state).unwrap();
        let rest: Vec<f64> = (0..4).map(|_| resumed.train_step(&be, &data).unwrap().loss).collect();
        assert_eq!(rest, losses[4..], "{precision}: resumed losses must match bit for bit");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn truncated_and_foreign_checkpoints_are_clear_errors() {
    let dir = std::env::temp_dir().join(format!("dynsparse-bad-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let be = CpuBackend::new();
    let (m, t) = (small_model(false), small_train(DType::F32, 1, 1, 2));
    let tr = trainer(&be, m, t);
    let (mm, vv) = tr.moments(&be).unwrap();
    let st = checkpoint::TrainState {
        params: tr.master_values(&be).unwrap(),
        m: mm,
        v: vv,
        scaler: tr.scaler,
        step: 0,
        batcher_rng: tr.batcher.rng.state(),
    };
    let good = dir.join("good.safetensors");
    checkpoint::save(&good, &m, &t, &st, &BTreeMap::new()).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let cut = dir.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = checkpoint::load(&cut).unwrap_err();
    assert!(matches!(e, Error::Format(_)) && e.to_string().contains("truncated"), "{e}");
    let foreign = dir.join("foreign.safetensors");
    let view = safetensors::tensor::TensorView::new(safetensors::tensor::Dtype::F32, vec![1], &[0u8; 4]).unwrap();
    std::fs::write(&foreign, safetensors::tensor::serialize([("w", view)], None).unwrap()).unwrap();
    let e = checkpoint::load(&foreign).unwrap_err().to_string();
    assert!(e.contains("not a dynsparse training checkpoint"), "{e}");
    let e = checkpoint::load(&dir.join("missing.safetensors")).unwrap_err().to_string();
    assert!(e.contains("missing.safetensors"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_few_steps_lower_the_loss_on_the_synthetic_corpus() {
    let be = CpuBackend::new();
    let data = generate(4, 50_000, SyntheticConfig::default());
    let mut tr = trainer(&be, small_model(true), small_train(DType::F32, 4, 1, 40));
    let losses: Vec<f64> = (0..40).map(|_| tr.train_step(&be, &data).unwrap().loss).collect();
    let (head, tail) = (losses[..5].iter().sum::<f64>() / 5.0, losses[35..].iter().sum::<f64>() / 5.0);
    assert!(tail < head - 1.0, "loss {head:.3} → {tail:.3}");
}

#[test]
fn a_non_finite_loss_in_f32_or_bf16_stops_training_with_the_step() {
    let be = CpuBackend::new();
    let data = generate(7, 20_000, SyntheticConfig::default());
    for precision in [DType::F32, DType::BF16] {
        let mut tr = trainer(&be, small_model(false), small_train(precision, 2, 1, 10));
        tr.train_step(&be, &data).unwrap();
        // Overflowed weights, as a too-large learning rate leaves them.
        let (m, v) = tr.moments(&be).unwrap();
        let mut params = tr.master_values(&be).unwrap();
        params[0].iter_mut().for_each(|x| *x = f32::INFINITY);
        let st = checkpoint::TrainState {
            params,
            m,
            v,
            scaler: tr.scaler,
            step: tr.step,
            batcher_rng: tr.batcher.rng.state(),
        };
        tr.restore(&be, &st).unwrap();
        let e = tr.train_step(&be, &data).unwrap_err();
        assert!(matches!(e, Error::NonFinite(_)), "{e}");
        let m = e.to_string();
        assert!(m.contains("step 1") && m.contains(&format!("in {precision}")) && m.contains("NaN"), "{m}");
        assert_eq!(tr.step, 1, "the failed step is not counted");
    }
}

#[test]
fn f16_stops_after_more_than_the_allowed_skipped_steps_in_a_row() {
    let be = CpuBackend::new();
    let data = generate(8, 20_000, SyntheticConfig::default());
    let mut tr = trainer(&be, small_model(false), small_train(DType::F16, 2, 1, 20));
    tr.max_skipped_in_a_row = 3;
    // Two skips, a clean step (the counter restarts), then skips until the limit is passed.
    tr.inject_inf_at = vec![0, 1, 3, 4, 5, 6, 7];
    for _ in 0..6 {
        tr.train_step(&be, &data).unwrap();
    }
    assert_eq!(tr.skipped_in_a_row, 3, "steps 3, 4, 5 skipped");
    let e = tr.train_step(&be, &data).unwrap_err().to_string();
    assert!(e.contains("step 6") && e.contains("4 steps in a row") && e.contains("f16"), "{e}");
}

#[test]
fn flat_buffers_with_views_train_bit_identically_to_per_tensor_buffers() {
    let be = CpuBackend::new();
    let data = generate(4, 20_000, SyntheticConfig::default());
    let cases = [(DType::F32, false, 1.0), (DType::F32, true, 0.0), (DType::BF16, true, 1.0), (DType::F16, false, 1.0)];
    for (precision, sparse, clip) in cases {
        let mut t = small_train(precision, 2, 2, 6);
        t.grad_clip = clip;
        let mut flat = trainer(&be, small_model(sparse), t);
        let model = Model::new(&be, small_model(sparse), precision, 1).unwrap();
        let mut each = Trainer::new_per_tensor(&be, model, t, &mut MemoryReport::default()).unwrap();
        for step in 0..6 {
            let (a, b) = (flat.train_step(&be, &data).unwrap(), each.train_step(&be, &data).unwrap());
            let what = format!("{precision} sparse {sparse} clip {clip} step {step}");
            assert_eq!(a.loss.to_bits(), b.loss.to_bits(), "{what}: loss {} vs {}", a.loss, b.loss);
            assert_eq!(a.skipped, b.skipped, "{what}");
            assert!(
                (a.grad_norm - b.grad_norm).abs() <= 1e-6 * b.grad_norm.abs(),
                "{what}: norm {} vs {}",
                a.grad_norm,
                b.grad_norm
            );
        }
        let what = format!("{precision} sparse {sparse} clip {clip}");
        assert_eq!(flat.master_values(&be).unwrap(), each.master_values(&be).unwrap(), "{what}: weights");
        assert_eq!(flat.moments(&be).unwrap(), each.moments(&be).unwrap(), "{what}: moments");
        assert_eq!(flat.model.values(&be).unwrap(), each.model.values(&be).unwrap(), "{what}: working weights");
    }
}
