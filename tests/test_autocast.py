"""GrowLinear under torch.autocast behaves as nn.Linear does.

Inside ``torch.autocast("cpu", dtype=...)`` the layer computes in the autocast dtype from
float32 parameters and input, returns that dtype, and its float32 parameters get float32
gradients; values are those of ``nn.Linear`` under the same autocast, on the live rows.
The dtype comes from the context at run time, so bfloat16 and float16 both work.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import AUTOCAST_DTYPES, AUTOCAST_TOLERANCES
from growop import GrowLinear

IN, OUT, CAPACITY, BATCH = 37, 5, 9, 11


def make_pair(seed: int = 0, **kwargs) -> tuple[GrowLinear, nn.Linear]:
    """A layer with a masked row, and the nn.Linear holding its first CAPACITY rows."""
    torch.manual_seed(seed)
    layer = GrowLinear(IN, OUT, capacity=CAPACITY, **kwargs)
    layer.deactivate(2)
    linear = nn.Linear(IN, CAPACITY)
    with torch.no_grad():
        linear.weight.copy_(layer.weight)
        linear.bias.copy_(layer.bias)
    return layer, linear


def inputs(seed: int = 1) -> torch.Tensor:
    return torch.randn(3, BATCH, IN, generator=torch.Generator().manual_seed(seed))


def live_columns(layer: GrowLinear) -> torch.Tensor:
    return layer.active[: layer.out_features].nonzero().squeeze(1)


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES.values(), ids=AUTOCAST_DTYPES.keys())
def test_like_linear_output_dtype_values_and_float32_grads(dtype):
    layer, linear = make_pair()
    x = inputs().requires_grad_()
    x_linear = x.detach().clone().requires_grad_()
    live = live_columns(layer)
    with torch.autocast("cpu", dtype=dtype):
        out = layer(x)
        expected = linear(x_linear)
    assert out.dtype == expected.dtype == dtype
    atol, rtol = AUTOCAST_TOLERANCES[dtype]
    torch.testing.assert_close(out[..., live], expected[..., live], atol=atol, rtol=rtol)

    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    out[..., live].backward(grad[..., live].to(dtype))
    expected[..., live].backward(grad[..., live].to(dtype))
    for name, got, want in [
        ("weight", layer.weight.grad, linear.weight.grad),
        ("bias", layer.bias.grad, linear.bias.grad),
        ("input", x.grad, x_linear.grad),
    ]:
        assert got.dtype == torch.float32, f"{name} grad is {got.dtype}"
        torch.testing.assert_close(
            got, want, atol=5 * atol, rtol=5 * rtol, msg=lambda m, n=name: f"grad {n}: {m}"
        )
    assert (layer.weight.grad[2] == 0).all() and (layer.weight.grad[OUT:] == 0).all()


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES.values(), ids=AUTOCAST_DTYPES.keys())
def test_masked_columns_are_the_lowest_finite_value_of_the_autocast_dtype(dtype):
    layer, _ = make_pair(static_shape=True)
    with torch.autocast("cpu", dtype=dtype):
        out = layer(inputs())
        loss = F.cross_entropy(out.flatten(0, 1), torch.zeros(3 * BATCH, dtype=torch.long))
    masked = ~layer.active
    assert out.isfinite().all()
    assert (out[..., masked] == torch.finfo(dtype).min).all()  # -65504 in float16, not -inf
    assert loss.isfinite()
    loss.backward()
    assert layer.weight.grad.isfinite().all()


def test_float64_is_not_cast_and_outside_autocast_nothing_changes():
    layer, linear = make_pair()
    x = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.autocast("cpu", enabled=False):
            assert layer(x).dtype == torch.float32
    assert layer(x).dtype == torch.float32
    layer64, linear64 = layer.double(), linear.double()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as autocast does, float64 stays
        assert layer64(x.double()).dtype == linear64(x.double()).dtype == torch.float64


def test_bfloat16_parameters_under_autocast_stay_bfloat16():
    layer, _ = make_pair()
    layer = layer.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(inputs())  # float32 input meets bfloat16 weights: the input is cast
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert layer.weight.grad.dtype == torch.bfloat16


def test_compiled_under_autocast_matches_eager():
    torch._dynamo.reset()
    layer, _ = make_pair(static_shape=True)
    x = inputs()

    def forward(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return layer(x)

    compiled = torch.compile(forward, backend="aot_eager", fullgraph=True)
    got, want = compiled(x), forward(x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    (got_grad,) = torch.autograd.grad(got.float().logsumexp(-1).sum(), layer.weight)
    (want_grad,) = torch.autograd.grad(want.float().logsumexp(-1).sum(), layer.weight)
    assert got_grad.dtype == torch.float32
    torch.testing.assert_close(got_grad, want_grad)
    torch._dynamo.reset()


@pytest.mark.skipif(
    not torch.cuda.is_available()
    or not torch._C._dispatch_has_kernel_for_dispatch_key("growop::masked_linear", "CUDA"),
    reason="needs CUDA and growop's CUDA kernels",
)
@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES.values(), ids=AUTOCAST_DTYPES.keys())
def test_cuda_autocast_uses_the_context_dtype(dtype):
    layer, linear = make_pair()
    layer, linear = layer.cuda(), linear.cuda()
    x = inputs().cuda()
    live = live_columns(layer)
    with torch.autocast("cuda", dtype=dtype):
        out, expected = layer(x), linear(x)
    assert out.dtype == expected.dtype == dtype
    atol, rtol = AUTOCAST_TOLERANCES[dtype]
    torch.testing.assert_close(out[..., live], expected[..., live], atol=atol, rtol=rtol)
    out.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32
