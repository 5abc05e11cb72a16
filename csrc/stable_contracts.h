// Contracts of the ops of specreg_fast._C (the stable-ABI library), checked before anything is
// written: the iteration cap, one device for all tensors, no memory shared between a written
// tensor and any other argument, the dense ops' argument checks; and the interrupt poll of the
// long loops, for every kernel (CPU and CUDA: all are on the stable ABI). The messages are those of the Python front
// (specreg_fast/ops/_checks.py), which raises them as ValueError/TypeError before calling the op.
#pragma once
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "stable_api.h"

namespace specreg_fast {

// The most power-iteration steps one op call may run (specreg_fast.ops.MAX_ITER).
constexpr int64_t kMaxIterStable = 1000000;

inline void check_n_iter_stable(const char* op, int64_t n_iter) {
  SF_CHECK_VALUE(n_iter >= 0 && n_iter <= kMaxIterStable, op, ": n_iter must be in [0, ", kMaxIterStable,
                 "] (specreg_fast.ops.MAX_ITER), got ", n_iter);
}

// Every tensor of `ts` on `device` (the op's first weight's); `what` names the list.
inline void check_on_device_stable(const char* op, const char* what, const TensorList& ts, const Device& device) {
  for (size_t i = 0; i < ts.size(); ++i)
    SF_CHECK_VALUE(ts[i].device() == device, op, ": ", what, "[", i, "] is on ", device_name(ts[i].device()),
                   ", expected every tensor on ", device_name(device), " (the device of the first weight)");
}

// The tensors an op reads and writes: a written tensor must share no memory with any other
// argument. ATen's overlap test (at::get_overlap_status) answers "no overlap" for two tensors
// whose address ranges intersect in no case (it says Full, Partial or TooHard), so the test is
// the intersection of the ranges itself.
class MemoryArgsStable {
 public:
  void add(const char* what, const TensorList& ts, bool written) {
    for (size_t i = 0; i < ts.size(); ++i) add_one(what, static_cast<int64_t>(i), ts[i], written);
  }
  void add_one(const char* what, int64_t index, const Tensor& t, bool written) {
    if (!t.defined() || t.numel() == 0) return;
    int64_t extent = 1;  // elements from the first to the last one addressed (strides >= 0)
    for (int64_t d = 0; d < t.dim(); ++d) extent += (t.size(d) - 1) * t.stride(d);
    const auto* begin = static_cast<const char*>(t.const_data_ptr());
    spans_.push_back({begin, begin + extent * static_cast<int64_t>(t.element_size()), what, index, written});
  }
  void check(const char* op) {
    std::sort(spans_.begin(), spans_.end(), [](const Span& a, const Span& b) { return a.begin < b.begin; });
    for (size_t i = 0; i < spans_.size(); ++i)
      for (size_t j = i + 1; j < spans_.size() && spans_[j].begin < spans_[i].end; ++j) {
        const Span &a = spans_[i], &b = spans_[j];
        if (!a.written && !b.written) continue;
        SF_CHECK_VALUE(false, op, ": ", a.what, "[", a.index, "] and ", b.what, "[", b.index,
                       "] share memory, and the op writes one of them in place; pass separate tensors");
      }
  }

 private:
  struct Span {
    const char *begin, *end;
    const char* what;
    int64_t index;
    bool written;
  };
  std::vector<Span> spans_;
};

// Whether a Python signal handler raised (Ctrl-C); defined in csrc/specreg_fast.cpp.
bool python_signal_raised();

// Polled once per step by the long loops: at most every 100 ms it runs Python's pending signal
// handlers, so Ctrl-C stops a call of up to kMaxIter steps.
class InterruptPollStable {
 public:
  explicit InterruptPollStable(const char* op) : op_(op), next_(Clock::now() + kPeriod) {}
  bool interrupted() {
    const auto now = Clock::now();
    if (now < next_) return false;
    next_ = now + kPeriod;
    return python_signal_raised();
  }
  [[noreturn]] void raise() const {
    throw std::runtime_error(
        cat_message(op_, ": interrupted (KeyboardInterrupt); the persistent vectors are as before the call"));
  }

