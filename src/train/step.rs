//! One optimizer step's work behind one interface, so the loop in [`super::trainer`] (schedule,
//! logging, checkpoints, resume) is the same for every backend:
//! - [`CpuStep`]: the whole model on the autograd tape (Long-CLIP and SmartCLIP);
//! - [`super::device_step::DeviceStep`]: the towers on a CUDA device (or its emulator), the loss
//!   head on the host tape, AdamW on the device.
use super::data::Batch;
use super::dist::{global_terms, reduce_host};
use super::longclip::longclip_loss;
use super::model::TrainClip;
use super::optim::Optimizer;
use super::smartclip::smartclip_loss;
use crate::autograd::{Tape, Var};
use crate::dist::{Collective, Single};
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use std::rc::Rc;

/// One micro-batch and, for SmartCLIP, the captions sampled for it.
pub struct Micro<'a> {
    pub batch: &'a Batch,
    pub smart_ids: Option<&'a [Vec<u32>]>,
    /// The optimizer step's last micro-batch: its backward may start summing gradients over ranks.
    pub last: bool,
}

/// The loss of one micro-batch and its two logged terms (Long-CLIP: L_long, L_short; SmartCLIP:
/// the alignment loss and the mean mask L1 norm).
#[derive(Clone, Copy, Debug)]
pub struct MicroLoss {
    pub loss: f32,
    pub a: f32,
    pub b: f32,
}

/// What a backend does inside an optimizer step.
pub trait StepEngine {
    /// Forward and backward of one micro-batch; its gradients times `scale` are added to the
    /// step's. A non-finite loss is returned as is, with nothing accumulated.
    fn micro_batch(&mut self, model: &TrainClip, mb: &Micro, scale: f32) -> Result<MicroLoss>;
    /// AdamW on every parameter the optimizer holds, with the accumulated gradients (zero where
    /// there are none) at `lrs[group]`; then the accumulators are cleared. `opt.begin_step()` has
    /// been called.
    fn apply(&mut self, model: &mut TrainClip, opt: &mut Optimizer, lrs: &[f64]) -> Result<()>;
    /// Makes `model.params` and the optimizer's moments current (before a checkpoint or the end).
    fn sync(&mut self, model: &mut TrainClip, opt: &mut Optimizer) -> Result<()>;
    /// "cpu", or the device's description.
    fn describe(&self) -> String;
    /// Data parallel: the ranks' collective ([`crate::dist::Single`] until set), and the rows per
    /// PCA group of Long-CLIP's short-caption target (None: each rank's micro-batch).
    fn set_dist(&mut self, comm: Rc<dyn Collective>, pca_group: Option<usize>);
}

/// Gradients summed over micro-batches, per model parameter (host side).
#[derive(Default)]
pub struct HostGrads(pub Vec<Option<Vec<f32>>>);

impl HostGrads {
    pub fn add(&mut self, i: usize, g: &[f32]) {
        if self.0.len() <= i {
            self.0.resize(i + 1, None);
        }
        match &mut self.0[i] {
            None => self.0[i] = Some(g.to_vec()),
            Some(a) => a.iter_mut().zip(g).for_each(|(x, y)| *x += y),
        }
    }
    /// [`HostGrads::add`] of a gradient tensor, kept without a copy when it is the first.
    pub fn add_tensor(&mut self, i: usize, g: Tensor) {
        if self.0.get(i).is_some_and(|a| a.is_some()) {
            self.add(i, &g.f32_data());
            return;
        }
        if self.0.len() <= i {
            self.0.resize(i + 1, None);
        }
        self.0[i] = Some(g.into_f32_vec());
    }
    pub fn set(&mut self, i: usize, g: Vec<f32>) {
        if self.0.len() <= i {
            self.0.resize(i + 1, None);
        }
        self.0[i] = Some(g);
    }
    pub fn take(&mut self, i: usize) -> Option<Vec<f32>> {
        self.0.get_mut(i).and_then(|g| g.take())
    }
}

/// The model index of optimizer parameter `k`.
pub fn param_index(model: &TrainClip, opt: &Optimizer, k: usize) -> Result<usize> {
    let name = &opt.params[k].name;
    model.index(name).ok_or_else(|| Error::msg(format!("optimizer parameter {name} not in the model")))
}

