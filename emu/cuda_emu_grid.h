// cuda_emu_grid.h -- part 5 of the clipforge CUDA CPU emulator: the block scheduler and the grid
// loop (barrier resolution per block, interleaving of the resident blocks, launch checks). The
// execution model is described in cuda_emu_core.h.
// Include cuda_emu.h rather than this file.
#pragma once
#include "cuda_emu_sync.h"

namespace emu::detail {
// ---------------------------------------------------------------- block scheduler
// Resolve one __syncthreads* round of block `b` (blockIdx == b.idx). Returns 1 released,
// 0 all threads exited, -1 error.
inline int release_block_barrier(Block& b, const Settings& s) {
  const unsigned n = b.nthreads;
  unsigned at_bar = 0, exited = 0, in_warp_op = 0;
  Fiber *first_bar = nullptr, *first_warp = nullptr;
  for (unsigned i = 0; i < n; ++i) {
    Fiber& f = b.fibers[i];
    if (f.state == State::Exited) ++exited;
    else if (f.state == State::AtBarrier) { ++at_bar; if (!first_bar) first_bar = &f; }
    else if (f.state == State::AtWarpOp) { ++in_warp_op; if (!first_warp) first_warp = &f; }
  }
  if (exited == n) return 0;
  if (in_warp_op || !at_bar) {
    std::string m = "deadlock in " + block_name() + ": ";
    if (first_warp)
      m += std::to_string(in_warp_op) + " thread(s) wait in warp collectives (first: thread (" +
           std::to_string(first_warp->tid.x) + "," + std::to_string(first_warp->tid.y) + "," +
           std::to_string(first_warp->tid.z) + ") in " + warp_op_name(first_warp->op) + " at " +
           site(first_warp->file, first_warp->line) + ", mask " + hex32(first_warp->mask) + "), ";
    m += std::to_string(at_bar) + " wait in __syncthreads";
    if (first_bar) {
      m += " (at " + site(first_bar->file, first_bar->line);
      for (unsigned i = 0; i < n; ++i) {  // name a second barrier if they differ
        const Fiber& g = b.fibers[i];
        if (g.state == State::AtBarrier && (g.line != first_bar->line || std::strcmp(g.file, first_bar->file))) {
          m += " and " + site(g.file, g.line);
          break;
        }
      }
      m += ")";
    }
    m += ", " + std::to_string(exited) + " have exited";
    fail(m);
    return -1;
  }
  for (unsigned i = 0; i < n; ++i) {
    Fiber& f = b.fibers[i];
    if (f.state != State::AtBarrier) continue;
    if (f.line != first_bar->line || std::strcmp(f.file, first_bar->file) != 0 || f.bar != first_bar->bar) {
      fail("divergent __syncthreads in " + block_name() + ": threads wait at different barriers (" +
           site(first_bar->file, first_bar->line) + " and " + site(f.file, f.line) + ", e.g. " +
           where(blockIdx, first_bar->tid) + " vs thread (" + std::to_string(f.tid.x) + "," +
           std::to_string(f.tid.y) + "," + std::to_string(f.tid.z) + "))");
      return -1;
    }
  }
  if (exited) {
    std::string m = "__syncthreads at " + site(first_bar->file, first_bar->line) + " in " + block_name() +
                    " is reached by " + std::to_string(at_bar) + " threads while " + std::to_string(exited) +
                    " have exited (barrier in divergent code or early return)";
    if (s.strict) { fail(m); return -1; }
    warn(m);
  }
  int count = 0;
  for (unsigned i = 0; i < n; ++i)
    if (b.fibers[i].state == State::AtBarrier) count += b.fibers[i].pred != 0;
  for (unsigned i = 0; i < n; ++i) {
    Fiber& f = b.fibers[i];
    if (f.state != State::AtBarrier) continue;
    f.result = f.bar == BarOp::Count ? uint64_t(count)
             : f.bar == BarOp::And   ? uint64_t(count == int(at_bar))
             : f.bar == BarOp::Or    ? uint64_t(count > 0) : 0;
    f.state = State::Ready;
  }
  return 1;
}

// Defined in cuda_emu_guard.h: guard-page faults of global buffers become launch errors.
inline void after_resume();        // after every switch back to the scheduler
inline void guard_launch_begin();
inline void guard_launch_end();

// Makes `b` the resident block with index `idx`: fresh fibers, poisoned shared memory.
inline void admit_block(Runner& r, Block& b, uint3 idx, unsigned n, dim3 bdim, size_t smem, const Settings& s) {
  if (b.fibers.size() < n) b.fibers.resize(n);
  b.idx = idx;
  b.nthreads = n;
  b.active = true;
  b.epoch = ++r.block_epoch;
  prepare_dyn_smem(b, smem);
  for (unsigned i = 0; i < n; ++i) {
    Fiber& f = b.fibers[i];
    prepare_stack(f, s.stack_bytes);
    f.tid = uint3{i % bdim.x, (i / bdim.x) % bdim.y, i / (bdim.x * bdim.y)};
    f.lane = i % 32;
    f.warp = i / 32;
    f.state = State::Ready;
    f.async_q.clear();
    f.async_group = 0;
  }
}

// Drives warp `w` of block `b` until none of its lanes can move. False on a launch error.
inline bool drive_warp(Runner& r, Block& b, unsigned w, const unsigned* lanes, const Settings& s) {
  for (;;) {
    for (unsigned k = 0; k < 32; ++k) {
      const unsigned id = w * 32 + lanes[k];
      if (id < b.nthreads && b.fibers[id].state == State::Ready) {
        resume(r, b, b.fibers[id]);
        after_resume();
      }
      if (failed()) return false;
    }
    blockIdx = b.idx;
    if (!settle_warp(b, w, s)) break;
    if (failed()) return false;
  }
  return !failed();
}

struct LaunchResult {
  int code = 0;  // 0 ok, 1 error during execution, 3 invalid launch configuration
  std::string error;
  std::vector<std::string> warnings;
};

// Runs `entry(ctx)` as every thread of every block, on the calling host thread. Up to
// Settings::resident_blocks blocks are resident at once and interleaved: every scheduling round
// drives each (block, warp) pair to its next synchronisation point, in the schedule's order
// (block-major forward, the reverse, or a fresh random permutation of all pairs), then resolves
// each block's barrier. A finished block's slot goes to the next block of the grid (in linear,
// reverse linear or shuffled order).
inline LaunchResult run_grid(dim3 grid, dim3 block, size_t smem, void (*entry)(void*), void* ctx) {
  const Settings s = thread_settings();
  const uint64_t nthreads = uint64_t(block.x) * block.y * block.z;
  const uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
  char buf[200];
  if (nthreads == 0 || nthreads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64 || nblocks == 0 ||
      grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
    std::snprintf(buf, sizeof buf, "invalid launch configuration: grid (%u,%u,%u) block (%u,%u,%u)", grid.x, grid.y,
                  grid.z, block.x, block.y, block.z);
    return {3, buf, {}};
  }
  if (smem > s.max_dyn_smem) {
    std::snprintf(buf, sizeof buf, "invalid launch configuration: %zu bytes of dynamic shared memory (max %zu)", smem,
                  s.max_dyn_smem);
    return {3, buf, {}};
  }
  Runner& r = t_run;
  if (r.busy) return {3, "launch from inside a running kernel is not supported", {}};
  Diag diag;
  t_diag = &diag;
  r.busy = true;
  guard_launch_begin();
  r.entry = entry;
  r.entry_ctx = ctx;
  gridDim = grid;
  blockDim = block;
  std::mt19937_64 rng(s.seed * 0x9E3779B97F4A7C15ull + 12345);
  std::vector<uint64_t> order;
  if (s.schedule == Schedule::Random) {
    order.resize(nblocks);
    for (uint64_t i = 0; i < nblocks; ++i) order[i] = i;
    std::shuffle(order.begin(), order.end(), rng);
  }
  const unsigned n = unsigned(nthreads), nwarps = (n + 31) / 32;
  const unsigned k = unsigned(std::min<uint64_t>(std::max(1u, s.resident_blocks), nblocks));
  while (r.blocks.size() < k) r.blocks.push_back(std::make_unique<Block>());
  uint64_t next = 0;  // blocks admitted so far
  auto admit_next = [&](Block& b) {
    if (next == nblocks) {
      b.active = false;
      return;
    }
    const uint64_t i = next++;
    const uint64_t lin = s.schedule == Schedule::Forward ? i : s.schedule == Schedule::Reverse ? nblocks - 1 - i : order[i];
    admit_block(r, b, uint3{unsigned(lin % grid.x), unsigned((lin / grid.x) % grid.y), unsigned(lin / (uint64_t(grid.x) * grid.y))},
                n, block, smem, s);
  };
  for (unsigned i = 0; i < k; ++i) admit_next(*r.blocks[i]);
  unsigned lanes[32];
  for (unsigned i = 0; i < 32; ++i) lanes[i] = s.schedule == Schedule::Reverse ? 31 - i : i;
  std::vector<std::pair<unsigned, unsigned>> work;  // (slot, warp) in this round's order
  work.reserve(size_t(k) * nwarps);
  unsigned live = k;
  while (live > 0 && !failed()) {
    work.clear();
    for (unsigned b = 0; b < k; ++b)
      if (r.blocks[b]->active)
        for (unsigned w = 0; w < nwarps; ++w) work.emplace_back(b, s.schedule == Schedule::Reverse ? nwarps - 1 - w : w);
    if (s.schedule == Schedule::Random) {
      std::shuffle(work.begin(), work.end(), rng);
      std::shuffle(lanes, lanes + 32, rng);
    }
    for (const auto& [b, w] : work)
      if (!drive_warp(r, *r.blocks[b], w, lanes, s)) break;
    if (failed()) break;
    for (unsigned i = 0; i < k && !failed(); ++i) {
      Block& b = *r.blocks[i];
      if (!b.active) continue;
      blockIdx = b.idx;
      const int rel = release_block_barrier(b, s);
      if (rel < 0) break;
      if (rel == 0) {  // finished
        if (!dyn_smem_intact(b))
          fail("out-of-bounds write to dynamic shared memory in " + block_name() + ": bytes past the " +
               std::to_string(smem) + " requested at launch were modified");
        admit_next(b);
        if (!b.active) --live;
      }
    }
  }
  for (unsigned i = 0; i < k; ++i) r.blocks[i]->active = false;
  guard_launch_end();
  r.cur_block = nullptr;
  r.busy = false;
  t_diag = nullptr;
  LaunchResult res;
  res.code = diag.error.empty() ? 0 : 1;
  res.error = std::move(diag.error);
  res.warnings = std::move(diag.warnings);
  return res;
}
}  // namespace emu::detail
