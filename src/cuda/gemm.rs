//! cuBLASLt GEMMs with row-major, PyTorch-`Linear` semantics, f32, bf16 or f16 storage
//! ([`DType`]), f32 accumulation, optional fused bias, and a strided-batched form for attention
//! products.
//!
//! Row-major ↔ column-major: cuBLASLt is column-major, and a row-major `R×C` matrix with row
//! stride `ld` is, byte for byte, the column-major `C×R` matrix (its transpose) with the same `ld`.
//! So the row-major product `C = op(A)·op(B)` is computed as the column-major product
//! `Cᵀ = op(B)ᵀ·op(A)ᵀ`: cuBLASLt's "A" is our B buffer and its "B" is our A buffer, with the same
//! transpose flags, and `(m, n)` swapped. For `Linear`, `y[m×n] = x[m×k]·Wᵀ + bias` with W stored
//! `[n×k]` row-major (PyTorch layout), that is `yᵀ = W·xᵀ`: cuBLASLt A = W (op T, stored k×n,
//! ld k), B = x (op N, stored k×m, ld k), D = y (n×m, ld n) — the "TN" layout cuBLASLt favours —
//! and the BIAS epilogue adds a vector of length rows(D) = n to every column, i.e. per output
//! feature, exactly `Linear`'s bias. [`plan`] does this mapping and is tested on the CPU against a
//! reference of cuBLASLt's column-major semantics.
//!
//! Written on `cudarc::cublaslt::result` (raw handles) rather than cudarc's safe `Matmul` trait
//! because the latter (a) has bf16 only with cudarc's `f16` feature, which clipforge does not
//! enable, (b) computes f32 GEMMs in TF32 (`CUBLAS_COMPUTE_32F_FAST_TF32`), (c) takes `CudaSlice`s
//! rather than pool pointers, and (d) runs the heuristic on every call. Here f32 is exact FP32
//! unless [`Gemm::set_allow_tf32`]; algorithms are cached per (plan, types, epilogue, alignment).
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys::{
    self, cublasComputeType_t as Compute, cublasLtEpilogue_t as Epilogue, cublasLtMatmulDescAttributes_t as DescAttr,
    cublasLtMatmulPreferenceAttributes_t as PrefAttr, cublasLtMatrixLayoutAttribute_t as LayoutAttr, cudaDataType_t,
};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use super::device::guarded;
use crate::error::{Error, Result};
use crate::tensor::DType;

/// cuBLASLt's name of an element type in device memory.
fn cuda_type(dt: DType) -> cudaDataType_t {
    match dt {
        DType::F32 => cudaDataType_t::CUDA_R_32F,
        DType::BF16 => cudaDataType_t::CUDA_R_16BF,
        DType::F16 => cudaDataType_t::CUDA_R_16F,
    }
}

/// Row-major strided-batched GEMM, for b in 0..batch:
/// `C_b[m×n] = alpha·op(A_b)·op(B_b) + beta·C_b (+ bias[n] on every row)`.
/// A is stored `[m×k]` (`[k×m]` if `trans_a`), B `[k×n]` (`[n×k]` if `trans_b`); `ld*` are row
/// strides and `stride_*` batch strides, in elements. Bias has the output dtype.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GemmDesc {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub batch: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
    pub stride_a: usize,
    pub stride_b: usize,
    pub stride_c: usize,
    pub alpha: f32,
    pub beta: f32,
    pub in_dtype: DType,
    pub out_dtype: DType,
    pub bias: bool,
}

impl GemmDesc {
    /// Densely packed batched product (strides = matrix sizes), no bias.
    pub fn batched(batch: usize, m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool, dtype: DType) -> Self {
        let lda = if trans_a { m } else { k };
        let ldb = if trans_b { k } else { n };
        Self {
            m,
            n,
            k,
            batch,
            trans_a,
            trans_b,
            lda,
            ldb,
            ldc: n,
            stride_a: m * k,
            stride_b: k * n,
            stride_c: m * n,
            alpha: 1.0,
            beta: 0.0,
            in_dtype: dtype,
            out_dtype: dtype,
            bias: false,
        }
    }
    /// `y[m×n] = x[m×k]·Wᵀ (+ bias)`, W stored `[n×k]`.
    pub fn linear(m: usize, n: usize, k: usize, dtype: DType, bias: bool) -> Self {
        Self { bias, ..Self::batched(1, m, n, k, false, true, dtype) }
    }
}

