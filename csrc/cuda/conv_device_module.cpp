// python_signal_raised for the CUDA library (the interrupt poll of its long loops,
// csrc/stable_contracts.h): as in csrc/specreg_fast.cpp, run Python's pending signal handlers
// under the GIL. (specreg_fast._C has its own copy; the two libraries are loaded separately.)
#include <Python.h>

namespace specreg_fast {
bool python_signal_raised() {
  if (!Py_IsInitialized()) return false;
  const PyGILState_STATE gil = PyGILState_Ensure();
  const bool raised = PyErr_CheckSignals() != 0;
  if (raised) PyErr_Clear();
  PyGILState_Release(gil);
  return raised;
}
}  // namespace specreg_fast
