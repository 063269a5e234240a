//! The left operand A of the bf16 GEMM (`gemm_bf16.rs`): activations in f32 (rounded to bf16,
//! RNE, while packing) or already in bf16 ([`AElem`]), packed per work item into MR-row
//! micro-panels `[MR][KC]` of bf16 pairs (`pack_a`; widened for the FMA kernel, scaled into f16
//! for the AVX512-FP16 one).
#[cfg(target_arch = "x86_64")]
use super::gemm_bf16::has_avx512_bf16;
use super::gemm_bf16::MR;
use super::gemm_bf16_pack::pair;
use half::bf16;

/// An element type of the left operand A: f32 (rounded to bf16, RNE, while packing) or bf16.
pub trait AElem: Copy + Send + Sync + 'static {
    /// The value as bf16.
    fn to_bf16(self) -> bf16;
    /// `src` as bf16 pairs in `dst` (`ceil(src.len()/2)` values; an odd tail's `hi` is 0).
    /// `simd`: AVX512-BF16 was detected.
    fn pairs(src: &[Self], dst: &mut [u32], simd: bool);
    /// `dst[i] = (lo[i], hi[i])` as bf16 pairs (`hi` None: zero halves): two rows interleaved.
    fn zip_pairs(lo: &[Self], hi: Option<&[Self]>, dst: &mut [u32], simd: bool);
    /// The value as f32.
    fn to_f32(self) -> f32;
    /// The slice as its concrete type (for SIMD loads).
    fn row(src: &[Self]) -> Row<'_>;
}

/// A row of A as the concrete type of [`AElem`].
pub enum Row<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
}

impl AElem for f32 {
    #[inline(always)]
    fn to_bf16(self) -> bf16 {
        bf16::from_f32(self)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    fn row(src: &[f32]) -> Row<'_> {
        Row::F32(src)
    }
    fn pairs(src: &[f32], dst: &mut [u32], simd: bool) {
        to_pairs(src, dst, simd)
    }
    fn zip_pairs(lo: &[f32], hi: Option<&[f32]>, dst: &mut [u32], simd: bool) {
        #[cfg(target_arch = "x86_64")]
        if simd && has_avx512_bf16() {
            // SAFETY: the features were just detected.
            return unsafe { super::gemm_bf16_avx512::zip_convert(lo, hi, dst) };
        }
        let _ = simd;
        match hi {
            Some(hi) => dst.iter_mut().zip(lo.iter().zip(hi)).for_each(|(d, (&l, &h))| *d = pair(bf16::from_f32(l), bf16::from_f32(h))),
            None => dst.iter_mut().zip(lo).for_each(|(d, &l)| *d = pair(bf16::from_f32(l), bf16::ZERO)),
        }
    }
}

impl AElem for bf16 {
    #[inline(always)]
    fn to_bf16(self) -> bf16 {
        self
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn row(src: &[bf16]) -> Row<'_> {
        Row::Bf16(src)
    }
    fn pairs(src: &[bf16], dst: &mut [u32], _simd: bool) {
        let (whole, tail) = src.split_at(src.len() & !1);
        for (d, s) in dst.iter_mut().zip(whole.chunks_exact(2)) {
            *d = pair(s[0], s[1]);
        }
        if let Some(&lo) = tail.first() {
            dst[whole.len() / 2] = pair(lo, bf16::ZERO);
        }
    }
    fn zip_pairs(lo: &[bf16], hi: Option<&[bf16]>, dst: &mut [u32], simd: bool) {
        #[cfg(target_arch = "x86_64")]
        if simd && has_avx512_bf16() {
            // SAFETY: the features were just detected (AVX-512F, -BW, -VL among them).
            return unsafe { super::gemm_bf16_avx512::zip_bf16(lo, hi, dst) };
        }
        let _ = simd;
        match hi {
            Some(hi) => dst.iter_mut().zip(lo.iter().zip(hi)).for_each(|(d, (&l, &h))| *d = pair(l, h)),
            None => dst.iter_mut().zip(lo).for_each(|(d, &l)| *d = pair(l, bf16::ZERO)),
        }
    }
}

/// Converts f32 to bf16 pairs (RNE) in `dst` (`ceil(src.len()/2)` values; an odd tail's `hi` is 0).
/// `simd`: AVX512-BF16 was detected.
fn to_pairs(src: &[f32], dst: &mut [u32], simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd && has_avx512_bf16() {
        // SAFETY: the features were just detected (a cached flag: `simd` alone, from a safe
        // caller, must not decide it).
        return unsafe { super::gemm_bf16_avx512::convert(src, dst) };
    }
    for (q, v) in dst.iter_mut().enumerate() {
        let hi = src.get(2 * q + 1).map_or(bf16::ZERO, |&x| bf16::from_f32(x));
        *v = pair(bf16::from_f32(src[2 * q]), hi);
    }
}

/// Packs pairs `pc..pc+kc` of `rows` (≤ MR full rows of `a`) into one A micro-panel `dst`
/// (`[MR][stride]` bf16 pairs, stride = `dst.len() / MR` ≥ kc; missing rows are zero).
/// `fma`: widened instead, `[MR][stride]` with stride ≥ 2·kc bf16-rounded values as f32 bits (for
/// `kernel_fma`).
/// `f16`: as pairs of f16(bf16(x)·2^s) (for the AVX512-FP16 kernel, detected by the caller).
#[allow(clippy::too_many_arguments)]
pub(super) fn pack_a<T: AElem>(rows: &[T], k: usize, pc: usize, kc: usize, dst: &mut [u32], simd: bool, fma: bool, f16: Option<i32>) {
    let stride = dst.len() / MR;
    assert!(dst.len() == MR * stride && stride >= if fma { 2 * kc } else { kc }, "pack_a: panel of {} for {kc} pairs", dst.len());
    for (r, d) in dst.chunks_exact_mut(stride).enumerate() {
        let d = &mut d[..if fma { 2 * kc } else { kc }];
        if (r + 1) * k > rows.len() {
            d.fill(0);
            continue;
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(s) = f16 {
            // SAFETY: the caller runs the AVX512-FP16 kernel, so its features were detected.
            unsafe { super::gemm_bf16_fp16::pack_row(&rows[r * k + 2 * pc..r * k + k.min(2 * (pc + kc))], d, s) };
            continue;
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = f16;
        if fma {
            let src = &rows[r * k + 2 * pc..r * k + k.min(2 * (pc + kc))];
            d.iter_mut().enumerate().for_each(|(i, v)| *v = src.get(i).map_or(0, |&x| (x.to_bf16().to_bits() as u32) << 16));
            continue;
        }
        T::pairs(&rows[r * k + 2 * pc..r * k + k.min(2 * (pc + kc))], d, simd);
    }
}
