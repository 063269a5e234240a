//! Long-CLIP's fine-tuning loss (methods.md §2.4, the current official code):
//!   L = L_long + L_short,
//!   L_long  = ½[CE(τ·I·T_longᵀ) + CE(τ·T_long·Iᵀ)]   with label smoothing 0.1,
//!   L_short = the same with I replaced by X̂ = PCA_k(I) (centre, project on the top-k principal
//!             subspace, add the mean back; not re-normalised) against the short captions,
//! where I, T are the L2-normalised image / text embeddings of the micro-batch, τ = exp(s) with s
//! the trained logit scale, and the targets are the diagonal.
//!
//! Many ranks (src/train/dist.rs), as the official code: I and T are the global micro-batch's
//! (every rank's rows, all-gathered), each rank's loss takes its own rows as the anchors (the mean
//! over ranks is the global loss), and the PCA runs on each rank's rows separately (the official
//! code does it on the per-GPU batch's normalised features, before the gather): `pca_group` rows
//! at a time, by default the per-rank micro-batch.
use super::data::Batch;
use super::dist::{gather_rows, my_rows};
use super::model::{StepVars, TrainClip};
use crate::autograd::{Tape, Var};
use crate::dist::Collective;
use crate::error::{Error, Result};
use std::ops::Range;
use std::rc::Rc;

/// Label smoothing of both Long-CLIP losses.
pub const LABEL_SMOOTHING: f32 = 0.1;

/// ½[CE(τ·a_r·bᵀ) + CE(τ·b_r·aᵀ)] with the rows `rows` of a, b [N, D] (normalised) as the anchors,
/// each targeting its own index; tau `[1]`. All rows: the batch's symmetric InfoNCE; a rank's rows:
/// that rank's share (the official code's per-GPU loss; the mean over ranks is the batch's).
pub fn symmetric_infonce(tape: &Tape, a: &Var, b: &Var, tau: &Var, smoothing: f32, rows: Range<usize>) -> Result<Var> {
    let n = a.shape()[0];
    let targets: Vec<u32> = rows.clone().map(|i| i as u32).collect();
    let (l1, l2) = if rows == (0..n) {
        let logits = tape.mul(&tape.linear(a, b, None)?, tau)?; // [N, N]
        (tape.cross_entropy(&logits, &targets, smoothing)?, tape.cross_entropy(&tape.transpose(&logits, 0, 1)?, &targets, smoothing)?)
    } else {
        let (ar, br) = (tape.narrow(a, 0, rows.start, rows.len())?, tape.narrow(b, 0, rows.start, rows.len())?); // [r, D]
        let l_ab = tape.mul(&tape.linear(&ar, b, None)?, tau)?; // [r, N]
        let l_ba = tape.mul(&tape.linear(&br, a, None)?, tau)?; // [r, N]
        (tape.cross_entropy(&l_ab, &targets, smoothing)?, tape.cross_entropy(&l_ba, &targets, smoothing)?)
    };
    Ok(tape.scale(&tape.add(&l1, &l2)?, 0.5))
}

/// The loss of one micro-batch: (L, L_long, L_short). With many ranks `batch` is this rank's
/// shard, the embeddings are all-gathered and the loss is this rank's share: its rows as anchors
/// against the global micro-batch. `pca_group`: rows per PCA group (None: the shard's size).
pub fn longclip_loss(
    tape: &Tape,
    model: &TrainClip,
    sv: &StepVars,
    batch: &Batch,
    pca_dim: usize,
    comm: &Rc<dyn Collective>,
    pca_group: Option<usize>,
) -> Result<(Var, f32, f32)> {
    let img = model.image_embeds(tape, sv, &batch.pixels)?; // [b, D]
                                                            // long and short captions as one packed text pass: one set of weight GEMMs over all tokens
    let b = batch.long_ids.len();
    let ids: Vec<Vec<u32>> = batch.long_ids.iter().chain(&batch.short_ids).cloned().collect();
    let both = model.text_embeds(tape, sv, &ids)?; // [2b, D]
    let long = tape.narrow(&both, 0, 0, b)?; // [b, D]
    let short = tape.narrow(&both, 0, b, b)?; // [b, D]
    let (img, long, short) = (gather_rows(tape, comm, &img)?, gather_rows(tape, comm, &long)?, gather_rows(tape, comm, &short)?); // [B, D] each
    longclip_head(tape, &img, &long, &short, model.logit_scale(sv)?, pca_dim, pca_group.unwrap_or(b), my_rows(&**comm, b))
}

/// The loss from the towers' (unnormalised) embeddings [B, D] and the logit scale s: what both
/// backends share (the CUDA trainer runs the towers on the device and this on the host). The PCA
/// target is computed over each `pca_group` consecutive rows (B or more: all of them); `rows`:
/// the anchors (all rows, or this rank's).
pub fn longclip_head(
    tape: &Tape,
    img: &Var,
    long: &Var,
    short: &Var,
    logit_scale: &Var,
    pca_dim: usize,
    pca_group: usize,
    rows: Range<usize>,
) -> Result<(Var, f32, f32)> {
    let img = tape.l2_normalize(img)?; // [B, D]
    let long = tape.l2_normalize(long)?; // [B, D]
    let short = tape.l2_normalize(short)?; // [B, D]
    let tau = tape.exp(logit_scale); // [1] or []
    let l_long = symmetric_infonce(tape, &img, &long, &tau, LABEL_SMOOTHING, rows.clone())?;
    let img_pca = grouped_pca(tape, &img, pca_dim, pca_group)?; // [B, D]
    let l_short = symmetric_infonce(tape, &img_pca, &short, &tau, LABEL_SMOOTHING, rows)?;
    let (a, b) = (l_long.item(), l_short.item());
    Ok((tape.add(&l_long, &l_short)?, a, b))
}

/// The PCA-k reconstruction of each `group` consecutive rows of x [B, D] on their own.
fn grouped_pca(tape: &Tape, x: &Var, k: usize, group: usize) -> Result<Var> {
    let n = x.shape()[0];
    if group == 0 || group >= n {
        return tape.pca_reconstruct(x, k);
    }
    if !n.is_multiple_of(group) {
        return Err(Error::msg(format!("--pca-group {group} does not divide the global micro-batch of {n}")));
    }
    let parts = (0..n / group).map(|g| tape.pca_reconstruct(&tape.narrow(x, 0, g * group, group)?, k)).collect::<Result<Vec<_>>>()?;
    tape.cat(&parts.iter().collect::<Vec<_>>(), 0)
}
