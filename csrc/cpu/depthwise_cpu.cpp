// Depthwise conv operators on the CPU: specreg_fast::depthwise_power_step_,
// depthwise_weight_grad_add_ and depthwise_passes (LibTorch stable ABI).
//
// A depthwise layer (groups == C_in == C_out, weight (C, 1, kh, kw)) is C independent
// single-channel maps A_c, so A = diag(A_c), and one power step
//     t = A x,  y = t / |t|,  a = A^T t,  x = a / |a|,  estimate |a| / |t|
// runs channel by channel with the channel's image (at most a few KB) in L1: t_c = A_c x_c and
// a_c = A_c^T t_c in one visit, the squared norms of t_c and a_c summed per channel and added
// in channel order afterwards (so the result does not depend on the thread count). The
// weight-gradient of (x, y), d<y, A x>/dW, is per channel too: g_c[ky, kx] = sum_o y_c[o]
// x_c[o s - p + k d].
//
// Why not ATen: on one image these layers are tiny (ConvNeXt-tiny's 7x7 depthwise at 64x64
// input: 96 x 16 x 16 outputs x 49 taps = 1.2 MFLOP per pass, MobileNetV3-small's down to
// 576 x 2 x 2), so a pass costs a few microseconds of arithmetic, and ATen's depthwise route
// (a oneDNN primitive or the slow_conv2d fallback per call, a separate transposed convolution
// for the adjoint, a norm and a division per vector) costs more in per-call overhead and in
// taps that land in the zero padding than in arithmetic. Here every tap loop runs over the
// output range whose input index is in bounds (computed per tap), so the padding costs
// nothing: at 2 x 2 with a 7 x 7 kernel, 4 of 49 taps per output are in bounds.
//
// Scope (checked; the Python dispatch in specreg_fast/groups.py sends only these here): 2-D,
// not transposed, groups == C_in == C_out (channel multiplier 1), zeros padding (asymmetric
// allowed), any stride and dilation, float32 or float64 weights with vectors of the same
// dtype, contiguous x and y. params/padding_modes are the conv ops' packing
// (specreg_fast/geometry.py: pack_conv_params): 12 ints per layer,
//     [transposed, groups, stride[2], dilation[2], pad_lo[2], pad_hi[2], output_padding[2]].
// Conventions as conv_power_step_ (csrc/cpu/conv_operator_cpu.cpp): zero A x keeps the vectors
// with estimate 0; a non-finite weight gives the layer's vectors back as they were before the
// call, estimate NaN; n_iter = 0 returns <y, A x> at the current vectors.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "simd.h"
#include "stable_contracts.h"

// The per-channel loops are inlined into the range functions below, which are compiled once
// per ISA (SPECREG_MULTIVERSION, csrc/cpu/simd.h).
#define SF_DW_INLINE inline __attribute__((always_inline))

