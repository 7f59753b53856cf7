// The test-only submodule `_testing` of the extension (see testing.h):
//
// path_linear(path, input, weight, bias, active, width, live_count, fill,
// live_end=None) and path_linear_backward(path, grad_output, input, weight,
// active, live_count, need_input, need_weight, need_bias, live_end=None): one
// way of computing masked_linear, on 2-D tensors of any device. `path`:
// "packed" (packed.h, CUDA's gather with a live count; it needs no live_end,
// as CUDA's does not), "dense" (dense.h with the CPU's row alignment) or
// "dense_aligned" (as CUDA runs it, through a padded block where the GEMM's
// rows would not be aligned). Dense covers the rows below live_end (width
// without it) and masks the dead ones among them unless live_count equals
// that bound: with live_count == live_end < width it is CUDA's prefix form
// (one GEMM into the output's first live_end columns, the rest filled).
// Dense checks the hints against the mask as CUDA does (dense::hinted_rows).
//
// loss_as_cuda(input, weight, bias, active, target, width, classes=None,
// class_weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
// chunk_size=(0, 0), live_count=None, output_mask=(True, True, True),
// backward=None): the linear cross-entropy kernels planned as on CUDA (nothing
// read on the host, checks as device-side asserts) on tensors of any device.
// Without `backward`, _linear_cross_entropy_forward's (loss, lse, grad_input,
// grad_weight, grad_bias); with backward=(grad_loss, lse),
// _linear_cross_entropy_backward's (grad_input, grad_weight, grad_bias).
#include "testing.h"

#include <pybind11/pybind11.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <array>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string_view>
#include <utility>
#include <vector>

#include "../dense.h"
#include "../loss/linear_cross_entropy_kernel.h"
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

// An optional int argument: None, or an int; else a Python error is set.
bool optional_int(PyObject* object, std::optional<int64_t>& value) {
  if (object == nullptr || object == Py_None) {
    value = std::nullopt;
    return true;
  }
  value = PyLong_AsLongLong(object);
  return !PyErr_Occurred();
}

