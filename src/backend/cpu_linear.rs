//! The CPU backend's Linear GEMMs: a weight's packed copies ([`CpuPacked`]: bf16 for a bf16
//! model, f32 panels once frozen for inference), the forward GEMMs (`linear32` through the f32
//! GEMM, `gemm16` through the bf16 one), the bf16 backward (`linear_bwd_bf16`) and the helpers
//! that hand a GEMM's output buffers over without zero-filling them first.
use super::cpu::{check, vec1, vec1_bf16, Cpu};
use super::Weight;
use crate::error::Result;
use crate::ops::fastmath::par_rows;
use crate::ops::gemm_bf16::{matmul_bf16, matmul_bf16_acc, matmul_bf16_fused, Kernel, PackedBf16};
use crate::ops::gemm_epilogue::Epilogue;
use crate::ops::gemm_f32_pack::PackedB;
use crate::ops::matmul::{linear_into, linear_packed_into};
use crate::tensor::Tensor;
use half::bf16;
use std::sync::OnceLock;
/// A Linear weight's bf16 copies: `fwd` packed for y = x·Wᵀ, and Wᵀ for dx = dy·W (packed from
/// the f32 master on the first backward).
#[derive(Debug)]
pub struct CpuHalf {
    pub fwd: PackedBf16,
    bwd: OnceLock<PackedBf16>,
}

impl CpuHalf {
    /// The forward copy; Wᵀ is packed on the first backward.
    pub(super) fn new(fwd: PackedBf16) -> Self {
        CpuHalf { fwd, bwd: OnceLock::new() }
    }
}

/// The CPU's copy of a Linear weight for its forward GEMM: bf16 ([`CpuHalf`], a bf16 model), or
/// the f32 values packed once for the AVX-512 GEMM ([`Ops::freeze_weight`](super::Ops::freeze_weight): inference).
#[derive(Debug)]
pub enum CpuPacked {
    Bf16(CpuHalf),
    F32(PackedB),
}

/// The weight's bf16 copies, when it computes in bf16.
pub(super) fn bf16_of(w: &Weight<Cpu>) -> Option<&CpuHalf> {
    match w.half.as_deref() {
        Some(CpuPacked::Bf16(h)) => Some(h),
        _ => None,
    }
}

/// dx[m×k] (+)= dy[m×n]·W and dW[n×k] = dyᵀ·x with bf16 inputs, f32 accumulation, x given as
/// xᵀ packed (`PackedBf16::from_f32_t`: `Ops::qkv_bwd` packs one for q, k and v); with `bias`,
/// also db = Σ_rows dy (f32, `transpose_bf16_sums`' fixed order).
#[allow(clippy::too_many_arguments)]
pub(super) fn linear_bwd_bf16(
    g: &[f32],
    xt: &PackedBf16,
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
    let fill = |dw: &mut [f32]| {
        matmul_bf16_fused(&gt, n, xt, None, dw, Epilogue::None, Kernel::Auto); // dW = dyᵀ·x [n, k]
        Ok(())
    };
    // SAFETY: `matmul_bf16` writes every element of its output (see `written32`): no zero-fill.
    Ok((unsafe { written32(n * k, fill) }?, db))
}

/// res + y over the first `n` values, in y's buffer (res first: the residual stream's order of addition).
pub(super) fn add_into(y: Tensor, res: &Tensor, n: usize) -> Result<Tensor> {
    let r = res.f32_data();
    check("residual", r.len(), n)?;
    let mut v = y.into_f32_vec();
    check("residual add", v.len(), n)?;
    par_rows(&mut v[..n], 4096, |i, row| row.iter_mut().zip(&r[i * 4096..]).for_each(|(a, b)| *a += *b)); // f32 addition commutes: res + y
    vec1(v)
}

/// c [m, n] = epi(x [m, k]·Wᵀ + bias) through the bf16 GEMM: x bf16 (an activation kept in 16
/// bits, packed as it is) or f32 (rounded while packing).
pub(super) fn gemm16(x: &Tensor, m: usize, k: usize, p: &PackedBf16, bias: Option<&[f32]>, c: &mut [f32], epi: Epilogue) -> Result<()> {
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
pub(super) unsafe fn written32(n: usize, fill: impl FnOnce(&mut [f32]) -> Result<()>) -> Result<Vec<f32>> {
    // SAFETY: the caller's contract.
    unsafe { crate::ops::fastmath::written_by(n, fill) }
}

/// (out, pre) of `n` values each, filled by `run(pre, out)`: a Linear writing C = the
/// pre-activation and its epilogue the activation (no zero-fill of either).
///
/// # Safety
/// `run` writes both buffers in full (as [`written32`]'s `fill`).
pub(super) unsafe fn written_pair(n: usize, run: impl FnOnce(&mut [f32], &mut [f32]) -> Result<()>) -> Result<(Vec<f32>, Vec<f32>)> {
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
pub(super) fn linear32(x: &Tensor, m: usize, w: &Weight<Cpu>, bias: Option<&[f32]>, c: &mut [f32], epi: Epilogue) -> Result<()> {
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
pub(super) unsafe fn gemm16_to_bf16(n: usize, run: impl FnOnce(&mut [bf16]) -> Result<()>) -> Result<Tensor> {
    // SAFETY: the caller's contract.
    let out = unsafe { crate::ops::fastmath::written_by(n, run) }; // [n] bf16
    vec1_bf16(out?)
}
