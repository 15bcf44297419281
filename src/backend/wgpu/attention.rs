//! Dynamic sparse attention on wgpu: flash-style dense and sparse attention
//! (forward and backward), the indexer, block pooling, top-k selection and
//! the indexer's KL loss. Kernels in `shaders/attention.wgsl`,
//! `shaders/indexer.wgsl` and `shaders/select.wgsl`.
//!
//! Block mode selects per query (DESIGN §4): the pooled indexer scores are
//! `[batch, seq, nkb]` (query `t`, key block `kb`: the max of `I(t, s)` over
//! the keys `s <= t` of the block), the selection keeps `n` blocks per query
//! (`idx` `[batch, seq, n]`: its own block `t / block`, the sink block 0, then
//! the best others), and attention, its backward and the KL loss read query
//! `t`'s own row. Kernels may share work between neighbouring queries, never
//! a decision or a rounding: what query `t` computes (pooled scores,
//! selection, `o`, `lse`) is bit-identical whatever the tokens after `t` are.
//!
//! Every kernel accumulates in f32 and is deterministic (no float atomics):
//! - attention forward: for the dense and block patterns (head_dim <= 128),
//!   a workgroup per (key chunk, batch, tile of 64 queries, head)
//!   (`attn_fwd_tiled`): the tile walks the union of its queries' key blocks
//!   (every causal 16-key group for dense), loading 16-key K/V tiles into
//!   workgroup memory once for the whole tile; each invocation runs eight
//!   queries' online softmaxes, a query updating its state only on the keys
//!   of the blocks its own row lists. Key chunks are fixed ranges of key
//!   blocks, so a query's keys split into chunks the same way whatever its
//!   neighbours selected. Otherwise (tokens, head_dim > 128) one invocation
//!   per (key chunk, batch, query, head) runs an online softmax over the
//!   chunk's keys of its pattern row;
//! - backward: `attn_bwd_stats` saves (lse, delta = dO·O) per query and head
//!   in one buffer, then one invocation per (key chunk, batch, query, head)
//!   for `dq`, then one per (query chunk, batch, key, kv head) for `dk`/`dv`,
//!   looping over the chunk's queries whose own row lists the key (tokens) or
//!   its block (blocks). Every kernel binds at most eight storage buffers
//!   (WebGPU's default limit). The hardware variant (`shaders/attention_hw.wgsl`,
//!   head_dim <= 128, FlashAttention-2's backward) tiles both passes: dq a
//!   64-wide workgroup per (key chunk, batch, tile of 64 queries, head)
//!   with K/V tiles in workgroup memory (every pattern: tokens over 16-key
//!   units, each query masking the keys it lists), dk/dv a 64-wide workgroup per (query
//!   chunk, batch, tile of 64 keys, kv head) staging 16 queries' q/dO rows at
//!   a time, each query's attended keys taken from its own row (every
//!   pattern); P is recomputed from the saved lse in both;
//! - indexer scores: one invocation per score; pooled block scores: one
//!   invocation per (batch, query, key block), or the tiled kernel (a
//!   workgroup per (key block, query block), k_i rows in registers, q_i tiles
//!   in workgroup memory, per-query maxima merged in a fixed order); indexer
//!   backward: one invocation per (key chunk, query, index head) for
//!   `dq_i`/`dw`, one per (query chunk, key) for `dk_i`. The hardware
//!   variant (d_I <= 64) tiles the training kernels: scores a 256-wide
//!   workgroup per 16 × 16 (queries × keys) tile, q_i/k_i tiles in workgroup
//!   memory (f16 tiles and products with SHADER_F16); `dq_i`/`dw` a 64-wide
//!   workgroup per (key chunk, 32 rows) streaming 16-key k_i tiles, `dk_i`
//!   one per (query chunk, 32 keys) streaming 16 (query, head) q_i rows at a
//!   time, each in the software kernel's summation order;
//! - selection, per query row over its causal candidates (keys `0..=t`, or
//!   blocks `0..=t / block`): an invocation per row for short rows (block
//!   mode: insertion top-k, then an ordered threshold pass), else a workgroup
//!   per row (threshold binary search + ordered prefix sum);
//! - KL loss: a workgroup per query row, over the query's own key set (both
//!   variants; its reductions through subgroup operations where the device
//!   has them).
//!
//! No kernel does arithmetic with infinities (fast-math compilers such as
//! Metal's default do not honour them): finite sentinels and `l > 0` tests;
//! the `-inf` of a keyless query's `lse` is written explicitly.
//!
//! # Split loops
//!
//! Mesa's llvmpipe/lavapipe (the software Vulkan adapter) stops every loop
//! after 65 535 iterations, counted across all loops of a batch of
//! invocations, and silently leaves the outputs partly written. So no
//! invocation loops over a whole sequence: [`plan`] picks a chunk size from
//! [`ITER_BUDGET`] (loop iterations per invocation, inner vec4 loops
//! included), and when one chunk does not cover the loop the kernel writes
//! per-chunk partials to an F32 scratch buffer `[nch, rows, width]` that
//! `shaders/split.wgsl` merges in chunk order (a log-sum-exp merge for the
//! forward, ordered sums for the gradients). With one chunk the kernels write
//! their outputs directly, as before. Scratch buffers are capped at
//! [`MAX_SCRATCH_BYTES`] (and the adapter's largest binding) by launching
//! the rows in slices.

use super::kernel::grid1d;
use super::{Arg, KernelVariant, WgpuBackend};
use crate::attention::ops::{AttentionSpec, IndexerLossSpec, IndexerSpec, PatternSpec, SelectSpec};
use crate::error::Result;
use crate::{DType, Tensor};

type T = Tensor<WgpuBackend>;

/// Loop iterations one invocation may run (all its loops together), well
/// under llvmpipe's 65 535.
const ITER_BUDGET: usize = 16_000;

/// Largest scratch buffer of partial results (also bounded by the adapter's
/// largest storage binding); longer launches go in slices of rows.
const MAX_SCRATCH_BYTES: usize = 256 << 20;

/// How a loop over `total` items (keys or queries) is split.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Plan {
    /// Items per chunk.
    chunk: usize,
    /// Number of chunks; 1 means the kernel writes its outputs directly.
    nch: usize,
    /// Rows per launch (all of them when `nch` is 1).
    rows: usize,
}

/// Splits a loop over `total` items costing `per_item` iterations each (plus
/// `fixed` per invocation) into chunks within [`ITER_BUDGET`], for `rows`
/// rows of partials `width` f32 wide; `align` > 1 rounds the chunk down to a
/// multiple of it where possible. `max_floats` bounds a scratch buffer.
#[allow(clippy::too_many_arguments)]
fn plan(
    budget: usize,
    total: usize,
    per_item: usize,
    fixed: usize,
    align: usize,
    rows: usize,
    width: usize,
    max_floats: usize,
) -> Plan {
    let total = total.max(1);
    let mut chunk = (budget.saturating_sub(fixed) / per_item.max(1)).max(1);
    if chunk >= total {
        return Plan { chunk: total, nch: 1, rows };
    }
    if align > 1 && chunk >= align {
        chunk -= chunk % align;
    }
    let nch = total.div_ceil(chunk);
    if align <= 1 {
        // Even chunks: the same count, each as short as possible.
        chunk = total.div_ceil(nch);
    }
    let rows = (max_floats / (nch * width.max(1))).clamp(1, rows.max(1));
    Plan { chunk, nch, rows }
}

