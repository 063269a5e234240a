// matmul.cu -- Linear on CUDA cores: y = x·Wᵀ (+ bias), the PyTorch-Linear layout, with f32 weights
// (linear_f32), bf16 weights (linear_bf16w) or IEEE f16 weights (linear_f16w), plus the f32 → bf16 /
// f16 conversions the GPU's half-precision cuBLASLt paths feed their GEMM inputs with.
//
// x is [m, k] row-major, W is [n, k] row-major (as stored by HF / PyTorch), y is [m, n] row-major,
// bias is [n] (read only when has_bias != 0; it may then not be NULL). All f32; each output is one
// f32 dot product accumulated in k order (no split-k): results are deterministic.
// The towers' GEMMs go through cuBLASLt on a GPU (src/cuda/gemm.rs); this kernel is the fallback
// when cuBLASLt cannot be loaded, and the GEMM of the emulated backend (src/cuda/backend.rs) that
// runs the whole towers on the CPU emulator in tests.
//
// linear_f32(x, w, bias, y, m, n, k, has_bias):
//   tiles of 64 rows × 64 columns per block, k in steps of 16 through shared memory. The x and W
//   tiles are stored k-major (xs[kk][row], ws[kk][col]) so the inner loop reads a row of each;
//   thread (tx, ty) = (tid % 16, tid / 16) owns the 4×4 outputs rows ty + 16i, cols tx + 16j.
//   Loads are coalesced along k (16 consecutive floats of one row per half-warp); out-of-range
//   rows, columns and k are zero-filled, so any m, n, k >= 1 works.
//   geometry: blockDim = (256, 1, 1) exactly; gridDim = (CEIL_DIV(n, 64), CEIL_DIV(m, 64), 1),
//   gridDim.y <= 65535 (m <= 4,194,240). Static smem 2·16·65·4 = 8,320 B. y must not alias x or W.
//
// linear_bf16w(x, w, bias, y, m, n, k, has_bias): the same with W in bf16 and x rounded to bf16 as
//   it is loaded -- the arithmetic of the bf16 towers (CPU: AVX-512 BF16 GEMM; GPU: cuBLASLt on
//   bf16 inputs): products of bf16 values, accumulated in f32, bias and output f32. Same geometry.
//
// linear_f16w(x, w, bias, y, m, n, k, has_bias): the same with W in IEEE f16 and x rounded to f16
//   (the f16 training forward: `finetune --device cuda --dtype f16`). Same geometry.
//
// gemm_bf16 / gemm_f16 (f32 D) and gemm_bf16_h / gemm_f16_h (16-bit D): gemm_f32 on half inputs with
// f32 accumulation, bias and an added C (see below).
//
// f32_to_bf16(x, y, n): y[i] = bf16(x[i]) (round to nearest even), grid-stride, any 1-D geometry;
//   n is a 64-bit count (long long: ViT-L/14's MLP input at batch 2040 is 2^31 elements), float4
//   loads when aligned, scalar tail.
// f32_to_f16(x, y, n): y[i] = f16(x[i]) (round to nearest even; beyond ±65504 → ±inf), the same.
#include <cuda_runtime.h>
#include "common.cuh"

#define MM_BM 64
#define MM_BN 64
#define MM_BK 16
#define MM_LD (MM_BM + 1)

// The tile loop shared by both variants: LoadX/LoadW read one element as f32 (bf16 rounding
// included for the bf16 variant).
// x is read as X[r, kk] = x[r·k + kk] (or x[kk·m + r] with x_t), w as W[c, kk] = w[c·k + kk] (or
// w[kk·n + c] with w_kn); y = alpha·X·Wᵀ (+ bias) (+ beta·y).
// x rounded to the weights' type (the GEMM's input precision).
__device__ __forceinline__ float round_as(const float*, float v) { return v; }
__device__ __forceinline__ float round_as(const __nv_bfloat16*, float v) { return __bfloat162float(__float2bfloat16(v)); }
__device__ __forceinline__ float round_as(const __half*, float v) { return __half2float(__float2half(v)); }

// The output stored as f32 or rounded to 16 bits (round to nearest even).
__device__ __forceinline__ void store_as(float* y, float v) { *y = v; }
__device__ __forceinline__ void store_as(__nv_bfloat16* y, float v) { *y = __float2bfloat16(v); }
__device__ __forceinline__ void store_as(__half* y, float v) { *y = __float2half(v); }

