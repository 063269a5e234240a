// flash_common.cuh -- pieces shared by kernels/flash_fwd.cu and kernels/flash_bwd.cu (tensor-core
// flash attention, bf16/f16 I/O, f32 math): tile loads by cp.async, and the two warp-level GEMM
// shapes every step of the forward and backward is made of, on mma.sync m16n8k16 (kernels/mma.cuh).
//
// Tiles: 64 rows x D columns (D = head dim, 64 or 80: a compile-time template parameter) of one
// head in shared memory, row stride LD = D + 8 elements (16 B of padding: consecutive rows start
// 16 B apart modulo 128 B, so the 8 row addresses of an ldmatrix hit 8 different bank groups).
// A warp owns 16 rows of the block's 64-row tile (warp w: rows 16w .. 16w+15).
//   fl_mma_abt  acc[8][4] += A·Bᵀ: A = 16 rows of a [.][LD] tile (ldmatrix.x4), B = a 64-row
//               [n][k] tile (ldmatrix.x4): a 16 x 64 f32 result in the C layout of mma.cuh
//               (n-tile j = columns 8j..8j+7).
//   fl_mma_pb   acc[D/8][4] += P·B: P = a 16 x 64 f32 result as above (rounded to T for the A
//               fragments, the FlashAttention-2 register reuse), B = a 64-row [k][n] tile
//               (ldmatrix.x4.trans): a 16 x D result.
//   Both take nb (1..4, warp-uniform): only the first 16·nb rows of the 64-row B tile are used
//   (abt: n-tiles j >= 2·nb are left as they are; pb: P columns >= 16·nb are taken as zero): the
//   callers pass fl_chunks16 of the rows left before T (or the causal bound), so tiles past the
//   sequence end cost no mma (executed work: 16-row granularity, as src/perf/cost.rs counts it).
#pragma once
#include "common.cuh"
#include "mma.cuh"

#define FL_THREADS 128
#define FL_TILE 64  // query rows per block tile = keys per key tile
#define FL_LOG2E 1.4426950408889634f
#define FL_LN2 0.6931471805599453f

// Rows [r0, r0 + 64) of one head (x = its column 0 of token 0, row stride W elements) into
// s[64][D + 8] by 16-byte cp.async (the caller commits); rows at or past T are zero-filled (the
// source address is then row 0, valid and not read). Needs D % 8 == 0 and 16-byte aligned rows.
template <typename T, int D>
__device__ __forceinline__ void fl_load_tile(T* s, const T* __restrict__ x, int r0, int T_, int W) {
  constexpr int CH = D / 8, LD = D + 8;
  for (int i = threadIdx.x; i < FL_TILE * CH; i += FL_THREADS) {
    const int r = i / CH, c = i - r * CH;
    const bool in = r0 + r < T_;
    cp_async_16_zfill(s + r * LD + c * 8, x + (size_t)(in ? r0 + r : 0) * W + c * 8, in ? 16 : 0);
  }
}

// 16-row chunks (0..4) of a 64-row tile holding `rows_left` valid rows.
__device__ __forceinline__ int fl_chunks16(int rows_left) { return rows_left <= 0 ? 0 : min(4, CEIL_DIV(rows_left, 16)); }

// acc[j] += A[16 rows][0..D) · B[8j .. 8j+8)[0..D)ᵀ for j < 2·nb.
template <typename T, int D>
__device__ __forceinline__ void fl_mma_abt(float acc[8][4], const T* A, const T* B, int nb = 4) {
  constexpr int LD = D + 8;
  const int lane = threadIdx.x & 31, j8 = lane >> 3, r8 = lane & 7;
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    unsigned a[4];
    ldmatrix_x4(a, A + (r8 + (j8 & 1) * 8) * LD + ks * 16 + (j8 >> 1) * 8);
#pragma unroll
    for (int np = 0; np < 4; ++np) {
      if (np >= nb) break;
      // matrices: (n lo, k lo) (n lo, k hi) (n hi, k lo) (n hi, k hi) = b0, b1 of n-tiles 2np, 2np+1
      unsigned b[4];
      ldmatrix_x4(b, B + (np * 16 + r8 + (j8 >> 1) * 8) * LD + ks * 16 + (j8 & 1) * 8);
      mma_16816<T>(acc[2 * np], a, b, acc[2 * np]);
      mma_16816<T>(acc[2 * np + 1], a, b + 2, acc[2 * np + 1]);
    }
  }
}

// acc[j] += P[16][0..16·nb) · B[0..16·nb)[8j .. 8j+8) for j < D/8.
template <typename T, int D>
__device__ __forceinline__ void fl_mma_pb(float acc[D / 8][4], const float p[8][4], const T* B, int nb = 4) {
  constexpr int LD = D + 8;
  const int lane = threadIdx.x & 31, j8 = lane >> 3, r8 = lane & 7;
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    if (kk >= nb) break;
    const unsigned a[4] = {pack2<T>(p[2 * kk][0], p[2 * kk][1]), pack2<T>(p[2 * kk][2], p[2 * kk][3]),
                           pack2<T>(p[2 * kk + 1][0], p[2 * kk + 1][1]), pack2<T>(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      // matrices: (k lo, n lo) (k hi, n lo) (k lo, n hi) (k hi, n hi), transposed
      unsigned b[4];
      ldmatrix_x4_trans(b, B + (kk * 16 + r8 + (j8 & 1) * 8) * LD + dp * 16 + (j8 >> 1) * 8);
      mma_16816<T>(acc[2 * dp], a, b, acc[2 * dp]);
      mma_16816<T>(acc[2 * dp + 1], a, b + 2, acc[2 * dp + 1]);
    }
  }
}

// Packed variable-length sequences: sequence blockIdx.z's offset and length from cu_seqlens; false
// (the whole block returns, before any barrier) past nseq, for an empty sequence, or for a block
// beyond the sequence's `tiles_per_64` · ⌈len/64⌉ tiles.
__device__ __forceinline__ bool fl_varlen_seq(const int* __restrict__ cu, int nseq, int tiles_per_64, int* off, int* len) {
  const int z = blockIdx.z;
  if (z >= nseq) return false;
  *off = cu[z];
  *len = cu[z + 1] - cu[z];
  return *len > 0 && (int)blockIdx.x < tiles_per_64 * CEIL_DIV(*len, FL_TILE);
}

// The smem bytes for `tiles` [64][D + 8] tiles of 16-bit elements plus `floats` f32 values.
#define FL_SMEM(D, tiles, floats) ((tiles) * FL_TILE * ((D) + 8) * 2 + (floats) * 4)
