// attention.cu -- fused multi-head attention, forward and backward (flash-style tiles on CUDA cores).
//
// Layout (as src/ops/attention.rs): q, k, v, o, dout, dq, dk, dv are [B, T, H*hd] row-major (head h of
// token t of batch b is row b*T + t, columns h*hd .. h*hd + hd-1); lse is [B, H, T] and always f32.
// Math is f32 throughout (scores, softmax, accumulators); the _bf16 variants read and write
// __nv_bfloat16 tensors (stores round to nearest even). S = q·kᵀ·scale, causal: key j > query i is
// masked; P = softmax(S) per row; o = P·v; lse_i = log Σ_j exp(S_ij) (natural log).
//
// Forward attention_fwd_<T>(q, k, v, o, lse, B, T, H, hd, causal, scale):
//   one block per (64-query tile, head, batch). The Q tile stays in shared memory; K and V stream
//   through it in tiles of 32 keys (causal: only tiles up to the block's last query). Online
//   softmax in base 2: running max m and sum l per row, the accumulator rescaled by 2^(m_old - m_new)
//   per tile; at the end o = acc / l and lse = (m + log2 l)·ln 2. lse may be NULL (inference).
//   threads: ty = tid/8 owns query rows ty + 16i (i < 4); its 8 lanes tx = tid%8 share each row:
//   scores for keys tx + 8j (j < 4), output dims tx + 8j (j < hd/8 rounded up to 4, 8 or 16).
//   Row max/sum over a row's 8 lanes with __shfl_xor_sync (all 32 lanes call).
//   geometry: blockDim = (128, 1, 1) exactly; gridDim = (CEIL_DIV(T, 64), H, B).
//   dynamic smem: 4*64*33 + sizeof(T)*128*LD bytes, LD = hd|1 (P tile f32; Q, K, V tiles in T).
// Backward attention_bwd_<T>(q, k, v, o, dout, lse, dq, dk, dv, B, T, H, hd, causal, scale):
//   P = exp(S - lse) is recomputed from the saved lse; D_i = Σ_e dout_ie·o_ie is recomputed per
//   query tile (no workspace); dS = P∘(dP - D) with dP = dout·vᵀ. ONE launch, two kinds of block,
//   every output element written by exactly one block: DETERMINISTIC, no atomics, no zeroing.
//     blockIdx.x <  nk = CEIL_DIV(T, 32): dK and dV of keys [32x, 32x+32): K, V tiles resident,
//       loop over 64-query tiles (causal: from the tile holding the first key), dV += Pᵀ·dO,
//       dK += dSᵀ·Q (thread: keys kt + 8i, kt = tid/16; dims dt + 16j, dt = tid%16).
//     blockIdx.x >= nk: dQ of queries [64(x-nk), +64): Q, dO tiles resident, loop over 32-key
//       tiles, dQ += dS·K (threads as in the forward).
//   The price of determinism: S and dP are computed twice (14·B·H·T²·hd FLOP instead of 10).
//   geometry: blockDim = (128, 1, 1) exactly; gridDim = (CEIL_DIV(T, 32) + CEIL_DIV(T, 64), H, B).
//   dynamic smem: 4*2*64*33 + sizeof(T)*192*LD bytes (P and dS tiles f32; Q, dO tiles 64 rows,
//   K, V tiles 32 rows, in T).
// Packed variable-length sequences (cu_seqlens): attention_varlen_{fwd,bwd}_f32 at the end of the file.
// Constraints (the launcher in src/cuda/attention.rs checks them; the kernels __trap on the first
// two): blockDim = (128, 1, 1); 1 <= hd <= 128; T >= 1; H, B <= 65535. Above 48 KiB of dynamic
// shared memory (f32: hd >= 80 forward, hd >= 42 backward; bf16: hd >= 84 backward) the launcher
// must raise cudaFuncAttributeMaxDynamicSharedMemorySize; the most, f32 backward at hd 128, is
// 115,968 B (< 163 KiB on sm_80). No aliasing between inputs and outputs.
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "common.cuh"

