//! Inference: a KV cache per model and one step over *query rows* — a
//! prefill chunk (consecutive tokens of one sequence), a ragged decode batch
//! (one new token per sequence, each at its own length) or any mix — with
//! nothing of the backward pass allocated. Semantics of the cached ops in
//! [`crate::attention::cached`]: every row gets exactly the keys (and, in a
//! sparse model, the key blocks its own indexer scores select) it gets in a
//! full-window forward pass, so prefill + decode reproduces its logits.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use super::{AttentionMode, Model, ModelConfig, Product, StepAttention};
use crate::attention::{self, CachedPattern, KvTable};
use crate::error::{Error, Result};
use crate::ops;
use crate::{Backend, DType, Tensor};

/// Tokens per page of [`KvCache::paged`] unless told otherwise (vLLM's
/// default block size: small enough that a sequence wastes at most 15
/// rows, large enough that the page table stays short).
pub const DEFAULT_PAGE: usize = 16;

/// K and V (and a sparse model's indexer keys) of every layer in a pool of
/// fixed-size pages shared by up to `max_batch` sequences ("slots") of up to
/// `context` tokens. A sequence takes pages as it grows and returns them
/// when cleared, so memory follows the tokens in use, not
/// `max_batch × context`. [`KvCache::new`] reserves the worst case (one
/// page of `context` rows per slot: the classic contiguous cache).
pub struct KvCache<B: Backend> {
    pub max_batch: usize,
    pub context: usize,
    page: usize,
    k: Vec<Tensor<B>>,
    v: Vec<Tensor<B>>,
    ki: Vec<Tensor<B>>,
    lens: Vec<usize>,
    /// Physical pages of each slot, in token order.
    tables: Vec<Vec<u32>>,
    /// Free physical pages; the lowest id is handed out first, so a run's
    /// layout is reproducible.
    free: BinaryHeap<Reverse<u32>>,
    total: usize,
}

impl<B: Backend> KvCache<B> {
    /// A contiguous cache for `model` (in its working dtype): room for
    /// `max_batch` sequences of `context` tokens, all of it reserved up
    /// front. `context` may not exceed the model's.
    pub fn new(be: &B, model: &Model<B>, max_batch: usize, context: usize) -> Result<Self> {
        Self::paged(be, model, max_batch, context, context.max(1), max_batch)
    }

    /// A pool of `pages` pages of `page` tokens for up to `max_seqs`
    /// sequences of up to `context` tokens each.
    pub fn paged(be: &B, model: &Model<B>, max_seqs: usize, context: usize, page: usize, pages: usize) -> Result<Self> {
        let cfg = &model.cfg;
        if max_seqs == 0 || context == 0 || page == 0 || pages == 0 {
            return Err(Error::Invalid(
                "kv cache: the sequences, the context, the page size and the page count must be positive".into(),
            ));
        }
        if context > cfg.context {
            return Err(Error::Invalid(format!(
                "kv cache: a context of {context} tokens is more than the model's {} (its RoPE table and training length)",
                cfg.context
            )));
        }
        let slots = pages.checked_mul(page).filter(|&s| s <= u32::MAX as usize / 2).ok_or_else(|| {
            Error::Invalid(format!("kv cache: {pages} pages × {page} rows do not fit 32-bit indexing"))
        })?;
        let (g, d) = (cfg.n_kv_heads, cfg.head_dim());
        let layer = |shape: &[usize]| -> Result<Vec<Tensor<B>>> {
            (0..cfg.n_layers).map(|_| Tensor::zeros(be, shape, model.dtype)).collect()
        };
        let ki = match cfg.attention {
            AttentionMode::Sparse { index_dim, .. } => layer(&[slots, index_dim])?,
            AttentionMode::Dense => Vec::new(),
        };
        Ok(KvCache {
            max_batch: max_seqs,
            context,
            page,
            k: layer(&[slots, g, d])?,
            v: layer(&[slots, g, d])?,
            ki,
            lens: vec![0; max_seqs],
            tables: vec![Vec::new(); max_seqs],
            free: (0..pages as u32).map(Reverse).collect(),
            total: pages,
        })
    }

