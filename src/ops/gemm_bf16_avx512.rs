//! The AVX512-BF16 microkernel of `gemm_bf16` (x86-64): f32 → bf16 pair conversion and the
//! 14×32 register tile over `vdpbf16ps` (see `gemm_bf16`'s module docs for the layout).
use super::act_simd::{bf16_table, epi_bf16};
use super::bf16_simd::narrow16;
use super::elementwise::Unary;
use super::elementwise::Unary::{Gelu, QuickGelu};
use super::gemm_bf16::{Tile, KC, KC_WIDE, MR, NR};
use core::arch::x86_64::*;
use half::bf16;

/// Converts `src` f32 to bf16 pairs (RNE) in `dst`; an odd tail is padded with 0.
///
/// # Safety
/// Requires avx512f + avx512bf16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(super) unsafe fn convert(src: &[f32], dst: &mut [u32]) {
    for (s, d) in src.chunks(32).zip(dst.chunks_mut(16)) {
        let (n, p) = (s.len(), s.as_ptr());
        let (m0, m1) = (mask16(n), mask16(n.saturating_sub(16)));
        // SAFETY: masked loads only touch lanes < n, inside `s` (fault suppression
        // covers the rest; `wrapping_add` keeps the pointer arithmetic defined);
        // the masked store writes ceil(n/2) <= d.len() lanes.
        unsafe {
            let lo = _mm512_maskz_loadu_ps(m0, p);
            let hi = _mm512_maskz_loadu_ps(m1, p.wrapping_add(16));
            let v: __m512i = core::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_mask_storeu_epi32(d.as_mut_ptr().cast(), mask16(n.div_ceil(2)), v);
        }
    }
}

/// `dst[i] = (lo[i], hi[i])` as bf16 pairs (RNE; `hi` None: zero halves), 16 at a time.
///
/// # Safety
/// Requires avx512f + avx512bf16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(super) unsafe fn zip_convert(lo: &[f32], hi: Option<&[f32]>, dst: &mut [u32]) {
    let n = dst.len().min(lo.len()).min(hi.map_or(usize::MAX, |h| h.len()));
    for i in (0..n).step_by(16) {
        let m = mask16(n - i);
        // SAFETY: masked loads and the store touch lanes < n - i, inside lo, hi and dst.
        unsafe {
            let l = _mm512_cvtepu16_epi32(core::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, lo.as_ptr().add(i)))));
            let v = match hi {
                Some(h) => {
                    let h = _mm512_cvtepu16_epi32(core::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, h.as_ptr().add(i)))));
                    _mm512_or_si512(l, _mm512_slli_epi32::<16>(h))
                }
                None => l,
            };
            _mm512_mask_storeu_epi32(dst.as_mut_ptr().add(i).cast(), m, v);
        }
    }
}

/// `dst[i] = (lo[i], hi[i])` (`hi` None: zero halves), bf16 as they are, 16 pairs at a time: the
/// bits of `AElem::zip_pairs`'s scalar loop (two rows interleaved, e.g. V's key pairs).
///
/// # Safety
/// Requires avx512f, -bw, -vl.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn zip_bf16(lo: &[bf16], hi: Option<&[bf16]>, dst: &mut [u32]) {
    let n = dst.len().min(lo.len()).min(hi.map_or(usize::MAX, |h| h.len()));
    for i in (0..n).step_by(16) {
        let m = mask16(n - i);
        // SAFETY: masked loads and the store touch lanes < n - i, inside lo, hi and dst.
        unsafe {
            let l = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, lo.as_ptr().add(i).cast()));
            let v = match hi {
                Some(h) => _mm512_or_si512(l, _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, h.as_ptr().add(i).cast())))),
                None => l,
            };
            _mm512_mask_storeu_epi32(dst.as_mut_ptr().add(i).cast(), m, v);
        }
    }
}

#[inline(always)]
fn mask16(n: usize) -> __mmask16 {
    ((1u32 << n.min(16)) - 1) as u16
}

/// AVX512-BF16 microkernel: 14×32 register tile, one `vdpbf16ps` per zmm per k pair. The A
/// panel's length gives its rows' stride: `MR·KC_WIDE` pairs for `gemm`'s one-block depth of up
/// to [`KC_WIDE`] pairs, else `MR·KC` ([`stride_of`]).
///
/// # Safety
/// Requires avx512f + avx512bf16; `a.len()` is `MR·KC` or `MR·KC_WIDE` and holds `kc` pairs per
/// row, `b.len() >= kc·NR`; the tile contract of [`Tile::store`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(super) unsafe fn kernel(a: &[u32], b: &[u32], kc: usize, t: &Tile) {
    // SAFETY: forwarded.
    unsafe {
        match stride_of(a) {
            KC_WIDE => kernel_s::<KC_WIDE>(a, b, kc, t),
            _ => kernel_s::<KC>(a, b, kc, t),
        }
    }
}