#define ATTN_THREADS 128
#define ATTN_HD_MAX 128
#define ATTN_BQ 64              // query rows per tile
#define ATTN_BK 32              // keys per tile
#define ATTN_PLD (ATTN_BK + 1)  // row stride of the [64][32] f32 score tiles in shared memory
#define ATTN_LOG2E 1.4426950408889634f
#define ATTN_LN2 0.6931471805599453f

// Row stride of a [rows][hd] tile in shared memory: odd, so the 8 rows a warp reads in one step
// fall into 8 different banks.
__device__ __forceinline__ int attn_ld(int hd) { return hd | 1; }

// Max / sum over the 8 lanes of an aligned group (lanes 8g .. 8g+7). Every lane of the warp calls.
__device__ __forceinline__ float group8_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, 4));
  v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, 2));
  return fmaxf(v, __shfl_xor_sync(FULL_MASK, v, 1));
}
__device__ __forceinline__ float group8_sum(float v) {
  v += __shfl_xor_sync(FULL_MASK, v, 4);
  v += __shfl_xor_sync(FULL_MASK, v, 2);
  return v + __shfl_xor_sync(FULL_MASK, v, 1);
}

// Rows [r0, r0 + nrows) of one head (x points at its column 0 of token 0; row stride W) into
// s[nrows][ld], bit-exact; rows at or past T are zero-filled (never NaN: they meet P = 0).
template <typename T>
__device__ __forceinline__ void attn_load_tile(T* s, const T* __restrict__ x, int r0, int nrows, int T_, int W,
                                               int hd, int ld) {
  for (int i = threadIdx.x; i < nrows * hd; i += ATTN_THREADS) {
    const int r = i / hd, d = i - r * hd;
    if (r0 + r < T_) s[r * ld + d] = x[(size_t)(r0 + r) * W + d];
    else store_from_f32(s, (size_t)(r * ld + d), 0.f);
  }
}

// ---------------------------------------------------------------- forward
// DJ: output dims per thread (tx + 8j, j < DJ), hd <= 8*DJ.
// acc[i][j] += Σ_{c < nc} S[(ty + 16i)·ATTN_PLD + c] · X[c·ld + tx + 8j] for the dims tx + 8j < hd:
// this thread's four query rows times a key tile held in shared memory (the forward's P·V, the
// backward's dS·K for dQ), keys in order.
template <typename T, int DJ>
__device__ __forceinline__ void attn_acc_rows(const float* S, const T* X, int nc, int ld, int hd, int tx, int ty,
                                              float (&acc)[4][DJ]) {
  for (int c = 0; c < nc; ++c) {
    float sc[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) sc[i] = S[(ty + 16 * i) * ATTN_PLD + c];
#pragma unroll
    for (int j = 0; j < DJ; ++j) {
      const int d = tx + 8 * j;
      if (d < hd) {
        const float x = load_f32(X, c * ld + d);
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[i][j] = fmaf(sc[i], x, acc[i][j]);
      }
    }
  }
}

