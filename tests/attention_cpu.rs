//! Attention on the CPU backend against naive f64 loops and finite
//! differences: dense, token-sparse and block-sparse, GQA and MHA, sequence
//! lengths that are not multiples of the tile or block size.

use dynsparse::attention::select::{NONE, pool_blocks, topk_blocks, topk_tokens};
use dynsparse::attention::{self, Pattern};
use dynsparse::backend::cpu::CpuBackend;
use dynsparse::util::rng::Rng;
use dynsparse::{DType, Tensor};

#[derive(Clone, Copy)]
struct Shape {
    batch: usize,
    seq: usize,
    heads: usize,
    kv: usize,
    d: usize,
}

/// Keys of query `t` under a pattern, in the spec's terms.
#[derive(Clone)]
enum Keys {
    Dense,
    Tokens(Vec<u32>, usize),
    Blocks(Vec<u32>, usize, usize),
}

impl Keys {
    fn of(&self, sh: &Shape, b: usize, t: usize) -> Vec<usize> {
        match self {
            Keys::Dense => (0..=t).collect(),
            Keys::Tokens(idx, k) => idx[(b * sh.seq + t) * k..(b * sh.seq + t + 1) * k]
                .iter()
                .filter(|&&s| s != NONE && (s as usize) <= t)
                .map(|&s| s as usize)
                .collect(),
            Keys::Blocks(idx, block, n) => {
                // Query t's own row of key blocks.
                let mut v: Vec<usize> = idx[(b * sh.seq + t) * n..(b * sh.seq + t + 1) * n]
                    .iter()
                    .filter(|&&kb| kb != NONE && (kb as usize) <= t / block)
                    .flat_map(|&kb| kb as usize * block..((kb as usize + 1) * block).min(t + 1))
                    .collect();
                v.sort_unstable();
                v
            }
        }
    }
}

/// `Σ do·o` and `o` of attention in f64.
fn naive(sh: &Shape, keys: &Keys, q: &[f64], k: &[f64], v: &[f64], d_o: &[f32]) -> (f64, Vec<f64>) {
    let mut o = vec![0.0; q.len()];
    let scale = 1.0 / (sh.d as f64).sqrt();
    for b in 0..sh.batch {
        for h in 0..sh.heads {
            let g = h / (sh.heads / sh.kv);
            for t in 0..sh.seq {
                let qo = ((b * sh.seq + t) * sh.heads + h) * sh.d;
                let ks = keys.of(sh, b, t);
                let sc: Vec<f64> = ks
                    .iter()
                    .map(|&s| {
                        let ko = ((b * sh.seq + s) * sh.kv + g) * sh.d;
                        scale * (0..sh.d).map(|e| q[qo + e] * k[ko + e]).sum::<f64>()
                    })
                    .collect();
                let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
                for (i, &s) in ks.iter().enumerate() {
                    let p = (sc[i] - m).exp() / z;
                    let vo = ((b * sh.seq + s) * sh.kv + g) * sh.d;
                    for e in 0..sh.d {
                        o[qo + e] += p * v[vo + e];
                    }
                }
            }
        }
    }
    (o.iter().zip(d_o).map(|(a, &b)| a * b as f64).sum(), o)
}

fn pattern_tensor(be: &CpuBackend, sh: &Shape, keys: &Keys) -> Option<Tensor<CpuBackend>> {
    match keys {
        Keys::Dense => None,
        Keys::Tokens(idx, k) => Some(Tensor::from_u32(be, idx, &[sh.batch, sh.seq, *k]).unwrap()),
        Keys::Blocks(idx, _, n) => Some(Tensor::from_u32(be, idx, &[sh.batch, sh.seq, *n]).unwrap()),
    }
}

