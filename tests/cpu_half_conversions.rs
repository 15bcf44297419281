//! The CPU backend's f16/bf16 ops convert only the part of a tensor they are
//! about to use (per attention head, per row, per chunk) instead of widening
//! whole tensors to f32 and narrowing whole outputs. Their contract is
//! unchanged: every half-precision op equals the f32 op on the exactly
//! widened inputs with each output element rounded once (RNE) to the dtype —
//! which is what the whole-tensor path computed. These tests pin that bit for
//! bit, with the f32 op as the oracle.

use dynsparse::attention::ops::{Pattern, attention, attention_backward};
use dynsparse::backend::cpu::CpuBackend;
use dynsparse::ops::{self, RopeTable};
use dynsparse::util::rng::Rng;
use dynsparse::{DType, Tensor};

type T = Tensor<CpuBackend>;

/// `v` rounded to `dt` and widened back (exact): the values a `dt` tensor holds.
fn round_to(be: &CpuBackend, v: &[f32], dt: DType) -> Vec<f32> {
    Tensor::from_f32(be, v, &[v.len()], dt).unwrap().to_f32_vec(be).unwrap()
}

fn tensor(be: &CpuBackend, v: &[f32], shape: &[usize], dt: DType) -> T {
    Tensor::from_f32(be, v, shape, dt).unwrap()
}

/// Asserts that `half` (outputs of the `dt` op) is `f32` (outputs of the f32
/// op on the same values) rounded once to `dt`, bit for bit.
fn assert_rounded(be: &CpuBackend, what: &str, dt: DType, half: &[f32], f32: &[f32]) {
    let want = round_to(be, f32, dt);
    assert_eq!(half.len(), want.len(), "{what} {dt}: length");
    for (i, (h, w)) in half.iter().zip(&want).enumerate() {
        assert!(h.to_bits() == w.to_bits(), "{what} {dt}: element {i} is {h}, the rounded f32 op gives {w}");
    }
}

#[test]
fn half_attention_forward_and_backward_equal_the_f32_op_rounded_once() {
    let be = CpuBackend::new();
    // seq 150: two full tiles and a partial one; 4 query heads share 2 kv heads.
    let (b, n, h, hk, d): (usize, usize, usize, usize, usize) = (2, 150, 4, 2, 16);
    let mut rng = Rng::new(11);
    let (tk, nb, block, keep) = (5, n.div_ceil(16), 16, 3);
    // Token keys (t + n - 3i) mod n: distinct, those past t are not visible.
    let tok: Vec<u32> = (0..b * n).flat_map(|r| (0..tk).map(move |i| ((r % n + n - 3 * i) % n) as u32)).collect();
    // Block keys (t/16 + nb - 2i) mod nb: distinct, those past t's block are not visible.
    let blk: Vec<u32> =
        (0..b * n).flat_map(|r| (0..keep).map(move |i| ((r % n / block + nb - 2 * i) % nb) as u32)).collect();
    let tok_t = Tensor::from_u32(&be, &tok, &[b, n, tk]).unwrap();
    let blk_t = Tensor::from_u32(&be, &blk, &[b, n, keep]).unwrap();
    for dt in [DType::BF16, DType::F16] {
        let q = round_to(&be, &rng.normal_vec(b * n * h * d), dt);
        let k = round_to(&be, &rng.normal_vec(b * n * hk * d), dt);
        let v = round_to(&be, &rng.normal_vec(b * n * hk * d), dt);
        let d_o = round_to(&be, &rng.normal_vec(b * n * h * d), dt);
        let (qs, ks) = ([b, n, h, d], [b, n, hk, d]);
        for which in ["dense", "tokens", "blocks"] {
            let pattern = || match which {
                "dense" => Pattern::Dense,
                "tokens" => Pattern::Tokens(&tok_t),
                _ => Pattern::Blocks { idx: &blk_t, block },
            };
            // Forward and backward at `at` (dt or F32), from the same values.
            let run = |at: DType, o_in: Option<&[f32]>| {
                let (qt, kt, vt) = (tensor(&be, &q, &qs, at), tensor(&be, &k, &ks, at), tensor(&be, &v, &ks, at));
                let mut o = T::empty(&be, &qs, at).unwrap();
                let mut lse = T::empty(&be, &[b, h, n], DType::F32).unwrap();
                attention(&be, &qt, &kt, &vt, pattern(), &mut o, &mut lse).unwrap();
                let (ov, lv) = (o.to_f32_vec(&be).unwrap(), lse.to_f32_vec(&be).unwrap());
                // The backward reads the dtype's o: the half run's, widened.
                let o_bw = tensor(&be, o_in.unwrap_or(&ov), &qs, at);
                let dot = tensor(&be, &d_o, &qs, at);
                let (mut dq, mut dk, mut dv) =
                    (T::empty(&be, &qs, at).unwrap(), T::empty(&be, &ks, at).unwrap(), T::empty(&be, &ks, at).unwrap());
                attention_backward(&be, &qt, &kt, &vt, &o_bw, &lse, &dot, pattern(), &mut dq, &mut dk, &mut dv)
                    .unwrap();
                let grads = [&dq, &dk, &dv].map(|t| t.to_f32_vec(&be).unwrap());
                (ov, lv, grads)
            };
            let (ho, hl, hg) = run(dt, None);
            let (fo, fl, fg) = run(DType::F32, Some(&ho));
            let what = format!("attention {which}");
            assert_rounded(&be, &format!("{what} o"), dt, &ho, &fo);
            assert_eq!(
                hl.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                fl.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                "{what} {dt}: lse"
            );
            for (name, (hg, fg)) in ["dq", "dk", "dv"].iter().zip(hg.iter().zip(&fg)) {
                assert_rounded(&be, &format!("{what} {name}"), dt, hg, fg);
            }
        }
    }
}

