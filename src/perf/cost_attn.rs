//! Cost rows (src/perf/cost.rs) of the attention kernels: the f32 / mma.sync attention of
//! kernels/attention.cu and the flash kernels, batched or over packed sequences. FLOPs count the
//! query·key pairs each kernel executes (flash: at its 16-row tile granularity), bytes each
//! tensor once (K/V tile re-reads are served by L2).
use super::cost::{Class, Cost, Ctx, Unit};
use super::gpus::k;
use crate::error::Result;

/// Query·key pairs of one head: T² or, causal, T(T+1)/2.
fn pairs(t: f64, causal: bool) -> f64 {
    if causal {
        t * (t + 1.0) / 2.0
    } else {
        t * t
    }
}

/// Attention's unit: the half variants of a module written with mma.sync run on the tensor cores.
fn attn_unit(c: &Ctx) -> (Unit, f64) {
    if c.t == 2.0 && module_uses_mma(&c.rec.kernel) {
        (Unit::TensorCore, k::TC_KERNEL_EFF)
    } else {
        (Unit::CudaCore, k::CC_EFF)
    }
}

/// Whether the module of `kernel` issues tensor-core instructions: its source uses `mma.sync`
/// (or includes kernels/mma.cuh, the fragment helpers).
pub fn module_uses_mma(kernel: &str) -> bool {
    crate::cuda::kernels::module_of(kernel).is_some_and(|m| m.source.contains("mma.sync") || m.source.contains("\"mma.cuh\""))
}

/// Batched attention: (B, T, H, hd, causal) from argument `first`; `mults` FLOPs per pair and dim
/// (4 forward: QKᵀ and PV; 10 backward: S again, dV, dP, dQ, dK), `tensors_in`/`out` [B·T, H·hd]
/// tensors read/written, `lse` the f32 [H, B·T] statistics read or written.
pub(super) fn attention(c: &Ctx, first: usize, mults: f64, tensors_in: f64, tensors_out: f64, bwd: bool) -> Result<Cost> {
    let (b, t, h, hd, causal) = (c.i(first)?, c.i(first + 1)?, c.i(first + 2)?, c.i(first + 3)?, c.i(first + 4)? != 0.0);
    let rows = b * t * h * hd;
    let (unit, eff) = attn_unit(c);
    let lse = 4.0 * b * t * h;
    let (read, written) =
        if bwd { (tensors_in * rows * c.t + lse, tensors_out * rows * c.t) } else { (tensors_in * rows * c.t, tensors_out * rows * c.t + lse) };
    Ok(Cost { flops: mults * b * h * pairs(t, causal) * hd, read, written, unit, class: Class::Attention, eff, par: c.blocks() * 128.0 })
}

/// Packed sequences (cu_seqlens): the same per sequence, with the offsets the recorder kept.
pub(super) fn attention_varlen(c: &Ctx, cu: usize, mults: f64, tensors_in: f64, tensors_out: f64, bwd: bool) -> Result<Cost> {
    let lens = c.seqlens(cu, cu + 1, cu + 2)?;
    let (h, hd, causal) = (c.i(cu + 3)?, c.i(cu + 4)?, c.i(cu + 5)? != 0.0);
    let rows: f64 = lens.iter().sum::<f64>() * h * hd;
    let pp: f64 = lens.iter().map(|&l| pairs(l, causal)).sum();
    let (unit, eff) = attn_unit(c);
    let lse = 4.0 * rows / hd;
    let (read, written) =
        if bwd { (tensors_in * rows * c.t + lse, tensors_out * rows * c.t) } else { (tensors_in * rows * c.t, tensors_out * rows * c.t + lse) };
    let tiles: f64 = lens.iter().map(|&l| (l / 64.0).ceil() * if bwd { 3.0 } else { 1.0 }).sum();
    Ok(Cost { flops: mults * h * pp * hd, read, written, unit, class: Class::Attention, eff, par: tiles * h * 128.0 })
}

/// The (query, key) pairs one flash head of length `l` executes on the tensor cores, as
/// (query-major, key-major): the forward and the backward's dQ blocks loop over key tiles for
/// each warp of 16 queries (no warp past `l`; key chunks of 16 up to `l`, causal: up to the warp's
/// last query); the dK/dV blocks loop over query tiles for each warp of 16 keys (query chunks of 16
/// up to `l`; causal: from the key tile's first row, the diagonal tile whole). Both are
/// ⌈l/16⌉²·256 without causal.
pub fn flash_pairs(l: f64, causal: bool) -> (f64, f64) {
    let l = l.max(0.0) as usize;
    let c16 = |x: usize| x.div_ceil(16) * 16;
    if !causal {
        let n = c16(l) as f64;
        return (n * n, n * n);
    }
    let tiles: Vec<usize> = (0..l.div_ceil(64)).map(|i| c16((l - 64 * i).min(64))).collect();
    let (mut qmaj, mut kmaj) = (0usize, 0usize);
    for (m, &sm) in tiles.iter().enumerate() {
        for w in (0..4).filter(|w| 64 * m + 16 * w < l) {
            qmaj += 16 * (64 * m + sm.min(16 * w + 16));
        }
        kmaj += sm * tiles[m..].iter().sum::<usize>();
    }
    (qmaj as f64, kmaj as f64)
}

/// Executed FLOPs of one flash head of length `l`: forward 2 products over the query-major pairs;
/// backward 3 (S, dP, dQ) over those and 4 (Sᵀ, dPᵀ, dV, dK) over the key-major ones.
fn flash_flops(l: f64, causal: bool, hd: f64, bwd: bool) -> f64 {
    let (q, k) = flash_pairs(l, causal);
    2.0 * hd * if bwd { 3.0 * q + 4.0 * k } else { 2.0 * q }
}

/// Batched flash kernels: bytes and parallelism as [`attention`], FLOPs as executed.
pub(super) fn flash(c: &Ctx, first: usize, bwd: bool) -> Result<Cost> {
    let (b, t, h, hd, causal) = (c.i(first)?, c.i(first + 1)?, c.i(first + 2)?, c.i(first + 3)?, c.i(first + 4)? != 0.0);
    let io = if bwd { (5.0, 3.0) } else { (3.0, 1.0) };
    Ok(Cost { flops: b * h * flash_flops(t, causal, hd, bwd), ..attention(c, first, 0.0, io.0, io.1, bwd)? })
}

/// Packed flash kernels: the same per sequence.
pub(super) fn flash_varlen(c: &Ctx, cu: usize, bwd: bool) -> Result<Cost> {
    let lens = c.seqlens(cu, cu + 1, cu + 2)?;
    let (h, hd, causal) = (c.i(cu + 3)?, c.i(cu + 4)?, c.i(cu + 5)? != 0.0);
    let io = if bwd { (5.0, 3.0) } else { (3.0, 1.0) };
    Ok(Cost { flops: h * lens.iter().map(|&l| flash_flops(l, causal, hd, bwd)).sum::<f64>(), ..attention_varlen(c, cu, 0.0, io.0, io.1, bwd)? })
}
