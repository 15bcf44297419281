//! The row-invariant products of the inference step, in three variants chosen
//! once at run time: AVX-512F + FMA, AVX2 + FMA, and portable Rust (the
//! baseline x86-64 / any target). `DYNSPARSE_CPU_SIMD=avx512|avx2|portable`
//! forces one (a variant the CPU lacks falls back to the best it has), so the
//! tests can run every variant on one machine.
//!
//! Two kernels, both writing raw sums (the caller applies α and β):
//! - [`rows_times_b`]: `out[i, j] = Σ_p a[i, p]·b[p, j]` (B's rows contiguous:
//!   weights stored k×n, the P·V product over a value tile);
//! - [`rows_dot_bt`]: `out[i, j] = Σ_p a[i, p]·b[j, p]` (B's rows are the
//!   columns of op(B): the tied LM head, Q·Kᵀ over a key tile).
//!
//! Batch invariance: within a variant every output element is computed by one
//! fixed sequence of operations that depends only on `k` and its own row of A
//! and column of B — never on `m`, the row tile it falls in, or its column
//! position. [`rows_times_b`] runs `t ← fma(a[i,p], b[p,j], t)` for p = 0..k
//! from t = 0 (portable: `t ← t + a·b`, unfused); a column tail is the same
//! vector code with masked loads and stores. [`rows_dot_bt`] keeps L lanes
//! (16 / 8 / 8), lane l accumulating the p ≡ l (mod L) terms in order by FMA
//! (the tail through a zero-filled masked load, so into the same lanes), then
//! adds the lanes in one fixed tree. So a row computed alone is bit-identical
//! to the same row in any ragged step.
//!
//! Register tiles: AVX-512 6 rows × 64 columns (24 zmm accumulators, 4 loads
//! of B and 6 broadcasts per 24 FMAs). AVX2: panels of 64 columns of B
//! outside, K blocks of 64 rows (16 KiB, kept in L1), every row tile of A
//! inside, so B — the weights — is read from memory once per call whatever
//! `m` is; a tile of R rows spans 8–12 ymm accumulators (4–6 rows × 16
//! columns, 2–3 × 32, a lone decode row 1 × 64), enough independent FMA
//! chains to hide the FMA latency. B is streamed in place (row stride
//! `rsb`), never packed. [`rows_dot_bt`]'s AVX2 kernel runs 8 columns of B per
//! pass over a row of A (8 chains). The tile shape never changes an
//! element's operation sequence (above), only which registers hold it.

use std::sync::OnceLock;

/// A kernel family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Simd {
    Avx512,
    Avx2,
    Portable,
}

