// flash_fwd.cu -- flash attention forward on tensor cores (FlashAttention-2 style), bf16 and f16.
//
// Same layouts and results as attention_fwd_* of kernels/attention.cu: q, k, v, o are [B, T, H*hd]
// (row stride H*hd), lse [B, H, T] f32 natural-log logsumexp (NULL: not written); S = q·kᵀ·scale,
// causal masks key j > query i; o = softmax(S)·v. Math: S and o accumulate in f32 (mma.sync
// m16n8k16), the online softmax in base 2 (scores scaled by scale·log2e, exp2f), P is rounded to
// the 16-bit type for P·V (as FlashAttention does); o rounds to nearest even at the store.
//
// flash_fwd_<T>(q, k, v, o, lse, B, T, H, hd, causal, scale): one block of 4 warps per (64-query
// tile, head, batch); warp w owns queries 16w .. 16w+15 of the tile. K and V stream through in
// 64-key tiles (causal: up to the block's last query), double-buffered by cp.async (tile i+1 is in
// flight while tile i is used); Q stays in shared memory; S = Q·Kᵀ by ldmatrix + mma; masked
// scores -> running max m, running (per-thread partial) sum l, the accumulator rescaled by
// 2^(m_old - m_new); o += P·V with P straight from the S registers and V by ldmatrix.trans.
// Tails: rows past T load as zeros (cp.async src-size 0) and are masked (keys) or not stored (queries);
// no mma for them at 16-row granularity: a warp whose 16 queries are all past T skips the tile's
// math, and key chunks of 16 all past T (or, causal, all past the warp's last query) are skipped
// (fl_mma_abt/pb nb), so the executed pairs are what src/perf/cost.rs `flash_pairs` counts.
//   hd: 64 or 80 (template instances; anything else __traps -- the launcher routes other head dims
//   to kernels/attention.cu). geometry: blockDim = (128, 1, 1); gridDim = (⌈T/64⌉, H, B).
//   dynamic smem: 4 tiles [64][hd+8] of T (Q, K x2, V) = 36,864 B (hd 64), 45,056 B (hd 80).
//   q, k, v rows 16-byte aligned (base pointers 16-byte aligned; hd·2 a multiple of 16).
// flash_varlen_fwd_<T>(q, k, v, o, lse, cu_seqlens, nseq, Tmax, H, hd, causal, scale): packed
//   sequences as attention_varlen_fwd_f32 (lse block of sequence z at cu_seqlens[z]·H);
//   gridDim = (⌈Tmax/64⌉, H, nseq).
// bf16_to_f32, f16_to_f32: 16-bit -> f32 conversions (end of file).
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "flash_common.cuh"

