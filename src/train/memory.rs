//! Memory preflight: what a config will allocate, computed from the shapes
//! alone (in u128, so no field value can overflow it), compared with what the
//! machine has before anything is allocated. A config that does not fit is
//! refused with the numbers instead of dying in the allocator.
//!
//! The sums mirror the buffers `Model`, `Workspace` and `Trainer` allocate;
//! transient per-op temporaries are not counted, so the estimate is a floor.

use crate::DType;
use crate::error::{Error, Result};
use crate::model::{AttentionMode, ModelConfig, lm_chunk_rows, score_tile_rows};

/// Where the bytes live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// Host RAM (checkpoint buffers, initial values).
    Host,
    /// The backend's memory (host RAM too on the CPU backend).
    Device,
}

/// Named byte counts of one planned job.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryPlan {
    pub parts: Vec<(&'static str, Place, u128)>,
}

fn bytes(dtype: DType) -> u128 {
    dtype.size() as u128
}

/// Bytes of one `Workspace` of `batch × seq` tokens in `dtype` whose largest
/// buffers are split under `max_binding` bytes (the backend's largest
/// binding), as (activations, logits, indexer scores).
pub fn workspace_bytes(
    cfg: &ModelConfig,
    dtype: DType,
    batch: usize,
    seq: usize,
    max_binding: u64,
) -> (u128, u128, u128) {
    let e = bytes(dtype);
    let (b, s) = (batch as u128, seq as u128);
    let n = b * s;
    let (c, l) = (cfg.d_model as u128, cfg.n_layers as u128);
    let hd = (cfg.d_model / cfg.n_heads.max(1)) as u128;
    let (h, kv, f, v) = (cfg.n_heads as u128, cfg.n_kv_heads as u128, cfg.mlp_ratio as u128 * c, cfg.vocab as u128);
    // Per layer: ln1, xm, ln2 [n, c]; q, att [n, h·hd]; k, v [n, kv·hd]; hb, act [n, f]; 4 row stats; lse.
    let per_layer = e * (3 * n * c + 2 * n * h * hd + 2 * n * kv * hd + 2 * n * f) + 4 * (4 * n + b * h * s);
    // Residual stream x[0..=L], lnf, q/k raw and their grads, dx, dln, tmp, dact, dhb, datt, dq, dk, dv.
    let shared = e * ((l + 1) * n * c + n * c + 3 * n * h * hd + 3 * n * kv * hd + 3 * n * c + 2 * n * f + n * h * hd)
        + 4 * (3 * n)
        + 4 * (2 * n);
    // Logits and their gradient; in row chunks, every chunk's logits, one chunk's gradient, and per
    // chunk its row numbers and targets (u32), one chunk's lnf and d_lnf rows and f32 losses.
    let len = lm_chunk_rows((b * s) as usize, cfg.vocab, max_binding) as u128;
    let logits = if len >= n {
        2 * e * n * v
    } else {
        let padded = n.div_ceil(len) * len;
        e * (padded * v + len * v) + 8 * padded + 2 * e * len * c + 4 * len
    };
    let (idx_act, scores) = match cfg.attention {
        AttentionMode::Dense => (0, 0),
        AttentionMode::Sparse { block, keep_blocks, index_heads, index_dim } => {
            let nb = s.div_ceil(block.max(1) as u128);
            let (ih, id) = (index_heads as u128, index_dim as u128);
            let proj = 2 * e * (n * ih * id + n * id + n * ih);
            // Each query's kept blocks, per layer: [B, seq, keep] u32.
            let select = l * b * s * nb.min(keep_blocks as u128) * 4;
            // The indexer's [B, tile, seq] scores and their gradient (and a shorter last tile's;
            // tiled, one tile's dk_i and their f32 sum), and each query's pooled per-block scores [B, seq, nb].
            let tile = score_tile_rows(batch, seq, max_binding) as u128;
            let tiles = 2 * 4 * b * (tile + s % tile) * s + if tile < s { (e + 4) * n * id } else { 0 };
            (proj + select + 4 * n, tiles + 4 * b * s * nb)
        }
    };
    (l * per_layer + shared + idx_act, logits, scores)
}

/// RoPE cos and sin tables: `[context, head_dim/2]` f32 each.
fn rope_bytes(cfg: &ModelConfig) -> u128 {
    4 * cfg.context as u128 * (cfg.d_model / cfg.n_heads.max(1)) as u128
}

