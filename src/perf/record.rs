//! [`RecordingOps`]: a [`DeviceOps`] that runs the whole device code path (the towers, the
//! training step) without executing anything and without device memory. Buffers are fake
//! addresses with lengths (a bump allocator, never reused, no allocation), uploads keep no data
//! (except small int32 uploads: the sequence offsets and indices that kernel costs need),
//! downloads return zeros of the right length, and every launch, GEMM, memset and copy is
//! appended to a [`Log`] for the roofline predictor (src/perf/roofline.rs).
//!
//! It mirrors what [`GpuOps`](crate::cuda::GpuOps) does with cuBLASLt loaded: `alloc` memsets,
//! `alloc_uninit` does not; a Linear with bf16/f16 weights converts x into an unzeroed scratch with
//! `f32_to_bf16`/`f32_to_f16` (64-bit sizes) and then runs one tensor-core GEMM (`gemm_half`, as do
//! the half backward GEMMs); f32 GEMMs are exact FP32 (CUDA cores) unless [`RecordingOps::tf32`]
//! (GpuOps: `--dtype f32` without `--no-tf32`; the dry run sets it the same way). When GpuOps changes how it issues work, change the
//! mirror here the same way. A new `DeviceOps` method is one line here: `self.op(Op::…)` or
//! `self.gemm_op(…)`.
use crate::cuda::{Buf, DeviceOps, KernelArg, KernelArgs, LaunchCfg};
use crate::error::{Error, Result};
use crate::tensor::DType;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

/// How cuBLASLt (or our kernels) compute a GEMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GemmPath {
    /// bf16/f16 inputs on the tensor cores, f32 accumulation.
    TensorCore,
    /// f32 storage, TF32 tensor cores.
    Tf32,
    /// f32 storage, exact FP32 on the CUDA cores.
    F32,
}

/// One GEMM as the device code asked for it (row-major, see [`crate::cuda::GemmDesc`]).
#[derive(Clone, Debug, PartialEq)]
pub struct GemmRec {
    /// Which DeviceOps method: "linear", "linear_bf16", "linear_f16", "gemm".
    pub call: &'static str,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub batch: usize,
    pub in_dtype: DType,
    pub out_dtype: DType,
    pub trans_a: bool,
    pub trans_b: bool,
    pub bias: bool,
    pub beta: f32,
    pub path: GemmPath,
}

/// One kernel launch.
#[derive(Clone, Debug, PartialEq)]
pub struct LaunchRec {
    pub kernel: String,
    pub cfg: LaunchCfg,
    pub args: Vec<KernelArg>,
}

/// One unit of device work, in stream order.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    Launch(LaunchRec),
    Gemm(GemmRec),
    /// `cuMemsetD8Async` of a freshly allocated block.
    Memset {
        bytes: usize,
    },
    /// Host → device copy (pinned staging).
    Upload {
        bytes: usize,
    },
    /// Device → host copy (synchronises).
    Download {
        bytes: usize,
    },
}

/// What was recorded, and the fake address space.
#[derive(Default)]
pub struct Log {
    pub ops: Vec<Op>,
    /// base address → length in 4-byte elements, of every buffer handed out.
    bufs: BTreeMap<u64, usize>,
    /// base address → data, of the int32 uploads up to [`KEEP_I32`] elements.
    ints: HashMap<u64, Vec<i32>>,
    next: u64,
    /// Bytes of all buffers handed out (nothing is freed: an upper bound of the footprint).
    pub bytes_handed_out: u64,
}

/// int32 uploads up to this many elements keep their data (cu_seqlens, row indices).
pub const KEEP_I32: usize = 1 << 20;

impl Log {
    /// The buffer holding address `p` (base, length in elements).
    pub fn buffer_of(&self, p: u64) -> Option<(u64, usize)> {
        let (&base, &len) = self.bufs.range(..=p).next_back()?;
        (p < base + 4 * len.max(1) as u64).then_some((base, len))
    }
    /// Elements from address `p` to the end of its buffer.
    pub fn elems_from(&self, p: u64) -> Option<usize> {
        let (base, len) = self.buffer_of(p)?;
        Some(len - ((p - base) / 4) as usize)
    }
    /// The int32 data uploaded at `p` (kept for small uploads).
    pub fn ints_at(&self, p: u64) -> Option<&[i32]> {
        self.ints.get(&p).map(|v| v.as_slice())
    }
    fn new_buf(&mut self, n: usize) -> Buf {
        if self.next == 0 {
            self.next = 1 << 32;
        }
        let p = self.next;
        self.next += (4 * n.max(1) as u64).div_ceil(256) * 256;
        self.bufs.insert(p, n);
        self.bytes_handed_out += 4 * n as u64;
        Buf::fake(p, n)
    }
}

