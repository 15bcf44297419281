//! The model's shape, in one struct, and the table of its parameters.

use crate::error::{Error, Result};

/// Upper bounds of the shape fields: far beyond anything trainable here, low
/// enough that no product of them overflows and that a config read from a
/// file cannot make the parameter table itself exhaust memory.
pub const MAX_LAYERS: usize = 1024;
pub const MAX_D_MODEL: usize = 65536;
pub const MAX_HEADS: usize = 1024;
pub const MAX_VOCAB: usize = 1 << 20;
pub const MAX_MLP_RATIO: usize = 64;
pub const MAX_INDEX_HEADS: usize = 256;
pub const MAX_INDEX_DIM: usize = 1024;
pub const MAX_KEEP_BLOCKS: usize = 1 << 16;

/// Which attention the model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionMode {
    /// Dense causal attention in every layer.
    Dense,
    /// Dynamic sparse attention: an indexer of `index_heads` × `index_dim`
    /// scores keys, and each query keeps its own top `keep_blocks` blocks of
    /// `block` keys, chosen from its own scores (causal; its own block and
    /// the sink block 0 always among them; the sparsity schedule may keep
    /// more, or run dense).
    Sparse { block: usize, keep_blocks: usize, index_heads: usize, index_dim: usize },
}

/// A decoder-only transformer with pre-LayerNorm blocks, RoPE, GELU MLP and
/// an LM head tied to the token embedding.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModelConfig {
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub d_model: usize,
    pub vocab: usize,
    /// Maximum sequence length (RoPE table size).
    pub context: usize,
    /// MLP hidden width = `mlp_ratio · d_model`.
    pub mlp_ratio: usize,
    pub rope_theta: f64,
    pub attention: AttentionMode,
}

impl Default for ModelConfig {
    /// A small model that learns visibly in about two minutes on a 2-core CPU.
    fn default() -> Self {
        ModelConfig {
            n_layers: 4,
            n_heads: 4,
            n_kv_heads: 2,
            d_model: 128,
            vocab: 256,
            context: 512,
            mlp_ratio: 4,
            rope_theta: 10000.0,
            attention: AttentionMode::Sparse { block: 32, keep_blocks: 4, index_heads: 4, index_dim: 32 },
        }
    }
}

/// One named parameter and its shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamInfo {
    pub name: String,
    pub shape: Vec<usize>,
    /// Weight decay applies (matrices), or not (norms, biases).
    pub decay: bool,
}

