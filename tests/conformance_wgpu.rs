//! Conformance of the wgpu backend against the CPU reference.
//!
//! Uses any adapter, software ones included (Mesa lavapipe in CI). With no
//! adapter the tests print "skipped"; `DYNSPARSE_REQUIRE_WGPU=1` turns that
//! into a failure (CI sets it). Every test runs in f32, f16 and bf16.
#![cfg(feature = "wgpu")]

mod common;

use dynsparse::Backend;
use dynsparse::attention::RowSample;
use dynsparse::backend::cpu::CpuBackend;
use dynsparse::backend::wgpu::{AdapterPick, WgpuBackend};
use std::sync::OnceLock;

fn pair() -> Option<(&'static CpuBackend, &'static WgpuBackend)> {
    static CPU: OnceLock<CpuBackend> = OnceLock::new();
    static GPU: OnceLock<Result<WgpuBackend, String>> = OnceLock::new();
    let gpu = GPU.get_or_init(|| {
        let pick = AdapterPick::from_env().unwrap_or(AdapterPick::Any);
        WgpuBackend::new(&pick).map_err(|e| e.to_string())
    });
    match gpu {
        Ok(g) => Some((CPU.get_or_init(CpuBackend::new), g)),
        Err(why) => {
            common::skip("wgpu", why);
            None
        }
    }
}

conformance_tests!(pair);

#[test]
fn wgpu_runs_the_half_precision_variants() {
    let Some((c, g)) = pair() else { return };
    // f16 and bf16 are stored two per u32 word and converted in the shaders, so
    // every adapter runs them, SHADER_F16 or not; the suite must cover all three.
    let dts = common::float_dtypes(c, g);
    eprintln!("wgpu device {}: conformance dtypes {dts:?}", g.device_name());
    assert_eq!(dts, dynsparse::DType::FLOATS.to_vec(), "the wgpu conformance run must cover f32, f16 and bf16");
}

/// `DYNSPARSE_WGPU_KERNELS=hw|sw` forces a kernel variant whatever the
/// adapter (CI runs the variant kernels' tests with `hw` on lavapipe, which
/// would otherwise get `sw`); this fails if the override stops reaching the
/// backend, so that CI step cannot silently test the other variant.
#[test]
fn the_kernel_variant_override_reaches_the_backend() {
    use dynsparse::backend::wgpu::KernelVariant;
    let Some((_, g)) = pair() else { return };
    let want = match std::env::var("DYNSPARSE_WGPU_KERNELS").ok().as_deref().map(str::trim) {
        Some("hw") => KernelVariant::Hardware,
        Some("sw") => KernelVariant::Software,
        _ if g.adapter_info().device_type == wgpu::DeviceType::Cpu => KernelVariant::Software,
        _ => return,
    };
    eprintln!("wgpu device {}: {:?} kernels", g.device_name(), g.kernel_variant());
    assert_eq!(g.kernel_variant(), want);
}

/// `DYNSPARSE_WGPU_SUBGROUPS=0|1` reaches the backend (CI runs the decode
/// kernels' tests with each value under `DYNSPARSE_WGPU_KERNELS=hw`); with
/// `1` the backend could not even open without usable subgroups.
#[test]
fn the_subgroup_override_reaches_the_backend() {
    let Some((_, g)) = pair() else { return };
    let want = match std::env::var("DYNSPARSE_WGPU_SUBGROUPS").ok().as_deref().map(str::trim) {
        Some("0") => false,
        Some("1") => true,
        _ => return,
    };
    eprintln!("wgpu device {}: subgroup kernels {}", g.device_name(), g.subgroups());
    assert_eq!(g.subgroups(), want);
}

/// The pooled block scores of the indexer against the CPU reference, over
/// the finite entries only, and the same `-inf` entries (future blocks,
/// keyless rows). The shared suite compares the whole output with `-inf`
/// mapped to -1e30, which hides a wrong finite score behind the markers'
/// norm; this catches one in either kernel variant (f32 at 1e-5). Cases
/// reach the tiled kernels (H_I <= 16, d_I <= 64): d_I 32 (8-vec4 rows) and
/// 64 (16), and a 128-key block (two 64-key passes, merged with the value
/// already written).
#[test]
fn indexer_block_scores_match_reference_on_finite_entries() {
    let Some((c, g)) = pair() else { return };
    indexer_finite(c, g);
}

