// CPU kernels of the dense ops: specreg_fast::power_step_ and specreg_fast::sigma.
//
// A step reads each weight once: the rows of W are visited in blocks, and for each block
// t_B = W_B v and acc += W_B^T t_B are formed while the block is in cache, so that
// acc = W^T W v and t = W v come out of a single sweep. u = t/|t|, v = acc/|acc| and the
// estimate |acc|/|t| (= u^T W v_new) follow without touching W again.
//
// Parallelism: the row blocks of all layers of the list form one task list, cut into chunks
// of a fixed amount of work (kChunkElems elements of W) whatever the thread count; the
// threads share the chunks, each chunk accumulates into its own buffer, and the buffers are
// summed in chunk order. So the result depends neither on timing (no atomics) nor on
// torch.get_num_threads(): ranks of a data-parallel job that run different thread counts keep
// bit-identical vectors (on CPUs that pick the same SIMD clone, see simd.h).

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "stable_contracts.h"

#include "simd.h"

namespace specreg_fast {
namespace cpu {
namespace {

// Elements of W per task: 64K (256 KB of float32) keeps a block in L2 between the two
// uses of each row.
constexpr int64_t kTaskElems = 1 << 16;
// Work of one chunk (elements of W, 512 KB of float32), the unit the threads share and the
// reductions sum in a fixed order: fixed, so that the summation order does not follow the
// thread count. It is also the least work per thread worth a parallel region: below it the
// wake-up costs more than it saves. Measured on the idle 2-core machine: 1000x784 takes 38 us
// on two threads and 48 us on one, the 784-1024-1024-1024 MLP list 92 us and 157 us. (On a
// machine whose cores other processes hold, a parallel region waits for its slowest, possibly
// descheduled, thread; torch.set_num_threads(1) is the remedy there, as for torch's own
// kernels.)
constexpr int64_t kChunkElems = 1 << 17;

enum class Layout { RowMajor, ColMajor };

struct LayerView {
  Tensor W;  // possibly a contiguous copy of the user's weight (unusual strides only)
  int64_t m = 0, n = 0, ld = 0;
  Layout layout = Layout::RowMajor;
  ScalarType st;
};

// The kernels address W[i, j] as W + i ld + j (row-major) or W + i + j ld (column-major),
// with rows (columns) that do not overlap. Any other layout (a stride-0 dim of an expand(),
// overlapping or doubly strided views) is copied first; the stride of a size-1 dim is
// meaningless and ignored.
LayerView make_view(const Tensor& W_in) {
  LayerView L;
  L.m = W_in.size(0);
  L.n = W_in.size(1);
  L.st = W_in.scalar_type();
  const bool low = L.st == kBFloat16 || L.st == kHalf;
  const bool row_unit = L.n <= 1 || W_in.stride(1) == 1, col_unit = L.m <= 1 || W_in.stride(0) == 1;
  const bool rows_apart = L.m <= 1 || W_in.stride(0) >= L.n, cols_apart = L.n <= 1 || W_in.stride(1) >= L.m;
  if (row_unit && rows_apart) {
    L.W = W_in;
    L.ld = L.m <= 1 ? L.n : W_in.stride(0);
    L.layout = Layout::RowMajor;
  } else if (col_unit && cols_apart && !low) {
    // A transposed view (e.g. W = A.t()): walked column by column in two sweeps rather
    // than copied.
    L.W = W_in;
    L.ld = L.n <= 1 ? L.m : W_in.stride(1);
    L.layout = Layout::ColMajor;
  } else {
    L.W = torch::stable::contiguous(W_in);
    L.ld = L.n;
    L.layout = Layout::RowMajor;
  }
  return L;
}

template <typename acc_t>
struct K;
template <>
struct K<float> {
  static void fused(const float* W, int64_t ld, int64_t r, int64_t n, const float* v, float* t, float* a) {
    fused_rows_f32(W, ld, r, n, v, t, a);
  }
  static float bilinear(const float* W, int64_t ld, int64_t r, int64_t n, const float* u, const float* v) {
    return bilinear_rows_f32(W, ld, r, n, u, v);
  }
  static float dot(const float* a, const float* b, int64_t n) { return dot_f32(a, b, n); }
  static void axpy(float al, const float* x, float* y, int64_t n) { axpy_f32(al, x, y, n); }
};
template <>
struct K<double> {
  static void fused(const double* W, int64_t ld, int64_t r, int64_t n, const double* v, double* t, double* a) {
    fused_rows_f64(W, ld, r, n, v, t, a);
  }
  static double bilinear(const double* W, int64_t ld, int64_t r, int64_t n, const double* u, const double* v) {
    return bilinear_rows_f64(W, ld, r, n, u, v);
  }
  static double dot(const double* a, const double* b, int64_t n) { return dot_f64(a, b, n); }
  static void axpy(double al, const double* x, double* y, int64_t n) { axpy_f64(al, x, y, n); }
};

// Pointer to rows [r0, r0+rows) of a row-major layer as acc_t, widening reduced precision
// into `scratch` (so W is still read once: the widened block is used twice from cache).
template <typename acc_t>
const acc_t* rows_as(const LayerView& L, int64_t r0, int64_t rows, std::vector<float>& scratch, int64_t& ld) {
  if constexpr (std::is_same_v<acc_t, double>) {
    ld = L.ld;
    return L.W.const_data_ptr<double>() + r0 * L.ld;
  } else {
    if (L.st == kFloat) {
      ld = L.ld;
      return L.W.const_data_ptr<float>() + r0 * L.ld;
    }
    scratch.resize(static_cast<size_t>(rows * L.n));
    const auto* src = static_cast<const uint16_t*>(L.W.const_data_ptr()) + r0 * L.ld;
    if (L.st == kBFloat16) {
      widen_rows_bf16(src, L.ld, rows, L.n, scratch.data());
    } else {
      widen_rows_f16(src, L.ld, rows, L.n, scratch.data());
    }
    ld = L.n;
    return scratch.data();
  }
}

struct Task {
  int64_t layer, r0, rows;
};

// Row-block tasks of the given row-major layers, cut into chunks of consecutive tasks that
// each hold at least kChunkElems elements (the last one may hold less). The cut depends on the
// shapes only, never on the thread count.
struct Plan {
  std::vector<Task> tasks;
  std::vector<int64_t> chunk_begin;  // nchunks + 1 task offsets
  int64_t nchunks() const { return static_cast<int64_t>(chunk_begin.size()) - 1; }
};

Plan make_plan(const std::vector<LayerView>& layers, const std::vector<int64_t>& which) {
  Plan p;
  p.chunk_begin.assign(1, 0);
  int64_t in_chunk = 0;
  for (int64_t l : which) {
    const auto& L = layers[l];
    if (L.layout != Layout::RowMajor || L.m == 0 || L.n == 0) continue;
    int64_t rows = std::max<int64_t>(4, (kTaskElems / std::max<int64_t>(L.n, 1)) / 4 * 4);
    for (int64_t r0 = 0; r0 < L.m; r0 += rows) {
      p.tasks.push_back({l, r0, std::min(rows, L.m - r0)});
      in_chunk += std::min(rows, L.m - r0) * L.n;
      if (in_chunk >= kChunkElems) {
        p.chunk_begin.push_back(static_cast<int64_t>(p.tasks.size()));
        in_chunk = 0;
      }
    }
  }
  if (in_chunk > 0 || p.tasks.empty()) p.chunk_begin.push_back(static_cast<int64_t>(p.tasks.size()));
  return p;
}

void check_list(const TensorList& weights, const TensorList& us, const TensorList& vs, const char* op, bool writes) {
  check_power_step_list_stable(weights, us, vs, op, DeviceType::CPU, writes);
}

ScalarType out_type(const TensorList& weights) {
  for (const auto& W : weights)
    if (W.scalar_type() == kDouble) return kDouble;
  return kFloat;
}

// One grouped power step on the active layers `which` (all with accumulator type acc_t):
// fills t[l] = W v and a[l] = W^T W v.
template <typename acc_t>
void grouped_sweep(const std::vector<LayerView>& layers, const std::vector<int64_t>& which,
                   const std::vector<const acc_t*>& v, std::vector<std::vector<acc_t>>& t,
                   std::vector<std::vector<acc_t>>& a) {
  const Plan plan = make_plan(layers, which);
  const int64_t nch = plan.nchunks();
  // Per-chunk accumulators: chunk c touches a contiguous range of layers.
  std::vector<int64_t> chunk_size(nch, 0);
  for (int64_t c = 0; c < nch; ++c) {
    int64_t last = -1;
    for (int64_t i = plan.chunk_begin[c]; i < plan.chunk_begin[c + 1]; ++i) {
      const int64_t l = plan.tasks[i].layer;
      if (l != last) {
        chunk_size[c] += layers[l].n;
        last = l;
      }
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
        const LayerView& L = layers[tk.layer];
        if (tk.layer != last) {
          cur = o;
          o += L.n;
          last = tk.layer;
        }
        int64_t ld = 0;
        const acc_t* rows = rows_as<acc_t>(L, tk.r0, tk.rows, scratch, ld);
        K<acc_t>::fused(rows, ld, tk.rows, L.n, v[tk.layer], t[tk.layer].data() + tk.r0, partial[c].data() + cur);
      }
    }
  });
  // Sum the chunk partials in chunk order (deterministic).
  for (int64_t l : which) std::fill(a[l].begin(), a[l].end(), acc_t(0));
  for (int64_t c = 0; c < nch; ++c) {
    int64_t last = -1, o = 0;
    for (int64_t i = plan.chunk_begin[c]; i < plan.chunk_begin[c + 1]; ++i) {
      const int64_t l = plan.tasks[i].layer;
      if (l == last) continue;
      K<acc_t>::axpy(acc_t(1), partial[c].data() + o, a[l].data(), layers[l].n);
      o += layers[l].n;
      last = l;
    }
  }
  // Column-major (transposed) layers: two sweeps, t = sum_j v_j col_j, then a_j = <col_j, t>.
  for (int64_t l : which) {
    const LayerView& L = layers[l];
    if (L.layout != Layout::ColMajor) continue;
    const acc_t* W = L.W.const_data_ptr<acc_t>();
    const int64_t n = L.n, m = L.m, ld = L.ld;
    // Column chunks of kChunkElems elements (not one per thread): a fixed summation order.
    const int64_t cols = std::max<int64_t>(1, kChunkElems / std::max<int64_t>(m, 1));
    const int64_t nch = (n + cols - 1) / cols;
    std::vector<std::vector<acc_t>> tp(nch, std::vector<acc_t>(m, acc_t(0)));
    torch::stable::parallel_for(0, nch, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        const int64_t j0 = c * cols, j1 = std::min(n, j0 + cols);
        for (int64_t j = j0; j < j1; ++j) K<acc_t>::axpy(v[l][j], W + j * ld, tp[c].data(), m);
      }
    });
    std::fill(t[l].begin(), t[l].end(), acc_t(0));
    for (int64_t c = 0; c < nch; ++c) K<acc_t>::axpy(acc_t(1), tp[c].data(), t[l].data(), m);
    torch::stable::parallel_for(0, n, std::max<int64_t>(64, cols), [&](int64_t jb, int64_t je) {
      for (int64_t j = jb; j < je; ++j) a[l][j] = K<acc_t>::dot(W + j * ld, t[l].data(), m);
    });
  }
}

