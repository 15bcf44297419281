//! Vectorised `exp` and the row kernels built on it (softmax rows, GELU
//! forward/backward), in the three variants of [`Simd`]: AVX-512F + FMA
//! (16 lanes, masked tails), AVX2 + FMA (8 lanes, the tail through a padded
//! stack buffer) and portable Rust (scalar code in loops LLVM vectorises for
//! the baseline SSE2). Each kernel takes the variant so tests can run all of
//! them in one process; callers pass [`simd()`](super::simd::simd).
//!
//! `exp(x)`, every variant: `x = n·ln2 + r`, `n = round(x·log₂e)`,
//! `|r| ≤ ln2/2` (ln2 split in a 9-bit head and a tail, so `n·ln2_hi` is
//! exact), `e^r ≈ 1 + r + r²·P(r)` with Cephes' degree-5 minimax `P`
//! (relative error 4.2e-9 on the interval), and `2ⁿ` built from exponent
//! bits. Range: `x < -87.3` gives 0 (the true value is below the smallest
//! normal f32, 1.18e-38, so the absolute error is below that), `x > 88.3` is
//! clamped to `e^88.3 ≈ 2.2e38` (callers pass `x ≤ 0`, or use it in
//! `1/(1 + e^x)` where the clamp is harmless), NaN stays NaN.
//! Measured max error over a sweep of `[-87.3, 88.3]` (test
//! `exp_is_within_one_ulp_of_f64_on_every_variant`): 0.98 ulp (AVX-512,
//! AVX2), 0.96 ulp (portable); the test asserts ≤ 1 ulp.
//!
//! GELU (tanh form): `0.5·(1 + tanh(u)) = σ(2u) = 1/(1 + e^{-2u})` with
//! `u = √(2/π)·(x + 0.044715·x³)`, so `gelu(x) = x·σ(2u)`, one exp and one
//! division per element and no cancellation near 0 (`tanh` itself is never
//! formed). `gelu'(x) = s + x·2s(1−s)·u'` with `s = σ(2u)`,
//! `u' = √(2/π)·(1 + 3·0.044715·x²)`, and `s(1−s) = s²·e^{-2u}` (no
//! cancellation as `s → 1`). Max errors vs f64 over a sweep of `[-10, 10]`
//! (test `gelu_forward_and_backward_match_f64_on_every_variant`): forward
//! 7.5 ulp (AVX-512, AVX2) / 8.6 ulp (portable) on `[-2, 10]`; for x < 0
//! the f32 rounding of the argument `2u` is amplified by exp, so the bound
//! is 2.7·(1 + |2u|) ulp (≈ 240 ulp of a ~1e-37 result at x = -10);
//! below x ≈ -10.05 the clamp of exp gives |gelu| < 1e-37 with absolute
//! error below that. Backward: ≤ 2.1e-7 absolute (relative error is
//! unbounded near the zero of `gelu'` at x ≈ -0.75, where `s` and
//! `x·s(1−s)·u'` cancel in any f32 evaluation).

use super::simd::Simd;

const LO: f32 = -87.3;
const HI: f32 = 88.3;
const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4; // 355/512, exact
const LN2_LO: f32 = -2.121_944_4e-4;
const P0: f32 = 1.987_569_1e-4;
const P1: f32 = 1.398_199_9e-3;
const P2: f32 = 8.333_452e-3;
const P3: f32 = 4.166_579_6e-2;
const P4: f32 = 1.666_666_5e-1;
const P5: f32 = 0.5; // Cephes' 5.0000001201e-1 rounds to 0.5 in f32
/// `1.5·2²³`: adding and subtracting it rounds an f32 of magnitude < 2²² to
/// the nearest integer (no SSE4.1 `round` needed).
const ROUND: f32 = 12_582_912.0;
/// `√(2/π)` and the cubic coefficient of the tanh-form GELU.
const S: f32 = 0.797_884_6;
const C: f32 = 0.044715;

