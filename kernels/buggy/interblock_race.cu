// buggy/interblock_race.cu -- TEST ONLY: races between the blocks of one grid.
//   bug_counter_rmw_f32  PLANTED BUG: every block adds the sum of its blockDim.x elements of x
//                        to *total with a non-atomic read-modify-write that straddles its block
//                        reduction: thread 0 reads *total, the block reduces (barriers), thread 0
//                        writes old + sum. Blocks resident at the same time overwrite each
//                        other's updates. Blocks run one after another would hide it.
//   counter_atomic_f32   the twin: the same reduction, then atomicAdd(total, sum).
//   bug_chained_carry_f32 PLANTED BUG: a single-pass scan without look-back flags: block b
//                        writes carry[b] = carry[b-1] + (its sum), reading carry[b-1] without
//                        waiting for block b-1 to have written it.
//   block_sums_f32 + carry_scan_f32  the twin: partial sums, then a second launch scans them.
// geometry: blockDim = (32*k,1,1); x has gridDim.x * blockDim.x elements; carry/partial gridDim.x.
#include <cuda_runtime.h>
#include "../common.cuh"

extern "C" __global__ void bug_counter_rmw_f32(const float* __restrict__ x, float* total) {
  __shared__ float scratch[32];
  float old = 0.f;
  if (threadIdx.x == 0) old = *total;  // BUG: read here ...
  const float s = block_reduce_sum(x[blockIdx.x * blockDim.x + threadIdx.x], scratch);
  if (threadIdx.x == 0) *total = old + s;  // ... written back after barriers: lost updates
}

extern "C" __global__ void counter_atomic_f32(const float* __restrict__ x, float* total) {
  __shared__ float scratch[32];
  const float s = block_reduce_sum(x[blockIdx.x * blockDim.x + threadIdx.x], scratch);
  if (threadIdx.x == 0) atomicAdd(total, s);
}

extern "C" __global__ void bug_chained_carry_f32(const float* __restrict__ x, float* carry) {
  __shared__ float scratch[32];
  const float s = block_reduce_sum(x[blockIdx.x * blockDim.x + threadIdx.x], scratch);
  if (threadIdx.x == 0) carry[blockIdx.x] = (blockIdx.x ? carry[blockIdx.x - 1] : 0.f) + s;  // BUG: no wait
}

extern "C" __global__ void block_sums_f32(const float* __restrict__ x, float* partial) {
  __shared__ float scratch[32];
  const float s = block_reduce_sum(x[blockIdx.x * blockDim.x + threadIdx.x], scratch);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// one thread: carry[i] = partial[0] + ... + partial[i]
extern "C" __global__ void carry_scan_f32(const float* __restrict__ partial, float* __restrict__ carry, int n) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  float acc = 0.f;
  for (int i = 0; i < n; ++i) carry[i] = acc += partial[i];
}
