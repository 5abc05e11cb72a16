// CUDA kernel of specreg_fast::lowrank_power_step_ on the LibTorch stable ABI: maps
// M = W + s B A (LoRA), every map of the call in one launch sequence per dtype group, each step
// reading W once (the device code and its plan: lowrank_step_kernels.cuh). The host packs the
// dense table (LayerDesc), the factor table (LowRankDesc), the tile -> map list and the flags
// into one buffer, copied to the device on the current stream; nothing reads device memory back.
//
// Dtype groups: by W's dtype after the map's conversion (a float64 map has float64 W: a
// float32/low-precision W of a float64 map is converted, as on CPU); accumulator float64 for a
// float64 group, else float32; the factors converted to it, contiguous (r (m + n) values).
// the C shim's CUDA functions (aoti_torch_get_current_cuda_stream) are declared under USE_CUDA
#ifndef USE_CUDA
#define USE_CUDA
#endif
#include <cuda_runtime.h>

#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <cstring>
#include <map>
#include <vector>

#include <torch/csrc/stable/accelerator.h>

#include "lowrank_checks.h"
#include "stable_contracts.h"

#include "lowrank_step_kernels.cuh"
#include "stream_launcher.cuh"

namespace specreg_fast {
namespace cuda {
namespace {

#define SF_CUDA_CHECK(expr)                                                                            \
  do {                                                                                                 \
    const cudaError_t err_ = (expr);                                                                   \
    SF_CHECK(err_ == cudaSuccess, "specreg_fast::lowrank_power_step_: CUDA error: ", cudaGetErrorString(err_)); \
  } while (0)

Tensor as_type(const Tensor& t, ScalarType st) {
  return torch::stable::contiguous(t.scalar_type() == st ? t : torch::stable::to(t, st));
}

template <typename scalar_t>
Tensor lowrank_group(const std::vector<Tensor>& ws, const std::vector<Tensor>& As, const std::vector<Tensor>& Bs,
                     const std::vector<double>& ss, const std::vector<Tensor>& us, const std::vector<Tensor>& vs,
                     int64_t n_iter, double tol, cudaStream_t stream, InterruptPollStable& poll) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const ScalarType acc = std::is_same_v<acc_t, double> ? kDouble : kFloat;
  const Device dev = ws[0].device();
  const int64_t L = static_cast<int64_t>(ws.size());
  std::vector<HostLayer> layers;
  std::vector<HostLowRank> factors;
  std::vector<Tensor> keep;  // the converted factors the table points to
  for (int64_t l = 0; l < L; ++l) {
    keep.push_back(as_type(As[l], acc));
    keep.push_back(as_type(Bs[l], acc));
    layers.push_back({ws[l].const_data_ptr(), us[l].mutable_data_ptr(), vs[l].mutable_data_ptr(), ws[l].size(0),
                      ws[l].size(1), ws[l].stride(0), ws[l].stride(1)});
    factors.push_back({keep[2 * l].const_data_ptr(), keep[2 * l + 1].const_data_ptr(), As[l].size(0), ss[l]});
  }
  int sms = 1;
  SF_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev.index()));
  HostTable p = build_table(layers, pick_rows_per_tile(layers, sizeof(scalar_t), sms));
  int64_t sum_ypart = 0, sum_r = 0;
  const std::vector<LowRankDesc> lr = build_lowrank_table(p, factors, sum_ypart, sum_r);
  // one upload: tables, tile map, flags
  const size_t b_tab = sizeof(LayerDesc) * L, b_lr = sizeof(LowRankDesc) * L, b_tiles = sizeof(int) * p.ntiles;
  std::vector<uint8_t> host(b_tab + b_lr + b_tiles + sizeof(int) * L);
  std::memcpy(host.data(), p.descs.data(), b_tab);
  std::memcpy(host.data() + b_tab, lr.data(), b_lr);
  if (b_tiles) std::memcpy(host.data() + b_tab + b_lr, p.tile_layer.data(), b_tiles);
  std::memcpy(host.data() + b_tab + b_lr + b_tiles, p.flags.data(), sizeof(int) * L);
  Tensor dbuf = empty({static_cast<int64_t>(host.size())}, ScalarType::Byte, dev);
  auto* d = static_cast<uint8_t*>(dbuf.mutable_data_ptr());
  SF_CUDA_CHECK(cudaMemcpyAsync(d, host.data(), host.size(), cudaMemcpyHostToDevice, stream));
  const auto* tab = reinterpret_cast<const LayerDesc*>(d);
  const auto* lrt = reinterpret_cast<const LowRankDesc*>(d + b_tab);
  const auto* tile_layer = reinterpret_cast<const int*>(d + b_tab + b_lr);
  auto* flags = reinterpret_cast<int*>(d + b_tab + b_lr + b_tiles);
  auto buf = [&](int64_t n) { return empty({std::max<int64_t>(n, 1)}, acc, dev); };
  Tensor t = buf(p.sum_m), a = buf(p.sum_n), part = buf(p.sum_part), u0 = buf(p.sum_m), v0 = buf(p.sum_n),
         ypart = buf(sum_ypart), z = buf(sum_r), y = buf(sum_r), est = zeros({L}, acc, dev);
  auto* u0p = static_cast<acc_t*>(u0.mutable_data_ptr());
  auto* v0p = static_cast<acc_t*>(v0.mutable_data_ptr());
  for (int64_t l = 0; l < L; ++l) {  // start-of-call copies, for the roll-back
    if (p.descs[l].m)
      SF_CUDA_CHECK(cudaMemcpyAsync(u0p + p.descs[l].t_off, us[l].const_data_ptr(), sizeof(acc_t) * p.descs[l].m,
                                    cudaMemcpyDeviceToDevice, stream));
    if (p.descs[l].n)
      SF_CUDA_CHECK(cudaMemcpyAsync(v0p + p.descs[l].a_off, vs[l].const_data_ptr(), sizeof(acc_t) * p.descs[l].n,
                                    cudaMemcpyDeviceToDevice, stream));
  }
  auto* tp = static_cast<acc_t*>(t.mutable_data_ptr());
  auto* ap = static_cast<acc_t*>(a.mutable_data_ptr());
  auto* pp = static_cast<acc_t*>(part.mutable_data_ptr());
  auto* yp = static_cast<acc_t*>(ypart.mutable_data_ptr());
  auto* zp = static_cast<acc_t*>(z.mutable_data_ptr());
  auto* yv = static_cast<acc_t*>(y.mutable_data_ptr());
  auto* ep = static_cast<acc_t*>(est.mutable_data_ptr());
  const LowRankBuffers<acc_t> b{tab, lrt, tile_layer, flags, zp, yv, tp, ap, pp, yp, ep, u0p, v0p};
  launch_lowrank_steps<scalar_t, acc_t>(p, b, n_iter, tol, StreamLauncher{stream}, [&](int64_t it) {
    if (it > 0 && poll.interrupted()) {  // the vectors back to the start of the call, then raise
      for (int64_t l = 0; l < L; ++l) {
        if (p.descs[l].m)
          SF_CUDA_CHECK(cudaMemcpyAsync(us[l].mutable_data_ptr(), u0p + p.descs[l].t_off, sizeof(acc_t) * p.descs[l].m,
                                        cudaMemcpyDeviceToDevice, stream));
        if (p.descs[l].n)
          SF_CUDA_CHECK(cudaMemcpyAsync(vs[l].mutable_data_ptr(), v0p + p.descs[l].a_off, sizeof(acc_t) * p.descs[l].n,
                                        cudaMemcpyDeviceToDevice, stream));
      }
      poll.raise();
    }
  });
  // the buffers are freed by the caching allocator in stream order: no wait needed
  return est;
}

