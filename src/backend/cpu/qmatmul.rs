//! `y = x · Wᵀ` with a quantized weight on the CPU (rule:
//! [`crate::quant::format`]): the weight is dequantized in the inner loop,
//! never materialised, and products are summed in f32.
//!
//! int8 and int4 run a SIMD kernel chosen at run time (AVX-512, AVX2+FMA or
//! portable; `DYNSPARSE_CPU_SIMD=avx512|avx2|portable` forces one). Per
//! output `y[i][j]`: lanes `l` of the vector width `V` accumulate
//! `x[i][p]·c[p]` for `p ≡ l (mod V)` with fused multiply-adds, where `c` is
//! the integer code (`q`, or `u − z` for int4); int8 multiplies the lane
//! total by `scale[j]` at the end, int4 folds each group's lane sums into the
//! total with one fused multiply-add by `scale[j][g]`. Lanes are then added
//! in a fixed order, and an int8 tail (`k` not a multiple of `V`) is added
//! scalar in `p` order. Rows of x are processed in tiles of 4 sharing each
//! decoded weight vector (the small-batch path) or alone (decode, and the
//! tail of a batch); each row's operations are the same in both, so every
//! row of y is bit-identical whatever `m` is. Mathematically `scale·Σx·c =
//! Σx·(scale·c)`: the kernels differ from the reference only by rounding.
//!
//! 2:4 formats: the reference sums `x[i][p]·w[j][p]` over every `p` in order
//! with separate multiply and add. A dropped weight is +0, and for finite `x`
//! adding `x·(±0) = ±0` to an accumulator that starts at +0 leaves it
//! bit-for-bit unchanged (round-to-nearest never makes a sum −0 from +0), so
//! summing only the two kept entries of each group of 4, in `p` order, with
//! the same multiply-then-add (no fused multiply-add) is **bit-identical** to
//! the reference. The SIMD kernels put one output column per lane (16 on
//! AVX-512, 8 on AVX2+F16C): each lane decodes its column's kept positions and
//! values (f16, or int8 × scale) with gathers and gathers the x entries they
//! address; lanes never mix, so each `y[i][j]` is a scalar sequential sum.
//! A row of x holding a non-finite value takes the reference path (there
//! `∞·0 = NaN` at dropped positions matters). Each row's operations do not
//! depend on the other rows: every row of y is bit-identical whatever `m` is.

use std::sync::OnceLock;

use super::{CpuBackend, rd};
use crate::Tensor;
use crate::ops::{QMatmulSpec, QWeight};
use crate::quant::{QFormat, QView};

/// The instruction set the quantized kernels use (Avx2 means AVX2 + FMA + F16C).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Simd {
    Avx512,
    Avx2,
    Portable,
}

fn detect() -> Simd {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
            return Simd::Avx512;
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
            return Simd::Avx2;
        }
    }
    Simd::Portable
}

/// The best available set, or the one `DYNSPARSE_CPU_SIMD` names (a set
/// the CPU lacks, or an unknown name, falls back to the best with a warning).
pub fn simd() -> Simd {
    static S: OnceLock<Simd> = OnceLock::new();
    *S.get_or_init(|| {
        let best = detect();
        let rank = |s: Simd| match s {
            Simd::Portable => 0,
            Simd::Avx2 => 1,
            Simd::Avx512 => 2,
        };
        let want = match std::env::var("DYNSPARSE_CPU_SIMD").ok().as_deref().map(str::trim) {
            None | Some("") => return best,
            Some("portable") => Simd::Portable,
            Some("avx2") => Simd::Avx2,
            Some("avx512") => Simd::Avx512,
            Some(v) => {
                log::warn!("DYNSPARSE_CPU_SIMD={v}: expected avx512, avx2 or portable; using {best:?}");
                return best;
            }
        };
        if rank(want) > rank(best) {
            log::warn!("DYNSPARSE_CPU_SIMD: this CPU lacks {want:?}; using {best:?}");
            return best;
        }
        want
    })
}

/// One weight row's parts.
#[derive(Clone, Copy)]
struct RowParts<'a> {
    q: &'a [u32],
    /// int8: `[scale]`; int4: one per group.
    scale: &'a [f32],
    /// int4 asymmetric: the zero points (nibbles).
    zero: &'a [u32],
    asym: bool,
}

