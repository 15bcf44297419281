//! The embedded default corpus: documents whose end can only be predicted by
//! retrieving facts stated hundreds of bytes earlier.
//!
//! Each document states key–value records, then filler prose from a small
//! grammar, then queries for some of the keys:
//!
//! ```text
//! key qzx: amber. key mlt: cedar. ...
//! the silent river follows a narrow road. ...
//! ask qzx: amber. ask mlt: cedar.
//! ```
//!
//! The value after `ask KEY: ` is an *answer span*: with the record in the
//! context a model can copy it; without it, it can only guess among the value
//! words. What sparse attention keeps or loses is measured by the accuracy on
//! these spans.

use super::Corpus;
use crate::util::rng::Rng;

const VALUES: [&str; 32] = [
    "amber", "cedar", "delta", "ember", "fable", "grove", "haven", "ivory", "jasper", "karma", "lemon", "maple",
    "noble", "olive", "pearl", "quartz", "raven", "sable", "tulip", "umber", "velvet", "willow", "xenon", "yarrow",
    "zephyr", "basil", "coral", "dune", "flint", "honey", "iris", "juniper",
];
const ADJ: [&str; 12] =
    ["silent", "old", "narrow", "bright", "distant", "quiet", "green", "cold", "hidden", "long", "small", "wild"];
const NOUN: [&str; 12] =
    ["river", "road", "mill", "tower", "field", "bridge", "forest", "harbor", "valley", "garden", "market", "stone"];
const VERB: [&str; 10] =
    ["follows", "crosses", "passes", "faces", "guards", "reaches", "circles", "leaves", "meets", "joins"];

/// Settings of the generator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyntheticConfig {
    /// Records per document.
    pub records: usize,
    /// Queries per document (of distinct recorded keys).
    pub queries: usize,
    /// Filler sentences between records and queries.
    pub filler_sentences: usize,
}

impl Default for SyntheticConfig {
    /// Documents of about 450 bytes: the records sit 250–400 bytes before their queries.
    fn default() -> Self {
        SyntheticConfig { records: 6, queries: 4, filler_sentences: 7 }
    }
}

/// Generates documents until the corpus holds at least `n_bytes` tokens.
pub fn generate(seed: u64, n_bytes: usize, cfg: SyntheticConfig) -> Corpus {
    let mut rng = Rng::new(seed);
    let mut c = Corpus::default();
    let pick = |rng: &mut Rng, xs: &[&'static str]| xs[rng.below(xs.len() as u64) as usize];
    while c.tokens.len() < n_bytes {
        c.doc_starts.push(c.tokens.len());
        let mut facts: Vec<(String, &str, usize)> = Vec::new();
        while facts.len() < cfg.records {
            let key: String = (0..3).map(|_| (b'a' + rng.below(26) as u8) as char).collect();
            if facts.iter().any(|(k, _, _)| *k == key) {
                continue;
            }
            let at = c.tokens.len();
            let value = pick(&mut rng, &VALUES);
            c.tokens.extend_from_slice(format!("key {key}: {value}. ").as_bytes());
            facts.push((key, value, at));
        }
        c.tokens.push(b'\n');
        for _ in 0..cfg.filler_sentences {
            let s = format!(
                "the {} {} {} a {} {}. ",
                pick(&mut rng, &ADJ),
                pick(&mut rng, &NOUN),
                pick(&mut rng, &VERB),
                pick(&mut rng, &ADJ),
                pick(&mut rng, &NOUN)
            );
            c.tokens.extend_from_slice(s.as_bytes());
        }
        c.tokens.push(b'\n');
        let mut order: Vec<usize> = (0..facts.len()).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        for &fi in order.iter().take(cfg.queries) {
            let (key, value, at) = &facts[fi];
            c.tokens.extend_from_slice(format!("ask {key}: ").as_bytes());
            let start = c.tokens.len();
            c.tokens.extend_from_slice(value.as_bytes());
            c.answers.push((start..c.tokens.len(), *at));
            c.tokens.extend_from_slice(b". ");
        }
        c.tokens.push(b'\n');
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_repeat_a_value_stated_earlier_in_the_same_document() {
        let c = generate(7, 20_000, SyntheticConfig::default());
        assert!(c.tokens.len() >= 20_000 && c.answers.len() > 100);
        let text = String::from_utf8(c.tokens.clone()).unwrap();
        for (span, fact) in &c.answers {
            let value = &text[span.clone()];
            let record = &text[*fact..];
            assert!(record.starts_with("key "), "fact points at a record");
            let stated = record.split(": ").nth(1).unwrap().split('.').next().unwrap();
            assert_eq!(stated, value);
            assert!(span.start - fact > 150, "the answer is far from its fact");
            let doc = c.doc_starts.iter().filter(|&&d| d <= *fact).max().unwrap();
            assert!(c.doc_starts.iter().all(|&d| d <= *doc || d > span.start), "same document");
        }
        assert_eq!(generate(7, 20_000, SyntheticConfig::default()), c, "deterministic");
    }
}
