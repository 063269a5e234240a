//! Long-CLIP fine-tuning with the towers on a CUDA device ([`DeviceOps`]: a GPU, or the CPU
//! emulator in tests). Per micro-batch:
//!   1. vision tower forward (pixels → [B, D]), text tower forward for the long and the short
//!      captions (src/cuda/train_{vision,text,block}.rs), activations kept on the device (or only
//!      each block's input with `recompute`);
//!   2. one download of the three [B, D] embeddings; the loss head (L2 norm, InfoNCE, PCA-k
//!      reconstruction: `longclip::longclip_head`, O(B²·D)) on the host tape, the same code as
//!      the CPU trainer; one upload of d(embeddings);
//!   3. the towers' backward on the device (a tower whose parameters are all frozen is skipped),
//!      gradients summed in device buffers; only the logit scale's gradient stays on the host.
//! Per optimizer step: the fused AdamW kernel (kernels/adamw.cu) on every device parameter (f32
//! masters and moments; frozen position rows skipped by offsetting the pointers), writing the
//! bf16 copies of the block Linear weights that the next forward reads when `bf16` is on.
//! tests/device_step.rs runs whole fine-tunes on the emulator against the CPU trainer.
use super::longclip::longclip_head;
use super::model::{TrainClip, BLOCK_PARAMS};
use super::optim::Optimizer;
use super::step::{host_update, HostGrads, Micro, MicroLoss, StepEngine};
use crate::autograd::Tape;
use crate::cuda::train_block::{DevBlock, LINEAR_WEIGHTS};
use crate::cuda::train_ops::{axpy, grid};
use crate::cuda::train_text::{self, DevText};
use crate::cuda::train_vision::{self, DevVision};
use crate::cuda::{Buf, DeviceOps, KernelArgs};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

fn dev<T>(r: std::result::Result<T, String>) -> Result<T> {
    r.map_err(Error::Device)
}

/// Parameters that live on the device (the two towers); the rest (logit scale) stay on the host.
pub fn on_device(name: &str) -> bool {
    ["vision_model.", "visual_projection.", "text_model.", "text_projection."].iter().any(|p| name.starts_with(p))
}

/// The vision parameter names in the order of [`flat_vision`].
fn vision_names(model: &TrainClip) -> Vec<String> {
    let e = "vision_model.embeddings";
    let mut n = vec![format!("{e}.patch_embedding.weight"), format!("{e}.class_embedding"), format!("{e}.position_embedding.weight")];
    n.extend(["vision_model.pre_layrnorm.weight".to_string(), "vision_model.pre_layrnorm.bias".to_string()]);
    n.extend(block_names("vision_model", model.config.vision.tower.layers));
    n.extend(["vision_model.post_layernorm.weight", "vision_model.post_layernorm.bias", "visual_projection.weight"].map(String::from));
    n
}

/// The text parameter names in the order of [`flat_text`] (the token embedding, whose gradient
/// the backward adds into its accumulator directly, is not among them).
fn text_names(model: &TrainClip) -> Vec<String> {
    let mut n = vec!["text_model.embeddings.position_embedding.weight".to_string()];
    n.extend(block_names("text_model", model.config.text.tower.layers));
    n.extend(["text_model.final_layer_norm.weight", "text_model.final_layer_norm.bias", "text_projection.weight"].map(String::from));
    n
}

fn block_names(prefix: &str, layers: usize) -> Vec<String> {
    (0..layers).flat_map(|l| BLOCK_PARAMS.iter().map(move |p| format!("{prefix}.encoder.layers.{l}.{p}"))).collect()
}

fn flat_vision(g: train_vision::VisionGrads) -> Vec<Buf> {
    let mut v = vec![g.patch_w, g.cls, g.pos, g.pre_g, g.pre_b];
    v.extend(g.blocks.into_iter().flatten());
    v.extend([g.post_g, g.post_b, g.proj]);
    v
}

fn flat_text(g: train_text::TextGrads) -> Vec<Buf> {
    let mut v = vec![g.pos];
    v.extend(g.blocks.into_iter().flatten());
    v.extend([g.final_g, g.final_b, g.proj]);
    v
}

