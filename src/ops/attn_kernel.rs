//! AVX-512 kernels of the CPU attention's forward (`attention.rs`), per (sequence, head):
//! - [`gemm_rows`]: an unpacked small GEMM c = a·b for S = Q·Kᵀ and O = P·V. It reads Q and V
//!   and writes O in place in the [B, T, H·hd] layout (any row strides), so only Kᵀ is copied per
//!   head; a register tile of up to 6 rows × 64 columns (24 zmm accumulators), one broadcast of
//!   a per row and up to 4 loads of b per k step, the last 16-column vector masked. The
//!   backward (`attention_bwd.rs`) runs its five products on it too.
//! - [`dot`]: a 16-lane dot product (the backward's D_i = Σ dO·O).
//! - [`grad_row`]: one row of the backward's P = exp(S·scale − lse) and dS = P∘(dP − D)·scale.
//! - [`softmax_row`]: max, scale and exp in one pass (`exp_softmax16`: FMAs, within 2 ulp of
//!   e^x; the backward's `grad_row` keeps `act_simd`'s `exp16`, the scalar formulas op for op),
//!   the sum in 16 lanes reduced in a fixed order (bitwise-reproducible), normalise;
//!   [`softmax_rows`]: a block's rows, four interleaved (the same bits).
//!
//! The portable path (`attention::attention_portable`, faer and scalar loops) stays for CPUs
//! without AVX-512F and `CLIPFORGE_CPU_GEMM=scalar`; tests/ops.rs checks both against the f64
//! reference at odd shapes (T = 1, 7, 45, 130; head dims 1, 20, 59, 65; causal and not).
#![cfg(target_arch = "x86_64")]
use super::act_simd::exp16;
use std::arch::x86_64::*;

/// Register-tile rows.
const MR: usize = 6;
/// Register-tile columns (four 16-lane vectors).
const NB: usize = 64;
/// Depth of one k block: its KC × 64 slab of b (32 KiB) stays in L1 across the row tiles.
const KC: usize = 128;

/// c[m×n] (row stride ldc) = a[m×k] (row stride lda) · b[k×n] (row stride ldb); unit column
/// strides.
///
/// # Safety
/// AVX-512F; a holds rows m × k at stride lda, b rows k × n at stride ldb, c rows m × n at stride
/// ldc, c not overlapping a or b.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_rows(m: usize, n: usize, k: usize, a: *const f32, lda: usize, b: *const f32, ldb: usize, c: *mut f32, ldc: usize) {
    // SAFETY: the caller's contract, with a's column stride 1.
    unsafe { gemm_rows_at(m, n, k, a, (lda, 1), b, ldb, c, ldc) }
}

/// [`gemm_rows`] with any strides for a: element (r, p) at `a + r·ars + p·acs`, so a transposed
/// matrix is read in place (the attention backward's dV = Pᵀ·dO with a = Pᵀ: its 6 broadcasts
/// per k step are 6 neighbouring values of one row of P).
///
/// # Safety
/// AVX-512F; a's m × k elements, b's rows k × n at stride ldb and c's rows m × n at stride ldc
/// are in bounds, c not overlapping a or b.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_rows_at(m: usize, n: usize, k: usize, a: *const f32, (ars, acs): (usize, usize), b: *const f32, ldb: usize, c: *mut f32, ldc: usize) {
    for j0 in (0..n).step_by(NB) {
        let cols = NB.min(n - j0);
        let (nv, tail) = (cols.div_ceil(16), cols % 16);
        let mask: __mmask16 = if tail == 0 { 0xFFFF } else { ((1u32 << tail) - 1) as __mmask16 };
        // k in blocks of KC, so that the b block (KC × 64) stays in L1 while every row tile
        // passes it; the first block writes c, later ones add to it (k = 0 writes zeros).
        for p0 in (0..k.max(1)).step_by(KC) {
            let (kc, add) = (KC.min(k - p0), p0 > 0);
            let blk = Block { a: a.wrapping_add(p0 * acs), ars, acs, b: b.wrapping_add(p0 * ldb + j0), ldb, c: c.wrapping_add(j0), ldc, mask, add };
            gemm_block(m, kc, nv, blk);
        }
    }
}

