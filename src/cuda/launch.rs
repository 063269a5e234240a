//! The single kernel-launch interface shared by the CUDA path and the CPU emulator.
//!
//! [`KernelArgs`] packs arguments exactly as `cuLaunchKernel` wants its `void** kernelParams`:
//! entry `i` points at owned, 8-byte-aligned storage holding argument `i`'s bytes (device pointers
//! as `u64`, `i32`, `u32`, `f32` (also `i64`, `f64`), native endianness). It has no cudarc dependency, so an emulator
//! implementing [`Launcher`] receives the very same `void**` (read it back with [`read_param`]);
//! for clipforge's emulator that is one line: `emu::launch(kernel, cfg.grid, cfg.block, cfg.smem,
//! args.as_params())`.
//!
//! [`CudaLauncher`] resolves `kernel` through [`ModuleCache`] (`"module::function"` or a bare
//! function name), raises the function's dynamic shared-memory limit when `smem` > 48 KiB, checks
//! the argument count and sizes against the kernel's signature when the driver can tell
//! (`cuFuncGetParamInfo`, driver ≥ 12.4), and launches with `cudarc::driver::result::launch_kernel`.
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::{self, CUfunction_attribute_enum};
use cudarc::driver::{result, CudaFunction, CudaStream};

use super::device::{guarded, DeviceInfo};
use super::modules::ModuleCache;
use crate::error::{Error, Result};

/// Grid/block shape and dynamic shared memory of one launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchCfg {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    /// Dynamic shared memory, bytes.
    pub smem: u32,
}

impl LaunchCfg {
    pub fn new(grid: (u32, u32, u32), block: (u32, u32, u32), smem: u32) -> Self {
        Self { grid, block, smem }
    }

    /// 1-D launch covering `n` elements with `block` threads per block.
    pub fn for_elements(n: usize, block: u32) -> Result<Self> {
        let block = block.max(1);
        let blocks = n.div_ceil(block as usize).max(1);
        let gx = u32::try_from(blocks).map_err(|_| crate::shape_err!("{n} elements need too many blocks"))?;
        Ok(Self::new((gx, 1, 1), (block, 1, 1), 0))
    }

    pub fn threads_per_block(&self) -> u64 {
        u64::from(self.block.0) * u64::from(self.block.1) * u64::from(self.block.2)
    }

    /// CUDA's launch limits (compute capability ≥ 3.0) plus the device's own.
    pub fn validate(&self, max_threads_per_block: u32, max_dynamic_smem: u32) -> Result<()> {
        let (g, b) = (self.grid, self.block);
        if [g.0, g.1, g.2, b.0, b.1, b.2].contains(&0) {
            return Err(Error::device(format!("launch {self:?}: zero dimension")));
        }
        if g.0 > i32::MAX as u32 || g.1 > 65_535 || g.2 > 65_535 {
            return Err(Error::device(format!("launch {self:?}: grid exceeds (2^31-1, 65535, 65535)")));
        }
        if b.0 > 1024 || b.1 > 1024 || b.2 > 64 || self.threads_per_block() > u64::from(max_threads_per_block) {
            return Err(Error::device(format!("launch {self:?}: block exceeds limits (max {max_threads_per_block} threads)")));
        }
        if self.smem > max_dynamic_smem {
            return Err(Error::device(format!("launch {self:?}: {} B dynamic shared memory > device max {max_dynamic_smem} B", self.smem)));
        }
        Ok(())
    }
}

/// One kernel argument, by value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KernelArg {
    /// A device pointer (`CUdeviceptr`), passed as 8 bytes.
    Ptr(u64),
    I32(i32),
    U32(u32),
    F32(f32),
    I64(i64),
    F64(f64),
}