template <typename T, int DJ>
__device__ __forceinline__ void attn_fwd_body(const T* __restrict__ q, const T* __restrict__ k,
                                              const T* __restrict__ v, T* __restrict__ o, float* __restrict__ lse,
                                              int row0, int T_, int H, int hd, int causal, float scale, float* smem) {
  const int tx = threadIdx.x & 7, ty = threadIdx.x >> 3;
  const int h = blockIdx.y, q0 = blockIdx.x * ATTN_BQ;
  const int W = H * hd, ld = attn_ld(hd);
  const size_t base = (size_t)row0 * W + (size_t)h * hd;
  float* Ps = smem;  // [64][33] probabilities of the current key tile
  T* Qs = reinterpret_cast<T*>(smem + ATTN_BQ * ATTN_PLD);
  T* Ks = Qs + ATTN_BQ * ld;
  T* Vs = Ks + ATTN_BK * ld;
  const float sl2 = scale * ATTN_LOG2E;  // scores in base 2

  attn_load_tile(Qs, q + base, q0, ATTN_BQ, T_, W, hd, ld);
  float acc[4][DJ], m[4], l[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.f;
#pragma unroll
    for (int j = 0; j < DJ; ++j) acc[i][j] = 0.f;
  }
  const int kend = causal ? min(T_, q0 + ATTN_BQ) : T_;
  for (int k0 = 0; k0 < kend; k0 += ATTN_BK) {
    __syncthreads();  // the previous tile's Ks, Vs, Ps are consumed
    attn_load_tile(Ks, k + base, k0, ATTN_BK, T_, W, hd, ld);
    attn_load_tile(Vs, v + base, k0, ATTN_BK, T_, W, hd, ld);
    __syncthreads();
    float s[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) s[i][j] = 0.f;
    for (int d = 0; d < hd; ++d) {
      float qv[4], kv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) qv[i] = load_f32(Qs, (ty + 16 * i) * ld + d);
#pragma unroll
      for (int j = 0; j < 4; ++j) kv[j] = load_f32(Ks, (tx + 8 * j) * ld + d);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) s[i][j] = fmaf(qv[i], kv[j], s[i][j]);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = q0 + ty + 16 * i;
      float mt = -INFINITY;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int c = k0 + tx + 8 * j;
        s[i][j] = (c < T_ && (!causal || c <= r)) ? s[i][j] * sl2 : -INFINITY;
        mt = fmaxf(mt, s[i][j]);
      }
      // finite: the first tile holds key 0, which every row (padding rows too) sees
      const float mn = fmaxf(m[i], group8_max(mt));
      const float alpha = exp2f(m[i] - mn);  // 0 on the first tile (m = -inf)
      float rs = 0.f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float p = exp2f(s[i][j] - mn);
        Ps[(ty + 16 * i) * ATTN_PLD + tx + 8 * j] = p;
        rs += p;
      }
      l[i] = l[i] * alpha + group8_sum(rs);
      m[i] = mn;
#pragma unroll
      for (int j = 0; j < DJ; ++j) acc[i][j] *= alpha;
    }
    __syncwarp();  // P rows ty + 16i are written and read by the same warp only
    attn_acc_rows(Ps, Vs, min(ATTN_BK, T_ - k0), ld, hd, tx, ty, acc);  // acc += P·V
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = q0 + ty + 16 * i;
    if (r < T_) {
      const float inv = 1.f / l[i];
#pragma unroll
      for (int j = 0; j < DJ; ++j) {
        const int d = tx + 8 * j;
        if (d < hd) store_from_f32(o + base, (size_t)r * W + d, acc[i][j] * inv);
      }
      if (lse != nullptr && tx == 0) lse[(size_t)row0 * H + (size_t)h * T_ + r] = (m[i] + log2f(l[i])) * ATTN_LN2;
    }
  }
}

template <typename T>
__device__ __forceinline__ void attn_fwd(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                         T* __restrict__ o, float* __restrict__ lse, int row0, int T_, int H, int hd,
                                         int causal, float scale) {
  extern __shared__ __align__(16) float attn_smem[];
  if (blockDim.x != ATTN_THREADS || blockDim.y != 1 || blockDim.z != 1 || hd < 1 || hd > ATTN_HD_MAX) __trap();
  if (hd <= 32) attn_fwd_body<T, 4>(q, k, v, o, lse, row0, T_, H, hd, causal, scale, attn_smem);
  else if (hd <= 64) attn_fwd_body<T, 8>(q, k, v, o, lse, row0, T_, H, hd, causal, scale, attn_smem);
  else attn_fwd_body<T, 16>(q, k, v, o, lse, row0, T_, H, hd, causal, scale, attn_smem);
}

