//! Pinned (page-locked) host staging buffers for host↔device copies, reused between batches.
//!
//! Built on cudarc 0.19's own pinned API: `CudaContext::alloc_pinned_with_flags` →
//! `PinnedHostSlice<u8>` (`cuMemHostAlloc`, freed with `cuMemFreeHost` on drop). Upload buffers
//! are write-combined (fast for the CPU to fill and for DMA to read, very slow for the CPU to
//! read back); download buffers are ordinary cached pinned memory.
//!
//! cudarc only records the slice's internal event when it manages stream synchronisation, which
//! `CudaDevice::open` turns off, so every [`StagingBuffer`] carries its own completion event: a
//! copy enqueued from it records the event, and the host waits on it before touching the bytes
//! again. [`StagingPool`] prefers buffers whose copy already finished, so a batch can be staged
//! while the previous batch's upload is still in flight.
use std::sync::Arc;

use cudarc::driver::sys::{CUevent_flags, CU_MEMHOSTALLOC_WRITECOMBINED};
use cudarc::driver::{result, CudaContext, CudaEvent, CudaStream, PinnedHostSlice};

use super::device::guarded;
use crate::error::Result;

/// Plain-old-data element types that may be viewed as bytes and filled from bytes.
///
/// # Safety
/// Implementors must have no padding and accept every bit pattern.
pub unsafe trait HostPod: Copy + 'static {}
// SAFETY: primitive numeric types: no padding, every bit pattern is a valid value.
unsafe impl HostPod for u8 {}
// SAFETY: as above.
unsafe impl HostPod for u16 {}
// SAFETY: as above.
unsafe impl HostPod for u32 {}
// SAFETY: as above.
unsafe impl HostPod for i32 {}
// SAFETY: as above.
unsafe impl HostPod for u64 {}
// SAFETY: as above.
unsafe impl HostPod for f32 {}
// SAFETY: `half::bf16` is `#[repr(transparent)]` over u16.
unsafe impl HostPod for half::bf16 {}
// SAFETY: `half::f16` is `#[repr(transparent)]` over u16.
unsafe impl HostPod for half::f16 {}

