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
// cost) and normalization is a host loop into the user's buffer; elsewhere torch.where
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
//
// LibTorch stable ABI (csrc/stable_api.h): the ATen calls of this file and of conv_geometry.h,
// and the route each takes now (torch 2.11 has no stable wrapper for most of them):
//   at::convolution, at::convolution_backward        -> torch_call_dispatcher (aten::convolution,
//                                                       aten::convolution_backward; stable_api.h aten::)
//   at::constant_pad_nd, at::pad (circular/reflect/replicate) -> torch::stable::pad (aoti shim)
//   at::reflection_padNd_backward, replication_padNd_backward -> torch_call_dispatcher
//   Tensor::flip                                     -> torch_call_dispatcher (aten::flip)
//   reshape, transpose, narrow, select, (un)squeeze, clone, copy_, contiguous, to, zero_, fill_,
//   empty_like, sum                                  -> torch::stable:: (stable ops.h)
//   at::zeros, at::empty                             -> stable_api.h empty/zeros (aoti_torch_empty_strided)
//   at::linalg_vector_norm (CPU)                     -> host loop (cpu::host_norm, double accumulation)
//   at::linalg_vector_norm (other devices)           -> sqrt(sum(t * t)) through the dispatcher (its
//                                                       `ord` is a Scalar, which the 2.11 ABI cannot pass)
//   at::div_out (CPU)                                -> host loop (cpu::host_divide)
//   div, mul, where, isfinite, &, |, ~, > (devices)  -> torch_call_dispatcher (Tensor overloads)
//   Tensor::add_                                     -> torch::stable::subtract(a, b, -1) + copy_
//   item<double/bool>                                -> host read (item_double, stable_api.h)
//   at::NoGradGuard                                  -> stable_api.h NoGradGuard (grad-mode shim)
//   at::get_overlap_status                           -> address-range test (stable_contracts.h)
//   TORCH_CHECK_VALUE/TYPE                           -> SF_CHECK_VALUE/TYPE (RuntimeError; the
//                                                       Python front raises ValueError/TypeError)
#include "conv_geometry.h"
#include "cpu/conv_gemm.h"
#include "stable_contracts.h"

#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace specreg_fast {

using namespace conv_detail;

namespace {

// The op-level contracts of the conv ops, after validate()'s per-layer checks: every tensor on
// the first weight's device, and no `written` tensor sharing memory with another argument.
void check_conv_args(const char* op, const TensorList& weights, const TensorList& xs, const TensorList& ys,
                     bool xs_ys_written, const TensorList& grads = {}) {
  if (weights.empty()) return;
  const Device dev = weights[0].device();
  check_on_device_stable(op, "weights", weights, dev);
  check_on_device_stable(op, "xs", xs, dev);
  check_on_device_stable(op, "ys", ys, dev);
  check_on_device_stable(op, "grads", grads, dev);
  if (!xs_ys_written && grads.empty()) return;
  MemoryArgsStable mem;
  mem.add("weights", weights, false);
  mem.add("xs", xs, xs_ys_written);
  mem.add("ys", ys, xs_ys_written);
  mem.add("grads", grads, true);
  mem.check(op);
}

Device op_device(const TensorList& weights) {
  return weights.empty() ? Device(DeviceType::CPU) : weights[0].device();
}

// out[l] = v on the host (out: a contiguous float/double CPU tensor), rounded to `acc` first
// as the estimate tensor of that dtype was before it was copied into out.
void set_host(Tensor& out, size_t l, double v, ScalarType acc) {
  if (acc == kFloat) v = static_cast<float>(v);
  if (out.scalar_type() == kDouble) out.mutable_data_ptr<double>()[l] = v;
  else out.mutable_data_ptr<float>()[l] = static_cast<float>(v);
}

}  // namespace

