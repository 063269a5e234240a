// cuda_emu_core.h -- part 3 of the clipforge CUDA CPU emulator: fibers, resident blocks, shared
// memory, context switch (the scheduler and grid loop are in cuda_emu_grid.h).
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

// ---------------------------------------------------------------- names for diagnostics
inline std::string block_name() {
  return "block (" + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," + std::to_string(blockIdx.z) + ")";
}
inline const char* warp_op_name(WarpOp op) {
  static const char* names[] = {"__syncwarp", "__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync",
                                "__ballot_sync", "__all_sync", "__any_sync", "__reduce_add_sync", "__reduce_min_sync",
                                "__reduce_max_sync", "__reduce_and_sync", "__reduce_or_sync", "__reduce_xor_sync"};
  return names[int(op)];
}
}  // namespace emu::detail
