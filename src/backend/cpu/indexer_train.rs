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

use rayon::prelude::*;

use super::attention::dot;
use super::{CpuBackend, rd, vmath};
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

/// The kept keys of query `t` (ascending) into `keys`: the positions `≤ t`
/// of its listed blocks, `NONE` and future blocks skipped.
fn kept_keys(keys: &mut Vec<usize>, blocks: &[u32], block: usize, t: usize) {
    let mut bs: Vec<usize> =
        blocks.iter().filter(|&&kb| kb != NONE && kb as usize <= t / block).map(|&kb| kb as usize).collect();
    bs.sort_unstable();
    keys.clear();
    for kb in bs {
        keys.extend(kb * block..((kb + 1) * block).min(t + 1));
    }
}

/// One task's results: loss, `dq_i` and `dw` rows of its queries, and its
/// contribution to `dk_i` for the keys `0..t1`.
struct Part {
    loss: Vec<f32>,
    dq: Vec<f32>,
    dw: Vec<f32>,
    dk: Vec<f32>,
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
    let (n, hi, di, nh, d, nkv) = (a.seq, s.heads, s.dim, a.n_heads, a.head_dim, a.n_kv_heads);
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
            let (mut keys, mut l, mut sc, mut p, mut e) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for t in t0..t1 {
                let r = t - t0;
                kept_keys(&mut keys, &idx[(b * n + t) * nsel..(b * n + t + 1) * nsel], block, t);
                if keys.is_empty() {
                    continue;
                }
                let m = keys.len();
                let qit = &qi[(b * n + t) * hi * di..(b * n + t + 1) * hi * di];
                let wt = &w[(b * n + t) * hi..(b * n + t + 1) * hi];
                // L and I over the kept keys (I summed over j in order, as the unfused scores).
                l.resize(m * hi, 0.0);
                sc.resize(m, 0.0);
                for (i, &key) in keys.iter().enumerate() {
                    let kis = &ki[(b * n + key) * di..(b * n + key + 1) * di];
                    let mut acc = 0.0f32;
                    for j in 0..hi {
                        let x = dot(&qit[j * di..(j + 1) * di], kis);
                        l[i * hi + j] = x;
                        acc += wt[j] * x.max(0.0);
                    }
                    sc[i] = acc;
                }
                // p: the main attention averaged over heads (heads without keys
                // skipped). The exponentials of a head's row in one pass of the
                // portable `vmath::exp` (no FMA: the same bits on every machine),
                // which the compiler vectorises, instead of one libm call each.
                p.clear();
                p.resize(m, 0.0f32);
                for h in 0..nh {
                    let lh = lse[(b * nh + h) * n + t];
                    if lh == f32::NEG_INFINITY {
                        continue;
                    }
                    let qh = &q[((b * n + t) * nh + h) * d..((b * n + t) * nh + h + 1) * d];
                    let g = h / a.group();
                    e.clear();
                    e.extend(keys.iter().map(|&key| {
                        let kk = &k[((b * n + key) * nkv + g) * d..((b * n + key) * nkv + g + 1) * d];
                        a.scale * dot(qh, kk) - lh
                    }));
                    e.iter_mut().for_each(|x| *x = vmath::exp(*x));
                    p.iter_mut().zip(&e).for_each(|(pi, &x)| *pi += x / nh as f32);
                }
                // ln r = I - max - ln Σ exp(I - max).
                let mx = sc.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                let z: f32 = sc.iter().map(|&x| (x - mx).exp()).sum();
                let lnz = z.ln();
                let mut total = 0.0f32;
                let dqr = &mut pt.dq[r * hi * di..(r + 1) * hi * di];
                let dwr = &mut pt.dw[r * hi..(r + 1) * hi];
                for (i, &key) in keys.iter().enumerate() {
                    let log_r = sc[i] - mx - lnz;
                    if p[i] > 0.0 {
                        total += p[i] * (p[i].ln() - log_r);
                    }
                    let di_ = (log_r.exp() - p[i]) * s.grad_scale;
                    let kis = &ki[(b * n + key) * di..(b * n + key + 1) * di];
                    let dkr = &mut pt.dk[key * di..(key + 1) * di];
                    for j in 0..hi {
                        let x = l[i * hi + j];
                        dwr[j] += di_ * x.max(0.0);
                        if x > 0.0 {
                            let gj = di_ * wt[j];
                            dqr[j * di..(j + 1) * di].iter_mut().zip(kis).for_each(|(o, &v)| *o += gj * v);
                            dkr.iter_mut().zip(&qit[j * di..(j + 1) * di]).for_each(|(o, &v)| *o += gj * v);
                        }
                    }
                }
                pt.loss[r] = total;
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