// Device-agnostic: registered for CPU here and for CUDA in csrc/cuda/conv_operator_cuda.cpp.
Tensor conv_power_step_impl(const TensorList& weights, const TensorList& xs, const TensorList& ys,
                            const std::vector<int64_t>& params, const std::vector<std::string>& padding_modes,
                            int64_t n_iter, double tol) {
  const char* op = "specreg_fast::conv_power_step_";
  // The estimates are detached and xs/ys are state, not graph nodes.
  NoGradGuard no_grad;
  SF_CHECK_VALUE(xs.size() == weights.size() && ys.size() == weights.size(), op,
                 ": weights, xs and ys must have the same length, got ", weights.size(), ", ", xs.size(), ", ",
                 ys.size());
  check_n_iter_stable(op, n_iter);
  SF_CHECK_VALUE(tol >= 0 && std::isfinite(tol), op, ": tol must be finite and >= 0, got ", tol);
  auto geo = decode(op, weights, params, padding_modes);
  validate(op, weights, xs, ys, geo, /*need_contiguous=*/true);
  check_conv_args(op, weights, xs, ys, /*xs_ys_written=*/true);
  cpu::check_conv_kernel_override(op);  // before any layer is written
  const auto odt = out_type(weights);
  const Device dev = op_device(weights);
  Tensor out = zeros({static_cast<int64_t>(weights.size())}, odt, dev);
  if (weights.empty()) return out;
  InterruptPollStable poll(op);
  std::vector<Tensor> saved;  // finished layers' start-of-call vectors, for an interrupt
  for (size_t l = 0; l < weights.size(); ++l) {
    if (zero_map(xs[l], ys[l])) continue;  // estimate 0, vectors kept (conv_geometry.h)
    const auto& g = geo[l];
    const auto acc = acc_type(weights[l].scalar_type());
    const Tensor W = contig(as_dtype(weights[l], acc));
    const bool host = W.is_cpu();
    Tensor xl = xs[l], yl = ys[l];  // the user's buffers: written in place
    Tensor x = batch1(xl);
    Tensor y = batch1(yl);
    // Small images with large weights: the direct kernels (csrc/cpu/conv_gemm_cpu.cpp).
    const bool direct = host && n_iter > 0 && cpu::conv_gemm_preferred(g, W, x);
    cpu::ConvGemmWork work;
    Tensor t_buf = direct ? empty_as(y) : Tensor();
    Tensor a_buf = direct ? empty_as(x) : Tensor();
    // A non-finite weight shows up as a non-finite |A x| or |A^T t| (inf * 0 = NaN, so even a
    // weight entry that meets only zeros does), which is checked at every step instead of
    // scanning the weight (a full pass over W, as costly as an elementwise op per layer).
    // On the host each step is checked before it writes, so a single step needs no backup;
    // several steps (or a device, where the check is a tensor) roll back to these copies.
    const bool backup = !host || n_iter > 1;
    const Tensor x0 = backup ? torch::stable::clone(xl) : Tensor(), y0 = backup ? torch::stable::clone(yl) : Tensor();
    // Building the flipped kernel is a pass over W: worth it only when several steps reuse it.
    const Tensor Wadj = n_iter >= 2 && !direct ? adjoint_kernel(g, W) : Tensor();
    double prev = std::numeric_limits<double>::quiet_NaN();
    if (host) {
      // The estimate and the finiteness flag as host values: each ATen call on these small
      // tensors costs more than its arithmetic.
      double est = 0;
      bool bad = false;
      if (n_iter == 0) {
        est = item_double(aten::sum(aten::mul(y, op_apply(g, W, x))));
        bad = !std::isfinite(est);
      }
      for (int64_t it = 0; it < n_iter; ++it) {
        if (it > 0 && poll.interrupted()) {  // every vector back as it was (backup: n_iter > 1)
          torch::stable::copy_(xl, x0);
          torch::stable::copy_(yl, y0);
          for (size_t k = 0; k < l; ++k) {
            Tensor xk = xs[k], yk = ys[k];
            torch::stable::copy_(xk, saved[2 * k]);
            torch::stable::copy_(yk, saved[2 * k + 1]);
          }
          poll.raise();
        }
        Tensor t, a;  // a = A^T t: direction of the new x, |a|/|t| = estimate
        if (direct) {
          t = t_buf;
          a = a_buf;
          cpu::conv_gemm_step(g, W, x, t, a, work);
        } else {
          t = contig(op_apply(g, W, x));
          a = contig(op_adjoint(g, W, t, x, Wadj));
        }
        const double tnv = cpu::host_norm(t), anv = cpu::host_norm(a);
        if (!std::isfinite(tnv) || !std::isfinite(anv)) {
          bad = true;
          break;
        }
        if (!(tnv > 0 && anv > 0)) {
          // A x = 0 (zero weight, or x in the kernel of A): keep the vectors, estimate 0.
          est = 0;
          break;
        }
        cpu::host_divide(y, t, tnv);
        cpu::host_divide(x, a, anv);
        const double cur = anv / tnv;
        est = cur;
        if (tol > 0) {
          if (std::abs(cur - prev) <= tol * std::abs(cur)) break;
          prev = cur;
        }
      }
      // Non-finite: vectors back to their values before the call, estimate NaN.
      if (bad) {
        if (backup) {
          torch::stable::copy_(xl, x0);
          torch::stable::copy_(yl, y0);
        }
        est = std::numeric_limits<double>::quiet_NaN();
      }
      set_host(out, l, est, acc);
    } else {
      const Tensor zero = scalar_tensor(0.0, acc, dev);
      Tensor est = zeros({}, acc, dev);
      Tensor bad = zeros({}, ScalarType::Bool, dev);
      if (n_iter == 0) est = aten::sum(aten::mul(y, op_apply(g, W, x)));
      for (int64_t it = 0; it < n_iter; ++it) {
        if (it > 0 && poll.interrupted()) {
          torch::stable::copy_(xl, x0);
          torch::stable::copy_(yl, y0);
          for (size_t k = 0; k < l; ++k) {
            Tensor xk = xs[k], yk = ys[k];
            torch::stable::copy_(xk, saved[2 * k]);
            torch::stable::copy_(yk, saved[2 * k + 1]);
          }
          poll.raise();
        }
        const Tensor t = op_apply(g, W, x);
        const Tensor a = op_adjoint(g, W, t, x, Wadj);
        const Tensor tn = aten::norm(t), an = aten::norm(a);
        const Tensor fin = aten::logical_and(aten::isfinite(tn), aten::isfinite(an));
        bad = aten::logical_or(bad, aten::logical_not(fin));
        const Tensor ok = aten::logical_and(aten::logical_and(aten::gt(tn, zero), aten::gt(an, zero)),
                                            aten::logical_and(fin, aten::logical_not(bad)));
        torch::stable::copy_(y, aten::where(ok, aten::div(t, tn), y));
        torch::stable::copy_(x, aten::where(ok, aten::div(a, an), x));
        est = aten::where(ok, aten::div(an, tn), zero);
        if (tol > 0) {
          const double cur = item_double(est);
          if (std::abs(cur - prev) <= tol * std::abs(cur)) break;
          prev = cur;
        }
      }
      if (n_iter == 0) bad = aten::logical_not(aten::isfinite(est));
      // Non-finite: vectors back to their values before the call, estimate NaN.
      torch::stable::copy_(xl, aten::where(bad, x0, xl));
      torch::stable::copy_(yl, aten::where(bad, y0, yl));
      est = aten::where(bad, scalar_tensor(std::numeric_limits<double>::quiet_NaN(), acc, dev), est);
      Tensor slot = torch::stable::select(out, 0, static_cast<int64_t>(l));
      torch::stable::copy_(slot, est);
    }
    if (n_iter > 1 && l + 1 < weights.size()) {
      saved.push_back(x0);
      saved.push_back(y0);
    }
  }
  return out;
}

