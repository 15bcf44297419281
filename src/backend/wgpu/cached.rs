//! Inference ops over a KV cache on wgpu (semantics in
//! `crate::attention::cached`, `crate::ops::cache`, `crate::ops::rope::rope_rows`).
//! Kernels in `shaders/cached.wgsl`.
//!
//! - `rope_rows`: one invocation per rotated pair, at the row's position;
//! - `cache_write`: one invocation per 32-bit word of the new rows (f32, or
//!   half rows of an even width, copied as raw words); other half rows go
//!   element by element through the f32 staging of an `inout` cache;
//! - `cached_attention` (flash-decoding): one 64-wide workgroup per (key
//!   chunk, row, head); with more than one chunk the partial softmaxes go to
//!   an F32 scratch and `cached_attn_combine` merges them, so one long row
//!   spreads over `len / chunk × heads` workgroups. The number of chunks is
//!   planned for the longest row the cache can hold (dense: `slots`;
//!   blocks: `n · block` slots); a workgroup whose chunk lies past its row's
//!   length exits at once. In the block pattern a row reads only its own
//!   selected blocks;
//! - `cached_indexer_block_scores`: one 64-wide workgroup per (row, span of
//!   whole blocks), max-pooling with workgroup atomics on order-preserving keys;
//! - `cached_select`: `select_topk`'s algorithm, a workgroup per row.

use super::kernel::{Params, grid1d};
use super::{Arg, WgpuBackend, is_software};
use crate::attention::cached::{CachedAttentionSpec, CachedIndexerSpec, CachedSelectSpec};
use crate::attention::ops::PatternSpec;
use crate::error::{Error, Result};
use crate::ops::{CacheWriteSpec, RopeSpec};
use crate::{DType, Tensor};

type T = Tensor<WgpuBackend>;

/// Loop iterations one invocation may run, well under llvmpipe's 65 535
/// (see `attention.rs`).
const ITER_BUDGET: usize = 16_000;
/// Key slots per `cached_attn` workgroup at most (its workgroup arrays).
const MAX_CHUNK: usize = 1024;
/// Key slots per chunk on a hardware adapter: short chunks put a single
/// long decode row on many workgroups.
const HW_CHUNK: usize = 256;
/// Largest scratch buffer of partial results; longer launches go in slices of rows.
const MAX_SCRATCH_BYTES: usize = 256 << 20;
/// Pooled-indexer keys per workgroup (rounded to whole blocks).
const POOL_SPAN: usize = 256;

/// A launch of `n` workgroups folded into two grid dimensions (kernels
/// recover the index as `wg.x + wg.y·nw.x` and bounds-check it).
fn wg_grid(n: usize) -> [u32; 3] {
    let n = n.max(1);
    if n <= 65_535 { [n as u32, 1, 1] } else { [65_535, n.div_ceil(65_535) as u32, 1] }
}

pub(super) fn rope_rows(be: &WgpuBackend, s: &RopeSpec, x: &T, c: &T, sn: &T, rows: &T, y: &mut T) -> Result<()> {
    let half = s.head_dim / 2;
    let pairs = x.numel() / 2;
    let max_pos = c.numel() / half.max(1);
    if half == 0 || max_pos == 0 {
        return Err(Error::Shape(format!("rope_rows: head_dim {} and an empty table cannot rotate", s.head_dim)));
    }
    be.launch(
        "cached",
        "rope_rows",
        &mut [Arg::R(x), Arg::R(c), Arg::R(sn), Arg::R(rows), Arg::W(y)],
        Params::new().u(pairs).u(half).u(s.heads).u(max_pos),
        grid1d(pairs),
    )
}

