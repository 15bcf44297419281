//! The DSA language model: a decoder-only transformer (token embedding,
//! pre-LayerNorm blocks with RoPE and dense or dynamic sparse attention, GELU
//! MLP, final LayerNorm, LM head tied to the embedding) with a hand-written
//! backward pass in the style of llm.c. Every activation buffer is planned up
//! front from the config and the batch shape ([`Workspace`]), so memory is
//! known before the first step.

pub mod config;
pub mod generate;
pub mod infer;
pub mod sample;

pub use config::{AttentionMode, ModelConfig, ParamInfo};
pub use generate::{GenerateOptions, GenerateStats, StopReason, Streamer};
pub use infer::{InferState, KvCache, Row};

use crate::attention::{self, Pattern};
use crate::error::{Error, Result};
use crate::ops::{self, RopeTable};
use crate::util::rng::Rng;
use crate::{Backend, DType, Tensor};

/// The attention a forward pass runs (from the sparsity schedule).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepAttention {
    Dense,
    /// Block-sparse attention: each query keeps its own top `keep_blocks` key blocks.
    Sparse {
        keep_blocks: usize,
    },
}

/// Positions of one layer's parameters in the parameter list.
#[derive(Clone, Copy, Debug)]
struct LayerParams {
    ln1g: usize,
    ln1b: usize,
    wq: usize,
    wk: usize,
    wv: usize,
    wo: usize,
    ln2g: usize,
    ln2b: usize,
    w1: usize,
    b1: usize,
    w2: usize,
    b2: usize,
    /// (wq, wk, ww) of the indexer.
    indexer: Option<(usize, usize, usize)>,
}

/// The layout of the parameter list of a config.
#[derive(Clone, Debug)]
struct ParamLayout {
    emb: usize,
    layers: Vec<LayerParams>,
    lnfg: usize,
    lnfb: usize,
}

impl ParamLayout {
    fn new(cfg: &ModelConfig) -> Self {
        let names: Vec<String> = cfg.params().into_iter().map(|p| p.name).collect();
        let at = |n: &str| names.iter().position(|x| x == n).expect("parameter table and layout agree");
        let layers = (0..cfg.n_layers)
            .map(|l| {
                let f = |s: &str| at(&format!("layers.{l}.{s}"));
                LayerParams {
                    ln1g: f("ln1.gamma"),
                    ln1b: f("ln1.beta"),
                    wq: f("wq"),
                    wk: f("wk"),
                    wv: f("wv"),
                    wo: f("wo"),
                    ln2g: f("ln2.gamma"),
                    ln2b: f("ln2.beta"),
                    w1: f("w1"),
                    b1: f("b1"),
                    w2: f("w2"),
                    b2: f("b2"),
                    indexer: cfg.is_sparse().then(|| (f("idx.wq"), f("idx.wk"), f("idx.ww"))),
                }
            })
            .collect();
        ParamLayout { emb: at("tok_emb"), layers, lnfg: at("lnf.gamma"), lnfb: at("lnf.beta") }
    }
}

/// Initial values of every parameter (GPT-2 style: N(0, 0.02), output
/// projections scaled by 1/√(2·layers), LayerNorm gains 1, biases 0).
pub fn init_params(cfg: &ModelConfig, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = Rng::new(seed);
    let proj = 0.02 / ((2 * cfg.n_layers) as f32).sqrt();
    cfg.params()
        .iter()
        .map(|p| {
            let n: usize = p.shape.iter().product();
            if p.name.ends_with("gamma") {
                vec![1.0; n]
            } else if p.name.ends_with("beta") || p.name.ends_with(".b1") || p.name.ends_with(".b2") {
                vec![0.0; n]
            } else {
                let std = if p.name.ends_with(".wo") || p.name.ends_with(".w2") { proj } else { 0.02 };
                rng.normal_vec(n).into_iter().map(|x| x * std).collect()
            }
        })
        .collect()
}

/// Model weights in the working dtype, on backend `B`.
pub struct Model<B: Backend> {
    pub cfg: ModelConfig,
    /// Working dtype of weights and activations.
    pub dtype: DType,
    /// One tensor per entry of `cfg.params()`, in that order.
    pub params: Vec<Tensor<B>>,
    rope: RopeTable<B>,
    layout: ParamLayout,
}

