//! NCCL collectives (feature `nccl`): one process per GPU, libnccl loaded at
//! run time through cudarc (the build needs no toolkit). Rank 0's unique id
//! reaches the other ranks through [`Bootstrap`] (a rendezvous file or TCP on
//! `MASTER_ADDR:MASTER_PORT`); after that every byte moves inside NCCL.
//!
//! Two ways in:
//! - the [`Collective`] trait on host slices: staged through a device scratch
//!   buffer (upload, collective, download; correct, slow), for code that
//!   holds host gradients;
//! - `*_device` methods on a range of a [`CudaBuffer`] of the backend the
//!   communicator was made from, in place, enqueued on that backend's stream
//!   (ordered after the ops that wrote the buffer, before those that read
//!   it) with no host staging; [`Nccl::wait`] waits for them.
//!
//! Timeouts: NCCL calls only enqueue. [`Nccl::wait`] polls the stream and
//! `ncclCommGetAsyncError`; an asynchronous NCCL error or a wait past the
//! timeout aborts the communicator (`ncclCommAbort`, which also ends the
//! kernels stuck waiting for a dead peer) and returns [`Error::Collective`];
//! every later call on it fails with the same message. `ncclCommInitRank`
//! itself blocks until every rank has joined and has no timeout here (the
//! bootstrap before it has one).

use std::ffi::c_void;
use std::mem::MaybeUninit;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr};
use cudarc::nccl::{result as nres, sys as nsys};

use super::nccl_prep::{Bootstrap, NCCL_ID_BYTES, byte_span, check_id, shard_plan};
use super::{Collective, LaunchEnv, ReduceOp, check_shard};
use crate::DType;
use crate::backend::cuda::{CudaBackend, CudaBuffer};
use crate::error::{Error, Result};

/// Whether libnccl can be loaded (checked before any call that would panic without it).
pub fn nccl_present() -> bool {
    // SAFETY: only tries to dlopen libnccl by its usual names; no symbol is called.
    unsafe { nsys::is_culib_present() }
}

fn need_nccl() -> Result<()> {
    if nccl_present() {
        Ok(())
    } else {
        Err(Error::Unavailable(
            "libnccl.so could not be loaded (install NCCL, e.g. the nvidia-nccl-cu12 wheel, link libnccl.so to its libnccl.so.2 and add that folder to LD_LIBRARY_PATH)".into(),
        ))
    }
}

/// A fresh unique id (rank 0).
pub fn new_id() -> Result<[u8; NCCL_ID_BYTES]> {
    need_nccl()?;
    let id = nres::get_uniqueid().map_err(|e| Error::Collective(format!("ncclGetUniqueId: {e:?}")))?;
    Ok(id.internal.map(|c| c as u8))
}

fn nccl_dtype(dtype: DType) -> nsys::ncclDataType_t {
    use nsys::ncclDataType_t as T;
    match dtype {
        DType::F32 => T::ncclFloat32,
        DType::F16 => T::ncclFloat16,
        DType::BF16 => T::ncclBfloat16,
        DType::U32 => T::ncclUint32,
        DType::I32 => T::ncclInt32,
    }
}

fn nccl_op(op: ReduceOp) -> nsys::ncclRedOp_t {
    use nsys::ncclRedOp_t as O;
    match op {
        ReduceOp::Sum => O::ncclSum,
        ReduceOp::Avg => O::ncclAvg,
        ReduceOp::Min => O::ncclMin,
        ReduceOp::Max => O::ncclMax,
    }
}

struct Raw {
    comm: nsys::ncclComm_t,
    /// Why the communicator was aborted; every later call fails with it.
    aborted: Option<String>,
}

// SAFETY: an NCCL communicator may be used from any thread, one call at a time;
// `Raw` lives inside a Mutex, so calls are serialised.
unsafe impl Send for Raw {}

