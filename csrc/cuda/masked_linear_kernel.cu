// CUDA kernels of the growop::masked_linear ops (declared in
// masked_linear_kernel.cuh; the torch glue is masked_linear_cuda.cpp).
//
// Every op starts from the list of live rows that live_rows_kernel compacts
// from the mask on the device. The three products are one tiled GEMM kernel,
// instantiated per operand layout: each CTA owns a BM x BN tile of C and reads
// its operand tiles through the live list inside the tile loads, so no
// gathered copy of the weight or of grad_output is ever made. The grid is
// sized for `width` along the live dimension and CTAs past the live count
// return at once; the reduction over live rows (backward input) reads its
// length on the device. Nothing waits for the host.
//
//   forward          C(b, j)  = x(b, :) . W(live[j], :)   M=batch N=live  K=in
//   backward input   C(b, i)  = g(b, live[:]) . W(live[:], i)  M=batch N=in K=live
//   backward weight  C(j, i)  = g(:, live[j]) . x(:, i)   M=live  N=in    K=batch
#include "masked_linear_kernel.cuh"
#include "masked_linear_tiles.cuh"
#include "static_switch.h"

#include <climits>

namespace growop::kernels {
namespace {

// ------------------------------------------------------------- compaction

static_assert(kLiveRowsThreads == 32 * 32, "warp 0 scans one total per warp");

__global__ void __launch_bounds__(kLiveRowsThreads) live_rows_kernel(LiveRowsParams p) {
  __shared__ int warp_totals[kLiveRowsThreads / 32];
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid % 32;
  const int warp = tid / 32;
  int found = 0;  // live rows in earlier chunks, the same in every thread
  for (int64_t chunk = 0; chunk < p.width; chunk += kLiveRowsChunk) {
    const int64_t begin = chunk + static_cast<int64_t>(tid) * kLiveRowsPerThread;
    const unsigned bits = live_bits(p.active, begin, p.width);
    const int count = count_bits(bits);
    int inclusive = count;
#pragma unroll
    for (int offset = 1; offset < 32; offset *= 2) {
      const int below = __shfl_up_sync(0xffffffffu, inclusive, offset);
      inclusive = scan_step(inclusive, below, lane, offset);
    }
    if (lane == 31) {
      warp_totals[warp] = inclusive;
    }
    __syncthreads();
    if (warp == 0) {
      int total = warp_totals[lane];
#pragma unroll
      for (int offset = 1; offset < 32; offset *= 2) {
        const int below = __shfl_up_sync(0xffffffffu, total, offset);
        total = scan_step(total, below, lane, offset);
      }
      warp_totals[lane] = total;
    }
    __syncthreads();
    const int before = found + (warp > 0 ? warp_totals[warp - 1] : 0) + inclusive - count;
    write_live(bits, begin, p.live_rows + before);
    found += warp_totals[31];
    __syncthreads();  // the next chunk rewrites warp_totals
  }
  if (tid == 0) {
    *p.num_live = found;
  }
}

// ------------------------------------------------------------------- GEMM

// kAKInner: A is stored (m, k) with k contiguous, else (k, m) with m
// contiguous; likewise kBKInner for B as (n, k) or (k, n).
template <typename T, class Math, bool kAKInner, bool kBKInner>
__global__ void __launch_bounds__(Math::kThreads) masked_gemm_kernel(GemmParams<T> p) {
  using Tiles = CtaTiles<Math, kAKInner, kBKInner>;
  __shared__ __align__(128) unsigned char smem[Tiles::kBytes];

  resolve_extents<kAKInner, kBKInner>(p, *p.num_live);
  const TileCoord tile = tile_coords(static_cast<int>(blockIdx.x), p.tiles_m, p.tiles_n, kGroupM);
  const int m0 = tile.m * Math::BM;
  const int n0 = tile.n * Math::BN;
  if (m0 >= p.m || n0 >= p.n) {
    return;  // past the live rows: the grid is sized for the width
  }
  const int tid = static_cast<int>(threadIdx.x);

  typename Math::Accum acc;
  Math::clear(acc);
  typename Tiles::ACopy a_regs;
  typename Tiles::BCopy b_regs;
  const int k_tiles = ceil_div(p.k, Math::BK);
  if (k_tiles > 0) {
    Tiles::load(a_regs, b_regs, p, m0, n0, 0, tid);
    Tiles::store(a_regs, b_regs, smem, 0, tid);
    __syncthreads();
  }
  // Two stages: the loads of step kt + 1 are in flight while step kt
  // multiplies, then land in the other stage, whose last readers finished
  // before the previous barrier.
  for (int kt = 0; kt < k_tiles; ++kt) {
    const int stage = kt & 1;
    const bool more = kt + 1 < k_tiles;
    if (more) {
      Tiles::load(a_regs, b_regs, p, m0, n0, (kt + 1) * Math::BK, tid);
    }
    Math::template mma<kAKInner, kBKInner, Tiles::LDA, Tiles::LDB>(
        acc, Tiles::a_stage(smem, stage), Tiles::b_stage(smem, stage), tid);
    if (more) {
      Tiles::store(a_regs, b_regs, smem, stage ^ 1, tid);
    }
    __syncthreads();
  }
  Math::epilogue(acc, p.c, m0, n0, tid, smem);
}

// ---------------------------------------------------------------- the rest

// out[b, j] = value for every j < width that is not live; live columns are
// left alone. Thread x owns a column, the grid's rows stride over the batch.
template <typename T>
__global__ void fill_dead_columns_kernel(
    T* out, int64_t ld, int batch, int width, const uint8_t* active, T value) {
  fill_dead_column(
      out, ld, batch, width, active, value,
      static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x), blockIdx.y, gridDim.y);
}

// Zeros the rows of grad_weight that are not live and touches no other row.
template <typename T>
__global__ void zero_dead_rows_kernel(
    T* grad_weight, int64_t ld, int cols, int capacity, int width, const uint8_t* active,
    bool vec_ok) {
  for (int row = static_cast<int>(blockIdx.x); row < capacity; row += gridDim.x) {
    zero_dead_row(
        grad_weight, ld, cols, width, active, vec_ok, row, static_cast<int>(threadIdx.x),
        static_cast<int>(blockDim.x));
  }
}

constexpr int kBiasCols = 32;
constexpr int kBiasRows = 8;

// grad_bias[j] = sum over the batch of g[:, j] for live j, zero for the rest
// of the capacity: kBiasRows threads per column, kBiasCols columns per CTA.
template <typename T>
__global__ void __launch_bounds__(kBiasCols * kBiasRows) bias_grad_kernel(
    const T* grad_output, int64_t ld, int batch, int width, int capacity,
    const uint8_t* active, T* grad_bias) {
  using acc_t = typename Num<T>::acc_t;
  __shared__ acc_t partial[kBiasRows][kBiasCols + 1];
  const int col = static_cast<int>(blockIdx.x) * kBiasCols + static_cast<int>(threadIdx.x);
  partial[threadIdx.y][threadIdx.x] = bias_partial_sum(
      grad_output, ld, batch, width, active, col, static_cast<int>(threadIdx.y), kBiasRows);
  __syncthreads();
  if (threadIdx.y == 0 && col < capacity) {
    acc_t total = acc_t(0);
#pragma unroll
    for (int r = 0; r < kBiasRows; ++r) {
      total += partial[r][threadIdx.x];
    }
    grad_bias[col] = Num<T>::from_acc(total);  // zero where not live
  }
}

// ------------------------------------------------------------------ launch

template <typename T, class Math, class Gemm>
cudaError_t launch_gemm(GemmParams<T> p, cudaStream_t stream) {
  const int64_t blocks = size_grid<Math>(p);
  if (blocks == 0) {
    return cudaSuccess;
  }
  if (blocks > INT_MAX) {
    return cudaErrorInvalidConfiguration;
  }
  masked_gemm_kernel<T, Math, Gemm::kAKInner, Gemm::kBKInner>
      <<<static_cast<unsigned>(blocks), Math::kThreads, 0, stream>>>(p);
  return cudaPeekAtLastError();
}

}  // namespace

