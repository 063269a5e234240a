// mma_test.cu -- TEST KERNELS for kernels/mma.cuh (tests/cuda_flash.rs): one warp multiplies
// A [16][32] by B [32][16] (16-bit, row-major in global memory) three ways and writes f32 results:
//   c[0]  A by ldmatrix.x4, B from a transposed shared copy Bᵀ [16][32] by ldmatrix.x2
//   c[1]  A by ldmatrix.x4, B by ldmatrix.x4.trans straight from B [32][16]
//   c[2]  A by four ldmatrix.x1, B by ldmatrix.x2.trans and ldmatrix.x1.trans
// Each result is [16][16] f32 row-major (c + 256 * variant). A and B reach shared memory by
// cp.async 16-byte (.cg) copies; rows of A at or past m_valid are zero-filled (src-size 0) and B's
// 8-byte halves by cp.async 8, so the tail variants and commit/wait are exercised too.
// mma_test_{bf16,f16}(a, b, c, m_valid); geometry: grid (1,1,1), block (32,1,1), no dynamic smem.
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "common.cuh"
#include "mma.cuh"

#define MT_LDA 40  // shared row strides (elements): rows 16-byte aligned
#define MT_LDB 24

template <typename T>
__device__ __forceinline__ void mma_test_body(const T* __restrict__ a, const T* __restrict__ b, float* __restrict__ c, int m_valid) {
  __shared__ __align__(16) T As[16 * MT_LDA];
  __shared__ __align__(16) T Bs[32 * MT_LDB];
  __shared__ __align__(16) T Bt[16 * MT_LDA];
  const int lane = threadIdx.x & 31;
  for (int i = lane; i < 16 * 4; i += 32) {  // A: 16 rows x 4 chunks of 8
    const int r = i >> 2, ch = i & 3;
    cp_async_16_zfill(As + r * MT_LDA + ch * 8, a + r * 32 + ch * 8, r < m_valid ? 16 : 0);
  }
  for (int i = lane; i < 32 * 4; i += 32) {  // B: 32 rows x 4 halves of 4 elements
    const int r = i >> 2, ch = i & 3;
    cp_async_8(Bs + r * MT_LDB + ch * 4, b + r * 16 + ch * 4);
  }
  cp_async_commit();
  cp_async_wait<0>();
  __syncwarp();
  for (int i = lane; i < 16 * 32; i += 32) {  // Bt[n][k] = B[k][n]
    const int n = i >> 5, k = i & 31;
    Bt[n * MT_LDA + k] = Bs[k * MT_LDB + n];
  }
  __syncwarp();
  const int g = lane >> 2, t = lane & 3, j = lane >> 3, r8 = lane & 7;
  for (int variant = 0; variant < 3; ++variant) {
    float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};  // n-tiles 0..7, 8..15
    for (int k0 = 0; k0 < 32; k0 += 16) {
      unsigned af[4], bf[2][2];
      if (variant < 2) {
        ldmatrix_x4(af, As + (r8 + (j & 1) * 8) * MT_LDA + k0 + (j >> 1) * 8);
      } else {
        // x1: lanes 0..7 address the rows of the one matrix
        ldmatrix_x1(&af[0], As + r8 * MT_LDA + k0);
        ldmatrix_x1(&af[1], As + (r8 + 8) * MT_LDA + k0);
        ldmatrix_x1(&af[2], As + r8 * MT_LDA + k0 + 8);
        ldmatrix_x1(&af[3], As + (r8 + 8) * MT_LDA + k0 + 8);
      }
      if (variant == 0) {
        for (int nt = 0; nt < 2; ++nt) ldmatrix_x2(bf[nt], Bt + (nt * 8 + r8) * MT_LDA + k0 + (j & 1) * 8);
      } else if (variant == 1) {
        unsigned r[4];  // matrices: (k lo, n 0..7), (k hi, n 0..7), (k lo, n 8..15), (k hi, n 8..15)
        ldmatrix_x4_trans(r, Bs + (k0 + r8 + (j & 1) * 8) * MT_LDB + (j >> 1) * 8);
        bf[0][0] = r[0]; bf[0][1] = r[1]; bf[1][0] = r[2]; bf[1][1] = r[3];
      } else {
        ldmatrix_x2_trans(bf[0], Bs + (k0 + r8 + (j & 1) * 8) * MT_LDB);
        ldmatrix_x1_trans(&bf[1][0], Bs + (k0 + r8) * MT_LDB + 8);
        ldmatrix_x1_trans(&bf[1][1], Bs + (k0 + r8 + 8) * MT_LDB + 8);
      }
      for (int nt = 0; nt < 2; ++nt) mma_16816<T>(acc[nt], af, bf[nt], acc[nt]);
    }
    float* out = c + 256 * variant;
    for (int nt = 0; nt < 2; ++nt) {
      out[g * 16 + nt * 8 + 2 * t] = acc[nt][0];
      out[g * 16 + nt * 8 + 2 * t + 1] = acc[nt][1];
      out[(g + 8) * 16 + nt * 8 + 2 * t] = acc[nt][2];
      out[(g + 8) * 16 + nt * 8 + 2 * t + 1] = acc[nt][3];
    }
  }
}

extern "C" __global__ void __launch_bounds__(32) mma_test_bf16(const __nv_bfloat16* __restrict__ a, const __nv_bfloat16* __restrict__ b,
                                                               float* __restrict__ c, int m_valid) {
  mma_test_body<__nv_bfloat16>(a, b, c, m_valid);
}

extern "C" __global__ void __launch_bounds__(32) mma_test_f16(const __half* __restrict__ a, const __half* __restrict__ b, float* __restrict__ c,
                                                              int m_valid) {
  mma_test_body<__half>(a, b, c, m_valid);
}
