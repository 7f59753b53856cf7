// CPU kernels of the growop::masked_linear ops.
//
// Each call counts the live rows in the mask (host memory: no sync to avoid)
// and takes the dense strategy (../dense.h) or the gather kernels below by the
// rule of ../strategy.h. Dense ends at the last live row, so a prefix of live
// rows is one GEMM on them, as it is one run of the gather kernels. The
// caller's hints (live_count, live_end) are checked against the mask, never
// relied on.
//
// The gather kernels cover the live rows in two ways, decided per call from
// the mask (see LivePlan): long runs of consecutive live rows are multiplied in
// place (a strided view of the weight and of the output, no copy), and rows in
// short runs are gathered, a chunk at a time, into a small buffer that stays in
// cache and multiplied from there. Either way every GEMM is ATen's, so work
// and memory traffic follow the live rows, never the capacity.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"
#include "../dense.h"
#include "../mask.h"
#include "../strategy.h"
#include "parallel.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <optional>
#include <string_view>
#include <tuple>
#include <array>
#include <utility>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#endif

namespace growop {
namespace {

using checks::with_last_dim;

// A run this long is multiplied in place; shorter runs are gathered. Below
// this length the per-GEMM overhead outweighs the copy a gather makes.
constexpr int64_t kMinDirectRun = 64;
// A gathered block is at most about this many bytes: large enough for an
// efficient GEMM, small enough to stay in cache between the gather and the
// GEMM that reads it. Each thread gathers its own blocks (see
// for_each_chunk_share).
constexpr int64_t kGatherBlockBytes = int64_t{4} << 20;

// A gathered chunk of the weight gradient is computed over its whole span of
// rows when at least this share of the span is its own (see the backward). At
// 4 live rows in 5 gathering wins: (256, 1024 -> 10000) forward+backward went
// from 1.2x to 1.09x of nn.Linear (benchmarks/RESULTS.md), the span's extra
// products costing more than copying the chunk's rows out of cache.
constexpr int64_t kSpanDensityNum = 9;
constexpr int64_t kSpanDensityDen = 10;

// The gathered rows are shared between threads only while each share has at
// least this many multiply-adds: below it, waking the threads costs more than
// they save (at 2 threads, a forward of (128, 64 -> 10) with every other row
// live went from 1.3x to 1.5x of nn.Linear). About 20 us of one core's GEMM.
constexpr int64_t kMinShareWork = int64_t{1} << 20;

// The grain of a parallel copy loop whose every index moves `elements`
// elements: torch's own grain for elementwise loops.
int64_t copy_grain(int64_t elements) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, elements));
}

// The most rows of `row_bytes` bytes a gathered block holds.
int64_t max_chunk_rows(int64_t row_bytes) {
  return std::clamp<int64_t>(kGatherBlockBytes / std::max<int64_t>(1, row_bytes), 16, 2048);
}

// How the live rows among the first `width` rows are covered.
//
// The gathered rows are cut into chunks of equal size (the last may be
// shorter): enough that each holds at most max_chunk_rows, their count rounded
// up to a multiple of the thread count, so that the threads' shares of chunks
// (see for_each_chunk_share) hold about as many rows each.
struct LivePlan {
  std::vector<std::pair<int64_t, int64_t>> runs;  // [begin, end), in place
  std::vector<int64_t> gathered;  // live rows left to gather, ascending
  int64_t num_live = 0;
  int64_t chunk = 1;  // rows gathered per GEMM
  int64_t chunks_per_share = 1;  // the fewest chunks a thread's share holds

  int64_t num_chunks() const {
    return (static_cast<int64_t>(gathered.size()) + chunk - 1) / chunk;
  }
  int64_t chunk_rows(int64_t c) const {
    return std::min<int64_t>(chunk, static_cast<int64_t>(gathered.size()) - c * chunk);
  }
  const int64_t* chunk_begin(int64_t c) const {
    return gathered.data() + c * chunk;
  }
  // The columns of the output whose dead rows chunk c writes: from one past
  // the previous chunk's last row (0 for the first) to its own last row, and
  // for the last chunk on to `width`. They tile [0, width).
  std::pair<int64_t, int64_t> span(int64_t c, int64_t width) const {
    const int64_t* rows = chunk_begin(c);
    const int64_t begin = c == 0 ? 0 : rows[-1] + 1;
    const int64_t end = c + 1 == num_chunks() ? width : rows[chunk_rows(c) - 1] + 1;
    return {begin, end};
  }
};