impl Simd {
    pub fn name(self) -> &'static str {
        match self {
            Simd::Avx512 => "avx512",
            Simd::Avx2 => "avx2",
            Simd::Portable => "portable",
        }
    }

    /// Whether this CPU runs the variant.
    pub fn available(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 => {
                std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"),
            Simd::Portable => true,
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// The fastest available variant, or the one `forced` names when the CPU
    /// runs it (an unknown or unavailable name is reported and ignored).
    fn choose(forced: Option<&str>) -> Simd {
        let best = [Simd::Avx512, Simd::Avx2].into_iter().find(|v| v.available()).unwrap_or(Simd::Portable);
        let Some(name) = forced.map(str::trim).filter(|s| !s.is_empty()) else {
            return best;
        };
        match [Simd::Avx512, Simd::Avx2, Simd::Portable].into_iter().find(|v| v.name().eq_ignore_ascii_case(name)) {
            Some(v) if v.available() => v,
            Some(v) => {
                log::warn!("DYNSPARSE_CPU_SIMD={name}: this CPU lacks {}; using {}", v.name(), best.name());
                best
            }
            None => {
                log::warn!("DYNSPARSE_CPU_SIMD={name}: expected avx512, avx2 or portable; using {}", best.name());
                best
            }
        }
    }
}

/// The variant of this process, chosen on first use.
pub fn simd() -> Simd {
    static CHOICE: OnceLock<Simd> = OnceLock::new();
    *CHOICE.get_or_init(|| Simd::choose(std::env::var("DYNSPARSE_CPU_SIMD").ok().as_deref()))
}

/// Elements a strided matrix of `rows` rows of `cols` at row stride `rs`
/// reaches (0 when empty).
fn reach(rows: usize, cols: usize, rs: usize) -> usize {
    if rows == 0 || cols == 0 { 0 } else { (rows - 1) * rs + cols }
}

/// `out[i·rso + j] = Σ_p a[i·rsa + p]·b[p·rsb + j]` for i < m, j < n, p < k.
#[allow(clippy::too_many_arguments)]
pub fn rows_times_b(
    v: Simd,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    rsa: usize,
    b: &[f32],
    rsb: usize,
    out: &mut [f32],
    rso: usize,
) {
    rows_times_b_into(v, m, n, k, a, rsa, b, rsb, out, rso, false)
}

/// [`rows_times_b`] continuing from the sums already in `out` when `acc`:
/// each element's chain of operations resumes where a previous call over
/// `p < k₀` left it (an exact f32 round trip), so splitting the sum over p
/// into consecutive calls gives the bits of one call over all of p — the
/// cached P·V product runs one call per KV page without gathering the pages.
#[allow(clippy::too_many_arguments)]
pub fn rows_times_b_into(
    v: Simd,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    rsa: usize,
    b: &[f32],
    rsb: usize,
    out: &mut [f32],
    rso: usize,
    acc: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        reach(m, k, rsa) <= a.len() && reach(k, n, rsb) <= b.len() && reach(m, n, rso) <= out.len(),
        "rows_times_b: {m}×{n}×{k} out of bounds (a bug: callers pass validated shapes)"
    );
    if k == 0 {
        if !acc {
            (0..m).for_each(|i| out[i * rso..i * rso + n].fill(0.0));
        }
        return;
    }
    match v {
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 if v.available() => {
            // SAFETY: the CPU has AVX-512F and FMA (checked just above), and the
            // assert proves every index the kernel reads or writes
            // (i·rsa + p, p·rsb + j, i·rso + j) lies in its slice; masked lanes
            // past n are neither read nor written.
            unsafe { x86::rtb_avx512(m, n, k, a.as_ptr(), rsa, b.as_ptr(), rsb, out.as_mut_ptr(), rso, acc) }
        }
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 if v.available() => {
            // SAFETY: as above, for AVX2 and FMA.
            unsafe { x86::rtb_avx2(m, n, k, a.as_ptr(), rsa, b.as_ptr(), rsb, out.as_mut_ptr(), rso, acc) }
        }
        _ => portable::rows_times_b(m, n, k, a, rsa, b, rsb, out, rso, acc),
    }
}

/// `out[i·rso + j] = Σ_p a[i·rsa + p]·b[j·rsb + p]` for i < m, j < n, p < k.
#[allow(clippy::too_many_arguments)]
pub fn rows_dot_bt(
    v: Simd,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    rsa: usize,
    b: &[f32],
    rsb: usize,
    out: &mut [f32],
    rso: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        reach(m, k, rsa) <= a.len() && reach(n, k, rsb) <= b.len() && reach(m, n, rso) <= out.len(),
        "rows_dot_bt: {m}×{n}×{k} out of bounds (a bug: callers pass validated shapes)"
    );
    match v {
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 if v.available() => {
            // SAFETY: AVX-512F and FMA present (checked); the assert proves the
            // rows a[i·rsa..+k], b[j·rsb..+k] and out[i·rso..+n] lie in their
            // slices, and the tail loads are masked to them.
            unsafe { x86::dot_avx512(m, n, k, a.as_ptr(), rsa, b.as_ptr(), rsb, out.as_mut_ptr(), rso) }
        }
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 if v.available() => {
            // SAFETY: as above, for AVX2 and FMA.
            unsafe { x86::dot_avx2(m, n, k, a.as_ptr(), rsa, b.as_ptr(), rsb, out.as_mut_ptr(), rso) }
        }
        _ => {
            for i in 0..m {
                let ar = &a[i * rsa..i * rsa + k];
                for j in 0..n {
                    out[i * rso + j] = super::attention::dot(ar, &b[j * rsb..j * rsb + k]);
                }
            }
        }
    }
}

