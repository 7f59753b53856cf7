// The linear cross-entropy kernels (linear_cross_entropy_kernel.cpp) as C++
// calls, for the test-only bindings (csrc/python/testing.cpp): the dispatcher
// reaches them through the ops' schemas (csrc/ops/linear_cross_entropy.*).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstdint>
#include <optional>
#include <tuple>

#include "../ops/linear_cross_entropy.h"

namespace growop::loss {

// Where the kernels learn the softmax's classes and check the targets.
enum class Plan {
  kByDevice,  // on the host on the CPU; on the device, without a host read, on CUDA
  kAsCuda,    // as CUDA does, on any device: how the tests run CUDA's way on the CPU
};

// _linear_cross_entropy_forward: (loss, lse, grad_input, grad_weight, grad_bias).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& active, const at::Tensor& target, int64_t width,
    const ops::LossOptions& options, std::array<bool, 3> output_mask, Plan plan);

// _linear_cross_entropy_backward: (grad_input, grad_weight, grad_bias).
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& active, const at::Tensor& target,
    const at::Tensor& lse, int64_t width, const ops::LossOptions& options,
    std::array<bool, 3> output_mask, Plan plan);

}  // namespace growop::loss
