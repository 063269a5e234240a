//! The CPU backend of [`Ops`]: buffers are [`Tensor`]s (weights stay memory-mapped when stored
//! f32), GEMMs go through `ops::matmul::gemm` (the AVX-512 f32 kernel, faer for the rest) or, for
//! bf16 weights, the packed bf16 GEMM (AMX or AVX512-BF16, `ops::gemm_bf16`); attention through
//! the blocked CPU kernels of `ops::attention` (per sequence, in parallel, for packed sequences),
//! or, for a bf16 model where bf16 products pay (AMX; AVX512-BF16 on AMD), with q, k and v kept
//! in bf16 and QKᵀ and PV through the bf16 GEMM (`ops::attention_bf16`).
//!
//! Inference models freeze their f32 Linear weights (`Ops::freeze_weight`): each is packed once
//! into the AVX-512 GEMM's panel layout (`CpuPacked::F32`) and its file-mapped pages are let go;
//! training weights change every step and are packed per call.
//!
//! bf16 training (`finetune --dtype bf16`): a bf16 weight keeps its f32 master (`Weight::w`); the
//! backward GEMMs of such a weight also take bf16 inputs with f32 accumulation: dx = dy·W through
//! Wᵀ packed on the first backward (cached with the weight), dW = dyᵀ·x through xᵀ packed per call.
use super::{Act, Ops, Seqs, Weight};
use crate::error::Result;
use crate::ops::attention::{attention, attention_backward, attention_packed, attention_packed_backward, AttnShape};
use crate::ops::attention_bf16::{self, attention_bf16, attention_bf16_rows, attention_packed_bf16, PooledRow};
use crate::ops::elementwise::{unary, unary_bwd, Unary};
use crate::ops::embedding::embedding_bwd_grouped;
use crate::ops::fastmath::{par_rows, zeros};
use crate::ops::gemm_bf16::{matmul_bf16, matmul_bf16_acc, matmul_bf16_fused, Kernel, PackedBf16};
use crate::ops::gemm_epilogue::{ActOut, Epilogue};
use crate::ops::gemm_f32_pack::PackedB;
use crate::ops::layernorm::{layer_norm, layer_norm_bwd};
use crate::ops::matmul::{gemm, linear_into, linear_packed_into, View};
use crate::ops::patch_embed::{im2col, im2col_bf16, patch_embed_bwd_weight, PatchShape};
use crate::ops::reduce::col_sums;
use crate::shape_err;
use crate::tensor::{DType, Storage, Tensor};
use half::bf16;
use std::sync::{Arc, OnceLock};

/// A Linear weight's bf16 copies: `fwd` packed for y = x·Wᵀ, and Wᵀ for dx = dy·W (packed from
/// the f32 master on the first backward).
#[derive(Debug)]
pub struct CpuHalf {
    pub fwd: PackedBf16,
    bwd: OnceLock<PackedBf16>,
}

/// The CPU's copy of a Linear weight for its forward GEMM: bf16 ([`CpuHalf`], a bf16 model), or
/// the f32 values packed once for the AVX-512 GEMM ([`Ops::freeze_weight`]: inference).
#[derive(Debug)]
pub enum CpuPacked {
    Bf16(CpuHalf),
    F32(PackedB),
}

/// The weight's bf16 copies, when it computes in bf16.
fn bf16_of(w: &Weight<Cpu>) -> Option<&CpuHalf> {
    match w.half.as_deref() {
        Some(CpuPacked::Bf16(h)) => Some(h),
        _ => None,
    }
}

