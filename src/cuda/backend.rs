//! The device operations the CUDA towers ([`crate::model::device`]) are written against, with two
//! implementations:
//!
//! - [`GpuOps`]: a real GPU. Buffers come from the caching allocator ([`CudaPool`]: after the
//!   first batch no `cuMemAlloc`/`cuMemFree` at all), host data goes up through pinned staging
//!   buffers ([`StagingPool`]) and comes back through pinned ones, kernels go through the
//!   production [`CudaLauncher`](super::CudaLauncher), Linear GEMMs through cuBLASLt
//!   ([`Gemm::linear`], exact FP32 or TF32 ([`GpuOps::set_tf32`]), or bf16/f16 inputs with f32
//!   accumulation: [`DeviceOps::gemm_half`]), or through the tiled kernels of kernels/matmul.cu
//!   when cuBLASLt cannot be loaded.
//! - `EmuOps` (feature `emu`): host buffers (`DeviceMem`, each
//!   ending at a guard page) whose addresses are the "device
//!   pointers", kernels on the CPU emulator through `EmuLauncher`, and
//!   every GEMM as a kernel of kernels/matmul.cu on the emulator (`linear_f32`, `gemm_f32`, and
//!   `gemm_bf16` / `gemm_f16` with cuBLASLt's half-input arithmetic; f32 is always exact). The same tower code, the same kernel
//!   names, argument packing and launch geometry as on the GPU run end to end in `cargo test`.
//!
//! Every operation is asynchronous on the GPU (one stream, in order); [`DeviceOps::download`] is
//! the only synchronisation.
use super::alloc::{CudaBlock, CudaPool, CudaRawAlloc};
use super::gemm_launch::{check_linear, check_linear_w, gemm_half_launch, gemm_kernel_launch, linear_kernel_launch, HalfGemm};
use super::launch::{KernelArgs, LaunchCfg, Launcher};
use super::pinned::{StagingKind, StagingPool};
use super::{Gemm, GemmDesc};
use crate::error::{Error, Result};
use crate::tensor::DType;
use std::sync::{Arc, Mutex};

/// A device buffer of `len` 4-byte elements (f32, or i32 bit patterns from
/// [`DeviceOps::upload_i32`]). `ptr` is what kernels receive; the buffer owns its storage and
/// frees it on drop.
pub struct Buf {
    ptr: u64,
    len: usize,
    _store: Store,
    /// The same values rounded to bf16/f16 and packed ([`DeviceOps::upload_bf16`] layout), when
    /// the kernel that wrote them also wrote the next half GEMM's input (see [`Buf::half`]).
    half: Option<Box<(DType, Buf)>>,
}

/// Emulated device memory (only the emulator builds one).
#[cfg(feature = "emu")]
type HostMem = super::emu::DeviceMem;
#[cfg(not(feature = "emu"))]
type HostMem = ();

enum Store {
    /// Emulated device memory: a host mapping whose end abuts a guard page, so kernels that
    /// read or write past a buffer fail their launch ([`super::emu::DeviceMem`]).
    #[allow(dead_code)]
    Host(HostMem),
    /// A block of the caching allocator (returned to its free list on drop, stream-ordered).
    #[allow(dead_code)]
    Device(CudaBlock),
    /// No memory at all: an address and a length ([`crate::perf::record::RecordingOps`]).
    None,
}