cudaError_t launch_live_rows(const LiveRowsParams& p, cudaStream_t stream) {
  if (p.width < 0) {
    return cudaErrorInvalidValue;
  }
  live_rows_kernel<<<1, kLiveRowsThreads, 0, stream>>>(p);
  return cudaPeekAtLastError();
}

cudaError_t launch_masked_linear_forward(const ForwardParams& p, cudaStream_t stream) {
  if (p.batch < 0 || p.in_features < 0 || p.width < 0) {
    return cudaErrorInvalidValue;
  }
  if (p.batch == 0 || p.width == 0) {
    return cudaSuccess;
  }
  return GROWOP_DTYPE_SWITCH(p.dtype, T, [&] {
    const cudaError_t gemm = GROWOP_BOOL_SWITCH(p.allow_tf32, kTf32, [&] {
      using Math = typename MathFor<T, kTf32>::type;
      return launch_gemm<T, Math, ForwardGemm>(ForwardGemm::build<T>(p), stream);
    });
    if (gemm != cudaSuccess) {
      return gemm;
    }
    constexpr int kThreads = 256;
    const dim3 grid(ceil_div(p.width, kThreads), p.batch < 256 ? p.batch : 256);
    fill_dead_columns_kernel<T><<<grid, kThreads, 0, stream>>>(
        static_cast<T*>(p.out), p.out_row_stride, p.batch, p.width, p.active,
        Num<T>::from_double(p.mask_value));
    return cudaPeekAtLastError();
  });
}

