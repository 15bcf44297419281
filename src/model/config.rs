//! The model's shape, in one struct, and the table of its parameters.

use crate::error::{Error, Result};

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
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Invalid(format!("model config: {m}")));
        if self.n_layers == 0 || self.d_model == 0 || self.vocab == 0 || self.context == 0 || self.mlp_ratio == 0 {
            return bad(format!("sizes must be positive: {self:?}"));
        }
        if self.n_heads == 0 || self.d_model % self.n_heads != 0 {
            return bad(format!("d_model {} must be a multiple of n_heads {}", self.d_model, self.n_heads));
        }
        if self.n_kv_heads == 0 || self.n_heads % self.n_kv_heads != 0 {
            return bad(format!("n_kv_heads {} must divide n_heads {}", self.n_kv_heads, self.n_heads));
        }
        if self.head_dim() % 2 != 0 || self.head_dim() > 256 {
            return bad(format!("head_dim {} must be even and at most 256", self.head_dim()));
        }
        if let AttentionMode::Sparse { block, keep_blocks, index_heads, index_dim } = self.attention {
            if block == 0 || keep_blocks == 0 || index_heads == 0 || index_dim == 0 {
                return bad("sparse attention settings must be positive".into());
            }
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

    /// Total number of parameters.
    pub fn n_params(&self) -> usize {
        self.params().iter().map(|p| p.shape.iter().product::<usize>()).sum()
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
    fn inconsistent_shapes_are_errors() {
        let mut c = ModelConfig { n_heads: 3, ..Default::default() };
        assert!(c.validate().is_err());
        c = ModelConfig { n_kv_heads: 3, ..Default::default() };
        assert!(c.validate().is_err());
    }
}
