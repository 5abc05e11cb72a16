// Op schemas of specreg_fast, declared once, in specreg_fast._C: the library built on the
// LibTorch stable ABI (csrc/stable_api.h), which loads on every torch from the one named by
// TORCH_TARGET_VERSION (setup.py) on. Its CPU kernels: csrc/cpu/power_step_cpu.cpp,
// batched_power_cpu.cpp, shifted_cholesky_cpu.cpp, and the conv ops' conv_operator_cpu.cpp,
// circular_conv_cpu.cpp, conv_gemm_cpu.cpp. The CUDA kernels live in specreg_fast._C_cuda
// (csrc/cuda/), which only adds implementations and loads only when its CUDA major matches. The Python package registers the
// plain-PyTorch reference under CompositeExplicitAutograd, so a device or op without a kernel
// of its own still runs (specreg_fast/ops/).
#include <Python.h>

#include "stable_api.h"

namespace specreg_fast {
// Runs Python's pending signal handlers under the GIL (the op may run with it released). A
// handler that raised (KeyboardInterrupt) leaves its exception set: it is cleared here, and the
// op throws its own error instead, which torch turns into a RuntimeError.
bool python_signal_raised() {
  if (!Py_IsInitialized()) return false;
  const PyGILState_STATE gil = PyGILState_Ensure();
  const bool raised = PyErr_CheckSignals() != 0;
  if (raised) PyErr_Clear();
  PyGILState_Release(gil);
  return raised;
}
}  // namespace specreg_fast