template <typename acc_t>
acc_t norm2(const std::vector<acc_t>& x) {
  return std::sqrt(K<acc_t>::dot(x.data(), x.data(), static_cast<int64_t>(x.size())));
}

// Returns false when interrupted between two steps, with the group's vectors given back.
template <typename acc_t>
bool power_step_group(const std::vector<LayerView>& layers, const std::vector<int64_t>& group,
                      const TensorList& us, const TensorList& vs, int64_t n_iter, double tol, double* est,
                      InterruptPollStable& poll) {
  if (group.empty()) return true;
  const size_t L = layers.size();
  std::vector<std::vector<acc_t>> t(L), a(L), u0(L), v0(L);
  std::vector<const acc_t*> vptr(L, nullptr);
  std::vector<int64_t> active;
  for (int64_t l : group) {
    t[l].assign(layers[l].m, acc_t(0));
    a[l].assign(layers[l].n, acc_t(0));
    const acc_t* up = us[l].mutable_data_ptr<acc_t>();
    const acc_t* vp = vs[l].mutable_data_ptr<acc_t>();
    u0[l].assign(up, up + layers[l].m);  // for the roll-back on non-finite input
    v0[l].assign(vp, vp + layers[l].n);
    vptr[l] = vs[l].mutable_data_ptr<acc_t>();
    est[l] = 0.0;
    if (layers[l].m > 0 && layers[l].n > 0) active.push_back(l);
  }
  for (int64_t it = 0; it < n_iter && !active.empty(); ++it) {
    if (it > 0 && poll.interrupted()) {
      for (int64_t l : group) {
        std::copy(u0[l].begin(), u0[l].end(), us[l].mutable_data_ptr<acc_t>());
        std::copy(v0[l].begin(), v0[l].end(), vs[l].mutable_data_ptr<acc_t>());
      }
      return false;
    }
    grouped_sweep<acc_t>(layers, active, vptr, t, a);
    std::vector<int64_t> still;
    for (int64_t l : active) {
      const acc_t tn = norm2(t[l]);
      const acc_t an = norm2(a[l]);
      acc_t* up = us[l].mutable_data_ptr<acc_t>();
      acc_t* vp = vs[l].mutable_data_ptr<acc_t>();
      if (!std::isfinite(tn) || !std::isfinite(an)) {
        // Non-finite weight: give the vectors back as they were when the call started.
        std::copy(u0[l].begin(), u0[l].end(), up);
        std::copy(v0[l].begin(), v0[l].end(), vp);
        est[l] = std::numeric_limits<double>::quiet_NaN();
        continue;
      }
      if (tn == acc_t(0) || an == acc_t(0)) {
        // W v = 0 (zero matrix): nothing to learn from this step; keep the vectors.
        est[l] = 0.0;
        continue;
      }
      const acc_t it_n = acc_t(1) / tn, ia_n = acc_t(1) / an;
      for (int64_t i = 0; i < layers[l].m; ++i) up[i] = t[l][i] * it_n;
      for (int64_t j = 0; j < layers[l].n; ++j) vp[j] = a[l][j] * ia_n;
      const double prev = est[l];
      est[l] = static_cast<double>(an) / static_cast<double>(tn);
      const bool converged = tol > 0.0 && it > 0 && std::abs(est[l] - prev) <= tol * est[l];
      if (!converged) still.push_back(l);
    }
    active.swap(still);
  }
  return true;
}

