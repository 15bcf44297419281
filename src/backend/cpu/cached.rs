//! Inference ops over a KV cache on the host (semantics in
//! `crate::attention::cached` and `crate::ops::cache`).
//!
//! Query rows are grouped into *runs* (consecutive rows of one sequence at
//! consecutive positions, as a prefill chunk issues them; a decode row is a
//! run of one). Per (run, head), the run visits key tiles (dense) or the
//! union of its rows' own key blocks (sparse), and per tile gathers the rows
//! that see it into one product, as the full-window kernels do. Products go
//! through `gemm_rows` (one summation order per element whatever the number
//! of rows), so a row's result does not depend on the other rows of the
//! step: a sequence's tokens are the same alone or in any batch.

use rayon::prelude::*;

use super::attention::{gemm_rows, online_update};
use super::{CpuBackend, CpuBuffer, Elems, SliceMut, SliceRef, convert, rd, simd};
use crate::Tensor;
use crate::attention::cached::{CachedAttentionSpec, CachedIndexerSpec, CachedSelectSpec, Paging};
use crate::attention::ops::PatternSpec;
use crate::attention::select::{NONE, select_row};
use crate::ops::{CacheWriteSpec, RopeSpec};

type T = Tensor<CpuBackend>;

/// Rows per run at most.
const RUN: usize = 64;
/// Key tile of the dense pattern: the full-window forward's tile, so a
/// cached query runs the same online-softmax steps as in that pass.
const KTILE: usize = 64;

/// `(base, len)` per row, `len` clamped to what the page table can hold
/// from `base` (`page · (P − base)`).
fn row_table(rows: &T, pg: Paging) -> Vec<(usize, usize)> {
    rows.buf
        .u32s()
        .chunks(2)
        .map(|p| {
            let base = p[0] as usize;
            (base, (p[1] as usize).min(pg.table.saturating_sub(base) * pg.page))
        })
        .collect()
}

/// Runs of rows `[r0, r1)`: one sequence, lengths growing by one.
fn runs(tab: &[(usize, usize)]) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for (r, &(base, len)) in tab.iter().enumerate() {
        match out.last_mut() {
            Some((r0, r1))
                if *r1 == r && r - *r0 < RUN && tab[r - 1].0 == base && tab[r - 1].1 + 1 == len && len > 0 =>
            {
                *r1 = r + 1
            }
            _ => out.push((r, r + 1)),
        }
    }
    out
}

/// Cache rows `[row0, row0 + n)` as f32 (borrowed for f32 caches; only the
/// asked rows are converted for half-precision ones).
fn cache_rows(buf: &CpuBuffer, row0: usize, n: usize, width: usize) -> Elems<'_, f32> {
    let r = row0 * width..(row0 + n) * width;
    buf.f32_range(r.start, r.len())
}

/// Keys `[k0, k0 + n)` of a sequence whose page table starts at `base`, as
/// f32 rows of `width`: borrowed when they lie in one page of an f32 cache,
/// else gathered page segment by page segment. The values, and so every
/// product over them, do not depend on where the pages lie.
#[allow(clippy::too_many_arguments)]
fn seq_rows<'a>(
    buf: &'a CpuBuffer,
    pg: Paging,
    pages: &[u32],
    base: usize,
    k0: usize,
    n: usize,
    width: usize,
    slots: usize,
) -> Elems<'a, f32> {
    if n == 0 {
        return Elems::Owned(Vec::new());
    }
    let first = pg.key_row(pages, base, k0, slots);
    if k0 / pg.page == (k0 + n - 1) / pg.page {
        return cache_rows(buf, first, n, width);
    }
    let mut out = Vec::with_capacity(n * width);
    let mut s = k0;
    while s < k0 + n {
        let seg = (pg.page - s % pg.page).min(k0 + n - s);
        out.extend_from_slice(&cache_rows(buf, pg.key_row(pages, base, s, slots), seg, width));
        s += seg;
    }
    Elems::Owned(out)
}

