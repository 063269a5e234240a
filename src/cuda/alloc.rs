//! Caching device allocator. A freed block goes to the free list of its size class and is handed
//! out again by the next allocation of that class, so steady-state inference does no
//! `cuMemAlloc`/`cuMemFree` at all. Classes: sizes round up to 512 B up to 1 MiB, to 2 MiB above.
//! `trim()` returns every cached block to the driver; a failed raw allocation trims and retries
//! once before reporting out-of-memory.
//!
//! The bookkeeping is generic over [`RawAlloc`] so it is unit-tested on the CPU with a fake
//! allocator; [`CudaRawAlloc`] is the real one (cudarc `CudaSlice<u8>` on the compute stream).
//!
//! Stream-ordering contract: blocks are allocated on, and must be released in the order of, the
//! compute stream. Dropping a block while another stream may still touch it is a use-after-free
//! once the block is reused — call `CudaDevice::upload_fence` (or synchronize) first. Blocks are
//! uninitialised; a reused block holds stale data.
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use super::device::guarded;
use crate::error::{Error, Result};

/// Size-class granularity up to and including [`SMALL_LIMIT`].
pub const SMALL_GRANULE: usize = 512;
/// Largest size rounded to [`SMALL_GRANULE`].
pub const SMALL_LIMIT: usize = 1 << 20;
/// Size-class granularity above [`SMALL_LIMIT`].
pub const LARGE_GRANULE: usize = 2 << 20;

/// The class (bytes actually reserved) for a request of `bytes`; `None` on overflow.
/// Zero-byte requests get the smallest class so every block has a distinct, valid pointer.
pub fn size_class(bytes: usize) -> Option<usize> {
    let b = bytes.max(1);
    let g = if b <= SMALL_LIMIT { SMALL_GRANULE } else { LARGE_GRANULE };
    b.checked_add(g - 1).map(|v| v / g * g)
}

/// The primitive allocator the pool sits on.
pub trait RawAlloc: Send + Sync {
    /// Owns one allocation; freeing happens in [`RawAlloc::free`] (or the handle's own `Drop`).
    type Handle: Send;
    fn alloc(&self, bytes: usize) -> Result<Self::Handle>;
    fn free(&self, h: Self::Handle);
    /// Device address of the allocation.
    fn device_ptr(&self, h: &Self::Handle) -> u64;
}

/// Pool counters. Byte figures count whole size classes unless noted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Held by live blocks.
    pub in_use_bytes: usize,
    /// Sitting in free lists, reusable.
    pub cached_bytes: usize,
    /// High-water mark of `in_use_bytes`.
    pub peak_in_use_bytes: usize,
    /// High-water mark of `in_use_bytes + cached_bytes` (what the driver has given us).
    pub peak_reserved_bytes: usize,
    /// Sum of the sizes callers asked for, over live blocks.
    pub requested_bytes: usize,
    pub live_blocks: usize,
    pub cached_blocks: usize,
    /// Allocations served from a free list / by the raw allocator.
    pub hits: u64,
    pub misses: u64,
}

impl PoolStats {
    /// Bytes currently obtained from the raw allocator.
    pub fn reserved_bytes(&self) -> usize {
        self.in_use_bytes + self.cached_bytes
    }
}

struct State<H> {
    free: HashMap<usize, Vec<H>>,
    stats: PoolStats,
}

/// The caching pool; share it as `Arc<DevicePool<A>>` (blocks keep it alive).
pub struct DevicePool<A: RawAlloc> {
    raw: A,
    state: Mutex<State<A::Handle>>,
}

/// One allocation from a [`DevicePool`]; returns itself to the pool's free list on drop.
pub struct PoolBlock<A: RawAlloc> {
    pool: Arc<DevicePool<A>>,
    handle: Option<A::Handle>,
    ptr: u64,
    class: usize,
    len: usize,
}

impl<A: RawAlloc> PoolBlock<A> {
    /// Device address (valid for `capacity()` bytes).
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    /// Bytes requested.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Bytes reserved (the size class).
    pub fn capacity(&self) -> usize {
        self.class
    }
    pub fn handle(&self) -> &A::Handle {
        self.handle.as_ref().expect("handle present until drop")
    }
    pub fn handle_mut(&mut self) -> &mut A::Handle {
        self.handle.as_mut().expect("handle present until drop")
    }
}

impl<A: RawAlloc> Drop for PoolBlock<A> {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            self.pool.release(h, self.class, self.len);
        }
    }
}

impl<A: RawAlloc> std::fmt::Debug for PoolBlock<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PoolBlock({:#x}, len {}, class {})", self.ptr, self.len, self.class)
    }
}

impl<A: RawAlloc> DevicePool<A> {
    pub fn new(raw: A) -> Arc<Self> {
        Arc::new(Self { raw, state: Mutex::new(State { free: HashMap::new(), stats: PoolStats::default() }) })
    }

    pub fn raw(&self) -> &A {
        &self.raw
    }

