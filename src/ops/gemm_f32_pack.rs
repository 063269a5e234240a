//! Packing for the f32 GEMM (src/ops/gemm_f32.rs): A row panels `[kc][MR]` and B column panels
//! `[kc][NR]`, zero-padded at the edges, from strided views (16×16 in-register transposes where
//! a panel runs across contiguous lines: row-major A, a transposed weight as B); and
//! [`PackedB`], a B packed once — a Linear weight packed when an inference model is loaded, so
//! no GEMM packs it again (each thread of a row-split GEMM would otherwise pack all of it, per
//! call).
use super::gemm_f32::{available, Tuning, MR, NR};
use super::matmul::View;
use rayon::prelude::*;

/// B [k×n] in the kernel's panel layout for one [`Tuning`]: for each k block (`tuning.kc(k)`
/// deep, the blocks the GEMM walks), every NR-column panel as `[kc][NR]`, columns past n zero.
/// The block at depth pc starts at `pc · panels · NR` (the blocks before it hold pc rows).
#[derive(Debug)]
pub struct PackedB {
    data: Vec<f32>,
    k: usize,
    n: usize,
    tuning: Tuning,
}

impl PackedB {
    /// A Linear weight W [n×k] (row-major) packed as B = Wᵀ for y = x·Wᵀ, for this CPU's tuning.
    /// Call only when [`available`].
    pub fn linear_weight(w: &[f32], n: usize, k: usize) -> PackedB {
        assert!(w.len() >= n * k, "PackedB: the weight holds {} values, need {n}×{k}", w.len());
        Self::new(View::row_major(&w[..n * k], n, k).t(), Tuning::detected())
    }

    /// B packed for `tuning` (in parallel over its panels). Call only when [`available`].
    pub fn new(b: View, tuning: Tuning) -> PackedB {
        let (k, n) = (b.rows, b.cols);
        assert!(available(), "PackedB needs AVX-512F");
        assert!(k == 0 || n == 0 || (k - 1) * b.rs + (n - 1) * b.cs < b.data.len(), "PackedB: view out of bounds");
        let npan = n.div_ceil(NR);
        let mut data = vec![0.0f32; k * npan * NR]; // [k block][panel][kc][NR]
        if !data.is_empty() {
            let kc = tuning.kc(k);
            data.par_chunks_mut(kc * npan * NR).enumerate().for_each(|(blk, block)| {
                let (pc, kcb) = (blk * kc, kc.min(k - blk * kc));
                block.par_chunks_mut(kcb * NR).enumerate().for_each(|(jp, dst)| pack_b(&b, pc, kcb, jp * NR, dst));
            });
        }
        PackedB { data, k, n, tuning }
    }

    /// Depth k (rows of B).
    pub fn k(&self) -> usize {
        self.k
    }
    /// Width n (columns of B).
    pub fn n(&self) -> usize {
        self.n
    }
    /// The tuning it was packed for (the GEMM runs with it).
    pub fn tuning(&self) -> Tuning {
        self.tuning
    }

    /// The `panels` packed panels of the k block at depth `pc` (`kc` deep) from column `j0` (a
    /// multiple of NR) on: `panels · kc · NR` values.
    pub(super) fn block(&self, pc: usize, kc: usize, j0: usize, panels: usize) -> &[f32] {
        let all = self.n.div_ceil(NR);
        &self.data[pc * all * NR + (j0 / NR) * kc * NR..][..panels * kc * NR]
    }
}

/// A[i0..i0+MR, pc..pc+kc] → dst[kc][MR] (rows past m are zero).
pub(super) fn pack_a(a: &View, i0: usize, pc: usize, kc: usize, dst: &mut [f32]) {
    let rows = MR.min(a.rows - i0);
    if rows < MR {
        dst.fill(0.0);
    }
    #[cfg(target_arch = "x86_64")]
    if a.cs == 1 {
        // SAFETY: AVX-512F (checked by `gemm`); rows i0..i0+rows, columns pc..pc+kc are inside
        // the view, and dst holds kc·MR values.
        unsafe { pack_a_rows(a, i0, rows, pc, kc, dst) };
        return;
    }
    // element (r, p) → dst[p·MR + r]; rows outer when a row is contiguous, else k steps outer
    let start = i0 * a.rs + pc * a.cs;
    if a.cs == 1 {
        strided_copy(a.data, start, (rows, a.rs, 1), (kc, 1, MR), dst);
    } else {
        strided_copy(a.data, start, (kc, a.cs, MR), (rows, a.rs, 1), dst);
    }
}

