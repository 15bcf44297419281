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
//! 2:4 formats dequantize one weight row at a time and take its dot product
//! with every row of x in `p` order (the reference algorithm).

use std::sync::OnceLock;

use super::{CpuBackend, rd};
use crate::Tensor;
use crate::ops::{QMatmulSpec, QWeight};
use crate::quant::{QFormat, QView};

/// The instruction set the quantized kernels use.
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
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
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

// The AVX-512 intrinsics of std::arch are stable since Rust 1.89 (the crate's rust-version).
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{RowParts, tail_int8};
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
    let view = QView {
        format: w.format,
        n,
        k,
        q: w.q.buf.u32s(),
        scale: scale.as_deref().unwrap_or(&[]),
        zero: w.zero.as_ref().map_or(&[][..], |t| t.buf.u32s()),
        meta: w.meta.as_ref().map_or(&[][..], |t| t.buf.u32s()),
    };
    let f = w.format;
    let sparse = matches!(f, QFormat::Sparse24 { .. });
    let simd = simd();
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
            let mut wr = vec![0.0f32; if sparse { k } else { 0 }];
            for jj in 0..w_ {
                let j = j0 + jj;
                if sparse {
                    view.dequantize_row(j, &mut wr);
                    for i in 0..m {
                        let xr = &xv[i * k..(i + 1) * k];
                        let mut acc = 0.0f32;
                        for p in 0..k {
                            acc += xr[p] * wr[p];
                        }
                        out[i * w_ + jj] = acc;
                    }
                    continue;
                }
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
