//! Long-CLIP fine-tuning with the towers on a CUDA device ([`DeviceOps`]: a GPU, or the CPU
//! emulator in tests), driven by the autograd tape. Per micro-batch:
//!   1. vision tower forward (pixels → [B, D]), text tower forward for the long and the short
//!      captions — the one tower code of src/model/tower.rs on the device backend (long and
//!      short captions as one packed text pass, no padding), activations kept on the device
//!      (or only each block's input with `recompute`). Each tower pass is one node on the tape
//!      ([`Tape::custom`]) whose input is a one-element "anchor" leaf standing for that tower's
//!      device parameters: a trainable tower's anchor is a parameter, a frozen one's a constant,
//!      so a frozen tower records nothing and its backward never runs;
//!   2. the node's value is the [B, D] embeddings downloaded to the host (one download each),
//!      and the loss head (L2 norm, InfoNCE, PCA-k reconstruction: `longclip::longclip_head`,
//!      O(B²·D), the same code as the CPU trainer) records on the same tape;
//!   3. `tape.backward` walks the head, then each tower node, whose backward uploads its
//!      d(embeddings) and runs the tower's backward on the device, adding the parameter gradients
//!      into device accumulators (the token table's by the `embedding_bwd_rows_f32` scatter).
//!
//! Per optimizer step: the fused AdamW kernel (kernels/adamw.cu) on every device parameter (f32
//! masters and moments; frozen position rows skipped by offsetting the pointers), writing the
//! bf16 or f16 copies of the block Linear weights that the next forward reads when `low` is set; the
//! logit scale (the one host parameter) gets the CPU AdamW.
//!
//! Many ranks (src/train/dist.rs): the embeddings are all-gathered before the head, and each
//! tower's gradients are summed over ranks in buckets launched from the tower's backward as its
//! blocks finish (the step's last micro-batch), the rest when the step applies.
//! tests/device_step.rs runs whole fine-tunes on the emulator against the CPU trainer and the
//! PyTorch reference.
use super::dist::{gather_rows, global_terms, my_rows, reduce_host, DeviceSync};
use super::longclip::longclip_head;
use super::model::TrainClip;
use super::optim::Optimizer;
use super::step::{host_update, param_index, HostGrads, Micro, MicroLoss, StepEngine};
use crate::autograd::{Tape, Var};
use crate::backend::device::Device;
use crate::backend::Ops;
use crate::cuda::train_ops::grid;
use crate::cuda::{Buf, DeviceOps, KernelArgs};
use crate::dist::{Collective, Single};
use crate::error::{Error, Result};
use crate::model::block::Stored;
use crate::model::config::ClipConfig;
use crate::model::schema::{Schema, Tower};
use crate::model::tower::Mode;
use crate::model::tower::TowerParams;
use crate::model::tower_backward::Grads;
use crate::tensor::{DType, Tensor};
use std::cell::RefCell;
use std::rc::Rc;

/// Parameters that live on the device (the two towers); the rest (logit scale) stay on the host.
pub fn on_device(schema: &Schema, i: usize) -> bool {
    schema.params().get(i).is_some_and(|p| p.tower != Tower::Head)
}

/// The device state the tape's backward closures share with the step.
struct Shared {
    dev: Device,
    config: ClipConfig,
    recompute: bool,
    low: Option<DType>,
    vision: TowerParams<Device>,
    text: TowerParams<Device>,
    /// This step's gradients on the device, per tower (tower-local indices).
    acc_v: RefCell<Grads<Device>>,
    acc_t: RefCell<Grads<Device>>,
}

impl Shared {
    fn mode(&self) -> Mode {
        Mode::Train { recompute: self.recompute }
    }

    /// The tower holding schema parameter `i`, its local index, and the gradient list.
    fn locate(&self, i: usize) -> Option<(&TowerParams<Device>, usize, &RefCell<Grads<Device>>)> {
        [(&self.vision, &self.acc_v), (&self.text, &self.acc_t)]
            .into_iter()
            .find_map(|(t, acc)| i.checked_sub(t.first()).filter(|&l| l < t.len()).map(|l| (t, l, acc)))
    }
}

