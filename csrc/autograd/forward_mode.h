// Forward-mode AD (torch.func.jvp, jacfwd, hessian, torch.autograd.forward_ad)
// for an op's autograd kernel: the tangents and primals at level 0, the level
// ATen's generated kernels use (torch.func's transforms each see their own
// level as 0).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace growop::autograd {

inline at::Tensor tangent_of(const at::Tensor& t) {
  return t.defined() ? t._fw_grad(/*level=*/0) : at::Tensor();
}

inline at::Tensor tangent_of(const std::optional<at::Tensor>& t) {
  return t.has_value() ? tangent_of(*t) : at::Tensor();
}

// `t` without its tangent (a view), for computing tangents from: a tangent
// computed from dual tensors would carry a tangent of its own.
inline at::Tensor primal_of(const at::Tensor& t) {
  return tangent_of(t).defined() ? t._fw_primal(/*level=*/0) : t;
}

// a + b where both are defined, else whichever is (tangents add up term by term).
inline at::Tensor sum_defined(const at::Tensor& a, const at::Tensor& b) {
  if (!a.defined()) {
    return b;
  }
  return b.defined() ? a.add(b) : a;
}

}  // namespace growop::autograd
