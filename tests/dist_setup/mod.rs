//! The tiny model, training config, corpus and run comparison shared by the
//! data-parallel tests (tests/dist.rs: in-process ranks; tests/multiprocess.rs:
//! MPI processes), so both compare world 2 against world 1 on the same job.

use dynsparse::DType;
use dynsparse::data::Corpus;
use dynsparse::data::synthetic::{SyntheticConfig, generate};
use dynsparse::model::{AttentionMode, ModelConfig};
use dynsparse::train::{LrSchedule, StepStats, TrainConfig};

pub const STEPS: u64 = 20;

pub fn model_cfg() -> ModelConfig {
    ModelConfig {
        n_layers: 2,
        n_heads: 2,
        n_kv_heads: 1,
        d_model: 32,
        vocab: 256,
        context: 64,
        mlp_ratio: 2,
        rope_theta: 10000.0,
        attention: AttentionMode::Sparse { block: 8, keep_blocks: 3, index_heads: 2, index_dim: 8 },
    }
}

pub fn train_cfg(precision: DType, batch: usize, accum: usize) -> TrainConfig {
    TrainConfig {
        steps: STEPS,
        batch,
        seq: 32,
        accum,
        precision,
        lr: LrSchedule { lr: 3e-3, min_lr: 3e-4, warmup_steps: 2, total_steps: STEPS },
        beta1: 0.9,
        beta2: 0.95,
        weight_decay: 0.1,
        grad_clip: 1.0,
        warmup_frac: 0.2,
        ramp_frac: 0.3,
        kl_every: 1,
        seed: 5,
    }
}

pub fn corpus() -> Corpus {
    generate(11, 20_000, SyntheticConfig::default())
}

/// Relative L2 distance of two weight sets.
pub fn rel(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
        num += (*x as f64 - *y as f64).powi(2);
        den += (*x as f64).powi(2);
    }
    (num / den).sqrt()
}

/// One run (its step statistics and final weights) against every rank of
/// another: ranks hold identical weights; skips, loss scales and tokens are
/// equal step by step; losses and weights agree within `tol` relative.
pub fn assert_same_run(one: (&[StepStats], &[Vec<f32>]), many: &[(&[StepStats], &[Vec<f32>])], tol: f64, what: &str) {
    for (r, (stats, weights)) in many.iter().enumerate() {
        assert_eq!(*weights, many[0].1, "{what}: rank {r} weights differ from rank 0's");
        assert_eq!(stats.len(), one.0.len(), "{what}");
        for (a, b) in one.0.iter().zip(stats.iter()) {
            assert_eq!(
                (a.skipped, a.loss_scale, a.tokens),
                (b.skipped, b.loss_scale, b.tokens),
                "{what}: step {}",
                a.step
            );
            let d = (a.loss - b.loss).abs() / a.loss.abs();
            assert!(d <= tol, "{what}: step {} loss {} vs {} (rel {d:.2e})", a.step, a.loss, b.loss);
        }
    }
    let d = rel(one.1, many[0].1);
    assert!(d <= tol, "{what}: weights differ by {d:.2e} relative");
}
