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
// On the CPU, layers whose image is small next to the weight run A and A^T through the direct
// im2col kernels of csrc/cpu/conv_gemm_cpu.cpp (no per-call weight reorder; 1.9x the plain
// loop over ResNet-18's convs), with norms and normalization as host loops. Otherwise
// everything is ATen ops on the weight's device, so the same function serves the CUDA
// registration (csrc/cuda/conv_operator_cuda.cpp). On CPU the norms are read on the host (no
// cost) and normalization is a single div_out into the user's buffer; elsewhere torch.where
// keeps the loop free of host synchronization unless `tol` needs the estimate.
//
// Per-layer hyperparameters travel in `params` (int[]), packed layer after layer; with d =
// weight.dim() - 2 spatial dims, layer l contributes 2 + 5 d entries:
//     [transposed, groups, stride[d], dilation[d], pad_lo[d], pad_hi[d], output_padding[d]]
// pad_lo/pad_hi are the padding before/after each spatial dim (asymmetric for 'same' with an
// even receptive field). `padding_modes` (str[]) holds one of zeros/circular/reflect/replicate
// per layer. specreg_fast/geometry.py:pack_conv_params builds both from ConvSpec objects.
//
// Bad geometry is a ValueError before anything is written (conv_geometry.h): a dilated kernel
// larger than the padded input, an int64 overflow in any size, kernel size 0. A layer with an
// empty input or output (e.g. a zero-size input made non-empty by padding) is the zero map:
// norm 0, vectors kept, weight-gradient 0, on every kernel path.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "conv_geometry.h"
#include "cpu/conv_gemm.h"
#include "op_contracts.h"

#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace specreg_fast {

using namespace conv_detail;

// The op-level contracts of the conv ops, after validate()'s per-layer checks: every tensor on
// the first weight's device, and no `written` tensor sharing memory with another argument.
static void check_conv_args(const char* op, at::TensorList weights, at::TensorList xs, at::TensorList ys,
                            bool xs_ys_written, at::TensorList grads = {}) {
  if (weights.empty()) return;
  const at::Device dev = weights[0].device();
  check_on_device(op, "weights", weights, dev);
  check_on_device(op, "xs", xs, dev);
  check_on_device(op, "ys", ys, dev);
  check_on_device(op, "grads", grads, dev);
  if (!xs_ys_written && grads.empty()) return;
  MemoryArgs mem;
  mem.add("weights", weights, false);
  mem.add("xs", xs, xs_ys_written);
  mem.add("ys", ys, xs_ys_written);
  mem.add("grads", grads, true);
  mem.check(op);
}

