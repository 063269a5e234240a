// layernorm.cu -- LayerNorm over the last dimension: forward, residual-add + forward, backward.
//
// Tensors are row-major [rows, cols]; gamma/beta/dgamma/dbeta are [cols] and always f32;
// mean/rstd are [rows] f32 (saved by the forward for the backward). Math is f32 throughout;
// the _bf16 variants read/write __nv_bfloat16 activations (x, residual, y, dy, dx).
//
// Forward: y = (x - mean) * rstd * gamma + beta,  rstd = 1 / sqrt(var + eps) (biased var,
// two-pass: mean first, then the sum of squared deviations).
//   geometry: ONE WARP PER ROW. blockDim = (32*k, 1, 1), k >= 1 (128 recommended);
//             gridDim.x = CEIL_DIV(rows, k). No shared memory, no __syncthreads.
//   mean/rstd may be NULL (inference). y must not alias x.
// Residual forward: x = x + residual (written back to x, rounded to T), then the forward on the
//   new x. Same geometry. residual/y must not alias x.
// Backward: dx = rstd * (g*dy - mean_c(g*dy) - xhat * mean_c(g*dy*xhat)), xhat = (x-mean)*rstd,
//   plus dgamma = sum_rows dy*xhat and dbeta = sum_rows dy as DETERMINISTIC PER-BLOCK PARTIAL
//   SUMS (no atomics): block b owns the row chunk [b*chunk, (b+1)*chunk), chunk =
//   CEIL_DIV(rows, gridDim.x), and writes row b of dgamma_partial/dbeta_partial ([gridDim.x, cols],
//   zeros for an empty chunk). layernorm_bwd_reduce_f32 then sums the partials.
//   geometry: blockDim = (32*k, 1, 1); gridDim.x = P, any P >= 1 (e.g. 2 x SM count, <= rows).
//   dx must not alias dy or x.
// Reduce: dgamma[c] = sum_p dgamma_partial[p, c] (same for dbeta); one thread per column.
//   geometry: blockDim = (256, 1, 1), gridDim.x = CEIL_DIV(cols, 256). (The device backend sums the
//   partials with col_reduce_f32 of bias_gelu.cu instead: 32 columns × 8 part-strides a block.)
// _f32_hbf16 / _f32_hf16 forwards: f32 in and out, plus the output rounded to bf16 / f16 in yh.
// layernorm_fwd_hbf16 / _hf16: f32 in, ONLY the 16-bit output (and the stats).
// layernorm_bwd_add_f32: the f32 backward with dx = res + (the backward), res after rstd.
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "common.cuh"

// No __restrict__ on xr: the residual kernel rereads x it has just written, which must not
// go through the non-coherent read-only path; the kernels' own __restrict__ still applies.
template <typename T, typename TH = float>
__device__ __forceinline__ void layernorm_row(const T* xr, const float* __restrict__ gamma,
                                              const float* __restrict__ beta, T* yr, float* mean_out,
                                              float* rstd_out, int row, int cols, float eps, TH* yhr = nullptr) {
  const int lane = threadIdx.x & 31;
  float s = 0.f;
  for (int c = lane; c < cols; c += 32) s += load_f32(xr, c);
  const float mean = warp_reduce_sum(s) / cols;
  float ss = 0.f;
  for (int c = lane; c < cols; c += 32) {
    const float d = load_f32(xr, c) - mean;
    ss += d * d;
  }
  const float rstd = rsqrtf(warp_reduce_sum(ss) / cols + eps);
  for (int c = lane; c < cols; c += 32) {
    const float v = (load_f32(xr, c) - mean) * rstd * gamma[c] + beta[c];
    if (yr) store_from_f32(yr, c, v);     // NULL: only the half output (layernorm_fwd_h*)
    if (yhr) store_from_f32(yhr, c, v);  // the next GEMM's half input, from the same f32 value  // the next GEMM's half input, from the same f32 value
  }
  if (lane == 0) {
    if (mean_out) mean_out[row] = mean;
    if (rstd_out) rstd_out[row] = rstd;
  }
}

