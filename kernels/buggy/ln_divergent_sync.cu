// buggy/ln_divergent_sync.cu -- TEST ONLY, PLANTED BUG (b): the block reduction's barrier is
// inside `if (threadIdx.x < 16)`, so only half of warp 0 reaches it (undefined behaviour in
// CUDA; hangs or silently misbehaves on hardware). Expected: emu_launch returns an error
// (divergent __syncthreads / barrier with exited threads). geometry as ln_block_f32.
#include <cuda_runtime.h>
#include "../common.cuh"

__device__ float block_sum_divergent(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_reduce_sum(v);
  if (lane == 0) scratch[warp] = v;
  if (threadIdx.x < 16) __syncthreads();  // BUG: barrier in divergent code
  v = lane < nwarps ? scratch[lane] : 0.f;
  v = warp_reduce_sum(v);
  __syncthreads();
  return v;
}

extern "C" __global__ void ln_bug_divergent_sync_f32(const float* __restrict__ x, const float* __restrict__ gamma,
                                                     const float* __restrict__ beta, float* __restrict__ y,
                                                     float* mean_out, float* rstd_out, int rows, int cols,
                                                     float eps) {
  __shared__ float scratch[32];
  const int row = blockIdx.x;
  if (row >= rows) return;
  const float* xr = x + (size_t)row * cols;
  float s = 0.f;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) s += xr[c];
  const float mean = block_sum_divergent(s, scratch) / cols;
  float ss = 0.f;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) ss += (xr[c] - mean) * (xr[c] - mean);
  const float rstd = rsqrtf(block_sum_divergent(ss, scratch) / cols + eps);
  for (int c = threadIdx.x; c < cols; c += blockDim.x)
    y[(size_t)row * cols + c] = (xr[c] - mean) * rstd * gamma[c] + beta[c];
  if (threadIdx.x == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}
