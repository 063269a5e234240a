// cuda_emu_base.h -- part 1 of the clipforge CUDA CPU emulator.
//
// What CUDA C++ spells differently from host C++: the function/variable qualifiers, the
// built-in vector types, dim3/uint3 and the built-in variables threadIdx/blockIdx/blockDim/
// gridDim, plus the per-launch settings (schedule) and the per-launch diagnostics sink.
//
// The built-in variables are thread_local: a launch runs on the host thread that made it, and
// the fiber scheduler (cuda_emu_core.h) rewrites threadIdx and blockIdx each time it resumes a
// CUDA thread (several blocks are resident and interleaved).
// Include cuda_emu.h rather than this file.
#pragma once
#if defined(__CUDACC__) || defined(__CUDA_ARCH__)
#error "the cuda_emu headers are for host compilers only; nvcc uses the real CUDA headers"
#endif

#include <algorithm>
#include <atomic>
#include <bit>
#include <cassert>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <random>
#include <source_location>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

// ---------------------------------------------------------------- qualifiers
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __constant__
#define __managed__
#define __grid_constant__
// build.rs rewrites `__shared__` declarations inside functions into poisoned per-block
// storage (emu::detail::shared_var / dyn_smem); whatever it leaves alone falls back to this.
#define __shared__ thread_local
#define __CUDA_EMU__ 1

// ---------------------------------------------------------------- built-in types
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
  constexpr dim3(uint3 u) : x(u.x), y(u.y), z(u.z) {}
};
inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return uint3{x, y, z}; }

#define EMU_VEC2(T, N, AL)                                              \
  struct __attribute__((aligned(AL))) N {                               \
    T x, y;                                                             \
  };                                                                    \
  inline N make_##N(T x, T y) { return N{x, y}; }
#define EMU_VEC4(T, N, AL)                                              \
  struct __attribute__((aligned(AL))) N {                               \
    T x, y, z, w;                                                       \
  };                                                                    \
  inline N make_##N(T x, T y, T z, T w) { return N{x, y, z, w}; }
EMU_VEC2(float, float2, 8)
EMU_VEC4(float, float4, 16)
EMU_VEC2(int, int2, 8)
EMU_VEC4(int, int4, 16)
EMU_VEC2(unsigned, uint2, 8)
EMU_VEC4(unsigned, uint4, 16)
EMU_VEC2(double, double2, 16)
#undef EMU_VEC2
#undef EMU_VEC4
struct float3 {
  float x, y, z;
};
inline float3 make_float3(float x, float y, float z) { return float3{x, y, z}; }

// built-in variables (per host thread; the scheduler keeps them current)
inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};
constexpr int warpSize = 32;

namespace emu {
// ---------------------------------------------------------------- settings
enum class Schedule : int { Forward = 0, Reverse = 1, Random = 2 };

struct Settings {
  Schedule schedule = Schedule::Forward;
  uint64_t seed = 1;
  bool strict = true;                  // a barrier released while some threads have exited is an error
  size_t stack_bytes = 256 * 1024;     // per CUDA thread (fiber), lazily committed
  size_t max_dyn_smem = 227 * 1024;    // sm_90 opt-in limit
  unsigned resident_blocks = 4;        // blocks run interleaved at once (fewer if the grid is smaller)
};

// Defaults come from the environment (EMU_SCHEDULE=fwd|rev|random, EMU_SEED, EMU_STRICT,
// EMU_STACK_KB, EMU_BLOCKS = resident blocks). emu_set_schedule() changes the settings of the CALLING host thread only, so
// tests running in parallel threads do not disturb each other.
inline Settings env_settings() {
  Settings s;
  if (const char* v = std::getenv("EMU_SCHEDULE")) {
    if (!std::strcmp(v, "rev")) s.schedule = Schedule::Reverse;
    else if (!std::strcmp(v, "random")) s.schedule = Schedule::Random;
  }
  if (const char* v = std::getenv("EMU_SEED")) s.seed = std::strtoull(v, nullptr, 10);
  if (const char* v = std::getenv("EMU_STRICT")) s.strict = std::atoi(v) != 0;
  if (const char* v = std::getenv("EMU_STACK_KB")) s.stack_bytes = size_t(std::max(16, std::atoi(v))) * 1024;
  if (const char* v = std::getenv("EMU_BLOCKS")) s.resident_blocks = unsigned(std::max(1, std::atoi(v)));
  return s;
}
inline Settings& thread_settings() {
  static thread_local Settings s = env_settings();
  return s;
}

namespace detail {
// ---------------------------------------------------------------- diagnostics
// One Diag per launch; the host thread running the launch points t_diag at it.
struct Diag {
  std::string error;                  // first error wins
  std::vector<std::string> warnings;  // capped
};
inline thread_local Diag* t_diag = nullptr;

inline void fail(const std::string& msg) {
  if (t_diag && t_diag->error.empty()) t_diag->error = msg;
}
inline void warn(const std::string& msg) {
  if (t_diag && t_diag->warnings.size() < 16) t_diag->warnings.push_back(msg);
}
inline bool failed() { return t_diag && !t_diag->error.empty(); }

inline std::string where(uint3 b, uint3 t) {
  char buf[112];
  std::snprintf(buf, sizeof buf, "block (%u,%u,%u) thread (%u,%u,%u)", b.x, b.y, b.z, t.x, t.y, t.z);
  return buf;
}
inline std::string site(const char* file, unsigned line) {
  const char* base = file ? std::strrchr(file, '/') : nullptr;
  return std::string(base ? base + 1 : (file ? file : "?")) + ":" + std::to_string(line);
}
}  // namespace detail
}  // namespace emu
