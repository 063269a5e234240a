// buggy/mma_bad_layout.cu -- TEST ONLY: a wrong mma fragment layout.
//   bug_mma_swapped_a_bf16  PLANTED BUG: the signature of mma_test_bf16 (kernels/mma_test.cu), but
//                           computes only variant 0 and swaps registers a1 and a2 of the A
//                           fragment (rows g+8 / columns 8..15 exchanged) before every mma.
//                           Expected: c[0..256] differs from A·B (tests/cuda_flash.rs).
// geometry: grid (1,1,1), block (32,1,1), no dynamic smem.
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include "../common.cuh"
#include "../mma.cuh"

extern "C" __global__ void bug_mma_swapped_a_bf16(const __nv_bfloat16* __restrict__ a, const __nv_bfloat16* __restrict__ b,
                                                  float* __restrict__ c, int m_valid) {
  __shared__ __align__(16) __nv_bfloat16 As[16 * 40];
  __shared__ __align__(16) __nv_bfloat16 Bt[16 * 40];
  const int lane = threadIdx.x & 31;
  for (int i = lane; i < 16 * 32; i += 32) {
    const int r = i >> 5, k = i & 31;
    As[r * 40 + k] = r < m_valid ? a[r * 32 + k] : __float2bfloat16(0.f);
    Bt[r * 40 + k] = b[k * 16 + r];  // Bt[n][k]
  }
  __syncwarp();
  const int g = lane >> 2, t = lane & 3, j = lane >> 3, r8 = lane & 7;
  float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
  for (int k0 = 0; k0 < 32; k0 += 16) {
    unsigned af[4], bf[2][2];
    ldmatrix_x4(af, As + (r8 + (j & 1) * 8) * 40 + k0 + (j >> 1) * 8);
    const unsigned tmp = af[1];  // the bug
    af[1] = af[2];
    af[2] = tmp;
    for (int nt = 0; nt < 2; ++nt) ldmatrix_x2(bf[nt], Bt + (nt * 8 + r8) * 40 + k0 + (j & 1) * 8);
    for (int nt = 0; nt < 2; ++nt) mma_16816<__nv_bfloat16>(acc[nt], af, bf[nt], acc[nt]);
  }
  for (int nt = 0; nt < 2; ++nt) {
    c[g * 16 + nt * 8 + 2 * t] = acc[nt][0];
    c[g * 16 + nt * 8 + 2 * t + 1] = acc[nt][1];
    c[(g + 8) * 16 + nt * 8 + 2 * t] = acc[nt][2];
    c[(g + 8) * 16 + nt * 8 + 2 * t + 1] = acc[nt][3];
  }
}
