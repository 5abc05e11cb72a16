// The paper's conv norm without the FFT of the kernel: specreg_fast::circular_power_step_.
//
// A conv with circular (wrap-around) padding, stride s dividing the input size N, is
// block-diagonal in the polyphase-DFT basis of its input: split x into its prod(s) phases
// x_r[m] = x[s m + r] (each of size N/s), take the orthonormal DFT over m, and for every
// frequency w the output's DFT is Y(w) = P(w) X(w) with one complex block P(w) of shape
// C_out x (C_in prod(s)) (Sedghi, Gupta & Long 2019; strides by polyphase splitting; the
// explicit blocks are specreg_fast.reference.circular_transfer_blocks). sigma_max of the
// operator is max_w sigma_max(P(w)).
//
// The released code of the paper builds every P(w) (an FFT of the kernel zero-padded to the
// input size) and runs a batched complex power iteration over the blocks. Here the same
// batched iteration runs matrix-free on ONE input-shaped real tensor x that holds all the
// per-frequency vectors X(w) at once (its polyphase DFT). One step:
//     t  =  A x          (circular conv in space)  sigma(w) = |rFFT(t)(w)| / |X(w)|
//                                                  (= |P(w) X(w)| for a unit X(w))
//     a  =  A^T t        (transposed conv + fold of the wrapped border)  = P(w)^H P(w) X(w)
//     x  <- a with every frequency normalized   (polyphase rFFT of a, divide, inverse)
// i.e. two convolutions (as for the zero-padding operator) plus three FFTs of input- and
// output-sized tensors, never of the kernel (and one more per call, for X of the state).
// The estimate is max_w |P(w) X(w)| (the authors' sigma^2 ~ max |P v|^2), and the op also
// returns the real, unit, input- and
// output-shaped pair (x*, y*) of the top frequency w* (written into x_tops/y_tops), for which
//     <y*, A x*> = |P(w*) X(w*)| = the estimate,
// so specreg_fast::conv_sigma(weight, x*, y*) (circular mode) is the differentiable sigma and
// its backward, the conv weight-gradient of (x*, y*), is the closed form
// Re(u^H dP(w*) v) over the kernel taps: a real kernel reaches w* and -w* with conjugate
// blocks, and the real pair carries both halves (each with weight 1/2), so the gradient is
// that of the single block (see specreg_fast/fft.py).
//
// A frequency whose A^T A X(w) vanishes keeps its previous unit vector (a zero kernel, or a
// zero-initialized residual conv, must not kill the persistent vectors); one with X(w) = 0
// (a degenerate state) restarts at the first unit vector. Non-finite weights: x untouched,
// estimate NaN.
//
// params/padding: the conv-op packing (csrc/specreg_fast.cpp), mode circular implied; the
// padding must make the output size N/s (a full wrap-around conv), which
// specreg_fast/fft.py guarantees by handing total padding dilation*(k-1).
//
// LibTorch stable ABI (csrc/stable_api.h): the ATen calls of this file and the route each takes
// now (conv_geometry.h's own: see csrc/cpu/conv_operator_cpu.cpp):
//   at::fft_rfftn, at::fft_irfftn                    -> torch_call_dispatcher (norm "ortho")
//   at::real/at::imag (device |Z(w)|)                -> torch_call_dispatcher (aten::view_as_real)
//   at::arange(..) == argmax (device one-hot)        -> torch_call_dispatcher (aten::one_hot of
//                                                       aten::argmax; arange takes a Scalar)
//   at::remainder, at::arange, at::polar (device single_frequency) -> gone: that branch was never
//                                                       reached (single_frequency runs on the host only)
//   at::linalg_vector_norm(..).clamp_min(tiny)       -> host_norm on the CPU; sqrt(sum(t*t)) and
//                                                       aten::clamp_min.Tensor elsewhere
//   at::where, isfinite, eq, any, max, argmax, div, mul, clamp_min -> torch_call_dispatcher
//   Tensor::add_                                     -> torch::stable::subtract(a, b, -1) + copy_
//   at::zeros/empty/ones_like                        -> stable_api.h zeros/empty, fill_
//   reshape, permute, select, (un)squeeze, clone, copy_, contiguous, to, zero_, fill_ -> torch::stable::
//   AT_DISPATCH_FLOATING_TYPES                       -> dispatch_floating (stable_api.h)
//   item<..>                                         -> item_double (host read)
//   at::NoGradGuard                                  -> stable_api.h NoGradGuard
#include "conv_geometry.h"
#include "cpu/conv_gemm.h"
#include "stable_contracts.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <utility>
#include <vector>

