// Operator schemas of the growop library and their autograd. Each backend
// registers its kernels in its own file (csrc/cpu/, csrc/cuda/); fake (meta)
// kernels, batching rules and autocast are registered from Python in
// growop/ops.py.
//
// Autograd is C++ (the Autograd dispatch key), so a call never leaves C++
// between the op and its kernels, and it composes with torch.func as a
// native op's does. The backward op has its own autograd formula in terms of the
// two ops, so gradients of any order work.
#include <Python.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <pybind11/pybind11.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>
#include <torch/library.h>

#include <array>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <initializer_list>
#include <tuple>
#include <type_traits>
#include <utility>

#include "packed.h"

TORCH_LIBRARY(growop, m) {
  // out[..., j] = input @ weight[j] + bias[j] where active[j], else mask_value,
  // for j < width. mask_value None means the lowest finite value of the dtype.
  // strategy: "auto", "dense" or "gather" (csrc/strategy.h); live_count, the
  // live rows among the first width if the caller knows them, lets auto choose
  // without reading the mask on the host.
  m.def(
      "masked_linear(Tensor input, Tensor weight, Tensor? bias, Tensor active, "
      "SymInt width, float? mask_value=None, str strategy=\"auto\", "
      "int? live_count=None) -> Tensor");
  // The gradients of masked_linear for grad_output (*, width), each computed
  // where output_mask asks (else an empty tensor):
  //   grad_input               = grad_output[..., live] @ weight[live]
  //   grad_weight[live]        = grad_output[..., live]^T @ input
  //   grad_bias[live]          = grad_output[..., live] summed over the batch
  // with every row of grad_weight and grad_bias that is not live zero.
  m.def(
      "masked_linear_backward(Tensor grad_output, Tensor input, Tensor weight, "
      "Tensor active, bool[3] output_mask, str strategy=\"auto\", "
      "int? live_count=None) -> (Tensor, Tensor, Tensor)");
}

namespace growop {
namespace {

using at::Tensor;
using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

Tensor masked_linear(
    const Tensor& input,
    const Tensor& weight,
    const std::optional<Tensor>& bias,
    const Tensor& active,
    const c10::SymInt& width,
    std::optional<double> mask_value,
    std::string_view strategy,
    std::optional<int64_t> live_count) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("growop::masked_linear", "")
          .typed<Tensor(
              const Tensor&, const Tensor&, const std::optional<Tensor>&,
              const Tensor&, c10::SymInt, std::optional<double>,
              c10::string_view, std::optional<int64_t>)>();
  return op.call(
      input, weight, bias, active, width, mask_value, strategy, live_count);
}

std::tuple<Tensor, Tensor, Tensor> masked_linear_backward(
    const Tensor& grad_output,
    const Tensor& input,
    const Tensor& weight,
    const Tensor& active,
    std::array<bool, 3> output_mask,
    std::string_view strategy,
    std::optional<int64_t> live_count) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("growop::masked_linear_backward", "")
          .typed<std::tuple<Tensor, Tensor, Tensor>(
              const Tensor&, const Tensor&, const Tensor&, const Tensor&,
              std::array<bool, 3>, c10::string_view, std::optional<int64_t>)>();
  return op.call(
      grad_output, input, weight, active, output_mask, strategy, live_count);
}

// torch::autograd::Node is held by c10::intrusive_ptr in newer torch (2.13) and by
// std::shared_ptr in older (2.11): follow whatever Edge::function is.
using NodePtr = decltype(torch::autograd::Edge::function);
constexpr bool kSharedNodes = std::is_same_v<NodePtr, std::shared_ptr<Node>>;
template <class T>
using NodeHandle =
    std::conditional_t<kSharedNodes, std::shared_ptr<T>, c10::intrusive_ptr<T>>;
template <class T>
NodeHandle<T> make_node() {
  if constexpr (kSharedNodes) {
    return std::make_shared<T>();
  } else {
    return c10::make_intrusive<T>();
  }
}

// The autograd nodes are written as ATen's generated ones are (a Node with
// SavedVariables, set as the outputs' grad_fn), not as a
// torch::autograd::Function, which torch.func refuses.

// Gradient of masked_linear; next edges: input, weight, bias.
struct MaskedLinearBackward : public Node {
  SavedVariable input;
  SavedVariable weight;
  // Saved so that autograd's version check catches a mask changed between
  // forward and backward instead of silently mixing two masks.
  SavedVariable active;
  bool has_bias = false;
  std::string strategy;
  std::optional<int64_t> live_count;

  std::string name() const override {
    return "MaskedLinearBackward";
  }

