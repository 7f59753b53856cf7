"""The masked-linear operators on every device against the float64 reference.

``DEVICES`` runs each test on the CPU and on CUDA; the CUDA half is skipped where
``torch.cuda.is_available()`` is false, so on a machine without a GPU these tests still run the
test logic itself (on the CPU kernels) and cannot rot unseen. A GPU machine whose growop build
lacks the CUDA kernels fails here instead of skipping. Helpers come from tests/test_ops.py.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from test_ops import CAPACITY, DTYPES, assert_close, make_mask

from growop import ops, reference

NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=NEEDS_CUDA)]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


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


def to(device: str, *tensors, requires_grad: bool = False):
    """Copies (or, on the CPU, fresh views) of the tensors on `device`, strides kept."""
    moved = [t.detach().to(device) if t is not None else None for t in tensors]
    if requires_grad:
        moved = [t.requires_grad_() if t is not None else None for t in moved]
    return moved


def forward_and_grads(x, weight, bias, active, width, grad_out, mask_value=None):
    """The op's output and gradients, moved to the CPU."""
    leaves = [t for t in (x, weight, bias) if t is not None]
    poison_allocator(x.device.type)
    out = ops.masked_linear(x, weight, bias, active, width, mask_value)
    # Zero width has no backward to run (the CPU kernels reject it); an empty batch has.
    grads = torch.autograd.grad(out, leaves, grad_out) if width else [torch.zeros_like(t) for t in leaves]
    return out.detach().cpu(), [g.cpu() for g in grads]