// ---------------------------------------------------------------- backward
// lse (in base 2) and D = Σ_e dout·o of the rows q0 + ty + 16i; a row's 8 lanes split its dims.
template <typename T>
__device__ __forceinline__ void attn_row_stats(const T* __restrict__ o, const T* __restrict__ dout,
                                               const float* __restrict__ lse, int q0, int T_, int W, int hd,
                                               float lse2[4], float Dr[4]) {
  const int tx = threadIdx.x & 7, ty = threadIdx.x >> 3;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = q0 + ty + 16 * i;
    float part = 0.f;
    if (r < T_)
      for (int d = tx; d < hd; d += 8) part += load_f32(o, (size_t)r * W + d) * load_f32(dout, (size_t)r * W + d);
    Dr[i] = group8_sum(part);
    lse2[i] = r < T_ ? lse[r] * ATTN_LOG2E : 0.f;
  }
}

// The [64 x 32] tile of rows q0 + ty + 16i and keys k0 + tx + 8j: P = exp(S - lse) (0 where masked or
// out of range) and dS = P (dP - D), dP = dout·vᵀ.
template <typename T>
__device__ __forceinline__ void attn_bwd_scores(const T* Qs, const T* dOs, const T* Ks, const T* Vs, int hd, int ld,
                                                int q0, int k0, int T_, int causal, float sl2, const float lse2[4],
                                                const float Dr[4], float p[4][4], float ds[4][4]) {
  const int tx = threadIdx.x & 7, ty = threadIdx.x >> 3;
  float s[4][4], dp[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) s[i][j] = dp[i][j] = 0.f;
  for (int d = 0; d < hd; ++d) {
    float qv[4], ov[4], kv[4], vv[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      qv[i] = load_f32(Qs, (ty + 16 * i) * ld + d);
      ov[i] = load_f32(dOs, (ty + 16 * i) * ld + d);
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      kv[j] = load_f32(Ks, (tx + 8 * j) * ld + d);
      vv[j] = load_f32(Vs, (tx + 8 * j) * ld + d);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        s[i][j] = fmaf(qv[i], kv[j], s[i][j]);
        dp[i][j] = fmaf(ov[i], vv[j], dp[i][j]);
      }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = q0 + ty + 16 * i;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int c = k0 + tx + 8 * j;
      p[i][j] = (r < T_ && c < T_ && (!causal || c <= r)) ? exp2f(fmaf(s[i][j], sl2, -lse2[i])) : 0.f;
      ds[i][j] = p[i][j] * (dp[i][j] - Dr[i]);
    }
  }
}

