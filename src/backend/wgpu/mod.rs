//! The wgpu backend: WGSL compute shaders on any Vulkan, Metal or DX12 adapter.
//!
//! One device and queue per backend. Kernels are recorded into one pending
//! command encoder and submitted in batches (on a download, a
//! synchronisation, an upload, or every [`MAX_PENDING`] dispatches). Freed
//! buffers go back to a pool keyed by size and are reused; compiled pipelines
//! are cached per kernel and argument dtypes. Shaders live in `shaders/`, one
//! file per op family; [`kernel`] explains how a kernel is written once and
//! generated for every dtype. Device errors (a failed allocation, a lost
//! device) are caught and returned as [`Error::Device`] instead of panicking.

mod attention;
mod cached;
mod core_ops;
pub mod kernel;
mod qmatmul;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub use kernel::KernelFeatures;
use kernel::{Field, KernelDef, KernelParams, ParamBlock, Role};

use super::{Backend, BackendKind, MemoryCounter, MemoryStats};
use crate::attention::cached::{CachedAttentionSpec, CachedIndexerSpec, CachedSelectSpec};
use crate::attention::ops::{AttentionSpec, IndexerLossSpec, IndexerSpec, SelectSpec};
use crate::error::{Error, Result};
use crate::ops::*;
use crate::{DType, Tensor};

/// Dispatches recorded before the pending encoder is submitted.
const MAX_PENDING: usize = 64;

/// Which adapter to open.
#[derive(Clone, Debug)]
pub enum AdapterPick {
    /// The first hardware adapter (discrete, then integrated GPU); never a software one.
    HardwareOnly,
    /// The best adapter there is, software (lavapipe) included.
    Any,
    /// An adapter index from `dynsparse info`, or part of its name (case-insensitive).
    Name(String),
}

impl AdapterPick {
    /// `DYNSPARSE_WGPU_ADAPTER=<index or name>`, when set; the value
    /// `hardware` asks for [`AdapterPick::HardwareOnly`] (the GPU check uses
    /// it so a software adapter never stands in for the GPU).
    pub fn from_env() -> Option<Self> {
        let v = std::env::var("DYNSPARSE_WGPU_ADAPTER").ok().filter(|s| !s.trim().is_empty())?;
        Some(if v.trim().eq_ignore_ascii_case("hardware") { AdapterPick::HardwareOnly } else { AdapterPick::Name(v) })
    }
}

impl std::fmt::Display for AdapterPick {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdapterPick::HardwareOnly => f.write_str("hardware adapters only"),
            AdapterPick::Any => f.write_str("any adapter, software included"),
            AdapterPick::Name(n) => write!(f, "adapter matching `{n}`"),
        }
    }
}

/// What `dynsparse info` shows about one adapter.
#[derive(Clone, Debug)]
pub struct AdapterSummary {
    pub index: usize,
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
    pub is_software: bool,
    pub shader_f16: bool,
    pub subgroups: bool,
    pub subgroup_sizes: (u32, u32),
    /// The limits that matter for our kernels, formatted.
    pub limits: String,
}

fn instance() -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    if std::env::var_os("WGPU_BACKEND").is_none() {
        desc.backends = wgpu::Backends::PRIMARY;
    }
    wgpu::Instance::new(desc)
}

fn is_software(info: &wgpu::AdapterInfo) -> bool {
    let n = info.name.to_ascii_lowercase();
    info.device_type == wgpu::DeviceType::Cpu || n.contains("llvmpipe") || n.contains("swiftshader")
}

fn summarize(index: usize, a: &wgpu::Adapter) -> AdapterSummary {
    let info = a.get_info();
    let f = a.features();
    let l = a.limits();
    AdapterSummary {
        index,
        name: info.name.clone(),
        backend: format!("{:?}", info.backend),
        device_type: format!("{:?}", info.device_type),
        driver: [info.driver.as_str(), info.driver_info.as_str()]
            .iter()
            .filter(|s| !s.is_empty())
            .cloned()
            .collect::<Vec<_>>()
            .join(" "),
        is_software: is_software(&info),
        shader_f16: f.contains(wgpu::Features::SHADER_F16),
        subgroups: f.contains(wgpu::Features::SUBGROUP),
        subgroup_sizes: (info.subgroup_min_size, info.subgroup_max_size),
        limits: format!(
            "max buffer {} MiB, max storage binding {} MiB, workgroup shared {} KiB, invocations/workgroup {}",
            l.max_buffer_size >> 20,
            l.max_storage_buffer_binding_size >> 20,
            l.max_compute_workgroup_storage_size >> 10,
            l.max_compute_invocations_per_workgroup
        ),
    }
}

fn adapters() -> Vec<wgpu::Adapter> {
    pollster::block_on(instance().enumerate_adapters(wgpu::Backends::all()))
}

/// Every adapter wgpu finds (an empty list when no driver answers).
pub fn enumerate_adapters() -> Vec<AdapterSummary> {
    adapters().iter().enumerate().map(|(i, a)| summarize(i, a)).collect()
}

fn pick_adapter(pick: &AdapterPick) -> Result<wgpu::Adapter> {
    let all = adapters();
    let list = |all: &[wgpu::Adapter]| {
        if all.is_empty() {
            "no adapters found: no Vulkan, Metal or DX12 driver answered (on Linux without a GPU, \
             `apt-get install mesa-vulkan-drivers` provides the lavapipe software adapter)"
                .to_string()
        } else {
            let names: Vec<String> = all
                .iter()
                .enumerate()
                .map(|(i, a)| {
                    let info = a.get_info();
                    format!("[{i}] {} ({:?}, {:?})", info.name, info.backend, info.device_type)
                })
                .collect();
            format!("adapters found: {}", names.join(", "))
        }
    };
    let rank = |a: &wgpu::Adapter| match a.get_info().device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    };
    let chosen = match pick {
        AdapterPick::Any => all.into_iter().min_by_key(|a| (is_software(&a.get_info()), rank(a))),
        AdapterPick::HardwareOnly => {
            let why = list(&all);
            let hw = all.into_iter().filter(|a| !is_software(&a.get_info())).min_by_key(rank);
            return hw.ok_or_else(|| Error::Unavailable(format!("wgpu: no hardware adapter ({why})")));
        }
        AdapterPick::Name(n) => {
            let why = list(&all);
            let found = match n.trim().parse::<usize>() {
                Ok(i) => all.into_iter().nth(i),
                Err(_) => {
                    let n = n.to_ascii_lowercase();
                    all.into_iter().find(|a| a.get_info().name.to_ascii_lowercase().contains(&n))
                }
            };
            return found.ok_or_else(|| Error::Unavailable(format!("wgpu: no adapter matches `{n}` ({why})")));
        }
    };
    chosen.ok_or_else(|| Error::Unavailable(format!("wgpu: {}", list(&[]))))
}

