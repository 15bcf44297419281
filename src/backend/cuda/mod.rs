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
mod qmatmul;

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

/// The CUDA version the driver supports, e.g. `(12, 8)` (an R570 driver):
/// PTX from an NVRTC newer than this does not load; CUBIN does.
pub fn driver_version() -> Result<(i32, i32), String> {
    driver_present()?;
    let mut v = 0;
    // SAFETY: libcuda is present (checked above); `v` is a live local of the
    // C signature's type. cuDriverGetVersion needs no cuInit.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) }
        .result()
        .map_err(|e| format!("cuDriverGetVersion failed: {e}"))?;
    Ok((v / 1000, (v % 1000) / 10))
}

/// Lists the CUDA devices, or says why there are none to list.
pub fn probe() -> Result<Vec<DeviceInfo>, String> {
    driver_present()?;
    let n = CudaContext::device_count().map_err(|e| format!("the CUDA driver did not initialise: {e}"))?;
    (0..n.max(0) as usize).map(info_of).collect()
}

/// A device allocation (the bytes, their device address, and the counter to
/// report to), or a view of a byte range of one: the allocation kept alive,
/// the range's address and its byte offset in the allocation.
pub struct CudaBuffer {
    slice: Arc<CudaSlice<u8>>,
    ptr: u64,
    /// Byte offset of `ptr` in `slice` (0 unless a view).
    offset: usize,
    bytes: usize,
    /// `None` for a view: it allocates nothing.
    mem: Option<MemoryCounter>,
}

impl Drop for CudaBuffer {
    fn drop(&mut self) {
        if let Some(m) = &self.mem {
            m.free(self.bytes);
        }
    }
}

impl CudaBuffer {
    /// Bytes this buffer was allocated with.
    pub fn len_bytes(&self) -> usize {
        self.bytes
    }

