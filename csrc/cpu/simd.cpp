#include "simd.h"

#include <bit>

#include <torch/headeronly/util/Half.h>

namespace specreg_fast {
namespace cpu {

#define SPECREG_DEFINE_FUSED_ROWS(NAME, T)                                                           \
  SPECREG_MULTIVERSION void NAME(const T* W, int64_t ld, int64_t nrows, int64_t n, const T* v, T* t, \
                                 T* acc) {                                                           \
    int64_t i = 0;                                                                                   \
    for (; i + 4 <= nrows; i += 4) {                                                                 \
      const T* w0 = W + i * ld;                                                                      \
      const T* w1 = w0 + ld;                                                                         \
      const T* w2 = w1 + ld;                                                                         \
      const T* w3 = w2 + ld;                                                                         \
      T s0 = 0, s1 = 0, s2 = 0, s3 = 0;                                                              \
      _Pragma("omp simd reduction(+ : s0, s1, s2, s3)") for (int64_t j = 0; j < n; ++j) {           \
        const T vj = v[j];                                                                           \
        s0 += w0[j] * vj;                                                                            \
        s1 += w1[j] * vj;                                                                            \
        s2 += w2[j] * vj;                                                                            \
        s3 += w3[j] * vj;                                                                            \
      }                                                                                              \
      t[i] = s0;                                                                                     \
      t[i + 1] = s1;                                                                                 \
      t[i + 2] = s2;                                                                                 \
      t[i + 3] = s3;                                                                                 \
      _Pragma("omp simd") for (int64_t j = 0; j < n; ++j) {                                          \
        acc[j] += s0 * w0[j] + s1 * w1[j] + s2 * w2[j] + s3 * w3[j];                                 \
      }                                                                                              \
    }                                                                                                \
    for (; i < nrows; ++i) {                                                                         \
      const T* w0 = W + i * ld;                                                                      \
      T s0 = 0;                                                                                      \
      _Pragma("omp simd reduction(+ : s0)") for (int64_t j = 0; j < n; ++j) s0 += w0[j] * v[j];     \
      t[i] = s0;                                                                                     \
      _Pragma("omp simd") for (int64_t j = 0; j < n; ++j) acc[j] += s0 * w0[j];                      \
    }                                                                                                \
  }

SPECREG_DEFINE_FUSED_ROWS(fused_rows_f32, float)
SPECREG_DEFINE_FUSED_ROWS(fused_rows_f64, double)

#define SPECREG_DEFINE_BILINEAR_ROWS(NAME, T)                                                       \
  SPECREG_MULTIVERSION T NAME(const T* W, int64_t ld, int64_t nrows, int64_t n, const T* u,         \
                              const T* v) {                                                         \
    T total = 0;                                                                                    \
    for (int64_t i = 0; i < nrows; ++i) {                                                           \
      const T* w = W + i * ld;                                                                      \
      T s = 0;                                                                                      \
      _Pragma("omp simd reduction(+ : s)") for (int64_t j = 0; j < n; ++j) s += w[j] * v[j];       \
      total += u[i] * s;                                                                            \
    }                                                                                               \
    return total;                                                                                   \
  }

SPECREG_DEFINE_BILINEAR_ROWS(bilinear_rows_f32, float)
SPECREG_DEFINE_BILINEAR_ROWS(bilinear_rows_f64, double)

SPECREG_MULTIVERSION void widen_rows_bf16(const uint16_t* src, int64_t ld, int64_t nrows, int64_t n,
                                          float* dst) {
  for (int64_t i = 0; i < nrows; ++i) {
    const uint16_t* s = src + i * ld;
    float* d = dst + i * n;
    // bfloat16 is the top half of a float32: widening is a 16-bit shift.
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      d[j] = std::bit_cast<float>(static_cast<uint32_t>(s[j]) << 16);
    }
  }
}

void widen_rows_f16(const uint16_t* src, int64_t ld, int64_t nrows, int64_t n, float* dst) {
  for (int64_t i = 0; i < nrows; ++i) {
    const uint16_t* s = src + i * ld;
    float* d = dst + i * n;
    for (int64_t j = 0; j < n; ++j) d[j] = torch::headeronly::detail::fp16_ieee_to_fp32_value(s[j]);
  }
}

#define SPECREG_DEFINE_DOT(NAME, T)                                                             \
  SPECREG_MULTIVERSION T NAME(const T* a, const T* b, int64_t n) {                              \
    T s = 0;                                                                                    \
    _Pragma("omp simd reduction(+ : s)") for (int64_t j = 0; j < n; ++j) s += a[j] * b[j];     \
    return s;                                                                                   \
  }
SPECREG_DEFINE_DOT(dot_f32, float)
SPECREG_DEFINE_DOT(dot_f64, double)

#define SPECREG_DEFINE_AXPY(NAME, T)                                                 \
  SPECREG_MULTIVERSION void NAME(T alpha, const T* x, T* y, int64_t n) {             \
    _Pragma("omp simd") for (int64_t j = 0; j < n; ++j) y[j] += alpha * x[j];        \
  }
SPECREG_DEFINE_AXPY(axpy_f32, float)
SPECREG_DEFINE_AXPY(axpy_f64, double)

}  // namespace cpu
}  // namespace specreg_fast