// Runs `share(c0, c1)` for the chunks [c0, c1) of one contiguous share per
// thread. A share runs its chunks one after another, with single-threaded
// GEMMs on buffers of its own, so each core gathers into and multiplies from
// its own cache. At 2 threads this beat multi-threaded GEMMs chunk by chunk,
// whose gathers and scatters end on a barrier each: (256, 1024 -> 10000) with
// every other row live, forward+backward 0.96x of nn.Linear against 1.13x.
template <typename F>
void for_each_chunk_share(const LivePlan& plan, const F& share) {
  cpu::parallel_for(0, plan.num_chunks(), plan.chunks_per_share, share);
}

// min_run: runs at least this long are kept whole; pass a huge value to
// gather every live row. row_bytes: the bytes of a gathered row; row_work: the
// multiply-adds of one gathered row's GEMM (batch x in_features).
LivePlan plan_live_rows(
    const at::Tensor& active,
    int64_t width,
    int64_t row_bytes,
    int64_t row_work,
    int64_t min_run = kMinDirectRun) {
  const uint8_t* live = mask_bytes(active);
  LivePlan plan;
  int64_t j = 0;
  while (j < width) {
    if (live[j] == 0) {
      ++j;
      continue;
    }
    int64_t end = j;
    while (end < width && live[end] != 0) {
      ++end;
    }
    if (end - j >= min_run) {
      plan.runs.emplace_back(j, end);
    } else {
      for (int64_t r = j; r < end; ++r) {
        plan.gathered.push_back(r);
      }
    }
    plan.num_live += end - j;
    j = end;
  }
  const int64_t gathered = static_cast<int64_t>(plan.gathered.size());
  const int64_t work = gathered * std::max<int64_t>(1, row_work);
  const int64_t threads = at::in_parallel_region()
      ? 1
      : std::clamp<int64_t>(work / kMinShareWork, 1, at::get_num_threads());
  const int64_t max_chunk = max_chunk_rows(row_bytes);
  const int64_t chunks = (gathered + max_chunk - 1) / max_chunk;
  const int64_t balanced = std::min(gathered, (chunks + threads - 1) / threads * threads);
  plan.chunk = std::max<int64_t>(1, (gathered + balanced - 1) / std::max<int64_t>(1, balanced));
  plan.chunks_per_share = (plan.num_chunks() + threads - 1) / threads;
  return plan;
}

// The rows in [begin, end) that are not live, ascending, into `dead`.
void dead_rows(const uint8_t* live, int64_t begin, int64_t end, std::vector<int64_t>& dead) {
  dead.clear();
  for (int64_t j = begin; j < end; ++j) {
    if (live[j] == 0) {
      dead.push_back(j);
    }
  }
}

// The weight gradient has all `capacity` rows, and the ones that are not live
// must read as zero. Fresh anonymous pages from the kernel read as zero until
// written, so when the gradient is mapped that way the dead rows cost nothing:
// no write, no page fault. Buffers this large the allocator maps afresh on every
// allocation anyway (glibc's largest mmap threshold), page-faulting every row
// in; smaller ones it may hand back warm, where zeroing the dead rows is cheaper
// than faulting the live ones in. Measured in benchmarks/bench_linear.py.
constexpr int64_t kFreshPagesMinBytes = int64_t{32} << 20;

// A (rows x row_size) buffer: uninitialised, or (second == true) all zeros.
std::pair<at::Tensor, bool> gradient_buffer(
    int64_t rows,
    int64_t row_size,
    const at::TensorOptions& options) {
  const int64_t bytes = rows * row_size * static_cast<int64_t>(options.dtype().itemsize());
#if defined(MAP_ANONYMOUS)
  if (bytes >= kFreshPagesMinBytes) {
    void* pages = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (pages != MAP_FAILED) {
      auto unmap = [bytes](void* ptr) { munmap(ptr, bytes); };
      return {at::from_blob(pages, {rows, row_size}, unmap, options), true};
    }
  }
#endif
  return {at::empty({rows, row_size}, options), false};
}

// (*, n) as a (rows, n) matrix, a view where it can be; unlike reshape(-1, n)
// also for n == 0. A 2-D tensor is returned as it is.
at::Tensor as_matrix(const at::Tensor& t) {
  if (t.dim() == 2) {
    return t;
  }
  const int64_t rows = c10::multiply_integers(t.sizes().slice(0, t.dim() - 1));
  return t.reshape({rows, t.size(-1)});
}

