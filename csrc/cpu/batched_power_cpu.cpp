// Power iteration on a stack of small matrices: specreg_fast::batched_power_step_ (CPU).
//
// The explicit-block form of the paper's circular conv norm: one complex C_out x (C_in s^2)
// block P_b per frequency (thousands of them), persistent per-block vectors u_b, v_b, and
//     t = P v,  a = P^H t,  u <- t / |t|,  v <- a / |a|        (n_iter times)
//     sigma_b = |P_b v_b| at the final v.
// Each iteration reads the block once: row i gives t_i = <P_i, v> and, while the row is in
// L1, adds conj(P_i) t_i into a. One OpenMP thread per chunk of blocks (blocks are
// independent; no atomics, so results do not depend on the thread count). A block whose t or
// a vanishes keeps its vectors (sigma 0), as the dense op does. The CUDA implementation of the
// same schema is the Triton kernel (specreg_fast/triton/batched_power.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <complex>
#include <type_traits>
#include <vector>

namespace specreg_fast {

namespace {

template <typename T>
struct Scalar {
  using real = T;
  static constexpr bool complex = false;
};
template <typename T>
struct Scalar<c10::complex<T>> {
  using real = T;
  static constexpr bool complex = true;
};

// One block, real or complex (interleaved re/im in memory), n_iter steps in place.
template <typename R, bool C>
R block_power(const R* P, R* u, R* v, int64_t m, int64_t n, int64_t n_iter, std::vector<R>& t,
              std::vector<R>& a) {
  constexpr int64_t w = C ? 2 : 1;
  auto matvec_row = [&](const R* row, const R* vec, R& re, R& im) {
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
  };
  for (int64_t it = 0; it < n_iter; ++it) {
    std::fill(a.begin(), a.end(), R(0));
    double tn2 = 0;
    for (int64_t i = 0; i < m; ++i) {
      const R* row = P + i * n * w;
      R re, im;
      matvec_row(row, v, re, im);
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
  double s2 = 0;
  for (int64_t i = 0; i < m; ++i) {
    R re, im;
    matvec_row(P + i * n * w, v, re, im);
    s2 += double(re) * re + double(im) * im;
  }
  return R(std::sqrt(s2));
}

template <typename S>
void run(const at::Tensor& P, const at::Tensor& us, const at::Tensor& vs, int64_t n_iter, const at::Tensor& sigma) {
  using R = typename Scalar<S>::real;
  constexpr bool C = Scalar<S>::complex;
  const int64_t B = P.size(0), m = P.size(1), n = P.size(2);
  const R* p = reinterpret_cast<const R*>(P.data_ptr<S>());
  R* u = reinterpret_cast<R*>(us.data_ptr<S>());
  R* v = reinterpret_cast<R*>(vs.data_ptr<S>());
  R* out = sigma.data_ptr<R>();
  constexpr int64_t w = C ? 2 : 1;
  // grain: enough blocks per task to amortize the scheduling (about 64K complex MACs)
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, m * n));
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    std::vector<R> t(m * w), a(n * w);
    for (int64_t b = b0; b < b1; ++b)
      out[b] = block_power<R, C>(p + b * m * n * w, u + b * m * w, v + b * n * w, m, n, n_iter, t, a);
  });
}

}  // namespace

at::Tensor batched_power_step_impl(const at::Tensor& blocks, const at::Tensor& us, const at::Tensor& vs,
                                   int64_t n_iter) {
  const char* op = "specreg_fast::batched_power_step_";
  at::NoGradGuard no_grad;
  TORCH_CHECK_VALUE(blocks.dim() == 3, op, ": blocks must be a (B, m, n) stack, got shape ", blocks.sizes());
  const auto st = blocks.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kComplexFloat || st == at::kComplexDouble, op,
                   ": blocks must be float32/float64/complex64/complex128, got ", st);
  const int64_t B = blocks.size(0), m = blocks.size(1), n = blocks.size(2);
  TORCH_CHECK_VALUE(us.sizes() == at::IntArrayRef({B, m}) && vs.sizes() == at::IntArrayRef({B, n}), op,
                    ": us must be (", B, ", ", m, ") and vs (", B, ", ", n, "), got ", us.sizes(), " and ", vs.sizes());
  TORCH_CHECK_TYPE(us.scalar_type() == st && vs.scalar_type() == st, op, ": us/vs must have the blocks' dtype ", st);
  TORCH_CHECK_VALUE(us.is_contiguous() && vs.is_contiguous(), op, ": us/vs must be contiguous");
  TORCH_CHECK_VALUE(us.device() == blocks.device() && vs.device() == blocks.device(), op,
                    ": us/vs must be on the blocks' device");
  TORCH_CHECK_VALUE(n_iter >= 0, op, ": n_iter must be >= 0, got ", n_iter);
  const at::Tensor P = blocks.contiguous();
  at::Tensor sigma = at::zeros({B}, blocks.options().dtype(c10::toRealValueType(st)));
  if (B == 0 || m == 0 || n == 0) return sigma;
  switch (st) {
    case at::kFloat: run<float>(P, us, vs, n_iter, sigma); break;
    case at::kDouble: run<double>(P, us, vs, n_iter, sigma); break;
    case at::kComplexFloat: run<c10::complex<float>>(P, us, vs, n_iter, sigma); break;
    default: run<c10::complex<double>>(P, us, vs, n_iter, sigma); break;
  }
  return sigma;
}

}  // namespace specreg_fast

TORCH_LIBRARY_IMPL(specreg_fast, CPU, m) { m.impl("batched_power_step_", &specreg_fast::batched_power_step_impl); }
