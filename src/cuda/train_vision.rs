//! The CLIP vision tower for training on a CUDA device: patch embedding (im2col + GEMM), class
//! token and positions, pre-LayerNorm, the blocks of [`super::train_block`], class-token pooling,
//! post-LayerNorm, projection — forward, and backward to every vision parameter, all on the
//! device (patch-weight gradient as one GEMM over the im2col matrix; class and position
//! gradients as batch reductions). tests/cuda_train_vision.rs checks it on the emulator against
//! the CPU tape's vision tower.
use super::backend::{Buf, DeviceOps};
use super::launch::KernelArgs;
use super::train_block::{backward_kept, forward_kept, DevBlock, Kept};
use super::train_ops::{col_sums, grid, ln_bwd, ln_fwd, projection_bwd};
use crate::error::Result;
use crate::model::config::VisionConfig;

pub struct DevVision<'a> {
    pub cfg: &'a VisionConfig,
    pub patch_w: &'a Buf, // embeddings.patch_embedding.weight [W, C, P, P]
    pub cls: &'a Buf,     // embeddings.class_embedding [W]
    pub pos: &'a Buf,     // embeddings.position_embedding.weight [T, W]
    pub pre_g: &'a Buf,
    pub pre_b: &'a Buf,
    pub blocks: Vec<DevBlock<'a>>,
    pub post_g: &'a Buf,
    pub post_b: &'a Buf,
    pub proj: &'a Buf, // visual_projection.weight [D, W]
    pub d: usize,
    /// Keep only each block's input and recompute its activations in the backward.
    pub recompute: bool,
}

pub struct VisionSaved {
    b: usize,
    cols: Buf,
    x: Buf,
    mean0: Buf,
    rstd0: Buf,
    blocks: Vec<Kept>,
    index: Buf,
    pooled: Buf,
    mean1: Buf,
    rstd1: Buf,
    normed: Buf,
}

pub struct VisionGrads {
    pub patch_w: Buf,
    pub cls: Buf,
    pub pos: Buf,
    pub pre_g: Buf,
    pub pre_b: Buf,
    pub blocks: Vec<Vec<Buf>>,
    pub post_g: Buf,
    pub post_b: Buf,
    pub proj: Buf,
}

/// pixels [B, C, S, S] (host) → image embeddings [B, D] (not normalised) and the saved activations.
pub fn forward(ops: &dyn DeviceOps, m: &DevVision, pixels: &[f32], b: usize) -> Result<(Buf, VisionSaved)> {
    let (c, s, p, w) = (m.cfg.channels, m.cfg.image_size, m.cfg.patch_size, m.cfg.tower.hidden);
    let (t, n, k) = (m.cfg.tokens(), m.cfg.tokens() - 1, c * p * p);
    if b == 0 || pixels.len() != b * c * s * s {
        return Err(crate::shape_err!("vision training forward: {} pixel values for B = {b}, [{c}, {s}, {s}]", pixels.len()));
    }
    let px = ops.upload(pixels)?;
    let cols = ops.alloc(b * n * k)?;
    let mut a = KernelArgs::new().ptr(px.ptr()).ptr(cols.ptr()).i32(b as i32).i32(c as i32).i32(s as i32).i32(p as i32);
    ops.launch("patch_im2col_f32", grid(b * n * k), &mut a)?;
    let patches = ops.alloc(b * n * w)?;
    ops.linear(&cols, m.patch_w, None, &patches, b * n, w, k)?;
    let x = ops.alloc(b * t * w)?;
    let mut a = KernelArgs::new().ptr(patches.ptr()).ptr(m.cls.ptr()).ptr(m.pos.ptr()).ptr(x.ptr()).i32(b as i32).i32(n as i32).i32(w as i32);
    ops.launch("vision_embed_assemble_f32", grid(b * t * w), &mut a)?;
    let (mut h, mean0, rstd0) = ln_fwd(ops, &x, m.pre_g, m.pre_b, b * t, w, m.cfg.tower.eps)?;
    let mut saved = vec![];
    for blk in &m.blocks {
        let (y, sv) = forward_kept(ops, blk, &h, b, t, false, m.recompute)?;
        saved.push(sv);
        h = y;
    }
    let index = ops.upload_i32(&vec![0i32; b])?;
    let pooled = ops.alloc(b * w)?;
    let mut a = KernelArgs::new().ptr(h.ptr()).ptr(index.ptr()).ptr(pooled.ptr()).i32(b as i32).i32(t as i32).i32(w as i32);
    ops.launch("pool_rows_f32", grid(b * w), &mut a)?;
    let (normed, mean1, rstd1) = ln_fwd(ops, &pooled, m.post_g, m.post_b, b, w, m.cfg.tower.eps)?;
    let e = ops.alloc(b * m.d)?;
    ops.linear(&normed, m.proj, None, &e, b, m.d, w)?;
    Ok((e, VisionSaved { b, cols, x, mean0, rstd0, blocks: saved, index, pooled, mean1, rstd1, normed }))
}

/// de [B, D] → the gradients of every vision parameter.
pub fn backward(ops: &dyn DeviceOps, m: &DevVision, s: &VisionSaved, de: &Buf) -> Result<VisionGrads> {
    let (b, w, d) = (s.b, m.cfg.tower.hidden, m.d);
    let (t, n, k) = (m.cfg.tokens(), m.cfg.tokens() - 1, m.cfg.channels * m.cfg.patch_size * m.cfg.patch_size);
    let (dn, dproj) = projection_bwd(ops, de, &s.normed, m.proj, b, d, w)?;
    let (dpool, post_g, post_b) = ln_bwd(ops, &dn, &s.pooled, m.post_g, &s.mean1, &s.rstd1, b, w)?;
    let mut dx = ops.alloc(b * t * w)?;
    let mut a = KernelArgs::new().ptr(dpool.ptr()).ptr(s.index.ptr()).ptr(dx.ptr()).i32(b as i32).i32(t as i32).i32(w as i32);
    ops.launch("unpool_rows_f32", grid(b * w), &mut a)?;
    let mut blocks = vec![];
    for (blk, sv) in m.blocks.iter().zip(&s.blocks).rev() {
        let (dxi, g) = backward_kept(ops, blk, sv, &dx, b, t, false)?;
        blocks.push(g);
        dx = dxi;
    }
    blocks.reverse();
    let (demb, pre_g, pre_b) = ln_bwd(ops, &dx, &s.x, m.pre_g, &s.mean0, &s.rstd0, b * t, w)?;
    let pos = col_sums(ops, &demb, b, t * w)?; // [T, W]: the batch sum
    let dcls_rows = ops.alloc(b * w)?;
    let mut a = KernelArgs::new().ptr(demb.ptr()).ptr(s.index.ptr()).ptr(dcls_rows.ptr()).i32(b as i32).i32(t as i32).i32(w as i32);
    ops.launch("pool_rows_f32", grid(b * w), &mut a)?; // the class rows
    let cls = col_sums(ops, &dcls_rows, b, w)?;
    let dpatches = ops.alloc(b * n * w)?;
    let mut a = KernelArgs::new().ptr(demb.ptr()).ptr(dpatches.ptr()).i32(b as i32).i32(n as i32).i32(w as i32);
    ops.launch("vision_embed_bwd_f32", grid(b * n * w), &mut a)?;
    let patch_w = ops.alloc(w * k)?;
    ops.gemm(&dpatches, &s.cols, &patch_w, w, k, b * n, true, false, 0.0)?; // dW = dpatchesᵀ·cols
    Ok(VisionGrads { patch_w, cls, pos, pre_g, pre_b, blocks, post_g, post_b, proj: dproj })
}
