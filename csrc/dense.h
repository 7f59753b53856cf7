// The dense strategy of the growop::masked_linear ops: one ATen GEMM over the
// first `width` rows, with the columns of dead rows masked on the device. The
// same code serves every device (MKL/oneDNN on the CPU, cuBLAS on CUDA); it
// reads the mask only through tensor ops, so it never synchronises with the
// host and can be captured in a CUDA graph.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <array>
#include <cstdint>
#include <tuple>
#include <limits>
#include <optional>

namespace growop::dense {

// The outputs of a masked_linear_backward for input (*, in_features) and
// weight (capacity, in_features), allocated: each one output_mask leaves out
// is an empty tensor. Shared by both strategies on every device.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_outputs(
    const at::Tensor& input,
    const at::Tensor& weight,
    std::array<bool, 3> output_mask) {
  const auto options = weight.options();
  const int64_t capacity = weight.size(0);
  return {
      output_mask[0] ? at::empty(input.sizes(), options) : at::empty({0}, options),
      at::empty({output_mask[1] ? capacity : 0, weight.size(1)}, options),
      at::empty({output_mask[2] ? capacity : 0}, options)};
}

// The value of a masked column: mask_value, or the lowest finite value of
// the dtype.
inline double fill_value(at::ScalarType dtype, std::optional<double> mask_value) {
  if (mask_value.has_value()) {
    return *mask_value;
  }
  return AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, dtype, "growop_fill_value", [&] {
        return static_cast<double>(std::numeric_limits<scalar_t>::lowest());
      });
}

// The first `rows` rows of `t`: `t` itself when that is all of it (a view costs
// a dispatcher call, which small layers feel).
inline at::Tensor leading_rows(const at::Tensor& t, int64_t rows) {
  return t.size(0) == rows ? t : t.narrow(0, 0, rows);
}

// out (batch, width) = x (batch, in) @ weight[:width]^T + bias[:width], then
// the columns of dead rows set to `fill`. `mask_dead` false: the caller knows
// every row below width is live.
inline void forward(
    const at::Tensor& x,
    const at::Tensor& weight,
    const at::Tensor& bias,
    const at::Tensor& active,
    double fill,
    bool mask_dead,
    at::Tensor& out) {
  const int64_t width = out.size(1);
  const at::Tensor w = leading_rows(weight, width).t();
  if (bias.defined()) {
    at::addmm_out(out, leading_rows(bias, width), x, w);
  } else {
    at::mm_out(out, x, w);
  }
  if (mask_dead) {
    out.masked_fill_(leading_rows(active, width).logical_not(), fill);
  }
}

// The gradients of `forward` for grad_output g (batch, width), each written
// into its output where that output is defined: grad_input (batch, in),
// grad_weight (capacity, in) and grad_bias (capacity,), the last two zero on
// every row that is not live.
inline void backward(
    const at::Tensor& g,
    const at::Tensor& x,
    const at::Tensor& weight,
    const at::Tensor& active,
    bool mask_dead,
    at::Tensor& grad_input,
    at::Tensor& grad_weight,
    at::Tensor& grad_bias) {
  const int64_t width = g.size(1);
  const int64_t capacity = weight.size(0);
  const at::Tensor gm =
      mask_dead ? g.masked_fill(leading_rows(active, width).logical_not(), 0) : g;
  if (grad_input.defined()) {
    at::mm_out(grad_input, gm, leading_rows(weight, width));
  }
  if (grad_weight.defined()) {
    at::Tensor rows = leading_rows(grad_weight, width);
    at::mm_out(rows, gm.t(), x);
    if (width < capacity) {
      grad_weight.narrow(0, width, capacity - width).zero_();
    }
  }
  if (grad_bias.defined()) {
    at::Tensor head = leading_rows(grad_bias, width);
    at::sum_out(head, gm, 0);
    if (width < capacity) {
      grad_bias.narrow(0, width, capacity - width).zero_();
    }
  }
}

}  // namespace growop::dense
