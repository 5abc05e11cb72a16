// CUDA registration of the conv-operator ops and the circular (FFT) power step. The loops
// (csrc/cpu/conv_operator_cpu.cpp, csrc/cpu/circular_conv_cpu.cpp) are ATen ops only, so on CUDA it runs cuDNN convolutions and stays free of host syncs except
// the one finiteness read per call and the per-step read that `tol` needs.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>
#include <vector>

namespace specreg_fast {
at::Tensor conv_power_step_impl(at::TensorList weights, at::TensorList xs, at::TensorList ys, at::IntArrayRef params,
                                const std::vector<std::string>& padding_modes, int64_t n_iter, double tol);
at::Tensor conv_sigma_impl(at::TensorList weights, at::TensorList xs, at::TensorList ys, at::IntArrayRef params,
                           const std::vector<std::string>& padding_modes);
at::Tensor conv_sigma_from_step_impl(at::TensorList weights, at::TensorList xs, at::TensorList ys,
                                     at::IntArrayRef params, const std::vector<std::string>& padding_modes,
                                     const at::Tensor& est);
std::vector<at::Tensor> conv_adjoint_impl(at::TensorList weights, at::TensorList xs, at::TensorList ys,
                                          at::IntArrayRef params, const std::vector<std::string>& padding_modes);
std::vector<at::Tensor> conv_weight_grad_impl(at::TensorList weights, at::TensorList xs, at::TensorList ys,
                                              at::IntArrayRef params, const std::vector<std::string>& padding_modes);
void conv_weight_grad_add_impl(at::TensorList grads, at::TensorList weights, at::TensorList xs, at::TensorList ys,
                               at::IntArrayRef params, const std::vector<std::string>& padding_modes);
at::Tensor circular_power_step_impl(at::TensorList weights, at::TensorList xs, at::TensorList x_tops,
                                    at::TensorList y_tops, at::IntArrayRef params, int64_t n_iter);
}  // namespace specreg_fast

TORCH_LIBRARY_IMPL(specreg_fast, CUDA, m) {
  m.impl("conv_power_step_", &specreg_fast::conv_power_step_impl);
  m.impl("conv_sigma", &specreg_fast::conv_sigma_impl);
  m.impl("conv_sigma_from_step", &specreg_fast::conv_sigma_from_step_impl);
  m.impl("conv_adjoint", &specreg_fast::conv_adjoint_impl);
  m.impl("conv_weight_grad", &specreg_fast::conv_weight_grad_impl);
  m.impl("conv_weight_grad_add_", &specreg_fast::conv_weight_grad_add_impl);
  // ATen calls only (cuFFT, cuDNN): the same function as on CPU.
  m.impl("circular_power_step_", &specreg_fast::circular_power_step_impl);
}
