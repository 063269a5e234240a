//! Unary ops over slices: the activations QuickGELU and GELU and their derivatives (the
//! backward's dy·act′(x)) 16 lanes at a time with AVX-512F where the CPU has it — the same
//! operations in the same order as the scalar `fastmath::quick_gelu` / `fastmath::gelu` /
//! `Unary::deriv_fast` (no FMA contraction, IEEE division), so every path gives the same bits;
//! the other ops, other CPUs and the tails through the scalar `Unary::eval_fast` /
//! `Unary::deriv_fast`. Used by the GEMM epilogues (per finished C tile) and by
//! `elementwise::unary`. LLVM does not vectorise the scalar loops well (≈ 5 cycles per element
//! against ≈ 1.4 here, Intel Xeon, one core). Bit-identity: tests/act_simd.rs. The narrowing to
//! bf16 that the bf16 outputs use is `bf16_simd.rs` (re-exported here).
#[cfg(target_arch = "x86_64")]
pub(crate) use super::bf16_simd::bf16_insn;
#[cfg(target_arch = "x86_64")]
use super::bf16_simd::{narrows_by_insn, simd};
pub use super::bf16_simd::{round_bf16_in_place, to_bf16_into, to_bf16_into_with, Narrow};
use super::elementwise::Unary;

/// The ops with a 16-lane form.
fn is_act(op: Unary) -> bool {
    matches!(op, Unary::QuickGelu | Unary::Gelu)
}

/// x ← act(x) over the slice.
pub fn act_in_place(act: Unary, x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd() && is_act(act) {
        // SAFETY: AVX-512F was detected.
        return unsafe { x86::act_in_place(act, x) };
    }
    x.iter_mut().for_each(|v| *v = act.eval_fast(*v));
}

/// dst ← act(src) (the shorter length of the two).
pub fn act_into(act: Unary, src: &[f32], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd() && is_act(act) {
        // SAFETY: AVX-512F was detected.
        return unsafe { x86::act_into(act, src, dst) };
    }
    dst.iter_mut().zip(src).for_each(|(o, &v)| *o = act.eval_fast(v));
}

/// The scalar path only (the reference of the bit-identity tests).
pub fn act_into_scalar(act: Unary, src: &[f32], dst: &mut [f32]) {
    dst.iter_mut().zip(src).for_each(|(o, &v)| *o = act.eval_fast(v));
}

/// dst ← dy·act′(x) (the backward; the shortest length of the three).
pub fn act_grad_into(act: Unary, x: &[f32], dy: &[f32], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd() && is_act(act) {
        // SAFETY: AVX-512F was detected.
        return unsafe { x86::act_grad_into(act, x, dy, dst) };
    }
    act_grad_scalar(act, x, dy, dst);
}

/// [`act_grad_into`]'s scalar path only (the reference of the bit-identity tests).
pub fn act_grad_scalar(act: Unary, x: &[f32], dy: &[f32], dst: &mut [f32]) {
    dst.iter_mut().zip(x).zip(dy).for_each(|((o, &v), &d)| *o = d * act.deriv_fast(v));
}