// Device-agnostic: registered for CPU here and for CUDA in csrc/cuda/conv_operator_cuda.cpp.
at::Tensor conv_power_step_impl(at::TensorList weights, at::TensorList xs, at::TensorList ys, at::IntArrayRef params,
                                const std::vector<std::string>& padding_modes, int64_t n_iter, double tol) {
  const char* op = "specreg_fast::conv_power_step_";
  // The estimates are detached and xs/ys are state, not graph nodes.
  at::NoGradGuard no_grad;
  TORCH_CHECK_VALUE(xs.size() == weights.size() && ys.size() == weights.size(), op,
                    ": weights, xs and ys must have the same length, got ", weights.size(), ", ", xs.size(), ", ",
                    ys.size());
  check_n_iter(op, n_iter);
  TORCH_CHECK_VALUE(tol >= 0 && std::isfinite(tol), op, ": tol must be finite and >= 0, got ", tol);
  auto geo = decode(op, weights, params, padding_modes);
  validate(op, weights, xs, ys, geo, /*need_contiguous=*/true);
  check_conv_args(op, weights, xs, ys, /*xs_ys_written=*/true);
  cpu::check_conv_kernel_override();  // before any layer is written
  const auto odt = out_type(weights);
  at::Tensor out = at::zeros({static_cast<int64_t>(weights.size())},
                             at::TensorOptions().dtype(odt).device(weights.empty() ? at::kCPU : weights[0].device()));
  if (weights.empty()) return out;
  InterruptPoll poll(op);
  std::vector<at::Tensor> saved;  // finished layers' start-of-call vectors, for an interrupt
  for (size_t l = 0; l < weights.size(); ++l) {
    if (zero_map(xs[l], ys[l])) continue;  // estimate 0, vectors kept (conv_geometry.h)
    const auto& g = geo[l];
    const auto acc = acc_type(weights[l].scalar_type());
    const at::Tensor W = weights[l].to(acc).contiguous();
    const bool host = W.device().is_cpu();
    at::Tensor x = xs[l].unsqueeze(0);  // views of the user's buffers: written in place
    at::Tensor y = ys[l].unsqueeze(0);
    // Small images with large weights: the direct kernels (csrc/cpu/conv_gemm_cpu.cpp).
    const bool direct = host && n_iter > 0 && cpu::conv_gemm_preferred(g, W, x);
    cpu::ConvGemmWork work;
    const at::Tensor t_buf = direct ? at::empty_like(y) : at::Tensor();
    const at::Tensor a_buf = direct ? at::empty_like(x) : at::Tensor();
    // A non-finite weight shows up as a non-finite |A x| or |A^T t| (inf * 0 = NaN, so even a
    // weight entry that meets only zeros does), which is checked at every step instead of
    // scanning the weight (a full pass over W, as costly as an elementwise op per layer).
    // On the host each step is checked before it writes, so a single step needs no backup;
    // several steps (or a device, where the check is a tensor) roll back to these copies.
    const bool backup = !host || n_iter > 1;
    const at::Tensor x0 = backup ? x.clone() : at::Tensor(), y0 = backup ? y.clone() : at::Tensor();
    // Building the flipped kernel is a pass over W: worth it only when several steps reuse it.
    const at::Tensor Wadj = n_iter >= 2 && !direct ? adjoint_kernel(g, W) : at::Tensor();
    at::Tensor est = at::zeros({}, x.options());
    at::Tensor bad = at::zeros({}, x.options().dtype(at::kBool));
    if (n_iter == 0) est = (y * op_apply(g, W, x)).sum();
    double prev = std::numeric_limits<double>::quiet_NaN();
    for (int64_t it = 0; it < n_iter; ++it) {
      if (it > 0 && poll.interrupted()) {  // every vector back as it was (backup: n_iter > 1)
        x.copy_(x0);
        y.copy_(y0);
        for (size_t k = 0; k < l; ++k) {
          xs[k].copy_(saved[2 * k]);
          ys[k].copy_(saved[2 * k + 1]);
        }
        poll.raise();
      }
      at::Tensor t, a;  // a = A^T t: direction of the new x, |a|/|t| = estimate
      if (direct) {
        t = t_buf;
        a = a_buf;
        cpu::conv_gemm_step(g, W, x, t, a, work);
      } else {
        t = op_apply(g, W, x);
        a = op_adjoint(g, W, t, x, Wadj);
      }
      double cur = 0;
      if (host) {
        // With the direct kernels the norms and the normalization are plain loops too: on
        // these small tensors each ATen call costs more than its arithmetic.
        at::Tensor tn, an;
        double tnv, anv;
        if (direct) {
          tnv = cpu::host_norm(t);
          anv = cpu::host_norm(a);
        } else {
          tn = at::linalg_vector_norm(t);
          an = at::linalg_vector_norm(a);
          tnv = tn.item<double>();
          anv = an.item<double>();
        }
        if (!std::isfinite(tnv) || !std::isfinite(anv)) {
          bad.fill_(true);
          break;
        }
        if (!(tnv > 0 && anv > 0)) {
          // A x = 0 (zero weight, or x in the kernel of A): keep the vectors, estimate 0.
          est.zero_();
          break;
        }
        if (direct) {
          cpu::host_divide(y, t, tnv);
          cpu::host_divide(x, a, anv);
        } else {
          at::div_out(y, t, tn);
          at::div_out(x, a, an);
        }
        cur = anv / tnv;
        est.fill_(cur);
      } else {
        const at::Tensor tn = at::linalg_vector_norm(t);
        const at::Tensor an = at::linalg_vector_norm(a);
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
        if (backup) {
          x.copy_(x0);
          y.copy_(y0);
        }
        est.fill_(std::numeric_limits<double>::quiet_NaN());
      }
    } else {
      x.copy_(at::where(bad, x0, x));
      y.copy_(at::where(bad, y0, y));
      est = at::where(bad, at::full({}, std::numeric_limits<double>::quiet_NaN(), est.options()), est);
    }
    out.select(0, l).copy_(est);
    if (n_iter > 1 && l + 1 < weights.size()) {
      saved.push_back(x0.squeeze(0));
      saved.push_back(y0.squeeze(0));
    }
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
  check_conv_args(op, weights, xs, ys, /*xs_ys_written=*/false);
  const auto odt = out_type(weights);
  at::Tensor out = at::zeros({static_cast<int64_t>(weights.size())},
                             at::TensorOptions().dtype(odt).device(weights.empty() ? at::kCPU : weights[0].device()));
  for (size_t l = 0; l < weights.size(); ++l) {
    if (zero_map(xs[l], ys[l])) continue;
    const auto acc = acc_type(weights[l].scalar_type());
    const at::Tensor W = weights[l].to(acc);
    out.select(0, l).copy_((ys[l].unsqueeze(0) * op_apply(geo[l], W, xs[l].unsqueeze(0))).sum());
  }
  return out;
}

// The value of conv_sigma read off `est` (conv_power_step_'s return at these xs/ys): checks
// everything conv_sigma checks, and that est is one estimate per layer of the op's dtype.
at::Tensor conv_sigma_from_step_impl(at::TensorList weights, at::TensorList xs, at::TensorList ys,
                                     at::IntArrayRef params, const std::vector<std::string>& padding_modes,
                                     const at::Tensor& est) {
  const char* op = "specreg_fast::conv_sigma_from_step";
  TORCH_CHECK_VALUE(xs.size() == weights.size() && ys.size() == weights.size(), op,
                    ": weights, xs and ys must have the same length, got ", weights.size(), ", ", xs.size(), ", ",
                    ys.size());
  auto geo = decode(op, weights, params, padding_modes);
  validate(op, weights, xs, ys, geo, /*need_contiguous=*/false);
  check_conv_args(op, weights, xs, ys, /*xs_ys_written=*/false);
  check_step_estimate(op, weights, est, out_type(weights));
  return est.clone();
}

// One layer's weight-gradient (W in the accumulation dtype, contiguous; x and y batched and
// contiguous): the direct kernels where they are preferred, else ATen's convolution_backward.
static at::Tensor layer_weight_grad(const ConvGeom& g, const at::Tensor& W, const at::Tensor& x,
                                    const at::Tensor& y) {
  if (cpu::conv_gemm_preferred(g, W, x)) {
    at::Tensor gw = at::empty_like(W);
    cpu::ConvGemmWork work;
    cpu::conv_gemm_weight_grad(g, W, x, y, gw, work);
    return gw;
  }
  auto grads = at::convolution_backward(y, pad_apply(g, x), W, c10::nullopt, g.stride, g.conv_pad, g.dilation,
                                        g.transposed, g.outpad, g.groups, {false, true, false});
  return std::get<1>(grads).contiguous();
}

// d<y_l, A(W_l) x_l>/dW_l for each layer: the conv weight-gradient with input pad(x_l) and
// output-gradient y_l, in the accumulation dtype (the backward of conv_sigma and
// conv_sigma_from_step). On the CPU the direct kernels take the layers they are preferred for.
std::vector<at::Tensor> conv_weight_grad_impl(at::TensorList weights, at::TensorList xs, at::TensorList ys,
                                              at::IntArrayRef params, const std::vector<std::string>& padding_modes) {
  const char* op = "specreg_fast::conv_weight_grad";
  at::NoGradGuard no_grad;
  TORCH_CHECK_VALUE(xs.size() == weights.size() && ys.size() == weights.size(), op,
                    ": weights, xs and ys must have the same length");
  auto geo = decode(op, weights, params, padding_modes);
  validate(op, weights, xs, ys, geo, /*need_contiguous=*/false);
  check_conv_args(op, weights, xs, ys, /*xs_ys_written=*/false);
  cpu::check_conv_kernel_override();
  std::vector<at::Tensor> res;
  for (size_t l = 0; l < weights.size(); ++l) {
    const auto& g = geo[l];
    const at::Tensor W = weights[l].to(acc_type(weights[l].scalar_type())).contiguous();
    if (zero_map(xs[l], ys[l])) {
      res.push_back(at::zeros_like(W));
      continue;
    }
    const at::Tensor x = xs[l].contiguous().unsqueeze(0), y = ys[l].contiguous().unsqueeze(0);
    res.push_back(layer_weight_grad(g, W, x, y));
  }
  return res;
}

// grads[l] += d<y_l, A(W_l) x_l>/dW_l (conv_weight_grad added in place, e.g. into .grad; the
// caller folds any scale into y). Every argument is checked before any grad is written. On
// the CPU the direct kernels add straight into a contiguous grad of the accumulation dtype;
// otherwise the weight-gradient is computed and added (cast to the grad's dtype).
void conv_weight_grad_add_impl(at::TensorList grads, at::TensorList weights, at::TensorList xs, at::TensorList ys,
                               at::IntArrayRef params, const std::vector<std::string>& padding_modes) {
  const char* op = "specreg_fast::conv_weight_grad_add_";
  at::NoGradGuard no_grad;
  TORCH_CHECK_VALUE(grads.size() == weights.size() && xs.size() == weights.size() && ys.size() == weights.size(), op,
                    ": grads, weights, xs and ys must have the same length, got ", grads.size(), ", ", weights.size(),
                    ", ", xs.size(), ", ", ys.size());
  auto geo = decode(op, weights, params, padding_modes);
  validate(op, weights, xs, ys, geo, /*need_contiguous=*/false);
  for (size_t l = 0; l < weights.size(); ++l) {
    TORCH_CHECK_VALUE(grads[l].sizes() == weights[l].sizes(), op, ": grads[", l, "] must have the weight's shape ",
                      weights[l].sizes(), ", got ", grads[l].sizes());
    TORCH_CHECK_VALUE(grads[l].device() == weights[l].device(), op, ": grads[", l, "] must be on ",
                      weights[l].device(), ", got ", grads[l].device());
    TORCH_CHECK_TYPE(at::isFloatingType(grads[l].scalar_type()), op, ": grads[", l,
                     "] must be a floating-point tensor, got ", grads[l].scalar_type());
  }
  check_conv_args(op, weights, xs, ys, /*xs_ys_written=*/false, grads);
  cpu::check_conv_kernel_override();
  for (size_t l = 0; l < weights.size(); ++l) {
    if (zero_map(xs[l], ys[l])) continue;  // adds 0
    const auto& g = geo[l];
    const auto acc = acc_type(weights[l].scalar_type());
    const at::Tensor W = weights[l].to(acc).contiguous();
    const at::Tensor x = xs[l].contiguous().unsqueeze(0), y = ys[l].to(acc).contiguous().unsqueeze(0);
    at::Tensor G = grads[l];
    if (G.is_contiguous() && G.scalar_type() == acc && cpu::conv_gemm_preferred(g, W, x)) {
      cpu::ConvGemmWork work;
      cpu::conv_gemm_weight_grad(g, W, x, y, G, work, /*accumulate=*/true);
    } else {
      G.add_(layer_weight_grad(g, W, x, y));
    }
  }
}

// A^T y for each layer (the op's own adjoint, exposed so tests can check <A x, y> = <x, A^T y>).
std::vector<at::Tensor> conv_adjoint_impl(at::TensorList weights, at::TensorList xs, at::TensorList ys,
                                          at::IntArrayRef params, const std::vector<std::string>& padding_modes) {
  const char* op = "specreg_fast::conv_adjoint";
  TORCH_CHECK_VALUE(xs.size() == weights.size() && ys.size() == weights.size(), op,
                    ": weights, xs and ys must have the same length");
  auto geo = decode(op, weights, params, padding_modes);
  validate(op, weights, xs, ys, geo, /*need_contiguous=*/false);
  check_conv_args(op, weights, xs, ys, /*xs_ys_written=*/false);
  std::vector<at::Tensor> res;
  for (size_t l = 0; l < weights.size(); ++l) {
    if (zero_map(xs[l], ys[l])) {
      res.push_back(at::zeros_like(xs[l], at::MemoryFormat::Contiguous));
      continue;
    }
    const at::Tensor W = weights[l].to(acc_type(weights[l].scalar_type()));
    res.push_back(op_adjoint(geo[l], W, ys[l].unsqueeze(0), xs[l].unsqueeze(0)).squeeze(0).contiguous());
  }
  return res;
}

}  // namespace specreg_fast

#ifndef SPECREG_NO_CPU_IMPL  // the CUDA library's copy of this file (csrc/conv_module.cpp)
TORCH_LIBRARY_IMPL(specreg_fast, CPU, m) {
  m.impl("conv_power_step_", &specreg_fast::conv_power_step_impl);
  m.impl("conv_sigma", &specreg_fast::conv_sigma_impl);
  m.impl("conv_sigma_from_step", &specreg_fast::conv_sigma_from_step_impl);
  m.impl("conv_adjoint", &specreg_fast::conv_adjoint_impl);
  m.impl("conv_weight_grad", &specreg_fast::conv_weight_grad_impl);
  m.impl("conv_weight_grad_add_", &specreg_fast::conv_weight_grad_add_impl);
}
#endif
