// half_act.cu -- the activation between the MLP GEMMs on 16-bit activations (bf16 / f16), its
// backward, and column sums of a 16-bit matrix: the bf16 device path keeps activations in 16 bit
// between GEMMs (the GEMM epilogue has already added the bias). Math is f32; every 16-bit store
// rounds to nearest even (__floats2bfloat162_rn / __floats2half2_rn / __float2bfloat16 /
// __float2half). Tensors are row-major [rows, n]; 16-bit tensors are packed two per 4-byte word.
// act: 0 quick_gelu x·σ(1.702x), 1 gelu (erf form): the same math as bias_act_fwd_f32v of
// bias_gelu.cu.
//
// act_fwd_hbf16 / act_fwd_hf16(pre, out, rows, n, act, vec): out[i] = act(pre[i]) over the
//   rows·n elements (64-bit index), grid-stride, any 1-D geometry (blockDim 256). With vec != 0
//   groups of eight halves move as one 16-byte load and store (the caller guarantees pre and out
//   16-byte aligned); a tail of rows·n mod 8 (or everything with vec == 0) one element a thread.
//   out must not alias pre.
// act_bwd_hbf16 / act_bwd_hf16(dout, pre, du, partial, rows, n, act, vec): g = dout[i]·act'(pre[i])
//   in f32 (dout f32, pre 16-bit), du[i] = g rounded to 16 bit, partial[blockIdx.y, c] = the sum of
//   the UNROUNDED g over block row blockIdx.y's row chunk (CEIL_DIV(rows, gridDim.y) consecutive rows,
//   in row order; zero for an empty chunk) -- the chunking of bias_act_bwd_f32v: DETERMINISTIC
//   partials [gridDim.y, n], summed by col_reduce_f32 into the bias gradient.
// col_sums_partial_hbf16 / _hf16(m, partial, rows, n, vec): partial[p, c] = the f32 sum of the
//   16-bit m[r, c] over row chunk p (the chunking of col_sums_partial_f32).
// geometry (bwd and col sums): blockDim = (256, 1, 1) (any multiple of 32); each thread owns four
//   consecutive columns with vec != 0 (n % 4 == 0; 16-byte aligned dout and partial, 8-byte aligned
//   pre, du, m: one float4 and one 8-byte load of four halves), else one column:
//   gridDim.x = CEIL_DIV(n, 256·(vec ? 4 : 1)), gridDim.y = P ∈ [1, 65535] row chunks (the launch
//   of bias_act_bwd_f32v). No shared memory, no barriers.
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "common.cuh"

template <int ACT>
__device__ __forceinline__ float hact_fwd(float x) {
  if (ACT == 0) return x / (1.f + expf(-1.702f * x));
  return 0.5f * x * (1.f + erff(x * 0.70710678118654752f));
}

template <int ACT>
__device__ __forceinline__ float hact_grad(float x) {
  if (ACT == 0) {
    const float s = 1.f / (1.f + expf(-1.702f * x));
    return s + 1.702f * x * s * (1.f - s);
  }
  const float cdf = 0.5f * (1.f + erff(x * 0.70710678118654752f));
  const float pdf = 0.39894228040143268f * expf(-0.5f * x * x);
  return cdf + x * pdf;
}

__device__ __forceinline__ float hact_rt(float x, int act) { return act ? hact_fwd<1>(x) : hact_fwd<0>(x); }
__device__ __forceinline__ float hact_grad_rt(float x, int act) { return act ? hact_grad<1>(x) : hact_grad<0>(x); }

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

template <typename TH>
__device__ __forceinline__ void act_fwd_h(const TH* __restrict__ pre, TH* __restrict__ out, int rows, int n, int act,
                                          int vec) {
  const long long total = (long long)rows * n;
  const long long tid = blockIdx.x * (long long)blockDim.x + threadIdx.x, stride = (long long)gridDim.x * blockDim.x;
  long long done = 0;
  if (vec) {
    const long long groups = total / 8;
    for (long long q = tid; q < groups; q += stride) {
      float f[8];
      unpack8<TH>(reinterpret_cast<const uint4*>(pre)[q], f);
#pragma unroll
      for (int j = 0; j < 8; ++j) f[j] = hact_rt(f[j], act);
      reinterpret_cast<uint4*>(out)[q] = pack8<TH>(f);
    }
    done = groups * 8;
  }
  for (long long i = done + tid; i < total; i += stride) store_from_f32(out, (size_t)i, hact_rt(load_f32(pre, (size_t)i), act));
}

