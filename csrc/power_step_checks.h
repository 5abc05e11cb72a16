// Argument checks of the dense ops, shared by every backend (CPU, CUDA).
#pragma once
#include <ATen/ATen.h>

#include "op_contracts.h"

namespace specreg_fast {

// Persistent vectors are float32, or float64 for float64 weights.
inline at::ScalarType power_acc_type(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

// weights[l] is 2-D float32/float64/bfloat16/float16 on one device of type `device_type`;
// us[l] (m) and vs[l] (n) are contiguous vectors of the accumulator type on that device; with
// `writes` (power_step_), no u or v shares memory with another argument.
inline void check_power_step_list(at::TensorList weights, at::TensorList us, at::TensorList vs, const char* op,
                                  c10::DeviceType device_type, bool writes) {
  TORCH_CHECK(us.size() == weights.size() && vs.size() == weights.size(), op,
              ": expected as many u and v vectors as weights, got ", weights.size(), " weights, ", us.size(),
              " u, ", vs.size(), " v");
  for (size_t l = 0; l < weights.size(); ++l) {
    const auto& W = weights[l];
    TORCH_CHECK(W.dim() == 2, op, ": weights[", l, "] must be 2-D, got shape ", W.sizes());
    TORCH_CHECK(W.device().type() == device_type && W.device() == weights[0].device(), op, ": weights[", l,
                "] must be a ", c10::DeviceTypeName(device_type), " tensor on ", weights[0].device(), ", got ",
                W.device());
    const auto st = W.scalar_type();
    TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, op,
                ": weights[", l, "] must be float32/float64/bfloat16/float16, got ", st);
    const auto acc = power_acc_type(st);
    TORCH_CHECK(us[l].dim() == 1 && us[l].size(0) == W.size(0), op, ": us[", l, "] must have shape (",
                W.size(0), ",), got ", us[l].sizes());
    TORCH_CHECK(vs[l].dim() == 1 && vs[l].size(0) == W.size(1), op, ": vs[", l, "] must have shape (",
                W.size(1), ",), got ", vs[l].sizes());
    TORCH_CHECK(us[l].scalar_type() == acc && vs[l].scalar_type() == acc, op, ": us[", l, "] and vs[", l,
                "] must be ", acc, " for a ", st, " weight, got ", us[l].scalar_type(), " and ",
                vs[l].scalar_type());
    TORCH_CHECK(us[l].device() == W.device() && vs[l].device() == W.device(), op, ": us[", l, "]/vs[", l,
                "] must be on ", W.device());
    TORCH_CHECK(us[l].is_contiguous() && vs[l].is_contiguous(), op, ": us[", l, "]/vs[", l,
                "] must be contiguous");
  }
  if (writes) {
    MemoryArgs mem;
    mem.add("weights", weights, false);
    mem.add("us", us, true);
    mem.add("vs", vs, true);
    mem.check(op);
  }
}

}  // namespace specreg_fast
