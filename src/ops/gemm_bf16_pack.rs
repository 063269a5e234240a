//! The bf16 GEMM's packed weight ([`PackedBf16`], and [`WView`], the borrowed form the kernels
//! read) and packing a weight into its pair panels (`gemm_bf16.rs`, "Data layout": per 32
//! output columns a `[kps][NR]` panel of u32 pairs `lo = x[2p] | hi = x[2p+1] << 16`, zero past
//! n, past k and in the padding pairs kp..kps).
//!
//! Three sources: f32 `[n×k]` row-major (a Linear's W: converted once at load for inference, and
//! every step when fine-tuning in bf16), the transpose of an f32 `[rows×cols]` (the backward's Wᵀ
//! and xᵀ, every step), and bf16 `[n×k]` (a bf16 checkpoint, at load). [`pack_with`] is the
//! scalar reference for all three; on AVX-512F the two f32 packers run 16 lanes at a time with
//! the same bits (bf16 by `half::bf16::from_f32`'s RNE, NaN kept quiet: `act_simd`'s
//! `bf16_bits16`), and write every value of the panels themselves (no zero-fill pass first).
//! tests/gemm_bf16_pack.rs compares them with the reference bit for bit.
#[cfg(target_arch = "x86_64")]
use super::gemm_bf16::resolve;
use super::gemm_bf16::{Kernel, NR};
use half::bf16;
use rayon::prelude::*;
use std::sync::OnceLock;

/// Weights `[n×k]` converted to bf16 and packed for the microkernel (see module docs).
#[derive(Clone, Debug)]
pub struct PackedBf16 {
    n: usize,
    k: usize,
    kp: usize,
    kps: usize, // pairs per panel: kp padded with zeros to a multiple of 16 (one AMX tile)
    data: Vec<u32>,
    /// The f16 twin for the AVX512-FP16 kernel (`gemm_bf16_fp16.rs`), built on its first use;
    /// None inside when a weight is not finite.
    fp16: OnceLock<Option<Fp16Copy>>,
}

/// A packed weight's values ×2^`exp` as f16 pairs, same panels (`gemm_bf16_fp16.rs`).
#[derive(Clone, Debug)]
pub(crate) struct Fp16Copy {
    pub(super) data: Vec<u32>,
    pub(super) exp: i32,
}

impl PackedBf16 {
    /// Packs `w` (`[n×k]` row-major f32), rounding to bf16 (RNE).
    pub fn from_f32(w: &[f32], n: usize, k: usize) -> Self {
        Self::with_data(n, k, pack_f32(w, n, k))
    }

    /// Packs the transpose of `x` (`[rows×cols]` row-major f32): the weight `[cols×rows]`, for
    /// products with `xᵀ` as the right operand (a backward pass's dW = dyᵀ·x, dx = dy·W).
    pub fn from_f32_t(x: &[f32], rows: usize, cols: usize) -> Self {
        Self::with_data(cols, rows, pack_f32_t(x, rows, cols))
    }

