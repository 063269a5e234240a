//! Data parallel on paper: the training step of one GPU (a [`Report`] of the recorded step) scaled
//! to P ranks on the interconnect of [`Gpu::link`] (src/perf/gpus.rs), as
//! `bench --task train --dry-run --nproc-per-node N --nodes K` prints it (KERNELS.md "Many GPUs").
//!
//! - Costs (NCCL ring, Simple protocol): all-reduce of S bytes over P ranks
//!   = 2(P−1)/P · S / busbw + latency, all-gather of S_total bytes = (P−1)/P · S_total / busbw +
//!   latency; latency = NCCL's 8.4 µs per call + α per ring step (2(P−1) steps for an
//!   all-reduce, P−1 for an all-gather), of which the 2(n−1) (resp. n−1) steps that cross between
//!   n nodes cost the network's α (NCCL's tuning model; a multi-node all-reduce's latency × 1.9).
//! - busbw ([`ring_busbw`]): one node: the fabric's (NVLink / PCIe) ring bus bandwidth. Across
//!   nodes NCCL runs one ring per rail: each ring leaves a node through one NIC, and a node's g
//!   ranks share its g·(NICs per node ÷ GPUs per node) NICs, so the ring runs at
//!   min(fabric busbw, NICs used × NIC busbw) — rail-aligned flat rings, not a hierarchical scheme.
//! - The step ([`split`]): the recorded step cut into forward (up to the towers' embedding
//!   downloads), each tower's backward (from the upload of its embeddings' gradient; the tape runs
//!   the text tower's first) and AdamW (from the first `adamw` launch), each the sum of its
//!   operations' predicted times — measured from the recording, no assumed fraction.
//! - Buckets ([`bucket_times`]): the towers' parameters in the order the backward finishes them
//!   (each tower's in reverse schema order: projection, final LayerNorm, last block … first block,
//!   embeddings), cut by [`BucketPlan`] (25 MiB of f32 gradients); a parameter's gradient is final
//!   after its tower's backward has run the cumulative share of its tower's parameters up to it.
//! - P ranks ([`predict`]): the three embeddings ([b, D] image, long and short text, f32) are
//!   all-gathered after the forward and their gradients reduce-scattered before the towers'
//!   backward, exposed; the buckets are all-reduced in order on one channel, each starting when
//!   ready and when the previous one is done; what ends after the backward is exposed; AdamW
//!   runs on every rank as on one. The loss head runs on the host: each rank's rows against the
//!   global batch (≈ 24·b·B·D FLOPs, against 12·b²·D on one GPU), at [`HOST_FLOPS_PER_RANK`]; the
//!   difference is exposed. Step = one-GPU step + gathers and reduce-scatters + the host loss's
//!   growth + exposed all-reduce. Not modelled: NCCL's kernels competing with the backward for
//!   SMs and DRAM.
use super::gpus::{k, Gpu, Interconnect};
use super::report::Report;
use super::roofline::Pred;
use crate::dist::buckets::{BucketPlan, DEFAULT_CAP};
use crate::error::{Error, Result};
use crate::model::config::ClipConfig;
use crate::model::schema::{Schema, Tower};

/// Where the ranks sit: `nodes` servers with `per_node` ranks (GPUs) each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub nodes: usize,
    pub per_node: usize,
}

impl Layout {
    pub fn ranks(&self) -> usize {
        self.nodes * self.per_node
    }
}

/// The link that limits a ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bound {
    /// One rank: no communication.
    None,
    /// The fabric inside the node (NVLink, PCIe).
    Intra,
    /// The NICs between nodes.
    Network,
}

impl Bound {
    /// "-", the fabric's short name ("NVLink", "PCIe") or "network".
    pub fn label(self, link: &Interconnect) -> &'static str {
        match self {
            Bound::None => "-",
            Bound::Intra => link.intra_short,
            Bound::Network => "network",
        }
    }
}