/// One k block of one column block: a, b and c at its origin, strides, the last vector's lane
/// mask, and whether c is added to.
#[derive(Clone, Copy)]
struct Block {
    a: *const f32,
    ars: usize,
    acs: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    mask: __mmask16,
    add: bool,
}

/// Every row tile of one column block (nv vectors) over one k block.
///
/// # Safety
/// As [`gemm_rows_at`] for that block.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn gemm_block(m: usize, k: usize, nv: usize, blk: Block) {
    for i0 in (0..m).step_by(MR) {
        let rows = MR.min(m - i0);
        let t = Block { a: blk.a.wrapping_add(i0 * blk.ars), c: blk.c.wrapping_add(i0 * blk.ldc), ..blk };
        macro_rules! go {
            ($r:literal, $v:literal) => {
                // SAFETY: the tile's rows × cols lie inside a, b and c (caller's contract).
                unsafe { tile::<$r, $v>(k, t) }
            };
        }
        macro_rules! by_vectors {
            ($r:literal) => {
                match nv {
                    1 => go!($r, 1),
                    2 => go!($r, 2),
                    3 => go!($r, 3),
                    _ => go!($r, 4),
                }
            };
        }
        match rows {
            1 => by_vectors!(1),
            2 => by_vectors!(2),
            3 => by_vectors!(3),
            4 => by_vectors!(4),
            5 => by_vectors!(5),
            _ => by_vectors!(6),
        }
    }
}

/// One R × (16·V) tile of c = a·b (c += a·b when `t.add`), the last vector's lanes masked by
/// `t.mask`.
///
/// # Safety
/// As [`gemm_rows_at`] for this tile.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn tile<const R: usize, const V: usize>(k: usize, t: Block) {
    let mut acc = [[_mm512_setzero_ps(); V]; R];
    for p in 0..k {
        let (brow, acol) = (t.b.wrapping_add(p * t.ldb), t.a.wrapping_add(p * t.acs));
        let mut bv = [_mm512_setzero_ps(); V];
        for (v, x) in bv.iter_mut().enumerate() {
            let m = if v + 1 == V { t.mask } else { 0xFFFF };
            // SAFETY: lanes in `m` are inside row p of b (caller).
            *x = unsafe { _mm512_maskz_loadu_ps(m, brow.add(16 * v)) };
        }
        for (r, accr) in acc.iter_mut().enumerate() {
            // SAFETY: a[r][p] is inside a (caller).
            let x = _mm512_set1_ps(unsafe { *acol.add(r * t.ars) });
            for (s, &y) in accr.iter_mut().zip(&bv) {
                *s = _mm512_fmadd_ps(x, y, *s);
            }
        }
    }
    for (r, accr) in acc.iter().enumerate() {
        for (v, &s) in accr.iter().enumerate() {
            let m = if v + 1 == V { t.mask } else { 0xFFFF };
            let cv = t.c.wrapping_add(r * t.ldc + 16 * v);
            // SAFETY: lanes in `m` are inside row r of the tile of c (caller).
            let s = if t.add { _mm512_add_ps(unsafe { _mm512_maskz_loadu_ps(m, cv) }, s) } else { s };
            unsafe { _mm512_mask_storeu_ps(cv, m, s) };
        }
    }
}

