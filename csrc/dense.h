// The dense strategy of the growop::masked_linear ops: one ATen GEMM over the
// first `width` rows, with the columns of dead rows masked on the device. The
// same code serves every device (MKL/oneDNN on the CPU, cuBLAS on CUDA); it
// reads the mask only through tensor ops, so it never synchronises with the
// host and can be captured in a CUDA graph.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
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

// cuBLAS runs its fastest kernels only on matrices whose row stride is a
// multiple of 16 bytes (on an H200 a bfloat16 GEMM with a (8192, 63999)
// output ran several times slower than with (8192, 64000)).
inline bool blas_aligned(int64_t columns, const at::Tensor& like) {
  return columns * like.element_size() % 16 == 0;
}

// `columns` rounded up to a row of a multiple of 128 bytes (a cache line).
inline int64_t padded_columns(int64_t columns, const at::Tensor& like) {
  const int64_t step = std::max<int64_t>(1, 128 / like.element_size());
  return (columns + step - 1) / step * step;
}

// A (rows, columns) matrix like `like` whose row stride is padded_columns.
inline at::Tensor padded_block(int64_t rows, int64_t columns, const at::Tensor& like) {
  return at::empty({rows, padded_columns(columns, like)}, like.options())
      .narrow(1, 0, columns);
}

// out (batch, width) = x (batch, in) @ weight[:width]^T + bias[:width], then
// the columns of dead rows set to `fill`. `mask_dead` false: the caller knows
// every row below width is live. `align_rows` (CUDA): where the masking pass
// runs and out's row stride is not 16-byte aligned, the GEMM writes into a
// padded block and the masking pass copies it into out, at no extra pass.
inline void forward(
    const at::Tensor& x,
    const at::Tensor& weight,
    const at::Tensor& bias,
    const at::Tensor& active,
    double fill,
    bool mask_dead,
    bool align_rows,
    at::Tensor& out) {
  const int64_t width = out.size(1);
  const at::Tensor w = leading_rows(weight, width).t();
  const bool through_block = mask_dead && align_rows && !blas_aligned(width, out);
  at::Tensor y = through_block ? padded_block(out.size(0), width, out) : out;
  if (bias.defined()) {
    at::addmm_out(y, leading_rows(bias, width), x, w);
  } else {
    at::mm_out(y, x, w);
  }
  if (through_block) {
    at::where_out(out, leading_rows(active, width), y, at::scalar_tensor(fill, out.options()));
  } else if (mask_dead) {
    out.masked_fill_(leading_rows(active, width).logical_not(), fill);
  }
}

// The gradients of `forward` for grad_output g (batch, width), each written
// into its output where that output is defined: grad_input (batch, in),
// grad_weight (capacity, in) and grad_bias (capacity,), the last two zero on
// every row that is not live. `mask_dead` and `align_rows` as for forward.
inline void backward(
    const at::Tensor& g,
    const at::Tensor& x,
    const at::Tensor& weight,
    const at::Tensor& active,
    bool mask_dead,
    bool align_rows,
    at::Tensor& grad_input,
    at::Tensor& grad_weight,
    at::Tensor& grad_bias) {
  const int64_t width = g.size(1);
  const int64_t capacity = weight.size(0);
  at::Tensor gm = g;  // g with the columns of dead rows zeroed
  if (mask_dead && align_rows && !blas_aligned(width, g)) {
    gm = padded_block(g.size(0), width, g);
    at::where_out(gm, leading_rows(active, width), g, at::scalar_tensor(0, g.options()));
  } else if (mask_dead) {
    gm = g.masked_fill(leading_rows(active, width).logical_not(), 0);
  }
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
