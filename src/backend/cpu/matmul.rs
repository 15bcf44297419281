//! `C = α·op(A)·op(B) + β·C`: f32 through `matrixmultiply`; f16 and bf16
//! through the packed GEMM of [`gemm`], which converts while packing and
//! writes C in its dtype (f32 accumulation, C rounded once at the end).

use super::{CpuBackend, SliceMut, SliceRef, gemm, rd, simd};
use crate::Tensor;
use crate::ops::MatmulSpec;

/// Rows of A up to which a product streams B once without packing it (the
/// decode case: one or a few new tokens times a weight matrix), instead of
/// `matrixmultiply`, whose packing copies all of B per call.
const SKINNY: usize = 16;

/// Columns of C per task of the skinny path.
const COLS: usize = 256;

/// `C = α·A·op(B) + β·C` for a non-transposed A: per chunk of columns, the
/// rows' raw sums from [`simd::rows_times_b`] (B streamed by rows) or, for
/// `Bᵀ`, [`simd::rows_dot_bt`], in parallel over column chunks, then α and β.
/// Every element is one fixed sequence of operations over `k` in order (see
/// `simd`), so a row's result does not depend on `m` (the row-invariant path
/// of the inference step; also the fast path for a few rows, which
/// `matrixmultiply` would pack B for).
#[allow(clippy::too_many_arguments)]
fn skinny(m: usize, n: usize, k: usize, alpha: f32, ap: &[f32], bp: &[f32], trans_b: bool, beta: f32, cp: &mut [f32]) {
    use rayon::prelude::*;
    let v = simd::simd();
    let chunks: Vec<(usize, Vec<f32>)> = (0..n)
        .step_by(COLS)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|j0| {
            let w = COLS.min(n - j0);
            let mut acc = vec![0.0f32; m * w];
            if trans_b {
                simd::rows_dot_bt(v, m, w, k, ap, k, &bp[j0 * k..], k, &mut acc, w);
            } else {
                simd::rows_times_b(v, m, w, k, ap, k, &bp[j0..], n, &mut acc, w);
            }
            (j0, acc)
        })
        .collect();
    for (j0, acc) in chunks {
        let w = COLS.min(n - j0);
        for i in 0..m {
            let dst = &mut cp[i * n + j0..i * n + j0 + w];
            let src = &acc[i * w..(i + 1) * w];
            if beta == 0.0 {
                dst.iter_mut().zip(src).for_each(|(c, &x)| *c = alpha * x);
            } else {
                dst.iter_mut().zip(src).for_each(|(c, &x)| *c = alpha * x + beta * *c);
            }
        }
    }
}

pub(super) fn matmul(s: &MatmulSpec, a: &Tensor<CpuBackend>, b: &Tensor<CpuBackend>, c: &mut Tensor<CpuBackend>) {
    let (m, n, k) = (s.m, s.n, s.k);
    if (m <= SKINNY || s.row_invariant) && !s.trans_a && s.batch == 1 {
        let (av, bv) = (rd(a), rd(b));
        let run =
            |cv: &mut [f32]| skinny(m, n, k, s.alpha, &av[..m * k], &bv[..k * n], s.trans_b, s.beta, &mut cv[..m * n]);
        return if s.beta == 0.0 { c.buf.produce(run) } else { c.buf.update(run) };
    }
    // Half precision: the packed GEMM converts while packing and writes C in
    // its dtype (no f32 copies of A, B or C).
    {
        let (ga, gb, mut gc) = (a.buf.lock(), b.buf.lock(), c.buf.lock_mut());
        match (ga.slice(), gb.slice(), gc.slice()) {
            (SliceRef::F16(av), SliceRef::F16(bv), SliceMut::F16(cv)) => return packed(s, av, bv, cv),
            (SliceRef::BF16(av), SliceRef::BF16(bv), SliceMut::BF16(cv)) => return packed(s, av, bv, cv),
            _ => {}
        }
    }
    let (av, bv) = (rd(a), rd(b));
    let (sa, sb, sc) = s.strides();
    // Row and column strides of op(A) (m×k) and op(B) (k×n) in their storage.
    let (rsa, csa) = if s.trans_a { (1, m) } else { (k, 1) };
    let (rsb, csb) = if s.trans_b { (1, k) } else { (n, 1) };
    let run = |cv: &mut [f32]| {
        for i in 0..s.batch {
            let (ap, bp) = (&av[i * sa..i * sa + m * k], &bv[i * sb..i * sb + k * n]);
            let cp = &mut cv[i * sc..i * sc + m * n];
            split_f32(
                m,
                n,
                k,
                s.alpha,
                Strided { x: ap, rs: rsa, cs: csa },
                Strided { x: bp, rs: rsb, cs: csb },
                s.beta,
                cp,
            );
        }
    };
    if s.beta == 0.0 { c.buf.produce(run) } else { c.buf.update(run) }
}

