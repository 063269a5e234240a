//! Per-kernel cost models: for every kernel of kernels/*.cu, the FLOPs, the DRAM bytes read and
//! written, the execution unit (tensor cores or CUDA cores) and the parallelism its problem
//! exposes, decoded from the launch arguments (the same packing as src/backend/device.rs and
//! src/train/device_step.rs). A kernel without a row is an error at dry-run time: a new kernel
//! adds its row to [`TABLE`] (tests/dry_run.rs checks every kernel the towers launch has one); the
//! 16-bit activation kernels' rows are in [`super::cost_half::TABLE`], the attention kernels' cost
//! functions in `cost_attn.rs`.
//!
//! Bytes count compulsory DRAM traffic: every tensor read or written once (re-reads of a tile
//! served by L2 are free, e.g. attention's K/V tiles). `par` is the number of threads the
//! problem could use with one independent output element per thread (reductions: one thread
//! per [`REDUCE_PER_THREAD`] summed elements; row kernels: one warp per row); the wave
//! assertion of tests/dry_run.rs compares it with one full wave.
use super::cost_attn::{attention, attention_varlen, flash, flash_varlen};
pub use super::cost_attn::{flash_pairs, module_uses_mma};
use super::gpus::k;
use super::record::{LaunchRec, Log};
use crate::cuda::KernelArg;
use crate::error::{Error, Result};

/// Where a kernel's arithmetic runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Unit {
    /// bf16/f16 tensor cores (mma.sync or cuBLASLt).
    TensorCore,
    /// TF32 tensor cores.
    Tf32,
    /// f32 on the CUDA cores.
    CudaCore,
}

impl Unit {
    pub fn label(self) -> &'static str {
        match self {
            Unit::TensorCore => "TC",
            Unit::Tf32 => "TF32",
            Unit::CudaCore => "CUDA",
        }
    }
}

/// What a kernel does (tests/dry_run.rs: GEMMs and attention must be on tensor cores under bf16).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Class {
    Gemm,
    Attention,
    Norm,
    Elementwise,
    Reduction,
    Optimizer,
    Transfer,
}

/// The cost of one launch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Cost {
    pub flops: f64,
    pub read: f64,
    pub written: f64,
    pub unit: Unit,
    pub class: Class,
    /// Share of the unit's peak this kernel's arithmetic reaches at full occupancy.
    pub eff: f64,
    /// Threads the problem could use (see the module docs).
    pub par: f64,
}

/// Summed elements per thread a reduction needs to be worth a thread (a two-stage reduction).
pub const REDUCE_PER_THREAD: f64 = 64.0;

/// A launch being costed: its arguments, the element size of its typed tensors, the recorder's
/// buffers (lengths, kept int32 data).
pub struct Ctx<'a> {
    pub rec: &'a LaunchRec,
    pub log: &'a Log,
    /// Bytes per element of the kernel's typed tensors: 4 (f32) or 2 (bf16, f16).
    pub t: f64,
}

impl Ctx<'_> {
    fn arg(&self, i: usize) -> Result<KernelArg> {
        self.rec
            .args
            .get(i)
            .copied()
            .ok_or_else(|| Error::msg(format!("dry run: {} has {} arguments, its cost row reads #{i}", self.rec.kernel, self.rec.args.len())))
    }
    /// Integer argument `i` (i32, u32 or i64).
    pub fn i(&self, i: usize) -> Result<f64> {
        match self.arg(i)? {
            KernelArg::I32(v) => Ok(v as f64),
            KernelArg::U32(v) => Ok(v as f64),
            KernelArg::I64(v) => Ok(v as f64),
            a => Err(Error::msg(format!("dry run: {} argument #{i} is {a:?}, its cost row expects an integer", self.rec.kernel))),
        }
    }
    /// Pointer argument `i`.
    pub fn p(&self, i: usize) -> Result<u64> {
        match self.arg(i)? {
            KernelArg::Ptr(v) => Ok(v),
            a => Err(Error::msg(format!("dry run: {} argument #{i} is {a:?}, its cost row expects a pointer", self.rec.kernel))),
        }
    }
    /// Float argument `i`.
    pub fn f(&self, i: usize) -> Result<f64> {
        match self.arg(i)? {
            KernelArg::F32(v) => Ok(v as f64),
            KernelArg::F64(v) => Ok(v),
            a => Err(Error::msg(format!("dry run: {} argument #{i} is {a:?}, its cost row expects a float", self.rec.kernel))),
        }
    }
    pub(super) fn blocks(&self) -> f64 {
        let g = self.rec.cfg.grid;
        g.0 as f64 * g.1 as f64 * g.2 as f64
    }
    /// Sequence lengths of a packed (cu_seqlens) launch; all `tmax` when the offsets were not kept.
    pub(super) fn seqlens(&self, cu: usize, nseq: usize, tmax: usize) -> Result<Vec<f64>> {
        let (p, n, tmax) = (self.p(cu)?, self.i(nseq)? as usize, self.i(tmax)?);
        Ok(match self.log.ints_at(p) {
            Some(o) if o.len() > n => o.windows(2).take(n).map(|w| (w[1] - w[0]).max(0) as f64).collect(),
            _ => vec![tmax; n],
        })
    }
}