  void release_variables() override {
    input.reset_data();
    weight.reset_data();
    active.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    const std::array<bool, 3> output_mask = {
        task_should_compute_output(0),
        task_should_compute_output(1),
        has_bias && task_should_compute_output(2)};
    variable_list result(3);
    if (!grads[0].defined() ||
        !(output_mask[0] || output_mask[1] || output_mask[2])) {
      return result;
    }
    auto [grad_input, grad_weight, grad_bias] = masked_linear_backward(
        grads[0], input.unpack(), weight.unpack(), active.unpack(), output_mask,
        strategy, live_count);
    const std::array<Tensor, 3> computed = {grad_input, grad_weight, grad_bias};
    for (size_t i = 0; i < 3; ++i) {
      if (output_mask[i]) {
        result[i] = computed[i];
      }
    }
    return result;
  }
};

// Gradient of masked_linear_backward; next edges: grad_output, input, weight.
// With g the grad_output and ggi, ggw, ggb the gradients arriving for its
// three outputs (counted only where output_mask computed them):
//   d g      = masked_linear(ggi, weight, -, mask value 0)
//            + masked_linear(input, ggw, ggb, mask value 0)
//   d input  = g[..., live] @ ggw[live]   (backward's grad_input, weight ggw)
//   d weight = g[..., live]^T @ ggi       (backward's grad_weight, input ggi)
struct MaskedLinearDoubleBackward : public Node {
  SavedVariable grad_output;
  SavedVariable input;
  SavedVariable weight;
  SavedVariable active;
  std::array<bool, 3> computed{};
  std::string strategy;
  std::optional<int64_t> live_count;

  std::string name() const override {
    return "MaskedLinearDoubleBackward";
  }

  void release_variables() override {
    grad_output.reset_data();
    input.reset_data();
    weight.reset_data();
    active.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    const auto arriving = [&](size_t i) {
      return computed[i] && grads[i].defined() ? grads[i] : Tensor();
    };
    const Tensor ggi = arriving(0);
    const Tensor ggw = arriving(1);
    const Tensor ggb = arriving(2);
    const Tensor g = grad_output.unpack();
    const Tensor x = input.unpack();
    const Tensor w = weight.unpack();
    const Tensor mask = active.unpack();
    const c10::SymInt width = g.sym_size(-1);

    variable_list result(3);
    if (task_should_compute_output(0)) {
      Tensor grad;
      if (ggi.defined()) {
        grad = masked_linear(ggi, w, std::nullopt, mask, width, 0.0, strategy, live_count);
      }
      if (ggw.defined() || ggb.defined()) {
        const Tensor term = masked_linear(
            x, ggw.defined() ? ggw : at::zeros_like(w),
            ggb.defined() ? std::optional<Tensor>(ggb) : std::nullopt, mask,
            width, 0.0, strategy, live_count);
        grad = grad.defined() ? grad.add(term) : term;
      }
      result[0] = grad;
    }
    const std::array<bool, 3> output_mask = {
        task_should_compute_output(1) && ggw.defined(),
        task_should_compute_output(2) && ggi.defined(),
        false};
    if (output_mask[0] || output_mask[1]) {
      auto [grad_input, grad_weight, unused] = masked_linear_backward(
          g, output_mask[1] ? ggi : x, output_mask[0] ? ggw : w, mask,
          output_mask, strategy, live_count);
      result[1] = output_mask[0] ? grad_input : Tensor();
      result[2] = output_mask[1] ? grad_weight : Tensor();
    }
    return result;
  }
};

// Forward-mode AD (torch.func.jvp, jacfwd, hessian, torch.autograd.forward_ad).
// The tangents and primals at level 0, the level ATen's generated kernels use:
// torch.func's transforms each see their own level as 0.
Tensor tangent_of(const Tensor& t) {
  return t.defined() ? t._fw_grad(/*level=*/0) : Tensor();
}

Tensor tangent_of(const std::optional<Tensor>& t) {
  return t.has_value() ? tangent_of(*t) : Tensor();
}

// `t` without its tangent (a view), for computing tangents from: a tangent
// computed from dual tensors would carry a tangent of its own.
Tensor primal_of(const Tensor& t) {
  return tangent_of(t).defined() ? t._fw_primal(/*level=*/0) : t;
}

Tensor sum_defined(const Tensor& a, const Tensor& b) {
  if (!a.defined()) {
    return b;
  }
  return b.defined() ? a.add(b) : a;
}