/// Columns `[col0, col0 + d)` (one KV head) of the `n` cache rows from
/// `row0` (keys of one page), as f32 rows and their stride: borrowed in
/// place (stride `width`) from an f32 cache, else converted head row by head
/// row (stride `d`) — never the other heads' columns. The values do not
/// depend on where the page lies.
fn head_rows(
    buf: &CpuBuffer,
    row0: usize,
    n: usize,
    width: usize,
    (col0, d): (usize, usize),
) -> (Elems<'_, f32>, usize) {
    if n == 0 {
        return (Elems::Owned(Vec::new()), d);
    }
    let r = row0 * width + col0..(row0 + n - 1) * width + col0 + d;
    if matches!(buf.lock().slice(), SliceRef::F32(_)) {
        return (buf.f32_range(r.start, r.len()), width);
    }
    let g = buf.lock();
    match g.slice() {
        SliceRef::F16(v) => {
            let mut out = vec![0.0; n * d];
            v[r].chunks(width).zip(out.chunks_mut(d)).for_each(|(s, o)| convert::widen_f16(&s[..d], o));
            (Elems::Owned(out), d)
        }
        SliceRef::BF16(v) => {
            let mut out = vec![0.0; n * d];
            v[r].chunks(width).zip(out.chunks_mut(d)).for_each(|(s, o)| convert::widen_bf16(&s[..d], o));
            (Elems::Owned(out), d)
        }
        _ => unreachable!("op validation guarantees a float cache"),
    }
}

/// The page segments of keys `[k0, k0 + n)` of a sequence whose page table
/// starts at `base`: (offset from `k0`, first cache row, keys), in key order.
fn page_segments(
    pg: Paging,
    pages: &[u32],
    base: usize,
    (k0, n): (usize, usize),
    slots: usize,
) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
    let mut s = k0;
    std::iter::from_fn(move || {
        (s < k0 + n).then(|| {
            let seg = (pg.page - s % pg.page).min(k0 + n - s);
            let item = (s - k0, pg.key_row(pages, base, s, slots), seg);
            s += seg;
            item
        })
    })
}

pub(super) fn rope_rows(s: &RopeSpec, x: &T, cos: &T, sin: &T, rows: &T, y: &mut T) {
    let (x, cos, sin) = (rd(x), rd(cos), rd(sin));
    let (hd, half) = (s.head_dim, s.head_dim / 2);
    let max_pos = cos.len() / half;
    let tab_g = rows.buf.u32s();
    let tab = &*tab_g;
    y.buf.produce(|o| {
        o.par_chunks_mut(hd).enumerate().for_each(|(vi, o)| {
            let r = vi / s.heads;
            let pos = (tab[2 * r + 1] as usize).saturating_sub(1).min(max_pos - 1);
            let xv = &x[vi * hd..(vi + 1) * hd];
            for i in 0..half {
                let (c, sn) = (cos[pos * half + i], sin[pos * half + i]);
                let (a, b) = (xv[i], xv[i + half]);
                o[i] = a * c - b * sn;
                o[i + half] = a * sn + b * c;
            }
        })
    });
}

pub(super) fn cache_write(s: &CacheWriteSpec, src: &T, rows: &T, pages: &T, cache: &mut T) {
    let tab = row_table(rows, s.paging);
    let pages = pages.buf.u32s().to_vec();
    let w = s.width;
    macro_rules! copy_rows {
        ($src:expr, $dst:expr) => {
            for (r, &(base, len)) in tab.iter().enumerate() {
                if len == 0 {
                    continue;
                }
                let dst_row = s.paging.key_row(&pages, base, len - 1, s.slots);
                $dst[dst_row * w..(dst_row + 1) * w].copy_from_slice(&$src[r * w..(r + 1) * w]);
            }
        };
    }
    let (gs, mut gc) = (src.buf.lock(), cache.buf.lock_mut());
    match (gs.slice(), gc.slice()) {
        (SliceRef::F32(a), SliceMut::F32(b)) => copy_rows!(a, b),
        (SliceRef::F16(a), SliceMut::F16(b)) => copy_rows!(a, b),
        (SliceRef::BF16(a), SliceMut::BF16(b)) => copy_rows!(a, b),
        _ => unreachable!("op validation guarantees matching float dtypes"),
    }
}

