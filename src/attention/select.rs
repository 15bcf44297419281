//! Top-k selection semantics of DSA, as host functions over indexer scores.
//! Every backend's selection kernel must return exactly these sets.
//!
//! Order: by score descending, ties to the smaller key index, NaN as -∞.
//! Output rows are sorted ascending and padded with [`NONE`] when a query has
//! fewer candidates than the budget (the first queries of a causal sequence).

/// Padding for unused slots of a selection row.
pub const NONE: u32 = u32::MAX;

fn better(a: (f32, usize), b: (f32, usize)) -> bool {
    let key = |s: f32| if s.is_nan() { f32::NEG_INFINITY } else { s };
    let (sa, sb) = (key(a.0), key(b.0));
    sa > sb || (sa == sb && a.1 < b.1)
}

/// Indices of the `k` best of `cands` (score, index) pairs, sorted ascending.
fn best(mut cands: Vec<(f32, usize)>, k: usize) -> Vec<u32> {
    cands.sort_by(|&a, &b| {
        if better(a, b) {
            std::cmp::Ordering::Less
        } else if better(b, a) {
            std::cmp::Ordering::Greater
        } else {
            std::cmp::Ordering::Equal
        }
    });
    let mut idx: Vec<u32> = cands.into_iter().take(k).map(|(_, i)| i as u32).collect();
    idx.sort_unstable();
    idx
}

/// The selection of one causal score row whose last candidate is `r`
/// (candidates `0..=r`): the `k` best, sorted ascending, padded with [`NONE`]
/// to `k` entries. In block mode `r` is the query's own block, and the local
/// block `r` and then the sink block 0 are kept first (so `k = 1` keeps the
/// local block only: every query keeps at least itself).
pub fn select_row(row: &[f32], r: usize, k: usize, blocks: bool) -> Vec<u32> {
    let mut kept: Vec<u32> = Vec::with_capacity(k);
    let first = if blocks {
        for forced in [r, 0] {
            if kept.len() < k && !kept.contains(&(forced as u32)) {
                kept.push(forced as u32);
            }
        }
        1
    } else {
        0
    };
    let upto = if blocks { r } else { r + 1 };
    let others = (first..upto.max(first)).map(|s| (row[s], s)).collect();
    kept.extend(best(others, k - kept.len()));
    kept.sort_unstable();
    kept.resize(k, NONE);
    kept
}

/// Token mode. `scores` is `[seq, seq]` row-major (query t, key s; only
/// s ≤ t is read). Returns `[seq, k]`: per query the top-k causal keys.
pub fn topk_tokens(scores: &[f32], seq: usize, k: usize) -> Vec<u32> {
    (0..seq).flat_map(|t| select_row(&scores[t * seq..(t + 1) * seq], t, k, false)).collect()
}

/// Max-pools causal token scores `[seq, seq]` per query into `[seq, nb]`
/// block scores: `P(t, b) = max_{s in b, s ≤ t} I(t, s)` (`-∞` for blocks
/// with no key `≤ t`, i.e. `b > t / block`). Each row uses its own query's
/// scores only, so what query `t` selects depends on tokens `≤ t` alone.
pub fn pool_blocks(scores: &[f32], seq: usize, block: usize) -> Vec<f32> {
    let nb = seq.div_ceil(block);
    let mut pooled = vec![f32::NEG_INFINITY; seq * nb];
    for t in 0..seq {
        for s in 0..=t {
            let v = scores[t * seq + s];
            let p = &mut pooled[t * nb + s / block];
            if !v.is_nan() && v > *p {
                *p = v;
            }
        }
    }
    pooled
}

