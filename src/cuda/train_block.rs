//! One transformer block for training on a CUDA device ([`DeviceOps`]): the forward keeps what the
//! backward needs (LayerNorm statistics, q/k/v, the attention output and logsumexp, the MLP
//! pre-activation), and the backward runs the fused backward kernels (layernorm_bwd,
//! bias_{quick_,}gelu_bwd, attention_bwd) with the Linear GEMMs through [`DeviceOps::gemm`]
//! (cuBLASLt on a GPU, gemm_f32 emulated) and bias gradients through bias_grad_reduce_f32.
//! tests/cuda_train_block.rs checks it on the emulator against the CPU tape's block (the same
//! math as `train::model::block`). This is the first brick of the GPU training path.
use super::attention::{attention_bwd_launch, attention_fwd_launch};
use super::backend::{Buf, DeviceOps};
use super::launch::{KernelArgs, LaunchCfg};
use super::train_ops::{axpy, col_sums, copy, ln_bwd, ln_cfg, ln_fwd};
use crate::error::{Error, Result};
use crate::model::config::{Activation, TowerConfig};
use crate::ops::attention::AttnShape;
use crate::tensor::DType;

/// The 16 parameters in `train::model::BLOCK_PARAMS` order, on the device.
pub struct DevBlock<'a> {
    pub p: [&'a Buf; 16],
    pub cfg: &'a TowerConfig,
    /// Half-precision copies of the six Linear weights (q, k, v, out, fc1, fc2;
    /// [`DeviceOps::upload_bf16`] packing) and their type (bf16 or f16), written by the AdamW
    /// kernel from the f32 masters: when present the forward GEMMs read them (half-precision
    /// products, f32 accumulation); the backward always uses the f32 masters.
    pub half: Option<(DType, [&'a Buf; 6])>,
}

/// Which of the 16 parameters are the Linear weights `half` mirrors.
pub const LINEAR_WEIGHTS: [usize; 6] = [2, 4, 6, 8, 12, 14];

/// What one block keeps between forward and backward: everything, or (activation recompute)
/// only its input, from which the backward re-runs the forward.
pub enum Kept {
    All(Saved),
    Input(Buf),
}

/// What the forward keeps for the backward.
pub struct Saved {
    b: usize,
    t: usize,
    causal: bool,
    x: Buf,
    h1: Buf,
    mean1: Buf,
    rstd1: Buf,
    q: Buf,
    k: Buf,
    v: Buf,
    a: Buf,
    lse: Buf,
    xm: Buf,
    h2: Buf,
    mean2: Buf,
    rstd2: Buf,
    pre: Buf,
    u: Buf,
}

fn act_names(act: Activation) -> (&'static str, &'static str) {
    match act {
        Activation::QuickGelu => ("bias_quick_gelu_fwd_f32", "bias_quick_gelu_bwd_f32"),
        Activation::Gelu => ("bias_gelu_fwd_f32", "bias_gelu_bwd_f32"),
    }
}

fn shape(c: &TowerConfig, b: usize, t: usize, causal: bool) -> AttnShape {
    let hd = c.hidden / c.heads;
    AttnShape { batch: b, seq: t, heads: c.heads, head_dim: hd, causal, scale: 1.0 / (hd as f32).sqrt() }
}

/// y = x·Wᵀ + b for Linear weight `j` of [`LINEAR_WEIGHTS`]: the half-precision copy when there is one.
#[allow(clippy::too_many_arguments)]
fn lin(ops: &dyn DeviceOps, blk: &DevBlock, j: usize, x: &Buf, bias: Option<&Buf>, y: &Buf, m: usize, n: usize, k: usize) -> Result<()> {
    match blk.half {
        Some((DType::BF16, h)) => ops.linear_bf16(x, h[j], bias, y, m, n, k),
        Some((DType::F16, h)) => ops.linear_f16(x, h[j], bias, y, m, n, k),
        Some((DType::F32, _)) => Err(Error::msg("train_block: the Linear weight copies must be bf16 or f16, not f32")),
        None => ops.linear(x, blk.p[LINEAR_WEIGHTS[j]], bias, y, m, n, k),
    }
}

/// The forward keeping what `recompute` asks for: all activations, or only the block's input.
pub fn forward_kept(ops: &dyn DeviceOps, blk: &DevBlock, x: &Buf, b: usize, t: usize, causal: bool, recompute: bool) -> Result<(Buf, Kept)> {
    let (y, s) = forward(ops, blk, x, b, t, causal)?;
    Ok((y, if recompute { Kept::Input(s.x) } else { Kept::All(s) }))
}

/// The backward from what [`forward_kept`] kept (re-running the forward first for `Kept::Input`).
pub fn backward_kept(ops: &dyn DeviceOps, blk: &DevBlock, kept: &Kept, dy: &Buf, b: usize, t: usize, causal: bool) -> Result<(Buf, Vec<Buf>)> {
    match kept {
        Kept::All(s) => backward(ops, blk, s, dy),
        Kept::Input(x) => backward(ops, blk, &forward(ops, blk, x, b, t, causal)?.1, dy),
    }
}

/// x [B·T, W] → y [B·T, W] and the saved activations.
pub fn forward(ops: &dyn DeviceOps, blk: &DevBlock, x: &Buf, b: usize, t: usize, causal: bool) -> Result<(Buf, Saved)> {
    let (c, p) = (blk.cfg, &blk.p);
    let (r, w, inter) = (b * t, c.hidden, c.intermediate);
    let (h1, mean1, rstd1) = ln_fwd(ops, x, p[0], p[1], r, w, c.eps)?;
    let (q, k, v) = (ops.alloc(r * w)?, ops.alloc(r * w)?, ops.alloc(r * w)?);
    lin(ops, blk, 0, &h1, Some(p[3]), &q, r, w, w)?;
    lin(ops, blk, 1, &h1, Some(p[5]), &k, r, w, w)?;
    lin(ops, blk, 2, &h1, Some(p[7]), &v, r, w, w)?;
    let s = shape(c, b, t, causal);
    let (att, lse) = (ops.alloc(r * w)?, ops.alloc(b * c.heads * t)?);
    let l = attention_fwd_launch(&s, DType::F32)?;
    let mut a = KernelArgs::new().ptr(q.ptr()).ptr(k.ptr()).ptr(v.ptr()).ptr(att.ptr()).ptr(lse.ptr()).i32(b as i32).i32(t as i32).i32(c.heads as i32).i32(s.head_dim as i32).i32(causal as i32).f32(s.scale);
    ops.launch(&l.kernel, LaunchCfg::new(l.grid, l.block, l.smem_bytes), &mut a)?;
    let o = ops.alloc(r * w)?;
    lin(ops, blk, 3, &att, Some(p[9]), &o, r, w, w)?;
    let xm = copy(ops, x, r * w)?; // x + o, written by the residual LayerNorm
    let h2 = ops.alloc(r * w)?;
    let (mean2, rstd2) = (ops.alloc(r)?, ops.alloc(r)?);
    let mut a = KernelArgs::new().ptr(xm.ptr()).ptr(o.ptr()).ptr(p[10].ptr()).ptr(p[11].ptr()).ptr(h2.ptr()).ptr(mean2.ptr()).ptr(rstd2.ptr()).i32(r as i32).i32(w as i32).f32(c.eps);
    ops.launch("residual_layernorm_fwd_f32", ln_cfg(r), &mut a)?;
    let (u, pre) = (ops.alloc(r * inter)?, ops.alloc(r * inter)?);
    lin(ops, blk, 4, &h2, None, &u, r, inter, w)?;
    let (fwd, _) = act_names(c.act);
    let g = r.clamp(1, 64) as u32;
    let mut a = KernelArgs::new().ptr(u.ptr()).ptr(p[13].ptr()).ptr(pre.ptr()).i32(r as i32).i32(inter as i32);
    ops.launch(fwd, LaunchCfg::new((inter.div_ceil(256) as u32, g, 1), (256, 1, 1), 0), &mut a)?;
    let f = ops.alloc(r * w)?;
    lin(ops, blk, 5, &u, Some(p[15]), &f, r, w, inter)?;
    let y = copy(ops, &xm, r * w)?;
    axpy(ops, &y, &f, 1.0, r * w)?;
    let x = copy(ops, x, r * w)?;
    Ok((y, Saved { b, t, causal, x, h1, mean1, rstd1, q, k, v, a: att, lse, xm, h2, mean2, rstd2, pre, u }))
}

/// Linear backward for y = x·Wᵀ + b: accumulates dx (beta 1 unless `first`), returns (dW, db).
#[allow(clippy::too_many_arguments)]
fn linear_bwd(ops: &dyn DeviceOps, dy: &Buf, x: &Buf, wt: &Buf, dx: &Buf, first: bool, r: usize, n_out: usize, n_in: usize) -> Result<(Buf, Buf)> {
    ops.gemm(dy, wt, dx, r, n_in, n_out, false, false, if first { 0.0 } else { 1.0 })?; // dx (+)= dy·W
    let dw = ops.alloc(n_out * n_in)?;
    ops.gemm(dy, x, &dw, n_out, n_in, r, true, false, 0.0)?; // dW = dyᵀ·x
    Ok((dw, col_sums(ops, dy, r, n_out)?))
}

/// dy [B·T, W] → (dx, the 16 parameter gradients in `BLOCK_PARAMS` order).
pub fn backward(ops: &dyn DeviceOps, blk: &DevBlock, s: &Saved, dy: &Buf) -> Result<(Buf, Vec<Buf>)> {
    let (c, p) = (blk.cfg, &blk.p);
    let (r, w, inter) = (s.b * s.t, c.hidden, c.intermediate);
    // MLP: y = xm + fc2(act(fc1(ln2(xm))))
    let du = ops.alloc(r * inter)?;
    let (dw2, db2) = linear_bwd(ops, dy, &s.u, p[14], &du, true, r, w, inter)?;
    let g = r.clamp(1, 64);
    let partial = ops.alloc(g * inter)?;
    let (_, bwd) = act_names(c.act);
    let mut a = KernelArgs::new().ptr(du.ptr()).ptr(s.pre.ptr()).ptr(du.ptr()).ptr(partial.ptr()).i32(r as i32).i32(inter as i32);
    ops.launch(bwd, LaunchCfg::new((inter.div_ceil(256) as u32, g as u32, 1), (256, 1, 1), 0), &mut a)?;
    let db1 = col_sums(ops, &partial, g, inter)?;
    let dh2 = ops.alloc(r * w)?;
    ops.gemm(&du, p[12], &dh2, r, w, inter, false, false, 0.0)?;
    let dw1 = ops.alloc(inter * w)?;
    ops.gemm(&du, &s.h2, &dw1, inter, w, r, true, false, 0.0)?;
    let (dxm2, dg2, dbeta2) = ln_bwd(ops, &dh2, &s.xm, p[10], &s.mean2, &s.rstd2, r, w)?;
    let dxm = copy(ops, dy, r * w)?;
    axpy(ops, &dxm, &dxm2, 1.0, r * w)?;
    // attention: xm = x + out_proj(attn(q, k, v))
    let da = ops.alloc(r * w)?;
    let (dwo, dbo) = linear_bwd(ops, &dxm, &s.a, p[8], &da, true, r, w, w)?;
    let sh = shape(c, s.b, s.t, s.causal);
    let (dq, dk, dv) = (ops.alloc(r * w)?, ops.alloc(r * w)?, ops.alloc(r * w)?);
    let l = attention_bwd_launch(&sh, DType::F32)?;
    let mut a = KernelArgs::new()
        .ptr(s.q.ptr()).ptr(s.k.ptr()).ptr(s.v.ptr()).ptr(s.a.ptr()).ptr(da.ptr()).ptr(s.lse.ptr())
        .ptr(dq.ptr()).ptr(dk.ptr()).ptr(dv.ptr())
        .i32(s.b as i32).i32(s.t as i32).i32(c.heads as i32).i32(sh.head_dim as i32).i32(s.causal as i32).f32(sh.scale);
    ops.launch(&l.kernel, LaunchCfg::new(l.grid, l.block, l.smem_bytes), &mut a)?;
    let dh1 = ops.alloc(r * w)?;
    let (dwq, dbq) = linear_bwd(ops, &dq, &s.h1, p[2], &dh1, true, r, w, w)?;
    let (dwk, dbk) = linear_bwd(ops, &dk, &s.h1, p[4], &dh1, false, r, w, w)?;
    let (dwv, dbv) = linear_bwd(ops, &dv, &s.h1, p[6], &dh1, false, r, w, w)?;
    let (dx1, dg1, dbeta1) = ln_bwd(ops, &dh1, &s.x, p[0], &s.mean1, &s.rstd1, r, w)?;
    axpy(ops, &dxm, &dx1, 1.0, r * w)?; // dx = dxm + d(ln1 path)
    Ok((dxm, vec![dg1, dbeta1, dwq, dbq, dwk, dbk, dwv, dbv, dwo, dbo, dg2, dbeta2, dw1, db1, dw2, db2]))
}
