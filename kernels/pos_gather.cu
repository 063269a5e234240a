// pos_gather.cu -- positional-embedding gather through Long-CLIP's knowledge-preserved stretch
// (methods.md §2.1), computed on the fly (no materialised stretched table), and its backward.
//
// Stretch of a base table P [L, W] (f32) with (keep, ratio) to Ln = ratio*L - (ratio-1)*keep rows
// (L = 77, keep = 20, ratio = 4 -> 248). Every stretched row j is w0*P[i0] + w1*P[i1]:
//   j < keep                              P[j]                                          (9)
//   keep <= j < E, E = keep+ratio*(L-1-keep), t = j-keep, i = t/ratio, r = t%ratio:
//                                          (1 - r/ratio)*P[keep+i] + (r/ratio)*P[keep+i+1]   (10)
//   E <= j < Ln, r = j-E                   (1 + r/ratio)*P[L-1] - (r/ratio)*P[L-2]           (11)
//                                          (= P[L-1] + r/ratio*(P[L-1]-P[L-2]): linear extrapolation)
// Constraints (checked by the host, not here): L >= 2, 0 <= keep <= L-1, ratio >= 1, W >= 1.
// ratio = 1 is the identity map (Ln = L): the same kernels are then a plain embedding gather and
// its deterministic scatter, e.g. over Long-CLIP's trainable 248-row table.
//
// Forward  pos_gather_fwd_<T>(P, pos, out, rows, L, W, keep, ratio): out[n, :] = stretched[pos[n], :]
//          for n < rows; pos is u32 [rows]; out is T [rows, W] (f32 or bf16, rounded once).
//          A position >= Ln traps (like PyTorch's device-side index assert).
//          geometry: ONE WARP PER ROW; blockDim = (32*k, 1, 1); gridDim.x = CEIL_DIV(rows, k).
//          No shared memory, no barriers.
// Stretch  pos_stretch_f32(P, out, L, W, keep, ratio): the whole stretched table out [Ln, W] (the
//          forward with pos[n] = n, rows = Ln). Same geometry with rows = Ln.
// Backward pos_gather_bwd_<T>(dout, pos, dP_partial, rows, L, W, keep, ratio):
//          dP[i, c] = sum_n sum_{(i_k, w_k) of pos[n], i_k = i} w_k * dout[n, c]  as DETERMINISTIC
//          PARTIAL SUMS, no atomics: block (bx, g) owns columns c = bx*blockDim.x + threadIdx.x and the
//          row chunk [g*chunk, (g+1)*chunk), chunk = CEIL_DIV(rows, gridDim.y); each thread keeps the L
//          accumulators of its column in shared memory (a column per thread: no sharing, no races)
//          and adds its chunk's rows in order; it writes dP_partial[g, :, c] ([gridDim.y, L, W]; zeros
//          for an empty chunk). With gridDim.y = 1, dP_partial IS dP.
//          The stretch coefficients of all Ln rows are tabulated in shared memory first (one barrier).
//          geometry: blockDim = (32*k, 1, 1) (128 recommended); gridDim = (CEIL_DIV(W, blockDim.x), G),
//          G in [1, 65535]; dynamic smem = (L*blockDim.x + 4*Ln) * 4 bytes (43,392 B at L = 77,
//          Ln = 248, blockDim 128; keep it <= 48 KiB or raise cudaFuncAttributeMaxDynamicSharedMemorySize).
// Reduce   pos_gather_bwd_reduce_f32(dP_partial, dP, G, n): dP[e] = sum_g dP_partial[g*n + e], n = L*W,
//          g in order. geometry: blockDim = (256, 1, 1), gridDim.x = CEIL_DIV(n, 256).
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "common.cuh"

struct StretchCoef {
  int i0, i1;
  float w0, w1;
};

// Row j of the stretched table as w0*P[i0] + w1*P[i1] (weights exact for ratio a power of two).
__device__ __forceinline__ StretchCoef stretch_coef(int j, int L, int keep, int ratio) {
  StretchCoef s;
  const int mid_end = keep + ratio * (L - 1 - keep);
  if (j < keep) {
    s.i0 = j, s.i1 = j, s.w0 = 1.f, s.w1 = 0.f;
  } else if (j < mid_end) {
    const int t = j - keep, i = t / ratio, r = t - i * ratio;
    const float w = (float)r / (float)ratio;
    s.i0 = keep + i, s.i1 = keep + i + 1, s.w0 = 1.f - w, s.w1 = w;
  } else {
    const float w = (float)(j - mid_end) / (float)ratio;
    s.i0 = L - 1, s.i1 = L - 2, s.w0 = 1.f + w, s.w1 = -w;
  }
  return s;
}

template <typename T>
__device__ __forceinline__ void pos_gather_fwd(const float* __restrict__ P, const unsigned* __restrict__ pos,
                                               T* __restrict__ out, int rows, int L, int W, int keep, int ratio) {
  const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= rows) return;  // whole warp leaves together; no barriers or collectives below
  const int lane = threadIdx.x & 31;
  const int new_len = ratio * L - (ratio - 1) * keep;
  const unsigned j = pos ? pos[row] : (unsigned)row;
  if (j >= (unsigned)new_len) __trap();
  const StretchCoef s = stretch_coef((int)j, L, keep, ratio);
  const float* p0 = P + (size_t)s.i0 * W;
  const float* p1 = P + (size_t)s.i1 * W;
  T* o = out + (size_t)row * W;
  for (int c = lane; c < W; c += 32) store_from_f32(o, c, s.w0 * p0[c] + s.w1 * p1[c]);
}