/// dx[m×k] (+)= dy[m×n]·W and dW[n×k] = dyᵀ·x with bf16 inputs, f32 accumulation; with `bias`,
/// also db = Σ_rows dy (f32, `transpose_bf16_sums`' fixed order).
#[allow(clippy::too_many_arguments)]
fn linear_bwd_bf16(
    g: &[f32],
    xd: &[f32],
    w: &Weight<Cpu>,
    h: &CpuHalf,
    m: usize,
    d: &mut [f32],
    accumulate: bool,
    bias: bool,
) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
    let (n, k) = (w.n, w.k);
    let wt = h.bwd.get_or_init(|| PackedBf16::from_f32_t(&w.w.f32_data()[..n * k], n, k)); // Wᵀ: [k outputs × n]
    if accumulate {
        matmul_bf16_acc(&g[..m * n], m, wt, d, Kernel::Auto); // dx += dy·W
    } else {
        matmul_bf16(&g[..m * n], m, wt, None, d); // dx = dy·W
    }
    // dyᵀ in bf16 (the GEMM rounds A to bf16 anyway): half the bytes written here and read by
    // its packing; the bias gradient from the same read of dy
    let (gt, db) = if bias {
        let (gt, db) = crate::ops::transpose::transpose_bf16_sums(&g[..m * n], m, n); // [n, m], [n]
        (gt, Some(db))
    } else {
        (crate::ops::transpose::transpose_bf16(&g[..m * n], m, n), None) // [n, m]
    };
    let xt = PackedBf16::from_f32_t(&xd[..m * k], m, k); // xᵀ: [k outputs × m]
    let fill = |dw: &mut [f32]| {
        matmul_bf16_fused(&gt, n, &xt, None, dw, Epilogue::None, Kernel::Auto); // dW = dyᵀ·x [n, k]
        Ok(())
    };
    // SAFETY: `matmul_bf16` writes every element of its output (see `written32`): no zero-fill.
    Ok((unsafe { written32(n * k, fill) }?, db))
}

/// res + y over the first `n` values, in y's buffer (res first: the residual stream's order of addition).
fn add_into(y: Tensor, res: &Tensor, n: usize) -> Result<Tensor> {
    let r = res.f32_data();
    check("residual", r.len(), n)?;
    let mut v = y.into_f32_vec();
    check("residual add", v.len(), n)?;
    par_rows(&mut v[..n], 4096, |i, row| row.iter_mut().zip(&r[i * 4096..]).for_each(|(a, b)| *a += *b)); // f32 addition commutes: res + y
    vec1(v)
}

/// c [m, n] = epi(x [m, k]·Wᵀ + bias) through the bf16 GEMM: x bf16 (an activation kept in 16
/// bits, packed as it is) or f32 (rounded while packing).
fn gemm16(x: &Tensor, m: usize, k: usize, p: &PackedBf16, bias: Option<&[f32]>, c: &mut [f32], epi: Epilogue) -> Result<()> {
    check("linear x", x.numel(), m * k)?;
    match x.bf16_data() {
        Some(xb) => matmul_bf16_fused(&xb[..m * k], m, p, bias, c, epi, Kernel::Auto),
        None => matmul_bf16_fused(&x.f32_data()[..m * k], m, p, bias, c, epi, Kernel::Auto),
    }
    Ok(())
}

/// [`fastmath::written_by`] for the Linears' outputs: `matmul::linear_into` ([`linear32`]) writes
/// every element of C (the fused GEMM's tiles cover it; the composite path copies bias rows or
/// replaces), the bf16 GEMM ([`gemm16`]) overwrites all of C (tests/gemm_bf16.rs checks every
/// kernel on NaN-filled outputs), and the epilogue every element of its output buffer.
///
/// # Safety
/// `fill` must write the buffer it is given in full (a `linear32`, `gemm16`, `matmul_bf16` or
/// `linear_packed_into` call writing it as C or as the epilogue's output).
unsafe fn written32(n: usize, fill: impl FnOnce(&mut [f32]) -> Result<()>) -> Result<Vec<f32>> {
    // SAFETY: the caller's contract.
    unsafe { crate::ops::fastmath::written_by(n, fill) }
}

/// (out, pre) of `n` values each, filled by `run(pre, out)`: a Linear writing C = the
/// pre-activation and its epilogue the activation (no zero-fill of either).
///
/// # Safety
/// `run` writes both buffers in full (as [`written32`]'s `fill`).
unsafe fn written_pair(n: usize, run: impl FnOnce(&mut [f32], &mut [f32]) -> Result<()>) -> Result<(Vec<f32>, Vec<f32>)> {
    let mut pre = Vec::new();
    // SAFETY: the caller's contract, for each buffer.
    let out = unsafe {
        written32(n, |out| {
            pre = written32(n, |p| run(p, out))?;
            Ok(())
        })
    }?;
    Ok((out, pre))
}

/// c [m, n] = epi(x [m, k]·Wᵀ + bias) through the f32 GEMM (bias and epilogue fused into its
/// tile stores on the AVX-512 path).
fn linear32(x: &Tensor, m: usize, w: &Weight<Cpu>, bias: Option<&[f32]>, c: &mut [f32], epi: Epilogue) -> Result<()> {
    let (n, k) = (w.n, w.k);
    check("linear x", x.numel(), m * k)?;
    check("linear weight", w.w.numel(), n * k)?;
    if let Some(b) = bias {
        check("linear bias", b.len(), n)?;
    }
    let (xd, wd, bias) = (&x.f32_data()[..m * k], &w.w.f32_data()[..n * k], bias.map(|b| &b[..n]));
    match w.half.as_deref() {
        Some(CpuPacked::F32(p)) => linear_packed_into(xd, m, wd, p, bias, c, epi),
        _ => linear_into(xd, m, k, wd, n, bias, c, epi),
    }
    Ok(())
}

