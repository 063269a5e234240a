//! Training ops on the CPU: every fast path against its plain reference (f64) on odd shapes, plus
//! the formulas themselves: Long-CLIP's stretch written out as methods.md §2.1 (9)–(11), AdamW's
//! closed form at t = 1 and torch's decay order, PCA against an exact eigendecomposition.
mod emu_common;
mod training_common;
use clipforge::ops::adamw::{adamw_reference, adamw_step, AdamW};
use clipforge::ops::cross_entropy::{cross_entropy, cross_entropy_bwd, cross_entropy_bwd_reference, cross_entropy_reference};
use clipforge::ops::pca::{orthonormalize, pca, pca_reference, start_basis, sym_eig, PcaOptions};
use clipforge::ops::pos_gather::{pos_gather, pos_gather_bwd, pos_gather_bwd_reference, pos_gather_reference, stretch, stretch_reference, Stretch};
use emu_common::*;
use half::{bf16, f16};
use training_common::*;

// ---------------------------------------------------------------- positional stretch + gather

#[test]
fn long_clip_stretch_is_methods_formulas_9_to_11() {
    let s = Stretch::LONG_CLIP;
    assert_eq!(s.new_len(), 248);
    assert_eq!(4 * 77 - 3 * 20, 248);
    let w = 5;
    let p = Rng::new(1).vec(77 * w, -1.0, 1.0);
    let row = |i: usize, c: usize| p[i * w + c] as f64;
    // methods.md §2.1, literally
    let mut want = vec![0f64; 248 * w];
    for j in 0..20 {
        for c in 0..w {
            want[j * w + c] = row(j, c); // (9)
        }
    }
    for i in 0..56 {
        for k in 0..4 {
            for c in 0..w {
                want[(20 + 4 * i + k) * w + c] = (1.0 - k as f64 / 4.0) * row(20 + i, c) + (k as f64 / 4.0) * row(21 + i, c);
                // (10)
            }
        }
    }
    assert_eq!(20 + 4 * 55 + 3, 243, "(10) covers slots 20..243");
    for k in 0..4 {
        for c in 0..w {
            want[(244 + k) * w + c] = row(76, c) + (k as f64 / 4.0) * (row(76, c) - row(75, c));
            // (11)
        }
    }
    let reference = stretch_reference(&p, w, s);
    assert_eq!(reference, want, "stretch_reference differs from (9)-(11)");
    let fast = stretch(&p, w, s).unwrap();
    check_close("stretch", &fast, &want, 1e-7, 1e-6).unwrap();
    // the kept rows are copied bit for bit, the first row of each group and of the tail too
    for j in (0..20).chain((20..244).step_by(4)).chain([244]) {
        let src = if j < 20 {
            j
        } else if j < 244 {
            20 + (j - 20) / 4
        } else {
            76
        };
        assert_eq!(&fast[j * w..(j + 1) * w], &p[src * w..(src + 1) * w], "row {j}");
    }
}

#[test]
fn stretch_ratio_one_is_the_identity() {
    let s = Stretch::new(6, 3, 1).unwrap();
    let p = Rng::new(2).vec(6 * 7, -1.0, 1.0);
    assert_eq!(stretch(&p, 7, s).unwrap(), p);
}

#[test]
fn stretch_rejects_bad_parameters_and_positions() {
    assert!(Stretch::new(1, 0, 4).is_err());
    assert!(Stretch::new(77, 77, 4).is_err());
    assert!(Stretch::new(77, 20, 0).is_err());
    let s = Stretch::LONG_CLIP;
    let p = vec![0f32; 77 * 3];
    assert!(pos_gather(&p, 3, s, &[0, 248]).is_err());
    assert!(pos_gather(&p, 4, s, &[0]).is_err());
    assert!(pos_gather_bwd(&[0.0; 3], 3, s, &[248]).is_err());
    assert!(pos_gather_bwd(&[0.0; 2], 3, s, &[0]).is_err());
}