/// e^x for the softmax's x ≤ 0 (or NaN): 2^n · p(f), n = round(x·log₂e), f = x − n·ln 2 in two
/// FMAs (ln 2 split in a high part exact in f32 and the rest), p the degree-7 Taylor polynomial
/// by Horner in FMAs (|f| ≤ ln 2 / 2: truncation < 10⁻⁸ relative; within 2 ulp of e^x,
/// tests/ops.rs — degree 6 reached 3). x below −87 is taken as −87 (e^−87 ≈ 1.6·10⁻³⁸, as
/// `exp16`); NaN stays NaN. 13 operations against `exp16`'s 21, which avoids FMA contraction to
/// keep the scalar `fastmath::exp`'s bits.
#[inline]
#[target_feature(enable = "avx512f")]
fn exp_softmax16(x: __m512) -> __m512 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let s = _mm512_set1_ps;
    let x = _mm512_max_ps(s(-87.0), x); // NaN: the second operand, x
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(x, s(std::f32::consts::LOG2_E)));
    let f = _mm512_fnmadd_ps(n, s(LN2_LO), _mm512_fnmadd_ps(n, s(LN2_HI), x));
    let mut p = s(1.0 / 5040.0);
    for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = _mm512_fmadd_ps(p, f, s(c));
    }
    _mm512_scalef_ps(p, n)
}

/// `exp_softmax16` over a slice (for tests: `out[i]` = e^`x[i]`, `x` ≤ 0).
///
/// # Safety
/// AVX-512F.
#[doc(hidden)]
#[target_feature(enable = "avx512f")]
pub unsafe fn exp_softmax(x: &[f32], out: &mut [f32]) {
    assert_eq!(x.len(), out.len(), "exp_softmax: lengths");
    for (x, o) in x.chunks(16).zip(out.chunks_mut(16)) {
        let m = ((1u32 << x.len()) - 1) as __mmask16;
        // SAFETY: lanes in m are inside both chunks.
        unsafe { _mm512_mask_storeu_ps(o.as_mut_ptr(), m, exp_softmax16(_mm512_maskz_loadu_ps(m, x.as_ptr()))) };
    }
}

/// Over `row[..keys]` (the scores of one query): x·scale, then exp(x − max) / Σ; `row[keys..]`
/// (masked keys) becomes 0. Returns the row's logsumexp, max + ln Σ. `keys` ≥ 1, `scale` > 0.
///
/// Three passes: the max, taken over the unscaled scores and scaled once (with scale > 0,
/// rounding x·scale is monotonic in x, so round(max x · scale) is the largest round(x·scale));
/// e = `exp_softmax16`(x·scale − max) with its sum, the scale applied as it reads (one FMA, x·scale
/// not rounded first: the largest score's argument is then within half an ulp of max from 0, not 0
/// exactly); e / Σ. The exp pass is most of the time, so it has an exp of its own: 13 operations against
/// the activations' bit-exact `exp16`'s 21, within 2 ulp of e^x.
///
/// # Safety
/// AVX-512F.
#[target_feature(enable = "avx512f")]
pub unsafe fn softmax_row(row: &mut [f32], keys: usize, scale: f32) -> f32 {
    assert!(scale > 0.0, "softmax_row: scale {scale} must be positive");
    let (live, dead) = row.split_at_mut(keys);
    dead.fill(0.0);
    let n = live.len();
    let lanes = |i: usize| -> __mmask16 {
        let r = n - i;
        if r >= 16 {
            0xFFFF
        } else {
            ((1u32 << r) - 1) as __mmask16
        }
    };
    let p = live.as_mut_ptr();
    let sc = _mm512_set1_ps(scale);
    let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
    for i in (0..n).step_by(16) {
        let m = lanes(i);
        // SAFETY: lanes in m are inside live.
        mx = _mm512_mask_max_ps(mx, m, mx, unsafe { _mm512_maskz_loadu_ps(m, p.add(i)) });
    }
    let max = _mm512_reduce_max_ps(mx) * scale; // the largest x·scale (see the docs)
    let (mv, mut sum) = (_mm512_set1_ps(max), _mm512_setzero_ps());
    for i in (0..n).step_by(16) {
        let m = lanes(i);
        // SAFETY: as above.
        let e = exp_softmax16(_mm512_fmsub_ps(unsafe { _mm512_maskz_loadu_ps(m, p.add(i)) }, sc, mv));
        unsafe { _mm512_mask_storeu_ps(p.add(i), m, e) };
        sum = _mm512_mask_add_ps(sum, m, sum, e);
    }
    let z = _mm512_reduce_add_ps(sum);
    let inv = _mm512_set1_ps(1.0 / z);
    for i in (0..n).step_by(16) {
        let m = lanes(i);
        // SAFETY: as above.
        unsafe { _mm512_mask_storeu_ps(p.add(i), m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, p.add(i)), inv)) };
    }
    max + z.ln()
}