namespace specreg_fast {

using namespace conv_detail;

namespace {

// The polyphase index map as three dims (leading dims of size 1 and stride 1 for d < 3).
struct Phases3 {
  int64_t n[3], s[3], m[3];
};

Phases3 phases3(const std::vector<int64_t>& s, const std::vector<int64_t>& in_shape) {
  const int64_t d = static_cast<int64_t>(s.size());
  Phases3 q{};
  for (int64_t j = 0; j < 3; ++j) q.n[j] = q.s[j] = q.m[j] = 1;
  for (int64_t i = 0; i < d; ++i) {
    q.n[3 - d + i] = in_shape[1 + i];
    q.s[3 - d + i] = s[i];
    q.m[3 - d + i] = in_shape[1 + i] / s[i];
  }
  return q;
}

// Host split/merge as one gather/scatter pass over contiguous tensors (the reshape-permute-
// reshape form costs a strided ATen copy of ~15 us per call on these sizes, several per
// step). `to_phases` = split (x -> z), else merge (z -> x).
template <typename T>
void polyphase_host(const Phases3& q, int64_t C, T* x, T* z, bool to_phases) {
  const int64_t mvol = q.m[0] * q.m[1] * q.m[2], nvol = q.n[0] * q.n[1] * q.n[2];
  for (int64_t c = 0; c < C; ++c)
    for (int64_t p0 = 0; p0 < q.s[0]; ++p0)
      for (int64_t p1 = 0; p1 < q.s[1]; ++p1)
        for (int64_t p2 = 0; p2 < q.s[2]; ++p2) {
          T* zp = z + (((c * q.s[0] + p0) * q.s[1] + p1) * q.s[2] + p2) * mvol;
          T* xc = x + c * nvol;
          for (int64_t i0 = 0; i0 < q.m[0]; ++i0)
            for (int64_t i1 = 0; i1 < q.m[1]; ++i1) {
              T* zr = zp + (i0 * q.m[1] + i1) * q.m[2];
              T* xr = xc + ((i0 * q.s[0] + p0) * q.n[1] + i1 * q.s[1] + p1) * q.n[2] + p2;
              if (to_phases)
                for (int64_t i2 = 0; i2 < q.m[2]; ++i2) zr[i2] = xr[i2 * q.s[2]];
              else
                for (int64_t i2 = 0; i2 < q.m[2]; ++i2) xr[i2 * q.s[2]] = zr[i2];
            }
        }
}

ScalarType real_type(ScalarType st) {
  return st == kComplexDouble ? kDouble : st == kComplexFloat ? kFloat : st;
}

// The least positive normal number of x's dtype: the clamp of norms before a division (a
// double-precision one would round to 0 in float32 and turn 0 / 0 into NaN).
double tiny_of(ScalarType st) {
  return real_type(st) == kDouble ? std::numeric_limits<double>::min() : std::numeric_limits<float>::min();
}
Tensor tiny_tensor(const Tensor& like) {
  const ScalarType rt = real_type(like.scalar_type());
  return scalar_tensor(tiny_of(rt), rt, like.device());
}

bool unit_stride(const std::vector<int64_t>& s) {
  return std::all_of(s.begin(), s.end(), [](int64_t v) { return v == 1; });
}

// Whether any entry of a contiguous float/double host tensor is 0.
bool host_any_zero(const Tensor& t) {
  bool found = false;
  dispatch_floating(t.scalar_type(), "host_any_zero", [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    const scalar_t* p = t.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < t.numel() && !found; ++i) found = p[i] == 0;
  });
  return found;
}

// (C, N_1..N_d) -> (C * prod(s), N_1/s_1, .., N_d/s_d): channel-major, then the phases.
Tensor polyphase_split(const Tensor& x, const std::vector<int64_t>& s) {
  const int64_t d = static_cast<int64_t>(s.size());
  std::vector<int64_t> shape{x.size(0)}, perm{0}, out{x.size(0)};
  int64_t phases = 1;
  for (int64_t i = 0; i < d; ++i) phases *= s[i];
  out[0] *= phases;
  for (int64_t i = 0; i < d; ++i) out.push_back(x.size(1 + i) / s[i]);
  if (unit_stride(s)) return torch::stable::reshape(x, out);
  if (x.is_cpu()) {
    const Tensor xc = contig(x);
    Tensor z = empty(out, x.scalar_type(), x.device());
    dispatch_floating(x.scalar_type(), "polyphase_split", [&](auto* tag) {
      using scalar_t = std::remove_pointer_t<decltype(tag)>;
      polyphase_host<scalar_t>(phases3(s, shape_of(x).dims), x.size(0),
                               const_cast<scalar_t*>(xc.const_data_ptr<scalar_t>()), z.mutable_data_ptr<scalar_t>(),
                               true);
    });
    return z;
  }
  for (int64_t i = 0; i < d; ++i) {
    shape.push_back(x.size(1 + i) / s[i]);
    shape.push_back(s[i]);
  }
  for (int64_t i = 0; i < d; ++i) perm.push_back(2 + 2 * i);
  for (int64_t i = 0; i < d; ++i) perm.push_back(1 + 2 * i);
  return torch::stable::reshape(torch::stable::permute(torch::stable::reshape(x, shape), perm), out);
}

// Inverse of polyphase_split; `like` has the input shape.
Tensor polyphase_merge(const Tensor& z, const std::vector<int64_t>& s, const std::vector<int64_t>& like) {
  const int64_t d = static_cast<int64_t>(s.size());
  if (unit_stride(s)) return torch::stable::reshape(z, like);
  if (z.is_cpu()) {
    const Tensor zc = contig(z);
    Tensor x = empty(like, z.scalar_type(), z.device());
    dispatch_floating(z.scalar_type(), "polyphase_merge", [&](auto* tag) {
      using scalar_t = std::remove_pointer_t<decltype(tag)>;
      polyphase_host<scalar_t>(phases3(s, like), like[0], x.mutable_data_ptr<scalar_t>(),
                               const_cast<scalar_t*>(zc.const_data_ptr<scalar_t>()), false);
    });
    return x;
  }
  std::vector<int64_t> shape{like[0]}, perm{0};
  for (int64_t i = 0; i < d; ++i) shape.push_back(s[i]);
  for (int64_t i = 0; i < d; ++i) shape.push_back(like[1 + i] / s[i]);
  for (int64_t i = 0; i < d; ++i) {
    perm.push_back(1 + d + i);
    perm.push_back(1 + i);
  }
  return torch::stable::reshape(torch::stable::permute(torch::stable::reshape(z, shape), perm), like);
}

struct Spectral {
  std::vector<int64_t> s;         // stride
  std::vector<int64_t> m;         // N / s: the frequency grid (full sizes, for the inverse)
  std::vector<int64_t> dims;      // 1..d
  std::vector<int64_t> in_shape;

