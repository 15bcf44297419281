//! Text generation through the KV cache: prefill the prompt, then decode one
//! byte-token at a time, streaming bytes out at valid UTF-8 boundaries and
//! stopping at `max_tokens`, a stop string, the context's end, or when the
//! sink says the reader has gone.

use std::time::Instant;

use super::Model;
use super::infer::{InferState, KvCache, Row};
use super::sample::{Sampling, next_token};
use crate::Backend;
use crate::error::{Error, Result};
use crate::util::rng::Rng;

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub sampling: Sampling,
    pub max_tokens: usize,
    pub seed: u64,
    /// Generation stops before the first occurrence of any of these (which is not emitted).
    pub stop: Vec<String>,
    /// Prefill chunk (rows per step).
    pub chunk: usize,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions { sampling: Sampling::default(), max_tokens: 200, seed: 0, stop: Vec::new(), chunk: 512 }
    }
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    MaxTokens,
    StopString,
    /// The cache (the model's context) is full.
    Context,
    /// The sink returned `false` (e.g. a closed pipe).
    Closed,
}

/// Timings of one generation.
#[derive(Clone, Copy, Debug)]
pub struct GenerateStats {
    pub prompt_tokens: usize,
    pub generated: usize,
    pub prefill_secs: f64,
    pub decode_secs: f64,
    pub stop: StopReason,
}

impl GenerateStats {
    pub fn prefill_tps(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_secs.max(1e-9)
    }
    pub fn decode_tps(&self) -> f64 {
        self.generated as f64 / self.decode_secs.max(1e-9)
    }
}

/// Holds back the bytes that may still turn into a stop string or that end
/// inside a UTF-8 character; releases the rest. Shared by [`Model::generate`]
/// and the server, so a stream stops and splits text the same way in both.
#[derive(Clone, Debug)]
pub struct Streamer {
    pending: Vec<u8>,
    stop: Vec<String>,
}

impl Streamer {
    /// A streamer that ends the text before the first of `stop` (empty strings are ignored).
    pub fn new(stop: &[String]) -> Self {
        Streamer { pending: Vec::new(), stop: stop.iter().filter(|s| !s.is_empty()).cloned().collect() }
    }

    /// Adds `byte`; returns the bytes safe to emit (whole UTF-8 characters),
    /// and whether a stop string completed (then nothing more may be pushed).
    pub fn push(&mut self, byte: u8) -> (Vec<u8>, bool) {
        self.pending.push(byte);
        if let Some(at) = self.stop.iter().filter_map(|s| find(&self.pending, s.as_bytes())).min() {
            self.pending.truncate(at);
            return (utf8_prefix(&mut self.pending, true), true);
        }
        // Keep the longest suffix that is a proper prefix of a stop string.
        let pending = &self.pending;
        let keep = self
            .stop
            .iter()
            .flat_map(|s| (1..s.len()).filter(move |&n| pending.ends_with(&s.as_bytes()[..n])))
            .max()
            .unwrap_or(0);
        let mut head: Vec<u8> = self.pending.drain(..self.pending.len() - keep).collect();
        let out = utf8_prefix(&mut head, false);
        // What utf8_prefix left (an unfinished character) goes back in front.
        head.extend_from_slice(&self.pending);
        self.pending = head;
        (out, false)
    }

