//! Linear probe (the CLIP paper's protocol): L2-regularised multinomial logistic regression on
//! frozen image features, loss = mean cross-entropy + (λ/2)·‖W‖² (bias not regularised), fitted
//! by L-BFGS (memory 10, Armijo backtracking) in f64. λ is chosen on a validation split of the
//! training set (every 5th image of each class, at least one) over a log-spaced sweep, then the
//! probe is refitted on the whole training set with the chosen λ.
use crate::error::{Error, Result};

/// Weights [D + 1, C] (last row: bias), row-major.
pub struct Probe {
    pub d: usize,
    pub c: usize,
    pub w: Vec<f64>,
    pub lambda: f64,
}

/// Loss and gradient of the regularised softmax regression at `w`.
fn loss_grad(x: &[f32], y: &[usize], d: usize, c: usize, lambda: f64, w: &[f64], g: &mut [f64]) -> f64 {
    let n = y.len();
    g.iter_mut().for_each(|v| *v = 0.0);
    let mut loss = 0.0;
    let mut z = vec![0f64; c];
    for i in 0..n {
        let xi = &x[i * d..(i + 1) * d];
        for k in 0..c {
            z[k] = w[d * c + k] + (0..d).map(|j| xi[j] as f64 * w[j * c + k]).sum::<f64>();
        }
        let m = z.iter().cloned().fold(f64::MIN, f64::max);
        let s: f64 = z.iter().map(|v| (v - m).exp()).sum();
        let lse = m + s.ln();
        loss += lse - z[y[i]];
        for k in 0..c {
            let p = (z[k] - lse).exp() - (k == y[i]) as u8 as f64;
            for j in 0..d {
                g[j * c + k] += p * xi[j] as f64;
            }
            g[d * c + k] += p;
        }
    }
    let inv = 1.0 / n.max(1) as f64;
    g.iter_mut().for_each(|v| *v *= inv);
    let mut reg = 0.0;
    for j in 0..d * c {
        reg += w[j] * w[j];
        g[j] += lambda * w[j];
    }
    loss * inv + 0.5 * lambda * reg
}

