//! The device backend of [`Ops`]: a CUDA GPU ([`crate::cuda::GpuOps`]) or its CPU emulator
//! (`crate::cuda::EmuOps`, tests), through [`DeviceOps`]. GEMMs go to cuBLASLt (f32, or bf16/f16
//! weight copies with f32 accumulation) and everything else to the kernels of kernels/: the fused
//! LayerNorm (with the residual add) and its backward, bias + activation, the fused attention,
//! row gathers and the patch/class/position assembly. Packed sequences run the variable-length
//! attention kernels (cu_seqlens): one launch, no padding computed. Attention of bf16/f16 towers
//! (the precision of the last [`Ops::weight`] copy, or [`Device::set_attention_dtype`]) runs the
//! tensor-core flash kernels at their head dims (q, k, v converted to the 16-bit type and o back:
//! the activations are f32), the f32 CUDA-core kernels otherwise ([`crate::cuda::flash`] chooses).
//! All launches are queued on one stream; [`Ops::download`] is the only synchronisation.
//!
//! Mixed precision (towers with bf16/f16 weight copies, f32 masters): activations stay f32
//! buffers, and the kernels that produce a half GEMM's input — LayerNorm (h1 for q, k, v; h2 for
//! fc1; the final norms for the projections) and bias + activation (m for fc2) — also write it
//! rounded to the towers' format next to the f32 values ([`Buf::half`]), so q, k and v read one
//! conversion made by the norm itself and no Linear converts its own input. Other inputs (the
//! attention output, the gradients dY) are converted once per use into unzeroed scratch. Every
//! forward and backward GEMM of a half Linear runs on half inputs with f32 accumulation
//! ([`DeviceOps::gemm_half`]): y = x·Wᵀ + b and dX = dY·W from the half weight copy, dW = dYᵀ·X
//! from the half activations into f32 gradients for the f32 masters. The format is the one of the
//! half weights made by [`Ops::weight`] (the first such weight sets it).
use super::{Act, Ops, Seqs, Weight};
use crate::cuda::half_ops::{layernorm_bwd, patch_im2col_half};
use crate::cuda::train_ops::{axpy, bias_act_cfg, col_sums, copy, grid, ln_cfg, reduce_parts, to_half, vec4};
use crate::cuda::{Buf, DeviceOps, HalfGemm, KernelArgs};
use crate::error::Result;
use crate::tensor::DType;
use std::sync::atomic::{AtomicU8, Ordering};

/// A device and the operations the model runs on it.
pub struct Device {
    pub(super) ops: Box<dyn DeviceOps>,
    /// The towers' precision, set by the half weight copies (0 none, 1 bf16, 2 f16): the kernels
    /// that feed their GEMMs also write their output in it, and attention computes in it.
    half: AtomicU8,
}

