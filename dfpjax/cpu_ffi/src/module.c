/* An empty Python extension module: importing it locates the shared library (in regular
 * and editable installs alike); dfpjax/cpu_ffi/__init__.py then opens it with ctypes. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static struct PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_kernel", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__kernel(void) { return PyModule_Create(&kModule); }
