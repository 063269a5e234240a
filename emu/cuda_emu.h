// cuda_emu.h -- the clipforge CUDA CPU emulator: compile .cu kernels as host C++ and run them.
//
// The same kernel sources that nvcc builds for the GPU are compiled by g++ (-std=c++20) with
// emu/include first on the include path (its cuda_runtime.h, cuda_fp16.h, cuda_bf16.h,
// device_launch_parameters.h all lead here). build.rs does this for every kernels/*.cu.
//
//   cuda_emu_base.h   qualifiers, dim3/vector types, threadIdx & co, settings, diagnostics
//   cuda_emu_math.h   __half/__nv_bfloat16, float intrinsics, min/max, atomics
//   cuda_emu_core.h   fibers, context switch, resident blocks, shared memory
//   cuda_emu_sync.h   __syncthreads*, __syncwarp, shuffles, votes, warp reductions, __trap
//   cuda_emu_grid.h   block scheduler (interleaved resident blocks), grid loop
//   cuda_emu_launch.h launch with cuLaunchKernel-style void** params, kernel registry
//   cuda_emu_async.h  cp.async with commit/wait groups (kernels/mma.cuh)
//   cuda_emu_guard.h  guard pages after global buffers: out-of-bounds reads and writes fail the launch
//   emu_capi.cpp      C ABI for Rust: emu_launch, emu_set_schedule, ...
//
// Not emulated: inline PTX/asm (kernels reach cp.async, mma.sync and ldmatrix through the
// __CUDA_EMU__ wrappers of kernels/mma.cuh), wgmma, TMA, mbarrier, clusters, cooperative grid
// sync, dynamic parallelism, textures, the weak memory model (threads switch only at
// synchronisation points), inter-block spin-waits (a block spinning on a flag that another block
// sets never yields: it hangs), out-of-bounds accesses within a buffer's 16-byte rounding or of
// memory not allocated through the guarded allocator (emu::DeviceMem on the Rust side: every
// emulated device buffer of EmuOps, the kernel tests and the op table), performance (use
// ptxas -v and a real GPU for that).
#pragma once
#include "cuda_emu_base.h"
#include "cuda_emu_math.h"
#include "cuda_emu_core.h"
#include "cuda_emu_sync.h"
#include "cuda_emu_grid.h"
#include "cuda_emu_launch.h"
#include "cuda_emu_async.h"
#include "cuda_emu_guard.h"
