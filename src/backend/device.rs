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
use super::{Act, Ops, Seqs, Weight};
use crate::cuda::attention::KernelLaunch;
use crate::cuda::flash::{best_launch, best_varlen_launch};
use crate::cuda::train_ops::{axpy, col_sums, copy, grid, ln_cfg};
use crate::cuda::{Buf, DeviceOps, KernelArgs, LaunchCfg};
use crate::error::Result;
use crate::ops::attention::AttnShape;
use crate::tensor::DType;

/// A device and the operations the model runs on it.
pub struct Device {
    ops: Box<dyn DeviceOps>,
    /// The precision attention computes in (F32 until a bf16/f16 weight copy is made).
    attn: std::cell::Cell<DType>,
}

impl Device {
    pub fn new(ops: Box<dyn DeviceOps>) -> Device {
        Device { ops, attn: std::cell::Cell::new(DType::F32) }
    }
    /// The precision of attention: BF16/F16 select the flash kernels where they serve the head dim.
    pub fn set_attention_dtype(&self, dtype: DType) {
        self.attn.set(dtype);
    }
    pub fn attention_dtype(&self) -> DType {
        self.attn.get()
    }
    /// The driver-level operations (kernel launches, raw GEMMs).
    pub fn raw(&self) -> &dyn DeviceOps {
        &*self.ops
    }
}

