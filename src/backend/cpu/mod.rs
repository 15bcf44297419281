//! The CPU backend: plain, obviously correct Rust, the reference every other
//! backend is compared against, and the fallback on machines without a GPU.
//!
//! Every op reads its inputs as f32, computes in f32 (longer reductions in
//! f64), and rounds each output element once to its dtype, which is what the
//! GPU kernels do too. Matmul goes through `matrixmultiply`; row-wise ops run
//! in parallel with rayon.

mod adamw;
mod attention;
mod cached;
mod convert;
mod cross_entropy;
mod elementwise;
mod embedding;
mod gelu;
mod gemm;
mod indexer_train;
mod layernorm;
mod matmul;
mod qmatmul;
mod reduce;
mod rope;
mod simd;
mod softmax;
mod vmath;

use std::ops::Range;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use half::{bf16, f16};

use super::{Backend, BackendKind, MemoryCounter, MemoryStats};
use crate::attention::cached::{CachedAttentionSpec, CachedIndexerSpec, CachedSelectSpec};
use crate::attention::ops::{AttentionSpec, IndexerLossSpec, IndexerSpec, IndexerTrainSpec, SelectSpec};
use crate::error::{Error, Result};
use crate::ops::*;
use crate::{DType, Tensor};

/// The reference backend. Cheap to create; clones share nothing.
#[derive(Debug, Default)]
pub struct CpuBackend {
    mem: MemoryCounter,
}

impl CpuBackend {
    pub fn new() -> Self {
        Self::default()
    }
}

pub(crate) enum Storage {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
}

/// A borrowed element range of one dtype.
pub(crate) enum SliceRef<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
    U32(&'a [u32]),
    I32(&'a [i32]),
}

/// A mutably borrowed element range of one dtype.
pub(crate) enum SliceMut<'a> {
    F32(&'a mut [f32]),
    F16(&'a mut [f16]),
    BF16(&'a mut [bf16]),
    U32(&'a mut [u32]),
    I32(&'a mut [i32]),
}

/// A host allocation of one dtype, or a view of an element range of one.
///
/// The storage sits behind `Arc<RwLock<…>>` so that views of a flat buffer
/// (parameters, gradients, moments) share it safely: an op read-locks its
/// inputs and write-locks its outputs for the op's duration. An op that
/// reads one view and writes another view of the *same* allocation cannot
/// take the write lock; it panics with a clear message instead of
/// deadlocking ([`CpuBuffer::lock_mut`]). No training op does that: params,
/// grads and the two moments are separate flat allocations.
pub struct CpuBuffer {
    data: Arc<RwLock<Storage>>,
    /// The elements of `data` this buffer covers (all of them unless a view).
    range: Range<usize>,
    bytes: usize,
    /// The allocation's counter; `None` for a view (a view allocates nothing).
    mem: Option<MemoryCounter>,
}

impl Drop for CpuBuffer {
    fn drop(&mut self) {
        if let Some(m) = &self.mem {
            m.free(self.bytes);
        }
    }
}

const ALIASED: &str = "cpu backend: an op writes a view of a buffer that it also reads through another view \
     (views of one flat buffer must not be an op's input and output at once)";

/// A read lock on a buffer's elements.
pub(crate) struct ReadGuard<'a> {
    g: RwLockReadGuard<'a, Storage>,
    r: Range<usize>,
}

impl ReadGuard<'_> {
    pub(crate) fn slice(&self) -> SliceRef<'_> {
        let r = self.r.clone();
        match &*self.g {
            Storage::F32(v) => SliceRef::F32(&v[r]),
            Storage::F16(v) => SliceRef::F16(&v[r]),
            Storage::BF16(v) => SliceRef::BF16(&v[r]),
            Storage::U32(v) => SliceRef::U32(&v[r]),
            Storage::I32(v) => SliceRef::I32(&v[r]),
        }
    }
}

/// A write lock on a buffer's elements.
pub(crate) struct WriteGuard<'a> {
    g: RwLockWriteGuard<'a, Storage>,
    r: Range<usize>,
}

impl WriteGuard<'_> {
    pub(crate) fn slice(&mut self) -> SliceMut<'_> {
        let r = self.r.clone();
        match &mut *self.g {
            Storage::F32(v) => SliceMut::F32(&mut v[r]),
            Storage::F16(v) => SliceMut::F16(&mut v[r]),
            Storage::BF16(v) => SliceMut::BF16(&mut v[r]),
            Storage::U32(v) => SliceMut::U32(&mut v[r]),
            Storage::I32(v) => SliceMut::I32(&mut v[r]),
        }
    }
}