namespace specreg_fast {
namespace cpu {
namespace {

constexpr int64_t kParamsPerLayer = 12;

struct DwGeom {
  int64_t C = 0, H = 0, W = 0, Ho = 0, Wo = 0, kh = 0, kw = 0;
  int64_t sh = 1, sw = 1, dh = 1, dw = 1, ph = 0, pw = 0;
  // Per tap column kx: the output columns whose input column is in bounds, [ox_lo, ox_hi).
  std::vector<int64_t> ox_lo, ox_hi;
  int64_t w_s0 = 0, w_s2 = 0, w_s3 = 0;  // the weight's strides (C, 1, kh, kw)
  // Stride 1 with rows of at least kTile outputs: the tiled route (corr_tiled), on a zero-padded
  // copy of the channel: xp (forward) and tp (adjoint), each rows x ld, in one scratch of
  // `scratch` elements.
  bool tiled = false;
  int64_t xp_rows = 0, xp_ld = 0, tp_rows = 0, tp_ld = 0, scratch = 0;
};

constexpr int64_t kTile = 8;  // outputs per register tile (32 bytes of float32; 4 of float64 per half)
int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

int64_t ceil_div_nonneg(int64_t a, int64_t b) { return a <= 0 ? 0 : (a + b - 1) / b; }

// The checks of specreg_fast/ops/depthwise.py (check_depthwise_args), same messages.
std::vector<DwGeom> decode_depthwise(const char* op, const TensorList& weights, const TensorList& xs,
                                     const TensorList& ys, const std::vector<int64_t>& params,
                                     const std::vector<std::string>& modes, bool need_contiguous) {
  const size_t L = weights.size();
  SF_CHECK_VALUE(xs.size() == L && ys.size() == L, op, ": weights, xs and ys must have the same length, got ", L,
                 ", ", xs.size(), ", ", ys.size());
  SF_CHECK_VALUE(modes.size() == L, op, ": padding_modes must have one entry per layer (", L, "), got ",
                 modes.size());
  SF_CHECK_VALUE(params.size() == L * kParamsPerLayer, op, ": params must hold ", kParamsPerLayer,
                 " entries per layer (", L * kParamsPerLayer, "), got ", params.size());
  std::vector<DwGeom> geo(L);
  for (size_t l = 0; l < L; ++l) {
    const Tensor &Wt = weights[l], &x = xs[l], &y = ys[l];
    SF_CHECK_TYPE(Wt.scalar_type() == kFloat || Wt.scalar_type() == kDouble, op, ": weights[", l,
                  "] must be float32 or float64, got ", dtype_name(Wt.scalar_type()));
    SF_CHECK_VALUE(Wt.dim() == 4 && Wt.size(1) == 1, op, ": weights[", l,
                   "] must be a depthwise 2-D kernel (C, 1, kh, kw), got shape ", shape_of(Wt));
    SF_CHECK_VALUE(Wt.device().type() == DeviceType::CPU && x.device().type() == DeviceType::CPU &&
                       y.device().type() == DeviceType::CPU,
                   op, ": layer ", l, ": every tensor must be on the CPU");
    const int64_t* p = params.data() + l * kParamsPerLayer;
    DwGeom& g = geo[l];
    g.C = Wt.size(0);
    g.kh = Wt.size(2);
    g.kw = Wt.size(3);
    SF_CHECK_VALUE(p[0] == 0, op, ": layer ", l, ": a transposed conv is not depthwise here");
    SF_CHECK_VALUE(p[1] == g.C, op, ": layer ", l, ": groups must equal the channels (", g.C, "), got ", p[1]);
    SF_CHECK_VALUE(modes[l] == "zeros", op, ": layer ", l, ": padding mode must be zeros, got '", modes[l], "'");
    SF_CHECK_VALUE(p[2] >= 1 && p[3] >= 1 && p[4] >= 1 && p[5] >= 1, op, ": layer ", l,
                   ": stride and dilation must be >= 1");
    SF_CHECK_VALUE(p[6] >= 0 && p[7] >= 0 && p[8] >= 0 && p[9] >= 0, op, ": layer ", l, ": padding must be >= 0");
    SF_CHECK_VALUE(p[10] == 0 && p[11] == 0, op, ": layer ", l, ": output_padding must be 0");
    SF_CHECK_VALUE(g.kh >= 1 && g.kw >= 1, op, ": weights[", l, "] has an empty kernel");
    g.sh = p[2];
    g.sw = p[3];
    g.dh = p[4];
    g.dw = p[5];
    g.ph = p[6];
    g.pw = p[7];
    SF_CHECK_VALUE(x.dim() == 3 && x.size(0) == g.C, op, ": xs[", l, "] must be (", g.C, ", H, W), got ",
                   shape_of(x));
    g.H = x.size(1);
    g.W = x.size(2);
    const int64_t eh = g.H + g.ph + p[8] - g.dh * (g.kh - 1), ew = g.W + g.pw + p[9] - g.dw * (g.kw - 1);
    SF_CHECK_VALUE(eh >= 1 && ew >= 1, op, ": layer ", l, ": input size (", g.H, ", ", g.W,
                   ") too small for the kernel");
    g.Ho = (eh - 1) / g.sh + 1;
    g.Wo = (ew - 1) / g.sw + 1;
    SF_CHECK_VALUE(y.dim() == 3 && y.size(0) == g.C && y.size(1) == g.Ho && y.size(2) == g.Wo, op, ": ys[", l,
                   "] must have the output shape [", g.C, ", ", g.Ho, ", ", g.Wo, "], got ", shape_of(y));
    SF_CHECK_TYPE(x.scalar_type() == Wt.scalar_type() && y.scalar_type() == Wt.scalar_type(), op, ": xs[", l,
                  "]/ys[", l, "] must be ", dtype_name(Wt.scalar_type()), " for a ", dtype_name(Wt.scalar_type()),
                  " weight, got ", dtype_name(x.scalar_type()), "/", dtype_name(y.scalar_type()));
    if (need_contiguous)
      SF_CHECK_VALUE(x.is_contiguous() && y.is_contiguous(), op, ": xs[", l, "]/ys[", l, "] must be contiguous");
    g.w_s0 = Wt.stride(0);
    g.w_s2 = Wt.stride(2);
    g.w_s3 = Wt.stride(3);
    g.ox_lo.resize(g.kw);
    g.ox_hi.resize(g.kw);
    for (int64_t kx = 0; kx < g.kw; ++kx) {
      const int64_t off = kx * g.dw - g.pw;  // ix = ox sw + off
      g.ox_lo[kx] = std::min(g.Wo, ceil_div_nonneg(-off, g.sw));
      const int64_t last = g.W - 1 - off;  // ox sw <= last
      g.ox_hi[kx] = last < 0 ? g.ox_lo[kx] : std::max(g.ox_lo[kx], std::min(g.Wo, last / g.sw + 1));
    }
    g.tiled = g.sh == 1 && g.sw == 1 && g.Wo >= kTile && g.W >= kTile;
    if (g.tiled) {
      g.xp_rows = g.Ho + (g.kh - 1) * g.dh;
      g.xp_ld = round_up(g.Wo, kTile) + (g.kw - 1) * g.dw;
      g.tp_rows = g.H + (g.kh - 1) * g.dh;
      g.tp_ld = round_up(g.W, kTile) + (g.kw - 1) * g.dw;
      g.scratch = std::max(g.xp_rows * g.xp_ld, g.tp_rows * g.tp_ld);
    }
  }
  if (L > 0) {
    for (size_t l = 0; l < L; ++l)
      SF_CHECK_VALUE(weights[l].device() == weights[0].device() && xs[l].device() == weights[0].device() &&
                         ys[l].device() == weights[0].device(),
                     op, ": every tensor argument must be on one device");
  }
  return geo;
}

template <typename T>
SF_DW_INLINE void channel_taps(const DwGeom& g, const T* Wp, int64_t c, T* taps) {
  const T* base = Wp + c * g.w_s0;
  for (int64_t ky = 0; ky < g.kh; ++ky)
    for (int64_t kx = 0; kx < g.kw; ++kx) taps[ky * g.kw + kx] = base[ky * g.w_s2 + kx * g.w_s3];
}

// t_c = A_c x_c (t_c overwritten).
template <typename T>
SF_DW_INLINE void forward_channel(const DwGeom& g, const T* taps, const T* x, T* t) {
  std::fill(t, t + g.Ho * g.Wo, T(0));
  for (int64_t oy = 0; oy < g.Ho; ++oy) {
    T* trow = t + oy * g.Wo;
    for (int64_t ky = 0; ky < g.kh; ++ky) {
      const int64_t iy = oy * g.sh - g.ph + ky * g.dh;
      if (iy < 0 || iy >= g.H) continue;
      const T* xrow = x + iy * g.W;
      for (int64_t kx = 0; kx < g.kw; ++kx) {
        const T wv = taps[ky * g.kw + kx];
        const int64_t off = kx * g.dw - g.pw, lo = g.ox_lo[kx], hi = g.ox_hi[kx];
        if (g.sw == 1) {
          const T* xr = xrow + off;
#pragma omp simd
          for (int64_t ox = lo; ox < hi; ++ox) trow[ox] += wv * xr[ox];
        } else {
          for (int64_t ox = lo; ox < hi; ++ox) trow[ox] += wv * xrow[ox * g.sw + off];
        }
      }
    }
  }
}

// a_c = A_c^T t_c (a_c overwritten).
template <typename T>
SF_DW_INLINE void adjoint_channel(const DwGeom& g, const T* taps, const T* t, T* a) {
  std::fill(a, a + g.H * g.W, T(0));
  for (int64_t oy = 0; oy < g.Ho; ++oy) {
    const T* trow = t + oy * g.Wo;
    for (int64_t ky = 0; ky < g.kh; ++ky) {
      const int64_t iy = oy * g.sh - g.ph + ky * g.dh;
      if (iy < 0 || iy >= g.H) continue;
      T* arow = a + iy * g.W;
      for (int64_t kx = 0; kx < g.kw; ++kx) {
        const T wv = taps[ky * g.kw + kx];
        const int64_t off = kx * g.dw - g.pw, lo = g.ox_lo[kx], hi = g.ox_hi[kx];
        if (g.sw == 1) {
          T* ar = arow + off;
#pragma omp simd
          for (int64_t ox = lo; ox < hi; ++ox) ar[ox] += wv * trow[ox];
        } else {
          for (int64_t ox = lo; ox < hi; ++ox) arow[ox * g.sw + off] += wv * trow[ox];
        }
      }
    }
  }
}

// gw[k] += sum_o y_c[o] x_c[o s - p + k d] for the taps k of one channel.
template <typename T>
SF_DW_INLINE void weight_grad_channel(const DwGeom& g, const T* x, const T* y, T* gw) {
  for (int64_t oy = 0; oy < g.Ho; ++oy) {
    const T* yrow = y + oy * g.Wo;
    for (int64_t ky = 0; ky < g.kh; ++ky) {
      const int64_t iy = oy * g.sh - g.ph + ky * g.dh;
      if (iy < 0 || iy >= g.H) continue;
      const T* xrow = x + iy * g.W;
      for (int64_t kx = 0; kx < g.kw; ++kx) {
        const int64_t off = kx * g.dw - g.pw, lo = g.ox_lo[kx], hi = g.ox_hi[kx];
        T s = 0;
        if (g.sw == 1) {
          const T* xr = xrow + off;
#pragma omp simd reduction(+ : s)
          for (int64_t ox = lo; ox < hi; ++ox) s += yrow[ox] * xr[ox];
        } else {
          for (int64_t ox = lo; ox < hi; ++ox) s += yrow[ox] * xrow[ox * g.sw + off];
        }
        gw[ky * g.kw + kx] += s;
      }
    }
  }
}

template <typename T>
SF_DW_INLINE T sumsq(const T* v, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += v[i] * v[i];
  return s;
}

// dst[r][c] = src[r - off_r][c - off_c] where that is inside the (H, W) source, else 0, for a
// rows x ld destination.
template <typename T>
SF_DW_INLINE void pad_into(const T* src, int64_t H, int64_t W, int64_t off_r, int64_t off_c, T* dst, int64_t rows,
                           int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    T* d = dst + r * ld;
    const int64_t sr = r - off_r;
    if (sr < 0 || sr >= H) {
      std::fill(d, d + ld, T(0));
      continue;
    }
    const int64_t c_lo = std::clamp<int64_t>(off_c, 0, ld), c_hi = std::clamp<int64_t>(off_c + W, 0, ld);
    std::fill(d, d + c_lo, T(0));
    for (int64_t c = std::max<int64_t>(c_lo, off_c); c < c_hi; ++c) d[c] = src[sr * W + c - off_c];
    std::fill(d + c_hi, d + ld, T(0));
  }
}

// dst[r][c] = sum_{ky, kx} taps[ky kw + kx] src[(r + ky dh) ld + c + kx dw] for r < rows, c < cols
// (dst rows x cols), in register tiles of kTile outputs: one load and one multiply-add per tap
// and output, the tile kept in registers over all the taps. src holds at least
// round_up(cols, kTile) + (kw - 1) dw columns per row.
template <typename T>
SF_DW_INLINE void corr_tiled(const DwGeom& g, const T* taps, const T* src, int64_t ld, T* dst, int64_t rows,
                             int64_t cols) {
  constexpr int64_t L = 32 / sizeof(T);  // lanes of one 32-byte vector
  typedef T V __attribute__((vector_size(32)));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c0 = 0; c0 < cols; c0 += L) {
      V acc = {};
      for (int64_t ky = 0; ky < g.kh; ++ky) {
        const T* s = src + (r + ky * g.dh) * ld + c0;
        for (int64_t kx = 0; kx < g.kw; ++kx) {
          V v;
          std::memcpy(&v, s + kx * g.dw, sizeof(V));
          acc += taps[ky * g.kw + kx] * v;
        }
      }
      const int64_t n = std::min(L, cols - c0);
      if (n == L) {
        std::memcpy(dst + r * cols + c0, &acc, sizeof(V));
      } else {
        for (int64_t i = 0; i < n; ++i) dst[r * cols + c0 + i] = acc[i];
      }
    }
  }
}