    /// Packs `w` (`[n×k]` row-major bf16).
    pub fn from_bf16(w: &[bf16], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "w must be n*k");
        Self::with_data(n, k, pack_with(n, k, |j, kk| w[j * k + kk]))
    }

    /// [`Self::from_f32`] through the scalar reference packer (tests compare the two).
    #[doc(hidden)]
    pub fn from_f32_reference(w: &[f32], n: usize, k: usize) -> Self {
        Self::with_data(n, k, pack_f32_reference(w, n, k))
    }

    /// [`Self::from_f32_t`] through the scalar reference packer (tests compare the two).
    #[doc(hidden)]
    pub fn from_f32_t_reference(x: &[f32], rows: usize, cols: usize) -> Self {
        Self::with_data(cols, rows, pack_f32_t_reference(x, rows, cols))
    }

    /// The packed pairs, padding included (tests compare packers bit for bit).
    #[doc(hidden)]
    pub fn pairs(&self) -> &[u32] {
        &self.data
    }

    fn with_data(n: usize, k: usize, data: Vec<u32>) -> Self {
        let (kp, kps, len) = geometry(n, k);
        assert_eq!(data.len(), len, "PackedBf16: packed data of the wrong length");
        PackedBf16 { n, k, kp, kps, data, fp16: OnceLock::new() }
    }

    pub fn n(&self) -> usize {
        self.n
    }
    pub fn k(&self) -> usize {
        self.k
    }
    /// Element `W[j, kk]` as stored (bf16).
    pub fn get(&self, j: usize, kk: usize) -> bf16 {
        assert!(j < self.n && kk < self.k);
        let v = self.data[(j / NR) * self.kps * NR + (kk / 2) * NR + j % NR];
        bf16::from_bits((v >> (16 * (kk % 2))) as u16)
    }
    /// Pairs per panel in storage (`ceil(k/2)` rounded up to 16, zero-padded).
    pub fn kps(&self) -> usize {
        self.kps
    }
    /// The whole packed weight, borrowed.
    pub(crate) fn view(&self) -> WView<'_> {
        WView { n: self.n, k: self.k, kp: self.kp, kps: self.kps, data: &self.data, fp16: None }
    }
    /// [`Self::view`], with the f16 twin (built now if need be) when `kernel` runs the
    /// AVX512-FP16 kernel.
    pub(crate) fn view_for(&self, kernel: Kernel) -> WView<'_> {
        let mut v = self.view();
        #[cfg(target_arch = "x86_64")]
        if resolve(kernel) == Kernel::Avx512Fp16 {
            v.fp16 = self.fp16.get_or_init(|| super::gemm_bf16_fp16::fp16_copy(&self.data)).as_ref().map(|c| (&c.data[..], c.exp));
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = kernel;
        v
    }
    /// Bytes of packed weight storage (with the f16 twin, once built).
    pub fn size_bytes(&self) -> usize {
        (self.data.len() + self.fp16.get().and_then(Option::as_ref).map_or(0, |c| c.data.len())) * 4
    }
}

/// A borrowed packed weight (the layout of [`PackedBf16`]), or a leading part of one
/// ([`WView::prefix`]): what the GEMMs read.
#[derive(Clone, Copy, Debug)]
pub(crate) struct WView<'a> {
    pub(super) n: usize,
    pub(super) k: usize,
    pub(super) kp: usize,
    /// Pairs per panel in storage (a multiple of 16).
    pub(super) kps: usize,
    pub(super) data: &'a [u32],
    /// The f16 twin's panels and scale exponent, for the AVX512-FP16 kernel.
    pub(super) fp16: Option<(&'a [u32], i32)>,
}

impl<'a> WView<'a> {
    /// A weight `[n×k]` packed by the caller in [`PackedBf16`]'s layout with `kps` pairs per panel.
    pub(super) fn from_parts(n: usize, k: usize, kps: usize, data: &'a [u32]) -> Self {
        assert!(kps.is_multiple_of(16) && kps >= k.div_ceil(2) && data.len() >= n.div_ceil(NR) * kps * NR, "WView: bad packed weight");
        WView { n, k, kp: k.div_ceil(2), kps, data, fp16: None }
    }
    /// The first `n` outputs over the first `k` inputs (no copy): `k` even or all of them, so a
    /// pair never reaches past it. (The AMX kernel loads whole 16-pair tiles: stored pairs past
    /// `k` meet A's zero padding, exact zeros for finite weights.)
    pub(super) fn prefix(self, n: usize, k: usize) -> Self {
        assert!(n <= self.n && k <= self.k && (k.is_multiple_of(2) || k == self.k), "WView::prefix: {n}x{k} is not a prefix of {}x{}", self.n, self.k);
        WView { n, k, kp: k.div_ceil(2), ..self }
    }
    /// Pairs `p0..` of every output (inputs 2·p0..k, no copy): the same panels read from pair p0
    /// on, so the data must run `p0` pairs past the last panel (a buffer packed with a spare
    /// panel). Kernels read it as any view: pairs below the new kp (the AMX kernel whole 16-pair
    /// tiles, past kp meeting A's zero padding, as for [`WView::prefix`]). No f16 twin.
    pub(super) fn suffix(self, p0: usize) -> Self {
        assert!(p0 <= self.kp && p0 * NR <= self.data.len(), "WView::suffix: pair {p0} is past the {} pairs", self.kp);
        let data = &self.data[p0 * NR..];
        assert!(data.len() >= self.n.div_ceil(NR) * self.kps * NR, "WView::suffix: the packed data has no room for pairs {p0}.. of the last panel");
        WView { k: self.k.saturating_sub(2 * p0), kp: self.kp - p0, data, fp16: None, ..self }
    }
}

