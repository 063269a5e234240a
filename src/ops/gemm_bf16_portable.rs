//! The C tile of one bf16 GEMM microkernel call ([`Tile`]: where it writes, and its store with
//! the bias, the accumulation of later kc-blocks and the residual) and the portable microkernel
//! (`gemm_bf16.rs`'s layout; bf16 → f32 by shifting, plain or AVX2+FMA loops).
use super::gemm_bf16::{KC, MR, NR};

/// Destination of one microkernel call: rows×cols of C at `c + off`, row stride `ldc`.
pub(super) struct Tile<'a> {
    pub(super) c: *mut f32,
    pub(super) off: usize,
    pub(super) ldc: usize,
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) bias: Option<&'a [f32]>, // starts at the tile's first column; only for the first kc-block
    pub(super) accumulate: bool,        // add to the existing C values (later kc-blocks)
    /// `Epilogue::Add`'s residual (indexed like C; null: none), added last — only on the last
    /// kc-block: C = (acc + bias | + c) + res in registers, the bits of the separate add.
    pub(super) res: *const f32,
}

impl Tile<'_> {
    /// Writes `acc (+ bias | + c) (+ res)` to the valid part of the tile.
    ///
    /// # Safety
    /// Rows `0..rows`, cols `0..cols` of the tile must be in bounds of C (and of `res` when
    /// it is not null) and not be accessed concurrently.
    pub(super) unsafe fn store(&self, acc: &[[f32; NR]; MR]) {
        for (r, accr) in acc.iter().enumerate().take(self.rows) {
            // SAFETY: caller guarantees this row segment is in bounds and exclusive.
            let row = unsafe { std::slice::from_raw_parts_mut(self.c.add(self.off + r * self.ldc), self.cols) };
            for (j, x) in row.iter_mut().enumerate() {
                let base = match (self.bias, self.accumulate) {
                    (_, true) => *x,
                    (Some(b), false) => b[j],
                    (None, false) => 0.0,
                };
                *x = base + accr[j];
                if !self.res.is_null() {
                    // SAFETY: the residual is indexed like C (the caller's rectangle).
                    *x += unsafe { *self.res.add(self.off + r * self.ldc + j) };
                }
            }
        }
    }
}

/// Portable microkernel: bf16 → f32 (exact, by shifting) and a plain f32 loop. B is
/// widened `PB` pairs at a time; each row's 32 accumulators then stay in registers.
/// Compiled twice: for the baseline target, and (x86-64) with AVX2+FMA enabled and
/// fused multiply-adds.
///
/// # Safety
/// Same contract as [`Tile::store`].
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
pub(super) unsafe fn kernel_portable(a: &[u32], b: &[u32], kc: usize, t: &Tile, avx2: bool) {
    let mut acc = [[0f32; NR]; MR];
    #[cfg(target_arch = "x86_64")]
    if avx2 && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the features were just detected.
        unsafe { portable_avx2(a, b, kc, &mut acc) };
        // SAFETY: forwarded from the caller.
        return unsafe { t.store(&acc) };
    }
    portable_body::<false>(a, b, kc, &mut acc);
    // SAFETY: forwarded from the caller.
    unsafe { t.store(&acc) };
}

/// # Safety
/// Requires avx2 + fma.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn portable_avx2(a: &[u32], b: &[u32], kc: usize, acc: &mut [[f32; NR]; MR]) {
    portable_body::<true>(a, b, kc, acc)
}

#[inline(always)]
fn portable_body<const FMA: bool>(a: &[u32], b: &[u32], kc: usize, acc: &mut [[f32; NR]; MR]) {
    const PB: usize = 32;
    let mut bf = [[[0f32; NR]; 2]; PB]; // [pair][lo, hi][col]
    for p0 in (0..kc).step_by(PB) {
        let np = PB.min(kc - p0);
        for (q, bq) in bf.iter_mut().enumerate().take(np) {
            for (j, &v) in b[(p0 + q) * NR..(p0 + q + 1) * NR].iter().enumerate() {
                bq[0][j] = f32::from_bits(v << 16);
                bq[1][j] = f32::from_bits(v & 0xffff_0000);
            }
        }
        // Two rows at a time: each widened B value feeds two multiply-adds.
        for (r2, accr) in acc.chunks_exact_mut(2).enumerate() {
            let mut x = [accr[0], accr[1]];
            for (q, bq) in bf.iter().enumerate().take(np) {
                for (h, xh) in x.iter_mut().enumerate() {
                    let av = a[(2 * r2 + h) * KC + p0 + q];
                    let (lo, hi) = (f32::from_bits(av << 16), f32::from_bits(av & 0xffff_0000));
                    for j in 0..NR {
                        xh[j] = if FMA { hi.mul_add(bq[1][j], lo.mul_add(bq[0][j], xh[j])) } else { xh[j] + hi * bq[1][j] + lo * bq[0][j] };
                    }
                }
            }
            accr.copy_from_slice(&x);
        }
    }
}
