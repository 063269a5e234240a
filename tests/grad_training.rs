//! Gradient checks: every backward of the training ops against f64 central finite differences of
//! its f64 reference forward, (f(x + h) − f(x − h)) / 2h, element by element. The reference
//! backward must agree to ~1e-8, the fast f32 backward to f32 accuracy. (The CUDA backward kernels
//! are checked against the reference backward in tests/cuda_training.rs.)
//! AdamW and PCA have no backward here (an optimiser step; PCA's gradient is not implemented).
mod emu_common;
mod training_common;
use clipforge::ops::cross_entropy::{cross_entropy, cross_entropy_bwd, cross_entropy_bwd_reference, cross_entropy_reference};
use clipforge::ops::pos_gather::{pos_gather_bwd, pos_gather_bwd_reference, pos_gather_reference, Stretch};
use emu_common::*;
use training_common::*;

/// Central differences of the scalar function f at x, for every coordinate.
fn fd_grad(x: &[f64], h: f64, f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let mut x = x.to_vec();
    (0..x.len())
        .map(|i| {
            let x0 = x[i];
            x[i] = x0 + h;
            let up = f(&x);
            x[i] = x0 - h;
            let down = f(&x);
            x[i] = x0;
            (up - down) / (2.0 * h)
        })
        .collect()
}

fn check64(what: &str, got: &[f64], want: &[f64], atol: f64, rtol: f64) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(g.is_finite() && (g - w).abs() <= atol + rtol * w.abs(), "{what}[{i}]: {g} vs finite differences {w}");
    }
}

/// loss(P) = Σ R ⊙ gather(P): its gradient is pos_gather_bwd(R).
#[test]
fn pos_gather_backward_matches_finite_differences() {
    for s in stretches() {
        let w = 3;
        let rows = s.new_len() + 7; // every position, some twice
        let pos = positions(rows, s, 5);
        let mut rng = Rng::new(s.len as u64 * 17 + s.ratio as u64);
        let p: Vec<f64> = rng.vec(s.len * w, -1.0, 1.0).iter().map(|&v| v as f64).collect();
        let r = rng.vec(rows * w, -1.0, 1.0);
        let loss = |p: &[f64]| -> f64 { pos_gather_reference(p, w, s, &pos).unwrap().iter().zip(&r).map(|(a, &b)| a * b as f64).sum() };
        let fd = fd_grad(&p, 1e-3, loss);
        let what = format!("{s:?}");
        check64(&format!("reference dP {what}"), &pos_gather_bwd_reference(&r, w, s, &pos).unwrap(), &fd, 1e-9, 1e-9);
        let fast = pos_gather_bwd(&r, w, s, &pos).unwrap();
        check64(&format!("fast dP {what}"), &to_f64(&fast), &fd, 1e-5, 1e-5);
    }
}

/// With d_out = 1 on every stretched row once, dP[i] = Σ_j w_ij is fixed by the stretch: kept rows
/// 1; an interior row 2.5 (its own group, 1 + ¾ + ½ + ¼) + 1.5 (the previous group, ¼ + ½ + ¾);
/// row 20 has no previous group; row 75 loses 1.5 to the extrapolation (−r/4) and row 76 gains
/// 1 + 1¼ + 1½ + 1¾ = 5.5 from it.
#[test]
fn pos_gather_backward_weights_per_base_row() {
    let pos: Vec<u32> = (0..248).collect();
    let dp = pos_gather_bwd_reference(&vec![1.0f32; 248], 1, Stretch::LONG_CLIP, &pos).unwrap();
    for (i, &g) in dp.iter().enumerate() {
        let want = match i {
            0..=19 => 1.0,
            20 => 2.5,
            21..=74 => 4.0,
            75 => 4.0 - 1.5,
            76 => 1.5 + 5.5,
            _ => unreachable!(),
        };
        assert!((g - want).abs() < 1e-12, "dP[{i}] = {g}, want {want}");
    }
    assert!((dp.iter().sum::<f64>() - 248.0).abs() < 1e-12, "the weights of every stretched row sum to 1");
}