/// (kp, kps, stored u32s) of an `[n×k]` weight: pairs per column, pairs per panel (kp padded to
/// a multiple of 16, one AMX tile's depth), and the length of the packed data.
pub(super) fn geometry(n: usize, k: usize) -> (usize, usize, usize) {
    let kp = k.div_ceil(2);
    let kps = kp.next_multiple_of(16);
    (kp, kps, n.div_ceil(NR) * kps * NR)
}

/// Two bf16 values as one operand pair (`lo` in the low half).
#[inline]
pub(super) fn pair(lo: bf16, hi: bf16) -> u32 {
    lo.to_bits() as u32 | ((hi.to_bits() as u32) << 16)
}

/// The reference packer: W[j, kk] = `get(j, kk)` for an `[n×k]` weight, one value at a time.
pub(super) fn pack_with(n: usize, k: usize, get: impl Fn(usize, usize) -> bf16 + Sync) -> Vec<u32> {
    let (kp, kps, len) = geometry(n, k);
    let mut data = vec![0u32; len];
    if kp > 0 {
        data.par_chunks_mut(kps * NR).enumerate().for_each(|(panel, dst)| {
            for jj in 0..NR.min(n - panel * NR) {
                let j = panel * NR + jj;
                for p in 0..kp {
                    let hi = (2 * p + 1 < k).then(|| get(j, 2 * p + 1));
                    dst[p * NR + jj] = pair(get(j, 2 * p), hi.unwrap_or(bf16::ZERO));
                }
            }
        });
    }
    data
}

/// W = `w` (`[n×k]` row-major f32), rounded to bf16.
pub(super) fn pack_f32(w: &[f32], n: usize, k: usize) -> Vec<u32> {
    assert_eq!(w.len(), n * k, "w must be n*k");
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: AVX-512F was detected; each panel writes all of its own values and reads rows
        // j < n of w (k values each).
        return unsafe { pack_simd(n, k, |panel, dst| x86::rows_to_panel(w, n, k, panel, dst)) };
    }
    pack_f32_reference(w, n, k)
}

/// [`pack_f32`], one value at a time.
pub(super) fn pack_f32_reference(w: &[f32], n: usize, k: usize) -> Vec<u32> {
    assert_eq!(w.len(), n * k, "w must be n*k");
    pack_with(n, k, |j, kk| bf16::from_f32(w[j * k + kk]))
}

/// W = xᵀ for `x` `[rows×cols]` row-major f32 (W is `[cols×rows]`), rounded to bf16.
pub(super) fn pack_f32_t(x: &[f32], rows: usize, cols: usize) -> Vec<u32> {
    assert_eq!(x.len(), rows * cols, "x must be rows*cols");
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: AVX-512F was detected; each panel writes all of its own values and reads
        // columns < cols of every row of x.
        return unsafe { pack_simd(cols, rows, |panel, dst| x86::cols_to_panel(x, rows, cols, panel, dst)) };
    }
    pack_f32_t_reference(x, rows, cols)
}

/// [`pack_f32_t`], one value at a time.
pub(super) fn pack_f32_t_reference(x: &[f32], rows: usize, cols: usize) -> Vec<u32> {
    assert_eq!(x.len(), rows * cols, "x must be rows*cols");
    pack_with(cols, rows, |j, kk| bf16::from_f32(x[kk * cols + j]))
}

