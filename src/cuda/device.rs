//! `CudaDevice`: one CUDA context (the device's primary context, through cudarc) plus two
//! non-blocking streams — `compute` (kernels, GEMMs, allocations) and `upload` (host→device
//! copies of the next batch while the current one computes).
//!
//! Opening never panics. cudarc (feature `dynamic-loading`) loads `libcuda` lazily on the first
//! driver call and *panics* when the library or one of its symbols is missing, so `open` first
//! probes the driver with `dlopen("libcuda.so.1")` and then runs every cudarc call that could load
//! the library inside `std::panic::catch_unwind`. No driver →
//! `Error::Device("no CUDA driver found ...")`.
//!
//! Synchronisation model: `open` turns cudarc's per-`CudaSlice` event tracking OFF (it must happen
//! before the first stream or allocation exists). Kernels are launched through raw device
//! pointers, which cudarc's tracking cannot see anyway, and tracking would record a CUDA event on
//! every buffer access. Ordering is therefore explicit: work on `compute` is ordered by the
//! stream; work enqueued on `upload` becomes visible to `compute` after [`CudaDevice::upload_fence`].
use std::ffi::CString;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{CudaContext, CudaStream};

use crate::error::{Error, Result};

/// Why CUDA cannot be used here, or Ok if a driver library can be loaded.
pub fn driver_available() -> Result<()> {
    for name in ["libcuda.so.1", "libcuda.so"] {
        let c = CString::new(name).expect("literal has no NUL");
        // SAFETY: dlopen gets a valid NUL-terminated string; nothing from the library is called
        // and the handle is closed right below (cudarc keeps its own handle via libloading).
        let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL) };
        if !h.is_null() {
            // SAFETY: `h` is a live handle returned by the successful dlopen above.
            unsafe { libc::dlclose(h) };
            return Ok(());
        }
    }
    Err(Error::device("no CUDA driver found (libcuda.so.1 could not be loaded)"))
}

/// Runs a cudarc call, turning both its error (`DriverError`, `NvrtcError`, `CublasError`, ...)
/// and a panic (missing library / symbol, `unwrap` inside cudarc) into a one-line
/// [`Error::Device`] prefixed with `what`.
pub fn guarded<T, E: std::fmt::Display>(what: &str, f: impl FnOnce() -> std::result::Result<T, E>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Error::device(format!("{what}: {e}"))),
        Err(p) => Err(Error::device(format!("{what}: cudarc panicked: {}", panic_message(&p)))),
    }
}

/// Text of a caught panic payload.
pub fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".into()
    }
}

/// Static facts about the opened device, queried once at open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    /// (major, minor), e.g. (9, 0) for H100.
    pub compute_capability: (u32, u32),
    pub total_mem: usize,
    pub multiprocessors: u32,
    /// Largest dynamic shared memory a block may opt into
    /// (`CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN`).
    pub max_smem_per_block_optin: u32,
    pub max_threads_per_block: u32,
}

impl DeviceInfo {
    /// `10*major + minor`, the number in `sm_XY` / `compute_XY`.
    pub fn sm(&self) -> u32 {
        sm_number(self.compute_capability)
    }
}

/// `(9, 0)` → 90, `(12, 0)` → 120.
pub fn sm_number(cc: (u32, u32)) -> u32 {
    cc.0 * 10 + cc.1
}

/// A CUDA device ready for work: context + compute stream + upload stream.
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    compute: Arc<CudaStream>,
    upload: Arc<CudaStream>,
    info: DeviceInfo,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice").field("info", &self.info).finish()
    }
}

impl CudaDevice {
    /// Number of CUDA devices; `Err` (never a panic) when there is no driver.
    pub fn device_count() -> Result<usize> {
        driver_available()?;
        guarded("cuDeviceGetCount", CudaContext::device_count).map(|n| n.max(0) as usize)
    }

