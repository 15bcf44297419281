//! Attention ops over a paged KV cache, for inference (forward only).
//!
//! The cache of each layer is a pool of `slots` rows cut into physical
//! *pages* of `page` rows. A sequence owns a list of pages (its *page
//! table*); its token `s` lives in cache row
//! `pages[base + s / page] · page + s % page`, where `pages` (U32 `[P]`) holds
//! the page tables of every sequence of the step back to back.
//!
//! A step runs `R` query *rows*; each row belongs to one sequence and is
//! described by the row table `rows`, U32 `[R, 2]` = `(base, len)`: `base`
//! is where the row's page table starts in `pages`, and the row's keys are
//! the sequence's tokens `0 .. len` (the query itself sits at position
//! `len - 1`; its own key, value and indexer key were written to that
//! position before the call, see [`crate::ops::cache_write`]). So one call
//! serves a ragged decode batch (one row per sequence, each with its own
//! length), a prefill chunk (consecutive rows of one sequence, `len` growing
//! by one) or any mix of both, as a continuous-batching engine issues them.
//! A contiguous cache is the special case of one page per sequence
//! (`page` = its context). Out-of-range entries are clamped (a table index
//! to `P - 1`, a page id to the last physical page); the engine never issues
//! them, and kernels must not read out of bounds.
//!
//! Layouts: `q` `[R, n_heads, head_dim]`; caches `k`, `v` `[slots, n_kv_heads,
//! head_dim]`; the indexer's `q_i` `[R, H_I, d_I]`, `w` `[R, H_I]`, cached
//! `k_i` `[slots, d_I]`.
//!
//! Semantics are those of the full-window ops in [`super::ops`] at the query's
//! position `t = len - 1`: dense attention over keys `0..=t`; block-sparse
//! attention over the row's own selection `idx[r]` (`[R, n]` key-block ids,
//! [`NONE`](super::select::NONE) skipped); the pooled indexer scores
//! `P(t, b) = max_{s in b, s ≤ t} I(t, s)`; the selection keeps the own block
//! `t / block`, then the sink block 0, then the best others. A query therefore
//! gets at decode time exactly the keys it gets in the full-window pass, and
//! its result does not depend on where its pages lie in the pool (every
//! backend walks logical key positions and only computes addresses through
//! the page table).

use super::ops::PatternSpec;
use crate::backend::Backend;
use crate::error::{Error, Result, fmt_shape};
use crate::ops::{CHECKED, Checked, check_dtype, check_float, check_nonempty, check_same_dtype, check_u32};
use crate::{DType, Tensor};

/// Which keys a cached query sees.
pub enum CachedPattern<'a, B: Backend> {
    Dense,
    /// Key blocks per row, U32 `[R, n]`.
    Blocks {
        idx: &'a Tensor<B>,
        block: usize,
    },
}

/// Where a step's keys are: the row table and the page tables.
pub struct KvTable<'a, B: Backend> {
    /// U32 `[R, 2]` = `(base, len)` per query row.
    pub rows: &'a Tensor<B>,
    /// U32 `[P]`: physical page ids, each sequence's list back to back.
    pub pages: &'a Tensor<B>,
    /// Cache rows per page.
    pub page: usize,
}

/// The paging part of a cached op's spec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Paging {
    /// Cache rows per page.
    pub page: usize,
    /// Entries of the `pages` table (`P`).
    pub table: usize,
}

impl Paging {
    /// Physical pages of a cache of `slots` rows.
    pub fn phys_pages(&self, slots: usize) -> usize {
        slots / self.page
    }

    /// Cache row of key `s` of a row whose page table starts at `base`,
    /// clamped as the module documents.
    pub fn key_row(&self, pages: &[u32], base: usize, s: usize, slots: usize) -> usize {
        let e = (base + s / self.page).min(self.table - 1);
        let p = (pages[e] as usize).min(self.phys_pages(slots) - 1);
        p * self.page + s % self.page
    }
}

/// Checks a [`KvTable`] against `R` query rows and a cache of `slots` rows.
pub(crate) fn check_table<B: Backend>(op: &'static str, t: &KvTable<'_, B>, r: usize, slots: usize) -> Result<Paging> {
    check_rows(op, t.rows, r)?;
    check_dtype(op, "pages", t.pages, DType::U32)?;
    let &[table] = t.pages.shape() else {
        return Err(Error::Shape(format!("{op}: the page table must be 1-D, got {}", fmt_shape(t.pages.shape()))));
    };
    if table == 0 || t.page == 0 || !slots.is_multiple_of(t.page) || slots < t.page {
        return Err(Error::Shape(format!(
            "{op}: a page of {} rows must divide the cache's {slots} rows and the page table ({table} entries) be \
             non-empty",
            t.page
        )));
    }
    check_u32(op, "page table", table)?;
    Ok(Paging { page: t.page, table })
}

