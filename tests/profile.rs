//! `backend::profile` (what `bench --profile` prints): off by default, one row per outermost CPU
//! operation and shape with its calls and FLOPs, nested operations not counted twice, and a
//! tower's forward covered by its rows. The table is process-wide, so this file is one test
//! binary whose tests take a lock (no other test's operations land in a table being read).
mod common;
use clipforge::backend::cpu::Cpu;
use clipforge::backend::profile::{self, OpTime};
use clipforge::backend::{Ops, Seqs};
use clipforge::{ClipModel, DType, DeviceChoice, OpenOptions};
use common::{fixture, randn};
use std::sync::Mutex;
use std::time::Instant;

static LOCK: Mutex<()> = Mutex::new(());

fn row<'a>(t: &'a [OpTime], op: &str, shape: &str) -> &'a OpTime {
    t.iter().find(|r| r.op == op && r.shape == shape).unwrap_or_else(|| panic!("no row {op} {shape} in {t:#?}"))
}

#[test]
fn rows_calls_flops_and_nesting() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let (m, k, n) = (7, 45, 65);
    let x = Cpu.upload(&randn(m * k, 1)).unwrap();
    let w = Cpu.weight(Cpu.upload(&randn(n * k, 2)).unwrap(), n, k, DType::F32).unwrap();
    // off: nothing is recorded
    Cpu.linear(&x, &w, None, m).unwrap();
    profile::start();
    assert!(profile::stop().is_empty(), "operations before start() were recorded");

    profile::start();
    for _ in 0..3 {
        Cpu.linear(&x, &w, None, m).unwrap();
    }
    // a LayerNorm with its residual add: one row, not also axpy's and layernorm's
    let (g, b) = (Cpu.upload(&vec![1.0; n]).unwrap(), Cpu.upload(&vec![0.0; n]).unwrap());
    let mut h = Cpu.upload(&randn(m * n, 3)).unwrap();
    let f = Cpu.upload(&randn(m * n, 4)).unwrap();
    Cpu.add_layernorm(&mut h, &f, &g, &b, m, n, 1e-5).unwrap();
    // causal attention: 4·W per (query, key) pair, t(t+1)/2 pairs per sequence
    let (t, heads, wd) = (9, 3, 3 * 59);
    let q = Cpu.upload(&randn(2 * t * wd, 5)).unwrap();
    Cpu.attention(&q, &q, &q, &Seqs::Batch { batch: 2, seq: t, causal: true }, heads, wd).unwrap();
    let table = profile::stop();

    let lin = row(&table, "linear", "7×45→65");
    assert_eq!((lin.calls, lin.flops), (3, 3.0 * 2.0 * (m * k * n) as f64));
    assert!(lin.seconds > 0.0);
    let ln = row(&table, "add_layernorm", "7×65");
    assert_eq!((ln.calls, ln.flops), (1, 0.0));
    assert!(!table.iter().any(|r| r.op == "axpy" || r.op == "layernorm"), "nested operations counted: {table:#?}");
    let at = row(&table, "attention", "2×9×3·59 causal");
    assert_eq!(at.flops, 4.0 * (wd * 2 * t * (t + 1) / 2) as f64);
    assert_eq!(row(&table, "upload", "65 values").calls, 2); // γ and β
    assert_eq!(table.iter().filter(|r| r.op != "upload").count(), 3, "{table:#?}");
    assert!(table.windows(2).all(|p| p[0].seconds >= p[1].seconds), "not most expensive first");
    // stopped: off again
    Cpu.linear(&x, &w, None, m).unwrap();
    profile::start();
    assert!(profile::stop().is_empty());
}

#[test]
fn a_forward_is_covered_by_its_rows() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    for dtype in [DType::F32, DType::BF16] {
        let model = ClipModel::open(fixture("tiny"), &OpenOptions::default().device(DeviceChoice::Cpu).dtype(dtype)).unwrap();
        let b = 3;
        let px = randn(b * 3 * 32 * 32, 7); // [B, 3, 32, 32]
        model.embed_pixels(&px, b).unwrap();
        profile::start();
        let t0 = Instant::now();
        model.embed_pixels(&px, b).unwrap();
        let wall = t0.elapsed().as_secs_f64();
        let table = profile::stop();
        // tiny: 2 layers, width 64, 2 heads, 16 patches + the class token; the last layer runs
        // for the pooled rows only
        let rows = b * 17;
        let qkv = row(&table, "qkv", &format!("{rows}×64→64"));
        assert_eq!((qkv.calls, qkv.flops), (1, 3.0 * 2.0 * (rows * 64 * 64) as f64), "{dtype:?}");
        assert_eq!(row(&table, "attention", &format!("{b}×17×2·32")).calls, 1, "{dtype:?}");
        assert_eq!(row(&table, "attention_pooled", &format!("{b} of {rows} rows×2·32")).calls, 1, "{dtype:?}");
        assert_eq!(row(&table, "linear_act", &format!("{rows}×64→256")).calls, 1, "{dtype:?}");
        assert_eq!(row(&table, "linear_act", &format!("{b}×64→256")).calls, 1, "{dtype:?}");
        assert_eq!(row(&table, "patch_embed", &format!("{}×192→64", b * 16)).calls, 1, "{dtype:?}");
        let covered: f64 = table.iter().map(|r| r.seconds).sum();
        assert!(covered > 0.0 && covered <= wall, "{dtype:?}: operations {covered} s of a {wall} s forward");
        assert!(table.iter().all(|r| r.calls > 0 && r.seconds >= 0.0 && r.flops.is_finite()), "{table:#?}");
    }
}
