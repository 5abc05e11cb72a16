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
//
// On the LibTorch stable ABI (csrc/stable_api.h): setup.py compiles every .cu with
// TORCH_TARGET_VERSION, so no ATen or c10 header can be included here, and the code reaches
// torch only through torch::stable and the C shim (python_tests/test_abi_symbols.py checks the
// object's undefined symbols). The current stream comes from the C shim, the SM count from the
// CUDA runtime, errors are std::runtime_error (RuntimeError in Python; the Python front raises
// the typed ValueError/TypeError first, specreg_fast/ops/_checks.py).
#ifndef TORCH_TARGET_VERSION
#error "csrc/cuda/power_step_cuda.cu is built with TORCH_TARGET_VERSION (setup.py), on the stable ABI only"
#endif
#ifndef USE_CUDA
#define USE_CUDA  // the CUDA entries of the C shim (aoti_torch_get_current_cuda_stream, torch_c10_cuda_check_msg)
#endif
#include <cuda_runtime.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/macros.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <vector>

#include "stable_contracts.h"

#include "power_step_kernels.cuh"
#include "stream_launcher.cuh"

namespace specreg_fast {
namespace cuda {
namespace {

// ----------------------------------------------------------------------------- host side
void check_list(const TensorList& weights, const TensorList& us, const TensorList& vs, const char* op, bool writes) {
  check_power_step_list_stable(weights, us, vs, op, DeviceType::CUDA, writes);
}

// An ATen op by name through the stable dispatcher call (those torch::stable has no wrapper for
// at TORCH_TARGET_VERSION); the stack holds the arguments and gets the first return.
template <size_t N>
Tensor call_aten(const char* name, const char* overload, std::array<StableIValue, N>& stack) {
  STABLE_TORCH_ERROR_CODE_CHECK(torch_call_dispatcher(name, overload, stack.data(), TORCH_ABI_VERSION));
  return torch::stable::detail::to<Tensor>(stack[0]);
}

Tensor cat0(const TensorList& xs) {
  std::array<StableIValue, 2> stack{torch::stable::detail::from(xs), torch::stable::detail::from(int64_t{0})};
  return call_aten("aten::cat", "", stack);
}

// out[index[i]] = src[i] (aten::index_copy_ along dim 0).
void index_copy0_(Tensor& out, const Tensor& index, const Tensor& src) {
  std::array<StableIValue, 4> stack{torch::stable::detail::from(out), torch::stable::detail::from(int64_t{0}),
                                    torch::stable::detail::from(index), torch::stable::detail::from(src)};
  call_aten("aten::index_copy_", "", stack);
}

// The current CUDA stream of `device` (the C shim: torch::stable's Stream::nativeHandle needs
// torch 2.13).
cudaStream_t current_stream(int32_t device) {
  void* stream = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(device, &stream));
  return static_cast<cudaStream_t>(stream);
}

// The SM count of `device`, asked of the CUDA runtime once per device.
int64_t multiprocessor_count(int32_t device) {
  static std::mutex mu;
  static std::vector<int> counts;  // 0: not asked yet
  const std::lock_guard<std::mutex> lock(mu);
  if (counts.empty()) {
    int n = 0;
    STD_CUDA_CHECK(cudaGetDeviceCount(&n));
    counts.assign(static_cast<size_t>(std::max(n, 0)), 0);
  }
  SF_CHECK(device >= 0 && static_cast<size_t>(device) < counts.size(), "specreg_fast: no CUDA device ", device,
           " (", counts.size(), " visible)");
  int& c = counts[static_cast<size_t>(device)];
  if (c == 0) STD_CUDA_CHECK(cudaDeviceGetAttribute(&c, cudaDevAttrMultiProcessorCount, device));
  return c;
}

// Table, tile map, flags and tile counts of one dtype group, in one pinned buffer copied
// to the device on the current stream without waiting.
struct Plan {
  HostTable ht;  // the host copy (sizes and counts)
  Tensor dev;    // bytes on the device
  const LayerDesc* tab = nullptr;
  const int* tile_layer = nullptr;
  int* flags = nullptr;
  int64_t L = 0, ntiles = 0, sum_m = 0, sum_n = 0, sum_part = 0, max_n = 0;
};

std::vector<HostLayer> host_layers(const TensorList& ws, const TensorList& us, const TensorList& vs) {
  std::vector<HostLayer> out;
  for (size_t l = 0; l < ws.size(); ++l)
    out.push_back({ws[l].const_data_ptr(), us[l].mutable_data_ptr(), vs[l].mutable_data_ptr(), ws[l].size(0),
                   ws[l].size(1), ws[l].stride(0), ws[l].stride(1)});
  return out;
}

int64_t rows_per_tile_for(const TensorList& ws) {
  return pick_rows_per_tile(host_layers(ws, ws, ws), static_cast<int64_t>(ws[0].element_size()),
                            multiprocessor_count(ws[0].get_device_index()));
}

Plan make_plan(const TensorList& ws, const TensorList& us, const TensorList& vs, int64_t rows_per_tile) {
  Plan p;
  p.L = static_cast<int64_t>(ws.size());
  p.ht = build_table(host_layers(ws, us, vs), rows_per_tile);
  const HostTable& ht = p.ht;
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
  // pinned (the page-locked host allocator, through aten::empty), so the upload below is async
  Tensor host = torch::stable::empty({static_cast<int64_t>(bytes)}, ScalarType::Byte, std::nullopt,
                                     Device(DeviceType::CPU), /*pin_memory=*/true);
  auto* h = static_cast<uint8_t*>(host.mutable_data_ptr());
  std::memcpy(h, descs.data(), b_tab);
  if (b_tiles) std::memcpy(h + b_tab, tile_layer.data(), b_tiles);
  std::memcpy(h + b_tab + b_tiles, flags.data(), sizeof(int) * p.L);
  p.dev = torch::stable::to(host, ws[0].device(), /*non_blocking=*/true);
  auto* d = static_cast<uint8_t*>(p.dev.mutable_data_ptr());
  p.tab = reinterpret_cast<const LayerDesc*>(d);
  p.tile_layer = reinterpret_cast<const int*>(d + b_tab);
  p.flags = reinterpret_cast<int*>(d + b_tab + b_tiles);
  return p;
}

Tensor cat_or_empty(const TensorList& xs, ScalarType dtype, const Device& device) {
  TensorList nz;
  for (const auto& x : xs)
    if (x.numel()) nz.push_back(x);
  return nz.empty() ? empty({1}, dtype, device) : cat0(nz);
}

template <typename scalar_t>
Tensor power_step_group(const TensorList& ws, const TensorList& us, const TensorList& vs, int64_t n_iter, double tol) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const ScalarType acc = us[0].scalar_type();
  const Device dev = us[0].device();
  Plan p = make_plan(ws, us, vs, rows_per_tile_for(ws));
  Tensor t = empty({std::max<int64_t>(p.sum_m, 1)}, acc, dev);
  Tensor a = empty({std::max<int64_t>(p.sum_n, 1)}, acc, dev);
  Tensor part = empty({std::max<int64_t>(p.sum_part, 1)}, acc, dev);
  Tensor u0 = cat_or_empty(us, acc, dev);  // start-of-call copies for the roll-back
  Tensor v0 = cat_or_empty(vs, acc, dev);
  Tensor est = zeros({p.L}, acc, dev);
  InterruptPollStable poll("specreg_fast::power_step_");
  auto before_step = [&](int64_t it) {
    if (it == 0 || !poll.interrupted()) return;  // the launch queue is full: this runs at the GPU's pace
    int64_t ou = 0, ov = 0;
    for (size_t l = 0; l < us.size(); ++l) {
      Tensor u = us[l], v = vs[l];
      if (u.numel()) torch::stable::copy_(u, torch::stable::narrow(u0, 0, ou, u.numel()));
      if (v.numel()) torch::stable::copy_(v, torch::stable::narrow(v0, 0, ov, v.numel()));
      ou += u.numel();
      ov += v.numel();
    }
    poll.raise();
  };
  const StepBuffers<acc_t> b{p.tab,
                             p.tile_layer,
                             p.flags,
                             t.mutable_data_ptr<acc_t>(),
                             a.mutable_data_ptr<acc_t>(),
                             part.mutable_data_ptr<acc_t>(),
                             est.mutable_data_ptr<acc_t>(),
                             u0.const_data_ptr<acc_t>(),
                             v0.const_data_ptr<acc_t>()};
  launch_power_steps<scalar_t, acc_t>(p.ht, b, n_iter, tol, StreamLauncher{current_stream(dev.index())}, before_step);
  return est;
}

template <typename scalar_t>
Tensor sigma_group(const TensorList& ws, const TensorList& us, const TensorList& vs) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const ScalarType acc = us[0].scalar_type();
  const Device dev = us[0].device();
  Plan p = make_plan(ws, us, vs, rows_per_tile_for(ws));
  Tensor out = zeros({p.L}, acc, dev);
  if (p.ntiles == 0) return out;
  Tensor part = empty({p.ntiles}, acc, dev);
  launch_sigma<scalar_t, acc_t>(p.ht, p.tab, p.tile_layer, part.mutable_data_ptr<acc_t>(), out.mutable_data_ptr<acc_t>(),
                                StreamLauncher{current_stream(dev.index())});
  return out;
}

