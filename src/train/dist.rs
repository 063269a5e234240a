//! The data-parallel pieces of a training step (src/dist/ has the transports):
//! - [`gather_rows`]: a rank's embeddings [b, D] → the global batch's [world·b, D] on the tape;
//!   its backward sums every rank's gradient for this rank's rows (a reduce-scatter), so each
//!   rank's loss takes its own rows as anchors against the whole batch ([`my_rows`]), and
//!   [`global_terms`] averages the ranks' losses into the global batch's;
//! - [`reduce_host`]: host gradients summed over ranks in buckets (the CPU backend, and the
//!   device backend's host parameter, the logit scale);
//! - [`DeviceSync`]: the device gradients of one tower summed over ranks bucket by bucket, each
//!   bucket launched from the tower's backward as soon as its blocks are done (overlapped with
//!   the rest of the backward on NCCL), the rest at the end of the tower.
//!
//! Each rank back-propagates its loss divided by the number of ranks, so the sum over ranks of
//! every gradient (the logit scale's included) is the global loss's.
use super::step::HostGrads;
use crate::autograd::{Tape, Var};
use crate::backend::device::Device;
use crate::cuda::Buf;
use crate::dist::buckets::{BucketPlan, BucketState, DEFAULT_CAP};
use crate::dist::Collective;
use crate::error::{Error, Result};
use crate::model::tower_backward::Grads;
use crate::tensor::Tensor;
use std::cell::RefCell;
use std::ops::Range;
use std::rc::Rc;

/// `local` [b, D] → [world·b, D]: every rank's rows in rank order (an all-gather), as a tape node
/// whose backward hands `local` the sum over ranks of the gradients of its rows (a
/// reduce-scatter). One rank: `local` itself.
pub fn gather_rows(tape: &Tape, comm: &Rc<dyn Collective>, local: &Var) -> Result<Var> {
    let world = comm.world();
    if world == 1 {
        return Ok(local.clone());
    }
    let shape = local.shape().to_vec();
    let (b, d) = match shape[..] {
        [b, d] => (b, d),
        _ => return Err(crate::shape_err!("gather_rows: expected [b, D] embeddings, got {shape:?}")),
    };
    let all = comm.all_gather(&local.value().f32_data())?;
    let value = Tensor::from_vec(all, &[world * b, d])?; // [world·b, D]
    let comm = comm.clone();
    Ok(tape.custom(&[local], value, move |g| Ok(vec![Some(Tensor::from_vec(comm.reduce_scatter(&g.f32_data())?, &[b, d])?)])))
}

/// The rows of the global micro-batch that this rank's `b` samples are.
pub fn my_rows(comm: &dyn Collective, b: usize) -> Range<usize> {
    comm.rank() * b..(comm.rank() + 1) * b
}

/// The global micro-batch's loss terms from this rank's (each a mean over its rows): their mean
/// over ranks, the same on every rank.
pub fn global_terms(comm: &dyn Collective, terms: [f32; 3]) -> Result<[f32; 3]> {
    let mut t = terms;
    if comm.world() > 1 {
        comm.all_reduce_sum(&mut t)?;
        t.iter_mut().for_each(|x| *x /= comm.world() as f32);
    }
    Ok(t)
}

/// Sums the host gradients of parameters `ids` (in backward order) over ranks, in buckets of
/// [`DEFAULT_CAP`] elements; a missing gradient counts as zeros of `numel(id)` elements.
pub fn reduce_host(comm: &dyn Collective, grads: &mut HostGrads, ids: &[usize], numel: &dyn Fn(usize) -> usize) -> Result<()> {
    if comm.world() == 1 {
        return Ok(());
    }
    let order: Vec<(usize, usize)> = ids.iter().map(|&i| (i, numel(i))).collect();
    for bucket in BucketPlan::new(&order, DEFAULT_CAP).buckets {
        let mut flat = Vec::new();
        for &i in &bucket {
            match grads.0.get(i).and_then(|g| g.as_ref()) {
                Some(g) => flat.extend_from_slice(g),
                None => flat.resize(flat.len() + numel(i), 0.0),
            }
        }
        comm.all_reduce_sum(&mut flat)?;
        let mut at = 0;
        for &i in &bucket {
            let n = numel(i);
            grads.set(i, flat[at..at + n].to_vec());
            at += n;
        }
    }
    Ok(())
}

/// The bucketed all-reduce of one tower's device gradients (tower-local parameter indices).
pub struct DeviceSync {
    comm: Rc<dyn Collective>,
    plan: BucketPlan,
    state: RefCell<BucketState>,
    /// Element count per tower-local parameter.
    numel: Vec<usize>,
    /// Buckets are launched from the backward only on the step's last micro-batch.
    armed: RefCell<bool>,
}

impl DeviceSync {
    /// `blocks`: the tower-local parameter indices of each block, block 0 first; `rest`: the
    /// tower's other trainable parameters (head, embeddings, norms), final at the tower's end.
    pub fn new(comm: Rc<dyn Collective>, blocks: &[Vec<usize>], rest: &[usize], numel: Vec<usize>) -> DeviceSync {
        let mut order: Vec<(usize, usize)> = blocks.iter().rev().flatten().map(|&i| (i, numel[i])).collect();
        order.extend(rest.iter().map(|&i| (i, numel[i])));
        let plan = BucketPlan::new(&order, DEFAULT_CAP);
        let state = RefCell::new(plan.start());
        DeviceSync { comm, plan, state, numel, armed: RefCell::new(false) }
    }

    /// Whether this micro-batch's backward launches the buckets (the step's last one).
    pub fn arm(&self, last: bool) {
        *self.armed.borrow_mut() = last && self.comm.world() > 1;
    }

    /// Tower-local parameters `ids` are final in `g`: launches every bucket that is now complete.
    pub fn ready(&self, dev: &Device, g: &mut Grads<Device>, ids: &[usize]) -> Result<()> {
        if !*self.armed.borrow() {
            return Ok(());
        }
        let launch: Vec<usize> = {
            let mut st = self.state.borrow_mut();
            ids.iter().flat_map(|&i| st.ready(&self.plan, i)).collect()
        };
        launch.into_iter().try_for_each(|k| self.launch(dev, g, k))
    }

    /// The end of the step: every bucket not launched yet (all of them when no backward launched
    /// any), then a fresh state for the next step.
    pub fn finish(&self, dev: &Device, g: &mut Grads<Device>) -> Result<()> {
        if self.comm.world() > 1 {
            let rest = self.state.borrow_mut().rest();
            rest.into_iter().try_for_each(|k| self.launch(dev, g, k))?;
            self.comm.device_fence()?; // the optimizer reads the sums
        }
        *self.state.borrow_mut() = self.plan.start();
        *self.armed.borrow_mut() = false;
        Ok(())
    }

    fn launch(&self, dev: &Device, g: &mut Grads<Device>, k: usize) -> Result<()> {
        let ids = &self.plan.buckets[k];
        for &i in ids {
            if g[i].is_none() {
                g[i] = Some(dev.raw().alloc(self.numel[i])?); // no gradient this step: zeros
            }
        }
        let mut bufs: Vec<&mut Buf> = g.iter_mut().enumerate().filter(|(i, _)| ids.contains(i)).filter_map(|(_, b)| b.as_mut()).collect();
        if bufs.len() != ids.len() {
            return Err(Error::msg("gradient bucket: a parameter has no gradient buffer"));
        }
        self.comm.all_reduce_device(dev.raw(), &mut bufs)
    }
}
