// flash_bwd.cu -- flash attention backward on tensor cores, bf16 and f16, deterministic.
//
// Same layouts, arguments and results as attention_bwd_* of kernels/attention.cu: from q, k, v, o,
// dout ([B, T, H*hd]) and the forward's lse ([B, H, T] f32, natural log) to dq, dk, dv. P =
// exp2(S·log2e - lse·log2e) is recomputed, D_i = Σ_e dout_ie·o_ie (the usual preprocessing) is
// computed per 64-query tile into shared memory, dS = P∘(dP - D), dP = dout·vᵀ; every product
// (S = Q·Kᵀ, dP = dO·Vᵀ, dV += Pᵀ·dO, dK += dSᵀ·Q, dQ += dS·K) is mma.sync m16n8k16 with f32
// accumulation, P and dS rounded to the 16-bit type as mma operands (FlashAttention-2 does the same).
//
// DETERMINISTIC (bitwise, any schedule, no atomics, no workspace, no zeroing): ONE launch with two
// kinds of block, every output element written by exactly one block, reductions in a fixed order:
//   blockIdx.x <  nt = ⌈T/64⌉: dK, dV of keys [64x, 64x+64); warp w owns keys 16w..16w+15 and
//     computes Sᵀ = K_w·Qᵀ and dPᵀ = V_w·dOᵀ (16 x 64) so that Pᵀ and dSᵀ are A operands straight from
//     registers; loops over 64-query tiles (causal: from the tile holding its first key), Q and dO
//     double-buffered by cp.async, with the tile's lse·log2e and D in shared memory.
//   blockIdx.x >= nt: dQ of queries [64(x-nt), +64); warp w owns 16 queries: S, dP, dS as in the
//     forward, dQ += dS·K with K by ldmatrix.trans; K and V double-buffered by cp.async.
//   The price: S and dP are computed twice (7 instead of 5 tile products per (query, key) tile pair).
//   Padding costs no mma at 16-row granularity: a warp whose 16 keys (dK/dV) or queries (dQ) are all
//   past T skips the tile's math, and chunks of 16 queries (dK/dV) or keys (dQ; causal: keys past the
//   warp's last query too) past T are skipped (fl_mma_abt/pb nb), as src/perf/cost.rs counts.
// geometry: blockDim = (128, 1, 1); gridDim = (2·⌈T/64⌉, H, B). hd 64 or 80 (else __trap).
// dynamic smem: 6 tiles [64][hd+8] of T + 256 f32 = 56,320 B (hd 64), 68,608 B (hd 80): the
// launcher raises the kernel's dynamic shared memory limit.
// flash_varlen_bwd_<T>(..., cu_seqlens, nseq, Tmax, H, hd, causal, scale): packed sequences as
//   attention_varlen_bwd_f32; gridDim = (2·⌈Tmax/64⌉, H, nseq). flash_varlen_bwd64_<T>: the same,
//   hd 64 only (else __trap), with the register bound of the batched kernels (see below).
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "flash_common.cuh"

// lse·log2e and D = Σ dout∘o of rows [r0, r0 + 64) into lse2s[64], Ds[64] (0 past T). Two threads a row.
template <typename T, int D>
__device__ __forceinline__ void fl_row_stats(const T* __restrict__ o, const T* __restrict__ dout, const float* __restrict__ lse_bh, int r0,
                                             int T_, int W, float* lse2s, float* Ds) {
  const int r = threadIdx.x >> 1, half = threadIdx.x & 1;
  float part = 0.f;
  if (r0 + r < T_) {
    const T* orow = o + (size_t)(r0 + r) * W;
    const T* drow = dout + (size_t)(r0 + r) * W;
    for (int c = half * 2; c < D; c += 4) {
      const unsigned ov = *reinterpret_cast<const unsigned*>(orow + c), dv = *reinterpret_cast<const unsigned*>(drow + c);
      part = fmaf(unpack1<T>((unsigned short)ov), unpack1<T>((unsigned short)dv), part);
      part = fmaf(unpack1<T>((unsigned short)(ov >> 16)), unpack1<T>((unsigned short)(dv >> 16)), part);
    }
  }
  part += __shfl_xor_sync(FULL_MASK, part, 1);
  if (half == 0) {
    Ds[r] = part;
    lse2s[r] = r0 + r < T_ ? lse_bh[r0 + r] * FL_LOG2E : 0.f;
  }
}