ScalarType out_type(const TensorList& weights) {
  for (const auto& W : weights)
    if (W.scalar_type() == kDouble) return kDouble;
  return kFloat;
}

// Runs `fn(group weights, us, vs)` (returning the group's estimates) once per weight dtype
// and scatters into one output of the op's dtype.
template <typename F>
Tensor by_dtype(const TensorList& weights, const TensorList& us, const TensorList& vs, F&& fn) {
  const Device dev = weights[0].device();
  std::map<ScalarType, std::vector<int64_t>> groups;
  for (int64_t l = 0; l < static_cast<int64_t>(weights.size()); ++l) groups[weights[l].scalar_type()].push_back(l);
  const ScalarType odt = out_type(weights);
  Tensor out = empty({static_cast<int64_t>(weights.size())}, odt, dev);
  for (const auto& [st, idx] : groups) {
    TensorList gw, gu, gv;
    for (int64_t l : idx) {
      gw.push_back(weights[l]);
      gu.push_back(us[l]);
      gv.push_back(vs[l]);
    }
    Tensor est;
    switch (st) {  // the dtypes check_list admits
      case kFloat: est = fn.template operator()<float>(gw, gu, gv); break;
      case kDouble: est = fn.template operator()<double>(gw, gu, gv); break;
      case kHalf: est = fn.template operator()<c10::Half>(gw, gu, gv); break;
      case kBFloat16: est = fn.template operator()<c10::BFloat16>(gw, gu, gv); break;
      default: SF_CHECK(false, "specreg_fast: no CUDA kernel for weights of dtype ", dtype_name(st));
    }
    if (groups.size() == 1) return torch::stable::to(est, odt);  // the usual case: one dtype
    Tensor host = torch::stable::empty({static_cast<int64_t>(idx.size())}, ScalarType::Long, std::nullopt,
                                       Device(DeviceType::CPU), /*pin_memory=*/true);
    std::memcpy(host.mutable_data_ptr(), idx.data(), sizeof(int64_t) * idx.size());
    index_copy0_(out, torch::stable::to(host, dev, /*non_blocking=*/true), torch::stable::to(est, odt));
  }
  return out;
}

