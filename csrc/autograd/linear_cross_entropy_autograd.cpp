// Autograd of growop::linear_cross_entropy, written as ATen's generated nodes
// are (a Node with SavedVariables, set as the loss's grad_fn; see node.h), as
// the masked_linear nodes are, so torch.func composes with it.
//
// Two ways to the gradients:
// - 'mean' and 'sum' (the loss is a scalar): the forward computes the
//   gradients chunk by chunk while it has each chunk's softmax
//   (_linear_cross_entropy_forward), and the backward scales them by the
//   incoming scalar, in place when the graph is not retained. The three GEMMs
//   of nn.Linear + F.cross_entropy, never a fourth to recompute the logits.
// - 'none' (a gradient per token), and float16: the forward keeps each
//   token's log-sum-exp, and the backward recomputes the logits a chunk at a
//   time (_linear_cross_entropy_backward). For float16 the incoming gradient
//   (a gradient scaler's factor) must reach the chunks before the products
//   are rounded to float16, or small gradients underflow.
//
// The gradients are first-order: under create_graph they carry an Error node,
// so differentiating them again raises instead of treating them as constants.
// Forward-mode AD is refused likewise.
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <array>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>

#include "../ops/linear_cross_entropy.h"
#include "node.h"

namespace growop {
namespace {

using at::Tensor;
using torch::autograd::edge_list;
using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

using autograd::make_node;

constexpr const char* kSecondOrder =
    "growop.linear_cross_entropy: second derivatives are not implemented (its gradients "
    "come from a fused kernel). To differentiate the loss twice, compute the logits "
    "(head(x)) and use F.cross_entropy over the live columns.";

// Under create_graph (grad mode on in a backward), `grads` get an Error node
// as grad_fn whose next edges are `edges` (the forward's inputs and the
// incoming gradient): a second derivative through them raises kSecondOrder.
void refuse_second_order(variable_list& grads, edge_list edges) {
  if (!at::GradMode::is_enabled()) {
    return;
  }
  const auto error = make_node<torch::autograd::Error>(kSecondOrder, std::move(edges));
  torch::autograd::set_history(grads, error);
}

// The saved state of a call, for the nodes and the internal ops' calls.
struct SavedOptions {
  bool has_classes = false;
  bool has_class_weight = false;
  SavedVariable classes;
  SavedVariable class_weight;
  int64_t ignore_index = -100;
  std::string reduction;
  double label_smoothing = 0.0;
  std::array<int64_t, 2> chunk_size = {0, 0};
  std::optional<int64_t> live_count;

  void save(const ops::LossOptions& o) {
    has_classes = o.classes.has_value() && o.classes->defined();
    has_class_weight = o.class_weight.has_value() && o.class_weight->defined();
    if (has_classes) {
      classes = SavedVariable(*o.classes, false);
    }
    if (has_class_weight) {
      class_weight = SavedVariable(*o.class_weight, false);
    }
    ignore_index = o.ignore_index;
    reduction = std::string(o.reduction);
    label_smoothing = o.label_smoothing;
    chunk_size = o.chunk_size;
    live_count = o.live_count;
  }

  ops::LossOptions unpack() {
    ops::LossOptions o;
    if (has_classes) {
      o.classes = classes.unpack();
    }
    if (has_class_weight) {
      o.class_weight = class_weight.unpack();
    }
    o.ignore_index = ignore_index;
    o.reduction = reduction;
    o.label_smoothing = label_smoothing;
    o.chunk_size = chunk_size;
    o.live_count = live_count;
    return o;
  }

  void reset() {
    classes.reset_data();
    class_weight.reset_data();
  }
};

// 'mean' and 'sum': the gradients the forward computed, times the incoming
// scalar. Next edges: input, weight, bias.
struct LinearCrossEntropyBackward : public Node {
  std::array<SavedVariable, 3> saved;  // grad_input, grad_weight, grad_bias
  std::array<bool, 3> computed{};
  // Not read, only unpacked: the weight, bias and mask are saved so that
  // autograd's version check refuses a weight changed in place or a mask
  // changed (a grow, a deactivate) between forward and backward, as it does
  // for the recomputing node and for head(x) + F.cross_entropy. They are the
  // layer's own tensors, so saving them holds no extra memory (unless a
  // saved-tensors hook copies them, as it would for head(x)).
  std::array<SavedVariable, 3> checked;  // weight, bias (if any), active
  // Set when the engine will release the saved gradients after this apply
  // (the graph is not retained): they are scaled in place and handed on, with
  // no second gradient-sized allocation.
  bool consumable = false;

  std::string name() const override {
    return "LinearCrossEntropyBackward";
  }

  void will_release_variables() override {
    consumable = true;
  }

  void release_variables() override {
    for (auto& s : saved) {
      s.reset_data();
    }
    for (auto& s : checked) {
      s.reset_data();
    }
  }

  variable_list apply(variable_list&& grads) override {
    variable_list result(3);
    const Tensor& g = grads[0];
    if (!g.defined()) {
      return result;
    }
    for (auto& s : checked) {
      s.unpack();  // raises if the tensor changed in place since the forward
    }
    {
      at::AutoGradMode no_grad(false);
      for (size_t i = 0; i < 3; ++i) {
        if (computed[i] && task_should_compute_output(i)) {
          Tensor t = saved[i].unpack();
          result[i] = consumable ? t.mul_(g) : t.mul(g);
        }
      }
    }
    edge_list edges = next_edges();
    edges.push_back(torch::autograd::impl::gradient_edge(g));
    refuse_second_order(result, std::move(edges));
    return result;
  }
};

// 'none' and float16: the gradients recomputed from the saved log-sum-exps.
// Next edges: input, weight, bias.
struct LinearCrossEntropyRecomputeBackward : public Node {
  SavedVariable input;
  SavedVariable weight;
  SavedVariable bias;
  // Saved so that autograd's version check catches a mask changed between
  // forward and backward instead of silently mixing two masks.
  SavedVariable active;
  SavedVariable target;
  SavedVariable lse;
  bool has_bias = false;
  c10::SymInt width;
  SavedOptions options;

