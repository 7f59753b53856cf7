"""The masked-linear operators on every device and under every strategy, against the float64
reference.

The ``device`` fixture runs a test on the CPU and on CUDA; the CUDA half is skipped where
``torch.cuda.is_available()`` is false, so the test logic still runs (on the CPU kernels) and
cannot rot unseen. The ``strategy`` fixture runs a test under ``auto``, ``dense`` and
``gather``; CI also runs the whole file with ``GROWOP_STRATEGY`` set to each.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from conftest import CAPACITY, DTYPES, NEEDS_CUDA, assert_close, capture_cuda_graph, make_mask
from torch import nn
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vmap
from torch.utils._python_dispatch import TorchDispatchMode

import growop
from growop import ops, reference


@contextlib.contextmanager
def tf32(enabled: bool):
    """float32 matmuls (cuBLAS's and growop's CUDA kernels) in TF32 or not."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def poison_allocator(device: str) -> None:
    """Leaves NaN in the blocks the caching allocator hands out next, so an output element a
    kernel forgets to write shows up as NaN instead of a plausible stale value."""
    if device != "cuda":
        return
    blocks = [torch.full((n,), float("nan"), device=device) for n in (64, 1 << 10, 1 << 14) for _ in range(64)]
    blocks += [torch.full((n,), float("nan"), device=device) for n in (1 << 18, 1 << 20, 1 << 22)]
    del blocks


def _moved(t: torch.Tensor, device: str) -> torch.Tensor:
    """`t` on `device` with its strides: a strided view stays strided (``.to()`` would
    make it dense, and the kernels' strided paths would go untested there)."""
    t = t.detach()
    if t.device.type == device or 0 in t.stride():
        return t.to(device)
    copy = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
    return copy.copy_(t)


def to(device: str, *tensors, requires_grad: bool = False):
    """Copies (or, on the CPU, fresh views) of the tensors on `device`, strides kept."""
    moved = [_moved(t, device) if t is not None else None for t in tensors]
    if requires_grad:
        moved = [t.requires_grad_() if t is not None else None for t in moved]
    return moved


def hints_of(active: torch.Tensor, width: int) -> tuple[int, int]:
    """The exact hints of the first ``width`` rows of ``active``: how many are live, and one
    past the last live one (the tightest ``live_end``; 0 when none is)."""
    live = active[:width].nonzero()
    return live.numel(), int(live[-1]) + 1 if live.numel() else 0


def forward_and_grads(x, weight, bias, active, width, grad_out, mask_value=None, live_count=None, live_end=None):
    """The op's output and gradients."""
    leaves = [t for t in (x, weight, bias) if t is not None]
    poison_allocator(x.device.type)
    out = ops.masked_linear(x, weight, bias, active, width, mask_value, live_count, live_end)
    grads = torch.autograd.grad(out, leaves, grad_out)
    return out.detach(), grads


def reference_and_grads(x, weight, bias, active, width, grad_out, mask_value=None):
    """The float64 reference on the CPU, on the same values."""
    as64 = [t.detach().cpu().double().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    leaves = [t for t in as64 if t is not None]
    mask = mask_value if mask_value is not None else torch.finfo(x.dtype).min
    ref = reference.masked_linear(*as64, active.cpu(), width, mask)
    grads = torch.autograd.grad(ref, leaves, grad_out.cpu().double(), allow_unused=True)
    grads = [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, leaves)]
    return ref.detach(), grads


def check_against_reference(device, dtype, x, weight, bias, active, width, mask_value=None, what=""):
    """Output and gradients on `device` against the reference; dead rows exactly zero. Each
    call runs three times: without hints, with the exact live count (CUDA's gather then runs
    cuBLAS on the packed live rows, and dense skips its masking pass when all rows are live),
    and with live_end too, one past the last live row (CUDA's dense then covers only the rows
    below it, and a prefix of live rows is one GEMM into the output's first columns)."""
    gen = torch.Generator().manual_seed(11)
    grad_out = torch.randn(*x.shape[:-1], width, generator=gen).to(dtype)
    xd, wd, bd = to(device, x, weight, bias, requires_grad=True)
    ad, gd = to(device, active, grad_out)
    ref, ref_grads = reference_and_grads(xd, wd, bd, ad, width, grad_out, mask_value)
    dead = ~active.cpu()
    fill = mask_value if mask_value is not None else torch.finfo(dtype).min
    live, end = hints_of(active, width)
    for live_count, live_end in ((None, None), (live, None), (live, end)):
        how = f"{what} (live_count={live_count}, live_end={live_end})"
        out, grads = forward_and_grads(xd, wd, bd, ad, width, gd, mask_value, live_count, live_end)
        assert out.dtype == dtype, how
        assert_close(out, ref, dtype, f"{how} output on {device}")
        for name, got, expected in zip(("input", "weight", "bias"), grads, ref_grads):
            assert got.dtype == dtype, how
            assert_close(got, expected, dtype, f"{how} grad {name} on {device}")
        assert torch.all(grads[1].cpu()[dead] == 0), f"{how}: rows that are not live must get exactly zero gradient"
        if bias is not None:
            assert torch.all(grads[2].cpu()[dead] == 0), how
        assert torch.all(out.cpu()[..., dead[:width]] == fill), how
    return out


# ------------------------------------------------------------------------------- values


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("kind", ["all", "prefix", "random", "dense", "mixed", "sparse", "single", "none"])
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
def test_values_and_grads_match_reference(device, strategy, dtype, kind, has_bias):
    gen = torch.Generator().manual_seed(0)
    capacity, in_features = CAPACITY[kind], 37
    active = make_mask(kind, capacity, gen)
    width = capacity - 5 if kind != "mixed" else capacity
    x = torch.randn(2, 5, in_features, generator=gen).to(dtype)
    weight = (torch.randn(capacity, in_features, generator=gen) / 6).to(dtype)
    bias = torch.randn(capacity, generator=gen).to(dtype) if has_bias else None
    out = check_against_reference(device, dtype, x, weight, bias, active, width, what=kind)
    assert out.shape == (2, 5, width)


