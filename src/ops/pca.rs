//! Long-CLIP's primary component matching (methods.md §2.3, eq. 13): centre the batch of features,
//! find the top-k right singular subspace V [D, k] of X_c, reconstruct X̂ = X_c·V·Vᵀ + μ. CPU twin
//! of kernels/pca.cu.
//!
//! Fast path ([`pca`]): subspace (block power) iteration on X_cᵀX_c without forming it:
//! Q₀ = [`start_basis`] (fixed, pseudo-random), then Q ← orth(X_cᵀ(X_c·Q)) for a fixed number of
//! iterations (or until the subspace moves less than `tol`), orth = modified Gram–Schmidt run
//! twice ([`orthonormalize`]). It converges like (λ_{k+1}/λ_k)^iters: exactly the SVD subspace when
//! the spectrum has a gap at k; without a gap it returns a k-dimensional subspace that captures
//! nearly the same energy but is not the SVD's. Columns that vanish (rank(X_c) < k, e.g. B ≤ k or
//! identical rows) are returned as zeros, so every output is finite.
//!
//! Reference ([`pca_reference`]): f64 throughout, an exact symmetric eigendecomposition of
//! X_cᵀX_c by cyclic Jacobi ([`sym_eig`]), eigenvectors sorted by eigenvalue (what the
//! "rewrite PCA to avoid inf" branch of Long-CLIP computes). O(D³) per sweep: meant for tests.
//!
//! The kernels keep the basis transposed (Qt = Vᵀ [k, D], contiguous rows for Gram–Schmidt) and
//! compute Y = X_c·Qtᵀ, Zt = Yᵀ·X_c; the arithmetic per element is the same.
use super::matmul::{gemm, View};
use crate::error::{Error, Result};
use rayon::prelude::*;

/// Columns with a squared norm at or below this are set to zero instead of normalised.
pub const ZERO_NORM2: f32 = 1e-30;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PcaOptions {
    /// Subspace dimension (Long-CLIP: 32).
    pub k: usize,
    /// Maximum number of iterations Q ← orth(X_cᵀX_c·Q).
    pub iters: usize,
    /// Stop early when ‖Q_new − Q_old·(Q_oldᵀQ_new)‖_F / √k ≤ tol (0: always run `iters`).
    pub tol: f32,
    /// Seed of the start basis.
    pub seed: u32,
}

impl Default for PcaOptions {
    fn default() -> Self {
        PcaOptions { k: 32, iters: 20, tol: 0.0, seed: 0 }
    }
}

#[derive(Clone, Debug)]
pub struct Pca {
    /// μ `[D]`
    pub mean: Vec<f32>,
    /// V [D, k] row-major: orthonormal (or zero) columns.
    pub v: Vec<f32>,
    /// X̂ = X_c·V·Vᵀ + μ [B, D]
    pub recon: Vec<f32>,
    /// Iterations run.
    pub iters: usize,
}

#[derive(Clone, Debug)]
pub struct PcaRef {
    pub mean: Vec<f64>,
    /// All D eigenvalues of X_cᵀX_c, descending.
    pub eigenvalues: Vec<f64>,
    /// The top-k eigenvectors [D, k] row-major.
    pub v: Vec<f64>,
    /// X_c·V·Vᵀ + μ [B, D]
    pub recon: Vec<f64>,
}

pub(crate) fn check(len: usize, b: usize, d: usize, k: usize) -> Result<()> {
    if b == 0 || d == 0 || len != b * d {
        return Err(crate::shape_err!("pca: {len} values for a [{b}, {d}] batch"));
    }
    if k == 0 || k > d {
        return Err(Error::msg(format!("pca: k = {k} must be in 1..={d} (the feature width)")));
    }
    Ok(())
}

/// The start basis [D, k]: a murmur3-finalised hash of (seed, d·k + j) mapped exactly to [−1, 1);
/// bit-identical to the kernel `pca_init_f32`.
pub fn start_basis(d: usize, k: usize, seed: u32) -> Vec<f32> {
    (0..(d * k) as u32)
        .map(|e| {
            let mut h = e.wrapping_add(1).wrapping_mul(0x9E37_79B9) ^ seed;
            h ^= h >> 16;
            h = h.wrapping_mul(0x85EB_CA6B);
            h ^= h >> 13;
            h = h.wrapping_mul(0xC2B2_AE35);
            h ^= h >> 16;
            (h >> 8) as f32 * (1.0 / 8_388_608.0) - 1.0
        })
        .collect()
}

/// (μ, X_c) in f32: column sums over rows, rows in order.
pub fn center(x: &[f32], b: usize, d: usize) -> (Vec<f32>, Vec<f32>) {
    let mut mean = vec![0f32; d];
    for r in x.chunks(d) {
        mean.iter_mut().zip(r).for_each(|(m, &v)| *m += v);
    }
    mean.iter_mut().for_each(|m| *m /= b as f32);
    let mut xc = x.to_vec();
    xc.par_chunks_mut(d).for_each(|r| r.iter_mut().zip(&mean).for_each(|(v, m)| *v -= m));
    (mean, xc)
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Orthonormalises the k columns of q [D, k] in place: modified Gram–Schmidt, two sweeps
/// ("twice is enough"); a column with squared norm ≤ [`ZERO_NORM2`] becomes zero. The kernel
/// `pca_orth_f32` does the same operations (with its own summation order).
pub fn orthonormalize(q: &mut [f32], d: usize, k: usize) {
    // columns as contiguous rows of qt [k, D]
    let mut qt = vec![0f32; k * d];
    for (i, row) in q.chunks(k).enumerate() {
        for (j, &v) in row.iter().enumerate() {
            qt[j * d + i] = v;
        }
    }
    for _sweep in 0..2 {
        for j in 0..k {
            let (done, rest) = qt.split_at_mut(j * d);
            let col = &mut rest[..d];
            for prev in done.chunks(d) {
                let c = dot(prev, col);
                col.iter_mut().zip(prev).for_each(|(x, &p)| *x -= c * p);
            }
            let ss = dot(col, col);
            let s = if ss > ZERO_NORM2 { 1.0 / ss.sqrt() } else { 0.0 };
            col.iter_mut().for_each(|x| *x *= s);
        }
    }
    for (i, row) in q.chunks_mut(k).enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            *v = qt[j * d + i];
        }
    }
}

