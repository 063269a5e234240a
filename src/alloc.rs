//! [`CacheLineAlloc`]: the system allocator, with every allocation of [`BIG`] bytes or more
//! aligned to a 64-byte cache line — the global allocator of the `clipforge` binary and of the
//! benches, and one line for a program that uses the library:
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOC: clipforge::alloc::CacheLineAlloc = clipforge::alloc::CacheLineAlloc;
//! ```
//!
//! Why: glibc returns 16-byte-aligned blocks, so a tensor, a packed weight or a GEMM's output
//! usually starts 16 or 48 bytes into a cache line, and then every 64-byte vector load or store
//! of the AVX-512 kernels (B panels, C tiles, activation rows) spans two lines. Measured on the
//! Intel kind (2 threads, the bf16 GEMM on AVX512-FP16): 1600×768×3072 500–521 → 562–566
//! GFLOP/s, 2464×512×2048 470 → 566–574 (BENCHMARKS.md, eleventh session). Small blocks keep
//! the system's alignment (no padding for the many tiny allocations of parsing and tokenizing).
use std::alloc::{GlobalAlloc, Layout, System};

/// Allocations of at least this many bytes are aligned to [`LINE`].
pub const BIG: usize = 4096;
/// A cache line.
pub const LINE: usize = 64;

/// The system allocator with large blocks cache-line aligned (see the module docs).
#[derive(Clone, Copy, Debug, Default)]
pub struct CacheLineAlloc;

/// The layout actually asked of the system: the caller's, or for a large block the same size at
/// an alignment of at least [`LINE`]. A function of (size, align) only, so that `dealloc` and
/// `realloc`, which get the caller's layout back, find the one the block was made with. None when
/// no such layout exists (a size near `isize::MAX`): the allocation then fails (null).
fn actual(l: Layout) -> Option<Layout> {
    if l.size() >= BIG && l.align() < LINE {
        Layout::from_size_align(l.size(), LINE).ok()
    } else {
        Some(l)
    }
}

// SAFETY: every block comes from `System` with the layout `actual` gives, and goes back to it
// with that same layout (a pure function of the caller's layout, which `dealloc` and `realloc`
// receive unchanged); that layout's alignment is at least the caller's, and its size the same.
unsafe impl GlobalAlloc for CacheLineAlloc {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        match actual(l) {
            // SAFETY: the caller's contract (a non-zero size), forwarded.
            Some(a) => unsafe { System.alloc(a) },
            None => std::ptr::null_mut(),
        }
    }

    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        match actual(l) {
            // SAFETY: as `alloc`.
            Some(a) => unsafe { System.alloc_zeroed(a) },
            None => std::ptr::null_mut(),
        }
    }

    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: p was made by this allocator with layout l, so by System with actual(l), which
        // existed then and is computed again the same way.
        unsafe { System.dealloc(p, actual(l).unwrap_or(l)) }
    }

    unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        let (old, Ok(new)) = (actual(l).unwrap_or(l), Layout::from_size_align(new_size, l.align())) else {
            return std::ptr::null_mut();
        };
        let Some(new) = actual(new) else { return std::ptr::null_mut() };
        if old.align() == new.align() {
            // SAFETY: p is System's block of layout `old`; new_size is valid for its alignment.
            return unsafe { System.realloc(p, old, new_size) };
        }
        // Crossing BIG changes the alignment, which System's realloc cannot: a new block, the
        // common prefix copied, the old block freed.
        // SAFETY: `new` has a non-zero size (the caller's contract for realloc).
        let q = unsafe { System.alloc(new) };
        if !q.is_null() {
            // SAFETY: both blocks hold at least min(old, new) bytes and are distinct; p is
            // System's block of layout `old`.
            unsafe {
                std::ptr::copy_nonoverlapping(p, q, l.size().min(new_size));
                System.dealloc(p, old);
            }
        }
        q
    }
}