    /// Bytes of one page over all layers (K, V and a sparse model's indexer
    /// keys) for a model of `cfg` in `dtype`.
    pub fn page_bytes(cfg: &ModelConfig, dtype: DType, page: usize) -> usize {
        let per_row = 2 * cfg.n_kv_heads * cfg.head_dim()
            + match cfg.attention {
                AttentionMode::Sparse { index_dim, .. } => index_dim,
                AttentionMode::Dense => 0,
            };
        cfg.n_layers * page * per_row * dtype.size()
    }

    /// Bytes held by the cache.
    pub fn bytes(&self) -> usize {
        self.k.iter().chain(&self.v).chain(&self.ki).map(|t| t.size_bytes()).sum()
    }

    /// Tokens per page.
    pub fn page(&self) -> usize {
        self.page
    }

    /// Pages in the pool.
    pub fn pages_total(&self) -> usize {
        self.total
    }

    /// Pages held by sequences.
    pub fn pages_used(&self) -> usize {
        self.total - self.free.len()
    }

    /// Pages appending `n` tokens to `slot` would take from the pool.
    pub fn pages_needed(&self, slot: usize, n: usize) -> usize {
        let have = self.tables.get(slot).map_or(0, Vec::len);
        (self.len(slot) + n).div_ceil(self.page).saturating_sub(have)
    }

    /// Tokens cached for `slot`.
    pub fn len(&self, slot: usize) -> usize {
        self.lens.get(slot).copied().unwrap_or(0)
    }

    /// Whether no slot holds any token.
    pub fn is_empty(&self) -> bool {
        self.lens.iter().all(|&l| l == 0)
    }

    /// Gives `slot` pages until it can hold `len` tokens; all or nothing.
    fn reserve(&mut self, slot: usize, len: usize) -> Result<()> {
        let need = len.div_ceil(self.page).saturating_sub(self.tables[slot].len());
        if need > self.free.len() {
            return Err(Error::Invalid(format!(
                "kv cache: {need} more pages needed, {} of {} free",
                self.free.len(),
                self.total
            )));
        }
        for _ in 0..need {
            let Reverse(p) = self.free.pop().expect("checked above");
            self.tables[slot].push(p);
        }
        Ok(())
    }

    /// Benchmarks only: treats the first `len` tokens of `slot` as cached
    /// (whatever its pages hold), so decode speed at a long context can be
    /// timed without prefilling it. Errors past the context or the pool.
    pub fn assume_filled(&mut self, slot: usize, len: usize) -> Result<()> {
        if slot >= self.max_batch || len > self.context {
            return Err(Error::Invalid(format!(
                "kv cache: slot {slot} / length {len} outside {} × {}",
                self.max_batch, self.context
            )));
        }
        self.reserve(slot, len)?;
        self.lens[slot] = len;
        Ok(())
    }

    /// Forgets the tokens of `slot` and returns its pages to the pool.
    pub fn clear(&mut self, slot: usize) {
        if let Some(l) = self.lens.get_mut(slot) {
            *l = 0;
            self.free.extend(std::mem::take(&mut self.tables[slot]).into_iter().map(Reverse));
        }
    }
}

/// Activation buffers of a step of `rows` query rows.
struct StepBufs<B: Backend> {
    ids: Tensor<B>,
    table: Tensor<B>,
    /// The step's page tables back to back (sized for every slot's worst case).
    pages: Tensor<B>,
    x: Tensor<B>,
    xn: Tensor<B>,
    ln: Tensor<B>,
    mean: Tensor<B>,
    rstd: Tensor<B>,
    q_raw: Tensor<B>,
    k_raw: Tensor<B>,
    q: Tensor<B>,
    k: Tensor<B>,
    v: Tensor<B>,
    att: Tensor<B>,
    xm: Tensor<B>,
    hb: Tensor<B>,
    act: Tensor<B>,
    logits: Tensor<B>,
    /// (q_i, k_i, w, pooled, selection) of a sparse model.
    idx: Option<IndexerBufs<B>>,
}

type IndexerBufs<B> = (Tensor<B>, Tensor<B>, Tensor<B>, Tensor<B>, Tensor<B>);

