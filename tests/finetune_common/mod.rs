//! Shared by the Long-CLIP fine-tuning tests (tests/finetune.rs on the CPU, tests/device_step.rs
//! on the emulated CUDA device): the stretched tiny model, the run configuration, the log reader
//! and the step-by-step comparison with the PyTorch reference fixtures.
#![allow(dead_code)]
use crate::common::fixture;
use clipforge::train::trainer::{StepLog, TrainConfig};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// The tiny model stretched to 248 positions (20 frozen) in `dir`/long.
pub fn stretched(dir: &Path) -> PathBuf {
    let out = dir.join("long");
    let o = Command::new(env!("CARGO_BIN_EXE_clipforge"))
        .args(["stretch", "--model", fixture("tiny").to_str().unwrap(), "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out
}

/// The configuration scripts/longclip_reference.py recorded the fixtures with (CPU backend).
pub fn config(model: &Path, out: &Path, batch: usize, accum: usize) -> TrainConfig {
    TrainConfig {
        model: model.to_path_buf(),
        data: fixture("longclip/train.jsonl"),
        image_root: None,
        out: out.to_path_buf(),
        seed: 0,
        shuffle: false,
        batch,
        accum,
        lr: 1e-3,
        warmup: 3,
        epochs: 1,
        max_steps: Some(12),
        save_every: 4,
        weight_decay: 1e-2,
        pca_dim: 4,
        recompute: false,
        log: Some(out.join("log.jsonl")),
        method: "longclip".into(),
        mask_lr: 1e-3,
        lambda_align: 1.0,
        lambda_sparsity: 1e-3,
        mask_init: None,
        device: "cpu".into(),
        dtype: clipforge::DType::F32,
        pca_group: None,
    }
}

pub fn no_stop() -> Arc<AtomicBool> {
    Arc::new(AtomicBool::new(false))
}

pub fn read_log(p: &Path) -> Vec<StepLog> {
    std::fs::read_to_string(p).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Every step's loss, L_long, L_short, lr and logit scale within `rtol` of the PyTorch fixture
/// tests/fixtures/longclip/`name`.
pub fn assert_matches_reference(what: &str, name: &str, steps: &[StepLog], rtol: f64) {
    let exp: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture("longclip").join(name)).unwrap()).unwrap();
    let want_steps = exp["steps"].as_array().unwrap();
    assert_eq!(steps.len(), want_steps.len(), "{what}: step count");
    for (got, want) in steps.iter().zip(want_steps) {
        for (k, g) in [
            ("loss", got.loss),
            ("loss_long", got.loss_long.unwrap()),
            ("loss_short", got.loss_short.unwrap()),
            ("lr", got.lr),
            ("logit_scale", got.logit_scale),
        ] {
            let w = want[k].as_f64().unwrap();
            assert!(g.is_finite() && (g - w).abs() <= rtol * w.abs(), "{what} ({name}) step {}: {k} = {g}, PyTorch {w}", got.step);
        }
    }
}

/// Long-CLIP's frozen position rows (20 × width 32 of the tiny text tower) are bit-identical
/// between two model directories, and the other rows moved.
pub fn assert_frozen_rows_kept(before: &Path, after: &Path) {
    use clipforge::model::Weights;
    let name = "text_model.embeddings.position_embedding.weight";
    let p0 = Weights::open(before).unwrap().get(name).unwrap().to_vec_f32();
    let p1 = Weights::open(after).unwrap().get(name).unwrap().to_vec_f32();
    let w = 32;
    assert_eq!(&p0[..20 * w], &p1[..20 * w], "frozen rows changed");
    assert_ne!(&p0[20 * w..], &p1[20 * w..]);
}
