//! Attention ops: specs, validation and checked entry points (the backend
//! methods behind them are unchecked, like those of `crate::ops`).
//!
//! Layouts (row-major, one batch after another):
//! - `q`: `[batch, seq, n_heads, head_dim]`; `k`, `v`: `[batch, seq, n_kv_heads, head_dim]`
//!   (`n_kv_heads` divides `n_heads`; query head `h` reads kv head `h / (n_heads / n_kv_heads)`);
//! - `o`: like `q`; `lse`: `[batch, n_heads, seq]` F32, the natural log-sum-exp
//!   of query `t`'s scaled scores over its keys (saved for the backward pass);
//! - token pattern `idx`: `[batch, seq, k]` U32 key positions per query;
//! - block pattern `idx`: `[batch, seq, n]` U32 key-block ids per query (block
//!   `b` holds keys `b·block .. (b+1)·block`).
//!
//! Semantics: query `t` attends to the keys `s ≤ t` of its pattern — every
//! `s ≤ t` (dense), the listed positions (tokens), or every position of the
//! listed blocks (blocks) — with `softmax(scale·q·k)`; entries equal to
//! [`NONE`](super::select::NONE), beyond `seq`, or in the future (`s > t`) are
//! skipped. A query with no key gets `o = 0`, `lse = -∞`. Listed entries must
//! be distinct (the selection ops never repeat one). Backward: `dq`, `dk`,
//! `dv` are overwritten.
//!
//! The indexer: `q_i` `[batch, seq, heads, dim]`, `k_i` `[batch, seq, dim]`,
//! `w` `[batch, seq, heads]`, `I(t,s) = Σ_j w[t,j]·ReLU(q_i[t,j]·k_i[s])` for
//! `s ≤ t`. Scores are F32 `[batch, seq, seq]` with `-∞` above the diagonal;
//! block-pooled scores are F32 `[batch, seq, nkb]`, per query
//! `P(t, b) = max_{s in b, s ≤ t} I(t, s)`, `-∞` for blocks after `t`'s own.
//!
//! The indexer's training ops (`indexer_scores`, `indexer_kl`,
//! `indexer_backward`) also take a tile of query rows `q0 .. q0 + rows`: their
//! scores and dscores are then `[batch, rows, seq]` (row `r` is query
//! `q0 + r`; causality uses the absolute position), so the `[batch, seq, seq]`
//! tensors never need to exist at once (wgpu caps one binding at 128 MiB to
//! 2 GiB). Tiles add up to the untiled result: per-query outputs are written
//! for the tile's rows only, and `dk_i` is the tile's contribution.
//!
//! # Causality
//!
//! Selection is per query: what query `t` keeps (and so `o[t]`, `lse[t]`)
//! depends on tokens `≤ t` only, bit for bit, on every backend. Scores are
//! never pooled over the queries of a query block (that let a query choose
//! its keys from later queries' scores: a future-token leak). Kernels may
//! share loads between neighbouring queries, never the decision or the
//! arithmetic of one query's result.

use crate::backend::Backend;
use crate::error::{Error, Result, fmt_shape};
use crate::ops::{
    CHECKED, Checked, check_dtype, check_float, check_nonempty, check_same_dtype, check_same_shape, check_u32,
};
use crate::{DType, Tensor};

/// Which keys each query sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatternSpec {
    Dense,
    Tokens { k: usize },
    Blocks { block: usize, n: usize },
}