impl KernelArg {
    /// Bytes the kernel parameter occupies.
    pub fn size(&self) -> usize {
        match self {
            KernelArg::Ptr(_) | KernelArg::I64(_) | KernelArg::F64(_) => 8,
            KernelArg::I32(_) | KernelArg::U32(_) | KernelArg::F32(_) => 4,
        }
    }
    fn bytes(&self) -> [u8; 8] {
        let mut out = [0u8; 8];
        match *self {
            KernelArg::Ptr(v) => out.copy_from_slice(&v.to_ne_bytes()),
            KernelArg::I32(v) => out[..4].copy_from_slice(&v.to_ne_bytes()),
            KernelArg::U32(v) => out[..4].copy_from_slice(&v.to_ne_bytes()),
            KernelArg::F32(v) => out[..4].copy_from_slice(&v.to_ne_bytes()),
            KernelArg::I64(v) => out.copy_from_slice(&v.to_ne_bytes()),
            KernelArg::F64(v) => out.copy_from_slice(&v.to_ne_bytes()),
        }
        out
    }
}

/// 8-byte storage cell, aligned for any supported argument.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug)]
struct Slot([u8; 8]);

/// Arguments of one launch, packed for `cuLaunchKernel` (see the module docs).
#[derive(Clone, Debug, Default)]
pub struct KernelArgs {
    args: Vec<KernelArg>,
    slots: Vec<Slot>,
    params: Vec<*mut c_void>,
}

// SAFETY: `params` only ever points into `slots`, which this value owns (heap storage that moves
// with it); nothing is shared with another thread.
unsafe impl Send for KernelArgs {}

impl KernelArgs {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, a: KernelArg) -> &mut Self {
        self.args.push(a);
        self.slots.push(Slot(a.bytes()));
        self
    }
    pub fn push_ptr(&mut self, p: u64) -> &mut Self {
        self.push(KernelArg::Ptr(p))
    }
    pub fn push_i32(&mut self, v: i32) -> &mut Self {
        self.push(KernelArg::I32(v))
    }
    pub fn push_u32(&mut self, v: u32) -> &mut Self {
        self.push(KernelArg::U32(v))
    }
    pub fn push_f32(&mut self, v: f32) -> &mut Self {
        self.push(KernelArg::F32(v))
    }

    /// Builder forms: `KernelArgs::new().ptr(y).ptr(x).i32(n).f32(eps)`.
    pub fn ptr(mut self, p: u64) -> Self {
        self.push_ptr(p);
        self
    }
    pub fn i32(mut self, v: i32) -> Self {
        self.push_i32(v);
        self
    }
    pub fn u32(mut self, v: u32) -> Self {
        self.push_u32(v);
        self
    }
    pub fn f32(mut self, v: f32) -> Self {
        self.push_f32(v);
        self
    }
    pub fn i64(mut self, v: i64) -> Self {
        self.push(KernelArg::I64(v));
        self
    }
    pub fn f64(mut self, v: f64) -> Self {
        self.push(KernelArg::F64(v));
        self
    }

    pub fn len(&self) -> usize {
        self.args.len()
    }
    pub fn is_empty(&self) -> bool {
        self.args.is_empty()
    }
    /// The arguments as values (for checks and for an emulator that prefers them).
    pub fn args(&self) -> &[KernelArg] {
        &self.args
    }

    /// The `kernelParams` array: entry `i` points at argument `i`. Valid while `self` is borrowed
    /// (nothing can be pushed meanwhile); rebuilt on every call.
    pub fn as_params(&mut self) -> &mut [*mut c_void] {
        self.params.clear();
        self.params.extend(self.slots.iter_mut().map(|s| s.0.as_mut_ptr().cast::<c_void>()));
        &mut self.params
    }
}

/// Reads parameter `i` back from a `kernelParams` array (what an emulator does).
///
/// # Safety
/// `params` must hold at least `i + 1` valid entries and entry `i` must point at a live `T`.
pub unsafe fn read_param<T: Copy>(params: *const *mut c_void, i: usize) -> T {
    // SAFETY: guaranteed by the caller; read_unaligned tolerates any alignment.
    unsafe { std::ptr::read_unaligned((*params.add(i)).cast::<T>()) }
}

