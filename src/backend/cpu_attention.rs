//! The CPU backend's attention: which kernel runs it (bf16 products for a bf16 model's bf16 q, k
//! and v, `ops::attention_bf16` and its backward; the f32 kernels of `ops::attention` otherwise),
//! over batched or packed sequences, and the pooled rows of a tower's last block.
use super::cpu::{vec1, Cpu};
use super::cpu_linear::bf16_of;
use super::{Seqs, Weight};
use crate::error::Result;
use crate::ops::attention::{attention as attention_f32, attention_backward, attention_packed, attention_packed_backward, AttnShape};
use crate::ops::attention_bf16::{self, attention_bf16, attention_packed_bf16, PooledRow};
use crate::ops::attention_bf16_bwd::{attention_backward_bf16, attention_packed_backward_bf16};
use crate::ops::gemm_bf16::Kernel;
use crate::tensor::Tensor;

/// (o, lse) of q, k, v [N, W] (sizes checked by the caller): the bf16 products where q, k and v
/// are bf16 (`Ops::qkv` keeps them so for the bf16 attention), else the f32 kernels.
pub(super) fn attention(q: &Tensor, k: &Tensor, v: &Tensor, seqs: &Seqs, heads: usize, w: usize) -> Result<(Tensor, Tensor)> {
    if let (Some(qb), Some(kb), Some(vb)) = (q.bf16_data(), k.bf16_data(), v.bf16_data()) {
        // bf16 q, k, v (from `qkv`): QKᵀ and PV through the bf16 GEMM
        let (o, lse) = match seqs {
            Seqs::Batch { batch, seq, causal } => attention_bf16(qb, kb, vb, &shape(*batch, *seq, heads, w, *causal), Kernel::Auto),
            Seqs::Packed(lens) => attention_packed_bf16(qb, kb, vb, lens, heads, true, Kernel::Auto),
        };
        return Ok((vec1(o)?, vec1(lse)?)); // [N, W], [B, H, T]
    }
    let (qd, kd, vd) = (q.f32_data(), k.f32_data(), v.f32_data());
    let (o, lse) = match seqs {
        Seqs::Batch { batch, seq, causal } => attention_f32(&qd, &kd, &vd, &shape(*batch, *seq, heads, w, *causal)),
        Seqs::Packed(lens) => attention_packed(&qd, &kd, &vd, lens, heads, true),
    };
    Ok((vec1(o)?, vec1(lse)?)) // [N, W], [B, H, T]
}

/// (dq, dk, dv) of [`attention`]: the bf16 backward where q, k and v are bf16 (as the forward
/// took them), else the f32 one.
#[allow(clippy::too_many_arguments)]
pub(super) fn attention_bwd(
    [q, k, v]: [&Tensor; 3],
    o: &Tensor,
    lse: &Tensor,
    d_o: &Tensor,
    seqs: &Seqs,
    heads: usize,
    w: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (od, ld, dd) = (o.f32_data(), lse.f32_data(), d_o.f32_data());
    let (dq, dk, dv) = if let (Some(qb), Some(kb), Some(vb)) = (q.bf16_data(), k.bf16_data(), v.bf16_data()) {
        // bf16 q, k, v (from `qkv`, as the bf16 forward took them): the five products
        // through the bf16 GEMM
        match seqs {
            Seqs::Batch { batch, seq, causal } => attention_backward_bf16(qb, kb, vb, &od, &ld, &dd, &shape(*batch, *seq, heads, w, *causal), Kernel::Auto),
            Seqs::Packed(lens) => attention_packed_backward_bf16(qb, kb, vb, &od, &ld, &dd, lens, heads, true, Kernel::Auto),
        }
    } else {
        let (qd, kd, vd) = (q.f32_data(), k.f32_data(), v.f32_data());
        match seqs {
            Seqs::Batch { batch, seq, causal } => attention_backward(&qd, &kd, &vd, &od, &ld, &dd, &shape(*batch, *seq, heads, w, *causal)),
            Seqs::Packed(lens) => attention_packed_backward(&qd, &kd, &vd, &od, &ld, &dd, lens, heads, true),
        }
    };
    Ok((vec1(dq)?, vec1(dk)?, vec1(dv)?)) // [N, W] each
}

/// Whether a layer's q, k and v are kept in bf16 for the bf16 attention: bf16 weights, and the
/// bf16 attention chosen ([`attention_bf16::chosen`]).
pub(super) fn half_attention(w: [&Weight<Cpu>; 3]) -> bool {
    w.iter().all(|w| bf16_of(w).is_some()) && attention_bf16::chosen()
}

/// `rows` as one query per sequence, in order (a tower's pooled rows), with each sequence's place;
/// None when they are not that.
pub(super) fn pooled_rows(seqs: &Seqs, rows: &[usize]) -> Option<Vec<PooledRow>> {
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

/// The attention shape of `batch` sequences of `seq` rows, `heads` heads over width `w`.
fn shape(batch: usize, seq: usize, heads: usize, w: usize, causal: bool) -> AttnShape {
    let d = w / heads.max(1);
    AttnShape { batch, seq, heads, head_dim: d, causal, scale: 1.0 / (d as f32).sqrt() }
}
