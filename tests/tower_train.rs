//! The towers' training forward and hand-written backward (src/model/tower.rs, tower_backward.rs) against the
//! tape's model (the oracle), per element, for every parameter of both towers: on the CPU backend
//! (packed text) and on the emulated CUDA backend (padded text, the kernels of kernels/); with and
//! without per-block recompute (bit-identical gradients).
mod common;
use clipforge::autograd::Tape;
use clipforge::backend::cpu::Cpu;
use clipforge::backend::device::Device;
use clipforge::backend::Ops;
use clipforge::cuda::EmuOps;
use clipforge::model::schema::{Schema, Tower};
use clipforge::model::tower::Mode;
use clipforge::model::tower::TowerParams;
use clipforge::model::tower_backward::Grads;
use clipforge::model::{ClipConfig, Weights};
use clipforge::train::model::TrainClip;
use clipforge::{DType, Tensor};
use std::path::{Path, PathBuf};

fn fixture(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(p)
}

struct Case {
    config: ClipConfig,
    weights: Weights,
    px: Tensor,
    ids: Vec<Vec<u32>>,
    /// d(loss)/d(embeddings) for images and texts.
    de_img: Vec<f32>,
    de_txt: Vec<f32>,
    /// The tape's gradients by schema index.
    want: Vec<Option<Vec<f32>>>,
}

fn case(name: &str) -> Case {
    let dir = fixture(name);
    let config = ClipConfig::from_file(&dir.join("config.json")).unwrap();
    let weights = Weights::open(&dir).unwrap();
    let s = config.vision.image_size;
    let px = Tensor::from_vec(common::randn(3 * 3 * s * s, 5), &[3, 3, s, s]).unwrap();
    let (bos, eos) = (config.text.bos_token_id, config.text.eos_token_id);
    let ids = vec![vec![bos, 320, 1125, eos], vec![bos, 99, eos], vec![bos, 5, 6, 7, 8, 9, 10, eos]];
    let d = config.projection_dim;
    let (de_img, de_txt) = (common::randn(3 * d, 6), common::randn(3 * d, 7));
    let model = TrainClip::from_weights(&weights, &config).unwrap();
    let tape = Tape::new();
    let sv = model.vars(&tape);
    let img = common::oracle::image_embeds_composite(&model, &tape, &sv, &px).unwrap();
    let txt = common::oracle::text_embeds_composite(&model, &tape, &sv, &ids).unwrap();
    let r_img = tape.constant(Tensor::from_vec(de_img.clone(), &[3, d]).unwrap());
    let r_txt = tape.constant(Tensor::from_vec(de_txt.clone(), &[3, d]).unwrap());
    let loss = tape.add(&tape.sum_all(&tape.mul(&img, &r_img).unwrap()).unwrap(), &tape.sum_all(&tape.mul(&txt, &r_txt).unwrap()).unwrap()).unwrap();
    let grads = tape.backward(&loss).unwrap();
    let want = sv.vars.iter().map(|v| grads.get(v).map(|g| g.to_vec_f32())).collect();
    Case { config, weights, px, ids, de_img, de_txt, want }
}

/// Both towers' gradients on backend `ops` → by schema index.
fn run<O: Ops>(ops: &O, c: &Case, recompute: bool) -> Vec<Option<Vec<f32>>> {
    let schema = Schema::clip(&c.config);
    let mut out = vec![None; schema.len()];
    let b = c.px.dim(0);
    let vt = TowerParams::load(ops, &schema, Tower::Vision, &c.weights, DType::F32).unwrap();
    let (_, saved) = vt.vision(ops, &c.config.vision, ops.upload(&c.px.to_vec_f32()).unwrap(), b, Mode::Train { recompute }, &mut None).unwrap();
    let mut saved = saved.unwrap();
    let mut g: Grads<O> = (0..vt.len()).map(|_| None).collect();
    vt.vision_backward(ops, &c.config.vision, &mut saved, &ops.upload(&c.de_img).unwrap(), &mut g).unwrap();
    for (i, d) in g.into_iter().enumerate() {
        out[vt.first() + i] = d.map(|d| ops.download(&d).unwrap()[..vt.numel(i)].to_vec());
    }
    let tt = TowerParams::load(ops, &schema, Tower::Text, &c.weights, DType::F32).unwrap();
    let (_, saved) = tt.text(ops, &c.config.text, &c.ids, None, Mode::Train { recompute }, &mut None).unwrap();
    let mut saved = saved.unwrap();
    let mut g: Grads<O> = (0..tt.len()).map(|_| None).collect();
    tt.text_backward(ops, &c.config.text, &mut saved, &ops.upload(&c.de_txt).unwrap(), &mut g).unwrap();
    for (i, d) in g.into_iter().enumerate() {
        out[tt.first() + i] = d.map(|d| ops.download(&d).unwrap()[..tt.numel(i)].to_vec());
    }
    out
}