impl RowParts<'_> {
    /// int4: the code offset of group `g` (8, or its zero point).
    fn offset(&self, g: usize) -> i32 {
        if self.asym { ((self.zero[g / 8] >> (4 * (g % 8))) & 0xF) as i32 } else { 8 }
    }
}

fn byte_i8(q: &[u32], p: usize) -> i32 {
    ((q[p / 4] >> (8 * (p % 4))) & 0xFF) as u8 as i8 as i32
}

/// `s` plus the int8 products of `p` in `from..k`, in `p` order.
fn tail_int8(mut s: f32, x: &[f32], q: &[u32], from: usize, k: usize) -> f32 {
    for (p, &xp) in x.iter().enumerate().take(k).skip(from) {
        s += xp * byte_i8(q, p) as f32;
    }
    s
}

/// `Σ_p x[r][p]·q[p]` (before the scale) for R rows, int8.
fn int8_rows<const R: usize>(simd: Simd, xs: &[&[f32]; R], w: &RowParts, k: usize) -> [f32; R] {
    #[cfg(target_arch = "x86_64")]
    match simd {
        // SAFETY: `simd()` returns Avx512/Avx2 only when the CPU has those features.
        Simd::Avx512 => return unsafe { x86::int8_avx512(xs, w.q, k) },
        // SAFETY: as above.
        Simd::Avx2 => return unsafe { x86::int8_avx2(xs, w.q, k) },
        Simd::Portable => {}
    }
    let _ = simd;
    let mut out = [0.0f32; R];
    for (r, o) in out.iter_mut().enumerate() {
        let x = xs[r];
        let mut lanes = [0.0f32; 8];
        let full = k / 8 * 8;
        for p0 in (0..full).step_by(8) {
            for (l, acc) in lanes.iter_mut().enumerate() {
                *acc += x[p0 + l] * byte_i8(w.q, p0 + l) as f32;
            }
        }
        *o = tail_int8(lanes.iter().sum::<f32>(), x, w.q, full, k);
    }
    out
}

/// `Σ_g scale[g]·Σ_{p∈g} x[r][p]·(u[p] − z[g])` for R rows, int4.
fn int4_rows<const R: usize>(simd: Simd, xs: &[&[f32]; R], w: &RowParts, k: usize, group: usize) -> [f32; R] {
    #[cfg(target_arch = "x86_64")]
    match simd {
        // SAFETY: `simd()` returns Avx512/Avx2 only when the CPU has those features.
        Simd::Avx512 => return unsafe { x86::int4_avx512(xs, w, k, group) },
        // SAFETY: as above.
        Simd::Avx2 => return unsafe { x86::int4_avx2(xs, w, k, group) },
        Simd::Portable => {}
    }
    let _ = simd;
    let mut out = [0.0f32; R];
    for (r, o) in out.iter_mut().enumerate() {
        let x = xs[r];
        let mut total = [0.0f32; 8];
        for g in 0..k / group {
            let z = w.offset(g);
            let mut lanes = [0.0f32; 8];
            for wi in g * group / 8..(g + 1) * group / 8 {
                let word = w.q[wi];
                for (l, acc) in lanes.iter_mut().enumerate() {
                    let c = ((word >> (4 * l)) & 0xF) as i32 - z;
                    *acc += x[wi * 8 + l] * c as f32;
                }
            }
            for (t, l) in total.iter_mut().zip(lanes) {
                *t += l * w.scale[g];
            }
        }
        *o = total.iter().sum::<f32>();
    }
    out
}

/// One 2:4 weight's parts (all rows).
#[derive(Clone, Copy)]
struct View24<'a> {
    q: &'a [u32],
    meta: &'a [u32],
    /// 2:4-int8: one scale per row; f16 values: empty.
    scale: &'a [f32],
    /// u32 words of q and of meta per row.
    qw: usize,
    mw: usize,
    int8: bool,
}