/// The bytes of a POD slice.
pub fn as_bytes<T: HostPod>(v: &[T]) -> &[u8] {
    // SAFETY: T is HostPod (no padding), the byte length is exactly size_of_val, and u8 has
    // alignment 1; the borrow keeps `v` alive and unaliased for the returned lifetime.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// The bytes of a mutable POD slice; any bytes written form valid `T`s.
pub fn as_bytes_mut<T: HostPod>(v: &mut [T]) -> &mut [u8] {
    // SAFETY: as in `as_bytes`, and HostPod guarantees every bit pattern is a valid T.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// What a staging buffer is for (decides the `cuMemHostAlloc` flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StagingKind {
    /// Host→device, write-combined.
    Upload,
    /// Device→host, cached.
    Download,
}

/// Capacity actually allocated for a request: the next power of two, at least 64 KiB, so that
/// slightly different batch sizes share buffers.
pub fn staging_capacity(bytes: usize) -> usize {
    bytes.max(64 << 10).checked_next_power_of_two().unwrap_or(bytes)
}

/// Index of the buffer to reuse among `(capacity, busy)` candidates: the smallest idle one that
/// fits; if `allow_busy`, else the smallest fitting busy one. `None` → allocate a new buffer.
pub fn pick_buffer(cands: &[(usize, bool)], min_bytes: usize, allow_busy: bool) -> Option<usize> {
    let best = |want_busy: bool| {
        cands.iter().enumerate().filter(|(_, &(cap, busy))| cap >= min_bytes && busy == want_busy).min_by_key(|(_, &(cap, _))| cap).map(|(i, _)| i)
    };
    best(false).or_else(|| if allow_busy { best(true) } else { None })
}

/// One pinned buffer plus the event of the last copy enqueued from/to it.
pub struct StagingBuffer {
    buf: PinnedHostSlice<u8>,
    done: CudaEvent,
    pending: bool,
    kind: StagingKind,
}

impl StagingBuffer {
    pub fn new(ctx: &Arc<CudaContext>, bytes: usize, kind: StagingKind) -> Result<Self> {
        let flags = match kind {
            StagingKind::Upload => CU_MEMHOSTALLOC_WRITECOMBINED,
            StagingKind::Download => 0,
        };
        // SAFETY: the pinned bytes start uninitialised; they are only exposed as `&mut [u8]`
        // (valid for any bit pattern) or read after a device→host copy filled them.
        let buf = guarded("cuMemHostAlloc", || unsafe { ctx.alloc_pinned_with_flags::<u8>(bytes.max(1), flags) })?;
        let done = guarded("cuEventCreate", || ctx.new_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING)))?;
        Ok(Self { buf, done, pending: false, kind })
    }

    pub fn capacity(&self) -> usize {
        self.buf.len()
    }
    pub fn kind(&self) -> StagingKind {
        self.kind
    }

    /// Whether a copy enqueued from/to this buffer may still be running (non-blocking query).
    pub fn is_busy(&mut self) -> Result<bool> {
        if self.pending && guarded("cuEventQuery", || self.done.try_is_complete())? {
            self.pending = false;
        }
        Ok(self.pending)
    }

    /// Blocks until the last enqueued copy has finished.
    pub fn wait(&mut self) -> Result<()> {
        if self.pending {
            guarded("cuEventSynchronize", || self.done.synchronize())?;
            self.pending = false;
        }
        Ok(())
    }

    /// The host bytes, after waiting for any copy in flight.
    pub fn host_mut(&mut self) -> Result<&mut [u8]> {
        self.wait()?;
        guarded("pinned buffer", || self.buf.as_mut_slice())
    }

    /// Enqueues `bytes[..len]` → device `dst` on `stream` (asynchronous; the buffer stays busy).
    pub fn enqueue_upload(&mut self, stream: &CudaStream, dst: u64, len: usize) -> Result<()> {
        self.check_len(len)?;
        let src = guarded("pinned buffer", || self.buf.as_slice())?;
        guarded("cuMemcpyHtoDAsync", || {
            stream.context().bind_to_thread()?;
            // SAFETY: `src[..len]` is pinned memory owned by `self.buf`, which lives until the
            // copy completes (drop of PinnedHostSlice synchronises its event; callers reach the
            // bytes only through `wait`/`host_mut`). `dst` must be a device allocation of at
            // least `len` bytes in this context — the caller's contract.
            unsafe { result::memcpy_htod_async(dst, &src[..len], stream.cu_stream()) }
        })?;
        self.mark_pending(stream)
    }

    /// Enqueues device `src` → `bytes[..len]` on `stream`; read it after [`Self::wait`].
    pub fn enqueue_download(&mut self, stream: &CudaStream, src: u64, len: usize) -> Result<()> {
        self.check_len(len)?;
        self.wait()?;
        let dst = guarded("pinned buffer", || self.buf.as_mut_slice())?;
        guarded("cuMemcpyDtoHAsync", || {
            stream.context().bind_to_thread()?;
            // SAFETY: `dst[..len]` is pinned memory owned by `self.buf`, not read by the host
            // until `wait` observes the completion event recorded below; `src` must be a device
            // allocation of at least `len` bytes — the caller's contract.
            unsafe { result::memcpy_dtoh_async(&mut dst[..len], src, stream.cu_stream()) }
        })?;
        self.mark_pending(stream)
    }

    fn check_len(&self, len: usize) -> Result<()> {
        if len > self.capacity() {
            return Err(crate::shape_err!("copy of {len} B exceeds staging buffer of {} B", self.capacity()));
        }
        Ok(())
    }

    fn mark_pending(&mut self, stream: &CudaStream) -> Result<()> {
        guarded("cuEventRecord", || self.done.record(stream))?;
        self.pending = true;
        Ok(())
    }
}

impl Drop for StagingBuffer {
    fn drop(&mut self) {
        // The pinned memory must not be freed under a running DMA.
        let _ = self.wait();
    }
}

/// A reusable set of staging buffers of one kind.
pub struct StagingPool {
    ctx: Arc<CudaContext>,
    kind: StagingKind,
    free: Vec<StagingBuffer>,
    /// Above this many cached buffers a busy one is waited on instead of allocating another.
    max_buffers: usize,
}

impl StagingPool {
    pub fn new(ctx: Arc<CudaContext>, kind: StagingKind) -> Self {
        Self { ctx, kind, free: Vec::new(), max_buffers: 4 }
    }

