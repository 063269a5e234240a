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
#include "act.cuh"

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
      for (int j = 0; j < 8; ++j) f[j] = act_rt(f[j], act);
      reinterpret_cast<uint4*>(out)[q] = pack8<TH>(f);
    }
    done = groups * 8;
  }
  for (long long i = done + tid; i < total; i += stride) store_from_f32(out, (size_t)i, act_rt(load_f32(pre, (size_t)i), act));
}

extern "C" __global__ void act_fwd_hbf16(const __nv_bfloat16* __restrict__ pre, __nv_bfloat16* __restrict__ out, int rows,
                                         int n, int act, int vec) {
  act_fwd_h<__nv_bfloat16>(pre, out, rows, n, act, vec);
}
extern "C" __global__ void act_fwd_hf16(const __half* __restrict__ pre, __half* __restrict__ out, int rows, int n, int act,
                                        int vec) {
  act_fwd_h<__half>(pre, out, rows, n, act, vec);
}

extern "C" __global__ void act_bwd_hbf16(const float* __restrict__ dout, const __nv_bfloat16* __restrict__ pre,
                                         __nv_bfloat16* __restrict__ du, float* __restrict__ partial, int rows, int n,
                                         int act, int vec) {
  act_bwd_cols<__nv_bfloat16>(dout, pre, du, partial, rows, n, act, vec);
}
extern "C" __global__ void act_bwd_hf16(const float* __restrict__ dout, const __half* __restrict__ pre,
                                        __half* __restrict__ du, float* __restrict__ partial, int rows, int n, int act,
                                        int vec) {
  act_bwd_cols<__half>(dout, pre, du, partial, rows, n, act, vec);
}

extern "C" __global__ void col_sums_partial_hbf16(const __nv_bfloat16* __restrict__ m, float* __restrict__ partial, int rows,
                                                  int n, int vec) {
  col_sums_cols<__nv_bfloat16>(m, partial, rows, n, vec);
}
extern "C" __global__ void col_sums_partial_hf16(const __half* __restrict__ m, float* __restrict__ partial, int rows, int n,
                                                 int vec) {
  col_sums_cols<__half>(m, partial, rows, n, vec);
}