impl View24<'_> {
    /// Row `j`, group `g`'s kept entries in `p` order as (offset in the
    /// group, weight). Positions `a` (first value) and `b` (second) come from
    /// the metadata nibble `a | b << 2`; when `a = b` the dequantized row holds
    /// only the second value there (it is written last), paired with a zero weight.
    fn group(&self, j: usize, g: usize) -> [(usize, f32); 2] {
        let m = ((self.meta[j * self.mw + g / 8] >> (4 * (g % 8))) & 0xF) as usize;
        let (a, b) = (m & 3, m >> 2);
        let q = &self.q[j * self.qw..(j + 1) * self.qw];
        let (va, vb) = if self.int8 {
            let s = self.scale[j];
            (s * byte_i8(q, 2 * g) as f32, s * byte_i8(q, 2 * g + 1) as f32)
        } else {
            let h = |bits: u32| half::f16::from_bits(bits as u16).to_f32();
            (h(q[g] & 0xFFFF), h(q[g] >> 16))
        };
        match a.cmp(&b) {
            std::cmp::Ordering::Less => [(a, va), (b, vb)],
            std::cmp::Ordering::Greater => [(b, vb), (a, va)],
            std::cmp::Ordering::Equal => [(a, vb), (a, 0.0)],
        }
    }
}

/// Lanes (output columns) of the 2:4 kernel at each SIMD level.
fn lanes24(simd: Simd) -> usize {
    match simd {
        Simd::Avx512 => 16,
        Simd::Avx2 => 8,
        Simd::Portable => 1,
    }
}

/// `y[r][l] = Σ_p xs[r][p]·w[cols[l]][p]` over the kept entries, for R rows
/// and `lanes24(simd)` columns (`cols` of that length; finite rows only).
fn s24_rows<const R: usize>(simd: Simd, xs: &[&[f32]; R], v: &View24, cols: &[usize], k: usize) -> [[f32; 16]; R] {
    #[cfg(target_arch = "x86_64")]
    match simd {
        // SAFETY: `simd()` returns Avx512/Avx2 only when the CPU has those features.
        Simd::Avx512 => return unsafe { x86::s24_avx512(xs, v, cols, k) },
        // SAFETY: as above.
        Simd::Avx2 => return unsafe { x86::s24_avx2(xs, v, cols, k) },
        Simd::Portable => {}
    }
    let _ = simd;
    let mut out = [[0.0f32; 16]; R];
    for (l, &j) in cols.iter().enumerate() {
        let mut acc = [0.0f32; R];
        for g in 0..k / 4 {
            let [(pa, va), (pb, vb)] = v.group(j, g);
            for r in 0..R {
                acc[r] += xs[r][4 * g + pa] * va;
                acc[r] += xs[r][4 * g + pb] * vb;
            }
        }
        for r in 0..R {
            out[r][l] = acc[r];
        }
    }
    out
}

/// Columns `j0..j0 + w` of y for every row of x (`m × k`) with a 2:4 weight,
/// into `out[i * w + (j − j0)]`.
#[allow(clippy::too_many_arguments)]
fn sparse24_block(
    simd: Simd,
    v: &View24,
    full: &QView,
    xv: &[f32],
    m: usize,
    k: usize,
    (j0, w): (usize, usize),
    out: &mut [f32],
) {
    let row = |i: usize| &xv[i * k..(i + 1) * k];
    let (finite, odd): (Vec<usize>, Vec<usize>) = (0..m).partition(|&i| row(i).iter().all(|x| x.is_finite()));
    let lanes = lanes24(simd);
    for c0 in (0..w).step_by(lanes) {
        let live = lanes.min(w - c0);
        // Lanes past the last column repeat it; their sums are dropped.
        let cols: Vec<usize> = (0..lanes).map(|l| j0 + c0 + l.min(live - 1)).collect();
        let mut put = |i: usize, y: &[f32; 16]| out[i * w + c0..i * w + c0 + live].copy_from_slice(&y[..live]);
        let mut t = 0;
        while t + TILE <= finite.len() {
            let ys = s24_rows(simd, &std::array::from_fn::<_, TILE, _>(|r| row(finite[t + r])), v, &cols, k);
            for (r, y) in ys.iter().enumerate() {
                put(finite[t + r], y);
            }
            t += TILE;
        }
        for &i in &finite[t..] {
            put(i, &s24_rows(simd, &[row(i)], v, &cols, k)[0]);
        }
    }
    // Non-finite rows: the reference (dequantize, then the dot product over every p).
    if !odd.is_empty() {
        let mut wr = vec![0.0f32; k];
        for jj in 0..w {
            full.dequantize_row(j0 + jj, &mut wr);
            for &i in &odd {
                let mut acc = 0.0f32;
                for (a, b) in row(i).iter().zip(&wr) {
                    acc += a * b;
                }
                out[i * w + jj] = acc;
            }
        }
    }
}