/// Checks packed arguments against a kernel's parameter sizes.
pub fn check_arg_sizes(kernel: &str, expected: &[usize], args: &[KernelArg]) -> Result<()> {
    if expected.len() != args.len() {
        return Err(Error::device(format!("kernel '{kernel}' takes {} parameters, {} given", expected.len(), args.len())));
    }
    for (i, (&want, a)) in expected.iter().zip(args).enumerate() {
        if want != a.size() {
            return Err(Error::device(format!("kernel '{kernel}' parameter {i} is {want} bytes, got {a:?}")));
        }
    }
    Ok(())
}

/// Launches kernels by name. Implemented by [`CudaLauncher`] and by the CPU emulator.
pub trait Launcher {
    fn launch(&self, kernel: &str, cfg: LaunchCfg, args: &mut KernelArgs) -> Result<()>;
}

/// Set once `cuFuncGetParamInfo` turned out to be missing (driver < 12.4).
static NO_PARAM_INFO: AtomicBool = AtomicBool::new(false);

/// Parameter sizes of `f` via `cuFuncGetParamInfo`; `None` if the driver cannot tell.
fn param_sizes(f: &CudaFunction) -> Option<Vec<usize>> {
    if NO_PARAM_INFO.load(Ordering::Relaxed) {
        return None;
    }
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut sizes = Vec::new();
        for i in 0..1024usize {
            let (mut offset, mut size) = (0usize, 0usize);
            // SAFETY: `f` is a live function handle (its module is kept alive by `f`), and the
            // out-pointers are valid for one usize each.
            let r = unsafe { sys::cuFuncGetParamInfo(f.cu_function(), i, &mut offset, &mut size) };
            match r {
                sys::CUresult::CUDA_SUCCESS => sizes.push(size),
                sys::CUresult::CUDA_ERROR_INVALID_VALUE => return Some(sizes),
                _ => return None,
            }
        }
        None
    }));
    run.unwrap_or_else(|_| {
        NO_PARAM_INFO.store(true, Ordering::Relaxed);
        None
    })
}

#[derive(Default)]
struct FnState {
    smem_limit: u32,
    param_sizes: Option<Vec<usize>>,
}

/// The real launcher: kernels from a [`ModuleCache`] onto one stream (the compute stream).
pub struct CudaLauncher {
    modules: Arc<ModuleCache>,
    stream: Arc<CudaStream>,
    max_threads: u32,
    max_smem: u32,
    state: Mutex<HashMap<String, FnState>>,
}