/// A matrix operand: its elements from the first one on, row and column strides.
#[derive(Clone, Copy)]
pub(super) struct Strided<'a> {
    pub x: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Strided<'a> {
    /// The operand from row `r`, column `c` on.
    fn at(self, r: usize, c: usize) -> Strided<'a> {
        Strided { x: &self.x[r * self.rs + c * self.cs..], ..self }
    }
}

/// `C[m×n] = α·op(A)·op(B) + β·C` by one single-threaded
/// `matrixmultiply::sgemm` call, C at row and column strides `(rsc, csc)`
/// (the model's products and the attention tiles).
#[allow(clippy::too_many_arguments)]
pub(super) fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: Strided<'_>,
    b: Strided<'_>,
    beta: f32,
    c: &mut [f32],
    (rsc, csc): (usize, usize),
) {
    let reach = |r: usize, cols: usize, rs: usize, cs: usize| {
        if r == 0 || cols == 0 { 0 } else { (r - 1) * rs + (cols - 1) * cs + 1 }
    };
    assert!(
        reach(m, k, a.rs, a.cs) <= a.x.len()
            && reach(k, n, b.rs, b.cs) <= b.x.len()
            && reach(m, n, rsc, csc) <= c.len(),
        "sgemm operand out of bounds (a bug: specs are validated)"
    );
    // SAFETY: the assert above proves every index the strides reach lies
    // inside its slice; C is a distinct mutable borrow, so it aliases neither
    // A nor B. With β = 0 matrixmultiply does not read C.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            a.x.as_ptr(),
            a.rs as isize,
            a.cs as isize,
            b.x.as_ptr(),
            b.rs as isize,
            b.cs as isize,
            beta,
            c.as_mut_ptr(),
            rsc as isize,
            csc as isize,
        )
    }
}

/// Products below this many multiply-adds run on the calling thread.
const SPLIT_MIN: usize = 1 << 20;

/// `C = α·op(A)·op(B) + β·C` in f32, split over the rayon pool (one pool for
/// the whole backend: `matrixmultiply`'s own threads, woken per call, cost
/// more than they saved at the training step's sizes). Tall products are
/// split by blocks of C's rows; short ones with a long k (the weight
/// gradients `Xᵀ·dY`) by blocks of k, the partial products added to C in
/// block order; the rest by blocks of C's columns. The split depends only on
/// the shape and the pool size, so results are deterministic.
#[allow(clippy::too_many_arguments)]
fn split_f32(m: usize, n: usize, k: usize, alpha: f32, a: Strided<'_>, b: Strided<'_>, beta: f32, c: &mut [f32]) {
    use rayon::prelude::*;
    let parts = rayon::current_num_threads();
    let c = &mut c[..m * n];
    if parts < 2 || m * n * k < SPLIT_MIN {
        return sgemm(m, n, k, alpha, a, b, beta, c, (n, 1));
    }
    if m >= 64 * parts {
        let rows = m.div_ceil(parts).next_multiple_of(8);
        c.par_chunks_mut(rows * n).enumerate().for_each(|(i, cb)| {
            sgemm(cb.len() / n, n, k, alpha, a.at(i * rows, 0), b, beta, cb, (n, 1));
        });
    } else if k >= 256 * parts {
        let kb = k.div_ceil(parts).next_multiple_of(8);
        let mut partial = vec![0.0f32; (k.div_ceil(kb) - 1) * m * n];
        let targets: Vec<&mut [f32]> = std::iter::once(&mut *c).chain(partial.chunks_mut(m * n)).collect();
        targets.into_par_iter().enumerate().for_each(|(i, t)| {
            let p0 = i * kb;
            let beta = if i == 0 { beta } else { 0.0 };
            sgemm(m, n, kb.min(k - p0), alpha, a.at(0, p0), b.at(p0, 0), beta, t, (n, 1));
        });
        for pc in partial.chunks(m * n) {
            c.iter_mut().zip(pc).for_each(|(c, &x)| *c += x);
        }
    } else {
        let cols = n.div_ceil(parts).next_multiple_of(8);
        let blocks: Vec<(usize, Vec<f32>)> = (0..n)
            .step_by(cols)
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|j0| {
                let w = cols.min(n - j0);
                let mut t = vec![0.0f32; m * w];
                if beta != 0.0 {
                    t.chunks_mut(w).zip(c.chunks(n)).for_each(|(t, c)| t.copy_from_slice(&c[j0..j0 + w]));
                }
                sgemm(m, w, k, alpha, a, b.at(0, j0), beta, &mut t, (w, 1));
                (j0, t)
            })
            .collect();
        for (j0, t) in blocks {
            let w = t.len() / m;
            c.chunks_mut(n).zip(t.chunks(w)).for_each(|(c, t)| c[j0..j0 + w].copy_from_slice(t));
        }
    }
}