/// Element types a locked range derefs to without a copy.
pub(crate) trait Elem: Sized {
    fn of(s: &Storage) -> &[Self];
}
impl Elem for f32 {
    fn of(s: &Storage) -> &[f32] {
        match s {
            Storage::F32(v) => v,
            _ => unreachable!("only f32 storage is borrowed as f32"),
        }
    }
}
impl Elem for u32 {
    fn of(s: &Storage) -> &[u32] {
        match s {
            Storage::U32(v) => v,
            _ => unreachable!("op validation guarantees a u32 buffer"),
        }
    }
}

/// Elements as `T`: a read-locked range of the buffer (no copy) or a
/// converted copy. Derefs to `[T]`.
pub(crate) enum Elems<'a, T: Elem> {
    Locked(RwLockReadGuard<'a, Storage>, Range<usize>),
    Owned(Vec<T>),
}

impl<T: Elem> std::ops::Deref for Elems<'_, T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match self {
            Elems::Locked(g, r) => &T::of(g)[r.clone()],
            Elems::Owned(v) => v,
        }
    }
}

impl CpuBuffer {
    fn len(&self) -> usize {
        self.range.len()
    }

    /// Read-locks the storage (shared: many readers at once).
    pub(crate) fn lock(&self) -> ReadGuard<'_> {
        ReadGuard { g: self.read_lock(), r: self.range.clone() }
    }

    /// The shared lock. Writers never wait (see [`CpuBuffer::lock_mut`]), so
    /// this fails only while the same op write-locks the allocation: it
    /// panics with the cause instead of deadlocking.
    fn read_lock(&self) -> RwLockReadGuard<'_, Storage> {
        match self.data.try_read() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => panic!("{ALIASED}"),
        }
    }

    /// Write-locks the storage. Panics (instead of deadlocking) when the
    /// allocation is read-locked meanwhile, i.e. when an op reads and writes
    /// views of the same flat buffer, which no op may do.
    pub(crate) fn lock_mut(&mut self) -> WriteGuard<'_> {
        let g = match self.data.try_write() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => panic!("{ALIASED}"),
        };
        WriteGuard { g, r: self.range.clone() }
    }

    /// The elements as f32 (borrowed when already f32).
    pub(crate) fn f32s(&self) -> Elems<'_, f32> {
        self.f32_range(0, self.len())
    }

    /// The elements of a U32 buffer (the op specs guarantee the dtype).
    pub(crate) fn u32s(&self) -> Elems<'_, u32> {
        Elems::Locked(self.read_lock(), self.range.clone())
    }

    /// Overwrites the buffer with f32 values rounded to its dtype.
    pub(crate) fn store(&mut self, vals: &[f32]) {
        match self.lock_mut().slice() {
            SliceMut::F32(v) => v.copy_from_slice(vals),
            SliceMut::F16(v) => convert::narrow_f16(vals, v),
            SliceMut::BF16(v) => convert::narrow_bf16(vals, v),
            SliceMut::U32(v) => v.iter_mut().zip(vals).for_each(|(o, &x)| *o = x as u32),
            SliceMut::I32(v) => v.iter_mut().zip(vals).for_each(|(o, &x)| *o = x as i32),
        }
    }

    /// Overwrites a U32 buffer (the op specs guarantee the dtype).
    pub(crate) fn store_u32(&mut self, vals: &[u32]) {
        match self.lock_mut().slice() {
            SliceMut::U32(v) => v.copy_from_slice(vals),
            _ => unreachable!("op validation guarantees a u32 buffer"),
        }
    }

    /// Fills every element with `f`'s output: directly for f32, through a
    /// temporary for other dtypes. `f` must write every element.
    pub(crate) fn produce(&mut self, f: impl FnOnce(&mut [f32])) {
        {
            let mut g = self.lock_mut();
            if let SliceMut::F32(v) = g.slice() {
                f(v);
                return;
            }
        }
        let mut tmp = vec![0.0f32; self.len()];
        f(&mut tmp);
        self.store(&tmp);
    }

    /// Read-modify-write of every element as f32.
    pub(crate) fn update(&mut self, f: impl FnOnce(&mut [f32])) {
        {
            let mut g = self.lock_mut();
            if let SliceMut::F32(v) = g.slice() {
                f(v);
                return;
            }
        }
        let mut tmp = self.f32s().to_vec();
        f(&mut tmp);
        self.store(&tmp);
    }

    /// Elements `start..start + len` as f32 (borrowed when already f32).
    fn f32_range(&self, start: usize, len: usize) -> Elems<'_, f32> {
        let v = simd::simd();
        let g = self.read_lock();
        let r = self.range.start + start..self.range.start + start + len;
        let widen = |f: &dyn Fn(&mut [f32])| {
            let mut out = vec![0.0; len];
            f(&mut out);
            Elems::Owned(out)
        };
        if matches!(&*g, Storage::F32(_)) {
            return Elems::Locked(g, r);
        }
        match &*g {
            Storage::F32(_) => unreachable!("borrowed above"),
            Storage::F16(x) => widen(&|o| convert::widen_f16_with(v, &x[r.clone()], o)),
            Storage::BF16(x) => widen(&|o| convert::widen_bf16_with(v, &x[r.clone()], o)),
            Storage::U32(x) => Elems::Owned(x[r].iter().map(|&e| e as f32).collect()),
            Storage::I32(x) => Elems::Owned(x[r].iter().map(|&e| e as f32).collect()),
        }
    }
}

