//! Small device helpers of the device backend (src/backend/device.rs) and the trainer: launch
//! geometries of the grid-stride, LayerNorm and reduction kernels, y += αx, copies, f32 → half
//! conversions, two-stage column sums.
//!
//! Geometry follows the work, not constants: a reduction's first stage splits its rows into enough
//! chunks for [`WAVE_BLOCKS`] blocks (a full wave of an H100/H200's 132 SMs) when the rows allow (each
//! chunk at least [`MIN_CHUNK_ROWS`] rows; LayerNorm backward: [`LN_BWD_BLOCKS`], [`LN_BWD_MIN_ROWS`]), and the second stage ([`reduce_parts`]) sums the chunks'
//! partials in a fixed order: the result is bitwise reproducible for a given shape.
use super::backend::{Buf, DeviceOps};
use super::launch::{KernelArgs, LaunchCfg};
use crate::error::{Error, Result};
use crate::tensor::DType;

/// First-stage blocks of the column reductions (`col_sums_partial_f32`, 256 threads, 20 registers:
/// 8 resident blocks per SM): one full wave of a 132-SM GPU (H100 SXM / H200). Two blocks per SM
/// (the old target) left three quarters of the SM slots, and of the loads in flight, empty.
pub const WAVE_BLOCKS: usize = 8 * 132;
/// Row chunks of `layernorm_bwd` (128 threads, 48 registers: 10 resident blocks per SM): at least
/// one full wave of 132 SMs (1320 blocks) at real shapes, with chunks of [`LN_BWD_MIN_ROWS`].
pub const LN_BWD_BLOCKS: usize = 16 * 132;
/// The fewest rows a `layernorm_bwd` chunk sums: 16 (ViT-L/14 training's 32 896 rows make 2056
/// chunks; each block's partial row of dγ, dβ costs 8·cols bytes, a sixteenth of its input).
pub const LN_BWD_MIN_ROWS: usize = 16;
/// Blocks of the bias + activation kernels: eight per SM (their row chunks are short loops of
/// float4 rows; eight 256-thread blocks keep 64 warps of loads in flight on each SM).
pub const ELEMENTWISE_BLOCKS: usize = 8 * 132;
/// The fewest rows a reduction chunk sums (fewer only when there are fewer rows).
pub const MIN_CHUNK_ROWS: usize = 32;

/// One thread per element, block 256, at most 16384 blocks (the grid-stride kernels).
pub fn grid(n: usize) -> LaunchCfg {
    LaunchCfg::new((n.div_ceil(256).clamp(1, 16_384) as u32, 1, 1), (256, 1, 1), 0)
}

/// One warp per row, 4 rows per block (layernorm_fwd / residual_layernorm_fwd).
pub fn ln_cfg(rows: usize) -> LaunchCfg {
    LaunchCfg::new((rows.div_ceil(4) as u32, 1, 1), (128, 1, 1), 0)
}

/// Row chunks of a first-stage reduction over `rows` rows whose launch has `col_blocks` blocks per
/// chunk: enough for [`WAVE_BLOCKS`] blocks, each chunk ≥ [`MIN_CHUNK_ROWS`] rows, ≥ 1, ≤ 65535.
pub fn row_parts(rows: usize, col_blocks: usize) -> usize {
    row_parts_for(rows, col_blocks, WAVE_BLOCKS)
}

fn row_parts_for(rows: usize, col_blocks: usize, target: usize) -> usize {
    row_parts_min(rows, col_blocks, target, MIN_CHUNK_ROWS)
}

pub(crate) fn row_parts_min(rows: usize, col_blocks: usize, target: usize, min_rows: usize) -> usize {
    let want = target.div_ceil(col_blocks.max(1));
    want.min(rows.div_ceil(min_rows)).clamp(1, 65_535)
}

/// The grid of `layernorm_bwd_f32`: one block (4 warps) per chunk of rows, [`LN_BWD_BLOCKS`] chunks
/// of at least [`LN_BWD_MIN_ROWS`] rows.
pub fn ln_bwd_cfg(rows: usize) -> LaunchCfg {
    LaunchCfg::new((row_parts_min(rows, 1, LN_BWD_BLOCKS, LN_BWD_MIN_ROWS) as u32, 1, 1), (128, 1, 1), 0)
}

/// The launch of `bias_act_fwd_f32v` / `bias_act_bwd_f32v` over [rows, n]: four columns a thread
/// when `vec` (n % 4 == 0, aligned buffers), row chunks for [`ELEMENTWISE_BLOCKS`] blocks (each
/// ≥ 1 row).
pub fn bias_act_cfg(rows: usize, n: usize, vec: bool) -> LaunchCfg {
    let cols = n.div_ceil(if vec { 4 } else { 1 }).div_ceil(256);
    // chunks down to one row: few rows (pooled tokens, short captions) still spread over the SMs
    LaunchCfg::new((cols as u32, row_parts_min(rows, cols, ELEMENTWISE_BLOCKS, 1) as u32, 1), (256, 1, 1), 0)
}

