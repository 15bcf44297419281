//! CUDA checks that need a device (the GPU check runs them; without a device
//! they print "skipped", or fail under `DYNSPARSE_REQUIRE_CUDA=1`).
#![cfg(feature = "cuda")]

mod common;

use dynsparse::backend::cuda::{CudaBackend, driver_version, kernels};
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

#[test]
fn the_memory_pool_keeps_freed_memory() {
    let Some(g) = cuda() else { return };
    // The default (0) hands memory back to the driver at every synchronisation.
    assert_eq!(g.pool_release_threshold().unwrap(), u64::MAX);
}

#[test]
fn kernels_load_from_a_cubin_when_one_matches_the_device() {
    let Some(g) = cuda() else { return };
    let (major, minor) = driver_version().unwrap();
    let arch = g.info().compute_capability;
    eprintln!("driver CUDA {major}.{minor}, device {} sm_{}{}", g.info().name, arch.0, arch.1);
    assert!(major >= 12 || (major == 11 && minor >= 8), "driver CUDA {major}.{minor}");
    g.warm_up("elementwise").unwrap();
    let src = g.loaded_from("elementwise").expect("loaded");
    eprintln!("elementwise loaded from {src:?}");
    let cubin_possible = kernels::nvrtc_status().is_ok()
        || kernels::cache_dir().is_some_and(|d| {
            kernels::shipped(&d, "elementwise")
                .iter()
                .any(|(a, f)| *f == kernels::Format::Cubin && a.0 == arch.0 && *a <= arch)
        });
    if cubin_possible {
        assert!(
            matches!(
                src,
                kernels::Source::Nvrtc { format: kernels::Format::Cubin, .. }
                    | kernels::Source::Cached { format: kernels::Format::Cubin, .. }
            ),
            "a CUBIN was available but {src:?} was loaded"
        );
    }
}
