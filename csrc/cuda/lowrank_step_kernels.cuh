// Device code of the CUDA low-rank (LoRA) power step (included by lowrank_step_cuda.cu and by
// scripts/cuda_emulate/emulate_lowrank_step.cpp), free of ATen and of the torch headers: maps
// M = W + s B A, the dense table (LayerDesc, power_step_kernels.cuh) for W plus one LowRankDesc
// per map for the factors (float32, or float64 for a float64 map; contiguous: A (r, n), B (m, r)).
//
// One step, every map of a dtype group per launch:
//   lowrank_z_kernel:      z = s A v (one warp per factor row);
//   lowrank_rows_kernel:   per tile of rows: t_r = W_r . v + B_r . z (= (M v)_r), the partial
//                          W_tile^T t (as fused_rows_kernel: the tile was just read, from L1/L2)
//                          and the partial B_tile^T t (r values);
//   reduce_partials_kernel (dense): a = W^T t, tile partials in tile order;
//   lowrank_y_kernel:      y = s B^T t, the tiles' r-partials in tile order;
//   lowrank_adjoint_kernel: a_j += sum_k A_kj y_k (= (M^T t)_j);
//   finalize_kernel (dense): u, v, the estimate |a|/|t| and the op's conventions.
// n_iter = 0: lowrank_z_kernel, lowrank_rows_kernel, then lowrank_bilinear_kernel: u . t.
// Every sum has a fixed order (no atomics): deterministic.
#pragma once

#include "power_step_kernels.cuh"