/// The loop budget of [`plan`]: [`ITER_BUDGET`], or the backend's test
/// override ([`WgpuBackend::set_attention_loop_budget`]).
fn loop_budget(be: &WgpuBackend) -> usize {
    be.attention_loop_budget.unwrap_or(ITER_BUDGET)
}

/// F32 elements a scratch buffer may hold on this adapter.
fn max_scratch_floats(be: &WgpuBackend) -> usize {
    let binding = be.device.limits().max_storage_buffer_binding_size as usize;
    binding.min(MAX_SCRATCH_BYTES) / 4
}

/// The row slices `(r0, n)` of a split launch.
fn slices(rows: usize, per: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..rows).step_by(per.max(1)).map(move |r0| (r0, per.min(rows - r0)))
}

/// Sums the partials `[nch, n, width]` of rows `r0 .. r0 + n` into `out`.
fn sum_chunks(be: &WgpuBackend, part: &T, nch: usize, r0: usize, n: usize, width: usize, out: &mut T) -> Result<()> {
    be.launch(
        "split",
        "sum_chunks",
        &mut [Arg::R(part), Arg::W(out)],
        &SumChunksParams { nrow: n as u32, nch: nch as u32, width: width as u32, r0: r0 as u32 },
        grid1d(n * width),
    )
}

/// Slots per query of the pattern (the length of the forward's key loop).
fn max_slots(s: &AttentionSpec) -> usize {
    match s.pattern {
        PatternSpec::Dense => s.seq,
        PatternSpec::Tokens { k } => k,
        PatternSpec::Blocks { block, n } => n * block,
    }
}

/// A launch of `n` workgroups, one per row, folded into two grid dimensions
/// (the kernel recovers the row as `wg.x + wg.y·nw.x` and bounds-checks it).
fn rows_grid(n: usize) -> [u32; 3] {
    let n = n.max(1);
    if n <= 65_535 { [n as u32, 1, 1] } else { [65_535, n.div_ceil(65_535) as u32, 1] }
}

/// The pattern as (mode, k or n, block): mode 0 dense, 1 tokens, 2 blocks.
fn pattern_words(s: &AttentionSpec) -> (u32, u32, u32) {
    match s.pattern {
        PatternSpec::Dense => (0, 0, 1),
        PatternSpec::Tokens { k } => (1, k as u32, 1),
        PatternSpec::Blocks { block, n } => (2, n as u32, block as u32),
    }
}

crate::wgsl_params! {
    /// `shaders/attention.wgsl` (attn_fwd, attn_bwd_*) and `attn_fwd_combine`
    /// of `shaders/split.wgsl`: the attention spec (mode 0 dense, 1 tokens,
    /// 2 blocks; kn = k or n; nkb = ceil(seq / block)), the loop split
    /// (chunk, nch) and the launch's rows (r0, nrow).
    pub struct AttnParams {
        batch: u32,
        seq: u32,
        n_heads: u32,
        n_kv_heads: u32,
        head_dim: u32,
        scale: f32,
        mode: u32,
        kn: u32,
        block: u32,
        nkb: u32,
        chunk: u32,
        nch: u32,
        r0: u32,
        nrow: u32,
    }
}

crate::wgsl_params! {
    /// `indexer_kl` of `shaders/attention.wgsl`: the attention spec and its
    /// tile of query rows q0 .. q0 + qrows.
    pub struct AttnKlParams {
        batch: u32,
        seq: u32,
        n_heads: u32,
        n_kv_heads: u32,
        head_dim: u32,
        scale: f32,
        mode: u32,
        kn: u32,
        block: u32,
        nkb: u32,
        q0: u32,
        qrows: u32,
        every: u32,
        phase: u32,
    }
}

crate::wgsl_params! {
    /// `sum_chunks` of `shaders/split.wgsl`: rows r0 .. r0 + nrow of `width`
    /// floats, nch chunks of partials.
    pub struct SumChunksParams {
        nrow: u32,
        nch: u32,
        width: u32,
        r0: u32,
    }
}

/// The parameters of the kernels of `shaders/attention.wgsl` for a launch
/// over rows r0 .. r0 + nrow split in `nch` chunks of `chunk` items.
fn attn_params(s: &AttentionSpec, chunk: usize, nch: usize, r0: usize, nrow: usize) -> AttnParams {
    let (mode, kn, block) = pattern_words(s);
    AttnParams {
        batch: s.batch as u32,
        seq: s.seq as u32,
        n_heads: s.n_heads as u32,
        n_kv_heads: s.n_kv_heads as u32,
        head_dim: s.head_dim as u32,
        scale: s.scale,
        mode,
        kn,
        block,
        nkb: s.seq.div_ceil(block as usize) as u32,
        chunk: chunk as u32,
        nch: nch as u32,
        r0: r0 as u32,
        nrow: nrow as u32,
    }
}

/// [`AttnParams`] plus the query tiles of the tiled kernels: `tq` queries
/// per tile, tiles `tile0 .. tile0 + ntile`, `unit` keys per key unit.
fn tiled_params(a: AttnParams, tq: usize, tile0: usize, ntile: usize, unit: usize) -> AttnTiledParams {
    AttnTiledParams {
        batch: a.batch,
        seq: a.seq,
        n_heads: a.n_heads,
        n_kv_heads: a.n_kv_heads,
        head_dim: a.head_dim,
        scale: a.scale,
        mode: a.mode,
        kn: a.kn,
        block: a.block,
        nkb: a.nkb,
        chunk: a.chunk,
        nch: a.nch,
        r0: a.r0,
        nrow: a.nrow,
        tq: tq as u32,
        tile0: tile0 as u32,
        ntile: ntile as u32,
        unit: unit as u32,
    }
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
    let rows = s.batch * s.seq * s.n_heads;
    let (d, nc) = (s.head_dim, s.head_dim.div_ceil(4));
    // Per slot: the slot loop, the q·k and the p·v vec4 loops.
    // The hardware variant's f16 tiles (f16 q/k/v with SHADER_F16) take half the workgroup memory.
    let half_tiles = be.kernel_variant() == KernelVariant::Hardware
        && be.kernel_features().f16
        && [q, k, v].iter().all(|t| t.dtype() == DType::F16);
    let shared = if half_tiles { FWD_SHARED_BYTES_F16 } else { FWD_SHARED_BYTES };
    if let Some(tq) = fwd_tile(be, s, shared) {
        return attention_tiled(be, s, tq, q, k, v, idx, o, lse);
    }
    let pl = plan(loop_budget(be), max_slots(s), 1 + 2 * nc, nc + d + 64, 1, rows, d + 2, max_scratch_floats(be));
    let params = |r0: usize, n: usize| attn_params(s, pl.chunk, pl.nch, r0, n);
    // Writes o/lse directly (one chunk) or the chunks' partials.
    let fwd = |o: &mut T, lse: &mut T, r0: usize, n: usize| {
        let args = &mut [Arg::R(q), Arg::R(k), Arg::R(v), Arg::R(idx), Arg::W(o), Arg::W(lse)];
        be.launch("attention", "attn_fwd", args, &params(r0, n), grid1d(pl.nch * n))
    };
    if pl.nch == 1 {
        return fwd(o, lse, 0, rows);
    }
    let mut part = Tensor::empty(be, &[pl.nch * pl.rows * d], DType::F32)?;
    let mut ml = Tensor::empty(be, &[pl.nch * pl.rows * 2], DType::F32)?;
    for (r0, n) in slices(rows, pl.rows) {
        fwd(&mut part, &mut ml, r0, n)?;
        be.launch(
            "split",
            "attn_fwd_combine",
            &mut [Arg::R(&part), Arg::R(&ml), Arg::W(o), Arg::W(lse)],
            &attn_params(s, pl.chunk, pl.nch, r0, n),
            grid1d(n * d),
        )?;
    }
    Ok(())
}