impl Device {
    pub fn new(ops: Box<dyn DeviceOps>) -> Device {
        Device { ops, half: AtomicU8::new(0) }
    }
    /// The format the towers' half GEMMs read, once a half weight exists.
    pub(super) fn act_half(&self) -> Option<DType> {
        match self.half.load(Ordering::Relaxed) {
            1 => Some(DType::BF16),
            2 => Some(DType::F16),
            _ => None,
        }
    }
    /// x's packed `dt` copy: the one its producer wrote, else a fresh conversion of `n` values.
    pub(super) fn half_of<'a>(&self, x: &'a Buf, dt: DType, n: usize) -> Result<Got<'a>> {
        Ok(match x.half(dt) {
            Some(h) => Got::Kept(h),
            None => Got::Made(to_half(&*self.ops, dt, &*self.f32_of(x)?, n)?),
        })
    }
    /// x's f32 values: x itself, or (a [`Buf::half_only`] buffer) its 16-bit values converted.
    pub(super) fn f32_of<'a>(&self, x: &'a Buf) -> Result<Got<'a>> {
        match x.half_any() {
            Some((dt, h)) if x.is_half_only() => Ok(Got::Made(self.half_to_f32(h, x.len(), dt)?)),
            _ => Ok(Got::Kept(x)),
        }
    }
    /// Gives a [`Buf::half_only`] buffer its f32 values, before an operation changes them in place.
    pub(super) fn make_f32(&self, x: &mut Buf) -> Result<()> {
        if let (Some((dt, h)), true) = (x.half_any(), x.is_half_only()) {
            *x = self.half_to_f32(h, x.len(), dt)?;
        }
        Ok(())
    }
    /// The towers' precision (set by [`Ops::weight`] for half weights): BF16/F16 select the flash
    /// attention kernels where they serve the head dim, and make the kernels that feed half GEMMs
    /// write their half copies.
    pub fn set_attention_dtype(&self, dtype: DType) {
        let code = match dtype {
            DType::F32 => 0,
            DType::BF16 => 1,
            DType::F16 => 2,
        };
        self.half.store(code, Ordering::Relaxed);
    }
    pub fn attention_dtype(&self) -> DType {
        self.act_half().unwrap_or(DType::F32)
    }
    /// A GEMM input from the host (pixels): uploaded in the towers' 16-bit format when they
    /// compute in one (half the bytes over the bus; the patch GEMM rounds them to it anyway), else
    /// f32.
    pub fn upload_input(&self, data: &[f32]) -> Result<Buf> {
        match self.act_half() {
            Some(DType::F16) => {
                Ok(Buf::half_only(DType::F16, self.ops.upload_f16(&data.iter().map(|&v| half::f16::from_f32(v)).collect::<Vec<_>>())?, data.len()))
            }
            Some(_) => Ok(Buf::half_only(DType::BF16, self.ops.upload_bf16(&data.iter().map(|&v| half::bf16::from_f32(v)).collect::<Vec<_>>())?, data.len())),
            None => self.ops.upload(data),
        }
    }
    /// Rows `rows` of a [N, w] matrix of 4-byte words → [R, w].
    fn gather_words(&self, x: &Buf, rows: &[usize], w: usize) -> Result<Buf> {
        let idx = self.ops.upload_i32(&indices(rows)?)?;
        let out = self.ops.alloc_uninit(rows.len() * w)?;
        // pool_rows_f32 with T = 0 reads row index[b] of x for output row b
        let mut a = KernelArgs::new().ptr(x.ptr()).ptr(idx.ptr()).ptr(out.ptr()).i32(rows.len() as i32).i32(0).i32(w as i32);
        self.ops.launch("pool_rows_f32", grid(rows.len() * w), &mut a)?;
        Ok(out)
    }
    /// The driver-level operations (kernel launches, raw GEMMs).
    pub fn raw(&self) -> &dyn DeviceOps {
        &*self.ops
    }
}

/// The `act` argument of the bias_act_*_f32v kernels.
pub(super) fn act_code(a: Act) -> i32 {
    match a {
        Act::QuickGelu => 0,
        Act::Gelu => 1,
    }
}

/// An input in the form an operation reads: the caller's buffer (or its kept 16-bit copy), or a
/// conversion made for this use.
pub(super) enum Got<'a> {
    Kept(&'a Buf),
    Made(Buf),
}

impl std::ops::Deref for Got<'_> {
    type Target = Buf;
    fn deref(&self) -> &Buf {
        match self {
            Got::Kept(b) => b,
            Got::Made(b) => b,
        }
    }
}

/// The LayerNorm forward kernel: f32, or f32 with the half copy for the next GEMM.
fn ln_kernel(residual: bool, half: Option<DType>) -> &'static str {
    match (residual, half) {
        (false, None) => "layernorm_fwd_f32",
        (false, Some(DType::F16)) => "layernorm_fwd_f32_hf16",
        (false, Some(_)) => "layernorm_fwd_f32_hbf16",
        (true, None) => "residual_layernorm_fwd_f32",
        (true, Some(DType::F16)) => "residual_layernorm_fwd_f32_hf16",
        (true, Some(_)) => "residual_layernorm_fwd_f32_hbf16",
    }
}

pub(super) fn indices(rows: &[usize]) -> Result<Vec<i32>> {
    rows.iter().map(|&r| i32::try_from(r).map_err(|_| crate::shape_err!("row index {r} beyond i32"))).collect()
}