/// Whether any parameter of the list is trained (else the tower's backward is skipped).
fn any_trainable(model: &TrainClip, names: &[String]) -> bool {
    names.iter().any(|n| model.index(n).is_some_and(|i| model.trainable[i]))
}

/// The device backend of the trainer (Long-CLIP).
pub struct DeviceStep {
    ops: Box<dyn DeviceOps>,
    pca_dim: usize,
    recompute: bool,
    /// f32 master values of the device parameters, by model parameter index.
    p: Vec<Option<Buf>>,
    /// bf16 copies of the block Linear weights (with `bf16`).
    half: Vec<Option<Buf>>,
    /// AdamW moments of the trainable device parameters.
    m: Vec<Option<Buf>>,
    v: Vec<Option<Buf>>,
    /// This step's gradients on the device.
    acc: Vec<Option<Buf>>,
    /// This step's host gradients (the logit scale).
    host: HostGrads,
}

impl DeviceStep {
    /// Uploads the model's tower parameters and the optimizer's moments (zero, or a resumed
    /// checkpoint's). `bf16`: forward GEMMs of the blocks read bf16 copies of their weights.
    pub fn new(ops: Box<dyn DeviceOps>, model: &TrainClip, opt: &Optimizer, pca_dim: usize, recompute: bool, bf16: bool) -> Result<DeviceStep> {
        let n = model.params.len();
        let none = || (0..n).map(|_| None).collect::<Vec<Option<Buf>>>();
        let (mut p, mut half, mut m, mut v) = (none(), none(), none(), none());
        for (i, (name, t)) in model.params.iter().enumerate() {
            if !on_device(name) {
                continue;
            }
            p[i] = Some(dev(ops.upload(&t.f32_data()))?);
            let linear = LINEAR_WEIGHTS.iter().any(|&j| name.ends_with(&format!(".{}", BLOCK_PARAMS[j])) && name.contains(".encoder.layers."));
            if bf16 && linear {
                let h: Vec<half::bf16> = t.f32_data().iter().map(|&x| half::bf16::from_f32(x)).collect();
                half[i] = Some(dev(ops.upload_bf16(&h))?);
            }
        }
        for st in &opt.params {
            let i = model.index(&st.name).ok_or_else(|| Error::msg(format!("optimizer parameter {} not in the model", st.name)))?;
            if p[i].is_some() {
                m[i] = Some(dev(ops.upload(&st.m))?);
                v[i] = Some(dev(ops.upload(&st.v))?);
            }
        }
        Ok(DeviceStep { ops, pca_dim, recompute, p, half, m, v, acc: none(), host: HostGrads::default() })
    }

    fn buf(&self, model: &TrainClip, name: &str) -> Result<&Buf> {
        model.index(name).and_then(|i| self.p[i].as_ref()).ok_or_else(|| Error::msg(format!("no device parameter {name}")))
    }

