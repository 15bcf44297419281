//! Inference ops over a KV cache on wgpu (semantics in
//! `crate::attention::cached`, `crate::ops::cache`, `crate::ops::rope::rope_rows`).
//! Kernels in `shaders/cached.wgsl`.
//!
//! Every cache access goes through the page tables (`pages`, see the module
//! doc of `crate::attention::cached`): kernels walk keys by logical position
//! and compute each key's cache row `pages[base + s / page]·page + s % page`,
//! so a result is bit-identical whatever the page layout.
//!
//! - `rope_rows`: one invocation per rotated pair, at the row's position;
//! - `cache_write`: one invocation per 32-bit word of the new rows (f32, or
//!   half rows of an even width, copied as raw words); other half rows go
//!   element by element through the f32 staging of an `inout` cache;
//! - `cached_attention` (flash-decoding): one 64-wide workgroup per (key
//!   chunk, row, head); with more than one chunk the partial softmaxes go to
//!   an F32 scratch and `cached_attn_combine` merges them, so one long row
//!   spreads over `len / chunk × heads` workgroups. The number of chunks is
//!   planned for the longest row the page tables can describe (dense:
//!   `page · P` keys; blocks: `n · block` slots); a workgroup whose chunk lies
//!   past its row's length exits at once. In the block pattern a row reads
//!   only its own selected blocks, page by page. Eight storage buffers
//!   (q, k, v, rows, pages, idx, o, ml): WebGPU's default limit, no more;
//!   The hardware variant ([`KernelVariant::Hardware`], `shaders/cached_hw.wgsl`)
//!   runs 128-invocation workgroups over chunks of at most [`HW_CHUNK`] slots,
//!   teams of 8 invocations per key (coalesced key reads), and reduces through
//!   workgroup memory (`cached_attn_hw`) or subgroup operations
//!   (`cached_attn_hw_sg`, see [`WgpuBackend::subgroups`]); the same partial
//!   layout and `cached_attn_combine`;
//!   With f16 q, k and v and the f16 feature, the hardware kernels stage q in
//!   f16 and multiply q·k in f16 (f32 sums, softmax and p·v);
//! - `cached_indexer_block_scores`: one 64-wide workgroup per (row, span of
//!   whole blocks), max-pooling with workgroup atomics on order-preserving keys;
//!   the hardware variant (`cached_pool_hw`) runs 256-wide workgroups with the
//!   row's index queries staged in workgroup memory and a subgroupMax per
//!   subgroup before the atomic where the device has subgroups;
//! - `cached_select`: `select_topk`'s algorithm, a workgroup per row; the
//!   hardware variant (`cached_select_hw`) counts and prefix-sums by subgroup
//!   operations where the device has them (same blocks, exact).
//! - `rope_rows` and `cache_write` have no hardware variant: one invocation
//!   per pair or word in 256-wide workgroups, no reduction and no reuse, so
//!   a GPU layout would only change the workgroup size, which 256 already suits.

use super::kernel::{KernelParams, ParamBlock, grid1d};
use super::{Arg, KernelVariant, WgpuBackend, is_software};
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
/// long decode row on many workgroups. Also the most `cached_attn_hw` takes
/// (`HCH` of shaders/cached_hw.wgsl).
const HW_CHUNK: usize = 256;
/// Largest scratch buffer of partial results; longer launches go in slices of rows.
const MAX_SCRATCH_BYTES: usize = 256 << 20;
/// Pooled-indexer keys per workgroup (rounded to whole blocks).
const POOL_SPAN: usize = 256;
/// Index heads and vec4 of index queries `cached_pool_hw` stages per row
/// (its workgroup arrays `pw`, `pq`).
const POOL_HW_HEADS: usize = 64;
const POOL_HW_QVEC4: usize = 256;

crate::wgsl_params! {
    /// `rope_rows`: pairs = numel / 2, half = head_dim / 2, heads, table positions.
    pub struct RopeRowsParams { pairs: u32, half: u32, heads: u32, positions: u32 }
}

crate::wgsl_params! {
    /// `cache_write` / `cache_write_words`: rows R of `width` elements (or
    /// words), cache slots, rows per page, np = entries of the page tables.
    pub struct CacheWriteParams { rows: u32, width: u32, slots: u32, page: u32, np: u32 }
}