/// Queries per workgroup of `attn_fwd_tiled`, eight per invocation.
const FWD_TILE: usize = 64;
/// Invocations per workgroup of `attn_fwd_tiled`.
const FWD_THREADS: usize = 8;
/// Invocations per workgroup of `attn_fwd_tiled_hw` (one query each).
const FWD_THREADS_HW: usize = FWD_TILE;

crate::wgsl_params! {
    /// `attn_fwd_tiled` (`shaders/attention.wgsl`) and the tiled kernels of
    /// `shaders/attention_hw.wgsl` but dk/dv: the attention spec, the
    /// key-unit split (chunk, nch), the launch's rows (r0, nrow) and query
    /// tiles.
    pub struct AttnTiledParams {
        batch: u32,
        seq: u32,
        n_heads: u32,
        n_kv_heads: u32,
        head_dim: u32,
        scale: f32,
        mode: u32,
        kn: u32,
        block: u32,
        nkb: u32,
        chunk: u32,
        nch: u32,
        r0: u32,
        nrow: u32,
        tq: u32,
        tile0: u32,
        ntile: u32,
        unit: u32,
    }
}
crate::wgsl_params! {
    /// `shaders/attention_hw.wgsl`, `attn_bwd_dkdv_tiled_hw`: the attention
    /// spec, the query split (chunk, nch), the launch's (batch, key, kv head)
    /// rows (r0, nrow) and key tiles.
    pub struct AttnBwdKvParams {
        batch: u32,
        seq: u32,
        n_heads: u32,
        n_kv_heads: u32,
        head_dim: u32,
        scale: f32,
        mode: u32,
        kn: u32,
        block: u32,
        nkb: u32,
        chunk: u32,
        nch: u32,
        r0: u32,
        nrow: u32,
        tkeys: u32,
        tile0: u32,
        ntile: u32,
    }
}

/// The workgroup tiles `(first, count)` meeting rows `r0 .. r0 + n` of a
/// `[batch, seq, heads]` row layout cut into tiles of `per` positions, tile
/// `(batch·ceil(seq / per) + position / per)·heads + head`; whole tile rows
/// (every head) so that the first tile's head is 0.
fn row_tiles(seq: usize, heads: usize, per: usize, r0: usize, n: usize) -> (usize, usize) {
    let ntq = seq.div_ceil(per);
    let tile = |r: usize| {
        let (bt, h) = (r / heads, r % heads);
        ((bt / seq) * ntq + (bt % seq) / per) * heads + h
    };
    let (first, last) = (tile(r0) - r0 % heads, tile(r0 + n - 1));
    (first, last + heads - last % heads - first)
}

/// Keys per workgroup-memory tile of `attn_fwd_tiled` (the dense pattern's unit).
const FWD_KEYS: usize = 16;
/// Key units per union window of `attn_fwd_tiled`.
const FWD_WINDOW: usize = 32;
/// Largest head_dim of `attn_fwd_tiled`.
const FWD_MAX_DIM: usize = 128;
/// Workgroup memory of `attn_fwd_tiled`: the K and V tiles, their keys and
/// the window's union words.
const FWD_SHARED_BYTES: usize = 2 * FWD_KEYS * (FWD_MAX_DIM / 4) * 16 + 4 * FWD_KEYS + 8;
/// The same with f16 K/V tiles (`attn_fwd_tiled_hw` with the f16 feature):
/// within WebGPU's default 16 KiB.
const FWD_SHARED_BYTES_F16: usize = 2 * FWD_KEYS * (FWD_MAX_DIM / 4) * 8 + 4 * FWD_KEYS + 8;

/// The query tile of the tiled forward, if it applies: the dense and block
/// patterns with head_dim <= 128.
fn fwd_tile(be: &WgpuBackend, s: &AttentionSpec, need: usize) -> Option<usize> {
    let shared = be.device.limits().max_compute_workgroup_storage_size as usize;
    if s.head_dim > FWD_MAX_DIM || shared < need {
        return None;
    }
    match s.pattern {
        PatternSpec::Dense | PatternSpec::Blocks { .. } => Some(FWD_TILE),
        PatternSpec::Tokens { .. } => None,
    }
}

/// The query tile of `attn_bwd_dq_tiled_hw`, if it applies: the forward's
/// tiles, for every pattern (tokens too: units of [`FWD_KEYS`] keys with a
/// per-query bit word of the keys it lists).
fn dq_tile(be: &WgpuBackend, s: &AttentionSpec) -> Option<usize> {
    let shared = be.device.limits().max_compute_workgroup_storage_size as usize;
    (s.head_dim <= FWD_MAX_DIM && shared >= FWD_SHARED_BYTES).then_some(FWD_TILE)
}

