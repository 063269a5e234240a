//! Small device helpers of the device backend (src/backend/device.rs) and the trainer: launch
//! geometries of the grid-stride and LayerNorm kernels, y += αx, copies, column sums.
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
    let out = ops.alloc_uninit(n)?; // bias_grad_reduce_f32 writes every column
    let mut a = KernelArgs::new().ptr(m.ptr()).ptr(out.ptr()).i32(rows as i32).i32(n as i32);
    ops.launch("bias_grad_reduce_f32", LaunchCfg::new((n.div_ceil(256) as u32, 1, 1), (256, 1, 1), 0), &mut a)?;
    Ok(out)
}