impl<B: Backend> Model<B> {
    /// A model with the given parameter values (f32, converted to `dtype`).
    pub fn from_values(be: &B, cfg: ModelConfig, dtype: DType, values: &[Vec<f32>]) -> Result<Self> {
        cfg.validate()?;
        if !dtype.is_float() || !be.supports(dtype) {
            return Err(Error::DType { op: "model", dtype, why: format!(" as working dtype on {}", be.device_name()) });
        }
        let infos = cfg.params();
        if values.len() != infos.len() {
            return Err(Error::Format(format!(
                "model: {} parameter tensors for a config with {}",
                values.len(),
                infos.len()
            )));
        }
        let params = infos
            .iter()
            .zip(values)
            .map(|(p, v)| Tensor::from_f32(be, v, &p.shape, dtype))
            .collect::<Result<Vec<_>>>()?;
        let rope = RopeTable::new(be, cfg.context, cfg.head_dim(), cfg.rope_theta)?;
        Ok(Model { layout: ParamLayout::new(&cfg), cfg, dtype, params, rope })
    }

    /// A freshly initialised model.
    pub fn new(be: &B, cfg: ModelConfig, dtype: DType, seed: u64) -> Result<Self> {
        cfg.validate()?;
        Self::from_values(be, cfg, dtype, &init_params(&cfg, seed))
    }