/// AdamW on the host for optimizer parameter `k`, model parameter `i` (value replaced in
/// `model.params`); no gradient counts as zero.
pub fn host_update(model: &mut TrainClip, opt: &mut Optimizer, i: usize, k: usize, lrs: &[f64], g: Option<Vec<f32>>) -> Result<()> {
    let g = g.unwrap_or_else(|| vec![0.0; opt.params[k].m.len()]);
    let shape = model.params[i].1.shape().to_vec();
    // updated in place when the model holds the only reference (the step's tape is gone)
    let mut v = std::mem::replace(&mut model.params[i].1, Tensor::scalar(0.0)).into_f32_vec();
    let r = opt.update(k, lrs, &mut v, &g);
    model.params[i].1 = Tensor::from_vec(v, &shape)?;
    r?;
    Ok(())
}

/// The CPU backend: the whole model on one tape per micro-batch.
pub struct CpuStep {
    pub smart: bool,
    pub pca_dim: usize,
    pub lambda_align: f32,
    pub lambda_sparsity: f32,
    grads: HostGrads,
    comm: Rc<dyn Collective>,
    pca_group: Option<usize>,
}

impl CpuStep {
    pub fn new(smart: bool, pca_dim: usize, lambda_align: f32, lambda_sparsity: f32) -> CpuStep {
        CpuStep { smart, pca_dim, lambda_align, lambda_sparsity, grads: HostGrads::default(), comm: Rc::new(Single), pca_group: None }
    }
}

impl StepEngine for CpuStep {
    fn micro_batch(&mut self, model: &TrainClip, mb: &Micro, scale: f32) -> Result<MicroLoss> {
        let tape = Tape::new();
        let sv = model.vars(&tape);
        let (l, a, b) = match (self.smart, mb.smart_ids) {
            (true, Some(ids)) => {
                let mp: Vec<Var> = (0..model.params.len()).filter(|&i| model.params[i].0.starts_with("mask_net.")).map(|i| sv.vars[i].clone()).collect();
                smartclip_loss(&tape, model, &sv, &mp, &mb.batch.pixels, ids, self.lambda_align, self.lambda_sparsity, &self.comm)?
            }
            (true, None) => return Err(Error::msg("SmartCLIP step without sampled captions")),
            (false, _) => longclip_loss(&tape, model, &sv, mb.batch, self.pca_dim, &self.comm, self.pca_group)?,
        };
        let [loss, a, b] = global_terms(&*self.comm, [l.item(), a, b])?; // the global micro-batch's (this rank's: its share)
        let loss = MicroLoss { loss, a, b };
        if !loss.loss.is_finite() {
            return Ok(loss);
        }
        // each rank's share over the ranks: summed over ranks, the global loss's gradients
        let mut grads = tape.backward(&tape.scale(&l, scale / self.comm.world() as f32))?;
        for (i, v) in sv.vars.iter().enumerate() {
            if let Some(g) = grads.take(v) {
                self.grads.add_tensor(i, g);
            }
        }
        Ok(loss)
    }

    fn apply(&mut self, model: &mut TrainClip, opt: &mut Optimizer, lrs: &[f64]) -> Result<()> {
        // the sum over ranks, last parameters (the first the backward finishes) first
        let ids = (0..opt.params.len()).rev().map(|k| param_index(model, opt, k)).collect::<Result<Vec<_>>>()?;
        let numel = |i: usize| model.params[i].1.numel();
        reduce_host(&*self.comm, &mut self.grads, &ids, &numel)?;
        for k in 0..opt.params.len() {
            let i = param_index(model, opt, k)?;
            let g = self.grads.take(i);
            host_update(model, opt, i, k, lrs, g)?;
        }
        self.grads = HostGrads::default();
        Ok(())
    }

    fn sync(&mut self, _model: &mut TrainClip, _opt: &mut Optimizer) -> Result<()> {
        Ok(())
    }

    fn describe(&self) -> String {
        "cpu".into()
    }

    fn set_dist(&mut self, comm: Rc<dyn Collective>, pca_group: Option<usize>) {
        self.comm = comm;
        self.pca_group = pca_group;
    }
}
