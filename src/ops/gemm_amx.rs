//! AMX-BF16 GEMM for `Linear` layers: `c[m×n] = a[m×k] · Wᵀ (+ bias)` on Intel's tile unit,
//! with the same inputs, packed weights and result contract as `gemm_bf16` (which dispatches here).
//!
//! # Tiles
//! Palette 1, all eight tiles configured 16 rows × 64 bytes. A 32×32 block of C lives in four f32
//! tiles (tmm0..3) for the whole depth k; per 32 k values (16 pairs) it loads two A tiles (tmm4,5:
//! 16 rows × 16 bf16 pairs) and two B tiles (tmm6,7: 16 pair-rows × 16 columns, VNNI layout) and
//! issues four `tdpbf16ps`. There are no kc-blocks: the tiles are the accumulators, so a block of
//! C leaves them once, finished (no partial sums stored, read back and stored again); the A
//! panels and B panels of a work item stream from L2 (loop order: B panel, then A panel, then k).
//! * B is `PackedBf16`'s panel layout, `[kps][32]` u32 pairs per 32-column panel, whose pair
//!   count is padded with zeros to a multiple of 16: a B tile is 16 consecutive pair-rows (stride
//!   128 bytes), so the weights are packed once, at load time, with no AMX-specific copy.
//! * A is packed per work item (f32 → bf16 RNE) into `[32-row panel][k tile][32 rows][16 pairs]`:
//!   each A tile is 1 KiB contiguous (stride 64 bytes); rows past m and pairs past k are zero.
//! * C tiles are stored to a per-item 32×32 f32 scratch, then written to C with the bias (or
//!   added to C: `acc`), masked to m and n, and the epilogue applied there. Where the caller wants
//!   only the epilogue's output (C empty: q/k/v to bf16, fc1's activation), the bias and the
//!   epilogue go from the scratch straight to that output: no m×n f32 C at all.
//!
//! # Two implementations of the tile operations ([`TileOps`])
//! [`HwTiles`] issues the instructions (inline asm: the AMX intrinsics are unstable in Rust 1.95);
//! [`SoftTiles`] is a software model of the same instructions with the ISA's semantics, so the
//! blocking, packing and edge handling are tested on CPUs without AMX. [`HwTiles`] itself — the
//! instructions as compiled — runs on such CPUs too, under the trap-and-emulate unit of
//! tests/amx_trap/ (tests/gemm_amx_trap.rs: equal to the software model bit for bit). `tdpbf16ps` is modelled as
//! in the SDM pseudocode: `C[m][n] += A[m][2k]·B[k][2n]` then `+= A[m][2k+1]·B[k][2n+1]`, k
//! ascending, each step one fused multiply-add (the product of two bf16 is exact in f32 and not
//! rounded on its own; one RNE rounding per accumulation), bf16 input denormals read as zero
//! (DAZ) and f32 output denormals flushed to zero (FTZ), independent of MXCSR. The hardware's
//! internal summation order may differ; the tests hold both to the same per-element tolerance.
use super::gemm_bf16::{AElem, WView, NR};
use super::gemm_epilogue::{EpiRun, Out};
use rayon::prelude::*;

/// Rows of C per block (two tiles of 16).
const BM: usize = 32;
/// bf16 pairs per tile row (64 bytes).
const TK: usize = 16;
/// Upper bound on 32-row panels in one work item.
const MAX_BLOCK_PANELS: usize = 8;
/// Work items per rayon thread.
const ITEMS_PER_THREAD: usize = 8;

/// The AMX tile instructions this GEMM uses. `T`, `C`, `A`, `B` name tiles 0..8.
///
/// # Safety
/// Every method requires [`TileOps::configure`] first on this thread (and the AMX permission for
/// [`HwTiles`]); `load`/`store` read or write 16 rows of 64 bytes at `p + r·stride`.
pub trait TileOps: Default {
    /// `ldtilecfg`, palette 1: all 8 tiles 16 rows × 64 bytes.
    ///
    /// # Safety
    /// See [`TileOps`].
    unsafe fn configure(&mut self);
    /// `tilezero tmmT`.
    ///
    /// # Safety
    /// See [`TileOps`].
    unsafe fn zero<const T: u8>(&mut self);
    /// `tileloadd tmmT, [p + stride]`.
    ///
    /// # Safety
    /// See [`TileOps`].
    unsafe fn load<const T: u8>(&mut self, p: *const u8, stride: usize);
    /// `tdpbf16ps tmmC, tmmA, tmmB`.
    ///
    /// # Safety
    /// See [`TileOps`].
    unsafe fn dp<const C: u8, const A: u8, const B: u8>(&mut self);
    /// `tilestored [p + stride], tmmT`.
    ///
    /// # Safety
    /// See [`TileOps`].
    unsafe fn store<const T: u8>(&mut self, p: *mut u8, stride: usize);
    /// `tilerelease` (tile state back to its initial, unconfigured state).
    ///
    /// # Safety
    /// See [`TileOps`].
    unsafe fn release(&mut self);
}

