//! SmartCLIP (methods.md §3): a mask network picks which embedding dimensions a caption speaks
//! about, and the loss aligns images and captions modularly.
//!
//! Mask network (names under `mask_net.`): one pre-LN transformer block of the text tower's
//! width and heads over the text tower's final token states (causal, like the tower, so the
//! padding after the end token never reaches a real token), attention pooling over the valid
//! tokens (a learned query q: weights softmax_t(q·(W_k h_t + b_k)/√W), pooled Σ_t w_t·(W_v h_t +
//! b_v)), a projection to the embedding size D, a sigmoid, and straight-through binarisation at
//! 0.5 (forward: 1[s > 0.5]; backward: the identity, so the gradient reaches s).
//!
//! Loss (eq. 21, cosine similarity): with S[a, b] = cos(I_a ⊙ m_b, T_b),
//!   L = λ_align·(CE(τ·S, diag) + CE(τ·Sᵀ, diag)) + λ_sparsity·mean_b ‖m_b‖₁,
//! where rows of S are the L_ctrI anchors (image a against every caption b, each masking the image
//! with its own mask) and rows of Sᵀ the L_ctrT anchors (caption a against every image b, all
//! masked with caption a's mask); τ = exp(logit_scale). Computed as
//! S = (I·(M⊙T)ᵀ) / (sqrt((I⊙I)·(M⊙M)ᵀ + ε) ⊙ ‖T_b‖).
use super::dist::{gather_rows, my_rows};
use super::model::{block, StepVars, TrainClip};
use crate::autograd::{Tape, Var};
use crate::dist::Collective;
use crate::error::Result;
use crate::model::schema::BlockParam;
use crate::model::synthetic::Rng;
use crate::ops::elementwise::Unary;
use crate::tensor::Tensor;
use std::path::Path;
use std::rc::Rc;

pub const MASK_FILE: &str = "mask_net.safetensors";

/// The mask network's parameter names and shapes for text width `w` and embedding size `d`.
pub fn mask_param_shapes(w: usize, inter: usize, d: usize) -> Vec<(String, Vec<usize>)> {
    let mut v: Vec<(String, Vec<usize>)> = BlockParam::ALL.iter().map(|p| (format!("mask_net.block.{}", p.name()), p.shape(w, inter))).collect();
    v.extend([
        ("mask_net.pool.query".to_string(), vec![w]),
        ("mask_net.pool.k.weight".into(), vec![w, w]),
        ("mask_net.pool.k.bias".into(), vec![w]),
        ("mask_net.pool.v.weight".into(), vec![w, w]),
        ("mask_net.pool.v.bias".into(), vec![w]),
        ("mask_net.proj.weight".into(), vec![d, w]),
        ("mask_net.proj.bias".into(), vec![d]),
    ]);
    v
}

/// Fresh mask-network parameters: weights N(0, 0.02), LayerNorm γ = 1, biases and β = 0.
pub fn init_mask_params(model: &TrainClip, seed: u64) -> Result<Vec<(String, Tensor)>> {
    let t = &model.config.text.tower;
    let mut rng = Rng::new(seed ^ 0x5A5A_0F0F);
    mask_param_shapes(t.hidden, t.intermediate, model.config.projection_dim)
        .into_iter()
        .map(|(n, s)| {
            let len: usize = s.iter().product();
            let v: Vec<f32> = if n.ends_with("norm1.weight") || n.ends_with("norm2.weight") {
                vec![1.0; len]
            } else if s.len() == 2 || n.ends_with("query") {
                (0..len).map(|_| 0.02 * rng.normal()).collect()
            } else {
                vec![0.0; len]
            };
            Ok((n, Tensor::from_vec(v, &s)?))
        })
        .collect()
}

/// Loads `mask_net.*` tensors (f32) from a safetensors file, shapes checked against the model.
pub fn load_mask_params(model: &TrainClip, path: &Path) -> Result<Vec<(String, Tensor)>> {
    let w = crate::model::Weights::open(path)?;
    let t = &model.config.text.tower;
    mask_param_shapes(t.hidden, t.intermediate, model.config.projection_dim)
        .into_iter()
        .map(|(n, s)| Ok((n.clone(), Tensor::from_vec(w.get_shaped(&n, &s)?.to_vec_f32(), &s)?)))
        .collect()
}