Tensor conv_sigma_impl(const TensorList& weights, const TensorList& xs, const TensorList& ys,
                       const std::vector<int64_t>& params, const std::vector<std::string>& padding_modes) {
  const char* op = "specreg_fast::conv_sigma";
  NoGradGuard no_grad;  // differentiated by the registered backward, not through these ops
  SF_CHECK_VALUE(xs.size() == weights.size() && ys.size() == weights.size(), op,
                 ": weights, xs and ys must have the same length");
  auto geo = decode(op, weights, params, padding_modes);
  validate(op, weights, xs, ys, geo, /*need_contiguous=*/false);
  check_conv_args(op, weights, xs, ys, /*xs_ys_written=*/false);
  const auto odt = out_type(weights);
  Tensor out = zeros({static_cast<int64_t>(weights.size())}, odt, op_device(weights));
  for (size_t l = 0; l < weights.size(); ++l) {
    if (zero_map(xs[l], ys[l])) continue;
    const auto acc = acc_type(weights[l].scalar_type());
    const Tensor W = as_dtype(weights[l], acc);
    const Tensor v = aten::sum(aten::mul(batch1(ys[l]),
                                         op_apply(geo[l], W, batch1(xs[l]))));
    if (out.is_cpu()) {
      set_host(out, l, item_double(v), acc);
    } else {
      Tensor slot = torch::stable::select(out, 0, static_cast<int64_t>(l));
      torch::stable::copy_(slot, v);
    }
  }
  return out;
}