impl ModelConfig {
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }
    pub fn hidden(&self) -> usize {
        self.mlp_ratio * self.d_model
    }
    pub fn is_sparse(&self) -> bool {
        matches!(self.attention, AttentionMode::Sparse { .. })
    }

    /// Checks the shape for consistency; every config a user supplies goes through here.
    /// Errors name the field as `model.FIELD` (the checkpoint's metadata key).
    pub fn validate(&self) -> Result<()> {
        self.check(&|f: &str| format!("model.{f}"))
    }

    /// [`ModelConfig::validate`] with the caller's names for the fields (a command
    /// line names `n_layers` `--layers`), so the one error line points at what the
    /// user typed, with the accepted range.
    pub fn check(&self, name: &dyn Fn(&str) -> String) -> Result<()> {
        let range = |field: &str, v: usize, lo: usize, hi: usize| -> Result<()> {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(Error::Invalid(format!("{} {v}: accepted range {lo}..={hi}", name(field))))
            }
        };
        range("n_layers", self.n_layers, 1, MAX_LAYERS)?;
        range("d_model", self.d_model, 1, MAX_D_MODEL)?;
        range("n_heads", self.n_heads, 1, self.d_model.min(MAX_HEADS))?;
        range("n_kv_heads", self.n_kv_heads, 1, self.n_heads)?;
        range("vocab", self.vocab, 1, MAX_VOCAB)?;
        range("context", self.context, 1, usize::MAX)?;
        range("mlp_ratio", self.mlp_ratio, 1, MAX_MLP_RATIO)?;
        if !self.d_model.is_multiple_of(self.n_heads) {
            return Err(Error::Invalid(format!(
                "{} {} must be a multiple of {} {}",
                name("d_model"),
                self.d_model,
                name("n_heads"),
                self.n_heads
            )));
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(Error::Invalid(format!(
                "{} {} must divide {} {}",
                name("n_kv_heads"),
                self.n_kv_heads,
                name("n_heads"),
                self.n_heads
            )));
        }
        if !self.head_dim().is_multiple_of(2) || self.head_dim() > 256 {
            return Err(Error::Invalid(format!(
                "{} {} / {} {} = {}: the head dimension must be even and at most 256",
                name("d_model"),
                self.d_model,
                name("n_heads"),
                self.n_heads,
                self.head_dim()
            )));
        }
        // θ ≤ 1 makes every RoPE frequency θ^(-2i/d) ≥ 1: positions alias instead of rotating apart.
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return Err(Error::Invalid(format!(
                "{} {}: must be a finite number > 1",
                name("rope_theta"),
                self.rope_theta
            )));
        }
        if let AttentionMode::Sparse { block, keep_blocks, index_heads, index_dim } = self.attention {
            range("block", block, 1, self.context)?;
            range("keep_blocks", keep_blocks, 1, self.context.div_ceil(block).max(MAX_KEEP_BLOCKS))?;
            range("index_heads", index_heads, 1, MAX_INDEX_HEADS)?;
            range("index_dim", index_dim, 1, MAX_INDEX_DIM)?;
        }
        Ok(())
    }

    /// Every parameter, in a fixed order (the checkpoint and optimizer order).
    pub fn params(&self) -> Vec<ParamInfo> {
        let (c, hd) = (self.d_model, self.head_dim());
        let p = |name: String, shape: &[usize], decay: bool| ParamInfo { name, shape: shape.to_vec(), decay };
        let mut v = vec![p("tok_emb".into(), &[self.vocab, c], true)];
        for l in 0..self.n_layers {
            let n = |s: &str| format!("layers.{l}.{s}");
            v.push(p(n("ln1.gamma"), &[c], false));
            v.push(p(n("ln1.beta"), &[c], false));
            v.push(p(n("wq"), &[c, self.n_heads * hd], true));
            v.push(p(n("wk"), &[c, self.n_kv_heads * hd], true));
            v.push(p(n("wv"), &[c, self.n_kv_heads * hd], true));
            v.push(p(n("wo"), &[self.n_heads * hd, c], true));
            v.push(p(n("ln2.gamma"), &[c], false));
            v.push(p(n("ln2.beta"), &[c], false));
            v.push(p(n("w1"), &[c, self.hidden()], true));
            v.push(p(n("b1"), &[self.hidden()], false));
            v.push(p(n("w2"), &[self.hidden(), c], true));
            v.push(p(n("b2"), &[c], false));
            if let AttentionMode::Sparse { index_heads, index_dim, .. } = self.attention {
                v.push(p(n("idx.wq"), &[c, index_heads * index_dim], true));
                v.push(p(n("idx.wk"), &[c, index_dim], true));
                v.push(p(n("idx.ww"), &[c, index_heads], true));
            }
        }
        v.push(p("lnf.gamma".into(), &[c], false));
        v.push(p("lnf.beta".into(), &[c], false));
        v
    }

    /// Total number of parameters, in closed form (no table is built, so a
    /// config read from a hostile file costs nothing to measure); saturates.
    pub fn n_params(&self) -> usize {
        usize::try_from(self.n_params_u128()).unwrap_or(usize::MAX)
    }

    /// [`ModelConfig::n_params`] without overflow for any field values.
    pub fn n_params_u128(&self) -> u128 {
        let (c, l) = (self.d_model as u128, self.n_layers as u128);
        let hd = self.d_model.checked_div(self.n_heads).unwrap_or(0) as u128;
        let (h, kv, f) = (self.n_heads as u128, self.n_kv_heads as u128, self.mlp_ratio as u128 * c);
        let mut per_layer = 4 * c + 2 * c * h * hd + 2 * c * kv * hd + 2 * c * f + f + c;
        if let AttentionMode::Sparse { index_heads, index_dim, .. } = self.attention {
            let (ih, id) = (index_heads as u128, index_dim as u128);
            per_layer += c * ih * id + c * id + c * ih;
        }
        self.vocab as u128 * c + l * per_layer + 2 * c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid_and_counts_its_parameters() {
        let c = ModelConfig::default();
        c.validate().unwrap();
        let per_layer = 2 * 128
            + 128 * 128
            + 2 * 128 * 64
            + 128 * 128
            + 2 * 128
            + 128 * 512
            + 512
            + 512 * 128
            + 128
            + 128 * 128
            + 128 * 32
            + 128 * 4;
        assert_eq!(c.n_params(), 256 * 128 + 4 * per_layer + 2 * 128);
    }

    #[test]
    fn closed_form_parameter_count_matches_the_table() {
        for attention in [AttentionMode::Dense, ModelConfig::default().attention] {
            let c =
                ModelConfig { n_layers: 3, d_model: 64, n_heads: 4, n_kv_heads: 2, attention, ..Default::default() };
            let table: usize = c.params().iter().map(|p| p.shape.iter().product::<usize>()).sum();
            assert_eq!(c.n_params(), table);
        }
    }

    #[test]
    fn errors_name_the_field_and_the_range() {
        let c = ModelConfig { n_layers: 0, ..Default::default() };
        let e = c.check(&|f| if f == "n_layers" { "--layers".into() } else { f.into() }).unwrap_err().to_string();
        assert_eq!(e, "--layers 0: accepted range 1..=1024");
        let c = ModelConfig { rope_theta: f64::NAN, ..Default::default() };
        assert!(c.validate().unwrap_err().to_string().contains("model.rope_theta NaN"));
        let c = ModelConfig {
            attention: AttentionMode::Sparse { block: 0, keep_blocks: 4, index_heads: 4, index_dim: 32 },
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().starts_with("model.block 0: accepted range 1..=512"));
    }

    #[test]
    fn inconsistent_shapes_are_errors() {
        let mut c = ModelConfig { n_heads: 3, ..Default::default() };
        assert!(c.validate().is_err());
        c = ModelConfig { n_kv_heads: 3, ..Default::default() };
        assert!(c.validate().is_err());
    }
}
