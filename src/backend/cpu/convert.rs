//! f16/bf16 ⇄ f32 slice conversions, bit-exact with `half`'s scalar
//! `to_f32`/`from_f32` (round-to-nearest-even on narrowing, NaN quietened with
//! its upper payload kept), in the three variants of [`simd::simd`]:
//!
//! - AVX-512F: `vcvtph2ps`/`vcvtps2ph` on 16 lanes for f16; bf16 as 32-bit
//!   integer arithmetic on 16 lanes (see [`bf16_bits`], [`bf16_to_f32`]) and
//!   `vpmovdw`.
//! - AVX2 (+F16C for f16, else portable): the same on 8 lanes.
//! - portable: the branch-free integer/float formulas below, which the
//!   compiler vectorises with whatever the build targets (SSE2 on x86-64).
//!
//! `vcvtneps2bf16` (AVX512_BF16) is deliberately not used: it treats f32
//! subnormal inputs as zero, where `half` (and the spec: one RNE rounding of
//! the f32 value) rounds them. The integer rounding is as fast here, since a
//! conversion is bound by memory traffic, not arithmetic.
//!
//! Slices longer than [`PAR_MIN`] are split across the rayon pool: the backend
//! widens whole tensors on every read and narrows on every write, and a serial
//! conversion would leave the second core idle for that time.

use half::{bf16, f16};
use rayon::prelude::*;

use super::simd::{self, Simd};

/// Elements from which a conversion runs in parallel chunks.
const PAR_MIN: usize = 1 << 16;
/// Elements per parallel chunk (64 KiB of f32: fits L2 with its source).
const CHUNK: usize = 1 << 14;

/// `dst[i] = src[i]` for every `i` through `f`, in parallel chunks when long.
fn par<S: Sync, D: Send>(src: &[S], dst: &mut [D], f: impl Fn(Simd, &[S], &mut [D]) + Sync) {
    assert_eq!(src.len(), dst.len(), "conversion between slices of different lengths (a bug)");
    let v = simd::simd();
    if src.len() < PAR_MIN {
        f(v, src, dst);
    } else {
        src.par_chunks(CHUNK).zip(dst.par_chunks_mut(CHUNK)).for_each(|(s, d)| f(v, s, d));
    }
}

/// `dst[i] = src[i] as f32` (exact).
pub(super) fn widen_f16(src: &[f16], dst: &mut [f32]) {
    par(src, dst, widen_f16_with);
}

/// `dst[i] = src[i] as f32` (exact).
pub(super) fn widen_bf16(src: &[bf16], dst: &mut [f32]) {
    par(src, dst, widen_bf16_with);
}

/// `dst[i] = f16::from_f32(src[i])` (RNE; overflow to ±∞).
pub(super) fn narrow_f16(src: &[f32], dst: &mut [f16]) {
    par(src, dst, narrow_f16_with);
}

/// `dst[i] = bf16::from_f32(src[i])` (RNE; overflow to ±∞).
pub(super) fn narrow_bf16(src: &[f32], dst: &mut [bf16]) {
    par(src, dst, narrow_bf16_with);
}

#[cfg(target_arch = "x86_64")]
fn has_f16c() -> bool {
    std::arch::is_x86_feature_detected!("f16c")
}