fn pat<'a>(keys: &Keys, t: &'a Option<Tensor<CpuBackend>>) -> Pattern<'a, CpuBackend> {
    match keys {
        Keys::Dense => Pattern::Dense,
        Keys::Tokens(..) => Pattern::Tokens(t.as_ref().unwrap()),
        Keys::Blocks(_, block, _) => Pattern::Blocks { idx: t.as_ref().unwrap(), block: *block },
    }
}

type Run = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);

/// o, lse, dq, dk, dv on the CPU backend.
fn run(sh: &Shape, keys: &Keys, q: &[f32], k: &[f32], v: &[f32], d_o: &[f32], dt: DType) -> Run {
    let be = CpuBackend::new();
    let qs = [sh.batch, sh.seq, sh.heads, sh.d];
    let ks = [sh.batch, sh.seq, sh.kv, sh.d];
    let up = |x: &[f32], s: &[usize]| Tensor::from_f32(&be, x, s, dt).unwrap();
    let (qt, kt, vt, dot) = (up(q, &qs), up(k, &ks), up(v, &ks), up(d_o, &qs));
    let idx = pattern_tensor(&be, sh, keys);
    let mut o = Tensor::from_f32(&be, &vec![f32::NAN; q.len()], &qs, dt).unwrap();
    let mut lse =
        Tensor::from_f32(&be, &vec![f32::NAN; sh.batch * sh.heads * sh.seq], &[sh.batch, sh.heads, sh.seq], DType::F32)
            .unwrap();
    attention::attention(&be, &qt, &kt, &vt, pat(keys, &idx), &mut o, &mut lse).unwrap();
    let mut dq = up(&vec![f32::NAN; q.len()], &qs);
    let mut dk = up(&vec![f32::NAN; k.len()], &ks);
    let mut dv = up(&vec![f32::NAN; k.len()], &ks);
    attention::attention_backward(&be, &qt, &kt, &vt, &o, &lse, &dot, pat(keys, &idx), &mut dq, &mut dk, &mut dv)
        .unwrap();
    let f = |t: &Tensor<CpuBackend>| t.to_f32_vec(&be).unwrap();
    (f(&o), f(&lse), f(&dq), f(&dk), f(&dv))
}

fn inputs(sh: &Shape, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut r = Rng::new(seed);
    let nq = sh.batch * sh.seq * sh.heads * sh.d;
    let nk = sh.batch * sh.seq * sh.kv * sh.d;
    (r.normal_vec(nq), r.normal_vec(nk), r.normal_vec(nk), r.normal_vec(nq))
}

fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    let num: f64 = got.iter().zip(want).map(|(a, b)| (*a as f64 - *b as f64).powi(2)).sum();
    let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    (num / den.max(1e-300)).sqrt()
}

/// Forward against f64, and sampled gradient entries against central differences.
fn check_against_f64(sh: Shape, keys: Keys, seed: u64) {
    let (q, k, v, d_o) = inputs(&sh, seed);
    let (o, _, dq, dk, dv) = run(&sh, &keys, &q, &k, &v, &d_o, DType::F32);
    let f64v = |x: &[f32]| x.iter().map(|&e| e as f64).collect::<Vec<_>>();
    let (q64, k64, v64) = (f64v(&q), f64v(&k), f64v(&v));
    let (_, o64) = naive(&sh, &keys, &q64, &k64, &v64, &d_o);
    let o64f: Vec<f32> = o64.iter().map(|&x| x as f32).collect();
    assert!(rel_err(&o, &o64f) < 1e-5, "forward: relative error {}", rel_err(&o, &o64f));
    let mut rng = Rng::new(seed ^ 99);
    let h = 1e-6;
    for (which, grad) in [(0, &dq), (1, &dk), (2, &dv)] {
        let len = grad.len();
        for _ in 0..25 {
            let i = rng.below(len as u64) as usize;
            let (mut qa, mut ka, mut va) = (q64.clone(), k64.clone(), v64.clone());
            let (mut qb, mut kb, mut vb) = (q64.clone(), k64.clone(), v64.clone());
            match which {
                0 => (qa[i] += h, qb[i] -= h),
                1 => (ka[i] += h, kb[i] -= h),
                _ => (va[i] += h, vb[i] -= h),
            };
            let fd = (naive(&sh, &keys, &qa, &ka, &va, &d_o).0 - naive(&sh, &keys, &qb, &kb, &vb, &d_o).0) / (2.0 * h);
            assert!(
                (grad[i] as f64 - fd).abs() < 1e-4 * (1.0 + fd.abs()),
                "grad {} [{i}]: {} vs finite difference {fd}",
                ["dq", "dk", "dv"][which],
                grad[i]
            );
        }
    }
}

