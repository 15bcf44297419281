//! Dynamic sparse attention on wgpu: flash-style dense and sparse attention
//! (forward and backward), the indexer, block pooling, top-k selection and
//! the indexer's KL loss. Kernels in `shaders/attention.wgsl`,
//! `shaders/indexer.wgsl` and `shaders/select.wgsl`.
//!
//! Every kernel accumulates in f32 and is deterministic (no float atomics):
//! - attention forward: one invocation per (batch, head, query) running an
//!   online softmax over the keys of its pattern;
//! - backward: one invocation per (batch, head, query) for `dq` (it also saves
//!   `delta = dO·O`), then one per (batch, kv head, key) for `dk`/`dv`, looping
//!   over the queries whose pattern contains the key;
//! - indexer scores: one invocation per score; block scores: a workgroup per
//!   (query block, key block) with a max reduction; indexer backward: one
//!   invocation per (query, index head) for `dq_i`/`dw`, one per key for `dk_i`;
//! - selection: a workgroup per row (threshold binary search + ordered prefix sum);
//! - KL loss: a workgroup per query row.

use super::kernel::{Params, grid1d};
use super::{Arg, WgpuBackend};
use crate::attention::ops::{AttentionSpec, IndexerLossSpec, IndexerSpec, PatternSpec, SelectSpec};
use crate::error::Result;
use crate::{DType, Tensor};

type T = Tensor<WgpuBackend>;

/// A launch of `n` workgroups, one per row, folded into two grid dimensions
/// (the kernel recovers the row as `wg.x + wg.y·nw.x` and bounds-checks it).
fn rows_grid(n: usize) -> [u32; 3] {
    let n = n.max(1);
    if n <= 65_535 { [n as u32, 1, 1] } else { [65_535, n.div_ceil(65_535) as u32, 1] }
}

/// The parameter words shared by the kernels of `shaders/attention.wgsl`.
fn attn_params(s: &AttentionSpec) -> Params {
    let (mode, kn, block) = match s.pattern {
        PatternSpec::Dense => (0, 0, 1),
        PatternSpec::Tokens { k } => (1, k, 1),
        PatternSpec::Blocks { block, n } => (2, n, block),
    };
    Params::new()
        .u(s.batch)
        .u(s.seq)
        .u(s.n_heads)
        .u(s.n_kv_heads)
        .u(s.head_dim)
        .f(s.scale)
        .u(mode)
        .u(kn)
        .u(block)
        .u(s.seq.div_ceil(block))
}