/// A sparsity pattern with its index tensor.
pub enum Pattern<'a, B: Backend> {
    Dense,
    Tokens(&'a Tensor<B>),
    Blocks { idx: &'a Tensor<B>, block: usize },
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionSpec {
    pub batch: usize,
    pub seq: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    pub pattern: PatternSpec,
    pub checked: Checked,
}

impl AttentionSpec {
    /// Query heads per kv head.
    pub fn group(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }
}

fn attn_spec<B: Backend>(
    be: &B,
    op: &'static str,
    q: &Tensor<B>,
    k: &Tensor<B>,
    v: &Tensor<B>,
    pattern: &Pattern<'_, B>,
) -> Result<AttentionSpec> {
    check_float(be, op, "q", q)?;
    check_same_dtype(op, &[("q", q), ("k", k), ("v", v)])?;
    check_same_shape(op, &[("k", k), ("v", v)])?;
    for (n, t) in [("q", q), ("k", k)] {
        check_nonempty(op, n, t)?;
    }
    let (&[batch, seq, n_heads, head_dim], &[kb, ks, n_kv_heads, kd]) = (q.shape(), k.shape()) else {
        return Err(Error::Shape(format!(
            "{op}: q must be [batch, seq, heads, head_dim] and k, v [batch, seq, kv_heads, head_dim]; got q {}, k {}",
            fmt_shape(q.shape()),
            fmt_shape(k.shape())
        )));
    };
    if (kb, ks, kd) != (batch, seq, head_dim) || n_heads % n_kv_heads != 0 {
        return Err(Error::Shape(format!(
            "{op}: q {} and k {} disagree (same batch, seq and head_dim; kv heads must divide heads)",
            fmt_shape(q.shape()),
            fmt_shape(k.shape())
        )));
    }
    if head_dim > 256 {
        return Err(Error::Shape(format!("{op}: head_dim {head_dim} exceeds the supported 256")));
    }
    check_u32(op, "numel", q.numel())?;
    let pattern = match *pattern {
        Pattern::Dense => PatternSpec::Dense,
        Pattern::Tokens(idx) => {
            check_dtype(op, "idx", idx, DType::U32)?;
            match *idx.shape() {
                [b, s, k] if b == batch && s == seq && k > 0 => PatternSpec::Tokens { k },
                _ => {
                    return Err(Error::Shape(format!(
                        "{op}: token pattern must be [{batch}, {seq}, k], got {}",
                        fmt_shape(idx.shape())
                    )));
                }
            }
        }
        Pattern::Blocks { idx, block } => {
            check_dtype(op, "idx", idx, DType::U32)?;
            if block == 0 {
                return Err(Error::Invalid(format!("{op}: the block size of a block pattern must be positive")));
            }
            match *idx.shape() {
                [b, q, n] if b == batch && q == seq && n > 0 => PatternSpec::Blocks { block, n },
                _ => {
                    return Err(Error::Shape(format!(
                        "{op}: block pattern must be [{batch}, {seq}, n] (key blocks per query), got {}",
                        fmt_shape(idx.shape())
                    )));
                }
            }
        }
    };
    Ok(AttentionSpec {
        batch,
        seq,
        n_heads,
        n_kv_heads,
        head_dim,
        scale: 1.0 / (head_dim as f32).sqrt(),
        pattern,
        checked: CHECKED,
    })
}

fn idx_of<'a, B: Backend>(p: &Pattern<'a, B>) -> Option<&'a Tensor<B>> {
    match *p {
        Pattern::Dense => None,
        Pattern::Tokens(i) | Pattern::Blocks { idx: i, .. } => Some(i),
    }
}

fn check_lse<B: Backend>(op: &'static str, s: &AttentionSpec, lse: &Tensor<B>) -> Result<()> {
    check_dtype(op, "lse", lse, DType::F32)?;
    let want = [s.batch, s.n_heads, s.seq];
    if lse.shape() != want {
        return Err(Error::Shape(format!("{op}: lse must be {}, got {}", fmt_shape(&want), fmt_shape(lse.shape()))));
    }
    Ok(())
}

/// Causal attention of `q` over `k`, `v` restricted to `pattern`; writes `o` and `lse`.
pub fn attention<B: Backend>(
    be: &B,
    q: &Tensor<B>,
    k: &Tensor<B>,
    v: &Tensor<B>,
    pattern: Pattern<'_, B>,
    o: &mut Tensor<B>,
    lse: &mut Tensor<B>,
) -> Result<()> {
    const OP: &str = "attention";
    let s = attn_spec(be, OP, q, k, v, &pattern)?;
    check_same_dtype(OP, &[("q", q), ("o", &*o)])?;
    check_same_shape(OP, &[("q", q), ("o", &*o)])?;
    check_lse(OP, &s, lse)?;
    be.attention(&s, q, k, v, idx_of(&pattern), o, lse)
}

