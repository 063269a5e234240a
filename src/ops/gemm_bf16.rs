//! bf16 GEMM for `Linear` layers: `c[m×n] = a[m×k] · Wᵀ (+ bias)`, W stored `[n×k]`.
//!
//! Inputs are rounded to bf16 (round-to-nearest-even), products are accumulated in f32.
//!
//! # Data layout
//! Work happens on *k pairs*: `kp = ceil(k/2)`; one `u32` holds two bf16 values,
//! `lo = x[2p]`, `hi = x[2p+1]` (zero when `2p+1 == k`). This is the operand format
//! of `vdpbf16ps`, which computes `acc[j] += a.lo·b.lo[j] + a.hi·b.hi[j]` on 16 lanes.
//! * Weights ([`PackedBf16`], packed once at load time, 2 bytes per weight plus
//!   padding): `ceil(n/NR)` panels of `NR = 32` output columns; a panel is `[kp][NR]`
//!   u32, zero-padded past `n`, so any kc-block of a panel is one contiguous slice.
//! * Activations (f32 → bf16 RNE while packing, per work item; `gemm_bf16_a.rs`): `MR = 14`-row panels
//!   stored as `[kc-block][MR][KC]` u32: each row's pairs are contiguous with the
//!   fixed stride `KC` (`KC_WIDE` for a one-block depth above `KC`, below), so packing is a
//!   streaming conversion (no transpose) and the microkernel reads row `r` at the constant
//!   offset `r·KC` from a single pointer.
//!
//! # Blocking (BLIS style)
//! * Register tile `MR × NR = 14 × 32` f32: 28 zmm accumulators, 2 zmm for the current
//!   B row-pair, 1 broadcast register. Per k pair: 2 loads, 14 broadcasts, 28
//!   `vdpbf16ps` (64 flops each); the C tile is prefetched at kernel entry.
//! * kc-blocks: `kp` is split into near-equal blocks of at most `kc_max` pairs: 384 for the
//!   `vdpbf16ps` kernel (AMD: a 768-deep product is one block, so C is stored once, not
//!   stored, read back and stored again; measured on Zen 4 1.01–1.05× at the towers' shapes),
//!   256 for the others (Intel's f16 and FMA kernels, measured at 256: the B micro-panel,
//!   `kc × NR`, ≤ 32 KiB). A panel rows have the stride `KC = 384` either way. Except: on the
//!   `vdpbf16ps` kernel a depth of 385–512 pairs (k = 770–1024: ViT-L's width) is one block
//!   of up to `KC_WIDE = 512` pairs, A rows 512 apart, so C is stored once and a bf16-only
//!   epilogue stays in registers (ViT-L/14 bf16 images 1.09× on Zen 4 against two blocks of
//!   256; depths ≤ 384 keep the 384 stride). The first kc-block stores `acc + bias`, later
//!   ones `acc + c`.
//! * Work items (rayon): ~8 per thread. A row block of whole MR panels (sizes differ by
//!   at most one panel, ≤ 16 panels) × a column range (split only when m is too small
//!   to give every thread work). Each item writes a disjoint rectangle of C. An item
//!   packs its row block of A once (all k, per-thread reusable buffer, read from memory
//!   exactly once when the column range is all of n) and software-prefetches the next
//!   row block's A while computing. Loops: `for jc in NC=256-col chunks { for kc-block
//!   { for jr in NR panels { for ir in MR panels { kernel } } } }`: the C chunk stays in
//!   L2 across kc-blocks, the A row block in L2/L3.
//! * Edges: m via zero rows in the A panel (only valid rows are stored), n via zero
//!   weight columns and masked column stores, odd k via a zero `hi` half.
//! * Epilogue ([`matmul_bf16_fused`], `gemm_epilogue.rs`): after a tile's last kc-block,
//!   the activation (with the pre-activation's bf16 rounding) on the tile while it is in L1;
//!   the residual add in the tile store itself (`Tile::res`); on the `vdpbf16ps` kernel an
//!   output that is only bf16 (q/k/v, an activation) straight from the accumulators
//!   (`gemm_bf16_avx512::kernel_bf16`; a whole tile's activation-table lookups are done inside
//!   the next tile's k loop, `Deferred`). A may also be bf16 already ([`AElem`]): packed without
//!   rounding.
//!
//! # Dispatch
//! `cpu_path::selected()` picks, at run time: the AMX tile kernel (`gemm_amx.rs`, same packed
//! weights: panels are zero-padded to a multiple of 16 pairs, one tile's depth), else the
//! AVX512-BF16 microkernel (`gemm_bf16_avx512.rs`) where `vdpbf16ps` pays (AMD), else on Intel
//! the AVX512-FP16 kernel (`gemm_bf16_fp16.rs`: the bf16 inputs scaled into f16, f16 partial sums
//! of 128 products, f32 totals; its f16 twin of the weights is built on first use) or the f32-FMA
//! kernel on bf16 inputs, else a portable f32 microkernel on the same packed data
//! (`gemm_bf16_portable.rs`: bf16 → f32 by shifting; AVX2+FMA build when available);
//! `CLIPFORGE_CPU_GEMM` caps it. Note that `tdpbf16ps`/`vdpbf16ps`/`vcvtne2ps2bf16` treat f32/bf16
//! denormals as zero; the portable path keeps them. NaN/Inf propagate in every path.