/// The fast path: subspace iteration (see the module docs).
pub fn pca(x: &[f32], b: usize, d: usize, opts: &PcaOptions) -> Result<Pca> {
    let k = opts.k;
    check(x.len(), b, d, k)?;
    let (mean, xc) = center(x, b, d);
    let xv = View::row_major(&xc, b, d);
    let mut q = start_basis(d, k, opts.seed);
    let (mut y, mut z) = (vec![0f32; b * k], vec![0f32; d * k]);
    let mut iters = 0;
    while iters < opts.iters {
        gemm(xv, View::row_major(&q, d, k), &mut y, false);
        gemm(xv.t(), View::row_major(&y, b, k), &mut z, false);
        orthonormalize(&mut z, d, k);
        iters += 1;
        let moved = if opts.tol > 0.0 { subspace_change(&q, &z, d, k) } else { f32::INFINITY };
        std::mem::swap(&mut q, &mut z);
        if moved <= opts.tol {
            break;
        }
    }
    if iters == 0 {
        orthonormalize(&mut q, d, k);
    }
    gemm(xv, View::row_major(&q, d, k), &mut y, false);
    let mut recon = vec![0f32; b * d];
    recon.chunks_mut(d).for_each(|r| r.copy_from_slice(&mean));
    gemm(View::row_major(&y, b, k), View::row_major(&q, d, k).t(), &mut recon, true);
    Ok(Pca { mean, v: q, recon, iters })
}

/// ‖new − old·(oldᵀ·new)‖_F / √k (0 when the spans agree).
fn subspace_change(old: &[f32], new: &[f32], d: usize, k: usize) -> f32 {
    let mut c = vec![0f32; k * k];
    gemm(View::row_major(old, d, k).t(), View::row_major(new, d, k), &mut c, false);
    let mut p = new.to_vec();
    let mut proj = vec![0f32; d * k];
    gemm(View::row_major(old, d, k), View::row_major(&c, k, k), &mut proj, false);
    p.iter_mut().zip(&proj).for_each(|(a, b)| *a -= b);
    (p.iter().map(|v| v * v).sum::<f32>() / k as f32).sqrt()
}

/// Eigen-decomposition of a symmetric n×n matrix (row-major, f64) by cyclic Jacobi rotations.
/// Returns (eigenvalues, eigenvectors as the columns of an n×n row-major matrix), unsorted.
pub fn sym_eig(a: &[f64], n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut a = a.to_vec();
    let mut v = vec![0f64; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    let total: f64 = a.iter().map(|x| x * x).sum();
    for _sweep in 0..60 {
        let off: f64 = (0..n).flat_map(|p| (p + 1..n).map(move |q| (p, q))).map(|(p, q)| a[p * n + q] * a[p * n + q]).sum();
        if off <= 1e-30 * total || off == 0.0 {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                if apq == 0.0 {
                    continue;
                }
                let theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                let t = if theta.abs() > 1e150 { 0.5 / theta } else { theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt()) };
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for r in 0..n {
                    let (x, y) = (a[r * n + p], a[r * n + q]);
                    a[r * n + p] = c * x - s * y;
                    a[r * n + q] = s * x + c * y;
                }
                for r in 0..n {
                    let (x, y) = (a[p * n + r], a[q * n + r]);
                    a[p * n + r] = c * x - s * y;
                    a[q * n + r] = s * x + c * y;
                }
                for r in 0..n {
                    let (x, y) = (v[r * n + p], v[r * n + q]);
                    v[r * n + p] = c * x - s * y;
                    v[r * n + q] = s * x + c * y;
                }
            }
        }
    }
    ((0..n).map(|i| a[i * n + i]).collect(), v)
}

/// The reference: f64 centring, X_cᵀX_c, exact eigendecomposition, top-k eigenvectors.
pub fn pca_reference(x: &[f32], b: usize, d: usize, k: usize) -> Result<PcaRef> {
    check(x.len(), b, d, k)?;
    let mut mean = vec![0f64; d];
    for r in x.chunks(d) {
        mean.iter_mut().zip(r).for_each(|(m, &v)| *m += v as f64);
    }
    mean.iter_mut().for_each(|m| *m /= b as f64);
    let xc: Vec<f64> = x.iter().enumerate().map(|(i, &v)| v as f64 - mean[i % d]).collect();
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
    let eigenvalues: Vec<f64> = order.iter().map(|&i| vals[i]).collect();
    let mut v = vec![0f64; d * k];
    for (col, &src) in order.iter().take(k).enumerate() {
        for r in 0..d {
            v[r * k + col] = vecs[r * d + src];
        }
    }
    let mut recon = vec![0f64; b * d];
    for (row, out) in xc.chunks(d).zip(recon.chunks_mut(d)) {
        let y: Vec<f64> = (0..k).map(|j| (0..d).map(|i| row[i] * v[i * k + j]).sum()).collect();
        for (i, o) in out.iter_mut().enumerate() {
            *o = mean[i] + (0..k).map(|j| y[j] * v[i * k + j]).sum::<f64>();
        }
    }
    Ok(PcaRef { mean, eigenvalues, v, recon })
}
