// act.cuh -- what the f32 activation kernels (bias_gelu.cu) and the 16-bit ones (half_act.cu)
// share: the two activations and their derivatives in f32, the packing of 16-bit values, and the
// bodies of the backward (dpre = dout·act'(pre) with per-row-chunk column partials) and of the
// column-sum partials, written once for f32 and 16-bit tensors.
//   quick_gelu(x) = x·σ(1.702x) (OpenAI CLIP); gelu(x) = 0.5x(1 + erf(x/√2)) (exact erf, HF "gelu").
// Row chunks: block row blockIdx.y owns rows [r0, r1) = CEIL_DIV(rows, gridDim.y) consecutive rows
// (row_chunk), summed in row order, so the partials [gridDim.y, n] are deterministic.
#pragma once
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

__device__ __forceinline__ float act_rt(float x, int act) {
  return act ? act_fwd<ACT_GELU>(x) : act_fwd<ACT_QUICK_GELU>(x);
}
__device__ __forceinline__ float act_grad_rt(float x, int act) {
  return act ? act_grad<ACT_GELU>(x) : act_grad<ACT_QUICK_GELU>(x);
}

__device__ __forceinline__ void row_chunk(int rows, int& r0, int& r1) {
  const int chunk = CEIL_DIV(rows, (int)gridDim.y);
  r0 = min(rows, (int)blockIdx.y * chunk);
  r1 = min(rows, r0 + chunk);
}

// One 16-bit value <-> f32 (stores round to nearest even); eight packed halves (one 16-byte word)
// <-> eight floats, element j in bits 16·(j mod 2) of word j / 2 (little endian, as the arrays).
__device__ __forceinline__ float h2f(unsigned short u, const __nv_bfloat16*) { return __bfloat162float(__ushort_as_bfloat16(u)); }
__device__ __forceinline__ float h2f(unsigned short u, const __half*) { return __half2float(__ushort_as_half(u)); }
__device__ __forceinline__ unsigned f2h(float v, const __nv_bfloat16*) { return __bfloat16_as_ushort(__float2bfloat16(v)); }
__device__ __forceinline__ unsigned f2h(float v, const __half*) { return __half_as_ushort(__float2half(v)); }

template <typename TH>
__device__ __forceinline__ void unpack8(uint4 u, float* f) {
  const TH* tag = nullptr;
  const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    f[2 * j] = h2f((unsigned short)(w[j] & 0xffffu), tag);
    f[2 * j + 1] = h2f((unsigned short)(w[j] >> 16), tag);
  }
}
template <typename TH>
__device__ __forceinline__ uint4 pack8(const float* f) {
  const TH* tag = nullptr;
  unsigned w[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) w[j] = f2h(f[2 * j], tag) | (f2h(f[2 * j + 1], tag) << 16);
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// Four packed halves (one 8-byte word) <-> four floats.
template <typename TH>
__device__ __forceinline__ float4 unpack4(uint2 u) {
  const TH* tag = nullptr;
  return make_float4(h2f((unsigned short)(u.x & 0xffffu), tag), h2f((unsigned short)(u.x >> 16), tag),
                     h2f((unsigned short)(u.y & 0xffffu), tag), h2f((unsigned short)(u.y >> 16), tag));
}
template <typename TH>
__device__ __forceinline__ uint2 pack4(float4 f) {
  const TH* tag = nullptr;
  return make_uint2(f2h(f.x, tag) | (f2h(f.y, tag) << 16), f2h(f.z, tag) | (f2h(f.w, tag) << 16));
}

// Four consecutive values as floats and back: f32 one 16-byte float4, 16-bit one 8-byte word.
__device__ __forceinline__ float4 load4(const float* p, size_t i) { return reinterpret_cast<const float4*>(p + i)[0]; }
__device__ __forceinline__ void store4(float* p, size_t i, float4 v) { reinterpret_cast<float4*>(p + i)[0] = v; }
template <typename TH>
__device__ __forceinline__ float4 load4(const TH* p, size_t i) {
  return unpack4<TH>(reinterpret_cast<const uint2*>(p + i)[0]);
}
template <typename TH>
__device__ __forceinline__ void store4(TH* p, size_t i, float4 v) {
  reinterpret_cast<uint2*>(p + i)[0] = pack4<TH>(v);
}

// g = dout[i]·act'(pre[i]) in f32, du[i] = g (rounded to T), partial[blockIdx.y, c] = the sum of the
// unrounded g over this block row's chunk; four columns a thread with vec (n % 4 == 0), else one.
template <typename T>
__device__ __forceinline__ void act_bwd_cols(const float* __restrict__ dout, const T* __restrict__ pre, T* __restrict__ du,
                                             float* __restrict__ partial, int rows, int n, int act, int vec) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  int r0, r1;
  row_chunk(rows, r0, r1);
  if (vec) {
    const int c = 4 * t;
    if (c >= n) return;  // no barriers in these kernels
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int r = r0; r < r1; ++r) {
      const size_t i = (size_t)r * n + c;
      const float4 d = load4(dout, i), p = load4(pre, i);
      const float4 g = make_float4(d.x * act_grad_rt(p.x, act), d.y * act_grad_rt(p.y, act), d.z * act_grad_rt(p.z, act),
                                   d.w * act_grad_rt(p.w, act));
      store4(du, i, g);
      acc.x += g.x;
      acc.y += g.y;
      acc.z += g.z;
      acc.w += g.w;
    }
    store4(partial, (size_t)blockIdx.y * n + c, acc);
    return;
  }
  const int c = t;
  if (c >= n) return;
  float acc = 0.f;
  for (int r = r0; r < r1; ++r) {
    const size_t i = (size_t)r * n + c;
    const float g = dout[i] * act_grad_rt(load_f32(pre, i), act);
    store_from_f32(du, i, g);
    acc += g;
  }
  partial[(size_t)blockIdx.y * n + c] = acc;
}

// partial[blockIdx.y, c] = the f32 sum of m[r, c] over this block row's chunk; four columns a
// thread with vec (n % 4 == 0), else one.
template <typename T>
__device__ __forceinline__ void col_sums_cols(const T* __restrict__ m, float* __restrict__ partial, int rows, int n, int vec) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  int r0, r1;
  row_chunk(rows, r0, r1);
  if (vec) {
    const int c = 4 * t;
    if (c >= n) return;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int r = r0; r < r1; ++r) {
      const float4 f = load4(m, (size_t)r * n + c);
      acc.x += f.x;
      acc.y += f.y;
      acc.z += f.z;
      acc.w += f.w;
    }
    store4(partial, (size_t)blockIdx.y * n + c, acc);
    return;
  }
  const int c = t;
  if (c >= n) return;
  float acc = 0.f;
  for (int r = r0; r < r1; ++r) acc += load_f32(m, (size_t)r * n + c);
  partial[(size_t)blockIdx.y * n + c] = acc;
}
