//! Softmax over the last dim of a contiguous [rows × n] array. Reference: f64. Fast: max-shifted
//! vectorised exp, rows in parallel. A row of all -inf gives zeros (not NaN).
use super::fastmath::{self, par_rows};
use super::reduce::{max_f32, sum_f32};

pub fn softmax_reference(x: &[f32], n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for r in x.chunks(n.max(1)) {
        let m = r.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        if m == f64::NEG_INFINITY {
            out.extend(r.iter().map(|_| 0.0));
            continue;
        }
        let e: Vec<f64> = r.iter().map(|&v| (v as f64 - m).exp()).collect();
        let s: f64 = e.iter().sum();
        out.extend(e.iter().map(|v| (v / s) as f32));
    }
    out
}

/// In-place softmax of one row.
#[inline]
pub fn softmax_row(r: &mut [f32]) {
    let m = max_f32(r);
    if m == f32::NEG_INFINITY {
        r.fill(0.0);
        return;
    }
    for v in r.iter_mut() {
        *v = if *v == f32::NEG_INFINITY { 0.0 } else { fastmath::exp(*v - m) };
    }
    let inv = 1.0 / sum_f32(r);
    r.iter_mut().for_each(|v| *v *= inv);
}

pub fn softmax(x: &[f32], n: usize) -> Vec<f32> {
    let mut out = x.to_vec();
    par_rows(&mut out, n, |_, r| softmax_row(r));
    out
}

/// Backward of the last-dim softmax from its output y: dx = y ⊙ (dy − Σ dy ⊙ y), f64 reference.
pub fn softmax_bwd_reference(y: &[f32], dy: &[f32], n: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(y.len());
    for (r, d) in y.chunks(n.max(1)).zip(dy.chunks(n.max(1))) {
        let s: f64 = r.iter().zip(d).map(|(&a, &b)| a as f64 * b as f64).sum();
        out.extend(r.iter().zip(d).map(|(&a, &b)| a as f64 * (b as f64 - s)));
    }
    out
}

/// Backward of the last-dim softmax (fast, rows in parallel).
pub fn softmax_bwd(y: &[f32], dy: &[f32], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; y.len()];
    par_rows(&mut out, n, |i, o| {
        let (r, d) = (&y[i * n..(i + 1) * n], &dy[i * n..(i + 1) * n]);
        let s: f32 = r.iter().zip(d).map(|(a, b)| a * b).sum();
        o.iter_mut().zip(r.iter().zip(d)).for_each(|(o, (a, b))| *o = a * (b - s));
    });
    out
}
