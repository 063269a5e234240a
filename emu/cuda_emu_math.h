// cuda_emu_math.h -- part 2 of the clipforge CUDA CPU emulator.
//
// Device numerics for host compilers: __half and __nv_bfloat16 (storage types with
// round-to-nearest-even conversions, arithmetic done in float), the common float intrinsics
// (__expf, rsqrtf, __fdividef, bit casts, __popc, ...), CUDA's mixed-type min/max, and the
// atomic* functions on top of std::atomic_ref.
//
// Numerics that differ from the GPU (compare against references with tolerances):
//   * approximate intrinsics (__expf, rsqrtf, __fdividef, ...) are exact here;
//   * nvcc contracts a*b+c into FMA, g++ for baseline x86-64 does not;
//   * no flush-to-zero, no fast-math.
// Include cuda_emu.h rather than this file.
#pragma once
#include "cuda_emu_base.h"

// ---------------------------------------------------------------- fp16 / bf16 bit conversions
namespace emu::fp {
inline uint16_t f32_to_f16(float f) {
  const uint32_t x = std::bit_cast<uint32_t>(f);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return sign | 0x7e00u | uint16_t((ax >> 13) & 0x3ffu);  // NaN stays NaN
  if (ax >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to infinity
  if (ax < 0x38800000u) {                        // below 2^-14: subnormal half (or zero)
    // the half subnormal step is 2^-24; scaling by 2^24 is exact, nearbyint rounds to even
    return sign | uint16_t(std::nearbyint(std::bit_cast<float>(ax) * 16777216.0f));
  }
  uint32_t r = ax + 0x0fffu + ((ax >> 13) & 1u);  // round the 13 dropped bits to nearest even
  r -= 112u << 23;                                // exponent bias 127 -> 15
  return sign | uint16_t(r >> 13);
}
inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0x1f) return std::bit_cast<float>(sign | 0x7f800000u | (m << 13));
  if (e == 0) return std::bit_cast<float>(sign) + (sign ? -1.0f : 1.0f) * float(m) * 0x1p-24f;
  return std::bit_cast<float>(sign | ((e + 112u) << 23) | (m << 13));
}
inline uint16_t f32_to_bf16(float f) {
  const uint32_t x = std::bit_cast<uint32_t>(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return uint16_t((x >> 16) | 0x40u);  // quiet NaN
  return uint16_t((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}
inline float bf16_to_f32(uint16_t b) { return std::bit_cast<float>(uint32_t(b) << 16); }
}  // namespace emu::fp

// ---------------------------------------------------------------- __half / __nv_bfloat16
#define EMU_HALF_TYPE(T, TO, FROM)                                              \
  struct T {                                                                    \
    unsigned short __x;                                                         \
    T() = default;                                                              \
    T(float f) : __x(emu::fp::TO(f)) {}                                         \
    T(double d) : __x(emu::fp::TO(float(d))) {}                                 \
    T(int i) : __x(emu::fp::TO(float(i))) {}                                    \
    operator float() const { return emu::fp::FROM(__x); }                       \
    T& operator+=(T o) { return *this = T(float(*this) + float(o)); }          \
    T& operator-=(T o) { return *this = T(float(*this) - float(o)); }          \
    T& operator*=(T o) { return *this = T(float(*this) * float(o)); }          \
    T& operator/=(T o) { return *this = T(float(*this) / float(o)); }          \
  };                                                                            \
  inline T operator+(T a, T b) { return T(float(a) + float(b)); }              \
  inline T operator-(T a, T b) { return T(float(a) - float(b)); }              \
  inline T operator*(T a, T b) { return T(float(a) * float(b)); }              \
  inline T operator/(T a, T b) { return T(float(a) / float(b)); }              \
  inline T operator-(T a) { T r = a; r.__x ^= 0x8000u; return r; }             \
  inline bool operator==(T a, T b) { return float(a) == float(b); }            \
  inline bool operator!=(T a, T b) { return float(a) != float(b); }            \
  inline bool operator<(T a, T b) { return float(a) < float(b); }              \
  inline bool operator>(T a, T b) { return float(a) > float(b); }              \
  inline bool operator<=(T a, T b) { return float(a) <= float(b); }            \
  inline bool operator>=(T a, T b) { return float(a) >= float(b); }
EMU_HALF_TYPE(__half, f32_to_f16, f16_to_f32)
EMU_HALF_TYPE(__nv_bfloat16, f32_to_bf16, bf16_to_f32)
#undef EMU_HALF_TYPE
static_assert(sizeof(__half) == 2 && sizeof(__nv_bfloat16) == 2);

struct __align__(4) __half2 {
  __half x, y;
};
struct __align__(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
using half = __half;
using half2 = __half2;
using nv_bfloat16 = __nv_bfloat16;
using nv_bfloat162 = __nv_bfloat162;

inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline float __half2float(__half h) { return float(h); }
inline __half2 __floats2half2_rn(float a, float b) { return {__half(a), __half(b)}; }
inline __half2 __float22half2_rn(float2 f) { return {__half(f.x), __half(f.y)}; }
inline float2 __half22float2(__half2 h) { return {float(h.x), float(h.y)}; }
inline float __low2float(__half2 h) { return float(h.x); }
inline float __high2float(__half2 h) { return float(h.y); }
inline __half __hadd(__half a, __half b) { return a + b; }
inline __half __hsub(__half a, __half b) { return a - b; }
inline __half __hmul(__half a, __half b) { return a * b; }
inline __half __hfma(__half a, __half b, __half c) { return __half(std::fma(float(a), float(b), float(c))); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short u) { __half h; h.__x = u; return h; }

inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return float(b); }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__nv_bfloat16(a), __nv_bfloat16(b)}; }
inline __nv_bfloat162 __float22bfloat162_rn(float2 f) { return {__nv_bfloat16(f.x), __nv_bfloat16(f.y)}; }
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return {float(h.x), float(h.y)}; }
inline float __low2float(__nv_bfloat162 h) { return float(h.x); }
inline float __high2float(__nv_bfloat162 h) { return float(h.y); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { __nv_bfloat16 h; h.__x = u; return h; }

// ---------------------------------------------------------------- float intrinsics
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __exp10f(float x) { return std::pow(10.0f, x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __tanf(float x) { return std::tan(x); }
inline float __powf(float a, float b) { return std::pow(a, b); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline int __float_as_int(float f) { return std::bit_cast<int>(f); }
inline unsigned __float_as_uint(float f) { return std::bit_cast<unsigned>(f); }
inline float __int_as_float(int i) { return std::bit_cast<float>(i); }
inline float __uint_as_float(unsigned u) { return std::bit_cast<float>(u); }
inline int __float2int_rn(float f) { return int(std::nearbyint(f)); }
inline int __float2int_rz(float f) { return int(f); }
inline int __popc(unsigned x) { return std::popcount(x); }
inline int __popcll(unsigned long long x) { return std::popcount(x); }
inline int __clz(int x) { return std::countl_zero(unsigned(x)); }
inline int __ffs(int x) { return x ? std::countr_zero(unsigned(x)) + 1 : 0; }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r = (r << 1) | ((x >> i) & 1u);
  return r;
}
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldcs(const T* p) { return *p; }
template <class T> inline void __stcs(T* p, T v) { *p = v; }
// CUDA's global min/max accept mixed argument types (int/unsigned/float/...)
template <class A, class B> inline std::common_type_t<A, B> min(A a, B b) { return b < a ? b : a; }
template <class A, class B> inline std::common_type_t<A, B> max(A a, B b) { return a < b ? b : a; }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __nanosleep(unsigned) {}

// ---------------------------------------------------------------- atomics
// Blocks of one launch run one after another on one host thread, but kernels may also be
// launched from several host threads at once on the same buffers, so these are real atomics.
template <class T> inline T atomicAdd(T* p, T v) { return std::atomic_ref<T>(*p).fetch_add(v); }
template <class T> inline T atomicSub(T* p, T v) { return std::atomic_ref<T>(*p).fetch_sub(v); }
template <class T> inline T atomicExch(T* p, T v) { return std::atomic_ref<T>(*p).exchange(v); }
template <class T> inline T atomicOr(T* p, T v) { return std::atomic_ref<T>(*p).fetch_or(v); }
template <class T> inline T atomicAnd(T* p, T v) { return std::atomic_ref<T>(*p).fetch_and(v); }
template <class T> inline T atomicXor(T* p, T v) { return std::atomic_ref<T>(*p).fetch_xor(v); }
template <class T> inline T atomicCAS(T* p, T expected, T desired) {
  std::atomic_ref<T>(*p).compare_exchange_strong(expected, desired);
  return expected;  // the old value, whether or not the swap happened
}
template <class T> inline T atomicMax(T* p, T v) {
  std::atomic_ref<T> a(*p);
  T old = a.load();
  while (old < v && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}
template <class T> inline T atomicMin(T* p, T v) {
  std::atomic_ref<T> a(*p);
  T old = a.load();
  while (v < old && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}
