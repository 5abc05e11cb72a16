// The CUDA dense power-step kernels (csrc/cuda/power_step_kernels.cuh), compiled as host C++
// over cuda_shim.h and driven with the same table and launch sequence as
// csrc/cuda/power_step_cuda.cu. Built into a shared library by python_tests/test_cuda_build.py
// and called through ctypes on CPU tensors; checks the device code without a GPU.
#include "cuda_shim.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

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

template <typename scalar_t>
void power_step(int L, const int64_t* dims, void* const* w, void* const* u, void* const* v, int64_t n_iter, double tol,
                int64_t sms, void* est_out) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  auto layers = layers_of(L, dims, w, u, v);
  const int64_t rows = pick_rows_per_tile(layers, sizeof(scalar_t), sms);
  HostTable p = build_table(layers, rows);
  std::vector<acc_t> t(std::max<int64_t>(p.sum_m, 1)), a(std::max<int64_t>(p.sum_n, 1)),
      part(std::max<int64_t>(p.sum_part, 1)), u0(std::max<int64_t>(p.sum_m, 1)), v0(std::max<int64_t>(p.sum_n, 1));
  for (int l = 0; l < L; ++l) {  // start-of-call copies (at::cat in the CUDA glue)
    std::memcpy(u0.data() + p.descs[l].t_off, u[l], sizeof(acc_t) * p.descs[l].m);
    std::memcpy(v0.data() + p.descs[l].a_off, v[l], sizeof(acc_t) * p.descs[l].n);
  }
  std::vector<acc_t> est(L, acc_t(0));
  std::vector<int> flags = p.flags;
  const unsigned col_blocks = static_cast<unsigned>((p.max_n + kReduceCols - 1) / kReduceCols);
  for (int64_t it = 0; it < n_iter; ++it) {
    if (p.ntiles > 0) {
      emu::launch({static_cast<unsigned>(p.ntiles), 1, 1}, {kThreads, 1, 1}, [&] {
        fused_rows_kernel<scalar_t, acc_t>(p.descs.data(), p.tile_layer.data(), flags.data(), t.data(), part.data());
      });
      emu::launch({col_blocks, static_cast<unsigned>(L), 1}, {kReduceCols, kReduceLanes, 1}, [&] {
        reduce_partials_kernel<acc_t>(p.descs.data(), flags.data(), part.data(), a.data());
      });
    }
    const bool first = it == 0;
    emu::launch({static_cast<unsigned>(L), 1, 1}, {kReduceThreads, 1, 1}, [&] {
      finalize_kernel<acc_t>(p.descs.data(), flags.data(), est.data(), t.data(), a.data(), u0.data(), v0.data(), tol,
                             first);
    });
  }
  std::memcpy(est_out, est.data(), sizeof(acc_t) * L);
}

template <typename scalar_t>
void sigma(int L, const int64_t* dims, void* const* w, void* const* u, void* const* v, int64_t sms, void* out) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  auto layers = layers_of(L, dims, w, u, v);
  HostTable p = build_table(layers, pick_rows_per_tile(layers, sizeof(scalar_t), sms));
  std::vector<acc_t> part(std::max<int64_t>(p.ntiles, 1)), res(L, acc_t(0));
  if (p.ntiles > 0) {
    emu::launch({static_cast<unsigned>(p.ntiles), 1, 1}, {kThreads, 1, 1}, [&] {
      bilinear_rows_kernel<scalar_t, acc_t>(p.descs.data(), p.tile_layer.data(), part.data());
    });
    emu::launch({static_cast<unsigned>(L), 1, 1}, {1, 1, 1},
                [&] { sum_tiles_kernel<acc_t>(p.descs.data(), part.data(), res.data()); });
  }
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
