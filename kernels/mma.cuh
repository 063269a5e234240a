// mma.cuh -- tensor-core building blocks for the flash attention kernels: mma.sync m16n8k16
// (bf16 / f16 inputs, f32 accumulators), ldmatrix m8n8 .x1/.x2/.x4 (.trans), cp.async with
// commit/wait groups. Under nvcc (and NVRTC) these are inline PTX; under the CPU emulator
// (__CUDA_EMU__) the same functions are computed in software exactly per the PTX ISA fragment
// layouts, by gathering the other lanes' registers with full-mask __shfl_sync (so the emulator
// checks that the whole warp calls them together) -- every lane of the warp must call mma_*,
// ldmatrix_* (warp-wide, like the instructions). cp_async_* are per thread.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16", .bf16/.f16), for lane l,
// g = l / 4 (group), t = l % 4 (thread in group); each 32-bit register holds two 16-bit values,
// the lower column (or k) index in the low half:
//   A (16 x 16, row-major):  a0 = A[g][2t, 2t+1]    a1 = A[g+8][2t, 2t+1]
//                            a2 = A[g][2t+8, 2t+9]  a3 = A[g+8][2t+8, 2t+9]
//   B (16 x 8, "col": k x n): b0 = B[2t, 2t+1][g]   b1 = B[2t+8, 2t+9][g]
//   C, D (16 x 8, f32):       c0, c1 = C[g][2t, 2t+1]   c2, c3 = C[g+8][2t, 2t+1]
// ldmatrix.m8n8.b16 .xN: lanes 8j .. 8j+7 give the shared-memory addresses of rows 0..7 of matrix
// j (each row 8 contiguous 16-bit values, 16-byte aligned); register j of lane l receives
// matrix j's row l/4, columns 2(l%4), 2(l%4)+1 -- with .trans its column l/4, rows 2(l%4), 2(l%4)+1.
// So ldmatrix.x4 of a row-major 16x16 tile gives an A fragment, ldmatrix of a [n][k] (k-contiguous)
// tile gives B fragments, and ldmatrix.trans of a [k][n] (n-contiguous) tile gives B fragments.
// cp.async: cp_async_16 (.cg, L2 only), cp_async_8 / cp_async_4 (.ca); the _zfill variants copy
// src_bytes (0 .. size) and zero the rest of the destination (src is not read when src_bytes = 0,
// but must still be a valid address). cp_async_commit() closes a group; cp_async_wait<N>() waits
// until at most N of this thread's committed groups are pending (a __syncthreads is still needed
// before other threads read the data).
#pragma once
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

// Element-type tags of the mma wrappers (the 16-bit types themselves).
template <typename T> struct MmaKind;
template <> struct MmaKind<__nv_bfloat16> { static constexpr bool bf16 = true; };
template <> struct MmaKind<__half> { static constexpr bool bf16 = false; };

// Two floats -> one register of two 16-bit values (round to nearest even), lo in the low half.
template <typename T> __device__ __forceinline__ unsigned pack2(float lo, float hi);
template <> __device__ __forceinline__ unsigned pack2<__nv_bfloat16>(float lo, float hi) {
  return (unsigned)__bfloat16_as_ushort(__float2bfloat16_rn(lo)) | ((unsigned)__bfloat16_as_ushort(__float2bfloat16_rn(hi)) << 16);
}
template <> __device__ __forceinline__ unsigned pack2<__half>(float lo, float hi) {
  return (unsigned)__half_as_ushort(__float2half_rn(lo)) | ((unsigned)__half_as_ushort(__float2half_rn(hi)) << 16);
}
// One 16-bit value (bits) -> float.
template <typename T> __device__ __forceinline__ float unpack1(unsigned short u);
template <> __device__ __forceinline__ float unpack1<__nv_bfloat16>(unsigned short u) { return __uint_as_float((unsigned)u << 16); }
template <> __device__ __forceinline__ float unpack1<__half>(unsigned short u) { return __half2float(__ushort_as_half(u)); }

#if defined(__CUDA_EMU__)
#include <cstring>
#include <cstdint>