/// The forward with `attn_fwd_tiled`: a workgroup per (chunk, batch, tile of
/// `tq` queries, head) sharing K/V tiles in workgroup memory, split over key
/// units (16-key groups, or key blocks) with the partials and combine of
/// `attn_fwd`.
#[allow(clippy::too_many_arguments)]
fn attention_tiled(
    be: &WgpuBackend,
    s: &AttentionSpec,
    tq: usize,
    q: &T,
    k: &T,
    v: &T,
    idx: &T,
    o: &mut T,
    lse: &mut T,
) -> Result<()> {
    let rows = s.batch * s.seq * s.n_heads;
    let (d, nc) = (s.head_dim, s.head_dim.div_ceil(4));
    let nh = s.n_heads;
    let (unit, n) = match s.pattern {
        PatternSpec::Blocks { block, n } => (block, n),
        _ => (FWD_KEYS, 0),
    };
    // Per key tile: the tile loops, the cooperative load loop, and the q·k
    // and p·v vec4 loops; per unit its tiles, plus its share of the window's
    // marking loops (eight queries' rows of n entries per 32 units).
    let hw = be.kernel_variant() == KernelVariant::Hardware;
    let threads = if hw { FWD_THREADS_HW } else { FWD_THREADS };
    let per_tile = 3 + (FWD_KEYS * nc).div_ceil(threads) + 2 * nc;
    let per_unit = unit.div_ceil(FWD_KEYS) * per_tile + 3 + (8 * (n + 1)).div_ceil(FWD_WINDOW);
    let pl =
        plan(loop_budget(be), s.seq.div_ceil(unit), per_unit, 2 * nc + d + 64, 1, rows, d + 2, max_scratch_floats(be));
    // The workgroup tiles (batch, query tile, head) meeting rows r0 .. r0 + n.
    let tiles = |r0: usize, n: usize| row_tiles(s.seq, nh, tq, r0, n);
    let params = |r0: usize, n: usize| {
        let (first, nt) = tiles(r0, n);
        tiled_params(attn_params(s, pl.chunk, pl.nch, r0, n), tq, first, nt, unit)
    };
    // Writes o/lse directly (one chunk) or the chunks' partials.
    let fwd = |o: &mut T, lse: &mut T, r0: usize, n: usize| {
        let args = &mut [Arg::R(q), Arg::R(k), Arg::R(v), Arg::R(idx), Arg::W(o), Arg::W(lse)];
        let grid = rows_grid(pl.nch * tiles(r0, n).1);
        let (family, name) = if hw { ("attention_hw", "attn_fwd_tiled_hw") } else { ("attention", "attn_fwd_tiled") };
        be.launch(family, name, args, &params(r0, n), grid)
    };
    if pl.nch == 1 {
        return fwd(o, lse, 0, rows);
    }
    let mut part = Tensor::empty(be, &[pl.nch * pl.rows * d], DType::F32)?;
    let mut ml = Tensor::empty(be, &[pl.nch * pl.rows * 2], DType::F32)?;
    for (r0, n) in slices(rows, pl.rows) {
        fwd(&mut part, &mut ml, r0, n)?;
        be.launch(
            "split",
            "attn_fwd_combine",
            &mut [Arg::R(&part), Arg::R(&ml), Arg::W(o), Arg::W(lse)],
            &attn_params(s, pl.chunk, pl.nch, r0, n),
            grid1d(n * d),
        )?;
    }
    Ok(())
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
    let rows = s.batch * s.seq * s.n_heads;

    // (lse, delta = dO·O) per query and head, interleaved in one buffer.
    let mut stats = Tensor::empty(be, &[s.batch, s.n_heads, s.seq, 2], DType::F32)?;
    be.launch(
        "attention",
        "attn_bwd_stats",
        &mut [Arg::R(d_o), Arg::R(o), Arg::R(lse), Arg::R(idx), Arg::W(&mut stats)],
        &attn_params(s, 1, 1, 0, rows),
        grid1d(rows),
    )?;

    let hw = be.kernel_variant() == KernelVariant::Hardware;
    if hw && let Some(tq) = dq_tile(be, s) {
        bwd_dq_tiled_hw(be, s, tq, [q, k, v, d_o, &stats, idx], dq)?;
    } else {
        bwd_dq(be, s, [q, k, v, d_o, &stats, idx], dq)?;
    }
    if hw && bwd_kv_tiled(be, s) {
        bwd_dkdv_tiled_hw(be, s, [q, k, v, d_o, &stats, idx], dk, dv)
    } else {
        bwd_dkdv(be, s, [q, k, v, d_o, &stats, idx], dk, dv)
    }
}

/// `attn_bwd_dq`: an invocation per (chunk, batch, query, head), split over
/// the query's slots like the forward. `ins` are q, k, v, dO, stats, idx.
fn bwd_dq(be: &WgpuBackend, s: &AttentionSpec, ins: [&T; 6], dq: &mut T) -> Result<()> {
    let [q, k, v, d_o, stats, idx] = ins;
    let (d, nc) = (s.head_dim, s.head_dim.div_ceil(4));
    let max_floats = max_scratch_floats(be);
    let rows = s.batch * s.seq * s.n_heads;
    let pl = plan(loop_budget(be), max_slots(s), 1 + 2 * nc, nc + d + 64, 1, rows, d, max_floats);
    let params = |r0: usize, n: usize| attn_params(s, pl.chunk, pl.nch, r0, n);
    // Writes dq directly (one chunk) or the chunks' partials.
    let bwd_dq = |dq: &mut T, r0: usize, n: usize| {
        let args = &mut [Arg::R(q), Arg::R(k), Arg::R(v), Arg::R(d_o), Arg::R(stats), Arg::R(idx), Arg::W(dq)];
        be.launch("attention", "attn_bwd_dq", args, &params(r0, n), grid1d(pl.nch * n))
    };
    if pl.nch == 1 {
        return bwd_dq(dq, 0, rows);
    }
    let mut part = Tensor::empty(be, &[pl.nch * pl.rows * d], DType::F32)?;
    for (r0, n) in slices(rows, pl.rows) {
        bwd_dq(&mut part, r0, n)?;
        sum_chunks(be, &part, pl.nch, r0, n, d, dq)?;
    }
    Ok(())
}

/// `attn_bwd_dkdv`: an invocation per (chunk, batch, key, kv head), split
/// over the queries. Per query: the pattern test (a scan of its own index
/// row) and the group's heads (q·k and dO·v loop, dk/dv loop).
fn bwd_dkdv(be: &WgpuBackend, s: &AttentionSpec, ins: [&T; 6], dk: &mut T, dv: &mut T) -> Result<()> {
    let [q, k, v, d_o, stats, idx] = ins;
    let (d, nc) = (s.head_dim, s.head_dim.div_ceil(4));
    let max_floats = max_scratch_floats(be);
    let rows = s.batch * s.seq * s.n_kv_heads;
    let grp = s.group();
    let per_q = grp * (1 + 2 * nc)
        + 2
        + match s.pattern {
            PatternSpec::Dense => 0,
            PatternSpec::Tokens { k } => k,
            PatternSpec::Blocks { n, .. } => n,
        };
    let pl = plan(loop_budget(be), s.seq, per_q, 2 * nc + 2 * d + 64, 1, rows, 2 * d, max_floats);
    let params = |r0: usize, n: usize| attn_params(s, pl.chunk, pl.nch, r0, n);
    // Writes dk/dv directly (one chunk) or the chunks' partials.
    let bwd_dkdv = |dk: &mut T, dv: &mut T, r0: usize, n: usize| {
        let args =
            &mut [Arg::R(q), Arg::R(k), Arg::R(v), Arg::R(d_o), Arg::R(stats), Arg::R(idx), Arg::W(dk), Arg::W(dv)];
        be.launch("attention", "attn_bwd_dkdv", args, &params(r0, n), grid1d(pl.nch * n))
    };
    if pl.nch == 1 {
        return bwd_dkdv(dk, dv, 0, rows);
    }
    let mut pk = Tensor::empty(be, &[pl.nch * pl.rows * d], DType::F32)?;
    let mut pv = Tensor::empty(be, &[pl.nch * pl.rows * d], DType::F32)?;
    for (r0, n) in slices(rows, pl.rows) {
        bwd_dkdv(&mut pk, &mut pv, r0, n)?;
        sum_chunks(be, &pk, pl.nch, r0, n, d, dk)?;
        sum_chunks(be, &pv, pl.nch, r0, n, d, dv)?;
    }
    Ok(())
}

