"""growop.linear_cross_entropy and GrowLinear.cross_entropy: the loss over live classes,
against F.cross_entropy over the gathered live columns (growop.reference), its errors, its
autograd, torch.compile, autocast, DDP, and a memory bound that fails if the logits are made."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import growop
from growop import reference
from conftest import CAPACITY, DTYPES, NEEDS_CUDA, TOLERANCES, assert_close, make_mask, run_on_ranks

IN_FEATURES = 7
TOKENS = 13  # odd, so no chunk size below divides it
MASKS = ["all", "prefix", "random", "dense", "mixed", "sparse", "single"]
REDUCTIONS = ["mean", "sum", "none"]
LOSS_OP = torch.ops.growop.linear_cross_entropy.default


def _problem(kind, dtype=torch.float64, *, bias=True, tokens=TOKENS, seed=0, classes=None,
             ignore_every=4):
    """Weight, bias, mask, input and targets of a head whose mask is `kind`; each target a
    live slot (in `classes` when given), every `ignore_every`-th ignored."""
    g = torch.Generator().manual_seed(seed)
    capacity = CAPACITY[kind]
    active = make_mask(kind, capacity, g)
    width = capacity - 3 if kind not in ("all", "sparse", "single") else capacity
    active[width:] = False
    weight = torch.randn(capacity, IN_FEATURES, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(capacity, generator=g, dtype=torch.float64).to(dtype) if bias else None
    x = torch.randn(tokens, IN_FEATURES, generator=g, dtype=torch.float64).to(dtype)
    pool = active[:width].nonzero().squeeze(1) if classes is None else torch.as_tensor(classes)
    target = pool[torch.randint(len(pool), (tokens,), generator=g)]
    target[::ignore_every] = -100
    return weight, b, active, width, x, target


def _loss_and_grads(fn, x, weight, bias):
    leaves = [t.detach().requires_grad_() for t in (x, weight) + ((bias,) if bias is not None else ())]
    loss = fn(*leaves)
    grads = torch.autograd.grad(loss.sum(), leaves)
    return loss.detach(), grads


def _assert_close_scaled(actual, expected, dtype, what, floor):
    """`actual` against `expected`, both divided by the largest |expected| (at least `floor`,
    one token's share of the loss): a dtype's rounding is relative to the values' scale, and
    gradients of a mean are small."""
    scale = expected.detach().abs().max().double().clamp_min(floor)
    assert_close(actual.detach().double() / scale, expected.detach().double() / scale, dtype, what)


def _check_against_reference(kind, dtype, reduction, smoothing, *, bias=True, classes=None,
                             class_weight=None, chunk_size=(5, 7), ignore_index=-100, seed=0,
                             live_count=None, run=None):
    """The loss and its gradients (of the loss's sum) against the reference's; `run`, where
    given, computes them instead of growop.linear_cross_entropy's autograd: run(x, weight,
    bias, target, active, width, chunk_size, live_count, **options) -> (loss, grads)."""
    weight, b, active, width, x, target = _problem(kind, dtype, bias=bias, classes=classes, seed=seed)
    if ignore_index != -100:
        target = torch.where(target == -100, ignore_index, target)
    options = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=smoothing,
                   classes=classes, class_weight=class_weight)

    def fused(x, w, *rest):
        return growop.linear_cross_entropy(x, w, target, rest[0] if rest else None, active=active,
                                           out_features=width, chunk_size=chunk_size,
                                           live_count=live_count(active, width) if live_count else None,
                                           **options)

    def plain(x, w, *rest):
        return reference.linear_cross_entropy(x, w, rest[0] if rest else None, active, target, width,
                                              **options)

    if run is None:
        loss, grads = _loss_and_grads(fused, x, weight, b)
    else:
        loss, grads = run(x, weight, b, target, active, width, chunk_size,
                          live_count(active, width) if live_count else None, **options)
    expected_loss, expected_grads = _loss_and_grads(
        plain, x.double(), weight.double(), None if b is None else b.double())
    assert loss.dtype == (torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype)
    floor = 1 / TOKENS if reduction == "mean" else 1.0
    _assert_close_scaled(loss, expected_loss, dtype, "loss", floor)
    for name, grad, expected in zip(("input", "weight", "bias"), grads, expected_grads):
        assert grad.dtype == dtype
        _assert_close_scaled(grad, expected, dtype, f"grad {name}", floor)
    dead = torch.ones(weight.shape[0], dtype=torch.bool)
    dead[torch.as_tensor(classes) if classes is not None else active[:width].nonzero().squeeze(1)] = False
    assert (grads[1][dead] == 0).all(), "a row outside the softmax got a gradient"
    if b is not None:
        assert (grads[2][dead] == 0).all(), "a bias outside the softmax got a gradient"


# ----------------------------------------------------------------------------- values and gradients


@pytest.mark.parametrize("smoothing", [0.0, 0.1], ids=["plain", "smoothed"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("kind", MASKS)
def test_matches_cross_entropy_over_live_columns(kind, dtype, reduction, smoothing):
    _check_against_reference(kind, dtype, reduction, smoothing)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["prefix", "random", "mixed"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_classes_and_class_weights(kind, reduction, with_bias):
    """A sub-loss over some live classes, class weights, and both, with label smoothing."""
    g = torch.Generator().manual_seed(1)
    _, _, active, width, _, _ = _problem(kind)
    live = active[:width].nonzero().squeeze(1)
    subset = live[torch.randperm(len(live), generator=g)[: max(1, len(live) // 2)]]
    class_weight = torch.rand(width, generator=g, dtype=torch.float64) + 0.5
    for smoothing in (0.0, 0.2):
        _check_against_reference(kind, torch.float64, reduction, smoothing, bias=with_bias,
                                 classes=subset.tolist())
        _check_against_reference(kind, torch.float64, reduction, smoothing, bias=with_bias,
                                 class_weight=class_weight)
        _check_against_reference(kind, torch.float32, reduction, smoothing, bias=with_bias,
                                 classes=subset, class_weight=class_weight.float())


@pytest.mark.parametrize(
    "chunk_size", [1, 2, 5, (3, 1), (5, 7), (13, 64), (1000, 1000), None],
    ids=lambda c: f"chunk{c}",
)
@pytest.mark.parametrize("kind", ["prefix", "mixed"])
def test_chunk_boundaries_do_not_matter(kind, chunk_size):
    """Token chunks and class pieces that divide neither the 13 tokens nor the classes."""
    for reduction in REDUCTIONS:
        _check_against_reference(kind, torch.float64, reduction, 0.1, chunk_size=chunk_size)


@pytest.mark.parametrize("tokens_per_chunk", [3, 13], ids=["per_piece", "resident"])
def test_gathered_rows_once_per_call_or_a_piece_at_a_time(tokens_per_chunk):
    """The "mixed" mask's gathered rows (its runs shorter than 64 on the CPU, all 598 live
    rows in CUDA's packed plan), 7 features each, fit in a chunk's logits at 13 tokens: they
    are gathered once per call; at 3 tokens they do not, and each class piece (50 rows, which
    divides no count here) is gathered as it is used. Both give the reference's values."""
    for run in (None, _forward_as_cuda, _backward_as_cuda):
        for reduction in REDUCTIONS:
            _check_against_reference("mixed", torch.float64, reduction, 0.1, chunk_size=(tokens_per_chunk, 50),
                                     live_count=None if run is None else _live_count, run=run)


def test_ignore_index_may_be_a_live_slot():
    """As in F.cross_entropy, ignore_index is compared with the target, even where it names a
    class: tokens whose target is that slot are ignored."""
    for reduction in REDUCTIONS:
        _check_against_reference("prefix", torch.float64, reduction, 0.1, ignore_index=5)


def test_every_target_ignored_gives_nan_mean_and_zero_gradients():
    weight, b, active, width, x, target = _problem("prefix")
    target = torch.full_like(target, -100)
    expected = F.cross_entropy(torch.randn(TOKENS, 4), target, label_smoothing=0.1)
    assert expected.isnan()  # torch's own behaviour, matched
    for reduction, value in (("mean", math.nan), ("sum", 0.0)):
        for smoothing in (0.0, 0.1):
            loss, grads = _loss_and_grads(
                lambda x, w, b: growop.linear_cross_entropy(
                    x, w, target, b, active=active, out_features=width, reduction=reduction,
                    label_smoothing=smoothing),
                x, weight, b)
            assert loss.isnan() if math.isnan(value) else loss == value
            assert all((g == 0).all() for g in grads), "ignored tokens gave a gradient"


def test_no_live_class_and_every_target_ignored():
    weight, b, active, width, x, target = _problem("prefix")
    active.zero_()
    target = torch.full_like(target, -100)
    for reduction in REDUCTIONS:
        loss, grads = _loss_and_grads(
            lambda x, w, b: growop.linear_cross_entropy(
                x, w, target, b, active=active, out_features=width, reduction=reduction,
                label_smoothing=0.1),
            x, weight, b)
        assert (loss.isnan() if reduction == "mean" else (loss == 0).all())
        assert all((g == 0).all() for g in grads)


def test_many_dimensional_input():
    weight, b, active, width, x, target = _problem("random", tokens=15)
    x, target = x.reshape(3, 5, IN_FEATURES), target.reshape(3, 5)
    loss = growop.linear_cross_entropy(x, weight, target, b, active=active, out_features=width,
                                       reduction="none", chunk_size=4)
    expected = reference.linear_cross_entropy(x, weight, b, active, target, width, reduction="none")
    assert loss.shape == (3, 5)
    assert_close(loss, expected, torch.float64, "loss")
    one = growop.linear_cross_entropy(x[0, 1], weight, target[0, 1], b, active=active,
                                      out_features=width, reduction="none")
    assert one.shape == () and torch.allclose(one, expected[0, 1])


# ----------------------------------------------------------------------------- CUDA's way, on the CPU


LOSS_AS_CUDA = growop.ops._module._testing.loss_as_cuda


def _options_as_cuda(chunk_size, live_count, classes, **options):
    """The keywords of _testing.loss_as_cuda, from _check_against_reference's."""
    chunk = (chunk_size, 0) if isinstance(chunk_size, int) else tuple(chunk_size)
    classes = None if classes is None else torch.as_tensor(classes)
    return dict(options, classes=classes, chunk_size=chunk, live_count=live_count)


def _forward_as_cuda(x, weight, b, target, active, width, chunk_size, live_count, **options):
    """The gradients the forward computes (of the loss's sum), CUDA's plan on the CPU."""
    keywords = _options_as_cuda(chunk_size, live_count, **options)
    loss, _, *grads = LOSS_AS_CUDA(x, weight, b, active, target, width, **keywords)
    return loss, grads[: 2 if b is None else 3]


def _backward_as_cuda(x, weight, b, target, active, width, chunk_size, live_count, **options):
    """The gradients the backward recomputes from the forward's log-sum-exps, for a gradient
    of ones (the loss's sum), CUDA's plan on the CPU."""
    keywords = _options_as_cuda(chunk_size, live_count, **options)
    loss, lse, *_ = LOSS_AS_CUDA(x, weight, b, active, target, width, output_mask=(False, False, False),
                                 **keywords)
    grads = LOSS_AS_CUDA(x, weight, b, active, target, width, backward=(torch.ones_like(loss), lse),
                         **keywords)
    return loss, grads[: 2 if b is None else 3]


def _live_count(active, width):
    return int(active[:width].sum())


CUDA_PLANS = {
    # kind, live count given, classes: a subset of the live slots
    "all_live": ("all", True, False),  # views of the weight, no mask read
    "packed": ("mixed", True, False),  # the live rows found on the device and gathered
    "masked": ("mixed", False, False),  # no count: every row below width, dead ones masked
    "classes": ("random", False, True),  # classes sorted and checked on the device
}


@pytest.mark.parametrize("run", [_forward_as_cuda, _backward_as_cuda], ids=["forward", "backward"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["f64", "bf16"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("plan", CUDA_PLANS)
def test_cuda_plan_matches_reference(plan, reduction, dtype, run):
    _check_plan_against_reference(plan, reduction, dtype, run)


def _check_plan_against_reference(plan, reduction, dtype, run):
    """`plan`'s case (CUDA_PLANS) computed by `run`, with and without label smoothing, with
    classes where the plan has them and class weights, against the reference."""
    kind, counted, subset = CUDA_PLANS[plan]
    _, _, active, width, _, _ = _problem(kind)
    live = active[:width].nonzero().squeeze(1)
    classes = live[1::2].tolist() if subset else None
    class_weight = torch.rand(width, generator=torch.Generator().manual_seed(4), dtype=torch.float64) + 0.5
    for smoothing in (0.0, 0.1):
        _check_against_reference(kind, dtype, reduction, smoothing, classes=classes,
                                 class_weight=class_weight, live_count=_live_count if counted else None,
                                 run=run)


def _on_cuda(x, weight, b, target, active, width, chunk_size, live_count, **options):
    """The loss and gradients of its sum computed on the GPU, brought back to the CPU."""
    cuda = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in options.items()}
    leaves = [t.detach().cuda().requires_grad_() for t in (x, weight) + ((b,) if b is not None else ())]
    loss = growop.linear_cross_entropy(leaves[0], leaves[1], target.cuda(),
                                       leaves[2] if b is not None else None, active=active.cuda(),
                                       out_features=width, chunk_size=chunk_size,
                                       live_count=live_count, **cuda)
    grads = torch.autograd.grad(loss.sum(), leaves)
    return loss.detach().cpu(), tuple(g.cpu() for g in grads)


@NEEDS_CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("plan", CUDA_PLANS)
def test_cuda_device_matches_reference(plan, reduction, dtype):
    """On a GPU, every plan, reduction and dtype against the reference, with label smoothing,
    classes and class weights."""
    _check_plan_against_reference(plan, reduction, dtype, _on_cuda)


@NEEDS_CUDA
def test_cuda_layer_loss_matches_the_cpu_and_needs_no_host_sync():
    """GrowLinear.cross_entropy on a GPU (its live count passed, as in eager mode) equals the
    CPU's, forward and backward, with no host synchronisation."""
    head = _head(dtype=torch.float32)
    x = torch.randn(TOKENS, IN_FEATURES, requires_grad=True)
    target = head.active[: head.out_features].nonzero().squeeze(1)[torch.arange(TOKENS) % 5]
    expected = head.cross_entropy(x, target, label_smoothing=0.1)
    expected.backward()
    expected_grads = (x.grad, head.weight.grad.clone(), head.bias.grad.clone())
    head.zero_grad(set_to_none=True)
    gpu = head.cuda()
    x_gpu = x.detach().cuda().requires_grad_()
    target_gpu = target.cuda()
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = gpu.cross_entropy(x_gpu, target_gpu, label_smoothing=0.1)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert_close(loss.detach().cpu(), expected.detach(), torch.float32, "loss")
    for grad, want, name in zip((x_gpu.grad, gpu.weight.grad, gpu.bias.grad), expected_grads,
                                ("input", "weight", "bias")):
        assert_close(grad.cpu(), want, torch.float32, f"grad {name}")


def test_cuda_plan_checks_on_the_device():
    weight, b, active, width, x, target = _problem("random")
    live = active[:width].nonzero().squeeze(1)
    dead = (~active[:width]).nonzero().squeeze(1)
    count = _live_count(active, width)
    target = torch.where(target == -100, live[0], target)
    cases = [
        (target.clone().index_fill_(0, torch.tensor([3]), dead[0]), {}, "a target is out of range, not live"),
        (target.clone().index_fill_(0, torch.tensor([3]), width), {"live_count": count}, "a target is out of range"),
        (torch.full_like(target, int(live[0])), {"classes": live[1:]}, "not in classes"),
        (target, {"classes": torch.cat([live, dead[:1]])}, "classes holds a slot that is not live"),
        (target, {"classes": torch.cat([live, live[:1]])}, "classes holds a slot more than once"),
        (target, {"classes": torch.cat([live, torch.tensor([width])])}, "classes holds a slot out of range"),
        (target, {"live_count": count + 1}, "live_count is not the number of live rows"),
    ]
    for t, kwargs, message in cases:
        with pytest.raises(RuntimeError, match=message):
            LOSS_AS_CUDA(x, weight, b, active, t, width, **kwargs)


# ----------------------------------------------------------------------------- the layer


def _head(static_shape=False, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    head = growop.GrowLinear(IN_FEATURES, 12, capacity=20, static_shape=static_shape, dtype=dtype)
    head.grow(3)
    head.deactivate([2, 9])
    return head


def test_label_smoothing_on_a_masked_head_is_finite_and_exact():
    """The issue's repro: F.cross_entropy over a masked head's logits with label smoothing is
    inf; the layer's loss equals F.cross_entropy on an nn.Linear holding the live rows."""
    x = torch.randn(TOKENS, 8)
    t = torch.randint(4, (TOKENS,))
    h = growop.GrowLinear(8, 5, capacity=8, static_shape=True)
    h2 = growop.GrowLinear(8, 5, capacity=8)
    h2.deactivate([4])
    for head, live in ((h, [0, 1, 2, 3, 4]), (h2, [0, 1, 2, 3])):
        assert F.cross_entropy(head(x), t, label_smoothing=0.1).isinf()
        plain = nn.Linear(8, len(live))
        with torch.no_grad():
            plain.weight.copy_(head.weight[live])
            plain.bias.copy_(head.bias[live])
        loss = head.cross_entropy(x, t, label_smoothing=0.1)
        torch.testing.assert_close(loss, F.cross_entropy(plain(x), t, label_smoothing=0.1))


def test_method_is_the_same_with_and_without_static_shape():
    x = torch.randn(TOKENS, IN_FEATURES, dtype=torch.float64)
    t = torch.tensor([0, 1, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14])
    results = []
    for static_shape in (False, True):
        head = _head(static_shape)
        loss = head.cross_entropy(x, t, label_smoothing=0.1, chunk_size=(4, 3))
        loss.backward()
        results.append((loss, head.weight.grad, head.bias.grad))
        expected = reference.linear_cross_entropy(x, head.weight, head.bias, head.active, t,
                                                  head.out_features, label_smoothing=0.1)
        assert_close(loss, expected, torch.float64, "loss")
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_method_classes_as_range_list_and_tensor_and_class_weight_per_column():
    head = _head(static_shape=True)
    x = torch.randn(TOKENS, IN_FEATURES, dtype=torch.float64)
    t = torch.randint(12, 15, (TOKENS,))
    by_range = head.cross_entropy(x, t, classes=range(12, 15))
    assert torch.equal(by_range, head.cross_entropy(x, t, classes=[14, 12, 13]))
    assert torch.equal(by_range, head.cross_entropy(x, t, classes=torch.tensor([12, 13, 14])))
    expected = reference.linear_cross_entropy(x, head.weight, head.bias, head.active, t, 15,
                                              classes=range(12, 15))
    assert_close(by_range, expected, torch.float64, "sub-loss")
    # class_weight has one entry per column of head(x): capacity ones with static_shape.
    w = torch.rand(head.capacity, dtype=torch.float64)
    weighted = head.cross_entropy(x, t, class_weight=w)
    assert_close(weighted, reference.linear_cross_entropy(
        x, head.weight, head.bias, head.active, t, 15, class_weight=w[:15]), torch.float64, "weighted")


# ----------------------------------------------------------------------------- errors


def test_bad_targets_and_classes_raise_naming_them_and_change_nothing():
    head = _head()
    x = torch.randn(4, IN_FEATURES, dtype=torch.float64)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    cases = [
        (torch.tensor([0, 2, 1, 3]), {}, IndexError, r"target 2 \(at flat index 1\) is not a live class"),
        (torch.tensor([0, 1, 15, 3]), {}, IndexError, r"target 15 \(at flat index 2\) is out of range"),
        (torch.tensor([0, -1, 1, 3]), {}, IndexError, r"target -1 .* out of range"),
        (torch.tensor([0, 1, 4, 3]), {"classes": [0, 1, 3]}, IndexError, r"target 4 .* is not in classes"),
        (torch.tensor([0, 1, 1, 3]), {"classes": [0, 1, 9]}, ValueError, r"slot 9, which is not live"),
        (torch.tensor([0, 1, 1, 3]), {"classes": [0, 1, 3, 1]}, ValueError, r"slot 1 more than once"),
        (torch.tensor([0, 1, 1, 3]), {"classes": [0, 1, 3, 20]}, IndexError, r"classes holds 20, out of range"),
        (torch.rand(4, 15), {}, TypeError, r"soft \(probability\) targets are not supported"),
        (torch.tensor([0, 1, 1, 3]), {"reduction": "avg"}, ValueError, r"reduction must be one of"),
        (torch.tensor([0, 1, 1, 3]), {"label_smoothing": 1.5}, ValueError, r"label_smoothing must be in \[0, 1\]"),
        (torch.tensor([0, 1, 1, 3]), {"chunk_size": 0}, ValueError, r"chunk_size must be"),
        (torch.tensor([0, 1, 1, 3]), {"class_weight": torch.ones(3)}, RuntimeError, r"class_weight must be .* \(15,\)"),
        (torch.tensor([0, 1, 1]), {}, RuntimeError, r"target of shape \[3\] does not match input"),
    ]
    for target, kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            head.cross_entropy(x, target, **kwargs)
    for k, v in head.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed after an error"
    assert head.weight.grad is None


def test_second_derivatives_and_forward_mode_raise_clearly():
    weight, b, active, width, x, target = _problem("random")
    w = weight.requires_grad_()
    xi = x.clone().requires_grad_()
    for reduction in ("mean", "none"):
        loss = growop.linear_cross_entropy(xi, w, target, b, active=active, out_features=width,
                                           reduction=reduction).sum()
        (gx,) = torch.autograd.grad(loss, xi, create_graph=True)
        with pytest.raises(RuntimeError, match="second derivatives are not implemented"):
            torch.autograd.grad(gx.sum(), w)
    with pytest.raises(RuntimeError, match="forward-mode AD .* is not implemented"):
        torch.func.jvp(
            lambda x: growop.linear_cross_entropy(x, weight.detach(), target, b, active=active,
                                                  out_features=width),
            (x,), (torch.ones_like(x),))


def test_torch_func_grad_matches_backward():
    weight, b, active, width, x, target = _problem("mixed")

    def loss(x, w):
        return growop.linear_cross_entropy(x, w, target, b, active=active, out_features=width,
                                           label_smoothing=0.1)

    gx, gw = torch.func.grad(loss, argnums=(0, 1))(x, weight)
    _, (ex, ew) = _loss_and_grads(lambda x, w: loss(x, w), x, weight, None)
    torch.testing.assert_close(gx, ex)
    torch.testing.assert_close(gw, ew)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_vmap_and_per_sample_gradients(reduction):
    """torch.func.vmap runs each sample's loss (and, under grad, its gradients) on its own."""
    weight, b, active, width, _, _ = _problem("mixed")
    live = active[:width].nonzero().squeeze(1)
    g = torch.Generator().manual_seed(5)
    xs = torch.randn(3, 4, IN_FEATURES, generator=g, dtype=torch.float64)
    ts = live[torch.randint(len(live), (3, 4), generator=g)]

    def loss(w, x, t):
        return growop.linear_cross_entropy(x, w, t, b, active=active, out_features=width,
                                           reduction=reduction, label_smoothing=0.1).sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(weight, xs, ts)
    expected = torch.stack([torch.func.grad(loss)(weight, xs[i], ts[i]) for i in range(3)])
    torch.testing.assert_close(per_sample, expected)
    losses = torch.func.vmap(loss, in_dims=(None, 0, 0))(weight, xs, ts)
    torch.testing.assert_close(losses, torch.stack([loss(weight, xs[i], ts[i]) for i in range(3)]))


def test_retained_graph_backward_twice_gives_the_same_gradients():
    """The forward's gradients are scaled in place only when the graph is released."""
    weight, b, active, width, x, target = _problem("random")
    w = weight.requires_grad_()
    loss = growop.linear_cross_entropy(x, w, target, b, active=active, out_features=width)
    (first,) = torch.autograd.grad(loss * 3, w, retain_graph=True)
    (second,) = torch.autograd.grad(loss * 3, w)
    assert torch.equal(first, second)


@pytest.mark.parametrize("change", ["weight", "grow", "deactivate"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_changes_between_forward_and_backward_raise_as_for_the_plain_path(reduction, dtype, change):
    """A weight changed in place, or a mask changed (grow, deactivate), between the
    forward and the backward is autograd's in-place error, as for head(x) + F.cross_entropy,
    whichever way the gradients are computed (in the forward for 'mean'/'sum' in float32, by
    recomputation for 'none' and float16)."""
    torch.manual_seed(0)
    head = growop.GrowLinear(5, 6, capacity=8, dtype=dtype)
    x = torch.randn(4, 5, dtype=dtype, requires_grad=True)
    target = torch.tensor([0, 1, 2, 3])
    for loss_of in (lambda: head.cross_entropy(x, target, reduction=reduction),
                    lambda: F.cross_entropy(head(x).float(), target, reduction=reduction)):
        loss = loss_of().sum()
        with torch.no_grad():
            if change == "weight":
                head.weight.mul_(2)
        if change == "grow":
            head.grow(1)
        elif change == "deactivate":
            head.deactivate([5])
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()
        if change == "grow":
            head.deactivate([6])
        elif change == "deactivate":
            head.reactivate([5])


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck(reduction):
    weight, b, active, width, x, target = _problem("random", tokens=5)
    w, bb, xx = (t.clone().requires_grad_() for t in (weight, b, x))
    for smoothing, classes in ((0.0, None), (0.3, active[:width].nonzero().squeeze(1)[::2].tolist())):
        if classes is not None:
            target = torch.tensor(classes)[torch.arange(5) % len(classes)]
        assert torch.autograd.gradcheck(
            lambda x, w, b: growop.linear_cross_entropy(
                x, w, target, b, active=active, out_features=width, reduction=reduction,
                label_smoothing=smoothing, classes=classes, chunk_size=(2, 3)),
            (xx, w, bb))


def test_opcheck():
    weight, b, active, width, x, target = _problem("mixed", dtype=torch.float32)
    classes = active[:width].nonzero().squeeze(1)[::3]
    target = classes[torch.arange(TOKENS) % len(classes)]
    w = torch.rand(width)
    for reduction in REDUCTIONS:
        for extra in ({}, {"classes": classes, "class_weight": w}):
            args = (x.requires_grad_(), weight.requires_grad_(), b.requires_grad_(), active, target, width,
                    extra.get("classes"), extra.get("class_weight"), -100, reduction, 0.1, [5, 7], None)
            torch.library.opcheck(LOSS_OP, args)
            plain = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
            torch.library.opcheck(torch.ops.growop._linear_cross_entropy_forward.default,
                                  (*plain, [True, True, True]))
            lse = torch.ops.growop._linear_cross_entropy_forward.default(*plain, [False] * 3)[1]
            grad = torch.rand(target.shape if reduction == "none" else ())
            torch.library.opcheck(torch.ops.growop._linear_cross_entropy_backward.default,
                                  (grad, *plain[:5], lse, *plain[5:], [True, True, True]))


# ----------------------------------------------------------------------------- compile, autocast


def test_compile_fullgraph_matches_eager_and_static_shape_grows_never_recompile():
    torch.manual_seed(0)
    head = growop.GrowLinear(16, 6, capacity=12, static_shape=True)
    body = nn.Linear(IN_FEATURES, 16)
    counter = CompileCounterWithBackend("aot_eager")

    def step(x, t):
        return head.cross_entropy(torch.relu(body(x)), t, label_smoothing=0.1, classes=range(0, 6))

    compiled = torch.compile(step, backend=counter, fullgraph=True)
    x = torch.randn(TOKENS, IN_FEATURES)
    t = torch.randint(6, (TOKENS,))
    for what in ("first call", "grow", "deactivate"):
        if what == "grow":
            head.grow(3)
        if what == "deactivate":
            head.deactivate([7])
        expected = step(x, t)
        expected.backward()
        grads = [p.grad.clone() for p in (body.weight, head.weight, head.bias)]
        for p in (body.weight, head.weight, head.bias):
            p.grad = None
        loss = compiled(x, t)
        loss.backward()
        torch.testing.assert_close(loss, expected)
        for p, g in zip((body.weight, head.weight, head.bias), grads):
            torch.testing.assert_close(p.grad, g)
            p.grad = None
        assert counter.frame_count == 1, f"{what} recompiled ({counter.frame_count} compilations)"


def test_compile_default_mode_follows_the_width():
    """Without static_shape the width is traced as an int: the first grow recompiles once with
    a dynamic width, later ones not at all (as for the layer's forward)."""
    torch.manual_seed(0)
    head = growop.GrowLinear(IN_FEATURES, 6, capacity=30)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda x, t: head.cross_entropy(x, t, reduction="none"), backend=counter,
                             fullgraph=True)
    x = torch.randn(TOKENS, IN_FEATURES)
    for _ in range(4):
        t = torch.randint(head.out_features, (TOKENS,))
        torch.testing.assert_close(compiled(x, t), head.cross_entropy(x, t, reduction="none"))
        head.grow(2)
    assert counter.frame_count <= 2, f"{counter.frame_count} compilations for 4 widths"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_autocast_multiplies_in_the_autocast_dtype_and_returns_a_float32_loss(dtype):
    head = _head(dtype=torch.float32)
    x = torch.randn(TOKENS, IN_FEATURES)
    t = torch.tensor([0, 1, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14])
    with torch.autocast("cpu", dtype=dtype):
        loss = head.cross_entropy(x, t, label_smoothing=0.1)
        expected = F.cross_entropy(head(x)[:, head.active[:15]], torch.searchsorted(
            head.active[:15].nonzero().squeeze(1), t), label_smoothing=0.1)
    assert loss.dtype == expected.dtype == torch.float32
    loss.backward()
    assert head.weight.grad.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=2e-2, atol=2e-2)
    with torch.no_grad():  # the exact loss of the rounded operands: only the products' rounding differs
        exact = reference.linear_cross_entropy(x.to(dtype).double(), head.weight.to(dtype).double(),
                                               head.bias.to(dtype).double(), head.active, t, 15,
                                               label_smoothing=0.1)
    assert_close(loss.detach(), exact, dtype, "loss")


# ----------------------------------------------------------------------------- memory


def _largest_allocation(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(e.self_cpu_memory_usage for e in prof.events())


def test_logits_are_never_made():
    """The largest single allocation of a forward+backward stays far below the (tokens,
    capacity) logits; a chunk as large as every token (the logits made at once) would not."""
    torch.manual_seed(0)
    tokens, capacity = 16384, 4096
    head = growop.GrowLinear(16, 3200, capacity=capacity)
    head.deactivate(torch.randperm(3200)[:200])
    live = head.active.nonzero().squeeze(1)
    x = torch.randn(tokens, 16, requires_grad=True)
    t = live[torch.randint(len(live), (tokens,))]
    logits_bytes = tokens * capacity * 4

    def step(chunk_size=None):
        head.cross_entropy(x, t, label_smoothing=0.1, chunk_size=chunk_size).backward()

    assert _largest_allocation(step) < logits_bytes / 8
    # The measurement sees a materialised logits matrix: one chunk of every token is one.
    assert _largest_allocation(lambda: step(tokens)) > logits_bytes / 2


# ----------------------------------------------------------------------------- DDP


class _Classifier(nn.Module):
    """A body and a GrowLinear head whose forward returns the fused loss."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(IN_FEATURES, IN_FEATURES)
        self.head = growop.GrowLinear(IN_FEATURES, 9, capacity=16)
        self.head.deactivate([3])

    def forward(self, x, t):
        return self.head.cross_entropy(torch.relu(self.body(x)), t, label_smoothing=0.1)


def _ddp_batch():
    x = torch.randn(2, TOKENS, IN_FEATURES, generator=torch.Generator().manual_seed(1))
    live = torch.tensor([0, 1, 2, 4, 5, 6, 7, 8])
    return x, live[torch.randint(8, (2, TOKENS), generator=torch.Generator().manual_seed(2))]


def _ddp_scenario(rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(_Classifier())
    x, t = _ddp_batch()
    model(x[rank], t[rank]).backward()
    return {"grads": [p.grad.clone() for p in model.module.parameters()]}


def test_ddp_two_processes_average_gradients(tmp_path):
    """Each rank's mean over its half: DDP's average is the mean over the whole batch."""
    results = run_on_ranks(_ddp_scenario, tmp_path)
    model = _Classifier()
    x, t = _ddp_batch()
    model(x.reshape(-1, IN_FEATURES), t.reshape(-1)).backward()
    for rank in range(2):
        for got, p in zip(results[rank]["grads"], model.parameters()):
            torch.testing.assert_close(got, p.grad)
