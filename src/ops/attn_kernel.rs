//! AVX-512 kernels of the CPU attention's forward (`attention.rs`), per (sequence, head):
//! - [`gemm_rows`]: an unpacked small GEMM c = a·b for S = Q·Kᵀ and O = P·V. It reads Q and V
//!   and writes O in place in the [B, T, H·hd] layout (any row strides), so only Kᵀ is copied per
//!   head; a register tile of up to 6 rows × 64 columns (24 zmm accumulators), one broadcast of
//!   a per row and up to 4 loads of b per k step, the last 16-column vector masked.
//! - [`softmax_row`]: scale, max, exp (`act_simd`'s 16-lane exp, the scalar `fastmath::exp`'s
//!   bits), the sum in 16 lanes reduced in a fixed order (bitwise-reproducible), normalise.
//!
//! The portable path (`attention::attention_portable`, faer and scalar loops) stays for CPUs
//! without AVX-512F and `CLIPFORGE_CPU_GEMM=scalar`; tests/ops.rs checks both against the f64
//! reference at odd shapes (T = 1, 7, 45, 130; head dims 1, 20, 59, 65; causal and not).
#![cfg(target_arch = "x86_64")]
use super::act_simd::exp16;
use std::arch::x86_64::*;

/// Register-tile rows.
const MR: usize = 6;
/// Register-tile columns (four 16-lane vectors).
const NB: usize = 64;

/// c[m×n] (row stride ldc) = a[m×k] (row stride lda) · b[k×n] (row stride ldb); unit column
/// strides.
///
/// # Safety
/// AVX-512F; a holds rows m × k at stride lda, b rows k × n at stride ldb, c rows m × n at stride
/// ldc, c not overlapping a or b.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_rows(m: usize, n: usize, k: usize, a: *const f32, lda: usize, b: *const f32, ldb: usize, c: *mut f32, ldc: usize) {
    for j0 in (0..n).step_by(NB) {
        let cols = NB.min(n - j0);
        let (nv, tail) = (cols.div_ceil(16), cols % 16);
        let mask: __mmask16 = if tail == 0 { 0xFFFF } else { ((1u32 << tail) - 1) as __mmask16 };
        for i0 in (0..m).step_by(MR) {
            let rows = MR.min(m - i0);
            let (ap, bp, cp) = (a.wrapping_add(i0 * lda), b.wrapping_add(j0), c.wrapping_add(i0 * ldc + j0));
            macro_rules! go {
                ($r:literal, $v:literal) => {
                    // SAFETY: the tile's rows × cols lie inside a, b and c (caller's contract).
                    unsafe { tile::<$r, $v>(k, ap, lda, bp, ldb, cp, ldc, mask) }
                };
            }
            macro_rules! by_vectors {
                ($r:literal) => {
                    match nv {
                        1 => go!($r, 1),
                        2 => go!($r, 2),
                        3 => go!($r, 3),
                        _ => go!($r, 4),
                    }
                };
            }
            match rows {
                1 => by_vectors!(1),
                2 => by_vectors!(2),
                3 => by_vectors!(3),
                4 => by_vectors!(4),
                5 => by_vectors!(5),
                _ => by_vectors!(6),
            }
        }
    }
}

/// One R × (16·V) tile of c = a·b, the last vector's lanes masked by `mask`.
///
/// # Safety
/// As [`gemm_rows`] for this tile.
#[inline]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<const R: usize, const V: usize>(k: usize, a: *const f32, lda: usize, b: *const f32, ldb: usize, c: *mut f32, ldc: usize, mask: __mmask16) {
    let mut acc = [[_mm512_setzero_ps(); V]; R];
    for p in 0..k {
        let brow = b.wrapping_add(p * ldb);
        let mut bv = [_mm512_setzero_ps(); V];
        for (v, x) in bv.iter_mut().enumerate() {
            let m = if v + 1 == V { mask } else { 0xFFFF };
            // SAFETY: lanes in `m` are inside row p of b (caller).
            *x = unsafe { _mm512_maskz_loadu_ps(m, brow.add(16 * v)) };
        }
        for (r, accr) in acc.iter_mut().enumerate() {
            // SAFETY: a[r][p] is inside a (caller).
            let x = _mm512_set1_ps(unsafe { *a.add(r * lda + p) });
            for (s, &y) in accr.iter_mut().zip(&bv) {
                *s = _mm512_fmadd_ps(x, y, *s);
            }
        }
    }
    for (r, accr) in acc.iter().enumerate() {
        for (v, &s) in accr.iter().enumerate() {
            let m = if v + 1 == V { mask } else { 0xFFFF };
            // SAFETY: lanes in `m` are inside row r of the tile of c (caller).
            unsafe { _mm512_mask_storeu_ps(c.add(r * ldc + 16 * v), m, s) };
        }
    }
}

/// Over `row[..keys]` (the scores of one query): x·scale, then exp(x − max) / Σ; `row[keys..]`
/// (masked keys) becomes 0. Returns the row's logsumexp, max + ln Σ. `keys` ≥ 1.
///
/// # Safety
/// AVX-512F.
#[target_feature(enable = "avx512f")]
pub unsafe fn softmax_row(row: &mut [f32], keys: usize, scale: f32) -> f32 {
    let (live, dead) = row.split_at_mut(keys);
    dead.fill(0.0);
    let n = live.len();
    let lanes = |i: usize| -> __mmask16 {
        let r = n - i;
        if r >= 16 {
            0xFFFF
        } else {
            ((1u32 << r) - 1) as __mmask16
        }
    };
    let p = live.as_mut_ptr();
    let sc = _mm512_set1_ps(scale);
    let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
    for i in (0..n).step_by(16) {
        let m = lanes(i);
        // SAFETY: lanes in m are inside live.
        let x = _mm512_mul_ps(unsafe { _mm512_maskz_loadu_ps(m, p.add(i)) }, sc);
        unsafe { _mm512_mask_storeu_ps(p.add(i), m, x) };
        mx = _mm512_mask_max_ps(mx, m, mx, x);
    }
    let max = _mm512_reduce_max_ps(mx);
    let (mv, mut sum) = (_mm512_set1_ps(max), _mm512_setzero_ps());
    for i in (0..n).step_by(16) {
        let m = lanes(i);
        // SAFETY: as above.
        let e = exp16(_mm512_sub_ps(unsafe { _mm512_maskz_loadu_ps(m, p.add(i)) }, mv));
        unsafe { _mm512_mask_storeu_ps(p.add(i), m, e) };
        sum = _mm512_mask_add_ps(sum, m, sum, e);
    }
    let z = _mm512_reduce_add_ps(sum);
    let inv = _mm512_set1_ps(1.0 / z);
    for i in (0..n).step_by(16) {
        let m = lanes(i);
        // SAFETY: as above.
        unsafe { _mm512_mask_storeu_ps(p.add(i), m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, p.add(i)), inv)) };
    }
    max + z.ln()
}