impl CudaLauncher {
    pub fn new(modules: Arc<ModuleCache>, stream: Arc<CudaStream>, info: &DeviceInfo) -> Self {
        Self { modules, stream, max_threads: info.max_threads_per_block.max(1), max_smem: info.max_smem_per_block_optin, state: Mutex::new(HashMap::new()) }
    }
    pub fn modules(&self) -> &Arc<ModuleCache> {
        &self.modules
    }
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

impl Launcher for CudaLauncher {
    fn launch(&self, kernel: &str, cfg: LaunchCfg, args: &mut KernelArgs) -> Result<()> {
        cfg.validate(self.max_threads, self.max_smem)?;
        let f = self.modules.function(kernel)?;
        {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let fs = st.entry(kernel.to_string()).or_insert_with(|| FnState { smem_limit: 48 << 10, param_sizes: param_sizes(&f) });
            if let Some(sizes) = &fs.param_sizes {
                check_arg_sizes(kernel, sizes, args.args())?;
            }
            if cfg.smem > fs.smem_limit {
                let smem = cfg.smem as i32;
                guarded("cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)", || {
                    self.stream.context().bind_to_thread()?;
                    f.set_attribute(CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem)
                })?;
                fs.smem_limit = cfg.smem;
            }
        }
        let params = args.as_params();
        guarded("cuLaunchKernel", || {
            self.stream.context().bind_to_thread()?;
            // SAFETY: `f` is a live function of this context; `params` has one entry per kernel
            // parameter (checked above when the driver reports the signature), each pointing at
            // owned storage of the right size that outlives this call (the driver copies the
            // values before cuLaunchKernel returns). Device pointers inside are the caller's
            // responsibility, as for any raw launch.
            unsafe { result::launch_kernel(f.cu_function(), cfg.grid, cfg.block, cfg.smem, self.stream.cu_stream(), params) }
        })
        .map_err(|e| e.context(format!("kernel '{kernel}' {cfg:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_values_read_back_through_params() {
        let mut a = KernelArgs::new().ptr(0xdead_beef_0000_1000).i32(-7).u32(42).f32(1.5);
        a.push_f32(-0.25).push_ptr(8).push(KernelArg::I64(-3)).push(KernelArg::F64(0.1));
        assert_eq!(a.len(), 8);
        let p = a.as_params();
        assert_eq!(p.len(), 8);
        let pp = p.as_ptr();
        // SAFETY: eight entries, each pointing at owned storage of the read type.
        unsafe {
            assert_eq!(read_param::<u64>(pp, 0), 0xdead_beef_0000_1000);
            assert_eq!(read_param::<i32>(pp, 1), -7);
            assert_eq!(read_param::<u32>(pp, 2), 42);
            assert_eq!(read_param::<f32>(pp, 3), 1.5);
            assert_eq!(read_param::<f32>(pp, 4), -0.25);
            assert_eq!(read_param::<u64>(pp, 5), 8);
            assert_eq!(read_param::<i64>(pp, 6), -3);
            assert_eq!(read_param::<f64>(pp, 7), 0.1);
        }
    }

    #[test]
    fn params_are_aligned_and_distinct() {
        let mut a = KernelArgs::new();
        for i in 0..100 {
            a.push_i32(i); // many pushes: storage reallocates; params are rebuilt afterwards
        }
        a.push_ptr(u64::MAX);
        let p = a.as_params();
        for (i, &ptr) in p.iter().enumerate() {
            assert_eq!(ptr as usize % 8, 0, "param {i} misaligned");
            if i > 0 {
                assert_eq!(ptr as usize - p[i - 1] as usize, 8);
            }
        }
        // SAFETY: entry 100 points at the u64 pushed last.
        assert_eq!(unsafe { read_param::<u64>(p.as_ptr() as *const _, 100) }, u64::MAX);
        // Moving the KernelArgs keeps the storage: rebuilt params still read correctly.
        let mut moved = a;
        let p = moved.as_params();
        // SAFETY: entry 99 points at an i32.
        assert_eq!(unsafe { read_param::<i32>(p.as_ptr() as *const _, 99) }, 99);
    }

    #[test]
    fn arg_size_checks() {
        let a = KernelArgs::new().ptr(1).i32(2).f32(3.0);
        assert!(check_arg_sizes("k", &[8, 4, 4], a.args()).is_ok());
        assert!(check_arg_sizes("k", &[8, 4], a.args()).unwrap_err().to_string().contains("takes 2 parameters, 3 given"));
        assert!(check_arg_sizes("k", &[4, 4, 4], a.args()).unwrap_err().to_string().contains("parameter 0 is 4 bytes"));
    }

    #[test]
    fn launch_cfg_limits() {
        let c = LaunchCfg::for_elements(1000, 256).unwrap();
        assert_eq!(c, LaunchCfg::new((4, 1, 1), (256, 1, 1), 0));
        assert_eq!(LaunchCfg::for_elements(0, 128).unwrap().grid, (1, 1, 1));
        assert!(c.validate(1024, 48 << 10).is_ok());
        assert!(LaunchCfg::new((1, 1, 1), (32, 32, 2), 0).validate(1024, 0).is_err());
        assert!(LaunchCfg::new((1, 70_000, 1), (32, 1, 1), 0).validate(1024, 0).is_err());
        assert!(LaunchCfg::new((0, 1, 1), (32, 1, 1), 0).validate(1024, 0).is_err());
        assert!(LaunchCfg::new((1, 1, 1), (32, 1, 1), 100 << 10).validate(1024, 99 << 10).is_err());
        assert!(LaunchCfg::new((1, 1, 1), (32, 1, 1), 99 << 10).validate(1024, 227 << 10).is_ok());
    }
}
