//! Fused epilogues of the bf16 GEMM (`gemm_bf16`, every kernel path: AMX and its software model,
//! AVX512-BF16, AVX-512F FMAs, portable) and of the f32 GEMM (`gemm_f32::gemm_fused`, the f32
//! towers' Linears): what a Linear does to its output after x·Wᵀ + bias,
//! applied per finished C tile (after the last kc-block, while the tile is still in L1) instead
//! of as separate passes over [m×n]:
//! - [`Epilogue::Act`]: the MLP's first Linear: the pre-activation rounded to bf16 (the 16-bit
//!   towers' rounding point; not in f32 towers), then QuickGELU/GELU in f32 (`act_simd`, as
//!   `elementwise::unary`, so fused and unfused are bit-identical), written in place, to a second
//!   f32 buffer (C keeps the pre-activation for the backward), or rounded to bf16 (the
//!   next GEMM's input, which it would round to the same values).
//! - [`Epilogue::Add`]: the residual add res + (x·Wᵀ + bias).
//! - [`Epilogue::Bf16`]: x·Wᵀ + bias narrowed to bf16 into a second buffer (the attention's q, k
//!   and v of a 16-bit tower: no f32 [m×n] pass after the GEMM to narrow them).
//!
//! When only the epilogue's output is wanted (an activation or bf16 output, no C), the bf16 GEMM
//! keeps each C tile in a per-thread buffer and applies the epilogue from there
//! (`EpiRun::apply_from`): no [m×n] f32 array goes to memory. On the `vdpbf16ps` kernel a
//! bf16-only output skips even that tile: the kernel applies the epilogue to its accumulators
//! (`EpiRun::bf16_out`, `gemm_bf16_avx512::kernel_bf16`; bf16 images 1.025×, texts 1.03×, Zen 4).
use super::act_simd::{act_row, to_bf16_into, ActDst};
use super::elementwise::Unary;
use half::bf16;

