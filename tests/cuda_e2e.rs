//! End to end through the CUDA backend's code path: the tiny and odd HF fixture models run by
//! `CudaClip` (every kernel and GEMM of the GPU towers, launched with the production argument
//! packing and geometry) on the emulated device, against the CPU backend's towers, per element
//! |x − ref| ≤ 1e-4·0.1·max|ref| + 1e-4·|ref| (as tests/parity.rs). The same on a real GPU when
//! there is one; without it that test prints "skipped: no CUDA device" and passes. bf16: per element
//! against the bf16-rounding reference towers, and provably not f32 (`run_model_bf16`).
mod common;
use clipforge::cuda::{DeviceOps, EmuOps, GpuOps};
use clipforge::model::CudaClip;
use clipforge::model::{ClipParts, LoadOptions, Towers, Weights};
use clipforge::DType;
use std::path::{Path, PathBuf};

fn fixture(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(p)
}

/// The fixture's text ids (padded to 77 with the end token; int64 or int32), cut after the
/// first end token.
fn text_ids(dir: &Path, eos: u32) -> Vec<Vec<u32>> {
    let bytes = std::fs::read(dir.join("activations.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let v = st.tensor("input.input_ids").unwrap();
    let (b, n) = (v.shape()[0], v.shape()[1]);
    let flat: Vec<u32> = match v.dtype() {
        safetensors::Dtype::I64 => v.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32).collect(),
        safetensors::Dtype::I32 => v.data().chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as u32).collect(),
        d => panic!("input_ids dtype {d:?}"),
    };
    (0..b)
        .map(|i| {
            let s = &flat[i * n..(i + 1) * n];
            let end = s.iter().position(|&x| x == eos).map(|p| p + 1).unwrap_or(n);
            s[..end].to_vec()
        })
        .collect()
}

/// Per-element check; returns max |err| / max |ref|.
fn check(what: &str, got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    let mut max_rel = 0f32;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        assert!(g.is_finite() && err <= 1e-4 * scale * 0.1 + 1e-4 * w.abs(), "{what}: element {i} = {g}, CPU has {w} (|err| {err}, max|ref| {scale})");
        max_rel = max_rel.max(err / scale);
    }
    max_rel
}

fn run_model(name: &str, ops: Box<dyn DeviceOps>) {
    let dir = fixture(name);
    let model = ClipParts::load_dir(&dir, Towers::Both, &LoadOptions::default()).unwrap();
    let clip = CudaClip::new(ops, &model).unwrap();
    let what = clip.describe();

    let refs = Weights::open(&dir.join("activations.safetensors")).unwrap();
    let px = refs.get("input.pixel_values").unwrap().contiguous();
    let want = model.vision().unwrap().forward(&px, &mut |_, _| {}).unwrap();
    let got = clip.embed_images(&px.to_vec_f32(), px.dim(0)).unwrap();
    let e_img = check(&format!("{name} image embeddings on {what}"), &got, &want.to_vec_f32());

    let ids = text_ids(&dir, model.config.text.eos_token_id);
    let want = model.text().unwrap().forward(&ids, None, &mut |_, _| {}).unwrap();
    let got = clip.embed_texts(&ids).unwrap();
    let e_txt = check(&format!("{name} text embeddings on {what}"), &got, &want.to_vec_f32());

    // sequences without an end token pool at the largest id, as on the CPU
    let odd_ids: Vec<Vec<u32>> = vec![vec![49406, 320, 1125, 539], vec![49406, 2368, 49407], vec![5, 49406]];
    let want = model.text().unwrap().forward(&odd_ids, None, &mut |_, _| {}).unwrap();
    let got = clip.embed_texts(&odd_ids).unwrap();
    let e_argmax = check(&format!("{name} argmax-pooled text on {what}"), &got, &want.to_vec_f32());
    eprintln!(
        "{name} on {what}: max |err| / max|ref|: images {e_img:.3e} (B = {}), texts {e_txt:.3e} (B = {}), argmax-pooled texts {e_argmax:.3e}",
        px.dim(0),
        ids.len()
    );
}