impl MemoryPlan {
    /// A training run: weights, f32 masters, gradients, AdamW moments, the
    /// training and the evaluation workspaces, and the host buffers of a save;
    /// `max_binding` is the backend's largest binding ([`crate::Backend::max_binding_bytes`]).
    pub fn train(cfg: &ModelConfig, precision: DType, batch: usize, seq: usize, max_binding: u64) -> Self {
        let p = cfg.n_params_u128();
        let mixed = precision != DType::F32;
        let (act, logits, scores) = workspace_bytes(cfg, precision, batch, seq, max_binding);
        let (eact, elogits, escores) = (act, logits, scores);
        MemoryPlan {
            parts: vec![
                ("weights", Place::Device, p * bytes(precision)),
                ("f32 master weights", Place::Device, if mixed { 4 * p } else { 0 }),
                ("gradients", Place::Device, 4 * p + if mixed { p * bytes(precision) } else { 0 }),
                ("AdamW moments", Place::Device, 8 * p),
                ("activations", Place::Device, act + eact),
                ("RoPE tables", Place::Device, rope_bytes(cfg)),
                ("logits", Place::Device, logits + elogits),
                ("indexer scores", Place::Device, scores + escores),
                // Saving reads masters and moments back (3 × f32) and serialises them (3 × f32 again).
                ("checkpoint buffers", Place::Host, 24 * p),
            ],
        }
    }

    /// Evaluating or generating from a checkpoint of `file_bytes` bytes: the
    /// file, its f32 tensors, the model and one workspace.
    pub fn inference(
        cfg: &ModelConfig,
        precision: DType,
        batch: usize,
        seq: usize,
        file_bytes: u64,
        max_binding: u64,
    ) -> Self {
        let p = cfg.n_params_u128();
        let (act, logits, scores) = workspace_bytes(cfg, precision, batch, seq, max_binding);
        MemoryPlan {
            parts: vec![
                ("checkpoint buffers", Place::Host, file_bytes as u128 + 12 * p),
                ("weights", Place::Device, p * bytes(precision)),
                ("activations", Place::Device, act),
                ("RoPE tables", Place::Device, rope_bytes(cfg)),
                ("logits", Place::Device, logits),
                ("indexer scores", Place::Device, scores),
            ],
        }
    }

    /// Generation / serving through the KV cache: weights, the cache of
    /// `max_batch × context` rows (K and V per layer, plus a sparse model's
    /// indexer keys) and the step buffers of `rows` query rows.
    pub fn kv_inference(
        cfg: &ModelConfig,
        precision: DType,
        max_batch: usize,
        context: usize,
        rows: usize,
        file_bytes: u64,
    ) -> Self {
        let p = cfg.n_params_u128();
        let (l, g, d) = (cfg.n_layers as u128, cfg.n_kv_heads as u128, cfg.head_dim() as u128);
        let di = match cfg.attention {
            crate::model::AttentionMode::Sparse { index_dim, .. } => index_dim as u128,
            crate::model::AttentionMode::Dense => 0,
        };
        let cache = l * (max_batch as u128) * (context as u128) * (2 * g * d + di) * bytes(precision);
        let (c, f) = (cfg.d_model as u128, (cfg.d_model * cfg.mlp_ratio) as u128);
        let step = rows as u128 * (8 * c + 2 * f + 4 * c + cfg.vocab as u128) * bytes(precision);
        MemoryPlan {
            parts: vec![
                ("checkpoint buffers", Place::Host, file_bytes as u128 + 12 * p),
                ("weights", Place::Device, p * bytes(precision)),
                ("KV cache", Place::Device, cache),
                ("RoPE tables", Place::Device, rope_bytes(cfg)),
                ("step activations and logits", Place::Device, step),
            ],
        }
    }

    /// Bytes in `place` (`None`: all of them, as on the CPU backend).
    pub fn total(&self, place: Option<Place>) -> u128 {
        self.parts.iter().filter(|(_, p, _)| place.is_none_or(|q| *p == q)).map(|(_, _, b)| *b).sum()
    }