type CostFn = fn(&Ctx) -> Result<Cost>;

/// A row of the table: `name` ends in `_*` for the f32/bf16/f16 variants of one kernel.
pub struct Row {
    pub name: &'static str,
    pub cost: CostFn,
}

pub(super) fn cc(class: Class, flops: f64, read: f64, written: f64, par: f64) -> Cost {
    Cost { flops, read, written, unit: Unit::CudaCore, class, eff: k::CC_EFF, par }
}

/// One thread per element: `rb`/`wb` bytes read/written and `f` FLOPs per element.
pub(super) fn ew(n: f64, rb: f64, wb: f64, f: f64) -> Cost {
    cc(Class::Elementwise, f * n, rb * n, wb * n, n)
}

pub(super) fn reduce(parts: f64, n: f64) -> Cost {
    cc(Class::Reduction, parts * n, 4.0 * parts * n, 4.0 * n, (parts * n / REDUCE_PER_THREAD).max(n.min(parts * n)))
}

/// The tiled CUDA-core GEMM kernels: 2mnk FLOPs, each operand once.
fn tiled_gemm(m: f64, n: f64, kk: f64, read: f64, written: f64) -> Cost {
    Cost { flops: 2.0 * m * n * kk, read, written, unit: Unit::CudaCore, class: Class::Gemm, eff: k::KERNEL_GEMM_CC_EFF, par: m * n }
}