/// Whether the vectorized (float4) paths may run: `n` a multiple of 4 and every pointer 16-byte
/// aligned.
pub fn vec4(n: usize, ptrs: &[u64]) -> bool {
    n.is_multiple_of(4) && ptrs.iter().all(|p| p.is_multiple_of(16))
}

/// The launch of `f32_to_bf16` / `f32_to_f16` over `n` elements (64-bit: any n): the kernel
/// name, one thread per four elements (float4 loads), at most 16384 blocks (grid-stride).
pub fn to_half_launch(dt: DType, x: u64, y: u64, n: usize) -> Result<(&'static str, LaunchCfg, KernelArgs)> {
    let kernel = match dt {
        DType::BF16 => "f32_to_bf16",
        DType::F16 => "f32_to_f16",
        DType::F32 => return Err(Error::msg("to_half: bf16 or f16, not f32")),
    };
    let n64 = i64::try_from(n).map_err(|_| crate::shape_err!("to_half: {n} elements"))?;
    let blocks = n.div_ceil(4 * 256).clamp(1, 16_384) as u32;
    Ok((kernel, LaunchCfg::new((blocks, 1, 1), (256, 1, 1), 0), KernelArgs::new().ptr(x).ptr(y).i64(n64)))
}

/// The first `n` values of x rounded to `dt` (bf16/f16) in a new packed buffer of ⌈n/2⌉ words
/// (not zeroed first: the conversion writes every half that is read).
pub fn to_half(ops: &dyn DeviceOps, dt: DType, x: &Buf, n: usize) -> Result<Buf> {
    let y = ops.alloc_uninit(n.div_ceil(2))?; // [n] halves
    let (kernel, cfg, mut a) = to_half_launch(dt, x.ptr(), y.ptr(), n)?;
    ops.launch(kernel, cfg, &mut a)?;
    Ok(y)
}

/// y += alpha·x over `n` elements.
pub fn axpy(ops: &dyn DeviceOps, y: &Buf, x: &Buf, alpha: f32, n: usize) -> Result<()> {
    ops.launch("axpy_f32", grid(n.div_ceil(4)), &mut KernelArgs::new().ptr(y.ptr()).ptr(x.ptr()).f32(alpha).i32(n as i32))
}

/// The launch of `copy_f32` over `n` elements: one float4 a thread, at most 16384 blocks
/// (grid-stride).
pub fn copy_cfg(n: usize) -> LaunchCfg {
    LaunchCfg::new((n.div_ceil(4 * 256).clamp(1, 16_384) as u32, 1, 1), (256, 1, 1), 0)
}

/// A new buffer holding the first `n` elements of x (`copy_f32`: no memset, one pass).
pub fn copy(ops: &dyn DeviceOps, x: &Buf, n: usize) -> Result<Buf> {
    if x.len() < n {
        return Err(Error::msg(format!("copy: {n} elements from a buffer of {}", x.len())));
    }
    let y = ops.alloc_uninit(n)?; // [n], every element written
    let n64 = i64::try_from(n).map_err(|_| crate::shape_err!("copy: {n} elements"))?;
    ops.launch("copy_f32", copy_cfg(n), &mut KernelArgs::new().ptr(x.ptr()).ptr(y.ptr()).i64(n64))?;
    Ok(y)
}

/// The launch of `col_reduce_f32` over `parts` rows of `n` columns: blocks of C × R threads, C = 8
/// columns (a 32-byte sector per row) when that still makes two 1024-thread blocks per SM of 132
/// SMs, else 4 (≥ 132 blocks from n = 528); R = ⌈parts/4⌉ rounded up to a power of two, in
/// [8, 1024/C] (each thread sums ~4–16 parts, then a fixed in-block tree). ViT-L/14 training
/// (n = 768…4096, parts ~100…2100) gets ≥ 132 blocks, and ≥ half of the GPU's thread slots
/// resident from parts ≈ 1000.
pub fn col_reduce_cfg(parts: usize, n: usize) -> LaunchCfg {
    let c = if n.div_ceil(8) >= 2 * 132 { 8 } else { 4 };
    let r = parts.div_ceil(4).next_power_of_two().clamp(8, 1024 / c);
    LaunchCfg::new((n.div_ceil(c).max(1) as u32, 1, 1), (c as u32, r as u32, 1), 0)
}

/// `out[c] = Σ_p partial[p, c]` over `parts` rows of partial sums into a new `[n]` buffer, in a fixed
/// order (the second stage of every column reduction).
pub fn reduce_parts(ops: &dyn DeviceOps, partial: &Buf, parts: usize, n: usize) -> Result<Buf> {
    let out = ops.alloc_uninit(n)?; // col_reduce_f32 writes every column
    let mut a = KernelArgs::new().ptr(partial.ptr()).ptr(out.ptr()).i32(parts as i32).i32(n as i32);
    ops.launch("col_reduce_f32", col_reduce_cfg(parts, n), &mut a)?;
    Ok(out)
}

