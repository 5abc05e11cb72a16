// CUDA kernels of the dense ops: specreg_fast::power_step_ and specreg_fast::sigma.
//
// Same plan as the CPU kernel and the Triton backend: one launch covers every layer of one
// weight dtype. The host packs a table (LayerDesc per layer), a tile -> layer map and the
// initial per-layer flags into ONE pinned buffer, copied to the device asynchronously on the
// current stream (no host sync anywhere; nothing reads device memory back). One thread block
// handles a tile of kRows rows of one layer:
//
//   pass 1: t_r = W_r . v, one warp per row, 16-byte vectorized loads when the row is
//           contiguous and aligned, fp32 (fp64 for fp64 weights) accumulation, warp shuffles;
//   pass 2: partial_j = sum_r W_rj t_r for the tile's rows (coalesced over j). The tile
//           (kRows rows) was just read, so this touch is served by L1/L2: W leaves DRAM once.
//
// Partials are written per tile and summed in tile order by a second kernel (deterministic,
// no atomics); a third kernel per layer forms |t|, |a|, u = t/|t|, v = a/|a| and the estimate
// |a|/|t| = u^T W v_new, with the op's conventions: zero W keeps the vectors (estimate 0),
// non-finite |t| or |a| restores the start-of-call vectors (estimate NaN), and tol > 0 turns a
// converged layer's device-side flag off so later steps skip it.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <vector>

#include "power_step_checks.h"

#include "power_step_kernels.cuh"