fn compare(what: &str, c: &Case, got: &[Option<Vec<f32>>]) {
    let schema = Schema::clip(&c.config);
    let mut checked = 0;
    let all = c.want.iter().flatten().flatten().fold(0f32, |m, v| m.max(v.abs())); // the towers' gradient scale
    for (i, p) in schema.params().iter().enumerate() {
        if p.name == "logit_scale" {
            continue;
        }
        let want = c.want[i].as_ref().unwrap_or_else(|| panic!("{what}: the tape has no gradient for {}", p.name));
        let got = got[i].as_ref().unwrap_or_else(|| panic!("{what}: no gradient for {}", p.name));
        if p.name.ends_with("k_proj.bias") {
            // Analytically zero (a shift of every key moves a query's logits alike): both sides
            // are rounding noise, which must stay at noise level.
            let bad = got.iter().chain(want).find(|v| v.is_nan() || v.abs() > 1e-5 * all);
            assert!(bad.is_none(), "{what}: d {} = {bad:?}, not rounding noise (gradient scale {all})", p.name);
            checked += 1;
            continue;
        }
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        common::assert_close(&format!("{what}: d {}", p.name), got, want, 2e-4 * scale.max(1e-3), 2e-3);
        checked += 1;
    }
    assert_eq!(checked, schema.len() - 1, "{what}: every parameter but the logit scale");
}

#[test]
fn cpu_towers_backward_matches_the_tape() {
    for name in ["tiny", "odd"] {
        let c = case(name);
        let got = run(&Cpu, &c, false);
        compare(&format!("{name} cpu"), &c, &got);
        assert_eq!(got, run(&Cpu, &c, true), "{name}: recompute changes nothing, bit for bit");
    }
}

#[test]
fn emulated_device_towers_backward_matches_the_tape() {
    let c = case("tiny");
    let dev = Device::new(Box::new(EmuOps));
    let got = run(&dev, &c, false);
    compare("tiny emulated cuda", &c, &got);
    assert_eq!(got, run(&dev, &c, true), "emulated recompute changes nothing, bit for bit");
}

#[test]
fn the_emulated_device_packs_captions() {
    let c = case("tiny");
    let dev = Device::new(Box::new(EmuOps));
    let schema = Schema::clip(&c.config);
    let tt = TowerParams::load(&dev, &schema, Tower::Text, &c.weights, DType::F32).unwrap();
    let (_, saved) = tt.text(&dev, &c.config.text, &c.ids, None, Mode::Train { recompute: false }, &mut None).unwrap();
    let saved = saved.unwrap();
    let real: usize = c.ids.iter().map(|s| s.len()).sum();
    let padded = c.ids.len() * c.ids.iter().map(|s| s.len()).max().unwrap();
    eprintln!("text rows computed on the emulated device: {} packed, {padded} padded", saved.rows());
    assert!(saved.packed() && saved.rows() == real && real < padded);
}

/// SmartCLIP's per-token text states and embeddings: the tower's backward from both outputs
/// against the tape composite, every text parameter, CPU and emulated device.
#[test]
fn text_states_backward_matches_the_tape() {
    let c = case("odd");
    let model = TrainClip::from_weights(&c.weights, &c.config).unwrap();
    let (b, t, w, d) = (c.ids.len(), c.ids.iter().map(|s| s.len()).max().unwrap(), c.config.text.tower.hidden, c.config.projection_dim);
    let rs = common::randn(b * t * w, 9);
    let want = {
        let tape = Tape::new();
        let sv = model.vars(&tape);
        let (h, e) = common::oracle::text_states_composite(&model, &tape, &sv, &c.ids).unwrap();
        let r1 = tape.constant(Tensor::from_vec(rs.clone(), &[b, t, w]).unwrap());
        let r2 = tape.constant(Tensor::from_vec(c.de_txt.clone(), &[b, d]).unwrap());
        let loss = tape.add(&tape.sum_all(&tape.mul(&h, &r1).unwrap()).unwrap(), &tape.sum_all(&tape.mul(&e, &r2).unwrap()).unwrap()).unwrap();
        let g = tape.backward(&loss).unwrap();
        sv.vars.iter().map(|v| g.get(v).map(|g| g.to_vec_f32())).collect::<Vec<_>>()
    };
    let schema = Schema::clip(&c.config);
    fn check<O: Ops>(ops: &O, c: &Case, schema: &Schema, rs: &[f32], want: &[Option<Vec<f32>>], what: &str) {
        let tt = TowerParams::load(ops, schema, Tower::Text, &c.weights, DType::F32).unwrap();
        let (_, _, saved) = tt.text_states(ops, &c.config.text, &c.ids, Mode::Train { recompute: false }).unwrap();
        let mut saved = saved.unwrap();
        let mut g: Grads<O> = (0..tt.len()).map(|_| None).collect();
        tt.text_states_backward(ops, &c.config.text, &mut saved, Some(&ops.upload(rs).unwrap()), &ops.upload(&c.de_txt).unwrap(), &mut g).unwrap();
        for (i, d) in g.into_iter().enumerate() {
            let name = &schema.params()[tt.first() + i].name;
            if name.ends_with("k_proj.bias") {
                continue; // analytically zero (a shift of every key moves a query's logits alike): rounding noise on both sides
            }
            let want = want[tt.first() + i].as_ref().unwrap();
            let got = ops.download(&d.unwrap_or_else(|| panic!("{what}: no gradient for {name}"))).unwrap()[..tt.numel(i)].to_vec();
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            common::assert_close(&format!("{what}: d {name}"), &got, want, 2e-4 * scale.max(1e-3), 2e-3);
        }
    }
    check(&Cpu, &c, &schema, &rs, &want, "odd cpu states");
    check(&Device::new(Box::new(EmuOps)), &c, &schema, &rs, &want, "odd emulated states");
}
