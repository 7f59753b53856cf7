// The linear cross-entropy kernels: ATen ops only, so the same code runs on
// the CPU and on CUDA (registered for both at the end of this file).
//
// The softmax runs over K classes, the live rows below `width` (restricted to
// `classes` when given), and the (tokens, K) logits are never made: tokens are
// taken a chunk at a time, and a chunk's logits are computed class piece by
// class piece into one (chunk, K) buffer. A piece is a run of consecutive rows,
// multiplied in place through a view of the weight, or a block of rows
// gathered into a scratch (all of them once per call where they fit in a
// chunk's memory, else a block at a time); dead rows and capacity slack never
// enter a product. Per chunk, the buffer becomes the softmax (log-sum-exp in
// float32 for bfloat16/float16 input) and, when gradients are wanted, the
// gradient of the logits in place, which the same pieces multiply into
// grad_input, the weight gradient's rows and the bias gradient's: the three GEMMs of
// nn.Linear + F.cross_entropy, with extra memory bounded by a chunk. Every
// term of a chunk's gradient (softmax, one-hot, label smoothing's uniform
// part) is combined in the float32 buffer before it is rounded to a
// bfloat16/float16 product's operand, as F.cross_entropy under autocast does.
//
// On the CPU the mask, the classes and the targets are read on the host; a
// bad target is an IndexError naming it. CUDA reads nothing on the host: the
// classes' count comes from the caller (live_count, or the length of
// classes), and the checks are device-side asserts. Plan::kAsCuda makes the
// CPU take CUDA's way too (through the test-only bindings of
// csrc/python/testing.cpp), so the tests run it where no GPU is.
#include "linear_cross_entropy_kernel.h"

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "../ops/linear_cross_entropy.h"
#include "../packed.h"

namespace growop::loss {
namespace {

using at::Tensor;

constexpr const char* kOp = "growop.linear_cross_entropy";

// Tokens per chunk, when the caller leaves it to the op: the chunk's logits
// hold about kChunkAspect times the input's elements (so the extra memory
// scales with the input, not with tokens x classes), and a problem whose
// logits stay under kSingleChunkElements is one chunk. Every chunk streams the
// weight and its gradient through its GEMMs once, and gathers a fragmented
// mask's rows twice, so a chunk has at least kMinChunkTokens tokens: measured
// on the CPU at (2048, 1024 -> 32000), a forward GEMM of 128-token chunks took
// 1.3x the time of one over all tokens, one of 512 or more the same time; the
// gathers' share halves again from 512 to 1024.
constexpr int64_t kChunkAspect = 2;
constexpr int64_t kSingleChunkElements = int64_t{1} << 22;
constexpr int64_t kMinChunkTokens = 1024;
// A run of consecutive rows at least this long is multiplied in place;
// shorter runs are gathered (the CPU masked_linear kernel's threshold).
constexpr int64_t kMinDirectRun = 64;
// A gathered piece is about this many bytes of weight rows: few pieces, so few
// and large GEMMs, while a piece stays in the CPU's last-level cache between
// its gather and its GEMMs.
constexpr int64_t kCpuGatherBytes = int64_t{16} << 20;
constexpr int64_t kCudaGatherBytes = int64_t{64} << 20;

enum class Reduction { kNone, kMean, kSum };

Reduction parse_reduction(std::string_view reduction) {
  if (reduction == "mean") {
    return Reduction::kMean;
  }
  if (reduction == "sum") {
    return Reduction::kSum;
  }
  TORCH_CHECK_VALUE(
      reduction == "none",
      kOp, ": reduction must be 'none', 'mean' or 'sum', got '", reduction, "'");
  return Reduction::kNone;
}

// Columns [column, column + count) of a chunk's logits: weight rows
// [slot, slot + count) when `rows` is undefined, else the rows `rows` lists,
// gathered (their weight gradient accumulates at row `packed` of the packed
// gradient, which is copied to its rows at the end).
struct Piece {
  int64_t column = 0;
  int64_t count = 0;
  int64_t slot = 0;
  Tensor rows;
  int64_t packed = 0;