// t_c = A_c x_c and a_c = A_c^T t_c on the tiled route (stride 1): the forward is a correlation
// of the padded x with the taps; the adjoint a[i] = sum_k w[k] t[i + p - k d] a correlation of
// the padded t with the flipped taps (flip: taps[K .. 2K)).
template <typename T>
SF_DW_INLINE void step_channel_tiled(const DwGeom& g, const T* taps, const T* x, T* t, T* a, T* scratch) {
  const int64_t K = g.kh * g.kw;
  pad_into(x, g.H, g.W, g.ph, g.pw, scratch, g.xp_rows, g.xp_ld);
  corr_tiled(g, taps, scratch, g.xp_ld, t, g.Ho, g.Wo);
  pad_into(t, g.Ho, g.Wo, (g.kh - 1) * g.dh - g.ph, (g.kw - 1) * g.dw - g.pw, scratch, g.tp_rows, g.tp_ld);
  corr_tiled(g, taps + K, scratch, g.tp_ld, a, g.H, g.W);
}

template <typename T>
SF_DW_INLINE void flip_taps(const DwGeom& g, T* taps) {
  const int64_t K = g.kh * g.kw;
  for (int64_t k = 0; k < K; ++k) taps[K + k] = taps[K - 1 - k];
}

// The channel ranges [c0, c1) of one layer, per ISA clone: t = A x and a = A^T t with each
// channel's squared norms (step), <y_c, A_c x_c> per channel (bilinear), and the weight-gradient
// added into G (weight_grad).
#define SF_DW_RANGES(T)                                                                                   \
  SPECREG_MULTIVERSION void step_range(const DwGeom& g, const T* Wp, const T* x, T* t, T* a, T* tss, T* ass, \
                                       T* taps, T* scratch, int64_t c0, int64_t c1) {                     \
    const int64_t in = g.H * g.W, out = g.Ho * g.Wo;                                                      \
    for (int64_t c = c0; c < c1; ++c) {                                                                   \
      channel_taps(g, Wp, c, taps);                                                                       \
      if (g.tiled) {                                                                                      \
        flip_taps(g, taps);                                                                               \
        step_channel_tiled(g, taps, x + c * in, t + c * out, a + c * in, scratch);                        \
      } else {                                                                                            \
        forward_channel(g, taps, x + c * in, t + c * out);                                                \
        adjoint_channel(g, taps, t + c * out, a + c * in);                                                \
      }                                                                                                   \
      tss[c] = sumsq(t + c * out, out);                                                                   \
      ass[c] = sumsq(a + c * in, in);                                                                     \
    }                                                                                                     \
  }                                                                                                       \
  SPECREG_MULTIVERSION void bilinear_range(const DwGeom& g, const T* Wp, const T* x, const T* y, T* part,  \
                                           T* taps, T* t, int64_t c0, int64_t c1) {                       \
    const int64_t in = g.H * g.W, out = g.Ho * g.Wo;                                                      \
    for (int64_t c = c0; c < c1; ++c) {                                                                   \
      channel_taps(g, Wp, c, taps);                                                                       \
      forward_channel(g, taps, x + c * in, t);                                                            \
      T s = 0;                                                                                            \
      for (int64_t i = 0; i < out; ++i) s += y[c * out + i] * t[i];                                       \
      part[c] = s;                                                                                        \
    }                                                                                                     \
  }                                                                                                       \
  SPECREG_MULTIVERSION void weight_grad_range(const DwGeom& g, const T* x, const T* y, T* G, int64_t c0,   \
                                              int64_t c1) {                                               \
    const int64_t in = g.H * g.W, out = g.Ho * g.Wo, K = g.kh * g.kw;                                     \
    for (int64_t c = c0; c < c1; ++c) weight_grad_channel(g, x + c * in, y + c * out, G + c * K);         \
  }
