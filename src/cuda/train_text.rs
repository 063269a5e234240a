//! The CLIP text tower for training on a CUDA device: token + position embeddings, the blocks of
//! [`super::train_block`] with their saved activations, pooling at the end-of-text token, the
//! final LayerNorm of the pooled rows and the projection — forward, and backward to every text
//! parameter, all on the device: the token-embedding gradient is a deterministic scatter-add
//! (`embedding_bwd_rows_f32`, positions grouped by id on the host from the ids alone).
//! tests/cuda_train_text.rs checks it on the emulator against the CPU tape's text tower.
use super::backend::{Buf, DeviceOps};
use super::launch::KernelArgs;
use super::train_block::{backward_kept, forward_kept, DevBlock, Kept};
use super::train_ops::{axpy, col_sums, grid, ln_bwd, ln_fwd, projection_bwd};
use crate::error::Result;
use crate::model::config::TextConfig;
use crate::model::text::pool_position;

/// The text tower's parameters on the device (HF names in comments).
pub struct DevText<'a> {
    pub cfg: &'a TextConfig,
    pub tok: &'a Buf,           // embeddings.token_embedding.weight [V, W]
    pub pos: &'a Buf,           // embeddings.position_embedding.weight [P, W]
    pub blocks: Vec<DevBlock<'a>>,
    pub final_g: &'a Buf,       // final_layer_norm.weight
    pub final_b: &'a Buf,       // final_layer_norm.bias
    pub proj: &'a Buf,          // text_projection.weight [D, W]
    pub d: usize,
    /// Keep only each block's input and recompute its activations in the backward.
    pub recompute: bool,
}

/// What the forward keeps.
pub struct TextSaved {
    b: usize,
    t: usize,
    flat: Vec<u32>,
    index: Buf,
    blocks: Vec<Kept>,
    pooled: Buf,
    mean: Buf,
    rstd: Buf,
    normed: Buf,
}

/// The gradients of one backward, in the order pos, blocks (16 each), final γ, final β, proj (the
/// token table's is added into the caller's buffer).
pub struct TextGrads {
    pub pos: Buf,
    pub blocks: Vec<Vec<Buf>>,
    pub final_g: Buf,
    pub final_b: Buf,
    pub proj: Buf,
}

/// Token ids (unpadded) → text embeddings [B, D] (not normalised) and the saved activations.
pub fn forward(ops: &dyn DeviceOps, m: &DevText, ids: &[Vec<u32>]) -> Result<(Buf, TextSaved)> {
    let (b, w) = (ids.len(), m.cfg.tower.hidden);
    let t = ids.iter().map(|s| s.len()).max().unwrap_or(0);
    if b == 0 || t == 0 || t > m.cfg.max_positions {
        return Err(crate::shape_err!("text batch of {b} sequences up to {t} tokens ({} positions)", m.cfg.max_positions));
    }
    let mut flat = Vec::with_capacity(b * t);
    for s in ids {
        flat.extend_from_slice(s);
        flat.extend(std::iter::repeat(m.cfg.eos_token_id).take(t - s.len()));
    }
    let idb = ops.upload_i32(&flat.iter().map(|&v| v as i32).collect::<Vec<_>>())?;
    let mut x = ops.alloc(b * t * w)?;
    let mut a = KernelArgs::new().ptr(idb.ptr()).ptr(m.tok.ptr()).ptr(m.pos.ptr()).ptr(x.ptr()).i32(b as i32).i32(t as i32).i32(w as i32);
    ops.launch("text_embed_f32", grid(b * t * w), &mut a)?;
    let mut saved = vec![];
    for blk in &m.blocks {
        let (y, s) = forward_kept(ops, blk, &x, b, t, true, m.recompute)?;
        saved.push(s);
        x = y;
    }
    let index: Vec<i32> = ids.iter().map(|s| pool_position(s, m.cfg.eos_token_id) as i32).collect();
    let index = ops.upload_i32(&index)?;
    let pooled = ops.alloc(b * w)?;
    let mut a = KernelArgs::new().ptr(x.ptr()).ptr(index.ptr()).ptr(pooled.ptr()).i32(b as i32).i32(t as i32).i32(w as i32);
    ops.launch("pool_rows_f32", grid(b * w), &mut a)?;
    let (normed, mean, rstd) = ln_fwd(ops, &pooled, m.final_g, m.final_b, b, w, m.cfg.tower.eps)?;
    let e = ops.alloc(b * m.d)?;
    ops.linear(&normed, m.proj, None, &e, b, m.d, w)?;
    Ok((e, TextSaved { b, t, flat, index, blocks: saved, pooled, mean, rstd, normed }))
}

/// de [B, D] → the gradients of every text parameter; the token table's is added to `dtok` [V, W].
pub fn backward(ops: &dyn DeviceOps, m: &DevText, s: &TextSaved, de: &Buf, dtok: &Buf) -> Result<TextGrads> {
    let (b, t, w, d) = (s.b, s.t, m.cfg.tower.hidden, m.d);
    let (dn, dproj) = projection_bwd(ops, de, &s.normed, m.proj, b, d, w)?;
    let (dpool, dg, db) = ln_bwd(ops, &dn, &s.pooled, m.final_g, &s.mean, &s.rstd, b, w)?; // final LayerNorm
    // pooling
    let mut dx = ops.alloc(b * t * w)?;
    let mut a = KernelArgs::new().ptr(dpool.ptr()).ptr(s.index.ptr()).ptr(dx.ptr()).i32(b as i32).i32(t as i32).i32(w as i32);
    ops.launch("unpool_rows_f32", grid(b * w), &mut a)?;
    // blocks, last first
    let mut blocks = vec![];
    for (blk, sv) in m.blocks.iter().zip(&s.blocks).rev() {
        let (dxi, g) = backward_kept(ops, blk, sv, &dx, b, t, true)?;
        blocks.push(g);
        dx = dxi;
    }
    blocks.reverse();
    // embeddings: positions = the batch sum of dx (rows ≥ T stay zero); tokens scattered by id
    let pos_rows = m.cfg.max_positions;
    let dpos = ops.alloc(pos_rows * w)?;
    axpy(ops, &dpos, &col_sums(ops, &dx, b, t * w)?, 1.0, t * w)?; // rows < T; the rest stay zero
    if dtok.len() < m.cfg.vocab * w {
        return Err(crate::shape_err!("token gradient buffer of {} values for a [{}, {w}] table", dtok.len(), m.cfg.vocab));
    }
    let (order, starts, uniq) = crate::ops::embedding::group_by_id(&s.flat);
    let u = uniq.len();
    let (order, starts, uniq) = (ops.upload_i32(&order)?, ops.upload_i32(&starts)?, ops.upload_i32(&uniq)?);
    let mut a = KernelArgs::new().ptr(dx.ptr()).ptr(order.ptr()).ptr(starts.ptr()).ptr(uniq.ptr()).ptr(dtok.ptr()).i32(u as i32).i32(w as i32);
    ops.launch("embedding_bwd_rows_f32", grid(u * w), &mut a)?;
    Ok(TextGrads { pos: dpos, blocks, final_g: dg, final_b: db, proj: dproj })
}
