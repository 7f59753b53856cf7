"""Rows added mid-training are updated as a freshly created Adam/AdamW would update them."""

from __future__ import annotations

import warnings

import pytest
import torch

import growop
from growop.optim import row_step_correction

IN, START, GROW = 5, 3, 2
OPTIMIZERS = {
    "adam": (torch.optim.Adam, {"lr": 0.05}),
    "adam_loop": (torch.optim.Adam, {"lr": 0.05, "foreach": False}),
    "adam_foreach": (torch.optim.Adam, {"lr": 0.05, "foreach": True}),
    "adam_amsgrad": (torch.optim.Adam, {"lr": 0.05, "amsgrad": True}),
    "adam_l2": (torch.optim.Adam, {"lr": 0.05, "weight_decay": 0.1}),
    "adamw": (torch.optim.AdamW, {"lr": 0.05, "weight_decay": 0.1}),
    "adamw_loop_amsgrad": (torch.optim.AdamW, {"lr": 0.05, "weight_decay": 0.1, "foreach": False, "amsgrad": True}),
    "adamw_fused": (torch.optim.AdamW, {"lr": 0.05, "weight_decay": 0.1, "fused": True}),
}


class Run:
    """A GrowLinear trained with one optimizer, and every grown row mirrored on its own
    Parameters with a freshly created optimizer fed the same gradients."""

    def __init__(self, name: str, capacity: int = 16, seed: int = 0):
        self.cls, self.kwargs = OPTIMIZERS[name]
        gen = torch.Generator().manual_seed(seed)
        self.inputs = torch.randn(400, 8, IN, generator=gen, dtype=torch.float64)
        self.targets = torch.randn(400, 8, 32, generator=gen, dtype=torch.float64)
        torch.manual_seed(seed)
        self.layer = growop.GrowLinear(IN, START, capacity=capacity, dtype=torch.float64)
        self.optimizer = self.cls(self.layer.parameters(), **self.kwargs)
        self.mirrors: dict[int, tuple[torch.Tensor, torch.Tensor, torch.optim.Optimizer]] = {}
        self.t = 0

    def grow(self, k: int = GROW) -> range:
        rows = self.layer.grow(k, optimizer=self.optimizer)
        for row in rows:
            weight = self.layer.weight[row].detach().clone().requires_grad_()
            bias = self.layer.bias[row].detach().clone().requires_grad_()
            self.mirrors[row] = (weight, bias, self.cls([weight, bias], **self.kwargs))
        return rows

    def steps(self, n: int) -> None:
        for _ in range(n):
            self.optimizer.zero_grad()
            out = self.layer(self.inputs[self.t])
            # A loss per column, so each row's gradient depends on that row alone.
            live = self.layer.active[: out.shape[-1]]
            loss = ((out[:, live] - self.targets[self.t, :, : out.shape[-1]][:, live]) ** 2).sum()
            loss.backward()
            for row, (weight, bias, optimizer) in self.mirrors.items():
                weight.grad = self.layer.weight.grad[row].clone()
                bias.grad = self.layer.bias.grad[row].clone()
            self.optimizer.step()
            for _, _, optimizer in self.mirrors.values():
                optimizer.step()
            self.t += 1

    def mirror_error(self) -> float:
        error = 0.0
        for row, (weight, bias, _) in self.mirrors.items():
            error = max(error, (self.layer.weight[row] - weight).abs().max().item())
            error = max(error, (self.layer.bias[row] - bias).abs().item())
        return error


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_new_rows_follow_a_fresh_optimizer(name):
    run = Run(name)
    run.steps(30)
    run.grow()
    run.steps(12)
    run.grow()  # a second grow, at another step
    run.steps(15)
    assert run.mirror_error() < 1e-10, run.mirror_error()


@pytest.mark.parametrize("name", ["adam", "adamw_loop_amsgrad"])
def test_without_the_correction_new_rows_move_differently(name):
    with row_step_correction(False):
        run = Run(name)
        run.steps(30)
        run.grow()
        run.steps(5)
    assert run.mirror_error() > 1e-3


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_old_rows_follow_the_stock_optimizer_bit_for_bit(name):
    corrected = Run(name)
    with row_step_correction(False):
        stock = Run(name)
    for run, enabled in ((corrected, True), (stock, False)):
        with row_step_correction(enabled):
            run.steps(20)
            run.grow()
            run.steps(10)
    assert torch.equal(corrected.layer.weight[:START], stock.layer.weight[:START])
    assert torch.equal(corrected.layer.bias[:START], stock.layer.bias[:START])
    assert not torch.equal(corrected.layer.weight[START:], stock.layer.weight[START:])