/// Every kernel of kernels/*.cu (argument numbers as in each kernel's signature).
pub const TABLE: &[Row] = &[
    // adamw.cu: (p, g, m, v, p_bf16, p_f16, n, lr, β1, β2, eps, wd, step)
    Row {
        name: "adamw_*",
        cost: |c| {
            let n = c.i(6)?;
            let halves = [c.p(4)?, c.p(5)?].iter().filter(|&&p| p != 0).count() as f64;
            Ok(Cost { class: Class::Optimizer, ..ew(n, 12.0 + c.t, 12.0 + 2.0 * halves, 20.0) })
        },
    },
    // attention.cu
    Row { name: "attention_fwd_*", cost: |c| attention(c, 5, 4.0, 3.0, 1.0, false) },
    Row { name: "attention_bwd_*", cost: |c| attention(c, 9, 10.0, 5.0, 3.0, true) },
    Row { name: "attention_varlen_fwd_f32", cost: |c| attention_varlen(c, 5, 4.0, 3.0, 1.0, false) },
    Row { name: "attention_varlen_bwd_f32", cost: |c| attention_varlen(c, 9, 10.0, 5.0, 3.0, true) },
    // flash_fwd.cu / flash_bwd.cu (tensor cores: mma.sync): fwd (q, k, v, o, lse, B, T, H, hd, causal, scale),
    // bwd (q, k, v, o, dout, lse, dq, dk, dv, B, T, H, hd, causal, scale); varlen: cu_seqlens, nseq,
    // Tmax in place of B, T. FLOPs as executed: the (query, key) pairs the kernels' mma cover
    // ([`flash_pairs`]: 16-row granularity, causal at tile granularity on the diagonal), 2·hd per
    // pair and tile product. Forward 2 products (S = QKᵀ, PV). Backward: the textbook 5 (S, dP, dV,
    // dK, dQ), but this kernel computes S and dP twice (its dK/dV blocks: Sᵀ, dPᵀ, dV, dK over the
    // key-major pairs; its dQ blocks: S, dP, dQ over the query-major pairs; deterministic, no
    // atomics): 7 products, 14 FLOPs per pair and dim ([`FLASH_BWD_MULTS`]) — the time model counts those.
    Row { name: "flash_fwd_*", cost: |c| flash(c, 5, false) },
    Row { name: "flash_fwd64_*", cost: |c| flash(c, 5, false) }, // the hd-64 instance alone
    Row { name: "flash_bwd_*", cost: |c| flash(c, 9, true) },
    Row { name: "flash_varlen_fwd_*", cost: |c| flash_varlen(c, 5, false) },
    Row { name: "flash_varlen_bwd_*", cost: |c| flash_varlen(c, 9, true) },
    Row { name: "flash_varlen_bwd64_*", cost: |c| flash_varlen(c, 9, true) }, // the hd-64 instance alone
    // (x, y, n): 16-bit → f32 (flash outputs back to the f32 stream)
    Row { name: "bf16_to_f32", cost: |c| Ok(ew(c.i(2)?, 2.0, 4.0, 0.0)) },
    Row { name: "f16_to_f32", cost: |c| Ok(ew(c.i(2)?, 2.0, 4.0, 0.0)) },
    // mma_test.cu (a, b, c, m_valid): one warp, one 16×16×16 tile (tests of the fragment layouts)
    Row {
        name: "mma_test_*",
        cost: |c| {
            Ok(Cost {
                unit: Unit::TensorCore,
                class: Class::Gemm,
                eff: k::TC_KERNEL_EFF,
                ..cc(Class::Gemm, 2.0 * 16.0 * 16.0 * 16.0, 2.0 * c.t * 256.0, 4.0 * 256.0, 32.0)
            })
        },
    },
    // bias_gelu.cu: fwd (y, b, pre, rows, n) in place; bwd (dy, pre, dpre, dbias_partial, rows, n)
    Row { name: "bias_gelu_fwd_*", cost: |c| bias_fwd(c) },
    Row { name: "bias_quick_gelu_fwd_*", cost: |c| bias_fwd(c) },
    Row { name: "bias_gelu_bwd_*", cost: |c| bias_bwd(c) },
    Row { name: "bias_quick_gelu_bwd_*", cost: |c| bias_bwd(c) },
    Row { name: "bias_grad_reduce_f32", cost: |c| Ok(reduce(c.i(2)?, c.i(3)?)) },
    // vectorized bias + activation: fwd (y, b, pre, [yh,] rows, n, act, vec) in place on f32 y, with
    // the 16-bit copy yh of the output for the next GEMM; bwd (dy, pre, dpre, partial, rows, n, act, vec)
    Row { name: "bias_act_fwd_f32v", cost: |c| bias_act_fwd(c, 3, 0.0) },
    Row { name: "bias_act_fwd_f32_hbf16", cost: |c| bias_act_fwd(c, 4, 2.0) },
    Row { name: "bias_act_fwd_f32_hf16", cost: |c| bias_act_fwd(c, 4, 2.0) },
    Row {
        name: "bias_act_bwd_f32v",
        cost: |c| {
            let (r, n) = (c.i(4)?, c.i(5)?);
            let parts = c.rec.cfg.grid.1 as f64;
            Ok(Cost { par: r * n / vec_width(c, 7)?, ..ew(r * n, 8.0, 4.0 + 4.0 * parts / r.max(1.0), 15.0) })
        },
    },
    // two-stage column sums (bias gradients): (m, partial, rows, n) on grid (⌈n/256⌉, parts), then
    // col_reduce_f32 (partial, out, parts, n)
    Row {
        name: "col_sums_partial_f32",
        cost: |c| {
            let (r, n) = (c.i(2)?, c.i(3)?);
            let parts = c.rec.cfg.grid.1 as f64;
            Ok(cc(Class::Reduction, r * n, 4.0 * r * n, 4.0 * parts * n, r * n / REDUCE_PER_THREAD))
        },
    },
    // (partial, out, parts, n): C × R-thread blocks (train_ops::col_reduce_cfg), each partial read once
    Row { name: "col_reduce_f32", cost: |c| Ok(reduce(c.i(2)?, c.i(3)?)) },
    // cross_entropy.cu: fwd (logits, targets, loss, lse, rows, C, eps); bwd (logits, targets, lse, dlogits, rows, C, ...)
    Row {
        name: "cross_entropy_fwd_*",
        cost: |c| {
            let (r, n) = (c.i(4)?, c.i(5)?);
            Ok(Cost { class: Class::Reduction, ..cc(Class::Reduction, 5.0 * r * n, r * n * c.t + 4.0 * r, 8.0 * r, r * n / REDUCE_PER_THREAD) })
        },
    },
    Row { name: "cross_entropy_mean_f32", cost: |c| Ok(reduce(c.i(2)?, 1.0)) },
    Row {
        name: "cross_entropy_bwd_*",
        cost: |c| {
            let (r, n) = (c.i(4)?, c.i(5)?);
            Ok(ew(r * n, c.t + 8.0 / n, c.t, 5.0))
        },
    },
    // embed.cu
    Row { name: "text_embed_f32", cost: |c| Ok(ew(c.i(4)? * c.i(5)? * c.i(6)?, 8.0, 4.0, 1.0)) }, // (ids, tok, pos, out, B, T, W)
    Row { name: "patch_im2col_f32", cost: |c| Ok(ew(c.i(2)? * c.i(3)? * c.i(4)? * c.i(4)?, 4.0, 4.0, 0.0)) }, // (px, cols, B, C, S, P)
    Row {
        name: "vision_embed_assemble_f32", // (patches, cls, pos, out, B, N, W)
        cost: |c| {
            let (b, n, w) = (c.i(4)?, c.i(5)?, c.i(6)?);
            Ok(ew(b * (n + 1.0) * w, 4.0 * n / (n + 1.0), 4.0, 1.0))
        },
    },
    Row { name: "pool_rows_f32", cost: |c| Ok(ew(c.i(3)? * c.i(5)?, 4.0, 4.0, 0.0)) }, // (x, index, out, B, T, W)
    Row { name: "unpool_rows_f32", cost: |c| Ok(ew(c.i(3)? * c.i(5)?, 8.0, 4.0, 1.0)) }, // (dp, index, dx, B, T, W)
    Row { name: "axpy_f32", cost: |c| Ok(ew(c.i(3)?, 8.0, 4.0, 2.0)) },                // (y, x, alpha, n)
    Row { name: "vision_embed_bwd_f32", cost: |c| Ok(ew(c.i(2)? * c.i(3)? * c.i(4)?, 4.0, 4.0, 0.0)) }, // (dx, dpatches, B, N, W)
    Row {
        name: "embedding_bwd_rows_f32", // (dx, order, starts, uniq, dtable, U, W)
        cost: |c| {
            let (u, w) = (c.i(5)?, c.i(6)?);
            let ids = c.log.elems_from(c.p(1)?).map_or(u, |n| n as f64);
            Ok(cc(Class::Reduction, ids * w, 4.0 * (ids * w + u * w + ids), 4.0 * u * w, u * w))
        },
    },
    // layernorm.cu
    Row {
        name: "layernorm_fwd_*", // (x, g, b, y, mean, rstd, rows, cols, eps)
        cost: |c| {
            let (r, n) = (c.i(6)?, c.i(7)?);
            Ok(cc(Class::Norm, 8.0 * r * n, r * n * c.t + 8.0 * n, r * n * c.t + 8.0 * r, 32.0 * r))
        },
    },
    Row {
        name: "residual_layernorm_fwd_*", // (x, residual, g, b, y, mean, rstd, rows, cols, eps)
        cost: |c| {
            let (r, n) = (c.i(7)?, c.i(8)?);
            Ok(cc(Class::Norm, 9.0 * r * n, 2.0 * r * n * c.t + 8.0 * n, 2.0 * r * n * c.t + 8.0 * r, 32.0 * r))
        },
    },
    // f32 LayerNorm also writing the 16-bit input of the next GEMM: (x, g, b, y, yh, mean, rstd, rows, cols, eps),
    // residual: (x, residual, g, b, y, yh, mean, rstd, rows, cols, eps)
    Row { name: "layernorm_fwd_f32_hbf16", cost: |c| ln_fwd_h(c, 7, false) },
    Row { name: "layernorm_fwd_f32_hf16", cost: |c| ln_fwd_h(c, 7, false) },
    Row { name: "residual_layernorm_fwd_f32_hbf16", cost: |c| ln_fwd_h(c, 8, true) },
    Row { name: "residual_layernorm_fwd_f32_hf16", cost: |c| ln_fwd_h(c, 8, true) },
    Row {
        name: "layernorm_bwd_*", // (dy, x, g, mean, rstd, dx, dg_partial, db_partial, rows, cols)
        cost: |c| {
            let (r, n) = (c.i(8)?, c.i(9)?);
            let parts = c.rec.cfg.grid.0 as f64;
            Ok(cc(Class::Norm, 12.0 * r * n, 2.0 * r * n * c.t + 8.0 * r + 4.0 * n, r * n * c.t + 8.0 * parts * n, 32.0 * r))
        },
    },
    Row {
        name: "layernorm_bwd_reduce_f32", // (dg_partial, db_partial, dg, db, parts, cols)
        cost: |c| {
            let r = reduce(c.i(4)?, c.i(5)?);
            Ok(Cost { flops: 2.0 * r.flops, read: 2.0 * r.read, written: 2.0 * r.written, par: 2.0 * r.par, ..r })
        },
    },
    // matmul.cu
    // (x, y, n as i64): one float4 per thread (train_ops::to_half_launch), so `par` is n/4
    Row { name: "f32_to_bf16", cost: |c| Ok(Cost { par: c.i(2)? / 4.0, ..ew(c.i(2)?, 4.0, 2.0, 1.0) }) },
    Row { name: "f32_to_f16", cost: |c| Ok(Cost { par: c.i(2)? / 4.0, ..ew(c.i(2)?, 4.0, 2.0, 1.0) }) },
    Row { name: "linear_f32", cost: |c| linear_kernel(c, 4.0) },
    Row { name: "linear_bf16w", cost: |c| linear_kernel(c, 2.0) },
    Row { name: "linear_f16w", cost: |c| linear_kernel(c, 2.0) },
    // gemm_bf16 / gemm_f16 (a, b, bias, c, d, m, n, k, ta, tb): the emulator's (and no-cuBLASLt)
    // half GEMMs, tiled on the CUDA cores; *_h: 16-bit D
    Row { name: "gemm_bf16", cost: |c| half_gemm_kernel(c, 4.0) },
    Row { name: "gemm_f16", cost: |c| half_gemm_kernel(c, 4.0) },
    Row { name: "gemm_bf16_h", cost: |c| half_gemm_kernel(c, 2.0) },
    Row { name: "gemm_f16_h", cost: |c| half_gemm_kernel(c, 2.0) },
    Row {
        name: "gemm_f32", // (a, b, c, m, n, k, ta, tb, alpha, beta)
        cost: |c| {
            let (m, n, kk, beta) = (c.i(3)?, c.i(4)?, c.i(5)?, c.f(9)?);
            Ok(tiled_gemm(m, n, kk, 4.0 * (m * kk + kk * n + if beta != 0.0 { m * n } else { 0.0 }), 4.0 * m * n))
        },
    },
    // pca.cu
    Row { name: "pca_center_f32", cost: |c| Ok(ew(c.i(3)? * c.i(4)?, 4.0, 4.0, 2.0)) }, // (X, Xc, mu, B, D)
    Row { name: "pca_init_f32", cost: |c| Ok(ew(c.i(1)? * c.i(2)?, 0.0, 4.0, 4.0)) },   // (Qt, D, k, seed)
    Row {
        name: "pca_gemm_f32", // (A, B, bias, C, M, N, K, ta, tb)
        cost: |c| {
            let (m, n, kk) = (c.i(4)?, c.i(5)?, c.i(6)?);
            Ok(tiled_gemm(m, n, kk, 4.0 * (m * kk + kk * n), 4.0 * m * n))
        },
    },
    Row {
        name: "pca_orth_f32", // (Qt, D, k): one block, Gram–Schmidt over k rows of D, two sweeps
        cost: |c| {
            let (d, kk) = (c.i(1)?, c.i(2)?);
            Ok(cc(Class::Reduction, 2.0 * 2.0 * kk * kk * d, 4.0 * d * kk, 4.0 * d * kk, d))
        },
    },
    // pos_gather.cu: fwd (P, pos, out, rows, L, W, keep, ratio); bwd (dout, pos, dP_partial, rows, L, W, ...)
    Row {
        name: "pos_gather_fwd_*",
        cost: |c| {
            let (r, l, w) = (c.i(3)?, c.i(4)?, c.i(5)?);
            Ok(ew(r * w, c.t + 4.0 / w + 4.0 * l / r.max(1.0), c.t, 3.0))
        },
    },
    Row {
        name: "pos_stretch_f32", // (P, out, L, W, keep, ratio)
        cost: |c| {
            let (l, w, keep, ratio) = (c.i(2)?, c.i(3)?, c.i(4)?, c.i(5)?);
            let rows = ratio * l - (ratio - 1.0) * keep;
            Ok(ew(rows * w, 4.0 * l / rows.max(1.0), 4.0, 3.0))
        },
    },
    Row {
        name: "pos_gather_bwd_*",
        cost: |c| {
            let (r, w) = (c.i(3)?, c.i(5)?);
            let partial = c.log.elems_from(c.p(2)?).map_or(r * w, |n| n as f64);
            Ok(cc(Class::Reduction, 2.0 * r * w, r * w * c.t + 4.0 * r, 4.0 * partial, r * w))
        },
    },
    Row { name: "pos_gather_bwd_reduce_f32", cost: |c| Ok(reduce(c.i(2)?, c.i(3)?)) },
];

