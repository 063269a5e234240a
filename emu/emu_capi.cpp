// emu_capi.cpp -- C ABI of the clipforge CUDA CPU emulator, called from Rust (src/emu.rs).
//
//   int  emu_launch(name, gx, gy, gz, bx, by, bz, smem_bytes, params, err, err_len)
//        launches the registered extern "C" kernel `name` with cuLaunchKernel-style params
//        (params[i] points at the value of argument i). Returns 0 on success, otherwise
//        1 (error while running: deadlock, divergent barrier, bad collective, smem overrun,
//        __trap, ...), 2 (no kernel of that name), 3 (invalid launch configuration); the
//        message is written to err (NUL-terminated, truncated to err_len).
//   void emu_set_schedule(mode, seed)   0 forward, 1 reverse, 2 random(seed). Applies to
//        launches made later from the CALLING host thread (initially from EMU_SCHEDULE/EMU_SEED).
//   void emu_set_resident_blocks(k)     blocks run interleaved per launch (>= 1; default 4 or
//        EMU_BLOCKS), for launches made later from the CALLING host thread
//   void emu_set_strict(on)             barrier with exited threads: error (1) or warning (0)
//   void* emu_guard_alloc(front, bytes) / emu_guard_free(base, front, bytes): emulated device
//        memory whose end abuts a guard page (cuda_emu_guard.h); the data starts at base + front
//   int  emu_kernel_arity(name)         number of parameters, -1 if unknown
//   size_t emu_kernel_count(), const char* emu_kernel_name(i): the registry
// Launches from different host threads may run concurrently: all emulator state is per host
// thread or per launch, the registry is read-only after static initialisation.
#include "cuda_emu.h"

namespace {
void write_err(char* err, size_t len, const std::string& msg) {
  if (err && len) std::snprintf(err, len, "%s", msg.c_str());
}
}  // namespace

extern "C" int emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                          unsigned bz, unsigned smem_bytes, void** params, char* err, size_t err_len) {
  write_err(err, err_len, "");
  const emu::KernelEntry* k = name ? emu::find_kernel(name) : nullptr;
  if (!k) {
    write_err(err, err_len, std::string("no kernel named '") + (name ? name : "(null)") + "' is registered");
    return 2;
  }
  if (k->arity > 0 && !params) {
    write_err(err, err_len, std::string(name) + ": params is NULL");
    return 3;
  }
  emu::LaunchResult r = k->thunk(dim3(gx, gy, gz), dim3(bx, by, bz), smem_bytes, params);
  if (r.code != 0) write_err(err, err_len, std::string(name) + ": " + r.error);
  return r.code;
}

extern "C" void emu_set_schedule(int mode, uint64_t seed) {
  emu::Settings& s = emu::thread_settings();
  s.schedule = mode == 1 ? emu::Schedule::Reverse : mode == 2 ? emu::Schedule::Random : emu::Schedule::Forward;
  s.seed = seed;
}

extern "C" void emu_set_resident_blocks(unsigned k) { emu::thread_settings().resident_blocks = k ? k : 1; }

extern "C" void emu_set_strict(int on) { emu::thread_settings().strict = on != 0; }

extern "C" int emu_kernel_arity(const char* name) {
  const emu::KernelEntry* k = name ? emu::find_kernel(name) : nullptr;
  return k ? int(k->arity) : -1;
}

extern "C" size_t emu_kernel_count() { return emu::kernel_registry().size(); }

extern "C" const char* emu_kernel_name(size_t i) {
  return i < emu::kernel_registry().size() ? emu::kernel_registry()[i].name : nullptr;
}

extern "C" void* emu_guard_alloc(size_t front, size_t bytes) { return emu::detail::guard_alloc(front, bytes); }

extern "C" void emu_guard_free(void* base, size_t front, size_t bytes) { emu::detail::guard_free(base, front, bytes); }