/// dst[o·od + i·id] = src[start + o·os + i·is] for o < n_outer, i < n_inner (scalar packing).
fn strided_copy(src: &[f32], start: usize, (no, os, od): (usize, usize, usize), (ni, is, id): (usize, usize, usize), dst: &mut [f32]) {
    for o in 0..no {
        for i in 0..ni {
            dst[o * od + i * id] = src[start + o * os + i * is];
        }
    }
}

/// [`pack_a`] for row-major A: per 16 k steps, the panel's rows loaded as 16-value vectors
/// (masked past kc, zero past `rows`), transposed in registers ([`transpose16`]) and stored as
/// k rows of MR values — no gathers (one 14-lane gather per k step took about twice as long).
///
/// # Safety
/// AVX-512F; the view covers rows i0..i0+rows and columns pc..pc+kc; dst holds kc·MR values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_a_rows(a: &View, i0: usize, rows: usize, pc: usize, kc: usize, dst: &mut [f32]) {
    assert!(rows <= MR && MR <= 16, "pack_a_rows: bad panel");
    // SAFETY: row r < rows reads a.data[(i0 + r)·rs + pc + p], p < kc: inside the view (caller).
    unsafe { transpose_lines(a.data.as_ptr().wrapping_add(i0 * a.rs + pc), a.rs, rows, kc, dst, MR, MR) };
}

/// [`transpose_bf16`]'s AVX-512 driver: tasks of 32 rows of x, each read as one contiguous run,
/// in 16-row blocks ([`transpose_lines_bf16`]) into lanes i0..i0 + live of every output row. (Tasks of output rows instead — 16 or 64 of x's columns, 64 or 256 bytes
/// from each of all its rows — ran at 3.4 GB/s on an [1984×2048] x (8 KiB row stride) against
/// ≈ 8 this way; ≈ 10 either way at other widths.)
///
/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
unsafe fn par_transpose_bf16(x: &[f32], rows: usize, cols: usize) -> Vec<half::bf16> {
    type T = half::bf16;
    const TASK_ROWS: usize = 32;
    struct Out(*mut T);
    // SAFETY: the tasks write disjoint lanes of the output (below).
    unsafe impl Send for Out {}
    unsafe impl Sync for Out {}
    impl Out {
        fn get(&self) -> *mut T {
            self.0
        }
    }
    let fill = |t: &mut [T]| {
        let dst = Out(t.as_mut_ptr());
        (0..rows.div_ceil(TASK_ROWS)).into_par_iter().for_each(|c| {
            for j0 in (0..cols).step_by(16) {
                for i0 in (TASK_ROWS * c..rows.min(TASK_ROWS * (c + 1))).step_by(16) {
                    // SAFETY: lines i0.. < rows read columns j0..j0 + 16 (≤ cols) of x; the
                    // stores go to rows j0.. < cols of t (rows values each), lanes i0..i0 +
                    // live: this task's alone; the CPU's features are the caller's.
                    unsafe {
                        transpose_lines_bf16(
                            x.as_ptr().wrapping_add(i0 * cols + j0),
                            cols,
                            (rows - i0).min(16),
                            (cols - j0).min(16),
                            dst.get().wrapping_add(j0 * rows + i0),
                            rows,
                        )
                    };
                }
            }
        });
        Ok::<(), std::convert::Infallible>(())
    };
    // SAFETY: the tasks store lanes i0..i0 + live of every output row: all of them.
    match unsafe { super::fastmath::written_by(rows * cols, fill) } {
        Ok(t) => t, // [cols, rows]
        Err(e) => match e {},
    }
}