/// Gradients of [`attention`] from the saved `o` and `lse`; overwrites `dq`, `dk`, `dv`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<B: Backend>(
    be: &B,
    q: &Tensor<B>,
    k: &Tensor<B>,
    v: &Tensor<B>,
    o: &Tensor<B>,
    lse: &Tensor<B>,
    d_o: &Tensor<B>,
    pattern: Pattern<'_, B>,
    dq: &mut Tensor<B>,
    dk: &mut Tensor<B>,
    dv: &mut Tensor<B>,
) -> Result<()> {
    const OP: &str = "attention_backward";
    let s = attn_spec(be, OP, q, k, v, &pattern)?;
    check_same_dtype(OP, &[("q", q), ("o", o), ("d_o", d_o), ("dq", &*dq), ("dk", &*dk), ("dv", &*dv)])?;
    check_same_shape(OP, &[("q", q), ("o", o), ("d_o", d_o), ("dq", &*dq)])?;
    check_same_shape(OP, &[("k", k), ("dk", &*dk), ("dv", &*dv)])?;
    check_lse(OP, &s, lse)?;
    be.attention_backward(&s, q, k, v, o, lse, d_o, idx_of(&pattern), dq, dk, dv)
}

/// Sizes of an indexer call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct IndexerSpec {
    pub batch: usize,
    pub seq: usize,
    /// Index heads `H_I`.
    pub heads: usize,
    /// Index head dim `d_I`.
    pub dim: usize,
    /// Pooling block (0: full token scores).
    pub block: usize,
    /// The tile of query rows `q0 .. q0 + rows` (training ops; `0, seq` otherwise).
    pub q0: usize,
    pub rows: usize,
    pub checked: Checked,
}

impl IndexerSpec {
    pub fn n_blocks(&self) -> usize {
        self.seq.div_ceil(self.block.max(1))
    }
}

fn indexer_spec<B: Backend>(
    be: &B,
    op: &'static str,
    qi: &Tensor<B>,
    ki: &Tensor<B>,
    w: &Tensor<B>,
    block: usize,
) -> Result<IndexerSpec> {
    check_float(be, op, "q_i", qi)?;
    check_same_dtype(op, &[("q_i", qi), ("k_i", ki), ("w", w)])?;
    check_nonempty(op, "q_i", qi)?;
    let &[batch, seq, heads, dim] = qi.shape() else {
        return Err(Error::Shape(format!("{op}: q_i must be [batch, seq, heads, dim], got {}", fmt_shape(qi.shape()))));
    };
    if ki.shape() != [batch, seq, dim] || w.shape() != [batch, seq, heads] {
        return Err(Error::Shape(format!(
            "{op}: with q_i {}, k_i must be {} and w {}; got {} and {}",
            fmt_shape(qi.shape()),
            fmt_shape(&[batch, seq, dim]),
            fmt_shape(&[batch, seq, heads]),
            fmt_shape(ki.shape()),
            fmt_shape(w.shape())
        )));
    }
    if block > 0 {
        check_u32(op, "batch·seq·cols", batch * seq * seq.div_ceil(block))?;
    }
    Ok(IndexerSpec { batch, seq, heads, dim, block, q0: 0, rows: seq, checked: CHECKED })
}

/// The tile `q0 .. q0 + rows` of query rows a `[batch, rows, seq]` F32
/// tensor (`name`) covers; it must lie within `0 .. seq`.
fn query_tile<B: Backend>(
    op: &'static str,
    name: &str,
    t: &Tensor<B>,
    batch: usize,
    seq: usize,
    q0: usize,
) -> Result<usize> {
    check_dtype(op, name, t, DType::F32)?;
    match *t.shape() {
        [b, rows, s] if b == batch && s == seq && rows > 0 && q0.checked_add(rows).is_some_and(|e| e <= seq) => {
            check_u32(op, "batch·rows·seq", t.numel())?;
            Ok(rows)
        }
        _ => Err(Error::Shape(format!(
            "{op}: `{name}` must be [{batch}, rows, {seq}] with query rows {q0}..{q0}+rows within the {seq} of \
             the sequence, got {}",
            fmt_shape(t.shape())
        ))),
    }
}

/// Full token scores `I(t, s)`, F32 `[batch, seq, seq]`, `-∞` for `s > t`.
pub fn indexer_scores<B: Backend>(
    be: &B,
    qi: &Tensor<B>,
    ki: &Tensor<B>,
    w: &Tensor<B>,
    scores: &mut Tensor<B>,
) -> Result<()> {
    indexer_scores_rows(be, qi, ki, w, 0, scores)
}

