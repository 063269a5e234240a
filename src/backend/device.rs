//! The device backend of [`Ops`]: a CUDA GPU ([`crate::cuda::GpuOps`]) or its CPU emulator
//! ([`crate::cuda::EmuOps`], tests), through [`DeviceOps`]. GEMMs go to cuBLASLt (f32, or bf16/f16
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
use crate::cuda::attention::KernelLaunch;
use crate::cuda::flash::{best_launch, best_varlen_launch};
use crate::cuda::train_ops::{axpy, bias_act_cfg, col_sums, copy, grid, ln_bwd_cfg, ln_cfg, reduce_parts, to_half, vec4};
use crate::cuda::{Buf, DeviceOps, KernelArgs};
use crate::error::Result;
use crate::ops::attention::AttnShape;
use crate::tensor::DType;
use std::sync::atomic::{AtomicU8, Ordering};

/// A device and the operations the model runs on it.
pub struct Device {
    ops: Box<dyn DeviceOps>,
    /// The towers' precision, set by the half weight copies (0 none, 1 bf16, 2 f16): the kernels
    /// that feed their GEMMs also write their output in it, and attention computes in it.
    half: AtomicU8,
}

impl Device {
    pub fn new(ops: Box<dyn DeviceOps>) -> Device {
        Device { ops, half: AtomicU8::new(0) }
    }
    /// The format the towers' half GEMMs read, once a half weight exists.
    fn act_half(&self) -> Option<DType> {
        match self.half.load(Ordering::Relaxed) {
            1 => Some(DType::BF16),
            2 => Some(DType::F16),
            _ => None,
        }
    }
    /// x's packed `dt` copy: the one its producer wrote, else a fresh conversion of `n` values.
    fn half_of<'a>(&self, x: &'a Buf, dt: DType, n: usize) -> Result<HalfIn<'a>> {
        Ok(match x.half(dt) {
            Some(h) => HalfIn::Kept(h),
            None => HalfIn::Made(to_half(&*self.ops, dt, x, n)?),
        })
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
    /// The driver-level operations (kernel launches, raw GEMMs).
    pub fn raw(&self) -> &dyn DeviceOps {
        &*self.ops
    }
}

/// The `act` argument of the bias_act_*_f32v kernels.
fn act_code(a: Act) -> i32 {
    match a {
        Act::QuickGelu => 0,
        Act::Gelu => 1,
    }
}

/// The shape arguments that follow the tensors of an attention launch.
enum AttnTail {
    /// B, T of a batch, causal.
    Batch(usize, usize, bool),
    /// The packed sequences' offsets (uploaded), their count and the longest.
    Varlen(Buf, usize, usize),
}

impl AttnTail {
    fn append(&self, a: KernelArgs, heads: usize, w: usize) -> KernelArgs {
        let d = w / heads.max(1);
        let a = match self {
            AttnTail::Batch(b, t, _) => a.i32(*b as i32).i32(*t as i32),
            AttnTail::Varlen(cu, n, tmax) => a.ptr(cu.ptr()).i32(*n as i32).i32(*tmax as i32),
        };
        let causal = match self {
            AttnTail::Batch(_, _, c) => *c,
            AttnTail::Varlen(..) => true,
        };
        a.i32(heads as i32).i32(d as i32).i32(causal as i32).f32(1.0 / (d as f32).sqrt())
    }
}

