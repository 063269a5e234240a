//! The CLIP text tower (HF CLIPTextTransformer + text_projection): token + position embeddings,
//! causal encoder, final_layer_norm, pooling at the end-of-text token, projection.
//!
//! Batches are padded only to their longest sequence: with a causal mask no position attends
//! to anything after it, so the pooled EOT state is the same as with padding to 77 (or 248).
use super::config::TextConfig;
use super::layers::{load_f32, Encoder, LayerNorm, Linear, LoadOptions};
use super::weights::Weights;
use crate::error::Result;
use crate::shape_err;
use crate::tensor::Tensor;

pub struct TextTower {
    pub cfg: TextConfig,
    pub token_embedding: Tensor, // [V, W]
    pub positions: Tensor,       // [P, W]
    pub encoder: Encoder,
    pub final_ln: LayerNorm,
    pub projection: Linear, // [D, W], no bias
}

impl TextTower {
    pub fn load(w: &Weights, cfg: &TextConfig, proj_dim: usize, opt: &LoadOptions) -> Result<TextTower> {
        let h = cfg.tower.hidden;
        let e = "text_model.embeddings";
        Ok(TextTower {
            token_embedding: load_f32(w, &format!("{e}.token_embedding.weight"), &[cfg.vocab, h])?,
            positions: load_f32(w, &format!("{e}.position_embedding.weight"), &[cfg.max_positions, h])?,
            encoder: Encoder::load(w, "text_model", &cfg.tower, opt)?,
            final_ln: LayerNorm::load(w, "text_model.final_layer_norm", h, cfg.tower.eps)?,
            projection: Linear::load(w, "text_projection", h, proj_dim, false, opt)?,
            cfg: cfg.clone(),
        })
    }

    /// Where a sequence is pooled: see [`pool_position`].
    pub fn pool_position(&self, ids: &[u32]) -> usize {
        pool_position(ids, self.cfg.eos_token_id)
    }

    /// Token ids (with start/end tokens, unpadded) → text embeddings [B, D] (not normalised).
    /// Sequences are padded with the end token to the longest one, or to `pad_to` if given.
    /// `hook` sees text.embeddings, text.layer.{i}, text.final_ln, text.pooled, text.embeds.
    pub fn forward(&self, ids: &[Vec<u32>], pad_to: Option<usize>, hook: &mut dyn FnMut(&str, &Tensor)) -> Result<Tensor> {
        let b = ids.len();
        let w = self.cfg.tower.hidden;
        let longest = ids.iter().map(|s| s.len()).max().unwrap_or(0);
        let t = pad_to.unwrap_or(longest).max(longest);
        if b == 0 || t == 0 {
            return Err(shape_err!("text tower needs at least one non-empty sequence"));
        }
        if t > self.cfg.max_positions {
            return Err(shape_err!("sequence of {t} tokens exceeds the model's {} positions", self.cfg.max_positions));
        }
        let mut flat = Vec::with_capacity(b * t);
        for s in ids {
            flat.extend_from_slice(s);
            flat.extend(std::iter::repeat(self.cfg.eos_token_id).take(t - s.len()));
        }
        let tok = Tensor::embedding(&self.token_embedding, &flat)?.reshape(&[b, t, w])?; // [B, T, W]
        let x = tok.add(&self.positions.narrow(0, 0, t)?)?; // [B, T, W]
        hook("text.embeddings", &x);
        let x = self.encoder.forward(x, true, "text", hook)?; // [B, T, W]
        let x = self.final_ln.forward(&x)?; // [B, T, W]
        hook("text.final_ln", &x);
        let rows: Vec<Tensor> = ids
            .iter()
            .enumerate()
            .map(|(i, s)| x.get(i)?.narrow(0, self.pool_position(s), 1))
            .collect::<Result<_>>()?;
        let pooled = Tensor::cat(&rows.iter().collect::<Vec<_>>(), 0)?; // [B, W]
        hook("text.pooled", &pooled);
        let e = self.projection.forward(&pooled)?; // [B, D]
        hook("text.embeds", &e);
        Ok(e)
    }
}

/// Where a sequence is pooled: the first end-of-text token (HF's rule for eos 49407 configs),
/// or the largest id when there is none (OpenAI's argmax rule).
pub fn pool_position(ids: &[u32], eos: u32) -> usize {
    ids.iter().position(|&t| t == eos).unwrap_or_else(|| {
        let mut best = 0;
        for (i, &t) in ids.iter().enumerate() {
            if t > ids[best] {
                best = i;
            }
        }
        best
    })
}