/// Straight-through binarisation: forward 1[s > 0.5], backward the identity.
fn binarize(tape: &Tape, soft: &Var) -> Var {
    let hard = soft.value().map_f32(|v| if v > 0.5 { 1.0 } else { 0.0 });
    tape.custom(&[soft], hard, |g| Ok(vec![Some(g.clone())]))
}

/// The masks [B, D] (binary values, straight-through gradient) of captions with token states
/// `h` [B, T, W]; `valid[b]` = number of tokens of caption b (its end token included).
/// `p`: the mask parameters in [`mask_param_shapes`] order, as tape values.
pub fn masks(tape: &Tape, model: &TrainClip, p: &[Var], h: &Var, valid: &[usize]) -> Result<Var> {
    let t = &model.config.text.tower;
    let s = h.shape().to_vec();
    let (b, tt, w) = (s[0], s[1], s[2]);
    let x = block(tape, h, &p[..16], t, true)?; // [B, T, W]
    let k = tape.linear(&x, &p[17], Some(&p[18]))?; // [B, T, W]
    let v = tape.linear(&x, &p[19], Some(&p[20]))?; // [B, T, W]
    let q = tape.reshape(&p[16], &[1, w])?;
    let scores = tape.scale(&tape.reshape(&tape.linear(&k, &q, None)?, &[b, tt])?, 1.0 / (w as f32).sqrt()); // [B, T]
    let mask: Vec<f32> = (0..b * tt).map(|i| if i % tt < valid[i / tt] { 0.0 } else { -1e9 }).collect();
    let weights = tape.softmax(&tape.add(&scores, &tape.constant(Tensor::from_vec(mask, &[b, tt])?))?)?; // [B, T]
    let pooled = tape.sum(&tape.mul(&tape.reshape(&weights, &[b, tt, 1])?, &v)?, 1, false)?; // [B, W]
    let logits = tape.linear(&pooled, &p[21], Some(&p[22]))?; // [B, D]
    let soft = sigmoid(tape, &logits)?;
    Ok(binarize(tape, &soft))
}

/// σ(x) = 1 / (1 + e^(−x)) from tape ops.
fn sigmoid(tape: &Tape, x: &Var) -> Result<Var> {
    let e = tape.exp(&tape.scale(x, -1.0));
    let one = tape.constant(Tensor::scalar(1.0));
    tape.div(&one, &tape.add(&one, &e)?)
}

/// The SmartCLIP loss of a batch: (L, L_align part, mean ‖m‖₁). With many ranks `pixels` and `ids`
/// are this rank's shard, the image embeddings, text embeddings and masks are all-gathered, and the
/// loss is this rank's share: its images and captions as the anchors against the global
/// micro-batch, its masks' L1 (the mean over ranks is the global loss).
pub fn smartclip_loss(
    tape: &Tape,
    model: &TrainClip,
    sv: &StepVars,
    mask_p: &[Var],
    pixels: &Tensor,
    ids: &[Vec<u32>],
    lambda_align: f32,
    lambda_sparsity: f32,
    comm: &Rc<dyn Collective>,
) -> Result<(Var, f32, f32)> {
    let img = model.image_embeds(tape, sv, pixels)?; // [b, D]
    let (h, txt) = model.text_states(tape, sv, ids)?; // [b, T, W], [b, D]
    let valid: Vec<usize> = ids.iter().map(|s| crate::model::text::pool_position(s, model.config.text.eos_token_id) + 1).collect();
    let m = masks(tape, model, mask_p, &h, &valid)?; // [b, D]
    let b = ids.len();
    let rows = my_rows(&**comm, b);
    let (img_all, txt_all, m_all) = (gather_rows(tape, comm, &img)?, gather_rows(tape, comm, &txt)?, gather_rows(tape, comm, &m)?); // [B, D] each
    let tau = tape.exp(model.logit_scale(sv)?);
    let targets: Vec<u32> = rows.clone().map(|i| i as u32).collect();
    let (l_i, l_t) = if comm.world() == 1 {
        let logits = tape.mul(&masked_cos(tape, &img_all, &m_all, &txt_all)?, &tau)?; // [B, B]
        (tape.cross_entropy(&logits, &targets, 0.0)?, tape.cross_entropy(&tape.transpose(&logits, 0, 1)?, &targets, 0.0)?)
    } else {
        let mine = |x: &Var| tape.narrow(x, 0, rows.start, b);
        let s_img = masked_cos(tape, &mine(&img_all)?, &m_all, &txt_all)?; // [b, B]: this rank's images against every caption
        let s_txt = tape.transpose(&masked_cos(tape, &img_all, &mine(&m_all)?, &mine(&txt_all)?)?, 0, 1)?; // [b, B]: its captions against every image
        (tape.cross_entropy(&tape.mul(&s_img, &tau)?, &targets, 0.0)?, tape.cross_entropy(&tape.mul(&s_txt, &tau)?, &targets, 0.0)?)
    };
    let align = tape.add(&l_i, &l_t)?;
    let l1 = tape.scale(&tape.sum_all(&m)?, 1.0 / b as f32); // mean_b ‖m_b‖₁ over this rank's captions (m ≥ 0)
    let loss = tape.add(&tape.scale(&align, lambda_align), &tape.scale(&l1, lambda_sparsity))?;
    Ok((loss, align.item(), l1.item()))
}