// dst[i, :] = src[rows[i], :] for i < n (row-major, row length k), the rows
// copied in parallel.
template <typename src_t, typename dst_t>
void gather_rows(
    const src_t* src,
    const int64_t* rows,
    int64_t n,
    int64_t k,
    dst_t* dst) {
  if (k == 0) {  // no bytes to copy, and the pointers may be null
    return;
  }
  cpu::parallel_for(0, n, copy_grain(k), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const src_t* s = src + rows[i] * k;
      dst_t* d = dst + i * k;
      if constexpr (std::is_same_v<src_t, dst_t>) {
        std::memcpy(d, s, k * sizeof(src_t));
      } else {
        for (int64_t c = 0; c < k; ++c) {
          d[c] = static_cast<dst_t>(s[c]);
        }
      }
    }
  });
}

// dst[r, i] = src[r, cols[i]] for r < batch, i < n; dst has row stride ld.
template <typename src_t, typename dst_t>
void gather_columns(
    const src_t* src,
    int64_t src_ld,
    const int64_t* cols,
    int64_t n,
    int64_t batch,
    dst_t* dst,
    int64_t ld) {
  cpu::parallel_for(0, batch, copy_grain(n), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t i = 0; i < n; ++i) {
        dst[r * ld + i] = static_cast<dst_t>(src[r * src_ld + cols[i]]);
      }
    }
  });
}

// The live rows among the first `width` of a mask: how many, and one past
// the last of them (0 if there is none).
struct LiveRows {
  int64_t count = 0;
  int64_t end = 0;
};

LiveRows live_rows(const at::Tensor& live_mask, int64_t width) {
  const uint8_t* live = mask_bytes(live_mask);
  int64_t end = width;
  while (end > 0 && live[end - 1] == 0) {
    --end;
  }
  return {std::count_if(live, live + end, [](uint8_t byte) { return byte != 0; }), end};
}

// The caller's hints against the mask. The CPU reads the mask itself and
// relies on neither, but refuses a wrong one as CUDA's device would, so that
// it shows here first, with the values.
void check_hints_match_mask(
    const char* op,
    int64_t width,
    const LiveRows& live,
    std::optional<int64_t> live_count,
    std::optional<int64_t> live_end) {
  checks::check_hints(op, width, live_count, live_end);
  TORCH_CHECK(
      !live_count.has_value() || *live_count == live.count,
      op, ": live_count ", *live_count, " does not match the mask, which has ", live.count,
      " live rows below width ", width, "; pass the exact count, or None");
  TORCH_CHECK(
      !live_end.has_value() || *live_end >= live.end,
      op, ": live_end ", *live_end, " does not match the mask, whose row ", live.end - 1,
      " is live; pass at least ", live.end, " (one past the last live row), or None");
}

