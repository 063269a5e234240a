//! Fused multi-head attention: o = softmax(q·kᵀ·scale [+ causal mask])·v in one pass per
//! (batch, head), never materialising the [T×T] score matrix beyond one row. Also returns the
//! row logsumexp (what a backward pass needs to recompute the probabilities).
//!
//! Layout: q, k, v and o are [B, T, H·hd] (heads side by side in each row, as the projections
//! produce them), lse is [B, H, T]. Any T ≥ 1 and any head dim.
use super::fastmath;
use rayon::prelude::*;

#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub causal: bool,
    pub scale: f32,
}

impl AttnShape {
    pub fn width(&self) -> usize {
        self.heads * self.head_dim
    }
    pub fn numel(&self) -> usize {
        self.batch * self.seq * self.width()
    }
    /// Keys visible to query `i`.
    fn keys(&self, i: usize) -> usize {
        if self.causal { i + 1 } else { self.seq }
    }
}

/// Naive reference in f64.
pub fn attention_reference(q: &[f32], k: &[f32], v: &[f32], s: &AttnShape) -> (Vec<f32>, Vec<f32>) {
    let (t, w, d) = (s.seq, s.width(), s.head_dim);
    let mut out = vec![0f32; s.numel()];
    let mut lse = vec![0f32; s.batch * s.heads * t];
    for b in 0..s.batch {
        for h in 0..s.heads {
            for i in 0..t {
                let qi = &q[(b * t + i) * w + h * d..][..d];
                let nk = s.keys(i);
                let sc: Vec<f64> = (0..nk)
                    .map(|j| {
                        let kj = &k[(b * t + j) * w + h * d..][..d];
                        qi.iter().zip(kj).map(|(&x, &y)| x as f64 * y as f64).sum::<f64>() * s.scale as f64
                    })
                    .collect();
                let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
                lse[(b * s.heads + h) * t + i] = (m + z.ln()) as f32;
                for e in 0..d {
                    let acc: f64 = (0..nk).map(|j| (sc[j] - m).exp() / z * v[(b * t + j) * w + h * d + e] as f64).sum();
                    out[(b * t + i) * w + h * d + e] = acc as f32;
                }
            }
        }
    }
    (out, lse)
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut ca = a.chunks_exact(16);
    let mut cb = b.chunks_exact(16);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// The fast path: batches in parallel; per head, K and V are gathered into contiguous tiles
/// so the inner loops stream through memory.
pub fn attention(q: &[f32], k: &[f32], v: &[f32], s: &AttnShape) -> (Vec<f32>, Vec<f32>) {
    let (t, w, d) = (s.seq, s.width(), s.head_dim);
    let mut out = vec![0f32; s.numel()];
    let mut lse = vec![0f32; s.batch * s.heads * t];
    if s.numel() == 0 {
        return (out, lse);
    }
    out.par_chunks_mut(t * w).zip(lse.par_chunks_mut(s.heads * t)).enumerate().for_each(|(b, (ob, lb))| {
        let mut kt = vec![0f32; t * d];
        let mut vt = vec![0f32; t * d];
        let mut p = vec![0f32; t];
        let mut acc = vec![0f32; d];
        for h in 0..s.heads {
            for j in 0..t {
                let row = (b * t + j) * w + h * d;
                kt[j * d..(j + 1) * d].copy_from_slice(&k[row..row + d]);
                vt[j * d..(j + 1) * d].copy_from_slice(&v[row..row + d]);
            }
            for i in 0..t {
                let qi = &q[(b * t + i) * w + h * d..][..d];
                let nk = s.keys(i);
                let mut m = f32::NEG_INFINITY;
                for j in 0..nk {
                    let x = dot(qi, &kt[j * d..(j + 1) * d]) * s.scale;
                    p[j] = x;
                    m = m.max(x);
                }
                let mut z = 0f32;
                for x in &mut p[..nk] {
                    *x = fastmath::exp(*x - m);
                    z += *x;
                }
                acc.fill(0.0);
                for j in 0..nk {
                    let pj = p[j];
                    for (a, &vv) in acc.iter_mut().zip(&vt[j * d..(j + 1) * d]) {
                        *a += pj * vv;
                    }
                }
                let inv = 1.0 / z;
                for (o, a) in ob[i * w + h * d..][..d].iter_mut().zip(&acc) {
                    *o = a * inv;
                }
                lb[h * t + i] = m + z.ln();
            }
        }
    });
    (out, lse)
}