  Tensor forward_in(const Tensor& x) const {  // polyphase rFFT of an input-shaped tensor
    return aten::fft_rfftn(polyphase_split(x, s), dims);
  }
  Tensor inverse_in(const Tensor& X) const { return polyphase_merge(aten::fft_irfftn(X, m, dims), s, in_shape); }
  Tensor forward_out(const Tensor& y) const { return aten::fft_rfftn(y, dims); }
  Tensor inverse_out(const Tensor& Y) const { return aten::fft_irfftn(Y, m, dims); }
};

// |Z(w)| over the channel dim: one real value per frequency. (linalg_vector_norm over the
// outer dim of a complex tensor measured 10x slower here: 320 vs 25 us at 256 x 16 x 9.) On
// the host a plain loop (channel-outer, fixed order) replaces the ATen ops, each of which
// costs tens of microseconds on these few-thousand-entry tensors.
Tensor freq_norms(const Tensor& Z) {
  if (!Z.is_cpu()) {
    const Tensor R = aten::view_as_real(Z);  // (C, *freq, 2)
    const std::vector<int64_t> red{0, R.dim() - 1};
    return aten::sqrt(torch::stable::sum(aten::mul(R, R), red));
  }
  const Tensor Zc = contig(Z);
  const auto rt = real_type(Z.scalar_type());
  std::vector<int64_t> fshape = shape_of(Z).dims;
  fshape.erase(fshape.begin());
  Tensor out = zeros(fshape, rt, Z.device());
  const int64_t C = Z.size(0), nf = out.numel();
  dispatch_floating(rt, "freq_norms", [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    const scalar_t* z = reinterpret_cast<const scalar_t*>(Zc.const_data_ptr());
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* zc = z + 2 * c * nf;
      for (int64_t f = 0; f < nf; ++f) o[f] += zc[2 * f] * zc[2 * f] + zc[2 * f + 1] * zc[2 * f + 1];
    }
    for (int64_t f = 0; f < nf; ++f) o[f] = std::sqrt(o[f]);
  });
  return out;
}

