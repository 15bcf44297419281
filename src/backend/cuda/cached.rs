//! Inference ops over a KV cache on CUDA (semantics in
//! `crate::attention::cached`, `crate::ops::cache`, `crate::ops::rope::rope_rows`;
//! kernels in `kernels/cached.cu`).
//!
//! Decode attention is flash-decoding: each (row, kv head, chunk of query
//! heads) is split over `nsplit` blocks along its keys so that the whole
//! device works even for one sequence; the blocks write partial softmax
//! states and a merge kernel combines them. `nsplit` is picked on the host
//! from the row count and the number of SMs (the key counts live in the row
//! table on the device, and each block divides its row's actual range).
//!
//! Prefill: a dense step of at least `RUN_MIN` rows also launches
//! `cached_attn_run`, which takes every 32-row tile of the step that is one
//! run (one sequence, consecutive positions, decided on the device from the
//! row table) and loads each K/V tile once for its 32 rows; the
//! flash-decoding kernels then skip those rows.

use cudarc::driver::LaunchConfig;

use super::{Arg, CudaBackend, sfx};
use crate::Tensor;
use crate::attention::cached::{CachedAttentionSpec, CachedIndexerSpec, CachedSelectSpec};
use crate::attention::ops::PatternSpec;
use crate::error::{Error, Result};
use crate::ops::{CacheWriteSpec, RopeSpec};

type T = Tensor<CudaBackend>;

const FAMILY: &str = "cached";
/// Threads of the grid-stride kernels.
const THREADS: u32 = 256;
/// `CI_THREADS` / `CS_THREADS` of cached.cu.
const INDEXER_THREADS: usize = 256;
const SELECT_THREADS: u32 = 256;
/// `CA_WARPS` of cached.cu.
const ATTN_WARPS: usize = 4;
/// The most blocks one (row, kv head, head chunk) is split into.
const MAX_SPLITS: usize = 256;
/// Fewest keys per split the host aims at (for caches too small to split further).
const MIN_SPLIT_KEYS: usize = 64;
/// `RUN_ROWS` / `RUN_MIN` of cached.cu: rows per prefill tile, fewest rows of a run.
const RUN_ROWS: usize = 32;
const RUN_MIN: usize = 8;
/// Largest grid y / z.
const GRID_YZ: usize = 65535;
/// Static shared memory a block may use without opting in.
const SMEM_DEFAULT: usize = 48 * 1024;

fn p(t: &T) -> Arg {
    Arg::P(t.buf.ptr)
}
fn u(v: usize) -> Arg {
    Arg::U(v as u32)
}

/// A grid-stride launch over `n` items.
fn flat(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(THREADS as usize).clamp(1, 1 << 16) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// Dims per lane of the warp-per-row kernels (instantiations 1, 2, 4, 8; d <= 256).
fn dpl(d: usize) -> usize {
    match d.div_ceil(32) {
        0 | 1 => 1,
        2 => 2,
        3 | 4 => 4,
        _ => 8,
    }
}

pub(super) fn rope_rows(be: &CudaBackend, s: &RopeSpec, x: &T, c: &T, sn: &T, rows: &T, y: &mut T) -> Result<()> {
    let half = s.head_dim / 2;
    let max_pos = c.numel().checked_div(half).unwrap_or(0);
    if max_pos == 0 {
        return Err(Error::Shape("rope_rows: the RoPE table has no position".into()));
    }
    let pairs = s.batch * s.seq * s.heads * half;
    if pairs == 0 {
        return Ok(());
    }
    let name = format!("rope_rows_{}", sfx(x.dtype()));
    let args = [p(x), p(c), p(sn), p(rows), p(y), u(pairs), u(s.heads), u(half), u(max_pos)];
    be.launch(FAMILY, &name, flat(pairs), &args)
}

pub(super) fn cache_write(
    be: &CudaBackend,
    s: &CacheWriteSpec,
    src: &T,
    rows: &T,
    _pages: &T,
    cache: &mut T,
) -> Result<()> {
    let name = format!("cache_write_{}", sfx(src.dtype()));
    let args = [p(src), p(rows), p(cache), u(s.rows), u(s.width), u(s.slots)];
    be.launch(FAMILY, &name, flat(s.rows * s.width), &args)
}

/// How [`cached_attention`] cuts its work: query heads per block, chunks
/// of heads per kv head, key splits per (row, kv head, chunk), key rows per
/// shared-memory tile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct AttnPlan {
    hpc: usize,
    nhc: usize,
    nsplit: usize,
    tk: usize,
}

