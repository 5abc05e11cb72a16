// The ATen-typed copy of csrc/stable_contracts.h, left only for the dense CUDA kernels still on
// ATen's C++ API (csrc/power_step_checks.h, csrc/cuda/power_step_cuda.cu); it goes with their
// port to the stable ABI. Every other kernel uses stable_contracts.h.
// Contracts every op checks before it writes anything:
// the iteration cap, one device for all tensors, no memory shared between a written tensor
// and any other argument; and the interrupt poll of the long loops. (Lazy conj/neg views
// never reach a kernel: PyTorch's fallbacks materialize them first, see
// csrc/cpu/batched_power_cpu.cpp for the one op where that fallback fails.)
#pragma once
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

namespace specreg_fast {

// The most power-iteration steps one op call may run (specreg_fast.ops.MAX_ITER, the same
// number; a test compares them). 10^6 steps on a 1024 x 1024 float32 weight take minutes on
// one core, and no convergence run of ours needs more than a few thousand; a larger count is
// almost always a bug (2**40 would hang the process).
constexpr int64_t kMaxIter = 1000000;

inline void check_n_iter(const char* op, int64_t n_iter) {
  TORCH_CHECK_VALUE(n_iter >= 0 && n_iter <= kMaxIter, op, ": n_iter must be in [0, ", kMaxIter,
                    "] (specreg_fast.ops.MAX_ITER), got ", n_iter);
}

// Every tensor of `ts` on `device` (the op's first weight's); `what` names the list.
inline void check_on_device(const char* op, const char* what, at::TensorList ts, const at::Device& device) {
  for (size_t i = 0; i < ts.size(); ++i)
    TORCH_CHECK_VALUE(ts[i].device() == device, op, ": ", what, "[", i, "] is on ", ts[i].device(),
                      ", expected every tensor on ", device, " (the device of the first weight)");
}

// `est` of sigma_from_step / conv_sigma_from_step: the power step's return for these layers,
// one estimate per layer, of the op's output dtype, on the weights' device.
inline void check_step_estimate(const char* op, at::TensorList weights, const at::Tensor& est, at::ScalarType dtype) {
  const auto L = static_cast<int64_t>(weights.size());
  TORCH_CHECK_VALUE(est.dim() == 1 && est.size(0) == L, op, ": est must hold one estimate per layer, shape (", L,
                    ",), got ", est.sizes());
  TORCH_CHECK_TYPE(est.scalar_type() == dtype, op, ": est must be ", dtype, " (the power step's dtype), got ",
                   est.scalar_type());
  if (L > 0)
    TORCH_CHECK_VALUE(est.device() == weights[0].device(), op, ": est is on ", est.device(), ", expected ",
                      weights[0].device(), " (the device of the first weight)");
}

// The tensors an op reads and writes, for check_no_shared_memory. A written tensor must share
// no memory with any other argument: the same tensor as u and v, one buffer for two layers'
// vectors, or x_tops aliasing xs would make one write clobber another input mid-call.
class MemoryArgs {
 public:
  void add(const char* what, at::TensorList ts, bool written) {
    for (size_t i = 0; i < ts.size(); ++i) add_one(what, static_cast<int64_t>(i), ts[i], written);
  }
  void add_one(const char* what, int64_t index, const at::Tensor& t, bool written) {
    if (!t.defined() || t.numel() == 0 || !t.has_storage()) return;
    int64_t extent = 1;  // elements from the first to the last one addressed (strides >= 0)
    for (int64_t d = 0; d < t.dim(); ++d) extent += (t.size(d) - 1) * t.stride(d);
    const auto* begin = static_cast<const char*>(t.const_data_ptr());
    spans_.push_back({begin, begin + extent * static_cast<int64_t>(t.element_size()), &t, what, index, written});
  }
  // Sorted by start address, every pair whose address ranges intersect and of which one is
  // written is asked to ATen's overlap test (exact for the contiguous vectors; ranges that
  // interleave without touching, e.g. x[::2] and x[1::2], pass).
  void check(const char* op) {
    std::sort(spans_.begin(), spans_.end(), [](const Span& a, const Span& b) { return a.begin < b.begin; });
    for (size_t i = 0; i < spans_.size(); ++i)
      for (size_t j = i + 1; j < spans_.size() && spans_[j].begin < spans_[i].end; ++j) {
        const Span &a = spans_[i], &b = spans_[j];
        if (!a.written && !b.written) continue;
        TORCH_CHECK_VALUE(at::get_overlap_status(*a.t, *b.t) == at::MemOverlapStatus::No, op, ": ", a.what, "[",
                          a.index, "] and ", b.what, "[", b.index,
                          "] share memory, and the op writes one of them in place; pass separate tensors");
      }
  }

 private:
  struct Span {
    const char *begin, *end;
    const at::Tensor* t;
    const char* what;
    int64_t index;
    bool written;
  };
  std::vector<Span> spans_;
};

// Whether a Python signal handler raised (Ctrl-C: KeyboardInterrupt); defined in
// csrc/specreg_fast.cpp, the one file built against Python.h. False outside the interpreter.
bool python_signal_raised();

// Polled once per step by the long loops of the ops: at most every 100 ms it takes the GIL and
// runs Python's pending signal handlers, so Ctrl-C stops a call of up to kMaxIter steps. The
// clock read costs ~20 ns, nothing next to a step.
class InterruptPoll {
 public:
  explicit InterruptPoll(const char* op) : op_(op), next_(Clock::now() + kPeriod) {}
  // True once a handler raised: the caller restores its state, then calls raise().
  bool interrupted() {
    const auto now = Clock::now();
    if (now < next_) return false;
    next_ = now + kPeriod;
    return python_signal_raised();
  }
  [[noreturn]] void raise() const {
    TORCH_CHECK(false, op_, ": interrupted (KeyboardInterrupt); the persistent vectors are as before the call");
    __builtin_unreachable();
  }

 private:
  using Clock = std::chrono::steady_clock;
  static constexpr std::chrono::milliseconds kPeriod{100};
  const char* op_;
  Clock::time_point next_;
};

}  // namespace specreg_fast