    fn lock(&self) -> MutexGuard<'_, State<A::Handle>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A block of at least `bytes` bytes: from the class's free list if possible, else new.
    pub fn alloc(self: &Arc<Self>, bytes: usize) -> Result<PoolBlock<A>> {
        let class = size_class(bytes).ok_or_else(|| Error::device(format!("allocation of {bytes} B overflows")))?;
        let mut st = self.lock();
        let cached = st.free.get_mut(&class).and_then(|v| v.pop());
        let handle = match cached {
            Some(h) => {
                st.stats.hits += 1;
                st.stats.cached_bytes -= class;
                st.stats.cached_blocks -= 1;
                h
            }
            None => {
                st.stats.misses += 1;
                match self.raw.alloc(class) {
                    Ok(h) => h,
                    Err(first) => {
                        // Out of memory (or similar): give the cache back and try once more.
                        if Self::trim_locked(&self.raw, &mut st) == 0 {
                            return Err(first.context(format!("device allocation of {class} B failed")));
                        }
                        self.raw.alloc(class).map_err(|e| e.context(format!("device allocation of {class} B failed after trimming the cache")))?
                    }
                }
            }
        };
        let s = &mut st.stats;
        s.in_use_bytes += class;
        s.requested_bytes += bytes;
        s.live_blocks += 1;
        s.peak_in_use_bytes = s.peak_in_use_bytes.max(s.in_use_bytes);
        s.peak_reserved_bytes = s.peak_reserved_bytes.max(s.reserved_bytes());
        drop(st);
        let ptr = self.raw.device_ptr(&handle);
        Ok(PoolBlock { pool: Arc::clone(self), handle: Some(handle), ptr, class, len: bytes })
    }

    fn release(&self, h: A::Handle, class: usize, len: usize) {
        let mut st = self.lock();
        st.free.entry(class).or_default().push(h);
        let s = &mut st.stats;
        s.in_use_bytes -= class;
        s.requested_bytes -= len;
        s.live_blocks -= 1;
        s.cached_bytes += class;
        s.cached_blocks += 1;
    }

    fn trim_locked(raw: &A, st: &mut State<A::Handle>) -> usize {
        let mut freed = 0;
        for (class, list) in st.free.drain() {
            freed += class * list.len();
            for h in list {
                raw.free(h);
            }
        }
        st.stats.cached_bytes = 0;
        st.stats.cached_blocks = 0;
        freed
    }

    /// Returns every cached (free) block to the raw allocator; returns the bytes released.
    /// Live blocks are untouched.
    pub fn trim(&self) -> usize {
        let mut st = self.lock();
        Self::trim_locked(&self.raw, &mut st)
    }

    pub fn stats(&self) -> PoolStats {
        self.lock().stats
    }

    /// Restarts both peak counters from the current values (e.g. per benchmark run).
    pub fn reset_peaks(&self) {
        let mut st = self.lock();
        st.stats.peak_in_use_bytes = st.stats.in_use_bytes;
        st.stats.peak_reserved_bytes = st.stats.reserved_bytes();
    }
}

impl<A: RawAlloc> Drop for DevicePool<A> {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        Self::trim_locked(&self.raw, st);
    }
}

/// Real allocator: `CudaSlice<u8>` on the compute stream (`cuMemAllocAsync` when the device
/// supports memory pools, else `cuMemAlloc`); freeing is dropping the slice (stream-ordered
/// `cuMemFreeAsync`, or synchronize + `cuMemFree`).
pub struct CudaRawAlloc {
    stream: Arc<CudaStream>,
}

impl CudaRawAlloc {
    pub fn new(stream: Arc<CudaStream>) -> Self {
        Self { stream }
    }
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

impl RawAlloc for CudaRawAlloc {
    type Handle = CudaSlice<u8>;
    fn alloc(&self, bytes: usize) -> Result<CudaSlice<u8>> {
        // SAFETY: the memory is uninitialised; PoolBlock documents that and only hands out the
        // raw address, which kernels write before reading.
        guarded("cuMemAlloc", || unsafe { self.stream.alloc::<u8>(bytes) })
    }
    fn free(&self, h: CudaSlice<u8>) {
        drop(h);
    }
    fn device_ptr(&self, h: &CudaSlice<u8>) -> u64 {
        // With event tracking off (CudaDevice::open) the SyncOnDrop guard is a no-op.
        let (p, _guard) = h.device_ptr(&self.stream);
        p
    }
}

pub type CudaPool = DevicePool<CudaRawAlloc>;
pub type CudaBlock = PoolBlock<CudaRawAlloc>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

