/* h2o_kernels.codec._fastcore: placeholder module body, replaced by the kernel. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastcore", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__fastcore(void) { return PyModule_Create(&module); }
