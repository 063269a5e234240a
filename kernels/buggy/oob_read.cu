// buggy/oob_read.cu -- TEST ONLY: out-of-bounds global memory accesses.
//   pair_sum_f32       correct: y[i] = x[i] + x[i+1] (x[n] counts as 0), the bound tested first.
//   bug_oob_read_f32   PLANTED BUG: loads x[i+1] before the bound test and masks it with a
//                      weight of 0, so thread n-1 reads x[n], one element past the end; the
//                      result is unaffected (the masked value is multiplied by 0, which the
//                      compiler cannot drop: 0 * NaN is NaN).
//   bug_oob_write_f32  PLANTED BUG: y[i + 4] = x[i] for i < n: writes 4 elements past the end.
// Expected: with n a multiple of 4 (the end of x is the end of its 16-byte rounding) the bug
// launches fail with "out-of-bounds read/write ..." naming the thread (guard page).
// geometry: blockDim = (k,1,1), gridDim.x = ceil(n / k).
#include <cuda_runtime.h>

extern "C" __global__ void pair_sum_f32(const float* __restrict__ x, float* __restrict__ y, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  y[i] = x[i] + (i + 1 < n ? x[i + 1] : 0.f);
}

extern "C" __global__ void bug_oob_read_f32(const float* __restrict__ x, float* __restrict__ y, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float next = x[i + 1];  // BUG: read before the bound test: x[n] for i = n-1
  const float w = i + 1 < n ? 1.f : 0.f;
  y[i] = x[i] + w * next;
}

extern "C" __global__ void bug_oob_write_f32(const float* __restrict__ x, float* __restrict__ y, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  y[i + 4] = x[i];  // BUG: shifted by 4: the last 4 threads write past the end of y
}
