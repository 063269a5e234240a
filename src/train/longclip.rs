//! Long-CLIP's fine-tuning loss (methods.md §2.4, the current official code):
//!   L = L_long + L_short,
//!   L_long  = ½[CE(τ·I·T_longᵀ) + CE(τ·T_long·Iᵀ)]   with label smoothing 0.1,
//!   L_short = the same with I replaced by X̂ = PCA_k(I) (centre, project on the top-k principal
//!             subspace, add the mean back; not re-normalised) against the short captions,
//! where I, T are the L2-normalised image / text embeddings of the micro-batch, τ = exp(s) with s
//! the trained logit scale, and the targets are the diagonal.
use super::data::Batch;
use super::model::{StepVars, TrainClip};
use crate::autograd::{Tape, Var};
use crate::error::Result;

/// Label smoothing of both Long-CLIP losses.
pub const LABEL_SMOOTHING: f32 = 0.1;

/// ½[CE(τ·a·bᵀ) + CE(τ·b·aᵀ)] over the diagonal targets; a, b [N, D] normalised, tau [1].
pub fn symmetric_infonce(tape: &Tape, a: &Var, b: &Var, tau: &Var, smoothing: f32) -> Result<Var> {
    let n = a.shape()[0];
    let targets: Vec<u32> = (0..n as u32).collect();
    let logits = tape.mul(&tape.linear(a, b, None)?, tau)?; // [N, N]
    let l1 = tape.cross_entropy(&logits, &targets, smoothing)?;
    let l2 = tape.cross_entropy(&tape.transpose(&logits, 0, 1)?, &targets, smoothing)?;
    Ok(tape.scale(&tape.add(&l1, &l2)?, 0.5))
}

/// The loss of one micro-batch: (L, L_long, L_short).
pub fn longclip_loss(tape: &Tape, model: &TrainClip, sv: &StepVars, batch: &Batch, pca_dim: usize) -> Result<(Var, f32, f32)> {
    let img = model.image_embeds(tape, sv, &batch.pixels)?; // [B, D]
                                                            // long and short captions as one packed text pass: one set of weight GEMMs over all tokens
    let b = batch.long_ids.len();
    let ids: Vec<Vec<u32>> = batch.long_ids.iter().chain(&batch.short_ids).cloned().collect();
    let both = model.text_embeds(tape, sv, &ids)?; // [2B, D]
    let long = tape.narrow(&both, 0, 0, b)?; // [B, D]
    let short = tape.narrow(&both, 0, b, b)?; // [B, D]
    longclip_head(tape, &img, &long, &short, model.logit_scale(sv)?, pca_dim)
}

/// The loss from the towers' (unnormalised) embeddings [B, D] and the logit scale s: what both
/// backends share (the CUDA trainer runs the towers on the device and this on the host).
pub fn longclip_head(tape: &Tape, img: &Var, long: &Var, short: &Var, logit_scale: &Var, pca_dim: usize) -> Result<(Var, f32, f32)> {
    let img = tape.l2_normalize(img)?; // [B, D]
    let long = tape.l2_normalize(long)?; // [B, D]
    let short = tape.l2_normalize(short)?; // [B, D]
    let tau = tape.exp(logit_scale); // [1] or []
    let l_long = symmetric_infonce(tape, &img, &long, &tau, LABEL_SMOOTHING)?;
    let img_pca = tape.pca_reconstruct(&img, pca_dim)?; // [B, D]
    let l_short = symmetric_infonce(tape, &img_pca, &short, &tau, LABEL_SMOOTHING)?;
    let (a, b) = (l_long.item(), l_short.item());
    Ok((tape.add(&l_long, &l_short)?, a, b))
}