  bool gathered() const {
    return rows.defined();
  }
};

// The classes of the softmax, as the chunks see them.
struct Softmax {
  int64_t columns = 0;        // K: columns of a logits chunk
  std::vector<Piece> pieces;  // in column order, covering [0, columns)
  // (K,) int64: each column's slot, ascending; undefined where column j is slot j.
  Tensor slots;
  // (width,) int64: each slot's column, -1 outside the softmax; undefined where
  // column j is slot j.
  Tensor position;
  // (width,) bool: the columns in the softmax, where the pieces also cover dead
  // rows (CUDA without a live count); undefined otherwise.
  Tensor column_mask;
  Tensor gathered_slots;  // (G,) int64: the gathered pieces' slots, in packed order
  int64_t gathered = 0;   // G
};

int64_t gather_block_rows(const Tensor& weight, int64_t chunk_classes) {
  if (chunk_classes > 0) {
    return chunk_classes;
  }
  const int64_t bytes = weight.is_cuda() ? kCudaGatherBytes : kCpuGatherBytes;
  const int64_t row_bytes = std::max<int64_t>(1, weight.size(1) * weight.element_size());
  return std::clamp<int64_t>(bytes / row_bytes, 64, 65536);
}

// View pieces over slots [first, first + count), each at most `block` columns.
void add_view_pieces(Softmax& s, int64_t first, int64_t count, int64_t block) {
  for (int64_t done = 0; done < count; done += block) {
    Piece piece;
    piece.column = s.columns;
    piece.count = std::min(block, count - done);
    piece.slot = first + done;
    s.columns += piece.count;
    s.pieces.push_back(std::move(piece));
  }
}

// Gathered pieces over `slots` (a (G,) int64 tensor, ascending), `block` rows each.
void add_gathered_pieces(Softmax& s, const Tensor& slots, int64_t block) {
  const int64_t count = slots.size(0);
  for (int64_t done = 0; done < count; done += block) {
    Piece piece;
    piece.column = s.columns;
    piece.count = std::min(block, count - done);
    piece.rows = slots.narrow(0, done, piece.count);
    piece.packed = s.gathered + done;
    s.columns += piece.count;
    s.pieces.push_back(std::move(piece));
  }
  s.gathered += count;
}

// The classes' slots, ascending, read on the host: `classes` checked (in
// range, live, each once) or, without it, the live rows below width.
std::vector<int64_t> host_slots(
    const Tensor& active, int64_t width, const std::optional<Tensor>& classes) {
  const Tensor mask = active.contiguous();
  const bool* live = mask.const_data_ptr<bool>();
  std::vector<int64_t> slots;
  if (!classes.has_value()) {
    for (int64_t j = 0; j < width; ++j) {
      if (live[j]) {
        slots.push_back(j);
      }
    }
    return slots;
  }
  const Tensor listed = classes->to(at::kLong).contiguous();
  const int64_t* values = listed.const_data_ptr<int64_t>();
  slots.assign(values, values + listed.numel());
  for (const int64_t slot : slots) {
    TORCH_CHECK_INDEX(
        slot >= 0 && slot < width,
        kOp, ": classes holds ", slot, ", out of range: slots are [0, ", width, ")");
    TORCH_CHECK_VALUE(
        live[slot],
        kOp, ": classes holds slot ", slot, ", which is not live (deactivated, or "
        "not grown yet); leave it out of classes or reactivate it");
  }
  std::sort(slots.begin(), slots.end());
  const auto repeated = std::adjacent_find(slots.begin(), slots.end());
  TORCH_CHECK_VALUE(
      repeated == slots.end(),
      kOp, ": classes holds slot ", repeated == slots.end() ? 0 : *repeated,
      " more than once; each class enters the softmax once");
  return slots;
}

// Pieces from slots known on the host: runs of at least kMinDirectRun
// consecutive slots in place, the rest gathered.
Softmax plan_on_host(
    const std::vector<int64_t>& slots, int64_t width, int64_t view_block,
    int64_t gather_block) {
  Softmax s;
  std::vector<int64_t> pending;  // short runs' slots, gathered next
  std::vector<int64_t> gathered;
  const auto flush = [&] {
    if (pending.empty()) {
      return;
    }
    const Tensor rows = at::tensor(pending, at::kLong);
    add_gathered_pieces(s, rows, gather_block);
    gathered.insert(gathered.end(), pending.begin(), pending.end());
    pending.clear();
  };
  const int64_t count = static_cast<int64_t>(slots.size());
  for (int64_t i = 0; i < count;) {
    int64_t j = i + 1;
    while (j < count && slots[j] == slots[i] + (j - i)) {
      ++j;
    }
    if (j - i >= kMinDirectRun) {
      flush();
      add_view_pieces(s, slots[i], j - i, view_block);
    } else {
      pending.insert(pending.end(), slots.begin() + i, slots.begin() + j);
    }
    i = j;
  }
  flush();
  s.gathered_slots = at::tensor(gathered, at::kLong);
  if (count != width || s.gathered > 0) {
    std::vector<int64_t> position(width, -1);
    for (int64_t k = 0; k < count; ++k) {
      position[slots[k]] = k;
    }
    s.slots = at::tensor(slots, at::kLong);
    s.position = at::tensor(position, at::kLong);
  }
  return s;
}

// Pieces on a device whose memory the host does not read (CUDA): from the
// caller's live count, or from classes, checked on the device.
Softmax plan_on_device(
    const Tensor& active, int64_t width, const std::optional<Tensor>& classes,
    std::optional<int64_t> live_count, int64_t view_block, int64_t gather_block) {
  Softmax s;
  const Tensor mask = active.narrow(0, 0, width);
  Tensor slots;
  if (classes.has_value()) {
    const Tensor listed = classes->to(at::kLong);
    slots = std::get<0>(at::sort(listed));
    // Literal messages: nothing is formatted on the success path.
    at::_assert_async(
        slots.ge(0).logical_and(slots.lt(width)).all(),
        "growop.linear_cross_entropy: classes holds a slot out of range [0, width)");
    const Tensor in_range = slots.clamp(0, std::max<int64_t>(width - 1, 0));
    at::_assert_async(
        width == 0 || listed.numel() == 0 ? at::ones({}, mask.options())
                                          : mask.index_select(0, in_range).all(),
        "growop.linear_cross_entropy: classes holds a slot that is not live");
    if (slots.size(0) > 1) {
      at::_assert_async(
          slots.narrow(0, 1, slots.size(0) - 1).ne(slots.narrow(0, 0, slots.size(0) - 1)).all(),
          "growop.linear_cross_entropy: classes holds a slot more than once");
    }
    slots = in_range;
  } else if (live_count.has_value() && *live_count == width) {
    at::_assert_async(
        mask.all(), "growop: live_count is not the number of live rows below width");
    add_view_pieces(s, 0, width, view_block);
    return s;
  } else if (live_count.has_value()) {
    slots = packed::layout(active, width, *live_count).rows;
  } else {
    add_view_pieces(s, 0, width, view_block);
    s.column_mask = mask;
    return s;
  }
  add_gathered_pieces(s, slots, gather_block);
  s.slots = slots;
  s.gathered_slots = slots;
  s.position = at::full({width}, -1, slots.options())
                   .index_put_({slots}, at::arange(slots.size(0), slots.options()));
  return s;
}

// Everything a chunk loop reads, prepared once per call.
struct Problem {
  Tensor x;       // (N, in)
  Tensor weight;  // (capacity, in)
  Tensor bias;    // (capacity,) or undefined
  Softmax softmax;
  at::ScalarType acc = at::kFloat;  // the softmax statistics' dtype
  double smoothing = 0;
  int64_t chunk = 1;  // tokens per chunk
  Tensor keep;        // (N,) bool: the token's target is not ignore_index
  Tensor column;      // (N,) int64: the target's column (0 where ignored)
  Tensor target_weight;  // (N,) acc: the target's class weight, 0 where ignored
  Tensor class_weight;   // (K,) acc: each column's class weight, 0 outside the softmax
  Tensor weight_sum;     // () acc: sum of class_weight
  Tensor per_class;      // () acc: smoothing / (classes in the softmax), 0 if none
  Tensor column_bias;    // (K,) acc: each column's bias, or undefined
  // Gathered weight rows: every gathered piece's, in packed order, gathered once
  // per call (`resident`), or one piece's at a time, gathered as it is used.
  Tensor scratch;
  bool resident = false;
  const Piece* scratch_holds = nullptr;  // the piece whose rows the scratch holds

