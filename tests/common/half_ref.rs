//! A reference backend for the half-precision towers: every Linear with a bf16/f16 weight copy
//! rounds its inputs (the activations x and the weights W) to that format exactly as the fast
//! paths do (round to nearest even) and accumulates the exact products in f64, then adds the f32
//! bias (the patch convolution is such a Linear over im2col rows); the MLP's pre-activation (x·W1ᵀ + b1) is rounded to the format before its activation;
//! every other operation is the CPU backend's f32 op. The bf16 CPU towers, the bf16 CUDA
//! towers and the bf16/f16 device trainer round at exactly these points and differ from this only
//! by their f32 summation order, so they must match it far more closely than they match f32.
//!
//! Attention follows the backend under test ([`AttnOf`]): where it computes attention with bf16
//! products — the CPU backend with bf16 weights and `attention_bf16::chosen()` (AMX, AVX512-BF16
//! on AMD, or that path forced); the device backend where its flash kernels serve the head dim
//! (`cuda::flash::supported`) — q, k and v are rounded to bf16 and P too
//! (`attention_bf16_reference`, f64); elsewhere the CPU's f32 attention. (The host CPU must not
//! decide the device's reference: on AMD the CPU's choice would round attention that the device
//! computes in f32.)
//!
//! [`assert_half_close`]: per element within the format's unit roundoff of the reference (see its
//! docs); [`assert_not_f32`]: farther from the f32 result than a path that silently computed in
//! f32 could be.
use clipforge::backend::cpu::Cpu;
use clipforge::backend::{Act, Ops, Seqs, Weight};
use clipforge::ops::attention::AttnShape;
use clipforge::ops::attention_bf16::{self, attention_bf16_reference, attention_packed_bf16_reference};
use clipforge::ops::patch_embed::{im2col, PatchShape};
use clipforge::{DType, Result, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// The rounding reference (the format travels with each weight; the attention's rounding
/// follows the backend it is the reference of).
#[derive(Clone, Copy, Debug)]
pub struct HalfRef {
    pub attention: AttnOf,
}

/// Whose attention rounding the reference mirrors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnOf {
    /// The CPU backend's: bf16 products where `attention_bf16::chosen()`.
    Cpu,
    /// The device backend's: bf16 products where the flash kernels serve bf16 at the head dim.
    Device,
}

impl HalfRef {
    /// The reference of the CPU towers.
    pub const CPU: HalfRef = HalfRef { attention: AttnOf::Cpu };
    /// The reference of the device (CUDA, emulated CUDA) towers and trainer.
    pub const DEVICE: HalfRef = HalfRef { attention: AttnOf::Device };
}

/// x rounded to bf16 or f16 (round to nearest even), as f64 (exact).
pub fn round_to(x: f32, dt: DType) -> f64 {
    match dt {
        DType::BF16 => half::bf16::from_f32(x).to_f64(),
        DType::F16 => half::f16::from_f32(x).to_f64(),
        DType::F32 => x as f64,
    }
}

/// The unit roundoff of a format: 2^-8 (bf16, 8 significant bits), 2^-11 (f16, 11 bits), 2^-24.
pub fn unit_roundoff(dt: DType) -> f64 {
    match dt {
        DType::BF16 => 2f64.powi(-8),
        DType::F16 => 2f64.powi(-11),
        DType::F32 => 2f64.powi(-24),
    }
}

fn to_cpu(w: &Weight<HalfRef>) -> Weight<Cpu> {
    Weight { w: w.w.clone(), half: None, n: w.n, k: w.k }
}

impl Ops for HalfRef {
    type Buf = Tensor;
    /// The format and W rounded to it, as f64 [n, k].
    type Half = (DType, Arc<Vec<f64>>);