/// Sizes of a [`cached_attention`] call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CachedAttentionSpec {
    /// Query rows `R`.
    pub rows: usize,
    /// Cache rows.
    pub slots: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    /// `Dense` or `Blocks { block, n }`.
    pub pattern: PatternSpec,
    pub paging: Paging,
    pub checked: Checked,
}

impl CachedAttentionSpec {
    /// Query heads per kv head.
    pub fn group(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }
}

fn check_rows<B: Backend>(op: &'static str, rows: &Tensor<B>, r: usize) -> Result<()> {
    check_dtype(op, "rows", rows, DType::U32)?;
    if rows.shape() != [r, 2] {
        return Err(Error::Shape(format!(
            "{op}: the row table must be [{r}, 2] (base, len) per query row, got {}",
            fmt_shape(rows.shape())
        )));
    }
    Ok(())
}

/// Attention of each query row over its cached keys: dense (keys `0..len`)
/// or its own key blocks; writes `o` `[R, n_heads, head_dim]`. A row with
/// no key gets `o = 0`.
#[allow(clippy::too_many_arguments)]
pub fn cached_attention<B: Backend>(
    be: &B,
    q: &Tensor<B>,
    k: &Tensor<B>,
    v: &Tensor<B>,
    table: &KvTable<'_, B>,
    pattern: CachedPattern<'_, B>,
    o: &mut Tensor<B>,
) -> Result<()> {
    const OP: &str = "cached_attention";
    check_float(be, OP, "q", q)?;
    check_same_dtype(OP, &[("q", q), ("k cache", k), ("v cache", v), ("o", &*o)])?;
    check_nonempty(OP, "q", q)?;
    check_nonempty(OP, "k cache", k)?;
    let (&[r, n_heads, head_dim], &[slots, n_kv_heads, kd]) = (q.shape(), k.shape()) else {
        return Err(Error::Shape(format!(
            "{OP}: q must be [rows, heads, head_dim] and the caches [slots, kv_heads, head_dim]; got q {}, k {}",
            fmt_shape(q.shape()),
            fmt_shape(k.shape())
        )));
    };
    if kd != head_dim || v.shape() != k.shape() || o.shape() != q.shape() || n_heads % n_kv_heads != 0 {
        return Err(Error::Shape(format!(
            "{OP}: q {}, k {}, v {}, o {} disagree (same head_dim, v like k, o like q, kv heads dividing heads)",
            fmt_shape(q.shape()),
            fmt_shape(k.shape()),
            fmt_shape(v.shape()),
            fmt_shape(o.shape())
        )));
    }
    if head_dim > 256 {
        return Err(Error::Shape(format!("{OP}: head_dim {head_dim} exceeds the supported 256")));
    }
    let paging = check_table(OP, table, r, slots)?;
    check_u32(OP, "cache numel", k.numel().max(q.numel()))?;
    let (pattern, idx) = match pattern {
        CachedPattern::Dense => (PatternSpec::Dense, None),
        CachedPattern::Blocks { idx, block } => {
            check_dtype(OP, "idx", idx, DType::U32)?;
            match *idx.shape() {
                [ir, n] if ir == r && n > 0 && block > 0 => (PatternSpec::Blocks { block, n }, Some(idx)),
                _ => {
                    return Err(Error::Shape(format!(
                        "{OP}: block pattern (block {block} > 0) must be [{r}, n > 0], got {}",
                        fmt_shape(idx.shape())
                    )));
                }
            }
        }
    };
    let s = CachedAttentionSpec {
        rows: r,
        slots,
        n_heads,
        n_kv_heads,
        head_dim,
        scale: 1.0 / (head_dim as f32).sqrt(),
        pattern,
        paging,
        checked: CHECKED,
    };
    be.cached_attention(&s, q, k, v, table.rows, table.pages, idx, o)
}

/// Sizes of a [`cached_indexer_block_scores`] call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CachedIndexerSpec {
    pub rows: usize,
    pub slots: usize,
    /// Index heads `H_I`.
    pub heads: usize,
    /// Index head dim `d_I`.
    pub dim: usize,
    pub block: usize,
    /// Pooled columns (key blocks) per row; blocks past the row's own are `-∞`.
    pub cols: usize,
    pub paging: Paging,
    pub checked: Checked,
}