  std::string name() const override {
    return "LinearCrossEntropyRecomputeBackward";
  }

  void release_variables() override {
    input.reset_data();
    weight.reset_data();
    bias.reset_data();
    active.reset_data();
    target.reset_data();
    lse.reset_data();
    options.reset();
  }

  variable_list apply(variable_list&& grads) override {
    const std::array<bool, 3> output_mask = {
        task_should_compute_output(0), task_should_compute_output(1),
        has_bias && task_should_compute_output(2)};
    variable_list result(3);
    const Tensor& g = grads[0];
    if (!g.defined() || !(output_mask[0] || output_mask[1] || output_mask[2])) {
      return result;
    }
    std::tuple<Tensor, Tensor, Tensor> computed;
    {
      at::AutoGradMode no_grad(false);
      computed = ops::linear_cross_entropy_backward(
          g, input.unpack(), weight.unpack(),
          has_bias ? std::optional<Tensor>(bias.unpack()) : std::nullopt, active.unpack(),
          target.unpack(), lse.unpack(), width, options.unpack(), output_mask);
    }
    const std::array<Tensor, 3> values = {
        std::get<0>(computed), std::get<1>(computed), std::get<2>(computed)};
    for (size_t i = 0; i < 3; ++i) {
      if (output_mask[i]) {
        result[i] = values[i];
      }
    }
    edge_list edges = next_edges();
    edges.push_back(torch::autograd::impl::gradient_edge(g));
    refuse_second_order(result, std::move(edges));
    return result;
  }
};

bool has_tangent(const Tensor& t) {
  return t.defined() && t._fw_grad(/*level=*/0).defined();
}

Tensor linear_cross_entropy_autograd(
    const Tensor& input,
    const Tensor& weight,
    const std::optional<Tensor>& bias,
    const Tensor& active,
    const Tensor& target,
    c10::SymInt width,
    const std::optional<Tensor>& classes,
    const std::optional<Tensor>& class_weight,
    int64_t ignore_index,
    c10::string_view reduction,
    double label_smoothing,
    c10::IntArrayRef chunk_size,
    std::optional<int64_t> live_count) {
  const bool has_bias = bias.has_value() && bias->defined();
  TORCH_CHECK(
      !has_tangent(input) && !has_tangent(weight) && !(has_bias && has_tangent(*bias)),
      "growop.linear_cross_entropy: forward-mode AD (torch.func.jvp, jacfwd, hessian, "
      "torch.autograd.forward_ad) is not implemented; use reverse mode (backward, "
      "torch.func.grad, jacrev)");
  TORCH_CHECK(
      !(class_weight.has_value() && class_weight->defined() && class_weight->requires_grad() &&
        at::GradMode::is_enabled()),
      "growop.linear_cross_entropy: the loss is not differentiable in class_weight "
      "(nor is F.cross_entropy's in its weight); pass class_weight.detach()");
  const ops::LossOptions o = ops::loss_options(
      classes, class_weight, ignore_index, reduction, label_smoothing, chunk_size, live_count);

  if (!torch::autograd::compute_requires_grad(input, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return ops::linear_cross_entropy(input, weight, bias, active, target, width, o);
  }
  const std::array<bool, 3> wanted = {
      input.requires_grad(), weight.requires_grad(), has_bias && bias->requires_grad()};
  const bool in_forward = reduction != "none" && input.scalar_type() != at::kHalf;
  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> results;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    results = ops::linear_cross_entropy_forward(
        input, weight, bias, active, target, width, o,
        in_forward ? wanted : std::array<bool, 3>{false, false, false});
  }
  Tensor loss = std::get<0>(results);
  if (in_forward) {
    auto grad_fn = make_node<LinearCrossEntropyBackward>();
    grad_fn->set_next_edges(torch::autograd::collect_next_edges(input, weight, bias));
    grad_fn->computed = wanted;
    const std::array<Tensor, 3> grads = {
        std::get<2>(results), std::get<3>(results), std::get<4>(results)};
    for (size_t i = 0; i < 3; ++i) {
      if (wanted[i]) {
        grad_fn->saved[i] = SavedVariable(grads[i], false);
      }
    }
    grad_fn->checked[0] = SavedVariable(weight, false);
    if (has_bias) {
      grad_fn->checked[1] = SavedVariable(*bias, false);
    }
    grad_fn->checked[2] = SavedVariable(active, false);
    torch::autograd::set_history(loss, grad_fn);
  } else {
    auto grad_fn = make_node<LinearCrossEntropyRecomputeBackward>();
    grad_fn->set_next_edges(torch::autograd::collect_next_edges(input, weight, bias));
    grad_fn->input = SavedVariable(input, false);
    grad_fn->weight = SavedVariable(weight, false);
    if (has_bias) {
      grad_fn->bias = SavedVariable(*bias, false);
    }
    grad_fn->has_bias = has_bias;
    grad_fn->active = SavedVariable(active, false);
    grad_fn->target = SavedVariable(target, false);
    grad_fn->lse = SavedVariable(std::get<1>(results), false);
    grad_fn->width = width;
    grad_fn->options.save(o);
    torch::autograd::set_history(loss, grad_fn);
  }
  return loss;
}

}  // namespace

TORCH_LIBRARY_IMPL(growop, Autograd, m) {
  m.impl("linear_cross_entropy", &linear_cross_entropy_autograd);
}

}  // namespace growop