/// The recording device (see the module docs). Cloning shares the log.
#[derive(Clone, Default)]
pub struct RecordingOps {
    log: Arc<Mutex<Log>>,
    /// f32 GEMMs on the TF32 tensor cores (cuBLASLt `allow_tf32`), as GpuOps::set_tf32.
    pub tf32: bool,
}

impl RecordingOps {
    pub fn new() -> RecordingOps {
        RecordingOps::default()
    }
    /// The log (shared with every clone, e.g. the one inside a `Box<dyn DeviceOps>`).
    pub fn log(&self) -> MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// Takes the operations recorded so far (the address space and kept data stay).
    pub fn take(&self) -> Vec<Op> {
        std::mem::take(&mut self.log().ops)
    }
    fn op(&self, op: Op) -> Result<()> {
        self.log().ops.push(op);
        Ok(())
    }
    fn f32_path(&self) -> GemmPath {
        if self.tf32 {
            GemmPath::Tf32
        } else {
            GemmPath::F32
        }
    }
    #[allow(clippy::too_many_arguments)]
    fn gemm_op(&self, call: &'static str, (m, n, k): (usize, usize, usize), dt: DType, (ta, tb): (bool, bool), bias: bool, beta: f32) -> Result<()> {
        if m == 0 || n == 0 || k == 0 {
            return Err(crate::shape_err!("{call}: empty problem m {m}, n {n}, k {k}"));
        }
        let path = if dt == DType::F32 { self.f32_path() } else { GemmPath::TensorCore };
        let g = GemmRec { call, m, n, k, batch: 1, in_dtype: dt, out_dtype: DType::F32, trans_a: ta, trans_b: tb, bias, beta, path };
        self.op(Op::Gemm(g))
    }
    /// GpuOps::linear_half: x converted by `train_ops::to_half` into an unzeroed scratch (64-bit
    /// sizes), then the half GEMM (`gemm_half`, ta = 0, tb = 1, beta 0).
    fn linear_half(&self, x: &Buf, (m, n, k): (usize, usize, usize), bias: bool, dt: DType) -> Result<()> {
        let _xh = crate::cuda::train_ops::to_half(self, dt, x, m * k)?; // [m, k] packed halves
        self.gemm_op(if dt == DType::BF16 { "linear_bf16" } else { "linear_f16" }, (m, n, k), dt, (false, true), bias, 0.0)
    }
}