SF_DW_RANGES(float)
SF_DW_RANGES(double)
#undef SF_DW_RANGES

// Channels per parallel task: about 32K multiply-adds of work, so that a small layer runs on
// one thread (a parallel region's wake-up costs more than its arithmetic).
int64_t channel_grain(const DwGeom& g) {
  const int64_t per = std::max<int64_t>(1, g.Ho * g.Wo * g.kh * g.kw);
  return std::max<int64_t>(1, (int64_t(1) << 15) / per);
}

// One step's t = A x and a = A^T t into t, a; returns (|t|, |a|) with the sums of squares
// added in channel order.
template <typename T>
std::pair<double, double> step_layer(const DwGeom& g, const T* Wp, const T* x, T* t, T* a, std::vector<T>& tss,
                                     std::vector<T>& ass) {
  const int64_t K = g.kh * g.kw;
  tss.assign(g.C, T(0));
  ass.assign(g.C, T(0));
  torch::stable::parallel_for(0, g.C, channel_grain(g), [&](int64_t c0, int64_t c1) {
    std::vector<T> taps(2 * K), scratch(g.scratch);
    step_range(g, Wp, x, t, a, tss.data(), ass.data(), taps.data(), scratch.data(), c0, c1);
  });
  T ts = 0, as = 0;
  for (int64_t c = 0; c < g.C; ++c) {
    ts += tss[c];
    as += ass[c];
  }
  return {std::sqrt(static_cast<double>(ts)), std::sqrt(static_cast<double>(as))};
}