/// The ring's bus bandwidth over `l` (bytes/s) and the link that limits it (module docs).
pub fn ring_busbw(link: &Interconnect, l: Layout) -> (f64, Bound) {
    if l.ranks() <= 1 {
        return (f64::INFINITY, Bound::None);
    }
    if l.nodes <= 1 {
        return (link.intra_busbw, Bound::Intra);
    }
    let nics = (l.per_node * link.nics_per_node as usize / (link.gpus_per_node as usize).max(1)).max(1);
    let net = nics as f64 * link.nic_busbw;
    if l.per_node > 1 && link.intra_busbw <= net {
        (link.intra_busbw, Bound::Intra)
    } else {
        (net, Bound::Network)
    }
}

/// NCCL's ring latency: the per-call base plus `steps` steps, `inter` of them across nodes.
fn ring_latency(link: &Interconnect, steps: usize, inter: usize) -> f64 {
    k::NCCL_BASE_S + steps.saturating_sub(inter) as f64 * link.intra_step_s + inter as f64 * link.net_step_s
}

/// Seconds of a ring all-reduce of `bytes` over `l` (0 for one rank).
pub fn all_reduce(link: &Interconnect, bytes: f64, l: Layout) -> f64 {
    let p = l.ranks();
    if p <= 1 {
        return 0.0;
    }
    let (bw, _) = ring_busbw(link, l);
    let mut lat = ring_latency(link, 2 * (p - 1), 2 * (l.nodes - 1));
    if l.nodes > 1 && bytes >= p as f64 / 16.0 * 65536.0 {
        lat *= k::NCCL_RING_PLATEAU;
    }
    2.0 * (p - 1) as f64 / p as f64 * bytes / bw + lat
}

/// Seconds of a ring all-gather whose result holds `total_bytes` (every rank's part) over `l`.
pub fn all_gather(link: &Interconnect, total_bytes: f64, l: Layout) -> f64 {
    let p = l.ranks();
    if p <= 1 {
        return 0.0;
    }
    let (bw, _) = ring_busbw(link, l);
    (p - 1) as f64 / p as f64 * total_bytes / bw + ring_latency(link, p - 1, l.nodes - 1)
}

/// The one-GPU training step cut into its parts (seconds, from the predicted operations).
#[derive(Clone, Debug, PartialEq)]
pub struct StepSplit {
    /// Both towers' forward, up to and including the embeddings' downloads.
    pub forward: f64,
    /// The towers' backward passes in the order they run.
    pub backward: Vec<(Tower, f64)>,
    /// From the first AdamW launch to the end of the step.
    pub optimizer: f64,
    /// The whole step (the report's).
    pub step: f64,
}

impl StepSplit {
    pub fn backward_total(&self) -> f64 {
        self.backward.iter().map(|b| b.1).sum()
    }
}

const DOWN: &str = "copy device→host";
const UP: &str = "copy host→device";

/// Cuts the predicted step (`preds` in recorded order, as [`Report::preds`]) into forward, the
/// towers' backward passes and AdamW. The device step (src/train/device_step.rs) downloads the
/// image embeddings, then the text tower's (long and short captions, one pass); the tape's
/// backward uploads their gradients in reverse order, each starting that tower's backward; AdamW
/// follows. An error when the recording does not have that shape.
pub fn split(preds: &[Pred]) -> Result<StepSplit> {
    let bad = |why: &str| Error::msg(format!("dry run: the recorded train step cannot be split into forward and backward: {why}"));
    let opt = preds.iter().position(|p| p.name.starts_with("adamw")).ok_or_else(|| bad("no adamw launch"))?;
    let downs: Vec<usize> = (0..opt).filter(|&i| preds[i].name == DOWN).collect();
    let [img, txt] = downs[..] else {
        return Err(bad(&format!("{} embedding downloads before AdamW, expected 2 (image, text)", downs.len())));
    };
    let start = txt + 1;
    if preds.get(start).is_none_or(|p| p.name != UP || p.bytes != preds[txt].bytes) {
        return Err(bad("the backward does not start with the upload of the text embeddings' gradient"));
    }
    let vis = (start + 1..opt)
        .find(|&i| preds[i].name == UP && preds[i].bytes == preds[img].bytes)
        .ok_or_else(|| bad("no upload of the image embeddings' gradient"))?;
    let sum = |r: std::ops::Range<usize>| preds[r].iter().map(|p| p.time).sum::<f64>();
    Ok(StepSplit {
        forward: sum(0..start),
        backward: vec![(Tower::Text, sum(start..vis)), (Tower::Vision, sum(vis..opt))],
        optimizer: sum(opt..preds.len()),
        step: sum(0..preds.len()),
    })
}

