//! The PCA reconstruction gradient (src/ops/pca_grad.rs): the f64 reference against central
//! finite differences, the fast path against the reference and against PyTorch autograd through
//! torch.linalg.svd (tests/fixtures/pca_grad.safetensors, scripts/make_pca_fixture.py), the
//! subspace-iteration forward against the exact reconstruction when the spectrum has a gap at 32,
//! and finite, sensible gradients on degenerate batches (batch ≤ k, identical rows, repeated
//! eigenvalues) where the SVD backward is NaN.
use clipforge::model::synthetic::Rng;
use clipforge::model::Weights;
use clipforge::ops::pca::{pca, sym_eig, PcaOptions};
use clipforge::ops::pca_grad::{pca_reconstruct, pca_reconstruct_bwd, pca_reconstruct_bwd_reference};

/// Data with a decaying spectrum (column j scaled by `scale(j)`).
fn data(b: usize, d: usize, seed: u64, scale: impl Fn(usize) -> f32) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..b * d).map(|i| r.normal() * scale(i % d)).collect()
}

/// X̂ in f64 (Jacobi eigenvectors), independent of the code under test.
fn recon64(x: &[f64], b: usize, d: usize, k: usize) -> Vec<f64> {
    let mean: Vec<f64> = (0..d).map(|j| (0..b).map(|i| x[i * d + j]).sum::<f64>() / b as f64).collect();
    let xc: Vec<f64> = (0..b * d).map(|e| x[e] - mean[e % d]).collect();
    let mut c = vec![0f64; d * d];
    for r in xc.chunks(d) {
        for i in 0..d {
            for j in 0..d {
                c[i * d + j] += r[i] * r[j];
            }
        }
    }
    let (vals, vecs) = sym_eig(&c, d);
    let mut order: Vec<usize> = (0..d).collect();
    order.sort_by(|&i, &j| vals[j].total_cmp(&vals[i]));
    (0..b * d)
        .map(|e| {
            let (row, q) = (e / d, e % d);
            mean[q] + (0..k).map(|c| (0..d).map(|p| xc[row * d + p] * vecs[p * d + order[c]]).sum::<f64>() * vecs[q * d + order[c]]).sum::<f64>()
        })
        .collect()
}

fn close(what: &str, got: &[f32], want: &[f64], atol: f64, rtol: f64) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(g.is_finite() && (g as f64 - w).abs() <= atol + rtol * w.abs(), "{what}[{i}]: {g} vs {w}");
    }
}

#[test]
fn reference_matches_finite_differences_and_fast_matches_reference() {
    for (b, d, k) in [(7, 5, 2), (45, 13, 4), (9, 20, 3)] {
        let x32 = data(b, d, (b * d) as u64, |j| 3.0 / (1.0 + j as f32));
        let x: Vec<f64> = x32.iter().map(|&v| v as f64).collect();
        let g: Vec<f64> = data(b, d, 7, |_| 1.0).iter().map(|&v| v as f64).collect();
        let reference = pca_reconstruct_bwd_reference(&x, b, d, k, &g).unwrap();
        let mut xp = x.clone();
        for e in 0..b * d {
            let h = 1e-6;
            let x0 = xp[e];
            xp[e] = x0 + h;
            let up: f64 = recon64(&xp, b, d, k).iter().zip(&g).map(|(a, c)| a * c).sum();
            xp[e] = x0 - h;
            let down: f64 = recon64(&xp, b, d, k).iter().zip(&g).map(|(a, c)| a * c).sum();
            xp[e] = x0;
            let fd = (up - down) / (2.0 * h);
            assert!((reference[e] - fd).abs() <= 1e-5 + 1e-5 * fd.abs(), "B{b} D{d} k{k} dX[{e}]: reference {} vs finite differences {fd}", reference[e]);
        }
        let (_, cache) = pca_reconstruct(&x32, b, d, k).unwrap();
        let g32: Vec<f32> = g.iter().map(|&v| v as f32).collect();
        close(&format!("fast vs reference B{b} D{d} k{k}"), &pca_reconstruct_bwd(&cache, &g32).unwrap(), &reference, 1e-5, 1e-4);
    }
}

