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

/// The init values of `seed`, larger (×3, +0.02): larger weights than the
/// init make every path's gradient visible.
fn large_values(cfg: &ModelConfig, seed: u64) -> Vec<Vec<f32>> {
    let mut values = init_params(cfg, seed);
    for v in values.iter_mut() {
        v.iter_mut().for_each(|x| *x = *x * 3.0 + 0.02);
    }
    values
}

fn check(cfg: ModelConfig, attn: StepAttention) {
    let values = large_values(&cfg, 3);
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
    let values = large_values(&cfg, 5);
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

/// The indexer KL on a row sample (`Workspace::set_indexer_kl_rows`, sparse
/// steps): each phase's KL and indexer gradient are means over its own rows,
/// so the phases weighted by their share of the rows add up to the all-rows
/// values (rows per phase unequal here: seq 9, every 4), the LM gradients do
/// not move, and a single phase differs from all rows.
#[test]
fn indexer_kl_on_a_row_sample_weights_up_to_the_all_rows_gradient() {
    use dynsparse::attention::RowSample;
    let cfg = tiny(AttentionMode::Sparse { block: 4, keep_blocks: 2, index_heads: 2, index_dim: 4 });
    let values = large_values(&cfg, 7);
    let mut rng = Rng::new(8);
    let ids: Vec<u32> = (0..18).map(|_| rng.below(11) as u32).collect();
    let (batch, seq, every) = (2usize, 9usize, 4usize);
    let be = CpuBackend::new();
    let m = Model::from_values(&be, cfg, DType::F32, &values).unwrap();
    let run = |sample: RowSample| -> (f64, Vec<Vec<f32>>) {
        let mut ws = Workspace::new(&be, &cfg, DType::F32, batch, seq).unwrap();
        ws.set_indexer_kl_rows(sample).unwrap();
        m.forward(&be, &mut ws, &ids, Some(&ids), StepAttention::Sparse { keep_blocks: 2 }).unwrap();
        let mut grads: Vec<Tensor<CpuBackend>> =
            cfg.params().iter().map(|p| Tensor::zeros(&be, &p.shape, DType::F32).unwrap()).collect();
        let kl = m.backward(&be, &mut ws, &mut grads, 1.0, true).unwrap();
        (kl, grads.iter().map(|g| g.to_f32_vec(&be).unwrap()).collect())
    };
    let (kl_all, g_all) = run(RowSample::ALL);
    assert!(kl_all > 0.0);
    let mut kl_sum = 0.0f64;
    let mut g_sum: Vec<Vec<f64>> = g_all.iter().map(|g| vec![0.0; g.len()]).collect();
    for phase in 0..every {
        let sample = RowSample::new(every, phase);
        let share = (batch * sample.count(seq)) as f64 / (batch * seq) as f64;
        let (kl, g) = run(sample);
        kl_sum += share * kl;
        for (pi, p) in cfg.params().iter().enumerate() {
            if p.name.contains("idx.") {
                g_sum[pi].iter_mut().zip(&g[pi]).for_each(|(a, &x)| *a += share * x as f64);
                assert_ne!(g[pi], g_all[pi], "{}: phase {phase} trains a subset of the rows", p.name);
            } else {
                assert_eq!(g[pi], g_all[pi], "{}: the row sample must not touch the LM gradient", p.name);
            }
        }
    }
    assert!((kl_sum - kl_all).abs() <= 1e-5 * kl_all, "KL: phases {kl_sum} vs all rows {kl_all}");
    for (pi, p) in cfg.params().iter().enumerate().filter(|(_, p)| p.name.contains("idx.")) {
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for (&s, &a) in g_sum[pi].iter().zip(&g_all[pi]) {
            num += (s - a as f64).powi(2);
            den += (a as f64).powi(2);
        }
        assert!(
            den > 0.0 && (num / den).sqrt() < 1e-5,
            "{}: phases vs all rows differ by {:.2e}",
            p.name,
            (num / den).sqrt()
        );
    }
}