/// The first stage of [`col_sums`] over [rows, n]: (launch, row chunks).
pub fn col_sums_cfg(rows: usize, n: usize) -> (LaunchCfg, usize) {
    let cols = n.div_ceil(256);
    let parts = row_parts(rows, cols);
    (LaunchCfg::new((cols as u32, parts as u32, 1), (256, 1, 1), 0), parts)
}

/// Column sums of a `[rows, n]` matrix into a new `[n]` buffer (bias gradients, batch sums): row
/// chunks summed by `col_sums_partial_f32` ([`col_sums_cfg`]), then [`reduce_parts`].
pub fn col_sums(ops: &dyn DeviceOps, m: &Buf, rows: usize, n: usize) -> Result<Buf> {
    let (cfg, parts) = col_sums_cfg(rows, n);
    let partial = ops.alloc_uninit(parts * n)?; // [parts, n], every element written
    let mut a = KernelArgs::new().ptr(m.ptr()).ptr(partial.ptr()).i32(rows as i32).i32(n as i32);
    ops.launch("col_sums_partial_f32", cfg, &mut a)?;
    reduce_parts(ops, &partial, parts, n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ViT-L/14 training (batch 128: 257 image tokens, 248 text tokens) and inference (batch 256)
    /// fill at least one wave of 132 SMs in every first-stage reduction and elementwise launch.
    #[test]
    fn launches_fill_132_sms_at_real_shapes() {
        let blocks = |c: LaunchCfg| c.grid.0 as usize * c.grid.1 as usize * c.grid.2 as usize;
        for rows in [128 * 257, 128 * 248, 256 * 257] {
            for w in [768, 1024, 3072, 4096] {
                assert!(blocks(ln_bwd_cfg(rows)) >= 132, "layernorm_bwd rows {rows}");
                assert!(blocks(col_sums_cfg(rows, w).0) >= 132, "col_sums {rows}x{w}");
                assert!(blocks(bias_act_cfg(rows, w, true)) >= 132, "bias_act {rows}x{w}");
                assert!(blocks(grid((rows * w).div_ceil(4))) >= 132);
            }
        }
        // small problems stay small: one row, one chunk
        assert_eq!(row_parts(1, 1), 1);
        assert_eq!(row_parts(45, 3), 2);
        assert_eq!(blocks(ln_bwd_cfg(128 * 257)), 2056); // ≥ one wave of 10 blocks per SM
        assert_eq!(blocks(ln_bwd_cfg(7)), 1);
    }

    /// The second stage of the column sums fills one wave of 132 SMs at ViT-B…L widths and the
    /// first stages' part counts, with a power-of-two tree of at most 1024 threads a block.
    #[test]
    fn col_reduce_fills_132_sms() {
        for n in [768, 1024, 2048, 3072, 4096] {
            for parts in [100, 352, 1000, 1056, 2056, 2100] {
                let cfg = col_reduce_cfg(parts, n);
                let (c, r) = (cfg.block.0 as usize, cfg.block.1 as usize);
                assert!(r.is_power_of_two() && c * r <= 1024 && cfg.grid.0 as usize * c >= n, "{n}x{parts}: {cfg:?}");
                assert!(cfg.grid.0 >= 132, "col_reduce {n} columns x {parts} parts: {} blocks", cfg.grid.0);
                if parts >= 1000 {
                    // resident threads (≤ 2 blocks of 1024 per SM) ≥ half of 132 SMs × 2048
                    let resident = (cfg.grid.0 as usize).min(2 * 132) * c * r;
                    assert!(resident >= 132 * 1024, "{n}x{parts}: {resident} threads");
                }
            }
        }
        assert_eq!(col_reduce_cfg(1, 1).grid, (1, 1, 1));
        assert_eq!(col_reduce_cfg(1, 1).block, (4, 8, 1));
    }

    /// The conversion of ViT-L/14's MLP input at batch 2048 (m·k > 2³¹; the old int path refused batch ≥ 2041)
    /// plans with a 64-bit count.
    #[test]
    fn half_conversion_sizes_are_64_bit() {
        let n = 2048 * 257 * 4096;
        assert!(n > i32::MAX as usize);
        let (kernel, cfg, args) = to_half_launch(DType::BF16, 0, 0, n).unwrap();
        assert_eq!(kernel, "f32_to_bf16");
        assert_eq!(cfg.grid.0, 16_384);
        assert_eq!(args.len(), 3);
        assert!(to_half_launch(DType::F32, 0, 0, 4).is_err());
        // the GEMM plan of that Linear (fc2: m = 2048·257, k = 4096) is 64-bit too
        let d = crate::cuda::GemmDesc { out_dtype: DType::F32, ..crate::cuda::GemmDesc::linear(2048 * 257, 1024, 4096, DType::BF16, true) };
        assert!(crate::cuda::gemm::plan(&d).is_ok());
    }
}
