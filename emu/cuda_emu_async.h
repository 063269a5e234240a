// cuda_emu_async.h -- part 7 of the clipforge CUDA CPU emulator: cp.async (global -> shared
// asynchronous copies) with commit/wait groups, as kernels/mma.cuh uses them under __CUDA_EMU__.
//
// Interface (called by one CUDA thread, like the PTX instructions it stands for):
//   emu::cp_async(dst, src, bytes)  cp.async.{ca,cg}.shared.global [dst], [src], bytes (4, 8 or 16)
//   emu::cp_async_commit()          cp.async.commit_group
//   emu::cp_async_wait(n)           cp.async.wait_group n
// Semantics (PTX ISA), per CUDA thread (fiber):
//   * cp_async reads the source at issue (an out-of-bounds source faults there, see
//     cuda_emu_guard.h) and queues the copy in the thread's current, open group. Its
//     destination is UNDEFINED until the copy completes: the emulator fills it with 0xFF
//     (NaN / -1) at issue, so a premature read sees poison, not the previous tile.
//   * cp_async_commit closes the open group (an empty group too).
//   * cp_async_wait(n) completes every committed group except the n most recent ones; copies
//     not yet committed are NOT covered. __syncthreads does not complete anything.
//   * Adversarially, data lands as late as allowed: exactly at the wait that covers it (or at
//     thread exit). A kernel with a missing wait, or wait_group 1 where 0 is needed, reads
//     poison. Sizes other than 4/8/16 and misaligned addresses are launch errors.
// Include cuda_emu.h rather than this file.
#pragma once
#include <cstring>
#include "cuda_emu_core.h"

namespace emu {
inline void cp_async(void* dst, const void* src, unsigned bytes,
                     const std::source_location& loc = std::source_location::current()) {
  detail::Fiber& f = detail::self();
  const std::string here = "cp.async at " + detail::site(loc.file_name(), loc.line());
  if (bytes != 4 && bytes != 8 && bytes != 16)
    detail::thread_abort(here + " in " + detail::where(blockIdx, f.tid) + ": size must be 4, 8 or 16 bytes, got " +
                         std::to_string(bytes));
  if (reinterpret_cast<uintptr_t>(dst) % bytes || reinterpret_cast<uintptr_t>(src) % bytes)
    detail::thread_abort(here + " in " + detail::where(blockIdx, f.tid) + ": " + std::to_string(bytes) +
                         "-byte copy with a misaligned address (dst " + std::to_string(reinterpret_cast<uintptr_t>(dst) % 16) +
                         ", src " + std::to_string(reinterpret_cast<uintptr_t>(src) % 16) + " mod 16)");
  detail::AsyncCopy c;
  c.dst = dst;
  c.bytes = bytes;
  c.group = f.async_group;
  std::memcpy(c.data, src, bytes);  // the source is read now
  std::memset(dst, 0xFF, bytes);    // the destination is undefined until the copy completes
  f.async_q.push_back(c);
}
inline void cp_async_commit() { ++detail::self().async_group; }
inline void cp_async_wait(int n, const std::source_location& loc = std::source_location::current()) {
  detail::Fiber& f = detail::self();
  if (n < 0)
    detail::thread_abort("cp.async.wait_group at " + detail::site(loc.file_name(), loc.line()) + ": negative count " +
                         std::to_string(n));
  if (uint64_t(n) < f.async_group) detail::async_complete(f, f.async_group - uint64_t(n));
}
}  // namespace emu
