//! Parity with HF transformers on the committed random-weight fixtures (tests/fixtures, made by
//! scripts/make_fixtures.py): every layer's activations in order, so a failure names the first
//! layer that diverges; final embeddings within 1e-4 relative.
mod common;
use clipforge::backend::device::Device;
use clipforge::backend::Ops;
use clipforge::model::schema::{Schema, Tower};
use clipforge::model::tower::{Mode, TowerParams};
use clipforge::model::{ClipConfig, ClipParts, LoadOptions, Towers, Weights};
use clipforge::DType;
use clipforge::Tensor;
use safetensors::SafeTensors;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn fixture(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(p)
}

/// Input ids of the activations file (stored as int64 or int32).
fn input_ids(path: &Path) -> Vec<Vec<u32>> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let v = st.tensor("input.input_ids").unwrap();
    let (b, t) = (v.shape()[0], v.shape()[1]);
    let flat: Vec<u32> = match v.dtype() {
        safetensors::Dtype::I64 => v.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32).collect(),
        safetensors::Dtype::I32 => v.data().chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as u32).collect(),
        safetensors::Dtype::F32 => v.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as u32).collect(),
        d => panic!("input_ids dtype {d:?}"),
    };
    (0..b).map(|i| flat[i * t..(i + 1) * t].to_vec()).collect()
}

/// The activations a tower must record, in order (a hook that records nothing, or skips or
/// renames a layer, fails here rather than passing over fewer layers).
fn expected(tower: &str, layers: usize) -> Vec<String> {
    let head: &[&str] = if tower == "vision" { &["vision.embeddings", "vision.pre_ln"] } else { &["text.embeddings"] };
    let mut v: Vec<String> = head.iter().map(|s| s.to_string()).collect();
    v.extend((0..layers).map(|i| format!("{tower}.layer.{i}")));
    v.extend([format!("{tower}.pooled"), format!("{tower}.embeds")]);
    v
}

fn names(got: &[(String, Tensor)]) -> Vec<String> {
    got.iter().map(|(n, _)| n.clone()).collect()
}

/// Compares recorded activations with the reference in recording order; panics naming the
/// first layer whose elements leave |x − ref| ≤ atol·max|ref| + rtol·|ref|.
/// A recorded activation with fewer rows than HF's (the last block and the final LayerNorm run
/// for the pooled rows only) is compared with HF's rows `pooled` (indices into its [B·T] rows).
fn check_layers(model: &str, got: &[(String, Tensor)], refs: &Weights, rtol: f32, pooled: &[usize]) {
    assert!(!got.is_empty(), "{model}: the tower recorded no activations");
    let mut report = BTreeMap::new();
    for (name, t) in got {
        let want = refs.get(name).unwrap_or_else(|e| panic!("{model}: reference has no {name}: {e}"));
        let width = *want.shape().last().unwrap();
        let mut w = want.to_vec_f32();
        if t.numel() == pooled.len() * width && w.len() != t.numel() {
            w = pooled.iter().flat_map(|&r| w[r * width..(r + 1) * width].to_vec()).collect();
        }
        assert_eq!((t.numel(), *t.shape().last().unwrap()), (w.len(), width), "{model}: layer {name} shape {:?} vs HF {:?}", t.shape(), want.shape());
        let g = t.to_vec_f32();
        let scale = w.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        let mut max_rel = 0f32;
        for (i, (a, b)) in g.iter().zip(&w).enumerate() {
            let err = (a - b).abs();
            let ok = a.is_finite() && err <= rtol * scale * 0.1 + rtol * b.abs();
            if !ok {
                panic!("{model}: first diverging layer is {name}: element {i} = {a}, HF has {b} (|err| {err}, layer max|ref| {scale})");
            }
            max_rel = max_rel.max(err / scale);
        }
        report.insert(name.clone(), max_rel);
    }
    eprintln!("{model}: max error / max|ref| per layer: {report:?}");
}