def reference_and_grads(x, weight, bias, active, width, grad_out, mask_value=None):
    """The float64 reference on the CPU, on the same values."""
    as64 = [t.detach().cpu().double().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    leaves = [t for t in as64 if t is not None]
    mask = mask_value if mask_value is not None else torch.finfo(x.dtype).min
    ref = reference.masked_linear(*as64, active.cpu(), width, mask)
    grads = (
        torch.autograd.grad(ref, leaves, grad_out.cpu().double())
        if width
        else [torch.zeros_like(t) for t in leaves]
    )
    return ref.detach(), grads


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("kind", ["all", "prefix", "random", "mixed", "single", "none"])
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
def test_values_and_grads_match_reference(device, dtype, kind, has_bias):
    gen = torch.Generator().manual_seed(0)
    capacity, in_features = CAPACITY[kind], 37
    active = make_mask(kind, capacity, gen)
    width = capacity - 5 if kind != "mixed" else capacity
    x = torch.randn(2, 5, in_features, generator=gen).to(dtype)
    weight = (torch.randn(capacity, in_features, generator=gen) / 6).to(dtype)
    bias = torch.randn(capacity, generator=gen).to(dtype) if has_bias else None
    grad_out = torch.randn(2, 5, width, generator=gen).to(dtype)
    x, weight, bias = to(device, x, weight, bias, requires_grad=True)
    active, grad_out_d = to(device, active, grad_out)

    out, grads = forward_and_grads(x, weight, bias, active, width, grad_out_d)
    ref, ref_grads = reference_and_grads(x, weight, bias, active, width, grad_out)
    assert out.shape == (2, 5, width) and out.dtype == dtype
    assert_close(out, ref, dtype, f"output on {device}")
    for name, got, expected in zip(("input", "weight", "bias"), grads, ref_grads):
        assert got.shape == expected.shape and got.dtype == dtype
        assert_close(got, expected, dtype, f"grad {name} on {device}")
    dead = ~active.cpu()
    assert torch.all(grads[1][dead] == 0), "rows that are not live must get exactly zero gradient"
    if has_bias:
        assert torch.all(grads[2][dead] == 0)
    assert torch.all(out[..., dead[:width]] == torch.finfo(dtype).min)


def relative_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    return ((got.double().cpu() - exact).norm() / exact.norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize(
    "dtype,allow_tf32",
    [(torch.bfloat16, False), (torch.float16, False), (torch.float32, False), (torch.float32, True),
     (torch.float64, False)],
    ids=["bf16", "f16", "f32", "f32-tf32", "f64"],
)
def test_error_is_at_most_twice_torch_on_the_same_inputs(device, dtype, allow_tf32):
    """Output and both weight-side gradients: the kernels' error against float64 is at most
    twice that of PyTorch's own F.linear / matmul in the same dtype, device and TF32 mode.

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
        ours_gi = ops.masked_linear_backward_input(gd, wd, ad)
        ours_gw = ops.masked_linear_backward_weight(gd, xd, ad)[live_d]
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


@pytest.mark.parametrize("kind", ["prefix", "random", "mixed"])
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
def test_gradcheck_float64(device, kind, has_bias):
    gen = torch.Generator().manual_seed(3)
    capacity = {"prefix": 9, "random": 70, "mixed": 900}[kind]  # 70: over one 64-row tile
    in_features, batch = (3, 2) if kind == "mixed" else (5, 3)
    active = make_mask(kind, capacity, gen).to(device)
    x = torch.randn(batch, in_features, dtype=torch.float64, generator=gen).to(device).requires_grad_()
    weight = torch.randn(capacity, in_features, dtype=torch.float64, generator=gen).to(device).requires_grad_()
    bias = torch.randn(capacity, dtype=torch.float64, generator=gen).to(device).requires_grad_() if has_bias else None
    width = capacity - 1

    def fn(x, weight, *bias_arg):
        return ops.masked_linear(x, weight, bias_arg[0] if bias_arg else None, active, width, None)

    inputs = (x, weight, bias) if has_bias else (x, weight)
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=kind != "prefix")


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
    x.requires_grad_(x.dtype != torch.bfloat16)
    weight.requires_grad_(x.dtype != torch.bfloat16)
    bias.requires_grad_(x.dtype != torch.bfloat16)
    torch.library.opcheck(torch.ops.growop.masked_linear.default, (x, weight, bias, active, width, None))
    torch.library.opcheck(torch.ops.growop.masked_linear.default, (x, weight, None, active, width, -1.0))
    grad = torch.randn(*x.shape[:-1], width, dtype=x.dtype, device=device)
    plain = [t.detach() for t in (x, weight)]
    torch.library.opcheck(torch.ops.growop.masked_linear_backward_input.default, (grad, plain[1], active))
    torch.library.opcheck(torch.ops.growop.masked_linear_backward_weight.default, (grad, plain[0], active))
    torch.library.opcheck(torch.ops.growop.masked_linear_backward_bias.default, (grad, active))


def check_against_reference(device, dtype, x, weight, bias, active, width, mask_value=None, what=""):
    gen = torch.Generator().manual_seed(11)
    grad_out = torch.randn(*x.shape[:-1], width, generator=gen).to(dtype)
    xd, wd, bd = to(device, x, weight, bias, requires_grad=True)
    ad, gd = to(device, active, grad_out)
    out, grads = forward_and_grads(xd, wd, bd, ad, width, gd, mask_value)
    ref, ref_grads = reference_and_grads(xd, wd, bd, ad, width, grad_out, mask_value)
    assert out.shape == ref.shape, what
    assert_close(out, ref, dtype, f"{what} output")
    for name, got, expected in zip(("input", "weight", "bias"), grads, ref_grads):
        assert_close(got, expected, dtype, f"{what} grad {name}")
    dead = ~active
    assert torch.all(grads[1][dead] == 0), what
    if bias is not None:
        assert torch.all(grads[2][dead] == 0), what
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_fragmented_and_empty_masks(device, dtype):
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


def test_odd_sizes_strides_and_shapes(device):
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
    # a non-contiguous input, a transposed weight, a 1-D input
    active = make_mask("random", 40, gen)
    x = torch.randn(16, 7, generator=gen, dtype=torch.float64).t()
    weight = torch.randn(16, 40, generator=gen, dtype=torch.float64).t()
    bias = torch.randn(40, generator=gen, dtype=torch.float64)
    assert not x.is_contiguous() and not weight.is_contiguous()
    check_against_reference(device, torch.float64, x, weight, bias, active, 39, what="strided")
    check_against_reference(device, torch.float64, x[0], weight, bias, active, 39, what="1-D input")


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_mask_value(device, dtype):
    active = torch.tensor([1, 0, 1, 0, 0, 1], dtype=torch.bool, device=device)
    x = torch.randn(4, 3).to(device=device, dtype=dtype)
    weight = torch.randn(6, 3).to(device=device, dtype=dtype)
    default = ops.masked_linear(x, weight, None, active, 6)
    assert torch.all(default[:, ~active] == torch.finfo(dtype).min)  # the lowest finite value
    custom = ops.masked_linear(x, weight, None, active, 6, -7.5)
    assert torch.all(custom[:, ~active] == -7.5)
    assert torch.isfinite(default[:, active]).all()


def test_results_are_not_views(device):
    weight = torch.randn(6, 4, device=device, requires_grad=True)
    active = torch.tensor([1, 0, 1, 1, 1, 0], dtype=torch.bool, device=device)
    x = torch.randn(2, 3, 4, device=device, requires_grad=True)
    out = ops.masked_linear(x, weight, None, active, 6)
    assert out._base is None
    torch.relu_(out).sum().backward()
    grad = ops.masked_linear_backward_input(torch.randn(2, 3, 6, device=device), weight.detach(), active)
    assert grad._base is None


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
        "grad_output columns": lambda: ops.masked_linear_backward_input(t(2, 7), w, mask),
        "grad_output shape": lambda: ops.masked_linear_backward_weight(t(3, 6), t(2, 4), mask),
        "bias grad columns": lambda: ops.masked_linear_backward_bias(t(2, 7), mask),
    }


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


@NEEDS_CUDA
def test_tf32_follows_torch_switch():
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
def test_cuda_graph_replays_follow_the_mask_without_host_syncs(dtype):
    """The ops never read the mask on the host: they capture in a CUDA graph, raise no
    synchronisation under sync-debug mode, and replays follow the mask changed in place."""
    gen = torch.Generator().manual_seed(8)
    capacity, in_features = 1000, 64
    weight = (torch.randn(capacity, in_features, generator=gen) / 8).to(dtype).cuda().requires_grad_()
    bias = torch.randn(capacity, generator=gen).to(dtype).cuda().requires_grad_()
    x = torch.randn(32, in_features, generator=gen).to(dtype).cuda()
    grad_out = torch.randn(32, capacity, generator=gen).to(dtype).cuda()
    active = make_mask("random", capacity, gen).cuda()

    def step():
        out = ops.masked_linear(x, weight, bias, active, capacity)
        grads = torch.autograd.grad(out, (weight, bias), grad_out)
        return out, *grads

    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(previous)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up on a side stream, as torch.cuda.graphs recommends
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    for kind in ("mixed", "prefix", "none", "all"):
        active.copy_(make_mask(kind, capacity, gen).cuda())
        graph.replay()
        torch.cuda.synchronize()
        ref, ref_grads = reference_and_grads(x, weight, bias, active, capacity, grad_out)
        assert_close(static[0].cpu(), ref, dtype, f"replayed output ({kind})")
        assert_close(static[1].cpu(), ref_grads[1], dtype, f"replayed grad weight ({kind})")
        assert_close(static[2].cpu(), ref_grads[2], dtype, f"replayed grad bias ({kind})")