template <typename T>
__device__ __forceinline__ void pos_gather_bwd(const T* __restrict__ dout, const unsigned* __restrict__ pos,
                                               float* __restrict__ dP_partial, int rows, int L, int W, int keep,
                                               int ratio) {
  extern __shared__ __align__(16) float smem[];
  const int new_len = ratio * L - (ratio - 1) * keep;
  const int bd = blockDim.x, tid = threadIdx.x;
  float* acc = smem;                                   // [L][blockDim.x]
  int* cidx = reinterpret_cast<int*>(smem + L * bd);   // [Ln][2]
  float* cw = smem + L * bd + 2 * new_len;             // [Ln][2]
  for (int j = tid; j < new_len; j += bd) {
    const StretchCoef s = stretch_coef(j, L, keep, ratio);
    cidx[2 * j] = s.i0, cidx[2 * j + 1] = s.i1;
    cw[2 * j] = s.w0, cw[2 * j + 1] = s.w1;
  }
  for (int i = 0; i < L; ++i) acc[i * bd + tid] = 0.f;
  __syncthreads();  // coefficient table complete (every thread reaches this: no early exit above)

  const int c = blockIdx.x * bd + tid;
  const int chunk = CEIL_DIV(rows, (int)gridDim.y);
  const int r0 = min(rows, (int)blockIdx.y * chunk);
  const int r1 = min(rows, r0 + chunk);
  if (c >= W) return;  // no barrier after this point
  for (int n = r0; n < r1; ++n) {
    const unsigned j = pos[n];
    if (j >= (unsigned)new_len) __trap();
    const float d = load_f32(dout, (size_t)n * W + c);
    acc[cidx[2 * j] * bd + tid] += cw[2 * j] * d;
    const float w1 = cw[2 * j + 1];
    if (w1 != 0.f) acc[cidx[2 * j + 1] * bd + tid] += w1 * d;
  }
  float* dst = dP_partial + (size_t)blockIdx.y * L * W + c;
  for (int i = 0; i < L; ++i) dst[(size_t)i * W] = acc[i * bd + tid];
}

extern "C" __global__ void pos_gather_fwd_f32(const float* __restrict__ P, const unsigned* __restrict__ pos,
                                              float* __restrict__ out, int rows, int L, int W, int keep, int ratio) {
  pos_gather_fwd<float>(P, pos, out, rows, L, W, keep, ratio);
}

extern "C" __global__ void pos_gather_fwd_bf16(const float* __restrict__ P, const unsigned* __restrict__ pos,
                                               __nv_bfloat16* __restrict__ out, int rows, int L, int W, int keep,
                                               int ratio) {
  pos_gather_fwd<__nv_bfloat16>(P, pos, out, rows, L, W, keep, ratio);
}

extern "C" __global__ void pos_gather_fwd_f16(const float* __restrict__ P, const unsigned* __restrict__ pos,
                                               __half* __restrict__ out, int rows, int L, int W, int keep,
                                               int ratio) {
  pos_gather_fwd<__half>(P, pos, out, rows, L, W, keep, ratio);
}

extern "C" __global__ void pos_stretch_f32(const float* __restrict__ P, float* __restrict__ out, int L, int W,
                                           int keep, int ratio) {
  pos_gather_fwd<float>(P, nullptr, out, ratio * L - (ratio - 1) * keep, L, W, keep, ratio);
}

extern "C" __global__ void pos_gather_bwd_f32(const float* __restrict__ dout, const unsigned* __restrict__ pos,
                                              float* __restrict__ dP_partial, int rows, int L, int W, int keep,
                                              int ratio) {
  pos_gather_bwd<float>(dout, pos, dP_partial, rows, L, W, keep, ratio);
}

extern "C" __global__ void pos_gather_bwd_bf16(const __nv_bfloat16* __restrict__ dout,
                                               const unsigned* __restrict__ pos, float* __restrict__ dP_partial,
                                               int rows, int L, int W, int keep, int ratio) {
  pos_gather_bwd<__nv_bfloat16>(dout, pos, dP_partial, rows, L, W, keep, ratio);
}

extern "C" __global__ void pos_gather_bwd_f16(const __half* __restrict__ dout,
                                               const unsigned* __restrict__ pos, float* __restrict__ dP_partial,
                                               int rows, int L, int W, int keep, int ratio) {
  pos_gather_bwd<__half>(dout, pos, dP_partial, rows, L, W, keep, ratio);
}

extern "C" __global__ void pos_gather_bwd_reduce_f32(const float* __restrict__ dP_partial, float* __restrict__ dP,
                                                     int nparts, int n) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= n) return;
  float s = 0.f;
  for (int g = 0; g < nparts; ++g) s += dP_partial[(size_t)g * n + e];
  dP[e] = s;
}