/// The limits to open the device with: the adapter's own, unless
/// `DYNSPARSE_WGPU_LIMITS=default` asks for WebGPU's defaults (8 storage
/// buffers per stage, 128 MiB per binding, 256 MiB per buffer), the most a
/// portable kernel may count on; CI runs the suite so once.
fn requested_limits(adapter: &wgpu::Limits) -> Result<wgpu::Limits> {
    match std::env::var("DYNSPARSE_WGPU_LIMITS").ok().as_deref().map(str::trim) {
        None | Some("") | Some("adapter") => Ok(adapter.clone()),
        Some("default") => Ok(wgpu::Limits::default()),
        Some(other) => Err(Error::Unavailable(format!(
            "DYNSPARSE_WGPU_LIMITS={other}: expected `default` (WebGPU's default limits) or `adapter`"
        ))),
    }
}

/// Which layout of the hot kernels (matmul, tiled attention forward and
/// backward, pooled indexer scores) runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelVariant {
    /// Tuned for software adapters (lavapipe): few invocations per workgroup,
    /// each carrying many rows in private arrays, since a CPU is bound by
    /// memory reads and runs a workgroup's invocations one after another.
    Software,
    /// Tuned for GPUs: 64–256 invocations per workgroup, one row (or a small
    /// register block) each, tiles shared through workgroup memory.
    Hardware,
}

impl KernelVariant {
    /// `DYNSPARSE_WGPU_KERNELS=hw|sw` when set, else by adapter: software
    /// adapters (device type CPU, llvmpipe, SwiftShader) and adapters without
    /// 256 invocations of 16×16 per workgroup get [`KernelVariant::Software`].
    fn choose(info: &wgpu::AdapterInfo, limits: &wgpu::Limits) -> Result<Self> {
        match std::env::var("DYNSPARSE_WGPU_KERNELS").ok().as_deref().map(str::trim) {
            Some("hw") => return Ok(KernelVariant::Hardware),
            Some("sw") => return Ok(KernelVariant::Software),
            None | Some("") | Some("auto") => {}
            Some(other) => {
                return Err(Error::Unavailable(format!(
                    "DYNSPARSE_WGPU_KERNELS={other}: expected `hw`, `sw` or `auto`"
                )));
            }
        }
        let wide = limits.max_compute_invocations_per_workgroup >= 256
            && limits.max_compute_workgroup_size_x >= 16
            && limits.max_compute_workgroup_size_y >= 16;
        Ok(if is_software(info) || !wide { KernelVariant::Software } else { KernelVariant::Hardware })
    }
}

/// Whether subgroup kernels can run: the feature, and subgroups of at least
/// 8 invocations (the decode kernels reduce 8-invocation teams by shuffles).
fn subgroups_usable(feature: bool, info: &wgpu::AdapterInfo) -> bool {
    feature && info.subgroup_min_size >= 8 && info.subgroup_max_size <= 128
}

struct Pipeline {
    layout: wgpu::BindGroupLayout,
    pipeline: wgpu::ComputePipeline,
    /// The Rust parameter struct checked against the shader.
    params: (&'static str, &'static [Field]),
    /// Bytes of the uniform parameter buffer.
    param_bytes: usize,
}

struct Pending {
    encoder: Option<wgpu::CommandEncoder>,
    dispatches: usize,
}

type Pool = Arc<Mutex<HashMap<u64, Vec<wgpu::Buffer>>>>;

/// WGSL compute shaders through wgpu.
pub struct WgpuBackend {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    variant: KernelVariant,
    /// Optional shader features the kernels use now (see [`KernelFeatures`]).
    features: KernelFeatures,
    /// The optional features the device was opened with (the most `features` may hold).
    device_features: KernelFeatures,
    /// Test override of the attention kernels' loop budget (None: the default).
    attention_loop_budget: Option<usize>,
    mem: MemoryCounter,
    pool: Pool,
    kernels: Mutex<HashMap<(String, String), Arc<KernelDef>>>,
    pipelines: Mutex<HashMap<String, Arc<Pipeline>>>,
    pending: Mutex<Pending>,
    error: Arc<Mutex<Option<String>>>,
    /// The last readback buffer, reused by the next download that fits in it
    /// (a decode loop downloads same-sized logits every step).
    readback: Mutex<Option<wgpu::Buffer>>,
}

/// Largest readback buffer kept for reuse.
const MAX_KEPT_READBACK: u64 = 16 << 20;

/// A device allocation, or a view of a byte range of one. Dropping an
/// allocation returns its memory to the backend's pool (unless views of it
/// are still alive: then the driver frees it after the last view); dropping a
/// view frees nothing.
pub struct WgpuBuffer {
    buf: Option<Arc<wgpu::Buffer>>,
    /// Byte offset of this buffer's first element in `buf` (0 unless a view).
    offset: u64,
    /// Bytes the caller asked for (what the memory counters count).
    bytes: usize,
    /// Whether this is a view (allocates nothing, bound at its byte range).
    view: bool,
    mem: MemoryCounter,
    pool: Pool,
}

impl WgpuBuffer {
    fn raw(&self) -> &wgpu::Buffer {
        self.buf.as_ref().expect("a live WgpuBuffer always holds its buffer")
    }

