//! Random-weight CLIP models made in memory (for `clipforge bench` with no model directory), with
//! CLIP's initialisation scales so activations look like a real model's.
use super::config::ClipConfig;
use super::weights::Weights;
use crate::tensor::Tensor;
use rayon::prelude::*;
use std::collections::HashMap;

/// SplitMix64: a tiny, seedable generator.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f32 {
        self.normal_pair().0
    }
    /// Two independent standard normals (both Box–Muller outputs).
    pub fn normal_pair(&mut self) -> (f32, f32) {
        let u1 = ((self.next_u64() >> 40) as f32 + 0.5) / (1u64 << 24) as f32;
        let u2 = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (2.0 * std::f32::consts::PI * u2).sin_cos();
        (r * c, r * s)
    }
}

/// `n` values mean + std·N(0,1), made in parallel from `seed`.
pub fn normal_vec(n: usize, mean: f32, std: f32, seed: u64) -> Vec<f32> {
    let mut v = vec![0f32; n];
    v.par_chunks_mut(1 << 16).enumerate().for_each(|(i, c)| {
        let mut r = Rng::new(seed.wrapping_mul(1_000_003).wrapping_add(i as u64));
        for pair in c.chunks_mut(2) {
            let (a, b) = r.normal_pair();
            pair[0] = mean + std * a;
            if pair.len() > 1 {
                pair[1] = mean + std * b;
            }
        }
    });
    v
}

/// All tensors of an HF CLIPModel with `cfg`'s shapes, randomly initialised.
pub fn random_weights(cfg: &ClipConfig, seed: u64) -> Weights {
    let mut m: HashMap<String, Tensor> = HashMap::new();
    let mut k = 0u64;
    let mut put = |m: &mut HashMap<String, Tensor>, name: String, shape: &[usize], mean: f32, std: f32| {
        k += 1;
        let n = shape.iter().product();
        m.insert(name, Tensor::from_vec(normal_vec(n, mean, std, seed.wrapping_add(k)), shape).expect("shape"));
    };
    let d = cfg.projection_dim;
    for (pre, t) in [("vision_model", &cfg.vision.tower), ("text_model", &cfg.text.tower)] {
        let (h, i, l) = (t.hidden, t.intermediate, t.layers);
        let attn_std = (h as f32).powf(-0.5);
        let out_std = attn_std * (2.0 * l as f32).powf(-0.5);
        for li in 0..l {
            let p = format!("{pre}.encoder.layers.{li}");
            for q in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                put(&mut m, format!("{p}.self_attn.{q}.weight"), &[h, h], 0.0, if q == "out_proj" { out_std } else { attn_std });
                put(&mut m, format!("{p}.self_attn.{q}.bias"), &[h], 0.0, 0.02);
            }
            put(&mut m, format!("{p}.mlp.fc1.weight"), &[i, h], 0.0, (2.0 * h as f32).powf(-0.5));
            put(&mut m, format!("{p}.mlp.fc1.bias"), &[i], 0.0, 0.02);
            put(&mut m, format!("{p}.mlp.fc2.weight"), &[h, i], 0.0, out_std);
            put(&mut m, format!("{p}.mlp.fc2.bias"), &[h], 0.0, 0.02);
            for ln in ["layer_norm1", "layer_norm2"] {
                put(&mut m, format!("{p}.{ln}.weight"), &[h], 1.0, 0.1);
                put(&mut m, format!("{p}.{ln}.bias"), &[h], 0.0, 0.02);
            }
        }
    }
    let (v, t) = (&cfg.vision, &cfg.text);
    let (vh, th) = (v.tower.hidden, t.tower.hidden);
    let e = "vision_model.embeddings";
    put(&mut m, format!("{e}.class_embedding"), &[vh], 0.0, (vh as f32).powf(-0.5));
    put(&mut m, format!("{e}.patch_embedding.weight"), &[vh, v.channels, v.patch_size, v.patch_size], 0.0, 0.02);
    put(&mut m, format!("{e}.position_embedding.weight"), &[v.tokens(), vh], 0.0, (vh as f32).powf(-0.5));
    for ln in ["vision_model.pre_layrnorm", "vision_model.post_layernorm", "text_model.final_layer_norm"] {
        let n = if ln.starts_with("vision") { vh } else { th };
        put(&mut m, format!("{ln}.weight"), &[n], 1.0, 0.1);
        put(&mut m, format!("{ln}.bias"), &[n], 0.0, 0.02);
    }
    put(&mut m, "visual_projection.weight".into(), &[d, vh], 0.0, (vh as f32).powf(-0.5));
    put(&mut m, "text_projection.weight".into(), &[d, th], 0.0, (th as f32).powf(-0.5));
    put(&mut m, "text_model.embeddings.token_embedding.weight".into(), &[t.vocab, th], 0.0, 0.02);
    put(&mut m, "text_model.embeddings.position_embedding.weight".into(), &[t.max_positions, th], 0.0, 0.01);
    m.insert("logit_scale".into(), Tensor::scalar(cfg.logit_scale_init));
    Weights::from_tensors(m, "<synthetic>")
}
