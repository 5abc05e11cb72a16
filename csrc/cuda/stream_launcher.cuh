// The one place a kernel is launched on the device: a launch sequence's `launch(kernel, grid,
// block, args...)` (power_step_kernels.cuh: launch_power_steps, launch_sigma;
// lowrank_step_kernels.cuh: launch_lowrank_steps) on `stream`. The .cu host code launches only
// through it, so the sequences the emulator (scripts/cuda_emulate) runs are the ones the GPU runs
// (python_tests/test_cuda_emulate_coverage.py).
#pragma once
#include <cuda_runtime.h>
#include <torch/csrc/stable/macros.h>

#include "power_step_kernels.cuh"

namespace specreg_fast {
namespace cuda {

struct StreamLauncher {
  cudaStream_t stream;
  template <typename... KArgs, typename... Args>
  void operator()(void (*kernel)(KArgs...), LaunchDim grid, LaunchDim block, Args... args) const {
    kernel<<<dim3(grid.x, grid.y), dim3(block.x, block.y), 0, stream>>>(args...);
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace cuda
}  // namespace specreg_fast
