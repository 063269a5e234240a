//! The PCA reconstruction with its gradient (Long-CLIP's primary component matching, methods.md
//! §2.3): X̂ = X_c·P + μ with P = U_k·U_kᵀ the projector on the top-k eigenvectors of
//! C = X_cᵀX_c (the top-k right singular subspace of X_c, as `torch.linalg.svd` gives it).
//!
//! Backward, for G = ∂L/∂X̂ [B, D]: P depends on C only through its top-k eigenspace, and first-
//! order perturbation theory gives ∂L/∂C = M = Σ_{i∈top, j∉top} w_ji·u_j·u_iᵀ with
//! w_ji = u_jᵀ(A + Aᵀ)u_i / (λ_i − λ_j), A = X_cᵀG. Then
//!   ∂L/∂X_c = G·P + X_c·(M + Mᵀ),   ∂L/∂X = ∂L/∂X_c − 1·mean_rows(∂L/∂X_c) + 1·mean_rows(G).
//! Pairs within the top-k never appear (P is invariant to rotations inside the subspace), so
//! repeated eigenvalues there are harmless; a pair across the boundary with λ_i − λ_j ≤
//! 1e-9·λ_max (a degenerate boundary: the subspace is not differentiable there) contributes 0.
//! Null directions (batch ≤ k, identical rows) have zero numerators, so the result stays finite
//! — where `torch.linalg.svd`'s backward gives NaN — and with rank(X_c) ≤ k it is exactly
//! ∂L/∂X = G (then X̂ = X). The fast path does the D×D eigendecomposition with faer in f64 and
//! never forms a D×D product other than C; the reference uses Jacobi and explicit sums.
use super::pca::{check, sym_eig};
use crate::error::{Error, Result};
use faer::Mat;

/// What the backward needs from the forward (all f64).
#[derive(Clone, Debug)]
pub struct PcaCache {
    pub b: usize,
    pub d: usize,
    pub k: usize,
    /// X_c [B, D]
    pub xc: Mat<f64>,
    /// Eigenvalues of X_cᵀX_c, descending `[D]`.
    pub evals: Vec<f64>,
    /// Eigenvectors as columns, in the order of `evals` [D, D].
    pub evecs: Mat<f64>,
}

/// Whether the pair (λ_i in the top, λ_j outside) is too close to differentiate.
fn degenerate(li: f64, lj: f64, lmax: f64) -> bool {
    li - lj <= 1e-9 * lmax.max(f64::MIN_POSITIVE)
}

/// X̂ = X_c·U_k·U_kᵀ + μ for x [B, D] with the exact top-k eigenvectors, and the backward's cache.
pub fn pca_reconstruct(x: &[f32], b: usize, d: usize, k: usize) -> Result<(Vec<f32>, PcaCache)> {
    check(x.len(), b, d, k)?;
    if x.iter().any(|v| !v.is_finite()) {
        // NaN in, NaN out (the trainer's non-finite-loss stop reports it), never an eig failure
        let nan = Mat::<f64>::from_fn(b, d, |_, _| f64::NAN);
        let evecs = Mat::<f64>::from_fn(d, d, |i, j| if i == j { 1.0 } else { 0.0 });
        return Ok((vec![f32::NAN; b * d], PcaCache { b, d, k, xc: nan, evals: vec![f64::NAN; d], evecs }));
    }
    let mut mean = vec![0f64; d];
    for r in x.chunks(d) {
        mean.iter_mut().zip(r).for_each(|(m, &v)| *m += v as f64);
    }
    mean.iter_mut().for_each(|m| *m /= b as f64);
    let xc = Mat::<f64>::from_fn(b, d, |i, j| x[i * d + j] as f64 - mean[j]);
    let c = xc.transpose() * &xc; // [D, D]
    let eig = c.self_adjoint_eigen(faer::Side::Lower).map_err(|e| Error::msg(format!("pca: eigendecomposition failed: {e:?}")))?;
    let (s, u) = (eig.S().column_vector(), eig.U());
    // faer sorts ascending: reverse to descending
    let evals: Vec<f64> = (0..d).rev().map(|i| s[i]).collect();
    let evecs = Mat::<f64>::from_fn(d, d, |r, c| u[(r, d - 1 - c)]);
    let top = evecs.subcols(0, k);
    let recon = (&xc * top) * top.transpose(); // [B, D]
    let out = (0..b * d).map(|i| (recon[(i / d, i % d)] + mean[i % d]) as f32).collect();
    Ok((out, PcaCache { b, d, k, xc, evals, evecs }))
}

