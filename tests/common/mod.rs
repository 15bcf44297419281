//! The cross-backend conformance suite, written once and instantiated per
//! backend pair by `conformance_tests!` (see `tests/conformance_*.rs`).
//!
//! Every check runs the same op on a reference backend `R` (normally the CPU
//! backend) and a backend under test `B`, on the same seeded random inputs
//! (a fresh seed per op, dtype and case; `DYNSPARSE_TEST_SEED` changes them
//! all), with every output poisoned with NaN first so an element a kernel
//! forgets to write fails the comparison. Shapes are deliberately not
//! multiples of any workgroup size.
#![allow(dead_code)]

use dynsparse::attention::RowSample;
use dynsparse::ops::{self, RopeTable, adamw::AdamWConfig};
use dynsparse::util::rng::Rng;
use dynsparse::{Backend, DType, Error, Tensor};

/// Whole-output relative error bound per dtype: `‖got - want‖₂ ≤ tol·‖want‖₂`.
pub fn tolerance(dt: DType) -> f64 {
    match dt {
        DType::F32 => 1e-5,
        _ => 1e-2,
    }
}

/// A seed unique to (op, dtype, case), shifted by `DYNSPARSE_TEST_SEED`.
pub fn seed(op: &str, dt: DType, case: usize) -> u64 {
    let base: u64 = std::env::var("DYNSPARSE_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5EED);
    let mut h = base ^ 0xcbf2_9ce4_8422_2325;
    for b in op.bytes().chain(dt.name().bytes()).chain(case.to_le_bytes()) {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// Compares two outputs; NaN or Inf where the reference is finite always fails.
#[track_caller]
pub fn assert_close(what: &str, got: &[f32], want: &[f32], dt: DType) {
    assert_eq!(got.len(), want.len(), "{what}: output lengths differ");
    if let Some(i) = (0..got.len()).find(|&i| want[i].is_finite() && !got[i].is_finite()) {
        panic!("{what} [{dt}]: element {i} is {} but the reference has {} (unwritten output?)", got[i], want[i]);
    }
    // An infinite reference entry (a masked score, a keyless query's lse) must be
    // matched exactly and stays out of the error sums, so that it neither fails
    // the comparison as NaN nor dilutes the error of the finite entries.
    if let Some(i) = (0..got.len()).find(|&i| want[i].is_infinite() && got[i] != want[i]) {
        panic!("{what} [{dt}]: element {i} is {} but the reference has {}", got[i], want[i]);
    }
    let (mut num, mut den, mut worst, mut wi) = (0.0f64, 0.0f64, 0.0f64, 0usize);
    for i in (0..got.len()).filter(|&i| !want[i].is_infinite()) {
        let d = (got[i] as f64 - want[i] as f64).abs();
        num += d * d;
        den += (want[i] as f64).powi(2);
        if d > worst {
            worst = d;
            wi = i;
        }
    }
    let err = if den > 0.0 { (num / den).sqrt() } else { num.sqrt() };
    let tol = tolerance(dt);
    assert!(
        err <= tol,
        "{what} [{dt}]: relative error {err:.3e} > {tol:.0e}; worst element {wi}: got {} want {}",
        got[wi],
        want[wi]
    );
}

/// The float dtypes both backends support.
pub fn float_dtypes<R: Backend, B: Backend>(r: &R, b: &B) -> Vec<DType> {
    DType::FLOATS.into_iter().filter(|&d| r.supports(d) && b.supports(d)).collect()
}

pub fn up<X: Backend>(be: &X, v: &[f32], shape: &[usize], dt: DType) -> Tensor<X> {
    Tensor::from_f32(be, v, shape, dt).expect("upload")
}

/// A NaN-filled output tensor.
pub fn poisoned<X: Backend>(be: &X, shape: &[usize], dt: DType) -> Tensor<X> {
    let n = shape.iter().product();
    up(be, &vec![f32::NAN; n], shape, dt)
}

pub fn down<X: Backend>(be: &X, t: &Tensor<X>) -> Vec<f32> {
    t.to_f32_vec(be).expect("download")
}

/// Runs `$body` with `$be` bound to each backend in turn (a generic closure).
macro_rules! on_both {
    ($r:expr, $b:expr, |$be:ident| $body:expr) => {{
        let want = {
            let $be = $r;
            $body
        };
        let got = {
            let $be = $b;
            $body
        };
        (want, got)
    }};
}

/// Compares every output of a case.
#[track_caller]
pub fn compare_all(op: &str, case: &str, dt: DType, names: &[&str], want: &[Vec<f32>], got: &[Vec<f32>]) {
    for (i, name) in names.iter().enumerate() {
        assert_close(&format!("{op} {case} `{name}`"), &got[i], &want[i], dt);
    }
}

// ---------------------------------------------------------------- matmul

pub fn matmul<R: Backend, B: Backend>(r: &R, b: &B) {
    for dt in float_dtypes(r, b) {
        let cases = [
            // (batch, m, n, k, trans_a, trans_b, b_batched, alpha, beta)
            (1, 37, 19, 45, false, false, false, 1.0, 0.0),
            (2, 33, 17, 70, true, false, true, 0.5, 1.0),
            (3, 9, 65, 31, false, true, false, 1.0, -0.5),
            (2, 64, 48, 129, true, true, true, 2.0, 0.0),
            (1, 1, 1, 1, false, false, false, 1.0, 0.0),
            (1, 130, 5, 7, false, true, false, 1.0, 0.0),
        ];
        for (ci, &(batch, m, n, k, ta, tb, bb, alpha, beta)) in cases.iter().enumerate() {
            let mut rng = Rng::new(seed("matmul", dt, ci));
            let ash = if ta { [batch, k, m] } else { [batch, m, k] };
            let bmat = if tb { [n, k] } else { [k, n] };
            let bsh: Vec<usize> = if bb { vec![batch, bmat[0], bmat[1]] } else { bmat.to_vec() };
            let a = rng.normal_vec(batch * m * k);
            let bv = rng.normal_vec(bsh.iter().product());
            let c0 = if beta == 0.0 { vec![f32::NAN; batch * m * n] } else { rng.normal_vec(batch * m * n) };
            let (want, got) = on_both!(r, b, |be| {
                let (at, bt) = (up(be, &a, &ash, dt), up(be, &bv, &bsh, dt));
                let mut c = up(be, &c0, &[batch, m, n], dt);
                ops::matmul(be, &at, &bt, &mut c, ta, tb, alpha, beta).unwrap();
                vec![down(be, &c)]
            });
            let case = format!("{batch}×{m}×{n}×{k} ta={ta} tb={tb} b_batched={bb} α={alpha} β={beta}");
            compare_all("matmul", &case, dt, &["c"], &want, &got);
        }
    }
}

// --------------------------------------------------------------- qmatmul

/// Every quantized format and group size, activations in every float dtype,
/// odd shapes: the backend under test matches the reference backend, the
/// reference backend matches the host definition (`QMatrix::matmul_ref`,
/// dequantize then multiply), and every row computed alone is bit-identical
/// to the same row in the batch (quantized layers keep decode batch invariant).
pub fn qmatmul<R: Backend, B: Backend>(r: &R, b: &B) {
    use dynsparse::quant::{INT4_GROUPS, QFormat, QMatrix};
    let mut formats = vec![QFormat::Int8, QFormat::Sparse24 { int8: false }, QFormat::Sparse24 { int8: true }];
    for g in INT4_GROUPS {
        formats.push(QFormat::Int4 { group: g, asym: false });
        formats.push(QFormat::Int4 { group: g, asym: true });
    }
    for dt in float_dtypes(r, b) {
        for (fi, &f) in formats.iter().enumerate() {
            // (m, n, k): a decode row, a small ragged batch, a prefill-sized block.
            let ks: &[usize] = match f {
                QFormat::Int4 { group: 128, .. } => &[128, 256],
                QFormat::Int4 { .. } => &[64, 192],
                QFormat::Sparse24 { int8: true } => &[8, 200],
                _ => &[36, 196],
            };
            let shapes = [(1, 37, ks[0]), (5, 19, ks[1]), (33, 70, ks[0])];
            for (ci, &(m, n, k)) in shapes.iter().enumerate() {
                let mut rng = Rng::new(seed("qmatmul", dt, fi * 8 + ci));
                let w: Vec<f32> = rng.normal_vec(n * k).into_iter().map(|x| x * 0.1).collect();
                let qm = QMatrix::quantize(&w, n, k, f).unwrap();
                let x = rng.normal_vec(m * k);
                let (want, got) = on_both!(r, b, |be| {
                    let qw = ops::QWeight::upload(be, &qm).unwrap();
                    let xt = up(be, &x, &[m, k], dt);
                    let mut y = poisoned(be, &[m, n], dt);
                    ops::qmatmul(be, &xt, &qw, &mut y).unwrap();
                    // Row by row, each alone.
                    let mut alone = Vec::with_capacity(m * n);
                    for i in 0..m {
                        let xi = up(be, &x[i * k..(i + 1) * k], &[1, k], dt);
                        let mut yi = poisoned(be, &[1, n], dt);
                        ops::qmatmul(be, &xi, &qw, &mut yi).unwrap();
                        alone.extend(down(be, &yi));
                    }
                    assert_eq!(qw.download(be).unwrap(), qm, "{f}: upload/download changed the weight");
                    vec![down(be, &y), alone]
                });
                let case = format!("{f} m={m} n={n} k={k}");
                compare_all("qmatmul", &case, dt, &["y"], &want[..1], &got[..1]);
                for (name, v) in [("reference backend", &want), ("backend under test", &got)] {
                    let bits = |u: &[f32]| u.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&v[1]),
                        bits(&v[0]),
                        "qmatmul {case} [{dt}]: {name}: rows alone differ from the batch"
                    );
                }
                // The reference backend against the host definition (x rounded to dt first).
                let xr: Vec<f32> = down(r, &up(r, &x, &[m, k], dt));
                assert_close(&format!("qmatmul {case} host reference"), &want[0], &qm.matmul_ref(&xr, m), dt);
            }
        }
    }
}

/// A model whose linear weights are quantized (a different format per
/// layer and weight) gives the reference's loss and logits on the backend under
/// test, in the full-window forward pass and in a prefill + decode step: a
/// compressed checkpoint evaluates and generates alike on every backend.
pub fn compressed_model<R: Backend, B: Backend>(r: &R, b: &B) {
    use dynsparse::model::{AttentionMode, InferState, KvCache, Model, ModelConfig, Row, Workspace, init_params};
    use dynsparse::quant::{QFormat, QMatrix, transpose};
    let (seq, ctx) = (24usize, 32usize);
    let cfg = ModelConfig {
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 2,
        d_model: 64,
        vocab: 256,
        context: ctx,
        mlp_ratio: 2,
        rope_theta: 10000.0,
        attention: AttentionMode::Sparse { block: 8, keep_blocks: 2, index_heads: 2, index_dim: 8 },
    };
    let formats = [
        QFormat::Int8,
        QFormat::Int4 { group: 32, asym: true },
        QFormat::Int4 { group: 64, asym: false },
        QFormat::Sparse24 { int8: true },
        QFormat::Sparse24 { int8: false },
    ];
    let values = init_params(&cfg, 3);
    let infos = cfg.params();
    let mut quant: Vec<Option<QMatrix>> = vec![None; infos.len()];
    let mut which = 0;
    for (i, p) in infos.iter().enumerate() {
        let linear = [".wq", ".wk", ".wv", ".wo", ".w1", ".w2"].iter().any(|s| p.name.ends_with(s));
        if linear && !p.name.contains(".idx.") && p.shape.len() == 2 {
            let (k, n) = (p.shape[0], p.shape[1]);
            let f = formats[which % formats.len()];
            which += 1;
            quant[i] = Some(QMatrix::quantize(&transpose(&values[i], k, n), n, k, f).unwrap());
        }
    }
    assert!(which >= 12, "the test model has {which} linear weights");
    for dt in float_dtypes(r, b) {
        let mut rng = Rng::new(seed("compressed-model", dt, 0));
        let ids: Vec<u32> = (0..seq).map(|_| rng.below(256) as u32).collect();
        let targets: Vec<u32> = (0..seq).map(|_| rng.below(256) as u32).collect();
        let (want, got) = on_both!(r, b, |be| {
            let model = Model::from_parts(be, cfg, dt, &values, &quant).unwrap();
            let mut ws = Workspace::new(be, &cfg, dt, 1, seq).unwrap();
            let loss = model.forward(be, &mut ws, &ids, Some(&targets), model.inference_attention()).unwrap().loss;
            let full = ws.logits_f32(be).unwrap();
            let mut cache = KvCache::new(be, &model, 1, ctx).unwrap();
            let mut st = InferState::default();
            let mut steps = model.prefill(be, &mut cache, &mut st, 0, &ids[..seq - 2], 8).unwrap();
            for &t in &ids[seq - 2..] {
                steps.extend(
                    model
                        .step(be, &mut cache, &mut st, &[Row { slot: 0, token: t }], model.inference_attention())
                        .unwrap(),
                );
            }
            vec![vec![loss as f32], full, steps]
        });
        compare_all(
            "compressed model",
            "2 layers, 5 formats",
            dt,
            &["loss", "logits", "prefill+decode logits"],
            &want,
            &got,
        );
    }
}

// ------------------------------------------------------------ elementwise

const SHAPES: [&[usize]; 3] = [&[1], &[3, 77], &[5, 13, 11]];

pub fn fill_add_scale<R: Backend, B: Backend>(r: &R, b: &B) {
    for dt in float_dtypes(r, b) {
        for (ci, shape) in SHAPES.iter().enumerate() {
            let n: usize = shape.iter().product();
            let mut rng = Rng::new(seed("add", dt, ci));
            let (x, y) = (rng.normal_vec(n), rng.normal_vec(n));
            let s = rng.normal() as f32;
            let (want, got) = on_both!(r, b, |be| {
                let (xt, yt) = (up(be, &x, shape, dt), up(be, &y, shape, dt));
                let mut sum = poisoned(be, shape, dt);
                ops::add(be, &xt, &yt, &mut sum).unwrap();
                let mut scaled = up(be, &x, shape, dt);
                ops::scale(be, &mut scaled, s).unwrap();
                let mut filled = poisoned(be, shape, dt);
                ops::fill(be, &mut filled, 0.375).unwrap();
                vec![down(be, &sum), down(be, &scaled), down(be, &filled)]
            });
            compare_all("add/scale/fill", &format!("{shape:?}"), dt, &["add", "scale", "fill"], &want, &got);
        }
    }
}

pub fn axpby_and_cast<R: Backend, B: Backend>(r: &R, b: &B) {
    let dts = float_dtypes(r, b);
    for &dx in &dts {
        for &dy in &dts {
            let shape = [7usize, 45];
            let n = 7 * 45;
            let mut rng = Rng::new(seed("axpby", dx, dy as usize));
            let (x, y) = (rng.normal_vec(n), rng.normal_vec(n));
            let (want, got) = on_both!(r, b, |be| {
                let xt = up(be, &x, &shape, dx);
                let mut acc = up(be, &y, &shape, dy);
                ops::axpby(be, 0.75, &xt, 1.0, &mut acc).unwrap();
                let mut fresh = poisoned(be, &shape, dy);
                ops::axpby(be, -2.0, &xt, 0.0, &mut fresh).unwrap();
                let mut cast = poisoned(be, &shape, dy);
                ops::cast(be, &xt, &mut cast).unwrap();
                vec![down(be, &acc), down(be, &fresh), down(be, &cast)]
            });
            // The looser of the two dtypes bounds the comparison.
            let dt = if dx == DType::F32 { dy } else { dx };
            compare_all("axpby/cast", &format!("{dx}→{dy}"), dt, &["y=αx+y", "y=αx (β=0)", "cast"], &want, &got);
        }
    }
}

pub fn bias_add_and_sum_rows<R: Backend, B: Backend>(r: &R, b: &B) {
    for dt in float_dtypes(r, b) {
        for (ci, &(rows, n)) in [(1usize, 1usize), (37, 19), (130, 67)].iter().enumerate() {
            let mut rng = Rng::new(seed("bias", dt, ci));
            let (x, bias, acc) = (rng.normal_vec(rows * n), rng.normal_vec(n), rng.normal_vec(n));
            let (want, got) = on_both!(r, b, |be| {
                let mut xt = up(be, &x, &[rows, n], dt);
                let bt = up(be, &bias, &[n], dt);
                ops::bias_add(be, &mut xt, &bt).unwrap();
                let mut fresh = poisoned(be, &[n], dt);
                ops::sum_rows(be, &xt, &mut fresh, 0.0).unwrap();
                let mut accum = up(be, &acc, &[n], dt);
                ops::sum_rows(be, &xt, &mut accum, 1.0).unwrap();
                vec![down(be, &xt), down(be, &fresh), down(be, &accum)]
            });
            let names = ["bias_add", "sum_rows β=0", "sum_rows β=1"];
            compare_all("bias_add/sum_rows", &format!("{rows}×{n}"), dt, &names, &want, &got);
        }
    }
}

pub fn gelu<R: Backend, B: Backend>(r: &R, b: &B) {
    for dt in float_dtypes(r, b) {
        for (ci, &(rows, n)) in [(1usize, 3usize), (29, 71), (64, 200)].iter().enumerate() {
            let mut rng = Rng::new(seed("gelu", dt, ci));
            let x: Vec<f32> = rng.normal_vec(rows * n).iter().map(|v| 3.0 * v).collect();
            let (dy, bias) = (rng.normal_vec(rows * n), rng.normal_vec(n));
            let (want, got) = on_both!(r, b, |be| {
                let sh = [rows, n];
                let (xt, dyt, bt) = (up(be, &x, &sh, dt), up(be, &dy, &sh, dt), up(be, &bias, &[n], dt));
                let mut y = poisoned(be, &sh, dt);
                ops::gelu(be, &xt, &mut y).unwrap();
                let mut dx = poisoned(be, &sh, dt);
                ops::gelu_backward(be, &xt, &dyt, &mut dx).unwrap();
                let mut yb = poisoned(be, &sh, dt);
                ops::bias_gelu(be, &xt, &bt, &mut yb).unwrap();
                vec![down(be, &y), down(be, &dx), down(be, &yb)]
            });
            compare_all("gelu", &format!("{rows}×{n}"), dt, &["gelu", "gelu_backward", "bias_gelu"], &want, &got);
        }
    }
}

// -------------------------------------------------------------- layernorm

pub fn layernorm<R: Backend, B: Backend>(r: &R, b: &B) {
    for dt in float_dtypes(r, b) {
        for (ci, &(rows, n)) in [(1usize, 1usize), (3, 77), (45, 256), (7, 1000)].iter().enumerate() {
            let mut rng = Rng::new(seed("layernorm", dt, ci));
            let x: Vec<f32> = rng.normal_vec(rows * n).iter().map(|v| 2.0 * v + 0.5).collect();
            let (g, bb, dy) = (rng.normal_vec(n), rng.normal_vec(n), rng.normal_vec(rows * n));
            let (dg0, db0) = (rng.normal_vec(n), rng.normal_vec(n));
            let (want, got) = on_both!(r, b, |be| {
                let sh = [rows, n];
                let (xt, gt, bt, dyt) =
                    (up(be, &x, &sh, dt), up(be, &g, &[n], dt), up(be, &bb, &[n], dt), up(be, &dy, &sh, dt));
                let mut y = poisoned(be, &sh, dt);
                let mut mean = poisoned(be, &[rows], DType::F32);
                let mut rstd = poisoned(be, &[rows], DType::F32);
                ops::layernorm(be, &xt, &gt, &bt, &mut y, &mut mean, &mut rstd, 1e-5).unwrap();
                let mut dx = poisoned(be, &sh, dt);
                let (mut dg, mut db) = (up(be, &dg0, &[n], dt), up(be, &db0, &[n], dt));
                ops::layernorm_backward(be, &dyt, &xt, &gt, &mean, &rstd, &mut dx, &mut dg, &mut db).unwrap();
                vec![down(be, &y), down(be, &mean), down(be, &rstd), down(be, &dx), down(be, &dg), down(be, &db)]
            });
            let names = ["y", "mean", "rstd", "dx", "dgamma (accumulated)", "dbeta (accumulated)"];
            // n = 1 makes every xhat 0: y = beta exactly, dx = 0.
            compare_all("layernorm", &format!("{rows}×{n}"), dt, &names, &want, &got);
        }
    }
}

// ---------------------------------------------------------------- softmax

pub fn softmax<R: Backend, B: Backend>(r: &R, b: &B) {
    for dt in float_dtypes(r, b) {
        let cases: [(&[usize], bool); 5] = [
            (&[1, 1], false),
            (&[6, 77], false),
            (&[2, 3, 19, 19], true),
            (&[2, 13, 40], true),
            (&[1, 130, 257], true),
        ];
        for (ci, &(shape, causal)) in cases.iter().enumerate() {
            let n: usize = shape.iter().product();
            let mut rng = Rng::new(seed("softmax", dt, ci));
            let (x, dy) = (rng.normal_vec(n).iter().map(|v| 4.0 * v).collect::<Vec<_>>(), rng.normal_vec(n));
            let (want, got) = on_both!(r, b, |be| {
                let (xt, dyt) = (up(be, &x, shape, dt), up(be, &dy, shape, dt));
                let mut y = poisoned(be, shape, dt);
                ops::softmax(be, &xt, &mut y, causal).unwrap();
                let mut dx = poisoned(be, shape, dt);
                ops::softmax_backward(be, &y, &dyt, &mut dx, causal).unwrap();
                vec![down(be, &y), down(be, &dx)]
            });
            compare_all("softmax", &format!("{shape:?} causal={causal}"), dt, &["y", "dx"], &want, &got);
        }
    }
}

// ------------------------------------------------------------------- rope

pub fn rope<R: Backend, B: Backend>(r: &R, b: &B) {
    for dt in float_dtypes(r, b) {
        let cases: [(&[usize], usize); 3] = [(&[1, 1, 2], 0), (&[2, 13, 3, 16], 5), (&[37, 4, 64], 100)];
        for (ci, &(shape, off)) in cases.iter().enumerate() {
            let n: usize = shape.iter().product();
            let hd = *shape.last().unwrap();
            let mut rng = Rng::new(seed("rope", dt, ci));
            let (x, dy) = (rng.normal_vec(n), rng.normal_vec(n));
            let (want, got) = on_both!(r, b, |be| {
                let table = RopeTable::new(be, 256, hd, 10000.0).unwrap();
                let (xt, dyt) = (up(be, &x, shape, dt), up(be, &dy, shape, dt));
                let mut y = poisoned(be, shape, dt);
                ops::rope(be, &xt, &table, off, &mut y).unwrap();
                let mut dx = poisoned(be, shape, dt);
                ops::rope_backward(be, &dyt, &table, off, &mut dx).unwrap();
                vec![down(be, &y), down(be, &dx)]
            });
            compare_all("rope", &format!("{shape:?} offset {off}"), dt, &["y", "dx"], &want, &got);
        }
    }
}

// -------------------------------------------------------------- embedding

pub fn embedding<R: Backend, B: Backend>(r: &R, b: &B) {
    for dt in float_dtypes(r, b) {
        for (ci, &(n, vocab, dim)) in [(1usize, 1usize, 1usize), (37, 11, 19), (200, 256, 33)].iter().enumerate() {
            let mut rng = Rng::new(seed("embedding", dt, ci));
            // Repeated ids (small vocab) and one out-of-range id.
            let mut ids: Vec<u32> = (0..n).map(|_| rng.below(vocab as u64) as u32).collect();
            if n > 3 {
                ids[2] = vocab as u32 + 3;
            }
            let (table, dout, dt0) =
                (rng.normal_vec(vocab * dim), rng.normal_vec(n * dim), rng.normal_vec(vocab * dim));
            let (want, got) = on_both!(r, b, |be| {
                let idt = Tensor::from_u32(be, &ids, &[n]).unwrap();
                let tt = up(be, &table, &[vocab, dim], dt);
                let mut out = poisoned(be, &[n, dim], dt);
                ops::embedding(be, &idt, &tt, &mut out).unwrap();
                let dot = up(be, &dout, &[n, dim], dt);
                let mut dtab = up(be, &dt0, &[vocab, dim], dt);
                ops::embedding_backward(be, &idt, &dot, &mut dtab).unwrap();
                vec![down(be, &out), down(be, &dtab)]
            });
            compare_all("embedding", &format!("n={n} vocab={vocab} dim={dim}"), dt, &["out", "dtable"], &want, &got);
        }
    }
}

// ---------------------------------------------------------- cross-entropy

pub fn cross_entropy<R: Backend, B: Backend>(r: &R, b: &B) {
    for dt in float_dtypes(r, b) {
        for (ci, &(rows, vocab)) in [(1usize, 2usize), (13, 256), (70, 1000)].iter().enumerate() {
            let mut rng = Rng::new(seed("cross_entropy", dt, ci));
            let logits: Vec<f32> = rng.normal_vec(rows * vocab).iter().map(|v| 3.0 * v).collect();
            let mut targets: Vec<u32> = (0..rows).map(|_| rng.below(vocab as u64) as u32).collect();
            if rows > 4 {
                targets[1] = 7; // the ignore index below
                targets[3] = vocab as u32; // out of range: ignored too
            }
            let (want, got) = on_both!(r, b, |be| {
                let lt = up(be, &logits, &[rows, vocab], dt);
                let tt = Tensor::from_u32(be, &targets, &[rows]).unwrap();
                let mut losses = poisoned(be, &[rows], DType::F32);
                ops::cross_entropy(be, &lt, &tt, &mut losses, 7).unwrap();
                let mut d = poisoned(be, &[rows, vocab], dt);
                ops::cross_entropy_backward(be, &lt, &tt, &mut d, 7, 1.0 / rows as f32).unwrap();
                vec![down(be, &losses), down(be, &d)]
            });
            compare_all("cross_entropy", &format!("{rows}×{vocab}"), dt, &["losses", "dlogits"], &want, &got);
        }
    }
}

// ---------------------------------------------------------------- reduce

pub fn reductions<R: Backend, B: Backend>(r: &R, b: &B) {
    for dt in float_dtypes(r, b) {
        for (ci, &n) in [1usize, 255, 1000, 70_001].iter().enumerate() {
            let mut rng = Rng::new(seed("reduce", dt, ci));
            let x = rng.normal_vec(n);
            for (label, bad) in [("finite", None), ("inf", Some(f32::INFINITY)), ("nan", Some(f32::NAN))] {
                let mut xv = x.clone();
                if let Some(v) = bad {
                    xv[n - 1 - n / 3] = v;
                }
                let (want, got) = on_both!(r, b, |be| {
                    let xt = up(be, &xv, &[n], dt);
                    let mut ss = poisoned(be, &[1], DType::F32);
                    ops::sum_squares(be, &xt, &mut ss).unwrap();
                    let mut ok = Tensor::from_u32(be, &[7], &[1]).unwrap();
                    ops::all_finite(be, &xt, &mut ok).unwrap();
                    (down(be, &ss), ok.to_u32_vec(be).unwrap())
                });
                assert_eq!(want.1, vec![bad.is_none() as u32], "reference all_finite for {label}");
                assert_eq!(got.1, want.1, "all_finite n={n} {label} [{dt}]");
                if bad.is_none() {
                    assert_close(&format!("sum_squares n={n}"), &got.0, &want.0, dt);
                } else {
                    assert!(!got.0[0].is_finite(), "sum_squares of a tensor holding {label} must not be finite");
                }
            }
        }
    }
}

// ------------------------------------------------------------------ adamw

pub fn adamw<R: Backend, B: Backend>(r: &R, b: &B) {
    for copy_dt in float_dtypes(r, b) {
        for (ci, &n) in [1usize, 333, 4097].iter().enumerate() {
            let mut rng = Rng::new(seed("adamw", copy_dt, ci));
            let (p, g, m) = (rng.normal_vec(n), rng.normal_vec(n), rng.normal_vec(n));
            let v: Vec<f32> = rng.normal_vec(n).iter().map(|x| x * x).collect();
            let cfg = AdamWConfig { lr: 3e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
            let (want, got) = on_both!(r, b, |be| {
                let f = |v: &[f32]| up(be, v, &[n], DType::F32);
                let (mut pt, gt, mut mt, mut vt) = (f(&p), f(&g), f(&m), f(&v));
                let mut copy = poisoned(be, &[n], copy_dt);
                ops::adamw(be, &cfg, 7, 0.5, &mut pt, &gt, &mut mt, &mut vt, Some(&mut copy)).unwrap();
                // A second step without a copy.
                ops::adamw(be, &cfg, 8, 0.5, &mut pt, &gt, &mut mt, &mut vt, None).unwrap();
                vec![down(be, &pt), down(be, &mt), down(be, &vt), down(be, &copy)]
            });
            compare_all("adamw", &format!("n={n}"), DType::F32, &["params", "m", "v"], &want[..3], &got[..3]);
            assert_close(&format!("adamw n={n} copy"), &got[3], &want[3], copy_dt);
        }
    }
}

// -------------------------------------------------------------- attention

/// (batch, seq, heads, kv_heads, head_dim): GQA and MHA, seq not a multiple of the block.
const ATTN_SHAPES: [(usize, usize, usize, usize, usize); 2] = [(2, 75, 4, 2, 16), (1, 100, 2, 2, 32)];
const ATTN_BLOCK: usize = 16;

/// Selections from the CPU reference's semantics on random tied scores.
pub fn attn_patterns(batch: usize, seq: usize, seed: u64) -> (Vec<u32>, usize, Vec<u32>, usize) {
    use dynsparse::attention::select::{topk_blocks, topk_tokens};
    let mut rng = Rng::new(seed);
    let (k, n) = (11, 3);
    let (mut tok, mut blk) = (Vec::new(), Vec::new());
    for _ in 0..batch {
        let scores: Vec<f32> = (0..seq * seq).map(|_| rng.below(6) as f32).collect();
        tok.extend(topk_tokens(&scores, seq, k));
        blk.extend(topk_blocks(&scores, seq, ATTN_BLOCK, n));
    }
    (tok, k, blk, n)
}

pub fn attention<R: Backend, B: Backend>(r: &R, b: &B) {
    use dynsparse::attention::{self as attn, Pattern};
    for dt in float_dtypes(r, b) {
        for (ci, &(batch, seq, heads, kv, d)) in ATTN_SHAPES.iter().enumerate() {
            let mut rng = Rng::new(seed("attention", dt, ci));
            let (qs, ks) = ([batch, seq, heads, d], [batch, seq, kv, d]);
            let nq = batch * seq * heads * d;
            let nk = batch * seq * kv * d;
            let (q, k, v, d_o) = (rng.normal_vec(nq), rng.normal_vec(nk), rng.normal_vec(nk), rng.normal_vec(nq));
            let (tok, kk, blk, nn) = attn_patterns(batch, seq, seed("attention-pattern", dt, ci));
            for mode in ["dense", "tokens", "blocks"] {
                let (want, got) = on_both!(r, b, |be| {
                    let (qt, kt, vt, dot) =
                        (up(be, &q, &qs, dt), up(be, &k, &ks, dt), up(be, &v, &ks, dt), up(be, &d_o, &qs, dt));
                    let tt = Tensor::from_u32(be, &tok, &[batch, seq, kk]).unwrap();
                    let bt = Tensor::from_u32(be, &blk, &[batch, seq, nn]).unwrap();
                    let pat = || match mode {
                        "dense" => Pattern::Dense,
                        "tokens" => Pattern::Tokens(&tt),
                        _ => Pattern::Blocks { idx: &bt, block: ATTN_BLOCK },
                    };
                    let mut o = poisoned(be, &qs, dt);
                    let mut lse = poisoned(be, &[batch, heads, seq], DType::F32);
                    attn::attention(be, &qt, &kt, &vt, pat(), &mut o, &mut lse).unwrap();
                    let (mut dq, mut dk, mut dv) =
                        (poisoned(be, &qs, dt), poisoned(be, &ks, dt), poisoned(be, &ks, dt));
                    attn::attention_backward(be, &qt, &kt, &vt, &o, &lse, &dot, pat(), &mut dq, &mut dk, &mut dv)
                        .unwrap();
                    vec![down(be, &o), down(be, &lse), down(be, &dq), down(be, &dk), down(be, &dv)]
                });
                let case = format!("{mode} b{batch} t{seq} h{heads}/{kv} d{d}");
                compare_all("attention", &case, dt, &["o", "lse", "dq", "dk", "dv"], &want, &got);
            }
        }
    }
}

/// On the backend under test alone: a pattern that keeps every key is dense attention.
pub fn sparse_attention_keeping_all_equals_dense<R: Backend, B: Backend>(r: &R, b: &B) {
    use dynsparse::attention::{self as attn, Pattern};
    for dt in float_dtypes(r, b) {
        let (batch, seq, heads, kv, d) = ATTN_SHAPES[0];
        let mut rng = Rng::new(seed("keep-all", dt, 0));
        let (qs, ks) = ([batch, seq, heads, d], [batch, seq, kv, d]);
        let (q, k, v) = (
            rng.normal_vec(batch * seq * heads * d),
            rng.normal_vec(batch * seq * kv * d),
            rng.normal_vec(batch * seq * kv * d),
        );
        let d_o = rng.normal_vec(q.len());
        let nb = seq.div_ceil(ATTN_BLOCK);
        let all_tok: Vec<u32> = (0..batch * seq).flat_map(|_| 0..seq as u32).collect();
        let all_blk: Vec<u32> = (0..batch * seq).flat_map(|_| 0..nb as u32).collect();
        let (qt, kt, vt, dot) = (up(b, &q, &qs, dt), up(b, &k, &ks, dt), up(b, &v, &ks, dt), up(b, &d_o, &qs, dt));
        let tt = Tensor::from_u32(b, &all_tok, &[batch, seq, seq]).unwrap();
        let bt = Tensor::from_u32(b, &all_blk, &[batch, seq, nb]).unwrap();
        let mut outs = Vec::new();
        for pat in [Pattern::Dense, Pattern::Tokens(&tt), Pattern::Blocks { idx: &bt, block: ATTN_BLOCK }] {
            let mut o = poisoned(b, &qs, dt);
            let mut lse = poisoned(b, &[batch, heads, seq], DType::F32);
            let pat2 = match &pat {
                Pattern::Dense => Pattern::Dense,
                Pattern::Tokens(t) => Pattern::Tokens(t),
                Pattern::Blocks { idx, block } => Pattern::Blocks { idx, block: *block },
            };
            attn::attention(b, &qt, &kt, &vt, pat, &mut o, &mut lse).unwrap();
            let (mut dq, mut dk, mut dv) = (poisoned(b, &qs, dt), poisoned(b, &ks, dt), poisoned(b, &ks, dt));
            attn::attention_backward(b, &qt, &kt, &vt, &o, &lse, &dot, pat2, &mut dq, &mut dk, &mut dv).unwrap();
            outs.push(vec![down(b, &o), down(b, &lse), down(b, &dq), down(b, &dk), down(b, &dv)]);
        }
        let names = ["o", "lse", "dq", "dk", "dv"];
        compare_all("keep-all tokens = dense", "", dt, &names, &outs[0], &outs[1]);
        compare_all("keep-all blocks = dense", "", dt, &names, &outs[0], &outs[2]);
    }
}

pub fn indexer_and_selection<R: Backend, B: Backend>(r: &R, b: &B) {
    use dynsparse::attention::{self as attn, Pattern};
    for dt in float_dtypes(r, b) {
        for (ci, &(batch, seq, hi, di)) in [(1usize, 33usize, 2usize, 8usize), (2, 90, 4, 32)].iter().enumerate() {
            let mut rng = Rng::new(seed("indexer", dt, ci));
            let (qi, ki, w) = (
                rng.normal_vec(batch * seq * hi * di),
                rng.normal_vec(batch * seq * di),
                rng.normal_vec(batch * seq * hi),
            );
            let dsc = rng.normal_vec(batch * seq * seq);
            let nb = seq.div_ceil(ATTN_BLOCK);
            let (want, got) = on_both!(r, b, |be| {
                let (qt, kt, wt) = (
                    up(be, &qi, &[batch, seq, hi, di], dt),
                    up(be, &ki, &[batch, seq, di], dt),
                    up(be, &w, &[batch, seq, hi], dt),
                );
                let mut sc = poisoned(be, &[batch, seq, seq], DType::F32);
                attn::indexer_scores(be, &qt, &kt, &wt, &mut sc).unwrap();
                let mut pooled = poisoned(be, &[batch, seq, nb], DType::F32);
                attn::indexer_block_scores(be, &qt, &kt, &wt, ATTN_BLOCK, &mut pooled).unwrap();
                let dst = up(be, &dsc, &[batch, seq, seq], DType::F32);
                let (mut dq, mut dk, mut dw) = (
                    poisoned(be, &[batch, seq, hi, di], dt),
                    poisoned(be, &[batch, seq, di], dt),
                    poisoned(be, &[batch, seq, hi], dt),
                );
                attn::indexer_backward(be, &qt, &kt, &wt, &dst, &mut dq, &mut dk, &mut dw).unwrap();
                vec![down(be, &sc), down(be, &pooled), down(be, &dq), down(be, &dk), down(be, &dw)]
            });
            let case = format!("b{batch} t{seq} H_I{hi} d_I{di}");
            compare_all("indexer", &case, dt, &["scores", "block scores", "dq_i", "dk_i", "dw"], &want, &got);
        }
    }
    // Selection on identical scores must pick identical sets (ties to the
    // smaller index): token mode over [seq, seq] rows, block mode over
    // per-query [seq, ceil(seq/block)] rows (own block, then sink, first).
    let (batch, seq) = (2usize, 77usize);
    let mut rng = Rng::new(seed("select", DType::F32, 0));
    for (k, block) in [(1usize, 0usize), (5, 0), (100, 0), (1, 16), (3, 16), (2, 5), (4, 5), (40, 5)] {
        let cols = if block > 0 { seq.div_ceil(block) } else { seq };
        let scores: Vec<f32> = (0..batch * seq * cols).map(|_| rng.below(7) as f32 - 3.0).collect();
        let (want, got) = on_both!(r, b, |be| {
            let st = up(be, &scores, &[batch, seq, cols], DType::F32);
            let mut idx = Tensor::from_u32(be, &vec![7; batch * seq * k], &[batch, seq, k]).unwrap();
            attn::select_topk(be, &st, k, block, &mut idx).unwrap();
            idx.to_u32_vec(be).unwrap()
        });
        assert_eq!(got, want, "select_topk k={k} block={block}");
    }
    // The KL loss of the indexer against the main attention, dense and kept-set.
    for dt in float_dtypes(r, b) {
        let (batch, seq, heads, kv, d) = ATTN_SHAPES[0];
        let mut rng = Rng::new(seed("indexer_kl", dt, 0));
        let (qs, ks) = ([batch, seq, heads, d], [batch, seq, kv, d]);
        let (q, k) = (rng.normal_vec(batch * seq * heads * d), rng.normal_vec(batch * seq * kv * d));
        let sc = rng.normal_vec(batch * seq * seq);
        let (_, _, blk, nn) = attn_patterns(batch, seq, seed("indexer_kl-pattern", dt, 0));
        for dense in [true, false] {
            let (want, got) = on_both!(r, b, |be| {
                let (qt, kt) = (up(be, &q, &qs, dt), up(be, &k, &ks, dt));
                let bt = Tensor::from_u32(be, &blk, &[batch, seq, nn]).unwrap();
                let pat = || if dense { Pattern::Dense } else { Pattern::Blocks { idx: &bt, block: ATTN_BLOCK } };
                let mut o = poisoned(be, &qs, dt);
                let mut lse = poisoned(be, &[batch, heads, seq], DType::F32);
                attn::attention(be, &qt, &kt, &kt, pat(), &mut o, &mut lse).unwrap();
                let st = up(be, &sc, &[batch, seq, seq], DType::F32);
                let mut loss = poisoned(be, &[batch, seq], DType::F32);
                let mut ds = poisoned(be, &[batch, seq, seq], DType::F32);
                attn::indexer_kl(be, &qt, &kt, &lse, &st, pat(), &mut loss, &mut ds).unwrap();
                vec![down(be, &loss), down(be, &ds)]
            });
            compare_all("indexer_kl", if dense { "dense" } else { "blocks" }, dt, &["loss", "dscores"], &want, &got);
        }
    }
}

/// The indexer's training ops over tiles of query rows (uneven, one crossing
/// the CPU's 64-query tiles) reproduce the untiled ops on each backend:
/// scores and dscores rows, the KL rows, dq_i and dw rows (each tile writes
/// its own rows and leaves the others), and dk_i as the sum of the tiles'
/// contributions; and the tiled results agree across backends.
pub fn indexer_tiles_match_untiled<R: Backend, B: Backend>(r: &R, b: &B) {
    type Tiles = &'static [(usize, usize)];
    let cases: [(usize, usize, usize, Tiles); 2] = [
        (2, 90, 8, &[(0, 7), (7, 64), (64, 90)]),
        // d_I 64 and 500 queries in one tile: wgpu splits both backward loops (keys and queries) into chunks.
        (1, 600, 64, &[(0, 100), (100, 600)]),
    ];
    for (ci, &(batch, seq, di, tiles)) in cases.iter().enumerate() {
        let dts = if ci == 0 { float_dtypes(r, b) } else { vec![DType::F32] };
        for dt in dts {
            indexer_tiles_case(r, b, dt, (batch, seq, di), tiles);
        }
    }
}

fn indexer_tiles_case<R: Backend, B: Backend>(
    r: &R,
    b: &B,
    dt: DType,
    (batch, seq, di): (usize, usize, usize),
    tiles: &[(usize, usize)],
) {
    use dynsparse::attention::{self as attn, Pattern};
    let (hi, heads, kv, d) = (2usize, 4usize, 2usize, 16usize);
    // Rows q0..q1 of every batch of a [batch, seq, seq] host tensor.
    let rows_of = |v: &[f32], q0: usize, q1: usize| -> Vec<f32> {
        (0..batch).flat_map(|bi| v[(bi * seq + q0) * seq..(bi * seq + q1) * seq].to_vec()).collect()
    };
    {
        let mut rng = Rng::new(seed("indexer-tiles", dt, seq));
        let (qi, ki, w) =
            (rng.normal_vec(batch * seq * hi * di), rng.normal_vec(batch * seq * di), rng.normal_vec(batch * seq * hi));
        let (q, k) = (rng.normal_vec(batch * seq * heads * d), rng.normal_vec(batch * seq * kv * d));
        let (sc, dsc) = (rng.normal_vec(batch * seq * seq), rng.normal_vec(batch * seq * seq));
        let (_, _, blk, nn) = attn_patterns(batch, seq, seed("indexer-tiles-pattern", dt, 0));
        let names = ["scores", "kl loss", "kl dscores", "dq_i", "dk_i", "dw"];
        let (want, got) = on_both!(r, b, |be| {
            let (qt, kt, wt) = (
                up(be, &qi, &[batch, seq, hi, di], dt),
                up(be, &ki, &[batch, seq, di], dt),
                up(be, &w, &[batch, seq, hi], dt),
            );
            let (qs, ks) = ([batch, seq, heads, d], [batch, seq, kv, d]);
            let (aq, ak) = (up(be, &q, &qs, dt), up(be, &k, &ks, dt));
            let bt = Tensor::from_u32(be, &blk, &[batch, seq, nn]).unwrap();
            let pat = || Pattern::Blocks { idx: &bt, block: ATTN_BLOCK };
            let mut o = poisoned(be, &qs, dt);
            let mut lse = poisoned(be, &[batch, heads, seq], DType::F32);
            attn::attention(be, &aq, &ak, &ak, pat(), &mut o, &mut lse).unwrap();
            let full = [batch, seq, seq];
            // Untiled.
            let mut scores = poisoned(be, &full, DType::F32);
            attn::indexer_scores(be, &qt, &kt, &wt, &mut scores).unwrap();
            let (mut loss, mut ds) = (poisoned(be, &[batch, seq], DType::F32), poisoned(be, &full, DType::F32));
            attn::indexer_kl(be, &aq, &ak, &lse, &up(be, &sc, &full, DType::F32), pat(), &mut loss, &mut ds).unwrap();
            let (mut dq, mut dk, mut dw) = (
                poisoned(be, &[batch, seq, hi, di], dt),
                poisoned(be, &[batch, seq, di], dt),
                poisoned(be, &[batch, seq, hi], dt),
            );
            let dst = up(be, &dsc, &full, DType::F32);
            attn::indexer_backward(be, &qt, &kt, &wt, &dst, &mut dq, &mut dk, &mut dw).unwrap();
            let untiled =
                [down(be, &scores), down(be, &loss), down(be, &ds), down(be, &dq), down(be, &dk), down(be, &dw)];
            // Tiled, into the same full-size per-query outputs.
            let (mut tscores, mut tds) = (vec![0.0; batch * seq * seq], vec![0.0; batch * seq * seq]);
            let mut tloss = poisoned(be, &[batch, seq], DType::F32);
            let (mut tdq, mut tdw) = (poisoned(be, &[batch, seq, hi, di], dt), poisoned(be, &[batch, seq, hi], dt));
            let mut tdk = vec![0.0f32; batch * seq * di];
            for &(q0, q1) in tiles {
                let tile = [batch, q1 - q0, seq];
                let mut s_t = poisoned(be, &tile, DType::F32);
                attn::indexer_scores_rows(be, &qt, &kt, &wt, q0, &mut s_t).unwrap();
                let mut ds_t = poisoned(be, &tile, DType::F32);
                let sc_t = up(be, &rows_of(&sc, q0, q1), &tile, DType::F32);
                attn::indexer_kl_rows(be, &aq, &ak, &lse, &sc_t, pat(), q0, RowSample::ALL, &mut tloss, &mut ds_t)
                    .unwrap();
                let mut dk_t = poisoned(be, &[batch, seq, di], dt);
                let dsc_t = up(be, &rows_of(&dsc, q0, q1), &tile, DType::F32);
                attn::indexer_backward_rows(be, &qt, &kt, &wt, &dsc_t, q0, &mut tdq, &mut dk_t, &mut tdw).unwrap();
                for (dst, v) in [(&mut tscores, down(be, &s_t)), (&mut tds, down(be, &ds_t))] {
                    for bi in 0..batch {
                        let n = (q1 - q0) * seq;
                        dst[(bi * seq + q0) * seq..(bi * seq + q1) * seq].copy_from_slice(&v[bi * n..(bi + 1) * n]);
                    }
                }
                tdk.iter_mut().zip(down(be, &dk_t)).for_each(|(a, x)| *a += x);
            }
            let tiled = [tscores, down(be, &tloss), tds, down(be, &tdq), tdk, down(be, &tdw)];
            for (i, name) in names.iter().enumerate() {
                let what = format!("indexer tiles {name} (tiled vs untiled, same backend)");
                assert_close(&what, &tiled[i], &untiled[i], dt);
            }
            tiled.to_vec()
        });
        compare_all("indexer tiles", &format!("b{batch} t{seq} d_I{di}"), dt, &names, &want, &got);
    }
}

/// The fused kept-set indexer training, where a backend has it, against the
/// unfused chain on the same backend (scores, KL over the block pattern,
/// `dscores·grad_scale`, backward), and the results across backends. The
/// pattern lists a `NONE` entry and a future block, which both must skip.
/// Then with the KL on a row sample (every 3rd query row, each phase): rows
/// outside the sample are exactly 0 in `loss`, `dq_i` and `dw`, rows inside
/// equal the all-rows results, and the three phases add up to them (`dk_i`
/// included).
pub fn indexer_train_kept<R: Backend, B: Backend>(r: &R, b: &B) {
    use dynsparse::attention::select::NONE;
    use dynsparse::attention::{self as attn, Pattern};
    let (batch, seq, heads, kv, d, hi, di) = (2usize, 75usize, 4usize, 2usize, 16usize, 2usize, 8usize);
    let gs = 0.37f32;
    let every = 3usize;
    let samples: Vec<RowSample> =
        std::iter::once(RowSample::ALL).chain((0..every).map(|ph| RowSample::new(every, ph))).collect();
    for dt in float_dtypes(r, b) {
        let mut rng = Rng::new(seed("indexer-train-kept", dt, 0));
        let (qi, ki, w) =
            (rng.normal_vec(batch * seq * hi * di), rng.normal_vec(batch * seq * di), rng.normal_vec(batch * seq * hi));
        let (q, k) = (rng.normal_vec(batch * seq * heads * d), rng.normal_vec(batch * seq * kv * d));
        let (_, _, mut blk, nn) = attn_patterns(batch, seq, seed("indexer-train-kept-pattern", dt, 0));
        // Query 40 of batch 0 (blocks 0..=2 visible): a NONE entry; query 20 of batch 1: block 4 is its future.
        blk[40 * nn + 1] = NONE;
        let row = &mut blk[(seq + 20) * nn..(seq + 21) * nn];
        if !row.contains(&4) {
            row[nn - 1] = 4;
        }
        let names = [
            "kl loss",
            "dq_i",
            "dk_i",
            "dw",
            "kl loss (rows 1 mod 3)",
            "dq_i (rows 1 mod 3)",
            "dk_i (rows 1 mod 3)",
            "dw (rows 1 mod 3)",
        ];
        let (want, got) = on_both!(r, b, |be| {
            let (qt, kt, wt) = (
                up(be, &qi, &[batch, seq, hi, di], dt),
                up(be, &ki, &[batch, seq, di], dt),
                up(be, &w, &[batch, seq, hi], dt),
            );
            let (qs, ks) = ([batch, seq, heads, d], [batch, seq, kv, d]);
            let (aq, ak) = (up(be, &q, &qs, dt), up(be, &k, &ks, dt));
            let bt = Tensor::from_u32(be, &blk, &[batch, seq, nn]).unwrap();
            let pat = || Pattern::Blocks { idx: &bt, block: ATTN_BLOCK };
            let mut o = poisoned(be, &qs, dt);
            let mut lse = poisoned(be, &[batch, heads, seq], DType::F32);
            attn::attention(be, &aq, &ak, &ak, pat(), &mut o, &mut lse).unwrap();
            let full = [batch, seq, seq];
            let mut scores = poisoned(be, &full, DType::F32);
            attn::indexer_scores(be, &qt, &kt, &wt, &mut scores).unwrap();
            // Per sample: (loss, dq_i, dk_i, dw) of the fused op where the backend has it, else of the chain.
            let mut per_sample: Vec<Vec<Vec<f32>>> = Vec::new();
            for &sample in &samples {
                let (mut loss, mut ds) = (poisoned(be, &[batch, seq], DType::F32), poisoned(be, &full, DType::F32));
                attn::indexer_kl_rows(be, &aq, &ak, &lse, &scores, pat(), 0, sample, &mut loss, &mut ds).unwrap();
                let dsv = down(be, &ds);
                for (ri, dsr) in dsv.chunks(seq).enumerate() {
                    if !sample.contains(ri % seq) {
                        assert!(dsr.iter().all(|&x| x == 0.0), "indexer_kl {sample:?}: dscores row {ri} is not 0");
                    }
                }
                dynsparse::ops::scale(be, &mut ds, gs).unwrap();
                let mut dq = poisoned(be, &[batch, seq, hi, di], dt);
                let (mut dk, mut dw) = (poisoned(be, &[batch, seq, di], dt), poisoned(be, &[batch, seq, hi], dt));
                attn::indexer_backward(be, &qt, &kt, &wt, &ds, &mut dq, &mut dk, &mut dw).unwrap();
                let chain = vec![down(be, &loss), down(be, &dq), down(be, &dk), down(be, &dw)];
                let mut floss = poisoned(be, &[batch, seq], DType::F32);
                let mut fdq = poisoned(be, &[batch, seq, hi, di], dt);
                let (mut fdk, mut fdw) = (poisoned(be, &[batch, seq, di], dt), poisoned(be, &[batch, seq, hi], dt));
                let fused = attn::indexer_train_kept(
                    be,
                    &qt,
                    &kt,
                    &wt,
                    &aq,
                    &ak,
                    &lse,
                    pat(),
                    gs,
                    sample,
                    &mut floss,
                    &mut fdq,
                    &mut fdk,
                    &mut fdw,
                )
                .unwrap();
                // A backend without the fused kernel: the chain is what its model runs.
                if fused {
                    let fused = vec![down(be, &floss), down(be, &fdq), down(be, &fdk), down(be, &fdw)];
                    for (i, name) in names[..4].iter().enumerate() {
                        let what = format!("indexer_train_kept {name} {sample:?} (fused vs chain, same backend)");
                        assert_close(&what, &fused[i], &chain[i], dt);
                    }
                    per_sample.push(fused);
                } else {
                    per_sample.push(chain);
                }
            }
            // Rows outside a sample: exactly 0 (loss, dq_i, dw: per query row); inside: the all-rows values.
            let all = &per_sample[0];
            let mut sums: Vec<Vec<f32>> = all.iter().map(|v| vec![0.0f32; v.len()]).collect();
            for (sample, outs) in samples.iter().zip(&per_sample).skip(1) {
                for (i, per_row) in [(0usize, 1usize), (1, hi * di), (3, hi)] {
                    let mut inside = (Vec::new(), Vec::new());
                    for (ri, (g, a)) in outs[i].chunks(per_row).zip(all[i].chunks(per_row)).enumerate() {
                        if sample.contains(ri % seq) {
                            inside.0.extend_from_slice(g);
                            inside.1.extend_from_slice(a);
                        } else {
                            assert!(
                                g.iter().all(|&x| x == 0.0),
                                "{} {sample:?}: row {ri} outside the sample is not 0",
                                names[i]
                            );
                        }
                    }
                    assert_close(
                        &format!("{} {sample:?}: sampled rows vs all rows", names[i]),
                        &inside.0,
                        &inside.1,
                        dt,
                    );
                }
                for (acc, v) in sums.iter_mut().zip(outs) {
                    acc.iter_mut().zip(v).for_each(|(a, x)| *a += x);
                }
            }
            for (i, name) in names[..4].iter().enumerate() {
                assert_close(&format!("{name}: the {every} row phases added vs all rows"), &sums[i], &all[i], dt);
            }
            let mut out = per_sample[0].clone();
            out.extend(per_sample[2].iter().cloned());
            out
        });
        compare_all("indexer_train_kept", "blocks", dt, &names, &want, &got);
    }
}

/// Long sequences (f32): dense and block-sparse attention forward and
/// backward, the indexer (scores, block scores, backward) and its KL loss at
/// a sequence where one invocation looping over every key or query would run
/// far more than the 65 535 loop iterations software adapters (lavapipe)
/// execute before silently stopping.
pub fn attention_long_sequences<R: Backend, B: Backend>(r: &R, b: &B) {
    use dynsparse::attention::select::select_row;
    use dynsparse::attention::{self as attn, Pattern};
    let dt = DType::F32;
    let (batch, seq, heads, kv, d) = (1usize, 2600usize, 2usize, 1usize, 64usize);
    let (block, n) = (64usize, 6usize);
    let mut rng = Rng::new(seed("attention-long", dt, 0));
    let (qs, ks) = ([batch, seq, heads, d], [batch, seq, kv, d]);
    let (nq, nk) = (batch * seq * heads * d, batch * seq * kv * d);
    let (q, k, v, d_o) = (rng.normal_vec(nq), rng.normal_vec(nk), rng.normal_vec(nk), rng.normal_vec(nq));
    let nb = seq.div_ceil(block);
    let pooled: Vec<f32> = (0..seq * nb).map(|_| rng.below(1000) as f32).collect();
    let blk: Vec<u32> = (0..seq).flat_map(|t| select_row(&pooled[t * nb..(t + 1) * nb], t / block, n, true)).collect();
    for mode in ["dense", "blocks"] {
        let (want, got) = on_both!(r, b, |be| {
            let (qt, kt, vt, dot) =
                (up(be, &q, &qs, dt), up(be, &k, &ks, dt), up(be, &v, &ks, dt), up(be, &d_o, &qs, dt));
            let bt = Tensor::from_u32(be, &blk, &[batch, seq, n]).unwrap();
            let pat = || if mode == "dense" { Pattern::Dense } else { Pattern::Blocks { idx: &bt, block } };
            let mut o = poisoned(be, &qs, dt);
            let mut lse = poisoned(be, &[batch, heads, seq], DType::F32);
            attn::attention(be, &qt, &kt, &vt, pat(), &mut o, &mut lse).unwrap();
            let (mut dq, mut dk, mut dv) = (poisoned(be, &qs, dt), poisoned(be, &ks, dt), poisoned(be, &ks, dt));
            attn::attention_backward(be, &qt, &kt, &vt, &o, &lse, &dot, pat(), &mut dq, &mut dk, &mut dv).unwrap();
            vec![down(be, &o), down(be, &lse), down(be, &dq), down(be, &dk), down(be, &dv)]
        });
        let case = format!("{mode} b{batch} t{seq} h{heads}/{kv} d{d}");
        compare_all("long attention", &case, dt, &["o", "lse", "dq", "dk", "dv"], &want, &got);
    }
    let (hi, di) = (2usize, 64usize);
    let (qi, ki, w) =
        (rng.normal_vec(batch * seq * hi * di), rng.normal_vec(batch * seq * di), rng.normal_vec(batch * seq * hi));
    let dsc = rng.normal_vec(batch * seq * seq);
    let (want, got) = on_both!(r, b, |be| {
        let (qt, kt, wt) = (
            up(be, &qi, &[batch, seq, hi, di], dt),
            up(be, &ki, &[batch, seq, di], dt),
            up(be, &w, &[batch, seq, hi], dt),
        );
        let mut sc = poisoned(be, &[batch, seq, seq], DType::F32);
        attn::indexer_scores(be, &qt, &kt, &wt, &mut sc).unwrap();
        let mut pooled = poisoned(be, &[batch, seq, nb], DType::F32);
        attn::indexer_block_scores(be, &qt, &kt, &wt, block, &mut pooled).unwrap();
        let dst = up(be, &dsc, &[batch, seq, seq], DType::F32);
        let (mut dq, mut dk, mut dw) = (
            poisoned(be, &[batch, seq, hi, di], dt),
            poisoned(be, &[batch, seq, di], dt),
            poisoned(be, &[batch, seq, hi], dt),
        );
        attn::indexer_backward(be, &qt, &kt, &wt, &dst, &mut dq, &mut dk, &mut dw).unwrap();
        // The KL loss of these scores against dense attention of q and k.
        let (qa, ka) = (up(be, &q, &qs, dt), up(be, &k, &ks, dt));
        let mut o = poisoned(be, &qs, dt);
        let mut lse = poisoned(be, &[batch, heads, seq], DType::F32);
        attn::attention(be, &qa, &ka, &ka, Pattern::Dense, &mut o, &mut lse).unwrap();
        let mut loss = poisoned(be, &[batch, seq], DType::F32);
        let mut ds = poisoned(be, &[batch, seq, seq], DType::F32);
        attn::indexer_kl(be, &qa, &ka, &lse, &sc, Pattern::Dense, &mut loss, &mut ds).unwrap();
        vec![
            down(be, &sc),
            down(be, &pooled),
            down(be, &dq),
            down(be, &dk),
            down(be, &dw),
            down(be, &loss),
            down(be, &ds),
        ]
    });
    let case = format!("b{batch} t{seq} H_I{hi} d_I{di}");
    let names = ["scores", "block scores", "dq_i", "dk_i", "dw", "kl loss", "kl dscores"];
    compare_all("long indexer", &case, dt, &names, &want, &got);
}

// ------------------------------------------------------------ causality

/// Positions `t` at which the op-level causality check cuts: the first
/// query, both edges of a block of 8, and inside blocks.
const CUTS: [usize; 6] = [0, 7, 8, 21, 44, 60];

/// `v` (`[batch, seq, width]`) with every position after `t` redrawn.
fn redraw_after(v: &[f32], batch: usize, seq: usize, t: usize, rng: &mut Rng) -> Vec<f32> {
    let width = v.len() / (batch * seq);
    let mut out = v.to_vec();
    for b in 0..batch {
        for x in &mut out[(b * seq + t + 1) * width..(b + 1) * seq * width] {
            *x = rng.normal() as f32;
        }
    }
    out
}

/// Asserts that rows `0..=t` of every batch of `a` and `b` (`[batch, seq, width]`)
/// are bit-identical.
#[track_caller]
fn assert_prefix_bits(what: &str, a: &[f32], b: &[f32], batch: usize, seq: usize, t: usize) {
    let width = a.len() / (batch * seq);
    for bi in 0..batch {
        let r = (bi * seq) * width..(bi * seq + t + 1) * width;
        let (x, y) = (&a[r.clone()], &b[r]);
        if let Some(i) = x.iter().zip(y).position(|(p, q)| p.to_bits() != q.to_bits()) {
            let pos = i / width;
            panic!(
                "{what}: batch {bi} position {pos} ≤ {t} changed when the tokens after {t} changed ({} → {})",
                x[i], y[i]
            );
        }
    }
}

/// Causality at the op level, on the backend under test: for dense, token
/// and block attention and every dtype, the indexer scores (token scores or
/// per-query block scores), the selection and the attention outputs of every
/// query `≤ t` are bit-identical when every input after `t` (q, k, v, and the
/// indexer's q_i, k_i, w) is replaced.
pub fn selection_and_attention_are_causal<R: Backend, B: Backend>(r: &R, b: &B) {
    use dynsparse::attention::{self as attn, Pattern};
    let (batch, seq, heads, kv, d, hi, di) = (2usize, 70usize, 4usize, 2usize, 16usize, 2usize, 8usize);
    // Blocks of 8 and 3 kept of up to 9: most queries have a real choice.
    let (block, k_tok, n_blk) = (8usize, 9usize, 3usize);
    let nb = seq.div_ceil(block);
    for dt in float_dtypes(r, b) {
        let mut rng = Rng::new(seed("causality", dt, 0));
        let base: Vec<Vec<f32>> =
            [heads * d, kv * d, kv * d, hi * di, di, hi].iter().map(|&w| rng.normal_vec(batch * seq * w)).collect();
        // Outputs per position: [scores, idx, o] as [batch, seq, ·], lse transposed to [batch, seq, heads].
        let run = |x: &[Vec<f32>], mode: &str| -> Vec<Vec<f32>> {
            let (qt, kt, vt) = (
                up(b, &x[0], &[batch, seq, heads, d], dt),
                up(b, &x[1], &[batch, seq, kv, d], dt),
                up(b, &x[2], &[batch, seq, kv, d], dt),
            );
            let (qi, ki, w) = (
                up(b, &x[3], &[batch, seq, hi, di], dt),
                up(b, &x[4], &[batch, seq, di], dt),
                up(b, &x[5], &[batch, seq, hi], dt),
            );
            let mut o = poisoned(b, &[batch, seq, heads, d], dt);
            let mut lse = poisoned(b, &[batch, heads, seq], DType::F32);
            let (scores, idx) = match mode {
                "dense" => {
                    attn::attention(b, &qt, &kt, &vt, Pattern::Dense, &mut o, &mut lse).unwrap();
                    (vec![0.0; batch * seq], vec![0.0; batch * seq])
                }
                "tokens" => {
                    let mut sc = poisoned(b, &[batch, seq, seq], DType::F32);
                    attn::indexer_scores(b, &qi, &ki, &w, &mut sc).unwrap();
                    let mut idx = Tensor::from_u32(b, &vec![7; batch * seq * k_tok], &[batch, seq, k_tok]).unwrap();
                    attn::select_topk(b, &sc, k_tok, 0, &mut idx).unwrap();
                    attn::attention(b, &qt, &kt, &vt, Pattern::Tokens(&idx), &mut o, &mut lse).unwrap();
                    (down(b, &sc), idx.to_u32_vec(b).unwrap().into_iter().map(|x| x as f32).collect())
                }
                _ => {
                    let mut pooled = poisoned(b, &[batch, seq, nb], DType::F32);
                    attn::indexer_block_scores(b, &qi, &ki, &w, block, &mut pooled).unwrap();
                    let mut idx = Tensor::from_u32(b, &vec![7; batch * seq * n_blk], &[batch, seq, n_blk]).unwrap();
                    attn::select_topk(b, &pooled, n_blk, block, &mut idx).unwrap();
                    attn::attention(b, &qt, &kt, &vt, Pattern::Blocks { idx: &idx, block }, &mut o, &mut lse).unwrap();
                    (down(b, &pooled), idx.to_u32_vec(b).unwrap().into_iter().map(|x| x as f32).collect())
                }
            };
            let l = down(b, &lse);
            let lse_t: Vec<f32> = (0..batch * seq)
                .flat_map(|bt| (0..heads).map(move |h| (bt / seq, bt % seq, h)))
                .map(|(bi, t, h)| l[(bi * heads + h) * seq + t])
                .collect();
            vec![scores, idx, down(b, &o), lse_t]
        };
        for mode in ["dense", "tokens", "blocks"] {
            let full = run(&base, mode);
            for &t in &CUTS {
                let changed: Vec<Vec<f32>> = base.iter().map(|v| redraw_after(v, batch, seq, t, &mut rng)).collect();
                let cut = run(&changed, mode);
                for (name, (x, y)) in ["indexer scores", "selection", "o", "lse"].iter().zip(full.iter().zip(&cut)) {
                    assert_prefix_bits(&format!("{dt:?} {mode} `{name}`"), x, y, batch, seq, t);
                }
            }
        }
    }
}

/// Causality of the whole model, on the backend under test: a sparse model's
/// logits at positions `≤ t` are bit-identical when every token after `t` is
/// replaced, with dense attention (warm-up) and with block-sparse attention
/// (each query's own top-n blocks), for every dtype.
pub fn model_is_a_causal_lm<R: Backend, B: Backend>(r: &R, b: &B) {
    use dynsparse::model::{AttentionMode, Model, ModelConfig, StepAttention, Workspace};
    let (batch, seq, block) = (2usize, 64usize, 8usize);
    let cfg = ModelConfig {
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 2,
        d_model: 32,
        vocab: 256,
        context: seq,
        mlp_ratio: 2,
        rope_theta: 10000.0,
        attention: AttentionMode::Sparse { block, keep_blocks: 3, index_heads: 2, index_dim: 8 },
    };
    for dt in float_dtypes(r, b) {
        let mut rng = Rng::new(seed("model-causality", dt, 0));
        let model = Model::new(b, cfg, dt, 11).unwrap();
        let mut ws = Workspace::new(b, &cfg, dt, batch, seq).unwrap();
        let ids: Vec<u32> = (0..batch * seq).map(|_| rng.below(256) as u32).collect();
        for attn in [StepAttention::Dense, StepAttention::Sparse { keep_blocks: 3 }] {
            let mut logits = |ids: &[u32]| {
                model.forward(b, &mut ws, ids, None, attn).unwrap();
                ws.logits_f32(b).unwrap()
            };
            let full = logits(&ids);
            for t in [0usize, 7, 8, 13, 30, 47, 62] {
                let mut other = ids.clone();
                for bi in 0..batch {
                    for x in &mut other[bi * seq + t + 1..(bi + 1) * seq] {
                        *x = (*x + 1 + rng.below(255) as u32) % 256;
                    }
                }
                assert_prefix_bits(&format!("{dt:?} {attn:?} model logits"), &full, &logits(&other), batch, seq, t);
            }
        }
    }
}

/// Queries without keys, and query tiles with no key at all: a block pattern
/// whose first 70 rows are all `NONE` (a whole 64-query tile and part of the
/// next), then rows listing only their own block, then random selections; a
/// token pattern with the same empty rows. Keyless queries get `o = 0`,
/// `lse = -∞` and `dq = 0` on both backends (kernels must not do arithmetic
/// with infinities for them: fast-math GPU compilers do not honour it), and
/// everything else matches the reference.
pub fn attention_with_keyless_queries<R: Backend, B: Backend>(r: &R, b: &B) {
    use dynsparse::attention::select::{NONE, select_row};
    use dynsparse::attention::{self as attn, Pattern};
    let (batch, seq, heads, kv, d, block, n) = (1usize, 150usize, 2usize, 1usize, 16usize, 16usize, 3usize);
    let (empty, own_only) = (70usize, 100usize);
    let nb = seq.div_ceil(block);
    for dt in float_dtypes(r, b) {
        let mut rng = Rng::new(seed("keyless", dt, 0));
        let (qs, ks) = ([batch, seq, heads, d], [batch, seq, kv, d]);
        let (q, k, v, d_o) = (
            rng.normal_vec(batch * seq * heads * d),
            rng.normal_vec(batch * seq * kv * d),
            rng.normal_vec(batch * seq * kv * d),
            rng.normal_vec(batch * seq * heads * d),
        );
        let mut blk = Vec::new();
        let mut tok = Vec::new();
        for t in 0..seq {
            let row: Vec<f32> = (0..nb).map(|_| rng.below(5) as f32).collect();
            let sel = match t {
                t if t < empty => vec![NONE; n],
                t if t < own_only => [vec![(t / block) as u32], vec![NONE; n - 1]].concat(),
                t => select_row(&row, t / block, n, true),
            };
            blk.extend(sel);
            let keys: Vec<f32> = (0..seq).map(|_| rng.below(5) as f32).collect();
            tok.extend(if t < empty { vec![NONE; n] } else { select_row(&keys, t, n, false) });
        }
        for mode in ["tokens", "blocks"] {
            let (want, got) = on_both!(r, b, |be| {
                let (qt, kt, vt, dot) =
                    (up(be, &q, &qs, dt), up(be, &k, &ks, dt), up(be, &v, &ks, dt), up(be, &d_o, &qs, dt));
                let it = Tensor::from_u32(be, if mode == "tokens" { &tok } else { &blk }, &[batch, seq, n]).unwrap();
                let pat = || if mode == "tokens" { Pattern::Tokens(&it) } else { Pattern::Blocks { idx: &it, block } };
                let mut o = poisoned(be, &qs, dt);
                let mut lse = poisoned(be, &[batch, heads, seq], DType::F32);
                attn::attention(be, &qt, &kt, &vt, pat(), &mut o, &mut lse).unwrap();
                let (mut dq, mut dk, mut dv) = (poisoned(be, &qs, dt), poisoned(be, &ks, dt), poisoned(be, &ks, dt));
                attn::attention_backward(be, &qt, &kt, &vt, &o, &lse, &dot, pat(), &mut dq, &mut dk, &mut dv).unwrap();
                vec![down(be, &o), down(be, &lse), down(be, &dq), down(be, &dk), down(be, &dv)]
            });
            for (which, out) in [("reference", &want), ("backend", &got)] {
                for h in 0..heads {
                    for t in 0..seq {
                        let l = out[1][h * seq + t];
                        assert_eq!(t < empty, l == f32::NEG_INFINITY, "{mode} [{dt}] {which}: lse of query {t} is {l}");
                    }
                }
                let keyless = |x: &[f32]| x[..empty * heads * d].iter().all(|&v| v == 0.0);
                assert!(keyless(&out[0]) && keyless(&out[2]), "{mode} [{dt}] {which}: keyless queries need o = dq = 0");
            }
            compare_all("keyless attention", mode, dt, &["o", "lse", "dq", "dk", "dv"], &want, &got);
        }
    }
}

// ------------------------------------------------------------ inference

/// A ragged step over 3 cached sequences of up to 40 tokens: sequence 0
/// decodes at length 37, sequence 1 prefills a run of 5 tokens (lengths
/// 3..=7), sequence 2 takes its first token. `(sequence, len)` per row.
fn ragged_rows() -> (usize, Vec<(usize, usize)>) {
    let mut t = vec![(0, 37)];
    t.extend((3..=7).map(|len| (1, len)));
    t.push((2, 1));
    (40, t)
}

/// `matmul_rows` (the inference step's products) matches the reference, and
/// on the backend under test every row of C is bit-identical whether it is
/// computed alone, in a split of the rows or with all of them.
pub fn matmul_rows<R: Backend, B: Backend>(r: &R, b: &B) {
    for dt in float_dtypes(r, b) {
        // (m, n, k, trans_b, beta): columns past one CPU chunk (256), rows past one row group (16).
        for (ci, &(m, n, k, tb, beta)) in
            [(40usize, 300usize, 33usize, false, 0.0f32), (23, 70, 129, true, 1.0), (17, 5, 64, false, 1.0)]
                .iter()
                .enumerate()
        {
            let mut rng = Rng::new(seed("matmul_rows", dt, ci));
            let (a, w) = (rng.normal_vec(m * k), rng.normal_vec(k * n));
            let c0 = rng.normal_vec(m * n);
            let wsh = if tb { [n, k] } else { [k, n] };
            let (want, got) = on_both!(r, b, |be| {
                let wt = up(be, &w, &wsh, dt);
                let rows = |r0: usize, r1: usize| {
                    let at = up(be, &a[r0 * k..r1 * k], &[r1 - r0, k], dt);
                    let mut c = up(be, &c0[r0 * n..r1 * n], &[r1 - r0, n], dt);
                    ops::matmul_rows(be, &at, &wt, &mut c, tb, 0.75, beta).unwrap();
                    down(be, &c)
                };
                let all = rows(0, m);
                let split: Vec<f32> = [rows(0, 13.min(m)), rows(13.min(m), m)].concat();
                let single: Vec<f32> = (0..m).flat_map(|i| rows(i, i + 1)).collect();
                for (how, v) in [("13 + the rest", &split), ("one at a time", &single)] {
                    let same = all.iter().zip(v).all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(same, "{dt:?} matmul_rows {m}×{n}×{k} tb={tb}: rows computed {how} differ from one call");
                }
                vec![all]
            });
            compare_all("matmul_rows", &format!("{m}×{n}×{k} tb={tb} β={beta}"), dt, &["c"], &want, &got);
        }
    }
}

/// `(page, page table, base per sequence)`.
type Layout = (usize, Vec<u32>, Vec<usize>);

/// A page layout of 3 sequences of `ctx` tokens in a pool of `3·ctx` rows:
/// `(page, page table, base per sequence)`. Page `ctx` is the contiguous
/// cache; smaller pages are handed out in a shuffled order.
fn page_layout(ctx: usize, page: usize, rng: &mut Rng) -> Layout {
    let per = ctx / page;
    let mut ids: Vec<u32> = (0..(3 * per) as u32).collect();
    if per > 1 {
        for i in (1..ids.len()).rev() {
            ids.swap(i, rng.below(i as u64 + 1) as usize);
        }
    }
    (page, ids, (0..3).map(|s| s * per).collect())
}

/// The inference ops over a paged KV cache (RoPE at per-row positions, cache
/// writes, pooled indexer scores, per-row selection, dense and block-sparse
/// cached attention) on a ragged step match the reference, and on every
/// backend give bit-identical results whether the sequences' pages are
/// contiguous (one page each) or pages of 8 rows scattered over the pool.
pub fn cached_ops<R: Backend, B: Backend>(r: &R, b: &B) {
    use dynsparse::attention::{self as attn, CachedPattern, KvTable};
    let (ctx, tab) = ragged_rows();
    let (rows, slots) = (tab.len(), 3 * ctx);
    let (h, g, d, hi, di, block, n) = (4usize, 2usize, 16usize, 2usize, 8usize, 8usize, 3usize);
    let cols = ctx.div_ceil(block);
    for dt in float_dtypes(r, b) {
        let mut rng = Rng::new(seed("cached", dt, 0));
        let q = rng.normal_vec(rows * h * d);
        // Logical caches: sequence-major `[3, ctx, width]`.
        let (kc, vc) = (rng.normal_vec(slots * g * d), rng.normal_vec(slots * g * d));
        let knew = rng.normal_vec(rows * g * d);
        let (qi, w, kic) = (rng.normal_vec(rows * hi * di), rng.normal_vec(rows * hi), rng.normal_vec(slots * di));
        let tied: Vec<f32> = (0..rows * cols).map(|_| rng.below(5) as f32).collect();
        let layouts = [page_layout(ctx, ctx, &mut rng), page_layout(ctx, 8, &mut rng)];
        let run = |be: &dyn Fn(&Layout) -> Vec<Vec<f32>>| -> Vec<Vec<f32>> {
            let (contig, paged) = (be(&layouts[0]), be(&layouts[1]));
            let names = ["rope_rows", "cache_write", "cached indexer pooled", "cached_select", "dense o", "blocks o"];
            for (i, name) in names.iter().enumerate() {
                let same = contig[i].iter().zip(&paged[i]).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{dt:?} {name}: scattered pages of 8 rows change the result of the contiguous cache");
            }
            paged
        };
        let (want, got) = on_both!(r, b, |be| {
            run(&|(page, ids, base): &Layout| {
                let page = *page;
                // Physical row of (sequence, position) and the caches scattered accordingly.
                let phys = |sq: usize, s: usize| ids[base[sq] + s / page] as usize * page + s % page;
                let scatter = |logical: &[f32], width: usize| {
                    let mut out = vec![0.0f32; logical.len()];
                    for sq in 0..3 {
                        for s in 0..ctx {
                            let (src, dst) = ((sq * ctx + s) * width, phys(sq, s) * width);
                            out[dst..dst + width].copy_from_slice(&logical[src..src + width]);
                        }
                    }
                    out
                };
                let gather = |physical: &[f32], width: usize| {
                    let mut out = vec![0.0f32; physical.len()];
                    for sq in 0..3 {
                        for s in 0..ctx {
                            let (dst, src) = ((sq * ctx + s) * width, phys(sq, s) * width);
                            out[dst..dst + width].copy_from_slice(&physical[src..src + width]);
                        }
                    }
                    out
                };
                let flat: Vec<u32> = tab.iter().flat_map(|&(sq, len)| [base[sq] as u32, len as u32]).collect();
                let table = Tensor::from_u32(be, &flat, &[rows, 2]).unwrap();
                let pages = Tensor::from_u32(be, ids, &[ids.len()]).unwrap();
                let kv = KvTable { rows: &table, pages: &pages, page };
                let qt = up(be, &q, &[rows, h, d], dt);
                let table_rope = RopeTable::new(be, ctx, d, 10000.0).unwrap();
                let mut qr = poisoned(be, &[rows, h, d], dt);
                ops::rope_rows(be, &qt, &table_rope, &table, &mut qr).unwrap();
                let mut kt = up(be, &scatter(&kc, g * d), &[slots, g, d], dt);
                ops::cache_write(be, &up(be, &knew, &[rows, g, d], dt), &kv, &mut kt).unwrap();
                let vt = up(be, &scatter(&vc, g * d), &[slots, g, d], dt);
                let (qit, wt, kit) = (
                    up(be, &qi, &[rows, hi, di], dt),
                    up(be, &w, &[rows, hi], dt),
                    up(be, &scatter(&kic, di), &[slots, di], dt),
                );
                let mut pooled = poisoned(be, &[rows, cols], DType::F32);
                attn::cached_indexer_block_scores(be, &qit, &wt, &kit, &kv, block, &mut pooled).unwrap();
                let mut idx = Tensor::from_u32(be, &vec![9; rows * n], &[rows, n]).unwrap();
                attn::cached_select(be, &up(be, &tied, &[rows, cols], DType::F32), &table, n, block, &mut idx).unwrap();
                let mut od = poisoned(be, &[rows, h, d], dt);
                attn::cached_attention(be, &qr, &kt, &vt, &kv, CachedPattern::Dense, &mut od).unwrap();
                let mut ob = poisoned(be, &[rows, h, d], dt);
                attn::cached_attention(be, &qr, &kt, &vt, &kv, CachedPattern::Blocks { idx: &idx, block }, &mut ob)
                    .unwrap();
                let sel: Vec<f32> = idx.to_u32_vec(be).unwrap().into_iter().map(|x| x as f32).collect();
                // Batch invariance: every row computed alone gives the bits it got in the ragged step.
                let (qrv, selv, wv) = (down(be, &qr), idx.to_u32_vec(be).unwrap(), down(be, &wt));
                let (odv, obv, pv) = (down(be, &od), down(be, &ob), down(be, &pooled));
                for i in 0..rows {
                    let t1 = Tensor::from_u32(be, &flat[2 * i..2 * i + 2], &[1, 2]).unwrap();
                    let kv1 = KvTable { rows: &t1, pages: &pages, page };
                    let q1 = up(be, &qrv[i * h * d..(i + 1) * h * d], &[1, h, d], dt);
                    let i1 = Tensor::from_u32(be, &selv[i * n..(i + 1) * n], &[1, n]).unwrap();
                    let mut o1 = poisoned(be, &[1, h, d], dt);
                    attn::cached_attention(be, &q1, &kt, &vt, &kv1, CachedPattern::Dense, &mut o1).unwrap();
                    let mut b1 = poisoned(be, &[1, h, d], dt);
                    attn::cached_attention(be, &q1, &kt, &vt, &kv1, CachedPattern::Blocks { idx: &i1, block }, &mut b1)
                        .unwrap();
                    let qi1 = up(be, &qi[i * hi * di..(i + 1) * hi * di], &[1, hi, di], dt);
                    let w1 = up(be, &wv[i * hi..(i + 1) * hi], &[1, hi], dt);
                    let mut p1 = poisoned(be, &[1, cols], DType::F32);
                    attn::cached_indexer_block_scores(be, &qi1, &w1, &kit, &kv1, block, &mut p1).unwrap();
                    for (what, alone, all, w) in [
                        ("dense o", down(be, &o1), &odv, h * d),
                        ("blocks o", down(be, &b1), &obv, h * d),
                        ("pooled", down(be, &p1), &pv, cols),
                    ] {
                        let same = alone.iter().zip(&all[i * w..(i + 1) * w]).all(|(x, y)| x.to_bits() == y.to_bits());
                        assert!(same, "{dt:?} {what} of row {i}: computed alone it differs from the ragged step");
                    }
                }
                let kt_logical = gather(&down(be, &kt), g * d);
                vec![down(be, &qr), kt_logical, down(be, &pooled), sel, down(be, &od), down(be, &ob)]
            })
        });
        assert_eq!(got[3], want[3], "{dt:?} cached_select picks the same blocks");
        let names = ["rope_rows", "cache_write", "cached indexer pooled", "cached_select", "dense o", "blocks o"];
        compare_all("cached", "ragged step", dt, &names, &want, &got);
    }
}

/// On the backend under test: prefill + token-by-token decode through the KV
/// cache reproduces the full-window forward pass's logits at every position,
/// for a dense and a sparse model, f32/f16/bf16, with a prompt prefilled in
/// two chunks and a ragged decode batch of 3 sequences of different lengths.
pub fn prefill_and_decode_match_the_full_window<R: Backend, B: Backend>(r: &R, b: &B) {
    use dynsparse::model::{AttentionMode, InferState, KvCache, Model, ModelConfig, Row, Workspace};
    let ctx = 48usize;
    for dt in float_dtypes(r, b) {
        for sparse in [false, true] {
            let cfg = ModelConfig {
                n_layers: 2,
                n_heads: 4,
                n_kv_heads: 2,
                d_model: 32,
                vocab: 256,
                context: ctx,
                mlp_ratio: 2,
                rope_theta: 10000.0,
                attention: if sparse {
                    AttentionMode::Sparse { block: 8, keep_blocks: 3, index_heads: 2, index_dim: 8 }
                } else {
                    AttentionMode::Dense
                },
            };
            let model = Model::new(b, cfg, dt, 5).unwrap();
            let mut rng = Rng::new(seed("prefill-decode", dt, sparse as usize));
            let seqs: Vec<Vec<u32>> =
                [ctx, 29, 17].iter().map(|&n| (0..n).map(|_| rng.below(256) as u32).collect()).collect();
            let full: Vec<Vec<f32>> = seqs
                .iter()
                .map(|ids| {
                    let mut ws = Workspace::new(b, &cfg, dt, 1, ids.len()).unwrap();
                    model.forward(b, &mut ws, ids, None, model.inference_attention()).unwrap();
                    ws.logits_f32(b).unwrap()
                })
                .collect();
            let prompts = [20usize, 10, 1];
            let run = |cache: &mut KvCache<B>, st: &mut InferState<B>| -> Vec<Vec<f32>> {
                let mut got: Vec<Vec<f32>> = vec![Vec::new(); 3];
                // Sequence 0's prompt in two chunks (12 + 8), the others in one.
                got[0] = model.prefill(b, cache, st, 0, &seqs[0][..prompts[0]], 12).unwrap();
                for s in 1..3 {
                    got[s] = model.prefill(b, cache, st, s, &seqs[s][..prompts[s]], 64).unwrap();
                }
                let mut pos = prompts;
                loop {
                    let rows: Vec<Row> = (0..3)
                        .filter(|&s| pos[s] < seqs[s].len())
                        .map(|s| Row { slot: s, token: seqs[s][pos[s]] })
                        .collect();
                    if rows.is_empty() {
                        break;
                    }
                    let logits = model.step(b, cache, st, &rows, model.inference_attention()).unwrap();
                    for (i, row) in rows.iter().enumerate() {
                        got[row.slot].extend_from_slice(&logits[i * 256..(i + 1) * 256]);
                        pos[row.slot] += 1;
                    }
                }
                got
            };
            let what = |s: usize| {
                format!(
                    "{dt:?} {} model, sequence {s} ({} tokens)",
                    if sparse { "sparse" } else { "dense" },
                    seqs[s].len()
                )
            };
            // Pages of 8 tokens, exactly as many as the three sequences need (6 + 4 + 3).
            let mut paged = KvCache::paged(b, &model, 3, ctx, 8, 13).unwrap();
            let got_paged = run(&mut paged, &mut InferState::default());
            assert_eq!(paged.pages_used(), 13);
            // A state that served a shorter cache first (its 8-row buffers sized for 8 tokens, as sequence
            // 0's second prefill chunk will use them) still fits this one.
            let mut st = InferState::default();
            let mut short = KvCache::new(b, &model, 1, 8).unwrap();
            model.prefill(b, &mut short, &mut st, 0, &seqs[0][..8], 8).unwrap();
            let mut cache = KvCache::new(b, &model, 3, ctx).unwrap();
            let got = run(&mut cache, &mut st);
            for s in 0..3 {
                assert_eq!(cache.len(s), seqs[s].len());
                assert_close(
                    &format!("{}: prefill + decode logits vs the full window", what(s)),
                    &got[s],
                    &full[s],
                    dt,
                );
                let same = got[s].iter().zip(&got_paged[s]).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "{}: a paged cache (8-token pages) changes the logits of the contiguous one", what(s));
            }
            // A full pool refuses a step that needs a page, all or nothing; clearing returns pages.
            paged.clear(2);
            assert_eq!((paged.pages_used(), paged.len(2)), (10, 0));
            let mut st = InferState::default();
            let rows: Vec<Row> = (0..25).map(|i| Row { slot: 2, token: i }).collect();
            let e = model.step(b, &mut paged, &mut st, &rows, model.inference_attention());
            expect_err("a step beyond the pool", e, &["pages"]);
            assert_eq!((paged.pages_used(), paged.len(2), paged.pages_needed(2, 25)), (10, 0, 4));
            model.step(b, &mut paged, &mut st, &rows[..24], model.inference_attention()).unwrap();
            assert_eq!((paged.pages_used(), paged.len(2)), (13, 24));
            let mut st = InferState::default();
            // Past the context, a slot beyond the batch, a cache longer than the model: errors.
            let e = model.step(b, &mut cache, &mut st, &[Row { slot: 0, token: 1 }], model.inference_attention());
            expect_err("decode past the context", e, &["48 tokens"]);
            let e = model.step(b, &mut cache, &mut st, &[Row { slot: 3, token: 1 }], model.inference_attention());
            expect_err("slot beyond the batch", e, &["slot 3", "batch of 3"]);
            expect_err("cache longer than the model", KvCache::new(b, &model, 1, ctx + 1).map(|_| ()), &["49", "48"]);
        }
    }
}

// ------------------------------------------------------------ model level

/// One forward + backward + AdamW step of a tiny sparse model: loss and the
/// parameters after the step match the reference backend.
pub fn training_step<R: Backend, B: Backend>(r: &R, b: &B) {
    use dynsparse::data::synthetic::{SyntheticConfig, generate};
    use dynsparse::model::{AttentionMode, Model, ModelConfig};
    use dynsparse::train::{LrSchedule, MemoryReport, TrainConfig, Trainer};
    let data = generate(5, 20_000, SyntheticConfig::default());
    let cfg = ModelConfig {
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 2,
        d_model: 32,
        vocab: 256,
        context: 64,
        mlp_ratio: 2,
        rope_theta: 10000.0,
        attention: AttentionMode::Sparse { block: 8, keep_blocks: 3, index_heads: 2, index_dim: 8 },
    };
    for dt in float_dtypes(r, b) {
        for (warm, kl_every) in [(0.5, 1), (0.0, 1), (0.0, 3)] {
            // warm-up 0.5: a dense step (indexer KL over all keys); 0.0: a sparse step, then one
            // whose KL runs on every 3rd query row (phases 0 and 1 for the two micro-batches).
            let tc = TrainConfig {
                steps: 4,
                batch: 2,
                seq: 40,
                accum: 2,
                precision: dt,
                lr: LrSchedule { lr: 1e-3, min_lr: 1e-4, warmup_steps: 1, total_steps: 4 },
                beta1: 0.9,
                beta2: 0.95,
                weight_decay: 0.1,
                grad_clip: 1.0,
                warmup_frac: warm,
                ramp_frac: 0.0,
                kl_every,
                seed: 3,
            };
            let (want, got) = on_both!(r, b, |be| {
                let model = Model::new(be, cfg, dt, 7).unwrap();
                let mut tr = Trainer::new(be, model, tc, &mut MemoryReport::default()).unwrap();
                let st = tr.train_step(be, &data).unwrap();
                assert!(!st.skipped);
                let mut out = vec![vec![st.loss as f32, st.indexer_kl as f32]];
                out.extend(tr.master_values(be).unwrap());
                out
            });
            let what = match (warm > 0.0, kl_every) {
                (true, _) => "dense step",
                (false, 1) => "sparse step",
                _ => "sparse step, KL on every 3rd row",
            };
            assert_close(&format!("training {what} loss and KL"), &got[0], &want[0], dt);
            let flat = |v: &[Vec<f32>]| v.iter().flatten().copied().collect::<Vec<_>>();
            assert_close(&format!("training {what} parameters after AdamW"), &flat(&got[1..]), &flat(&want[1..]), dt);
        }
    }
}

/// Loss, KL, logits and every gradient of one forward + backward pass with a
/// workspace whose buffers are split under `chunk_bytes`.
#[allow(clippy::too_many_arguments)]
fn chunked_pass<X: Backend>(
    be: &X,
    cfg: dynsparse::model::ModelConfig,
    dt: DType,
    (batch, seq): (usize, usize),
    chunk_bytes: u64,
    ids: &[u32],
    tg: &[u32],
    attn: dynsparse::model::StepAttention,
) -> ((usize, usize), Vec<Vec<f32>>) {
    use dynsparse::model::{Model, Workspace};
    let model = Model::new(be, cfg, dt, 9).unwrap();
    let mut ws = Workspace::with_chunk_bytes(be, &cfg, dt, batch, seq, chunk_bytes).unwrap();
    let st = model.forward(be, &mut ws, ids, Some(tg), attn).unwrap();
    let mut grads: Vec<Tensor<X>> = cfg.params().iter().map(|p| Tensor::zeros(be, &p.shape, dt).unwrap()).collect();
    // A loss scale like the f16 trainer's keeps the tiny indexer gradients out of f16 subnormals.
    let kl = model.backward(be, &mut ws, &mut grads, 256.0, true).unwrap();
    let mut out = vec![vec![st.loss as f32, kl as f32], ws.logits_f32(be).unwrap()];
    out.extend(grads.iter().map(|g| g.to_f32_vec(be).unwrap()));
    ((ws.lm_chunk_rows(), ws.indexer_tile_rows().unwrap_or(0)), out)
}

/// A training pass whose LM head runs in row chunks (forced small, the last
/// one padded) and whose indexer scores run in tiles of query rows (the last
/// one shorter) gives the loss, KL, logits and gradients of the unchunked
/// pass: the losses and the weight gradients are sums over rows.
pub fn chunked_training_matches_unchunked<R: Backend, B: Backend>(r: &R, b: &B) {
    use dynsparse::model::{AttentionMode, ModelConfig, StepAttention};
    let (batch, seq, vocab) = (2usize, 40usize, 200usize);
    let cfg = ModelConfig {
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 2,
        d_model: 32,
        vocab,
        context: 64,
        mlp_ratio: 2,
        rope_theta: 10000.0,
        attention: AttentionMode::Sparse { block: 8, keep_blocks: 3, index_heads: 2, index_dim: 8 },
    };
    for dt in float_dtypes(r, b) {
        let mut rng = Rng::new(seed("chunked-training", dt, 0));
        let ids: Vec<u32> = (0..batch * seq).map(|_| rng.below(vocab as u64) as u32).collect();
        let mut tg: Vec<u32> = (0..batch * seq).map(|_| rng.below(vocab as u64) as u32).collect();
        tg[7] = dynsparse::model::IGNORE;
        for attn in [StepAttention::Dense, StepAttention::Sparse { keep_blocks: 3 }] {
            // Each backend against itself unchunked (the backends against each other: `training_step`).
            let full = on_both!(r, b, |be| chunked_pass(be, cfg, dt, (batch, seq), u64::MAX, &ids, &tg, attn));
            assert_eq!((full.0.0, full.1.0), ((batch * seq, seq), (batch * seq, seq)));
            // 13 rows of 200 f32 logits per chunk: 7 chunks over 80 rows, the last one 2 rows and 11 padding.
            // Indexer scores: 32-row tiles of [2, 32, 40] (and an 8-row tail); 7-row tiles (and a 5-row tail).
            for (bytes, rows, tiles) in [(13 * vocab as u64 * 4, 13, 32), (3 * vocab as u64 * 4 + 5, 3, 7)] {
                let got = on_both!(r, b, |be| chunked_pass(be, cfg, dt, (batch, seq), bytes, &ids, &tg, attn));
                for (which, ((got_rows, tile), got), want) in
                    [("reference", &got.0, &full.0.1), ("tested", &got.1, &full.1.1)]
                {
                    assert_eq!(*got_rows, rows, "{bytes} bytes per chunk");
                    assert_eq!(*tile, tiles, "{bytes} bytes per tile of indexer scores");
                    let mut names = vec!["loss and KL".to_string(), "logits".to_string()];
                    names.extend(cfg.params().iter().map(|p| format!("gradient of {}", p.name)));
                    for (i, name) in names.iter().enumerate() {
                        let what = format!("{which} backend, chunked ({rows} rows) {attn:?} {name}");
                        assert_close(&what, &got[i], &want[i], dt);
                    }
                }
            }
        }
    }
}

// ------------------------------------------------------------ bad inputs

fn expect_err<T>(what: &str, r: dynsparse::Result<T>, needles: &[&str]) {
    match r {
        Ok(_) => panic!("{what}: expected an error"),
        Err(e) => {
            let msg = e.to_string();
            for n in needles {
                assert!(msg.contains(n), "{what}: error `{msg}` should mention `{n}`");
            }
        }
    }
}

/// Shape mismatches, wrong dtypes and empty tensors are errors that name
/// what was wrong, on every backend, and never reach a kernel.
pub fn bad_inputs_are_errors<X: Backend>(be: &X) {
    let f = |s: &[usize]| Tensor::<X>::zeros(be, s, DType::F32).unwrap();
    let (a, b) = (f(&[64, 128]), f(&[64, 32]));
    let mut c = f(&[64, 32]);
    expect_err("matmul shapes", ops::matmul(be, &a, &b, &mut c, false, false, 1.0, 0.0), &["64×128", "64×32"]);
    let bad_batch = f(&[3, 128, 32]);
    let mut c3 = f(&[2, 64, 32]);
    let a3 = f(&[2, 64, 128]);
    expect_err(
        "matmul batch",
        ops::matmul(be, &a3, &bad_batch, &mut c3, false, false, 1.0, 0.0),
        &["batch", "3×128×32"],
    );
    let ids = Tensor::<X>::from_u32(be, &[1, 2], &[2]).unwrap();
    let mut out = f(&[2]);
    expect_err("add of u32", ops::add(be, &ids, &ids, &mut out), &["u32"]);
    let mut y = f(&[3, 5]);
    expect_err("gelu shapes", ops::gelu(be, &f(&[5, 3]), &mut y), &["5×3", "3×5"]);
    let mut e = f(&[0, 4]);
    expect_err("empty", ops::scale(be, &mut e, 2.0), &["zero-sized", "0×4"]);
    let half = Tensor::<X>::zeros(be, &[4], DType::BF16);
    if let Ok(h) = half {
        let mut o = f(&[4]);
        expect_err("mixed dtypes", ops::add(be, &h, &f(&[4]), &mut o), &["bf16", "f32"]);
    }
    let (x, g) = (f(&[4, 8]), f(&[7]));
    let (mut yy, mut mean, mut rstd) = (f(&[4, 8]), f(&[4]), f(&[4]));
    expect_err(
        "layernorm gamma",
        ops::layernorm(be, &x, &g, &g, &mut yy, &mut mean, &mut rstd, 1e-5),
        &["gamma", "7", "8 elements"],
    );
    let logits = f(&[3, 10]);
    let targets = Tensor::<X>::from_u32(be, &[1, 2], &[2]).unwrap();
    let mut losses = f(&[3]);
    expect_err("ce targets", ops::cross_entropy(be, &logits, &targets, &mut losses, 0), &["targets", "3 elements"]);
    let table = RopeTable::new(be, 8, 4, 10000.0).unwrap();
    let (xr, mut yr) = (f(&[1, 10, 2, 4]), f(&[1, 10, 2, 4]));
    expect_err("rope positions", ops::rope(be, &xr, &table, 0, &mut yr), &["positions", "8"]);
    expect_err("reshape", f(&[4, 8]).reshape(&[5, 6]), &["4×8", "5×6"]);
    let r: Result<Tensor<X>, Error> = Tensor::from_f32(be, &[1.0; 3], &[2, 2], DType::F32);
    expect_err("upload length", r, &["3 values", "2×2"]);
}

// ---------------------------------------------------------------- views

/// Places op arguments either in standalone tensors or as views at
/// non-zero, gapped offsets of six flat buffers (0: inputs, 1: outputs in
/// the case's dtype; 2–5: f32 params, grads, m, v), remembering the ranges.
struct Placer<'a, X: Backend> {
    be: &'a X,
    dt: DType,
    flats: Option<Vec<Tensor<X>>>,
    cursor: [usize; 6],
    used: [Vec<std::ops::Range<usize>>; 6],
}