/// The pattern's index tensor, or a one-word placeholder for the dense
/// pattern (never read, but every attention kernel binds an `idx`).
fn pattern_idx<'a>(be: &WgpuBackend, idx: Option<&'a T>, holder: &'a mut Option<T>) -> Result<&'a T> {
    match idx {
        Some(i) => Ok(i),
        None => Ok(holder.insert(Tensor::empty(be, &[1], DType::U32)?)),
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn attention(
    be: &WgpuBackend,
    s: &AttentionSpec,
    q: &T,
    k: &T,
    v: &T,
    idx: Option<&T>,
    o: &mut T,
    lse: &mut T,
) -> Result<()> {
    let mut holder = None;
    let idx = pattern_idx(be, idx, &mut holder)?;
    let n = s.batch * s.n_heads * s.seq;
    be.launch(
        "attention",
        "attn_fwd",
        &mut [Arg::R(q), Arg::R(k), Arg::R(v), Arg::R(idx), Arg::W(o), Arg::W(lse)],
        attn_params(s),
        grid1d(n),
    )
}

#[allow(clippy::too_many_arguments)]
pub(super) fn attention_backward(
    be: &WgpuBackend,
    s: &AttentionSpec,
    q: &T,
    k: &T,
    v: &T,
    o: &T,
    lse: &T,
    d_o: &T,
    idx: Option<&T>,
    dq: &mut T,
    dk: &mut T,
    dv: &mut T,
) -> Result<()> {
    let mut holder = None;
    let idx = pattern_idx(be, idx, &mut holder)?;
    let mut delta = Tensor::empty(be, &[s.batch, s.n_heads, s.seq], DType::F32)?;
    be.launch(
        "attention",
        "attn_bwd_dq",
        &mut [
            Arg::R(q),
            Arg::R(k),
            Arg::R(v),
            Arg::R(d_o),
            Arg::R(o),
            Arg::R(lse),
            Arg::R(idx),
            Arg::W(dq),
            Arg::W(&mut delta),
        ],
        attn_params(s),
        grid1d(s.batch * s.n_heads * s.seq),
    )?;
    be.launch(
        "attention",
        "attn_bwd_dkdv",
        &mut [
            Arg::R(q),
            Arg::R(k),
            Arg::R(v),
            Arg::R(d_o),
            Arg::R(lse),
            Arg::R(&delta),
            Arg::R(idx),
            Arg::W(dk),
            Arg::W(dv),
        ],
        attn_params(s),
        grid1d(s.batch * s.n_kv_heads * s.seq),
    )
}

/// The parameter words shared by the kernels of `shaders/indexer.wgsl`.
fn indexer_params(s: &IndexerSpec) -> Params {
    let block = s.block.max(1);
    Params::new().u(s.batch).u(s.seq).u(s.heads).u(s.dim).u(block).u(s.seq.div_ceil(block))
}

pub(super) fn indexer_scores(be: &WgpuBackend, s: &IndexerSpec, qi: &T, ki: &T, w: &T, scores: &mut T) -> Result<()> {
    be.launch(
        "indexer",
        "indexer_scores",
        &mut [Arg::R(qi), Arg::R(ki), Arg::R(w), Arg::W(scores)],
        indexer_params(s),
        grid1d(s.batch * s.seq * s.seq),
    )
}

pub(super) fn indexer_block_scores(
    be: &WgpuBackend,
    s: &IndexerSpec,
    qi: &T,
    ki: &T,
    w: &T,
    pooled: &mut T,
) -> Result<()> {
    let nb = s.n_blocks() as u32;
    be.launch(
        "indexer",
        "indexer_block_scores",
        &mut [Arg::R(qi), Arg::R(ki), Arg::R(w), Arg::W(pooled)],
        indexer_params(s),
        [nb, nb, s.batch as u32],
    )
}

pub(super) fn select_topk(be: &WgpuBackend, s: &SelectSpec, scores: &T, idx: &mut T) -> Result<()> {
    let rows = s.batch * s.rows;
    be.launch(
        "select",
        "select_topk",
        &mut [Arg::R(scores), Arg::W(idx)],
        Params::new().u(rows).u(s.rows).u(s.k).b(s.blocks),
        rows_grid(rows),
    )
}

#[allow(clippy::too_many_arguments)]
pub(super) fn indexer_kl(
    be: &WgpuBackend,
    s: &IndexerLossSpec,
    q: &T,
    k: &T,
    lse: &T,
    scores: &T,
    idx: Option<&T>,
    loss: &mut T,
    dscores: &mut T,
) -> Result<()> {
    let mut holder = None;
    let idx = pattern_idx(be, idx, &mut holder)?;
    let a = &s.attn;
    be.launch(
        "attention",
        "indexer_kl",
        &mut [Arg::R(q), Arg::R(k), Arg::R(lse), Arg::R(scores), Arg::R(idx), Arg::W(loss), Arg::W(dscores)],
        attn_params(a),
        rows_grid(a.batch * a.seq),
    )
}

#[allow(clippy::too_many_arguments)]
pub(super) fn indexer_backward(
    be: &WgpuBackend,
    s: &IndexerSpec,
    qi: &T,
    ki: &T,
    w: &T,
    dscores: &T,
    dqi: &mut T,
    dki: &mut T,
    dw: &mut T,
) -> Result<()> {
    be.launch(
        "indexer",
        "indexer_bwd_q",
        &mut [Arg::R(qi), Arg::R(ki), Arg::R(w), Arg::R(dscores), Arg::W(dqi), Arg::W(dw)],
        indexer_params(s),
        grid1d(s.batch * s.seq * s.heads),
    )?;
    be.launch(
        "indexer",
        "indexer_bwd_k",
        &mut [Arg::R(qi), Arg::R(ki), Arg::R(w), Arg::R(dscores), Arg::W(dki)],
        indexer_params(s),
        grid1d(s.batch * s.seq),
    )
}
