//! The device backend's attention ([`Device`]): the tensor-core flash kernels for bf16/f16 towers
//! at the head dims they serve (q, k, v read as 16-bit values: the copies the q/k/v GEMMs wrote,
//! or a conversion; o and, in the backward, dq, dk, dv written as 16-bit values only when the
//! towers compute in that format, else converted to f32), the f32 CUDA-core kernels otherwise.
//! Batched sequences run the batched kernels, packed ones the variable-length kernels over
//! cu_seqlens: one launch either way, no padding computed.
use super::device::{indices, Device, Got};
use super::Seqs;
use crate::cuda::attention::KernelLaunch;
use crate::cuda::flash::{best_launch, best_varlen_launch};
use crate::cuda::train_ops::grid;
use crate::cuda::{Buf, KernelArgs};
use crate::error::Result;
use crate::ops::attention::AttnShape;
use crate::tensor::DType;

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
    pub(super) fn flash_dtype(&self, heads: usize, w: usize) -> Option<DType> {
        let dt = self.attention_dtype();
        crate::cuda::flash::supported(dt, w / heads.max(1)).then_some(dt)
    }
    /// 16-bit [n] -> f32 [n].
    pub(super) fn half_to_f32(&self, h: &Buf, n: usize, dt: DType) -> Result<Buf> {
        let x = self.ops.alloc_uninit(n)?;
        let k = if dt == DType::F16 { "f16_to_f32" } else { "bf16_to_f32" };
        self.ops.launch(k, grid(n), &mut KernelArgs::new().ptr(h.ptr()).ptr(x.ptr()).i32(n as i32))?;
        Ok(x)
    }
}

impl Device {
    pub(super) fn attn_fwd(&self, q: &Buf, k: &Buf, v: &Buf, seqs: &Seqs, heads: usize, w: usize) -> Result<(Buf, Buf)> {
        let n = seqs.rows();
        let lse = self.ops.alloc_uninit(heads * n)?; // [heads·n] f32
        if let Some(dt) = self.flash_dtype(heads, w) {
            let (qh, kh, vh) = (self.half_of(q, dt, n * w)?, self.half_of(k, dt, n * w)?, self.half_of(v, dt, n * w)?); // the GEMMs' 16-bit outputs
            let oh = self.ops.alloc_uninit((n * w).div_ceil(2))?; // [n, w] 16-bit
            let (l, tail) = self.attention_launch(seqs, heads, w, false, dt)?;
            let mut a = tail.append(KernelArgs::new().ptr(qh.ptr()).ptr(kh.ptr()).ptr(vh.ptr()).ptr(oh.ptr()).ptr(lse.ptr()), heads, w);
            self.ops.launch(&l.kernel, l.cfg(), &mut a)?;
            if self.act_half() == Some(dt) {
                return Ok((Buf::half_only(dt, oh, n * w), lse)); // read by the output projection's GEMM and attention_bwd as is
            }
            return Ok((self.half_to_f32(&oh, n * w, dt)?, lse)); // [n, w] f32
        }
        let (q, k, v) = (self.f32_of(q)?, self.f32_of(k)?, self.f32_of(v)?);
        let o = self.ops.alloc_uninit(n * w)?; // [n, w]
        let (l, tail) = self.attention_launch(seqs, heads, w, false, DType::F32)?;
        let mut a = KernelArgs::new().ptr(q.ptr()).ptr(k.ptr()).ptr(v.ptr()).ptr(o.ptr()).ptr(lse.ptr());
        a = tail.append(a, heads, w);
        self.ops.launch(&l.kernel, l.cfg(), &mut a)?;
        Ok((o, lse))
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn attn_bwd(&self, q: &Buf, k: &Buf, v: &Buf, o: &Buf, lse: &Buf, d_o: &Buf, seqs: &Seqs, heads: usize, w: usize) -> Result<(Buf, Buf, Buf)> {
        let r = seqs.rows() * w;
        if let Some(dt) = self.flash_dtype(heads, w) {
            let h: Vec<Got> = [q, k, v, o, d_o].iter().map(|x| self.half_of(x, dt, r)).collect::<Result<_>>()?; // o: the forward's halves
            let g: Vec<Buf> = (0..3).map(|_| self.ops.alloc_uninit(r.div_ceil(2))).collect::<Result<_>>()?; // dq, dk, dv 16-bit
            let (l, tail) = self.attention_launch(seqs, heads, w, true, dt)?;
            let a = KernelArgs::new().ptr(h[0].ptr()).ptr(h[1].ptr()).ptr(h[2].ptr()).ptr(h[3].ptr()).ptr(h[4].ptr()).ptr(lse.ptr());
            let mut a = tail.append(a.ptr(g[0].ptr()).ptr(g[1].ptr()).ptr(g[2].ptr()), heads, w);
            self.ops.launch(&l.kernel, l.cfg(), &mut a)?;
            let [dq, dk, dv]: [Buf; 3] = g.try_into().map_err(|_| crate::error::Error::msg("attention_bwd: three gradients"))?;
            if self.act_half() == Some(dt) {
                // read only by the q/k/v backward GEMMs (as 16-bit dY) and their bias sums
                return Ok((Buf::half_only(dt, dq, r), Buf::half_only(dt, dk, r), Buf::half_only(dt, dv, r)));
            }
            return Ok((self.half_to_f32(&dq, r, dt)?, self.half_to_f32(&dk, r, dt)?, self.half_to_f32(&dv, r, dt)?));
        }
        let (q, k, v, o, d_o) = (self.f32_of(q)?, self.f32_of(k)?, self.f32_of(v)?, self.f32_of(o)?, self.f32_of(d_o)?);
        let (dq, dk, dv) = (self.ops.alloc_uninit(r)?, self.ops.alloc_uninit(r)?, self.ops.alloc_uninit(r)?);
        let (l, tail) = self.attention_launch(seqs, heads, w, true, DType::F32)?;
        let mut a =
            KernelArgs::new().ptr(q.ptr()).ptr(k.ptr()).ptr(v.ptr()).ptr(o.ptr()).ptr(d_o.ptr()).ptr(lse.ptr()).ptr(dq.ptr()).ptr(dk.ptr()).ptr(dv.ptr());
        a = tail.append(a, heads, w);
        self.ops.launch(&l.kernel, l.cfg(), &mut a)?;
        Ok((dq, dk, dv))
    }
}