    fn blocks<'a>(&'a self, model: &'a TrainClip, prefix: &str, tower: &'a crate::model::config::TowerConfig) -> Result<Vec<DevBlock<'a>>> {
        (0..tower.layers)
            .map(|l| {
                let names: Vec<String> = BLOCK_PARAMS.iter().map(|p| format!("{prefix}.encoder.layers.{l}.{p}")).collect();
                let ps: Vec<&Buf> = names.iter().map(|n| self.buf(model, n)).collect::<Result<_>>()?;
                let half: Option<Vec<&Buf>> = LINEAR_WEIGHTS.iter().map(|&j| model.index(&names[j]).and_then(|i| self.half[i].as_ref())).collect();
                Ok(DevBlock { p: std::array::from_fn(|k| ps[k]), cfg: tower, half: half.map(|h| std::array::from_fn(|k| h[k])) })
            })
            .collect()
    }

    fn vision<'a>(&'a self, model: &'a TrainClip) -> Result<DevVision<'a>> {
        let vc = &model.config.vision;
        let e = "vision_model.embeddings";
        Ok(DevVision {
            cfg: vc,
            patch_w: self.buf(model, &format!("{e}.patch_embedding.weight"))?,
            cls: self.buf(model, &format!("{e}.class_embedding"))?,
            pos: self.buf(model, &format!("{e}.position_embedding.weight"))?,
            pre_g: self.buf(model, "vision_model.pre_layrnorm.weight")?,
            pre_b: self.buf(model, "vision_model.pre_layrnorm.bias")?,
            blocks: self.blocks(model, "vision_model", &vc.tower)?,
            post_g: self.buf(model, "vision_model.post_layernorm.weight")?,
            post_b: self.buf(model, "vision_model.post_layernorm.bias")?,
            proj: self.buf(model, "visual_projection.weight")?,
            d: model.config.projection_dim,
            recompute: self.recompute,
        })
    }

    fn text<'a>(&'a self, model: &'a TrainClip) -> Result<DevText<'a>> {
        let tc = &model.config.text;
        Ok(DevText {
            cfg: tc,
            tok: self.buf(model, "text_model.embeddings.token_embedding.weight")?,
            pos: self.buf(model, "text_model.embeddings.position_embedding.weight")?,
            blocks: self.blocks(model, "text_model", &tc.tower)?,
            final_g: self.buf(model, "text_model.final_layer_norm.weight")?,
            final_b: self.buf(model, "text_model.final_layer_norm.bias")?,
            proj: self.buf(model, "text_projection.weight")?,
            d: model.config.projection_dim,
            recompute: self.recompute,
        })
    }

    /// Adds device gradients (by parameter name) to this step's sums.
    fn add(&mut self, model: &TrainClip, names: &[String], grads: Vec<Buf>) -> Result<()> {
        for (name, g) in names.iter().zip(grads) {
            let i = model.index(name).ok_or_else(|| Error::msg(format!("no parameter {name}")))?;
            match &self.acc[i] {
                None => self.acc[i] = Some(g),
                Some(a) => dev(axpy(&*self.ops, a, &g, 1.0, g.len()))?,
            }
        }
        Ok(())
    }
}

impl StepEngine for DeviceStep {
    fn micro_batch(&mut self, model: &TrainClip, mb: &Micro, scale: f32) -> Result<MicroLoss> {
        if mb.smart_ids.is_some() {
            return Err(Error::msg("SmartCLIP fine-tuning runs on the CPU backend (--device cpu)"));
        }
        let batch = mb.batch;
        let (b, d) = (batch.long_ids.len(), model.config.projection_dim);
        let ls = model.index("logit_scale").ok_or_else(|| Error::msg("no parameter logit_scale"))?;
        let tok = model.index("text_model.embeddings.token_embedding.weight").ok_or_else(|| Error::msg("no token embedding"))?;
        let (vnames, mut tnames) = (vision_names(model), text_names(model));
        let train_v = any_trainable(model, &vnames);
        tnames.push(model.params[tok].0.clone());
        let train_t = any_trainable(model, &tnames);
        tnames.pop();
        if train_t && self.acc[tok].is_none() {
            self.acc[tok] = Some(dev(self.ops.alloc(model.params[tok].1.numel()))?); // the embedding backward adds into it
        }
        let (vg, tg, loss, dls) = {
            let ops = &*self.ops;
            let (vm, tm) = (self.vision(model)?, self.text(model)?);
            let (ei, si) = dev(train_vision::forward(ops, &vm, &batch.pixels.f32_data(), b))?; // [B, D]
            let (el, sl) = dev(train_text::forward(ops, &tm, &batch.long_ids))?; // [B, D]
            let (es, ss) = dev(train_text::forward(ops, &tm, &batch.short_ids))?; // [B, D]
            let host = |e: &Buf| -> Result<Tensor> { Tensor::from_vec(dev(ops.download(e))?, &[b, d]) };
            let tape = Tape::new();
            let (img, long, short) = (tape.param(host(&ei)?), tape.param(host(&el)?), tape.param(host(&es)?));
            let s = if model.trainable[ls] { tape.param(model.params[ls].1.clone()) } else { tape.constant(model.params[ls].1.clone()) };
            let (l, a, bb) = longclip_head(&tape, &img, &long, &short, &s, self.pca_dim)?;
            let loss = MicroLoss { loss: l.item(), a, b: bb };
            if !loss.loss.is_finite() {
                return Ok(loss);
            }
            let mut g = tape.backward(&tape.scale(&l, scale))?;
            let mut up = |v: &crate::autograd::Var| -> Result<Buf> {
                let t = g.take(v).ok_or_else(|| Error::msg("loss head: no gradient for an embedding"))?;
                dev(ops.upload(&t.f32_data()))
            };
            let (di, dl, ds) = (up(&img)?, up(&long)?, up(&short)?);
            let dls = g.take(&s).map(|t| t.to_vec_f32());
            let vg = if train_v { Some(dev(train_vision::backward(ops, &vm, &si, &di))?) } else { None };
            let tg = match &self.acc[tok] {
                Some(dtok) if train_t => vec![dev(train_text::backward(ops, &tm, &sl, &dl, dtok))?, dev(train_text::backward(ops, &tm, &ss, &ds, dtok))?],
                _ => vec![],
            };
            (vg, tg, loss, dls)
        };
        if let Some(g) = dls {
            self.host.add(ls, &g);
        }
        if let Some(vg) = vg {
            self.add(model, &vnames, flat_vision(vg))?;
        }
        for g in tg {
            self.add(model, &tnames, flat_text(g))?;
        }
        Ok(loss)
    }