// Z(w) / max(n(w), tiny) for every channel, in place on a contiguous host tensor.
void divide_by_freq_norms_(Tensor& Z, const Tensor& n) {
  const auto rt = real_type(Z.scalar_type());
  const int64_t C = Z.size(0), nf = n.numel();
  dispatch_floating(rt, "divide_by_freq_norms_", [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    scalar_t* z = reinterpret_cast<scalar_t*>(Z.mutable_data_ptr());
    const scalar_t* nn = n.const_data_ptr<scalar_t>();
    std::vector<scalar_t> inv(nf);
    for (int64_t f = 0; f < nf; ++f) inv[f] = scalar_t(1) / std::max(nn[f], std::numeric_limits<scalar_t>::min());
    for (int64_t c = 0; c < C; ++c) {
      scalar_t* zc = z + 2 * c * nf;
      for (int64_t f = 0; f < nf; ++f) {
        zc[2 * f] *= inv[f];
        zc[2 * f + 1] *= inv[f];
      }
    }
  });
}

// The real signal of one frequency: Re(z (x) exp(2 pi i <w, n> / m)) on the grid m, for a
// channel vector z (C,) of a host tensor (the angle reduced mod m in integers first, for
// accuracy). Host only: the other devices take the inverse FFT of a one-hot spectrum (top_pair).
Tensor single_frequency(const Tensor& z, const std::vector<int64_t>& w, const std::vector<int64_t>& m) {
  const ScalarType rt = real_type(z.scalar_type());
  const int64_t d = static_cast<int64_t>(m.size());
  // The phase table as a product of per-dim unit complex numbers, in double.
  int64_t total = 1;
  for (auto v : m) total *= v;
  std::vector<double> er(total, 1.0), ei(total, 0.0);
  int64_t inner = total;
  for (int64_t i = 0; i < d; ++i) {
    inner /= m[i];
    for (int64_t idx = 0; idx < total; ++idx) {
      const int64_t ni = (idx / inner) % m[i];
      const double ang = 2 * M_PI * static_cast<double>((ni * w[i]) % m[i]) / static_cast<double>(m[i]);
      const double c = std::cos(ang), s = std::sin(ang);
      const double r = er[idx] * c - ei[idx] * s, im = er[idx] * s + ei[idx] * c;
      er[idx] = r;
      ei[idx] = im;
    }
  }
  std::vector<int64_t> shape{z.size(0)};
  shape.insert(shape.end(), m.begin(), m.end());
  Tensor out = empty(shape, rt, z.device());
  const Tensor zc = contig(z);
  dispatch_floating(rt, "single_frequency", [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    const scalar_t* zz = reinterpret_cast<const scalar_t*>(zc.const_data_ptr());
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < z.size(0); ++c) {
      const double zr = zz[2 * c], zi = zz[2 * c + 1];
      for (int64_t idx = 0; idx < total; ++idx) o[c * total + idx] = static_cast<scalar_t>(zr * er[idx] - zi * ei[idx]);
    }
  });
  return out;
}

