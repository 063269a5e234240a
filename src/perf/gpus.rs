//! The named GPUs of the performance model and every constant the model uses, in one place.
//! KERNELS.md ("Performance model") lists the same numbers with their sources and assumptions;
//! change both together.
//!
//! Peaks are dense (no 2:4 sparsity) at the boost clock, from NVIDIA's datasheets and
//! architecture whitepapers (H100/H200: "NVIDIA H100 Tensor Core GPU" datasheet and the Hopper
//! whitepaper, SXM5 form; A100: A100 80GB SXM datasheet and the Ampere whitepaper; L40S: L40S
//! datasheet and the Ada whitepaper). Per-SM limits are the CUDA programming guide's table of
//! compute capabilities 9.0, 8.0 and 8.9.

/// One GPU model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gpu {
    /// `--gpu` value: h100, h200, a100, l40s.
    pub key: &'static str,
    pub name: &'static str,
    /// SM number whose ptxas report gives the kernels' registers (90 = the sm_90a cubin).
    pub sm: u32,
    pub sms: u32,
    /// Dense tensor-core bf16/f16 with f32 accumulation, FLOP/s.
    pub tc_half: f64,
    /// Dense TF32 tensor-core, FLOP/s.
    pub tc_tf32: f64,
    /// f32 FMA on the CUDA cores (2 FLOPs per FMA), FLOP/s.
    pub f32: f64,
    /// DRAM bandwidth, bytes/s.
    pub dram: f64,
    /// Host ↔ device copies through pinned staging (PCIe), bytes/s, achieved.
    pub pcie: f64,
    pub l2_bytes: f64,
    pub max_threads_sm: u32,
    pub max_blocks_sm: u32,
    pub regs_sm: u32,
    /// Shared memory per SM usable by blocks (the L1/shared carve-out at its maximum), bytes.
    pub smem_sm: u32,
    /// How the GPUs of a node and the nodes talk (the collective model, src/perf/collective.rs).
    pub link: Interconnect,
}

/// The interconnect of a typical multi-GPU server of one GPU kind: the fabric inside the node
/// and the network NICs between nodes. Bandwidths are per direction; the `*_busbw` ones are the
/// achievable NCCL ring *bus* bandwidth (nccl-tests' busbw: algorithm bandwidth × 2(P−1)/P for an
/// all-reduce), deliberately below the measured best; latencies are NCCL's own per-step figures.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Interconnect {
    /// The fabric inside a node, in words.
    pub intra: &'static str,
    /// Its short name in the scaling table ("NVLink", "PCIe").
    pub intra_short: &'static str,
    /// Peak per GPU per direction, bytes/s (for the record; the model uses `intra_busbw`).
    pub intra_peak: f64,
    /// Achievable NCCL ring bus bandwidth among the GPUs of one node, bytes/s.
    pub intra_busbw: f64,
    /// Per ring step inside a node, seconds.
    pub intra_step_s: f64,
    /// GPUs in one server (the largest `--nproc-per-node`).
    pub gpus_per_node: u32,
    /// The network between nodes, in words.
    pub nic: &'static str,
    /// NICs of the compute fabric per node (rails), shared by its GPUs' rings.
    pub nics_per_node: u32,
    /// Peak per NIC per direction, bytes/s (for the record).
    pub nic_peak: f64,
    /// Achievable NCCL bus bandwidth per NIC, bytes/s.
    pub nic_busbw: f64,
    /// Per ring step that crosses the network, seconds.
    pub net_step_s: f64,
}

