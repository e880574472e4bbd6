// The Python module init of fastsam._C. The ops' schemas are declared in fastsam/ops/op_table.py (defined
// with torch.library before this module is imported); the CPU and CUDA kernels register implementations of
// them with TORCH_LIBRARY_IMPL (csrc/cpu, csrc/cuda), and torch checks each kernel's C++ signature against
// its schema. The math of every op is specified by fastsam/ops/reference.py (the CVaR ops:
// fastsam/ops/cvar_reference.py).
#include <Python.h>

extern "C" {
// Importing fastsam._C registers the kernels; the module itself holds no functions.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