const GQA: Shape = Shape { batch: 2, seq: 70, heads: 4, kv: 2, d: 8 };
const MHA: Shape = Shape { batch: 1, seq: 45, heads: 3, kv: 3, d: 16 };

#[test]
fn dense_attention_matches_f64_and_finite_differences_across_tiles() {
    check_against_f64(GQA, Keys::Dense, 1);
    check_against_f64(MHA, Keys::Dense, 2);
}

fn random_selection(sh: &Shape, seed: u64) -> (Vec<f32>, Vec<u32>, Vec<u32>) {
    let mut r = Rng::new(seed);
    let mut scores = vec![0.0f32; sh.batch * sh.seq * sh.seq];
    for x in scores.iter_mut() {
        *x = (r.below(5)) as f32; // many ties
    }
    let (mut tok, mut blk) = (Vec::new(), Vec::new());
    for b in 0..sh.batch {
        let s = &scores[b * sh.seq * sh.seq..(b + 1) * sh.seq * sh.seq];
        tok.extend(topk_tokens(s, sh.seq, 9));
        blk.extend(topk_blocks(s, sh.seq, 16, 3));
    }
    (scores, tok, blk)
}

#[test]
fn token_and_block_sparse_attention_match_f64_and_finite_differences() {
    for (sh, seed) in [(GQA, 3), (MHA, 4)] {
        let (_, tok, blk) = random_selection(&sh, seed);
        check_against_f64(sh, Keys::Tokens(tok, 9), seed);
        check_against_f64(sh, Keys::Blocks(blk, 16, 3), seed + 10);
    }
}

#[test]
fn sparse_attention_keeping_every_key_equals_dense() {
    for dt in [DType::F32, DType::F16, DType::BF16] {
        let sh = GQA;
        let (q, k, v, d_o) = inputs(&sh, 5);
        let dense = run(&sh, &Keys::Dense, &q, &k, &v, &d_o, dt);
        let all_tokens: Vec<u32> = (0..sh.batch).flat_map(|_| (0..sh.seq).flat_map(|_| 0..sh.seq as u32)).collect();
        let nb = sh.seq.div_ceil(16);
        let all_blocks: Vec<u32> = (0..sh.batch * sh.seq).flat_map(|_| 0..nb as u32).collect();
        for keys in [Keys::Tokens(all_tokens, sh.seq), Keys::Blocks(all_blocks, 16, nb)] {
            let sparse = run(&sh, &keys, &q, &k, &v, &d_o, dt);
            let tol = if dt == DType::F32 { 1e-5 } else { 1e-2 };
            for (name, a, b) in [
                ("o", &sparse.0, &dense.0),
                ("lse", &sparse.1, &dense.1),
                ("dq", &sparse.2, &dense.2),
                ("dk", &sparse.3, &dense.3),
                ("dv", &sparse.4, &dense.4),
            ] {
                assert!(rel_err(a, b) <= tol, "{dt} {name}: relative error {}", rel_err(a, b));
            }
        }
    }
}

