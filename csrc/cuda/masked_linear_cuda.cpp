// CUDA implementations of the growop::masked_linear ops: the torch glue
// around the kernels of masked_linear_kernel.cu (argument checks, allocation,
// dtype, stream). The checks are the CPU kernels' own (csrc/checks.h), so a
// user error reads the same on every device.
//
// Each call takes the dense strategy (csrc/dense.h: cuBLAS GEMMs over the
// rows below width that may be live, dead columns among them masked on the
// device) or gather, by the rule of csrc/strategy.h. The host never reads the
// mask: `auto` decides from the caller's hints, and without a live count
// takes dense. With live_end (the rows at or past it, below width, are dead)
// dense covers only the rows below it and fills the other columns once; with
// live_count equal to live_end as well (a prefix: what GrowLinear passes with
// static_shape when nothing is deactivated) it is one cuBLAS GEMM straight
// into the output's first columns, no masking pass. Gather with a live count
// from the host runs cuBLAS on the packed live rows (csrc/packed.h, ATen ops
// only, so any GPU that runs torch runs it); without one, the live-row
// kernels of masked_linear_kernel.cu, which compact the live rows into a list
// on the device and read it there.
// Nothing waits for the GPU. Under CUDA-graph capture the hints are set aside
// (their shapes would be baked into the graph), so every captured path
// follows in-place changes of `active` on replay. Where a hint shapes the
// work (packed rows, the rows dense covers, no masking when every one is
// live), the device checks it against the mask and fails with a device-side
// assert.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
// at::cuda::getCurrentCUDAStream is c10's, re-exported: this header has it
// without ATen/cuda/CUDAContext.h, whose cuBLAS/cuSOLVER includes would keep
// the glue from compiling against a bare CUDA toolkit (CI's syntax check).
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <limits>
#include <optional>
#include <string_view>
#include <tuple>

#include "../checks.h"
#include "../dense.h"
#include "../mask.h"
#include "../packed.h"
#include "../strategy.h"
#include "masked_linear_kernel.cuh"

namespace growop {
namespace {

namespace k = ::growop::kernels;

k::DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return k::DType::kFloat32;
    case at::kDouble:
      return k::DType::kFloat64;
    case at::kBFloat16:
      return k::DType::kBFloat16;
    case at::kHalf:
      return k::DType::kFloat16;
    default:
      TORCH_CHECK(false, "growop: no CUDA kernel for dtype ", t);
  }
}

// The kernels index rows and tiles with 32-bit integers and use sm_80
// tensor-core instructions.
void check_kernel_limits(
    const char* op,
    const at::Tensor& t,
    std::initializer_list<int64_t> sizes) {
  for (const int64_t size : sizes) {
    TORCH_CHECK(
        size <= std::numeric_limits<int32_t>::max(),
        op,
        ": size ",
        size,
        " is beyond the CUDA kernels' limit of 2^31 - 1");
  }
  int major = 0;
  int minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(
      &major, cudaDevAttrComputeCapabilityMajor, t.device().index()));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(
      &minor, cudaDevAttrComputeCapabilityMinor, t.device().index()));
  TORCH_CHECK(
      major >= 8,
      op,
      ": the CUDA kernels need compute capability 8.0 or newer; ",
      t.device(),
      " has ",
      major,
      ".",
      minor);
}

// TF32 on tensor cores for float32 under the same switch as F.linear:
// torch.backends.cuda.matmul.allow_tf32 (or float32_matmul_precision).
bool allow_tf32() {
  return at::globalContext().allowTF32CuBLAS();
}

// `t` as a (rows, cols) matrix, cols its last dimension, with unit column
// stride; copies only if it must. Unlike reshape(-1, cols) this also takes
// cols == 0.
at::Tensor as_rows(const at::Tensor& t, int64_t cols) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    rows *= t.size(d);
  }
  at::Tensor m = t.reshape({rows, cols});
  if (m.size(1) > 1 && m.stride(1) != 1) {
    m = m.contiguous();
  }
  return m;
}

int64_t row_stride(const at::Tensor& m) {
  // A matrix with one row or one column may carry any stride there.
  return m.size(0) > 1 ? m.stride(0) : m.size(1);
}