/// The A panel's row stride (pairs) from its length (see [`kernel`]).
#[inline(always)]
fn stride_of(a: &[u32]) -> usize {
    if a.len() == MR * KC_WIDE {
        KC_WIDE
    } else {
        KC
    }
}

/// [`kernel`] with the A rows `S` pairs apart (a constant, so the 14 row offsets fold into the
/// broadcasts' addresses).
///
/// # Safety
/// As [`kernel`], with `kc <= S` and `a.len() >= MR·S`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn kernel_s<const S: usize>(a: &[u32], b: &[u32], kc: usize, t: &Tile) {
    // Pull the C tile towards L1 while the k loop runs (prefetch never faults).
    for r in 0..MR {
        if r < t.rows {
            let cr = t.c.wrapping_add(t.off + r * t.ldc);
            _mm_prefetch::<_MM_HINT_ET0>(cr.cast());
            _mm_prefetch::<_MM_HINT_ET0>(cr.wrapping_add(16).cast());
        }
    }
    // SAFETY: the features; the slices' lengths are checked inside; the tile contract, forwarded.
    unsafe {
        let (c0, c1) = products::<S>(a, b, kc);
        store(&c0, &c1, t)
    }
}

/// The 14×32 products a·b of one kc-block in registers (the k loop of [`kernel`]).
///
/// # Safety
/// Requires avx512f + avx512bf16 (inlined into callers that enable them).
#[inline(always)]
pub(super) unsafe fn products<const S: usize>(a: &[u32], b: &[u32], kc: usize) -> ([__m512; MR], [__m512; MR]) {
    // SAFETY: the caller's.
    unsafe { products_with::<S>(a, b, kc, || {}) }
}

/// [`products`] with `step` run once per k step, after its `vdpbf16ps` (scalar work that hides in
/// the loop: [`Deferred`]'s lookups).
///
/// # Safety
/// As [`products`].
#[inline(always)]
unsafe fn products_with<const S: usize>(a: &[u32], b: &[u32], kc: usize, step: impl FnMut()) -> ([__m512; MR], [__m512; MR]) {
    assert!(kc <= S && a.len() >= MR * S);
    // SAFETY: the caller's; the asserted bounds imply `products_strided`'s.
    unsafe { products_strided::<S, 1>(a, b, kc, step) }
}

/// The 14×32 products of A's pair p of row r at `a[r·RS + p·PS]` (row-major A panels: RS = the
/// panel's width, PS = 1; pair-major ones, PS = MR, RS = 1) with `kc` pairs of b.
///
/// # Safety
/// Requires avx512f + avx512bf16 (inlined into callers that enable them).
#[inline(always)]
pub(super) unsafe fn products_strided<const RS: usize, const PS: usize>(
    a: &[u32],
    b: &[u32],
    kc: usize,
    mut step: impl FnMut(),
) -> ([__m512; MR], [__m512; MR]) {
    assert!((kc == 0 || (MR - 1) * RS + (kc - 1) * PS < a.len()) && b.len() >= kc * NR);
    let mut c0 = [_mm512_setzero_ps(); MR];
    let mut c1 = [_mm512_setzero_ps(); MR];
    let (mut ap, mut bp) = (a.as_ptr(), b.as_ptr());
    // SAFETY: the loop reads a[r·RS + p·PS] (r < MR) and b[p·NR .. p·NR+NR] for p < kc,
    // all inside the slices (asserted above); the caller's features.
    unsafe {
        for _ in 0..kc {
            let b0: __m512bh = core::mem::transmute(_mm512_loadu_si512(bp.cast()));
            let b1: __m512bh = core::mem::transmute(_mm512_loadu_si512(bp.add(16).cast()));
            for r in 0..MR {
                let av = _mm512_set1_epi32(*ap.add(r * RS) as i32);
                let av: __m512bh = core::mem::transmute(av);
                c0[r] = _mm512_dpbf16_ps(c0[r], av, b0);
                c1[r] = _mm512_dpbf16_ps(c1[r], av, b1);
            }
            step();
            ap = ap.add(PS);
            bp = bp.add(NR);
        }
    }
    (c0, c1)
}