namespace mma_emu {
__device__ __forceinline__ unsigned long long pk(unsigned lo, unsigned hi) { return (unsigned long long)lo | ((unsigned long long)hi << 32); }
__device__ __forceinline__ unsigned lo32(unsigned long long v) { return (unsigned)v; }
__device__ __forceinline__ unsigned hi32(unsigned long long v) { return (unsigned)(v >> 32); }

// D = A·B + C for one lane, the operands gathered from the warp: 16 full-mask 64-bit shuffles.
template <typename T>
__device__ __forceinline__ void mma(float d[4], const unsigned a[4], const unsigned b[2], const float c[4]) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  float arow[2][16], bcol[2][16];  // A rows g, g+8; B columns 2t, 2t+1 (over k)
  const unsigned long long a01 = pk(a[0], a[1]), a23 = pk(a[2], a[3]), b01 = pk(b[0], b[1]);
  for (int i = 0; i < 4; ++i) {
    const unsigned long long x = __shfl_sync(0xffffffffu, a01, 4 * g + i);
    const unsigned long long y = __shfl_sync(0xffffffffu, a23, 4 * g + i);
    const unsigned long long p = __shfl_sync(0xffffffffu, b01, 4 * (2 * t) + i);
    const unsigned long long q = __shfl_sync(0xffffffffu, b01, 4 * (2 * t + 1) + i);
    // lane 4g+i holds k = 2i, 2i+1 (a0/a1, b0) and k = 2i+8, 2i+9 (a2/a3, b1)
    const unsigned regs_a[2][2] = {{lo32(x), lo32(y)}, {hi32(x), hi32(y)}};  // [row g / g+8][k lo / k hi]
    const unsigned regs_b[2][2] = {{lo32(p), hi32(p)}, {lo32(q), hi32(q)}};  // [col 2t / 2t+1][k lo / k hi]
    for (int h = 0; h < 2; ++h)
      for (int e = 0; e < 2; ++e) {
        const int k = 2 * i + 8 * h + e;
        for (int r = 0; r < 2; ++r) arow[r][k] = unpack1<T>((unsigned short)(regs_a[r][h] >> (16 * e)));
        for (int n = 0; n < 2; ++n) bcol[n][k] = unpack1<T>((unsigned short)(regs_b[n][h] >> (16 * e)));
      }
  }
  for (int r = 0; r < 2; ++r)
    for (int n = 0; n < 2; ++n) {
      float s = c[2 * r + n];
      for (int k = 0; k < 16; ++k) s = fmaf(arow[r][k], bcol[n][k], s);
      d[2 * r + n] = s;
    }
}

// ldmatrix .xN (N = 1, 2, 4): register j of this lane from matrix j, rows addressed by lanes 8j..8j+7.
template <int N, bool TRANS>
__device__ __forceinline__ void ldmatrix(unsigned* r, const void* row_addr) {
  const int lane = threadIdx.x & 31;
  const unsigned long long mine = (unsigned long long)(uintptr_t)row_addr;
  for (int j = 0; j < N; ++j) {
    if (!TRANS) {
      const unsigned long long src = __shfl_sync(0xffffffffu, mine, 8 * j + (lane >> 2));
      unsigned v;
      std::memcpy(&v, reinterpret_cast<const char*>((uintptr_t)src) + 4 * (lane & 3), 4);
      r[j] = v;
    } else {
      const unsigned long long r0 = __shfl_sync(0xffffffffu, mine, 8 * j + 2 * (lane & 3));
      const unsigned long long r1 = __shfl_sync(0xffffffffu, mine, 8 * j + 2 * (lane & 3) + 1);
      unsigned short lo, hi;
      std::memcpy(&lo, reinterpret_cast<const char*>((uintptr_t)r0) + 2 * (lane >> 2), 2);
      std::memcpy(&hi, reinterpret_cast<const char*>((uintptr_t)r1) + 2 * (lane >> 2), 2);
      r[j] = (unsigned)lo | ((unsigned)hi << 16);
    }
  }
}

// src-size 0 (a row past the tensor) is an asynchronous copy from zeros, so the emulator's group
// tracking covers it like any other; a partial src-size (unused by the kernels) copies at issue.
template <int SIZE>
__device__ __forceinline__ void cp_async_zfill(void* dst, const void* src, int src_bytes) {
  static const unsigned char zeros[16] = {0};
  if (src_bytes >= SIZE) {
    ::emu::cp_async(dst, src, SIZE);
  } else if (src_bytes <= 0) {
    ::emu::cp_async(dst, zeros, SIZE);
  } else {
    if (src_bytes > 0) std::memcpy(dst, src, src_bytes);
    std::memset(static_cast<char*>(dst) + (src_bytes > 0 ? src_bytes : 0), 0, SIZE - (src_bytes > 0 ? src_bytes : 0));
  }
}
}  // namespace mma_emu
#endif