    /// How a kernel binds this buffer: the whole allocation, or a view's byte
    /// range (word-padded; views hold whole words, checked at creation).
    fn bind(&self) -> Bind<'_> {
        Bind { buf: self.raw(), offset: self.offset, size: self.view.then(|| padded(self.bytes) as u64) }
    }
}

/// A storage binding: a buffer, a byte offset and a size (`None`: to the end).
#[derive(Clone, Copy)]
pub(crate) struct Bind<'a> {
    buf: &'a wgpu::Buffer,
    offset: u64,
    size: Option<u64>,
}

impl<'a> From<&'a wgpu::Buffer> for Bind<'a> {
    fn from(buf: &'a wgpu::Buffer) -> Self {
        Bind { buf, offset: 0, size: None }
    }
}

impl Drop for WgpuBuffer {
    fn drop(&mut self) {
        if self.view {
            return;
        }
        self.mem.free(self.bytes);
        if let Some(b) = self.buf.take()
            && let Ok(b) = Arc::try_unwrap(b)
            && let Ok(mut pool) = self.pool.lock()
        {
            pool.entry(b.size()).or_default().push(b);
        }
    }
}

/// Pool buckets: sizes rounded up to 256 bytes, and to 1/8 of the next power
/// of two above 64 KiB, so nearby sizes share buffers.
fn bucket(bytes: usize) -> u64 {
    let b = bytes.max(4) as u64;
    if b <= 65_536 {
        b.div_ceil(256) * 256
    } else {
        let step = b.next_power_of_two() / 8;
        b.div_ceil(step) * step
    }
}

