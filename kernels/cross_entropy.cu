// cross_entropy.cu -- softmax cross-entropy with label smoothing over contrastive logits
// (PyTorch's F.cross_entropy(logits, targets, label_smoothing=eps), reduction 'mean').
//
// logits T [rows, C] (f32 or bf16, finite), targets u32 [rows] (< C; otherwise the kernel traps).
// Per row i, with lse_i = log sum_c exp(x_ic) and q_ic = (1-eps)*[c == t_i] + eps/C:
//   loss_i = sum_c -q_ic log p_ic = lse_i - (1-eps)*x_i,t_i - (eps/C) * sum_c x_ic
//   loss   = (1/rows) sum_i loss_i
//   dlogits_ic = (exp(x_ic - lse_i) - q_ic) * dloss / rows     (dloss: upstream gradient of `loss`)
// Math is f32 (two passes over the row: max, then sum exp(x - max), sum x).
//
// Forward  cross_entropy_fwd_<T>(logits, targets, loss, lse, rows, C, eps): loss [rows], lse [rows]
//          (f32; lse is saved for the backward). geometry: ONE WARP PER ROW; blockDim = (32*k, 1, 1);
//          gridDim.x = CEIL_DIV(rows, k). No shared memory, no block barriers.
// Mean     cross_entropy_mean_f32(loss, mean, rows): mean[0] = sum_i loss_i / rows, fixed-order block
//          reduction (deterministic). geometry: ONE BLOCK, blockDim = (32*k, 1, 1), k <= 32 (1024 rec.).
// Backward cross_entropy_bwd_<T>(logits, targets, lse, dlogits, rows, C, eps, dloss): dlogits T
//          [rows, C]; dlogits MAY ALIAS logits (each element is read, then written, by one thread).
//          geometry: as the forward.
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void cross_entropy_fwd(const T* __restrict__ logits, const unsigned* __restrict__ targets,
                                                  float* __restrict__ loss, float* __restrict__ lse, int rows, int C,
                                                  float eps) {
  const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= rows) return;  // whole warp leaves together: only warp collectives below
  const int lane = threadIdx.x & 31;
  const T* x = logits + (size_t)row * C;
  const unsigned t = targets[row];
  if (t >= (unsigned)C) __trap();  // warp-uniform (t is the same for every lane)
  float m = -INFINITY;
  for (int c = lane; c < C; c += 32) m = fmaxf(m, load_f32(x, c));
  m = warp_reduce_max(m);
  float s = 0.f, sx = 0.f;
  for (int c = lane; c < C; c += 32) {
    const float v = load_f32(x, c);
    s += expf(v - m);
    sx += v;
  }
  s = warp_reduce_sum(s);
  sx = warp_reduce_sum(sx);
  if (lane == 0) {
    const float l = m + logf(s);
    lse[row] = l;
    loss[row] = l - (1.f - eps) * load_f32(x, t) - (eps / (float)C) * sx;
  }
}

template <typename T>
__device__ __forceinline__ void cross_entropy_bwd(const T* logits, const unsigned* __restrict__ targets,
                                                  const float* __restrict__ lse, T* dlogits, int rows, int C,
                                                  float eps, float dloss) {
  const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= rows) return;
  const int lane = threadIdx.x & 31;
  const size_t off = (size_t)row * C;
  const unsigned t = targets[row];
  if (t >= (unsigned)C) __trap();
  const float l = lse[row];
  const float scale = dloss / (float)rows;
  const float q_off = eps / (float)C;
  const float q_on = (1.f - eps) + q_off;
  for (int c = lane; c < C; c += 32) {
    const float p = expf(load_f32(logits, off + c) - l);
    store_from_f32(dlogits, off + c, (p - ((unsigned)c == t ? q_on : q_off)) * scale);
  }
}

extern "C" __global__ void cross_entropy_fwd_f32(const float* __restrict__ logits, const unsigned* __restrict__ targets,
                                                 float* __restrict__ loss, float* __restrict__ lse, int rows, int C,
                                                 float eps) {
  cross_entropy_fwd<float>(logits, targets, loss, lse, rows, C, eps);
}

extern "C" __global__ void cross_entropy_fwd_bf16(const __nv_bfloat16* __restrict__ logits,
                                                  const unsigned* __restrict__ targets, float* __restrict__ loss,
                                                  float* __restrict__ lse, int rows, int C, float eps) {
  cross_entropy_fwd<__nv_bfloat16>(logits, targets, loss, lse, rows, C, eps);
}

extern "C" __global__ void cross_entropy_fwd_f16(const __half* __restrict__ logits,
                                                  const unsigned* __restrict__ targets, float* __restrict__ loss,
                                                  float* __restrict__ lse, int rows, int C, float eps) {
  cross_entropy_fwd<__half>(logits, targets, loss, lse, rows, C, eps);
}

extern "C" __global__ void cross_entropy_mean_f32(const float* __restrict__ loss, float* __restrict__ mean, int rows) {
  __shared__ float scratch[32];
  float s = 0.f;
  for (int i = threadIdx.x; i < rows; i += blockDim.x) s += loss[i];
  s = block_reduce_sum(s, scratch);
  if (threadIdx.x == 0) mean[0] = s / (float)rows;
}

extern "C" __global__ void cross_entropy_bwd_f32(const float* logits, const unsigned* __restrict__ targets,
                                                 const float* __restrict__ lse, float* dlogits, int rows, int C,
                                                 float eps, float dloss) {
  cross_entropy_bwd<float>(logits, targets, lse, dlogits, rows, C, eps, dloss);
}

extern "C" __global__ void cross_entropy_bwd_bf16(const __nv_bfloat16* logits, const unsigned* __restrict__ targets,
                                                  const float* __restrict__ lse, __nv_bfloat16* dlogits, int rows,
                                                  int C, float eps, float dloss) {
  cross_entropy_bwd<__nv_bfloat16>(logits, targets, lse, dlogits, rows, C, eps, dloss);
}

extern "C" __global__ void cross_entropy_bwd_f16(const __half* logits, const unsigned* __restrict__ targets,
                                                  const float* __restrict__ lse, __half* dlogits, int rows,
                                                  int C, float eps, float dloss) {
  cross_entropy_bwd<__half>(logits, targets, lse, dlogits, rows, C, eps, dloss);
}