def relative_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    return ((got.double().cpu() - exact).norm() / exact.norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize(
    "dtype,allow_tf32",
    [(torch.bfloat16, False), (torch.float16, False), (torch.float32, False), (torch.float32, True),
     (torch.float64, False)],
    ids=["bf16", "f16", "f32", "f32-tf32", "f64"],
)
def test_error_is_at_most_twice_torch_on_the_same_inputs(device, strategy, dtype, allow_tf32):
    """Output and both weight-side gradients: the error against float64 is at most twice that
    of PyTorch's own F.linear / matmul in the same dtype, device and TF32 mode.

    Several tiles in every dimension, a fragmented mask, in_features not a multiple of any
    tile."""
    gen = torch.Generator().manual_seed(1)
    batch, in_features, capacity = 300, 200, 700
    active = make_mask("random", capacity, gen)
    live = active.nonzero().squeeze(1)
    x = torch.randn(batch, in_features, generator=gen)
    weight = torch.randn(capacity, in_features, generator=gen) / 16
    bias = torch.randn(capacity, generator=gen)
    g = torch.randn(batch, capacity, generator=gen)
    exact = F.linear(x.double(), weight[live].double(), bias[live].double())
    exact_grad_input = g[:, live].double() @ weight[live].double()
    exact_grad_weight = g[:, live].double().t() @ x.double()

    xd, wd, bd, gd = (t.to(device=device, dtype=dtype) for t in (x, weight, bias, g))
    ad, live_d = active.to(device), live.to(device)
    with tf32(allow_tf32):
        ours = ops.masked_linear(xd, wd, bd, ad, capacity)[:, live_d]
        ours_gi, ours_gw, _ = ops.masked_linear_backward(gd, xd, wd, ad, (True, True, False))
        ours_gw = ours_gw[live_d]
        torch_out = F.linear(xd, wd[live_d], bd[live_d])
        torch_gi = gd[:, live_d] @ wd[live_d]
        torch_gw = gd[:, live_d].t() @ xd
    floor = 1e-15 if dtype == torch.float64 else 0.0
    for what, got, theirs, want in (
        ("output", ours, torch_out, exact),
        ("grad input", ours_gi, torch_gi, exact_grad_input),
        ("grad weight", ours_gw, torch_gw, exact_grad_weight),
    ):
        our_error, torch_error = relative_error(got, want), relative_error(theirs, want)
        assert our_error <= 2 * torch_error + floor, (what, our_error, torch_error)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_fragmented_and_empty_masks(device, strategy, dtype):
    gen = torch.Generator().manual_seed(5)
    # Live rows at the edges of the kernels' tiles (64, 128) and of the compaction's chunks
    # (4096 rows), alone and in short runs, most rows dead.
    capacity, in_features = 9000, 24
    active = torch.zeros(capacity, dtype=torch.bool)
    for row in (0, 63, 64, 127, 128, 129, 255, 256, 4095, 4096, 4097, 8191, 8192, 8999):
        active[row] = True
    active[300:310] = True
    active[5000:5600:3] = True
    x = torch.randn(33, in_features, generator=gen).to(dtype)
    weight = (torch.randn(capacity, in_features, generator=gen) / 4).to(dtype)
    bias = torch.randn(capacity, generator=gen).to(dtype)
    for width in (capacity, 4097, 129):
        check_against_reference(device, dtype, x, weight, bias, active, width, what=f"width {width}")

    # Nothing live: every column masked, every gradient zero.
    none = torch.zeros(capacity, dtype=torch.bool)
    out = check_against_reference(device, dtype, x, weight, bias, none, 500, what="no live rows")
    assert torch.all(out == torch.finfo(dtype).min)
    # Zero width and an empty batch.
    check_against_reference(device, dtype, x, weight, bias, active, 0, what="zero width")
    check_against_reference(device, dtype, x[:0], weight, bias, active, 300, what="empty batch")


def test_odd_sizes_strides_and_shapes(device, strategy):
    gen = torch.Generator().manual_seed(6)
    for dtype in (torch.float64, torch.float16):
        # 5 x 123 x 123: no size a multiple of a tile or of a 16-byte vector
        active = make_mask("random", 123, gen)
        x = torch.randn(5, 123, generator=gen).to(dtype)
        weight = (torch.randn(123, 123, generator=gen) / 8).to(dtype)
        check_against_reference(device, dtype, x, weight, None, active, 123, what="5x123x123")
        # leading batch dimensions, batch 1, in_features 1
        check_against_reference(device, dtype, x.view(5, 1, 123), weight, None, active, 120, what="3-D input")
        check_against_reference(device, dtype, x[:1], weight, None, active, 123, what="batch 1")
        check_against_reference(device, dtype, x[:, :1].contiguous(), weight[:, :1].contiguous(), None, active, 7,
                                what="in_features 1")
    # a non-contiguous input, a transposed weight, a 1-D input, strided rows
    active = make_mask("random", 40, gen)
    x = torch.randn(16, 7, generator=gen, dtype=torch.float64).t()
    weight = torch.randn(16, 40, generator=gen, dtype=torch.float64).t()
    bias = torch.randn(40, generator=gen, dtype=torch.float64)
    assert not x.is_contiguous() and not weight.is_contiguous()
    check_against_reference(device, torch.float64, x, weight, bias, active, 39, what="strided")
    check_against_reference(device, torch.float64, x[0], weight, bias, active, 39, what="1-D input")
    wide = torch.randn(3, 40, generator=gen, dtype=torch.float64)[:, ::2]
    weight20 = torch.randn(40, 20, generator=gen, dtype=torch.float64)
    check_against_reference(device, torch.float64, wide, weight20, bias, active, 40, what="strided rows")


def test_in_features_zero(device, strategy):
    """Nothing to multiply: the output is the bias on live columns, and no kernel touches the
    (possibly null) data of an empty weight."""
    active = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool, device=device)
    weight = torch.randn(6, 0, device=device, requires_grad=True)
    bias = torch.randn(6, device=device, requires_grad=True)
    x = torch.randn(3, 0, device=device, requires_grad=True)
    out = ops.masked_linear(x, weight, bias, active, 6)
    expected = torch.where(active, bias.detach(), torch.finfo(torch.float32).min).expand(3, 6)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert x.grad.shape == (3, 0) and weight.grad.shape == (6, 0)
    torch.testing.assert_close(bias.grad, torch.where(active, 3.0, 0.0))


def test_empty_batch_and_zero_width(device, strategy):
    weight = torch.randn(6, 4, device=device, requires_grad=True)
    active = torch.tensor([1, 1, 0, 1, 0, 0], dtype=torch.bool, device=device)
    x = torch.randn(0, 4, device=device, requires_grad=True)
    out = ops.masked_linear(x, weight, None, active, 4)
    assert out.shape == (0, 4)
    out.sum().backward()
    assert x.grad.shape == (0, 4)
    assert weight.grad.shape == (6, 4) and torch.all(weight.grad == 0)
    x = torch.randn(3, 4, device=device, requires_grad=True)
    weight.grad = None
    ops.masked_linear(x, weight, None, active, 0).sum().backward()
    assert torch.all(x.grad == 0) and torch.all(weight.grad == 0)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_mask_value_and_cross_entropy_stays_finite(device, strategy, dtype):
    active = torch.tensor([1, 0, 1, 0, 0, 1], dtype=torch.bool, device=device)
    x = torch.randn(4, 3).to(device=device, dtype=dtype)
    weight = torch.randn(6, 3).to(device=device, dtype=dtype).requires_grad_()
    default = ops.masked_linear(x, weight, None, active, 6)
    assert torch.all(default[:, ~active] == torch.finfo(dtype).min)  # the lowest finite value
    assert torch.isfinite(default[:, active]).all()
    custom = ops.masked_linear(x, weight, None, active, 6, -7.5)
    assert torch.all(custom[:, ~active] == -7.5)
    loss = F.cross_entropy(default.float(), torch.tensor([0, 2, 0, 5], device=device))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(weight.grad).all()
    assert torch.all(weight.grad[~active] == 0)
    assert torch.softmax(default.float(), -1)[:, ~active].max() == 0


def odd_byte_mask(active: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """`active` as a bool view of bytes whose live entries are anything from 1 to 255, as a
    view of uint8 data or ``torch.empty(dtype=torch.bool)`` may hold, at a storage offset."""
    values = torch.randint(1, 256, (int(active.sum()),), generator=generator, dtype=torch.uint8)
    values[:2] = torch.tensor([2, 255], dtype=torch.uint8)[: values.numel()]
    raw = torch.zeros(active.numel() + 1, dtype=torch.uint8)
    raw[1:][active] = values
    return raw[1:].view(torch.bool)


@pytest.mark.parametrize("kind", ["all", "prefix", "random", "dense", "mixed", "sparse"])
def test_mask_bytes_other_than_0_and_1_are_live(device, strategy, kind):
    """A bool tensor may hold any byte, and the kernels read a nonzero byte as live, as ATen
    does: the same outputs and gradients as with the 0/1 mask, bit for bit. (Reading such a
    byte as a C++ bool is undefined behaviour, which UBSan reports even where the compiler
    happens to test it for nonzero.)"""
    gen = torch.Generator().manual_seed(21)
    capacity = CAPACITY[kind]
    active = make_mask(kind, capacity, gen)
    odd = odd_byte_mask(active, gen)
    assert torch.equal(odd.view(torch.uint8) != 0, active) and odd.view(torch.uint8).max() == 255
    x = torch.randn(3, 33, generator=gen)
    weight, bias = torch.randn(capacity, 33, generator=gen), torch.randn(capacity, generator=gen)
    width = capacity - 3
    grad_out = to(device, torch.randn(3, width, generator=gen))[0]
    for live_count in (None, int(active[:width].sum())):
        results = []
        for mask in (active, odd):
            xd, wd, bd = to(device, x, weight, bias, requires_grad=True)
            mask = mask.to(device)  # a copy keeps the bytes
            results.append(forward_and_grads(xd, wd, bd, mask, width, grad_out, -3.0, live_count))
        (out, grads), (odd_out, odd_grads) = results
        assert torch.equal(odd_out, out), f"{kind} live_count={live_count}"
        for got, want in zip(odd_grads, grads):
            assert torch.equal(got, want), f"{kind} live_count={live_count}"
    if device == "cpu":  # the paths only CUDA takes read the mask through ATen ops
        live = int(active[:width].sum())
        for path in ("packed", "dense", "dense_aligned"):
            want = path_forward_and_grads(path, x, weight, bias, active, width, grad_out, live, -3.0)
            got = path_forward_and_grads(path, x, weight, bias, odd, width, grad_out, live, -3.0)
            assert torch.equal(got[0], want[0]), path
            assert all(torch.equal(g, w) for g, w in zip(got[1], want[1])), path


OVERFLOWING_MASK_VALUES = [
    pytest.param(torch.float32, 1e300, id="f32"),
    pytest.param(torch.bfloat16, -1e300, id="bf16"),
    pytest.param(torch.float16, 1e300, id="f16"),
    pytest.param(torch.float16, -70000.0, id="f16-past-65504"),
]


# The dtypes' names as C++ prints them (at::ScalarType).
DTYPE_NAMES = {torch.float32: "Float", torch.bfloat16: "BFloat16", torch.float16: "Half"}


def overflow_message(value: float, dtype_name: str) -> str:
    return re.escape(
        f"growop.masked_linear: mask_value {value:g} cannot be converted to type {dtype_name} without overflow"
    )


@pytest.mark.parametrize("dtype,value", OVERFLOWING_MASK_VALUES)
def test_a_mask_value_the_dtype_cannot_hold_is_one_error_everywhere(device, strategy, dtype, value):
    """The value of masked columns must fit the dtype (its finite range, or inf, -inf, NaN).
    Every strategy, with the live count or without, any mask (all live too) and any sizes (an
    empty batch too), through the eager binding or the op, raises the same error before any
    work; none returns inf."""
    message = overflow_message(value, DTYPE_NAMES[dtype])
    weight = torch.randn(6, 4, dtype=dtype, device=device)
    op = torch.ops.growop.masked_linear.default
    for active in (torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool), torch.ones(6, dtype=torch.bool)):
        active = active.to(device)
        live = int(active.sum())
        for x in (torch.randn(3, 4, dtype=dtype, device=device), torch.randn(0, 4, dtype=dtype, device=device)):
            for call in (
                lambda: ops.masked_linear(x, weight, None, active, 6, value),
                lambda: ops.masked_linear(x, weight, None, active, 6, value, live),
                lambda: op(x, weight, None, active, 6, value, strategy, None),
                lambda: op(x, weight, None, active, 6, value, strategy, live),
            ):
                with pytest.raises(RuntimeError, match=message):
                    call()


