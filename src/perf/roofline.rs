//! The roofline predictor: a time for every recorded operation on a named GPU ([`Gpu`]).
//!
//! Kernels: blocks per SM from registers, shared memory and block size ([`blocks_per_sm`]);
//! waves = ⌈blocks / (SMs × blocks per SM)⌉ and wave efficiency = blocks / (waves × SMs × blocks per
//! SM); time = max(FLOPs / (peak × eff × wave efficiency), bytes / (DRAM × MEM_EFF × fill)) +
//! launch overhead, where fill = min(1, resident threads / (MEM_SATURATION × the GPU's thread
//! slots)). cuBLASLt GEMMs: the best of a few output tiles (one CTA per SM at a time) with
//! split-K, time = max(padded FLOPs / (peak × sustained efficiency), bytes / (DRAM × MEM_EFF)) +
//! call overhead. Copies: bytes / PCIe + a fixed cost. The roofline time of an operation is
//! max(FLOPs / peak, bytes / DRAM): "% of roofline" = roofline time / predicted time.
use super::cost::{launch_cost, Class, Cost, Unit};
use super::gpus::{k, Gpu};
use super::record::{GemmPath, GemmRec, LaunchRec, Log, Op};
use super::resources;
use crate::error::{Error, Result};
use crate::tensor::DType;

/// The prediction for one operation.
#[derive(Clone, Debug, PartialEq)]
pub struct Pred {
    /// Kernel name, or a label for GEMMs, memsets and copies.
    pub name: String,
    pub time: f64,
    /// max(FLOPs / peak, bytes / DRAM bandwidth) at the unit's full peak.
    pub roof: f64,
    pub flops: f64,
    pub bytes: f64,
    pub unit: Unit,
    pub class: Class,
    /// Blocks (GEMMs: tiles × splits) over one full wave (SMs × blocks per SM); < 1: below a wave.
    pub waves: f64,
    pub blocks: u64,
    pub blocks_per_sm: u32,
    /// The problem exposes at least a full wave's threads (see src/perf/cost.rs `par`); kernels only.
    pub could_fill: bool,
    /// Registers were the default, not from the ptxas report.
    pub default_regs: bool,
    pub regs: u32,
}

fn peak(gpu: &Gpu, unit: Unit) -> f64 {
    match unit {
        Unit::TensorCore => gpu.tc_half,
        Unit::Tf32 => gpu.tc_tf32,
        Unit::CudaCore => gpu.f32,
    }
}

/// Resident blocks per SM of a kernel with `threads` per block, `regs` per thread and `smem`
/// bytes of shared memory per block (static + dynamic); 0 when one block does not fit.
pub fn blocks_per_sm(gpu: &Gpu, threads: u32, regs: u32, smem: u32) -> u32 {
    let warps = threads.div_ceil(32).max(1);
    let by_threads = gpu.max_threads_sm / (32 * warps);
    let per_warp = (regs.max(1) * 32).div_ceil(k::REG_ALLOC_UNIT) * k::REG_ALLOC_UNIT;
    let by_regs = gpu.regs_sm / (per_warp * warps);
    let by_smem = gpu.smem_sm / (smem + k::SMEM_RESERVED_PER_BLOCK);
    gpu.max_blocks_sm.min(by_threads).min(by_regs).min(by_smem)
}

/// One kernel launch.
pub fn predict_launch(gpu: &Gpu, rec: &LaunchRec, log: &Log) -> Result<Pred> {
    let c = launch_cost(rec, log)?;
    predict_kernel(gpu, rec, &c)
}

/// One kernel launch of known cost.
pub fn predict_kernel(gpu: &Gpu, rec: &LaunchRec, c: &Cost) -> Result<Pred> {
    let u = resources::usage(&rec.kernel, gpu.sm);
    let threads = rec.cfg.threads_per_block() as u32;
    let bps = blocks_per_sm(gpu, threads, u.regs, u.smem_static + rec.cfg.smem);
    if bps == 0 {
        return Err(Error::msg(format!(
            "dry run: {} does not fit on an SM of the {} ({} threads × {} registers, {} B shared memory)",
            rec.kernel,
            gpu.name,
            threads,
            u.regs,
            u.smem_static + rec.cfg.smem
        )));
    }
    let g = rec.cfg.grid;
    let blocks = g.0 as u64 * g.1 as u64 * g.2 as u64;
    let slots = gpu.sms as u64 * bps as u64;
    let waves = blocks.div_ceil(slots).max(1);
    let wave_eff = blocks as f64 / (waves * slots) as f64;
    let resident = blocks.min(slots) as f64 * threads as f64;
    let fill = (resident / (k::MEM_SATURATION * gpu.sms as f64 * gpu.max_threads_sm as f64)).min(1.0);
    let bytes = c.read + c.written;
    let t_c = c.flops / (peak(gpu, c.unit) * c.eff * wave_eff);
    let t_m = bytes / (gpu.dram * k::MEM_EFF * fill);
    Ok(Pred {
        name: rec.kernel.clone(),
        time: t_c.max(t_m) + k::LAUNCH_S,
        roof: (c.flops / peak(gpu, c.unit)).max(bytes / gpu.dram),
        flops: c.flops,
        bytes,
        unit: c.unit,
        class: c.class,
        waves: blocks as f64 / slots as f64,
        blocks,
        blocks_per_sm: bps,
        could_fill: c.par >= (slots * threads as u64) as f64,
        default_regs: !u.from_ptxas,
        regs: u.regs,
    })
}

