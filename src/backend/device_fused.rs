//! The device backend's Linears ([`Device`]): plain, with bias + activation, with the residual
//! add, the three attention projections, and their backwards. A Linear with a bf16/f16 weight copy
//! runs one tensor-core GEMM on 16-bit inputs with f32 accumulation ([`DeviceOps::gemm_half`]),
//! whose epilogue adds the bias and the residual (C) and, where every reader takes 16-bit values,
//! rounds the output to 16 bits as it is stored ([`Buf::half_only`]): q, k, v for the flash
//! attention, the MLP's pre-activation. f32 weights run the f32 GEMMs.
//!
//! Rounding points of a 16-bit tower (the CPU bf16 towers and the rounding reference of the tests
//! round at the same points): every GEMM input; q, k, v and the attention output (the flash
//! kernels' 16-bit tensors); the MLP's pre-activation x·W1ᵀ + b1 (the GEMM's 16-bit output),
//! whose activation is computed in f32 from it and rounded again for the next GEMM. The residual
//! stream, LayerNorm statistics, softmax and every gradient sum stay f32.
use super::device::{act_code, Device};
use super::{Act, Ops, Weight};
use crate::cuda::half_ops::{act_bwd_half, act_half, col_sums_half, layernorm_half};
use crate::cuda::train_ops::col_sums;
use crate::cuda::{Buf, DeviceOps, HalfGemm};
use crate::error::Result;
use crate::tensor::DType;

impl Device {
    /// y [m, n] = x·Wᵀ (+ bias) (+ res), f32.
    pub(super) fn lin(&self, x: &Buf, w: &Weight<Device>, bias: Option<&Buf>, m: usize, res: Option<&Buf>) -> Result<Buf> {
        let ops: &dyn DeviceOps = &*self.ops;
        let y = ops.alloc_uninit(m * w.n)?; // [m, n]
        match &w.half {
            Some((dt, h)) => {
                let xh = self.half_of(x, *dt, m * w.k)?; // [m, k] halves
                let res = res.map(|r| self.f32_of(r)).transpose()?;
                let g = HalfGemm { bias, c: res.as_deref(), ..HalfGemm::new(*dt, &xh, h, &y, (m, w.n, w.k), false, true) };
                ops.gemm_half(&g)?;
            }
            None => {
                ops.linear(&*self.f32_of(x)?, &w.w, bias, &y, m, w.n, w.k)?;
                if let Some(r) = res {
                    crate::cuda::train_ops::axpy(ops, &y, &*self.f32_of(r)?, 1.0, m * w.n)?;
                    // y += res
                }
            }
        }
        Ok(y)
    }

    /// y [m, n] = x·Wᵀ + bias rounded to the weight's 16-bit format, held only in it.
    fn lin_half_out(&self, x: &Buf, w: &Weight<Device>, dt: DType, h: &Buf, bias: Option<&Buf>, m: usize) -> Result<Buf> {
        let xh = self.half_of(x, dt, m * w.k)?; // [m, k] halves
        let y = self.ops.alloc_uninit((m * w.n).div_ceil(2))?; // [m, n] halves
        self.ops.gemm_half(&HalfGemm { bias, half_out: true, ..HalfGemm::new(dt, &xh, h, &y, (m, w.n, w.k), false, true) })?;
        Ok(Buf::half_only(dt, y, m * w.n))
    }