@pytest.mark.parametrize("dtype,value", OVERFLOWING_MASK_VALUES)
def test_the_fake_kernel_refuses_the_same_mask_values(dtype, value):
    """The meta device and torch.compile (which traces with the fake kernel) raise the
    kernels' error, word for word."""
    message = overflow_message(value, DTYPE_NAMES[dtype])
    x, weight = torch.randn(3, 4, dtype=dtype), torch.randn(6, 4, dtype=dtype)
    active = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    with pytest.raises(RuntimeError, match=message):
        ops.masked_linear(x.to("meta"), weight.to("meta"), None, active.to("meta"), 6, value)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: ops.masked_linear(x, weight, None, active, 6, value), fullgraph=True,
                             backend="eager")
    with pytest.raises(Exception, match=message):
        compiled(x)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_mask_values_every_dtype_holds_are_allowed(device, strategy, dtype):
    """inf, -inf and NaN are values of every floating dtype; so are the ends of its finite
    range and, in float64, 1e300. Eager and compiled calls agree."""
    active = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool, device=device)
    x = torch.randn(3, 4, dtype=dtype, device=device)
    weight = torch.randn(6, 4, dtype=dtype, device=device)
    info = torch.finfo(dtype)
    values = [float("-inf"), float("inf"), float("nan"), info.min, info.max]
    values += [1e300] if dtype == torch.float64 else []

    def calls(x):
        return [ops.masked_linear(x, weight, None, active, 6, value) for value in values]

    eager = calls(x)
    for value, out in zip(values, eager):
        dead = out[:, ~active]
        assert torch.isnan(dead).all() if value != value else torch.all(dead == value), value
    torch._dynamo.reset()
    for got, want in zip(torch.compile(calls, fullgraph=True, backend="eager")(x), eager):
        torch.testing.assert_close(got, want, equal_nan=True)


def test_results_are_not_views_so_in_place_ops_may_follow(device, strategy):
    weight = torch.randn(6, 4, device=device, requires_grad=True)
    active = torch.tensor([1, 0, 1, 1, 1, 0], dtype=torch.bool, device=device)
    x = torch.randn(2, 3, 4, device=device, requires_grad=True)
    out = ops.masked_linear(x, weight, None, active, 6)
    assert out._base is None
    torch.relu_(out).sum().backward()
    grads = ops.masked_linear_backward(torch.randn(2, 3, 6, device=device), x.detach(), weight.detach(), active)
    assert all(g._base is None for g in grads)
    model = nn.Sequential(growop.GrowLinear(4, 5, device=device), nn.ReLU(inplace=True))
    model(torch.randn(3, 4, device=device)).sum().backward()


def test_backward_output_mask(device):
    """Outputs the mask leaves out are empty; the others equal the full call's."""
    gen = torch.Generator().manual_seed(9)
    active = make_mask("random", 30, gen).to(device)
    g, x, w = (torch.randn(*s, generator=gen).to(device) for s in ((4, 28), (4, 6), (30, 6)))
    full = ops.masked_linear_backward(g, x, w, active)
    assert [t.shape for t in full] == [(4, 6), (30, 6), (30,)]
    for mask in ((True, False, False), (False, True, False), (False, False, True), (False, True, True)):
        part = ops.masked_linear_backward(g, x, w, active, mask)
        for asked, got, want in zip(mask, part, full):
            if asked:
                torch.testing.assert_close(got, want)
            else:
                assert got.numel() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("kind", ["prefix", "dense", "mixed"])
@growop.strategy("gather")
def test_large_weight_gradient(dtype, kind):
    """The CPU gather kernels take weight gradients of 32 MiB and more from fresh zero pages;
    dead rows must read zero, and the storage must be ordinary writable memory."""
    gen = torch.Generator().manual_seed(6)
    in_features = 1024
    capacity = (32 << 20) // (in_features * dtype.itemsize) + 8
    active = torch.zeros(capacity, dtype=torch.bool)
    active[:900] = make_mask(kind, 900, gen)
    x = torch.randn(3, in_features, generator=gen).to(dtype)
    weight = torch.randn(capacity, in_features, generator=gen).to(dtype).requires_grad_()
    grad_out = torch.randn(3, 1000, generator=gen).to(dtype)
    ops.masked_linear(x, weight, None, active, 1000).backward(grad_out)
    expected_weight = weight.detach().double().requires_grad_()
    reference.masked_linear(x.double(), expected_weight, None, active, 1000).backward(grad_out.double())
    assert_close(weight.grad, expected_weight.grad, dtype, "grad weight")
    assert torch.all(weight.grad[~active] == 0)
    weight.grad.mul_(2).add_(1)
    assert torch.all(weight.grad[~active] == 1)


@contextlib.contextmanager
def num_threads(threads: int):
    """torch's intra-op threads set to `threads` inside the block."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@growop.strategy("gather")
def test_gather_chunks_shared_between_threads(threads, dtype):
    """The CPU gather kernels cut the gathered rows into chunks (f32 rows of 1024 elements: at
    most 1024 rows a chunk, so several per thread) and share them between torch's threads,
    each chunk writing the output columns of its span: dead rows before, between and after
    the chunks, a run multiplied in place among them, a width short of the capacity. The
    input requires grad, which the threads' GEMMs must neither record nor refuse."""
    gen = torch.Generator().manual_seed(12)
    capacity, width, in_features = 6000, 5900, 1024
    active = torch.rand(capacity, generator=gen) < 0.5
    active[:40] = False
    active[2000:2100] = True
    active[5800:] = False
    x = torch.randn(4, in_features, generator=gen).to(dtype)
    weight = (torch.randn(capacity, in_features, generator=gen) / 32).to(dtype)
    bias = torch.randn(capacity, generator=gen).to(dtype)
    with num_threads(threads):
        check_against_reference("cpu", dtype, x, weight, bias, active, width, what=f"{threads} threads")
        # runs only: nothing gathered, the dead columns between and after them filled
        runs = torch.zeros(capacity, dtype=torch.bool)
        runs[100:300] = True
        runs[400:1000] = True
        check_against_reference("cpu", dtype, x, weight, bias, runs, 1100, what=f"runs, {threads} threads")


@pytest.mark.parametrize("kind", ["random", "dense", "mixed", "single"])
@pytest.mark.parametrize("threads", [1, 2, 3])
@growop.strategy("gather")
def test_gather_threads_on_every_mask(kind, threads):
    """Each mask of conftest's make_mask with enough work per gathered row (batch 32 x 1024
    inputs) that the CPU kernels share its gathered rows between threads (at least 2^20
    multiply-adds a share; "single" stays on one), with and without bias."""
    gen = torch.Generator().manual_seed(13)
    capacity = CAPACITY[kind]
    active = make_mask(kind, capacity, gen)
    x = torch.randn(32, 1024, generator=gen)
    weight = torch.randn(capacity, 1024, generator=gen) / 32
    bias = torch.randn(capacity, generator=gen)
    with num_threads(threads):
        for b in (bias, None):
            check_against_reference(
                "cpu", torch.float32, x, weight, b, active, capacity,
                what=f"{kind}, {threads} threads, bias={b is not None}")


# ------------------------------------- the paths only CUDA takes, run on the CPU


# The extension's test-only bindings (csrc/python/testing.cpp), which run one path of the op
# on any device.
paths = ops._module._testing


def path_forward_and_grads(path, x, weight, bias, active, width, grad_out, live_count, fill, live_end=None):
    """One path of the op through the test bindings: "packed" (CUDA's gather with a live
    count, csrc/packed.h), "dense" (csrc/dense.h with the CPU's row alignment) or
    "dense_aligned" (CUDA's dense, through a padded block where the GEMM's rows would not be
    16-byte aligned; with live_count == live_end < width, CUDA's prefix form). Returns its
    output and its (input, weight, bias) gradients."""
    out = paths.path_linear(path, x, weight, bias, active, width, live_count, fill, live_end=live_end)
    grads = paths.path_linear_backward(path, grad_out, x, weight, active, live_count, True, True,
                                       bias is not None, live_end=live_end)
    return out, grads


def packed_forward_and_grads(*args):
    return path_forward_and_grads("packed", *args)


def check_path_against_reference(out, grads, x, weight, bias, active, width, grad_out, how):
    """A path's output and gradients against the reference, with -3.5 in the dead columns."""
    dtype, has_bias = x.dtype, bias is not None
    ref, ref_grads = reference_and_grads(x, weight, bias, active, width, grad_out, -3.5)
    assert out.is_contiguous(), how
    assert_close(out, ref, dtype, f"{how} output")
    assert torch.all(out[:, ~active[:width]] == -3.5), how
    for name, got, want in zip(("input", "weight", "bias"), grads, ref_grads):
        assert got.dtype == dtype, how
        assert_close(got, want, dtype, f"{how} grad {name}")
    assert torch.all(grads[1][~active] == 0) and torch.all(grads[1][width:] == 0), how
    if has_bias:
        assert torch.all(grads[2][~active] == 0) and torch.all(grads[2][width:] == 0), how