impl Ops for Device {
    type Buf = Buf;
    /// The copy's precision and its packed 16-bit values.
    type Half = (DType, Buf);

    fn describe(&self) -> String {
        self.ops.describe()
    }
    fn upload(&self, data: &[f32]) -> Result<Buf> {
        self.ops.upload(data)
    }
    fn download(&self, b: &Buf) -> Result<Vec<f32>> {
        self.ops.download(&*self.f32_of(b)?)
    }
    fn zeros(&self, n: usize) -> Result<Buf> {
        self.ops.alloc(n)
    }
    fn weight(&self, w: Buf, n: usize, k: usize, dtype: DType) -> Result<Weight<Device>> {
        if dtype == DType::F32 {
            return Ok(Weight { w, half: None, n, k });
        }
        self.set_attention_dtype(dtype);
        // the 16-bit copy made on the device (two values per 4-byte element, as upload_bf16 packs)
        let half = to_half(&*self.ops, dtype, &w, n * k)?;
        Ok(Weight { w, half: Some((dtype, half)), n, k })
    }

    fn uninit(&self, n: usize) -> Result<Buf> {
        self.ops.alloc_uninit(n)
    }
    fn linear(&self, x: &Buf, w: &Weight<Device>, bias: Option<&Buf>, m: usize) -> Result<Buf> {
        self.lin(x, w, bias, m, None)
    }
    fn linear_bwd(&self, dy: &Buf, x: &Buf, w: &Weight<Device>, m: usize, dx: &mut Buf, accumulate: bool, bias: bool) -> Result<(Buf, Option<Buf>)> {
        self.lin_bwd(dy, x, w, m, dx, accumulate, bias)
    }
    fn qkv(&self, h: &Buf, w: [&Weight<Device>; 3], b: [&Buf; 3], n: usize, heads: usize) -> Result<[Buf; 3]> {
        self.qkv_fused(h, w, b, n, heads)
    }
    fn linear_act(&self, x: &Buf, w: &Weight<Device>, bias: &Buf, m: usize, act: Act, keep_pre: bool) -> Result<(Buf, Option<Buf>)> {
        self.lin_act(x, w, bias, m, act, keep_pre)
    }
    fn linear_add(&self, x: &Buf, w: &Weight<Device>, bias: &Buf, m: usize, res: &Buf) -> Result<Buf> {
        self.lin_add(x, w, bias, m, res)
    }
    fn layernorm_for_linear(&self, x: &Buf, g: &Buf, b: &Buf, rows: usize, w: usize, eps: f32) -> Result<(Buf, Buf)> {
        self.ln_for_linear(x, g, b, rows, w, eps)
    }

    /// f32 only: a LayerNorm that feeds GEMMs is [`Ops::layernorm_for_linear`].
    fn layernorm(&self, x: &Buf, g: &Buf, b: &Buf, rows: usize, w: usize, eps: f32) -> Result<(Buf, Buf)> {
        let x = self.f32_of(x)?;
        let (y, st) = (self.ops.alloc_uninit(rows * w)?, self.ops.alloc_uninit(2 * rows)?); // stats: mean [rows], rstd [rows]
        let a = KernelArgs::new().ptr(x.ptr()).ptr(g.ptr()).ptr(b.ptr()).ptr(y.ptr());
        let mut a = a.ptr(st.ptr()).ptr(st.ptr() + 4 * rows as u64).i32(rows as i32).i32(w as i32).f32(eps);
        self.ops.launch(ln_kernel(false, None), ln_cfg(rows), &mut a)?;
        Ok((y, st))
    }

