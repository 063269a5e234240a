//! SmartCLIP fine-tuning on the tiny model: parity with the project's PyTorch reference
//! (scripts/smartclip_reference.py → tests/fixtures/smartclip/expected.json, same initial mask
//! network) step by step within 1e-4 relative; the checkpoint carries the mask network and a
//! resumed run continues the same curve; `embed-text --mask` returns the binary masks the
//! mask network computes; gradients of the mask network match finite differences.
mod common;
mod finetune_common;
use clipforge::io::npy::read_npy;
use clipforge::train::trainer::{run, StepLog, TrainConfig};
use common::{fixture, tmpdir};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// The Long-CLIP test configuration (tests/finetune_common) with SmartCLIP's data and settings.
fn config(out: &Path) -> TrainConfig {
    let mut c = finetune_common::config(&fixture("tiny"), out, 8, 1);
    c.data = fixture("smartclip/train.jsonl");
    c.pca_dim = 32;
    c.method = "smartclip".into();
    c.mask_lr = 1e-2;
    c.mask_init = Some(fixture("smartclip/mask_init.safetensors"));
    c
}

fn stop() -> Arc<AtomicBool> {
    Arc::new(AtomicBool::new(false))
}

#[test]
fn matches_the_pytorch_reference_and_resumes_exactly() {
    let d = tmpdir("parity");
    let out = d.join("run");
    let r = run(&config(&out), None, stop(), true).unwrap();
    let exp: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture("smartclip/expected.json")).unwrap()).unwrap();
    let steps = exp["steps"].as_array().unwrap();
    assert_eq!(r.steps.len(), steps.len());
    for (got, want) in r.steps.iter().zip(steps) {
        for (k, g) in
            [("loss", got.loss), ("loss_align", got.loss_align.unwrap()), ("mask_l1", got.mask_l1.unwrap()), ("lr", got.lr), ("logit_scale", got.logit_scale)]
        {
            let w = want[k].as_f64().unwrap();
            assert!(g.is_finite() && (g - w).abs() <= 1e-4 * w.abs(), "step {}: {k} = {g}, PyTorch {w}", got.step);
        }
    }
    assert!(out.join("model/mask_net.safetensors").is_file() && out.join("checkpoints/step-000004/mask_net.safetensors").is_file());
    // resume from step 4: the same curve
    let part = d.join("part");
    std::fs::create_dir_all(&part).unwrap();
    std::fs::copy(out.join("log.jsonl"), part.join("log.jsonl")).unwrap();
    run(&config(&part), Some(&out.join("checkpoints/step-000004")), stop(), true).unwrap();
    let read = |p: &Path| -> Vec<(usize, f64, f64)> {
        std::fs::read_to_string(p).unwrap().lines().map(|l| serde_json::from_str::<StepLog>(l).unwrap()).map(|s| (s.step, s.loss, s.logit_scale)).collect()
    };
    assert_eq!(read(&part.join("log.jsonl")), read(&out.join("log.jsonl")));
    // embed-text --mask: 0/1 masks of the model's width, not all equal
    let masks = d.join("m.npy");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_clipforge"))
        .args([
            "embed-text",
            "--model",
            out.join("model").to_str().unwrap(),
            "--out",
            d.join("e.npy").to_str().unwrap(),
            "--mask",
            masks.to_str().unwrap(),
            "a red square",
            "a blue circle drawn with paint",
            "x",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (m, shape) = read_npy(&masks).unwrap();
    assert_eq!(shape, vec![3, 24]);
    assert!(m.iter().all(|&v| v == 0.0 || v == 1.0));
    assert!(m.contains(&1.0) && m.contains(&0.0));
    // a model without a mask network: a one-line error
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_clipforge"))
        .args([
            "embed-text",
            "--model",
            fixture("tiny").to_str().unwrap(),
            "--out",
            d.join("e2.npy").to_str().unwrap(),
            "--mask",
            d.join("m2.npy").to_str().unwrap(),
            "x",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("mask_net.safetensors"));
}

/// SmartCLIP's forward in float64 (the towers and the mask network's block on the f64 reference
/// backend, tests/common/f64_ref.rs; pooling, projection, sigmoid and the loss written out here
/// from src/train/smartclip.rs's definition), with model parameter `i` element `e` moved by `d`.
/// Returns (loss, the soft masks s = σ(logits) [B·D]). The mask used is 1[s > 0.5] when `ste` is
/// None, else `hard0 + (s − s0)` for `ste = (hard0, s0)`: the straight-through surrogate, equal to
/// the binary mask at s0 and with ∂m/∂s = identity — its derivative is, by definition, the
/// gradient the straight-through estimator gives.
#[allow(clippy::too_many_arguments)]
fn smart64(
    m: &clipforge::train::model::TrainClip,
    first: usize,
    px: &clipforge::Tensor,
    ids: &[Vec<u32>],
    lambda: (f64, f64),
    moved: Option<(usize, usize, f64)>,
    ste: Option<(&[f64], &[f64])>,
) -> (f64, Vec<f64>) {
    use clipforge::backend::{Ops, Seqs};
    use clipforge::model::block::{forward, BlockRef, Stored};
    use clipforge::model::tower::Mode;
    use clipforge::model::BlockParam;
    use common::f64_ref::{towers_f64, F64Ref};
    let (b, dd, w) = (ids.len(), m.config.projection_dim, m.config.text.tower.hidden);
    let [vt, tt] = towers_f64(m, moved);
    let img = vt.vision(&F64Ref, &m.config.vision, F64Ref.upload(&px.to_vec_f32()).unwrap(), px.dim(0), Mode::Infer, &mut None).unwrap().0; // [B·D]
    let (states, txt, _) = tt.text_states(&F64Ref, &m.config.text, ids, Mode::Infer).unwrap(); // [B·T·W], [B·D]
    let t = states.len() / (b * w);
    // the mask network's parameters (mask_param_shapes order), moved in f64
    let p: Vec<Vec<f64>> = (first..m.params.len())
        .map(|i| {
            let mut v: Vec<f64> = m.params[i].1.to_vec_f32().iter().map(|&x| x as f64).collect();
            if let Some((_, e, d)) = moved.filter(|mv| mv.0 == i) {
                v[e] += d;
            }
            v
        })
        .collect();
    let stored: Vec<Stored<F64Ref>> = BlockParam::ALL
        .iter()
        .zip(&p)
        .map(|(bp, v)| {
            let shape = bp.shape(w, m.config.text.tower.intermediate);
            if BlockParam::LINEAR_WEIGHTS.contains(bp) {
                Stored::Linear(F64Ref.weight(v.clone(), shape[0], shape[1], clipforge::DType::F32).unwrap())
            } else {
                Stored::Buf(v.clone())
            }
        })
        .collect();
    let cfg = m.config.text.tower.clone();
    let seqs = Seqs::Batch { batch: b, seq: t, causal: true };
    let (x, _) = forward(&F64Ref, &BlockRef::new(&stored, &cfg).unwrap(), states, &seqs, None, false).unwrap(); // [B·T, W]
    let lin = |x: &[f64], wt: &[f64], bias: &[f64], n: usize, k: usize| -> Vec<f64> {
        (0..x.len() / k * n).map(|i| x[i / n * k..][..k].iter().zip(&wt[i % n * k..][..k]).map(|(a, c)| a * c).sum::<f64>() + bias[i % n]).collect()
    };
    let (q, kk, vv) = (&p[16], lin(&x, &p[17], &p[18], w, w), lin(&x, &p[19], &p[20], w, w)); // [B·T, W]
    let mut pooled = vec![0f64; b * w]; // [B, W]
    for bi in 0..b {
        let valid = clipforge::model::text::pool_position(&ids[bi], m.config.text.eos_token_id) + 1;
        let sc: Vec<f64> = (0..valid).map(|ti| kk[(bi * t + ti) * w..][..w].iter().zip(q).map(|(a, c)| a * c).sum::<f64>() / (w as f64).sqrt()).collect();
        let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = sc.iter().map(|s| (s - mx).exp()).sum();
        for (ti, s) in sc.iter().enumerate() {
            for c in 0..w {
                pooled[bi * w + c] += (s - mx).exp() / z * vv[(bi * t + ti) * w + c];
            }
        }
    }
    let soft: Vec<f64> = lin(&pooled, &p[21], &p[22], dd, w).iter().map(|l| 1.0 / (1.0 + (-l).exp())).collect(); // [B, D]
    let mask: Vec<f64> = match ste {
        None => soft.iter().map(|&s| if s > 0.5 { 1.0 } else { 0.0 }).collect(),
        Some((h0, s0)) => (0..soft.len()).map(|i| h0[i] + soft[i] - s0[i]).collect(),
    };
    // S[a, c] = I_a·(m_c ⊙ T_c) / (sqrt((I_a ⊙ I_a)·(m_c ⊙ m_c) + 1e-12)·‖T_c‖)
    let ls = m.index("logit_scale").unwrap();
    let tau = (m.params[ls].1.to_vec_f32()[0] as f64 + moved.filter(|mv| mv.0 == ls).map_or(0.0, |mv| mv.2)).exp();
    let logits: Vec<f64> = (0..b * b)
        .map(|i| {
            let (a, c) = (i / b, i % b);
            let (ia, mc, tc) = (&img[a * dd..][..dd], &mask[c * dd..][..dd], &txt[c * dd..][..dd]);
            let num: f64 = (0..dd).map(|e| ia[e] * mc[e] * tc[e]).sum();
            let qn: f64 = (0..dd).map(|e| ia[e] * ia[e] * mc[e] * mc[e]).sum();
            let tn: f64 = tc.iter().map(|v| v * v).sum::<f64>().sqrt();
            num / ((qn + 1e-12).sqrt() * tn) * tau
        })
        .collect();
    let ce =
        |row: &dyn Fn(usize, usize) -> f64| -> f64 { (0..b).map(|a| (0..b).map(|c| row(a, c).exp()).sum::<f64>().ln() - row(a, a)).sum::<f64>() / b as f64 };
    let align = ce(&|a, c| logits[a * b + c]) + ce(&|a, c| logits[c * b + a]);
    (lambda.0 * align + lambda.1 * mask.iter().sum::<f64>() / b as f64, soft)
}

/// The gradients of the SmartCLIP loss (alignment and sparsity terms) on the tape against float64
/// central differences of the straight-through surrogate (see [`smart64`]): for 8 mask-network
/// parameter tensors and 4 tower ones, 3 elements each (the largest gradient and 2 at random among
/// non-zero ones), h = 1e-4·max(1, max|θ|): per element |g − fd| ≤ 1e-4·max|g| + 1e-3·|fd|, max|g|
/// over the tensor. First the f64 forward must reproduce the tape's loss (1e-5 relative) and the
/// binary masks the engine computes (`id_masks`).
#[test]
fn mask_network_gradients_match_finite_differences() {
    use clipforge::autograd::Tape;
    use clipforge::train::model::TrainClip;
    use clipforge::train::smartclip::{id_masks, load_mask_params, smartclip_loss};
    let mut model = TrainClip::load_dir(&fixture("tiny")).unwrap();
    let first = model.params.len();
    let mask = load_mask_params(&model, &fixture("smartclip/mask_init.safetensors")).unwrap();
    model.add_params(mask.clone());
    let refs = clipforge::model::Weights::open(&fixture("tiny/activations.safetensors")).unwrap();
    let px = refs.get("input.pixel_values").unwrap().contiguous().narrow(0, 0, 3).unwrap().contiguous();
    let ids = vec![vec![49406, 320, 1125, 49407], vec![49406, 2368, 539, 320, 49407], vec![49406, 5, 49407]];
    let lambda = (1.0f32, 0.5f32);
    let tape = Tape::new();
    let sv = model.vars(&tape);
    let (l, _, _) = smartclip_loss(
        &tape,
        &model,
        &sv,
        &sv.vars[first..],
        &px,
        &ids,
        lambda.0,
        lambda.1,
        &(std::rc::Rc::new(clipforge::dist::Single) as std::rc::Rc<dyn clipforge::dist::Collective>),
    )
    .unwrap();
    let g = tape.backward(&l).unwrap();
    let grads: Vec<Option<Vec<f32>>> = sv.vars.iter().map(|v| g.get(v).map(|t| t.to_vec_f32())).collect();
    let lam = (lambda.0 as f64, lambda.1 as f64);
    let (l64, s0) = smart64(&model, first, &px, &ids, lam, None, None);
    assert!((l.item() as f64 - l64).abs() <= 1e-5 * l64.abs(), "f64 SmartCLIP loss {l64}, tape {}", l.item());
    let hard0: Vec<f64> = s0.iter().map(|&s| if s > 0.5 { 1.0 } else { 0.0 }).collect();
    let engine = id_masks(TrainClip::load_dir(&fixture("tiny")).unwrap(), mask, &ids, 8).unwrap();
    assert_eq!(engine.iter().map(|&v| v as f64).collect::<Vec<_>>(), hard0, "the f64 forward's binary masks differ from the engine's");
    assert!(hard0.contains(&1.0) && hard0.contains(&0.0), "degenerate masks");
    let names = [
        "mask_net.proj.weight",
        "mask_net.proj.bias",
        "mask_net.pool.query",
        "mask_net.pool.k.weight",
        "mask_net.pool.v.bias",
        "mask_net.block.self_attn.q_proj.weight",
        "mask_net.block.layer_norm1.weight",
        "mask_net.block.mlp.fc2.weight",
        "logit_scale",
        "text_projection.weight",
        "visual_projection.weight",
        "text_model.encoder.layers.1.mlp.fc1.weight",
    ];
    let mut pick = clipforge::model::synthetic::Rng::new(3);
    for name in names {
        let i = model.index(name).unwrap_or_else(|| panic!("no parameter {name}"));
        let gi = grads[i].as_ref().unwrap_or_else(|| panic!("{name}: no gradient"));
        let gmax = gi.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
        let reached: Vec<usize> = (0..gi.len()).filter(|&e| gi[e] != 0.0).collect();
        assert!(!reached.is_empty(), "{name}: zero gradient");
        let top = reached.iter().copied().max_by(|&a, &b| gi[a].abs().total_cmp(&gi[b].abs())).unwrap();
        let vmax = model.params[i].1.to_vec_f32().iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
        let h = 1e-4 * vmax.max(1.0);
        let mut elems = vec![top];
        for _ in 0..2 {
            elems.push(reached[(pick.uniform() * reached.len() as f32) as usize % reached.len()]);
        }
        for e in elems {
            let f = |d: f64| smart64(&model, first, &px, &ids, lam, Some((i, e, d)), Some((&hard0, &s0))).0;
            let fd = (f(h) - f(-h)) / (2.0 * h);
            let err = (gi[e] as f64 - fd).abs();
            assert!(
                err <= 1e-4 * gmax + 1e-3 * fd.abs(),
                "{name}[{e}]: tape {}, f64 finite differences of the straight-through surrogate {fd} (|err| {err:.3e}, max|g| {gmax:.3e})",
                gi[e]
            );
        }
    }
}

#[test]
fn caption_sampling_is_reproducible_across_resume() {
    // the Long-CLIP data has multi-sentence captions: each step draws one caption per image from
    // its pool (long, short, sentences); a resumed run must draw the same ones
    let d = tmpdir("sc-sampling");
    let mut cfg = config(&d.join("full"));
    cfg.data = fixture("longclip/train.jsonl");
    cfg.shuffle = true;
    cfg.max_steps = Some(8);
    cfg.batch = 4;
    run(&cfg, None, stop(), true).unwrap();
    let mut part = cfg.clone();
    part.out = d.join("part");
    part.log = Some(d.join("part/log.jsonl"));
    std::fs::create_dir_all(&part.out).unwrap();
    std::fs::copy(d.join("full/log.jsonl"), d.join("part/log.jsonl")).unwrap();
    run(&part, Some(&d.join("full/checkpoints/step-000004")), stop(), true).unwrap();
    let read = |p: &Path| -> Vec<(usize, f64)> {
        std::fs::read_to_string(p).unwrap().lines().map(|l| serde_json::from_str::<StepLog>(l).unwrap()).map(|s| (s.step, s.loss)).collect()
    };
    assert_eq!(read(&d.join("part/log.jsonl")), read(&d.join("full/log.jsonl")));
}