 private:
  using Clock = std::chrono::steady_clock;
  static constexpr std::chrono::milliseconds kPeriod{100};
  const char* op_;
  Clock::time_point next_;
};

// Persistent vectors are float32, or float64 for float64 weights.
inline ScalarType power_acc_type_stable(ScalarType s) { return s == kDouble ? kDouble : kFloat; }

// The dense ops' checks.
inline void check_power_step_list_stable(const TensorList& weights, const TensorList& us, const TensorList& vs,
                                         const char* op, DeviceType device_type, bool writes) {
  SF_CHECK(us.size() == weights.size() && vs.size() == weights.size(), op,
           ": expected as many u and v vectors as weights, got ", weights.size(), " weights, ", us.size(), " u, ",
           vs.size(), " v");
  for (size_t l = 0; l < weights.size(); ++l) {
    const auto& W = weights[l];
    SF_CHECK(W.dim() == 2, op, ": weights[", l, "] must be 2-D, got shape ", shape_of(W));
    SF_CHECK(W.device().type() == device_type && W.device() == weights[0].device(), op, ": weights[", l,
             "] must be a ", device_type == DeviceType::CPU ? "CPU" : "CUDA", " tensor on ", device_name(weights[0].device()),
             ", got ", device_name(W.device()));
    const auto s = W.scalar_type();
    SF_CHECK(s == kFloat || s == kDouble || s == kBFloat16 || s == kHalf, op, ": weights[", l,
             "] must be float32/float64/bfloat16/float16, got ", dtype_name(s));
    const auto acc = power_acc_type_stable(s);
    SF_CHECK(us[l].dim() == 1 && us[l].size(0) == W.size(0), op, ": us[", l, "] must have shape (", W.size(0),
             ",), got ", shape_of(us[l]));
    SF_CHECK(vs[l].dim() == 1 && vs[l].size(0) == W.size(1), op, ": vs[", l, "] must have shape (", W.size(1),
             ",), got ", shape_of(vs[l]));
    SF_CHECK(us[l].scalar_type() == acc && vs[l].scalar_type() == acc, op, ": us[", l, "] and vs[", l,
             "] must be ", dtype_name(acc), " for a ", dtype_name(s), " weight, got ", dtype_name(us[l].scalar_type()),
             " and ", dtype_name(vs[l].scalar_type()));
    SF_CHECK(us[l].device() == W.device() && vs[l].device() == W.device(), op, ": us[", l, "]/vs[", l,
             "] must be on ", device_name(W.device()));
    SF_CHECK(us[l].is_contiguous() && vs[l].is_contiguous(), op, ": us[", l, "]/vs[", l, "] must be contiguous");
  }
  if (writes) {
    MemoryArgsStable mem;
    mem.add("weights", weights, false);
    mem.add("us", us, true);
    mem.add("vs", vs, true);
    mem.check(op);
  }
}

// `est` of sigma_from_step: one estimate per layer, of the op's dtype, on the weights' device.
inline void check_step_estimate_stable(const char* op, const TensorList& weights, const Tensor& est, ScalarType dtype) {
  const auto L = static_cast<int64_t>(weights.size());
  SF_CHECK_VALUE(est.dim() == 1 && est.size(0) == L, op, ": est must hold one estimate per layer, shape (", L,
                 ",), got ", shape_of(est));
  SF_CHECK_TYPE(est.scalar_type() == dtype, op, ": est must be ", dtype_name(dtype), " (the power step's dtype), got ",
                dtype_name(est.scalar_type()));
  if (L > 0)
    SF_CHECK_VALUE(est.device() == weights[0].device(), op, ": est is on ", device_name(est.device()), ", expected ",
                   device_name(weights[0].device()), " (the device of the first weight)");
}

}  // namespace specreg_fast
