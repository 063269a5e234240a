// pca.cu -- Long-CLIP's primary component matching (methods.md §2.3) by subspace (block power)
// iteration, the device side: centring, a small tiled GEMM, the start basis and a block-level
// modified Gram-Schmidt. All f32, all row-major; X [B, D], k <= D. The basis is kept TRANSPOSED on
// the device, Qt = V^T [k, D] (row j = column j of V), so that Gram-Schmidt walks contiguous rows.
//
// One iteration is  Y = Xc Qt^T (pca_gemm_f32 with transB, [B, k]);  Zt = Y^T Xc (pca_gemm_f32 with
// transA, [k, D]);  Qt = orth(Zt) (pca_orth_f32). Start: Qt0 = pca_init_f32 (fixed pseudo-random; no
// orth needed before the first product). Reconstruction: Xhat = Y Qt + mu, Y = Xc Qt^T (pca_gemm_f32
// with bias). The host (src/ops/pca.rs, `pca`) runs the same steps on the CPU.
//
// pca_center_f32(X, Xc, mu, B, D): mu[c] = mean_r X[r, c]; Xc = X - mu. Xc MAY ALIAS X (in place).
//   Thread (x, y) of block b owns column c = b*32 + x and rows y, y + blockDim.y, ...; the partial
//   column sums are added in a fixed order (deterministic).
//   geometry: blockDim = (32, Y, 1), 1 <= Y <= 32 (8 recommended); gridDim.x = CEIL_DIV(D, 32).
// pca_init_f32(Qt, D, k, seed): Qt[j, d] = V0[d, j] = hash(seed, d*k + j) uniform in [-1, 1), exactly
//   the values of ops::pca::start_basis (which is [D, k]).
//   geometry: blockDim = (256, 1, 1), gridDim.x = CEIL_DIV(D*k, 256).
// pca_gemm_f32(A, Bm, bias, C, M, N, K, transA, transB): C[m, n] = sum_k a(m, k) b(k, n) (+ bias[n]
//   if bias != NULL), a(m, k) = transA ? A[k*M + m] : A[m*K + k], b(k, n) = transB ? Bm[n*K + k] :
//   Bm[k*N + n]. 32x32 output tile per block, K in steps of 32 through shared memory (static,
//   2 x 32 x 33 floats); each thread computes 4 outputs. C must not alias A or Bm.
//   geometry: blockDim = (256, 1, 1) exactly; gridDim = (CEIL_DIV(N, 32), CEIL_DIV(M, 32)).
// pca_orth_f32(Qt, D, k): orthonormalises the k ROWS of Qt [k, D] in place by modified Gram-Schmidt,
//   two full sweeps ("twice is enough"). Row j is owned by warp j % nwarps: it normalises it and
//   projects the finished row j-1 out of it; one barrier per row. A row whose squared norm is
//   <= 1e-30 (rank(Xc) < k, Xc = 0) is set to zero instead of normalised: the result has
//   orthonormal or zero rows and is always finite.
//   Latency-bound (2k dependent steps, one barrier each): use one warp per row.
//   geometry: ONE BLOCK, blockDim = (32*w, 1, 1), w >= 1; w = k (1024 threads at k = 32) recommended.
#include <cuda_runtime.h>
#include "common.cuh"

#define PCA_TILE 32
#define PCA_ZERO_NORM2 1e-30f

extern "C" __global__ void pca_center_f32(const float* X, float* Xc, float* __restrict__ mu, int B, int D) {
  __shared__ float part[32][33];
  const int x = threadIdx.x, y = threadIdx.y, ny = blockDim.y;
  const int c = blockIdx.x * 32 + x;
  float s = 0.f;
  if (c < D)
    for (int r = y; r < B; r += ny) s += X[(size_t)r * D + c];
  part[y][x] = s;
  __syncthreads();
  if (y == 0) {
    float t = 0.f;
    for (int i = 0; i < ny; ++i) t += part[i][x];
    part[0][x] = t / (float)B;
    if (c < D) mu[c] = t / (float)B;
  }
  __syncthreads();
  const float m = part[0][x];
  if (c < D)
    for (int r = y; r < B; r += ny) Xc[(size_t)r * D + c] = X[(size_t)r * D + c] - m;
}

