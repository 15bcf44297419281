//! Training data: a byte-level tokenizer (vocab 256), the embedded default
//! corpus with long-range dependencies, text files, and a seeded batch sampler.

pub mod synthetic;

use std::ops::Range;
use std::path::Path;

use crate::error::{Error, Result};
use crate::util::files::{max_read_bytes, read_regular};
use crate::util::rng::Rng;

/// The byte-level tokenizer's vocabulary size.
pub const BYTE_VOCAB: usize = 256;

/// A token stream with, optionally, the spans whose prediction needs
/// retrieval from far back in the context (the answers of the synthetic task).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Corpus {
    pub tokens: Vec<u8>,
    /// Answer spans (token ranges) and where their fact was stated (token index).
    pub answers: Vec<(Range<usize>, usize)>,
    /// Where each document starts.
    pub doc_starts: Vec<usize>,
}

impl Corpus {
    /// Reads a UTF-8 text file as bytes (one token per byte).
    pub fn from_file(path: &Path) -> Result<Self> {
        // Training copies the corpus once more when splitting it: a quarter of the free memory at most.
        let bytes = read_regular(path, "data file", max_read_bytes() / 2)?;
        if let Err(e) = std::str::from_utf8(&bytes) {
            return Err(Error::Format(format!(
                "data file {} is not UTF-8 text (invalid byte at offset {})",
                path.display(),
                e.valid_up_to()
            )));
        }
        if bytes.len() < 64 {
            return Err(Error::Format(format!(
                "data file {} has {} bytes; at least 64 are needed",
                path.display(),
                bytes.len()
            )));
        }
        Ok(Corpus { tokens: bytes, answers: Vec::new(), doc_starts: vec![0] })
    }

    /// Splits into (train, validation) at a document boundary near `1 - val_frac`.
    pub fn split(&self, val_frac: f64) -> (Corpus, Corpus) {
        let want = ((1.0 - val_frac) * self.tokens.len() as f64) as usize;
        let cut = self.doc_starts.iter().copied().filter(|&d| d > 0 && d <= want).max().unwrap_or(want);
        let cut = if cut < self.tokens.len() / 2 { want } else { cut };
        let part = |r: Range<usize>| Corpus {
            tokens: self.tokens[r.clone()].to_vec(),
            answers: self
                .answers
                .iter()
                .filter(|(a, fact)| r.contains(&a.start) && a.end <= r.end && r.contains(fact))
                .map(|(a, fact)| (a.start - r.start..a.end - r.start, fact - r.start))
                .collect(),
            doc_starts: self.doc_starts.iter().filter(|&&d| r.contains(&d)).map(|d| d - r.start).collect(),
        };
        (part(0..cut), part(cut..self.tokens.len()))
    }

    /// Unigram entropy of the tokens in nats: the loss of a model that ignores context.
    pub fn unigram_entropy(&self) -> f64 {
        let mut counts = [0usize; BYTE_VOCAB];
        for &t in &self.tokens {
            counts[t as usize] += 1;
        }
        let n = self.tokens.len() as f64;
        counts.iter().filter(|&&c| c > 0).map(|&c| -(c as f64 / n) * (c as f64 / n).ln()).sum()
    }
}

/// Draws (input, target) windows of `seq + 1` consecutive tokens at random
/// offsets; its whole state is an RNG state, so a resumed run draws the same batches.
#[derive(Clone, Debug)]
pub struct Batcher {
    pub rng: Rng,
}

impl Batcher {
    pub fn new(seed: u64) -> Self {
        Batcher { rng: Rng::new(seed) }
    }

    /// `batch` windows: ids and next-token targets, each `batch·seq` long.
    pub fn sample(&mut self, corpus: &Corpus, batch: usize, seq: usize) -> Result<(Vec<u32>, Vec<u32>)> {
        if corpus.tokens.len() < seq + 1 {
            return Err(Error::Invalid(format!(
                "the data has {} tokens, fewer than one window of {} (lower --seq)",
                corpus.tokens.len(),
                seq + 1
            )));
        }
        let (mut ids, mut tg) = (Vec::with_capacity(batch * seq), Vec::with_capacity(batch * seq));
        for _ in 0..batch {
            let start = self.rng.below((corpus.tokens.len() - seq) as u64) as usize;
            let w = &corpus.tokens[start..start + seq + 1];
            ids.extend(w[..seq].iter().map(|&b| b as u32));
            tg.extend(w[1..].iter().map(|&b| b as u32));
        }
        Ok((ids, tg))
    }
}

/// Evaluation windows: consecutive, non-overlapping `seq + 1` windows covering the corpus.
pub fn eval_windows(corpus: &Corpus, seq: usize, max_windows: usize) -> Vec<Range<usize>> {
    (0..corpus.tokens.len().saturating_sub(seq + 1)).step_by(seq).take(max_windows).map(|s| s..s + seq + 1).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_utf8_and_missing_files_are_clear_errors() {
        let dir = std::env::temp_dir().join(format!("dynsparse-data-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("bad.txt");
        std::fs::write(&p, [0x66, 0x6f, 0xff, 0xfe]).unwrap();
        let e = Corpus::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("not UTF-8") && e.contains("offset 2"), "{e}");
        let e = Corpus::from_file(&dir.join("missing.txt")).unwrap_err().to_string();
        assert!(e.contains("missing.txt"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn batches_are_shifted_windows_and_reproducible() {
        let c = Corpus { tokens: (0..=255u8).cycle().take(5000).collect(), ..Default::default() };
        let mut a = Batcher::new(1);
        let (ids, tg) = a.sample(&c, 3, 10).unwrap();
        for i in 0..30 {
            assert_eq!((ids[i] + 1) % 256, tg[i]);
        }
        let mut b = Batcher::new(1);
        assert_eq!(b.sample(&c, 3, 10).unwrap().0, ids);
    }
}
