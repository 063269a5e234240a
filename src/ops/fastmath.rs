//! Branch-free f32 math that LLVM vectorises (libm's `exp` does not): exp, sigmoid, erf, and the
//! activations QuickGELU and GELU built from them, plus the row-parallel loop helper every
//! memory-bound op uses.
use rayon::prelude::*;

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;

/// e^x within ~2 ulp on [-87, 88]; saturates outside (no NaN for finite x).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.3);
    let n = (x * LOG2E).round_ties_even();
    let f = x - n * LN2_HI - n * LN2_LO; // |f| <= ln2/2
                                         // the degree-6 Taylor polynomial by Estrin's scheme: a chain of 5 dependent operations
                                         // instead of Horner's 12 (its 16-lane twin `act_simd::exp16`, the same operations in the same
                                         // order, waits on that chain's latency, not on its ports)
    let f2 = f * f;
    let f4 = f2 * f2;
    let lo = (1.0 + f) + f2 * (0.5 + f * (1.0 / 6.0));
    let hi = (1.0 / 24.0 + f * (1.0 / 120.0)) + f2 * (1.0 / 720.0);
    let p = lo + f4 * hi;
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// erf(x) with |error| < 1.2e-7 (Numerical Recipes' erfc Chebyshev fit, evaluated branch-free).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_2
        + t * (1.000_023_7
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06 + t * (0.278_868_07 + t * (-1.135_204 + t * (1.488_515_9 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let r = 1.0 - t * exp(poly);
    r.copysign(x)
}

/// CLIP's activation: x·σ(1.702x).
#[inline(always)]
pub fn quick_gelu(x: f32) -> f32 {
    x * sigmoid(1.702 * x)
}

/// Exact (erf) GELU: ½x(1 + erf(x/√2)).
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// n zeros, written by all threads when the buffer is big (GEMM outputs and gradients: the fill
/// is on the critical path of every Linear, and one core would do it alone).
pub fn zeros(n: usize) -> Vec<f32> {
    if n < 1 << 18 {
        return vec![0.0; n];
    }
    // chunks of 64 Ki values, each a memset (rayon's `repeat_n` extend stored 16 bytes at a time)
    // SAFETY: the chunks cover all n values, each written (zero) and none read.
    unsafe { written(n, |o| o.par_chunks_mut(1 << 16).for_each(|c| c.fill(0.0))) }
}

/// [`written_by`] for a `fill` that cannot fail.
///
/// # Safety
/// As [`written_by`].
pub unsafe fn written<T: Copy>(n: usize, fill: impl FnOnce(&mut [T])) -> Vec<T> {
    // SAFETY: the caller's contract.
    match unsafe {
        written_by(n, |o| {
            fill(o);
            Ok::<(), std::convert::Infallible>(())
        })
    } {
        Ok(v) => v,
        Err(never) => match never {},
    }
}

/// A buffer of n values (f32, or bf16 for a GEMM epilogue's 16-bit output) that `fill` writes,
/// without a zero-fill pass first (GEMM outputs that their kernel overwrites: the fill was a write
/// of [m, n] per Linear; and `calloc` does fill memory it reuses). If `fill` fails, the buffer is
/// dropped unread.
///
/// # Safety
/// `fill` must write every one of the n values and must not read a value it has not written.
pub unsafe fn written_by<T: Copy, E>(n: usize, fill: impl FnOnce(&mut [T]) -> Result<(), E>) -> Result<Vec<T>, E> {
    let mut v: Vec<T> = Vec::with_capacity(n);
    // SAFETY: the allocation holds n values; the caller's `fill` writes each before reading it.
    fill(unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr(), n) })?;
    // SAFETY: all n values were written (the caller's contract).
    unsafe { v.set_len(n) };
    Ok(v)
}

/// A buffer's base pointer shared by the parallel tasks of one pass that write disjoint elements
/// of it — GEMM tiles of C, attention heads' columns, transposed lanes — while the `&mut [T]` it
/// came from stays borrowed by that pass. The CPU ops' one `Send + Sync` raw pointer.
pub(crate) struct SharedMut<T>(*mut T);
impl<T> SharedMut<T> {
    pub(crate) fn new(buf: &mut [T]) -> Self {
        SharedMut(buf.as_mut_ptr())
    }
    /// The base address (a method, not `.0`, so that closures capture the whole `Sync` wrapper).
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
    /// The address of element `i`.
    pub(crate) fn at(self, i: usize) -> *mut T {
        self.0.wrapping_add(i)
    }
}
impl<T> Clone for SharedMut<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SharedMut<T> {}
// SAFETY: dereferenced only by the tasks of the pass that made it, while the buffer is borrowed,
// and those tasks write disjoint elements (each user states its partition).
unsafe impl<T> Send for SharedMut<T> {}
// SAFETY: as above; no two threads access one element.
unsafe impl<T> Sync for SharedMut<T> {}

/// The first n values of a reused scratch buffer, grown (zero-filled) only when too short: a
/// packing buffer whose packer writes every value it later reads must not be re-zeroed each time
/// it shrinks and grows back (`Vec::resize` would: a memset per GEMM work item).
pub fn scratch<T: Clone + Default>(v: &mut Vec<T>, n: usize) -> &mut [T] {
    if v.len() < n {
        v.resize(n, T::default());
    }
    &mut v[..n]
}

/// Runs `f(row_index, row)` over the rows of `out` in parallel when the work is large enough.
pub fn par_rows(out: &mut [f32], row_len: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    if row_len == 0 {
        return;
    }
    let rows = out.len() / row_len;
    if out.len() < 1 << 15 || rows < 2 {
        out.chunks_mut(row_len).enumerate().for_each(|(i, r)| f(i, r));
    } else {
        let per = ((1 << 14) / row_len).max(1);
        out.par_chunks_mut(row_len * per).enumerate().for_each(|(c, chunk)| {
            chunk.chunks_mut(row_len).enumerate().for_each(|(i, r)| f(c * per + i, r));
        });
    }
}

/// Prefetches `x` (64-byte lines) into L2: data a loop will read soon that the hardware
/// prefetchers miss (the next row block of a GEMM's A, the strided rows of the next attention head).
pub(crate) fn prefetch_l2<T>(x: &[T]) {
    #[cfg(target_arch = "x86_64")]
    for line in x.chunks(64 / std::mem::size_of::<T>().max(1)) {
        // SAFETY: prefetching has no architectural effect besides caching and never
        // faults; the address is inside `x` anyway.
        unsafe { core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T1 }>(line.as_ptr().cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = x;
}
