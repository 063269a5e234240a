//! Tape rules for the network ops: Linear and matmul, LayerNorm, softmax, fused attention,
//! embedding gather, patch embedding, the Long-CLIP positional gather, cross-entropy with label
//! smoothing and row L2-normalisation. Backwards call the CPU ops' backward functions
//! (src/ops/*), so each rule's arithmetic is tested there against its reference as well.
use super::t;
use super::tape::{Tape, Var};
use crate::error::Result;
use crate::ops::attention::{attention_backward, attention_packed, attention_packed_backward, AttnShape};
use crate::ops::fastmath::zeros;
use crate::ops::matmul::{gemm, View};
use crate::ops::patch_embed::{patch_embed_bwd_weight, PatchShape};
use crate::ops::pos_gather::{pos_gather, pos_gather_bwd, Stretch};
use crate::ops::reduce::col_sums;
use crate::shape_err;
use crate::tensor::Tensor;

impl Tape {
    /// x `[.., k]` · wᵀ (+ b), w `[n, k]`, b `[n]`.
    pub fn linear(&self, x: &Var, w: &Var, b: Option<&Var>) -> Result<Var> {
        let y = x.value().linear(w.value(), b.map(|b| b.value()))?; // [.., n]
        let (xv, wv) = (x.value().clone(), w.value().clone());
        let (n, k) = (wv.dim(0), wv.dim(1));
        let m = xv.numel() / k.max(1);
        let (nx, nw) = (x.requires_grad(), w.requires_grad());
        let has_b = b.is_some();
        let mut inputs = vec![x, w];
        if let Some(b) = b {
            inputs.push(b);
        }
        Ok(self.custom(&inputs, y, move |g| {
            let gd = g.f32_data();
            let dx = if nx {
                let mut d = zeros(m * k); // [m, k] = g [m, n] · w [n, k]
                gemm(View::row_major(&gd, m, n), View::row_major(&wv.f32_data(), n, k), &mut d, false);
                Some(t(d, xv.shape())?)
            } else {
                None
            };
            let dw = if nw {
                let mut d = zeros(n * k); // [n, k] = gᵀ [n, m] · x [m, k]
                gemm(View::row_major(&gd, m, n).t(), View::row_major(&xv.f32_data(), m, k), &mut d, false);
                Some(t(d, &[n, k])?)
            } else {
                None
            };
            let mut out = vec![dx, dw];
            if has_b {
                out.push(Some(t(col_sums(&gd, n), &[n])?));
            }
            Ok(out)
        }))
    }

    /// a [m, k] · b [k, n] (2-D).
    pub fn matmul(&self, a: &Var, b: &Var) -> Result<Var> {
        if a.value().rank() != 2 || b.value().rank() != 2 {
            return Err(shape_err!("autograd matmul is 2-D: {:?} × {:?}", a.shape(), b.shape()));
        }
        let y = a.value().matmul(b.value())?; // [m, n]
        let (av, bv) = (a.value().clone(), b.value().clone());
        let (m, k, n) = (av.dim(0), av.dim(1), bv.dim(1));
        let (na, nb) = (a.requires_grad(), b.requires_grad());
        Ok(self.custom(&[a, b], y, move |g| {
            let gd = g.f32_data();
            let da = na
                .then(|| {
                    let mut d = zeros(m * k); // g [m, n] · bᵀ [n, k]
                    gemm(View::row_major(&gd, m, n), View::row_major(&bv.f32_data(), k, n).t(), &mut d, false);
                    t(d, &[m, k])
                })
                .transpose()?;
            let db = nb
                .then(|| {
                    let mut d = zeros(k * n); // aᵀ [k, m] · g [m, n]
                    gemm(View::row_major(&av.f32_data(), m, k).t(), View::row_major(&gd, m, n), &mut d, false);
                    t(d, &[k, n])
                })
                .transpose()?;
            Ok(vec![da, db])
        }))
    }

    /// LayerNorm over the last dim.
    pub fn layer_norm(&self, x: &Var, gamma: &Var, beta: &Var, eps: f32) -> Result<Var> {
        let y = x.value().layer_norm(gamma.value(), beta.value(), eps)?;
        let (xv, gv) = (x.value().clone(), gamma.value().clone());
        Ok(self.custom(&[x, gamma, beta], y, move |g| {
            let n = gv.numel();
            let (dx, dg, db) = crate::ops::layernorm::layer_norm_bwd(&xv.f32_data(), n, &gv.f32_data(), &g.f32_data(), eps);
            Ok(vec![Some(t(dx, xv.shape())?), Some(t(dg, &[n])?), Some(t(db, &[n])?)])
        }))
    }

