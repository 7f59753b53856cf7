// The gather strategy as library GEMMs over packed live rows: the live rows
// of the weight copied into one dense block (index_select), the products done
// by the device's GEMM library on that block, and the results scattered back
// into the masked layout. It does only the live rows' arithmetic, at the
// library's speed, for the price of a few passes over memory: the packed
// weight (live x in), and the output or grad_output columns of the live rows.
//
// The caller supplies `rows`, the live rows among the first `width` as an
// int64 index tensor on the device, so its length, the live count, must be
// known on the host without a sync: CUDA's glue builds it from the device's
// compacted list and the caller's live_count, checking that count on the
// device (csrc/cuda/masked_linear_cuda.cpp). ATen ops only: no device code.
#pragma once

#include <ATen/ATen.h>

namespace growop::packed {

// out (batch, width): x @ weight[rows]^T + bias[rows] in the columns `rows`,
// `fill` in every other column.
inline void forward(
    const at::Tensor& x,
    const at::Tensor& weight,
    const at::Tensor& bias,
    const at::Tensor& rows,
    double fill,
    at::Tensor& out) {
  const at::Tensor w = weight.index_select(0, rows);
  const at::Tensor y = bias.defined()
      ? at::addmm(bias.index_select(0, rows), x, w.t())
      : at::mm(x, w.t());
  out.fill_(fill);
  out.index_copy_(1, rows, y);
}

// The gradients of `forward` for grad_output g (batch, width), each written
// where it is defined: grad_input (batch, in), grad_weight (capacity, in) and
// grad_bias (capacity,), the last two zero outside `rows`.
inline void backward(
    const at::Tensor& g,
    const at::Tensor& x,
    const at::Tensor& weight,
    const at::Tensor& rows,
    at::Tensor& grad_input,
    at::Tensor& grad_weight,
    at::Tensor& grad_bias) {
  const at::Tensor gl = g.index_select(1, rows);  // (batch, live)
  if (grad_input.defined()) {
    at::mm_out(grad_input, gl, weight.index_select(0, rows));
  }
  if (grad_weight.defined()) {
    grad_weight.zero_();
    grad_weight.index_copy_(0, rows, at::mm(gl.t(), x));
  }
  if (grad_bias.defined()) {
    grad_bias.zero_();
    grad_bias.index_copy_(0, rows, gl.sum(0));
  }
}

}  // namespace growop::packed