/// A tensor argument of a kernel launch.
pub(crate) enum Arg<'a> {
    R(&'a Tensor<WgpuBackend>),
    W(&'a mut Tensor<WgpuBackend>),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl WgpuBackend {
    /// Opens the adapter `pick` selects; the error lists the adapters found.
    pub fn new(pick: &AdapterPick) -> Result<Self> {
        Self::open(pick, None)
    }

    /// Like [`WgpuBackend::new`], with the largest storage binding lowered to
    /// `max_binding` bytes (rounded down to whole words): tests reach the
    /// binding limit with small, fast tensors this way.
    pub fn with_max_binding(pick: &AdapterPick, max_binding: u64) -> Result<Self> {
        Self::open(pick, Some(max_binding))
    }

    fn open(pick: &AdapterPick, max_binding: Option<u64>) -> Result<Self> {
        let adapter = pick_adapter(pick)?;
        let info = adapter.get_info();
        // The adapter's own limits, or WebGPU's defaults with
        // `DYNSPARSE_WGPU_LIMITS=default` (to test what every adapter offers).
        let mut limits = requested_limits(&adapter.limits())?;
        if let Some(m) = max_binding {
            let m = (m / 4 * 4).max(4);
            limits.max_storage_buffer_binding_size = limits.max_storage_buffer_binding_size.min(m);
        }
        let variant = KernelVariant::choose(&info, &limits)?;
        // Subgroups count only with sizes the subgroup kernels are written for.
        let mut available = adapter.features();
        if !subgroups_usable(available.contains(wgpu::Features::SUBGROUP), &info) {
            available.remove(wgpu::Features::SUBGROUP);
        }
        let features = KernelFeatures::detect(available)?;
        let device_features = KernelFeatures {
            subgroups: available.contains(wgpu::Features::SUBGROUP),
            f16: available.contains(wgpu::Features::SHADER_F16),
        };
        let (need, widest) = kernel::max_storage_bindings()?;
        let have = limits.max_storage_buffers_per_shader_stage as usize;
        if need > have {
            return Err(Error::Unavailable(format!(
                "wgpu: {} allows {have} storage buffers per shader stage, but kernel {widest} binds {need}",
                info.name
            )));
        }
        let desc = wgpu::DeviceDescriptor {
            label: Some("dynsparse"),
            // Every optional feature the kernels can use (so `set_kernel_features`
            // can switch them on later); `features` says which are in effect.
            required_features: device_features.wgpu_features(),
            required_limits: limits,
            memory_hints: wgpu::MemoryHints::Performance,
            ..Default::default()
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&desc))
            .map_err(|e| Error::Unavailable(format!("wgpu: {} refused to open a device: {e}", info.name)))?;
        let error: Arc<Mutex<Option<String>>> = Arc::default();
        let sink = error.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            log::error!("wgpu device error: {e}");
            let mut s = lock(&sink);
            if s.is_none() {
                *s = Some(e.to_string());
            }
        }));
        log::info!(
            "wgpu: opened {} ({:?}, {:?}), {variant:?} kernels, {features}",
            info.name,
            info.backend,
            info.device_type
        );
        Ok(Self {
            device,
            queue,
            info,
            variant,
            features,
            device_features,
            attention_loop_budget: None,
            mem: MemoryCounter::default(),
            pool: Arc::default(),
            kernels: Mutex::default(),
            pipelines: Mutex::default(),
            pending: Mutex::new(Pending { encoder: None, dispatches: 0 }),
            error,
            readback: Mutex::default(),
        })
    }

    /// The limits the device was opened with.
    pub fn limits(&self) -> wgpu::Limits {
        self.device.limits()
    }

    /// The kernel layout this backend runs (see [`KernelVariant`]).
    pub fn kernel_variant(&self) -> KernelVariant {
        self.variant
    }

    /// Switches the kernel layout of later launches (benchmarks time both
    /// variants side by side on one device; pipelines of both stay cached).
    pub fn set_kernel_variant(&mut self, v: KernelVariant) {
        self.variant = v;
    }

    /// The optional shader features later launches use (see [`KernelFeatures`]).
    pub fn kernel_features(&self) -> KernelFeatures {
        self.features
    }

    /// Switches the optional features of later launches (tests and benchmarks
    /// run every combination on one device): at most those the device was
    /// opened with, else an error naming the missing one.
    pub fn set_kernel_features(&mut self, f: KernelFeatures) -> Result<()> {
        if !self.device_features.contains(f) {
            return Err(Error::Unavailable(format!(
                "wgpu: kernel features ({f}) asked for, the device has {}",
                self.device_features
            )));
        }
        self.features = f;
        Ok(())
    }

    /// Lowers the loop-iteration budget by which the attention kernels split
    /// their key or query loops into chunks (None: the default, sized for
    /// lavapipe), so tests reach the split paths (partials summed or
    /// combined afterwards) with small inputs. Results do not depend on it.
    #[doc(hidden)]
    pub fn set_attention_loop_budget(&mut self, budget: Option<usize>) {
        self.attention_loop_budget = budget;
    }

    /// Whether the kernels with a subgroup path (decode attention and the
    /// quantized matmul of the hardware variant, the hardware indexer and
    /// attention forward) reduce through subgroup operations instead of
    /// workgroup memory: the adapter has `Features::SUBGROUP` with subgroups of
    /// 8 to 128 invocations, unless `DYNSPARSE_WGPU_SUBGROUPS=0`.
    pub fn subgroups(&self) -> bool {
        self.features.subgroups
    }

    /// Switches the subgroup paths of later launches on or off (tests and
    /// benchmarks run both in one process); see [`Self::set_kernel_features`].
    pub fn set_subgroups(&mut self, on: bool) -> Result<()> {
        self.set_kernel_features(KernelFeatures { subgroups: on, ..self.features })
    }

    /// The adapter's description.
    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }

    fn check_error(&self) -> Result<()> {
        match lock(&self.error).take() {
            Some(e) => Err(Error::Device(format!("wgpu: {e}"))),
            None => Ok(()),
        }
    }

    /// Submits the pending encoder, if any.
    /// The lock is held through the submission: otherwise another thread's
    /// `write` could queue its data (which lands before the next submission)
    /// while commands already recorded — reading a buffer that has since gone
    /// back to the pool and been handed to that thread — are not yet submitted.
    fn flush(&self) -> Result<()> {
        {
            let mut p = lock(&self.pending);
            p.dispatches = 0;
            if let Some(enc) = p.encoder.take() {
                self.queue.submit([enc.finish()]);
            }
        }
        self.check_error()
    }

    fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Device(format!("wgpu: waiting for the device failed: {e}")))?;
        self.check_error()
    }

    /// The largest buffer a kernel may bind: the smaller of the adapter's
    /// storage-binding and buffer-size limits.
    fn max_binding(&self) -> u64 {
        let l = self.device.limits();
        l.max_storage_buffer_binding_size.min(l.max_buffer_size)
    }

    /// Checks that a buffer of `bytes` (for `what`) can be created and
    /// bound, before anything is created.
    fn check_fits(&self, bytes: usize, what: &str) -> Result<u64> {
        buffer_size(bytes, self.max_binding()).map_err(|limit| {
            Error::Device(format!(
                "wgpu: {what} needs a buffer of {bytes} bytes, past this adapter's largest storage binding of {limit} bytes"
            ))
        })
    }

    fn raw_alloc(&self, bytes: usize, what: &str) -> Result<WgpuBuffer> {
        let size = self.check_fits(bytes, what)?;
        let reused = lock(&self.pool).get_mut(&size).and_then(Vec::pop);
        let buf = reused.unwrap_or_else(|| {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        });
        self.mem.alloc(bytes);
        Ok(WgpuBuffer {
            buf: Some(Arc::new(buf)),
            offset: 0,
            bytes,
            view: false,
            mem: self.mem.clone(),
            pool: self.pool.clone(),
        })
    }

    /// Drops every pooled (free) buffer, returning its memory to the driver.
    pub fn trim_pool(&self) {
        lock(&self.pool).clear();
    }

    fn kernel(&self, family: &str, name: &str) -> Result<Arc<KernelDef>> {
        let key = (family.to_string(), name.to_string());
        if let Some(k) = lock(&self.kernels).get(&key) {
            return Ok(k.clone());
        }
        let k = Arc::new(kernel::find(family, name)?);
        lock(&self.kernels).insert(key, k.clone());
        Ok(k)
    }

    /// The pipeline of `k` for argument `dtypes`, created (and its parameter
    /// struct checked against `params`) on first use.
    fn pipeline(
        &self,
        k: &KernelDef,
        dtypes: &[DType],
        params: (&'static str, &'static [Field]),
    ) -> Result<Arc<Pipeline>> {
        let features = self.features.for_kernel(k, dtypes);
        let key = format!("{}::{}:{:?}:{features:?}", k.family, k.name, dtypes);
        if let Some(p) = lock(&self.pipelines).get(&key) {
            if p.params.0 != params.0 {
                return Err(Error::Device(format!(
                    "wgpu: kernel {key} was created for parameters `{}`, launched with `{}`",
                    p.params.0, params.0
                )));
            }
            return Ok(p.clone());
        }
        let have = self.device.limits().max_storage_buffers_per_shader_stage as usize;
        if k.args.len() > have {
            return Err(Error::Device(format!(
                "wgpu: kernel {key} binds {} storage buffers; this device allows {have} per shader stage",
                k.args.len()
            )));
        }
        let (src, _, param_bytes) = kernel::compile_with(k, dtypes, features, params)?;
        let module = self.device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(&key),
            source: wgpu::ShaderSource::Wgsl(src.into()),
        });
        let storage = |b: u32, read_only: bool| wgpu::BindGroupLayoutEntry {
            binding: b,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Storage { read_only },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        };
        let mut entries = vec![wgpu::BindGroupLayoutEntry {
            binding: 0,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Uniform,
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        }];
        for (i, (_, role)) in k.args.iter().enumerate() {
            entries.push(storage(i as u32 + 1, !role.writes()));
        }
        let layout = self
            .device
            .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor { label: Some(&key), entries: &entries });
        let pl = self.device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(&key),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let pipeline = self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&key),
            layout: Some(&pl),
            module: &module,
            entry_point: Some("main"),
            compilation_options: Default::default(),
            cache: None,
        });
        self.check_error()?;
        let p = Arc::new(Pipeline { layout, pipeline, params, param_bytes });
        lock(&self.pipelines).insert(key, p.clone());
        Ok(p)
    }

    /// Records one dispatch of `pipeline` over `bufs` (binding 1, 2, …).
    fn dispatch(&self, p: &Pipeline, params: &ParamBlock, bufs: &[Bind<'_>], grid: [u32; 3]) -> Result<()> {
        if params.bytes.len() > p.param_bytes {
            return Err(Error::Device(format!(
                "{} bytes of kernel parameters (at most {})",
                params.bytes.len(),
                p.param_bytes
            )));
        }
        let lim = self.device.limits().max_compute_workgroups_per_dimension;
        if grid.iter().any(|&g| g > lim) {
            return Err(Error::Shape(format!(
                "wgpu: launch grid {grid:?} exceeds the device limit of {lim} per dimension"
            )));
        }
        let mut bytes = vec![0u8; p.param_bytes];
        bytes[..params.bytes.len()].copy_from_slice(&params.bytes);
        let ubuf = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: p.param_bytes as u64,
            usage: wgpu::BufferUsages::UNIFORM,
            mapped_at_creation: true,
        });
        ubuf.slice(..)
            .get_mapped_range_mut()
            .map_err(|e| Error::Device(format!("wgpu: mapping a parameter buffer failed: {e}")))?
            .copy_from_slice(&bytes);
        ubuf.unmap();
        let mut entries = vec![wgpu::BindGroupEntry { binding: 0, resource: ubuf.as_entire_binding() }];
        // Every storage binding of every kernel is built here: a view binds its byte range.
        for (i, b) in bufs.iter().enumerate() {
            let resource = wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: b.buf,
                offset: b.offset,
                size: b.size.and_then(wgpu::BufferSize::new),
            });
            entries.push(wgpu::BindGroupEntry { binding: i as u32 + 1, resource });
        }
        let bg = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &p.layout,
            entries: &entries,
        });
        let submit = {
            let mut pend = lock(&self.pending);
            let enc = pend.encoder.get_or_insert_with(|| {
                self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None })
            });
            {
                let mut pass =
                    enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: None });
                pass.set_pipeline(&p.pipeline);
                pass.set_bind_group(0, &bg, &[]);
                pass.dispatch_workgroups(grid[0], grid[1], grid[2]);
            }
            pend.dispatches += 1;
            pend.dispatches >= MAX_PENDING
        };
        if submit { self.flush() } else { Ok(()) }
    }

    /// Launches kernel `family::name` over `args` (in the order of its header).
    /// Half-precision outputs are computed into f32 staging buffers and
    /// packed afterwards; `inout` staging is first filled from the tensor.
    pub(crate) fn launch(
        &self,
        family: &str,
        name: &str,
        args: &mut [Arg<'_>],
        params: impl Into<ParamBlock>,
        grid: [u32; 3],
    ) -> Result<()> {
        let params: ParamBlock = params.into();
        let k = self.kernel(family, name)?;
        if k.args.len() != args.len() {
            return Err(Error::Device(format!("{family}::{name} takes {} tensors, got {}", k.args.len(), args.len())));
        }
        // Half-precision outputs are computed in f32 staging buffers twice
        // their size: check every one against the limits before creating any,
        // so an oversized output is an error that leaves the pending batch as it was.
        for ((an, role), a) in k.args.iter().zip(args.iter()) {
            if let (Role::Out | Role::InOut, Arg::W(t)) = (role, a)
                && t.dtype() != DType::F32
                && t.dtype().is_float()
            {
                let bytes = t
                    .numel()
                    .checked_mul(4)
                    .ok_or_else(|| Error::Shape(format!("{family}::{name}: `{an}` overflows")))?;
                self.check_fits(
                    bytes,
                    &format!("{family}::{name}: the f32 staging of {} `{an}` ({} elements)", t.dtype(), t.numel()),
                )?;
            }
        }
        let mut dtypes = Vec::with_capacity(args.len());
        let mut staging: Vec<Option<WgpuBuffer>> = Vec::with_capacity(args.len());
        for ((an, role), a) in k.args.iter().zip(args.iter()) {
            let t = match (a, role.writes()) {
                (Arg::R(t), false) => *t,
                (Arg::W(t), true) => &**t,
                _ => return Err(Error::Device(format!("{family}::{name}: `{an}` passed with the wrong mutability"))),
            };
            let dt = t.dtype();
            if role.is_index() == dt.is_float() {
                return Err(Error::Device(format!("{family}::{name}: `{an}` has dtype {dt}")));
            }
            match role {
                Role::Out | Role::InOut if dt != DType::F32 => {
                    let st = self.raw_alloc(t.numel() * 4, "f32 staging")?;
                    if *role == Role::InOut {
                        self.half_convert("unpack_half", t.buffer().bind(), st.bind(), dt, t.numel())?;
                    }
                    staging.push(Some(st));
                    dtypes.push(DType::F32);
                }
                Role::Idx | Role::IdxOut => {
                    staging.push(None);
                    dtypes.push(DType::U32);
                }
                _ => {
                    staging.push(None);
                    dtypes.push(dt);
                }
            }
        }
        let p = self.pipeline(&k, &dtypes, params.layout)?;
        {
            let bufs: Vec<Bind<'_>> = args
                .iter()
                .zip(&staging)
                .map(|(a, st)| match (st, a) {
                    (Some(s), _) => s.bind(),
                    (None, Arg::R(t)) => t.buffer().bind(),
                    (None, Arg::W(t)) => t.buffer().bind(),
                })
                .collect();
            self.dispatch(&p, &params, &bufs, grid)?;
        }
        for (a, st) in args.iter().zip(&staging) {
            if let (Some(st), Arg::W(t)) = (st, a) {
                self.half_convert("pack_half", st.bind(), t.buffer().bind(), t.dtype(), t.numel())?;
            }
        }
        Ok(())
    }

    /// `pack_half`: f32 staging → packed f16/bf16 words; `unpack_half`: the reverse.
    fn half_convert(&self, which: &str, src: Bind<'_>, dst: Bind<'_>, dt: DType, n: usize) -> Result<()> {
        let k = self.kernel("elementwise", which)?;
        let dtypes = if which == "pack_half" { [DType::F32, DType::U32] } else { [DType::U32, DType::F32] };
        let p = self.pipeline(&k, &dtypes, (core_ops::HalfParams::NAME, core_ops::HalfParams::FIELDS))?;
        let params = core_ops::HalfParams { n: n as u32, bf16: (dt == DType::BF16) as u32 };
        self.dispatch(&p, &(&params).into(), &[src, dst], kernel::grid1d(n.div_ceil(2)))
    }
}