Tensor sigma_cpu(const TensorList& weights, const TensorList& us, const TensorList& vs);

Tensor power_step_cpu(const TensorList& weights, const TensorList& us, const TensorList& vs, int64_t n_iter,
                          double tol) {
  const char* op = "specreg_fast::power_step_";
  check_list(weights, us, vs, op, /*writes=*/true);
  check_n_iter_stable(op, n_iter);
  SF_CHECK_VALUE(tol >= 0.0 && std::isfinite(tol), op, ": tol must be finite and >= 0, got ", tol);
  const int64_t L = static_cast<int64_t>(weights.size());
  std::vector<LayerView> layers;
  layers.reserve(L);
  std::vector<int64_t> g32, g64;
  for (int64_t l = 0; l < L; ++l) {
    layers.push_back(make_view(weights[l]));
    (weights[l].scalar_type() == kDouble ? g64 : g32).push_back(l);
  }
  std::vector<double> est(L, 0.0);
  NoGradGuard no_grad;
  InterruptPollStable poll(op);
  // An interrupted call gives every vector back: the float32 group has already finished when
  // the float64 one is interrupted, so its vectors are saved for that case.
  std::vector<Tensor> saved;
  if (n_iter > 1 && !g64.empty())
    for (int64_t l : g32) {
      saved.push_back(torch::stable::clone(us[l]));
      saved.push_back(torch::stable::clone(vs[l]));
    }
  if (!power_step_group<float>(layers, g32, us, vs, n_iter, tol, est.data(), poll)) poll.raise();
  if (!power_step_group<double>(layers, g64, us, vs, n_iter, tol, est.data(), poll)) {
    for (size_t i = 0; i < g32.size(); ++i) {
      Tensor u = us[g32[i]], v = vs[g32[i]];
      torch::stable::copy_(u, saved[2 * i]);
      torch::stable::copy_(v, saved[2 * i + 1]);
    }
    poll.raise();
  }
  if (n_iter == 0) return sigma_cpu(weights, us, vs);  // no step: u^T W v at the current vectors
  Tensor out = empty({L}, out_type(weights), Device(DeviceType::CPU));
  for (int64_t l = 0; l < L; ++l) {
    if (out.scalar_type() == kDouble)
      out.mutable_data_ptr<double>()[l] = est[l];
    else
      out.mutable_data_ptr<float>()[l] = static_cast<float>(est[l]);
  }
  return out;
}

