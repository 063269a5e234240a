// common.cuh -- helpers shared by the clipforge CUDA kernels (included by each .cu).
//
// Warp reductions use __shfl_xor_sync with the full mask: every lane of the warp must call
// them (no early exit of single lanes before the call) and every lane gets the result.
// block_reduce_sum needs blockDim.x to be a multiple of 32 (all warps full), must be reached
// by every thread of the block (it contains __syncthreads), and ends with a barrier so the
// scratch buffer can be reused immediately.
// Conversions: load_f32/store_from_f32 let one template body serve float, __nv_bfloat16 and __half
// tensors (math is always f32; bf16 and f16 stores round to nearest even).
#pragma once
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

// NVRTC compiles without <cuda_runtime.h> (and so without math.h's INFINITY).
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

#define CEIL_DIV(a, b) (((a) + (b) - 1) / (b))
#define FULL_MASK 0xffffffffu

__device__ __forceinline__ float warp_reduce_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(FULL_MASK, v, offset);
  return v;
}

__device__ __forceinline__ float warp_reduce_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, offset));
  return v;
}

// Sum of v over the whole block, returned to every thread. scratch: __shared__ float[32].
__device__ __forceinline__ float block_reduce_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  v = warp_reduce_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < nwarps ? scratch[lane] : 0.f;
  v = warp_reduce_sum(v);
  __syncthreads();  // everyone has read scratch: it may be written again
  return v;
}

__device__ __forceinline__ float load_f32(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ float load_f32(const __nv_bfloat16* p, size_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void store_from_f32(float* p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store_from_f32(__nv_bfloat16* p, size_t i, float v) { p[i] = __float2bfloat16(v); }
__device__ __forceinline__ float load_f32(const __half* p, size_t i) { return __half2float(p[i]); }
__device__ __forceinline__ void store_from_f32(__half* p, size_t i, float v) { p[i] = __float2half(v); }