Tensor lowrank_power_step_cuda(const TensorList& weights, const TensorList& As, const TensorList& Bs,
                               const std::vector<double>& scales, const TensorList& us, const TensorList& vs,
                               int64_t n_iter, double tol) {
  const char* op = "specreg_fast::lowrank_power_step_";
  check_lowrank_args(weights, As, Bs, scales, us, vs, op, DeviceType::CUDA);
  check_n_iter_stable(op, n_iter);
  SF_CHECK_VALUE(tol >= 0.0 && !std::isnan(tol), op, ": tol must be >= 0, got ", tol);
  const int64_t L = static_cast<int64_t>(weights.size());
  bool any64 = false;
  for (int64_t l = 0; l < L; ++l) any64 = any64 || map_acc_type(weights[l], As[l], Bs[l]) == kDouble;
  const ScalarType odt = any64 ? kDouble : kFloat;
  if (L == 0) return empty({0}, kFloat, Device(DeviceType::CPU));
  const Device dev = weights[0].device();
  torch::stable::accelerator::DeviceGuard guard(dev.index());
  void* stream_ptr = nullptr;
  SF_CHECK(aoti_torch_get_current_cuda_stream(dev.index(), &stream_ptr) == 0, op, ": no current CUDA stream");
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  NoGradGuard no_grad;
  InterruptPollStable poll(op);
  // groups by the dtype W is read in (a float64 map reads a float64 W)
  std::map<int, std::vector<int64_t>> groups;
  std::vector<Tensor> wread(L);
  for (int64_t l = 0; l < L; ++l) {
    const bool is64 = map_acc_type(weights[l], As[l], Bs[l]) == kDouble;
    wread[l] = is64 && weights[l].scalar_type() != kDouble ? torch::stable::to(weights[l], kDouble) : weights[l];
    groups[static_cast<int>(wread[l].scalar_type())].push_back(l);
  }
  Tensor out = empty({L}, odt, dev);
  // An interrupt in a later group gives back the vectors of the groups already done, too.
  std::vector<std::pair<Tensor, Tensor>> saved;
  if (groups.size() > 1 && n_iter > 1)
    for (int64_t l = 0; l < L; ++l) saved.emplace_back(torch::stable::clone(us[l]), torch::stable::clone(vs[l]));
  for (const auto& [code, idx] : groups) {
    std::vector<Tensor> gw, ga, gb, gu, gv;
    std::vector<double> gs;
    for (int64_t l : idx) {
      gw.push_back(wread[l]);
      ga.push_back(As[l]);
      gb.push_back(Bs[l]);
      gs.push_back(scales[l]);
      gu.push_back(us[l]);
      gv.push_back(vs[l]);
    }
    Tensor est;
    try {
      switch (static_cast<ScalarType>(code)) {
        case kFloat: est = lowrank_group<float>(gw, ga, gb, gs, gu, gv, n_iter, tol, stream, poll); break;
        case kDouble: est = lowrank_group<double>(gw, ga, gb, gs, gu, gv, n_iter, tol, stream, poll); break;
        case kHalf:
          est = lowrank_group<torch::headeronly::Half>(gw, ga, gb, gs, gu, gv, n_iter, tol, stream, poll);
          break;
        case kBFloat16:
          est = lowrank_group<torch::headeronly::BFloat16>(gw, ga, gb, gs, gu, gv, n_iter, tol, stream, poll);
          break;
        default: SF_CHECK(false, op, ": unexpected weight dtype");
      }
    } catch (...) {
      for (size_t l = 0; l < saved.size(); ++l) {
        Tensor u = us[l], v = vs[l];
        torch::stable::copy_(u, saved[l].first);
        torch::stable::copy_(v, saved[l].second);
      }
      throw;
    }
    if (est.scalar_type() != odt) est = torch::stable::to(est, odt);
    const size_t es = odt == kDouble ? sizeof(double) : sizeof(float);
    for (size_t i = 0; i < idx.size(); ++i)  // scatter into the call's output (stream-ordered)
      SF_CUDA_CHECK(cudaMemcpyAsync(static_cast<uint8_t*>(out.mutable_data_ptr()) + es * idx[i],
                                    static_cast<const uint8_t*>(est.const_data_ptr()) + es * i, es,
                                    cudaMemcpyDeviceToDevice, stream));
  }
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(specreg_fast, CUDA, m) {
  m.impl("lowrank_power_step_", TORCH_BOX(&lowrank_power_step_cuda));
}

}  // namespace cuda
}  // namespace specreg_fast
