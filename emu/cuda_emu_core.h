// cuda_emu_core.h -- part 3 of the clipforge CUDA CPU emulator: fibers, scheduler, grid loop.
//
// Execution model
//   * Every CUDA thread is a fiber (own stack, cooperative switching). A launch runs on the host
//     thread that made it. Up to Settings::resident_blocks blocks (default 4; EMU_BLOCKS,
//     emu_set_resident_blocks) are resident at once, each with its own fibers, its own shared
//     memory and its blockIdx; when one finishes, its slot takes the next block of the grid.
//   * A fiber runs until it reaches a synchronisation point (__syncthreads*, __syncwarp, a
//     shuffle/vote/reduce, exit); then the scheduler switches to the next fiber. Code between
//     two synchronisation points is therefore atomic with respect to all other threads.
//   * Adversarial order: every scheduling round drives each (resident block, warp) pair as far
//     as it can go (through all the warp collectives it can complete), then resolves each
//     block's barrier. The pairs go block-major in forward order, all reversed (warps and
//     lanes too) in reverse order, or in a fresh random permutation of all pairs (and of the
//     lanes) every round; blocks enter in linear, reverse linear or shuffled order. Blocks thus
//     run ahead of and behind each other between barriers: races between blocks of one grid
//     (a non-atomic read-modify-write straddling a barrier, a value read before the block that
//     produces it wrote it) show up, as races between warps do.
//   * Diagnosed as launch errors, per block: deadlocks, __syncthreads reached from different
//     program points or while some threads have exited (strict mode), warp collectives whose
//     lanes disagree on mask/operation or name exited lanes, shuffles reading lanes outside the
//     mask, writes past the requested dynamic shared memory, __trap(); and out-of-bounds reads
//     and writes of global buffers allocated with guard pages (cuda_emu_guard.h).
//   * Shared memory is poisoned with 0xFF bytes (NaN for floats, -1 for ints) whenever a block
//     enters a slot: dynamic shared memory always, static `__shared__` declarations when build.rs
//     rewrote them into emu::detail::shared_var (declarations inside function bodies); both are
//     per resident block. A `__shared__` that build.rs leaves alone is a host thread_local:
//     shared by the resident blocks and not poisoned (build.rs warns about it).
// Include cuda_emu.h rather than this file.
#pragma once
#include "cuda_emu_base.h"
#include <sys/mman.h>
#include <unistd.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#endif

#if defined(__x86_64__)
// emu_fiber_switch(save, next): push the callee-saved registers and the SSE/x87 control words
// on the current stack, store the stack pointer in *save, load `next` and pop the same frame.
// A new fiber's stack is prepared (prepare_stack) so that the final `ret` enters
// emu_fiber_start, which calls r12(rbx). Weak symbols: every translation unit carries a copy.
extern "C" void emu_fiber_switch(void** save, void* next);
extern "C" void emu_fiber_start();
__asm__(
    ".text\n"
    ".weak emu_fiber_switch\n"
    ".type emu_fiber_switch,@function\n"
    "emu_fiber_switch:\n"
    "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
    "  subq $16, %rsp\n"
    "  stmxcsr (%rsp)\n"
    "  fnstcw 4(%rsp)\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  ldmxcsr (%rsp)\n"
    "  fldcw 4(%rsp)\n"
    "  addq $16, %rsp\n"
    "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n"
    "  ret\n"
    ".size emu_fiber_switch,.-emu_fiber_switch\n"
    ".weak emu_fiber_start\n"
    ".type emu_fiber_start,@function\n"
    "emu_fiber_start:\n"
    "  movq %rbx, %rdi\n"
    "  callq *%r12\n"
    "  ud2\n"
    ".size emu_fiber_start,.-emu_fiber_start\n");
#endif