#[test]
fn indexer_scores_pooling_and_selection_match_host_semantics() {
    let be = CpuBackend::new();
    let (batch, seq, hi, di, block) = (2, 75, 4, 8, 16);
    let mut r = Rng::new(8);
    let (qi, ki, w) =
        (r.normal_vec(batch * seq * hi * di), r.normal_vec(batch * seq * di), r.normal_vec(batch * seq * hi));
    let up = |x: &[f32], s: &[usize]| Tensor::from_f32(&be, x, s, DType::F32).unwrap();
    let (qt, kt, wt) = (up(&qi, &[batch, seq, hi, di]), up(&ki, &[batch, seq, di]), up(&w, &[batch, seq, hi]));
    let mut scores = Tensor::empty(&be, &[batch, seq, seq], DType::F32).unwrap();
    attention::indexer_scores(&be, &qt, &kt, &wt, &mut scores).unwrap();
    let sc = scores.to_f32_vec(&be).unwrap();
    for b in 0..batch {
        for t in 0..seq {
            for s in 0..seq {
                let got = sc[(b * seq + t) * seq + s];
                if s > t {
                    assert_eq!(got, f32::NEG_INFINITY);
                    continue;
                }
                let want: f64 = (0..hi)
                    .map(|j| {
                        let dot: f64 = (0..di)
                            .map(|e| qi[((b * seq + t) * hi + j) * di + e] as f64 * ki[(b * seq + s) * di + e] as f64)
                            .sum();
                        w[(b * seq + t) * hi + j] as f64 * dot.max(0.0)
                    })
                    .sum();
                assert!((got as f64 - want).abs() < 1e-4 * (1.0 + want.abs()), "I({t},{s}) = {got} vs {want}");
            }
        }
    }
    let nb = seq.div_ceil(block);
    let mut pooled = Tensor::empty(&be, &[batch, seq, nb], DType::F32).unwrap();
    attention::indexer_block_scores(&be, &qt, &kt, &wt, block, &mut pooled).unwrap();
    let pooled_v = pooled.to_f32_vec(&be).unwrap();
    for b in 0..batch {
        let want = pool_blocks(&sc[b * seq * seq..(b + 1) * seq * seq], seq, block);
        assert_eq!(&pooled_v[b * seq * nb..(b + 1) * seq * nb], &want[..], "pooled scores, batch {b}");
    }
    let mut idx = Tensor::empty(&be, &[batch, seq, 7], DType::U32).unwrap();
    attention::select_topk(&be, &scores, 7, 0, &mut idx).unwrap();
    let idx = idx.to_u32_vec(&be).unwrap();
    for b in 0..batch {
        assert_eq!(
            &idx[b * seq * 7..(b + 1) * seq * 7],
            &topk_tokens(&sc[b * seq * seq..(b + 1) * seq * seq], seq, 7)[..]
        );
    }
    // Block mode: each query's own top-3 blocks of its own pooled scores.
    let mut bidx = Tensor::empty(&be, &[batch, seq, 3], DType::U32).unwrap();
    attention::select_topk(&be, &pooled, 3, block, &mut bidx).unwrap();
    let bidx = bidx.to_u32_vec(&be).unwrap();
    for b in 0..batch {
        assert_eq!(
            &bidx[b * seq * 3..(b + 1) * seq * 3],
            &topk_blocks(&sc[b * seq * seq..(b + 1) * seq * seq], seq, block, 3)[..]
        );
    }
}

/// `I(t, s)` in f64.
#[allow(clippy::too_many_arguments)]
fn naive_indexer(
    b: usize,
    seq: usize,
    hi: usize,
    di: usize,
    qi: &[f64],
    ki: &[f64],
    w: &[f64],
    t: usize,
    s: usize,
) -> f64 {
    (0..hi)
        .map(|j| {
            let dot: f64 = (0..di).map(|e| qi[((b * seq + t) * hi + j) * di + e] * ki[(b * seq + s) * di + e]).sum();
            w[(b * seq + t) * hi + j] * dot.max(0.0)
        })
        .sum()
}