fn indexer_finite(c: &CpuBackend, g: &WgpuBackend) {
    use dynsparse::DType;
    use dynsparse::attention as attn;
    use dynsparse::util::rng::Rng;
    for dt in common::float_dtypes(c, g) {
        for (ci, &(batch, seq, hi, di, block)) in
            [(2usize, 90usize, 4usize, 32usize, 16usize), (1, 200, 3, 64, 128)].iter().enumerate()
        {
            let mut rng = Rng::new(common::seed("indexer_pooled", dt, ci));
            let (qi, ki, w) = (
                rng.normal_vec(batch * seq * hi * di),
                rng.normal_vec(batch * seq * di),
                rng.normal_vec(batch * seq * hi),
            );
            let nb = seq.div_ceil(block);
            let pooled = |want: bool| -> Vec<f32> {
                macro_rules! run {
                    ($be:expr) => {{
                        let be = $be;
                        let qt = common::up(be, &qi, &[batch, seq, hi, di], dt);
                        let kt = common::up(be, &ki, &[batch, seq, di], dt);
                        let wt = common::up(be, &w, &[batch, seq, hi], dt);
                        let mut p = common::poisoned(be, &[batch, seq, nb], DType::F32);
                        attn::indexer_block_scores(be, &qt, &kt, &wt, block, &mut p).unwrap();
                        common::down(be, &p)
                    }};
                }
                if want { run!(c) } else { run!(g) }
            };
            let (want, got) = (pooled(true), pooled(false));
            let inf = |v: &[f32]| v.iter().map(|x| *x == f32::NEG_INFINITY).collect::<Vec<_>>();
            assert_eq!(inf(&got), inf(&want), "case {ci} [{dt}]: -inf entries differ");
            let keep =
                |v: &[f32]| v.iter().zip(&want).filter(|(_, w)| w.is_finite()).map(|(x, _)| *x).collect::<Vec<_>>();
            let finite = keep(&want);
            assert!(finite.len() > want.len() / 3, "case {ci}: too few finite scores");
            common::assert_close(&format!("pooled block scores, case {ci}"), &keep(&got), &finite, dt);
        }
    }
}

/// The decode step's block selection against the CPU reference on the
/// finite pooled scores only (the shared `cached_ops` compares the pooled
/// scores with `-inf` mapped to -1e30, whose norm hides a wrong finite
/// score): the cached indexer's pooled block maxima (`cached_pool`, or
/// `cached_pool_hw` on the hardware variant) over scattered pages, rows of
/// 300, 17, 129 and 0 keys, the same `-inf` entries; and `cached_select`
/// (`cached_select_hw`) keeping 7 of 20 blocks from the reference's scores,
/// the same indices. Every float dtype.
fn decode_selection_finite(c: &CpuBackend, g: &WgpuBackend) {
    use dynsparse::attention::{self as attn, KvTable};
    use dynsparse::util::rng::Rng;
    use dynsparse::{Backend, DType, Tensor};
    let (hi, di, block, keep, page) = (3usize, 16usize, 16usize, 7usize, 16usize);
    let lens = [300usize, 17, 129, 0];
    let per = 320 / page;
    let slots = lens.len() * 320;
    let cols = 320 / block;
    for dt in common::float_dtypes(c, g) {
        let mut rng = Rng::new(common::seed("decode_selection", dt, 0));
        let mut ids: Vec<u32> = (0..(lens.len() * per) as u32).collect();
        for i in (1..ids.len()).rev() {
            ids.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let tab: Vec<u32> = lens.iter().enumerate().flat_map(|(i, &l)| [(i * per) as u32, l as u32]).collect();
        let r = lens.len();
        let (qi, w, ki) = (rng.normal_vec(r * hi * di), rng.normal_vec(r * hi), rng.normal_vec(slots * di));
        // q_I, w, k_I cache, row table, page ids.
        type Data<'a> = (&'a [f32], &'a [f32], &'a [f32], &'a [u32], &'a [u32]);
        fn run<B: Backend>(
            be: &B,
            data: Data<'_>,
            dims: (usize, usize, usize, usize, usize, usize),
            dt: DType,
            scores: Option<&[f32]>,
        ) -> (Vec<f32>, Vec<u32>) {
            let (qi, w, ki, tab, ids) = data;
            let (r, hi, di, block, keep, page) = dims;
            let (slots, cols) = (ki.len() / di, 320 / block);
            let table = Tensor::from_u32(be, tab, &[r, 2]).unwrap();
            let pages = Tensor::from_u32(be, ids, &[ids.len()]).unwrap();
            let kv = KvTable { rows: &table, pages: &pages, page };
            let (qt, wt, kt) = (
                common::up(be, qi, &[r, hi, di], dt),
                common::up(be, w, &[r, hi], dt),
                common::up(be, ki, &[slots, di], dt),
            );
            let mut pooled = common::poisoned(be, &[r, cols], DType::F32);
            attn::cached_indexer_block_scores(be, &qt, &wt, &kt, &kv, block, &mut pooled).unwrap();
            let pv = common::down(be, &pooled);
            let st = Tensor::from_f32(be, scores.unwrap_or(&pv), &[r, cols], DType::F32).unwrap();
            let mut idx = Tensor::from_u32(be, &vec![9; r * keep], &[r, keep]).unwrap();
            attn::cached_select(be, &st, &table, keep, block, &mut idx).unwrap();
            (pv, idx.to_u32_vec(be).unwrap())
        }
        let data = (&qi[..], &w[..], &ki[..], &tab[..], &ids[..]);
        let dims = (r, hi, di, block, keep, page);
        let (want, want_idx) = run(c, data, dims, dt, None);
        let (got, got_idx) = run(g, data, dims, dt, Some(&want));
        let inf = |v: &[f32]| v.iter().map(|x| *x == f32::NEG_INFINITY).collect::<Vec<_>>();
        assert_eq!(inf(&got), inf(&want), "[{dt}] cached pooled scores: -inf entries differ");
        let keep_f =
            |v: &[f32]| v.iter().zip(&want).filter(|(_, w)| w.is_finite()).map(|(x, _)| *x).collect::<Vec<_>>();
        let finite = keep_f(&want);
        assert!(finite.len() >= cols, "[{dt}] too few finite pooled scores");
        common::assert_close("cached pooled scores (finite)", &keep_f(&got), &finite, dt);
        assert_eq!(got_idx, want_idx, "[{dt}] cached_select picks other blocks");
    }
}

