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
//     X  <- X(w) / |X(w)| for every w            (polyphase rFFT of x, normalize, inverse)
//     t  =  A x          (circular conv in space)  sigma(w) = |rFFT(t)(w)|  (= |P(w) X(w)|)
//     x  <- A^T t        (transposed conv + fold of the wrapped border)  = P(w)^H P(w) X(w)
// i.e. two convolutions (as for the zero-padding operator) plus FFTs of input- and
// output-sized tensors, never of the kernel. The estimate is max_w |P(w) X(w)| (the
// authors' sigma^2 ~ max |P v|^2), and the op also returns the real, unit, input- and
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

#include <limits>
#include <string>
#include <vector>

namespace specreg_fast {

using namespace conv_detail;

namespace {

// (C, N_1..N_d) -> (C * prod(s), N_1/s_1, .., N_d/s_d): channel-major, then the phases.
at::Tensor polyphase_split(const at::Tensor& x, const std::vector<int64_t>& s) {
  const int64_t d = static_cast<int64_t>(s.size());
  std::vector<int64_t> shape{x.size(0)}, perm{0}, out{x.size(0)};
  for (int64_t i = 0; i < d; ++i) {
    shape.push_back(x.size(1 + i) / s[i]);
    shape.push_back(s[i]);
  }
  for (int64_t i = 0; i < d; ++i) perm.push_back(2 + 2 * i);
  for (int64_t i = 0; i < d; ++i) perm.push_back(1 + 2 * i);
  int64_t phases = 1;
  for (int64_t i = 0; i < d; ++i) phases *= s[i];
  out[0] *= phases;
  for (int64_t i = 0; i < d; ++i) out.push_back(x.size(1 + i) / s[i]);
  return x.reshape(shape).permute(perm).reshape(out);
}

// Inverse of polyphase_split; `like` has the input shape.
at::Tensor polyphase_merge(const at::Tensor& z, const std::vector<int64_t>& s, at::IntArrayRef like) {
  const int64_t d = static_cast<int64_t>(s.size());
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

// |Z(w)| over the channel dim: one real value per frequency.
at::Tensor freq_norms(const at::Tensor& Z) { return at::linalg_vector_norm(Z, 2, {0}, /*keepdim=*/false); }

}  // namespace

at::Tensor circular_power_step_impl(at::TensorList weights, at::TensorList xs, at::TensorList x_tops,
                                    at::TensorList y_tops, at::IntArrayRef params, int64_t n_iter) {
  const char* op = "specreg_fast::circular_power_step_";
  at::NoGradGuard no_grad;
  TORCH_CHECK_VALUE(xs.size() == weights.size() && x_tops.size() == weights.size() &&
                        y_tops.size() == weights.size(),
                    op, ": weights, xs, x_tops and y_tops must have the same length, got ", weights.size(), ", ",
                    xs.size(), ", ", x_tops.size(), ", ", y_tops.size());
  TORCH_CHECK_VALUE(n_iter >= 0, op, ": n_iter must be >= 0, got ", n_iter);
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
    auto oshape = output_shape(g, W, x.sizes());
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
  for (size_t l = 0; l < weights.size(); ++l) {
    const auto& g = geo[l];
    const auto acc = acc_type(weights[l].scalar_type());
    const at::Tensor W = weights[l].to(acc);
    const at::Tensor x_state = xs[l];
    Spectral F;
    F.s = g.stride;
    F.in_shape = x_state.sizes();
    for (int64_t i = 0; i < g.d; ++i) {
      F.m.push_back(x_state.size(1 + i) / g.stride[i]);
      F.dims.push_back(1 + i);
    }
    // Per-frequency normalization; X(w) = 0 restarts at e_0 (real, so the spectrum stays that
    // of a real signal).
    at::Tensor X = F.forward_in(x_state);
    at::Tensor nx = freq_norms(X);
    at::Tensor e0 = at::zeros_like(X);
    e0.select(0, 0).fill_(1);
    at::Tensor Xn = at::where(nx > 0, X / nx.clamp_min(std::numeric_limits<double>::min()), e0);
    at::Tensor xh = F.inverse_in(Xn);
    at::Tensor T, sig;
    const int64_t steps = std::max<int64_t>(n_iter, 1);
    for (int64_t it = 0; it < steps; ++it) {
      const at::Tensor t = op_apply(g, W, xh.unsqueeze(0)).squeeze(0);
      T = F.forward_out(t);
      sig = freq_norms(T);
      if (it == steps - 1) {
        // the top frequency's real pair at the vectors this estimate belongs to
        const at::Tensor flat = sig.reshape({-1});
        const at::Tensor top = flat.argmax();
        const at::Tensor onehot = (at::arange(flat.numel(), top.options()) == top).to(acc).reshape(sig.sizes());
        at::Tensor xt = F.inverse_in(Xn * onehot);
        at::Tensor yt = F.inverse_out(T * onehot);
        xt = xt / at::linalg_vector_norm(xt).clamp_min(std::numeric_limits<double>::min());
        yt = yt / at::linalg_vector_norm(yt).clamp_min(std::numeric_limits<double>::min());
        x_tops[l].copy_(xt);
        y_tops[l].copy_(yt);
        out.select(0, l).copy_(flat.max());
      }
      if (n_iter == 0) break;
      const at::Tensor a = op_adjoint(g, W, t.unsqueeze(0), xh.unsqueeze(0)).squeeze(0);
      const at::Tensor A = F.forward_in(a);
      const at::Tensor na = freq_norms(A);
      Xn = at::where(na > 0, A / na.clamp_min(std::numeric_limits<double>::min()), Xn);
      xh = F.inverse_in(Xn);
    }
    const at::Tensor est = out.select(0, l);
    const at::Tensor finite = at::isfinite(est);
    if (n_iter > 0) {
      // the state keeps the per-frequency unit vectors; a non-finite weight leaves it as it was
      x_state.copy_(at::where(finite, xh, x_state));
    }
    out.select(0, l).copy_(at::where(finite, est, at::full({}, std::numeric_limits<double>::quiet_NaN(),
                                                              est.options())));
  }
  return out;
}

}  // namespace specreg_fast

TORCH_LIBRARY_IMPL(specreg_fast, CPU, m) {
  m.impl("circular_power_step_", &specreg_fast::circular_power_step_impl);
}
