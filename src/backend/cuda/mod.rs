//! The CUDA backend: cudarc with dynamic loading (builds without a toolkit or
//! a driver), kernels from `kernels/*.cu` compiled at first use by NVRTC
//! ([`kernels`]), GEMMs through cuBLAS (f16/bf16 on tensor cores with f32
//! accumulation; f32 in true f32 unless TF32 is asked for).
//!
//! One stream per backend instance: every op, copy and free is ordered on it,
//! so cudarc's per-buffer event tracking is turned off. Ops are asynchronous;
//! [`Backend::download`] and [`Backend::synchronize`] wait.
//!
//! Which op runs on which kernel: see `ops.rs` (one function per op, named
//! after the op) and the math comment above each kernel in `kernels/`.

mod cached;
pub mod kernels;
mod ops;
mod pinned;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
};

use super::MemoryCounter;
use crate::DType;
use crate::error::{Error, Result};

/// One CUDA device as the driver reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    /// `(major, minor)`, e.g. `(9, 0)` for an H100.
    pub compute_capability: (i32, i32),
    /// Bytes of device memory.
    pub total_memory: usize,
}

/// Checks that the driver library loads, before any cudarc call that would panic without it.
fn driver_present() -> Result<(), String> {
    // SAFETY: only tries to dlopen libcuda by its usual names; no symbol is called.
    if unsafe { cudarc::driver::sys::is_culib_present() } {
        Ok(())
    } else {
        Err("no NVIDIA driver found (libcuda.so could not be loaded)".into())
    }
}

fn info_of(ordinal: usize) -> Result<DeviceInfo, String> {
    use cudarc::driver::result::device;
    use cudarc::driver::sys::CUdevice_attribute as A;
    let dev = device::get(ordinal as i32).map_err(|e| format!("device {ordinal}: {e}"))?;
    let name = device::get_name(dev).map_err(|e| format!("device {ordinal}: {e}"))?;
    // SAFETY: `dev` is a valid device handle returned by the driver just above.
    let (total, major, minor) = unsafe {
        (
            device::total_mem(dev),
            device::get_attribute(dev, A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
            device::get_attribute(dev, A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR),
        )
    };
    let err = |e: cudarc::driver::DriverError| format!("device {ordinal}: {e}");
    Ok(DeviceInfo {
        ordinal,
        name,
        compute_capability: (major.map_err(err)?, minor.map_err(err)?),
        total_memory: total.map_err(err)?,
    })
}

/// Lists the CUDA devices, or says why there are none to list.
pub fn probe() -> Result<Vec<DeviceInfo>, String> {
    driver_present()?;
    let n = CudaContext::device_count().map_err(|e| format!("the CUDA driver did not initialise: {e}"))?;
    (0..n.max(0) as usize).map(info_of).collect()
}

/// A device allocation: the bytes, their device address, and the counter to report to.
pub struct CudaBuffer {
    slice: CudaSlice<u8>,
    ptr: u64,
    bytes: usize,
    mem: MemoryCounter,
}

impl Drop for CudaBuffer {
    fn drop(&mut self) {
        self.mem.free(self.bytes);
    }
}

impl CudaBuffer {
    /// Bytes this buffer was allocated with.
    pub fn len_bytes(&self) -> usize {
        self.bytes
    }
}

/// The CUDA backend on one device (a small handle: the state is boxed).
pub struct CudaBackend {
    inner: Box<Inner>,
}

impl std::ops::Deref for CudaBackend {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.inner
    }
}

/// The state of a [`CudaBackend`].
pub struct Inner {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// cuBLAS handles must not be used by two threads at once: one lock per backend.
    blas: Option<Mutex<CudaBlas>>,
    info: DeviceInfo,
    mem: MemoryCounter,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    /// Loaded kernels with the byte sizes of their parameters (from the PTX).
    funcs: Mutex<HashMap<String, (CudaFunction, Vec<usize>)>>,
    tf32: AtomicBool,
    /// Shared memory a block may opt into (bytes).
    smem_optin: usize,
    /// Page-locked staging of host transfers.
    stage: pinned::Staging,
}