// <y, A x> of one layer, channel partials summed in order.
template <typename T>
double bilinear_layer(const DwGeom& g, const T* Wp, const T* x, const T* y) {
  const int64_t out = g.Ho * g.Wo, K = g.kh * g.kw;
  std::vector<T> part(g.C, T(0));
  torch::stable::parallel_for(0, g.C, channel_grain(g), [&](int64_t c0, int64_t c1) {
    std::vector<T> taps(K), t(out);
    bilinear_range(g, Wp, x, y, part.data(), taps.data(), t.data(), c0, c1);
  });
  T s = 0;
  for (int64_t c = 0; c < g.C; ++c) s += part[c];
  return static_cast<double>(s);
}

void check_memory(const char* op, const TensorList& weights, const TensorList& xs, const TensorList& ys,
                  bool xs_ys_written, const TensorList& grads) {
  MemoryArgsStable mem;
  mem.add("weights", weights, false);
  mem.add("xs", xs, xs_ys_written);
  mem.add("ys", ys, xs_ys_written);
  mem.add("grads", grads, true);
  mem.check(op);
}

template <typename T>
double power_layer(const DwGeom& g, const Tensor& Wt, const Tensor& xt, const Tensor& yt, int64_t n_iter, double tol,
                   InterruptPollStable& poll, bool& interrupted) {
  const T* Wp = Wt.const_data_ptr<T>();
  T* x = xt.mutable_data_ptr<T>();
  T* y = yt.mutable_data_ptr<T>();
  const int64_t nx = g.C * g.H * g.W, ny = g.C * g.Ho * g.Wo;
  if (n_iter == 0) return bilinear_layer<T>(g, Wp, x, y);
  std::vector<T> t(ny), a(nx), tss, ass, x0, y0;
  if (n_iter > 1) {  // a later step may meet a non-finite norm, or an interrupt: roll back to these
    x0.assign(x, x + nx);
    y0.assign(y, y + ny);
  }
  double est = 0.0, prev = std::numeric_limits<double>::quiet_NaN();
  for (int64_t it = 0; it < n_iter; ++it) {
    if (it > 0 && poll.interrupted()) {
      std::copy(x0.begin(), x0.end(), x);
      std::copy(y0.begin(), y0.end(), y);
      interrupted = true;
      return 0.0;
    }
    const auto [tn, an] = step_layer<T>(g, Wp, x, t.data(), a.data(), tss, ass);
    if (!std::isfinite(tn) || !std::isfinite(an)) {  // checked before this step writes
      if (n_iter > 1) {
        std::copy(x0.begin(), x0.end(), x);
        std::copy(y0.begin(), y0.end(), y);
      }
      return std::numeric_limits<double>::quiet_NaN();
    }
    if (!(tn > 0 && an > 0)) return 0.0;  // A x = 0: vectors kept, estimate 0
    const T itn = T(1) / static_cast<T>(tn), ian = T(1) / static_cast<T>(an);
    for (int64_t i = 0; i < ny; ++i) y[i] = t[i] * itn;
    for (int64_t i = 0; i < nx; ++i) x[i] = a[i] * ian;
    est = an / tn;
    if (tol > 0) {
      if (std::abs(est - prev) <= tol * std::abs(est)) break;
      prev = est;
    }
  }
  return est;
}