/// Runs `f(first, ins, out)` over consecutive chunks of `chunk` elements of
/// `out` in parallel (`first` = the chunk's first element): each of `ins` is
/// the same element range of its buffer as f32, `out` the chunk as f32 (its
/// old values when `read_out`, else unspecified: `f` must write every
/// element), rounded once into the buffer's dtype after `f`. For f16/bf16 the
/// conversions happen per chunk, inside the task, into scratch that the task
/// reuses from chunk to chunk: no whole-tensor f32 copies of the inputs and
/// of the output (what `rd` + `produce` do), and no fresh zeroed allocation
/// per chunk.
pub(crate) fn chunked<const N: usize>(
    out: &mut CpuBuffer,
    ins: [&CpuBuffer; N],
    chunk: usize,
    read_out: bool,
    f: impl Fn(usize, [&[f32]; N], &mut [f32]) + Sync,
) {
    use rayon::prelude::*;
    let chunk = chunk.max(1);
    let v = simd::simd();
    let guards: [ReadGuard<'_>; N] = std::array::from_fn(|j| ins[j].lock());
    let srcs: [SliceRef<'_>; N] = std::array::from_fn(|j| guards[j].slice());
    let scratch = || -> [Vec<f32>; N] { std::array::from_fn(|_| Vec::new()) };
    let run = |sc: &mut [Vec<f32>; N], i: usize, o: &mut [f32]| {
        let mut sc = sc.iter_mut();
        let refs: [&[f32]; N] =
            std::array::from_fn(|j| f32_part(&srcs[j], i * chunk, o.len(), sc.next().expect("one scratch per input")));
        f(i * chunk, refs, o);
    };
    let mut g = out.lock_mut();
    match g.slice() {
        SliceMut::F32(x) => x.par_chunks_mut(chunk).enumerate().for_each_init(scratch, |sc, (i, o)| run(sc, i, o)),
        SliceMut::F16(x) => x.par_chunks_mut(chunk).enumerate().for_each_init(
            || (scratch(), Vec::new()),
            |(sc, tmp), (i, o)| {
                tmp.resize(o.len(), 0.0);
                if read_out {
                    convert::widen_f16_with(v, o, tmp);
                }
                run(sc, i, tmp);
                convert::narrow_f16_with(v, tmp, o);
            },
        ),
        SliceMut::BF16(x) => x.par_chunks_mut(chunk).enumerate().for_each_init(
            || (scratch(), Vec::new()),
            |(sc, tmp), (i, o)| {
                tmp.resize(o.len(), 0.0);
                if read_out {
                    convert::widen_bf16_with(v, o, tmp);
                }
                run(sc, i, tmp);
                convert::narrow_bf16_with(v, tmp, o);
            },
        ),
        SliceMut::U32(_) | SliceMut::I32(_) => {
            drop(g);
            let mut sc = scratch();
            let each = |o: &mut [f32]| o.chunks_mut(chunk).enumerate().for_each(|(i, o)| run(&mut sc, i, o));
            if read_out { out.update(each) } else { out.produce(each) }
        }
    }
}

/// Elements `start..start + len` of a locked slice as f32: borrowed for
/// f32, widened (exactly) into `scratch` for f16/bf16. Lets an op convert the
/// part it is about to use, cache-local, instead of a whole-tensor f32 copy.
pub(crate) fn f32_part<'a>(src: &SliceRef<'a>, start: usize, len: usize, scratch: &'a mut Vec<f32>) -> &'a [f32] {
    let v = simd::simd();
    match *src {
        SliceRef::F32(x) => &x[start..start + len],
        SliceRef::F16(x) => {
            scratch.resize(len, 0.0);
            convert::widen_f16_with(v, &x[start..start + len], scratch);
            scratch
        }
        SliceRef::BF16(x) => {
            scratch.resize(len, 0.0);
            convert::widen_bf16_with(v, &x[start..start + len], scratch);
            scratch
        }
        SliceRef::U32(x) => {
            scratch.clear();
            scratch.extend(x[start..start + len].iter().map(|&e| e as f32));
            scratch
        }
        SliceRef::I32(x) => {
            scratch.clear();
            scratch.extend(x[start..start + len].iter().map(|&e| e as f32));
            scratch
        }
    }
}

/// `rows` rows of `width` elements, row `i` at element `start + i·stride` of
/// a locked slice, as f32: `(elements, row stride)`, borrowed in place
/// (stride `stride`) for f32, widened into `scratch` packed (stride `width`)
/// for f16/bf16.
pub(crate) fn f32_rows<'a>(
    src: &SliceRef<'a>,
    start: usize,
    stride: usize,
    rows: usize,
    width: usize,
    scratch: &'a mut Vec<f32>,
) -> (&'a [f32], usize) {
    let v = simd::simd();
    if let SliceRef::F32(x) = *src {
        return (&x[start.min(x.len())..], stride);
    }
    scratch.resize(rows * width, 0.0);
    for (i, dst) in scratch.chunks_exact_mut(width).enumerate() {
        let s = start + i * stride;
        match *src {
            SliceRef::F16(x) => convert::widen_f16_with(v, &x[s..s + width], dst),
            SliceRef::BF16(x) => convert::widen_bf16_with(v, &x[s..s + width], dst),
            _ => unreachable!("op validation guarantees a float buffer"),
        }
    }
    (scratch, width)
}

impl CpuBuffer {
    /// Writes f32 rows at element offsets, each element rounded once to the
    /// buffer's dtype (no whole-tensor f32 copy). Elements no row covers keep
    /// their values.
    pub(crate) fn store_rows<'r>(&mut self, rows: impl Iterator<Item = (usize, &'r [f32])>) {
        let v = simd::simd();
        let mut g = self.lock_mut();
        match g.slice() {
            SliceMut::F32(x) => rows.for_each(|(o, r)| x[o..o + r.len()].copy_from_slice(r)),
            SliceMut::F16(x) => rows.for_each(|(o, r)| convert::narrow_f16_with(v, r, &mut x[o..o + r.len()])),
            SliceMut::BF16(x) => rows.for_each(|(o, r)| convert::narrow_bf16_with(v, r, &mut x[o..o + r.len()])),
            SliceMut::U32(_) | SliceMut::I32(_) => unreachable!("op validation guarantees a float buffer"),
        }
    }
}

