// The LibTorch stable ABI as the kernels of specreg_fast._C use it: torch::stable::Tensor, the
// check macros, and the few helpers the stable headers of torch 2.11 (TORCH_TARGET_VERSION, set
// by setup.py) do not have. Nothing here includes ATen or c10: a file that does would stop the
// build (setup.py defines TORCH_TARGET_VERSION, and ATen/ATen.h refuses to compile with it), so
// the library links to no unstable C++ symbol of torch (python_tests/test_abi_symbols.py).
//
// Errors: every check throws std::runtime_error, which PyTorch turns into a RuntimeError (the
// stable ABI has no typed C++ errors). The typed ValueError/TypeError of the ops come from the
// Python front (specreg_fast/ops/_checks.py: typed_call), which runs the same checks, with the same messages,
// before it calls the op; the kernels check again, so that a direct torch.ops call cannot
// reach unchecked memory.
#pragma once
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <ostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace specreg_fast {

using Tensor = torch::stable::Tensor;
using TensorList = std::vector<torch::stable::Tensor>;
using ScalarType = torch::headeronly::ScalarType;
using Device = torch::stable::Device;
using DeviceType = torch::headeronly::DeviceType;
namespace st = torch::headeronly;  // st::ScalarType::Float, ...

constexpr ScalarType kFloat = ScalarType::Float;
constexpr ScalarType kDouble = ScalarType::Double;
constexpr ScalarType kHalf = ScalarType::Half;
constexpr ScalarType kBFloat16 = ScalarType::BFloat16;
constexpr ScalarType kComplexFloat = ScalarType::ComplexFloat;
constexpr ScalarType kComplexDouble = ScalarType::ComplexDouble;
constexpr ScalarType kInt = ScalarType::Int;

// What messages print for a shape, a device, a dtype (as ATen's operator<< did: "[3, 4]",
// "cpu", "cuda:0", "Float").
struct Shape {
  std::vector<int64_t> dims;
};
inline Shape shape_of(const Tensor& t) {
  const auto s = t.sizes();
  return Shape{std::vector<int64_t>(s.begin(), s.end())};
}
inline std::ostream& operator<<(std::ostream& os, const Shape& s) {
  os << "[";
  for (size_t i = 0; i < s.dims.size(); ++i) os << (i ? ", " : "") << s.dims[i];
  return os << "]";
}
inline const char* device_type_name(DeviceType t) {
  switch (t) {
    case DeviceType::CPU: return "cpu";
    case DeviceType::CUDA: return "cuda";
    case DeviceType::Meta: return "meta";
    default: return "device";
  }
}
struct DeviceName {  // (not the Device itself: torch::stable's types have hidden visibility)
  DeviceType type;
  int index;
};
inline DeviceName device_name(const Device& d) {
  return DeviceName{d.type(), d.has_index() ? static_cast<int>(d.index()) : -1};
}
inline std::ostream& operator<<(std::ostream& os, const DeviceName& n) {
  os << device_type_name(n.type);
  if (n.index >= 0 && n.type != DeviceType::CPU) os << ":" << n.index;
  return os;
}
struct DtypeName {
  ScalarType t;
};
inline DtypeName dtype_name(ScalarType t) { return DtypeName{t}; }
inline std::ostream& operator<<(std::ostream& os, const DtypeName& n) { return os << torch::headeronly::toString(n.t); }

template <typename... Args>
std::string cat_message(const Args&... args) {
  std::ostringstream oss;
  ((oss << args), ...);
  return oss.str();
}

}  // namespace specreg_fast

// A failed check raises RuntimeError with exactly the message (no file:line prefix): the
// Python front raises the same message as ValueError/TypeError (see the top of this file).
#define SF_CHECK(cond, ...)                                                        \
  do {                                                                             \
    if (!(cond)) throw std::runtime_error(::specreg_fast::cat_message(__VA_ARGS__)); \
  } while (0)
// The kind the Python front raises for the same condition, kept beside each check.
#define SF_CHECK_VALUE(cond, ...) SF_CHECK(cond, __VA_ARGS__)
#define SF_CHECK_TYPE(cond, ...) SF_CHECK(cond, __VA_ARGS__)

namespace specreg_fast {

// at::NoGradGuard through the grad-mode shim.
class NoGradGuard {
 public:
  NoGradGuard() : prev_(aoti_torch_grad_mode_is_enabled()) { aoti_torch_grad_mode_set_enabled(false); }
  ~NoGradGuard() { aoti_torch_grad_mode_set_enabled(prev_); }
  NoGradGuard(const NoGradGuard&) = delete;
  NoGradGuard& operator=(const NoGradGuard&) = delete;

 private:
  bool prev_;
};

// A new contiguous tensor, straight through the C shim's allocator (aoti_torch_empty_strided):
// torch::stable::empty goes through a boxed dispatcher call, measurable on the small ops.
inline Tensor empty(const std::vector<int64_t>& sizes, ScalarType dtype, const Device& device) {
  std::vector<int64_t> strides(sizes.size());
  int64_t stride = 1;
  for (size_t i = sizes.size(); i-- > 0;) {
    strides[i] = stride;
    stride *= std::max<int64_t>(sizes[i], 1);
  }
  const auto dtype_code = torch::stable::detail::to<int32_t>(torch::stable::detail::from(dtype));
  const auto device_code = torch::stable::detail::to<int32_t>(torch::stable::detail::from(device.type()));
  AtenTensorHandle handle = nullptr;
  STD_TORCH_CHECK(aoti_torch_empty_strided(static_cast<int64_t>(sizes.size()), sizes.data(), strides.data(), dtype_code,
                                           device_code, device.has_index() ? device.index() : 0, &handle) == 0,
                  "specreg_fast: allocation failed");
  return Tensor(handle);
}
inline Tensor zeros(const std::vector<int64_t>& sizes, ScalarType dtype, const Device& device) {
  Tensor t = empty(sizes, dtype, device);
  torch::stable::zero_(t);
  return t;
}

}  // namespace specreg_fast