/// The bf16 towers (Linear weights bf16, GEMM inputs rounded to bf16, f32 accumulation) through
/// the CUDA code path, per element against the bf16-rounding reference towers
/// (tests/common/half_ref.rs: the same rounding points, f64 accumulation) within
/// u·max|ref| + u·|ref| (u = 2^-8); and not f32: farther than u/8·max|ref| from the CPU f32 towers
/// somewhere, so a bf16 path that silently ran in f32 fails here.
fn run_model_bf16(name: &str, ops: Box<dyn DeviceOps>) {
    use clipforge::model::schema::{Schema, Tower};
    use clipforge::model::tower::{Mode, TowerParams};
    use common::half_ref::{assert_half_close, assert_not_f32, scaled_err, HalfRef};
    let dir = fixture(name);
    let f32_model = ClipParts::load_dir(&dir, Towers::Both, &LoadOptions::default()).unwrap();
    let clip = CudaClip::with_dtype(ops, &f32_model, DType::BF16).unwrap();
    let what = format!("{name} bf16 on {}", clip.describe());
    let (w, schema) = (Weights::open(&dir).unwrap(), Schema::clip(&f32_model.config));
    let (rv, rt) = (
        TowerParams::load(&HalfRef::DEVICE, &schema, Tower::Vision, &w, DType::BF16).unwrap(),
        TowerParams::load(&HalfRef::DEVICE, &schema, Tower::Text, &w, DType::BF16).unwrap(),
    );
    let refs = Weights::open(&dir.join("activations.safetensors")).unwrap();
    let px = refs.get("input.pixel_values").unwrap().contiguous();
    let ids = text_ids(&dir, f32_model.config.text.eos_token_id);
    let got_img = clip.embed_images(&px.to_vec_f32(), px.dim(0)).unwrap();
    let got_txt = clip.embed_texts(&ids).unwrap();
    for (got, want32, reference, kind) in [
        (
            &got_img,
            f32_model.vision().unwrap().forward(&px, &mut |_, _| {}).unwrap(),
            rv.vision(&HalfRef::DEVICE, &f32_model.config.vision, px.clone(), px.dim(0), Mode::Infer, &mut None).unwrap().0,
            "image",
        ),
        (
            &got_txt,
            f32_model.text().unwrap().forward(&ids, None, &mut |_, _| {}).unwrap(),
            rt.text(&HalfRef::DEVICE, &f32_model.config.text, &ids, None, Mode::Infer, &mut None).unwrap().0,
            "text",
        ),
    ] {
        let (w32, r) = (want32.to_vec_f32(), reference.to_vec_f32());
        eprintln!(
            "{what}: {kind} max|err|/max|ref| to the bf16-rounding reference: device bf16 {:.3}u, CPU f32 {:.3}u",
            scaled_err(got, &r) * 256.0,
            scaled_err(&w32, &r) * 256.0
        );
        assert_half_close(&format!("{what}: {kind} embeddings"), got, &r, DType::BF16);
        assert_not_f32(&format!("{what}: {kind}"), got, &w32, &r, DType::BF16);
    }
}

#[test]
fn bf16_towers_emulated_match_cpu() {
    run_model_bf16("tiny", Box::new(EmuOps));
    run_model_bf16("odd", Box::new(EmuOps));
}

#[test]
fn tiny_model_emulated_matches_cpu() {
    run_model("tiny", Box::new(EmuOps));
}

#[test]
fn odd_model_emulated_matches_cpu() {
    run_model("odd", Box::new(EmuOps));
}

#[test]
fn tiny_model_emulated_in_every_warp_schedule() {
    use clipforge::cuda::emu::{set_schedule, Schedule, TEST_SCHEDULES};
    for s in TEST_SCHEDULES {
        set_schedule(s);
        run_model("tiny", Box::new(EmuOps));
    }
    set_schedule(Schedule::Forward);
}

#[test]
fn gpu_towers_match_cpu() {
    let ops = match GpuOps::open() {
        Ok(o) => o,
        Err(why) => {
            eprintln!("skipped: no CUDA device ({why})");
            return;
        }
    };
    run_model("tiny", Box::new(ops));
    run_model("odd", Box::new(GpuOps::open().unwrap()));
    run_model_bf16("tiny", Box::new(GpuOps::open().unwrap()));
    run_model_bf16("odd", Box::new(GpuOps::open().unwrap()));
}