// out (batch, width), each element written once: the runs' columns by their
// GEMMs, bias included, in place; every other column by the chunk whose span
// holds it (LivePlan::span): a gathered row's from the chunk's product, a dead
// row's the fill value.
void gather_forward(
    const at::Tensor& x,
    const at::Tensor& w,
    const at::Tensor& bias,
    const at::Tensor& live_mask,
    double fill_value,
    at::Tensor& out) {
  const int64_t batch = x.size(0);
  const int64_t width = out.size(1);
  const int64_t in_features = w.size(1);
  const bool has_bias = bias.defined();
  const LivePlan plan =
      plan_live_rows(live_mask, width, in_features * w.element_size(), batch * in_features);

  for (const auto& [begin, end] : plan.runs) {
    at::Tensor columns = out.narrow(1, begin, end - begin);
    const at::Tensor rows = w.narrow(0, begin, end - begin).t();
    if (has_bias) {
      at::addmm_out(columns, bias.narrow(0, begin, end - begin), x, rows);
    } else {
      at::mm_out(columns, x, rows);
    }
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, w.scalar_type(), "masked_linear_cpu", [&] {
        const auto fill = static_cast<scalar_t>(fill_value);
        const uint8_t* live = mask_bytes(live_mask);
        scalar_t* o = out.data_ptr<scalar_t>();
        if (plan.gathered.empty()) {  // the runs are all there is: fill the dead columns
          std::vector<int64_t> dead;
          dead_rows(live, 0, width, dead);
          cpu::parallel_for(0, batch, copy_grain(static_cast<int64_t>(dead.size())),
                            [&](int64_t r0, int64_t r1) {
            for (int64_t r = r0; r < r1; ++r) {
              for (const int64_t j : dead) {
                o[r * width + j] = fill;
              }
            }
          });
          return;
        }
        const scalar_t* wp = w.const_data_ptr<scalar_t>();
        const scalar_t* bp = has_bias ? bias.const_data_ptr<scalar_t>() : nullptr;
        for_each_chunk_share(plan, [&](int64_t c0, int64_t c1) {
          at::Tensor rows_buf = at::empty({plan.chunk, in_features}, w.options());
          at::Tensor cols_buf = at::empty({batch, plan.chunk}, w.options());
          at::Tensor bias_buf = at::empty({has_bias ? plan.chunk : 0}, w.options());
          const scalar_t* cb = cols_buf.const_data_ptr<scalar_t>();
          std::vector<int64_t> dead;
          for (int64_t c = c0; c < c1; ++c) {
            const int64_t n = plan.chunk_rows(c);
            const int64_t* rows = plan.chunk_begin(c);
            gather_rows(wp, rows, n, in_features, rows_buf.data_ptr<scalar_t>());
            at::Tensor product = cols_buf.narrow(1, 0, n);
            const at::Tensor weights = rows_buf.narrow(0, 0, n).t();
            if (has_bias) {
              scalar_t* bb = bias_buf.data_ptr<scalar_t>();
              for (int64_t i = 0; i < n; ++i) {
                bb[i] = bp[rows[i]];
              }
              at::addmm_out(product, bias_buf.narrow(0, 0, n), x, weights);
            } else {
              at::mm_out(product, x, weights);
            }
            const auto [begin, end] = plan.span(c, width);
            dead_rows(live, begin, end, dead);
            for (int64_t r = 0; r < batch; ++r) {
              scalar_t* row = o + r * width;
              for (const int64_t j : dead) {
                row[j] = fill;
              }
              const scalar_t* products = cb + r * plan.chunk;
              for (int64_t i = 0; i < n; ++i) {
                row[rows[i]] = products[i];
              }
            }
          }
        });
      });
}

// grad_input (batch, in) = g[:, live] @ w[live].
void gather_backward_input(
    const at::Tensor& g,
    const at::Tensor& w,
    const at::Tensor& live_mask,
    at::Tensor& grad_input) {
  const int64_t batch = g.size(0);
  const int64_t width = g.size(1);
  const int64_t in_features = w.size(1);
  // Reduced precision sums every piece in float32 (each live row gathered and
  // widened), so the result is rounded once, as a single GEMM's would be.
  const bool reduced = w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kHalf;
  const at::ScalarType acc_type = reduced ? at::kFloat : w.scalar_type();
  const int64_t row_bytes = in_features * static_cast<int64_t>(at::elementSize(acc_type));
  LivePlan plan = plan_live_rows(live_mask, width, row_bytes, batch * in_features);
  if (batch == 0 || in_features == 0 || plan.num_live == 0) {
    grad_input.zero_();
    return;
  }
  if (plan.gathered.empty() && plan.runs.size() == 1) {
    const auto [begin, end] = plan.runs.front();
    at::mm_out(grad_input, g.narrow(1, begin, end - begin), w.narrow(0, begin, end - begin));
    return;
  }
  if (reduced) {
    plan = plan_live_rows(
        live_mask, width, row_bytes, batch * in_features, std::numeric_limits<int64_t>::max());
  }

  at::Tensor acc = at::zeros({batch, in_features}, w.options().dtype(acc_type));
  for (const auto& [begin, end] : plan.runs) {
    acc.addmm_(g.narrow(1, begin, end - begin), w.narrow(0, begin, end - begin));
  }
  if (!plan.gathered.empty()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kBFloat16, at::kHalf, w.scalar_type(), "masked_linear_backward_input_cpu", [&] {
          using acc_t = std::conditional_t<
              std::is_same_v<scalar_t, at::BFloat16> || std::is_same_v<scalar_t, at::Half>,
              float,
              scalar_t>;
          const auto acc_options = w.options().dtype(acc_type);
          at::Tensor rows_buf = at::empty({plan.chunk, in_features}, acc_options);
          at::Tensor cols_buf = at::empty({batch, plan.chunk}, acc_options);
          for (int64_t c = 0; c < plan.num_chunks(); ++c) {
            const int64_t n = plan.chunk_rows(c);
            const int64_t* rows = plan.chunk_begin(c);
            gather_rows(w.const_data_ptr<scalar_t>(), rows, n, in_features,
                        rows_buf.data_ptr<acc_t>());
            gather_columns(g.const_data_ptr<scalar_t>(), width, rows, n, batch,
                           cols_buf.data_ptr<acc_t>(), plan.chunk);
            acc.addmm_(cols_buf.narrow(1, 0, n), rows_buf.narrow(0, 0, n));
          }
        });
  }
  grad_input.copy_(acc);
}

