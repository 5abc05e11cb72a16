// specreg_fast._C_conv: the CPU kernels of the conv ops (csrc/cpu/conv_operator_cpu.cpp,
// circular_conv_cpu.cpp, conv_gemm_cpu.cpp), still written against ATen's C++ API, so this
// library loads only on the torch it was built with (specreg_fast/ops/_library.py falls back to the
// reference for these ops elsewhere). It registers implementations only: the schemas are
// specreg_fast._C's (csrc/specreg_fast.cpp), loaded first. Also the CUDA library's copy of the
// conv code (csrc/cuda/cuda_module.cpp) is built from the same sources with
// SPECREG_NO_CPU_IMPL, so that the two never register the same CPU kernel.
#include <Python.h>
#include <torch/library.h>

#include <string>

namespace specreg_fast {
// As in csrc/specreg_fast.cpp: run Python's pending signal handlers for InterruptPoll.
bool python_signal_raised() {
  if (!Py_IsInitialized()) return false;
  const PyGILState_STATE gil = PyGILState_Ensure();
  const bool raised = PyErr_CheckSignals() != 0;
  if (raised) PyErr_Clear();
  PyGILState_Release(gil);
  return raised;
}
}  // namespace specreg_fast

#ifndef SPECREG_NO_CPU_IMPL
namespace specreg_fast::cpu {
std::string set_conv_kernel(const std::string& choice);  // csrc/cpu/conv_gemm_cpu.cpp
}

namespace {
// _C_conv._set_conv_kernel(choice) -> previous choice (specreg_fast.conv.set_conv_kernel).
PyObject* set_conv_kernel_py(PyObject*, PyObject* arg) {
  PyObject* bytes = PyUnicode_AsUTF8String(arg);
  if (bytes == nullptr) return nullptr;
  const std::string choice(PyBytes_AsString(bytes));
  Py_DECREF(bytes);
  try {
    return PyUnicode_FromString(specreg_fast::cpu::set_conv_kernel(choice).c_str());
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
}

PyMethodDef module_methods[] = {
    {"_set_conv_kernel", set_conv_kernel_py, METH_O, "Set the CPU conv kernel choice; returns the previous one."},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

extern "C" {
PyObject* PyInit__C_conv(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_conv", nullptr, -1, module_methods};
  return PyModule_Create(&module_def);
}
}
#endif
