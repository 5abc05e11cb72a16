// CPU kernel of specreg_fast::lowrank_power_step_: the power step of low-rank maps
// M = W + s B A (a LoRA layer: frozen base W (m, n), B (m, r), A (r, n)), every map of the list
// in one call, each step reading W once.
//
// A step: z = s A v (r values, before the sweep); then one sweep over the row blocks of W, each
// block in cache while t_B = W_B v + B_B z (= M_B v), acc += W_B^T t_B and y += B_B^T t_B are
// formed; after it a = acc + s A^T y (= M^T M v). u = t/|t|, v = a/|a|, the estimate |a|/|t|
// (= u^T M v at the new vectors), as power_step_ (csrc/cpu/power_step_cpu.cpp), whose row-block
// plan and fixed-order chunk sums this file follows: results depend neither on timing nor on
// the thread count.
//
// Dtypes: the map accumulates in float64 when any of W, A, B is float64, else in float32
// (bfloat16/float16 W widened block by block as in power_step_; the factors, r (m + n) values,
// are converted once per call). A float32/low-precision W of a float64 map is converted once per
// call. A transposed W (column-major view, W = base.t()) is read in two sweeps.

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "lowrank_checks.h"
#include "stable_contracts.h"

#include "simd.h"

namespace specreg_fast {
namespace cpu {
namespace {

// t[i] = <W_i, v> + <B_i, z>, acc += t[i] W_i, y += t[i] B_i over the rows [0, nrows) of a
// row-major block W (leading dimension ld) and the matching rows of B (nrows x r, dense).
#define SPECREG_DEFINE_LOWRANK_ROWS(NAME, T)                                                                    \
  SPECREG_MULTIVERSION void NAME(const T* W, int64_t ld, int64_t nrows, int64_t n, const T* v, const T* B,     \
                                 int64_t r, const T* z, T* t, T* acc, T* y) {                                   \
    int64_t i = 0;                                                                                              \
    for (; i + 4 <= nrows; i += 4) {                                                                            \
      const T* w0 = W + i * ld;                                                                                 \
      const T* w1 = w0 + ld;                                                                                    \
      const T* w2 = w1 + ld;                                                                                    \
      const T* w3 = w2 + ld;                                                                                    \
      T s0 = 0, s1 = 0, s2 = 0, s3 = 0;                                                                         \
      _Pragma("omp simd reduction(+ : s0, s1, s2, s3)") for (int64_t j = 0; j < n; ++j) {                      \
        const T vj = v[j];                                                                                      \
        s0 += w0[j] * vj;                                                                                       \
        s1 += w1[j] * vj;                                                                                       \
        s2 += w2[j] * vj;                                                                                       \
        s3 += w3[j] * vj;                                                                                       \
      }                                                                                                         \
      const T* b0 = B + i * r;                                                                                  \
      _Pragma("omp simd reduction(+ : s0, s1, s2, s3)") for (int64_t k = 0; k < r; ++k) {                      \
        s0 += b0[k] * z[k];                                                                                     \
        s1 += b0[r + k] * z[k];                                                                                 \
        s2 += b0[2 * r + k] * z[k];                                                                             \
        s3 += b0[3 * r + k] * z[k];                                                                             \
      }                                                                                                         \
      t[i] = s0;                                                                                                \
      t[i + 1] = s1;                                                                                            \
      t[i + 2] = s2;                                                                                            \
      t[i + 3] = s3;                                                                                            \
      _Pragma("omp simd") for (int64_t j = 0; j < n; ++j) {                                                     \
        acc[j] += s0 * w0[j] + s1 * w1[j] + s2 * w2[j] + s3 * w3[j];                                            \
      }                                                                                                         \
      _Pragma("omp simd") for (int64_t k = 0; k < r; ++k) {                                                     \
        y[k] += s0 * b0[k] + s1 * b0[r + k] + s2 * b0[2 * r + k] + s3 * b0[3 * r + k];                          \
      }                                                                                                         \
    }                                                                                                           \
    for (; i < nrows; ++i) {                                                                                    \
      const T* w0 = W + i * ld;                                                                                 \
      const T* b0 = B + i * r;                                                                                  \
      T s0 = 0;                                                                                                 \
      _Pragma("omp simd reduction(+ : s0)") for (int64_t j = 0; j < n; ++j) s0 += w0[j] * v[j];                \
      _Pragma("omp simd reduction(+ : s0)") for (int64_t k = 0; k < r; ++k) s0 += b0[k] * z[k];                \
      t[i] = s0;                                                                                                \
      _Pragma("omp simd") for (int64_t j = 0; j < n; ++j) acc[j] += s0 * w0[j];                                 \
      _Pragma("omp simd") for (int64_t k = 0; k < r; ++k) y[k] += s0 * b0[k];                                   \
    }                                                                                                           \
  }

SPECREG_DEFINE_LOWRANK_ROWS(lowrank_rows_f32, float)
SPECREG_DEFINE_LOWRANK_ROWS(lowrank_rows_f64, double)
#undef SPECREG_DEFINE_LOWRANK_ROWS

// Elements of W per task and per chunk: as power_step_cpu.cpp (kTaskElems keeps a block in L2
// between its two uses; kChunkElems is the fixed unit the threads share and sums are cut by).
constexpr int64_t kTaskElems = 1 << 16;
constexpr int64_t kChunkElems = 1 << 17;

enum class Layout { RowMajor, ColMajor };

struct MapView {
  Tensor W;  // the base, possibly converted (a float64 map) or made contiguous (odd strides)
  int64_t m = 0, n = 0, ld = 0, r = 0;
  Layout layout = Layout::RowMajor;
  ScalarType st;  // W's dtype as read
  Tensor A, B;    // contiguous, in the accumulator dtype
  double s = 0.0;
};

Tensor as_acc(const Tensor& t, ScalarType acc) {
  if (t.scalar_type() == acc && t.is_contiguous()) return t;  // the usual case: no dispatcher call
  return torch::stable::contiguous(t.scalar_type() == acc ? t : torch::stable::to(t, acc));
}

MapView make_map(const Tensor& W_in, const Tensor& A, const Tensor& B, double s) {
  MapView M;
  const ScalarType acc = map_acc_type(W_in, A, B);
  const Tensor W0 = (acc == kDouble && W_in.scalar_type() != kDouble) ? torch::stable::to(W_in, kDouble) : W_in;
  M.m = W0.size(0);
  M.n = W0.size(1);
  M.r = A.size(0);
  M.st = W0.scalar_type();
  M.s = s;
  M.A = as_acc(A, acc);
  M.B = as_acc(B, acc);
  const bool low = M.st == kBFloat16 || M.st == kHalf;
  const bool row_unit = M.n <= 1 || W0.stride(1) == 1, col_unit = M.m <= 1 || W0.stride(0) == 1;
  const bool rows_apart = M.m <= 1 || W0.stride(0) >= M.n, cols_apart = M.n <= 1 || W0.stride(1) >= M.m;
  if (row_unit && rows_apart) {
    M.W = W0;
    M.ld = M.m <= 1 ? M.n : W0.stride(0);
  } else if (col_unit && cols_apart && !low) {
    M.W = W0;  // a transposed view (W = base.t()): two sweeps rather than a copy
    M.ld = M.n <= 1 ? M.m : W0.stride(1);
    M.layout = Layout::ColMajor;
  } else {
    M.W = torch::stable::contiguous(W0);
    M.ld = M.n;
  }
  return M;
}

template <typename acc_t>
struct K;
template <>
struct K<float> {
  static void rows(const float* W, int64_t ld, int64_t nr, int64_t n, const float* v, const float* B, int64_t r,
                   const float* z, float* t, float* acc, float* y) {
    lowrank_rows_f32(W, ld, nr, n, v, B, r, z, t, acc, y);
  }
  static float dot(const float* a, const float* b, int64_t n) { return dot_f32(a, b, n); }
  static void axpy(float al, const float* x, float* y, int64_t n) { axpy_f32(al, x, y, n); }
};
template <>
struct K<double> {
  static void rows(const double* W, int64_t ld, int64_t nr, int64_t n, const double* v, const double* B, int64_t r,
                   const double* z, double* t, double* acc, double* y) {
    lowrank_rows_f64(W, ld, nr, n, v, B, r, z, t, acc, y);
  }
  static double dot(const double* a, const double* b, int64_t n) { return dot_f64(a, b, n); }
  static void axpy(double al, const double* x, double* y, int64_t n) { axpy_f64(al, x, y, n); }
};

// Rows [r0, r0+rows) of a row-major base as acc_t (bfloat16/float16 widened into scratch).
template <typename acc_t>
const acc_t* rows_as(const MapView& M, int64_t r0, int64_t rows, std::vector<float>& scratch, int64_t& ld) {
  if constexpr (std::is_same_v<acc_t, double>) {
    ld = M.ld;
    return M.W.const_data_ptr<double>() + r0 * M.ld;
  } else {
    if (M.st == kFloat) {
      ld = M.ld;
      return M.W.const_data_ptr<float>() + r0 * M.ld;
    }
    scratch.resize(static_cast<size_t>(rows * M.n));
    const auto* src = static_cast<const uint16_t*>(M.W.const_data_ptr()) + r0 * M.ld;
    if (M.st == kBFloat16)
      widen_rows_bf16(src, M.ld, rows, M.n, scratch.data());
    else
      widen_rows_f16(src, M.ld, rows, M.n, scratch.data());
    ld = M.n;
    return scratch.data();
  }
}

struct Task {
  int64_t map, r0, rows;
};

struct Plan {
  std::vector<Task> tasks;
  std::vector<int64_t> chunk_begin;  // nchunks + 1 task offsets
  int64_t nchunks() const { return static_cast<int64_t>(chunk_begin.size()) - 1; }
};

// Row-block tasks of the row-major maps, in chunks of at least kChunkElems elements of W (the
// cut depends on the shapes only).
Plan make_plan(const std::vector<MapView>& maps, const std::vector<int64_t>& which) {
  Plan p;
  p.chunk_begin.assign(1, 0);
  int64_t in_chunk = 0;
  for (int64_t l : which) {
    const auto& M = maps[l];
    if (M.layout != Layout::RowMajor || M.m == 0 || M.n == 0) continue;
    const int64_t rows = std::max<int64_t>(4, (kTaskElems / std::max<int64_t>(M.n, 1)) / 4 * 4);
    for (int64_t r0 = 0; r0 < M.m; r0 += rows) {
      p.tasks.push_back({l, r0, std::min(rows, M.m - r0)});
      in_chunk += std::min(rows, M.m - r0) * M.n;
      if (in_chunk >= kChunkElems) {
        p.chunk_begin.push_back(static_cast<int64_t>(p.tasks.size()));
        in_chunk = 0;
      }
    }
  }
  if (in_chunk > 0 || p.tasks.empty()) p.chunk_begin.push_back(static_cast<int64_t>(p.tasks.size()));
  return p;
}

// One step's products for the maps `which`: t[l] = M v, a[l] = M^T t[l].
template <typename acc_t>
void lowrank_sweep(const std::vector<MapView>& maps, const std::vector<int64_t>& which,
                   const std::vector<const acc_t*>& v, std::vector<std::vector<acc_t>>& t,
                   std::vector<std::vector<acc_t>>& a) {
  const size_t L = maps.size();
  std::vector<std::vector<acc_t>> z(L), y(L);
  for (int64_t l : which) {
    const MapView& M = maps[l];
    z[l].assign(M.r, acc_t(0));
    y[l].assign(M.r, acc_t(0));
    const acc_t* A = M.A.template const_data_ptr<acc_t>();
    for (int64_t k = 0; k < M.r; ++k) z[l][k] = static_cast<acc_t>(M.s) * K<acc_t>::dot(A + k * M.n, v[l], M.n);
  }
  const Plan plan = make_plan(maps, which);
  const int64_t nch = plan.nchunks();
  // per chunk, per map it touches: n accumulators of W^T t, then r of B^T t
  std::vector<int64_t> chunk_size(nch, 0);
  for (int64_t c = 0; c < nch; ++c) {
    int64_t last = -1;
    for (int64_t i = plan.chunk_begin[c]; i < plan.chunk_begin[c + 1]; ++i) {
      const int64_t l = plan.tasks[i].map;
      if (l != last) chunk_size[c] += maps[l].n + maps[l].r;
      last = l;
    }
  }
  std::vector<std::vector<acc_t>> partial(nch);
  torch::stable::parallel_for(0, nch, 1, [&](int64_t cb, int64_t ce) {
    std::vector<float> scratch;
    for (int64_t c = cb; c < ce; ++c) {
      partial[c].assign(static_cast<size_t>(chunk_size[c]), acc_t(0));
      int64_t last = -1, o = 0, cur = 0;
      for (int64_t i = plan.chunk_begin[c]; i < plan.chunk_begin[c + 1]; ++i) {
        const Task& tk = plan.tasks[i];
        const MapView& M = maps[tk.map];
        if (tk.map != last) {
          cur = o;
          o += M.n + M.r;
          last = tk.map;
        }
        int64_t ld = 0;
        const acc_t* rows = rows_as<acc_t>(M, tk.r0, tk.rows, scratch, ld);
        K<acc_t>::rows(rows, ld, tk.rows, M.n, v[tk.map], M.B.template const_data_ptr<acc_t>() + tk.r0 * M.r, M.r,
                       z[tk.map].data(), t[tk.map].data() + tk.r0, partial[c].data() + cur,
                       partial[c].data() + cur + M.n);
      }
    }
  });
  for (int64_t l : which) std::fill(a[l].begin(), a[l].end(), acc_t(0));
  for (int64_t c = 0; c < nch; ++c) {  // chunk order: deterministic
    int64_t last = -1, o = 0;
    for (int64_t i = plan.chunk_begin[c]; i < plan.chunk_begin[c + 1]; ++i) {
      const int64_t l = plan.tasks[i].map;
      if (l == last) continue;
      K<acc_t>::axpy(acc_t(1), partial[c].data() + o, a[l].data(), maps[l].n);
      K<acc_t>::axpy(acc_t(1), partial[c].data() + o + maps[l].n, y[l].data(), maps[l].r);
      o += maps[l].n + maps[l].r;
      last = l;
    }
  }
  // Column-major (transposed) bases: t = sum_j v_j col_j + B z, then a_j = <col_j, t>, y = B^T t.
  for (int64_t l : which) {
    const MapView& M = maps[l];
    if (M.layout != Layout::ColMajor || M.m == 0 || M.n == 0) continue;
    const acc_t* W = M.W.template const_data_ptr<acc_t>();
    const int64_t n = M.n, m = M.m, ld = M.ld;
    const int64_t cols = std::max<int64_t>(1, kChunkElems / std::max<int64_t>(m, 1));
    const int64_t ncc = (n + cols - 1) / cols;
    std::vector<std::vector<acc_t>> tp(ncc, std::vector<acc_t>(m, acc_t(0)));
    torch::stable::parallel_for(0, ncc, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        const int64_t j0 = c * cols, j1 = std::min(n, j0 + cols);
        for (int64_t j = j0; j < j1; ++j) K<acc_t>::axpy(v[l][j], W + j * ld, tp[c].data(), m);
      }
    });
    std::fill(t[l].begin(), t[l].end(), acc_t(0));
    for (int64_t c = 0; c < ncc; ++c) K<acc_t>::axpy(acc_t(1), tp[c].data(), t[l].data(), m);
    const acc_t* B = M.B.template const_data_ptr<acc_t>();
    for (int64_t i = 0; i < m; ++i) t[l][i] += K<acc_t>::dot(B + i * M.r, z[l].data(), M.r);
    torch::stable::parallel_for(0, n, std::max<int64_t>(64, cols), [&](int64_t jb, int64_t je) {
      for (int64_t j = jb; j < je; ++j) a[l][j] = K<acc_t>::dot(W + j * ld, t[l].data(), m);
    });
    for (int64_t i = 0; i < m; ++i) K<acc_t>::axpy(t[l][i], B + i * M.r, y[l].data(), M.r);
  }
  // a += s A^T y
  for (int64_t l : which) {
    const MapView& M = maps[l];
    const acc_t* A = M.A.template const_data_ptr<acc_t>();
    for (int64_t k = 0; k < M.r; ++k) K<acc_t>::axpy(static_cast<acc_t>(M.s) * y[l][k], A + k * M.n, a[l].data(), M.n);
  }
}

template <typename acc_t>
acc_t norm2(const std::vector<acc_t>& x) {
  return std::sqrt(K<acc_t>::dot(x.data(), x.data(), static_cast<int64_t>(x.size())));
}

// n_iter steps on the maps `group` (one accumulator type); n_iter = 0 writes est = u^T M v.
// Returns false when interrupted between two steps, with the group's vectors given back.
template <typename acc_t>
bool lowrank_group(const std::vector<MapView>& maps, const std::vector<int64_t>& group, const TensorList& us,
                   const TensorList& vs, int64_t n_iter, double tol, double* est, InterruptPollStable& poll) {
  if (group.empty()) return true;
  const size_t L = maps.size();
  std::vector<std::vector<acc_t>> t(L), a(L), u0(L), v0(L);
  std::vector<const acc_t*> vptr(L, nullptr);
  std::vector<int64_t> active;
  for (int64_t l : group) {
    t[l].assign(maps[l].m, acc_t(0));
    a[l].assign(maps[l].n, acc_t(0));
    const acc_t* up = us[l].template const_data_ptr<acc_t>();
    const acc_t* vp = vs[l].template const_data_ptr<acc_t>();
    u0[l].assign(up, up + maps[l].m);
    v0[l].assign(vp, vp + maps[l].n);
    vptr[l] = vp;
    est[l] = 0.0;
    if (maps[l].m > 0 && maps[l].n > 0) active.push_back(l);
  }
  if (n_iter == 0) {
    lowrank_sweep<acc_t>(maps, active, vptr, t, a);
    for (int64_t l : active) est[l] = static_cast<double>(K<acc_t>::dot(u0[l].data(), t[l].data(), maps[l].m));
    return true;
  }
  for (int64_t it = 0; it < n_iter && !active.empty(); ++it) {
    if (it > 0 && poll.interrupted()) {
      for (int64_t l : group) {
        std::copy(u0[l].begin(), u0[l].end(), us[l].template mutable_data_ptr<acc_t>());
        std::copy(v0[l].begin(), v0[l].end(), vs[l].template mutable_data_ptr<acc_t>());
      }
      return false;
    }
    lowrank_sweep<acc_t>(maps, active, vptr, t, a);
    std::vector<int64_t> still;
    for (int64_t l : active) {
      const acc_t tn = norm2(t[l]);
      const acc_t an = norm2(a[l]);
      acc_t* up = us[l].template mutable_data_ptr<acc_t>();
      acc_t* vp = vs[l].template mutable_data_ptr<acc_t>();
      if (!std::isfinite(tn) || !std::isfinite(an)) {  // non-finite map: vectors as at the start
        std::copy(u0[l].begin(), u0[l].end(), up);
        std::copy(v0[l].begin(), v0[l].end(), vp);
        est[l] = std::numeric_limits<double>::quiet_NaN();
        continue;
      }
      if (tn == acc_t(0) || an == acc_t(0)) {  // M v = 0: keep the vectors
        est[l] = 0.0;
        continue;
      }
      const acc_t itn = acc_t(1) / tn, ian = acc_t(1) / an;
      for (int64_t i = 0; i < maps[l].m; ++i) up[i] = t[l][i] * itn;
      for (int64_t j = 0; j < maps[l].n; ++j) vp[j] = a[l][j] * ian;
      const double prev = est[l];
      est[l] = static_cast<double>(an) / static_cast<double>(tn);
      const bool converged = tol > 0.0 && it > 0 && std::abs(est[l] - prev) <= tol * est[l];
      if (!converged) still.push_back(l);
    }
    active.swap(still);
  }
  return true;
}

Tensor lowrank_power_step_cpu(const TensorList& weights, const TensorList& As, const TensorList& Bs,
                              const std::vector<double>& scales, const TensorList& us, const TensorList& vs,
                              int64_t n_iter, double tol) {
  const char* op = "specreg_fast::lowrank_power_step_";
  check_lowrank_args(weights, As, Bs, scales, us, vs, op, DeviceType::CPU);
  check_n_iter_stable(op, n_iter);
  SF_CHECK_VALUE(tol >= 0.0 && !std::isnan(tol), op, ": tol must be >= 0, got ", tol);
  NoGradGuard no_grad;
  const int64_t L = static_cast<int64_t>(weights.size());
  std::vector<MapView> maps;
  maps.reserve(L);
  std::vector<int64_t> g32, g64;
  bool any64 = false;
  for (int64_t l = 0; l < L; ++l) {
    maps.push_back(make_map(weights[l], As[l], Bs[l], scales[l]));
    const bool is64 = map_acc_type(weights[l], As[l], Bs[l]) == kDouble;
    any64 = any64 || is64;
    (is64 ? g64 : g32).push_back(l);
  }
  std::vector<double> est(L, 0.0);
  InterruptPollStable poll(op);
  std::vector<Tensor> saved;  // the float32 group's vectors, for an interrupt in the float64 one
  if (n_iter > 1 && !g64.empty())
    for (int64_t l : g32) {
      saved.push_back(torch::stable::clone(us[l]));
      saved.push_back(torch::stable::clone(vs[l]));
    }
  if (!lowrank_group<float>(maps, g32, us, vs, n_iter, tol, est.data(), poll)) poll.raise();
  if (!lowrank_group<double>(maps, g64, us, vs, n_iter, tol, est.data(), poll)) {
    for (size_t i = 0; i < g32.size(); ++i) {
      Tensor u = us[g32[i]], v = vs[g32[i]];
      torch::stable::copy_(u, saved[2 * i]);
      torch::stable::copy_(v, saved[2 * i + 1]);
    }
    poll.raise();
  }
  Tensor out = empty({L}, any64 ? kDouble : kFloat, Device(DeviceType::CPU));
  for (int64_t l = 0; l < L; ++l) {
    if (any64)
      out.mutable_data_ptr<double>()[l] = est[l];
    else
      out.mutable_data_ptr<float>()[l] = static_cast<float>(est[l]);
  }
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(specreg_fast, CPU, m) { m.impl("lowrank_power_step_", TORCH_BOX(&lowrank_power_step_cpu)); }

}  // namespace cpu
}  // namespace specreg_fast
