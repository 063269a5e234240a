//! The one CLIP block (src/model/block.rs), forward and backward, on the CPU backend against the
//! tape's block (the oracle: `common::oracle::block_on` / `block_rows` with autograd), per element:
//! batched non-causal (vision), batched causal, packed causal sequences with the pooled-rows last
//! block; odd widths (head dim 59 and 20, MLP 601), GELU and QuickGELU; bf16 weights within bf16
//! rounding of f32.
mod common;
use clipforge::autograd::Tape;
use clipforge::backend::cpu::Cpu;
use clipforge::backend::{Ops, Seqs};
use clipforge::model::block::{backward, forward, BlockRef, Stored};
use clipforge::model::config::{Activation, TowerConfig};
use clipforge::model::schema::BlockParam;
use clipforge::{DType, Tensor};
use common::oracle::{block_on, block_rows};
use common::{assert_close, randn};

fn cfg(hidden: usize, heads: usize, inter: usize, act: Activation) -> TowerConfig {
    TowerConfig { hidden, intermediate: inter, heads, layers: 1, eps: 1e-5, act }
}

/// The 16 block tensors, seeded, at CLIP-like scales.
fn params(c: &TowerConfig, seed: u64) -> Vec<Tensor> {
    BlockParam::ALL
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let shape = p.shape(c.hidden, c.intermediate);
            let init = p.init(c.hidden, 4);
            let v: Vec<f32> = randn(shape.iter().product(), seed + i as u64).into_iter().map(|x| init.mean + init.std.max(0.05) * x).collect();
            Tensor::from_vec(v, &shape).unwrap()
        })
        .collect()
}

fn stored(ops: &Cpu, p: &[Tensor], c: &TowerConfig, dtype: DType) -> Vec<Stored<Cpu>> {
    BlockParam::ALL
        .iter()
        .zip(p)
        .map(|(b, t)| {
            if BlockParam::LINEAR_WEIGHTS.contains(b) {
                let s = b.shape(c.hidden, c.intermediate);
                Stored::Linear(ops.weight(t.clone(), s[0], s[1], dtype).unwrap())
            } else {
                Stored::Buf(t.clone())
            }
        })
        .collect()
}

/// One case: the generic block against the tape block, output and every gradient.
fn case(name: &str, c: &TowerConfig, seqs: Seqs, rows: Option<Vec<usize>>, seed: u64) {
    let ops = Cpu;
    let n = seqs.rows();
    let w = c.hidden;
    let p = params(c, seed);
    let x = randn(n * w, seed + 100);
    let r = rows.as_ref().map_or(n, |v| v.len());
    let dy = randn(r * w, seed + 200);

    // oracle: the tape
    let tape = Tape::new();
    let xt = match &seqs {
        Seqs::Batch { batch, seq, .. } => Tensor::from_vec(x.clone(), &[*batch, *seq, w]).unwrap(),
        Seqs::Packed(_) => Tensor::from_vec(x.clone(), &[n, w]).unwrap(),
    };
    let xv = tape.param(xt);
    let pv: Vec<_> = p.iter().map(|t| tape.param(t.clone())).collect();
    let yv = match &rows {
        Some(rs) => block_rows(&tape, &xv, &pv, c, &seqs, rs).unwrap(),
        None => block_on(&tape, &xv, &pv, c, &seqs).unwrap(),
    };
    let grads = tape.backward_from(&yv, Tensor::from_vec(dy.clone(), yv.value().shape()).unwrap()).unwrap();

    // the one block on the CPU backend
    let st = stored(&ops, &p, c, DType::F32);
    let blk = BlockRef::new(&st, c).unwrap();
    let run = |keep: bool| forward(&ops, &blk, ops.upload(&x).unwrap(), &seqs, rows.as_deref(), keep).unwrap();
    let (y, saved) = run(true);
    let (y_inf, _) = run(false);
    assert_eq!(y.to_vec_f32(), y_inf.to_vec_f32(), "{name}: keeping activations changes nothing");
    assert_close(&format!("{name}: y"), &y.to_vec_f32(), &yv.value().to_vec_f32(), 1e-5, 1e-4);
    let (dx, dp) = backward(&ops, &blk, &saved.unwrap(), &ops.upload(&dy).unwrap()).unwrap();
    assert_close(&format!("{name}: dx"), &dx.to_vec_f32(), &grads.get(&xv).unwrap().to_vec_f32(), 1e-4, 1e-3);
    for (i, b) in BlockParam::ALL.iter().enumerate() {
        let want = grads.get(&pv[i]).unwrap().to_vec_f32();
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert_close(&format!("{name}: d{}", b.name()), &dp[i].to_vec_f32(), &want, 1e-4 * scale.max(1.0), 1e-3);
    }

    // bf16 weights: the forward within bf16 rounding of f32 (and not equal to it)
    let st16 = stored(&ops, &p, c, DType::BF16);
    let (y16, _) = forward(&ops, &BlockRef::new(&st16, c).unwrap(), ops.upload(&x).unwrap(), &seqs, rows.as_deref(), false).unwrap();
    let (a, b) = (y16.to_vec_f32(), y.to_vec_f32());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert_close(&format!("{name}: bf16 y"), &a, &b, 0.05 * scale, 0.02);
    assert_ne!(a, b, "{name}: the bf16 forward must differ from f32 (a silent f32 fallback would not)");
}

#[test]
fn batched_vision_block_matches_the_tape() {
    case("vision 2×7, W 118, head dim 59", &cfg(118, 2, 601, Activation::QuickGelu), Seqs::Batch { batch: 2, seq: 7, causal: false }, None, 1);
    case("vision 1×1", &cfg(64, 2, 256, Activation::Gelu), Seqs::Batch { batch: 1, seq: 1, causal: false }, None, 2);
}

#[test]
fn batched_causal_block_matches_the_tape() {
    case("text 3×9 causal, W 60", &cfg(60, 3, 257, Activation::QuickGelu), Seqs::Batch { batch: 3, seq: 9, causal: true }, None, 3);
}

#[test]
fn pooled_rows_block_matches_the_tape() {
    case("vision class rows", &cfg(118, 2, 601, Activation::Gelu), Seqs::Batch { batch: 3, seq: 5, causal: false }, Some(vec![0, 5, 10]), 4);
    case("packed text end rows", &cfg(60, 3, 257, Activation::QuickGelu), Seqs::Packed(vec![4, 1, 7]), Some(vec![3, 4, 11]), 5);
}

#[test]
fn packed_block_matches_the_tape() {
    case("packed text, all rows", &cfg(60, 3, 257, Activation::QuickGelu), Seqs::Packed(vec![5, 2, 9]), None, 6);
}
