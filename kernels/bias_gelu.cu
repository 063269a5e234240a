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

#define ACT_QUICK_GELU 0
#define ACT_GELU 1

template <int ACT>
__device__ __forceinline__ float act_fwd(float x) {
  if (ACT == ACT_QUICK_GELU) return x / (1.f + expf(-1.702f * x));
  return 0.5f * x * (1.f + erff(x * 0.70710678118654752f));
}

template <int ACT>
__device__ __forceinline__ float act_grad(float x) {
  if (ACT == ACT_QUICK_GELU) {
    const float s = 1.f / (1.f + expf(-1.702f * x));
    return s + 1.702f * x * s * (1.f - s);
  }
  const float cdf = 0.5f * (1.f + erff(x * 0.70710678118654752f));
  const float pdf = 0.39894228040143268f * expf(-0.5f * x * x);  // 1/sqrt(2 pi) e^(-x^2/2)
  return cdf + x * pdf;
}

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