    fn describe(&self) -> String {
        "half-rounding f64 reference".into()
    }
    fn upload(&self, data: &[f32]) -> Result<Tensor> {
        Cpu.upload(data)
    }
    fn download(&self, b: &Tensor) -> Result<Vec<f32>> {
        Cpu.download(b)
    }
    fn zeros(&self, n: usize) -> Result<Tensor> {
        Cpu.zeros(n)
    }
    fn upload_tensor(&self, t: &Tensor) -> Result<Tensor> {
        Cpu.upload_tensor(t)
    }
    fn weight(&self, w: Tensor, n: usize, k: usize, dtype: DType) -> Result<Weight<HalfRef>> {
        let half = (dtype != DType::F32).then(|| (dtype, Arc::new(w.to_vec_f32()[..n * k].iter().map(|&v| round_to(v, dtype)).collect())));
        Ok(Weight { w, half, n, k })
    }
    fn linear(&self, x: &Tensor, w: &Weight<HalfRef>, bias: Option<&Tensor>, m: usize) -> Result<Tensor> {
        let Some((dt, wr)) = &w.half else { return Cpu.linear(x, &to_cpu(w), bias, m) };
        let (n, k) = (w.n, w.k);
        let xr: Vec<f64> = x.to_vec_f32()[..m * k].iter().map(|&v| round_to(v, *dt)).collect(); // [m, k]
        let b = bias.map(|b| b.to_vec_f32());
        let mut y = vec![0f32; m * n]; // [m, n]
        y.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
            let xi = &xr[i * k..(i + 1) * k];
            for (j, out) in row.iter_mut().enumerate() {
                let d: f64 = xi.iter().zip(&wr[j * k..(j + 1) * k]).map(|(a, c)| a * c).sum();
                *out = (d + b.as_ref().map_or(0.0, |b| b[j] as f64)) as f32;
            }
        });
        Tensor::from_vec(y, &[m * n])
    }
    /// The 16-bit towers' MLP: the pre-activation x·Wᵀ + b rounded to the format, then the f32
    /// activation of those values (rounded again by the next Linear's input rounding).
    fn linear_act(&self, x: &Tensor, w: &Weight<HalfRef>, bias: &Tensor, m: usize, act: Act, keep_pre: bool) -> Result<(Tensor, Option<Tensor>)> {
        let Some((dt, _)) = &w.half else {
            let u = self.linear(x, w, None, m)?;
            return Cpu.bias_act(u, bias, m, w.n, act, keep_pre);
        };
        let pre: Vec<f32> = self.linear(x, w, Some(bias), m)?.to_vec_f32().iter().map(|&v| round_to(v, *dt) as f32).collect(); // [m, n]
        let zero = Tensor::from_vec(vec![0.0; w.n], &[w.n])?;
        Cpu.bias_act(Tensor::from_vec(pre, &[m * w.n])?, &zero, m, w.n, act, keep_pre)
    }
    fn linear_bwd(
        &self,
        dy: &Tensor,
        x: &Tensor,
        w: &Weight<HalfRef>,
        m: usize,
        dx: &mut Tensor,
        accumulate: bool,
        bias: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        Cpu.linear_bwd(dy, x, &to_cpu(w), m, dx, accumulate, bias)
    }
    fn layernorm(&self, x: &Tensor, g: &Tensor, b: &Tensor, rows: usize, w: usize, eps: f32) -> Result<(Tensor, Tensor)> {
        Cpu.layernorm(x, g, b, rows, w, eps)
    }
    fn add_layernorm(&self, x: &mut Tensor, f: &Tensor, g: &Tensor, b: &Tensor, rows: usize, w: usize, eps: f32) -> Result<(Tensor, Tensor)> {
        Cpu.add_layernorm(x, f, g, b, rows, w, eps)
    }
    fn layernorm_bwd(&self, dy: &Tensor, x: &Tensor, g: &Tensor, stats: &Tensor, rows: usize, w: usize, eps: f32) -> Result<(Tensor, Tensor, Tensor)> {
        Cpu.layernorm_bwd(dy, x, g, stats, rows, w, eps)
    }
    fn bias_act(&self, u: Tensor, bias: &Tensor, rows: usize, n: usize, act: Act, keep_pre: bool) -> Result<(Tensor, Option<Tensor>)> {
        Cpu.bias_act(u, bias, rows, n, act, keep_pre)
    }
    fn bias_act_bwd(&self, dout: &Tensor, pre: &Tensor, rows: usize, n: usize, act: Act) -> Result<(Tensor, Tensor)> {
        Cpu.bias_act_bwd(dout, pre, rows, n, act)
    }
    /// bf16 q, k, v (rounded, kept in bf16 storage) where the mirrored backend's attention computes
    /// in bf16 ([`AttnOf`]).
    fn qkv(&self, h: &Tensor, w: [&Weight<HalfRef>; 3], b: [&Tensor; 3], n: usize, heads: usize) -> Result<[Tensor; 3]> {
        let bf16_products = match self.attention {
            AttnOf::Cpu => attention_bf16::chosen(),
            AttnOf::Device => clipforge::cuda::flash::supported(DType::BF16, w[0].n / heads.max(1)),
        };
        let half = w.iter().all(|w| matches!(&w.half, Some((DType::BF16, _)))) && bf16_products;
        let one = |w: &Weight<HalfRef>, b: &Tensor| -> Result<Tensor> {
            let y = self.linear(h, w, Some(b), n)?; // [n, W]
            Ok(if half { y.to_dtype(DType::BF16) } else { y }) // [n, W]
        };
        Ok([one(w[0], b[0])?, one(w[1], b[1])?, one(w[2], b[2])?])
    }
    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, seqs: &Seqs, heads: usize, w: usize) -> Result<(Tensor, Tensor)> {
        if q.bf16_data().is_none() {
            return Cpu.attention(q, k, v, seqs, heads, w);
        }
        let (qd, kd, vd) = (q.to_vec_f32(), k.to_vec_f32(), v.to_vec_f32());
        let (o, lse) = match seqs {
            Seqs::Batch { batch, seq, causal } => {
                let s = AttnShape { batch: *batch, seq: *seq, heads, head_dim: w / heads, causal: *causal, scale: 1.0 / ((w / heads) as f32).sqrt() };
                attention_bf16_reference(&qd, &kd, &vd, &s)
            }
            Seqs::Packed(lens) => attention_packed_bf16_reference(&qd, &kd, &vd, lens, heads, true),
        };
        Ok((Tensor::from_vec(o, &[qd.len()])?, Tensor::from_vec(lse, &[seqs.rows() * heads])?))
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
        Cpu.attention_bwd(q, k, v, o, lse, d_o, seqs, heads, w)
    }
    fn copy(&self, x: &Tensor, n: usize) -> Result<Tensor> {
        Cpu.copy(x, n)
    }
    /// The patch convolution as the Linear over im2col rows it is (pixels and weights rounded).
    fn patch_embed(&self, px: &Tensor, w: &Weight<HalfRef>, b: usize, c: usize, s: usize, p: usize) -> Result<Tensor> {
        if w.half.is_none() {
            return Cpu.patch_embed(px, &to_cpu(w), b, c, s, p);
        }
        let shape = PatchShape { batch: b, channels: c, height: s, width: s, patch: p, dim: w.n };
        let cols = Tensor::from_vec(im2col(&px.to_vec_f32()[..b * c * s * s], &shape), &[b * shape.patches() * c * p * p])?; // [B·N, C·P·P]
        self.linear(&cols, w, None, b * shape.patches())
    }
    fn vision_embed(&self, patches: &Tensor, cls: &Tensor, pos: &Tensor, b: usize, n: usize, w: usize) -> Result<Tensor> {
        Cpu.vision_embed(patches, cls, pos, b, n, w)
    }
    fn patch_embed_bwd(&self, px: &Tensor, dpatches: &Tensor, b: usize, c: usize, s: usize, p: usize, d: usize) -> Result<Tensor> {
        Cpu.patch_embed_bwd(px, dpatches, b, c, s, p, d)
    }
    fn vision_embed_bwd(&self, dx: &Tensor, b: usize, n: usize, w: usize) -> Result<(Tensor, Tensor, Tensor)> {
        Cpu.vision_embed_bwd(dx, b, n, w)
    }
    fn embedding_bwd(&self, dx: &Tensor, ids: &[usize], table: &mut Tensor, w: usize) -> Result<()> {
        Cpu.embedding_bwd(dx, ids, table, w)
    }
    fn axpy(&self, y: &mut Tensor, x: &Tensor, alpha: f32, n: usize) -> Result<()> {
        Cpu.axpy(y, x, alpha, n)
    }
    fn gather_rows(&self, x: &Tensor, rows: &[usize], w: usize) -> Result<Tensor> {
        Cpu.gather_rows(x, rows, w)
    }
    fn scatter_rows(&self, d: &Tensor, rows: &[usize], n: usize, w: usize) -> Result<Tensor> {
        Cpu.scatter_rows(d, rows, n, w)
    }
}

