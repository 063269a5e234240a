//! Run the CUDA kernels of kernels/*.cu on the CPU emulator (emu/), for tests without a GPU.
//!
//! Kernels are launched by their `extern "C"` name with cuLaunchKernel-style parameters: a
//! slice with one pointer per kernel argument, pointing at the argument's value. Device
//! pointers are plain host pointers here. [`LaunchArgs`] builds that slice; the same packing
//! feeds `cuLaunchKernel` (cudarc's `launch_builder`) on the GPU.
//!
//! Concurrency: the emulator keeps no shared mutable state (settings and fiber pools are per
//! host thread, diagnostics per launch, the kernel registry is read-only after static
//! initialisation), so launches from parallel test threads run concurrently without a lock.
//! [`set_schedule`] affects later launches from the calling thread only.
use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::marker::PhantomData;

use crate::error::{Error, Result};

extern "C" {
    fn emu_launch(
        name: *const c_char,
        gx: c_uint,
        gy: c_uint,
        gz: c_uint,
        bx: c_uint,
        by: c_uint,
        bz: c_uint,
        smem_bytes: c_uint,
        params: *mut *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn emu_set_schedule(mode: c_int, seed: u64);
    fn emu_set_strict(on: c_int);
    fn emu_set_resident_blocks(k: c_uint);
    fn emu_kernel_arity(name: *const c_char) -> c_int;
    fn emu_kernel_count() -> usize;
    fn emu_kernel_name(i: usize) -> *const c_char;
}

extern "C" {
    fn emu_guard_alloc(front: usize, bytes: usize) -> *mut c_void;
    fn emu_guard_free(base: *mut c_void, front: usize, bytes: usize);
}

/// Emulated device memory: `bytes` zeroed bytes whose end (rounded up to 16 bytes, so 16-byte
/// vector loads of the last elements stay legal) abuts a PROT_NONE guard page registered with
/// the emulator. A kernel that reads or writes past the end (beyond the rounding) faults there;
/// the emulator catches the fault and fails the launch with "out-of-bounds read|write at byte
/// offset ... of a B-byte buffer ... by block (..) thread (..)" (emu/cuda_emu_guard.h).
/// Optionally `front` bytes (a multiple of 16) precede the data, e.g. for canaries.
pub struct DeviceMem {
    base: std::ptr::NonNull<u8>,
    front: usize,
    bytes: usize,
}

// The mapping is owned by this value alone; access goes through &/&mut like a Box<[u8]>.
unsafe impl Send for DeviceMem {}
unsafe impl Sync for DeviceMem {}

impl DeviceMem {
    /// `bytes` zeroed, guarded bytes.
    pub fn new(bytes: usize) -> Result<Self> {
        Self::with_front(0, bytes)
    }
    /// `front` bytes (rounded up to 16) of room before `bytes` zeroed, guarded bytes.
    pub fn with_front(front: usize, bytes: usize) -> Result<Self> {
        let front = front.div_ceil(16) * 16;
        let p = unsafe { emu_guard_alloc(front, bytes) };
        let base = std::ptr::NonNull::new(p as *mut u8).ok_or_else(|| Error::device(format!("emulator: cannot map {bytes} bytes of device memory")))?;
        Ok(DeviceMem { base, front, bytes })
    }
    /// A guarded copy of `data`.
    pub fn from_slice<T: bytemuck::Pod>(data: &[T]) -> Result<Self> {
        let mut m = Self::new(std::mem::size_of_val(data))?;
        m.as_mut_slice::<u8>().copy_from_slice(bytemuck::cast_slice(data));
        Ok(m)
    }
    /// The start of the data (what kernels receive).
    pub fn ptr(&self) -> *mut u8 {
        unsafe { self.base.as_ptr().add(self.front) }
    }
    /// The start of the front room (== [`DeviceMem::ptr`] without one).
    pub fn base(&self) -> *mut u8 {
        self.base.as_ptr()
    }
    /// Bytes of data requested.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    /// Front room + data + the padding up to 16 bytes: everything accessible before the guard page.
    pub fn span(&self) -> usize {
        self.front + self.bytes.div_ceil(16) * 16
    }
    /// The data as `T`s (⌊bytes / size_of::<T>()⌋ of them).
    pub fn as_slice<T: bytemuck::Pod>(&self) -> &[T] {
        unsafe { std::slice::from_raw_parts(self.ptr() as *const T, self.bytes / std::mem::size_of::<T>()) }
    }
    pub fn as_mut_slice<T: bytemuck::Pod>(&mut self) -> &mut [T] {
        unsafe { std::slice::from_raw_parts_mut(self.ptr() as *mut T, self.bytes / std::mem::size_of::<T>()) }
    }
}

impl Drop for DeviceMem {
    fn drop(&mut self) {
        unsafe { emu_guard_free(self.base.as_ptr() as *mut c_void, self.front, self.bytes) }
    }
}

/// Order in which the emulator runs blocks, warps and the lanes of a warp (and interleaves the
/// warps of the resident blocks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    Forward,
    Reverse,
    /// Seeded shuffle, re-drawn for every scheduling round.
    Random(u64),
}

