// Power iteration on a stack of small matrices: specreg_fast::batched_power_step_ (CPU).
//
// The explicit-block form of the paper's circular conv norm: one complex C_out x (C_in s^2)
// block P_b per frequency (thousands of them), persistent per-block vectors u_b, v_b, and
//     t = P v,  a = P^H t,  u <- t / |t|,  v <- a / |a|        (n_iter times)
//     sigma_b = |P_b v_b| at the final v.
// Each iteration reads the block once: row i gives t_i = <P_i, v> and, while the row is in
// L1, adds conj(P_i) t_i into a. One OpenMP thread per chunk of blocks (blocks are
// independent and each is summed in a fixed order, so results do not depend on the thread
// count). A block whose t or
// a vanishes keeps its vectors (sigma 0), as the dense op does. The CUDA implementation of the
// same schema is the Triton kernel (specreg_fast/triton/batched_power.py).
#include <algorithm>
#include <cmath>
#include <complex>
#include <type_traits>
#include <vector>

#include "stable_contracts.h"

namespace specreg_fast {

namespace {

template <typename T>
struct Scalar {
  using real = T;
  static constexpr bool complex = false;
};
template <typename T>
struct Scalar<std::complex<T>> {
  using real = T;
  static constexpr bool complex = true;
};

// <row, vec> of one block row, real or complex (interleaved re/im in memory).
template <typename R, bool C>
void matvec_row(const R* row, const R* vec, int64_t n, R& re, R& im) {
  re = 0;
  im = 0;
  if constexpr (C) {
#pragma omp simd reduction(+ : re, im)
    for (int64_t j = 0; j < n; ++j) {
      const R pr = row[2 * j], pi = row[2 * j + 1], vr = vec[2 * j], vi = vec[2 * j + 1];
      re += pr * vr - pi * vi;
      im += pr * vi + pi * vr;
    }
  } else {
#pragma omp simd reduction(+ : re)
    for (int64_t j = 0; j < n; ++j) re += row[j] * vec[j];
  }
}

// One block, n_iter steps in place. A step that finds t or a zero or non-finite writes
// nothing, so stopping there and running it again later give the same vectors.
template <typename R, bool C>
void block_power(const R* P, R* u, R* v, int64_t m, int64_t n, int64_t n_iter, std::vector<R>& t,
                 std::vector<R>& a) {
  constexpr int64_t w = C ? 2 : 1;
  for (int64_t it = 0; it < n_iter; ++it) {
    std::fill(a.begin(), a.end(), R(0));
    double tn2 = 0;
    for (int64_t i = 0; i < m; ++i) {
      const R* row = P + i * n * w;
      R re, im;
      matvec_row<R, C>(row, v, n, re, im);
      if constexpr (C) {
        t[2 * i] = re;
        t[2 * i + 1] = im;
        tn2 += double(re) * re + double(im) * im;
        R* ap = a.data();
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) {  // a += conj(P_i) t_i
          const R pr = row[2 * j], pi = row[2 * j + 1];
          ap[2 * j] += pr * re + pi * im;
          ap[2 * j + 1] += pr * im - pi * re;
        }
      } else {
        t[i] = re;
        tn2 += double(re) * re;
        R* ap = a.data();
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) ap[j] += row[j] * re;
      }
    }
    double an2 = 0;
    for (int64_t j = 0; j < n * w; ++j) an2 += double(a[j]) * a[j];
    if (!(tn2 > 0 && an2 > 0) || !std::isfinite(tn2) || !std::isfinite(an2)) break;
    const R ti = R(1 / std::sqrt(tn2)), ai = R(1 / std::sqrt(an2));
    for (int64_t i = 0; i < m * w; ++i) u[i] = t[i] * ti;
    for (int64_t j = 0; j < n * w; ++j) v[j] = a[j] * ai;
  }
}

// sigma_b = |P_b v_b|.
template <typename R, bool C>
R block_sigma(const R* P, const R* v, int64_t m, int64_t n) {
  constexpr int64_t w = C ? 2 : 1;
  double s2 = 0;
  for (int64_t i = 0; i < m; ++i) {
    R re, im;
    matvec_row<R, C>(P + i * n * w, v, n, re, im);
    s2 += double(re) * re + double(im) * im;
  }
  return R(std::sqrt(s2));
}