/// S[a, b] = cos(I_a ⊙ m_b, T_b) for images I [p, D] against captions with masks m and
/// embeddings T [q, D]: (I·(M⊙T)ᵀ) / (sqrt((I⊙I)·(M⊙M)ᵀ + ε) ⊙ ‖T_b‖) → [p, q].
fn masked_cos(tape: &Tape, img: &Var, m: &Var, txt: &Var) -> Result<Var> {
    let q = txt.shape()[0];
    let num = tape.linear(img, &tape.mul(m, txt)?, None)?; // [p, q]: I_a · (m_b ⊙ T_b)
    let sq = tape.linear(&tape.mul(img, img)?, &tape.mul(m, m)?, None)?; // [p, q]
    let img_norm = tape.unary(&tape.add(&sq, &tape.constant(Tensor::scalar(1e-12)))?, Unary::Sqrt); // ‖I_a ⊙ m_b‖
    let txt_norm = tape.reshape(&tape.unary(&tape.sum(&tape.mul(txt, txt)?, 1, false)?, Unary::Sqrt), &[1, q])?; // [1, q]
    tape.div(&num, &tape.mul(&img_norm, &txt_norm)?) // [p, q] cosine
}

/// The binary masks [N·D] of `texts` from a model directory with a `mask_net.safetensors`
/// (what `clipforge finetune --method smartclip` and `convert` write) or a SmartCLIP `.pt`,
/// computed on the CPU without recording.
pub fn text_masks(dir: &Path, tok: &crate::io::tokenizer::ClipTokenizer, texts: &[String], batch: usize) -> Result<Vec<f32>> {
    let (model, extra) = if crate::io::pt::is_pt_file(dir) {
        // a released SmartCLIP checkpoint, converted in memory
        let c = crate::model::convert::convert_pt(dir)?;
        let mask = c.mask_net.clone().ok_or_else(|| crate::error::Error::file(dir, "has no mask network (mask_net.*): --mask needs a SmartCLIP checkpoint"))?;
        (TrainClip::from_weights(&c.weights(), &c.config)?, mask)
    } else {
        let file = dir.join(MASK_FILE);
        if !file.is_file() {
            return Err(crate::error::Error::file(&file, "missing: --mask needs a SmartCLIP model (clipforge finetune --method smartclip)"));
        }
        let model = TrainClip::load_dir(dir)?;
        let extra = load_mask_params(&model, &file)?;
        (model, extra)
    };
    let mut ids = vec![];
    for chunk in texts.chunks(batch.max(1)) {
        ids.extend(tok.encode_batch(chunk)?);
    }
    id_masks(model, extra, &ids, batch)
}

/// The binary masks [N·D] of token id sequences (start and end tokens included, unpadded) from
/// CLIP `model` with the mask network `mask` ([`mask_param_shapes`] order), `batch` at a time.
pub fn id_masks(mut model: TrainClip, mask: Vec<(String, Tensor)>, ids: &[Vec<u32>], batch: usize) -> Result<Vec<f32>> {
    let first = model.params.len();
    model.add_params(mask);
    let mut out = vec![];
    for ids in ids.chunks(batch.max(1)) {
        let tape = Tape::new();
        let m = tape.no_grad(|| -> Result<Var> {
            let sv = model.vars(&tape);
            let (h, _) = model.text_states(&tape, &sv, ids)?;
            let valid: Vec<usize> = ids.iter().map(|s| crate::model::text::pool_position(s, model.config.text.eos_token_id) + 1).collect();
            masks(&tape, &model, &sv.vars[first..], &h, &valid)
        })?;
        out.extend(m.value().to_vec_f32());
    }
    Ok(out)
}