namespace emu::detail {
enum class State : uint8_t { Ready, AtBarrier, AtWarpOp, Exited };
enum class WarpOp : uint8_t { SyncWarp, ShflIdx, ShflUp, ShflDown, ShflXor, Ballot, All, Any, RedAdd, RedMin, RedMax, RedAnd, RedOr, RedXor };
enum class BarOp : uint8_t { Plain, Count, And, Or };

// One cp.async in flight (cuda_emu_async.h): the source bytes, read at issue, and where they
// land when a cp.async.wait_group covering `group` completes it.
struct AsyncCopy {
  void* dst;
  unsigned bytes;
  uint64_t group;  // == Fiber::async_group while not yet committed
  alignas(16) unsigned char data[16];
};

struct Fiber {
  // context
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
  char* stack = nullptr;  // mmap'ed, lowest page is a guard page
  size_t stack_size = 0;
  // identity
  uint3 tid{};
  unsigned lane = 0, warp = 0;
  State state = State::Exited;
  // pending synchronisation
  WarpOp op = WarpOp::SyncWarp;
  BarOp bar = BarOp::Plain;
  bool is_signed = false;
  unsigned mask = 0;
  int arg = 0, width = 32, pred = 0;
  uint64_t value = 0, result = 0;
  const char* file = nullptr;
  unsigned line = 0;
  // cp.async: copies in flight, oldest first, and the number of groups committed so far
  std::vector<AsyncCopy> async_q;
  uint64_t async_group = 0;
#ifdef EMU_ASAN
  void* fake_stack = nullptr;
#endif
};

// Lands the in-flight copies of groups < `upto` (in issue order) and forgets them.
inline void async_complete(Fiber& f, uint64_t upto) {
  size_t keep = 0;
  for (size_t i = 0; i < f.async_q.size(); ++i) {
    AsyncCopy& c = f.async_q[i];
    if (c.group < upto) std::memcpy(c.dst, c.data, c.bytes);
    else f.async_q[keep++] = c;
  }
  f.async_q.resize(keep);
}

// One resident block: its CUDA threads and its shared memory. A host thread runs up to
// Settings::resident_blocks of these at once (interleaved); a slot is reused by the next block
// of the grid when its block finishes.
struct Block {
  std::vector<Fiber> fibers;
  uint3 idx{};
  unsigned nthreads = 0;
  bool active = false;
  uint64_t epoch = 0;                 // unique per admitted block: static __shared__ re-poisons on change
  std::vector<void*> statics;         // static __shared__ storage, by declaration id (build.rs)
  std::vector<uint64_t> static_epoch;
  unsigned char* dyn = nullptr;       // dynamic shared memory + canary
  size_t dyn_cap = 0, dyn_bytes = 0;
  Block() = default;
  Block(const Block&) = delete;
  Block& operator=(const Block&) = delete;
  ~Block() {
    for (Fiber& f : fibers)
      if (f.stack) munmap(f.stack, f.stack_size);
    for (void* p : statics) std::free(p);
    std::free(dyn);
  }
};

// Per host thread: the resident blocks and the scheduler's own context.
struct Runner {
  std::vector<std::unique_ptr<Block>> blocks;  // stable addresses: fibers point into them
#if defined(__x86_64__)
  void* sched_sp = nullptr;
#else
  ucontext_t sched_uc;
#endif
  Fiber* current = nullptr;
  Block* cur_block = nullptr;      // the block of `current`
  void (*entry)(void*) = nullptr;  // runs the kernel body with one thread's copy of the args
  void* entry_ctx = nullptr;
  uint64_t block_epoch = 0;        // last epoch handed out
  bool busy = false;               // a launch is running on this host thread
#ifdef EMU_ASAN
  const void* sched_stack_bottom = nullptr;
  size_t sched_stack_size = 0;
  void* sched_fake = nullptr;
#endif
};
inline thread_local Runner t_run;
constexpr size_t kDynCanary = 64;
constexpr unsigned char kCanaryByte = 0xA5;

inline Fiber& self() { return *t_run.current; }

// ---------------------------------------------------------------- shared memory
// Static `__shared__ T name;` inside a function is rewritten by build.rs into
// `auto& name = ::emu::detail::shared_var<T, ID>();` (ID unique per declaration): storage of
// the running block, poisoned when a new block takes the slot.
template <class T, int ID> inline T& shared_var() {
  static_assert(std::is_trivially_destructible_v<T>, "__shared__ variables need trivial types");
  Block& b = *t_run.cur_block;
  if (size_t(ID) >= b.statics.size()) {
    b.statics.resize(ID + 1, nullptr);
    b.static_epoch.resize(ID + 1, 0);
  }
  void*& p = b.statics[ID];
  if (!p) p = std::aligned_alloc(64, (sizeof(T) + 63) & ~size_t(63));
  if (b.static_epoch[ID] != b.epoch) {
    std::memset(p, 0xFF, sizeof(T));
    b.static_epoch[ID] = b.epoch;
  }
  return *static_cast<T*>(p);
}
// `extern __shared__ T name[];` is rewritten into `T* name = reinterpret_cast<T*>(dyn_smem());`
// (inside functions) or into a macro with that value (at file scope).
inline unsigned char* dyn_smem() { return t_run.cur_block->dyn; }

inline void prepare_dyn_smem(Block& b, size_t bytes) {
  if (b.dyn_cap < bytes + kDynCanary) {
    std::free(b.dyn);
    b.dyn_cap = (bytes + kDynCanary + 4095) & ~size_t(4095);
    b.dyn = static_cast<unsigned char*>(std::aligned_alloc(128, b.dyn_cap));
  }
  b.dyn_bytes = bytes;
  std::memset(b.dyn, 0xFF, bytes);
  std::memset(b.dyn + bytes, kCanaryByte, kDynCanary);
}
inline bool dyn_smem_intact(const Block& b) {
  for (size_t i = 0; i < kDynCanary; ++i)
    if (b.dyn[b.dyn_bytes + i] != kCanaryByte) return false;
  return true;
}

// ---------------------------------------------------------------- switching
[[noreturn]] inline void fiber_main(Fiber* f);
inline void fiber_main_noarg() { fiber_main(t_run.current); }
inline std::string hex32(unsigned v) {
  char b[16];
  std::snprintf(b, sizeof b, "0x%08x", v);
  return b;
}

inline void prepare_stack(Fiber& f, size_t bytes) {
  if (!f.stack || f.stack_size != bytes) {
    if (f.stack) munmap(f.stack, f.stack_size);
    void* m = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) {
      std::perror("cuda_emu: mmap of a fiber stack");
      std::abort();
    }
    mprotect(m, size_t(sysconf(_SC_PAGESIZE)), PROT_NONE);  // overflow faults instead of corrupting
    f.stack = static_cast<char*>(m);
    f.stack_size = bytes;
  }
#if defined(__x86_64__)
  // frame popped by emu_fiber_switch: [mxcsr|fcw|pad 16][r15][r14][r13][r12][rbx][rbp][ret]
  uintptr_t top = (reinterpret_cast<uintptr_t>(f.stack) + f.stack_size) & ~uintptr_t(15);
  // after `ret` pops this slot, rsp must be 16-aligned for the `call` in emu_fiber_start
  uint64_t* ret_slot = reinterpret_cast<uint64_t*>(top - 24);  // == 8 (mod 16)
  ret_slot[0] = reinterpret_cast<uint64_t>(&emu_fiber_start);
  ret_slot[-1] = 0;                                              // rbp
  ret_slot[-2] = reinterpret_cast<uint64_t>(&f);                 // rbx: argument
  ret_slot[-3] = reinterpret_cast<uint64_t>(&fiber_main);        // r12: function
  ret_slot[-4] = ret_slot[-5] = ret_slot[-6] = 0;                // r13 r14 r15
  uint32_t ctl[4] = {0, 0, 0, 0};
  __asm__ volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(ctl[0]), "=m"(ctl[1]));
  std::memcpy(&ret_slot[-8], ctl, 16);
  f.sp = &ret_slot[-8];