/// One rank's NCCL communicator, bound to one CUDA backend's device and stream.
pub struct Nccl {
    raw: Mutex<Raw>,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
    timeout: Duration,
    /// Device staging of the host-slice [`Collective`] methods, grown on demand.
    scratch: Mutex<Option<CudaSlice<f32>>>,
}

impl Nccl {
    /// Joins a group of `world` ranks as `rank` with rank 0's unique `id`, on
    /// `be`'s device and stream. Blocks until every rank has joined.
    pub fn init(be: &CudaBackend, rank: usize, world: usize, id: &[u8], timeout: Duration) -> Result<Nccl> {
        need_nccl()?;
        let id = check_id(id)?;
        if world == 0 || rank >= world {
            return Err(Error::Invalid(format!("NCCL: rank {rank} outside world {world}")));
        }
        let (ctx, stream) = be.context_and_stream();
        ctx.bind_to_thread().map_err(|e| Error::Device(format!("binding the CUDA context: {e}")))?;
        let uid = nsys::ncclUniqueId { internal: id.map(|b| b as core::ffi::c_char) };
        let mut comm = MaybeUninit::uninit();
        let (w, r) = (
            i32::try_from(world).map_err(|_| Error::Invalid("NCCL: world past i32".into()))?,
            i32::try_from(rank).map_err(|_| Error::Invalid("NCCL: rank past i32".into()))?,
        );
        // SAFETY: `comm` is written by ncclCommInitRank on success and read only then;
        // the id is 128 bytes as NCCL expects; the CUDA context is bound to this thread.
        let comm = unsafe {
            nres::comm_init_rank(comm.as_mut_ptr(), w, uid, r)
                .map_err(|e| Error::Collective(format!("ncclCommInitRank (rank {rank} of {world}): {e:?}")))?;
            comm.assume_init()
        };
        Ok(Nccl {
            raw: Mutex::new(Raw { comm, aborted: None }),
            ctx: ctx.clone(),
            stream: stream.clone(),
            rank,
            world,
            timeout,
            scratch: Mutex::new(None),
        })
    }

    /// A rank of a torchrun-style job (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
    /// `MASTER_ADDR`, `MASTER_PORT`): rank 0 makes the id and hands it over
    /// through `boot`, every rank joins. `be` should be device `LOCAL_RANK`.
    pub fn from_launch(be: &CudaBackend, env: &LaunchEnv, boot: &Bootstrap, timeout: Duration) -> Result<Nccl> {
        let id = if env.rank == 0 {
            let id = new_id()?;
            boot.publish(&id, env.world, timeout)?;
            id
        } else {
            boot.receive(env.rank, timeout)?
        };
        Nccl::init(be, env.rank, env.world, &id, timeout)
    }