    /// The device address of the first byte (for collectives that take raw pointers, e.g. NCCL).
    #[cfg_attr(not(feature = "nccl"), allow(dead_code))]
    pub(crate) fn device_addr(&self) -> u64 {
        self.ptr
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
    /// Loaded families with the PTX their parameter sizes are read from.
    modules: Mutex<HashMap<&'static str, Loaded>>,
    /// Where each loaded family came from (see [`CudaBackend::loaded_from`]).
    sources: Mutex<HashMap<&'static str, kernels::Source>>,
    /// Loaded kernels with the byte sizes of their parameters (from the PTX).
    funcs: Mutex<HashMap<String, Func>>,
    tf32: AtomicBool,
    /// Shared memory a block may opt into (bytes).
    smem_optin: usize,
    /// Page-locked staging of host transfers.
    stage: pinned::Staging,
}

/// A loaded kernel: the function, its parameter sizes (from the PTX) and its
/// static shared memory (bytes).
#[derive(Clone)]
struct Func {
    f: CudaFunction,
    params: Vec<usize>,
    static_smem: usize,
}

/// A loaded family and the PTX its parameter sizes are read from.
type Loaded = (Arc<CudaModule>, Arc<String>);

/// Shared memory a block gets without opting in (bytes), static and dynamic together.
const DEFAULT_SMEM: usize = 48 * 1024;

/// The dynamic shared memory size to opt a kernel into, if it needs to:
/// a launch fails unless `static + dynamic ≤ 48 KiB` or the kernel's
/// `MAX_DYNAMIC_SHARED_SIZE_BYTES` has been raised to at least `dynamic`
/// (and `static + dynamic` stays within the device's opt-in maximum). The
/// dynamic size alone is not the test: a kernel with 128 B of `__shared__`
/// arrays and 48 KiB − 64 B of dynamic memory needs the opt-in.
fn smem_optin(static_bytes: usize, dynamic: usize, device_max: usize) -> Result<Option<usize>, String> {
    let total = static_bytes + dynamic;
    if total <= DEFAULT_SMEM {
        Ok(None)
    } else if total <= device_max {
        Ok(Some(dynamic))
    } else {
        Err(format!(
            "{dynamic} bytes of dynamic and {static_bytes} of static shared memory exceed this device's {device_max} bytes per block"
        ))
    }
}

/// The fallback GEMM's grid: one 16×16 block per tile of C (x over the n
/// columns, y over the m rows), z over the batch. y and z are at most 65535
/// (m ≤ 1,048,560 rows), x at most 2³¹−1.
pub(crate) fn fallback_gemm_grid(m: usize, n: usize, batch: usize) -> Result<(u32, u32, u32)> {
    let (gx, gy) = (n.div_ceil(16), m.div_ceil(16));
    if batch > 65535 {
        return Err(Error::Shape(format!("matmul: batch {batch} exceeds the fallback kernel's 65535")));
    }
    if gy > 65535 {
        return Err(Error::Shape(format!("matmul: {m} rows exceed the fallback kernel's 65535·16")));
    }
    if gx > i32::MAX as usize {
        return Err(Error::Shape(format!("matmul: {n} columns exceed the fallback kernel's grid")));
    }
    Ok((gx as u32, gy as u32, batch as u32))
}

/// The default memory pool's release threshold: keep everything. With the
/// default (0) every synchronisation returns the pool's free memory to the
/// driver, and the next training step allocates it again.
const POOL_RELEASE_THRESHOLD: u64 = u64::MAX;

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
        set_pool_release_threshold(&ctx, POOL_RELEASE_THRESHOLD);
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
                sources: Mutex::new(HashMap::new()),
                funcs: Mutex::new(HashMap::new()),
                tf32: AtomicBool::new(tf32),
                smem_optin,
                stage: pinned::Staging::default(),
            }),
        })
    }

    /// The context and the one stream every op of this backend is ordered on
    /// (collectives on device buffers enqueue on it too).
    #[cfg_attr(not(feature = "nccl"), allow(dead_code))]
    pub(crate) fn context_and_stream(&self) -> (&Arc<CudaContext>, &Arc<CudaStream>) {
        (&self.ctx, &self.stream)
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

    /// The image a loaded family came from (`None` before its first use):
    /// on an A100 or H100 with the bundle's cache, a CUBIN.
    pub fn loaded_from(&self, family: &str) -> Option<kernels::Source> {
        self.sources.lock().unwrap_or_else(|e| e.into_inner()).get(family).copied()
    }

    fn module(&self, family: &'static str) -> Result<Loaded> {
        use kernels::{Format, Source};
        let mut mods = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = mods.get(family) {
            return Ok(m.clone());
        }
        let arch = self.info.compute_capability;
        let nvrtc = kernels::nvrtc_status().is_ok();
        let shipped = kernels::cache_dir().map(|d| kernels::shipped(&d, family)).unwrap_or_default();
        let plan = kernels::load_plan(arch, nvrtc, &shipped);
        let mut tried = Vec::new();
        for source in &plan {
            // An NVRTC image read from the disk cache that does not load is
            // compiled again without the cache, once.
            let attempts: &[bool] = if matches!(source, Source::Nvrtc { .. }) { &[true, false] } else { &[true] };
            for &use_disk in attempts {
                let img = match kernels::image(family, *source, use_disk) {
                    Ok(i) => i,
                    Err(e) => {
                        tried.push(format!("{source:?}: {e}"));
                        break;
                    }
                };
                let format = match source {
                    Source::Nvrtc { format, .. } | Source::Cached { format, .. } => *format,
                };
                let code = match format {
                    Format::Cubin => cudarc::nvrtc::Ptx::from_binary(img.bytes),
                    Format::Ptx => cudarc::nvrtc::Ptx::from_src(String::from_utf8_lossy(&img.bytes).into_owned()),
                };
                match self.ctx.load_module(code) {
                    Ok(m) => {
                        log::info!("kernels/{family}.cu: loaded {source:?} on sm_{}{}", arch.0, arch.1);
                        let entry = (m, Arc::new(img.ptx));
                        mods.insert(family, entry.clone());
                        self.sources.lock().unwrap_or_else(|e| e.into_inner()).insert(family, *source);
                        return Ok(entry);
                    }
                    Err(e) => {
                        use cudarc::driver::sys::CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION as OLD;
                        let hint = if e.0 == OLD {
                            " (the driver is older than the NVRTC that wrote this PTX; a CUBIN or a newer driver loads)"
                        } else {
                            ""
                        };
                        tried.push(format!("{source:?}{}: {e}{hint}", if use_disk { "" } else { " uncached" }));
                    }
                }
            }
        }
        Err(Error::Device(format!(
            "no image of kernels/{family}.cu loads on {} (sm_{}{}, NVRTC {}): {}",
            self.info.name,
            arch.0,
            arch.1,
            if nvrtc { "found" } else { "not found" },
            if tried.is_empty() {
                "nothing to try: no cached image at or below this architecture (run scripts/gpu-check.sh build, \
                 or put NVRTC on the library path)"
                    .to_string()
            } else {
                tried.join("; ")
            }
        )))
    }

    fn func(&self, family: &'static str, name: &str) -> Result<Func> {
        if let Some(f) = self.funcs.lock().unwrap_or_else(|e| e.into_inner()).get(name) {
            return Ok(f.clone());
        }
        let (m, ptx) = self.module(family)?;
        let f = m.load_function(name).map_err(|e| dev_err(&format!("kernel `{name}` in kernels/{family}.cu"), e))?;
        let params = kernels::entry_param_sizes(&ptx, name).ok_or_else(|| {
            Error::Device(format!("kernel `{name}`: parameters not found in the PTX of kernels/{family}.cu"))
        })?;
        let static_smem = f
            .shared_size_bytes()
            .map_err(|e| dev_err(&format!("kernel `{name}`: reading its static shared memory"), e))?
            .max(0) as usize;
        let func = Func { f, params, static_smem };
        self.funcs.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_string(), func.clone());
        Ok(func)
    }

    /// The default memory pool's release threshold (bytes), as the driver reports it.
    pub fn pool_release_threshold(&self) -> Result<u64> {
        use cudarc::driver::result::{device, mem_pool};
        use cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD as ATTR;
        let mut v: u64 = 0;
        // SAFETY: the device handle is this context's; the attribute is a
        // cuuint64_t, and `v` is a live u64.
        unsafe {
            let pool = device::get_default_mem_pool(self.ctx.cu_device()).map_err(|e| dev_err("memory pool", e))?;
            mem_pool::get_attribute(pool, ATTR, (&mut v as *mut u64).cast())
        }
        .map_err(|e| dev_err("reading the memory pool's release threshold", e))?;
        Ok(v)
    }

    /// Launches kernel `name` of `family` on this backend's stream.
    pub(crate) fn launch(&self, family: &'static str, name: &str, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
        let Func { f, params: sizes, static_smem } = self.func(family, name)?;
        let given: Vec<usize> = args.iter().map(Arg::size).collect();
        if given != sizes {
            return Err(Error::Device(format!(
                "kernel `{name}` takes parameters of {sizes:?} bytes but was given {given:?} (a bug in the CUDA backend)"
            )));
        }
        let dynamic = cfg.shared_mem_bytes as usize;
        let optin = smem_optin(static_smem, dynamic, self.smem_optin.max(DEFAULT_SMEM))
            .map_err(|e| Error::Device(format!("launching `{name}`: {e}")))?;
        if let Some(bytes) = optin {
            use cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES as MAX_DYN;
            f.set_attribute(MAX_DYN, bytes as i32)
                .map_err(|e| dev_err(&format!("`{name}`: opting into {bytes} bytes of dynamic shared memory"), e))?;
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
        Ok(CudaBuffer { slice: Arc::new(slice), ptr, offset: 0, bytes, mem: Some(self.mem.clone()) })
    }
}

