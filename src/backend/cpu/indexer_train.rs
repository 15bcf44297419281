//! The indexer's sparse-phase training fused over the kept set (semantics in
//! `crate::attention::ops::indexer_train_kept`).
//!
//! In the sparse phase the KL target `p` and the indexer distribution `r`
//! live on `K(t)`, the keys of query `t`'s kept blocks, so `dI = r - p` is
//! zero elsewhere and the whole chain (scores, KL, backward) only needs the
//! pairs `(t, s ∈ K(t))`: per query `|K| ≤ keep·block` keys instead of the
//! `t + 1` of the unfused ops, which compute and store `[seq, seq]` scores
//! and gradients to use a few per row.
//!
//! Per query `t` and kept key `s`:
//! `L_j = q_i[t,j]·k_i[s]`, `I = Σ_j w[t,j]·ReLU(L_j)`,
//! `p(s) = (1/H)·Σ_h exp(scale·q_h[t]·k[s] - lse_h[t])`, `r = softmax_{K(t)} I`,
//! `loss[t] = Σ_{p>0} p·(ln p - ln r)`, `dI = grad_scale·(r - p)`, then
//! `dw[t,j] = Σ_s dI·ReLU(L_j)`, `dq_i[t,j] = Σ_s G_j·k_i[s]`,
//! `dk_i[s] += Σ_j G_j·q_i[t,j]` with `G_j = dI·w[t,j]·[L_j > 0]`.
//!
//! The products run per query and kept block through the row kernels of
//! `simd` (`rows_times_b`: AXPYs over contiguous columns, no horizontal
//! sums): `L` and `q_h·k` against keys stored block-transposed once per call,
//! `dq_i` and `dk_i` against the key and query rows as they lie. A query's
//! arithmetic depends on its own kept blocks only (never on the other queries
//! of its task), and each sum runs in a fixed order. Queries outside the
//! spec's row sample are skipped (zero loss, `dq_i`, `dw`; no `dk_i` share).

use rayon::prelude::*;

use super::{CpuBackend, rd, simd, vmath};
use crate::Tensor;
use crate::attention::ops::{IndexerTrainSpec, PatternSpec};
use crate::attention::select::NONE;

type T = Tensor<CpuBackend>;

/// Queries per task. The split depends on the sequence only (never on the
/// thread count), and `dk_i` adds the tasks' contributions in task order, so
/// the result is the same bits on every run and machine (a resumed training
/// run must reproduce the straight one).
fn task_len(seq: usize) -> usize {
    seq.div_ceil(16).max(128)
}

/// The kept blocks of query `t` (ascending) into `out` as `(block, first
/// element in the query's kept-key list, visible keys)`: the blocks `≤ t /
/// block` it lists, `NONE` and future blocks skipped, the diagonal block cut
/// at `t`. Returns the number of kept keys.
fn kept_blocks(out: &mut Vec<(usize, usize, usize)>, blocks: &[u32], block: usize, t: usize) -> usize {
    out.clear();
    out.extend(blocks.iter().filter(|&&kb| kb != NONE && kb as usize <= t / block).map(|&kb| (kb as usize, 0, 0)));
    out.sort_unstable();
    let mut m = 0;
    for (kb, off, len) in out.iter_mut() {
        (*off, *len) = (m, block.min(t + 1 - *kb * block));
        m += *len;
    }
    m
}

/// Rows `base + key·stride .. + dim` of the keys `0..n`, block by block and
/// transposed: element `(kb·dim + e)·block + c` is element `e` of key
/// `kb·block + c` (zero past `n`). A query's product with a key block is then
/// an AXPY over contiguous columns (`simd::rows_times_b`), no horizontal sums.
fn blocks_transposed(src: &[f32], base: usize, stride: usize, dim: usize, n: usize, block: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; n.div_ceil(block) * dim * block];
    out.par_chunks_mut(dim * block).enumerate().for_each(|(kb, o)| {
        for c in 0..block.min(n - kb * block) {
            let row = &src[base + (kb * block + c) * stride..][..dim];
            for (e, &x) in row.iter().enumerate() {
                o[e * block + c] = x;
            }
        }
    });
    out
}

