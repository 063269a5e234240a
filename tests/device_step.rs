//! Whole Long-CLIP fine-tunes with the towers on the emulated CUDA device
//! (src/train/device_step.rs: device forward/backward, host loss head, AdamW kernel), on the tiny
//! model stretched to 248 positions:
//! - every step's loss, L_long, L_short, lr and logit scale match the PyTorch reference fixture
//!   (micro-batch 4 × accumulation 2, 12 steps) within 1e-4 relative, like the CPU trainer;
//!   frozen position rows stay bit-identical; the final weights match the CPU trainer's;
//! - activation recompute gives the same curve bit for bit;
//! - resume from a device checkpoint continues the same curve exactly;
//! - one step through the engines directly with the vision tower frozen: skipped on the device,
//!   frozen weights bit-identical, loss and text weights equal to the CPU step's;
//! - on a real GPU (skipped without one): the same reference run, f32 and bf16;
//! - bf16 / f16 forward GEMMs (f32 masters) stay within 2e-2 / 5e-3 of the f32 curve, and the
//!   saved weights are the f32 masters, not their half-precision copies;
//! - one bf16 / f16 micro-batch: the loss equals a reference with the GEMM inputs rounded to the
//!   format (tests/common/half_ref.rs) within u/4 and is farther than u/64 from the f32 loss.
mod common;
mod finetune_common;
use clipforge::cuda::EmuOps;
use clipforge::model::Weights;
use clipforge::train::device_step::DeviceStep;
use clipforge::train::step::StepEngine;
use clipforge::train::trainer::{run, run_with, RunResult, StepLog, TrainConfig};
use clipforge::DType;
use common::{assert_close, tmpdir};
use finetune_common::*;
use std::path::Path;

fn on_emulator(cfg: &TrainConfig, resume: Option<&Path>, low: Option<DType>) -> RunResult {
    run_with(cfg, resume, no_stop(), true, &|model, opt| {
        let s: Box<dyn StepEngine> = Box::new(DeviceStep::new(Box::new(EmuOps), model, opt, cfg.pca_dim, cfg.recompute, low)?);
        Ok(s)
    })
    .unwrap()
}

/// The real-GPU column: the same reference run through `--device cuda` when a GPU opens.
#[test]
fn gpu_fine_tune_matches_the_pytorch_reference() {
    if let Err(why) = clipforge::cuda::GpuOps::open() {
        eprintln!("skipped: no CUDA device ({why})");
        return;
    }
    let d = tmpdir("gpu-parity");
    let model = stretched(&d);
    let mut cfg = config(&model, &d.join("gpu"), 4, 2);
    cfg.device = "cuda".into();
    let r = run(&cfg, None, no_stop(), true).unwrap();
    assert_matches_reference("gpu", "expected_b4x2.json", &r.steps, 1e-4);
    assert_frozen_rows_kept(&model, &d.join("gpu/model"));
    for dt in ["bf16", "f16"] {
        cfg.dtype = clipforge::DType::parse(dt).unwrap();
        cfg.out = d.join(format!("gpu-{dt}"));
        cfg.log = Some(cfg.out.join("log.jsonl"));
        let b = run(&cfg, None, no_stop(), true).unwrap();
        for (x, y) in b.steps.iter().zip(&r.steps) {
            assert!((x.loss - y.loss).abs() <= 2e-2 * y.loss.abs(), "gpu {dt} step {}: {} vs {}", x.step, x.loss, y.loss);
        }
    }
}

fn curve(v: &[StepLog]) -> Vec<(usize, f64, Option<f64>, Option<f64>, f64, f64)> {
    v.iter().map(|s| (s.step, s.loss, s.loss_long, s.loss_short, s.lr, s.logit_scale)).collect()
}

fn weights(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let w = Weights::open(dir).unwrap();
    let mut names = w.names();
    names.sort();
    names.into_iter().map(|n| (n.to_string(), w.get(n).unwrap().to_vec_f32())).collect()
}

