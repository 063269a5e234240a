//! The bf16 attention backward of one (sequence, head) on `vdpbf16ps` (AMD's AVX512-BF16 path),
//! fused per panel of 14 query rows (the microkernel's MR), after `attention_bf16_bwd.rs` has
//! packed K, V (the weights [T × hd] of S and dP) and Kᵀ, Qᵀ, dOᵀ (the weights [hd × T]), rounded
//! dO and computed D:
//! 1. Q's and dO's 14 rows as A panels (pairs along hd);
//! 2. S = Q·Kᵀ and dP = dO·Vᵀ into [14 × nk] blocks, over only the keys the panel's last row sees
//!    when causal (`nk`), then P and dS per row (`attn_kernel::grad_row`);
//! 3. dQ = dS·K: dS's rows rounded to pairs, the products stored straight into dq's rows;
//! 4. P's and dS's rows, two at a time, zipped into bf16 pairs along the queries: Pᵀ and dSᵀ as
//!    pair-major A panels, 14 keys each (a query pair is two rows side by side: no transpose).
//!
//! After the last panel, per 14 keys: dV = Pᵀ·dO and dK = dSᵀ·Q over the query pairs that see
//! them (from the keys' first query when causal), on the packed dOᵀ and Qᵀ, stored straight into
//! the gradients' rows.
//!
//! The composed path (`attention_bf16_bwd::head`) computes the same products per element over the
//! same pairs in the same order: a causal panel's shorter sums and the later starts only leave out
//! products with P's or dS's zeros. So the two give the same bits (tests/attention_bf16_bwd.rs).
use super::attention::{AttnShape, SharedOut};
use super::attention_bf16_fused::{copy_pairs, store_out, store_rows};
use super::gemm_bf16::{KC, MR, NR};
use super::gemm_bf16_avx512::{convert, products, products_strided, zip_convert};
use half::bf16;

/// One task's buffers for [`head`].
pub(super) struct FusedBwd {
    /// A panels [MR][KC]: Q's rows, dO's rows, dS's rows (pairs).
    aq: Vec<u32>,
    ado: Vec<u32>,
    ads: Vec<u32>,
    /// S then P, dP then dS, of one panel [MR, ld].
    s: Vec<f32>,
    ds: Vec<f32>,
    /// Pᵀ and dSᵀ as pair-major A panels [T/14 key blocks][query pairs][14 keys]; zeros where no
    /// panel writes (keys past a causal panel's `nk`, keys past T).
    pt: Vec<u32>,
    dst: Vec<u32>,
}

impl FusedBwd {
    pub(super) fn new(t: usize) -> FusedBwd {
        let ld = t.next_multiple_of(NR);
        let at = t.div_ceil(MR) * t.div_ceil(2) * MR;
        FusedBwd {
            aq: vec![0; MR * KC],
            ado: vec![0; MR * KC],
            ads: vec![0; MR * KC],
            s: vec![0.0; MR * ld],
            ds: vec![0.0; MR * ld],
            pt: vec![0; at],
            dst: vec![0; at],
        }
    }
}