/// One gradient bucket: its bytes and when its last gradient is final (seconds after the
/// backward starts).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BucketTiming {
    pub bytes: f64,
    pub ready: f64,
}

/// The buckets of `cfg`'s tower parameters (f32 gradients, `cap` elements at most each) with the
/// times the backward of `split` finishes them (module docs).
pub fn bucket_times(cfg: &ClipConfig, split: &StepSplit, cap: usize) -> Vec<BucketTiming> {
    let schema = Schema::clip(cfg);
    let params = schema.params();
    let mut order: Vec<(usize, usize)> = vec![]; // (schema index, elements), in finishing order
    let mut done = vec![0f64; params.len()];
    let mut at = 0.0;
    for &(tower, dur) in &split.backward {
        let ids: Vec<usize> = schema.tower(tower).into_iter().rev().collect();
        let total: usize = ids.iter().map(|&i| params[i].numel()).sum();
        let mut cum = 0;
        for &i in &ids {
            cum += params[i].numel();
            done[i] = at + dur * cum as f64 / total.max(1) as f64;
            order.push((i, params[i].numel()));
        }
        at += dur;
    }
    let plan = BucketPlan::new(&order, cap);
    plan.buckets
        .iter()
        .map(|b| BucketTiming {
            bytes: 4.0 * b.iter().map(|&i| params[i].numel()).sum::<usize>() as f64,
            ready: b.iter().map(|&i| done[i]).fold(0.0, f64::max),
        })
        .collect()
}

/// The buckets all-reduced in order on one channel during a backward of `backward` seconds, each
/// taking `cost(bytes)`: (seconds that end after the backward, total all-reduce seconds).
pub fn overlap(buckets: &[BucketTiming], backward: f64, cost: impl Fn(f64) -> f64) -> (f64, f64) {
    let (mut free, mut total) = (0.0f64, 0.0);
    for b in buckets {
        let t = cost(b.bytes);
        free = free.max(b.ready) + t;
        total += t;
    }
    ((free - backward).max(0.0), total)
}

/// The host's f32 GEMM rate one rank's loss head gets (an assumption, conservative: about 6 of
/// the 96–112 cores of a dual-socket 8-GPU server per rank at ~50 GFLOP/s each; clipforge's
/// AVX-512 GEMM measures 100–150 GFLOP/s per core at these shapes on a quiet Xeon).
pub const HOST_FLOPS_PER_RANK: f64 = 300e9;

/// FLOPs of the Long-CLIP loss head on one rank: `b` own rows against a global batch of `p·b`
/// (two InfoNCE terms, each two [b, B] logit products forward and four backward); one rank uses
/// one [B, B] product per term for both directions.
pub fn host_loss_flops(b: usize, p: usize, dim: usize) -> f64 {
    let (b, d) = (b as f64, dim as f64);
    if p <= 1 {
        12.0 * b * b * d
    } else {
        24.0 * b * (p as f64 * b) * d
    }
}

/// The prediction for one layout.
#[derive(Clone, Debug, PartialEq)]
pub struct RankRow {
    pub layout: Layout,
    /// Seconds per step on every rank.
    pub step: f64,
    /// Global samples per second (per-rank batch × ranks ÷ step).
    pub per_s: f64,
    /// per_s ÷ (ranks × one GPU's samples/s).
    pub efficiency: f64,
    /// The gathers and reduce-scatters, the host loss's growth, and the all-reduce that ends
    /// after the backward.
    pub exposed: f64,
    pub all_reduce: f64,
    pub all_gather: f64,
    pub bound: Bound,
    /// FLOPs of the loss head on the host per rank ([`host_loss_flops`]).
    pub host_loss_flops: f64,
    /// Seconds the host loss takes beyond the one-GPU step's (in `step` and `exposed`).
    pub host_loss: f64,
}

