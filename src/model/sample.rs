//! Choosing the next token from logits: greedy, or sampled with temperature,
//! top-k and top-p (nucleus), from a seeded RNG.

use crate::util::rng::Rng;

/// Sampling settings; `temperature == 0` is greedy.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches `top_p` (1: all).
    pub top_p: f32,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling { temperature: 0.8, top_k: 40, top_p: 0.95 }
    }
}

/// The next token: argmax (ties to the smaller id) when greedy, else a draw.
pub fn next_token(logits: &[f32], s: &Sampling, rng: &mut Rng) -> u32 {
    let argmax = || logits.iter().enumerate().fold(0, |b, (i, &x)| if x > logits[b] { i } else { b }) as u32;
    if s.temperature <= 0.0 {
        return argmax();
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if s.top_k > 0 {
        order.truncate(s.top_k);
    }
    let max = logits[order[0]];
    let mut probs: Vec<f64> = order.iter().map(|&i| (((logits[i] - max) / s.temperature) as f64).exp()).collect();
    let z: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= z);
    let mut keep = probs.len();
    let mut acc = 0.0;
    for (i, p) in probs.iter().enumerate() {
        acc += p;
        if acc >= s.top_p as f64 {
            keep = i + 1;
            break;
        }
    }
    let z: f64 = probs[..keep].iter().sum();
    let mut u = rng.uniform() * z;
    for (i, p) in probs[..keep].iter().enumerate() {
        u -= p;
        if u <= 0.0 {
            return order[i] as u32;
        }
    }
    order[keep - 1] as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_argmax_and_top_k_one_agrees() {
        let l = [0.1, 2.0, 2.0, -1.0];
        let mut r = Rng::new(1);
        assert_eq!(next_token(&l, &Sampling { temperature: 0.0, ..Default::default() }, &mut r), 1);
        let s = Sampling { temperature: 1.0, top_k: 1, top_p: 1.0 };
        assert!((0..50).all(|_| next_token(&l, &s, &mut r) == 1));
    }

    #[test]
    fn top_p_drops_the_tail_and_sampling_follows_the_distribution() {
        let l = [3.0f32, 3.0, -10.0, -10.0];
        let s = Sampling { temperature: 1.0, top_k: 0, top_p: 0.9 };
        let mut r = Rng::new(2);
        let draws: Vec<u32> = (0..2000).map(|_| next_token(&l, &s, &mut r)).collect();
        assert!(draws.iter().all(|&t| t < 2), "the tail is cut");
        let ones = draws.iter().filter(|&&t| t == 1).count();
        assert!((800..1200).contains(&ones), "two equal logits are drawn about equally: {ones}");
        let mut a = Rng::new(5);
        let mut b = Rng::new(5);
        assert_eq!(next_token(&l, &s, &mut a), next_token(&l, &s, &mut b), "seeded");
    }
}
