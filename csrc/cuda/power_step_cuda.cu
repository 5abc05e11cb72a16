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

namespace specreg_fast {
namespace cuda {
namespace {

constexpr int kRows = 32;       // most rows per tile (the host may lower it, see pick_rows_per_tile)
constexpr int kThreads = 256;   // 8 warps: up to 4 rows each in pass 1
constexpr int kWarps = kThreads / 32;
constexpr int kReduceThreads = 256;
constexpr int kReduceCols = 32;  // reduction block: 32 columns x 8 partial-row lanes
constexpr int kReduceLanes = 8;

struct LayerDesc {
  const void* w;
  void* u;
  void* v;
  int64_t m, n, sm, sn;
  int64_t t_off, a_off, p_off, tile0, ntiles;
  int64_t rows_per_tile;  // the same for every layer of a launch
};

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Sum over the block; every thread gets the result.
template <typename T>
__device__ T block_sum(T x) {
  __shared__ T buf[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  x = warp_sum(x);
  __syncthreads();  // buf may still be read by a previous call
  if (lane == 0) buf[warp] = x;
  __syncthreads();
  T r = lane < nw ? buf[lane] : T(0);
  r = warp_sum(r);
  return r;
}

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Vec {
  scalar_t x[VEC];
};

// dot(W_row, v) over n elements with stride sn, by one warp.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t row_dot(const scalar_t* row, int64_t n, int64_t sn, const acc_t* v, int lane) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  acc_t s = 0;
  if (sn == 1 && (reinterpret_cast<uintptr_t>(row) % 16) == 0) {
    const int64_t nv = n / VEC;
    const auto* rv = reinterpret_cast<const Vec<scalar_t, VEC>*>(row);
    for (int64_t k = lane; k < nv; k += 32) {
      const Vec<scalar_t, VEC> x = rv[k];
#pragma unroll
      for (int e = 0; e < VEC; ++e) s += static_cast<acc_t>(x.x[e]) * v[k * VEC + e];
    }
    for (int64_t j = nv * VEC + lane; j < n; j += 32) s += static_cast<acc_t>(row[j]) * v[j];
  } else {
    for (int64_t j = lane; j < n; j += 32) s += static_cast<acc_t>(row[j * sn]) * v[j];
  }
  return warp_sum(s);
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) fused_rows_kernel(const LayerDesc* __restrict__ tab,
                                                              const int* __restrict__ tile_layer,
                                                              const int* __restrict__ flags, acc_t* __restrict__ t,
                                                              acc_t* __restrict__ part) {
  const int l = tile_layer[blockIdx.x];
  if (flags[l] == 0) return;
  const LayerDesc L = tab[l];
  const int64_t rb = blockIdx.x - L.tile0, r0 = rb * L.rows_per_tile;
  const int rows = static_cast<int>(L.m - r0 < L.rows_per_tile ? L.m - r0 : L.rows_per_tile);
  const auto* W = static_cast<const scalar_t*>(L.w);
  const auto* v = static_cast<const acc_t*>(L.v);
  __shared__ acc_t ts[kRows];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int r = warp; r < kRows; r += kWarps) {
    acc_t s = 0;
    if (r < rows) s = row_dot<scalar_t, acc_t>(W + (r0 + r) * L.sm, L.n, L.sn, v, lane);
    if (lane == 0) {
      ts[r] = s;
      if (r < rows) t[L.t_off + r0 + r] = s;
    }
  }
  __syncthreads();
  acc_t* out = part + L.p_off + rb * L.n;
  for (int64_t j = threadIdx.x; j < L.n; j += kThreads) {
    acc_t a = 0;
    const scalar_t* col = W + r0 * L.sm + j * L.sn;
    for (int r = 0; r < rows; ++r) a += static_cast<acc_t>(col[r * L.sm]) * ts[r];
    out[j] = a;
  }
}

// a_j = sum over row blocks p of part[p, j]. Block (32 columns) x (8 lanes over p): lane y sums
// p = y, y+8, ... and the 8 lane sums are added in lane order, so the order is fixed.
template <typename acc_t>
__global__ void __launch_bounds__(kReduceCols* kReduceLanes)
    reduce_partials_kernel(const LayerDesc* __restrict__ tab, const int* __restrict__ flags,
                           const acc_t* __restrict__ part, acc_t* __restrict__ a) {
  const int l = blockIdx.y;
  if (flags[l] == 0) return;
  const LayerDesc L = tab[l];
  if (static_cast<int64_t>(blockIdx.x) * kReduceCols >= L.n) return;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kReduceCols + threadIdx.x;
  __shared__ acc_t lane_sum[kReduceLanes][kReduceCols];
  acc_t s = 0;
  if (j < L.n)
    for (int64_t p = threadIdx.y; p < L.ntiles; p += kReduceLanes) s += part[L.p_off + p * L.n + j];
  lane_sum[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && j < L.n) {
    acc_t r = 0;
#pragma unroll
    for (int y = 0; y < kReduceLanes; ++y) r += lane_sum[y][threadIdx.x];
    a[L.a_off + j] = r;
  }
}

template <typename acc_t>
__global__ void finalize_kernel(const LayerDesc* __restrict__ tab, int* __restrict__ flags, acc_t* __restrict__ est,
                                const acc_t* __restrict__ t, const acc_t* __restrict__ a,
                                const acc_t* __restrict__ u0, const acc_t* __restrict__ v0, double tol, bool first) {
  const int l = blockIdx.x;
  if (flags[l] == 0) return;  // uniform over the block
  const LayerDesc L = tab[l];
  auto* u = static_cast<acc_t*>(L.u);
  auto* v = static_cast<acc_t*>(L.v);
  acc_t ts = 0, as = 0;
  for (int64_t i = threadIdx.x; i < L.m; i += blockDim.x) ts += t[L.t_off + i] * t[L.t_off + i];
  for (int64_t j = threadIdx.x; j < L.n; j += blockDim.x) as += a[L.a_off + j] * a[L.a_off + j];
  const acc_t tn = sqrt(block_sum(ts));
  const acc_t an = sqrt(block_sum(as));
  if (!isfinite(tn) || !isfinite(an)) {
    for (int64_t i = threadIdx.x; i < L.m; i += blockDim.x) u[i] = u0[L.t_off + i];
    for (int64_t j = threadIdx.x; j < L.n; j += blockDim.x) v[j] = v0[L.a_off + j];
    if (threadIdx.x == 0) {
      est[l] = std::numeric_limits<acc_t>::quiet_NaN();
      flags[l] = 0;
    }
    return;
  }
  if (tn == acc_t(0) || an == acc_t(0)) {
    if (threadIdx.x == 0) {
      est[l] = 0;
      flags[l] = 0;
    }
    return;
  }
  const acc_t itn = acc_t(1) / tn, ian = acc_t(1) / an;
  for (int64_t i = threadIdx.x; i < L.m; i += blockDim.x) u[i] = t[L.t_off + i] * itn;
  for (int64_t j = threadIdx.x; j < L.n; j += blockDim.x) v[j] = a[L.a_off + j] * ian;
  if (threadIdx.x == 0) {
    const acc_t prev = est[l], now = an / tn;
    est[l] = now;
    if (!first && tol > 0.0 && std::abs(static_cast<double>(now - prev)) <= tol * static_cast<double>(now))
      flags[l] = 0;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) bilinear_rows_kernel(const LayerDesc* __restrict__ tab,
                                                                 const int* __restrict__ tile_layer,
                                                                 acc_t* __restrict__ part) {
  const int l = tile_layer[blockIdx.x];
  const LayerDesc L = tab[l];
  const int64_t r0 = (blockIdx.x - L.tile0) * L.rows_per_tile;
  const int rows = static_cast<int>(L.m - r0 < L.rows_per_tile ? L.m - r0 : L.rows_per_tile);
  const auto* W = static_cast<const scalar_t*>(L.w);
  const auto* u = static_cast<const acc_t*>(L.u);
  const auto* v = static_cast<const acc_t*>(L.v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  acc_t s = 0;
  for (int r = warp; r < rows; r += kWarps) {
    const acc_t d = row_dot<scalar_t, acc_t>(W + (r0 + r) * L.sm, L.n, L.sn, v, lane);
    s += d * u[r0 + r];
  }
  s = block_sum(s);
  if (threadIdx.x == 0) part[blockIdx.x] = s;
}

template <typename acc_t>
__global__ void sum_tiles_kernel(const LayerDesc* __restrict__ tab, const acc_t* __restrict__ part,
                                 acc_t* __restrict__ out) {
  const LayerDesc L = tab[blockIdx.x];
  acc_t s = 0;
  for (int64_t i = 0; i < L.ntiles; ++i) s += part[L.tile0 + i];  // fixed order
  out[blockIdx.x] = s;
}

// ----------------------------------------------------------------------------- host side
at::ScalarType acc_type_of(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

void check_list(at::TensorList weights, at::TensorList us, at::TensorList vs, const char* op) {
  TORCH_CHECK(us.size() == weights.size() && vs.size() == weights.size(), op,
              ": expected as many u and v vectors as weights, got ", weights.size(), " weights, ", us.size(),
              " u, ", vs.size(), " v");
  for (size_t l = 0; l < weights.size(); ++l) {
    const auto& W = weights[l];
    TORCH_CHECK(W.dim() == 2, op, ": weights[", l, "] must be 2-D, got shape ", W.sizes());
    TORCH_CHECK(W.is_cuda() && W.device() == weights[0].device(), op, ": weights[", l,
                "] must be a CUDA tensor on ", weights[0].device());
    const auto st = W.scalar_type();
    TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, op,
                ": weights[", l, "] must be float32/float64/bfloat16/float16, got ", st);
    const auto acc = acc_type_of(st);
    TORCH_CHECK(us[l].dim() == 1 && us[l].size(0) == W.size(0), op, ": us[", l, "] must have shape (",
                W.size(0), ",), got ", us[l].sizes());
    TORCH_CHECK(vs[l].dim() == 1 && vs[l].size(0) == W.size(1), op, ": vs[", l, "] must have shape (",
                W.size(1), ",), got ", vs[l].sizes());
    TORCH_CHECK(us[l].scalar_type() == acc && vs[l].scalar_type() == acc, op, ": us[", l, "] and vs[", l,
                "] must be ", acc, " for a ", st, " weight");
    TORCH_CHECK(us[l].device() == W.device() && vs[l].device() == W.device(), op, ": us[", l, "]/vs[", l,
                "] must be on ", W.device());
    TORCH_CHECK(us[l].is_contiguous() && vs[l].is_contiguous(), op, ": us[", l, "]/vs[", l,
                "] must be contiguous");
  }
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

// Rows per tile: 32 keeps the fp32 partials written and read back at 8/(32*elem) of W's bytes
// (6% for fp32 W, 12.5% for bf16). A list too small to give every SM two tiles gets 16 rows,
// but only while that traffic stays <= 12.5% of W (so fp32/fp64 weights only).
int64_t pick_rows_per_tile(const std::vector<at::Tensor>& ws) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t esize = ws[0].element_size();
  int64_t rows = kRows;
  auto tiles = [&](int64_t r) {
    int64_t t = 0;
    for (const auto& W : ws) t += W.size(1) > 0 ? (W.size(0) + r - 1) / r : 0;
    return t;
  };
  while (rows > 8 && tiles(rows) < 2 * sms && (rows / 2) * esize >= 64) rows /= 2;
  return rows;
}

Plan make_plan(const std::vector<at::Tensor>& ws, const std::vector<at::Tensor>& us,
               const std::vector<at::Tensor>& vs, int64_t rows_per_tile) {
  Plan p;
  p.L = static_cast<int64_t>(ws.size());
  std::vector<LayerDesc> descs(p.L);
  std::vector<int> tile_layer, flags(p.L);
  for (int64_t l = 0; l < p.L; ++l) {
    const auto& W = ws[l];
    LayerDesc& d = descs[l];
    d.w = W.data_ptr();
    d.u = us[l].data_ptr();
    d.v = vs[l].data_ptr();
    d.m = W.size(0);
    d.n = W.size(1);
    d.sm = W.stride(0);
    d.sn = W.stride(1);
    d.rows_per_tile = rows_per_tile;
    d.ntiles = d.n > 0 ? (d.m + rows_per_tile - 1) / rows_per_tile : 0;
    d.t_off = p.sum_m;
    d.a_off = p.sum_n;
    d.p_off = p.sum_part;
    d.tile0 = static_cast<int64_t>(tile_layer.size());
    for (int64_t i = 0; i < d.ntiles; ++i) tile_layer.push_back(static_cast<int>(l));
    flags[l] = (d.m > 0 && d.n > 0) ? 1 : 0;
    p.sum_m += d.m;
    p.sum_n += d.n;
    p.sum_part += d.ntiles * d.n;
    p.max_n = std::max(p.max_n, d.n);
  }
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
  Plan p = make_plan(ws, us, vs, pick_rows_per_tile(ws));
  auto t = at::empty({std::max<int64_t>(p.sum_m, 1)}, opt);
  auto a = at::empty({std::max<int64_t>(p.sum_n, 1)}, opt);
  auto part = at::empty({std::max<int64_t>(p.sum_part, 1)}, opt);
  auto u0 = cat_or_empty(us, opt);  // start-of-call copies for the roll-back
  auto v0 = cat_or_empty(vs, opt);
  auto est = at::zeros({p.L}, opt);
  auto stream = at::cuda::getCurrentCUDAStream();
  const unsigned col_blocks = static_cast<unsigned>((p.max_n + kReduceCols - 1) / kReduceCols);
  for (int64_t it = 0; it < n_iter; ++it) {
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
  Plan p = make_plan(ws, us, vs, pick_rows_per_tile(ws));
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
  check_list(weights, us, vs, "specreg_fast::sigma");
  if (weights.empty()) return at::zeros({0}, at::TensorOptions().dtype(at::kFloat));
  const c10::cuda::CUDAGuard guard(weights[0].device());
  at::NoGradGuard no_grad;
  return by_dtype(weights, us, vs, []<typename scalar_t>(const auto& w, const auto& u, const auto& v) {
    return sigma_group<scalar_t>(w, u, v);
  });
}

at::Tensor power_step_cuda(at::TensorList weights, at::TensorList us, at::TensorList vs, int64_t n_iter,
                           double tol) {
  check_list(weights, us, vs, "specreg_fast::power_step_");
  TORCH_CHECK(n_iter >= 0, "specreg_fast::power_step_: n_iter must be >= 0, got ", n_iter);
  TORCH_CHECK(tol >= 0.0, "specreg_fast::power_step_: tol must be >= 0, got ", tol);
  if (weights.empty()) return at::zeros({0}, at::TensorOptions().dtype(at::kFloat));
  if (n_iter == 0) return sigma_cuda(weights, us, vs);  // no step: u^T W v at the current vectors
  const c10::cuda::CUDAGuard guard(weights[0].device());
  at::NoGradGuard no_grad;
  return by_dtype(weights, us, vs, [n_iter, tol]<typename scalar_t>(const auto& w, const auto& u, const auto& v) {
    return power_step_group<scalar_t>(w, u, v, n_iter, tol);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(specreg_fast, CUDA, m) {
  m.impl("power_step_", &power_step_cuda);
  m.impl("sigma", &sigma_cuda);
}

}  // namespace cuda
}  // namespace specreg_fast