/// The token scores of the query rows `q0 .. q0 + rows`: F32 `scores`
/// `[batch, rows, seq]`, `scores[b, r, s] = I(q0 + r, s)`, `-∞` for `s > q0 + r`.
pub fn indexer_scores_rows<B: Backend>(
    be: &B,
    qi: &Tensor<B>,
    ki: &Tensor<B>,
    w: &Tensor<B>,
    q0: usize,
    scores: &mut Tensor<B>,
) -> Result<()> {
    const OP: &str = "indexer_scores";
    let mut s = indexer_spec(be, OP, qi, ki, w, 0)?;
    s.rows = query_tile(OP, "scores", scores, s.batch, s.seq, q0)?;
    s.q0 = q0;
    be.indexer_scores(&s, qi, ki, w, scores)
}

/// Per-query block-pooled scores, F32 `[batch, seq, nkb]` (`nkb = ceil(seq/block)`):
/// `P(t, b) = max_{s in b, s ≤ t} I(t, s)`, `-∞` for `b > t / block`;
/// computed without materialising the token scores.
pub fn indexer_block_scores<B: Backend>(
    be: &B,
    qi: &Tensor<B>,
    ki: &Tensor<B>,
    w: &Tensor<B>,
    block: usize,
    pooled: &mut Tensor<B>,
) -> Result<()> {
    const OP: &str = "indexer_block_scores";
    if block == 0 {
        return Err(Error::Invalid(format!("{OP}: block size must be positive")));
    }
    let s = indexer_spec(be, OP, qi, ki, w, block)?;
    check_dtype(OP, "pooled", pooled, DType::F32)?;
    let nb = s.n_blocks();
    if pooled.shape() != [s.batch, s.seq, nb] {
        return Err(Error::Shape(format!(
            "{OP}: pooled must be {}, got {}",
            fmt_shape(&[s.batch, s.seq, nb]),
            fmt_shape(pooled.shape())
        )));
    }
    be.indexer_block_scores(&s, qi, ki, w, pooled)
}

/// Top-k selection over causal score rows, one row per query.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SelectSpec {
    pub batch: usize,
    /// Score rows: one per query (`seq`).
    pub rows: usize,
    /// Candidates per row: keys (`seq`, token mode) or key blocks
    /// (`ceil(seq/block)`, block mode).
    pub cols: usize,
    pub k: usize,
    /// 0: token mode, row `t` sees columns `0..=t`. `b > 0`: block mode, row
    /// `t` sees blocks `0..=t/b` and always keeps its own block `t/b`, then
    /// the sink block 0.
    pub block: usize,
    pub checked: Checked,
}

impl SelectSpec {
    /// Block mode.
    pub fn blocks(&self) -> bool {
        self.block > 0
    }

    /// The last candidate column of row `r` (the query's own key or block).
    pub fn last(&self, r: usize) -> usize {
        r.checked_div(self.block).unwrap_or(r)
    }
}

/// Per query row `t` of `scores` (F32, causal), the `k` best candidates
/// (ties to the smaller index, NaN as -∞), sorted ascending, padded with
/// `NONE`; writes `idx`, U32 `[batch, seq, k]`.
///
/// - `block == 0` (tokens): `scores` is `[batch, seq, seq]`, row `t` chooses
///   among keys `0..=t`.
/// - `block > 0` (blocks): `scores` is the per-query pooled
///   `[batch, seq, ceil(seq/block)]` of [`indexer_block_scores`]; row `t`
///   chooses among blocks `0..=t/block`, keeping its own block first, then
///   the sink block 0, then the best others (`k = 1`: the own block only).
///
/// Row `t` reads row `t` only: the selection is causal.
pub fn select_topk<B: Backend>(be: &B, scores: &Tensor<B>, k: usize, block: usize, idx: &mut Tensor<B>) -> Result<()> {
    const OP: &str = "select_topk";
    check_dtype(OP, "scores", scores, DType::F32)?;
    check_dtype(OP, "idx", idx, DType::U32)?;
    check_nonempty(OP, "scores", scores)?;
    let &[batch, rows, cols] = scores.shape() else {
        return Err(Error::Shape(format!(
            "{OP}: scores must be [batch, seq, cols], got {}",
            fmt_shape(scores.shape())
        )));
    };
    let want_cols = if block > 0 { rows.div_ceil(block) } else { rows };
    if cols != want_cols || k == 0 || idx.shape() != [batch, rows, k] {
        let what = if block > 0 { format!("ceil(seq/{block}) = {want_cols}") } else { format!("seq = {rows}") };
        return Err(Error::Shape(format!(
            "{OP}: scores {} must have {what} columns and idx must be [{batch}, {rows}, k > 0]; got idx {}",
            fmt_shape(scores.shape()),
            fmt_shape(idx.shape())
        )));
    }
    check_u32(OP, "numel", scores.numel().max(batch * rows * k))?;
    be.select_topk(&SelectSpec { batch, rows, cols, k, block, checked: CHECKED }, scores, idx)
}

