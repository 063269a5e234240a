// buggy/warp_smem.cu -- TEST ONLY: dynamic shared memory and warp-collective misuse.
//   smem_reverse_f32       correct: y[i] = x[n-1-i] through dynamic shared memory (n floats).
//   bug_smem_overrun_f32   PLANTED BUG: stages n+1 floats into n floats of dynamic smem.
//                          Expected: launch error (canary after the dynamic smem).
//   bug_divergent_shfl_f32 PLANTED BUG: full-mask warp_reduce_sum inside `if (lane < 16)`.
//                          Expected: launch error (mask names exited lanes / deadlock).
//   bug_trap_i32           calls __trap() in thread 5. Expected: launch error.
// geometry: one block, blockDim = (32*k, 1, 1); smem = n * 4 bytes for the smem kernels.
#include <cuda_runtime.h>
#include "../common.cuh"

extern "C" __global__ void smem_reverse_f32(const float* __restrict__ x, float* __restrict__ y, int n) {
  extern __shared__ __align__(16) float buf[];
  for (int i = threadIdx.x; i < n; i += blockDim.x) buf[i] = x[i];
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += blockDim.x) y[i] = buf[n - 1 - i];
}

extern "C" __global__ void bug_smem_overrun_f32(const float* __restrict__ x, float* __restrict__ y, int n) {
  extern __shared__ __align__(16) float buf[];
  for (int i = threadIdx.x; i <= n; i += blockDim.x) buf[i] = x[i];  // BUG: <=
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += blockDim.x) y[i] = buf[n - 1 - i];
}

extern "C" __global__ void bug_divergent_shfl_f32(float* x) {
  const int lane = threadIdx.x & 31;
  float v = x[threadIdx.x];
  if (lane < 16) v = warp_reduce_sum(v);  // BUG: lanes 16..31 never join the full-mask shuffle
  x[threadIdx.x] = v;
}

extern "C" __global__ void bug_trap_i32(int* flag) {
  if (threadIdx.x == 5) __trap();
  flag[threadIdx.x] = 1;
}
