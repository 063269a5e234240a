// embed.cu -- the towers' embedding and pooling gathers (CLIP inference, f32).
//
// All tensors are row-major f32 except the int32 index vectors. One thread per OUTPUT element,
// grid-stride loops (any grid works); no shared memory, no barriers.
//   geometry: blockDim = (256, 1, 1) (any size works); gridDim.x = min(CEIL_DIV(total, 256), 16384)
//   total = the number of output elements named below.
//
// text_embed_f32(ids, tok, pos, out, B, T, W): out[b, t, c] = tok[ids[b·T + t], c] + pos[t, c].
//   ids int32 [B, T] (each in [0, V): the caller checks), tok [V, W], pos [>= T, W], out [B, T, W].
// patch_im2col_f32(pixels, cols, B, C, S, P): the stride-P, kernel-P convolution's im2col.
//   pixels [B, C, S, S]; G = S / P patches per side (a remainder is ignored, as the conv does),
//   N = G·G; cols [B·N, C·P·P]: cols[b·N + gy·G + gx, (c·P + ky)·P + kx] =
//   pixels[b, c, gy·P + ky, gx·P + kx]. The GEMM cols·Wᵀ with the conv weight [W, C, P, P] viewed as
//   [W, C·P·P] then gives the patch embeddings [B·N, W].
// vision_embed_assemble_f32(patches, cls, pos, out, B, N, W): out [B, N+1, W];
//   out[b, 0, c] = cls[c] + pos[0, c]; out[b, t, c] = patches[b·N + t-1, c] + pos[t, c] (t >= 1).
// pool_rows_f32(x, index, out, B, T, W): out[b, c] = x[b·T + index[b], c]; index int32 [B], each in
//   [0, T) (the class token 0, or the end-of-text position). x [B, T, W], out [B, W].
#include <cuda_runtime.h>
#include "common.cuh"

#define GRID_STRIDE(i, total) \
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (total); i += (size_t)gridDim.x * blockDim.x)

extern "C" __global__ void text_embed_f32(const int* __restrict__ ids, const float* __restrict__ tok,
                                          const float* __restrict__ pos, float* __restrict__ out, int B, int T,
                                          int W) {
  const size_t total = (size_t)B * T * W;
  GRID_STRIDE(i, total) {
    const size_t row = i / W;
    const int c = (int)(i - row * W);
    const int t = (int)(row % T);
    out[i] = tok[(size_t)ids[row] * W + c] + pos[(size_t)t * W + c];
  }
}

// The body of both im2col kernels: cols[i] = the pixel it names (see the header), any element type.
template <typename T>
__device__ __forceinline__ void im2col_copy(const T* __restrict__ pixels, T* __restrict__ cols, int B, int C, int S,
                                            int P) {
  const int G = S / P, N = G * G, K = C * P * P;
  const size_t total = (size_t)B * N * K;
  GRID_STRIDE(i, total) {
    const size_t row = i / K;
    const int col = (int)(i - row * K);
    const int b = (int)(row / N), patch = (int)(row % N);
    const int gy = patch / G, gx = patch % G;
    const int c = col / (P * P), rem = col % (P * P);
    const int ky = rem / P, kx = rem % P;
    cols[i] = pixels[(((size_t)b * C + c) * S + gy * P + ky) * S + gx * P + kx];
  }
}

extern "C" __global__ void patch_im2col_f32(const float* __restrict__ pixels, float* __restrict__ cols, int B,
                                            int C, int S, int P) {
  im2col_copy(pixels, cols, B, C, S, P);
}

// patch_im2col_h16(pixels, cols, B, C, S, P): patch_im2col_f32 moving 16-bit values (bf16 or f16
//   pixels, packed two per word, into the patch GEMM's 16-bit input): the same layout and geometry,
//   the bits copied unchanged (one 2-byte load and store a thread).
extern "C" __global__ void patch_im2col_h16(const unsigned short* __restrict__ pixels, unsigned short* __restrict__ cols,
                                            int B, int C, int S, int P) {
  im2col_copy(pixels, cols, B, C, S, P);
}

extern "C" __global__ void vision_embed_assemble_f32(const float* __restrict__ patches, const float* __restrict__ cls,
                                                     const float* __restrict__ pos, float* __restrict__ out, int B,
                                                     int N, int W) {
  const int T = N + 1;
  const size_t total = (size_t)B * T * W;
  GRID_STRIDE(i, total) {
    const size_t row = i / W;
    const int c = (int)(i - row * W);
    const int b = (int)(row / T), t = (int)(row % T);
    const float v = t == 0 ? cls[c] : patches[((size_t)b * N + t - 1) * W + c];
    out[i] = v + pos[(size_t)t * W + c];
  }
}

extern "C" __global__ void pool_rows_f32(const float* __restrict__ x, const int* __restrict__ index,
                                         float* __restrict__ out, int B, int T, int W) {
  const size_t total = (size_t)B * W;
  GRID_STRIDE(i, total) {
    const int b = (int)(i / W), c = (int)(i % W);
    out[i] = x[((size_t)b * T + index[b]) * W + c];
  }
}

