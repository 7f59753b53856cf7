// CUDA implementations of the growop::masked_linear ops: the torch glue
// around the kernels of masked_linear_kernel.cu (argument checks, allocation,
// dtype, stream). The checks are the CPU kernels' own (csrc/checks.h), so a
// user error reads the same on every device.
//
// Nothing here reads the mask on the host: each op compacts the live rows on
// the device first and the kernels read the list, so an op never waits for
// the GPU and can be captured in a CUDA graph whose replays follow in-place
// changes of `active`.
//
// TODO(cuBLAS for a known prefix): where the live rows are one prefix
// [0, n), the products are plain GEMMs on views (out[:, :n] = addmm(bias[:n],
// x, weight[:n].t()), ...) and cuBLAS is faster than the tiled kernels. The
// host cannot tell that the mask is a prefix without reading it, which
// synchronises with the device and breaks graph capture, and the op schema
// carries no hint; so every call takes the kernels. The dispatch rule (and
// whether it beats the kernels by enough to carry a hint through the schema)
// is to be measured on a GPU with benchmarks/bench_linear.py --device cuda.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
// at::cuda::getCurrentCUDAStream is c10's, re-exported: this header has it
// without ATen/cuda/CUDAContext.h, whose cuBLAS/cuSOLVER includes would keep
// the glue from compiling against a bare CUDA toolkit (CI's syntax check).
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>

#include "../checks.h"
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

const uint8_t* mask_bytes(const at::Tensor& active) {
  return reinterpret_cast<const uint8_t*>(active.const_data_ptr<bool>());
}