    /// Refuses the plan when it needs more than `available` bytes: `host_only`
    /// is the CPU backend (every part in RAM); otherwise device parts are checked
    /// against `device` when that is known. `what` says what was planned and
    /// `hint` which flags shrink it.
    pub fn check(
        &self,
        what: &str,
        host_available: Option<u64>,
        device: Option<(u64, &str)>,
        hint: &str,
    ) -> Result<()> {
        let list = |place: Option<Place>| {
            self.parts
                .iter()
                .filter(|(_, p, b)| *b > 0 && place.is_none_or(|q| *p == q))
                .map(|(n, _, b)| format!("{n} {}", fmt_bytes(*b)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let refuse = |need: u128, have: u64, source: &str, place: Option<Place>| {
            Err(Error::Invalid(format!(
                "memory preflight: {what} needs {} ({}) but {} {source} is available; {hint}",
                fmt_bytes(need),
                list(place),
                fmt_bytes(have as u128)
            )))
        };
        match device {
            None => {
                if let Some(have) = host_available
                    && self.total(None) > have as u128
                {
                    return refuse(self.total(None), have, "of host memory (MemAvailable)", None);
                }
            }
            Some((have_dev, dev_name)) => {
                if let Some(have) = host_available
                    && self.total(Some(Place::Host)) > have as u128
                {
                    return refuse(
                        self.total(Some(Place::Host)),
                        have,
                        "of host memory (MemAvailable)",
                        Some(Place::Host),
                    );
                }
                if self.total(Some(Place::Device)) > have_dev as u128 {
                    let src = format!("on {dev_name}");
                    return refuse(self.total(Some(Place::Device)), have_dev, &src, Some(Place::Device));
                }
            }
        }
        Ok(())
    }
}

/// "1.50 GiB", "12.0 MiB", "3.2e+06 TiB".
pub fn fmt_bytes(b: u128) -> String {
    let b = b as f64;
    const K: f64 = 1024.0;
    if b < K * K {
        format!("{:.1} KiB", b / K)
    } else if b < K * K * K {
        format!("{:.1} MiB", b / (K * K))
    } else if b < K * K * K * K {
        format!("{:.2} GiB", b / (K * K * K))
    } else if b < 1e6 * K * K * K * K {
        format!("{:.1} TiB", b / (K * K * K * K))
    } else {
        format!("{:.2e} TiB", b / (K * K * K * K))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Backend;
    use crate::backend::cpu::CpuBackend;
    use crate::model::Model;
    use crate::model::Workspace;

    #[test]
    fn workspace_and_weights_estimate_what_the_cpu_backend_allocates() {
        let be = CpuBackend::new();
        for attention in [AttentionMode::Dense, ModelConfig::default().attention] {
            let cfg = ModelConfig { n_layers: 2, d_model: 64, context: 128, attention, ..Default::default() };
            // Whole buffers, and split under 13 rows of logits (15 chunks of the 192 rows).
            for (dtype, budget) in [(DType::F32, u64::MAX), (DType::BF16, u64::MAX), (DType::F32, 13 * 256 * 4)] {
                let base = be.memory().allocated;
                let model = Model::new(&be, cfg, dtype, 1).unwrap();
                let ws = Workspace::with_chunk_bytes(&be, &cfg, dtype, 2, 96, budget).unwrap();
                let real = (be.memory().allocated - base) as u128;
                let (a, l, s) = workspace_bytes(&cfg, dtype, 2, 96, budget);
                let est = a + l + s + rope_bytes(&cfg) + cfg.n_params_u128() * dtype.size() as u128;
                eprintln!("{dtype} {attention:?} {budget}: estimate {est} B, allocated {real} B");
                // The estimate is meant to track the real buffers closely (within 10%).
                assert!(est * 10 >= real * 9 && est * 10 <= real * 11, "{dtype}: estimate {est}, allocated {real}");
                drop((model, ws));
            }
        }
    }

    #[test]
    fn a_config_larger_than_memory_is_refused_with_the_numbers() {
        let cfg = ModelConfig { context: 1_000_000_000, ..Default::default() };
        let plan = MemoryPlan::train(&cfg, DType::F32, 4, 1_000_000_000, u64::MAX);
        let e = plan.check("training", Some(8 << 30), None, "lower --seq").unwrap_err().to_string();
        assert!(e.contains("indexer scores") && e.contains("8.00 GiB") && e.contains("lower --seq"), "{e}");
        let small = MemoryPlan::train(&ModelConfig::default(), DType::F32, 4, 512, u64::MAX);
        small.check("training", Some(8 << 30), None, "").unwrap();
        // On a GPU only the host parts count against host memory.
        let e = small.check("training", Some(1 << 30), Some((1 << 20, "gpu0")), "").unwrap_err().to_string();
        assert!(e.contains("on gpu0") && !e.contains("checkpoint buffers"), "{e}");
    }
}
