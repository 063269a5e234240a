//! Fused multi-head attention: o = softmax(q·kᵀ·scale [+ causal mask])·v in one pass per
//! (batch, head), never materialising the [T×T] score matrix beyond one row. Also returns the
//! row logsumexp (what a backward pass needs to recompute the probabilities).
//!
//! Layout: q, k, v and o are [B, T, H·hd] (heads side by side in each row, as the projections
//! produce them), lse is [B, H, T]. Any T ≥ 1 and any head dim.
use super::fastmath;
use super::matmul::{gemm_seq, View};
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

/// The fast path: batches in parallel; per head, Q, K and V are gathered into contiguous tiles
/// and the scores S = Q·Kᵀ and the mix O = P·V run as two small GEMMs, with the (masked)
/// softmax applied to S in place in between.
pub fn attention(q: &[f32], k: &[f32], v: &[f32], s: &AttnShape) -> (Vec<f32>, Vec<f32>) {
    let (t, w, d) = (s.seq, s.width(), s.head_dim);
    let mut out = vec![0f32; s.numel()];
    let mut lse = vec![0f32; s.batch * s.heads * t];
    if s.numel() == 0 {
        return (out, lse);
    }
    out.par_chunks_mut(t * w).zip(lse.par_chunks_mut(s.heads * t)).enumerate().for_each(|(b, (ob, lb))| {
        let (mut qt, mut kt, mut vt) = (vec![0f32; t * d], vec![0f32; t * d], vec![0f32; t * d]); // [T, d] each
        let mut sc = vec![0f32; t * t]; // [T, T]
        let mut o = vec![0f32; t * d]; // [T, d]
        for h in 0..s.heads {
            for j in 0..t {
                let row = (b * t + j) * w + h * d;
                qt[j * d..(j + 1) * d].copy_from_slice(&q[row..row + d]);
                kt[j * d..(j + 1) * d].copy_from_slice(&k[row..row + d]);
                vt[j * d..(j + 1) * d].copy_from_slice(&v[row..row + d]);
            }
            gemm_seq(View::row_major(&qt, t, d), View::row_major(&kt, t, d).t(), &mut sc); // S = Q·Kᵀ
            for i in 0..t {
                let row = &mut sc[i * t..(i + 1) * t];
                let nk = s.keys(i);
                row[nk..].fill(0.0);
                let row = &mut row[..nk];
                let mut m = f32::NEG_INFINITY;
                for x in row.iter_mut() {
                    *x *= s.scale;
                    m = m.max(*x);
                }
                let mut z = 0f32;
                for x in row.iter_mut() {
                    *x = fastmath::exp(*x - m);
                    z += *x;
                }
                let inv = 1.0 / z;
                row.iter_mut().for_each(|x| *x *= inv);
                lb[h * t + i] = m + z.ln();
            }
            gemm_seq(View::row_major(&sc, t, t), View::row_major(&vt, t, d), &mut o); // O = P·V
            for i in 0..t {
                ob[i * w + h * d..][..d].copy_from_slice(&o[i * d..(i + 1) * d]);
            }
        }
    });
    (out, lse)
}
