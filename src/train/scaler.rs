//! Dynamic loss scaling with PyTorch `GradScaler` semantics.
//!
//! The scale is constant within one optimizer step (all micro-batches); after
//! the step's single finite check: an inf/NaN gradient skips the step, halves
//! the scale and resets the clean-step counter; `growth_interval` consecutive
//! clean steps double it (never to infinity).

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossScaler {
    pub scale: f32,
    pub growth_interval: u32,
    /// Clean steps since the last change.
    pub good_steps: u32,
    /// Scaling on (f16); off, the scale stays 1 and only the skip remains.
    pub enabled: bool,
}

impl LossScaler {
    /// 2^16, ×2 every 2000 clean steps (PyTorch's defaults).
    pub fn new(enabled: bool) -> Self {
        LossScaler { scale: if enabled { 65536.0 } else { 1.0 }, growth_interval: 2000, good_steps: 0, enabled }
    }

    /// Records the outcome of one step's finite check; returns whether the
    /// optimizer step must be skipped.
    pub fn update(&mut self, found_inf: bool) -> bool {
        if !self.enabled {
            return found_inf;
        }
        if found_inf {
            self.scale *= 0.5;
            self.good_steps = 0;
            return true;
        }
        self.good_steps += 1;
        if self.good_steps >= self.growth_interval {
            let grown = self.scale * 2.0;
            if grown.is_finite() {
                self.scale = grown;
            }
            self.good_steps = 0;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_halves_and_skips_and_exact_interval_doubles() {
        let mut s = LossScaler { growth_interval: 3, ..LossScaler::new(true) };
        assert!(!s.update(false));
        assert!(!s.update(false));
        assert_eq!(s.scale, 65536.0, "two clean steps are not enough");
        assert!(!s.update(false));
        assert_eq!((s.scale, s.good_steps), (131072.0, 0), "the third doubles");
        assert!(!s.update(false));
        assert!(s.update(true), "an overflow skips the step");
        assert_eq!((s.scale, s.good_steps), (65536.0, 0), "halved, counter reset");
        for _ in 0..2 {
            s.update(false);
        }
        assert_eq!(s.scale, 65536.0, "the counter restarted after the overflow");
    }

    #[test]
    fn scale_never_grows_to_infinity() {
        let mut s = LossScaler { scale: f32::MAX, growth_interval: 1, ..LossScaler::new(true) };
        s.update(false);
        assert_eq!(s.scale, f32::MAX);
    }

    #[test]
    fn disabled_scaler_keeps_one_but_still_skips_non_finite_steps() {
        let mut s = LossScaler::new(false);
        assert!(s.update(true));
        assert_eq!(s.scale, 1.0);
        assert!(!s.update(false));
    }
}
