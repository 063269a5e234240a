//! LayerNorm over the last dim: y = (x − mean)/sqrt(var + eps)·γ + β (biased variance, as
//! PyTorch). Reference: f64 two-pass. Fast: f32 two-pass (vectorised), rows in parallel; the
//! backward in one pass over blocks of rows (dx, and each block's dγ, dβ partial), sums in fixed order.
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

/// A row's (mean, 1/std): mean by 16 running sums, the biased variance by 16 running sums of
/// (x − mean)² — two passes, a fixed order (the forward and the backward share it, so the backward
/// sees the forward's statistics bit for bit).
#[inline]
pub fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
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
    (mean, 1.0 / (var + eps).sqrt())
}

/// One row: writes y and returns (mean, rstd).
#[inline]
pub fn layer_norm_row(x: &[f32], y: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) -> (f32, f32) {
    let (mean, rstd) = row_stats(x, eps);
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
    let fill = |out: &mut [f32]| {
        par_rows(out, n, |i, y| {
            layer_norm_row(&x[i * n..(i + 1) * n], y, gamma, beta, eps);
        })
    };
    // SAFETY: par_rows hands every one of the x.len() / n rows to `layer_norm_row`, which writes
    // all n values of its row (x, γ and β hold ≥ n: asserted) and reads none of them.
    unsafe { super::fastmath::written(x.len(), fill) }
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

/// Rows per task of the backward: each task sums its rows' dγ, dβ into one partial, and the
/// partials are added in row order — a fixed block, so the bits do not depend on the thread count.
const BWD_BLOCK: usize = 32;

/// One row of the backward: dx written, dy·x̂ and dy added into dγ, dβ. Sums in 16 lanes (fixed
/// order), statistics as the forward's.
#[inline]
fn layer_norm_bwd_row(r: &[f32], d: &[f32], gamma: &[f32], eps: f32, dx: &mut [f32], dg: &mut [f32], db: &mut [f32]) {
    let n = r.len();
    let (mean, rstd) = row_stats(r, eps);
    let (mut sg, mut sgx) = ([0f32; 16], [0f32; 16]);
    let body = n - n % 16;
    for j0 in (0..body).step_by(16) {
        for i in 0..16 {
            let g = d[j0 + i] * gamma[j0 + i];
            sg[i] += g;
            sgx[i] += g * ((r[j0 + i] - mean) * rstd);
        }
    }
    let (mut tg, mut tgx) = (0f32, 0f32);
    for j in body..n {
        let g = d[j] * gamma[j];
        tg += g;
        tgx += g * ((r[j] - mean) * rstd);
    }
    let mg = (sg.iter().sum::<f32>() + tg) / n as f32;
    let mgx = (sgx.iter().sum::<f32>() + tgx) / n as f32;
    for j in 0..n {
        let xh = (r[j] - mean) * rstd;
        dx[j] = rstd * (d[j] * gamma[j] - mg - xh * mgx);
        dg[j] += d[j] * xh;
        db[j] += d[j];
    }
}

/// Backward of [`layer_norm`] (fast), one pass: blocks of `BWD_BLOCK` rows in parallel, each
/// row's statistics computed once, its dx written and its dγ, dβ terms added into the block's
/// partial; the partials summed in block order. Returns (dx, dγ, dβ).
pub fn layer_norm_bwd(x: &[f32], n: usize, gamma: &[f32], dy: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    use rayon::prelude::*;
    if x.is_empty() || n == 0 {
        return (Vec::new(), vec![0f32; n], vec![0f32; n]);
    }
    assert!(x.len().is_multiple_of(n) && dy.len() >= x.len() && gamma.len() >= n, "layer_norm_bwd: rows of {n}, dy as x, γ of ≥ {n} values");
    let mut partials = Vec::new();
    let fill = |dx: &mut [f32]| {
        partials = dx
            .par_chunks_mut(BWD_BLOCK * n)
            .enumerate()
            .map(|(c, out)| {
                let (mut dg, mut db) = (vec![0f32; n], vec![0f32; n]);
                for (i, o) in out.chunks_mut(n).enumerate() {
                    let at = (c * BWD_BLOCK + i) * n;
                    layer_norm_bwd_row(&x[at..at + n], &dy[at..at + n], &gamma[..n], eps, o, &mut dg, &mut db);
                }
                (dg, db)
            })
            .collect::<Vec<_>>();
    };
    // SAFETY: the chunks cover dx; every row of every chunk is written in full by
    // `layer_norm_bwd_row` (x and dy hold the rows: asserted), which reads no value of dx.
    let dx = unsafe { super::fastmath::written(x.len(), fill) };
    // the partials summed in row order: the same bits whatever the threads did (a parallel
    // reduce's tree follows work stealing, so its float sums vary run to run)
    let mut parts = partials.into_iter();
    let (mut dg, mut db) = parts.next().unwrap_or_else(|| (vec![0f32; n], vec![0f32; n]));
    for (c, d) in parts {
        dg.iter_mut().zip(&c).for_each(|(a, b)| *a += b);
        db.iter_mut().zip(&d).for_each(|(a, b)| *a += b);
    }
    (dx, dg, db)
}
