//! Softmax cross-entropy with label smoothing over contrastive logits: PyTorch's
//! `F.cross_entropy(logits, targets, label_smoothing=ε)` with reduction 'mean'. CPU twin of
//! kernels/cross_entropy.cu.
//!
//! logits `[N, C]`, targets `[N]` (< C). With lse_i = log Σ_c exp(x_ic) and the smoothed target
//! q_ic = (1−ε)·[c = t_i] + ε/C:
//!   loss_i = −Σ_c q_ic·log p_ic = lse_i − (1−ε)·x_{i,t_i} − (ε/C)·Σ_c x_ic,   loss = mean_i loss_i
//!   ∂loss/∂x_ic = (softmax_ic − q_ic) / N   (times the upstream gradient `dloss`)
//! The forward returns the per-row losses, their mean and the per-row logsumexp (saved for the
//! backward). References are f64 on f64 inputs (finite differences perturb them directly); the
//! fast path is f32, rows in parallel.
use super::fastmath::{self, par_rows};
use super::reduce::{max_f32, sum_f32};
use crate::error::{Error, Result};

/// Forward of the f64 reference.
#[derive(Clone, Debug)]
pub struct CrossEntropyRef {
    pub loss: Vec<f64>,
    pub lse: Vec<f64>,
    pub mean: f64,
}

/// Forward of the fast path.
#[derive(Clone, Debug)]
pub struct CrossEntropy {
    pub loss: Vec<f32>,
    pub lse: Vec<f32>,
    pub mean: f32,
}

fn check(len: usize, classes: usize, targets: &[u32], smoothing: f64) -> Result<()> {
    if classes == 0 || len != targets.len() * classes {
        return Err(crate::shape_err!("cross-entropy: {len} logits for {} targets × {classes} classes", targets.len()));
    }
    if targets.is_empty() {
        return Err(Error::msg("cross-entropy of an empty batch"));
    }
    if let Some(&t) = targets.iter().find(|&&t| t as usize >= classes) {
        return Err(Error::msg(format!("target {t} out of range for {classes} classes")));
    }
    if !(0.0..=1.0).contains(&smoothing) {
        return Err(Error::msg(format!("label smoothing {smoothing} outside [0, 1]")));
    }
    Ok(())
}

fn lse_f64(r: &[f64]) -> f64 {
    let m = r.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    m + r.iter().map(|v| (v - m).exp()).sum::<f64>().ln()
}

/// Per-row losses, logsumexp and mean, computed as −Σ_c q_ic·log p_ic with log p = x − lse.
pub fn cross_entropy_reference(logits: &[f64], classes: usize, targets: &[u32], smoothing: f64) -> Result<CrossEntropyRef> {
    check(logits.len(), classes, targets, smoothing)?;
    let (mut loss, mut lse) = (Vec::new(), Vec::new());
    for (r, &t) in logits.chunks(classes).zip(targets) {
        let l = lse_f64(r);
        let mut li = 0.0;
        for (c, &x) in r.iter().enumerate() {
            let q = (1.0 - smoothing) * (c == t as usize) as u8 as f64 + smoothing / classes as f64;
            li -= q * (x - l);
        }
        loss.push(li);
        lse.push(l);
    }
    let mean = loss.iter().sum::<f64>() / targets.len() as f64;
    Ok(CrossEntropyRef { loss, lse, mean })
}

/// dlogits = (softmax − q)·dloss/N in f64.
pub fn cross_entropy_bwd_reference(logits: &[f64], classes: usize, targets: &[u32], smoothing: f64, dloss: f64) -> Result<Vec<f64>> {
    check(logits.len(), classes, targets, smoothing)?;
    let scale = dloss / targets.len() as f64;
    let mut out = Vec::with_capacity(logits.len());
    for (r, &t) in logits.chunks(classes).zip(targets) {
        let l = lse_f64(r);
        for (c, &x) in r.iter().enumerate() {
            let q = (1.0 - smoothing) * (c == t as usize) as u8 as f64 + smoothing / classes as f64;
            out.push(((x - l).exp() - q) * scale);
        }
    }
    Ok(out)
}

/// Fast forward (f32 math, rows in parallel; the mean is accumulated in f64).
pub fn cross_entropy(logits: &[f32], classes: usize, targets: &[u32], smoothing: f32) -> Result<CrossEntropy> {
    check(logits.len(), classes, targets, smoothing as f64)?;
    let n = targets.len();
    // [loss, lse] per row
    let mut out = vec![0f32; 2 * n];
    par_rows(&mut out, 2, |i, o| {
        let r = &logits[i * classes..(i + 1) * classes];
        let m = max_f32(r);
        let mut acc = [0f32; 16];
        let mut ch = r.chunks_exact(16);
        for c in &mut ch {
            for k in 0..16 {
                acc[k] += fastmath::exp(c[k] - m);
            }
        }
        let s = acc.iter().sum::<f32>() + ch.remainder().iter().map(|&v| fastmath::exp(v - m)).sum::<f32>();
        let l = m + s.ln();
        o[0] = l - (1.0 - smoothing) * r[targets[i] as usize] - smoothing / classes as f32 * sum_f32(r);
        o[1] = l;
    });
    let loss: Vec<f32> = out.iter().step_by(2).copied().collect();
    let lse: Vec<f32> = out.iter().skip(1).step_by(2).copied().collect();
    let mean = (loss.iter().map(|&v| v as f64).sum::<f64>() / n as f64) as f32;
    Ok(CrossEntropy { loss, lse, mean })
}

/// Fast backward from the saved logsumexp: dlogits [N, C].
pub fn cross_entropy_bwd(logits: &[f32], classes: usize, targets: &[u32], lse: &[f32], smoothing: f32, dloss: f32) -> Result<Vec<f32>> {
    check(logits.len(), classes, targets, smoothing as f64)?;
    if lse.len() != targets.len() {
        return Err(crate::shape_err!("cross-entropy backward: {} logsumexp values for {} rows", lse.len(), targets.len()));
    }
    let scale = dloss / targets.len() as f32;
    let q_off = smoothing / classes as f32;
    let q_on = (1.0 - smoothing) + q_off;
    let mut out = vec![0f32; logits.len()];
    par_rows(&mut out, classes, |i, o| {
        let (r, l) = (&logits[i * classes..(i + 1) * classes], lse[i]);
        for (o, &x) in o.iter_mut().zip(r) {
            *o = (fastmath::exp(x - l) - q_off) * scale;
        }
        let t = targets[i] as usize;
        o[t] = (fastmath::exp(r[t] - l) - q_on) * scale;
    });
    Ok(out)
}