/// The column-major cuBLASLt problem for a [`GemmDesc`] (cuBLASLt A = our B, B = our A).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LtPlan {
    pub m: u64,
    pub n: u64,
    pub k: u64,
    pub trans_a: bool,
    pub trans_b: bool,
    /// Stored (rows, cols, ld) of cuBLASLt's A, B and C/D.
    pub a: (u64, u64, i64),
    pub b: (u64, u64, i64),
    pub c: (u64, u64, i64),
    pub batch: i32,
    pub stride_a: i64,
    pub stride_b: i64,
    pub stride_c: i64,
}

/// Validates `d` and maps it to cuBLASLt's column-major problem (see the module docs).
pub fn plan(d: &GemmDesc) -> Result<LtPlan> {
    let bad = |what: &str| Err(crate::shape_err!("gemm {d:?}: {what}"));
    if d.m == 0 || d.n == 0 || d.k == 0 || d.batch == 0 {
        return bad("zero dimension");
    }
    if d.in_dtype == DType::F32 && d.out_dtype != DType::F32 {
        return bad("f32 inputs with a half-precision output is not a cuBLASLt combination");
    }
    let (a_rows, a_cols) = if d.trans_a { (d.k, d.m) } else { (d.m, d.k) };
    let (b_rows, b_cols) = if d.trans_b { (d.n, d.k) } else { (d.k, d.n) };
    if d.lda < a_cols || d.ldb < b_cols || d.ldc < d.n {
        return bad("leading dimension smaller than the row length");
    }
    // Outputs must not overlap: batches stacked (whole matrices) or side by side within rows.
    let stacked = d.stride_c >= d.m * d.ldc;
    let side_by_side = d.stride_c >= d.n && (d.batch - 1) * d.stride_c + d.n <= d.ldc;
    if d.batch > 1 && !stacked && !side_by_side {
        return bad("output batches may overlap");
    }
    let u = |v: usize| v as u64;
    let i = |v: usize| i64::try_from(v).map_err(|_| crate::shape_err!("gemm {d:?}: value overflows i64"));
    Ok(LtPlan {
        m: u(d.n),
        n: u(d.m),
        k: u(d.k),
        trans_a: d.trans_b,
        trans_b: d.trans_a,
        a: (u(b_cols), u(b_rows), i(d.ldb)?),
        b: (u(a_cols), u(a_rows), i(d.lda)?),
        c: (u(d.n), u(d.m), i(d.ldc)?),
        batch: i32::try_from(d.batch).map_err(|_| crate::shape_err!("batch overflows i32"))?,
        stride_a: i(d.stride_b)?,
        stride_b: i(d.stride_a)?,
        stride_c: i(d.stride_c)?,
    })
}