/// `e^x`, the portable variant (see the module doc for range and error).
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    let xc = x.clamp(LO, HI);
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = (((((P0 * r + P1) * r + P2) * r + P3) * r + P4) * r + P5) * (r * r) + r + 1.0;
    let y = p * f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < LO { 0.0 } else { y }
}

#[inline(always)]
fn gelu1(x: f32) -> f32 {
    x / (1.0 + exp(-2.0 * S * x * (1.0 + C * x * x)))
}

#[inline(always)]
fn gelu_grad1(x: f32) -> f32 {
    let e = exp(-2.0 * S * x * (1.0 + C * x * x));
    let s = 1.0 / (1.0 + e);
    s + 2.0 * S * x * (s * s * e) * (1.0 + 3.0 * C * x * x)
}

/// Elements per portable chunk: short fixed-length inner loops vectorise.
const PCH: usize = 64;

/// `row[j] ← e^(row[j] − shift)`; returns `Σ_j row[j]` (lane-wise partial
/// sums, then added).
pub(super) fn exp_shift_sum(v: Simd, row: &mut [f32], shift: f32) -> f32 {
    match v {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512F and FMA (checked by `available`).
        Simd::Avx512 if v.available() => unsafe { x86::exp_shift_sum512(row, shift) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX2 and FMA (checked by `available`).
        Simd::Avx2 if v.available() => unsafe { x86::exp_shift_sum256(row, shift) },
        _ => {
            let mut acc = [0.0f32; 8];
            for ch in row.chunks_mut(PCH) {
                for (i, x) in ch.iter_mut().enumerate() {
                    *x = exp(*x - shift);
                    acc[i % 8] += *x;
                }
            }
            acc.iter().sum()
        }
    }
}

/// `Σ_j e^(row[j] − shift)` (row unchanged).
pub(super) fn sum_exp_shift(v: Simd, row: &[f32], shift: f32) -> f32 {
    match v {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512F and FMA (checked by `available`).
        Simd::Avx512 if v.available() => unsafe { x86::sum_exp_shift512(row, shift) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX2 and FMA (checked by `available`).
        Simd::Avx2 if v.available() => unsafe { x86::sum_exp_shift256(row, shift) },
        _ => {
            let mut acc = [0.0f32; 8];
            for ch in row.chunks(PCH) {
                for (i, x) in ch.iter().enumerate() {
                    acc[i % 8] += exp(*x - shift);
                }
            }
            acc.iter().sum()
        }
    }
}

/// `max_j row[j]` (`-∞` for an empty row; NaN elements are ignored, as by
/// `f32::max`).
pub(super) fn max(v: Simd, row: &[f32]) -> f32 {
    match v {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512F (checked by `available`).
        Simd::Avx512 if v.available() => unsafe { x86::max512(row) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX2 (checked by `available`).
        Simd::Avx2 if v.available() => unsafe { x86::max256(row) },
        _ => {
            let mut acc = [f32::NEG_INFINITY; 8];
            for ch in row.chunks(PCH) {
                for (i, &x) in ch.iter().enumerate() {
                    acc[i % 8] = acc[i % 8].max(x);
                }
            }
            acc.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x))
        }
    }
}

/// `out[j] = gelu(x[j] + bias[j])` (`bias` absent: `gelu(x[j])`); `bias`,
/// when given, and `out` are as long as `x`.
pub(super) fn gelu(v: Simd, x: &[f32], bias: Option<&[f32]>, out: &mut [f32]) {
    assert!(out.len() == x.len() && bias.is_none_or(|b| b.len() == x.len()), "gelu: lengths differ (a bug)");
    match v {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512F and FMA; lengths checked above.
        Simd::Avx512 if v.available() => unsafe { x86::gelu512(x, bias, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX2 and FMA; lengths checked above.
        Simd::Avx2 if v.available() => unsafe { x86::gelu256(x, bias, out) },
        _ => match bias {
            Some(b) => out.iter_mut().zip(x.iter().zip(b)).for_each(|(o, (&x, &b))| *o = gelu1(x + b)),
            None => out.iter_mut().zip(x).for_each(|(o, &x)| *o = gelu1(x)),
        },
    }
}

/// `out[j] = dy[j]·gelu'(x[j])`, all three as long.
pub(super) fn gelu_backward(v: Simd, x: &[f32], dy: &[f32], out: &mut [f32]) {
    assert!(out.len() == x.len() && dy.len() == x.len(), "gelu_backward: lengths differ (a bug)");
    match v {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512F and FMA; lengths checked above.
        Simd::Avx512 if v.available() => unsafe { x86::gelu_bwd512(x, dy, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX2 and FMA; lengths checked above.
        Simd::Avx2 if v.available() => unsafe { x86::gelu_bwd256(x, dy, out) },
        _ => out.iter_mut().zip(x.iter().zip(dy)).for_each(|(o, (&x, &g))| *o = g * gelu_grad1(x)),
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{C, HI, LN2_HI, LN2_LO, LO, LOG2E, P0, P1, P2, P3, P4, P5, S};

    // ------------------------------------------------------------ AVX-512

    /// Lanes `0..left` (`left` < 16 for a tail).
    fn tail16(left: usize) -> __mmask16 {
        if left >= 16 { 0xffff } else { ((1u32 << left) - 1) as __mmask16 }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    fn exp16(x: __m512) -> __m512 {
        // max(LO, x) / min(HI, ·) return x when x is NaN (the second operand).
        let xc = _mm512_min_ps(_mm512_set1_ps(HI), _mm512_max_ps(_mm512_set1_ps(LO), x));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
            xc,
            _mm512_set1_ps(LOG2E),
        ));
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), xc);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
        let mut p = _mm512_fmadd_ps(_mm512_set1_ps(P0), r, _mm512_set1_ps(P1));
        for c in [P2, P3, P4, P5] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0));
        let e = _mm512_slli_epi32::<23>(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)));
        let y = _mm512_mul_ps(p, _mm512_castsi512_ps(e));
        // Not-less-than, unordered true: NaN keeps its (NaN) result.
        _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_NLT_UQ>(x, _mm512_set1_ps(LO)), y)
    }

    /// `(gelu(x), _)` or, with `GRAD`, `gelu'(x)`: see the module doc.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    fn gelu16<const GRAD: bool>(x: __m512) -> __m512 {
        let x2 = _mm512_mul_ps(x, x);
        let t = _mm512_fmadd_ps(_mm512_set1_ps(C), x2, _mm512_set1_ps(1.0));
        let e = exp16(_mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(-2.0 * S), x), t));
        let one = _mm512_set1_ps(1.0);
        if !GRAD {
            return _mm512_div_ps(x, _mm512_add_ps(one, e));
        }
        let s = _mm512_div_ps(one, _mm512_add_ps(one, e));
        let du = _mm512_fmadd_ps(_mm512_set1_ps(3.0 * C), x2, one);
        let ss = _mm512_mul_ps(_mm512_mul_ps(s, s), e);
        _mm512_fmadd_ps(_mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(2.0 * S), x), ss), du, s)
    }

    /// # Safety
    /// The CPU has AVX-512F and FMA.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn exp_shift_sum512(row: &mut [f32], shift: f32) -> f32 {
        let (n, p, sh) = (row.len(), row.as_mut_ptr(), _mm512_set1_ps(shift));
        let mut acc = _mm512_setzero_ps();
        for j in (0..n).step_by(16) {
            let m = tail16(n - j);
            // SAFETY: lanes j..j+16 masked to those below n, inside `row`.
            let x = unsafe { _mm512_maskz_loadu_ps(m, p.add(j)) };
            let y = exp16(_mm512_sub_ps(x, sh));
            unsafe { _mm512_mask_storeu_ps(p.add(j), m, y) };
            acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(m, y));
        }
        _mm512_reduce_add_ps(acc)
    }

    /// # Safety
    /// The CPU has AVX-512F and FMA.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn sum_exp_shift512(row: &[f32], shift: f32) -> f32 {
        let (n, p, sh) = (row.len(), row.as_ptr(), _mm512_set1_ps(shift));
        let mut acc = _mm512_setzero_ps();
        for j in (0..n).step_by(16) {
            let m = tail16(n - j);
            // SAFETY: lanes masked to those below n, inside `row`.
            let x = unsafe { _mm512_maskz_loadu_ps(m, p.add(j)) };
            acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(m, exp16(_mm512_sub_ps(x, sh))));
        }
        _mm512_reduce_add_ps(acc)
    }

    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn max512(row: &[f32]) -> f32 {
        let (n, p, ninf) = (row.len(), row.as_ptr(), _mm512_set1_ps(f32::NEG_INFINITY));
        let mut acc = ninf;
        for j in (0..n).step_by(16) {
            // SAFETY: lanes masked to those below n, inside `row`; the rest are -∞.
            let x = unsafe { _mm512_mask_loadu_ps(ninf, tail16(n - j), p.add(j)) };
            // max(x, acc) returns acc when x is NaN: NaN is skipped.
            acc = _mm512_max_ps(x, acc);
        }
        _mm512_reduce_max_ps(acc)
    }

    /// `max_j row[j]`, NaN skipped (as [`super::max`]): two 8-lane
    /// accumulators, the tail compared one by one.
    ///
    /// # Safety
    /// The CPU has AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn max256(row: &[f32]) -> f32 {
        let (n, p) = (row.len(), row.as_ptr());
        let (mut a, mut b) = (_mm256_set1_ps(f32::NEG_INFINITY), _mm256_set1_ps(f32::NEG_INFINITY));
        let mut j = 0;
        while j + 16 <= n {
            // SAFETY: j + 16 ≤ n, inside `row`. max(x, acc) returns acc when x is NaN: NaN is skipped.
            unsafe {
                a = _mm256_max_ps(_mm256_loadu_ps(p.add(j)), a);
                b = _mm256_max_ps(_mm256_loadu_ps(p.add(j + 8)), b);
            }
            j += 16;
        }
        let mut lanes = [0.0f32; 8];
        // SAFETY: `lanes` holds 8 f32.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_max_ps(a, b)) };
        // No lane is NaN; a NaN in the tail fails `>` and is skipped.
        let mut m = lanes.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        for &x in &row[j..] {
            if x > m {
                m = x;
            }
        }
        m
    }

    /// # Safety
    /// The CPU has AVX-512F and FMA; `bias` (when given) and `out` are as long as `x`.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn gelu512(x: &[f32], bias: Option<&[f32]>, out: &mut [f32]) {
        let n = x.len();
        for j in (0..n).step_by(16) {
            let m = tail16(n - j);
            // SAFETY: lanes masked to those below n; all slices hold n elements.
            let mut v = unsafe { _mm512_maskz_loadu_ps(m, x.as_ptr().add(j)) };
            if let Some(b) = bias {
                v = _mm512_add_ps(v, unsafe { _mm512_maskz_loadu_ps(m, b.as_ptr().add(j)) });
            }
            unsafe { _mm512_mask_storeu_ps(out.as_mut_ptr().add(j), m, gelu16::<false>(v)) };
        }
    }

    /// # Safety
    /// The CPU has AVX-512F and FMA; `dy` and `out` are as long as `x`.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn gelu_bwd512(x: &[f32], dy: &[f32], out: &mut [f32]) {
        let n = x.len();
        for j in (0..n).step_by(16) {
            let m = tail16(n - j);
            // SAFETY: lanes masked to those below n; all slices hold n elements.
            let (v, g) =
                unsafe { (_mm512_maskz_loadu_ps(m, x.as_ptr().add(j)), _mm512_maskz_loadu_ps(m, dy.as_ptr().add(j))) };
            unsafe { _mm512_mask_storeu_ps(out.as_mut_ptr().add(j), m, _mm512_mul_ps(g, gelu16::<true>(v))) };
        }
    }

    // --------------------------------------------------------------- AVX2

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp8(x: __m256) -> __m256 {
        let xc = _mm256_min_ps(_mm256_set1_ps(HI), _mm256_max_ps(_mm256_set1_ps(LO), x));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
            xc,
            _mm256_set1_ps(LOG2E),
        ));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), xc);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        let mut p = _mm256_fmadd_ps(_mm256_set1_ps(P0), r, _mm256_set1_ps(P1));
        for c in [P2, P3, P4, P5] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0));
        let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
        let y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
        _mm256_and_ps(y, _mm256_cmp_ps::<_CMP_NLT_UQ>(x, _mm256_set1_ps(LO)))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn gelu8<const GRAD: bool>(x: __m256) -> __m256 {
        let x2 = _mm256_mul_ps(x, x);
        let t = _mm256_fmadd_ps(_mm256_set1_ps(C), x2, _mm256_set1_ps(1.0));
        let e = exp8(_mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(-2.0 * S), x), t));
        let one = _mm256_set1_ps(1.0);
        if !GRAD {
            return _mm256_div_ps(x, _mm256_add_ps(one, e));
        }
        let s = _mm256_div_ps(one, _mm256_add_ps(one, e));
        let du = _mm256_fmadd_ps(_mm256_set1_ps(3.0 * C), x2, one);
        let ss = _mm256_mul_ps(_mm256_mul_ps(s, s), e);
        _mm256_fmadd_ps(_mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(2.0 * S), x), ss), du, s)
    }

    /// Runs `f` over `n` elements in vectors of 8: full vectors in place at
    /// offset `j` (`f(j, None)`), the tail through 8-float stack buffers
    /// (`f(j, Some(len))`, the caller copies in and out).
    #[inline(always)]
    fn by8(n: usize, mut f: impl FnMut(usize, Option<usize>)) {
        let full = n - n % 8;
        for j in (0..full).step_by(8) {
            f(j, None);
        }
        if full < n {
            f(full, Some(n - full));
        }
    }

    /// `src[j..j+len]` in lanes 0..len of a vector, the rest `fill`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn load8(src: &[f32], j: usize, len: Option<usize>, fill: f32) -> __m256 {
        match len {
            // SAFETY: the caller passes `None` only when j + 8 ≤ src.len().
            None => unsafe { _mm256_loadu_ps(src[j..j + 8].as_ptr()) },
            Some(l) => {
                let mut b = [fill; 8];
                b[..l].copy_from_slice(&src[j..j + l]);
                // SAFETY: `b` holds 8 floats.
                unsafe { _mm256_loadu_ps(b.as_ptr()) }
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn store8(dst: &mut [f32], j: usize, len: Option<usize>, y: __m256) {
        match len {
            // SAFETY: the slice dst[j..j+8] exists (bounds-checked).
            None => unsafe { _mm256_storeu_ps(dst[j..j + 8].as_mut_ptr(), y) },
            Some(l) => {
                let mut b = [0.0f32; 8];
                // SAFETY: `b` holds 8 floats.
                unsafe { _mm256_storeu_ps(b.as_mut_ptr(), y) };
                dst[j..j + l].copy_from_slice(&b[..l]);
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    fn hsum8(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
    }

    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_shift_sum256(row: &mut [f32], shift: f32) -> f32 {
        let sh = _mm256_set1_ps(shift);
        let mut acc = _mm256_setzero_ps();
        // A padded tail lane holds `shift + 2·LO`, whose exp is exactly 0.
        by8(row.len(), |j, len| {
            let y = exp8(_mm256_sub_ps(load8(row, j, len, shift + 2.0 * LO), sh));
            store8(row, j, len, y);
            acc = _mm256_add_ps(acc, y);
        });
        hsum8(acc)
    }

    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn sum_exp_shift256(row: &[f32], shift: f32) -> f32 {
        let sh = _mm256_set1_ps(shift);
        let mut acc = _mm256_setzero_ps();
        by8(row.len(), |j, len| {
            acc = _mm256_add_ps(acc, exp8(_mm256_sub_ps(load8(row, j, len, shift + 2.0 * LO), sh)));
        });
        hsum8(acc)
    }

    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gelu256(x: &[f32], bias: Option<&[f32]>, out: &mut [f32]) {
        by8(x.len(), |j, len| {
            let mut v = load8(x, j, len, 0.0);
            if let Some(b) = bias {
                v = _mm256_add_ps(v, load8(b, j, len, 0.0));
            }
            store8(out, j, len, gelu8::<false>(v));
        });
    }

    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gelu_bwd256(x: &[f32], dy: &[f32], out: &mut [f32]) {
        by8(x.len(), |j, len| {
            let y = _mm256_mul_ps(load8(dy, j, len, 0.0), gelu8::<true>(load8(x, j, len, 0.0)));
            store8(out, j, len, y);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn variants() -> Vec<Simd> {
        [Simd::Avx512, Simd::Avx2, Simd::Portable].into_iter().filter(|v| v.available()).collect()
    }

    /// Error of `got` in units of the f32 spacing at `want`.
    fn ulps(got: f32, want: f64) -> f64 {
        let w = want as f32;
        let ulp = if w == 0.0 { f32::from_bits(1) as f64 } else { (w.abs().next_up() - w.abs()) as f64 };
        (got as f64 - want).abs() / ulp
    }

    /// An input sweep with every kind of tail length.
    fn sweep(lo: f32, hi: f32, step: f32) -> Vec<f32> {
        let n = ((hi - lo) / step) as usize + 1;
        (0..n).map(|i| lo + i as f32 * step).chain([lo, hi]).collect()
    }

    #[test]
    fn exp_is_within_one_ulp_of_f64_on_every_variant() {
        let xs = sweep(LO, HI, 1.7e-4);
        for v in variants() {
            let mut worst = (0.0f64, 0.0f32);
            for ch in xs.chunks(997) {
                let mut y = ch.to_vec();
                let sum = exp_shift_sum(v, &mut y, 0.0);
                let mut want_sum = 0.0f64;
                for (&x, &y) in ch.iter().zip(&y) {
                    let want = (x as f64).exp();
                    want_sum += want;
                    let e = ulps(y, want);
                    if e > worst.0 {
                        worst = (e, x);
                    }
                }
                if want_sum < 1e37 {
                    assert!(((sum as f64 - want_sum) / want_sum).abs() < 1e-6, "{v:?}: sum {sum} vs {want_sum}");
                    assert!((sum_exp_shift(v, ch, 0.0) - sum).abs() <= 1e-6 * sum, "{v:?}: sum_exp_shift");
                }
            }
            eprintln!("{v:?}: exp {:.2} ulp at {}", worst.0, worst.1);
            assert!(worst.0 <= 1.0, "{v:?}: worst exp error {:.2} ulp at {}", worst.0, worst.1);
            let mut edge = vec![0.0, -87.4, -1e30, f32::NEG_INFINITY, 100.0, f32::NAN, 1.0];
            exp_shift_sum(v, &mut edge, 0.0);
            assert_eq!(&edge[..4], &[1.0, 0.0, 0.0, 0.0], "{v:?}");
            assert!(edge[4].is_finite() && edge[4] > 1e38 && edge[5].is_nan(), "{v:?}: {edge:?}");
            let mut shifted = vec![3.5f32; 19];
            exp_shift_sum(v, &mut shifted, 3.5);
            assert!(shifted.iter().all(|&y| y == 1.0), "{v:?}: shift");
        }
    }

    #[test]
    fn max_ignores_nan_and_tails_on_every_variant() {
        for v in variants() {
            for n in [0usize, 1, 7, 8, 15, 16, 17, 33] {
                let row: Vec<f32> = (0..n).map(|i| ((i * 7919) % 31) as f32 - 40.0).collect();
                let want = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                assert_eq!(max(v, &row), want, "{v:?} n={n}");
            }
            assert_eq!(max(v, &[1.0, f32::NAN, 3.0, -2.0]), 3.0, "{v:?}");
            // NaN inside the vector part and in the tail; the maximum in either.
            for at in [5usize, 36] {
                let mut row: Vec<f32> = (0..37).map(|i| -((i * 13) % 17) as f32).collect();
                row[3] = f32::NAN;
                row[35] = f32::NAN;
                row[at] = 2.5;
                assert_eq!(max(v, &row), 2.5, "{v:?} at={at}");
            }
        }
    }

    #[test]
    fn gelu_forward_and_backward_match_f64_on_every_variant() {
        // f64 references in the σ form: 0.5·(1 + tanh u) itself cancels for
        // x ≲ -5 (tanh u → -1) even in f64.
        let k = (2.0 / std::f64::consts::PI).sqrt();
        let e = |x: f64| (-2.0 * k * (x + 0.044715 * x.powi(3))).exp();
        let g = |x: f64| x / (1.0 + e(x));
        let dg = |x: f64| {
            let s = 1.0 / (1.0 + e(x));
            s + 2.0 * x * s * s * e(x) * k * (1.0 + 3.0 * 0.044715 * x * x)
        };
        // Cross-check the σ form against the tanh form where the latter is exact enough.
        for x in [-3.0, -0.7, 0.0, 0.3, 2.0] {
            let t = 0.5 * x * (1.0 + (k * (x + 0.044715 * f64::powi(x, 3))).tanh());
            assert!((g(x) - t).abs() < 1e-14, "σ form at {x}");
        }
        let xs = sweep(-10.0, 10.0, 3.1e-5);
        let bias: Vec<f32> = (0..xs.len()).map(|i| [0.0, 0.25, -0.5][i % 3]).collect();
        for v in variants() {
            let mut y = vec![f32::NAN; xs.len()];
            let mut yb = vec![f32::NAN; xs.len()];
            let mut d = vec![f32::NAN; xs.len()];
            let ones = vec![1.0f32; xs.len()];
            gelu(v, &xs, None, &mut y);
            gelu(v, &xs, Some(&bias), &mut yb);
            gelu_backward(v, &xs, &ones, &mut d);
            // Error in ulp divided by 1 + |2u|: e^{-2u}'s argument carries a
            // relative rounding error that exp multiplies by |2u| (up to ~87
            // at x = -10), for any f32 evaluation of it.
            let arg = |x: f64| 1.0 + (2.0 * k * (x + 0.044715 * x.powi(3))).abs();
            let (mut wf, mut wb, mut wd, mut w2) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
            for i in 0..xs.len() {
                let x = xs[i] as f64;
                wf = wf.max(ulps(y[i], g(x)) / arg(x));
                if x >= -2.0 {
                    w2 = w2.max(ulps(y[i], g(x)));
                }
                let xb = (xs[i] + bias[i]) as f64; // the kernel rounds x + b to f32 first
                if xb >= -10.0 {
                    wb = wb.max(ulps(yb[i], g(xb)) / arg(xb));
                } else {
                    // e^{-2u} past the clamp: |gelu| < 1e-37 either way.
                    assert!((yb[i] as f64 - g(xb)).abs() < 1e-37, "{v:?}: gelu({xb})");
                }
                wd = wd.max((d[i] as f64 - dg(x)).abs());
            }
            eprintln!("{v:?}: gelu {wf:.2} / {wb:.2} ulp per 1+|2u|, {w2:.2} ulp on [-2, 10]; gelu' {wd:.3e} abs");
            assert!(wf <= 3.0 && wb <= 3.0, "{v:?}: gelu worst {wf:.2} / {wb:.2} ulp per 1+|2u|");
            assert!(w2 <= 10.0, "{v:?}: gelu worst {w2:.2} ulp on [-2, 10]");
            assert!(wd <= 2.5e-7, "{v:?}: gelu' worst abs error {wd:.3e}");
            let dy: Vec<f32> = (0..xs.len()).map(|i| (i % 5) as f32 - 2.0).collect();
            gelu_backward(v, &xs, &dy, &mut d);
            for i in (0..xs.len()).step_by(101) {
                assert!((d[i] as f64 - dy[i] as f64 * dg(xs[i] as f64)).abs() <= 5e-7, "{v:?}: dy scaling");
            }
        }
    }
}
