// Hot loops of the CPU kernels, compiled once per ISA and picked at load time.
//
// Wheels are built without -march=native, so the hot functions carry GCC's
// target_clones attribute: the compiler emits an AVX-512, an AVX2+FMA and a baseline
// clone of each and an ifunc resolver chooses the best one for the running CPU. The
// loops are written so that `#pragma omp simd` vectorizes the reductions without
// -ffast-math; each clone's summation order is fixed, so results are deterministic on a
// given machine.
//
// SPECREG_GENERIC_ONLY (setup.py: SPECREG_FAST_GENERIC=1) compiles the baseline path alone:
// no clones here and no AVX-512 conv tiles (csrc/cpu/conv_gemm_cpu.cpp), so the tests can run
// on the code a CPU without AVX2 would run.
#pragma once
#include <cstdint>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(SPECREG_GENERIC_ONLY)
#define SPECREG_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SPECREG_MULTIVERSION
#endif

namespace specreg_fast {
namespace cpu {

// One read of the rows [0, nrows) of a row-major block W (leading dimension ld, n columns):
//   t[i] = <W_i, v>   and   acc += sum_i t[i] * W_i
// i.e. the row-block contribution to W^T (W v). Rows are taken four at a time so that v is
// read once per four rows and acc is updated once per four rows.
void fused_rows_f32(const float* W, int64_t ld, int64_t nrows, int64_t n, const float* v, float* t,
                    float* acc);
void fused_rows_f64(const double* W, int64_t ld, int64_t nrows, int64_t n, const double* v, double* t,
                    double* acc);

// sum_i u[i] * <W_i, v> over the rows [0, nrows) of a row-major block.
float bilinear_rows_f32(const float* W, int64_t ld, int64_t nrows, int64_t n, const float* u, const float* v);
double bilinear_rows_f64(const double* W, int64_t ld, int64_t nrows, int64_t n, const double* u,
                         const double* v);

// Widen a block of reduced-precision rows into float scratch (dst is nrows x n, dense).
void widen_rows_bf16(const uint16_t* src, int64_t ld, int64_t nrows, int64_t n, float* dst);
void widen_rows_f16(const uint16_t* src, int64_t ld, int64_t nrows, int64_t n, float* dst);

float dot_f32(const float* a, const float* b, int64_t n);
double dot_f64(const double* a, const double* b, int64_t n);
void axpy_f32(float alpha, const float* x, float* y, int64_t n);
void axpy_f64(double alpha, const double* x, double* y, int64_t n);

}  // namespace cpu
}  // namespace specreg_fast
