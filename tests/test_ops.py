"""The masked-linear operators against the pure-PyTorch reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import growop
from growop import ops, reference

DTYPES = {"f32": torch.float32, "f64": torch.float64, "bf16": torch.bfloat16, "f16": torch.float16}
# (atol, rtol) for a result computed in the dtype against the float64 reference.
TOLERANCES = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (6e-2, 2e-2),
    torch.float16: (1e-2, 1e-2),
}


def make_mask(kind: str, capacity: int, generator: torch.Generator) -> torch.Tensor:
    """Masks that exercise each way the kernels cover live rows."""
    active = torch.zeros(capacity, dtype=torch.bool)
    if kind == "all":
        active[:] = True
    elif kind == "prefix":
        active[: capacity * 2 // 3] = True
    elif kind == "random":  # short runs only: every live row is gathered
        active = torch.rand(capacity, generator=generator) < 0.5
    elif kind == "dense":  # short runs, dense enough for whole-span weight gradients
        active = torch.rand(capacity, generator=generator) < 0.9
    elif kind == "mixed":  # long runs used in place plus fragments, several gather chunks
        active[:100] = True
        active[150:650] = torch.rand(500, generator=generator) < 0.6
        active[700:] = True
    elif kind == "single":
        active[capacity // 2] = True
    elif kind != "none":
        raise ValueError(kind)
    return active


CAPACITY = {"all": 90, "prefix": 90, "random": 300, "dense": 300, "mixed": 900, "single": 90, "none": 90}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str):
    atol, rtol = TOLERANCES[dtype]
    actual, expected = actual.double(), expected.double()
    bad = ~torch.isclose(actual, expected, atol=atol, rtol=rtol)
    if bad.any():
        where = bad.nonzero()[:5].tolist()
        pytest.fail(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements differ; first at {where}: "
            f"got {actual[bad][:5].tolist()}, expected {expected[bad][:5].tolist()}"
        )


def run_both(x, weight, bias, active, width, mask_value=None):
    """Output and gradients of the op and of the float64 reference on the same inputs."""
    leaves = [t for t in (x, weight, bias) if t is not None]
    out = ops.masked_linear(x, weight, bias, active, width, mask_value)
    grad_out = torch.randn(out.shape, dtype=torch.float64).to(out.dtype)
    grads = torch.autograd.grad(out, leaves, grad_out) if out.numel() else None

    as64 = [t.detach().double().requires_grad_() for t in leaves]
    x64, w64 = as64[0], as64[1]
    b64 = as64[2] if bias is not None else None
    ref_mask = mask_value if mask_value is not None else torch.finfo(x.dtype).min
    ref = reference.masked_linear(x64, w64, b64, active, width, ref_mask)
    ref_grads = torch.autograd.grad(ref, as64, grad_out.double()) if out.numel() else None
    return out, grads, ref, ref_grads


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("kind", ["all", "prefix", "random", "dense", "mixed", "single", "none"])
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
def test_values_and_grads_match_reference(dtype, kind, has_bias):
    gen = torch.Generator().manual_seed(0)
    capacity, in_features = CAPACITY[kind], 37
    active = make_mask(kind, capacity, gen)
    width = capacity - 5 if kind != "mixed" else capacity
    x = torch.randn(2, 5, in_features, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(capacity, in_features, generator=gen) / 6).to(dtype).requires_grad_()
    bias = torch.randn(capacity, generator=gen).to(dtype).requires_grad_() if has_bias else None

    out, grads, ref, ref_grads = run_both(x, weight, bias, active, width)
    assert out.shape == (2, 5, width) and out.dtype == dtype
    assert_close(out, ref, dtype, "output")
    for name, got, expected in zip(("input", "weight", "bias"), grads, ref_grads):
        assert got.shape == expected.shape
        assert_close(got, expected, dtype, f"grad {name}")
    dead = ~active
    assert torch.all(grads[1][dead] == 0), "rows that are not live must get exactly zero gradient"
    if has_bias:
        assert torch.all(grads[2][dead] == 0)
    masked_columns = out[..., dead[:width]]
    assert torch.all(masked_columns == torch.finfo(dtype).min)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("kind", ["prefix", "dense", "mixed"])
def test_large_weight_gradient(dtype, kind):
    """Gradients of 32 MiB and more come from fresh zero pages; dead rows must read zero."""
    gen = torch.Generator().manual_seed(6)
    in_features = 1024
    capacity = (32 << 20) // (in_features * dtype.itemsize) + 8
    active = torch.zeros(capacity, dtype=torch.bool)
    active[: 900] = make_mask(kind, 900, gen)
    x = torch.randn(3, in_features, generator=gen).to(dtype)
    weight = torch.randn(capacity, in_features, generator=gen).to(dtype).requires_grad_()
    grad_out = torch.randn(3, 1000, generator=gen).to(dtype)
    ops.masked_linear(x, weight, None, active, 1000).backward(grad_out)
    expected_weight = weight.detach().double().requires_grad_()
    reference.masked_linear(x.double(), expected_weight, None, active, 1000).backward(grad_out.double())
    assert_close(weight.grad, expected_weight.grad, dtype, "grad weight")
    assert torch.all(weight.grad[~active] == 0)
    weight.grad.mul_(2).add_(1)  # the storage is ordinary, writable memory
    assert torch.all(weight.grad[~active] == 1)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_low_precision_error_is_like_pytorch_linear(dtype):
    """The kernel's error is at most a small multiple of F.linear's own on the same inputs."""
    gen = torch.Generator().manual_seed(1)
    capacity, in_features = 900, 256
    active = make_mask("mixed", capacity, gen)
    x = torch.randn(64, in_features, generator=gen)
    weight = torch.randn(capacity, in_features, generator=gen) / 16
    bias = torch.randn(capacity, generator=gen)
    live = active.nonzero().squeeze(1)
    exact = F.linear(x.double(), weight[live].double(), bias[live].double())
    ours = ops.masked_linear(x.to(dtype), weight.to(dtype), bias.to(dtype), active, capacity)
    torch_linear = F.linear(x.to(dtype), weight[live].to(dtype), bias[live].to(dtype))
    our_error = (ours[:, live].double() - exact).abs().max().item()
    torch_error = (torch_linear.double() - exact).abs().max().item()
    assert our_error <= 2 * torch_error + 1e-12, (our_error, torch_error)


def test_odd_shapes_noncontiguous_and_one_dimensional_input():
    gen = torch.Generator().manual_seed(2)
    capacity, in_features = 13, 3
    active = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1, 0, 0], dtype=torch.bool)
    weight = torch.randn(capacity, in_features, generator=gen, dtype=torch.float64)
    bias = torch.randn(capacity, generator=gen, dtype=torch.float64)
    x = torch.randn(in_features, 7, generator=gen, dtype=torch.float64).t()  # not contiguous
    assert not x.is_contiguous()
    expected = reference.masked_linear(x, weight, bias, active, 11)
    torch.testing.assert_close(ops.masked_linear(x, weight, bias, active, 11), expected)
    vector = torch.randn(1, generator=gen, dtype=torch.float64)  # 1-D input, in_features 1
    column = weight[:, :1].contiguous()
    out = ops.masked_linear(vector, column, bias, active, 11)
    assert out.shape == (11,)
    torch.testing.assert_close(out, reference.masked_linear(vector, column, bias, active, 11))
    wide = torch.randn(3, 40, generator=gen, dtype=torch.float64)[:, ::2]  # strided rows
    weight20 = torch.randn(5, 20, generator=gen, dtype=torch.float64)
    mask5 = torch.tensor([1, 1, 0, 1, 0], dtype=torch.bool)
    torch.testing.assert_close(
        ops.masked_linear(wide, weight20, None, mask5, 5),
        reference.masked_linear(wide, weight20, None, mask5, 5),
    )


def test_empty_batch_and_zero_width():
    weight = torch.randn(6, 4, requires_grad=True)
    active = torch.tensor([1, 1, 0, 1, 0, 0], dtype=torch.bool)
    x = torch.randn(0, 4, requires_grad=True)
    out = ops.masked_linear(x, weight, None, active, 4)
    assert out.shape == (0, 4)
    out.sum().backward()
    assert x.grad.shape == (0, 4)
    assert weight.grad.shape == (6, 4) and torch.all(weight.grad == 0)
    assert ops.masked_linear(torch.randn(3, 4), weight, None, active, 0).shape == (3, 0)


def test_custom_mask_value_and_cross_entropy_stays_finite():
    weight = torch.randn(5, 3, requires_grad=True)
    active = torch.tensor([1, 0, 1, 0, 0], dtype=torch.bool)
    x = torch.randn(4, 3)
    out = ops.masked_linear(x, weight, None, active, 5, -7.5)
    assert torch.all(out[:, ~active] == -7.5)
    logits = ops.masked_linear(x, weight, None, active, 5)
    loss = F.cross_entropy(logits, torch.tensor([0, 2, 0, 2]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(weight.grad).all()
    assert torch.all(weight.grad[~active] == 0)
    assert torch.softmax(logits, -1)[:, ~active].max() == 0


@pytest.mark.parametrize("kind", ["prefix", "random", "dense", "mixed"])
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
def test_gradcheck_float64(kind, has_bias):
    gen = torch.Generator().manual_seed(3)
    capacity = {"prefix": 9, "random": 11, "dense": 40, "mixed": 900}[kind]
    in_features, batch = (3, 2) if kind == "mixed" else (4, 3)
    active = make_mask(kind, capacity, gen)
    x = torch.randn(batch, in_features, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(capacity, in_features, dtype=torch.float64, generator=gen, requires_grad=True)
    bias = torch.randn(capacity, dtype=torch.float64, generator=gen, requires_grad=True) if has_bias else None
    width = capacity - 1

    def fn(x, weight, *bias_arg):
        return ops.masked_linear(x, weight, bias_arg[0] if bias_arg else None, active, width, None)

    inputs = (x, weight, bias) if has_bias else (x, weight)
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=kind == "mixed")


def _opcheck_samples():
    gen = torch.Generator().manual_seed(4)
    samples = []
    for dtype in (torch.float32, torch.float64):
        for kind, capacity in (("prefix", 9), ("random", 301)):
            active = make_mask(kind, capacity, gen)
            x = torch.randn(2, 3, 5, generator=gen).to(dtype).requires_grad_()
            weight = torch.randn(capacity, 5, generator=gen).to(dtype).requires_grad_()
            bias = torch.randn(capacity, generator=gen).to(dtype).requires_grad_()
            samples.append((x, weight, bias, active, capacity - 2))
    return samples


@pytest.mark.parametrize("sample", _opcheck_samples())
def test_opcheck(sample):
    x, weight, bias, active, width = sample
    torch.library.opcheck(torch.ops.growop.masked_linear.default, (x, weight, bias, active, width, None))
    torch.library.opcheck(torch.ops.growop.masked_linear.default, (x, weight, None, active, width, -1.0))
    grad = torch.randn(*x.shape[:-1], width, dtype=x.dtype)
    plain = [t.detach() for t in (x, weight)]
    torch.library.opcheck(torch.ops.growop.masked_linear_backward_input.default, (grad, plain[1], active))
    torch.library.opcheck(torch.ops.growop.masked_linear_backward_weight.default, (grad, plain[0], active))
    torch.library.opcheck(torch.ops.growop.masked_linear_backward_bias.default, (grad, active))


def test_fake_tensor_shapes_on_meta():
    x = torch.empty(4, 7, 3, device="meta")
    weight = torch.empty(10, 3, device="meta")
    active = torch.empty(10, dtype=torch.bool, device="meta")
    assert ops.masked_linear(x, weight, None, active, 6).shape == (4, 7, 6)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(5)
    active = make_mask("random", 40, gen)
    weight = torch.randn(40, 8, generator=gen, requires_grad=True)
    bias = torch.randn(40, generator=gen, requires_grad=True)
    x = torch.randn(6, 8, generator=gen)

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


def test_functional_defaults_to_full_capacity():
    weight = torch.randn(6, 3)
    active = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    x = torch.randn(2, 3)
    out = growop.masked_linear(x, weight, active=active)
    torch.testing.assert_close(out, reference.masked_linear(x, weight, None, active, 6))


def test_mask_changed_between_forward_and_backward_is_an_error():
    weight = torch.randn(6, 3, requires_grad=True)
    active = torch.ones(6, dtype=torch.bool)
    out = ops.masked_linear(torch.randn(2, 3), weight, None, active, 6)
    active[2] = False
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


class TestErrors:
    def setup_method(self):
        self.weight = torch.randn(6, 4)
        self.bias = torch.randn(6)
        self.active = torch.ones(6, dtype=torch.bool)

    def call(self, x=None, weight=None, bias="same", active=None, width=6):
        return ops.masked_linear(
            torch.randn(2, 4) if x is None else x,
            self.weight if weight is None else weight,
            self.bias if bias == "same" else bias,
            self.active if active is None else active,
            width,
        )

    def test_wrong_in_features_names_shapes(self):
        with pytest.raises(RuntimeError, match=r"input of shape \[2, 5\] does not match weight of shape \[6, 4\]"):
            self.call(x=torch.randn(2, 5))

    def test_integer_dtypes(self):
        with pytest.raises(RuntimeError, match="weight must be float32, float64, bfloat16 or float16, got Long"):
            self.call(x=torch.ones(2, 4, dtype=torch.long), weight=torch.ones(6, 4, dtype=torch.long), bias=None)

    def test_mismatched_dtypes(self):
        with pytest.raises(RuntimeError, match="input has dtype Double but weight has dtype Float"):
            self.call(x=torch.randn(2, 4, dtype=torch.float64))
        with pytest.raises(RuntimeError, match="bias has dtype Half"):
            self.call(bias=self.bias.half())

    def test_bad_mask(self):
        with pytest.raises(RuntimeError, match="active must be a 1-D bool tensor, got Long"):
            self.call(active=torch.ones(6, dtype=torch.long))
        with pytest.raises(RuntimeError, match="active has 5 entries but weight has 6 rows"):
            self.call(active=torch.ones(5, dtype=torch.bool))

    def test_width_out_of_range(self):
        with pytest.raises(RuntimeError, match=r"width 7 must be in \[0, capacity = 6\]"):
            self.call(width=7)

    def test_bias_shape(self):
        with pytest.raises(RuntimeError, match=r"bias must have shape \(6,\)"):
            self.call(bias=torch.randn(5))

    def test_weight_not_matrix(self):
        with pytest.raises(RuntimeError, match="weight must be 2-D"):
            self.call(weight=torch.randn(6, 4, 1))

    def test_backward_ops_check_shapes(self):
        with pytest.raises(RuntimeError, match="grad_output has 7 columns but the layer has capacity 6"):
            ops.masked_linear_backward_input(torch.randn(2, 7), self.weight, self.active)
        with pytest.raises(RuntimeError, match="does not match input of shape"):
            ops.masked_linear_backward_weight(torch.randn(3, 6), torch.randn(2, 4), self.active)
        with pytest.raises(RuntimeError, match="more columns than the capacity"):
            ops.masked_linear_backward_bias(torch.randn(2, 7), self.active)


def test_results_are_not_views_so_in_place_ops_may_follow():
    weight = torch.randn(6, 4, requires_grad=True)
    active = torch.tensor([1, 0, 1, 1, 1, 0], dtype=torch.bool)
    x = torch.randn(2, 3, 4, requires_grad=True)
    out = ops.masked_linear(x, weight, None, active, 6)
    assert out._base is None
    torch.relu_(out).sum().backward()
    grads = (ops.masked_linear_backward_input(torch.randn(2, 3, 6), weight.detach(), active),
             ops.masked_linear_backward_input(torch.randn(2, 6), weight.detach(), active[[0, 1, 2, 3, 5, 4]]))
    assert all(g._base is None for g in grads)
    model = torch.nn.Sequential(growop.GrowLinear(4, 5), torch.nn.ReLU(inplace=True))
    model(torch.randn(3, 4)).sum().backward()


def test_zero_width_and_zero_in_features():
    weight = torch.randn(6, 4, requires_grad=True)
    active = torch.ones(6, dtype=torch.bool)
    x = torch.randn(3, 4, requires_grad=True)
    ops.masked_linear(x, weight, None, active, 0).sum().backward()
    assert torch.all(x.grad == 0) and torch.all(weight.grad == 0)
    assert ops.masked_linear_backward_input(torch.randn(2, 5, 0), weight, active).shape == (2, 5, 4)
    assert ops.masked_linear_backward_weight(torch.randn(2, 0), torch.randn(2, 4), active).shape == (6, 4)
    empty_weight = torch.randn(6, 0, requires_grad=True)
    bias = torch.randn(6, requires_grad=True)
    out = ops.masked_linear(torch.randn(3, 0), empty_weight, bias, active, 6)
    torch.testing.assert_close(out, bias.detach().expand(3, 6))
    out.sum().backward()
    assert empty_weight.grad.shape == (6, 0)
    torch.testing.assert_close(bias.grad, torch.full((6,), 3.0))