// dst = src / max(|src|, tiny): on the host with the loops of csrc/cpu/conv_gemm_cpu.cpp
// (src contiguous), elsewhere through the dispatcher.
void copy_normalized(Tensor dst, const Tensor& src) {
  if (src.is_cpu()) {
    const Tensor sc = contig(src);
    const double n = std::max(cpu::host_norm(sc), tiny_of(sc.scalar_type()));
    if (dst.is_contiguous()) {
      cpu::host_divide(dst, sc, n);
    } else {
      Tensor tmp = empty_as(sc);
      cpu::host_divide(tmp, sc, n);
      torch::stable::copy_(dst, tmp);
    }
    return;
  }
  torch::stable::copy_(dst, aten::div(src, aten::clamp_min(aten::norm(src), tiny_tensor(src))));
}

// Writes the unit real pair (x*, y*) of the top frequency w* = argmax sig: x* carries X(w*)
// (and its mirror), y* = the matching output T(w*) = P(w*) X(w*), so that
// <y*, A x*> = |T(w*)| / |X(w*)| = sig(w*).
void top_pair(const Spectral& F, const Tensor& sig, const Tensor& X, const Tensor& T, const Tensor& x_out,
              const Tensor& y_out) {
  const Tensor flat = torch::stable::reshape(sig, {-1});
  Tensor xt, yt;
  if (sig.is_cpu()) {
    // One frequency built directly (no inverse FFT of a one-hot spectrum): the index is read
    // on the host, which costs nothing on the CPU.
    const int64_t top = static_cast<int64_t>(item_double(aten::argmax(flat)));
    int64_t j = top;
    std::vector<int64_t> w(sig.dim());
    for (int64_t i = sig.dim() - 1; i >= 0; --i) {
      w[i] = j % sig.size(i);
      j /= sig.size(i);
    }
    const Tensor Xf = torch::stable::reshape(X, {X.size(0), -1}), Tf = torch::stable::reshape(T, {T.size(0), -1});
    xt = polyphase_merge(single_frequency(torch::stable::select(Xf, 1, top), w, F.m), F.s, F.in_shape);
    yt = single_frequency(torch::stable::select(Tf, 1, top), w, F.m);
  } else {
    // Elsewhere without a host sync: inverse FFTs of the one-hot spectra.
    const Tensor onehot =
        torch::stable::reshape(as_dtype(aten::one_hot(aten::argmax(flat), flat.numel()), sig.scalar_type()),
                               shape_of(sig).dims);
    xt = F.inverse_in(aten::mul(X, onehot));
    yt = F.inverse_out(aten::mul(T, onehot));
  }
  copy_normalized(x_out, xt);
  copy_normalized(y_out, yt);
}

// max over a contiguous float/double host tensor, NaN if any entry is NaN (as torch.max).
double host_max(const Tensor& t) {
  double best = -std::numeric_limits<double>::infinity();
  dispatch_floating(t.scalar_type(), "host_max", [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    const scalar_t* p = t.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < t.numel(); ++i) {
      const double v = p[i];
      if (std::isnan(v)) {
        best = v;
        break;
      }
      best = std::max(best, v);
    }
  });
  return best;
}