template <typename T, int D>
__device__ __forceinline__ void flash_bwd_body(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                               const T* __restrict__ o, const T* __restrict__ dout, const float* __restrict__ lse,
                                               T* __restrict__ dq, T* __restrict__ dk, T* __restrict__ dv, int row0, int T_, int H, int causal,
                                               float scale, T* smem) {
  constexpr int LD = D + 8, NT = D / 8, TILE = FL_TILE * LD;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int h = blockIdx.y;
  const int W = H * D;
  const size_t base = (size_t)row0 * W + (size_t)h * D;
  const float* lse_bh = lse + (size_t)row0 * H + (size_t)h * T_;
  const float sl2 = scale * FL_LOG2E;
  const int nt = CEIL_DIV(T_, FL_TILE);
  float* lse2s = reinterpret_cast<float*>(smem + 6 * TILE);  // [2][64]
  float* Ds = lse2s + 2 * FL_TILE;                            // [2][64]
  float acc_a[NT][4], acc_b[NT][4];  // dK, dV (key blocks) or dQ (query blocks, acc_a)
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_a[j][e] = acc_b[j][e] = 0.f;

  if ((int)blockIdx.x < nt) {  // ---- dK, dV of keys [n0, n0 + 64)
    const int n0 = blockIdx.x * FL_TILE;
    T* Ks = smem;
    T* Vs = Ks + TILE;
    T* Qs = Vs + TILE;      // [2][64][LD]
    T* dOs = Qs + 2 * TILE;  // [2][64][LD]
    const int qbeg = causal ? n0 : 0;  // the tile holding key n0 (tiles of 64 on both sides)
    const int nq = CEIL_DIV(T_ - qbeg, FL_TILE);
    const int keys[2] = {n0 + warp * 16 + g, n0 + warp * 16 + g + 8};
    const bool live = n0 + warp * 16 < T_;  // some key of the warp is < T
    fl_load_tile<T, D>(Ks, k + base, n0, T_, W);
    fl_load_tile<T, D>(Vs, v + base, n0, T_, W);
    fl_load_tile<T, D>(Qs, q + base, qbeg, T_, W);
    fl_load_tile<T, D>(dOs, dout + base, qbeg, T_, W);
    cp_async_commit();
    fl_row_stats<T, D>(o + base, dout + base, lse_bh, qbeg, T_, W, lse2s, Ds);
    for (int it = 0; it < nq; ++it) {
      const int qs = qbeg + it * FL_TILE, st = it & 1;
      if (it + 1 < nq) {
        fl_load_tile<T, D>(Qs + (st ^ 1) * TILE, q + base, qs + FL_TILE, T_, W);
        fl_load_tile<T, D>(dOs + (st ^ 1) * TILE, dout + base, qs + FL_TILE, T_, W);
        cp_async_commit();
        fl_row_stats<T, D>(o + base, dout + base, lse_bh, qs + FL_TILE, T_, W, lse2s + (st ^ 1) * FL_TILE, Ds + (st ^ 1) * FL_TILE);
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();
      const T* Qb = Qs + st * TILE;
      const T* dOb = dOs + st * TILE;
      const float* l2 = lse2s + st * FL_TILE;
      const float* Dq = Ds + st * FL_TILE;
      if (live) {  // warp-uniform; query chunks of 16 past T cost no mma
      const int nb = fl_chunks16(T_ - qs);
      float p[8][4], ds[8][4];  // Pᵀ, then dSᵀ: [keys of the warp][64 queries]
#pragma unroll
      for (int j = 0; j < 8; ++j) p[j][0] = p[j][1] = p[j][2] = p[j][3] = ds[j][0] = ds[j][1] = ds[j][2] = ds[j][3] = 0.f;
      fl_mma_abt<T, D>(p, Ks + warp * 16 * LD, Qb, nb);
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int qi = j * 8 + 2 * t + (e & 1), r = qs + qi, c = keys[e >> 1];
          p[j][e] = (r < T_ && c < T_ && (!causal || c <= r)) ? exp2f(fmaf(p[j][e], sl2, -l2[qi])) : 0.f;
        }
      fl_mma_pb<T, D>(acc_b, p, dOb, nb);  // dV += Pᵀ·dO
      fl_mma_abt<T, D>(ds, Vs + warp * 16 * LD, dOb, nb);
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) ds[j][e] = p[j][e] * (ds[j][e] - Dq[j * 8 + 2 * t + (e & 1)]);
      fl_mma_pb<T, D>(acc_a, ds, Qb, nb);  // dK += dSᵀ·Q
      }
      __syncthreads();  // stage st is refilled next iteration
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (keys[r] < T_) {
        T* krow = dk + base + (size_t)keys[r] * W;
        T* vrow = dv + base + (size_t)keys[r] * W;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          *reinterpret_cast<unsigned*>(krow + j * 8 + 2 * t) = pack2<T>(acc_a[j][2 * r] * scale, acc_a[j][2 * r + 1] * scale);
          *reinterpret_cast<unsigned*>(vrow + j * 8 + 2 * t) = pack2<T>(acc_b[j][2 * r], acc_b[j][2 * r + 1]);
        }
      }
    }
  } else {  // ---- dQ of queries [m0, m0 + 64)
    const int m0 = (blockIdx.x - nt) * FL_TILE;
    T* Qs = smem;
    T* dOs = Qs + TILE;
    T* Ks = dOs + TILE;     // [2][64][LD]
    T* Vs = Ks + 2 * TILE;  // [2][64][LD]
    const int kend = causal ? min(T_, m0 + FL_TILE) : T_;
    const int nk = CEIL_DIV(kend, FL_TILE);
    const int rows[2] = {m0 + warp * 16 + g, m0 + warp * 16 + g + 8};
    const bool live = m0 + warp * 16 < T_;  // some query of the warp is < T
    fl_load_tile<T, D>(Qs, q + base, m0, T_, W);
    fl_load_tile<T, D>(dOs, dout + base, m0, T_, W);
    fl_load_tile<T, D>(Ks, k + base, 0, T_, W);
    fl_load_tile<T, D>(Vs, v + base, 0, T_, W);
    cp_async_commit();
    fl_row_stats<T, D>(o + base, dout + base, lse_bh, m0, T_, W, lse2s, Ds);
    __syncthreads();
    const float l2[2] = {lse2s[warp * 16 + g], lse2s[warp * 16 + g + 8]};
    const float Dr[2] = {Ds[warp * 16 + g], Ds[warp * 16 + g + 8]};
    for (int it = 0; it < nk; ++it) {
      const int k0 = it * FL_TILE, buf = it & 1;
      if (it + 1 < nk) {
        fl_load_tile<T, D>(Ks + (buf ^ 1) * TILE, k + base, k0 + FL_TILE, T_, W);
        fl_load_tile<T, D>(Vs + (buf ^ 1) * TILE, v + base, k0 + FL_TILE, T_, W);
        cp_async_commit();
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();
      const T* Kb = Ks + buf * TILE;
      if (live) {  // warp-uniform; key chunks of 16 past T (causal: past the warp's last query) cost no mma
      const int nb = min(fl_chunks16(T_ - k0), causal ? fl_chunks16(m0 + warp * 16 + 16 - k0) : 4);
      float p[8][4], ds[8][4];  // P, then dS: [queries of the warp][64 keys]
#pragma unroll
      for (int j = 0; j < 8; ++j) p[j][0] = p[j][1] = p[j][2] = p[j][3] = ds[j][0] = ds[j][1] = ds[j][2] = ds[j][3] = 0.f;
      fl_mma_abt<T, D>(p, Qs + warp * 16 * LD, Kb, nb);
      fl_mma_abt<T, D>(ds, dOs + warp * 16 * LD, Vs + buf * TILE, nb);
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int c = k0 + j * 8 + 2 * t + (e & 1), r = rows[e >> 1];
          const float pv = (r < T_ && c < T_ && (!causal || c <= r)) ? exp2f(fmaf(p[j][e], sl2, -l2[e >> 1])) : 0.f;
          ds[j][e] = pv * (ds[j][e] - Dr[e >> 1]);
        }
      fl_mma_pb<T, D>(acc_a, ds, Kb, nb);  // dQ += dS·K
      }
      __syncthreads();
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (rows[r] < T_) {
        T* qrow = dq + base + (size_t)rows[r] * W;
#pragma unroll
        for (int j = 0; j < NT; ++j) *reinterpret_cast<unsigned*>(qrow + j * 8 + 2 * t) = pack2<T>(acc_a[j][2 * r] * scale, acc_a[j][2 * r + 1] * scale);
      }
    }
  }
}

