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
mod tests {
    use super::*;
    use crate::perf::cost::{Class, Unit};
    use crate::perf::gpus::gpu;

    fn h100() -> &'static Interconnect {
        &gpu("h100").unwrap().link
    }

    #[test]
    fn all_reduce_by_hand() {
        let one = Layout { nodes: 1, per_node: 8 };
        let s = 25.0 * 1024.0 * 1024.0;
        // 2·7/8 · 26 214 400 B / 330 GB/s = 139.016 µs; 8.4 + 14 × 3.4 = 56.0 µs
        let want = 2.0 * 7.0 / 8.0 * 26_214_400.0 / 330e9 + 56.0e-6;
        assert!((all_reduce(h100(), s, one) - want).abs() < 1e-12, "{}", all_reduce(h100(), s, one));
        assert!((all_reduce(h100(), s, one) - 195.016e-6).abs() < 0.001e-6);
        // 2 nodes × 8: the ring through 8 NICs of 40 GB/s = 320 < 330: network-bound;
        // latency (8.4 + 28 × 3.4 + 2 × 9.6) × 1.9 = 233.32 µs; 2·15/16 · S / 320 GB/s = 153.6 µs
        let two = Layout { nodes: 2, per_node: 8 };
        assert_eq!(ring_busbw(h100(), two), (320e9, Bound::Network));
        let want = 2.0 * 15.0 / 16.0 * 26_214_400.0 / 320e9 + (8.4 + 28.0 * 3.4 + 2.0 * 9.6) * 1.9e-6;
        assert!((all_reduce(h100(), s, two) - want).abs() < 1e-12);
        assert_eq!(all_reduce(h100(), s, Layout { nodes: 1, per_node: 1 }), 0.0);
        // one rank per node: only the NIC (and only network steps)
        let nics = Layout { nodes: 4, per_node: 1 };
        assert_eq!(ring_busbw(h100(), nics), (40e9, Bound::Network));
        let want = 2.0 * 3.0 / 4.0 * s / 40e9 + (8.4 + 6.0 * 9.6) * 1.9e-6;
        assert!((all_reduce(h100(), s, nics) - want).abs() < 1e-12);
    }

    #[test]
    fn all_gather_by_hand() {
        // 8 ranks × [128, 768] f32 = 3 145 728 B: 7/8 of it at 330 GB/s + 8.4 + 7 × 3.4 µs
        let l = Layout { nodes: 1, per_node: 8 };
        let total = 8.0 * 128.0 * 768.0 * 4.0;
        let want = 7.0 / 8.0 * total / 330e9 + (8.4 + 7.0 * 3.4) * 1e-6;
        assert!((all_gather(h100(), total, l) - want).abs() < 1e-12);
        // 3 nodes × 4: 4 NICs × 40 = 160 GB/s; 11 steps, 2 across nodes
        let l = Layout { nodes: 3, per_node: 4 };
        let want = 11.0 / 12.0 * total / 160e9 + (8.4 + 9.0 * 3.4 + 2.0 * 9.6) * 1e-6;
        assert!((all_gather(h100(), total, l) - want).abs() < 1e-12);
    }

    #[test]
    fn more_ranks_cost_more() {
        let s = 1e8;
        let mut last = 0.0;
        for l in layouts(8, 4) {
            let t = all_reduce(h100(), s, l);
            assert!(t >= last, "{l:?}: {t} < {last}");
            last = t;
        }
        // PCIe-only L40S (one NIC per two GPUs): PCIe limits the ring unless one rank per node
        let l40s = &gpu("l40s").unwrap().link;
        assert_eq!(ring_busbw(l40s, Layout { nodes: 2, per_node: 8 }), (16e9, Bound::Intra));
        assert_eq!(ring_busbw(l40s, Layout { nodes: 2, per_node: 2 }), (16e9, Bound::Intra));
        assert_eq!(ring_busbw(l40s, Layout { nodes: 2, per_node: 1 }), (20e9, Bound::Network));
    }

    #[test]
    fn overlap_hides_what_ends_before_the_backward() {
        let b = |bytes: f64, ready: f64| BucketTiming { bytes, ready };
        let cost = |s: f64| s * 1e-3; // 1 ms per byte
                                      // ready at 1, 2, 10 with 1 ms each, backward 10 ms: the last ends at 11 → 1 ms exposed
        assert!((overlap(&[b(1.0, 1e-3), b(1.0, 2e-3), b(1.0, 10e-3)], 10e-3, cost).0 - 1e-3).abs() < 1e-15);
        // a queue: three 4 ms buckets ready at 0, 0, 1 ms end at 12 ms
        let (late, total) = overlap(&[b(4.0, 0.0), b(4.0, 0.0), b(4.0, 1e-3)], 10e-3, cost);
        assert!((late - 2e-3).abs() < 1e-15 && (total - 12e-3).abs() < 1e-15);
        assert_eq!(overlap(&[b(1.0, 0.0)], 10e-3, cost).0, 0.0);
    }

    fn pred(name: &str, time: f64, bytes: f64) -> Pred {
        Pred {
            name: name.into(),
            time,
            roof: time,
            flops: 0.0,
            bytes,
            unit: Unit::CudaCore,
            class: Class::Transfer,
            waves: 1.0,
            blocks: 1,
            blocks_per_sm: 1,
            could_fill: false,
            default_regs: false,
            regs: 0,
        }
    }

    #[test]
    fn split_finds_forward_backward_and_adamw() {
        let ops = [
            pred(UP, 1.0, 99.0),
            pred("gemm", 2.0, 0.0),
            pred(DOWN, 0.5, 10.0), // image embeddings
            pred("gemm", 3.0, 0.0),
            pred(DOWN, 0.5, 20.0), // text embeddings
            pred(UP, 0.25, 20.0),  // text backward
            pred(UP, 0.25, 12.0),  // an upload of another size inside it
            pred("gemm", 4.0, 0.0),
            pred(UP, 0.5, 10.0), // vision backward
            pred("gemm", 5.0, 0.0),
            pred("adamw_f32", 1.0, 0.0),
            pred("adamw_f32", 1.0, 0.0),
        ];
        let s = split(&ops).unwrap();
        assert_eq!((s.forward, s.optimizer, s.step), (7.0, 2.0, 19.0));
        // the first upload of the image embeddings' size after the text's start is the vision tower's
        assert_eq!(s.backward, vec![(Tower::Text, 4.5), (Tower::Vision, 5.5)]);
        assert!(split(&ops[..10]).is_err(), "no adamw");
        let mut no_grad = ops.to_vec();
        no_grad[5].bytes = 7.0;
        assert!(split(&no_grad).is_err());
    }

    #[test]
    fn buckets_follow_the_backward() {
        let cfg = ClipConfig::preset("b32").unwrap();
        let s = StepSplit { forward: 1.0, backward: vec![(Tower::Text, 1.0), (Tower::Vision, 3.0)], optimizer: 0.1, step: 5.1 };
        let b = bucket_times(&cfg, &s, DEFAULT_CAP);
        let schema = Schema::clip(&cfg);
        let towers: usize = schema.params().iter().filter(|p| p.tower != Tower::Head).map(|p| p.numel()).sum();
        assert_eq!(b.iter().map(|x| x.bytes).sum::<f64>(), 4.0 * towers as f64);
        // a parameter above the cap (the 49 408 × 512 token table) is a bucket of its own
        assert_eq!(b.iter().map(|x| x.bytes).fold(0.0, f64::max), 4.0 * 49_408.0 * 512.0);
        assert!(b.len() > 10 && b.iter().all(|x| x.bytes > 0.0));
        assert!(b.windows(2).all(|w| w[0].ready <= w[1].ready), "in order");
        assert!((b.last().unwrap().ready - 4.0).abs() < 1e-12, "the last bucket waits for the whole backward");
        assert!(b[0].ready < 1.0, "the first is the text tower's last blocks");
    }

    #[test]
    fn layouts_double_then_add_nodes() {
        let r = |v: Vec<Layout>| v.iter().map(|l| (l.nodes, l.per_node)).collect::<Vec<_>>();
        assert_eq!(r(layouts(8, 3)), vec![(1, 1), (1, 2), (1, 4), (1, 8), (2, 8), (3, 8)]);
        assert_eq!(r(layouts(6, 1)), vec![(1, 1), (1, 2), (1, 4), (1, 6)]);
        assert_eq!(r(layouts(1, 2)), vec![(1, 1), (2, 1)]);
    }
}
