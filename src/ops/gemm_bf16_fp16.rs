//! The bf16 GEMM through AVX512-FP16 (`vfmadd231ph`, 32 half-precision multiply-adds per
//! instruction — twice the f32 FMA's work at the same rate): for Intel CPUs without AMX, where
//! `vdpbf16ps` is no faster than f32 FMAs (`cpu_path::bf16_dot_pays`).
//!
//! # Numbers
//! The inputs are the bf16-rounded values of the other bf16 kernels, scaled by powers of two and
//! held as f16: weights by 2^t so that max|w| lies in [½, 1) (once per packed weight, [`Fp16Copy`]),
//! each row block of A by 2^s so that max|a| lies in [2^7, 2^8) (per work item, [`a_exp`]). A bf16
//! value so scaled is exact in f16 unless it is below 2^-14, f16's smallest normal (2^-22 to 2^-21 of
//! the largest A value, 2^-14 to 2^-13 of the largest weight: such values keep fewer bits as f16
//! subnormals; they are not lost). Each lane of the register tile sums [`FLUSH`] = 128
//! products in f16 (|a·w| < 2^8, so a partial stays < 2^15, below f16's 65504: no overflow is
//! possible), then adds that partial into an f32 total; C = total·2^-(s+t), exact. The f16 partial
//! sums add a relative error of about 1.6·10⁻³ rms of the output's scale — less than the bf16
//! rounding of the inputs (≈ 2.4·10⁻³), so this kernel sits inside the bf16 path's error (≈ 2.9·10⁻³
//! in all against the product of the unrounded inputs, 333- to 3072-deep products);
//! `tests/gemm_bf16.rs` bounds it per element. A row block with a non-finite value,
//! and a weight with one (no f16 twin), run on the f32-FMA kernel instead (no scale exists), so
//! NaN and ∞ propagate as in f32.
//!
//! # Layout
//! `gemm_bf16`'s pairs, with f16 halves: `lo = x[2p]`, `hi = x[2p+1]`. One zmm of B holds 16
//! columns × (even k, odd k); the broadcast A pair multiplies both; the even- and odd-k lanes are
//! added at the end (the only shuffles, once per tile).
use super::gemm_bf16::{AElem, Fp16Copy, Row, Tile, KC, MR, NR};
use core::arch::x86_64::*;

/// k pairs summed in f16 before the f32 total (see the module docs: keeps |partial| ≤ 2^15).
/// Each flush converts and adds 28 accumulators on the FMA ports: at 32 that was ≈ 20 % of the
/// kernel's time (443 → ≈ 490 GFLOP/s at 64, tenth session); 128 gains another 3–7 % on the towers'
/// shapes (e.g. 2464×512×2048: 551 → 586 GFLOP/s, fourteenth session) while the f16 error grows
/// as √FLUSH, 1.2 → 1.6·10⁻³ rms of the output's scale (BENCHMARKS.md).
const FLUSH: usize = 128;

/// Whether this CPU runs the kernel: AVX512-FP16 (products) and AVX512-BF16 (input rounding).
pub fn has_avx512_fp16() -> bool {
    is_x86_feature_detected!("avx512fp16")
        && is_x86_feature_detected!("avx512bf16")
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
}

/// The exponent e with max·2^e in [2^top, 2^(top+1)) (0 for 0: nothing to scale), or None when
/// `max` is not finite.
fn exp_for(max: f32, top: i32) -> Option<i32> {
    if !max.is_finite() {
        return None;
    }
    if max == 0.0 {
        return Some(0);
    }
    // floor(log2(max)) from the bits (max > 0; a subnormal's exponent is taken as -126: its
    // scaled value lands lower, which only loosens the bound); clamped so that 2^e and the
    // kernel's descale stay normal f32 (tinier inputs then use less of f16's range)
    let e = ((max.to_bits() >> 23) & 0xff) as i32 - 127;
    Some((top - e.max(-126)).clamp(-60, 60))
}