use super::cpu_path::{self, GemmPath};
use super::gemm_bf16_a::pack_a;
pub use super::gemm_bf16_a::{AElem, Row};
#[cfg(target_arch = "x86_64")]
pub(crate) use super::gemm_bf16_pack::Fp16Copy;
pub use super::gemm_bf16_pack::PackedBf16;
pub(crate) use super::gemm_bf16_pack::WView;
use super::gemm_bf16_portable::kernel_portable;
pub(super) use super::gemm_bf16_portable::Tile;
use super::gemm_epilogue::{EpiRun, Epilogue};
use half::bf16;
use rayon::prelude::*;
use std::sync::OnceLock;

pub(super) const NR: usize = 32;
pub(super) const MR: usize = 14;
pub(super) const KC: usize = 384; // max k pairs per kc-block (768 k values): A panel rows' stride
/// The `vdpbf16ps` kernel's one block for depths of `KC`+1 ..= `KC_WIDE` pairs (its A rows' stride
/// then; see the file header).
pub(super) const KC_WIDE: usize = 512;
/// The kc-block limit of the other kernels (see the file header).
const KC_NARROW: usize = 256;

/// The largest kc-block (k pairs) a depth of `kp` pairs is split into: for `vdpbf16ps` (`simd`)
/// all of it up to [`KC_WIDE`], else blocks of [`KC`]; [`KC_NARROW`] for the other kernels.
fn kc_max(simd: bool, kp: usize) -> usize {
    match simd {
        true if kp > KC && kp <= KC_WIDE => KC_WIDE,
        true => KC,
        false => KC_NARROW,
    }
}
const NC: usize = NR * 8; // columns per jc chunk inside a work item

/// Runtime detection of the AVX512-BF16 kernel (x86-64 only); read once (the bf16 attention
/// asks per GEMM call: 0.8 % of it with the four feature tests each time).
pub fn has_avx512_bf16() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        return is_x86_feature_detected!("avx512bf16")
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl");
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

/// `c[m×n]` (row-major, fully overwritten) = `a[m×k]` (row-major f32) · Wᵀ (+ `bias[n]`).
/// Multithreaded with rayon (runs on the current rayon pool).
pub fn matmul_bf16(a: &[f32], m: usize, w: &PackedBf16, bias: Option<&[f32]>, c: &mut [f32]) {
    matmul_bf16_forced(a, m, w, bias, c, Kernel::Auto)
}

