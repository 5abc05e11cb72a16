// Direct single-image conv kernels for the power step and the sigma backward (see
// conv_gemm.h for why).
//
// Layout: the weight of group gi is a row-major (C_out/G) x Kg matrix, Kg = (C_in/G) prod(k);
// cols = im2col(x) is (G Kg) x L with rows ordered (c_in, k_d, k_h, k_w) as the weight's
// columns and L = prod(out) output pixels, so
//     phase A   t[r, :]            = sum_k W[r, k] cols[gi Kg + k, :]      (r in group gi)
//     phase B   gcols[gi Kg + k, :] = sum_r W[r, k] t[r, :]
// and a = col2im(gcols). Both phases are one microkernel: an MR x (16 NV) output tile in
// registers, out[i, c] = sum_j A[i sai + j saj] B[j ldb + c], with A a weight entry broadcast
// (phase A walks MR weight rows, phase B MR consecutive entries of one row) and B a row of
// cols or t. Column tails are masked, not padded, so t is written straight into the output.
// The weight-gradient of <y, A x> (conv_weight_grad) is the same microkernel once more:
// dW = y cols^T per group (see weight_grad for which operand is transposed).
#include "conv_gemm.h"


#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(SPECREG_GENERIC_ONLY)  // csrc/cpu/simd.h
#include <immintrin.h>
#define SPECREG_HAVE_X86_KERNELS 1  // AVX-512 and AVX2 microkernels, picked at run time
#else
#define SPECREG_HAVE_X86_KERNELS 0
#endif