pub(super) fn cache_write(
    be: &WgpuBackend,
    s: &CacheWriteSpec,
    src: &T,
    rows: &T,
    _pages: &T,
    cache: &mut T,
) -> Result<()> {
    let bytes = s.width * src.dtype().size();
    if bytes % 4 == 0 {
        // Whole 32-bit words per row: copy them without conversion.
        let words = bytes / 4;
        let k = be.kernel("cached", "cache_write_words")?;
        let p = be.pipeline(&k, &[DType::U32, DType::U32, DType::U32])?;
        let params = Params::new().u(s.rows).u(words).u(s.slots);
        let bufs = [src.buffer().raw(), rows.buffer().raw(), cache.buffer().raw()];
        return be.dispatch(&p, &params, &bufs, grid1d(s.rows * words));
    }
    be.launch(
        "cached",
        "cache_write",
        &mut [Arg::R(src), Arg::R(rows), Arg::W(cache)],
        Params::new().u(s.rows).u(s.width).u(s.slots),
        grid1d(s.rows * s.width),
    )
}

/// Key slots per `cached_attn` chunk on this adapter: long ones on a software
/// adapter (few cores, where every workgroup costs), short ones elsewhere.
fn attn_chunk(be: &WgpuBackend) -> usize {
    if is_software(&be.info) { MAX_CHUNK } else { HW_CHUNK }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn cached_attention(
    be: &WgpuBackend,
    s: &CachedAttentionSpec,
    q: &T,
    k: &T,
    v: &T,
    rows: &T,
    _pages: &T,
    idx: Option<&T>,
    o: &mut T,
) -> Result<()> {
    let max_floats = (be.device.limits().max_storage_buffer_binding_size as usize).min(MAX_SCRATCH_BYTES) / 4;
    attend(be, s, q, k, v, rows, idx, o, attn_chunk(be), max_floats)
}

/// `cached_attention` with chunks of at most `chunk` key slots and partial
/// buffers of at most `max_floats` f32 (rows are launched in slices to fit).
#[allow(clippy::too_many_arguments)]
fn attend(
    be: &WgpuBackend,
    s: &CachedAttentionSpec,
    q: &T,
    k: &T,
    v: &T,
    rows: &T,
    idx: Option<&T>,
    o: &mut T,
    chunk: usize,
    max_floats: usize,
) -> Result<()> {
    let (nh, d) = (s.n_heads, s.head_dim);
    let dummy = Tensor::empty(be, &[1], DType::U32)?;
    let (mode, n, block, slots_max, idx) = match (s.pattern, idx) {
        (PatternSpec::Blocks { block, n }, Some(i)) => (2, n, block, n * block, i),
        (PatternSpec::Dense, None) => (0, 0, 1, s.slots, &dummy),
        _ => return Err(Error::Invalid("cached_attention: the pattern and its index disagree".into())),
    };
    let chunk = chunk.clamp(1, MAX_CHUNK).min(slots_max.max(1));
    let nch = slots_max.max(1).div_ceil(chunk);
    // Per invocation: the score loop (keys / 64 · (1 + head_dim / 4)) and the
    // p·v loop (keys · head_dim / 64); head_dim <= 256 keeps both far below
    // the budget at MAX_CHUNK keys.
    debug_assert!(chunk.div_ceil(64) * (1 + d.div_ceil(4)) + chunk * d.div_ceil(64) + 64 <= ITER_BUDGET);
    let params = |r0: usize, nr: usize| {
        Params::new()
            .u(s.rows)
            .u(nh)
            .u(s.n_kv_heads)
            .u(d)
            .f(s.scale)
            .u(s.slots)
            .u(mode)
            .u(n)
            .u(block)
            .u(chunk)
            .u(nch)
            .u(r0)
            .u(nr)
    };
    let fwd = |o: &mut T, ml: &mut T, r0: usize, nr: usize| {
        be.launch(
            "cached",
            "cached_attn",
            &mut [Arg::R(q), Arg::R(k), Arg::R(v), Arg::R(rows), Arg::R(idx), Arg::W(o), Arg::W(ml)],
            params(r0, nr),
            wg_grid(nch * nr * nh),
        )
    };
    if nch == 1 {
        let mut ml = Tensor::empty(be, &[1], DType::F32)?;
        return fwd(o, &mut ml, 0, s.rows);
    }
    let per = (max_floats / (nch * nh * (d + 2))).clamp(1, s.rows);
    let mut part = Tensor::empty(be, &[nch * per * nh * d], DType::F32)?;
    let mut ml = Tensor::empty(be, &[nch * per * nh * 2], DType::F32)?;
    for r0 in (0..s.rows).step_by(per) {
        let nr = per.min(s.rows - r0);
        fwd(&mut part, &mut ml, r0, nr)?;
        be.launch(
            "cached",
            "cached_attn_combine",
            &mut [Arg::R(&part), Arg::R(&ml), Arg::R(rows), Arg::W(o)],
            params(r0, nr),
            grid1d(nr * nh * d),
        )?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(super) fn cached_indexer_block_scores(
    be: &WgpuBackend,
    s: &CachedIndexerSpec,
    qi: &T,
    w: &T,
    ki: &T,
    rows: &T,
    _pages: &T,
    pooled: &mut T,
) -> Result<()> {
    // A span of whole blocks (at most 256 of them, the kernel's array).
    let span = s.block * (POOL_SPAN / s.block).max(1);
    let per_thread = span.div_ceil(64) * (1 + s.heads * (1 + s.dim.div_ceil(4)));
    if per_thread > ITER_BUDGET && is_software(&be.info) {
        return Err(Error::Unavailable(format!(
            "cached_indexer_block_scores: block {} with {} index heads of dim {} exceeds the loop budget of a \
             software adapter (use --backend cpu)",
            s.block, s.heads, s.dim
        )));
    }
    let nspan = (s.cols * s.block).div_ceil(span);
    be.launch(
        "cached",
        "cached_pool",
        &mut [Arg::R(qi), Arg::R(w), Arg::R(ki), Arg::R(rows), Arg::W(pooled)],
        Params::new().u(s.rows).u(s.heads).u(s.dim).u(s.block).u(s.cols).u(s.slots).u(span).u(nspan),
        wg_grid(s.rows * nspan),
    )
}

pub(super) fn cached_select(be: &WgpuBackend, s: &CachedSelectSpec, scores: &T, rows: &T, idx: &mut T) -> Result<()> {
    be.launch(
        "cached",
        "cached_select",
        &mut [Arg::R(scores), Arg::R(rows), Arg::W(idx)],
        Params::new().u(s.rows).u(s.cols).u(s.k).u(s.block),
        wg_grid(s.rows),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::{CachedPattern, KvTable, Paging, cached_attention};
    use crate::backend::cpu::CpuBackend;
    use crate::backend::wgpu::AdapterPick;
    use crate::ops::CHECKED;
    use crate::util::rng::Rng;

    fn wgpu() -> Option<WgpuBackend> {
        match WgpuBackend::new(&AdapterPick::from_env().unwrap_or(AdapterPick::Any)) {
            Ok(b) => Some(b),
            Err(e) if std::env::var("DYNSPARSE_REQUIRE_WGPU").is_ok_and(|v| !v.is_empty() && v != "0") => {
                panic!("DYNSPARSE_REQUIRE_WGPU is set but wgpu is unavailable: {e}")
            }
            Err(_) => None,
        }
    }

    /// Flash-decoding: with short chunks (many per row, empty chunks past a
    /// row's end, rows launched in slices) the merged partial softmaxes equal
    /// the CPU reference, dense and block-sparse, every dtype.
    #[test]
    fn split_chunks_merge_to_the_reference() {
        let Some(g) = wgpu() else { return };
        let c = CpuBackend::new();
        let (h, kv, block, n, slots) = (4usize, 2usize, 8usize, 3usize, 160usize);
        // (base, len): a long row, a prefill run, an empty row, a row clamped at the cache's end.
        let mut tab = vec![0u32, 150];
        for len in 20..24 {
            tab.extend([40, len]);
        }
        tab.extend([100, 0, 150, 30]);
        let r = tab.len() / 2;
        // Per row: own block, sink, one more, with NONE and a future block to skip.
        let mut sel = Vec::new();
        for p in tab.chunks(2) {
            let own = p[1].saturating_sub(1) / block as u32;
            sel.extend([0, own / 2, own]);
        }
        sel[3 * 2 + 1] = NONE_ID;
        sel[3 * 3 + 1] = 40;
        // head_dim 40: vec4 columns that do not divide the workgroup.
        for (dt, d) in DType::FLOATS.into_iter().map(|dt| (dt, 16)).chain([(DType::F32, 40)]) {
            let mut rng = Rng::new(7);
            let (q, kc, vc) =
                (rng.normal_vec(r * h * d), rng.normal_vec(slots * kv * d), rng.normal_vec(slots * kv * d));
            let run = |dense: bool, chunk: usize, max_floats: usize| -> (Vec<f32>, Vec<f32>) {
                let want = {
                    let up = |x: &[f32], sh: &[usize]| Tensor::from_f32(&c, x, sh, dt).unwrap();
                    let (qt, kt, vt) = (up(&q, &[r, h, d]), up(&kc, &[slots, kv, d]), up(&vc, &[slots, kv, d]));
                    let rows = Tensor::from_u32(&c, &tab, &[r, 2]).unwrap();
                    // Pages of one row, in order: `base` is a cache row.
                    let ids: Vec<u32> = (0..slots as u32).collect();
                    let pages = Tensor::from_u32(&c, &ids, &[slots]).unwrap();
                    let idx = Tensor::from_u32(&c, &sel, &[r, n]).unwrap();
                    let pat = if dense { CachedPattern::Dense } else { CachedPattern::Blocks { idx: &idx, block } };
                    let mut o = Tensor::zeros(&c, &[r, h, d], dt).unwrap();
                    let kv = KvTable { rows: &rows, pages: &pages, page: 1 };
                    cached_attention(&c, &qt, &kt, &vt, &kv, pat, &mut o).unwrap();
                    o.to_f32_vec(&c).unwrap()
                };
                let got = {
                    let up = |x: &[f32], sh: &[usize]| Tensor::from_f32(&g, x, sh, dt).unwrap();
                    let (qt, kt, vt) = (up(&q, &[r, h, d]), up(&kc, &[slots, kv, d]), up(&vc, &[slots, kv, d]));
                    let rows = Tensor::from_u32(&g, &tab, &[r, 2]).unwrap();
                    let idx = Tensor::from_u32(&g, &sel, &[r, n]).unwrap();
                    let pattern = if dense { PatternSpec::Dense } else { PatternSpec::Blocks { block, n } };
                    let s = CachedAttentionSpec {
                        rows: r,
                        slots,
                        n_heads: h,
                        n_kv_heads: kv,
                        head_dim: d,
                        scale: 1.0 / (d as f32).sqrt(),
                        pattern,
                        paging: Paging { page: 1, table: slots },
                        checked: CHECKED,
                    };
                    let mut o = Tensor::from_f32(&g, &vec![7.0; r * h * d], &[r, h, d], dt).unwrap();
                    let idx = (!dense).then_some(&idx);
                    attend(&g, &s, &qt, &kt, &vt, &rows, idx, &mut o, chunk, max_floats).unwrap();
                    o.to_f32_vec(&g).unwrap()
                };
                (want, got)
            };
            for dense in [true, false] {
                // 10 (dense) or 2 (blocks) chunks; all rows at once, then slices of 3 and 1 rows.
                for (chunk, max_floats) in [(16, 1 << 20), (16, 3 * 10 * h * (d + 2)), (16, 1)] {
                    let (want, got) = run(dense, chunk, max_floats);
                    let err = want.iter().zip(&got).map(|(a, b)| (a - b).powi(2)).sum::<f32>().sqrt()
                        / want.iter().map(|a| a * a).sum::<f32>().sqrt();
                    let tol = if dt == DType::F32 { 1e-5 } else { 1e-2 };
                    assert!(err <= tol, "{dt} d {d} dense {dense} chunk {chunk} scratch {max_floats}: error {err:e}");
                }
            }
        }
    }

    const NONE_ID: u32 = crate::attention::select::NONE;
}