    /// Runs the model on `ids` (`[batch, seq]`) and, with `targets`, computes the
    /// mean cross-entropy over non-ignored targets. Activations land in `ws`.
    pub fn forward(
        &self,
        be: &B,
        ws: &mut Workspace<B>,
        ids: &[u32],
        targets: Option<&[u32]>,
        attn: StepAttention,
    ) -> Result<ForwardStats> {
        let (bsz, t) = (ws.batch, ws.seq);
        let (_c, n) = (self.cfg.d_model, bsz * t);
        if ids.len() != n || targets.is_some_and(|tg| tg.len() != n) {
            return Err(Error::Shape(format!(
                "model: the workspace is {bsz}×{t} = {n} tokens but got {} ids",
                ids.len()
            )));
        }
        ws.ids.write_f32(be, &ids.iter().map(|&x| x as f32).collect::<Vec<_>>())?;
        let w = &self.params;
        ops::embedding(be, &ws.ids, &w[self.layout.emb], &mut ws.x[0])?;
        ws.attn = attn;
        for (l, lp) in self.layout.layers.iter().enumerate() {
            let (xs, rest) = ws.x.split_at_mut(l + 1);
            let (x, xnext) = (&xs[l], &mut rest[0]);
            let a = &mut ws.layers[l];
            ops::layernorm(be, x, &w[lp.ln1g], &w[lp.ln1b], &mut a.ln1, &mut a.mean1, &mut a.rstd1, 1e-5)?;
            ops::matmul(be, &a.ln1, &w[lp.wq], &mut ws.q_raw, false, false, 1.0, 0.0)?;
            ops::matmul(be, &a.ln1, &w[lp.wk], &mut ws.k_raw, false, false, 1.0, 0.0)?;
            a.v.set_shape(&[n, a.v.numel() / n])?;
            ops::matmul(be, &a.ln1, &w[lp.wv], &mut a.v, false, false, 1.0, 0.0)?;
            ws.q_raw.set_shape(a.q.shape())?;
            ws.k_raw.set_shape(a.k.shape())?;
            a.v.set_shape(a.k.shape())?;
            ops::rope(be, &ws.q_raw, &self.rope, 0, &mut a.q)?;
            ops::rope(be, &ws.k_raw, &self.rope, 0, &mut a.k)?;
            ws.q_raw.set_shape(&[n, a.q.numel() / n])?;
            ws.k_raw.set_shape(&[n, a.k.numel() / n])?;
            match (attn, lp.indexer, ws.idx.as_mut()) {
                (StepAttention::Sparse { keep_blocks }, Some(ip), Some(ix)) => {
                    let AttentionMode::Sparse { block, .. } = self.cfg.attention else { unreachable!() };
                    ix.project(be, &a.ln1, w, ip)?;
                    let nb = t.div_ceil(block);
                    attention::indexer_block_scores(be, &ix.qi, &ix.ki, &ix.w, block, &mut ix.pooled)?;
                    let keep = keep_blocks.clamp(1, nb);
                    let sel = &mut ix.select[l];
                    if sel.shape()[2] != keep {
                        *sel = Tensor::empty(be, &[bsz, t, keep], DType::U32)?;
                    }
                    // Per query: query t's blocks come from its own scores (causal).
                    attention::select_topk(be, &ix.pooled, keep, block, sel)?;
                    let pat = Pattern::Blocks { idx: sel, block };
                    attention::attention(be, &a.q, &a.k, &a.v, pat, &mut a.att, &mut a.lse)?;
                }
                (StepAttention::Sparse { .. }, None, _) => {
                    return Err(Error::Invalid("sparse attention requested for a dense model".into()));
                }
                _ => attention::attention(be, &a.q, &a.k, &a.v, Pattern::Dense, &mut a.att, &mut a.lse)?,
            }
            a.att.set_shape(&[n, a.att.numel() / n])?;
            // xm = x + att·Wo
            ops::cast(be, x, &mut a.xm)?;
            ops::matmul(be, &a.att, &w[lp.wo], &mut a.xm, false, false, 1.0, 1.0)?;
            a.att.set_shape(a.q.shape())?;
            ops::layernorm(be, &a.xm, &w[lp.ln2g], &w[lp.ln2b], &mut a.ln2, &mut a.mean2, &mut a.rstd2, 1e-5)?;
            ops::matmul(be, &a.ln2, &w[lp.w1], &mut a.hb, false, false, 1.0, 0.0)?;
            ops::bias_add(be, &mut a.hb, &w[lp.b1])?;
            ops::gelu(be, &a.hb, &mut a.act)?;
            // x_{l+1} = xm + act·W2 + b2
            ops::cast(be, &a.xm, xnext)?;
            ops::matmul(be, &a.act, &w[lp.w2], xnext, false, false, 1.0, 1.0)?;
            ops::bias_add(be, xnext, &w[lp.b2])?;
        }
        let xl = &ws.x[self.cfg.n_layers];
        ops::layernorm(
            be,
            xl,
            &w[self.layout.lnfg],
            &w[self.layout.lnfb],
            &mut ws.lnf,
            &mut ws.meanf,
            &mut ws.rstdf,
            1e-5,
        )?;
        ops::matmul(be, &ws.lnf, &w[self.layout.emb], &mut ws.logits, false, true, 1.0, 0.0)?;
        let Some(tg) = targets else { return Ok(ForwardStats { loss: f64::NAN, valid: 0 }) };
        ws.targets.write_f32(be, &tg.iter().map(|&x| x as f32).collect::<Vec<_>>())?;
        ops::cross_entropy(be, &ws.logits, &ws.targets, &mut ws.losses, IGNORE)?;
        let losses = ws.losses.to_f32_vec(be)?;
        let valid = tg.iter().filter(|&&x| x != IGNORE && (x as usize) < self.cfg.vocab).count();
        ws.valid = valid;
        let loss = if valid == 0 { 0.0 } else { losses.iter().map(|&x| x as f64).sum::<f64>() / valid as f64 };
        Ok(ForwardStats { loss, valid })
    }