  bool low_precision() const {
    return x.scalar_type() != acc;
  }

  // The weight rows of `piece` (a view, or gathered into the scratch).
  Tensor piece_weight(const Piece& piece) {
    if (!piece.gathered()) {
      return weight.narrow(0, piece.slot, piece.count);
    }
    if (resident) {
      return scratch.narrow(0, piece.packed, piece.count);
    }
    Tensor rows = scratch.narrow(0, 0, piece.count);
    if (scratch_holds != &piece) {
      at::index_select_out(rows, weight, 0, piece.rows);
      scratch_holds = &piece;
    }
    return rows;
  }

};

// The outputs of a call, each defined where it is wanted.
struct Outputs {
  Tensor per_token;    // acc, in the target's shape
  Tensor losses;       // (N,) a view of per_token
  Tensor lse;          // (N,) acc
  Tensor grad_input;   // (N, in), a view of the returned tensor
  Tensor grad_weight;  // (capacity, in), zero
  Tensor grad_bias;    // (capacity,), zero
  Tensor packed_weight;  // (G, in): the gathered rows' weight gradient
  Tensor column_bias;    // (K,) acc: each column's bias gradient
};

// The target's slot, checked on the host: in range, live, in the softmax.
void check_targets_on_host(
    const Tensor& target, const Tensor& active, const Softmax& s, int64_t width,
    int64_t ignore_index, bool classes_given) {
  const Tensor t = target.contiguous();
  const int64_t* values = t.const_data_ptr<int64_t>();
  const Tensor mask = active.contiguous();
  const bool* live = mask.const_data_ptr<bool>();
  const int64_t* position = s.position.defined() ? s.position.const_data_ptr<int64_t>() : nullptr;
  for (int64_t i = 0; i < t.numel(); ++i) {
    const int64_t slot = values[i];
    if (slot == ignore_index) {
      continue;
    }
    TORCH_CHECK_INDEX(
        slot >= 0 && slot < width,
        kOp, ": target ", slot, " (at flat index ", i, ") is out of range: the "
        "classes are slots [0, ", width, "), and ignore_index is ", ignore_index);
    TORCH_CHECK_INDEX(
        live[slot],
        kOp, ": target ", slot, " (at flat index ", i, ") is not a live class "
        "(deactivated, or not grown yet); reactivate it or set the target to "
        "ignore_index (", ignore_index, ")");
    TORCH_CHECK_INDEX(
        !classes_given || position == nullptr || position[slot] >= 0,
        kOp, ": target ", slot, " (at flat index ", i, ") is not in classes; "
        "include it in classes or set the target to ignore_index (", ignore_index, ")");
  }
}

Tensor in_softmax_on_device(const Tensor& slot, const Softmax& s, const Tensor& active, int64_t width) {
  const Tensor clamped = slot.clamp(0, std::max<int64_t>(width - 1, 0));
  if (s.position.defined()) {
    return s.position.index_select(0, clamped).ge(0);
  }
  return active.index_select(0, clamped);
}

// Runs the chunks. Without `lse_in` (a forward) each token's log-sum-exp and
// loss are computed into out.lse and out.losses; with it (a backward) the
// softmax comes from it. `scale` (N,) acc, where defined, is each token's
// factor on its gradient (0 for an ignored token), and the gradients
// accumulate into the defined gradient outputs.
void run_chunks(Problem& p, const Tensor& lse_in, const Tensor& scale, Outputs& out) {
  const Softmax& s = p.softmax;
  const int64_t tokens = p.x.size(0);
  const int64_t columns = s.columns;
  const bool grads = scale.defined();
  const bool smoothing = p.smoothing > 0;
  const auto options = p.x.options();
  Tensor buffer = at::empty({std::min(p.chunk, tokens), columns}, options);
  Tensor statistics = p.low_precision() ? at::empty(buffer.sizes(), options.dtype(p.acc)) : buffer;
  const double one_hot = 1.0 - p.smoothing;
  // The token's share of its softmax: (1 - eps) w_t + eps / K sum_c w_c.
  const Tensor softmax_share =
      p.target_weight.mul(one_hot).add_(p.per_class.mul(p.weight_sum)).mul_(p.keep);
  for (int64_t start = 0; start < tokens; start += p.chunk) {
    const int64_t n = std::min(p.chunk, tokens - start);
    const Tensor xc = p.x.narrow(0, start, n);
    Tensor z = buffer.narrow(0, 0, n);
    for (const Piece& piece : s.pieces) {
      Tensor block = z.narrow(1, piece.column, piece.count);
      at::mm_out(block, xc, p.piece_weight(piece).t());
    }
    // The bias, in one pass for every piece; for bfloat16/float16, added in float32
    // as the products become the softmax's float32 logits.
    Tensor f = p.low_precision() ? statistics.narrow(0, 0, n) : z;
    if (p.column_bias.defined()) {
      at::add_out(f, z, p.column_bias);
    } else if (p.low_precision()) {
      f.copy_(z);
    }
    // sum_c w_c z_c, before the columns outside the softmax (weight 0) are masked.
    const Tensor weighted = smoothing && !lse_in.defined() ? at::mv(f, p.class_weight) : Tensor();
    if (s.column_mask.defined()) {
      f.masked_fill_(s.column_mask.logical_not(), -std::numeric_limits<double>::infinity());
    }
    const Tensor column = p.column.narrow(0, start, n);
    Tensor row_factor;  // what the exponentials are multiplied by to be the gradient's softmax part
    if (!lse_in.defined()) {
      const Tensor target_logit = f.gather(1, column.unsqueeze(1)).squeeze(1);
      Tensor row_max = f.amax(1);
      // A row with no finite logit (no class in the softmax) keeps exp = 0.
      row_max.masked_fill_(row_max.eq(-std::numeric_limits<double>::infinity()), 0);
      f.sub_(row_max.unsqueeze(1)).exp_();
      const Tensor sum = f.sum(1);
      const Tensor lse = sum.log().add_(row_max);
      out.lse.narrow(0, start, n).copy_(lse);
      const Tensor tw = p.target_weight.narrow(0, start, n);
      Tensor loss = lse.sub(target_logit).mul_(tw).mul_(one_hot);
      if (smoothing) {  // eps / K * sum_c w_c (lse - z_c)
        loss.add_(lse.mul(p.weight_sum).sub_(weighted).mul_(p.per_class));
      }
      const Tensor keep = p.keep.narrow(0, start, n);
      out.losses.narrow(0, start, n).copy_(at::where(keep, loss, at::zeros({}, loss.options())));
      if (grads) {
        row_factor = at::where(sum.gt(0), softmax_share.narrow(0, start, n) / sum, 0)
                         .mul_(scale.narrow(0, start, n));
      }
    } else {
      f.sub_(lse_in.narrow(0, start, n).unsqueeze(1)).exp_();
      row_factor = softmax_share.narrow(0, start, n).mul(scale.narrow(0, start, n));
    }
    if (!grads) {
      continue;
    }
    // f := the gradient of the loss in the chunk's logits: the softmax part,
    // the one-hot part, and smoothing's uniform part, -scale eps / K w_c.
    const Tensor sc = scale.narrow(0, start, n);
    f.mul_(row_factor.unsqueeze(1));
    f.scatter_add_(
        1, column.unsqueeze(1),
        p.target_weight.narrow(0, start, n).mul(sc).mul_(-one_hot).unsqueeze(1));
    if (smoothing) {
      f.addr_(sc.mul(p.per_class), p.class_weight, 1, -1);
    }
    if (out.column_bias.defined()) {  // summed over the chunk's tokens, for every piece at once
      out.column_bias.add_(at::mv(f.t(), at::ones({n}, f.options())));
    }
    const Tensor g = p.low_precision() ? z.copy_(f) : f;
    Tensor gi = out.grad_input.defined() ? out.grad_input.narrow(0, start, n) : Tensor();
    bool first = true;
    // Last piece first: a scratch of one piece still holds its gathered rows.
    for (auto it = s.pieces.rbegin(); it != s.pieces.rend(); ++it) {
      const Piece& piece = *it;
      const Tensor gp = g.narrow(1, piece.column, piece.count);
      if (gi.defined()) {
        const Tensor w = p.piece_weight(piece);
        if (first) {
          at::mm_out(gi, gp, w);
        } else {
          gi.addmm_(gp, w);
        }
      }
      first = false;
      if (out.grad_weight.defined()) {
        Tensor rows = piece.gathered() ? out.packed_weight.narrow(0, piece.packed, piece.count)
                                       : out.grad_weight.narrow(0, piece.slot, piece.count);
        rows.addmm_(gp.t(), xc);
      }
    }
    if (gi.defined() && first) {
      gi.zero_();
    }
  }
}

// The gathered rows' packed weight gradient and the columns' bias gradient,
// copied to their rows.
void spread_row_gradients(const Problem& p, Outputs& out) {
  const Softmax& s = p.softmax;
  if (s.gathered > 0 && out.grad_weight.defined()) {
    out.grad_weight.index_copy_(0, s.gathered_slots, out.packed_weight);
  }
  if (out.grad_bias.defined()) {
    const Tensor columns = out.column_bias.to(out.grad_bias.scalar_type());
    if (s.slots.defined()) {
      out.grad_bias.index_copy_(0, s.slots, columns);
    } else {
      out.grad_bias.narrow(0, 0, s.columns).copy_(columns);
    }
  }
}

struct Arguments {
  const Tensor& input;
  const Tensor& weight;
  const std::optional<Tensor>& bias;
  const Tensor& active;
  const Tensor& target;
  int64_t width;
  const std::optional<Tensor>& classes;
  const std::optional<Tensor>& class_weight;
  int64_t ignore_index;
  Reduction reduction;
  double label_smoothing;
  c10::IntArrayRef chunk_size;
  std::optional<int64_t> live_count;
  Plan plan;

