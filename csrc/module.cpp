// The Python module lora_ext._C. It holds no Python bindings: importing it runs the
// static TORCH_LIBRARY registrations linked into it. Kept apart from
// registration.cpp so the C++ benchmark can link the ops without libpython.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                          "lora_ext operator library", -1, nullptr};
  return PyModule_Create(&module_def);
}