#[test]
fn half_rope_cast_cross_entropy_and_embedding_equal_the_f32_op_rounded_once() {
    let be = CpuBackend::new();
    let mut rng = Rng::new(12);
    let table = RopeTable::new(&be, 64, 8, 10000.0).unwrap();
    let (rows, vocab, dim) = (37, 300, 24);
    let targets: Vec<u32> = (0..rows as u32).map(|r| if r == 5 { u32::MAX } else { (r * 37) % vocab as u32 }).collect();
    let tt = Tensor::from_u32(&be, &targets, &[rows]).unwrap();
    let ids: Vec<u32> = (0..rows as u32).map(|r| if r == 3 { 9999 } else { (r * 7) % vocab as u32 }).collect();
    let idt = Tensor::from_u32(&be, &ids, &[rows]).unwrap();
    for dt in [DType::BF16, DType::F16] {
        // rope forward and backward, [2, 40, 3, 8] at offset 5.
        let x = round_to(&be, &rng.normal_vec(2 * 40 * 3 * 8), dt);
        let shape = [2, 40, 3, 8];
        for inverse in [false, true] {
            let run = |at: DType| {
                let xt = tensor(&be, &x, &shape, at);
                let mut y = T::empty(&be, &shape, at).unwrap();
                if inverse {
                    ops::rope_backward(&be, &xt, &table, 5, &mut y).unwrap();
                } else {
                    ops::rope(&be, &xt, &table, 5, &mut y).unwrap();
                }
                y.to_f32_vec(&be).unwrap()
            };
            assert_rounded(&be, &format!("rope (inverse {inverse})"), dt, &run(dt), &run(DType::F32));
        }
        // cast f32 → dt, dt → dt and dt → f32.
        let wide = rng.normal_vec(rows * dim).iter().map(|x| x * 1e3).collect::<Vec<_>>();
        let src = tensor(&be, &wide, &[rows, dim], DType::F32);
        let mut narrow = T::empty(&be, &[rows, dim], dt).unwrap();
        ops::cast(&be, &src, &mut narrow).unwrap();
        assert_rounded(&be, "cast f32 →", dt, &narrow.to_f32_vec(&be).unwrap(), &wide);
        let mut same = T::empty(&be, &[rows, dim], dt).unwrap();
        ops::cast(&be, &narrow, &mut same).unwrap();
        let mut back = T::empty(&be, &[rows, dim], DType::F32).unwrap();
        ops::cast(&be, &same, &mut back).unwrap();
        assert_rounded(&be, "cast → same dtype → f32", dt, &back.to_f32_vec(&be).unwrap(), &wide);
        // cross-entropy forward (f32 losses) and backward.
        let logits = round_to(&be, &rng.normal_vec(rows * vocab).iter().map(|x| 4.0 * x).collect::<Vec<_>>(), dt);
        let ce = |at: DType| {
            let lt = tensor(&be, &logits, &[rows, vocab], at);
            let mut l = T::empty(&be, &[rows], DType::F32).unwrap();
            ops::cross_entropy(&be, &lt, &tt, &mut l, u32::MAX).unwrap();
            let mut dl = T::empty(&be, &[rows, vocab], at).unwrap();
            ops::cross_entropy_backward(&be, &lt, &tt, &mut dl, u32::MAX, 0.125).unwrap();
            (l.to_f32_vec(&be).unwrap(), dl.to_f32_vec(&be).unwrap())
        };
        let ((hl, hd), (fl, fd)) = (ce(dt), ce(DType::F32));
        assert_rounded(&be, "cross-entropy losses (f32)", DType::F32, &hl, &fl);
        assert_rounded(&be, "cross-entropy dlogits", dt, &hd, &fd);
        // embedding lookup (row 3's id is out of range: zeros).
        let tab = round_to(&be, &rng.normal_vec(vocab * dim), dt);
        let emb = |at: DType| {
            let t = tensor(&be, &tab, &[vocab, dim], at);
            let mut o = T::empty(&be, &[rows, dim], at).unwrap();
            ops::embedding(&be, &idt, &t, &mut o).unwrap();
            o.to_f32_vec(&be).unwrap()
        };
        assert_rounded(&be, "embedding", dt, &emb(dt), &emb(DType::F32));
    }
}