    fn add_layernorm(&self, x: &mut Buf, f: &Buf, g: &Buf, b: &Buf, rows: usize, w: usize, eps: f32) -> Result<(Buf, Buf)> {
        let (mut y, st) = (self.ops.alloc_uninit(rows * w)?, self.ops.alloc_uninit(2 * rows)?);
        let half = self.act_half();
        let yh = half.map(|_| self.ops.alloc_uninit((rows * w).div_ceil(2))).transpose()?; // [rows, w] halves
        self.make_f32(x)?;
        let f = self.f32_of(f)?;
        x.clear_half(); // x += f below
        let mut a = KernelArgs::new().ptr(x.ptr()).ptr(f.ptr()).ptr(g.ptr()).ptr(b.ptr()).ptr(y.ptr());
        if let Some(h) = &yh {
            a = a.ptr(h.ptr());
        }
        let mut a = a.ptr(st.ptr()).ptr(st.ptr() + 4 * rows as u64).i32(rows as i32).i32(w as i32).f32(eps);
        self.ops.launch(ln_kernel(true, half), ln_cfg(rows), &mut a)?;
        if let (Some(dt), Some(h)) = (half, yh) {
            y.set_half(dt, h);
        }
        Ok((y, st))
    }

    fn layernorm_bwd_add(&self, dy: &Buf, x: &Buf, g: &Buf, st: &Buf, rows: usize, w: usize, _eps: f32, res: &Buf) -> Result<(Buf, Buf, Buf)> {
        layernorm_bwd(&*self.ops, &*self.f32_of(dy)?, &*self.f32_of(x)?, g, st, Some(&*self.f32_of(res)?), rows, w)
    }
    fn layernorm_bwd(&self, dy: &Buf, x: &Buf, g: &Buf, st: &Buf, rows: usize, w: usize, _eps: f32) -> Result<(Buf, Buf, Buf)> {
        layernorm_bwd(&*self.ops, &*self.f32_of(dy)?, &*self.f32_of(x)?, g, st, None, rows, w)
    }

    fn bias_act(&self, mut u: Buf, bias: &Buf, rows: usize, n: usize, act: Act, keep_pre: bool) -> Result<(Buf, Option<Buf>)> {
        self.make_f32(&mut u)?;
        let pre = if keep_pre { Some(self.ops.alloc_uninit(rows * n)?) } else { None };
        let half = self.act_half();
        let uh = half.map(|_| self.ops.alloc_uninit((rows * n).div_ceil(2))).transpose()?; // [rows, n] halves
        let pre_ptr = pre.as_ref().map_or(0, |p| p.ptr());
        let vec = vec4(n, &[u.ptr(), bias.ptr(), pre_ptr]) && uh.as_ref().is_none_or(|h| h.ptr().is_multiple_of(8));
        let kernel = match half {
            None => "bias_act_fwd_f32v",
            Some(DType::F16) => "bias_act_fwd_f32_hf16",
            Some(_) => "bias_act_fwd_f32_hbf16",
        };
        let mut a = KernelArgs::new().ptr(u.ptr()).ptr(bias.ptr()).ptr(pre_ptr);
        if let Some(h) = &uh {
            a = a.ptr(h.ptr());
        }
        let mut a = a.i32(rows as i32).i32(n as i32).i32(act_code(act)).i32(vec as i32);
        self.ops.launch(kernel, bias_act_cfg(rows, n, vec), &mut a)?; // u = act(u + bias) in place (+ its half copy)
        u.clear_half();
        if let (Some(dt), Some(h)) = (half, uh) {
            u.set_half(dt, h);
        }
        Ok((u, pre))
    }

    fn bias_act_bwd(&self, dout: &Buf, pre: &Buf, rows: usize, n: usize, act: Act) -> Result<(Buf, Buf)> {
        if let Some(r) = self.act_bwd(dout, pre, rows, n, act)? {
            return Ok(r); // a 16-bit pre-activation (linear_act of a 16-bit weight)
        }
        let (dout, pre) = (self.f32_of(dout)?, self.f32_of(pre)?);
        let du = self.ops.alloc_uninit(rows * n)?;
        let mut vec = vec4(n, &[dout.ptr(), pre.ptr(), du.ptr()]);
        let mut cfg = bias_act_cfg(rows, n, vec);
        let mut partial = self.ops.alloc_uninit(cfg.grid.1 as usize * n)?; // [parts, n]: every column of every chunk written
        if vec && !partial.ptr().is_multiple_of(16) {
            (vec, cfg) = (false, bias_act_cfg(rows, n, false));
            partial = self.ops.alloc_uninit(cfg.grid.1 as usize * n)?;
        }
        let parts = cfg.grid.1 as usize;
        let mut a =
            KernelArgs::new().ptr(dout.ptr()).ptr(pre.ptr()).ptr(du.ptr()).ptr(partial.ptr()).i32(rows as i32).i32(n as i32).i32(act_code(act)).i32(vec as i32);
        self.ops.launch("bias_act_bwd_f32v", cfg, &mut a)?;
        Ok((du, reduce_parts(&*self.ops, &partial, parts, n)?))
    }

