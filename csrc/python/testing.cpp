// The test-only submodule `_testing` of the extension (see testing.h):
//
// path_linear(path, input, weight, bias, active, width, live_count, fill) and
// path_linear_backward(path, grad_output, input, weight, active, live_count,
// need_input, need_weight, need_bias): one way of computing masked_linear, on
// 2-D tensors of any device. `path`: "packed" (packed.h, CUDA's gather with a
// live count), "dense" (dense.h as the CPU runs it) or "dense_aligned" (as
// CUDA runs it, through a padded block where width's rows are not aligned).
// Dense masks the dead rows unless live_count equals width.
#include "testing.h"

#include <pybind11/pybind11.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <initializer_list>
#include <optional>
#include <string_view>
#include <utility>

#include "../dense.h"
#include "../packed.h"

namespace growop::python {
namespace {

enum class TestPath { kPacked, kDense, kDenseAligned };

// Whether every object is a tensor (None allowed where `optional`); else a TypeError.
bool all_tensors(std::initializer_list<std::pair<PyObject*, bool>> objects) {
  for (const auto& [object, optional] : objects) {
    if (!(THPVariable_Check(object) || (optional && object == Py_None))) {
      PyErr_Format(PyExc_TypeError, "expected a tensor, got %s", Py_TYPE(object)->tp_name);
      return false;
    }
  }
  return true;
}

std::optional<TestPath> test_path(const char* name) {
  const std::string_view path(name);
  if (path == "packed") {
    return TestPath::kPacked;
  }
  if (path == "dense") {
    return TestPath::kDense;
  }
  if (path == "dense_aligned") {
    return TestPath::kDenseAligned;
  }
  PyErr_Format(PyExc_ValueError, "unknown path '%s'", name);
  return std::nullopt;
}

PyObject* path_linear_binding(PyObject* /*module*/, PyObject* args) {
  const char* name = nullptr;
  PyObject* input = nullptr;
  PyObject* weight = nullptr;
  PyObject* bias = nullptr;
  PyObject* active = nullptr;
  long long width = 0;
  long long live_count = 0;
  double fill = 0;
  if (!PyArg_ParseTuple(
          args, "sOOOOLLd", &name, &input, &weight, &bias, &active, &width, &live_count,
          &fill)) {
    return nullptr;
  }
  const std::optional<TestPath> path = test_path(name);
  if (!path.has_value() ||
      !all_tensors({{input, false}, {weight, false}, {bias, true}, {active, false}})) {
    return nullptr;
  }
  HANDLE_TH_ERRORS
  const at::Tensor x = THPVariable_Unpack(input);
  const at::Tensor w = THPVariable_Unpack(weight);
  const at::Tensor b = bias == Py_None ? at::Tensor() : THPVariable_Unpack(bias);
  const at::Tensor mask = THPVariable_Unpack(active);
  at::Tensor out = at::empty({x.size(0), width}, x.options());
  {
    pybind11::gil_scoped_release no_gil;
    if (*path == TestPath::kPacked) {
      packed::forward(
          x, w, b, packed::layout(mask, width, live_count), fill, out);
    } else {
      dense::forward(
          x, w, b, mask, fill, live_count != width, *path == TestPath::kDenseAligned, out);
    }
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

PyObject* path_linear_backward_binding(PyObject* /*module*/, PyObject* args) {
  const char* name = nullptr;
  PyObject* grad_output = nullptr;
  PyObject* input = nullptr;
  PyObject* weight = nullptr;
  PyObject* active = nullptr;
  long long live_count = 0;
  int need_input = 0;
  int need_weight = 0;
  int need_bias = 0;
  if (!PyArg_ParseTuple(
          args, "sOOOOLppp", &name, &grad_output, &input, &weight, &active, &live_count,
          &need_input, &need_weight, &need_bias)) {
    return nullptr;
  }
  const std::optional<TestPath> path = test_path(name);
  if (!path.has_value() ||
      !all_tensors({{grad_output, false}, {input, false}, {weight, false}, {active, false}})) {
    return nullptr;
  }
  HANDLE_TH_ERRORS
  const at::Tensor g = THPVariable_Unpack(grad_output);
  const at::Tensor x = THPVariable_Unpack(input);
  const at::Tensor w = THPVariable_Unpack(weight);
  const at::Tensor mask = THPVariable_Unpack(active);
  auto [gi, gw, gb] = dense::backward_outputs(
      x, w, {need_input != 0, need_weight != 0, need_bias != 0});
  {
    pybind11::gil_scoped_release no_gil;
    at::Tensor gi_or_none = need_input ? gi : at::Tensor();
    at::Tensor gw_or_none = need_weight ? gw : at::Tensor();
    at::Tensor gb_or_none = need_bias ? gb : at::Tensor();
    const int64_t width = g.size(1);
    if (*path == TestPath::kPacked) {
      packed::backward(
          g, x, w, packed::layout(mask, width, live_count), gi_or_none,
          gw_or_none, gb_or_none);
    } else {
      dense::backward(
          g, x, w, mask, live_count != width, *path == TestPath::kDenseAligned,
          gi_or_none, gw_or_none, gb_or_none);
    }
  }
  PyObject* grads = PyTuple_New(3);
  if (grads == nullptr) {
    return nullptr;
  }
  // PyTuple_SET_ITEM steals the new references THPVariable_Wrap returns.
  PyTuple_SET_ITEM(grads, 0, THPVariable_Wrap(std::move(gi)));
  PyTuple_SET_ITEM(grads, 1, THPVariable_Wrap(std::move(gw)));
  PyTuple_SET_ITEM(grads, 2, THPVariable_Wrap(std::move(gb)));
  return grads;
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"path_linear", path_linear_binding, METH_VARARGS,
     "one path of masked_linear's forward on any device; for tests only"},
    {"path_linear_backward", path_linear_backward_binding, METH_VARARGS,
     "one path of masked_linear's backward on any device; for tests only"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyObject* create_testing_module(const char* name) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, nullptr,
      "Test-only bindings of growop's internal paths; not an API.", -1, methods};
  module_def.m_name = name;
  return PyModule_Create(&module_def);
}

}  // namespace growop::python