/// The portable variant: 4 × 8 register tiles, `t = t + a·b` over p in order.
mod portable {
    const TR: usize = 4;
    const TW: usize = 8;

    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn tile<const R: usize>(
        k: usize,
        a: &[f32],
        rsa: usize,
        b: &[f32],
        rsb: usize,
        out: &mut [f32],
        rso: usize,
        (i0, j0): (usize, usize),
        acc: bool,
    ) {
        let mut t = [[0.0f32; TW]; R];
        if acc {
            for (i, ti) in t.iter_mut().enumerate() {
                ti.copy_from_slice(&out[(i0 + i) * rso + j0..(i0 + i) * rso + j0 + TW]);
            }
        }
        for p in 0..k {
            let bp: &[f32; TW] = b[p * rsb + j0..p * rsb + j0 + TW].try_into().expect("a full tile");
            for (i, ti) in t.iter_mut().enumerate() {
                let x = a[(i0 + i) * rsa + p];
                for l in 0..TW {
                    ti[l] += x * bp[l];
                }
            }
        }
        for (i, ti) in t.iter().enumerate() {
            out[(i0 + i) * rso + j0..(i0 + i) * rso + j0 + TW].copy_from_slice(ti);
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn rows_times_b(
        m: usize,
        n: usize,
        k: usize,
        a: &[f32],
        rsa: usize,
        b: &[f32],
        rsb: usize,
        out: &mut [f32],
        rso: usize,
        acc: bool,
    ) {
        // Column blocks of 8 outside (B's strip stays in L1), row tiles of up to 4 inside.
        for j0 in (0..n).step_by(TW) {
            let wb = TW.min(n - j0);
            for i0 in (0..m).step_by(TR) {
                let rows = TR.min(m - i0);
                let at = (i0, j0);
                match (rows, wb) {
                    (4, TW) => tile::<4>(k, a, rsa, b, rsb, out, rso, at, acc),
                    (3, TW) => tile::<3>(k, a, rsa, b, rsb, out, rso, at, acc),
                    (2, TW) => tile::<2>(k, a, rsa, b, rsb, out, rso, at, acc),
                    (1, TW) => tile::<1>(k, a, rsa, b, rsb, out, rso, at, acc),
                    _ => {
                        for i in i0..i0 + rows {
                            let mut t = [0.0f32; TW];
                            if acc {
                                t[..wb].copy_from_slice(&out[i * rso + j0..i * rso + j0 + wb]);
                            }
                            for p in 0..k {
                                let x = a[i * rsa + p];
                                t.iter_mut().zip(&b[p * rsb + j0..p * rsb + j0 + wb]).for_each(|(o, &y)| *o += x * y);
                            }
                            out[i * rso + j0..i * rso + j0 + wb].copy_from_slice(&t[..wb]);
                        }
                    }
                }
            }
        }
    }
}

// The AVX-512 intrinsics of std::arch are stable since Rust 1.89 (the crate's rust-version).
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Rows per register tile (both x86 variants).
    const TR: usize = 6;
    /// Rows of B ahead of the one in use that a tile prefetches: B's rows lie
    /// `rsb` floats apart (a page or more for a weight matrix), which the
    /// hardware prefetchers do not follow, so without it every row of a
    /// tile's first pass waits on L3 or DRAM.
    const PREFETCH: usize = 24;
    /// Rows of B per K block: a block of B (KB × 64 floats for AVX-512 and
    /// for an AVX2 panel: 32 KiB, 16 KiB) stays in L1 while every row group
    /// of A passes over it, instead of being re-read from L2 or L3.
    const KB512: usize = 128;
    const KB256: usize = 64;

    // ------------------------------------------------------------ AVX-512

    /// Lanes `j0 + 16·v + l < n` of the 4 vectors of a 64-column block.
    fn masks512(n: usize, j0: usize) -> [__mmask16; 4] {
        std::array::from_fn(|v| {
            let left = n.saturating_sub(j0 + 16 * v).min(16);
            if left == 16 { 0xffff } else { ((1u32 << left) - 1) as __mmask16 }
        })
    }

    /// R rows × 64 columns: `acc[i][v] ← fma(a[i,p], b[p, 16v..16v+16], acc[i][v])`
    /// for p in `[p0, p1)`, `acc` starting from 0 when `p0 = 0`, else from
    /// what the previous K block stored in `out` (an exact f32 round trip, so
    /// the chain of FMAs is the one an unblocked loop runs).
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile512<const R: usize>(
        (p0, p1, k): (usize, usize, usize),
        a: *const f32,
        rsa: usize,
        b: *const f32,
        rsb: usize,
        out: *mut f32,
        rso: usize,
        mk: [__mmask16; 4],
        resume: bool,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        if p0 > 0 || resume {
            for (i, acc) in acc.iter_mut().enumerate() {
                for v in 0..4 {
                    // SAFETY: as below (the stores' lanes).
                    acc[v] = unsafe { _mm512_maskz_loadu_ps(mk[v], out.wrapping_add(i * rso + 16 * v)) };
                }
            }
        }
        for p in p0..p1 {
            // SAFETY (all blocks of this function): the caller proved rows i < R
            // of A up to k, rows p < k of B up to the masked lanes, and rows
            // i < R of out up to the masked lanes lie in their slices; masked
            // lanes are neither loaded nor stored (AVX-512 suppresses faults on
            // them), and the offsets are formed with wrapping arithmetic.
            let bp = unsafe { b.add(p * rsb) };
            if p + PREFETCH < k {
                for v in 0..4 {
                    _mm_prefetch::<_MM_HINT_T0>(bp.wrapping_add(PREFETCH * rsb + 16 * v) as *const i8);
                }
            }
            let bv: [__m512; 4] =
                std::array::from_fn(|v| unsafe { _mm512_maskz_loadu_ps(mk[v], bp.wrapping_add(16 * v)) });
            for (i, acc) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_ps(unsafe { *a.add(i * rsa + p) });
                for v in 0..4 {
                    acc[v] = _mm512_fmadd_ps(x, bv[v], acc[v]);
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            for v in 0..4 {
                // SAFETY: as above.
                unsafe { _mm512_mask_storeu_ps(out.wrapping_add(i * rso + 16 * v), mk[v], acc[v]) };
            }
        }
    }

    #[target_feature(enable = "avx512f,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn rtb_avx512(
        m: usize,
        n: usize,
        k: usize,
        a: *const f32,
        rsa: usize,
        b: *const f32,
        rsb: usize,
        out: *mut f32,
        rso: usize,
        resume: bool,
    ) {
        for (j0, kb) in
            (0..n).step_by(64).flat_map(|j0| (0..k).step_by(KB512).map(move |p0| (j0, (p0, k.min(p0 + KB512), k))))
        {
            let mk = masks512(n, j0);
            for i0 in (0..m).step_by(TR) {
                // SAFETY: i0 < m and j0 < n, so the tile's origin is inside the
                // ranges the caller proved; the tile stays inside them (rows up
                // to min(TR, m − i0), lanes masked to n).
                unsafe {
                    let (at, bt, ot) = (a.add(i0 * rsa), b.add(j0), out.add(i0 * rso + j0));
                    match TR.min(m - i0) {
                        6 => tile512::<6>(kb, at, rsa, bt, rsb, ot, rso, mk, resume),
                        5 => tile512::<5>(kb, at, rsa, bt, rsb, ot, rso, mk, resume),
                        4 => tile512::<4>(kb, at, rsa, bt, rsb, ot, rso, mk, resume),
                        3 => tile512::<3>(kb, at, rsa, bt, rsb, ot, rso, mk, resume),
                        2 => tile512::<2>(kb, at, rsa, bt, rsb, ot, rso, mk, resume),
                        _ => tile512::<1>(kb, at, rsa, bt, rsb, ot, rso, mk, resume),
                    }
                }
            }
        }
    }

    /// `Σ` of the 16 lanes in a fixed tree: halves, then halves again.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn hsum512(v: __m512) -> f32 {
        let lo = _mm512_castps512_ps256(v);
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
        hsum256(_mm256_add_ps(lo, hi))
    }

