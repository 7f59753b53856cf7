// Typed C++ calls of the growop::masked_linear ops through the dispatcher, for
// code that calls the ops from C++ (the autograd formulas, the eager Python
// binding). Schema and dispatch keys: masked_linear.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string_view>
#include <tuple>

namespace growop::ops {

at::Tensor masked_linear(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const at::Tensor& active,
    const c10::SymInt& width,
    std::optional<double> mask_value,
    std::string_view strategy,
    std::optional<int64_t> live_count,
    std::optional<int64_t> live_end);

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_linear_backward(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const at::Tensor& weight,
    const at::Tensor& active,
    std::array<bool, 3> output_mask,
    std::string_view strategy,
    std::optional<int64_t> live_count,
    std::optional<int64_t> live_end);

}  // namespace growop::ops
