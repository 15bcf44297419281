//! Choosing a backend at run time (`--backend auto|cpu|wgpu|cuda`).
//!
//! `auto` prefers CUDA (when compiled in and a device answers), then a
//! *hardware* wgpu adapter, then the CPU backend. A software Vulkan adapter
//! (lavapipe, SwiftShader) is used only when asked for by `--backend wgpu` or
//! `DYNSPARSE_WGPU_ADAPTER`, because it runs ~100× slower than the CPU backend.

use super::Backend;
use super::cpu::CpuBackend;
use crate::error::Result;

/// What the user asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum BackendChoice {
    /// CUDA if a device answers, else a hardware wgpu adapter, else the CPU.
    #[default]
    Auto,
    /// The pure-Rust reference backend.
    Cpu,
    /// WGSL compute shaders through wgpu (Vulkan, Metal, DX12).
    Wgpu,
    /// CUDA through cudarc (needs the `cuda` feature and an NVIDIA driver).
    Cuda,
}

/// One of the compiled-in backends, picked at run time.
#[allow(clippy::large_enum_variant)] // one long-lived value per process
pub enum AnyBackend {
    Cpu(CpuBackend),
    #[cfg(feature = "wgpu")]
    Wgpu(super::wgpu::WgpuBackend),
    #[cfg(feature = "cuda")]
    Cuda(super::cuda::CudaBackend),
}

/// A chosen backend and why it was chosen.
pub struct Selection {
    pub backend: AnyBackend,
    pub reason: String,
}

/// Work that is generic over the backend; [`run_on`] calls it with the concrete one.
pub trait BackendJob {
    type Output;
    fn run<B: Backend>(self, be: &B) -> Result<Self::Output>;
}

/// Runs `job` on whichever backend `any` holds.
pub fn run_on<J: BackendJob>(any: &AnyBackend, job: J) -> Result<J::Output> {
    match any {
        AnyBackend::Cpu(b) => job.run(b),
        #[cfg(feature = "wgpu")]
        AnyBackend::Wgpu(b) => job.run(b),
        #[cfg(feature = "cuda")]
        AnyBackend::Cuda(b) => job.run(b),
    }
}

impl AnyBackend {
    pub fn kind(&self) -> super::BackendKind {
        match self {
            AnyBackend::Cpu(b) => b.kind(),
            #[cfg(feature = "wgpu")]
            AnyBackend::Wgpu(b) => b.kind(),
            #[cfg(feature = "cuda")]
            AnyBackend::Cuda(b) => b.kind(),
        }
    }
    /// [`Backend::max_binding_bytes`] of the backend held.
    pub fn max_binding_bytes(&self) -> u64 {
        match self {
            AnyBackend::Cpu(b) => b.max_binding_bytes(),
            #[cfg(feature = "wgpu")]
            AnyBackend::Wgpu(b) => b.max_binding_bytes(),
            #[cfg(feature = "cuda")]
            AnyBackend::Cuda(b) => b.max_binding_bytes(),
        }
    }
    pub fn device_name(&self) -> String {
        match self {
            AnyBackend::Cpu(b) => b.device_name(),
            #[cfg(feature = "wgpu")]
            AnyBackend::Wgpu(b) => b.device_name(),
            #[cfg(feature = "cuda")]
            AnyBackend::Cuda(b) => b.device_name(),
        }
    }
}