Tensor masked_linear_autograd(
    const Tensor& input,
    const Tensor& weight,
    const std::optional<Tensor>& bias,
    const Tensor& active,
    c10::SymInt width,
    std::optional<double> mask_value,
    c10::string_view strategy,
    std::optional<int64_t> live_count) {
  NodeHandle<MaskedLinearBackward> grad_fn;
  if (torch::autograd::compute_requires_grad(input, weight, bias)) {
    grad_fn = make_node<MaskedLinearBackward>();
    grad_fn->set_next_edges(torch::autograd::collect_next_edges(input, weight, bias));
    grad_fn->input = SavedVariable(input, false);
    grad_fn->weight = SavedVariable(weight, false);
    grad_fn->active = SavedVariable(active, false);
    grad_fn->has_bias = bias.has_value() && bias->defined();
    grad_fn->strategy = std::string(strategy);
    grad_fn->live_count = live_count;
  }
  Tensor out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = masked_linear(
        input, weight, bias, active, width, mask_value, strategy, live_count);
  }
  if (grad_fn) {
    torch::autograd::set_history(out, grad_fn);
  }
  // The op is linear in each of input, weight and bias, so its tangent is
  // the op applied to the tangents, with 0 in the dead columns (constant in
  // the forward). Computed outside the guard above, so it is differentiable
  // in reverse mode too (jacrev over jvp).
  const Tensor t_input = tangent_of(input);
  const Tensor t_weight = tangent_of(weight);
  const Tensor t_bias = tangent_of(bias);
  if (t_input.defined() || t_weight.defined() || t_bias.defined()) {
    const Tensor w = primal_of(weight);
    Tensor tangent;
    if (t_input.defined()) {
      tangent = masked_linear(
          t_input, w, std::nullopt, active, width, 0.0, strategy, live_count);
    }
    if (t_weight.defined()) {
      tangent = sum_defined(
          tangent,
          masked_linear(
              primal_of(input), t_weight,
              t_bias.defined() ? std::optional<Tensor>(t_bias) : std::nullopt, active,
              width, 0.0, strategy, live_count));
    } else if (t_bias.defined()) {
      // The bias's tangent in the live columns: no product with the input, which may
      // hold inf (0 x inf would be NaN).
      const Tensor live_bias = at::where(
          active.narrow_symint(0, 0, width), t_bias.narrow_symint(0, 0, width),
          at::zeros({}, t_bias.options()));
      tangent = sum_defined(tangent, live_bias.expand_symint(out.sym_sizes()).contiguous());
    }
    out._set_fw_grad(tangent, /*level=*/0, /*is_inplace_op=*/false);
  }
  return out;
}

std::tuple<Tensor, Tensor, Tensor> masked_linear_backward_autograd(
    const Tensor& grad_output,
    const Tensor& input,
    const Tensor& weight,
    const Tensor& active,
    std::array<bool, 3> output_mask,
    c10::string_view strategy,
    std::optional<int64_t> live_count) {
  NodeHandle<MaskedLinearDoubleBackward> grad_fn;
  if (torch::autograd::compute_requires_grad(grad_output, input, weight)) {
    grad_fn = make_node<MaskedLinearDoubleBackward>();
    grad_fn->set_next_edges(
        torch::autograd::collect_next_edges(grad_output, input, weight));
    grad_fn->grad_output = SavedVariable(grad_output, false);
    grad_fn->input = SavedVariable(input, false);
    grad_fn->weight = SavedVariable(weight, false);
    grad_fn->active = SavedVariable(active, false);
    grad_fn->computed = output_mask;
    grad_fn->strategy = std::string(strategy);
    grad_fn->live_count = live_count;
  }
  std::tuple<Tensor, Tensor, Tensor> grads;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    grads = masked_linear_backward(
        grad_output, input, weight, active, output_mask, strategy, live_count);
  }
  if (grad_fn) {
    torch::autograd::set_history(
        {std::get<0>(grads), std::get<1>(grads), std::get<2>(grads)}, grad_fn);
  }
  // Forward mode: the outputs are bilinear, (g, weight) -> grad_input,
  // (g, input) -> grad_weight, and linear in g -> grad_bias, so with tangents
  // tg, tx, tw:
  //   d grad_input  = backward(tg, x, w).grad_input  + backward(g, -, tw).grad_input
  //   d grad_weight = backward(tg, x, w).grad_weight + backward(g, tx, -).grad_weight
  //   d grad_bias   = backward(tg, -, -).grad_bias
  const Tensor t_grad = tangent_of(grad_output);
  const Tensor t_input = tangent_of(input);
  const Tensor t_weight = tangent_of(weight);
  if (t_grad.defined() || t_input.defined() || t_weight.defined()) {
    const Tensor g = primal_of(grad_output);
    const Tensor x = primal_of(input);
    const Tensor w = primal_of(weight);
    std::array<Tensor, 3> tangents;
    if (t_grad.defined()) {
      auto [a_input, a_weight, a_bias] = masked_linear_backward(
          t_grad, x, w, active, output_mask, strategy, live_count);
      tangents = {a_input, a_weight, a_bias};
    }
    const std::array<bool, 3> second = {
        output_mask[0] && t_weight.defined(), output_mask[1] && t_input.defined(), false};
    if (second[0] || second[1]) {
      auto [b_input, b_weight, unused] = masked_linear_backward(
          g, second[1] ? t_input : x, second[0] ? t_weight : w, active, second,
          strategy, live_count);
      if (second[0]) {
        tangents[0] = sum_defined(tangents[0], b_input);
      }
      if (second[1]) {
        tangents[1] = sum_defined(tangents[1], b_weight);
      }
    }
    const std::array<Tensor*, 3> outputs = {
        &std::get<0>(grads), &std::get<1>(grads), &std::get<2>(grads)};
    for (size_t i = 0; i < 3; ++i) {
      if (output_mask[i] && tangents[i].defined()) {
        outputs[i]->_set_fw_grad(tangents[i], /*level=*/0, /*is_inplace_op=*/false);
      }
    }
  }
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(growop, Autograd, m) {
  m.impl("masked_linear", &masked_linear_autograd);
  m.impl("masked_linear_backward", &masked_linear_backward_autograd);
}

}  // namespace growop