#[test]
fn device_fine_tune_matches_the_pytorch_reference_and_the_cpu_trainer() {
    let d = tmpdir("device-parity");
    let model = stretched(&d);
    let name = "expected_b4x2.json";
    let dev = on_emulator(&config(&model, &d.join("dev"), 4, 2), None, None);
    assert_matches_reference("emulated device", name, &dev.steps, 1e-4);
    assert_frozen_rows_kept(&model, &d.join("dev/model"));
    let cpu = run(&config(&model, &d.join("cpu"), 4, 2), None, no_stop(), true).unwrap();
    assert_matches_reference("cpu", name, &cpu.steps, 1e-4);
    let (wd, wc) = (weights(&d.join("dev/model")), weights(&d.join("cpu/model")));
    assert_eq!(wd.len(), wc.len());
    for ((n, a), (_, b)) in wd.iter().zip(&wc) {
        // The key bias cannot change attention (softmax is shift-invariant per query), so its
        // gradient is rounding noise (~1e-9) that AdamW normalises to ±lr steps: it drifts
        // differently on every backend (PyTorch included) and is not compared.
        if !n.ends_with("k_proj.bias") {
            assert_close(&format!("final {n}"), a, b, 1e-5, 2e-3);
        }
    }
}

#[test]
fn device_recompute_resume_and_bf16() {
    let d = tmpdir("device-modes");
    let model = stretched(&d);
    let short = |out: &str| {
        let mut c = config(&model, &d.join(out), 4, 1);
        c.max_steps = Some(4);
        c.save_every = 2;
        c
    };
    let full = on_emulator(&short("full"), None, None);
    assert_eq!(full.steps.len(), 4);
    // activation recompute: the same arithmetic, the same curve bit for bit
    let mut rc = short("recompute");
    rc.recompute = true;
    assert_eq!(curve(&on_emulator(&rc, None, None).steps), curve(&full.steps), "recompute changed the curve");
    // resume from the step-2 checkpoint of the full run
    let part = d.join("part");
    std::fs::create_dir_all(&part).unwrap();
    std::fs::copy(d.join("full/log.jsonl"), part.join("log.jsonl")).unwrap();
    on_emulator(&short("part"), Some(&d.join("full/checkpoints/step-000002")), None);
    assert_eq!(curve(&read_log(&part.join("log.jsonl"))), curve(&read_log(&d.join("full/log.jsonl"))), "resumed curve differs");
    // half-precision forward GEMMs with f32 master weights: bf16 (8-bit mantissa) within 2e-2 of
    // the f32 curve, f16 (11-bit) within 5e-3; the saved weights are the masters, not the copies
    let name = "text_model.encoder.layers.0.self_attn.q_proj.weight";
    let before = Weights::open(&model).unwrap().get(name).unwrap().to_vec_f32();
    for (low, dir, rtol) in [(DType::BF16, "bf16", 2e-2), (DType::F16, "f16", 5e-3)] {
        let r = on_emulator(&short(dir), None, Some(low));
        for (a, b) in r.steps.iter().zip(&full.steps) {
            assert!((a.loss - b.loss).abs() <= rtol * b.loss.abs(), "{dir} step {}: loss {} vs f32 {}", a.step, a.loss, b.loss);
        }
        let after = Weights::open(&d.join(dir).join("model")).unwrap().get(name).unwrap().to_vec_f32();
        let moved = before.iter().zip(&after).filter(|(x, y)| x != y).count();
        let rounded = |x: f32| if low == DType::BF16 { half::bf16::from_f32(x).to_f32() } else { half::f16::from_f32(x).to_f32() };
        let f32_only = after.iter().filter(|x| rounded(**x) != **x).count();
        assert!(moved == after.len() && f32_only > after.len() * 9 / 10, "{dir} masters: {moved} moved, {f32_only} of {} not {dir} values", after.len());
    }
}