/// Where [`act_row`] writes act(x).
pub enum ActDst<'a> {
    /// Over x.
    InPlace,
    /// To this buffer (at least x's length); x keeps the (rounded) pre-activation.
    F32(&'a mut [f32]),
    /// Rounded to bf16 into this buffer (at least x's length); x keeps the (rounded)
    /// pre-activation.
    Bf16(&'a mut [half::bf16]),
}

/// A GEMM epilogue's row in one pass: x ← bf16(x) when `round`, then act(x) to `dst` — the bits
/// of [`round_bf16_in_place`], then [`act_in_place`] / [`act_into`] / act then
/// [`to_bf16_into`], each value loaded once, two 16-lane vectors per step. One vector's
/// activation is a dependent chain of ≈ 80 cycles (clamp, the exp polynomial, a division), so the
/// loop waits on latency: two vectors per step, Estrin's polynomial in `exp16`, and the
/// narrowing to bf16 by `vcvtneps2bf16` (2 uops; the integer form is 8, and its store of 16-bit
/// lanes through `vpmovdw` to memory is slow) bring round + QuickGELU + bf16 out from 1.50 to
/// ≈ 0.75 ns per value (one core, this Intel kind; 2.9 with one vector per step, ≈ 15 % of a bf16
/// text tower then).
pub fn act_row(act: Unary, round: bool, x: &mut [f32], dst: ActDst) {
    act_row_with(act, round, x, dst, Narrow::Auto)
}

/// [`act_row`] with the narrowing chosen (tests: both forms give the same bits).
#[doc(hidden)]
pub fn act_row_with(act: Unary, round: bool, x: &mut [f32], dst: ActDst, narrow: Narrow) {
    match &dst {
        ActDst::InPlace => {}
        ActDst::F32(o) => assert!(o.len() >= x.len(), "act_row: f32 output shorter than the row"),
        ActDst::Bf16(o) => assert!(o.len() >= x.len(), "act_row: bf16 output shorter than the row"),
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = narrow; // one narrowing off x86-64
    #[cfg(target_arch = "x86_64")]
    if simd() && is_act(act) {
        // SAFETY: AVX-512F (and for `act_row_bf16` AVX512-BF16/BW/VL/DQ) was detected; the
        // outputs hold x.len() values (asserted).
        return unsafe {
            if narrows_by_insn(narrow) {
                x86::act_row_bf16(act, round, x, dst)
            } else {
                x86::act_row(act, round, x, dst)
            }
        };
    }
    if round {
        round_bf16_in_place(x);
    }
    match dst {
        ActDst::InPlace => act_in_place(act, x),
        ActDst::F32(o) => act_into(act, x, o),
        ActDst::Bf16(o) => o.iter_mut().zip(x.iter()).for_each(|(o, &v)| *o = half::bf16::from_f32(act.eval_fast(v))),
    }
}

/// The bits of bf16(act(x)) for every bf16 value x, indexed by x's bits: 65536 entries and one
/// of padding (a 4-byte gather at the last index stays inside). An activation whose input was
/// rounded to bf16 and whose output is bf16 (fc1's QuickGELU in a bf16 model) is then a lookup:
/// the scalar definition's bits by construction (`eval_fast`, then `half::bf16::from_f32` — the
/// bits every 16-lane path gives, tests/act_simd.rs), for one gather in place of the exp
/// polynomial and a division on the FP pipes the GEMM's products need: a bf16 fc1 1600×768×3072
/// with its QuickGELU 18.46 → 18.20 ms (medians of 6 alternating runs, Zen 4, 2 threads; the
/// gather itself is slow there, ≈ 20 cycles). Built on first use (≈ 1 ms).
pub fn bf16_table(act: Unary) -> &'static [u16] {
    use std::sync::OnceLock;
    fn build(act: Unary) -> Box<[u16]> {
        let mut t: Vec<u16> = (0..=u16::MAX).map(|b| half::bf16::from_f32(act.eval_fast(half::bf16::from_bits(b).to_f32())).to_bits()).collect();
        t.push(0); // padding
        t.into_boxed_slice()
    }
    static QUICK: OnceLock<Box<[u16]>> = OnceLock::new();
    static GELU: OnceLock<Box<[u16]>> = OnceLock::new();
    match act {
        Unary::QuickGelu => QUICK.get_or_init(|| build(Unary::QuickGelu)),
        Unary::Gelu => GELU.get_or_init(|| build(Unary::Gelu)),
        other => panic!("bf16_table: {other:?} has no table (QuickGelu and Gelu have)"),
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use super::bf16_simd::{bf16_bits16, to_bf16_16};
#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{epi_bf16, exp16};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::bf16_simd::{narrow16, round_f32, store_bf16};
    use super::Unary;
    use std::arch::x86_64::*;

    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;

    /// `fastmath::exp`, 16 lanes.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) fn exp16(x: __m512) -> __m512 {
        let s = _mm512_set1_ps;
        // clamp(-87, 88.3) keeping NaN: max(lo, x) and min(hi, ·) return the second operand, x,
        // when it is NaN (as f32::clamp does).
        let x = _mm512_min_ps(s(88.3), _mm512_max_ps(s(-87.0), x));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(x, s(LOG2E)));
        let f = _mm512_sub_ps(_mm512_sub_ps(x, _mm512_mul_ps(n, s(LN2_HI))), _mm512_mul_ps(n, s(LN2_LO)));
        let (m, a) = (_mm512_mul_ps, _mm512_add_ps);
        let f2 = m(f, f);
        let f4 = m(f2, f2);
        let lo = a(a(s(1.0), f), m(f2, a(s(0.5), m(f, s(1.0 / 6.0)))));
        let hi = a(a(s(1.0 / 24.0), m(f, s(1.0 / 120.0))), m(f2, s(1.0 / 720.0)));
        // p·2^n: n ∈ [−126, 127] after the clamp, so this is the scalar product p·2^n (exact, or
        // the same rounding of a subnormal result)
        _mm512_scalef_ps(a(lo, m(f4, hi)), n)
    }

    /// `fastmath::quick_gelu`: x·1/(1 + e^(−1.702x)).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn quick_gelu16(x: __m512) -> __m512 {
        let s = _mm512_set1_ps;
        let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(s(1.702), x)));
        _mm512_mul_ps(x, _mm512_div_ps(s(1.0), _mm512_add_ps(s(1.0), e)))
    }

    /// `fastmath::erf`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn erf16(x: __m512) -> __m512 {
        let s = _mm512_set1_ps;
        let sign = _mm512_set1_epi32(i32::MIN);
        let z = _mm512_castsi512_ps(_mm512_andnot_si512(sign, _mm512_castps_si512(x)));
        let t = _mm512_div_ps(s(1.0), _mm512_add_ps(s(1.0), _mm512_mul_ps(s(0.5), z)));
        let mut p = s(0.170_872_77);
        for c in [-0.822_152_23, 1.488_515_9, -1.135_204, 0.278_868_07, -0.186_288_06, 0.096_784_18, 0.374_091_96, 1.000_023_7] {
            p = _mm512_add_ps(s(c), _mm512_mul_ps(t, p));
        }
        let negz = _mm512_sub_ps(_mm512_setzero_ps(), z);
        let poly = _mm512_add_ps(_mm512_sub_ps(_mm512_mul_ps(negz, z), s(1.265_512_2)), _mm512_mul_ps(t, p));
        let r = _mm512_sub_ps(s(1.0), _mm512_mul_ps(t, exp16(poly)));
        // copysign(r, x)
        let bits = _mm512_or_si512(_mm512_andnot_si512(sign, _mm512_castps_si512(r)), _mm512_and_si512(sign, _mm512_castps_si512(x)));
        _mm512_castsi512_ps(bits)
    }

    /// `fastmath::gelu`: ½x(1 + erf(x/√2)).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn gelu16(x: __m512) -> __m512 {
        let s = _mm512_set1_ps;
        let e = erf16(_mm512_mul_ps(x, s(std::f32::consts::FRAC_1_SQRT_2)));
        _mm512_mul_ps(_mm512_mul_ps(s(0.5), x), _mm512_add_ps(s(1.0), e))
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn act16(act: Unary, x: __m512) -> __m512 {
        match act {
            Unary::Gelu => gelu16(x),
            _ => quick_gelu16(x), // callers pass QuickGelu or Gelu only (`is_act`)
        }
    }

    /// # Safety
    /// AVX-512F; `act` is QuickGelu or Gelu.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn act_in_place(act: Unary, x: &mut [f32]) {
        // 32 values a step: two chains of ≈ 100 cycles' latency in flight (see `act_row`)
        let mut chunks = x.chunks_exact_mut(32);
        for c in &mut chunks {
            let p = c.as_mut_ptr();
            // SAFETY: c holds 32 values.
            unsafe {
                let (y0, y1) = (act16(act, _mm512_loadu_ps(p)), act16(act, _mm512_loadu_ps(p.add(16))));
                _mm512_storeu_ps(p, y0);
                _mm512_storeu_ps(p.add(16), y1);
            }
        }
        chunks.into_remainder().iter_mut().for_each(|v| *v = act.eval_fast(*v));
    }

    /// # Safety
    /// AVX-512F; `act` is QuickGelu or Gelu.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn act_into(act: Unary, src: &[f32], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        let (src, dst) = (&src[..n], &mut dst[..n]);
        // 32 values a step: two chains in flight (see `act_row`)
        let mut d = dst.chunks_exact_mut(32);
        let mut s = src.chunks_exact(32);
        for (o, i) in (&mut d).zip(&mut s) {
            let (op, ip) = (o.as_mut_ptr(), i.as_ptr());
            // SAFETY: o and i hold 32 values each.
            unsafe {
                let (y0, y1) = (act16(act, _mm512_loadu_ps(ip)), act16(act, _mm512_loadu_ps(ip.add(16))));
                _mm512_storeu_ps(op, y0);
                _mm512_storeu_ps(op.add(16), y1);
            }
        }
        d.into_remainder().iter_mut().zip(s.remainder()).for_each(|(o, &v)| *o = act.eval_fast(v));
    }

    /// [`super::act_row`] with the AVX-512F integer narrowing.
    ///
    /// # Safety
    /// AVX-512F; `act` is QuickGelu or Gelu; the output of `dst` holds x.len() values.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn act_row(act: Unary, round: bool, x: &mut [f32], dst: super::ActDst) {
        // SAFETY: forwarded.
        unsafe { act_row_body::<false>(act, round, x, dst) }
    }

    /// [`super::act_row`] narrowing with `vcvtneps2bf16`.
    ///
    /// # Safety
    /// AVX-512F, AVX512-BF16, -BW, -VL and -DQ; otherwise as [`act_row`].
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl,avx512dq")]
    pub unsafe fn act_row_bf16(act: Unary, round: bool, x: &mut [f32], dst: super::ActDst) {
        // SAFETY: forwarded.
        unsafe { act_row_body::<true>(act, round, x, dst) }
    }

    /// Lanes i.. (at most 16, the rest zero) of the row at `xp` (n values), rounded to bf16 when
    /// `round` (then written back when `keep`), and their mask. A function, not a closure: a
    /// closure has no target features of its own, so its intrinsics would stay calls.
    ///
    /// # Safety
    /// As [`narrow16`]; i < n; the row's n values are readable and writable.
    #[inline(always)]
    unsafe fn load<const CVT: bool>(xp: *mut f32, n: usize, i: usize, round: bool, keep: bool) -> (__m512, __mmask16) {
        let m = ((1u32 << (n - i).min(16)) - 1) as __mmask16;
        // SAFETY: masked lanes < n − i of the row are read and written; the caller's features.
        unsafe {
            let mut v = _mm512_maskz_loadu_ps(m, xp.add(i));
            if round {
                v = round_f32::<CVT>(v);
                if keep {
                    _mm512_mask_storeu_ps(xp.add(i), m, v);
                }
            }
            (v, m)
        }
    }

    /// [`super::act_row`], two 16-lane vectors per step (the tail masked: act16 of a lane gives
    /// the bits of `eval_fast`, so no scalar tail is needed).
    ///
    /// # Safety
    /// As [`act_row`] (`CVT = false`) or [`act_row_bf16`] (`CVT = true`).
    #[inline(always)]
    unsafe fn act_row_body<const CVT: bool>(act: Unary, round: bool, x: &mut [f32], mut dst: super::ActDst) {
        use super::ActDst;
        let n = x.len();
        let xp = x.as_mut_ptr();
        let keep = !matches!(dst, ActDst::InPlace);
        if let (true, ActDst::Bf16(o)) = (round, &mut dst) {
            // a rounded pre-activation to bf16: the activation's table (`bf16_table`)
            let (table, op) = (super::bf16_table(act).as_ptr(), o.as_mut_ptr());
            for i in (0..n).step_by(16) {
                // SAFETY: i < n; lanes m of the row and of `o` (at least n values) are this
                // call's; the masked-off lanes load 0.0 (table index 0); the caller's features.
                unsafe {
                    let (v, m) = load::<CVT>(xp, n, i, true, true);
                    let y = lookup16(v, table);
                    if CVT {
                        _mm256_mask_storeu_epi16(op.add(i).cast(), m, _mm512_cvtepi32_epi16(y));
                    } else {
                        _mm512_mask_cvtepi32_storeu_epi16(op.add(i).cast(), m, y);
                    }
                }
            }
            return;
        }
        // two chunks per step: their exp and division chains overlap
        let mut i = 0;
        while i < n {
            // SAFETY: i < n; the caller's features.
            let (v0, m0) = unsafe { load::<CVT>(xp, n, i, round, keep) };
            let (v1, m1) = if i + 16 < n { unsafe { load::<CVT>(xp, n, i + 16, round, keep) } } else { (_mm512_setzero_ps(), 0) };
            // SAFETY: the caller's features (AVX-512F at least).
            let (y0, y1) = unsafe { (act16(act, v0), act16(act, v1)) };
            for (y, m, j) in [(y0, m0, i), (y1, m1, i + 16)] {
                // SAFETY: as above; m = 0 (j past the row's end: `wrapping_add` keeps that
                // pointer defined) writes nothing.
                unsafe {
                    match &mut dst {
                        ActDst::InPlace => _mm512_mask_storeu_ps(xp.wrapping_add(j), m, y),
                        ActDst::F32(o) => _mm512_mask_storeu_ps(o.as_mut_ptr().wrapping_add(j), m, y),
                        ActDst::Bf16(o) => store_bf16::<CVT>(o.as_mut_ptr().wrapping_add(j), m, y),
                    }
                }
            }
            i += 32;
        }
    }

    /// A bf16-output epilogue on 16 lanes of a GEMM tile still in registers (`gemm_bf16_avx512::
    /// kernel_bf16`): with `ACT` (1 QuickGELU, 2 GELU) the bits [`super::act_row`] writes to a
    /// bf16 output (the pre-activation rounded first when `ROUND`), with `ACT` 0 those of
    /// [`super::to_bf16_into`] — the same operations in the same order (with `ROUND`, the
    /// activation's table, [`super::bf16_table`]), so the tile in registers and the tile through
    /// memory give the same output.
    ///
    /// # Safety
    /// As [`act_row_bf16`] (AVX-512F, AVX512-BF16, -BW, -VL, -DQ); with `ACT` ≠ 0 and `ROUND`,
    /// `table` is `bf16_table` of that activation (otherwise not read).
    #[inline(always)]
    pub(crate) unsafe fn epi_bf16<const ACT: u8, const ROUND: bool>(v: __m512, table: *const u16) -> __m256i {
        // SAFETY: the caller's features; `table` is the activation's (`bf16_table`).
        unsafe {
            if ACT != 0 && ROUND {
                return _mm512_cvtepi32_epi16(lookup16(round_f32::<true>(v), table));
            }
            let v = match ACT {
                0 => v,
                1 => act16(Unary::QuickGelu, v),
                _ => act16(Unary::Gelu, v),
            };
            narrow16::<true>(v)
        }
    }

    /// `table[bits of x]` (`super::bf16_table`) for 16 bf16-rounded f32s x, in the low 16 bits
    /// of each lane (one gather).
    ///
    /// # Safety
    /// AVX-512F; `table` holds 65537 values; every lane of x is a bf16 value (its low 16 bits 0).
    #[inline(always)]
    unsafe fn lookup16(x: __m512, table: *const u16) -> __m512i {
        // the bf16 bits of each lane
        let idx = _mm512_srli_epi32::<16>(_mm512_castps_si512(x));
        // SAFETY: idx < 65536: the 4 bytes at table + 2·idx are inside its 65537 values; the low
        // 16 bits of each (little-endian) are table[idx].
        unsafe { _mm512_i32gather_epi32::<2>(idx, table.cast()) }
    }

    /// `elementwise::unary_bwd`'s QuickGELU derivative: s = sigmoid(1.702x), s·(1 + 1.702x·(1 − s)).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn quick_gelu_grad16(x: __m512) -> __m512 {
        let s = _mm512_set1_ps;
        let y = _mm512_mul_ps(s(1.702), x);
        let sg = _mm512_div_ps(s(1.0), _mm512_add_ps(s(1.0), exp16(neg16(y))));
        _mm512_mul_ps(sg, _mm512_add_ps(s(1.0), _mm512_mul_ps(y, _mm512_sub_ps(s(1.0), sg))))
    }

    /// `elementwise::unary_bwd`'s GELU derivative: ½(1 + erf(x/√2)) + x·e^(−x²/2)·(1/√(2π)).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn gelu_grad16(x: __m512) -> __m512 {
        let s = _mm512_set1_ps;
        let cdf = _mm512_mul_ps(s(0.5), _mm512_add_ps(s(1.0), erf16(_mm512_mul_ps(x, s(std::f32::consts::FRAC_1_SQRT_2)))));
        let e = exp16(_mm512_mul_ps(_mm512_mul_ps(s(-0.5), x), x));
        _mm512_add_ps(cdf, _mm512_mul_ps(_mm512_mul_ps(x, e), s(0.398_942_3)))
    }

    /// −x (the sign bit flipped, as the scalar negation).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn neg16(x: __m512) -> __m512 {
        _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(x), _mm512_set1_epi32(i32::MIN)))
    }

    /// # Safety
    /// AVX-512F; `act` is QuickGelu or Gelu.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn act_grad_into(act: Unary, x: &[f32], dy: &[f32], dst: &mut [f32]) {
        let n = x.len().min(dy.len()).min(dst.len());
        let (x, dy, dst) = (&x[..n], &dy[..n], &mut dst[..n]);
        let grad = |v: __m512| if act == Unary::Gelu { gelu_grad16(v) } else { quick_gelu_grad16(v) };
        // 32 values a step: two chains in flight (see `act_row`)
        let mut o = dst.chunks_exact_mut(32);
        let (mut xs, mut ds) = (x.chunks_exact(32), dy.chunks_exact(32));
        for ((o, xi), di) in (&mut o).zip(&mut xs).zip(&mut ds) {
            let (op, xp, dp) = (o.as_mut_ptr(), xi.as_ptr(), di.as_ptr());
            // SAFETY: o, xi and di hold 32 values each.
            unsafe {
                let (g0, g1) = (grad(_mm512_loadu_ps(xp)), grad(_mm512_loadu_ps(xp.add(16))));
                _mm512_storeu_ps(op, _mm512_mul_ps(_mm512_loadu_ps(dp), g0));
                _mm512_storeu_ps(op.add(16), _mm512_mul_ps(_mm512_loadu_ps(dp.add(16)), g1));
            }
        }
        super::act_grad_scalar(act, xs.remainder(), ds.remainder(), o.into_remainder());
    }
}
