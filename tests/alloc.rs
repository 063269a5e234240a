//! `clipforge::alloc::CacheLineAlloc` as this test binary's global allocator (as in the
//! `clipforge` binary): large blocks start on a cache line, small ones keep the system's
//! alignment, contents survive reallocation across the size threshold in both directions, zeroed
//! blocks are zero, a larger requested alignment is kept, and an impossible size fails with null
//! instead of a panic.
use clipforge::alloc::{CacheLineAlloc, BIG, LINE};
use std::alloc::{GlobalAlloc, Layout};

#[global_allocator]
static ALLOC: CacheLineAlloc = CacheLineAlloc;

fn aligned<T>(p: *const T) -> bool {
    (p as usize).is_multiple_of(LINE)
}

#[test]
fn large_blocks_start_on_a_cache_line() {
    for n in [BIG / 4, BIG / 4 + 1, 4099, 1 << 16, (1 << 22) + 3, 40 << 20] {
        let v: Vec<f32> = Vec::with_capacity(n);
        assert!(aligned(v.as_ptr()), "Vec<f32> with capacity {n} at {:p}", v.as_ptr());
        let z = vec![0u16; n * 2];
        assert!(aligned(z.as_ptr()) && z.iter().all(|&x| x == 0), "zeroed Vec<u16> of {} values", n * 2);
    }
    // below the threshold nothing is promised beyond the type's alignment; the block works
    let small: Vec<u8> = (0..100).collect();
    assert_eq!(small.iter().map(|&x| x as u32).sum::<u32>(), 4950);
}

#[test]
fn contents_survive_reallocation_across_the_threshold() {
    let mut v: Vec<u32> = Vec::new();
    for i in 0..200_000u32 {
        v.push(i); // grows through 16 B, …, 4 KiB (the alignment changes), … 1 MiB
        if v.len() == v.capacity() && v.len() * 4 >= BIG {
            assert!(aligned(v.as_ptr()), "after growing to {} values", v.len());
        }
    }
    assert!(v.iter().enumerate().all(|(i, &x)| x == i as u32), "values lost while growing");
    v.truncate(10);
    v.shrink_to_fit(); // back below BIG: a new block with the small alignment
    assert_eq!(v, (0..10).collect::<Vec<u32>>());
    v.extend(10..5000);
    assert!(v.iter().enumerate().all(|(i, &x)| x == i as u32), "values lost after shrinking and growing");
}

#[test]
fn a_larger_alignment_is_kept_and_an_impossible_size_fails_with_null() {
    let a = CacheLineAlloc;
    for (size, align) in [(8192, 4096), (100, 256), (BIG, 128)] {
        let l = Layout::from_size_align(size, align).unwrap();
        // SAFETY: a non-zero size; the block is freed with the same layout.
        unsafe {
            let p = a.alloc(l);
            assert!(!p.is_null() && (p as usize).is_multiple_of(align), "{size} bytes at alignment {align}");
            let q = a.realloc(p, l, 3 * size);
            assert!(!q.is_null() && (q as usize).is_multiple_of(align), "realloc of {size} bytes at alignment {align}");
            a.dealloc(q, Layout::from_size_align(3 * size, align).unwrap());
        }
    }
    // a size that fits a Layout of alignment 4 but not one of 64 once rounded up
    let l = Layout::from_size_align(isize::MAX as usize - 8, 4).unwrap();
    // SAFETY: a non-zero size; a null result allocates nothing.
    assert!(unsafe { a.alloc(l) }.is_null(), "an impossible size must fail with null");
}
