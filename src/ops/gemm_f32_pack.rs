//! Packing for the f32 GEMM (src/ops/gemm_f32.rs): A row panels `[kc][MR]` and B column panels
//! `[kc][NR]`, zero-padded at the edges, from strided views (16×16 in-register transposes where
//! a panel runs across contiguous lines: row-major A, a transposed weight as B); and
//! [`PackedB`], a B packed once — a Linear weight packed when an inference model is loaded, so
//! no GEMM packs it again (each thread of a row-split GEMM would otherwise pack all of it, per
//! call).
use super::gemm_f32::{available, Tuning, MR, NR};
use super::matmul::View;
#[cfg(target_arch = "x86_64")]
use super::transpose::transpose_lines;
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
