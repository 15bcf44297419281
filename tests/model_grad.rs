//! The model's hand-written backward pass against finite differences on a
//! tiny model (CPU backend, f32): LM loss gradients for every parameter
//! tensor, dense and sparse attention, and the indexer's KL gradients.

use dynsparse::backend::cpu::CpuBackend;
use dynsparse::model::{AttentionMode, Model, ModelConfig, StepAttention, Workspace, init_params};
use dynsparse::util::rng::Rng;
use dynsparse::{DType, Tensor};

fn tiny(attention: AttentionMode) -> ModelConfig {
    ModelConfig {
        n_layers: 2,
        n_heads: 2,
        n_kv_heads: 1,
        d_model: 16,
        vocab: 11,
        context: 16,
        mlp_ratio: 2,
        rope_theta: 100.0,
        attention,
    }
}

/// Loss (and KL) at `values`, and gradients from the backward pass.
fn eval(
    cfg: ModelConfig,
    values: &[Vec<f32>],
    ids: &[u32],
    tg: &[u32],
    attn: StepAttention,
    indexer: bool,
) -> (f64, f64, Vec<Vec<f32>>) {
    let be = CpuBackend::new();
    let m = Model::from_values(&be, cfg, DType::F32, values).unwrap();
    let mut ws = Workspace::new(&be, &cfg, DType::F32, 2, 9).unwrap();
    let stats = m.forward(&be, &mut ws, ids, Some(tg), attn).unwrap();
    let mut grads: Vec<Tensor<CpuBackend>> =
        cfg.params().iter().map(|p| Tensor::zeros(&be, &p.shape, DType::F32).unwrap()).collect();
    let kl = m.backward(&be, &mut ws, &mut grads, 1.0, indexer).unwrap();
    (stats.loss, kl, grads.iter().map(|g| g.to_f32_vec(&be).unwrap()).collect())
}

fn check(cfg: ModelConfig, attn: StepAttention) {
    let mut values = init_params(&cfg, 3);
    // Larger weights than the init make every path's gradient visible.
    for v in values.iter_mut() {
        v.iter_mut().for_each(|x| *x = *x * 3.0 + 0.02);
    }
    let mut rng = Rng::new(4);
    let ids: Vec<u32> = (0..18).map(|_| rng.below(11) as u32).collect();
    let mut tg: Vec<u32> = (0..18).map(|_| rng.below(11) as u32).collect();
    tg[5] = u32::MAX; // ignored
    let (_, _, grads) = eval(cfg, &values, &ids, &tg, attn, false);
    let h = 2e-3f32;
    for (pi, p) in cfg.params().iter().enumerate() {
        if p.name.contains("idx.") {
            assert!(grads[pi].iter().all(|&g| g == 0.0), "{}: the LM loss must not reach the indexer", p.name);
            continue;
        }
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for _ in 0..6 {
            let i = rng.below(values[pi].len() as u64) as usize;
            let mut plus = values.clone();
            plus[pi][i] += h;
            let mut minus = values.clone();
            minus[pi][i] -= h;
            let fd = (eval(cfg, &plus, &ids, &tg, attn, false).0 - eval(cfg, &minus, &ids, &tg, attn, false).0)
                / (2.0 * h as f64);
            num += (grads[pi][i] as f64 - fd).powi(2);
            den += fd * fd;
        }
        let err = (num / den.max(1e-12)).sqrt();
        assert!(err < 2e-2, "{}: relative error {err:.3e} of sampled gradients", p.name);
    }
}

#[test]
fn dense_model_gradients_match_finite_differences() {
    check(tiny(AttentionMode::Dense), StepAttention::Dense);
}

#[test]
fn sparse_model_gradients_match_finite_differences() {
    let cfg = tiny(AttentionMode::Sparse { block: 4, keep_blocks: 2, index_heads: 2, index_dim: 4 });
    check(cfg, StepAttention::Sparse { keep_blocks: 2 });
    check(cfg, StepAttention::Dense);
}

#[test]
fn indexer_kl_gradients_match_finite_differences() {
    let cfg = tiny(AttentionMode::Sparse { block: 4, keep_blocks: 2, index_heads: 2, index_dim: 4 });
    let mut values = init_params(&cfg, 5);
    for v in values.iter_mut() {
        v.iter_mut().for_each(|x| *x = *x * 3.0 + 0.02);
    }
    let mut rng = Rng::new(6);
    let ids: Vec<u32> = (0..18).map(|_| rng.below(11) as u32).collect();
    let tg = ids.clone();
    let (_, kl, grads) = eval(cfg, &values, &ids, &tg, StepAttention::Dense, true);
    assert!(kl > 0.0);
    let h = 3e-4f32;
    for (pi, p) in cfg.params().iter().enumerate().filter(|(_, p)| p.name.contains("idx.")) {
        for _ in 0..5 {
            let i = rng.below(values[pi].len() as u64) as usize;
            let mut plus = values.clone();
            plus[pi][i] += h;
            let mut minus = values.clone();
            minus[pi][i] -= h;
            // backward's gradient is of Σ_layers mean KL = n_layers · (returned mean).
            let f = |v: &[Vec<f32>]| eval(cfg, v, &ids, &tg, StepAttention::Dense, true).1 * cfg.n_layers as f64;
            let fd = (f(&plus) - f(&minus)) / (2.0 * h as f64);
            let g = grads[pi][i] as f64;
            assert!((g - fd).abs() < 2e-3 + 5e-2 * fd.abs(), "{}[{i}]: {g} vs {fd}", p.name);
        }
    }
}