/// The size to create a buffer of `bytes` with, given the largest binding:
/// the pool bucket, or the exact word-padded size where the bucket would
/// pass the limit (a 2³¹−1 limit is no multiple of any bucket step).
/// `Err(limit)` when even the exact size does not fit.
fn buffer_size(bytes: usize, limit: u64) -> std::result::Result<u64, u64> {
    let exact = padded(bytes.max(4)) as u64;
    // Buffer sizes and copies are whole words: the largest usable size is the limit rounded down.
    let usable = limit / 4 * 4;
    if exact > usable {
        return Err(limit);
    }
    Ok(bucket(bytes).min(usable))
}

/// Bytes rounded up to whole `u32` words (buffers and copies are word-sized).
fn padded(bytes: usize) -> usize {
    bytes.div_ceil(4) * 4
}

type T<B> = Tensor<B>;

impl Backend for WgpuBackend {
    type Buffer = WgpuBuffer;

    fn kind(&self) -> BackendKind {
        BackendKind::Wgpu
    }
    fn device_name(&self) -> String {
        self.info.name.clone()
    }
    fn supports(&self, dtype: DType) -> bool {
        // f16 and bf16 are stored two per u32 word and converted in the shaders,
        // so every adapter supports every dtype.
        let _ = dtype;
        true
    }
    fn memory(&self) -> MemoryStats {
        self.mem.stats()
    }
    fn reset_peak(&self) {
        self.mem.reset_peak()
    }
    fn synchronize(&self) -> Result<()> {
        self.flush()?;
        self.wait()
    }
    fn max_binding_bytes(&self) -> u64 {
        self.max_binding()
    }