namespace specreg_fast {
namespace cpu {

using conv_detail::ConvGeom;
using conv_detail::PadMode;

namespace {

// The geometry as 3 spatial dims (leading dims of size 1 for Conv1d/2d). src[j][kk out + o]
// is the input index that kernel offset kk reads for output position o along dim j, through
// the padding map (wrap for circular, mirror for reflect, clamp for replicate), or -1 for a
// zero-padding entry: im2col gathers through it and col2im scatters back through it, which is
// the exact adjoint of pad-then-convolve for every mode.
//
// Along the innermost dim, kernel offset kw reads input index ow s + kw dl - lo for every ow in
// [run_lo[kw], run_hi[kw]) (the part of the row inside the image): im2col copies that run
// with a plain (for stride 1, contiguous) loop and col2im adds it back likewise; only the few
// border entries go through src. On small images the per-entry index lookup cost as much as
// the GEMMs themselves.
struct Geo3 {
  int64_t in[3], out[3], k[3], s[3], dl[3], lo[3];
  int64_t cin, cout, G, cin_g, cout_g, kvol, Kg, L, in_vol;
  std::vector<int64_t> src[3];
  std::vector<int64_t> run_lo, run_hi;
  // Images with short output rows (out[2] < kGatherRow): for each kernel offset and output
  // pixel, kvol x L, the input entry it reads within a channel, or -1 for padding. The same
  // for every channel, so im2col and col2im become one flat loop per channel; with rows of a
  // few entries the run-based copies spent their time on per-row set-up (RegNetX's grouped
  // 3x3 layers at 2x2 and 4x4: im2col and col2im took 3x the GEMMs' time). Built per call,
  // and read once per channel: only while it stays small (kvol L <= kGatherMax; a Conv3d with
  // short rows but many of them keeps the run-based copies).
  std::vector<int64_t> gather;
};

constexpr int64_t kGatherRow = 8;
constexpr int64_t kGatherMax = int64_t{1} << 15;

int64_t padded_source(PadMode mode, int64_t p, int64_t n) {
  if (p >= 0 && p < n) return p;
  switch (mode) {
    case PadMode::Zeros: return -1;
    case PadMode::Circular: return ((p % n) + n) % n;
    case PadMode::Reflect: return p < 0 ? -p : 2 * (n - 1) - p;
    case PadMode::Replicate: return p < 0 ? 0 : n - 1;
  }
  return -1;
}

Geo3 make_geo3(const ConvGeom& g, const Tensor& W, const Tensor& x) {
  Geo3 q{};
  const int64_t off = 3 - g.d;
  for (int64_t i = 0; i < 3; ++i) {
    q.in[i] = q.out[i] = q.k[i] = q.s[i] = q.dl[i] = 1;
    q.lo[i] = 0;
  }
  q.kvol = 1;
  q.in_vol = 1;
  q.L = 1;
  for (int64_t i = 0; i < g.d; ++i) {
    const int64_t j = off + i;
    q.in[j] = x.size(2 + i);
    q.k[j] = W.size(2 + i);
    q.s[j] = g.stride[i];
    q.dl[j] = g.dilation[i];
    q.lo[j] = g.lo[i];
    // validated (conv_geometry.h output_shape): in + lo + hi >= extent, nothing overflows
    q.out[j] = (q.in[j] + g.lo[i] + g.hi[i] - g.extent[i]) / q.s[j] + 1;
  }
  for (int64_t j = 0; j < 3; ++j) {
    q.kvol *= q.k[j];
    q.in_vol *= q.in[j];
    q.L *= q.out[j];
  }
  q.G = g.groups;
  q.cout = W.size(0);
  q.cin_g = W.size(1);
  q.cin = q.cin_g * q.G;
  q.cout_g = q.cout / q.G;
  q.Kg = q.cin_g * q.kvol;
  for (int64_t j = 0; j < 3; ++j) {
    q.src[j].resize(q.k[j] * q.out[j]);
    for (int64_t kk = 0; kk < q.k[j]; ++kk)
      for (int64_t o = 0; o < q.out[j]; ++o)
        q.src[j][kk * q.out[j] + o] = padded_source(g.mode, o * q.s[j] + kk * q.dl[j] - q.lo[j], q.in[j]);
  }
  q.run_lo.resize(q.k[2]);
  q.run_hi.resize(q.k[2]);
  for (int64_t kk = 0; kk < q.k[2]; ++kk) {
    // 0 <= o s + kk dl - lo < in  <=>  o in [ceil((lo - kk dl) / s), floor((in - 1 + lo - kk dl) / s)]
    const int64_t base = kk * q.dl[2] - q.lo[2];
    // (ceil of -base / s without forming -base + s - 1, which can pass 2^63 for huge strides)
    const int64_t first = base >= 0 ? 0 : -base / q.s[2] + (-base % q.s[2] != 0);
    const int64_t last = q.in[2] - 1 - base < 0 ? -1 : (q.in[2] - 1 - base) / q.s[2];
    const int64_t a = std::min(first, q.out[2]);
    q.run_lo[kk] = a;
    q.run_hi[kk] = std::max(a, std::min(last + 1, q.out[2]));
  }
  if (q.out[2] < kGatherRow && q.kvol * q.L <= kGatherMax) {
    q.gather.resize(q.kvol * q.L);
    int64_t* gp = q.gather.data();
    for (int64_t kd = 0; kd < q.k[0]; ++kd)
      for (int64_t kh = 0; kh < q.k[1]; ++kh)
        for (int64_t kw = 0; kw < q.k[2]; ++kw)
          for (int64_t od = 0; od < q.out[0]; ++od)
            for (int64_t oh = 0; oh < q.out[1]; ++oh)
              for (int64_t ow = 0; ow < q.out[2]; ++ow) {
                const int64_t sd = q.src[0][kd * q.out[0] + od], sh = q.src[1][kh * q.out[1] + oh],
                              sw = q.src[2][kw * q.out[2] + ow];
                *gp++ = (sd < 0 || sh < 0 || sw < 0) ? -1 : (sd * q.in[1] + sh) * q.in[2] + sw;
              }
  }
  return q;
}

template <typename T>
void im2col(const Geo3& q, const T* x, T* cols) {
  if (!q.gather.empty()) {
    const int64_t n = q.kvol * q.L;
    const int64_t* gp = q.gather.data();
    torch::stable::parallel_for(0, q.cin, std::max<int64_t>(1, 16384 / n), [&](int64_t b, int64_t e) {
      for (int64_t ci = b; ci < e; ++ci) {
        const T* src = x + ci * q.in_vol;
        T* dst = cols + ci * n;
        for (int64_t r = 0; r < n; ++r) dst[r] = gp[r] >= 0 ? src[gp[r]] : T(0);
      }
    });
    return;
  }
  const int64_t rows = q.cin * q.kvol;
  torch::stable::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, q.L)), [&](int64_t b, int64_t e) {
    for (int64_t row = b; row < e; ++row) {
      const int64_t ci = row / q.kvol, kr = row % q.kvol;
      const int64_t kd = kr / (q.k[1] * q.k[2]), kh = (kr / q.k[2]) % q.k[1], kw = kr % q.k[2];
      const T* src = x + ci * q.in_vol;
      T* dst = cols + row * q.L;
      const int64_t* sd = q.src[0].data() + kd * q.out[0];
      const int64_t* sh = q.src[1].data() + kh * q.out[1];
      const int64_t* sw = q.src[2].data() + kw * q.out[2];
      const int64_t a = q.run_lo[kw], b = q.run_hi[kw], st = q.s[2];
      // input index of ow = a (only for a non-empty run: a = out could overflow a * st)
      const int64_t first = b > a ? a * st + kw * q.dl[2] - q.lo[2] : 0;
      for (int64_t od = 0; od < q.out[0]; ++od) {
        for (int64_t oh = 0; oh < q.out[1]; ++oh) {
          T* d = dst + (od * q.out[1] + oh) * q.out[2];
          if (sd[od] < 0 || sh[oh] < 0) {
            std::fill(d, d + q.out[2], T(0));
            continue;
          }
          const T* srow = src + (sd[od] * q.in[1] + sh[oh]) * q.in[2];
          for (int64_t ow = 0; ow < a; ++ow) d[ow] = sw[ow] >= 0 ? srow[sw[ow]] : T(0);
          const T* sp = srow + first;
          if (st == 1) {
            std::memcpy(d + a, sp, (b - a) * sizeof(T));
          } else if (st == 2) {  // a literal stride: the compiler vectorizes it (even lanes)
            for (int64_t i = 0; i < b - a; ++i) d[a + i] = sp[2 * i];
          } else {
            for (int64_t i = 0; i < b - a; ++i) d[a + i] = sp[i * st];
          }
          for (int64_t ow = b; ow < q.out[2]; ++ow) d[ow] = sw[ow] >= 0 ? srow[sw[ow]] : T(0);
        }
      }
    }
  });
}