// The AVX-512 intrinsics of std::arch are stable since Rust 1.89 (the crate's rust-version).
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{RowParts, View24, tail_int8};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) fn int8_avx512<const R: usize>(xs: &[&[f32]; R], q: &[u32], k: usize) -> [f32; R] {
        let mut acc = [_mm512_setzero_ps(); R];
        let full = k / 16 * 16;
        for p in (0..full).step_by(16) {
            let qw = &q[p / 4..p / 4 + 4];
            // SAFETY: `qw` is 4 words = the 16 bytes read.
            let w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(unsafe { _mm_loadu_si128(qw.as_ptr().cast()) }));
            for r in 0..R {
                let xr = &xs[r][p..p + 16];
                // SAFETY: `xr` holds the 16 floats read.
                acc[r] = _mm512_fmadd_ps(unsafe { _mm512_loadu_ps(xr.as_ptr()) }, w, acc[r]);
            }
        }
        let mut out = [0.0f32; R];
        for r in 0..R {
            out[r] = tail_int8(_mm512_reduce_add_ps(acc[r]), xs[r], q, full, k);
        }
        out
    }

    #[target_feature(enable = "avx2,fma")]
    fn hsum256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn int8_avx2<const R: usize>(xs: &[&[f32]; R], q: &[u32], k: usize) -> [f32; R] {
        let mut acc = [_mm256_setzero_ps(); R];
        let full = k / 8 * 8;
        for p in (0..full).step_by(8) {
            let qw = &q[p / 4..p / 4 + 2];
            // SAFETY: `qw` is 2 words = the 8 bytes read.
            let w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(unsafe { _mm_loadl_epi64(qw.as_ptr().cast()) }));
            for r in 0..R {
                let xr = &xs[r][p..p + 8];
                // SAFETY: `xr` holds the 8 floats read.
                acc[r] = _mm256_fmadd_ps(unsafe { _mm256_loadu_ps(xr.as_ptr()) }, w, acc[r]);
            }
        }
        let mut out = [0.0f32; R];
        for r in 0..R {
            out[r] = tail_int8(hsum256(acc[r]), xs[r], q, full, k);
        }
        out
    }

    /// AVX-512: 16 columns per lane set (module docs, 2:4).
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) fn s24_avx512<const R: usize>(xs: &[&[f32]; R], v: &View24, cols: &[usize], k: usize) -> [[f32; 16]; R] {
        let col = |stride: usize| {
            let c: [i32; 16] = std::array::from_fn(|l| (cols[l] * stride) as i32);
            // SAFETY: `c` holds the 16 ints read.
            unsafe { _mm512_loadu_si512(c.as_ptr().cast()) }
        };
        let (qbase, mbase) = (col(v.qw), col(v.mw));
        // SAFETY: every lane's index is a row of the scale vector (int8 has one per row).
        let scale =
            if v.int8 { unsafe { _mm512_i32gather_ps::<4>(col(1), v.scale.as_ptr()) } } else { _mm512_setzero_ps() };
        let mut acc = [_mm512_setzero_ps(); R];
        for g in 0..k / 4 {
            // SAFETY: lane l reads word g/8 of row cols[l]'s metadata, inside `meta`.
            let mword = unsafe {
                _mm512_i32gather_epi32::<4>(
                    _mm512_add_epi32(mbase, _mm512_set1_epi32((g / 8) as i32)),
                    v.meta.as_ptr().cast(),
                )
            };
            let m = _mm512_and_si512(
                _mm512_srlv_epi32(mword, _mm512_set1_epi32((4 * (g % 8)) as i32)),
                _mm512_set1_epi32(0xF),
            );
            let a = _mm512_and_si512(m, _mm512_set1_epi32(3));
            let b = _mm512_srli_epi32::<2>(m);
            let (va, vb) = if v.int8 {
                // SAFETY: lane l reads word g/2 of row cols[l]'s codes.
                let word = unsafe {
                    _mm512_i32gather_epi32::<4>(
                        _mm512_add_epi32(qbase, _mm512_set1_epi32((g / 2) as i32)),
                        v.q.as_ptr().cast(),
                    )
                };
                // Bytes 2g and 2g+1 sit at bit 16·(g mod 2) and 8 above: shift each to the top, sign-extend down.
                let sh = (16 * (g % 2)) as i32;
                let ba = _mm512_srai_epi32::<24>(_mm512_sllv_epi32(word, _mm512_set1_epi32(24 - sh)));
                let bb = _mm512_srai_epi32::<24>(_mm512_sllv_epi32(word, _mm512_set1_epi32(16 - sh)));
                (_mm512_mul_ps(scale, _mm512_cvtepi32_ps(ba)), _mm512_mul_ps(scale, _mm512_cvtepi32_ps(bb)))
            } else {
                // SAFETY: lane l reads word g of row cols[l]'s values.
                let word = unsafe {
                    _mm512_i32gather_epi32::<4>(
                        _mm512_add_epi32(qbase, _mm512_set1_epi32(g as i32)),
                        v.q.as_ptr().cast(),
                    )
                };
                (
                    _mm512_cvtph_ps(_mm512_cvtepi32_epi16(word)),
                    _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(word))),
                )
            };
            let lt = _mm512_cmplt_epi32_mask(a, b);
            let gt = _mm512_cmpgt_epi32_mask(a, b);
            // (lo, first) then (hi, second): first = a<b ? va : vb; second = a<b ? vb : (a>b ? va : 0).
            let first = _mm512_mask_blend_ps(lt, vb, va);
            let second = _mm512_mask_blend_ps(lt, _mm512_maskz_mov_ps(gt, va), vb);
            let base = _mm512_set1_epi32((4 * g) as i32);
            let ilo = _mm512_add_epi32(base, _mm512_min_epi32(a, b));
            let ihi = _mm512_add_epi32(base, _mm512_max_epi32(a, b));
            for r in 0..R {
                // SAFETY: indices are 4g + (0..4) < k, inside the row of x.
                let (xl, xh) = unsafe {
                    (_mm512_i32gather_ps::<4>(ilo, xs[r].as_ptr()), _mm512_i32gather_ps::<4>(ihi, xs[r].as_ptr()))
                };
                acc[r] = _mm512_add_ps(acc[r], _mm512_mul_ps(xl, first));
                acc[r] = _mm512_add_ps(acc[r], _mm512_mul_ps(xh, second));
            }
        }
        let mut out = [[0.0f32; 16]; R];
        for r in 0..R {
            // SAFETY: `out[r]` holds the 16 floats written.
            unsafe { _mm512_storeu_ps(out[r].as_mut_ptr(), acc[r]) };
        }
        out
    }

    /// AVX2 + F16C: 8 columns per lane set.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn s24_avx2<const R: usize>(xs: &[&[f32]; R], v: &View24, cols: &[usize], k: usize) -> [[f32; 16]; R] {
        let col = |stride: usize| {
            let c: [i32; 8] = std::array::from_fn(|l| (cols[l] * stride) as i32);
            // SAFETY: `c` holds the 8 ints read.
            unsafe { _mm256_loadu_si256(c.as_ptr().cast()) }
        };
        let (qbase, mbase) = (col(v.qw), col(v.mw));
        // SAFETY: every lane's index is a row of the scale vector.
        let scale =
            if v.int8 { unsafe { _mm256_i32gather_ps::<4>(v.scale.as_ptr(), col(1)) } } else { _mm256_setzero_ps() };
        let low16 = _mm256_set1_epi32(0xFFFF);
        // 8 × u32 (each < 2¹⁶) → 8 × u16, in lane order.
        let pack = |x: __m256i| _mm_packus_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256::<1>(x));
        let mut acc = [_mm256_setzero_ps(); R];
        for g in 0..k / 4 {
            // SAFETY: lane l reads word g/8 of row cols[l]'s metadata.
            let mword = unsafe {
                _mm256_i32gather_epi32::<4>(
                    v.meta.as_ptr().cast(),
                    _mm256_add_epi32(mbase, _mm256_set1_epi32((g / 8) as i32)),
                )
            };
            let m = _mm256_and_si256(
                _mm256_srlv_epi32(mword, _mm256_set1_epi32((4 * (g % 8)) as i32)),
                _mm256_set1_epi32(0xF),
            );
            let a = _mm256_and_si256(m, _mm256_set1_epi32(3));
            let b = _mm256_srli_epi32::<2>(m);
            let (va, vb) = if v.int8 {
                // SAFETY: lane l reads word g/2 of row cols[l]'s codes.
                let word = unsafe {
                    _mm256_i32gather_epi32::<4>(
                        v.q.as_ptr().cast(),
                        _mm256_add_epi32(qbase, _mm256_set1_epi32((g / 2) as i32)),
                    )
                };
                let sh = (16 * (g % 2)) as i32;
                let ba = _mm256_srai_epi32::<24>(_mm256_sllv_epi32(word, _mm256_set1_epi32(24 - sh)));
                let bb = _mm256_srai_epi32::<24>(_mm256_sllv_epi32(word, _mm256_set1_epi32(16 - sh)));
                (_mm256_mul_ps(scale, _mm256_cvtepi32_ps(ba)), _mm256_mul_ps(scale, _mm256_cvtepi32_ps(bb)))
            } else {
                // SAFETY: lane l reads word g of row cols[l]'s values.
                let word = unsafe {
                    _mm256_i32gather_epi32::<4>(
                        v.q.as_ptr().cast(),
                        _mm256_add_epi32(qbase, _mm256_set1_epi32(g as i32)),
                    )
                };
                (
                    _mm256_cvtph_ps(pack(_mm256_and_si256(word, low16))),
                    _mm256_cvtph_ps(pack(_mm256_srli_epi32::<16>(word))),
                )
            };
            let lt = _mm256_castsi256_ps(_mm256_cmpgt_epi32(b, a));
            let gt = _mm256_castsi256_ps(_mm256_cmpgt_epi32(a, b));
            let first = _mm256_blendv_ps(vb, va, lt);
            let second = _mm256_blendv_ps(_mm256_and_ps(va, gt), vb, lt);
            let base = _mm256_set1_epi32((4 * g) as i32);
            let ilo = _mm256_add_epi32(base, _mm256_min_epi32(a, b));
            let ihi = _mm256_add_epi32(base, _mm256_max_epi32(a, b));
            for r in 0..R {
                // SAFETY: indices are 4g + (0..4) < k, inside the row of x.
                let (xl, xh) = unsafe {
                    (_mm256_i32gather_ps::<4>(xs[r].as_ptr(), ilo), _mm256_i32gather_ps::<4>(xs[r].as_ptr(), ihi))
                };
                acc[r] = _mm256_add_ps(acc[r], _mm256_mul_ps(xl, first));
                acc[r] = _mm256_add_ps(acc[r], _mm256_mul_ps(xh, second));
            }
        }
        let mut out = [[0.0f32; 16]; R];
        for r in 0..R {
            // SAFETY: `out[r]` holds at least the 8 floats written.
            unsafe { _mm256_storeu_ps(out[r].as_mut_ptr(), acc[r]) };
        }
        out
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) fn int4_avx512<const R: usize>(xs: &[&[f32]; R], w: &RowParts, k: usize, group: usize) -> [f32; R] {
        // Lanes 0–7 take nibbles 0–7 of the first word, lanes 8–15 those of the second.
        let idx = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
        let shifts = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
        let mask = _mm512_set1_epi32(0xF);
        let mut acc = [_mm512_setzero_ps(); R];
        for g in 0..k / group {
            let z = _mm512_set1_epi32(w.offset(g));
            let mut ga = [_mm512_setzero_ps(); R];
            for p in (g * group..(g + 1) * group).step_by(16) {
                let qw = &w.q[p / 8..p / 8 + 2];
                // SAFETY: `qw` is 2 words = the 8 bytes read.
                let two = _mm512_zextsi128_si512(unsafe { _mm_loadl_epi64(qw.as_ptr().cast()) });
                let u = _mm512_and_si512(_mm512_srlv_epi32(_mm512_permutexvar_epi32(idx, two), shifts), mask);
                let c = _mm512_cvtepi32_ps(_mm512_sub_epi32(u, z));
                for r in 0..R {
                    let xr = &xs[r][p..p + 16];
                    // SAFETY: `xr` holds the 16 floats read.
                    ga[r] = _mm512_fmadd_ps(unsafe { _mm512_loadu_ps(xr.as_ptr()) }, c, ga[r]);
                }
            }
            let s = _mm512_set1_ps(w.scale[g]);
            for r in 0..R {
                acc[r] = _mm512_fmadd_ps(ga[r], s, acc[r]);
            }
        }
        let mut out = [0.0f32; R];
        for r in 0..R {
            out[r] = _mm512_reduce_add_ps(acc[r]);
        }
        out
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn int4_avx2<const R: usize>(xs: &[&[f32]; R], w: &RowParts, k: usize, group: usize) -> [f32; R] {
        let shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
        let mask = _mm256_set1_epi32(0xF);
        let mut acc = [_mm256_setzero_ps(); R];
        for g in 0..k / group {
            let z = _mm256_set1_epi32(w.offset(g));
            let mut ga = [_mm256_setzero_ps(); R];
            for p in (g * group..(g + 1) * group).step_by(8) {
                let word = _mm256_set1_epi32(w.q[p / 8] as i32);
                let u = _mm256_and_si256(_mm256_srlv_epi32(word, shifts), mask);
                let c = _mm256_cvtepi32_ps(_mm256_sub_epi32(u, z));
                for r in 0..R {
                    let xr = &xs[r][p..p + 8];
                    // SAFETY: `xr` holds the 8 floats read.
                    ga[r] = _mm256_fmadd_ps(unsafe { _mm256_loadu_ps(xr.as_ptr()) }, c, ga[r]);
                }
            }
            let s = _mm256_set1_ps(w.scale[g]);
            for r in 0..R {
                acc[r] = _mm256_fmadd_ps(ga[r], s, acc[r]);
            }
        }
        let mut out = [0.0f32; R];
        for r in 0..R {
            out[r] = hsum256(acc[r]);
        }
        out
    }
}