    fn lock(&self) -> Result<MutexGuard<'_, Raw>> {
        let g = self.raw.lock().unwrap_or_else(|e| e.into_inner());
        match &g.aborted {
            Some(why) => {
                Err(Error::Collective(format!("NCCL rank {}: communicator aborted earlier: {why}", self.rank)))
            }
            None => Ok(g),
        }
    }

    fn abort(&self, raw: &mut Raw, why: String) -> Error {
        // SAFETY: `raw.comm` is this communicator, not aborted yet (checked by `lock`).
        let _ = unsafe { nres::comm_abort(raw.comm) };
        let msg = format!("NCCL rank {} of {}: {why}; communicator aborted", self.rank, self.world);
        raw.aborted = Some(why);
        Error::Collective(msg)
    }

    fn cu_stream(&self) -> nsys::cudaStream_t {
        self.stream.cu_stream() as nsys::cudaStream_t
    }

    /// Waits until the stream has run every enqueued collective (and the work
    /// before it), at most the timeout counted from now; see the module doc.
    pub fn wait(&self) -> Result<()> {
        let mut raw = self.lock()?;
        self.wait_locked(&mut raw, "wait")
    }

    fn wait_locked(&self, raw: &mut Raw, op: &str) -> Result<()> {
        use cudarc::driver::sys::{CUresult, cuStreamQuery};
        let t0 = Instant::now();
        let mut spins = 0u32;
        loop {
            // SAFETY: the stream is alive (held by `self.stream`).
            match unsafe { cuStreamQuery(self.stream.cu_stream()) } {
                CUresult::CUDA_SUCCESS => return Ok(()),
                CUresult::CUDA_ERROR_NOT_READY => {}
                e => return Err(self.abort(raw, format!("{op}: the CUDA stream failed ({e:?})"))),
            }
            let mut async_err = nsys::ncclResult_t::ncclSuccess;
            // SAFETY: `raw.comm` is live and not aborted; `async_err` is a live local.
            let _ = unsafe { nsys::ncclCommGetAsyncError(raw.comm, &mut async_err) };
            if !matches!(async_err, nsys::ncclResult_t::ncclSuccess | nsys::ncclResult_t::ncclInProgress) {
                return Err(self.abort(raw, format!("{op}: NCCL reported {async_err:?} (a peer rank died?)")));
            }
            if t0.elapsed() > self.timeout {
                return Err(self.abort(
                    raw,
                    format!("{op} timed out after {:.1} s (a peer rank died or hangs)", self.timeout.as_secs_f64()),
                ));
            }
            // Spin briefly (small messages finish in microseconds), then poll gently.
            spins += 1;
            if spins < 2000 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(100));
            }
        }
    }

    fn call(&self, raw: &mut Raw, op: &str, r: std::result::Result<nres::NcclStatus, nres::NcclError>) -> Result<()> {
        r.map(|_| ()).map_err(|e| self.abort(raw, format!("{op}: {e:?}")))
    }

    // ----- device buffers (in place, enqueued on the backend's stream) -----

    /// All-reduce of elements `range` of `buf` (a `dtype` buffer of the
    /// backend this communicator was made from), in place. Enqueued only.
    pub fn all_reduce_device(
        &self,
        buf: &mut CudaBuffer,
        dtype: DType,
        range: Range<usize>,
        op: ReduceOp,
    ) -> Result<()> {
        self.all_reduce_device_many(buf, dtype, std::slice::from_ref(&range), op)
    }

    /// All-reduces several ranges of `buf` (e.g. gradient buckets) in one NCCL
    /// group call: one launch, NCCL overlaps them. Enqueued only.
    pub fn all_reduce_device_many(
        &self,
        buf: &mut CudaBuffer,
        dtype: DType,
        ranges: &[Range<usize>],
        op: ReduceOp,
    ) -> Result<()> {
        let spans =
            ranges.iter().map(|r| byte_span("all_reduce", dtype, r, buf.len_bytes())).collect::<Result<Vec<_>>>()?;
        let mut raw = self.lock()?;
        let base = buf.device_addr();
        let grouped = spans.len() > 1;
        if grouped {
            let r = nres::group_start();
            self.call(&mut raw, "ncclGroupStart", r)?;
        }
        for (off, count) in spans {
            let p = (base + off as u64) as *mut c_void;
            // SAFETY: `p .. p + count·size` lies inside `buf` (checked by byte_span); the
            // buffer outlives the enqueued call because the backend frees on the same stream.
            let r =
                unsafe { nres::all_reduce(p, p, count, nccl_dtype(dtype), nccl_op(op), raw.comm, self.cu_stream()) };
            self.call(&mut raw, "ncclAllReduce", r)?;
        }
        if grouped {
            let r = nres::group_end();
            self.call(&mut raw, "ncclGroupEnd", r)?;
        }
        Ok(())
    }

    /// In-place reduce-scatter (sum) of `range` of `buf`: the range is split in
    /// `world` equal shards and this rank's shard (returned) receives the sum
    /// of every rank's copy of it. Enqueued only.
    pub fn reduce_scatter_device(
        &self,
        buf: &mut CudaBuffer,
        dtype: DType,
        range: Range<usize>,
    ) -> Result<Range<usize>> {
        byte_span("reduce_scatter", dtype, &range, buf.len_bytes())?;
        let (count, mine) = shard_plan("reduce_scatter", self.world, self.rank, &range)?;
        let mut raw = self.lock()?;
        let send = buf.device_addr() + (range.start * dtype.size()) as u64;
        let recv = buf.device_addr() + (mine.start * dtype.size()) as u64;
        // SAFETY: both spans lie inside `buf` (checked above); recv = send + rank·count
        // is NCCL's in-place layout.
        let r = unsafe {
            nres::reduce_scatter(
                send as *const c_void,
                recv as *mut c_void,
                count,
                nccl_dtype(dtype),
                nccl_op(ReduceOp::Sum),
                raw.comm,
                self.cu_stream(),
            )
        };
        self.call(&mut raw, "ncclReduceScatter", r)?;
        Ok(mine)
    }

    /// In-place all-gather of `range` of `buf`: rank `r`'s shard `r` (as in
    /// [`Nccl::reduce_scatter_device`]) is copied to every rank. Enqueued only.
    pub fn all_gather_device(&self, buf: &mut CudaBuffer, dtype: DType, range: Range<usize>) -> Result<()> {
        byte_span("all_gather", dtype, &range, buf.len_bytes())?;
        let (count, mine) = shard_plan("all_gather", self.world, self.rank, &range)?;
        let mut raw = self.lock()?;
        let recv = buf.device_addr() + (range.start * dtype.size()) as u64;
        let send = buf.device_addr() + (mine.start * dtype.size()) as u64;
        // SAFETY: both spans lie inside `buf`; send = recv + rank·count is NCCL's in-place layout.
        let r = unsafe {
            nres::all_gather(
                send as *const c_void,
                recv as *mut c_void,
                count,
                nccl_dtype(dtype),
                raw.comm,
                self.cu_stream(),
            )
        };
        self.call(&mut raw, "ncclAllGather", r)
    }

    /// In-place broadcast of `range` of `buf` from `root`. Enqueued only.
    pub fn broadcast_device(&self, buf: &mut CudaBuffer, dtype: DType, range: Range<usize>, root: usize) -> Result<()> {
        let (off, count) = byte_span("broadcast", dtype, &range, buf.len_bytes())?;
        if root >= self.world {
            return Err(Error::Invalid(format!("broadcast: root {root} outside world {}", self.world)));
        }
        let mut raw = self.lock()?;
        let p = (buf.device_addr() + off as u64) as *mut c_void;
        // SAFETY: the span lies inside `buf` (checked by byte_span).
        let r = unsafe { nres::broadcast(p, p, count, nccl_dtype(dtype), root as i32, raw.comm, self.cu_stream()) };
        self.call(&mut raw, "ncclBroadcast", r)
    }

    // ----- host staging -----

    /// Runs `f` on a device scratch of at least `len` f32 holding `host` at
    /// `at` (`input = (host, at)`), waits, and copies `back` of the scratch into `out`.
    fn staged(
        &self,
        op: &str,
        len: usize,
        (host, at): (&[f32], usize),
        back: Range<usize>,
        out: &mut [f32],
        f: impl FnOnce(&Nccl, &mut Raw, u64) -> Result<()>,
    ) -> Result<()> {
        let mut raw = self.lock()?;
        let mut sc = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let dev = |e: cudarc::driver::DriverError| Error::Device(format!("{op}: staging: {e}"));
        self.ctx.bind_to_thread().map_err(dev)?;
        if sc.as_ref().is_none_or(|s| s.len() < len.max(1)) {
            *sc = None;
            *sc = Some(self.stream.alloc_zeros::<f32>(len.max(1)).map_err(dev)?);
        }
        let s = sc.as_mut().ok_or_else(|| Error::Device("scratch".into()))?;
        if !host.is_empty() {
            let mut dst = s.slice_mut(at..at + host.len());
            self.stream.memcpy_htod(host, &mut dst).map_err(dev)?;
        }
        let base = s.device_ptr(&self.stream).0;
        f(self, &mut raw, base)?;
        self.wait_locked(&mut raw, op)?;
        if !back.is_empty() {
            let src = s.slice(back);
            self.stream.memcpy_dtoh(&src, out).map_err(dev)?;
            self.stream.synchronize().map_err(dev)?;
        }
        Ok(())
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        let mut raw = self.raw.lock().unwrap_or_else(|e| e.into_inner());
        // Let enqueued work finish (within the timeout: a dead peer aborts it instead), then
        // release the communicator without the blocking ncclCommDestroy.
        if raw.aborted.is_none() && self.wait_locked(&mut raw, "closing").is_ok() {
            // SAFETY: the communicator is live, idle, and used by nobody else (we are dropping it).
            let _ = unsafe { nres::comm_abort(raw.comm) };
        }
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn all_reduce(&self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        let n = buf.len();
        if n == 0 {
            return Ok(());
        }
        let host = buf.to_vec();
        self.staged("all_reduce", n, (&host, 0), 0..n, buf, |me, raw, p| {
            let p = p as *mut c_void;
            // SAFETY: the scratch holds at least n f32 at p.
            let r = unsafe { nres::all_reduce(p, p, n, nccl_dtype(DType::F32), nccl_op(op), raw.comm, me.cu_stream()) };
            me.call(raw, "ncclAllReduce", r)
        })
    }
    fn reduce_scatter(&self, input: &[f32], out: &mut [f32]) -> Result<()> {
        check_shard("reduce_scatter", self.world, input.len(), out.len())?;
        let s = out.len();
        let mine = self.rank * s..(self.rank + 1) * s;
        self.staged("reduce_scatter", input.len(), (input, 0), mine.clone(), out, |me, raw, p| {
            let recv = p + (mine.start * 4) as u64;
            // SAFETY: the scratch holds world·s f32; recv = send + rank·s (in place).
            let r = unsafe {
                nres::reduce_scatter(
                    p as *const c_void,
                    recv as *mut c_void,
                    s,
                    nccl_dtype(DType::F32),
                    nccl_op(ReduceOp::Sum),
                    raw.comm,
                    me.cu_stream(),
                )
            };
            me.call(raw, "ncclReduceScatter", r)
        })
    }
    fn all_gather(&self, shard: &[f32], out: &mut [f32]) -> Result<()> {
        check_shard("all_gather", self.world, out.len(), shard.len())?;
        let s = shard.len();
        let n = out.len();
        self.staged("all_gather", n, (shard, self.rank * s), 0..n, out, |me, raw, p| {
            let send = p + (me.rank * s * 4) as u64;
            // SAFETY: the scratch holds world·s f32; send = recv + rank·s (in place).
            let r = unsafe {
                nres::all_gather(
                    send as *const c_void,
                    p as *mut c_void,
                    s,
                    nccl_dtype(DType::F32),
                    raw.comm,
                    me.cu_stream(),
                )
            };
            me.call(raw, "ncclAllGather", r)
        })
    }
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        if root >= self.world {
            return Err(Error::Invalid(format!("broadcast: root {root} outside world {}", self.world)));
        }
        let n = buf.len();
        if n == 0 {
            return Ok(());
        }
        let host = buf.to_vec();
        self.staged("broadcast", n, (&host, 0), 0..n, buf, |me, raw, p| {
            let p = p as *mut c_void;
            // SAFETY: the scratch holds at least n f32 at p.
            let r = unsafe { nres::broadcast(p, p, n, nccl_dtype(DType::F32), root as i32, raw.comm, me.cu_stream()) };
            me.call(raw, "ncclBroadcast", r)
        })
    }
    fn as_nccl(&self) -> Option<&Nccl> {
        Some(self)
    }
    fn barrier(&self) -> Result<()> {
        // NCCL has no barrier: an all-reduce of one element is one.
        let mut one = [0f32];
        self.all_reduce(&mut one, ReduceOp::Sum)
    }
}
