// The CUDA kernels of the growop::masked_linear ops: parameters and launchers.
//
// This side knows nothing of torch (see masked_linear_cuda.cpp for the glue):
// raw pointers, sizes and row strides in elements. Every matrix has unit
// stride along its rows. Nothing here synchronises with the host: the live
// rows are compacted on the device (launch_live_rows) into a list that the
// other launchers read, so the whole sequence can be captured in a CUDA graph
// and replayed after the mask changes in place.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace growop::kernels {

enum class DType : int32_t { kFloat32, kFloat64, kBFloat16, kFloat16 };

// live_rows[0 : *num_live) = the j < width with active[j], ascending.
struct LiveRowsParams {
  const uint8_t* active;  // (capacity,) bool bytes: live where nonzero
  int32_t width;
  int32_t* live_rows;  // (width,) written
  int32_t* num_live;   // (1,) written
};

// What every op shares (as flash-attention's Qkv_params): the sizes, the mask
// and its compacted live-row list, the math mode.
struct MaskedLinearParams {
  DType dtype;
  bool allow_tf32;  // float32 on tensor cores in TF32
  const uint8_t* active;  // (capacity,) bool bytes: live where nonzero
  const int32_t* live_rows;  // from launch_live_rows
  const int32_t* num_live;
  int32_t batch;
  int32_t in_features;
  int32_t width;
  int32_t capacity;
};

// out[b, j] = input[b] . weight[j] + bias[j] for live j, mask_value for the
// other j < width.
struct ForwardParams : MaskedLinearParams {
  const void* input;  // (batch, in_features)
  int64_t input_row_stride;
  const void* weight;  // (capacity, in_features)
  int64_t weight_row_stride;
  const void* bias;  // (capacity,) contiguous, or nullptr
  void* out;  // (batch, width)
  int64_t out_row_stride;
  double mask_value;  // converted to the dtype as a static_cast would
};

// The three gradients, each launcher writing its own:
//   grad_input[b] = sum over live j of grad_output[b, j] * weight[j];
//   grad_weight[j] = sum over b of grad_output[b, j] * input[b] for live j;
//   grad_bias[j] = sum over b of grad_output[b, j] for live j;
// every other row of grad_weight and grad_bias is zero.
struct BackwardParams : MaskedLinearParams {
  const void* grad_output;  // (batch, width)
  int64_t grad_output_row_stride;
  const void* input;  // (batch, in_features)
  int64_t input_row_stride;
  const void* weight;  // (capacity, in_features)
  int64_t weight_row_stride;
  void* grad_input;  // (batch, in_features)
  int64_t grad_input_row_stride;
  void* grad_weight;  // (capacity, in_features)
  int64_t grad_weight_row_stride;
  void* grad_bias;  // (capacity,) contiguous
};

// Each launcher enqueues its kernels on `stream` and returns the launch error
// (cudaPeekAtLastError, which it does not clear) or cudaErrorInvalidValue for
// parameters it cannot run.
cudaError_t launch_live_rows(const LiveRowsParams& params, cudaStream_t stream);
cudaError_t launch_masked_linear_forward(const ForwardParams& params, cudaStream_t stream);
cudaError_t launch_masked_linear_backward_input(
    const BackwardParams& params, cudaStream_t stream);
cudaError_t launch_masked_linear_backward_weight(
    const BackwardParams& params, cudaStream_t stream);
cudaError_t launch_masked_linear_backward_bias(
    const BackwardParams& params, cudaStream_t stream);

}  // namespace growop::kernels
