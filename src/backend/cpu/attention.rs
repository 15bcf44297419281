//! Attention on the host: flash-style dense and sparse attention (online
//! softmax over key tiles, no n×n matrix), the indexer, and top-k selection.
//! Semantics in `crate::attention::ops`.
//!
//! The dense pattern runs tile by tile with `matrixmultiply` GEMMs (query
//! tile × key tile). The block pattern selects per query; a chunk of
//! [`QCHUNK`] queries visits the union of its queries' key blocks and, per
//! key block, gathers the rows of exactly the queries that chose it into one
//! GEMM — no wasted (query, key) pair, and each query's arithmetic (its
//! blocks in ascending order, the same dot products) does not depend on
//! which other queries share a block, so outputs are causal bit for bit.
//! The token pattern gathers its keys per query.

use rayon::prelude::*;

use super::matmul::Strided;
use super::{CpuBackend, SliceRef, f32_rows, rd, simd, vmath};
use crate::Tensor;
use crate::attention::ops::{AttentionSpec, IndexerLossSpec, IndexerSpec, PatternSpec, SelectSpec};
use crate::attention::select::{NONE, select_row};

type T = Tensor<CpuBackend>;

/// Query tile of the dense pattern (and of the indexer kernels).
const TILE: usize = 64;

/// Key tile of the dense pattern: 64 × 128 f32 scores (32 KiB) per task,
/// half the online-softmax rescales and GEMM calls of a 64-key tile
/// (measured in BENCHMARKS.md, issue 15; 256 keys was slower at 4×512).
const KTILE: usize = 128;

/// `C (m×n) = α·A (m×k)·B (k×n) + β·C`, each operand given by a slice and its
/// row and column strides.
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: &[f32],
    (rsa, csa): (usize, usize),
    b: &[f32],
    (rsb, csb): (usize, usize),
    beta: f32,
    c: &mut [f32],
    (rsc, csc): (usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    if m <= SKINNY_ROWS && skinny_gemm(m, k, n, alpha, a, (rsa, csa), b, (rsb, csb), beta, c, (rsc, csc)) {
        return;
    }
    let (a, b) = (Strided { x: a, rs: rsa, cs: csa }, Strided { x: b, rs: rsb, cs: csb });
    super::matmul::sgemm(m, n, k, alpha, a, b, beta, c, (rsc, csc));
}

/// [`gemm`] in which every element of C is the same function of its row of
/// A and column of B whatever `m` is (no switch to a packed kernel for many
/// rows): the cached (inference) kernels use it so that a query row's result
/// does not depend on the rows it is batched with.
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm_rows(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: &[f32],
    sa: (usize, usize),
    b: &[f32],
    sb: (usize, usize),
    beta: f32,
    c: &mut [f32],
    sc: (usize, usize),
) {
    let v = super::simd::simd();
    // The SIMD kernels take A's and C's rows contiguous (the cached kernels'
    // layouts); the variant is fixed per process and the layout per call
    // site, so a row's operation sequence still does not depend on `m`.
    if v != super::simd::Simd::Portable && sa.1 == 1 && sc.1 == 1 && (sb.0 == 1 || sb.1 == 1) && m > 0 && n > 0 {
        let raw = |out: &mut [f32], rso: usize| {
            if sb.0 == 1 {
                super::simd::rows_dot_bt(v, m, n, k, a, sa.0, b, sb.1, out, rso);
            } else {
                super::simd::rows_times_b(v, m, n, k, a, sa.0, b, sb.0, out, rso);
            }
        };
        if beta == 0.0 {
            raw(c, sc.0);
            for i in 0..m {
                c[i * sc.0..i * sc.0 + n].iter_mut().for_each(|x| *x *= alpha);
            }
        } else {
            let mut t = vec![0.0f32; m * n];
            raw(&mut t, n);
            for i in 0..m {
                let row = &mut c[i * sc.0..i * sc.0 + n];
                row.iter_mut().zip(&t[i * n..(i + 1) * n]).for_each(|(c, &x)| *c = alpha * x + beta * *c);
            }
        }
        return;
    }
    let done = skinny_gemm(m, k, n, alpha, a, sa, b, sb, beta, c, sc);
    assert!(done, "gemm_rows needs a contiguous dimension in B (a bug: the callers' layouts have one)");
}

/// `Σ a[i]·b[i]` in 8 lanes (lane `j` sums the `i ≡ j mod 8` in order, the
/// tail separately), lanes added in a fixed tree: one order for every
/// caller, and one the compiler vectorises.
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// Rows of A up to which [`gemm`] loops directly instead of calling
/// `matrixmultiply` (a decode step's one query row: packing the K/V tile
/// would cost more than the product).
const SKINNY_ROWS: usize = 4;

