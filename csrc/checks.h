// Argument checks of the growop::masked_linear ops, shared by every backend so
// that a user error reads the same on every device.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace growop::checks {

inline bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 ||
      t == at::kHalf;
}

inline void check_weight_and_mask(
    const char* op,
    const at::Tensor& weight,
    const at::Tensor& active) {
  TORCH_CHECK(
      weight.dim() == 2,
      op,
      ": weight must be 2-D (capacity, in_features), got shape ",
      weight.sizes());
  TORCH_CHECK(
      is_supported_dtype(weight.scalar_type()),
      op,
      ": weight must be float32, float64, bfloat16 or float16, got ",
      weight.scalar_type());
  TORCH_CHECK(
      active.dim() == 1 && active.scalar_type() == at::kBool,
      op,
      ": active must be a 1-D bool tensor, got ",
      active.scalar_type(),
      " of shape ",
      active.sizes());
  TORCH_CHECK(
      active.size(0) == weight.size(0),
      op,
      ": active has ",
      active.size(0),
      " entries but weight has ",
      weight.size(0),
      " rows (capacity); they must match");
  TORCH_CHECK(
      active.device() == weight.device(),
      op,
      ": active is on ",
      active.device(),
      " but weight is on ",
      weight.device());
}

inline void check_same(
    const char* op,
    const char* name,
    const at::Tensor& t,
    const at::Tensor& weight) {
  TORCH_CHECK(
      t.scalar_type() == weight.scalar_type(),
      op,
      ": ",
      name,
      " has dtype ",
      t.scalar_type(),
      " but weight has dtype ",
      weight.scalar_type(),
      "; they must match");
  TORCH_CHECK(
      t.device() == weight.device(),
      op,
      ": ",
      name,
      " is on ",
      t.device(),
      " but weight is on ",
      weight.device());
}

// Trailing dimension of grad_output is the output width; it must fit.
inline int64_t check_grad_output(
    const char* op,
    const at::Tensor& grad_output,
    const at::Tensor& weight) {
  check_same(op, "grad_output", grad_output, weight);
  TORCH_CHECK(
      grad_output.dim() >= 1,
      op,
      ": grad_output must have at least 1 dimension");
  const int64_t width = grad_output.size(-1);
  TORCH_CHECK(
      width <= weight.size(0),
      op,
      ": grad_output has ",
      width,
      " columns but the layer has capacity ",
      weight.size(0));
  return width;
}

inline void check_active(const char* op, const at::Tensor& active) {
  TORCH_CHECK(
      active.dim() == 1 && active.scalar_type() == at::kBool,
      op,
      ": active must be a 1-D bool tensor, got ",
      active.scalar_type(),
      " of shape ",
      active.sizes());
}

// masked_linear(input, weight, bias, active, width, mask_value). `bias` is
// the defined bias tensor, or nullptr when there is none.
inline void check_forward(
    const char* op,
    const at::Tensor& input,
    const at::Tensor& weight,
    const at::Tensor* bias,
    const at::Tensor& active,
    int64_t width) {
  check_weight_and_mask(op, weight, active);
  check_same(op, "input", input, weight);
  const int64_t capacity = weight.size(0);
  const int64_t in_features = weight.size(1);
  TORCH_CHECK(
      input.dim() >= 1 && input.size(-1) == in_features,
      op,
      ": input of shape ",
      input.sizes(),
      " does not match weight of shape ",
      weight.sizes(),
      " (input's last dimension must be in_features = ",
      in_features,
      ")");
  TORCH_CHECK(
      width >= 0 && width <= capacity,
      op,
      ": width ",
      width,
      " must be in [0, capacity = ",
      capacity,
      "]");
  if (bias != nullptr) {
    check_same(op, "bias", *bias, weight);
    TORCH_CHECK(
        bias->dim() == 1 && bias->size(0) == capacity,
        op,
        ": bias must have shape (",
        capacity,
        ",) to match weight, got ",
        bias->sizes());
  }
}

// masked_linear_backward_input(grad_output, weight, active); returns the width.
inline int64_t check_backward_input(
    const char* op,
    const at::Tensor& grad_output,
    const at::Tensor& weight,
    const at::Tensor& active) {
  check_weight_and_mask(op, weight, active);
  return check_grad_output(op, grad_output, weight);
}

// masked_linear_backward_weight(grad_output, input, active); returns the width.
inline int64_t check_backward_weight(
    const char* op,
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const at::Tensor& active) {
  check_active(op, active);
  TORCH_CHECK(
      is_supported_dtype(input.scalar_type()),
      op,
      ": input must be float32, float64, bfloat16 or float16, got ",
      input.scalar_type());
  check_same(op, "grad_output", grad_output, input);
  TORCH_CHECK(
      active.device() == input.device(),
      op,
      ": active is on ",
      active.device(),
      " but input is on ",
      input.device());
  TORCH_CHECK(input.dim() >= 1, op, ": input must have at least 1 dimension");
  const int64_t capacity = active.size(0);
  const int64_t width = grad_output.dim() >= 1 ? grad_output.size(-1) : -1;
  TORCH_CHECK(
      grad_output.dim() == input.dim() &&
          grad_output.sizes().slice(0, input.dim() - 1) ==
              input.sizes().slice(0, input.dim() - 1) &&
          width <= capacity,
      op,
      ": grad_output of shape ",
      grad_output.sizes(),
      " does not match input of shape ",
      input.sizes(),
      " and capacity ",
      capacity);
  return width;
}

// masked_linear_backward_bias(grad_output, active); returns the width.
inline int64_t check_backward_bias(
    const char* op,
    const at::Tensor& grad_output,
    const at::Tensor& active) {
  check_active(op, active);
  TORCH_CHECK(
      is_supported_dtype(grad_output.scalar_type()),
      op,
      ": grad_output must be float32, float64, bfloat16 or float16, got ",
      grad_output.scalar_type());
  TORCH_CHECK(
      grad_output.dim() >= 1 && grad_output.size(-1) <= active.size(0),
      op,
      ": grad_output of shape ",
      grad_output.sizes(),
      " has more columns than the capacity ",
      active.size(0));
  TORCH_CHECK(
      active.device() == grad_output.device(),
      op,
      ": active is on ",
      active.device(),
      " but grad_output is on ",
      grad_output.device());
  return grad_output.size(-1);
}

inline std::vector<int64_t> with_last_dim(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> shape(sizes.begin(), sizes.end() - 1);
  shape.push_back(last);
  return shape;
}

}  // namespace growop::checks
