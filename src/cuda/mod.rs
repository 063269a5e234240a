//! The CUDA side: driver probe and runtime (device, streams, caching allocator, pinned staging,
//! kernel modules, the launcher interface shared with the CPU emulator, cuBLASLt GEMMs), the
//! embedded kernel modules, and the emulator that runs them in tests.
//!
//! Everything goes through cudarc with `dynamic-loading`: nothing links against CUDA at build
//! time. cudarc panics when a library or symbol is missing, so the driver is probed with dlopen
//! first and every cudarc call is guarded: no driver is an ordinary error, never a panic, and
//! `--device auto` falls back to the CPU.
//!
//! - [`attention`]: launch configurations (grid, block, shared memory, shape checks) of the
//!   fused attention kernels; [`flash`]: the same for the tensor-core flash kernels (bf16/f16)
//!   and the choice between the two;
//! - [`kernels`]: the modules of kernels/*.cu as built by build.rs (source for NVRTC; cubins and
//!   PTX when nvcc was found);
//! - [`half_ops`]: launchers of the 16-bit activation kernels (activation, LayerNorm, column sums,
//!   im2col on bf16/f16 tensors); [`train_ops`]: the f32 helpers (copies, reductions, conversions);
//! - `emu` (feature `emu`): run any kernel on the CPU emulator of emu/, for tests without a GPU.
pub mod alloc;
pub mod attention;
pub mod backend;
pub mod device;
pub mod flash;
pub mod gemm;
pub mod gemm_launch;
pub mod half_ops;
pub mod kernels;
pub mod launch;
pub mod modules;
pub mod nvrtc;
pub mod pinned;
pub mod table;
pub mod train_ops;

#[cfg(feature = "emu")]
pub mod emu;

pub use alloc::{size_class, CudaBlock, CudaPool, CudaRawAlloc, DevicePool, PoolBlock, PoolStats, RawAlloc};
#[cfg(feature = "emu")]
pub use backend::EmuOps;
pub use backend::{Buf, DeviceOps, GpuOps};
pub use device::{driver_available, CudaDevice, DeviceInfo};
pub use gemm::{Gemm, GemmDesc};
pub use gemm_launch::HalfGemm;
pub use launch::{CudaLauncher, KernelArg, KernelArgs, LaunchCfg, Launcher};
pub use modules::{ModuleCache, ModuleOrigin, ModuleSpec};
pub use pinned::{HostPod, StagingBuffer, StagingKind, StagingPool};

/// The embedded modules of kernels/*.cu as loader specs (cubin per arch, PTX, source + headers).
pub fn module_specs() -> Vec<ModuleSpec> {
    kernels::MODULES
        .iter()
        .map(|m| ModuleSpec::new(m.name, m.cubins, m.ptx_compute_90, m.source).with_headers(kernels::HEADERS).with_entry_points(m.entry_points))
        .collect()
}
