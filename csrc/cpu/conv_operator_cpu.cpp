// Conv-operator power iteration: specreg_fast::conv_power_step_ and specreg_fast::conv_sigma.
//
// A conv layer at a fixed input size is a linear map A(W): x -> conv(pad(x), W). One step on
// the persistent input-shaped x and output-shaped y is
//     t = A x,  y = t / |t|,  a = A^T t,  x = a / |a|,  estimate |a| / |t|  (= <y, A x_new>),
// so the estimate needs no third convolution. A^T is the transposed convolution (for stride 1
// and n_iter >= 2 a forward convolution with the flipped kernel, see adjoint_kernel) (with the
// output padding that restores the exact input size) followed by the adjoint of the explicit
// padding map: a crop for zeros, a fold of the wrapped borders for circular, and the backward
// of reflection/replication padding (which sums each reflected/replicated entry back onto its
// source) for reflect/replicate. For a ConvTranspose layer A is the transposed convolution and
// A^T the plain convolution.
//
// Everything is ATen ops on the weight's device, so the same function serves the CUDA
// registration (csrc/cuda/conv_operator_cuda.cpp). On CPU the norms are read on the host (no
// cost) and normalization is a single div_out into the user's buffer; elsewhere torch.where
// keeps the loop free of host synchronization unless `tol` needs the estimate.
//
// Per-layer hyperparameters travel in `params` (int[]), packed layer after layer; with d =
// weight.dim() - 2 spatial dims, layer l contributes 2 + 5 d entries:
//     [transposed, groups, stride[d], dilation[d], pad_lo[d], pad_hi[d], output_padding[d]]
// pad_lo/pad_hi are the padding before/after each spatial dim (asymmetric for 'same' with an
// even receptive field). `padding_modes` (str[]) holds one of zeros/circular/reflect/replicate
// per layer. specreg_fast/ops.py:pack_conv_params builds both from ConvSpec objects.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace specreg_fast {

