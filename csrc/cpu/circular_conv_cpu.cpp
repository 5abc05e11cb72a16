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
#include <ATen/ATen.h>
#include <torch/library.h>

#include "conv_geometry.h"
#include "cpu/conv_gemm.h"
#include "op_contracts.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace specreg_fast {

using namespace conv_detail;

namespace {

// The polyphase index map as three dims (leading dims of size 1 and stride 1 for d < 3).
struct Phases3 {
  int64_t n[3], s[3], m[3];
};

Phases3 phases3(const std::vector<int64_t>& s, at::IntArrayRef in_shape) {
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

// The least positive normal number of x's dtype: the clamp of norms before a division (a
// double-precision one would round to 0 in float32 and turn 0 / 0 into NaN).
double tiny_of(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? std::numeric_limits<double>::min() : std::numeric_limits<float>::min();
}

bool unit_stride(const std::vector<int64_t>& s) {
  return std::all_of(s.begin(), s.end(), [](int64_t v) { return v == 1; });
}

// (C, N_1..N_d) -> (C * prod(s), N_1/s_1, .., N_d/s_d): channel-major, then the phases.
at::Tensor polyphase_split(const at::Tensor& x, const std::vector<int64_t>& s) {
  const int64_t d = static_cast<int64_t>(s.size());
  std::vector<int64_t> shape{x.size(0)}, perm{0}, out{x.size(0)};
  int64_t phases = 1;
  for (int64_t i = 0; i < d; ++i) phases *= s[i];
  out[0] *= phases;
  for (int64_t i = 0; i < d; ++i) out.push_back(x.size(1 + i) / s[i]);
  if (unit_stride(s)) return x.reshape(out);
  if (x.is_cpu()) {
    const at::Tensor xc = x.contiguous();
    at::Tensor z = at::empty(out, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "polyphase_split", [&] {
      polyphase_host<scalar_t>(phases3(s, x.sizes()), x.size(0), const_cast<scalar_t*>(xc.const_data_ptr<scalar_t>()),
                               z.mutable_data_ptr<scalar_t>(), true);
    });
    return z;
  }
  for (int64_t i = 0; i < d; ++i) {
    shape.push_back(x.size(1 + i) / s[i]);
    shape.push_back(s[i]);
  }
  for (int64_t i = 0; i < d; ++i) perm.push_back(2 + 2 * i);
  for (int64_t i = 0; i < d; ++i) perm.push_back(1 + 2 * i);
  return x.reshape(shape).permute(perm).reshape(out);
}

// Inverse of polyphase_split; `like` has the input shape.
at::Tensor polyphase_merge(const at::Tensor& z, const std::vector<int64_t>& s, at::IntArrayRef like) {
  const int64_t d = static_cast<int64_t>(s.size());
  if (unit_stride(s)) return z.reshape(like);
  if (z.is_cpu()) {
    const at::Tensor zc = z.contiguous();
    at::Tensor x = at::empty(like, z.options());
    AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "polyphase_merge", [&] {
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
  return z.reshape(shape).permute(perm).reshape(like);
}

struct Spectral {
  std::vector<int64_t> s;      // stride
  std::vector<int64_t> m;      // N / s: the frequency grid (full sizes, for the inverse)
  std::vector<int64_t> dims;   // 1..d
  at::IntArrayRef in_shape;

  at::Tensor forward_in(const at::Tensor& x) const {  // polyphase rFFT of an input-shaped tensor
    return at::fft_rfftn(polyphase_split(x, s), c10::nullopt, dims, "ortho");
  }
  at::Tensor inverse_in(const at::Tensor& X) const {
    return polyphase_merge(at::fft_irfftn(X, m, dims, "ortho"), s, in_shape);
  }
  at::Tensor forward_out(const at::Tensor& y) const { return at::fft_rfftn(y, c10::nullopt, dims, "ortho"); }
  at::Tensor inverse_out(const at::Tensor& Y) const { return at::fft_irfftn(Y, m, dims, "ortho"); }
};

// |Z(w)| over the channel dim: one real value per frequency. (linalg_vector_norm over the
// outer dim of a complex tensor measured 10x slower here: 320 vs 25 us at 256 x 16 x 9.) On
// the host a plain loop (channel-outer, fixed order) replaces the five ATen ops, each of
// which costs tens of microseconds on these few-thousand-entry tensors.
at::Tensor freq_norms(const at::Tensor& Z) {
  if (!Z.is_cpu()) return (at::real(Z).square() + at::imag(Z).square()).sum(0).sqrt_();
  const at::Tensor Zc = Z.contiguous();
  const auto rt = c10::toRealValueType(Z.scalar_type());
  at::Tensor out = at::zeros(Z.sizes().slice(1), Z.options().dtype(rt));
  const int64_t C = Z.size(0), nf = out.numel();
  AT_DISPATCH_FLOATING_TYPES(rt, "freq_norms", [&] {
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
void divide_by_freq_norms_(at::Tensor& Z, const at::Tensor& n) {
  const auto rt = c10::toRealValueType(Z.scalar_type());
  const int64_t C = Z.size(0), nf = n.numel();
  AT_DISPATCH_FLOATING_TYPES(rt, "divide_by_freq_norms_", [&] {
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
// channel vector z (C,) (the angle reduced mod m in integers first, for accuracy).
at::Tensor single_frequency(const at::Tensor& z, const std::vector<int64_t>& w, const std::vector<int64_t>& m) {
  const auto opts = at::TensorOptions().dtype(c10::toRealValueType(z.scalar_type())).device(z.device());
  const int64_t d = static_cast<int64_t>(m.size());
  if (z.is_cpu()) {
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
    at::Tensor out = at::empty(shape, opts);
    const at::Tensor zc = z.contiguous();
    AT_DISPATCH_FLOATING_TYPES(opts.dtype().toScalarType(), "single_frequency", [&] {
      const scalar_t* zz = reinterpret_cast<const scalar_t*>(zc.const_data_ptr());
      scalar_t* o = out.mutable_data_ptr<scalar_t>();
      for (int64_t c = 0; c < z.size(0); ++c) {
        const double zr = zz[2 * c], zi = zz[2 * c + 1];
        for (int64_t idx = 0; idx < total; ++idx) o[c * total + idx] = static_cast<scalar_t>(zr * er[idx] - zi * ei[idx]);
      }
    });
    return out;
  }
  at::Tensor phase = at::zeros(m, opts);
  for (int64_t i = 0; i < d; ++i) {
    std::vector<int64_t> shape(d, 1);
    shape[i] = m[i];
    const at::Tensor k = at::remainder(at::arange(m[i], opts.dtype(at::kLong)) * w[i], m[i]);
    phase = phase + (k.to(opts.dtype()) * (2 * M_PI / static_cast<double>(m[i]))).view(shape);
  }
  std::vector<int64_t> zshape{z.size(0)};
  for (int64_t i = 0; i < d; ++i) zshape.push_back(1);
  return at::real(z.view(zshape) * at::polar(at::ones_like(phase), phase).unsqueeze(0));
}

// Writes the unit real pair (x*, y*) of the top frequency w* = argmax sig: x* carries X(w*)
// (and its mirror), y* = the matching output T(w*) = P(w*) X(w*), so that
// <y*, A x*> = |T(w*)| / |X(w*)| = sig(w*).
void top_pair(const Spectral& F, const at::Tensor& sig, const at::Tensor& X, const at::Tensor& T,
              const at::Tensor& x_out, const at::Tensor& y_out) {
  const at::Tensor flat = sig.reshape({-1});
  at::Tensor xt, yt;
  if (sig.is_cpu()) {
    // One frequency built directly (no inverse FFT of a one-hot spectrum): the index is read
    // on the host, which costs nothing on the CPU.
    const int64_t top = flat.argmax().item<int64_t>();
    int64_t j = top;
    std::vector<int64_t> w(sig.dim());
    for (int64_t i = sig.dim() - 1; i >= 0; --i) {
      w[i] = j % sig.size(i);
      j /= sig.size(i);
    }
    const at::Tensor Xf = X.reshape({X.size(0), -1}), Tf = T.reshape({T.size(0), -1});
    xt = polyphase_merge(single_frequency(Xf.select(1, top), w, F.m), F.s, F.in_shape);
    yt = single_frequency(Tf.select(1, top), w, F.m);
  } else {
    // Elsewhere without a host sync: inverse FFTs of the one-hot spectra.
    const at::Tensor onehot =
        (at::arange(flat.numel(), flat.options().dtype(at::kLong)) == flat.argmax()).to(sig.scalar_type());
    xt = F.inverse_in(X * onehot.reshape(sig.sizes()));
    yt = F.inverse_out(T * onehot.reshape(sig.sizes()));
  }
  x_out.copy_(xt / at::linalg_vector_norm(xt).clamp_min(tiny_of(xt)));
  y_out.copy_(yt / at::linalg_vector_norm(yt).clamp_min(tiny_of(yt)));
}

}  // namespace

at::Tensor circular_power_step_impl(at::TensorList weights, at::TensorList xs, at::TensorList x_tops,
                                    at::TensorList y_tops, at::IntArrayRef params, int64_t n_iter) {
  const char* op = "specreg_fast::circular_power_step_";
  at::NoGradGuard no_grad;
  TORCH_CHECK_VALUE(xs.size() == weights.size() && x_tops.size() == weights.size() &&
                        y_tops.size() == weights.size(),
                    op, ": weights, xs, x_tops and y_tops must have the same length, got ", weights.size(), ", ",
                    xs.size(), ", ", x_tops.size(), ", ", y_tops.size());
  check_n_iter(op, n_iter);
  const std::vector<std::string> modes(weights.size(), "circular");
  auto geo = decode(op, weights, params, modes);
  const auto odt = out_type(weights);
  const auto dev = weights.empty() ? at::Device(at::kCPU) : weights[0].device();
  at::Tensor out = at::zeros({static_cast<int64_t>(weights.size())}, at::TensorOptions().dtype(odt).device(dev));
  // Shapes and types first, for every layer: nothing is written unless all layers are valid.
  for (size_t l = 0; l < weights.size(); ++l) {
    const auto& W = weights[l];
    const auto& g = geo[l];
    const auto& x = xs[l];
    const auto st = W.scalar_type();
    TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, op,
                     ": weights[", l, "] must be float32/float64/bfloat16/float16, got ", st);
    TORCH_CHECK_VALUE(!g.transposed, op, ": layer ", l, ": a circular conv norm needs a ConvNd, not a transposed conv");
    TORCH_CHECK_VALUE(x.dim() == g.d + 1, op, ": xs[", l, "] must be (C_in, *spatial) with ", g.d,
                      " spatial dims, got ", x.sizes());
    TORCH_CHECK_VALUE(x.size(0) == W.size(1) * g.groups, op, ": xs[", l, "] has ", x.size(0),
                      " channels, the layer takes ", W.size(1) * g.groups);
    TORCH_CHECK_VALUE(W.size(0) % g.groups == 0, op, ": layer ", l, ": C_out=", W.size(0),
                      " not divisible by groups=", g.groups);
    TORCH_CHECK_TYPE(x.scalar_type() == acc_type(st), op, ": xs[", l, "] must be ", acc_type(st), " for a ", st,
                     " weight, got ", x.scalar_type());
    TORCH_CHECK_VALUE(x.device() == W.device(), op, ": xs[", l, "] must be on the weight's device ", W.device());
    TORCH_CHECK_VALUE(x.is_contiguous(), op, ": xs[", l, "] must be contiguous");
    for (int64_t i = 0; i < g.d; ++i) {
      const int64_t n = x.size(1 + i);
      TORCH_CHECK_VALUE(n % g.stride[i] == 0, op, ": layer ", l, ": stride ", g.stride[i],
                        " must divide the input size ", n, " (spatial dim ", i, ")");
      TORCH_CHECK_VALUE(g.lo[i] <= n && g.hi[i] <= n, op, ": layer ", l,
                        ": circular padding must be <= the input size");
    }
    auto oshape = output_shape(op, l, g, W, x.sizes());
    for (int64_t i = 0; i < g.d; ++i)
      TORCH_CHECK_VALUE(oshape[1 + i] == x.size(1 + i) / g.stride[i], op, ": layer ", l,
                        ": padding must give the full wrap-around output size ", x.size(1 + i) / g.stride[i],
                        " (total padding dilation*(kernel-1)), got ", oshape[1 + i]);
    TORCH_CHECK_VALUE(x_tops[l].sizes() == x.sizes() && x_tops[l].scalar_type() == x.scalar_type() &&
                          x_tops[l].device() == x.device(),
                      op, ": x_tops[", l, "] must be like xs[", l, "]");
    TORCH_CHECK_VALUE(y_tops[l].sizes() == at::IntArrayRef(oshape) && y_tops[l].scalar_type() == x.scalar_type() &&
                          y_tops[l].device() == x.device(),
                      op, ": y_tops[", l, "] must have the output shape ", oshape, " and xs[", l, "]'s dtype");
  }
  if (!weights.empty()) {
    const std::pair<const char*, at::TensorList> lists[] = {
        {"weights", weights}, {"xs", xs}, {"x_tops", x_tops}, {"y_tops", y_tops}};
    for (const auto& [what, list] : lists) check_on_device(op, what, list, dev);
    MemoryArgs mem;
    mem.add("weights", weights, false);
    mem.add("xs", xs, true);
    mem.add("x_tops", x_tops, true);
    mem.add("y_tops", y_tops, true);
    mem.check(op);
  }
  cpu::check_conv_kernel_override();  // before any layer is written
  InterruptPoll poll(op);
  std::vector<at::Tensor> saved;  // finished layers' start-of-call states, for an interrupt
  for (size_t l = 0; l < weights.size(); ++l) {
    if (zero_map(xs[l], y_tops[l])) {
      // zero channels: the zero map (conv_geometry.h), estimate 0 with the pair (0, 0)
      x_tops[l].zero_();
      y_tops[l].zero_();
      continue;
    }
    const auto& g = geo[l];
    const auto acc = acc_type(weights[l].scalar_type());
    const at::Tensor W = weights[l].to(acc).contiguous();
    const at::Tensor x_state = xs[l];
    const bool host = x_state.is_cpu();
    Spectral F;
    F.s = g.stride;
    F.in_shape = x_state.sizes();
    for (int64_t i = 0; i < g.d; ++i) {
      F.m.push_back(x_state.size(1 + i) / g.stride[i]);
      F.dims.push_back(1 + i);
    }
    // X: the per-frequency vectors of the current x (not necessarily unit: every estimate is
    // the Rayleigh-type |P X(w)| / |X(w)|, so a state that is already normalized, as this op
    // leaves it, needs no normalization pass). A frequency with X(w) = 0 (an all-zero or
    // degenerate state) restarts at e_0, the first unit vector, before the first step, as the
    // reference does (specreg_fast/ops/circular_conv.py); on the CPU only when one is zero (a free check).
    const double tiny = tiny_of(x_state);
    at::Tensor X = F.forward_in(x_state);
    at::Tensor nx = freq_norms(X);
    at::Tensor xh = x_state;
    if (!host || (nx == 0).any().item<bool>()) {
      X = X / nx.clamp_min(tiny);
      X.select(0, 0).add_((nx == 0).to(nx.scalar_type()));
      nx = at::ones_like(nx);
      xh = F.inverse_in(X);
    }
    const int64_t steps = std::max<int64_t>(n_iter, 1);
    // The two circular convs of a step: the direct kernels (csrc/cpu/conv_gemm_cpu.cpp) when
    // they are the faster path for this layer, ATen's otherwise.
    const bool direct = host && n_iter > 0 && cpu::conv_gemm_preferred(g, W, x_state.unsqueeze(0));
    cpu::ConvGemmWork work;
    for (int64_t it = 0; it < steps; ++it) {
      if (it > 0 && poll.interrupted()) {  // this layer's state is written only at its end
        for (size_t k = 0; k < l; ++k) xs[k].copy_(saved[k]);
        poll.raise();
      }
      at::Tensor t, a_direct;
      if (direct) {
        t = at::empty(y_tops[l].sizes(), W.options());
        a_direct = at::empty_like(x_state);
        at::Tensor t4 = t.unsqueeze(0), a4 = a_direct.unsqueeze(0);
        cpu::conv_gemm_step(g, W, xh.contiguous().unsqueeze(0), t4, a4, work);
      } else {
        t = op_apply(g, W, xh.unsqueeze(0)).squeeze(0);
      }
      const at::Tensor T = F.forward_out(t);
      const at::Tensor tn = freq_norms(T);
      if (it == steps - 1) {
        // (X(w) = 0 gives T(w) = 0: the clamp makes that frequency's estimate 0)
        const at::Tensor sig = tn / nx.clamp_min(tiny);
        top_pair(F, sig, X, T, x_tops[l], y_tops[l]);
        out.select(0, l).copy_(sig.max());
      }
      if (n_iter == 0) break;
      const at::Tensor a = direct ? a_direct : op_adjoint(g, W, t.unsqueeze(0), xh.unsqueeze(0)).squeeze(0);
      const at::Tensor A = F.forward_in(a);
      const at::Tensor na = freq_norms(A);
      const at::Tensor dead = na == 0;
      at::Tensor Xn;
      if (host) {
        Xn = A.is_contiguous() ? A : A.contiguous();
        divide_by_freq_norms_(Xn, na);
      } else {
        Xn = A / na.clamp_min(tiny);
      }
      // A^T A X(w) = 0: keep the previous unit vector (a zero kernel must not kill the state).
      // Rare, so on the CPU the fix-up is skipped after a (free) host check.
      if (!host || dead.any().item<bool>()) {
        at::Tensor prev = X / nx.clamp_min(tiny);
        prev.select(0, 0).add_((nx == 0).to(nx.scalar_type()));
        Xn = at::where(dead, prev, Xn);
      }
      X = Xn;
      nx = at::ones_like(na);
      xh = F.inverse_in(X);
    }
    // The state keeps the per-frequency unit vectors; a non-finite weight leaves it as it was.
    const at::Tensor est = out.select(0, l);
    if (n_iter > 1 && l + 1 < weights.size()) saved.push_back(x_state.clone());
    if (host) {
      if (std::isfinite(est.item<double>())) {
        if (n_iter > 0) x_state.copy_(xh);
      } else {
        est.fill_(std::numeric_limits<double>::quiet_NaN());
      }
    } else {
      const at::Tensor finite = at::isfinite(est);
      if (n_iter > 0) x_state.copy_(at::where(finite, xh, x_state));
      est.copy_(at::where(finite, est, at::full({}, std::numeric_limits<double>::quiet_NaN(), est.options())));
    }
  }
  return out;
}

}  // namespace specreg_fast

#ifndef SPECREG_NO_CPU_IMPL  // the CUDA library's copy of this file (csrc/conv_module.cpp)
TORCH_LIBRARY_IMPL(specreg_fast, CPU, m) {
  m.impl("circular_power_step_", &specreg_fast::circular_power_step_impl);
}
#endif