/// Sets the device's default memory pool (what `cuMemAllocAsync` draws from)
/// to keep up to `bytes` of freed memory instead of releasing it at every
/// synchronisation. A failure is logged, not fatal: it costs speed only.
fn set_pool_release_threshold(ctx: &CudaContext, bytes: u64) {
    use cudarc::driver::result::{device, mem_pool};
    use cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD as ATTR;
    let mut v = bytes;
    // SAFETY: the device handle is the context's own; the attribute's value
    // is a cuuint64_t and `v` is a live u64.
    let r = unsafe {
        device::get_default_mem_pool(ctx.cu_device())
            .and_then(|pool| mem_pool::set_attribute(pool, ATTR, (&mut v as *mut u64).cast()))
    };
    if let Err(e) = r {
        log::warn!("could not set the CUDA memory pool's release threshold ({e}); memory is re-allocated every step");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_gemm_grid_refuses_rows_past_grid_y() {
        assert_eq!(fallback_gemm_grid(33, 17, 2).unwrap(), (2, 3, 2));
        assert_eq!(fallback_gemm_grid(65535 * 16, 1, 1).unwrap().1, 65535);
        assert!(matches!(fallback_gemm_grid(65535 * 16 + 1, 1, 1), Err(Error::Shape(_))));
        assert!(matches!(fallback_gemm_grid(1, 1, 65536), Err(Error::Shape(_))));
    }

    #[test]
    fn shared_memory_opt_in_counts_static_and_dynamic_bytes() {
        let max = 227 * 1024;
        assert_eq!(smem_optin(0, 48 * 1024, max), Ok(None));
        assert_eq!(smem_optin(128, 40 * 1024, max), Ok(None));
        // indexer_block_scores at dim 95, block 128: 128·96·4 = 48 KiB dynamic
        // plus its 128 B `red[32]` array: over the default, so opt in.
        let dynamic = 128 * 96 * 4;
        assert_eq!(smem_optin(128, dynamic, max), Ok(Some(dynamic)));
        assert_eq!(smem_optin(0, 100 * 1024, max), Ok(Some(100 * 1024)));
        assert!(smem_optin(1024, max, max).unwrap_err().contains("exceed"));
    }
}
