//! LayerNorm over the last dim: y = (x − mean)/sqrt(var + eps)·γ + β (biased variance, as
//! PyTorch). Reference: f64 two-pass. Fast: f32 two-pass (vectorised), rows in parallel; also
//! returns per-row mean and 1/std, which the backward pass needs.
use super::fastmath::par_rows;
use super::reduce::sum_f32;

pub fn layer_norm_reference(x: &[f32], n: usize, gamma: &[f32], beta: &[f32], eps: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for r in x.chunks(n) {
        let mean = r.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        let var = r.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n as f64;
        let rstd = 1.0 / (var + eps as f64).sqrt();
        out.extend(r.iter().zip(gamma).zip(beta).map(|((&v, &g), &b)| ((v as f64 - mean) * rstd * g as f64 + b as f64) as f32));
    }
    out
}

/// One row: writes y and returns (mean, rstd).
#[inline]
pub fn layer_norm_row(x: &[f32], y: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = sum_f32(x) / n;
    let mut acc = [0f32; 16];
    let mut ch = x.chunks_exact(16);
    for c in &mut ch {
        for i in 0..16 {
            let d = c[i] - mean;
            acc[i] += d * d;
        }
    }
    let var = (acc.iter().sum::<f32>() + ch.remainder().iter().map(|v| (v - mean) * (v - mean)).sum::<f32>()) / n;
    let rstd = 1.0 / (var + eps).sqrt();
    for (((o, &v), &g), &b) in y.iter_mut().zip(x).zip(gamma).zip(beta) {
        *o = (v - mean) * rstd * g + b;
    }
    (mean, rstd)
}

/// Rows of width n normalised, scaled by γ and shifted by β (x.len() a multiple of n; γ, β ≥ n).
pub fn layer_norm(x: &[f32], n: usize, gamma: &[f32], beta: &[f32], eps: f32) -> Vec<f32> {
    if x.is_empty() {
        return Vec::new();
    }
    assert!(n > 0 && x.len().is_multiple_of(n) && gamma.len() >= n && beta.len() >= n, "layer_norm: rows of {n}, γ and β of ≥ {n} values");
    let fill = |out: &mut [f32]| -> Result<(), std::convert::Infallible> {
        par_rows(out, n, |i, y| {
            layer_norm_row(&x[i * n..(i + 1) * n], y, gamma, beta, eps);
        });
        Ok(())
    };
    // SAFETY: par_rows hands every one of the x.len() / n rows to `layer_norm_row`, which writes
    // all n values of its row (x, γ and β hold ≥ n: asserted) and reads none of them.
    match unsafe { super::fastmath::written_by(x.len(), fill) } {
        Ok(out) => out,
        Err(never) => match never {},
    }
}

/// Backward of [`layer_norm`], reference in f64: with x̂ = (x − μ)·r, g = dy·γ,
/// dx = r·(g − mean(g) − x̂·mean(g·x̂)), dγ = Σ_rows dy·x̂, dβ = Σ_rows dy.
pub fn layer_norm_bwd_reference(x: &[f32], n: usize, gamma: &[f32], dy: &[f32], eps: f32) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mut dx, mut dg, mut db) = (Vec::with_capacity(x.len()), vec![0f64; n], vec![0f64; n]);
    for (r, d) in x.chunks(n).zip(dy.chunks(n)) {
        let mean = r.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        let var = r.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n as f64;
        let rstd = 1.0 / (var + eps as f64).sqrt();
        let xh: Vec<f64> = r.iter().map(|&v| (v as f64 - mean) * rstd).collect();
        let g: Vec<f64> = d.iter().zip(gamma).map(|(&a, &b)| a as f64 * b as f64).collect();
        let mg = g.iter().sum::<f64>() / n as f64;
        let mgx = g.iter().zip(&xh).map(|(a, b)| a * b).sum::<f64>() / n as f64;
        for j in 0..n {
            dx.push(rstd * (g[j] - mg - xh[j] * mgx));
            dg[j] += d[j] as f64 * xh[j];
            db[j] += d[j] as f64;
        }
    }
    (dx, dg, db)
}

/// Backward of [`layer_norm`] (fast): dx rows in parallel (statistics recomputed per row), dγ and
/// dβ accumulated over row blocks in parallel, then summed. Returns (dx, dγ, dβ).
pub fn layer_norm_bwd(x: &[f32], n: usize, gamma: &[f32], dy: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    use rayon::prelude::*;
    let mut dx = super::fastmath::zeros(x.len());
    par_rows(&mut dx, n, |i, out| {
        let (r, d) = (&x[i * n..(i + 1) * n], &dy[i * n..(i + 1) * n]);
        let mean = sum_f32(r) / n as f32;
        let var = r.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n as f32;
        let rstd = 1.0 / (var + eps).sqrt();
        let (mut sg, mut sgx) = (0f32, 0f32);
        for j in 0..n {
            let g = d[j] * gamma[j];
            sg += g;
            sgx += g * (r[j] - mean) * rstd;
        }
        let (mg, mgx) = (sg / n as f32, sgx / n as f32);
        for j in 0..n {
            out[j] = rstd * (d[j] * gamma[j] - mg - (r[j] - mean) * rstd * mgx);
        }
    });
    let rows = x.len().checked_div(n).unwrap_or(0);
    let block = 64;
    let (dg, db) = (0..rows.div_ceil(block))
        .into_par_iter()
        .map(|c| {
            let (mut dg, mut db) = (vec![0f32; n], vec![0f32; n]);
            for i in c * block..((c + 1) * block).min(rows) {
                let (r, d) = (&x[i * n..(i + 1) * n], &dy[i * n..(i + 1) * n]);
                let mean = sum_f32(r) / n as f32;
                let var = r.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n as f32;
                let rstd = 1.0 / (var + eps).sqrt();
                for j in 0..n {
                    dg[j] += d[j] * (r[j] - mean) * rstd;
                    db[j] += d[j];
                }
            }
            (dg, db)
        })
        .collect::<Vec<_>>()
        .into_iter()
        // the 64-row partials summed in row order: the same bits whatever the threads did (a
        // parallel reduce's tree follows work stealing, so its float sums vary run to run)
        .fold((vec![0f32; n], vec![0f32; n]), |(mut a, mut b), (c, d)| {
            a.iter_mut().zip(&c).for_each(|(x, y)| *x += y);
            b.iter_mut().zip(&d).for_each(|(x, y)| *x += y);
            (a, b)
        });
    (dx, dg, db)
}