/// The query rows the indexer's KL is computed on: rows `t` with
/// `t mod every == phase` (of every batch row). [`RowSample::ALL`] keeps them
/// all. Rows outside the sample get a zero loss and a zero gradient, so a
/// trainer that scales the gradient by `seq / (rows in the sample)` has an
/// unbiased estimate of the full-row gradient at `1/every` of the KL's cost
/// (the fused kernel skips those rows outright).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowSample {
    pub every: usize,
    pub phase: usize,
}

impl RowSample {
    /// Every row.
    pub const ALL: RowSample = RowSample { every: 1, phase: 0 };

    /// Every `every`-th row starting at `phase mod every` (`every ≥ 1`).
    pub fn new(every: usize, phase: usize) -> RowSample {
        let every = every.max(1);
        RowSample { every, phase: phase % every }
    }

    /// Is query row `t` in the sample?
    pub fn contains(&self, t: usize) -> bool {
        t % self.every == self.phase
    }

    /// Rows of `0..seq` in the sample.
    pub fn count(&self, seq: usize) -> usize {
        seq.saturating_sub(self.phase).div_ceil(self.every)
    }

    /// `every ≥ 1` (fits a kernel's u32) and `phase < every`.
    pub(crate) fn check(&self, op: &str) -> Result<()> {
        if self.every == 0 || self.phase >= self.every || u32::try_from(self.every).is_err() {
            return Err(Error::Invalid(format!(
                "{op}: row sample every {} phase {}: expected every >= 1 (at most 2^32 - 1) and phase < every",
                self.every, self.phase
            )));
        }
        Ok(())
    }
}

/// Sizes of the indexer's training loss.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct IndexerLossSpec {
    pub attn: AttentionSpec,
    /// The tile of query rows `q0 .. q0 + rows`.
    pub q0: usize,
    pub rows: usize,
    /// The query rows the loss is computed on (the others: zero loss and `dscores`).
    pub sample: RowSample,
    pub checked: Checked,
}

/// The indexer's KL training loss (DeepSeek-V3.2 style), main attention detached.
///
/// For query `t` with key set `K(t)` (the attention pattern: all `s ≤ t` in the
/// dense phase, the kept set in the sparse phase):
/// `p(s) = (1/H)·Σ_h exp(scale·q_h[t]·k[s] - lse_h[t])` (the main attention
/// averaged over heads; each head already sums to 1 over `K(t)`),
/// `r(s) = softmax_{K(t)} I(t, ·)`,
/// `loss[b, t] = Σ_{s∈K(t)} p(s)·(ln p(s) - ln r(s))` (F32 `[batch, seq]`),
/// `dscores[b, t, s] = r(s) - p(s)` on `K(t)`, 0 elsewhere (F32 `[batch, seq, seq]`):
/// the gradient of `Σ loss` with respect to the indexer scores.
#[allow(clippy::too_many_arguments)]
pub fn indexer_kl<B: Backend>(
    be: &B,
    q: &Tensor<B>,
    k: &Tensor<B>,
    lse: &Tensor<B>,
    scores: &Tensor<B>,
    pattern: Pattern<'_, B>,
    loss: &mut Tensor<B>,
    dscores: &mut Tensor<B>,
) -> Result<()> {
    indexer_kl_rows(be, q, k, lse, scores, pattern, 0, RowSample::ALL, loss, dscores)
}