// grad_weight (capacity, in): g[:, live]^T @ x on the live rows, zero elsewhere.
at::Tensor gather_backward_weight(
    const at::Tensor& g,
    const at::Tensor& x,
    const at::Tensor& live_mask,
    int64_t capacity) {
  const int64_t batch = x.size(0);
  const int64_t width = g.size(1);
  const int64_t in_features = x.size(1);
  const LivePlan plan =
      plan_live_rows(live_mask, width, in_features * x.element_size(), batch * in_features);
  if (batch == 0 || in_features == 0 || plan.num_live == 0) {
    return at::zeros({capacity, in_features}, x.options());
  }

  auto [grad_weight, zeroed] =
      gradient_buffer(capacity, in_features, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, x.scalar_type(), "masked_linear_backward_weight_cpu", [&] {
        scalar_t* gw = grad_weight.data_ptr<scalar_t>();
        const uint8_t* live = mask_bytes(live_mask);
        // Rows that are not live get exact zeros.
        const auto zero_dead_rows = [&](int64_t begin, int64_t end) {
          cpu::parallel_for(begin, end, copy_grain(in_features), [&](int64_t r0, int64_t r1) {
            for (int64_t r = r0; r < r1; ++r) {
              if (r >= width || live[r] == 0) {
                std::memset(gw + r * in_features, 0, in_features * sizeof(scalar_t));
              }
            }
          });
        };
        if (!zeroed) {
          zero_dead_rows(0, capacity);
        }

        for (const auto& [begin, end] : plan.runs) {
          at::Tensor rows = grad_weight.narrow(0, begin, end - begin);
          at::mm_out(rows, g.narrow(1, begin, end - begin).t(), x);
        }
        if (plan.gathered.empty()) {
          return;
        }
        // A chunk whose rows are dense within their span (the rows from its
        // first to its last) is computed over the whole span, straight into
        // place, and the span's dead rows zeroed after: a few wasted products
        // beat a copy of every row. A sparse chunk's gradient columns are
        // gathered row by row (batch x chunk) and, transposed into the GEMM,
        // give its weight-gradient rows, which are then copied to their places.
        const scalar_t* gp = g.const_data_ptr<scalar_t>();
        for_each_chunk_share(plan, [&](int64_t c0, int64_t c1) {
          at::Tensor cols_buf = at::empty({batch, plan.chunk}, x.options());
          at::Tensor rows_buf = at::empty({plan.chunk, in_features}, x.options());
          scalar_t* cb = cols_buf.data_ptr<scalar_t>();
          const scalar_t* rb = rows_buf.const_data_ptr<scalar_t>();
          for (int64_t c = c0; c < c1; ++c) {
            const int64_t n = plan.chunk_rows(c);
            const int64_t* rows = plan.chunk_begin(c);
            const int64_t first = rows[0];
            const int64_t span = rows[n - 1] - first + 1;
            if (n * kSpanDensityDen >= span * kSpanDensityNum) {
              at::Tensor block = grad_weight.narrow(0, first, span);
              at::mm_out(block, g.narrow(1, first, span).t(), x);
              zero_dead_rows(first, first + span);
              continue;
            }
            gather_columns(gp, width, rows, n, batch, cb, plan.chunk);
            at::Tensor block = rows_buf.narrow(0, 0, n);
            at::mm_out(block, cols_buf.narrow(1, 0, n).t(), x);
            for (int64_t i = 0; i < n; ++i) {
              std::memcpy(gw + rows[i] * in_features, rb + i * in_features,
                          in_features * sizeof(scalar_t));
            }
          }
        });
      });
  return grad_weight;
}