fn run_model(name: &str) {
    let dir = fixture(name);
    let model = ClipParts::load_dir(&dir, Towers::Both, &LoadOptions::default()).unwrap();
    let refs = Weights::open(&dir.join("activations.safetensors")).unwrap();
    let px = refs.get("input.pixel_values").unwrap().contiguous();
    let mut got: Vec<(String, Tensor)> = vec![];
    model.vision().unwrap().forward(&px, &mut |n, t| got.push((n.to_string(), t.clone()))).unwrap();
    let (b, t) = (px.dim(0), model.config.vision.tokens());
    let layers = model.config.vision.tower.layers;
    assert_eq!(names(&got), expected("vision", layers), "{name}: embeddings, pre_ln, every layer, pooled, embeds");
    check_layers(name, &got, &refs, 1e-4, &(0..b).map(|i| i * t).collect::<Vec<_>>());

    // Text: the fixture pads to 77 with the end token; strip to the first end token and let the
    // tower pad back to 77 so every recorded [B, 77, W] activation is comparable.
    let eos = model.config.text.eos_token_id;
    let ids: Vec<Vec<u32>> = input_ids(&dir.join("activations.safetensors"))
        .into_iter()
        .map(|s| {
            let end = s.iter().position(|&t| t == eos).map(|p| p + 1).unwrap_or(s.len());
            s[..end].to_vec()
        })
        .collect();
    let mut got: Vec<(String, Tensor)> = vec![];
    model.text().unwrap().forward(&ids, Some(77), &mut |n, t| got.push((n.to_string(), t.clone()))).unwrap();
    assert_eq!(names(&got), expected("text", model.config.text.tower.layers), "{name}: embeddings, every layer, pooled, embeds");
    let ends: Vec<usize> = ids.iter().enumerate().map(|(i, s)| i * 77 + s.len() - 1).collect();
    check_layers(name, &got, &refs, 1e-4, &ends);
    // Packed (no padding, the last block for the pooled rows only): HF's pooled state and embeddings.
    let mut got: Vec<(String, Tensor)> = vec![];
    model
        .text()
        .unwrap()
        .forward(&ids, None, &mut |n, t| {
            if n == "text.pooled" || n == "text.embeds" {
                got.push((n.to_string(), t.clone()))
            }
        })
        .unwrap();
    assert_eq!(names(&got), ["text.pooled", "text.embeds"], "{name}: the packed text tower recorded its pooled state and embeddings");
    check_layers(name, &got, &refs, 1e-4, &ends);
}