/// [`transpose_bf16_sums`]'s AVX-512 driver: [`par_transpose_bf16`]'s tasks of [`SUM_ROWS`]
/// rows, each also summing its rows (in order, from the loaded lines before their transpose) into
/// its own partial row; the partial rows then added in task order, columns in parallel.
///
/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn par_transpose_bf16_sums(x: &[f32], rows: usize, cols: usize) -> (Vec<half::bf16>, Vec<f32>) {
    type T = half::bf16;
    #[derive(Clone, Copy)]
    struct Out(*mut T);
    // SAFETY: the tasks write disjoint lanes of the output (below).
    unsafe impl Send for Out {}
    unsafe impl Sync for Out {}
    impl Out {
        fn get(self) -> *mut T {
            self.0
        }
    }
    let tasks = rows.div_ceil(SUM_ROWS);
    // SAFETY: each task writes its partial row in full (zeroed, then added to).
    let mut parts = unsafe { super::fastmath::written(tasks * cols, |p: &mut [f32]| p.par_chunks_mut(cols.max(1)).for_each(|r| r.fill(0.0))) };
    let fill = |t: &mut [T]| {
        let dst = Out(t.as_mut_ptr());
        parts.par_chunks_mut(cols.max(1)).enumerate().for_each(|(c, part)| {
            for j0 in (0..cols).step_by(16) {
                for i0 in (SUM_ROWS * c..rows.min(SUM_ROWS * (c + 1))).step_by(16) {
                    // SAFETY: as `par_transpose_bf16`; `part` holds cols values, j0 + 16 ≤ cols
                    // rounded up to 16 is covered by the masked loads and stores.
                    unsafe {
                        transpose_lines_bf16_sums(
                            x.as_ptr().wrapping_add(i0 * cols + j0),
                            cols,
                            (rows - i0).min(16),
                            (cols - j0).min(16),
                            dst.get().wrapping_add(j0 * rows + i0),
                            rows,
                            part.as_mut_ptr().wrapping_add(j0),
                        )
                    };
                }
            }
        });
        Ok::<(), std::convert::Infallible>(())
    };
    // SAFETY: the tasks store lanes i0..i0 + live of every output row: all of them.
    let t = match unsafe { super::fastmath::written_by(rows * cols, fill) } {
        Ok(t) => t, // [cols, rows]
        Err(e) => match e {},
    };
    // the partial rows in task order, ranges of 256 columns in parallel
    let mut sums = vec![0f32; cols];
    sums.par_chunks_mut(256).enumerate().for_each(|(c, s)| {
        for part in parts.chunks_exact(cols.max(1)) {
            s.iter_mut().zip(&part[256 * c..]).for_each(|(a, b)| *a += b);
        }
    });
    (t, sums)
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
        return unsafe { par_transpose_bf16(x, rows, cols) };
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
        return unsafe { par_transpose_bf16_sums(x, rows, cols) };
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
/// `live` lanes stored.
///
/// # Safety
/// As [`transpose_lines_to`] with `store` = `live`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_lines_bf16(base: *const f32, stride: usize, live: usize, steps: usize, dst: *mut half::bf16, dst_stride: usize) {
    use std::arch::x86_64::*;
    // SAFETY: the lines are readable (caller).
    unsafe {
        transpose_lines_each(base, stride, live, steps, |p, row| {
            let b = super::act_simd::bf16_bits16(_mm512_castps_si512(row));
            // SAFETY: lanes < live of row p < steps are writable (caller).
            _mm512_mask_cvtepi32_storeu_epi16(dst.wrapping_add(p * dst_stride).cast(), lane_mask(live), b)
        })
    }
}

