// bias_gelu.cu -- bias add + activation after a GEMM (MLP fc1), and its backward.
//
// Activations: quick_gelu(x) = x * sigmoid(1.702 x)            (OpenAI CLIP)
//              gelu(x)       = 0.5 x (1 + erf(x / sqrt(2)))      (exact erf form, HF "gelu")
// Tensors are row-major [rows, n]; the bias b is [n] and always f32 (NULL = no bias);
// math is f32; the _bf16 variants read/write __nv_bfloat16 tensors.
//
// Forward  <act>_fwd(y, b, pre, rows, n): in place on y (the GEMM output without bias):
//          pre[i] = y[i] + b[c] (only if pre != NULL, saved for the backward), y[i] = act(y[i] + b[c]).
//          pre must not alias y.
// Backward <act>_bwd(dy, pre, dpre, dbias_partial, rows, n): dpre[i] = dy[i] * act'(pre[i]);
//          dpre may alias dy (in place). If dbias_partial != NULL, dbias_partial[blockIdx.y, c] =
//          sum of dpre[r, c] (f32, before rounding to T) over the rows r = blockIdx.y + k*gridDim.y:
//          DETERMINISTIC PER-BLOCK-ROW PARTIAL SUMS, [gridDim.y, n]; bias_grad_reduce_f32 sums them.
// geometry (fwd and bwd): blockDim = (256, 1, 1) (any multiple of 32 works), one thread per
//          column c = blockIdx.x*blockDim.x + threadIdx.x; gridDim.x = CEIL_DIV(n, blockDim.x);
//          gridDim.y = G in [1, 65535], rows strided by G (e.g. G = min(rows, 64)).
// Reduce   bias_grad_reduce_f32(partial, dbias, nparts, n): dbias[c] = sum_p partial[p, c].
//          geometry: blockDim = (256, 1, 1), gridDim.x = CEIL_DIV(n, 256).
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "common.cuh"
#include "act.cuh"

template <int ACT, typename T>
__device__ __forceinline__ void bias_act_fwd(T* y, const float* __restrict__ b, T* pre, int rows, int n) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= n) return;  // no barriers below
  const float bc = b ? b[c] : 0.f;
  for (int r = blockIdx.y; r < rows; r += gridDim.y) {
    const size_t i = (size_t)r * n + c;
    const float v = load_f32(y, i) + bc;
    if (pre) store_from_f32(pre, i, v);
    store_from_f32(y, i, act_fwd<ACT>(v));
  }
}

template <int ACT, typename T>
__device__ __forceinline__ void bias_act_bwd(const T* dy, const T* __restrict__ pre, T* dpre,
                                             float* __restrict__ dbias_partial, int rows, int n) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= n) return;
  float acc = 0.f;
  for (int r = blockIdx.y; r < rows; r += gridDim.y) {
    const size_t i = (size_t)r * n + c;
    const float g = load_f32(dy, i) * act_grad<ACT>(load_f32(pre, i));
    store_from_f32(dpre, i, g);  // same element just read: in place is safe
    acc += g;
  }
  if (dbias_partial) dbias_partial[(size_t)blockIdx.y * n + c] = acc;
}

extern "C" __global__ void bias_quick_gelu_fwd_f32(float* y, const float* __restrict__ b, float* pre, int rows, int n) {
  bias_act_fwd<ACT_QUICK_GELU, float>(y, b, pre, rows, n);
}
extern "C" __global__ void bias_quick_gelu_fwd_bf16(__nv_bfloat16* y, const float* __restrict__ b, __nv_bfloat16* pre,
                                                    int rows, int n) {
  bias_act_fwd<ACT_QUICK_GELU, __nv_bfloat16>(y, b, pre, rows, n);
}

extern "C" __global__ void bias_quick_gelu_fwd_f16(__half* y, const float* __restrict__ b, __half* pre,
                                                    int rows, int n) {
  bias_act_fwd<ACT_QUICK_GELU, __half>(y, b, pre, rows, n);
}
extern "C" __global__ void bias_gelu_fwd_f32(float* y, const float* __restrict__ b, float* pre, int rows, int n) {
  bias_act_fwd<ACT_GELU, float>(y, b, pre, rows, n);
}
extern "C" __global__ void bias_gelu_fwd_bf16(__nv_bfloat16* y, const float* __restrict__ b, __nv_bfloat16* pre,
                                              int rows, int n) {
  bias_act_fwd<ACT_GELU, __nv_bfloat16>(y, b, pre, rows, n);
}

extern "C" __global__ void bias_gelu_fwd_f16(__half* y, const float* __restrict__ b, __half* pre,
                                              int rows, int n) {
  bias_act_fwd<ACT_GELU, __half>(y, b, pre, rows, n);
}