/// The device backend of the trainer (Long-CLIP).
pub struct DeviceStep {
    sh: Rc<Shared>,
    pca_dim: usize,
    /// AdamW moments of the trainable device parameters, by schema index.
    m: Vec<Option<Buf>>,
    v: Vec<Option<Buf>>,
    /// This step's host gradients (the logit scale).
    host: HostGrads,
    /// Whether each tower has a trainable parameter (else its anchor is a constant).
    train_vision: bool,
    train_text: bool,
    comm: Rc<dyn Collective>,
    pca_group: Option<usize>,
    /// Which model parameters train (schema order).
    trainable: Vec<bool>,
    /// The bucketed gradient sums of the vision and the text tower (many ranks only).
    sync: Option<(Rc<DeviceSync>, Rc<DeviceSync>)>,
}

impl DeviceStep {
    /// Uploads the model's tower parameters and the optimizer's moments (zero, or a resumed
    /// checkpoint's). `low` (bf16 or f16): the forward GEMMs read copies of the Linear weights
    /// in that type.
    pub fn new(ops: Box<dyn DeviceOps>, model: &TrainClip, opt: &Optimizer, pca_dim: usize, recompute: bool, low: Option<DType>) -> Result<DeviceStep> {
        if low == Some(DType::F32) {
            return Err(Error::msg("device trainer: the low-precision weight copies must be bf16 or f16, not f32"));
        }
        let dev = Device::new(ops);
        let schema = &model.schema;
        let value = |q: &crate::model::schema::Param| {
            model.index(&q.name).map(|i| model.params[i].1.clone()).ok_or_else(|| Error::msg(format!("no parameter {}", q.name)))
        };
        let dtype = low.unwrap_or(DType::F32);
        let vision = TowerParams::load_with(&dev, schema, Tower::Vision, dtype, value)?;
        let text = TowerParams::load_with(&dev, schema, Tower::Text, dtype, value)?;
        let n = model.params.len();
        let (mut m, mut v): (Vec<Option<Buf>>, Vec<Option<Buf>>) = ((0..n).map(|_| None).collect(), (0..n).map(|_| None).collect());
        for st in &opt.params {
            let i = model.index(&st.name).ok_or_else(|| Error::msg(format!("optimizer parameter {} not in the model", st.name)))?;
            if on_device(schema, i) {
                m[i] = Some(dev.upload(&st.m)?);
                v[i] = Some(dev.upload(&st.v)?);
            }
        }
        let trained = |t: Tower| schema.tower(t).iter().any(|&i| model.trainable[i]);
        let (train_vision, train_text) = (trained(Tower::Vision), trained(Tower::Text));
        let none = |t: &TowerParams<Device>| RefCell::new((0..t.len()).map(|_| None).collect());
        let (acc_v, acc_t) = (none(&vision), none(&text));
        let sh = Shared { dev, config: model.config.clone(), recompute, low, vision, text, acc_v, acc_t };
        let comm: Rc<dyn Collective> = Rc::new(Single);
        Ok(DeviceStep {
            sh: Rc::new(sh),
            pca_dim,
            m,
            v,
            host: HostGrads::default(),
            train_vision,
            train_text,
            comm,
            pca_group: None,
            trainable: model.trainable.clone(),
            sync: None,
        })
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
        let px = sh.dev.upload_input(&pixels.f32_data())?;
        let (e, saved) = sh.vision.vision(&sh.dev, &sh.config.vision, px, b, sh.mode(), &mut None)?; // [B, D]
        let mut saved = saved.ok_or_else(|| Error::msg("a training forward keeps its activations"))?;
        let value = Tensor::from_vec(sh.dev.download(&e)?, &[b, sh.config.projection_dim])?;
        let sync = self.sync.as_ref().map(|s| s.0.clone());
        if let Some(s) = sync.clone() {
            saved.on_block(Box::new(move |dev, g, ids| s.ready(dev, g, ids)));
        }
        Ok(tape.custom(&[anchor], value, move |g| {
            let de = sh.dev.upload(&g.f32_data())?;
            let mut acc = sh.acc_v.borrow_mut();
            sh.vision.vision_backward(&sh.dev, &sh.config.vision, &mut saved, &de, &mut acc)?;
            if let Some(s) = sync {
                s.ready(&sh.dev, &mut acc, &(0..sh.vision.len()).collect::<Vec<_>>())?;
                // the tower's rest
            }
            Ok(vec![None])
        }))
    }