/// The attention backward where the key/value pass splits its query loop
/// into chunks (head_dim 128, two query heads per kv head: a few dozen
/// queries per chunk under lavapipe's loop budget), so per-chunk partials
/// and their ordered sums run in both kernel variants (CI also runs it with
/// `DYNSPARSE_WGPU_KERNELS=hw`): dense, token and block patterns, f32.
#[test]
fn attention_backward_with_split_query_loops_matches_reference() {
    let Some((c, g)) = pair() else { return };
    split_backward(c, g, dynsparse::DType::F32, 128);
}

fn split_backward(c: &CpuBackend, g: &WgpuBackend, dt: dynsparse::DType, d: usize) {
    use dynsparse::attention::{self as attn, Pattern};
    use dynsparse::util::rng::Rng;
    use dynsparse::{DType, Tensor};
    let (batch, seq, heads, kv) = (1usize, 200usize, 2usize, 1usize);
    let mut rng = Rng::new(common::seed("attention-split-bwd", dt, 0));
    let (qs, ks) = ([batch, seq, heads, d], [batch, seq, kv, d]);
    let (nq, nk) = (batch * seq * heads * d, batch * seq * kv * d);
    let (q, k, v, d_o) = (rng.normal_vec(nq), rng.normal_vec(nk), rng.normal_vec(nk), rng.normal_vec(nq));
    let (tok, kk, blk, nn) = common::attn_patterns(batch, seq, common::seed("attention-split-bwd-pattern", dt, 0));
    for mode in ["dense", "tokens", "blocks"] {
        macro_rules! run {
            ($be:expr) => {{
                let be = $be;
                let (qt, kt, vt, dot) = (
                    common::up(be, &q, &qs, dt),
                    common::up(be, &k, &ks, dt),
                    common::up(be, &v, &ks, dt),
                    common::up(be, &d_o, &qs, dt),
                );
                let tt = Tensor::from_u32(be, &tok, &[batch, seq, kk]).unwrap();
                let bt = Tensor::from_u32(be, &blk, &[batch, seq, nn]).unwrap();
                let pat = || match mode {
                    "dense" => Pattern::Dense,
                    "tokens" => Pattern::Tokens(&tt),
                    _ => Pattern::Blocks { idx: &bt, block: 16 },
                };
                let mut o = common::poisoned(be, &qs, dt);
                let mut lse = common::poisoned(be, &[batch, heads, seq], DType::F32);
                attn::attention(be, &qt, &kt, &vt, pat(), &mut o, &mut lse).unwrap();
                let (mut dq, mut dk, mut dv) =
                    (common::poisoned(be, &qs, dt), common::poisoned(be, &ks, dt), common::poisoned(be, &ks, dt));
                attn::attention_backward(be, &qt, &kt, &vt, &o, &lse, &dot, pat(), &mut dq, &mut dk, &mut dv).unwrap();
                vec![common::down(be, &dq), common::down(be, &dk), common::down(be, &dv)]
            }};
        }
        let (want, got) = (run!(c), run!(g));
        let case = format!("{mode} b{batch} t{seq} h{heads}/{kv} d{d}");
        common::compare_all("attention backward, split", &case, dt, &["dq", "dk", "dv"], &want, &got);
    }
}

