//! Weight files in every dtype: a bf16 copy of the tiny fixture written to disk must give the same
//! embeddings as the f32 weights rounded to bf16 in memory; memory-mapped f32 weights are used in
//! place (no copy).
mod common;
use clipforge::model::{ClipConfig, ClipParts, LoadOptions, Towers, Weights};
use clipforge::{DType, Tensor};
use std::collections::HashMap;
use std::path::Path;

fn tiny() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny")
}

#[test]
fn bf16_file_equals_bf16_rounded_f32() {
    let src = Weights::open(&tiny()).unwrap();
    let cfg = ClipConfig::from_file(&tiny().join("config.json")).unwrap();
    let dir = common::tmpdir("bf16"); // removed when the test ends
                                      // Write every tensor as BF16 with the safetensors crate.
    let mut bufs: Vec<(String, Vec<u8>, Vec<usize>)> = vec![];
    let mut rounded: HashMap<String, Tensor> = HashMap::new();
    for name in src.names() {
        let t = src.get(name).unwrap();
        let b = t.to_dtype(DType::BF16);
        let bytes: Vec<u8> = b.to_vec_f32().iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect();
        bufs.push((name.to_string(), bytes, t.shape().to_vec()));
        rounded.insert(name.to_string(), b.to_dtype(DType::F32));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> =
        bufs.iter().map(|(n, b, s)| (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    std::fs::copy(tiny().join("config.json"), dir.join("config.json")).unwrap();

    let from_file = ClipParts::load_dir(&dir, Towers::Both, &LoadOptions::default()).unwrap();
    let in_mem = ClipParts::load(&Weights::from_tensors(rounded, "mem"), &cfg, Towers::Both, &LoadOptions::default()).unwrap();
    let px = common::rand_tensor(&[2, 3, 32, 32], 1);
    let a = from_file.vision().unwrap().forward(&px, &mut |_, _| {}).unwrap();
    let b = in_mem.vision().unwrap().forward(&px, &mut |_, _| {}).unwrap();
    common::assert_tensor_close("bf16 file vs rounded", &a, &b, 1e-6, 1e-6);
    let ids = vec![vec![49406, 320, 2368, 49407]];
    let a = from_file.text().unwrap().forward(&ids, None, &mut |_, _| {}).unwrap();
    let b = in_mem.text().unwrap().forward(&ids, None, &mut |_, _| {}).unwrap();
    common::assert_tensor_close("bf16 file vs rounded (text)", &a, &b, 1e-6, 1e-6);
}

#[test]
fn f32_weights_are_mapped_not_copied() {
    let w = Weights::open(&tiny()).unwrap();
    let t = w.get("text_model.embeddings.token_embedding.weight").unwrap();
    assert!(matches!(t.storage(), clipforge::tensor::Storage::Mapped { .. }));
    // f32_data borrows the mapping (no conversion) when the tensor is f32 and aligned.
    assert!(matches!(t.f32_data(), std::borrow::Cow::Borrowed(_)));
}

/// A mapped tensor whose pages were released (`Storage::release_pages`, after an inference model
/// packed its weights) reads back the same bits from the file; owned storage ignores the hint.
#[test]
fn released_pages_read_back_the_same_values() {
    let w = Weights::open(&tiny()).unwrap();
    for name in ["text_model.embeddings.token_embedding.weight", "vision_model.encoder.layers.0.mlp.fc1.weight"] {
        let t = w.get(name).unwrap();
        let before = t.to_vec_f32();
        t.storage().release_pages();
        let after = t.to_vec_f32();
        assert!(before.iter().zip(&after).all(|(a, b)| a.to_bits() == b.to_bits()), "{name}: values changed after release_pages");
    }
    let owned = Tensor::from_vec(vec![1.0, 2.0, 3.0], &[3]).unwrap();
    owned.storage().release_pages();
    assert_eq!(owned.to_vec_f32(), vec![1.0, 2.0, 3.0]);
}