/// Kernel selection for [`matmul_bf16_forced`] (tests and comparisons).
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// The path of [`cpu_path::selected`] (what [`matmul_bf16`] does).
    Auto,
    /// The AMX tile kernel (`gemm_amx`). Falls back to [`Kernel::Auto`] without AMX.
    Amx,
    /// The AMX kernel's blocking, packing and edges on the software model of the tile unit.
    AmxSoft,
    /// The AVX512-BF16 kernel. Falls back to [`Kernel::Portable`] without it.
    Avx512Bf16,
    /// bf16 inputs through AVX-512F f32 FMAs (faster than `vdpbf16ps` on Intel without AMX).
    /// Falls back to [`Kernel::Portable`] without AVX-512F.
    Avx512Fma,
    /// bf16 inputs as scaled f16 through AVX512-FP16 multiply-adds (`gemm_bf16_fp16.rs`; Intel
    /// without AMX). Falls back to [`Kernel::Avx512Fma`] without AVX512-FP16 or for a weight
    /// without an f16 twin (one that is not finite, or a view packed by the caller).
    Avx512Fp16,
    /// Portable kernel (its AVX2+FMA build where available).
    Portable,
    /// Portable kernel, baseline build (no AVX2/FMA).
    PortableBaseline,
}

/// [`matmul_bf16`] with an explicit kernel choice.
#[doc(hidden)]
pub fn matmul_bf16_forced(a: &[f32], m: usize, w: &PackedBf16, bias: Option<&[f32]>, c: &mut [f32], kernel: Kernel) {
    gemm(a, m, w.view_for(kernel), bias, c, kernel, false, EpiRun::None, true)
}

/// `c[m×n] = epi(a[m×k] · Wᵀ + bias)`: the GEMM with a fused epilogue (applied to each finished C
/// tile), A in f32 (rounded to bf16 while packing) or already bf16 (packed as it is).
///
/// `c` may be empty when the epilogue writes an output of its own ([`Epilogue::Act`] to f32 or
/// bf16, [`Epilogue::Bf16`]) and C is not wanted: then each C tile lives in a per-thread 14×32
/// buffer while its epilogue runs (no [m×n] f32 array written to memory and read for ownership
/// first: 4 bytes of traffic each way per output), or, where C must persist between kc-blocks
/// (k above one block; not on the AMX path), in a per-thread scratch array reused across calls.
pub fn matmul_bf16_fused<T: AElem>(a: &[T], m: usize, w: &PackedBf16, bias: Option<&[f32]>, c: &mut [f32], mut epi: Epilogue, kernel: Kernel) {
    let (n, view) = (w.n(), w.view_for(kernel));
    if c.is_empty() && m * n > 0 {
        assert!(epi.has_output(), "matmul_bf16_fused: no C and no epilogue output");
        epi.check(m * n);
        if !tiles_suffice(view.kp, kernel) {
            let mut scratch = C_SCRATCH.with_borrow_mut(std::mem::take);
            scratch.resize(m * n, 0.0);
            gemm(a, m, view, bias, &mut scratch, kernel, false, epi.run(), true);
            return C_SCRATCH.with_borrow_mut(|s| *s = scratch);
        }
        return gemm(a, m, view, bias, &mut [], kernel, false, epi.run(), true);
    }
    epi.check(c.len());
    gemm(a, m, view, bias, c, kernel, false, epi.run(), true)
}

/// Whether a GEMM of `kp` pairs on `kernel` finishes each C tile in one kernel call (one
/// kc-block; AMX always: its tiles hold C over the whole depth), so that C can live in
/// per-thread tiles.
fn tiles_suffice(kp: usize, kernel: Kernel) -> bool {
    let kernel = resolve(kernel);
    matches!(kernel, Kernel::Amx | Kernel::AmxSoft) || kp <= kc_max(runs_vdp(kernel), kp)
}

/// Whether the resolved `kernel` runs the `vdpbf16ps` microkernel here (its kc-blocks:
/// [`kc_max`]).
pub(super) fn runs_vdp(kernel: Kernel) -> bool {
    kernel == Kernel::Avx512Bf16 && has_avx512_bf16()
}