    /// Everything still held (at the end of generation), as whole characters.
    pub fn finish(&mut self) -> Vec<u8> {
        utf8_prefix(&mut self.pending, true)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Takes the longest prefix of `buf` made of whole UTF-8 characters (all of
/// it, lossily repaired, when `all` or when an invalid sequence would never
/// complete) and leaves the rest in `buf`.
fn utf8_prefix(buf: &mut Vec<u8>, all: bool) -> Vec<u8> {
    match std::str::from_utf8(buf) {
        Ok(_) => std::mem::take(buf),
        Err(e) if !all && e.error_len().is_none() => {
            let rest = buf.split_off(e.valid_up_to());
            std::mem::replace(buf, rest)
        }
        Err(_) => String::from_utf8_lossy(&std::mem::take(buf)).into_owned().into_bytes(),
    }
}

impl<B: Backend> Model<B> {
    /// Generates from `prompt` (bytes = tokens) with a fresh one-sequence
    /// KV cache of the model's context, calling `sink` with each chunk of
    /// output bytes (whole UTF-8 characters; the prompt is not echoed).
    /// `sink` returns `Ok(false)` to stop early.
    pub fn generate(
        &self,
        be: &B,
        prompt: &[u8],
        opts: &GenerateOptions,
        mut sink: impl FnMut(&[u8]) -> Result<bool>,
    ) -> Result<GenerateStats> {
        if prompt.is_empty() {
            return Err(Error::Invalid("generate: the prompt must not be empty".into()));
        }
        let ctx = self.cfg.context;
        if prompt.len() >= ctx {
            return Err(Error::Invalid(format!(
                "generate: the prompt has {} tokens but the model's context is {ctx}: no room to generate",
                prompt.len()
            )));
        }
        let mut cache = KvCache::new(be, self, 1, ctx)?;
        let mut st = InferState::default();
        let mut rng = Rng::new(opts.seed);
        let toks: Vec<u32> = prompt.iter().map(|&b| b as u32).collect();
        let t0 = Instant::now();
        let logits = self.prefill(be, &mut cache, &mut st, 0, &toks, opts.chunk)?;
        let prefill_secs = t0.elapsed().as_secs_f64();
        let v = self.cfg.vocab;
        let mut last = logits[logits.len() - v..].to_vec();
        let mut streamer = Streamer::new(&opts.stop);
        let (mut generated, mut stop) = (0, StopReason::MaxTokens);
        let t1 = Instant::now();
        while generated < opts.max_tokens {
            if let Some(i) = last.iter().position(|x| !x.is_finite()) {
                return Err(Error::NonFinite(format!(
                    "generation stopped after {generated} tokens: logit {i} is {} (the weights overflow in {})",
                    last[i], self.dtype
                )));
            }
            let t = next_token(&last, &opts.sampling, &mut rng);
            generated += 1;
            let (out, hit) = streamer.push(t as u8);
            if !out.is_empty() && !sink(&out)? {
                stop = StopReason::Closed;
                break;
            }
            if hit {
                stop = StopReason::StopString;
                break;
            }
            if generated == opts.max_tokens {
                break;
            }
            if cache.len(0) >= ctx {
                stop = StopReason::Context;
                break;
            }
            last = self.step(be, &mut cache, &mut st, &[Row { slot: 0, token: t }], self.inference_attention())?;
        }
        let decode_secs = t1.elapsed().as_secs_f64();
        if stop != StopReason::Closed {
            let rest = streamer.finish();
            if !rest.is_empty() && !sink(&rest)? {
                stop = StopReason::Closed;
            }
        }
        Ok(GenerateStats { prompt_tokens: prompt.len(), generated, prefill_secs, decode_secs, stop })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(bytes: &[u8], stop: &[&str]) -> (Vec<u8>, bool) {
        let stop: Vec<String> = stop.iter().map(|s| s.to_string()).collect();
        let mut s = Streamer::new(&stop);
        let mut out = Vec::new();
        for &b in bytes {
            let (o, hit) = s.push(b);
            out.extend(o);
            if hit {
                return (out, true);
            }
        }
        out.extend(s.finish());
        (out, false)
    }

    #[test]
    fn stop_strings_end_the_output_before_them_even_across_pushes() {
        assert_eq!(run(b"hello. world", &[". "]), (b"hello".to_vec(), true));
        assert_eq!(run(b"a.b. c", &[". "]), (b"a.b".to_vec(), true));
        assert_eq!(run(b"no stop here", &["xyz"]), (b"no stop here".to_vec(), false));
        // A partial match at the end is released when generation ends.
        assert_eq!(run(b"abx", &["xyz"]), (b"abx".to_vec(), false));
    }

    #[test]
    fn multibyte_characters_are_never_split_between_chunks() {
        let text = "zé→ü".as_bytes();
        let stop: Vec<String> = Vec::new();
        let mut s = Streamer::new(&stop);
        let mut chunks = Vec::new();
        for &b in text {
            let (o, _) = s.push(b);
            if !o.is_empty() {
                assert!(std::str::from_utf8(&o).is_ok(), "chunk {o:?} is not valid UTF-8");
                chunks.push(o);
            }
        }
        assert!(s.finish().is_empty());
        assert_eq!(chunks.concat(), text);
        assert_eq!(chunks.len(), 4, "one chunk per character");
    }

    #[test]
    fn invalid_bytes_are_repaired_instead_of_held_forever() {
        let (out, _) = run(&[b'a', 0xff, b'b'], &[]);
        assert_eq!(String::from_utf8(out).unwrap(), "a\\u{fffd}b".replace("\\u{fffd}", "\u{fffd}"));
    }
}