impl Device {
    /// The launch of a grouping: the batched kernel, or (packed sequences) the variable-length
    /// kernel over cu_seqlens — one launch either way, no padding computed.
    /// `dt`: the tensors' type (F32, or BF16/F16 where the flash kernels serve the head dim).
    fn attention_launch(&self, seqs: &Seqs, heads: usize, w: usize, backward: bool, dt: DType) -> Result<(KernelLaunch, AttnTail)> {
        let d = w / heads.max(1);
        match seqs {
            Seqs::Batch { batch, seq, causal } => {
                let s = AttnShape { batch: *batch, seq: *seq, heads, head_dim: d, causal: *causal, scale: 1.0 / (d as f32).sqrt() };
                let l = best_launch(&s, dt, backward)?;
                Ok((l, AttnTail::Batch(*batch, *seq, *causal)))
            }
            Seqs::Packed(lens) => {
                let tmax = lens.iter().copied().max().unwrap_or(0);
                let cu: Vec<usize> = std::iter::once(0).chain(lens.iter().scan(0, |o, &l| Some(std::mem::replace(o, *o + l) + l))).collect();
                let cu = self.ops.upload_i32(&indices(&cu)?)?;
                Ok((best_varlen_launch(lens.len(), tmax, heads, d, dt, backward)?, AttnTail::Varlen(cu, lens.len(), tmax)))
            }
        }
    }

    /// The 16-bit type attention runs in for this head dim, if the flash kernels serve it.
    fn flash_dtype(&self, heads: usize, w: usize) -> Option<DType> {
        let dt = self.attention_dtype();
        crate::cuda::flash::supported(dt, w / heads.max(1)).then_some(dt)
    }
    /// 16-bit [n] -> f32 [n].
    fn half_to_f32(&self, h: &Buf, n: usize, dt: DType) -> Result<Buf> {
        let x = self.ops.alloc_uninit(n)?;
        let k = if dt == DType::F16 { "f16_to_f32" } else { "bf16_to_f32" };
        self.ops.launch(k, grid(n), &mut KernelArgs::new().ptr(h.ptr()).ptr(x.ptr()).i32(n as i32))?;
        Ok(x)
    }
}

/// A half GEMM input: kept next to its f32 values, or converted for this use.
enum HalfIn<'a> {
    Kept(&'a Buf),
    Made(Buf),
}