/// The f32 view of a tensor's elements.
fn rd(t: &Tensor<CpuBackend>) -> Elems<'_, f32> {
    t.buf.f32s()
}

impl Backend for CpuBackend {
    type Buffer = CpuBuffer;

    fn kind(&self) -> BackendKind {
        BackendKind::Cpu
    }
    fn device_name(&self) -> String {
        format!("host CPU ({} threads, {} kernels)", rayon::current_num_threads(), simd::simd().name())
    }
    fn supports(&self, _dtype: DType) -> bool {
        true
    }
    fn memory(&self) -> MemoryStats {
        self.mem.stats()
    }
    fn reset_peak(&self) {
        self.mem.reset_peak()
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    fn supports_views(&self) -> bool {
        true
    }

    fn alloc(&self, dtype: DType, len: usize) -> Result<CpuBuffer> {
        let data = match dtype {
            DType::F32 => Storage::F32(vec![0.0; len]),
            // Zeroed allocations (fresh zero pages for large buffers, as
            // `vec![0.0; len]` gets for f32): `vec![bf16::ZERO; len]` writes
            // every element, a memset of each half-precision activation.
            DType::F16 => Storage::F16(bytemuck::zeroed_vec(len)),
            DType::BF16 => Storage::BF16(bytemuck::zeroed_vec(len)),
            DType::U32 => Storage::U32(vec![0; len]),
            DType::I32 => Storage::I32(vec![0; len]),
        };
        let bytes = len * dtype.size();
        self.mem.alloc(bytes);
        Ok(CpuBuffer { data: Arc::new(RwLock::new(data)), range: 0..len, bytes, mem: Some(self.mem.clone()) })
    }

    fn view(&self, base: &CpuBuffer, dtype: DType, offset: usize, len: usize) -> Result<CpuBuffer> {
        let end = offset.checked_add(len).filter(|&e| e <= base.len()).ok_or_else(|| {
            Error::Shape(format!("view: elements {offset}..{offset}+{len} of a buffer of {}", base.len()))
        })?;
        let _ = dtype;
        Ok(CpuBuffer {
            data: base.data.clone(),
            range: base.range.start + offset..base.range.start + end,
            bytes: len * dtype.size(),
            mem: None,
        })
    }

    fn upload(&self, dtype: DType, bytes: &[u8]) -> Result<CpuBuffer> {
        let mut buf = self.alloc(dtype, bytes.len() / dtype.size())?;
        self.write(&mut buf, dtype, bytes)?;
        Ok(buf)
    }

    fn write(&self, buf: &mut CpuBuffer, dtype: DType, bytes: &[u8]) -> Result<()> {
        if bytes.len() != buf.bytes {
            return Err(Error::Shape(format!(
                "write: {} bytes into a {dtype} buffer of {} bytes",
                bytes.len(),
                buf.bytes
            )));
        }
        match buf.lock_mut().slice() {
            SliceMut::F32(v) => bytemuck::cast_slice_mut(v).copy_from_slice(bytes),
            SliceMut::F16(v) => bytemuck::cast_slice_mut(v).copy_from_slice(bytes),
            SliceMut::BF16(v) => bytemuck::cast_slice_mut(v).copy_from_slice(bytes),
            SliceMut::U32(v) => bytemuck::cast_slice_mut(v).copy_from_slice(bytes),
            SliceMut::I32(v) => bytemuck::cast_slice_mut(v).copy_from_slice(bytes),
        }
        Ok(())
    }

    fn download(&self, buf: &CpuBuffer, dtype: DType, len: usize) -> Result<Vec<u8>> {
        self.mem.download();
        let g = buf.lock();
        let all: &[u8] = match g.slice() {
            SliceRef::F32(v) => bytemuck::cast_slice(v),
            SliceRef::F16(v) => bytemuck::cast_slice(v),
            SliceRef::BF16(v) => bytemuck::cast_slice(v),
            SliceRef::U32(v) => bytemuck::cast_slice(v),
            SliceRef::I32(v) => bytemuck::cast_slice(v),
        };
        let n = len * dtype.size();
        all.get(..n)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| Error::Shape(format!("download: {n} bytes from a buffer of {}", all.len())))
    }