/// The bf16 output (n values) of `run(out)`: a bf16 GEMM with no C (an empty one: the GEMM keeps
/// C in per-thread tiles) whose epilogue writes `out`.
///
/// # Safety
/// `run` must write every value of `out` (see `written32`).
unsafe fn gemm16_to_bf16(n: usize, run: impl FnOnce(&mut [bf16]) -> Result<()>) -> Result<Tensor> {
    // SAFETY: the caller's contract.
    let out = unsafe { crate::ops::fastmath::written_by(n, run) }; // [n] bf16
    vec1_bf16(out?)
}

/// The CPU backend (rayon's thread pool).
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

fn vec1(v: Vec<f32>) -> Result<Tensor> {
    let n = v.len();
    Tensor::from_vec(v, &[n])
}

/// [`vec1`] of bf16 values.
fn vec1_bf16(v: Vec<bf16>) -> Result<Tensor> {
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

fn check(what: &str, len: usize, want: usize) -> Result<()> {
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
        vec1(data.to_vec())
    }
    fn download(&self, b: &Tensor) -> Result<Vec<f32>> {
        Ok(b.to_vec_f32())
    }
    fn zeros(&self, n: usize) -> Result<Tensor> {
        vec1(zeros(n))
    }
    fn upload_tensor(&self, t: &Tensor) -> Result<Tensor> {
        Ok(if t.dtype() == DType::F32 && t.is_contiguous() { t.clone() } else { vec1(t.to_vec_f32())? })
    }
    fn weight(&self, w: Tensor, n: usize, k: usize, dtype: DType) -> Result<Weight<Cpu>> {
        check("weight", w.numel(), n * k)?;
        let half = match dtype {
            DType::F32 => None,
            DType::BF16 => Some(Arc::new(CpuPacked::Bf16(CpuHalf { fwd: PackedBf16::from_f32(&w.f32_data(), n, k), bwd: OnceLock::new() }))),
            DType::F16 => return Err(crate::error::Error::msg("the CPU computes in f32 or bf16, not f16")),
        };
        Ok(Weight { w, half, n, k })
    }

    /// Packs an f32 weight once for the AVX-512 GEMM (no GEMM packs it again) and lets the
    /// file-mapped original's pages go (so the copy does not double the resident memory); bf16
    /// weights are packed already, and CPUs without AVX-512 keep the values as they are.
    fn freeze_weight(&self, w: &mut Weight<Cpu>) -> Result<()> {
        if w.half.is_none() && crate::ops::gemm_f32::available() && crate::ops::cpu_path::selected() >= crate::ops::cpu_path::GemmPath::Avx512 {
            check("weight", w.w.numel(), w.n * w.k)?;
            w.half = Some(Arc::new(CpuPacked::F32(PackedB::linear_weight(&w.w.f32_data(), w.n, w.k))));
            w.w.storage().release_pages(); // read again only by small products and downloads
        }
        Ok(())
    }

    fn linear(&self, x: &Tensor, w: &Weight<Cpu>, bias: Option<&Tensor>, m: usize) -> Result<Tensor> {
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
        let (n, k) = (w.n, w.k);
        let (g, xd) = (dy.f32_data(), x.f32_data());
        let mut d = take(dx);
        check("linear_bwd dx", d.len(), m * k)?;
        check("linear_bwd dy", g.len(), m * n)?;
        check("linear_bwd x", xd.len(), m * k)?;
        if let Some(h) = bf16_of(w) {
            let (dw, db) = linear_bwd_bf16(&g, &xd, w, h, m, &mut d[..m * k], accumulate, bias)?;
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

    fn layernorm(&self, x: &Tensor, g: &Tensor, b: &Tensor, rows: usize, w: usize, eps: f32) -> Result<(Tensor, Tensor)> {
        check("layernorm x", x.numel(), rows * w)?;
        let y = layer_norm(&x.f32_data()[..rows * w], w, &g.f32_data(), &b.f32_data(), eps);
        Ok((vec1(y)?, self.zeros(0)?)) // the backward recomputes the statistics from x
    }

    fn add_layernorm(&self, x: &mut Tensor, f: &Tensor, g: &Tensor, b: &Tensor, rows: usize, w: usize, eps: f32) -> Result<(Tensor, Tensor)> {
        self.axpy(x, f, 1.0, rows * w)?;
        self.layernorm(x, g, b, rows, w, eps)
    }

    fn layernorm_bwd(&self, dy: &Tensor, x: &Tensor, g: &Tensor, _stats: &Tensor, rows: usize, w: usize, eps: f32) -> Result<(Tensor, Tensor, Tensor)> {
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
        let (dx, dg, db) = self.layernorm_bwd(dy, x, g, st, rows, w, eps)?;
        Ok((add_into(dx, res, rows * w)?, dg, db))
    }

    /// The Linear, then res added: with a bf16 weight in the GEMM's epilogue (per finished
    /// tile), with f32 weights in its output's buffer (one pass, no copy of res).
    fn linear_add(&self, x: &Tensor, w: &Weight<Cpu>, bias: &Tensor, m: usize, res: &Tensor) -> Result<Tensor> {
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
        check("bias_act u", u.numel(), rows * n)?;
        let (mut v, bd) = (u.into_f32_vec(), bias.f32_data());
        par_rows(&mut v[..rows * n], n, |_, r| r.iter_mut().zip(&bd[..n]).for_each(|(a, b)| *a += b)); // u + bias, in place
        let out = unary(act_op(act), &v[..rows * n]);
        Ok((vec1(out)?, if keep_pre { Some(vec1(v)?) } else { None }))
    }

    fn bias_act_bwd(&self, dout: &Tensor, pre: &Tensor, rows: usize, n: usize, act: Act) -> Result<(Tensor, Tensor)> {
        let du = unary_bwd(act_op(act), &pre.f32_data()[..rows * n], &dout.f32_data()[..rows * n]);
        let db = col_sums(&du, n);
        Ok((vec1(du)?, vec1(db)?))
    }

    /// With bf16 weights where the bf16 attention pays ([`attention_bf16::chosen`]), q, k and v are
    /// kept in bf16 (the rounding that attention's bf16 products apply anyway, half the memory),
    /// narrowed in each GEMM's epilogue ([`Epilogue::Bf16`]): [`Ops::attention`] then takes its
    /// bf16 path. Otherwise three Linears with f32 outputs.
    fn qkv(&self, h: &Tensor, w: [&Weight<Cpu>; 3], b: [&Tensor; 3], n: usize, _heads: usize) -> Result<[Tensor; 3]> {
        let half = half_attention(w);
        Ok([self.qkv_one(h, w[0], b[0], n, half)?, self.qkv_one(h, w[1], b[1], n, half)?, self.qkv_one(h, w[2], b[2], n, half)?])
    }

    /// With the bf16 attention: q for the pooled rows only (from those rows of h: per row the bits
    /// [`Ops::qkv`] gives it — the bf16 GEMM computes a row the same way whatever the row count),
    /// k and v for every row, then the attention of those rows alone (`attention_bf16_rows`: per
    /// row the bits of the full attention's). Otherwise (the f32 Linear switches paths by row
    /// count), or rows not one per sequence: the composite.
    fn attention_pooled(&self, h: &Tensor, w: [&Weight<Cpu>; 3], b: [&Tensor; 3], seqs: &Seqs, rows: &[usize], heads: usize, width: usize) -> Result<Tensor> {
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
        check("attention q", q.numel(), seqs.rows() * w)?;
        check("attention k", k.numel(), seqs.rows() * w)?;
        check("attention v", v.numel(), seqs.rows() * w)?;
        if let (Some(qb), Some(kb), Some(vb)) = (q.bf16_data(), k.bf16_data(), v.bf16_data()) {
            // bf16 q, k, v (from `qkv`): QKᵀ and PV through the bf16 GEMM
            let (o, lse) = match seqs {
                Seqs::Batch { batch, seq, causal } => attention_bf16(qb, kb, vb, &shape(*batch, *seq, heads, w, *causal), Kernel::Auto),
                Seqs::Packed(lens) => attention_packed_bf16(qb, kb, vb, lens, heads, true, Kernel::Auto),
            };
            return Ok((vec1(o)?, vec1(lse)?));
        }
        let (qd, kd, vd) = (q.f32_data(), k.f32_data(), v.f32_data());
        let (o, lse) = match seqs {
            Seqs::Batch { batch, seq, causal } => attention(&qd, &kd, &vd, &shape(*batch, *seq, heads, w, *causal)),
            Seqs::Packed(lens) => attention_packed(&qd, &kd, &vd, lens, heads, true),
        };
        Ok((vec1(o)?, vec1(lse)?))
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
        let (qd, kd, vd, od, ld, dd) = (q.f32_data(), k.f32_data(), v.f32_data(), o.f32_data(), lse.f32_data(), d_o.f32_data());
        let (dq, dk, dv) = match seqs {
            Seqs::Batch { batch, seq, causal } => attention_backward(&qd, &kd, &vd, &od, &ld, &dd, &shape(*batch, *seq, heads, w, *causal)),
            Seqs::Packed(lens) => attention_packed_backward(&qd, &kd, &vd, &od, &ld, &dd, lens, heads, true),
        };
        Ok((vec1(dq)?, vec1(dk)?, vec1(dv)?))
    }

    fn copy(&self, x: &Tensor, n: usize) -> Result<Tensor> {
        let xd = x.f32_data();
        check("copy x", xd.len(), n)?;
        let mut y = zeros(n);
        let chunk = 4096.min(n.max(1));
        par_rows(&mut y, chunk, |i, r| r.copy_from_slice(&xd[i * chunk..i * chunk + r.len()]));
        vec1(y)
    }

    fn patch_embed(&self, px: &Tensor, w: &Weight<Cpu>, b: usize, c: usize, s: usize, p: usize) -> Result<Tensor> {
        check("patch_embed pixels", px.numel(), b * c * s * s)?;
        let shape = PatchShape { batch: b, channels: c, height: s, width: s, patch: p, dim: w.n };
        // The convolution is a Linear over im2col rows: every weight form (bf16, frozen f32, f32).
        let rows = b * shape.patches();
        let cols = match bf16_of(w) {
            // bf16 weights: the rows in bf16 already (the GEMM's own rounding of them)
            Some(_) => vec1_bf16(im2col_bf16(&px.f32_data(), &shape))?,
            None => vec1(im2col(&px.f32_data(), &shape))?,
        }; // [B·N, C·P·P]
        self.linear(&cols, w, None, rows) // [B·N, D]
    }

    fn vision_embed(&self, patches: &Tensor, cls: &Tensor, pos: &Tensor, b: usize, n: usize, w: usize) -> Result<Tensor> {
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
        vec1(patch_embed_bwd_weight(&px.f32_data(), &dpatches.f32_data(), &shape))
    }

    fn vision_embed_bwd(&self, dx: &Tensor, b: usize, n: usize, w: usize) -> Result<(Tensor, Tensor, Tensor)> {
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
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        let mut t = take(table);
        let r = embedding_bwd_grouped(&dx.f32_data()[..ids.len() * w], &mut t, w, &ids);
        *table = vec1(t)?;
        r
    }

    fn axpy(&self, y: &mut Tensor, x: &Tensor, alpha: f32, n: usize) -> Result<()> {
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

/// Whether a layer's q, k and v are kept in bf16 for the bf16 attention: bf16 weights, and the
/// bf16 attention chosen ([`attention_bf16::chosen`]).
fn half_attention(w: [&Weight<Cpu>; 3]) -> bool {
    w.iter().all(|w| bf16_of(w).is_some()) && attention_bf16::chosen()
}

/// `rows` as one query per sequence, in order (a tower's pooled rows), with each sequence's place;
/// None when they are not that.
fn pooled_rows(seqs: &Seqs, rows: &[usize]) -> Option<Vec<PooledRow>> {
    let spans: Vec<(usize, usize, bool)> = match seqs {
        Seqs::Batch { batch, seq, causal } => (0..*batch).map(|b| (b * seq, *seq, *causal)).collect(),
        Seqs::Packed(lens) => lens.iter().scan(0, |at, &l| Some((std::mem::replace(at, *at + l), l, true))).collect(),
    };
    if spans.len() != rows.len() {
        return None;
    }
    spans
        .into_iter()
        .zip(rows)
        .map(|((start, len, causal), &r)| (r >= start && r < start + len).then_some(PooledRow { start, len, pos: r - start, causal }))
        .collect()
}

fn shape(batch: usize, seq: usize, heads: usize, w: usize, causal: bool) -> AttnShape {
    let d = w / heads.max(1);
    AttnShape { batch, seq, heads, head_dim: d, causal, scale: 1.0 / (d as f32).sqrt() }
}