/// Where [`Epilogue::Act`] writes act(pre) ([m×n], the layout of C).
pub enum ActOut<'a> {
    /// Over the pre-activation in C.
    InPlace,
    /// To this buffer; C keeps the (rounded) pre-activation.
    F32(&'a mut [f32]),
    /// Rounded to bf16 into this buffer; C keeps the (rounded) pre-activation.
    Bf16(&'a mut [bf16]),
}

/// What the bf16 GEMM does to each finished element of C = a·Wᵀ + bias.
pub enum Epilogue<'a> {
    /// Nothing.
    None,
    /// `op` (QuickGelu or Gelu) of the pre-activation, rounded to bf16 first when `round_pre`.
    Act { op: Unary, round_pre: bool, out: ActOut<'a> },
    /// C = res + C (`res`: [m×n]).
    Add { res: &'a [f32] },
    /// `out` = bf16(C) (RNE, `half::bf16::from_f32`'s bits); C keeps the f32 values.
    Bf16 { out: &'a mut [bf16] },
}

impl Epilogue<'_> {
    /// Panics unless the buffers hold `len` elements (m·n) and the activation is one of the two.
    pub(crate) fn check(&self, len: usize) {
        match self {
            Epilogue::None => {}
            Epilogue::Act { op, out, .. } => {
                assert!(matches!(op, Unary::QuickGelu | Unary::Gelu), "epilogue activation must be QuickGelu or Gelu");
                match out {
                    ActOut::InPlace => {}
                    ActOut::F32(o) => assert_eq!(o.len(), len, "activation output must be m*n"),
                    ActOut::Bf16(o) => assert_eq!(o.len(), len, "activation output must be m*n"),
                }
            }
            Epilogue::Add { res } => assert_eq!(res.len(), len, "residual must be m*n"),
            Epilogue::Bf16 { out } => assert_eq!(out.len(), len, "bf16 output must be m*n"),
        }
    }

    /// Whether the result goes to a buffer of its own (an activation or bf16 output), so that
    /// the GEMM's C is only scratch (`gemm_bf16` may then keep C in per-thread tiles).
    pub(crate) fn has_output(&self) -> bool {
        matches!(self, Epilogue::Act { out: ActOut::F32(_) | ActOut::Bf16(_), .. } | Epilogue::Bf16 { .. })
    }

    /// The thread-shareable form (raw output pointers; the GEMM's work items write disjoint tiles).
    pub(crate) fn run(&mut self) -> EpiRun {
        match self {
            Epilogue::None => EpiRun::None,
            Epilogue::Act { op, round_pre, out } => {
                let out = match out {
                    ActOut::InPlace => Out::InPlace,
                    ActOut::F32(o) => Out::F32(o.as_mut_ptr()),
                    ActOut::Bf16(o) => Out::Bf16(o.as_mut_ptr()),
                };
                EpiRun::Act { op: *op, round: *round_pre, out }
            }
            Epilogue::Add { res } => EpiRun::Add(res.as_ptr()),
            Epilogue::Bf16 { out } => EpiRun::Bf16(out.as_mut_ptr()),
        }
    }
}

#[derive(Clone, Copy)]
pub(crate) enum Out {
    InPlace,
    F32(*mut f32),
    Bf16(*mut bf16),
}

/// [`Epilogue`] with its buffers as pointers, applied by [`EpiRun::apply`].
#[derive(Clone, Copy)]
pub(crate) enum EpiRun {
    None,
    Act { op: Unary, round: bool, out: Out },
    Add(*const f32),
    Bf16(*mut bf16),
}
// SAFETY: the pointers come from slices borrowed for the whole GEMM call (`Epilogue::run`'s
// caller holds them); `res` is only read, and every output element is written by the one work
// item that owns its C tile.
unsafe impl Send for EpiRun {}
// SAFETY: as above.
unsafe impl Sync for EpiRun {}

impl EpiRun {
    /// Applies the epilogue to rows × cols of C at `c + off` (row stride `ldc`); the other
    /// buffers are indexed like C.
    ///
    /// # Safety
    /// That rectangle (and the same elements of the output buffer) is in bounds and touched by no
    /// other thread; the buffers of [`Epilogue::run`] are still borrowed.
    #[inline]
    pub(crate) unsafe fn apply(self, c: *mut f32, off: usize, ldc: usize, rows: usize, cols: usize) {
        // SAFETY: the caller's contract.
        unsafe { self.apply_from(c.add(off), ldc, off, ldc, rows, cols) }
    }

    /// [`EpiRun::apply`] with C elsewhere than the outputs' layout: C's rows at `c + r·c_ld`
    /// (a per-thread tile), the outputs' at `off + r·ldc`.
    ///
    /// # Safety
    /// Those C rows (`cols` values each) and the outputs' rectangle are in bounds and touched by
    /// no other thread; the buffers of [`Epilogue::run`] are still borrowed.
    #[inline]
    pub(crate) unsafe fn apply_from(self, c: *mut f32, c_ld: usize, off: usize, ldc: usize, rows: usize, cols: usize) {
        for r in 0..rows {
            let o = off + r * ldc;
            // SAFETY: the caller's contract.
            let row = unsafe { std::slice::from_raw_parts_mut(c.add(r * c_ld), cols) };
            match self {
                EpiRun::None => return,
                // SAFETY: `res` is m·n long and o + cols ≤ m·n (the caller's contract).
                EpiRun::Add(res) => unsafe { add_row(row, std::slice::from_raw_parts(res.add(o), cols)) },
                // SAFETY: the output buffer is m·n long, this row segment is the caller's alone.
                EpiRun::Bf16(out) => to_bf16_into(row, unsafe { std::slice::from_raw_parts_mut(out.add(o), cols) }),
                EpiRun::Act { op: act, round, out } => {
                    // SAFETY (both): the output buffer is m·n long, this row segment is the caller's alone.
                    let dst = match out {
                        Out::InPlace => ActDst::InPlace,
                        Out::F32(p) => ActDst::F32(unsafe { std::slice::from_raw_parts_mut(p.add(o), cols) }),
                        Out::Bf16(p) => ActDst::Bf16(unsafe { std::slice::from_raw_parts_mut(p.add(o), cols) }),
                    };
                    act_row(act, round, row, dst);
                }
            }
        }
    }

    /// [`Epilogue::Add`]'s residual, which a kernel's tile store may add itself (then the
    /// epilogue is not applied after it).
    pub(crate) fn residual(self) -> Option<*const f32> {
        match self {
            EpiRun::Add(res) => Some(res),
            _ => None,
        }
    }

    /// The bf16 output of an epilogue whose only output is bf16 ([`Epilogue::Bf16`], or
    /// [`Epilogue::Act`] to bf16), with its activation and pre-activation rounding: what a
    /// kernel may apply to a tile in registers (`gemm_bf16_avx512::kernel_bf16`).
    pub(crate) fn bf16_out(self) -> Option<(*mut bf16, Option<(Unary, bool)>)> {
        match self {
            EpiRun::Bf16(p) => Some((p, None)),
            EpiRun::Act { op, round, out: Out::Bf16(p) } => Some((p, Some((op, round)))),
            _ => None,
        }
    }

    /// Starts loading what [`EpiRun::apply`] will read from memory for this rectangle — the
    /// residual of [`Epilogue::Add`], which nothing has touched since the previous layer wrote it
    /// — so that the loads run while the tile's last kernel call computes (the add waited on
    /// them: 10–25 % of an out-projection's time at 2464×768×768, Intel Xeon, 2 threads).
    #[inline]
    pub(crate) fn prefetch(self, off: usize, ldc: usize, rows: usize, cols: usize) {
        #[cfg(target_arch = "x86_64")]
        if let EpiRun::Add(res) = self {
            for r in 0..rows {
                let row = res.wrapping_add(off + r * ldc);
                for c in (0..cols).step_by(16) {
                    // SAFETY: a prefetch never faults and has no effect besides caching (the
                    // address is inside `res` for the caller's rectangle anyway).
                    unsafe { core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(row.wrapping_add(c).cast()) };
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (self, off, ldc, rows, cols);
    }
}

/// x rounded to bf16 (RNE), as f32.
#[inline(always)]
pub fn round_bf16(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

fn add_row(row: &mut [f32], res: &[f32]) {
    row.iter_mut().zip(res).for_each(|(y, r)| *y += r); // = r + y (f32 addition commutes)
}