@pytest.mark.parametrize("path", ["packed", "dense_aligned", "dense"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("kind", ["all", "prefix", "random", "mixed", "sparse", "single", "none"])
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
def test_gpu_paths_match_reference_on_the_cpu(path, dtype, kind, has_bias):
    """The arithmetic of the paths CUDA takes, run on the CPU: gather on packed rows (pack
    the live rows, GEMM, spread back) and dense through an aligned block, the latter also
    bounded by live_end (one past the last live row, and halfway from there to width): the
    prefix form where the live rows are a prefix. Values and gradients against the reference,
    dead columns exactly the fill, dead rows' gradients exactly zero, at odd sizes (widths
    whose rows are not aligned) and every kind of mask."""
    gen = torch.Generator().manual_seed(12)
    capacity, in_features = CAPACITY[kind], 37
    active = make_mask(kind, capacity, gen)
    x = torch.randn(7, in_features, generator=gen).to(dtype)
    weight = (torch.randn(capacity, in_features, generator=gen) / 6).to(dtype)
    bias = torch.randn(capacity, generator=gen).to(dtype) if has_bias else None
    for width in (capacity, capacity - 5, 1, 0):
        grad_out = torch.randn(7, width, generator=gen).to(dtype)
        live, end = hints_of(active, width)
        ends = [None] if path == "packed" else [None, end, (end + width) // 2]
        for live_end in ends:
            out, grads = path_forward_and_grads(path, x, weight, bias, active, width, grad_out, live, -3.5,
                                                live_end)
            how = f"{path} {kind} width {width} live_end {live_end}"
            check_path_against_reference(out, grads, x, weight, bias, active, width, grad_out, how)


def test_packed_rows_never_read_dead_rows_and_fill_whatever_the_input():
    """Dead rows holding NaN reach no output and no gradient, and the dead columns are the
    fill even where the input is inf (the fill is written, not computed as 0 * x + fill)."""
    active = torch.tensor([1, 0, 0, 1, 1, 0, 1, 0], dtype=torch.bool)
    weight = torch.randn(8, 5, dtype=torch.float64)
    bias = torch.randn(8, dtype=torch.float64)
    weight[~active] = float("nan")
    bias[~active] = float("nan")
    x = torch.randn(4, 5, dtype=torch.float64)
    grad_out = torch.randn(4, 7, dtype=torch.float64)
    grad_out[:, 5] = float("nan")  # the gradient of a dead column is never read either
    out, (gi, gw, gb) = packed_forward_and_grads(x, weight, bias, active, 7, grad_out, 4, -2.0)
    assert torch.all(out[:, ~active[:7]] == -2.0) and torch.isfinite(out).all()
    assert torch.isfinite(gi).all() and torch.isfinite(gw[active]).all() and torch.isfinite(gb).all()
    x_inf = x.clone()
    x_inf[0, 2] = float("inf")
    out, _ = packed_forward_and_grads(x_inf, weight, bias, active, 7, grad_out, 4, -2.0)
    assert torch.all(out[:, ~active[:7]] == -2.0)
    live = active.nonzero().squeeze(1)
    torch.testing.assert_close(gi, grad_out[:, live[live < 7]] @ weight[live[live < 7]])


def test_packed_rows_check_the_live_count():
    """The packed block is sized by the caller's live count; a count that does not match the
    mask is an error (a device-side assert on CUDA), never a wrong result."""
    active = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    x, weight = torch.randn(2, 4), torch.randn(6, 4)
    for wrong in (3, 5, 0, 6):
        with pytest.raises(RuntimeError, match="live_count is not the number of live rows below width"):
            paths.path_linear("packed", x, weight, None, active, 6, wrong, 0.0)
        with pytest.raises(RuntimeError, match="live_count is not the number of live rows below width"):
            paths.path_linear_backward("packed", torch.randn(2, 6), x, weight, active, wrong, True, True, True)
    # the count is of the rows below width only
    paths.path_linear("packed", x, weight, None, active, 4, 3, 0.0)
    with pytest.raises(ValueError, match="unknown path 'gather'"):
        paths.path_linear("gather", x, weight, None, active, 4, 3, 0.0)
    with pytest.raises(TypeError, match="expected a tensor, got list"):
        paths.path_linear("packed", [1.0], weight, None, active, 4, 3, 0.0)
    with pytest.raises(TypeError, match="expected a tensor, got int"):
        paths.path_linear_backward("dense", torch.randn(2, 6), x, 7, active, 4, True, True, True)


def test_test_bindings_are_apart_from_the_production_module():
    """The path bindings live in the extension's `_testing` submodule, which says what it is;
    the module growop calls holds only the op's eager binding."""
    public = {name for name in dir(ops._module) if not name.startswith("__")}
    assert public == {"masked_linear", "_testing"}, public
    assert paths.__doc__.startswith("Test-only") and "not an API" in paths.__doc__


def test_packed_rows_are_deterministic():
    """The spread of rows writes each place once, so the packed path runs under
    torch.use_deterministic_algorithms and gives the same bits every time."""
    gen = torch.Generator().manual_seed(13)
    active = make_mask("random", 300, gen)
    x, weight = torch.randn(9, 16, generator=gen), torch.randn(300, 16, generator=gen)
    grad_out = torch.randn(9, 300, generator=gen)
    live = int(active.sum())
    saved = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = packed_forward_and_grads(x, weight, weight[:, 0], active, 300, grad_out, live, 0.0)
        second = packed_forward_and_grads(x, weight, weight[:, 0], active, 300, grad_out, live, 0.0)
    finally:
        torch.use_deterministic_algorithms(saved)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1]))


# ------------------------------------------------- the prefix form: live_count == live_end

# Widths of 128 columns are 16-byte aligned rows in every dtype; of 123, in none.
PREFIX_WIDTHS = {"aligned": 128, "unaligned": 123}
# What the prefix form never runs: a masking pass, a gather, a concatenation.
MASKING_AND_GATHER_OPS = {"aten::masked_fill", "aten::masked_fill_", "aten::where", "aten::index_select",
                          "aten::index", "aten::gather", "aten::cat"}


def prefix_case(width: int, used: int, dtype: torch.dtype, has_bias: bool, gen: torch.Generator):
    """A static_shape layer's tensors where the first `used` of `width` rows are live and
    nothing is deactivated, with NaN in every row at or past `used` (weight and bias) and in
    grad_output's columns there: whatever reads them shows it."""
    active = torch.arange(width) < used
    x = torch.randn(5, 37, generator=gen).to(dtype)
    weight = (torch.randn(width, 37, generator=gen) / 6).to(dtype)
    bias = torch.randn(width, generator=gen).to(dtype) if has_bias else None
    grad_out = torch.randn(5, width, generator=gen).to(dtype)
    for t in (weight, bias, grad_out.t()):
        if t is not None:
            t[used:] = float("nan")
    return x, weight, bias, active, grad_out


