// Typed dispatcher calls of the growop linear cross-entropy ops (schemas in
// linear_cross_entropy.cpp), for C++ callers such as the autograd nodes.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string_view>
#include <tuple>

namespace growop::ops {

// The arguments every linear cross-entropy op shares, after the tensors.
struct LossOptions {
  std::optional<at::Tensor> classes;
  std::optional<at::Tensor> class_weight;
  int64_t ignore_index = -100;
  std::string_view reduction = "mean";
  double label_smoothing = 0.0;
  std::array<int64_t, 2> chunk_size = {0, 0};  // tokens, classes; 0 = chosen per call
  std::optional<int64_t> live_count;
};

// The options as the ops' schemas pass them; chunk_size must have two entries.
LossOptions loss_options(
    const std::optional<at::Tensor>& classes,
    const std::optional<at::Tensor>& class_weight,
    int64_t ignore_index,
    std::string_view reduction,
    double label_smoothing,
    c10::IntArrayRef chunk_size,
    std::optional<int64_t> live_count);

at::Tensor linear_cross_entropy(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const at::Tensor& active,
    const at::Tensor& target,
    const c10::SymInt& width,
    const LossOptions& options);

// (loss, lse, grad_input, grad_weight, grad_bias)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
linear_cross_entropy_forward(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const at::Tensor& active,
    const at::Tensor& target,
    const c10::SymInt& width,
    const LossOptions& options,
    std::array<bool, 3> output_mask);

// (grad_input, grad_weight, grad_bias)
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_backward(
    const at::Tensor& grad_loss,
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const at::Tensor& active,
    const at::Tensor& target,
    const at::Tensor& lse,
    const c10::SymInt& width,
    const LossOptions& options,
    std::array<bool, 3> output_mask);

}  // namespace growop::ops
