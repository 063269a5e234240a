//! Long-CLIP fine-tuning with the towers on a CUDA device ([`DeviceOps`]: a GPU, or the CPU
//! emulator in tests), driven by the autograd tape. Per micro-batch:
//!   1. vision tower forward (pixels → [B, D]), text tower forward for the long and the short
//!      captions (src/cuda/train_{vision,text,block}.rs), activations kept on the device (or only
//!      each block's input with `recompute`). Each tower pass is one node on the tape
//!      ([`Tape::custom`]) whose input is a one-element "anchor" leaf standing for that tower's
//!      device parameters: a trainable tower's anchor is a parameter, a frozen one's a constant,
//!      so a frozen tower records nothing and its backward never runs;
//!   2. the node's value is the [B, D] embeddings downloaded to the host (one download each),
//!      and the loss head (L2 norm, InfoNCE, PCA-k reconstruction: `longclip::longclip_head`,
//!      O(B²·D), the same code as the CPU trainer) records on the same tape;
//!   3. `tape.backward` walks the head, then each tower node, whose backward uploads its
//!      d(embeddings) and runs the tower's backward on the device, adding the parameter gradients
//!      into device accumulators (the token table's by the `embedding_bwd_rows_f32` scatter).
//! Per optimizer step: the fused AdamW kernel (kernels/adamw.cu) on every device parameter (f32
//! masters and moments; frozen position rows skipped by offsetting the pointers), writing the
//! bf16 or f16 copies of the block Linear weights that the next forward reads when `low` is set; the
//! logit scale (the one host parameter) gets the CPU AdamW.
//! tests/device_step.rs runs whole fine-tunes on the emulator against the CPU trainer and the
//! PyTorch reference.
use super::longclip::longclip_head;
use super::model::{TrainClip, BLOCK_PARAMS};
use super::optim::Optimizer;
use super::step::{host_update, param_index, HostGrads, Micro, MicroLoss, StepEngine};
use crate::autograd::{Tape, Var};
use crate::cuda::train_block::{DevBlock, LINEAR_WEIGHTS};
use crate::cuda::train_ops::{axpy, grid};
use crate::cuda::train_text::{self, DevText};
use crate::cuda::train_vision::{self, DevVision};
use crate::cuda::{Buf, DeviceOps, KernelArgs};
use crate::error::{Error, Result};
use crate::model::config::{ClipConfig, TowerConfig};
use crate::tensor::{DType, Tensor};
use std::cell::RefCell;
use std::rc::Rc;

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

/// The device state the tape's backward closures share with the step.
struct Shared {
    ops: Box<dyn DeviceOps>,
    config: ClipConfig,
    recompute: bool,
    /// f32 master values of the device parameters, by model parameter index.
    p: Vec<Option<Buf>>,
    /// Half-precision copies of the block Linear weights (with `low`).
    half: Vec<Option<Buf>>,
    low: Option<DType>,
    /// This step's gradients on the device.
    acc: RefCell<Vec<Option<Buf>>>,
    /// Model parameter indices in the orders of [`vision_names`] and [`text_names`], and the
    /// token table's.
    vision: Vec<usize>,
    text: Vec<usize>,
    tok: usize,
}

impl Shared {
    fn buf(&self, i: usize) -> Result<&Buf> {
        self.p[i].as_ref().ok_or_else(|| Error::msg(format!("parameter {i} is not on the device")))
    }

    /// The 16 parameters of a block from their indices (and the bf16 copies of its Linear weights).
    fn block<'a>(&'a self, tower: &'a TowerConfig, ix: &[usize]) -> Result<DevBlock<'a>> {
        let ps: Vec<&Buf> = ix.iter().map(|&i| self.buf(i)).collect::<Result<_>>()?;
        let half: Option<Vec<&Buf>> = LINEAR_WEIGHTS.iter().map(|&j| self.half[ix[j]].as_ref()).collect();
        let half = self.low.zip(half).map(|(d, h)| (d, std::array::from_fn(|k| h[k])));
        Ok(DevBlock { p: std::array::from_fn(|k| ps[k]), cfg: tower, half })
    }