template <typename acc_t>
void sigma_group(const std::vector<LayerView>& layers, const std::vector<int64_t>& group, const TensorList& us,
                 const TensorList& vs, double* out) {
  if (group.empty()) return;
  const Plan plan = make_plan(layers, group);
  const int64_t nch = plan.nchunks();
  std::vector<std::vector<std::pair<int64_t, acc_t>>> partial(nch);
  torch::stable::parallel_for(0, nch, 1, [&](int64_t cb, int64_t ce) {
    std::vector<float> scratch;
    for (int64_t c = cb; c < ce; ++c) {
      for (int64_t i = plan.chunk_begin[c]; i < plan.chunk_begin[c + 1]; ++i) {
        const Task& tk = plan.tasks[i];
        const LayerView& L = layers[tk.layer];
        int64_t ld = 0;
        const acc_t* rows = rows_as<acc_t>(L, tk.r0, tk.rows, scratch, ld);
        const acc_t s = K<acc_t>::bilinear(rows, ld, tk.rows, L.n, us[tk.layer].mutable_data_ptr<acc_t>() + tk.r0,
                                           vs[tk.layer].mutable_data_ptr<acc_t>());
        if (!partial[c].empty() && partial[c].back().first == tk.layer)
          partial[c].back().second += s;
        else
          partial[c].emplace_back(tk.layer, s);
      }
    }
  });
  for (int64_t l : group) out[l] = 0.0;
  std::vector<acc_t> sum(layers.size(), acc_t(0));
  for (int64_t c = 0; c < nch; ++c)
    for (const auto& pr : partial[c]) sum[pr.first] += pr.second;
  for (int64_t l : group) {
    const LayerView& L = layers[l];
    if (L.layout == Layout::ColMajor) {
      const acc_t* W = L.W.const_data_ptr<acc_t>();
      const acc_t* u = us[l].mutable_data_ptr<acc_t>();
      const acc_t* v = vs[l].mutable_data_ptr<acc_t>();
      acc_t s = 0;
      for (int64_t j = 0; j < L.n; ++j) s += v[j] * K<acc_t>::dot(W + j * L.ld, u, L.m);
      sum[l] = s;
    }
    out[l] = static_cast<double>(sum[l]);
  }
}

