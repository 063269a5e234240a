//! The trainable CLIP on the tape against the inference towers, and its gradients: the tiny (f32)
//! and odd (f16, sharded, head dim 59) fixtures give the same embeddings per element as
//! `ClipParts`; gradients of a scalar loss match central differences on chosen parameter
//! elements; per-block recompute gives the same gradients as keeping every activation.
mod common;
use clipforge::autograd::Tape;
use clipforge::backend::Ops;
use clipforge::model::synthetic::Rng;
use clipforge::model::tower::Mode;
use clipforge::model::{ClipParts, LoadOptions, Towers, Weights};
use clipforge::train::model::TrainClip;
use clipforge::Tensor;
use common::f64_ref::{towers_f64, F64Ref};
use std::path::{Path, PathBuf};

fn fixture(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(p)
}

/// Pixels and token ids (cut after the first end token) of the fixture's recorded HF inputs.
fn inputs(dir: &Path, eos: u32) -> (Tensor, Vec<Vec<u32>>) {
    let refs = Weights::open(&dir.join("activations.safetensors")).unwrap();
    let px = refs.get("input.pixel_values").unwrap().contiguous();
    let bytes = std::fs::read(dir.join("activations.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let v = st.tensor("input.input_ids").unwrap();
    let n = v.shape()[1];
    let flat: Vec<u32> = match v.dtype() {
        safetensors::Dtype::I64 => v.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32).collect(),
        _ => v.data().chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as u32).collect(),
    };
    let ids = flat.chunks(n).map(|s| s[..s.iter().position(|&x| x == eos).map_or(n, |p| p + 1)].to_vec()).collect();
    (px, ids)
}

fn close(what: &str, got: &[f32], want: &[f32], rtol: f32) {
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(g.is_finite() && (g - w).abs() <= rtol * (scale + w.abs()), "{what}[{i}]: {g} vs {w}");
    }
    assert_eq!(got.len(), want.len(), "{what}");
}

#[test]
fn train_forward_equals_inference_towers() {
    for name in ["tiny", "odd"] {
        let dir = fixture(name);
        let parts = ClipParts::load_dir(&dir, Towers::Both, &LoadOptions::default()).unwrap();
        let model = TrainClip::load_dir(&dir).unwrap();
        let (px, ids) = inputs(&dir, parts.config.text.eos_token_id);
        let tape = Tape::new();
        let sv = model.vars(&tape);
        let img = model.image_embeds(&tape, &sv, &px).unwrap();
        let txt = model.text_embeds(&tape, &sv, &ids).unwrap();
        let want_img = parts.vision().unwrap().forward(&px, &mut |_, _| {}).unwrap();
        let want_txt = parts.text().unwrap().forward(&ids, None, &mut |_, _| {}).unwrap();
        close(&format!("{name} image"), &img.value().to_vec_f32(), &want_img.to_vec_f32(), 1e-5);
        close(&format!("{name} text"), &txt.value().to_vec_f32(), &want_txt.to_vec_f32(), 1e-5);
        assert!(tape.len() > model.params.len(), "{name}: nothing recorded");
    }
}

/// Σ R ⊙ [image embeds; text embeds] · exp(s) on the tiny model, with its gradients.
fn loss_and_grads(model: &TrainClip, px: &Tensor, ids: &[Vec<u32>]) -> (f32, Vec<Option<Vec<f32>>>) {
    let tape = Tape::new();
    let sv = model.vars(&tape);
    let img = model.image_embeds(&tape, &sv, px).unwrap();
    let txt = model.text_embeds(&tape, &sv, ids).unwrap();
    let both = tape.cat(&[&img, &txt], 0).unwrap();
    let scaled = tape.mul(&both, &tape.exp(model.logit_scale(&sv).unwrap())).unwrap();
    let mut rng = Rng::new(5);
    let r: Vec<f32> = (0..scaled.value().numel()).map(|_| rng.normal()).collect();
    let loss: f32 = scaled.value().to_vec_f32().iter().zip(&r).map(|(a, b)| a * b).sum();
    let grads = tape.backward_from(&scaled, Tensor::from_vec(r, scaled.shape()).unwrap()).unwrap();
    (loss, sv.vars.iter().map(|v| grads.get(v).map(|g| g.to_vec_f32())).collect())
}

/// The same loss in float64: both towers on the f64 reference backend (tests/common/f64_ref.rs,
/// the one tower code of src/model/ over naive f64 ops), with parameter `i` element `e` moved by
/// `d` (exactly, in f64).
fn loss64(model: &TrainClip, px: &Tensor, ids: &[Vec<u32>], r: &[f32], moved: Option<(usize, usize, f64)>) -> f64 {
    let [v, t] = towers_f64(model, moved);
    let b = px.dim(0);
    let img = v.vision(&F64Ref, &model.config.vision, F64Ref.upload(&px.to_vec_f32()).unwrap(), b, Mode::Infer, &mut None).unwrap().0; // [B·D]
    let txt = t.text(&F64Ref, &model.config.text, ids, None, Mode::Infer, &mut None).unwrap().0; // [B·D]
    let ls = model.index("logit_scale").unwrap();
    let s = model.params[ls].1.to_vec_f32()[0] as f64 + moved.filter(|m| m.0 == ls).map_or(0.0, |m| m.2);
    img.iter().chain(&txt).zip(r).map(|(a, &b)| a * s.exp() * b as f64).sum()
}