fn act_kernels(a: Act) -> (&'static str, &'static str) {
    match a {
        Act::QuickGelu => ("bias_quick_gelu_fwd_f32", "bias_quick_gelu_bwd_f32"),
        Act::Gelu => ("bias_gelu_fwd_f32", "bias_gelu_bwd_f32"),
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
        let dt = self.attn.get();
        crate::cuda::flash::supported(dt, w / heads.max(1)).then_some(dt)
    }
    /// f32 [n] -> a new 16-bit copy (two values per 4-byte element).
    fn to_half(&self, x: &Buf, n: usize, dt: DType) -> Result<Buf> {
        let h = self.ops.alloc_uninit(n.div_ceil(2))?;
        let k = if dt == DType::F16 { "f32_to_f16" } else { "f32_to_bf16" };
        self.ops.launch(k, grid(n), &mut KernelArgs::new().ptr(x.ptr()).ptr(h.ptr()).i32(n as i32))?;
        Ok(h)
    }
    /// 16-bit [n] -> f32 [n].
    fn half_to_f32(&self, h: &Buf, n: usize, dt: DType) -> Result<Buf> {
        let x = self.ops.alloc_uninit(n)?;
        let k = if dt == DType::F16 { "f16_to_f32" } else { "bf16_to_f32" };
        self.ops.launch(k, grid(n), &mut KernelArgs::new().ptr(h.ptr()).ptr(x.ptr()).i32(n as i32))?;
        Ok(x)
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
        let kernel = match dtype {
            DType::F32 => return Ok(Weight { w, half: None, n, k }),
            DType::BF16 => "f32_to_bf16",
            DType::F16 => "f32_to_f16",
        };
        // the towers' precision: attention follows it
        self.attn.set(dtype);
        // the 16-bit copy made on the device (two values per 4-byte element, as upload_bf16 packs)
        let half = self.ops.alloc((n * k).div_ceil(2))?;
        self.ops.launch(kernel, grid(n * k), &mut KernelArgs::new().ptr(w.ptr()).ptr(half.ptr()).i32((n * k) as i32))?;
        Ok(Weight { w, half: Some((dtype, half)), n, k })
    }

    fn linear(&self, x: &Buf, w: &Weight<Device>, bias: Option<&Buf>, m: usize) -> Result<Buf> {
        let y = self.ops.alloc_uninit(m * w.n)?; // [m, n]
        match &w.half {
            Some((DType::BF16, h)) => self.ops.linear_bf16(x, h, bias, &y, m, w.n, w.k)?,
            Some((_, h)) => self.ops.linear_f16(x, h, bias, &y, m, w.n, w.k)?,
            None => self.ops.linear(x, &w.w, bias, &y, m, w.n, w.k)?,
        }
        Ok(y)
    }

    fn linear_bwd(&self, dy: &Buf, x: &Buf, w: &Weight<Device>, m: usize, dx: &mut Buf, accumulate: bool, bias: bool) -> Result<(Buf, Option<Buf>)> {
        let (n, k) = (w.n, w.k);
        self.ops.gemm(dy, &w.w, dx, m, k, n, false, false, if accumulate { 1.0 } else { 0.0 })?; // dx (+)= dy·W
        let dw = self.ops.alloc_uninit(n * k)?;
        self.ops.gemm(dy, x, &dw, n, k, m, true, false, 0.0)?; // dW = dyᵀ·x (C not read with beta 0)
        let db = if bias { Some(col_sums(&*self.ops, dy, m, n)?) } else { None };
        Ok((dw, db))
    }

    fn layernorm(&self, x: &Buf, g: &Buf, b: &Buf, rows: usize, w: usize, eps: f32) -> Result<(Buf, Buf)> {
        let (y, st) = (self.ops.alloc_uninit(rows * w)?, self.ops.alloc_uninit(2 * rows)?); // stats: mean [rows], rstd [rows]
        let mut a = KernelArgs::new()
            .ptr(x.ptr())
            .ptr(g.ptr())
            .ptr(b.ptr())
            .ptr(y.ptr())
            .ptr(st.ptr())
            .ptr(st.ptr() + 4 * rows as u64)
            .i32(rows as i32)
            .i32(w as i32)
            .f32(eps);
        self.ops.launch("layernorm_fwd_f32", ln_cfg(rows), &mut a)?;
        Ok((y, st))
    }

    fn add_layernorm(&self, x: &mut Buf, f: &Buf, g: &Buf, b: &Buf, rows: usize, w: usize, eps: f32) -> Result<(Buf, Buf)> {
        let (y, st) = (self.ops.alloc_uninit(rows * w)?, self.ops.alloc_uninit(2 * rows)?);
        let mut a = KernelArgs::new()
            .ptr(x.ptr())
            .ptr(f.ptr())
            .ptr(g.ptr())
            .ptr(b.ptr())
            .ptr(y.ptr())
            .ptr(st.ptr())
            .ptr(st.ptr() + 4 * rows as u64)
            .i32(rows as i32)
            .i32(w as i32)
            .f32(eps);
        self.ops.launch("residual_layernorm_fwd_f32", ln_cfg(rows), &mut a)?;
        Ok((y, st))
    }

    fn layernorm_bwd(&self, dy: &Buf, x: &Buf, g: &Buf, st: &Buf, rows: usize, w: usize, _eps: f32) -> Result<(Buf, Buf, Buf)> {
        let ops = &*self.ops;
        let parts = rows.clamp(1, 8);
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
        ops.launch("layernorm_bwd_f32", LaunchCfg::new((parts as u32, 1, 1), (128, 1, 1), 0), &mut a)?;
        let (dg, db) = (ops.alloc_uninit(w)?, ops.alloc_uninit(w)?);
        let mut a = KernelArgs::new().ptr(pg.ptr()).ptr(pb.ptr()).ptr(dg.ptr()).ptr(db.ptr()).i32(parts as i32).i32(w as i32);
        ops.launch("layernorm_bwd_reduce_f32", LaunchCfg::new((w.div_ceil(256) as u32, 1, 1), (256, 1, 1), 0), &mut a)?;
        Ok((dx, dg, db))
    }

    fn bias_act(&self, u: Buf, bias: &Buf, rows: usize, n: usize, act: Act, keep_pre: bool) -> Result<(Buf, Option<Buf>)> {
        let pre = if keep_pre { Some(self.ops.alloc_uninit(rows * n)?) } else { None };
        let g = rows.clamp(1, 64) as u32;
        let mut a = KernelArgs::new().ptr(u.ptr()).ptr(bias.ptr()).ptr(pre.as_ref().map_or(0, |p| p.ptr())).i32(rows as i32).i32(n as i32);
        self.ops.launch(act_kernels(act).0, LaunchCfg::new((n.div_ceil(256) as u32, g, 1), (256, 1, 1), 0), &mut a)?; // u = act(u + bias) in place
        Ok((u, pre))
    }

    fn bias_act_bwd(&self, dout: &Buf, pre: &Buf, rows: usize, n: usize, act: Act) -> Result<(Buf, Buf)> {
        let du = self.ops.alloc_uninit(rows * n)?;
        let g = rows.clamp(1, 64);
        let partial = self.ops.alloc_uninit(g * n)?;
        let mut a = KernelArgs::new().ptr(dout.ptr()).ptr(pre.ptr()).ptr(du.ptr()).ptr(partial.ptr()).i32(rows as i32).i32(n as i32);
        self.ops.launch(act_kernels(act).1, LaunchCfg::new((n.div_ceil(256) as u32, g as u32, 1), (256, 1, 1), 0), &mut a)?;
        Ok((du, col_sums(&*self.ops, &partial, g, n)?))
    }

    fn attention(&self, q: &Buf, k: &Buf, v: &Buf, seqs: &Seqs, heads: usize, w: usize) -> Result<(Buf, Buf)> {
        let n = seqs.rows();
        let lse = self.ops.alloc_uninit(heads * n)?; // [heads·n] f32
        if let Some(dt) = self.flash_dtype(heads, w) {
            let (qh, kh, vh) = (self.to_half(q, n * w, dt)?, self.to_half(k, n * w, dt)?, self.to_half(v, n * w, dt)?);
            let oh = self.ops.alloc_uninit((n * w).div_ceil(2))?; // [n, w] 16-bit
            let (l, tail) = self.attention_launch(seqs, heads, w, false, dt)?;
            let mut a = tail.append(KernelArgs::new().ptr(qh.ptr()).ptr(kh.ptr()).ptr(vh.ptr()).ptr(oh.ptr()).ptr(lse.ptr()), heads, w);
            self.ops.launch(&l.kernel, l.cfg(), &mut a)?;
            return Ok((self.half_to_f32(&oh, n * w, dt)?, lse));
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
            let h: Vec<Buf> = [q, k, v, o, d_o].iter().map(|x| self.to_half(x, r, dt)).collect::<Result<_>>()?;
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
