//! The batched training GEMM for f16 and bf16 (and f32) operands:
//! `C = α·op(A)·op(B) + β·C` with the operands converted to f32 while they are
//! packed into the micro-kernel's panels, so no whole-operand f32 copy of A,
//! B or C is ever made (the old path widened both operands, ran `sgemm` on
//! the copies into an f32 temporary of C and narrowed that).
//!
//! Structure (BLIS-like): for each block of at most [`NC`] columns, op(B) is
//! packed once, whole `k`, into panels of `nr` columns (k × nr, row-major,
//! zero-padded), in parallel over groups of panels; then C's rows are split
//! into blocks of `mc` rows, one rayon task each. A task keeps an f32
//! accumulator of its `mc × nc` block, and for each `KC`-deep slice of k packs
//! its rows of op(A) into panels of [`MR`] rows (kc × MR) and runs the
//! register-blocked micro-kernel over every (A panel, B panel) pair. After the
//! last slice the block is written to C once: `α·acc (+ β·C)`, rounded to C's
//! dtype in one step. Accumulation is f32 with FMA (portable: mul + add), the
//! same precision as `sgemm`; the order of the k terms differs from
//! `matrixmultiply`'s, so results agree to rounding, not bit for bit.
//!
//! A product whose k dominates (`k ≥ 4·max(m, n)` and ≥ [`KSPLIT_MIN`] per
//! thread: the weight gradients `Xᵀ·dY`, k = tokens) is split by ranges of k
//! instead ([`gemm_ksplit`]): one f32 partial per thread, added in range order,
//! C still rounded once.
//!
//! Micro-kernels, chosen by [`simd::simd`] (`DYNSPARSE_CPU_SIMD` forces one):
//! AVX-512F 6 × 32 (12 zmm accumulators), AVX2 + FMA 6 × 16 (12 ymm), portable
//! 6 × 16 in plain Rust (auto-vectorised for the build target).
//!
//! Conversions while packing go through the slice routines of [`convert`]
//! (vectorised, bit-exact with `half`) on contiguous runs of the stored
//! operand: a row of op(B) (or a column, when B is transposed) and a row of
//! op(A) (or a column, when A is transposed).

use std::cell::RefCell;

use half::{bf16, f16};
use rayon::prelude::*;

use super::convert;
use super::simd::Simd;

/// Rows of the micro-kernel's tile.
pub(super) const MR: usize = 6;
/// Depth of one packed slice of k (an A panel of 6 × 256 f32 is 6 KiB, a B
/// panel 16 or 32 KiB: both stay in L1/L2 while the kernel sweeps them).
const KC: usize = 256;
/// Columns of op(B) packed at once (k × NC f32 at most, shared by all tasks).
const NC: usize = 2048;
/// Most rows of C per task.
const MC_MAX: usize = 96;
/// B panels per packing task.
const PACK_GROUP: usize = 8;

thread_local! {
    /// Per-thread packing scratch, reused from call to call: what a call
    /// reads of it, it has written first (or zeroed, for padding), so it is
    /// never cleared; a fresh zeroed allocation per call cost page faults
    /// and a memset as large as the packing itself. Slot 0: B panels (the
    /// calling thread), slot 1: A panels, a conversion row and an edge tile
    /// (each [`block`] task's thread).
    static SCRATCH: [RefCell<Vec<f32>>; 2] = const { [RefCell::new(Vec::new()), RefCell::new(Vec::new())] };
}

/// Runs `f` with at least `len` elements of the thread's scratch `slot`
/// (unspecified values), or of a fresh buffer when the slot is in use
/// further up this thread's stack (a nested call).
fn with_scratch<R>(slot: usize, len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|s| match s[slot].try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                buf.resize(len, 0.0);
            }
            f(&mut buf[..len])
        }
        Err(_) => f(&mut vec![0.0f32; len]),
    })
}