// a[ci] = sum over the kernel offsets of the gcols rows of ci scattered back (adjoint of
// im2col). One input channel per task: every entry of a has one writer, fixed order.
template <typename T>
void col2im(const Geo3& q, const T* gcols, T* a) {
  if (!q.gather.empty()) {  // the same order: kernel offsets, then output pixels
    const int64_t n = q.kvol * q.L;
    const int64_t* gp = q.gather.data();
    torch::stable::parallel_for(0, q.cin, std::max<int64_t>(1, 16384 / n), [&](int64_t b, int64_t e) {
      for (int64_t ci = b; ci < e; ++ci) {
        T* dst = a + ci * q.in_vol;
        const T* src = gcols + ci * n;
        std::fill(dst, dst + q.in_vol, T(0));
        for (int64_t r = 0; r < n; ++r)
          if (gp[r] >= 0) dst[gp[r]] += src[r];
      }
    });
    return;
  }
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, q.kvol * q.L));
  torch::stable::parallel_for(0, q.cin, grain, [&](int64_t b, int64_t e) {
    for (int64_t ci = b; ci < e; ++ci) {
      T* dst = a + ci * q.in_vol;
      std::fill(dst, dst + q.in_vol, T(0));
      for (int64_t kr = 0; kr < q.kvol; ++kr) {
        const int64_t kd = kr / (q.k[1] * q.k[2]), kh = (kr / q.k[2]) % q.k[1], kw = kr % q.k[2];
        const T* src = gcols + (ci * q.kvol + kr) * q.L;
        const int64_t* sd = q.src[0].data() + kd * q.out[0];
        const int64_t* sh = q.src[1].data() + kh * q.out[1];
        const int64_t* sw = q.src[2].data() + kw * q.out[2];
        const int64_t a = q.run_lo[kw], b = q.run_hi[kw], st = q.s[2];
        const int64_t first = b > a ? a * st + kw * q.dl[2] - q.lo[2] : 0;
        for (int64_t od = 0; od < q.out[0]; ++od) {
          if (sd[od] < 0) continue;
          for (int64_t oh = 0; oh < q.out[1]; ++oh) {
            if (sh[oh] < 0) continue;
            const T* s = src + (od * q.out[1] + oh) * q.out[2];
            T* drow = dst + (sd[od] * q.in[1] + sh[oh]) * q.in[2];
            // fixed order: left border, the run, right border (as im2col reads them)
            for (int64_t ow = 0; ow < a; ++ow)
              if (sw[ow] >= 0) drow[sw[ow]] += s[ow];
            T* dp = drow + first;
            const T* sa = s + a;
            if (st == 1) {
#pragma omp simd
              for (int64_t i = 0; i < b - a; ++i) dp[i] += sa[i];
            } else if (st == 2) {
              for (int64_t i = 0; i < b - a; ++i) dp[2 * i] += sa[i];
            } else {
              for (int64_t i = 0; i < b - a; ++i) dp[i * st] += sa[i];
            }
            for (int64_t ow = b; ow < q.out[2]; ++ow)
              if (sw[ow] >= 0) drow[sw[ow]] += s[ow];
          }
        }
      }
    }
  });
}

// ---- microkernels: out[i, c] = sum_j A[i sai + j saj] B[j ldb + c], i < MR, c < nc --------