/// Where [`kernel_bf16`] writes: rows × cols of a bf16 output at `out + off`, row stride `ldo`.
pub(super) struct Bf16Tile<'a> {
    pub(super) out: *mut bf16,
    pub(super) off: usize,
    pub(super) ldo: usize,
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) bias: Option<&'a [f32]>, // starts at the tile's first column
    /// The activation (QuickGelu or Gelu; None: the values themselves) and whether the
    /// pre-activation is rounded to bf16 first.
    pub(super) act: Option<(Unary, bool)>,
}

/// [`kernel`] for one whole kc-block whose only output is bf16 (`Epilogue::Bf16`, or
/// `Epilogue::Act` to bf16 with no C): acc + bias, the activation and the narrowing straight from
/// the accumulators to the output — no C tile stored and read back, and the 28 vectors'
/// activations are independent work for the out-of-order core (one C row at a time, the
/// activation's ≈ 80-cycle chain was the wait). The same operations as storing the tile and
/// applying the epilogue to it, so the same bits.
///
/// The activation of a rounded pre-activation is a table lookup (`act_simd::bf16_table`); for a
/// whole 14×32 tile those 448 lookups are [`Deferred`]: the tile leaves only its pre-activations'
/// bf16 bits, and the next call does the lookups two per k step inside its k loop, where the
/// load ports have room while `vdpbf16ps` sets the pace (as gathers after the loop they took
/// ≈ 5 % of an fc1 GEMM on Zen 4). Same table, same index: the same bits. `d` carries them
/// from call to call within one work item; [`Deferred::flush`] after its last tile.
///
/// # Safety
/// Requires avx512f, -bw, -vl, -dq and avx512bf16; `a` as for [`kernel`], `b.len() >= kc·NR`;
/// rows × cols (≤ MR × NR) of the output at `out + off` (stride `ldo`) are in bounds and this
/// caller's alone until `d` is flushed; `bias` (if any) holds `cols` values.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")]
pub(super) unsafe fn kernel_bf16(a: &[u32], b: &[u32], kc: usize, t: &Bf16Tile, d: &mut Deferred) {
    // SAFETY: the features and the output contract, forwarded.
    unsafe {
        let (c0, c1) = match stride_of(a) {
            KC_WIDE => products_deferring::<KC_WIDE>(a, b, kc, d),
            _ => products_deferring::<KC>(a, b, kc, d),
        };
        match t.act {
            None => rows_bf16::<0, false>(&c0, &c1, t),
            Some((QuickGelu, false)) => rows_bf16::<1, false>(&c0, &c1, t),
            Some((QuickGelu, true)) if t.rows == MR && t.cols == NR => d.defer(&c0, &c1, t, bf16_table(QuickGelu)),
            Some((QuickGelu, true)) => rows_bf16::<1, true>(&c0, &c1, t),
            Some((Gelu, false)) => rows_bf16::<2, false>(&c0, &c1, t),
            Some((Gelu, true)) if t.rows == MR && t.cols == NR => d.defer(&c0, &c1, t, bf16_table(Gelu)),
            Some((Gelu, true)) => rows_bf16::<2, true>(&c0, &c1, t),
            Some((op, _)) => panic!("bf16 epilogue activation must be QuickGelu or Gelu, got {op:?}"),
        }
    }
}

/// A whole tile's activation lookups, left for the next [`kernel_bf16`] call (see there):
/// `idx` the bf16 bits of its rounded pre-activations, row-major `MR × NR`; element (r, c) goes
/// to `out + r·ldo + c` as `table[idx]`.
pub(super) struct Deferred {
    idx: [u16; MR * NR],
    out: *mut bf16,
    ldo: usize,
    table: *const u16,
    /// Lookups pending: 0 or `MR·NR`.
    n: usize,
}

impl Deferred {
    pub(super) fn new() -> Self {
        Deferred { idx: [0; MR * NR], out: core::ptr::null_mut(), ldo: 0, table: core::ptr::null(), n: 0 }
    }