#[test]
fn pos_gather_fast_matches_reference() {
    for s in stretches() {
        for &(rows, w) in &[(1, 1), (7, 59), (45, 65), (65, 7), (300, 512), (256, 768)] {
            let mut rng = Rng::new((rows * 31 + w) as u64);
            let p = rng.vec(s.len * w, -1.0, 1.0);
            let pos = positions(rows, s, rows as u64);
            let what = format!("{s:?} rows {rows} W {w}");
            let got = pos_gather(&p, w, s, &pos).unwrap();
            check_close(&format!("gather {what}"), &got, &pos_gather_reference(&p, w, s, &pos).unwrap(), 1e-7, 1e-6).unwrap();
            let dout = rng.vec(rows * w, -1.0, 1.0);
            let dp = pos_gather_bwd(&dout, w, s, &pos).unwrap();
            let want = pos_gather_bwd_reference(&dout, w, s, &pos).unwrap();
            // sums of up to `rows` terms in f32
            check_close(&format!("bwd {what}"), &dp, &want, 1e-6 * rows as f64, 1e-5).unwrap();
        }
    }
}

#[test]
fn pos_gather_bwd_is_deterministic() {
    let s = Stretch::LONG_CLIP;
    let pos = positions(4 * 248, s, 3);
    let dout = Rng::new(4).vec(pos.len() * 64, -1.0, 1.0);
    let a = pos_gather_bwd(&dout, 64, s, &pos).unwrap();
    for _ in 0..3 {
        assert!(a.iter().zip(pos_gather_bwd(&dout, 64, s, &pos).unwrap()).all(|(x, y)| x.to_bits() == y.to_bits()));
    }
}

// ---------------------------------------------------------------- cross-entropy

#[test]
fn cross_entropy_fast_matches_reference() {
    for &(rows, classes) in &[(1, 1), (7, 59), (45, 65), (1, 2048), (300, 1000), (64, 2048)] {
        for &eps in &[0.0f32, 0.1, 1.0] {
            for &spread in &[5.0f32, 100.0] {
                let x = logits(rows, classes, spread, (rows * classes) as u64);
                let t = targets(rows, classes, rows as u64);
                let what = format!("{rows}x{classes} eps {eps} spread {spread}");
                let x64 = to_f64(&x);
                let want = cross_entropy_reference(&x64, classes, &t, eps as f64).unwrap();
                let got = cross_entropy(&x, classes, &t, eps).unwrap();
                let atol = 2e-5 * spread as f64;
                check_close(&format!("loss {what}"), &got.loss, &want.loss, atol, 1e-5).unwrap();
                check_close(&format!("lse {what}"), &got.lse, &want.lse, atol, 1e-6).unwrap();
                check_close(&format!("mean {what}"), &[got.mean], &[want.mean], atol, 1e-5).unwrap();
                let dloss = 0.5;
                let want_d = cross_entropy_bwd_reference(&x64, classes, &t, eps as f64, dloss as f64).unwrap();
                let got_d = cross_entropy_bwd(&x, classes, &t, &got.lse, eps, dloss).unwrap();
                check_close(&format!("dlogits {what}"), &got_d, &want_d, 1e-6 * spread as f64 / rows as f64, 1e-4).unwrap();
            }
        }
    }
}

#[test]
fn cross_entropy_matches_known_values() {
    // two classes, equal logits: p = 1/2, loss = ln 2 whatever the smoothing
    let r = cross_entropy_reference(&[3.0, 3.0], 2, &[1], 0.1).unwrap();
    assert!((r.mean - std::f64::consts::LN_2).abs() < 1e-15);
    // eps = 0: -log softmax[t]
    let x = [1.0, 2.0, 0.5];
    let lse = (1f64.exp() + 2f64.exp() + 0.5f64.exp()).ln();
    let r = cross_entropy_reference(&x, 3, &[2], 0.0).unwrap();
    assert!((r.loss[0] - (lse - 0.5)).abs() < 1e-14);
    // eps = 1: uniform target, loss = lse - mean(x)
    let r = cross_entropy_reference(&x, 3, &[2], 1.0).unwrap();
    assert!((r.loss[0] - (lse - 3.5 / 3.0)).abs() < 1e-14);
    // rows of the gradient sum to zero (softmax and q are both distributions)
    let g = cross_entropy_bwd_reference(&to_f64(&logits(5, 7, 4.0, 9)), 7, &targets(5, 7, 1), 0.1, 1.0).unwrap();
    for row in g.chunks(7) {
        assert!(row.iter().sum::<f64>().abs() < 1e-15);
    }
    assert!(cross_entropy(&[0.0; 6], 3, &[0, 3], 0.1).is_err());
    assert!(cross_entropy(&[0.0; 6], 3, &[0], 0.1).is_err());
}

// ---------------------------------------------------------------- AdamW