/// The f16 twin of a packed weight's bf16 pairs, or None when a weight is not finite (the
/// kernel then is not used for it).
pub(super) fn fp16_copy(pairs: &[u32]) -> Option<Fp16Copy> {
    use rayon::prelude::*;
    if !has_avx512_fp16() {
        return None;
    }
    // pairs per task (training packs a weight per call: keep it parallel)
    const CHUNK: usize = 1 << 16;
    // SAFETY (both closures): the features were just detected. The pairs are bf16 values (an
    // odd row's padding half is 0): their max is the bf16 one.
    let max = pairs
        .par_chunks(CHUNK)
        .map(|c| unsafe { abs_max_bf16(bytemuck::cast_slice(c)) })
        .reduce(|| 0.0, |a, b| if a.is_nan() || b.is_nan() { f32::NAN } else { a.max(b) });
    let exp = exp_for(max, -1)?;
    // every value is written by scale_pairs: no zero-fill first (it was a memset per training pack)
    let mut data = Vec::<u32>::with_capacity(pairs.len());
    data.spare_capacity_mut().par_chunks_mut(CHUNK).zip(pairs.par_chunks(CHUNK)).for_each(|(d, s)| unsafe { scale_pairs(s, d, pow2(exp)) });
    // SAFETY: the chunks of the spare capacity cover pairs.len() values, each written above.
    unsafe { data.set_len(pairs.len()) };
    Some(Fp16Copy { data, exp })
}

/// 2^e as f32 (|e| ≤ 120: the exponents of `exp_for` and their sums).
fn pow2(e: i32) -> f32 {
    (e as f64).exp2() as f32
}

/// bf16 pairs → f16 pairs of the values ×`scale`.
///
/// # Safety
/// Requires avx512f + avx512bw (and F16C conversions, part of AVX-512F's `vcvtps2ph`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn scale_pairs(src: &[u32], dst: &mut [std::mem::MaybeUninit<u32>], scale: f32) {
    assert_eq!(src.len(), dst.len(), "scale_pairs: lengths differ");
    let sc = _mm512_set1_ps(scale);
    for (s, d) in src.chunks(16).zip(dst.chunks_mut(16)) {
        let m = mask16(s.len());
        // SAFETY: masked lanes < s.len() (= d.len()) are read and written (every value of dst).
        unsafe {
            let (lo, hi) = halves(_mm512_maskz_loadu_epi32(m, s.as_ptr().cast()));
            _mm512_mask_storeu_epi32(d.as_mut_ptr().cast(), m, join(_mm512_mul_ps(lo, sc), _mm512_mul_ps(hi, sc)));
        }
    }
}

/// The two bf16 halves of 16 pairs as f32 (exact: lo shifted up, hi with the low half cleared).
#[inline]
#[target_feature(enable = "avx512f")]
fn halves(v: __m512i) -> (__m512, __m512) {
    (_mm512_castsi512_ps(_mm512_slli_epi32::<16>(v)), _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(0xffff_0000u32 as i32))))
}

/// 16 pairs from f32 halves: (f16(lo[i]), f16(hi[i])) as u32 (round to nearest even).
#[inline(always)]
unsafe fn join(lo: __m512, hi: __m512) -> __m512i {
    // SAFETY: the caller's target features (avx512f) cover these.
    unsafe {
        let l = _mm512_cvtepu16_epi32(_mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(lo));
        let h = _mm512_cvtepu16_epi32(_mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(hi));
        _mm512_or_si512(l, _mm512_slli_epi32::<16>(h))
    }
}

#[inline(always)]
fn mask16(n: usize) -> __mmask16 {
    ((1u32 << n.min(16)) - 1) as u16
}

/// The first min(n, 32) lanes of a 32-lane (16-bit) mask.
#[inline(always)]
fn mask32(n: usize) -> __mmask32 {
    ((1u64 << n.min(32)) - 1) as u32
}

