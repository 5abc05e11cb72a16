// Conv geometry shared by the conv-operator ops (csrc/cpu/conv_operator_cpu.cpp) and the
// circular (Fourier) conv ops (csrc/cpu/circular_conv_cpu.cpp): decoding of the packed
// per-layer `params`, the explicit padding map and its exact adjoint, the conv operator A and
// its adjoint A^T as ATen calls (so they run on any device), argument checks. The packing is
// described in csrc/specreg_fast.cpp and at the top of csrc/cpu/conv_operator_cpu.cpp.
#pragma once

#include "stable_api.h"

#include <algorithm>
#include <string>
#include <vector>

namespace specreg_fast {
namespace conv_detail {

// a * b and a + b of packed params and sizes, with a ValueError naming `what` where the
// int64 result would wrap: a wrapped size (dilation 2^62 times kernel - 1 is 0 mod 2^64)
// passes every later check and sends the direct kernels' indices outside their buffers.
inline int64_t checked_mul(const char* op, size_t l, const char* what, int64_t a, int64_t b) {
  int64_t r = 0;
  SF_CHECK_VALUE(!__builtin_mul_overflow(a, b, &r), op, ": layer ", l, ": ", what, " (", a, " * ", b,
                    ") overflows int64");
  return r;
}
inline int64_t checked_add(const char* op, size_t l, const char* what, int64_t a, int64_t b) {
  int64_t r = 0;
  SF_CHECK_VALUE(!__builtin_add_overflow(a, b, &r), op, ": layer ", l, ": ", what, " (", a, " + ", b,
                    ") overflows int64");
  return r;
}

enum class PadMode { Zeros, Circular, Reflect, Replicate };

struct ConvGeom {
  int64_t d = 0;
  bool transposed = false;
  int64_t groups = 1;
  std::vector<int64_t> stride, dilation, lo, hi, outpad;
  std::vector<int64_t> extent;  // dilation * (kernel - 1) + 1 per spatial dim (overflow-checked)
  PadMode mode = PadMode::Zeros;
  std::string mode_name;
  // Pad explicitly (at::pad) and convolve with zero padding: non-zero modes and asymmetric pads.
  bool explicit_pad = false;
  std::vector<int64_t> conv_pad;  // padding handed to at::convolution
  std::vector<int64_t> pad_vec;   // at::pad order: last dim first, (lo, hi) pairs
};

inline std::vector<ConvGeom> decode(const char* op, const TensorList& weights, const std::vector<int64_t>& params,
                             const std::vector<std::string>& modes) {
  SF_CHECK_VALUE(modes.size() == weights.size(), op, ": padding_modes must have one entry per layer (",
                    weights.size(), "), got ", modes.size());
  std::vector<ConvGeom> out;
  size_t off = 0;
  for (size_t l = 0; l < weights.size(); ++l) {
    ConvGeom g;
    g.d = weights[l].dim() - 2;
    SF_CHECK_VALUE(g.d >= 1 && g.d <= 3, op, ": weights[", l, "] must be 3-D to 5-D (a 1-D to 3-D conv), got ",
                      shape_of(weights[l]));
    const size_t need = 2 + 5 * static_cast<size_t>(g.d);
    SF_CHECK_VALUE(off + need <= params.size(), op, ": params too short for layer ", l, " (need ", need,
                      " entries from offset ", off, ", have ", params.size(), ")");
    const int64_t* p = params.data() + off;
    g.transposed = p[0] != 0;
    g.groups = p[1];
    SF_CHECK_VALUE(g.groups >= 1, op, ": layer ", l, ": groups must be >= 1, got ", g.groups);
    // The grouped channel count (C_in of a conv, C_out of a transposed conv); checked once
    // here, so later products of it are plain.
    (void)checked_mul(op, l, "groups * weight.size(1)", g.groups, weights[l].size(1));
    for (int64_t i = 0; i < g.d; ++i) {
      g.stride.push_back(p[2 + i]);
      g.dilation.push_back(p[2 + g.d + i]);
      g.lo.push_back(p[2 + 2 * g.d + i]);
      g.hi.push_back(p[2 + 3 * g.d + i]);
      g.outpad.push_back(p[2 + 4 * g.d + i]);
      SF_CHECK_VALUE(g.stride.back() >= 1 && g.dilation.back() >= 1, op, ": layer ", l,
                        ": stride and dilation must be >= 1");
      SF_CHECK_VALUE(g.lo.back() >= 0 && g.hi.back() >= 0 && g.outpad.back() >= 0, op, ": layer ", l,
                        ": padding and output_padding must be >= 0");
      const int64_t k = weights[l].size(2 + i);
      SF_CHECK_VALUE(k >= 1, op, ": weights[", l, "] has kernel size 0 in spatial dim ", i, ": ",
                        shape_of(weights[l]));
      g.extent.push_back(checked_mul(op, l, "dilation * (kernel_size - 1)", g.dilation.back(), k - 1) + 1);
      (void)checked_add(op, l, "padding_lo + padding_hi", g.lo.back(), g.hi.back());
    }
    off += need;
    const std::string m(modes[l]);
    g.mode_name = m;
    if (m == "zeros") g.mode = PadMode::Zeros;
    else if (m == "circular") g.mode = PadMode::Circular;
    else if (m == "reflect") g.mode = PadMode::Reflect;
    else if (m == "replicate") g.mode = PadMode::Replicate;
    else SF_CHECK_VALUE(false, op, ": layer ", l, ": padding mode must be zeros/circular/reflect/replicate, got '",
                           m, "'");
    bool sym = g.lo == g.hi;
    if (g.transposed) {
      SF_CHECK_VALUE(g.mode == PadMode::Zeros && sym, op, ": layer ", l,
                        ": a transposed conv takes symmetric zero padding only");
    } else {
      for (auto v : g.outpad) SF_CHECK_VALUE(v == 0, op, ": layer ", l, ": output_padding must be 0 for a conv");
    }
    g.explicit_pad = !g.transposed && (g.mode != PadMode::Zeros || !sym);
    g.conv_pad = g.explicit_pad ? std::vector<int64_t>(g.d, 0) : g.lo;
    for (int64_t i = g.d - 1; i >= 0; --i) {
      g.pad_vec.push_back(g.lo[i]);
      g.pad_vec.push_back(g.hi[i]);
    }
    out.push_back(std::move(g));
  }
  SF_CHECK_VALUE(off == params.size(), op, ": params has ", params.size(), " entries, the layers use ", off);
  return out;
}

inline Tensor pad_apply(const ConvGeom& g, const Tensor& x) {
  if (!g.explicit_pad) return x;
  switch (g.mode) {  // at::constant_pad_nd / at::pad: the stable pad (aoti shim)
    case PadMode::Zeros: return torch::stable::pad(x, g.pad_vec, "constant", 0.0);
    case PadMode::Circular: return torch::stable::pad(x, g.pad_vec, "circular");
    case PadMode::Reflect: return torch::stable::pad(x, g.pad_vec, "reflect");
    case PadMode::Replicate: return torch::stable::pad(x, g.pad_vec, "replicate");
  }
  return x;
}

// Exact adjoint of pad_apply; `x_like` has the unpadded shape (its values are not read).
inline Tensor pad_adjoint(const ConvGeom& g, const Tensor& gp, const Tensor& x_like) {
  if (!g.explicit_pad) return gp;
  switch (g.mode) {
    case PadMode::Zeros: {
      Tensor r = gp;
      for (int64_t i = 0; i < g.d; ++i) r = torch::stable::narrow(r, 2 + i, g.lo[i], x_like.size(2 + i));
      return r;
    }
    case PadMode::Circular: {
      // Left pad of dim i holds x[n-lo:n], right pad holds x[0:hi]: fold them back.
      Tensor r = gp;
      for (int64_t i = 0; i < g.d; ++i) {
        const int64_t dim = 2 + i, n = x_like.size(dim), lo = g.lo[i], hi = g.hi[i];
        Tensor c = torch::stable::clone(torch::stable::narrow(r, dim, lo, n));
        if (lo > 0) {
          Tensor dst = torch::stable::narrow(c, dim, n - lo, lo);
          torch::stable::copy_(dst, aten::add(dst, torch::stable::narrow(r, dim, 0, lo)));
        }
        if (hi > 0) {
          Tensor dst = torch::stable::narrow(c, dim, 0, hi);
          torch::stable::copy_(dst, aten::add(dst, torch::stable::narrow(r, dim, lo + n, hi)));
        }
        r = c;
      }
      return r;
    }
    case PadMode::Reflect: return aten::pad_backward("reflection", g.d, gp, x_like, g.pad_vec);
    case PadMode::Replicate: return aten::pad_backward("replication", g.d, gp, x_like, g.pad_vec);
  }
  return gp;
}

inline Tensor op_apply(const ConvGeom& g, const Tensor& W, const Tensor& x) {
  return aten::convolution(pad_apply(g, x), W, g.stride, g.conv_pad, g.dilation, g.transposed, g.outpad, g.groups);
}

// For a stride-1 conv the adjoint is itself a forward convolution, with the kernel flipped in
// space and its in/out channels swapped (per group) and padding d (k - 1) - p. The forward
// kernels (oneDNN) are faster than the transposed ones for single images with many channels
// (512x512 at 4x4: 1.5 -> 0.9 ms), so the power step builds this kernel once per call.
// Returns an undefined tensor when the geometry has no such form.
inline Tensor adjoint_kernel(const ConvGeom& g, const Tensor& W) {
  if (g.transposed) return Tensor();
  for (int64_t i = 0; i < g.d; ++i) {
    if (g.stride[i] != 1 || g.dilation[i] * (W.size(2 + i) - 1) < g.conv_pad[i]) return Tensor();
  }
  const int64_t cout = W.size(0), cin_g = W.size(1), G = g.groups;
  std::vector<int64_t> grouped{G, cout / G, cin_g};
  std::vector<int64_t> flat{cin_g * G, cout / G};
  std::vector<int64_t> flip_dims;
  for (int64_t i = 0; i < g.d; ++i) {
    grouped.push_back(W.size(2 + i));
    flat.push_back(W.size(2 + i));
    flip_dims.push_back(3 + i);
  }
  const Tensor f = aten::flip(torch::stable::reshape(W, grouped), flip_dims);
  return contig(torch::stable::reshape(torch::stable::transpose(f, 1, 2), flat));
}

// A^T y; `x_like` has the input shape; `Wadj` is adjoint_kernel(g, W) or undefined.
inline Tensor op_adjoint(const ConvGeom& g, const Tensor& W, const Tensor& y, const Tensor& x_like,
                         const Tensor& Wadj = Tensor()) {
  if (Wadj.defined()) {
    std::vector<int64_t> pad(g.d);
    for (int64_t i = 0; i < g.d; ++i) pad[i] = g.dilation[i] * (W.size(2 + i) - 1) - g.conv_pad[i];
    Tensor gp = aten::convolution(y, Wadj, g.stride, pad, g.dilation, false, std::vector<int64_t>(g.d, 0), g.groups);
    return pad_adjoint(g, gp, x_like);
  }
  if (g.transposed) {
    Tensor r = aten::convolution(y, W, g.stride, g.lo, g.dilation, false, std::vector<int64_t>(g.d, 0), g.groups);
    // output_padding >= stride (allowed when dilation > stride) adds input positions that no
    // input entry reaches: drop them.
    for (int64_t i = 0; i < g.d; ++i)
      if (r.size(2 + i) != x_like.size(2 + i)) r = torch::stable::narrow(r, 2 + i, 0, x_like.size(2 + i));
    return r;
  }
  std::vector<int64_t> op(g.d);
  for (int64_t i = 0; i < g.d; ++i) {
    const int64_t target = x_like.size(2 + i) + (g.explicit_pad ? g.lo[i] + g.hi[i] : 0);
    const int64_t k = W.size(2 + i);
    op[i] = target - ((y.size(2 + i) - 1) * g.stride[i] - 2 * g.conv_pad[i] + g.dilation[i] * (k - 1) + 1);
  }
  Tensor gp = aten::convolution(y, W, g.stride, g.conv_pad, g.dilation, true, op, g.groups);
  return pad_adjoint(g, gp, x_like);
}

// A layer whose input or output has no entries (a zero-size spatial input that padding makes
// non-empty, zero channels) is the zero map: every op treats it as such (norm 0, vectors
// kept, weight-gradient 0, adjoint 0) before any kernel runs, as torch.linalg.matrix_norm
// gives 0 for an empty matrix. ATen's padding and conv kernels reject most of these shapes,
// the direct ones would index an empty buffer, so neither path sees them.
inline bool zero_map(const Tensor& x, const Tensor& y) { return x.numel() == 0 || y.numel() == 0; }

inline ScalarType acc_type(ScalarType st) { return st == kDouble ? kDouble : kFloat; }

inline ScalarType out_type(const TensorList& weights) {
  for (const auto& w : weights)
    if (w.scalar_type() == kDouble) return kDouble;
  return kFloat;
}

// (C_out, *out) for an input (C_in, *in). Floor semantics with every sum and product
// checked: a dilated kernel larger than the padded input is a ValueError (the same on every
// kernel path), never a negative size rounded up to 1 by truncating division.
inline std::vector<int64_t> output_shape(const char* op, size_t l, const ConvGeom& g, const Tensor& W,
                                         const std::vector<int64_t>& in) {
  std::vector<int64_t> out;
  out.push_back(g.transposed ? W.size(1) * g.groups : W.size(0));
  for (int64_t i = 0; i < g.d; ++i) {
    const int64_t n = in[1 + i], s = g.stride[i], e = g.extent[i];
    int64_t o;
    if (g.transposed) {
      // (n - 1) s + extent + output_padding - lo - hi (lo + hi checked in decode)
      const char* what = "the transposed conv's output size";
      o = checked_mul(op, l, "(input size - 1) * stride", n - 1, s);
      o = checked_add(op, l, what, o, e);
      o = checked_add(op, l, what, o, g.outpad[i]);
      o = checked_add(op, l, what, o, -(g.lo[i] + g.hi[i]));
      SF_CHECK_VALUE(o >= 1, op, ": layer ", l, ": input ", Shape{in}, " too small for the kernel: the transposed conv's "
                        "output size in spatial dim ", i, " would be ", o);
    } else {
      const int64_t padded = checked_add(op, l, "input size + padding", n, g.lo[i] + g.hi[i]);
      SF_CHECK_VALUE(padded >= e, op, ": layer ", l, ": input ", Shape{in}, " too small for the kernel: spatial dim ", i,
                        " is ", padded, " with padding, the dilated kernel spans dilation * (kernel_size - 1) + 1 = ",
                        e);
      o = (padded - e) / s + 1;  // padded - e >= 0: truncation is floor
    }
    // ATen's convolution kernels (oneDNN) take the geometry as int32: a stride of 2^31 wrapped
    // to a negative one there and raised while the direct kernel answered. One bound for both.
    constexpr int64_t kMaxEntry = (int64_t{1} << 31) - 1;
    SF_CHECK_VALUE(s <= kMaxEntry && g.dilation[i] <= kMaxEntry && g.lo[i] <= kMaxEntry && g.hi[i] <= kMaxEntry &&
                          g.outpad[i] <= kMaxEntry,
                      op, ": layer ", l, ": stride, dilation, padding and output_padding must be at most 2^31 - 1 "
                      "(ATen's convolutions take int32), got stride ", s, ", dilation ", g.dilation[i], ", padding (",
                      g.lo[i], ", ", g.hi[i], "), output_padding ", g.outpad[i], " in spatial dim ", i);
    out.push_back(o);
  }
  return out;
}

inline void validate(const char* op, const TensorList& weights, const TensorList& xs, const TensorList& ys,
              const std::vector<ConvGeom>& geo, bool need_contiguous) {
  for (size_t l = 0; l < weights.size(); ++l) {
    const auto& W = weights[l];
    const auto& g = geo[l];
    const auto st = W.scalar_type();
    SF_CHECK_TYPE(st == kFloat || st == kDouble || st == kBFloat16 || st == kHalf, op,
                  ": weights[", l, "] must be float32/float64/bfloat16/float16, got ", dtype_name(st));
    const auto acc = acc_type(st);
    const auto& x = xs[l];
    const auto& y = ys[l];
    SF_CHECK_VALUE(x.dim() == g.d + 1, op, ": xs[", l, "] must be (C_in, *spatial) with ", g.d,
                      " spatial dims, got ", shape_of(x));
    const int64_t cin = g.transposed ? W.size(0) : W.size(1) * g.groups;
    const int64_t cout = g.transposed ? W.size(1) * g.groups : W.size(0);
    SF_CHECK_VALUE(x.size(0) == cin, op, ": xs[", l, "] has ", x.size(0), " channels, the layer takes ", cin);
    SF_CHECK_VALUE(cout % g.groups == 0 && cin % g.groups == 0, op, ": layer ", l, ": channels (", cin, ", ",
                      cout, ") not divisible by groups=", g.groups);
    for (int64_t i = 0; i < g.d; ++i) {
      const int64_t n = x.size(1 + i);
      if (g.mode == PadMode::Reflect)
        SF_CHECK_VALUE(g.lo[i] < n && g.hi[i] < n, op, ": layer ", l, ": reflect padding must be < the input size");
      if (g.mode == PadMode::Circular)
        SF_CHECK_VALUE(g.lo[i] <= n && g.hi[i] <= n, op, ": layer ", l,
                          ": circular padding must be <= the input size");
      if (g.transposed)
        SF_CHECK_VALUE(g.outpad[i] < std::max(g.stride[i], g.dilation[i]), op, ": layer ", l,
                          ": output_padding must be smaller than stride or dilation");
    }
    auto oshape = output_shape(op, l, g, W, shape_of(x).dims);
    SF_CHECK_VALUE(shape_of(y).dims == oshape, op, ": ys[", l, "] must have the output shape ", Shape{oshape},
                   ", got ", shape_of(y));
    SF_CHECK_TYPE(x.scalar_type() == acc && y.scalar_type() == acc, op, ": xs[", l, "]/ys[", l, "] must be ",
                  dtype_name(acc), " for a ", dtype_name(st), " weight, got ", dtype_name(x.scalar_type()), "/",
                  dtype_name(y.scalar_type()));
    SF_CHECK_VALUE(x.device() == W.device() && y.device() == W.device(), op, ": xs[", l, "]/ys[", l,
                   "] must be on the weight's device ", device_name(W.device()));
    if (need_contiguous)
      SF_CHECK_VALUE(x.is_contiguous() && y.is_contiguous(), op, ": xs[", l, "]/ys[", l, "] must be contiguous");
  }
}

}  // namespace conv_detail
}  // namespace specreg_fast