template <typename T, int D>
__device__ __forceinline__ void flash_fwd_body(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ o,
                                               float* __restrict__ lse, int row0, int T_, int H, int causal, float scale, T* smem) {
  constexpr int LD = D + 8, NT = D / 8, TILE = FL_TILE * LD;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int h = blockIdx.y, q0 = blockIdx.x * FL_TILE;
  const int W = H * D;
  const size_t base = (size_t)row0 * W + (size_t)h * D;
  T* Qs = smem;
  T* Ks = Qs + TILE;      // [2][64][LD]: K double-buffered
  T* Vs = Ks + 2 * TILE;  // [64][LD]: V single-buffered, V(it+1) loads while S(it+1) is computed
  const float sl2 = scale * FL_LOG2E;
  const int kend = causal ? min(T_, q0 + FL_TILE) : T_;
  const int ntiles = CEIL_DIV(kend, FL_TILE);
  const int rows[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};
  const bool live = q0 + warp * 16 < T_;

  // commit groups: {Q, K0}, {V0}; then per tile {K(it+1)} at its start and {V(it+1)} after PV(it)
  fl_load_tile<T, D>(Qs, q + base, q0, T_, W);
  fl_load_tile<T, D>(Ks, k + base, 0, T_, W);
  cp_async_commit();
  fl_load_tile<T, D>(Vs, v + base, 0, T_, W);
  cp_async_commit();

  float acc[NT][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
#pragma unroll
  for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  for (int it = 0; it < ntiles; ++it) {
    const int k0 = it * FL_TILE, buf = it & 1;
    if (it + 1 < ntiles) {  // K(it+1) into the other buffer, last read by S(it-1) (barriers since)
      fl_load_tile<T, D>(Ks + (buf ^ 1) * TILE, k + base, k0 + FL_TILE, T_, W);
      cp_async_commit();
      cp_async_wait<2>();  // K(it) (and Q) landed; V(it) and K(it+1) may be in flight
    } else {
      cp_async_wait<1>();  // K(it) landed; V(it) may be in flight
    }
    __syncthreads();  // K(it) (and Q) visible to all threads
    float s[8][4];
    if (live) {  // warp-uniform: a warp whose 16 rows are all past T computes nothing (barriers stay outside)
    // key chunks of 16 with a key < T and (causal) a key <= the warp's last row; the rest cost no mma
    const int nb = min(fl_chunks16(T_ - k0), causal ? fl_chunks16(q0 + warp * 16 + 16 - k0) : 4);
#pragma unroll
    for (int j = 0; j < 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
    fl_mma_abt<T, D>(s, Qs + warp * 16 * LD, Ks + buf * TILE, nb);
    float mt[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = k0 + j * 8 + 2 * t + (e & 1);
        s[j][e] = (c < T_ && (!causal || c <= rows[e >> 1])) ? s[j][e] * sl2 : -INFINITY;
        mt[e >> 1] = fmaxf(mt[e >> 1], s[j][e]);
      }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      // the row's 4 lanes (a quad) hold its 64 scores; finite: the first tile holds key 0, which every row sees
      mt[r] = fmaxf(mt[r], __shfl_xor_sync(FULL_MASK, mt[r], 1));
      mt[r] = fmaxf(mt[r], __shfl_xor_sync(FULL_MASK, mt[r], 2));
      const float mn = fmaxf(m[r], mt[r]);
      const float alpha = exp2f(m[r] - mn);  // 0 on the first tile (m = -inf)
      m[r] = mn;
      l[r] *= alpha;
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        acc[j][2 * r] *= alpha;
        acc[j][2 * r + 1] *= alpha;
      }
    }
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[j][e] = exp2f(s[j][e] - m[e >> 1]);
        l[e >> 1] += s[j][e];
      }
    }
    if (it + 1 < ntiles) cp_async_wait<1>();  // V(it) landed; K(it+1) may be in flight
    else cp_async_wait<0>();
    __syncthreads();  // V(it) visible to all threads
    if (live) fl_mma_pb<T, D>(acc, s, Vs, min(fl_chunks16(T_ - k0), causal ? fl_chunks16(q0 + warp * 16 + 16 - k0) : 4));
    __syncthreads();  // every warp is done with V(it) and K(it) before they are refilled
    if (it + 1 < ntiles) {
      fl_load_tile<T, D>(Vs, v + base, k0 + FL_TILE, T_, W);
      cp_async_commit();
    }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(FULL_MASK, l[r], 1);
    l[r] += __shfl_xor_sync(FULL_MASK, l[r], 2);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (rows[r] < T_) {
      const float inv = 1.f / l[r];
      T* orow = o + base + (size_t)rows[r] * W;
#pragma unroll
      for (int j = 0; j < NT; ++j) *reinterpret_cast<unsigned*>(orow + j * 8 + 2 * t) = pack2<T>(acc[j][2 * r] * inv, acc[j][2 * r + 1] * inv);
      if (lse != nullptr && t == 0) lse[(size_t)row0 * H + (size_t)h * T_ + rows[r]] = (m[r] + log2f(l[r])) * FL_LN2;
    }
  }
}

// HD = 64: the hd-64 instance alone (flash_fwd64_<T>); 0: both head dims.
template <typename T, int HD = 0>
__device__ __forceinline__ void flash_fwd(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ o,
                                          float* __restrict__ lse, int row0, int T_, int H, int hd, int causal, float scale) {
  extern __shared__ __align__(16) float fl_smem[];
  if (blockDim.x != FL_THREADS || blockDim.y != 1 || blockDim.z != 1) __trap();
  T* smem = reinterpret_cast<T*>(fl_smem);
  if (hd == 64) flash_fwd_body<T, 64>(q, k, v, o, lse, row0, T_, H, causal, scale, smem);
  else if (HD == 0 && hd == 80) flash_fwd_body<T, 80>(q, k, v, o, lse, row0, T_, H, causal, scale, smem);
  else __trap();
}

