// Positive-definiteness test of a stack of shifted Hermitian matrices:
// specreg_fast::shifted_cholesky_info (CPU).
//
// For each block b, the Cholesky factorization of A_b = shift_b I - H_b, where A_b is the
// Hermitian matrix read from the UPPER triangle of H_b (row j, columns i >= j; the real part
// of the diagonal), as LAPACK's potrf with uplo='U' reads it. Returns info_b = 0 when every
// pivot is positive, else the 1-based index of the first pivot that is not (potrf's info).
// Only the test is wanted (the certified upper bound in specreg_fast/bounds.py), so the factor
// is not returned: no triangular copy-out, and blocks run in parallel, one per task, instead of
// one LAPACK call after another.
//
// Right-looking, unblocked: column j of the factor lives in a contiguous row of a per-thread
// scratch with separate real and imaginary planes, so the rank-1 update of each trailing
// column is a plain loop over contiguous floats that the compiler vectorizes (four FMAs per
// complex entry). Blocks are small (C_out x C_in Fourier blocks, c <= a few hundred), the
// scratch stays in L2, and the floating-point Cholesky error bound (Demmel) the certificate
// relies on holds for any summation order.
#include <algorithm>
#include <cmath>
#include <vector>

#include "simd.h"
#include "stable_api.h"

namespace specreg_fast {

namespace {

// The rank-1 update of one trailing column: col -= x * conj(l), on split planes.
// (Overloads, not a template: target_clones wants plain functions.)
#define SPECREG_UPDATE_COLUMN(R)                                                                          \
  SPECREG_MULTIVERSION void update_column(R* __restrict col_re, R* __restrict col_im,                     \
                                          const R* __restrict x_re, const R* __restrict x_im, R lr, R li, \
                                          int64_t len) {                                                  \
    _Pragma("omp simd") for (int64_t i = 0; i < len; ++i) {                                               \
      col_re[i] -= x_re[i] * lr + x_im[i] * li;                                                           \
      col_im[i] -= x_im[i] * lr - x_re[i] * li;                                                           \
    }                                                                                                     \
  }
SPECREG_UPDATE_COLUMN(float)
SPECREG_UPDATE_COLUMN(double)
#undef SPECREG_UPDATE_COLUMN

template <typename R>
int32_t block_info(const R* H, R shift, int64_t c, std::vector<R>& re, std::vector<R>& im) {
  // row j of the scratch = column j of A below the diagonal = conj of row j of A above it:
  // A[i][j] = conj(A[j][i]) = -conj(H[j][i]) for i > j
  for (int64_t j = 0; j < c; ++j) {
    const R* h = H + 2 * (j * c);
    R* rr = re.data() + j * c;
    R* ri = im.data() + j * c;
    for (int64_t i = j; i < c; ++i) {
      rr[i] = -h[2 * i];
      ri[i] = h[2 * i + 1];
    }
    rr[j] += shift;
    ri[j] = 0;
  }
  for (int64_t j = 0; j < c; ++j) {
    R* xr = re.data() + j * c;
    R* xi = im.data() + j * c;
    const R d = xr[j];
    if (!(d > 0)) return static_cast<int32_t>(j + 1);  // also catches NaN
    const R inv = R(1) / std::sqrt(d);
    for (int64_t i = j; i < c; ++i) {
      xr[i] *= inv;
      xi[i] *= inv;
    }
    for (int64_t k = j + 1; k < c; ++k)
      update_column(re.data() + k * c + k, im.data() + k * c + k, xr + k, xi + k, xr[k], xi[k], c - k);
  }
  return 0;
}

template <typename R>
void run(const Tensor& H, const Tensor& shift, Tensor& info) {
  const int64_t B = H.size(0), c = H.size(1);
  const R* h = static_cast<const R*>(H.const_data_ptr());
  const R* s = shift.const_data_ptr<R>();
  int32_t* out = info.mutable_data_ptr<int32_t>();
  // one block per task once a block is worth it (about c^3 / 6 complex MACs each)
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(1, c * c * c / 6));
  torch::stable::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    std::vector<R> re(c * c), im(c * c);
    for (int64_t b = b0; b < b1; ++b) out[b] = block_info<R>(h + 2 * b * c * c, s[b], c, re, im);
  });
}

}  // namespace

Tensor shifted_cholesky_info_impl(const Tensor& H, const Tensor& shift) {
  const char* op = "specreg_fast::shifted_cholesky_info";
  NoGradGuard no_grad;
  SF_CHECK_VALUE(H.dim() == 3 && H.size(1) == H.size(2), op, ": H must be a (B, c, c) stack, got shape ",
                 shape_of(H));
  const auto st = H.scalar_type();
  SF_CHECK_TYPE(st == kComplexFloat || st == kComplexDouble, op, ": H must be complex64/complex128, got ",
                dtype_name(st));
  const auto rt = st == kComplexFloat ? kFloat : kDouble;
  SF_CHECK_VALUE(shift.dim() == 1 && shift.size(0) == H.size(0), op, ": shift must have shape (", H.size(0),
                 "), got ", shape_of(shift));
  SF_CHECK_TYPE(shift.scalar_type() == rt, op, ": shift must be ", dtype_name(rt), " (the real dtype of H), got ",
                dtype_name(shift.scalar_type()));
  SF_CHECK_VALUE(shift.device() == H.device(), op, ": shift must be on H's device");
  Tensor info = zeros({H.size(0)}, kInt, H.device());
  if (H.size(0) == 0 || H.size(1) == 0) return info;
  const Tensor Hc = torch::stable::contiguous(H), sc = torch::stable::contiguous(shift);
  if (st == kComplexFloat)
    run<float>(Hc, sc, info);
  else
    run<double>(Hc, sc, info);
  return info;
}

}  // namespace specreg_fast

STABLE_TORCH_LIBRARY_IMPL(specreg_fast, CPU, m) {
  m.impl("shifted_cholesky_info", TORCH_BOX(&specreg_fast::shifted_cholesky_info_impl));
}