    fn matmul(&self, s: &MatmulSpec, a: &Tensor<Self>, b: &Tensor<Self>, c: &mut Tensor<Self>) -> Result<()> {
        matmul::matmul(s, a, b, c);
        Ok(())
    }
    fn qmatmul(&self, s: &QMatmulSpec, x: &Tensor<Self>, w: &QWeight<Self>, y: &mut Tensor<Self>) -> Result<()> {
        qmatmul::qmatmul(s, x, w, y);
        Ok(())
    }
    fn fill(&self, s: &FillSpec, x: &mut Tensor<Self>) -> Result<()> {
        x.buf.produce(|o| o.fill(s.value));
        Ok(())
    }
    fn add(&self, _s: &ElementwiseSpec, a: &Tensor<Self>, b: &Tensor<Self>, out: &mut Tensor<Self>) -> Result<()> {
        elementwise::add(a, b, out);
        Ok(())
    }
    fn axpby(&self, s: &AxpbySpec, x: &Tensor<Self>, y: &mut Tensor<Self>) -> Result<()> {
        elementwise::axpby(s, x, y);
        Ok(())
    }
    fn scale(&self, s: &ScaleSpec, x: &mut Tensor<Self>) -> Result<()> {
        elementwise::scale(s, x);
        Ok(())
    }
    fn bias_add(&self, s: &BiasSpec, x: &mut Tensor<Self>, bias: &Tensor<Self>) -> Result<()> {
        elementwise::bias_add(s, x, bias);
        Ok(())
    }
    fn sum_rows(&self, s: &SumRowsSpec, x: &Tensor<Self>, out: &mut Tensor<Self>) -> Result<()> {
        elementwise::sum_rows(s, x, out);
        Ok(())
    }
    fn cast(&self, _s: &ElementwiseSpec, x: &Tensor<Self>, y: &mut Tensor<Self>) -> Result<()> {
        // Per chunk: widened, then rounded to y's dtype (f16/bf16 → the same
        // dtype is the identity but for a quietened signalling NaN, as ever).
        chunked(&mut y.buf, [&x.buf], 1 << 13, false, |_, [x], o| o.copy_from_slice(x));
        Ok(())
    }
    fn gelu(&self, _s: &ElementwiseSpec, x: &Tensor<Self>, y: &mut Tensor<Self>) -> Result<()> {
        gelu::gelu(x, y);
        Ok(())
    }
    fn gelu_backward(
        &self,
        _s: &ElementwiseSpec,
        x: &Tensor<Self>,
        dy: &Tensor<Self>,
        dx: &mut Tensor<Self>,
    ) -> Result<()> {
        gelu::gelu_backward(x, dy, dx);
        Ok(())
    }
    fn bias_gelu(&self, s: &BiasSpec, x: &Tensor<Self>, bias: &Tensor<Self>, y: &mut Tensor<Self>) -> Result<()> {
        gelu::bias_gelu(s, x, bias, y);
        Ok(())
    }
    fn layernorm(
        &self,
        s: &LayerNormSpec,
        x: &Tensor<Self>,
        gamma: &Tensor<Self>,
        beta: &Tensor<Self>,
        y: &mut Tensor<Self>,
        mean: &mut Tensor<Self>,
        rstd: &mut Tensor<Self>,
    ) -> Result<()> {
        layernorm::forward(s, x, gamma, beta, y, mean, rstd);
        Ok(())
    }
    fn layernorm_backward(
        &self,
        s: &LayerNormSpec,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        gamma: &Tensor<Self>,
        mean: &Tensor<Self>,
        rstd: &Tensor<Self>,
        dx: &mut Tensor<Self>,
        dgamma: &mut Tensor<Self>,
        dbeta: &mut Tensor<Self>,
    ) -> Result<()> {
        layernorm::backward(s, dy, x, gamma, mean, rstd, dx, dgamma, dbeta);
        Ok(())
    }
    fn softmax(&self, s: &SoftmaxSpec, x: &Tensor<Self>, y: &mut Tensor<Self>) -> Result<()> {
        softmax::forward(s, x, y);
        Ok(())
    }
    fn softmax_backward(
        &self,
        s: &SoftmaxSpec,
        y: &Tensor<Self>,
        dy: &Tensor<Self>,
        dx: &mut Tensor<Self>,
    ) -> Result<()> {
        softmax::backward(s, y, dy, dx);
        Ok(())
    }
    fn rope(
        &self,
        s: &RopeSpec,
        x: &Tensor<Self>,
        cos: &Tensor<Self>,
        sin: &Tensor<Self>,
        y: &mut Tensor<Self>,
    ) -> Result<()> {
        rope::rope(s, x, cos, sin, y);
        Ok(())
    }
    fn embedding(
        &self,
        s: &EmbeddingSpec,
        ids: &Tensor<Self>,
        table: &Tensor<Self>,
        out: &mut Tensor<Self>,
    ) -> Result<()> {
        embedding::forward(s, ids, table, out);
        Ok(())
    }
    fn embedding_backward(
        &self,
        s: &EmbeddingSpec,
        ids: &Tensor<Self>,
        dout: &Tensor<Self>,
        dtable: &mut Tensor<Self>,
    ) -> Result<()> {
        embedding::backward(s, ids, dout, dtable);
        Ok(())
    }
    fn cross_entropy(
        &self,
        s: &CrossEntropySpec,
        logits: &Tensor<Self>,
        targets: &Tensor<Self>,
        losses: &mut Tensor<Self>,
    ) -> Result<()> {
        cross_entropy::forward(s, logits, targets, losses);
        Ok(())
    }
    fn cross_entropy_backward(
        &self,
        s: &CrossEntropySpec,
        logits: &Tensor<Self>,
        targets: &Tensor<Self>,
        dlogits: &mut Tensor<Self>,
    ) -> Result<()> {
        cross_entropy::backward(s, logits, targets, dlogits);
        Ok(())
    }
    fn sum_squares(&self, _s: &ReduceSpec, x: &Tensor<Self>, out: &mut Tensor<Self>) -> Result<()> {
        out.buf.store(&[reduce::sum_squares(&rd(x))]);
        Ok(())
    }
    fn all_finite(&self, _s: &ReduceSpec, x: &Tensor<Self>, out: &mut Tensor<Self>) -> Result<()> {
        out.buf.store(&[if rd(x).iter().all(|v| v.is_finite()) { 1.0 } else { 0.0 }]);
        Ok(())
    }
    fn adamw(
        &self,
        s: &AdamWSpec,
        params: &mut Tensor<Self>,
        grads: &Tensor<Self>,
        m: &mut Tensor<Self>,
        v: &mut Tensor<Self>,
        copy: Option<&mut Tensor<Self>>,
    ) -> Result<()> {
        adamw::step(s, params, grads, m, v, copy);
        Ok(())
    }