// Portable version (float64, and float32 on CPUs without AVX-512): a 16-wide column tile.
template <typename T, int MR>
void tile_generic(const T* A, int64_t sai, int64_t saj, const T* B, int64_t ldb, int64_t J, T* out, int64_t ldo,
                  int64_t nc, bool accumulate) {
  constexpr int CW = 16;
  T acc[MR][CW] = {};
  if (accumulate)
    for (int i = 0; i < MR; ++i)
      for (int64_t c = 0; c < nc; ++c) acc[i][c] = out[i * ldo + c];
  T b[CW] = {};
  for (int64_t j = 0; j < J; ++j) {
    const T* bj = B + j * ldb;
    for (int64_t c = 0; c < nc; ++c) b[c] = bj[c];
    for (int i = 0; i < MR; ++i) {
      const T av = A[i * sai + j * saj];
#pragma omp simd
      for (int c = 0; c < CW; ++c) acc[i][c] += av * b[c];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int64_t c = 0; c < nc; ++c) out[i * ldo + c] = acc[i][c];
}

template <typename T>
void rows_generic(const T* A, int64_t sai, int64_t saj, const T* B, int64_t ldb, int64_t J, T* out, int64_t ldo,
                  int64_t nrows, int64_t ncols, bool accumulate) {
  constexpr int MR = 4;
  for (int64_t c0 = 0; c0 < ncols; c0 += 16) {
    const int64_t nc = std::min<int64_t>(16, ncols - c0);
    int64_t i = 0;
    for (; i + MR <= nrows; i += MR)
      tile_generic<T, MR>(A + i * sai, sai, saj, B + c0, ldb, J, out + i * ldo + c0, ldo, nc, accumulate);
    for (; i < nrows; ++i)
      tile_generic<T, 1>(A + i * sai, sai, saj, B + c0, ldb, J, out + i * ldo + c0, ldo, nc, accumulate);
  }
}

#if SPECREG_HAVE_X86_KERNELS
template <int MR, int NV>
__attribute__((target("avx512f,fma"))) void tile_avx512(const float* A, int64_t sai, int64_t saj, const float* B,
                                                       int64_t ldb, int64_t J, float* out, int64_t ldo, int64_t nc,
                                                       bool accumulate) {
  __m512 acc[MR][NV];
  __mmask16 mask[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const int64_t left = nc - 16 * v;
    mask[v] = left >= 16 ? static_cast<__mmask16>(0xFFFF)
                         : static_cast<__mmask16>(left <= 0 ? 0 : ((1u << left) - 1u));
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      acc[i][v] = accumulate ? _mm512_maskz_loadu_ps(mask[v], out + i * ldo + 16 * v) : _mm512_setzero_ps();
  for (int64_t j = 0; j < J; ++j) {
    __m512 b[NV];
    const float* bj = B + j * ldb;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = _mm512_maskz_loadu_ps(mask[v], bj + 16 * v);
    const float* aj = A + j * saj;
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const __m512 av = _mm512_set1_ps(aj[i * sai]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(av, b[v], acc[i][v]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_mask_storeu_ps(out + i * ldo + 16 * v, mask[v], acc[i][v]);
}

// The same tile on 8-wide AVX2 registers (16 of them, not 32: MR x NV accumulators, NV row
// loads and one broadcast must fit). Full tiles use plain loads and stores; only a column tail
// takes AVX's lane-mask loads, and its stores go through the stack: a masked store is
// microcoded on some CPUs (tens of cycles on AMD Zen 2), and the weight-gradient stores a tile
// per few FMAs, as does every tile of a layer whose image has fewer than 8 output pixels.
template <int MR, int NV, bool FULL>
__attribute__((target("avx2,fma"))) inline void tile_avx2_body(const float* A, int64_t sai, int64_t saj,
                                                              const float* B, int64_t ldb, int64_t J, float* out,
                                                              int64_t ldo, const __m256i* mask, const int64_t* left,
                                                              bool accumulate) {
  __m256 acc[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      acc[i][v] = !accumulate ? _mm256_setzero_ps()
                  : FULL      ? _mm256_loadu_ps(out + i * ldo + 8 * v)
                              : _mm256_maskload_ps(out + i * ldo + 8 * v, mask[v]);
  for (int64_t j = 0; j < J; ++j) {
    __m256 b[NV];
    const float* bj = B + j * ldb;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = FULL ? _mm256_loadu_ps(bj + 8 * v) : _mm256_maskload_ps(bj + 8 * v, mask[v]);
    const float* aj = A + j * saj;
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const __m256 av = _mm256_broadcast_ss(aj + i * sai);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm256_fmadd_ps(av, b[v], acc[i][v]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      if (FULL) {
        _mm256_storeu_ps(out + i * ldo + 8 * v, acc[i][v]);
      } else {  // through the stack: a masked store is the microcoded one
        alignas(32) float lanes[8];
        _mm256_store_ps(lanes, acc[i][v]);
        for (int64_t c = 0; c < left[v]; ++c) out[i * ldo + 8 * v + c] = lanes[c];
      }
    }
}

template <int MR, int NV>
__attribute__((target("avx2,fma"))) void tile_avx2(const float* A, int64_t sai, int64_t saj, const float* B,
                                                  int64_t ldb, int64_t J, float* out, int64_t ldo, int64_t nc,
                                                  bool accumulate) {
  static_assert(MR * NV + NV + 1 <= 16, "the tile must fit AVX2's 16 registers");
  if (nc == 8 * NV) return tile_avx2_body<MR, NV, true>(A, sai, saj, B, ldb, J, out, ldo, nullptr, nullptr, accumulate);
  __m256i mask[NV];
  int64_t left[NV];  // valid lanes of each vector of the tile's row
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    left[v] = std::min<int64_t>(8, std::max<int64_t>(0, nc - 8 * v));
    mask[v] = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(left[v])), lane);
  }
  tile_avx2_body<MR, NV, false>(A, sai, saj, B, ldb, J, out, ldo, mask, left, accumulate);
}

enum class Isa { Avx512, Avx2 };
template <Isa I>
constexpr int64_t lanes() { return I == Isa::Avx512 ? 16 : 8; }

template <Isa I, int MR, int NV>
void tile_x86(const float* A, int64_t sai, int64_t saj, const float* B, int64_t ldb, int64_t J, float* out,
              int64_t ldo, int64_t nc, bool accumulate) {
  if constexpr (I == Isa::Avx512) tile_avx512<MR, NV>(A, sai, saj, B, ldb, J, out, ldo, nc, accumulate);
  else tile_avx2<MR, NV>(A, sai, saj, B, ldb, J, out, ldo, nc, accumulate);
}

// A tile of m < MR rows: the same kernel instantiated for m (one switch, no scalar tail).
template <Isa I, int NV, int M>
void tile_tail(int m, const float* A, int64_t sai, int64_t saj, const float* B, int64_t ldb, int64_t J, float* out,
               int64_t ldo, int64_t nc, bool accumulate) {
  if constexpr (M >= 1) {
    if (m == M) return tile_x86<I, M, NV>(A, sai, saj, B, ldb, J, out, ldo, nc, accumulate);
    return tile_tail<I, NV, M - 1>(m, A, sai, saj, B, ldb, J, out, ldo, nc, accumulate);
  }
}

template <Isa I, int MR, int NV>
void rows_x86(const float* A, int64_t sai, int64_t saj, const float* B, int64_t ldb, int64_t J, float* out,
              int64_t ldo, int64_t nrows, int64_t ncols, bool accumulate) {
  constexpr int64_t CW = lanes<I>() * NV;
  for (int64_t c0 = 0; c0 < ncols; c0 += CW) {
    const int64_t nc = std::min<int64_t>(CW, ncols - c0);
    int64_t i = 0;
    for (; i + MR <= nrows; i += MR)
      tile_x86<I, MR, NV>(A + i * sai, sai, saj, B + c0, ldb, J, out + i * ldo + c0, ldo, nc, accumulate);
    if (i < nrows)
      tile_tail<I, NV, MR - 1>(static_cast<int>(nrows - i), A + i * sai, sai, saj, B + c0, ldb, J,
                               out + i * ldo + c0, ldo, nc, accumulate);
  }
}

bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
  return has;
}

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#endif

// The widest tile ISA this CPU has, capped by SPECREG_FAST_CONV_ISA (read once: avx512, avx2 or
// generic; auto or unset is no cap), so that a machine with AVX-512 can run, and test, the
// tiles a CPU with only AVX2, or with neither, runs.
enum class TileIsa { Avx512, Avx2, Generic, Invalid };

TileIsa isa_cap() {
  static const TileIsa cap = [] {
    const char* v = std::getenv("SPECREG_FAST_CONV_ISA");
    const std::string s(v == nullptr ? "" : v);
    if (s.empty() || s == "auto" || s == "avx512") return TileIsa::Avx512;
    if (s == "avx2") return TileIsa::Avx2;
    if (s == "generic") return TileIsa::Generic;
    return TileIsa::Invalid;
  }();
  return cap;
}

TileIsa tile_isa() {
  const TileIsa cap = isa_cap();
#if SPECREG_HAVE_X86_KERNELS
  if (cap == TileIsa::Avx512 && cpu_has_avx512()) return TileIsa::Avx512;
  if ((cap == TileIsa::Avx512 || cap == TileIsa::Avx2) && cpu_has_avx2()) return TileIsa::Avx2;
#endif
  (void)cap;
  return TileIsa::Generic;
}

// Rows per task and the row-range kernel for this column count. `phase_b` reads MR
// consecutive weight entries per broadcast (one cache line at MR = 16).
struct RowKernel {
  int64_t mr, cw;  // rows and columns of one task's output tile
  void (*f32)(const float*, int64_t, int64_t, const float*, int64_t, int64_t, float*, int64_t, int64_t, int64_t,
              bool);
};

RowKernel pick_kernel(int64_t ncols, bool phase_b) {
#if SPECREG_HAVE_X86_KERNELS
  const TileIsa isa = tile_isa();
  if (isa == TileIsa::Avx512) {
    constexpr Isa I = Isa::Avx512;
    const int64_t nv = std::min<int64_t>(4, (ncols + 15) / 16);
    if (phase_b) {
      if (nv == 1) return {16, 16, &rows_x86<I, 16, 1>};
      if (nv == 2) return {8, 32, &rows_x86<I, 8, 2>};
      return {6, 64, &rows_x86<I, 6, 4>};
    }
    if (nv == 1) return {12, 16, &rows_x86<I, 12, 1>};
    if (nv == 2) return {8, 32, &rows_x86<I, 8, 2>};
    return {6, 64, &rows_x86<I, 6, 4>};
  }
  if (isa == TileIsa::Avx2) {  // 16 registers: at most 12 accumulators
    constexpr Isa I = Isa::Avx2;
    if (ncols <= 8) return {12, 8, &rows_x86<I, 12, 1>};
    return {6, 16, &rows_x86<I, 6, 2>};
  }
#endif
  (void)ncols;
  (void)phase_b;
  return {4, 16, &rows_generic<float>};
}

template <typename T>
void run_rows(const RowKernel& k, const T* A, int64_t sai, int64_t saj, const T* B, int64_t ldb, int64_t J, T* out,
              int64_t ldo, int64_t nrows, int64_t ncols, bool accumulate) {
  if constexpr (std::is_same_v<T, float>) {
    k.f32(A, sai, saj, B, ldb, J, out, ldo, nrows, ncols, accumulate);
  } else {
    rows_generic<T>(A, sai, saj, B, ldb, J, out, ldo, nrows, ncols, accumulate);
  }
}

// out = A B (accumulate: out += A B) for each group's (rows x J) by (J x ncols) product, as tasks of (column tile, row
// tile). Where out is taller than B (rows > J: phase B, and the weight-gradient, whose J is the
// pixel count) the row tile is outer: a thread's consecutive tasks walk along rows of out and A
// while the small B stays in cache, and out is written in contiguous runs. Else the column tile
// is outer: consecutive tasks share the same columns of a large B, which stay in L2 while the
// A rows stream past them. Measured on ResNet-50's 512x512 3x3 layers at 2x2 (AVX2, 2
// threads): the weight-gradient 2.5 -> 1.0 ms and the step 1.3 -> 0.8 ms with the row tile outer.
template <typename T>
void grouped_product(const RowKernel& k, int64_t G, int64_t rows, int64_t J, int64_t ncols, const T* A, int64_t sai,
                     int64_t saj, int64_t a_group, const T* B, int64_t ldb, int64_t b_group, T* out, int64_t ldo,
                     int64_t out_group, bool accumulate = false) {
  const int64_t row_tiles = (rows + k.mr - 1) / k.mr, col_tiles = (ncols + k.cw - 1) / k.cw;
  // At least ~64K multiply-adds per thread: below that a parallel region's fork and join
  // cost more than the arithmetic (tiny layers run inline on the calling thread).
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, k.mr * k.cw * J));
  const bool rows_outer = rows > J;
  torch::stable::parallel_for(0, G * col_tiles * row_tiles, grain, [&](int64_t b, int64_t e) {
    for (int64_t task = b; task < e; ++task) {
      const int64_t gi = task / (col_tiles * row_tiles), rest = task % (col_tiles * row_tiles);
      const int64_t c0 = (rows_outer ? rest % col_tiles : rest / row_tiles) * k.cw;
      const int64_t r0 = (rows_outer ? rest / col_tiles : rest % row_tiles) * k.mr;
      const int64_t nr = std::min<int64_t>(k.mr, rows - r0), nc = std::min<int64_t>(k.cw, ncols - c0);
      run_rows<T>(k, A + gi * a_group + r0 * sai, sai, saj, B + gi * b_group + c0, ldb, J,
                  out + gi * out_group + r0 * ldo + c0, ldo, nr, nc, accumulate);
    }
  });
}

template <typename T>
void step(const Geo3& q, const T* W, const T* x, T* t, T* a, T* cols, T* gcols) {
  im2col<T>(q, x, cols);
  // Phase A: t = W cols (per group: rows are output channels, J = Kg).
  grouped_product<T>(pick_kernel(q.L, false), q.G, q.cout_g, q.Kg, q.L, W, q.Kg, 1, q.cout_g * q.Kg, cols, q.L,
                     q.Kg * q.L, t, q.L, q.cout_g * q.L);
  // Phase B: gcols = W^T t (per group: rows are weight columns, J = C_out / G).
  grouped_product<T>(pick_kernel(q.L, true), q.G, q.Kg, q.cout_g, q.L, W, 1, q.Kg, q.cout_g * q.Kg, t, q.L,
                     q.cout_g * q.L, gcols, q.L, q.Kg * q.L);
  col2im<T>(q, gcols, a);
}

// dst[c ldd + r] = src[r lds + c] for r < rows, c < cols, in 16 x 16 blocks (both sides of a
// block stay in L1; a plain loop has one side miss on every entry).
// (accumulate: dst += the transpose)
template <typename T>
void transpose(const T* src, int64_t rows, int64_t cols, int64_t lds, T* dst, int64_t ldd, bool accumulate = false) {
  constexpr int64_t B = 16;
  for (int64_t r0 = 0; r0 < rows; r0 += B)
    for (int64_t c0 = 0; c0 < cols; c0 += B) {
      const int64_t r1 = std::min(rows, r0 + B), c1 = std::min(cols, c0 + B);
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = r0; r < r1; ++r) dst[c * ldd + r] = (accumulate ? dst[c * ldd + r] : T(0)) + src[r * lds + c];
    }
}