/// The step on `l` for a one-GPU step `split` at per-rank `batch`, embeddings of `dim`.
pub fn predict(link: &Interconnect, split: &StepSplit, buckets: &[BucketTiming], batch: usize, dim: usize, l: Layout) -> RankRow {
    let p = l.ranks();
    let global = (p * batch) as f64;
    let host_loss_flops = host_loss_flops(batch, p, dim);
    if p <= 1 {
        let per_s = batch as f64 / split.step;
        return RankRow {
            layout: l,
            step: split.step,
            per_s,
            efficiency: 1.0,
            exposed: 0.0,
            all_reduce: 0.0,
            all_gather: 0.0,
            bound: Bound::None,
            host_loss_flops,
            host_loss: 0.0,
        };
    }
    // image, long, short: [P·b, D] f32 each, gathered; their gradients reduce-scattered (the same ring cost)
    let all_gather = 2.0 * 3.0 * all_gather(link, 4.0 * global * dim as f64, l);
    let host_loss = (host_loss_flops - self::host_loss_flops(batch, 1, dim)) / HOST_FLOPS_PER_RANK;
    let (late, all_reduce) = overlap(buckets, split.backward_total(), |s| all_reduce(link, s, l));
    let step = split.step + all_gather + host_loss + late;
    RankRow {
        layout: l,
        step,
        per_s: global / step,
        efficiency: split.step / step,
        exposed: all_gather + host_loss + late,
        all_reduce,
        all_gather,
        bound: ring_busbw(link, l).1,
        host_loss_flops,
        host_loss,
    }
}

/// The layouts of the table: 1, 2, 4, … ranks up to `per_node` in one node, then 2 … `nodes`
/// nodes of `per_node`.
pub fn layouts(per_node: usize, nodes: usize) -> Vec<Layout> {
    let mut v = vec![Layout { nodes: 1, per_node: 1 }];
    let mut g = 2;
    while g < per_node {
        v.push(Layout { nodes: 1, per_node: g });
        g *= 2;
    }
    if per_node > 1 {
        v.push(Layout { nodes: 1, per_node });
    }
    v.extend((2..=nodes).map(|n| Layout { nodes: n, per_node }));
    v
}

/// `per_node` ranks on each of `nodes` servers of `gpu` is a layout the model knows.
pub fn check_layout(gpu: &Gpu, per_node: usize, nodes: usize) -> Result<()> {
    let most = gpu.link.gpus_per_node as usize;
    if per_node == 0 || per_node > most {
        return Err(Error::msg(format!("--nproc-per-node {per_node}: expected 1 to {most} (the GPUs of one {} server)", gpu.name)));
    }
    if nodes == 0 || nodes > 4096 {
        return Err(Error::msg(format!("--nodes {nodes}: expected 1 to 4096")));
    }
    Ok(())
}

/// The scaling table of one recorded train step.
pub struct Scaling {
    pub gpu: &'static Gpu,
    pub batch: usize,
    pub dim: usize,
    pub split: StepSplit,
    pub buckets: Vec<BucketTiming>,
    pub rows: Vec<RankRow>,
}

impl Scaling {
    /// `report`: the one-GPU train step of `cfg` (per-rank batch = its items); `per_node` ranks
    /// on each of `nodes` servers of `gpu`.
    pub fn new(gpu: &'static Gpu, report: &Report, cfg: &ClipConfig, per_node: usize, nodes: usize) -> Result<Scaling> {
        check_layout(gpu, per_node, nodes)?;
        let split = split(&report.preds)?;
        if (split.step - report.step).abs() > 1e-9 * report.step {
            return Err(Error::msg(format!("dry run: the split step {} s is not the report's {} s", split.step, report.step)));
        }
        let buckets = bucket_times(cfg, &split, DEFAULT_CAP);
        let (batch, dim) = (report.items, cfg.projection_dim);
        let rows = layouts(per_node, nodes).into_iter().map(|l| predict(&gpu.link, &split, &buckets, batch, dim, l)).collect();
        Ok(Scaling { gpu, batch, dim, split, buckets, rows })
    }

    /// The row of `ranks` ranks.
    pub fn row(&self, ranks: usize) -> Option<&RankRow> {
        self.rows.iter().find(|r| r.layout.ranks() == ranks)
    }

    /// Bytes of f32 gradients all-reduced per step.
    pub fn grad_bytes(&self) -> f64 {
        self.buckets.iter().map(|b| b.bytes).sum()
    }
}

#[cfg(test)]
#[path = "collective_tests.rs"]
mod tests;
