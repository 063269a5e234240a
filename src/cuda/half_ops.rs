//! Launchers of the 16-bit activation kernels (the bf16/f16 device path keeping activations in 16
//! bit between GEMMs): activation forward and backward on half tensors (kernels/half_act.cu), column
//! sums of a half matrix, the LayerNorm writing only its half output and the LayerNorm backward with
//! the residual gradient added (kernels/layernorm.cu), and the 16-bit patch im2col (kernels/embed.cu).
//!
//! Half buffers hold two 16-bit values per 4-byte element ([`DeviceOps::upload_bf16`] layout, ⌈n/2⌉
//! elements for n values). Every launcher returns fresh buffers from `alloc_uninit` that its kernels
//! write entirely, and checks the sizes of the buffers it is given (an error, never a kernel reading
//! past one). Vector paths run only where the shape and every pointer allow (the `vec` argument).
use super::backend::{Buf, DeviceOps};
use super::launch::{KernelArgs, LaunchCfg};
use super::train_ops::{bias_act_cfg, ln_bwd_cfg, ln_cfg, reduce_parts, row_parts_min, WAVE_BLOCKS};
use crate::error::{Error, Result};
use crate::tensor::DType;

/// `base` + "hbf16" / "hf16" for a half `dt`; f32 is an error.
fn half_kernel(base: &str, dt: DType) -> Result<String> {
    match dt {
        DType::BF16 => Ok(format!("{base}hbf16")),
        DType::F16 => Ok(format!("{base}hf16")),
        DType::F32 => Err(Error::msg(format!("{base}h*: bf16 or f16, not f32"))),
    }
}

/// Errors unless `b` holds at least `words` 4-byte elements.
fn need(what: &str, b: &Buf, words: usize) -> Result<()> {
    if b.len() < words {
        return Err(Error::msg(format!("{what}: buffer of {} elements, {words} needed", b.len())));
    }
    Ok(())
}

fn i32_of(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| crate::shape_err!("{what}: {v} does not fit the kernel's int"))
}

/// The launch of `act_fwd_h*` over `total` values: one thread per eight values (one 16-byte word)
/// when `vec`, else per value; at most 16384 blocks of 256 (grid-stride).
pub fn act_half_cfg(total: usize, vec: bool) -> LaunchCfg {
    let per = if vec { 8 } else { 1 };
    LaunchCfg::new((total.div_ceil(per * 256).clamp(1, 16_384) as u32, 1, 1), (256, 1, 1), 0)
}

/// out = act(pre) on a packed `dt` [rows, n] tensor (bias already added by the GEMM): a new packed
/// [rows, n] buffer of ⌈rows·n/2⌉ elements. act_code 0 = QuickGELU, 1 = erf GELU.
pub fn act_half(ops: &dyn DeviceOps, dt: DType, pre: &Buf, rows: usize, n: usize, act_code: i32) -> Result<Buf> {
    let kernel = half_kernel("act_fwd_", dt)?;
    let total = rows * n;
    need("act_half pre", pre, total.div_ceil(2))?;
    let out = ops.alloc_uninit(total.div_ceil(2))?; // [rows, n] halves
    let vec = total.is_multiple_of(8) && pre.ptr().is_multiple_of(16) && out.ptr().is_multiple_of(16);
    let mut a = KernelArgs::new().ptr(pre.ptr()).ptr(out.ptr()).i32(i32_of("act_half rows", rows)?).i32(i32_of("act_half n", n)?).i32(act_code).i32(vec as i32);
    ops.launch(&kernel, act_half_cfg(total, vec), &mut a)?;
    Ok(out)
}