PyObject* path_linear_binding(PyObject* /*module*/, PyObject* args, PyObject* kwargs) {
  static const char* keywords[] = {
      "path", "input", "weight", "bias", "active", "width", "live_count", "fill", "live_end",
      nullptr};
  const char* name = nullptr;
  PyObject* input = nullptr;
  PyObject* weight = nullptr;
  PyObject* bias = nullptr;
  PyObject* active = nullptr;
  long long width = 0;
  long long live_count = 0;
  double fill = 0;
  PyObject* live_end_object = nullptr;
  std::optional<int64_t> live_end;
  if (!PyArg_ParseTupleAndKeywords(
          args, kwargs, "sOOOOLLd|O", const_cast<char**>(keywords), &name, &input, &weight,
          &bias, &active, &width, &live_count, &fill, &live_end_object) ||
      !optional_int(live_end_object, live_end)) {
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
      const dense::Rows rows = dense::hinted_rows(mask, width, live_count, live_end);
      dense::forward(
          x, w, b, mask, rows.count, fill, !rows.all_live, *path == TestPath::kDenseAligned,
          out);
    }
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

PyObject* path_linear_backward_binding(PyObject* /*module*/, PyObject* args, PyObject* kwargs) {
  static const char* keywords[] = {
      "path", "grad_output", "input", "weight", "active", "live_count", "need_input",
      "need_weight", "need_bias", "live_end", nullptr};
  const char* name = nullptr;
  PyObject* grad_output = nullptr;
  PyObject* input = nullptr;
  PyObject* weight = nullptr;
  PyObject* active = nullptr;
  long long live_count = 0;
  int need_input = 0;
  int need_weight = 0;
  int need_bias = 0;
  PyObject* live_end_object = nullptr;
  std::optional<int64_t> live_end;
  if (!PyArg_ParseTupleAndKeywords(
          args, kwargs, "sOOOOLppp|O", const_cast<char**>(keywords), &name, &grad_output,
          &input, &weight, &active, &live_count, &need_input, &need_weight, &need_bias,
          &live_end_object) ||
      !optional_int(live_end_object, live_end)) {
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
      const dense::Rows rows = dense::hinted_rows(mask, width, live_count, live_end);
      dense::backward(
          g, x, w, mask, rows.count, !rows.all_live, *path == TestPath::kDenseAligned,
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

// An optional tensor argument: None, or a tensor; else a TypeError is set.
bool optional_tensor(PyObject* object, std::optional<at::Tensor>& value) {
  if (object == nullptr || object == Py_None) {
    value = std::nullopt;
    return true;
  }
  if (!all_tensors({{object, false}})) {
    return false;
  }
  value = THPVariable_Unpack(object);
  return true;
}

PyObject* loss_as_cuda_binding(PyObject* /*module*/, PyObject* args, PyObject* kwargs) {
  static const char* keywords[] = {
      "input", "weight", "bias", "active", "target", "width", "classes", "class_weight",
      "ignore_index", "reduction", "label_smoothing", "chunk_size", "live_count",
      "output_mask", "backward", nullptr};
  PyObject* input = nullptr;
  PyObject* weight = nullptr;
  PyObject* bias = nullptr;
  PyObject* active = nullptr;
  PyObject* target = nullptr;
  long long width = 0;
  PyObject* classes_object = nullptr;
  PyObject* class_weight_object = nullptr;
  long long ignore_index = -100;
  const char* reduction = "mean";
  double label_smoothing = 0.0;
  long long chunk_tokens = 0;
  long long chunk_classes = 0;
  PyObject* live_count_object = nullptr;
  int need_input = 1;
  int need_weight = 1;
  int need_bias = 1;
  PyObject* grad_loss = nullptr;
  PyObject* lse = nullptr;
  ops::LossOptions options;
  std::optional<at::Tensor> bias_tensor;
  if (!PyArg_ParseTupleAndKeywords(
          args, kwargs, "OOOOOL|OOLsd(LL)O(ppp)(OO)", const_cast<char**>(keywords), &input,
          &weight, &bias, &active, &target, &width, &classes_object, &class_weight_object,
          &ignore_index, &reduction, &label_smoothing, &chunk_tokens, &chunk_classes,
          &live_count_object, &need_input, &need_weight, &need_bias, &grad_loss, &lse) ||
      !all_tensors({{input, false}, {weight, false}, {active, false}, {target, false}}) ||
      !optional_tensor(bias, bias_tensor) || !optional_tensor(classes_object, options.classes) ||
      !optional_tensor(class_weight_object, options.class_weight) ||
      !optional_int(live_count_object, options.live_count) ||
      (grad_loss != nullptr && !all_tensors({{grad_loss, false}, {lse, false}}))) {
    return nullptr;
  }
  HANDLE_TH_ERRORS
  options.ignore_index = ignore_index;
  options.reduction = reduction;
  options.label_smoothing = label_smoothing;
  options.chunk_size = {chunk_tokens, chunk_classes};
  const std::array<bool, 3> output_mask = {need_input != 0, need_weight != 0, need_bias != 0};
  const at::Tensor x = THPVariable_Unpack(input);
  const at::Tensor w = THPVariable_Unpack(weight);
  const at::Tensor mask = THPVariable_Unpack(active);
  const at::Tensor t = THPVariable_Unpack(target);
  std::vector<at::Tensor> results;
  {
    pybind11::gil_scoped_release no_gil;
    if (grad_loss == nullptr) {
      auto [loss, lse_out, gi, gw, gb] = loss::forward(
          x, w, bias_tensor, mask, t, width, options, output_mask, loss::Plan::kAsCuda);
      results = {loss, lse_out, gi, gw, gb};
    } else {
      auto [gi, gw, gb] = loss::backward(
          THPVariable_Unpack(grad_loss), x, w, bias_tensor, mask, t, THPVariable_Unpack(lse),
          width, options, output_mask, loss::Plan::kAsCuda);
      results = {gi, gw, gb};
    }
  }
  PyObject* tuple = PyTuple_New(static_cast<Py_ssize_t>(results.size()));
  if (tuple == nullptr) {
    return nullptr;
  }
  for (size_t i = 0; i < results.size(); ++i) {
    PyTuple_SET_ITEM(tuple, static_cast<Py_ssize_t>(i), THPVariable_Wrap(std::move(results[i])));
  }
  return tuple;
  END_HANDLE_TH_ERRORS
}

// A METH_KEYWORDS function as PyMethodDef holds it (CPython's convention).
PyCFunction with_keywords(PyCFunctionWithKeywords function) {
  return reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(function));
}

PyMethodDef methods[] = {
    {"path_linear", with_keywords(path_linear_binding), METH_VARARGS | METH_KEYWORDS,
     "one path of masked_linear's forward on any device; for tests only"},
    {"path_linear_backward", with_keywords(path_linear_backward_binding),
     METH_VARARGS | METH_KEYWORDS,
     "one path of masked_linear's backward on any device; for tests only"},
    {"loss_as_cuda", with_keywords(loss_as_cuda_binding), METH_VARARGS | METH_KEYWORDS,
     "the linear cross-entropy kernels planned as on CUDA, on any device; for tests only"},
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