impl DeviceOps for RecordingOps {
    fn describe(&self) -> String {
        "recording device (dry run: nothing executed)".into()
    }
    fn alloc(&self, n: usize) -> Result<Buf> {
        let b = self.alloc_uninit(n)?;
        self.op(Op::Memset { bytes: 4 * n })?;
        Ok(b)
    }
    fn alloc_uninit(&self, n: usize) -> Result<Buf> {
        Ok(self.log().new_buf(n))
    }
    fn upload(&self, data: &[f32]) -> Result<Buf> {
        let b = self.alloc_uninit(data.len())?;
        self.op(Op::Upload { bytes: 4 * data.len() })?;
        Ok(b)
    }
    fn upload_i32(&self, data: &[i32]) -> Result<Buf> {
        let b = self.upload(bytemuck::cast_slice::<i32, f32>(data))?;
        if data.len() <= KEEP_I32 {
            self.log().ints.insert(b.ptr(), data.to_vec());
        }
        Ok(b)
    }
    fn upload_bf16(&self, data: &[half::bf16]) -> Result<Buf> {
        let b = self.alloc_uninit(data.len().div_ceil(2))?;
        self.op(Op::Upload { bytes: 2 * data.len() })?;
        Ok(b)
    }
    fn upload_f16(&self, data: &[half::f16]) -> Result<Buf> {
        let b = self.alloc_uninit(data.len().div_ceil(2))?;
        self.op(Op::Upload { bytes: 2 * data.len() })?;
        Ok(b)
    }
    fn download(&self, b: &Buf) -> Result<Vec<f32>> {
        self.op(Op::Download { bytes: 4 * b.len() })?;
        Ok(vec![0f32; b.len()])
    }
    fn launch(&self, kernel: &str, cfg: LaunchCfg, args: &mut KernelArgs) -> Result<()> {
        if crate::cuda::kernels::module_of(kernel).is_none() {
            return Err(Error::device(format!("dry run: no kernel named {kernel} in kernels/*.cu")));
        }
        self.op(Op::Launch(LaunchRec { kernel: kernel.to_string(), cfg, args: args.args().to_vec() }))
    }
    fn linear(&self, _x: &Buf, _w: &Buf, bias: Option<&Buf>, _y: &Buf, m: usize, n: usize, k: usize) -> Result<()> {
        self.gemm_op("linear", (m, n, k), DType::F32, (false, true), bias.is_some(), 0.0)
    }
    fn linear_bf16(&self, x: &Buf, _w: &Buf, bias: Option<&Buf>, _y: &Buf, m: usize, n: usize, k: usize) -> Result<()> {
        self.linear_half(x, (m, n, k), bias.is_some(), DType::BF16)
    }
    fn linear_f16(&self, x: &Buf, _w: &Buf, bias: Option<&Buf>, _y: &Buf, m: usize, n: usize, k: usize) -> Result<()> {
        self.linear_half(x, (m, n, k), bias.is_some(), DType::F16)
    }
    fn gemm(&self, _a: &Buf, _b: &Buf, _c: &Buf, m: usize, n: usize, k: usize, ta: bool, tb: bool, beta: f32) -> Result<()> {
        self.gemm_op("gemm", (m, n, k), DType::F32, (ta, tb), false, beta)
    }
    fn gemm_half(&self, g: &crate::cuda::HalfGemm) -> Result<()> {
        crate::cuda::gemm_launch::gemm_half_launch(g)?; // the same size checks as the devices
        let d = g.desc();
        let path = GemmPath::TensorCore;
        let rec = GemmRec {
            call: "gemm_half",
            m: g.m,
            n: g.n,
            k: g.k,
            batch: 1,
            in_dtype: g.dt,
            out_dtype: d.out_dtype,
            trans_a: g.ta,
            trans_b: g.tb,
            bias: d.bias,
            beta: d.beta,
            path,
        };
        self.op(Op::Gemm(rec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_fake_and_lookups_work() {
        let r = RecordingOps::new();
        let a = r.alloc_uninit(1 << 30).unwrap(); // 4 GiB, nothing allocated
        let b = r.upload_i32(&[0, 5, 9]).unwrap();
        assert_ne!(a.ptr(), b.ptr());
        let log = r.log();
        assert_eq!(log.buffer_of(a.ptr() + 400), Some((a.ptr(), 1 << 30)));
        assert_eq!(log.elems_from(a.ptr() + 400), Some((1 << 30) - 100));
        assert_eq!(log.ints_at(b.ptr()), Some(&[0, 5, 9][..]));
        assert_eq!(log.buffer_of(1), None);
    }

    #[test]
    fn records_gemms_and_the_half_conversion() {
        let r = RecordingOps::new();
        let (x, w, y) = (r.alloc_uninit(6).unwrap(), r.alloc_uninit(6).unwrap(), r.alloc_uninit(4).unwrap());
        r.take();
        r.linear_bf16(&x, &w, None, &y, 2, 2, 3).unwrap();
        let ops = r.take();
        assert!(matches!(&ops[0], Op::Launch(l) if l.kernel == "f32_to_bf16"));
        assert!(matches!(&ops[1], Op::Gemm(g) if g.path == GemmPath::TensorCore && (g.m, g.n, g.k) == (2, 2, 3)));
        r.gemm(&x, &w, &y, 2, 2, 3, true, false, 1.0).unwrap();
        assert!(matches!(&r.take()[0], Op::Gemm(g) if g.path == GemmPath::F32 && g.trans_a && g.beta == 1.0));
        assert!(r.launch("no_such_kernel", LaunchCfg::new((1, 1, 1), (1, 1, 1), 0), &mut KernelArgs::new()).is_err());
        assert_eq!(r.download(&y).unwrap(), vec![0.0; 4]);
    }
}