#[test]
fn indexer_backward_matches_finite_differences() {
    let be = CpuBackend::new();
    let (batch, seq, hi, di) = (2, 70, 3, 5);
    let mut r = Rng::new(21);
    let (qi, ki, w) =
        (r.normal_vec(batch * seq * hi * di), r.normal_vec(batch * seq * di), r.normal_vec(batch * seq * hi));
    let dsc = r.normal_vec(batch * seq * seq);
    let up = |x: &[f32], s: &[usize]| Tensor::from_f32(&be, x, s, DType::F32).unwrap();
    let (qt, kt, wt) = (up(&qi, &[batch, seq, hi, di]), up(&ki, &[batch, seq, di]), up(&w, &[batch, seq, hi]));
    let dst = up(&dsc, &[batch, seq, seq]);
    let (mut dq, mut dk, mut dw) =
        (up(&qi, &[batch, seq, hi, di]), up(&ki, &[batch, seq, di]), up(&w, &[batch, seq, hi]));
    attention::indexer_backward(&be, &qt, &kt, &wt, &dst, &mut dq, &mut dk, &mut dw).unwrap();
    let grads = [dq.to_f32_vec(&be).unwrap(), dk.to_f32_vec(&be).unwrap(), dw.to_f32_vec(&be).unwrap()];
    let f64v = |x: &[f32]| x.iter().map(|&e| e as f64).collect::<Vec<_>>();
    let base = [f64v(&qi), f64v(&ki), f64v(&w)];
    // L = Σ_{b, t, s ≤ t} dscores·I(t, s)
    let loss = |p: &[Vec<f64>; 3]| -> f64 {
        let mut acc = 0.0;
        for b in 0..batch {
            for t in 0..seq {
                for s in 0..=t {
                    acc +=
                        dsc[(b * seq + t) * seq + s] as f64 * naive_indexer(b, seq, hi, di, &p[0], &p[1], &p[2], t, s);
                }
            }
        }
        acc
    };
    let mut rng = Rng::new(5);
    for which in 0..3 {
        for _ in 0..12 {
            let i = rng.below(base[which].len() as u64) as usize;
            let h = 1e-6;
            let (mut a, mut m) = (base.clone(), base.clone());
            a[which][i] += h;
            m[which][i] -= h;
            let fd = (loss(&a) - loss(&m)) / (2.0 * h);
            let g = grads[which][i] as f64;
            assert!((g - fd).abs() < 1e-3 * (1.0 + fd.abs()), "{} [{i}]: {g} vs {fd}", ["dq_i", "dk_i", "dw"][which]);
        }
    }
}

