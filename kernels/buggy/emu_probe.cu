// buggy/emu_probe.cu -- TEST ONLY: checks the emulator's CUDA semantics (no bug planted).
//   probe_collectives(out, k): each thread writes 16 values (out[t*16 + i]) from shuffles with
//     widths, votes, warp reductions, __syncthreads_count, a partial-mask shuffle, the poison
//     seen in uninitialised static and dynamic shared memory, and its private copy of the
//     by-value parameter k after modifying it. geometry: one block of 64 threads, smem 256 B.
//   probe_indices(out): out[6*g .. 6*g+6] = threadIdx.xyz, blockIdx.xyz with g the global
//     linear thread id (x fastest). Any 3-D geometry.
//   probe_file_scope_smem(out): out[t] = blockDim.x - 1 - t through a FILE-SCOPE
//     `extern __shared__` array. geometry: one block, smem = blockDim.x * 4 bytes.
#include <cuda_runtime.h>
#include "../common.cuh"

extern __shared__ __align__(16) unsigned file_scope_smem[];

extern "C" __global__ void probe_collectives(unsigned* out, int k) {
  __shared__ unsigned never_written[64];
  extern __shared__ __align__(16) unsigned dyn[];
  const unsigned t = threadIdx.x, lane = t & 31;
  unsigned* o = out + t * 16;
  o[11] = never_written[t];
  o[12] = dyn[t];
  __syncthreads();
  o[0] = __shfl_sync(FULL_MASK, t * 10, 3);
  o[1] = __shfl_up_sync(FULL_MASK, t, 1, 16);
  o[2] = __shfl_down_sync(FULL_MASK, t, 2, 8);
  o[3] = __shfl_xor_sync(FULL_MASK, t, 5);
  o[4] = __ballot_sync(FULL_MASK, lane & 1);
  o[5] = __any_sync(FULL_MASK, lane == 7);
  o[6] = __all_sync(FULL_MASK, lane < 31);
  o[7] = __reduce_add_sync(FULL_MASK, lane);
  o[8] = __syncthreads_count(t % 3 == 0);
  o[9] = lane < 8 ? __shfl_sync(0xffu, lane * 2, 7) : 0u;
  o[10] = __shfl_sync(FULL_MASK, t, lane + 40);  // source lane taken modulo the width
  o[13] = (unsigned)__reduce_min_sync(FULL_MASK, (int)lane - 5);
  k += t;  // each thread owns a copy of its parameters
  __syncwarp();
  o[14] = (unsigned)k;
  o[15] = __shfl_xor_sync(FULL_MASK, (unsigned)__float_as_uint(1.5f * t), 16) == __float_as_uint(1.5f * (t ^ 16));
}

extern "C" __global__ void probe_indices(unsigned* out) {
  const unsigned tpb = blockDim.x * blockDim.y * blockDim.z;
  const unsigned block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned g = block * tpb + threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  unsigned* o = out + 6 * g;
  o[0] = threadIdx.x, o[1] = threadIdx.y, o[2] = threadIdx.z;
  o[3] = blockIdx.x, o[4] = blockIdx.y, o[5] = blockIdx.z;
}

extern "C" __global__ void probe_file_scope_smem(unsigned* out) {
  file_scope_smem[threadIdx.x] = threadIdx.x;
  __syncthreads();
  out[threadIdx.x] = file_scope_smem[blockDim.x - 1 - threadIdx.x];
}
