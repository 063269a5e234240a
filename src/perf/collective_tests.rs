//! Unit tests of `collective.rs` (a file of their own to keep it short).
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