    /// The text tower's forward on the device as one tape node: [B, D] embeddings.
    fn text_node(&self, tape: &Tape, anchor: &Var, ids: &[Vec<u32>]) -> Result<Var> {
        let sh = self.sh.clone();
        let (e, saved) = sh.text.text(&sh.dev, &sh.config.text, ids, None, sh.mode(), &mut None)?; // [B, D]
        let mut saved = saved.ok_or_else(|| Error::msg("a training forward keeps its activations"))?;
        let value = Tensor::from_vec(sh.dev.download(&e)?, &[ids.len(), sh.config.projection_dim])?;
        let sync = self.sync.as_ref().map(|s| s.1.clone());
        if let Some(s) = sync.clone() {
            saved.on_block(Box::new(move |dev, g, ids| s.ready(dev, g, ids)));
        }
        Ok(tape.custom(&[anchor], value, move |g| {
            let de = sh.dev.upload(&g.f32_data())?;
            let mut acc = sh.acc_t.borrow_mut();
            sh.text.text_backward(&sh.dev, &sh.config.text, &mut saved, &de, &mut acc)?;
            if let Some(s) = sync {
                s.ready(&sh.dev, &mut acc, &(0..sh.text.len()).collect::<Vec<_>>())?;
                // the tower's rest
            }
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
        if let Some((sv, st)) = &self.sync {
            sv.arm(mb.last);
            st.arm(mb.last);
        }
        let (va, ta) = (Self::anchor(&tape, self.train_vision), Self::anchor(&tape, self.train_text));
        let img = self.vision_node(&tape, &va, &batch.pixels)?; // [B, D]
                                                                // long and short captions as one packed text pass
        let nb = batch.long_ids.len();
        let ids: Vec<Vec<u32>> = batch.long_ids.iter().chain(&batch.short_ids).cloned().collect();
        let both = self.text_node(&tape, &ta, &ids)?; // [2B, D]
        let (long, short) = (tape.narrow(&both, 0, 0, nb)?, tape.narrow(&both, 0, nb, nb)?); // [b, D] each
        let c = &self.comm;
        let (img, long, short) = (gather_rows(&tape, c, &img)?, gather_rows(&tape, c, &long)?, gather_rows(&tape, c, &short)?); // [B, D] each
        let s = if model.trainable[ls] { tape.param(model.params[ls].1.clone()) } else { tape.constant(model.params[ls].1.clone()) };
        let (l, a, b) = longclip_head(&tape, &img, &long, &short, &s, self.pca_dim, self.pca_group.unwrap_or(nb), my_rows(&**c, nb))?;
        let [loss, a, b] = global_terms(&**c, [l.item(), a, b])?; // the global micro-batch's (this rank's: its share)
        let loss = MicroLoss { loss, a, b };
        if !loss.loss.is_finite() || !l.requires_grad() {
            return Ok(loss); // (nothing trains: a forward only)
        }
        // the head on the host, then the towers on the device; each rank's share over the ranks
        let g = tape.backward(&tape.scale(&l, scale / c.world() as f32))?;
        if let Some(t) = g.get(&s) {
            self.host.add(ls, &t.f32_data());
        }
        Ok(loss)
    }

    fn apply(&mut self, model: &mut TrainClip, opt: &mut Optimizer, lrs: &[f64]) -> Result<()> {
        let sh = &*self.sh;
        let ops = sh.dev.raw();
        if let Some((sv, st)) = &self.sync {
            sv.finish(&sh.dev, &mut sh.acc_v.borrow_mut())?;
            st.finish(&sh.dev, &mut sh.acc_t.borrow_mut())?;
        }
        let host: Vec<usize> = (0..opt.params.len()).map(|k| param_index(model, opt, k)).collect::<Result<Vec<_>>>()?;
        let host: Vec<usize> = host.into_iter().filter(|&i| sh.locate(i).is_none()).collect();
        reduce_host(&*self.comm, &mut self.host, &host, &|i| model.params[i].1.numel())?;
        for k in 0..opt.params.len() {
            let i = param_index(model, opt, k)?;
            let Some((tower, l, acc)) = sh.locate(i) else {
                host_update(model, opt, i, k, lrs, self.host.take(i))?;
                continue;
            };
            let st = &opt.params[k];
            let lr = *lrs.get(st.group).ok_or_else(|| Error::msg(format!("optimizer: no learning rate for group {}", st.group)))?;
            let (n, f) = (st.m.len(), st.frozen);
            let g = match acc.borrow_mut()[l].take() {
                Some(dg) => dg,
                None => ops.alloc(n)?,
            };
            if n == f {
                continue;
            }
            let (m, v) = (self.m[i].as_ref(), self.v[i].as_ref());
            let (m, v) = m.zip(v).ok_or_else(|| Error::msg(format!("no device moments for {}", st.name)))?;
            let (p, half) = match tower.stored(l) {
                Stored::Buf(b) => (b, 0),
                Stored::Linear(w) => (&w.w, w.half.as_ref().map_or(0, |(_, h)| h.ptr())),
            };
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
        sh.acc_v.borrow_mut().iter_mut().chain(sh.acc_t.borrow_mut().iter_mut()).for_each(|a| *a = None);
        self.host = HostGrads::default();
        Ok(())
    }

    fn sync(&mut self, model: &mut TrainClip, opt: &mut Optimizer) -> Result<()> {
        let sh = &*self.sh;
        for i in 0..model.schema.len() {
            if let Some((tower, l, _)) = sh.locate(i) {
                let shape = model.params[i].1.shape().to_vec();
                model.params[i].1 = Tensor::from_vec(sh.dev.download(tower.stored(l).buf())?, &shape)?;
            }
        }
        for st in opt.params.iter_mut() {
            if let Some(i) = model.index(&st.name) {
                if let (Some(m), Some(v)) = (&self.m[i], &self.v[i]) {
                    st.m = sh.dev.download(m)?;
                    st.v = sh.dev.download(v)?;
                }
            }
        }
        Ok(())
    }

    fn describe(&self) -> String {
        self.sh.dev.describe()
    }

    fn set_dist(&mut self, comm: Rc<dyn Collective>, pca_group: Option<usize>) {
        let sh = &*self.sh;
        let trainable = &self.trainable;
        let tower_sync = |t: &TowerParams<Device>, layers: usize| -> Rc<DeviceSync> {
            let tr = |l: usize| trainable.get(t.first() + l).copied().unwrap_or(false);
            let blocks: Vec<Vec<usize>> = (0..layers)
                .map(|l| t.block_index(l).map(|f| (f..f + crate::model::schema::BLOCK_PARAMS.len()).filter(|&i| tr(i)).collect()).unwrap_or_default())
                .collect();
            let in_block: std::collections::HashSet<usize> = blocks.iter().flatten().copied().collect();
            let rest: Vec<usize> = (0..t.len()).filter(|&i| tr(i) && !in_block.contains(&i)).collect();
            Rc::new(DeviceSync::new(comm.clone(), &blocks, &rest, (0..t.len()).map(|i| t.numel(i)).collect()))
        };
        self.sync = (comm.world() > 1).then(|| (tower_sync(&sh.vision, sh.config.vision.tower.layers), tower_sync(&sh.text, sh.config.text.tower.layers)));
        self.comm = comm;
        self.pca_group = pca_group;
    }
}