extern "C" __global__ void act_fwd_hbf16(const __nv_bfloat16* __restrict__ pre, __nv_bfloat16* __restrict__ out, int rows,
                                         int n, int act, int vec) {
  act_fwd_h<__nv_bfloat16>(pre, out, rows, n, act, vec);
}
extern "C" __global__ void act_fwd_hf16(const __half* __restrict__ pre, __half* __restrict__ out, int rows, int n, int act,
                                        int vec) {
  act_fwd_h<__half>(pre, out, rows, n, act, vec);
}

__device__ __forceinline__ void hrow_chunk(int rows, int& r0, int& r1) {
  const int chunk = CEIL_DIV(rows, (int)gridDim.y);
  r0 = min(rows, (int)blockIdx.y * chunk);
  r1 = min(rows, r0 + chunk);
}

template <typename TH>
__device__ __forceinline__ void act_bwd_h(const float* __restrict__ dout, const TH* __restrict__ pre, TH* __restrict__ du,
                                          float* __restrict__ partial, int rows, int n, int act, int vec) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  int r0, r1;
  hrow_chunk(rows, r0, r1);
  if (vec) {
    const int c = 4 * t;
    if (c >= n) return;  // no barriers in this kernel
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int r = r0; r < r1; ++r) {
      const size_t i = (size_t)r * n + c;
      const float4 d = reinterpret_cast<const float4*>(dout + i)[0];
      const float4 p = unpack4<TH>(reinterpret_cast<const uint2*>(pre + i)[0]);
      const float4 g = make_float4(d.x * hact_grad_rt(p.x, act), d.y * hact_grad_rt(p.y, act), d.z * hact_grad_rt(p.z, act),
                                   d.w * hact_grad_rt(p.w, act));
      reinterpret_cast<uint2*>(du + i)[0] = pack4<TH>(g);
      acc.x += g.x;
      acc.y += g.y;
      acc.z += g.z;
      acc.w += g.w;
    }
    reinterpret_cast<float4*>(partial + (size_t)blockIdx.y * n + c)[0] = acc;
    return;
  }
  const int c = t;
  if (c >= n) return;
  float acc = 0.f;
  for (int r = r0; r < r1; ++r) {
    const size_t i = (size_t)r * n + c;
    const float g = dout[i] * hact_grad_rt(load_f32(pre, i), act);
    store_from_f32(du, i, g);
    acc += g;
  }
  partial[(size_t)blockIdx.y * n + c] = acc;
}

extern "C" __global__ void act_bwd_hbf16(const float* __restrict__ dout, const __nv_bfloat16* __restrict__ pre,
                                         __nv_bfloat16* __restrict__ du, float* __restrict__ partial, int rows, int n,
                                         int act, int vec) {
  act_bwd_h<__nv_bfloat16>(dout, pre, du, partial, rows, n, act, vec);
}
extern "C" __global__ void act_bwd_hf16(const float* __restrict__ dout, const __half* __restrict__ pre,
                                        __half* __restrict__ du, float* __restrict__ partial, int rows, int n, int act,
                                        int vec) {
  act_bwd_h<__half>(dout, pre, du, partial, rows, n, act, vec);
}

template <typename TH>
__device__ __forceinline__ void col_sums_partial_h(const TH* __restrict__ m, float* __restrict__ partial, int rows, int n,
                                                   int vec) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  int r0, r1;
  hrow_chunk(rows, r0, r1);
  if (vec) {
    const int c = 4 * t;
    if (c >= n) return;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int r = r0; r < r1; ++r) {
      const float4 f = unpack4<TH>(reinterpret_cast<const uint2*>(m + (size_t)r * n + c)[0]);
      acc.x += f.x;
      acc.y += f.y;
      acc.z += f.z;
      acc.w += f.w;
    }
    reinterpret_cast<float4*>(partial + (size_t)blockIdx.y * n + c)[0] = acc;
    return;
  }
  const int c = t;
  if (c >= n) return;
  float acc = 0.f;
  for (int r = r0; r < r1; ++r) acc += load_f32(m, (size_t)r * n + c);
  partial[(size_t)blockIdx.y * n + c] = acc;
}

extern "C" __global__ void col_sums_partial_hbf16(const __nv_bfloat16* __restrict__ m, float* __restrict__ partial, int rows,
                                                  int n, int vec) {
  col_sums_partial_h<__nv_bfloat16>(m, partial, rows, n, vec);
}
extern "C" __global__ void col_sums_partial_hf16(const __half* __restrict__ m, float* __restrict__ partial, int rows, int n,
                                                 int vec) {
  col_sums_partial_h<__half>(m, partial, rows, n, vec);
}
