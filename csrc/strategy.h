// Which of the two ways to compute a masked linear runs a call: the one rule,
// shared by every backend.
//
// - dense: ATen GEMMs over the rows below width that may be live, dead
//   columns among them masked after, the rest filled (see dense.h). Same code
//   on every device; on CUDA it is cuBLAS and reads the mask only on the
//   device, so it never synchronises. When every one of those rows is live (a
//   prefix) it is one GEMM straight into the output's first columns, with no
//   masking pass.
// - gather: work that follows the live rows (runs and gathered chunks on the
//   CPU; on CUDA, cuBLAS on the packed live rows when the caller knows the
//   live count, else the live-row kernels).
//
// The rows that may be live are the first `width`, or fewer where the caller
// says so: live_end, a row from which on none below width is live (GrowLinear
// passes its slots in use, which matters with static_shape, where width is
// the capacity). The CPU reads the mask itself: it weighs width / live, as
// its crossover was measured (its gather covers a dead tail at no cost, the
// runs ending at the last live row), and ends its dense work at the last live
// row.
//
// Dense does rows / live times the useful work at full GEMM speed; gather
// does only the useful work, at a lower speed. `auto` takes gather only where
// rows / live exceeds the crossover R* of the device.
#pragma once

#include <c10/core/DeviceType.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <string_view>

namespace growop {

enum class Path { kDense, kGather };

// R* on the CPU, measured with benchmarks/bench_linear.py --crossover
// (RESULTS.md): the gather kernels' overhead over a GEMM on the live rows is
// under 10%, while dense pays width / live, so gather wins from R = 1.25 up
// and dense keeps the calls where (nearly) every row below width is live.
constexpr double kCpuCrossover = 1.1;
// R* on CUDA, measured on an H200 (benchmarks/RESULTS.md): at (8192, 4096)
// and 32000 live rows, gather on the packed live rows costs 1.2x (TF32) to
// 1.5x (bf16) of nn.Linear on the live rows for width / live from 1.25 to 2,
// while dense pays at least width / live and, at widths that are not a
// multiple of 8, far more (cuBLAS on an unaligned row stride: 1.65x to 14x
// there). Dense keeps the calls where at most 1 row in 6 below width is dead.
constexpr double kCudaCrossover = 1.2;
// R* on CUDA for the live-row kernels: the gather that runs without a live
// count, which is what a CUDA graph captures. On the same H200 they cost 8x
// to 11x of nn.Linear on the live rows (forward+backward), so dense keeps a
// captured call up to width / live = 10.
constexpr double kCudaKernelsCrossover = 10.0;
// Below this many multiply-adds saved per call (dead rows x batch x
// in_features) gather's fixed cost outweighs what it saves: a small head is
// one dense GEMM. On the CPU, measured: gather costs a (128, 64 -> 12) call
// about twice what dense does.
constexpr int64_t kCpuMinSavedWork = int64_t{1} << 16;
// On CUDA, estimated from launch counts (to be measured): gather's fixed cost
// is about 40 small kernels per forward+backward (the layout, the packing and
// spreading passes), some 100 us, against dense's handful; dense spends the
// saved multiply-adds three times (forward and both gradients) at 100 to 300
// TMAC/s on a Hopper GPU's tensor cores. They break even near 2^32 saved
// multiply-adds, so a head of a few thousand rows stays one cuBLAS GEMM.
constexpr int64_t kCudaMinSavedWork = int64_t{1} << 32;

// `rows`: the rows the work may cover (width, or the caller's live_end on
// CUDA). `num_live`: the live rows among them, if known without a
// device-to-host sync; without it `auto` takes dense. `row_work`: the
// multiply-adds of one row, batch x in_features. `crossover_override`: the R*
// to use instead of the device's (CUDA's while a graph is captured).
inline Path choose_path(
    const char* op,
    std::string_view strategy,
    c10::DeviceType device,
    int64_t rows,
    std::optional<int64_t> num_live,
    int64_t row_work,
    std::optional<double> crossover_override = std::nullopt) {
  if (strategy == "dense") {
    return Path::kDense;
  }
  if (strategy == "gather") {
    return Path::kGather;
  }
  TORCH_CHECK(
      strategy == "auto",
      op, ": strategy must be 'auto', 'dense' or 'gather', got '", strategy, "'");
  const int64_t min_saved_work =
      device == c10::DeviceType::CUDA ? kCudaMinSavedWork : kCpuMinSavedWork;
  // In double: dead rows x batch x in_features can pass 2^63.
  if (!num_live.has_value() ||
      static_cast<double>(rows - *num_live) * static_cast<double>(row_work) <
          static_cast<double>(min_saved_work)) {
    return Path::kDense;
  }
  const double crossover = crossover_override.value_or(
      device == c10::DeviceType::CUDA ? kCudaCrossover : kCpuCrossover);
  return static_cast<double>(rows) > crossover * static_cast<double>(*num_live)
      ? Path::kGather
      : Path::kDense;
}

}  // namespace growop