    fn apply(&mut self, model: &mut TrainClip, opt: &mut Optimizer, lrs: &[f64]) -> Result<()> {
        let ops = &*self.ops;
        for k in 0..opt.params.len() {
            let st = &opt.params[k];
            let i = model.index(&st.name).ok_or_else(|| Error::msg(format!("optimizer parameter {} not in the model", st.name)))?;
            let Some(p) = &self.p[i] else {
                host_update(model, opt, k, lrs, self.host.take(i))?;
                continue;
            };
            let lr = *lrs.get(st.group).ok_or_else(|| Error::msg(format!("optimizer: no learning rate for group {}", st.group)))?;
            let (n, f) = (st.m.len(), st.frozen);
            let g = match (self.acc[i].take(), self.host.take(i)) {
                (Some(dg), Some(hg)) => {
                    dev(axpy(ops, &dg, &dev(ops.upload(&hg))?, 1.0, n))?;
                    dg
                }
                (Some(dg), None) => dg,
                (None, Some(hg)) => dev(ops.upload(&hg))?,
                (None, None) => dev(ops.alloc(n))?,
            };
            if n == f {
                continue;
            }
            let (m, v) = (self.m[i].as_ref(), self.v[i].as_ref());
            let (m, v) = m.zip(v).ok_or_else(|| Error::msg(format!("no device moments for {}", st.name)))?;
            let half = self.half[i].as_ref().map(|h| h.ptr()).unwrap_or(0);
            if half != 0 && f > 0 {
                return Err(Error::msg(format!("{}: frozen rows in a bf16-mirrored weight", st.name)));
            }
            let off = 4 * f as u64; // skip the frozen leading elements of p, g, m, v
            let hp = opt.hp;
            let mut a = KernelArgs::new().ptr(p.ptr() + off).ptr(g.ptr() + off).ptr(m.ptr() + off).ptr(v.ptr() + off).ptr(half).ptr(0);
            a = a.i64((n - f) as i64).f64(lr).f64(hp.beta1).f64(hp.beta2).f64(hp.eps).f64(hp.weight_decay).i32(opt.step as i32);
            dev(ops.launch("adamw_f32", grid(n - f), &mut a))?;
        }
        self.acc.iter_mut().for_each(|a| *a = None);
        self.host = HostGrads::default();
        Ok(())
    }

    fn sync(&mut self, model: &mut TrainClip, opt: &mut Optimizer) -> Result<()> {
        for (i, p) in self.p.iter().enumerate() {
            if let Some(p) = p {
                let shape = model.params[i].1.shape().to_vec();
                model.params[i].1 = Tensor::from_vec(dev(self.ops.download(p))?, &shape)?;
            }
        }
        for st in opt.params.iter_mut() {
            if let Some(i) = model.index(&st.name) {
                if let (Some(m), Some(v)) = (&self.m[i], &self.v[i]) {
                    st.m = dev(self.ops.download(m))?;
                    st.v = dev(self.ops.download(v))?;
                }
            }
        }
        Ok(())
    }

    fn describe(&self) -> String {
        self.ops.describe()
    }
}
