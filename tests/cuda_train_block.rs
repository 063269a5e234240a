//! The device training block (src/cuda/train_block.rs) on the CUDA emulator against the CPU
//! tape's block (`train::model::block`): output, input gradient and all 16 parameter gradients,
//! per element |x − ref| ≤ atol·max|ref| + rtol·|ref|, for a causal text-like block and a
//! bidirectional vision-like block with an odd width (60, 3 heads of 20) and GELU.
mod common;
use clipforge::autograd::Tape;
use clipforge::cuda::train_block::{backward, forward, DevBlock};
use clipforge::cuda::{DeviceOps, EmuOps};
use clipforge::model::config::{Activation, TowerConfig};
use clipforge::train::model::block;
use clipforge::Tensor;

fn params(c: &TowerConfig, seed: u64) -> Vec<Tensor> {
    let (w, i) = (c.hidden, c.intermediate);
    let shapes = [vec![w], vec![w], vec![w, w], vec![w], vec![w, w], vec![w], vec![w, w], vec![w], vec![w, w], vec![w], vec![w], vec![w], vec![i, w], vec![i], vec![w, i], vec![w]];
    shapes
        .iter()
        .enumerate()
        .map(|(k, s)| {
            let n: usize = s.iter().product();
            let v: Vec<f32> = common::randn(n, seed + k as u64).iter().map(|x| if k == 0 || k == 10 { 1.0 + 0.2 * x } else { 0.2 * x }).collect();
            Tensor::from_vec(v, s).unwrap()
        })
        .collect()
}


fn run(c: &TowerConfig, b: usize, t: usize, causal: bool) {
    let p = params(c, 7);
    let x = Tensor::from_vec(common::randn(b * t * c.hidden, 3), &[b, t, c.hidden]).unwrap();
    let dy = common::randn(b * t * c.hidden, 5);
    // CPU tape
    let tape = Tape::new();
    let xv = tape.param(x.clone());
    let pv: Vec<_> = p.iter().map(|t| tape.param(t.clone())).collect();
    let y = block(&tape, &xv, &pv, c, causal).unwrap();
    let grads = tape.backward_from(&y, Tensor::from_vec(dy.clone(), y.shape()).unwrap()).unwrap();
    // emulated device
    let ops = EmuOps;
    let bufs: Vec<_> = p.iter().map(|t| ops.upload(&t.to_vec_f32()).unwrap()).collect();
    let blk = DevBlock { p: std::array::from_fn(|i| &bufs[i]), cfg: c, half: None };
    let xd = ops.upload(&x.to_vec_f32()).unwrap();
    let (yd, saved) = forward(&ops, &blk, &xd, b, t, causal).unwrap();
    let dyd = ops.upload(&dy).unwrap();
    let (dx, dp) = backward(&ops, &blk, &saved, &dyd).unwrap();
    let what = format!("W{} H{} B{b} T{t} causal {causal}", c.hidden, c.heads);
    common::assert_close_scaled(&format!("{what} y"), &ops.download(&yd).unwrap(), &y.value().to_vec_f32(), 0.0);
    let want_dx = grads.get(&xv).unwrap().to_vec_f32();
    let floor = 1e-2 * want_dx.iter().fold(0f32, |m, v| m.max(v.abs()));
    common::assert_close_scaled(&format!("{what} dx"), &ops.download(&dx).unwrap(), &want_dx, 0.0);
    for (k, (g, v)) in dp.iter().zip(&pv).enumerate() {
        common::assert_close_scaled(&format!("{what} {}", clipforge::train::model::BLOCK_PARAMS[k]), &ops.download(g).unwrap(), &grads.get(v).unwrap().to_vec_f32(), floor);
    }
}

#[test]
fn device_block_matches_the_cpu_tape() {
    let text = TowerConfig { hidden: 32, intermediate: 128, heads: 2, layers: 1, eps: 1e-5, act: Activation::QuickGelu };
    run(&text, 2, 7, true);
    let odd = TowerConfig { hidden: 60, intermediate: 100, heads: 3, layers: 1, eps: 1e-5, act: Activation::Gelu };
    run(&odd, 3, 5, false);
    run(&text, 1, 1, true);
}

#[test]
fn device_block_in_every_warp_schedule() {
    use clipforge::cuda::emu::{set_schedule, Schedule, TEST_SCHEDULES};
    let text = TowerConfig { hidden: 32, intermediate: 64, heads: 2, layers: 1, eps: 1e-5, act: Activation::QuickGelu };
    for s in TEST_SCHEDULES {
        set_schedule(s);
        run(&text, 2, 5, true);
    }
    set_schedule(Schedule::Forward);
}
