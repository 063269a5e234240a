//! The CUDA modules of kernels/*.cu, as embedded by build.rs.
//!
//! One module per .cu file. `source` is always there (for NVRTC, together with [`HEADERS`]);
//! the cubins and PTX are present when nvcc was found at build time (see build/nvcc.rs).
//! Parameters: see the header comment of each .cu; all entry points are `extern "C"`, so the
//! names in `entry_points` are the symbol names to look up with cuModuleGetFunction.

/// One CUDA module (one .cu file).
#[derive(Debug, Clone, Copy)]
pub struct KernelModule {
    /// File stem, e.g. "layernorm".
    pub name: &'static str,
    /// The .cu source text (includes "common.cuh", see [`HEADERS`]).
    pub source: &'static str,
    /// PTX for compute_90 (JIT-compiled by the driver on sm_90 and newer).
    pub ptx_compute_90: Option<&'static str>,
    /// SASS per SM number: 80 (A100), 86 (A10/RTX 30), 89 (L4/L40/RTX 40), 90 (the sm_90a
    /// cubin, H100/H200). Empty without nvcc.
    pub cubins: &'static [(u32, &'static [u8])],
    /// The `extern "C" __global__` kernels of the module.
    pub entry_points: &'static [&'static str],
}

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// The module that defines `kernel`, if any.
pub fn module_of(kernel: &str) -> Option<&'static KernelModule> {
    MODULES.iter().find(|m| m.entry_points.contains(&kernel))
}