/// Keys per tile of `attn_bwd_dkdv_tiled_hw` (one per invocation).
const KV_TILE: usize = 64;
/// Queries per staged tile of `attn_bwd_dkdv_tiled_hw`.
const KV_QUERIES: usize = 16;
/// Workgroup memory of `attn_bwd_dkdv_tiled_hw`: the staged q and dO rows,
/// their (lse, delta), the queries' key masks and the union word.
const KV_SHARED_BYTES: usize = 2 * KV_QUERIES * (FWD_MAX_DIM / 4) * 16 + 8 * KV_QUERIES + 8 * KV_QUERIES + 8;

/// Whether `attn_bwd_dkdv_tiled_hw` applies: head_dim <= 128 (its private
/// rows) and the adapter's workgroup memory.
fn bwd_kv_tiled(be: &WgpuBackend, s: &AttentionSpec) -> bool {
    let shared = be.device.limits().max_compute_workgroup_storage_size as usize;
    s.head_dim <= FWD_MAX_DIM && shared >= KV_SHARED_BYTES
}

/// dq with `attn_bwd_dq_tiled_hw` (every pattern; tokens over 16-key units): a workgroup
/// per (chunk, batch, tile of `tq` queries, head) over the union of the
/// tile's key units, split over units like the tiled forward, partials
/// summed by `sum_chunks`. `ins` are q, k, v, dO, stats, idx.
fn bwd_dq_tiled_hw(be: &WgpuBackend, s: &AttentionSpec, tq: usize, ins: [&T; 6], dq: &mut T) -> Result<()> {
    let [q, k, v, d_o, stats, idx] = ins;
    let rows = s.batch * s.seq * s.n_heads;
    let (d, nc) = (s.head_dim, s.head_dim.div_ceil(4));
    let (unit, n) = match s.pattern {
        PatternSpec::Blocks { block, n } => (block, n),
        PatternSpec::Tokens { k } => (FWD_KEYS, k),
        _ => (FWD_KEYS, 0),
    };
    // As the forward: per key tile its loops, the cooperative load and the
    // two vec4 loops (q·k with dO·v, then dq); per unit its tiles and the
    // window's marking loop.
    let per_tile = 3 + (FWD_KEYS * nc).div_ceil(FWD_THREADS_HW) + 2 * nc;
    let per_unit = unit.div_ceil(FWD_KEYS) * per_tile + 3 + (n + 1).div_ceil(FWD_WINDOW);
    let pl = plan(loop_budget(be), s.seq.div_ceil(unit), per_unit, 3 * nc + d + 64, 1, rows, d, max_scratch_floats(be));
    let params = |r0: usize, n: usize| {
        let (first, nt) = row_tiles(s.seq, s.n_heads, tq, r0, n);
        let p = tiled_params(attn_params(s, pl.chunk, pl.nch, r0, n), tq, first, nt, unit);
        (p, rows_grid(pl.nch * nt))
    };
    let run = |dq: &mut T, r0: usize, n: usize| {
        let (p, grid) = params(r0, n);
        let args = &mut [Arg::R(q), Arg::R(k), Arg::R(v), Arg::R(d_o), Arg::R(stats), Arg::R(idx), Arg::W(dq)];
        be.launch("attention_hw", "attn_bwd_dq_tiled_hw", args, &p, grid)
    };
    if pl.nch == 1 {
        return run(dq, 0, rows);
    }
    let mut part = Tensor::empty(be, &[pl.nch * pl.rows * d], DType::F32)?;
    for (r0, n) in slices(rows, pl.rows) {
        run(&mut part, r0, n)?;
        sum_chunks(be, &part, pl.nch, r0, n, d, dq)?;
    }
    Ok(())
}

/// dk, dv with `attn_bwd_dkdv_tiled_hw` (every pattern): a workgroup per
/// (query chunk, batch, tile of 64 keys, kv head) staging 16 queries at a
/// time, split over queries, partials summed by `sum_chunks`.
fn bwd_dkdv_tiled_hw(be: &WgpuBackend, s: &AttentionSpec, ins: [&T; 6], dk: &mut T, dv: &mut T) -> Result<()> {
    let [q, k, v, d_o, stats, idx] = ins;
    let rows = s.batch * s.seq * s.n_kv_heads;
    let (d, nc) = (s.head_dim, s.head_dim.div_ceil(4));
    let grp = s.group();
    let n = match s.pattern {
        PatternSpec::Dense => 0,
        PatternSpec::Tokens { k } => k,
        PatternSpec::Blocks { n, .. } => n,
    };
    // Per staged tile of 16 queries: the mask scan of one query's row, the
    // union step, then per head the staging loop and per query the q·k/dO·v
    // and dk/dv vec4 loops; chunks are whole tiles.
    let per_tile = n + 3 + grp * (2 + (KV_QUERIES * nc).div_ceil(KV_TILE) + KV_QUERIES * (1 + 2 * nc));
    let per_q = per_tile.div_ceil(KV_QUERIES);
    let pl = plan(loop_budget(be), s.seq, per_q, 4 * nc + 2 * d + 64, KV_QUERIES, rows, 2 * d, max_scratch_floats(be));
    let params = |r0: usize, n: usize| {
        let (first, nt) = row_tiles(s.seq, s.n_kv_heads, KV_TILE, r0, n);
        let a = attn_params(s, pl.chunk, pl.nch, r0, n);
        let p = AttnBwdKvParams {
            batch: a.batch,
            seq: a.seq,
            n_heads: a.n_heads,
            n_kv_heads: a.n_kv_heads,
            head_dim: a.head_dim,
            scale: a.scale,
            mode: a.mode,
            kn: a.kn,
            block: a.block,
            nkb: a.nkb,
            chunk: a.chunk,
            nch: a.nch,
            r0: a.r0,
            nrow: a.nrow,
            tkeys: KV_TILE as u32,
            tile0: first as u32,
            ntile: nt as u32,
        };
        (p, rows_grid(pl.nch * nt))
    };
    let run = |dk: &mut T, dv: &mut T, r0: usize, n: usize| {
        let (p, grid) = params(r0, n);
        let args =
            &mut [Arg::R(q), Arg::R(k), Arg::R(v), Arg::R(d_o), Arg::R(stats), Arg::R(idx), Arg::W(dk), Arg::W(dv)];
        be.launch("attention_hw", "attn_bwd_dkdv_tiled_hw", args, &p, grid)
    };
    if pl.nch == 1 {
        return run(dk, dv, 0, rows);
    }
    let mut pk = Tensor::empty(be, &[pl.nch * pl.rows * d], DType::F32)?;
    let mut pv = Tensor::empty(be, &[pl.nch * pl.rows * d], DType::F32)?;
    for (r0, n) in slices(rows, pl.rows) {
        run(&mut pk, &mut pv, r0, n)?;
        sum_chunks(be, &pk, pl.nch, r0, n, d, dk)?;
        sum_chunks(be, &pv, pl.nch, r0, n, d, dv)?;
    }
    Ok(())
}