/// One kernel argument.
#[derive(Clone, Copy)]
pub(crate) enum Arg {
    /// A device address (0 for an unused pointer).
    P(u64),
    U(u32),
    F(f32),
    Attn(ops::AttnArgs),
}

impl Arg {
    /// Bytes this argument occupies in the kernel's parameter list.
    fn size(&self) -> usize {
        match self {
            Arg::P(_) => 8,
            Arg::U(_) | Arg::F(_) => 4,
            Arg::Attn(_) => std::mem::size_of::<ops::AttnArgs>(),
        }
    }
}

fn dev_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Device(format!("{what}: {e}"))
}

impl CudaBackend {
    /// Opens device `ordinal`. Without a driver or device this is an
    /// [`Error::Unavailable`] saying so in one sentence.
    pub fn new(ordinal: usize) -> Result<Self> {
        driver_present().map_err(Error::Unavailable)?;
        let count = CudaContext::device_count()
            .map_err(|e| Error::Unavailable(format!("the CUDA driver is present but did not initialise ({e})")))?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::Unavailable(format!("CUDA device {ordinal} does not exist ({count} device(s) found)")));
        }
        let info = info_of(ordinal).map_err(Error::Unavailable)?;
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| Error::Unavailable(format!("CUDA device {ordinal} failed to start: {e}")))?;
        // SAFETY: this backend uses a single stream for all work, copies and
        // frees, so stream order alone keeps every buffer alive and consistent;
        // the per-buffer events cudarc would record are not needed.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(|e| dev_err("creating a stream", e))?;
        // SAFETY: only tries to dlopen libcublas by its usual names.
        let blas = if unsafe { cudarc::cublas::sys::is_culib_present() } {
            match CudaBlas::new(stream.clone()) {
                Ok(b) => Some(Mutex::new(b)),
                Err(e) => {
                    log::warn!("cuBLAS did not start ({e:?}); matmul uses the fallback kernel");
                    None
                }
            }
        } else {
            log::warn!("libcublas not found; matmul uses the (slow) fallback kernel");
            None
        };
        let tf32 = std::env::var("DYNSPARSE_CUDA_TF32").is_ok_and(|v| v == "1");
        let smem_optin = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map(|v| v.max(0) as usize)
            .unwrap_or(48 * 1024);
        Ok(CudaBackend {
            inner: Box::new(Inner {
                ctx,
                stream,
                blas,
                info,
                mem: MemoryCounter::default(),
                modules: Mutex::new(HashMap::new()),
                funcs: Mutex::new(HashMap::new()),
                tf32: AtomicBool::new(tf32),
                smem_optin,
                stage: pinned::Staging::default(),
            }),
        })
    }

    /// The device this backend runs on.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// Lets f32 matmuls use TF32 tensor cores (off by default: f32 means f32).
    /// `DYNSPARSE_CUDA_TF32=1` turns it on at creation.
    pub fn set_allow_tf32(&self, on: bool) {
        self.tf32.store(on, Ordering::Relaxed);
    }

    pub fn allow_tf32(&self) -> bool {
        self.tf32.load(Ordering::Relaxed)
    }

    /// Whether matmul runs through cuBLAS (else through the fallback kernel).
    pub fn has_cublas(&self) -> bool {
        self.blas.is_some()
    }

    /// Compiles (or fetches from the caches) and loads a whole kernel family,
    /// e.g. to pay the compile cost before timing.
    pub fn warm_up(&self, family: &'static str) -> Result<()> {
        self.module(family).map(|_| ())
    }

    fn module(&self, family: &'static str) -> Result<(Arc<CudaModule>, String)> {
        let mut mods = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        let arch = self.info.compute_capability;
        // A device newer than this NVRTC knows still runs sm_90 PTX (JIT).
        let ptx = match kernels::ptx_for(family, arch) {
            Ok(p) => p,
            Err(first) if arch > (9, 0) => kernels::ptx_for(family, (9, 0)).map_err(|_| Error::Device(first))?,
            Err(e) => return Err(Error::Device(e)),
        };
        if let Some(m) = mods.get(family) {
            return Ok((m.clone(), ptx));
        }
        let m = self
            .ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(ptx.clone()))
            .map_err(|e| dev_err(&format!("loading kernels/{family}.cu"), e))?;
        mods.insert(family, m.clone());
        Ok((m, ptx))
    }

    fn func(&self, family: &'static str, name: &str) -> Result<(CudaFunction, Vec<usize>)> {
        if let Some(f) = self.funcs.lock().unwrap_or_else(|e| e.into_inner()).get(name) {
            return Ok(f.clone());
        }
        let (m, ptx) = self.module(family)?;
        let f = m.load_function(name).map_err(|e| dev_err(&format!("kernel `{name}` in kernels/{family}.cu"), e))?;
        let sizes = kernels::entry_param_sizes(&ptx, name).ok_or_else(|| {
            Error::Device(format!("kernel `{name}`: parameters not found in the PTX of kernels/{family}.cu"))
        })?;
        self.funcs.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_string(), (f.clone(), sizes.clone()));
        Ok((f, sizes))
    }

    /// Launches kernel `name` of `family` on this backend's stream.
    pub(crate) fn launch(&self, family: &'static str, name: &str, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
        let (f, sizes) = self.func(family, name)?;
        let given: Vec<usize> = args.iter().map(Arg::size).collect();
        if given != sizes {
            return Err(Error::Device(format!(
                "kernel `{name}` takes parameters of {sizes:?} bytes but was given {given:?} (a bug in the CUDA backend)"
            )));
        }
        if cfg.shared_mem_bytes > 48 * 1024 {
            use cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES as MAX_DYN;
            f.set_attribute(MAX_DYN, cfg.shared_mem_bytes as i32).map_err(|e| {
                dev_err(&format!("`{name}`: opting into {} bytes of shared memory", cfg.shared_mem_bytes), e)
            })?;
        }
        let mut b = self.stream.launch_builder(&f);
        for a in args {
            match a {
                Arg::P(p) => b.arg(p),
                Arg::U(v) => b.arg(v),
                Arg::F(v) => b.arg(v),
                Arg::Attn(v) => b.arg(v),
            };
        }
        // SAFETY: the argument list matches the kernel's C signature (each
        // call site in ops.rs mirrors the `extern "C"` declaration it names),
        // every pointer is a live allocation of this context sized by a
        // validated spec, and all work is ordered on one stream.
        unsafe { b.launch(cfg) }.map_err(|e| dev_err(&format!("launching `{name}`"), e))?;
        Ok(())
    }

    fn raw_alloc(&self, bytes: usize) -> Result<CudaBuffer> {
        // SAFETY: the memory is uninitialised; the Backend contract says
        // `alloc` returns unspecified contents, and upload/write fill it.
        let slice = unsafe { self.stream.alloc::<u8>(bytes.max(4)) }.map_err(|e| {
            let s = self.mem.stats();
            Error::Device(format!(
                "allocating {bytes} bytes on {} failed ({e}); this backend holds {} bytes, device total {}",
                self.info.name, s.allocated, self.info.total_memory
            ))
        })?;
        let ptr = slice.device_ptr(&self.stream).0;
        self.mem.alloc(bytes);
        Ok(CudaBuffer { slice, ptr, bytes, mem: self.mem.clone() })
    }
}

fn sfx(dt: DType) -> &'static str {
    match dt {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::U32 => "u32",
        DType::I32 => "i32",
    }
}