Tensor sigma_cpu(const TensorList& weights, const TensorList& us, const TensorList& vs) {
  check_list(weights, us, vs, "specreg_fast::sigma", /*writes=*/false);
  const int64_t L = static_cast<int64_t>(weights.size());
  std::vector<LayerView> layers;
  std::vector<int64_t> g32, g64;
  for (int64_t l = 0; l < L; ++l) {
    layers.push_back(make_view(weights[l]));
    (weights[l].scalar_type() == kDouble ? g64 : g32).push_back(l);
  }
  std::vector<double> res(L, 0.0);
  sigma_group<float>(layers, g32, us, vs, res.data());
  sigma_group<double>(layers, g64, us, vs, res.data());
  Tensor out = empty({L}, out_type(weights), Device(DeviceType::CPU));
  for (int64_t l = 0; l < L; ++l) {
    if (out.scalar_type() == kDouble)
      out.mutable_data_ptr<double>()[l] = res[l];
    else
      out.mutable_data_ptr<float>()[l] = static_cast<float>(res[l]);
  }
  return out;
}

}  // namespace

// The value of sigma read off `est` (power_step_'s return at these us/vs): checks what sigma
// checks, on the weights' own device type, and that est is one estimate per layer of the op's
// dtype. Registered for CUDA too (csrc/cuda/power_step_cuda.cu).
Tensor sigma_from_step_impl(const TensorList& weights, const TensorList& us, const TensorList& vs, const Tensor& est) {
  const char* op = "specreg_fast::sigma_from_step";
  const auto type = weights.empty() ? est.device().type() : weights[0].device().type();
  check_power_step_list_stable(weights, us, vs, op, type, /*writes=*/false);
  check_step_estimate_stable(op, weights, est, out_type(weights));
  return torch::stable::clone(est);
}

STABLE_TORCH_LIBRARY_IMPL(specreg_fast, CPU, m) {
  m.impl("power_step_", TORCH_BOX(&power_step_cpu));
  m.impl("sigma", TORCH_BOX(&sigma_cpu));
  m.impl("sigma_from_step", TORCH_BOX(&sigma_from_step_impl));
}

}  // namespace cpu
}  // namespace specreg_fast