crate::wgsl_params! {
    /// Every kernel of `shaders/indexer.wgsl`: the indexer spec (nkb =
    /// ceil(seq / block); the tile of query rows q0 .. q0 + qrows), and for
    /// the split backward kernels the loop split (chunk, nch) and the
    /// launch's rows (r0, nrow), zero elsewhere.
    pub struct IndexerParams {
        batch: u32,
        seq: u32,
        heads: u32,
        dim: u32,
        block: u32,
        nkb: u32,
        q0: u32,
        qrows: u32,
        chunk: u32,
        nch: u32,
        r0: u32,
        nrow: u32,
    }
}

crate::wgsl_params! {
    /// `shaders/select.wgsl`: nrows = batch·rows rows of `cols` candidates,
    /// k kept, block (0: token mode).
    pub struct SelectParams {
        nrows: u32,
        rows: u32,
        k: u32,
        block: u32,
        cols: u32,
    }
}

/// The parameters of the kernels of `shaders/indexer.wgsl`; the split
/// backward kernels' launch over rows r0 .. r0 + nrow in `nch` chunks of
/// `chunk` (zeros for the other kernels).
fn indexer_params(s: &IndexerSpec, chunk: usize, nch: usize, r0: usize, nrow: usize) -> IndexerParams {
    let block = s.block.max(1);
    IndexerParams {
        batch: s.batch as u32,
        seq: s.seq as u32,
        heads: s.heads as u32,
        dim: s.dim as u32,
        block: block as u32,
        nkb: s.seq.div_ceil(block) as u32,
        q0: s.q0 as u32,
        qrows: s.rows as u32,
        chunk: chunk as u32,
        nch: nch as u32,
        r0: r0 as u32,
        nrow: nrow as u32,
    }
}

/// The rows of a `[batch, seq, per]` layout that belong to the spec's tile of
/// queries, as `(first, count)` ranges: one per batch entry, or one in all
/// for the whole sequence.
fn tile_ranges(s: &IndexerSpec, per: usize) -> Vec<(usize, usize)> {
    if s.q0 == 0 && s.rows == s.seq {
        return vec![(0, s.batch * s.seq * per)];
    }
    (0..s.batch).map(|b| ((b * s.seq + s.q0) * per, s.rows * per)).collect()
}

/// Largest d_I of the indexer's hardware training kernels (their 16-vec4 rows
/// in workgroup memory and private accumulators).
const IDX_HW_MAX_DIM: usize = 64;
/// Side of the key × query tiles of `indexer_scores_hw`.
const IDX_SCORES_TILE: usize = 16;
/// Workgroup memory of `indexer_scores_hw` (f32 tiles): the q_i and k_i
/// tiles and w.
const IDX_SCORES_HW_SHARED_BYTES: usize = 2 * 256 * 16 + 256 * 4;
/// Rows per workgroup and keys per streamed tile of `indexer_bwd_q_hw`.
const IDX_BWD_Q_ROWS: usize = 32;
const IDX_BWD_Q_KEYS: usize = 16;
/// Workgroup memory of `indexer_bwd_q_hw`: the q_i rows, the k_i tile, the
/// coefficients and the dw partials.
const IDX_BWD_Q_HW_SHARED_BYTES: usize = 512 * 16 + 256 * 16 + 512 * 4 + 64 * 4;
/// Keys per workgroup and (query, head) rows per streamed tile of `indexer_bwd_k_hw`.
const IDX_BWD_K_KEYS: usize = 32;
const IDX_BWD_K_ROWS: usize = 16;
/// Workgroup memory of `indexer_bwd_k_hw`: the k_i rows, the q_i tile, the
/// coefficients and the rows' w.
const IDX_BWD_K_HW_SHARED_BYTES: usize = 512 * 16 + 256 * 16 + 512 * 4 + 16 * 4;

/// Whether an indexer hardware training kernel needing `shared` bytes of
/// workgroup memory applies: the hardware variant, d_I <= 64 and the
/// adapter's workgroup memory (else the software kernel runs).
fn idx_hw(be: &WgpuBackend, s: &IndexerSpec, shared: usize) -> bool {
    let limit = be.device.limits().max_compute_workgroup_storage_size as usize;
    be.kernel_variant() == KernelVariant::Hardware && s.dim <= IDX_HW_MAX_DIM && limit >= shared
}

/// The indexer scores of the spec's query rows: `indexer_scores` (an
/// invocation per score), or on the hardware variant `indexer_scores_hw` (a
/// 256-wide workgroup per 16 × 16 tile of keys × queries; H_I <= 16).
pub(super) fn indexer_scores(be: &WgpuBackend, s: &IndexerSpec, qi: &T, ki: &T, w: &T, scores: &mut T) -> Result<()> {
    let args = &mut [Arg::R(qi), Arg::R(ki), Arg::R(w), Arg::W(scores)];
    let p = indexer_params(s, 0, 0, 0, 0);
    if idx_hw(be, s, IDX_SCORES_HW_SHARED_BYTES) && s.heads <= IDX_MAX_HEADS {
        let grid = [s.seq.div_ceil(IDX_SCORES_TILE) as u32, s.rows.div_ceil(IDX_SCORES_TILE) as u32, s.batch as u32];
        return be.launch("indexer", "indexer_scores_hw", args, &p, grid);
    }
    be.launch("indexer", "indexer_scores", args, &p, grid1d(s.batch * s.rows * s.seq))
}

/// Limits of `indexer_block_scores_tiled`: H_I, d_I (its private k_i row) and
/// its workgroup memory (the q_i and w tiles, the per-query partial maxima).
const IDX_MAX_HEADS: usize = 16;
const IDX_MAX_DIM: usize = 64;
const IDX_SHARED_BYTES: usize = 832 * 16 + 256 * 4 + 512 * 4;

