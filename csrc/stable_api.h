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
#include <array>
#include <optional>
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

// ---- ATen ops without a stable wrapper at torch 2.11: boxed calls through the dispatcher ----
// call_op("aten::name", "overload", args...) boxes the arguments (Tensor, int64_t, double, bool,
// std::vector<int64_t>, std::optional<...>, std::string, ScalarType, Device) onto a stack of
// StableIValue, runs torch_call_dispatcher (the stable C shim) and returns the first output. Every
// argument of the schema must be passed, in order (no defaults), and none may be a Scalar: the
// stable ABI of 2.11 has no Scalar; the ops below use the Tensor overloads instead.
namespace aten {

template <typename... Args>
inline void call_boxed(const char* name, const char* overload, StableIValue* stack) {
  STABLE_TORCH_ERROR_CODE_CHECK(torch_call_dispatcher(name, overload, stack, TORCH_ABI_VERSION));
}

template <size_t NOut = 1, typename... Args>
inline std::array<StableIValue, std::max<size_t>(sizeof...(Args), NOut)> call_stack(const char* name,
                                                                                    const char* overload,
                                                                                    const Args&... args) {
  std::array<StableIValue, std::max<size_t>(sizeof...(Args), NOut)> stack{torch::stable::detail::from(args)...};
  call_boxed(name, overload, stack.data());
  return stack;
}

template <typename... Args>
inline Tensor call_op(const char* name, const char* overload, const Args&... args) {
  auto stack = call_stack<1>(name, overload, args...);
  return torch::stable::detail::to<Tensor>(stack[0]);
}

using IntList = std::vector<int64_t>;
using OptTensor = std::optional<Tensor>;

inline Tensor convolution(const Tensor& x, const Tensor& w, const IntList& stride, const IntList& padding,
                          const IntList& dilation, bool transposed, const IntList& output_padding, int64_t groups) {
  return call_op("aten::convolution", "", x, w, OptTensor(), stride, padding, dilation, transposed, output_padding,
                 groups);
}
// The weight-gradient of convolution (output_mask (false, true, false)).
inline Tensor convolution_weight_backward(const Tensor& grad_out, const Tensor& x, const Tensor& w,
                                          const IntList& stride, const IntList& padding, const IntList& dilation,
                                          bool transposed, const IntList& output_padding, int64_t groups) {
  const bool mask[3] = {false, true, false};
  auto stack = call_stack<3>("aten::convolution_backward", "", grad_out, x, w, std::optional<IntList>(), stride,
                             padding, dilation, transposed, output_padding, groups,
                             torch::headeronly::HeaderOnlyArrayRef<bool>(mask, 3));
  (void)torch::stable::detail::to<Tensor>(stack[0]);
  Tensor gw = torch::stable::detail::to<Tensor>(stack[1]);
  (void)torch::stable::detail::to<Tensor>(stack[2]);
  return gw;
}
// reflection_pad{1,2,3}d_backward / replication_pad{1,2,3}d_backward (d = 1..3 spatial dims).
inline Tensor pad_backward(const char* kind, int64_t d, const Tensor& grad, const Tensor& x_like, const IntList& pad) {
  const std::string name = std::string("aten::") + kind + "_pad" + std::to_string(d) + "d_backward";
  return call_op(name.c_str(), "", grad, x_like, pad);
}
inline Tensor flip(const Tensor& t, const IntList& dims) { return call_op("aten::flip", "", t, dims); }
inline Tensor fft_rfftn(const Tensor& t, const IntList& dims) {
  return call_op("aten::fft_rfftn", "", t, std::optional<IntList>(), std::optional<IntList>(dims),
                 std::optional<std::string>("ortho"));
}
inline Tensor fft_irfftn(const Tensor& t, const IntList& sizes, const IntList& dims) {
  return call_op("aten::fft_irfftn", "", t, std::optional<IntList>(sizes), std::optional<IntList>(dims),
                 std::optional<std::string>("ortho"));
}
inline Tensor view_as_real(const Tensor& t) { return call_op("aten::view_as_real", "", t); }
inline Tensor mul(const Tensor& a, const Tensor& b) { return call_op("aten::mul", "Tensor", a, b); }
inline Tensor div(const Tensor& a, const Tensor& b) { return call_op("aten::div", "Tensor", a, b); }
inline Tensor add(const Tensor& a, const Tensor& b) { return torch::stable::subtract(a, b, -1.0); }
inline Tensor sqrt(const Tensor& t) { return call_op("aten::sqrt", "", t); }
inline Tensor where(const Tensor& cond, const Tensor& a, const Tensor& b) {
  return call_op("aten::where", "self", cond, a, b);
}
inline Tensor isfinite(const Tensor& t) { return call_op("aten::isfinite", "", t); }
inline Tensor logical_not(const Tensor& t) { return call_op("aten::logical_not", "", t); }
inline Tensor logical_and(const Tensor& a, const Tensor& b) { return call_op("aten::logical_and", "", a, b); }
inline Tensor logical_or(const Tensor& a, const Tensor& b) { return call_op("aten::logical_or", "", a, b); }
inline Tensor gt(const Tensor& a, const Tensor& b) { return call_op("aten::gt", "Tensor", a, b); }
inline Tensor eq(const Tensor& a, const Tensor& b) { return call_op("aten::eq", "Tensor", a, b); }
inline Tensor clamp_min(const Tensor& a, const Tensor& lo) { return call_op("aten::clamp_min", "Tensor", a, lo); }
inline Tensor max(const Tensor& t) { return call_op("aten::max", "", t); }
inline Tensor argmax(const Tensor& t) {
  return call_op("aten::argmax", "", t, std::optional<int64_t>(), false);
}
inline Tensor any(const Tensor& t) { return call_op("aten::any", "", t); }
inline Tensor one_hot(const Tensor& index, int64_t n) { return call_op("aten::one_hot", "", index, n); }
inline Tensor sum(const Tensor& t) { return torch::stable::sum(t); }
inline Tensor to_dtype(const Tensor& t, ScalarType dtype) { return torch::stable::to(t, dtype); }
// |t| (2-norm of every entry) as a 0-dim tensor of t's dtype (linalg_vector_norm takes a Scalar ord).
inline Tensor norm(const Tensor& t) { return sqrt(torch::stable::sum(mul(t, t))); }

}  // namespace aten