fn dotp(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Fits the probe on features x [N, D] with labels in 0..c.
pub fn fit(x: &[f32], y: &[usize], d: usize, c: usize, lambda: f64, iters: usize) -> Probe {
    let nw = (d + 1) * c;
    let mut w = vec![0f64; nw];
    let mut g = vec![0f64; nw];
    let mut f = loss_grad(x, y, d, c, lambda, &w, &mut g);
    let (mut s_hist, mut y_hist): (Vec<Vec<f64>>, Vec<Vec<f64>>) = (vec![], vec![]);
    for _ in 0..iters {
        // two-loop recursion: direction = −H·g
        let mut q = g.clone();
        let mut alpha = vec![0f64; s_hist.len()];
        for i in (0..s_hist.len()).rev() {
            alpha[i] = dotp(&s_hist[i], &q) / dotp(&y_hist[i], &s_hist[i]);
            q.iter_mut().zip(&y_hist[i]).for_each(|(a, b)| *a -= alpha[i] * b);
        }
        if let (Some(s), Some(yv)) = (s_hist.last(), y_hist.last()) {
            let gamma = dotp(s, yv) / dotp(yv, yv);
            q.iter_mut().for_each(|v| *v *= gamma);
        }
        for i in 0..s_hist.len() {
            let beta = dotp(&y_hist[i], &q) / dotp(&y_hist[i], &s_hist[i]);
            q.iter_mut().zip(&s_hist[i]).for_each(|(a, b)| *a += (alpha[i] - beta) * b);
        }
        let dir: Vec<f64> = q.iter().map(|v| -v).collect();
        let slope = dotp(&dir, &g);
        if slope >= 0.0 || !slope.is_finite() {
            s_hist.clear();
            y_hist.clear();
            continue;
        }
        let mut step = 1.0;
        let mut g2 = vec![0f64; nw];
        let (mut w2, mut f2);
        loop {
            w2 = w.iter().zip(&dir).map(|(a, b)| a + step * b).collect::<Vec<_>>();
            f2 = loss_grad(x, y, d, c, lambda, &w2, &mut g2);
            if f2 <= f + 1e-4 * step * slope || step < 1e-10 {
                break;
            }
            step *= 0.5;
        }
        let s: Vec<f64> = w2.iter().zip(&w).map(|(a, b)| a - b).collect();
        let yv: Vec<f64> = g2.iter().zip(&g).map(|(a, b)| a - b).collect();
        let done = (f - f2).abs() <= 1e-10 * f.abs().max(1.0);
        if dotp(&s, &yv) > 1e-12 {
            s_hist.push(s);
            y_hist.push(yv);
            if s_hist.len() > 10 {
                s_hist.remove(0);
                y_hist.remove(0);
            }
        }
        (w, g, f) = (w2, g2, f2);
        if done {
            break;
        }
    }
    Probe { d, c, w, lambda }
}

impl Probe {
    pub fn predict(&self, x: &[f32]) -> Vec<usize> {
        let (d, c) = (self.d, self.c);
        x.chunks(d)
            .map(|xi| {
                let z: Vec<f64> = (0..c).map(|k| self.w[d * c + k] + (0..d).map(|j| xi[j] as f64 * self.w[j * c + k]).sum::<f64>()).collect();
                (0..c).fold(0, |b, k| if z[k] > z[b] { k } else { b })
            })
            .collect()
    }
    pub fn accuracy(&self, x: &[f32], y: &[usize]) -> f64 {
        let p = self.predict(x);
        p.iter().zip(y).filter(|(a, b)| a == b).count() as f64 / y.len().max(1) as f64
    }
}

/// The result of [`linear_probe`].
#[derive(Clone, Debug, serde::Serialize)]
pub struct ProbeResult {
    pub lambda: f64,
    /// (λ, validation accuracy) of the sweep.
    pub sweep: Vec<(f64, f64)>,
    pub train_accuracy: f64,
    pub test_accuracy: f64,
}

/// Sweeps λ on a validation split of (train_x, train_y), refits on all of it, scores the test set.
pub fn linear_probe(train_x: &[f32], train_y: &[usize], test_x: &[f32], test_y: &[usize], d: usize, c: usize) -> Result<ProbeResult> {
    if train_y.is_empty() || test_y.is_empty() || train_x.len() != train_y.len() * d || test_x.len() != test_y.len() * d {
        return Err(Error::msg("linear probe: empty or inconsistent train/test features"));
    }
    // every 5th image of each class (the first of each group) goes to validation
    let mut seen = vec![0usize; c];
    let (mut tr, mut va) = (vec![], vec![]);
    for (i, &y) in train_y.iter().enumerate() {
        if seen[y].is_multiple_of(5) {
            va.push(i)
        } else {
            tr.push(i)
        }
        seen[y] += 1;
    }
    if tr.is_empty() {
        std::mem::swap(&mut tr, &mut va);
        va = tr.clone();
    }
    let pick = |idx: &[usize]| -> (Vec<f32>, Vec<usize>) {
        (idx.iter().flat_map(|&i| train_x[i * d..(i + 1) * d].iter().copied()).collect(), idx.iter().map(|&i| train_y[i]).collect())
    };
    let ((tx, ty), (vx, vy)) = (pick(&tr), pick(&va));
    let mut sweep = vec![];
    for e in -6..=2 {
        let lambda = 10f64.powi(e);
        let p = fit(&tx, &ty, d, c, lambda, 200);
        sweep.push((lambda, p.accuracy(&vx, &vy)));
    }
    // best validation accuracy; ties → the stronger regularisation
    let best = sweep.iter().cloned().fold((0.0, -1.0), |b, s| if s.1 >= b.1 { s } else { b }).0;
    let p = fit(train_x, train_y, d, c, best, 300);
    Ok(ProbeResult { lambda: best, sweep, train_accuracy: p.accuracy(train_x, train_y), test_accuracy: p.accuracy(test_x, test_y) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::synthetic::Rng;

    /// Three Gaussian blobs in 5-D: the probe separates them; a gradient check of the loss.
    #[test]
    fn separates_blobs_and_has_the_right_gradient() {
        let (d, c) = (5, 3);
        let mut r = Rng::new(1);
        let mut x = vec![];
        let mut y = vec![];
        for i in 0..90 {
            let k = i % c;
            y.push(k);
            for j in 0..d {
                x.push(r.normal() * 0.5 + if j == k { 3.0 } else { 0.0 });
            }
        }
        let res = linear_probe(&x[..60 * d], &y[..60], &x[60 * d..], &y[60..], d, c).unwrap();
        assert!(res.test_accuracy >= 0.95, "{res:?}");
        let w: Vec<f64> = (0..(d + 1) * c).map(|i| (i as f64 * 0.37).sin() * 0.3).collect();
        let mut g = vec![0f64; w.len()];
        loss_grad(&x, &y, d, c, 0.1, &w, &mut g);
        for e in [0, 7, 16] {
            let (mut wp, mut wm) = (w.clone(), w.clone());
            wp[e] += 1e-6;
            wm[e] -= 1e-6;
            let mut tmp = vec![0f64; w.len()];
            let fd = (loss_grad(&x, &y, d, c, 0.1, &wp, &mut tmp) - loss_grad(&x, &y, d, c, 0.1, &wm, &mut tmp)) / 2e-6;
            assert!((g[e] - fd).abs() < 1e-6, "grad[{e}] {} vs {fd}", g[e]);
        }
    }
}