// dW = y cols^T per group (cols = the plain im2col, K x L). The microkernel wants its B
// operand row-major, so one side is transposed first, whichever moves fewer entries:
//   by rows:  dW   = y  (cols^T)   B = cols^T (L x K): transposes K L entries;
//   by cols:  dW^T = cols (y^T)    B = y^T (L x C_out), then dW^T back: C_out (L + Kg).
// Small images with wide layers (512 -> 512 at 4x4: K L = 74K against 2.4M) go by rows;
// large images with few channels (64 -> 64 at 32x32: 590K against 102K) by cols. Measured
// on the ResNet-18/CIFAR shapes, the wrong choice costs up to 9x on the first kind.
bool weight_grad_by_rows(const Geo3& q) { return q.G * q.Kg * q.L <= q.cout * (q.L + q.Kg); }

template <typename T>
void weight_grad(const Geo3& q, const T* y, const T* cols, T* scratch, T* gw, bool accumulate) {
  const int64_t K = q.G * q.Kg;
  if (weight_grad_by_rows(q)) {
    T* cols_t = scratch;  // L x K
    transpose<T>(cols, K, q.L, q.L, cols_t, K);
    grouped_product<T>(pick_kernel(q.Kg, false), q.G, q.cout_g, q.L, q.Kg, y, q.L, 1, q.cout_g * q.L, cols_t, K,
                       q.Kg, gw, q.Kg, q.cout_g * q.Kg, accumulate);
    return;
  }
  T* yT = scratch;                 // L x C_out
  T* gwT = scratch + q.L * q.cout;  // per group Kg x C_out/G
  transpose<T>(y, q.cout, q.L, q.L, yT, q.cout);
  grouped_product<T>(pick_kernel(q.cout_g, false), q.G, q.Kg, q.L, q.cout_g, cols, q.L, 1, q.Kg * q.L, yT, q.cout,
                     q.cout_g, gwT, q.cout_g, q.Kg * q.cout_g);
  for (int64_t gi = 0; gi < q.G; ++gi)
    transpose<T>(gwT + gi * q.Kg * q.cout_g, q.Kg, q.cout_g, q.cout_g, gw + gi * q.cout_g * q.Kg, q.Kg, accumulate);
}