/// The packed operands of one head (`attention_bf16_bwd::head`'s step 1).
pub(super) struct Packed<'a> {
    /// K and V as the weights [T × hd]: (pairs per panel, data).
    pub(super) k: (usize, &'a [u32]),
    pub(super) v: (usize, &'a [u32]),
    /// Kᵀ, Qᵀ and dOᵀ as the weights [hd × T].
    pub(super) kt: (usize, &'a [u32]),
    pub(super) qt: (usize, &'a [u32]),
    pub(super) dot: (usize, &'a [u32]),
    /// dO's rows rounded to bf16 [T, hd], and D per query.
    pub(super) doh: &'a [f32],
    pub(super) dd: &'a [f32],
}

/// The backward of the head whose row 0 is at `base` in q and the gradients (`s.seq` rows at
/// stride W), `lr` its T logsumexps: its rows and columns of `g` = [dq, dk, dv].
///
/// # Safety
/// `attention_bf16_fused::applies` for bf16 inputs, `s.seq` and `s.head_dim`; q holds the head's
/// rows; `g` point to outputs [B, T, W] of which this head's rows and columns are this caller's
/// alone.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(super) unsafe fn head(q: &[bf16], base: usize, s: &AttnShape, pk: &Packed, lr: &[f32], x: &mut FusedBwd, g: &[SharedOut; 3]) {
    let (t, w, d) = (s.seq, s.width(), s.head_dim);
    let dp = d / 2; // pairs of a Q or dO row
    let tp = t.div_ceil(2); // query pairs
    assert!(q.len() >= base + (t - 1) * w + d && lr.len() == t && pk.doh.len() >= t * d && pk.dd.len() >= t && dp <= KC && tp <= KC);
    assert!(x.s.len() >= MR * t.next_multiple_of(NR) && x.pt.len() == t.div_ceil(MR) * tp * MR);
    for r0 in (0..t).step_by(MR) {
        let rows = MR.min(t - r0);
        let nk = if s.causal { r0 + rows } else { t }; // keys the panel's last row sees
        let ld = nk.next_multiple_of(NR);
        let kp = nk.div_ceil(2);
        // 1. Q's rows as pairs; dO's rounded rows as pairs (exact: bf16 values already)
        for r in 0..rows {
            let src = &q[base + (r0 + r) * w..][..d];
            // SAFETY: src holds dp pairs (d even); the panel rows hold KC ≥ dp; the features.
            unsafe {
                copy_pairs(src.as_ptr().cast(), x.aq.as_mut_ptr().add(r * KC), dp);
                convert(&pk.doh[(r0 + r) * d..][..d], &mut x.ado[r * KC..][..dp]);
            }
        }
        // 2. S and dP [rows, ld], one 14×32 tile per 32 keys; then P and dS per row
        for (a, (kps, data), out) in [(&x.aq, pk.k, &mut x.s), (&x.ado, pk.v, &mut x.ds)] {
            for c in 0..nk.div_ceil(NR) {
                // SAFETY: a is [MR][KC] with dp ≤ KC pairs per row; key panel c holds kps ≥ dp pairs × 32.
                let (c0, c1) = unsafe { products::<KC>(a, &data[c * kps * NR..][..kps * NR], dp) };
                store_rows(&c0, &c1, rows, out, ld, c * NR);
            }
        }
        for r in 0..rows {
            let i = r0 + r;
            // SAFETY: AVX-512F (this function's features).
            unsafe { super::attn_kernel::grad_row(&mut x.s[r * ld..][..ld], &mut x.ds[r * ld..][..ld], s.keys(i), s.scale, lr[i], pk.dd[i]) };
        }
        // 3. dQ = dS·K [rows, hd] into dq's rows
        for r in 0..rows {
            // SAFETY: the features; 2·kp ≤ ld values in, kp ≤ KC pairs out.
            unsafe { convert(&x.ds[r * ld..][..2 * kp], &mut x.ads[r * KC..][..kp]) };
        }
        for e in 0..d.div_ceil(NR) {
            // SAFETY: ads holds kp ≤ KC pairs per row; Kᵀ's panel e holds kps ≥ kp pairs × 32.
            let (c0, c1) = unsafe { products::<KC>(&x.ads, &pk.kt.1[e * pk.kt.0 * NR..][..pk.kt.0 * NR], kp) };
            // SAFETY: rows r0.. r0 + rows, columns e·32.. of this head: the caller's.
            unsafe { store_out(&c0, &c1, rows, &g[0], base + r0 * w + e * NR, w, NR.min(d - e * NR)) };
        }
        // 4. P's and dS's rows in query pairs into Pᵀ's and dSᵀ's pair-major panels
        for (src, dst) in [(&x.s, &mut x.pt), (&x.ds, &mut x.dst)] {
            for pp in 0..rows.div_ceil(2) {
                let (lo, hi) = (&src[2 * pp * ld..][..nk], (2 * pp + 1 < rows).then(|| &src[(2 * pp + 1) * ld..][..nk]));
                let p = r0 / 2 + pp; // r0 is even (MR is)
                for kb in 0..nk.div_ceil(MR) {
                    let (j0, keys) = (kb * MR, MR.min(nk - kb * MR));
                    // SAFETY: the features; `keys` values in, `keys` pairs out.
                    unsafe { zip_convert(&lo[j0..j0 + keys], hi.map(|h| &h[j0..j0 + keys]), &mut dst[(kb * tp + p) * MR..][..keys]) };
                }
            }
        }
    }
    // dV = Pᵀ·dO and dK = dSᵀ·Q, per 14 keys over the query pairs that see them
    for (a, (kps, b), out) in [(&x.pt, pk.dot, &g[2]), (&x.dst, pk.qt, &g[1])] {
        for kb in 0..t.div_ceil(MR) {
            let (j0, keys) = (kb * MR, MR.min(t - kb * MR));
            let p0 = if s.causal { j0 / 2 } else { 0 }; // j0 is even
            for e in 0..d.div_ceil(NR) {
                // SAFETY: the block's panel from pair p0 holds (tp − p0)·MR pairs; the packed
                // panel e from pair p0 holds (kps − p0)·NR ≥ (tp − p0)·NR values.
                let (c0, c1) = unsafe {
                    products_strided::<1, MR>(&a[(kb * tp + p0) * MR..][..(tp - p0) * MR], &b[(e * kps + p0) * NR..][..(kps - p0) * NR], tp - p0, || {})
                };
                // SAFETY: rows j0.. j0 + keys, columns e·32.. of this head: the caller's.
                unsafe { store_out(&c0, &c1, keys, out, base + j0 * w + e * NR, w, NR.min(d - e * NR)) };
            }
        }
    }
}
