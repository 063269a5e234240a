// cuda_emu_sync.h -- part 4 of the clipforge CUDA CPU emulator: barriers and warp collectives.
//
// A CUDA thread that calls __syncthreads* or a *_sync warp intrinsic posts the operation in
// its fiber record and yields to the scheduler (cuda_emu_core.h).
//   * Block barrier: released when every thread of the block waits at the same program point
//     (file:line of the call). Different points, or exited threads (strict mode), are errors.
//   * Warp collective: completed when every lane named in the mask has posted one; all of them
//     must agree on the operation and the mask. The values are exchanged, then all continue.
//     A lane named in the mask that has exited, a caller that is not in its own mask, and (in
//     strict mode) a shuffle whose source lane is outside the mask are errors.
// Shuffles move up to 8 bytes of any trivially copyable type (float, int, double, __half, ...).
// __activemask() cannot observe convergence here: it returns the lanes that have not exited.
// Include cuda_emu.h rather than this file.
#pragma once
#include "cuda_emu_core.h"

namespace emu::detail {
inline std::string lane_where(const Fiber& f) { return where(blockIdx, f.tid); }

// Value that lane `f` receives from a completed collective over the lanes `m` of this warp.
inline uint64_t collective_result(Fiber* const* lane, const Fiber& f, unsigned m, const Settings& s) {
  auto from = [&](int src) -> uint64_t {
    if (src < 0 || src > 31 || !((m >> src) & 1u)) {
      if (s.strict)
        fail(std::string(warp_op_name(f.op)) + " at " + site(f.file, f.line) + " in " + lane_where(f) +
             " reads lane " + std::to_string(src) + ", which is not in the mask " + hex32(m) +
             " (or does not exist in this partial warp)");
      return f.value;
    }
    return lane[src]->value;
  };
  const int me = int(f.lane), w = f.width, base = me & ~(w - 1);
  switch (f.op) {
    case WarpOp::SyncWarp: return 0;
    case WarpOp::ShflIdx: return from(base + (f.arg & (w - 1)));
    case WarpOp::ShflUp: return me - f.arg < base ? f.value : from(me - f.arg);
    case WarpOp::ShflDown: return me + f.arg >= base + w ? f.value : from(me + f.arg);
    case WarpOp::ShflXor: {
      const int src = me ^ f.arg;
      return src >= base + w ? f.value : from(src);
    }
    default: break;
  }
  // votes and reductions over the 32-bit values of the lanes in m
  uint32_t ballot = 0, acc_and = ~0u, acc_or = 0, acc_xor = 0;
  uint64_t sum = 0;
  int64_t smin = INT64_MAX, smax = INT64_MIN;
  uint64_t umin = UINT64_MAX, umax = 0;
  for (int l = 0; l < 32; ++l) {
    if (!((m >> l) & 1u)) continue;
    const uint32_t v = uint32_t(lane[l]->value);
    if (v) ballot |= 1u << l;
    acc_and &= v, acc_or |= v, acc_xor ^= v, sum += v;
    smin = std::min<int64_t>(smin, int32_t(v)), smax = std::max<int64_t>(smax, int32_t(v));
    umin = std::min<uint64_t>(umin, v), umax = std::max<uint64_t>(umax, v);
  }
  switch (f.op) {
    case WarpOp::Ballot: return ballot;
    case WarpOp::All: return ballot == m;
    case WarpOp::Any: return ballot != 0;
    case WarpOp::RedAdd: return uint32_t(sum);
    case WarpOp::RedMin: return f.is_signed ? uint32_t(int32_t(smin)) : uint32_t(umin);
    case WarpOp::RedMax: return f.is_signed ? uint32_t(int32_t(smax)) : uint32_t(umax);
    case WarpOp::RedAnd: return acc_and;
    case WarpOp::RedOr: return acc_or;
    case WarpOp::RedXor: return acc_xor;
    default: return 0;
  }
}

// Completes every collective of warp `w` whose named lanes have all arrived.
// Returns true if some lanes were released (so the warp can run further).
inline bool settle_warp(Block& b, unsigned w, const Settings& s) {
  Fiber* lane[32];
  unsigned exist = 0;
  for (unsigned l = 0; l < 32; ++l) {
    const unsigned id = w * 32 + l;
    lane[l] = id < b.nthreads ? &b.fibers[id] : nullptr;
    if (lane[l]) exist |= 1u << l;
  }
  bool released = false;
  for (unsigned l = 0; l < 32; ++l) {
    Fiber* f = lane[l];
    if (!f || f->state != State::AtWarpOp) continue;
    const unsigned m = f->mask & exist;
    bool ready = true;
    for (unsigned j = 0; j < 32 && ready; ++j) {
      if (!((m >> j) & 1u)) continue;
      const Fiber* g = lane[j];
      if (g->state == State::Exited) {
        fail(std::string(warp_op_name(f->op)) + " at " + site(f->file, f->line) + " in " + lane_where(*f) +
             ": lane " + std::to_string(j) + " is named in the mask " + hex32(f->mask) + " but has exited");
        return false;
      }
      if (g->state != State::AtWarpOp) { ready = false; break; }
      if ((g->mask & exist) != m || g->op != f->op) {
        fail("divergent warp collective in " + block_name() + " warp " + std::to_string(w) + ": lane " +
             std::to_string(l) + " waits in " + warp_op_name(f->op) + " (mask " + hex32(f->mask) + ") at " +
             site(f->file, f->line) + ", lane " + std::to_string(j) + " in " + warp_op_name(g->op) + " (mask " +
             hex32(g->mask) + ") at " + site(g->file, g->line));
        return false;
      }
    }
    if (!ready) continue;
    for (unsigned j = 0; j < 32; ++j)
      if ((m >> j) & 1u) lane[j]->result = collective_result(lane, *lane[j], m, s);
    if (failed()) return false;
    for (unsigned j = 0; j < 32; ++j)
      if ((m >> j) & 1u) lane[j]->state = State::Ready;
    released = true;
  }
  return released;
}

template <class T>
inline T warp_collective(WarpOp op, unsigned mask, T v, int arg, int width, bool is_signed,
                         const std::source_location& loc) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "warp collectives move at most 8 bytes");
  Fiber& f = self();
  if (!((mask >> f.lane) & 1u))
    thread_abort(std::string(warp_op_name(op)) + " at " + site(loc.file_name(), loc.line()) + " called by lane " +
                 std::to_string(f.lane) + " of " + lane_where(f) + ", which is not in its mask " + hex32(mask));
  if (width < 1 || width > 32 || (width & (width - 1)))
    thread_abort(std::string(warp_op_name(op)) + " at " + site(loc.file_name(), loc.line()) +
                 ": width must be a power of two <= 32, got " + std::to_string(width));
  f.op = op;
  f.mask = mask;
  f.value = 0;
  std::memcpy(&f.value, &v, sizeof(T));
  f.arg = arg;
  f.width = width;
  f.is_signed = is_signed;
  f.file = loc.file_name();
  f.line = loc.line();
  f.state = State::AtWarpOp;
  yield_to_scheduler(f);
  T out;
  std::memcpy(&out, &f.result, sizeof(T));
  return out;
}

