//! The CPU backend of [`Ops`]: buffers are [`Tensor`]s (weights stay memory-mapped when stored
//! f32), GEMMs go through `ops::matmul::gemm` (the AVX-512 f32 kernel, faer for the rest) or, for
//! bf16 weights, the packed bf16 GEMM (AMX or AVX512-BF16, `ops::gemm_bf16`); attention through
//! the blocked CPU kernels of `ops::attention` (per sequence, in parallel, for packed sequences),
//! or, for a bf16 model where bf16 products pay (AMX; AVX512-BF16 on AMD), with q, k and v kept
//! in bf16 and QKᵀ and PV through the bf16 GEMM (`ops::attention_bf16`); `cpu_attention.rs`
//! chooses between them.
//!
//! Inference models freeze their f32 Linear weights (`Ops::freeze_weight`): each is packed once
//! into the AVX-512 GEMM's panel layout (`CpuPacked::F32`) and its file-mapped pages are let go;
//! training weights change every step and are packed per call.
//!
//! bf16 training (`finetune --dtype bf16`): a bf16 weight keeps its f32 master (`Weight::w`); the
//! backward GEMMs of such a weight also take bf16 inputs with f32 accumulation: dx = dy·W through
//! Wᵀ packed on the first backward (cached with the weight), dW = dyᵀ·x through xᵀ packed per call.
use super::cpu_attention::{half_attention, pooled_rows};
use super::cpu_linear::{add_into, bf16_of, gemm16, gemm16_to_bf16, linear32, linear_bwd_bf16, written32, written_pair};
pub use super::cpu_linear::{CpuHalf, CpuPacked};
use super::{profile, Act, Ops, Seqs, Weight};
use crate::error::Result;
use crate::ops::attention_bf16::attention_bf16_rows;
use crate::ops::elementwise::{unary, unary_bwd, Unary};
use crate::ops::embedding::embedding_bwd_grouped;
use crate::ops::fastmath::{par_rows, zeros};
use crate::ops::gemm_bf16::{Kernel, PackedBf16};
use crate::ops::gemm_epilogue::{ActOut, Epilogue};
use crate::ops::gemm_f32_pack::PackedB;
use crate::ops::layernorm::{layer_norm, layer_norm_bwd};
use crate::ops::matmul::{gemm, View};
use crate::ops::patch_embed::{im2col, im2col_bf16, patch_embed_bwd_weight, PatchShape};
use crate::ops::reduce::col_sums;
use crate::shape_err;
use crate::tensor::{DType, Storage, Tensor};
use half::bf16;
use std::sync::Arc;

/// The CPU backend (rayon's thread pool).
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

pub(super) fn vec1(v: Vec<f32>) -> Result<Tensor> {
    let n = v.len();
    Tensor::from_vec(v, &[n])
}

/// [`vec1`] of bf16 values.
pub(super) fn vec1_bf16(v: Vec<bf16>) -> Result<Tensor> {
    let n = v.len();
    Tensor::from_storage(Storage::BF16(v), &[n])
}

/// Takes a buffer's values out for an in-place update (no copy when uniquely owned).
fn take(x: &mut Tensor) -> Vec<f32> {
    std::mem::replace(x, Tensor::scalar(0.0)).into_f32_vec()
}

fn act_op(a: Act) -> Unary {
    match a {
        Act::QuickGelu => Unary::QuickGelu,
        Act::Gelu => Unary::Gelu,
    }
}

pub(super) fn check(what: &str, len: usize, want: usize) -> Result<()> {
    if len < want {
        return Err(shape_err!("{what}: {len} values, need {want}"));
    }
    Ok(())
}

