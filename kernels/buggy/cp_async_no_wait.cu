// buggy/cp_async_no_wait.cu -- TEST ONLY: cp.async tile loads with commit/wait groups.
//   cpasync_rowsum_f32      correct: y[r] = sum of row r of x (64 floats per row). Each block
//                           streams `tiles` tiles of 16 rows global -> shared with cp.async,
//                           double-buffered (tile t+1 in flight while tile t is summed).
//   bug_cpasync_no_wait_f32 PLANTED BUG: single buffer, the cp.async.wait_group before the
//                           __syncthreads is missing (a barrier does not complete cp.async).
//   bug_cpasync_wait1_f32   PLANTED BUG: the double-buffered loop always waits with
//                           wait_group 1; in the last iteration no newer group was committed,
//                           so the last tile may still be in flight (wait_group 0 is needed).
// Expected: the bug kernels read undefined shared memory (poison: NaN) in every schedule.
// geometry: blockDim = (64,1,1), gridDim.x = rows / (16 * tiles); x has rows*64 floats, 16-byte aligned.
#include <cuda_runtime.h>

#define TILE_ROWS 16
#define ROW_LEN 64
#define TILE_CHUNKS (TILE_ROWS * ROW_LEN / 4)  // 16-byte chunks per tile

// The emulator's cp.async, or the PTX instruction on a GPU (what kernels/mma.cuh wraps).
#ifdef __CUDA_EMU__
__device__ __forceinline__ void cp16(void* dst, const void* src) { ::emu::cp_async(dst, src, 16); }
__device__ __forceinline__ void cp_commit() { ::emu::cp_async_commit(); }
template <int N> __device__ __forceinline__ void cp_wait() { ::emu::cp_async_wait(N); }
#else
__device__ __forceinline__ void cp16(void* dst, const void* src) {
  const unsigned s = (unsigned)__cvta_generic_to_shared(dst);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(src));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }
#endif

// Issues the copy of tile `tile` (16 rows) into `buf`: 4 chunks of 16 bytes per thread.
__device__ __forceinline__ void issue_tile(float4* buf, const float* x, int tile) {
  const float4* src = reinterpret_cast<const float4*>(x + (size_t)tile * TILE_ROWS * ROW_LEN);
  for (int i = threadIdx.x; i < TILE_CHUNKS; i += blockDim.x) cp16(&buf[i], &src[i]);
}

__device__ __forceinline__ void sum_tile(const float4* buf, float* y, int tile) {
  if (threadIdx.x < TILE_ROWS) {
    const float* row = reinterpret_cast<const float*>(buf) + threadIdx.x * ROW_LEN;
    float s = 0.f;
    for (int c = 0; c < ROW_LEN; ++c) s += row[c];
    y[tile * TILE_ROWS + threadIdx.x] = s;
  }
}

extern "C" __global__ void cpasync_rowsum_f32(const float* __restrict__ x, float* __restrict__ y, int tiles) {
  __shared__ float4 buf[2][TILE_CHUNKS];
  const int first = blockIdx.x * tiles;
  issue_tile(buf[0], x, first);
  cp_commit();
  for (int t = 0; t < tiles; ++t) {
    if (t + 1 < tiles) {
      issue_tile(buf[(t + 1) & 1], x, first + t + 1);
      cp_commit();
      cp_wait<1>();  // tile t has landed, tile t+1 may still be in flight
    } else {
      cp_wait<0>();
    }
    __syncthreads();
    sum_tile(buf[t & 1], y, first + t);
    __syncthreads();  // buf[t&1] is refilled in the next iteration
  }
}

extern "C" __global__ void bug_cpasync_no_wait_f32(const float* __restrict__ x, float* __restrict__ y, int tiles) {
  __shared__ float4 one[TILE_CHUNKS];
  for (int t = 0; t < tiles; ++t) {
    const int tile = blockIdx.x * tiles + t;
    issue_tile(one, x, tile);
    cp_commit();
    // BUG: missing cp_wait<0>() here
    __syncthreads();
    sum_tile(one, y, tile);
    __syncthreads();
  }
}

extern "C" __global__ void bug_cpasync_wait1_f32(const float* __restrict__ x, float* __restrict__ y, int tiles) {
  __shared__ float4 buf[2][TILE_CHUNKS];
  const int first = blockIdx.x * tiles;
  issue_tile(buf[0], x, first);
  cp_commit();
  for (int t = 0; t < tiles; ++t) {
    if (t + 1 < tiles) {
      issue_tile(buf[(t + 1) & 1], x, first + t + 1);
      cp_commit();
    }
    cp_wait<1>();  // BUG: in the last iteration the newest group is tile t itself: needs cp_wait<0>()
    __syncthreads();
    sum_tile(buf[t & 1], y, first + t);
    __syncthreads();
  }
}