    /// The backward of a Linear from dy [m, n]: dx [m, k] written (or accumulated), dW, db.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn lin_bwd(&self, dy: &Buf, x: &Buf, w: &Weight<Device>, m: usize, dx: &mut Buf, accumulate: bool, bias: bool) -> Result<(Buf, Option<Buf>)> {
        let ops: &dyn DeviceOps = &*self.ops;
        let (n, k) = (w.n, w.k);
        if accumulate {
            self.make_f32(dx)?;
        }
        dx.clear_half();
        let dw = ops.alloc_uninit(n * k)?;
        match &w.half {
            Some((dt, h)) => {
                let dyh = self.half_of(dy, *dt, m * n)?; // [m, n] halves, for both GEMMs
                let c = accumulate.then_some(&*dx);
                ops.gemm_half(&HalfGemm { c, ..HalfGemm::new(*dt, &dyh, h, dx, (m, k, n), false, false) })?; // dx (+)= dy·W, half W
                let xh = self.half_of(x, *dt, m * k)?; // [m, k]
                ops.gemm_half(&HalfGemm::new(*dt, &dyh, &xh, &dw, (n, k, m), true, false))?;
                // dW = dyᵀ·x in f32
            }
            None => {
                let (dy, x) = (self.f32_of(dy)?, self.f32_of(x)?);
                let beta = if accumulate { 1.0 } else { 0.0 };
                ops.gemm(&dy, &w.w, dx, m, k, n, false, false, beta)?; // dx (+)= dy·W
                ops.gemm(&dy, &x, &dw, n, k, m, true, false, 0.0)?; // dW = dyᵀ·x (C not read with beta 0)
            }
        }
        let db = match (bias, dy.half_any()) {
            (false, _) => None,
            (true, Some((dt, h))) if dy.is_half_only() => Some(col_sums_half(ops, dt, h, m, n)?), // the 16-bit dy's sums in f32
            (true, _) => Some(col_sums(ops, dy, m, n)?),
        };
        Ok((dw, db))
    }

    /// q, k, v: 16-bit outputs of the GEMMs when the flash kernels take them (the towers' format
    /// and a head dim they serve), else f32.
    pub(super) fn qkv_fused(&self, h: &Buf, w: [&Weight<Device>; 3], b: [&Buf; 3], n: usize, heads: usize) -> Result<[Buf; 3]> {
        let width = w[0].n;
        let flash = self.flash_dtype(heads, width);
        let mut out = Vec::with_capacity(3);
        for (w, b) in w.into_iter().zip(b) {
            out.push(match (&w.half, flash) {
                (Some((dt, hw)), Some(f)) if *dt == f => self.lin_half_out(h, w, *dt, hw, Some(b), n)?, // [n, W] 16-bit
                _ => self.lin(h, w, Some(b), n, None)?,                                                 // [n, W]
            });
        }
        out.try_into().map_err(|_| crate::error::Error::msg("qkv: three outputs"))
    }

    /// act(x·W1ᵀ + b1): with a 16-bit weight, the GEMM writes the pre-activation rounded to 16 bits
    /// (kept, 16-bit only, for the backward) and the activation of those values is rounded again
    /// for the next GEMM; with f32 weights, the f32 Linear and the bias + activation kernel.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn lin_act(&self, x: &Buf, w: &Weight<Device>, bias: &Buf, m: usize, act: Act, keep_pre: bool) -> Result<(Buf, Option<Buf>)> {
        let Some((dt, hw)) = &w.half else {
            let u = self.lin(x, w, None, m, None)?; // [m, n]
            return self.bias_act(u, bias, m, w.n, act, keep_pre);
        };
        let n = w.n;
        let pre = self.lin_half_out(x, w, *dt, hw, Some(bias), m)?; // [m, n] 16-bit
        let (_, ph) = pre.half_any().ok_or_else(|| crate::error::Error::msg("linear_act: no 16-bit pre-activation"))?;
        let out = Buf::half_only(*dt, act_half(&*self.ops, *dt, ph, m, n, act_code(act))?, m * n); // [m, n] 16-bit
        Ok((out, keep_pre.then_some(pre)))
    }

    /// The backward of the activation from a 16-bit pre-activation: du in 16 bits only (read by
    /// the fc1 backward GEMMs), the bias gradient from the f32 du.
    pub(super) fn act_bwd(&self, dout: &Buf, pre: &Buf, rows: usize, n: usize, act: Act) -> Result<Option<(Buf, Buf)>> {
        match pre.half_any() {
            Some((dt, ph)) if pre.is_half_only() => {
                let (du, db) = act_bwd_half(&*self.ops, dt, &*self.f32_of(dout)?, ph, rows, n, act_code(act))?;
                Ok(Some((Buf::half_only(dt, du, rows * n), db)))
            }
            _ => Ok(None),
        }
    }

    /// y = res + x·Wᵀ + bias in one GEMM (C = res) for a 16-bit weight.
    pub(super) fn lin_add(&self, x: &Buf, w: &Weight<Device>, bias: &Buf, m: usize, res: &Buf) -> Result<Buf> {
        self.lin(x, w, Some(bias), m, Some(res))
    }

    /// LayerNorm whose output feeds Linears only: 16-bit only when the towers compute in 16 bits.
    pub(super) fn ln_for_linear(&self, x: &Buf, g: &Buf, b: &Buf, rows: usize, w: usize, eps: f32) -> Result<(Buf, Buf)> {
        match self.act_half() {
            Some(dt) => {
                let (y, st) = layernorm_half(&*self.ops, dt, &*self.f32_of(x)?, g, b, rows, w, eps)?; // [rows, w] 16-bit, stats
                Ok((Buf::half_only(dt, y, rows * w), st))
            }
            None => self.layernorm(x, g, b, rows, w, eps),
        }
    }
}
