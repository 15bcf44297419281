//! The progressive sparsity schedule of DSA training (three phases):
//!
//! 1. **dense warm-up** for the first `warmup` fraction of steps (default 10%):
//!    full causal attention; the indexer learns from the dense attention;
//! 2. **ramp** over the next `ramp` fraction (default 30%): sparse attention
//!    whose kept fraction falls linearly from `ramp_start_keep` (default 90%)
//!    to the target budget;
//! 3. **fixed** for the rest (default 60%): the target budget.
//!
//! The budget is either `k` tokens per query or `n` key blocks of `block`
//! tokens per query; [`SparsitySchedule::plan`] turns a step and a
//! sequence length into "dense, or keep this many".

use crate::error::{Error, Result};

/// What sparse attention keeps per query (top-k tokens, or top-n key blocks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Budget {
    /// Top-k keys per query.
    Tokens(usize),
    /// Top-n key blocks of `block` tokens per query.
    Blocks { block: usize, n: usize },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    DenseWarmup,
    Ramp,
    Fixed,
}

/// The attention to run at one step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Plan {
    pub phase: Phase,
    /// Run dense causal attention (warm-up), ignoring `keep`.
    pub dense: bool,
    /// Fraction of the candidates kept (1.0 when dense).
    pub keep_fraction: f64,
    /// Tokens (token mode) or blocks (block mode) kept per query / query block.
    pub keep: usize,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SparsitySchedule {
    pub total_steps: u64,
    /// Fraction of steps of dense warm-up.
    pub warmup: f64,
    /// Fraction of steps of the linear ramp that follows.
    pub ramp: f64,
    /// Kept fraction at the start of the ramp.
    pub ramp_start_keep: f64,
    pub budget: Budget,
}

impl SparsitySchedule {
    /// The defaults of the DSA recipe: 10% dense, 30% ramp from 90% kept, 60% fixed.
    pub fn new(total_steps: u64, budget: Budget) -> Result<Self> {
        SparsitySchedule { total_steps, warmup: 0.1, ramp: 0.3, ramp_start_keep: 0.9, budget }.validated()
    }

    /// Checks the settings; every user-supplied schedule goes through here.
    pub fn validated(self) -> Result<Self> {
        let bad = |m: String| Err(Error::Invalid(format!("sparsity schedule: {m}")));
        if !(0.0..=1.0).contains(&self.warmup) || !(0.0..=1.0).contains(&self.ramp) || self.warmup + self.ramp > 1.0 {
            return bad(format!(
                "warm-up {} and ramp {} must be fractions summing to at most 1",
                self.warmup, self.ramp
            ));
        }
        if !(self.ramp_start_keep > 0.0 && self.ramp_start_keep <= 1.0) {
            return bad(format!("ramp start keep {} must be in (0, 1]", self.ramp_start_keep));
        }
        match self.budget {
            Budget::Tokens(0) => return bad("a token budget of 0 keeps nothing".into()),
            Budget::Blocks { block: 0, .. } | Budget::Blocks { n: 0, .. } => {
                return bad("block size and block budget must be positive".into());
            }
            _ => {}
        }
        Ok(self)
    }

    /// Candidates for the last query of a `seq_len` sequence, and the target keep count.
    fn counts(&self, seq_len: usize) -> (usize, usize) {
        match self.budget {
            Budget::Tokens(k) => (seq_len, k.min(seq_len)),
            Budget::Blocks { block, n } => {
                let blocks = seq_len.div_ceil(block);
                (blocks, n.min(blocks))
            }
        }
    }

    /// The plan at 0-based `step` for sequences of `seq_len` tokens.
    pub fn plan(&self, step: u64, seq_len: usize) -> Plan {
        let t = if self.total_steps == 0 { 1.0 } else { step as f64 / self.total_steps as f64 };
        let (cands, target) = self.counts(seq_len.max(1));
        let target_frac = target as f64 / cands as f64;
        if t < self.warmup {
            return Plan { phase: Phase::DenseWarmup, dense: true, keep_fraction: 1.0, keep: cands };
        }
        let (phase, frac) = if t < self.warmup + self.ramp {
            let p = (t - self.warmup) / self.ramp;
            let start = self.ramp_start_keep.max(target_frac);
            (Phase::Ramp, start + (target_frac - start) * p)
        } else {
            (Phase::Fixed, target_frac)
        };
        let keep = ((frac * cands as f64).ceil() as usize).clamp(target, cands);
        Plan { phase, dense: false, keep_fraction: keep as f64 / cands as f64, keep }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_phases_at_their_default_boundaries() {
        let s = SparsitySchedule::new(1000, Budget::Tokens(256)).unwrap();
        let seq = 2048;
        assert_eq!(s.plan(0, seq).phase, Phase::DenseWarmup);
        assert!(s.plan(99, seq).dense);
        let first = s.plan(100, seq);
        assert_eq!((first.phase, first.dense), (Phase::Ramp, false));
        assert_eq!(first.keep, (0.9f64 * 2048.0).ceil() as usize, "the ramp starts at 90% kept");
        assert_eq!(s.plan(399, seq).phase, Phase::Ramp);
        let fixed = s.plan(400, seq);
        assert_eq!((fixed.phase, fixed.keep), (Phase::Fixed, 256));
        assert_eq!(s.plan(999, seq).keep, 256);
    }

    #[test]
    fn ramp_is_monotone_and_lands_on_the_target() {
        let s = SparsitySchedule::new(500, Budget::Blocks { block: 64, n: 8 }).unwrap();
        let seq = 4000; // 63 blocks, not a multiple of the block size
        let keeps: Vec<usize> = (0..500).map(|t| s.plan(t, seq).keep).collect();
        assert!(keeps.windows(2).all(|w| w[1] <= w[0]), "kept count never grows");
        assert_eq!(keeps[0], 63);
        assert_eq!(*keeps.last().unwrap(), 8);
    }

    #[test]
    fn budget_larger_than_the_sequence_keeps_everything() {
        let s = SparsitySchedule::new(10, Budget::Tokens(4096)).unwrap();
        let p = s.plan(9, 100);
        assert_eq!((p.keep, p.keep_fraction), (100, 1.0));
    }

    #[test]
    fn bad_settings_are_errors() {
        let mut s = SparsitySchedule::new(10, Budget::Tokens(4)).unwrap();
        s.warmup = 0.8;
        assert!(s.validated().is_err());
        assert!(SparsitySchedule::new(10, Budget::Tokens(0)).is_err());
        assert!(SparsitySchedule::new(10, Budget::Blocks { block: 0, n: 2 }).is_err());
    }
}