fn bias_fwd(c: &Ctx) -> Result<Cost> {
    let (r, n) = (c.i(3)?, c.i(4)?);
    let pre = if c.p(2)? != 0 { c.t } else { 0.0 };
    Ok(ew(r * n, c.t + 4.0 / r.max(1.0), c.t + pre, 10.0))
}

/// Executed FLOPs per (query, key) pair and head dim of flash_bwd (see its TABLE rows): 2 per
/// product, 4 products in the dK/dV blocks and 3 in the dQ blocks.
pub const FLASH_BWD_MULTS: f64 = 14.0;

/// bias_act_fwd_*: f32 y in place (+ bias), `pre` f32 when non-null, `h` bytes of the 16-bit copy.
fn bias_act_fwd(c: &Ctx, rows_at: usize, h: f64) -> Result<Cost> {
    let (r, n) = (c.i(rows_at)?, c.i(rows_at + 1)?);
    let pre = if c.p(2)? != 0 { 4.0 } else { 0.0 };
    Ok(Cost { par: r * n / vec_width(c, rows_at + 3)?, ..ew(r * n, 4.0 + 4.0 / r.max(1.0), 4.0 + pre + h, 10.0) })
}

/// Elements per thread of the vectorized elementwise kernels (argument `vec` at `i`): 4 (float4) or 1;
/// their `par` counts threads of that width.
pub(super) fn vec_width(c: &Ctx, i: usize) -> Result<f64> {
    Ok(if c.i(i)? != 0.0 { 4.0 } else { 1.0 })
}

