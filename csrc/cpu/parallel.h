// growop::cpu::parallel_for: at::parallel_for for the CPU kernels, run on
// torch's intra-op threads.
//
// at::parallel_for is a header template, parallel only where the file that
// calls it is compiled with OpenMP; torch's cpp_extension compiles growop
// without it, so there it runs on the calling thread alone (at 2 threads, the
// gather kernels' copies ran on one core while the other waited). From torch
// 2.10 on, torch_parallel_for (torch's stable C API) runs the same
// at::parallel_for inside libtorch, which is compiled with OpenMP; older
// torch keeps at::parallel_for. Either way it is serial inside a parallel
// region, so a nested call runs on its caller's thread.
//
// The worker threads take the caller's thread-local state (dispatch keys,
// grad and inference mode), so an ATen call inside `f` runs as it would on
// the caller's thread, and an exception inside `f` is rethrown on the
// caller's thread as it was thrown.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <c10/util/Exception.h>
#include <torch/version.h>

#include <algorithm>
#include <cstdint>
#include <exception>
#include <mutex>

#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 10)
#include <torch/csrc/stable/c/shim.h>
#define GROWOP_TORCH_PARALLEL_FOR 1
#endif

namespace growop::cpu {

// f(b, e) over [begin, end) split into at most one contiguous range per
// thread, each at least grain_size long (the last may be shorter).
template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain_size, const F& f) {
  if (begin >= end) {
    return;
  }
#ifdef GROWOP_TORCH_PARALLEL_FOR
  if (end - begin > std::max<int64_t>(grain_size, 1) && at::get_num_threads() > 1 &&
      !at::in_parallel_region()) {
    struct Context {
      const F& f;
      at::ThreadLocalState state;
      std::mutex mutex;
      std::exception_ptr error;
    } context{f};
    const auto run = [](int64_t b, int64_t e, void* opaque) {
      auto& c = *static_cast<Context*>(opaque);
      try {
        at::ThreadLocalStateGuard guard(c.state);
        c.f(b, e);
      } catch (...) {
        const std::lock_guard<std::mutex> lock(c.mutex);
        if (!c.error) {
          c.error = std::current_exception();
        }
      }
    };
    const AOTITorchError status = torch_parallel_for(begin, end, grain_size, run, &context);
    if (context.error) {
      std::rethrow_exception(context.error);
    }
    TORCH_CHECK(status == AOTI_TORCH_SUCCESS, "growop: torch_parallel_for failed");
    return;
  }
#endif
  at::parallel_for(begin, end, grain_size, f);
}

}  // namespace growop::cpu