/// Per key range `[k0, k1)` the run visits, the run-relative rows that see it.
fn units(
    s: &CachedAttentionSpec,
    tab: &[(usize, usize)],
    idx: Option<&[u32]>,
    (r0, r1): (usize, usize),
) -> Vec<(usize, usize, Vec<usize>)> {
    let last_len = tab[r1 - 1].1;
    match s.pattern {
        PatternSpec::Blocks { block, n } => {
            let idx = idx.expect("block pattern has an index");
            let nkb = last_len.div_ceil(block);
            let mut per: Vec<Vec<usize>> = vec![Vec::new(); nkb];
            for r in r0..r1 {
                let len = tab[r].1;
                if len == 0 {
                    continue;
                }
                for &kb in &idx[r * n..(r + 1) * n] {
                    if kb != NONE && (kb as usize) <= (len - 1) / block {
                        per[kb as usize].push(r - r0);
                    }
                }
            }
            per.into_iter()
                .enumerate()
                .filter(|(_, rs)| !rs.is_empty())
                .map(|(kb, rs)| (kb * block, ((kb + 1) * block).min(last_len), rs))
                .collect()
        }
        _ => (0..last_len)
            .step_by(KTILE)
            .map(|k0| (k0, (k0 + KTILE).min(last_len), (r0..r1).filter(|&r| tab[r].1 > k0).map(|r| r - r0).collect()))
            .collect(),
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn cached_attention(
    s: &CachedAttentionSpec,
    q: &T,
    k: &T,
    v: &T,
    rows: &T,
    pages: &T,
    idx: Option<&T>,
    o: &mut T,
) {
    let q = rd(q);
    let tab = row_table(rows, s.paging);
    let pages_g = pages.buf.u32s();
    let pages = &*pages_g;
    let idx_g = idx.map(|i| i.buf.u32s());
    let idx = idx_g.as_deref();
    let (d, h_n, kw) = (s.head_dim, s.n_heads, s.n_kv_heads * s.head_dim);
    let simd = simd::simd();
    let tasks: Vec<((usize, usize), usize)> =
        runs(&tab).into_iter().flat_map(|run| (0..h_n).map(move |h| (run, h))).collect();
    let outs: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|&((r0, r1), h)| {
            let g = h / s.group();
            let (base, nr_all) = (tab[r0].0, r1 - r0);
            let mut acc = vec![0.0f32; nr_all * d];
            let (mut m, mut l) = (vec![f32::NEG_INFINITY; nr_all], vec![0.0f32; nr_all]);
            let (mut qb, mut sb, mut pv) = (Vec::new(), Vec::new(), Vec::new());
            for (k0, k1, rs) in units(s, &tab, idx, (r0, r1)) {
                let (nr, cols) = (rs.len(), k1 - k0);
                qb.clear();
                for &r in &rs {
                    qb.extend_from_slice(&q[((r0 + r) * h_n + h) * d..((r0 + r) * h_n + h + 1) * d]);
                }
                // S = scale·Q·Kᵀ page by page, read in place: each score is
                // its own dot product, so the split does not change it.
                sb.resize(nr * cols, 0.0);
                for (off, row0, seg) in page_segments(s.paging, pages, base, (k0, cols), s.slots) {
                    let (kr, ks) = head_rows(&k.buf, row0, seg, kw, (g * d, d));
                    gemm_rows(nr, d, seg, s.scale, &qb, (d, 1), &kr, (1, ks), 0.0, &mut sb[off..], (cols, 1));
                }
                let mut corr = vec![1.0f32; nr];
                for (i, &r) in rs.iter().enumerate() {
                    let vis = tab[r0 + r].1.saturating_sub(k0).min(cols);
                    corr[i] =
                        online_update(&mut sb[i * cols..(i + 1) * cols], vis, &mut m[r], &mut l[r]).unwrap_or(1.0);
                }
                // P·V page by page, each page's call resuming the sums of the
                // previous one: the bits of one product over the whole tile.
                pv.resize(nr * d, 0.0);
                for (off, row0, seg) in page_segments(s.paging, pages, base, (k0, cols), s.slots) {
                    let (vr, vs) = head_rows(&v.buf, row0, seg, kw, (g * d, d));
                    simd::rows_times_b_into(simd, nr, d, seg, &sb[off..], cols, &vr, vs, &mut pv, d, off > 0);
                }
                for (i, &r) in rs.iter().enumerate() {
                    let a = &mut acc[r * d..(r + 1) * d];
                    a.iter_mut().zip(&pv[i * d..(i + 1) * d]).for_each(|(a, &x)| *a = *a * corr[i] + x);
                }
            }
            for r in 0..nr_all {
                let a = &mut acc[r * d..(r + 1) * d];
                if l[r] > 0.0 {
                    a.iter_mut().for_each(|x| *x /= l[r]);
                }
            }
            acc
        })
        .collect();
    o.buf.produce(|out| {
        for (&((r0, r1), h), acc) in tasks.iter().zip(&outs) {
            for r in r0..r1 {
                out[(r * h_n + h) * d..(r * h_n + h + 1) * d].copy_from_slice(&acc[(r - r0) * d..(r - r0 + 1) * d]);
            }
        }
    });
}

/// Key columns per indexer chunk.
const ICHUNK: usize = 512;

#[allow(clippy::too_many_arguments)]
pub(super) fn cached_indexer_block_scores(
    s: &CachedIndexerSpec,
    qi: &T,
    w: &T,
    ki: &T,
    rows: &T,
    pages: &T,
    pooled: &mut T,
) {
    let (qi, w) = (rd(qi), rd(w));
    let tab = row_table(rows, s.paging);
    let pages_g = pages.buf.u32s();
    let pages = &*pages_g;
    let (hi, di, bs) = (s.heads, s.dim, s.block);
    pooled.buf.produce(|out| {
        out.par_chunks_mut(s.cols).enumerate().for_each(|(r, dst)| {
            dst.fill(f32::NEG_INFINITY);
            let (base, len) = tab[r];
            let len = len.min(s.cols * bs);
            let (q, wr) = (&qi[r * hi * di..(r + 1) * hi * di], &w[r * hi..(r + 1) * hi]);
            let mut lbuf = vec![0.0f32; hi * ICHUNK];
            for k0 in (0..len).step_by(ICHUNK) {
                let width = ICHUNK.min(len - k0);
                let kr = seq_rows(&ki.buf, s.paging, pages, base, k0, width, di, s.slots);
                // L[j, s] = q_i[j]·k_i[s]; I(s) = Σ_j w[j]·ReLU(L[j, s]).
                let lb = &mut lbuf[..hi * width];
                gemm_rows(hi, di, width, 1.0, q, (di, 1), &kr, (1, di), 0.0, lb, (width, 1));
                for c in 0..width {
                    let mut x = 0.0f32;
                    for (j, &wj) in wr.iter().enumerate() {
                        x += wj * lb[j * width + c].max(0.0);
                    }
                    let p = &mut dst[(k0 + c) / bs];
                    if x > *p {
                        *p = x;
                    }
                }
            }
        })
    });
}

pub(super) fn cached_select(s: &CachedSelectSpec, scores: &T, rows: &T, idx: &mut T) {
    let sc = rd(scores);
    let tab_g = rows.buf.u32s();
    let tab = &*tab_g;
    let out: Vec<u32> = (0..s.rows)
        .into_par_iter()
        .flat_map_iter(|r| {
            let last = ((tab[2 * r + 1] as usize).saturating_sub(1) / s.block).min(s.cols - 1);
            select_row(&sc[r * s.cols..(r + 1) * s.cols], last, s.k, true)
        })
        .collect();
    idx.buf.store_u32(&out);
}
