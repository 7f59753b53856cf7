// Schemas of the linear cross-entropy ops and their typed dispatcher calls.
//
// linear_cross_entropy is cross-entropy over the logits input @ weight[j] +
// bias[j] of the classes j in the softmax: the live rows below `width`
// (active[j]), restricted to `classes` when given. The logits are never
// materialised: the kernels (csrc/loss/) work a chunk of tokens at a time.
// Autograd (csrc/autograd/) computes the gradients of a 'mean' or 'sum' loss
// in the forward, chunk by chunk, with _linear_cross_entropy_forward, and
// those of a 'none' loss (and of float16, where a gradient scaler's factor
// must reach the chunks) in the backward, with _linear_cross_entropy_backward.
#include <torch/library.h>

#include "linear_cross_entropy.h"

TORCH_LIBRARY_FRAGMENT(growop, m) {
  // The loss, float32 for bfloat16/float16 input (else the input's dtype):
  // '()' for 'mean' and 'sum', target's shape for 'none'. target holds slot
  // numbers (ignore_index skips a token); classes, an integer tensor of live
  // slots, restricts the softmax; class_weight (width,) weighs each slot as
  // F.cross_entropy's `weight`; label smoothing spreads over the classes in the
  // softmax. chunk_size: [tokens, classes] per chunk, 0 = chosen per call.
  // live_count: the live rows below width if the caller knows them (CUDA
  // needs it to keep the work on the live rows without a host sync).
  m.def(
      "linear_cross_entropy(Tensor input, Tensor weight, Tensor? bias, Tensor active, "
      "Tensor target, SymInt width, Tensor? classes=None, Tensor? class_weight=None, "
      "int ignore_index=-100, str reduction=\"mean\", float label_smoothing=0.0, "
      "int[2] chunk_size=[0, 0], int? live_count=None) -> Tensor");
  // The loss, every token's log-sum-exp over the softmax (float32 for
  // bfloat16/float16 input, shape (N,) for N tokens), and, where output_mask
  // asks, the gradients of the loss (of its sum for 'none'); an output not asked
  // for is an empty tensor.
  m.def(
      "_linear_cross_entropy_forward(Tensor input, Tensor weight, Tensor? bias, "
      "Tensor active, Tensor target, SymInt width, Tensor? classes, Tensor? class_weight, "
      "int ignore_index, str reduction, float label_smoothing, int[2] chunk_size, "
      "int? live_count, bool[3] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The gradients of linear_cross_entropy for grad_loss (the loss's shape),
  // recomputed a chunk at a time from the forward's log-sum-exps.
  m.def(
      "_linear_cross_entropy_backward(Tensor grad_loss, Tensor input, Tensor weight, "
      "Tensor? bias, Tensor active, Tensor target, Tensor lse, SymInt width, "
      "Tensor? classes, Tensor? class_weight, int ignore_index, str reduction, "
      "float label_smoothing, int[2] chunk_size, int? live_count, bool[3] output_mask) "
      "-> (Tensor, Tensor, Tensor)");
}

namespace growop::ops {

using at::Tensor;

LossOptions loss_options(
    const std::optional<Tensor>& classes,
    const std::optional<Tensor>& class_weight,
    int64_t ignore_index,
    std::string_view reduction,
    double label_smoothing,
    c10::IntArrayRef chunk_size,
    std::optional<int64_t> live_count) {
  TORCH_CHECK(
      chunk_size.size() == 2,
      "growop.linear_cross_entropy: chunk_size must be [tokens, classes], got ", chunk_size);
  LossOptions o;
  o.classes = classes;
  o.class_weight = class_weight;
  o.ignore_index = ignore_index;
  o.reduction = reduction;
  o.label_smoothing = label_smoothing;
  o.chunk_size = {chunk_size[0], chunk_size[1]};
  o.live_count = live_count;
  return o;
}

Tensor linear_cross_entropy(
    const Tensor& input,
    const Tensor& weight,
    const std::optional<Tensor>& bias,
    const Tensor& active,
    const Tensor& target,
    const c10::SymInt& width,
    const LossOptions& o) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("growop::linear_cross_entropy", "")
          .typed<Tensor(
              const Tensor&, const Tensor&, const std::optional<Tensor>&, const Tensor&,
              const Tensor&, c10::SymInt, const std::optional<Tensor>&,
              const std::optional<Tensor>&, int64_t, c10::string_view, double,
              c10::IntArrayRef, std::optional<int64_t>)>();
  return op.call(
      input, weight, bias, active, target, width, o.classes, o.class_weight,
      o.ignore_index, o.reduction, o.label_smoothing, o.chunk_size, o.live_count);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> linear_cross_entropy_forward(
    const Tensor& input,
    const Tensor& weight,
    const std::optional<Tensor>& bias,
    const Tensor& active,
    const Tensor& target,
    const c10::SymInt& width,
    const LossOptions& o,
    std::array<bool, 3> output_mask) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("growop::_linear_cross_entropy_forward", "")
          .typed<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
              const Tensor&, const Tensor&, const std::optional<Tensor>&, const Tensor&,
              const Tensor&, c10::SymInt, const std::optional<Tensor>&,
              const std::optional<Tensor>&, int64_t, c10::string_view, double,
              c10::IntArrayRef, std::optional<int64_t>, std::array<bool, 3>)>();
  return op.call(
      input, weight, bias, active, target, width, o.classes, o.class_weight,
      o.ignore_index, o.reduction, o.label_smoothing, o.chunk_size, o.live_count,
      output_mask);
}

std::tuple<Tensor, Tensor, Tensor> linear_cross_entropy_backward(
    const Tensor& grad_loss,
    const Tensor& input,
    const Tensor& weight,
    const std::optional<Tensor>& bias,
    const Tensor& active,
    const Tensor& target,
    const Tensor& lse,
    const c10::SymInt& width,
    const LossOptions& o,
    std::array<bool, 3> output_mask) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("growop::_linear_cross_entropy_backward", "")
          .typed<std::tuple<Tensor, Tensor, Tensor>(
              const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
              const Tensor&, const Tensor&, const Tensor&, c10::SymInt,
              const std::optional<Tensor>&, const std::optional<Tensor>&, int64_t,
              c10::string_view, double, c10::IntArrayRef, std::optional<int64_t>,
              std::array<bool, 3>)>();
  return op.call(
      grad_loss, input, weight, bias, active, target, lse, width, o.classes,
      o.class_weight, o.ignore_index, o.reduction, o.label_smoothing, o.chunk_size,
      o.live_count, output_mask);
}

}  // namespace growop::ops