// DJQ: dQ dims per thread (tx + 8j); DJK: dK/dV dims per thread (dt + 16j); hd <= 8*DJQ = 16*DJK.
template <typename T, int DJQ, int DJK>
__device__ __forceinline__ void attn_bwd_body(const T* __restrict__ q, const T* __restrict__ k,
                                              const T* __restrict__ v, const T* __restrict__ o,
                                              const T* __restrict__ dout, const float* __restrict__ lse,
                                              T* __restrict__ dq, T* __restrict__ dk, T* __restrict__ dv, int row0,
                                              int T_, int H, int hd, int causal, float scale, float* smem) {
  const int tid = threadIdx.x, tx = tid & 7, ty = tid >> 3;
  const int h = blockIdx.y;
  const int W = H * hd, ld = attn_ld(hd);
  const size_t base = (size_t)row0 * W + (size_t)h * hd;
  const float* lse_bh = lse + (size_t)row0 * H + (size_t)h * T_;
  float* Ps = smem;                  // [64][33]
  float* dSs = Ps + ATTN_BQ * ATTN_PLD;  // [64][33]
  T* Qs = reinterpret_cast<T*>(dSs + ATTN_BQ * ATTN_PLD);
  T* dOs = Qs + ATTN_BQ * ld;
  T* Ks = dOs + ATTN_BQ * ld;
  T* Vs = Ks + ATTN_BK * ld;
  const float sl2 = scale * ATTN_LOG2E;
  const int nk = CEIL_DIV(T_, ATTN_BK);
  float lse2[4], Dr[4], p[4][4], ds[4][4];

  if ((int)blockIdx.x < nk) {  // ---- dK, dV of keys [k0, k0 + 32)
    const int k0 = blockIdx.x * ATTN_BK;
    const int kt = tid >> 4, dt = tid & 15;
    attn_load_tile(Ks, k + base, k0, ATTN_BK, T_, W, hd, ld);
    attn_load_tile(Vs, v + base, k0, ATTN_BK, T_, W, hd, ld);
    float gk[4][DJK], gv[4][DJK];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < DJK; ++j) gk[i][j] = gv[i][j] = 0.f;
    for (int q0 = causal ? k0 / ATTN_BQ * ATTN_BQ : 0; q0 < T_; q0 += ATTN_BQ) {
      __syncthreads();  // the previous tile's Qs, dOs, Ps, dSs are consumed
      attn_load_tile(Qs, q + base, q0, ATTN_BQ, T_, W, hd, ld);
      attn_load_tile(dOs, dout + base, q0, ATTN_BQ, T_, W, hd, ld);
      attn_row_stats(o + base, dout + base, lse_bh, q0, T_, W, hd, lse2, Dr);
      __syncthreads();
      attn_bwd_scores(Qs, dOs, Ks, Vs, hd, ld, q0, k0, T_, causal, sl2, lse2, Dr, p, ds);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          Ps[(ty + 16 * i) * ATTN_PLD + tx + 8 * j] = p[i][j];
          dSs[(ty + 16 * i) * ATTN_PLD + tx + 8 * j] = ds[i][j];
        }
      __syncthreads();
      const int nr = min(ATTN_BQ, T_ - q0);
      for (int r = 0; r < nr; ++r) {
        float pr[4], dsr[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          pr[i] = Ps[r * ATTN_PLD + kt + 8 * i];
          dsr[i] = dSs[r * ATTN_PLD + kt + 8 * i];
        }
#pragma unroll
        for (int j = 0; j < DJK; ++j) {
          const int d = dt + 16 * j;
          if (d < hd) {
            const float og = load_f32(dOs, r * ld + d), qg = load_f32(Qs, r * ld + d);
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              gv[i][j] = fmaf(pr[i], og, gv[i][j]);
              gk[i][j] = fmaf(dsr[i], qg, gk[i][j]);
            }
          }
        }
      }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int c = k0 + kt + 8 * i;
      if (c < T_) {
#pragma unroll
        for (int j = 0; j < DJK; ++j) {
          const int d = dt + 16 * j;
          if (d < hd) {
            store_from_f32(dk + base, (size_t)c * W + d, gk[i][j] * scale);
            store_from_f32(dv + base, (size_t)c * W + d, gv[i][j]);
          }
        }
      }
    }
  } else {  // ---- dQ of queries [q0, q0 + 64)
    const int q0 = (blockIdx.x - nk) * ATTN_BQ;
    attn_load_tile(Qs, q + base, q0, ATTN_BQ, T_, W, hd, ld);
    attn_load_tile(dOs, dout + base, q0, ATTN_BQ, T_, W, hd, ld);
    attn_row_stats(o + base, dout + base, lse_bh, q0, T_, W, hd, lse2, Dr);
    float gq[4][DJQ];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < DJQ; ++j) gq[i][j] = 0.f;
    const int kend = causal ? min(T_, q0 + ATTN_BQ) : T_;
    for (int k0 = 0; k0 < kend; k0 += ATTN_BK) {
      __syncthreads();  // the previous tile's Ks, Vs, dSs are consumed
      attn_load_tile(Ks, k + base, k0, ATTN_BK, T_, W, hd, ld);
      attn_load_tile(Vs, v + base, k0, ATTN_BK, T_, W, hd, ld);
      __syncthreads();
      attn_bwd_scores(Qs, dOs, Ks, Vs, hd, ld, q0, k0, T_, causal, sl2, lse2, Dr, p, ds);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) dSs[(ty + 16 * i) * ATTN_PLD + tx + 8 * j] = ds[i][j];
      __syncwarp();  // dS rows ty + 16i are written and read by the same warp only
      attn_acc_rows(dSs, Ks, min(ATTN_BK, T_ - k0), ld, hd, tx, ty, gq);  // gq += dS·K
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = q0 + ty + 16 * i;
      if (r < T_) {
#pragma unroll
        for (int j = 0; j < DJQ; ++j) {
          const int d = tx + 8 * j;
          if (d < hd) store_from_f32(dq + base, (size_t)r * W + d, gq[i][j] * scale);
        }
      }
    }
  }
}