inline uint64_t block_sync(BarOp op, int pred, const std::source_location& loc) {
  Fiber& f = self();
  f.bar = op;
  f.pred = pred;
  f.file = loc.file_name();
  f.line = loc.line();
  f.state = State::AtBarrier;
  yield_to_scheduler(f);
  return f.result;
}

inline unsigned active_mask() {
  const Fiber& f = self();
  const Block& b = *t_run.cur_block;
  unsigned m = 0;
  for (unsigned l = 0; l < 32; ++l) {
    const unsigned id = f.warp * 32 + l;
    if (id < b.nthreads && b.fibers[id].state != State::Exited) m |= 1u << l;
  }
  return m;
}
}  // namespace emu::detail

// ---------------------------------------------------------------- CUDA API
#define EMU_SITE const std::source_location& emu_loc = std::source_location::current()
namespace emu::detail {
using W = WarpOp;
}

inline void __syncthreads(EMU_SITE) { emu::detail::block_sync(emu::detail::BarOp::Plain, 0, emu_loc); }
inline int __syncthreads_count(int p, EMU_SITE) { return int(emu::detail::block_sync(emu::detail::BarOp::Count, p, emu_loc)); }
inline int __syncthreads_and(int p, EMU_SITE) { return int(emu::detail::block_sync(emu::detail::BarOp::And, p, emu_loc)); }
inline int __syncthreads_or(int p, EMU_SITE) { return int(emu::detail::block_sync(emu::detail::BarOp::Or, p, emu_loc)); }
inline void __syncwarp(unsigned mask = 0xffffffffu, EMU_SITE) {
  emu::detail::warp_collective<int>(emu::detail::W::SyncWarp, mask, 0, 0, 32, false, emu_loc);
}