namespace {

// growop._C.masked_linear(input, weight, bias, active, width, mask_value,
// strategy, live_count): the same dispatcher call as
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
  if (!PyArg_ParseTuple(
          args, "OOOOLOsO", &input, &weight, &bias, &active, &width,
          &mask_value, &strategy, &live_count)) {
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
  std::optional<int64_t> count;
  // A traced graph (torch.jit.trace) runs later, on the mask as it is then: no count
  // baked into it.
  if (live_count != Py_None && !torch::jit::tracer::isTracing()) {
    count = PyLong_AsLongLong(live_count);
    if (PyErr_Occurred()) {
      return nullptr;
    }
  }
  at::Tensor out;
  {
    pybind11::gil_scoped_release no_gil;
    out = growop::masked_linear(
        THPVariable_Unpack(input), THPVariable_Unpack(weight), bias_tensor,
        THPVariable_Unpack(active), c10::SymInt(width), fill,
        std::string_view(strategy), count);
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

// growop._C._path_linear(path, input, weight, bias, active, width,
// live_count, fill) and _path_linear_backward(path, grad_output, input,
// weight, active, live_count, need_input, need_weight, need_bias): one way of
// computing the op, on 2-D tensors of any device, so that what only CUDA
// runs is tested where no GPU is. `path`: "packed" (packed.h, CUDA's gather
// with a live count), "dense" (dense.h as the CPU runs it) or "dense_aligned"
// (as CUDA runs it, through a padded block where width's rows are not
// aligned). Dense masks the dead rows unless live_count equals width. Not an
// API: no checks beyond ATen's own.
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
      growop::packed::forward(
          x, w, b, growop::packed::layout(mask, width, live_count), fill, out);
    } else {
      growop::dense::forward(
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
  auto [gi, gw, gb] = growop::dense::backward_outputs(
      x, w, {need_input != 0, need_weight != 0, need_bias != 0});
  {
    pybind11::gil_scoped_release no_gil;
    at::Tensor gi_or_none = need_input ? gi : at::Tensor();
    at::Tensor gw_or_none = need_weight ? gw : at::Tensor();
    at::Tensor gb_or_none = need_bias ? gb : at::Tensor();
    const int64_t width = g.size(1);
    if (*path == TestPath::kPacked) {
      growop::packed::backward(
          g, x, w, growop::packed::layout(mask, width, live_count), gi_or_none,
          gw_or_none, gb_or_none);
    } else {
      growop::dense::backward(
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
    {"masked_linear", masked_linear_binding, METH_VARARGS,
     "torch.ops.growop.masked_linear.default for plain tensors, in eager mode"},
    {"_path_linear", path_linear_binding, METH_VARARGS,
     "one path of masked_linear's forward on any device, for tests"},
    {"_path_linear_backward", path_linear_backward_binding, METH_VARARGS,
     "one path of masked_linear's backward on any device, for tests"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// The importable module, named as the build names it (TORCH_EXTENSION_NAME:
// _C from setup.py as growop._C, growop_C from the JIT build); importing it
// runs the static registrations above.
#define GROWOP_CONCAT_(a, b) a##b
#define GROWOP_CONCAT(a, b) GROWOP_CONCAT_(a, b)
#define GROWOP_STRING_(a) #a
#define GROWOP_STRING(a) GROWOP_STRING_(a)

extern "C" PyObject* GROWOP_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, GROWOP_STRING(TORCH_EXTENSION_NAME), nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
