// Argument checks of specreg_fast::lowrank_power_step_, shared by its CPU and CUDA kernels
// (csrc/cpu/lowrank_step_cpu.cpp, csrc/cuda/lowrank_step_cuda.cu); the same messages as the
// Python front (specreg_fast/ops/lowrank_step.py), which raises them as ValueError/TypeError.
#pragma once
#include <cmath>
#include <utility>
#include <vector>

#include "stable_contracts.h"

namespace specreg_fast {

inline bool is_float_type(ScalarType s) { return s == kFloat || s == kDouble || s == kBFloat16 || s == kHalf; }

// A map accumulates in float64 when any of W, A, B is float64, else float32.
inline ScalarType map_acc_type(const Tensor& W, const Tensor& A, const Tensor& B) {
  return (W.scalar_type() == kDouble || A.scalar_type() == kDouble || B.scalar_type() == kDouble) ? kDouble : kFloat;
}

// Every tensor on one device of `device_type`; per map W (m, n), A (r, n), B (m, r) of the four
// float dtypes, a finite scale, u (m) and v (n) contiguous in the map's accumulator dtype; no u
// or v sharing memory with another argument. Nothing is written before these pass.
inline void check_lowrank_args(const TensorList& weights, const TensorList& As, const TensorList& Bs,
                               const std::vector<double>& scales, const TensorList& us, const TensorList& vs,
                               const char* op, DeviceType device_type) {
  const size_t L = weights.size();
  SF_CHECK_VALUE(As.size() == L && Bs.size() == L && scales.size() == L && us.size() == L && vs.size() == L, op,
                 ": expected one A, B, scale, u and v per weight, got ", L, " weights, ", As.size(), " As, ",
                 Bs.size(), " Bs, ", scales.size(), " scales, ", us.size(), " us, ", vs.size(), " vs");
  for (size_t l = 0; l < L; ++l) {
    const Tensor &W = weights[l], &A = As[l], &B = Bs[l];
    SF_CHECK_VALUE(W.dim() == 2, op, ": weights[", l, "] must be 2-D, got shape ", shape_of(W));
    SF_CHECK_VALUE(W.device().type() == device_type && W.device() == weights[0].device(), op, ": weights[", l,
                   "] must be a ", device_type == DeviceType::CPU ? "CPU" : "CUDA", " tensor on ", device_name(weights[0].device()), ", got ", device_name(W.device()));
    for (const auto& [what, T] : {std::pair<const char*, const Tensor*>{"weights", &W}, {"As", &A}, {"Bs", &B}})
      SF_CHECK_TYPE(is_float_type(T->scalar_type()), op, ": ", what, "[", l,
                    "] must be float32/float64/bfloat16/float16, got ", dtype_name(T->scalar_type()));
    SF_CHECK_VALUE(A.dim() == 2 && A.size(1) == W.size(1), op, ": As[", l, "] must have shape (r, ", W.size(1),
                   "), got ", shape_of(A));
    SF_CHECK_VALUE(B.dim() == 2 && B.size(0) == W.size(0) && B.size(1) == A.size(0), op, ": Bs[", l,
                   "] must have shape (", W.size(0), ", ", A.size(0), "), got ", shape_of(B));
    SF_CHECK_VALUE(A.device() == W.device() && B.device() == W.device(), op, ": As[", l, "]/Bs[", l, "] must be on ",
                   device_name(W.device()));
    SF_CHECK_VALUE(std::isfinite(scales[l]), op, ": scales[", l, "] must be finite, got ", scales[l]);
    const ScalarType acc = map_acc_type(W, A, B);
    SF_CHECK_VALUE(us[l].dim() == 1 && us[l].size(0) == W.size(0), op, ": us[", l, "] must have shape (", W.size(0),
                   ",), got ", shape_of(us[l]));
    SF_CHECK_VALUE(vs[l].dim() == 1 && vs[l].size(0) == W.size(1), op, ": vs[", l, "] must have shape (", W.size(1),
                   ",), got ", shape_of(vs[l]));
    SF_CHECK_TYPE(us[l].scalar_type() == acc && vs[l].scalar_type() == acc, op, ": us[", l, "] and vs[", l,
                  "] must be ", dtype_name(acc), " for map ", l, ", got ", dtype_name(us[l].scalar_type()), " and ",
                  dtype_name(vs[l].scalar_type()));
    SF_CHECK_VALUE(us[l].device() == W.device() && vs[l].device() == W.device(), op, ": us[", l, "]/vs[", l,
                   "] must be on ", device_name(W.device()));
    SF_CHECK_VALUE(us[l].is_contiguous() && vs[l].is_contiguous(), op, ": us[", l, "]/vs[", l,
                   "] must be contiguous");
  }
  MemoryArgsStable mem;
  mem.add("weights", weights, false);
  mem.add("As", As, false);
  mem.add("Bs", Bs, false);
  mem.add("us", us, true);
  mem.add("vs", vs, true);
  mem.check(op);
}

}  // namespace specreg_fast