/// FNV-1a over the master weights, the working weights and the losses after
/// three steps of a small model (dense and sparse, every precision).
fn training_fingerprints() -> Vec<(String, u64)> {
    use dynsparse::data::synthetic::{SyntheticConfig, generate};
    use dynsparse::model::{AttentionMode, Model, ModelConfig};
    use dynsparse::train::{LrSchedule, MemoryReport, TrainConfig, Trainer};
    let be = CpuBackend::new();
    let data = generate(4, 40_000, SyntheticConfig::default());
    let mut out = Vec::new();
    for precision in [DType::BF16, DType::F16, DType::F32] {
        for sparse in [false, true] {
            let attention = if sparse {
                AttentionMode::Sparse { block: 16, keep_blocks: 3, index_heads: 2, index_dim: 8 }
            } else {
                AttentionMode::Dense
            };
            let m = ModelConfig {
                n_layers: 2,
                n_heads: 4,
                n_kv_heads: 2,
                d_model: 64,
                vocab: 256,
                context: 160,
                mlp_ratio: 2,
                rope_theta: 10000.0,
                attention,
            };
            let t = TrainConfig {
                steps: 10,
                batch: 2,
                seq: 160,
                accum: 1,
                precision,
                lr: LrSchedule { lr: 3e-3, min_lr: 3e-4, warmup_steps: 1, total_steps: 10 },
                beta1: 0.9,
                beta2: 0.95,
                weight_decay: 0.1,
                grad_clip: 1.0,
                warmup_frac: 0.0,
                ramp_frac: 0.0,
                kl_every: 1,
                seed: 9,
            };
            let mut tr =
                Trainer::new(&be, Model::new(&be, m, precision, 1).unwrap(), t, &mut MemoryReport::default()).unwrap();
            let losses: Vec<u64> = (0..3).map(|_| tr.train_step(&be, &data).unwrap().loss.to_bits()).collect();
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            let mut eat = |x: u64| {
                h ^= x;
                h = h.wrapping_mul(0x0100_0000_01b3);
            };
            let weights = [tr.master_values(&be).unwrap(), tr.model.values(&be).unwrap()];
            weights.iter().flatten().flatten().for_each(|x| eat(x.to_bits() as u64));
            losses.iter().for_each(|&l| eat(l));
            out.push((format!("{precision} sparse={sparse}"), h));
        }
    }
    out
}

/// The training step is bit-identical to recorded fingerprints. First
/// recorded at commit 16a2125 (which widened whole tensors) and unchanged by
/// the per-part conversions; re-recorded (printed by this test) when the
/// dense pattern moved to 128-key tiles (the f32 order of its online
/// softmax) and when the fused indexer training took its exponentials from
/// the portable vector `exp` instead of libm, and again when it moved to
/// block-transposed keys and row kernels (the sparse runs). They hold for one machine
/// class only (x86-64 AVX2 + FMA kernels, glibc's libm for exp/ln/cos), so
/// the test is opt-in: `cargo test --release --test cpu_half_conversions -- --ignored`.
#[test]
#[ignore = "expectations recorded on x86-64 AVX2+FMA (no AVX-512) with glibc; run with --ignored there"]
fn training_steps_are_bit_identical_to_the_whole_tensor_widening_path() {
    let want = [
        ("bf16 sparse=false", 0xcb4f_efe4_6818_7c5e_u64),
        ("bf16 sparse=true", 0x6534_da46_853e_80a9),
        ("f16 sparse=false", 0xaf18_b09b_c433_5b1b),
        ("f16 sparse=true", 0x4333_9b99_f82e_2515),
        ("f32 sparse=false", 0x9648_ff74_318c_0027),
        ("f32 sparse=true", 0x1e3c_94fb_1259_634f),
    ];
    let got = training_fingerprints();
    // Printed whole, so that a deliberate change of the arithmetic can re-record them.
    got.iter().for_each(|(name, h)| eprintln!("(\"{name}\", 0x{h:016x}),"));
    for ((name, h), (wname, w)) in got.iter().zip(want) {
        assert_eq!(name, wname);
        assert_eq!(*h, w, "{name}: fingerprint {h:016x}, recorded {w:016x}");
    }
}