/// ∂L/∂X from G = ∂L/∂X̂ (see the module docs).
pub fn pca_reconstruct_bwd(c: &PcaCache, g: &[f32]) -> Result<Vec<f32>> {
    let (b, d, k) = (c.b, c.d, c.k);
    if g.len() != b * d {
        return Err(crate::shape_err!("pca backward: {} gradient values for a [{b}, {d}] batch", g.len()));
    }
    let gm = Mat::<f64>::from_fn(b, d, |i, j| g[i * d + j] as f64);
    let (top, rest) = (c.evecs.subcols(0, k), c.evecs.subcols(k, d - k));
    let xu = &c.xc * top; // [B, k]
    let gu = &gm * top; // [B, k]
                        // T = U_restᵀ (A + Aᵀ) U_top with A = X_cᵀG: A·U_top = X_cᵀ(G·U_top), Aᵀ·U_top = Gᵀ(X_c·U_top)
    let su = c.xc.transpose() * &gu + gm.transpose() * &xu; // [D, k]
    let t = rest.transpose() * &su; // [D−k, k]
    let lmax = c.evals[0];
    let w = Mat::<f64>::from_fn(d - k, k, |j, i| {
        let (li, lj) = (c.evals[i], c.evals[k + j]);
        if degenerate(li, lj, lmax) {
            0.0
        } else {
            t[(j, i)] / (li - lj)
        }
    });
    // dX_c = G·P + X_c·M + X_c·Mᵀ with M = U_rest·W·U_topᵀ
    let xr = &c.xc * rest; // [B, D−k]
    let dxc = &gu * top.transpose() + (&xr * &w) * top.transpose() + (&xu * w.transpose()) * rest.transpose(); // [B, D]
    let mut mean_dxc = vec![0f64; d];
    let mut mean_g = vec![0f64; d];
    for i in 0..b {
        for j in 0..d {
            mean_dxc[j] += dxc[(i, j)] / b as f64;
            mean_g[j] += gm[(i, j)] / b as f64;
        }
    }
    Ok((0..b * d).map(|e| (dxc[(e / d, e % d)] - mean_dxc[e % d] + mean_g[e % d]) as f32).collect())
}

/// The reference backward: f64 throughout, Jacobi eigendecomposition, the sums of the module
/// docs written out element by element. For tests (O(D³) per Jacobi sweep, O(B·D²·k) sums).
pub fn pca_reconstruct_bwd_reference(x: &[f64], b: usize, d: usize, k: usize, g: &[f64]) -> Result<Vec<f64>> {
    check(x.len(), b, d, k)?;
    let mean: Vec<f64> = (0..d).map(|j| (0..b).map(|i| x[i * d + j]).sum::<f64>() / b as f64).collect();
    let xc: Vec<f64> = (0..b * d).map(|e| x[e] - mean[e % d]).collect();
    let mut cm = vec![0f64; d * d];
    for r in xc.chunks(d) {
        for i in 0..d {
            for j in 0..d {
                cm[i * d + j] += r[i] * r[j];
            }
        }
    }
    let (vals, vecs) = sym_eig(&cm, d);
    let mut order: Vec<usize> = (0..d).collect();
    order.sort_by(|&i, &j| vals[j].total_cmp(&vals[i]));
    let u = |r: usize, c: usize| vecs[r * d + order[c]];
    let lam = |c: usize| vals[order[c]];
    // A = X_cᵀG [D, D]
    let mut a = vec![0f64; d * d];
    for row in 0..b {
        for p in 0..d {
            for q in 0..d {
                a[p * d + q] += xc[row * d + p] * g[row * d + q];
            }
        }
    }
    // M = Σ_{i∈top, j∉top} w_ji u_j u_iᵀ
    let mut m = vec![0f64; d * d];
    for i in 0..k {
        for j in k..d {
            if degenerate(lam(i), lam(j), lam(0)) {
                continue;
            }
            let mut s = 0.0;
            for p in 0..d {
                for q in 0..d {
                    s += u(p, j) * (a[p * d + q] + a[q * d + p]) * u(q, i);
                }
            }
            let w = s / (lam(i) - lam(j));
            for p in 0..d {
                for q in 0..d {
                    m[p * d + q] += w * u(p, j) * u(q, i);
                }
            }
        }
    }
    // dX_c = G·P + X_c·(M + Mᵀ)
    let mut dxc = vec![0f64; b * d];
    for row in 0..b {
        for q in 0..d {
            let mut s = 0.0;
            for p in 0..d {
                let proj: f64 = (0..k).map(|c| u(p, c) * u(q, c)).sum();
                s += g[row * d + p] * proj + xc[row * d + p] * (m[p * d + q] + m[q * d + p]);
            }
            dxc[row * d + q] = s;
        }
    }
    let mean_dxc: Vec<f64> = (0..d).map(|j| (0..b).map(|i| dxc[i * d + j]).sum::<f64>() / b as f64).collect();
    let mean_g: Vec<f64> = (0..d).map(|j| (0..b).map(|i| g[i * d + j]).sum::<f64>() / b as f64).collect();
    Ok((0..b * d).map(|e| dxc[e] - mean_dxc[e % d] + mean_g[e % d]).collect())
}