enum class KernelChoice { Auto, Direct, Aten, Invalid };

KernelChoice parse_kernel_choice(const char* v) {
  const std::string s(v == nullptr ? "" : v);
  if (s.empty() || s == "auto") return KernelChoice::Auto;
  if (s == "direct") return KernelChoice::Direct;
  if (s == "aten") return KernelChoice::Aten;
  return KernelChoice::Invalid;
}

// Read from the environment once (a getenv per call cost a libc scan of the environment on
// every conv op), then only replaced by set_conv_kernel.
std::atomic<KernelChoice>& kernel_choice() {
  static std::atomic<KernelChoice> choice{parse_kernel_choice(std::getenv("SPECREG_FAST_CONV_KERNEL"))};
  return choice;
}

KernelChoice kernel_override() {
  const KernelChoice c = kernel_choice().load(std::memory_order_relaxed);
  if (c == KernelChoice::Invalid) {
    const char* v = std::getenv("SPECREG_FAST_CONV_KERNEL");  // error path only: for the message
    SF_CHECK_VALUE(false, "SPECREG_FAST_CONV_KERNEL must be auto, direct or aten, got '", v ? v : "", "'");
  }
  return c;
}

}  // namespace

void check_conv_kernel_override(const char* op) {
  if (isa_cap() == TileIsa::Invalid) {
    const char* v = std::getenv("SPECREG_FAST_CONV_ISA");
    SF_CHECK_VALUE(false, op, ": SPECREG_FAST_CONV_ISA must be auto, avx512, avx2 or generic, got '", v ? v : "",
                   "'");
  }
  if (kernel_choice().load(std::memory_order_relaxed) != KernelChoice::Invalid) return;
  const char* v = std::getenv("SPECREG_FAST_CONV_KERNEL");
  SF_CHECK_VALUE(false, op, ": SPECREG_FAST_CONV_KERNEL must be auto, direct or aten, got '", v ? v : "", "'");
}