impl Buf {
    /// The device pointer (a host address on the emulated backend).
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The packed `dt` copy of these values a kernel wrote next to them (LayerNorm, bias +
    /// activation), if any: the input of the next half-precision GEMM, no conversion pass needed.
    /// Whoever changes the values in place drops it ([`Buf::clear_half`]).
    pub fn half(&self, dt: DType) -> Option<&Buf> {
        self.half.as_deref().filter(|h| h.0 == dt).map(|h| &h.1)
    }
    /// Attaches the packed `dt` copy of these values.
    pub fn set_half(&mut self, dt: DType, h: Buf) {
        self.half = Some(Box::new((dt, h)));
    }
    /// Takes the packed `dt` copy out, if there is one.
    pub fn take_half(&mut self, dt: DType) -> Option<Buf> {
        match self.half.take() {
            Some(h) if h.0 == dt => Some(h.1),
            other => {
                self.half = other;
                None
            }
        }
    }
    /// Drops the half copy (the values are about to change).
    pub fn clear_half(&mut self) {
        self.half = None;
    }
    /// `n` values held only as their packed `dt` copy `h` (no f32 storage: [`Buf::ptr`] is 0):
    /// the output of a kernel or GEMM whose readers all take the 16-bit values (the next half
    /// GEMM, the flash attention). The device backend converts it back to f32 where an
    /// operation needs f32 values ([`Buf::is_half_only`]).
    pub fn half_only(dt: DType, h: Buf, n: usize) -> Buf {
        Buf { ptr: 0, len: n, _store: Store::None, half: Some(Box::new((dt, h))) }
    }
    /// The packed 16-bit copy and its format, whatever the format.
    pub fn half_any(&self) -> Option<(DType, &Buf)> {
        self.half.as_deref().map(|h| (h.0, &h.1))
    }
    /// Whether the values exist only as their 16-bit copy ([`Buf::half_only`]).
    pub fn is_half_only(&self) -> bool {
        self.ptr == 0 && self.half.is_some()
    }
    /// A buffer with no storage: what the recording device (src/perf/record.rs) hands out.
    pub(crate) fn fake(ptr: u64, len: usize) -> Buf {
        Buf { ptr, len, _store: Store::None, half: None }
    }
}

/// What the GPU tower code needs from a device.
pub trait DeviceOps {
    /// e.g. "cuda:0 NVIDIA H100 (cuBLASLt)" or "emulator".
    fn describe(&self) -> String;
    /// `n` zeros.
    fn alloc(&self, n: usize) -> Result<Buf>;
    /// `n` elements the caller's next kernel overwrites entirely: no memset on a GPU (the
    /// emulator fills them with NaN, so a kernel that leaves one unwritten fails its test).
    fn alloc_uninit(&self, n: usize) -> Result<Buf> {
        self.alloc(n)
    }
    fn upload(&self, data: &[f32]) -> Result<Buf>;
    /// int32 data (ids, indices) in a 4-byte-element buffer, bit for bit.
    fn upload_i32(&self, data: &[i32]) -> Result<Buf> {
        self.upload(bytemuck::cast_slice::<i32, f32>(data))
    }
    /// bf16 data (weights of the bf16 towers), two values per 4-byte element: the Buf's `len`
    /// is ⌈n/2⌉ (the last half-element is zero when n is odd).
    fn upload_bf16(&self, data: &[half::bf16]) -> Result<Buf> {
        let mut bits: Vec<u16> = data.iter().map(|v| v.to_bits()).collect();
        if bits.len() % 2 == 1 {
            bits.push(0);
        }
        let words: Vec<f32> = bits.chunks_exact(2).map(|p| f32::from_bits(p[0] as u32 | (p[1] as u32) << 16)).collect();
        self.upload(&words)
    }
    /// f16 data, packed as [`DeviceOps::upload_bf16`] packs bf16.
    fn upload_f16(&self, data: &[half::f16]) -> Result<Buf> {
        self.upload_bf16(&data.iter().map(|v| half::bf16::from_bits(v.to_bits())).collect::<Vec<_>>())
    }
    /// Waits for all queued work and copies `b` to the host.
    fn download(&self, b: &Buf) -> Result<Vec<f32>>;
    fn launch(&self, kernel: &str, cfg: LaunchCfg, args: &mut KernelArgs) -> Result<()>;
    /// `y[m×n] = x[m×k]·Wᵀ (+ bias[n])`, W `[n×k]` row-major; all f32, y must not alias x or W.
    #[allow(clippy::too_many_arguments)]
    fn linear(&self, x: &Buf, w: &Buf, bias: Option<&Buf>, y: &Buf, m: usize, n: usize, k: usize) -> Result<()>;
    /// The same with W in bf16 ([`DeviceOps::upload_bf16`]) and x rounded to bf16: products of
    /// bf16 values accumulated in f32, f32 bias and output (the CPU bf16 towers' arithmetic).
    #[allow(clippy::too_many_arguments)]
    fn linear_bf16(&self, x: &Buf, w: &Buf, bias: Option<&Buf>, y: &Buf, m: usize, n: usize, k: usize) -> Result<()>;
    /// The same with W in IEEE f16 ([`DeviceOps::upload_f16`]) and x rounded to f16.
    #[allow(clippy::too_many_arguments)]
    fn linear_f16(&self, x: &Buf, w: &Buf, bias: Option<&Buf>, y: &Buf, m: usize, n: usize, k: usize) -> Result<()>;
    /// `C[m×n] = op(A)·op(B) + beta·C` in f32, A stored `[m×k]` (`[k×m]` if `ta`), B `[k×n]`
    /// (`[n×k]` if `tb`): the backward GEMMs of training (dX = dY·W, dW += dYᵀ·X with beta 1).
    #[allow(clippy::too_many_arguments)]
    fn gemm(&self, a: &Buf, b: &Buf, c: &Buf, m: usize, n: usize, k: usize, ta: bool, tb: bool, beta: f32) -> Result<()>;
    /// A GEMM on packed 16-bit A and B ([`HalfGemm`]: bf16 or f16, [`DeviceOps::upload_bf16`]
    /// layout) with f32 accumulation: `D = op(A)·op(B) (+ bias) (+ C)`, D f32 or 16-bit. The half
    /// towers' forward Linears (x·Wᵀ + b from the half copies, with the residual as C, or written
    /// in 16 bits for the next GEMM or attention) and backward GEMMs (dX = dY·W from the half
    /// weight copy, dW = dYᵀ·X from half activations); cuBLASLt CUDA_R_16BF/16F with
    /// CUBLAS_COMPUTE_32F on a GPU, the `gemm_bf16`/`gemm_f16` kernels of kernels/matmul.cu (the
    /// same arithmetic) on the emulator.
    fn gemm_half(&self, g: &HalfGemm) -> Result<()>;
    /// The CUDA stream this device's work is ordered on (the compute stream), for libraries that
    /// enqueue their own work on it (NCCL); `None` on the emulator and recording backends.
    fn cuda_stream(&self) -> Option<Arc<cudarc::driver::CudaStream>> {
        None
    }
}

/// The emulated device: host memory, kernels and GEMMs on the CPU emulator.
#[cfg(feature = "emu")]
#[derive(Default)]
pub struct EmuOps;

#[cfg(feature = "emu")]
impl DeviceOps for EmuOps {
    fn describe(&self) -> String {
        "CUDA emulator (CPU)".into()
    }
    fn alloc(&self, n: usize) -> Result<Buf> {
        let m = super::emu::DeviceMem::new(n * 4)?; // zeroed
        Ok(Buf { ptr: m.ptr() as u64, len: n, _store: Store::Host(m), half: None })
    }
    fn alloc_uninit(&self, n: usize) -> Result<Buf> {
        let mut m = super::emu::DeviceMem::new(n * 4)?;
        m.as_mut_slice::<f32>().fill(f32::NAN);
        Ok(Buf { ptr: m.ptr() as u64, len: n, _store: Store::Host(m), half: None })
    }
    fn upload(&self, data: &[f32]) -> Result<Buf> {
        let m = super::emu::DeviceMem::from_slice(data)?;
        Ok(Buf { ptr: m.ptr() as u64, len: data.len(), _store: Store::Host(m), half: None })
    }
    fn download(&self, b: &Buf) -> Result<Vec<f32>> {
        match &b._store {
            Store::Host(m) => Ok(m.as_slice::<f32>().to_vec()),
            _ => Err(Error::device("emulator: buffer belongs to a GPU")),
        }
    }
    fn launch(&self, kernel: &str, cfg: LaunchCfg, args: &mut KernelArgs) -> Result<()> {
        super::emu::EmuLauncher.launch(kernel, cfg, args)
    }
    fn linear(&self, x: &Buf, w: &Buf, bias: Option<&Buf>, y: &Buf, m: usize, n: usize, k: usize) -> Result<()> {
        check_linear(x, w, bias, y, m, n, k)?;
        let (cfg, mut args) = linear_kernel_launch(x.ptr, w.ptr, bias.map(|b| b.ptr), y.ptr, m, n, k)?;
        self.launch("linear_f32", cfg, &mut args)
    }
    fn linear_bf16(&self, x: &Buf, w: &Buf, bias: Option<&Buf>, y: &Buf, m: usize, n: usize, k: usize) -> Result<()> {
        check_linear_w(x, w, bias, y, m, n, k, 2)?;
        let (cfg, mut args) = linear_kernel_launch(x.ptr, w.ptr, bias.map(|b| b.ptr), y.ptr, m, n, k)?;
        self.launch("linear_bf16w", cfg, &mut args)
    }
    fn linear_f16(&self, x: &Buf, w: &Buf, bias: Option<&Buf>, y: &Buf, m: usize, n: usize, k: usize) -> Result<()> {
        check_linear_w(x, w, bias, y, m, n, k, 2)?;
        let (cfg, mut args) = linear_kernel_launch(x.ptr, w.ptr, bias.map(|b| b.ptr), y.ptr, m, n, k)?;
        self.launch("linear_f16w", cfg, &mut args)
    }
    fn gemm(&self, a: &Buf, b: &Buf, c: &Buf, m: usize, n: usize, k: usize, ta: bool, tb: bool, beta: f32) -> Result<()> {
        let (cfg, mut args) = gemm_kernel_launch(a, b, c, m, n, k, ta, tb, beta)?;
        self.launch("gemm_f32", cfg, &mut args)
    }
    fn gemm_half(&self, g: &HalfGemm) -> Result<()> {
        let (kernel, cfg, mut args) = gemm_half_launch(g)?;
        self.launch(kernel, cfg, &mut args)
    }
}

/// A real GPU: pooled device buffers and pinned staging on the compute stream, the production
/// launcher, cuBLASLt.
pub struct GpuOps {
    gpu: super::table::Gpu,
    /// `None` when cuBLASLt could not be loaded: GEMMs run the matmul.cu kernels.
    gemm: Option<Gemm>,
    pool: Arc<CudaPool>,
    up: Mutex<StagingPool>,
    down: Mutex<StagingPool>,
    /// f32 GEMMs in TF32 ([`GpuOps::set_tf32`]).
    tf32: bool,
}

impl GpuOps {
    /// Device 0 with the kernel modules registered and a cuBLASLt handle, or why not.
    pub fn open() -> Result<GpuOps> {
        Self::open_ordinal(0)
    }
    /// Device `ordinal` (a rank's LOCAL_RANK), as [`GpuOps::open`].
    pub fn open_ordinal(ordinal: usize) -> Result<GpuOps> {
        let gpu = super::table::Gpu::open_ordinal(ordinal)?;
        let gemm = match Gemm::new(gpu.device.compute_stream().clone(), gpu.device.sm()) {
            Ok(g) => Some(g),
            Err(why) => {
                eprintln!("note: cuBLASLt unavailable ({}); GEMMs use the matmul.cu kernels", why.message());
                None
            }
        };
        let stream = gpu.device.compute_stream().clone();
        let ctx = gpu.device.context().clone();
        Ok(GpuOps {
            pool: CudaPool::new(CudaRawAlloc::new(stream)),
            up: Mutex::new(StagingPool::new(ctx.clone(), StagingKind::Upload)),
            down: Mutex::new(StagingPool::new(ctx, StagingKind::Download)),
            gpu,
            gemm,
            tf32: false,
        })
    }
    pub fn gpu(&self) -> &super::table::Gpu {
        &self.gpu
    }
    /// f32 GEMMs on the TF32 tensor cores (CUBLAS_COMPUTE_32F_FAST_TF32: 10-bit mantissa inputs,
    /// f32 accumulation, ~1e-3 relative) instead of exact FP32, the default of [`GpuOps::open`].
    /// `--dtype f32` commands turn it on unless `--no-tf32`; half GEMMs are unaffected, and so is
    /// the emulator (exact f32 always) and the matmul.cu fallback without cuBLASLt.
    pub fn set_tf32(&mut self, on: bool) {
        if let Some(g) = &mut self.gemm {
            g.set_allow_tf32(on);
        }
        self.tf32 = on && self.gemm.is_some();
    }
    /// The caching allocator's counters (hits, misses, bytes in use and cached).
    pub fn pool_stats(&self) -> super::PoolStats {
        self.pool.stats()
    }
    /// Linear with half-precision weights (bf16 or f16): x converted into a pooled scratch buffer
    /// (not zeroed: the conversion writes all of it; 64-bit sizes), then [`DeviceOps::gemm_half`].
    fn linear_half(&self, x: &Buf, w: &Buf, bias: Option<&Buf>, y: &Buf, (m, n, k): (usize, usize, usize), dt: DType) -> Result<()> {
        check_linear_w(x, w, bias, y, m, n, k, 2)?;
        let xh = super::train_ops::to_half(self, dt, x, m * k)?; // [m, k] packed halves
        self.gemm_half(&HalfGemm { bias, ..HalfGemm::new(dt, &xh, w, y, (m, n, k), false, true) })
        // xh goes back to the pool when it drops; the pool's reuse is ordered on this stream
    }