/// The real instructions (x86-64 only; the caller checks AMX and the OS permission).
#[derive(Default)]
pub struct HwTiles;

#[repr(C, align(64))]
struct TileCfg([u8; 64]);

#[cfg(target_arch = "x86_64")]
impl TileOps for HwTiles {
    unsafe fn configure(&mut self) {
        let mut cfg = TileCfg([0; 64]);
        cfg.0[0] = 1; // palette 1; byte 1 start_row = 0
        for t in 0..8 {
            cfg.0[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes()); // colsb
            cfg.0[48 + t] = 16; // rows
        }
        // SAFETY: the caller guarantees AMX and its permission; cfg is 64 readable bytes.
        unsafe { std::arch::asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly)) };
    }
    unsafe fn zero<const T: u8>(&mut self) {
        // SAFETY: tiles configured (caller).
        unsafe { std::arch::asm!("tilezero tmm{t}", t = const T, options(nostack, nomem)) };
    }
    unsafe fn load<const T: u8>(&mut self, p: *const u8, stride: usize) {
        // SAFETY: caller: 16 rows of 64 bytes at p + r·stride are readable.
        unsafe { std::arch::asm!("tileloadd tmm{t}, [{p} + {s}*1]", t = const T, p = in(reg) p, s = in(reg) stride, options(nostack, readonly)) };
    }
    unsafe fn dp<const C: u8, const A: u8, const B: u8>(&mut self) {
        // SAFETY: tiles configured (caller).
        unsafe { std::arch::asm!("tdpbf16ps tmm{c}, tmm{a}, tmm{b}", c = const C, a = const A, b = const B, options(nostack, nomem)) };
    }
    unsafe fn store<const T: u8>(&mut self, p: *mut u8, stride: usize) {
        // SAFETY: caller: 16 rows of 64 bytes at p + r·stride are writable and exclusive.
        unsafe { std::arch::asm!("tilestored [{p} + {s}*1], tmm{t}", t = const T, p = in(reg) p, s = in(reg) stride, options(nostack)) };
    }
    unsafe fn release(&mut self) {
        // SAFETY: tilerelease is valid whenever AMX is enabled.
        unsafe { std::arch::asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// Software model of the tile unit (see the module docs for the `tdpbf16ps` semantics).
pub struct SoftTiles {
    /// Tile bytes, 16 rows × 64.
    t: [[[u8; 64]; 16]; 8],
    rows: [usize; 8],
    colsb: [usize; 8],
}

impl Default for SoftTiles {
    fn default() -> Self {
        SoftTiles { t: [[[0; 64]; 16]; 8], rows: [0; 8], colsb: [0; 8] }
    }
}

impl SoftTiles {
    fn f32_at(&self, t: usize, r: usize, c: usize) -> f32 {
        f32::from_le_bytes(self.t[t][r][4 * c..4 * c + 4].try_into().unwrap_or([0; 4]))
    }
    /// bf16 element `i` of row `r` of tile `t`, widened with denormals read as zero.
    fn bf16_daz(&self, t: usize, r: usize, i: usize) -> f32 {
        let b = u16::from_le_bytes([self.t[t][r][2 * i], self.t[t][r][2 * i + 1]]);
        let b = if b & 0x7f80 == 0 { b & 0x8000 } else { b };
        f32::from_bits((b as u32) << 16)
    }
}

/// Flush an f32 denormal to a zero of the same sign.
fn ftz(x: f32) -> f32 {
    if x.is_subnormal() {
        f32::from_bits(x.to_bits() & 0x8000_0000)
    } else {
        x
    }
}

impl TileOps for SoftTiles {
    unsafe fn configure(&mut self) {
        *self = SoftTiles { rows: [16; 8], colsb: [64; 8], ..SoftTiles::default() };
    }
    unsafe fn zero<const T: u8>(&mut self) {
        self.t[T as usize] = [[0; 64]; 16];
    }
    unsafe fn load<const T: u8>(&mut self, p: *const u8, stride: usize) {
        let t = T as usize;
        for r in 0..16 {
            let row = &mut self.t[t][r];
            *row = [0; 64];
            if r < self.rows[t] {
                // SAFETY: the caller guarantees colsb bytes at p + r·stride are readable.
                let src = unsafe { std::slice::from_raw_parts(p.add(r * stride), self.colsb[t]) };
                row[..src.len()].copy_from_slice(src);
            }
        }
    }
    unsafe fn dp<const C: u8, const A: u8, const B: u8>(&mut self) {
        let (c, a, b) = (C as usize, A as usize, B as usize);
        for m in 0..self.rows[c] {
            let mut tmp: Vec<f32> = (0..self.colsb[c] / 4).map(|n| self.f32_at(c, m, n)).collect();
            for k in 0..self.colsb[a] / 4 {
                let (a0, a1) = (self.bf16_daz(a, m, 2 * k), self.bf16_daz(a, m, 2 * k + 1));
                for (n, acc) in tmp.iter_mut().enumerate() {
                    *acc = ftz(a0.mul_add(self.bf16_daz(b, k, 2 * n), *acc));
                    *acc = ftz(a1.mul_add(self.bf16_daz(b, k, 2 * n + 1), *acc));
                }
            }
            let row = &mut self.t[c][m];
            *row = [0; 64];
            for (n, v) in tmp.iter().enumerate() {
                row[4 * n..4 * n + 4].copy_from_slice(&v.to_le_bytes());
            }
        }
        for m in self.rows[c]..16 {
            self.t[c][m] = [0; 64];
        }
    }
    unsafe fn store<const T: u8>(&mut self, p: *mut u8, stride: usize) {
        let t = T as usize;
        for r in 0..self.rows[t] {
            // SAFETY: the caller guarantees colsb bytes at p + r·stride are writable.
            let dst = unsafe { std::slice::from_raw_parts_mut(p.add(r * stride), self.colsb[t]) };
            dst.copy_from_slice(&self.t[t][r][..dst.len()]);
        }
    }
    unsafe fn release(&mut self) {
        *self = SoftTiles::default();
    }
}

thread_local! {
    /// Per-thread packed A row block (`[panel][k tile][32][16]` pairs).
    static ABUF: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `c = epi(a·Wᵀ (+ bias))` through the tile operations `O` (m, n, k ≥ 1; shapes checked by the
/// caller); `acc`: `c += a·Wᵀ` (no bias, no epilogue); `par`: work items on the rayon pool (else
/// one item on this thread). `simd`: AVX512-BF16 is available for the
/// f32 → bf16 conversion of A. The epilogue is applied to each 32×32 block of C as it leaves the
/// tiles; `c` empty: no C, the epilogue writes its own output from the per-thread block.
///
/// # Safety
/// For [`HwTiles`]: the CPU has AMX-BF16 and this process holds the tile-data permission. The
/// epilogue's buffers are m·n long and borrowed for the call.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul_amx<O: TileOps, T: AElem>(
    a: &[T],
    m: usize,
    w: WView,
    bias: Option<&[f32]>,
    c: &mut [f32],
    simd: bool,
    acc: bool,
    epi: EpiRun,
    par: bool,
) {
    let (n, k, kps) = (w.n, w.k, w.kps);
    let local = c.is_empty(); // C not wanted: only the epilogue's output
    assert!(a.len() == m * k && (c.len() == m * n || local) && kps % TK == 0 && m > 0 && n > 0 && k > 0, "matmul_amx: bad call");
    assert!(
        !local || (!acc && matches!(epi, EpiRun::Bf16(_) | EpiRun::Act { out: Out::F32(_) | Out::Bf16(_), .. })),
        "matmul_amx: no C needs an epilogue output and no accumulation"
    );
    let nkt = w.kp.div_ceil(TK); // k tiles (≤ kps / TK; a prefix view may use fewer)
    let (mpan, npan) = (m.div_ceil(BM), n.div_ceil(NR));
    let target = if par { ITEMS_PER_THREAD * rayon::current_num_threads().max(1) } else { 1 };
    let mblk = mpan.min(target).max(mpan.div_ceil(MAX_BLOCK_PANELS));
    let nsplit = (target / mblk).clamp(1, npan);
    let cptr = super::fastmath::SharedMut::new(c); // items write disjoint regions of C
    let wdata = w.data;
    let item = |item: usize| {
        let (ib, js) = (item / nsplit, item % nsplit);
        let (p0, p1) = (ib * mpan / mblk, (ib + 1) * mpan / mblk);
        let (j0, j1) = (js * npan / nsplit * NR, ((js + 1) * npan / nsplit * NR).min(n));
        ABUF.with_borrow_mut(|abuf| {
            // Pack A: panel pi, k tile t, row r → abuf[((pi·nkt + t)·BM + r)·TK ..][..TK].
            let abuf = super::fastmath::scratch(abuf, (p1 - p0) * nkt * BM * TK); // every value written below
            for (i, dst) in abuf.chunks_exact_mut(TK).enumerate() {
                let (r, t, pi) = (i % BM, i / BM % nkt, i / (BM * nkt));
                let row = (p0 + pi) * BM + r;
                let (k0, k1) = ((2 * TK * t).min(k), (2 * TK * (t + 1)).min(k));
                if row >= m || k0 == k1 {
                    dst.fill(0);
                    continue;
                }
                let used = (k1 - k0).div_ceil(2);
                T::pairs(&a[row * k + k0..row * k + k1], &mut dst[..used], simd);
                dst[used..].fill(0);
            }
            let mut tiles = O::default();
            let mut scratch = [[0f32; NR]; BM];
            // SAFETY: tile loads read 16 rows × 64 bytes: A tiles inside abuf (1 KiB each, in
            // bounds by construction), B tiles inside the panel's kps·NR pairs (t < nkt). Stores
            // write the 32×32 scratch (stride 128 bytes). C (by `write_c`) or, with no C, the
            // epilogue's outputs are written inside this item's rectangle only. AMX availability:
            // the caller's contract.
            unsafe {
                tiles.configure();
                for jr in (j0..j1).step_by(NR) {
                    let panel = &wdata[(jr / NR) * kps * NR..][..kps * NR];
                    let bias_j = bias.map(|b| &b[jr..]);
                    for pi in 0..p1 - p0 {
                        let ir = (p0 + pi) * BM;
                        let (rows, cols) = (BM.min(m - ir), NR.min(n - jr));
                        // the epilogue's reads from memory, under the tile products
                        epi.prefetch(ir * n + jr, n, rows, cols);
                        tiles.zero::<0>();
                        tiles.zero::<1>();
                        tiles.zero::<2>();
                        tiles.zero::<3>();
                        for t in 0..nkt {
                            let at = abuf[(pi * nkt + t) * BM * TK..][..BM * TK].as_ptr().cast::<u8>();
                            let bt = panel[t * TK * NR..][..TK * NR].as_ptr().cast::<u8>();
                            tiles.load::<4>(at, TK * 4);
                            tiles.load::<5>(at.add(16 * TK * 4), TK * 4);
                            tiles.load::<6>(bt, NR * 4);
                            tiles.load::<7>(bt.add(64), NR * 4);
                            tiles.dp::<0, 4, 6>();
                            tiles.dp::<1, 4, 7>();
                            tiles.dp::<2, 5, 6>();
                            tiles.dp::<3, 5, 7>();
                        }
                        let sp = scratch.as_mut_ptr().cast::<u8>();
                        tiles.store::<0>(sp, NR * 4);
                        tiles.store::<1>(sp.add(64), NR * 4);
                        tiles.store::<2>(sp.add(16 * NR * 4), NR * 4);
                        tiles.store::<3>(sp.add(16 * NR * 4 + 64), NR * 4);
                        if let Some(b) = bias_j {
                            scratch.iter_mut().take(rows).for_each(|row| row.iter_mut().zip(b).for_each(|(x, b)| *x += b));
                        }
                        if local {
                            // the epilogue from the block to its own output
                            epi.apply_from(scratch.as_mut_ptr().cast(), NR, ir * n + jr, n, rows, cols);
                        } else {
                            write_c(&scratch, cptr.get(), ir * n + jr, n, rows, cols, acc);
                            epi.apply(cptr.get(), ir * n + jr, n, rows, cols); // the finished block, in L1
                        }
                    }
                }
                tiles.release();
            }
        });
    };
    if par {
        (0..mblk * nsplit).into_par_iter().for_each(item);
    } else {
        (0..mblk * nsplit).for_each(item);
    }
}

/// Writes the block (`+ c` when `accumulate`) to rows × cols of C at `c + off` (row stride `ldc`).
///
/// # Safety
/// That rectangle is in bounds of C and not accessed concurrently.
unsafe fn write_c(block: &[[f32; NR]; BM], c: *mut f32, off: usize, ldc: usize, rows: usize, cols: usize, accumulate: bool) {
    for (r, br) in block.iter().enumerate().take(rows) {
        // SAFETY: the caller's contract.
        let row = unsafe { std::slice::from_raw_parts_mut(c.add(off + r * ldc), cols) };
        if accumulate {
            row.iter_mut().zip(br).for_each(|(x, a)| *x += a);
        } else {
            row.copy_from_slice(&br[..cols]);
        }
    }
}