// The live rows among the first `width`, compacted on the device:
// element 0 of the result is their count, elements 1 .. count the rows.
at::Tensor live_rows(const at::Tensor& active, int64_t width, cudaStream_t stream) {
  at::Tensor list = at::empty({width + 1}, active.options().dtype(at::kInt));
  k::LiveRowsParams params{};
  params.active = mask_bytes(active);
  params.width = static_cast<int32_t>(width);
  params.num_live = list.data_ptr<int32_t>();
  params.live_rows = params.num_live + 1;
  C10_CUDA_CHECK(k::launch_live_rows(params, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return list;
}

at::Tensor masked_linear_cuda(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias_opt,
    const at::Tensor& active,
    int64_t width,
    std::optional<double> mask_value) {
  constexpr const char* op = "growop.masked_linear";
  const bool has_bias = bias_opt.has_value() && bias_opt->defined();
  checks::check_forward(op, input, weight, has_bias ? &*bias_opt : nullptr, active, width);
  const int64_t in_features = weight.size(1);
  const c10::cuda::CUDAGuard guard(weight.device());

  const at::Tensor x = as_rows(input, in_features);
  const at::Tensor w = as_rows(weight, in_features);
  const at::Tensor bias = has_bias ? bias_opt->contiguous() : at::Tensor();
  const at::Tensor mask = active.contiguous();
  const int64_t batch = x.size(0);
  check_kernel_limits(op, weight, {batch, in_features, weight.size(0)});
  // Allocated in its final shape: an operator must not return a view.
  at::Tensor result = at::empty(checks::with_last_dim(input.sizes(), width), x.options());
  if (batch == 0 || width == 0) {
    return result;
  }
  const at::Tensor out = result.view({batch, width});

  const double fill = mask_value.has_value()
      ? *mask_value
      : AT_DISPATCH_FLOATING_TYPES_AND2(
            at::kBFloat16, at::kHalf, w.scalar_type(), "masked_linear_cuda", [&] {
              return static_cast<double>(std::numeric_limits<scalar_t>::lowest());
            });
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor list = live_rows(mask, width, stream);

  k::ForwardParams params{};
  params.dtype = kernel_dtype(w.scalar_type());
  params.allow_tf32 = allow_tf32();
  params.input = x.const_data_ptr();
  params.input_row_stride = row_stride(x);
  params.weight = w.const_data_ptr();
  params.weight_row_stride = row_stride(w);
  params.bias = has_bias ? bias.const_data_ptr() : nullptr;
  params.active = mask_bytes(mask);
  params.num_live = list.const_data_ptr<int32_t>();
  params.live_rows = params.num_live + 1;
  params.out = out.data_ptr();
  params.out_row_stride = width;
  params.batch = static_cast<int32_t>(batch);
  params.in_features = static_cast<int32_t>(in_features);
  params.width = static_cast<int32_t>(width);
  params.mask_value = fill;
  C10_CUDA_CHECK(k::launch_masked_linear_forward(params, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return result;
}

at::Tensor masked_linear_backward_input_cuda(
    const at::Tensor& grad_output,
    const at::Tensor& weight,
    const at::Tensor& active) {
  constexpr const char* op = "growop.masked_linear_backward_input";
  const int64_t width = checks::check_backward_input(op, grad_output, weight, active);
  const int64_t in_features = weight.size(1);
  const c10::cuda::CUDAGuard guard(weight.device());
  const auto out_shape = checks::with_last_dim(grad_output.sizes(), in_features);

  const at::Tensor g = as_rows(grad_output, width);
  const at::Tensor w = as_rows(weight, in_features);
  const at::Tensor mask = active.contiguous();
  const int64_t batch = g.size(0);
  check_kernel_limits(op, weight, {batch, in_features, weight.size(0)});
  if (batch == 0 || width == 0 || in_features == 0) {
    return at::zeros(out_shape, w.options());
  }
  at::Tensor result = at::empty(out_shape, w.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor list = live_rows(mask, width, stream);

  k::BackwardInputParams params{};
  params.dtype = kernel_dtype(w.scalar_type());
  params.allow_tf32 = allow_tf32();
  params.grad_output = g.const_data_ptr();
  params.grad_output_row_stride = row_stride(g);
  params.weight = w.const_data_ptr();
  params.weight_row_stride = row_stride(w);
  params.num_live = list.const_data_ptr<int32_t>();
  params.live_rows = params.num_live + 1;
  params.grad_input = result.data_ptr();
  params.grad_input_row_stride = in_features;
  params.batch = static_cast<int32_t>(batch);
  params.in_features = static_cast<int32_t>(in_features);
  params.width = static_cast<int32_t>(width);
  C10_CUDA_CHECK(k::launch_masked_linear_backward_input(params, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return result;
}

at::Tensor masked_linear_backward_weight_cuda(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const at::Tensor& active) {
  constexpr const char* op = "growop.masked_linear_backward_weight";
  const int64_t width = checks::check_backward_weight(op, grad_output, input, active);
  const int64_t capacity = active.size(0);
  const int64_t in_features = input.size(-1);
  const c10::cuda::CUDAGuard guard(input.device());

  const at::Tensor g = as_rows(grad_output, width);
  const at::Tensor x = as_rows(input, in_features);
  const at::Tensor mask = active.contiguous();
  const int64_t batch = x.size(0);
  check_kernel_limits(op, input, {batch, in_features, capacity});
  if (batch == 0 || width == 0) {
    return at::zeros({capacity, in_features}, x.options());
  }
  at::Tensor grad_weight = at::empty({capacity, in_features}, x.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor list = live_rows(mask, width, stream);

  k::BackwardWeightParams params{};
  params.dtype = kernel_dtype(x.scalar_type());
  params.allow_tf32 = allow_tf32();
  params.grad_output = g.const_data_ptr();
  params.grad_output_row_stride = row_stride(g);
  params.input = x.const_data_ptr();
  params.input_row_stride = row_stride(x);
  params.active = mask_bytes(mask);
  params.num_live = list.const_data_ptr<int32_t>();
  params.live_rows = params.num_live + 1;
  params.grad_weight = grad_weight.data_ptr();
  params.grad_weight_row_stride = in_features;
  params.batch = static_cast<int32_t>(batch);
  params.in_features = static_cast<int32_t>(in_features);
  params.width = static_cast<int32_t>(width);
  params.capacity = static_cast<int32_t>(capacity);
  C10_CUDA_CHECK(k::launch_masked_linear_backward_weight(params, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad_weight;
}

at::Tensor masked_linear_backward_bias_cuda(
    const at::Tensor& grad_output,
    const at::Tensor& active) {
  constexpr const char* op = "growop.masked_linear_backward_bias";
  const int64_t width = checks::check_backward_bias(op, grad_output, active);
  const int64_t capacity = active.size(0);
  const c10::cuda::CUDAGuard guard(grad_output.device());

  const at::Tensor g = as_rows(grad_output, width);
  const at::Tensor mask = active.contiguous();
  const int64_t batch = g.size(0);
  check_kernel_limits(op, grad_output, {batch, capacity});
  at::Tensor grad_bias = at::empty({capacity}, grad_output.options());
  if (capacity == 0) {
    return grad_bias;
  }
  k::BackwardBiasParams params{};
  params.dtype = kernel_dtype(g.scalar_type());
  params.grad_output = g.const_data_ptr();
  params.grad_output_row_stride = row_stride(g);
  params.active = mask_bytes(mask);
  params.grad_bias = grad_bias.data_ptr();
  params.batch = static_cast<int32_t>(batch);
  params.width = static_cast<int32_t>(width);
  params.capacity = static_cast<int32_t>(capacity);
  C10_CUDA_CHECK(k::launch_masked_linear_backward_bias(params, at::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad_bias;
}

}  // namespace

TORCH_LIBRARY_IMPL(growop, CUDA, m) {
  m.impl("masked_linear", &masked_linear_cuda);
  m.impl("masked_linear_backward_input", &masked_linear_backward_input_cuda);
  m.impl("masked_linear_backward_weight", &masked_linear_backward_weight_cuda);
  m.impl("masked_linear_backward_bias", &masked_linear_backward_bias_cuda);
}

}  // namespace growop