/// max|a| of a scaled row block lies in [2^A_TOP, 2^(A_TOP+1)): with max|w| < 1, a lane's FLUSH
/// products sum to less than FLUSH·2^(A_TOP+1) = 2^15.
const A_TOP: i32 = 14 - FLUSH.trailing_zeros() as i32;

/// The scale exponent s of a row block of A (max|a|·2^s in [2^A_TOP, 2^(A_TOP+1)) = [2^7, 2^8)),
/// or None when it holds a non-finite value.
pub(super) fn a_exp(max: f32) -> Option<i32> {
    exp_for(max, A_TOP)
}

/// max |x| over `x` (NaN if one is NaN: `f32::max` would drop it).
pub(super) fn abs_max<T: AElem>(x: &[T]) -> f32 {
    if has_avx512_fp16() {
        // SAFETY: the features were just detected.
        return unsafe {
            match T::row(x) {
                Row::F32(x) => abs_max_f32(x),
                Row::Bf16(x) => abs_max_bf16(x),
            }
        };
    }
    let (m, nan) = x.iter().fold((0f32, false), |(m, nan), v| (m.max(v.to_f32().abs()), nan || v.to_f32().is_nan()));
    if nan {
        f32::NAN
    } else {
        m
    }
}

/// max |x| of f32 values as integers: |x|'s bits order as the values do, and any bits above ∞'s
/// are a NaN.
///
/// # Safety
/// Requires avx512f.
#[target_feature(enable = "avx512f")]
unsafe fn abs_max_f32(x: &[f32]) -> f32 {
    let abs = _mm512_set1_epi32(0x7fff_ffff);
    let mut m = _mm512_setzero_si512();
    for c in x.chunks(16) {
        // SAFETY: masked lanes < c.len() are read.
        let v = unsafe { _mm512_maskz_loadu_epi32(mask16(c.len()), c.as_ptr().cast()) };
        m = _mm512_max_epu32(m, _mm512_and_si512(v, abs));
    }
    let bits = _mm512_reduce_max_epu32(m);
    if bits > 0x7f80_0000 {
        f32::NAN
    } else {
        f32::from_bits(bits)
    }
}

/// max |x| of bf16 values as 16-bit integers (as [`abs_max_f32`]).
///
/// # Safety
/// Requires avx512f + avx512bw.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn abs_max_bf16(x: &[half::bf16]) -> f32 {
    let abs = _mm512_set1_epi16(0x7fff);
    let mut m = _mm512_setzero_si512();
    for c in x.chunks(32) {
        // SAFETY: masked lanes < c.len() are read.
        let v = unsafe { _mm512_maskz_loadu_epi16(mask32(c.len()), c.as_ptr().cast()) };
        m = _mm512_max_epu16(m, _mm512_and_si512(v, abs));
    }
    // the 32 lanes' maximum: widen each half to 32 bits
    let (lo, hi) = (_mm512_cvtepu16_epi32(_mm512_castsi512_si256(m)), _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64::<1>(m)));
    let bits = _mm512_reduce_max_epu32(_mm512_max_epu32(lo, hi)) << 16;
    if bits > 0x7f80_0000 {
        f32::NAN
    } else {
        f32::from_bits(bits)
    }
}

/// Packs `src` (consecutive k) as pairs of f16(bf16(x)·2^`s`) into `dst` (`ceil(src.len()/2)`
/// pairs; an odd tail's `hi` is 0).
///
/// # Safety
/// Requires [`has_avx512_fp16`]'s features.
pub(super) unsafe fn pack_row<T: AElem>(src: &[T], dst: &mut [u32], s: i32) {
    // SAFETY: forwarded from the caller.
    unsafe {
        match T::row(src) {
            Row::F32(x) => pack_f32(x, dst, pow2(s)),
            Row::Bf16(x) => pack_bf16(x, dst, pow2(s)),
        }
    }
}