    /// Softmax over the last dim.
    pub fn softmax(&self, x: &Var) -> Result<Var> {
        let y = x.value().softmax_last();
        let yv = y.clone();
        Ok(self.custom(&[x], y, move |g| {
            let n = *yv.shape().last().unwrap_or(&1);
            Ok(vec![Some(t(crate::ops::softmax::softmax_bwd(&yv.f32_data(), &g.f32_data(), n), yv.shape())?)])
        }))
    }

    /// Fused multi-head attention on [B, T, W] (heads interleaved in W), optionally causal;
    /// the backward recomputes nothing: it uses the saved output and logsumexp.
    pub fn attention(&self, q: &Var, k: &Var, v: &Var, heads: usize, causal: bool) -> Result<Var> {
        let (o, lse) = Tensor::attention(q.value(), k.value(), v.value(), heads, causal)?; // [B, T, W]
        let s = q.shape();
        let (b, tt, w) = (s[0], s[1], s[2]);
        let hd = w / heads;
        let shape = AttnShape { batch: b, seq: tt, heads, head_dim: hd, causal, scale: 1.0 / (hd as f32).sqrt() };
        let (qv, kv, vv, ov) = (q.value().clone(), k.value().clone(), v.value().clone(), o.clone());
        Ok(self.custom(&[q, k, v], o, move |g| {
            let (dq, dk, dv) = attention_backward(&qv.f32_data(), &kv.f32_data(), &vv.f32_data(), &ov.f32_data(), &lse.f32_data(), &g.f32_data(), &shape);
            Ok(vec![Some(t(dq, qv.shape())?), Some(t(dk, qv.shape())?), Some(t(dv, qv.shape())?)])
        }))
    }

    /// Fused attention on packed sequences (no padding): q, k, v [N, W] hold sequences of
    /// `lens` tokens back to back (N = Σ lens) and each row attends only within its sequence.
    pub fn attention_packed(&self, q: &Var, k: &Var, v: &Var, heads: usize, causal: bool, lens: &[usize]) -> Result<Var> {
        let n: usize = lens.iter().sum();
        let w = q.shape().last().copied().unwrap_or(0);
        if heads == 0 || w % heads != 0 || q.value().numel() != n * w || k.shape() != q.shape() || v.shape() != q.shape() {
            return Err(crate::shape_err!("attention_packed: q {:?}, k {:?}, v {:?}, {heads} heads, lengths {lens:?}", q.shape(), k.shape(), v.shape()));
        }
        let (o, lse) = attention_packed(&q.value().f32_data(), &k.value().f32_data(), &v.value().f32_data(), lens, heads, causal);
        let o = t(o, q.shape())?; // [.., N, W]
        let (qv, kv, vv, ov) = (q.value().clone(), k.value().clone(), v.value().clone(), o.clone());
        let lens = lens.to_vec();
        Ok(self.custom(&[q, k, v], o, move |g| {
            let (dq, dk, dv) =
                attention_packed_backward(&qv.f32_data(), &kv.f32_data(), &vv.f32_data(), &ov.f32_data(), &lse, &g.f32_data(), &lens, heads, causal);
            Ok(vec![Some(t(dq, qv.shape())?), Some(t(dk, qv.shape())?), Some(t(dv, qv.shape())?)])
        }))
    }

    /// Rows `ids` of `table` [V, W] → [len, W].
    pub fn embedding(&self, table: &Var, ids: &[u32]) -> Result<Var> {
        let y = Tensor::embedding(table.value(), ids)?;
        let (vocab, width) = (table.shape()[0], table.shape()[1]);
        let ids = ids.to_vec();
        Ok(self.custom(&[table], y, move |g| Ok(vec![Some(t(crate::ops::embedding::embedding_bwd(&g.f32_data(), vocab, width, &ids)?, &[vocab, width])?)])))
    }

