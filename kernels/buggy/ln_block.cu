// buggy/ln_block.cu -- TEST ONLY: a block-per-row LayerNorm forward built on common.cuh's
// block_reduce_sum. It is the bug-free twin of the planted-bug kernels in this folder
// (same signature and geometry) and exercises the emulator's block barriers.
// geometry: blockDim = (32*k, 1, 1), gridDim.x = rows. Signature as layernorm_fwd_f32.
#include <cuda_runtime.h>
#include "../common.cuh"

extern "C" __global__ void ln_block_f32(const float* __restrict__ x, const float* __restrict__ gamma,
                                        const float* __restrict__ beta, float* __restrict__ y, float* mean_out,
                                        float* rstd_out, int rows, int cols, float eps) {
  __shared__ float scratch[32];
  const int row = blockIdx.x;  // uniform across the block
  if (row >= rows) return;
  const float* xr = x + (size_t)row * cols;
  float s = 0.f;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) s += xr[c];
  const float mean = block_reduce_sum(s, scratch) / cols;
  float ss = 0.f;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) ss += (xr[c] - mean) * (xr[c] - mean);
  const float rstd = rsqrtf(block_reduce_sum(ss, scratch) / cols + eps);
  for (int c = threadIdx.x; c < cols; c += blockDim.x)
    y[(size_t)row * cols + c] = (xr[c] - mean) * rstd * gamma[c] + beta[c];
  if (threadIdx.x == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}