    fn alloc(&self, dtype: DType, len: usize) -> Result<WgpuBuffer> {
        let bytes =
            len.checked_mul(dtype.size()).ok_or_else(|| Error::Shape(format!("alloc: {len} elements overflow")))?;
        let b = self.raw_alloc(bytes, &format!("a {dtype} tensor of {len} elements"))?;
        self.check_error()?;
        Ok(b)
    }

    fn supports_views(&self) -> bool {
        true
    }

    fn view(&self, base: &WgpuBuffer, dtype: DType, offset: usize, len: usize) -> Result<WgpuBuffer> {
        let (size, align) = (dtype.size(), self.device.limits().min_storage_buffer_offset_alignment as u64);
        let start = base.offset + (offset * size) as u64;
        let bytes = len * size;
        if offset.checked_add(len).is_none_or(|e| e * size > base.bytes) {
            return Err(Error::Shape(format!(
                "view: elements {offset}..{offset}+{len} of a buffer of {} bytes",
                base.bytes
            )));
        }
        if !start.is_multiple_of(align) {
            return Err(Error::Invalid(format!(
                "wgpu: a view at byte {start} is not a multiple of this adapter's storage offset alignment of {align} bytes"
            )));
        }
        if bytes == 0 || !bytes.is_multiple_of(4) {
            return Err(Error::Invalid(format!(
                "wgpu: a view of {len} {dtype} elements is not a whole number of 32-bit words (kernels write whole words)"
            )));
        }
        Ok(WgpuBuffer {
            buf: base.buf.clone(),
            offset: start,
            bytes,
            view: true,
            mem: self.mem.clone(),
            pool: self.pool.clone(),
        })
    }

    fn upload(&self, dtype: DType, bytes: &[u8]) -> Result<WgpuBuffer> {
        let mut b = self.alloc(dtype, bytes.len() / dtype.size())?;
        self.write(&mut b, dtype, bytes)?;
        Ok(b)
    }

    fn write(&self, buf: &mut WgpuBuffer, dtype: DType, bytes: &[u8]) -> Result<()> {
        if bytes.len() != buf.bytes {
            return Err(Error::Shape(format!(
                "write: {} bytes into a {dtype} buffer of {} bytes",
                bytes.len(),
                buf.bytes
            )));
        }
        // Kernels recorded earlier may still read this buffer: submit them first,
        // since queue writes land before the *next* submission.
        self.flush()?;
        if bytes.len().is_multiple_of(4) {
            self.queue.write_buffer(buf.raw(), buf.offset, bytes);
        } else {
            // Only whole allocations get here (views hold whole words): the pad is theirs.
            let mut v = bytes.to_vec();
            v.resize(padded(bytes.len()), 0);
            self.queue.write_buffer(buf.raw(), buf.offset, &v);
        }
        self.check_error()
    }