/// [`transpose_lines_bf16`], also adding the `live` lines to `sums[..steps]` in line order (the
/// loaded vectors, before the transpose).
///
/// # Safety
/// As [`transpose_lines_bf16`]; `sums[..steps]` is writable and this thread's alone.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_lines_bf16_sums(base: *const f32, stride: usize, live: usize, steps: usize, dst: *mut half::bf16, dst_stride: usize, sums: *mut f32) {
    use std::arch::x86_64::*;
    for p in (0..steps).step_by(16) {
        let len = (steps - p).min(16);
        let mut r = [_mm512_setzero_ps(); 16];
        // SAFETY: lanes < len of sums[p..] are inside sums[..steps] (caller).
        let mut acc = unsafe { _mm512_maskz_loadu_ps(lane_mask(len), sums.wrapping_add(p)) };
        for (i, ri) in r.iter_mut().enumerate().take(live) {
            // SAFETY: lanes < len read values p.. < steps of line i (caller).
            *ri = unsafe { _mm512_maskz_loadu_ps(lane_mask(len), base.wrapping_add(i * stride + p)) };
            acc = _mm512_add_ps(acc, *ri);
        }
        // SAFETY: as above.
        unsafe { _mm512_mask_storeu_ps(sums.wrapping_add(p), lane_mask(len), acc) };
        transpose16(&mut r);
        for (q, rq) in r.iter().enumerate().take(len) {
            let b = super::act_simd::bf16_bits16(_mm512_castps_si512(*rq));
            // SAFETY: lanes < live of row p + q < steps are writable (caller).
            unsafe { _mm512_mask_cvtepi32_storeu_epi16(dst.wrapping_add((p + q) * dst_stride).cast(), lane_mask(live), b) };
        }
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
/// loads, [`transpose16`], one `store` per step.
///
/// # Safety
/// AVX-512F; values 0..steps of every live line are readable.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_lines_each(base: *const f32, stride: usize, live: usize, steps: usize, mut store: impl FnMut(usize, std::arch::x86_64::__m512)) {
    use std::arch::x86_64::*;
    for p in (0..steps).step_by(16) {
        let len = (steps - p).min(16);
        let mut r = [_mm512_setzero_ps(); 16];
        for (i, ri) in r.iter_mut().enumerate().take(live) {
            // SAFETY: lanes < len read values p.. < steps of line i (caller).
            *ri = unsafe { _mm512_maskz_loadu_ps(lane_mask(len), base.wrapping_add(i * stride + p)) };
        }
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
        transpose_lines_each(base, stride, live, steps, |p, row| {
            // SAFETY: lanes < store of row p < steps are writable (caller).
            _mm512_mask_storeu_ps(dst.wrapping_add(p * dst_stride), lane_mask(store), row)
        })
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

/// For p in 0..steps: lanes 0..live of `base + p·step + lane·stride` → dst[p·dst_stride..][..store]
/// (lanes past `live` stored as zero; `store` ≤ 16).
///
/// # Safety
/// AVX-512F; 16·stride fits i32; every live lane's address is readable; dst holds
/// (steps − 1)·dst_stride + store values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn gather_steps(base: *const f32, stride: usize, live: usize, steps: usize, step: usize, dst: &mut [f32], dst_stride: usize, store: usize) {
    use std::arch::x86_64::*;
    let idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(stride as i32));
    let lanes = |n: usize| -> __mmask16 {
        if n >= 16 {
            0xFFFF
        } else {
            ((1u32 << n) - 1) as __mmask16
        }
    };
    let (mask, smask) = (lanes(live), lanes(store));
    assert!(steps == 0 || dst.len() >= (steps - 1) * dst_stride + store, "gather_steps: dst too small");
    for p in 0..steps {
        // SAFETY: masked lanes are not read (caller: live lanes are readable); the store stays
        // inside dst (asserted above).
        unsafe {
            let v = _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), mask, idx, base.wrapping_add(p * step).cast());
            _mm512_mask_storeu_ps(dst.as_mut_ptr().add(p * dst_stride), smask, v);
        }
    }
}

