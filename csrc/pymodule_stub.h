// The Python module of an ahead-of-time build (setup.py defines DPM_KERNELS_PYMODULE as `_cpu` or `_cuda`):
// `import dpm_kernels._cpu` loads the library, whose static initialiser (TORCH_LIBRARY_IMPL) registers the
// kernels; the module itself is empty. The JIT build (`torch.utils.cpp_extension.load`, is_python_module=False)
// leaves the macro undefined and loads the library with torch.ops.load_library. Include once per extension.
#pragma once

#ifdef DPM_KERNELS_PYMODULE
#include <Python.h>

#define DPM_CAT_(a, b) a##b
#define DPM_CAT(a, b) DPM_CAT_(a, b)
#define DPM_STR_(a) #a
#define DPM_STR(a) DPM_STR_(a)

extern "C" PyMODINIT_FUNC DPM_CAT(PyInit_, DPM_KERNELS_PYMODULE)(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, DPM_STR(DPM_KERNELS_PYMODULE), nullptr, -1, nullptr,
                            nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&def);
}
#endif