    fn vision_model(&self) -> Result<DevVision<'_>> {
        let (vc, ix) = (&self.config.vision, &self.vision);
        let l = vc.tower.layers;
        Ok(DevVision {
            cfg: vc,
            patch_w: self.buf(ix[0])?,
            cls: self.buf(ix[1])?,
            pos: self.buf(ix[2])?,
            pre_g: self.buf(ix[3])?,
            pre_b: self.buf(ix[4])?,
            blocks: (0..l).map(|j| self.block(&vc.tower, &ix[5 + 16 * j..5 + 16 * (j + 1)])).collect::<Result<_>>()?,
            post_g: self.buf(ix[5 + 16 * l])?,
            post_b: self.buf(ix[6 + 16 * l])?,
            proj: self.buf(ix[7 + 16 * l])?,
            d: self.config.projection_dim,
            recompute: self.recompute,
        })
    }

    fn text_model(&self) -> Result<DevText<'_>> {
        let (tc, ix) = (&self.config.text, &self.text);
        let l = tc.tower.layers;
        Ok(DevText {
            cfg: tc,
            tok: self.buf(self.tok)?,
            pos: self.buf(ix[0])?,
            blocks: (0..l).map(|j| self.block(&tc.tower, &ix[1 + 16 * j..1 + 16 * (j + 1)])).collect::<Result<_>>()?,
            final_g: self.buf(ix[1 + 16 * l])?,
            final_b: self.buf(ix[2 + 16 * l])?,
            proj: self.buf(ix[3 + 16 * l])?,
            d: self.config.projection_dim,
            recompute: self.recompute,
        })
    }

    /// Adds device gradients (by parameter index) to this step's sums.
    fn add(&self, ix: &[usize], grads: Vec<Buf>) -> Result<()> {
        let mut acc = self.acc.borrow_mut();
        for (&i, g) in ix.iter().zip(grads) {
            match &acc[i] {
                None => acc[i] = Some(g),
                Some(a) => axpy(&*self.ops, a, &g, 1.0, g.len())?,
            }
        }
        Ok(())
    }

    /// d(embeddings) on the host → uploaded, as the tower backward's input.
    fn upload(&self, g: &Tensor) -> Result<Buf> {
        self.ops.upload(&g.f32_data())
    }
}

/// The device backend of the trainer (Long-CLIP).
pub struct DeviceStep {
    sh: Rc<Shared>,
    pca_dim: usize,
    /// AdamW moments of the trainable device parameters.
    m: Vec<Option<Buf>>,
    v: Vec<Option<Buf>>,
    /// This step's host gradients (the logit scale).
    host: HostGrads,
    /// Whether each tower has a trainable parameter (else its anchor is a constant).
    train_vision: bool,
    train_text: bool,
}

fn indices(model: &TrainClip, names: &[String]) -> Result<Vec<usize>> {
    names.iter().map(|n| model.index(n).ok_or_else(|| Error::msg(format!("no parameter {n}")))).collect()
}

