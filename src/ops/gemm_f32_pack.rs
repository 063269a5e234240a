//! Packing for the f32 GEMM (src/ops/gemm_f32.rs): A row panels `[kc][MR]` and B column panels
//! `[kc][NR]`, zero-padded at the edges, from strided views (AVX-512 gathers for the strided
//! side of a transposed operand); and [`PackedB`], a B packed once — a Linear weight packed when
//! an inference model is loaded, so no GEMM packs it again (each thread of a row-split GEMM
//! would otherwise pack all of it, per call).
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
    if a.cs == 1 && a.rs * 16 < i32::MAX as usize {
        // SAFETY: AVX-512F (checked by `gemm`); lanes past `rows` are masked off, the others read
        // a.data[(i0 + r)·rs + pc + p], inside the view.
        unsafe { pack_a_gather(a, i0, rows, pc, kc, dst) };
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

/// [`pack_a`] for row-major A: one gather of the panel's rows per k step.
///
/// # Safety
/// AVX-512F; 16·rs fits i32; the view covers rows i0..i0+rows and columns pc..pc+kc.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_a_gather(a: &View, i0: usize, rows: usize, pc: usize, kc: usize, dst: &mut [f32]) {
    let base = a.data.as_ptr().wrapping_add(i0 * a.rs + pc);
    // SAFETY: lane r of step p reads a.data[(i0 + r)·rs + pc + p] (r < rows): inside the view.
    unsafe { gather_steps(base, a.rs, rows, kc, 1, dst, MR, MR) };
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

/// [`pack_b`] for column-strided B (a transposed weight): two 16-lane gathers per k step.
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