// HD: 0 = both head-dim instances (dispatch on hd), 64 = the hd-64 instance only (else __trap).
template <typename T, int HD = 0>
__device__ __forceinline__ void flash_bwd(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ o,
                                          const T* __restrict__ dout, const float* __restrict__ lse, T* __restrict__ dq, T* __restrict__ dk,
                                          T* __restrict__ dv, int row0, int T_, int H, int hd, int causal, float scale) {
  extern __shared__ __align__(16) float fl_smem[];
  if (blockDim.x != FL_THREADS || blockDim.y != 1 || blockDim.z != 1) __trap();
  T* smem = reinterpret_cast<T*>(fl_smem);
  if (hd == 64) flash_bwd_body<T, 64>(q, k, v, o, dout, lse, dq, dk, dv, row0, T_, H, causal, scale, smem);
  else if (HD == 0 && hd == 80) flash_bwd_body<T, 80>(q, k, v, o, dout, lse, dq, dk, dv, row0, T_, H, causal, scale, smem);
  else __trap();
}

// sm_90: the batched entry points are compiled for 3 resident blocks per SM (<= 168 registers, 0
// spills; 12 warps/SM on H100 instead of 8 at the 203 registers of the unbounded build; 3 x 57 KB of
// shared memory fit the 228 KB). Other archs fit only 2 (A100: 164 KB smem) or 1 (sm_86/89: 100 KB)
// by shared memory, so they keep 2 (where 168 would spill on sm_80). The varlen entry points of both
// head dims stay unbounded (at 168 the hd-80 instance spills 16 B: the sequence's offset and length
// live in registers); flash_varlen_bwd64_<T> (hd 64 only, the launcher's choice at hd 64) is bounded
// to 3 blocks like the batched ones.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define FL_BWD_BLOCKS_SM 3
#else
#define FL_BWD_BLOCKS_SM 2
#endif

