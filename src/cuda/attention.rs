//! Launch configurations of the fused attention kernels of kernels/attention.cu: kernel name,
//! grid, block and dynamic shared memory for a shape, after checking the constraints the kernels
//! rely on (see the header of attention.cu). The emulator tests launch through these, and so will
//! the GPU backend (with `cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)` when
//! [`KernelLaunch::needs_smem_opt_in`]).
use crate::error::Result;
use crate::ops::attention::AttnShape;
use crate::DType;

/// Threads per block (the kernels __trap on any other block shape).
pub const THREADS: u32 = 128;
/// Largest head dim (accumulators are sized for 128 dims per 8 or 16 threads).
pub const HEAD_DIM_MAX: usize = 128;
/// Query rows per tile.
pub const BQ: usize = 64;
/// Keys per tile.
pub const BK: usize = 32;
/// Dynamic shared memory a kernel gets without the opt-in attribute.
pub const SMEM_DEFAULT_LIMIT: u32 = 48 * 1024;
/// Opt-in limits per block: sm_80 (A100) 163 KiB, sm_90 (H100) 227 KiB.
pub const SMEM_LIMIT_SM80: u32 = 163 * 1024;
pub const SMEM_LIMIT_SM90: u32 = 227 * 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelLaunch {
    pub kernel: String,
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub smem_bytes: u32,
}

impl KernelLaunch {
    /// The launch geometry in the form every `Launcher` (GPU or emulator) takes.
    pub fn cfg(&self) -> super::LaunchCfg {
        super::LaunchCfg::new(self.grid, self.block, self.smem_bytes)
    }
    /// More than 48 KiB of dynamic shared memory: the launcher must raise the kernel's limit first.
    pub fn needs_smem_opt_in(&self) -> bool {
        self.smem_bytes > SMEM_DEFAULT_LIMIT
    }
}

/// Row stride (elements) of a [rows][hd] tile in shared memory: hd rounded up to odd.
fn tile_ld(hd: usize) -> usize {
    hd | 1
}

/// Forward: a `[64][33]` f32 P tile, then Q (64 rows), K, V (32 rows each) tiles of the tensor type.
pub fn fwd_smem_bytes(head_dim: usize, elem_bytes: usize) -> usize {
    4 * BQ * (BK + 1) + elem_bytes * (BQ + 2 * BK) * tile_ld(head_dim)
}

/// Backward: `[64][33]` f32 P and dS tiles, then Q, dO (64 rows), K, V (32 rows) tiles of the tensor type.
pub fn bwd_smem_bytes(head_dim: usize, elem_bytes: usize) -> usize {
    4 * 2 * BQ * (BK + 1) + elem_bytes * (2 * BQ + 2 * BK) * tile_ld(head_dim)
}

/// Checks what the kernels rely on; returns the element size and the type suffix.
pub(crate) fn check_shape(s: &AttnShape, dtype: DType) -> Result<(usize, &'static str)> {
    let (elem, suffix) = match dtype {
        DType::F32 => (4, "f32"),
        DType::BF16 => (2, "bf16"),
        DType::F16 => (2, "f16"),
    };
    if s.batch == 0 || s.seq == 0 || s.heads == 0 {
        return Err(crate::shape_err!("attention kernels: empty shape {s:?}"));
    }
    if s.head_dim == 0 || s.head_dim > HEAD_DIM_MAX {
        return Err(crate::shape_err!("attention kernels: head dim {} outside 1..={HEAD_DIM_MAX}", s.head_dim));
    }
    if s.heads > 65535 || s.batch > 65535 {
        return Err(crate::shape_err!("attention kernels: heads {} and batch {} must be <= 65535 (grid y, z)", s.heads, s.batch));
    }
    if s.seq > i32::MAX as usize / 2 || s.width() > i32::MAX as usize {
        return Err(crate::shape_err!("attention kernels: T = {} or H·hd = {} overflows the kernels' int indices", s.seq, s.width()));
    }
    if !s.scale.is_finite() {
        return Err(crate::shape_err!("attention kernels: scale {} is not finite", s.scale));
    }
    Ok((elem, suffix))
}

/// `attention_fwd_<dtype>`: grid (⌈T/64⌉, H, B), block 128.
pub fn attention_fwd_launch(s: &AttnShape, dtype: DType) -> Result<KernelLaunch> {
    let (elem, suffix) = check_shape(s, dtype)?;
    Ok(KernelLaunch {
        kernel: format!("attention_fwd_{suffix}"),
        grid: (s.seq.div_ceil(BQ) as u32, s.heads as u32, s.batch as u32),
        block: (THREADS, 1, 1),
        smem_bytes: fwd_smem_bytes(s.head_dim, elem) as u32,
    })
}

/// `attention_bwd_<dtype>`: grid (⌈T/32⌉ + ⌈T/64⌉, H, B) -- dK/dV blocks, then dQ blocks -- block 128.
pub fn attention_bwd_launch(s: &AttnShape, dtype: DType) -> Result<KernelLaunch> {
    let (elem, suffix) = check_shape(s, dtype)?;
    Ok(KernelLaunch {
        kernel: format!("attention_bwd_{suffix}"),
        grid: ((s.seq.div_ceil(BK) + s.seq.div_ceil(BQ)) as u32, s.heads as u32, s.batch as u32),
        block: (THREADS, 1, 1),
        smem_bytes: bwd_smem_bytes(s.head_dim, elem) as u32,
    })
}

/// `attention_varlen_{fwd,bwd}_f32`: causal attention over `nseq` packed sequences (their row
/// offsets in a `cu_seqlens` int32 buffer of nseq + 1 entries), the grid sized for the longest,
/// `tmax`; blocks past a shorter sequence's tiles return at once. Block and shared memory as the
/// batched kernels.
pub fn attention_varlen_launch(nseq: usize, tmax: usize, heads: usize, head_dim: usize, backward: bool) -> Result<KernelLaunch> {
    let s = AttnShape { batch: nseq, seq: tmax, heads, head_dim, causal: true, scale: 1.0 / (head_dim as f32).sqrt() };
    let mut l = if backward { attention_bwd_launch(&s, DType::F32)? } else { attention_fwd_launch(&s, DType::F32)? };
    l.kernel = format!("attention_varlen_{}_f32", if backward { "bwd" } else { "fwd" });
    Ok(l)
}
