//! FLOP counts (2 × multiply-adds) of the towers, for GFLOP/s figures.
use crate::model::config::{TowerConfig, VisionConfig};
use crate::model::ClipConfig;

/// One encoder over `t` tokens: QKV + output projections, attention scores and mix, MLP.
pub fn encoder_flops(c: &TowerConfig, t: usize) -> f64 {
    let (w, i, t) = (c.hidden as f64, c.intermediate as f64, t as f64);
    c.layers as f64 * (2.0 * t * w * 4.0 * w + 2.0 * t * w * i * 2.0 + 4.0 * t * t * w)
}

pub fn image_flops(cfg: &ClipConfig) -> f64 {
    let v: &VisionConfig = &cfg.vision;
    let n = (v.grid() * v.grid()) as f64;
    let w = v.tower.hidden as f64;
    let patch = 2.0 * n * w * (v.channels * v.patch_size * v.patch_size) as f64;
    patch + encoder_flops(&v.tower, v.tokens()) + 2.0 * w * cfg.projection_dim as f64
}

pub fn text_flops(cfg: &ClipConfig, tokens: usize) -> f64 {
    encoder_flops(&cfg.text.tower, tokens) + 2.0 * cfg.text.tower.hidden as f64 * cfg.projection_dim as f64
}
