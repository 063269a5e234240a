//! Dry runs: the towers and the Long-CLIP training step on the [`RecordingOps`] device, with
//! zero weights made in memory (never touched: the recorder ignores upload data, and zeroed
//! allocations stay unmapped), so that ViT-L/14 training at batch 128 "runs" in seconds.
//! Each returns the recorded operations of one timed unit (one tower batch, one optimizer step),
//! without the one-time work before it (weight uploads, half copies, optimizer state).
use super::record::{Op, RecordingOps};
use crate::error::{Error, Result};
use crate::model::clip::ClipParts;
use crate::model::config::ClipConfig;
use crate::model::device::CudaClip;
use crate::model::layers::LoadOptions;
use crate::model::schema::Schema;
use crate::model::weights::Weights;
use crate::model::Towers;
use crate::ops::adamw::AdamW;
use crate::tensor::{DType, Tensor};
use crate::train::data::Batch;
use crate::train::device_step::DeviceStep;
use crate::train::model::TrainClip;
use crate::train::step::{Micro, StepEngine};
use crate::train::trainer::new_optimizer;
use std::collections::HashMap;

/// One timed unit of a dry run.
pub struct Phase {
    /// "image tower", "text tower", "train step".
    pub name: String,
    /// Items per unit (images, texts, samples) and their name.
    pub items: usize,
    pub per: &'static str,
    pub ops: Vec<Op>,
}

/// Every tensor of an HF CLIPModel with `cfg`'s shapes, all zeros (calloc'd: no pages touched).
pub fn zero_weights(cfg: &ClipConfig) -> Result<Weights> {
    let m: Result<HashMap<String, Tensor>> =
        Schema::clip(cfg).params().iter().map(|p| Ok((p.name.clone(), Tensor::from_vec(vec![0f32; p.numel()], &p.shape)?))).collect();
    Ok(Weights::from_tensors(m?, "<dry run: zeros>"))
}

/// `b` token sequences of exactly `len` tokens (start, ids, end).
pub fn token_ids(cfg: &ClipConfig, b: usize, len: usize) -> Vec<Vec<u32>> {
    (0..b)
        .map(|i| {
            let mut s = vec![cfg.text.bos_token_id];
            s.extend((0..len.saturating_sub(2)).map(|j| 256 + ((i * 131 + j * 7) % 49000) as u32));
            s.push(cfg.text.eos_token_id);
            s
        })
        .collect()
}

/// Inference: one batch of `batch` images and/or texts of `text_len` tokens through the device
/// towers in `dtype` (f32 or bf16), as `clipforge bench` times them.
/// `tf32`: f32 GEMMs in TF32 when `dtype` is f32 (as `OpenOptions::tf32` sets GpuOps).
pub fn infer(cfg: &ClipConfig, batch: usize, dtype: DType, text_len: usize, towers: Towers, tf32: bool) -> Result<(RecordingOps, Vec<Phase>)> {
    if batch == 0 {
        return Err(Error::msg("dry run: --batch must be at least 1"));
    }
    let mut rec = RecordingOps::new();
    rec.tf32 = tf32 && dtype == DType::F32;
    let parts = ClipParts::load(&zero_weights(cfg)?, cfg, towers, &LoadOptions { dtype: DType::F32 })?;
    let clip = CudaClip::with_dtype(Box::new(rec.clone()), &parts, dtype)?;
    rec.take(); // the weight uploads and half copies happen once, before any timed batch
    let mut phases = vec![];
    if towers != Towers::Text {
        let s = cfg.vision.image_size;
        clip.embed_images(&vec![0f32; batch * cfg.vision.channels * s * s], batch)?;
        phases.push(Phase { name: "image tower".into(), items: batch, per: "img/s", ops: rec.take() });
    }
    if towers != Towers::Vision {
        clip.embed_texts(&token_ids(cfg, batch, text_len))?;
        phases.push(Phase { name: format!("text tower ({text_len} tokens)"), items: batch, per: "texts/s", ops: rec.take() });
    }
    Ok((rec, phases))
}

/// One Long-CLIP fine-tuning step (forward, loss with the PCA, backward, AdamW) as
/// `clipforge bench --task train` runs it: `batch` images, long captions of `long` tokens, short
/// ones of min(16, long); `dtype` f32, or bf16/f16 forward GEMMs (f32 masters).
pub fn train(cfg: &ClipConfig, batch: usize, dtype: DType, long: usize, recompute: bool) -> Result<(RecordingOps, Phase)> {
    if batch < 2 {
        return Err(Error::msg("dry run --task train: --batch must be at least 2"));
    }
    let rec = RecordingOps::new();
    let mut model = TrainClip::from_weights(&zero_weights(cfg)?, cfg)?;
    model.recompute = recompute;
    let mut opt = new_optimizer(&model, AdamW { lr: 1e-6, ..AdamW::default() });
    let low = (dtype != DType::F32).then_some(dtype);
    let mut eng = DeviceStep::new(Box::new(rec.clone()), &model, &opt, 32, recompute, low)?;
    let s = cfg.vision.image_size;
    let data = Batch {
        pixels: Tensor::from_vec(vec![0f32; batch * 3 * s * s], &[batch, 3, s, s])?,
        long_ids: token_ids(cfg, batch, long),
        short_ids: token_ids(cfg, batch, 16.min(long)),
        samples: (0..batch).collect(),
    };
    rec.take();
    eng.micro_batch(&model, &Micro { batch: &data, smart_ids: None, last: true }, 1.0)?;
    opt.begin_step();
    eng.apply(&mut model, &mut opt, &[1e-6])?;
    let name = format!("train step ({long} + {} tokens{})", 16.min(long), if recompute { ", recompute" } else { "" });
    Ok((rec.clone(), Phase { name, items: batch, per: "samples/s", ops: rec.take() }))
}