/// The same layer-by-layer check on any backend: the one tower code with a hook that downloads
/// every activation (the CPU run above goes through the CPU front-end, this one through `Ops`).
fn run_on<O: Ops>(ops: &O, name: &str) {
    let dir = fixture(name);
    let cfg = ClipConfig::from_file(&dir.join("config.json")).unwrap();
    let (weights, refs) = (Weights::open(&dir).unwrap(), Weights::open(&dir.join("activations.safetensors")).unwrap());
    let schema = Schema::clip(&cfg);
    let px = refs.get("input.pixel_values").unwrap().contiguous();
    let (b, t) = (px.dim(0), cfg.vision.tokens());
    let mut got: Vec<(String, Tensor)> = vec![];
    let mut hook = |n: &str, x: &O::Buf, shape: &[usize]| {
        let v = ops.download(x).unwrap()[..shape.iter().product::<usize>()].to_vec();
        got.push((n.to_string(), Tensor::from_vec(v, shape).unwrap()));
    };
    let vt = TowerParams::load(ops, &schema, Tower::Vision, &weights, DType::F32).unwrap();
    vt.vision(ops, &cfg.vision, ops.upload(&px.to_vec_f32()).unwrap(), b, Mode::Infer, &mut Some(&mut hook)).unwrap();
    assert_eq!(names(&got), expected("vision", cfg.vision.tower.layers), "{name}: every vision activation recorded");
    check_layers(&format!("{name} on {}", ops.describe()), &got, &refs, 1e-4, &(0..b).map(|i| i * t).collect::<Vec<_>>());
    let eos = cfg.text.eos_token_id;
    let ids: Vec<Vec<u32>> = input_ids(&dir.join("activations.safetensors"))
        .into_iter()
        .map(|s| s[..s.iter().position(|&x| x == eos).map_or(s.len(), |p| p + 1)].to_vec())
        .collect();
    let mut got: Vec<(String, Tensor)> = vec![];
    let mut hook = |n: &str, x: &O::Buf, shape: &[usize]| {
        let v = ops.download(x).unwrap()[..shape.iter().product::<usize>()].to_vec();
        got.push((n.to_string(), Tensor::from_vec(v, shape).unwrap()));
    };
    let tt = TowerParams::load(ops, &schema, Tower::Text, &weights, DType::F32).unwrap();
    tt.text(ops, &cfg.text, &ids, Some(77), Mode::Infer, &mut Some(&mut hook)).unwrap();
    assert_eq!(names(&got), expected("text", cfg.text.tower.layers), "{name}: every text activation recorded");
    let ends: Vec<usize> = ids.iter().enumerate().map(|(i, s)| i * 77 + s.len() - 1).collect();
    check_layers(&format!("{name} text on {}", ops.describe()), &got, &refs, 1e-4, &ends);
}

#[test]
fn emulated_cuda_matches_hf_layer_by_layer() {
    let dev = Device::new(Box::new(clipforge::cuda::EmuOps));
    run_on(&dev, "tiny");
    run_on(&dev, "odd");
    run_on(&clipforge::backend::cpu::Cpu, "odd");
}

#[test]
fn tiny_model_matches_hf_layer_by_layer() {
    run_model("tiny");
}

#[test]
fn odd_model_matches_hf_layer_by_layer() {
    run_model("odd");
}

#[test]
fn padding_does_not_change_text_embeddings() {
    // Padding only to the longest sequence (what clipforge does) equals padding to 77 (what HF does).
    let dir = fixture("tiny");
    let model = ClipParts::load_dir(&dir, Towers::Text, &LoadOptions::default()).unwrap();
    let t = model.text().unwrap();
    let ids = vec![vec![49406, 320, 1125, 539, 320, 2368, 49407], vec![49406, 320, 49407]];
    let short = t.forward(&ids, None, &mut |_, _| {}).unwrap();
    let long = t.forward(&ids, Some(77), &mut |_, _| {}).unwrap();
    common::assert_tensor_close("padding", &short, &long, 1e-6, 1e-5);
}

#[test]
fn a_wrong_layer_is_named() {
    // Perturb one bias of vision layer 1: the check must name vision.layer.1, not a later layer.
    let dir = fixture("tiny");
    let mut model = ClipParts::load_dir(&dir, Towers::Vision, &LoadOptions::default()).unwrap();
    let refs = Weights::open(&dir.join("activations.safetensors")).unwrap();
    let name = "vision_model.encoder.layers.1.mlp.fc2.bias";
    let bias = Weights::open(&dir).unwrap().get(name).unwrap().to_dtype(clipforge::DType::F32).map_f32(|x| x + 1e-2);
    model.vision.as_mut().unwrap().params.set(name, bias).unwrap();
    let px = refs.get("input.pixel_values").unwrap().contiguous();
    let mut got: Vec<(String, Tensor)> = vec![];
    model.vision().unwrap().forward(&px, &mut |n, t| got.push((n.to_string(), t.clone()))).unwrap();
    let err = std::panic::catch_unwind(|| check_layers("tiny", &got, &refs, 1e-4, &(0..px.dim(0)).map(|i| i * 17).collect::<Vec<_>>())).unwrap_err();
    let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("first diverging layer is vision.layer.1"), "{msg}");
}