fn adam_inputs(n: usize, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut rng = Rng::new(seed);
    let p = rng.vec(n, -1.0, 1.0);
    let g = rng.vec(n, -1e-2, 1e-2);
    let m = rng.vec(n, -1e-3, 1e-3);
    let v: Vec<f32> = rng.vec(n, 0.0, 1e-5);
    (p, g, m, v)
}

#[test]
fn adamw_fast_is_bitwise_the_reference() {
    let opts =
        [AdamW::default(), AdamW { lr: 1e-6, weight_decay: 1e-2, ..AdamW::default() }, AdamW { beta1: 0.3, lr: 0.05, weight_decay: 0.0, ..AdamW::default() }];
    for opt in opts {
        for &n in &[1usize, 7, 45, 4099, 100_003] {
            for &step in &[1u32, 2, 10, 1000] {
                let (p0, g, m0, v0) = adam_inputs(n, n as u64 + step as u64);
                let gb: Vec<bf16> = g.iter().map(|&x| bf16::from_f32(x)).collect();
                // f32 grads with both copies, bf16 grads without
                let (mut p, mut m, mut v) = (p0.clone(), m0.clone(), v0.clone());
                let (mut pb, mut ph) = (vec![bf16::ZERO; n], vec![f16::ZERO; n]);
                adamw_step(&mut p, &g, &mut m, &mut v, &opt, step, Some(&mut pb), Some(&mut ph)).unwrap();
                let (mut pr, mut mr, mut vr) = (p0.clone(), m0.clone(), v0.clone());
                adamw_reference(&mut pr, &g, &mut mr, &mut vr, &opt, step).unwrap();
                for (a, b, what) in [(&p, &pr, "p"), (&m, &mr, "m"), (&v, &vr, "v")] {
                    assert!(a.iter().zip(b.iter()).all(|(x, y)| x.to_bits() == y.to_bits()), "{what} n {n} step {step} {opt:?}");
                }
                assert!(pb.iter().zip(&p).all(|(b, &x)| *b == bf16::from_f32(x)));
                assert!(ph.iter().zip(&p).all(|(h, &x)| *h == f16::from_f32(x)));
                let (mut p2, mut m2, mut v2) = (p0.clone(), m0.clone(), v0.clone());
                adamw_step(&mut p2, &gb, &mut m2, &mut v2, &opt, step, None, None).unwrap();
                let (mut pr, mut mr, mut vr) = (p0.clone(), m0.clone(), v0.clone());
                adamw_reference(&mut pr, &gb, &mut mr, &mut vr, &opt, step).unwrap();
                assert!(p2.iter().zip(&pr).all(|(x, y)| x.to_bits() == y.to_bits()), "bf16 grads n {n} step {step}");
            }
        }
    }
}

/// Step 1 in closed form: m̂ = g, v̂ = g², so p1 = p0·(1 − lr·wd) − lr·g/(|g| + ε). A large lr·wd
/// makes the decay order visible: decaying after the Adam update would give (p0 − lr·u)(1 − lr·wd).
#[test]
fn adamw_first_step_closed_form_and_decay_order() {
    let opt = AdamW { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-3, weight_decay: 0.5 };
    let (p0, g, _, _) = adam_inputs(257, 5);
    let (mut p, mut m, mut v) = (p0.clone(), vec![0f32; 257], vec![0f32; 257]);
    adamw_reference(&mut p, &g, &mut m, &mut v, &opt, 1).unwrap();
    let want: Vec<f64> = p0
        .iter()
        .zip(&g)
        .map(|(&p, &g)| {
            let (p, g) = (p as f64, g as f64);
            p * (1.0 - opt.lr * opt.weight_decay) - opt.lr * g / (g.abs() + opt.eps)
        })
        .collect();
    check_close("p after step 1", &p, &want, 1e-6, 1e-5).unwrap();
    let decay_last: Vec<f64> = p0
        .iter()
        .zip(&g)
        .map(|(&p, &g)| {
            let (p, g) = (p as f64, g as f64);
            (p - opt.lr * g / (g.abs() + opt.eps)) * (1.0 - opt.lr * opt.weight_decay)
        })
        .collect();
    assert!(check_close("decay applied last", &p, &decay_last, 1e-6, 1e-5).is_err());
}