pub(super) fn widen_f16_with(v: Simd, src: &[f16], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    let done = match v {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512F is present (`available`); the kernel touches
        // indices < n only, which both slices hold.
        Simd::Avx512 if v.available() => unsafe { x86::widen_f16_512(src.as_ptr().cast(), dst.as_mut_ptr(), n) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2 and F16C are present (checked); indices < n as above.
        Simd::Avx2 if v.available() && has_f16c() => unsafe {
            x86::widen_f16_256(src.as_ptr().cast(), dst.as_mut_ptr(), n)
        },
        _ => 0,
    };
    src[done..n].iter().zip(&mut dst[done..n]).for_each(|(s, d)| *d = f16_to_f32(s.to_bits()));
}

pub(super) fn widen_bf16_with(v: Simd, src: &[bf16], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    let done = match v {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512F is present; indices < n, which both slices hold.
        Simd::Avx512 if v.available() => unsafe { x86::widen_bf16_512(src.as_ptr().cast(), dst.as_mut_ptr(), n) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2 is present; indices < n as above.
        Simd::Avx2 if v.available() => unsafe { x86::widen_bf16_256(src.as_ptr().cast(), dst.as_mut_ptr(), n) },
        _ => 0,
    };
    src[done..n].iter().zip(&mut dst[done..n]).for_each(|(s, d)| *d = bf16_to_f32(s.to_bits()));
}

pub(super) fn narrow_f16_with(v: Simd, src: &[f32], dst: &mut [f16]) {
    let n = src.len().min(dst.len());
    let done = match v {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512F is present; indices < n, which both slices hold.
        Simd::Avx512 if v.available() => unsafe { x86::narrow_f16_512(src.as_ptr(), dst.as_mut_ptr().cast(), n) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2 and F16C are present; indices < n as above.
        Simd::Avx2 if v.available() && has_f16c() => unsafe {
            x86::narrow_f16_256(src.as_ptr(), dst.as_mut_ptr().cast(), n)
        },
        _ => 0,
    };
    src[done..n].iter().zip(&mut dst[done..n]).for_each(|(&s, d)| *d = f16::from_bits(f32_to_f16(s)));
}

pub(super) fn narrow_bf16_with(v: Simd, src: &[f32], dst: &mut [bf16]) {
    let n = src.len().min(dst.len());
    let done = match v {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512F is present; indices < n, which both slices hold.
        Simd::Avx512 if v.available() => unsafe { x86::narrow_bf16_512(src.as_ptr(), dst.as_mut_ptr().cast(), n) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2 is present; indices < n as above.
        Simd::Avx2 if v.available() => unsafe { x86::narrow_bf16_256(src.as_ptr(), dst.as_mut_ptr().cast(), n) },
        _ => 0,
    };
    src[done..n].iter().zip(&mut dst[done..n]).for_each(|(&s, d)| *d = bf16::from_bits(bf16_bits(s.to_bits())));
}

/// f32 value of the bf16 bits `b`: the same bits in the high half, a NaN
/// with its quiet bit (0x0040_0000) set, as `half` does.
#[inline]
fn bf16_to_f32(b: u16) -> f32 {
    let w = (b as u32) << 16;
    f32::from_bits(if w & 0x7FFF_FFFF > 0x7F80_0000 { w | 0x0040_0000 } else { w })
}

/// bf16 bits of the f32 with bits `x`, rounded to nearest even: adding
/// `0x7FFF + lsb` (lsb = bit 16) carries into bit 16 exactly when the low half
/// exceeds 0x8000, or equals it with an odd kept part. No non-NaN input
/// carries out of bit 31 (the largest is 0xFF80_0000). A NaN keeps its top 16
/// bits with the quiet bit (0x0040) set.
#[inline]
fn bf16_bits(x: u32) -> u16 {
    let rounded = x.wrapping_add(0x7FFF + ((x >> 16) & 1)) >> 16;
    let nan = (x >> 16) | 0x0040;
    (if x & 0x7FFF_FFFF > 0x7F80_0000 { nan } else { rounded }) as u16
}

/// f32 value of the f16 bits `h` (exact). The magnitude shifted into f32
/// position and rebiased (+112 in the exponent) is right for normals; ±∞/NaN
/// get the exponent topped up to 255 (NaN also the quiet bit); subnormals
/// `m·2⁻²⁴` are rebuilt as `(2⁻¹⁴ + m·2⁻²⁴) − 2⁻¹⁴`, exact in f32.
#[inline]
fn f16_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let mag = (h & 0x7FFF) << 13;
    let exp = mag & 0x0F80_0000;
    let normal = mag + (112 << 23);
    let special = (normal + (112 << 23)) | if mag & 0x007F_FFFF != 0 { 0x0040_0000 } else { 0 };
    let sub = (f32::from_bits(normal + (1 << 23)) - f32::from_bits(113 << 23)).to_bits();
    let bits = if exp == 0x0F80_0000 {
        special
    } else if exp == 0 {
        sub
    } else {
        normal
    };
    f32::from_bits(bits | (h & 0x8000) << 16)
}

/// f16 bits of the f32 `x`, rounded to nearest even. For |x| ≥ 2⁻¹⁴ (f16
/// normal) the rebias and the `0xFFF + lsb` addition round like
/// [`bf16_bits`] at bit 13 (a carry into the exponent is the correct
/// rounding up, to ∞ past 65504); below, adding 0.5 (2⁻¹) makes the FPU's
/// RNE drop all bits under 2⁻²⁴, so the f16 subnormal is the sum's low bits.
/// |x| ≥ 65520 (rounds past the largest finite) is ∞; NaN keeps its top
/// 10 mantissa bits with the quiet bit (0x0200) set.
#[inline]
fn f32_to_f16(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = (bits >> 16) & 0x8000;
    let a = bits & 0x7FFF_FFFF;
    let big = 0x7C00 | if a > 0x7F80_0000 { 0x0200 | ((a >> 13) & 0x03FF) } else { 0 };
    let normal = a.wrapping_sub(112 << 23).wrapping_add(0xFFF + ((a >> 13) & 1)) >> 13;
    let sub = (f32::from_bits(a) + 0.5).to_bits() - 0.5f32.to_bits();
    let h = if a >= (143 << 23) {
        big
    } else if a < (113 << 23) {
        sub
    } else {
        normal
    };
    (h | sign) as u16
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Widens the first `n / 16 · 16` elements; returns how many.
    ///
    /// # Safety
    /// AVX-512F present; `src` and `dst` valid for `n` elements.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn widen_f16_512(src: *const u16, dst: *mut f32, n: usize) -> usize {
        let full = n / 16 * 16;
        for i in (0..full).step_by(16) {
            // SAFETY: i + 16 ≤ n (caller's contract).
            unsafe { _mm512_storeu_ps(dst.add(i), _mm512_cvtph_ps(_mm256_loadu_si256(src.add(i).cast()))) }
        }
        full
    }

    /// # Safety
    /// AVX2 and F16C present; `src` and `dst` valid for `n` elements.
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn widen_f16_256(src: *const u16, dst: *mut f32, n: usize) -> usize {
        let full = n / 8 * 8;
        for i in (0..full).step_by(8) {
            // SAFETY: i + 8 ≤ n.
            unsafe { _mm256_storeu_ps(dst.add(i), _mm256_cvtph_ps(_mm_loadu_si128(src.add(i).cast()))) }
        }
        full
    }

    /// # Safety
    /// AVX-512F present; `src` and `dst` valid for `n` elements.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn narrow_f16_512(src: *const f32, dst: *mut u16, n: usize) -> usize {
        let full = n / 16 * 16;
        for i in (0..full).step_by(16) {
            // SAFETY: i + 16 ≤ n.
            unsafe {
                let h =
                    _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_loadu_ps(src.add(i)));
                _mm256_storeu_si256(dst.add(i).cast(), h);
            }
        }
        full
    }

    /// # Safety
    /// AVX2 and F16C present; `src` and `dst` valid for `n` elements.
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn narrow_f16_256(src: *const f32, dst: *mut u16, n: usize) -> usize {
        let full = n / 8 * 8;
        for i in (0..full).step_by(8) {
            // SAFETY: i + 8 ≤ n.
            unsafe {
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(src.add(i)));
                _mm_storeu_si128(dst.add(i).cast(), h);
            }
        }
        full
    }

    /// # Safety
    /// AVX-512F present; `src` and `dst` valid for `n` elements.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn widen_bf16_512(src: *const u16, dst: *mut f32, n: usize) -> usize {
        let full = n / 16 * 16;
        let (abs, inf, quiet) =
            (_mm512_set1_epi32(0x7FFF_FFFF), _mm512_set1_epi32(0x7F80_0000), _mm512_set1_epi32(0x0040_0000));
        for i in (0..full).step_by(16) {
            // SAFETY: i + 16 ≤ n.
            unsafe {
                let w = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(src.add(i).cast())));
                let nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(w, abs), inf);
                let w = _mm512_mask_or_epi32(w, nan, w, quiet);
                _mm512_storeu_ps(dst.add(i), _mm512_castsi512_ps(w));
            }
        }
        full
    }

    /// # Safety
    /// AVX2 present; `src` and `dst` valid for `n` elements.
    #[target_feature(enable = "avx2")]
    pub unsafe fn widen_bf16_256(src: *const u16, dst: *mut f32, n: usize) -> usize {
        let full = n / 8 * 8;
        let (abs, inf, quiet) =
            (_mm256_set1_epi32(0x7FFF_FFFF), _mm256_set1_epi32(0x7F80_0000), _mm256_set1_epi32(0x0040_0000));
        for i in (0..full).step_by(8) {
            // SAFETY: i + 8 ≤ n.
            unsafe {
                let w = _mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(src.add(i).cast())));
                // Magnitudes are < 2³¹: the signed compare is the unsigned one.
                let nan = _mm256_cmpgt_epi32(_mm256_and_si256(w, abs), inf);
                let w = _mm256_or_si256(w, _mm256_and_si256(nan, quiet));
                _mm256_storeu_ps(dst.add(i), _mm256_castsi256_ps(w));
            }
        }
        full
    }

    /// [`super::bf16_bits`] on 16 lanes.
    ///
    /// # Safety
    /// AVX-512F present; `src` and `dst` valid for `n` elements.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn narrow_bf16_512(src: *const f32, dst: *mut u16, n: usize) -> usize {
        let full = n / 16 * 16;
        let (bias, one, abs, inf, quiet) = (
            _mm512_set1_epi32(0x7FFF),
            _mm512_set1_epi32(1),
            _mm512_set1_epi32(0x7FFF_FFFF),
            _mm512_set1_epi32(0x7F80_0000),
            _mm512_set1_epi32(0x0040),
        );
        for i in (0..full).step_by(16) {
            // SAFETY: i + 16 ≤ n.
            let x = unsafe { _mm512_castps_si512(_mm512_loadu_ps(src.add(i))) };
            let hi = _mm512_srli_epi32::<16>(x);
            let rounded =
                _mm512_srli_epi32::<16>(_mm512_add_epi32(_mm512_add_epi32(x, bias), _mm512_and_si512(hi, one)));
            let nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(x, abs), inf);
            let r = _mm512_mask_blend_epi32(nan, rounded, _mm512_or_si512(hi, quiet));
            // SAFETY: i + 16 ≤ n.
            unsafe { _mm256_storeu_si256(dst.add(i).cast(), _mm512_cvtepi32_epi16(r)) }
        }
        full
    }

    /// [`super::bf16_bits`] on 2 × 8 lanes.
    ///
    /// # Safety
    /// AVX2 present; `src` and `dst` valid for `n` elements.
    #[target_feature(enable = "avx2")]
    pub unsafe fn narrow_bf16_256(src: *const f32, dst: *mut u16, n: usize) -> usize {
        let full = n / 16 * 16;
        let (bias, one, abs, inf, quiet) = (
            _mm256_set1_epi32(0x7FFF),
            _mm256_set1_epi32(1),
            _mm256_set1_epi32(0x7FFF_FFFF),
            _mm256_set1_epi32(0x7F80_0000),
            _mm256_set1_epi32(0x0040),
        );
        // After masking the sign, magnitudes are < 2³¹, so the signed compare
        // is the unsigned one.
        let round = |x: __m256i| {
            let hi = _mm256_srli_epi32::<16>(x);
            let rounded =
                _mm256_srli_epi32::<16>(_mm256_add_epi32(_mm256_add_epi32(x, bias), _mm256_and_si256(hi, one)));
            let nan = _mm256_cmpgt_epi32(_mm256_and_si256(x, abs), inf);
            _mm256_blendv_epi8(rounded, _mm256_or_si256(hi, quiet), nan)
        };
        for i in (0..full).step_by(16) {
            // SAFETY: i + 16 ≤ n.
            let (a, b) = unsafe {
                (_mm256_castps_si256(_mm256_loadu_ps(src.add(i))), _mm256_castps_si256(_mm256_loadu_ps(src.add(i + 8))))
            };
            // Every lane is ≤ 0xFFFF, so the saturating pack is exact; it
            // interleaves 128-bit halves (a₀ b₀ a₁ b₁), which the permute undoes.
            let packed = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packus_epi32(round(a), round(b)));
            // SAFETY: i + 16 ≤ n.
            unsafe { _mm256_storeu_si256(dst.add(i).cast(), packed) }
        }
        full
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn variants() -> Vec<Simd> {
        [Simd::Avx512, Simd::Avx2, Simd::Portable].into_iter().filter(|v| v.available()).collect()
    }

    /// Low 16 bits appended to every 16-bit high pattern when narrowing: the
    /// bf16 rounding boundaries (0x8000 ± 1) and the f16 normal ones (bit 13:
    /// 0x1000 ± 1 and with the next bit set); f16 subnormal boundaries lie in
    /// the high half, which the sweep covers whole.
    const LOWS: [u32; 14] =
        [0, 1, 0x0FFF, 0x1000, 0x1001, 0x1FFF, 0x2000, 0x3000, 0x5A5A, 0x7FFF, 0x8000, 0x8001, 0xC000, 0xFFFF];

    /// Widening every one of the 65536 f16 and bf16 bit patterns gives
    /// `half`'s bits (NaNs included), in every variant, with a ragged tail.
    #[test]
    fn widening_is_bit_exact_with_half_for_all_65536_patterns() {
        let all: Vec<u16> = (0..=u16::MAX).chain(0..5).collect();
        let h: Vec<f16> = all.iter().map(|&b| f16::from_bits(b)).collect();
        let b: Vec<bf16> = all.iter().map(|&b| bf16::from_bits(b)).collect();
        for v in variants() {
            let mut out = vec![0.0f32; all.len()];
            widen_f16_with(v, &h, &mut out);
            for (x, o) in h.iter().zip(&out) {
                assert_eq!(o.to_bits(), x.to_f32().to_bits(), "{v:?} f16 {:#06x}", x.to_bits());
            }
            widen_bf16_with(v, &b, &mut out);
            for (x, o) in b.iter().zip(&out) {
                assert_eq!(o.to_bits(), x.to_f32().to_bits(), "{v:?} bf16 {:#06x}", x.to_bits());
            }
        }
    }

    /// Narrowing f32 values built from every 16-bit high pattern and each of
    /// [`LOWS`] gives `half`'s bits, in every variant, with a ragged tail.
    #[test]
    fn narrowing_is_bit_exact_with_half_around_every_rounding_boundary() {
        let xs: Vec<f32> =
            (0..=u16::MAX as u32).flat_map(|hi| LOWS.iter().map(move |&lo| f32::from_bits(hi << 16 | lo))).collect();
        let xs = &xs[..xs.len() - 3];
        for v in variants() {
            let mut h = vec![f16::ZERO; xs.len()];
            narrow_f16_with(v, xs, &mut h);
            let mut b = vec![bf16::ZERO; xs.len()];
            narrow_bf16_with(v, xs, &mut b);
            for ((x, h), b) in xs.iter().zip(&h).zip(&b) {
                assert_eq!(h.to_bits(), f16::from_f32(*x).to_bits(), "{v:?} f16 of {:#010x}", x.to_bits());
                assert_eq!(b.to_bits(), bf16::from_f32(*x).to_bits(), "{v:?} bf16 of {:#010x}", x.to_bits());
            }
        }
    }

    /// The parallel entry points (chunked past `PAR_MIN`) agree with the
    /// scalar conversions end to end.
    #[test]
    fn parallel_conversions_round_trip_like_half() {
        let n = PAR_MIN + 2 * CHUNK + 7;
        let xs: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.7311).sin() * 300.0).collect();
        let mut h = vec![f16::ZERO; n];
        narrow_f16(&xs, &mut h);
        let mut b = vec![bf16::ZERO; n];
        narrow_bf16(&xs, &mut b);
        let (mut wh, mut wb) = (vec![0.0f32; n], vec![0.0f32; n]);
        widen_f16(&h, &mut wh);
        widen_bf16(&b, &mut wb);
        for i in 0..n {
            assert_eq!(wh[i], f16::from_f32(xs[i]).to_f32(), "f16 at {i}");
            assert_eq!(wb[i], bf16::from_f32(xs[i]).to_f32(), "bf16 at {i}");
        }
    }
}