Tensor depthwise_power_step_cpu(const TensorList& weights, const TensorList& xs, const TensorList& ys,
                                const std::vector<int64_t>& params, const std::vector<std::string>& modes,
                                int64_t n_iter, double tol) {
  const char* op = "specreg_fast::depthwise_power_step_";
  check_n_iter_stable(op, n_iter);
  SF_CHECK_VALUE(tol >= 0.0 && std::isfinite(tol), op, ": tol must be finite and >= 0, got ", tol);
  const auto geo = decode_depthwise(op, weights, xs, ys, params, modes, /*need_contiguous=*/true);
  check_memory(op, weights, xs, ys, /*xs_ys_written=*/true, {});
  const int64_t L = static_cast<int64_t>(weights.size());
  bool f64 = false;
  for (const auto& W : weights) f64 = f64 || W.scalar_type() == kDouble;
  NoGradGuard no_grad;
  InterruptPollStable poll(op);
  std::vector<double> est(L, 0.0);
  std::vector<Tensor> saved;  // every started layer's start-of-call vectors, for an interrupt (n_iter > 1)
  for (int64_t l = 0; l < L; ++l) {
    if (xs[l].numel() == 0 || ys[l].numel() == 0) continue;  // the zero map: estimate 0
    if (n_iter > 1) {
      saved.push_back(xs[l]);
      saved.push_back(torch::stable::clone(xs[l]));
      saved.push_back(ys[l]);
      saved.push_back(torch::stable::clone(ys[l]));
    }
    bool interrupted = false;
    double e = weights[l].scalar_type() == kDouble
                   ? power_layer<double>(geo[l], weights[l], xs[l], ys[l], n_iter, tol, poll, interrupted)
                   : power_layer<float>(geo[l], weights[l], xs[l], ys[l], n_iter, tol, poll, interrupted);
    if (interrupted) {
      for (size_t k = 0; k < saved.size(); k += 2) torch::stable::copy_(saved[k], saved[k + 1]);
      poll.raise();
    }
    if (!std::isfinite(e)) e = std::numeric_limits<double>::quiet_NaN();
    est[l] = e;
  }
  Tensor out = empty({L}, f64 ? kDouble : kFloat, Device(DeviceType::CPU));
  for (int64_t l = 0; l < L; ++l) {
    if (f64)
      out.mutable_data_ptr<double>()[l] = est[l];
    else
      out.mutable_data_ptr<float>()[l] = static_cast<float>(est[l]);
  }
  return out;
}