// cin (f32, may be y itself or NULL): added to every output after the bias (the residual of a
// fused Linear, or the accumulation of a backward GEMM).
template <typename TX, typename TW, bool ROUND_X, typename TY = float>
__device__ __forceinline__ void linear_tiles(const TX* __restrict__ x, const TW* __restrict__ w,
                                             const float* __restrict__ bias, TY* y,
                                             int m, int n, int k, int has_bias, int x_t = 0, int w_kn = 0,
                                             float alpha = 1.f, float beta = 0.f, const float* cin = nullptr) {
  __shared__ float xs[MM_BK][MM_LD];
  __shared__ float ws[MM_BK][MM_LD];
  const int tid = threadIdx.x;
  const int tx = tid & 15, ty = tid >> 4;
  const int row0 = blockIdx.y * MM_BM, col0 = blockIdx.x * MM_BN;
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

  for (int k0 = 0; k0 < k; k0 += MM_BK) {
    // 64×16 elements of each tile, 4 per thread: element e = tid + 256·i is (row e/16, kk e%16)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int e = tid + 256 * i;
      const int r = e >> 4, kk = e & 15;
      const int gk = k0 + kk;
      const int gr = row0 + r, gc = col0 + r;
      float xv = (gr < m && gk < k) ? load_f32(x, x_t ? (size_t)gk * m + gr : (size_t)gr * k + gk) : 0.f;
      if (ROUND_X) xv = round_as(w, xv);
      xs[kk][r] = xv;
      ws[kk][r] = (gc < n && gk < k) ? load_f32(w, w_kn ? (size_t)gk * n + gc : (size_t)gc * k + gk) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < MM_BK; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = xs[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = ws[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();  // the tiles are overwritten by the next step
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = row0 + ty + 16 * i;
    if (r >= m) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int c = col0 + tx + 16 * j;
      if (c >= n) continue;
      const size_t at = (size_t)r * n + c;
      float out = alpha * acc[i][j] + (has_bias ? bias[c] : 0.f);
      if (beta != 0.f) out = fmaf(beta, load_f32(y, at), out);
      if (cin) out += cin[at];
      store_as(y + at, out);
    }
  }
}

extern "C" __global__ void __launch_bounds__(256)
linear_f32(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ bias,
           float* __restrict__ y, int m, int n, int k, int has_bias) {
  linear_tiles<float, float, false>(x, w, bias, y, m, n, k, has_bias);
}

extern "C" __global__ void __launch_bounds__(256)
linear_bf16w(const float* __restrict__ x, const __nv_bfloat16* __restrict__ w, const float* __restrict__ bias,
             float* __restrict__ y, int m, int n, int k, int has_bias) {
  linear_tiles<float, __nv_bfloat16, true>(x, w, bias, y, m, n, k, has_bias);
}

extern "C" __global__ void __launch_bounds__(256)
linear_f16w(const float* __restrict__ x, const __half* __restrict__ w, const float* __restrict__ bias,
            float* __restrict__ y, int m, int n, int k, int has_bias) {
  linear_tiles<float, __half, true>(x, w, bias, y, m, n, k, has_bias);
}

// gemm_f32(a, b, c, m, n, k, ta, tb, alpha, beta): C[m, n] = alpha·op(A)·op(B) + beta·C (f32), with
// A stored [m, k] (or [k, m] when ta) and B stored [k, n] (or [n, k] when tb): the backward GEMMs of
// a Linear layer (dX = dY·W, dW = dYᵀ·X, accumulated with beta = 1). Same tiles and geometry as
// linear_f32; with beta == 0, C is not read.
extern "C" __global__ void __launch_bounds__(256)
gemm_f32(const float* __restrict__ a, const float* __restrict__ b, float* c, int m, int n, int k, int ta, int tb,
         float alpha, float beta) {
  linear_tiles<float, float, false>(a, b, nullptr, c, m, n, k, 0, ta, !tb, alpha, beta);
}

// gemm_bf16 / gemm_f16(a, b, bias, c, d, m, n, k, ta, tb): gemm_f32 with A and B stored in bf16 /
// f16 (packed 16-bit values, as DeviceOps::upload_bf16 stores them): products of half values
// accumulated in f32, D = op(A)·op(B) (+ bias[n] on every row) (+ C) in f32 -- the arithmetic of
// cuBLASLt on CUDA_R_16BF / CUDA_R_16F inputs with CUBLAS_COMPUTE_32F: the half forward Linear
// (ta = 0, tb = 1, bias, C = the residual) and the half backward GEMMs (dX = dY·W from the half
// weight copy, dW = dYᵀ·X from half activations; C = D accumulates). bias and C may be NULL; C
// may be D. Same tiles and geometry as linear_f32.
// gemm_bf16_h / gemm_f16_h(a, b, bias, c, d, ...): the same with D rounded to bf16 / f16 (round
// to nearest even) as it is stored: a Linear whose output only feeds the next 16-bit GEMM or the
// flash attention. c must be NULL (cuBLASLt's C has D's type).
extern "C" __global__ void __launch_bounds__(256)
gemm_bf16(const __nv_bfloat16* __restrict__ a, const __nv_bfloat16* __restrict__ b, const float* __restrict__ bias,
          const float* c, float* d, int m, int n, int k, int ta, int tb) {
  linear_tiles<__nv_bfloat16, __nv_bfloat16, false>(a, b, bias, d, m, n, k, bias != nullptr, ta, !tb, 1.f, 0.f, c);
}

extern "C" __global__ void __launch_bounds__(256)
gemm_f16(const __half* __restrict__ a, const __half* __restrict__ b, const float* __restrict__ bias, const float* c,
         float* d, int m, int n, int k, int ta, int tb) {
  linear_tiles<__half, __half, false>(a, b, bias, d, m, n, k, bias != nullptr, ta, !tb, 1.f, 0.f, c);
}

extern "C" __global__ void __launch_bounds__(256)
gemm_bf16_h(const __nv_bfloat16* __restrict__ a, const __nv_bfloat16* __restrict__ b,
            const float* __restrict__ bias, const float* c, __nv_bfloat16* __restrict__ d, int m, int n, int k,
            int ta, int tb) {
  linear_tiles<__nv_bfloat16, __nv_bfloat16, false, __nv_bfloat16>(a, b, bias, d, m, n, k, bias != nullptr, ta, !tb,
                                                                    1.f, 0.f, c);
}

extern "C" __global__ void __launch_bounds__(256)
gemm_f16_h(const __half* __restrict__ a, const __half* __restrict__ b, const float* __restrict__ bias,
           const float* c, __half* __restrict__ d, int m, int n, int k, int ta, int tb) {
  linear_tiles<__half, __half, false, __half>(a, b, bias, d, m, n, k, bias != nullptr, ta, !tb, 1.f, 0.f, c);
}

// Four f32 → four halves (two 4-byte stores), round to nearest even.
__device__ __forceinline__ void store4(__nv_bfloat16* y, float4 v) {
  reinterpret_cast<__nv_bfloat162*>(y)[0] = __floats2bfloat162_rn(v.x, v.y);
  reinterpret_cast<__nv_bfloat162*>(y)[1] = __floats2bfloat162_rn(v.z, v.w);
}
__device__ __forceinline__ void store4(__half* y, float4 v) {
  reinterpret_cast<__half2*>(y)[0] = __floats2half2_rn(v.x, v.y);
  reinterpret_cast<__half2*>(y)[1] = __floats2half2_rn(v.z, v.w);
}

// Grid-stride conversion with 64-bit sizes: float4 loads and 2 × half2 stores when x is 16-byte
// and y 8-byte aligned (groups of four), the tail (or everything, unaligned) one element a thread.
template <typename TH>
__device__ __forceinline__ void to_half(const float* __restrict__ x, TH* __restrict__ y, long long n) {
  const long long tid = blockIdx.x * (long long)blockDim.x + threadIdx.x, stride = (long long)gridDim.x * blockDim.x;
  long long done = 0;
  if ((reinterpret_cast<size_t>(x) & 15) == 0 && (reinterpret_cast<size_t>(y) & 7) == 0) {
    const long long quads = n / 4;
    for (long long q = tid; q < quads; q += stride) store4(y + 4 * q, reinterpret_cast<const float4*>(x)[q]);
    done = quads * 4;
  }
  for (long long i = done + tid; i < n; i += stride) store_from_f32(y, i, x[i]);
}

extern "C" __global__ void f32_to_bf16(const float* __restrict__ x, __nv_bfloat16* __restrict__ y, long long n) {
  to_half(x, y, n);
}

extern "C" __global__ void f32_to_f16(const float* __restrict__ x, __half* __restrict__ y, long long n) {
  to_half(x, y, n);
}