/// [`gemm`] for a few rows of A with a contiguous dimension in B: dot
/// products with B's columns or AXPYs over B's rows, no packing. Returns
/// `false` (doing nothing) when neither of B's strides is 1.
#[allow(clippy::too_many_arguments)]
fn skinny_gemm(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: &[f32],
    (rsa, csa): (usize, usize),
    b: &[f32],
    (rsb, csb): (usize, usize),
    beta: f32,
    c: &mut [f32],
    (rsc, csc): (usize, usize),
) -> bool {
    let store = |c: &mut f32, x: f32| *c = if beta == 0.0 { alpha * x } else { alpha * x + beta * *c };
    if rsb == 1 {
        // Columns of B contiguous: c[i,j] = a[i,:]·b[:,j].
        for i in 0..m {
            for j in 0..n {
                let bj = &b[j * csb..j * csb + k];
                let x: f32 = if csa == 1 {
                    dot(&a[i * rsa..i * rsa + k], bj)
                } else {
                    (0..k).map(|p| a[i * rsa + p * csa] * bj[p]).sum()
                };
                store(&mut c[i * rsc + j * csc], x);
            }
        }
        true
    } else if csb == 1 && csc == 1 {
        // Rows of B contiguous: c[i,:] = Σ_p a[i,p]·b[p,:].
        let mut acc = vec![0.0f32; n];
        for i in 0..m {
            acc.fill(0.0);
            for p in 0..k {
                let x = a[i * rsa + p * csa];
                acc.iter_mut().zip(&b[p * rsb..p * rsb + n]).for_each(|(o, &y)| *o += x * y);
            }
            for (cj, &x) in c[i * rsc..i * rsc + n].iter_mut().zip(&acc) {
                store(cj, x);
            }
        }
        true
    } else {
        false
    }
}

/// Element offsets of the q/o and k/v layouts.
#[derive(Clone, Copy)]
struct Layout {
    s: AttentionSpec,
}

impl Layout {
    fn q(&self, b: usize, t: usize, h: usize) -> usize {
        ((b * self.s.seq + t) * self.s.n_heads + h) * self.s.head_dim
    }
    fn k(&self, b: usize, t: usize, g: usize) -> usize {
        ((b * self.s.seq + t) * self.s.n_kv_heads + g) * self.s.head_dim
    }
    fn q_rs(&self) -> usize {
        self.s.n_heads * self.s.head_dim
    }
    fn k_rs(&self) -> usize {
        self.s.n_kv_heads * self.s.head_dim
    }
}

/// Queries per chunk of the block pattern.
const QCHUNK: usize = 1024;

/// A dense query tile `[t0, t1)` and the key ranges `[k0, k1)` it visits.
type Tile = (usize, usize, Vec<(usize, usize)>);

fn dense_tiles(seq: usize) -> Vec<Tile> {
    (0..seq)
        .step_by(TILE)
        .map(|t0| {
            let t1 = (t0 + TILE).min(seq);
            (t0, t1, (0..t1).step_by(KTILE).map(|k0| (k0, (k0 + KTILE).min(t1))).collect())
        })
        .collect()
}

/// Block pattern, queries `t0..t1` of batch `b`: per key block chosen by at
/// least one of them (ascending), the key range and the rows (`t - t0`,
/// ascending) of the queries whose own selection lists it.
fn chosen_blocks(s: &AttentionSpec, idx: &[u32], b: usize, t0: usize, t1: usize) -> Vec<(usize, usize, Vec<usize>)> {
    let PatternSpec::Blocks { block, n } = s.pattern else { unreachable!("block pattern") };
    let nkb = (t1 - 1) / block + 1;
    let mut rows: Vec<Vec<usize>> = vec![Vec::new(); nkb];
    for t in t0..t1 {
        for &kb in &idx[(b * s.seq + t) * n..(b * s.seq + t + 1) * n] {
            if kb != NONE && kb as usize <= t / block {
                rows[kb as usize].push(t - t0);
            }
        }
    }
    rows.into_iter()
        .enumerate()
        .filter(|(_, r)| !r.is_empty())
        .map(|(kb, r)| (kb * block, ((kb + 1) * block).min(s.seq), r))
        .collect()
}

/// Copies the `d`-wide rows `rows` (relative to row `t0`, stride `rs`) of `src` into `dst`, packed.
fn gather(dst: &mut Vec<f32>, src: &[f32], t0: usize, rs: usize, d: usize, rows: &[usize]) {
    dst.clear();
    for &r in rows {
        dst.extend_from_slice(&src[(t0 + r) * rs..(t0 + r) * rs + d]);
    }
}

/// Keys of query `t` in token mode.
fn token_keys<'a>(s: &AttentionSpec, idx: &'a [u32], b: usize, t: usize) -> impl Iterator<Item = usize> + 'a {
    let PatternSpec::Tokens { k } = s.pattern else { unreachable!() };
    idx[(b * s.seq + t) * k..(b * s.seq + t + 1) * k].iter().map(|&x| x as usize).filter(move |&x| x <= t)
}

/// Number of keys of range `[k0, k1)` visible to query `t` (a prefix).
fn visible(t: usize, k0: usize, k1: usize) -> usize {
    if t < k0 { 0 } else { (t + 1).min(k1) - k0 }
}

/// One head's `[seq, d]` rows of a q/o or k/v layout tensor as f32: the
/// elements and the row stride (see [`f32_rows`]).
type HeadRows<'a> = (&'a [f32], usize);

