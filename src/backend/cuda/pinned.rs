//! Page-locked (pinned) host staging for the CUDA backend's transfers: the
//! per-step token and row-table uploads, the logit downloads and the weight
//! uploads all go through it, so the DMA engine copies straight from or to
//! host memory the driver knows (no bounce through the driver's own pageable
//! staging, and an upload returns as soon as the bytes are in the stage).
//!
//! Uploads alternate between two write-combined buffers of up to
//! [`CHUNK`] bytes (a large upload is cut into chunks, so filling one buffer
//! overlaps the copy out of the other); downloads land in one cached buffer
//! and are copied out after the stream is synchronised. Each pinned buffer
//! records an event after the copy that reads or fills it, and waits on it
//! before the host touches the buffer again (cudarc's `PinnedHostSlice`),
//! so a buffer is never overwritten while a copy still reads it. Buffers
//! are allocated at first use and grow up to [`CHUNK`]; when the driver
//! refuses page-locked memory the transfer falls back to pageable memory.

use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DriverError, HostSlice, PinnedHostSlice};

/// The error of a transfer longer than its device buffer.
fn too_long() -> DriverError {
    DriverError(cudarc::driver::sys::cudaError_enum::CUDA_ERROR_INVALID_VALUE)
}

/// Largest pinned buffer (bytes); longer transfers go in chunks.
pub(super) const CHUNK: usize = 4 << 20;
/// Smallest pinned buffer (bytes), so small per-step transfers reuse one buffer.
const MIN_BUF: usize = 64 << 10;

#[derive(Default)]
struct Up {
    bufs: [Option<PinnedHostSlice<u8>>; 2],
    next: usize,
}

/// The pinned staging buffers of one backend.
#[derive(Default)]
pub(super) struct Staging {
    up: Mutex<Up>,
    down: Mutex<Option<PinnedHostSlice<u8>>>,
}

/// `slot` holding a pinned buffer of at least `len` bytes (grown to a power of two,
/// [`MIN_BUF`] to [`CHUNK`]); `None` when the driver refuses.
fn ensure<'a>(
    ctx: &Arc<CudaContext>,
    slot: &'a mut Option<PinnedHostSlice<u8>>,
    len: usize,
    write_combined: bool,
) -> Option<&'a mut PinnedHostSlice<u8>> {
    if slot.as_ref().is_none_or(|b| b.len() < len) {
        let cap = len.next_power_of_two().clamp(MIN_BUF, CHUNK.max(len));
        // Write-combined memory is fast for the host to write and the device
        // to read, slow for the host to read: uploads only.
        let flags = if write_combined { cudarc::driver::sys::CU_MEMHOSTALLOC_WRITECOMBINED } else { 0 };
        // SAFETY: the contents start uninitialised; u8 has no invalid values
        // and only bytes written by the host (uploads) or by a finished copy
        // (downloads) are ever read.
        match unsafe { ctx.alloc_pinned_with_flags::<u8>(cap, flags) } {
            Ok(b) => *slot = Some(b),
            Err(e) => {
                log::warn!("page-locked host memory of {cap} bytes refused ({e}); using pageable transfers");
                return None;
            }
        }
    }
    slot.as_mut()
}

impl Staging {
    /// Copies `src` to the start of `dst` on `stream`; returns without
    /// waiting for the copy.
    /// Copies `src` to `dst` from byte `offset` on.
    pub(super) fn upload(
        &self,
        stream: &Arc<CudaStream>,
        src: &[u8],
        dst: &CudaSlice<u8>,
        offset: usize,
    ) -> Result<(), DriverError> {
        if offset.saturating_add(src.len()) > dst.len() {
            return Err(too_long());
        }
        let dst = dst.device_ptr(stream).0 + offset as u64;
        let ctx = stream.context();
        ctx.bind_to_thread()?;
        let mut up = self.up.lock().unwrap_or_else(|e| e.into_inner());
        for (i, chunk) in src.chunks(CHUNK).enumerate() {
            let which = up.next;
            up.next ^= 1;
            let dst_chunk = dst + (i * CHUNK) as u64;
            let Some(buf) = ensure(ctx, &mut up.bufs[which], chunk.len(), true) else {
                // SAFETY: `dst_chunk` starts `chunk.len()` or more bytes before
                // the end of `dst` (length checked above); a pageable source is
                // copied out before the driver call returns.
                unsafe { cudarc::driver::result::memcpy_htod_async(dst_chunk, chunk, stream.cu_stream()) }?;
                continue;
            };
            // Waits for the last copy out of this buffer, then fills it.
            buf.as_mut_slice()?[..chunk.len()].copy_from_slice(chunk);
            // SAFETY: the slice is used with `stream` only; dropping `_record`
            // after the enqueue records the buffer's event behind the copy.
            let (host, _record) = unsafe { buf.stream_synced_slice(stream) };
            // SAFETY: `host[..len]` is pinned memory that stays allocated and
            // untouched until the event above completes; `dst_chunk` starts
            // `chunk.len()` or more bytes before the end of `dst`.
            unsafe { cudarc::driver::result::memcpy_htod_async(dst_chunk, &host[..chunk.len()], stream.cu_stream()) }?;
        }
        Ok(())
    }

    /// Copies the first `out.len()` bytes of `src` into `out` and waits for them.
    pub(super) fn download(
        &self,
        stream: &Arc<CudaStream>,
        src: &CudaSlice<u8>,
        offset: usize,
        out: &mut [u8],
    ) -> Result<(), DriverError> {
        if offset.saturating_add(out.len()) > src.len() {
            return Err(too_long());
        }
        let src = src.device_ptr(stream).0 + offset as u64;
        let ctx = stream.context();
        ctx.bind_to_thread()?;
        let mut down = self.down.lock().unwrap_or_else(|e| e.into_inner());
        for (i, chunk) in out.chunks_mut(CHUNK).enumerate() {
            let src_chunk = src + (i * CHUNK) as u64;
            let Some(buf) = ensure(ctx, &mut down, chunk.len(), false) else {
                // SAFETY: `src_chunk` starts `chunk.len()` or more bytes before
                // the end of `src` (length checked above); the stream is
                // synchronised below, before `chunk` is released.
                unsafe { cudarc::driver::result::memcpy_dtoh_async(chunk, src_chunk, stream.cu_stream()) }?;
                stream.synchronize()?;
                continue;
            };
            {
                // SAFETY: as in `upload`; the event recorded on drop marks the
                // end of the copy into the buffer.
                let (host, _record) = unsafe { buf.stream_synced_mut_slice(stream) };
                let len = chunk.len();
                // SAFETY: `host[..len]` is pinned memory of this context, not
                // read by the host until the event completes (`as_slice` below).
                unsafe { cudarc::driver::result::memcpy_dtoh_async(&mut host[..len], src_chunk, stream.cu_stream()) }?;
            }
            // Waits for the copy (the buffer's event), then reads it.
            chunk.copy_from_slice(&buf.as_slice()?[..chunk.len()]);
        }
        Ok(())
    }
}