/// Max |got − want| / max |want| (the error in units of the output's scale).
pub fn scaled_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "length");
    let scale = want.iter().fold(0f64, |m, &v| m.max(v.abs() as f64)).max(1e-30);
    got.iter().zip(want).fold(0f64, |m, (&g, &w)| if g.is_finite() { m.max((g as f64 - w as f64).abs()) } else { f64::INFINITY }) / scale
}

/// Per element |got − want| ≤ u·max|want| + u·|want| (u: the format's unit roundoff), NaN/Inf
/// fail. The fast path rounds the same values as the reference; what is left is its f32 summation
/// order and the inputs that it pushes across a rounding boundary (each moves one term of a dot
/// product by ≤ u of itself, ~u/√k of the output), accumulated over the blocks: measured ≤ 0.1u
/// on the 2-layer fixtures. Deep towers: [`assert_half_close_within`].
#[allow(dead_code)] // not every test binary that includes this module uses it
pub fn assert_half_close(what: &str, got: &[f32], want: &[f32], dt: DType) {
    assert_half_close_within(what, got, want, dt, 1.0);
}

/// [`assert_half_close`] with the bound `units`·(u·max|want| + u·|want|). Over 12 layers the
/// boundary crossings compound into a seed-dependent draw: the synthetic ViT-B/32's text
/// embeddings measured 0.85u–1.43u (seeds 5–8, with either CPU attention path; images
/// 0.66u–0.87u), so its test allows 2 units.
pub fn assert_half_close_within(what: &str, got: &[f32], want: &[f32], dt: DType, units: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let u = unit_roundoff(dt) * units;
    let scale = want.iter().fold(0f64, |m, &v| m.max(v.abs() as f64));
    let bad: Vec<String> = got
        .iter()
        .zip(want)
        .enumerate()
        .filter(|(_, (&g, &w))| !(g.is_finite() && (g as f64 - w as f64).abs() <= u * scale + u * (w as f64).abs()))
        .take(4)
        .map(|(i, (g, w))| format!("[{i}] {g} vs {w}"))
        .collect();
    assert!(
        bad.is_empty(),
        "{what}: outside {units}·(u·max|ref| + u·|ref|) (u = {:.3e}) of the {dt:?}-rounding reference (max |err|/max|ref| = {:.3}u): {}",
        unit_roundoff(dt),
        scaled_err(got, want) / unit_roundoff(dt),
        bad.join(", ")
    );
}

/// Not f32: the half-precision result differs from the f32 one by more than u/8·max|ref|
/// somewhere (measured 0.65u–1.6u; a path that silently computed in f32 differs from the f32
/// towers only by summation order, ~1e-6u).
pub fn assert_not_f32(what: &str, half_out: &[f32], f32_out: &[f32], reference: &[f32], dt: DType) {
    let u = unit_roundoff(dt);
    let scale = reference.iter().fold(0f64, |m, &v| m.max(v.abs() as f64));
    let d = half_out.iter().zip(f32_out).fold(0f64, |m, (&a, &b)| m.max((a as f64 - b as f64).abs()));
    assert!(d > u / 8.0 * scale, "{what}: the {dt:?} result is within {:.3}u·max|ref| of the f32 one: it was not computed in {dt:?}", d / (u * scale));
}