/// One step through the two `StepEngine`s directly, with the vision tower frozen: the device
/// skips the vision backward, leaves every vision parameter bit-identical, and its loss and text
/// parameters match the CPU step's.
#[test]
fn a_frozen_tower_is_skipped_and_the_step_matches_the_cpu_one() {
    use clipforge::ops::adamw::AdamW;
    use clipforge::train::data::{read_samples, Loader};
    use clipforge::train::model::TrainClip;
    use clipforge::train::step::{CpuStep, Micro};
    let dir = common::fixture("tiny");
    let load = || {
        let mut m = TrainClip::load_dir(&dir).unwrap();
        m.freeze_tower(clipforge::model::schema::Tower::Vision);
        let opt = clipforge::train::trainer::new_optimizer(&m, AdamW::default());
        (m, opt)
    };
    let pre = clipforge::io::image_prep::PreprocessConfig::for_model_dir(&dir, 32).unwrap();
    let tok = clipforge::io::tokenizer::ClipTokenizer::from_file(&dir, 77).unwrap();
    let loader = Loader::new(read_samples(&common::fixture("longclip/train.jsonl"), None).unwrap(), 4, 0, false, pre, tok).unwrap();
    let batch = loader.load(&[0, 3, 5, 9]).unwrap();
    let mb = Micro { batch: &batch, smart_ids: None, last: true };
    let ((mut mc, mut oc), (mut md, mut od)) = (load(), load());
    let before = TrainClip::load_dir(&dir).unwrap();
    let mut cpu = CpuStep::new(false, 4, 1.0, 0.0);
    let mut dev = DeviceStep::new(Box::new(EmuOps), &md, &od, 4, false, None).unwrap();
    let (lc, ld) = (cpu.micro_batch(&mc, &mb, 1.0).unwrap(), dev.micro_batch(&md, &mb, 1.0).unwrap());
    assert!((lc.loss - ld.loss).abs() <= 1e-5 * lc.loss.abs(), "loss: cpu {} device {}", lc.loss, ld.loss);
    oc.begin_step();
    od.begin_step();
    cpu.apply(&mut mc, &mut oc, &[1e-3]).unwrap();
    dev.apply(&mut md, &mut od, &[1e-3]).unwrap();
    dev.sync(&mut md, &mut od).unwrap();
    for (i, (n, t)) in md.params.iter().enumerate() {
        let (got, orig) = (t.to_vec_f32(), before.params[i].1.to_vec_f32());
        if n.starts_with("vision_model") || n.starts_with("visual_projection") {
            assert_eq!(got, orig, "frozen {n} changed");
        } else if !n.ends_with("k_proj.bias") {
            assert_step_close(n, &got, &mc.params[i].1.to_vec_f32(), &oc.params[oc.index(n).unwrap()].v, 1e-3);
        }
    }
}

/// Weights after AdamW's first step, per element within 1e-6 + 1e-4·|w| — except where the
/// gradient is cancellation noise (|g| below 1e-4 of the tensor's gradient RMS, read from the
/// second moment v = 0.001·g² after one step): AdamW's normalisation lr·g/(|g| + eps) turns the
/// two paths' different rounding of such a g into up to ±lr, so those may differ by ≤ 2·lr, and
/// at most 0.1 % of a tensor's elements may be such. (Measured: fc2.weight[584] of the tiny text
/// tower, |g| = 2.9e-7 against an RMS of 0.077, differs by 6e-6.)
fn assert_step_close(n: &str, got: &[f32], want: &[f32], v: &[f32], lr: f64) {
    assert_eq!(got.len(), want.len(), "{n}: length");
    let g = |j: usize| (v[j] as f64 / 1e-3).sqrt(); // |g| from v after one step (1 − β2 = 1e-3)
    let rms = ((0..v.len()).map(|j| g(j) * g(j)).sum::<f64>() / v.len().max(1) as f64).sqrt();
    let mut noise = 0;
    for (j, (&p, &q)) in got.iter().zip(want).enumerate() {
        if p.is_finite() && (p - q).abs() <= 1e-6 + 1e-4 * q.abs() {
            continue;
        }
        assert!(
            p.is_finite() && g(j) < 1e-4 * rms && ((p - q).abs() as f64) <= 2.0 * lr,
            "{n}[{j}] after one step: {p}, CPU step {q} (gradient {:.2e}, the tensor's RMS {rms:.2e})",
            g(j)
        );
        noise += 1;
    }
    assert!(noise * 1000 <= got.len(), "{n}: {noise} of {} weights differ at noise-level gradients: too many", got.len());
}