@pytest.mark.parametrize("path", ["dense_aligned", "dense"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("layout", PREFIX_WIDTHS)
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
def test_prefix_form_reads_only_the_live_rows(path, dtype, layout, has_bias):
    """live_count == live_end < width, as a static_shape layer passes them when nothing is
    deactivated: CUDA's dense (and the CPU's, with its row alignment) computes the first
    live_end columns and fills the rest. The rows at or past live_end and grad_output's
    columns there are never read (their NaN reaches nothing); those columns are exactly the
    fill and those rows' gradients exactly zero, for every dtype, rows aligned or not (through
    the padded block), and live_end from 0 to width."""
    gen = torch.Generator().manual_seed(15)
    width = PREFIX_WIDTHS[layout]
    for used in (77, 1, 0, width):
        x, weight, bias, active, grad_out = prefix_case(width, used, dtype, has_bias, gen)
        out, grads = path_forward_and_grads(path, x, weight, bias, active, width, grad_out, used, -3.5, used)
        how = f"{path} {layout} live_end {used}"
        assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads), how
        check_path_against_reference(out, grads, x, weight, bias, active, width, grad_out, how)


@pytest.mark.parametrize("layout", PREFIX_WIDTHS)
def test_prefix_form_is_one_gemm_and_a_fill(layout):
    """What the prefix form runs, as the profiler lists CUDA's dense path's ATen ops: forward,
    one GEMM straight into the output's first live_end columns (then a fill of the others);
    backward, two GEMMs and a sum on a strided view of grad_output. No masking pass, no
    gather, and no copy where the output's rows are 16-byte aligned; where they are not, the
    GEMM writes a padded block and one copy places it."""
    gen = torch.Generator().manual_seed(16)
    width, used = PREFIX_WIDTHS[layout], 77
    x, weight, _, active, grad_out = prefix_case(width, used, torch.float32, False, gen)
    copies = 0 if layout == "aligned" else 1
    with torch.profiler.profile() as forward:
        paths.path_linear("dense_aligned", x, weight, None, active, width, used, -3.5, live_end=used)
    with torch.profiler.profile() as backward:
        paths.path_linear_backward("dense_aligned", grad_out, x, weight, active, used, True, True, True,
                                   live_end=used)
    for what, prof, gemms in (("forward", forward, 1), ("backward", backward, 2)):
        counts = {e.key: e.count for e in prof.key_averages()}
        assert counts.get("aten::mm") == gemms, (what, counts)
        assert counts.get("aten::copy_", 0) == copies, (what, counts)
        assert not MASKING_AND_GATHER_OPS & counts.keys(), (what, counts)


def test_a_static_shape_prefix_runs_the_prefix_form_on_every_device(device):
    """Through the layer: a static_shape layer with nothing deactivated gives CUDA's dense its
    hints (live count and slots in use), so forward and backward run the prefix form; the
    CPU's dense ends at the last live row it reads in the mask, the same form. Rows past the
    slots in use hold NaN, which reaches nothing."""
    layer = growop.GrowLinear(16, 77, bias=False, capacity=128, static_shape=True, device=device)
    with torch.no_grad():
        layer.weight[77:] = float("nan")
    x = torch.randn(9, 16, device=device, requires_grad=True)
    grad_out = torch.randn(9, 128, device=device)
    with growop.strategy("dense"), torch.profiler.profile() as prof:
        out = layer(x)
        grads = torch.autograd.grad(out, (x, layer.weight), grad_out)
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts.get("aten::mm") == 3, counts
    assert not MASKING_AND_GATHER_OPS & counts.keys(), counts
    assert torch.all(out[:, 77:] == torch.finfo(torch.float32).min)
    torch.testing.assert_close(out[:, :77], x @ layer.weight[:77].t())
    assert torch.isfinite(grads[0]).all() and torch.all(grads[1][77:] == 0)
    torch.testing.assert_close(grads[0], grad_out[:, :77] @ layer.weight[:77])


# Hints outside their ranges: the same error from every kernel and from the fake (meta) one.
HINT_RANGE_ERRORS = {
    "count above width": ({"live_count": 7}, r"live_count must be in \[0, 6\], got 7"),
    "negative count": ({"live_count": -1}, r"live_count must be in \[0, 6\], got -1"),
    "end above width": ({"live_end": 7}, r"live_end must be in \[0, 6\], got 7"),
    "negative end": ({"live_end": -1}, r"live_end must be in \[0, 6\], got -1"),
    "count above end": ({"live_count": 4, "live_end": 3},
                        r"live_count 4 exceeds live_end 3: every live row lies below live_end, so at most 3 "
                        r"are live; pass the exact count and a bound at or past the last live row, or None"),
}


@pytest.mark.parametrize("name", HINT_RANGE_ERRORS)
def test_hints_out_of_range_are_one_error_on_every_device_and_on_meta(device, strategy, name):
    hints, message = HINT_RANGE_ERRORS[name]
    for where in (device, "meta"):
        active = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool, device=where)
        x, weight, grad_out = (torch.randn(*s, device=where) for s in ((2, 4), (6, 4), (2, 6)))
        with pytest.raises(RuntimeError, match="growop.masked_linear: " + message):
            ops.masked_linear(x, weight, None, active, 6, **hints)
        with pytest.raises(RuntimeError, match="growop.masked_linear_backward: " + message):
            ops.masked_linear_backward(grad_out, x, weight, active, **hints)


def test_the_cpu_refuses_hints_that_do_not_match_the_mask(strategy):
    """The CPU reads the mask itself and relies on no hint, but refuses a wrong one, naming
    the values and the fix, under every strategy and through both ops, as CUDA's device
    refuses it (a device-side assert); hints that hold give the unhinted result."""
    active = torch.tensor([1, 0, 1, 1, 0, 1, 0, 0], dtype=torch.bool)  # 4 live, the last row 5
    x, weight, grad_out = torch.randn(2, 4), torch.randn(8, 4), torch.randn(2, 8)
    count = r"live_count 3 does not match the mask, which has 4 live rows below width 8; pass the exact count, or None"
    end = (r"live_end 5 does not match the mask, whose row 5 is live; pass at least 6 \(one past the last live "
           r"row\), or None")
    wrong = (({"live_count": 3}, count), ({"live_end": 5}, end), ({"live_count": 3, "live_end": 6}, count),
             ({"live_count": 4, "live_end": 5}, end))
    for hints, message in wrong:
        with pytest.raises(RuntimeError, match="growop.masked_linear: " + message):
            ops.masked_linear(x, weight, None, active, 8, **hints)
        with pytest.raises(RuntimeError, match="growop.masked_linear_backward: " + message):
            ops.masked_linear_backward(grad_out, x, weight, active, **hints)
    plain = ops.masked_linear(x, weight, None, active, 8)
    plain_grads = ops.masked_linear_backward(grad_out, x, weight, active)
    for live_end in (6, 7, 8):
        torch.testing.assert_close(ops.masked_linear(x, weight, None, active, 8, None, 4, live_end), plain)
        for got, want in zip(ops.masked_linear_backward(grad_out, x, weight, active, live_count=4,
                                                        live_end=live_end), plain_grads):
            torch.testing.assert_close(got, want)


def test_dense_checks_the_hints_it_relies_on_against_the_mask():
    """CUDA's dense relies on live_end for the rows it covers and on live_count == live_end
    for skipping the masking pass; it checks both on the device (here through the bindings,
    where the device is the CPU: an error; on CUDA, a device-side assert). Never a wrong
    result."""
    active = torch.tensor([1, 1, 1, 0, 1, 0], dtype=torch.bool)  # 4 live, the last row 4
    x, weight, grad_out = torch.randn(2, 4), torch.randn(6, 4), torch.randn(2, 6)
    tail = "a row at or past live_end, below width, is live"
    prefix = r"live_count equals live_end \(or width\), but the mask has dead rows below it"
    for path in ("dense", "dense_aligned"):
        for live_count, live_end, message in ((4, 4, tail), (4, 3, tail), (5, 5, prefix), (6, None, prefix)):
            with pytest.raises(RuntimeError, match=message):
                paths.path_linear(path, x, weight, None, active, 6, live_count, 0.0, live_end=live_end)
            with pytest.raises(RuntimeError, match=message):
                paths.path_linear_backward(path, grad_out, x, weight, active, live_count, True, True, True,
                                           live_end=live_end)
        for live_end in (5, 6):  # bounds that hold: the rows below them, masked
            out, grads = path_forward_and_grads(path, x, weight, None, active, 6, grad_out, 4, -3.5, live_end)
            check_path_against_reference(out, grads, x, weight, None, active, 6, grad_out, f"{path} {live_end}")


# -------------------------------------------------------------------- the strategy rule


def test_strategy_context_manager_restores_and_checks_names():
    before = growop.get_strategy()
    with growop.strategy("gather"):
        assert growop.get_strategy() == "gather"
        with growop.strategy("dense"):
            assert growop.get_strategy() == "dense"
        assert growop.get_strategy() == "gather"
    assert growop.get_strategy() == before
    with pytest.raises(ValueError, match="growop.strategy must be one of auto, dense, gather; got 'fast'"):
        with growop.strategy("fast"):
            pass
    assert growop.get_strategy() == before
    with pytest.raises(RuntimeError, match="strategy must be 'auto', 'dense' or 'gather', got 'fast'"):
        torch.ops.growop.masked_linear(torch.ones(2, 3), torch.ones(4, 3), None,
                                       torch.ones(4, dtype=torch.bool), 4, None, "fast")


def test_environment_variable_sets_the_strategy_at_import():
    code = "import growop; print(growop.get_strategy())"
    env = dict(os.environ, GROWOP_STRATEGY="gather")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "gather"
    env["GROWOP_STRATEGY"] = "fastest"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0
    assert "GROWOP_STRATEGY must be one of auto, dense, gather; got 'fastest'" in bad.stderr


# (capacity, in_features, batch) with enough work for gather to be worth it: on CUDA at
# least 2^32 multiply-adds saved when 1 row in 32 is live (csrc/strategy.h)
SAVED_WORK_SHAPE = {"cpu": (64, 512, 4), "cuda": (2048, 8192, 512)}


def _grad_input_reads_dead_rows(device: str, live_fraction: float, live_count: bool = False) -> bool:
    """Whether a call multiplied rows that are not live, seen through a NaN in a dead row:
    dense multiplies every row below width (the mask zeroes the gradient columns, and
    0 * NaN is NaN), gather never reads a dead row. `live_count`: pass the count."""
    capacity, in_features, batch = SAVED_WORK_SHAPE[device]
    live = round(capacity * live_fraction)
    active = torch.zeros(capacity, dtype=torch.bool, device=device)
    # Spread evenly from the first row to the last: dense ends at the last live row, so the
    # dead rows it reads lie between live ones.
    active[torch.linspace(0, capacity - 1, live, device=device).round().long()] = True
    assert int(active.sum()) == live
    weight = torch.randn(capacity, in_features, device=device)
    weight[~active] = float("nan")
    x = torch.randn(batch, in_features, device=device, requires_grad=True)
    out = ops.masked_linear(x, weight, None, active, capacity, live_count=live if live_count else None)
    assert torch.isfinite(out[:, active]).all() and torch.all(out[:, ~active] == torch.finfo(torch.float32).min)
    (grad_input,) = torch.autograd.grad(out, x, torch.ones_like(out))
    return bool(grad_input.isnan().any())