    /// Leaves the tile's lookups (its acc + bias rounded to bf16: the index `lookup16` takes).
    ///
    /// # Safety
    /// As [`kernel_bf16`] for a whole tile; `table` is its activation's `bf16_table`.
    #[inline(always)]
    unsafe fn defer(&mut self, c0: &[__m512; MR], c1: &[__m512; MR], t: &Bf16Tile, table: &[u16]) {
        // SAFETY: `bias` has NR values (a whole tile); `idx` holds MR·NR; the caller's features.
        unsafe {
            let (bias0, bias1) = match t.bias {
                Some(bias) => (_mm512_loadu_ps(bias.as_ptr()), _mm512_loadu_ps(bias.as_ptr().add(16))),
                None => (_mm512_setzero_ps(), _mm512_setzero_ps()),
            };
            let p = self.idx.as_mut_ptr();
            for r in 0..MR {
                _mm256_storeu_si256(p.add(r * NR).cast(), narrow16::<true>(_mm512_add_ps(c0[r], bias0)));
                _mm256_storeu_si256(p.add(r * NR + 16).cast(), narrow16::<true>(_mm512_add_ps(c1[r], bias1)));
            }
        }
        (self.out, self.ldo, self.table, self.n) = (t.out.wrapping_add(t.off), t.ldo, table.as_ptr(), MR * NR);
    }

    /// Lookups e and e + 1 (e even: one row).
    ///
    /// # Safety
    /// e + 1 < `n`; the deferred tile's contract ([`kernel_bf16`]).
    #[inline(always)]
    unsafe fn pair(&self, e: usize) {
        // SAFETY: e + 1 < MR·NR; the output element (e / NR, e % NR) of the tile and the next are
        // in bounds and ours; every index is < 65536, inside the table.
        unsafe {
            let o = self.out.add((e / NR) * self.ldo + e % NR).cast::<u16>();
            let (i0, i1) = (*self.idx.get_unchecked(e) as usize, *self.idx.get_unchecked(e + 1) as usize);
            *o = *self.table.add(i0);
            *o.add(1) = *self.table.add(i1);
        }
    }

    /// Does the pending lookups (after a work item's last tile).
    pub(super) fn flush(&mut self) {
        for e in (0..self.n).step_by(2) {
            // SAFETY: e + 1 < n = MR·NR (even); the tile's contract, which holds until this flush.
            unsafe { self.pair(e) };
        }
        self.n = 0;
    }
}

/// [`products`] with `d`'s pending lookups done two per k step (the rest after the loop).
///
/// # Safety
/// As [`products`]; `d`'s tile contract.
#[inline(always)]
unsafe fn products_deferring<const S: usize>(a: &[u32], b: &[u32], kc: usize, d: &mut Deferred) -> ([__m512; MR], [__m512; MR]) {
    let (n, mut e) = (d.n, 0);
    let step = || {
        if e < n {
            // SAFETY: e + 1 < n (n even); the caller's contract for `d`'s tile.
            unsafe { d.pair(e) };
            e += 2;
        }
    };
    // SAFETY: the caller's.
    let c = unsafe { products_with::<S>(a, b, kc, step) };
    while e < n {
        // SAFETY: as above.
        unsafe { d.pair(e) };
        e += 2;
    }
    d.n = 0;
    c
}

/// The epilogue rows of [`kernel_bf16`] (`act_simd::epi_bf16::<ACT, ROUND>` per vector).
///
/// # Safety
/// As [`kernel_bf16`].
#[inline(always)]
unsafe fn rows_bf16<const ACT: u8, const ROUND: bool>(c0: &[__m512; MR], c1: &[__m512; MR], t: &Bf16Tile) {
    let (m0, m1) = (mask16(t.cols), mask16(t.cols.saturating_sub(16)));
    // SAFETY: `bias` has at least `cols` elements; masked-off lanes are not read. Rows ≥ rows
    // store nothing (mask 0; `wrapping_add` keeps their pointer defined); the others write
    // columns < cols of their row, the caller's. The caller's features.
    unsafe {
        let (bias0, bias1) = match t.bias {
            Some(bias) => (_mm512_maskz_loadu_ps(m0, bias.as_ptr()), _mm512_maskz_loadu_ps(m1, bias.as_ptr().wrapping_add(16))),
            None => (_mm512_setzero_ps(), _mm512_setzero_ps()),
        };
        // the activation of a rounded pre-activation as a lookup (`act_simd::bf16_table`)
        let table = match (ACT, ROUND) {
            (1, true) => bf16_table(QuickGelu).as_ptr(),
            (2, true) => bf16_table(Gelu).as_ptr(),
            _ => core::ptr::null(),
        };
        for r in 0..MR {
            let (k0, k1) = if r < t.rows { (m0, m1) } else { (0, 0) };
            let o = t.out.wrapping_add(t.off + r * t.ldo);
            let y0 = epi_bf16::<ACT, ROUND>(_mm512_add_ps(c0[r], bias0), table);
            let y1 = epi_bf16::<ACT, ROUND>(_mm512_add_ps(c1[r], bias1), table);
            _mm256_mask_storeu_epi16(o.cast(), k0, y0);
            _mm256_mask_storeu_epi16(o.wrapping_add(16).cast(), k1, y1);
        }
    }
}