crate::wgsl_params! {
    /// `cached_attn` / `cached_attn_combine`: the spec (mode 0 dense, 2
    /// blocks), the chunking (chunk, nch), the launch's rows r0 .. r0 + nrow
    /// and the paging.
    pub struct CachedAttnParams {
        rows: u32,
        n_heads: u32,
        n_kv_heads: u32,
        head_dim: u32,
        scale: f32,
        slots: u32,
        mode: u32,
        n: u32,
        block: u32,
        chunk: u32,
        nch: u32,
        r0: u32,
        nrow: u32,
        page: u32,
        np: u32,
    }
}

crate::wgsl_params! {
    /// `cached_pool`: rows, index heads and dim, block, cols, cache slots,
    /// keys per span, nspan spans per row, the paging.
    pub struct CachedPoolParams {
        rows: u32,
        heads: u32,
        dim: u32,
        block: u32,
        cols: u32,
        slots: u32,
        span: u32,
        nspan: u32,
        page: u32,
        np: u32,
    }
}

crate::wgsl_params! {
    /// `cached_select`: rows, cols (key blocks), k kept, block.
    pub struct CachedSelectParams { rows: u32, cols: u32, k: u32, block: u32 }
}

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
        &RopeRowsParams { pairs: pairs as u32, half: half as u32, heads: s.heads as u32, positions: max_pos as u32 },
        grid1d(pairs),
    )
}

pub(super) fn cache_write(
    be: &WgpuBackend,
    s: &CacheWriteSpec,
    src: &T,
    rows: &T,
    pages: &T,
    cache: &mut T,
) -> Result<()> {
    let bytes = s.width * src.dtype().size();
    let (page, table) = (s.paging.page, s.paging.table);
    if bytes.is_multiple_of(4) {
        // Whole 32-bit words per row: copy them without conversion.
        let words = bytes / 4;
        let k = be.kernel("cached", "cache_write_words")?;
        let p = be.pipeline(&k, &[DType::U32; 4], (CacheWriteParams::NAME, CacheWriteParams::FIELDS))?;
        let params = ParamBlock::from(&CacheWriteParams {
            rows: s.rows as u32,
            width: words as u32,
            slots: s.slots as u32,
            page: page as u32,
            np: table as u32,
        });
        let bufs = [src.buffer().bind(), rows.buffer().bind(), pages.buffer().bind(), cache.buffer().bind()];
        return be.dispatch(&p, &params, &bufs, grid1d(s.rows * words));
    }
    be.launch(
        "cached",
        "cache_write",
        &mut [Arg::R(src), Arg::R(rows), Arg::R(pages), Arg::W(cache)],
        &CacheWriteParams {
            rows: s.rows as u32,
            width: s.width as u32,
            slots: s.slots as u32,
            page: page as u32,
            np: table as u32,
        },
        grid1d(s.rows * s.width),
    )
}

/// Key slots per `cached_attn` chunk on this adapter: long ones on a software
/// adapter (few cores, where every workgroup costs), short ones elsewhere.
fn attn_chunk(be: &WgpuBackend) -> usize {
    if is_software(&be.info) && be.kernel_variant() == KernelVariant::Software { MAX_CHUNK } else { HW_CHUNK }
}

