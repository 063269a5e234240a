//! f32 → bf16 narrowing, 16 lanes at a time where the CPU has AVX-512F: the bits of
//! `half::bf16::from_f32` (round to nearest even, NaN kept and made quiet) by `vcvtneps2bf16`
//! where the CPU has AVX512-BF16 (subnormal lanes redone by the integer form, since the
//! instruction reads them as zero), else by the integer algorithm lane by lane. Used by the
//! activations' bf16 outputs (`act_simd.rs`), the GEMM epilogues and the packers. Bit-identity
//! with `half`: tests/act_simd.rs.

/// Whether this CPU has AVX-512F (the 16-lane paths here and in `act_simd.rs`).
pub(super) fn simd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// x ← bf16(x) as f32 (round to nearest even, NaN kept and made quiet: the bits of
/// `half::bf16::from_f32`), 16 lanes at a time where the CPU has AVX-512F. Vector stores: a GEMM
/// epilogue that rounds its tile and then loads it 16 at a time must not read back 16 scalar
/// stores (no store-to-load forwarding: the load waits for them to retire).
pub fn round_bf16_in_place(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: AVX-512F was detected.
        return unsafe { x86::round_bf16_in_place(x) };
    }
    x.iter_mut().for_each(|v| *v = half::bf16::from_f32(*v).to_f32());
}

/// dst ← bf16(src) (the shorter length of the two), with the bits of `half::bf16::from_f32`:
/// by `vcvtneps2bf16` where the CPU has AVX512-BF16 (2 uops per 16 values; subnormal lanes redone
/// by the integer form), else the AVX-512F integer form (8).
pub fn to_bf16_into(src: &[f32], dst: &mut [half::bf16]) {
    to_bf16_into_with(src, dst, Narrow::Auto)
}

/// [`to_bf16_into`] with the narrowing chosen (tests: both forms give the same bits).
#[doc(hidden)]
pub fn to_bf16_into_with(src: &[f32], dst: &mut [half::bf16], narrow: Narrow) {
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: AVX-512F (and for the `vcvtneps2bf16` form AVX512-BF16/BW/VL/DQ) was detected.
        return unsafe {
            if narrows_by_insn(narrow) {
                x86::to_bf16_into_cvt(src, dst)
            } else {
                x86::to_bf16_into(src, dst)
            }
        };
    }
    let _ = narrow;
    dst.iter_mut().zip(src).for_each(|(o, &v)| *o = half::bf16::from_f32(v));
}

/// How [`to_bf16_into_with`] and `act_simd::act_row_with` narrow f32 to bf16 (the same bits
/// either way: `half::bf16::from_f32`'s).
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Narrow {
    /// `vcvtneps2bf16` where the CPU has AVX512-BF16 (with AVX512-BW/VL/DQ), the integer form
    /// otherwise.
    Auto,
    /// The AVX-512F integer form (round bit, sticky bits, NaN made quiet) even where the
    /// instruction exists: to test it on such CPUs.
    Integer,
}

/// Whether `narrow` means `vcvtneps2bf16` on this CPU.
pub(crate) fn narrows_by_insn(narrow: Narrow) -> bool {
    narrow == Narrow::Auto && bf16_insn()
}