    pub fn with_max_buffers(mut self, n: usize) -> Self {
        self.max_buffers = n.max(1);
        self
    }

    /// A buffer of at least `min_bytes`: an idle cached one, a busy one if the pool is full, or a
    /// newly allocated one of `staging_capacity(min_bytes)`.
    pub fn acquire(&mut self, min_bytes: usize) -> Result<StagingBuffer> {
        let mut cands = Vec::with_capacity(self.free.len());
        for b in &mut self.free {
            cands.push((b.capacity(), b.is_busy()?));
        }
        let full = self.free.len() >= self.max_buffers;
        match pick_buffer(&cands, min_bytes, full) {
            Some(i) => Ok(self.free.swap_remove(i)),
            None => {
                if full {
                    // Nothing fits: drop the smallest cached buffer to stay within the limit.
                    if let Some(i) = (0..self.free.len()).min_by_key(|&i| self.free[i].capacity()) {
                        self.free.swap_remove(i);
                    }
                }
                StagingBuffer::new(&self.ctx, staging_capacity(min_bytes), self.kind)
            }
        }
    }

    /// Returns a buffer for reuse (it may still be busy).
    pub fn release(&mut self, buf: StagingBuffer) {
        if buf.kind == self.kind {
            self.free.push(buf);
        }
    }

    /// Copies `src` into a staging buffer and enqueues its upload to `dst` on `stream`. Returns
    /// without waiting for the copy; the buffer is reused once the copy has finished.
    pub fn upload<T: HostPod>(&mut self, stream: &CudaStream, src: &[T], dst: u64) -> Result<()> {
        let bytes = as_bytes(src);
        let mut buf = self.acquire(bytes.len())?;
        let r = buf.host_mut().map(|h| h[..bytes.len()].copy_from_slice(bytes)).and_then(|_| buf.enqueue_upload(stream, dst, bytes.len()));
        self.release(buf);
        r
    }

    /// Copies device `src` into `out`, blocking until the data has arrived.
    pub fn download<T: HostPod>(&mut self, stream: &CudaStream, src: u64, out: &mut [T]) -> Result<()> {
        let out = as_bytes_mut(out);
        let mut buf = self.acquire(out.len())?;
        let r = buf.enqueue_download(stream, src, out.len()).and_then(|_| buf.host_mut()).map(|h| out.copy_from_slice(&h[..out.len()]));
        self.release(buf);
        r
    }

    /// Bytes of pinned memory held for reuse.
    pub fn cached_bytes(&self) -> usize {
        self.free.iter().map(|b| b.capacity()).sum()
    }

    /// Frees every cached buffer (each waits for its copy first).
    pub fn trim(&mut self) {
        self.free.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacities_round_up() {
        assert_eq!(staging_capacity(0), 64 << 10);
        assert_eq!(staging_capacity(1), 64 << 10);
        assert_eq!(staging_capacity((64 << 10) + 1), 128 << 10);
        assert_eq!(staging_capacity(3 << 20), 4 << 20);
        assert_eq!(staging_capacity(4 << 20), 4 << 20);
    }

    #[test]
    fn picks_smallest_idle_fitting_buffer() {
        let c = [(1 << 20, false), (256 << 10, false), (128 << 10, true), (4 << 20, false)];
        assert_eq!(pick_buffer(&c, 100 << 10, false), Some(1)); // 128 KiB one is busy
        assert_eq!(pick_buffer(&c, 2 << 20, false), Some(3));
        assert_eq!(pick_buffer(&c, 8 << 20, true), None);
        let busy = [(1 << 20, true), (512 << 10, true)];
        assert_eq!(pick_buffer(&busy, 1000, false), None);
        assert_eq!(pick_buffer(&busy, 1000, true), Some(1));
    }

    #[test]
    fn pod_byte_views() {
        let v = [1.0f32, -2.0];
        assert_eq!(as_bytes(&v), &[0, 0, 0x80, 0x3f, 0, 0, 0, 0xc0]);
        let mut w = [half::bf16::ZERO; 2];
        as_bytes_mut(&mut w).copy_from_slice(&[0x80, 0x3f, 0x00, 0xc0]);
        assert_eq!(w, [half::bf16::from_f32(1.0), half::bf16::from_f32(-2.0)]);
    }
}
