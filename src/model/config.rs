//! CLIP configuration: HF `config.json` (CLIPConfig with text_config / vision_config) with HF's
//! defaults for missing keys, and the built-in presets (ViT-B/32, B/16, L/14, L/14@336).
use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    QuickGelu,
    Gelu,
}

/// One transformer tower's sizes.
#[derive(Clone, Debug, PartialEq)]
pub struct TowerConfig {
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub layers: usize,
    pub eps: f32,
    pub act: Activation,
}

#[derive(Clone, Debug, PartialEq)]
pub struct VisionConfig {
    pub tower: TowerConfig,
    pub image_size: usize,
    pub patch_size: usize,
    pub channels: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TextConfig {
    pub tower: TowerConfig,
    pub vocab: usize,
    pub max_positions: usize,
    /// Long-CLIP: position rows below this stay frozen in fine-tuning (`clipforge stretch` writes
    /// it as text_config.clipforge_frozen_positions; 0 for plain CLIP).
    pub frozen_positions: usize,
    pub eos_token_id: u32,
    pub bos_token_id: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ClipConfig {
    pub vision: VisionConfig,
    pub text: TextConfig,
    pub projection_dim: usize,
    pub logit_scale_init: f32,
}

impl VisionConfig {
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
    /// Tokens per image: patches + the class token.
    pub fn tokens(&self) -> usize {
        self.grid() * self.grid() + 1
    }
}

#[derive(Deserialize, Default)]
struct RawTower {
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_attention_heads: Option<usize>,
    num_hidden_layers: Option<usize>,
    layer_norm_eps: Option<f32>,
    hidden_act: Option<String>,
    image_size: Option<usize>,
    patch_size: Option<usize>,
    num_channels: Option<usize>,
    vocab_size: Option<usize>,
    max_position_embeddings: Option<usize>,
    eos_token_id: Option<u32>,
    bos_token_id: Option<u32>,
    clipforge_frozen_positions: Option<usize>,
}

#[derive(Deserialize)]
struct RawConfig {
    text_config: Option<RawTower>,
    vision_config: Option<RawTower>,
    projection_dim: Option<usize>,
    logit_scale_init_value: Option<f32>,
}

fn tower(r: &RawTower, d: (usize, usize, usize, usize), what: &str) -> Result<TowerConfig> {
    let act = match r.hidden_act.as_deref().unwrap_or("quick_gelu") {
        "quick_gelu" => Activation::QuickGelu,
        "gelu" => Activation::Gelu,
        other => return Err(Error::msg(format!("{what}.hidden_act \"{other}\" is not supported (quick_gelu, gelu)"))),
    };
    let t = TowerConfig {
        hidden: r.hidden_size.unwrap_or(d.0),
        intermediate: r.intermediate_size.unwrap_or(d.1),
        heads: r.num_attention_heads.unwrap_or(d.2),
        layers: r.num_hidden_layers.unwrap_or(d.3),
        eps: r.layer_norm_eps.unwrap_or(1e-5),
        act,
    };
    if t.hidden == 0 || t.heads == 0 || !t.hidden.is_multiple_of(t.heads) || t.intermediate == 0 {
        return Err(Error::msg(format!("{what}: hidden_size {} is not a positive multiple of num_attention_heads {}", t.hidden, t.heads)));
    }
    Ok(t)
}

impl ClipConfig {
    /// Reads an HF `config.json`.
    pub fn from_file(path: &Path) -> Result<ClipConfig> {
        let s = crate::io::text::read_utf8(path)?;
        ClipConfig::from_json(&s).map_err(|e| Error::file(path, e))
    }

    pub fn from_json(s: &str) -> Result<ClipConfig> {
        let raw: RawConfig = serde_json::from_str(s).map_err(|e| Error::msg(format!("not a CLIP config.json: {e}")))?;
        let (rt, rv) = (raw.text_config.unwrap_or_default(), raw.vision_config.unwrap_or_default());
        let text = TextConfig {
            tower: tower(&rt, (512, 2048, 8, 12), "text_config")?,
            vocab: rt.vocab_size.unwrap_or(49408),
            max_positions: rt.max_position_embeddings.unwrap_or(77),
            frozen_positions: rt.clipforge_frozen_positions.unwrap_or(0),
            eos_token_id: rt.eos_token_id.unwrap_or(49407),
            bos_token_id: rt.bos_token_id.unwrap_or(49406),
        };
        let vision = VisionConfig {
            tower: tower(&rv, (768, 3072, 12, 12), "vision_config")?,
            image_size: rv.image_size.unwrap_or(224),
            patch_size: rv.patch_size.unwrap_or(32),
            channels: rv.num_channels.unwrap_or(3),
        };
        if vision.patch_size == 0 || vision.image_size < vision.patch_size {
            return Err(Error::msg(format!("vision_config: image_size {} and patch_size {} do not make patches", vision.image_size, vision.patch_size)));
        }
        if text.frozen_positions >= text.max_positions && text.frozen_positions > 0 {
            return Err(Error::msg(format!(
                "text_config: clipforge_frozen_positions {} must be below max_position_embeddings {}",
                text.frozen_positions, text.max_positions
            )));
        }
        if text.max_positions == 0 || text.vocab == 0 {
            return Err(Error::msg("text_config: vocab_size and max_position_embeddings must be positive"));
        }
        Ok(ClipConfig { vision, text, projection_dim: raw.projection_dim.unwrap_or(512), logit_scale_init: raw.logit_scale_init_value.unwrap_or(2.6592) })
    }

    /// The names [`ClipConfig::preset`] knows.
    pub const PRESETS: &'static str = "b32, b16, l14, l14-336, longclip-b32, longclip-b16, longclip-l14 or longclip-l14-336";

    /// Built-in presets of the OpenAI models: "b32", "b16", "l14", "l14-336"; and their Long-CLIP
    /// forms "longclip-…": the same towers with 248 text positions, the first 20 frozen (what
    /// `clipforge stretch` makes of them, and the structure of the released Long-CLIP checkpoints).
    pub fn preset(name: &str) -> Option<ClipConfig> {
        if let Some(base) = name.strip_prefix("longclip-") {
            let mut c = Self::preset(base)?;
            let s = crate::ops::pos_gather::Stretch::LONG_CLIP;
            (c.text.max_positions, c.text.frozen_positions) = (s.new_len(), s.keep);
            return Some(c);
        }
        let t = |h: usize, l: usize| TowerConfig { hidden: h, intermediate: 4 * h, heads: h / 64, layers: l, eps: 1e-5, act: Activation::QuickGelu };
        let (vw, vl, patch, img, tw, proj) = match name {
            "b32" => (768, 12, 32, 224, 512, 512),
            "b16" => (768, 12, 16, 224, 512, 512),
            "l14" => (1024, 24, 14, 224, 768, 768),
            "l14-336" => (1024, 24, 14, 336, 768, 768),
            _ => return None,
        };
        Some(ClipConfig {
            vision: VisionConfig { tower: t(vw, vl), image_size: img, patch_size: patch, channels: 3 },
            text: TextConfig { tower: t(tw, 12), vocab: 49408, max_positions: 77, frozen_positions: 0, eos_token_id: 49407, bos_token_id: 49406 },
            projection_dim: proj,
            logit_scale_init: 2.6592,
        })
    }

    /// HF-format config.json text for this config (used when writing model directories).
    pub fn to_json(&self) -> serde_json::Value {
        let act = |a: Activation| if a == Activation::QuickGelu { "quick_gelu" } else { "gelu" };
        let (v, t) = (&self.vision, &self.text);
        serde_json::json!({
            "architectures": ["CLIPModel"],
            "model_type": "clip",
            "projection_dim": self.projection_dim,
            "logit_scale_init_value": self.logit_scale_init,
            "text_config": {
                "hidden_size": t.tower.hidden, "intermediate_size": t.tower.intermediate,
                "num_attention_heads": t.tower.heads, "num_hidden_layers": t.tower.layers,
                "layer_norm_eps": t.tower.eps, "hidden_act": act(t.tower.act),
                "vocab_size": t.vocab, "max_position_embeddings": t.max_positions, "clipforge_frozen_positions": t.frozen_positions,
                "eos_token_id": t.eos_token_id, "bos_token_id": t.bos_token_id, "pad_token_id": t.eos_token_id,
                "projection_dim": self.projection_dim,
            },
            "vision_config": {
                "hidden_size": v.tower.hidden, "intermediate_size": v.tower.intermediate,
                "num_attention_heads": v.tower.heads, "num_hidden_layers": v.tower.layers,
                "layer_norm_eps": v.tower.eps, "hidden_act": act(v.tower.act),
                "image_size": v.image_size, "patch_size": v.patch_size, "num_channels": v.channels,
                "projection_dim": self.projection_dim,
            },
        })
    }
}