fn bytes_of(dt: DType) -> f64 {
    if dt == DType::F32 {
        4.0
    } else {
        2.0
    }
}

/// The GEMM's tiling: (tile m, tile n, split-K, compute time at full efficiency).
pub fn gemm_tiling(gpu: &Gpu, g: &GemmRec, peak_eff: f64) -> (usize, usize, usize, f64) {
    let mut best = (0, 0, 1, f64::INFINITY);
    for &(tm, tn, tile_eff) in k::GEMM_TILES {
        let tiles = g.m.div_ceil(tm) * g.n.div_ceil(tn) * g.batch;
        for split in 1..=k::MAX_SPLIT_K {
            if split > 1 && (tiles * split > 2 * gpu.sms as usize || g.k / split < k::MIN_K_PER_SPLIT) {
                break;
            }
            let ctas = tiles * split;
            let waves = ctas.div_ceil(gpu.sms as usize);
            let per_cta = 2.0 * (tm * tn) as f64 * g.k.div_ceil(split) as f64;
            let t = waves as f64 * per_cta / (tile_eff * peak_eff / gpu.sms as f64);
            if t < best.3 {
                best = (tm, tn, split, t);
            }
        }
    }
    best
}

/// One cuBLASLt GEMM (tile quantization, split-K, sustained efficiency; see the module docs).
pub fn predict_gemm(gpu: &Gpu, g: &GemmRec) -> Pred {
    let (unit, eff) = match g.path {
        GemmPath::TensorCore => (Unit::TensorCore, k::GEMM_TC_EFF),
        GemmPath::Tf32 => (Unit::Tf32, k::GEMM_TF32_EFF),
        GemmPath::F32 => (Unit::CudaCore, k::GEMM_F32_EFF),
    };
    let p = peak(gpu, unit);
    let (tm, tn, split, t_c) = gemm_tiling(gpu, g, p * eff);
    let (m, n, kk, b) = (g.m as f64, g.n as f64, g.k as f64, g.batch as f64);
    let flops = 2.0 * m * n * kk * b;
    let ti = bytes_of(g.in_dtype);
    let to = bytes_of(g.out_dtype);
    let partials = if split > 1 { 2.0 * 4.0 * m * n * split as f64 } else { 0.0 };
    let bytes = b * (ti * (m * kk + kk * n) + to * m * n * if g.beta != 0.0 { 2.0 } else { 1.0 }) + if g.bias { to * n } else { 0.0 } + partials;
    let t_m = bytes / (gpu.dram * k::MEM_EFF);
    let ctas = (g.m.div_ceil(tm) * g.n.div_ceil(tn) * g.batch * split) as u64;
    let dt = match (g.path, g.in_dtype) {
        (GemmPath::TensorCore, DType::F16) => "f16",
        (GemmPath::TensorCore, _) => "bf16",
        (GemmPath::Tf32, _) => "tf32",
        (GemmPath::F32, _) => "f32",
    };
    Pred {
        name: format!("cuBLASLt {dt} {} ({})", g.call, if g.path == GemmPath::F32 { "CUDA cores" } else { "tensor cores" }),
        time: t_c.max(t_m) + k::GEMM_CALL_S,
        roof: (flops / p).max(bytes / gpu.dram),
        flops,
        bytes,
        unit,
        class: Class::Gemm,
        waves: ctas as f64 / gpu.sms as f64,
        blocks: ctas,
        blocks_per_sm: 1,
        could_fill: false,
        default_regs: false,
        regs: 0,
    }
}

fn transfer(name: &str, bytes: usize, bw: f64, fixed: f64, gpu: &Gpu) -> Pred {
    let b = bytes as f64;
    Pred {
        name: name.into(),
        time: b / bw + fixed,
        roof: b / if name == "memset" { gpu.dram } else { gpu.pcie },
        flops: 0.0,
        bytes: b,
        unit: Unit::CudaCore,
        class: Class::Transfer,
        waves: f64::INFINITY,
        blocks: 0,
        blocks_per_sm: 0,
        could_fill: false,
        default_regs: false,
        regs: 0,
    }
}