    fn download(&self, buf: &WgpuBuffer, dtype: DType, len: usize) -> Result<Vec<u8>> {
        self.mem.download();
        let n = len * dtype.size();
        if n > buf.bytes {
            return Err(Error::Shape(format!("download: {n} bytes from a buffer of {}", buf.bytes)));
        }
        if n == 0 {
            return Ok(Vec::new());
        }
        let size = padded(n) as u64;
        let max = self.device.limits().max_buffer_size;
        if size > max {
            return Err(Error::Device(format!(
                "wgpu: reading back {n} bytes needs a buffer past this adapter's largest of {max} bytes"
            )));
        }
        let kept = lock(&self.readback).take().filter(|b| b.size() >= size);
        let staging = kept.unwrap_or_else(|| {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("readback"),
                size: size.max(4096).min(max),
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        });
        {
            let mut p = lock(&self.pending);
            let enc = p.encoder.get_or_insert_with(|| {
                self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None })
            });
            enc.copy_buffer_to_buffer(buf.raw(), buf.offset, &staging, 0, size);
        }
        self.flush()?;
        let (tx, rx) = std::sync::mpsc::channel();
        staging.slice(..size).map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.wait()?;
        rx.recv()
            .map_err(|_| Error::Device("wgpu: readback was never mapped".into()))?
            .map_err(|e| Error::Device(format!("wgpu: readback failed: {e}")))?;
        let out = staging
            .slice(..size)
            .get_mapped_range()
            .map_err(|e| Error::Device(format!("wgpu: reading back failed: {e}")))?[..n]
            .to_vec();
        staging.unmap();
        if staging.size() <= MAX_KEPT_READBACK {
            *lock(&self.readback) = Some(staging);
        }
        Ok(out)
    }

    fn matmul(&self, s: &MatmulSpec, a: &T<Self>, b: &T<Self>, c: &mut T<Self>) -> Result<()> {
        core_ops::matmul(self, s, a, b, c)
    }
    fn fill(&self, s: &FillSpec, x: &mut T<Self>) -> Result<()> {
        core_ops::fill(self, s, x)
    }
    fn add(&self, s: &ElementwiseSpec, a: &T<Self>, b: &T<Self>, out: &mut T<Self>) -> Result<()> {
        core_ops::add(self, s, a, b, out)
    }
    fn axpby(&self, s: &AxpbySpec, x: &T<Self>, y: &mut T<Self>) -> Result<()> {
        core_ops::axpby(self, s, x, y)
    }
    fn scale(&self, s: &ScaleSpec, x: &mut T<Self>) -> Result<()> {
        core_ops::scale(self, s, x)
    }
    fn bias_add(&self, s: &BiasSpec, x: &mut T<Self>, bias: &T<Self>) -> Result<()> {
        core_ops::bias_add(self, s, x, bias)
    }
    fn sum_rows(&self, s: &SumRowsSpec, x: &T<Self>, out: &mut T<Self>) -> Result<()> {
        core_ops::sum_rows(self, s, x, out)
    }
    fn cast(&self, s: &ElementwiseSpec, x: &T<Self>, y: &mut T<Self>) -> Result<()> {
        core_ops::cast(self, s, x, y)
    }
    fn gelu(&self, s: &ElementwiseSpec, x: &T<Self>, y: &mut T<Self>) -> Result<()> {
        core_ops::gelu(self, s, x, y)
    }
    fn gelu_backward(&self, s: &ElementwiseSpec, x: &T<Self>, dy: &T<Self>, dx: &mut T<Self>) -> Result<()> {
        core_ops::gelu_backward(self, s, x, dy, dx)
    }
    fn bias_gelu(&self, s: &BiasSpec, x: &T<Self>, bias: &T<Self>, y: &mut T<Self>) -> Result<()> {
        core_ops::bias_gelu(self, s, x, bias, y)
    }
    fn layernorm(
        &self,
        s: &LayerNormSpec,
        x: &T<Self>,
        gamma: &T<Self>,
        beta: &T<Self>,
        y: &mut T<Self>,
        mean: &mut T<Self>,
        rstd: &mut T<Self>,
    ) -> Result<()> {
        core_ops::layernorm(self, s, x, gamma, beta, y, mean, rstd)
    }
    fn layernorm_backward(
        &self,
        s: &LayerNormSpec,
        dy: &T<Self>,
        x: &T<Self>,
        gamma: &T<Self>,
        mean: &T<Self>,
        rstd: &T<Self>,
        dx: &mut T<Self>,
        dgamma: &mut T<Self>,
        dbeta: &mut T<Self>,
    ) -> Result<()> {
        core_ops::layernorm_backward(self, s, dy, x, gamma, mean, rstd, dx, dgamma, dbeta)
    }
    fn softmax(&self, s: &SoftmaxSpec, x: &T<Self>, y: &mut T<Self>) -> Result<()> {
        core_ops::softmax(self, s, x, y)
    }
    fn softmax_backward(&self, s: &SoftmaxSpec, y: &T<Self>, dy: &T<Self>, dx: &mut T<Self>) -> Result<()> {
        core_ops::softmax_backward(self, s, y, dy, dx)
    }
    fn rope(&self, s: &RopeSpec, x: &T<Self>, cos: &T<Self>, sin: &T<Self>, y: &mut T<Self>) -> Result<()> {
        core_ops::rope(self, s, x, cos, sin, y)
    }
    fn embedding(&self, s: &EmbeddingSpec, ids: &T<Self>, table: &T<Self>, out: &mut T<Self>) -> Result<()> {
        core_ops::embedding(self, s, ids, table, out)
    }
    fn embedding_backward(&self, s: &EmbeddingSpec, ids: &T<Self>, dout: &T<Self>, dtable: &mut T<Self>) -> Result<()> {
        core_ops::embedding_backward(self, s, ids, dout, dtable)
    }
    fn cross_entropy(
        &self,
        s: &CrossEntropySpec,
        logits: &T<Self>,
        targets: &T<Self>,
        losses: &mut T<Self>,
    ) -> Result<()> {
        core_ops::cross_entropy(self, s, logits, targets, losses)
    }
    fn cross_entropy_backward(
        &self,
        s: &CrossEntropySpec,
        logits: &T<Self>,
        targets: &T<Self>,
        dlogits: &mut T<Self>,
    ) -> Result<()> {
        core_ops::cross_entropy_backward(self, s, logits, targets, dlogits)
    }
    fn sum_squares(&self, s: &ReduceSpec, x: &T<Self>, out: &mut T<Self>) -> Result<()> {
        core_ops::sum_squares(self, s, x, out)
    }
    fn all_finite(&self, s: &ReduceSpec, x: &T<Self>, out: &mut T<Self>) -> Result<()> {
        core_ops::all_finite(self, s, x, out)
    }
    fn adamw(
        &self,
        s: &AdamWSpec,
        params: &mut T<Self>,
        grads: &T<Self>,
        m: &mut T<Self>,
        v: &mut T<Self>,
        copy: Option<&mut T<Self>>,
    ) -> Result<()> {
        core_ops::adamw(self, s, params, grads, m, v, copy)
    }

    fn attention(
        &self,
        s: &AttentionSpec,
        q: &T<Self>,
        k: &T<Self>,
        v: &T<Self>,
        idx: Option<&T<Self>>,
        o: &mut T<Self>,
        lse: &mut T<Self>,
    ) -> Result<()> {
        attention::attention(self, s, q, k, v, idx, o, lse)
    }
    fn attention_backward(
        &self,
        s: &AttentionSpec,
        q: &T<Self>,
        k: &T<Self>,
        v: &T<Self>,
        o: &T<Self>,
        lse: &T<Self>,
        d_o: &T<Self>,
        idx: Option<&T<Self>>,
        dq: &mut T<Self>,
        dk: &mut T<Self>,
        dv: &mut T<Self>,
    ) -> Result<()> {
        attention::attention_backward(self, s, q, k, v, o, lse, d_o, idx, dq, dk, dv)
    }
    fn indexer_scores(
        &self,
        s: &IndexerSpec,
        qi: &T<Self>,
        ki: &T<Self>,
        w: &T<Self>,
        scores: &mut T<Self>,
    ) -> Result<()> {
        attention::indexer_scores(self, s, qi, ki, w, scores)
    }
    fn indexer_block_scores(
        &self,
        s: &IndexerSpec,
        qi: &T<Self>,
        ki: &T<Self>,
        w: &T<Self>,
        pooled: &mut T<Self>,
    ) -> Result<()> {
        attention::indexer_block_scores(self, s, qi, ki, w, pooled)
    }
    fn select_topk(&self, s: &SelectSpec, scores: &T<Self>, idx: &mut T<Self>) -> Result<()> {
        attention::select_topk(self, s, scores, idx)
    }
    fn indexer_kl(
        &self,
        s: &IndexerLossSpec,
        q: &T<Self>,
        k: &T<Self>,
        lse: &T<Self>,
        scores: &T<Self>,
        idx: Option<&T<Self>>,
        loss: &mut T<Self>,
        dscores: &mut T<Self>,
    ) -> Result<()> {
        attention::indexer_kl(self, s, q, k, lse, scores, idx, loss, dscores)
    }
    fn indexer_backward(
        &self,
        s: &IndexerSpec,
        qi: &T<Self>,
        ki: &T<Self>,
        w: &T<Self>,
        dscores: &T<Self>,
        dqi: &mut T<Self>,
        dki: &mut T<Self>,
        dw: &mut T<Self>,
    ) -> Result<()> {
        attention::indexer_backward(self, s, qi, ki, w, dscores, dqi, dki, dw)
    }
    fn rope_rows(
        &self,
        s: &RopeSpec,
        x: &T<Self>,
        cos: &T<Self>,
        sin: &T<Self>,
        rows: &T<Self>,
        y: &mut T<Self>,
    ) -> Result<()> {
        cached::rope_rows(self, s, x, cos, sin, rows, y)
    }
    fn cache_write(
        &self,
        s: &CacheWriteSpec,
        src: &T<Self>,
        rows: &T<Self>,
        pages: &T<Self>,
        cache: &mut T<Self>,
    ) -> Result<()> {
        cached::cache_write(self, s, src, rows, pages, cache)
    }
    fn cached_attention(
        &self,
        s: &CachedAttentionSpec,
        q: &T<Self>,
        k: &T<Self>,
        v: &T<Self>,
        rows: &T<Self>,
        pages: &T<Self>,
        idx: Option<&T<Self>>,
        o: &mut T<Self>,
    ) -> Result<()> {
        cached::cached_attention(self, s, q, k, v, rows, pages, idx, o)
    }
    fn cached_indexer_block_scores(
        &self,
        s: &CachedIndexerSpec,
        qi: &T<Self>,
        w: &T<Self>,
        ki: &T<Self>,
        rows: &T<Self>,
        pages: &T<Self>,
        pooled: &mut T<Self>,
    ) -> Result<()> {
        cached::cached_indexer_block_scores(self, s, qi, w, ki, rows, pages, pooled)
    }
    fn cached_select(&self, s: &CachedSelectSpec, scores: &T<Self>, rows: &T<Self>, idx: &mut T<Self>) -> Result<()> {
        cached::cached_select(self, s, scores, rows, idx)
    }
    fn qmatmul(&self, s: &QMatmulSpec, x: &T<Self>, w: &QWeight<Self>, y: &mut T<Self>) -> Result<()> {
        qmatmul::qmatmul(self, s, x, w, y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_sizes_never_round_past_the_binding_limit() {
        let vk = (1u64 << 31) - 1;
        // A bucket just under 2 GiB rounds up to 2 GiB: past a 2³¹−1 limit.
        let bytes = (1usize << 31) - 100 * 1024 * 1024;
        assert!(bucket(bytes) > vk);
        let s = buffer_size(bytes, vk).unwrap();
        assert!(s >= bytes as u64 && s <= vk && s.is_multiple_of(4), "{s}");
        assert_eq!(buffer_size(1000, vk), Ok(bucket(1000)), "small sizes keep their bucket");
        assert_eq!(buffer_size(vk as usize - 3, vk), Ok(vk - 3), "the largest word-padded size fits");
        assert_eq!(buffer_size(vk as usize, vk), Err(vk), "one byte more does not");
        let webgpu = 128 << 20;
        assert_eq!(buffer_size(webgpu as usize, webgpu), Ok(webgpu));
        assert_eq!(buffer_size(webgpu as usize + 1, webgpu), Err(webgpu));
    }

    #[test]
    fn pool_buckets_round_up_and_share_nearby_sizes() {
        assert_eq!(bucket(0), 256);
        assert_eq!(bucket(257), 512);
        assert_eq!(bucket(100_000), bucket(98_305));
        assert!(bucket(100_000) >= 100_000);
        for b in [1usize, 255, 4097, 65_537, 1 << 20, (1 << 20) + 1, 123_456_789] {
            assert!(bucket(b) >= b as u64 && bucket(b) < 2 * b.max(256) as u64, "{b}");
        }
    }
}