// grad_bias (capacity,): g summed over the batch on live rows, zero elsewhere.
at::Tensor gather_backward_bias(
    const at::Tensor& g,
    const at::Tensor& live_mask,
    int64_t capacity) {
  const int64_t width = g.size(1);
  at::Tensor grad_bias = at::zeros({capacity}, g.options());
  if (width == 0 || g.size(0) == 0) {
    return grad_bias;
  }
  at::Tensor summed = g.sum(0);
  summed.masked_fill_(live_mask.narrow(0, 0, width).logical_not(), 0);
  grad_bias.narrow(0, 0, width).copy_(summed);
  return grad_bias;
}

at::Tensor masked_linear_cpu(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias_opt,
    const at::Tensor& active,
    int64_t width,
    std::optional<double> mask_value,
    std::string_view strategy,
    std::optional<int64_t> live_count,
    std::optional<int64_t> live_end) {
  constexpr const char* op = "growop.masked_linear";
  const bool has_bias = bias_opt.has_value() && bias_opt->defined();
  checks::check_forward(
      op, input, weight, has_bias ? &*bias_opt : nullptr, active, width, mask_value);
  const at::Tensor live_mask = active.contiguous();
  const LiveRows live = live_rows(live_mask, width);
  check_hints_match_mask(op, width, live, live_count, live_end);
  const at::Tensor x = as_matrix(input);
  const int64_t batch = x.size(0);
  const Path path = choose_path(
      op, strategy, c10::DeviceType::CPU, width, live.count, batch * weight.size(1));

  // The result is allocated in its final shape and written through a 2-D view:
  // an operator must not return a view of a tensor it made.
  at::Tensor result = at::empty(with_last_dim(input.sizes(), width), x.options());
  at::Tensor out = as_matrix(result);
  if (batch == 0 || width == 0) {
    return result;
  }
  const double fill = dense::fill_value(weight.scalar_type(), mask_value);
  const at::Tensor bias = has_bias ? *bias_opt : at::Tensor();
  if (path == Path::kDense) {
    dense::forward(
        x, weight, bias, live_mask, live.end, fill, live.count < live.end, /*align_rows=*/false,
        out);
  } else {
    gather_forward(x.contiguous(), weight.contiguous(), has_bias ? bias.contiguous() : bias,
                   live_mask, fill, out);
  }
  return result;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_linear_backward_cpu(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const at::Tensor& weight,
    const at::Tensor& active,
    std::array<bool, 3> output_mask,
    std::string_view strategy,
    std::optional<int64_t> live_count,
    std::optional<int64_t> live_end) {
  constexpr const char* op = "growop.masked_linear_backward";
  const int64_t width = checks::check_backward(op, grad_output, input, weight, active);
  const int64_t capacity = weight.size(0);
  const at::Tensor live_mask = active.contiguous();
  const LiveRows live = live_rows(live_mask, width);
  check_hints_match_mask(op, width, live, live_count, live_end);
  const at::Tensor g = as_matrix(grad_output);
  const at::Tensor x = as_matrix(input);
  const Path path = choose_path(
      op, strategy, c10::DeviceType::CPU, width, live.count, x.size(0) * weight.size(1));
  if (path == Path::kDense) {
    auto [grad_input, grad_weight, grad_bias] =
        dense::backward_outputs(input, weight, output_mask);
    at::Tensor gi = output_mask[0] ? as_matrix(grad_input) : at::Tensor();
    at::Tensor gw = output_mask[1] ? grad_weight : at::Tensor();
    at::Tensor gb = output_mask[2] ? grad_bias : at::Tensor();
    dense::backward(
        g, x, weight, live_mask, live.end, live.count < live.end, /*align_rows=*/false, gi, gw,
        gb);
    return {grad_input, grad_weight, grad_bias};
  }
  // The gather kernels allocate their own weight-side gradients (see
  // gradient_buffer), so only what output_mask leaves out is made here.
  auto [grad_input, grad_weight, grad_bias] = dense::backward_outputs(
      input, weight, {output_mask[0], false, false});
  const at::Tensor g_rows = g.contiguous();
  if (output_mask[0]) {
    at::Tensor gi = as_matrix(grad_input);
    gather_backward_input(g_rows, weight.contiguous(), live_mask, gi);
  }
  if (output_mask[1]) {
    grad_weight = gather_backward_weight(g_rows, x.contiguous(), live_mask, capacity);
  }
  if (output_mask[2]) {
    grad_bias = gather_backward_bias(g_rows, live_mask, capacity);
  }
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(growop, CPU, m) {
  m.impl("masked_linear", &masked_linear_cpu);
  m.impl("masked_linear_backward", &masked_linear_backward_cpu);
}

}  // namespace growop