/// Builds the backend the user asked for, or explains why it cannot.
pub fn select(choice: BackendChoice) -> Result<Selection> {
    match choice {
        BackendChoice::Cpu => Ok(cpu("asked for with --backend cpu".into())),
        BackendChoice::Wgpu => wgpu_explicit(),
        BackendChoice::Cuda => cuda_explicit(),
        BackendChoice::Auto => {
            let mut why = Vec::new();
            match cuda_auto() {
                Ok(sel) => return Ok(sel),
                Err(e) => why.push(e),
            }
            match wgpu_auto() {
                Ok(sel) => return Ok(sel),
                // An adapter named in DYNSPARSE_WGPU_ADAPTER is an explicit request: falling
                // back to the CPU would run somewhere the user did not ask for, silently.
                Err(e) if adapter_env().is_some() => {
                    return Err(crate::error::Error::Unavailable(format!(
                        "DYNSPARSE_WGPU_ADAPTER=`{}`: {e}; unset it to let --backend auto choose",
                        adapter_env().unwrap_or_default()
                    )));
                }
                Err(e) => why.push(e),
            }
            Ok(cpu(format!("auto: {}", why.join("; "))))
        }
    }
}

/// `DYNSPARSE_WGPU_ADAPTER`, when set to something.
fn adapter_env() -> Option<String> {
    std::env::var("DYNSPARSE_WGPU_ADAPTER").ok().filter(|s| !s.trim().is_empty())
}

fn cpu(reason: String) -> Selection {
    Selection { backend: AnyBackend::Cpu(CpuBackend::new()), reason }
}

#[cfg(feature = "cuda")]
fn cuda_explicit() -> Result<Selection> {
    let be = super::cuda::CudaBackend::new(0)?;
    Ok(Selection { backend: AnyBackend::Cuda(be), reason: "asked for with --backend cuda".into() })
}

#[cfg(not(feature = "cuda"))]
fn cuda_explicit() -> Result<Selection> {
    Err(crate::error::Error::Unavailable(
        "this build has no CUDA backend; rebuild with `cargo build --release --features cuda`".into(),
    ))
}

#[cfg(feature = "cuda")]
fn cuda_auto() -> Result<Selection, String> {
    match super::cuda::probe() {
        Ok(devs) if !devs.is_empty() => match super::cuda::CudaBackend::new(0) {
            Ok(be) => Ok(Selection {
                backend: AnyBackend::Cuda(be),
                reason: format!("auto: CUDA device 0 answers ({})", devs[0].name),
            }),
            Err(e) => Err(format!("CUDA device 0 failed to start ({e})")),
        },
        Ok(_) => Err("CUDA driver present but no device".into()),
        Err(why) => Err(format!("no CUDA ({why})")),
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_auto() -> Result<Selection, String> {
    Err("CUDA not compiled in".into())
}

#[cfg(feature = "wgpu")]
fn wgpu_explicit() -> Result<Selection> {
    use super::wgpu::{AdapterPick, WgpuBackend};
    let pick = AdapterPick::from_env().unwrap_or(AdapterPick::Any);
    let be = WgpuBackend::new(&pick)?;
    let reason = format!("asked for with --backend wgpu ({pick})");
    Ok(Selection { backend: AnyBackend::Wgpu(be), reason })
}

#[cfg(not(feature = "wgpu"))]
fn wgpu_explicit() -> Result<Selection> {
    Err(crate::error::Error::Unavailable(
        "this build has no wgpu backend; rebuild with the `wgpu` feature (on by default)".into(),
    ))
}

#[cfg(feature = "wgpu")]
fn wgpu_auto() -> Result<Selection, String> {
    use super::wgpu::{AdapterPick, WgpuBackend};
    let (pick, why) = match AdapterPick::from_env() {
        Some(p) => (p, "DYNSPARSE_WGPU_ADAPTER"),
        None => (AdapterPick::HardwareOnly, "a hardware adapter answers"),
    };
    match WgpuBackend::new(&pick) {
        Ok(be) => {
            let reason = format!("auto: {why} ({})", be.device_name());
            Ok(Selection { backend: AnyBackend::Wgpu(be), reason })
        }
        Err(e) => {
            Err(format!("no wgpu adapter to use ({})", e.to_string().trim_start_matches("backend unavailable: wgpu: ")))
        }
    }
}

#[cfg(not(feature = "wgpu"))]
fn wgpu_auto() -> Result<Selection, String> {
    Err("wgpu not compiled in".into())
}