/// The per-query block-pooled indexer scores `[batch, seq, nkb]`:
/// `indexer_block_scores_tiled` (q_i tiles in workgroup memory, a workgroup
/// per (key block, query block); its `_hw` variant on hardware adapters:
/// 64 invocations, one key each) where it applies, else the plain kernel (an
/// invocation per output).
pub(super) fn indexer_block_scores(
    be: &WgpuBackend,
    s: &IndexerSpec,
    qi: &T,
    ki: &T,
    w: &T,
    pooled: &mut T,
) -> Result<()> {
    let nb = s.n_blocks() as u32;
    let shared = be.device.limits().max_compute_workgroup_storage_size as usize;
    let tiled = shared >= IDX_SHARED_BYTES && s.heads <= IDX_MAX_HEADS && s.dim <= IDX_MAX_DIM;
    let args = &mut [Arg::R(qi), Arg::R(ki), Arg::R(w), Arg::W(pooled)];
    if tiled {
        let name = match be.kernel_variant() {
            KernelVariant::Software => "indexer_block_scores_tiled",
            KernelVariant::Hardware => "indexer_block_scores_tiled_hw",
        };
        be.launch("indexer", name, args, &indexer_params(s, 0, 0, 0, 0), [nb, nb, s.batch as u32])
    } else {
        let n = s.batch * s.seq * s.n_blocks();
        be.launch("indexer", "indexer_block_scores", args, &indexer_params(s, 0, 0, 0, 0), grid1d(n))
    }
}

/// Largest k of `select_topk_rows` (its private list).
const SELECT_ROWS_MAX_K: usize = 64;

/// `select_topk_rows` (an invocation per row) where the rows are short enough
/// for its `cols·(k + 2)` loop iterations, else `select_topk` (a workgroup per
/// row). Block mode has `ceil(seq / block)` columns per query row.
pub(super) fn select_topk(be: &WgpuBackend, s: &SelectSpec, scores: &T, idx: &mut T) -> Result<()> {
    let rows = s.batch * s.rows;
    let params = &SelectParams {
        nrows: rows as u32,
        rows: s.rows as u32,
        k: s.k as u32,
        block: s.block as u32,
        cols: s.cols as u32,
    };
    let args = &mut [Arg::R(scores), Arg::W(idx)];
    if s.k <= SELECT_ROWS_MAX_K && s.cols * (s.k + 2) <= ITER_BUDGET {
        be.launch("select", "select_topk_rows", args, params, grid1d(rows))
    } else {
        be.launch("select", "select_topk", args, params, rows_grid(rows))
    }
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
        &{
            let p = attn_params(a, 1, 1, 0, 0);
            AttnKlParams {
                batch: p.batch,
                seq: p.seq,
                n_heads: p.n_heads,
                n_kv_heads: p.n_kv_heads,
                head_dim: p.head_dim,
                scale: p.scale,
                mode: p.mode,
                kn: p.kn,
                block: p.block,
                nkb: p.nkb,
                q0: s.q0 as u32,
                qrows: s.rows as u32,
                every: s.sample.every as u32,
                phase: s.sample.phase as u32,
            }
        },
        rows_grid(a.batch * s.rows),
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
    let (di, nh) = (s.dim, s.heads);
    let (d4, passes) = (di.div_ceil(4), di.div_ceil(64));
    let max_floats = max_scratch_floats(be);
    if idx_hw(be, s, IDX_BWD_Q_HW_SHARED_BYTES.max(IDX_BWD_K_HW_SHARED_BYTES)) {
        return indexer_backward_hw(be, s, [qi, ki, w, dscores], dqi, dki, dw);
    }

    // dq_i, dw: split over the keys s <= t. Per key and pass of 64 dims: the
    // key loop and the logit loop; the accumulation loops add up to d_I / 4.
    // Rows (batch, query, head) of the tile's queries only.
    let ranges = tile_ranges(s, nh);
    let rows = ranges[0].1;
    let pl = plan(loop_budget(be), s.seq, passes * (1 + d4) + d4, d4 + di + passes + 64, 1, rows, di + 1, max_floats);
    let params = |r0: usize, n: usize| indexer_params(s, pl.chunk, pl.nch, r0, n);
    // Writes dq_i/dw directly (one chunk) or the chunks' partials.
    let bwd_q = |dqi: &mut T, dw: &mut T, r0: usize, n: usize| {
        let args = &mut [Arg::R(qi), Arg::R(ki), Arg::R(w), Arg::R(dscores), Arg::W(dqi), Arg::W(dw)];
        be.launch("indexer", "indexer_bwd_q", args, &params(r0, n), grid1d(pl.nch * n))
    };
    if pl.nch == 1 {
        for &(first, count) in &ranges {
            bwd_q(dqi, dw, first, count)?;
        }
    } else {
        let mut pq = Tensor::empty(be, &[pl.nch * pl.rows * di], DType::F32)?;
        let mut pw = Tensor::empty(be, &[pl.nch * pl.rows], DType::F32)?;
        for &(first, count) in &ranges {
            for (r0, n) in slices(count, pl.rows) {
                bwd_q(&mut pq, &mut pw, first + r0, n)?;
                sum_chunks(be, &pq, pl.nch, first + r0, n, di, dqi)?;
                sum_chunks(be, &pw, pl.nch, first + r0, n, 1, dw)?;
            }
        }
    }

    // dk_i: split over the tile's queries t >= s; per query and pass: every
    // head's logit loop, plus the accumulation loops.
    let rows = s.batch * s.seq;
    let pl = plan(
        loop_budget(be),
        s.rows,
        passes * (1 + nh * (1 + d4)) + nh * d4,
        d4 + di + passes + 64,
        1,
        rows,
        di,
        max_floats,
    );
    let params = |r0: usize, n: usize| indexer_params(s, pl.chunk, pl.nch, r0, n);
    // Writes dk_i directly (one chunk) or the chunks' partials.
    let bwd_k = |dki: &mut T, r0: usize, n: usize| {
        let args = &mut [Arg::R(qi), Arg::R(ki), Arg::R(w), Arg::R(dscores), Arg::W(dki)];
        be.launch("indexer", "indexer_bwd_k", args, &params(r0, n), grid1d(pl.nch * n))
    };
    if pl.nch == 1 {
        return bwd_k(dki, 0, rows);
    }
    let mut pk = Tensor::empty(be, &[pl.nch * pl.rows * di], DType::F32)?;
    for (r0, n) in slices(rows, pl.rows) {
        bwd_k(&mut pk, r0, n)?;
        sum_chunks(be, &pk, pl.nch, r0, n, di, dki)?;
    }
    Ok(())
}

/// Loop iterations per invocation of one streamed tile of the indexer's
/// hardware backward kernels (both have the same shape): the tile's load
/// loop, eight d_I / 4-long logit loops, and the 16-step accumulation loop
/// (eight vec4s written out per step).
fn idx_bwd_hw_step(d4: usize) -> usize {
    4 + 8 * (1 + d4) + 16 + 4
}