cudaError_t launch_masked_linear_backward_input(
    const BackwardParams& p, cudaStream_t stream) {
  if (p.batch < 0 || p.in_features < 0 || p.width < 0) {
    return cudaErrorInvalidValue;
  }
  return GROWOP_DTYPE_SWITCH(p.dtype, T, [&] {
    return GROWOP_BOOL_SWITCH(p.allow_tf32, kTf32, [&] {
      using Math = typename MathFor<T, kTf32>::type;
      return launch_gemm<T, Math, BackwardInputGemm>(BackwardInputGemm::build<T>(p), stream);
    });
  });
}

cudaError_t launch_masked_linear_backward_weight(
    const BackwardParams& p, cudaStream_t stream) {
  if (p.batch < 0 || p.in_features < 0 || p.width < 0 || p.capacity < p.width) {
    return cudaErrorInvalidValue;
  }
  if (p.capacity == 0 || p.in_features == 0) {
    return cudaSuccess;
  }
  return GROWOP_DTYPE_SWITCH(p.dtype, T, [&] {
    constexpr int kVec = 16 / static_cast<int>(sizeof(T));
    const bool vec_ok = aligned16(p.grad_weight) && p.grad_weight_row_stride % kVec == 0 &&
        p.in_features % kVec == 0;
    const int zero_blocks = p.capacity < 4096 ? p.capacity : 4096;
    zero_dead_rows_kernel<T><<<zero_blocks, 256, 0, stream>>>(
        static_cast<T*>(p.grad_weight), p.grad_weight_row_stride, p.in_features, p.capacity,
        p.width, p.active, vec_ok);
    const cudaError_t zero = cudaPeekAtLastError();
    if (zero != cudaSuccess || p.width == 0) {
      return zero;
    }
    return GROWOP_BOOL_SWITCH(p.allow_tf32, kTf32, [&] {
      using Math = typename MathFor<T, kTf32>::type;
      return launch_gemm<T, Math, BackwardWeightGemm>(BackwardWeightGemm::build<T>(p), stream);
    });
  });
}

cudaError_t launch_masked_linear_backward_bias(
    const BackwardParams& p, cudaStream_t stream) {
  if (p.batch < 0 || p.width < 0 || p.capacity < p.width) {
    return cudaErrorInvalidValue;
  }
  if (p.capacity == 0) {
    return cudaSuccess;
  }
  return GROWOP_DTYPE_SWITCH(p.dtype, T, [&] {
    const dim3 block(kBiasCols, kBiasRows);
    bias_grad_kernel<T><<<ceil_div(p.capacity, kBiasCols), block, 0, stream>>>(
        static_cast<const T*>(p.grad_output), p.grad_output_row_stride, p.batch, p.width,
        p.capacity, p.active, static_cast<T*>(p.grad_bias));
    return cudaPeekAtLastError();
  });
}

}  // namespace growop::kernels
