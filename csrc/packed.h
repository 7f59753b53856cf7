// The gather strategy as library GEMMs over packed live rows: the live rows
// of the weight copied into one dense block, the products done by the
// device's GEMM library on that block, and the results spread back into the
// masked layout. It does only the live rows' arithmetic, at the library's
// speed, for the price of a few passes over memory, each one gather that
// writes its output once: the packed weight (live x in), the output
// (batch x width), and in the backward the live columns of grad_output and
// the weight gradient's rows.
//
// ATen ops only, no device code and no host sync: the same code runs on any
// device (CUDA's glue calls it; the extension's test-only submodule,
// csrc/python/testing.cpp, runs it on the CPU for tests). The live count
// must be known on the host, since it sizes the packed block; the device
// checks it against the mask (a wrong count is an error on the CPU and a
// device-side assert on CUDA, never a wrong result).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "dense.h"

namespace growop::packed {

// Where each row below `width` goes in the packed block.
struct Layout {
  int64_t live = 0;  // the live rows below width, the caller's count
  at::Tensor rows;   // (live,) int64: the live rows, ascending
  // (width,) int64: row j's column in the packed block if row j is live, else
  // `live`: the packed block's one extra column (or row), which holds the
  // dead rows' value.
  at::Tensor slots;
};

// The layout of `active`'s first `width` rows, with `live` of them live (the
// device checks it).
inline Layout layout(const at::Tensor& active, int64_t width, int64_t live) {
  const at::Tensor mask = dense::leading_rows(active, width);
  const at::Tensor counted = mask.cumsum(0);  // live rows up to and including j (int64)
  if (width > 0) {
    // A literal message: nothing is formatted on the success path.
    at::_assert_async(
        counted.select(0, width - 1).eq(live),
        "growop: live_count is not the number of live rows below width");
  }
  // A live row's place among the live rows; a dead row's place after them is
  // `live` plus the dead rows before it, index - counted.
  const at::Tensor live_place = counted - 1;
  const at::Tensor index = at::arange(width, counted.options());
  // A permutation, so the scatter writes each place once (deterministic).
  const at::Tensor place = at::where(mask, live_place, index - counted + live);
  at::Tensor order = at::empty({width}, counted.options()).scatter_(0, place, index);
  return {live, order.narrow(0, 0, live), at::where(mask, live_place, live)};
}

// out (batch, width): x @ weight[rows]^T + bias[rows] in the live columns,
// `fill` in every other column.
inline void forward(
    const at::Tensor& x,
    const at::Tensor& weight,
    const at::Tensor& bias,
    const Layout& layout,
    double fill,
    at::Tensor& out) {
  const int64_t live = layout.live;
  // One spare row past the live ones, zero, gives the product one spare
  // column, which then takes `fill`; more spare rows pad the row stride.
  const int64_t rows = dense::padded_columns(live + 1, x);
  at::Tensor w = at::empty({rows, weight.size(1)}, weight.options());
  at::Tensor w_live = w.narrow(0, 0, live);
  at::index_select_out(w_live, weight, 0, layout.rows);
  w.narrow(0, live, rows - live).zero_();
  at::Tensor y;  // (batch, rows), contiguous
  if (bias.defined()) {
    at::Tensor b = at::zeros({rows}, bias.options());
    at::Tensor b_live = b.narrow(0, 0, live);
    at::index_select_out(b_live, bias, 0, layout.rows);
    y = at::addmm(b, x, w.t());
  } else {
    y = at::mm(x, w.t());
  }
  y.select(1, live).fill_(fill);  // not 0 * x: fill holds even where x is inf or NaN
  at::index_select_out(out, y, 1, layout.slots);
}

// The gradients of `forward` for grad_output g (batch, width), each written
// where it is defined: grad_input (batch, in), grad_weight (capacity, in) and
// grad_bias (capacity,), the last two zero outside the live rows.
inline void backward(
    const at::Tensor& g,
    const at::Tensor& x,
    const at::Tensor& weight,
    const Layout& layout,
    at::Tensor& grad_input,
    at::Tensor& grad_weight,
    at::Tensor& grad_bias) {
  const int64_t live = layout.live;
  const int64_t batch = g.size(0);
  const int64_t width = g.size(1);
  // The live columns of g, packed, with a padded row stride.
  at::Tensor gl = dense::padded_block(batch, live, g);
  at::index_select_out(gl, g, 1, layout.rows);
  if (grad_input.defined()) {
    at::mm_out(grad_input, gl, weight.index_select(0, layout.rows));
  }
  // The packed gradient rows, plus one zero row that every dead row copies.
  const auto spread = [&](at::Tensor& full, const at::Tensor& packed_with_zero) {
    at::Tensor head = dense::leading_rows(full, width);
    at::index_select_out(head, packed_with_zero, 0, layout.slots);
    if (width < full.size(0)) {
      full.narrow(0, width, full.size(0) - width).zero_();
    }
  };
  if (grad_weight.defined()) {
    at::Tensor packed = at::empty({live + 1, x.size(1)}, grad_weight.options());
    at::Tensor live_rows = packed.narrow(0, 0, live);
    at::mm_out(live_rows, gl.t(), x);
    packed.select(0, live).zero_();
    spread(grad_weight, packed);
  }
  if (grad_bias.defined()) {
    at::Tensor packed = at::empty({live + 1}, grad_bias.options());
    at::Tensor live_rows = packed.narrow(0, 0, live);
    at::sum_out(live_rows, gl, 0);
    packed.select(0, live).zero_();
    spread(grad_bias, packed);
  }
}

}  // namespace growop::packed