/// The schedules a kernel test should pass in (and a planted bug should fail in at least one).
pub const TEST_SCHEDULES: [Schedule; 4] = [Schedule::Forward, Schedule::Reverse, Schedule::Random(1), Schedule::Random(2)];

/// Sets the schedule of later launches from the calling thread.
pub fn set_schedule(s: Schedule) {
    let (mode, seed) = match s {
        Schedule::Forward => (0, 0),
        Schedule::Reverse => (1, 0),
        Schedule::Random(seed) => (2, seed),
    };
    unsafe { emu_set_schedule(mode, seed) }
}

/// How many blocks of a grid run interleaved (resident at once) in later launches from the
/// calling thread: 4 by default (or `EMU_BLOCKS`), 1 runs blocks one after another.
pub fn set_resident_blocks(k: u32) {
    unsafe { emu_set_resident_blocks(k.max(1)) }
}

/// Strict mode (default): a __syncthreads reached while other threads have exited is an error.
pub fn set_strict(on: bool) {
    unsafe { emu_set_strict(on as c_int) }
}

/// Number of parameters of a registered kernel.
pub fn kernel_arity(name: &str) -> Option<usize> {
    let n = CString::new(name).ok()?;
    let a = unsafe { emu_kernel_arity(n.as_ptr()) };
    (a >= 0).then_some(a as usize)
}

/// Names of all kernels the emulator knows.
pub fn kernel_names() -> Vec<String> {
    (0..unsafe { emu_kernel_count() }).map(|i| unsafe { CStr::from_ptr(emu_kernel_name(i)) }.to_string_lossy().into_owned()).collect()
}

/// Launches kernel `name` like `cuLaunchKernel(f, grid, block, smem, stream, params, NULL)`.
/// `params[i]` must point at a value of exactly the type of kernel parameter i, and every
/// pointer argument must be valid for what the kernel accesses. Errors: unknown kernel, wrong
/// number of parameters, invalid configuration, and whatever the emulator diagnoses while
/// running (deadlock, divergent barrier, bad warp collective, shared memory overrun, __trap).
pub fn launch(name: &str, grid: (u32, u32, u32), block: (u32, u32, u32), smem: u32, params: &mut [*mut c_void]) -> Result<()> {
    let arity = kernel_arity(name).ok_or_else(|| Error::device(format!("no kernel named '{name}' is registered")))?;
    if arity != params.len() {
        return Err(Error::device(format!("{name}: takes {arity} parameters, {} given", params.len())));
    }
    let cname = CString::new(name).map_err(Error::msg)?;
    let mut err = vec![0 as c_char; 2048];
    let rc = unsafe { emu_launch(cname.as_ptr(), grid.0, grid.1, grid.2, block.0, block.1, block.2, smem, params.as_mut_ptr(), err.as_mut_ptr(), err.len()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(Error::device(unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy()))
    }
}

/// A value that can be passed to a kernel by value (scalars and raw pointers).
pub trait KernelArg: Copy {}
impl KernelArg for i32 {}
impl KernelArg for u32 {}
impl KernelArg for i64 {}
impl KernelArg for u64 {}
impl KernelArg for f32 {}
impl KernelArg for f64 {}
impl<T> KernelArg for *const T {}
impl<T> KernelArg for *mut T {}

/// cuLaunchKernel parameter array: one pointer per argument, borrowed for the launch.
#[derive(Default)]
pub struct LaunchArgs<'a> {
    ptrs: Vec<*mut c_void>,
    _values: PhantomData<&'a ()>,
}

impl<'a> LaunchArgs<'a> {
    pub fn new() -> Self {
        Self { ptrs: Vec::new(), _values: PhantomData }
    }
    /// Appends an argument; `value` must stay alive (and unchanged) until the launch.
    pub fn arg<T: KernelArg>(mut self, value: &'a T) -> Self {
        self.ptrs.push(value as *const T as *mut c_void);
        self
    }
    /// The `void**` array for emu `launch` / `cuLaunchKernel`.
    pub fn as_params(&mut self) -> &mut [*mut c_void] {
        &mut self.ptrs
    }
}

/// The emulator behind the same [`Launcher`](crate::cuda::Launcher) interface as the GPU: the
/// production argument packing ([`KernelArgs`](crate::cuda::KernelArgs)) feeds both, so tests
/// through this launcher exercise the packing the GPU path uses. Pointers are host pointers here.
pub struct EmuLauncher;

impl crate::cuda::Launcher for EmuLauncher {
    fn launch(&self, kernel: &str, cfg: crate::cuda::LaunchCfg, args: &mut crate::cuda::KernelArgs) -> Result<()> {
        cfg.validate(1024, 1 << 20)?;
        launch(kernel, cfg.grid, cfg.block, cfg.smem, args.as_params())
    }
}