// axpy_f32(y, x, alpha, n): y[i] += alpha * x[i] (residual gradients, copies into zeroed buffers).
// Grid-stride, any 1-D geometry. x must not alias y. float4 loads and stores in groups of four when
// both are 16-byte aligned, the tail (or everything, unaligned) one element a thread.
extern "C" __global__ void axpy_f32(float* __restrict__ y, const float* __restrict__ x, float alpha, int n) {
  const long long tid = blockIdx.x * (long long)blockDim.x + threadIdx.x, stride = (long long)gridDim.x * blockDim.x;
  long long done = 0;
  if (((reinterpret_cast<size_t>(x) | reinterpret_cast<size_t>(y)) & 15) == 0) {
    const long long quads = n / 4;
    for (long long q = tid; q < quads; q += stride) {
      const float4 a = reinterpret_cast<const float4*>(x)[q];
      float4 b = reinterpret_cast<float4*>(y)[q];
      b.x = fmaf(alpha, a.x, b.x);
      b.y = fmaf(alpha, a.y, b.y);
      b.z = fmaf(alpha, a.z, b.z);
      b.w = fmaf(alpha, a.w, b.w);
      reinterpret_cast<float4*>(y)[q] = b;
    }
    done = quads * 4;
  }
  for (long long i = done + tid; i < n; i += stride) y[i] = fmaf(alpha, x[i], y[i]);
}

// copy_f32(x, y, n): y[i] = x[i] over n elements (64-bit), grid-stride, any 1-D geometry (one
// float4 a thread when both are 16-byte aligned, the tail or everything else one element a thread).
// y must not alias x. The device backend's copies (no memset + axpy).
extern "C" __global__ void copy_f32(const float* __restrict__ x, float* __restrict__ y, long long n) {
  const long long tid = blockIdx.x * (long long)blockDim.x + threadIdx.x, stride = (long long)gridDim.x * blockDim.x;
  long long done = 0;
  if (((reinterpret_cast<size_t>(x) | reinterpret_cast<size_t>(y)) & 15) == 0) {
    const long long quads = n / 4;
    for (long long q = tid; q < quads; q += stride) reinterpret_cast<float4*>(y)[q] = reinterpret_cast<const float4*>(x)[q];
    done = quads * 4;
  }
  for (long long i = done + tid; i < n; i += stride) y[i] = x[i];
}

// unpool_rows_f32(dp, index, dx, B, T, W): dx[b, index[b], :] += dp[b, :] — the backward of
// pool_rows_f32 (one row per sequence, so no two threads write the same element). dx is
// [B, T, W], zero elsewhere. Grid-stride over B·W.
extern "C" __global__ void unpool_rows_f32(const float* __restrict__ dp, const int* __restrict__ index,
                                           float* __restrict__ dx, int B, int T, int W) {
  const size_t total = (size_t)B * W;
  GRID_STRIDE(i, total) {
    const int b = (int)(i / W), c = (int)(i % W);
    dx[((size_t)b * T + index[b]) * W + c] += dp[i];
  }
}

// vision_embed_bwd_f32(dx, dpatches, B, N, W): dpatches[b·N + t − 1, :] = dx[b, t, :] for t ≥ 1 —
// the patch rows of the gradient of vision_embed_assemble_f32 (the class row and the position
// table get theirs from batch reductions). Grid-stride over B·N·W.
extern "C" __global__ void vision_embed_bwd_f32(const float* __restrict__ dx, float* __restrict__ dpatches, int B,
                                                int N, int W) {
  const size_t total = (size_t)B * N * W;
  GRID_STRIDE(i, total) {
    const size_t row = i / W;
    const int c = (int)(i % W);
    const int b = (int)(row / N), t = (int)(row % N) + 1;
    dpatches[i] = dx[((size_t)b * (N + 1) + t) * W + c];
  }
}

// embedding_bwd_rows_f32(dx, order, starts, uniq, dtable, U, W): the token-embedding gradient as
// a deterministic scatter-add without atomics. The host groups the B·T positions by token id
// (src/ops/embedding.rs `group_by_id`, stable, so each group keeps position order): uniq [U] the
// distinct ids, starts [U + 1] offsets into order, order [B·T] the row of dx for each slot. One
// thread per (u, c) sums its group's rows in order and adds the sum to dtable[uniq[u], c]; no
// two threads touch the same element. dx [B·T, W], dtable [V, W] (accumulated into, += ).
// Grid-stride over U·W.
extern "C" __global__ void embedding_bwd_rows_f32(const float* __restrict__ dx, const int* __restrict__ order,
                                                  const int* __restrict__ starts, const int* __restrict__ uniq,
                                                  float* __restrict__ dtable, int U, int W) {
  const size_t total = (size_t)U * W;
  GRID_STRIDE(i, total) {
    const int u = (int)(i / W), c = (int)(i % W);
    float s = 0.f;
    for (int j = starts[u]; j < starts[u + 1]; ++j) s += dx[(size_t)order[j] * W + c];
    dtable[(size_t)uniq[u] * W + c] += s;
  }
}
