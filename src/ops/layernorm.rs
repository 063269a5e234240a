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

pub fn layer_norm(x: &[f32], n: usize, gamma: &[f32], beta: &[f32], eps: f32) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    par_rows(&mut out, n, |i, y| {
        layer_norm_row(&x[i * n..(i + 1) * n], y, gamma, beta, eps);
    });
    out
}
