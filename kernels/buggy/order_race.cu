// buggy/order_race.cu -- TEST ONLY, PLANTED BUG (f): a race that launch order hides.
//   bug_prev_warp_race_f32  lane 0 of warp w stages x[w] in shared memory, then (no __syncthreads
//                           between) reads the value warp w-1 staged: y[w] = x[w-1], y[0] = 0.
// Correct only when warps run in launch order, one after the other: the emulator's forward
// schedule misses it, the reverse and random schedules catch it (stale shared memory).
// geometry: one block, blockDim = (32*k, 1, 1), k <= 32; x and y have k elements.
#include <cuda_runtime.h>

extern "C" __global__ void bug_prev_warp_race_f32(const float* __restrict__ x, float* __restrict__ y) {
  __shared__ float stage[32];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) stage[warp] = x[warp];
  // BUG: missing __syncthreads() here
  if (lane == 0) y[warp] = warp > 0 ? stage[warp - 1] : 0.f;
}