/// Rows of x per tile sharing each decoded weight vector.
const TILE: usize = 4;

/// `y[i][j]` for every row i of x (`m` rows of `k`) and one weight row
/// (int8 or int4), handed to `put(i, y)`.
fn column(simd: Simd, f: QFormat, xv: &[f32], m: usize, k: usize, w: &RowParts, mut put: impl FnMut(usize, f32)) {
    let row = |i: usize| &xv[i * k..(i + 1) * k];
    let tile = |xs: &[&[f32]; TILE]| -> [f32; TILE] {
        match f {
            QFormat::Int4 { group, .. } => int4_rows(simd, xs, w, k, group),
            _ => int8_rows(simd, xs, w, k).map(|s| s * w.scale[0]),
        }
    };
    let one = |x: &[f32]| -> f32 {
        match f {
            QFormat::Int4 { group, .. } => int4_rows(simd, &[x], w, k, group)[0],
            _ => int8_rows(simd, &[x], w, k)[0] * w.scale[0],
        }
    };
    let mut i = 0;
    while i + TILE <= m {
        let out = tile(&std::array::from_fn(|t| row(i + t)));
        for (t, v) in out.into_iter().enumerate() {
            put(i + t, v);
        }
        i += TILE;
    }
    for i in i..m {
        put(i, one(row(i)));
    }
}

