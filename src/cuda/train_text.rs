//! The CLIP text tower for training on a CUDA device: token + position embeddings, the blocks of
//! [`super::train_block`] with their saved activations, pooling at the end-of-text token, the
//! final LayerNorm of the pooled rows and the projection — forward, and backward to every text
//! parameter. The token-embedding gradient is a scatter-add by token id, done on the host
//! (`ops::embedding::embedding_bwd`) after one download; everything else stays on the device.
//! tests/cuda_train_text.rs checks it on the emulator against the CPU tape's text tower.
use super::backend::{Buf, DeviceOps};
use super::launch::{KernelArgs, LaunchCfg};
use super::train_block::{backward as block_bwd, forward as block_fwd, DevBlock, Saved};
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
}

/// What the forward keeps.
pub struct TextSaved {
    b: usize,
    t: usize,
    flat: Vec<u32>,
    index: Buf,
    blocks: Vec<Saved>,
    pooled: Buf,
    mean: Buf,
    rstd: Buf,
    normed: Buf,
}

/// The gradients of one backward, in the order tok, pos, blocks (16 each), final γ, final β, proj.
pub struct TextGrads {
    pub tok: Vec<f32>,
    pub pos: Buf,
    pub blocks: Vec<Vec<Buf>>,
    pub final_g: Buf,
    pub final_b: Buf,
    pub proj: Buf,
}

fn grid(n: usize) -> LaunchCfg {
    LaunchCfg::new((n.div_ceil(256).clamp(1, 16_384) as u32, 1, 1), (256, 1, 1), 0)
}

/// Token ids (unpadded) → text embeddings [B, D] (not normalised) and the saved activations.
pub fn forward(ops: &dyn DeviceOps, m: &DevText, ids: &[Vec<u32>]) -> Result<(Buf, TextSaved), String> {
    let (b, w) = (ids.len(), m.cfg.tower.hidden);
    let t = ids.iter().map(|s| s.len()).max().unwrap_or(0);
    if b == 0 || t == 0 || t > m.cfg.max_positions {
        return Err(format!("text batch of {b} sequences up to {t} tokens ({} positions)", m.cfg.max_positions));
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
        let (y, s) = block_fwd(ops, blk, &x, b, t, true)?;
        saved.push(s);
        x = y;
    }
    let index: Vec<i32> = ids.iter().map(|s| pool_position(s, m.cfg.eos_token_id) as i32).collect();
    let index = ops.upload_i32(&index)?;
    let pooled = ops.alloc(b * w)?;
    let mut a = KernelArgs::new().ptr(x.ptr()).ptr(index.ptr()).ptr(pooled.ptr()).i32(b as i32).i32(t as i32).i32(w as i32);
    ops.launch("pool_rows_f32", grid(b * w), &mut a)?;
    let (normed, mean, rstd) = (ops.alloc(b * w)?, ops.alloc(b)?, ops.alloc(b)?);
    let mut a = KernelArgs::new().ptr(pooled.ptr()).ptr(m.final_g.ptr()).ptr(m.final_b.ptr()).ptr(normed.ptr()).ptr(mean.ptr()).ptr(rstd.ptr()).i32(b as i32).i32(w as i32).f32(m.cfg.tower.eps);
    ops.launch("layernorm_fwd_f32", LaunchCfg::new((b.div_ceil(4) as u32, 1, 1), (128, 1, 1), 0), &mut a)?;
    let e = ops.alloc(b * m.d)?;
    ops.linear(&normed, m.proj, None, &e, b, m.d, w)?;
    Ok((e, TextSaved { b, t, flat, index, blocks: saved, pooled, mean, rstd, normed }))
}

/// de [B, D] → the gradients of every text parameter.
pub fn backward(ops: &dyn DeviceOps, m: &DevText, s: &TextSaved, de: &Buf) -> Result<TextGrads, String> {
    let (b, t, w, d) = (s.b, s.t, m.cfg.tower.hidden, m.d);
    // projection (no bias): dnormed = de·P, dP = deᵀ·normed
    let dn = ops.alloc(b * w)?;
    ops.gemm(de, m.proj, &dn, b, w, d, false, false, 0.0)?;
    let dproj = ops.alloc(d * w)?;
    ops.gemm(de, &s.normed, &dproj, d, w, b, true, false, 0.0)?;
    // final LayerNorm of the pooled rows
    let parts = b.clamp(1, 8);
    let (dpool, pg, pb) = (ops.alloc(b * w)?, ops.alloc(parts * w)?, ops.alloc(parts * w)?);
    let mut a = KernelArgs::new().ptr(dn.ptr()).ptr(s.pooled.ptr()).ptr(m.final_g.ptr()).ptr(s.mean.ptr()).ptr(s.rstd.ptr()).ptr(dpool.ptr()).ptr(pg.ptr()).ptr(pb.ptr()).i32(b as i32).i32(w as i32);
    ops.launch("layernorm_bwd_f32", LaunchCfg::new((parts as u32, 1, 1), (128, 1, 1), 0), &mut a)?;
    let (dg, db) = (ops.alloc(w)?, ops.alloc(w)?);
    let mut a = KernelArgs::new().ptr(pg.ptr()).ptr(pb.ptr()).ptr(dg.ptr()).ptr(db.ptr()).i32(parts as i32).i32(w as i32);
    ops.launch("layernorm_bwd_reduce_f32", LaunchCfg::new((w.div_ceil(256) as u32, 1, 1), (256, 1, 1), 0), &mut a)?;
    // pooling
    let mut dx = ops.alloc(b * t * w)?;
    let mut a = KernelArgs::new().ptr(dpool.ptr()).ptr(s.index.ptr()).ptr(dx.ptr()).i32(b as i32).i32(t as i32).i32(w as i32);
    ops.launch("unpool_rows_f32", grid(b * w), &mut a)?;
    // blocks, last first
    let mut blocks = vec![];
    for (blk, sv) in m.blocks.iter().zip(&s.blocks).rev() {
        let (dxi, g) = block_bwd(ops, blk, sv, &dx)?;
        blocks.push(g);
        dx = dxi;
    }
    blocks.reverse();
    // embeddings: positions = the batch sum of dx (rows ≥ T stay zero); tokens scattered on the host
    let pos_rows = m.cfg.max_positions;
    let dpos = ops.alloc(pos_rows * w)?;
    let mut a = KernelArgs::new().ptr(dx.ptr()).ptr(dpos.ptr()).i32(b as i32).i32((t * w) as i32);
    ops.launch("bias_grad_reduce_f32", LaunchCfg::new(((t * w).div_ceil(256) as u32, 1, 1), (256, 1, 1), 0), &mut a)?;
    let dxh = ops.download(&dx)?;
    let tok = crate::ops::embedding::embedding_bwd(&dxh, m.cfg.vocab, w, &s.flat).map_err(|e| e.to_string())?;
    Ok(TextGrads { tok, pos: dpos, blocks, final_g: dg, final_b: db, proj: dproj })
}
