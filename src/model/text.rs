//! The CLIP text tower (HF CLIPTextTransformer + text_projection): token + position embeddings,
//! causal encoder, final_layer_norm, pooling at the end-of-text token, projection.
//!
//! With a causal mask no position attends to anything after it, so the pooled EOT state is the
//! same whatever follows it: batches are packed with no padding at all (or, for parity with HF,
//! padded to the longest sequence or a fixed length).
use super::config::TextConfig;
use super::layers::{gather_rows, load_f32, Encoder, LayerNorm, Linear, LoadOptions, Seqs};
use super::schema::{names, Tower};
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
        Ok(TextTower {
            token_embedding: load_f32(w, names::TOKEN_EMBEDDING, &[cfg.vocab, h])?,
            positions: load_f32(w, names::TEXT_POSITIONS, &[cfg.max_positions, h])?,
            encoder: Encoder::load(w, Tower::Text, &cfg.tower, opt)?,
            final_ln: LayerNorm::load(w, names::FINAL_LN, h, cfg.tower.eps)?,
            projection: Linear::load_named(w, names::TEXT_PROJECTION, None, &[proj_dim, h], opt)?,
            cfg: cfg.clone(),
        })
    }

    /// Where a sequence is pooled: see [`pool_position`].
    pub fn pool_position(&self, ids: &[u32]) -> usize {
        pool_position(ids, self.cfg.eos_token_id)
    }

    /// Token ids (with start/end tokens, unpadded) → text embeddings [B, D] (not normalised).
    ///
    /// Without `pad_to`, sequences are packed: each is cut after its pooled token (with the causal
    /// mask nothing later reaches it), they run back to back with no padding, and the last block
    /// computes its output projection and MLP for the pooled rows only — the numbers of the
    /// padded model, fewer FLOPs. `hook` then sees text.embeddings and text.layer.{i} as [N, W]
    /// (the last as [B, W]), text.pooled and text.embeds.
    ///
    /// With `pad_to`, sequences are padded with the end token to the longest one or to `pad_to`
    /// (HF's layout, for layer-by-layer parity): `hook` sees [B, T, W] activations, text.final_ln,
    /// text.pooled, text.embeds.
    pub fn forward(&self, ids: &[Vec<u32>], pad_to: Option<usize>, hook: &mut dyn FnMut(&str, &Tensor)) -> Result<Tensor> {
        let w = self.cfg.tower.hidden;
        let lens: Vec<usize> = ids.iter().map(|s| if s.is_empty() { 0 } else { self.pool_position(s) + 1 }).collect();
        let longest = ids.iter().map(|s| s.len()).max().unwrap_or(0);
        let t = pad_to.unwrap_or(longest).max(longest);
        if ids.is_empty() || lens.contains(&0) {
            return Err(shape_err!("text tower needs at least one sequence, none of them empty"));
        }
        if t > self.cfg.max_positions {
            return Err(shape_err!("sequence of {t} tokens exceeds the model's {} positions", self.cfg.max_positions));
        }
        let pooled = if pad_to.is_none() {
            let flat: Vec<u32> = ids.iter().zip(&lens).flat_map(|(s, &l)| s[..l].iter().copied()).collect();
            let pos: Vec<u32> = lens.iter().flat_map(|&l| 0..l as u32).collect();
            let x = Tensor::embedding(&self.token_embedding, &flat)?.add(&Tensor::embedding(&self.positions, &pos)?)?; // [N, W]
            hook("text.embeddings", &x);
            let ends: Vec<usize> = lens
                .iter()
                .scan(0, |off, &l| {
                    *off += l;
                    Some(*off - 1)
                })
                .collect();
            let x = self.encoder.forward_on(x, &Seqs::Packed(lens), Some(&ends), "text", hook)?; // [B, W]
            self.final_ln.forward(&x)? // [B, W]
        } else {
            let b = ids.len();
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
            let rows: Vec<usize> = lens.iter().enumerate().map(|(i, &l)| i * t + l - 1).collect();
            gather_rows(&x, &rows)? // [B, W]
        };
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