// The tensor itself when it is already contiguous (no dispatcher call), else a contiguous copy.
inline Tensor contig(const Tensor& t) { return t.is_contiguous() ? t : torch::stable::contiguous(t); }
// t viewed with a leading dim of size 1 (unsqueeze(0)), and the inverse for a tensor whose
// leading dim has size 1 (squeeze(0)): aliases of t's storage made by the C shim's
// aoti_torch__reinterpret_tensor, without a boxed dispatcher call (each costs microseconds, a
// measurable share of a power step on a small layer). No autograd view: for the kernels' own
// tensors under NoGradGuard only.
inline Tensor reinterpret(const Tensor& t, const std::vector<int64_t>& sizes, const std::vector<int64_t>& strides) {
  AtenTensorHandle h = nullptr;
  STD_TORCH_CHECK(aoti_torch__reinterpret_tensor(t.get(), static_cast<int64_t>(sizes.size()), sizes.data(),
                                                 strides.data(), 0, &h) == 0,
                  "specreg_fast: reinterpret failed");
  return Tensor(h);
}
inline Tensor batch1(const Tensor& t) {
  const auto sz = t.sizes(), st = t.strides();
  std::vector<int64_t> sizes{1}, strides{t.dim() > 0 ? sz[0] * st[0] : 1};
  sizes.insert(sizes.end(), sz.begin(), sz.end());
  strides.insert(strides.end(), st.begin(), st.end());
  return reinterpret(t, sizes, strides);
}
inline Tensor unbatch1(const Tensor& t) {
  STD_TORCH_CHECK(t.dim() >= 1 && t.size(0) == 1, "specreg_fast: unbatch1 of a tensor without a leading 1");
  const auto sz = t.sizes(), st = t.strides();
  return reinterpret(t, std::vector<int64_t>(sz.begin() + 1, sz.end()), std::vector<int64_t>(st.begin() + 1, st.end()));
}
// A new contiguous tensor of t's shape, dtype and device (empty_like without a dispatcher call).
inline Tensor empty_as(const Tensor& t) {
  const auto sz = t.sizes();
  return empty(std::vector<int64_t>(sz.begin(), sz.end()), t.scalar_type(), t.device());
}

// t in `dtype` (no call when it already is).
inline Tensor as_dtype(const Tensor& t, ScalarType dtype) {
  return t.scalar_type() == dtype ? t : torch::stable::to(t, dtype);
}
// The value of a one-entry tensor as a double, read on the host (copied there first from a device).
inline double item_double(const Tensor& t) {
  const Tensor h = t.is_cpu() ? t : torch::stable::to(t, Device(DeviceType::CPU));
  switch (h.scalar_type()) {
    case ScalarType::Float: return *h.const_data_ptr<float>();
    case ScalarType::Double: return *h.const_data_ptr<double>();
    case ScalarType::Bool: return *static_cast<const bool*>(h.const_data_ptr()) ? 1.0 : 0.0;
    case ScalarType::Long: return static_cast<double>(*h.const_data_ptr<int64_t>());
    default: SF_CHECK(false, "specreg_fast: item_double of an unsupported dtype ", dtype_name(h.scalar_type()));
  }
  return 0;
}
// A 0-dim tensor holding v (dtype, device).
inline Tensor scalar_tensor(double v, ScalarType dtype, const Device& device) {
  Tensor t = empty({}, dtype, device);
  torch::stable::fill_(t, v);
  return t;
}

// AT_DISPATCH_FLOATING_TYPES: the body, a generic lambda called with a float or double null
// pointer whose pointee type is the element type (`using T = std::remove_pointer_t<decltype(p)>`).
template <typename F>
inline void dispatch_floating(ScalarType st, const char* what, F&& f) {
  switch (st) {
    case ScalarType::Float: f(static_cast<float*>(nullptr)); break;
    case ScalarType::Double: f(static_cast<double*>(nullptr)); break;
    default: SF_CHECK(false, what, ": expected float32 or float64, got ", dtype_name(st));
  }
}

}  // namespace specreg_fast