/// Many steps against the formula of the brief evaluated in f64:
/// p ← p − lr·wd·p; m ← β1m + (1−β1)g; v ← β2v + (1−β2)g²; p ← p − lr·m̂/(√v̂ + ε).
#[test]
fn adamw_tracks_the_f64_formula_over_many_steps() {
    let opt = AdamW { lr: 1e-3, weight_decay: 0.1, ..AdamW::default() };
    let n = 65;
    let mut rng = Rng::new(11);
    let (mut p, mut m, mut v) = (rng.vec(n, -1.0, 1.0), vec![0f32; n], vec![0f32; n]);
    let (mut p64, mut m64, mut v64): (Vec<f64>, Vec<f64>, Vec<f64>) = (to_f64(&p), vec![0.0; n], vec![0.0; n]);
    for t in 1..=200u32 {
        let g = rng.vec(n, -1.0, 1.0);
        adamw_reference(&mut p, &g, &mut m, &mut v, &opt, t).unwrap();
        for i in 0..n {
            let gi = g[i] as f64;
            p64[i] -= opt.lr * opt.weight_decay * p64[i];
            m64[i] = opt.beta1 * m64[i] + (1.0 - opt.beta1) * gi;
            v64[i] = opt.beta2 * v64[i] + (1.0 - opt.beta2) * gi * gi;
            let mh = m64[i] / (1.0 - opt.beta1.powi(t as i32));
            let vh = v64[i] / (1.0 - opt.beta2.powi(t as i32));
            p64[i] -= opt.lr * mh / (vh.sqrt() + opt.eps);
        }
    }
    check_close("p after 200 steps", &p, &p64, 1e-6, 1e-5).unwrap();
    check_close("m after 200 steps", &m, &m64, 1e-6, 1e-4).unwrap();
    check_close("v after 200 steps", &v, &v64, 1e-7, 1e-4).unwrap();
}

#[test]
fn adamw_rejects_bad_input() {
    let (mut p, mut m, mut v) = (vec![0f32; 3], vec![0f32; 3], vec![0f32; 3]);
    assert!(adamw_reference(&mut p, &[0f32; 2], &mut m, &mut v, &AdamW::default(), 1).is_err());
    assert!(adamw_reference(&mut p, &[0f32; 3], &mut m, &mut v, &AdamW::default(), 0).is_err());
    let mut short = vec![bf16::ZERO; 2];
    assert!(adamw_step(&mut p, &[0f32; 3], &mut m, &mut v, &AdamW::default(), 1, Some(&mut short), None).is_err());
}

// ---------------------------------------------------------------- PCA

#[test]
fn jacobi_eigendecomposition_is_exact() {
    let n = 40;
    let mut rng = Rng::new(21);
    let b: Vec<f64> = (0..n * n).map(|_| rng.uniform(-1.0, 1.0) as f64).collect();
    let a: Vec<f64> = (0..n * n)
        .map(|e| {
            let (i, j) = (e / n, e % n);
            b[i * n + j] + b[j * n + i]
        })
        .collect();
    let (vals, vecs) = sym_eig(&a, n);
    for c in 0..n {
        for i in 0..n {
            let av: f64 = (0..n).map(|j| a[i * n + j] * vecs[j * n + c]).sum();
            assert!((av - vals[c] * vecs[i * n + c]).abs() < 1e-10, "A v = λ v, column {c}");
        }
        for c2 in 0..n {
            let d: f64 = (0..n).map(|i| vecs[i * n + c] * vecs[i * n + c2]).sum();
            assert!((d - (c == c2) as u8 as f64).abs() < 1e-12);
        }
    }
}

#[test]
fn start_basis_and_orthonormalize() {
    let q = start_basis(59, 32, 0);
    assert!(q.iter().all(|v| (-1.0..1.0).contains(v)));
    assert_ne!(start_basis(59, 32, 1), q);
    let mut o = q.clone();
    orthonormalize(&mut o, 59, 32);
    check_orthonormal_or_zero(&o, 59, 32, 1e-5).unwrap();
    assert!((0..32).all(|j| (0..59).map(|i| (o[i * 32 + j] as f64).powi(2)).sum::<f64>() > 0.5), "no column vanished");
    // dependent columns become zero, everything stays finite
    let mut dep = vec![0f32; 10 * 4];
    for i in 0..10 {
        dep[i * 4] = i as f32;
        dep[i * 4 + 1] = 2.0 * i as f32;
        dep[i * 4 + 3] = 1.0;
    }
    orthonormalize(&mut dep, 10, 4);
    assert!(dep.iter().all(|v| v.is_finite()));
    check_orthonormal_or_zero(&dep, 10, 4, 1e-5).unwrap();
}

