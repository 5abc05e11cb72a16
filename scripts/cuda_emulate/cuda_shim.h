// Just enough of the CUDA execution model to run csrc/cuda/power_step_kernels.cuh as host
// C++: every CUDA thread of a block is a std::thread, blocks run one after another,
// __syncthreads is a std::barrier over the block, __shfl_xor_sync an exchange through a
// per-warp buffer between two barriers over the warp's 32 threads, and __shared__ becomes
// `static` (one block at a time, so a function-static is exactly the block's shared memory).
// A divergent __syncthreads or shuffle, which is undefined on a GPU, deadlocks here.
#pragma once

#include <array>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static

using std::isfinite;
using std::sqrt;

struct EmuDim3 {
  unsigned x = 1, y = 1, z = 1;
};

inline thread_local EmuDim3 threadIdx, blockIdx;
inline EmuDim3 blockDim, gridDim;

namespace emu {
inline std::unique_ptr<std::barrier<>> block_barrier;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
inline std::vector<std::array<double, 32>> warp_buf;

inline unsigned flat_tid() { return threadIdx.x + threadIdx.y * blockDim.x; }

// Runs kernel() as a grid of `grid` blocks of `block` threads.
inline void launch(EmuDim3 grid, EmuDim3 block, const std::function<void()>& kernel) {
  const unsigned nthreads = block.x * block.y * block.z;
  const unsigned nwarps = (nthreads + 31) / 32;
  gridDim = grid;
  blockDim = block;
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      block_barrier = std::make_unique<std::barrier<>>(nthreads);
      warp_barriers.clear();
      for (unsigned w = 0; w < nwarps; ++w) warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
      warp_buf.assign(nwarps, {});
      std::vector<std::thread> th;
      th.reserve(nthreads);
      for (unsigned ty = 0; ty < block.y; ++ty)
        for (unsigned tx = 0; tx < block.x; ++tx)
          th.emplace_back([=, &kernel] {
            threadIdx = {tx, ty, 0};
            blockIdx = {bx, by, 0};
            kernel();
          });
      for (auto& t : th) t.join();
    }
  }
}
}  // namespace emu

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }

template <typename T>
T __shfl_xor_sync(unsigned /*mask*/, T x, int lane_mask) {
  const unsigned tid = emu::flat_tid(), w = tid / 32, lane = tid % 32;
  emu::warp_buf[w][lane] = static_cast<double>(x);  // exact for float and double
  emu::warp_barriers[w]->arrive_and_wait();
  const T r = static_cast<T>(emu::warp_buf[w][lane ^ lane_mask]);
  emu::warp_barriers[w]->arrive_and_wait();
  return r;
}