/// Per query row, its pooled indexer scores over its cached keys:
/// `pooled[r, b] = max_{s in b, s < len} Σ_j w[r,j]·ReLU(q_i[r,j]·k_i[row(s)])`
/// (`row(s)` the cache row of key `s` through the page table),
/// F32 `[R, cols]`, `-∞` for blocks with no key `< len`.
#[allow(clippy::too_many_arguments)]
pub fn cached_indexer_block_scores<B: Backend>(
    be: &B,
    qi: &Tensor<B>,
    w: &Tensor<B>,
    ki: &Tensor<B>,
    table: &KvTable<'_, B>,
    block: usize,
    pooled: &mut Tensor<B>,
) -> Result<()> {
    const OP: &str = "cached_indexer_block_scores";
    check_float(be, OP, "q_i", qi)?;
    check_same_dtype(OP, &[("q_i", qi), ("w", w), ("k_i cache", ki)])?;
    check_nonempty(OP, "q_i", qi)?;
    check_dtype(OP, "pooled", pooled, DType::F32)?;
    let (&[r, heads, dim], &[slots, kdim]) = (qi.shape(), ki.shape()) else {
        return Err(Error::Shape(format!(
            "{OP}: q_i must be [rows, heads, dim] and the k_i cache [slots, dim]; got {} and {}",
            fmt_shape(qi.shape()),
            fmt_shape(ki.shape())
        )));
    };
    let cols = pooled.shape().get(1).copied().unwrap_or(0);
    if kdim != dim || w.shape() != [r, heads] || pooled.shape() != [r, cols] || cols == 0 || block == 0 {
        return Err(Error::Shape(format!(
            "{OP}: with q_i {} and block {block} > 0, w must be [{r}, {heads}], k_i [slots, {dim}] and pooled \
             [{r}, cols > 0]; got w {}, k_i {}, pooled {}",
            fmt_shape(qi.shape()),
            fmt_shape(w.shape()),
            fmt_shape(ki.shape()),
            fmt_shape(pooled.shape())
        )));
    }
    let paging = check_table(OP, table, r, slots)?;
    check_u32(OP, "numel", ki.numel().max(r * cols))?;
    let s = CachedIndexerSpec { rows: r, slots, heads, dim, block, cols, paging, checked: CHECKED };
    be.cached_indexer_block_scores(&s, qi, w, ki, table.rows, table.pages, pooled)
}

/// Sizes of a [`cached_select`] call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CachedSelectSpec {
    pub rows: usize,
    pub cols: usize,
    pub k: usize,
    pub block: usize,
    pub checked: Checked,
}

/// Per query row `r` with position `t = len - 1`: its `k` best key blocks
/// among `0..=t/block` of `scores[r]` (F32 `[R, cols]`), the own block
/// `t/block` first, then the sink block 0, then the best others (ties to the
/// smaller index, NaN as -∞), sorted ascending and padded with `NONE`; writes
/// `idx` U32 `[R, k]`. Identical to `select_topk` in block mode on the
/// full-window pooled row of query `t`.
pub fn cached_select<B: Backend>(
    be: &B,
    scores: &Tensor<B>,
    rows: &Tensor<B>,
    k: usize,
    block: usize,
    idx: &mut Tensor<B>,
) -> Result<()> {
    const OP: &str = "cached_select";
    check_dtype(OP, "scores", scores, DType::F32)?;
    check_dtype(OP, "idx", idx, DType::U32)?;
    check_nonempty(OP, "scores", scores)?;
    let &[r, cols] = scores.shape() else {
        return Err(Error::Shape(format!("{OP}: scores must be [rows, cols], got {}", fmt_shape(scores.shape()))));
    };
    if k == 0 || block == 0 || idx.shape() != [r, k] {
        return Err(Error::Shape(format!(
            "{OP}: with scores {} and block {block} > 0, idx must be [{r}, k > 0], got {}",
            fmt_shape(scores.shape()),
            fmt_shape(idx.shape())
        )));
    }
    check_rows(OP, rows, r)?;
    check_u32(OP, "numel", scores.numel().max(r * k))?;
    be.cached_select(&CachedSelectSpec { rows: r, cols, k, block, checked: CHECKED }, scores, rows, idx)
}
