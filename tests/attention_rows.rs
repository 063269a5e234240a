//! The bf16 attention of one query per sequence (the pooled rows of a last block at inference:
//! `attention_bf16::attention_bf16_rows`) against the full bf16 attention's rows, bit for bit:
//! first, last and middle queries; T = 1, 7, 45, 50, 77, 130 (past one 64-row query block); head
//! dims 1, 20, 59, 64; causal or not. And the CPU backend's
//! `Ops::attention_pooled` against the composite every other backend runs (q, k, v and the
//! attention for every row, then the rows), f32 and bf16 weights, batches and packed sequences:
//! the same bits too, so an inference forward still equals a training forward
//! (tests/block.rs).
use clipforge::backend::cpu::Cpu;
use clipforge::backend::{attention_pooled_composite, Ops, Seqs};
use clipforge::ops::attention::AttnShape;
use clipforge::ops::attention_bf16::{attention_bf16, attention_bf16_rows, PooledRow};
use clipforge::ops::gemm_bf16::Kernel;
use clipforge::{DType, Tensor};
use half::bf16;

fn uniform(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut g = clipforge::model::synthetic::Rng::new(seed);
    (0..n).map(|_| (g.uniform() * 2.0 - 1.0) * scale).collect()
}

fn rows_of<T: Copy>(x: &[T], rows: &[usize], w: usize) -> Vec<T> {
    rows.iter().flat_map(|&r| x[r * w..(r + 1) * w].iter().copied()).collect()
}

fn same_bits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(g.to_bits() == w.to_bits(), "{what}: [{i}] rows {g} vs full {w}");
    }
}

#[test]
fn pooled_rows_give_the_full_attentions_bits() {
    for &(b, t, h, d) in &[(1, 1, 1, 1), (2, 7, 3, 59), (3, 50, 2, 64), (2, 45, 1, 20), (2, 77, 2, 64), (2, 130, 1, 20)] {
        let w = h * d;
        let (q, k, v) = (uniform(b * t * w, 1, 2.0), uniform(b * t * w, 2, 2.0), uniform(b * t * w, 3, 0.5));
        for pos in [0, t - 1, t / 2, t.saturating_sub(2)] {
            let rows: Vec<usize> = (0..b).map(|s| s * t + pos).collect();
            for causal in [false, true] {
                let s = AttnShape { batch: b, seq: t, heads: h, head_dim: d, causal, scale: 1.0 / (d as f32).sqrt() };
                let pooled: Vec<PooledRow> = (0..b).map(|i| PooledRow { start: i * t, len: t, pos, causal }).collect();
                let tag = format!("B{b} T{t} H{h} d{d} pos {pos} causal {causal}");
                let r16 = |x: &[f32]| x.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>();
                let (q16, k16, v16) = (r16(&q), r16(&k), r16(&v));
                let got = attention_bf16_rows(&rows_of(&q16, &rows, w), &k16, &v16, &pooled, h, Kernel::Auto);
                same_bits(&format!("{tag} bf16"), &got, &rows_of(&attention_bf16(&q16, &k16, &v16, &s, Kernel::Auto).0, &rows, w));
            }
        }
    }
}

/// The CPU backend's pooled attention against the default composite: batches (the image tower's
/// class rows), causal batches and packed sequences (the text tower's end rows), a row set that
/// is not one per sequence, f32 weights (the composite itself) and bf16 weights.
#[test]
fn cpu_attention_pooled_matches_the_composite() {
    let ops = Cpu;
    let (h, d) = (3, 20);
    let w = h * d;
    let cases: Vec<(Seqs, Vec<usize>)> = vec![
        (Seqs::Batch { batch: 3, seq: 7, causal: false }, vec![0, 7, 14]),
        (Seqs::Batch { batch: 2, seq: 9, causal: true }, vec![5, 17]),
        (Seqs::Packed(vec![4, 1, 6]), vec![3, 4, 10]),
        (Seqs::Packed(vec![70]), vec![69]),
        (Seqs::Batch { batch: 2, seq: 5, causal: false }, vec![0, 1, 7]),
    ];
    let up = |x: Vec<f32>| ops.upload_tensor(&Tensor::from_vec(x.clone(), &[x.len()]).unwrap()).unwrap();
    for dtype in [DType::F32, DType::BF16] {
        let ws: Vec<_> = (0..3).map(|i| ops.weight(up(uniform(w * w, 10 + i, 0.3)), w, w, dtype).unwrap()).collect();
        let bs: Vec<_> = (0..3).map(|i| up(uniform(w, 20 + i, 0.2))).collect();
        let (wr, br) = ([&ws[0], &ws[1], &ws[2]], [&bs[0], &bs[1], &bs[2]]);
        for (seqs, rows) in &cases {
            let n = seqs.rows();
            let hid = up(uniform(n * w, 30 + n as u64, 1.5));
            let got = ops.download(&ops.attention_pooled(&hid, wr, br, seqs, rows, h, w).unwrap()).unwrap();
            let want = ops.download(&attention_pooled_composite(&ops, &hid, wr, br, seqs, rows, h, w).unwrap()).unwrap();
            same_bits(&format!("{dtype:?} {seqs:?} rows {rows:?}"), &got, &want);
        }
    }
}