    /// Four dot products of one row of A with four rows of B: 16 lanes each,
    /// lane l summing the p ≡ l (mod 16) terms in order, the tail through a
    /// zero-filled masked load.
    #[target_feature(enable = "avx512f,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn dot_avx512(
        m: usize,
        n: usize,
        k: usize,
        a: *const f32,
        rsa: usize,
        b: *const f32,
        rsb: usize,
        out: *mut f32,
        rso: usize,
    ) {
        let full = k / 16 * 16;
        let tail: __mmask16 = ((1u32 << (k - full)) - 1) as __mmask16;
        for i in 0..m {
            // SAFETY (this loop): the caller proved a[i·rsa..+k], b[j·rsb..+k]
            // and out[i·rso..+n] lie in their slices for i < m, j < n; every
            // load below is within them or masked to them.
            let ar = unsafe { a.add(i * rsa) };
            let mut j = 0;
            while j < n {
                let cols = 4.min(n - j);
                let br: [*const f32; 4] = std::array::from_fn(|c| b.wrapping_add((j + c.min(cols - 1)) * rsb));
                let mut acc = [_mm512_setzero_ps(); 4];
                let mut p = 0;
                while p < full {
                    let x = unsafe { _mm512_loadu_ps(ar.add(p)) };
                    for c in 0..4 {
                        acc[c] = _mm512_fmadd_ps(x, unsafe { _mm512_loadu_ps(br[c].add(p)) }, acc[c]);
                    }
                    p += 16;
                }
                if tail != 0 {
                    let x = unsafe { _mm512_maskz_loadu_ps(tail, ar.add(full)) };
                    for c in 0..4 {
                        acc[c] = _mm512_fmadd_ps(x, unsafe { _mm512_maskz_loadu_ps(tail, br[c].add(full)) }, acc[c]);
                    }
                }
                for (c, &s) in acc.iter().enumerate().take(cols) {
                    unsafe { *out.add(i * rso + j + c) = hsum512(s) };
                }
                j += cols;
            }
        }
    }

    // ------------------------------------------------------------ AVX2

    /// Columns per panel of the AVX2 product: the panel's K block of B
    /// (`KB256` × 64 floats = 16 KiB) stays in L1 while every row tile of A
    /// passes over it, so B (the weights) is read from memory once per call,
    /// whatever `m` is.
    const PANEL: usize = 64;

    /// 8-float vectors per register tile of R rows: 8–12 independent FMA
    /// chains whatever R is (two FMA units × 4 cycles of latency need 8), so
    /// a lone decode row runs 1 × 64 columns instead of 1 × 16.
    const fn vecs(r: usize) -> usize {
        match r {
            1 => 8,
            2 | 3 => 4,
            _ => 2,
        }
    }

    /// Lanes `j0 + 8·v + l < n` of the V vectors of a block, as `maskload`
    /// masks (sign bit set = lane on).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn masks256<const V: usize>(n: usize, j0: usize) -> [__m256i; V] {
        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        std::array::from_fn(|v| {
            let left = n.saturating_sub(j0 + 8 * v).min(8) as i32;
            _mm256_cmpgt_epi32(_mm256_set1_epi32(left), lanes)
        })
    }

    /// R rows × 8V columns: `acc[i][v] ← fma(a[i,p], b[p, 8v..8v+8], acc[i][v])`
    /// for p in `[p0, p1)`, as `tile512`. `FULL`: every lane is inside `n`
    /// (plain loads and stores); else the lanes are masked by `mk`. `pf`: the
    /// first row tile over this block of B prefetches B's rows ahead.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile256<const R: usize, const V: usize, const FULL: bool>(
        (p0, p1, k): (usize, usize, usize),
        a: *const f32,
        rsa: usize,
        b: *const f32,
        rsb: usize,
        out: *mut f32,
        rso: usize,
        mk: [__m256i; V],
        (resume, pf): (bool, bool),
    ) {
        // SAFETY (all blocks of this function): as in `tile512`: the caller
        // proved rows i < R of A up to k, rows p < k of B and rows i < R of
        // out up to 8V columns (FULL) or up to the masked lanes lie in their
        // slices; AVX `maskload`/`maskstore` do not touch masked-off lanes.
        let load = |p: *const f32, v: usize| unsafe {
            if FULL { _mm256_loadu_ps(p.wrapping_add(8 * v)) } else { _mm256_maskload_ps(p.wrapping_add(8 * v), mk[v]) }
        };
        let mut acc = [[_mm256_setzero_ps(); V]; R];
        if p0 > 0 || resume {
            for (i, acc) in acc.iter_mut().enumerate() {
                for (v, x) in acc.iter_mut().enumerate() {
                    *x = load(out.wrapping_add(i * rso), v);
                }
            }
        }
        for p in p0..p1 {
            let bp = unsafe { b.add(p * rsb) };
            if pf && p + PREFETCH < k {
                for v in (0..V).step_by(2) {
                    _mm_prefetch::<_MM_HINT_T0>(bp.wrapping_add(PREFETCH * rsb + 8 * v) as *const i8);
                }
            }
            let bv: [__m256; V] = std::array::from_fn(|v| load(bp, v));
            for (i, acc) in acc.iter_mut().enumerate() {
                let x = _mm256_set1_ps(unsafe { *a.add(i * rsa + p) });
                for v in 0..V {
                    acc[v] = _mm256_fmadd_ps(x, bv[v], acc[v]);
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            for (v, x) in acc.iter().enumerate() {
                let o = out.wrapping_add(i * rso + 8 * v);
                unsafe { if FULL { _mm256_storeu_ps(o, *x) } else { _mm256_maskstore_ps(o, mk[v], *x) } }
            }
        }
    }

    /// One row tile of R rows over columns `[j, j + pw)` of a panel, in
    /// sub-tiles of 8·vecs(R) columns.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn row_tile256<const R: usize, const V: usize>(
        kb: (usize, usize, usize),
        a: *const f32,
        rsa: usize,
        b: *const f32,
        rsb: usize,
        out: *mut f32,
        rso: usize,
        (j, pw): (usize, usize),
        flags: (bool, bool),
    ) {
        let w = 8 * V;
        let mut jj = 0;
        while jj < pw {
            // SAFETY: jj < pw ≤ n − j, so the sub-tile's origin is inside the
            // ranges the caller proved; a sub-tile past the panel's end is masked.
            unsafe {
                let (bt, ot) = (b.add(j + jj), out.add(j + jj));
                if jj + w <= pw {
                    let mk = [_mm256_setzero_si256(); V];
                    tile256::<R, V, true>(kb, a, rsa, bt, rsb, ot, rso, mk, flags);
                } else {
                    let mk = masks256::<V>(pw, jj);
                    tile256::<R, V, false>(kb, a, rsa, bt, rsb, ot, rso, mk, flags);
                }
            }
            jj += w;
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn rtb_avx2(
        m: usize,
        n: usize,
        k: usize,
        a: *const f32,
        rsa: usize,
        b: *const f32,
        rsb: usize,
        out: *mut f32,
        rso: usize,
        resume: bool,
    ) {
        // Panels of B's columns outside, K blocks, then every row tile of A
        // inside: each block of B is loaded from memory once per call.
        for j0 in (0..n).step_by(PANEL) {
            let pw = PANEL.min(n - j0);
            for p0 in (0..k).step_by(KB256) {
                let kb = (p0, k.min(p0 + KB256), k);
                for i0 in (0..m).step_by(TR) {
                    let flags = (resume, i0 == 0);
                    // SAFETY: i0 < m and j0 < n, so the tile's origin is inside
                    // the ranges the caller proved; the tile stays inside them
                    // (rows up to min(TR, m − i0), columns masked to n).
                    unsafe {
                        let (at, ot) = (a.add(i0 * rsa), out.add(i0 * rso));
                        let jp = (j0, pw);
                        match TR.min(m - i0) {
                            6 => row_tile256::<6, { vecs(6) }>(kb, at, rsa, b, rsb, ot, rso, jp, flags),
                            5 => row_tile256::<5, { vecs(5) }>(kb, at, rsa, b, rsb, ot, rso, jp, flags),
                            4 => row_tile256::<4, { vecs(4) }>(kb, at, rsa, b, rsb, ot, rso, jp, flags),
                            3 => row_tile256::<3, { vecs(3) }>(kb, at, rsa, b, rsb, ot, rso, jp, flags),
                            2 => row_tile256::<2, { vecs(2) }>(kb, at, rsa, b, rsb, ot, rso, jp, flags),
                            _ => row_tile256::<1, { vecs(1) }>(kb, at, rsa, b, rsb, ot, rso, jp, flags),
                        }
                    }
                }
            }
        }
    }

    /// `Σ` of the 8 lanes in a fixed tree: (0..4 + 4..8), then pairs.
    #[inline]
    #[target_feature(enable = "avx")]
    fn hsum256(v: __m256) -> f32 {
        let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps::<1>(s2, s2)))
    }

    /// Columns per pass of the AVX2 dot kernel: 8 independent FMA chains.
    const DOTC: usize = 8;

    /// As `dot_avx512` with 8 lanes, 8 columns of B per pass over a row of A.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn dot_avx2(
        m: usize,
        n: usize,
        k: usize,
        a: *const f32,
        rsa: usize,
        b: *const f32,
        rsb: usize,
        out: *mut f32,
        rso: usize,
    ) {
        let full = k / 8 * 8;
        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let tail = _mm256_cmpgt_epi32(_mm256_set1_epi32((k - full) as i32), lanes);
        for i in 0..m {
            // SAFETY (this loop): as in `dot_avx512`; a pass with fewer than
            // DOTC columns left repeats the last one (its extra sums are not
            // stored).
            let ar = unsafe { a.add(i * rsa) };
            let mut j = 0;
            while j < n {
                let cols = DOTC.min(n - j);
                let br: [*const f32; DOTC] = std::array::from_fn(|c| b.wrapping_add((j + c.min(cols - 1)) * rsb));
                let mut acc = [_mm256_setzero_ps(); DOTC];
                let mut p = 0;
                while p < full {
                    let x = unsafe { _mm256_loadu_ps(ar.add(p)) };
                    for c in 0..DOTC {
                        acc[c] = _mm256_fmadd_ps(x, unsafe { _mm256_loadu_ps(br[c].add(p)) }, acc[c]);
                    }
                    p += 8;
                }
                if k > full {
                    let x = unsafe { _mm256_maskload_ps(ar.add(full), tail) };
                    for c in 0..DOTC {
                        acc[c] = _mm256_fmadd_ps(x, unsafe { _mm256_maskload_ps(br[c].add(full), tail) }, acc[c]);
                    }
                }
                for (c, &s) in acc.iter().enumerate().take(cols) {
                    unsafe { *out.add(i * rso + j + c) = hsum256(s) };
                }
                j += cols;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::rng::Rng;

    fn variants() -> Vec<Simd> {
        [Simd::Avx512, Simd::Avx2, Simd::Portable].into_iter().filter(|v| v.available()).collect()
    }

    /// Every available variant of both kernels matches f64 loops on strided
    /// operands with column and row tails, and gives every row the bits it
    /// gets when computed alone.
    #[test]
    fn kernels_match_f64_and_are_row_invariant_in_every_variant() {
        let mut rng = Rng::new(11);
        // (m, n, k): tails of every tile width (64, 16, 8 columns; 6 and 4 rows; 16 and 8 lanes).
        for (m, n, k) in [(13usize, 83usize, 37usize), (1, 5, 3), (7, 64, 16), (20, 17, 1), (8, 70, 300), (3, 9, 0)] {
            let (rsa, rsb, rso) = (k + 3, n + 5, n + 2);
            let a = rng.normal_vec(m * rsa);
            let b = rng.normal_vec(k.max(n) * rsb.max(k + 1));
            for v in variants() {
                for dot in [false, true] {
                    // rows_dot_bt reads B as n rows of k at stride k + 1.
                    let run = |m: usize, a: &[f32]| {
                        let mut out = vec![f32::NAN; m * rso];
                        if dot {
                            rows_dot_bt(v, m, n, k, a, rsa, &b, k + 1, &mut out, rso);
                        } else {
                            rows_times_b(v, m, n, k, a, rsa, &b, rsb, &mut out, rso);
                        }
                        out
                    };
                    let all = run(m, &a);
                    for i in 0..m {
                        let alone = run(1, &a[i * rsa..]);
                        for j in 0..n {
                            let want: f64 = (0..k)
                                .map(|p| {
                                    let y = if dot { b[j * (k + 1) + p] } else { b[p * rsb + j] };
                                    a[i * rsa + p] as f64 * y as f64
                                })
                                .sum();
                            let got = all[i * rso + j];
                            assert!(
                                (got as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                                "{v:?} dot={dot} {m}×{n}×{k} ({i},{j}): {got} vs {want}"
                            );
                            assert_eq!(got.to_bits(), alone[j].to_bits(), "{v:?} dot={dot} {m}×{n}×{k} row {i} alone");
                        }
                    }
                }
            }
        }
    }

    /// Splitting the sum over p into consecutive accumulating calls (the
    /// cached P·V over KV pages) gives the bits of one call, in every variant.
    #[test]
    fn split_sums_resume_the_same_chain() {
        let mut rng = Rng::new(12);
        let (m, n, k, rsb) = (7usize, 70usize, 45usize, 75usize);
        let a = rng.normal_vec(m * k);
        let b = rng.normal_vec(k * rsb);
        for v in variants() {
            let mut one = vec![0.0f32; m * n];
            rows_times_b(v, m, n, k, &a, k, &b, rsb, &mut one, n);
            let mut split = vec![f32::NAN; m * n];
            let mut p0 = 0;
            for (i, seg) in [16usize, 3, 16, 10].into_iter().enumerate() {
                rows_times_b_into(v, m, n, seg, &a[p0..], k, &b[p0 * rsb..], rsb, &mut split, n, i > 0);
                p0 += seg;
            }
            assert_eq!(p0, k);
            let bits = |x: &[f32]| x.iter().map(|y| y.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&one), bits(&split), "{v:?}");
        }
    }

    #[test]
    fn forcing_a_variant_by_name() {
        assert_eq!(Simd::choose(Some("portable")), Simd::Portable);
        assert_eq!(Simd::choose(Some(" PORTABLE ")), Simd::Portable);
        let best = Simd::choose(None);
        assert_eq!(Simd::choose(Some("sse9")), best);
        assert!(best.available());
        if Simd::Avx2.available() {
            assert_eq!(Simd::choose(Some("avx2")), Simd::Avx2);
        }
    }
}