#else
  getcontext(&f.uc);
  f.uc.uc_stack.ss_sp = f.stack;
  f.uc.uc_stack.ss_size = f.stack_size;
  f.uc.uc_link = nullptr;
  makecontext(&f.uc, &fiber_main_noarg, 0);  // resume() has set t_run.current
#endif
}

// scheduler -> fiber
inline void resume(Runner& r, Block& b, Fiber& f) {
  threadIdx = f.tid;
  blockIdx = b.idx;
  r.cur_block = &b;
  r.current = &f;
#ifdef EMU_ASAN
  __sanitizer_start_switch_fiber(&r.sched_fake, f.stack, f.stack_size);
#endif
#if defined(__x86_64__)
  emu_fiber_switch(&r.sched_sp, f.sp);
#else
  swapcontext(&r.sched_uc, &f.uc);
#endif
#ifdef EMU_ASAN
  __sanitizer_finish_switch_fiber(r.sched_fake, nullptr, nullptr);
#endif
  r.current = nullptr;
}

// fiber -> scheduler (returns when the scheduler resumes this fiber)
inline void yield_to_scheduler(Fiber& f, bool exiting = false) {
  Runner& r = t_run;
#ifdef EMU_ASAN
  __sanitizer_start_switch_fiber(exiting ? nullptr : &f.fake_stack, r.sched_stack_bottom, r.sched_stack_size);
#else
  (void)exiting;
#endif
#if defined(__x86_64__)
  emu_fiber_switch(&f.sp, r.sched_sp);
#else
  swapcontext(&f.uc, &r.sched_uc);
#endif
#ifdef EMU_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, &r.sched_stack_bottom, &r.sched_stack_size);
#endif
}

[[noreturn]] inline void fiber_main(Fiber* f) {
#ifdef EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &t_run.sched_stack_bottom, &t_run.sched_stack_size);
#endif
  t_run.entry(t_run.entry_ctx);
  async_complete(*f, UINT64_MAX);  // a thread's pending cp.async copies land when it exits
  f->state = State::Exited;
  yield_to_scheduler(*f, /*exiting=*/true);
  __builtin_trap();  // an exited fiber is never resumed
}

// A device-side error (e.g. __trap): record it and end this CUDA thread. Its stack is
// abandoned without unwinding, like a GPU thread that traps.
[[noreturn]] inline void thread_abort(const std::string& msg) {
  Fiber& f = self();
  fail(msg);
  f.state = State::Exited;
  yield_to_scheduler(f, true);
  __builtin_trap();
}

// ---------------------------------------------------------------- block scheduler
inline bool settle_warp(Block& b, unsigned warp, const Settings& s);  // in cuda_emu_sync.h

inline std::string block_name() {
  return "block (" + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," + std::to_string(blockIdx.z) + ")";
}
inline const char* warp_op_name(WarpOp op) {
  static const char* names[] = {"__syncwarp", "__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync",
                                "__ballot_sync", "__all_sync", "__any_sync", "__reduce_add_sync", "__reduce_min_sync",
                                "__reduce_max_sync", "__reduce_and_sync", "__reduce_or_sync", "__reduce_xor_sync"};
  return names[int(op)];
}

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