impl Cpu {
    /// One of q, k, v [n, W] as [`Ops::qkv`] makes it: with `half`, narrowed to bf16 in the GEMM's
    /// epilogue ([`Epilogue::Bf16`], no f32 [n, W] output); otherwise a Linear with an f32 output.
    fn qkv_one(&self, h: &Tensor, w: &Weight<Cpu>, b: &Tensor, n: usize, half: bool) -> Result<Tensor> {
        let Some(p) = bf16_of(w).filter(|_| half) else {
            return self.linear(h, w, Some(b), n); // [n, W]
        };
        let (bd, (c, k)) = (b.f32_data(), (w.n, w.k));
        check("qkv bias", bd.len(), c)?;
        // SAFETY: the epilogue writes every element of its output (see `written32`); C is not kept.
        unsafe { gemm16_to_bf16(n * c, |out| gemm16(h, n, k, &p.fwd, Some(&bd[..c]), &mut [], Epilogue::Bf16 { out })) }
        // [n, W] bf16
    }
}

impl Ops for Cpu {
    type Buf = Tensor;
    type Half = Arc<CpuPacked>;

    fn describe(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }
    fn upload(&self, data: &[f32]) -> Result<Tensor> {
        let _p = profile::values("upload", data.len());
        vec1(data.to_vec())
    }
    fn download(&self, b: &Tensor) -> Result<Vec<f32>> {
        let _p = profile::values("download", b.numel());
        Ok(b.to_vec_f32())
    }
    fn zeros(&self, n: usize) -> Result<Tensor> {
        let _p = profile::values("zeros", n);
        vec1(zeros(n))
    }
    fn upload_tensor(&self, t: &Tensor) -> Result<Tensor> {
        let _p = profile::values("upload", t.numel());
        Ok(if t.dtype() == DType::F32 && t.is_contiguous() { t.clone() } else { vec1(t.to_vec_f32())? })
    }
    fn weight(&self, w: Tensor, n: usize, k: usize, dtype: DType) -> Result<Weight<Cpu>> {
        let _p = profile::span("weight", || (format!("{n}×{k} {}", dtype.name()), 0.0));
        check("weight", w.numel(), n * k)?;
        let half = match dtype {
            DType::F32 => None,
            DType::BF16 => Some(Arc::new(CpuPacked::Bf16(CpuHalf::new(PackedBf16::from_f32(&w.f32_data(), n, k))))),
            DType::F16 => return Err(crate::error::Error::msg("the CPU computes in f32 or bf16, not f16")),
        };
        Ok(Weight { w, half, n, k })
    }

    /// Packs an f32 weight once for the AVX-512 GEMM (no GEMM packs it again) and lets the
    /// file-mapped original's pages go (so the copy does not double the resident memory); bf16
    /// weights are packed already, and CPUs without AVX-512 keep the values as they are.
    fn freeze_weight(&self, w: &mut Weight<Cpu>) -> Result<()> {
        let _p = profile::span("freeze_weight", || (format!("{}×{}", w.n, w.k), 0.0));
        if w.half.is_none() && crate::ops::gemm_f32::available() && crate::ops::cpu_path::selected() >= crate::ops::cpu_path::GemmPath::Avx512 {
            check("weight", w.w.numel(), w.n * w.k)?;
            w.half = Some(Arc::new(CpuPacked::F32(PackedB::linear_weight(&w.w.f32_data(), w.n, w.k))));
            w.w.storage().release_pages(); // read again only by small products and downloads
        }
        Ok(())
    }

    fn linear(&self, x: &Tensor, w: &Weight<Cpu>, bias: Option<&Tensor>, m: usize) -> Result<Tensor> {
        let _p = profile::gemm("linear", m, w.k, w.n, 1);
        let (n, k) = (w.n, w.k);
        check("linear x", x.numel(), m * k)?;
        let bias = bias.map(|b| b.f32_data());
        match bf16_of(w) {
            // SAFETY: `gemm16` writes every element of its output (see `written32`).
            Some(p) => vec1(unsafe { written32(m * n, |y| gemm16(x, m, k, &p.fwd, bias.as_deref().map(|b| &b[..n]), y, Epilogue::None)) }?), // [m, n]
            // SAFETY: `linear32` writes every element of its output (see `written32`).
            None => vec1(unsafe { written32(m * n, |y| linear32(x, m, w, bias.as_deref(), y, Epilogue::None)) }?), // [m, n]
        }
    }