def test_auto_takes_dense_where_most_rows_are_live_and_gather_where_few_are(device):
    """The rule (csrc/strategy.h): dense below the crossover width / live, or where gather
    would save too little work; gather beyond it. The CPU counts the mask itself; CUDA
    decides from the caller's live_count and, without one, takes dense."""
    reads_dead = lambda fraction, hint=False: _grad_input_reads_dead_rows(device, fraction, hint)  # noqa: E731
    with growop.strategy("dense"):
        assert reads_dead(1 / 32)
    with growop.strategy("gather"):
        assert not reads_dead(1 / 2)
    with growop.strategy("auto"):
        assert reads_dead(15 / 16, True)  # width / live = 16/15: dense
        assert not reads_dead(1 / 32, True)  # width / live = 32: gather
        assert reads_dead(1 / 32) == (device == "cuda")  # no count: the CPU counts, CUDA takes dense
        # A small call is dense whatever the ratio: gather's fixed cost would outweigh it
        # (on CUDA, a head of a few thousand rows is small).
        small = {"cpu": (12, 64, 8), "cuda": (1200, 1024, 256)}[device]
        capacity, in_features, batch = small
        active = torch.zeros(capacity, dtype=torch.bool, device=device)
        active[[0, -1]] = True  # the dead rows between them are below the last live one
        weight = torch.randn(capacity, in_features, device=device)
        weight[~active] = float("nan")
        x = torch.randn(batch, in_features, device=device, requires_grad=True)
        out = ops.masked_linear(x, weight, None, active, capacity, live_count=2)
        (grad_input,) = torch.autograd.grad(out, x, torch.ones_like(out))
        assert grad_input.isnan().any(), f"{small}: too few multiply-adds saved for gather"


# --------------------------------------------------------------------------- autograd


@pytest.mark.parametrize("kind", ["prefix", "random", "mixed"])
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("hinted", ["none", "count", "bounds"])
def test_gradcheck_and_gradgradcheck_float64(device, strategy, kind, has_bias, hinted):
    gen = torch.Generator().manual_seed(3)
    capacity = {"prefix": 9, "random": 70, "mixed": 900}[kind]  # 70: over one 64-row tile
    in_features, batch = (3, 2) if kind == "mixed" else (5, 3)
    active = make_mask(kind, capacity, gen).to(device)
    x = torch.randn(batch, in_features, dtype=torch.float64, generator=gen).to(device).requires_grad_()
    weight = torch.randn(capacity, in_features, dtype=torch.float64, generator=gen).to(device).requires_grad_()
    bias = torch.randn(capacity, dtype=torch.float64, generator=gen).to(device).requires_grad_() if has_bias else None
    width = capacity - 1
    # "bounds": live_end too, one past the last live row (for the prefix mask, the prefix form)
    live, end = hints_of(active.cpu(), width)
    live_count = live if hinted != "none" else None
    live_end = end if hinted == "bounds" else None

    def fn(x, weight, *bias_arg):
        return ops.masked_linear(x, weight, bias_arg[0] if bias_arg else None, active, width,
                                 live_count=live_count, live_end=live_end)

    inputs = (x, weight, bias) if has_bias else (x, weight)
    fast = kind != "prefix"
    # forward mode too (jvp): the op's tangent, and the backward op's, against finite
    # differences
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=fast, check_forward_ad=True)
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=fast, check_fwd_over_rev=True)

    grad_out = torch.randn(batch, width, dtype=torch.float64, generator=gen).to(device).requires_grad_()

    def backward_fn(g, x, weight):
        return ops.masked_linear_backward(g, x, weight, active, live_count=live_count, live_end=live_end)

    assert torch.autograd.gradcheck(backward_fn, (grad_out, x, weight), fast_mode=fast,
                                    check_forward_ad=True)


class GrowopCalls(TorchDispatchMode):
    """Records the hints of every growop op call that reaches the dispatcher."""

    def __init__(self):
        super().__init__()
        self.hints = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "growop":
            named = dict(zip((a.name for a in func._schema.arguments), args), **(kwargs or {}))
            self.hints.append((func.name(), named.get("live_count"), named.get("live_end")))
        return func(*args, **(kwargs or {}))