/// [`indexer_kl`] of the query rows `q0 .. q0 + rows`: `scores` and `dscores`
/// are `[batch, rows, seq]` (row `r` is query `q0 + r`); `loss` stays
/// `[batch, seq]` and only the tile's rows of it are written. Rows `t` outside
/// `sample` get `loss = 0` and a zero `dscores` row.
#[allow(clippy::too_many_arguments)]
pub fn indexer_kl_rows<B: Backend>(
    be: &B,
    q: &Tensor<B>,
    k: &Tensor<B>,
    lse: &Tensor<B>,
    scores: &Tensor<B>,
    pattern: Pattern<'_, B>,
    q0: usize,
    sample: RowSample,
    loss: &mut Tensor<B>,
    dscores: &mut Tensor<B>,
) -> Result<()> {
    const OP: &str = "indexer_kl";
    sample.check(OP)?;
    let s = attn_spec(be, OP, q, k, k, &pattern)?;
    check_lse(OP, &s, lse)?;
    let rows = query_tile(OP, "scores", scores, s.batch, s.seq, q0)?;
    check_same_shape(OP, &[("scores", scores), ("dscores", &*dscores)])?;
    check_dtype(OP, "dscores", dscores, DType::F32)?;
    check_dtype(OP, "loss", loss, DType::F32)?;
    if loss.shape() != [s.batch, s.seq] {
        return Err(Error::Shape(format!(
            "{OP}: loss must be [{}, {}], got {}",
            s.batch,
            s.seq,
            fmt_shape(loss.shape())
        )));
    }
    check_u32(OP, "batch·rows·seq", s.batch * rows * s.seq)?;
    let ls = IndexerLossSpec { attn: s, q0, rows, sample, checked: CHECKED };
    be.indexer_kl(&ls, q, k, lse, scores, idx_of(&pattern), loss, dscores)
}

/// Gradients of [`indexer_scores`] given `dscores` (F32 `[batch, seq, seq]`,
/// entries above the diagonal ignored); `dq_i`, `dk_i`, `dw` are overwritten:
/// with `L = q_i[t,j]·k_i[s]`, `dw[t,j] = Σ_s dI·ReLU(L)`,
/// `dq_i[t,j] = Σ_s dI·w[t,j]·[L>0]·k_i[s]`, `dk_i[s] = Σ_{t,j} dI·w[t,j]·[L>0]·q_i[t,j]`.
#[allow(clippy::too_many_arguments)]
pub fn indexer_backward<B: Backend>(
    be: &B,
    qi: &Tensor<B>,
    ki: &Tensor<B>,
    w: &Tensor<B>,
    dscores: &Tensor<B>,
    dqi: &mut Tensor<B>,
    dki: &mut Tensor<B>,
    dw: &mut Tensor<B>,
) -> Result<()> {
    indexer_backward_rows(be, qi, ki, w, dscores, 0, dqi, dki, dw)
}

/// [`indexer_backward`] of the query rows `q0 .. q0 + rows`: `dscores` is
/// `[batch, rows, seq]` (row `r` is query `q0 + r`); `dq_i` and `dw` are
/// written at the tile's rows only; `dk_i` is overwritten with the tile's
/// contribution `Σ_{t in tile, j} dI·w[t,j]·[L>0]·q_i[t,j]` (0 for keys past the tile).
#[allow(clippy::too_many_arguments)]
pub fn indexer_backward_rows<B: Backend>(
    be: &B,
    qi: &Tensor<B>,
    ki: &Tensor<B>,
    w: &Tensor<B>,
    dscores: &Tensor<B>,
    q0: usize,
    dqi: &mut Tensor<B>,
    dki: &mut Tensor<B>,
    dw: &mut Tensor<B>,
) -> Result<()> {
    const OP: &str = "indexer_backward";
    let mut s = indexer_spec(be, OP, qi, ki, w, 0)?;
    s.rows = query_tile(OP, "dscores", dscores, s.batch, s.seq, q0)?;
    s.q0 = q0;
    check_same_dtype(OP, &[("q_i", qi), ("dq_i", &*dqi), ("dk_i", &*dki), ("dw", &*dw)])?;
    check_same_shape(OP, &[("q_i", qi), ("dq_i", &*dqi)])?;
    check_same_shape(OP, &[("k_i", ki), ("dk_i", &*dki)])?;
    check_same_shape(OP, &[("w", w), ("dw", &*dw)])?;
    be.indexer_backward(&s, qi, ki, w, dscores, dqi, dki, dw)
}

