// cuda_emu_launch.h -- part 6 of the clipforge CUDA CPU emulator: launching kernels by name.
//
// A kernel is launched with cuLaunchKernel-style parameters: `void** params`, one pointer per
// kernel argument, pointing at that argument's value. Every CUDA thread gets its own copy of
// the arguments (kernels may modify their by-value parameters).
//
// build.rs wraps every kernels/*.cu in its own namespace (one namespace = one CUDA module, so
// same-named __device__ helpers in different files do not collide) and registers each
// `extern "C" __global__` entry point with EMU_REGISTER_KERNEL(namespace, name). The registry
// is filled by static initialisers before main() and only read afterwards.
// Include cuda_emu.h rather than this file.
#pragma once
#include <tuple>
#include "cuda_emu_grid.h"

namespace emu {
using detail::LaunchResult;
using Thunk = LaunchResult (*)(dim3 grid, dim3 block, size_t smem, void** params);

template <class... P, size_t... I>
LaunchResult launch_packed_impl(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, void** params,
                                std::index_sequence<I...>) {
  struct Ctx {
    void (*kernel)(P...);
    std::tuple<std::decay_t<P>...> args;
  };
  Ctx ctx{kernel, std::tuple<std::decay_t<P>...>(*static_cast<std::decay_t<P>*>(params[I])...)};
  void (*entry)(void*) = [](void* c) {
    Ctx* x = static_cast<Ctx*>(c);
    std::apply(x->kernel, x->args);  // by-value parameters: a fresh copy for this thread
  };
  return detail::run_grid(grid, block, smem, entry, &ctx);
}
template <class... P>
LaunchResult launch_packed(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, void** params) {
  return launch_packed_impl(kernel, grid, block, smem, params, std::index_sequence_for<P...>{});
}
template <auto K> LaunchResult thunk(dim3 grid, dim3 block, size_t smem, void** params) {
  return launch_packed(K, grid, block, smem, params);
}
template <class... P> constexpr unsigned arity_of(void (*)(P...)) { return sizeof...(P); }

struct KernelEntry {
  const char* name;
  Thunk thunk;
  unsigned arity;
};
inline std::vector<KernelEntry>& kernel_registry() {
  static std::vector<KernelEntry> r;
  return r;
}
struct Registrar {
  Registrar(const char* name, Thunk t, unsigned arity) { kernel_registry().push_back({name, t, arity}); }
};
inline const KernelEntry* find_kernel(const char* name) {
  for (const KernelEntry& k : kernel_registry())
    if (std::strcmp(k.name, name) == 0) return &k;
  return nullptr;
}
}  // namespace emu

#define EMU_REGISTER_KERNEL(NS, NAME) \
  static ::emu::Registrar emu_registrar_##NAME(#NAME, &::emu::thunk<&NS::NAME>, ::emu::arity_of(&NS::NAME));