/// f32 values: rounded to bf16 (RNE, as the other kernels' inputs), scaled, as f16 pairs.
///
/// # Safety
/// Requires [`has_avx512_fp16`]'s features.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn pack_f32(src: &[f32], dst: &mut [u32], scale: f32) {
    let r = |x: __m512| {
        let b = _mm512_cvtneps_pbh(x);
        // SAFETY: same size; the features are enabled here.
        _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(unsafe { core::mem::transmute::<__m256bh, __m256i>(b) }))
    };
    for (c, d) in src.chunks(32).zip(dst.chunks_mut(16)) {
        let n = c.len();
        // SAFETY: masked loads touch lanes < n (inside c; `wrapping_add` keeps the pointer
        // arithmetic defined); `emit` writes ceil(n/2) ≤ d.len() pairs.
        unsafe {
            let x0 = _mm512_maskz_loadu_ps(mask16(n), c.as_ptr());
            let x1 = _mm512_maskz_loadu_ps(mask16(n.saturating_sub(16)), c.as_ptr().wrapping_add(16));
            emit(r(x0), r(x1), d, n, scale);
        }
    }
}

/// bf16 values (exact in f32 by a shift), scaled, as f16 pairs.
///
/// # Safety
/// Requires [`has_avx512_fp16`]'s features.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn pack_bf16(src: &[half::bf16], dst: &mut [u32], scale: f32) {
    for (c, d) in src.chunks(32).zip(dst.chunks_mut(16)) {
        let n = c.len();
        // SAFETY: the masked load touches lanes < n (inside c); `emit` writes ceil(n/2) ≤
        // d.len() pairs.
        unsafe {
            let v = _mm512_maskz_loadu_epi16(mask32(n), c.as_ptr().cast());
            let x0 = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(v)));
            let x1 = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64::<1>(v)));
            emit(x0, x1, d, n, scale);
        }
    }
}

/// ≤ 32 bf16 values (as f32 bits: k0..k15, k16..k31; lanes ≥ n zero) times `scale` as ⌈n/2⌉
/// pairs of f16 (round to nearest even) in `d`.
///
/// # Safety
/// Requires avx512f + avx512bw; `d.len() >= n.div_ceil(2)`.
#[inline(always)]
unsafe fn emit(x0: __m512i, x1: __m512i, d: &mut [u32], n: usize, scale: f32) {
    // SAFETY: the caller's features; the masked store writes ceil(n/2) ≤ d.len() pairs.
    unsafe {
        let sc = _mm512_set1_ps(scale);
        // 16 f16 each: consecutive f16s are already pairs
        let h0 = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(_mm512_castsi512_ps(x0), sc));
        let h1 = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(_mm512_castsi512_ps(x1), sc));
        let v = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(h0), h1);
        _mm512_mask_storeu_epi32(d.as_mut_ptr().cast(), mask16(n.div_ceil(2)), v);
    }
}