    /// Fake allocator: hands out synthetic addresses, tracks live bytes, optional capacity.
    #[derive(Default)]
    struct Fake {
        next: AtomicU64,
        live: Arc<AtomicUsize>,
        allocs: AtomicUsize,
        frees: AtomicUsize,
        capacity: Option<usize>,
    }
    impl RawAlloc for Fake {
        type Handle = (u64, usize);
        fn alloc(&self, bytes: usize) -> Result<(u64, usize)> {
            if let Some(cap) = self.capacity {
                if self.live.load(Ordering::SeqCst) + bytes > cap {
                    return Err(Error::device("out of memory"));
                }
            }
            self.allocs.fetch_add(1, Ordering::SeqCst);
            self.live.fetch_add(bytes, Ordering::SeqCst);
            Ok((0x1000_0000 + self.next.fetch_add(1, Ordering::SeqCst) * 0x100_0000, bytes))
        }
        fn free(&self, h: (u64, usize)) {
            self.frees.fetch_add(1, Ordering::SeqCst);
            self.live.fetch_sub(h.1, Ordering::SeqCst);
        }
        fn device_ptr(&self, h: &(u64, usize)) -> u64 {
            h.0
        }
    }

    #[test]
    fn size_classes() {
        assert_eq!(size_class(0), Some(512));
        assert_eq!(size_class(1), Some(512));
        assert_eq!(size_class(512), Some(512));
        assert_eq!(size_class(513), Some(1024));
        assert_eq!(size_class(SMALL_LIMIT), Some(SMALL_LIMIT));
        assert_eq!(size_class(SMALL_LIMIT + 1), Some(2 << 20));
        assert_eq!(size_class((2 << 20) + 1), Some(4 << 20));
        assert_eq!(size_class(usize::MAX), None);
    }

    #[test]
    fn freed_block_is_reused_by_same_class_only() {
        let pool = DevicePool::new(Fake::default());
        let a = pool.alloc(1000).unwrap();
        let pa = a.ptr();
        assert_eq!(a.capacity(), 1024);
        drop(a);
        let b = pool.alloc(700).unwrap(); // 700 -> 1024: same class, same block
        assert_eq!(b.ptr(), pa);
        let c = pool.alloc(2000).unwrap(); // different class: new block
        assert_ne!(c.ptr(), pa);
        let s = pool.stats();
        assert_eq!((s.hits, s.misses), (1, 2));
        assert_eq!(pool.raw().allocs.load(Ordering::SeqCst), 2);
        assert_eq!(s.requested_bytes, 2700);
    }

    #[test]
    fn peak_and_cached_accounting() {
        let pool = DevicePool::new(Fake::default());
        let a = pool.alloc(3 << 20).unwrap(); // 4 MiB class
        let b = pool.alloc(100).unwrap(); // 512 B class
        assert_eq!(pool.stats().in_use_bytes, (4 << 20) + 512);
        drop(a);
        let s = pool.stats();
        assert_eq!(s.in_use_bytes, 512);
        assert_eq!(s.cached_bytes, 4 << 20);
        assert_eq!(s.peak_in_use_bytes, (4 << 20) + 512);
        assert_eq!(s.peak_reserved_bytes, (4 << 20) + 512);
        assert_eq!((s.live_blocks, s.cached_blocks), (1, 1));
        pool.reset_peaks();
        assert_eq!(pool.stats().peak_in_use_bytes, 512);
        drop(b);
        assert_eq!(pool.stats().in_use_bytes, 0);
    }

    #[test]
    fn trim_returns_everything_cached() {
        let pool = DevicePool::new(Fake::default());
        let blocks: Vec<_> = (0..4).map(|i| pool.alloc(600 * (i + 1)).unwrap()).collect();
        let keep = pool.alloc(10).unwrap();
        drop(blocks);
        let cached = pool.stats().cached_bytes;
        assert_eq!(cached, 1024 + 1536 + 2048 + 2560);
        assert_eq!(pool.trim(), cached);
        let s = pool.stats();
        assert_eq!((s.cached_bytes, s.cached_blocks), (0, 0));
        assert_eq!(pool.raw().frees.load(Ordering::SeqCst), 4);
        assert_eq!(pool.raw().live.load(Ordering::SeqCst), 512); // `keep` is still live
        drop(keep);
    }

    #[test]
    fn out_of_memory_trims_and_retries() {
        let pool = DevicePool::new(Fake { capacity: Some(6 << 20), ..Default::default() });
        drop(pool.alloc(4 << 20).unwrap()); // cached 4 MiB
        let b = pool.alloc(3 << 20).unwrap(); // 4 MiB class hit
        drop(b);
        // 6 MiB class does not fit next to the cached 4 MiB: trim, then succeed.
        let c = pool.alloc(5 << 20).unwrap();
        assert_eq!(c.capacity(), 6 << 20);
        assert_eq!(pool.stats().cached_bytes, 0);
        let e = pool.alloc(1 << 20).unwrap_err();
        assert!(matches!(&e, Error::Device(m) if m.contains("out of memory")), "{e}");
    }

    #[test]
    fn dropping_the_pool_frees_the_cache() {
        let pool = DevicePool::new(Fake::default());
        drop(pool.alloc(5000).unwrap());
        let live = Arc::clone(&pool.raw().live);
        assert_eq!(live.load(Ordering::SeqCst), 5120);
        drop(pool);
        assert_eq!(live.load(Ordering::SeqCst), 0);
    }
}