/// The spectrum has a gap at k: subspace iteration finds the SVD subspace.
#[test]
fn pca_matches_exact_eigendecomposition_with_a_gap() {
    for &(b, d, k) in &[(7, 59, 4), (45, 59, 4), (45, 65, 32), (64, 59, 32), (64, 128, 32), (300, 160, 32)] {
        let rank = (b - 1).min(d);
        let x = spectral_batch(b, d, &gapped_sigma(k, rank), (b * d + k) as u64);
        let opts = PcaOptions { k, iters: 12, ..PcaOptions::default() };
        let got = pca(&x, b, d, &opts).unwrap();
        let want = pca_reference(&x, b, d, k).unwrap();
        let what = format!("B {b} D {d} k {k}");
        assert!(want.eigenvalues[k] < 0.02 * want.eigenvalues[k - 1], "{what}: constructed gap");
        check_close(&format!("mean {what}"), &got.mean, &want.mean, 1e-6, 1e-6).unwrap();
        check_close(&format!("recon {what}"), &got.recon, &want.recon, 1e-4, 1e-4).unwrap();
        check_orthonormal_or_zero(&got.v, d, k, 1e-5).unwrap();
        let diff = max_abs_diff(&projector(&got.v, d, k), &projector(&want.v, d, k));
        assert!(diff < 1e-4, "{what}: projectors differ by {diff}");
    }
}

#[test]
fn pca_tolerance_stops_early() {
    let (b, d, k) = (64, 65, 8);
    let x = spectral_batch(b, d, &gapped_sigma(k, 40), 5);
    let got = pca(&x, b, d, &PcaOptions { k, iters: 100, tol: 1e-5, seed: 0 }).unwrap();
    assert!(got.iters < 20, "{} iterations", got.iters);
    let want = pca_reference(&x, b, d, k).unwrap();
    check_close("recon", &got.recon, &want.recon, 1e-4, 1e-4).unwrap();
}

/// B ≤ k, identical rows, a single row, eigenvalues repeated across k: finite, orthonormal-or-zero
/// V, and as much energy captured as the optimum allows.
#[test]
fn pca_degenerate_inputs_stay_finite() {
    let mut cases: Vec<(String, Vec<f32>, usize, usize, usize)> = Vec::new();
    cases.push(("B < k".into(), Rng::new(1).vec(7 * 59, -1.0, 1.0), 7, 59, 32));
    let row = Rng::new(2).vec(65, -1.0, 1.0);
    cases.push(("identical rows".into(), row.iter().cycle().take(5 * 65).copied().collect(), 5, 65, 4));
    cases.push(("one row".into(), row.clone(), 1, 65, 32));
    cases.push(("zeros".into(), vec![0.0; 9 * 33], 9, 33, 32));
    cases.push(("repeated across k".into(), spectral_batch(64, 59, &[2.0; 40], 3), 64, 59, 32));
    cases.push(("repeated inside top k".into(), spectral_batch(45, 65, &[[3.0; 4].as_slice(), &[0.2; 10]].concat(), 4), 45, 65, 4));
    for (what, x, b, d, k) in cases {
        let got = pca(&x, b, d, &PcaOptions { k, iters: 12, ..PcaOptions::default() }).unwrap();
        assert!(got.v.iter().chain(&got.recon).chain(&got.mean).all(|v| v.is_finite()), "{what}: not finite");
        check_orthonormal_or_zero(&got.v, d, k, 1e-4).map_err(|e| format!("{what}: {e}")).unwrap();
        let want = pca_reference(&x, b, d, k).unwrap();
        let optimal: f64 = want.eigenvalues[k..].iter().map(|v| v.max(0.0)).sum();
        let missed = residual_energy(&x, &got.recon);
        let total: f64 = want.eigenvalues.iter().map(|v| v.max(0.0)).sum();
        assert!(missed <= optimal + 1e-5 * total + 1e-8, "{what}: misses {missed}, optimum {optimal}");
        if b <= k + 1 || what == "repeated inside top k" {
            check_close(&format!("recon {what}"), &got.recon, &want.recon, 1e-4, 1e-4).unwrap();
        }
    }
}

#[test]
fn pca_rejects_bad_shapes() {
    assert!(pca(&[0.0; 12], 3, 4, &PcaOptions { k: 5, ..PcaOptions::default() }).is_err());
    assert!(pca(&[0.0; 12], 3, 5, &PcaOptions::default()).is_err());
    assert!(pca(&[], 0, 4, &PcaOptions { k: 2, ..PcaOptions::default() }).is_err());
}