std::string set_conv_kernel(const std::string& choice) {
  const KernelChoice c = parse_kernel_choice(choice.c_str());
  SF_CHECK_VALUE(c != KernelChoice::Invalid && !choice.empty(),
                    "the conv kernel must be 'auto', 'direct' or 'aten', got '", choice, "'");
  switch (kernel_choice().exchange(c)) {
    case KernelChoice::Direct: return "direct";
    case KernelChoice::Aten: return "aten";
    case KernelChoice::Invalid: return "invalid";
    default: return "auto";
  }
}

bool conv_gemm_supported(const ConvGeom& g, const Tensor& W, const Tensor& x) {
  if (!W.is_cpu() || g.transposed) return false;
  if (W.scalar_type() != kFloat && W.scalar_type() != kDouble) return false;
  if (!W.is_contiguous() || !x.is_contiguous() || x.size(0) != 1) return false;
  // A zero-size operator is the zero map, handled by the callers (and an empty input dim
  // would make the circular wrap a modulo by 0).
  if (W.numel() == 0 || x.numel() == 0) return false;
  return true;
}

bool conv_gemm_preferred(const ConvGeom& g, const Tensor& W, const Tensor& x) {
  const KernelChoice c = kernel_override();
  if (c == KernelChoice::Aten || !conv_gemm_supported(g, W, x)) return false;
  if (c == KernelChoice::Direct) return true;
#if SPECREG_HAVE_X86_KERNELS
  if (W.scalar_type() != kFloat || tile_isa() == TileIsa::Generic) return false;
  // Depthwise layers (one input channel per group) are per group a GEMM with one row of k*k
  // taps, too thin for the direct kernels' register tiles, while oneDNN has dedicated
  // depthwise kernels. Measured (bench/bench_grouped.py --kernels auto,aten,direct, 2
  // threads): ConvNeXt-tiny's 7x7 depthwise layers at 64x64, 23.0 ms per step direct vs 8.2 ms
  // ATen; MobileNetV3-small's 3x3/5x5 ones a tie (1.62 vs 1.65 ms).
  if (g.groups > 1 && W.size(1) == 1) return false;
  // Measured on the ResNet-18/CIFAR shapes (bench/bench_conv.py, one and two threads): the
  // direct kernels win wherever im2col(x) fits in L2 next to the weight rows streaming past
  // it (512x512 at 4x4: 2.7 -> 1.1 ms per step on one thread; 3->64 at 32x32: 0.20 ->
  // 0.08 ms) and lose once it does not (64x64 at 32x32, im2col 2.4 MB: 0.84 -> 1.2 ms),
  // where oneDNN's blocked kernels amortize their weight reorder over many pixels. On a CPU
  // with AVX2 but no AVX-512, ATen takes its unblocked single-image paths (slow_conv2d,
  // slow_conv_transpose2d, a zero-filled weight-gradient then added): ResNet-50's
  // accumulate_grad() at 64x64 went 55 -> 24 ms with the AVX2 tiles. There the crossover is
  // a little higher (step + weight-gradient, 2 threads, AMD EPYC): at im2col 1.18 MB the
  // direct kernels tie on 128->128 at 16x16 (3.0 ms each) and win on DenseNet-121's 128->32
  // at 16x16 (1.2 vs 1.9 ms); at 2.36 MB they lose (64->64 at 32x32: 3.8 vs 2.6 ms).
  const Geo3 q = make_geo3(g, W, x);
  const int64_t limit = tile_isa() == TileIsa::Avx512 ? (int64_t{1} << 20) : (int64_t{5} << 18);
  return q.G * q.Kg * q.L * static_cast<int64_t>(sizeof(float)) <= limit;
#else
  return false;
#endif
}

