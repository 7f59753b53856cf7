// The extension's test-only submodule, `_testing`: bindings that run one
// internal path of an op on any device, so that what only CUDA runs is tested
// where no GPU is. Not an API: growop itself never calls it, and it checks
// nothing beyond what the bindings need not to crash.
#pragma once

#include <Python.h>

namespace growop::python {

// A new reference to the submodule, named `name`; nullptr with a Python error set.
PyObject* create_testing_module(const char* name);

}  // namespace growop::python
