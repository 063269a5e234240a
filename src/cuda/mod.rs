//! CUDA runtime discovery. cudarc loads the driver dynamically and panics when the library is
//! missing, so the driver is probed with dlopen first: no driver is an ordinary error, never a
//! panic, and `--device auto` falls back to the CPU.
//!
//! - [`attention`]: launch configurations (grid, block, shared memory, shape checks) of the
//!   fused attention kernels;
//! - [`kernels`]: the modules of kernels/*.cu as built by build.rs (source for NVRTC; cubins and
//!   PTX when nvcc was found);
//! - [`emu`] (feature `emu`): run any kernel on the CPU emulator of emu/, for tests without a GPU.
pub mod attention;
pub mod kernels;

#[cfg(feature = "emu")]
pub mod emu;

use std::ffi::CString;

/// Why CUDA cannot be used here, or Ok if a driver library loads.
pub fn driver_available() -> Result<(), String> {
    for name in ["libcuda.so.1", "libcuda.so"] {
        let c = CString::new(name).expect("no NUL");
        // SAFETY: dlopen with a valid C string; the handle is closed right away, nothing from the
        // library is called here.
        let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL) };
        if !h.is_null() {
            // SAFETY: h came from a successful dlopen above.
            unsafe { libc::dlclose(h) };
            return Ok(());
        }
    }
    Err("no CUDA driver found (libcuda.so.1 could not be loaded)".into())
}