void conv_gemm_step(const ConvGeom& g, const Tensor& W, const Tensor& x, Tensor& t, Tensor& a,
                    ConvGemmWork& work) {
  const Geo3 q = make_geo3(g, W, x);
  const int64_t K = q.G * q.Kg;
  if (!work.cols.defined() || work.cols.numel() != K * q.L || work.cols.scalar_type() != W.scalar_type()) {
    work.cols = empty({K, q.L}, W.scalar_type(), W.device());
    work.gcols = empty({K, q.L}, W.scalar_type(), W.device());
  }
  dispatch_floating(W.scalar_type(), "conv_gemm_step", [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    step<scalar_t>(q, W.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), t.mutable_data_ptr<scalar_t>(),
                   a.mutable_data_ptr<scalar_t>(), work.cols.mutable_data_ptr<scalar_t>(),
                   work.gcols.mutable_data_ptr<scalar_t>());
  });
}

double host_norm(const Tensor& t) {
  double acc = 0;
  dispatch_floating(t.scalar_type(), "host_norm", [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    const scalar_t* p = t.const_data_ptr<scalar_t>();
    const int64_t n = t.numel();
    // Four interleaved partial sums (vectorizable, still a fixed order).
    double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
      s0 += static_cast<double>(p[i]) * p[i];
      s1 += static_cast<double>(p[i + 1]) * p[i + 1];
      s2 += static_cast<double>(p[i + 2]) * p[i + 2];
      s3 += static_cast<double>(p[i + 3]) * p[i + 3];
    }
    for (; i < n; ++i) s0 += static_cast<double>(p[i]) * p[i];
    acc = (s0 + s1) + (s2 + s3);
  });
  return std::sqrt(acc);
}

void host_divide(Tensor& dst, const Tensor& src, double n) {
  dispatch_floating(src.scalar_type(), "host_divide", [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    const scalar_t* s = src.const_data_ptr<scalar_t>();
    scalar_t* d = dst.mutable_data_ptr<scalar_t>();
    const scalar_t nn = static_cast<scalar_t>(n);
    const int64_t cnt = src.numel();
    for (int64_t i = 0; i < cnt; ++i) d[i] = s[i] / nn;
  });
}

void conv_gemm_weight_grad(const ConvGeom& g, const Tensor& W, const Tensor& x, const Tensor& y,
                           Tensor& gw, ConvGemmWork& work, bool accumulate) {
  const Geo3 q = make_geo3(g, W, x);
  const int64_t K = q.G * q.Kg;
  if (!work.cols.defined() || work.cols.numel() != K * q.L || work.cols.scalar_type() != W.scalar_type())
    work.cols = empty({K, q.L}, W.scalar_type(), W.device());
  const int64_t scratch = weight_grad_by_rows(q) ? K * q.L : q.cout * q.L + K * q.cout_g;
  const Tensor tmp = empty({scratch}, W.scalar_type(), W.device());
  dispatch_floating(W.scalar_type(), "conv_gemm_weight_grad", [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    im2col<scalar_t>(q, x.const_data_ptr<scalar_t>(), work.cols.mutable_data_ptr<scalar_t>());
    weight_grad<scalar_t>(q, y.const_data_ptr<scalar_t>(), work.cols.const_data_ptr<scalar_t>(),
                          tmp.mutable_data_ptr<scalar_t>(), gw.mutable_data_ptr<scalar_t>(), accumulate);
  });
}

}  // namespace cpu
}  // namespace specreg_fast

#ifndef SPECREG_NO_CPU_IMPL  // the CUDA library's copy of this file (csrc/cuda/conv_device_gemm.cpp)
// specreg_fast::set_conv_kernel(str) -> str (specreg_fast.conv.set_conv_kernel). No tensor
// argument: the dispatcher runs the CompositeExplicitAutograd kernel.
STABLE_TORCH_LIBRARY_IMPL(specreg_fast, CompositeExplicitAutograd, m) {
  m.impl("set_conv_kernel", TORCH_BOX(&specreg_fast::cpu::set_conv_kernel));
}
#endif
