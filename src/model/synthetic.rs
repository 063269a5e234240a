//! Random-weight CLIP models made in memory (for `clipforge bench` with no model directory), with
//! CLIP's initialisation scales so activations look like a real model's.
use super::config::ClipConfig;
use super::schema::Schema;
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

/// All tensors of an HF CLIPModel with `cfg`'s shapes, initialised as the schema says (CLIP's
/// scales), each from its own stream of `seed`.
pub fn random_weights(cfg: &ClipConfig, seed: u64) -> Weights {
    let schema = Schema::clip(cfg);
    let m: HashMap<String, Tensor> = schema
        .params()
        .iter()
        .enumerate()
        .map(|(k, p)| {
            let v = normal_vec(p.numel(), p.init.mean, p.init.std, seed.wrapping_add(k as u64 + 1));
            (p.name.clone(), Tensor::from_vec(v, &p.shape).expect("the schema's shape"))
        })
        .collect();
    Weights::from_tensors(m, "<synthetic>")
}