namespace {

enum class PadMode { Zeros, Circular, Reflect, Replicate };

struct ConvGeom {
  int64_t d = 0;
  bool transposed = false;
  int64_t groups = 1;
  std::vector<int64_t> stride, dilation, lo, hi, outpad;
  PadMode mode = PadMode::Zeros;
  std::string mode_name;
  // Pad explicitly (at::pad) and convolve with zero padding: non-zero modes and asymmetric pads.
  bool explicit_pad = false;
  std::vector<int64_t> conv_pad;  // padding handed to at::convolution
  std::vector<int64_t> pad_vec;   // at::pad order: last dim first, (lo, hi) pairs
};

std::vector<ConvGeom> decode(const char* op, at::TensorList weights, at::IntArrayRef params,
                             const std::vector<std::string>& modes) {
  TORCH_CHECK_VALUE(modes.size() == weights.size(), op, ": padding_modes must have one entry per layer (",
                    weights.size(), "), got ", modes.size());
  std::vector<ConvGeom> out;
  size_t off = 0;
  for (size_t l = 0; l < weights.size(); ++l) {
    ConvGeom g;
    g.d = weights[l].dim() - 2;
    TORCH_CHECK_VALUE(g.d >= 1 && g.d <= 3, op, ": weights[", l, "] must be 3-D to 5-D (a 1-D to 3-D conv), got ",
                      weights[l].sizes());
    const size_t need = 2 + 5 * static_cast<size_t>(g.d);
    TORCH_CHECK_VALUE(off + need <= params.size(), op, ": params too short for layer ", l, " (need ", need,
                      " entries from offset ", off, ", have ", params.size(), ")");
    const int64_t* p = params.data() + off;
    g.transposed = p[0] != 0;
    g.groups = p[1];
    TORCH_CHECK_VALUE(g.groups >= 1, op, ": layer ", l, ": groups must be >= 1, got ", g.groups);
    for (int64_t i = 0; i < g.d; ++i) {
      g.stride.push_back(p[2 + i]);
      g.dilation.push_back(p[2 + g.d + i]);
      g.lo.push_back(p[2 + 2 * g.d + i]);
      g.hi.push_back(p[2 + 3 * g.d + i]);
      g.outpad.push_back(p[2 + 4 * g.d + i]);
      TORCH_CHECK_VALUE(g.stride.back() >= 1 && g.dilation.back() >= 1, op, ": layer ", l,
                        ": stride and dilation must be >= 1");
      TORCH_CHECK_VALUE(g.lo.back() >= 0 && g.hi.back() >= 0 && g.outpad.back() >= 0, op, ": layer ", l,
                        ": padding and output_padding must be >= 0");
    }
    off += need;
    const std::string m(modes[l]);
    g.mode_name = m;
    if (m == "zeros") g.mode = PadMode::Zeros;
    else if (m == "circular") g.mode = PadMode::Circular;
    else if (m == "reflect") g.mode = PadMode::Reflect;
    else if (m == "replicate") g.mode = PadMode::Replicate;
    else TORCH_CHECK_VALUE(false, op, ": layer ", l, ": padding mode must be zeros/circular/reflect/replicate, got '",
                           m, "'");
    bool sym = g.lo == g.hi;
    if (g.transposed) {
      TORCH_CHECK_VALUE(g.mode == PadMode::Zeros && sym, op, ": layer ", l,
                        ": a transposed conv takes symmetric zero padding only");
    } else {
      for (auto v : g.outpad) TORCH_CHECK_VALUE(v == 0, op, ": layer ", l, ": output_padding must be 0 for a conv");
    }
    g.explicit_pad = !g.transposed && (g.mode != PadMode::Zeros || !sym);
    g.conv_pad = g.explicit_pad ? std::vector<int64_t>(g.d, 0) : g.lo;
    for (int64_t i = g.d - 1; i >= 0; --i) {
      g.pad_vec.push_back(g.lo[i]);
      g.pad_vec.push_back(g.hi[i]);
    }
    out.push_back(std::move(g));
  }
  TORCH_CHECK_VALUE(off == params.size(), op, ": params has ", params.size(), " entries, the layers use ", off);
  return out;
}

at::Tensor pad_apply(const ConvGeom& g, const at::Tensor& x) {
  if (!g.explicit_pad) return x;
  switch (g.mode) {
    case PadMode::Zeros: return at::constant_pad_nd(x, g.pad_vec, 0);
    case PadMode::Circular: return at::pad(x, g.pad_vec, "circular");
    case PadMode::Reflect: return at::pad(x, g.pad_vec, "reflect");
    case PadMode::Replicate: return at::pad(x, g.pad_vec, "replicate");
  }
  return x;
}

// Exact adjoint of pad_apply; `x_like` has the unpadded shape (its values are not read).
at::Tensor pad_adjoint(const ConvGeom& g, const at::Tensor& gp, const at::Tensor& x_like) {
  if (!g.explicit_pad) return gp;
  switch (g.mode) {
    case PadMode::Zeros: {
      at::Tensor r = gp;
      for (int64_t i = 0; i < g.d; ++i) r = r.narrow(2 + i, g.lo[i], x_like.size(2 + i));
      return r;
    }
    case PadMode::Circular: {
      // Left pad of dim i holds x[n-lo:n], right pad holds x[0:hi]: fold them back.
      at::Tensor r = gp;
      for (int64_t i = 0; i < g.d; ++i) {
        const int64_t dim = 2 + i, n = x_like.size(dim), lo = g.lo[i], hi = g.hi[i];
        at::Tensor c = r.narrow(dim, lo, n).clone();
        if (lo > 0) c.narrow(dim, n - lo, lo).add_(r.narrow(dim, 0, lo));
        if (hi > 0) c.narrow(dim, 0, hi).add_(r.narrow(dim, lo + n, hi));
        r = c;
      }
      return r;
    }
    case PadMode::Reflect:
      if (g.d == 1) return at::reflection_pad1d_backward(gp, x_like, g.pad_vec);
      if (g.d == 2) return at::reflection_pad2d_backward(gp, x_like, g.pad_vec);
      return at::reflection_pad3d_backward(gp, x_like, g.pad_vec);
    case PadMode::Replicate:
      if (g.d == 1) return at::replication_pad1d_backward(gp, x_like, g.pad_vec);
      if (g.d == 2) return at::replication_pad2d_backward(gp, x_like, g.pad_vec);
      return at::replication_pad3d_backward(gp, x_like, g.pad_vec);
  }
  return gp;
}

at::Tensor op_apply(const ConvGeom& g, const at::Tensor& W, const at::Tensor& x) {
  return at::convolution(pad_apply(g, x), W, c10::nullopt, g.stride, g.conv_pad, g.dilation, g.transposed,
                         g.outpad, g.groups);
}

// For a stride-1 conv the adjoint is itself a forward convolution, with the kernel flipped in
// space and its in/out channels swapped (per group) and padding d (k - 1) - p. The forward
// kernels (oneDNN) are faster than the transposed ones for single images with many channels
// (512x512 at 4x4: 1.5 -> 0.9 ms), so the power step builds this kernel once per call.
// Returns an undefined tensor when the geometry has no such form.
at::Tensor adjoint_kernel(const ConvGeom& g, const at::Tensor& W) {
  if (g.transposed) return {};
  for (int64_t i = 0; i < g.d; ++i) {
    if (g.stride[i] != 1 || g.dilation[i] * (W.size(2 + i) - 1) < g.conv_pad[i]) return {};
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
  return W.reshape(grouped).flip(flip_dims).transpose(1, 2).reshape(flat).contiguous();
}

// A^T y; `x_like` has the input shape; `Wadj` is adjoint_kernel(g, W) or undefined.
at::Tensor op_adjoint(const ConvGeom& g, const at::Tensor& W, const at::Tensor& y, const at::Tensor& x_like,
                      const at::Tensor& Wadj = {}) {
  if (Wadj.defined()) {
    std::vector<int64_t> pad(g.d);
    for (int64_t i = 0; i < g.d; ++i) pad[i] = g.dilation[i] * (W.size(2 + i) - 1) - g.conv_pad[i];
    at::Tensor gp = at::convolution(y, Wadj, c10::nullopt, g.stride, pad, g.dilation, false,
                                    std::vector<int64_t>(g.d, 0), g.groups);
    return pad_adjoint(g, gp, x_like);
  }
  if (g.transposed) {
    at::Tensor r = at::convolution(y, W, c10::nullopt, g.stride, g.lo, g.dilation, false,
                                   std::vector<int64_t>(g.d, 0), g.groups);
    // output_padding >= stride (allowed when dilation > stride) adds input positions that no
    // input entry reaches: drop them.
    for (int64_t i = 0; i < g.d; ++i)
      if (r.size(2 + i) != x_like.size(2 + i)) r = r.narrow(2 + i, 0, x_like.size(2 + i));
    return r;
  }
  std::vector<int64_t> op(g.d);
  for (int64_t i = 0; i < g.d; ++i) {
    const int64_t target = x_like.size(2 + i) + (g.explicit_pad ? g.lo[i] + g.hi[i] : 0);
    const int64_t k = W.size(2 + i);
    op[i] = target - ((y.size(2 + i) - 1) * g.stride[i] - 2 * g.conv_pad[i] + g.dilation[i] * (k - 1) + 1);
  }
  at::Tensor gp = at::convolution(y, W, c10::nullopt, g.stride, g.conv_pad, g.dilation, true, op, g.groups);
  return pad_adjoint(g, gp, x_like);
}

at::ScalarType acc_type(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

at::ScalarType out_type(at::TensorList weights) {
  for (const auto& w : weights)
    if (w.scalar_type() == at::kDouble) return at::kDouble;
  return at::kFloat;
}

std::vector<int64_t> output_shape(const ConvGeom& g, const at::Tensor& W, at::IntArrayRef in) {
  std::vector<int64_t> out;
  out.push_back(g.transposed ? W.size(1) * g.groups : W.size(0));
  for (int64_t i = 0; i < g.d; ++i) {
    const int64_t n = in[1 + i], k = W.size(2 + i), s = g.stride[i], dl = g.dilation[i];
    if (g.transposed)
      out.push_back((n - 1) * s - g.lo[i] - g.hi[i] + dl * (k - 1) + g.outpad[i] + 1);
    else
      out.push_back((n + g.lo[i] + g.hi[i] - dl * (k - 1) - 1) / s + 1);
  }
  return out;
}

void validate(const char* op, at::TensorList weights, at::TensorList xs, at::TensorList ys,
              const std::vector<ConvGeom>& geo, bool need_contiguous) {
  for (size_t l = 0; l < weights.size(); ++l) {
    const auto& W = weights[l];
    const auto& g = geo[l];
    const auto st = W.scalar_type();
    TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, op,
                     ": weights[", l, "] must be float32/float64/bfloat16/float16, got ", st);
    const auto acc = acc_type(st);
    const auto& x = xs[l];
    const auto& y = ys[l];
    TORCH_CHECK_VALUE(x.dim() == g.d + 1, op, ": xs[", l, "] must be (C_in, *spatial) with ", g.d,
                      " spatial dims, got ", x.sizes());
    const int64_t cin = g.transposed ? W.size(0) : W.size(1) * g.groups;
    const int64_t cout = g.transposed ? W.size(1) * g.groups : W.size(0);
    TORCH_CHECK_VALUE(x.size(0) == cin, op, ": xs[", l, "] has ", x.size(0), " channels, the layer takes ", cin);
    TORCH_CHECK_VALUE(cout % g.groups == 0 && cin % g.groups == 0, op, ": layer ", l, ": channels (", cin, ", ",
                      cout, ") not divisible by groups=", g.groups);
    for (int64_t i = 0; i < g.d; ++i) {
      const int64_t n = x.size(1 + i);
      if (g.mode == PadMode::Reflect)
        TORCH_CHECK_VALUE(g.lo[i] < n && g.hi[i] < n, op, ": layer ", l, ": reflect padding must be < the input size");
      if (g.mode == PadMode::Circular)
        TORCH_CHECK_VALUE(g.lo[i] <= n && g.hi[i] <= n, op, ": layer ", l,
                          ": circular padding must be <= the input size");
      if (g.transposed)
        TORCH_CHECK_VALUE(g.outpad[i] < std::max(g.stride[i], g.dilation[i]), op, ": layer ", l,
                          ": output_padding must be smaller than stride or dilation");
    }
    auto oshape = output_shape(g, W, x.sizes());
    for (auto v : oshape) TORCH_CHECK_VALUE(v >= 1, op, ": layer ", l, ": input ", x.sizes(), " too small for the kernel");
    TORCH_CHECK_VALUE(y.sizes() == at::IntArrayRef(oshape), op, ": ys[", l, "] must have the output shape ", oshape,
                      ", got ", y.sizes());
    TORCH_CHECK_TYPE(x.scalar_type() == acc && y.scalar_type() == acc, op, ": xs[", l, "]/ys[", l, "] must be ", acc,
                     " for a ", st, " weight, got ", x.scalar_type(), "/", y.scalar_type());
    TORCH_CHECK_VALUE(x.device() == W.device() && y.device() == W.device(), op, ": xs[", l, "]/ys[", l,
                      "] must be on the weight's device ", W.device());
    if (need_contiguous)
      TORCH_CHECK_VALUE(x.is_contiguous() && y.is_contiguous(), op, ": xs[", l, "]/ys[", l, "] must be contiguous");
  }
}

}  // namespace

// Device-agnostic: registered for CPU here and for CUDA in csrc/cuda/conv_operator_cuda.cpp.
at::Tensor conv_power_step_impl(at::TensorList weights, at::TensorList xs, at::TensorList ys, at::IntArrayRef params,
                                const std::vector<std::string>& padding_modes, int64_t n_iter, double tol) {
  const char* op = "specreg_fast::conv_power_step_";
  // The estimates are detached and xs/ys are state, not graph nodes.
  at::NoGradGuard no_grad;
  TORCH_CHECK_VALUE(xs.size() == weights.size() && ys.size() == weights.size(), op,
                    ": weights, xs and ys must have the same length, got ", weights.size(), ", ", xs.size(), ", ",
                    ys.size());
  TORCH_CHECK_VALUE(n_iter >= 0, op, ": n_iter must be >= 0, got ", n_iter);
  TORCH_CHECK_VALUE(tol >= 0 && std::isfinite(tol), op, ": tol must be finite and >= 0, got ", tol);
  auto geo = decode(op, weights, params, padding_modes);
  validate(op, weights, xs, ys, geo, /*need_contiguous=*/true);
  const auto odt = out_type(weights);
  at::Tensor out = at::zeros({static_cast<int64_t>(weights.size())},
                             at::TensorOptions().dtype(odt).device(weights.empty() ? at::kCPU : weights[0].device()));
  if (weights.empty()) return out;
  for (size_t l = 0; l < weights.size(); ++l) {
    const auto& g = geo[l];
    const auto acc = acc_type(weights[l].scalar_type());
    const at::Tensor W = weights[l].to(acc);
    const bool host = W.device().is_cpu();
    at::Tensor x = xs[l].unsqueeze(0);  // views of the user's buffers: written in place
    at::Tensor y = ys[l].unsqueeze(0);
    // A non-finite weight shows up as a non-finite |A x| or |A^T t| (inf * 0 = NaN, so even a
    // weight entry that meets only zeros does), which is checked at every step instead of
    // scanning the weight (a full pass over W, as costly as an elementwise op per layer).
    const at::Tensor x0 = x.clone(), y0 = y.clone();
    // Building the flipped kernel is a pass over W: worth it only when several steps reuse it.
    const at::Tensor Wadj = n_iter >= 2 ? adjoint_kernel(g, W) : at::Tensor();
    at::Tensor est = at::zeros({}, x.options());
    at::Tensor bad = at::zeros({}, x.options().dtype(at::kBool));
    if (n_iter == 0) est = (y * op_apply(g, W, x)).sum();
    double prev = std::numeric_limits<double>::quiet_NaN();
    for (int64_t it = 0; it < n_iter; ++it) {
      const at::Tensor t = op_apply(g, W, x);
      const at::Tensor tn = at::linalg_vector_norm(t);
      const at::Tensor a = op_adjoint(g, W, t, x, Wadj);  // A^T t: direction of the new x, |a|/|t| = estimate
      const at::Tensor an = at::linalg_vector_norm(a);
      double cur = 0;
      if (host) {
        const double tnv = tn.item<double>(), anv = an.item<double>();
        if (!std::isfinite(tnv) || !std::isfinite(anv)) {
          bad.fill_(true);
          break;
        }
        if (!(tnv > 0 && anv > 0)) {
          // A x = 0 (zero weight, or x in the kernel of A): keep the vectors, estimate 0.
          est.zero_();
          break;
        }
        at::div_out(y, t, tn);
        at::div_out(x, a, an);
        cur = anv / tnv;
        est.fill_(cur);
      } else {
        const at::Tensor fin = at::isfinite(tn) & at::isfinite(an);
        bad = bad | ~fin;
        const at::Tensor ok = (tn > 0) & (an > 0) & fin & ~bad;
        y.copy_(at::where(ok, t / tn, y));
        x.copy_(at::where(ok, a / an, x));
        est = at::where(ok, an / tn, at::zeros_like(an));
        if (tol > 0) cur = est.item<double>();
      }
      if (tol > 0) {
        if (std::abs(cur - prev) <= tol * std::abs(cur)) break;
        prev = cur;
      }
    }
    if (n_iter == 0) bad = ~at::isfinite(est);
    // Non-finite: vectors back to their values before the call, estimate NaN.
    if (host) {
      if (bad.item<bool>()) {
        x.copy_(x0);
        y.copy_(y0);
        est.fill_(std::numeric_limits<double>::quiet_NaN());
      }
    } else {
      x.copy_(at::where(bad, x0, x));
      y.copy_(at::where(bad, y0, y));
      est = at::where(bad, at::full({}, std::numeric_limits<double>::quiet_NaN(), est.options()), est);
    }
    out.select(0, l).copy_(est);
  }
  return out;
}

at::Tensor conv_sigma_impl(at::TensorList weights, at::TensorList xs, at::TensorList ys, at::IntArrayRef params,
                           const std::vector<std::string>& padding_modes) {
  const char* op = "specreg_fast::conv_sigma";
  at::NoGradGuard no_grad;  // differentiated by the registered backward, not through these ops
  TORCH_CHECK_VALUE(xs.size() == weights.size() && ys.size() == weights.size(), op,
                    ": weights, xs and ys must have the same length");
  auto geo = decode(op, weights, params, padding_modes);
  validate(op, weights, xs, ys, geo, /*need_contiguous=*/false);
  const auto odt = out_type(weights);
  at::Tensor out = at::zeros({static_cast<int64_t>(weights.size())},
                             at::TensorOptions().dtype(odt).device(weights.empty() ? at::kCPU : weights[0].device()));
  for (size_t l = 0; l < weights.size(); ++l) {
    const auto acc = acc_type(weights[l].scalar_type());
    const at::Tensor W = weights[l].to(acc);
    out.select(0, l).copy_((ys[l].unsqueeze(0) * op_apply(geo[l], W, xs[l].unsqueeze(0))).sum());
  }
  return out;
}

// A^T y for each layer (the op's own adjoint, exposed so tests can check <A x, y> = <x, A^T y>).
std::vector<at::Tensor> conv_adjoint_impl(at::TensorList weights, at::TensorList xs, at::TensorList ys,
                                          at::IntArrayRef params, const std::vector<std::string>& padding_modes) {
  const char* op = "specreg_fast::conv_adjoint";
  TORCH_CHECK_VALUE(xs.size() == weights.size() && ys.size() == weights.size(), op,
                    ": weights, xs and ys must have the same length");
  auto geo = decode(op, weights, params, padding_modes);
  validate(op, weights, xs, ys, geo, /*need_contiguous=*/false);
  std::vector<at::Tensor> res;
  for (size_t l = 0; l < weights.size(); ++l) {
    const at::Tensor W = weights[l].to(acc_type(weights[l].scalar_type()));
    res.push_back(op_adjoint(geo[l], W, ys[l].unsqueeze(0), xs[l].unsqueeze(0)).squeeze(0).contiguous());
  }
  return res;
}

}  // namespace specreg_fast

TORCH_LIBRARY_IMPL(specreg_fast, CPU, m) {
  m.impl("conv_power_step_", &specreg_fast::conv_power_step_impl);
  m.impl("conv_sigma", &specreg_fast::conv_sigma_impl);
  m.impl("conv_adjoint", &specreg_fast::conv_adjoint_impl);
}