/// The 14×32 tile over f16 pairs: c = Σ_p a[p]·b[p] (see the module docs), times `descale`.
///
/// # Safety
/// Requires [`has_avx512_fp16`]'s features; `a.len() >= MR·KC`, `b.len() >= kc·NR`; the tile
/// contract of [`Tile::store`].
// index loops on purpose: an iterator over the accumulator arrays keeps them in memory
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512fp16")]
pub(super) unsafe fn kernel(a: &[u32], b: &[u32], kc: usize, t: &Tile, descale: f32) {
    assert!(kc <= KC && a.len() >= MR * KC && b.len() >= kc * NR);
    for r in 0..MR.min(t.rows) {
        let cr = t.c.wrapping_add(t.off + r * t.ldc);
        _mm_prefetch::<_MM_HINT_ET0>(cr.cast());
        _mm_prefetch::<_MM_HINT_ET0>(cr.wrapping_add(16).cast());
    }
    // f32 totals: per row, columns 0–7, 8–15, 16–23, 24–31 with the even/odd-k lanes apart; set
    // by the first chunk (no zero-fill: a 3.5 KiB stack array would be a memset per call)
    let mut tot = core::mem::MaybeUninit::<[[__m512; 4]; MR]>::uninit();
    let tp = tot.as_mut_ptr().cast::<__m512>(); // [MR][4]
    let (ap, bp) = (a.as_ptr(), b.as_ptr());
    // B's half `h` (16 columns × even/odd k) of pair p; A's pair p of row r on every lane
    // SAFETY (both): called with p < kc ≤ KC and r < MR only: inside the slices (asserted).
    let bload = |p: usize, h: usize| unsafe { _mm512_castsi512_ph(_mm512_loadu_si512(bp.add(p * NR + 16 * h).cast())) };
    let bcast = |r: usize, p: usize| unsafe { _mm512_castsi512_ph(_mm512_set1_epi32(*ap.add(r * KC + p) as i32)) };
    let mut p0 = 0;
    while p0 < kc {
        let p1 = (p0 + FLUSH).min(kc);
        // the chunk's first step multiplies (p0 < p1: no zero-filled accumulators, which LLVM
        // would keep in a stack array and memset per chunk)
        let (b0, b1) = (bload(p0, 0), bload(p0, 1));
        let mut h: [[__m512h; 2]; MR] = core::array::from_fn(|r| {
            let av = bcast(r, p0);
            [_mm512_mul_ph(av, b0), _mm512_mul_ph(av, b1)]
        });
        for p in p0 + 1..p1 {
            let (b0, b1) = (bload(p, 0), bload(p, 1));
            for r in 0..MR {
                let av = bcast(r, p);
                h[r][0] = _mm512_fmadd_ph(av, b0, h[r][0]);
                h[r][1] = _mm512_fmadd_ph(av, b1, h[r][1]);
            }
        }
        // constant indices only (an iterator over h would keep it in memory: a memset per chunk)
        for r in 0..MR {
            for c in 0..2 {
                let v = _mm512_castph_si512(h[r][c]);
                let (lo, hi) = (_mm512_cvtph_ps(_mm512_castsi512_si256(v)), _mm512_cvtph_ps(_mm512_extracti64x4_epi64::<1>(v)));
                // SAFETY: tp points at MR·4 values; the first chunk writes each before any read.
                unsafe {
                    let (t0, t1) = (tp.add(4 * r + 2 * c), tp.add(4 * r + 2 * c + 1));
                    if p0 == 0 {
                        t0.write(lo);
                        t1.write(hi);
                    } else {
                        t0.write(_mm512_add_ps(t0.read(), lo));
                        t1.write(_mm512_add_ps(t1.read(), hi));
                    }
                }
            }
        }
        p0 = p1;
    }
    if kc == 0 {
        tot.write([[_mm512_setzero_ps(); 4]; MR]);
    }
    // SAFETY: written by the first chunk (kc > 0) or just above.
    let tot = unsafe { tot.assume_init() };
    // column j of a 16-column half: lanes 2j (even k) and 2j + 1 (odd k) of (lo, hi)
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    let ds = _mm512_set1_ps(descale);
    let sum = |lo: __m512, hi: __m512| _mm512_mul_ps(_mm512_add_ps(_mm512_permutex2var_ps(lo, even, hi), _mm512_permutex2var_ps(lo, odd, hi)), ds);
    let c0: [__m512; MR] = core::array::from_fn(|r| sum(tot[r][0], tot[r][1]));
    let c1: [__m512; MR] = core::array::from_fn(|r| sum(tot[r][2], tot[r][3]));
    // SAFETY: the tile contract, forwarded.
    unsafe { super::gemm_bf16_avx512::store(&c0, &c1, t) }
}

/// 2^e as the kernel's descale factor (exact while the result stays normal).
pub(super) fn descale(e: i32) -> f32 {
    pow2(-e)
}