template <typename T>
__device__ __forceinline__ void attn_bwd(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                         const T* __restrict__ o, const T* __restrict__ dout,
                                         const float* __restrict__ lse, T* __restrict__ dq, T* __restrict__ dk,
                                         T* __restrict__ dv, int row0, int T_, int H, int hd, int causal, float scale) {
  extern __shared__ __align__(16) float attn_smem[];
  if (blockDim.x != ATTN_THREADS || blockDim.y != 1 || blockDim.z != 1 || hd < 1 || hd > ATTN_HD_MAX) __trap();
  if (hd <= 32) attn_bwd_body<T, 4, 2>(q, k, v, o, dout, lse, dq, dk, dv, row0, T_, H, hd, causal, scale, attn_smem);
  else if (hd <= 64) attn_bwd_body<T, 8, 4>(q, k, v, o, dout, lse, dq, dk, dv, row0, T_, H, hd, causal, scale, attn_smem);
  else attn_bwd_body<T, 16, 8>(q, k, v, o, dout, lse, dq, dk, dv, row0, T_, H, hd, causal, scale, attn_smem);
}

// ---------------------------------------------------------------- entry points
// B is implied by gridDim.z; it is a parameter so the signature names the whole shape.
extern "C" __global__ void __launch_bounds__(ATTN_THREADS)
attention_fwd_f32(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                  float* __restrict__ o, float* __restrict__ lse, int B, int T, int H, int hd, int causal, float scale) {
  (void)B;
  attn_fwd<float>(q, k, v, o, lse, blockIdx.z * T, T, H, hd, causal, scale);
}

extern "C" __global__ void __launch_bounds__(ATTN_THREADS)
attention_fwd_bf16(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                   const __nv_bfloat16* __restrict__ v, __nv_bfloat16* __restrict__ o, float* __restrict__ lse, int B,
                   int T, int H, int hd, int causal, float scale) {
  (void)B;
  attn_fwd<__nv_bfloat16>(q, k, v, o, lse, blockIdx.z * T, T, H, hd, causal, scale);
}

extern "C" __global__ void __launch_bounds__(ATTN_THREADS)
attention_fwd_f16(const __half* __restrict__ q, const __half* __restrict__ k,
                   const __half* __restrict__ v, __half* __restrict__ o, float* __restrict__ lse, int B,
                   int T, int H, int hd, int causal, float scale) {
  (void)B;
  attn_fwd<__half>(q, k, v, o, lse, blockIdx.z * T, T, H, hd, causal, scale);
}

extern "C" __global__ void __launch_bounds__(ATTN_THREADS)
attention_bwd_f32(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                  const float* __restrict__ o, const float* __restrict__ dout, const float* __restrict__ lse,
                  float* __restrict__ dq, float* __restrict__ dk, float* __restrict__ dv, int B, int T, int H, int hd,
                  int causal, float scale) {
  (void)B;
  attn_bwd<float>(q, k, v, o, dout, lse, dq, dk, dv, blockIdx.z * T, T, H, hd, causal, scale);
}

