// Run-time values as compile-time template arguments, so each kernel is
// written once and instantiated per dtype and precision mode.
//
//   GROWOP_DTYPE_SWITCH(params.dtype, T, [&] { return launch<T>(...); });
//   GROWOP_BOOL_SWITCH(params.allow_tf32, kTf32, [&] { return run<kTf32>(...); });
//
// The lambda must return cudaError_t; an unknown dtype returns
// cudaErrorInvalidValue without running it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#define GROWOP_BOOL_SWITCH(COND, CONST_NAME, ...)  \
  [&] {                                            \
    if (COND) {                                    \
      constexpr static bool CONST_NAME = true;     \
      return __VA_ARGS__();                        \
    } else {                                       \
      constexpr static bool CONST_NAME = false;    \
      return __VA_ARGS__();                        \
    }                                              \
  }()

#define GROWOP_DTYPE_SWITCH(DTYPE, TYPE_NAME, ...)        \
  [&]() -> cudaError_t {                                  \
    switch (DTYPE) {                                      \
      case ::growop::kernels::DType::kFloat32: {          \
        using TYPE_NAME = float;                          \
        return __VA_ARGS__();                             \
      }                                                   \
      case ::growop::kernels::DType::kFloat64: {          \
        using TYPE_NAME = double;                         \
        return __VA_ARGS__();                             \
      }                                                   \
      case ::growop::kernels::DType::kBFloat16: {         \
        using TYPE_NAME = __nv_bfloat16;                  \
        return __VA_ARGS__();                             \
      }                                                   \
      case ::growop::kernels::DType::kFloat16: {          \
        using TYPE_NAME = __half;                         \
        return __VA_ARGS__();                             \
      }                                                   \
    }                                                     \
    return cudaErrorInvalidValue;                         \
  }()