/// The half-precision forward GEMMs of the device trainer (`--dtype bf16` / `f16`: weight copies
/// and GEMM inputs rounded, f32 accumulation) against a reference micro-batch: the same towers on
/// tests/common/half_ref.rs (inputs rounded to the format exactly as the fast path does, f64
/// accumulation) and the same loss head. One micro-batch of the tiny model on the emulated device:
/// - f32: the device loss equals the CPU f32 loss within 1e-6 relative (f32 noise);
/// - bf16 / f16: the loss equals the rounding reference's within u/4 relative (u = 2^-8 / 2^-11,
///   the format's unit roundoff; measured 0 for bf16, 0.146u for f16: an f32 difference of ~1e-7
///   (summation order, the activation's exp) moves the odd pre-activation or activation across an
///   f16 rounding boundary — two rounding points per MLP since the pre-activation is stored in
///   16 bits — and on the narrow tiny model (width 64) one such flip moves the output by
///   ~u/√width = u/8), and differs from the f32 loss by more than u/64 (measured 0.53u bf16,
///   0.12u f16; f32 noise is ~3e-8 relative): a trainer that silently kept f32 GEMMs, or rounded
///   to the other format (≥ 0.4u of this one away), fails.
#[test]
fn half_precision_loss_is_the_rounded_reference_not_f32() {
    use clipforge::autograd::Tape;
    use clipforge::model::schema::Tower;
    use clipforge::model::tower::{Mode, TowerParams};
    use clipforge::ops::adamw::AdamW;
    use clipforge::train::data::{read_samples, Loader};
    use clipforge::train::longclip::longclip_head;
    use clipforge::train::model::TrainClip;
    use clipforge::train::step::Micro;
    use common::half_ref::{unit_roundoff, HalfRef};
    let dir = common::fixture("tiny");
    let model = TrainClip::load_dir(&dir).unwrap();
    let opt = clipforge::train::trainer::new_optimizer(&model, AdamW::default());
    let pre = clipforge::io::image_prep::PreprocessConfig::for_model_dir(&dir, 32).unwrap();
    let tok = clipforge::io::tokenizer::ClipTokenizer::from_file(&dir, 77).unwrap();
    let loader = Loader::new(read_samples(&common::fixture("longclip/train.jsonl"), None).unwrap(), 4, 0, false, pre, tok).unwrap();
    let batch = loader.load(&[0, 3, 5, 9]).unwrap();
    let mb = Micro { batch: &batch, smart_ids: None, last: true };
    let device =
        |low: Option<DType>| DeviceStep::new(Box::new(EmuOps), &model, &opt, 4, false, low).unwrap().micro_batch(&model, &mb, 1.0).unwrap().loss as f64;
    let reference = |dt: DType| -> f64 {
        let value = |q: &clipforge::model::schema::Param| Ok(model.params[model.index(&q.name).unwrap()].1.clone());
        let (v, t) = (
            TowerParams::load_with(&HalfRef::DEVICE, &model.schema, Tower::Vision, dt, value).unwrap(),
            TowerParams::load_with(&HalfRef::DEVICE, &model.schema, Tower::Text, dt, value).unwrap(),
        );
        let nb = batch.long_ids.len();
        let img = v.vision(&HalfRef::DEVICE, &model.config.vision, batch.pixels.contiguous(), nb, Mode::Infer, &mut None).unwrap().0; // [B·D]
        let ids: Vec<Vec<u32>> = batch.long_ids.iter().chain(&batch.short_ids).cloned().collect();
        let txt = t.text(&HalfRef::DEVICE, &model.config.text, &ids, None, Mode::Infer, &mut None).unwrap().0; // [2B·D]
        let d = model.config.projection_dim;
        let tape = Tape::new();
        let c = |x: Vec<f32>, rows: usize| tape.constant(clipforge::Tensor::from_vec(x, &[rows, d]).unwrap());
        let txt = txt.to_vec_f32();
        let (img, long, short) = (c(img.to_vec_f32(), nb), c(txt[..nb * d].to_vec(), nb), c(txt[nb * d..].to_vec(), nb));
        let s = tape.constant(model.params[model.index("logit_scale").unwrap()].1.clone());
        longclip_head(&tape, &img, &long, &short, &s, 4, usize::MAX, 0..img.shape()[0]).unwrap().0.item() as f64
    };
    let (d32, r32) = (device(None), reference(DType::F32));
    eprintln!("f32: device {d32}, CPU {r32}");
    assert!((d32 - r32).abs() <= 1e-6 * r32.abs(), "f32: device loss {d32}, CPU {r32}");
    for dt in [DType::BF16, DType::F16] {
        let (dev, rf) = (device(Some(dt)), reference(dt));
        let u = unit_roundoff(dt);
        let tol = u / 4.0 * rf.abs();
        eprintln!(
            "{dt:?}: device {dev}, rounding reference {rf} (|diff| {:.3e} = {:.4}u·|loss|), f32 {d32} (|diff| {:.3e} = {:.4}u·|loss|)",
            (dev - rf).abs(),
            (dev - rf).abs() / (u * rf.abs()),
            (dev - d32).abs(),
            (dev - d32).abs() / (u * rf.abs())
        );
        assert!((dev - rf).abs() <= tol, "{dt:?}: device loss {dev}, {dt:?}-rounding reference {rf}: |diff| {:.3e} > u/4·|loss| = {tol:.3e}", (dev - rf).abs());
        assert!((dev - d32).abs() > u / 64.0 * rf.abs(), "{dt:?}: device loss {dev} within u/64 of the f32 loss {d32}: the GEMMs did not run in {dt:?}");
    }
}