pub(super) fn forward(s: &AttentionSpec, q: &T, k: &T, v: &T, idx: Option<&T>, o: &mut T, lse: &mut T) {
    let (gq, gk, gv) = (q.buf.lock(), k.buf.lock(), v.buf.lock());
    let (qs, ks, vs) = (gq.slice(), gk.slice(), gv.slice());
    let idx_g = idx.map(|i| i.buf.u32s());
    let idx = idx_g.as_deref();
    let lay = Layout { s: *s };
    let d = s.head_dim;
    // f16/bf16 heads are widened into [seq, d] f32 copies (no whole-tensor
    // copies): K and V once per (batch, kv head), shared by the group's query
    // heads, Q per task. f32 tensors are read in place (empty copies here).
    let kv: Vec<(Vec<f32>, Vec<f32>)> = (0..s.batch * s.n_kv_heads)
        .into_par_iter()
        .map(|bg| {
            let (b, g) = (bg / s.n_kv_heads, bg % s.n_kv_heads);
            let (mut kbuf, mut vbuf) = (Vec::new(), Vec::new());
            for (src, buf) in [(&ks, &mut kbuf), (&vs, &mut vbuf)] {
                if !matches!(src, SliceRef::F32(_)) {
                    f32_rows(src, lay.k(b, 0, g), lay.k_rs(), s.seq, d, buf);
                }
            }
            (kbuf, vbuf)
        })
        .collect();
    // One task per (batch, head): returns its o rows ([seq, d]) and lse.
    let per_head: Vec<(Vec<f32>, Vec<f32>)> = (0..s.batch * s.n_heads)
        .into_par_iter()
        .map(|bh| {
            let (b, h) = (bh / s.n_heads, bh % s.n_heads);
            let g = h / s.group();
            let mut qbuf = Vec::new();
            let (qh, qrs) = f32_rows(&qs, lay.q(b, 0, h), lay.q_rs(), s.seq, d, &mut qbuf);
            let (kc, vc) = &kv[b * s.n_kv_heads + g];
            let (kh, krs) = match ks {
                SliceRef::F32(x) => (&x[lay.k(b, 0, g).min(x.len())..], lay.k_rs()),
                _ => (&kc[..], d),
            };
            let (vh, vrs) = match vs {
                SliceRef::F32(x) => (&x[lay.k(b, 0, g).min(x.len())..], lay.k_rs()),
                _ => (&vc[..], d),
            };
            let mut out = vec![0.0f32; s.seq * d];
            let mut lse = vec![f32::NEG_INFINITY; s.seq];
            if let PatternSpec::Tokens { .. } = s.pattern {
                let idx = idx.expect("token pattern has an index");
                let mut p = Vec::new();
                for t in 0..s.seq {
                    let qv = &qh[t * qrs..t * qrs + d];
                    let keys: Vec<usize> = token_keys(s, idx, b, t).collect();
                    p.clear();
                    p.extend(
                        keys.iter().map(|&j| {
                            s.scale * qv.iter().zip(&kh[j * krs..j * krs + d]).map(|(a, b)| a * b).sum::<f32>()
                        }),
                    );
                    let m = p.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                    if keys.is_empty() {
                        continue;
                    }
                    let l = vmath::exp_shift_sum(simd::simd(), &mut p, m);
                    let o = &mut out[t * d..(t + 1) * d];
                    for (&j, &pj) in keys.iter().zip(&p) {
                        let vv = &vh[j * vrs..j * vrs + d];
                        o.iter_mut().zip(vv).for_each(|(o, v)| *o += pj / l * v);
                    }
                    lse[t] = m + l.ln();
                }
                return (out, lse);
            }
            if let PatternSpec::Blocks { .. } = s.pattern {
                let idx = idx.expect("block pattern has an index");
                forward_blocks(s, ((qh, qrs), (kh, krs), (vh, vrs)), idx, b, &mut out, &mut lse);
                return (out, lse);
            }
            let mut sbuf = vec![0.0f32; TILE * KTILE];
            for (t0, t1, ranges) in dense_tiles(s.seq) {
                let rows = t1 - t0;
                let (mut m, mut l) = (vec![f32::NEG_INFINITY; rows], vec![0.0f32; rows]);
                let acc = &mut out[t0 * d..t1 * d];
                for &(k0, k1) in &ranges {
                    let cols = k1 - k0;
                    let sb = &mut sbuf[..rows * cols];
                    gemm(
                        rows,
                        d,
                        cols,
                        s.scale,
                        &qh[t0 * qrs..],
                        (qrs, 1),
                        &kh[k0 * krs..],
                        (1, krs),
                        0.0,
                        sb,
                        (cols, 1),
                    );
                    for r in 0..rows {
                        let vis = visible(t0 + r, k0, k1);
                        if let Some(corr) = online_update(&mut sb[r * cols..(r + 1) * cols], vis, &mut m[r], &mut l[r])
                        {
                            acc[r * d..(r + 1) * d].iter_mut().for_each(|a| *a *= corr);
                        }
                    }
                    gemm(rows, cols, d, 1.0, sb, (cols, 1), &vh[k0 * vrs..], (vrs, 1), 1.0, acc, (d, 1));
                }
                for r in 0..rows {
                    if l[r] > 0.0 {
                        acc[r * d..(r + 1) * d].iter_mut().for_each(|a| *a /= l[r]);
                        lse[t0 + r] = m[r] + l[r].ln();
                    }
                }
            }
            (out, lse)
        })
        .collect();
    o.buf.store_rows(per_head.iter().enumerate().flat_map(|(bh, (out, _))| {
        let (b, h) = (bh / s.n_heads, bh % s.n_heads);
        out.chunks_exact(d).enumerate().map(move |(t, row)| (lay.q(b, t, h), row))
    }));
    lse.buf.produce(|l| {
        for (bh, (_, ls)) in per_head.iter().enumerate() {
            l[bh * s.seq..(bh + 1) * s.seq].copy_from_slice(ls);
        }
    });
}