/// One task's results: loss, `dq_i` and `dw` rows of its queries, and its
/// contribution to `dk_i` for the keys `0..t1`.
struct Part {
    loss: Vec<f32>,
    dq: Vec<f32>,
    dw: Vec<f32>,
    dk: Vec<f32>,
}

/// Per-query work rows, reused across a task's queries.
#[derive(Default)]
struct Work {
    blocks: Vec<(usize, usize, usize)>,
    /// `L[j][i]`: index head `j`, kept key `i`.
    l: Vec<f32>,
    /// `q_h·k_i` per main head `h`, then `exp(scale·q_h·k_i - lse_h)`.
    s: Vec<f32>,
    sc: Vec<f32>,
    p: Vec<f32>,
    r: Vec<f32>,
    di: Vec<f32>,
    /// `G[j][i]` and its transpose `Gt[i][j]`.
    g: Vec<f32>,
    gt: Vec<f32>,
}

#[allow(clippy::too_many_arguments)]
pub(super) fn indexer_train_kept(
    s: &IndexerTrainSpec,
    qi: &T,
    ki: &T,
    w: &T,
    q: &T,
    k: &T,
    lse: &T,
    idx: &T,
    loss: &mut T,
    dqi: &mut T,
    dki: &mut T,
    dw: &mut T,
) {
    let a = &s.attn;
    let PatternSpec::Blocks { block, n: nsel } = a.pattern else { unreachable!("validated: block pattern") };
    let (qi, ki, w, q, k, lse) = (rd(qi), rd(ki), rd(w), rd(q), rd(k), rd(lse));
    let idx = idx.buf.u32s();
    let (n, hi, di, nh, d, nkv, group) = (a.seq, s.heads, s.dim, a.n_heads, a.head_dim, a.n_kv_heads, a.group());
    let v = simd::simd();
    // Per batch row: the index keys and each KV group's keys, block-transposed.
    let kit: Vec<Vec<f32>> = (0..a.batch).map(|b| blocks_transposed(&ki, b * n * di, di, di, n, block)).collect();
    let kt: Vec<Vec<Vec<f32>>> = (0..a.batch)
        .map(|b| (0..nkv).map(|g| blocks_transposed(&k, (b * n * nkv + g) * d, nkv * d, d, n, block)).collect())
        .collect();
    let tl = task_len(n);
    let tasks: Vec<(usize, usize, usize)> =
        (0..a.batch).flat_map(|b| (0..n).step_by(tl).map(move |t0| (b, t0, (t0 + tl).min(n)))).collect();
    let parts: Vec<Part> = tasks
        .par_iter()
        .map(|&(b, t0, t1)| {
            let rows = t1 - t0;
            let mut pt = Part {
                loss: vec![0.0; rows],
                dq: vec![0.0; rows * hi * di],
                dw: vec![0.0; rows * hi],
                dk: vec![0.0; t1 * di],
            };
            let mut wk = Work::default();
            for t in (t0..t1).filter(|&t| s.sample.contains(t)) {
                let r = t - t0;
                let m = kept_blocks(&mut wk.blocks, &idx[(b * n + t) * nsel..(b * n + t + 1) * nsel], block, t);
                if m == 0 {
                    continue;
                }
                let qit = &qi[(b * n + t) * hi * di..(b * n + t + 1) * hi * di];
                let wt = &w[(b * n + t) * hi..(b * n + t + 1) * hi];
                let Work { blocks, l, s: sh, sc, p, r: rr, di: dis, g, gt } = &mut wk;
                // L[j][i] = q_i[t, j]·k_i[s_i] and q_h[t]·k[s_i], block by block.
                l.resize(hi * m, 0.0);
                sh.resize(nh * m, 0.0);
                for &(kb, off, len) in blocks.iter() {
                    simd::rows_times_b(v, hi, len, di, qit, di, &kit[b][kb * di * block..], block, &mut l[off..], m);
                    for (gi, ktg) in kt[b].iter().enumerate() {
                        simd::rows_times_b(
                            v,
                            group,
                            len,
                            d,
                            &q[((b * n + t) * nh + gi * group) * d..],
                            d,
                            &ktg[kb * d * block..],
                            block,
                            &mut sh[gi * group * m + off..],
                            m,
                        );
                    }
                }
                // I = Σ_j w[t, j]·ReLU(L_j), summed over j in order (as the unfused scores).
                sc.clear();
                sc.resize(m, 0.0);
                for (j, &wj) in wt.iter().enumerate() {
                    sc.iter_mut().zip(&l[j * m..(j + 1) * m]).for_each(|(o, &x)| *o += wj * x.max(0.0));
                }
                // p: the main attention averaged over heads (heads without keys
                // skipped), exponentials through the portable `vmath::exp`.
                p.clear();
                p.resize(m, 0.0);
                for h in 0..nh {
                    let lh = lse[(b * nh + h) * n + t];
                    if lh == f32::NEG_INFINITY {
                        continue;
                    }
                    let e = &mut sh[h * m..(h + 1) * m];
                    e.iter_mut().for_each(|x| *x = vmath::exp(a.scale * *x - lh));
                    p.iter_mut().zip(e.iter()).for_each(|(pi, &x)| *pi += x / nh as f32);
                }
                // r = softmax(I) over the kept keys; ln r = I - max - ln Σ exp(I - max).
                let mx = sc.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                rr.clear();
                rr.extend_from_slice(sc);
                let z = vmath::exp_shift_sum(v, rr, mx);
                let lnz = z.ln();
                let mut total = 0.0f32;
                dis.clear();
                for i in 0..m {
                    if p[i] > 0.0 {
                        total += p[i] * (p[i].ln() - (sc[i] - mx - lnz));
                    }
                    dis.push((rr[i] / z - p[i]) * s.grad_scale);
                }
                pt.loss[r] = total;
                // dw[t, j] = Σ_i dI_i·ReLU(L_j), G[j][i] = dI_i·w[t, j]·[L_j > 0].
                g.resize(hi * m, 0.0);
                gt.resize(m * hi, 0.0);
                let dwr = &mut pt.dw[r * hi..(r + 1) * hi];
                for (j, &wj) in wt.iter().enumerate() {
                    let (lr, gr) = (&l[j * m..(j + 1) * m], &mut g[j * m..(j + 1) * m]);
                    let mut acc = 0.0f32;
                    for i in 0..m {
                        acc += dis[i] * lr[i].max(0.0);
                        gr[i] = if lr[i] > 0.0 { dis[i] * wj } else { 0.0 };
                        gt[i * hi + j] = gr[i];
                    }
                    dwr[j] = acc;
                }
                // dq_i[t, j] = Σ_i G[j][i]·k_i[s_i]; dk_i[s_i] += Σ_j G[j][i]·q_i[t, j].
                let dqr = &mut pt.dq[r * hi * di..(r + 1) * hi * di];
                for &(kb, off, len) in blocks.iter() {
                    let kis = &ki[(b * n + kb * block) * di..];
                    simd::rows_times_b_into(v, hi, di, len, &g[off..], m, kis, di, dqr, di, true);
                    let dkb = &mut pt.dk[kb * block * di..];
                    simd::rows_times_b_into(v, len, di, hi, &gt[off * hi..], hi, qit, di, dkb, di, true);
                }
            }
            pt
        })
        .collect();
    loss.buf.produce(|out| {
        for (&(b, t0, t1), pt) in tasks.iter().zip(&parts) {
            out[b * n + t0..b * n + t1].copy_from_slice(&pt.loss);
        }
    });
    dqi.buf.produce(|out| {
        for (&(b, t0, t1), pt) in tasks.iter().zip(&parts) {
            out[(b * n + t0) * hi * di..(b * n + t1) * hi * di].copy_from_slice(&pt.dq);
        }
    });
    dw.buf.produce(|out| {
        for (&(b, t0, t1), pt) in tasks.iter().zip(&parts) {
            out[(b * n + t0) * hi..(b * n + t1) * hi].copy_from_slice(&pt.dw);
        }
    });
    // dk_i[b, key] = Σ over b's tasks, in task order, of their contributions.
    dki.buf.produce(|out| {
        out.par_chunks_mut(di).enumerate().for_each(|(row, o)| {
            let (b, key) = (row / n, row % n);
            o.fill(0.0);
            for (&(tb, _, t1), pt) in tasks.iter().zip(&parts) {
                if tb == b && key < t1 {
                    o.iter_mut().zip(&pt.dk[key * di..(key + 1) * di]).for_each(|(a, &x)| *a += x);
                }
            }
        })
    });
}
