// Op schemas of specreg_fast, declared once. Every build compiles this file; backends add
// TORCH_LIBRARY_IMPL blocks in their own files (csrc/cpu/*.cpp, csrc/cuda/*.cu), and the
// Python package registers the plain-PyTorch reference under CompositeExplicitAutograd so
// that a device without a kernel of its own still runs (specreg_fast/ops.py).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// An empty module: `from specreg_fast import _C` loads this shared library, whose static
// initializers register the ops. No pybind11, so the extension can use the limited API.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(specreg_fast, m) {
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
  // ---- Fourier-domain (circular) conv norms ------------------------------------------
}