/// Online-softmax update of one query row with the scores `row` of a key
/// range of which the first `vis` are visible: `row` becomes `exp(x - m)`
/// (0 past `vis`); returns the factor the row's accumulator must be scaled
/// by, or `None` when the query has seen no key yet (the row is zeroed).
pub(super) fn online_update(row: &mut [f32], vis: usize, m: &mut f32, l: &mut f32) -> Option<f32> {
    let v = simd::simd();
    let mnew = m.max(vmath::max(v, &row[..vis]));
    if mnew == f32::NEG_INFINITY {
        row.fill(0.0);
        return None;
    }
    let corr = (*m - mnew).exp();
    let sum = vmath::exp_shift_sum(v, &mut row[..vis], mnew);
    row[vis..].fill(0.0);
    *l = *l * corr + sum;
    *m = mnew;
    Some(corr)
}

/// Block-pattern forward of head `h` (kv head `g`) of batch `b`: `out` is
/// `[seq, d]`, `lse` `[seq]`. Per chunk of queries, per chosen key block,
/// the rows of the queries that chose it are gathered into one GEMM.
fn forward_blocks(
    s: &AttentionSpec,
    ((qh, qrs), (kh, krs), (vh, vrs)): (HeadRows<'_>, HeadRows<'_>, HeadRows<'_>),
    idx: &[u32],
    b: usize,
    out: &mut [f32],
    lse: &mut [f32],
) {
    let d = s.head_dim;
    let (mut qb, mut sb, mut pv, mut corr) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for t0 in (0..s.seq).step_by(QCHUNK) {
        let t1 = (t0 + QCHUNK).min(s.seq);
        let (mut m, mut l) = (vec![f32::NEG_INFINITY; t1 - t0], vec![0.0f32; t1 - t0]);
        let acc = &mut out[t0 * d..t1 * d];
        for (k0, k1, rows) in chosen_blocks(s, idx, b, t0, t1) {
            let (nr, cols) = (rows.len(), k1 - k0);
            gather(&mut qb, qh, t0, qrs, d, &rows);
            sb.resize(nr * cols, 0.0);
            gemm(nr, d, cols, s.scale, &qb, (d, 1), &kh[k0 * krs..], (1, krs), 0.0, &mut sb, (cols, 1));
            corr.clear();
            corr.resize(nr, 1.0);
            for (i, &r) in rows.iter().enumerate() {
                let vis = visible(t0 + r, k0, k1);
                corr[i] = online_update(&mut sb[i * cols..(i + 1) * cols], vis, &mut m[r], &mut l[r]).unwrap_or(1.0);
            }
            pv.resize(nr * d, 0.0);
            gemm(nr, cols, d, 1.0, &sb, (cols, 1), &vh[k0 * vrs..], (vrs, 1), 0.0, &mut pv, (d, 1));
            for (i, &r) in rows.iter().enumerate() {
                let a = &mut acc[r * d..(r + 1) * d];
                a.iter_mut().zip(&pv[i * d..(i + 1) * d]).for_each(|(a, &x)| *a = *a * corr[i] + x);
            }
        }
        for r in 0..t1 - t0 {
            if l[r] > 0.0 {
                acc[r * d..(r + 1) * d].iter_mut().for_each(|a| *a /= l[r]);
                lse[t0 + r] = m[r] + l[r].ln();
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
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
) {
    let lse = rd(lse);
    let (gq, gk, gv, go, gdo) = (q.buf.lock(), k.buf.lock(), v.buf.lock(), o.buf.lock(), d_o.buf.lock());
    let (qs, ks, vs, os, dos) = (gq.slice(), gk.slice(), gv.slice(), go.slice(), gdo.slice());
    let idx_g = idx.map(|i| i.buf.u32s());
    let idx = idx_g.as_deref();
    let lay = Layout { s: *s };
    let d = s.head_dim;
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    // One task per (batch, kv head): it owns dk/dv of that head and dq of its
    // query heads. f16/bf16 heads are widened per task (see `forward`).
    type Grads = (Vec<Vec<f32>>, Vec<f32>, Vec<f32>);
    let per_kv: Vec<Grads> = (0..s.batch * s.n_kv_heads)
        .into_par_iter()
        .map(|bg| {
            let (b, g) = (bg / s.n_kv_heads, bg % s.n_kv_heads);
            let (mut kbuf, mut vbuf, mut qbuf, mut obuf, mut dobuf) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let (kh, krs) = f32_rows(&ks, lay.k(b, 0, g), lay.k_rs(), s.seq, d, &mut kbuf);
            let (vh, vrs) = f32_rows(&vs, lay.k(b, 0, g), lay.k_rs(), s.seq, d, &mut vbuf);
            let (mut dkl, mut dvl) = (vec![0.0f32; s.seq * d], vec![0.0f32; s.seq * d]);
            let mut dqs = Vec::with_capacity(s.group());
            for h in g * s.group()..(g + 1) * s.group() {
                let (qh, qrs) = f32_rows(&qs, lay.q(b, 0, h), lay.q_rs(), s.seq, d, &mut qbuf);
                let (oh, ors) = f32_rows(&os, lay.q(b, 0, h), lay.q_rs(), s.seq, d, &mut obuf);
                let (doh, dors) = f32_rows(&dos, lay.q(b, 0, h), lay.q_rs(), s.seq, d, &mut dobuf);
                let mut dql = vec![0.0f32; s.seq * d];
                let lse_h = &lse[(b * s.n_heads + h) * s.seq..(b * s.n_heads + h + 1) * s.seq];
                let drow: Vec<f32> =
                    (0..s.seq).map(|t| dot(&doh[t * dors..t * dors + d], &oh[t * ors..t * ors + d])).collect();
                if let PatternSpec::Tokens { .. } = s.pattern {
                    let idx = idx.expect("token pattern has an index");
                    for t in 0..s.seq {
                        if lse_h[t] == f32::NEG_INFINITY {
                            continue;
                        }
                        let (qv, dov) = (&qh[t * qrs..t * qrs + d], &doh[t * dors..t * dors + d]);
                        for j in token_keys(s, idx, b, t) {
                            let (kv, vv) = (&kh[j * krs..j * krs + d], &vh[j * vrs..j * vrs + d]);
                            let p = (s.scale * dot(qv, kv) - lse_h[t]).exp();
                            let ds = p * (dot(dov, vv) - drow[t]);
                            for e in 0..d {
                                dvl[j * d + e] += p * dov[e];
                                dql[t * d + e] += s.scale * ds * kv[e];
                                dkl[j * d + e] += s.scale * ds * qv[e];
                            }
                        }
                    }
                    dqs.push(dql);
                    continue;
                }
                let units: Vec<(usize, usize, usize, Vec<usize>)> = match s.pattern {
                    PatternSpec::Blocks { .. } => {
                        let idx = idx.expect("block pattern has an index");
                        (0..s.seq)
                            .step_by(QCHUNK)
                            .flat_map(|t0| {
                                chosen_blocks(s, idx, b, t0, (t0 + QCHUNK).min(s.seq))
                                    .into_iter()
                                    .map(move |(k0, k1, rows)| (t0, k0, k1, rows))
                            })
                            .collect()
                    }
                    _ => dense_tiles(s.seq)
                        .into_iter()
                        .flat_map(|(t0, t1, ranges)| {
                            ranges.into_iter().map(move |(k0, k1)| (t0, k0, k1, (0..t1 - t0).collect()))
                        })
                        .collect(),
                };
                let (mut qb, mut dob, mut p, mut dp, mut dqt) =
                    (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
                // Dense tiles take consecutive query rows: read in place, and dQ
                // accumulated straight into its rows.
                let dense = matches!(s.pattern, PatternSpec::Dense);
                for (t0, k0, k1, rows) in units {
                    let (nr, cols) = (rows.len(), k1 - k0);
                    let ((qt, qts), (dot_, dots)) = if dense {
                        ((&qh[t0 * qrs..], qrs), (&doh[t0 * dors..], dors))
                    } else {
                        gather(&mut qb, qh, t0, qrs, d, &rows);
                        gather(&mut dob, doh, t0, dors, d, &rows);
                        ((&qb[..], d), (&dob[..], d))
                    };
                    let (kt, vt) = (&kh[k0 * krs..], &vh[k0 * vrs..]);
                    p.resize(nr * cols, 0.0);
                    dp.resize(nr * cols, 0.0);
                    gemm(nr, d, cols, s.scale, qt, (qts, 1), kt, (1, krs), 0.0, &mut p, (cols, 1));
                    for (i, &r) in rows.iter().enumerate() {
                        let vis = visible(t0 + r, k0, k1);
                        let (l, pr) = (lse_h[t0 + r], &mut p[i * cols..(i + 1) * cols]);
                        let vis = if l > f32::NEG_INFINITY { vis } else { 0 };
                        vmath::exp_shift_sum(simd::simd(), &mut pr[..vis], l);
                        pr[vis..].fill(0.0);
                    }
                    // dV += Pᵀ·dO; dP = dO·Vᵀ; dS = P∘(dP - D); dQ += s·dS·K; dK += s·dSᵀ·Q.
                    gemm(cols, nr, d, 1.0, &p, (1, cols), dot_, (dots, 1), 1.0, &mut dvl[k0 * d..], (d, 1));
                    gemm(nr, d, cols, 1.0, dot_, (dots, 1), vt, (1, vrs), 0.0, &mut dp, (cols, 1));
                    for (i, &r) in rows.iter().enumerate() {
                        let (dpr, pr, dr) =
                            (&mut dp[i * cols..(i + 1) * cols], &p[i * cols..(i + 1) * cols], drow[t0 + r]);
                        dpr.iter_mut().zip(pr).for_each(|(x, &p)| *x = p * (*x - dr));
                    }
                    if dense {
                        gemm(nr, cols, d, s.scale, &dp, (cols, 1), kt, (krs, 1), 1.0, &mut dql[t0 * d..], (d, 1));
                    } else {
                        dqt.resize(nr * d, 0.0);
                        gemm(nr, cols, d, s.scale, &dp, (cols, 1), kt, (krs, 1), 0.0, &mut dqt, (d, 1));
                        for (i, &r) in rows.iter().enumerate() {
                            let dst = &mut dql[(t0 + r) * d..(t0 + r + 1) * d];
                            dst.iter_mut().zip(&dqt[i * d..(i + 1) * d]).for_each(|(a, &x)| *a += x);
                        }
                    }
                    gemm(cols, nr, d, s.scale, &dp, (1, cols), qt, (qts, 1), 1.0, &mut dkl[k0 * d..], (d, 1));
                }
                dqs.push(dql);
            }
            (dqs, dkl, dvl)
        })
        .collect();
    dq.buf.store_rows(per_kv.iter().enumerate().flat_map(|(bg, (dqs, _, _))| {
        let (b, g) = (bg / s.n_kv_heads, bg % s.n_kv_heads);
        dqs.iter().enumerate().flat_map(move |(i, dql)| {
            let h = g * s.group() + i;
            dql.chunks_exact(d).enumerate().map(move |(t, row)| (lay.q(b, t, h), row))
        })
    }));
    for (which, dst) in [(1, dk), (2, dv)] {
        dst.buf.store_rows(per_kv.iter().enumerate().flat_map(|(bg, grads)| {
            let src = if which == 1 { &grads.1 } else { &grads.2 };
            let (b, g) = (bg / s.n_kv_heads, bg % s.n_kv_heads);
            src.chunks_exact(d).enumerate().map(move |(t, row)| (lay.k(b, t, g), row))
        }));
    }
}

/// Key columns per indexer chunk: the `[rows·H_I, CHUNK]` dot products stay in cache.
const CHUNK: usize = 256;

/// Indexer scores of the query rows `t0..t1` of batch `b` against the keys
/// `0..t1`, chunk by chunk of keys: calls `f(k0, scores)` with `scores` the
/// `[t1 - t0, width]` row-major block for keys `k0..k0+width` (`-∞` above the
/// diagonal).
#[allow(clippy::too_many_arguments)]
fn indexer_chunks(
    s: &IndexerSpec,
    qi: &[f32],
    ki: &[f32],
    w: &[f32],
    b: usize,
    t0: usize,
    t1: usize,
    mut f: impl FnMut(usize, usize, &[f32]),
) {
    let (rows, hi, di) = (t1 - t0, s.heads, s.dim);
    let qoff = (b * s.seq + t0) * hi * di;
    let mut l = vec![0.0f32; rows * hi * CHUNK];
    let mut out = vec![0.0f32; rows * CHUNK];
    for k0 in (0..t1).step_by(CHUNK) {
        let width = CHUNK.min(t1 - k0);
        // L[(t, j), s] = q_i[t, j]·k_i[s] (q_i rows of the tile are contiguous: [t][j][e]).
        let l = &mut l[..rows * hi * width];
        gemm(
            rows * hi,
            di,
            width,
            1.0,
            &qi[qoff..],
            (di, 1),
            &ki[(b * s.seq + k0) * di..],
            (1, di),
            0.0,
            l,
            (width, 1),
        );
        let out = &mut out[..rows * width];
        for r in 0..rows {
            let t = t0 + r;
            let o = &mut out[r * width..(r + 1) * width];
            let vis = if t < k0 { 0 } else { (t + 1 - k0).min(width) };
            o[..vis].fill(0.0);
            o[vis..].fill(f32::NEG_INFINITY);
            let wt = &w[(b * s.seq + t) * hi..(b * s.seq + t + 1) * hi];
            for (j, &wj) in wt.iter().enumerate() {
                let lr = &l[(r * hi + j) * width..(r * hi + j) * width + vis];
                o[..vis].iter_mut().zip(lr).for_each(|(o, &x)| *o += wj * x.max(0.0));
            }
        }
        f(k0, width, out);
    }
}

/// The query rows `q0..q0 + rows` of the spec in tiles of [`TILE`]: `(t0, t1)`.
fn query_tiles(s: &IndexerSpec) -> impl Iterator<Item = (usize, usize)> + '_ {
    let end = s.q0 + s.rows;
    (s.q0..end).step_by(TILE).map(move |t0| (t0, (t0 + TILE).min(end)))
}

pub(super) fn indexer_scores(s: &IndexerSpec, qi: &T, ki: &T, w: &T, scores: &mut T) {
    let (qi, ki, w) = (rd(qi), rd(ki), rd(w));
    let n = s.seq;
    // scores: [batch, rows, seq], row r is query q0 + r.
    scores.buf.produce(|out| {
        out.par_chunks_mut(s.rows * n).enumerate().for_each(|(b, per_batch)| {
            per_batch.par_chunks_mut(TILE * n).enumerate().for_each(|(ti, tile)| {
                let (t0, t1) = (s.q0 + ti * TILE, (s.q0 + ti * TILE + TILE).min(s.q0 + s.rows));
                tile.fill(f32::NEG_INFINITY);
                indexer_chunks(s, &qi, &ki, &w, b, t0, t1, |k0, width, sc| {
                    for r in 0..t1 - t0 {
                        tile[r * n + k0..r * n + k0 + width].copy_from_slice(&sc[r * width..(r + 1) * width]);
                    }
                });
            })
        })
    });
}

pub(super) fn indexer_block_scores(s: &IndexerSpec, qi: &T, ki: &T, w: &T, pooled: &mut T) {
    let (qi, ki, w) = (rd(qi), rd(ki), rd(w));
    let (bs, nb, n, v) = (s.block, s.n_blocks(), s.seq, simd::simd());
    // One task per tile of TILE queries; row t pools its own scores only.
    pooled.buf.produce(|out| {
        out.par_chunks_mut(n * nb).enumerate().for_each(|(b, per_batch)| {
            per_batch.par_chunks_mut(TILE * nb).enumerate().for_each(|(ti, dst)| {
                let (t0, t1) = (ti * TILE, (ti * TILE + TILE).min(n));
                dst.fill(f32::NEG_INFINITY);
                indexer_chunks(s, &qi, &ki, &w, b, t0, t1, |k0, width, sc| {
                    for r in 0..t1 - t0 {
                        let (prow, srow) = (&mut dst[r * nb..(r + 1) * nb], &sc[r * width..(r + 1) * width]);
                        // One max per key block segment of the chunk (NaN skipped, as by f32::max).
                        let mut c0 = 0;
                        while c0 < width {
                            let kb = (k0 + c0) / bs;
                            let c1 = ((kb + 1) * bs - k0).min(width);
                            prow[kb] = prow[kb].max(vmath::max(v, &srow[c0..c1]));
                            c0 = c1;
                        }
                    }
                });
            })
        })
    });
}

pub(super) fn select_topk(s: &SelectSpec, scores: &T, idx: &mut T) {
    let sc = rd(scores);
    let out: Vec<u32> = (0..s.batch * s.rows)
        .into_par_iter()
        .flat_map_iter(|row| select_row(&sc[row * s.cols..(row + 1) * s.cols], s.last(row % s.rows), s.k, s.blocks()))
        .collect();
    idx.buf.store_u32(&out);
}

/// The key set `K(t)` of query `t` of batch `b`, ascending.
fn keys_of(s: &AttentionSpec, idx: Option<&[u32]>, b: usize, t: usize) -> Vec<usize> {
    match s.pattern {
        PatternSpec::Dense => (0..=t).collect(),
        PatternSpec::Tokens { .. } => {
            let mut v: Vec<usize> = token_keys(s, idx.expect("token index"), b, t).collect();
            v.sort_unstable();
            v
        }
        PatternSpec::Blocks { block, n } => {
            let idx = idx.expect("block index");
            let mut v: Vec<usize> = idx[(b * s.seq + t) * n..(b * s.seq + t + 1) * n]
                .iter()
                .filter(|&&kb| kb != NONE && kb as usize <= t / block)
                .flat_map(|&kb| kb as usize * block..((kb as usize + 1) * block).min(t + 1))
                .collect();
            v.sort_unstable();
            v
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn indexer_kl(
    ls: &IndexerLossSpec,
    q: &T,
    k: &T,
    lse: &T,
    scores: &T,
    idx: Option<&T>,
    loss: &mut T,
    dscores: &mut T,
) {
    let s = &ls.attn;
    let (q, k, lse, sc) = (rd(q), rd(k), rd(lse), rd(scores));
    let idx_g = idx.map(|i| i.buf.u32s());
    let idx = idx_g.as_deref();
    let lay = Layout { s: *s };
    let (n, d, rows) = (s.seq, s.head_dim, ls.rows);
    // scores and dscores rows are the tile's (row r of batch b is query q0 + r).
    let mut losses = vec![0.0f32; s.batch * rows];
    dscores.buf.produce(|ds| {
        ds.par_chunks_mut(n).zip(losses.par_iter_mut()).enumerate().for_each(|(row, (dsr, lossr))| {
            let (b, t) = (row / rows, ls.q0 + row % rows);
            dsr.fill(0.0);
            let keys = if ls.sample.contains(t) { keys_of(s, idx, b, t) } else { Vec::new() };
            if keys.is_empty() {
                *lossr = 0.0;
                return;
            }
            let mut p = vec![0.0f32; keys.len()];
            for h in 0..s.n_heads {
                let l = lse[(b * s.n_heads + h) * n + t];
                if l == f32::NEG_INFINITY {
                    continue;
                }
                let qv = &q[lay.q(b, t, h)..lay.q(b, t, h) + d];
                let g = h / s.group();
                for (pi, &j) in p.iter_mut().zip(&keys) {
                    let dot: f32 = qv.iter().zip(&k[lay.k(b, j, g)..lay.k(b, j, g) + d]).map(|(a, b)| a * b).sum();
                    *pi += (s.scale * dot - l).exp() / s.n_heads as f32;
                }
            }
            let ir = &sc[row * n..(row + 1) * n];
            let m = keys.iter().fold(f32::NEG_INFINITY, |m, &j| m.max(ir[j]));
            let z: f32 = keys.iter().map(|&j| (ir[j] - m).exp()).sum();
            let mut total = 0.0f32;
            for (&pi, &j) in p.iter().zip(&keys) {
                let log_r = ir[j] - m - z.ln();
                if pi > 0.0 {
                    total += pi * (pi.ln() - log_r);
                }
                dsr[j] = log_r.exp() - pi;
            }
            *lossr = total;
        })
    });
    loss.buf.update(|l| {
        for (b, tile) in losses.chunks(rows).enumerate() {
            l[b * n + ls.q0..b * n + ls.q0 + rows].copy_from_slice(tile);
        }
    });
}

#[allow(clippy::too_many_arguments)]
pub(super) fn indexer_backward(
    s: &IndexerSpec,
    qi: &T,
    ki: &T,
    w: &T,
    dscores: &T,
    dqi: &mut T,
    dki: &mut T,
    dw: &mut T,
) {
    let (qi, ki, w, ds) = (rd(qi), rd(ki), rd(w), rd(dscores));
    let (n, hi, di) = (s.seq, s.heads, s.dim);
    let tasks: Vec<(usize, usize, usize)> =
        (0..s.batch).flat_map(|b| query_tiles(s).map(move |(t0, t1)| (b, t0, t1))).collect();
    // dscores row of query t of batch b (the spec's tile of rows).
    let ds_row = |b: usize, t: usize| (b * s.rows + t - s.q0) * n;
    // Per task: dq_i rows, dw rows, and this tile's contribution to dk_i[b, 0..t1].
    let parts: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = tasks
        .par_iter()
        .map(|&(b, t0, t1)| {
            let (rows, cols) = (t1 - t0, t1);
            let qoff = (b * n + t0) * hi * di;
            let mut l = vec![0.0f32; rows * hi * cols];
            gemm(rows * hi, di, cols, 1.0, &qi[qoff..], (di, 1), &ki[b * n * di..], (1, di), 0.0, &mut l, (cols, 1));
            let mut dwt = vec![0.0f32; rows * hi];
            // l becomes G = dI·w·[L>0] in place.
            for r in 0..rows {
                let t = t0 + r;
                let dsr = &ds[ds_row(b, t)..ds_row(b, t) + t + 1];
                for j in 0..hi {
                    let wj = w[(b * n + t) * hi + j];
                    let lr = &mut l[(r * hi + j) * cols..(r * hi + j + 1) * cols];
                    let mut acc = 0.0f32;
                    for (sidx, x) in lr.iter_mut().enumerate() {
                        if sidx > t {
                            *x = 0.0;
                            continue;
                        }
                        let dval = dsr[sidx];
                        acc += dval * x.max(0.0);
                        *x = if *x > 0.0 { dval * wj } else { 0.0 };
                    }
                    dwt[r * hi + j] = acc;
                }
            }
            let mut dq = vec![0.0f32; rows * hi * di];
            gemm(rows * hi, cols, di, 1.0, &l, (cols, 1), &ki[b * n * di..], (di, 1), 0.0, &mut dq, (di, 1));
            let mut dk = vec![0.0f32; cols * di];
            gemm(cols, rows * hi, di, 1.0, &l, (1, cols), &qi[qoff..], (di, 1), 0.0, &mut dk, (di, 1));
            (dq, dwt, dk)
        })
        .collect();
    let mut dkv = vec![0.0f32; s.batch * n * di];
    // dq_i and dw: the tile's rows only (the rest keep their values).
    dqi.buf.update(|out| {
        for (&(b, t0, _), (dq, _, _)) in tasks.iter().zip(&parts) {
            out[(b * n + t0) * hi * di..(b * n + t0) * hi * di + dq.len()].copy_from_slice(dq);
        }
    });
    dw.buf.update(|out| {
        for (&(b, t0, _), (_, dwt, _)) in tasks.iter().zip(&parts) {
            out[(b * n + t0) * hi..(b * n + t0) * hi + dwt.len()].copy_from_slice(dwt);
        }
    });
    for (&(b, _, _), (_, _, dk)) in tasks.iter().zip(&parts) {
        dkv[b * n * di..b * n * di + dk.len()].iter_mut().zip(dk).for_each(|(a, x)| *a += x);
    }
    dki.buf.store(&dkv);
}