    fn attention(&self, q: &Buf, k: &Buf, v: &Buf, seqs: &Seqs, heads: usize, w: usize) -> Result<(Buf, Buf)> {
        self.attn_fwd(q, k, v, seqs, heads, w)
    }
    fn attention_bwd(&self, q: &Buf, k: &Buf, v: &Buf, o: &Buf, lse: &Buf, d_o: &Buf, seqs: &Seqs, heads: usize, w: usize) -> Result<(Buf, Buf, Buf)> {
        self.attn_bwd(q, k, v, o, lse, d_o, seqs, heads, w)
    }

    fn copy(&self, x: &Buf, n: usize) -> Result<Buf> {
        match self.f32_of(x)? {
            Got::Made(y) if y.len() == n => Ok(y), // a half-only x: its conversion is the copy
            x => copy(&*self.ops, &x, n),
        }
    }
    fn axpy(&self, y: &mut Buf, x: &Buf, alpha: f32, n: usize) -> Result<()> {
        self.make_f32(y)?;
        y.clear_half();
        axpy(&*self.ops, y, &*self.f32_of(x)?, alpha, n)
    }

    fn gather_rows(&self, x: &Buf, rows: &[usize], w: usize) -> Result<Buf> {
        if let (Some((dt, h)), true, true) = (x.half_any(), x.is_half_only(), w.is_multiple_of(2)) {
            // 16-bit rows of even width are w/2 packed 4-byte words: gathered as such, still 16-bit
            let out = self.gather_words(h, rows, w / 2)?; // [R, w] 16-bit
            return Ok(Buf::half_only(dt, out, rows.len() * w));
        }
        let x = self.f32_of(x)?;
        self.gather_words(&x, rows, w)
    }

    fn scatter_rows(&self, d: &Buf, rows: &[usize], n: usize, w: usize) -> Result<Buf> {
        if let Some(&r) = rows.iter().find(|&&r| r >= n) {
            return Err(crate::shape_err!("scatter_rows: row {r} of {n}"));
        }
        let d = self.f32_of(d)?;
        let idx = self.ops.upload_i32(&indices(rows)?)?;
        let out = self.ops.alloc(n * w)?; // zeros
        let mut a = KernelArgs::new().ptr(d.ptr()).ptr(idx.ptr()).ptr(out.ptr()).i32(rows.len() as i32).i32(0).i32(w as i32);
        self.ops.launch("unpool_rows_f32", grid(rows.len() * w), &mut a)?;
        Ok(out)
    }

    fn patch_embed(&self, px: &Buf, w: &Weight<Device>, b: usize, c: usize, s: usize, p: usize) -> Result<Buf> {
        let n = (s / p) * (s / p);
        if let (Some((dt, h)), true) = (px.half_any(), px.is_half_only()) {
            let cols = Buf::half_only(dt, patch_im2col_half(&*self.ops, h, b, c, s, p)?, b * n * c * p * p); // [B·N, C·P·P] 16-bit
            return self.linear(&cols, w, None, b * n); // [B·N, D]
        }
        let cols = self.ops.alloc_uninit(b * n * c * p * p)?; // [B·N, C·P·P]
        let mut a = KernelArgs::new().ptr(px.ptr()).ptr(cols.ptr()).i32(b as i32).i32(c as i32).i32(s as i32).i32(p as i32);
        self.ops.launch("patch_im2col_f32", grid(b * n * c * p * p), &mut a)?;
        self.linear(&cols, w, None, b * n) // [B·N, D]
    }