template <typename T, typename TH = float>
__device__ __forceinline__ void layernorm_fwd(const T* __restrict__ x, const float* __restrict__ gamma,
                                              const float* __restrict__ beta, T* __restrict__ y, float* mean,
                                              float* rstd, int rows, int cols, float eps, TH* __restrict__ yh = nullptr) {
  const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= rows) return;  // whole warp leaves together: no block barrier in this kernel
  const size_t off = (size_t)row * cols;
  layernorm_row<T, TH>(x + off, gamma, beta, y ? y + off : nullptr, mean, rstd, row, cols, eps, yh ? yh + off : nullptr);
}

template <typename T, typename TH = float>
__device__ __forceinline__ void residual_layernorm_fwd(T* x, const T* __restrict__ residual,
                                                       const float* __restrict__ gamma,
                                                       const float* __restrict__ beta, T* __restrict__ y,
                                                       float* mean, float* rstd, int rows, int cols, float eps,
                                                       TH* __restrict__ yh = nullptr) {
  const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= rows) return;
  const int lane = threadIdx.x & 31;
  const size_t off = (size_t)row * cols;
  T* xr = x + off;
  const T* rr = residual + off;
  // each lane owns the columns lane, lane+32, ...: it rereads only what it wrote itself
  for (int c = lane; c < cols; c += 32) store_from_f32(xr, c, load_f32(xr, c) + load_f32(rr, c));
  layernorm_row<T, TH>(xr, gamma, beta, y + off, mean, rstd, row, cols, eps, yh ? yh + off : nullptr);
}

template <typename T>
__device__ __forceinline__ void layernorm_bwd(const T* __restrict__ dy, const T* __restrict__ x,
                                              const float* __restrict__ gamma, const float* __restrict__ mean,
                                              const float* __restrict__ rstd, T* __restrict__ dx,
                                              float* __restrict__ dgamma_partial, float* __restrict__ dbeta_partial,
                                              int rows, int cols, const T* __restrict__ res = nullptr) {
  const int chunk = CEIL_DIV(rows, (int)gridDim.x);
  const int r0 = min(rows, (int)blockIdx.x * chunk);
  const int r1 = min(rows, r0 + chunk);
  const int lane = threadIdx.x & 31;
  const int nwarps = blockDim.x >> 5;
  const float inv_cols = 1.f / cols;

  // dx: one warp per row of this block's chunk
  for (int row = r0 + (int)(threadIdx.x >> 5); row < r1; row += nwarps) {
    const size_t off = (size_t)row * cols;
    const float m = mean[row], rs = rstd[row];
    float a = 0.f, b = 0.f;  // sum g*dy, sum g*dy*xhat
    for (int c = lane; c < cols; c += 32) {
      const float gdy = gamma[c] * load_f32(dy, off + c);
      a += gdy;
      b += gdy * (load_f32(x, off + c) - m) * rs;
    }
    a = warp_reduce_sum(a) * inv_cols;
    b = warp_reduce_sum(b) * inv_cols;
    for (int c = lane; c < cols; c += 32) {
      const float xhat = (load_f32(x, off + c) - m) * rs;
      const float g = rs * (gamma[c] * load_f32(dy, off + c) - a - xhat * b);
      store_from_f32(dx, off + c, res ? load_f32(res, off + c) + g : g);
    }
  }

  // dgamma/dbeta partials: one thread per column, rows of the chunk in order (deterministic)
  for (int c = threadIdx.x; c < cols; c += blockDim.x) {
    float dg = 0.f, db = 0.f;
    for (int row = r0; row < r1; ++row) {
      const size_t i = (size_t)row * cols + c;
      const float d = load_f32(dy, i);
      dg += d * (load_f32(x, i) - mean[row]) * rstd[row];
      db += d;
    }
    dgamma_partial[(size_t)blockIdx.x * cols + c] = dg;
    dbeta_partial[(size_t)blockIdx.x * cols + c] = db;
  }
}

extern "C" __global__ void layernorm_fwd_f32(const float* __restrict__ x, const float* __restrict__ gamma,
                                             const float* __restrict__ beta, float* __restrict__ y, float* mean,
                                             float* rstd, int rows, int cols, float eps) {
  layernorm_fwd<float>(x, gamma, beta, y, mean, rstd, rows, cols, eps);
}

