"""GrowLinear as a module: construction, forward, grow, masking, errors, checkpoints, conversion.

Values are checked against ``growop.reference.masked_linear`` (and ``nn.Linear`` on the live
rows); comparisons print where they fail. Shapes are deliberately odd (in_features=13, 7, ...).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import growop
from conftest import DTYPES, SAME_DTYPE_TOLERANCES, assert_close, assert_equal
from growop import GrowLinear
from growop.reference import masked_linear as reference_masked_linear

# ----------------------------------------------------------------------------- helpers


def reference(layer: GrowLinear, x: torch.Tensor) -> torch.Tensor:
    width = layer.capacity if layer.static_shape else layer.out_features
    with torch.no_grad():
        return reference_masked_linear(
            x, layer.weight, layer.bias, layer.active, width, layer.mask_value
        )


def snapshot(layer: GrowLinear) -> dict:
    return {
        "state": {
            k: (v.detach().clone() if isinstance(v, torch.Tensor) else dict(v))
            for k, v in layer.state_dict().items()
        },
        "out_features": layer.out_features,
        "capacity": layer.capacity,
        "weight": layer.weight,
        "bias": layer.bias,
        "weight_ptr": layer.weight.data_ptr(),
    }


def assert_unchanged(layer: GrowLinear, before: dict) -> None:
    assert layer.out_features == before["out_features"]
    assert layer.capacity == before["capacity"]
    assert layer.weight is before["weight"]
    assert layer.bias is before["bias"]
    assert layer.weight.data_ptr() == before["weight_ptr"]
    now = layer.state_dict()
    assert set(now) == set(before["state"])
    for key, value in before["state"].items():
        if isinstance(value, torch.Tensor):
            assert_equal(now[key], value, what=key)
        else:
            assert now[key] == value, key


def make_layer(in_features=13, out_features=5, *, seed=0, **kwargs) -> GrowLinear:
    torch.manual_seed(seed)
    return GrowLinear(in_features, out_features, **kwargs)


# ----------------------------------------------------------------------------- construction


def test_construction_attributes():
    layer = make_layer(13, 5, capacity=9)
    assert layer.in_features == 13
    assert layer.out_features == 5
    assert layer.capacity == 9
    assert layer.weight.shape == (9, 13)
    assert isinstance(layer.weight, nn.Parameter) and isinstance(layer.bias, nn.Parameter)
    assert layer.bias.shape == (9,)
    assert layer.active.dtype == torch.bool
    assert layer.active.tolist() == [True] * 5 + [False] * 4
    assert "active" in dict(layer.named_buffers())
    # Every row is initialised as nn.Linear would (bounds 1/sqrt(in_features)).
    bound = 1 / math.sqrt(13)
    assert layer.weight.abs().max() <= bound
    assert layer.bias.abs().max() <= bound
    assert layer.weight.std() > bound / 4


@pytest.mark.parametrize("out_features", [0, 1, 5, 31, 32, 33, 100])
def test_default_capacity(out_features):
    expected = out_features + max(8, math.ceil(out_features / 4))
    assert growop.default_capacity(out_features) == expected
    layer = GrowLinear(3, out_features)
    assert layer.capacity == expected
    assert int(layer.active.sum()) == out_features
    assert layer.active[:out_features].all()


def test_no_bias_registers_none():
    layer = make_layer(7, 3, bias=False)
    assert layer.bias is None
    assert "bias" in layer._parameters and layer._parameters["bias"] is None
    assert [name for name, _ in layer.named_parameters()] == ["weight"]


def test_counts_are_read_only_and_follow_the_rows():
    """out_features, live_count and the rows view read the layer's one record of its
    counts, which only growing and masking change. out_features accepts the value it has
    (code written for nn.Linear copies it across modules) and refuses any other, having
    changed nothing."""
    layer = make_layer(5, 3, capacity=6)
    layer.grow(2)
    layer.deactivate([1])
    rows = layer.rows
    assert (rows.used, rows.live, rows.capacity) == (layer.out_features, layer.live_count, layer.capacity)
    assert (layer.out_features, layer.live_count, layer.capacity) == (5, 4, 6)
    assert len(rows.params) == 2 and rows.params[0] is layer.weight and rows.params[1] is layer.bias
    assert repr(rows) == "RowSetView(used=5, live=4, capacity=6, layers=1)"
    for name in ("used", "live", "capacity", "params"):
        with pytest.raises(AttributeError):
            setattr(rows, name, 1)
    layer.out_features = 5
    with pytest.raises(AttributeError, match=r"out_features is the number of row slots in use \(5\).*grow\(k\)"):
        layer.out_features = 7
    with pytest.raises(AttributeError):
        layer.live_count = 5
    assert (layer.out_features, layer.live_count) == (5, 4)
    assert layer(torch.randn(2, 5)).shape == (2, 5)
    layer.grow(2)  # past capacity
    assert layer.rows is rows and (rows.used, rows.live, rows.capacity) == (7, 6, layer.capacity)
    assert rows.params[0] is layer.weight and rows.params[0].shape[0] == layer.capacity > 6


def test_meta_device_construction():
    layer = GrowLinear(1000, 300, capacity=400, device="meta")
    assert layer.weight.device.type == "meta"
    assert layer.bias.device.type == "meta"
    assert layer.active.device.type == "meta"
    assert layer.weight.shape == (400, 1000)
    out = layer(torch.empty(2, 1000, device="meta"))
    assert out.shape == (2, 300) and out.device.type == "meta"


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_float_dtypes(dtype):
    layer = make_layer(13, 5, capacity=7, dtype=dtype)
    assert layer.weight.dtype == dtype and layer.bias.dtype == dtype
    assert layer.active.dtype == torch.bool
    x = torch.randn(4, 13, dtype=dtype)
    out = layer(x)
    assert out.dtype == dtype and out.shape == (4, 5)
    atol, rtol = SAME_DTYPE_TOLERANCES[dtype]
    assert_close(out, reference(layer, x), atol=atol, rtol=rtol, what=f"forward {dtype}")


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool])
def test_integer_dtype_raises(dtype):
    with pytest.raises(TypeError, match="dtype"):
        GrowLinear(4, 3, dtype=dtype)


def test_capacity_smaller_than_out_features_raises():
    with pytest.raises(ValueError, match="capacity"):
        GrowLinear(4, 6, capacity=5)
    GrowLinear(4, 6, capacity=6)  # equal is fine


def test_extra_repr():
    text = repr(GrowLinear(13, 5, capacity=9))
    for part in ("in_features=13", "out_features=5", "capacity=9", "bias=True"):
        assert part in text, text
    assert "bias=False" in repr(GrowLinear(13, 5, bias=False))


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("lead", [(), (1,), (6,), (2, 3), (0,)], ids=["1d", "1", "6", "2x3", "empty"])
def test_forward_matches_reference_and_linear(lead, bias):
    layer = make_layer(13, 5, capacity=11, bias=bias)
    layer.deactivate(2)
    x = torch.randn(*lead, 13)
    out = layer(x)
    assert out.shape == (*lead, 5)
    assert_close(out, reference(layer, x), atol=1e-5, rtol=1e-5, what="vs reference")

    live = [0, 1, 3, 4]
    linear = nn.Linear(13, len(live), bias=bias)
    with torch.no_grad():
        linear.weight.copy_(layer.weight[live])
        if bias:
            linear.bias.copy_(layer.bias[live])
    assert_close(out[..., live], linear(x), atol=1e-5, rtol=1e-5, what="vs nn.Linear on live rows")
    assert (out[..., 2] == torch.finfo(torch.float32).min).all()


def test_forward_autograd_matches_reference():
    layer = make_layer(13, 5, capacity=8)
    layer.deactivate([1, 4])
    x = torch.randn(3, 2, 13, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    w_ref = layer.weight.detach().clone().requires_grad_()
    b_ref = layer.bias.detach().clone().requires_grad_()
    grad_out = torch.randn(3, 2, 5)

    layer(x).backward(grad_out)
    reference_masked_linear(x_ref, w_ref, b_ref, layer.active, 5).backward(grad_out)

    assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5, what="grad input")
    assert_close(layer.weight.grad, w_ref.grad, atol=1e-5, rtol=1e-5, what="grad weight")
    assert_close(layer.bias.grad, b_ref.grad, atol=1e-5, rtol=1e-5, what="grad bias")
    assert layer.weight.grad[[0, 2, 3]].abs().sum() > 0


def test_static_shape_output_has_capacity_columns():
    layer = make_layer(13, 5, capacity=9, static_shape=True)
    x = torch.randn(4, 13)
    out = layer(x)
    assert out.shape == (4, 9)
    assert_close(out, reference(layer, x), atol=1e-5, rtol=1e-5, what="static shape")
    assert (out[:, 5:] == torch.finfo(torch.float32).min).all()
    assert (out[:, :5] > -1e3).all()
    layer.grow(2)
    out = layer(x)
    assert out.shape == (4, 9), "static_shape must keep the width across grows"
    assert (out[:, 5:7] > -1e3).all()
    assert (out[:, 7:] == torch.finfo(torch.float32).min).all()


class OpCalls(TorchFunctionMode):
    """Records the hints (live_count, live_end) of every growop.masked_linear call; under a
    torch-function mode the eager binding leaves the call to the op, which the mode sees."""

    def __init__(self):
        super().__init__()
        self.hints = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.growop.masked_linear.default:
            named = dict(zip((a.name for a in func._schema.arguments), args), **(kwargs or {}))
            self.hints.append((named.get("live_count"), named.get("live_end")))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("static_shape", [True, False], ids=["static", "dynamic"])
def test_forward_passes_the_live_count_and_the_slots_in_use(static_shape):
    """In eager mode the forward gives the op both host-side hints: the live count and the
    slots in use (no row past them is live), with which CUDA runs one GEMM on a prefix of
    live rows. They follow grows and deactivations; a mask swapped in for one call, which they
    do not describe, gets neither."""
    layer = make_layer(13, 5, capacity=9, static_shape=static_shape)
    x = torch.randn(4, 13)
    calls = OpCalls()
    with calls:
        layer(x)
        layer.grow(2)
        layer(x)
        layer.deactivate([1, 6])
        layer(x)
        swapped = torch.ones_like(layer.active)
        torch.func.functional_call(layer, {"active": swapped}, (x,))
    assert calls.hints == [(5, 5), (7, 7), (5, 7), (None, None)]
    assert_close(layer(x), reference(layer, x), atol=1e-5, rtol=1e-5, what="after the changes")


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_default_mask_value_is_dtype_min(dtype):
    layer = make_layer(7, 3, capacity=5, static_shape=True, dtype=dtype)
    layer.deactivate(1)
    out = layer(torch.randn(2, 7, dtype=dtype))
    expected = torch.finfo(dtype).min
    assert (out[:, [1, 3, 4]] == expected).all(), out
    assert (out[:, [0, 2]] != expected).all()


def test_custom_mask_value():
    layer = make_layer(7, 4, capacity=6, mask_value=-123.5, static_shape=True)
    layer.deactivate([0, 3])
    x = torch.randn(5, 7)
    out = layer(x)
    assert (out[:, [0, 3, 4, 5]] == -123.5).all()
    assert_close(out, reference(layer, x), atol=1e-5, rtol=1e-5, what="custom mask")
    assert "mask_value=-123.5" in repr(layer)


def test_cross_entropy_with_masked_columns_is_finite_and_masked_columns_get_no_grad():
    layer = make_layer(13, 6, capacity=10, static_shape=True)
    layer.deactivate([1, 4])
    x = torch.randn(8, 13)
    target = torch.tensor([0, 2, 3, 5, 0, 2, 3, 5])
    logits = layer(x)
    logits.retain_grad()
    loss = F.cross_entropy(logits, target)
    assert torch.isfinite(loss)
    loss.backward()
    masked = [1, 4, 6, 7, 8, 9]
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[:, masked] == 0).all(), logits.grad[:, masked]
    assert (logits.grad[:, [0, 2, 3, 5]] != 0).all()
    assert (layer.weight.grad[masked] == 0).all()
    assert (layer.bias.grad[masked] == 0).all()
    assert (layer.weight.grad[[0, 2, 3, 5]].abs().sum(1) > 0).all()


# ----------------------------------------------------------------------------- grow


def test_grow_within_capacity_keeps_storage_and_rows():
    layer = make_layer(13, 5, capacity=9)
    weight, bias = layer.weight, layer.bias
    ptr, bias_ptr = weight.data_ptr(), bias.data_ptr()
    old_w, old_b = weight[:5].detach().clone(), bias[:5].detach().clone()

    rows = layer.grow(3)

    assert rows == range(5, 8)
    assert layer.weight is weight and layer.bias is bias
    assert layer.weight.data_ptr() == ptr and layer.bias.data_ptr() == bias_ptr
    assert layer.out_features == 8 and layer.capacity == 9
    assert layer.active.tolist() == [True] * 8 + [False]
    assert_equal(layer.weight[:5], old_w, what="old weight rows")
    assert_equal(layer.bias[:5], old_b, what="old bias rows")
    x = torch.randn(3, 13)
    out = layer(x)
    assert out.shape == (3, 8)
    assert_close(out, reference(layer, x), atol=1e-5, rtol=1e-5, what="after grow")
    expected_new = x @ layer.weight[5:8].detach().T + layer.bias[5:8].detach()
    assert_close(out[:, 5:8].detach(), expected_new, atol=1e-5, rtol=1e-5, what="new columns")


def test_grow_init_default_within_linear_bounds():
    layer = make_layer(13, 2, capacity=40)
    with torch.no_grad():  # make stale values in unused rows visible if grow forgot to write
        layer.weight[2:].fill_(5.0)
        layer.bias[2:].fill_(5.0)
    layer.grow(30)
    bound = 1 / math.sqrt(13)
    new_w, new_b = layer.weight[2:32].detach(), layer.bias[2:32].detach()
    assert new_w.abs().max() <= bound, new_w.abs().max()
    assert new_b.abs().max() <= bound, new_b.abs().max()
    # Uniform(-b, b) has std b/sqrt(3): rule out zeros or a constant.
    assert new_w.std() > bound / 3
    assert new_b.std() > bound / 4
    assert (layer.weight[32:] == 5.0).all()


def test_grow_init_zeros():
    layer = make_layer(13, 3, capacity=8)
    with torch.no_grad():
        layer.weight[3:].fill_(5.0)
        layer.bias[3:].fill_(5.0)
    layer.grow(2, init="zeros")
    assert (layer.weight[3:5] == 0).all() and (layer.bias[3:5] == 0).all()
    out = layer(torch.randn(4, 13))
    assert (out[:, 3:5] == 0).all()


def test_grow_init_mean_uses_live_rows_only():
    layer = make_layer(13, 4, capacity=8)
    layer.deactivate(1)
    live = [0, 2, 3]
    expected_w = layer.weight[live].detach().mean(0)
    expected_b = layer.bias[live].detach().mean()
    layer.grow(2, init="mean")
    for row in (4, 5):
        assert_close(layer.weight[row], expected_w, atol=1e-6, rtol=1e-6, what=f"mean weight row {row}")
        assert_close(layer.bias[row], expected_b, atol=1e-6, rtol=1e-6, what=f"mean bias row {row}")


@pytest.mark.parametrize("shape", ["rows", "single"])
def test_grow_init_tensor(shape):
    layer = make_layer(7, 3, capacity=8)
    with torch.no_grad():
        layer.bias[3:].fill_(5.0)
    values = torch.arange(14, dtype=torch.float64).reshape(2, 7) / 10
    init = values if shape == "rows" else values[1]
    layer.grow(2, init=init)
    expected = values.float() if shape == "rows" else values[1].float().expand(2, 7)
    assert_equal(layer.weight[3:5].detach(), expected, what="init tensor rows")
    assert (layer.bias[3:5] == 0).all()


@pytest.mark.parametrize("bias_kind", ["rows", "scalar"])
def test_grow_init_tuple(bias_kind):
    layer = make_layer(7, 3, capacity=8)
    weight = torch.randn(2, 7)
    bias = torch.tensor([0.25, -0.75]) if bias_kind == "rows" else 1.5
    layer.grow(2, init=(weight, bias))
    assert_equal(layer.weight[3:5].detach(), weight, what="tuple weight")
    expected_b = bias if bias_kind == "rows" else torch.full((2,), 1.5)
    assert_equal(layer.bias[3:5].detach(), expected_b, what="tuple bias")


def test_grow_init_tuple_without_bias():
    layer = make_layer(7, 3, capacity=8, bias=False)
    weight = torch.randn(2, 7)
    layer.grow(2, init=(weight, None))
    assert_equal(layer.weight[3:5].detach(), weight, what="tuple weight, no bias")


def test_grow_init_callable_fills_in_place():
    layer = make_layer(7, 3, capacity=8)
    seen = {}

    def init(weight, bias):
        seen["shapes"] = (tuple(weight.shape), tuple(bias.shape))
        weight.copy_(torch.arange(14.0).reshape(2, 7))
        bias.fill_(-2.0)

    layer.grow(2, init=init)
    assert seen["shapes"] == ((2, 7), (2,))
    assert_equal(layer.weight[3:5].detach(), torch.arange(14.0).reshape(2, 7), what="callable weight")
    assert (layer.bias[3:5] == -2.0).all()


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_grow_past_capacity(bias):
    layer = make_layer(7, 3, capacity=4, bias=bias)
    weight, bias_param = layer.weight, layer.bias
    old_w = weight.detach().clone()
    old_b = bias_param.detach().clone() if bias else None
    x = torch.randn(5, 7)
    old_out = layer(x).detach()

    rows = layer.grow(3)

    assert rows == range(3, 6)
    assert layer.weight is weight and layer.bias is bias_param
    assert layer.capacity >= math.ceil(4 * 1.5) and layer.capacity >= 6
    assert layer.weight.shape == (layer.capacity, 7)
    if bias:
        assert layer.bias.shape == (layer.capacity,)
        assert_equal(layer.bias[:3].detach(), old_b[:3], what="old bias")
    assert layer.active.shape == (layer.capacity,)
    assert layer.active.tolist() == [True] * 6 + [False] * (layer.capacity - 6)
    assert_equal(layer.weight[:3].detach(), old_w[:3], what="old weight rows")
    assert layer.out_features == 6
    out = layer(x)
    assert out.shape == (5, 6)
    # Tolerance, not bit equality: the GEMM over a different set of live rows may round differently.
    assert_close(out[:, :3].detach(), old_out, atol=1e-6, rtol=1e-6, what="old columns after realloc")
    assert_close(out, reference(layer, x), atol=1e-5, rtol=1e-5, what="after realloc")
    # The module's own registry sees the resized tensors.
    assert layer.state_dict()["weight"].shape == (layer.capacity, 7)
    assert layer.state_dict()["active"].shape == (layer.capacity,)


def test_grow_past_capacity_repeatedly_reallocates_geometrically():
    layer = make_layer(5, 1, capacity=1)
    # optimizer= keeps this test independent of the bug pinned by
    # test_second_past_capacity_grow_without_optimizer below.
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    capacities = []
    for _ in range(60):
        layer.grow(1, optimizer=opt)
        capacities.append(layer.capacity)
    assert layer.out_features == 61
    assert int(layer.active.sum()) == 61
    reallocations = len(set(capacities))
    assert reallocations <= 8, capacities


@pytest.mark.parametrize("capacity,needed", [(1, 2), (10, 11), (10, 30), (64, 65)])
def test_grow_past_capacity_reallocates_by_the_one_growth_rule(capacity, needed):
    """grow's new capacity is growop.rows.grown_capacity, the rule that
    resize_token_embeddings (growop.transformers) follows too."""
    expected = max(growop.default_capacity(needed), math.ceil(capacity * 1.5))
    assert growop.rows.grown_capacity(capacity, needed) == expected
    layer = make_layer(5, 1, capacity=capacity)
    layer.grow(needed - 1)
    assert (layer.out_features, layer.capacity) == (needed, expected)


# Regression: the registry of parameters reallocated without an optimizer once held them in a
# set, which compares tensors element-wise, so a second such grow failed half-way.
def test_second_past_capacity_grow_without_optimizer():
    layer = make_layer(5, 1, capacity=1)
    layer.grow(1)  # first reallocation: capacity 1 -> 10
    first_capacity = layer.capacity
    layer.grow(first_capacity)  # second reallocation
    assert layer.out_features == 2 + first_capacity
    assert layer.weight.shape[0] == layer.bias.shape[0] == layer.active.shape[0] == layer.capacity
    x = torch.randn(3, 5)
    assert_close(layer(x), reference(layer, x), atol=1e-5, rtol=1e-5, what="after two reallocations")


def test_grow_past_capacity_resizes_existing_grad():
    layer = make_layer(7, 3, capacity=3)
    layer(torch.randn(4, 7)).sum().backward()
    old_grad = layer.weight.grad.clone()
    layer.grow(1)
    assert layer.weight.grad.shape == layer.weight.shape
    assert_equal(layer.weight.grad[:3], old_grad, what="old grad rows")
    assert (layer.weight.grad[3:] == 0).all()


def test_training_after_past_capacity_grow_with_live_graph():
    """A graph still holding the weight must not pin the old gradient shape."""
    layer = make_layer(7, 3, capacity=3)
    keep = layer.weight * 1  # holds the weight's gradient accumulator alive
    layer.grow(4)
    x = torch.randn(5, 7)
    loss = layer(x).square().sum()
    loss.backward()
    assert layer.weight.grad.shape == (layer.capacity, 7)
    assert layer.bias.grad.shape == (layer.capacity,)
    assert (layer.weight.grad[:7].abs().sum(1) > 0).all()
    assert (layer.weight.grad[7:] == 0).all()
    with torch.no_grad():
        layer.weight -= 0.1 * layer.weight.grad
    layer(x).sum().backward()  # a second step still works
    assert keep.shape == (3, 7)


# ----------------------------------------------------------------------------- deactivate / reactivate


@pytest.mark.parametrize(
    "rows",
    [3, [1, 3], range(1, 4, 2), torch.tensor([1, 3]), torch.tensor(3), torch.tensor([3], dtype=torch.int32)],
    ids=["int", "list", "range", "long-tensor", "0d-tensor", "int32-tensor"],
)
def test_deactivate_reactivate_row_kinds(rows):
    layer = make_layer(13, 5, capacity=7)
    expected = [rows] if isinstance(rows, int) else torch.as_tensor(list(rows) if isinstance(rows, range) else rows).reshape(-1).tolist()
    x = torch.randn(3, 13)
    before = layer(x).detach()
    weight_before = layer.weight.detach().clone()

    layer.deactivate(rows)
    out = layer(x).detach()
    assert out.shape == (3, 5), "deactivation must not shift or drop columns"
    for j in range(5):
        if j in expected:
            assert (out[:, j] == torch.finfo(torch.float32).min).all(), j
            assert not layer.active[j]
        else:
            assert_close(out[:, j], before[:, j], atol=1e-6, rtol=1e-6, what=f"untouched column {j}")
            assert layer.active[j]
    assert_equal(layer.weight.detach(), weight_before, what="weights kept")

    layer.reactivate(rows)
    assert layer.active.tolist() == [True] * 5 + [False] * 2
    assert_equal(layer(x).detach(), before, what="after reactivate")


def test_deactivated_rows_get_exactly_zero_gradient():
    layer = make_layer(13, 5, capacity=7)
    layer.deactivate([0, 3])
    out = layer(torch.randn(6, 13))
    (out[:, [1, 2, 4]] ** 2).sum().backward()
    assert (layer.weight.grad[[0, 3, 5, 6]] == 0).all()
    assert (layer.bias.grad[[0, 3, 5, 6]] == 0).all()
    assert (layer.weight.grad[[1, 2, 4]].abs().sum(1) > 0).all()


def test_grow_after_deactivate_keeps_positions():
    layer = make_layer(7, 3, capacity=5)
    layer.deactivate(1)
    layer.grow(1)
    assert layer.active.tolist() == [True, False, True, True, False]
    out = layer(torch.randn(2, 7))
    assert out.shape == (2, 4)
    assert (out[:, 1] == torch.finfo(torch.float32).min).all()


def test_mask_change_between_forward_and_backward_is_caught():
    layer = make_layer(7, 4, capacity=6)
    out = layer(torch.randn(3, 7))
    layer.deactivate(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_module_dtype_conversion_keeps_mask():
    layer = make_layer(7, 3, capacity=5, static_shape=True).double()
    assert layer.weight.dtype == torch.float64 and layer.active.dtype == torch.bool
    out = layer(torch.randn(2, 7, dtype=torch.float64))
    assert (out[:, 3:] == torch.finfo(torch.float64).min).all()


# ----------------------------------------------------------------------------- errors leave the layer unchanged


def _opt_for_other_layer(layer):
    other = nn.Linear(3, 3)
    return torch.optim.SGD(other.parameters(), lr=0.1)


ERROR_CASES = {
    "grow-0": (lambda l: l.grow(0), ValueError, None),
    "grow-neg": (lambda l: l.grow(-1), ValueError, None),
    "grow-float": (lambda l: l.grow(1.5), TypeError, None),
    "grow-bool": (lambda l: l.grow(True), TypeError, None),
    "grow-past-cap-bad-init": (lambda l: l.grow(10, init="bogus"), ValueError, "init"),
    "init-unknown": (lambda l: l.grow(1, init="xavier"), ValueError, "init"),
    "init-wrong-shape": (lambda l: l.grow(2, init=torch.zeros(2, 6)), ValueError, "shape"),
    "init-wrong-rows": (lambda l: l.grow(2, init=torch.zeros(3, 7)), ValueError, "shape"),
    "init-bad-type": (lambda l: l.grow(1, init=3.0), TypeError, None),
    "init-tuple-len": (lambda l: l.grow(1, init=(torch.zeros(7),)), ValueError, None),
    "deactivate-eq-out": (lambda l: l.deactivate(4), IndexError, "out_features"),
    "deactivate-in-capacity-not-grown": (lambda l: l.deactivate([0, 5]), IndexError, None),
    "deactivate-negative": (lambda l: l.deactivate(-1), IndexError, None),
    "reactivate-eq-out": (lambda l: l.reactivate([4]), IndexError, None),
    "reactivate-negative": (lambda l: l.reactivate(torch.tensor([-1])), IndexError, None),
    "deactivate-bool-tensor": (lambda l: l.deactivate(torch.tensor([True, False, True, False])), TypeError, None),
    "deactivate-float-tensor": (lambda l: l.deactivate(torch.tensor([1.0])), TypeError, None),
    "reactivate-bool-tensor": (lambda l: l.reactivate(torch.tensor([True])), TypeError, None),
    "deactivate-2d-tensor": (lambda l: l.deactivate(torch.tensor([[0, 1]])), ValueError, None),
    "deactivate-float": (lambda l: l.deactivate(1.0), TypeError, None),
    "grow-foreign-optimizer": (lambda l: l.grow(1, optimizer=_opt_for_other_layer(l)), ValueError, "optimizer"),
    "grow-past-cap-foreign-optimizer": (
        lambda l: l.grow(10, optimizer=_opt_for_other_layer(l)), ValueError, "optimizer"),
    "deactivate-foreign-optimizer": (
        lambda l: l.deactivate(0, optimizer=_opt_for_other_layer(l)), ValueError, "optimizer"),
    "reactivate-foreign-optimizer": (
        lambda l: l.reactivate(0, optimizer=_opt_for_other_layer(l)), ValueError, "optimizer"),
    "resize-foreign-optimizer": (
        lambda l: l.resize_optimizer_state(_opt_for_other_layer(l)), ValueError, "optimizer"),
    "wrong-in-features": (lambda l: l(torch.randn(2, 6)), RuntimeError, r"\[2, 6\].*\[6, 7\]"),
    "integer-input": (lambda l: l(torch.ones(2, 7, dtype=torch.long)), RuntimeError, "dtype"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_leave_layer_unchanged(case):
    call, error, match = ERROR_CASES[case]
    layer = make_layer(7, 4, capacity=6)
    layer.deactivate(2)
    before = snapshot(layer)
    with pytest.raises(error, match=match):
        call(layer)
    assert_unchanged(layer, before)


def _trained_layer_and_optimizer():
    """A layer (row 2 masked without optimizer=, so its moments are kept) under Adam."""
    layer = make_layer(7, 4, capacity=6)
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.1)
    layer.deactivate(2)
    for _ in range(3):
        optimizer.zero_grad()
        layer(torch.randn(5, 7)).sum().backward()
        optimizer.step()
    return layer, optimizer


OPTIMIZER_WORK_CASES = {
    "grow-default": (lambda l, o: l.grow(2, optimizer=o), "rows_changed"),
    "grow-mean-found": (lambda l, o: l.grow(1, init="mean"), "rows_changed"),
    "reactivate": (lambda l, o: l.reactivate([2], optimizer=o), "rows_changed"),
    "reactivate-found": (lambda l, o: l.reactivate([2]), "rows_changed"),
    "deactivate": (lambda l, o: l.deactivate([0], optimizer=o), "reset_rows"),
}


@pytest.mark.parametrize("case", list(OPTIMIZER_WORK_CASES))
def test_an_error_in_the_optimizer_work_leaves_the_layer_unchanged(case, monkeypatch):
    """The optimizers are brought up to date before the mask, counts and new rows change:
    an error there changes nothing, and a later row event does not restart the rows of
    the one that failed."""
    call, hook = OPTIMIZER_WORK_CASES[case]
    layer, optimizer = _trained_layer_and_optimizer()
    before = snapshot(layer)
    moments = {k: optimizer.state[layer.weight][k].clone() for k in ("exp_avg", "exp_avg_sq")}

    def fail(*args, **kwargs):
        raise RuntimeError("optimizer work failed")

    with monkeypatch.context() as patch:
        patch.setattr(growop.optim, hook, fail)
        with pytest.raises(RuntimeError, match="optimizer work failed"):
            call(layer, optimizer)
    assert_unchanged(layer, before)
    layer.grow(1, optimizer=optimizer)  # takes in every row event since the failed one
    for name, value in moments.items():
        assert_equal(optimizer.state[layer.weight][name][:4], value[:4], what=name)


def test_an_error_in_the_optimizer_work_past_capacity_only_grows_the_storage(monkeypatch):
    layer, optimizer = _trained_layer_and_optimizer()
    weight, active = layer.weight.detach().clone(), layer.active.clone()

    def fail(*args, **kwargs):
        raise RuntimeError("optimizer work failed")

    monkeypatch.setattr(growop.optim, "rows_changed", fail)
    with pytest.raises(RuntimeError, match="optimizer work failed"):
        layer.grow(5, optimizer=optimizer)
    assert (layer.out_features, layer.live_count) == (4, 3)
    assert layer.capacity > 6  # reallocated, as reserve would: no row is live or written
    assert_equal(layer.weight[:6].detach(), weight, what="old rows")
    assert not layer.weight[6:].any()
    assert_equal(layer.active[:6], active, what="mask") and not layer.active[6:].any()


def test_error_init_tuple_with_bias_for_biasless_layer():
    layer = make_layer(7, 4, capacity=6, bias=False)
    before = snapshot(layer)
    with pytest.raises(ValueError, match="bias"):
        layer.grow(1, init=(torch.zeros(7), torch.zeros(1)))
    assert_unchanged(layer, before)


def test_error_init_mean_without_live_rows():
    layer = make_layer(7, 2, capacity=4)
    layer.deactivate([0, 1])
    before = snapshot(layer)
    with pytest.raises(ValueError, match="live"):
        layer.grow(1, init="mean")
    assert_unchanged(layer, before)

    empty = make_layer(7, 0, capacity=3)
    before = snapshot(empty)
    with pytest.raises(ValueError, match="live"):
        empty.grow(5, init="mean")  # also past capacity: nothing may be reallocated
    assert_unchanged(empty, before)


def test_error_wrong_in_features_message_names_shapes():
    layer = make_layer(13, 5, capacity=9)
    with pytest.raises(RuntimeError) as info:
        layer(torch.randn(3, 2, 11))
    message = str(info.value)
    assert "[3, 2, 11]" in message and "13" in message, message


def test_error_callable_init_that_fails_leaves_layer_unchanged():
    layer = make_layer(7, 4, capacity=6)
    before = snapshot(layer)

    def init(weight, bias):
        weight.fill_(1.0)
        raise RuntimeError("user init failed")

    with pytest.raises(RuntimeError, match="user init failed"):
        layer.grow(3, init=init)
    assert_unchanged(layer, before)


# ----------------------------------------------------------------------------- state_dict


def test_state_dict_keys():
    assert set(make_layer(7, 3).state_dict()) == {"weight", "bias", "active", "_extra_state"}
    assert set(make_layer(7, 3, bias=False).state_dict()) == {"weight", "active", "_extra_state"}


def _grown_source():
    source = make_layer(7, 3, capacity=8, seed=1)
    source.grow(2)
    source.deactivate(1)
    return source


def test_state_dict_round_trip_same_capacity():
    source = _grown_source()
    target = make_layer(7, 3, capacity=8, seed=2)
    target.load_state_dict(source.state_dict())
    assert target.out_features == 5
    assert_equal(target.weight.detach(), source.weight.detach(), what="weight")
    assert_equal(target.bias.detach(), source.bias.detach(), what="bias")
    assert target.active.tolist() == source.active.tolist()
    x = torch.randn(4, 7)
    assert_equal(target(x).detach(), source(x).detach(), what="outputs")


@pytest.mark.parametrize("capacity", [5, 6, 20], ids=["smaller-exact", "smaller", "larger"])
def test_state_dict_into_other_capacity(capacity):
    source = _grown_source()  # capacity 8, out_features 5, row 1 masked
    target = make_layer(7, 2, capacity=capacity, seed=3)
    weight_obj = target.weight
    target.load_state_dict(source.state_dict())
    assert target.capacity == capacity
    assert target.weight is weight_obj
    assert target.out_features == 5
    assert target.active.tolist() == [True, False, True, True, True] + [False] * (capacity - 5)
    assert_equal(target.weight[:5].detach(), source.weight[:5].detach(), what="live rows")
    x = torch.randn(4, 7)
    assert_equal(target(x).detach(), source(x).detach(), what="outputs")
    target.grow(1)  # still growable afterwards
    assert target.out_features == 6


def test_state_dict_out_features_beyond_capacity_raises_and_leaves_target():
    source = make_layer(7, 10, capacity=12, seed=1)
    target = make_layer(7, 3, capacity=6, seed=2)
    before = snapshot(target)
    with pytest.raises(RuntimeError, match="capacity"):
        target.load_state_dict(source.state_dict())
    assert_unchanged(target, before)


def test_state_dict_from_nn_linear():
    torch.manual_seed(4)
    linear = nn.Linear(7, 5)
    target = make_layer(7, 2, capacity=9)
    target.load_state_dict(linear.state_dict())
    assert target.out_features == 5
    assert target.active.tolist() == [True] * 5 + [False] * 4
    x = torch.randn(3, 7)
    assert_close(target(x).detach(), linear(x).detach(), atol=1e-6, rtol=1e-6, what="vs nn.Linear")

    # Exactly `capacity` rows: loads as a stock checkpoint into a layer with every slot
    # live (see the next test for one with slots masked or not grown).
    exact = make_layer(7, 5, capacity=5)
    exact.load_state_dict(linear.state_dict())
    assert_close(exact(x).detach(), linear(x).detach(), atol=1e-6, rtol=1e-6, what="exact capacity")


@pytest.mark.parametrize("saved", ["named_parameters", "stock", "weight_only"])
def test_a_maskless_checkpoint_of_capacity_rows_keeps_the_mask_and_reports_it_missing(saved):
    """Tensors of `capacity` rows without a mask, into a layer with slots masked or not
    grown: as likely the layer's own rows saved from named_parameters() (EMA code, saving
    the trainable parameters) as a stock checkpoint. They load as they are, the layer
    keeps its mask and counts (no masked or never-grown row comes to life), and `active`
    is reported missing, so a strict load raises naming it."""
    source = make_layer(7, 3, capacity=8, seed=1)
    source.deactivate([1])
    if saved == "named_parameters":
        state = {name: p.detach().clone() for name, p in source.named_parameters()}
    elif saved == "stock":
        state = nn.Linear(7, 8).state_dict()
    else:
        state = {"weight": source.weight.detach().clone()}
    target = make_layer(7, 3, capacity=8, seed=2)
    target.deactivate([1])
    active = target.active.clone()
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: .*"active"'):
        target.load_state_dict(state)
    keys = target.load_state_dict(state, strict=False)
    assert "active" in keys.missing_keys and not keys.unexpected_keys
    assert (target.out_features, target.live_count, target.capacity) == (3, 2, 8)
    assert_equal(target.active, active, what="mask")
    assert_equal(target.weight.detach(), state["weight"], what="weight")
    if saved == "named_parameters":
        x = torch.randn(2, 7)
        assert_equal(target(x).detach(), source(x).detach(), what="outputs")


def test_a_maskless_checkpoint_of_capacity_rows_into_a_meta_layer_is_a_stock_one():
    """A layer built on the meta device has no rows of its own that could have been saved:
    mask-less tensors of `capacity` rows loaded with assign=True are a stock checkpoint, and
    the layer comes out usable, every row live."""
    torch.manual_seed(7)
    linear = nn.Linear(7, 8)
    with torch.device("meta"):
        target = GrowLinear(7, 6, capacity=8)
    keys = target.load_state_dict(linear.state_dict(), assign=True)
    assert not keys.missing_keys and not keys.unexpected_keys
    assert (target.out_features, target.live_count) == (8, 8) and not target.active.is_meta
    x = torch.randn(3, 7)
    assert_close(target(x).detach(), linear(x).detach(), atol=1e-6, rtol=1e-6, what="outputs")


def test_state_dict_nested_module_round_trip():
    torch.manual_seed(5)
    source = nn.Sequential(nn.Linear(4, 7), nn.ReLU(), GrowLinear(7, 3, capacity=4))
    source[2].grow(3)  # past capacity
    target = nn.Sequential(nn.Linear(4, 7), nn.ReLU(), GrowLinear(7, 3, capacity=8))
    target.load_state_dict(source.state_dict())
    x = torch.randn(6, 4)
    assert_equal(target(x).detach(), source(x).detach(), what="nested outputs")


# ----------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_from_linear(bias):
    torch.manual_seed(6)
    linear = nn.Linear(13, 5, bias=bias)
    layer = GrowLinear.from_linear(linear)
    assert layer.out_features == 5 and layer.capacity == growop.default_capacity(5)
    assert (layer.bias is None) == (not bias)
    x = torch.randn(2, 3, 13)
    assert_close(layer(x).detach(), linear(x).detach(), atol=1e-6, rtol=1e-6, what="from_linear")
    sized = GrowLinear.from_linear(linear, capacity=5)
    assert sized.capacity == 5
    assert_close(sized(x).detach(), linear(x).detach(), atol=1e-6, rtol=1e-6, what="from_linear cap=5")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["f64", "bf16"])
def test_from_linear_keeps_dtype(dtype):
    linear = nn.Linear(7, 3, dtype=dtype)
    layer = GrowLinear.from_linear(linear)
    assert layer.weight.dtype == dtype
    assert_equal(layer.weight[:3].detach(), linear.weight.detach(), what="weights copied")


def test_from_linear_rejects_other_modules_and_small_capacity():
    with pytest.raises(TypeError):
        GrowLinear.from_linear(nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="capacity"):
        GrowLinear.from_linear(nn.Linear(3, 5), capacity=4)


@pytest.mark.parametrize(
    "bias,static,deactivate",
    [(True, False, []), (True, False, [1, 3]), (False, False, [0]), (False, False, []),
     (True, True, [2]), (False, True, [])],
    ids=["plain", "masked", "nobias-masked", "nobias", "static-masked", "static-nobias"],
)
def test_to_linear_matches(bias, static, deactivate):
    layer = make_layer(13, 5, capacity=8, bias=bias, static_shape=static)
    if deactivate:
        layer.deactivate(deactivate)
    linear = layer.to_linear()
    assert isinstance(linear, nn.Linear)
    width = 8 if static else 5
    assert linear.out_features == width
    any_masked = bool(deactivate) or static
    assert (linear.bias is not None) == (bias or any_masked)
    x = torch.randn(2, 3, 13)
    assert_close(linear(x).detach(), layer(x).detach(), atol=1e-5, rtol=1e-5, what="to_linear")
    # Masked columns keep the exact mask value.
    expected_mask = torch.finfo(torch.float32).min
    masked = [j for j in range(width) if not layer.active[j]]
    assert (linear(x)[..., masked] == expected_mask).all()
