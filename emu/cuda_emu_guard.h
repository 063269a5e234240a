// cuda_emu_guard.h -- part 8 of the clipforge CUDA CPU emulator: out-of-bounds global memory
// accesses (reads and writes) caught by guard pages.
//
// guard_alloc(front, bytes) maps `front + round16(bytes)` bytes so that their end abuts a
// PROT_NONE page, and registers that page with the buffer it guards (start = base + front,
// `bytes` long) in a fixed, lock-free table. `front` is for callers that keep canaries before
// the data (a multiple of 16 keeps the data 16-byte aligned); the round-up to 16 keeps 16-byte
// vector loads of the last elements legal, so accesses within that padding are NOT caught
// (the tests' canaries catch writes there).
//
// A process-wide SIGSEGV/SIGBUS handler (installed once, by the first guard_alloc; it chains to
// the handler that was there before, e.g. Rust's stack-overflow reporter) recognises a fault on
// a registered guard page while this host thread runs a launch: it records the first such fault
// of the launch in a per-thread POD record (address, read or write, which buffer, blockIdx and
// threadIdx of the running fiber), makes the page readable and writable (zero-filled), and
// returns, so the faulting instruction re-executes and the kernel runs on. The scheduler
// (after_resume) turns the record into the launch's error:
//   "out-of-bounds read at byte offset O of a B-byte buffer (N bytes past its end) by block
//    (x,y,z) thread (x,y,z)";
// the pages are protected again when the launch ends. Any other fault goes to the previous
// handler (Rust's, or the default action: the process dies with SIGSEGV as before).
// The handler only touches lock-free atomics, POD thread_locals, mprotect and a byte loop.
// Include cuda_emu.h rather than this file.
#pragma once
#include <csignal>
#include <ucontext.h>
#include "cuda_emu_core.h"

namespace emu::detail {
struct GuardEntry {
  std::atomic<uintptr_t> page{0};  // the PROT_NONE page; 0 = free slot
  std::atomic<int> claimed{0};
  uintptr_t start = 0;             // the guarded buffer
  size_t bytes = 0;
};
constexpr size_t kGuardSlots = size_t(1) << 16;
inline GuardEntry g_guards[kGuardSlots];
inline std::atomic<size_t> g_guard_hi{0};    // every used slot is below this
inline std::atomic<size_t> g_guard_hint{0};  // where the next free-slot search starts
inline size_t g_page = 0;                     // set before the handler is installed
inline struct sigaction g_old_segv, g_old_bus;

// What the handler saw on this host thread (plain data: written from a signal handler).
struct FaultRecord {
  int in_launch;
  volatile int hit;   // a guard fault happened in the current launch
  int reported;       // ... and was turned into the launch error
  int write;          // 1 write, 0 read, -1 unknown
  uintptr_t addr, start;
  size_t bytes;
  uint3 block, thread;
  int nopened;
  uintptr_t opened[64];  // guard pages made accessible during this launch
};
inline thread_local FaultRecord t_fault{};

inline void chain_fault(int sig, siginfo_t* si, void* uc) {
  const struct sigaction& old = sig == SIGBUS ? g_old_bus : g_old_segv;
  if ((old.sa_flags & SA_SIGINFO) && old.sa_sigaction) {
    old.sa_sigaction(sig, si, uc);
  } else if (old.sa_handler != SIG_DFL && old.sa_handler != SIG_IGN) {
    old.sa_handler(sig);
  } else {
    signal(sig, SIG_DFL);  // return: the instruction faults again and the default action runs
  }
}

inline void guard_fault_handler(int sig, siginfo_t* si, void* uc) {
  FaultRecord& fr = t_fault;
  const uintptr_t addr = reinterpret_cast<uintptr_t>(si->si_addr);
  const uintptr_t page = addr & ~uintptr_t(g_page - 1);
  if (fr.in_launch && fr.nopened < 64) {
    const size_t hi = g_guard_hi.load(std::memory_order_acquire);
    for (size_t i = 0; i < hi; ++i) {
      GuardEntry& g = g_guards[i];
      if (g.page.load(std::memory_order_acquire) != page) continue;
      if (!fr.hit) {
        fr.addr = addr;
        fr.start = g.start;
        fr.bytes = g.bytes;
        fr.block = blockIdx;
        fr.thread = threadIdx;
#if defined(__x86_64__)
        fr.write = (static_cast<ucontext_t*>(uc)->uc_mcontext.gregs[REG_ERR] & 2) ? 1 : 0;
#else
        fr.write = -1;
#endif
        fr.hit = 1;
      }
      if (mprotect(reinterpret_cast<void*>(page), g_page, PROT_READ | PROT_WRITE) != 0) break;
      volatile unsigned char* p = reinterpret_cast<unsigned char*>(page);
      for (size_t k = 0; k < g_page; ++k) p[k] = 0;
      fr.opened[fr.nopened++] = page;
      return;
    }
  }
  chain_fault(sig, si, uc);
}

inline void install_guard_handler() {
  static std::once_flag once;
  std::call_once(once, [] {
    g_page = size_t(sysconf(_SC_PAGESIZE));
    struct sigaction sa;
    std::memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = &guard_fault_handler;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_old_segv);
    sigaction(SIGBUS, &sa, &g_old_bus);
  });
}

