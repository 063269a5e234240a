//! Launch configurations of the tensor-core flash attention kernels (kernels/flash_fwd.cu,
//! kernels/flash_bwd.cu: mma.sync bf16/f16 with f32 accumulation, cp.async double buffering) and
//! the choice between them and the CUDA-core kernels of kernels/attention.cu: bf16 and f16 at the
//! head dims in [`HEAD_DIMS`] go to the flash kernels, everything else (f32, other head dims) to
//! [`super::attention`]. The flash kernels take the same arguments as the ones they replace (the
//! batched `attention_{fwd,bwd}_*` and the packed `attention_varlen_{fwd,bwd}_f32`), so a caller
//! only swaps the [`KernelLaunch`].
use super::attention::{attention_bwd_launch, attention_fwd_launch, attention_varlen_launch, check_shape, KernelLaunch};
use crate::error::Result;
use crate::ops::attention::AttnShape;
use crate::DType;

/// Head dims the flash kernels are instantiated for (compile-time templates).
pub const HEAD_DIMS: [usize; 2] = [64, 80];
/// Threads per block (4 warps; the kernels __trap on any other block shape).
pub const THREADS: u32 = 128;
/// Query rows per block tile and keys per key tile.
pub const TILE: usize = 64;

/// Whether the flash kernels serve this precision and head dim.
pub fn supported(dtype: DType, head_dim: usize) -> bool {
    dtype != DType::F32 && HEAD_DIMS.contains(&head_dim)
}

/// Forward: Q, 2 K and 1 V tiles of [64][hd + 8] 16-bit values (V single-buffered).
pub fn fwd_smem_bytes(head_dim: usize) -> usize {
    4 * TILE * (head_dim + 8) * 2
}

/// Backward: 6 tiles of [64][hd + 8] 16-bit values and 2 x 2 x 64 f32 (lse·log2e and D per stage).
pub fn bwd_smem_bytes(head_dim: usize) -> usize {
    6 * TILE * (head_dim + 8) * 2 + 4 * 4 * TILE
}

fn suffix(dtype: DType) -> &'static str {
    if dtype == DType::F16 {
        "f16"
    } else {
        "bf16"
    }
}

fn check(s: &AttnShape, dtype: DType) -> Result<()> {
    check_shape(s, dtype)?;
    if !supported(dtype, s.head_dim) {
        return Err(crate::shape_err!("flash attention: {dtype:?} at head dim {} (bf16/f16 at head dims {HEAD_DIMS:?} only)", s.head_dim));
    }
    Ok(())
}

/// `flash_fwd_<dtype>`: grid (⌈T/64⌉, H, B), block 128.
pub fn flash_fwd_launch(s: &AttnShape, dtype: DType) -> Result<KernelLaunch> {
    check(s, dtype)?;
    Ok(KernelLaunch {
        kernel: format!("flash_fwd{}_{}", if s.head_dim == 64 { "64" } else { "" }, suffix(dtype)),
        grid: (s.seq.div_ceil(TILE) as u32, s.heads as u32, s.batch as u32),
        block: (THREADS, 1, 1),
        smem_bytes: fwd_smem_bytes(s.head_dim) as u32,
    })
}

/// `flash_bwd_<dtype>`: grid (2·⌈T/64⌉, H, B) -- dK/dV blocks, then dQ blocks -- block 128.
pub fn flash_bwd_launch(s: &AttnShape, dtype: DType) -> Result<KernelLaunch> {
    check(s, dtype)?;
    Ok(KernelLaunch {
        kernel: format!("flash_bwd_{}", suffix(dtype)),
        grid: (2 * s.seq.div_ceil(TILE) as u32, s.heads as u32, s.batch as u32),
        block: (THREADS, 1, 1),
        smem_bytes: bwd_smem_bytes(s.head_dim) as u32,
    })
}

/// `flash_varlen_{fwd,bwd}_<dtype>` over `nseq` packed sequences (offsets in a cu_seqlens int32
/// buffer of nseq + 1 entries), the grid sized for the longest, `tmax`. The backward at head dim 64
/// is `flash_varlen_bwd64_<dtype>`: the hd-64 instance alone, which fits the register bound of 3
/// blocks per SM on sm_90 (kernels/flash_bwd.cu; both instances together would spill).
pub fn flash_varlen_launch(nseq: usize, tmax: usize, heads: usize, head_dim: usize, causal: bool, dtype: DType, backward: bool) -> Result<KernelLaunch> {
    let s = AttnShape { batch: nseq, seq: tmax, heads, head_dim, causal, scale: 1.0 / (head_dim as f32).sqrt() };
    let mut l = if backward { flash_bwd_launch(&s, dtype)? } else { flash_fwd_launch(&s, dtype)? };
    let pass = match (backward, head_dim) {
        (false, _) => "fwd", // flash_fwd64 spills in the varlen form
        (true, 64) => "bwd64",
        (true, _) => "bwd",
    };
    l.kernel = format!("flash_varlen_{pass}_{}", suffix(dtype));
    Ok(l)
}

/// The attention kernel for a batched shape: flash where [`supported`], else kernels/attention.cu.
pub fn best_launch(s: &AttnShape, dtype: DType, backward: bool) -> Result<KernelLaunch> {
    match (supported(dtype, s.head_dim), backward) {
        (true, false) => flash_fwd_launch(s, dtype),
        (true, true) => flash_bwd_launch(s, dtype),
        (false, false) => attention_fwd_launch(s, dtype),
        (false, true) => attention_bwd_launch(s, dtype),
    }
}

/// The kernel for packed causal sequences: flash where [`supported`], else the f32 varlen kernel
/// (whose tensors are f32: the caller must not hand it 16-bit data).
pub fn best_varlen_launch(nseq: usize, tmax: usize, heads: usize, head_dim: usize, dtype: DType, backward: bool) -> Result<KernelLaunch> {
    if supported(dtype, head_dim) {
        flash_varlen_launch(nseq, tmax, heads, head_dim, true, dtype, backward)
    } else {
        attention_varlen_launch(nseq, tmax, heads, head_dim, backward)
    }
}