/// Sources of the interconnect numbers (bandwidths per direction):
/// - NVLink 4 (H100/H200 SXM on HGX/DGX, through NVSwitch): 18 links, 900 GB/s bidirectional per
///   GPU = 450 GB/s per direction (H100 and H200 datasheets). NCCL all-reduce bus bandwidth on
///   8×H100: ≈ 476 GB/s with NVLink SHARP (NVLS; NCCL maintainer, NVIDIA/nccl-tests#290), 330 GB/s
///   as a plain ring without NVLS (NVIDIA/nccl#1221, 8×H100). We take the ring's 330 GB/s and do
///   not assume NVLS.
/// - InfiniBand NDR (DGX/HGX H100 and H200: eight ConnectX-7 400 Gb/s, one per GPU, rail-aligned):
///   50 GB/s peak per NIC; NCCL reaches 46–48 GB/s per NIC (NCCL maintainer, nccl-tests#290) and
///   ≈ 320 GB/s bus bandwidth over 8 NICs per node at 4+ nodes (nccl#1221): we take 40 GB/s per NIC.
/// - NVLink 3 (A100 SXM, DGX A100): 12 links, 600 GB/s bidirectional = 300 GB/s per direction;
///   NCCL's own tuning model caps the A100 ring at 235 GB/s (src/graph/tuning.cc, `compCap80`),
///   nccl-tests reports 230–250: we take 230 GB/s. Network: eight ConnectX-6 HDR 200 Gb/s (25 GB/s)
///   per DGX A100; NCCL reaches ≈ 24 GB/s per HDR NIC (NCCL maintainer, NVIDIA/nccl#412): 20 GB/s.
/// - L40S: no NVLink; PCIe Gen4 ×16 (32 GB/s per direction peak). Ring all-reduce over PCIe goes
///   through switches and the CPU root complex: we assume 16 GB/s (half the peak; an assumption,
///   no measurement found). Network: servers vary; we assume four 200 Gb/s NICs per 8-GPU node
///   at 20 GB/s each (an assumption).
/// - Latencies: NCCL's tuning model (NVIDIA/nccl src/graph/tuning.cc, ring, Simple protocol — the
///   one NCCL picks for MB-sized messages): 8.4 µs per call ([`k::NCCL_BASE_S`]), 3.4 µs per
///   NVLink step, 5.7 µs per PCIe step, 9.6 µs per network step.
const NVLINK4_HGX: Interconnect = Interconnect {
    intra: "NVLink 4 / NVSwitch (450 GB/s per direction)",
    intra_short: "NVLink",
    intra_peak: 450.0 * G,
    intra_busbw: 330.0 * G,
    intra_step_s: 3.4e-6,
    gpus_per_node: 8,
    nic: "InfiniBand NDR 400 Gb/s, one ConnectX-7 per GPU",
    nics_per_node: 8,
    nic_peak: 50.0 * G,
    nic_busbw: 40.0 * G,
    net_step_s: 9.6e-6,
};

const T: f64 = 1e12;
const G: f64 = 1e9;

/// H100 SXM5 80 GB, H200 SXM 141 GB, A100 SXM 80 GB, L40S.
pub const GPUS: &[Gpu] = &[
    Gpu {
        key: "h100",
        name: "H100 SXM",
        sm: 90,
        sms: 132,
        tc_half: 989.4 * T,
        tc_tf32: 494.7 * T,
        f32: 66.9 * T,
        dram: 3350.0 * G,
        pcie: 40.0 * G,
        l2_bytes: 50e6,
        max_threads_sm: 2048,
        max_blocks_sm: 32,
        regs_sm: 65536,
        smem_sm: 228 * 1024,
        link: NVLINK4_HGX,
    },
    Gpu {
        key: "h200",
        name: "H200 SXM",
        sm: 90,
        sms: 132,
        tc_half: 989.4 * T,
        tc_tf32: 494.7 * T,
        f32: 66.9 * T,
        dram: 4800.0 * G,
        pcie: 40.0 * G,
        l2_bytes: 50e6,
        max_threads_sm: 2048,
        max_blocks_sm: 32,
        regs_sm: 65536,
        smem_sm: 228 * 1024,
        link: NVLINK4_HGX,
    },
    Gpu {
        key: "a100",
        name: "A100 SXM 80GB",
        sm: 80,
        sms: 108,
        tc_half: 312.0 * T,
        tc_tf32: 156.0 * T,
        f32: 19.5 * T,
        dram: 2039.0 * G,
        pcie: 20.0 * G,
        l2_bytes: 40e6,
        max_threads_sm: 2048,
        max_blocks_sm: 32,
        regs_sm: 65536,
        smem_sm: 164 * 1024,
        link: Interconnect {
            intra: "NVLink 3 / NVSwitch (300 GB/s per direction)",
            intra_short: "NVLink",
            intra_peak: 300.0 * G,
            intra_busbw: 230.0 * G,
            intra_step_s: 3.4e-6,
            gpus_per_node: 8,
            nic: "InfiniBand HDR 200 Gb/s, one ConnectX-6 per GPU",
            nics_per_node: 8,
            nic_peak: 25.0 * G,
            nic_busbw: 20.0 * G,
            net_step_s: 9.6e-6,
        },
    },
    Gpu {
        key: "l40s",
        name: "L40S",
        sm: 89,
        sms: 142,
        tc_half: 362.05 * T,
        tc_tf32: 183.0 * T,
        f32: 91.6 * T,
        dram: 864.0 * G,
        pcie: 20.0 * G,
        l2_bytes: 96e6,
        max_threads_sm: 1536,
        max_blocks_sm: 24,
        regs_sm: 65536,
        smem_sm: 100 * 1024,
        link: Interconnect {
            intra: "PCIe Gen4 x16 (32 GB/s per direction), no NVLink",
            intra_short: "PCIe",
            intra_peak: 32.0 * G,
            intra_busbw: 16.0 * G,
            intra_step_s: 5.7e-6,
            gpus_per_node: 8,
            nic: "200 Gb/s NICs, four per 8-GPU node (assumed)",
            nics_per_node: 4,
            nic_peak: 25.0 * G,
            nic_busbw: 20.0 * G,
            net_step_s: 9.6e-6,
        },
    },
];