/// bf16 GEMM through f32 FMAs (AVX-512F), for CPUs whose `vdpbf16ps` is no faster than two FMAs
/// (Intel's AVX512-BF16 parts run it on one port, the FMAs on two): A comes widened (bf16-rounded
/// values as f32, `[MR][2·KC]`), B as bf16 pairs widened in registers (lo by a shift, hi by a mask).
/// Each bf16×bf16 product is exact in f32, so this computes the same sums as `vdpbf16ps` up to
/// the accumulation order (and keeps denormals).
///
/// # Safety
/// Requires avx512f; `a.len() >= MR·2·KC`, `b.len() >= kc·NR`; the tile contract of [`Tile::store`].
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn kernel_fma(a: &[f32], b: &[u32], kc: usize, t: &Tile) {
    assert!(kc <= KC && a.len() >= MR * 2 * KC && b.len() >= kc * NR);
    let mut c0 = [_mm512_setzero_ps(); MR];
    let mut c1 = [_mm512_setzero_ps(); MR];
    let (mut ap, mut bp) = (a.as_ptr(), b.as_ptr());
    let hi_mask = _mm512_set1_epi32(0xffff_0000u32 as i32);
    // SAFETY: the loop reads a[r·2KC + 2p + {0,1}] (r < MR) and b[p·NR .. p·NR+NR] for p < kc,
    // all inside the slices (asserted above).
    unsafe {
        for _ in 0..kc {
            let (r0, r1) = (_mm512_loadu_si512(bp.cast()), _mm512_loadu_si512(bp.add(16).cast()));
            let (lo0, lo1) = (_mm512_castsi512_ps(_mm512_slli_epi32::<16>(r0)), _mm512_castsi512_ps(_mm512_slli_epi32::<16>(r1)));
            for r in 0..MR {
                let av = _mm512_set1_ps(*ap.add(r * 2 * KC));
                c0[r] = _mm512_fmadd_ps(av, lo0, c0[r]);
                c1[r] = _mm512_fmadd_ps(av, lo1, c1[r]);
            }
            let (hi0, hi1) = (_mm512_castsi512_ps(_mm512_and_si512(r0, hi_mask)), _mm512_castsi512_ps(_mm512_and_si512(r1, hi_mask)));
            for r in 0..MR {
                let av = _mm512_set1_ps(*ap.add(r * 2 * KC + 1));
                c0[r] = _mm512_fmadd_ps(av, hi0, c0[r]);
                c1[r] = _mm512_fmadd_ps(av, hi1, c1[r]);
            }
            ap = ap.add(2);
            bp = bp.add(NR);
        }
        store(&c0, &c1, t)
    }
}

/// Writes the 14×32 register tile `acc (+ bias | + c) (+ res)` to the valid part of the tile.
///
/// # Safety
/// Requires avx512f; the tile contract of [`Tile::store`].
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn store(c0: &[__m512; MR], c1: &[__m512; MR], t: &Tile) {
    let (m0, m1) = (mask16(t.cols), mask16(t.cols.saturating_sub(16)));
    let (bias0, bias1) = match t.bias {
        // SAFETY: `bias` has at least `cols` elements; masked-off lanes are not read.
        Some(bias) => unsafe {
            let p = bias.as_ptr();
            (_mm512_maskz_loadu_ps(m0, p), _mm512_maskz_loadu_ps(m1, p.wrapping_add(16)))
        },
        None => (_mm512_setzero_ps(), _mm512_setzero_ps()),
    };
    for r in 0..MR {
        if r >= t.rows {
            break;
        }
        // SAFETY: per the tile contract, columns 0..cols of row r are in bounds and
        // exclusive; masked lanes (>= cols) are neither read nor written.
        unsafe {
            let cr = t.c.add(t.off + r * t.ldc);
            let cr1 = cr.wrapping_add(16);
            let (mut v0, mut v1) = (_mm512_add_ps(c0[r], bias0), _mm512_add_ps(c1[r], bias1));
            if t.accumulate {
                v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, cr));
                v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, cr1));
            }
            if !t.res.is_null() {
                // the residual, indexed like C (the same contract)
                let rr = t.res.add(t.off + r * t.ldc);
                v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, rr));
                v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, rr.wrapping_add(16)));
            }
            _mm512_mask_storeu_ps(cr, m0, v0);
            _mm512_mask_storeu_ps(cr1, m1, v1);
        }
    }
}