/// Every recorded operation, in order.
pub fn predict(gpu: &Gpu, ops: &[Op], log: &Log) -> Result<Vec<Pred>> {
    ops.iter()
        .map(|op| match op {
            Op::Launch(l) => predict_launch(gpu, l, log),
            Op::Gemm(g) => Ok(predict_gemm(gpu, g)),
            Op::Memset { bytes } => Ok(transfer("memset", *bytes, gpu.dram * k::MEM_EFF, k::LAUNCH_S, gpu)),
            Op::Upload { bytes } => Ok(transfer("copy host→device", *bytes, gpu.pcie, k::COPY_S, gpu)),
            Op::Download { bytes } => Ok(transfer("copy device→host", *bytes, gpu.pcie, k::COPY_S, gpu)),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::perf::gpus::gpu;

    #[test]
    fn occupancy_by_hand() {
        let h = gpu("h100").unwrap();
        // 256 threads, 32 regs: 8 warps × 1024 regs = 8192 per block → 8 by registers, 8 by threads
        assert_eq!(blocks_per_sm(h, 256, 32, 0), 8);
        // 128 threads × 128 regs = 16384 per block → 4; 42 KiB smem → 228/(42+1) = 5: 4
        assert_eq!(blocks_per_sm(h, 128, 128, 42 * 1024), 4);
        // 168 regs → 5376 per warp (21 units of 256) × 4 warps = 21504 → 3
        assert_eq!(blocks_per_sm(h, 128, 168, 0), 3);
        // 13 regs round up to 16 per thread (512 per warp); 256 threads: threads limit 8
        assert_eq!(blocks_per_sm(h, 256, 13, 0), 8);
        // 64 threads, 16 regs: the 32-block limit
        assert_eq!(blocks_per_sm(h, 64, 16, 0), 32);
        // smem: 100 KiB per block → 2 on H100, 1 on L40S, 0 when over
        assert_eq!(blocks_per_sm(h, 128, 32, 100 * 1024), 2);
        assert_eq!(blocks_per_sm(gpu("l40s").unwrap(), 128, 32, 100 * 1024), 0);
        assert_eq!(blocks_per_sm(gpu("l40s").unwrap(), 256, 32, 0), 6);
    }

    #[test]
    fn a_known_gemm() {
        // 8192³ bf16 on H100: 64×32 = 2048 tiles of 128×256 → 16 waves on 132 SMs (15.5 full):
        // 16 × 132 × 2·128·256·8192 FLOPs at 0.75 × 989.4 TFLOP/s = 1.502 ms (+4 µs)
        let h = gpu("h100").unwrap();
        let g = GemmRec {
            call: "linear_bf16",
            m: 8192,
            n: 8192,
            k: 8192,
            batch: 1,
            in_dtype: DType::BF16,
            out_dtype: DType::F32,
            trans_a: false,
            trans_b: true,
            bias: false,
            beta: 0.0,
            path: GemmPath::TensorCore,
        };
        let p = predict_gemm(h, &g);
        let want = 16.0 * 132.0 * 2.0 * 128.0 * 256.0 * 8192.0 / (0.75 * 989.4e12) + 4e-6;
        assert!((p.time - want).abs() <= 0.02 * want, "{} vs {want}", p.time);
        assert!((p.roof - 2.0 * 8192f64.powi(3) / 989.4e12).abs() < 1e-9);
        // the same in exact f32 on the CUDA cores: ≈ 15× slower (989.4/66.9 at equal efficiency)
        let f = predict_gemm(h, &GemmRec { path: GemmPath::F32, in_dtype: DType::F32, ..g.clone() });
        assert!(f.time / p.time > 12.0 && f.unit == Unit::CudaCore);
        // a small-n dW GEMM (768 × 768, k 50k) splits K to fill the SMs
        let dw = GemmRec { m: 768, n: 768, k: 50_432, ..g };
        let (_, _, split, _) = gemm_tiling(h, &dw, h.tc_half * 0.75);
        assert!(split > 1);
    }

    #[test]
    fn a_memory_bound_kernel_below_a_wave_is_slow() {
        use crate::cuda::{KernelArgs, LaunchCfg};
        let h = gpu("h100").unwrap();
        let log = Log::default();
        let n = 1 << 26;
        let rec = |blocks: u32| LaunchRec {
            kernel: "axpy_f32".into(),
            cfg: LaunchCfg::new((blocks, 1, 1), (256, 1, 1), 0),
            args: KernelArgs::new().ptr(1).ptr(2).f32(1.0).i32(n).args().to_vec(),
        };
        let full = predict_launch(h, &rec(16_384), &log).unwrap();
        // 12 bytes per element at 0.8 × 3.35 TB/s
        let want = 12.0 * n as f64 / (0.8 * 3350e9) + 2.5e-6;
        assert!((full.time - want).abs() < 1e-3 * want, "{} vs {want}", full.time);
        let few = predict_launch(h, &rec(8), &log).unwrap();
        assert!(few.time > 50.0 * full.time && few.could_fill && few.waves < 1.0);
    }
}
