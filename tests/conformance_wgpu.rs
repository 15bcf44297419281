//! Conformance of the wgpu backend against the CPU reference.
//!
//! Uses any adapter, software ones included (Mesa lavapipe in CI). With no
//! adapter the tests print "skipped"; `DYNSPARSE_REQUIRE_WGPU=1` turns that
//! into a failure (CI sets it). Every test runs in f32, f16 and bf16.
#![cfg(feature = "wgpu")]

mod common;

use dynsparse::Backend;
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

/// Every kernel variant of the hot kernels against the CPU reference, in one
/// process on one device: the hardware variant with every optional-feature
/// set the device offers (subgroups on/off × f16 on/off; f16 in effect for
/// f16 inputs), and the software variant without features — except the
/// device's own feature set, which the rest of the suite runs (plainly: the
/// software variant on lavapipe; under `DYNSPARSE_WGPU_KERNELS=hw`, which CI
/// runs too, the hardware one). Matmul, attention forward and backward
/// (dense, token and block patterns), and the indexer's pooled scores, in
/// f32, f16 and bf16. A feature set the device lacks prints that it skipped.
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
    }
}