namespace specreg_fast {
namespace cuda {
namespace {

// ----------------------------------------------------------------------------- host side
void check_list(at::TensorList weights, at::TensorList us, at::TensorList vs, const char* op, bool writes) {
  check_power_step_list(weights, us, vs, op, c10::DeviceType::CUDA, writes);
}

// Table, tile map, flags and tile counts of one dtype group, in one pinned buffer copied
// to the device on the current stream without waiting.
struct Plan {
  at::Tensor dev;  // bytes on the device
  const LayerDesc* tab = nullptr;
  const int* tile_layer = nullptr;
  int* flags = nullptr;
  int64_t L = 0, ntiles = 0, sum_m = 0, sum_n = 0, sum_part = 0, max_n = 0;
};

std::vector<HostLayer> host_layers(const std::vector<at::Tensor>& ws, const std::vector<at::Tensor>& us,
                                   const std::vector<at::Tensor>& vs) {
  std::vector<HostLayer> out;
  for (size_t l = 0; l < ws.size(); ++l)
    out.push_back({ws[l].data_ptr(), us[l].data_ptr(), vs[l].data_ptr(), ws[l].size(0), ws[l].size(1), ws[l].stride(0),
                   ws[l].stride(1)});
  return out;
}

int64_t rows_per_tile_for(const std::vector<at::Tensor>& ws) {
  return pick_rows_per_tile(host_layers(ws, ws, ws), ws[0].element_size(),
                            at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
}

Plan make_plan(const std::vector<at::Tensor>& ws, const std::vector<at::Tensor>& us,
               const std::vector<at::Tensor>& vs, int64_t rows_per_tile) {
  Plan p;
  p.L = static_cast<int64_t>(ws.size());
  HostTable ht = build_table(host_layers(ws, us, vs), rows_per_tile);
  const auto& descs = ht.descs;
  const auto& tile_layer = ht.tile_layer;
  const auto& flags = ht.flags;
  p.sum_m = ht.sum_m;
  p.sum_n = ht.sum_n;
  p.sum_part = ht.sum_part;
  p.max_n = ht.max_n;
  p.ntiles = static_cast<int64_t>(tile_layer.size());
  const size_t b_tab = sizeof(LayerDesc) * p.L;
  const size_t b_tiles = sizeof(int) * tile_layer.size();
  const size_t bytes = b_tab + b_tiles + sizeof(int) * p.L;
  auto host = at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  auto* h = host.data_ptr<uint8_t>();
  std::memcpy(h, descs.data(), b_tab);
  if (b_tiles) std::memcpy(h + b_tab, tile_layer.data(), b_tiles);
  std::memcpy(h + b_tab + b_tiles, flags.data(), sizeof(int) * p.L);
  p.dev = host.to(ws[0].device(), /*non_blocking=*/true);
  auto* d = p.dev.data_ptr<uint8_t>();
  p.tab = reinterpret_cast<const LayerDesc*>(d);
  p.tile_layer = reinterpret_cast<const int*>(d + b_tab);
  p.flags = reinterpret_cast<int*>(d + b_tab + b_tiles);
  return p;
}

at::Tensor cat_or_empty(const std::vector<at::Tensor>& xs, const at::TensorOptions& opt) {
  std::vector<at::Tensor> nz;
  for (const auto& x : xs)
    if (x.numel()) nz.push_back(x);
  return nz.empty() ? at::empty({1}, opt) : at::cat(nz);
}

template <typename scalar_t>
at::Tensor power_step_group(const std::vector<at::Tensor>& ws, const std::vector<at::Tensor>& us,
                            const std::vector<at::Tensor>& vs, int64_t n_iter, double tol) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const auto opt = us[0].options();
  Plan p = make_plan(ws, us, vs, rows_per_tile_for(ws));
  auto t = at::empty({std::max<int64_t>(p.sum_m, 1)}, opt);
  auto a = at::empty({std::max<int64_t>(p.sum_n, 1)}, opt);
  auto part = at::empty({std::max<int64_t>(p.sum_part, 1)}, opt);
  auto u0 = cat_or_empty(us, opt);  // start-of-call copies for the roll-back
  auto v0 = cat_or_empty(vs, opt);
  auto est = at::zeros({p.L}, opt);
  auto stream = at::cuda::getCurrentCUDAStream();
  const unsigned col_blocks = static_cast<unsigned>((p.max_n + kReduceCols - 1) / kReduceCols);
  InterruptPoll poll("specreg_fast::power_step_");
  for (int64_t it = 0; it < n_iter; ++it) {
    if (it > 0 && poll.interrupted()) {  // the launch queue is full: this runs at the GPU's pace
      int64_t ou = 0, ov = 0;
      for (size_t l = 0; l < us.size(); ++l) {
        if (us[l].numel()) us[l].copy_(u0.narrow(0, ou, us[l].numel()));
        if (vs[l].numel()) vs[l].copy_(v0.narrow(0, ov, vs[l].numel()));
        ou += us[l].numel();
        ov += vs[l].numel();
      }
      poll.raise();
    }
    if (p.ntiles > 0) {
      fused_rows_kernel<scalar_t, acc_t><<<static_cast<unsigned>(p.ntiles), kThreads, 0, stream>>>(
          p.tab, p.tile_layer, p.flags, t.data_ptr<acc_t>(), part.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      reduce_partials_kernel<acc_t><<<dim3(col_blocks, static_cast<unsigned>(p.L)), dim3(kReduceCols, kReduceLanes), 0,
                                      stream>>>(
          p.tab, p.flags, part.data_ptr<acc_t>(), a.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    finalize_kernel<acc_t><<<static_cast<unsigned>(p.L), kReduceThreads, 0, stream>>>(
        p.tab, p.flags, est.data_ptr<acc_t>(), t.data_ptr<acc_t>(), a.data_ptr<acc_t>(), u0.data_ptr<acc_t>(),
        v0.data_ptr<acc_t>(), tol, it == 0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return est;
}

template <typename scalar_t>
at::Tensor sigma_group(const std::vector<at::Tensor>& ws, const std::vector<at::Tensor>& us,
                       const std::vector<at::Tensor>& vs) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const auto opt = us[0].options();
  Plan p = make_plan(ws, us, vs, rows_per_tile_for(ws));
  auto out = at::zeros({p.L}, opt);
  if (p.ntiles == 0) return out;
  auto part = at::empty({p.ntiles}, opt);
  auto stream = at::cuda::getCurrentCUDAStream();
  bilinear_rows_kernel<scalar_t, acc_t><<<static_cast<unsigned>(p.ntiles), kThreads, 0, stream>>>(
      p.tab, p.tile_layer, part.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  sum_tiles_kernel<acc_t><<<static_cast<unsigned>(p.L), 1, 0, stream>>>(p.tab, part.data_ptr<acc_t>(),
                                                                          out.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::ScalarType out_type(at::TensorList weights) {
  for (const auto& W : weights)
    if (W.scalar_type() == at::kDouble) return at::kDouble;
  return at::kFloat;
}

// Runs `fn(group weights, us, vs)` (returning the group's estimates) once per weight dtype
// and scatters into one output of the op's dtype.
template <typename F>
at::Tensor by_dtype(at::TensorList weights, at::TensorList us, at::TensorList vs, F&& fn) {
  const auto dev = weights[0].device();
  std::map<at::ScalarType, std::vector<int64_t>> groups;
  for (int64_t l = 0; l < static_cast<int64_t>(weights.size()); ++l) groups[weights[l].scalar_type()].push_back(l);
  const auto odt = out_type(weights);
  auto out = at::empty({static_cast<int64_t>(weights.size())}, at::TensorOptions().dtype(odt).device(dev));
  for (const auto& [st, idx] : groups) {
    std::vector<at::Tensor> gw, gu, gv;
    for (int64_t l : idx) {
      gw.push_back(weights[l]);
      gu.push_back(us[l]);
      gv.push_back(vs[l]);
    }
    at::Tensor est;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "specreg_fast_dense_cuda",
                                    [&] { est = fn.template operator()<scalar_t>(gw, gu, gv); });
    if (groups.size() == 1) return est.to(odt);  // the usual case: one dtype
    auto host = at::empty({static_cast<int64_t>(idx.size())}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    std::memcpy(host.data_ptr<int64_t>(), idx.data(), sizeof(int64_t) * idx.size());
    out.index_copy_(0, host.to(dev, /*non_blocking=*/true), est.to(odt));
  }
  return out;
}

at::Tensor sigma_cuda(at::TensorList weights, at::TensorList us, at::TensorList vs) {
  check_list(weights, us, vs, "specreg_fast::sigma", /*writes=*/false);
  if (weights.empty()) return at::zeros({0}, at::TensorOptions().dtype(at::kFloat));
  const c10::cuda::CUDAGuard guard(weights[0].device());
  at::NoGradGuard no_grad;
  return by_dtype(weights, us, vs, []<typename scalar_t>(const auto& w, const auto& u, const auto& v) {
    return sigma_group<scalar_t>(w, u, v);
  });
}

at::Tensor power_step_cuda(at::TensorList weights, at::TensorList us, at::TensorList vs, int64_t n_iter,
                           double tol) {
  const char* op = "specreg_fast::power_step_";
  check_list(weights, us, vs, op, /*writes=*/true);
  check_n_iter(op, n_iter);
  TORCH_CHECK_VALUE(tol >= 0.0 && std::isfinite(tol), op, ": tol must be finite and >= 0, got ", tol);
  if (weights.empty()) return at::zeros({0}, at::TensorOptions().dtype(at::kFloat));
  if (n_iter == 0) return sigma_cuda(weights, us, vs);  // no step: u^T W v at the current vectors
  const c10::cuda::CUDAGuard guard(weights[0].device());
  at::NoGradGuard no_grad;
  return by_dtype(weights, us, vs, [n_iter, tol]<typename scalar_t>(const auto& w, const auto& u, const auto& v) {
    return power_step_group<scalar_t>(w, u, v, n_iter, tol);
  });
}

// The value of sigma read off `est` (power_step_'s return at these us/vs): sigma's checks, and
// est one estimate per layer of the op's dtype; a copy (as the CPU kernel, csrc/cpu/power_step_cpu.cpp).
at::Tensor sigma_from_step_cuda(at::TensorList weights, at::TensorList us, at::TensorList vs, const at::Tensor& est) {
  const char* op = "specreg_fast::sigma_from_step";
  check_list(weights, us, vs, op, /*writes=*/false);
  check_step_estimate(op, weights, est, out_type(weights));
  return est.clone();
}

}  // namespace

TORCH_LIBRARY_IMPL(specreg_fast, CUDA, m) {
  m.impl("power_step_", &power_step_cuda);
  m.impl("sigma", &sigma_cuda);
  m.impl("sigma_from_step", &sigma_from_step_cuda);
}

}  // namespace cuda
}  // namespace specreg_fast
