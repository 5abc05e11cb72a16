// specreg_fast._C_cuda: every CUDA kernel (csrc/cuda/*.cu, conv_operator_cuda.cpp, and the
// device-generic conv code of csrc/cpu/ built with SPECREG_NO_CPU_IMPL), apart from the CPU
// kernels so that a torch of another CUDA major, or a CPU-only torch, still loads those.
// specreg_fast/ops/_library.py loads it only when torch.version.cuda has the CUDA major it was built
// for (specreg_fast/_build_info.py). Implementations only: the schemas are specreg_fast._C's.
// The dense kernels (power_step_cuda.cu) are on the LibTorch stable ABI; this file needs nothing
// of torch. python_signal_raised (the Ctrl-C poll of InterruptPollStable) comes from
// conv_device_module.cpp (csrc/conv_module.cpp) in this library.
#include <Python.h>

extern "C" {
PyObject* PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