thread_local! {
    /// The [m×n] C of a fused GEMM whose caller wants only the epilogue's output but whose
    /// tiles span several kc-blocks ([`matmul_bf16_fused`] with an empty C).
    static C_SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `c[m×n] = a[m×k] · Wᵀ` on the calling thread (one work item: no rayon), for callers that are
/// already parallel over many small products (attention's per-head GEMMs).
pub(super) fn matmul_bf16_seq<T: AElem>(a: &[T], m: usize, w: WView, c: &mut [f32], kernel: Kernel) {
    gemm(a, m, w, None, c, kernel, false, EpiRun::None, false)
}

/// `c[m×n] += a[m×k] · Wᵀ` (the backward passes' accumulation into an existing gradient).
pub fn matmul_bf16_acc(a: &[f32], m: usize, w: &PackedBf16, c: &mut [f32], kernel: Kernel) {
    gemm(a, m, w.view_for(kernel), None, c, kernel, true, EpiRun::None, true)
}

/// The kernel that `kernel` runs on this CPU now: [`Kernel::Auto`] by `cpu_path::selected()`,
/// [`Kernel::Amx`] without AMX as `Auto`, [`Kernel::Avx512Fp16`] without AVX512-FP16 as
/// [`Kernel::Avx512Fma`]; the others as they are (each falls back inside). Public for tests and
/// benchmarks (on Intel without AMX, `Auto` is `Avx512Fp16`, whose tolerance then applies).
#[doc(hidden)]
pub fn resolve(kernel: Kernel) -> Kernel {
    match kernel {
        Kernel::Auto => match cpu_path::selected() {
            GemmPath::Amx => Kernel::Amx,
            GemmPath::Avx512Bf16 if cpu_path::bf16_dot_pays() => Kernel::Avx512Bf16,
            GemmPath::Avx512Bf16 if has_fp16() => Kernel::Avx512Fp16,
            GemmPath::Avx512Bf16 | GemmPath::Avx512 => Kernel::Avx512Fma,
            GemmPath::Scalar => Kernel::PortableBaseline,
        },
        Kernel::Amx if cpu_path::usable() < GemmPath::Amx => resolve(Kernel::Auto),
        Kernel::Avx512Fp16 if !has_fp16() => Kernel::Avx512Fma,
        other => other,
    }
}

/// Whether the AVX512-FP16 kernel can run here.
fn has_fp16() -> bool {
    #[cfg(target_arch = "x86_64")]
    return super::gemm_bf16_fp16::has_avx512_fp16();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether `kernel` (resolved) converts f32 to bf16 with `vcvtne2ps2bf16` (denormals to zero, as
/// its products read them anyway) rather than in software: AMX and `vdpbf16ps`, where detected.
pub(super) fn converts_in_simd(kernel: Kernel) -> bool {
    matches!(kernel, Kernel::Amx | Kernel::AmxSoft | Kernel::Avx512Bf16) && has_avx512_bf16()
}

/// The GEMM; `acc`: add to c instead of overwriting it (no bias, no epilogue then); `par`: work
/// items on the rayon pool (else one item, on this thread).
#[allow(clippy::too_many_arguments)]
fn gemm<T: AElem>(a: &[T], m: usize, w: WView, bias: Option<&[f32]>, c: &mut [f32], kernel: Kernel, acc: bool, epi: EpiRun, par: bool) {
    let (n, k, kp) = (w.n, w.k, w.kp);
    assert!(!acc || (bias.is_none() && matches!(epi, EpiRun::None)), "accumulating GEMM takes no bias or epilogue");
    assert_eq!(a.len(), m * k, "a must be m*k");
    // an empty C: per-thread C tiles (`matmul_bf16_fused`: one kc-block, an epilogue output)
    let local = c.is_empty() && m * n > 0;
    assert!(c.len() == m * n || local, "c must be m*n");
    assert!(!local || (!acc && tiles_suffice(kp, kernel)), "per-thread C tiles need one kc-block and no accumulation");
    if let Some(b) = bias {
        assert_eq!(b.len(), n, "bias must be n");
    }
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 && !acc {
        if local {
            let mut row = vec![0.0; n]; // C's row: the bias (or 0), refilled per row
            for r in 0..m {
                match bias {
                    Some(b) => row.copy_from_slice(b),
                    None => row.fill(0.0),
                }
                // SAFETY: `row` is n values; the epilogue's buffers are m·n (row r is in them).
                unsafe { epi.apply_from(row.as_mut_ptr(), n, r * n, n, 1, n) };
            }
            return;
        }
        for row in c.chunks_mut(n) {
            match bias {
                Some(b) => row.copy_from_slice(b),
                None => row.fill(0.0),
            }
        }
        // SAFETY: all of C (m×n, ldc n), borrowed mutably here; the epilogue's buffers are m·n.
        unsafe { epi.apply(c.as_mut_ptr(), 0, n, m, n) };
        return;
    }
    if k == 0 {
        return;
    }
    let have_simd = has_avx512_bf16();
    let kernel = resolve(kernel);
    match kernel {
        // SAFETY: AMX was detected and its permission granted (cpu_path::detected), or a test
        // declared the tile instructions emulated (cpu_path::assume_amx_emulated).
        #[cfg(target_arch = "x86_64")]
        Kernel::Amx => return unsafe { super::gemm_amx::matmul_amx::<super::gemm_amx::HwTiles, T>(a, m, w, bias, c, have_simd, acc, epi, par) },
        // SAFETY: the software model has no hardware requirement.
        Kernel::AmxSoft => return unsafe { super::gemm_amx::matmul_amx::<super::gemm_amx::SoftTiles, T>(a, m, w, bias, c, have_simd, acc, epi, par) },
        _ => {}
    }
    let simd = runs_vdp(kernel);
    // the f16 twin's panels and exponent when the AVX512-FP16 kernel runs (else its fallback, FMA)
    let fp16 = w.fp16.filter(|_| kernel == Kernel::Avx512Fp16);
    let fma = matches!(kernel, Kernel::Avx512Fma | Kernel::Avx512Fp16) && super::gemm_f32::available();
    let avx2 = kernel != Kernel::PortableBaseline;

    // Work split: `mblk` row blocks (whole MR panels, sizes differ by <= 1 panel) ×
    // `nsplit` column ranges (whole NR panels), about ITEMS_PER_THREAD items per thread.
    let (mpan, npan) = (m.div_ceil(MR), n.div_ceil(NR));
    let target = if par { ITEMS_PER_THREAD * rayon::current_num_threads().max(1) } else { 1 };
    let mblk = mpan.min(target).max(mpan.div_ceil(MAX_BLOCK_PANELS));
    let nsplit = (target / mblk).clamp(1, npan);
    let cptr = super::fastmath::SharedMut::new(c); // items write disjoint rectangles of C
    let item = |item: usize| {
        let (ib, js) = (item / nsplit, item % nsplit);
        let (p0, p1) = (ib * mpan / mblk, (ib + 1) * mpan / mblk);
        let (j0, j1) = (js * npan / nsplit * NR, ((js + 1) * npan / nsplit * NR).min(n));
        // AVX512-FP16: this row block's scale exponent (None when it holds a non-finite value:
        // then the FMA kernel), the f16 panels and the descale 2^-(s + t)
        #[cfg(target_arch = "x86_64")]
        let f16 = fp16.and_then(|(data, t)| {
            let s = super::gemm_bf16_fp16::a_exp(super::gemm_bf16_fp16::abs_max(&a[p0 * MR * k..(p1 * MR).min(m) * k]))?;
            Some((data, s, super::gemm_bf16_fp16::descale(s + t)))
        });
        #[cfg(not(target_arch = "x86_64"))]
        let f16: Option<(&[u32], i32, f32)> = fp16.and(None);
        let (simd, fma) = if f16.is_some() { (false, false) } else { (simd, fma) };
        let nkb = kp.div_ceil(kc_max(simd, kp));
        // A panel row stride (u32 pairs, or f32 values): KC, or KC_WIDE for vdpbf16ps's wide block
        let astride = if fma { 2 * KC } else { kc_max(simd, kp).max(KC) };
        let bdata = f16.map_or(w.data, |(d, ..)| d);
        // `Epilogue::Add`'s residual: added by the tile stores (every kernel here; AMX applies `epi`)
        let res = epi.residual();
        // C in per-thread tiles, the vdpbf16ps kernel and a bf16-only epilogue: the epilogue
        // from the accumulators (`kernel_bf16`), no C tile at all
        #[cfg(target_arch = "x86_64")]
        let regs_out = epi.bf16_out().filter(|_| local && simd && nkb == 1 && super::act_simd::bf16_insn());
        // C of one tile when C is not wanted (`local`)
        let mut tile = [0f32; MR * NR];
        // `kernel_bf16`'s activation lookups left by one tile for the next (flushed at the end)
        #[cfg(target_arch = "x86_64")]
        let mut deferred = super::gemm_bf16_avx512::Deferred::new();
        ABUF.with_borrow_mut(|abuf| {
            // Pack this row block of A (all k) once; it is reused for every column.
            // (pack_a writes every value the kernels read: no zero-fill)
            let abuf = super::fastmath::scratch(abuf, (p1 - p0) * nkb * MR * astride);
            for (i, dst) in abuf.chunks_exact_mut(MR * astride).enumerate() {
                let (pi, kb) = (i / nkb, i % nkb);
                let (pc, pc1) = (kb * kp / nkb, (kb + 1) * kp / nkb);
                let r0 = (p0 + pi) * MR;
                let rows = &a[r0 * k..(r0 + MR).min(m) * k];
                pack_a(rows, k, pc, pc1 - pc, dst, simd, fma, f16.map(|(_, s, _)| s));
            }
            // Prefetch the next row block's A (usually this thread's next item), spread
            // over the jr iterations, so its DRAM reads overlap with compute.
            let next = if nsplit == 1 && ib + 1 < mblk {
                let p2 = (ib + 2) * mpan / mblk;
                &a[p1 * MR * k..(p2 * MR).min(m) * k]
            } else {
                &[]
            };
            let iters = (j1 - j0).div_ceil(NR) * nkb;
            let line = 64 / std::mem::size_of::<T>(); // elements per cache line
            let per_iter = next.len().div_ceil(line * iters) * line;
            let mut pf = next.chunks(per_iter.max(line));
            for jc in (j0..j1).step_by(NC) {
                for kb in 0..nkb {
                    // Balanced kc-blocks: nkb near-equal blocks of at most kc_max pairs.
                    let (pc, kc) = (kb * kp / nkb, (kb + 1) * kp / nkb - kb * kp / nkb);
                    for jr in (jc..j1.min(jc + NC)).step_by(NR) {
                        super::fastmath::prefetch_l2(pf.next().unwrap_or(&[]));
                        let b = &bdata[(jr / NR) * w.kps * NR + pc * NR..][..kc * NR];
                        let bias_j = bias.filter(|_| pc == 0).map(|b| &b[jr..]);
                        for pi in 0..p1 - p0 {
                            let a = &abuf[(pi * nkb + kb) * MR * astride..][..MR * astride];
                            let ir = (p0 + pi) * MR;
                            let (rows, cols) = (MR.min(m - ir), NR.min(n - jr));
                            #[cfg(target_arch = "x86_64")]
                            if let Some((out, act)) = regs_out {
                                let t = super::gemm_bf16_avx512::Bf16Tile { out, off: ir * n + jr, ldo: n, rows, cols, bias: bias_j, act };
                                // SAFETY: the vdpbf16ps kernel and the narrowing's features were
                                // detected (`regs_out`); `a`/`b` as below; the epilogue's bf16
                                // output is m·n and rows ir.., cols jr.. are this item's alone.
                                unsafe { super::gemm_bf16_avx512::kernel_bf16(a, b, kc, &t, &mut deferred) };
                                continue;
                            }
                            if local {
                                let t = Tile { c: tile.as_mut_ptr(), off: 0, ldc: NR, rows, cols, bias: bias_j, accumulate: false, res: std::ptr::null() };
                                // SAFETY: `t` is this thread's 14×32 tile; `a`/`b` as below; the
                                // epilogue writes rows ir.., cols jr.. of its m·n outputs: this
                                // item's block alone.
                                unsafe {
                                    run_kernel(a, b, kc, &t, simd, fma, avx2, f16.map(|(.., ds)| ds));
                                    epi.apply_from(t.c, NR, ir * n + jr, n, rows, cols);
                                }
                                continue;
                            }
                            let res = res.filter(|_| kb + 1 == nkb).unwrap_or(std::ptr::null());
                            let t = Tile { c: cptr.get(), off: ir * n + jr, ldc: n, rows, cols, bias: bias_j, accumulate: acc || pc > 0, res };
                            if kb + 1 == nkb {
                                // the epilogue's reads from memory, under the last kernel call
                                epi.prefetch(t.off, t.ldc, t.rows, t.cols);
                            }
                            // SAFETY: `t` is rows ir..ir+rows, cols jr..jr+cols of C:
                            // inside the m×n buffer and inside this item's block (rows of
                            // panels p0..p1, cols j0..j1), which no other item touches.
                            // `a`/`b` hold MR·KC / kc·NR elements (slice-checked). The
                            // epilogue's buffers are m·n long (checked by its caller).
                            unsafe {
                                run_kernel(a, b, kc, &t, simd, fma, avx2, f16.map(|(.., ds)| ds));
                                if kb + 1 == nkb && res.is_null() {
                                    // The tile is final: the fused epilogue, while it is in L1.
                                    epi.apply(t.c, t.off, t.ldc, t.rows, t.cols);
                                }
                            }
                        }
                    }
                }
            }
        });
        #[cfg(target_arch = "x86_64")]
        deferred.flush(); // the item's last tile (its output is this item's alone)
    };
    if par {
        (0..mblk * nsplit).into_par_iter().for_each(item);
    } else {
        (0..mblk * nsplit).for_each(item);
    }
}

/// One microkernel call on the chosen path (`f16`: the AVX512-FP16 kernel with that descale).
///
/// # Safety
/// Same contract as [`Tile::store`]; the features of `simd` / `fma` / `avx2` / `f16` were detected.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
#[allow(clippy::too_many_arguments)]
unsafe fn run_kernel(a: &[u32], b: &[u32], kc: usize, t: &Tile, simd: bool, fma: bool, avx2: bool, f16: Option<f32>) {
    // SAFETY: forwarded from the caller.
    unsafe {
        #[cfg(target_arch = "x86_64")]
        if let Some(ds) = f16 {
            return super::gemm_bf16_fp16::kernel(a, b, kc, t, ds);
        }
        #[cfg(target_arch = "x86_64")]
        if simd {
            return super::gemm_bf16_avx512::kernel(a, b, kc, t);
        }
        #[cfg(target_arch = "x86_64")]
        if fma {
            return super::gemm_bf16_avx512::kernel_fma(bytemuck::cast_slice(a), b, kc, t);
        }
        kernel_portable(a, b, kc, t, avx2)
    }
}

/// Work items per rayon thread (load balance vs. per-item overhead).
const ITEMS_PER_THREAD: usize = 8;
/// Upper bound on MR panels in one row block.
const MAX_BLOCK_PANELS: usize = 16;
thread_local! {
    /// Per-thread packed A row block: `[panel][kc-block][MR][KC]` bf16 pairs.
    static ABUF: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Plain reference: inputs rounded to bf16 (RNE), f64 accumulation, naive loops.
pub fn matmul_bf16_reference(a: &[f32], m: usize, w_f32: &[f32], n: usize, k: usize, bias: Option<&[f32]>, c: &mut [f32]) {
    assert_eq!(a.len(), m * k);
    assert_eq!(w_f32.len(), n * k);
    assert_eq!(c.len(), m * n);
    let r = |x: f32| bf16::from_f32(x).to_f32() as f64;
    for i in 0..m {
        for j in 0..n {
            let mut s = 0f64;
            for kk in 0..k {
                s += r(a[i * k + kk]) * r(w_f32[j * k + kk]);
            }
            c[i * n + j] = (s + bias.map_or(0.0, |b| b[j] as f64)) as f32;
        }
    }
}