    fn patch_embed_bwd(&self, px: &Buf, dpatches: &Buf, b: usize, c: usize, s: usize, p: usize, d: usize) -> Result<Buf> {
        let (n, k) = ((s / p) * (s / p), c * p * p);
        let dpatches = self.f32_of(dpatches)?;
        let cols = match px.half_any() {
            Some((dt, h)) if px.is_half_only() => Buf::half_only(dt, patch_im2col_half(&*self.ops, h, b, c, s, p)?, b * n * k), // [B·N, C·P·P] 16-bit
            _ => {
                let cols = self.ops.alloc_uninit(b * n * k)?; // [B·N, C·P·P]
                let mut a = KernelArgs::new().ptr(px.ptr()).ptr(cols.ptr()).i32(b as i32).i32(c as i32).i32(s as i32).i32(p as i32);
                self.ops.launch("patch_im2col_f32", grid(b * n * k), &mut a)?;
                cols
            }
        };
        let dw = self.ops.alloc_uninit(d * k)?;
        match self.act_half() {
            Some(dt) => {
                // 16-bit towers: from the 16-bit d(patches) and pixels, f32 sums (the patch weight has its 16-bit copy)
                let (dph, ch) = (self.half_of(&dpatches, dt, b * n * d)?, self.half_of(&cols, dt, b * n * k)?);
                self.ops.gemm_half(&HalfGemm::new(dt, &dph, &ch, &dw, (d, k, b * n), true, false))?;
                // dW = dpatchesᵀ·cols
            }
            None => self.ops.gemm(&dpatches, &cols, &dw, d, k, b * n, true, false, 0.0)?, // dW = dpatchesᵀ·cols
        }
        Ok(dw)
    }

    fn vision_embed_bwd(&self, dx: &Buf, b: usize, n: usize, w: usize) -> Result<(Buf, Buf, Buf)> {
        let t = n + 1;
        let dx = &*self.f32_of(dx)?;
        let dp = self.ops.alloc_uninit(b * n * w)?;
        let mut a = KernelArgs::new().ptr(dx.ptr()).ptr(dp.ptr()).i32(b as i32).i32(n as i32).i32(w as i32);
        self.ops.launch("vision_embed_bwd_f32", grid(b * n * w), &mut a)?;
        let dpos = col_sums(&*self.ops, dx, b, t * w)?; // [T, W]: the batch sum
        let cls_rows: Vec<usize> = (0..b).map(|i| i * t).collect();
        let dcls = col_sums(&*self.ops, &self.gather_rows(dx, &cls_rows, w)?, b, w)?;
        Ok((dp, dcls, dpos))
    }

    fn embedding_bwd(&self, dx: &Buf, ids: &[usize], table: &mut Buf, w: usize) -> Result<()> {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        let (order, starts, uniq) = crate::ops::embedding::group_by_id(&ids);
        let u = uniq.len();
        let (order, starts, uniq) = (self.ops.upload_i32(&order)?, self.ops.upload_i32(&starts)?, self.ops.upload_i32(&uniq)?);
        self.make_f32(table)?;
        table.clear_half();
        let dx = self.f32_of(dx)?;
        let mut a = KernelArgs::new().ptr(dx.ptr()).ptr(order.ptr()).ptr(starts.ptr()).ptr(uniq.ptr()).ptr(table.ptr()).i32(u as i32).i32(w as i32);
        self.ops.launch("embedding_bwd_rows_f32", grid(u * w), &mut a)
    }

    fn vision_embed(&self, patches: &Buf, cls: &Buf, pos: &Buf, b: usize, n: usize, w: usize) -> Result<Buf> {
        let x = self.ops.alloc_uninit(b * (n + 1) * w)?; // [B·T, W]
        let patches = self.f32_of(patches)?;
        let mut a = KernelArgs::new().ptr(patches.ptr()).ptr(cls.ptr()).ptr(pos.ptr()).ptr(x.ptr()).i32(b as i32).i32(n as i32).i32(w as i32);
        self.ops.launch("vision_embed_assemble_f32", grid(b * (n + 1) * w), &mut a)?;
        Ok(x)
    }
}

#[cfg(all(test, feature = "emu"))]
#[path = "device_tests.rs"]
mod tests;