namespace specreg_fast {
namespace cuda {

struct LowRankDesc {
  const void* A;  // (r, n), acc_t, contiguous
  const void* B;  // (m, r), acc_t, contiguous
  int64_t r;
  int64_t y_off;  // the tiles' B^T t partials: ntiles * r values from here
  int64_t z_off;  // z and y of the map: r values from here
  double s;
};

template <typename acc_t>
__global__ void __launch_bounds__(kThreads) lowrank_z_kernel(const LayerDesc* __restrict__ tab,
                                                             const LowRankDesc* __restrict__ lr,
                                                             const int* __restrict__ flags, acc_t* __restrict__ z) {
  const int l = blockIdx.x;
  if (flags[l] == 0) return;
  const LayerDesc L = tab[l];
  const LowRankDesc R = lr[l];
  const auto* A = static_cast<const acc_t*>(R.A);
  const auto* v = static_cast<const acc_t*>(L.v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int64_t k = warp; k < R.r; k += kWarps) {  // uniform over the warp
    const acc_t d = row_dot<acc_t, acc_t>(A + k * L.n, L.n, 1, v, lane);
    if (lane == 0) z[R.z_off + k] = static_cast<acc_t>(R.s) * d;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) lowrank_rows_kernel(const LayerDesc* __restrict__ tab,
                                                                const LowRankDesc* __restrict__ lr,
                                                                const int* __restrict__ tile_layer,
                                                                const int* __restrict__ flags,
                                                                const acc_t* __restrict__ z, acc_t* __restrict__ t,
                                                                acc_t* __restrict__ part, acc_t* __restrict__ ypart) {
  const int l = tile_layer[blockIdx.x];
  if (flags[l] == 0) return;
  const LayerDesc L = tab[l];
  const LowRankDesc R = lr[l];
  const int64_t rb = blockIdx.x - L.tile0, r0 = rb * L.rows_per_tile;
  const int rows = static_cast<int>(L.m - r0 < L.rows_per_tile ? L.m - r0 : L.rows_per_tile);
  const auto* W = static_cast<const scalar_t*>(L.w);
  const auto* v = static_cast<const acc_t*>(L.v);
  const auto* B = static_cast<const acc_t*>(R.B);
  const acc_t* zl = z + R.z_off;
  __shared__ acc_t ts[kRows];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int r = warp; r < kRows; r += kWarps) {
    acc_t s = 0;
    if (r < rows) {
      s = row_dot<scalar_t, acc_t>(W + (r0 + r) * L.sm, L.n, L.sn, v, lane);
      if (lane == 0) {
        const acc_t* b = B + (r0 + r) * R.r;
        for (int64_t k = 0; k < R.r; ++k) s += b[k] * zl[k];
      }
    }
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
  acc_t* yout = ypart + R.y_off + rb * R.r;
  for (int64_t k = threadIdx.x; k < R.r; k += kThreads) {
    acc_t y = 0;
    for (int r = 0; r < rows; ++r) y += B[(r0 + r) * R.r + k] * ts[r];
    yout[k] = y;
  }
}

// y = s B^T t: the tiles' r-partials summed in tile order, one thread per k.
template <typename acc_t>
__global__ void lowrank_y_kernel(const LayerDesc* __restrict__ tab, const LowRankDesc* __restrict__ lr,
                                 const int* __restrict__ flags, const acc_t* __restrict__ ypart,
                                 acc_t* __restrict__ y) {
  const int l = blockIdx.x;
  if (flags[l] == 0) return;
  const LayerDesc L = tab[l];
  const LowRankDesc R = lr[l];
  for (int64_t k = threadIdx.x; k < R.r; k += blockDim.x) {
    acc_t s = 0;
    for (int64_t p = 0; p < L.ntiles; ++p) s += ypart[R.y_off + p * R.r + k];
    y[R.z_off + k] = static_cast<acc_t>(R.s) * s;
  }
}

// a_j += sum_k A_kj y_k, one thread per column (coalesced over j).
template <typename acc_t>
__global__ void lowrank_adjoint_kernel(const LayerDesc* __restrict__ tab, const LowRankDesc* __restrict__ lr,
                                       const int* __restrict__ flags, const acc_t* __restrict__ y,
                                       acc_t* __restrict__ a) {
  const int l = blockIdx.y;
  if (flags[l] == 0) return;
  const LayerDesc L = tab[l];
  const LowRankDesc R = lr[l];
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= L.n) return;
  const auto* A = static_cast<const acc_t*>(R.A);
  acc_t s = 0;
  for (int64_t k = 0; k < R.r; ++k) s += A[k * L.n + j] * y[R.z_off + k];
  a[L.a_off + j] += s;
}

// est_l = u . t (n_iter = 0: u^T M v at the current vectors, t = M v from lowrank_rows_kernel).
template <typename acc_t>
__global__ void lowrank_bilinear_kernel(const LayerDesc* __restrict__ tab, const int* __restrict__ flags,
                                        const acc_t* __restrict__ t, acc_t* __restrict__ est) {
  const int l = blockIdx.x;
  const LayerDesc L = tab[l];
  acc_t s = 0;
  if (flags[l] != 0) {  // (uniform over the block: block_sum below is reached by all threads)
    const auto* u = static_cast<const acc_t*>(L.u);
    for (int64_t i = threadIdx.x; i < L.m; i += blockDim.x) s += u[i] * t[L.t_off + i];
  }
  s = block_sum(s);
  if (threadIdx.x == 0) est[l] = s;
}

// ----------------------------------------------------------------------------- table (host)
struct HostLowRank {
  const void* A;
  const void* B;
  int64_t r;
  double s;
};

// The factor table of the maps of `p` (built by build_table): offsets of the r-partials and of z/y.
inline std::vector<LowRankDesc> build_lowrank_table(const HostTable& p, const std::vector<HostLowRank>& f,
                                                    int64_t& sum_ypart, int64_t& sum_r) {
  std::vector<LowRankDesc> out(f.size());
  sum_ypart = 0;
  sum_r = 0;
  for (size_t l = 0; l < f.size(); ++l) {
    out[l] = {f[l].A, f[l].B, f[l].r, sum_ypart, sum_r, f[l].s};
    sum_ypart += p.descs[l].ntiles * f[l].r;
    sum_r += f[l].r;
  }
  return out;
}

// ----------------------------------------------------------------------------- launch sequence (host)
// The kernels of one lowrank_power_step_ call, in order and with their grids, shared by
// lowrank_step_cuda.cu (on the current stream, through StreamLauncher) and
// scripts/cuda_emulate/emulate_lowrank_step.cpp (on the host), as launch_power_steps is for the
// dense step: the emulator runs this sequence itself, not a copy of it.
//
// The device buffers: the tables (dense LayerDesc, factor LowRankDesc), the tile map and the flags
// (uploaded), z and y (sum_r), t (sum_m), a (sum_n), the dense partials (sum_part), the factor
// partials (sum_ypart), the estimates (L, zeroed) and the start-of-call vectors u0, v0.
template <typename acc_t>
struct LowRankBuffers {
  const LayerDesc* tab;
  const LowRankDesc* lrt;
  const int* tile_layer;
  int* flags;
  acc_t *z, *y, *t, *a, *part, *ypart, *est;
  const acc_t *u0, *v0;
};

// n_iter steps (n_iter == 0: the estimate u^T M v at the current vectors); `before_step(it)` runs
// on the host before each step (the interrupt poll).
template <typename scalar_t, typename acc_t, typename Launch, typename BeforeStep>
void launch_lowrank_steps(const HostTable& p, const LowRankBuffers<acc_t>& b, int64_t n_iter, double tol,
                          Launch&& launch, BeforeStep&& before_step) {
  const auto L = static_cast<unsigned>(p.descs.size());
  const auto tiles = static_cast<unsigned>(p.ntiles);
  const auto col_blocks = static_cast<unsigned>((p.max_n + kReduceCols - 1) / kReduceCols);
  const auto adj_blocks = static_cast<unsigned>((p.max_n + kReduceThreads - 1) / kReduceThreads);
  auto forward = [&] {  // z = s A v, t = M v (and the partials of W^T t, B^T t)
    launch(&lowrank_z_kernel<acc_t>, LaunchDim{L}, LaunchDim{kThreads}, b.tab, b.lrt, b.flags, b.z);
    if (tiles > 0)
      launch(&lowrank_rows_kernel<scalar_t, acc_t>, LaunchDim{tiles}, LaunchDim{kThreads}, b.tab, b.lrt,
             b.tile_layer, b.flags, b.z, b.t, b.part, b.ypart);
  };
  if (n_iter == 0) {
    forward();
    launch(&lowrank_bilinear_kernel<acc_t>, LaunchDim{L}, LaunchDim{kReduceThreads}, b.tab, b.flags, b.t, b.est);
  }
  for (int64_t it = 0; it < n_iter; ++it) {
    before_step(it);
    forward();
    if (tiles > 0) {
      launch(&reduce_partials_kernel<acc_t>, LaunchDim{col_blocks, L}, LaunchDim{kReduceCols, kReduceLanes}, b.tab,
             b.flags, b.part, b.a);
      launch(&lowrank_y_kernel<acc_t>, LaunchDim{L}, LaunchDim{32}, b.tab, b.lrt, b.flags, b.ypart, b.y);
      launch(&lowrank_adjoint_kernel<acc_t>, LaunchDim{adj_blocks, L}, LaunchDim{kReduceThreads}, b.tab, b.lrt,
             b.flags, b.y, b.a);
    }
    launch(&finalize_kernel<acc_t>, LaunchDim{L}, LaunchDim{kReduceThreads}, b.tab, b.flags, b.est, b.t, b.a, b.u0,
           b.v0, tol, it == 0);
  }
}

}  // namespace cuda
}  // namespace specreg_fast