/// Whether the 16-lane packers run here.
fn simd() -> bool {
    #[cfg(target_arch = "x86_64")]
    return is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The packed data of an `[n×k]` weight, panel by panel in parallel through `fill(panel, dst)`,
/// which must write all kps·NR values of its panel at `dst`.
///
/// # Safety
/// `fill`'s own contract (it is called with a pointer to kps·NR writable u32s).
unsafe fn pack_simd(n: usize, k: usize, fill: impl Fn(usize, *mut u32) + Sync) -> Vec<u32> {
    let (_, kps, len) = geometry(n, k);
    let mut data = Vec::<u32>::with_capacity(len);
    if kps > 0 {
        data.spare_capacity_mut()[..len].par_chunks_mut(kps * NR).enumerate().for_each(|(panel, dst)| fill(panel, dst.as_mut_ptr().cast()));
    }
    // SAFETY: every panel's fill wrote all of its kps·NR values (the caller's contract), and the
    // panels cover 0..len.
    unsafe { data.set_len(len) };
    data
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{geometry, NR};
    use crate::ops::act_simd::{bf16_bits16, to_bf16_16};
    use crate::ops::transpose::{lane_mask as mask, transpose16};
    use std::arch::x86_64::*;

    /// Zeros for the padding pairs kp..kps of a panel.
    ///
    /// # Safety
    /// AVX-512F; dst holds kps·NR values.
    #[target_feature(enable = "avx512f")]
    unsafe fn zero_padding(dst: *mut u32, kp: usize, kps: usize) {
        for p in kp..kps {
            for h in 0..NR / 16 {
                // SAFETY: p < kps: inside the panel (caller).
                unsafe { _mm512_storeu_si512(dst.add(p * NR + 16 * h).cast(), _mm512_setzero_si512()) };
            }
        }
    }

    /// Panel `panel` of W = w (`[n×k]` row-major): 16 rows × 16 pairs at a time, each row's 32
    /// values rounded to bf16 and narrowed into 16 pairs, then the 16×16 block of pairs
    /// transposed so that pair p of the 16 rows is one store.
    ///
    /// # Safety
    /// AVX-512F; w holds n·k values; dst holds kps·NR writable values.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn rows_to_panel(w: &[f32], n: usize, k: usize, panel: usize, dst: *mut u32) {
        let (kp, kps, _) = geometry(n, k);
        let (j0, nj) = (panel * NR, NR.min(n - panel * NR));
        for h in 0..NR / 16 {
            let live = nj.saturating_sub(16 * h).min(16);
            for p0 in (0..kp).step_by(16) {
                let (v0, count) = (2 * p0, (k - 2 * p0).min(32));
                let mut r = [_mm512_setzero_ps(); 16];
                for (i, ri) in r.iter_mut().enumerate().take(live) {
                    let row = w.as_ptr().wrapping_add((j0 + 16 * h + i) * k + v0);
                    // SAFETY: lanes < count read values v0..v0 + count ≤ k of row j0 + 16h + i < n.
                    let (a, b) = unsafe {
                        (
                            _mm512_maskz_loadu_epi32(mask(count), row.cast()),
                            _mm512_maskz_loadu_epi32(mask(count.saturating_sub(16)), row.wrapping_add(16).cast()),
                        )
                    };
                    // values v0.. as 32 bf16 in order: 16 pairs (a value past k is 0.0: a zero half)
                    let (lo, hi) = (to_bf16_16(a), to_bf16_16(b));
                    *ri = _mm512_castsi512_ps(_mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi));
                }
                transpose16(&mut r); // bit moves only: any pair's bits survive
                for (q, rq) in r.iter().enumerate().take((kp - p0).min(16)) {
                    // SAFETY: pair p0 + q < kp, lanes 16h..16h + 16 of the panel's NR (caller).
                    unsafe { _mm512_storeu_ps(dst.add((p0 + q) * NR + 16 * h).cast(), *rq) };
                }
            }
        }
        // SAFETY: forwarded.
        unsafe { zero_padding(dst, kp, kps) };
    }

    /// Panel `panel` of W = xᵀ (x `[rows×cols]` row-major, W `[cols×rows]`): pair p of 16
    /// columns is values j0.. of rows 2p and 2p + 1 of x, side by side: two loads, no transpose.
    ///
    /// # Safety
    /// AVX-512F; x holds rows·cols values; dst holds kps·NR writable values.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn cols_to_panel(x: &[f32], rows: usize, cols: usize, panel: usize, dst: *mut u32) {
        let (kp, kps, _) = geometry(cols, rows);
        let (j0, nj) = (panel * NR, NR.min(cols - panel * NR));
        for p in 0..kp {
            let lo_row = x.as_ptr().wrapping_add(2 * p * cols + j0);
            for h in 0..NR / 16 {
                let m = mask(nj.saturating_sub(16 * h));
                // SAFETY: masked lanes read columns j0 + 16h.. < cols of rows 2p (and 2p + 1 when
                // it exists) < rows; the store is pair p < kp, lanes 16h.. of the panel (caller).
                unsafe {
                    let lo = _mm512_maskz_loadu_epi32(m, lo_row.wrapping_add(16 * h).cast());
                    let hi = if 2 * p + 1 < rows { _mm512_maskz_loadu_epi32(m, lo_row.wrapping_add(cols + 16 * h).cast()) } else { _mm512_setzero_si512() };
                    let v = _mm512_or_si512(bf16_bits16(lo), _mm512_slli_epi32::<16>(bf16_bits16(hi)));
                    _mm512_storeu_si512(dst.add(p * NR + 16 * h).cast(), v);
                }
            }
        }
        // SAFETY: forwarded.
        unsafe { zero_padding(dst, kp, kps) };
    }
}