    /// Backward pass of the last [`Model::forward`] (which had targets):
    /// adds `loss_scale ·` the gradient of the mean loss to `grads` (one tensor
    /// per parameter, in the working dtype, accumulated into). With
    /// `train_indexer`, the indexers' KL loss against the main attention (over
    /// the keys this step attended to) adds its gradient to the indexer
    /// weights, its input detached. Returns the mean KL (0 when not trained).
    pub fn backward(
        &self,
        be: &B,
        ws: &mut Workspace<B>,
        grads: &mut [Tensor<B>],
        loss_scale: f32,
        train_indexer: bool,
    ) -> Result<f64> {
        let w = &self.params;
        let lay = &self.layout;
        let n = ws.batch * ws.seq;
        if grads.len() != w.len() {
            return Err(Error::Shape(format!("backward: {} gradient tensors for {} parameters", grads.len(), w.len())));
        }
        let gs = loss_scale / ws.valid.max(1) as f32;
        ops::cross_entropy_backward(be, &ws.logits, &ws.targets, &mut ws.dlogits, IGNORE, gs)?;
        // logits = lnf·Eᵀ: d_lnf = dlogits·E, dE += dlogitsᵀ·lnf
        ops::matmul(be, &ws.dlogits, &w[lay.emb], &mut ws.dln, false, false, 1.0, 0.0)?;
        ops::matmul(be, &ws.dlogits, &ws.lnf, &mut grads[lay.emb], true, false, 1.0, 1.0)?;
        let (gf, gb) = pair(grads, lay.lnfg, lay.lnfb);
        let xl = &ws.x[self.cfg.n_layers];
        ops::layernorm_backward(be, &ws.dln, xl, &w[lay.lnfg], &ws.meanf, &ws.rstdf, &mut ws.dx, gf, gb)?;
        let mut kl_total = 0.0;
        for (l, lp) in lay.layers.iter().enumerate().rev() {
            let a = &mut ws.layers[l];
            // x_{l+1} = xm + act·W2 + b2
            ops::matmul(be, &ws.dx, &w[lp.w2], &mut ws.dact, false, true, 1.0, 0.0)?;
            ops::matmul(be, &a.act, &ws.dx, &mut grads[lp.w2], true, false, 1.0, 1.0)?;
            ops::sum_rows(be, &ws.dx, &mut grads[lp.b2], 1.0)?;
            ops::gelu_backward(be, &a.hb, &ws.dact, &mut ws.dhb)?;
            ops::matmul(be, &a.ln2, &ws.dhb, &mut grads[lp.w1], true, false, 1.0, 1.0)?;
            ops::sum_rows(be, &ws.dhb, &mut grads[lp.b1], 1.0)?;
            ops::matmul(be, &ws.dhb, &w[lp.w1], &mut ws.dln, false, true, 1.0, 0.0)?;
            let (g2, b2) = pair(grads, lp.ln2g, lp.ln2b);
            ops::layernorm_backward(be, &ws.dln, &a.xm, &w[lp.ln2g], &a.mean2, &a.rstd2, &mut ws.tmp, g2, b2)?;
            ops::axpby(be, 1.0, &ws.tmp, 1.0, &mut ws.dx)?; // dx is now d(xm)
            // xm = x + att·Wo
            a.att.set_shape(&[n, a.att.numel() / n])?;
            ops::matmul(be, &ws.dx, &w[lp.wo], &mut ws.datt, false, true, 1.0, 0.0)?;
            ops::matmul(be, &a.att, &ws.dx, &mut grads[lp.wo], true, false, 1.0, 1.0)?;
            a.att.set_shape(a.q.shape())?;
            ws.datt.set_shape(a.q.shape())?;
            let block = match self.cfg.attention {
                AttentionMode::Sparse { block, .. } => block,
                AttentionMode::Dense => 0,
            };
            let sel =
                ws.idx.as_ref().filter(|_| matches!(ws.attn, StepAttention::Sparse { .. })).map(|ix| &ix.select[l]);
            let sparse_step = sel.is_some();
            let pat = match sel {
                Some(s) => Pattern::Blocks { idx: s, block },
                None => Pattern::Dense,
            };
            attention::attention_backward(
                be, &a.q, &a.k, &a.v, &a.att, &a.lse, &ws.datt, pat, &mut ws.dq, &mut ws.dk, &mut ws.dv,
            )?;
            ws.datt.set_shape(&[n, a.att.numel() / n])?;
            if train_indexer && self.cfg.is_sparse() {
                let (Some(ix), Some(ip)) = (ws.idx.as_mut(), lp.indexer) else {
                    unreachable!("sparse model has indexers")
                };
                let a = &ws.layers[l];
                ix.project(be, &a.ln1, w, ip)?;
                attention::indexer_scores(be, &ix.qi, &ix.ki, &ix.w, &mut ix.scores)?;
                let pat = if sparse_step { Pattern::Blocks { idx: &ix.select[l], block } } else { Pattern::Dense };
                attention::indexer_kl(be, &a.q, &a.k, &a.lse, &ix.scores, pat, &mut ix.kl, &mut ix.dscores)?;
                kl_total += ix.kl.to_f32_vec(be)?.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
                ops::scale(be, &mut ix.dscores, loss_scale / n as f32)?;
                attention::indexer_backward(
                    be,
                    &ix.qi,
                    &ix.ki,
                    &ix.w,
                    &ix.dscores,
                    &mut ix.dqi,
                    &mut ix.dki,
                    &mut ix.dw,
                )?;
                let (wq, wk, ww) = ip;
                for (dst, src) in [(wq, &mut ix.dqi), (wk, &mut ix.dki), (ww, &mut ix.dw)] {
                    let shape = src.shape().to_vec();
                    src.set_shape(&[n, src.numel() / n])?;
                    ops::matmul(be, &a.ln1, src, &mut grads[dst], true, false, 1.0, 1.0)?;
                    src.set_shape(&shape)?;
                }
            }
            self.qkv_backward(be, ws, l, grads)?;
        }
        ops::embedding_backward(be, &ws.ids, &ws.dx, &mut grads[lay.emb])?;
        Ok(kl_total / self.cfg.n_layers as f64)
    }