    fn linear_bwd(
        &self,
        dy: &Tensor,
        x: &Tensor,
        w: &Weight<Cpu>,
        m: usize,
        dx: &mut Tensor,
        accumulate: bool,
        bias: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let _p = profile::gemm("linear_bwd", m, w.k, w.n, 2);
        let (n, k) = (w.n, w.k);
        let (g, xd) = (dy.f32_data(), x.f32_data());
        let mut d = take(dx);
        check("linear_bwd dx", d.len(), m * k)?;
        check("linear_bwd dy", g.len(), m * n)?;
        check("linear_bwd x", xd.len(), m * k)?;
        if let Some(h) = bf16_of(w) {
            let xt = PackedBf16::from_f32_t(&xd[..m * k], m, k); // xᵀ: [k outputs × m]
            let (dw, db) = linear_bwd_bf16(&g, &xt, w, h, m, &mut d[..m * k], accumulate, bias)?;
            *dx = vec1(d)?;
            return Ok((vec1(dw)?, db.map(vec1).transpose()?));
        }
        gemm(View::row_major(&g, m, n), View::row_major(&w.w.f32_data(), n, k), &mut d[..m * k], accumulate); // dx (+)= dy·W
        *dx = vec1(d)?;
        let mut dw = zeros(n * k);
        gemm(View::row_major(&g, m, n).t(), View::row_major(&xd, m, k), &mut dw, false); // dW = dyᵀ·x
        let db = if bias { Some(vec1(col_sums(&g[..m * n], n))?) } else { None };
        Ok((vec1(dw)?, db))
    }

    /// With bf16 weights: q's, k's and v's backward as [`Ops::linear_bwd`] computes each (dh
    /// accumulated q, k, v in that order: the same bits), with h's transpose packed once for the
    /// three dW GEMMs instead of once each. Otherwise the composite.
    fn qkv_bwd(&self, d: [&Tensor; 3], h: &Tensor, w: [&Weight<Cpu>; 3], n: usize) -> Result<(Tensor, [Tensor; 3], [Tensor; 3])> {
        let (Some(hq), Some(hk), Some(hv)) = (bf16_of(w[0]), bf16_of(w[1]), bf16_of(w[2])) else {
            return super::qkv_bwd_composite(self, d, h, w, n);
        };
        let _p = profile::gemm("qkv_bwd", n, w[0].k, w[0].n, 6);
        let k = w[0].k;
        let xd = h.f32_data();
        check("qkv_bwd h", xd.len(), n * k)?;
        let xt = PackedBf16::from_f32_t(&xd[..n * k], n, k); // hᵀ: [k outputs × n], for the three
        let mut grads = Vec::with_capacity(3);
        let fill = |dh: &mut [f32]| {
            for (i, (dy, (w, half))) in d.into_iter().zip(w.into_iter().zip([hq, hk, hv])).enumerate() {
                check("qkv_bwd weight", w.k, k)?;
                let g = dy.f32_data();
                check("qkv_bwd dy", g.len(), n * w.n)?;
                let (dw, db) = linear_bwd_bf16(&g, &xt, w, half, n, dh, i > 0, true)?; // dh (+)= dy·W
                grads.push((vec1(dw)?, vec1(db.ok_or_else(|| crate::error::Error::msg("qkv_bwd: no bias gradient"))?)?));
            }
            Ok(())
        };
        // SAFETY: the first `linear_bwd_bf16` (not accumulating) writes every element of dh
        // (its dx GEMM's C: see `written32`), the next two add to it.
        let dh = unsafe { written32(n * k, fill) }?; // [n, K]
        let [(dwq, dbq), (dwk, dbk), (dwv, dbv)]: [(Tensor, Tensor); 3] =
            grads.try_into().map_err(|_| crate::error::Error::msg("qkv_bwd: three gradients expected"))?;
        Ok((vec1(dh)?, [dwq, dwk, dwv], [dbq, dbk, dbv]))
    }

    fn layernorm(&self, x: &Tensor, g: &Tensor, b: &Tensor, rows: usize, w: usize, eps: f32) -> Result<(Tensor, Tensor)> {
        let _p = profile::rows("layernorm", rows, w);
        check("layernorm x", x.numel(), rows * w)?;
        let y = layer_norm(&x.f32_data()[..rows * w], w, &g.f32_data(), &b.f32_data(), eps);
        Ok((vec1(y)?, self.zeros(0)?)) // the backward recomputes the statistics from x
    }