extern "C" __global__ void layernorm_fwd_bf16(const __nv_bfloat16* __restrict__ x, const float* __restrict__ gamma,
                                              const float* __restrict__ beta, __nv_bfloat16* __restrict__ y,
                                              float* mean, float* rstd, int rows, int cols, float eps) {
  layernorm_fwd<__nv_bfloat16>(x, gamma, beta, y, mean, rstd, rows, cols, eps);
}

extern "C" __global__ void layernorm_fwd_f16(const __half* __restrict__ x, const float* __restrict__ gamma,
                                              const float* __restrict__ beta, __half* __restrict__ y,
                                              float* mean, float* rstd, int rows, int cols, float eps) {
  layernorm_fwd<__half>(x, gamma, beta, y, mean, rstd, rows, cols, eps);
}

extern "C" __global__ void residual_layernorm_fwd_f32(float* x, const float* __restrict__ residual,
                                                      const float* __restrict__ gamma, const float* __restrict__ beta,
                                                      float* __restrict__ y, float* mean, float* rstd, int rows,
                                                      int cols, float eps) {
  residual_layernorm_fwd<float>(x, residual, gamma, beta, y, mean, rstd, rows, cols, eps);
}

extern "C" __global__ void residual_layernorm_fwd_bf16(__nv_bfloat16* x, const __nv_bfloat16* __restrict__ residual,
                                                       const float* __restrict__ gamma,
                                                       const float* __restrict__ beta, __nv_bfloat16* __restrict__ y,
                                                       float* mean, float* rstd, int rows, int cols, float eps) {
  residual_layernorm_fwd<__nv_bfloat16>(x, residual, gamma, beta, y, mean, rstd, rows, cols, eps);
}

extern "C" __global__ void residual_layernorm_fwd_f16(__half* x, const __half* __restrict__ residual,
                                                       const float* __restrict__ gamma,
                                                       const float* __restrict__ beta, __half* __restrict__ y,
                                                       float* mean, float* rstd, int rows, int cols, float eps) {
  residual_layernorm_fwd<__half>(x, residual, gamma, beta, y, mean, rstd, rows, cols, eps);
}

// f32 LayerNorm that also writes its output rounded to bf16 / f16 into yh (the half input of the
// next GEMM: no separate conversion pass). Same geometry and arguments as the f32 kernels, with yh
// after y; yh must not alias anything.
extern "C" __global__ void layernorm_fwd_f32_hbf16(const float* __restrict__ x, const float* __restrict__ gamma,
                                                   const float* __restrict__ beta, float* __restrict__ y,
                                                   __nv_bfloat16* __restrict__ yh, float* mean, float* rstd, int rows,
                                                   int cols, float eps) {
  layernorm_fwd<float, __nv_bfloat16>(x, gamma, beta, y, mean, rstd, rows, cols, eps, yh);
}
extern "C" __global__ void layernorm_fwd_f32_hf16(const float* __restrict__ x, const float* __restrict__ gamma,
                                                  const float* __restrict__ beta, float* __restrict__ y,
                                                  __half* __restrict__ yh, float* mean, float* rstd, int rows, int cols,
                                                  float eps) {
  layernorm_fwd<float, __half>(x, gamma, beta, y, mean, rstd, rows, cols, eps, yh);
}
extern "C" __global__ void residual_layernorm_fwd_f32_hbf16(float* x, const float* __restrict__ residual,
                                                            const float* __restrict__ gamma,
                                                            const float* __restrict__ beta, float* __restrict__ y,
                                                            __nv_bfloat16* __restrict__ yh, float* mean, float* rstd,
                                                            int rows, int cols, float eps) {
  residual_layernorm_fwd<float, __nv_bfloat16>(x, residual, gamma, beta, y, mean, rstd, rows, cols, eps, yh);
}
extern "C" __global__ void residual_layernorm_fwd_f32_hf16(float* x, const float* __restrict__ residual,
                                                           const float* __restrict__ gamma,
                                                           const float* __restrict__ beta, float* __restrict__ y,
                                                           __half* __restrict__ yh, float* mean, float* rstd, int rows,
                                                           int cols, float eps) {
  residual_layernorm_fwd<float, __half>(x, residual, gamma, beta, y, mean, rstd, rows, cols, eps, yh);
}