extern "C" __global__ void bias_quick_gelu_bwd_f32(const float* dy, const float* __restrict__ pre, float* dpre,
                                                   float* __restrict__ dbias_partial, int rows, int n) {
  bias_act_bwd<ACT_QUICK_GELU, float>(dy, pre, dpre, dbias_partial, rows, n);
}
extern "C" __global__ void bias_quick_gelu_bwd_bf16(const __nv_bfloat16* dy, const __nv_bfloat16* __restrict__ pre,
                                                    __nv_bfloat16* dpre, float* __restrict__ dbias_partial, int rows,
                                                    int n) {
  bias_act_bwd<ACT_QUICK_GELU, __nv_bfloat16>(dy, pre, dpre, dbias_partial, rows, n);
}

extern "C" __global__ void bias_quick_gelu_bwd_f16(const __half* dy, const __half* __restrict__ pre,
                                                    __half* dpre, float* __restrict__ dbias_partial, int rows,
                                                    int n) {
  bias_act_bwd<ACT_QUICK_GELU, __half>(dy, pre, dpre, dbias_partial, rows, n);
}
extern "C" __global__ void bias_gelu_bwd_f32(const float* dy, const float* __restrict__ pre, float* dpre,
                                             float* __restrict__ dbias_partial, int rows, int n) {
  bias_act_bwd<ACT_GELU, float>(dy, pre, dpre, dbias_partial, rows, n);
}
extern "C" __global__ void bias_gelu_bwd_bf16(const __nv_bfloat16* dy, const __nv_bfloat16* __restrict__ pre,
                                              __nv_bfloat16* dpre, float* __restrict__ dbias_partial, int rows, int n) {
  bias_act_bwd<ACT_GELU, __nv_bfloat16>(dy, pre, dpre, dbias_partial, rows, n);
}

extern "C" __global__ void bias_gelu_bwd_f16(const __half* dy, const __half* __restrict__ pre,
                                              __half* dpre, float* __restrict__ dbias_partial, int rows, int n) {
  bias_act_bwd<ACT_GELU, __half>(dy, pre, dpre, dbias_partial, rows, n);
}

extern "C" __global__ void bias_grad_reduce_f32(const float* __restrict__ partial, float* __restrict__ dbias,
                                                int nparts, int n) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= n) return;
  float s = 0.f;
  for (int p = 0; p < nparts; ++p) s += partial[(size_t)p * n + c];
  dbias[c] = s;
}

// ---- the device backend's bias + activation (f32 activations, optional half copy), vectorized ----
//
// bias_act_fwd_f32v(y, b, pre, rows, n, act, vec) and _hbf16 / _hf16 (y, b, pre, yh, rows, n, act,
//   vec): y[i] = act(y[i] + b[c]) in place, pre[i] = y[i] + b[c] when pre != NULL, and (the _h
//   variants) yh[i] = the output rounded to bf16 / f16: the next GEMM's half input, written here
//   instead of by a conversion pass. act: 0 quick_gelu, 1 gelu. pre, yh must not alias y or b.
// bias_act_bwd_f32v(dy, pre, dpre, partial, rows, n, act, vec): dpre[i] = dy[i]·act'(pre[i]) and
//   partial[blockIdx.y, c] = the sum of dpre[r, c] over block row blockIdx.y's row chunk, in row
//   order (zero for an empty chunk): DETERMINISTIC partials, [gridDim.y, n], summed by
//   col_reduce_f32. dpre must not alias dy or pre.
// geometry (both): blockDim = (256, 1, 1); with vec != 0 each thread owns four consecutive columns
//   (float4 loads and stores; the caller guarantees n % 4 == 0 and 16-byte aligned y, b, pre, dy,
//   dpre and 8-byte aligned yh), else one column: gridDim.x = CEIL_DIV(n, 256·(vec ? 4 : 1));
//   gridDim.y = P ∈ [1, 65535] row chunks of CEIL_DIV(rows, P) consecutive rows (the caller sizes
//   P from the work: ≥ one wave of blocks where rows allow).
// col_sums_partial_f32(m, partial, rows, n): partial[p, c] = sum of m[r, c] over row chunk p
//   (CEIL_DIV(rows, gridDim.y) rows, in order; zero if empty). blockDim = (256, 1, 1),
//   gridDim = (CEIL_DIV(n, 256), P): the first stage of a column sum (bias gradients).
// col_reduce_f32(partial, out, parts, n): out[c] = sum over p of partial[p, c] in a fixed tree:
//   thread (tx, ty) of a block of C × R threads (C = blockDim.x columns, R = blockDim.y a power of
//   two, C·R ≤ 1024) sums p ≡ ty mod R in order, then the R sums of a column are added pairwise
//   in shared memory (s[ty] += s[ty + h] for h = R/2, R/4, ..., 1): bitwise reproducible for a
//   given (parts, n, blockDim), whatever the schedule. gridDim.x = CEIL_DIV(n, C); a warp reads
//   32/C rows of C consecutive columns (C = 8: whole 32-byte sectors). The launcher
//   (train_ops::col_reduce_cfg) picks C ∈ {4, 8} for ≥ 132 blocks at n ≥ 528 and R ≈ parts / 4
//   (≤ 1024 / C) so a column's parts are spread over many threads: one wave of an H100 for
//   n = 768…4096 and parts up to ~2100.

