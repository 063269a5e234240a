//! The GEMM kernels of kernels/matmul.cu as the device backends launch them: a 16-bit GEMM's
//! description ([`HalfGemm`]), and for each kernel the buffer-size checks, the launch
//! configuration and the argument packing — shared by the GPU ([`super::GpuOps`]) and the
//! emulator (`super::EmuOps`), so both launch exactly the same thing.
use super::backend::Buf;
use super::launch::{KernelArgs, LaunchCfg};
use super::GemmDesc;
use crate::error::{Error, Result};
use crate::tensor::DType;
/// One [`DeviceOps::gemm_half`]: `d[m×n] = op(a)·op(b) (+ bias[n] on every row) (+ c)`, A stored
/// `[m×k]` (`[k×m]` if `ta`), B `[k×n]` (`[n×k]` if `tb`), both packed `dt` values; `bias` and
/// `c` f32; `d` f32, or packed `dt` values when `half_out` (then no `c`). `c` may be `d` itself
/// (accumulate in place).
///
/// [`DeviceOps::gemm_half`]: super::DeviceOps::gemm_half
pub struct HalfGemm<'a> {
    pub dt: DType,
    pub a: &'a Buf,
    pub b: &'a Buf,
    pub bias: Option<&'a Buf>,
    pub c: Option<&'a Buf>,
    pub d: &'a Buf,
    pub half_out: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub ta: bool,
    pub tb: bool,
}

impl<'a> HalfGemm<'a> {
    /// `d = op(a)·op(b)` into f32, nothing added.
    pub fn new(dt: DType, a: &'a Buf, b: &'a Buf, d: &'a Buf, (m, n, k): (usize, usize, usize), ta: bool, tb: bool) -> Self {
        HalfGemm { dt, a, b, bias: None, c: None, d, half_out: false, m, n, k, ta, tb }
    }
    /// The cuBLASLt description (beta 1 when C is added).
    pub fn desc(&self) -> GemmDesc {
        let out_dtype = if self.half_out { self.dt } else { DType::F32 };
        let beta = if self.c.is_some() { 1.0 } else { 0.0 };
        GemmDesc { beta, bias: self.bias.is_some(), out_dtype, ..GemmDesc::batched(1, self.m, self.n, self.k, self.ta, self.tb, self.dt) }
    }
}

/// The kernel (kernels/matmul.cu) of a [`DeviceOps::gemm_half`]: `gemm_bf16` / `gemm_f16` (f32
/// D) or `gemm_bf16_h` / `gemm_f16_h` (16-bit D), its launch configuration and arguments
/// `(a, b, bias, c, d, m, n, k, ta, tb)`, after the buffer sizes are checked.
///
/// [`DeviceOps::gemm_half`]: super::DeviceOps::gemm_half
pub fn gemm_half_launch(g: &HalfGemm) -> Result<(&'static str, LaunchCfg, KernelArgs)> {
    let kernel = match (g.dt, g.half_out) {
        (DType::BF16, false) => "gemm_bf16",
        (DType::BF16, true) => "gemm_bf16_h",
        (DType::F16, false) => "gemm_f16",
        (DType::F16, true) => "gemm_f16_h",
        (DType::F32, _) => return Err(Error::msg("gemm_half: the inputs must be bf16 or f16, not f32")),
    };
    let (m, n, k) = (g.m, g.n, g.k);
    let d_elems = if g.half_out { (m * n).div_ceil(2) } else { m * n };
    let small =
        g.a.len() * 2 < m * k || g.b.len() * 2 < k * n || g.d.len() < d_elems || g.bias.is_some_and(|x| x.len() < n) || g.c.is_some_and(|c| c.len() < m * n);
    if m == 0 || n == 0 || k == 0 || small || (g.half_out && g.c.is_some()) {
        return Err(crate::shape_err!(
            "gemm_half m {m}, n {n}, k {k}: empty problem, buffers too small (a {}, b {}, d {}) or C with a 16-bit D",
            g.a.len(),
            g.b.len(),
            g.d.len()
        ));
    }
    let (cfg, _) = linear_kernel_launch(0, 0, None, 0, m, n, k)?;
    let args = KernelArgs::new()
        .ptr(g.a.ptr())
        .ptr(g.b.ptr())
        .ptr(g.bias.map_or(0, |x| x.ptr()))
        .ptr(g.c.map_or(0, |x| x.ptr()))
        .ptr(g.d.ptr())
        .i32(m as i32)
        .i32(n as i32)
        .i32(k as i32)
        .i32(g.ta as i32)
        .i32(g.tb as i32);
    Ok((kernel, cfg, args))
}