    fn add_layernorm(&self, x: &mut Tensor, f: &Tensor, g: &Tensor, b: &Tensor, rows: usize, w: usize, eps: f32) -> Result<(Tensor, Tensor)> {
        let _p = profile::rows("add_layernorm", rows, w);
        self.axpy(x, f, 1.0, rows * w)?;
        self.layernorm(x, g, b, rows, w, eps)
    }

    fn layernorm_bwd(&self, dy: &Tensor, x: &Tensor, g: &Tensor, _stats: &Tensor, rows: usize, w: usize, eps: f32) -> Result<(Tensor, Tensor, Tensor)> {
        let _p = profile::rows("layernorm_bwd", rows, w);
        let (dx, dg, db) = layer_norm_bwd(&x.f32_data()[..rows * w], w, &g.f32_data(), &dy.f32_data()[..rows * w], eps);
        Ok((vec1(dx)?, vec1(dg)?, vec1(db)?))
    }

    /// res + dx in dx's buffer (one pass, no copy of res).
    fn layernorm_bwd_add(
        &self,
        dy: &Tensor,
        x: &Tensor,
        g: &Tensor,
        st: &Tensor,
        rows: usize,
        w: usize,
        eps: f32,
        res: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let _p = profile::rows("layernorm_bwd_add", rows, w);
        let (dx, dg, db) = self.layernorm_bwd(dy, x, g, st, rows, w, eps)?;
        Ok((add_into(dx, res, rows * w)?, dg, db))
    }

    /// The Linear, then res added: with a bf16 weight in the GEMM's epilogue (per finished
    /// tile), with f32 weights in its output's buffer (one pass, no copy of res).
    fn linear_add(&self, x: &Tensor, w: &Weight<Cpu>, bias: &Tensor, m: usize, res: &Tensor) -> Result<Tensor> {
        let _p = profile::gemm("linear_add", m, w.k, w.n, 1);
        let (n, k) = (w.n, w.k);
        let (bd, r) = (bias.f32_data(), res.f32_data());
        check("linear_add bias", bd.len(), n)?;
        check("residual", r.len(), m * n)?;
        let epi = Epilogue::Add { res: &r[..m * n] };
        let y = match bf16_of(w) {
            // SAFETY: `gemm16` writes every element of its output (see `written32`).
            Some(p) => unsafe { written32(m * n, |y| gemm16(x, m, k, &p.fwd, Some(&bd[..n]), y, epi)) }?, // [m, n]
            // SAFETY: `linear32` writes every element of its output (see `written32`).
            None => unsafe { written32(m * n, |y| linear32(x, m, w, Some(&bd[..n]), y, epi)) }?, // [m, n]
        };
        vec1(y)
    }

