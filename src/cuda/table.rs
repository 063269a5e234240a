//! One kernel case, run anywhere: buffers (f32 contents), scalar arguments and a launch
//! configuration, launched on the CPU emulator (host buffers) or on a real GPU (uploaded, launched
//! through the production `CudaLauncher`, downloaded). The CUDA test table and the GPU benches
//! build these; without a device the GPU half reports "skipped: no CUDA device".
use super::{CudaDevice, CudaLauncher, KernelArgs, LaunchCfg, Launcher, ModuleCache};
use std::sync::Arc;

/// A kernel argument: a buffer of the case (by index) or a scalar.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    Buf(usize),
    I32(i32),
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
    pub fn run_emulated(&self) -> Result<Vec<Vec<f32>>, String> {
        let mut bufs = self.buffers.clone();
        let ptrs: Vec<u64> = bufs.iter_mut().map(|b| b.as_mut_ptr() as u64).collect();
        let mut args = self.pack(&ptrs);
        super::emu::EmuLauncher.launch(self.kernel, self.cfg, &mut args)?;
        Ok(bufs)
    }

    /// Runs on `gpu`: uploads the buffers, launches through the production launcher, downloads.
    pub fn run_gpu(&self, gpu: &Gpu) -> Result<Vec<Vec<f32>>, String> {
        let stream = gpu.device.compute_stream();
        super::device::guarded("kernel case on the GPU", || -> Result<Vec<Vec<f32>>, String> {
            use cudarc::driver::DevicePtr;
            let e = |x: cudarc::driver::DriverError| x.to_string();
            let dev: Vec<cudarc::driver::CudaSlice<f32>> = self.buffers.iter().map(|b| stream.clone_htod(b).map_err(e)).collect::<Result<_, _>>()?;
            let ptrs: Vec<u64> = dev.iter().map(|d| d.device_ptr(stream).0).collect();
            let mut args = self.pack(&ptrs);
            gpu.launcher.launch(self.kernel, self.cfg, &mut args)?;
            stream.synchronize().map_err(e)?;
            dev.iter().map(|d| stream.clone_dtoh(d).map_err(e)).collect()
        })
    }

    /// Uploads the buffers once, for timing launches alone (benches).
    pub fn upload(&self, gpu: &Gpu) -> Result<Resident, String> {
        let stream = gpu.device.compute_stream();
        super::device::guarded("upload kernel case", || -> Result<Resident, String> {
            use cudarc::driver::DevicePtr;
            let bufs: Vec<cudarc::driver::CudaSlice<f32>> = self.buffers.iter().map(|b| stream.clone_htod(b).map_err(|e| e.to_string())).collect::<Result<_, _>>()?;
            let ptrs: Vec<u64> = bufs.iter().map(|d| d.device_ptr(stream).0).collect();
            Ok(Resident { args: self.pack(&ptrs), _bufs: bufs, kernel: self.kernel, cfg: self.cfg })
        })
    }

    fn pack(&self, ptrs: &[u64]) -> KernelArgs {
        let mut a = KernelArgs::new();
        for arg in &self.args {
            a = match *arg {
                Arg::Buf(i) => a.ptr(ptrs[i]),
                Arg::I32(v) => a.i32(v),
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
    pub fn open() -> Result<Gpu, String> {
        let device = CudaDevice::open(0)?;
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
    _bufs: Vec<cudarc::driver::CudaSlice<f32>>,
    kernel: &'static str,
    cfg: LaunchCfg,
}

impl Resident {
    /// One launch followed by a stream synchronisation.
    pub fn launch_sync(&mut self, gpu: &Gpu) -> Result<(), String> {
        gpu.launcher.launch(self.kernel, self.cfg, &mut self.args)?;
        gpu.device.synchronize()
    }
}