/// [`softmax_row`] over the rows of `sc` (`[rows, nk]`): row j sees `keys(j)` keys, its logsumexp
/// goes to `lse[j]`. Four rows at a time: one row is a chain of dependent passes (the max and
/// sum reductions, the exps, the division: ≈ 24 % of a bf16 attention at T = 50, waiting on
/// latency), four rows in flight overlap (the last two or three rows together too). Each row gets
/// the operations of [`softmax_row`] (a lane past a shorter row's keys is masked off, which
/// changes nothing), so the same bits.
///
/// # Safety
/// AVX-512F.
#[target_feature(enable = "avx512f")]
pub unsafe fn softmax_rows(sc: &mut [f32], nk: usize, scale: f32, keys: impl Fn(usize) -> usize, lse: &mut [f32]) {
    assert!(scale > 0.0, "softmax_rows: scale {scale} must be positive");
    let mut rows = sc.chunks_exact_mut(nk.max(1));
    let mut j = 0;
    // four at a time, then the last one to three rows together too (a 14-row panel ends on two)
    while let r @ 1.. = rows.len().min(4) {
        // SAFETY (each): AVX-512F (the caller's).
        match r {
            4 => unsafe { group::<4>(&mut rows, j, &keys, scale, lse) },
            3 => unsafe { group::<3>(&mut rows, j, &keys, scale, lse) },
            2 => unsafe { group::<2>(&mut rows, j, &keys, scale, lse) },
            _ => lse[j] = unsafe { softmax_row(rows.next().expect("one row left"), keys(j), scale) },
        }
        j += r;
    }
}

/// `R` rows off the front of `rows` (queries j.. j + R) through [`softmax_n`], their logsumexps
/// to `lse[j..j + R]`.
///
/// # Safety
/// AVX-512F; `rows` has `R` rows left.
#[target_feature(enable = "avx512f")]
unsafe fn group<const R: usize>(rows: &mut std::slice::ChunksExactMut<f32>, j: usize, keys: &impl Fn(usize) -> usize, scale: f32, lse: &mut [f32]) {
    // SAFETY: AVX-512F (the caller's).
    let l = unsafe { softmax_n::<R>(std::array::from_fn(|_| rows.next().expect("R rows left")), std::array::from_fn(|i| keys(j + i)), scale) };
    lse[j..j + R].copy_from_slice(&l);
}