// D = A·B + C, m16n8k16, row.col, f32 accumulators; T = __nv_bfloat16 or __half. d may alias c.
template <typename T>
__device__ __forceinline__ void mma_16816(float d[4], const unsigned a[4], const unsigned b[2], const float c[4]) {
#if defined(__CUDA_EMU__)
  mma_emu::mma<T>(d, a, b, c);
#else
  if (MmaKind<T>::bf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
  }
#endif
}

// ldmatrix.sync.aligned.m8n8.x4 (.trans) .shared.b16: r[0..3]; row_addr = this lane's row (shared memory).
__device__ __forceinline__ void ldmatrix_x4(unsigned r[4], const void* row_addr) {
#if defined(__CUDA_EMU__)
  mma_emu::ldmatrix<4, false>(r, row_addr);
#else
  const unsigned s = (unsigned)__cvta_generic_to_shared(row_addr);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n" : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
#endif
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned r[4], const void* row_addr) {
#if defined(__CUDA_EMU__)
  mma_emu::ldmatrix<4, true>(r, row_addr);
#else
  const unsigned s = (unsigned)__cvta_generic_to_shared(row_addr);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n" : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
#endif
}
__device__ __forceinline__ void ldmatrix_x2(unsigned r[2], const void* row_addr) {
#if defined(__CUDA_EMU__)
  mma_emu::ldmatrix<2, false>(r, row_addr);
#else
  const unsigned s = (unsigned)__cvta_generic_to_shared(row_addr);
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(s));
#endif
}
__device__ __forceinline__ void ldmatrix_x2_trans(unsigned r[2], const void* row_addr) {
#if defined(__CUDA_EMU__)
  mma_emu::ldmatrix<2, true>(r, row_addr);
#else
  const unsigned s = (unsigned)__cvta_generic_to_shared(row_addr);
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(s));
#endif
}
__device__ __forceinline__ void ldmatrix_x1(unsigned r[1], const void* row_addr) {
#if defined(__CUDA_EMU__)
  mma_emu::ldmatrix<1, false>(r, row_addr);
#else
  const unsigned s = (unsigned)__cvta_generic_to_shared(row_addr);
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(s));
#endif
}
__device__ __forceinline__ void ldmatrix_x1_trans(unsigned r[1], const void* row_addr) {
#if defined(__CUDA_EMU__)
  mma_emu::ldmatrix<1, true>(r, row_addr);
#else
  const unsigned s = (unsigned)__cvta_generic_to_shared(row_addr);
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(s));
#endif
}

// cp.async global -> shared. dst in shared memory, src in global memory, both aligned to the size.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src) {
#if defined(__CUDA_EMU__)
  ::emu::cp_async(dst, src, 16);
#else
  const unsigned s = (unsigned)__cvta_generic_to_shared(dst);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(src));
#endif
}
__device__ __forceinline__ void cp_async_16_zfill(void* dst, const void* src, int src_bytes) {
#if defined(__CUDA_EMU__)
  mma_emu::cp_async_zfill<16>(dst, src, src_bytes);
#else
  const unsigned s = (unsigned)__cvta_generic_to_shared(dst);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(src_bytes));
#endif
}
__device__ __forceinline__ void cp_async_8(void* dst, const void* src) {
#if defined(__CUDA_EMU__)
  ::emu::cp_async(dst, src, 8);
#else
  const unsigned s = (unsigned)__cvta_generic_to_shared(dst);
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(s), "l"(src));
#endif
}
__device__ __forceinline__ void cp_async_8_zfill(void* dst, const void* src, int src_bytes) {
#if defined(__CUDA_EMU__)
  mma_emu::cp_async_zfill<8>(dst, src, src_bytes);
#else
  const unsigned s = (unsigned)__cvta_generic_to_shared(dst);
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(s), "l"(src), "r"(src_bytes));
#endif
}
__device__ __forceinline__ void cp_async_4(void* dst, const void* src) {
#if defined(__CUDA_EMU__)
  ::emu::cp_async(dst, src, 4);
#else
  const unsigned s = (unsigned)__cvta_generic_to_shared(dst);
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(s), "l"(src));
#endif
}
__device__ __forceinline__ void cp_async_4_zfill(void* dst, const void* src, int src_bytes) {
#if defined(__CUDA_EMU__)
  mma_emu::cp_async_zfill<4>(dst, src, src_bytes);
#else
  const unsigned s = (unsigned)__cvta_generic_to_shared(dst);
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(src), "r"(src_bytes));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_EMU__)
  ::emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_EMU__)
  ::emu::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}
