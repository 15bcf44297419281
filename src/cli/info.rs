//! `dynsparse info`: what this build and this machine offer.

use crate::outln;
use dynsparse::Result;
use dynsparse::backend::{BackendChoice, select};
use dynsparse::util::machine::host_description;

pub fn run(choice: BackendChoice) -> Result<()> {
    // An explicitly requested backend must exist: fail with one clear line otherwise.
    if choice != BackendChoice::Auto {
        let sel = select(choice)?;
        outln!("backend {}: {} ({})", sel.backend.kind(), sel.backend.device_name(), sel.reason);
        #[cfg(feature = "cuda")]
        if choice == BackendChoice::Cuda {
            outln!("{}", cuda_driver_line());
        }
        return Ok(());
    }
    outln!("dynsparse {}", env!("CARGO_PKG_VERSION"));
    let mut compiled = vec!["cpu"];
    if cfg!(feature = "wgpu") {
        compiled.push("wgpu");
    }
    if cfg!(feature = "cuda") {
        compiled.push("cuda");
    }
    outln!("compiled backends: {}", compiled.join(", "));
    outln!("\ncpu: {}", host_description());
    wgpu_section();
    cuda_section();
    let sel = select(BackendChoice::Auto)?;
    outln!("\n--backend auto chooses: {} — {} ({})", sel.backend.kind(), sel.backend.device_name(), sel.reason);
    Ok(())
}

#[cfg(feature = "wgpu")]
fn wgpu_section() {
    use dynsparse::backend::wgpu::enumerate_adapters;
    let adapters = enumerate_adapters();
    if adapters.is_empty() {
        outln!(
            "\nwgpu: no adapter found: no Vulkan, Metal or DX12 driver answered \
             (on Linux without a GPU: `apt-get install mesa-vulkan-drivers` for the lavapipe software adapter)"
        );
        return;
    }
    outln!("\nwgpu adapters:");
    for a in adapters {
        let (lo, hi) = a.subgroup_sizes;
        outln!(
            "  [{}] {} — {} {}{}, driver {}\n      f16 {}, subgroups {} ({lo}..{hi}), {}",
            a.index,
            a.name,
            a.backend,
            a.device_type,
            if a.is_software { " (software: used only when asked for)" } else { "" },
            if a.driver.is_empty() { "?" } else { &a.driver },
            yes(a.shader_f16),
            yes(a.subgroups),
            a.limits
        );
    }
}

#[cfg(not(feature = "wgpu"))]
fn wgpu_section() {
    outln!("\nwgpu: not compiled in (build with the default `wgpu` feature)");
}

#[cfg(feature = "cuda")]
fn cuda_driver_line() -> String {
    match dynsparse::backend::cuda::driver_version() {
        Ok((ma, mi)) => format!("cuda driver: CUDA {ma}.{mi} (loads PTX from NVRTC ≤ {ma}.{mi}, and CUBIN)"),
        Err(why) => format!("cuda driver: version unknown ({why})"),
    }
}

#[cfg(feature = "cuda")]
fn cuda_section() {
    match dynsparse::backend::cuda::probe() {
        Ok(devs) if devs.is_empty() => outln!("\ncuda: driver found, but no device"),
        Ok(devs) => {
            outln!("\n{}", cuda_driver_line());
            outln!("cuda devices:");
            for d in devs {
                let (ma, mi) = d.compute_capability;
                outln!(
                    "  [{}] {} — sm_{ma}{mi}, {:.1} GiB",
                    d.ordinal,
                    d.name,
                    d.total_memory as f64 / (1u64 << 30) as f64
                );
            }
        }
        Err(why) => outln!("\ncuda: unavailable: {why}"),
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_section() {
    outln!("\ncuda: not compiled in (build with `--features cuda`)");
}

#[cfg(feature = "wgpu")]
fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}
