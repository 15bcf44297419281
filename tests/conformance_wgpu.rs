//! Conformance of the wgpu backend against the CPU reference.
//!
//! Uses any adapter, software ones included (Mesa lavapipe in CI). With no
//! adapter the tests print "skipped"; `DYNSPARSE_REQUIRE_WGPU=1` turns that
//! into a failure, and `DYNSPARSE_REQUIRE_F16=1` also demands SHADER_F16 so
//! the f16 variants really run (CI sets both).
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
fn wgpu_runs_the_half_precision_variants_when_required() {
    let Some((_, g)) = pair() else { return };
    let need = std::env::var("DYNSPARSE_REQUIRE_F16").is_ok_and(|v| v == "1");
    eprintln!(
        "wgpu device {}: f16 {}, bf16 {}",
        g.device_name(),
        g.supports(dynsparse::DType::F16),
        g.supports(dynsparse::DType::BF16)
    );
    assert!(g.supports(dynsparse::DType::BF16), "bf16 storage is always available on wgpu");
    if need {
        assert!(g.supports(dynsparse::DType::F16), "DYNSPARSE_REQUIRE_F16=1 but {} has no SHADER_F16", g.device_name());
    }
}