inline size_t guard_body(size_t bytes) { return (bytes + 15) & ~size_t(15); }
inline size_t guard_map_len(size_t front, size_t bytes) {
  return ((front + guard_body(bytes) + g_page - 1) & ~(g_page - 1)) + g_page;
}

// Returns the base of `front + round16(bytes)` bytes whose end abuts a guard page (zeroed), or
// nullptr when the mapping fails. The guard page is registered for [base+front, +bytes).
inline void* guard_alloc(size_t front, size_t bytes) {
  install_guard_handler();
  const size_t len = guard_map_len(front, bytes);
  void* m = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) return nullptr;
  const uintptr_t guard = reinterpret_cast<uintptr_t>(m) + len - g_page;
  char* base = reinterpret_cast<char*>(guard - guard_body(bytes) - front);
  if (mprotect(reinterpret_cast<void*>(guard), g_page, PROT_NONE) != 0) return base;  // unguarded
  const size_t h = g_guard_hint.load(std::memory_order_relaxed);
  for (size_t k = 0; k < kGuardSlots; ++k) {
    const size_t i = (h + k) % kGuardSlots;
    int expect = 0;
    if (!g_guards[i].claimed.compare_exchange_strong(expect, 1, std::memory_order_acq_rel)) continue;
    g_guards[i].start = reinterpret_cast<uintptr_t>(base) + front;
    g_guards[i].bytes = bytes;
    g_guards[i].page.store(guard, std::memory_order_release);
    size_t hi = g_guard_hi.load(std::memory_order_relaxed);
    while (hi < i + 1 && !g_guard_hi.compare_exchange_weak(hi, i + 1, std::memory_order_acq_rel)) {
    }
    g_guard_hint.store(i + 1, std::memory_order_relaxed);
    return base;
  }
  mprotect(reinterpret_cast<void*>(guard), g_page, PROT_READ | PROT_WRITE);  // table full: unguarded
  return base;
}

inline void guard_free(void* base, size_t front, size_t bytes) {
  if (!base) return;
  const size_t len = guard_map_len(front, bytes);
  const uintptr_t guard = reinterpret_cast<uintptr_t>(base) + front + guard_body(bytes);
  const size_t hi = g_guard_hi.load(std::memory_order_acquire);
  for (size_t i = 0; i < hi; ++i) {
    GuardEntry& g = g_guards[i];
    if (g.page.load(std::memory_order_acquire) != guard) continue;
    g.page.store(0, std::memory_order_release);
    g.claimed.store(0, std::memory_order_release);
    g_guard_hint.store(i, std::memory_order_relaxed);
    break;
  }
  munmap(reinterpret_cast<void*>(guard + g_page - len), len);
}

// Launch begin/end and the per-switch check (called by run_grid / drive_warp).
inline void guard_launch_begin() {
  t_fault.hit = 0;
  t_fault.reported = 0;
  t_fault.nopened = 0;
  t_fault.in_launch = 1;
}
inline void guard_report() {
  FaultRecord& fr = t_fault;
  if (!fr.hit || fr.reported) return;
  fr.reported = 1;
  const size_t off = fr.addr - fr.start;
  char buf[320];
  std::snprintf(buf, sizeof buf,
                "out-of-bounds %s at byte offset %zu of a %zu-byte buffer (%zu bytes past its end) by block (%u,%u,%u) "
                "thread (%u,%u,%u)",
                fr.write == 1 ? "write" : fr.write == 0 ? "read" : "access", off, fr.bytes, off - fr.bytes, fr.block.x,
                fr.block.y, fr.block.z, fr.thread.x, fr.thread.y, fr.thread.z);
  fail(buf);
}
inline void after_resume() {
  if (t_fault.hit && !t_fault.reported) guard_report();
}
inline void guard_launch_end() {
  guard_report();
  FaultRecord& fr = t_fault;
  fr.in_launch = 0;
  for (int i = 0; i < fr.nopened; ++i) mprotect(reinterpret_cast<void*>(fr.opened[i]), g_page, PROT_NONE);
  fr.nopened = 0;
}
}  // namespace emu::detail