/// KL loss and its score gradient against f64; a perfect indexer has zero loss.
#[test]
fn indexer_kl_matches_f64_and_vanishes_for_a_perfect_indexer() {
    let be = CpuBackend::new();
    let sh = GQA;
    let (q, k, v, _) = inputs(&sh, 31);
    let (_, _, blk) = random_selection(&sh, 32);
    for keys in [Keys::Dense, Keys::Blocks(blk, 16, 3)] {
        let qs = [sh.batch, sh.seq, sh.heads, sh.d];
        let ks = [sh.batch, sh.seq, sh.kv, sh.d];
        let up = |x: &[f32], s: &[usize]| Tensor::from_f32(&be, x, s, DType::F32).unwrap();
        let (qt, kt, vt) = (up(&q, &qs), up(&k, &ks), up(&v, &ks));
        let idx = pattern_tensor(&be, &sh, &keys);
        let mut o = Tensor::empty(&be, &qs, DType::F32).unwrap();
        let mut lse = Tensor::empty(&be, &[sh.batch, sh.heads, sh.seq], DType::F32).unwrap();
        attention::attention(&be, &qt, &kt, &vt, pat(&keys, &idx), &mut o, &mut lse).unwrap();
        // The head-averaged attention distribution in f64.
        let scale = 1.0 / (sh.d as f64).sqrt();
        let n = sh.seq;
        let mut p = vec![0.0f64; sh.batch * n * n];
        for b in 0..sh.batch {
            for t in 0..n {
                let ks_t = keys.of(&sh, b, t);
                for h in 0..sh.heads {
                    let g = h / (sh.heads / sh.kv);
                    let sc: Vec<f64> = ks_t
                        .iter()
                        .map(|&s| {
                            scale
                                * (0..sh.d)
                                    .map(|e| {
                                        q[((b * n + t) * sh.heads + h) * sh.d + e] as f64
                                            * k[((b * n + s) * sh.kv + g) * sh.d + e] as f64
                                    })
                                    .sum::<f64>()
                        })
                        .collect();
                    let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
                    for (i, &s) in ks_t.iter().enumerate() {
                        p[(b * n + t) * n + s] += (sc[i] - m).exp() / z / sh.heads as f64;
                    }
                }
            }
        }
        let kl = |scores: &[f64]| -> Vec<f64> {
            (0..sh.batch * n)
                .map(|row| {
                    let ks_t = keys.of(&sh, row / n, row % n);
                    let m = ks_t.iter().map(|&s| scores[row * n + s]).fold(f64::NEG_INFINITY, f64::max);
                    let lz = ks_t.iter().map(|&s| (scores[row * n + s] - m).exp()).sum::<f64>().ln() + m;
                    ks_t.iter()
                        .map(|&s| p[row * n + s])
                        .zip(&ks_t)
                        .filter(|(pi, _)| *pi > 0.0)
                        .map(|(pi, &s)| pi * (pi.ln() - (scores[row * n + s] - lz)))
                        .sum()
                })
                .collect()
        };
        let run_kl = |scores: &[f32]| {
            let st = up(scores, &[sh.batch, n, n]);
            let mut loss = Tensor::empty(&be, &[sh.batch, n], DType::F32).unwrap();
            let mut ds = up(&vec![f32::NAN; sh.batch * n * n], &[sh.batch, n, n]);
            attention::indexer_kl(&be, &qt, &kt, &lse, &st, pat(&keys, &idx), &mut loss, &mut ds).unwrap();
            (loss.to_f32_vec(&be).unwrap(), ds.to_f32_vec(&be).unwrap())
        };
        let scores: Vec<f32> = Rng::new(33).normal_vec(sh.batch * n * n);
        let (loss, ds) = run_kl(&scores);
        let s64: Vec<f64> = scores.iter().map(|&x| x as f64).collect();
        let want = kl(&s64);
        for (i, (a, b)) in loss.iter().zip(&want).enumerate() {
            assert!((*a as f64 - b).abs() < 1e-4 * (1.0 + b.abs()), "loss[{i}]: {a} vs {b}");
        }
        let mut rng = Rng::new(34);
        for _ in 0..30 {
            let row = rng.below((sh.batch * n) as u64) as usize;
            let t = row % n;
            let s = rng.below(t as u64 + 1) as usize;
            let i = row * n + s;
            let h = 1e-6;
            let (mut a, mut m) = (s64.clone(), s64.clone());
            a[i] += h;
            m[i] -= h;
            let fd = (kl(&a)[row] - kl(&m)[row]) / (2.0 * h);
            assert!((ds[i] as f64 - fd).abs() < 1e-4, "dscores[{row}, {s}]: {} vs {fd}", ds[i]);
        }
        // scores = ln p on the kept set: the indexer reproduces the attention, KL = 0.
        let perfect: Vec<f32> = p.iter().map(|&x| if x > 0.0 { x.ln() as f32 } else { -60.0 }).collect();
        let (loss, ds) = run_kl(&perfect);
        assert!(loss.iter().all(|l| l.abs() < 1e-4), "max KL {}", loss.iter().cloned().fold(0.0, f32::max));
        assert!(ds.iter().all(|d| d.abs() < 1e-4));
    }
}
