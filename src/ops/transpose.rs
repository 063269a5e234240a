//! Transposes of row-major f32 matrices on the CPU: [`transpose_reference`] (f32), and the
//! backward's [`transpose_bf16`] (dyᵀ rounded to bf16 for the dW GEMM) with its fused twin
//! [`transpose_bf16_sums`] (also the bias gradient's column sums, from the same read of dy), each
//! with a scalar reference; and the AVX-512 building blocks the packers and attention share:
//! `transpose16` (a 16×16 block in registers) and `transpose_lines` / `transpose_lines_to`
//! (up to 16 lines of any length, transposed 16 steps at a time).
#[cfg(target_arch = "x86_64")]
use super::fastmath::SharedMut;
#[cfg(target_arch = "x86_64")]
use super::gemm_f32::available;
#[cfg(target_arch = "x86_64")]
use rayon::prelude::*;

/// [`transpose_bf16`]'s and [`transpose_bf16_sums`]'s AVX-512 driver: tasks of [`SUM_ROWS`] rows
/// of x, each read as one contiguous run, in 16-row blocks ([`transpose_lines_bf16`]) into lanes
/// i0..i0 + live of every output row; with `sums`, each task also adds its rows (in order, the
/// loaded vectors before their transpose) into its own partial row, and the partial rows are then
/// added in task order, column ranges in parallel (without `sums`, the second Vec is empty).
/// (Tasks of output rows instead — 16 or 64 of x's columns, 64 or 256 bytes from each of all its
/// rows — ran at 3.4 GB/s on an [1984×2048] x (8 KiB row stride) against ≈ 8 this way; ≈ 10
/// either way at other widths. Square 256×256 tiles: 4–10 % faster on [7936×n], 10 % slower on
/// [1984×2048].)
///
/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
unsafe fn par_transpose_bf16(x: &[f32], rows: usize, cols: usize, sums: bool) -> (Vec<half::bf16>, Vec<f32>) {
    let tasks = rows.div_ceil(SUM_ROWS);
    let mut parts = sums.then(|| super::fastmath::zeros(tasks * cols)); // a partial row per task [tasks, cols]
    let fill = |t: &mut [half::bf16]| {
        // the tasks write disjoint elements: lanes of the output (below), their own partial rows
        let (dst, part) = (SharedMut::new(t), parts.as_mut().map(|p| SharedMut::new(p)));
        (0..tasks).into_par_iter().for_each(|c| {
            for j0 in (0..cols).step_by(16) {
                for i0 in (SUM_ROWS * c..rows.min(SUM_ROWS * (c + 1))).step_by(16) {
                    // SAFETY: lines i0.. < rows read columns j0..j0 + 16 (≤ cols) of x; the
                    // stores go to rows j0.. < cols of t (rows values each), lanes i0..i0 +
                    // live, and to columns j0.. of partial row c: this task's alone; the CPU's
                    // features are the caller's.
                    unsafe {
                        transpose_lines_bf16(
                            x.as_ptr().wrapping_add(i0 * cols + j0),
                            cols,
                            (rows - i0).min(16),
                            (cols - j0).min(16),
                            dst.at(j0 * rows + i0),
                            rows,
                            part.map(|p| p.at(c * cols + j0)),
                        )
                    };
                }
            }
        });
    };
    // SAFETY: the tasks store lanes i0..i0 + live of every output row: all of them.
    let t = unsafe { super::fastmath::written(rows * cols, fill) }; // [cols, rows]
    let Some(parts) = parts else { return (t, Vec::new()) };
    (t, super::reduce::col_sums(&parts, cols)) // the partial rows added in task order
}

/// The transpose of a row-major `[rows×cols]` x, one value at a time (the reference of
/// [`transpose_bf16`]'s).
pub fn transpose_reference(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    assert_eq!(x.len(), rows * cols, "transpose: x holds {} values, not {rows}×{cols}", x.len());
    let mut t = vec![0.0; rows * cols]; // [cols, rows]
    for (i, row) in x.chunks_exact(cols.max(1)).take(rows).enumerate() {
        for (j, &v) in row.iter().enumerate() {
            t[j * rows + i] = v;
        }
    }
    t
}

/// xᵀ (the `[cols×rows]` transpose of a row-major `[rows×cols]` x) rounded to bf16 (the bits of
/// `half::bf16::from_f32`), written in half the bytes of f32 — the dW GEMM's A, dyᵀ, which the GEMM would round to the same values while packing and
/// then reads at half the bytes too. One task per 32 rows of x, so that each writes 64 bytes of
/// every output row (whole lines where `rows` is a multiple of 32: no line shared by two threads).
pub fn transpose_bf16(x: &[f32], rows: usize, cols: usize) -> Vec<half::bf16> {
    assert_eq!(x.len(), rows * cols, "transpose_bf16: x holds {} values, not {rows}×{cols}", x.len());
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: AVX-512F was just checked.
        return unsafe { par_transpose_bf16(x, rows, cols, false).0 };
    }
    transpose_bf16_reference(x, rows, cols)
}