    /// From dq, dk, dv (post-RoPE) to the q/k/v weight gradients and `dx += d(ln1 path)`.
    fn qkv_backward(&self, be: &B, ws: &mut Workspace<B>, l: usize, grads: &mut [Tensor<B>]) -> Result<()> {
        let (w, lp, n) = (&self.params, self.layout.layers[l], ws.batch * ws.seq);
        ops::rope_backward(be, &ws.dq, &self.rope, 0, &mut ws.q_raw_grad)?;
        ops::rope_backward(be, &ws.dk, &self.rope, 0, &mut ws.k_raw_grad)?;
        let a = &ws.layers[l];
        for t in [&mut ws.q_raw_grad, &mut ws.k_raw_grad, &mut ws.dv] {
            let m = t.numel() / n;
            t.set_shape(&[n, m])?;
        }
        ops::matmul(be, &a.ln1, &ws.q_raw_grad, &mut grads[lp.wq], true, false, 1.0, 1.0)?;
        ops::matmul(be, &a.ln1, &ws.k_raw_grad, &mut grads[lp.wk], true, false, 1.0, 1.0)?;
        ops::matmul(be, &a.ln1, &ws.dv, &mut grads[lp.wv], true, false, 1.0, 1.0)?;
        ops::matmul(be, &ws.q_raw_grad, &w[lp.wq], &mut ws.dln, false, true, 1.0, 0.0)?;
        ops::matmul(be, &ws.k_raw_grad, &w[lp.wk], &mut ws.dln, false, true, 1.0, 1.0)?;
        ops::matmul(be, &ws.dv, &w[lp.wv], &mut ws.dln, false, true, 1.0, 1.0)?;
        for (t, like) in [(&mut ws.q_raw_grad, &a.q), (&mut ws.k_raw_grad, &a.k), (&mut ws.dv, &a.k)] {
            t.set_shape(like.shape())?;
        }
        let (g1, b1) = pair(grads, lp.ln1g, lp.ln1b);
        ops::layernorm_backward(be, &ws.dln, &ws.x[l], &w[lp.ln1g], &a.mean1, &a.rstd1, &mut ws.tmp, g1, b1)?;
        ops::axpby(be, 1.0, &ws.tmp, 1.0, &mut ws.dx)
    }

    /// The parameters as f32 host vectors.
    pub fn values(&self, be: &B) -> Result<Vec<Vec<f32>>> {
        self.params.iter().map(|p| p.to_f32_vec(be)).collect()
    }
}

