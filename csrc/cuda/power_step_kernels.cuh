// Device code of the CUDA dense power step (included by power_step_cuda.cu), plus the
// host-side table layout, free of ATen so that scripts/cuda_emulate/ can compile the very same
// kernels as host C++ (one std::thread per CUDA thread, std::barrier for __syncthreads and the
// warp shuffles) and check them against the reference on a machine without a GPU.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace specreg_fast {
namespace cuda {

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
    if (lane == 0) s += d * u[r0 + r];  // every lane holds d: count it once
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

// ----------------------------------------------------------------------------- table (host)
struct HostLayer {
  const void* w;
  void* u;
  void* v;
  int64_t m, n, sm, sn;
};

struct HostTable {
  std::vector<LayerDesc> descs;
  std::vector<int> tile_layer, flags;
  int64_t ntiles = 0, sum_m = 0, sum_n = 0, sum_part = 0, max_n = 0;
};

// Rows per tile: 32 keeps the fp32 partials written and read back at 8/(32*elem) of W's bytes
// (6% for fp32 W, 12.5% for bf16). A list too small to give every SM two tiles gets 16 rows,
// but only while that traffic stays <= 12.5% of W (so fp32/fp64 weights only).
inline int64_t pick_rows_per_tile(const std::vector<HostLayer>& layers, int64_t esize, int64_t sms) {
  int64_t rows = kRows;
  auto tiles = [&](int64_t r) {
    int64_t t = 0;
    for (const auto& L : layers) t += L.n > 0 ? (L.m + r - 1) / r : 0;
    return t;
  };
  while (rows > 8 && tiles(rows) < 2 * sms && (rows / 2) * esize >= 64) rows /= 2;
  return rows;
}

inline HostTable build_table(const std::vector<HostLayer>& layers, int64_t rows_per_tile) {
  HostTable p;
  const int64_t L = static_cast<int64_t>(layers.size());
  p.descs.resize(L);
  p.flags.resize(L);
  for (int64_t l = 0; l < L; ++l) {
    const HostLayer& h = layers[l];
    LayerDesc& d = p.descs[l];
    d.w = h.w;
    d.u = h.u;
    d.v = h.v;
    d.m = h.m;
    d.n = h.n;
    d.sm = h.sm;
    d.sn = h.sn;
    d.rows_per_tile = rows_per_tile;
    d.ntiles = d.n > 0 ? (d.m + rows_per_tile - 1) / rows_per_tile : 0;
    d.t_off = p.sum_m;
    d.a_off = p.sum_n;
    d.p_off = p.sum_part;
    d.tile0 = static_cast<int64_t>(p.tile_layer.size());
    for (int64_t i = 0; i < d.ntiles; ++i) p.tile_layer.push_back(static_cast<int>(l));
    p.flags[l] = (d.m > 0 && d.n > 0) ? 1 : 0;
    p.sum_m += d.m;
    p.sum_n += d.n;
    p.sum_part += d.ntiles * d.n;
    p.max_n = std::max(p.max_n, d.n);
  }
  p.ntiles = static_cast<int64_t>(p.tile_layer.size());
  return p;
}

// ----------------------------------------------------------------------------- launch sequence (host)
// The kernels of one power_step_ / sigma call, in order and with their grids, shared by
// power_step_cuda.cu (which launches them on the current stream) and scripts/cuda_emulate/
// (which runs them on the host), so that the emulator tests this sequence itself.
// `launch(kernel, grid, block, args...)` runs one kernel.
struct LaunchDim {
  unsigned x = 1, y = 1;
};

// The device buffers of a power step: the table, tile map and flags (build_table's, uploaded),
// t (sum_m), a (sum_n), the partials (sum_part), the estimates (L, zeroed) and the start-of-call
// vectors u0 (sum_m) and v0 (sum_n).
template <typename acc_t>
struct StepBuffers {
  const LayerDesc* tab;
  const int* tile_layer;
  int* flags;
  acc_t *t, *a, *part, *est;
  const acc_t *u0, *v0;
};

// n_iter steps; `before_step(it)` runs on the host before each (the interrupt poll).
template <typename scalar_t, typename acc_t, typename Launch, typename BeforeStep>
void launch_power_steps(const HostTable& p, const StepBuffers<acc_t>& b, int64_t n_iter, double tol, Launch&& launch,
                        BeforeStep&& before_step) {
  const auto L = static_cast<unsigned>(p.descs.size());
  const auto tiles = static_cast<unsigned>(p.ntiles);
  const auto col_blocks = static_cast<unsigned>((p.max_n + kReduceCols - 1) / kReduceCols);
  for (int64_t it = 0; it < n_iter; ++it) {
    before_step(it);
    if (tiles > 0) {
      launch(&fused_rows_kernel<scalar_t, acc_t>, LaunchDim{tiles}, LaunchDim{kThreads}, b.tab, b.tile_layer, b.flags,
             b.t, b.part);
      launch(&reduce_partials_kernel<acc_t>, LaunchDim{col_blocks, L}, LaunchDim{kReduceCols, kReduceLanes}, b.tab,
             b.flags, b.part, b.a);
    }
    launch(&finalize_kernel<acc_t>, LaunchDim{L}, LaunchDim{kReduceThreads}, b.tab, b.flags, b.est, b.t, b.a, b.u0,
           b.v0, tol, it == 0);
  }
}

// u^T W v per layer into out (L, zeroed): part holds one partial per tile (ntiles).
template <typename scalar_t, typename acc_t, typename Launch>
void launch_sigma(const HostTable& p, const LayerDesc* tab, const int* tile_layer, acc_t* part, acc_t* out,
                  Launch&& launch) {
  if (p.ntiles == 0) return;
  launch(&bilinear_rows_kernel<scalar_t, acc_t>, LaunchDim{static_cast<unsigned>(p.ntiles)}, LaunchDim{kThreads}, tab,
         tile_layer, part);
  launch(&sum_tiles_kernel<acc_t>, LaunchDim{static_cast<unsigned>(p.descs.size())}, LaunchDim{1}, tab, part, out);
}

}  // namespace cuda
}  // namespace specreg_fast