impl<B: Backend> StepBufs<B> {
    fn new(be: &B, model: &Model<B>, cache: &KvCache<B>, r: usize) -> Result<Self> {
        let cfg = &model.cfg;
        let (c, h, g, d, f) = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim(), cfg.d_model * cfg.mlp_ratio);
        let e = |s: &[usize]| Tensor::empty(be, s, model.dtype);
        let f32t = |s: &[usize]| Tensor::empty(be, s, DType::F32);
        let idx = match cfg.attention {
            AttentionMode::Sparse { block, keep_blocks, index_heads, index_dim } => Some((
                e(&[r, index_heads * index_dim])?,
                e(&[r, index_dim])?,
                e(&[r, index_heads])?,
                f32t(&[r, cache.context.div_ceil(block)])?,
                Tensor::zeros(be, &[r, keep_blocks], DType::U32)?,
            )),
            AttentionMode::Dense => None,
        };
        Ok(StepBufs {
            ids: Tensor::zeros(be, &[r], DType::U32)?,
            table: Tensor::zeros(be, &[r, 2], DType::U32)?,
            pages: Tensor::zeros(be, &[cache.max_batch * cache.context.div_ceil(cache.page)], DType::U32)?,
            x: e(&[r, c])?,
            xn: e(&[r, c])?,
            ln: e(&[r, c])?,
            mean: f32t(&[r])?,
            rstd: f32t(&[r])?,
            q_raw: e(&[r, h, d])?,
            k_raw: e(&[r, g, d])?,
            q: e(&[r, h, d])?,
            k: e(&[r, g, d])?,
            v: e(&[r, g * d])?,
            att: e(&[r, h * d])?,
            xm: e(&[r, c])?,
            hb: e(&[r, f])?,
            act: e(&[r, f])?,
            logits: e(&[r, cfg.vocab])?,
            idx,
        })
    }
}

/// Step buffers by row count (a prefill chunk size and a decode batch size
/// alternate; a few sizes are kept).
pub struct InferState<B: Backend> {
    /// By (rows, cache sequences, context, page size): the pooled scores and the
    /// page-table buffer are sized by the cache, so a state used with another
    /// cache gets fresh buffers instead of truncated ones.
    bufs: HashMap<(usize, usize, usize, usize), StepBufs<B>>,
}

impl<B: Backend> Default for InferState<B> {
    fn default() -> Self {
        InferState { bufs: HashMap::new() }
    }
}

/// One query row of a step: append `token` to the sequence in `slot`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Row {
    pub slot: usize,
    pub token: u32,
}

impl<B: Backend> Model<B> {
    /// The attention inference runs: a sparse model's trained budget, else dense.
    pub fn inference_attention(&self) -> StepAttention {
        match self.cfg.attention {
            AttentionMode::Sparse { keep_blocks, .. } => StepAttention::Sparse { keep_blocks },
            AttentionMode::Dense => StepAttention::Dense,
        }
    }