    /// With a bf16 weight, the pre-activation x·Wᵀ + b is rounded to bf16 (the device's GEMM
    /// writes it in 16 bits) before the f32 activation, all in the GEMM's epilogue. For
    /// inference (no `keep_pre`) the output is rounded to bf16 and kept so: its readers are the
    /// next bf16 GEMM, which would round it to the same values, and `download`; training keeps
    /// f32 outputs (the backward reads them as f32). f32 weights: Linear, then bias + act.
    fn linear_act(&self, x: &Tensor, w: &Weight<Cpu>, bias: &Tensor, m: usize, act: Act, keep_pre: bool) -> Result<(Tensor, Option<Tensor>)> {
        let _p = profile::gemm("linear_act", m, w.k, w.n, 1);
        let (n, k) = (w.n, w.k);
        let bd = bias.f32_data();
        check("linear_act bias", bd.len(), n)?;
        let act_op = act_op(act);
        let Some(p) = bf16_of(w) else {
            // f32: bias and activation in the GEMM's tile stores; the pre-activation kept only
            // for the backward.
            // SAFETY (both): `linear32` writes every element of its output and of the epilogue's
            // (see `written32`).
            if !keep_pre {
                let epi = Epilogue::Act { op: act_op, round_pre: false, out: ActOut::InPlace };
                let out = unsafe { written32(m * n, |y| linear32(x, m, w, Some(&bd[..n]), y, epi)) }?; // [m, n]
                return Ok((vec1(out)?, None));
            }
            let (out, pre) = unsafe {
                written_pair(m * n, |pre, out| linear32(x, m, w, Some(&bd[..n]), pre, Epilogue::Act { op: act_op, round_pre: false, out: ActOut::F32(out) }))
            }?; // [m, n] each
            return Ok((vec1(out)?, Some(vec1(pre)?)));
        };
        if keep_pre {
            // Training: the pre-activation for the backward and the output in f32.
            // SAFETY: `gemm16` writes every element of C and of the epilogue's output (see `written32`).
            let (out, pre) = unsafe {
                written_pair(m * n, |pre, out| {
                    gemm16(x, m, k, &p.fwd, Some(&bd[..n]), pre, Epilogue::Act { op: act_op, round_pre: true, out: ActOut::F32(out) })
                })
            }?; // [m, n] each
            return Ok((vec1(out)?, Some(vec1(pre)?)));
        }
        // SAFETY: the epilogue writes every element of its output (see `written32`); C is not kept.
        let out = unsafe {
            gemm16_to_bf16(m * n, |out| gemm16(x, m, k, &p.fwd, Some(&bd[..n]), &mut [], Epilogue::Act { op: act_op, round_pre: true, out: ActOut::Bf16(out) }))
        }; // [m, n] bf16
        Ok((out?, None))
    }

    fn bias_act(&self, u: Tensor, bias: &Tensor, rows: usize, n: usize, act: Act, keep_pre: bool) -> Result<(Tensor, Option<Tensor>)> {
        let _p = profile::rows("bias_act", rows, n);
        check("bias_act u", u.numel(), rows * n)?;
        let (mut v, bd) = (u.into_f32_vec(), bias.f32_data());
        par_rows(&mut v[..rows * n], n, |_, r| r.iter_mut().zip(&bd[..n]).for_each(|(a, b)| *a += b)); // u + bias, in place
        let out = unary(act_op(act), &v[..rows * n]);
        Ok((vec1(out)?, if keep_pre { Some(vec1(v)?) } else { None }))
    }

    fn bias_act_bwd(&self, dout: &Tensor, pre: &Tensor, rows: usize, n: usize, act: Act) -> Result<(Tensor, Tensor)> {
        let _p = profile::rows("bias_act_bwd", rows, n);
        let du = unary_bwd(act_op(act), &pre.f32_data()[..rows * n], &dout.f32_data()[..rows * n]);
        let db = col_sums(&du, n);
        Ok((vec1(du)?, vec1(db)?))
    }

    /// With bf16 weights where the bf16 attention pays ([`attention_bf16::chosen`]), q, k and v are
    /// kept in bf16 (the rounding that attention's bf16 products apply anyway, half the memory),
    /// narrowed in each GEMM's epilogue ([`Epilogue::Bf16`]): [`Ops::attention`] then takes its
    /// bf16 path. Otherwise three Linears with f32 outputs.
    fn qkv(&self, h: &Tensor, w: [&Weight<Cpu>; 3], b: [&Tensor; 3], n: usize, _heads: usize) -> Result<[Tensor; 3]> {
        let _p = profile::gemm("qkv", n, w[0].k, w[0].n, 3);
        let half = half_attention(w);
        Ok([self.qkv_one(h, w[0], b[0], n, half)?, self.qkv_one(h, w[1], b[1], n, half)?, self.qkv_one(h, w[2], b[2], n, half)?])
    }