/// An element type the GEMM reads and writes: f32, f16 or bf16.
pub(super) trait Elem: Copy + Send + Sync {
    /// `dst[i] = src[i] as f32`.
    fn widen(v: Simd, src: &[Self], dst: &mut [f32]);
    /// `dst[i] = src[i]` rounded once to `Self`.
    fn narrow(v: Simd, src: &[f32], dst: &mut [Self]);
}

impl Elem for f32 {
    fn widen(_: Simd, src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    fn narrow(_: Simd, src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
}

impl Elem for f16 {
    fn widen(v: Simd, src: &[f16], dst: &mut [f32]) {
        convert::widen_f16_with(v, src, dst);
    }
    fn narrow(v: Simd, src: &[f32], dst: &mut [f16]) {
        convert::narrow_f16_with(v, src, dst);
    }
}

impl Elem for bf16 {
    fn widen(v: Simd, src: &[bf16], dst: &mut [f32]) {
        convert::widen_bf16_with(v, src, dst);
    }
    fn narrow(v: Simd, src: &[f32], dst: &mut [bf16]) {
        convert::narrow_bf16_with(v, src, dst);
    }
}

/// A stored operand: element (r, c) of op(X) is `x[r·rs + c·cs]`, and one of
/// the two strides is 1 (every transpose the matmul spec allows).
#[derive(Clone, Copy)]
pub(super) struct Operand<'a, T> {
    pub x: &'a [T],
    pub rs: usize,
    pub cs: usize,
}

/// Columns of the micro-kernel's tile for a variant.
fn nr(v: Simd) -> usize {
    match v {
        Simd::Avx512 => 32,
        _ => 16,
    }
}

/// `C[m×n] = α·op(A)·op(B) + β·C` with C row-major and contiguous, op(A) m×k
/// and op(B) k×n as described by their strides. With β = 0, C is not read.
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm<T: Elem>(
    v: Simd,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: Operand<'_, T>,
    b: Operand<'_, T>,
    beta: f32,
    c: &mut [T],
) {
    if m == 0 || n == 0 {
        return;
    }
    let v = if v.available() { v } else { Simd::Portable };
    let nr = nr(v);
    let threads = rayon::current_num_threads().max(1);
    if threads > 1 && k >= KSPLIT_MIN * threads && k >= 4 * m.max(n) {
        return gemm_ksplit(v, nr, threads, m, n, k, alpha, a, b, beta, &mut c[..m * n]);
    }
    // About four row blocks per thread, a multiple of MR rows each.
    let mc = m.div_ceil(4 * threads).next_multiple_of(MR).clamp(MR, MC_MAX);
    let c = &mut c[..m * n];
    for jc in (0..n).step_by(NC) {
        let nc = NC.min(n - jc);
        with_scratch(0, nc.div_ceil(nr) * k * nr, |bpack| {
            pack_b(v, nr, k, jc, nc, b, bpack);
            let bpack = &*bpack;
            c.par_chunks_mut(mc * n).enumerate().for_each(|(ib, cb)| {
                block(v, nr, ib * mc, cb.len() / n, n, k, jc, nc, alpha, a, bpack, beta, cb);
            });
        });
    }
}

/// Depth per thread from which a product whose k dominates (`k ≥ 4·max(m,
/// n)`: the weight gradients `Xᵀ·dY`, k = tokens) is split by ranges of k.
const KSPLIT_MIN: usize = 256;

/// [`gemm`] split by ranges of k, one per thread: each range's product into
/// an f32 partial (all of C's rows in one task, so its A panels are packed
/// from runs of m, not of a row block's few rows), then `α·Σ partials + β·C`
/// (the partials added in range order) rounded once to C's dtype.
#[allow(clippy::too_many_arguments)]
fn gemm_ksplit<T: Elem>(
    v: Simd,
    nr: usize,
    parts: usize,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: Operand<'_, T>,
    b: Operand<'_, T>,
    beta: f32,
    c: &mut [T],
) {
    let kb = k.div_ceil(parts);
    let partials: Vec<Vec<f32>> = (0..k.div_ceil(kb))
        .into_par_iter()
        .map(|i| {
            let (p0, kp) = (i * kb, kb.min(k - i * kb));
            let a = Operand { x: &a.x[p0 * a.cs..], ..a };
            let b = Operand { x: &b.x[p0 * b.rs..], ..b };
            let mut part = vec![0.0f32; m * n];
            for jc in (0..n).step_by(NC) {
                let nc = NC.min(n - jc);
                with_scratch(0, nc.div_ceil(nr) * kp * nr, |bpack| {
                    pack_b(v, nr, kp, jc, nc, b, bpack);
                    with_block_scratch(nr, m, kp, nc, |acc, sc| {
                        block_k(v, nr, 0, m, kp, nc, a, bpack, sc, acc);
                        for (dst, src) in part.chunks_mut(n).zip(acc.chunks(nc)) {
                            dst[jc..jc + nc].copy_from_slice(src);
                        }
                    });
                });
            }
            part
        })
        .collect();
    c.par_chunks_mut(n).enumerate().for_each_init(
        || (vec![0.0f32; n], vec![0.0f32; n]),
        |(row, old), (r, dst)| {
            row.copy_from_slice(&partials[0][r * n..(r + 1) * n]);
            for p in &partials[1..] {
                row.iter_mut().zip(&p[r * n..(r + 1) * n]).for_each(|(x, &y)| *x += y);
            }
            store_row(v, alpha, row, beta, old, dst);
        },
    );
}

/// Packs columns jc..jc+nc of op(B) (all k rows) into `out`: ⌈nc/nr⌉
/// panels of k × nr f32, panel-major, zero-padded past column nc (every
/// element written).
#[allow(clippy::too_many_arguments)]
fn pack_b<T: Elem>(v: Simd, nr: usize, k: usize, jc: usize, nc: usize, b: Operand<'_, T>, out: &mut [f32]) {
    let panels = nc.div_ceil(nr);
    if k == 0 || panels == 0 {
        return;
    }
    let used = nc - (panels - 1) * nr;
    if used < nr {
        let last = &mut out[(panels - 1) * k * nr..];
        last.chunks_exact_mut(nr).for_each(|row| row[used..].fill(0.0));
    }
    out.par_chunks_mut(PACK_GROUP * k * nr).enumerate().for_each(|(g, grp)| {
        let j0 = jc + g * PACK_GROUP * nr;
        let w = (nc - g * PACK_GROUP * nr).min(PACK_GROUP * nr);
        if b.cs == 1 {
            // Rows of op(B) are contiguous: one run of w per row, dealt to the panels.
            let mut tmp = vec![0.0f32; w];
            for p in 0..k {
                T::widen(v, &b.x[p * b.rs + j0..p * b.rs + j0 + w], &mut tmp);
                for (q, seg) in tmp.chunks(nr).enumerate() {
                    let at = q * k * nr + p * nr;
                    grp[at..at + seg.len()].copy_from_slice(seg);
                }
            }
        } else {
            // Columns of op(B) are contiguous (B transposed): one run of k per
            // column, a panel's nr columns widened into nr runs of scratch,
            // then interleaved k step by k step (contiguous stores).
            with_scratch(1, nr * k, |tmp| {
                for (q, panel) in grp.chunks_mut(k * nr).enumerate() {
                    let cols = nr.min(w - q * nr);
                    for c in 0..cols {
                        let at = (j0 + q * nr + c) * b.cs;
                        T::widen(v, &b.x[at..at + k], &mut tmp[c * k..(c + 1) * k]);
                    }
                    for (p, o) in panel.chunks_exact_mut(nr).enumerate() {
                        for (c, o) in o[..cols].iter_mut().enumerate() {
                            *o = tmp[c * k + p];
                        }
                    }
                }
            });
        }
    });
}

/// Packs rows i0..i0+mc, columns pc..pc+kc of op(A) into ⌈mc/MR⌉ panels of
/// kc × MR f32 (zero rows past mc).
#[allow(clippy::too_many_arguments)]
fn pack_a<T: Elem>(
    v: Simd,
    a: Operand<'_, T>,
    i0: usize,
    mc: usize,
    pc: usize,
    kc: usize,
    out: &mut [f32],
    tmp: &mut [f32],
) {
    let out = &mut out[..mc.div_ceil(MR) * kc * MR];
    if !mc.is_multiple_of(MR) {
        out.fill(0.0);
    }
    if a.cs == 1 {
        // MR rows at a time: each widened into its own run of `tmp`, then
        // interleaved k step by k step (contiguous stores into the panel).
        for (q, panel) in out.chunks_mut(kc * MR).enumerate() {
            let h = MR.min(mc - q * MR);
            for r in 0..h {
                let at = (i0 + q * MR + r) * a.rs + pc;
                T::widen(v, &a.x[at..at + kc], &mut tmp[r * kc..(r + 1) * kc]);
            }
            let rows: [&[f32]; MR] = std::array::from_fn(|r| &tmp[r * kc..(r + 1) * kc]);
            if h == MR {
                for (p, o) in panel.chunks_exact_mut(MR).enumerate() {
                    for (o, row) in o.iter_mut().zip(&rows) {
                        *o = row[p];
                    }
                }
            } else {
                for (r, row) in rows.iter().enumerate().take(h) {
                    for (p, &x) in row.iter().enumerate() {
                        panel[p * MR + r] = x;
                    }
                }
            }
        }
    } else {
        let tmp = &mut tmp[..mc];
        for p in 0..kc {
            let at = (pc + p) * a.cs + i0;
            T::widen(v, &a.x[at..at + mc], tmp);
            for (q, seg) in tmp.chunks(MR).enumerate() {
                let o = q * kc * MR + p * MR;
                out[o..o + seg.len()].copy_from_slice(seg);
            }
        }
    }
}

/// One task: rows i0..i0+mc of C (`cb`, full rows of n), columns jc..jc+nc.
#[allow(clippy::too_many_arguments)]
fn block<T: Elem>(
    v: Simd,
    nr: usize,
    i0: usize,
    mc: usize,
    n: usize,
    k: usize,
    jc: usize,
    nc: usize,
    alpha: f32,
    a: Operand<'_, T>,
    bpack: &[f32],
    beta: f32,
    cb: &mut [T],
) {
    with_block_scratch(nr, mc, k, nc, |acc, (apack, tmp, edge)| {
        block_k(v, nr, i0, mc, k, nc, a, bpack, (apack, &mut *tmp, edge), acc);
        let old = &mut tmp[..nc];
        for (r, row) in acc.chunks_mut(nc).enumerate() {
            store_row(v, alpha, row, beta, old, &mut cb[r * n + jc..r * n + jc + nc]);
        }
    });
}

/// The scratch of [`block_k`]: A panels, a conversion row (at least `nc`
/// long), an edge tile.
type BlockScratch<'a> = (&'a mut [f32], &'a mut [f32], &'a mut [f32]);

