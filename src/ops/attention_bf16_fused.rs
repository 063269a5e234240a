//! The bf16 attention forward of one (sequence, head) on `vdpbf16ps` (AMD's AVX512-BF16 path),
//! fused: per panel of 14 query rows (the microkernel's MR),
//! 1. Q's 14 rows copied into an A panel (two 64-byte moves per row at head dim 64);
//! 2. S = Q·Kᵀ into a [14 × nk] block, 32 keys per register tile, over only the keys the panel's
//!    last row sees when causal (`nk`), not the 56-row block's;
//! 3. the masked softmax of its rows (`attn_kernel::softmax_rows`), P rounded to bf16 pairs into
//!    the A panel (`gemm_bf16_avx512::convert`);
//! 4. O = P·V over those `nk` keys, 32 value columns per register tile, stored straight into the
//!    output's rows.
//!
//! `attention_bf16.rs` packs K and Vᵀ (`pack_head`) and calls [`head`] where [`applies`]; elsewhere
//! it runs the same steps through `matmul_bf16_seq` per 56-row block, with Q's rows gathered and
//! O's copied out. Both run the microkernel's k loop (`gemm_bf16_avx512::products`) over the same
//! pairs in the same order and the same softmax per row, so they give the same bits
//! (tests/attention_bf16.rs): a causal panel's shorter P·V only leaves out the products of P's
//! zeros past its last key, and S's masked scores were never used.
use super::attention::{AttnShape, SharedOut};
use super::gemm_bf16::{resolve, runs_vdp, AElem, Kernel, Row, WView, KC, MR, NR};
use super::gemm_bf16_avx512::{convert, products};
use core::arch::x86_64::*;
use half::bf16;

/// Whether [`head`] runs for inputs of type `T` at this shape on `kernel`: the `vdpbf16ps` kernel
/// on a CPU that has it, bf16 inputs (f32 ones are rounded as they are packed, by the GEMM
/// path), an even head dim (Q's pairs are read as they lie), and P's pairs within one A panel.
pub(super) fn applies<T: AElem>(kernel: Kernel, t: usize, d: usize) -> bool {
    let bf16_in = matches!(T::row(&[]), Row::Bf16(_));
    bf16_in && runs_vdp(resolve(kernel)) && d.is_multiple_of(2) && d > 0 && t.div_ceil(2) <= KC
}

/// One task's buffers for [`head`].
pub(super) struct Fused {
    /// The A panel: Q's rows, then P's, as bf16 pairs [MR][KC].
    a: Vec<u32>,
    /// S, then P (f32), of one panel [rows, nk rounded up to 32].
    s: Vec<f32>,
}

impl Fused {
    pub(super) fn new(t: usize) -> Fused {
        Fused { a: vec![0u32; MR * KC], s: vec![0f32; MR * t.next_multiple_of(NR)] }
    }
}

/// The forward of the head whose row 0 is at `base` in q (`s.seq` rows at stride W) with K and
/// Vᵀ packed in `kw`, `vw` (`attention_bf16::pack_head`): its rows of `out` (at `base`, stride W)
/// and its `lse` ([T]).
///
/// # Safety
/// [`applies`] for this `T`, `s.seq` and `s.head_dim`; q holds the head's rows; `out` points to an
/// output [B, T, W] of which this head's rows and columns are this caller's alone.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn head<T: AElem>(q: &[T], base: usize, s: &AttnShape, (kw, vw): (WView, WView), lse: &mut [f32], x: &mut Fused, out: SharedOut) {
    let Row::Bf16(q) = T::row(q) else { unreachable!("`applies` admits bf16 inputs only") };
    // SAFETY: the caller's (`applies`: the features).
    unsafe { head_bf16(q, base, s, kw, vw, lse, x, out) }
}