/// `indexer_backward` with `indexer_bwd_q_hw` and `indexer_bwd_k_hw`: the
/// software kernels' rows, chunks and partials, each launch within one batch
/// entry (their tiles of rows share one batch's keys or queries). `ins` are
/// q_i, k_i, w, dscores.
fn indexer_backward_hw(
    be: &WgpuBackend,
    s: &IndexerSpec,
    ins: [&T; 4],
    dqi: &mut T,
    dki: &mut T,
    dw: &mut T,
) -> Result<()> {
    let [qi, ki, w, dscores] = ins;
    let (di, nh) = (s.dim, s.heads);
    let step = idx_bwd_hw_step(di.div_ceil(4));
    let max_floats = max_scratch_floats(be);
    // The launch's rows, as many as fit the scratch, within one batch entry each.
    let batch_slices = |first: usize, count: usize, per: usize| {
        (0..s.batch).flat_map(move |b| slices(count, per).map(move |(r0, n)| (b, first + r0, n)))
    };

    // dq_i, dw: rows (batch, query, head) of the tile's queries, split over
    // the keys in multiples of the 16-key tile; the q_i staging and the
    // output loops are fixed.
    let rows = s.rows * nh;
    let fixed = 8 + 8 * 4 + 64;
    let pl =
        plan(loop_budget(be), s.seq, step.div_ceil(IDX_BWD_Q_KEYS), fixed, IDX_BWD_Q_KEYS, rows, di + 1, max_floats);
    let params = |r0: usize, n: usize| indexer_params(s, pl.chunk, pl.nch, r0, n);
    let bwd_q = |dqi: &mut T, dw: &mut T, r0: usize, n: usize| {
        let args = &mut [Arg::R(qi), Arg::R(ki), Arg::R(w), Arg::R(dscores), Arg::W(dqi), Arg::W(dw)];
        let grid = rows_grid(pl.nch * n.div_ceil(IDX_BWD_Q_ROWS));
        be.launch("indexer", "indexer_bwd_q_hw", args, &params(r0, n), grid)
    };
    let first = |b: usize| (b * s.seq + s.q0) * nh;
    if pl.nch == 1 {
        for b in 0..s.batch {
            bwd_q(dqi, dw, first(b), rows)?;
        }
    } else {
        let mut pq = Tensor::empty(be, &[pl.nch * pl.rows * di], DType::F32)?;
        let mut pw = Tensor::empty(be, &[pl.nch * pl.rows], DType::F32)?;
        for (b, r0, n) in batch_slices(0, rows, pl.rows) {
            let r0 = first(b) + r0;
            bwd_q(&mut pq, &mut pw, r0, n)?;
            sum_chunks(be, &pq, pl.nch, r0, n, di, dqi)?;
            sum_chunks(be, &pw, pl.nch, r0, n, 1, dw)?;
        }
    }

    // dk_i: rows (batch, key), split over the tile's queries; per query its
    // H_I (query, head) rows of the streamed tiles.
    let rows = s.seq;
    let per_q = (nh * step).div_ceil(IDX_BWD_K_ROWS);
    let pl = plan(loop_budget(be), s.rows, per_q, fixed, 1, rows, di, max_floats);
    let params = |r0: usize, n: usize| indexer_params(s, pl.chunk, pl.nch, r0, n);
    let bwd_k = |dki: &mut T, r0: usize, n: usize| {
        let args = &mut [Arg::R(qi), Arg::R(ki), Arg::R(w), Arg::R(dscores), Arg::W(dki)];
        let grid = rows_grid(pl.nch * n.div_ceil(IDX_BWD_K_KEYS));
        be.launch("indexer", "indexer_bwd_k_hw", args, &params(r0, n), grid)
    };
    if pl.nch == 1 {
        for b in 0..s.batch {
            bwd_k(dki, b * s.seq, rows)?;
        }
        return Ok(());
    }
    let mut pk = Tensor::empty(be, &[pl.nch * pl.rows * di], DType::F32)?;
    for (b, r0, n) in batch_slices(0, rows, pl.rows) {
        let r0 = b * s.seq + r0;
        bwd_k(&mut pk, r0, n)?;
        sum_chunks(be, &pk, pl.nch, r0, n, di, dki)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The launcher's workgroup-memory figures of the tiled forward are
    /// naga's for the kernel as generated (f32 tiles, and f16 tiles with the
    /// f16 feature and f16 inputs).
    #[test]
    fn fwd_shared_bytes_match_the_kernel() {
        use super::super::kernel::{KernelFeatures, Role, find, generate_with, resource_use};
        let k = find("attention_hw", "attn_fwd_tiled_hw").unwrap();
        for (dt, f, want) in [
            (DType::F32, KernelFeatures::ALL, FWD_SHARED_BYTES),
            (DType::F16, KernelFeatures::NONE, FWD_SHARED_BYTES),
            (DType::F16, KernelFeatures::ALL, FWD_SHARED_BYTES_F16),
        ] {
            let dts: Vec<DType> = k
                .args
                .iter()
                .map(|(_, r)| match r {
                    Role::In => dt,
                    Role::Idx | Role::IdxOut => DType::U32,
                    _ => DType::F32,
                })
                .collect();
            let u = resource_use("attn_fwd_tiled_hw", &generate_with(&k, &dts, f).unwrap()).unwrap();
            assert_eq!(u.workgroup_bytes, want, "{dt} {f}");
        }
        const { assert!(FWD_SHARED_BYTES_F16 <= 16 * 1024 && FWD_SHARED_BYTES > 16 * 1024) };
    }

    #[test]
    fn short_loops_run_in_one_chunk() {
        let p = plan(ITER_BUDGET, 100, 33, 200, 1, 7, 66, 1 << 20);
        assert_eq!(p, Plan { chunk: 100, nch: 1, rows: 7 });
        assert_eq!(plan(ITER_BUDGET, 0, 33, 200, 1, 7, 66, 1 << 20).nch, 1);
    }

    #[test]
    fn long_loops_split_within_the_budget_and_cover_every_item() {
        for (total, per, fixed, align) in
            [(2600, 33, 200, 1), (16384, 35, 300, 64), (5000, 133, 100, 1), (3, 20_000, 0, 1)]
        {
            let p = plan(ITER_BUDGET, total, per, fixed, align, 1000, 64, 1 << 20);
            assert!(p.nch > 1, "{total}: {p:?}");
            assert!(p.chunk * per + fixed <= ITER_BUDGET || p.chunk == 1, "{total}: {p:?}");
            assert!(p.nch * p.chunk >= total && (p.nch - 1) * p.chunk < total, "{total}: {p:?}");
            if align > 1 {
                assert_eq!(p.chunk % align, 0);
            }
        }
    }

    #[test]
    fn scratch_is_bounded_by_slicing_rows() {
        let p = plan(ITER_BUDGET, 100_000, 33, 0, 1, 50_000, 66, 1 << 20);
        assert!(p.nch * p.rows * 66 <= 1 << 20, "{p:?}");
        let s: Vec<_> = slices(10, 4).collect();
        assert_eq!(s, vec![(0, 4), (4, 4), (8, 2)]);
    }
}