/// The GPU named by `--gpu` (key, or e.g. "H100").
pub fn gpu(key: &str) -> Option<&'static Gpu> {
    let k = key.to_ascii_lowercase();
    GPUS.iter().find(|g| g.key == k || g.key == k.trim_end_matches(" sxm").replace(' ', ""))
}

/// The keys, for messages.
pub fn keys() -> String {
    GPUS.iter().map(|g| g.key).collect::<Vec<_>>().join(", ")
}

/// The model's efficiency factors and overheads (KERNELS.md explains each).
pub mod k {
    /// cuBLASLt bf16/f16 tensor-core GEMMs: sustained share of the dense peak on full waves of
    /// large tiles (cuBLAS reaches 70–80 % of dense bf16 peak on H100 at large sizes).
    pub const GEMM_TC_EFF: f64 = 0.75;
    /// cuBLASLt TF32 GEMMs: share of the TF32 peak.
    pub const GEMM_TF32_EFF: f64 = 0.70;
    /// cuBLASLt exact-FP32 GEMMs (SGEMM on the CUDA cores): share of the f32 peak.
    pub const GEMM_F32_EFF: f64 = 0.70;
    /// Our own tiled CUDA-core GEMM kernels (kernels/matmul.cu, the fallback without cuBLASLt).
    pub const KERNEL_GEMM_CC_EFF: f64 = 0.40;
    /// Our kernels' arithmetic on the CUDA cores (f32 FMAs with address arithmetic, shuffles and
    /// exp around them): share of the f32 peak.
    pub const CC_EFF: f64 = 0.50;
    /// Our kernels on the tensor cores through mma.sync (no wgmma/TMA): share of the dense half
    /// peak (FlashAttention-2 reaches 35–50 % of H100's bf16 peak).
    pub const TC_KERNEL_EFF: f64 = 0.45;
    /// Streaming kernels: share of the DRAM bandwidth reached at full occupancy.
    pub const MEM_EFF: f64 = 0.80;
    /// A streaming kernel reaches MEM_EFF once this share of the GPU's thread slots is resident;
    /// below that its bandwidth scales with the resident threads (Little's law, one or two loads
    /// in flight per thread).
    pub const MEM_SATURATION: f64 = 0.5;
    /// Per kernel launch on one stream (GPU-side gap between back-to-back kernels plus host
    /// launch cost not hidden), seconds.
    pub const LAUNCH_S: f64 = 2.5e-6;
    /// Per cuBLASLt call (heuristic cached; descriptor setup and launch), seconds.
    pub const GEMM_CALL_S: f64 = 4.0e-6;
    /// Per host ↔ device copy (staging, DMA setup; the download also synchronises), seconds.
    pub const COPY_S: f64 = 10.0e-6;
    /// Shared memory the runtime reserves per resident block (sm_80 and newer), bytes.
    pub const SMEM_RESERVED_PER_BLOCK: u32 = 1024;
    /// Registers are allocated per warp in units of this many (256 = 8 per thread).
    pub const REG_ALLOC_UNIT: u32 = 256;
    /// Registers per thread assumed when the build had no nvcc (no ptxas report).
    pub const DEFAULT_REGS: u32 = 64;
    /// cuBLASLt tile shapes (M×N of the output per CTA, one CTA per SM at a time) the model
    /// chooses from, each with its share of the sustained efficiency (smaller tiles re-read more
    /// operand bytes per FLOP from shared memory and L2), with split-K up to MAX_SPLIT_K when
    /// the tiles do not fill the GPU.
    pub const GEMM_TILES: &[(usize, usize, f64)] = &[(128, 256, 1.0), (256, 128, 1.0), (128, 128, 0.95), (128, 64, 0.85), (64, 64, 0.7)];
    pub const MAX_SPLIT_K: usize = 16;
    /// Split-K keeps at least this many k per split.
    pub const MIN_K_PER_SPLIT: usize = 256;
    /// NCCL's fixed latency per collective call (ring, Simple protocol; src/graph/tuning.cc
    /// `baseLat`), seconds.
    pub const NCCL_BASE_S: f64 = 8.4e-6;
    /// NCCL multiplies a multi-node ring all-reduce's latency by this for messages of at least
    /// ranks/16 × 64 KiB (tuning.cc: "plateau effect of ring").
    pub const NCCL_RING_PLATEAU: f64 = 1.9;
}