#[test]
fn bad_inputs_are_errors() {
    let model = ClipParts::load_dir(&fixture("tiny"), Towers::Both, &LoadOptions::default()).unwrap();
    let clip = CudaClip::new(Box::new(EmuOps), &model).unwrap();
    assert!(clip.embed_images(&[0.0; 5], 1).is_err());
    assert!(clip.embed_texts(&[]).is_err());
    assert!(clip.embed_texts(&[vec![49406, 99_999_999]]).is_err());
    assert!(clip.embed_texts(&[vec![1; 78]]).is_err());
    let text_only = ClipParts::load_dir(&fixture("tiny"), Towers::Text, &LoadOptions::default()).unwrap();
    let clip = CudaClip::new(Box::new(EmuOps), &text_only).unwrap();
    assert!(clip.embed_images(&[0.0; 3 * 32 * 32], 1).unwrap_err().to_string().contains("not loaded"));
}

#[test]
fn gelu_towers_emulated_match_cpu() {
    // The fixtures use QuickGELU; switch every block to exact GELU (bias_gelu_fwd_f32) on both sides.
    let dir = fixture("tiny");
    let mut model = ClipParts::load_dir(&dir, Towers::Both, &LoadOptions::default()).unwrap();
    let gelu = clipforge::model::config::Activation::Gelu;
    (model.config.vision.tower.act, model.config.text.tower.act) = (gelu, gelu);
    model.vision.as_mut().unwrap().cfg.tower.act = gelu;
    model.text.as_mut().unwrap().cfg.tower.act = gelu;
    let clip = CudaClip::new(Box::new(EmuOps), &model).unwrap();
    let refs = Weights::open(&dir.join("activations.safetensors")).unwrap();
    let px = refs.get("input.pixel_values").unwrap().contiguous();
    let want = model.vision().unwrap().forward(&px, &mut |_, _| {}).unwrap();
    check("gelu image embeddings", &clip.embed_images(&px.to_vec_f32(), px.dim(0)).unwrap(), &want.to_vec_f32());
    let ids = text_ids(&dir, model.config.text.eos_token_id);
    let want = model.text().unwrap().forward(&ids, None, &mut |_, _| {}).unwrap();
    check("gelu text embeddings", &clip.embed_texts(&ids).unwrap(), &want.to_vec_f32());
}

#[test]
fn a_perturbed_weight_is_caught() {
    // The comparison is not vacuous: a 1e-2 change of one element of an fc2 bias on the CPU side
    // (after the weights were uploaded) must fail the check for images and leave texts alone.
    // (One element: a shift of the whole bias is a constant per row, which the final LayerNorm removes.)
    let dir = fixture("tiny");
    let mut model = ClipParts::load_dir(&dir, Towers::Both, &LoadOptions::default()).unwrap();
    let clip = CudaClip::new(Box::new(EmuOps), &model).unwrap();
    let name = "vision_model.encoder.layers.1.mlp.fc2.bias";
    let mut b = Weights::open(&dir).unwrap().get(name).unwrap().to_vec_f32();
    b[3] += 1e-2;
    model.vision.as_mut().unwrap().params.set(name, clipforge::Tensor::from_vec(b.clone(), &[b.len()]).unwrap()).unwrap();
    let refs = Weights::open(&dir.join("activations.safetensors")).unwrap();
    let px = refs.get("input.pixel_values").unwrap().contiguous();
    let want = model.vision().unwrap().forward(&px, &mut |_, _| {}).unwrap().to_vec_f32();
    let got = clip.embed_images(&px.to_vec_f32(), px.dim(0)).unwrap();
    assert!(std::panic::catch_unwind(|| check("perturbed", &got, &want)).is_err());
    let ids = text_ids(&dir, model.config.text.eos_token_id);
    let want = model.text().unwrap().forward(&ids, None, &mut |_, _| {}).unwrap();
    check("text (unperturbed)", &clip.embed_texts(&ids).unwrap(), &want.to_vec_f32());
}