    /// One step: appends each row's token to its sequence (rows of one slot
    /// in order) and returns the logits of every row, f32 `[rows, vocab]`.
    pub fn step(
        &self,
        be: &B,
        cache: &mut KvCache<B>,
        st: &mut InferState<B>,
        rows: &[Row],
        attn: StepAttention,
    ) -> Result<Vec<f32>> {
        let r = rows.len();
        if r == 0 {
            return Ok(Vec::new());
        }
        let mut lens = cache.lens.clone();
        // Slots of the step in order of first appearance.
        let mut slots: Vec<usize> = Vec::new();
        let mut row_lens = Vec::with_capacity(r);
        for row in rows {
            if row.slot >= cache.max_batch {
                return Err(Error::Invalid(format!(
                    "inference: sequence slot {} is beyond the cache's batch of {}",
                    row.slot, cache.max_batch
                )));
            }
            if row.token as usize >= self.cfg.vocab {
                return Err(Error::Invalid(format!(
                    "inference: token {} is outside the vocabulary of {}",
                    row.token, self.cfg.vocab
                )));
            }
            let len = &mut lens[row.slot];
            if *len >= cache.context {
                return Err(Error::Invalid(format!(
                    "inference: sequence {} is already {} tokens long, the cache's context",
                    row.slot, cache.context
                )));
            }
            if *len == cache.lens[row.slot] {
                slots.push(row.slot);
            }
            *len += 1;
            row_lens.push(*len);
        }
        let need: usize = slots.iter().map(|&sl| cache.pages_needed(sl, lens[sl] - cache.lens[sl])).sum();
        if need > cache.free.len() {
            return Err(Error::Invalid(format!(
                "kv cache: the step needs {need} more pages, {} of {} are free",
                cache.free.len(),
                cache.total
            )));
        }
        let before: Vec<usize> = slots.iter().map(|&sl| cache.tables[sl].len()).collect();
        let mut base = vec![0usize; cache.max_batch];
        let mut pages: Vec<f32> = Vec::new();
        for &sl in &slots {
            cache.reserve(sl, lens[sl])?;
            base[sl] = pages.len();
            pages.extend(cache.tables[sl].iter().map(|&p| p as f32));
        }
        let table: Vec<f32> =
            rows.iter().zip(&row_lens).flat_map(|(row, &len)| [base[row.slot] as f32, len as f32]).collect();
        let res = self.run_step(be, cache, st, r, rows, &table, pages, attn);
        if res.is_err() {
            // All or nothing: the pages this step took go back.
            for (&sl, &n) in slots.iter().zip(&before) {
                let extra = cache.tables[sl].split_off(n);
                cache.free.extend(extra.into_iter().map(Reverse));
            }
        } else {
            cache.lens = lens;
        }
        res
    }

