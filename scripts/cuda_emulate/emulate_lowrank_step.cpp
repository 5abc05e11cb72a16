// The CUDA low-rank (LoRA) power-step kernels (csrc/cuda/lowrank_step_kernels.cuh), compiled as
// host C++ over cuda_shim.h and driven with the same tables and the same launch sequence
// (launch_lowrank_steps) as csrc/cuda/lowrank_step_cuda.cu. Built into a shared library by python_tests/test_lowrank_step.py
// and called through ctypes on CPU tensors; checks the device code without a GPU.
#include "cuda_shim.h"

#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <cstring>

#include "cuda/lowrank_step_kernels.cuh"

using namespace specreg_fast::cuda;

namespace {

// Runs a kernel of the shared launch sequence on the host (as emulate_power_step.cpp's).
struct EmuLauncher {
  template <typename... KArgs, typename... Args>
  void operator()(void (*kernel)(KArgs...), LaunchDim grid, LaunchDim block, Args... args) const {
    emu::launch({grid.x, grid.y, 1}, {block.x, block.y, 1}, [&] { kernel(args...); });
  }
};

// dims: m, n, stride0, stride1 per map; A/B: the factors in the accumulator dtype, contiguous.
template <typename scalar_t>
void lowrank_step(int L, const int64_t* dims, void* const* w, void* const* u, void* const* v, void* const* A,
                  void* const* B, const int64_t* ranks, const double* scales, int64_t n_iter, double tol, int64_t sms,
                  void* est_out) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  std::vector<HostLayer> layers;
  std::vector<HostLowRank> factors;
  for (int l = 0; l < L; ++l) {
    layers.push_back({w[l], u[l], v[l], dims[4 * l], dims[4 * l + 1], dims[4 * l + 2], dims[4 * l + 3]});
    factors.push_back({A[l], B[l], ranks[l], scales[l]});
  }
  HostTable p = build_table(layers, pick_rows_per_tile(layers, sizeof(scalar_t), sms));
  int64_t sum_ypart = 0, sum_r = 0;
  std::vector<LowRankDesc> lr = build_lowrank_table(p, factors, sum_ypart, sum_r);
  std::vector<acc_t> t(std::max<int64_t>(p.sum_m, 1)), a(std::max<int64_t>(p.sum_n, 1)),
      part(std::max<int64_t>(p.sum_part, 1)), u0(std::max<int64_t>(p.sum_m, 1)), v0(std::max<int64_t>(p.sum_n, 1)),
      ypart(std::max<int64_t>(sum_ypart, 1)), z(std::max<int64_t>(sum_r, 1)), y(std::max<int64_t>(sum_r, 1));
  for (int l = 0; l < L; ++l) {  // start-of-call copies
    std::memcpy(u0.data() + p.descs[l].t_off, u[l], sizeof(acc_t) * p.descs[l].m);
    std::memcpy(v0.data() + p.descs[l].a_off, v[l], sizeof(acc_t) * p.descs[l].n);
  }
  std::vector<acc_t> est(L, acc_t(0));
  std::vector<int> flags = p.flags;
  const LowRankBuffers<acc_t> b{p.descs.data(), lr.data(), p.tile_layer.data(), flags.data(), z.data(), y.data(),
                                t.data(),       a.data(),  part.data(),         ypart.data(), est.data(), u0.data(),
                                v0.data()};
  launch_lowrank_steps<scalar_t, acc_t>(p, b, n_iter, tol, EmuLauncher{}, [](int64_t) {});
  std::memcpy(est_out, est.data(), sizeof(acc_t) * L);
}

}  // namespace

// dtype of W: 0 float32, 1 float64, 2 float16, 3 bfloat16 (one launch group); factors, u, v
// and est_out in the accumulator dtype (float64 for 1, else float32).
extern "C" int emu_lowrank_step(int dtype, int L, const int64_t* dims, void* const* w, void* const* u, void* const* v,
                                void* const* A, void* const* B, const int64_t* ranks, const double* scales,
                                int64_t n_iter, double tol, int64_t sms, void* est_out) {
  switch (dtype) {
    case 0: lowrank_step<float>(L, dims, w, u, v, A, B, ranks, scales, n_iter, tol, sms, est_out); return 0;
    case 1: lowrank_step<double>(L, dims, w, u, v, A, B, ranks, scales, n_iter, tol, sms, est_out); return 0;
    case 2: lowrank_step<c10::Half>(L, dims, w, u, v, A, B, ranks, scales, n_iter, tol, sms, est_out); return 0;
    case 3: lowrank_step<c10::BFloat16>(L, dims, w, u, v, A, B, ranks, scales, n_iter, tol, sms, est_out); return 0;
  }
  return 1;
}
