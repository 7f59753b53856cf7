// The extension's Python module: PyInit, and the direct binding of
// masked_linear for eager calls. Importing the module runs the static
// registrations of every file of the extension (schemas, kernels, autograd).
#include <Python.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <pybind11/pybind11.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>

#include <optional>
#include <string_view>
#include <utility>

#include "../ops/masked_linear.h"
#include "testing.h"

namespace {

// growop._C.masked_linear(input, weight, bias, active, width, mask_value,
// strategy, live_count, live_end=None): the same dispatcher call as
// torch.ops.growop.masked_linear.default, without the generic binding's cost
// of matching Python values to the schema, which a small layer feels. It
// returns NotImplemented where that binding must run instead: a tensor
// subclass or a torch-function mode may override the call.
PyObject* masked_linear_binding(PyObject* /*module*/, PyObject* args) {
  PyObject* input = nullptr;
  PyObject* weight = nullptr;
  PyObject* bias = nullptr;
  PyObject* active = nullptr;
  long long width = 0;
  PyObject* mask_value = nullptr;
  const char* strategy = nullptr;
  PyObject* live_count = nullptr;
  PyObject* live_end = Py_None;
  if (!PyArg_ParseTuple(
          args, "OOOOLOsO|O", &input, &weight, &bias, &active, &width,
          &mask_value, &strategy, &live_count, &live_end)) {
    return nullptr;
  }
  const bool plain = THPVariable_CheckExact(input) &&
      THPVariable_CheckExact(weight) &&
      (bias == Py_None || THPVariable_CheckExact(bias)) &&
      THPVariable_CheckExact(active) &&
      !at::impl::torch_function_mode_enabled();
  if (!plain) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  HANDLE_TH_ERRORS
  std::optional<at::Tensor> bias_tensor;
  if (bias != Py_None) {
    bias_tensor = THPVariable_Unpack(bias);
  }
  std::optional<double> fill;
  if (mask_value != Py_None) {
    fill = PyFloat_AsDouble(mask_value);
    if (PyErr_Occurred()) {
      return nullptr;
    }
  }
  // A traced graph (torch.jit.trace) runs later, on the mask as it is then: no hint
  // baked into it.
  const bool tracing = torch::jit::tracer::isTracing();
  std::optional<int64_t> count;
  std::optional<int64_t> end;
  for (auto [object, hint] : {std::pair{live_count, &count}, std::pair{live_end, &end}}) {
    if (object != Py_None && !tracing) {
      *hint = PyLong_AsLongLong(object);
      if (PyErr_Occurred()) {
        return nullptr;
      }
    }
  }
  at::Tensor out;
  {
    pybind11::gil_scoped_release no_gil;
    out = growop::ops::masked_linear(
        THPVariable_Unpack(input), THPVariable_Unpack(weight), bias_tensor,
        THPVariable_Unpack(active), c10::SymInt(width), fill,
        std::string_view(strategy), count, end);
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"masked_linear", masked_linear_binding, METH_VARARGS,
     "torch.ops.growop.masked_linear.default for plain tensors, in eager mode"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// The importable module, named as the build names it (TORCH_EXTENSION_NAME:
// _C from setup.py as growop._C, growop_C from the JIT build), with the
// test-only submodule _testing (testing.h) as an attribute.
#define GROWOP_CONCAT_(a, b) a##b
#define GROWOP_CONCAT(a, b) GROWOP_CONCAT_(a, b)
#define GROWOP_STRING_(a) #a
#define GROWOP_STRING(a) GROWOP_STRING_(a)

extern "C" PyObject* GROWOP_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, GROWOP_STRING(TORCH_EXTENSION_NAME), nullptr, -1, methods};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) {
    return nullptr;
  }
  PyObject* testing = growop::python::create_testing_module(
      GROWOP_STRING(TORCH_EXTENSION_NAME) "._testing");
  // PyModule_AddObject steals the reference only when it succeeds.
  if (testing == nullptr || PyModule_AddObject(module, "_testing", testing) < 0) {
    Py_XDECREF(testing);
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