/// B[pc..pc+kc, j0..j0+NR] → dst[kc][NR] (columns past n are zero).
pub(super) fn pack_b(b: &View, pc: usize, kc: usize, j0: usize, dst: &mut [f32]) {
    let cols = NR.min(b.cols - j0);
    if cols < NR {
        dst.fill(0.0);
    }
    if b.cs == 1 {
        for p in 0..kc {
            dst[p * NR..p * NR + cols].copy_from_slice(&b.data[(pc + p) * b.rs + j0..][..cols]);
        }
    } else {
        #[cfg(target_arch = "x86_64")]
        if b.rs == 1 {
            // SAFETY: AVX-512F (checked by `gemm` / `PackedB::new`); columns j0..j0+cols, rows
            // pc..pc+kc are inside the view, and dst holds kc·NR values.
            unsafe { pack_b_cols(b, pc, kc, j0, cols, dst) };
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if b.cs * 16 < i32::MAX as usize {
            // SAFETY: AVX-512F was checked (`gemm` asserts `available`); lanes past `cols` are
            // masked off, and the others read b.data[(j0 + j)·cs + (pc + p)·rs], inside the view.
            unsafe { pack_b_gather(b, pc, kc, j0, cols, dst) };
            return;
        }
        strided_copy(b.data, j0 * b.cs + pc * b.rs, (cols, b.cs, 1), (kc, b.rs, NR), dst);
        // (p, j) → dst[p·NR + j]
    }
}

/// [`pack_b`] for B whose columns are contiguous (a transposed weight, W [n×k] row-major): per
/// 16 columns and 16 k steps, the columns loaded as vectors (masked past kc, zero past `cols`),
/// transposed in registers and stored as k rows of the panel.
///
/// # Safety
/// AVX-512F; b.rs == 1; the view covers rows pc..pc+kc and columns j0..j0+cols; dst holds
/// kc·NR values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_b_cols(b: &View, pc: usize, kc: usize, j0: usize, cols: usize, dst: &mut [f32]) {
    for h in 0..NR / 16 {
        let live = cols.saturating_sub(h * 16).min(16);
        // SAFETY: column j0 + 16h + j (j < live) reads b.data[(j0 + 16h + j)·cs + pc + p], p <
        // kc: inside the view (caller); dst[16h..] holds (kc − 1)·NR + 16 values.
        unsafe { transpose_lines(b.data.as_ptr().wrapping_add((j0 + h * 16) * b.cs + pc), b.cs, live, kc, &mut dst[h * 16..], NR, 16) };
    }
}

/// [`pack_b`] for column-strided B with strided rows too: two 16-lane gathers per k step.
///
/// # Safety
/// AVX-512F; 16·cs fits i32; the view covers rows pc..pc+kc and columns j0..j0+cols.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_b_gather(b: &View, pc: usize, kc: usize, j0: usize, cols: usize, dst: &mut [f32]) {
    for h in 0..NR / 16 {
        let live = cols.saturating_sub(h * 16).min(16);
        if live == 0 {
            break; // dst was zero-filled
        }
        let base = b.data.as_ptr().wrapping_add((j0 + h * 16) * b.cs + pc * b.rs);
        // SAFETY: lane j of step p reads b.data[(j0 + 16h + j)·cs + (pc + p)·rs] (j < live):
        // inside the view.
        unsafe { gather_steps(base, b.cs, live, kc, b.rs, &mut dst[h * 16..], NR, 16) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vals(n: usize) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * 0.37).sin() + i as f32 * 1e-3).collect()
    }

    /// The transposing packers (row-major A, column-contiguous B) against the element formula,
    /// at every row / column count of a panel and depths around the 16-step blocks.
    #[test]
    fn transposing_packers_match_the_element_formula() {
        if !available() {
            return;
        }
        for kc in [1, 7, 15, 16, 17, 45, 64] {
            let (rows_all, cols_all, pc) = (37, 70, 3);
            let data = vals(rows_all * cols_all);
            // A row-major [37 × 70] (cs = 1): panels at every row offset, so `rows` runs 1..=MR.
            let a = View::row_major(&data, rows_all, cols_all);
            for i0 in [0, 23, 30, 36] {
                let mut got = vec![f32::NAN; kc * MR];
                pack_a(&a, i0, pc, kc, &mut got);
                for p in 0..kc {
                    for r in 0..MR {
                        let want = if i0 + r < rows_all { data[(i0 + r) * cols_all + pc + p] } else { 0.0 };
                        assert_eq!(got[p * MR + r].to_bits(), want.to_bits(), "pack_a kc {kc} i0 {i0} ({r}, {p})");
                    }
                }
            }
            // B = Wᵀ with W row-major [70 × 80] (rs = 1): panels at every column offset.
            let (n, k) = (70, 80);
            let wd = vals(n * k);
            let b = View::row_major(&wd, n, k).t(); // [80 × 70], columns contiguous
            for j0 in [0, 32, 38, 64] {
                let mut got = vec![f32::NAN; kc * NR];
                pack_b(&b, pc, kc, j0, &mut got);
                for p in 0..kc {
                    for j in 0..NR {
                        let want = if j0 + j < n { wd[(j0 + j) * k + pc + p] } else { 0.0 };
                        assert_eq!(got[p * NR + j].to_bits(), want.to_bits(), "pack_b kc {kc} j0 {j0} ({p}, {j})");
                    }
                }
            }
        }
    }
}
