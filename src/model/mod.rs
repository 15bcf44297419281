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

use crate::attention::{self, Pattern, RowSample};
use crate::error::{Error, Result};
use crate::ops::{self, QWeight, RopeTable};
use crate::quant::QMatrix;
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

/// The per-layer hook of [`Model::backward_with`]: `(backend, gradients, parameters just finished)`.
pub type LayerHook<'a, B> = dyn FnMut(&B, &mut [Tensor<B>], &[usize]) -> Result<()> + 'a;

/// The layout of the parameter list of a config.
#[derive(Clone, Debug)]
struct ParamLayout {
    emb: usize,
    layers: Vec<LayerParams>,
    lnfg: usize,
    lnfb: usize,
}

impl LayerParams {
    /// Every parameter index of the layer (the indexer's included).
    fn indices(&self) -> Vec<usize> {
        let mut v = vec![
            self.ln1g, self.ln1b, self.wq, self.wk, self.wv, self.wo, self.ln2g, self.ln2b, self.w1, self.b1, self.w2,
            self.b2,
        ];
        v.extend(self.indexer.iter().flat_map(|&(a, b, c)| [a, b, c]));
        v
    }
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
    /// One tensor per entry of `cfg.params()`, in that order (a one-element
    /// placeholder where the weight is quantized).
    pub params: Vec<Tensor<B>>,
    /// Per entry of `cfg.params()`: the quantized weight (`[n, k]`, the
    /// transpose of the dense `[k, n]`) that replaces it, if any. Only linear
    /// weights (see [`Model::quantizable`]) may be quantized.
    pub quant: Vec<Option<QWeight<B>>>,
    rope: RopeTable<B>,
    layout: ParamLayout,
}

/// The product a linear layer runs: `matmul` (a full forward pass) or
/// `matmul_rows` (the inference step, batch invariant).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Product {
    Full,
    Rows,
}

impl<B: Backend> Model<B> {
    /// A model with the given parameter values (f32, converted to `dtype`).
    pub fn from_values(be: &B, cfg: ModelConfig, dtype: DType, values: &[Vec<f32>]) -> Result<Self> {
        Self::from_parts(be, cfg, dtype, values, &[])
    }

    /// A model whose linear weights may be quantized: `quant[i]` (when
    /// present and `Some`) replaces parameter `i`, whose dense value in
    /// `values` is then ignored (it may be empty). `quant` is empty or has one
    /// entry per parameter. A quantized model is inference-only.
    pub fn from_parts(
        be: &B,
        cfg: ModelConfig,
        dtype: DType,
        values: &[Vec<f32>],
        quant: &[Option<QMatrix>],
    ) -> Result<Self> {
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
        if !quant.is_empty() && quant.len() != infos.len() {
            return Err(Error::Format(format!(
                "model: {} quantized-weight slots for a config with {} parameters",
                quant.len(),
                infos.len()
            )));
        }
        let linear = Self::quantizable(&cfg);
        let mut params = Vec::with_capacity(infos.len());
        let mut qs = Vec::with_capacity(infos.len());
        for (i, (p, v)) in infos.iter().zip(values).enumerate() {
            match quant.get(i).and_then(Option::as_ref) {
                Some(q) => {
                    // The dense weight is [k, n]; its quantized form is [n, k].
                    let [k, n] = p.shape[..] else { unreachable!("linear weights are 2-D") };
                    if !linear.contains(&i) || (q.n, q.k) != (n, k) {
                        return Err(Error::Format(format!(
                            "model: `{}` {} cannot take a quantized {}×{} weight (only linear weights, as [n, k] = [{n}, {k}])",
                            p.name,
                            crate::error::fmt_shape(&p.shape),
                            q.n,
                            q.k
                        )));
                    }
                    params.push(Tensor::zeros(be, &[1], dtype)?);
                    qs.push(Some(QWeight::upload(be, q)?));
                }
                None => {
                    params.push(Tensor::from_f32(be, v, &p.shape, dtype)?);
                    qs.push(None);
                }
            }
        }
        let rope = RopeTable::new(be, cfg.context, cfg.head_dim(), cfg.rope_theta)?;
        Ok(Model { layout: ParamLayout::new(&cfg), cfg, dtype, params, quant: qs, rope })
    }