/// The `cached_attn` kernel of `be`'s variant (family, name) and its largest chunk.
fn attn_kernel(be: &WgpuBackend) -> (&'static str, &'static str, usize) {
    match (be.kernel_variant(), be.subgroups()) {
        (KernelVariant::Software, _) => ("cached", "cached_attn", MAX_CHUNK),
        (KernelVariant::Hardware, false) => ("cached_hw", "cached_attn_hw", HW_CHUNK),
        (KernelVariant::Hardware, true) => ("cached_hw", "cached_attn_hw_sg", HW_CHUNK),
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn cached_attention(
    be: &WgpuBackend,
    s: &CachedAttentionSpec,
    q: &T,
    k: &T,
    v: &T,
    rows: &T,
    pages: &T,
    idx: Option<&T>,
    o: &mut T,
) -> Result<()> {
    let max_floats = (be.device.limits().max_storage_buffer_binding_size as usize).min(MAX_SCRATCH_BYTES) / 4;
    attend(be, s, q, k, v, rows, pages, idx, o, attn_chunk(be), max_floats)
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
    pages: &T,
    idx: Option<&T>,
    o: &mut T,
    chunk: usize,
    max_floats: usize,
) -> Result<()> {
    let (nh, d) = (s.n_heads, s.head_dim);
    let dummy = Tensor::empty(be, &[1], DType::U32)?;
    let (mode, n, block, slots_max, idx) = match (s.pattern, idx) {
        (PatternSpec::Blocks { block, n }, Some(i)) => (2, n, block, n * block, i),
        // A row's clamped length is at most page · P (more than `slots` only
        // when a table repeats pages).
        (PatternSpec::Dense, None) => (0, 0, 1, s.paging.page * s.paging.table, &dummy),
        _ => return Err(Error::Invalid("cached_attention: the pattern and its index disagree".into())),
    };
    if slots_max > u32::MAX as usize {
        return Err(Error::Shape(format!(
            "cached_attention: page tables of {} entries of {} rows describe more keys than 32-bit indexing holds",
            s.paging.table, s.paging.page
        )));
    }
    let (family, kernel, most) = attn_kernel(be);
    let chunk = chunk.clamp(1, most).min(slots_max.max(1));
    let nch = slots_max.max(1).div_ceil(chunk);
    // Per invocation: the score loop (keys / 64 · (1 + head_dim / 4)) and the
    // p·v loop (keys · head_dim / 64); head_dim <= 256 keeps both far below
    // the budget at MAX_CHUNK keys.
    debug_assert!(chunk.div_ceil(64) * (1 + d.div_ceil(4)) + chunk * d.div_ceil(64) + 64 <= ITER_BUDGET);
    let params = |r0: usize, nr: usize| CachedAttnParams {
        rows: s.rows as u32,
        n_heads: nh as u32,
        n_kv_heads: s.n_kv_heads as u32,
        head_dim: d as u32,
        scale: s.scale,
        slots: s.slots as u32,
        mode,
        n: n as u32,
        block: block as u32,
        chunk: chunk as u32,
        nch: nch as u32,
        r0: r0 as u32,
        nrow: nr as u32,
        page: s.paging.page as u32,
        np: s.paging.table as u32,
    };
    let fwd = |o: &mut T, ml: &mut T, r0: usize, nr: usize| {
        be.launch(
            family,
            kernel,
            &mut [Arg::R(q), Arg::R(k), Arg::R(v), Arg::R(rows), Arg::R(pages), Arg::R(idx), Arg::W(o), Arg::W(ml)],
            &params(r0, nr),
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
            &params(r0, nr),
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
    pages: &T,
    pooled: &mut T,
) -> Result<()> {
    // A span of whole blocks (at most 256 of them, the kernel's array).
    let span = s.block * (POOL_SPAN / s.block).max(1);
    // The hardware variant stages the row's index queries in workgroup memory
    // (at most POOL_HW_QVEC4 vec4 and POOL_HW_HEADS weights), else the software one.
    let hw = be.kernel_variant() == KernelVariant::Hardware
        && s.heads <= POOL_HW_HEADS
        && s.heads * s.dim.div_ceil(4) <= POOL_HW_QVEC4;
    let (name, width) = if hw { ("cached_pool_hw", 256) } else { ("cached_pool", 64) };
    let per_thread = span.div_ceil(width) * (1 + s.heads * (1 + s.dim.div_ceil(4)));
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
        name,
        &mut [Arg::R(qi), Arg::R(w), Arg::R(ki), Arg::R(rows), Arg::R(pages), Arg::W(pooled)],
        &CachedPoolParams {
            rows: s.rows as u32,
            heads: s.heads as u32,
            dim: s.dim as u32,
            block: s.block as u32,
            cols: s.cols as u32,
            slots: s.slots as u32,
            span: span as u32,
            nspan: nspan as u32,
            page: s.paging.page as u32,
            np: s.paging.table as u32,
        },
        wg_grid(s.rows * nspan),
    )
}

pub(super) fn cached_select(be: &WgpuBackend, s: &CachedSelectSpec, scores: &T, rows: &T, idx: &mut T) -> Result<()> {
    let name = match be.kernel_variant() {
        KernelVariant::Hardware => "cached_select_hw",
        KernelVariant::Software => "cached_select",
    };
    be.launch(
        "cached",
        name,
        &mut [Arg::R(scores), Arg::R(rows), Arg::W(idx)],
        &CachedSelectParams { rows: s.rows as u32, cols: s.cols as u32, k: s.k as u32, block: s.block as u32 },
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
    /// the CPU reference, dense and block-sparse, every dtype; and with the
    /// sequences' keys scattered over pages of 5 rows in shuffled order
    /// (chunks of 16 and blocks of 8 keys straddle pages) the result is
    /// bit-identical to the one of the contiguous layout.
    #[test]
    fn split_chunks_merge_to_the_reference() {
        let Some(g) = wgpu() else { return };
        let c = CpuBackend::new();
        let (h, kv, block, n, slots) = (4usize, 2usize, 8usize, 3usize, 160usize);
        // (base, len), base a cache row of the contiguous layout (page 1,
        // identity table): a long row, a prefill run, an empty row, a row
        // clamped at the cache's end (150 + 30 > 160).
        let mut tab = vec![0u32, 150];
        for len in 20..24 {
            tab.extend([40, len]);
        }
        tab.extend([100, 0, 150, 30]);
        let r = tab.len() / 2;
        // The scattered layout: page e of the contiguous cache (rows 5e ..
        // 5e + 5) moves to physical page perm[e]; a row's table starts at
        // entry base / 5 (every base is a multiple of 5), so it clamps the
        // last row to 5 · (32 - 30) = 10 keys, as the identity table does.
        let page = 5usize;
        let np = slots / page;
        let mut perm: Vec<u32> = (0..np as u32).collect();
        let mut prng = Rng::new(11);
        for i in (1..np).rev() {
            perm.swap(i, prng.below(i as u64 + 1) as usize);
        }
        assert!(perm.iter().enumerate().filter(|&(e, &p)| p as usize != e).count() > np / 2);
        let scattered_tab: Vec<u32> = tab.chunks(2).flat_map(|p| [p[0] / page as u32, p[1]]).collect();
        let scatter = |x: &[f32]| {
            let w = x.len() / slots;
            let mut out = vec![f32::NAN; x.len()];
            for (e, &p) in perm.iter().enumerate() {
                let (src, dst) = (e * page * w, p as usize * page * w);
                out[dst..dst + page * w].copy_from_slice(&x[src..src + page * w]);
            }
            out
        };
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
            let want = |dense: bool| -> Vec<f32> {
                let up = |x: &[f32], sh: &[usize]| Tensor::from_f32(&c, x, sh, dt).unwrap();
                let (qt, kt, vt) = (up(&q, &[r, h, d]), up(&kc, &[slots, kv, d]), up(&vc, &[slots, kv, d]));
                let rows = Tensor::from_u32(&c, &tab, &[r, 2]).unwrap();
                let ids: Vec<u32> = (0..slots as u32).collect();
                let pages = Tensor::from_u32(&c, &ids, &[slots]).unwrap();
                let idx = Tensor::from_u32(&c, &sel, &[r, n]).unwrap();
                let pat = if dense { CachedPattern::Dense } else { CachedPattern::Blocks { idx: &idx, block } };
                let mut o = Tensor::zeros(&c, &[r, h, d], dt).unwrap();
                let kv = KvTable { rows: &rows, pages: &pages, page: 1 };
                cached_attention(&c, &qt, &kt, &vt, &kv, pat, &mut o).unwrap();
                o.to_f32_vec(&c).unwrap()
            };
            let got = |dense: bool, scattered: bool, chunk: usize, max_floats: usize| -> Vec<f32> {
                let up = |x: &[f32], sh: &[usize]| Tensor::from_f32(&g, x, sh, dt).unwrap();
                let (kc, vc, tab, ids, page) = if scattered {
                    (scatter(&kc), scatter(&vc), &scattered_tab, perm.clone(), page)
                } else {
                    (kc.clone(), vc.clone(), &tab, (0..slots as u32).collect(), 1)
                };
                let (qt, kt, vt) = (up(&q, &[r, h, d]), up(&kc, &[slots, kv, d]), up(&vc, &[slots, kv, d]));
                let rows = Tensor::from_u32(&g, tab, &[r, 2]).unwrap();
                let pages = Tensor::from_u32(&g, &ids, &[ids.len()]).unwrap();
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
                    paging: Paging { page, table: ids.len() },
                    checked: CHECKED,
                };
                let mut o = Tensor::from_f32(&g, &vec![7.0; r * h * d], &[r, h, d], dt).unwrap();
                let idx = (!dense).then_some(&idx);
                attend(&g, &s, &qt, &kt, &vt, &rows, &pages, idx, &mut o, chunk, max_floats).unwrap();
                o.to_f32_vec(&g).unwrap()
            };
            for dense in [true, false] {
                let want = want(dense);
                // 10 (dense) or 2 (blocks) chunks; all rows at once, then slices of 3 and 1 rows.
                for (chunk, max_floats) in [(16, 1 << 20), (16, 3 * 10 * h * (d + 2)), (16, 1)] {
                    let contiguous = got(dense, false, chunk, max_floats);
                    let err = want.iter().zip(&contiguous).map(|(a, b)| (a - b).powi(2)).sum::<f32>().sqrt()
                        / want.iter().map(|a| a * a).sum::<f32>().sqrt();
                    let tol = if dt == DType::F32 { 1e-5 } else { 1e-2 };
                    let what = format!("{dt} d {d} dense {dense} chunk {chunk} scratch {max_floats}");
                    assert!(err <= tol, "{what}: error {err:e}");
                    let scattered = got(dense, true, chunk, max_floats);
                    let same = contiguous.iter().zip(&scattered).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{what}: pages of {page} rows in shuffled order change the contiguous result");
                }
            }
        }
    }

    /// `cache_write` through a shuffled page table (pages of 2 rows) equals
    /// the CPU reference bit for bit, for the word copy (f32, even half rows)
    /// and the element path (odd half rows), with the clamps: an empty row, a
    /// page id past the pool, a `len` past what the row's table holds and a
    /// `base` past the table.
    #[test]
    fn cache_write_goes_through_the_page_table() {
        let Some(g) = wgpu() else { return };
        let c = CpuBackend::new();
        let (slots, page) = (12usize, 2usize);
        // P = 5 entries; page id 9 is past the 6 physical pages (clamped to 5).
        let pages = [4u32, 1, 9, 0, 2];
        // (base, len): positions 2 (entry 1), 0 (entry 2), len 0, len 9 from
        // base 3 (clamped to 2·2 = 4: position 3, entry 4), base 7 >= P (skipped).
        let tab = [0u32, 3, 2, 1, 1, 0, 3, 9, 7, 1];
        let r = tab.len() / 2;
        for dt in DType::FLOATS {
            for width in [3usize, 4] {
                let mut rng = Rng::new(5);
                let (src, cache) = (rng.normal_vec(r * width), rng.normal_vec(slots * width));
                let want = {
                    let srct = Tensor::from_f32(&c, &src, &[r, width], dt).unwrap();
                    let mut ct = Tensor::from_f32(&c, &cache, &[slots, width], dt).unwrap();
                    let rows = Tensor::from_u32(&c, &tab, &[r, 2]).unwrap();
                    let pt = Tensor::from_u32(&c, &pages, &[pages.len()]).unwrap();
                    let kv = KvTable { rows: &rows, pages: &pt, page };
                    crate::ops::cache_write(&c, &srct, &kv, &mut ct).unwrap();
                    ct.to_f32_vec(&c).unwrap()
                };
                let got = {
                    let srct = Tensor::from_f32(&g, &src, &[r, width], dt).unwrap();
                    let mut ct = Tensor::from_f32(&g, &cache, &[slots, width], dt).unwrap();
                    let rows = Tensor::from_u32(&g, &tab, &[r, 2]).unwrap();
                    let pt = Tensor::from_u32(&g, &pages, &[pages.len()]).unwrap();
                    let kv = KvTable { rows: &rows, pages: &pt, page };
                    crate::ops::cache_write(&g, &srct, &kv, &mut ct).unwrap();
                    ct.to_f32_vec(&g).unwrap()
                };
                let before = Tensor::from_f32(&c, &cache, &[slots, width], dt).unwrap().to_f32_vec(&c).unwrap();
                let changed: Vec<usize> = (0..slots).filter(|&i| want[i * width] != before[i * width]).collect();
                // Rows 0, 1 and 3 land on cache rows 1·2 + 0, 9→5·2 + 0 and 2·2 + 1.
                assert_eq!(changed, vec![2, 5, 10], "{dt} width {width}: the reference's targets");
                let same = want.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{dt} width {width}: wgpu {got:?} vs reference {want:?}");
            }
        }
    }

    const NONE_ID: u32 = crate::attention::select::NONE;
}
