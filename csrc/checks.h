// Argument checks of the growop::masked_linear ops, shared by every backend so
// that a user error reads the same on every device. Each message is written
// once; the op functions only choose which checks apply.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

namespace growop::checks {

inline bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 ||
      t == at::kHalf;
}

// `t` (called `name`) must have the weight's dtype and device.
inline void check_matches_weight(
    const char* op,
    const char* name,
    const at::Tensor& t,
    const at::Tensor& weight) {
  TORCH_CHECK(
      t.scalar_type() == weight.scalar_type(),
      op, ": ", name, " has dtype ", t.scalar_type(), " but weight has dtype ",
      weight.scalar_type(), "; they must match");
  TORCH_CHECK(
      t.device() == weight.device(),
      op, ": ", name, " is on ", t.device(), " but weight is on ",
      weight.device());
}

inline void check_weight_and_mask(
    const char* op,
    const at::Tensor& weight,
    const at::Tensor& active) {
  TORCH_CHECK(
      weight.dim() == 2,
      op, ": weight must be 2-D (capacity, in_features), got shape ",
      weight.sizes());
  TORCH_CHECK(
      is_supported_dtype(weight.scalar_type()),
      op, ": weight must be float32, float64, bfloat16 or float16, got ",
      weight.scalar_type());
  TORCH_CHECK(
      active.dim() == 1 && active.scalar_type() == at::kBool,
      op, ": active must be a 1-D bool tensor, got ", active.scalar_type(),
      " of shape ", active.sizes());
  TORCH_CHECK(
      active.size(0) == weight.size(0),
      op, ": active has ", active.size(0), " entries but weight has ",
      weight.size(0), " rows (capacity); they must match");
  TORCH_CHECK(
      active.device() == weight.device(),
      op, ": active is on ", active.device(), " but weight is on ",
      weight.device());
}

// The input of a product with the weight: (*, in_features).
inline void check_input(
    const char* op,
    const at::Tensor& input,
    const at::Tensor& weight) {
  check_matches_weight(op, "input", input, weight);
  TORCH_CHECK(
      input.dim() >= 1 && input.size(-1) == weight.size(1),
      op, ": input of shape ", input.sizes(), " does not match weight of shape ",
      weight.sizes(), " (input's last dimension must be in_features = ",
      weight.size(1), ")");
}

// The value of masked columns must be one the dtype holds: within its finite
// range, or inf, -inf or NaN (ATen's rule for writing a Scalar into a tensor,
// c10::overflows). Checked before any work, so every strategy and device
// refuses the same calls, whatever the mask and sizes; growop/ops.py's fake
// kernel checks the same with the same message.
inline void check_mask_value(
    const char* op,
    std::optional<double> mask_value,
    at::ScalarType dtype) {
  if (!mask_value.has_value() || !std::isfinite(*mask_value)) {
    return;
  }
  const auto [lowest, highest] = AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, dtype, "growop_mask_value_range", [&] {
        return std::pair<double, double>(
            static_cast<double>(std::numeric_limits<scalar_t>::lowest()),
            static_cast<double>(std::numeric_limits<scalar_t>::max()));
      });
  TORCH_CHECK(
      *mask_value >= lowest && *mask_value <= highest,
      op, ": mask_value ", *mask_value, " cannot be converted to type ", dtype,
      " without overflow (", dtype, " holds [", lowest, ", ", highest,
      "], inf and -inf); pass one of those, or None for the lowest finite value");
}

// The caller's hints about the first `width` rows (csrc/strategy.h):
// live_count, how many of them are live, and live_end, a row from which on
// none of them is (every live row lies below it). Each is in [0, width], and
// the live rows below live_end number at most live_end. Checked on the host,
// before any work, by every backend; whether a hint matches the mask is
// checked where the mask is read (csrc/dense.h, packed.h, the CPU kernels).
inline void check_hints(
    const char* op,
    int64_t width,
    std::optional<int64_t> live_count,
    std::optional<int64_t> live_end) {
  TORCH_CHECK(
      !live_count.has_value() || (*live_count >= 0 && *live_count <= width),
      op, ": live_count must be in [0, ", width, "], got ", *live_count);
  TORCH_CHECK(
      !live_end.has_value() || (*live_end >= 0 && *live_end <= width),
      op, ": live_end must be in [0, ", width, "], got ", *live_end);
  TORCH_CHECK(
      !live_count.has_value() || !live_end.has_value() || *live_count <= *live_end,
      op, ": live_count ", *live_count, " exceeds live_end ", *live_end,
      ": every live row lies below live_end, so at most ", *live_end,
      " are live; pass the exact count and a bound at or past the last live row, or None");
}

// masked_linear(input, weight, bias, active, width, mask_value, ...). `bias`
// is the defined bias tensor, or nullptr when there is none.
inline void check_forward(
    const char* op,
    const at::Tensor& input,
    const at::Tensor& weight,
    const at::Tensor* bias,
    const at::Tensor& active,
    int64_t width,
    std::optional<double> mask_value) {
  check_weight_and_mask(op, weight, active);
  check_input(op, input, weight);
  check_mask_value(op, mask_value, weight.scalar_type());
  const int64_t capacity = weight.size(0);
  TORCH_CHECK(
      width >= 0 && width <= capacity,
      op, ": width ", width, " must be in [0, capacity = ", capacity, "]");
  if (bias != nullptr) {
    check_matches_weight(op, "bias", *bias, weight);
    TORCH_CHECK(
        bias->dim() == 1 && bias->size(0) == capacity,
        op, ": bias must have shape (", capacity, ",) to match weight, got ",
        bias->sizes());
  }
}

// masked_linear_backward(grad_output, input, weight, active, ...): returns
// the width, grad_output's last dimension.
inline int64_t check_backward(
    const char* op,
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const at::Tensor& weight,
    const at::Tensor& active) {
  check_weight_and_mask(op, weight, active);
  check_input(op, input, weight);
  check_matches_weight(op, "grad_output", grad_output, weight);
  TORCH_CHECK(
      grad_output.dim() == input.dim() &&
          grad_output.sizes().slice(0, input.dim() - 1) ==
              input.sizes().slice(0, input.dim() - 1),
      op, ": grad_output of shape ", grad_output.sizes(),
      " does not match input of shape ", input.sizes(),
      " (all but the last dimension must be equal)");
  const int64_t width = grad_output.size(-1);
  TORCH_CHECK(
      width <= weight.size(0),
      op, ": grad_output has ", width, " columns but the layer has capacity ",
      weight.size(0));
  return width;
}

inline std::vector<int64_t> with_last_dim(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> shape(sizes.begin(), sizes.end() - 1);
  shape.push_back(last);
  return shape;
}

}  // namespace growop::checks
