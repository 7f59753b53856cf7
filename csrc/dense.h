// The dense strategy of the growop::masked_linear ops: one ATen GEMM over the
// first `rows` rows below width (those that may be live), with the columns of
// dead rows among them masked on the device and the columns from `rows` to
// width filled once. The same code serves every device (MKL/oneDNN on the
// CPU, cuBLAS on CUDA); it reads the mask only through tensor ops, so it never
// synchronises with the host and can be captured in a CUDA graph.
//
// When every one of the `rows` rows is live (a prefix: nothing deactivated),
// this is the prefix form: one GEMM of weight[:rows] straight into the
// output's first `rows` columns, a strided view whose row stride the GEMM
// library takes as its leading dimension, the other columns filled, and in
// the backward GEMMs on strided views of grad_output: no gather, no copy, no
// masking pass.
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
inline bool blas_aligned(const at::Tensor& matrix) {
  return matrix.stride(0) * matrix.element_size() % 16 == 0;
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

// The first `columns` columns of matrix `m`: a strided view, or `m` itself
// when that is all of it.
inline at::Tensor leading_columns(const at::Tensor& m, int64_t columns) {
  return m.size(1) == columns ? m : m.narrow(1, 0, columns);
}

// The rows below width that a call covers: rows [0, count) may be live, none
// from count to width is; all_live: every one of the first count is.
struct Rows {
  int64_t count = 0;
  bool all_live = false;
};

// The rows a call covers by the caller's hints: live_end (every row at or
// past it, below width, is dead) bounds them, and a live_count equal to that
// bound says every row below it is live (a prefix). Without hints: all
// `width` rows, masked. The device checks each hint the work relies on
// against the mask (a device-side assert on CUDA, an error on the CPU, never
// a wrong result); the messages are literals, so nothing is formatted on the
// success path.
inline Rows hinted_rows(
    const at::Tensor& active,
    int64_t width,
    std::optional<int64_t> live_count,
    std::optional<int64_t> live_end) {
  const int64_t rows = live_end.value_or(width);
  if (rows < width) {
    at::_assert_async(
        active.narrow(0, rows, width - rows).any().logical_not(),
        "growop: a row at or past live_end, below width, is live");
  }
  const bool all_live = live_count.has_value() && *live_count == rows;
  if (all_live && rows > 0) {
    at::_assert_async(
        leading_rows(active, rows).all(),
        "growop: live_count equals live_end (or width), but the mask has dead rows below it");
  }
  return {rows, all_live};
}

// out (batch, width): column j < rows is x @ weight[j]^T + bias[j], or `fill`
// where row j is dead (`mask_dead` false: the caller knows every row below
// `rows` is live, so no masking pass runs); every column from `rows` on is
// `fill`, written once (no row there is live). The GEMM writes straight into
// out's first `rows` columns, a strided view when rows < width.
//
// `align_rows` (CUDA): where that view's row stride is not 16-byte aligned
// and either the masking pass runs (it then places the product at no extra
// pass) or the view is narrower than out (its stride is the layer's width,
// not the live rows': an nn.Linear of these rows would have its own), the
// GEMM writes into a padded block and one pass places it in out.
inline void forward(
    const at::Tensor& x,
    const at::Tensor& weight,
    const at::Tensor& bias,
    const at::Tensor& active,
    int64_t rows,
    double fill,
    bool mask_dead,
    bool align_rows,
    at::Tensor& out) {
  const int64_t width = out.size(1);
  at::Tensor head = leading_columns(out, rows);
  const bool through_block =
      align_rows && !blas_aligned(head) && (mask_dead || rows < width);
  at::Tensor y = through_block ? padded_block(out.size(0), rows, out) : head;
  const at::Tensor w = leading_rows(weight, rows).t();
  if (bias.defined()) {
    at::addmm_out(y, leading_rows(bias, rows), x, w);
  } else {
    at::mm_out(y, x, w);
  }
  if (mask_dead && through_block) {
    at::where_out(head, leading_rows(active, rows), y, at::scalar_tensor(fill, out.options()));
  } else if (mask_dead) {
    head.masked_fill_(leading_rows(active, rows).logical_not(), fill);
  } else if (through_block) {
    head.copy_(y);
  }
  if (rows < width) {
    out.narrow(1, rows, width - rows).fill_(fill);
  }
}

// The gradients of `forward` for grad_output g (batch, width), each written
// into its output where that output is defined: grad_input (batch, in),
// grad_weight (capacity, in) and grad_bias (capacity,), the last two zero on
// every row that is not live. Only g's first `rows` columns are read (a
// strided view). `mask_dead` and `align_rows` as for forward.
inline void backward(
    const at::Tensor& g,
    const at::Tensor& x,
    const at::Tensor& weight,
    const at::Tensor& active,
    int64_t rows,
    bool mask_dead,
    bool align_rows,
    at::Tensor& grad_input,
    at::Tensor& grad_weight,
    at::Tensor& grad_bias) {
  const int64_t width = g.size(1);
  const int64_t capacity = weight.size(0);
  const at::Tensor head = leading_columns(g, rows);
  at::Tensor gm = head;  // g's first `rows` columns, those of dead rows zeroed
  if (align_rows && !blas_aligned(head) && (mask_dead || rows < width)) {
    gm = padded_block(g.size(0), rows, g);
    if (mask_dead) {
      at::where_out(gm, leading_rows(active, rows), head, at::scalar_tensor(0, g.options()));
    } else {
      gm.copy_(head);
    }
  } else if (mask_dead) {
    gm = head.masked_fill(leading_rows(active, rows).logical_not(), 0);
  }
  if (grad_input.defined()) {
    at::mm_out(grad_input, gm, leading_rows(weight, rows));
  }
  if (grad_weight.defined()) {
    at::Tensor live_rows = leading_rows(grad_weight, rows);
    at::mm_out(live_rows, gm.t(), x);
    if (rows < capacity) {
      grad_weight.narrow(0, rows, capacity - rows).zero_();
    }
  }
  if (grad_bias.defined()) {
    at::Tensor head_bias = leading_rows(grad_bias, rows);
    at::sum_out(head_bias, gm, 0);
    if (rows < capacity) {
      grad_bias.narrow(0, rows, capacity - rows).zero_();
    }
  }
}

}  // namespace growop::dense