// (X / max(nx, tiny)) with e_0 added where nx = 0: the unit vectors of X, restarted at the
// first unit vector where X(w) = 0.
Tensor unit_or_e0(const Tensor& X, const Tensor& nx, const Tensor& tiny) {
  Tensor U = aten::div(X, aten::clamp_min(nx, tiny));
  Tensor U0 = torch::stable::select(U, 0, 0);
  const Tensor zero = scalar_tensor(0.0, nx.scalar_type(), nx.device());
  torch::stable::copy_(U0, aten::add(U0, as_dtype(aten::eq(nx, zero), nx.scalar_type())));
  return U;
}

Tensor ones_like(const Tensor& t) {
  Tensor o = empty_as(t);
  torch::stable::fill_(o, 1.0);
  return o;
}

}  // namespace

Tensor circular_power_step_impl(const TensorList& weights, const TensorList& xs, const TensorList& x_tops,
                                const TensorList& y_tops, const std::vector<int64_t>& params, int64_t n_iter) {
  const char* op = "specreg_fast::circular_power_step_";
  NoGradGuard no_grad;
  SF_CHECK_VALUE(xs.size() == weights.size() && x_tops.size() == weights.size() && y_tops.size() == weights.size(),
                 op, ": weights, xs, x_tops and y_tops must have the same length, got ", weights.size(), ", ",
                 xs.size(), ", ", x_tops.size(), ", ", y_tops.size());
  check_n_iter_stable(op, n_iter);
  const std::vector<std::string> modes(weights.size(), "circular");
  auto geo = decode(op, weights, params, modes);
  const auto odt = out_type(weights);
  const Device dev = weights.empty() ? Device(DeviceType::CPU) : weights[0].device();
  Tensor out = zeros({static_cast<int64_t>(weights.size())}, odt, dev);
  // Shapes and types first, for every layer: nothing is written unless all layers are valid.
  for (size_t l = 0; l < weights.size(); ++l) {
    const auto& W = weights[l];
    const auto& g = geo[l];
    const auto& x = xs[l];
    const auto st = W.scalar_type();
    SF_CHECK_TYPE(st == kFloat || st == kDouble || st == kBFloat16 || st == kHalf, op, ": weights[", l,
                  "] must be float32/float64/bfloat16/float16, got ", dtype_name(st));
    SF_CHECK_VALUE(!g.transposed, op, ": layer ", l, ": a circular conv norm needs a ConvNd, not a transposed conv");
    SF_CHECK_VALUE(x.dim() == g.d + 1, op, ": xs[", l, "] must be (C_in, *spatial) with ", g.d,
                   " spatial dims, got ", shape_of(x));
    SF_CHECK_VALUE(x.size(0) == W.size(1) * g.groups, op, ": xs[", l, "] has ", x.size(0),
                   " channels, the layer takes ", W.size(1) * g.groups);
    SF_CHECK_VALUE(W.size(0) % g.groups == 0, op, ": layer ", l, ": C_out=", W.size(0), " not divisible by groups=",
                   g.groups);
    SF_CHECK_TYPE(x.scalar_type() == acc_type(st), op, ": xs[", l, "] must be ", dtype_name(acc_type(st)), " for a ",
                  dtype_name(st), " weight, got ", dtype_name(x.scalar_type()));
    SF_CHECK_VALUE(x.device() == W.device(), op, ": xs[", l, "] must be on the weight's device ",
                   device_name(W.device()));
    SF_CHECK_VALUE(x.is_contiguous(), op, ": xs[", l, "] must be contiguous");
    for (int64_t i = 0; i < g.d; ++i) {
      const int64_t n = x.size(1 + i);
      SF_CHECK_VALUE(n % g.stride[i] == 0, op, ": layer ", l, ": stride ", g.stride[i],
                     " must divide the input size ", n, " (spatial dim ", i, ")");
      SF_CHECK_VALUE(g.lo[i] <= n && g.hi[i] <= n, op, ": layer ", l, ": circular padding must be <= the input size");
    }
    auto oshape = output_shape(op, l, g, W, shape_of(x).dims);
    for (int64_t i = 0; i < g.d; ++i)
      SF_CHECK_VALUE(oshape[1 + i] == x.size(1 + i) / g.stride[i], op, ": layer ", l,
                     ": padding must give the full wrap-around output size ", x.size(1 + i) / g.stride[i],
                     " (total padding dilation*(kernel-1)), got ", oshape[1 + i]);
    SF_CHECK_VALUE(shape_of(x_tops[l]).dims == shape_of(x).dims && x_tops[l].scalar_type() == x.scalar_type() &&
                       x_tops[l].device() == x.device(),
                   op, ": x_tops[", l, "] must be like xs[", l, "]");
    SF_CHECK_VALUE(shape_of(y_tops[l]).dims == oshape && y_tops[l].scalar_type() == x.scalar_type() &&
                       y_tops[l].device() == x.device(),
                   op, ": y_tops[", l, "] must have the output shape ", Shape{oshape}, " and xs[", l, "]'s dtype");
  }
  if (!weights.empty()) {
    const std::pair<const char*, const TensorList*> lists[] = {
        {"weights", &weights}, {"xs", &xs}, {"x_tops", &x_tops}, {"y_tops", &y_tops}};
    for (const auto& [what, list] : lists) check_on_device_stable(op, what, *list, dev);
    MemoryArgsStable mem;
    mem.add("weights", weights, false);
    mem.add("xs", xs, true);
    mem.add("x_tops", x_tops, true);
    mem.add("y_tops", y_tops, true);
    mem.check(op);
  }
  cpu::check_conv_kernel_override(op);  // before any layer is written
  InterruptPollStable poll(op);
  std::vector<Tensor> saved;  // finished layers' start-of-call states, for an interrupt
  for (size_t l = 0; l < weights.size(); ++l) {
    if (zero_map(xs[l], y_tops[l])) {
      // zero channels: the zero map (conv_geometry.h), estimate 0 with the pair (0, 0)
      Tensor xt = x_tops[l], yt = y_tops[l];
      torch::stable::zero_(xt);
      torch::stable::zero_(yt);
      continue;
    }
    const auto& g = geo[l];
    const auto acc = acc_type(weights[l].scalar_type());
    const Tensor W = contig(as_dtype(weights[l], acc));
    Tensor x_state = xs[l];
    const bool host = x_state.is_cpu();
    Spectral F;
    F.s = g.stride;
    F.in_shape = shape_of(x_state).dims;
    for (int64_t i = 0; i < g.d; ++i) {
      F.m.push_back(x_state.size(1 + i) / g.stride[i]);
      F.dims.push_back(1 + i);
    }
    // X: the per-frequency vectors of the current x (not necessarily unit: every estimate is
    // the Rayleigh-type |P X(w)| / |X(w)|, so a state that is already normalized, as this op
    // leaves it, needs no normalization pass). A frequency with X(w) = 0 (an all-zero or
    // degenerate state) restarts at e_0, the first unit vector, before the first step, as the
    // reference does (specreg_fast/ops/circular_conv.py); on the CPU only when one is zero (a free check).
    const Tensor tiny = tiny_tensor(x_state);
    Tensor X = F.forward_in(x_state);
    Tensor nx = freq_norms(X);
    Tensor xh = x_state;
    if (!host || host_any_zero(nx)) {
      X = unit_or_e0(X, nx, tiny);
      nx = ones_like(nx);
      xh = F.inverse_in(X);
    }
    const int64_t steps = std::max<int64_t>(n_iter, 1);
    // The two circular convs of a step: the direct kernels (csrc/cpu/conv_gemm_cpu.cpp) when
    // they are the faster path for this layer, ATen's otherwise.
    const bool direct = host && n_iter > 0 && cpu::conv_gemm_preferred(g, W, batch1(x_state));
    cpu::ConvGemmWork work;
    double est_host = 0;
    for (int64_t it = 0; it < steps; ++it) {
      if (it > 0 && poll.interrupted()) {  // this layer's state is written only at its end
        for (size_t k = 0; k < l; ++k) {
          Tensor xk = xs[k];
          torch::stable::copy_(xk, saved[k]);
        }
        poll.raise();
      }
      Tensor t, a_direct;
      if (direct) {
        t = empty(shape_of(y_tops[l]).dims, W.scalar_type(), W.device());
        a_direct = empty_as(x_state);
        Tensor t4 = batch1(t), a4 = batch1(a_direct);
        cpu::conv_gemm_step(g, W, batch1(contig(xh)), t4, a4, work);
      } else {
        t = unbatch1(op_apply(g, W, batch1(xh)));
      }
      const Tensor T = F.forward_out(t);
      const Tensor tn = freq_norms(T);
      if (it == steps - 1) {
        // (X(w) = 0 gives T(w) = 0: the clamp makes that frequency's estimate 0)
        const Tensor sig = aten::div(tn, aten::clamp_min(nx, tiny));
        top_pair(F, sig, X, T, x_tops[l], y_tops[l]);
        if (host) {
          est_host = host_max(contig(sig));
        } else {
          Tensor slot = torch::stable::select(out, 0, static_cast<int64_t>(l));
          torch::stable::copy_(slot, aten::max(sig));
        }
      }
      if (n_iter == 0) break;
      const Tensor a = direct ? a_direct : unbatch1(op_adjoint(g, W, batch1(t), batch1(xh)));
      const Tensor A = F.forward_in(a);
      const Tensor na = freq_norms(A);
      Tensor Xn;
      if (host) {
        Xn = contig(A);
        divide_by_freq_norms_(Xn, na);
      } else {
        Xn = aten::div(A, aten::clamp_min(na, tiny));
      }
      // A^T A X(w) = 0: keep the previous unit vector (a zero kernel must not kill the state).
      // Rare, so on the CPU the fix-up is skipped after a (free) host check.
      if (!host || host_any_zero(na)) {
        const Tensor dead = aten::eq(na, scalar_tensor(0.0, na.scalar_type(), na.device()));
        Xn = aten::where(dead, unit_or_e0(X, nx, tiny), Xn);
      }
      X = Xn;
      nx = ones_like(na);
      xh = F.inverse_in(X);
    }
    // The state keeps the per-frequency unit vectors; a non-finite weight leaves it as it was.
    if (n_iter > 1 && l + 1 < weights.size()) saved.push_back(torch::stable::clone(x_state));
    if (host) {
      if (std::isfinite(est_host)) {
        if (n_iter > 0) torch::stable::copy_(x_state, xh);
      } else {
        est_host = std::numeric_limits<double>::quiet_NaN();
      }
      const ScalarType rt = acc;
      if (rt == kFloat) est_host = static_cast<float>(est_host);
      if (out.scalar_type() == kDouble) out.mutable_data_ptr<double>()[l] = est_host;
      else out.mutable_data_ptr<float>()[l] = static_cast<float>(est_host);
    } else {
      Tensor est = torch::stable::select(out, 0, static_cast<int64_t>(l));
      const Tensor finite = aten::isfinite(est);
      if (n_iter > 0) torch::stable::copy_(x_state, aten::where(finite, xh, x_state));
      torch::stable::copy_(
          est, aten::where(finite, est, scalar_tensor(std::numeric_limits<double>::quiet_NaN(), odt, dev)));
    }
  }
  return out;
}

}  // namespace specreg_fast

#ifndef SPECREG_NO_CPU_IMPL  // the CUDA library's copy of this file (csrc/cuda/conv_device_circular.cpp)
STABLE_TORCH_LIBRARY_IMPL(specreg_fast, CPU, m) {
  m.impl("circular_power_step_", TORCH_BOX(&specreg_fast::circular_power_step_impl));
}
#endif
