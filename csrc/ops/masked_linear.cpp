// The schemas of the growop::masked_linear ops, and their typed calls
// (masked_linear.h).
//
// Who registers what for both ops (masked_linear and masked_linear_backward):
//
//   dispatch key               registers                   in
//   CPU                        kernels                     csrc/cpu/masked_linear_cpu.cpp
//   CUDA (CUDA builds)         kernels                     csrc/cuda/masked_linear_cuda.cpp
//   Autograd                   backward nodes, forward AD  csrc/autograd/masked_linear_autograd.cpp
//   Meta (fake tensors)        shapes and checks           growop/ops.py (register_fake)
//   FuncTorchBatched (vmap)    batching rules              growop/ops.py (register_vmap)
//   AutocastCPU, AutocastCUDA  F.linear's casts, forward   growop/ops.py
//
// The first three are C++, so an eager call never returns to Python between
// the op and its kernels; the other three are Python, registered when
// growop.ops is imported. The eager Python binding (csrc/python/) calls the
// same dispatcher entry as torch.ops.growop.masked_linear.
//
// TORCH_LIBRARY_FRAGMENT: each op family defines its own schemas in its own
// file of this folder, all in the one growop namespace. Its other files are
// named <op>_<folder>.cpp (torch's JIT build names each object after its
// source file's name, so two files of one name would collide).
#include "masked_linear.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(growop, m) {
  // out[..., j] = input @ weight[j] + bias[j] where active[j], else mask_value,
  // for j < width. mask_value None means the lowest finite value of the dtype;
  // a value the dtype cannot hold (past its finite range, not inf) is an error.
  // strategy: "auto", "dense" or "gather" (csrc/strategy.h). Two hints the
  // caller may give, read on the host and never changing the result (a wrong
  // one is an error or a device-side assert): live_count, the live rows among
  // the first width, lets auto choose without reading the mask on the host;
  // live_end, a row from which on none below width is live, bounds the work
  // (with live_count == live_end the live rows are exactly the first
  // live_end: one GEMM on them, the other columns filled).
  m.def(
      "masked_linear(Tensor input, Tensor weight, Tensor? bias, Tensor active, "
      "SymInt width, float? mask_value=None, str strategy=\"auto\", "
      "int? live_count=None, int? live_end=None) -> Tensor");
  // The gradients of masked_linear for grad_output (*, width), each computed
  // where output_mask asks (else an empty tensor):
  //   grad_input               = grad_output[..., live] @ weight[live]
  //   grad_weight[live]        = grad_output[..., live]^T @ input
  //   grad_bias[live]          = grad_output[..., live] summed over the batch
  // with every row of grad_weight and grad_bias that is not live zero. The
  // hints as for masked_linear, of the rows below width = grad_output's last
  // dimension.
  m.def(
      "masked_linear_backward(Tensor grad_output, Tensor input, Tensor weight, "
      "Tensor active, bool[3] output_mask, str strategy=\"auto\", "
      "int? live_count=None, int? live_end=None) -> (Tensor, Tensor, Tensor)");
}

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
    std::optional<int64_t> live_end) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("growop::masked_linear", "")
          .typed<at::Tensor(
              const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
              const at::Tensor&, c10::SymInt, std::optional<double>,
              c10::string_view, std::optional<int64_t>, std::optional<int64_t>)>();
  return op.call(
      input, weight, bias, active, width, mask_value, strategy, live_count, live_end);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_linear_backward(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const at::Tensor& weight,
    const at::Tensor& active,
    std::array<bool, 3> output_mask,
    std::string_view strategy,
    std::optional<int64_t> live_count,
    std::optional<int64_t> live_end) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("growop::masked_linear_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              std::array<bool, 3>, c10::string_view, std::optional<int64_t>,
              std::optional<int64_t>)>();
  return op.call(
      grad_output, input, weight, active, output_mask, strategy, live_count, live_end);
}

}  // namespace growop::ops