/// The backward of [`act_half`] with the bias gradient: du = dout·act'(pre) (f32 dout `[rows, n]`,
/// packed `dt` pre), returned packed in `dt`, and db `[n]` f32 = the column sums of the unrounded du
/// (row-chunk partials of `act_bwd_h*` on the launch of `bias_act_bwd_f32v`, then
/// [`reduce_parts`]: a fixed order).
pub fn act_bwd_half(ops: &dyn DeviceOps, dt: DType, dout: &Buf, pre: &Buf, rows: usize, n: usize, act_code: i32) -> Result<(Buf, Buf)> {
    let kernel = half_kernel("act_bwd_", dt)?;
    let total = rows * n;
    need("act_bwd_half dout", dout, total)?;
    need("act_bwd_half pre", pre, total.div_ceil(2))?;
    let du = ops.alloc_uninit(total.div_ceil(2))?; // [rows, n] halves
    let aligned = |ptrs: &[(u64, u64)]| ptrs.iter().all(|&(p, a)| p.is_multiple_of(a));
    let mut vec = n.is_multiple_of(4) && aligned(&[(dout.ptr(), 16), (pre.ptr(), 8), (du.ptr(), 8)]);
    let mut cfg = bias_act_cfg(rows, n, vec);
    let mut partial = ops.alloc_uninit(cfg.grid.1 as usize * n)?; // [parts, n], every column of every chunk written
    if vec && !partial.ptr().is_multiple_of(16) {
        (vec, cfg) = (false, bias_act_cfg(rows, n, false));
        partial = ops.alloc_uninit(cfg.grid.1 as usize * n)?;
    }
    let parts = cfg.grid.1 as usize;
    let mut a = KernelArgs::new()
        .ptr(dout.ptr())
        .ptr(pre.ptr())
        .ptr(du.ptr())
        .ptr(partial.ptr())
        .i32(i32_of("act_bwd_half rows", rows)?)
        .i32(i32_of("act_bwd_half n", n)?)
        .i32(act_code)
        .i32(vec as i32);
    ops.launch(&kernel, cfg, &mut a)?;
    Ok((du, reduce_parts(ops, &partial, parts, n)?))
}

/// The first stage of [`col_sums_half`]: four columns a thread when `vec`, row chunks of at least
/// 16 rows (half the f32 kernel's [`MIN_CHUNK_ROWS`](super::train_ops::MIN_CHUNK_ROWS): a 16-bit row
/// is half the bytes) for one wave of blocks: (launch, parts). ViT-L/14 training's 32 896 rows × 1024
/// columns (one column block) make 1056 chunks: a full wave of 8 blocks on 132 SMs.
pub fn col_sums_half_cfg(rows: usize, n: usize, vec: bool) -> (LaunchCfg, usize) {
    let cols = n.div_ceil(if vec { 4 } else { 1 }).div_ceil(256);
    let parts = row_parts_min(rows, cols, WAVE_BLOCKS, 16);
    (LaunchCfg::new((cols as u32, parts as u32, 1), (256, 1, 1), 0), parts)
}

/// Column sums (f32 `[n]`) of a packed `dt` `[rows, n]` matrix: `col_sums_partial_h*` (f32
/// accumulation per row chunk) then [`reduce_parts`].
pub fn col_sums_half(ops: &dyn DeviceOps, dt: DType, m: &Buf, rows: usize, n: usize) -> Result<Buf> {
    let kernel = half_kernel("col_sums_partial_", dt)?;
    need("col_sums_half m", m, (rows * n).div_ceil(2))?;
    let mut vec = n.is_multiple_of(4) && m.ptr().is_multiple_of(8);
    let (mut cfg, mut parts) = col_sums_half_cfg(rows, n, vec);
    let mut partial = ops.alloc_uninit(parts * n)?; // [parts, n], every element written
    if vec && !partial.ptr().is_multiple_of(16) {
        vec = false;
        (cfg, parts) = col_sums_half_cfg(rows, n, false);
        partial = ops.alloc_uninit(parts * n)?;
    }
    let mut a = KernelArgs::new().ptr(m.ptr()).ptr(partial.ptr()).i32(i32_of("col_sums_half rows", rows)?).i32(i32_of("col_sums_half n", n)?).i32(vec as i32);
    ops.launch(&kernel, cfg, &mut a)?;
    reduce_parts(ops, &partial, parts, n)
}

/// LayerNorm of f32 x [rows, w] writing only the packed `dt` output (`layernorm_fwd_h*`, one warp
/// per row): (y halves [rows, w], stats [2·rows]: mean then rstd).
#[allow(clippy::too_many_arguments)]
pub fn layernorm_half(ops: &dyn DeviceOps, dt: DType, x: &Buf, g: &Buf, b: &Buf, rows: usize, w: usize, eps: f32) -> Result<(Buf, Buf)> {
    let kernel = half_kernel("layernorm_fwd_", dt)?;
    need("layernorm_half x", x, rows * w)?;
    need("layernorm_half gamma", g, w)?;
    need("layernorm_half beta", b, w)?;
    let (y, st) = (ops.alloc_uninit((rows * w).div_ceil(2))?, ops.alloc_uninit(2 * rows)?); // [rows, w] halves; mean [rows], rstd [rows]
    let mut a = KernelArgs::new()
        .ptr(x.ptr())
        .ptr(g.ptr())
        .ptr(b.ptr())
        .ptr(y.ptr())
        .ptr(st.ptr())
        .ptr(st.ptr() + 4 * rows as u64)
        .i32(i32_of("layernorm_half rows", rows)?)
        .i32(i32_of("layernorm_half w", w)?)
        .f32(eps);
    ops.launch(&kernel, ln_cfg(rows), &mut a)?;
    Ok((y, st))
}

