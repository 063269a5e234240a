//! The library API (src/api.rs) on the committed random-weight fixtures: the same numbers as the
//! towers it wraps, packed text equal to padded text, images from files equal to decoded buffers,
//! similarity and zero-shot shapes and sums, and one-line errors for bad requests.
mod common;
use clipforge::io::image_decode::load_rgb8_hf;
use clipforge::model::{ClipConfig, ClipParts, LoadOptions, Towers};
use clipforge::{ClipModel, DType, DeviceChoice, OpenOptions, TextOptions};
use common::assert_close;
use std::path::{Path, PathBuf};

fn fixture(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(p)
}

fn cpu() -> OpenOptions {
    OpenOptions::default().device(DeviceChoice::Cpu)
}

const TEXTS: [&str; 4] = ["a cat", "a photo of a dog sitting on a red sofa next to a window", "x", "two birds and a very long tail of words that goes on"];

#[test]
fn packed_text_equals_padded_text_per_element() {
    for name in ["tiny", "odd"] {
        let model = ClipModel::open(fixture(name), &cpu()).unwrap();
        let tok = model.tokenizer(None).unwrap();
        let ids: Vec<Vec<u32>> = TEXTS.iter().map(|t| tok.encode(t).unwrap()).collect();
        let text = model.parts().text().unwrap();
        let packed = text.forward(&ids, None, &mut |_, _| {}).unwrap(); // [B, D]
        let padded = text.forward(&ids, Some(77), &mut |_, _| {}).unwrap(); // [B, D]
        common::assert_tensor_close(&format!("{name}: packed vs padded"), &packed, &padded, 1e-5, 1e-4);
        // and row by row: a sequence alone gives the same embedding as in a packed batch
        for (i, s) in ids.iter().enumerate() {
            let one = text.forward(std::slice::from_ref(s), None, &mut |_, _| {}).unwrap().to_vec_f32();
            assert_close(&format!("{name}: text {i} alone"), &one, packed.to_vec_f32()[i * one.len()..(i + 1) * one.len()].as_ref(), 1e-5, 1e-4);
        }
    }
}

#[test]
fn embeddings_match_the_towers_and_are_normalised() {
    let dir = fixture("tiny");
    let model = ClipModel::open(&dir, &cpu()).unwrap();
    assert_eq!(model.device(), "cpu");
    let e = model.embed_texts(&TEXTS).unwrap();
    assert_eq!((e.rows, e.dim), (4, model.embed_dim()));
    let parts = ClipParts::load_dir(&dir, Towers::Both, &LoadOptions::default()).unwrap();
    let tok = model.tokenizer(None).unwrap();
    let ids: Vec<Vec<u32>> = TEXTS.iter().map(|t| tok.encode(t).unwrap()).collect();
    let want = clipforge::model::clip::l2_normalize(&parts.text().unwrap().forward(&ids, Some(77), &mut |_, _| {}).unwrap()).unwrap();
    assert_close("text embeddings", &e.data, &want.to_vec_f32(), 1e-5, 1e-4);
    for r in e.iter_rows() {
        let n: f32 = r.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((n - 1.0).abs() < 1e-5, "row norm {n}");
    }
    let raw = model.embed_texts_with(&TEXTS, &TextOptions { normalize: false, batch: 3, ..Default::default() }, &mut |_| {}).unwrap();
    assert_close("raw, normalised here", &raw.normalized().data, &e.data, 1e-6, 1e-5);
}

#[test]
fn images_from_files_equal_images_from_buffers() {
    let model = ClipModel::open(fixture("tiny"), &cpu()).unwrap();
    let paths = [fixture("images/chelsea.png"), fixture("images/rocket_rgba.png"), fixture("images/camera_gray.png")];
    let from_files = model.embed_image_files(&paths).unwrap();
    let decoded: Vec<_> = paths.iter().map(|p| load_rgb8_hf(p).unwrap()).collect();
    let from_buffers = model.embed_images(&decoded).unwrap();
    assert_eq!((from_files.rows, from_files.dim), (3, model.embed_dim()));
    assert_eq!(from_files.data, from_buffers.data, "same pixels, same batch: bit-identical");

    let (cos, probs) = model.similarity(&from_files, &model.embed_texts(&TEXTS).unwrap()).unwrap();
    assert_eq!((cos.rows, cos.dim, probs.rows, probs.dim), (3, 4, 3, 4));
    for r in probs.iter_rows() {
        assert!((r.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    }
    assert!(cos.data.iter().all(|c| c.abs() <= 1.0 + 1e-5));
    let zs = model.zero_shot(&from_files, &["cat", "rocket"], "a photo of a {}.").unwrap();
    assert_eq!((zs.rows, zs.dim), (3, 2));
}

#[test]
fn bad_requests_are_one_line_errors() {
    let model = ClipModel::open(fixture("tiny"), &cpu()).unwrap();
    let long = "word ".repeat(100);
    let e = model.embed_texts_with(&[long.as_str()], &TextOptions { truncate: false, ..Default::default() }, &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("text 0") && e.contains("more than the context"), "{e}");
    // truncation on (the default): CLIP's cut to the context
    assert_eq!(model.embed_texts(&[long.as_str()]).unwrap().rows, 1);
    let e = model.tokenizer(Some(500)).err().unwrap().to_string();
    assert!(e.contains("exceeds the model's 77 positions"), "{e}");
    let e = model.zero_shot(&model.embed_texts(&["a"]).unwrap(), &["cat"], "no placeholder").unwrap_err().to_string();
    assert!(e.contains("no {}"), "{e}");
    let e = model.embed_image_files(&[fixture("images/missing.png")]).unwrap_err().to_string();
    assert!(e.contains("missing.png") && !e.contains('\n'), "{e}");
    let e = ClipModel::open(fixture("no_such_model"), &cpu()).err().unwrap().to_string();
    assert!(e.contains("no_such_model") && e.contains("not a model directory"), "{e}");
    let e = ClipModel::open(fixture("tiny"), &cpu().dtype(DType::F16)).err().unwrap().to_string();
    assert!(e.contains("f16"), "{e}");
    let empty: [&str; 0] = [];
    assert!(model.embed_texts(&empty).is_err());
}

#[test]
fn a_model_made_in_memory_embeds_ids_and_pixels_only() {
    let cfg = ClipConfig::from_file(&fixture("tiny/config.json")).unwrap();
    let w = clipforge::model::synthetic::random_weights(&cfg, 3);
    let model = ClipModel::from_weights(&w, &cfg, &cpu()).unwrap();
    let e = model.embed_texts(&["a cat"]).unwrap_err().to_string();
    assert!(e.contains("made in memory") && e.contains("tokenizer.json"), "{e}");
    let ids = vec![vec![cfg.text.bos_token_id, 400, 500, cfg.text.eos_token_id]];
    assert_eq!(model.embed_token_ids(&ids, true, 8, &mut |_| {}).unwrap().rows, 1);
    let s = cfg.vision.image_size;
    let px = common::randn(2 * 3 * s * s, 1);
    assert_eq!(model.embed_pixels(&px, 2).unwrap().rows, 2);
}