extern "C" __global__ void __launch_bounds__(ATTN_THREADS)
attention_bwd_bf16(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                   const __nv_bfloat16* __restrict__ v, const __nv_bfloat16* __restrict__ o,
                   const __nv_bfloat16* __restrict__ dout, const float* __restrict__ lse,
                   __nv_bfloat16* __restrict__ dq, __nv_bfloat16* __restrict__ dk, __nv_bfloat16* __restrict__ dv,
                   int B, int T, int H, int hd, int causal, float scale) {
  (void)B;
  attn_bwd<__nv_bfloat16>(q, k, v, o, dout, lse, dq, dk, dv, blockIdx.z * T, T, H, hd, causal, scale);
}

extern "C" __global__ void __launch_bounds__(ATTN_THREADS)
attention_bwd_f16(const __half* __restrict__ q, const __half* __restrict__ k,
                   const __half* __restrict__ v, const __half* __restrict__ o,
                   const __half* __restrict__ dout, const float* __restrict__ lse,
                   __half* __restrict__ dq, __half* __restrict__ dk, __half* __restrict__ dv,
                   int B, int T, int H, int hd, int causal, float scale) {
  (void)B;
  attn_bwd<__half>(q, k, v, o, dout, lse, dq, dk, dv, blockIdx.z * T, T, H, hd, causal, scale);
}

// ---------------------------------------------------------------- packed variable-length sequences
// attention_varlen_{fwd,bwd}_f32: the same kernels over packed sequences (no padding): sequence z
// is rows cu_seqlens[z] .. cu_seqlens[z+1]-1 of q, k, v, o, dout, dq, dk, dv ([N, H*hd]); its lse is
// the [H, len] block at cu_seqlens[z]*H (sequences' blocks back to back, as src/ops/attention.rs).
// geometry: gridDim = (CEIL_DIV(Tmax, 64), H, nseq) forward, (CEIL_DIV(Tmax, 32) + CEIL_DIV(Tmax, 64),
// H, nseq) backward; blocks beyond a shorter sequence's tiles return at once (the whole block,
// before any barrier). Same block, smem and constraints as above.
__device__ __forceinline__ bool attn_varlen_seq(const int* __restrict__ cu, int nseq, int tiles_fwd, int* off, int* len) {
  const int z = blockIdx.z;
  if (z >= nseq) return false;
  *off = cu[z];
  *len = cu[z + 1] - cu[z];
  const int need = tiles_fwd ? CEIL_DIV(*len, ATTN_BQ) : CEIL_DIV(*len, ATTN_BK) + CEIL_DIV(*len, ATTN_BQ);
  return *len > 0 && (int)blockIdx.x < need;
}

extern "C" __global__ void __launch_bounds__(ATTN_THREADS)
attention_varlen_fwd_f32(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                         float* __restrict__ o, float* __restrict__ lse, const int* __restrict__ cu_seqlens, int nseq,
                         int Tmax, int H, int hd, int causal, float scale) {
  (void)Tmax;
  int off, len;
  if (!attn_varlen_seq(cu_seqlens, nseq, 1, &off, &len)) return;
  attn_fwd<float>(q, k, v, o, lse, off, len, H, hd, causal, scale);
}

// (2 blocks/SM: the two loaded offsets tip the backward past the batched kernel's 168 registers)
extern "C" __global__ void __launch_bounds__(ATTN_THREADS, 2)
attention_varlen_bwd_f32(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                         const float* __restrict__ o, const float* __restrict__ dout, const float* __restrict__ lse,
                         float* __restrict__ dq, float* __restrict__ dk, float* __restrict__ dv,
                         const int* __restrict__ cu_seqlens, int nseq, int Tmax, int H, int hd, int causal, float scale) {
  (void)Tmax;
  int off, len;
  if (!attn_varlen_seq(cu_seqlens, nseq, 0, &off, &len)) return;
  attn_bwd<float>(q, k, v, o, dout, lse, dq, dk, dv, off, len, H, hd, causal, scale);
}
