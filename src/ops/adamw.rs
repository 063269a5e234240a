//! Fused AdamW step with torch.optim.AdamW semantics, plus optional bf16/f16 copies of the updated
//! weights in the same pass. CPU twin of kernels/adamw.cu.
//!
//! torch's `_single_tensor_adam` (decoupled weight decay, amsgrad=False), per element in f32:
//!   p ← p·(1 − lr·wd)                       decay FIRST (param.mul_), before the moments
//!   m ← lerp(m, g, 1−β1)                    m + (1−β1)(g − m)   (torch's lerp: when the weight is
//!                                           ≥ 0.5 it evaluates g − (g − m)·β1 instead)
//!   v ← v·β2 + ((1−β2)·g)·g                 mul_(β2).addcmul_(g, g, value=1−β2)
//!   denom = sqrt(v) / sqrt(1−β2^t) + ε
//!   p ← p + ((−lr/(1−β1^t))·m) / denom       addcdiv_(m, denom, value=−step_size)
//! The scalars are computed in f64 (torch does them in Python) and rounded to f32 once.
//! [`adamw_reference`] is that sequence, one element at a time; [`adamw_step`] runs the same
//! per-element arithmetic vectorised and in parallel (no reassociation: the results are bitwise
//! equal, which tests/ops_training.rs asserts). The CUDA kernel computes the same with nvcc's
//! FMA contraction (≤ a few ulp apart). torch's CUDA path divides by sqrt(1−β2^t) as a multiply by
//! its reciprocal, so torch CPU and torch CUDA differ by an ulp too; bitwise parity with torch is
//! not claimed, the formula and its order are.
use crate::error::{Error, Result};
use half::{bf16, f16};
use rayon::prelude::*;

/// AdamW hyperparameters (torch defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8, wd 1e-2).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamW {
    fn default() -> Self {
        AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2 }
    }
}

/// The per-step f32 scalars, computed as torch computes them (f64, then one rounding).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWScalars {
    pub decay: f32,
    pub w1: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    pub neg_step_size: f32,
    pub bc2_sqrt: f32,
    pub eps: f32,
}

impl AdamW {
    /// Scalars of step `step` (≥ 1: the count after this update, as torch's `state['step']`).
    pub fn scalars(&self, step: u32) -> AdamWScalars {
        let t = step as f64;
        AdamWScalars {
            decay: (1.0 - self.lr * self.weight_decay) as f32,
            w1: (1.0 - self.beta1) as f32,
            beta2: self.beta2 as f32,
            one_minus_beta2: (1.0 - self.beta2) as f32,
            neg_step_size: (-(self.lr / (1.0 - self.beta1.powf(t)))) as f32,
            bc2_sqrt: (1.0 - self.beta2.powf(t)).sqrt() as f32,
            eps: self.eps as f32,
        }
    }
}

/// Gradient element types: f32 and bf16 (the kernels' `adamw_f32` / `adamw_bf16`).
pub trait Grad: Copy + Send + Sync {
    fn f32(self) -> f32;
}
impl Grad for f32 {
    #[inline(always)]
    fn f32(self) -> f32 {
        self
    }
}
impl Grad for bf16 {
    #[inline(always)]
    fn f32(self) -> f32 {
        self.to_f32()
    }
}

/// One element, in torch's order. Returns (p, m, v).
#[inline(always)]
fn update(s: &AdamWScalars, p: f32, g: f32, m: f32, v: f32) -> (f32, f32, f32) {
    let p = p * s.decay;
    let m = if s.w1.abs() < 0.5 { m + s.w1 * (g - m) } else { g - (g - m) * (1.0 - s.w1) };
    let v = v * s.beta2 + s.one_minus_beta2 * g * g;
    let denom = v.sqrt() / s.bc2_sqrt + s.eps;
    (p + s.neg_step_size * m / denom, m, v)
}

fn check(n: usize, g: usize, m: usize, v: usize, step: u32) -> Result<()> {
    if g != n || m != n || v != n {
        return Err(crate::shape_err!("adamw: p, g, m, v have {n}, {g}, {m}, {v} elements"));
    }
    if step == 0 {
        return Err(Error::msg("adamw: step counts from 1 (the step being taken)"));
    }
    Ok(())
}

/// The reference: torch's sequence of tensor ops, element by element. Updates p, m, v in place.
pub fn adamw_reference<G: Grad>(p: &mut [f32], g: &[G], m: &mut [f32], v: &mut [f32], opt: &AdamW, step: u32) -> Result<()> {
    check(p.len(), g.len(), m.len(), v.len(), step)?;
    let s = opt.scalars(step);
    for i in 0..p.len() {
        (p[i], m[i], v[i]) = update(&s, p[i], g[i].f32(), m[i], v[i]);
    }
    Ok(())
}

const CHUNK: usize = 1 << 14;

/// The fast path: the same update in parallel chunks, optionally writing bf16/f16 copies of the
/// new weights in the same pass.
#[allow(clippy::too_many_arguments)]
pub fn adamw_step<G: Grad>(
    p: &mut [f32],
    g: &[G],
    m: &mut [f32],
    v: &mut [f32],
    opt: &AdamW,
    step: u32,
    out_bf16: Option<&mut [bf16]>,
    out_f16: Option<&mut [f16]>,
) -> Result<()> {
    let n = p.len();
    check(n, g.len(), m.len(), v.len(), step)?;
    for (len, what) in [(out_bf16.as_ref().map(|o| o.len()), "bf16"), (out_f16.as_ref().map(|o| o.len()), "f16")] {
        if len.is_some_and(|l| l != n) {
            return Err(crate::shape_err!("adamw: {what} copy has {} elements, p has {n}", len.unwrap()));
        }
    }
    let s = opt.scalars(step);
    let mut bchunks: Vec<Option<&mut [bf16]>> = match out_bf16 {
        Some(o) => o.chunks_mut(CHUNK).map(Some).collect(),
        None => (0..n.div_ceil(CHUNK)).map(|_| None).collect(),
    };
    let mut hchunks: Vec<Option<&mut [f16]>> = match out_f16 {
        Some(o) => o.chunks_mut(CHUNK).map(Some).collect(),
        None => (0..n.div_ceil(CHUNK)).map(|_| None).collect(),
    };
    p.par_chunks_mut(CHUNK)
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK))
        .zip(bchunks.par_iter_mut().zip(hchunks.par_iter_mut()))
        .for_each(|((((p, m), v), g), (ob, oh))| {
            for i in 0..p.len() {
                (p[i], m[i], v[i]) = update(&s, p[i], g[i].f32(), m[i], v[i]);
            }
            if let Some(ob) = ob {
                ob.iter_mut().zip(p.iter()).for_each(|(o, &x)| *o = bf16::from_f32(x));
            }
            if let Some(oh) = oh {
                oh.iter_mut().zip(p.iter()).for_each(|(o, &x)| *o = f16::from_f32(x));
            }
        });
    Ok(())
}
