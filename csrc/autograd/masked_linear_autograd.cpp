// Autograd of the growop::masked_linear ops (the Autograd dispatch key): the
// backward nodes and the forward-mode formulas.
//
// Autograd is C++, so a call never leaves C++ between the op and its kernels,
// and it composes with torch.func as a native op's does. The backward op has
// its own autograd formula in terms of the two ops, so gradients of any order
// work.
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>

#include "../ops/masked_linear.h"
#include "forward_mode.h"
#include "node.h"

namespace growop::autograd {
namespace {

using at::Tensor;
using ops::masked_linear;
using ops::masked_linear_backward;
using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

// Gradient of masked_linear; next edges: input, weight, bias.
struct MaskedLinearBackward : public Node {
  SavedVariable input;
  SavedVariable weight;
  // Saved so that autograd's version check catches a mask changed between
  // forward and backward instead of silently mixing two masks.
  SavedVariable active;
  bool has_bias = false;
  // The forward call's strategy and hints, passed on to every call of the
  // ops the gradients make: they are about the same mask, so they still hold.
  std::string strategy;
  std::optional<int64_t> live_count;
  std::optional<int64_t> live_end;

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
        strategy, live_count, live_end);
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
  std::optional<int64_t> live_end;

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
        grad = masked_linear(
            ggi, w, std::nullopt, mask, width, 0.0, strategy, live_count, live_end);
      }
      if (ggw.defined() || ggb.defined()) {
        const Tensor term = masked_linear(
            x, ggw.defined() ? ggw : at::zeros_like(w),
            ggb.defined() ? std::optional<Tensor>(ggb) : std::nullopt, mask,
            width, 0.0, strategy, live_count, live_end);
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
          output_mask, strategy, live_count, live_end);
      result[1] = output_mask[0] ? grad_input : Tensor();
      result[2] = output_mask[1] ? grad_weight : Tensor();
    }
    return result;
  }
};

Tensor masked_linear_autograd(
    const Tensor& input,
    const Tensor& weight,
    const std::optional<Tensor>& bias,
    const Tensor& active,
    c10::SymInt width,
    std::optional<double> mask_value,
    c10::string_view strategy,
    std::optional<int64_t> live_count,
    std::optional<int64_t> live_end) {
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
    grad_fn->live_end = live_end;
  }
  Tensor out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = masked_linear(
        input, weight, bias, active, width, mask_value, strategy, live_count, live_end);
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
          t_input, w, std::nullopt, active, width, 0.0, strategy, live_count, live_end);
    }
    if (t_weight.defined()) {
      tangent = sum_defined(
          tangent,
          masked_linear(
              primal_of(input), t_weight,
              t_bias.defined() ? std::optional<Tensor>(t_bias) : std::nullopt, active,
              width, 0.0, strategy, live_count, live_end));
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
    std::optional<int64_t> live_count,
    std::optional<int64_t> live_end) {
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
    grad_fn->live_end = live_end;
  }
  std::tuple<Tensor, Tensor, Tensor> grads;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    grads = masked_linear_backward(
        grad_output, input, weight, active, output_mask, strategy, live_count, live_end);
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
          t_grad, x, w, active, output_mask, strategy, live_count, live_end);
      tangents = {a_input, a_weight, a_bias};
    }
    const std::array<bool, 3> second = {
        output_mask[0] && t_weight.defined(), output_mask[1] && t_input.defined(), false};
    if (second[0] || second[1]) {
      auto [b_input, b_weight, unused] = masked_linear_backward(
          g, second[1] ? t_input : x, second[0] ? t_weight : w, active, second,
          strategy, live_count, live_end);
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

}  // namespace growop::autograd