/// Dynamic shared memory of `cached_attn_run` (bytes): Q, K, V tiles of
/// 32×(32·dpl+1) floats and P tiles of 4×8×32 floats.
fn run_smem(dpl: usize) -> usize {
    ((RUN_ROWS + 64) * (32 * dpl + 1) + ATTN_WARPS * 8 * 32) * 4
}

/// `sms` multiprocessors: about four blocks per SM in all, each split
/// keeping at least [`MIN_SPLIT_KEYS`] of the cache (dense) or one selected
/// block (sparse).
fn plan(s: &CachedAttentionSpec, sms: usize) -> AttnPlan {
    let group = s.group();
    let hpc = group.min(ATTN_WARPS);
    let nhc = group.div_ceil(hpc);
    let base = s.rows * s.n_kv_heads * nhc;
    let max_split = match s.pattern {
        PatternSpec::Blocks { n, .. } => n,
        _ => s.slots.div_ceil(MIN_SPLIT_KEYS),
    };
    let nsplit = (4 * sms.max(1)).div_ceil(base.max(1)).clamp(1, max_split.clamp(1, MAX_SPLITS));
    let tk = if s.head_dim <= 128 { 32 } else { 16 };
    AttnPlan { hpc, nhc, nsplit, tk }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn cached_attention(
    be: &CudaBackend,
    s: &CachedAttentionSpec,
    q: &T,
    k: &T,
    v: &T,
    rows: &T,
    _pages: &T,
    idx: Option<&T>,
    o: &mut T,
) -> Result<()> {
    let sms = be
        .ctx
        .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map(|v| v.max(1) as usize)
        .unwrap_or(1);
    let pl = plan(s, sms);
    if s.n_kv_heads * pl.nhc > GRID_YZ {
        return Err(Error::Shape(format!(
            "cached_attention: {} kv heads exceed the CUDA backend's {GRID_YZ}",
            s.n_kv_heads
        )));
    }
    let (mode, n, block, ip) = match (s.pattern, idx) {
        (PatternSpec::Blocks { block, n }, Some(i)) => (1, n, block, p(i)),
        (PatternSpec::Dense, _) => (0, 0, 1, Arg::P(0)),
        _ => return Err(Error::Invalid("cached_attention: a block pattern needs its index".into())),
    };
    let (dt, nd) = (sfx(q.dtype()), dpl(s.head_dim));
    let runs = mode == 0
        && s.rows >= RUN_MIN
        && s.head_dim <= 128
        && s.n_heads <= GRID_YZ
        && run_smem(nd) <= be.smem_optin.max(SMEM_DEFAULT);
    if runs {
        let cfg = LaunchConfig {
            grid_dim: (s.rows.div_ceil(RUN_ROWS) as u32, s.n_heads as u32, 1),
            block_dim: ((ATTN_WARPS * 32) as u32, 1, 1),
            shared_mem_bytes: run_smem(nd) as u32,
        };
        let args = [
            p(q),
            p(k),
            p(v),
            p(rows),
            p(o),
            u(s.rows),
            u(s.n_heads),
            u(s.n_kv_heads),
            u(s.head_dim),
            u(s.slots),
            Arg::F(s.scale),
        ];
        be.launch(FAMILY, &format!("cached_attn_run_{dt}_d{nd}"), cfg, &args)?;
    }
    // Partial states: acc [R, H, nsplit, d] and (m, l) [R, H, nsplit, 2], f32.
    let parts = if pl.nsplit > 1 {
        let rh = s.rows * s.n_heads * pl.nsplit;
        Some((be.raw_alloc(rh * s.head_dim * 4)?, be.raw_alloc(rh * 2 * 4)?))
    } else {
        None
    };
    let (pa, pm) = parts.as_ref().map(|(a, m)| (Arg::P(a.ptr), Arg::P(m.ptr))).unwrap_or((Arg::P(0), Arg::P(0)));
    let cfg = LaunchConfig {
        grid_dim: (pl.nsplit as u32, (s.n_kv_heads * pl.nhc) as u32, s.rows.min(GRID_YZ) as u32),
        block_dim: ((ATTN_WARPS * 32) as u32, 1, 1),
        shared_mem_bytes: (2 * pl.tk * s.head_dim * 4) as u32,
    };
    let args = [
        p(q),
        p(k),
        p(v),
        p(rows),
        ip,
        p(o),
        pa,
        pm,
        u(s.rows),
        u(s.n_heads),
        u(s.n_kv_heads),
        u(s.head_dim),
        u(s.slots),
        Arg::F(s.scale),
        u(mode),
        u(n),
        u(block),
        u(pl.nsplit),
        u(pl.hpc),
        u(pl.tk),
        u(runs as usize),
    ];
    be.launch(FAMILY, &format!("cached_attn_{dt}_d{nd}"), cfg, &args)?;
    if parts.is_some() {
        let rh = s.rows * s.n_heads;
        let cfg = LaunchConfig {
            grid_dim: (rh.div_ceil(ATTN_WARPS) as u32, 1, 1),
            block_dim: ((ATTN_WARPS * 32) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let args = [
            pa,
            pm,
            p(o),
            u(rh),
            u(s.head_dim),
            u(pl.nsplit),
            p(rows),
            u(s.rows),
            u(s.n_heads),
            u(s.slots),
            u(runs as usize),
        ];
        be.launch(FAMILY, &format!("cached_attn_merge_{dt}_d{nd}"), cfg, &args)?;
    }
    // The scratch buffers drop here: their frees are ordered after the kernels on the stream.
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(super) fn cached_indexer_block_scores(
    be: &CudaBackend,
    s: &CachedIndexerSpec,
    qi: &T,
    w: &T,
    ki: &T,
    rows: &T,
    _pages: &T,
    pooled: &mut T,
) -> Result<()> {
    const OP: &str = "cached_indexer_block_scores";
    let smem = (s.heads * s.dim + s.heads + INDEXER_THREADS) * 4;
    if smem > SMEM_DEFAULT {
        return Err(Error::Shape(format!(
            "{OP}: {} index heads × {} dims exceed the CUDA kernel's shared memory ({smem} > {SMEM_DEFAULT} bytes)",
            s.heads, s.dim
        )));
    }
    // Key blocks per CUDA block: one thread per key while a key block is at
    // most half the threads, else one key block striding.
    let nbt = if s.block <= INDEXER_THREADS / 2 { INDEXER_THREADS / s.block } else { 1 };
    let cfg = LaunchConfig {
        grid_dim: (s.cols.div_ceil(nbt) as u32, s.rows.min(GRID_YZ) as u32, 1),
        block_dim: (INDEXER_THREADS as u32, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let name = format!("cached_indexer_block_scores_{}", sfx(qi.dtype()));
    let args = [
        p(qi),
        p(w),
        p(ki),
        p(rows),
        p(pooled),
        u(s.rows),
        u(s.heads),
        u(s.dim),
        u(s.block),
        u(s.cols),
        u(s.slots),
        u(nbt),
    ];
    be.launch(FAMILY, &name, cfg, &args)
}

pub(super) fn cached_select(be: &CudaBackend, s: &CachedSelectSpec, scores: &T, rows: &T, idx: &mut T) -> Result<()> {
    let cfg = LaunchConfig {
        grid_dim: (s.rows.clamp(1, 1 << 20) as u32, 1, 1),
        block_dim: (SELECT_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let args = [p(scores), p(rows), p(idx), u(s.rows), u(s.cols), u(s.k), u(s.block)];
    be.launch(FAMILY, "cached_select", cfg, &args)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::CHECKED;

    fn spec(rows: usize, slots: usize, heads: usize, kv: usize, pattern: PatternSpec) -> CachedAttentionSpec {
        CachedAttentionSpec {
            rows,
            slots,
            n_heads: heads,
            n_kv_heads: kv,
            head_dim: 64,
            scale: 0.125,
            pattern,
            paging: crate::attention::Paging { page: slots, table: 1 },
            checked: CHECKED,
        }
    }

    #[test]
    fn one_long_row_is_split_over_the_device_and_a_big_batch_is_not() {
        // One decode row, 4 kv heads of 2 query heads, 16K cache, 132 SMs.
        let pl = plan(&spec(1, 16384, 8, 4, PatternSpec::Dense), 132);
        assert_eq!((pl.hpc, pl.nhc), (2, 1));
        assert_eq!(pl.nsplit, 132, "4·132 blocks over 4 (row, kv head) pairs");
        // A prefill chunk of 512 rows already fills the device.
        assert_eq!(plan(&spec(512, 16384, 8, 4, PatternSpec::Dense), 132).nsplit, 1);
        // Small caches keep >= 64 keys per split; sparse splits at most per selected block.
        assert_eq!(plan(&spec(1, 256, 8, 4, PatternSpec::Dense), 132).nsplit, 4);
        assert_eq!(plan(&spec(1, 16384, 8, 4, PatternSpec::Blocks { block: 64, n: 16 }), 132).nsplit, 16);
        // Group of 12: chunks of 4 heads.
        let pl = plan(&spec(2, 1 << 20, 12, 1, PatternSpec::Dense), 100);
        assert_eq!((pl.hpc, pl.nhc, pl.nsplit), (4, 3, 67));
    }
}
