/* h2o_kernels.codec._ratiocore: placeholder module body, replaced by the kernel. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_ratiocore", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__ratiocore(void) { return PyModule_Create(&module); }