// Returns false when interrupted (between two rounds of steps), the vectors then partly
// updated: the caller restores them.
template <typename S>
bool run(const Tensor& P, const Tensor& us, const Tensor& vs, int64_t n_iter, const Tensor& sigma,
         InterruptPollStable& poll) {
  using R = typename Scalar<S>::real;
  constexpr bool C = Scalar<S>::complex;
  const int64_t B = P.size(0), m = P.size(1), n = P.size(2);
  const R* p = static_cast<const R*>(P.const_data_ptr());
  R* u = static_cast<R*>(us.mutable_data_ptr());
  R* v = static_cast<R*>(vs.mutable_data_ptr());
  R* out = sigma.mutable_data_ptr<R>();
  constexpr int64_t w = C ? 2 : 1;
  // grain: enough blocks per task to amortize the scheduling (about 64K complex MACs)
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, m * n));
  // The steps run in rounds of about 2^24 multiply-adds (milliseconds) with an interrupt poll
  // between rounds; blocks are independent, so the rounds change no result.
  const int64_t per_round = std::max<int64_t>(1, (int64_t(1) << 24) / std::max<int64_t>(1, B * m * n * w));
  for (int64_t done = 0; done < n_iter; done += per_round) {
    if (done > 0 && poll.interrupted()) return false;
    const int64_t steps = std::min(per_round, n_iter - done);
    torch::stable::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
      std::vector<R> t(m * w), a(n * w);
      for (int64_t b = b0; b < b1; ++b)
        block_power<R, C>(p + b * m * n * w, u + b * m * w, v + b * n * w, m, n, steps, t, a);
    });
  }
  torch::stable::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) out[b] = block_sigma<R, C>(p + b * m * n * w, v + b * n * w, m, n);
  });
  return true;
}

}  // namespace

Tensor batched_power_step_impl(const Tensor& blocks, const Tensor& us, const Tensor& vs, int64_t n_iter) {
  const char* op = "specreg_fast::batched_power_step_";
  NoGradGuard no_grad;
  SF_CHECK_VALUE(blocks.dim() == 3, op, ": blocks must be a (B, m, n) stack, got shape ", shape_of(blocks));
  const auto st = blocks.scalar_type();
  SF_CHECK_TYPE(st == kFloat || st == kDouble || st == kComplexFloat || st == kComplexDouble, op,
                ": blocks must be float32/float64/complex64/complex128, got ", dtype_name(st));
  const int64_t B = blocks.size(0), m = blocks.size(1), n = blocks.size(2);
  const bool shapes_ok = us.dim() == 2 && us.size(0) == B && us.size(1) == m && vs.dim() == 2 && vs.size(0) == B &&
                        vs.size(1) == n;
  SF_CHECK_VALUE(shapes_ok, op, ": us must be (", B, ", ", m, ") and vs (", B, ", ", n, "), got ", shape_of(us), " and ",
                 shape_of(vs));
  SF_CHECK_TYPE(us.scalar_type() == st && vs.scalar_type() == st, op, ": us/vs must have the blocks' dtype ",
                dtype_name(st));
  SF_CHECK_VALUE(us.is_contiguous() && vs.is_contiguous(), op, ": us/vs must be contiguous");
  SF_CHECK_VALUE(us.device() == blocks.device() && vs.device() == blocks.device(), op,
                 ": us/vs must be on the blocks' device");
  check_n_iter_stable(op, n_iter);
  // The written vectors must not share memory with each other or the blocks.
  MemoryArgsStable mem;
  mem.add_one("blocks", 0, blocks, false);
  mem.add_one("us", 0, us, true);
  mem.add_one("vs", 0, vs, true);
  mem.check(op);
  const Tensor P = torch::stable::contiguous(blocks);
  const ScalarType real = st == kComplexFloat ? kFloat : st == kComplexDouble ? kDouble : st;
  Tensor sigma = zeros({B}, real, blocks.device());
  if (B == 0 || m == 0 || n == 0) return sigma;
  InterruptPollStable poll(op);
  const Tensor u0 = n_iter > 1 ? torch::stable::clone(us) : Tensor(), v0 = n_iter > 1 ? torch::stable::clone(vs) : Tensor();
  bool done = true;
  switch (st) {
    case kFloat: done = run<float>(P, us, vs, n_iter, sigma, poll); break;
    case kDouble: done = run<double>(P, us, vs, n_iter, sigma, poll); break;
    case kComplexFloat: done = run<std::complex<float>>(P, us, vs, n_iter, sigma, poll); break;
    default: done = run<std::complex<double>>(P, us, vs, n_iter, sigma, poll); break;
  }
  if (!done) {
    Tensor u = us, v = vs;
    torch::stable::copy_(u, u0);
    torch::stable::copy_(v, v0);
    poll.raise();
  }
  return sigma;
}

// Lazy conj/neg views (x.conj(), torch._neg_view): PyTorch's fallback materializes them before
// the kernel, but for a written Tensor argument it stops at an internal assert. The kernel of
// the Conjugate and Negative keys that rejects written views with a clear error and
// materializes the read-only blocks is registered from Python (specreg_fast/ops/batched_power.py): the stable
// ABI of torch 2.11 has neither is_conj nor a typed call back into the dispatcher.

}  // namespace specreg_fast

STABLE_TORCH_LIBRARY_IMPL(specreg_fast, CPU, m) {
  m.impl("batched_power_step_", TORCH_BOX(&specreg_fast::batched_power_step_impl));
}