/// [`softmax_row`] of `R` (≤ 4) rows, interleaved.
///
/// # Safety
/// AVX-512F.
#[target_feature(enable = "avx512f")]
unsafe fn softmax_n<const R: usize>(rows: [&mut [f32]; R], keys: [usize; R], scale: f32) -> [f32; R] {
    let mut p = [std::ptr::null_mut::<f32>(); R];
    let mut n = [0usize; R];
    for (r, row) in rows.into_iter().enumerate() {
        let (live, dead) = row.split_at_mut(keys[r]);
        dead.fill(0.0);
        (p[r], n[r]) = (live.as_mut_ptr(), live.len());
    }
    let nmax = n.into_iter().max().unwrap_or(0);
    // lanes of row r at i (none past its keys)
    let lanes = |r: usize, i: usize| -> __mmask16 {
        let left = n[r].saturating_sub(i);
        if left >= 16 {
            0xFFFF
        } else {
            ((1u32 << left) - 1) as __mmask16
        }
    };
    let sc = _mm512_set1_ps(scale);
    let mut mx = [_mm512_set1_ps(f32::NEG_INFINITY); R];
    // SAFETY (the three passes): the lanes in m are inside row r's keys (`wrapping_add` keeps a
    // pointer past a shorter row defined; its mask is 0, so nothing is read or written).
    for i in (0..nmax).step_by(16) {
        for r in 0..R {
            let (m, q) = (lanes(r, i), p[r].wrapping_add(i));
            mx[r] = _mm512_mask_max_ps(mx[r], m, mx[r], unsafe { _mm512_maskz_loadu_ps(m, q) });
        }
    }
    let max = mx.map(|v| _mm512_reduce_max_ps(v) * scale); // the largest x·scale ([`softmax_row`])
    let mut sum = [_mm512_setzero_ps(); R];
    for i in (0..nmax).step_by(16) {
        for r in 0..R {
            let (m, q) = (lanes(r, i), p[r].wrapping_add(i));
            let e = exp_softmax16(_mm512_fmsub_ps(unsafe { _mm512_maskz_loadu_ps(m, q) }, sc, _mm512_set1_ps(max[r])));
            unsafe { _mm512_mask_storeu_ps(q, m, e) };
            sum[r] = _mm512_mask_add_ps(sum[r], m, sum[r], e);
        }
    }
    let z = sum.map(|v| _mm512_reduce_add_ps(v));
    let inv = z.map(|z| _mm512_set1_ps(1.0 / z));
    for i in (0..nmax).step_by(16) {
        for r in 0..R {
            let (m, q) = (lanes(r, i), p[r].wrapping_add(i));
            unsafe { _mm512_mask_storeu_ps(q, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, q), inv[r])) };
        }
    }
    std::array::from_fn(|r| max[r] + z[r].ln())
}

/// One query row of the backward (`attention_bwd.rs`): over `p[..keys]` (the row's scores S)
/// and `ds[..keys]` (its dP), P = exp(S·scale − lse) and dS = P·(dP − D)·scale, the scalar
/// formulas op for op (no FMA contraction); entries `keys..` of both become 0.
///
/// # Safety
/// AVX-512F.
#[target_feature(enable = "avx512f")]
pub unsafe fn grad_row(p: &mut [f32], ds: &mut [f32], keys: usize, scale: f32, lse: f32, dd: f32) {
    assert!(keys <= p.len() && p.len() == ds.len(), "grad_row: keys beyond the row");
    p[keys..].fill(0.0);
    ds[keys..].fill(0.0);
    let (pp, dp) = (p.as_mut_ptr(), ds.as_mut_ptr());
    let (sc, l, d) = (_mm512_set1_ps(scale), _mm512_set1_ps(lse), _mm512_set1_ps(dd));
    for i in (0..keys).step_by(16) {
        let r = keys - i;
        let m: __mmask16 = if r >= 16 { 0xFFFF } else { ((1u32 << r) - 1) as __mmask16 };
        // SAFETY: lanes in m are inside p[..keys] and ds[..keys] (asserted).
        unsafe {
            let e = exp16(_mm512_sub_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, pp.add(i)), sc), l));
            _mm512_mask_storeu_ps(pp.add(i), m, e);
            let g = _mm512_mul_ps(_mm512_mul_ps(e, _mm512_sub_ps(_mm512_maskz_loadu_ps(m, dp.add(i)), d)), sc);
            _mm512_mask_storeu_ps(dp.add(i), m, g);
        }
    }
}

/// Σ `a[i]·b[i]` over 16 lanes (the tail masked), the lanes summed in a fixed order.
///
/// # Safety
/// AVX-512F.
#[target_feature(enable = "avx512f")]
pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let mut acc = _mm512_setzero_ps();
    for i in (0..n).step_by(16) {
        let r = n - i;
        let m: __mmask16 = if r >= 16 { 0xFFFF } else { ((1u32 << r) - 1) as __mmask16 };
        // SAFETY: lanes in m are inside a[..n] and b[..n].
        acc = unsafe { _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a.as_ptr().add(i)), _mm512_maskz_loadu_ps(m, b.as_ptr().add(i)), acc) };
    }
    _mm512_reduce_add_ps(acc)
}