/// Two distinct mutable gradient tensors.
fn pair<B: Backend>(g: &mut [Tensor<B>], i: usize, j: usize) -> (&mut Tensor<B>, &mut Tensor<B>) {
    assert!(i < j, "parameter layout keeps gamma before beta");
    let (lo, hi) = g.split_at_mut(j);
    (&mut lo[i], &mut hi[0])
}

/// Targets equal to this are ignored by the loss.
pub const IGNORE: u32 = u32::MAX;

/// What a forward pass measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ForwardStats {
    /// Mean cross-entropy (nats) over the non-ignored targets.
    pub loss: f64,
    /// Number of non-ignored targets.
    pub valid: usize,
}

/// Saved activations of one layer.
struct LayerActs<B: Backend> {
    ln1: Tensor<B>,
    mean1: Tensor<B>,
    rstd1: Tensor<B>,
    q: Tensor<B>,
    k: Tensor<B>,
    v: Tensor<B>,
    att: Tensor<B>,
    lse: Tensor<B>,
    xm: Tensor<B>,
    ln2: Tensor<B>,
    mean2: Tensor<B>,
    rstd2: Tensor<B>,
    hb: Tensor<B>,
    act: Tensor<B>,
}

/// Indexer buffers (sparse models): projections, scores, selections per layer.
struct IndexerWs<B: Backend> {
    qi: Tensor<B>,
    ki: Tensor<B>,
    w: Tensor<B>,
    pooled: Tensor<B>,
    select: Vec<Tensor<B>>,
    scores: Tensor<B>,
    dscores: Tensor<B>,
    kl: Tensor<B>,
    dqi: Tensor<B>,
    dki: Tensor<B>,
    dw: Tensor<B>,
}

impl<B: Backend> IndexerWs<B> {
    /// q_i = ln1·Wqi, k_i = ln1·Wki, w = ln1·Ww, reshaped for the indexer ops.
    fn project(&mut self, be: &B, ln1: &Tensor<B>, w: &[Tensor<B>], (wq, wk, ww): (usize, usize, usize)) -> Result<()> {
        for (dst, wi) in [(&mut self.qi, wq), (&mut self.ki, wk), (&mut self.w, ww)] {
            let shape = dst.shape().to_vec();
            let n = ln1.shape()[0];
            dst.set_shape(&[n, dst.numel() / n])?;
            ops::matmul(be, ln1, &w[wi], dst, false, false, 1.0, 0.0)?;
            dst.set_shape(&shape)?;
        }
        Ok(())
    }
}

/// Every activation and activation-gradient buffer of one (batch, seq) shape,
/// allocated once.
pub struct Workspace<B: Backend> {
    pub batch: usize,
    pub seq: usize,
    ids: Tensor<B>,
    targets: Tensor<B>,
    /// Residual stream: `x[l]` enters layer `l`; `x[n_layers]` leaves the last.
    x: Vec<Tensor<B>>,
    layers: Vec<LayerActs<B>>,
    idx: Option<IndexerWs<B>>,
    lnf: Tensor<B>,
    meanf: Tensor<B>,
    rstdf: Tensor<B>,
    logits: Tensor<B>,
    losses: Tensor<B>,
    q_raw: Tensor<B>,
    k_raw: Tensor<B>,
    // gradients of activations
    dlogits: Tensor<B>,
    dx: Tensor<B>,
    dln: Tensor<B>,
    tmp: Tensor<B>,
    dact: Tensor<B>,
    dhb: Tensor<B>,
    datt: Tensor<B>,
    dq: Tensor<B>,
    dk: Tensor<B>,
    dv: Tensor<B>,
    q_raw_grad: Tensor<B>,
    k_raw_grad: Tensor<B>,
    valid: usize,
    attn: StepAttention,
}

impl<B: Backend> Workspace<B> {
    /// The key blocks each query of layer `layer` kept in the last sparse
    /// forward pass (`[batch, seq, keep]` U32), if it was sparse.
    pub fn selection(&self, layer: usize) -> Option<&Tensor<B>> {
        match self.attn {
            StepAttention::Sparse { .. } => self.idx.as_ref().and_then(|ix| ix.select.get(layer)),
            StepAttention::Dense => None,
        }
    }

