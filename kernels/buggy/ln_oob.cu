// buggy/ln_oob.cu -- TEST ONLY, PLANTED BUG (c): layernorm_fwd_f32 (one warp per row) whose
// output loop runs to c <= cols, so lane (cols % 32) also writes y[row*cols + cols]: the first
// element of the next row, and one element past the end of y for the last row.
// Expected: the guard canaries after the test's output buffer are overwritten (all schedules);
// in-buffer corruption only when the next row was written first (reverse/random order).
// geometry as layernorm_fwd_f32.
#include <cuda_runtime.h>
#include "../common.cuh"

extern "C" __global__ void ln_bug_oob_f32(const float* __restrict__ x, const float* __restrict__ gamma,
                                          const float* __restrict__ beta, float* __restrict__ y, float* mean_out,
                                          float* rstd_out, int rows, int cols, float eps) {
  const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= rows) return;
  const int lane = threadIdx.x & 31;
  const float* xr = x + (size_t)row * cols;
  float* yr = y + (size_t)row * cols;
  float s = 0.f;
  for (int c = lane; c < cols; c += 32) s += xr[c];
  const float mean = warp_reduce_sum(s) / cols;
  float ss = 0.f;
  for (int c = lane; c < cols; c += 32) ss += (xr[c] - mean) * (xr[c] - mean);
  const float rstd = rsqrtf(warp_reduce_sum(ss) / cols + eps);
  for (int c = lane; c <= cols; c += 32)  // BUG: <= writes one element past the row
    yr[c] = (xr[c] - mean) * rstd * gamma[c] + beta[c];
  if (lane == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}
