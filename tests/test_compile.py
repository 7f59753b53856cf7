"""GrowLinear under torch.compile: equal to eager, and which changes recompile.

``static_shape=True`` is the mode for compiled training: grow, deactivate and reactivate
within capacity change only tensor values, so the graph compiled first serves throughout.
Without it the output width is ``out_features``: the first grow recompiles once with a
symbolic width, and later grows reuse that graph.

Compilations are counted with ``CompileCounterWithBackend`` (one per Dynamo frame
compiled); every test starts from ``torch._dynamo.reset()``. Graphs are compiled with
``fullgraph=True``, so a graph break in ``GrowLinear.forward`` fails the test.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import growop
from growop import GrowLinear

IN, HIDDEN, OUT, CAPACITY, BATCH = 6, 10, 3, 9, 7


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def make_model(static_shape: bool, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(IN, HIDDEN),
        nn.Tanh(),
        GrowLinear(HIDDEN, OUT, capacity=CAPACITY, static_shape=static_shape),
    )


def inputs(step: int = 0) -> torch.Tensor:
    return torch.randn(BATCH, IN, generator=torch.Generator().manual_seed(100 + step))


def assert_same_as_eager(compiled, model, x, what: str) -> None:
    got, want = compiled(x), model(x)
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    torch.testing.assert_close(got, want, atol=0, rtol=0, msg=lambda m: f"{what}: {m}")


def test_static_shape_grow_deactivate_reactivate_never_recompile(strategy):
    model = make_model(static_shape=True)
    layer = model[2]
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = inputs()

    assert_same_as_eager(compiled, model, x, "first call")
    changes = {
        "grow 2": lambda: layer.grow(2),
        "deactivate": lambda: layer.deactivate([0, 3]),
        "grow 1 more": lambda: layer.grow(1),
        "reactivate": lambda: layer.reactivate(0),
        "grow to capacity": lambda: layer.grow(CAPACITY - layer.out_features),
    }
    for what, change in changes.items():
        change()
        assert_same_as_eager(compiled, model, x, f"after {what}")
        assert counter.frame_count == 1, f"{what} recompiled ({counter.frame_count} compilations)"
    assert layer.out_features == CAPACITY


@pytest.mark.parametrize("joined", ["tied", "grow_together"])
def test_language_model_pair_with_static_shape_never_recompiles(joined):
    """An embedding and a static_shape head joined as a language model joins them (tied,
    or one mask): the compiled lookup checks ids against the mask alone, with no host count
    to guard on, so grows, deactivations and reactivations never recompile; a deactivated
    id is still refused."""
    torch.manual_seed(0)
    embedding = growop.GrowEmbedding(10, 4, capacity=16)
    head = GrowLinear(4, 10, bias=False, capacity=16, static_shape=True)
    (growop.tie if joined == "tied" else growop.grow_together)(embedding, head)
    model = nn.Sequential(embedding, head)
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    ids = torch.tensor([1, 2, 9])
    for change in (lambda: None, lambda: embedding.grow(2), lambda: embedding.deactivate([0]),
                   lambda: embedding.reactivate([0]), lambda: head.grow(1)):
        change()
        torch.testing.assert_close(compiled(ids), model(ids), atol=0, rtol=0)
    assert counter.frame_count == 1, f"{counter.frame_count} compilations"
    embedding.deactivate([2])
    with pytest.raises(RuntimeError, match="out of range or not live"):
        compiled(ids)


def test_static_shape_training_through_compiled_model_after_grow():
    eager_model, compiled_model = make_model(True), make_model(True)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(compiled_model, backend=counter, fullgraph=True)
    runs = [(eager_model, eager_model, torch.optim.Adam(eager_model.parameters(), lr=0.05)),
            (compiled_model, compiled, torch.optim.Adam(compiled_model.parameters(), lr=0.05))]
    targets = torch.randint(OUT + 2, (6, BATCH), generator=torch.Generator().manual_seed(1))
    grown_at_start = None
    for step in range(6):
        for model, forward, opt in runs:
            layer = model[2]
            if step == 3:
                layer.grow(2, optimizer=opt)  # rows 3 and 4: the classes seen from now on
                grown_at_start = layer.weight[OUT : OUT + 2].detach().clone()
            labels = targets[step] % layer.out_features
            opt.zero_grad()
            F.cross_entropy(forward(inputs(step)), labels).backward()
            opt.step()
    assert counter.frame_count == 1, f"{counter.frame_count} compilations"
    for (name, want), got in zip(eager_model.state_dict().items(), compiled_model.state_dict().values()):
        if isinstance(want, torch.Tensor):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    new_rows = compiled_model[2].weight[OUT : OUT + 2].detach()
    assert (new_rows - grown_at_start).abs().amax(1).min() > 1e-3, "the new rows did not train"
    assert (compiled_model[2].weight[OUT + 2 :] == eager_model[2].weight[OUT + 2 :]).all()


@pytest.mark.skipif(
    not hasattr(torch._dynamo, "patch_dynamo_config"),
    reason="this torch cannot trace out_features as a dynamic int: each grow recompiles",
)
def test_default_mode_recompiles_once_then_width_is_dynamic(strategy):
    """Measured with this torch: one compile, one recompile at the first grow (with a
    symbolic width), then none, however many grows follow; training keeps working."""
    model = make_model(static_shape=False)
    layer = model[2]
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    frames = []
    for step in range(CAPACITY - OUT + 1):
        x = inputs(step)
        assert_same_as_eager(compiled, model, x, f"width {layer.out_features}")
        opt.zero_grad()
        compiled(x).logsumexp(-1).sum().backward()
        assert layer.weight.grad[: layer.out_features].abs().sum(1).min() > 0
        opt.step()
        frames.append(counter.frame_count)
        if layer.out_features < CAPACITY:
            layer.grow(1)
    # More distinct widths (7) than fit dynamo's recompile limit if each were a constant.
    assert frames == [1] + [2] * (len(frames) - 1), frames


def test_default_mode_deactivate_and_reactivate_do_not_recompile(strategy):
    model = make_model(static_shape=False)
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = inputs()
    assert_same_as_eager(compiled, model, x, "first call")
    model[2].deactivate(1)
    assert_same_as_eager(compiled, model, x, "after deactivate")
    model[2].reactivate(1)
    assert_same_as_eager(compiled, model, x, "after reactivate")
    assert counter.frame_count == 1


def test_inductor_forward_and_backward_match_eager_across_a_grow():
    eager_model, compiled_model = make_model(True), make_model(True)
    for model in (eager_model, compiled_model):
        model[2].deactivate(1)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(compiled_model, backend=counter, fullgraph=True)

    for what in ("before grow", "after grow"):
        x = inputs()
        want, got = eager_model(x), compiled(x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}, output: {m}")
        # logsumexp over all columns: masked ones must contribute nothing, in both.
        want.logsumexp(-1).sum().backward()
        got.logsumexp(-1).sum().backward()
        for (name, p_want), p_got in zip(eager_model.named_parameters(), compiled_model.parameters()):
            torch.testing.assert_close(
                p_got.grad, p_want.grad, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{what}, grad {n}: {m}"
            )
            p_want.grad = p_got.grad = None
        for model in (eager_model, compiled_model):
            model[2].grow(2)
    assert counter.frame_count == 1


def test_a_strategy_change_recompiles_once_and_takes_effect():
    """The strategy is a constant of the graph, guarded: changing it compiles a second graph,
    and changing it back reuses the first."""
    model = make_model(static_shape=True)
    layer = model[2]
    layer.grow(2)
    layer.deactivate([1])
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = inputs()
    for name, expected_count in (("dense", 1), ("gather", 2), ("dense", 2), ("auto", 3)):
        with growop.strategy(name):
            assert_same_as_eager(compiled, model, x, f"under {name}")
        assert counter.frame_count == expected_count, (name, counter.frame_count)