    #[allow(clippy::too_many_arguments)]
    fn run_step(
        &self,
        be: &B,
        cache: &mut KvCache<B>,
        st: &mut InferState<B>,
        r: usize,
        rows: &[Row],
        table: &[f32],
        mut pages: Vec<f32>,
        attn: StepAttention,
    ) -> Result<Vec<f32>> {
        let key = (r, cache.max_batch, cache.context, cache.page);
        if st.bufs.len() >= 4 && !st.bufs.contains_key(&key) {
            st.bufs.clear();
        }
        let sb = match st.bufs.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(StepBufs::new(be, self, cache, r)?),
        };
        sb.ids.write_f32(be, &rows.iter().map(|x| x.token as f32).collect::<Vec<_>>())?;
        sb.table.write_f32(be, table)?;
        pages.resize(sb.pages.numel(), 0.0);
        sb.pages.write_f32(be, &pages)?;
        self.step_layers(be, cache, sb, attn)?;
        sb.logits.to_f32_vec(be)
    }

    fn step_layers(&self, be: &B, cache: &mut KvCache<B>, sb: &mut StepBufs<B>, attn: StepAttention) -> Result<()> {
        let w = &self.params;
        let page = cache.page;
        ops::embedding(be, &sb.ids, &w[self.layout.emb], &mut sb.x)?;
        let r = sb.x.shape()[0];
        for (l, lp) in self.layout.layers.iter().enumerate() {
            ops::layernorm(be, &sb.x, &w[lp.ln1g], &w[lp.ln1b], &mut sb.ln, &mut sb.mean, &mut sb.rstd, 1e-5)?;
            for (dst, wi) in [(&mut sb.q_raw, lp.wq), (&mut sb.k_raw, lp.wk)] {
                let shape = dst.shape().to_vec();
                dst.set_shape(&[r, dst.numel() / r])?;
                self.linear(be, Product::Rows, &sb.ln, wi, dst, 0.0)?;
                dst.set_shape(&shape)?;
            }
            self.linear(be, Product::Rows, &sb.ln, lp.wv, &mut sb.v, 0.0)?;
            ops::rope_rows(be, &sb.q_raw, &self.rope, &sb.table, &mut sb.q)?;
            ops::rope_rows(be, &sb.k_raw, &self.rope, &sb.table, &mut sb.k)?;
            sb.v.set_shape(sb.k.shape())?;
            let kv = KvTable { rows: &sb.table, pages: &sb.pages, page };
            ops::cache_write(be, &sb.k, &kv, &mut cache.k[l])?;
            ops::cache_write(be, &sb.v, &kv, &mut cache.v[l])?;
            // A sparse model always caches its indexer keys; a sparse step also selects each row's blocks.
            let sel = match (&mut sb.idx, lp.indexer, self.cfg.attention) {
                (
                    Some((qi, ki, wt, pooled, sel)),
                    Some((wq, wk, ww)),
                    AttentionMode::Sparse { block, index_heads, .. },
                ) => {
                    for (dst, wi) in [(&mut *qi, wq), (&mut *ki, wk), (&mut *wt, ww)] {
                        ops::matmul_rows(be, &sb.ln, &w[wi], dst, false, 1.0, 0.0)?;
                    }
                    ops::cache_write(be, ki, &kv, &mut cache.ki[l])?;
                    if let StepAttention::Sparse { keep_blocks } = attn {
                        let di = qi.numel() / (r * index_heads);
                        qi.set_shape(&[r, index_heads, di])?;
                        attention::cached_indexer_block_scores(be, qi, wt, &cache.ki[l], &kv, block, pooled)?;
                        qi.set_shape(&[r, index_heads * di])?;
                        if sel.shape()[1] != keep_blocks {
                            *sel = Tensor::zeros(be, &[r, keep_blocks], DType::U32)?;
                        }
                        attention::cached_select(be, pooled, &sb.table, keep_blocks, block, sel)?;
                        Some((&*sel, block))
                    } else {
                        None
                    }
                }
                _ if matches!(attn, StepAttention::Sparse { .. }) => {
                    return Err(Error::Invalid("sparse attention requested for a dense model".into()));
                }
                _ => None,
            };
            let pat = match sel {
                Some((idx, block)) => CachedPattern::Blocks { idx, block },
                None => CachedPattern::Dense,
            };
            sb.att.set_shape(sb.q.shape())?;
            attention::cached_attention(be, &sb.q, &cache.k[l], &cache.v[l], &kv, pat, &mut sb.att)?;
            sb.v.set_shape(&[r, sb.v.numel() / r])?;
            sb.att.set_shape(&[r, sb.att.numel() / r])?;
            // xm = x + att·Wo; x' = xm + GELU(LN2(xm)·W1 + b1)·W2 + b2
            ops::cast(be, &sb.x, &mut sb.xm)?;
            self.linear(be, Product::Rows, &sb.att, lp.wo, &mut sb.xm, 1.0)?;
            ops::layernorm(be, &sb.xm, &w[lp.ln2g], &w[lp.ln2b], &mut sb.ln, &mut sb.mean, &mut sb.rstd, 1e-5)?;
            self.linear(be, Product::Rows, &sb.ln, lp.w1, &mut sb.hb, 0.0)?;
            ops::bias_add(be, &mut sb.hb, &w[lp.b1])?;
            ops::gelu(be, &sb.hb, &mut sb.act)?;
            ops::cast(be, &sb.xm, &mut sb.xn)?;
            self.linear(be, Product::Rows, &sb.act, lp.w2, &mut sb.xn, 1.0)?;
            ops::bias_add(be, &mut sb.xn, &w[lp.b2])?;
            std::mem::swap(&mut sb.x, &mut sb.xn);
        }
        let lay = &self.layout;
        ops::layernorm(be, &sb.x, &w[lay.lnfg], &w[lay.lnfb], &mut sb.ln, &mut sb.mean, &mut sb.rstd, 1e-5)?;
        ops::matmul_rows(be, &sb.ln, &w[lay.emb], &mut sb.logits, true, 1.0, 0.0)
    }

    /// Prefills `tokens` into `slot` in chunks of at most `chunk` rows;
    /// returns the logits of every token, f32 `[tokens, vocab]`.
    pub fn prefill(
        &self,
        be: &B,
        cache: &mut KvCache<B>,
        st: &mut InferState<B>,
        slot: usize,
        tokens: &[u32],
        chunk: usize,
    ) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(tokens.len() * self.cfg.vocab);
        for part in tokens.chunks(chunk.max(1)) {
            let rows: Vec<Row> = part.iter().map(|&token| Row { slot, token }).collect();
            out.extend(self.step(be, cache, st, &rows, self.inference_attention())?);
        }
        Ok(out)
    }
}