/// The f32 LayerNorms with a 16-bit copy of y (rows at `rows_at`, cols after it).
fn ln_fwd_h(c: &Ctx, rows_at: usize, residual: bool) -> Result<Cost> {
    let (r, n) = (c.i(rows_at)?, c.i(rows_at + 1)?);
    let x = if residual { 2.0 } else { 1.0 }; // residual: x += residual written back
    Ok(cc(Class::Norm, (8.0 + x) * r * n, 4.0 * x * r * n + 8.0 * n, 4.0 * x * r * n + 2.0 * r * n + 8.0 * r, 32.0 * r))
}

/// gemm_bf16 / gemm_f16 (and *_h): 16-bit A and B, f32 C read when non-null, D of `d` bytes.
fn half_gemm_kernel(c: &Ctx, d: f64) -> Result<Cost> {
    let (m, n, kk) = (c.i(5)?, c.i(6)?, c.i(7)?);
    let cin = if c.p(3)? != 0 { 4.0 * m * n } else { 0.0 };
    Ok(tiled_gemm(m, n, kk, 2.0 * (m * kk + kk * n) + cin, d * m * n))
}

fn bias_bwd(c: &Ctx) -> Result<Cost> {
    let (r, n) = (c.i(4)?, c.i(5)?);
    let parts = c.rec.cfg.grid.1 as f64;
    Ok(ew(r * n, 2.0 * c.t, c.t + 4.0 * parts / r.max(1.0), 15.0))
}