extern "C" {
// `from specreg_fast import _C` loads this shared library, whose static initializers register
// the schemas and the stable CPU kernels; the module itself is empty. No pybind11, so the
// extension uses the limited API (abi3).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

STABLE_TORCH_LIBRARY(specreg_fast, m) {
  // Every op with n_iter takes 0 <= n_iter <= 10^6 (kMaxIterStable, csrc/stable_contracts.h; Python
  // specreg_fast.ops.MAX_ITER) and polls for Ctrl-C between steps (a RuntimeError naming the
  // KeyboardInterrupt, the persistent vectors as before the call). Arguments are checked before
  // anything is written: one device for all tensors, no lazy conj/neg views, and no vector that
  // an op writes may share memory with another argument (u and v, two layers, x_tops and xs).
  // ---- dense (2-D weights) ----------------------------------------------------------
  // n_iter power-iteration steps on every W of the list, in place on the persistent unit
  // vectors: u <- W v / |W v|, v <- W^T u / |W^T u|, each step reading W once. With
  // tol > 0 a layer stops early once its estimate changes by at most tol (relative).
  // Returns the estimates u^T W v at the new vectors (detached; float32, or float64 if
  // any weight is float64). Zero W: vectors kept, estimate 0. Non-finite W: vectors rolled
  // back to their values before the call, estimate NaN.
  m.def("power_step_(Tensor[] weights, Tensor(a!)[] us, Tensor(b!)[] vs, int n_iter, float tol) -> Tensor");
  // sigma_l = u_l^T W_l v_l for every layer: the differentiable half (gradient u v^T).
  m.def("sigma(Tensor[] weights, Tensor[] us, Tensor[] vs) -> Tensor");
  // The same sigma_l = u_l^T W_l v_l, read off `est`, the return value of power_step_ that just
  // produced us/vs (its |W^T u| equals u^T W v_new up to float rounding), so the forward does
  // not read W again; gradient u v^T like sigma. Device-independent (Python implementation).
  m.def("sigma_from_step(Tensor[] weights, Tensor[] us, Tensor[] vs, Tensor est) -> Tensor");
  // ---- conv operator (issue: conv-operator spectral norms) ---------------------------
  // Conv layers of any shapes as linear maps x -> conv(pad(x), W) at their input size. xs[l]
  // is (C_in, *spatial), ys[l] the output shape. Per-layer geometry is packed in `params`,
  // layer after layer, 2 + 5 d ints for a layer with d = weights[l].dim() - 2 spatial dims:
  //   [transposed, groups, stride[d], dilation[d], pad_lo[d], pad_hi[d], output_padding[d]]
  // and padding_modes[l] is zeros/circular/reflect/replicate (csrc/cpu/conv_operator_cpu.cpp).
  // n_iter steps in place: y <- A x / |A x|, x <- A^T y / |A^T y|; tol > 0 stops a layer once
  // its estimate changes by at most tol (relative). Returns <y, A x> at the new vectors
  // (detached; float32, float64 if any weight is float64). Zero A x: vectors kept, estimate 0.
  // Non-finite weight: that layer's vectors untouched, estimate NaN.
  m.def("conv_power_step_(Tensor[] weights, Tensor(a!)[] xs, Tensor(b!)[] ys, int[] params, str[] padding_modes, int n_iter, float tol) -> Tensor");
  // sigma_l = <y_l, A(W_l) x_l>: the differentiable half (gradient: conv weight-gradient of x, y).
  m.def("conv_sigma(Tensor[] weights, Tensor[] xs, Tensor[] ys, int[] params, str[] padding_modes) -> Tensor");
  // The same <y_l, A(W_l) x_l>, read off `est`, the return value of the conv_power_step_ (or
  // circular_power_step_) that just produced xs/ys, so the forward runs no convolution;
  // gradient as conv_sigma. Device-independent (Python implementation).
  m.def("conv_sigma_from_step(Tensor[] weights, Tensor[] xs, Tensor[] ys, int[] params, str[] padding_modes, Tensor est) -> Tensor");
  // d<y_l, A(W_l) x_l>/dW_l for each layer (the conv weight-gradient of input x_l and
  // output-gradient y_l; float32, or float64 for a float64 weight): the backward of conv_sigma
  // and conv_sigma_from_step, without autograd.
  m.def("conv_weight_grad(Tensor[] weights, Tensor[] xs, Tensor[] ys, int[] params, str[] padding_modes) -> Tensor[]");
  // grads[l] += conv_weight_grad's l-th result, in place (SpectralPenalty.accumulate_grad adds
  // into .grad this way; the caller scales y). Any grads[l] dtype; all checks before a write.
  m.def("conv_weight_grad_add_(Tensor(a!)[] grads, Tensor[] weights, Tensor[] xs, Tensor[] ys, int[] params, str[] padding_modes) -> ()");
  // A(W_l)^T y_l for each layer (the adjoint the power step uses; exposed for tests).
  m.def("conv_adjoint(Tensor[] weights, Tensor[] xs, Tensor[] ys, int[] params, str[] padding_modes) -> Tensor[]");
  // ---- depthwise conv operators (csrc/cpu/depthwise_cpu.cpp) -------------------------
  // conv_power_step_ restricted to depthwise layers (2-D, groups == C_in == C_out, zeros
  // padding, float32/float64 weights with vectors of the same dtype), with the same packing,
  // step, conventions and return; the direct per-channel kernel on the CPU.
  m.def("depthwise_power_step_(Tensor[] weights, Tensor(a!)[] xs, Tensor(b!)[] ys, int[] params, str[] padding_modes, int n_iter, float tol) -> Tensor");
  // grads[l] += d<y_l, A(W_l) x_l>/dW_l for depthwise layers (grads contiguous, the weight's dtype).
  m.def("depthwise_weight_grad_add_(Tensor(a!)[] grads, Tensor[] weights, Tensor[] xs, Tensor[] ys, int[] params, str[] padding_modes) -> ()");
  // [A x, A^T y, d<y, A x>/dW] for each depthwise layer, in that order (3 tensors per layer):
  // each pass of the kernel on its own, for the tests and the benchmark.
  m.def("depthwise_passes(Tensor[] weights, Tensor[] xs, Tensor[] ys, int[] params, str[] padding_modes) -> Tensor[]");
  // ---- Fourier-domain (circular) conv norms ------------------------------------------
  // Circular (wrap-around) convs, the paper's method, matrix-free: xs[l] is ONE input-shaped
  // tensor holding the persistent vector of every frequency of the polyphase DFT (see
  // csrc/cpu/circular_conv_cpu.cpp). params: the conv packing above (not transposed, total
  // padding dilation*(k-1) so the output is N/stride; mode circular implied). n_iter batched
  // per-frequency power steps in place (two convolutions each, no FFT of the kernel);
  // n_iter = 0 reads the estimate at the current vectors without writing them. Returns the
  // estimates max_w |P(w) X(w)| (detached) and writes x_tops/y_tops (input-/output-shaped
  // buffers): the real unit pair of the top frequency, with <y_top, A x_top> = estimate, to
  // hand to conv_sigma (circular) for the differentiable value and its closed-form gradient.
  // The explicit-block form (the authors' construction; exact-variant and GPU alternative):
  // n_iter power steps on every block of a (B, m, n) stack (float32/64, complex64/128), in
  // place on the persistent us (B, m) and vs (B, n): t = P v, a = P^H t, u = t/|t|, v = a/|a|.
  // Returns sigma_b = |P_b v_b| at the final v (real dtype of the blocks). A block whose t or a
  // vanishes keeps its vectors (csrc/cpu/batched_power_cpu.cpp; CUDA: the Triton kernel).
  m.def("batched_power_step_(Tensor blocks, Tensor(a!) us, Tensor(b!) vs, int n_iter) -> Tensor");
  // ---- certified bounds ---------------------------------------------------------------
  // info_b of the Cholesky factorization of shift_b I - H_b for a (B, c, c) complex stack, the
  // Hermitian matrix read from H's upper triangle (as potrf with uplo='U'): 0 when every pivot
  // is positive, else the 1-based index of the first one that is not. The factor is not kept
  // (csrc/cpu/shifted_cholesky_cpu.cpp). Non-differentiable; int32.
  m.def("shifted_cholesky_info(Tensor H, Tensor shift) -> Tensor");
  m.def("circular_power_step_(Tensor[] weights, Tensor(a!)[] xs, Tensor(b!)[] x_tops, Tensor(c!)[] y_tops, int[] params, int n_iter) -> Tensor");
  // ---- low-rank maps (LoRA) -----------------------------------------------------------
  // n_iter power steps on maps M_l = W_l + scales[l] Bs[l] As[l] (W (m, n), B (m, r), A (r, n);
  // the matrix is never built), every map of the list in one call, in place on the persistent
  // vectors: t = W v + s B (A v), a = W^T t + s A^T (B^T t), u <- t/|t|, v <- a/|a|, each step
  // reading W once (csrc/cpu/lowrank_step_cpu.cpp). A map accumulates in float64 when any of
  // W, A, B is float64, else float32 (us/vs of that dtype); scales finite. tol, zero and
  // non-finite maps, n_iter = 0 (u^T M v at the current vectors) and the estimate |a|/|t|
  // (= u^T M v at the new vectors) as power_step_. Returns float32, float64 if any map is.
  m.def("lowrank_power_step_(Tensor[] weights, Tensor[] As, Tensor[] Bs, float[] scales, Tensor(a!)[] us, Tensor(b!)[] vs, int n_iter, float tol) -> Tensor");
  // The CPU conv kernel choice ("auto", "direct" or "aten") for every later conv op call;
  // returns the previous one ("invalid" for a bad SPECREG_FAST_CONV_KERNEL). A RuntimeError for
  // any other choice (specreg_fast.conv.set_conv_kernel raises it as ValueError).
  m.def("set_conv_kernel(str choice) -> str");
}