impl DeviceStep {
    /// Uploads the model's tower parameters and the optimizer's moments (zero, or a resumed
    /// checkpoint's). `low` (bf16 or f16): the blocks' forward GEMMs read copies of their weights
    /// in that type.
    pub fn new(ops: Box<dyn DeviceOps>, model: &TrainClip, opt: &Optimizer, pca_dim: usize, recompute: bool, low: Option<DType>) -> Result<DeviceStep> {
        if low == Some(DType::F32) {
            return Err(Error::msg("device trainer: the low-precision weight copies must be bf16 or f16, not f32"));
        }
        let n = model.params.len();
        let none = || (0..n).map(|_| None).collect::<Vec<Option<Buf>>>();
        let (mut p, mut half, mut m, mut v) = (none(), none(), none(), none());
        for (i, (name, t)) in model.params.iter().enumerate() {
            if !on_device(name) {
                continue;
            }
            p[i] = Some(ops.upload(&t.f32_data())?);
            let linear = LINEAR_WEIGHTS.iter().any(|&j| name.ends_with(&format!(".{}", BLOCK_PARAMS[j])) && name.contains(".encoder.layers."));
            let data = t.f32_data();
            match low.filter(|_| linear) {
                Some(DType::BF16) => half[i] = Some(ops.upload_bf16(&data.iter().map(|&x| half::bf16::from_f32(x)).collect::<Vec<_>>())?),
                Some(DType::F16) => half[i] = Some(ops.upload_f16(&data.iter().map(|&x| half::f16::from_f32(x)).collect::<Vec<_>>())?),
                Some(DType::F32) | None => {}
            }
        }
        for st in &opt.params {
            let i = model.index(&st.name).ok_or_else(|| Error::msg(format!("optimizer parameter {} not in the model", st.name)))?;
            if p[i].is_some() {
                m[i] = Some(ops.upload(&st.m)?);
                v[i] = Some(ops.upload(&st.v)?);
            }
        }
        let (vision, text) = (indices(model, &vision_names(model))?, indices(model, &text_names(model))?);
        let tok = indices(model, &["text_model.embeddings.token_embedding.weight".to_string()])?[0];
        let trained = |ix: &[usize]| ix.iter().any(|&i| model.trainable[i]);
        let (train_vision, train_text) = (trained(&vision), trained(&text) || model.trainable[tok]);
        let sh = Shared { ops, config: model.config.clone(), recompute, p, half, low, acc: RefCell::new(none()), vision, text, tok };
        Ok(DeviceStep { sh: Rc::new(sh), pca_dim, m, v, host: HostGrads::default(), train_vision, train_text })
    }

    /// The anchor leaf of a tower: a parameter when the tower trains, else a constant.
    fn anchor(tape: &Tape, trains: bool) -> Var {
        if trains {
            tape.param(Tensor::scalar(0.0))
        } else {
            tape.constant(Tensor::scalar(0.0))
        }
    }

    /// The vision tower's forward on the device as one tape node: [B, D] embeddings.
    fn vision_node(&self, tape: &Tape, anchor: &Var, pixels: &Tensor) -> Result<Var> {
        let sh = self.sh.clone();
        let b = pixels.dim(0);
        let (e, saved) = train_vision::forward(&*sh.ops, &sh.vision_model()?, &pixels.f32_data(), b)?; // [B, D]
        let value = Tensor::from_vec(sh.ops.download(&e)?, &[b, sh.config.projection_dim])?;
        Ok(tape.custom(&[anchor], value, move |g| {
            let vg = train_vision::backward(&*sh.ops, &sh.vision_model()?, &saved, &sh.upload(g)?)?;
            sh.add(&sh.vision, flat_vision(vg))?;
            Ok(vec![None])
        }))
    }

    /// The text tower's forward on the device as one tape node: [B, D] embeddings.
    fn text_node(&self, tape: &Tape, anchor: &Var, ids: &[Vec<u32>]) -> Result<Var> {
        let sh = self.sh.clone();
        let (e, saved) = train_text::forward(&*sh.ops, &sh.text_model()?, ids)?; // [B, D]
        let value = Tensor::from_vec(sh.ops.download(&e)?, &[ids.len(), sh.config.projection_dim])?;
        {
            let mut acc = sh.acc.borrow_mut();
            if anchor.requires_grad() && acc[sh.tok].is_none() {
                acc[sh.tok] = Some(sh.ops.alloc(sh.config.text.vocab * sh.config.text.tower.hidden)?); // the scatter adds into it
            }
        }
        Ok(tape.custom(&[anchor], value, move |g| {
            let de = sh.upload(g)?;
            let tg = {
                let acc = sh.acc.borrow();
                let dtok = acc[sh.tok].as_ref().ok_or_else(|| Error::msg("no token-gradient accumulator"))?;
                train_text::backward(&*sh.ops, &sh.text_model()?, &saved, &de, dtok)?
            };
            sh.add(&sh.text, flat_text(tg))?;
            Ok(vec![None])
        }))
    }
}