const VIEW_FLAT: usize = 4096;

impl<'a, X: Backend> Placer<'a, X> {
    fn new(be: &'a X, dt: DType, views: bool) -> Self {
        let flats = views.then(|| {
            (0..6)
                .map(|slot| {
                    let d = if slot < 2 { dt } else { DType::F32 };
                    let mut rng = Rng::new(seed("views-flat", d, slot));
                    up(be, &rng.normal_vec(VIEW_FLAT), &[VIEW_FLAT], d)
                })
                .collect()
        });
        Placer { be, dt, flats, cursor: [128; 6], used: Default::default() }
    }

    fn put(&mut self, vals: &[f32], shape: &[usize], slot: usize) -> Tensor<X> {
        let dt = if slot < 2 { self.dt } else { DType::F32 };
        let Some(flats) = &self.flats else { return up(self.be, vals, shape, dt) };
        let off = self.cursor[slot];
        self.cursor[slot] = off + vals.len().div_ceil(128) * 128 + 128;
        assert!(self.cursor[slot] <= VIEW_FLAT, "test flat buffer too small");
        self.used[slot].push(off..off + vals.len());
        let mut t = Tensor::view(self.be, &flats[slot], off, shape).expect("view");
        t.write_f32(self.be, vals).expect("write through a view");
        t
    }
}