    /// Indices (in `cfg.params()`) of the weights that may be quantized: the
    /// attention and MLP projections wq, wk, wv, wo, w1, w2 of every layer.
    /// The embedding (also the LM head), LayerNorms, biases and the indexer
    /// projections stay dense: the indexer's scores pick key blocks by a
    /// discrete top-k, and its weights are a few percent of a layer.
    pub fn quantizable(cfg: &ModelConfig) -> Vec<usize> {
        ParamLayout::new(cfg).layers.iter().flat_map(|l| [l.wq, l.wk, l.wv, l.wo, l.w1, l.w2]).collect()
    }

    /// Whether any weight is quantized.
    pub fn is_quantized(&self) -> bool {
        self.quant.iter().any(Option::is_some)
    }

    /// Device bytes of the weights: dense tensors in the working dtype plus
    /// every quantized weight's parts (codes, scales, zeros, metadata).
    pub fn weight_bytes(&self) -> usize {
        self.params.iter().zip(&self.quant).map(|(p, q)| q.as_ref().map_or(p.size_bytes(), QWeight::bytes)).sum()
    }

    /// `y = x·W` (`beta = 0`) or `y += x·W` (`beta = 1`) for the linear weight
    /// `i` (dense `[k, n]`): `matmul`/`matmul_rows` on a dense weight,
    /// `qmatmul` on a quantized one (which writes a fresh product, added to
    /// `y` after rounding to the dtype when accumulating). The one call site
    /// of every linear product, so no model code branches on the format.
    fn linear(&self, be: &B, how: Product, x: &Tensor<B>, i: usize, y: &mut Tensor<B>, beta: f32) -> Result<()> {
        match (&self.quant[i], how) {
            (None, Product::Full) => ops::matmul(be, x, &self.params[i], y, false, false, 1.0, beta),
            (None, Product::Rows) => ops::matmul_rows(be, x, &self.params[i], y, false, 1.0, beta),
            (Some(q), _) if beta == 0.0 => ops::qmatmul(be, x, q, y),
            (Some(q), _) => {
                let mut t = Tensor::empty(be, y.shape(), y.dtype())?;
                ops::qmatmul(be, x, q, &mut t)?;
                ops::axpby(be, 1.0, &t, beta, y)
            }
        }
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
        self.forward_with(be, ws, ids, targets, attn, None)
    }