template <class T> inline T __shfl_sync(unsigned mask, T v, int src, int width = warpSize, EMU_SITE) {
  return emu::detail::warp_collective(emu::detail::W::ShflIdx, mask, v, src, width, false, emu_loc);
}
template <class T> inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = warpSize, EMU_SITE) {
  return emu::detail::warp_collective(emu::detail::W::ShflUp, mask, v, int(delta), width, false, emu_loc);
}
template <class T> inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = warpSize, EMU_SITE) {
  return emu::detail::warp_collective(emu::detail::W::ShflDown, mask, v, int(delta), width, false, emu_loc);
}
template <class T> inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = warpSize, EMU_SITE) {
  return emu::detail::warp_collective(emu::detail::W::ShflXor, mask, v, lane_mask, width, false, emu_loc);
}

inline unsigned __ballot_sync(unsigned mask, int pred, EMU_SITE) {
  return emu::detail::warp_collective<unsigned>(emu::detail::W::Ballot, mask, pred != 0, 0, 32, false, emu_loc);
}
inline int __all_sync(unsigned mask, int pred, EMU_SITE) {
  return int(emu::detail::warp_collective<unsigned>(emu::detail::W::All, mask, pred != 0, 0, 32, false, emu_loc));
}
inline int __any_sync(unsigned mask, int pred, EMU_SITE) {
  return int(emu::detail::warp_collective<unsigned>(emu::detail::W::Any, mask, pred != 0, 0, 32, false, emu_loc));
}

#define EMU_REDUCE(NAME, OP)                                                                      \
  inline unsigned NAME(unsigned mask, unsigned v, EMU_SITE) {                                     \
    return emu::detail::warp_collective<unsigned>(emu::detail::W::OP, mask, v, 0, 32, false, emu_loc); \
  }                                                                                               \
  inline int NAME(unsigned mask, int v, EMU_SITE) {                                               \
    return emu::detail::warp_collective<int>(emu::detail::W::OP, mask, v, 0, 32, true, emu_loc);  \
  }
EMU_REDUCE(__reduce_add_sync, RedAdd)
EMU_REDUCE(__reduce_min_sync, RedMin)
EMU_REDUCE(__reduce_max_sync, RedMax)
#undef EMU_REDUCE
inline unsigned __reduce_and_sync(unsigned mask, unsigned v, EMU_SITE) {
  return emu::detail::warp_collective<unsigned>(emu::detail::W::RedAnd, mask, v, 0, 32, false, emu_loc);
}
inline unsigned __reduce_or_sync(unsigned mask, unsigned v, EMU_SITE) {
  return emu::detail::warp_collective<unsigned>(emu::detail::W::RedOr, mask, v, 0, 32, false, emu_loc);
}
inline unsigned __reduce_xor_sync(unsigned mask, unsigned v, EMU_SITE) {
  return emu::detail::warp_collective<unsigned>(emu::detail::W::RedXor, mask, v, 0, 32, false, emu_loc);
}

inline unsigned __activemask() { return emu::detail::active_mask(); }

// A trap ends the CUDA thread and fails the launch (on the GPU it kills the context).
[[noreturn]] inline void __trap(EMU_SITE) {
  emu::detail::thread_abort("__trap() at " + emu::detail::site(emu_loc.file_name(), emu_loc.line()) + " in " +
                            emu::detail::lane_where(emu::detail::self()));
}
inline long long clock64() {
  static std::atomic<long long> ticks{0};
  return ticks.fetch_add(1, std::memory_order_relaxed);
}