// flash_fwd64_<T>: the batched forward's hd-64 instance alone, compiled on sm_90 for 5 resident
// blocks per SM (<= 96 registers, 0 spills; 20 warps/SM instead of 16 at the 127 registers of the
// two-instance build; 5 x 37 KB of shared memory fit the 228 KB). Other archs fit 4 or fewer blocks
// by shared memory and keep the unbounded build. The launcher picks it at hd 64 (batched only: the
// varlen forward spills at 96).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define FL_FWD64_BLOCKS_SM 5
#else
#define FL_FWD64_BLOCKS_SM 1
#endif

extern "C" __global__ void __launch_bounds__(FL_THREADS)
flash_fwd_bf16(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k, const __nv_bfloat16* __restrict__ v,
               __nv_bfloat16* __restrict__ o, float* __restrict__ lse, int B, int T, int H, int hd, int causal, float scale) {
  (void)B;
  flash_fwd<__nv_bfloat16>(q, k, v, o, lse, blockIdx.z * T, T, H, hd, causal, scale);
}

extern "C" __global__ void __launch_bounds__(FL_THREADS)
flash_fwd_f16(const __half* __restrict__ q, const __half* __restrict__ k, const __half* __restrict__ v, __half* __restrict__ o,
              float* __restrict__ lse, int B, int T, int H, int hd, int causal, float scale) {
  (void)B;
  flash_fwd<__half>(q, k, v, o, lse, blockIdx.z * T, T, H, hd, causal, scale);
}

extern "C" __global__ void __launch_bounds__(FL_THREADS, FL_FWD64_BLOCKS_SM)
flash_fwd64_bf16(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k, const __nv_bfloat16* __restrict__ v,
                 __nv_bfloat16* __restrict__ o, float* __restrict__ lse, int B, int T, int H, int hd, int causal, float scale) {
  (void)B;
  flash_fwd<__nv_bfloat16, 64>(q, k, v, o, lse, blockIdx.z * T, T, H, hd, causal, scale);
}

extern "C" __global__ void __launch_bounds__(FL_THREADS, FL_FWD64_BLOCKS_SM)
flash_fwd64_f16(const __half* __restrict__ q, const __half* __restrict__ k, const __half* __restrict__ v, __half* __restrict__ o,
                float* __restrict__ lse, int B, int T, int H, int hd, int causal, float scale) {
  (void)B;
  flash_fwd<__half, 64>(q, k, v, o, lse, blockIdx.z * T, T, H, hd, causal, scale);
}

extern "C" __global__ void __launch_bounds__(FL_THREADS)
flash_varlen_fwd_bf16(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k, const __nv_bfloat16* __restrict__ v,
                      __nv_bfloat16* __restrict__ o, float* __restrict__ lse, const int* __restrict__ cu_seqlens, int nseq, int Tmax, int H,
                      int hd, int causal, float scale) {
  (void)Tmax;
  int off, len;
  if (!fl_varlen_seq(cu_seqlens, nseq, 1, &off, &len)) return;
  flash_fwd<__nv_bfloat16>(q, k, v, o, lse, off, len, H, hd, causal, scale);
}

extern "C" __global__ void __launch_bounds__(FL_THREADS)
flash_varlen_fwd_f16(const __half* __restrict__ q, const __half* __restrict__ k, const __half* __restrict__ v, __half* __restrict__ o,
                     float* __restrict__ lse, const int* __restrict__ cu_seqlens, int nseq, int Tmax, int H, int hd, int causal,
                     float scale) {
  (void)Tmax;
  int off, len;
  if (!fl_varlen_seq(cu_seqlens, nseq, 1, &off, &len)) return;
  flash_fwd<__half>(q, k, v, o, lse, off, len, H, hd, causal, scale);
}

// bf16_to_f32(x, y, n) / f16_to_f32(x, y, n): y[i] = f32(x[i]) (exact), grid-stride, any 1-D geometry:
// the device towers' f32 activations back from the flash kernels' 16-bit outputs (f32_to_bf16 /
// f32_to_f16 of kernels/matmul.cu go the other way).
extern "C" __global__ void bf16_to_f32(const __nv_bfloat16* __restrict__ x, float* __restrict__ y, int n) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
    y[i] = __bfloat162float(x[i]);
}

extern "C" __global__ void f16_to_f32(const __half* __restrict__ x, float* __restrict__ y, int n) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
    y[i] = __half2float(x[i]);
}