// f32 LayerNorm writing ONLY the bf16 / f16 output yh (no f32 y): the 16-bit activation path.
// (x, gamma, beta, yh, mean, rstd, rows, cols, eps): the math and geometry of layernorm_fwd_f32_h*.
extern "C" __global__ void layernorm_fwd_hbf16(const float* __restrict__ x, const float* __restrict__ gamma,
                                               const float* __restrict__ beta, __nv_bfloat16* __restrict__ yh, float* mean,
                                               float* rstd, int rows, int cols, float eps) {
  layernorm_fwd<float, __nv_bfloat16>(x, gamma, beta, nullptr, mean, rstd, rows, cols, eps, yh);
}
extern "C" __global__ void layernorm_fwd_hf16(const float* __restrict__ x, const float* __restrict__ gamma,
                                              const float* __restrict__ beta, __half* __restrict__ yh, float* mean,
                                              float* rstd, int rows, int cols, float eps) {
  layernorm_fwd<float, __half>(x, gamma, beta, nullptr, mean, rstd, rows, cols, eps, yh);
}

extern "C" __global__ void layernorm_bwd_f32(const float* __restrict__ dy, const float* __restrict__ x,
                                             const float* __restrict__ gamma, const float* __restrict__ mean,
                                             const float* __restrict__ rstd, float* __restrict__ dx,
                                             float* __restrict__ dgamma_partial, float* __restrict__ dbeta_partial,
                                             int rows, int cols) {
  layernorm_bwd<float>(dy, x, gamma, mean, rstd, dx, dgamma_partial, dbeta_partial, rows, cols);
}

// dx = res + the LayerNorm backward of dy: the residual stream's gradient added in the same pass
// (no separate axpy). Arguments as layernorm_bwd_f32 with res [rows, cols] f32 after rstd; same
// geometry and partials. res must not alias dx, dy or x.
extern "C" __global__ void layernorm_bwd_add_f32(const float* __restrict__ dy, const float* __restrict__ x,
                                                 const float* __restrict__ gamma, const float* __restrict__ mean,
                                                 const float* __restrict__ rstd, const float* __restrict__ res,
                                                 float* __restrict__ dx, float* __restrict__ dgamma_partial,
                                                 float* __restrict__ dbeta_partial, int rows, int cols) {
  layernorm_bwd<float>(dy, x, gamma, mean, rstd, dx, dgamma_partial, dbeta_partial, rows, cols, res);
}

extern "C" __global__ void layernorm_bwd_bf16(const __nv_bfloat16* __restrict__ dy, const __nv_bfloat16* __restrict__ x,
                                              const float* __restrict__ gamma, const float* __restrict__ mean,
                                              const float* __restrict__ rstd, __nv_bfloat16* __restrict__ dx,
                                              float* __restrict__ dgamma_partial, float* __restrict__ dbeta_partial,
                                              int rows, int cols) {
  layernorm_bwd<__nv_bfloat16>(dy, x, gamma, mean, rstd, dx, dgamma_partial, dbeta_partial, rows, cols);
}

extern "C" __global__ void layernorm_bwd_f16(const __half* __restrict__ dy, const __half* __restrict__ x,
                                              const float* __restrict__ gamma, const float* __restrict__ mean,
                                              const float* __restrict__ rstd, __half* __restrict__ dx,
                                              float* __restrict__ dgamma_partial, float* __restrict__ dbeta_partial,
                                              int rows, int cols) {
  layernorm_bwd<__half>(dy, x, gamma, mean, rstd, dx, dgamma_partial, dbeta_partial, rows, cols);
}

extern "C" __global__ void layernorm_bwd_reduce_f32(const float* __restrict__ dgamma_partial,
                                                    const float* __restrict__ dbeta_partial,
                                                    float* __restrict__ dgamma, float* __restrict__ dbeta,
                                                    int nparts, int cols) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  float dg = 0.f, db = 0.f;
  for (int p = 0; p < nparts; ++p) {
    dg += dgamma_partial[(size_t)p * cols + c];
    db += dbeta_partial[(size_t)p * cols + c];
  }
  dgamma[c] = dg;
  dbeta[c] = db;
}