    fn attention(
        &self,
        s: &AttentionSpec,
        q: &Tensor<Self>,
        k: &Tensor<Self>,
        v: &Tensor<Self>,
        idx: Option<&Tensor<Self>>,
        o: &mut Tensor<Self>,
        lse: &mut Tensor<Self>,
    ) -> Result<()> {
        attention::forward(s, q, k, v, idx, o, lse);
        Ok(())
    }
    fn attention_backward(
        &self,
        s: &AttentionSpec,
        q: &Tensor<Self>,
        k: &Tensor<Self>,
        v: &Tensor<Self>,
        o: &Tensor<Self>,
        lse: &Tensor<Self>,
        d_o: &Tensor<Self>,
        idx: Option<&Tensor<Self>>,
        dq: &mut Tensor<Self>,
        dk: &mut Tensor<Self>,
        dv: &mut Tensor<Self>,
    ) -> Result<()> {
        attention::backward(s, q, k, v, o, lse, d_o, idx, dq, dk, dv);
        Ok(())
    }
    fn indexer_scores(
        &self,
        s: &IndexerSpec,
        qi: &Tensor<Self>,
        ki: &Tensor<Self>,
        w: &Tensor<Self>,
        scores: &mut Tensor<Self>,
    ) -> Result<()> {
        attention::indexer_scores(s, qi, ki, w, scores);
        Ok(())
    }
    fn indexer_block_scores(
        &self,
        s: &IndexerSpec,
        qi: &Tensor<Self>,
        ki: &Tensor<Self>,
        w: &Tensor<Self>,
        pooled: &mut Tensor<Self>,
    ) -> Result<()> {
        attention::indexer_block_scores(s, qi, ki, w, pooled);
        Ok(())
    }
    fn select_topk(&self, s: &SelectSpec, scores: &Tensor<Self>, idx: &mut Tensor<Self>) -> Result<()> {
        attention::select_topk(s, scores, idx);
        Ok(())
    }
    fn indexer_kl(
        &self,
        s: &IndexerLossSpec,
        q: &Tensor<Self>,
        k: &Tensor<Self>,
        lse: &Tensor<Self>,
        scores: &Tensor<Self>,
        idx: Option<&Tensor<Self>>,
        loss: &mut Tensor<Self>,
        dscores: &mut Tensor<Self>,
    ) -> Result<()> {
        attention::indexer_kl(s, q, k, lse, scores, idx, loss, dscores);
        Ok(())
    }
    fn indexer_backward(
        &self,
        s: &IndexerSpec,
        qi: &Tensor<Self>,
        ki: &Tensor<Self>,
        w: &Tensor<Self>,
        dscores: &Tensor<Self>,
        dqi: &mut Tensor<Self>,
        dki: &mut Tensor<Self>,
        dw: &mut Tensor<Self>,
    ) -> Result<()> {
        attention::indexer_backward(s, qi, ki, w, dscores, dqi, dki, dw);
        Ok(())
    }
    fn indexer_train_kept(
        &self,
        s: &IndexerTrainSpec,
        qi: &Tensor<Self>,
        ki: &Tensor<Self>,
        w: &Tensor<Self>,
        q: &Tensor<Self>,
        k: &Tensor<Self>,
        lse: &Tensor<Self>,
        idx: &Tensor<Self>,
        loss: &mut Tensor<Self>,
        dqi: &mut Tensor<Self>,
        dki: &mut Tensor<Self>,
        dw: &mut Tensor<Self>,
    ) -> Result<bool> {
        indexer_train::indexer_train_kept(s, qi, ki, w, q, k, lse, idx, loss, dqi, dki, dw);
        Ok(true)
    }
    fn rope_rows(
        &self,
        s: &RopeSpec,
        x: &Tensor<Self>,
        cos: &Tensor<Self>,
        sin: &Tensor<Self>,
        rows: &Tensor<Self>,
        y: &mut Tensor<Self>,
    ) -> Result<()> {
        cached::rope_rows(s, x, cos, sin, rows, y);
        Ok(())
    }
    fn cache_write(
        &self,
        s: &CacheWriteSpec,
        src: &Tensor<Self>,
        rows: &Tensor<Self>,
        pages: &Tensor<Self>,
        cache: &mut Tensor<Self>,
    ) -> Result<()> {
        cached::cache_write(s, src, rows, pages, cache);
        Ok(())
    }
    fn cached_attention(
        &self,
        s: &CachedAttentionSpec,
        q: &Tensor<Self>,
        k: &Tensor<Self>,
        v: &Tensor<Self>,
        rows: &Tensor<Self>,
        pages: &Tensor<Self>,
        idx: Option<&Tensor<Self>>,
        o: &mut Tensor<Self>,
    ) -> Result<()> {
        cached::cached_attention(s, q, k, v, rows, pages, idx, o);
        Ok(())
    }
    fn cached_indexer_block_scores(
        &self,
        s: &CachedIndexerSpec,
        qi: &Tensor<Self>,
        w: &Tensor<Self>,
        ki: &Tensor<Self>,
        rows: &Tensor<Self>,
        pages: &Tensor<Self>,
        pooled: &mut Tensor<Self>,
    ) -> Result<()> {
        cached::cached_indexer_block_scores(s, qi, w, ki, rows, pages, pooled);
        Ok(())
    }
    fn cached_select(
        &self,
        s: &CachedSelectSpec,
        scores: &Tensor<Self>,
        rows: &Tensor<Self>,
        idx: &mut Tensor<Self>,
    ) -> Result<()> {
        cached::cached_select(s, scores, rows, idx);
        Ok(())
    }
}