/// loss = dloss · mean_i CE_i(logits); dlogits = (softmax − q)·dloss/N.
#[test]
fn cross_entropy_backward_matches_finite_differences() {
    for &(rows, classes) in &[(1, 1), (1, 2), (3, 7), (7, 5), (5, 45)] {
        for &eps in &[0.0, 0.1, 1.0] {
            for &(spread, dloss) in &[(3.0f32, 1.0f64), (50.0, 0.5)] {
                let x32 = logits(rows, classes, spread, (rows * classes) as u64 + 1);
                let t = targets(rows, classes, 2);
                let x = to_f64(&x32);
                let what = format!("{rows}x{classes} eps {eps} spread {spread}");
                let f = |x: &[f64]| dloss * cross_entropy_reference(x, classes, &t, eps).unwrap().mean;
                let fd = fd_grad(&x, 1e-5, f);
                check64(&format!("reference dlogits {what}"), &cross_entropy_bwd_reference(&x, classes, &t, eps, dloss).unwrap(), &fd, 1e-8, 1e-6);
                let fwd = cross_entropy(&x32, classes, &t, eps as f32).unwrap();
                let fast = cross_entropy_bwd(&x32, classes, &t, &fwd.lse, eps as f32, dloss as f32).unwrap();
                check64(&format!("fast dlogits {what}"), &to_f64(&fast), &fd, 2e-6 * spread as f64, 1e-4);
            }
        }
    }
}

/// The CUDA backward kernels (on the emulator) against the same finite differences.
#[test]
fn backward_kernels_match_finite_differences() {
    // pos_gather_bwd_f32, one row chunk
    let (s, w) = (Stretch::new(7, 2, 3).unwrap(), 5);
    let rows = s.new_len() + 3;
    let pos = positions(rows, s, 8);
    let mut rng = Rng::new(12);
    let p: Vec<f64> = rng.vec(s.len * w, -1.0, 1.0).iter().map(|&v| v as f64).collect();
    let r = rng.vec(rows * w, -1.0, 1.0);
    let fd = fd_grad(&p, 1e-3, |p| pos_gather_reference(p, w, s, &pos).unwrap().iter().zip(&r).map(|(a, &b)| a * b as f64).sum());
    let (mut gr, mut gpos, mut dp) = (Guarded::from_slice(&r), Guarded::from_slice(&pos), Guarded::filled(s.len * w, f32::NAN));
    let (pr, ppos, pdp) = (gr.ptr() as *const f32, gpos.ptr() as *const u32, dp.ptr());
    let (rows_i, l, wi, keep, ratio) = (rows as i32, s.len as i32, w as i32, s.keep as i32, s.ratio as i32);
    let smem = ((s.len * 128 + 4 * s.new_len()) * 4) as u32;
    launch(
        "pos_gather_bwd_f32",
        (1, 1, 1),
        (128, 1, 1),
        smem,
        LaunchArgs::new().arg(&pr).arg(&ppos).arg(&pdp).arg(&rows_i).arg(&l).arg(&wi).arg(&keep).arg(&ratio).as_params(),
    )
    .unwrap();
    dp.check("dP").unwrap();
    check64("kernel dP", &to_f64(dp.data()), &fd, 1e-5, 1e-5);

    // cross_entropy_fwd_f32 (for lse) then cross_entropy_bwd_f32
    let (rows, classes, eps, dloss) = (5usize, 45usize, 0.1f32, 0.5f32);
    let x32 = logits(rows, classes, 10.0, 4);
    let t = targets(rows, classes, 6);
    let fd = fd_grad(&to_f64(&x32), 1e-5, |x| dloss as f64 * cross_entropy_reference(x, classes, &t, eps as f64).unwrap().mean);
    let (mut gx, mut gt) = (Guarded::from_slice(&x32), Guarded::from_slice(&t));
    let (mut loss, mut lse, mut dx) = (Guarded::filled(rows, f32::NAN), Guarded::filled(rows, f32::NAN), Guarded::filled(rows * classes, f32::NAN));
    let (px, pt, pl, plse, pdx) = (gx.ptr() as *const f32, gt.ptr() as *const u32, loss.ptr(), lse.ptr(), dx.ptr());
    let (rows_i, c_i) = (rows as i32, classes as i32);
    launch(
        "cross_entropy_fwd_f32",
        (2, 1, 1),
        (96, 1, 1),
        0,
        LaunchArgs::new().arg(&px).arg(&pt).arg(&pl).arg(&plse).arg(&rows_i).arg(&c_i).arg(&eps).as_params(),
    )
    .unwrap();
    let plsec = plse as *const f32;
    launch(
        "cross_entropy_bwd_f32",
        (2, 1, 1),
        (96, 1, 1),
        0,
        LaunchArgs::new().arg(&px).arg(&pt).arg(&plsec).arg(&pdx).arg(&rows_i).arg(&c_i).arg(&eps).arg(&dloss).as_params(),
    )
    .unwrap();
    dx.check("dlogits").unwrap();
    check64("kernel dlogits", &to_f64(dx.data()), &fd, 2e-6, 1e-4);
}
