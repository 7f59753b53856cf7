// How C++ reads the mask `active`: as bytes, a row live where its byte is
// nonzero, as ATen's own kernels read bool tensors. Reading it as C++ `bool`
// would be undefined for a bool tensor holding other bytes than 0 and 1 (a
// view of uint8 data, or torch.empty(dtype=torch.bool)), which torch allows.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace growop {

// The bytes of a contiguous mask.
inline const uint8_t* mask_bytes(const at::Tensor& active) {
  return static_cast<const uint8_t*>(active.const_data_ptr());
}

}  // namespace growop