/// The LayerNorm backward (`layernorm_bwd_f32`), or with `res` the residual gradient added in the
/// same pass (`layernorm_bwd_add_f32`): dx = (res +) LN-backward(dy), all f32 `[rows, w]`; st = the
/// forward's stats `[2·rows]` (mean then rstd). Returns (dx, dγ `[w]`, dβ `[w]`) (row-chunk partials in
/// [`ln_bwd_cfg`] chunks, then [`reduce_parts`]: a fixed order).
#[allow(clippy::too_many_arguments)]
pub fn layernorm_bwd(ops: &dyn DeviceOps, dy: &Buf, x: &Buf, g: &Buf, st: &Buf, res: Option<&Buf>, rows: usize, w: usize) -> Result<(Buf, Buf, Buf)> {
    for (what, b, words) in
        [("dy", dy, rows * w), ("x", x, rows * w), ("gamma", g, w), ("stats", st, 2 * rows)].into_iter().chain(res.map(|r| ("res", r, rows * w)))
    {
        need(&format!("layernorm_bwd {what}"), b, words)?;
    }
    let cfg = ln_bwd_cfg(rows);
    let parts = cfg.grid.0 as usize;
    let (dx, pg, pb) = (ops.alloc_uninit(rows * w)?, ops.alloc_uninit(parts * w)?, ops.alloc_uninit(parts * w)?); // [rows, w], [parts, w] ×2
    let mut a = KernelArgs::new().ptr(dy.ptr()).ptr(x.ptr()).ptr(g.ptr()).ptr(st.ptr()).ptr(st.ptr() + 4 * rows as u64);
    if let Some(r) = res {
        a = a.ptr(r.ptr());
    }
    let mut a = a.ptr(dx.ptr()).ptr(pg.ptr()).ptr(pb.ptr()).i32(i32_of("layernorm_bwd rows", rows)?).i32(i32_of("layernorm_bwd w", w)?);
    ops.launch(if res.is_some() { "layernorm_bwd_add_f32" } else { "layernorm_bwd_f32" }, cfg, &mut a)?;
    Ok((dx, reduce_parts(ops, &pg, parts, w)?, reduce_parts(ops, &pb, parts, w)?))
}

/// The patch GEMM's 16-bit input from 16-bit pixels [b, c, s, s] (bf16 or f16, packed): the
/// im2col of `patch_im2col_f32` moving the bits (`patch_im2col_h16`), a new packed
/// [b·(s/p)², c·p·p] buffer.
pub fn patch_im2col_half(ops: &dyn DeviceOps, px_half: &Buf, b: usize, c: usize, s: usize, p: usize) -> Result<Buf> {
    if p == 0 || p > s {
        return Err(Error::msg(format!("patch_im2col_half: patch {p} for images of {s}")));
    }
    need("patch_im2col_half pixels", px_half, (b * c * s * s).div_ceil(2))?;
    let total = b * (s / p) * (s / p) * c * p * p;
    let cols = ops.alloc_uninit(total.div_ceil(2))?; // [B·N, C·P·P] halves
    let mut a = KernelArgs::new().ptr(px_half.ptr()).ptr(cols.ptr()).i32(i32_of("b", b)?).i32(i32_of("c", c)?).i32(i32_of("s", s)?).i32(i32_of("p", p)?);
    ops.launch("patch_im2col_h16", super::train_ops::grid(total), &mut a)?;
    Ok(cols)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The half launches fill a wave at ViT-L/14 training shapes like their f32 twins.
    #[test]
    fn half_launches_fill_132_sms() {
        let blocks = |c: LaunchCfg| c.grid.0 as usize * c.grid.1 as usize * c.grid.2 as usize;
        for rows in [128 * 257, 128 * 248] {
            for w in [768, 1024, 3072, 4096] {
                assert!(blocks(act_half_cfg(rows * w, true)) >= 132);
                assert!(blocks(col_sums_half_cfg(rows, w, true).0) >= 132, "col_sums_half {rows}x{w}");
            }
        }
        assert_eq!(col_sums_half_cfg(1, 1, false).1, 1);
        assert!(half_kernel("act_fwd_", DType::F32).is_err());
        assert_eq!(half_kernel("act_bwd_", DType::F16).unwrap(), "act_bwd_hf16");
    }
}
