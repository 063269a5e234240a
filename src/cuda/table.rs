//! One kernel case, run anywhere: buffers (f32 contents), scalar arguments and a launch
//! configuration, launched on the CPU emulator (host buffers) or on a real GPU (uploaded, launched
//! through the production `CudaLauncher`, downloaded). The CUDA test table and the GPU benches
//! build these; without a device the GPU half reports "skipped: no CUDA device".
use super::device::guarded;
use super::{CudaDevice, CudaLauncher, KernelArgs, LaunchCfg, Launcher, ModuleCache};
use crate::error::Result;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use std::sync::Arc;

/// A kernel argument: a buffer of the case (by index) or a scalar.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    Buf(usize),
    /// A NULL pointer (an optional buffer left out).
    Null,
    I32(i32),
    /// A 64-bit count (`long long` in the kernel).
    I64(i64),
    F32(f32),
}

#[derive(Clone, Debug)]
pub struct KernelCase {
    pub kernel: &'static str,
    pub cfg: LaunchCfg,
    /// Initial contents of every buffer (outputs too: their fill value is part of the case).
    pub buffers: Vec<Vec<f32>>,
    pub args: Vec<Arg>,
}

impl KernelCase {
    /// Runs on the CPU emulator; returns every buffer after the launch.
    #[cfg(feature = "emu")]
    pub fn run_emulated(&self) -> Result<Vec<Vec<f32>>> {
        // device memory with a guard page after each buffer: out-of-bounds accesses fail the launch
        let mems = self.buffers.iter().map(|b| super::emu::DeviceMem::from_slice(b)).collect::<Result<Vec<_>>>()?;
        let ptrs: Vec<u64> = mems.iter().map(|m| m.ptr() as u64).collect();
        let mut args = self.pack(&ptrs);
        super::emu::EmuLauncher.launch(self.kernel, self.cfg, &mut args)?;
        Ok(mems.iter().map(|m| m.as_slice::<f32>().to_vec()).collect())
    }

    /// Runs on `gpu`: uploads the buffers, launches through the production launcher, downloads.
    pub fn run_gpu(&self, gpu: &Gpu) -> Result<Vec<Vec<f32>>> {
        let what = "kernel case on the GPU";
        let stream = gpu.device.compute_stream();
        let (dev, mut args) = self.upload_args(stream, what)?;
        gpu.launcher.launch(self.kernel, self.cfg, &mut args).map_err(|e| e.context(what))?;
        guarded(what, || {
            stream.synchronize()?;
            dev.iter().map(|d| stream.clone_dtoh(d)).collect()
        })
    }

    /// Uploads the buffers once, for timing launches alone (benches).
    pub fn upload(&self, gpu: &Gpu) -> Result<Resident> {
        let (bufs, args) = self.upload_args(gpu.device.compute_stream(), "upload kernel case")?;
        Ok(Resident { args, _bufs: bufs, kernel: self.kernel, cfg: self.cfg })
    }

    /// The buffers on the device and the arguments pointing at them (errors prefixed with `what`).
    fn upload_args(&self, stream: &Arc<CudaStream>, what: &str) -> Result<(Vec<CudaSlice<f32>>, KernelArgs)> {
        guarded(what, || {
            let bufs = self.buffers.iter().map(|b| stream.clone_htod(b)).collect::<std::result::Result<Vec<_>, _>>()?;
            let ptrs: Vec<u64> = bufs.iter().map(|d| d.device_ptr(stream).0).collect();
            Ok::<_, cudarc::driver::DriverError>((bufs, self.pack(&ptrs)))
        })
    }

    fn pack(&self, ptrs: &[u64]) -> KernelArgs {
        let mut a = KernelArgs::new();
        for arg in &self.args {
            a = match *arg {
                Arg::Buf(i) => a.ptr(ptrs[i]),
                Arg::Null => a.ptr(0),
                Arg::I32(v) => a.i32(v),
                Arg::I64(v) => a.i64(v),
                Arg::F32(v) => a.f32(v),
            };
        }
        a
    }
}

/// A GPU with the project's kernel modules registered, ready to launch.
pub struct Gpu {
    pub device: CudaDevice,
    pub launcher: CudaLauncher,
}

impl Gpu {
    /// Device 0, or why there is none.
    pub fn open() -> Result<Gpu> {
        Self::open_ordinal(0)
    }
    /// Device `ordinal`, or why it cannot be opened.
    pub fn open_ordinal(ordinal: usize) -> Result<Gpu> {
        let device = CudaDevice::open(ordinal)?;
        let modules = Arc::new(ModuleCache::new(device.context().clone(), device.sm()));
        for spec in super::module_specs() {
            modules.register(spec);
        }
        let launcher = CudaLauncher::new(modules, device.compute_stream().clone(), device.info());
        Ok(Gpu { device, launcher })
    }
}

/// A case whose buffers live on the GPU: launch it repeatedly.
pub struct Resident {
    args: KernelArgs,
    _bufs: Vec<CudaSlice<f32>>,
    kernel: &'static str,
    cfg: LaunchCfg,
}

impl Resident {
    /// One launch followed by a stream synchronisation.
    pub fn launch_sync(&mut self, gpu: &Gpu) -> Result<()> {
        gpu.launcher.launch(self.kernel, self.cfg, &mut self.args)?;
        gpu.device.synchronize()
    }
}