/// The decode kernels' variants (sw; hw with workgroup-memory reductions;
/// hw with subgroup reductions where the adapter has subgroups) in one
/// process, switched with `set_kernel_variant` / `set_subgroups` on one
/// device: decode attention over a paged cache (dense and block-sparse,
/// rows of 0 to 300 keys, so the hw kernel splits a row over chunks and
/// merges them) and the quantized matmul (int8, int4 asymmetric, 2:4) match
/// the CPU reference (f32, 1e-5), and every row computed alone is
/// bit-identical to the same row in the batch, per variant; the hardware
/// variants also with f16 inputs and the f16 feature where the device has
/// SHADER_F16 (f16 products in `cached_attn_hw(_sg)` and `qmm_hw(_sg)`,
/// against the CPU in f16, 1e-2). The full suites
/// (`cached_inference_ops…`, `qmatmul_matches…`, every dtype) run per
/// variant when it is forced by `DYNSPARSE_WGPU_KERNELS` and
/// `DYNSPARSE_WGPU_SUBGROUPS`.
#[test]
fn decode_kernel_variants_match_reference_in_one_process() {
    use dynsparse::attention::{self as attn, CachedPattern, KvTable};
    use dynsparse::backend::wgpu::KernelVariant;
    use dynsparse::ops;
    use dynsparse::quant::{QFormat, QMatrix};
    use dynsparse::util::rng::Rng;
    use dynsparse::{DType, Tensor};
    let Some((c, _)) = pair() else { return };
    let mut g = WgpuBackend::new(&AdapterPick::from_env().unwrap_or(AdapterPick::Any)).unwrap();
    let has_sg = g.set_subgroups(true).is_ok();
    if !has_sg {
        eprintln!("decode variants: {} has no usable subgroups; the subgroup kernels are skipped", g.device_name());
    }
    let has_f16 = g.kernel_features().f16;
    if !has_f16 {
        eprintln!("decode variants: {} has no SHADER_F16; the f16 kernels are skipped", g.device_name());
    }
    let (h, kv, d, page, block, n) = (4usize, 2usize, 32usize, 8usize, 16usize, 3usize);
    // (sequence, len): a long row (two chunks of 256 on the hw variant), short ones, an empty one.
    let seqs = [(0usize, 300usize), (1, 17), (2, 1), (1, 0)];
    let per = 320 / page;
    let slots = 3 * 320;
    let mut rng = Rng::new(41);
    let mut ids: Vec<u32> = (0..(3 * per) as u32).collect();
    for i in (1..ids.len()).rev() {
        ids.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let tab: Vec<u32> = seqs.iter().flat_map(|&(s, len)| [(s * per) as u32, len as u32]).collect();
    let sel: Vec<u32> = seqs
        .iter()
        .flat_map(|&(_, len)| {
            let own = len.saturating_sub(1) / block;
            [0, own / 2, own].map(|b| b as u32)
        })
        .collect();
    let r = seqs.len();
    let (q, kc, vc) = (rng.normal_vec(r * h * d), rng.normal_vec(slots * kv * d), rng.normal_vec(slots * kv * d));
    let (qm, qk) = (23usize, 72usize);
    let w: Vec<f32> = rng.normal_vec(37 * qk).into_iter().map(|x| x * 0.1).collect();
    let x = rng.normal_vec(qm * qk);
    let formats = [QFormat::Int8, QFormat::Int4 { group: 8, asym: true }, QFormat::Sparse24 { int8: true }];
    // q, k cache, v cache, row table, page ids, selected blocks.
    type Data<'a> = (&'a [f32], &'a [f32], &'a [f32], &'a [u32], &'a [u32], &'a [u32]);
    // Attention (dense, blocks) of the rows in `rows` (indices into seqs).
    fn run<B: dynsparse::Backend>(
        be: &B,
        data: Data<'_>,
        rows: std::ops::Range<usize>,
        dims: (usize, usize, usize, usize, usize, usize),
        dt: DType,
    ) -> Vec<Vec<f32>> {
        let (q, kc, vc, tab, ids, sel) = data;
        let (h, kv, d, page, block, n) = dims;
        let (r0, nr) = (rows.start, rows.len());
        let slots = kc.len() / (kv * d);
        let qt = Tensor::from_f32(be, &q[r0 * h * d..(r0 + nr) * h * d], &[nr, h, d], dt).unwrap();
        let kt = Tensor::from_f32(be, kc, &[slots, kv, d], dt).unwrap();
        let vt = Tensor::from_f32(be, vc, &[slots, kv, d], dt).unwrap();
        let table = Tensor::from_u32(be, &tab[2 * r0..2 * (r0 + nr)], &[nr, 2]).unwrap();
        let pages = Tensor::from_u32(be, ids, &[ids.len()]).unwrap();
        let idx = Tensor::from_u32(be, &sel[r0 * n..(r0 + nr) * n], &[nr, n]).unwrap();
        let kvt = KvTable { rows: &table, pages: &pages, page };
        let mut out = Vec::new();
        for pat in [CachedPattern::Dense, CachedPattern::Blocks { idx: &idx, block }] {
            let mut o = Tensor::from_f32(be, &vec![f32::NAN; nr * h * d], &[nr, h, d], dt).unwrap();
            attn::cached_attention(be, &qt, &kt, &vt, &kvt, pat, &mut o).unwrap();
            out.push(o.to_f32_vec(be).unwrap());
        }
        out
    }
    let qmm = |be: &dyn Fn(&QMatrix, std::ops::Range<usize>) -> Vec<f32>, m: &QMatrix| -> (Vec<f32>, Vec<f32>) {
        let all = be(m, 0..qm);
        let alone: Vec<f32> = (0..qm).flat_map(|i| be(m, i..i + 1)).collect();
        (all, alone)
    };
    let data = (&q[..], &kc[..], &vc[..], &tab[..], &ids[..], &sel[..]);
    let dims = (h, kv, d, page, block, n);
    let wants = [DType::F32, DType::F16].map(|dt| run(c, data, 0..r, dims, dt));
    let on_cpu = |m: &QMatrix, rows: std::ops::Range<usize>, dt: DType| -> Vec<f32> {
        let xt = Tensor::from_f32(c, &x[rows.start * qk..rows.end * qk], &[rows.len(), qk], dt).unwrap();
        let mut y = Tensor::empty(c, &[rows.len(), 37], dt).unwrap();
        ops::qmatmul(c, &xt, &ops::QWeight::upload(c, m).unwrap(), &mut y).unwrap();
        y.to_f32_vec(c).unwrap()
    };
    let mats: Vec<QMatrix> = formats.iter().map(|&f| QMatrix::quantize(&w, 37, qk, f).unwrap()).collect();
    let mut variants =
        vec![("sw", KernelVariant::Software, false, false), ("hw", KernelVariant::Hardware, false, false)];
    if has_sg {
        variants.push(("hw+sg", KernelVariant::Hardware, true, false));
    }
    if has_f16 {
        variants.push(("hw+f16", KernelVariant::Hardware, false, true));
        if has_sg {
            variants.push(("hw+sg+f16", KernelVariant::Hardware, true, true));
        }
    }
    for (name, var, sg, f16) in variants {
        use dynsparse::backend::wgpu::KernelFeatures;
        g.set_kernel_variant(var);
        g.set_kernel_features(KernelFeatures { subgroups: sg, f16 }).unwrap();
        let dt = if f16 { DType::F16 } else { DType::F32 };
        let want = &wants[f16 as usize];
        let got = run(&g, data, 0..r, dims, dt);
        for (pi, pat) in ["dense", "blocks"].iter().enumerate() {
            common::assert_close(&format!("{name} cached_attention {pat}"), &got[pi], &want[pi], dt);
            for i in 0..r {
                let alone = run(&g, data, i..i + 1, dims, dt);
                let w = h * d;
                let same = alone[pi].iter().zip(&got[pi][i * w..(i + 1) * w]).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{name} cached_attention {pat}: row {i} alone differs from the batch");
            }
        }
        let gb = &g;
        let on_gpu = |m: &QMatrix, rows: std::ops::Range<usize>| -> Vec<f32> {
            let xt = Tensor::from_f32(gb, &x[rows.start * qk..rows.end * qk], &[rows.len(), qk], dt).unwrap();
            let mut y = Tensor::empty(gb, &[rows.len(), 37], dt).unwrap();
            ops::qmatmul(gb, &xt, &ops::QWeight::upload(gb, m).unwrap(), &mut y).unwrap();
            y.to_f32_vec(gb).unwrap()
        };
        for (f, m) in formats.iter().zip(&mats) {
            let (all, alone) = qmm(&on_gpu, m);
            common::assert_close(&format!("{name} qmatmul {f}"), &all, &on_cpu(m, 0..qm, dt), dt);
            let same = all.iter().zip(&alone).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{name} qmatmul {f}: rows alone differ from the batch");
        }
    }
}

/// The indexer's training ops through the public op entry points (scores,
/// KL loss over the dense and a block pattern, backward), whole and over
/// tiles of query rows (q0 = 0 and q0 > 0, per-tile dk_i contributions
/// summed), against the CPU reference. Sizes fall off every tile of the
/// hardware kernels (16×16 score tiles, 32-row/16-key and 32-key/16-row
/// backward tiles): seq 77, d_I 6 (not a multiple of 4), 3 index heads, in
/// every float dtype; then d_I 64, the largest the hardware kernels take
/// (f32, where a lowered loop budget splits both backward loops).
fn indexer_training(c: &CpuBackend, g: &WgpuBackend) {
    use dynsparse::attention::{self as attn, Pattern};
    use dynsparse::util::rng::Rng;
    use dynsparse::{DType, Tensor};
    let (heads, kv, d, block) = (2usize, 1usize, 16usize, 16usize);
    let cases = [(2usize, 77usize, 3usize, 6usize, [(0usize, 30usize), (30, 77)]), (1, 70, 2, 64, [(0, 21), (21, 70)])];
    for (ci, &(batch, seq, hi, di, tiles)) in cases.iter().enumerate() {
        let dts = if ci == 0 { common::float_dtypes(c, g) } else { vec![DType::F32] };
        for dt in dts {
            let mut rng = Rng::new(common::seed("indexer-training-variants", dt, ci));
            let (qi, ki, w) = (
                rng.normal_vec(batch * seq * hi * di),
                rng.normal_vec(batch * seq * di),
                rng.normal_vec(batch * seq * hi),
            );
            let (q, k) = (rng.normal_vec(batch * seq * heads * d), rng.normal_vec(batch * seq * kv * d));
            let (sc, dsc) = (rng.normal_vec(batch * seq * seq), rng.normal_vec(batch * seq * seq));
            let (_, _, blk, nn) = common::attn_patterns(batch, seq, common::seed("indexer-training-pattern", dt, ci));
            let rows_of = |v: &[f32], q0: usize, q1: usize| -> Vec<f32> {
                (0..batch).flat_map(|bi| v[(bi * seq + q0) * seq..(bi * seq + q1) * seq].to_vec()).collect()
            };
            // Scores as (-inf mask, values with -inf as 0): a finite stand-in for -inf would
            // dominate the relative error and hide wrong finite scores.
            let split = |v: Vec<f32>| -> (Vec<f32>, Vec<f32>) {
                let inf = v.iter().map(|&x| if x == f32::NEG_INFINITY { 1.0 } else { 0.0 }).collect();
                (inf, v.into_iter().map(|x| if x == f32::NEG_INFINITY { 0.0 } else { x }).collect())
            };
            let names = ["scores", "kl loss dense", "kl dscores dense", "kl loss blocks", "kl dscores blocks"];
            let names = [&names[..], &["dq_i", "dk_i", "dw"]].concat();
            macro_rules! run {
                ($be:expr) => {{
                    let be = $be;
                    let (qt, kt, wt) = (
                        common::up(be, &qi, &[batch, seq, hi, di], dt),
                        common::up(be, &ki, &[batch, seq, di], dt),
                        common::up(be, &w, &[batch, seq, hi], dt),
                    );
                    let (qs, ks) = ([batch, seq, heads, d], [batch, seq, kv, d]);
                    let (aq, ak) = (common::up(be, &q, &qs, dt), common::up(be, &k, &ks, dt));
                    let bt = Tensor::from_u32(be, &blk, &[batch, seq, nn]).unwrap();
                    let mut outs: Vec<Vec<Vec<f32>>> = Vec::new();
                    // None: untiled; then each tile into full-size outputs.
                    for tiling in [None, Some(&tiles[..])] {
                        let parts: Vec<(usize, usize)> = tiling.map_or(vec![(0, seq)], |t| t.to_vec());
                        let mut scores = vec![0.0; batch * seq * seq];
                        let mut kl = Vec::new();
                        for dense in [true, false] {
                            let pat = || if dense { Pattern::Dense } else { Pattern::Blocks { idx: &bt, block } };
                            let mut o = common::poisoned(be, &qs, dt);
                            let mut lse = common::poisoned(be, &[batch, heads, seq], DType::F32);
                            attn::attention(be, &aq, &ak, &ak, pat(), &mut o, &mut lse).unwrap();
                            let mut loss = common::poisoned(be, &[batch, seq], DType::F32);
                            let mut ds = vec![0.0; batch * seq * seq];
                            for &(q0, q1) in &parts {
                                let tile = [batch, q1 - q0, seq];
                                let sc_t = common::up(be, &rows_of(&sc, q0, q1), &tile, DType::F32);
                                let mut ds_t = common::poisoned(be, &tile, DType::F32);
                                attn::indexer_kl_rows(
                                    be,
                                    &aq,
                                    &ak,
                                    &lse,
                                    &sc_t,
                                    pat(),
                                    q0,
                                    RowSample::ALL,
                                    &mut loss,
                                    &mut ds_t,
                                )
                                .unwrap();
                                let mut s_t = common::poisoned(be, &tile, DType::F32);
                                attn::indexer_scores_rows(be, &qt, &kt, &wt, q0, &mut s_t).unwrap();
                                for (dst, v) in
                                    [(&mut ds, common::down(be, &ds_t)), (&mut scores, common::down(be, &s_t))]
                                {
                                    for bi in 0..batch {
                                        let n = (q1 - q0) * seq;
                                        dst[(bi * seq + q0) * seq..(bi * seq + q1) * seq]
                                            .copy_from_slice(&v[bi * n..(bi + 1) * n]);
                                    }
                                }
                            }
                            kl.push(common::down(be, &loss));
                            kl.push(ds);
                        }
                        let mut dq = common::poisoned(be, &[batch, seq, hi, di], dt);
                        let mut dw = common::poisoned(be, &[batch, seq, hi], dt);
                        let mut dk = vec![0.0f32; batch * seq * di];
                        for &(q0, q1) in &parts {
                            let tile = [batch, q1 - q0, seq];
                            let dsc_t = common::up(be, &rows_of(&dsc, q0, q1), &tile, DType::F32);
                            let mut dk_t = common::poisoned(be, &[batch, seq, di], dt);
                            attn::indexer_backward_rows(be, &qt, &kt, &wt, &dsc_t, q0, &mut dq, &mut dk_t, &mut dw)
                                .unwrap();
                            dk.iter_mut().zip(common::down(be, &dk_t)).for_each(|(a, x)| *a += x);
                        }
                        let (inf, scores) = split(scores);
                        let mut out = vec![scores];
                        out.extend(kl);
                        out.extend([common::down(be, &dq), dk, common::down(be, &dw), inf]);
                        outs.push(out);
                    }
                    outs
                }};
            }
            let (want, got) = (run!(c), run!(g));
            for (ti, tiled) in ["untiled", "tiled"].iter().enumerate() {
                let case = format!("{tiled} b{batch} t{seq} H_I{hi} d_I{di}");
                let inf = names.len();
                assert_eq!(got[ti][inf], want[ti][inf], "indexer training {case} [{dt}]: -inf scores differ");
                common::compare_all("indexer training", &case, dt, &names, &want[ti], &got[ti]);
            }
        }
    }
}

/// Every kernel variant of the hot kernels against the CPU reference, in one
/// process on one device: the hardware variant with every optional-feature
/// set the device offers (subgroups on/off × f16 on/off; f16 in effect for
/// f16 inputs), and the software variant without features — except the
/// device's own feature set, which the rest of the suite runs (plainly: the
/// software variant on lavapipe; under `DYNSPARSE_WGPU_KERNELS=hw`, which CI
/// runs too, the hardware one). Matmul, attention forward and backward
/// (dense, token and block patterns; the tiled backward's f16 path with f16
/// on), the indexer's pooled scores, its training ops (scores, KL loss,
/// backward, whole and over query tiles) and the decode step's ops (rope_rows,
/// cache_write, the cached indexer's pooled scores, cached_select, decode
/// attention; the selection also on finite scores,
/// `decode_selection_finite`), in f32, f16 and bf16. A feature set the device lacks prints
/// that it skipped. (The quantized matmul's variants run in
/// `decode_kernel_variants_match_reference_in_one_process`: its full suite
/// per variant would take this test from seconds to minutes on lavapipe.)
#[test]
fn every_kernel_variant_and_feature_set_matches_reference() {
    use dynsparse::backend::wgpu::{KernelFeatures, KernelVariant};
    let Some((c, _)) = pair() else { return };
    let pick = AdapterPick::from_env().unwrap_or(AdapterPick::Any);
    let mut g = WgpuBackend::new(&pick).expect("the shared backend opened, so a second one opens too");
    let dev = g.kernel_features();
    let mut combos: Vec<(KernelVariant, KernelFeatures)> =
        KernelFeatures::every().into_iter().filter(|f| *f != dev).map(|f| (KernelVariant::Hardware, f)).collect();
    if dev != KernelFeatures::NONE {
        combos.push((KernelVariant::Software, KernelFeatures::NONE));
    }
    let mut ran = 0;
    for (variant, f) in combos {
        if !dev.contains(f) {
            eprintln!("skipped: {variant:?} kernels with {f} (the device has {dev})");
            continue;
        }
        g.set_kernel_variant(variant);
        g.set_kernel_features(f).unwrap();
        eprintln!("wgpu device {}: {variant:?} kernels, {f}", g.device_name());
        common::matmul(c, &g);
        common::attention(c, &g);
        indexer_finite(c, &g);
        indexer_training(c, &g);
        common::cached_ops(c, &g);
        decode_selection_finite(c, &g);
        ran += 1;
    }
    // Without optional features the device's own set is the only one, run by the rest of the suite.
    assert!(ran >= 1 || dev == KernelFeatures::NONE, "no variant ran on a device with {dev}");
    // Asking for a feature the device lacks is an error, not a silent fallback.
    if dev != KernelFeatures::ALL {
        assert!(g.set_kernel_features(KernelFeatures::ALL).is_err());
    }
}

/// Every split path of the attention kernels: with the loop budget lowered
/// (`set_attention_loop_budget`), the forward splits its key loop, the dq
/// pass (untiled, and the hardware variant's tiled `attn_bwd_dq_tiled_hw`,
/// which at the default budget splits only past ~3 000 keys) and the dk/dv
/// pass split theirs, and partials are combined or summed; each variant and
/// feature set against the CPU reference (head_dim 64; f32 without
/// features, f16 with the device's features, so the f16 kernels split too).
/// The indexer's training ops likewise (with d_I 64 both backward loops of
/// both variants split).
/// features, f16 with the device's features, so the f16 kernels — the
/// forward's and, since issue 14, `attn_bwd_dq_tiled_hw`'s and
/// `attn_bwd_dkdv_tiled_hw`'s f16 tiles — split too).
#[test]
fn attention_split_paths_match_reference_in_every_variant() {
    use dynsparse::DType;
    use dynsparse::backend::wgpu::{KernelFeatures, KernelVariant};
    let Some((c, _)) = pair() else { return };
    let pick = AdapterPick::from_env().unwrap_or(AdapterPick::Any);
    let mut g = WgpuBackend::new(&pick).expect("the shared backend opened, so a second one opens too");
    g.set_attention_loop_budget(Some(600));
    let dev = g.kernel_features();
    for (variant, f, dt) in [
        (KernelVariant::Software, KernelFeatures::NONE, DType::F32),
        (KernelVariant::Hardware, KernelFeatures::NONE, DType::F32),
        (KernelVariant::Hardware, dev, DType::F16),
    ] {
        g.set_kernel_variant(variant);
        g.set_kernel_features(f).unwrap();
        eprintln!("wgpu device {}: {variant:?} kernels, {f}, {dt}, loop budget 600", g.device_name());
        split_backward(c, &g, dt, 64);
        indexer_training(c, &g);
    }
}

/// Views bind byte ranges: reading one view and writing another of the same
/// buffer in one dispatch is a wgpu validation error, which must come back
/// as an error (a fresh device, so the failed batch cannot touch other tests).
/// Training on flat buffers never does it: it matches per-tensor training bit for bit.
#[test]
fn views_on_wgpu_alias_clearly_and_flat_training_matches_per_tensor() {
    use dynsparse::data::synthetic::{SyntheticConfig, generate};
    use dynsparse::model::{AttentionMode, Model, ModelConfig};
    use dynsparse::train::{LrSchedule, MemoryReport, TrainConfig, Trainer};
    use dynsparse::{DType, Tensor, ops};
    let Some((_, g)) = pair() else { return };
    let pick = AdapterPick::from_env().unwrap_or(AdapterPick::Any);
    let fresh = WgpuBackend::new(&pick).unwrap();
    let flat = Tensor::<WgpuBackend>::zeros(&fresh, &[512], DType::F32).unwrap();
    let x = Tensor::view(&fresh, &flat, 0, &[256]).unwrap();
    let mut y = Tensor::view(&fresh, &flat, 256, &[256]).unwrap();
    let r = ops::axpby(&fresh, 1.0, &x, 1.0, &mut y).and_then(|_| fresh.synchronize());
    assert!(r.is_err(), "one buffer bound read-only and read-write in one dispatch must be an error");

    let m = ModelConfig {
        n_layers: 2,
        n_heads: 2,
        n_kv_heads: 1,
        d_model: 32,
        vocab: 256,
        context: 32,
        mlp_ratio: 2,
        rope_theta: 10000.0,
        attention: AttentionMode::Sparse { block: 8, keep_blocks: 2, index_heads: 2, index_dim: 8 },
    };
    let data = generate(5, 8_000, SyntheticConfig::default());
    for precision in [DType::F32, DType::BF16] {
        let t = TrainConfig {
            steps: 3,
            batch: 2,
            seq: 32,
            accum: 2,
            precision,
            lr: LrSchedule { lr: 3e-3, min_lr: 3e-4, warmup_steps: 1, total_steps: 3 },
            beta1: 0.9,
            beta2: 0.95,
            weight_decay: 0.1,
            grad_clip: 1.0,
            warmup_frac: 0.0,
            ramp_frac: 0.5,
            kl_every: 1,
            seed: 3,
        };
        let mut a = Trainer::new(g, Model::new(g, m, precision, 1).unwrap(), t, &mut MemoryReport::default()).unwrap();
        let mut b =
            Trainer::new_per_tensor(g, Model::new(g, m, precision, 1).unwrap(), t, &mut MemoryReport::default())
                .unwrap();
        for step in 0..3 {
            let (sa, sb) = (a.train_step(g, &data).unwrap(), b.train_step(g, &data).unwrap());
            assert_eq!(
                sa.loss.to_bits(),
                sb.loss.to_bits(),
                "{precision} step {step}: loss {} vs {}",
                sa.loss,
                sb.loss
            );
        }
        assert_eq!(a.master_values(g).unwrap(), b.master_values(g).unwrap(), "{precision}: weights");
        assert_eq!(a.moments(g).unwrap(), b.moments(g).unwrap(), "{precision}: moments");
    }
}