pub(super) fn qmatmul(s: &QMatmulSpec, x: &Tensor<CpuBackend>, w: &QWeight<CpuBackend>, y: &mut Tensor<CpuBackend>) {
    use rayon::prelude::*;
    let (m, n, k) = (s.m, s.n, s.k);
    let xv = rd(x);
    let scale = w.scale.as_ref().map(rd);
    let (q_g, zero_g, meta_g) =
        (w.q.buf.u32s(), w.zero.as_ref().map(|t| t.buf.u32s()), w.meta.as_ref().map(|t| t.buf.u32s()));
    let view = QView {
        format: w.format,
        n,
        k,
        q: &q_g,
        scale: scale.as_deref().unwrap_or(&[]),
        zero: zero_g.as_deref().unwrap_or(&[]),
        meta: meta_g.as_deref().unwrap_or(&[]),
    };
    let f = w.format;
    let simd = simd();
    // The gathers index words with i32: a weight past that falls back to the portable 2:4 kernel.
    let simd24 = if n * f.q_words(k).max(f.meta_words(k)) < i32::MAX as usize { simd } else { Simd::Portable };
    let (qw, sw, zw) = (f.q_words(k), f.scales_per_row(k), f.zero_words(k));
    // Columns of y per task.
    const COLS: usize = 16;
    let cols: Vec<(usize, Vec<f32>)> = (0..n)
        .step_by(COLS)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|j0| {
            let w_ = COLS.min(n - j0);
            let mut out = vec![0.0f32; m * w_];
            if let QFormat::Sparse24 { int8 } = f {
                let v24 = View24 { q: view.q, meta: view.meta, scale: view.scale, qw, mw: f.meta_words(k), int8 };
                sparse24_block(simd24, &v24, &view, &xv, m, k, (j0, w_), &mut out);
                return (j0, out);
            }
            for jj in 0..w_ {
                let j = j0 + jj;
                let parts = RowParts {
                    q: &view.q[j * qw..(j + 1) * qw],
                    scale: &view.scale[j * sw..(j + 1) * sw],
                    zero: &view.zero[j * zw..(j + 1) * zw],
                    asym: matches!(f, QFormat::Int4 { asym: true, .. }),
                };
                column(simd, f, &xv, m, k, &parts, |i, v| out[i * w_ + jj] = v);
            }
            (j0, out)
        })
        .collect();
    y.buf.produce(|yv| {
        for (j0, out) in cols {
            let w_ = COLS.min(n - j0);
            for i in 0..m {
                yv[i * n + j0..i * n + j0 + w_].copy_from_slice(&out[i * w_..(i + 1) * w_]);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::QMatrix;
    use crate::util::rng::Rng;

    /// Every 2:4 kernel level this CPU has, against the host reference
    /// (`QMatrix::matmul_ref`), bit for bit: f16 and int8 values, a column
    /// count that leaves partial lane sets, a tile of rows plus a tail, a row
    /// holding ∞ (the reference path), and a group whose two positions
    /// coincide (the dequantized row keeps the second value).
    #[test]
    fn sparse24_kernels_are_bit_identical_to_the_reference() {
        let mut levels = vec![Simd::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
                levels.push(Simd::Avx2);
            }
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
                levels.push(Simd::Avx512);
            }
        }
        let (m, n, k) = (7, 37, 200);
        let mut rng = Rng::new(24);
        for int8 in [false, true] {
            let f = QFormat::Sparse24 { int8 };
            let w: Vec<f32> = rng.normal_vec(n * k).into_iter().map(|x| x * 0.1).collect();
            let mut qm = QMatrix::quantize(&w, n, k, f).unwrap();
            // Row 3, group 5: both positions 2.
            let (mw, g) = (f.meta_words(k), 5);
            let word = &mut qm.meta[3 * mw + g / 8];
            *word = (*word & !(0xF << (4 * (g % 8)))) | (0b1010 << (4 * (g % 8)));
            let mut x: Vec<f32> = rng.normal_vec(m * k);
            x[5 * k + 11] = f32::INFINITY;
            let want = qm.matmul_ref(&x, m);
            let bits = |v: &[f32]| v.iter().map(|y| y.to_bits()).collect::<Vec<_>>();
            for &simd in &levels {
                let view = QView { format: f, n, k, q: &qm.q, scale: &qm.scale, zero: &qm.zero, meta: &qm.meta };
                let v24 = View24 { q: &qm.q, meta: &qm.meta, scale: &qm.scale, qw: f.q_words(k), mw, int8 };
                let mut got = vec![0.0f32; m * n];
                for j0 in (0..n).step_by(16) {
                    let w_ = 16.min(n - j0);
                    let mut out = vec![0.0f32; m * w_];
                    sparse24_block(simd, &v24, &view, &x, m, k, (j0, w_), &mut out);
                    for i in 0..m {
                        got[i * n + j0..i * n + j0 + w_].copy_from_slice(&out[i * w_..(i + 1) * w_]);
                    }
                }
                assert_eq!(bits(&got), bits(&want), "{f} {simd:?}");
                // Batch invariance: row 6 alone.
                let mut alone = vec![0.0f32; 16];
                sparse24_block(simd, &v24, &view, &x[6 * k..], 1, k, (16, 16), &mut alone);
                assert_eq!(bits(&alone), bits(&want[6 * n + 16..6 * n + 32]), "{f} {simd:?} alone");
            }
        }
    }
}
