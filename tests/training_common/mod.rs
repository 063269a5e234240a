//! Inputs shared by the training-op tests (ops_training, cuda_training, grad_training): stretch
//! configurations, position ids, contrastive-style logits, and batches with a prescribed spectrum
//! for PCA. Needs `mod emu_common;` next to it (for Rng).
#![allow(dead_code)]
use super::emu_common::Rng;
use clipforge::ops::pos_gather::Stretch;
use clipforge::{Error, Result};

/// Stretch configurations: Long-CLIP's, a small odd one, keep = L−1 (no interpolated rows),
/// keep = 0, the identity (ratio 1) and the smallest table (L = 2).
pub fn stretches() -> Vec<Stretch> {
    [(77, 20, 4), (7, 2, 3), (5, 4, 2), (9, 0, 5), (6, 3, 1), (2, 1, 4)].iter().map(|&(l, k, r)| Stretch::new(l, k, r).unwrap()).collect()
}

/// `rows` position ids in [0, Ln): every position once while rows allow (in a shuffled order),
/// then random repeats, so the tail and the kept rows are always hit when rows ≥ Ln.
pub fn positions(rows: usize, s: Stretch, seed: u64) -> Vec<u32> {
    let ln = s.new_len() as u32;
    let mut rng = Rng::new(seed);
    let mut pos: Vec<u32> = (0..rows as u32).map(|n| if n < ln { n } else { (rng.next_u64() % ln as u64) as u32 }).collect();
    for i in (1..pos.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        pos.swap(i, j);
    }
    pos
}

/// Logits like τ·cos (τ = 100): uniform in ±`spread`, a few rows with one dominant entry.
pub fn logits(rows: usize, classes: usize, spread: f32, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    let mut x = rng.vec(rows * classes, -spread, spread);
    for r in (0..rows).step_by(3) {
        x[r * classes + (r * 7) % classes] = 3.0 * spread;
    }
    x
}

pub fn targets(rows: usize, classes: usize, seed: u64) -> Vec<u32> {
    let mut rng = Rng::new(seed);
    (0..rows).map(|i| if i % 2 == 0 { (i % classes) as u32 } else { (rng.next_u64() % classes as u64) as u32 }).collect()
}

/// Orthonormal columns [n, r] (row-major), also orthogonal to the columns of `against` ([n, a]).
fn orthonormal(n: usize, r: usize, against: &[Vec<f64>], rng: &mut Rng) -> Vec<Vec<f64>> {
    let mut cols: Vec<Vec<f64>> = against.to_vec();
    let skip = cols.len();
    while cols.len() < skip + r {
        let mut v: Vec<f64> = (0..n).map(|_| rng.uniform(-1.0, 1.0) as f64).collect();
        for _ in 0..2 {
            for c in &cols {
                let d: f64 = c.iter().zip(&v).map(|(a, b)| a * b).sum();
                v.iter_mut().zip(c).for_each(|(x, y)| *x -= d * y);
            }
        }
        let nrm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        if nrm > 1e-6 {
            cols.push(v.iter().map(|x| x / nrm).collect());
        }
    }
    cols.split_off(skip)
}

/// X [b, d] = U·diag(sigma)·Vᵀ + μ (f64, then rounded to f32), U ⟂ 1 so that the centred X has
/// exactly the singular values `sigma` (len ≤ min(b−1, d)) before rounding.
pub fn spectral_batch(b: usize, d: usize, sigma: &[f64], seed: u64) -> Vec<f32> {
    assert!(sigma.len() < b && sigma.len() <= d);
    let mut rng = Rng::new(seed);
    let ones = vec![vec![1.0 / (b as f64).sqrt(); b]];
    let u = orthonormal(b, sigma.len(), &ones, &mut rng);
    let v = orthonormal(d, sigma.len(), &[], &mut rng);
    let mu: Vec<f64> = (0..d).map(|_| rng.uniform(-0.5, 0.5) as f64).collect();
    let mut x = vec![0f32; b * d];
    for i in 0..b {
        for j in 0..d {
            let s: f64 = (0..sigma.len()).map(|t| u[t][i] * sigma[t] * v[t][j]).sum();
            x[i * d + j] = (s + mu[j]) as f32;
        }
    }
    x
}

/// Singular values with a clear gap at k: 10 → 5 for the top k, then ≤ 0.5 (eigenvalue ratio
/// λ_{k+1}/λ_k ≤ 0.01), `rank` values in all.
pub fn gapped_sigma(k: usize, rank: usize) -> Vec<f64> {
    (0..rank).map(|i| if i < k { 10.0 - 5.0 * i as f64 / k as f64 } else { 0.5 * (1.0 - (i - k) as f64 / (rank - k + 1) as f64) }).collect()
}

/// Projector V·Vᵀ [d, d] of V [d, k].
pub fn projector<T: Copy + Into<f64>>(v: &[T], d: usize, k: usize) -> Vec<f64> {
    let mut p = vec![0f64; d * d];
    for i in 0..d {
        for j in 0..d {
            p[i * d + j] = (0..k).map(|t| v[i * k + t].into() * v[j * k + t].into()).sum();
        }
    }
    p
}

/// Err unless every column of V [d, k] has norm 1 or 0 and distinct columns are orthogonal (to tol).
pub fn check_orthonormal_or_zero(v: &[f32], d: usize, k: usize, tol: f64) -> Result<()> {
    for a in 0..k {
        for b in a..k {
            let g: f64 = (0..d).map(|i| v[i * k + a] as f64 * v[i * k + b] as f64).sum();
            let ok = if a == b { (g - 1.0).abs() <= tol || g.abs() <= tol } else { g.abs() <= tol };
            if !ok {
                return Err(Error::msg(format!("VᵀV[{a},{b}] = {g}")));
            }
        }
    }
    Ok(())
}

/// Σ ‖x_c,i − x_c,i·V·Vᵀ‖² (the energy the subspace misses), from X and the reconstruction.
pub fn residual_energy(x: &[f32], recon: &[f32]) -> f64 {
    x.iter().zip(recon).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum()
}