    /// Patch embedding of pixels [B, C, H, W] (data: no gradient) with the conv weight
    /// [D, C, P, P] → [B, N, D].
    pub fn patch_embed(&self, pixels: &Var, weight: &Var) -> Result<Var> {
        let y = Tensor::patch_embed(pixels.value(), weight.value())?;
        let (ps, ws) = (pixels.shape(), weight.shape());
        let s = PatchShape { batch: ps[0], channels: ps[1], height: ps[2], width: ps[3], patch: ws[2], dim: ws[0] };
        let (px, wshape) = (pixels.value().clone(), ws.to_vec());
        Ok(self.custom(&[pixels, weight], y, move |g| Ok(vec![None, Some(t(patch_embed_bwd_weight(&px.f32_data(), &g.f32_data(), &s), &wshape)?)])))
    }

    /// Long-CLIP positional gather: rows `pos` of the table [L, W] stretched by `s` on the fly.
    pub fn pos_gather(&self, table: &Var, s: Stretch, pos: &[u32]) -> Result<Var> {
        let w = table.shape()[1];
        let y = pos_gather(&table.value().f32_data(), w, s, pos)?;
        let (rows, pos) = (table.shape()[0], pos.to_vec());
        Ok(self.custom(&[table], t(y, &[pos.len(), w])?, move |g| Ok(vec![Some(t(pos_gather_bwd(&g.f32_data(), w, s, &pos)?, &[rows, w])?)])))
    }

    /// Mean softmax cross-entropy of logits `[N, C]` against `targets`, label smoothing ε → `[1]`.
    pub fn cross_entropy(&self, logits: &Var, targets: &[u32], smoothing: f32) -> Result<Var> {
        let s = logits.shape();
        if s.len() != 2 {
            return Err(shape_err!("cross_entropy: logits {:?} must be [N, C]", s));
        }
        let c = s[1];
        let lv = logits.value().clone();
        let ce = crate::ops::cross_entropy::cross_entropy(&lv.f32_data(), c, targets, smoothing)?;
        let (lse, targets) = (ce.lse, targets.to_vec());
        Ok(self.custom(&[logits], t(vec![ce.mean], &[1])?, move |g| {
            let d = crate::ops::cross_entropy::cross_entropy_bwd(&lv.f32_data(), c, &targets, &lse, smoothing, g.f32_data()[0])?;
            Ok(vec![Some(t(d, lv.shape())?)])
        }))
    }

    /// Long-CLIP's PCA reconstruction of a batch [B, D] on its top-k principal subspace
    /// (`ops::pca_grad`; gradient through the projector, finite on degenerate spectra).
    pub fn pca_reconstruct(&self, x: &Var, k: usize) -> Result<Var> {
        let s = x.shape();
        if s.len() != 2 {
            return Err(shape_err!("pca_reconstruct: input {:?} must be [B, D]", s));
        }
        let (b, d) = (s[0], s[1]);
        let (r, cache) = crate::ops::pca_grad::pca_reconstruct(&x.value().f32_data(), b, d, k.min(d))?;
        Ok(self.custom(&[x], t(r, &[b, d])?, move |g| Ok(vec![Some(t(crate::ops::pca_grad::pca_reconstruct_bwd(&cache, &g.f32_data())?, &[b, d])?)])))
    }

    /// Each row of [N, D] divided by its L2 norm.
    pub fn l2_normalize(&self, x: &Var) -> Result<Var> {
        let s = x.shape().to_vec();
        let d = *s.last().ok_or_else(|| shape_err!("l2_normalize of a scalar"))?;
        let xd = x.value().f32_data();
        let norms: Vec<f32> = xd.chunks(d).map(|r| r.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12)).collect();
        let y: Vec<f32> = xd.chunks(d).zip(&norms).flat_map(|(r, &n)| r.iter().map(move |v| v / n)).collect();
        let yv = t(y, &s)?;
        let ys = yv.clone();
        Ok(self.custom(&[x], yv, move |g| {
            // dx = (g − y·(g·y)) / ‖x‖
            let (gd, yd) = (g.f32_data(), ys.f32_data());
            let mut dx = vec![0f32; gd.len()];
            for (i, n) in norms.iter().enumerate() {
                let (gr, yr) = (&gd[i * d..(i + 1) * d], &yd[i * d..(i + 1) * d]);
                let dot: f32 = gr.iter().zip(yr).map(|(a, b)| a * b).sum();
                dx[i * d..(i + 1) * d].iter_mut().zip(gr.iter().zip(yr)).for_each(|(o, (a, b))| *o = (a - b * dot) / n);
            }
            Ok(vec![Some(t(dx, &s)?)])
        }))
    }
}
