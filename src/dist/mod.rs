//! Data-parallel fine-tuning across ranks (one process per GPU; or per CPU node):
//! - [`Collective`]: the collective operations the trainer needs, every result in rank order so a
//!   run is bitwise reproducible; [`Single`]: world size 1, no communication;
//! - `launch`: where this process stands (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
//!   `MASTER_PORT` as torchrun sets them, or srun's / mpirun's own variables) and
//!   `--nproc-per-node` (one child process per GPU on this machine, a failure stops them all);
//! - `tcp`: the rendezvous on MASTER_ADDR:MASTER_PORT and a host collective over TCP (CPU ranks,
//!   and the control channel that carries NCCL's unique id and a rank's failure);
//! - `nccl`: NCCL communicators through cudarc, the library loaded at run time;
//! - `buckets`: gradient buckets all-reduced as the backward pass finishes them.
//!
//! The math the trainer does with these (src/train/), the official code's: each rank takes its
//! shard of every global micro-batch; the towers' embeddings of all ranks are all-gathered; each
//! rank's loss takes its own rows as the anchors against the whole global batch (the mean of
//! the ranks' losses is the global batch's loss); the gather's backward is a reduce-scatter, so
//! each rank's embeddings get every rank's gradient; the parameter gradients are summed over
//! ranks — the gradient of the one-rank run over the global batch.
use crate::cuda::{Buf, DeviceOps};
use crate::error::Result;

pub mod buckets;
pub mod launch;
pub mod nccl;
pub mod tcp;

/// The collective operations of data-parallel training. Every rank calls the same operations in
/// the same order; a rank that fails calls [`Collective::abort`] and every other rank's pending or
/// later call fails with an error naming it.
pub trait Collective: Send {
    /// This rank, 0..world.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn world(&self) -> usize;
    /// Every rank's `local` (the same length on every rank) concatenated in rank order.
    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>>;
    /// `data` replaced by its element-wise sum over ranks, added in rank order (0 + 1 + 2 …) so
    /// every rank holds the same bits.
    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<()>;
    /// `data` `[world × c]` (the same length on every rank) → the sum over ranks of chunk `rank`
    /// `[c]`, added in rank order (the backward of [`Collective::all_gather`]). The default sums
    /// everything and keeps this rank's chunk.
    fn reduce_scatter(&self, data: &[f32]) -> Result<Vec<f32>> {
        let mut all = data.to_vec();
        self.all_reduce_sum(&mut all)?;
        let c = data.len() / self.world().max(1);
        Ok(all[self.rank() * c..(self.rank() + 1) * c].to_vec())
    }
    /// Each device buffer replaced by its sum over ranks (one bucket, one collective). The
    /// default goes through the host (emulator and host transports); NCCL sums on the device.
    fn all_reduce_device(&self, ops: &dyn DeviceOps, bufs: &mut [&mut Buf]) -> Result<()> {
        let mut flat = Vec::new();
        for b in bufs.iter() {
            flat.extend(ops.download(b)?);
        }
        self.all_reduce_sum(&mut flat)?;
        let mut at = 0;
        for b in bufs.iter_mut() {
            let n = b.len();
            **b = ops.upload(&flat[at..at + n])?;
            at += n;
        }
        Ok(())
    }
    /// Orders the device's later work after every [`Collective::all_reduce_device`] issued so far
    /// (they may run beside the backward pass); called before the optimizer reads the gradients.
    fn device_fence(&self) -> Result<()> {
        Ok(())
    }
    /// Returns when every rank has called it.
    fn barrier(&self) -> Result<()>;
    /// This rank failed with `why`: tells the other ranks, whose pending and later calls fail.
    fn abort(&self, why: &str);
    /// e.g. "nccl", "tcp", "threads" (logged at start).
    fn describe(&self) -> String;
}

/// After a rank's run ended with `r`: a failure is passed to the other ranks (they stop too); an
/// agreed stop (`Interrupted`, every rank after the same step) is not a failure.
pub fn spread_failure<T>(comm: &dyn Collective, r: &Result<T>) {
    match r {
        Err(crate::error::Error::Interrupted(_)) => {}
        Err(e) if comm.world() > 1 => comm.abort(&e.to_string()),
        _ => {}
    }
}

/// One rank: nothing to communicate.
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>> {
        Ok(local.to_vec())
    }
    fn all_reduce_sum(&self, _data: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn reduce_scatter(&self, data: &[f32]) -> Result<Vec<f32>> {
        Ok(data.to_vec())
    }
    fn all_reduce_device(&self, _ops: &dyn DeviceOps, _bufs: &mut [&mut Buf]) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn abort(&self, _why: &str) {}
    fn describe(&self) -> String {
        "one rank".into()
    }
}
