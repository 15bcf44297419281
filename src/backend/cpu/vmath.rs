//! Branch-free `exp` and the functions built on it, written so that a loop
//! over a slice vectorises (no libm call in the loop body): SSE2 on any
//! x86-64, wider where the build enables it.

/// `e^x` within 2 ulp for `x` in `[-87, 88]`; inputs are clamped to that
/// range (so `-∞` gives `e^-87 ≈ 1.6e-38` and `+∞` `e^88`, not 0 and ∞:
/// callers use it where both ends are harmless).
///
/// `x = n·ln2 + r` with `n` rounded to nearest (the `1.5·2²³` trick, which
/// needs no SSE4.1 `round`), `|r| ≤ ln2/2`, `e^r` by its degree-7 Taylor
/// polynomial (truncation `|r|⁸/8! < 6e-9`), and `2ⁿ` assembled from the
/// exponent bits; `ln2` is split in two so `n·ln2` is exact.
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5·2²³
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::exp;

    #[test]
    fn exp_is_within_two_ulp_of_f64_over_its_range() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let (got, want) = (exp(x) as f64, (x as f64).exp());
            let ulp = (want as f32).abs() as f64 * f32::EPSILON as f64;
            worst = worst.max((got - want).abs() / ulp);
            x += 0.000_731;
        }
        assert!(worst <= 2.0, "exp: worst error {worst:.2} ulp");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::NEG_INFINITY) < 1e-37 && exp(f32::INFINITY).is_finite());
    }
}