/// The batched product through [`gemm::gemm`], one call per batch entry.
fn packed<T: gemm::Elem>(s: &MatmulSpec, av: &[T], bv: &[T], cv: &mut [T]) {
    let (m, n, k) = (s.m, s.n, s.k);
    let (sa, sb, sc) = s.strides();
    let (rsa, csa) = if s.trans_a { (1, m) } else { (k, 1) };
    let (rsb, csb) = if s.trans_b { (1, k) } else { (n, 1) };
    let v = simd::simd();
    for i in 0..s.batch {
        let a = gemm::Operand { x: &av[i * sa..i * sa + m * k], rs: rsa, cs: csa };
        let b = gemm::Operand { x: &bv[i * sb..i * sb + k * n], rs: rsb, cs: csb };
        gemm::gemm(v, m, n, k, s.alpha, a, b, s.beta, &mut cv[i * sc..i * sc + m * n]);
    }
}

#[cfg(test)]
mod tests {
    use crate::backend::cpu::CpuBackend;
    use crate::util::rng::Rng;
    use crate::{DType, Tensor, ops};

    /// Naive f64 triple loop over the same storage conventions.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        a: &[f32],
        b: &[f32],
        c: &[f32],
        batch: usize,
        m: usize,
        n: usize,
        k: usize,
        ta: bool,
        tb: bool,
        bb: bool,
        al: f64,
        be: f64,
    ) -> Vec<f64> {
        let mut out = vec![0.0; batch * m * n];
        for z in 0..batch {
            let bz = if bb { z } else { 0 };
            for i in 0..m {
                for j in 0..n {
                    let mut acc = 0.0f64;
                    for p in 0..k {
                        let x = if ta { a[z * m * k + p * m + i] } else { a[z * m * k + i * k + p] };
                        let y = if tb { b[bz * k * n + j * k + p] } else { b[bz * k * n + p * n + j] };
                        acc += x as f64 * y as f64;
                    }
                    let idx = z * m * n + i * n + j;
                    out[idx] = al * acc + if be != 0.0 { be * c[idx] as f64 } else { 0.0 };
                }
            }
        }
        out
    }

    #[test]
    fn matmul_matches_f64_loops_for_every_transpose_and_broadcast() {
        let be = CpuBackend::new();
        let mut rng = Rng::new(7);
        // The last two shapes take the skinny (decode) path: one batch, ≤ 16 rows, columns past one chunk.
        let cases =
            [(false, false, true, 0.0), (true, false, false, 0.5), (false, true, true, 1.0), (true, true, false, -2.0)];
        let shapes = [(3usize, 17usize, 9usize, 33usize), (1, 5, 300, 33), (1, 1, 517, 40)];
        for ((ta, tb, bb, beta), (batch, m, n, k)) in cases.iter().flat_map(|c| shapes.iter().map(move |s| (*c, *s))) {
            let a = rng.normal_vec(batch * m * k);
            let bsz = if bb { batch } else { 1 } * k * n;
            let b = rng.normal_vec(bsz);
            let c0 = rng.normal_vec(batch * m * n);
            let ash = if ta { [batch, k, m] } else { [batch, m, k] };
            let bshape: Vec<usize> = match (bb, tb) {
                (true, false) => vec![batch, k, n],
                (true, true) => vec![batch, n, k],
                (false, false) => vec![k, n],
                (false, true) => vec![n, k],
            };
            let at = Tensor::from_f32(&be, &a, &ash, DType::F32).unwrap();
            let bt = Tensor::from_f32(&be, &b, &bshape, DType::F32).unwrap();
            let mut ct = Tensor::from_f32(&be, &c0, &[batch, m, n], DType::F32).unwrap();
            ops::matmul(&be, &at, &bt, &mut ct, ta, tb, 1.5, beta).unwrap();
            let got = ct.to_f32_vec(&be).unwrap();
            let want = naive(&a, &b, &c0, batch, m, n, k, ta, tb, bb, 1.5, beta as f64);
            for (g, w) in got.iter().zip(&want) {
                assert!((*g as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()), "ta={ta} tb={tb}: {g} vs {w}");
            }
        }
    }

    /// Products large enough to be split over the pool, one per strategy
    /// (rows of C, blocks of k, columns of C), in a pool of 3 threads so that
    /// the blocks are uneven, against the f64 loops.
    #[test]
    fn split_f32_products_match_f64_loops() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        pool.install(|| {
            let be = CpuBackend::new();
            let mut rng = Rng::new(11);
            // (m, n, k): m ≥ 64·3 → rows; k ≥ 256·3 → k blocks; else columns.
            let shapes = [(301usize, 41usize, 97usize), (19, 61, 1001), (37, 331, 101)];
            for ((m, n, k), (ta, tb, beta)) in shapes.iter().flat_map(|&sh| {
                [(false, false, 0.0f32), (true, false, 1.0), (false, true, -0.5), (true, true, 2.0)].map(|c| (sh, c))
            }) {
                assert!(m * n * k >= super::SPLIT_MIN);
                let (a, b, c0) = (rng.normal_vec(m * k), rng.normal_vec(k * n), rng.normal_vec(m * n));
                let ash = if ta { [k, m] } else { [m, k] };
                let bsh = if tb { [n, k] } else { [k, n] };
                let at = Tensor::from_f32(&be, &a, &ash, DType::F32).unwrap();
                let bt = Tensor::from_f32(&be, &b, &bsh, DType::F32).unwrap();
                let mut ct = Tensor::from_f32(&be, &c0, &[m, n], DType::F32).unwrap();
                ops::matmul(&be, &at, &bt, &mut ct, ta, tb, 0.75, beta).unwrap();
                let got = ct.to_f32_vec(&be).unwrap();
                let want = naive(&a, &b, &c0, 1, m, n, k, ta, tb, false, 0.75, beta as f64);
                for (g, w) in got.iter().zip(&want) {
                    let tol = 1e-5 * (k as f64).sqrt() * (1.0 + w.abs());
                    assert!((*g as f64 - w).abs() <= tol, "{m}×{n}×{k} ta={ta} tb={tb}: {g} vs {w}");
                }
            }
        });
    }

    #[test]
    fn matmul_with_zero_beta_ignores_nan_in_c() {
        let be = CpuBackend::new();
        let a = Tensor::from_f32(&be, &[1.0, 2.0, 3.0, 4.0], &[2, 2], DType::F16).unwrap();
        let mut c = Tensor::from_f32(&be, &[f32::NAN; 4], &[2, 2], DType::F16).unwrap();
        ops::matmul(&be, &a, &a, &mut c, false, false, 1.0, 0.0).unwrap();
        assert_eq!(c.to_f32_vec(&be).unwrap(), vec![7.0, 10.0, 15.0, 22.0]);
    }
}