    /// Opens device `ordinal`: probes the driver, retains the primary context, disables cudarc's
    /// event tracking (see the module docs), creates the two streams and queries [`DeviceInfo`].
    pub fn open(ordinal: usize) -> Result<Self> {
        driver_available()?;
        let count = Self::device_count()?;
        if ordinal >= count {
            return Err(Error::device(format!("CUDA device {ordinal} requested but only {count} found")));
        }
        let ctx = guarded("creating CUDA context", || CudaContext::new(ordinal))?;
        // SAFETY: called before any stream or CudaSlice exists in this context, so no slice mixes
        // tracked and untracked use; all cross-stream ordering is done explicitly (upload_fence).
        unsafe { ctx.disable_event_tracking() };
        let compute = guarded("creating compute stream", || ctx.new_stream())?;
        let upload = guarded("creating upload stream", || ctx.new_stream())?;
        let attr = |a: CUdevice_attribute| guarded("cuDeviceGetAttribute", || ctx.attribute(a));
        let (major, minor) = guarded("compute capability", || ctx.compute_capability())?;
        let info = DeviceInfo {
            ordinal,
            name: guarded("device name", || ctx.name())?,
            compute_capability: (major.max(0) as u32, minor.max(0) as u32),
            total_mem: guarded("total memory", || ctx.total_mem())?,
            multiprocessors: attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?.max(0) as u32,
            max_smem_per_block_optin: attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?.max(0) as u32,
            max_threads_per_block: attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK)?.max(0) as u32,
        };
        Ok(Self { ctx, compute, upload, info })
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
    /// The stream kernels, GEMMs and pool allocations are ordered on.
    pub fn compute_stream(&self) -> &Arc<CudaStream> {
        &self.compute
    }
    /// The stream host→device staging copies go on.
    pub fn upload_stream(&self) -> &Arc<CudaStream> {
        &self.upload
    }
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }
    pub fn ordinal(&self) -> usize {
        self.info.ordinal
    }
    pub fn name(&self) -> &str {
        &self.info.name
    }
    pub fn compute_capability(&self) -> (u32, u32) {
        self.info.compute_capability
    }
    /// e.g. 90 for sm_90.
    pub fn sm(&self) -> u32 {
        self.info.sm()
    }
    pub fn total_memory(&self) -> usize {
        self.info.total_mem
    }

    /// `(free, total)` device memory in bytes, right now.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        guarded("cuMemGetInfo", || self.ctx.mem_get_info())
    }

    /// Makes all work enqueued on `upload` so far a prerequisite of later work on `compute`
    /// (event record + `cuStreamWaitEvent`; the host does not block).
    pub fn upload_fence(&self) -> Result<()> {
        guarded("upload fence", || self.compute.join(&self.upload))
    }

    /// Blocks the host until both streams are idle, then reports any error cudarc recorded
    /// asynchronously (e.g. from a `Drop`).
    pub fn synchronize(&self) -> Result<()> {
        guarded("synchronizing upload stream", || self.upload.synchronize())?;
        guarded("synchronizing compute stream", || self.compute.synchronize())?;
        guarded("pending CUDA error", || self.ctx.check_err())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sm_numbers() {
        assert_eq!(sm_number((9, 0)), 90);
        assert_eq!(sm_number((8, 6)), 86);
        assert_eq!(sm_number((12, 0)), 120);
    }

    #[test]
    fn guarded_turns_panics_into_errors() {
        // (the default hook still prints the panic message; that is expected here)
        let e = guarded("probe", || -> std::result::Result<(), std::fmt::Error> { panic!("library missing") }).unwrap_err();
        assert!(matches!(&e, Error::Device(m) if m.starts_with("probe: cudarc panicked: library missing")), "{e}");
    }

    #[test]
    fn open_without_driver_is_an_error_not_a_panic() {
        // On a machine with a driver this opens (or fails cleanly); never panics either way.
        if driver_available().is_err() {
            let e = CudaDevice::open(0).unwrap_err();
            assert!(e.to_string().contains("no CUDA driver found"), "{e}");
            assert!(CudaDevice::device_count().is_err());
        }
    }
}