def test_autograd_passes_the_hints_to_every_call_it_makes(device, strategy):
    """The backward op, the double backward's calls and the forward-mode tangents all get the
    forward call's hints: they are about the same mask. Recorded at the dispatcher, below
    autograd."""
    gen = torch.Generator().manual_seed(17)
    active = make_mask("prefix", 9, gen).to(device)
    live, end = hints_of(active.cpu(), 8)
    x, weight, bias = (torch.randn(*s, dtype=torch.float64, generator=gen).to(device).requires_grad_()
                       for s in ((3, 5), (9, 5), (9,)))
    recorder = GrowopCalls()
    with recorder:
        out = ops.masked_linear(x, weight, bias, active, 8, live_count=live, live_end=end)
        (grad_x,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        torch.autograd.grad(grad_x.sum(), (x, weight))  # through the backward op's own backward
        with fwAD.dual_level():
            dual = ops.masked_linear(fwAD.make_dual(x.detach(), torch.ones_like(x)), weight.detach(), None, active, 8,
                                     live_count=live, live_end=end)
            fwAD.unpack_dual(dual)
    ops_seen = {name for name, *_ in recorder.hints}
    assert ops_seen == {"growop::masked_linear", "growop::masked_linear_backward"}, recorder.hints
    assert len(recorder.hints) >= 5, recorder.hints
    assert all((count, bound) == (live, end) for _, count, bound in recorder.hints), recorder.hints


def test_gradient_penalty_matches_nn_linear(device, strategy):
    """A double backward as WGAN-GP and R1 take it: the gradient of the norm of the input
    gradient, against nn.Linear on the live rows."""
    gen = torch.Generator().manual_seed(12)
    layer = growop.GrowLinear(5, 4, capacity=7, dtype=torch.float64, device=device)
    layer.grow(2)
    layer.deactivate([1])
    live = layer.active[: layer.out_features].nonzero().squeeze(1)
    linear = nn.Linear(5, len(live), dtype=torch.float64, device=device)
    with torch.no_grad():
        linear.weight.copy_(layer.weight[live])
        linear.bias.copy_(layer.bias[live])
    x = torch.randn(3, 5, dtype=torch.float64, generator=gen).to(device)

    def penalty(model, out_of):
        inp = x.clone().requires_grad_()
        out = out_of(model(inp))
        (g,) = torch.autograd.grad(torch.tanh(out).sum(), inp, create_graph=True)
        return (g.norm(dim=1) - 1).pow(2).mean()

    ours = penalty(layer, lambda out: out[:, live])
    theirs = penalty(linear, lambda out: out)
    torch.testing.assert_close(ours, theirs)
    grads = torch.autograd.grad(ours, (layer.weight, layer.bias))
    expected = torch.autograd.grad(theirs, (linear.weight, linear.bias))
    torch.testing.assert_close(grads[0][live], expected[0])
    torch.testing.assert_close(grads[1][live], expected[1])
    dead = ~layer.active
    assert torch.all(grads[0][dead] == 0) and torch.all(grads[1][dead] == 0)


def test_mask_changed_between_forward_and_backward_is_an_error(device):
    weight = torch.randn(6, 3, device=device, requires_grad=True)
    active = torch.ones(6, dtype=torch.bool, device=device)
    out = ops.masked_linear(torch.randn(2, 3, device=device), weight, None, active, 6)
    active[2] = False
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


# -------------------------------------------------------------------------- torch.func


def _grow_and_linear(device):
    """A grown, partly deactivated layer and the nn.Linear on its live rows."""
    torch.manual_seed(13)
    layer = growop.GrowLinear(4, 3, capacity=8, dtype=torch.float64, device=device)
    layer.grow(2)
    layer.deactivate([0])
    live = layer.active[: layer.out_features].nonzero().squeeze(1)
    linear = nn.Linear(4, len(live), dtype=torch.float64, device=device)
    with torch.no_grad():
        linear.weight.copy_(layer.weight[live])
        linear.bias.copy_(layer.bias[live])
    return layer, linear, live


def test_torch_func_grad_vmap_grad_and_jacrev_match_nn_linear(device, strategy):
    layer, linear, live = _grow_and_linear(device)
    x = torch.randn(6, 4, dtype=torch.float64, device=device)
    target = torch.randint(len(live), (6,), device=device)
    ours_params = {k: v.detach() for k, v in layer.named_parameters()}
    theirs_params = {k: v.detach() for k, v in linear.named_parameters()}

    def ours_loss(params, x, target):
        return F.cross_entropy(functional_call(layer, params, (x,))[..., live], target)

    def theirs_loss(params, x, target):
        return F.cross_entropy(functional_call(linear, params, (x,)), target)

    def check(ours, theirs):
        torch.testing.assert_close(ours["weight"][..., live, :], theirs["weight"])
        torch.testing.assert_close(ours["bias"][..., live], theirs["bias"])
        dead = ~layer.active
        assert torch.all(ours["weight"][..., dead, :] == 0) and torch.all(ours["bias"][..., dead] == 0)

    check(grad(ours_loss)(ours_params, x, target), grad(theirs_loss)(theirs_params, x, target))
    per_sample = vmap(grad(ours_loss), in_dims=(None, 0, 0))
    expected = vmap(grad(theirs_loss), in_dims=(None, 0, 0))
    check(per_sample(ours_params, x, target), expected(theirs_params, x, target))

    ours_jac = jacrev(lambda p: functional_call(layer, p, (x,))[:, live])(ours_params)
    theirs_jac = jacrev(lambda p: functional_call(linear, p, (x,)))(theirs_params)
    torch.testing.assert_close(ours_jac["weight"][..., live, :], theirs_jac["weight"])
    torch.testing.assert_close(ours_jac["bias"][..., live], theirs_jac["bias"])


def test_forward_mode_matches_nn_linear(device, strategy):
    """jvp, jacfwd, hessian (forward over reverse) and torch.autograd.forward_ad give
    nn.Linear's values: the ops carry forward-mode formulas instead of dropping tangents."""
    layer, linear, live = _grow_and_linear(device)
    gen = torch.Generator().manual_seed(14)
    x = torch.randn(6, 4, dtype=torch.float64, generator=gen).to(device)
    v = torch.randn(6, 4, dtype=torch.float64, generator=gen).to(device)
    ours, theirs = jvp(layer, (x,), (v,))[1], jvp(linear, (x,), (v,))[1]
    torch.testing.assert_close(ours[:, live], theirs)
    assert torch.all(ours[:, ~layer.active[: layer.out_features]] == 0)  # masked columns are constant
    torch.testing.assert_close(jacfwd(layer)(x)[:, live], jacfwd(linear)(x))

    def loss(module):
        def f(z):
            out = module(z)
            return (out[..., live] if module is layer else out).tanh().sum()
        return f

    torch.testing.assert_close(hessian(loss(layer))(x[0]), hessian(loss(linear))(x[0]))
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def loss_of_params(p):
        return functional_call(layer, p, (x,))[:, live].tanh().sum()

    fwd_over_rev = hessian(loss_of_params)(params)
    rev_over_rev = jacrev(jacrev(loss_of_params))(params)
    for a in params:
        for b in params:
            torch.testing.assert_close(fwd_over_rev[a][b], rev_over_rev[a][b])
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(layer(fwAD.make_dual(x, v))).tangent
    assert tangent is not None
    torch.testing.assert_close(tangent[:, live], theirs)


def test_bias_tangent_alone_never_multiplies_the_input(device):
    """With only the bias's tangent, the output's is that tangent in the live columns:
    an input holding inf (whose product with a zero tangent would be NaN) does not reach it."""
    layer, linear, live = _grow_and_linear(device)
    x = torch.randn(3, 4, dtype=torch.float64, device=device)
    x[0, 1] = float("inf")
    tangent = torch.randn(layer.capacity, dtype=torch.float64, device=device)
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def out_of_bias(bias):
        return functional_call(layer, {**params, "bias": bias}, (x,))

    got = jvp(out_of_bias, (params["bias"],), (tangent,))[1]
    width = layer.out_features
    want = torch.where(layer.active[:width], tangent[:width], 0).expand(3, width)
    torch.testing.assert_close(got, want)


def test_vmap_has_batching_rules_and_no_slow_path_warning(device):
    layer, linear, live = _grow_and_linear(device)
    x = torch.randn(5, 2, 4, dtype=torch.float64, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = vmap(layer)(x)
        # a vmapped weight takes the per-slice rule
        weights = layer.weight.detach().expand(5, *layer.weight.shape)
        per_weight = vmap(lambda w, x: ops.masked_linear(x, w, None, layer.active, layer.out_features))(weights, x)
    torch.testing.assert_close(out[..., live], linear(x))
    width = layer.out_features
    live_bias = torch.where(layer.active[:width], layer.bias[:width], 0)
    torch.testing.assert_close(per_weight, out - live_bias)


# ---------------------------------------------------------------- opcheck, fake, compile


def _opcheck_samples():
    gen = torch.Generator().manual_seed(4)
    samples = []
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for kind, capacity in (("prefix", 9), ("random", 301)):
            active = make_mask(kind, capacity, gen)
            x = torch.randn(2, 3, 5, generator=gen).to(dtype)
            weight = torch.randn(capacity, 5, generator=gen).to(dtype)
            bias = torch.randn(capacity, generator=gen).to(dtype)
            samples.append(pytest.param((x, weight, bias, active, capacity - 2), id=f"{dtype}-{kind}"))
    return samples


@pytest.mark.parametrize("sample", _opcheck_samples())
def test_opcheck(device, sample):
    x, weight, bias, active, width = to(device, *sample[:4]) + [sample[4]]
    differentiable = x.dtype != torch.bfloat16
    for t in (x, weight, bias):
        t.requires_grad_(differentiable)
    forward = torch.ops.growop.masked_linear.default
    torch.library.opcheck(forward, (x, weight, bias, active, width, None, growop.get_strategy(), None))
    torch.library.opcheck(forward, (x, weight, None, active, width, -1.0, "gather", int(active[:width].sum())))
    torch.library.opcheck(forward, (x, weight, bias, active, width, None, "dense", None))
    live, end = hints_of(active.cpu(), width)
    for strategy_name in ops.STRATEGIES:
        torch.library.opcheck(forward, (x, weight, bias, active, width, None, strategy_name, live, end))
    grad_out = torch.randn(*x.shape[:-1], width, dtype=x.dtype, device=device).requires_grad_(differentiable)
    backward = torch.ops.growop.masked_linear_backward.default
    for mask in ([True, True, True], [False, True, False]):
        torch.library.opcheck(backward, (grad_out, x, weight, active, mask, growop.get_strategy(), None))
        torch.library.opcheck(backward, (grad_out, x, weight, active, mask, growop.get_strategy(), live, end))


def test_fake_tensor_shapes_on_meta():
    x = torch.empty(4, 7, 3, device="meta")
    weight = torch.empty(10, 3, device="meta")
    active = torch.empty(10, dtype=torch.bool, device="meta")
    assert ops.masked_linear(x, weight, None, active, 6).shape == (4, 7, 6)
    grads = ops.masked_linear_backward(torch.empty(4, 7, 6, device="meta"), x, weight, active, (True, False, True))
    assert [g.shape for g in grads] == [(4, 7, 3), (0, 3), (10,)]


def test_meta_and_real_tensors_mixed_raise_as_the_kernels_do():
    """Any meta argument sends the call to the meta (fake) kernel, which checks devices as
    the kernels do: never an uninitialised result on the real device."""
    real = {"x": torch.randn(2, 3), "weight": torch.randn(5, 3), "active": torch.ones(5, dtype=torch.bool)}
    for name in real:
        args = {k: (torch.empty_like(v, device="meta") if k == name else v) for k, v in real.items()}
        with pytest.raises(RuntimeError, match=r"growop.masked_linear: \w+ is on (meta|cpu) but weight is on"):
            ops.masked_linear(args["x"], args["weight"], None, args["active"], 5)
        with pytest.raises(RuntimeError, match=r"growop.masked_linear_backward: \w+ is on"):
            ops.masked_linear_backward(torch.randn(2, 5), args["x"], args["weight"], args["active"])
    with pytest.raises(RuntimeError, match="input is on cpu but weight is on meta"):
        growop.GrowLinear(3, 4, device="meta")(torch.randn(2, 3))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(device, backend):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(5)
    active = make_mask("random", 40, gen).to(device)
    weight = torch.randn(40, 8, generator=gen).to(device).requires_grad_()
    bias = torch.randn(40, generator=gen).to(device).requires_grad_()
    x = torch.randn(6, 8, generator=gen).to(device)

    def step(x, weight, bias):
        return growop.masked_linear(x, weight, bias, active=active, out_features=33).logsumexp(-1).sum()

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    loss = compiled(x, weight, bias)
    grads = torch.autograd.grad(loss, (weight, bias))
    expected = step(x, weight, bias)
    expected_grads = torch.autograd.grad(expected, (weight, bias))
    torch.testing.assert_close(loss, expected)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)


def test_eager_binding_matches_the_op_and_leaves_overrides_to_it():
    """Eager calls with plain tensors take growop._C's direct binding; a tensor subclass with
    __torch_function__ and a TorchFunctionMode still see the op, as torch.ops calls let them."""
    from torch.overrides import TorchFunctionMode

    gen = torch.Generator().manual_seed(14)
    active = make_mask("random", 30, gen)
    x, weight, bias = torch.randn(5, 6, generator=gen), torch.randn(30, 6, generator=gen), torch.randn(30)
    op = torch.ops.growop.masked_linear.default
    direct = ops._masked_linear_binding(x, weight, bias, active, 28, -2.0, "auto", None)
    torch.testing.assert_close(direct, op(x, weight, bias, active, 28, -2.0, "auto", None))
    live, end = hints_of(active, 28)
    hinted = ops._masked_linear_binding(x, weight, bias, active, 28, -2.0, "dense", live, end)
    torch.testing.assert_close(hinted, op(x, weight, bias, active, 28, -2.0, "dense", live, end))
    with pytest.raises(RuntimeError, match=f"live_end {end - 1} does not match the mask"):
        ops._masked_linear_binding(x, weight, bias, active, 28, -2.0, "dense", None, end - 1)
    seen = []

    class Spy(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            seen.append(func)
            return super().__torch_function__(func, types, args, kwargs or {})

    class SpyMode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    expected = ops.masked_linear(x, weight, bias, active, 28)
    torch.testing.assert_close(ops.masked_linear(x.as_subclass(Spy), weight, bias, active, 28), expected)
    assert op in seen
    seen.clear()
    with SpyMode():
        torch.testing.assert_close(ops.masked_linear(x, weight, bias, active, 28), expected)
    assert op in seen


def test_functional_defaults_to_full_capacity():
    weight = torch.randn(6, 3)
    active = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    x = torch.randn(2, 3)
    out = growop.masked_linear(x, weight, active=active)
    torch.testing.assert_close(out, reference.masked_linear(x, weight, None, active, 6))


# ------------------------------------------------------------------------------ errors


def bad_calls(device: str):
    """Calls that must fail, with the arguments on `device`."""
    def t(*shape, dtype=torch.float32):
        return torch.ones(*shape, dtype=dtype, device=device)

    mask = t(6, dtype=torch.bool)
    w, b = t(6, 4), t(6)
    return {
        "in_features": lambda: ops.masked_linear(t(2, 5), w, b, mask, 6),
        "integer dtype": lambda: ops.masked_linear(t(2, 4, dtype=torch.long), t(6, 4, dtype=torch.long), None, mask, 6),
        "input dtype": lambda: ops.masked_linear(t(2, 4, dtype=torch.float64), w, b, mask, 6),
        "bias dtype": lambda: ops.masked_linear(t(2, 4), w, t(6, dtype=torch.float16), mask, 6),
        "mask dtype": lambda: ops.masked_linear(t(2, 4), w, b, t(6, dtype=torch.long), 6),
        "mask length": lambda: ops.masked_linear(t(2, 4), w, b, t(5, dtype=torch.bool), 6),
        "width": lambda: ops.masked_linear(t(2, 4), w, b, mask, 7),
        "bias shape": lambda: ops.masked_linear(t(2, 4), w, t(5), mask, 6),
        "weight dims": lambda: ops.masked_linear(t(2, 4), t(6, 4, 1), b, mask, 6),
        "grad_output columns": lambda: ops.masked_linear_backward(t(2, 7), t(2, 4), w, mask),
        "grad_output shape": lambda: ops.masked_linear_backward(t(3, 6), t(2, 4), w, mask),
        "grad_output dtype": lambda: ops.masked_linear_backward(t(2, 6, dtype=torch.float64), t(2, 4), w, mask),
        "backward input": lambda: ops.masked_linear_backward(t(2, 6), t(2, 5), w, mask),
        "mask_value": lambda: ops.masked_linear(t(2, 4), w, b, mask, 6, 1e300),
    }


EXPECTED_ERRORS = {
    "in_features": r"growop.masked_linear: input of shape \[2, 5\] does not match weight of shape \[6, 4\]",
    "integer dtype": "weight must be float32, float64, bfloat16 or float16, got Long",
    "input dtype": "input has dtype Double but weight has dtype Float",
    "bias dtype": "bias has dtype Half",
    "mask dtype": "active must be a 1-D bool tensor, got Long",
    "mask length": "active has 5 entries but weight has 6 rows",
    "width": r"width 7 must be in \[0, capacity = 6\]",
    "bias shape": r"bias must have shape \(6,\)",
    "weight dims": "weight must be 2-D",
    "grad_output columns": "growop.masked_linear_backward: grad_output has 7 columns but the layer has capacity 6",
    "grad_output shape": r"grad_output of shape \[3, 6\] does not match input of shape \[2, 4\]",
    "grad_output dtype": "grad_output has dtype Double but weight has dtype Float",
    "backward input": r"growop.masked_linear_backward: input of shape \[2, 5\] does not match weight",
    "mask_value": r"growop.masked_linear: mask_value 1e\+300 cannot be converted to type Float without overflow "
                  r"\(Float holds \[-3.40282e\+38, 3.40282e\+38\], inf and -inf\)",
}


@pytest.mark.parametrize("name", EXPECTED_ERRORS)
def test_errors_name_shapes_and_values(device, strategy, name):
    with pytest.raises(RuntimeError, match=EXPECTED_ERRORS[name]):
        bad_calls(device)[name]()


def error_message(call) -> str:
    with pytest.raises(RuntimeError) as info:
        call()
    return str(info.value).split("\n")[0]


@NEEDS_CUDA
def test_cuda_errors_read_as_the_cpu_ones():
    cpu, cuda = bad_calls("cpu"), bad_calls("cuda")
    for name in cpu:
        assert error_message(cuda[name]) == error_message(cpu[name]), name
    weight = torch.ones(6, 4, device="cuda")
    with pytest.raises(RuntimeError, match="active is on cpu but weight is on cuda:0"):
        ops.masked_linear(torch.ones(2, 4, device="cuda"), weight, None, torch.ones(6, dtype=torch.bool), 6)


# -------------------------------------------------------------------------------- CUDA


@NEEDS_CUDA
@pytest.mark.parametrize(
    "strategy_name,live_count,live_end",
    [("gather", 3, None), ("gather", 5, None), ("dense", 6, None), ("dense", 4, 5), ("auto", 4, 4), ("auto", 3, 3)],
)
def test_cuda_checks_the_hints_on_the_device(strategy_name, live_count, live_end):
    """A live count that does not match the mask (4 live rows of 6), or a live_end with a
    live row at or past it (the last live row is 5), where it shapes the work, is a
    device-side assert, never a silent wrong result. It kills the CUDA context, so it runs in
    a child process."""
    code = f"""
import torch, growop
from growop import ops
active = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool, device="cuda")
x, weight = torch.randn(2, 4, device="cuda"), torch.randn(6, 4, device="cuda")
with growop.strategy("{strategy_name}"):
    ops.masked_linear(x, weight, None, active, 6, live_count={live_count}, live_end={live_end})
torch.cuda.synchronize()
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "live_" in run.stderr or "device-side assert" in run.stderr, run.stderr[-2000:]
    with pytest.raises(RuntimeError, match=r"live_count must be in \[0, 6\], got 7"):
        ops.masked_linear(torch.randn(2, 4, device="cuda"), torch.randn(6, 4, device="cuda"), None,
                          torch.ones(6, dtype=torch.bool, device="cuda"), 6, live_count=7)


@NEEDS_CUDA
def test_tf32_follows_torch_switch(strategy):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(256, 512, generator=gen).cuda()
    weight = torch.randn(300, 512, generator=gen).cuda()
    active = torch.ones(300, dtype=torch.bool, device="cuda")
    exact = (x.double() @ weight.double().t()).cpu()
    with tf32(False):
        full = ops.masked_linear(x, weight, None, active, 300)
    with tf32(True):
        fast = ops.masked_linear(x, weight, None, active, 300)
    assert relative_error(full, exact) < 1e-5
    assert 1e-5 < relative_error(fast, exact) < 5e-3  # TF32: a 10-bit mantissa


@NEEDS_CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_cuda_graph_replays_follow_the_mask_without_host_syncs(strategy, dtype):
    """Neither strategy reads the mask on the host: forward and backward raise no
    synchronisation under sync-debug mode, capture in a CUDA graph, and replays follow the
    mask changed in place."""
    gen = torch.Generator().manual_seed(8)
    capacity, in_features = 1000, 64
    weight = (torch.randn(capacity, in_features, generator=gen) / 8).to(dtype).cuda().requires_grad_()
    bias = torch.randn(capacity, generator=gen).to(dtype).cuda().requires_grad_()
    x = torch.randn(32, in_features, generator=gen).to(dtype).cuda().requires_grad_()
    grad_out = torch.randn(32, capacity, generator=gen).to(dtype).cuda()
    active = make_mask("random", capacity, gen).cuda()
    live_count, live_end = hints_of(active, capacity)  # set aside while the graph is captured

    def step():
        out = ops.masked_linear(x, weight, bias, active, capacity, live_count=live_count, live_end=live_end)
        grads = torch.autograd.grad(out, (x, weight, bias), grad_out)
        return out, *grads

    graph, static = capture_cuda_graph(step)
    for kind in ("mixed", "prefix", "none", "all"):
        active.copy_(make_mask(kind, capacity, gen).cuda())
        graph.replay()
        torch.cuda.synchronize()
        ref, ref_grads = reference_and_grads(x, weight, bias, active, capacity, grad_out)
        assert_close(static[0], ref, dtype, f"replayed output ({kind})")
        for name, got, want in zip(("input", "weight", "bias"), static[1:], ref_grads):
            assert_close(got, want, dtype, f"replayed grad {name} ({kind})")