Tensor sigma_cuda(const TensorList& weights, const TensorList& us, const TensorList& vs) {
  check_list(weights, us, vs, "specreg_fast::sigma", /*writes=*/false);
  if (weights.empty()) return zeros({0}, kFloat, Device(DeviceType::CPU));
  const torch::stable::accelerator::DeviceGuard guard(weights[0].get_device_index());
  const NoGradGuard no_grad;
  return by_dtype(weights, us, vs, []<typename scalar_t>(const auto& w, const auto& u, const auto& v) {
    return sigma_group<scalar_t>(w, u, v);
  });
}

Tensor power_step_cuda(const TensorList& weights, const TensorList& us, const TensorList& vs, int64_t n_iter,
                       double tol) {
  const char* op = "specreg_fast::power_step_";
  check_list(weights, us, vs, op, /*writes=*/true);
  check_n_iter_stable(op, n_iter);
  SF_CHECK_VALUE(tol >= 0.0 && std::isfinite(tol), op, ": tol must be finite and >= 0, got ", tol);
  if (weights.empty()) return zeros({0}, kFloat, Device(DeviceType::CPU));
  if (n_iter == 0) return sigma_cuda(weights, us, vs);  // no step: u^T W v at the current vectors
  const torch::stable::accelerator::DeviceGuard guard(weights[0].get_device_index());
  const NoGradGuard no_grad;
  return by_dtype(weights, us, vs, [n_iter, tol]<typename scalar_t>(const auto& w, const auto& u, const auto& v) {
    return power_step_group<scalar_t>(w, u, v, n_iter, tol);
  });
}

// The value of sigma read off `est` (power_step_'s return at these us/vs): sigma's checks, and
// est one estimate per layer of the op's dtype; a copy (as the CPU kernel, csrc/cpu/power_step_cpu.cpp).
Tensor sigma_from_step_cuda(const TensorList& weights, const TensorList& us, const TensorList& vs, const Tensor& est) {
  const char* op = "specreg_fast::sigma_from_step";
  check_list(weights, us, vs, op, /*writes=*/false);
  check_step_estimate_stable(op, weights, est, out_type(weights));
  return torch::stable::clone(est);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(specreg_fast, CUDA, m) {
  m.impl("power_step_", TORCH_BOX(&power_step_cuda));
  m.impl("sigma", TORCH_BOX(&sigma_cuda));
  m.impl("sigma_from_step", TORCH_BOX(&sigma_from_step_cuda));
}

}  // namespace cuda
}  // namespace specreg_fast