/// Largest power of two (≤ 256) dividing `p`, as cuBLASLt's MIN_ALIGNMENT preferences expect.
pub fn ptr_alignment(p: u64) -> u32 {
    if p == 0 {
        256
    } else {
        1u32 << p.trailing_zeros().min(8)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct AlgoKey {
    plan: LtPlan,
    types: (DType, DType),
    tf32: bool,
    bias: bool,
    beta_zero: bool,
    align: [u32; 3],
}

macro_rules! raii {
    ($name:ident, $ty:ty, $destroy:path) => {
        struct $name($ty);
        impl Drop for $name {
            fn drop(&mut self) {
                // SAFETY: the handle was created by the matching cublasLt *Create call and is
                // destroyed exactly once, here; errors on destroy are ignored (never panic in Drop).
                let _ = unsafe { $destroy(self.0) };
            }
        }
    };
}
raii!(Desc, sys::cublasLtMatmulDesc_t, lt::destroy_matmul_desc);
raii!(Layout, sys::cublasLtMatrixLayout_t, lt::destroy_matrix_layout);
raii!(Pref, sys::cublasLtMatmulPreference_t, lt::destroy_matmul_pref);

/// Typed attribute setters: `buf` points at a live `T` of exactly the size cuBLASLt expects.
fn set_desc<T>(d: &Desc, attr: DescAttr, v: &T) -> Result<()> {
    // SAFETY: `d.0` is a live descriptor; `v` is valid for size_of::<T>() bytes during the call.
    guarded("cublasLtMatmulDescSetAttribute", || unsafe { lt::set_matmul_desc_attribute(d.0, attr, (v as *const T).cast(), std::mem::size_of::<T>()) })
}
fn set_layout<T>(l: &Layout, attr: LayoutAttr, v: &T) -> Result<()> {
    // SAFETY: as in set_desc, for a live layout.
    guarded("cublasLtMatrixLayoutSetAttribute", || unsafe { lt::set_matrix_layout_attribute(l.0, attr, (v as *const T).cast(), std::mem::size_of::<T>()) })
}
fn set_pref<T>(p: &Pref, attr: PrefAttr, v: &T) -> Result<()> {
    // SAFETY: as in set_desc, for a live preference.
    guarded("cublasLtMatmulPreferenceSetAttribute", || unsafe { lt::set_matmul_pref_attribute(p.0, attr, (v as *const T).cast(), std::mem::size_of::<T>()) })
}

fn layout(dt: DType, (rows, cols, ld): (u64, u64, i64), batch: i32, stride: i64) -> Result<Layout> {
    let l = Layout(guarded("cublasLtMatrixLayoutCreate", || lt::create_matrix_layout(cuda_type(dt), rows, cols, ld))?);
    if batch > 1 {
        set_layout(&l, LayoutAttr::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &batch)?;
        set_layout(&l, LayoutAttr::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride)?;
    }
    Ok(l)
}

/// A cuBLASLt handle + workspace bound to one stream, with an algorithm cache.
pub struct Gemm {
    handle: sys::cublasLtHandle_t,
    stream: Arc<CudaStream>,
    _workspace: CudaSlice<u8>,
    workspace_ptr: u64,
    workspace_size: usize,
    allow_tf32: bool,
    algos: Mutex<HashMap<AlgoKey, sys::cublasLtMatmulAlgo_t>>,
}

// SAFETY: the cuBLASLt handle may be used from any thread; calls on it are serialised onto one
// stream, and the algorithm cache is behind a Mutex (cudarc marks its CudaBlasLT Send + Sync too).
unsafe impl Send for Gemm {}
// SAFETY: see Send.
unsafe impl Sync for Gemm {}

impl Gemm {
    /// Creates the handle and a workspace (32 MiB on sm_90+, else 4 MiB, NVIDIA's advice).
    pub fn new(stream: Arc<CudaStream>, sm: u32) -> Result<Self> {
        // SAFETY: only probes whether libcublasLt can be dlopen'ed; calls nothing in it.
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::device("cuBLASLt library (libcublasLt.so) not found"));
        }
        let workspace_size: usize = if sm >= 90 { 32 << 20 } else { 4 << 20 };
        // SAFETY: workspace contents are scratch for cuBLASLt; uninitialised is fine.
        let ws = guarded("cuMemAlloc(workspace)", || unsafe { stream.alloc::<u8>(workspace_size) })?;
        let (workspace_ptr, _g) = ws.device_ptr(&stream);
        drop(_g);
        guarded("binding context", || stream.context().bind_to_thread())?;
        let handle = guarded("cublasLtCreate", lt::create_handle)?;
        Ok(Self { handle, stream, _workspace: ws, workspace_ptr, workspace_size, allow_tf32: false, algos: Mutex::new(HashMap::new()) })
    }

    /// Lets f32 GEMMs use TF32 tensor cores (faster, ~1e-3 relative error).
    pub fn set_allow_tf32(&mut self, on: bool) {
        self.allow_tf32 = on;
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// `y[m×n] = x[m×k]·Wᵀ (+ bias[n])` with W `[n×k]`; all tensors of `dtype`.
    #[allow(clippy::too_many_arguments)]
    pub fn linear(&self, x: u64, w: u64, bias: Option<u64>, y: u64, m: usize, n: usize, k: usize, dtype: DType) -> Result<()> {
        self.run(&GemmDesc::linear(m, n, k, dtype, bias.is_some()), x, w, y, bias)
    }

    /// Runs `d` on device buffers `a`, `b`, `c` (and `bias` iff `d.bias`), C read and written in
    /// place. Asynchronous.
    pub fn run(&self, d: &GemmDesc, a: u64, b: u64, c: u64, bias: Option<u64>) -> Result<()> {
        self.run_cd(d, a, b, c, c, bias)
    }

    /// Runs `d` with C read from `c` (when `d.beta` ≠ 0) and the result written to `dst` (which may
    /// be `c`): D = alpha·op(A)·op(B) + beta·C (+ bias). A bias is f32 whatever the output type
    /// (CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE = CUDA_R_32F, the scale type, for 16-bit D).
    pub fn run_cd(&self, d: &GemmDesc, a: u64, b: u64, c: u64, dst: u64, bias: Option<u64>) -> Result<()> {
        let p = plan(d)?;
        if d.bias != bias.is_some() {
            return Err(Error::msg(format!("gemm: desc.bias = {} but bias pointer {:?}", d.bias, bias)));
        }
        // cuBLASLt operands: A' = our B, B' = our A.
        let batch_align = |ptr: u64, stride: usize, es: usize| {
            let s = if d.batch > 1 { ptr_alignment((stride * es) as u64) } else { 256 };
            ptr_alignment(ptr).min(s)
        };
        let (ies, oes) = (d.in_dtype.size(), d.out_dtype.size());
        let align = [batch_align(b, d.stride_b, ies), batch_align(a, d.stride_a, ies), batch_align(c, d.stride_c, oes).min(batch_align(dst, d.stride_c, oes))];
        let tf32 = self.allow_tf32 && d.in_dtype == DType::F32;
        let compute = if tf32 { Compute::CUBLAS_COMPUTE_32F_FAST_TF32 } else { Compute::CUBLAS_COMPUTE_32F };
        let key = AlgoKey { plan: p, types: (d.in_dtype, d.out_dtype), tf32, bias: d.bias, beta_zero: d.beta == 0.0, align };

        guarded("binding context", || self.stream.context().bind_to_thread())?;
        let desc = Desc(guarded("cublasLtMatmulDescCreate", || lt::create_matmul_desc(compute, cudaDataType_t::CUDA_R_32F))?);
        set_desc(&desc, DescAttr::CUBLASLT_MATMUL_DESC_TRANSA, &(p.trans_a as i32))?;
        set_desc(&desc, DescAttr::CUBLASLT_MATMUL_DESC_TRANSB, &(p.trans_b as i32))?;
        let epilogue = if let Some(bp) = bias {
            set_desc(&desc, DescAttr::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bp)?;
            if d.out_dtype != DType::F32 {
                set_desc(&desc, DescAttr::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &(cudaDataType_t::CUDA_R_32F as i32))?;
            }
            Epilogue::CUBLASLT_EPILOGUE_BIAS
        } else {
            Epilogue::CUBLASLT_EPILOGUE_DEFAULT
        };
        set_desc(&desc, DescAttr::CUBLASLT_MATMUL_DESC_EPILOGUE, &(epilogue as u32))?;
        let la = layout(d.in_dtype, p.a, p.batch, p.stride_a)?;
        let lb = layout(d.in_dtype, p.b, p.batch, p.stride_b)?;
        let lc = layout(d.out_dtype, p.c, p.batch, p.stride_c)?;

        let cached = self.algos.lock().unwrap_or_else(|e| e.into_inner()).get(&key).copied();
        let algo = match cached {
            Some(a) => a,
            None => {
                let pref = Pref(guarded("cublasLtMatmulPreferenceCreate", lt::create_matmul_pref)?);
                set_pref(&pref, PrefAttr::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &(self.workspace_size as u64))?;
                let attrs = [
                    PrefAttr::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                    PrefAttr::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                    PrefAttr::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                    PrefAttr::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                ];
                for (attr, al) in attrs.into_iter().zip([align[0], align[1], align[2], align[2]]) {
                    set_pref(&pref, attr, &al)?;
                }
                // SAFETY: all descriptors are live; cudarc writes one heuristic result.
                let h =
                    guarded("cublasLtMatmulAlgoGetHeuristic", || unsafe { lt::get_matmul_algo_heuristic(self.handle, desc.0, la.0, lb.0, lc.0, lc.0, pref.0) })
                        .map_err(|e| Error::device(format!("{} (no cuBLASLt algorithm for {d:?})", e.message())))?;
                self.algos.lock().unwrap_or_else(|e| e.into_inner()).insert(key, h.algo);
                h.algo
            }
        };
        let (alpha, beta) = (d.alpha, d.beta);
        // SAFETY: descriptors/layouts are live and describe the buffers (the caller guarantees
        // a, b, c, bias are device allocations of this context large enough for `d`); alpha/beta
        // are host f32 (default pointer mode, f32 scale type); the workspace is ours, of
        // `workspace_size` bytes, used only on this stream; C and D have the same layout (they
        // alias for an in-place beta, or D is a separate buffer of the same size).
        guarded("cublasLtMatmul", || unsafe {
            lt::matmul(
                self.handle,
                desc.0,
                (&alpha as *const f32).cast(),
                (&beta as *const f32).cast(),
                b as *const c_void,
                la.0,
                a as *const c_void,
                lb.0,
                c as *const c_void,
                lc.0,
                dst as *mut c_void,
                lc.0,
                &algo,
                self.workspace_ptr as *mut c_void,
                self.workspace_size,
                self.stream.cu_stream() as sys::cudaStream_t,
            )
        })
    }
}

impl Drop for Gemm {
    fn drop(&mut self) {
        let _ = self.stream.synchronize(); // the workspace is freed right after this
                                           // SAFETY: `handle` came from cublasLtCreate and is destroyed exactly once.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

#[cfg(test)]
#[path = "gemm_tests.rs"]
mod tests;