/// [`transpose_bf16`], one value at a time.
pub fn transpose_bf16_reference(x: &[f32], rows: usize, cols: usize) -> Vec<half::bf16> {
    transpose_reference(x, rows, cols).into_iter().map(half::bf16::from_f32).collect()
}

/// Rows per partial sum of [`transpose_bf16_sums`] (its tasks' height).
pub const SUM_ROWS: usize = 32;

/// [`transpose_bf16`] and x's column sums from one read of x (a Linear's backward: dyᵀ for the
/// dW GEMM and the bias gradient; a separate `col_sums` read all of dy again, ≈ 1.6 % of a bf16
/// Long-CLIP step). Sums in a fixed order, independent of the thread count: each block of
/// [`SUM_ROWS`] rows summed in row order from zero, the blocks' sums added in block order
/// ([`transpose_bf16_sums_reference`]).
pub fn transpose_bf16_sums(x: &[f32], rows: usize, cols: usize) -> (Vec<half::bf16>, Vec<f32>) {
    assert_eq!(x.len(), rows * cols, "transpose_bf16_sums: x holds {} values, not {rows}×{cols}", x.len());
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: AVX-512F was just checked.
        return unsafe { par_transpose_bf16(x, rows, cols, true) };
    }
    transpose_bf16_sums_reference(x, rows, cols)
}

/// [`transpose_bf16_sums`], one value at a time.
pub fn transpose_bf16_sums_reference(x: &[f32], rows: usize, cols: usize) -> (Vec<half::bf16>, Vec<f32>) {
    let mut sums = vec![0f32; cols];
    for block in x.chunks(SUM_ROWS * cols.max(1)) {
        let mut part = vec![0f32; cols];
        for row in block.chunks_exact(cols.max(1)) {
            part.iter_mut().zip(row).for_each(|(s, v)| *s += v);
        }
        sums.iter_mut().zip(&part).for_each(|(s, p)| *s += p);
    }
    (transpose_bf16_reference(x, rows, cols), sums)
}

/// [`transpose_lines_to`] with each stored row rounded to bf16 (`act_simd::bf16_bits16`), all
/// `live` lanes stored; with `sums`, the `live` lines also added to `sums[..steps]` in line order
/// (the loaded vectors, before the transpose).
///
/// # Safety
/// As [`transpose_lines_to`] with `store` = `live`; `sums[..steps]` is writable and this
/// thread's alone.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn transpose_lines_bf16(
    base: *const f32,
    stride: usize,
    live: usize,
    steps: usize,
    dst: *mut half::bf16,
    dst_stride: usize,
    sums: Option<*mut f32>,
) {
    use std::arch::x86_64::*;
    let add_lines = |p: usize, len: usize, r: &[__m512; 16]| {
        if let Some(s) = sums {
            // SAFETY: lanes < len of sums[p..] are inside sums[..steps] (caller).
            unsafe {
                let acc = r[..live].iter().fold(_mm512_maskz_loadu_ps(lane_mask(len), s.wrapping_add(p)), |a, &v| _mm512_add_ps(a, v));
                _mm512_mask_storeu_ps(s.wrapping_add(p), lane_mask(len), acc)
            }
        }
    };
    // SAFETY: the lines are readable (caller).
    unsafe {
        transpose_lines_each(base, stride, live, steps, add_lines, |p, row| {
            let b = super::act_simd::bf16_bits16(_mm512_castps_si512(row));
            // SAFETY: lanes < live of row p < steps are writable (caller).
            _mm512_mask_cvtepi32_storeu_epi16(dst.wrapping_add(p * dst_stride).cast(), lane_mask(live), b)
        })
    }
}

/// The first `n` (≤ 16) of 16 lanes.
#[cfg(target_arch = "x86_64")]
pub(crate) fn lane_mask(n: usize) -> u16 {
    if n >= 16 {
        0xFFFF
    } else {
        ((1u32 << n) - 1) as u16
    }
}

