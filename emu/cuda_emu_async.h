// cuda_emu_async.h -- part 6 of the clipforge CUDA CPU emulator: cp.async (global -> shared
// asynchronous copies) with commit/wait groups, as kernels/mma.cuh uses them under __CUDA_EMU__.
//
// Interface (called by one CUDA thread, like the PTX instructions it stands for):
//   emu::cp_async(dst, src, bytes)  cp.async.{ca,cg}.shared.global [dst], [src], bytes (4, 8 or 16)
//   emu::cp_async_commit()          cp.async.commit_group
//   emu::cp_async_wait(n)           cp.async.wait_group n (n most recent committed groups may pend)
// This first version copies at issue time (commit/wait are no-ops).
// Include cuda_emu.h rather than this file.
#pragma once
#include <cstring>
#include "cuda_emu_base.h"

namespace emu {
inline void cp_async(void* dst, const void* src, unsigned bytes) { std::memcpy(dst, src, bytes); }
inline void cp_async_commit() {}
inline void cp_async_wait(int n) { (void)n; }
}  // namespace emu