/// Whether this CPU narrows with `vcvtneps2bf16` ([`Narrow::Auto`]).
/// (Read once: the epilogues ask per C tile row, 0.3 % of a bf16 image forward with the five
/// feature tests each time.)
pub(crate) fn bf16_insn() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            has!("avx512bf16") && has!("avx512bw") && has!("avx512vl") && has!("avx512dq") && has!("avx512f")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{bf16_bits16, narrow16, round_f32, store_bf16, to_bf16_16};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// bf16 bits (in the low half of each lane) of 16 f32s: RNE, and NaN → (x >> 16) | 0x40 —
    /// `half::bf16::from_f32`'s integer algorithm, lane by lane.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) fn bf16_bits16(x: __m512i) -> __m512i {
        let s = _mm512_set1_epi32;
        let hi = _mm512_srli_epi32::<16>(x);
        // round up when the round bit is set and the rest (or the kept LSB) is not all zero
        let up = _mm512_test_epi32_mask(x, s(0x8000)) & _mm512_test_epi32_mask(x, s(0x1_7FFF));
        let r = _mm512_mask_add_epi32(hi, up, hi, s(1));
        let nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(x, s(0x7FFF_FFFF)), s(0x7F80_0000));
        _mm512_mask_or_epi32(r, nan, hi, s(0x40))
    }

    /// bf16 bits of 16 f32s (`half::bf16::from_f32`): with `CVT` by `vcvtneps2bf16`, which has
    /// the same rounding and NaN rule but reads subnormals as zero, so lanes holding one are
    /// redone by the integer form (a branch that real activations do not take); else the
    /// integer form.
    ///
    /// # Safety
    /// `CVT`: AVX-512F, AVX512-BF16, -BW, -VL and -DQ; else AVX-512F.
    #[inline(always)]
    pub(crate) unsafe fn narrow16<const CVT: bool>(x: __m512) -> __m256i {
        // SAFETY (all): the caller's features.
        unsafe {
            if !CVT {
                return to_bf16_16(_mm512_castps_si512(x));
            }
            let r = core::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(x));
            let sub = _mm512_fpclass_ps_mask::<0x20>(x); // subnormal lanes
            if sub == 0 {
                r
            } else {
                _mm256_mask_mov_epi16(r, sub, to_bf16_16(_mm512_castps_si512(x)))
            }
        }
    }

    /// bf16(x) as f32 ([`narrow16`] widened back).
    ///
    /// # Safety
    /// As [`narrow16`].
    #[inline(always)]
    pub(crate) unsafe fn round_f32<const CVT: bool>(x: __m512) -> __m512 {
        // SAFETY: the caller's features.
        unsafe {
            if !CVT {
                return _mm512_castsi512_ps(round16(_mm512_castps_si512(x)));
            }
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(narrow16::<true>(x))))
        }
    }

    /// Lanes `m` of bf16(y) to `p`.
    ///
    /// # Safety
    /// As [`narrow16`]; those lanes of `p` are writable.
    #[inline(always)]
    pub(crate) unsafe fn store_bf16<const CVT: bool>(p: *mut half::bf16, m: __mmask16, y: __m512) {
        // SAFETY: the caller's features and lanes.
        unsafe {
            if CVT {
                _mm256_mask_storeu_epi16(p.cast(), m, narrow16::<true>(y));
            } else {
                _mm512_mask_cvtepi32_storeu_epi16(p.cast(), m, bf16_bits16(_mm512_castps_si512(y)));
            }
        }
    }

    /// bf16(x) as f32 (the bits of `half::bf16::from_f32(x).to_f32()`), 16 lanes.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn round16(x: __m512i) -> __m512i {
        _mm512_slli_epi32::<16>(bf16_bits16(x))
    }

    /// bf16(x) of 16 f32s as 16 packed bf16 values.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) fn to_bf16_16(x: __m512i) -> __m256i {
        _mm512_cvtepi32_epi16(bf16_bits16(x))
    }

    /// # Safety
    /// AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn round_bf16_in_place(x: &mut [f32]) {
        for c in x.chunks_mut(16) {
            let m = ((1u32 << c.len()) - 1) as __mmask16;
            // SAFETY: masked lanes < c.len() are read and written.
            unsafe {
                let v = _mm512_maskz_loadu_epi32(m, c.as_ptr().cast());
                _mm512_mask_storeu_epi32(c.as_mut_ptr().cast(), m, round16(v));
            }
        }
    }

    /// [`to_bf16_into`] narrowing with `vcvtneps2bf16`.
    ///
    /// # Safety
    /// AVX-512F, AVX512-BF16, -BW, -VL and -DQ.
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl,avx512dq")]
    pub unsafe fn to_bf16_into_cvt(src: &[f32], dst: &mut [half::bf16]) {
        let n = src.len().min(dst.len());
        for i in (0..n).step_by(16) {
            let m = ((1u32 << (n - i).min(16)) - 1) as __mmask16;
            // SAFETY: masked lanes < n − i are read from src and written to dst; the features.
            unsafe { store_bf16::<true>(dst.as_mut_ptr().add(i), m, _mm512_maskz_loadu_ps(m, src.as_ptr().add(i))) };
        }
    }

    /// # Safety
    /// AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn to_bf16_into(src: &[f32], dst: &mut [half::bf16]) {
        let n = src.len().min(dst.len());
        for i in (0..n).step_by(16) {
            let m = ((1u32 << (n - i).min(16)) - 1) as __mmask16;
            // SAFETY: masked lanes < n − i are read from src and written to dst (2 bytes each).
            unsafe {
                let v = _mm512_maskz_loadu_epi32(m, src.as_ptr().add(i).cast());
                _mm256_mask_storeu_epi16(dst.as_mut_ptr().add(i).cast(), m, to_bf16_16(v));
            }
        }
    }
}