#define FL_BWD_ARGS(T)                                                                                                                     \
  const T *__restrict__ q, const T *__restrict__ k, const T *__restrict__ v, const T *__restrict__ o, const T *__restrict__ dout,        \
      const float *__restrict__ lse, T *__restrict__ dq, T *__restrict__ dk, T *__restrict__ dv

extern "C" __global__ void __launch_bounds__(FL_THREADS, FL_BWD_BLOCKS_SM)
flash_bwd_bf16(FL_BWD_ARGS(__nv_bfloat16), int B, int T, int H, int hd, int causal, float scale) {
  (void)B;
  flash_bwd<__nv_bfloat16>(q, k, v, o, dout, lse, dq, dk, dv, blockIdx.z * T, T, H, hd, causal, scale);
}

extern "C" __global__ void __launch_bounds__(FL_THREADS, FL_BWD_BLOCKS_SM)
flash_bwd_f16(FL_BWD_ARGS(__half), int B, int T, int H, int hd, int causal, float scale) {
  (void)B;
  flash_bwd<__half>(q, k, v, o, dout, lse, dq, dk, dv, blockIdx.z * T, T, H, hd, causal, scale);
}

extern "C" __global__ void __launch_bounds__(FL_THREADS)
flash_varlen_bwd_bf16(FL_BWD_ARGS(__nv_bfloat16), const int* __restrict__ cu_seqlens, int nseq, int Tmax, int H, int hd, int causal,
                      float scale) {
  (void)Tmax;
  int off, len;
  if (!fl_varlen_seq(cu_seqlens, nseq, 2, &off, &len)) return;
  flash_bwd<__nv_bfloat16>(q, k, v, o, dout, lse, dq, dk, dv, off, len, H, hd, causal, scale);
}

extern "C" __global__ void __launch_bounds__(FL_THREADS)
flash_varlen_bwd_f16(FL_BWD_ARGS(__half), const int* __restrict__ cu_seqlens, int nseq, int Tmax, int H, int hd, int causal, float scale) {
  (void)Tmax;
  int off, len;
  if (!fl_varlen_seq(cu_seqlens, nseq, 2, &off, &len)) return;
  flash_bwd<__half>(q, k, v, o, dout, lse, dq, dk, dv, off, len, H, hd, causal, scale);
}

extern "C" __global__ void __launch_bounds__(FL_THREADS, FL_BWD_BLOCKS_SM)
flash_varlen_bwd64_bf16(FL_BWD_ARGS(__nv_bfloat16), const int* __restrict__ cu_seqlens, int nseq, int Tmax, int H, int hd, int causal,
                        float scale) {
  (void)Tmax;
  int off, len;
  if (!fl_varlen_seq(cu_seqlens, nseq, 2, &off, &len)) return;
  flash_bwd<__nv_bfloat16, 64>(q, k, v, o, dout, lse, dq, dk, dv, off, len, H, hd, causal, scale);
}

extern "C" __global__ void __launch_bounds__(FL_THREADS, FL_BWD_BLOCKS_SM)
flash_varlen_bwd64_f16(FL_BWD_ARGS(__half), const int* __restrict__ cu_seqlens, int nseq, int Tmax, int H, int hd, int causal, float scale) {
  (void)Tmax;
  int off, len;
  if (!fl_varlen_seq(cu_seqlens, nseq, 2, &off, &len)) return;
  flash_bwd<__half, 64>(q, k, v, o, dout, lse, dq, dk, dv, off, len, H, hd, causal, scale);
}