    /// With the bf16 attention: q for the pooled rows only (from those rows of h: per row the bits
    /// [`Ops::qkv`] gives it — the bf16 GEMM computes a row the same way whatever the row count),
    /// k and v for every row, then the attention of those rows alone (`attention_bf16_rows`: per
    /// row the bits of the full attention's). Otherwise (the f32 Linear switches paths by row
    /// count), or rows not one per sequence: the composite.
    fn attention_pooled(&self, h: &Tensor, w: [&Weight<Cpu>; 3], b: [&Tensor; 3], seqs: &Seqs, rows: &[usize], heads: usize, width: usize) -> Result<Tensor> {
        let _p = profile::pooled("attention_pooled", seqs, rows.len(), heads, width);
        let (n, half) = (seqs.rows(), half_attention(w));
        let Some(pooled) = pooled_rows(seqs, rows).filter(|_| half) else {
            return super::attention_pooled_composite(self, h, w, b, seqs, rows, heads, width);
            // [R, W]
        };
        let hr = self.gather_rows(h, rows, width)?; // [R, W]
        let q = self.qkv_one(&hr, w[0], b[0], rows.len(), half)?; // [R, W]
        let (k, v) = (self.qkv_one(h, w[1], b[1], n, half)?, self.qkv_one(h, w[2], b[2], n, half)?); // [N, W] each
        check("attention_pooled k", k.numel(), n * width)?;
        let (Some(qb), Some(kb), Some(vb)) = (q.bf16_data(), k.bf16_data(), v.bf16_data()) else {
            return Err(crate::error::Error::msg("attention_pooled: q, k, v not in bf16 with bf16 attention"));
        };
        vec1(attention_bf16_rows(qb, kb, vb, &pooled, heads, Kernel::Auto)) // [R, W]
    }

    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, seqs: &Seqs, heads: usize, w: usize) -> Result<(Tensor, Tensor)> {
        let _p = profile::attention("attention", seqs, heads, w, 1.0);
        check("attention q", q.numel(), seqs.rows() * w)?;
        check("attention k", k.numel(), seqs.rows() * w)?;
        check("attention v", v.numel(), seqs.rows() * w)?;
        super::cpu_attention::attention(q, k, v, seqs, heads, w)
    }

    fn attention_bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        lse: &Tensor,
        d_o: &Tensor,
        seqs: &Seqs,
        heads: usize,
        w: usize,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let _p = profile::attention("attention_bwd", seqs, heads, w, 2.5);
        super::cpu_attention::attention_bwd([q, k, v], o, lse, d_o, seqs, heads, w)
    }

    fn copy(&self, x: &Tensor, n: usize) -> Result<Tensor> {
        let _p = profile::values("copy", n);
        let xd = x.f32_data();
        check("copy x", xd.len(), n)?;
        let mut y = zeros(n);
        let chunk = 4096.min(n.max(1));
        par_rows(&mut y, chunk, |i, r| r.copy_from_slice(&xd[i * chunk..i * chunk + r.len()]));
        vec1(y)
    }

    fn patch_embed(&self, px: &Tensor, w: &Weight<Cpu>, b: usize, c: usize, s: usize, p: usize) -> Result<Tensor> {
        let shape = PatchShape { batch: b, channels: c, height: s, width: s, patch: p, dim: w.n };
        // The convolution is a Linear over im2col rows: every weight form (bf16, frozen f32, f32).
        let rows = b * shape.patches();
        let _p = profile::gemm("patch_embed", rows, c * p * p, w.n, 1);
        check("patch_embed pixels", px.numel(), b * c * s * s)?;
        let cols = match bf16_of(w) {
            // bf16 weights: the rows in bf16 already (the GEMM's own rounding of them)
            Some(_) => vec1_bf16(im2col_bf16(&px.f32_data(), &shape))?,
            None => vec1(im2col(&px.f32_data(), &shape))?,
        }; // [B·N, C·P·P]
        self.linear(&cols, w, None, rows) // [B·N, D]
    }

    fn vision_embed(&self, patches: &Tensor, cls: &Tensor, pos: &Tensor, b: usize, n: usize, w: usize) -> Result<Tensor> {
        let _p = profile::rows("vision_embed", b * (n + 1), w);
        let (pd, cd, ps) = (patches.f32_data(), cls.f32_data(), pos.f32_data());
        check("vision_embed patches", pd.len(), b * n * w)?;
        let t = n + 1;
        let mut x = zeros(b * t * w); // [B·T, W]
        par_rows(&mut x, w, |row, o| {
            let (bi, ti) = (row / t, row % t);
            let src = if ti == 0 { &cd[..w] } else { &pd[(bi * n + ti - 1) * w..][..w] };
            o.iter_mut().zip(src).zip(&ps[ti * w..(ti + 1) * w]).for_each(|((o, a), p)| *o = a + p);
        });
        vec1(x)
    }

    fn patch_embed_bwd(&self, px: &Tensor, dpatches: &Tensor, b: usize, c: usize, s: usize, p: usize, d: usize) -> Result<Tensor> {
        let shape = PatchShape { batch: b, channels: c, height: s, width: s, patch: p, dim: d };
        let _p = profile::gemm("patch_embed_bwd", b * shape.patches(), c * p * p, d, 1);
        vec1(patch_embed_bwd_weight(&px.f32_data(), &dpatches.f32_data(), &shape))
    }

    fn vision_embed_bwd(&self, dx: &Tensor, b: usize, n: usize, w: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let _p = profile::rows("vision_embed_bwd", b * (n + 1), w);
        let d = dx.f32_data();
        let t = n + 1;
        check("vision_embed_bwd dx", d.len(), b * t * w)?;
        let mut dp = zeros(b * n * w); // [B·N, W]
        par_rows(&mut dp, w, |row, o| o.copy_from_slice(&d[(row / n * t + row % n + 1) * w..][..w]));
        let mut dpos = vec![0f32; t * w]; // [T, W]: the batch sum, in batch order
        for img in d[..b * t * w].chunks_exact(t * w) {
            dpos.iter_mut().zip(img).for_each(|(a, v)| *a += v);
        }
        let mut dcls = vec![0f32; w];
        for bi in 0..b {
            dcls.iter_mut().zip(&d[bi * t * w..bi * t * w + w]).for_each(|(a, v)| *a += v);
        }
        Ok((vec1(dp)?, vec1(dcls)?, vec1(dpos)?))
    }

    fn embedding_bwd(&self, dx: &Tensor, ids: &[usize], table: &mut Tensor, w: usize) -> Result<()> {
        let _p = profile::rows("embedding_bwd", ids.len(), w);
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        let mut t = take(table);
        let r = embedding_bwd_grouped(&dx.f32_data()[..ids.len() * w], &mut t, w, &ids);
        *table = vec1(t)?;
        r
    }

    fn axpy(&self, y: &mut Tensor, x: &Tensor, alpha: f32, n: usize) -> Result<()> {
        let _p = profile::values("axpy", n);
        let mut yd = take(y);
        check("axpy y", yd.len(), n)?;
        let xd = x.f32_data();
        check("axpy x", xd.len(), n)?;
        let chunk = 4096.min(n.max(1));
        par_rows(&mut yd[..n], chunk, |i, r| r.iter_mut().zip(&xd[i * chunk..]).for_each(|(a, b)| *a += alpha * b));
        *y = vec1(yd)?;
        Ok(())
    }

    fn gather_rows(&self, x: &Tensor, rows: &[usize], w: usize) -> Result<Tensor> {
        let _p = profile::rows("gather_rows", rows.len(), w);
        let xd = x.f32_data();
        let n = xd.len() / w.max(1);
        if let Some(&r) = rows.iter().find(|&&r| r >= n) {
            return Err(shape_err!("gather_rows: row {r} of {n}"));
        }
        // SAFETY: par_rows hands every row of the output to the copy, which writes all of it.
        vec1(unsafe { crate::ops::fastmath::written(rows.len() * w, |o| par_rows(o, w, |i, o| o.copy_from_slice(&xd[rows[i] * w..][..w]))) })
        // [rows, w]
    }

    fn scatter_rows(&self, d: &Tensor, rows: &[usize], n: usize, w: usize) -> Result<Tensor> {
        let _p = profile::rows("scatter_rows", rows.len(), w);
        let dd = d.f32_data();
        let mut out = zeros(n * w); // [N, w]
        for (i, &r) in rows.iter().enumerate() {
            if r >= n {
                return Err(shape_err!("scatter_rows: row {r} of {n}"));
            }
            out[r * w..(r + 1) * w].copy_from_slice(&dd[i * w..(i + 1) * w]);
        }
        vec1(out)
    }
}
