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