/// [`head`] on bf16 rows.
///
/// # Safety
/// As [`head`].
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn head_bf16(q: &[bf16], base: usize, s: &AttnShape, kw: WView, vw: WView, lse: &mut [f32], x: &mut Fused, out: SharedOut) {
    let (t, w, d) = (s.seq, s.width(), s.head_dim);
    let (dp, (kps_k, pk), (kps_v, pv)) = (d / 2, (kw.kps, kw.data), (vw.kps, vw.data)); // Q's pairs; the packed weights
    assert!(q.len() >= base + (t - 1) * w + d && lse.len() == t && dp <= KC && t.div_ceil(2) <= KC);
    for r0 in (0..t).step_by(MR) {
        let rows = MR.min(t - r0);
        let nk = if s.causal { r0 + rows } else { t }; // keys the panel's last row sees
        let ld = nk.next_multiple_of(NR); // S's row stride: whole key tiles

        // the next panel's Q rows towards L1 while this one computes (prefetches never fault)
        for r in r0 + MR..(r0 + 2 * MR).min(t) {
            let p = q.as_ptr().wrapping_add(base + r * w);
            _mm_prefetch::<_MM_HINT_T0>(p.cast());
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(d - 1).cast());
        }
        // 1. Q's rows as pairs (rows past t keep stale pairs: computed, never stored)
        for r in 0..rows {
            let src = &q[base + (r0 + r) * w..][..d];
            // SAFETY: src holds dp pairs (d even); the panel row holds KC ≥ dp.
            unsafe { copy_pairs(src.as_ptr().cast(), x.a.as_mut_ptr().add(r * KC), dp) };
        }
        // 2. S = Q·Kᵀ [rows, ld], one 14×32 tile per 32 keys
        let sc = &mut x.s[..rows * ld];
        for c in 0..nk.div_ceil(NR) {
            // SAFETY: a is [MR][KC] with dp ≤ KC pairs per row; key panel c holds kps_k ≥ dp pairs × 32.
            let (c0, c1) = unsafe { products::<KC>(&x.a, &pk[c * kps_k * NR..][..kps_k * NR], dp) };
            store_rows(&c0, &c1, rows, sc, ld, c * NR);
        }
        // 3. the softmax (each row over its own keys, zeros past them), P as pairs
        // SAFETY: AVX-512F (this function's features).
        unsafe { super::attn_kernel::softmax_rows(sc, ld, s.scale, |j| s.keys(r0 + j), &mut lse[r0..r0 + rows]) };
        let kp = nk.div_ceil(2); // key pairs of P·V (an odd nk's last pair ends on P's 0 at nk < ld)
        for r in 0..rows {
            // SAFETY: the features; 2·kp ≤ ld values in, kp ≤ KC pairs out.
            unsafe { convert(&sc[r * ld..][..2 * kp], &mut x.a[r * KC..][..kp]) };
        }
        // 4. O = P·V, 32 value columns per tile, into the output rows
        for e in 0..d.div_ceil(NR) {
            // SAFETY: a holds kp ≤ KC pairs per row; value panel e holds kps_v ≥ kp pairs × 32.
            let (c0, c1) = unsafe { products::<KC>(&x.a, &pv[e * kps_v * NR..][..kps_v * NR], kp) };
            // SAFETY: rows r0.. r0 + rows, columns e·32.. of this head: in the output and this
            // caller's (the contract).
            unsafe { store_out(&c0, &c1, rows, &out, base + r0 * w + e * NR, w, NR.min(d - e * NR)) };
        }
    }
}

/// Rows 0..rows of a 14×32 tile into an output or gradient at `at`, `at + w`, …, its first
/// `cols` columns.
///
/// # Safety
/// AVX-512F; those elements are inside the gradient and this caller's alone.
#[inline(always)]
pub(super) unsafe fn store_out(c0: &[__m512; MR], c1: &[__m512; MR], rows: usize, out: &SharedOut, at: usize, w: usize, cols: usize) {
    let (m0, m1) = (mask(cols), mask(cols.saturating_sub(16)));
    for r in 0..rows.min(MR) {
        let o = out.at(at + r * w);
        // SAFETY: the caller's; masked lanes are not written.
        unsafe {
            _mm512_mask_storeu_ps(o, m0, c0[r]);
            _mm512_mask_storeu_ps(o.wrapping_add(16), m1, c1[r]);
        }
    }
}

/// Rows 0..rows of a 14×32 tile into `out` at columns `col`.. of rows `ld` apart.
#[inline(always)]
pub(super) fn store_rows(c0: &[__m512; MR], c1: &[__m512; MR], rows: usize, out: &mut [f32], ld: usize, col: usize) {
    assert!(rows <= MR && col + NR <= ld && (rows == 0 || (rows - 1) * ld + col + NR <= out.len()));
    for r in 0..rows {
        // SAFETY: row r's columns col..col + 32 lie inside out (asserted); AVX-512F (the callers').
        unsafe {
            let p = out.as_mut_ptr().add(r * ld + col);
            _mm512_storeu_ps(p, c0[r]);
            _mm512_storeu_ps(p.add(16), c1[r]);
        }
    }
}

/// `n` u32 from `src` to `dst`, 16 at a time (no call for a 128-byte row).
///
/// # Safety
/// AVX-512F; `src` and `dst` hold `n` values.
#[inline(always)]
pub(super) unsafe fn copy_pairs(src: *const u32, dst: *mut u32, n: usize) {
    for i in (0..n).step_by(16) {
        let m = mask(n - i);
        // SAFETY: lanes < n − i, inside both (the caller's).
        unsafe { _mm512_mask_storeu_epi32(dst.add(i).cast(), m, _mm512_maskz_loadu_epi32(m, src.add(i).cast())) };
    }
}

/// The first `n` (≤ 16) lanes.
#[inline(always)]
pub(super) fn mask(n: usize) -> __mmask16 {
    ((1u32 << n.min(16)) - 1) as u16
}
