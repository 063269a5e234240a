//! bf16 compute (Linear layers through the bf16 GEMM) against f32: cosine ≥ 0.999 per embedding
//! on the fixtures and on a 12-layer synthetic ViT-B/32.
mod common;
use clipforge::model::synthetic::random_weights;
use clipforge::model::{ClipConfig, ClipParts, LoadOptions, Towers, Weights};
use clipforge::{DType, Tensor};
use std::path::Path;

fn cosines(a: &Tensor, b: &Tensor) -> Vec<f32> {
    let d = a.dim(1);
    let (x, y) = (a.to_vec_f32(), b.to_vec_f32());
    x.chunks(d)
        .zip(y.chunks(d))
        .map(|(p, q)| {
            let dot: f32 = p.iter().zip(q).map(|(a, b)| a * b).sum();
            dot / (p.iter().map(|a| a * a).sum::<f32>().sqrt() * q.iter().map(|a| a * a).sum::<f32>().sqrt())
        })
        .collect()
}

fn check(w: &Weights, cfg: &ClipConfig, b: usize, what: &str) {
    let f32m = ClipParts::load(w, cfg, Towers::Both, &LoadOptions { dtype: DType::F32 }).unwrap();
    let bf = ClipParts::load(w, cfg, Towers::Both, &LoadOptions { dtype: DType::BF16 }).unwrap();
    let s = cfg.vision.image_size;
    let px = common::rand_tensor(&[b, 3, s, s], 3);
    let (a, c) = (f32m.vision().unwrap().forward(&px, &mut |_, _| {}).unwrap(), bf.vision().unwrap().forward(&px, &mut |_, _| {}).unwrap());
    for (i, cs) in cosines(&a, &c).iter().enumerate() {
        assert!(*cs >= 0.999, "{what}: image {i} cosine {cs}");
    }
    let ids: Vec<Vec<u32>> = (0..b).map(|i| (0..20 + 5 * i as u32).map(|j| if j == 0 { 49406 } else { 400 + 37 * j + i as u32 }).chain([49407]).collect()).collect();
    let (a, c) = (f32m.text().unwrap().forward(&ids, None, &mut |_, _| {}).unwrap(), bf.text().unwrap().forward(&ids, None, &mut |_, _| {}).unwrap());
    for (i, cs) in cosines(&a, &c).iter().enumerate() {
        assert!(*cs >= 0.999, "{what}: text {i} cosine {cs}");
    }
}

#[test]
fn bf16_matches_f32_on_fixtures() {
    for m in ["tiny", "odd"] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(m);
        let cfg = ClipConfig::from_file(&dir.join("config.json")).unwrap();
        check(&Weights::open(&dir).unwrap(), &cfg, 3, m);
    }
}

#[test]
fn bf16_matches_f32_on_vit_b32() {
    let cfg = ClipConfig::preset("b32").unwrap();
    check(&random_weights(&cfg, 5), &cfg, 2, "b32");
}
