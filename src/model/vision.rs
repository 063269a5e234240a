//! The CLIP image tower (HF CLIPVisionTransformer + visual_projection): patch embedding,
//! class token, positions, pre_layrnorm, encoder, post_layernorm on the class token, projection.
use super::config::VisionConfig;
use super::layers::{load_f32, Encoder, LayerNorm, Linear, LoadOptions};
use super::schema::{names, Tower};
use super::weights::Weights;
use crate::error::Result;
use crate::shape_err;
use crate::tensor::Tensor;

pub struct VisionTower {
    pub cfg: VisionConfig,
    pub class_embedding: Tensor, // [W]
    pub patch_weight: Tensor,    // [W, C, P, P]
    pub positions: Tensor,       // [N+1, W]
    pub pre_ln: LayerNorm,
    pub encoder: Encoder,
    pub post_ln: LayerNorm,
    pub projection: Linear, // [D, W], no bias
}

impl VisionTower {
    pub fn load(w: &Weights, cfg: &VisionConfig, proj_dim: usize, opt: &LoadOptions) -> Result<VisionTower> {
        let (h, p, c) = (cfg.tower.hidden, cfg.patch_size, cfg.channels);
        Ok(VisionTower {
            class_embedding: load_f32(w, names::CLASS_EMBEDDING, &[h])?,
            patch_weight: load_f32(w, names::PATCH_EMBEDDING, &[h, c, p, p])?,
            positions: load_f32(w, names::VISION_POSITIONS, &[cfg.tokens(), h])?,
            pre_ln: LayerNorm::load(w, names::PRE_LN, h, cfg.tower.eps)?,
            encoder: Encoder::load(w, Tower::Vision, &cfg.tower, opt)?,
            post_ln: LayerNorm::load(w, names::POST_LN, h, cfg.tower.eps)?,
            projection: Linear::load_named(w, names::VISUAL_PROJECTION, None, &[proj_dim, h], opt)?,
            cfg: cfg.clone(),
        })
    }

    /// pixels [B, C, S, S] → image embeddings [B, D] (not normalised). `hook` sees
    /// vision.embeddings, vision.pre_ln, vision.layer.{i}, vision.pooled, vision.embeds.
    pub fn forward(&self, pixels: &Tensor, hook: &mut dyn FnMut(&str, &Tensor)) -> Result<Tensor> {
        let s = self.cfg.image_size;
        if pixels.rank() != 4 || pixels.dim(1) != self.cfg.channels || pixels.dim(2) != s || pixels.dim(3) != s {
            return Err(shape_err!("image tower expects pixels [B, {}, {s}, {s}], got {:?}", self.cfg.channels, pixels.shape()));
        }
        let b = pixels.dim(0);
        let w = self.cfg.tower.hidden;
        let t = self.cfg.tokens();
        let patches = Tensor::patch_embed(pixels, &self.patch_weight)?; // [B, N, W]
        let (pd, cls, pos) = (patches.f32_data(), self.class_embedding.f32_data(), self.positions.f32_data());
        let mut x = vec![0f32; b * t * w]; // [B, N+1, W]
        for bi in 0..b {
            for ti in 0..t {
                let row = &mut x[(bi * t + ti) * w..][..w];
                let src = if ti == 0 { &cls[..] } else { &pd[(bi * (t - 1) + ti - 1) * w..][..w] };
                for ((o, a), p) in row.iter_mut().zip(src).zip(&pos[ti * w..(ti + 1) * w]) {
                    *o = a + p;
                }
            }
        }
        let x = Tensor::from_vec(x, &[b, t, w])?;
        hook("vision.embeddings", &x);
        let x = self.pre_ln.forward(&x)?; // [B, N+1, W]
        hook("vision.pre_ln", &x);
        let x = self.encoder.forward(x, false, "vision", hook)?; // [B, N+1, W]
        let cls = x.narrow(1, 0, 1)?.reshape(&[b, w])?; // [B, W]
        let pooled = self.post_ln.forward(&cls)?; // [B, W]
        hook("vision.pooled", &pooled);
        let e = self.projection.forward(&pooled)?; // [B, D]
        hook("vision.embeds", &e);
        Ok(e)
    }
}