#[test]
fn matches_pytorch_autograd_through_svd() {
    let w = Weights::open(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pca_grad.safetensors")).unwrap();
    for (case, k) in [("b64_d48_k32", 32), ("b40_d64_k32", 32), ("b9_d20_k3", 3)] {
        let x = w.get(&format!("{case}.x")).unwrap();
        let (b, d) = (x.dim(0), x.dim(1));
        let g = w.get(&format!("{case}.g")).unwrap().to_vec_f32();
        let (r, cache) = pca_reconstruct(&x.to_vec_f32(), b, d, k).unwrap();
        let want_r: Vec<f64> = w.get(&format!("{case}.r")).unwrap().to_vec_f32().iter().map(|&v| v as f64).collect();
        let want_dx: Vec<f64> = w.get(&format!("{case}.dx")).unwrap().to_vec_f32().iter().map(|&v| v as f64).collect();
        let sr = want_r.iter().fold(0f64, |m, v| m.max(v.abs()));
        close(&format!("{case} reconstruction"), &r, &want_r, 1e-5 * sr, 1e-4);
        let sdx = want_dx.iter().fold(0f64, |m, v| m.max(v.abs()));
        close(&format!("{case} gradient"), &pca_reconstruct_bwd(&cache, &g).unwrap(), &want_dx, 1e-3 * sdx, 1e-3);
    }
}

#[test]
fn subspace_iteration_equals_the_svd_reconstruction_with_a_gap_at_32() {
    let (b, d, k) = (256, 96, 32);
    let x = data(b, d, 3, |j| if j < 32 { 4.0 - 0.05 * j as f32 } else { 0.5 - 0.003 * j as f32 });
    let (exact, _) = pca_reconstruct(&x, b, d, k).unwrap();
    let it = pca(&x, b, d, &PcaOptions { k, iters: 30, tol: 0.0, seed: 1 }).unwrap();
    let exact64: Vec<f64> = exact.iter().map(|&v| v as f64).collect();
    close("subspace iteration vs exact", &it.recon, &exact64, 1e-4, 1e-4);
}

#[test]
fn degenerate_batches_give_finite_gradients() {
    let g = data(20, 24, 11, |_| 1.0);
    // batch ≤ k: X̂ = X, so dX = G exactly
    let x = data(20, 24, 12, |_| 1.0);
    let (r, c) = pca_reconstruct(&x, 20, 24, 24).unwrap();
    close("batch<=k reconstruction", &r, &x.iter().map(|&v| v as f64).collect::<Vec<_>>(), 1e-5, 1e-5);
    let (_, c2) = pca_reconstruct(&x, 20, 24, 21).unwrap(); // rank 19 < 21
    for cache in [&c, &c2] {
        close("batch<=k gradient", &pca_reconstruct_bwd(cache, &g).unwrap(), &g.iter().map(|&v| v as f64).collect::<Vec<_>>(), 1e-4, 1e-4);
    }
    // identical rows (X_c = 0) and repeated eigenvalues across the boundary: finite
    let same: Vec<f32> = (0..20 * 24).map(|i| (i % 24) as f32 * 0.1).collect();
    let mut rep = vec![0f32; 20 * 24]; // rows ±e_j: equal eigenvalues everywhere
    for i in 0..20 {
        rep[i * 24 + i % 12] = if i < 12 { 1.0 } else { -1.0 };
    }
    for (what, x) in [("identical rows", same), ("repeated eigenvalues", rep)] {
        let (r, c) = pca_reconstruct(&x, 20, 24, 4).unwrap();
        let dx = pca_reconstruct_bwd(&c, &g).unwrap();
        assert!(r.iter().chain(&dx).all(|v| v.is_finite()), "{what}: non-finite values");
    }
    assert!(pca_reconstruct(&x, 20, 24, 0).is_err());
    assert!(pca_reconstruct(&x[..10], 20, 24, 4).is_err());
}