// The value of conv_sigma read off `est` (conv_power_step_'s return at these xs/ys): checks
// everything conv_sigma checks, and that est is one estimate per layer of the op's dtype.
Tensor conv_sigma_from_step_impl(const TensorList& weights, const TensorList& xs, const TensorList& ys,
                                 const std::vector<int64_t>& params, const std::vector<std::string>& padding_modes,
                                 const Tensor& est) {
  const char* op = "specreg_fast::conv_sigma_from_step";
  SF_CHECK_VALUE(xs.size() == weights.size() && ys.size() == weights.size(), op,
                 ": weights, xs and ys must have the same length, got ", weights.size(), ", ", xs.size(), ", ",
                 ys.size());
  auto geo = decode(op, weights, params, padding_modes);
  validate(op, weights, xs, ys, geo, /*need_contiguous=*/false);
  check_conv_args(op, weights, xs, ys, /*xs_ys_written=*/false);
  check_step_estimate_stable(op, weights, est, out_type(weights));
  return torch::stable::clone(est);
}

namespace {
// One layer's weight-gradient (W in the accumulation dtype, contiguous; x and y batched and
// contiguous): the direct kernels where they are preferred, else ATen's convolution_backward.
Tensor layer_weight_grad(const ConvGeom& g, const Tensor& W, const Tensor& x, const Tensor& y) {
  if (cpu::conv_gemm_preferred(g, W, x)) {
    Tensor gw = empty_as(W);
    cpu::ConvGemmWork work;
    cpu::conv_gemm_weight_grad(g, W, x, y, gw, work);
    return gw;
  }
  return contig(aten::convolution_weight_backward(y, pad_apply(g, x), W, g.stride, g.conv_pad, g.dilation,
                                                  g.transposed, g.outpad, g.groups));
}

bool is_floating(ScalarType s) { return s == kFloat || s == kDouble || s == kHalf || s == kBFloat16; }
}  // namespace

// d<y_l, A(W_l) x_l>/dW_l for each layer: the conv weight-gradient with input pad(x_l) and
// output-gradient y_l, in the accumulation dtype (the backward of conv_sigma and
// conv_sigma_from_step). On the CPU the direct kernels take the layers they are preferred for.
TensorList conv_weight_grad_impl(const TensorList& weights, const TensorList& xs, const TensorList& ys,
                                 const std::vector<int64_t>& params, const std::vector<std::string>& padding_modes) {
  const char* op = "specreg_fast::conv_weight_grad";
  NoGradGuard no_grad;
  SF_CHECK_VALUE(xs.size() == weights.size() && ys.size() == weights.size(), op,
                 ": weights, xs and ys must have the same length");
  auto geo = decode(op, weights, params, padding_modes);
  validate(op, weights, xs, ys, geo, /*need_contiguous=*/false);
  check_conv_args(op, weights, xs, ys, /*xs_ys_written=*/false);
  cpu::check_conv_kernel_override(op);
  TensorList res;
  for (size_t l = 0; l < weights.size(); ++l) {
    const auto& g = geo[l];
    const Tensor W = contig(as_dtype(weights[l], acc_type(weights[l].scalar_type())));
    if (zero_map(xs[l], ys[l])) {
      res.push_back(zeros(shape_of(W).dims, W.scalar_type(), W.device()));
      continue;
    }
    const Tensor x = batch1(contig(xs[l])), y = batch1(contig(ys[l]));
    res.push_back(layer_weight_grad(g, W, x, y));
  }
  return res;
}