template <typename T>
void weight_grad_layer(const DwGeom& g, const T* x, const T* y, T* G) {
  torch::stable::parallel_for(0, g.C, channel_grain(g), [&](int64_t c0, int64_t c1) {
    weight_grad_range(g, x, y, G, c0, c1);
  });
}

void depthwise_weight_grad_add_cpu(const TensorList& grads, const TensorList& weights, const TensorList& xs,
                                   const TensorList& ys, const std::vector<int64_t>& params,
                                   const std::vector<std::string>& modes) {
  const char* op = "specreg_fast::depthwise_weight_grad_add_";
  SF_CHECK_VALUE(grads.size() == weights.size(), op, ": grads, weights, xs and ys must have the same length, got ",
                 grads.size(), ", ", weights.size(), ", ", xs.size(), ", ", ys.size());
  const auto geo = decode_depthwise(op, weights, xs, ys, params, modes, /*need_contiguous=*/true);
  for (size_t l = 0; l < grads.size(); ++l) {
    const Tensor& G = grads[l];
    SF_CHECK_VALUE(G.dim() == 4 && G.size(0) == weights[l].size(0) && G.size(1) == 1 &&
                       G.size(2) == weights[l].size(2) && G.size(3) == weights[l].size(3),
                   op, ": grads[", l, "] must have the weight's shape ", shape_of(weights[l]), ", got ", shape_of(G));
    SF_CHECK_TYPE(G.scalar_type() == weights[l].scalar_type(), op, ": grads[", l, "] must be ",
                  dtype_name(weights[l].scalar_type()), ", got ", dtype_name(G.scalar_type()));
    SF_CHECK_VALUE(G.device().type() == DeviceType::CPU, op, ": grads[", l, "] must be on the CPU");
    SF_CHECK_VALUE(G.is_contiguous(), op, ": grads[", l, "] must be contiguous");
  }
  check_memory(op, weights, xs, ys, /*xs_ys_written=*/false, grads);
  NoGradGuard no_grad;
  for (size_t l = 0; l < grads.size(); ++l) {
    if (xs[l].numel() == 0 || ys[l].numel() == 0) continue;  // adds 0
    if (weights[l].scalar_type() == kDouble)
      weight_grad_layer<double>(geo[l], xs[l].const_data_ptr<double>(), ys[l].const_data_ptr<double>(),
                                grads[l].mutable_data_ptr<double>());
    else
      weight_grad_layer<float>(geo[l], xs[l].const_data_ptr<float>(), ys[l].const_data_ptr<float>(),
                               grads[l].mutable_data_ptr<float>());
  }
}