/// (x, w, bias, y, m, n, k, has_bias), weights of `wt` bytes.
fn linear_kernel(c: &Ctx, wt: f64) -> Result<Cost> {
    let (m, n, kk, hb) = (c.i(4)?, c.i(5)?, c.i(6)?, c.i(7)?);
    Ok(tiled_gemm(m, n, kk, 4.0 * m * kk + wt * n * kk + 4.0 * hb * n, 4.0 * m * n))
}

/// The row of `kernel` and the element size of its typed tensors.
pub fn row_of(kernel: &str) -> Option<(&'static Row, f64)> {
    TABLE.iter().chain(super::cost_half::TABLE).find_map(|r| match r.name.strip_suffix('*') {
        None => (r.name == kernel).then_some((r, 4.0)),
        Some(base) => match kernel.strip_prefix(base)? {
            "f32" => Some((r, 4.0)),
            "bf16" | "f16" => Some((r, 2.0)),
            _ => None,
        },
    })
}

/// The cost of one recorded launch; an unknown kernel is an error naming it.
pub fn launch_cost(rec: &LaunchRec, log: &Log) -> Result<Cost> {
    let (row, t) =
        row_of(&rec.kernel).ok_or_else(|| Error::msg(format!("dry run: kernel {} has no cost model: add its row to src/perf/cost.rs (TABLE)", rec.kernel)))?;
    (row.cost)(&Ctx { rec, log, t })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::{KernelArgs, LaunchCfg};

    #[test]
    fn every_entry_point_has_a_row() {
        let missing: Vec<&str> = crate::cuda::kernels::MODULES.iter().flat_map(|m| m.entry_points.iter().copied()).filter(|k| row_of(k).is_none()).collect();
        assert!(missing.is_empty(), "kernels without a cost row in src/perf/cost.rs: {missing:?}");
    }

    #[test]
    fn attention_cost_is_decoded() {
        let log = Log::default();
        let a = KernelArgs::new().ptr(1).ptr(2).ptr(3).ptr(4).ptr(5).i32(2).i32(128).i32(12).i32(64).i32(0).f32(0.125);
        let rec = LaunchRec { kernel: "attention_fwd_bf16".into(), cfg: LaunchCfg::new((2, 12, 2), (128, 1, 1), 0), args: a.args().to_vec() };
        let c = launch_cost(&rec, &log).unwrap();
        assert_eq!(c.flops, 4.0 * 2.0 * 12.0 * 128.0 * 128.0 * 64.0);
        assert_eq!(c.read, 3.0 * 2.0 * 128.0 * 12.0 * 64.0 * 2.0);
        assert_eq!(c.class, Class::Attention);
        let rec = LaunchRec { kernel: "nope_f32".into(), ..rec };
        assert!(launch_cost(&rec, &log).unwrap_err().to_string().contains("nope_f32"));
    }

    #[test]
    fn flash_counts_the_pairs_it_executes() {
        // non-causal: ⌈T/16⌉·16 squared (T 257: 272 queries and keys, not the 320 of whole 64-tiles)
        assert_eq!(flash_pairs(257.0, false), (272.0 * 272.0, 272.0 * 272.0));
        assert_eq!(flash_pairs(1.0, true), (256.0, 256.0));
        // causal T 130, tiles of 64, 64, 16 rows: query-major Σ warps 16·(64m + min(s_m, 16w+16)),
        // key-major Σ_n s_n·Σ_{m≥n} s_m (the diagonal tile whole)
        assert_eq!(
            flash_pairs(130.0, true),
            (16.0 * (16.0 + 32.0 + 48.0 + 64.0) + 16.0 * (256.0 + 160.0) + 16.0 * 144.0, 64.0 * 144.0 + 64.0 * 80.0 + 16.0 * 16.0)
        );
        let log = Log::default();
        let a = KernelArgs::new().ptr(1).ptr(2).ptr(3).ptr(4).ptr(5).ptr(6).ptr(7).ptr(8).ptr(9).i32(2).i32(257).i32(12).i32(64).i32(0).f32(0.125);
        let rec = LaunchRec { kernel: "flash_bwd_bf16".into(), cfg: LaunchCfg::new((10, 12, 2), (128, 1, 1), 0), args: a.args().to_vec() };
        let c = launch_cost(&rec, &log).unwrap();
        assert_eq!(c.flops, FLASH_BWD_MULTS * 2.0 * 12.0 * 272.0 * 272.0 * 64.0);
        assert_eq!(c.read, (5.0 * 2.0 * 257.0 * 12.0 * 64.0) * 2.0 + 4.0 * 2.0 * 257.0 * 12.0);
        assert_eq!((c.unit, c.class), (Unit::TensorCore, Class::Attention));
    }
}