impl StepEngine for DeviceStep {
    fn micro_batch(&mut self, model: &TrainClip, mb: &Micro, scale: f32) -> Result<MicroLoss> {
        if mb.smart_ids.is_some() {
            return Err(Error::msg("SmartCLIP fine-tuning runs on the CPU backend (--device cpu)"));
        }
        let batch = mb.batch;
        let ls = model.index("logit_scale").ok_or_else(|| Error::msg("no parameter logit_scale"))?;
        let tape = Tape::new();
        let (va, ta) = (Self::anchor(&tape, self.train_vision), Self::anchor(&tape, self.train_text));
        let img = self.vision_node(&tape, &va, &batch.pixels)?; // [B, D]
        let long = self.text_node(&tape, &ta, &batch.long_ids)?; // [B, D]
        let short = self.text_node(&tape, &ta, &batch.short_ids)?; // [B, D]
        let s = if model.trainable[ls] { tape.param(model.params[ls].1.clone()) } else { tape.constant(model.params[ls].1.clone()) };
        let (l, a, b) = longclip_head(&tape, &img, &long, &short, &s, self.pca_dim)?;
        let loss = MicroLoss { loss: l.item(), a, b };
        if !loss.loss.is_finite() || !l.requires_grad() {
            return Ok(loss); // (nothing trains: a forward only)
        }
        let g = tape.backward(&tape.scale(&l, scale))?; // the head on the host, then the towers on the device
        if let Some(t) = g.get(&s) {
            self.host.add(ls, &t.f32_data());
        }
        Ok(loss)
    }

    fn apply(&mut self, model: &mut TrainClip, opt: &mut Optimizer, lrs: &[f64]) -> Result<()> {
        let sh = &*self.sh;
        let ops = &*sh.ops;
        let mut acc = sh.acc.borrow_mut();
        for k in 0..opt.params.len() {
            let i = param_index(model, opt, k)?;
            let Some(p) = &sh.p[i] else {
                host_update(model, opt, i, k, lrs, self.host.take(i))?;
                continue;
            };
            let st = &opt.params[k];
            let lr = *lrs.get(st.group).ok_or_else(|| Error::msg(format!("optimizer: no learning rate for group {}", st.group)))?;
            let (n, f) = (st.m.len(), st.frozen);
            let g = match acc[i].take() {
                Some(dg) => dg,
                None => ops.alloc(n)?,
            };
            if n == f {
                continue;
            }
            let (m, v) = (self.m[i].as_ref(), self.v[i].as_ref());
            let (m, v) = m.zip(v).ok_or_else(|| Error::msg(format!("no device moments for {}", st.name)))?;
            let half = sh.half[i].as_ref().map(|h| h.ptr()).unwrap_or(0);
            if half != 0 && f > 0 {
                return Err(Error::msg(format!("{}: frozen rows in a weight with a half-precision copy", st.name)));
            }
            let (p_bf16, p_f16) = if sh.low == Some(DType::F16) { (0, half) } else { (half, 0) };
            let off = 4 * f as u64; // skip the frozen leading elements of p, g, m, v
            let hp = opt.hp;
            let mut a = KernelArgs::new().ptr(p.ptr() + off).ptr(g.ptr() + off).ptr(m.ptr() + off).ptr(v.ptr() + off).ptr(p_bf16).ptr(p_f16);
            a = a.i64((n - f) as i64).f64(lr).f64(hp.beta1).f64(hp.beta2).f64(hp.eps).f64(hp.weight_decay).i32(opt.step as i32);
            ops.launch("adamw_f32", grid(n - f), &mut a)?;
        }
        acc.iter_mut().for_each(|a| *a = None);
        self.host = HostGrads::default();
        Ok(())
    }

    fn sync(&mut self, model: &mut TrainClip, opt: &mut Optimizer) -> Result<()> {
        let sh = &*self.sh;
        for (i, p) in sh.p.iter().enumerate() {
            if let Some(p) = p {
                let shape = model.params[i].1.shape().to_vec();
                model.params[i].1 = Tensor::from_vec(sh.ops.download(p)?, &shape)?;
            }
        }
        for st in opt.params.iter_mut() {
            if let Some(i) = model.index(&st.name) {
                if let (Some(m), Some(v)) = (&self.m[i], &self.v[i]) {
                    st.m = sh.ops.download(m)?;
                    st.v = sh.ops.download(v)?;
                }
            }
        }
        Ok(())
    }

    fn describe(&self) -> String {
        self.sh.ops.describe()
    }
}