  // Whether the mask, the classes and the targets may be read on the host.
  bool reads_on_host() const {
    return weight.is_cpu() && plan == Plan::kByDevice;
  }
};

at::ScalarType accumulation_dtype(at::ScalarType dtype) {
  return dtype == at::kBFloat16 || dtype == at::kHalf ? at::kFloat : dtype;
}

void check_arguments(const Arguments& a) {
  const bool has_bias = a.bias.has_value() && a.bias->defined();
  checks::check_forward(
      kOp, a.input, a.weight, has_bias ? &*a.bias : nullptr, a.active, a.width, std::nullopt);
  TORCH_CHECK(
      a.target.device() == a.weight.device(),
      kOp, ": target is on ", a.target.device(), " but weight is on ", a.weight.device());
  TORCH_CHECK(
      a.target.scalar_type() == at::kLong,
      kOp, ": target must hold class indices as int64, got ", a.target.scalar_type());
  TORCH_CHECK(
      a.target.sizes() == a.input.sizes().slice(0, a.input.dim() - 1),
      kOp, ": target of shape ", a.target.sizes(), " does not match input of shape ",
      a.input.sizes(), " (target must be input's shape without its last dimension)");
  TORCH_CHECK_VALUE(
      a.label_smoothing >= 0.0 && a.label_smoothing <= 1.0,
      kOp, ": label_smoothing must be in [0, 1], got ", a.label_smoothing);
  TORCH_CHECK(
      a.chunk_size.size() == 2 && a.chunk_size[0] >= 0 && a.chunk_size[1] >= 0,
      kOp, ": chunk_size must be [tokens, classes], each >= 0 (0: chosen per call), got ",
      a.chunk_size);
  if (a.classes.has_value()) {
    const Tensor& c = *a.classes;
    TORCH_CHECK(
        c.dim() == 1 && at::isIntegralType(c.scalar_type(), /*includeBool=*/false),
        kOp, ": classes must be a 1-D integer tensor of slots, got ", c.scalar_type(),
        " of shape ", c.sizes());
    TORCH_CHECK(
        c.device() == a.weight.device(),
        kOp, ": classes is on ", c.device(), " but weight is on ", a.weight.device());
  }
  if (a.class_weight.has_value()) {
    const Tensor& w = *a.class_weight;
    TORCH_CHECK(
        w.dim() == 1 && w.size(0) == a.width && at::isFloatingType(w.scalar_type()),
        kOp, ": class_weight must be a floating tensor of shape (", a.width,
        ",), one weight per slot, got ", w.scalar_type(), " of shape ", w.sizes());
    TORCH_CHECK(
        w.device() == a.weight.device(),
        kOp, ": class_weight is on ", w.device(), " but weight is on ", a.weight.device());
  }
}

// Everything but the chunks: the softmax's classes, the checks, and the
// per-token factors.
Problem prepare(const Arguments& a) {
  Problem p;
  p.x = a.input.reshape({-1, a.input.size(-1)}).contiguous();
  p.weight = a.weight.contiguous();
  if (a.bias.has_value() && a.bias->defined()) {
    p.bias = a.bias->contiguous();
  }
  p.acc = accumulation_dtype(a.weight.scalar_type());
  p.smoothing = a.label_smoothing;
  const int64_t tokens = p.x.size(0);
  const int64_t gather_block = gather_block_rows(p.weight, a.chunk_size[1]);
  const int64_t view_block =
      a.chunk_size[1] > 0 ? a.chunk_size[1] : std::numeric_limits<int64_t>::max();
  const Tensor target = a.target.reshape({-1});
  const bool on_host = a.reads_on_host();
  if (on_host) {
    p.softmax = plan_on_host(host_slots(a.active, a.width, a.classes), a.width, view_block, gather_block);
    check_targets_on_host(target, a.active, p.softmax, a.width, a.ignore_index, a.classes.has_value());
  } else {
    p.softmax = plan_on_device(a.active, a.width, a.classes, a.live_count, view_block, gather_block);
  }
  Softmax& s = p.softmax;
  const auto index_options = target.options();
  const auto acc_options = p.x.options().dtype(p.acc);
  p.keep = target.ne(a.ignore_index);
  if (!on_host && target.numel() > 0) {
    Tensor valid = target.ge(0).logical_and(target.lt(a.width));
    if (a.width > 0) {
      valid.logical_and_(in_softmax_on_device(target, s, a.active, a.width));
    }
    at::_assert_async(
        p.keep.logical_not().logical_or(valid).all(),
        "growop.linear_cross_entropy: a target is out of range, not live, or not in classes");
  }
  if (s.columns == 0) {
    p.column = at::zeros({tokens}, index_options);
  } else {
    const Tensor slot = at::where(p.keep, target, 0).clamp_(0, a.width - 1);
    p.column = s.position.defined() ? s.position.index_select(0, slot).clamp_min_(0) : slot;
  }
  // Each column's class weight.
  if (a.class_weight.has_value()) {
    const Tensor w = a.class_weight->to(p.acc);
    p.class_weight = s.slots.defined() ? w.index_select(0, s.slots) : w.narrow(0, 0, s.columns);
  } else {
    p.class_weight = at::ones({s.columns}, acc_options);
  }
  Tensor classes_in_softmax;
  if (s.column_mask.defined()) {
    p.class_weight = p.class_weight.mul(s.column_mask);
    classes_in_softmax = s.column_mask.sum().to(p.acc);
  } else {
    classes_in_softmax = at::scalar_tensor(static_cast<double>(s.columns), acc_options);
  }
  p.weight_sum = p.class_weight.sum();
  p.per_class = at::where(
      classes_in_softmax.gt(0), classes_in_softmax.reciprocal().mul_(p.smoothing), 0);
  p.target_weight = s.columns > 0
      ? at::where(p.keep, p.class_weight.index_select(0, p.column), 0)
      : at::zeros({tokens}, acc_options);
  if (a.chunk_size[0] > 0) {
    p.chunk = a.chunk_size[0];
  } else {
    const int64_t elements = std::max(
        kSingleChunkElements, kChunkAspect * tokens * std::max<int64_t>(p.x.size(1), 1));
    p.chunk = std::max(kMinChunkTokens, elements / std::max<int64_t>(s.columns, 1));
  }
  p.chunk = std::max<int64_t>(1, std::min(p.chunk, std::max<int64_t>(tokens, 1)));
  if (p.bias.defined()) {
    p.column_bias = (s.slots.defined() ? p.bias.index_select(0, s.slots) : p.bias.narrow(0, 0, s.columns))
                        .to(p.acc);
  }
  int64_t gathered_rows = 0;
  for (const Piece& piece : s.pieces) {
    if (piece.gathered()) {
      gathered_rows = std::max(gathered_rows, piece.count);
    }
  }
  // Every gathered row once per call, instead of each piece twice per chunk (its
  // logits, then the input's gradient), where they take no more memory than a
  // chunk's logits: the extra memory stays bounded by a chunk.
  p.resident = s.gathered > 0 &&
      s.gathered * p.x.size(1) <= std::min(p.chunk, tokens) * s.columns;
  if (p.resident) {
    p.scratch = p.weight.index_select(0, s.gathered_slots);
  } else {
    p.scratch = at::empty({gathered_rows, p.x.size(1)}, p.weight.options());
  }
  return p;
}

// The denominator of 'mean': the class weights of the targets not ignored.
Tensor mean_denominator(const Problem& p) {
  return p.target_weight.sum();
}

// Each token's factor on its gradient for a reduced loss with gradient 1
// ('mean': 1 / denominator, 'sum' and 'none': 1), 0 where ignored.
Tensor unit_scale(const Problem& p, Reduction reduction) {
  const Tensor keep = p.keep.to(p.acc);
  if (reduction == Reduction::kMean) {
    return keep.div(mean_denominator(p)).nan_to_num_(0, 0, 0);
  }
  return keep;
}

// The outputs, allocated; the per-token losses (with_losses) in the target's
// shape, `losses` a flat view of them.
Outputs allocate_outputs(
    const Arguments& a, const Problem& p, std::array<bool, 3> output_mask, bool with_losses) {
  Outputs out;
  const int64_t tokens = p.x.size(0);
  const auto acc_options = p.x.options().dtype(p.acc);
  if (with_losses) {
    out.per_token = at::empty(a.target.sizes(), acc_options);
    out.losses = out.per_token.view({-1});
    out.lse = at::empty({tokens}, acc_options);
  }
  const auto options = a.weight.options();
  const int64_t capacity = a.weight.size(0);
  const int64_t gathered = p.softmax.gathered;
  if (output_mask[0]) {
    out.grad_input = at::empty(a.input.sizes(), options);
  }
  if (output_mask[1]) {
    out.grad_weight = at::zeros({capacity, a.weight.size(1)}, options);
    out.packed_weight = at::zeros({gathered, a.weight.size(1)}, options);
  }
  if (output_mask[2] && a.bias.has_value() && a.bias->defined()) {
    out.grad_bias = at::zeros({capacity}, options);
    out.column_bias = at::zeros({p.softmax.columns}, options.dtype(p.acc));
  }
  return out;
}

// A gradient output as returned: the tensor, or an empty one where not asked for.
Tensor returned(const Tensor& t, const Tensor& like) {
  return t.defined() ? t : at::empty({0}, like.options());
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> forward(
    const Arguments& a, std::array<bool, 3> output_mask) {
  check_arguments(a);
  c10::OptionalDeviceGuard guard(a.weight.device());
  const bool grads = output_mask[0] || output_mask[1] || output_mask[2];
  Problem p = prepare(a);
  Outputs out = allocate_outputs(a, p, output_mask, /*with_losses=*/true);
  const Tensor scale = grads ? unit_scale(p, a.reduction) : Tensor();
  Tensor grad_input_rows = out.grad_input;
  if (out.grad_input.defined()) {
    out.grad_input = out.grad_input.view({-1, a.input.size(-1)});
  }
  if (p.softmax.columns > 0 && p.x.size(0) > 0) {
    run_chunks(p, Tensor(), scale, out);
  } else {
    out.losses.zero_();
    out.lse.fill_(-std::numeric_limits<double>::infinity());
    if (out.grad_input.defined()) {
      out.grad_input.zero_();
    }
  }
  if (grads) {
    spread_row_gradients(p, out);
  }
  Tensor loss;
  switch (a.reduction) {
    case Reduction::kNone:
      loss = out.per_token;
      break;
    case Reduction::kSum:
      loss = out.losses.sum();
      break;
    case Reduction::kMean:
      loss = out.losses.sum().div_(mean_denominator(p));
      break;
  }
  return {loss, out.lse, returned(grad_input_rows, a.weight), returned(out.grad_weight, a.weight),
          returned(out.grad_bias, a.weight)};
}

std::tuple<Tensor, Tensor, Tensor> backward(
    const Arguments& a, const Tensor& grad_loss, const Tensor& lse,
    std::array<bool, 3> output_mask) {
  check_arguments(a);
  c10::OptionalDeviceGuard guard(a.weight.device());
  const int64_t tokens = a.target.numel();
  const at::ScalarType acc = accumulation_dtype(a.weight.scalar_type());
  TORCH_CHECK(
      lse.dim() == 1 && lse.size(0) == tokens && lse.scalar_type() == acc &&
          lse.device() == a.weight.device(),
      kOp, ": lse must be the forward's (", tokens, ",) ", acc, " log-sum-exps, got ",
      lse.scalar_type(), " of shape ", lse.sizes());
  const auto expected = a.reduction == Reduction::kNone ? a.target.sizes() : c10::IntArrayRef{};
  TORCH_CHECK(
      grad_loss.sizes() == expected && grad_loss.device() == a.weight.device(),
      kOp, ": grad_loss must have the loss's shape ", expected, ", got ", grad_loss.sizes());
  Problem p = prepare(a);
  Outputs out = allocate_outputs(a, p, output_mask, /*with_losses=*/false);
  Tensor grad_input_rows = out.grad_input;
  if (out.grad_input.defined()) {
    out.grad_input = out.grad_input.view({-1, a.input.size(-1)});
  }
  const Tensor g = grad_loss.to(acc);
  const Tensor scale = a.reduction == Reduction::kNone
      ? at::where(p.keep, g.reshape({-1}), 0)
      : unit_scale(p, a.reduction).mul_(g);
  if (p.softmax.columns > 0 && tokens > 0) {
    // Where lse is -inf (a token with no class in the softmax, always ignored),
    // 0 keeps its exponentials 0 instead of NaN.
    run_chunks(p, lse.masked_fill(lse.isinf(), 0), scale, out);
  } else if (out.grad_input.defined()) {
    out.grad_input.zero_();
  }
  spread_row_gradients(p, out);
  return {returned(grad_input_rows, a.weight), returned(out.grad_weight, a.weight),
          returned(out.grad_bias, a.weight)};
}

Arguments arguments(
    const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
    const Tensor& active, const Tensor& target, int64_t width, const ops::LossOptions& o,
    Plan plan) {
  return {input, weight, bias, active, target, width, o.classes, o.class_weight,
          o.ignore_index, parse_reduction(o.reduction), o.label_smoothing, o.chunk_size,
          o.live_count, plan};
}

Tensor linear_cross_entropy_kernel(
    const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
    const Tensor& active, const Tensor& target, int64_t width,
    const std::optional<Tensor>& classes, const std::optional<Tensor>& class_weight,
    int64_t ignore_index, c10::string_view reduction, double label_smoothing,
    c10::IntArrayRef chunk_size, std::optional<int64_t> live_count) {
  const ops::LossOptions o = ops::loss_options(
      classes, class_weight, ignore_index, reduction, label_smoothing, chunk_size, live_count);
  return std::get<0>(forward(
      arguments(input, weight, bias, active, target, width, o, Plan::kByDevice),
      {false, false, false}));
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> linear_cross_entropy_forward_kernel(
    const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
    const Tensor& active, const Tensor& target, int64_t width,
    const std::optional<Tensor>& classes, const std::optional<Tensor>& class_weight,
    int64_t ignore_index, c10::string_view reduction, double label_smoothing,
    c10::IntArrayRef chunk_size, std::optional<int64_t> live_count,
    std::array<bool, 3> output_mask) {
  const ops::LossOptions o = ops::loss_options(
      classes, class_weight, ignore_index, reduction, label_smoothing, chunk_size, live_count);
  return forward(
      arguments(input, weight, bias, active, target, width, o, Plan::kByDevice), output_mask);
}

std::tuple<Tensor, Tensor, Tensor> linear_cross_entropy_backward_kernel(
    const Tensor& grad_loss, const Tensor& input, const Tensor& weight,
    const std::optional<Tensor>& bias, const Tensor& active, const Tensor& target,
    const Tensor& lse, int64_t width, const std::optional<Tensor>& classes,
    const std::optional<Tensor>& class_weight, int64_t ignore_index,
    c10::string_view reduction, double label_smoothing, c10::IntArrayRef chunk_size,
    std::optional<int64_t> live_count, std::array<bool, 3> output_mask) {
  const ops::LossOptions o = ops::loss_options(
      classes, class_weight, ignore_index, reduction, label_smoothing, chunk_size, live_count);
  return backward(
      arguments(input, weight, bias, active, target, width, o, Plan::kByDevice), grad_loss, lse,
      output_mask);
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> forward(
    const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
    const Tensor& active, const Tensor& target, int64_t width, const ops::LossOptions& options,
    std::array<bool, 3> output_mask, Plan plan) {
  return forward(arguments(input, weight, bias, active, target, width, options, plan), output_mask);
}

std::tuple<Tensor, Tensor, Tensor> backward(
    const Tensor& grad_loss, const Tensor& input, const Tensor& weight,
    const std::optional<Tensor>& bias, const Tensor& active, const Tensor& target,
    const Tensor& lse, int64_t width, const ops::LossOptions& options,
    std::array<bool, 3> output_mask, Plan plan) {
  return backward(
      arguments(input, weight, bias, active, target, width, options, plan), grad_loss, lse,
      output_mask);
}

TORCH_LIBRARY_IMPL(growop, CPU, m) {
  m.impl("linear_cross_entropy", &linear_cross_entropy_kernel);
  m.impl("_linear_cross_entropy_forward", &linear_cross_entropy_forward_kernel);
  m.impl("_linear_cross_entropy_backward", &linear_cross_entropy_backward_kernel);
}

TORCH_LIBRARY_IMPL(growop, CUDA, m) {
  m.impl("linear_cross_entropy", &linear_cross_entropy_kernel);
  m.impl("_linear_cross_entropy_forward", &linear_cross_entropy_forward_kernel);
  m.impl("_linear_cross_entropy_backward", &linear_cross_entropy_backward_kernel);
}

}  // namespace growop::loss