/// The `gemm_f32` kernel (kernels/matmul.cu): its launch configuration and arguments.
#[allow(clippy::too_many_arguments)]
pub fn gemm_kernel_launch(a: &Buf, b: &Buf, c: &Buf, m: usize, n: usize, k: usize, ta: bool, tb: bool, beta: f32) -> Result<(LaunchCfg, KernelArgs)> {
    if m == 0 || n == 0 || k == 0 || a.len() < m * k || b.len() < k * n || c.len() < m * n {
        return Err(crate::shape_err!("gemm m {m}, n {n}, k {k}: empty problem or buffers too small (a {}, b {}, c {})", a.len(), b.len(), c.len()));
    }
    let (cfg, _) = linear_kernel_launch(0, 0, None, 0, m, n, k)?;
    let args =
        KernelArgs::new().ptr(a.ptr()).ptr(b.ptr()).ptr(c.ptr()).i32(m as i32).i32(n as i32).i32(k as i32).i32(ta as i32).i32(tb as i32).f32(1.0).f32(beta);
    Ok((cfg, args))
}

/// Checks buffer sizes of a Linear call (`w_per_elem`: weights per 4-byte element, 1 or 2).
pub(super) fn check_linear_w(x: &Buf, w: &Buf, bias: Option<&Buf>, y: &Buf, m: usize, n: usize, k: usize, w_per_elem: usize) -> Result<()> {
    if m == 0 || n == 0 || k == 0 {
        return Err(crate::shape_err!("linear: empty problem m {m}, n {n}, k {k}"));
    }
    if x.len() < m * k || w.len() * w_per_elem < n * k || y.len() < m * n || bias.is_some_and(|b| b.len() < n) {
        return Err(crate::shape_err!(
            "linear m {m}, n {n}, k {k}: buffers too small (x {}, w {}, y {}, bias {:?})",
            x.len(),
            w.len(),
            y.len(),
            bias.map(|b| b.len())
        ));
    }
    Ok(())
}

pub(super) fn check_linear(x: &Buf, w: &Buf, bias: Option<&Buf>, y: &Buf, m: usize, n: usize, k: usize) -> Result<()> {
    check_linear_w(x, w, bias, y, m, n, k, 1)
}

/// The `linear_f32` kernel (kernels/matmul.cu): its launch configuration and arguments.
pub fn linear_kernel_launch(x: u64, w: u64, bias: Option<u64>, y: u64, m: usize, n: usize, k: usize) -> Result<(LaunchCfg, KernelArgs)> {
    let gy = m.div_ceil(64);
    if gy > 65_535 || m > i32::MAX as usize || n > i32::MAX as usize || k > i32::MAX as usize {
        return Err(crate::shape_err!("linear_f32: m {m}, n {n}, k {k} exceeds the kernel's grid or int range"));
    }
    let cfg = LaunchCfg::new((n.div_ceil(64) as u32, gy as u32, 1), (256, 1, 1), 0);
    let args = KernelArgs::new().ptr(x).ptr(w).ptr(bias.unwrap_or(0)).ptr(y).i32(m as i32).i32(n as i32).i32(k as i32).i32(bias.is_some() as i32);
    Ok((cfg, args))
}