/// For every step p < `steps`: `store(p, row)` with lane i of `row` value p of line
/// `base + i·stride` (i < `live` ≤ 16; lanes past `live` zero), 16 steps at a time: masked line
/// loads, `loaded(p, len, lines)` on the loaded (untransposed) lines of steps p..p + len,
/// [`transpose16`], one `store` per step.
///
/// # Safety
/// AVX-512F; values 0..steps of every live line are readable.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_lines_each(
    base: *const f32,
    stride: usize,
    live: usize,
    steps: usize,
    mut loaded: impl FnMut(usize, usize, &[std::arch::x86_64::__m512; 16]),
    mut store: impl FnMut(usize, std::arch::x86_64::__m512),
) {
    use std::arch::x86_64::*;
    for p in (0..steps).step_by(16) {
        let len = (steps - p).min(16);
        let mut r = [_mm512_setzero_ps(); 16];
        for (i, ri) in r.iter_mut().enumerate().take(live) {
            // SAFETY: lanes < len read values p.. < steps of line i (caller).
            *ri = unsafe { _mm512_maskz_loadu_ps(lane_mask(len), base.wrapping_add(i * stride + p)) };
        }
        loaded(p, len, &r);
        transpose16(&mut r);
        for (q, rq) in r.iter().enumerate().take(len) {
            store(p + q, *rq);
        }
    }
}

/// For every step p < `steps`: value p of each of the `live` (≤ 16) lines `base + i·stride`
/// (values contiguous) → lane i of dst[p·dst_stride..][..store] (lanes past `live` zero), 16
/// steps at a time: masked line loads, [`transpose16`], masked stores.
///
/// # Safety
/// AVX-512F; values 0..steps of every live line are readable; store ≤ 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn transpose_lines(base: *const f32, stride: usize, live: usize, steps: usize, dst: &mut [f32], dst_stride: usize, store: usize) {
    assert!(live <= 16 && store <= 16 && (steps == 0 || dst.len() >= (steps - 1) * dst_stride + store), "transpose_lines: dst too small");
    // SAFETY: the lines are readable (caller); dst holds every stored lane (asserted).
    unsafe { transpose_lines_to(base, stride, live, steps, dst.as_mut_ptr(), dst_stride, store) }
}

/// [`transpose_lines`] into a raw destination (a block of a buffer that other threads write
/// elsewhere, e.g. one head's columns of an attention gradient).
///
/// # Safety
/// As [`transpose_lines`]; `live`, `store` ≤ 16; `dst + p·dst_stride + j` for p < steps, j <
/// store is writable and no other thread accesses it meanwhile.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn transpose_lines_to(base: *const f32, stride: usize, live: usize, steps: usize, dst: *mut f32, dst_stride: usize, store: usize) {
    use std::arch::x86_64::*;
    // SAFETY: the lines are readable (caller).
    unsafe {
        transpose_lines_each(
            base,
            stride,
            live,
            steps,
            |_, _, _| {},
            |p, row| {
                // SAFETY: lanes < store of row p < steps are writable (caller).
                _mm512_mask_storeu_ps(dst.wrapping_add(p * dst_stride), lane_mask(store), row)
            },
        )
    }
}

/// In-register transpose of a 16×16 f32 block: `r[i]` lane j ← `r[j]` lane i (64 shuffles:
/// 32-bit and 64-bit interleaves within 128-bit lanes, then two rounds of 128-bit block moves).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) fn transpose16(r: &mut [std::arch::x86_64::__m512; 16]) {
    use std::arch::x86_64::*;
    let mut t = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        // block j of t[2i]: r2i[4j], r2i+1[4j], r2i[4j+1], r2i+1[4j+1]; of t[2i+1]: elements 4j+2, 4j+3
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    let pd = _mm512_castps_pd;
    let ps = _mm512_castpd_ps;
    for i in 0..4 {
        // block j of r[4i + c]: column 4j + c of rows 4i..4i+4
        let (a0, a1, b0, b1) = (pd(t[4 * i]), pd(t[4 * i + 1]), pd(t[4 * i + 2]), pd(t[4 * i + 3]));
        r[4 * i] = ps(_mm512_unpacklo_pd(a0, b0));
        r[4 * i + 1] = ps(_mm512_unpackhi_pd(a0, b0));
        r[4 * i + 2] = ps(_mm512_unpacklo_pd(a1, b1));
        r[4 * i + 3] = ps(_mm512_unpackhi_pd(a1, b1));
    }
    let x = *r;
    for c in 0..4 {
        let u0 = _mm512_shuffle_f32x4::<0x44>(x[c], x[4 + c]); // blocks 0, 1 of rows 0–3 and 4–7
        let u1 = _mm512_shuffle_f32x4::<0xEE>(x[c], x[4 + c]); // blocks 2, 3
        let u2 = _mm512_shuffle_f32x4::<0x44>(x[8 + c], x[12 + c]);
        let u3 = _mm512_shuffle_f32x4::<0xEE>(x[8 + c], x[12 + c]);
        r[c] = _mm512_shuffle_f32x4::<0x88>(u0, u2); // column c: block 0 of each
        r[4 + c] = _mm512_shuffle_f32x4::<0xDD>(u0, u2); // column 4 + c: block 1
        r[8 + c] = _mm512_shuffle_f32x4::<0x88>(u1, u3);
        r[12 + c] = _mm512_shuffle_f32x4::<0xDD>(u1, u3);
    }
}