/// Ops on views at non-zero offsets of larger buffers give the same bits as
/// on standalone tensors, and leave every element outside the views alone.
pub fn views_match_standalone<R: Backend, B: Backend>(_r: &R, b: &B) {
    if !b.supports_views() {
        eprintln!("views_match_standalone: skipped: the {} backend has no tensor views", b.kind());
        return;
    }
    for dt in float_dtypes(b, b) {
        let (m, k, n, l) = (8usize, 16usize, 12usize, 200usize);
        let mut rng = Rng::new(seed("views", dt, 0));
        let mut v = |len: usize| rng.normal_vec(len);
        let (x, w, c0, dy, dw0) = (v(m * k), v(k * n), v(m * n), v(m * n), v(k * n));
        let (xl, g, bb, dg0, db0, y2) = (v(m * n), v(n), v(n), v(n), v(n), v(m * n));
        let (p0, gr, m0) = (v(l), v(l), v(l));
        let v0: Vec<f32> = v(l).iter().map(|x| x.abs()).collect();
        let run = |views: bool| {
            let mut pl = Placer::new(b, dt, views);
            let (xa, wa, mut c) = (pl.put(&x, &[m, k], 0), pl.put(&w, &[k, n], 0), pl.put(&c0, &[m, n], 1));
            ops::matmul(b, &xa, &wa, &mut c, false, false, 1.0, 0.5).unwrap();
            let (dyt, mut dw) = (pl.put(&dy, &[m, n], 0), pl.put(&dw0, &[k, n], 1));
            ops::matmul(b, &xa, &dyt, &mut dw, true, false, 1.0, 1.0).unwrap();
            let (xt, gt, bt) = (pl.put(&xl, &[m, n], 0), pl.put(&g, &[n], 0), pl.put(&bb, &[n], 0));
            let mut y = pl.put(&vec![0.0; m * n], &[m, n], 1);
            let mut mean = Tensor::zeros(b, &[m], DType::F32).unwrap();
            let mut rstd = Tensor::zeros(b, &[m], DType::F32).unwrap();
            ops::layernorm(b, &xt, &gt, &bt, &mut y, &mut mean, &mut rstd, 1e-5).unwrap();
            let mut dx = pl.put(&vec![0.0; m * n], &[m, n], 1);
            let (mut dg, mut db) = (pl.put(&dg0, &[n], 1), pl.put(&db0, &[n], 1));
            ops::layernorm_backward(b, &dyt, &xt, &gt, &mean, &rstd, &mut dx, &mut dg, &mut db).unwrap();
            let mut f = pl.put(&vec![1.0; n], &[n], 1);
            ops::fill(b, &mut f, 0.75).unwrap();
            let mut ax = pl.put(&y2, &[m, n], 1);
            ops::axpby(b, 0.5, &xt, -1.5, &mut ax).unwrap();
            let mut sq = Tensor::zeros(b, &[1], DType::F32).unwrap();
            ops::sum_squares(b, &xt, &mut sq).unwrap();
            let (mut p, gt2, mut mm, mut vv) =
                (pl.put(&p0, &[l], 2), pl.put(&gr, &[l], 3), pl.put(&m0, &[l], 4), pl.put(&v0, &[l], 5));
            let mut copy = (dt != DType::F32).then(|| pl.put(&vec![0.0; l], &[l], 1));
            let cfg = AdamWConfig { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
            ops::adamw(b, &cfg, 3, 0.5, &mut p, &gt2, &mut mm, &mut vv, copy.as_mut()).unwrap();
            let mut outs: Vec<Vec<u8>> = [&c, &dw, &y, &dx, &dg, &db, &f, &ax, &sq, &p, &mm, &vv]
                .iter()
                .map(|t| t.to_bytes(b).unwrap())
                .collect();
            outs.extend(copy.map(|t| t.to_bytes(b).unwrap()));
            (outs, pl)
        };
        let (want, _) = run(false);
        let (got, pl) = run(true);
        let names = [
            "matmul",
            "matmul_bwd",
            "layernorm",
            "ln_dx",
            "ln_dgamma",
            "ln_dbeta",
            "fill",
            "axpby",
            "sum_squares",
            "adamw p",
            "adamw m",
            "adamw v",
            "adamw copy",
        ];
        for ((w, g), name) in want.iter().zip(&got).zip(names) {
            assert!(w == g, "{dt} {name}: a view's result differs from a standalone tensor's");
        }
        // Outside the views every flat element keeps its initial value.
        for (slot, flat) in pl.flats.as_ref().unwrap().iter().enumerate() {
            let d = if slot < 2 { dt } else { DType::F32 };
            let init = up(b, &Rng::new(seed("views-flat", d, slot)).normal_vec(VIEW_FLAT), &[VIEW_FLAT], d)
                .to_bytes(b)
                .unwrap();
            let now = flat.to_bytes(b).unwrap();
            let sz = d.size();
            for i in 0..VIEW_FLAT {
                if !pl.used[slot].iter().any(|r| r.contains(&i)) {
                    assert!(
                        now[i * sz..(i + 1) * sz] == init[i * sz..(i + 1) * sz],
                        "{dt}: flat {slot} element {i} outside every view changed"
                    );
                }
            }
        }
    }
}

/// Generates one `#[test]` per op for a backend pair. `$get` returns
/// `Option<(&R, &B)>`: `None` means the backend under test is not available
/// here and the test reports itself skipped (the getter prints why).
#[macro_export]
macro_rules! conformance_tests {
    ($get:path) => {
        #[test]
        fn ops_on_views_match_standalone_tensors_bit_for_bit() {
            if let Some((r, b)) = $get() {
                common::views_match_standalone(r, b)
            }
        }
        #[test]
        fn matmul_matches_reference() {
            if let Some((r, b)) = $get() {
                common::matmul(r, b)
            }
        }
        #[test]
        fn matmul_rows_match_reference_and_are_batch_invariant() {
            if let Some((r, b)) = $get() {
                common::matmul_rows(r, b)
            }
        }
        #[test]
        fn qmatmul_matches_reference_for_every_format() {
            if let Some((r, b)) = $get() {
                common::qmatmul(r, b)
            }
        }
        #[test]
        fn compressed_model_matches_reference_in_forward_and_decode() {
            if let Some((r, b)) = $get() {
                common::compressed_model(r, b)
            }
        }
        #[test]
        fn fill_add_scale_match_reference() {
            if let Some((r, b)) = $get() {
                common::fill_add_scale(r, b)
            }
        }
        #[test]
        fn axpby_and_cast_match_reference_for_every_dtype_pair() {
            if let Some((r, b)) = $get() {
                common::axpby_and_cast(r, b)
            }
        }
        #[test]
        fn bias_add_and_sum_rows_match_reference() {
            if let Some((r, b)) = $get() {
                common::bias_add_and_sum_rows(r, b)
            }
        }
        #[test]
        fn gelu_forward_backward_and_fused_bias_match_reference() {
            if let Some((r, b)) = $get() {
                common::gelu(r, b)
            }
        }
        #[test]
        fn layernorm_forward_and_backward_match_reference() {
            if let Some((r, b)) = $get() {
                common::layernorm(r, b)
            }
        }
        #[test]
        fn softmax_forward_and_backward_match_reference() {
            if let Some((r, b)) = $get() {
                common::softmax(r, b)
            }
        }
        #[test]
        fn rope_forward_and_backward_match_reference() {
            if let Some((r, b)) = $get() {
                common::rope(r, b)
            }
        }
        #[test]
        fn embedding_lookup_and_scatter_add_match_reference() {
            if let Some((r, b)) = $get() {
                common::embedding(r, b)
            }
        }
        #[test]
        fn cross_entropy_forward_and_backward_match_reference() {
            if let Some((r, b)) = $get() {
                common::cross_entropy(r, b)
            }
        }
        #[test]
        fn sum_squares_and_all_finite_match_reference() {
            if let Some((r, b)) = $get() {
                common::reductions(r, b)
            }
        }
        #[test]
        fn adamw_matches_reference() {
            if let Some((r, b)) = $get() {
                common::adamw(r, b)
            }
        }
        #[test]
        fn attention_dense_token_and_block_forward_backward_match_reference() {
            if let Some((r, b)) = $get() {
                common::attention(r, b)
            }
        }
        #[test]
        fn sparse_attention_keeping_every_key_equals_dense() {
            if let Some((r, b)) = $get() {
                common::sparse_attention_keeping_all_equals_dense(r, b)
            }
        }
        #[test]
        fn indexer_selection_and_kl_loss_match_reference() {
            if let Some((r, b)) = $get() {
                common::indexer_and_selection(r, b)
            }
        }
        #[test]
        fn attention_long_sequences_match_reference() {
            if let Some((r, b)) = $get() {
                common::attention_long_sequences(r, b)
            }
        }
        #[test]
        fn selection_and_attention_outputs_are_causal_in_every_mode() {
            if let Some((r, b)) = $get() {
                common::selection_and_attention_are_causal(r, b);
            }
        }
        #[test]
        fn attention_with_keyless_queries_and_tiles_matches_reference() {
            if let Some((r, b)) = $get() {
                common::attention_with_keyless_queries(r, b);
            }
        }
        #[test]
        fn model_logits_are_causal_dense_and_sparse() {
            if let Some((r, b)) = $get() {
                common::model_is_a_causal_lm(r, b);
            }
        }
        #[test]
        fn cached_inference_ops_match_reference_on_a_ragged_step() {
            if let Some((r, b)) = $get() {
                common::cached_ops(r, b);
            }
        }
        #[test]
        fn prefill_and_decode_reproduce_the_full_window_logits() {
            if let Some((r, b)) = $get() {
                common::prefill_and_decode_match_the_full_window(r, b);
            }
        }
        #[test]
        fn one_training_step_matches_reference() {
            if let Some((r, b)) = $get() {
                common::training_step(r, b)
            }
        }
        #[test]
        fn indexer_training_ops_over_query_tiles_match_untiled() {
            if let Some((r, b)) = $get() {
                common::indexer_tiles_match_untiled(r, b)
            }
        }
        #[test]
        fn fused_kept_set_indexer_training_matches_the_op_chain() {
            if let Some((r, b)) = $get() {
                common::indexer_train_kept(r, b)
            }
        }
        #[test]
        fn chunked_lm_head_and_indexer_training_matches_unchunked() {
            if let Some((r, b)) = $get() {
                common::chunked_training_matches_unchunked(r, b)
            }
        }
        #[test]
        fn bad_inputs_are_errors_naming_the_problem() {
            if let Some((_, b)) = $get() {
                common::bad_inputs_are_errors(b)
            }
        }
    };
}

/// Reports a skipped backend; fails instead when `DYNSPARSE_REQUIRE_<NAME>` is set.
pub fn skip(name: &str, why: &str) {
    let var = format!("DYNSPARSE_REQUIRE_{}", name.to_ascii_uppercase());
    if std::env::var(&var).is_ok_and(|v| !v.is_empty() && v != "0") {
        panic!("{var} is set but the {name} backend is unavailable: {why}");
    }
    // Written straight to the process's stderr (not `eprintln!`, which the test
    // harness captures), once per backend and test binary, so `cargo test` shows the skip.
    static SEEN: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
    if !seen.iter().any(|n| n == name) {
        seen.push(name.to_string());
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "skipped: no {name} backend ({why})");
    }
}