template <typename T>
void passes_layer(const DwGeom& g, const Tensor& Wt, const Tensor& xt, const Tensor& yt, Tensor& At, Tensor& ATt,
                  Tensor& Gt) {
  const int64_t in = g.H * g.W, out = g.Ho * g.Wo, K = g.kh * g.kw;
  const T* Wp = Wt.const_data_ptr<T>();
  const T* x = xt.const_data_ptr<T>();
  const T* y = yt.const_data_ptr<T>();
  T* Ax = At.mutable_data_ptr<T>();
  T* ATy = ATt.mutable_data_ptr<T>();
  T* G = Gt.mutable_data_ptr<T>();
  std::fill(G, G + g.C * K, T(0));
  std::vector<T> taps(K);
  for (int64_t c = 0; c < g.C; ++c) {
    channel_taps(g, Wp, c, taps.data());
    forward_channel(g, taps.data(), x + c * in, Ax + c * out);
    adjoint_channel(g, taps.data(), y + c * out, ATy + c * in);
    weight_grad_channel(g, x + c * in, y + c * out, G + c * K);
  }
}

// [A x, A^T y, d<y, A x>/dW] per layer, each pass on its own (for the tests and the benchmark).
TensorList depthwise_passes_cpu(const TensorList& weights, const TensorList& xs, const TensorList& ys,
                                const std::vector<int64_t>& params, const std::vector<std::string>& modes) {
  const char* op = "specreg_fast::depthwise_passes";
  const auto geo = decode_depthwise(op, weights, xs, ys, params, modes, /*need_contiguous=*/true);
  NoGradGuard no_grad;
  TensorList res;
  const Device cpu(DeviceType::CPU);
  for (size_t l = 0; l < weights.size(); ++l) {
    const auto& g = geo[l];
    const auto dt = weights[l].scalar_type();
    Tensor A = empty({g.C, g.Ho, g.Wo}, dt, cpu), AT = empty({g.C, g.H, g.W}, dt, cpu),
           G = empty({g.C, 1, g.kh, g.kw}, dt, cpu);
    if (dt == kDouble)
      passes_layer<double>(g, weights[l], xs[l], ys[l], A, AT, G);
    else
      passes_layer<float>(g, weights[l], xs[l], ys[l], A, AT, G);
    res.push_back(A);
    res.push_back(AT);
    res.push_back(G);
  }
  return res;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(specreg_fast, CPU, m) {
  m.impl("depthwise_power_step_", TORCH_BOX(&depthwise_power_step_cpu));
  m.impl("depthwise_weight_grad_add_", TORCH_BOX(&depthwise_weight_grad_add_cpu));
  m.impl("depthwise_passes", TORCH_BOX(&depthwise_passes_cpu));
}

}  // namespace cpu
}  // namespace specreg_fast