// grads[l] += d<y_l, A(W_l) x_l>/dW_l (conv_weight_grad added in place, e.g. into .grad; the
// caller folds any scale into y). Every argument is checked before any grad is written. On
// the CPU the direct kernels add straight into a contiguous grad of the accumulation dtype;
// otherwise the weight-gradient is computed and added (cast to the grad's dtype).
void conv_weight_grad_add_impl(const TensorList& grads, const TensorList& weights, const TensorList& xs,
                               const TensorList& ys, const std::vector<int64_t>& params,
                               const std::vector<std::string>& padding_modes) {
  const char* op = "specreg_fast::conv_weight_grad_add_";
  NoGradGuard no_grad;
  SF_CHECK_VALUE(grads.size() == weights.size() && xs.size() == weights.size() && ys.size() == weights.size(), op,
                 ": grads, weights, xs and ys must have the same length, got ", grads.size(), ", ", weights.size(),
                 ", ", xs.size(), ", ", ys.size());
  auto geo = decode(op, weights, params, padding_modes);
  validate(op, weights, xs, ys, geo, /*need_contiguous=*/false);
  for (size_t l = 0; l < weights.size(); ++l) {
    SF_CHECK_VALUE(shape_of(grads[l]).dims == shape_of(weights[l]).dims, op, ": grads[", l,
                   "] must have the weight's shape ", shape_of(weights[l]), ", got ", shape_of(grads[l]));
    SF_CHECK_VALUE(grads[l].device() == weights[l].device(), op, ": grads[", l, "] must be on ",
                   device_name(weights[l].device()), ", got ", device_name(grads[l].device()));
    SF_CHECK_TYPE(is_floating(grads[l].scalar_type()), op, ": grads[", l, "] must be a floating-point tensor, got ",
                  dtype_name(grads[l].scalar_type()));
  }
  check_conv_args(op, weights, xs, ys, /*xs_ys_written=*/false, grads);
  cpu::check_conv_kernel_override(op);
  for (size_t l = 0; l < weights.size(); ++l) {
    if (zero_map(xs[l], ys[l])) continue;  // adds 0
    const auto& g = geo[l];
    const auto acc = acc_type(weights[l].scalar_type());
    const Tensor W = contig(as_dtype(weights[l], acc));
    const Tensor x = batch1(contig(xs[l]));
    const Tensor y = batch1(contig(as_dtype(ys[l], acc)));
    Tensor G = grads[l];
    if (G.is_contiguous() && G.scalar_type() == acc && cpu::conv_gemm_preferred(g, W, x)) {
      cpu::ConvGemmWork work;
      cpu::conv_gemm_weight_grad(g, W, x, y, G, work, /*accumulate=*/true);
    } else {
      torch::stable::copy_(G, aten::add(G, layer_weight_grad(g, W, x, y)));
    }
  }
}

// A^T y for each layer (the op's own adjoint, exposed so tests can check <A x, y> = <x, A^T y>).
TensorList conv_adjoint_impl(const TensorList& weights, const TensorList& xs, const TensorList& ys,
                             const std::vector<int64_t>& params, const std::vector<std::string>& padding_modes) {
  const char* op = "specreg_fast::conv_adjoint";
  SF_CHECK_VALUE(xs.size() == weights.size() && ys.size() == weights.size(), op,
                 ": weights, xs and ys must have the same length");
  auto geo = decode(op, weights, params, padding_modes);
  validate(op, weights, xs, ys, geo, /*need_contiguous=*/false);
  check_conv_args(op, weights, xs, ys, /*xs_ys_written=*/false);
  TensorList res;
  for (size_t l = 0; l < weights.size(); ++l) {
    if (zero_map(xs[l], ys[l])) {
      res.push_back(zeros(shape_of(xs[l]).dims, xs[l].scalar_type(), xs[l].device()));
      continue;
    }
    const Tensor W = as_dtype(weights[l], acc_type(weights[l].scalar_type()));
    const Tensor a = op_adjoint(geo[l], W, batch1(ys[l]), batch1(xs[l]));
    res.push_back(contig(unbatch1(a)));
  }
  return res;
}

}  // namespace specreg_fast

#ifndef SPECREG_NO_CPU_IMPL  // the CUDA library's copy of this file (csrc/cuda/conv_device_operator.cpp)
STABLE_TORCH_LIBRARY_IMPL(specreg_fast, CPU, m) {
  m.impl("conv_power_step_", TORCH_BOX(&specreg_fast::conv_power_step_impl));
  m.impl("conv_sigma", TORCH_BOX(&specreg_fast::conv_sigma_impl));
  m.impl("conv_sigma_from_step", TORCH_BOX(&specreg_fast::conv_sigma_from_step_impl));
  m.impl("conv_adjoint", TORCH_BOX(&specreg_fast::conv_adjoint_impl));
  m.impl("conv_weight_grad", TORCH_BOX(&specreg_fast::conv_weight_grad_impl));
  m.impl("conv_weight_grad_add_", TORCH_BOX(&specreg_fast::conv_weight_grad_add_impl));
}
#endif
