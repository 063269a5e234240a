//! FLOP counts (2 × multiply-adds) of the towers, for GFLOP/s figures: the model's, as HF
//! transformers computes it (every block over every token), and what the CPU backend executes
//! when it embeds (the last block only for the pooled row: [`pooled_encoder_flops`]).
use crate::model::config::{TowerConfig, VisionConfig};
use crate::model::ClipConfig;

/// One encoder over `t` tokens: QKV + output projections, attention scores and mix, MLP.
pub fn encoder_flops(c: &TowerConfig, t: usize) -> f64 {
    let (w, i, t) = (c.hidden as f64, c.intermediate as f64, t as f64);
    c.layers as f64 * (2.0 * t * w * 4.0 * w + 2.0 * t * w * i * 2.0 + 4.0 * t * t * w)
}

/// [`encoder_flops`] when one row per sequence is kept after the encoder (a tower pooled at the
/// class token or at EOT), as the CPU backend runs it (`Ops::attention_pooled`): the last block
/// computes K and V for every token, and Q, the one query's attention, the output projection and
/// the MLP for the pooled row alone.
pub fn pooled_encoder_flops(c: &TowerConfig, t: usize) -> f64 {
    if c.layers == 0 {
        return 0.0;
    }
    let (w, i, tf) = (c.hidden as f64, c.intermediate as f64, t as f64);
    let last = 2.0 * tf * w * 2.0 * w + 2.0 * w * 2.0 * w + 4.0 * tf * w + 2.0 * w * i * 2.0;
    encoder_flops(c, t) * (c.layers - 1) as f64 / c.layers as f64 + last
}

/// The image tower's model FLOPs per image.
pub fn image_flops(cfg: &ClipConfig) -> f64 {
    image_flops_with(cfg, encoder_flops)
}

/// The image tower's FLOPs per image as executed ([`pooled_encoder_flops`]).
pub fn image_flops_executed(cfg: &ClipConfig) -> f64 {
    image_flops_with(cfg, pooled_encoder_flops)
}

fn image_flops_with(cfg: &ClipConfig, encoder: fn(&TowerConfig, usize) -> f64) -> f64 {
    let v: &VisionConfig = &cfg.vision;
    let n = (v.grid() * v.grid()) as f64;
    let w = v.tower.hidden as f64;
    let patch = 2.0 * n * w * (v.channels * v.patch_size * v.patch_size) as f64;
    patch + encoder(&v.tower, v.tokens()) + 2.0 * w * cfg.projection_dim as f64
}

/// The text tower's model FLOPs per text of `tokens` tokens.
pub fn text_flops(cfg: &ClipConfig, tokens: usize) -> f64 {
    text_flops_with(cfg, tokens, encoder_flops)
}

/// The text tower's FLOPs per text as executed ([`pooled_encoder_flops`]).
pub fn text_flops_executed(cfg: &ClipConfig, tokens: usize) -> f64 {
    text_flops_with(cfg, tokens, pooled_encoder_flops)
}

fn text_flops_with(cfg: &ClipConfig, tokens: usize, encoder: fn(&TowerConfig, usize) -> f64) -> f64 {
    encoder(&cfg.text.tower, tokens) + 2.0 * cfg.text.tower.hidden as f64 * cfg.projection_dim as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ViT-B/32 by hand: 8.82 GFLOP per image as HF counts it; 8.23 executed (the last block's
    /// K and V over 50 tokens, the rest for the class token alone).
    #[test]
    fn b32_image_flops() {
        let cfg = ClipConfig::preset("b32").unwrap();
        let (model, done) = (image_flops(&cfg), image_flops_executed(&cfg));
        assert!((model / 8.82e9 - 1.0).abs() < 2e-3, "{model}");
        let last = 2.0 * 50.0 * 768.0 * 1536.0 + 2.0 * 768.0 * 1536.0 + 4.0 * 50.0 * 768.0 + 4.0 * 768.0 * 3072.0;
        let full_layer = 2.0 * 50.0 * 768.0 * 3072.0 + 4.0 * 50.0 * 768.0 * 3072.0 + 4.0 * 2500.0 * 768.0;
        assert!((model - done - (full_layer - last)).abs() < 1.0, "{model} {done}");
        assert!((done / 8.23e9 - 1.0).abs() < 2e-3, "{done}");
    }
}