impl std::ops::Deref for HalfIn<'_> {
    type Target = Buf;
    fn deref(&self) -> &Buf {
        match self {
            HalfIn::Kept(b) => b,
            HalfIn::Made(b) => b,
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

fn indices(rows: &[usize]) -> Result<Vec<i32>> {
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
        self.ops.download(b)
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

    fn linear(&self, x: &Buf, w: &Weight<Device>, bias: Option<&Buf>, m: usize) -> Result<Buf> {
        let y = self.ops.alloc_uninit(m * w.n)?; // [m, n]
        match &w.half {
            Some((dt, h)) => {
                let xh = self.half_of(x, *dt, m * w.k)?; // [m, k] halves
                self.ops.gemm_half(*dt, &xh, h, bias, &y, m, w.n, w.k, false, true, 0.0)?
            }
            None => self.ops.linear(x, &w.w, bias, &y, m, w.n, w.k)?,
        }
        Ok(y)
    }

    fn linear_bwd(&self, dy: &Buf, x: &Buf, w: &Weight<Device>, m: usize, dx: &mut Buf, accumulate: bool, bias: bool) -> Result<(Buf, Option<Buf>)> {
        let (n, k) = (w.n, w.k);
        let beta = if accumulate { 1.0 } else { 0.0 };
        dx.clear_half();
        let dw = self.ops.alloc_uninit(n * k)?;
        match &w.half {
            Some((dt, h)) => {
                let dyh = to_half(&*self.ops, *dt, dy, m * n)?; // [m, n] halves, for both GEMMs
                self.ops.gemm_half(*dt, &dyh, h, None, dx, m, k, n, false, false, beta)?; // dx (+)= dy·W, half W
                let xh = self.half_of(x, *dt, m * k)?; // [m, k]
                self.ops.gemm_half(*dt, &dyh, &xh, None, &dw, n, k, m, true, false, 0.0)?;
                // dW = dyᵀ·x in f32
            }
            None => {
                self.ops.gemm(dy, &w.w, dx, m, k, n, false, false, beta)?; // dx (+)= dy·W
                self.ops.gemm(dy, x, &dw, n, k, m, true, false, 0.0)?; // dW = dyᵀ·x (C not read with beta 0)
            }
        }
        let db = if bias { Some(col_sums(&*self.ops, dy, m, n)?) } else { None };
        Ok((dw, db))
    }

    fn layernorm(&self, x: &Buf, g: &Buf, b: &Buf, rows: usize, w: usize, eps: f32) -> Result<(Buf, Buf)> {
        let (mut y, st) = (self.ops.alloc_uninit(rows * w)?, self.ops.alloc_uninit(2 * rows)?); // stats: mean [rows], rstd [rows]
        let half = self.act_half();
        let yh = half.map(|_| self.ops.alloc_uninit((rows * w).div_ceil(2))).transpose()?; // [rows, w] halves
        let mut a = KernelArgs::new().ptr(x.ptr()).ptr(g.ptr()).ptr(b.ptr()).ptr(y.ptr());
        if let Some(h) = &yh {
            a = a.ptr(h.ptr());
        }
        let mut a = a.ptr(st.ptr()).ptr(st.ptr() + 4 * rows as u64).i32(rows as i32).i32(w as i32).f32(eps);
        self.ops.launch(ln_kernel(false, half), ln_cfg(rows), &mut a)?;
        if let (Some(dt), Some(h)) = (half, yh) {
            y.set_half(dt, h);
        }
        Ok((y, st))
    }

    fn add_layernorm(&self, x: &mut Buf, f: &Buf, g: &Buf, b: &Buf, rows: usize, w: usize, eps: f32) -> Result<(Buf, Buf)> {
        let (mut y, st) = (self.ops.alloc_uninit(rows * w)?, self.ops.alloc_uninit(2 * rows)?);
        let half = self.act_half();
        let yh = half.map(|_| self.ops.alloc_uninit((rows * w).div_ceil(2))).transpose()?; // [rows, w] halves
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

    fn layernorm_bwd(&self, dy: &Buf, x: &Buf, g: &Buf, st: &Buf, rows: usize, w: usize, _eps: f32) -> Result<(Buf, Buf, Buf)> {
        let ops = &*self.ops;
        let cfg = ln_bwd_cfg(rows); // row chunks for ≥ 1 wave at real shapes
        let parts = cfg.grid.0 as usize;
        let (dx, pg, pb) = (ops.alloc_uninit(rows * w)?, ops.alloc_uninit(parts * w)?, ops.alloc_uninit(parts * w)?);
        let mut a = KernelArgs::new()
            .ptr(dy.ptr())
            .ptr(x.ptr())
            .ptr(g.ptr())
            .ptr(st.ptr())
            .ptr(st.ptr() + 4 * rows as u64)
            .ptr(dx.ptr())
            .ptr(pg.ptr())
            .ptr(pb.ptr())
            .i32(rows as i32)
            .i32(w as i32);
        ops.launch("layernorm_bwd_f32", cfg, &mut a)?;
        Ok((dx, reduce_parts(ops, &pg, parts, w)?, reduce_parts(ops, &pb, parts, w)?))
        // fixed-order sums of the chunks
    }

    fn bias_act(&self, mut u: Buf, bias: &Buf, rows: usize, n: usize, act: Act, keep_pre: bool) -> Result<(Buf, Option<Buf>)> {
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
        let n = seqs.rows();
        let lse = self.ops.alloc_uninit(heads * n)?; // [heads·n] f32
        if let Some(dt) = self.flash_dtype(heads, w) {
            let (qh, kh, vh) = (to_half(&*self.ops, dt, q, n * w)?, to_half(&*self.ops, dt, k, n * w)?, to_half(&*self.ops, dt, v, n * w)?);
            let oh = self.ops.alloc_uninit((n * w).div_ceil(2))?; // [n, w] 16-bit
            let (l, tail) = self.attention_launch(seqs, heads, w, false, dt)?;
            let mut a = tail.append(KernelArgs::new().ptr(qh.ptr()).ptr(kh.ptr()).ptr(vh.ptr()).ptr(oh.ptr()).ptr(lse.ptr()), heads, w);
            self.ops.launch(&l.kernel, l.cfg(), &mut a)?;
            let mut o = self.half_to_f32(&oh, n * w, dt)?; // [n, w] f32
            if self.act_half() == Some(dt) {
                o.set_half(dt, oh); // the output projection's GEMM (and attention_bwd) read these halves
            }
            return Ok((o, lse));
        }
        let o = self.ops.alloc_uninit(n * w)?; // [n, w]
        let (l, tail) = self.attention_launch(seqs, heads, w, false, DType::F32)?;
        let mut a = KernelArgs::new().ptr(q.ptr()).ptr(k.ptr()).ptr(v.ptr()).ptr(o.ptr()).ptr(lse.ptr());
        a = tail.append(a, heads, w);
        self.ops.launch(&l.kernel, l.cfg(), &mut a)?;
        Ok((o, lse))
    }

    fn attention_bwd(&self, q: &Buf, k: &Buf, v: &Buf, o: &Buf, lse: &Buf, d_o: &Buf, seqs: &Seqs, heads: usize, w: usize) -> Result<(Buf, Buf, Buf)> {
        let r = seqs.rows() * w;
        if let Some(dt) = self.flash_dtype(heads, w) {
            let h: Vec<HalfIn> = [q, k, v, o, d_o].iter().map(|x| self.half_of(x, dt, r)).collect::<Result<_>>()?; // o: the forward's halves
            let g: Vec<Buf> = (0..3).map(|_| self.ops.alloc_uninit(r.div_ceil(2))).collect::<Result<_>>()?; // dq, dk, dv 16-bit
            let (l, tail) = self.attention_launch(seqs, heads, w, true, dt)?;
            let a = KernelArgs::new().ptr(h[0].ptr()).ptr(h[1].ptr()).ptr(h[2].ptr()).ptr(h[3].ptr()).ptr(h[4].ptr()).ptr(lse.ptr());
            let mut a = tail.append(a.ptr(g[0].ptr()).ptr(g[1].ptr()).ptr(g[2].ptr()), heads, w);
            self.ops.launch(&l.kernel, l.cfg(), &mut a)?;
            return Ok((self.half_to_f32(&g[0], r, dt)?, self.half_to_f32(&g[1], r, dt)?, self.half_to_f32(&g[2], r, dt)?));
        }
        let (dq, dk, dv) = (self.ops.alloc_uninit(r)?, self.ops.alloc_uninit(r)?, self.ops.alloc_uninit(r)?);
        let (l, tail) = self.attention_launch(seqs, heads, w, true, DType::F32)?;
        let mut a =
            KernelArgs::new().ptr(q.ptr()).ptr(k.ptr()).ptr(v.ptr()).ptr(o.ptr()).ptr(d_o.ptr()).ptr(lse.ptr()).ptr(dq.ptr()).ptr(dk.ptr()).ptr(dv.ptr());
        a = tail.append(a, heads, w);
        self.ops.launch(&l.kernel, l.cfg(), &mut a)?;
        Ok((dq, dk, dv))
    }

    fn copy(&self, x: &Buf, n: usize) -> Result<Buf> {
        copy(&*self.ops, x, n)
    }
    fn axpy(&self, y: &mut Buf, x: &Buf, alpha: f32, n: usize) -> Result<()> {
        y.clear_half();
        axpy(&*self.ops, y, x, alpha, n)
    }

    fn gather_rows(&self, x: &Buf, rows: &[usize], w: usize) -> Result<Buf> {
        let idx = self.ops.upload_i32(&indices(rows)?)?;
        let out = self.ops.alloc_uninit(rows.len() * w)?;
        // pool_rows_f32 with T = 0 reads row index[b] of x for output row b
        let mut a = KernelArgs::new().ptr(x.ptr()).ptr(idx.ptr()).ptr(out.ptr()).i32(rows.len() as i32).i32(0).i32(w as i32);
        self.ops.launch("pool_rows_f32", grid(rows.len() * w), &mut a)?;
        Ok(out)
    }

    fn scatter_rows(&self, d: &Buf, rows: &[usize], n: usize, w: usize) -> Result<Buf> {
        if let Some(&r) = rows.iter().find(|&&r| r >= n) {
            return Err(crate::shape_err!("scatter_rows: row {r} of {n}"));
        }
        let idx = self.ops.upload_i32(&indices(rows)?)?;
        let out = self.ops.alloc(n * w)?; // zeros
        let mut a = KernelArgs::new().ptr(d.ptr()).ptr(idx.ptr()).ptr(out.ptr()).i32(rows.len() as i32).i32(0).i32(w as i32);
        self.ops.launch("unpool_rows_f32", grid(rows.len() * w), &mut a)?;
        Ok(out)
    }

    fn patch_embed(&self, px: &Buf, w: &Weight<Device>, b: usize, c: usize, s: usize, p: usize) -> Result<Buf> {
        let n = (s / p) * (s / p);
        let cols = self.ops.alloc_uninit(b * n * c * p * p)?; // [B·N, C·P·P]
        let mut a = KernelArgs::new().ptr(px.ptr()).ptr(cols.ptr()).i32(b as i32).i32(c as i32).i32(s as i32).i32(p as i32);
        self.ops.launch("patch_im2col_f32", grid(b * n * c * p * p), &mut a)?;
        self.linear(&cols, w, None, b * n) // [B·N, D]
    }

    fn patch_embed_bwd(&self, px: &Buf, dpatches: &Buf, b: usize, c: usize, s: usize, p: usize, d: usize) -> Result<Buf> {
        let (n, k) = ((s / p) * (s / p), c * p * p);
        let cols = self.ops.alloc_uninit(b * n * k)?; // [B·N, C·P·P]
        let mut a = KernelArgs::new().ptr(px.ptr()).ptr(cols.ptr()).i32(b as i32).i32(c as i32).i32(s as i32).i32(p as i32);
        self.ops.launch("patch_im2col_f32", grid(b * n * k), &mut a)?;
        let dw = self.ops.alloc_uninit(d * k)?;
        self.ops.gemm(dpatches, &cols, &dw, d, k, b * n, true, false, 0.0)?; // dW = dpatchesᵀ·cols
        Ok(dw)
    }

    fn vision_embed_bwd(&self, dx: &Buf, b: usize, n: usize, w: usize) -> Result<(Buf, Buf, Buf)> {
        let t = n + 1;
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
        table.clear_half();
        let mut a = KernelArgs::new().ptr(dx.ptr()).ptr(order.ptr()).ptr(starts.ptr()).ptr(uniq.ptr()).ptr(table.ptr()).i32(u as i32).i32(w as i32);
        self.ops.launch("embedding_bwd_rows_f32", grid(u * w), &mut a)
    }

    fn vision_embed(&self, patches: &Buf, cls: &Buf, pos: &Buf, b: usize, n: usize, w: usize) -> Result<Buf> {
        let x = self.ops.alloc_uninit(b * (n + 1) * w)?; // [B·T, W]
        let mut a = KernelArgs::new().ptr(patches.ptr()).ptr(cls.ptr()).ptr(pos.ptr()).ptr(x.ptr()).i32(b as i32).i32(n as i32).i32(w as i32);
        self.ops.launch("vision_embed_assemble_f32", grid(b * (n + 1) * w), &mut a)?;
        Ok(x)
    }
}

#[cfg(all(test, feature = "emu"))]
mod tests {
    use super::*;
    use crate::cuda::EmuOps;

    fn lcg(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }
    fn r(v: f32, dt: DType) -> f64 {
        if dt == DType::F16 {
            half::f16::from_f32(v).to_f64()
        } else {
            half::bf16::from_f32(v).to_f64()
        }
    }
    /// C[m×n] = A[m×k]·B[k×n] of f64 values.
    fn mm(a: &[f64], b: &[f64], m: usize, n: usize, k: usize) -> Vec<f64> {
        (0..m * n).map(|i| (0..k).map(|j| a[i / n * k + j] * b[j * n + i % n]).sum()).collect()
    }
    fn close(what: &str, got: &[f32], want: &[f64], k: usize) {
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((*g as f64 - w).abs() <= 1e-5 * (k as f64).sqrt() * (1.0 + w.abs()), "{what}[{i}]: {g} vs {w}");
        }
    }

    /// A half Linear's forward and both backward GEMMs read half inputs with f32 accumulation
    /// (vs an f64 reference of the rounded values, and measurably not f32), whether x carries the
    /// LayerNorm's half copy or is converted; an in-place change drops the copy.
    #[test]
    fn half_linear_forward_and_backward_round_their_inputs() {
        let (m, n, k) = (13, 7, 37);
        for dt in [DType::BF16, DType::F16] {
            let dev = Device::new(Box::new(EmuOps));
            let (wv, xv, dyv) = (lcg(n * k, 1), lcg(m * k, 2), lcg(m * n, 3));
            let w = dev.weight(dev.upload(&wv).unwrap(), n, k, dt).unwrap();
            let (g, b) = (dev.upload(&vec![1.0; k]).unwrap(), dev.upload(&vec![0.0; k]).unwrap());
            let (mut h, _) = dev.layernorm(&dev.upload(&xv).unwrap(), &g, &b, m, k, 1e-5).unwrap();
            assert!(h.half(dt).is_some(), "{dt:?}: the LayerNorm wrote no half copy");
            let hv = dev.download(&h).unwrap();
            let plain = dev.upload(&hv).unwrap(); // the same values without the copy
            let (y1, y2) = (dev.linear(&h, &w, None, m).unwrap(), dev.linear(&plain, &w, None, m).unwrap());
            let (hr, wr): (Vec<f64>, Vec<f64>) = (hv.iter().map(|&v| r(v, dt)).collect(), wv.iter().map(|&v| r(v, dt)).collect());
            let wt: Vec<f64> = (0..k * n).map(|i| wr[i % n * k + i / n]).collect(); // Wᵀ [k, n]
            let want = mm(&hr, &wt, m, n, k);
            assert_eq!(dev.download(&y1).unwrap(), dev.download(&y2).unwrap(), "{dt:?}: kept and converted inputs differ");
            close("y", &dev.download(&y1).unwrap(), &want, k);
            // backward: dx = dy·W (half W), dW = dyᵀ·x (half x), f32 out
            let dy = dev.upload(&dyv).unwrap();
            let mut dx = dev.zeros(m * k).unwrap();
            let (dw, db) = dev.linear_bwd(&dy, &h, &w, m, &mut dx, false, true).unwrap();
            let dyr: Vec<f64> = dyv.iter().map(|&v| r(v, dt)).collect();
            let dyt: Vec<f64> = (0..n * m).map(|i| dyr[i % m * n + i / m]).collect(); // dyᵀ [n, m]
            let (dxv, dwv) = (dev.download(&dx).unwrap(), dev.download(&dw).unwrap());
            close("dx", &dxv, &mm(&dyr, &wr, m, k, n), n);
            close("dW", &dwv, &mm(&dyt, &hr, n, k, m), m);
            let exact_dw =
                mm(&(0..n * m).map(|i| dyv[i % m * n + i / m] as f64).collect::<Vec<_>>(), &hv.iter().map(|&v| v as f64).collect::<Vec<_>>(), n, k, m);
            assert!(dwv.iter().zip(&exact_dw).any(|(g, e)| (*g as f64 - e).abs() > 1e-4 * (1.0 + e.abs())), "{dt:?}: dW looks like f32");
            let dbv = dev.download(&db.unwrap()).unwrap();
            close("db", &dbv, &(0..n).map(|c| (0..m).map(|i| dyv[i * n + c] as f64).sum()).collect::<Vec<_>>(), m);
            // an in-place update drops the half copy: the next Linear reads the new values
            dev.axpy(&mut h, &plain, 1.0, m * k).unwrap();
            assert!(h.half(dt).is_none());
            let y3 = dev.download(&dev.linear(&h, &w, None, m).unwrap()).unwrap();
            let hr2: Vec<f64> = hv.iter().map(|&v| r(v + v, dt)).collect();
            close("y after axpy", &y3, &mm(&hr2, &wt, m, n, k), k);
        }
    }
}