// How a call runs: its path, and the hints it may rely on. While `stream`
// captures a CUDA graph the caller's hints are set aside (a replay must
// follow the mask as it is then, not the counts at capture), so gather would
// run the live-row kernels, and auto weighs those against dense with their
// own crossover.
struct Plan {
  Path path;
  std::optional<int64_t> live_count;
  std::optional<int64_t> live_end;
};

Plan plan_call(
    const char* op,
    std::string_view strategy,
    int64_t width,
    std::optional<int64_t> live_count,
    std::optional<int64_t> live_end,
    int64_t row_work,
    cudaStream_t stream) {
  checks::check_hints(op, width, live_count, live_end);
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  if (status != cudaStreamCaptureStatusNone) {
    const Path path = choose_path(
        op, strategy, c10::DeviceType::CUDA, width, std::nullopt, row_work,
        kCudaKernelsCrossover);
    return {path, std::nullopt, std::nullopt};
  }
  const Path path = choose_path(
      op, strategy, c10::DeviceType::CUDA, live_end.value_or(width), live_count, row_work);
  return {path, live_count, live_end};
}

// The preparation every kernel launch shares (as flash-attention's
// set_params_fprop): the limits checked, the live rows among the first
// `width` compacted on the device into `list` (element 0 their count,
// elements 1 .. count the rows), and the shared fields of `params` filled.
// `list` must outlive the launches.
void set_params_base(
    k::MaskedLinearParams& params,
    at::Tensor& list,
    const char* op,
    const at::Tensor& weight,
    const at::Tensor& mask,
    int64_t batch,
    int64_t width,
    cudaStream_t stream) {
  const int64_t capacity = weight.size(0);
  const int64_t in_features = weight.size(1);
  check_kernel_limits(op, weight, {batch, in_features, capacity});
  list = at::empty({width + 1}, mask.options().dtype(at::kInt));
  k::LiveRowsParams live{};
  live.active = mask_bytes(mask);
  live.width = static_cast<int32_t>(width);
  live.num_live = list.data_ptr<int32_t>();
  live.live_rows = live.num_live + 1;
  C10_CUDA_CHECK(k::launch_live_rows(live, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  params.dtype = kernel_dtype(weight.scalar_type());
  params.allow_tf32 = allow_tf32();
  params.active = mask_bytes(mask);
  params.num_live = list.const_data_ptr<int32_t>();
  params.live_rows = params.num_live + 1;
  params.batch = static_cast<int32_t>(batch);
  params.in_features = static_cast<int32_t>(in_features);
  params.width = static_cast<int32_t>(width);
  params.capacity = static_cast<int32_t>(capacity);
}

at::Tensor masked_linear_cuda(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias_opt,
    const at::Tensor& active,
    int64_t width,
    std::optional<double> mask_value,
    std::string_view strategy,
    std::optional<int64_t> live_count,
    std::optional<int64_t> live_end) {
  constexpr const char* op = "growop.masked_linear";
  const bool has_bias = bias_opt.has_value() && bias_opt->defined();
  checks::check_forward(
      op, input, weight, has_bias ? &*bias_opt : nullptr, active, width, mask_value);
  const int64_t in_features = weight.size(1);
  const c10::cuda::CUDAGuard guard(weight.device());

  const at::Tensor x = as_rows(input, in_features);
  const at::Tensor mask = active.contiguous();
  const int64_t batch = x.size(0);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Plan plan =
      plan_call(op, strategy, width, live_count, live_end, batch * in_features, stream);
  // Allocated in its final shape: an operator must not return a view.
  at::Tensor result = at::empty(checks::with_last_dim(input.sizes(), width), x.options());
  if (batch == 0 || width == 0) {
    return result;
  }
  at::Tensor out = result.view({batch, width});
  const double fill = dense::fill_value(weight.scalar_type(), mask_value);
  const at::Tensor bias = has_bias ? bias_opt->contiguous() : at::Tensor();
  if (plan.path == Path::kDense) {
    const dense::Rows rows = dense::hinted_rows(mask, width, plan.live_count, plan.live_end);
    dense::forward(
        x, weight, bias, mask, rows.count, fill, !rows.all_live, /*align_rows=*/true, out);
    return result;
  }

  if (plan.live_count.has_value()) {
    packed::forward(x, weight, bias, packed::layout(mask, width, *plan.live_count), fill, out);
    return result;
  }
  const at::Tensor w = as_rows(weight, in_features);
  k::ForwardParams params{};
  at::Tensor list;
  set_params_base(params, list, op, w, mask, batch, width, stream);
  params.input = x.const_data_ptr();
  params.input_row_stride = row_stride(x);
  params.weight = w.const_data_ptr();
  params.weight_row_stride = row_stride(w);
  params.bias = has_bias ? bias.const_data_ptr() : nullptr;
  params.out = out.data_ptr();
  params.out_row_stride = width;
  params.mask_value = fill;
  C10_CUDA_CHECK(k::launch_masked_linear_forward(params, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return result;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_linear_backward_cuda(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const at::Tensor& weight,
    const at::Tensor& active,
    std::array<bool, 3> output_mask,
    std::string_view strategy,
    std::optional<int64_t> live_count,
    std::optional<int64_t> live_end) {
  constexpr const char* op = "growop.masked_linear_backward";
  const int64_t width = checks::check_backward(op, grad_output, input, weight, active);
  const int64_t in_features = weight.size(1);
  const c10::cuda::CUDAGuard guard(weight.device());

  const at::Tensor g = as_rows(grad_output, width);
  const at::Tensor x = as_rows(input, in_features);
  const at::Tensor mask = active.contiguous();
  const int64_t batch = x.size(0);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Plan plan =
      plan_call(op, strategy, width, live_count, live_end, batch * in_features, stream);
  auto [grad_input, grad_weight, grad_bias] =
      dense::backward_outputs(input, weight, output_mask);
  at::Tensor gi = output_mask[0] ? grad_input.view({batch, in_features}) : at::Tensor();
  at::Tensor gw = output_mask[1] ? grad_weight : at::Tensor();
  at::Tensor gb = output_mask[2] ? grad_bias : at::Tensor();
  if (plan.path == Path::kDense) {
    const dense::Rows rows = dense::hinted_rows(mask, width, plan.live_count, plan.live_end);
    dense::backward(
        g, x, weight, mask, rows.count, !rows.all_live, /*align_rows=*/true, gi, gw, gb);
    return {grad_input, grad_weight, grad_bias};
  }

  if (plan.live_count.has_value()) {
    packed::backward(
        g, x, weight, packed::layout(mask, width, *plan.live_count), gi, gw, gb);
    return {grad_input, grad_weight, grad_bias};
  }
  const at::Tensor w = as_rows(weight, in_features);
  k::BackwardParams params{};
  at::Tensor list;
  set_params_base(params, list, op, w, mask, batch, width, stream);
  params.grad_output = g.const_data_ptr();
  params.grad_output_row_stride = row_stride(g);
  params.input = x.const_data_ptr();
  params.input_row_stride = row_stride(x);
  params.weight = w.const_data_ptr();
  params.weight_row_stride = row_stride(w);
  if (gi.defined()) {
    if (batch == 0 || width == 0 || in_features == 0) {
      gi.zero_();
    } else {
      params.grad_input = gi.data_ptr();
      params.grad_input_row_stride = in_features;
      C10_CUDA_CHECK(k::launch_masked_linear_backward_input(params, stream));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  if (gw.defined()) {
    if (batch == 0 || width == 0) {
      gw.zero_();
    } else {
      params.grad_weight = gw.data_ptr();
      params.grad_weight_row_stride = in_features;
      C10_CUDA_CHECK(k::launch_masked_linear_backward_weight(params, stream));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  if (gb.defined() && gb.numel() > 0) {
    params.grad_bias = gb.data_ptr();
    C10_CUDA_CHECK(k::launch_masked_linear_backward_bias(params, stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(growop, CUDA, m) {
  m.impl("masked_linear", &masked_linear_cuda);
  m.impl("masked_linear_backward", &masked_linear_backward_cuda);
}

}  // namespace growop