    /// An uninitialised pooled buffer of `n` 4-byte elements.
    fn block(&self, n: usize) -> Result<Buf> {
        let b = self.pool.alloc(n.max(1) * 4)?;
        Ok(Buf { ptr: b.ptr(), len: n, _store: Store::Device(b), half: None })
    }
}

impl DeviceOps for GpuOps {
    fn cuda_stream(&self) -> Option<Arc<cudarc::driver::CudaStream>> {
        Some(self.gpu.device.compute_stream().clone())
    }
    fn describe(&self) -> String {
        let d = &self.gpu.device;
        let gemm = match (&self.gemm, self.tf32) {
            (Some(_), true) => "cuBLASLt, f32 in TF32",
            (Some(_), false) => "cuBLASLt",
            (None, _) => "linear_f32 kernel",
        };
        format!("cuda:{} {} (sm_{}, GEMMs: {gemm})", d.ordinal(), d.name(), d.sm())
    }
    fn alloc_uninit(&self, n: usize) -> Result<Buf> {
        self.block(n)
    }
    fn alloc(&self, n: usize) -> Result<Buf> {
        let b = self.block(n)?;
        let s = self.gpu.device.compute_stream();
        // SAFETY: the block is a live device allocation of at least 4·max(n, 1) bytes; the memset
        // is ordered on the compute stream like every later use of the block.
        super::device::guarded("cuMemsetD8Async", || unsafe { cudarc::driver::result::memset_d8_async(b.ptr, 0, n * 4, s.cu_stream()) })?;
        Ok(b)
    }
    /// Through a pinned staging buffer: the copy is queued on the compute stream and the host
    /// does not wait for it.
    fn upload(&self, data: &[f32]) -> Result<Buf> {
        let b = self.block(data.len())?;
        if !data.is_empty() {
            let s = self.gpu.device.compute_stream();
            self.up.lock().unwrap_or_else(|e| e.into_inner()).upload(s, data, b.ptr)?;
        }
        Ok(b)
    }
    /// The one synchronisation of a batch: the pinned download waits for all queued work.
    fn download(&self, b: &Buf) -> Result<Vec<f32>> {
        let Store::Device(_) = &b._store else { return Err(Error::device("GPU: buffer is not device memory")) };
        let s = self.gpu.device.compute_stream();
        let mut v = vec![0f32; b.len];
        self.down.lock().unwrap_or_else(|e| e.into_inner()).download(s, b.ptr, &mut v)?;
        super::device::guarded("pending CUDA error", || self.gpu.device.context().check_err())?;
        Ok(v)
    }
    fn launch(&self, kernel: &str, cfg: LaunchCfg, args: &mut KernelArgs) -> Result<()> {
        self.gpu.launcher.launch(kernel, cfg, args)
    }
    fn linear(&self, x: &Buf, w: &Buf, bias: Option<&Buf>, y: &Buf, m: usize, n: usize, k: usize) -> Result<()> {
        check_linear(x, w, bias, y, m, n, k)?;
        match &self.gemm {
            Some(g) => g.linear(x.ptr, w.ptr, bias.map(|b| b.ptr), y.ptr, m, n, k, DType::F32),
            None => {
                let (cfg, mut args) = linear_kernel_launch(x.ptr, w.ptr, bias.map(|b| b.ptr), y.ptr, m, n, k)?;
                self.launch("linear_f32", cfg, &mut args)
            }
        }
    }
    /// cuBLASLt: x is converted to bf16 (`f32_to_bf16`, into a scratch buffer), then one bf16 ×
    /// bf16 → f32 GEMM with the bias epilogue on the tensor cores.
    fn linear_bf16(&self, x: &Buf, w: &Buf, bias: Option<&Buf>, y: &Buf, m: usize, n: usize, k: usize) -> Result<()> {
        self.linear_half(x, w, bias, y, (m, n, k), DType::BF16)
    }
    /// As [`DeviceOps::linear_bf16`] with f16 (`f32_to_f16`, CUDA_R_16F).
    fn linear_f16(&self, x: &Buf, w: &Buf, bias: Option<&Buf>, y: &Buf, m: usize, n: usize, k: usize) -> Result<()> {
        self.linear_half(x, w, bias, y, (m, n, k), DType::F16)
    }
    /// cuBLASLt with the transposes and beta in the descriptor (exact FP32), or `gemm_f32`.
    fn gemm(&self, a: &Buf, b: &Buf, c: &Buf, m: usize, n: usize, k: usize, ta: bool, tb: bool, beta: f32) -> Result<()> {
        let (cfg, mut args) = gemm_kernel_launch(a, b, c, m, n, k, ta, tb, beta)?;
        match &self.gemm {
            Some(g) => g.run(&GemmDesc { beta, ..GemmDesc::batched(1, m, n, k, ta, tb, DType::F32) }, a.ptr, b.ptr, c.ptr, None),
            None => self.launch("gemm_f32", cfg, &mut args),
        }
    }
    /// cuBLASLt on CUDA_R_16BF / CUDA_R_16F inputs, CUBLAS_COMPUTE_32F, f32 or 16-bit D, C
    /// added with beta 1, the bias epilogue (f32 bias); the matmul.cu kernels without cuBLASLt.
    ///
    /// A 16-bit D whose cuBLASLt plan has no algorithm (e.g. a library without the f32 bias for
    /// 16-bit D) falls back to an f32 D and one rounding pass (the same values), with a note once.
    fn gemm_half(&self, g: &HalfGemm) -> Result<()> {
        let (kernel, cfg, mut args) = gemm_half_launch(g)?;
        let Some(lt) = &self.gemm else { return self.launch(kernel, cfg, &mut args) };
        match lt.run_cd(&g.desc(), g.a.ptr, g.b.ptr, g.c.unwrap_or(g.d).ptr, g.d.ptr, g.bias.map(|x| x.ptr)) {
            Err(e) if g.half_out => {
                static NOTED: std::sync::Once = std::sync::Once::new();
                NOTED.call_once(|| eprintln!("note: cuBLASLt refused a 16-bit output GEMM ({}); using f32 output + rounding", e.message()));
                let y = self.block(g.m * g.n)?; // [m, n] f32
                let f = HalfGemm { bias: g.bias, ..HalfGemm::new(g.dt, g.a, g.b, &y, (g.m, g.n, g.k), g.ta, g.tb) }; // f32 D
                lt.run_cd(&f.desc(), g.a.ptr, g.b.ptr, y.ptr, y.ptr, g.bias.map(|x| x.ptr))?;
                let (k, c, mut a) = super::train_ops::to_half_launch(g.dt, y.ptr, g.d.ptr, g.m * g.n)?;
                self.launch(k, c, &mut a)
            }
            r => r,
        }
    }
}

#[cfg(all(test, feature = "emu"))]
mod tests {
    use super::*;

