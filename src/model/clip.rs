//! The CLIP model: both towers, the logit scale, L2 normalisation and similarity scores.
use super::config::ClipConfig;
use super::layers::LoadOptions;
use super::text::TextTower;
use super::vision::VisionTower;
use super::weights::Weights;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use std::path::Path;

pub struct Clip {
    pub config: ClipConfig,
    pub vision: VisionTower,
    pub text: TextTower,
    pub logit_scale: f32,
}

/// Which towers to load (a text-only job need not touch the image weights, and vice versa).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Towers {
    Both,
    Vision,
    Text,
}

pub struct ClipParts {
    pub config: ClipConfig,
    pub vision: Option<VisionTower>,
    pub text: Option<TextTower>,
    pub logit_scale: f32,
}

impl ClipParts {
    pub fn load(weights: &Weights, config: &ClipConfig, towers: Towers, opt: &LoadOptions) -> Result<ClipParts> {
        let schema = super::schema::Schema::clip(config);
        let vision = if towers != Towers::Text { Some(VisionTower::load(weights, &schema, &config.vision, opt)?) } else { None };
        let text = if towers != Towers::Vision { Some(TextTower::load(weights, &schema, &config.text, opt)?) } else { None };
        let ls = super::schema::names::LOGIT_SCALE;
        let logit_scale =
            if weights.contains(ls) { weights.get_shaped(ls, &[]).or_else(|_| weights.get_shaped(ls, &[1]))?.to_vec_f32()[0] } else { config.logit_scale_init };
        Ok(ClipParts { config: config.clone(), vision, text, logit_scale })
    }

    /// Loads config.json and the weights of an HF CLIP directory.
    pub fn load_dir(dir: &Path, towers: Towers, opt: &LoadOptions) -> Result<ClipParts> {
        if !dir.is_dir() {
            return Err(Error::file(dir, "not a model directory (expected config.json and model.safetensors)"));
        }
        let config = ClipConfig::from_file(&dir.join("config.json"))?;
        let weights = Weights::open(dir)?;
        ClipParts::load(&weights, &config, towers, opt)
    }

    pub fn vision(&self) -> Result<&VisionTower> {
        self.vision.as_ref().ok_or_else(|| Error::msg("image tower not loaded"))
    }
    pub fn text(&self) -> Result<&TextTower> {
        self.text.as_ref().ok_or_else(|| Error::msg("text tower not loaded"))
    }

    pub fn into_clip(self) -> Result<Clip> {
        match (self.vision, self.text) {
            (Some(vision), Some(text)) => Ok(Clip { config: self.config, vision, text, logit_scale: self.logit_scale }),
            _ => Err(Error::msg("both towers are needed")),
        }
    }
}

/// Rows divided by their L2 norm (a zero row stays zero).
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let d = *x.shape().last().unwrap_or(&1);
    let mut v = x.to_vec_f32();
    for r in v.chunks_mut(d.max(1)) {
        let n = r.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt() as f32;
        if n > 0.0 {
            r.iter_mut().for_each(|a| *a /= n);
        }
    }
    Tensor::from_vec(v, x.shape())
}

/// Cosine similarity matrix [I, T] of image and text embeddings (normalised here).
pub fn cosine_matrix(img: &Tensor, txt: &Tensor) -> Result<Tensor> {
    l2_normalize(img)?.matmul(&l2_normalize(txt)?.transpose(0, 1)?)
}
