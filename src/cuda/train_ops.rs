//! The small device operations the CUDA towers share (towers, train_block, train_text,
//! train_vision): grid-stride launches, y += αx, copies, column sums, LayerNorm with saved
//! statistics and its backward, and the bias-less projection's backward.
use super::backend::{Buf, DeviceOps};
use super::launch::{KernelArgs, LaunchCfg};
use crate::error::Result;

/// One thread per element, block 256, at most 16384 blocks (the grid-stride kernels).
pub fn grid(n: usize) -> LaunchCfg {
    LaunchCfg::new((n.div_ceil(256).clamp(1, 16_384) as u32, 1, 1), (256, 1, 1), 0)
}

/// One warp per row, 4 rows per block (layernorm_fwd / residual_layernorm_fwd).
pub fn ln_cfg(rows: usize) -> LaunchCfg {
    LaunchCfg::new((rows.div_ceil(4) as u32, 1, 1), (128, 1, 1), 0)
}

/// y += alpha·x over `n` elements.
pub fn axpy(ops: &dyn DeviceOps, y: &Buf, x: &Buf, alpha: f32, n: usize) -> Result<()> {
    ops.launch("axpy_f32", grid(n), &mut KernelArgs::new().ptr(y.ptr()).ptr(x.ptr()).f32(alpha).i32(n as i32))
}

/// A new buffer holding the first `n` elements of x.
pub fn copy(ops: &dyn DeviceOps, x: &Buf, n: usize) -> Result<Buf> {
    let y = ops.alloc(n)?;
    axpy(ops, &y, x, 1.0, n)?;
    Ok(y)
}

/// Column sums of a [rows, n] matrix into a new [n] buffer (bias gradients, batch sums).
pub fn col_sums(ops: &dyn DeviceOps, m: &Buf, rows: usize, n: usize) -> Result<Buf> {
    let out = ops.alloc(n)?;
    let mut a = KernelArgs::new().ptr(m.ptr()).ptr(out.ptr()).i32(rows as i32).i32(n as i32);
    ops.launch("bias_grad_reduce_f32", LaunchCfg::new((n.div_ceil(256) as u32, 1, 1), (256, 1, 1), 0), &mut a)?;
    Ok(out)
}

/// LayerNorm forward keeping the statistics: (y, mean, rstd).
pub fn ln_fwd(ops: &dyn DeviceOps, x: &Buf, g: &Buf, b: &Buf, rows: usize, w: usize, eps: f32) -> Result<(Buf, Buf, Buf)> {
    let (y, mean, rstd) = (ops.alloc(rows * w)?, ops.alloc(rows)?, ops.alloc(rows)?);
    let mut a = KernelArgs::new().ptr(x.ptr()).ptr(g.ptr()).ptr(b.ptr()).ptr(y.ptr()).ptr(mean.ptr()).ptr(rstd.ptr()).i32(rows as i32).i32(w as i32).f32(eps);
    ops.launch("layernorm_fwd_f32", ln_cfg(rows), &mut a)?;
    Ok((y, mean, rstd))
}

/// LayerNorm backward from the saved statistics: (dx, dγ, dβ).
#[allow(clippy::too_many_arguments)]
pub fn ln_bwd(ops: &dyn DeviceOps, dy: &Buf, x: &Buf, gamma: &Buf, mean: &Buf, rstd: &Buf, rows: usize, w: usize) -> Result<(Buf, Buf, Buf)> {
    let parts = rows.clamp(1, 8);
    let (dx, pg, pb) = (ops.alloc(rows * w)?, ops.alloc(parts * w)?, ops.alloc(parts * w)?);
    let mut a = KernelArgs::new().ptr(dy.ptr()).ptr(x.ptr()).ptr(gamma.ptr()).ptr(mean.ptr()).ptr(rstd.ptr()).ptr(dx.ptr()).ptr(pg.ptr()).ptr(pb.ptr()).i32(rows as i32).i32(w as i32);
    ops.launch("layernorm_bwd_f32", LaunchCfg::new((parts as u32, 1, 1), (128, 1, 1), 0), &mut a)?;
    let (dg, db) = (ops.alloc(w)?, ops.alloc(w)?);
    let mut a = KernelArgs::new().ptr(pg.ptr()).ptr(pb.ptr()).ptr(dg.ptr()).ptr(db.ptr()).i32(parts as i32).i32(w as i32);
    ops.launch("layernorm_bwd_reduce_f32", LaunchCfg::new((w.div_ceil(256) as u32, 1, 1), (256, 1, 1), 0), &mut a)?;
    Ok((dx, dg, db))
}

/// Backward of e = x·Pᵀ (the towers' projections, no bias), x [b, w], P [d, w]: (dx, dP).
pub fn projection_bwd(ops: &dyn DeviceOps, de: &Buf, x: &Buf, p: &Buf, b: usize, d: usize, w: usize) -> Result<(Buf, Buf)> {
    let dx = ops.alloc(b * w)?;
    ops.gemm(de, p, &dx, b, w, d, false, false, 0.0)?; // dx = de·P
    let dp = ops.alloc(d * w)?;
    ops.gemm(de, x, &dp, d, w, b, true, false, 0.0)?; // dP = deᵀ·x
    Ok((dx, dp))
}