    /// Logits of the last forward pass, `[batch·seq, vocab]` as f32.
    pub fn logits_f32(&self, be: &B) -> Result<Vec<f32>> {
        self.logits.to_f32_vec(be)
    }

    /// Allocates every buffer for `batch` sequences of `seq` tokens.
    pub fn new(be: &B, cfg: &ModelConfig, dtype: DType, batch: usize, seq: usize) -> Result<Self> {
        if seq == 0 || batch == 0 {
            return Err(Error::Invalid("workspace: batch and sequence length must be positive".into()));
        }
        if seq > cfg.context {
            return Err(Error::Invalid(format!(
                "sequence length {seq} is longer than the model's context of {} tokens",
                cfg.context
            )));
        }
        let (n, c, f, hd) = (batch * seq, cfg.d_model, cfg.hidden(), cfg.head_dim());
        let e = |shape: &[usize]| Tensor::empty(be, shape, dtype);
        let f32t = |shape: &[usize]| Tensor::empty(be, shape, DType::F32);
        let qs = [batch, seq, cfg.n_heads, hd];
        let ks = [batch, seq, cfg.n_kv_heads, hd];
        let layers = (0..cfg.n_layers)
            .map(|_| {
                Ok(LayerActs {
                    ln1: e(&[n, c])?,
                    mean1: f32t(&[n])?,
                    rstd1: f32t(&[n])?,
                    q: e(&qs)?,
                    k: e(&ks)?,
                    v: e(&[n, cfg.n_kv_heads * hd])?,
                    att: e(&qs)?,
                    lse: f32t(&[batch, cfg.n_heads, seq])?,
                    xm: e(&[n, c])?,
                    ln2: e(&[n, c])?,
                    mean2: f32t(&[n])?,
                    rstd2: f32t(&[n])?,
                    hb: e(&[n, f])?,
                    act: e(&[n, f])?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let idx = match cfg.attention {
            AttentionMode::Dense => None,
            AttentionMode::Sparse { block, keep_blocks, index_heads, index_dim } => {
                let nb = seq.div_ceil(block);
                Some(IndexerWs {
                    qi: e(&[batch, seq, index_heads, index_dim])?,
                    ki: e(&[batch, seq, index_dim])?,
                    w: e(&[batch, seq, index_heads])?,
                    pooled: f32t(&[batch, seq, nb])?,
                    select: (0..cfg.n_layers)
                        .map(|_| Tensor::empty(be, &[batch, seq, keep_blocks.min(nb)], DType::U32))
                        .collect::<Result<_>>()?,
                    scores: f32t(&[batch, seq, seq])?,
                    dscores: f32t(&[batch, seq, seq])?,
                    kl: f32t(&[batch, seq])?,
                    dqi: e(&[batch, seq, index_heads, index_dim])?,
                    dki: e(&[batch, seq, index_dim])?,
                    dw: e(&[batch, seq, index_heads])?,
                })
            }
        };
        Ok(Workspace {
            batch,
            seq,
            ids: Tensor::zeros(be, &[n], DType::U32)?,
            targets: Tensor::zeros(be, &[n], DType::U32)?,
            x: (0..=cfg.n_layers).map(|_| e(&[n, c])).collect::<Result<_>>()?,
            layers,
            idx,
            lnf: e(&[n, c])?,
            meanf: f32t(&[n])?,
            rstdf: f32t(&[n])?,
            logits: e(&[n, cfg.vocab])?,
            losses: f32t(&[n])?,
            q_raw: e(&[n, cfg.n_heads * hd])?,
            k_raw: e(&[n, cfg.n_kv_heads * hd])?,
            dlogits: e(&[n, cfg.vocab])?,
            dx: e(&[n, c])?,
            dln: e(&[n, c])?,
            tmp: e(&[n, c])?,
            dact: e(&[n, f])?,
            dhb: e(&[n, f])?,
            datt: e(&[n, cfg.n_heads * hd])?,
            dq: e(&qs)?,
            dk: e(&ks)?,
            dv: e(&ks)?,
            q_raw_grad: e(&qs)?,
            k_raw_grad: e(&ks)?,
            valid: 0,
            attn: StepAttention::Dense,
        })
    }
}