/// Block mode, per query. Query `t` pools its own scores per key block
/// ([`pool_blocks`]) and keeps its own block `t / block` (local), then the
/// sink block 0, then its best other causal blocks, `n` in all (fewer when
/// fewer blocks exist); `n = 1` keeps the local block only. Returns
/// `[seq, n]` (ascending, padded with [`NONE`]).
pub fn topk_blocks(scores: &[f32], seq: usize, block: usize, n: usize) -> Vec<u32> {
    let nb = seq.div_ceil(block);
    let pooled = pool_blocks(scores, seq, block);
    (0..seq).flat_map(|t| select_row(&pooled[t * nb..(t + 1) * nb], t / block, n, true)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_go_to_the_smaller_index() {
        let seq = 4;
        let scores = vec![1.0; seq * seq];
        let got = topk_tokens(&scores, seq, 2);
        assert_eq!(got, vec![0, NONE, 0, 1, 0, 1, 0, 1]);
    }

    #[test]
    fn k_at_least_the_candidates_keeps_every_causal_key_and_pads() {
        let seq = 3;
        let scores: Vec<f32> = (0..9).map(|v| v as f32).collect();
        assert_eq!(
            topk_tokens(&scores, seq, 5),
            vec![0, NONE, NONE, NONE, NONE, 0, 1, NONE, NONE, NONE, 0, 1, 2, NONE, NONE]
        );
    }

    #[test]
    fn the_causal_edge_is_never_crossed_even_by_huge_future_scores() {
        let seq = 5;
        let mut scores = vec![0.0; seq * seq];
        for t in 0..seq {
            for s in t + 1..seq {
                scores[t * seq + s] = 1e30;
            }
            scores[t * seq] = -1.0; // key 0 is the worst causal key
        }
        let got = topk_tokens(&scores, seq, 2);
        for t in 0..seq {
            for &s in &got[t * 2..t * 2 + 2] {
                assert!(s == NONE || s as usize <= t, "query {t} kept future key {s}");
            }
        }
        assert_eq!(&got[..2], &[0, NONE], "the first query has one candidate");
        assert_eq!(&got[8..10], &[1, 2], "ties among zeros: smallest indices, key 0 scored lower");
    }

    #[test]
    fn blocks_always_keep_sink_and_local_and_handle_a_ragged_tail() {
        let (seq, block) = (10, 3); // blocks 0..=3, the last has one token
        let mut scores = vec![0.0f32; seq * seq];
        scores[9 * seq + 4] = 5.0; // query 9 (block 3) likes key 4 (block 1)
        scores[9 * seq + 7] = 1.0; // and key 7 (block 2) a bit
        let got = topk_blocks(&scores, seq, block, 3);
        assert_eq!(&got[0..3], &[0, NONE, NONE], "query 0: only its own block exists");
        assert_eq!(&got[3 * 3..3 * 3 + 3], &[0, 1, NONE], "query 3 (block 1): local and sink");
        assert_eq!(&got[9 * 3..9 * 3 + 3], &[0, 1, 3], "query 9: sink 0, local 3, best other 1");
        let one = topk_blocks(&scores, seq, block, 1);
        assert_eq!(one, vec![0, 0, 0, 1, 1, 1, 2, 2, 2, 3], "a budget of one keeps the local block");
    }

    #[test]
    fn each_query_selects_from_its_own_scores_only() {
        // Queries 6 and 8 share block 2 but prefer different earlier blocks; a
        // query-block pooled selection would give both the same set (and let
        // query 6 see query 8's preference, a future token).
        let (seq, block) = (9, 3);
        let mut scores = vec![0.0f32; seq * seq];
        scores[6 * seq + 1] = 4.0; // query 6 likes block 0... key 1 is block 0
        scores[6 * seq + 3] = 9.0; // and block 1 most
        scores[8 * seq + 1] = 9.0; // query 8 likes block 0 most (the sink anyway)
        let got = topk_blocks(&scores, seq, block, 2);
        assert_eq!(&got[6 * 2..6 * 2 + 2], &[0, 2], "n = 2: local and sink only");
        let got = topk_blocks(&scores, seq, block, 3);
        assert_eq!(&got[6 * 3..6 * 3 + 3], &[0, 1, 2]);
        // Changing query 8's scores (a future query for 6) leaves query 6 alone.
        let mut other = scores.clone();
        other[8 * seq + 4] = 100.0;
        other[8 * seq + 3] = -100.0;
        let (a, b) = (topk_blocks(&scores, seq, block, 2), topk_blocks(&other, seq, block, 2));
        assert_eq!(&a[..8 * 2], &b[..8 * 2]);
    }

    #[test]
    fn pooling_is_per_query_and_causal() {
        let (seq, block) = (5, 2);
        let scores: Vec<f32> = (0..seq * seq).map(|i| i as f32).collect();
        let p = pool_blocks(&scores, seq, block);
        let nb = 3;
        let ninf = f32::NEG_INFINITY;
        // Query 2 sees keys 0..=2: block 0 = max(10, 11), block 1 = 12 (key 3 is future).
        assert_eq!(&p[2 * nb..3 * nb], &[11.0, 12.0, ninf]);
        assert_eq!(&p[0..nb], &[0.0, ninf, ninf]);
        assert_eq!(&p[4 * nb..5 * nb], &[21.0, 23.0, 24.0]);
    }
}
