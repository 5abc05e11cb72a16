// The CUDA dense power-step kernels (csrc/cuda/power_step_kernels.cuh), compiled as host C++
// over cuda_shim.h and driven by the same table (build_table) and the same launch sequence
// (launch_power_steps, launch_sigma) as csrc/cuda/power_step_cuda.cu. Built into a shared
// library by python_tests/test_cuda_build.py and called through ctypes on CPU tensors; checks the
// device code and its launch sequence without a GPU.
#include "cuda_shim.h"

// the header-only half types, as csrc/cuda/power_step_cuda.cu instantiates the kernels with
// (the stable ABI: no c10 library code)
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <cstring>

#include "cuda/power_step_kernels.cuh"

using namespace specreg_fast::cuda;

namespace {

std::vector<HostLayer> layers_of(int L, const int64_t* dims, void* const* w, void* const* u, void* const* v) {
  std::vector<HostLayer> out;
  for (int l = 0; l < L; ++l)
    out.push_back({w[l], u[l], v[l], dims[4 * l], dims[4 * l + 1], dims[4 * l + 2], dims[4 * l + 3]});
  return out;
}

// Runs a kernel of the shared launch sequence (power_step_kernels.cuh) as a grid of host threads.
struct EmuLauncher {
  template <typename... KArgs, typename... Args>
  void operator()(void (*kernel)(KArgs...), LaunchDim grid, LaunchDim block, Args... args) const {
    emu::launch({grid.x, grid.y, 1}, {block.x, block.y, 1}, [&] { kernel(args...); });
  }
};

template <typename scalar_t>
void power_step(int L, const int64_t* dims, void* const* w, void* const* u, void* const* v, int64_t n_iter, double tol,
                int64_t sms, void* est_out) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  auto layers = layers_of(L, dims, w, u, v);
  const int64_t rows = pick_rows_per_tile(layers, sizeof(scalar_t), sms);
  HostTable p = build_table(layers, rows);
  std::vector<acc_t> t(std::max<int64_t>(p.sum_m, 1)), a(std::max<int64_t>(p.sum_n, 1)),
      part(std::max<int64_t>(p.sum_part, 1)), u0(std::max<int64_t>(p.sum_m, 1)), v0(std::max<int64_t>(p.sum_n, 1));
  for (int l = 0; l < L; ++l) {  // start-of-call copies (aten::cat in the CUDA glue)
    std::memcpy(u0.data() + p.descs[l].t_off, u[l], sizeof(acc_t) * p.descs[l].m);
    std::memcpy(v0.data() + p.descs[l].a_off, v[l], sizeof(acc_t) * p.descs[l].n);
  }
  std::vector<acc_t> est(L, acc_t(0));
  std::vector<int> flags = p.flags;
  const StepBuffers<acc_t> b{p.descs.data(), p.tile_layer.data(), flags.data(), t.data(), a.data(), part.data(),
                             est.data(),     u0.data(),           v0.data()};
  launch_power_steps<scalar_t, acc_t>(p, b, n_iter, tol, EmuLauncher{}, [](int64_t) {});
  std::memcpy(est_out, est.data(), sizeof(acc_t) * L);
}

template <typename scalar_t>
void sigma(int L, const int64_t* dims, void* const* w, void* const* u, void* const* v, int64_t sms, void* out) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  auto layers = layers_of(L, dims, w, u, v);
  HostTable p = build_table(layers, pick_rows_per_tile(layers, sizeof(scalar_t), sms));
  std::vector<acc_t> part(std::max<int64_t>(p.ntiles, 1)), res(L, acc_t(0));
  launch_sigma<scalar_t, acc_t>(p, p.descs.data(), p.tile_layer.data(), part.data(), res.data(), EmuLauncher{});
  std::memcpy(out, res.data(), sizeof(acc_t) * L);
}

}  // namespace

// dtype: 0 float32, 1 float64, 2 float16, 3 bfloat16 (all layers of one call share it, as in
// one CUDA launch group). dims: m, n, stride0, stride1 per layer. est_out: float or double.
extern "C" int emu_power_step(int dtype, int L, const int64_t* dims, void* const* w, void* const* u, void* const* v,
                              int64_t n_iter, double tol, int64_t sms, void* est_out) {
  switch (dtype) {
    case 0: power_step<float>(L, dims, w, u, v, n_iter, tol, sms, est_out); return 0;
    case 1: power_step<double>(L, dims, w, u, v, n_iter, tol, sms, est_out); return 0;
    case 2: power_step<c10::Half>(L, dims, w, u, v, n_iter, tol, sms, est_out); return 0;
    case 3: power_step<c10::BFloat16>(L, dims, w, u, v, n_iter, tol, sms, est_out); return 0;
  }
  return 1;
}

extern "C" int emu_sigma(int dtype, int L, const int64_t* dims, void* const* w, void* const* u, void* const* v,
                         int64_t sms, void* out) {
  switch (dtype) {
    case 0: sigma<float>(L, dims, w, u, v, sms, out); return 0;
    case 1: sigma<double>(L, dims, w, u, v, sms, out); return 0;
    case 2: sigma<c10::Half>(L, dims, w, u, v, sms, out); return 0;
    case 3: sigma<c10::BFloat16>(L, dims, w, u, v, sms, out); return 0;
  }
  return 1;
}
