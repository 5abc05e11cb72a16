// CUDA registration of the conv-operator ops and the circular (FFT) power step: the same
// device-generic code on the LibTorch stable ABI as the CPU kernels (csrc/cpu/conv_operator_cpu.cpp,
// csrc/cpu/circular_conv_cpu.cpp, compiled into this library by csrc/cuda/conv_device_*.cpp).
// Every tensor op there goes through the dispatcher, so on CUDA it runs cuDNN convolutions and
// cuFFT and stays free of host syncs except the one finiteness read per call and the per-step
// read that `tol` needs.
#include "stable_api.h"

#include <string>
#include <vector>

namespace specreg_fast {
Tensor conv_power_step_impl(const TensorList& weights, const TensorList& xs, const TensorList& ys,
                            const std::vector<int64_t>& params, const std::vector<std::string>& padding_modes,
                            int64_t n_iter, double tol);
Tensor conv_sigma_impl(const TensorList& weights, const TensorList& xs, const TensorList& ys,
                       const std::vector<int64_t>& params, const std::vector<std::string>& padding_modes);
Tensor conv_sigma_from_step_impl(const TensorList& weights, const TensorList& xs, const TensorList& ys,
                                 const std::vector<int64_t>& params, const std::vector<std::string>& padding_modes,
                                 const Tensor& est);
TensorList conv_adjoint_impl(const TensorList& weights, const TensorList& xs, const TensorList& ys,
                             const std::vector<int64_t>& params, const std::vector<std::string>& padding_modes);
TensorList conv_weight_grad_impl(const TensorList& weights, const TensorList& xs, const TensorList& ys,
                                 const std::vector<int64_t>& params, const std::vector<std::string>& padding_modes);
void conv_weight_grad_add_impl(const TensorList& grads, const TensorList& weights, const TensorList& xs,
                               const TensorList& ys, const std::vector<int64_t>& params,
                               const std::vector<std::string>& padding_modes);
Tensor circular_power_step_impl(const TensorList& weights, const TensorList& xs, const TensorList& x_tops,
                                const TensorList& y_tops, const std::vector<int64_t>& params, int64_t n_iter);
}  // namespace specreg_fast

STABLE_TORCH_LIBRARY_IMPL(specreg_fast, CUDA, m) {
  m.impl("conv_power_step_", TORCH_BOX(&specreg_fast::conv_power_step_impl));
  m.impl("conv_sigma", TORCH_BOX(&specreg_fast::conv_sigma_impl));
  m.impl("conv_sigma_from_step", TORCH_BOX(&specreg_fast::conv_sigma_from_step_impl));
  m.impl("conv_adjoint", TORCH_BOX(&specreg_fast::conv_adjoint_impl));
  m.impl("conv_weight_grad", TORCH_BOX(&specreg_fast::conv_weight_grad_impl));
  m.impl("conv_weight_grad_add_", TORCH_BOX(&specreg_fast::conv_weight_grad_add_impl));
  // cuFFT and cuDNN through the dispatcher: the same function as on CPU.
  m.impl("circular_power_step_", TORCH_BOX(&specreg_fast::circular_power_step_impl));
}