/// The tape's f32 gradient of every parameter tensor of the tiny model against float64 central
/// differences of [`loss64`] on 3 elements each (2 chosen at random among those the batch reaches,
/// and the one with the largest gradient), h = 1e-4 of the tensor's largest |value| (1e-4 at
/// least): per element |g − fd| ≤ 1e-4·max|g| + 1e-6·G + 1e-3·|fd|, max|g| over the whole tensor,
/// G over the whole model (the k_proj biases' true gradient is 0: the tape's is noise). The f64
/// forward itself must equal the tape's to 1e-5 relative first.
#[test]
fn gradients_match_finite_differences() {
    let dir = fixture("tiny");
    let mut model = TrainClip::load_dir(&dir).unwrap();
    model.params.iter_mut().filter(|(n, _)| n == "logit_scale").for_each(|(_, t)| *t = Tensor::from_vec(vec![0.3], &[]).unwrap());
    let (px, ids) = inputs(&dir, 49407);
    let ids = &ids[..3];
    let (loss, grads) = loss_and_grads(&model, &px, ids);
    let mut rng = Rng::new(5);
    let r: Vec<f32> = (0..(px.dim(0) + ids.len()) * model.config.projection_dim).map(|_| rng.normal()).collect();
    let l64 = loss64(&model, &px, ids, &r, None);
    assert!((loss as f64 - l64).abs() <= 1e-5 * l64.abs().max(1.0), "f64 forward {l64} vs the tape's {loss}");
    let gall = grads.iter().flatten().flatten().fold(0f32, |m, v| m.max(v.abs())) as f64;
    let mut pick = Rng::new(11);
    let (mut checked, mut worst) = (0, 0f64);
    for (i, (name, t)) in model.params.iter().enumerate() {
        let g = grads[i].as_ref().unwrap_or_else(|| panic!("{name}: no gradient"));
        let gmax = g.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
        let reached: Vec<usize> = (0..g.len()).filter(|&e| g[e] != 0.0).collect();
        assert!(!reached.is_empty(), "{name}: the gradient is zero everywhere");
        let top = reached.iter().copied().max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs())).unwrap();
        let vmax = t.to_vec_f32().iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
        let h = 1e-4 * vmax.max(1.0);
        let mut elems = vec![top];
        for _ in 0..2 {
            elems.push(reached[(pick.uniform() * reached.len() as f32) as usize % reached.len()]);
        }
        for e in elems {
            let fd = (loss64(&model, &px, ids, &r, Some((i, e, h))) - loss64(&model, &px, ids, &r, Some((i, e, -h)))) / (2.0 * h);
            let err = (g[e] as f64 - fd).abs();
            let tol = 1e-4 * gmax + 1e-6 * gall + 1e-3 * fd.abs();
            assert!(err <= tol, "{name}[{e}]: tape {}, f64 finite differences {fd} (|err| {err:.3e}, max|g| {gmax:.3e})", g[e]);
            worst = worst.max(err / tol);
            checked += 1;
        }
    }
    eprintln!("{checked} gradient elements of {} parameter tensors checked; at most {worst:.2} of the tolerance used", model.params.len());
}

#[test]
fn recompute_gives_the_same_gradients() {
    let dir = fixture("odd");
    let mut model = TrainClip::load_dir(&dir).unwrap();
    let parts = ClipParts::load_dir(&dir, Towers::Both, &LoadOptions::default()).unwrap();
    let (px, ids) = inputs(&dir, parts.config.text.eos_token_id);
    let (l0, g0) = loss_and_grads(&model, &px, &ids);
    model.recompute = true;
    let (l1, g1) = loss_and_grads(&model, &px, &ids);
    assert_eq!(l0, l1);
    for ((name, _), (a, b)) in model.params.iter().zip(g0.iter().zip(&g1)) {
        let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
        close(&format!("recompute grad {name}"), b, a, 1e-6);
    }
}

#[test]
fn frozen_tower_records_nothing() {
    let mut model = TrainClip::load_dir(&fixture("tiny")).unwrap();
    model.freeze_tower(clipforge::model::schema::Tower::Vision);
    let (px, _) = inputs(&fixture("tiny"), 49407);
    let tape = Tape::new();
    let sv = model.vars(&tape);
    let before = tape.len();
    let img = model.image_embeds(&tape, &sv, &px).unwrap();
    assert!(!img.requires_grad());
    assert_eq!(tape.len(), before, "a frozen tower recorded nodes");
}