// Deterministic start value: a 32-bit integer hash (murmur3 finaliser) mapped to [-1, 1) exactly
// (24 bits times a power of two), so the CPU twin reproduces it bit for bit.
__device__ __forceinline__ float pca_hash_unit(unsigned seed, unsigned idx) {
  unsigned h = (idx + 1u) * 0x9E3779B9u ^ seed;
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return (float)(h >> 8) * (1.f / 8388608.f) - 1.f;
}

extern "C" __global__ void pca_init_f32(float* __restrict__ Qt, int D, int k, unsigned seed) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;  // e = j*D + d
  if (e < D * k) Qt[e] = pca_hash_unit(seed, (unsigned)((e % D) * k + e / D));
}

extern "C" __global__ void pca_gemm_f32(const float* __restrict__ A, const float* __restrict__ Bm,
                                        const float* __restrict__ bias, float* __restrict__ C, int M, int N, int K,
                                        int transA, int transB) {
  __shared__ float As[PCA_TILE][PCA_TILE + 1];  // As[m][k]
  __shared__ float Bs[PCA_TILE][PCA_TILE + 1];  // Bs[k][n]
  const int tid = threadIdx.x;
  const int tx = tid & 31, ty = tid >> 5;  // output column tx, rows ty + 8*i
  const int m0 = blockIdx.y * PCA_TILE, n0 = blockIdx.x * PCA_TILE;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int k0 = 0; k0 < K; k0 += PCA_TILE) {
    // loads: consecutive threads read consecutive addresses in either layout
    for (int e = tid; e < PCA_TILE * PCA_TILE; e += 256) {
      const int r = e >> 5, q = e & 31;
      if (!transA) {  // As[r][q] = A[m0+r, k0+q]
        const int mm = m0 + r, kk = k0 + q;
        As[r][q] = (mm < M && kk < K) ? A[(size_t)mm * K + kk] : 0.f;
      } else {        // As[q][r] = A^T: A[(k0+r)*M + m0+q]
        const int mm = m0 + q, kk = k0 + r;
        As[q][r] = (mm < M && kk < K) ? A[(size_t)kk * M + mm] : 0.f;
      }
      if (!transB) {  // Bs[r][q] = Bm[(k0+r)*N + n0+q]
        const int kk = k0 + r, nn = n0 + q;
        Bs[r][q] = (kk < K && nn < N) ? Bm[(size_t)kk * N + nn] : 0.f;
      } else {        // Bs[q][r] = Bm[(n0+r)*K + k0+q]
        const int kk = k0 + q, nn = n0 + r;
        Bs[q][r] = (kk < K && nn < N) ? Bm[(size_t)nn * K + kk] : 0.f;
      }
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < PCA_TILE; ++kk) {
      const float b = Bs[kk][tx];
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[i] += As[ty + 8 * i][kk] * b;
    }
    __syncthreads();  // the tiles are overwritten by the next step
  }
  const int n = n0 + tx;
  if (n >= N) return;
  const float bn = bias ? bias[n] : 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int m = m0 + ty + 8 * i;
    if (m < M) C[(size_t)m * N + n] = acc[i] + bn;
  }
}

// Warp-level: normalise the row q [D] (or zero it); every lane of the warp must call.
__device__ __forceinline__ void pca_normalise_row(float* q, int D, int lane) {
  float ss = 0.f;
  for (int d = lane; d < D; d += 32) ss += q[d] * q[d];
  ss = warp_reduce_sum(ss);
  const float s = ss > PCA_ZERO_NORM2 ? rsqrtf(ss) : 0.f;
  for (int d = lane; d < D; d += 32) q[d] *= s;
}

extern "C" __global__ void pca_orth_f32(float* Qt, int D, int k) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int sweep = 0; sweep < 2; ++sweep) {
    if (warp == 0) pca_normalise_row(Qt, D, lane);
    __syncthreads();
    for (int j = 0; j + 1 < k; ++j) {
      // row j is final: project it out of every later row; the owner of row j+1 then normalises
      // it (its last projection was this one)
      const float* qj = Qt + (size_t)j * D;
      for (int l = warp; l < k; l += nwarps) {
        if (l <= j) continue;  // warp-uniform
        float* ql = Qt + (size_t)l * D;
        float dot = 0.f;
        for (int d = lane; d < D; d += 32) dot += qj[d] * ql[d];
        dot = warp_reduce_sum(dot);
        for (int d = lane; d < D; d += 32) ql[d] -= dot * qj[d];
        if (l == j + 1) pca_normalise_row(ql, D, lane);
      }
      __syncthreads();
    }
  }
}