/// Sizes of the fused kept-set indexer training ([`indexer_train_kept`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct IndexerTrainSpec {
    /// The main attention's sizes; `pattern` is the block pattern whose kept
    /// set the KL runs over.
    pub attn: AttentionSpec,
    /// Index heads `H_I` and index head dim `d_I`.
    pub heads: usize,
    pub dim: usize,
    /// The factor on `dscores` (`r - p`) before the backward pass.
    pub grad_scale: f32,
    /// The query rows trained (the others: zero loss, `dq_i`, `dw` and no
    /// contribution to `dk_i`).
    pub sample: RowSample,
    pub checked: Checked,
}

/// The indexer's sparse-phase training step fused over the kept set: the
/// result of [`indexer_scores`], [`indexer_kl`] with the block pattern,
/// `dscores *= grad_scale` and [`indexer_backward`], without the
/// `[batch, seq, seq]` scores. Every quantity of that chain is non-zero only
/// on `K(t)` (the kept keys of query `t`), so the fused op costs
/// `O(batch·seq·|K|·(H_I·d_I + H·d))` instead of `O(batch·seq²·H_I·d_I)`:
/// `loss` (F32 `[batch, seq]`) and `dq_i`, `dk_i`, `dw` (overwritten) are
/// those of the chain up to rounding (dot products summed in another order).
/// With a [`RowSample`], the chain's KL runs on the sampled rows only (see
/// [`indexer_kl_rows`]) and the fused op skips the other rows.
///
/// Optional: returns `Ok(false)` and leaves the outputs alone when the
/// backend has no fused kernel; the caller then runs the chain of ops.
#[allow(clippy::too_many_arguments)]
pub fn indexer_train_kept<B: Backend>(
    be: &B,
    qi: &Tensor<B>,
    ki: &Tensor<B>,
    w: &Tensor<B>,
    q: &Tensor<B>,
    k: &Tensor<B>,
    lse: &Tensor<B>,
    pattern: Pattern<'_, B>,
    grad_scale: f32,
    sample: RowSample,
    loss: &mut Tensor<B>,
    dqi: &mut Tensor<B>,
    dki: &mut Tensor<B>,
    dw: &mut Tensor<B>,
) -> Result<bool> {
    const OP: &str = "indexer_train_kept";
    sample.check(OP)?;
    if !matches!(pattern, Pattern::Blocks { .. }) {
        return Err(Error::Invalid(format!("{OP}: the kept set must be a block pattern")));
    }
    let s = attn_spec(be, OP, q, k, k, &pattern)?;
    check_lse(OP, &s, lse)?;
    let is = indexer_spec(be, OP, qi, ki, w, 0)?;
    if (is.batch, is.seq) != (s.batch, s.seq) {
        return Err(Error::Shape(format!(
            "{OP}: q_i {} and q {} disagree on batch and seq",
            fmt_shape(qi.shape()),
            fmt_shape(q.shape())
        )));
    }
    check_same_dtype(OP, &[("q_i", qi), ("dq_i", &*dqi), ("dk_i", &*dki), ("dw", &*dw)])?;
    check_same_shape(OP, &[("q_i", qi), ("dq_i", &*dqi)])?;
    check_same_shape(OP, &[("k_i", ki), ("dk_i", &*dki)])?;
    check_same_shape(OP, &[("w", w), ("dw", &*dw)])?;
    check_dtype(OP, "loss", loss, DType::F32)?;
    if loss.shape() != [s.batch, s.seq] {
        return Err(Error::Shape(format!(
            "{OP}: loss must be [{}, {}], got {}",
            s.batch,
            s.seq,
            fmt_shape(loss.shape())
        )));
    }
    if !grad_scale.is_finite() {
        return Err(Error::Invalid(format!("{OP}: grad_scale {grad_scale} must be finite")));
    }
    let ts = IndexerTrainSpec { attn: s, heads: is.heads, dim: is.dim, grad_scale, sample, checked: CHECKED };
    be.indexer_train_kept(&ts, qi, ki, w, q, k, lse, idx_of(&pattern).expect("block pattern"), loss, dqi, dki, dw)
}