__device__ __forceinline__ void bias_store4(float*, size_t, float4) {}
__device__ __forceinline__ void bias_store4(__nv_bfloat16* y, size_t i, float4 v) {
  reinterpret_cast<__nv_bfloat162*>(y + i)[0] = __floats2bfloat162_rn(v.x, v.y);
  reinterpret_cast<__nv_bfloat162*>(y + i)[1] = __floats2bfloat162_rn(v.z, v.w);
}
__device__ __forceinline__ void bias_store4(__half* y, size_t i, float4 v) {
  reinterpret_cast<__half2*>(y + i)[0] = __floats2half2_rn(v.x, v.y);
  reinterpret_cast<__half2*>(y + i)[1] = __floats2half2_rn(v.z, v.w);
}

template <typename TH>
__device__ __forceinline__ void bias_act_fwd_v(float* __restrict__ y, const float* __restrict__ b, float* __restrict__ pre,
                                               TH* __restrict__ yh, int rows, int n, int act, int vec) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  int r0, r1;
  row_chunk(rows, r0, r1);
  if (vec) {
    const int c = 4 * t;
    if (c >= n) return;  // no barriers in this kernel
    const float4 bc = b ? reinterpret_cast<const float4*>(b + c)[0] : make_float4(0.f, 0.f, 0.f, 0.f);
    for (int r = r0; r < r1; ++r) {
      const size_t i = (size_t)r * n + c;
      float4 v = reinterpret_cast<const float4*>(y + i)[0];
      v.x += bc.x;
      v.y += bc.y;
      v.z += bc.z;
      v.w += bc.w;
      if (pre) reinterpret_cast<float4*>(pre + i)[0] = v;
      const float4 o = make_float4(act_rt(v.x, act), act_rt(v.y, act), act_rt(v.z, act), act_rt(v.w, act));
      reinterpret_cast<float4*>(y + i)[0] = o;
      if (yh) bias_store4(yh, i, o);
    }
    return;
  }
  const int c = t;
  if (c >= n) return;
  const float bc = b ? b[c] : 0.f;
  for (int r = r0; r < r1; ++r) {
    const size_t i = (size_t)r * n + c;
    const float v = y[i] + bc;
    if (pre) pre[i] = v;
    const float o = act_rt(v, act);
    y[i] = o;
    if (yh) store_from_f32(yh, i, o);
  }
}

extern "C" __global__ void bias_act_fwd_f32v(float* __restrict__ y, const float* __restrict__ b, float* __restrict__ pre,
                                             int rows, int n, int act, int vec) {
  bias_act_fwd_v<float>(y, b, pre, nullptr, rows, n, act, vec);
}
extern "C" __global__ void bias_act_fwd_f32_hbf16(float* __restrict__ y, const float* __restrict__ b,
                                                  float* __restrict__ pre, __nv_bfloat16* __restrict__ yh, int rows, int n,
                                                  int act, int vec) {
  bias_act_fwd_v<__nv_bfloat16>(y, b, pre, yh, rows, n, act, vec);
}
extern "C" __global__ void bias_act_fwd_f32_hf16(float* __restrict__ y, const float* __restrict__ b,
                                                 float* __restrict__ pre, __half* __restrict__ yh, int rows, int n,
                                                 int act, int vec) {
  bias_act_fwd_v<__half>(y, b, pre, yh, rows, n, act, vec);
}

extern "C" __global__ void bias_act_bwd_f32v(const float* __restrict__ dy, const float* __restrict__ pre,
                                             float* __restrict__ dpre, float* __restrict__ partial, int rows, int n,
                                             int act, int vec) {
  act_bwd_cols<float>(dy, pre, dpre, partial, rows, n, act, vec);
}

extern "C" __global__ void col_sums_partial_f32(const float* __restrict__ m, float* __restrict__ partial, int rows, int n) {
  col_sums_cols<float>(m, partial, rows, n, 0);
}

extern "C" __global__ void __launch_bounds__(1024) col_reduce_f32(const float* __restrict__ partial, float* __restrict__ out,
                                                                 int parts, int n) {
  __shared__ float s[1024];
  const int C = blockDim.x, R = blockDim.y, tx = threadIdx.x, ty = threadIdx.y;
  const int c = blockIdx.x * C + tx;
  float acc = 0.f;
  if (c < n)
    for (int p = ty; p < parts; p += R) acc += partial[(size_t)p * n + c];
  s[ty * C + tx] = acc;
  __syncthreads();
  for (int h = R >> 1; h > 0; h >>= 1) {  // the same tree in every block: a fixed order of additions
    if (ty < h) s[ty * C + tx] += s[(ty + h) * C + tx];
    __syncthreads();
  }
  if (ty == 0 && c < n) out[c] = s[tx];
}
