//! Conformance of the CUDA backend: against the CPU reference, and directly
//! against the wgpu backend when both run on one machine.
//!
//! With no CUDA driver or device the tests print "skipped";
//! `DYNSPARSE_REQUIRE_CUDA=1` turns that into a failure (the GPU check sets it).
#![cfg(feature = "cuda")]

mod common;

use dynsparse::backend::cpu::CpuBackend;
use dynsparse::backend::cuda::CudaBackend;
use std::sync::OnceLock;

fn cuda() -> Option<&'static CudaBackend> {
    static GPU: OnceLock<Result<CudaBackend, String>> = OnceLock::new();
    match GPU.get_or_init(|| CudaBackend::new(0).map_err(|e| e.to_string())) {
        Ok(g) => Some(g),
        Err(why) => {
            common::skip("cuda", why);
            None
        }
    }
}

fn pair() -> Option<(&'static CpuBackend, &'static CudaBackend)> {
    static CPU: OnceLock<CpuBackend> = OnceLock::new();
    cuda().map(|g| (CPU.get_or_init(CpuBackend::new), g))
}

conformance_tests!(pair);

/// CUDA compared with wgpu directly (the user's cross-backend ask).
#[cfg(feature = "wgpu")]
mod cuda_vs_wgpu {
    use super::*;
    use dynsparse::backend::wgpu::{AdapterPick, WgpuBackend};

    fn pair() -> Option<(&'static WgpuBackend, &'static CudaBackend)> {
        static W: OnceLock<Result<WgpuBackend, String>> = OnceLock::new();
        let g = cuda()?;
        match W.get_or_init(|| {
            WgpuBackend::new(&AdapterPick::from_env().unwrap_or(AdapterPick::Any)).map_err(|e| e.to_string())
        }) {
            Ok(w) => Some((w, g)),
            Err(why) => {
                common::skip("wgpu", why);
                None
            }
        }
    }

    conformance_tests!(pair);
}