def test_holds_across_a_grow_past_capacity():
    run = Run("adamw", capacity=START)
    run.steps(25)
    run.grow()  # reallocates
    assert run.layer.capacity > START
    run.steps(8)
    run.grow(run.layer.capacity - run.layer.out_features + 1)  # and again
    run.steps(8)
    assert run.mirror_error() < 1e-10


def test_reactivated_rows_start_fresh():
    run = Run("adam")
    run.steps(20)
    run.layer.deactivate([1], optimizer=run.optimizer)
    run.steps(5)
    run.layer.reactivate([1], optimizer=run.optimizer)
    weight = run.layer.weight[1].detach().clone().requires_grad_()
    bias = run.layer.bias[1].detach().clone().requires_grad_()
    run.mirrors[1] = (weight, bias, torch.optim.Adam([weight, bias], **run.kwargs))
    run.steps(10)
    assert run.mirror_error() < 1e-10


@pytest.mark.parametrize("name", ["adamw", "adamw_fused"])
def test_resumed_run_keeps_correcting_young_rows(tmp_path, name):
    # fused: load_state_dict moves "step" entries to float32, the start steps included
    whole = Run(name)
    whole.steps(20)
    whole.grow()
    whole.steps(4)
    path = tmp_path / "ckpt.pt"
    torch.save({"layer": whole.layer.state_dict(), "optimizer": whole.optimizer.state_dict()}, path)
    whole.steps(10)

    resumed = Run(name)
    resumed.steps(20)
    resumed.grow()
    resumed.steps(4)
    checkpoint = torch.load(path)
    layer = growop.GrowLinear(IN, 1, capacity=16, dtype=torch.float64)
    optimizer = torch.optim.AdamW(layer.parameters(), **OPTIMIZERS[name][1])
    layer.load_state_dict(checkpoint["layer"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    resumed.layer, resumed.optimizer = layer, optimizer
    resumed.mirrors = {}
    resumed.steps(10)
    assert torch.equal(resumed.layer.weight, whole.layer.weight)
    assert torch.equal(_starts(resumed.optimizer, layer.weight), _starts(whole.optimizer, whole.layer.weight))


def _starts(optimizer, param):
    return optimizer.state[param]["row_start"]["step"]


def test_checkpoint_with_layer_row_start_steps_still_loads_strictly():
    # growop 0.1 kept start steps in a row_start_step buffer and _extra_state in a dict.
    layer = growop.GrowLinear(IN, 4, capacity=8)
    state = dict(layer.state_dict())
    state["row_start_step"] = torch.arange(8)
    state["_extra_state"] = {"out_features": 3, "version": 1}
    fresh = growop.GrowLinear(IN, 1, capacity=8)
    fresh.load_state_dict(state, strict=True)
    assert fresh.out_features == 3 and fresh.live_count == 4
    assert not hasattr(fresh, "row_start_step")


def test_a_new_optimizer_treats_every_row_as_fresh():
    run = Run("adam")
    run.steps(3)
    (row, *_) = run.grow(1)
    optimizer = torch.optim.Adam(run.layer.parameters(), **run.kwargs)
    run.optimizer = optimizer
    run.mirrors = {}
    for r in range(run.layer.out_features):  # every row: its own fresh Adam
        weight = run.layer.weight[r].detach().clone().requires_grad_()
        bias = run.layer.bias[r].detach().clone().requires_grad_()
        run.mirrors[r] = (weight, bias, torch.optim.Adam([weight, bias], **run.kwargs))
    run.steps(4)
    assert torch.isfinite(run.layer.weight).all()
    assert run.mirror_error() < 1e-10


def test_a_fresh_layer_loaded_from_a_grown_checkpoint_trains_with_a_fresh_optimizer():
    run = Run("adamw")
    run.steps(3)
    run.grow(2)
    run.steps(2)
    layer = growop.GrowLinear(IN, 1, capacity=16, dtype=torch.float64)
    layer.load_state_dict(run.layer.state_dict())
    optimizer = torch.optim.AdamW(layer.parameters(), **OPTIMIZERS["adamw"][1])
    for t in range(3):
        optimizer.zero_grad()
        layer(run.inputs[t]).pow(2).sum().backward()
        optimizer.step()
    assert torch.isfinite(layer.weight).all() and torch.isfinite(layer.bias).all()
    assert "row_start" not in optimizer.state[layer.weight]


def test_rows_old_enough_stop_costing_anything(monkeypatch):
    run = Run("adam")
    run.steps(2)
    run.grow()
    layer = run.layer
    assert (_starts(run.optimizer, layer.weight) > 0).sum() == GROW
    beta2 = 0.999
    # Jump the optimizer's step counters forward to where beta2 ** age is below rounding.
    for state in run.optimizer.state.values():
        state["step"] += 40000
    run.mirrors = {}
    run.steps(1)
    # the start steps are dropped; what remains records the last grow the state has seen
    for state in run.optimizer.state.values():
        assert set(state.get("row_start", {})) <= {"seen"}
    # and the steps that follow do no per-row work
    calls = []
    monkeypatch.setattr(growop.optim, "_forget_old_rows", lambda *args: calls.append(args))
    run.steps(1)
    assert not calls
    assert beta2**40000 < torch.finfo(torch.float64).eps


def test_uncovered_optimizer_warns_once():
    growop.optim._warned_types.discard(torch.optim.RMSprop)
    layer = growop.GrowLinear(IN, 2, capacity=6)
    optimizer = torch.optim.RMSprop(layer.parameters(), lr=0.01)
    layer(torch.randn(3, IN)).sum().backward()
    optimizer.step()
    layer.grow(1, optimizer=optimizer)
    with pytest.warns(UserWarning, match="RMSprop is not covered"):
        layer(torch.randn(3, IN)).sum().backward()
        optimizer.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(torch.randn(3, IN)).sum().backward()
        optimizer.step()


def test_sgd_needs_no_correction():
    gen = torch.Generator().manual_seed(0)
    layer = growop.GrowLinear(IN, 2, capacity=6, dtype=torch.float64)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    for _ in range(5):
        optimizer.zero_grad()
        layer(torch.randn(4, IN, generator=gen, dtype=torch.float64)).pow(2).sum().backward()
        optimizer.step()
    (row,) = layer.grow(1, optimizer=optimizer)
    mirror = layer.weight[row].detach().clone().requires_grad_()
    fresh = torch.optim.SGD([mirror], lr=0.1, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(5):
            optimizer.zero_grad()
            layer(torch.randn(4, IN, generator=gen, dtype=torch.float64)).pow(2).sum().backward()
            mirror.grad = layer.weight.grad[row].clone()
            optimizer.step()
            fresh.step()
    torch.testing.assert_close(layer.weight[row], mirror, rtol=1e-12, atol=1e-12)


class WrappedOptimizer(torch.optim.Optimizer):
    """An optimizer wrapper as accelerate's AcceleratedOptimizer (which the Hugging Face
    Trainer holds) is written: it keeps the real optimizer as ``.optimizer``, shares its
    state and param_groups, and steps it from its own ``step``."""

    def __init__(self, optimizer):  # no Optimizer.__init__, as accelerate's
        self.optimizer = optimizer

    @property
    def state(self):
        return self.optimizer.state

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def defaults(self):
        return self.optimizer.defaults

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        return self.optimizer.step(closure)


def make_wrapped(kind):
    if kind == "accelerate":
        accelerate = pytest.importorskip("accelerate")
        from accelerate.optimizer import AcceleratedOptimizer

        accelerate.Accelerator(cpu=True)
        return lambda optimizer: AcceleratedOptimizer(optimizer, device_placement=False)
    return WrappedOptimizer


@pytest.mark.parametrize("kind", ["wrapper", "accelerate"])
def test_a_wrapped_optimizer_corrects_new_rows_as_the_one_it_wraps(kind):
    """grow(optimizer=wrapper) records the new rows on the optimizer that steps, so the
    correction runs (and runs once) exactly as with the optimizer itself."""
    wrap = make_wrapped(kind)
    plain, wrapped = Run("adamw"), Run("adamw")
    wrapped.optimizer = wrap(wrapped.optimizer)
    for run in (plain, wrapped):
        run.steps(4)
        run.grow()
        run.steps(6)
    assert wrapped.mirror_error() < 1e-10
    torch.testing.assert_close(wrapped.layer.weight, plain.layer.weight, rtol=0, atol=0)