/// Runs `f` with a zeroed `mc × nc` accumulator and the [`BlockScratch`] of
/// a block of depth `k`, all from the thread's scratch slot 1.
fn with_block_scratch<R>(
    nr: usize,
    mc: usize,
    k: usize,
    nc: usize,
    f: impl FnOnce(&mut [f32], BlockScratch<'_>) -> R,
) -> R {
    let ap_len = mc.div_ceil(MR) * KC.min(k.max(1)) * MR;
    let tmp_len = (MR * KC).max(mc).max(nc);
    with_scratch(1, mc * nc + ap_len + tmp_len + MR * nr, |sc| {
        let (acc, rest) = sc.split_at_mut(mc * nc);
        let (apack, rest) = rest.split_at_mut(ap_len);
        let (tmp, edge) = rest.split_at_mut(tmp_len);
        acc.fill(0.0);
        f(acc, (apack, tmp, edge))
    })
}

/// `dst = α·row + β·dst` rounded once to C's dtype (`dst` not read when β = 0);
/// `row` is clobbered, `old` is scratch as long as `row`.
fn store_row<T: Elem>(v: Simd, alpha: f32, row: &mut [f32], beta: f32, old: &mut [f32], dst: &mut [T]) {
    if beta == 0.0 {
        row.iter_mut().for_each(|x| *x *= alpha);
    } else {
        T::widen(v, dst, old);
        row.iter_mut().zip(&*old).for_each(|(x, &o)| *x = alpha * *x + beta * o);
    }
    T::narrow(v, row, dst);
}

/// The k loop of [`block`]: `acc (mc × nc) += op(A)[i0.., :]·B panels`, per
/// `KC`-deep slice, with the thread's packing scratch.
#[allow(clippy::too_many_arguments)]
fn block_k<T: Elem>(
    v: Simd,
    nr: usize,
    i0: usize,
    mc: usize,
    k: usize,
    nc: usize,
    a: Operand<'_, T>,
    bpack: &[f32],
    (apack, tmp, edge): BlockScratch<'_>,
    acc: &mut [f32],
) {
    for pc in (0..k).step_by(KC) {
        let kc = KC.min(k - pc);
        pack_a(v, a, i0, mc, pc, kc, apack, tmp);
        for (jp, bpanel) in bpack.chunks(k * nr).enumerate() {
            let bp = &bpanel[pc * nr..(pc + kc) * nr];
            let (j, w) = (jp * nr, nr.min(nc - jp * nr));
            for (ip, ap) in apack[..mc.div_ceil(MR) * kc * MR].chunks(kc * MR).enumerate() {
                let (i, h) = (ip * MR, MR.min(mc - ip * MR));
                if h == MR && w == nr {
                    kernel(v, kc, ap, bp, &mut acc[i * nc + j..], nc);
                } else {
                    edge.fill(0.0);
                    kernel(v, kc, ap, bp, edge, nr);
                    for r in 0..h {
                        let dst = &mut acc[(i + r) * nc + j..(i + r) * nc + j + w];
                        dst.iter_mut().zip(&edge[r * nr..]).for_each(|(d, &e)| *d += e);
                    }
                }
            }
        }
    }
}

/// `c[r·ldc + j] += Σ_p ap[p·MR + r]·bp[p·nr + j]` for r < MR, j < nr(v).
fn kernel(v: Simd, kc: usize, ap: &[f32], bp: &[f32], c: &mut [f32], ldc: usize) {
    let nr = nr(v);
    assert!(ap.len() >= kc * MR && bp.len() >= kc * nr && c.len() >= (MR - 1) * ldc + nr, "gemm tile bounds (a bug)");
    match v {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512F + FMA are present (`gemm` checked `available`);
        // the assert above covers every index the kernel touches.
        Simd::Avx512 => unsafe { x86::kernel_avx512(kc, ap.as_ptr(), bp.as_ptr(), c.as_mut_ptr(), ldc) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2 + FMA are present; indices as above.
        Simd::Avx2 => unsafe { x86::kernel_avx2(kc, ap.as_ptr(), bp.as_ptr(), c.as_mut_ptr(), ldc) },
        _ => kernel_portable(kc, ap, bp, c, ldc),
    }
}

fn kernel_portable(kc: usize, ap: &[f32], bp: &[f32], c: &mut [f32], ldc: usize) {
    const NR: usize = 16;
    let mut acc = [[0.0f32; NR]; MR];
    for (a, b) in ap.chunks_exact(MR).zip(bp.chunks_exact(NR)).take(kc) {
        for (row, &x) in acc.iter_mut().zip(a) {
            for (s, &y) in row.iter_mut().zip(b) {
                *s += x * y;
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        c[r * ldc..r * ldc + NR].iter_mut().zip(row).for_each(|(d, &s)| *d += s);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::MR;

    /// 6 × 16 tile, 12 ymm accumulators.
    ///
    /// # Safety
    /// AVX2 + FMA present; `ap` valid for kc·6, `bp` for kc·16 and `c` for
    /// 5·ldc + 16 elements.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn kernel_avx2(kc: usize, ap: *const f32, bp: *const f32, c: *mut f32, ldc: usize) {
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        for p in 0..kc {
            // SAFETY: p < kc (caller's contract on the panel lengths).
            unsafe {
                let b0 = _mm256_loadu_ps(bp.add(p * 16));
                let b1 = _mm256_loadu_ps(bp.add(p * 16 + 8));
                for (r, t) in acc.iter_mut().enumerate() {
                    let x = _mm256_broadcast_ss(&*ap.add(p * MR + r));
                    t[0] = _mm256_fmadd_ps(x, b0, t[0]);
                    t[1] = _mm256_fmadd_ps(x, b1, t[1]);
                }
            }
        }
        for (r, t) in acc.iter().enumerate() {
            // SAFETY: r < 6, so r·ldc + 16 ≤ 5·ldc + 16.
            unsafe {
                let q = c.add(r * ldc);
                _mm256_storeu_ps(q, _mm256_add_ps(_mm256_loadu_ps(q), t[0]));
                _mm256_storeu_ps(q.add(8), _mm256_add_ps(_mm256_loadu_ps(q.add(8)), t[1]));
            }
        }
    }

    /// 6 × 32 tile, 12 zmm accumulators.
    ///
    /// # Safety
    /// AVX-512F + FMA present; `ap` valid for kc·6, `bp` for kc·32 and `c`
    /// for 5·ldc + 32 elements.
    #[target_feature(enable = "avx512f,fma")]
    pub unsafe fn kernel_avx512(kc: usize, ap: *const f32, bp: *const f32, c: *mut f32, ldc: usize) {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        for p in 0..kc {
            // SAFETY: p < kc (caller's contract on the panel lengths).
            unsafe {
                let b0 = _mm512_loadu_ps(bp.add(p * 32));
                let b1 = _mm512_loadu_ps(bp.add(p * 32 + 16));
                for (r, t) in acc.iter_mut().enumerate() {
                    let x = _mm512_set1_ps(*ap.add(p * MR + r));
                    t[0] = _mm512_fmadd_ps(x, b0, t[0]);
                    t[1] = _mm512_fmadd_ps(x, b1, t[1]);
                }
            }
        }
        for (r, t) in acc.iter().enumerate() {
            // SAFETY: r < 6, so r·ldc + 32 ≤ 5·ldc + 32.
            unsafe {
                let q = c.add(r * ldc);
                _mm512_storeu_ps(q, _mm512_add_ps(_mm512_loadu_ps(q), t[0]));
                _mm512_storeu_ps(q.add(16), _mm512_add_ps(_mm512_loadu_ps(q.add(16)), t[1]));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use half::{bf16, f16};

    use super::*;

    fn variants() -> Vec<Simd> {
        [Simd::Avx512, Simd::Avx2, Simd::Portable].into_iter().filter(|v| v.available()).collect()
    }

    /// f64 reference over the same storage conventions (widened inputs).
    #[allow(clippy::too_many_arguments)]
    fn reference(
        m: usize,
        n: usize,
        k: usize,
        alpha: f64,
        a: &[f32],
        ta: bool,
        b: &[f32],
        tb: bool,
        beta: f64,
        c: &[f32],
    ) -> Vec<f64> {
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0f64;
                for p in 0..k {
                    let x = if ta { a[p * m + i] } else { a[i * k + p] };
                    let y = if tb { b[j * k + p] } else { b[p * n + j] };
                    s += x as f64 * y as f64;
                }
                out[i * n + j] = alpha * s + if beta != 0.0 { beta * c[i * n + j] as f64 } else { 0.0 };
            }
        }
        out
    }

    /// Every variant, every transpose, f32/f16/bf16, ragged shapes (tile
    /// edges in m and n, a k past one KC slice, several row blocks), β = 0
    /// with NaN in C and β ≠ 0: within one rounding of C's dtype (plus f32
    /// accumulation error) of the f64 product of the same (rounded) inputs.
    #[test]
    fn packed_gemm_matches_f64_for_every_variant_transpose_and_dtype() {
        // A 3-thread pool, so that the last shape (k ≥ 256·3 and ≥ 4·max(m, n))
        // takes the k-split into three uneven ranges on any machine.
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        pool.install(packed_gemm_cases);
    }

    fn packed_gemm_cases() {
        let mut rng = crate::util::rng::Rng::new(11);
        let shapes = [(7usize, 33usize, 5usize), (1, 17, 300), (50, 40, 513), (130, 3, 64), (13, 37, 1100)];
        for v in variants() {
            for &(m, n, k) in &shapes {
                for (ta, tb, beta) in
                    [(false, false, 0.0f32), (true, false, 0.5), (false, true, 1.0), (true, true, -2.0)]
                {
                    let a = rng.normal_vec(m * k);
                    let b = rng.normal_vec(k * n);
                    let c0 = rng.normal_vec(m * n);
                    let (rsa, csa) = if ta { (1, m) } else { (k, 1) };
                    let (rsb, csb) = if tb { (1, k) } else { (n, 1) };
                    let tol = |w: f64, unit: f64| 1e-5 * (1.0 + w.abs()) * (k as f64).sqrt() + unit * w.abs();
                    // f32
                    let mut c = if beta == 0.0 { vec![f32::NAN; m * n] } else { c0.clone() };
                    let (oa, ob) = (Operand { x: &a[..], rs: rsa, cs: csa }, Operand { x: &b[..], rs: rsb, cs: csb });
                    gemm(v, m, n, k, 1.5, oa, ob, beta, &mut c);
                    let want = reference(m, n, k, 1.5, &a, ta, &b, tb, beta as f64, &c0);
                    for (g, w) in c.iter().zip(&want) {
                        assert!(
                            (*g as f64 - w).abs() <= tol(*w, 0.0),
                            "{v:?} f32 {m}x{n}x{k} ta={ta} tb={tb}: {g} vs {w}"
                        );
                    }
                    // f16 and bf16: inputs rounded first; the output is within half an ulp
                    // of its dtype (2⁻¹¹ / 2⁻⁸ relative) of the exact product.
                    macro_rules! half_case {
                        ($t:ty, $ulp:expr) => {{
                            let ah: Vec<$t> = a.iter().map(|&x| <$t>::from_f32(x)).collect();
                            let bh: Vec<$t> = b.iter().map(|&x| <$t>::from_f32(x)).collect();
                            let ch0: Vec<$t> = c0.iter().map(|&x| <$t>::from_f32(x)).collect();
                            let mut ch = if beta == 0.0 { vec![<$t>::NAN; m * n] } else { ch0.clone() };
                            let (oa, ob) =
                                (Operand { x: &ah[..], rs: rsa, cs: csa }, Operand { x: &bh[..], rs: rsb, cs: csb });
                            gemm(v, m, n, k, 1.5, oa, ob, beta, &mut ch);
                            let f = |x: &[$t]| x.iter().map(|y| y.to_f32()).collect::<Vec<f32>>();
                            let want = reference(m, n, k, 1.5, &f(&ah), ta, &f(&bh), tb, beta as f64, &f(&ch0));
                            for (g, w) in f(&ch).iter().zip(&want) {
                                assert!(
                                    (*g as f64 - w).abs() <= tol(*w, $ulp),
                                    "{v:?} {} {m}x{n}x{k} ta={ta} tb={tb}: {g} vs {w}",
                                    stringify!($t)
                                );
                            }
                        }};
                    }
                    half_case!(f16, 1.0 / 2048.0);
                    half_case!(bf16, 1.0 / 256.0);
                }
            }
        }
    }
}