    /// [`Model::forward`] that can leave the loss on the device: with
    /// `loss_acc` (one f32 element) the batch's mean loss is added to it there
    /// and [`ForwardStats::loss`] is NaN — no readback (a training step reads
    /// its statistics once, at its end).
    pub fn forward_with(
        &self,
        be: &B,
        ws: &mut Workspace<B>,
        ids: &[u32],
        targets: Option<&[u32]>,
        attn: StepAttention,
        loss_acc: Option<&mut Tensor<B>>,
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
        // Targets are uploaded before any kernel is recorded (a write submits the pending ones).
        if let Some(tg) = targets {
            ws.write_targets(be, tg)?;
        }
        let w = &self.params;
        ops::embedding(be, &ws.ids, &w[self.layout.emb], &mut ws.x[0])?;
        ws.attn = attn;
        for (l, lp) in self.layout.layers.iter().enumerate() {
            let (xs, rest) = ws.x.split_at_mut(l + 1);
            let (x, xnext) = (&xs[l], &mut rest[0]);
            let a = &mut ws.layers[l];
            ops::layernorm(be, x, &w[lp.ln1g], &w[lp.ln1b], &mut a.ln1, &mut a.mean1, &mut a.rstd1, 1e-5)?;
            self.linear(be, Product::Full, &a.ln1, lp.wq, &mut ws.q_raw, 0.0)?;
            self.linear(be, Product::Full, &a.ln1, lp.wk, &mut ws.k_raw, 0.0)?;
            a.v.set_shape(&[n, a.v.numel() / n])?;
            self.linear(be, Product::Full, &a.ln1, lp.wv, &mut a.v, 0.0)?;
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
            self.linear(be, Product::Full, &a.att, lp.wo, &mut a.xm, 1.0)?;
            a.att.set_shape(a.q.shape())?;
            ops::layernorm(be, &a.xm, &w[lp.ln2g], &w[lp.ln2b], &mut a.ln2, &mut a.mean2, &mut a.rstd2, 1e-5)?;
            self.linear(be, Product::Full, &a.ln2, lp.w1, &mut a.hb, 0.0)?;
            ops::bias_add(be, &mut a.hb, &w[lp.b1])?;
            ops::gelu(be, &a.hb, &mut a.act)?;
            // x_{l+1} = xm + act·W2 + b2
            ops::cast(be, &a.xm, xnext)?;
            self.linear(be, Product::Full, &a.act, lp.w2, xnext, 1.0)?;
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
        self.lm_head_forward(be, ws, targets.is_some())?;
        let Some(tg) = targets else { return Ok(ForwardStats { loss: f64::NAN, valid: 0 }) };
        let valid = tg.iter().filter(|&&x| x != IGNORE && (x as usize) < self.cfg.vocab).count();
        ws.valid = valid;
        if let Some(acc) = loss_acc {
            if valid > 0 {
                // acc += Σ losses / valid, summed on the device (the per-row losses are not read again).
                let n = ws.losses.numel();
                ops::scale(be, &mut ws.losses, 1.0 / valid as f32)?;
                ws.losses.set_shape(&[n, 1])?;
                let r = ops::sum_rows(be, &ws.losses, acc, 1.0);
                ws.losses.set_shape(&[n])?;
                r?;
            }
            return Ok(ForwardStats { loss: f64::NAN, valid });
        }
        let losses = ws.losses.to_f32_vec(be)?;
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
        self.backward_with(be, ws, grads, loss_scale, train_indexer, None, &mut |_, _, _| Ok(()))
    }

    /// [`Model::backward`] with a per-layer hook: `done(be, grads, finished)`
    /// is called as soon as the gradients of the parameters `finished` are
    /// final — the final LayerNorm's first, then each layer's in reverse
    /// order, the token embedding (tied with the LM head) last — while the
    /// layers before them are still to be differentiated. Every parameter is
    /// reported exactly once. A data-parallel step reduces a gradient bucket
    /// from here as soon as all its tensors are done (DDP's overlap). With
    /// `kl_acc` (one f32 element) the mean indexer KL is added to it on the
    /// device and 0 is returned (no readback per layer).
    #[allow(clippy::too_many_arguments)]
    pub fn backward_with(
        &self,
        be: &B,
        ws: &mut Workspace<B>,
        grads: &mut [Tensor<B>],
        loss_scale: f32,
        train_indexer: bool,
        mut kl_acc: Option<&mut Tensor<B>>,
        done: &mut LayerHook<'_, B>,
    ) -> Result<f64> {
        if self.is_quantized() {
            return Err(Error::Invalid(
                "a model with quantized weights is inference-only: train the dense checkpoint, then compress it".into(),
            ));
        }
        let w = &self.params;
        let lay = &self.layout;
        let n = ws.batch * ws.seq;
        if grads.len() != w.len() {
            return Err(Error::Shape(format!("backward: {} gradient tensors for {} parameters", grads.len(), w.len())));
        }
        self.lm_head_backward(be, ws, &mut grads[lay.emb], loss_scale / ws.valid.max(1) as f32)?;
        let (gf, gb) = pair(grads, lay.lnfg, lay.lnfb);
        let xl = &ws.x[self.cfg.n_layers];
        ops::layernorm_backward(be, &ws.dln, xl, &w[lay.lnfg], &ws.meanf, &ws.rstdf, &mut ws.dx, gf, gb)?;
        done(be, grads, &[lay.lnfg, lay.lnfb])?;
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
                // The KL's query rows: every row, or (sparse steps) the workspace's sample,
                // whose gradient and mean divide by the sampled rows instead of all n.
                let sample = if sparse_step { ws.kl_rows } else { RowSample::ALL };
                let kl_rows = ws.batch * sample.count(ws.seq);
                let grad_scale = loss_scale / kl_rows as f32;
                // Sparse phase: the KL and its gradient live on the kept keys only; a backend
                // with the fused kernel computes them there, in O(n·|K|) instead of O(n²).
                let fused = sparse_step
                    && attention::indexer_train_kept(
                        be,
                        &ix.qi,
                        &ix.ki,
                        &ix.w,
                        &a.q,
                        &a.k,
                        &a.lse,
                        Pattern::Blocks { idx: &ix.select[l], block },
                        grad_scale,
                        sample,
                        &mut ix.kl,
                        &mut ix.dqi,
                        &mut ix.dki,
                        &mut ix.dw,
                    )?;
                // Otherwise the [B, seq, seq] scores and their gradient, one tile of query rows
                // at a time: the KL rows and dq_i, dw rows are the tile's; dk_i adds up over tiles.
                let tiles = if fused { 0 } else { ws.seq };
                for q0 in (0..tiles).step_by(ix.tile) {
                    let (scores, dscores) = match ix.tail.as_mut() {
                        Some(t) if q0 + ix.tile > ws.seq => (&mut t.0, &mut t.1),
                        _ => (&mut ix.scores, &mut ix.dscores),
                    };
                    attention::indexer_scores_rows(be, &ix.qi, &ix.ki, &ix.w, q0, scores)?;
                    let pat = if sparse_step { Pattern::Blocks { idx: &ix.select[l], block } } else { Pattern::Dense };
                    attention::indexer_kl_rows(be, &a.q, &a.k, &a.lse, scores, pat, q0, sample, &mut ix.kl, dscores)?;
                    ops::scale(be, dscores, grad_scale)?;
                    let Some((dki_tile, acc)) = ix.dki_tiles.as_mut() else {
                        let (dqi, dki, dw) = (&mut ix.dqi, &mut ix.dki, &mut ix.dw);
                        attention::indexer_backward(be, &ix.qi, &ix.ki, &ix.w, dscores, dqi, dki, dw)?;
                        continue;
                    };
                    let (dqi, dw) = (&mut ix.dqi, &mut ix.dw);
                    attention::indexer_backward_rows(be, &ix.qi, &ix.ki, &ix.w, dscores, q0, dqi, dki_tile, dw)?;
                    // dk_i sums the tiles' contributions in f32 (each rounded once to the dtype).
                    if q0 == 0 {
                        ops::cast(be, dki_tile, acc)?;
                    } else {
                        ops::axpby(be, 1.0, dki_tile, 1.0, acc)?;
                    }
                }
                if let Some((_, acc)) = ix.dki_tiles.as_ref().filter(|_| !fused) {
                    ops::cast(be, acc, &mut ix.dki)?;
                }
                match kl_acc.as_deref_mut() {
                    // acc += Σ KL / (n · layers) on the device: the mean KL this function would return.
                    Some(acc) => {
                        let shape = ix.kl.shape().to_vec();
                        ops::scale(be, &mut ix.kl, 1.0 / (kl_rows * self.cfg.n_layers) as f32)?;
                        ix.kl.set_shape(&[ix.kl.numel(), 1])?;
                        let r = ops::sum_rows(be, &ix.kl, acc, 1.0);
                        ix.kl.set_shape(&shape)?;
                        r?;
                    }
                    None => {
                        kl_total += ix.kl.to_f32_vec(be)?.iter().map(|&x| x as f64).sum::<f64>() / kl_rows as f64;
                    }
                }
                let (wq, wk, ww) = ip;
                for (dst, src) in [(wq, &mut ix.dqi), (wk, &mut ix.dki), (ww, &mut ix.dw)] {
                    let shape = src.shape().to_vec();
                    src.set_shape(&[n, src.numel() / n])?;
                    ops::matmul(be, &a.ln1, src, &mut grads[dst], true, false, 1.0, 1.0)?;
                    src.set_shape(&shape)?;
                }
            }
            self.qkv_backward(be, ws, l, grads)?;
            done(be, grads, &lp.indices())?;
        }
        ops::embedding_backward(be, &ws.ids, &ws.dx, &mut grads[lay.emb])?;
        done(be, grads, &[lay.emb])?;
        Ok(kl_total / self.cfg.n_layers as f64)
    }

    /// `logits = lnf·Eᵀ` and, `with_loss`, the per-row cross-entropy into
    /// `ws.losses`. Chunked (see [`LmChunks`]): chunk `c` gathers its rows of
    /// `lnf`, keeps its own logits and scatters its losses into their rows.
    fn lm_head_forward(&self, be: &B, ws: &mut Workspace<B>, with_loss: bool) -> Result<()> {
        let emb = &self.params[self.layout.emb];
        let Some(ch) = ws.lm.as_mut() else {
            ops::matmul(be, &ws.lnf, emb, &mut ws.logits[0], false, true, 1.0, 0.0)?;
            if with_loss {
                ops::cross_entropy(be, &ws.logits[0], &ws.targets, &mut ws.losses, IGNORE)?;
            }
            return Ok(());
        };
        let n = ws.losses.numel();
        if with_loss {
            ops::fill(be, &mut ws.losses, 0.0)?;
            ws.losses.set_shape(&[n, 1])?;
        }
        for (c, logits) in ws.logits.iter_mut().enumerate() {
            ops::embedding(be, &ch.rows[c], &ws.lnf, &mut ch.lnf)?;
            ops::matmul(be, &ch.lnf, emb, logits, false, true, 1.0, 0.0)?;
            if with_loss {
                ch.losses.set_shape(&[ch.len])?;
                ops::cross_entropy(be, logits, &ch.targets[c], &mut ch.losses, IGNORE)?;
                ch.losses.set_shape(&[ch.len, 1])?;
                ops::embedding_backward(be, &ch.rows[c], &ch.losses, &mut ws.losses)?;
            }
        }
        ws.losses.set_shape(&[n])
    }

    /// Backward of [`Model::lm_head_forward`] with `dlogits = gs·(softmax − onehot)`:
    /// `d_lnf = dlogits·E` into `ws.dln` (overwritten), `dE += dlogitsᵀ·lnf`. The
    /// row chunks' contributions to `dE` add up; their `d_lnf` rows are disjoint.
    fn lm_head_backward(&self, be: &B, ws: &mut Workspace<B>, demb: &mut Tensor<B>, gs: f32) -> Result<()> {
        let emb = &self.params[self.layout.emb];
        let Some(ch) = ws.lm.as_mut() else {
            ops::cross_entropy_backward(be, &ws.logits[0], &ws.targets, &mut ws.dlogits, IGNORE, gs)?;
            ops::matmul(be, &ws.dlogits, emb, &mut ws.dln, false, false, 1.0, 0.0)?;
            return ops::matmul(be, &ws.dlogits, &ws.lnf, demb, true, false, 1.0, 1.0);
        };
        ops::fill(be, &mut ws.dln, 0.0)?;
        for (c, logits) in ws.logits.iter().enumerate() {
            ops::cross_entropy_backward(be, logits, &ch.targets[c], &mut ws.dlogits, IGNORE, gs)?;
            ops::matmul(be, &ws.dlogits, emb, &mut ch.dln, false, false, 1.0, 0.0)?;
            ops::embedding_backward(be, &ch.rows[c], &ch.dln, &mut ws.dln)?;
            ops::embedding(be, &ch.rows[c], &ws.lnf, &mut ch.lnf)?;
            ops::matmul(be, &ws.dlogits, &ch.lnf, demb, true, false, 1.0, 1.0)?;
        }
        Ok(())
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
        if self.is_quantized() {
            return Err(Error::Invalid("model: the dense values of a quantized model do not exist".into()));
        }
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
    /// Query rows per tile of the training scores (`seq`: one tile).
    tile: usize,
    /// `[batch, tile, seq]` F32 scores and their gradient, and the same for a
    /// shorter last tile when `tile` does not divide `seq`.
    scores: Tensor<B>,
    dscores: Tensor<B>,
    tail: Option<(Tensor<B>, Tensor<B>)>,
    /// Tiled: one tile's contribution to `dk_i`, and their F32 sum.
    dki_tiles: Option<(Tensor<B>, Tensor<B>)>,
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

/// The LM head in row chunks: chunk `c` covers rows `c·len .. (c+1)·len` of
/// the `n = batch·seq` rows (the last one padded past `n`). No logits tensor
/// then passes the backend's largest binding; the loss is a sum over rows and
/// `dE` a sum over rows, so chunks add up to the unchunked result.
struct LmChunks<B: Backend> {
    /// Rows per chunk.
    len: usize,
    /// Per chunk, U32 `[len]`: its row numbers. Padding rows are `≥ n`, which
    /// `embedding` gathers as zero rows and `embedding_backward` skips.
    rows: Vec<Tensor<B>>,
    /// Per chunk, U32 `[len]`: its targets, `IGNORE` on padding rows.
    targets: Vec<Tensor<B>>,
    /// One chunk's rows of `lnf`, and of `d_lnf`: `[len, c]`.
    lnf: Tensor<B>,
    dln: Tensor<B>,
    /// One chunk's losses, F32 `[len, 1]`.
    losses: Tensor<B>,
}

/// Bytes one buffer may hold for the model's chunking: the backend's largest
/// binding, lowered by `DYNSPARSE_CHUNK_BYTES` (tests and benchmarks force
/// small chunks with it). An unparsable value is an error.
pub fn chunk_budget<B: Backend>(be: &B) -> Result<u64> {
    let max = be.max_binding_bytes();
    match std::env::var("DYNSPARSE_CHUNK_BYTES").ok().as_deref().map(str::trim) {
        None | Some("") => Ok(max),
        Some(v) => match v.parse::<u64>() {
            Ok(b) if b > 0 => Ok(b.min(max)),
            _ => Err(Error::Invalid(format!("DYNSPARSE_CHUNK_BYTES={v}: expected a positive number of bytes"))),
        },
    }
}

/// Rows per LM-head chunk for `n` rows of `vocab` logits under `budget`
/// bytes per buffer: logits are counted as f32 whatever the dtype (wgpu
/// writes half-precision outputs through an f32 staging buffer), and a chunk
/// stays within the u32 element counts of the op specs. At least one row.
pub fn lm_chunk_rows(n: usize, vocab: usize, budget: u64) -> usize {
    let per_row = (vocab as u64).max(1);
    let rows = (budget / 4 / per_row).min(u32::MAX as u64 / per_row);
    (rows as usize).clamp(1, n.max(1))
}

/// Query rows per tile of the indexer's `[batch, rows, seq]` F32 training
/// scores under `budget` bytes per buffer (and the u32 element counts of the
/// op specs); at least one row, at most `seq`.
pub fn score_tile_rows(batch: usize, seq: usize, budget: u64) -> usize {
    let per_row = (batch as u64 * seq as u64).max(1);
    let rows = (budget / 4 / per_row).min(u32::MAX as u64 / per_row);
    (rows as usize).clamp(1, seq.max(1))
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
    /// `[rows, vocab]` logits: one tensor of all `n` rows, or one per row chunk.
    logits: Vec<Tensor<B>>,
    /// The LM head's row chunks, when the logits of all rows do not fit in one binding.
    lm: Option<LmChunks<B>>,
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
    /// The query rows whose indexer KL the sparse-phase backward passes train.
    kl_rows: RowSample,
}

impl<B: Backend> Workspace<B> {
    /// Trains the indexers' KL on the query rows of `sample` only in the
    /// backward passes of sparse steps (default [`RowSample::ALL`]); the
    /// gradient is scaled by the sampled row count, an unbiased estimate of
    /// the all-rows gradient. Dense steps always use every row.
    pub fn set_indexer_kl_rows(&mut self, sample: RowSample) -> Result<()> {
        sample.check("indexer KL rows")?;
        if sample.every > self.seq.max(1) {
            return Err(Error::Invalid(format!(
                "indexer KL rows: every {} exceeds the workspace's seq {}",
                sample.every, self.seq
            )));
        }
        self.kl_rows = sample;
        Ok(())
    }

    /// The row sample of [`Workspace::set_indexer_kl_rows`].
    pub fn indexer_kl_rows(&self) -> RowSample {
        self.kl_rows
    }

    /// The key blocks each query of layer `layer` kept in the last sparse
    /// forward pass (`[batch, seq, keep]` U32), if it was sparse.
    pub fn selection(&self, layer: usize) -> Option<&Tensor<B>> {
        match self.attn {
            StepAttention::Sparse { .. } => self.idx.as_ref().and_then(|ix| ix.select.get(layer)),
            StepAttention::Dense => None,
        }
    }

    /// The inputs of layer `layer`'s linear weights in the last forward pass,
    /// `batch·seq` rows each: `ln1` (→ wq, wk, wv), `att` (→ wo), `ln2` (→ w1),
    /// `act` (→ w2). Compression calibration (`quant::calib`) reads them.
    pub fn linear_inputs(&self, layer: usize) -> Option<[&Tensor<B>; 4]> {
        self.layers.get(layer).map(|a| [&a.ln1, &a.att, &a.ln2, &a.act])
    }

    /// Logits of the last forward pass, `[batch·seq, vocab]` as f32 (the row
    /// chunks concatenated on the host).
    pub fn logits_f32(&self, be: &B) -> Result<Vec<f32>> {
        let n = self.batch * self.seq;
        let mut out = Vec::new();
        for l in &self.logits {
            let v = l.to_f32_vec(be)?;
            let keep = v.len().min((n * l.last_dim()).saturating_sub(out.len()));
            out.extend_from_slice(&v[..keep]);
        }
        Ok(out)
    }

    /// Rows per LM-head chunk (`batch·seq` when the logits are one tensor).
    pub fn lm_chunk_rows(&self) -> usize {
        self.lm.as_ref().map_or(self.batch * self.seq, |c| c.len)
    }

    /// Query rows per tile of the indexer's training scores (sparse models).
    pub fn indexer_tile_rows(&self) -> Option<usize> {
        self.idx.as_ref().map(|ix| ix.tile)
    }

    /// Uploads the targets (`IGNORE` on the padding rows of the last chunk).
    fn write_targets(&mut self, be: &B, tg: &[u32]) -> Result<()> {
        let as_f32 = |t: &[u32]| t.iter().map(|&x| x as f32).collect::<Vec<_>>();
        let Some(ch) = self.lm.as_mut() else { return self.targets.write_f32(be, &as_f32(tg)) };
        for (c, t) in ch.targets.iter_mut().enumerate() {
            let mut rows = tg.iter().skip(c * ch.len).take(ch.len).copied().collect::<Vec<_>>();
            rows.resize(ch.len, IGNORE);
            t.write_f32(be, &as_f32(&rows))?;
        }
        Ok(())
    }

    /// Allocates every buffer for `batch` sequences of `seq` tokens; the
    /// largest ones are split under [`chunk_budget`].
    pub fn new(be: &B, cfg: &ModelConfig, dtype: DType, batch: usize, seq: usize) -> Result<Self> {
        Self::with_chunk_bytes(be, cfg, dtype, batch, seq, chunk_budget(be)?)
    }

    /// [`Workspace::new`] with at most `chunk_bytes` (and the backend's largest
    /// binding) per LM-head logits chunk and per tile of the indexer's
    /// training scores.
    pub fn with_chunk_bytes(
        be: &B,
        cfg: &ModelConfig,
        dtype: DType,
        batch: usize,
        seq: usize,
        chunk_bytes: u64,
    ) -> Result<Self> {
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
        let budget = chunk_bytes.min(be.max_binding_bytes());
        let idx = match cfg.attention {
            AttentionMode::Dense => None,
            AttentionMode::Sparse { block, keep_blocks, index_heads, index_dim } => {
                let nb = seq.div_ceil(block);
                let tile = score_tile_rows(batch, seq, budget);
                let rest = seq % tile;
                Some(IndexerWs {
                    qi: e(&[batch, seq, index_heads, index_dim])?,
                    ki: e(&[batch, seq, index_dim])?,
                    w: e(&[batch, seq, index_heads])?,
                    pooled: f32t(&[batch, seq, nb])?,
                    select: (0..cfg.n_layers)
                        .map(|_| Tensor::empty(be, &[batch, seq, keep_blocks.min(nb)], DType::U32))
                        .collect::<Result<_>>()?,
                    tile,
                    scores: f32t(&[batch, tile, seq])?,
                    dscores: f32t(&[batch, tile, seq])?,
                    tail: if rest > 0 { Some((f32t(&[batch, rest, seq])?, f32t(&[batch, rest, seq])?)) } else { None },
                    dki_tiles: if tile < seq {
                        Some((e(&[batch, seq, index_dim])?, f32t(&[batch, seq, index_dim])?))
                    } else {
                        None
                    },
                    kl: f32t(&[batch, seq])?,
                    dqi: e(&[batch, seq, index_heads, index_dim])?,
                    dki: e(&[batch, seq, index_dim])?,
                    dw: e(&[batch, seq, index_heads])?,
                })
            }
        };
        let len = lm_chunk_rows(n, cfg.vocab, budget);
        let (logits, lm) = if len >= n {
            (vec![e(&[n, cfg.vocab])?], None)
        } else {
            let chunks = n.div_ceil(len);
            let rows = (0..chunks)
                .map(|c| Tensor::from_u32(be, &(c * len..(c + 1) * len).map(|r| r as u32).collect::<Vec<_>>(), &[len]))
                .collect::<Result<Vec<_>>>()?;
            let ch = LmChunks {
                len,
                rows,
                targets: (0..chunks).map(|_| Tensor::zeros(be, &[len], DType::U32)).collect::<Result<_>>()?,
                lnf: e(&[len, c])?,
                dln: e(&[len, c])?,
                losses: f32t(&[len, 1])?,
            };
            ((0..chunks).map(|_| e(&[len, cfg.vocab])).collect::<Result<_>>()?, Some(ch))
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
            logits,
            lm,
            losses: f32t(&[n])?,
            q_raw: e(&[n, cfg.n_heads * hd])?,
            k_raw: e(&[n, cfg.n_kv_heads * hd])?,
            dlogits: e(&[len, cfg.vocab])?,
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
            kl_rows: RowSample::ALL,
        })
    }
}