    fn lcg(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn emulated_linear_matches_f64_reference() {
        let ops = EmuOps;
        for &(m, n, k, bias) in &[(1, 1, 1, true), (3, 5, 7, false), (65, 70, 33, true), (130, 64, 16, true), (17, 129, 100, false)] {
            let (xv, wv, bv) = (lcg(m * k, 1), lcg(n * k, 2), lcg(n, 3));
            let (x, w, b, y) = (ops.upload(&xv).unwrap(), ops.upload(&wv).unwrap(), ops.upload(&bv).unwrap(), ops.upload(&vec![f32::NAN; m * n]).unwrap());
            ops.linear(&x, &w, bias.then_some(&b), &y, m, n, k).unwrap();
            let got = ops.download(&y).unwrap();
            for r in 0..m {
                for c in 0..n {
                    let mut want: f64 = (0..k).map(|i| xv[r * k + i] as f64 * wv[c * k + i] as f64).sum();
                    if bias {
                        want += bv[c] as f64;
                    }
                    let g = got[r * n + c] as f64;
                    assert!((g - want).abs() <= 1e-5 * (1.0 + want.abs()) * (k as f64).sqrt(), "m{m} n{n} k{k} [{r},{c}]: {g} vs {want}");
                }
            }
        }
    }

    #[test]
    fn emulated_gemm_is_the_linear_backward() {
        // dX = dY·W and dW = dYᵀ·X accumulated onto an existing gradient (beta 1), vs the CPU gemm
        use crate::ops::matmul::{gemm_reference, View};
        let ops = EmuOps;
        let (m, n, k) = (9, 7, 13);
        let (dy, w, x, g0) = (lcg(m * n, 1), lcg(n * k, 2), lcg(m * k, 3), lcg(n * k, 4));
        let (bdy, bw, bx) = (ops.upload(&dy).unwrap(), ops.upload(&w).unwrap(), ops.upload(&x).unwrap());
        let (dx, dw) = (ops.alloc(m * k).unwrap(), ops.upload(&g0).unwrap());
        ops.gemm(&bdy, &bw, &dx, m, k, n, false, false, 0.0).unwrap();
        ops.gemm(&bdy, &bx, &dw, n, k, m, true, false, 1.0).unwrap();
        let mut want_dx = vec![0f32; m * k];
        gemm_reference(View::row_major(&dy, m, n), View::row_major(&w, n, k), &mut want_dx, false);
        let mut want_dw = g0.clone();
        gemm_reference(View::row_major(&dy, m, n).t(), View::row_major(&x, m, k), &mut want_dw, true);
        for (got, want) in [(ops.download(&dx).unwrap(), want_dx), (ops.download(&dw).unwrap(), want_dw)] {
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-5 + 1e-5 * w.abs(), "{g} vs {w}");
            }
        }
        assert!(ops.gemm(&bdy, &bw, &dx, m, k + 1, n, false, false, 0.0).is_err());
    }

    #[test]
    fn linear_checks_sizes() {
        let ops = EmuOps;
        let (x, w, y) = (ops.alloc(6).unwrap(), ops.alloc(6).unwrap(), ops.alloc(3).unwrap());
        assert!(ops.linear(&x, &w, None, &y, 2, 3, 3).unwrap_err().to_string().contains("too small"));
        assert!(ops.linear(&x, &w, None, &y, 0, 3, 3).is_err());
    }

    #[test]
    fn i32_upload_is_bit_exact() {
        let ops = EmuOps;
        let b = ops.upload_i32(&[0, 1, 49407, -1, i32::MAX]).unwrap();
        let back: Vec<i32> = ops.download(&b).unwrap().iter().map(|f| f.to_bits() as i32).collect();
        assert_eq!(back, vec![0, 1, 49407, -1, i32::MAX]);
    }
}
