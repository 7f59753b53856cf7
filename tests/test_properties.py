"""Stateful property test: a GrowLinear against a plain-tensor shadow model.

In the shadow, every slot in use is its own weight row and bias Parameter under its own
freshly created optimizer, the way the rows would train if each had been added to a model
of its own. Random sequences of grows (within and past capacity, every init), masking,
unmasking, training steps under SGD with momentum, Adam and AdamW, optimizer rebuilds,
checkpoint round trips across capacities and bad calls must keep the layer equal to its
shadow, and its bookkeeping (mask, live count, slots in use) consistent.

The budget is bounded for CI (a few seconds); raise ``GROWOP_PROPERTY_EXAMPLES`` to search
longer.
"""

from __future__ import annotations

import io
import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule  # noqa: E402

import growop  # noqa: E402

IN = 3
DTYPE = torch.float64
OPTIMIZERS = {
    "sgd-momentum": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}, ("momentum_buffer",)),
    "adam": (torch.optim.Adam, {"lr": 0.05}, ("exp_avg", "exp_avg_sq")),
    "adamw": (torch.optim.AdamW, {"lr": 0.05, "weight_decay": 0.1}, ("exp_avg", "exp_avg_sq")),
}
INITS = ["default", "zeros", "mean", "tensor", "tuple", "callable"]


class ShadowRow:
    """One slot in use: its own Parameters and its own optimizer."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, kind: str, live: bool = True):
        self.weight = weight.detach().clone().requires_grad_()
        self.bias = bias.detach().clone().requires_grad_()
        self.live = live
        self.kind = kind
        self.fresh_optimizer()

    def fresh_optimizer(self):
        cls, kwargs, _ = OPTIMIZERS[self.kind]
        self.optimizer = cls([self.weight, self.bias], **kwargs)

    def zero_state(self):
        for state in self.optimizer.state.values():
            for name in OPTIMIZERS[self.kind][2]:
                if name in state:
                    state[name].zero_()


class GrowLinearMachine(RuleBasedStateMachine):
    @initialize(
        kind=st.sampled_from(sorted(OPTIMIZERS)),
        out=st.integers(0, 3),
        headroom=st.integers(0, 3),
        seed=st.integers(0, 2**16),
    )
    def build(self, kind, out, headroom, seed):
        torch.manual_seed(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.kind = kind
        self.layer = growop.GrowLinear(IN, out, capacity=out + headroom, dtype=DTYPE)
        self.shadow = [ShadowRow(self.layer.weight[r], self.layer.bias[r], kind) for r in range(out)]
        self.optimizer = self.new_optimizer()

    def new_optimizer(self):
        cls, kwargs, _ = OPTIMIZERS[self.kind]
        return cls(self.layer.parameters(), **kwargs)

    def randn(self, *shape):
        return torch.randn(*shape, generator=self.generator, dtype=DTYPE)

    # ------------------------------------------------------------------ rules

    @rule(k=st.integers(1, 4), init=st.sampled_from(INITS), with_optimizer=st.booleans())
    def grow(self, k, init, with_optimizer):
        live = [row for row in self.shadow if row.live]
        if init == "mean" and not live:
            with pytest.raises(ValueError, match="live"):
                self.layer.grow(k, init="mean", optimizer=self.optimizer)
            return
        past_capacity = len(self.shadow) + k > self.layer.capacity
        # Without the optimizer only SGD's new rows match a fresh optimizer (Adam's need the
        # per-row steps that optimizer= records), and only past capacity does the state
        # need resizing.
        with_optimizer = with_optimizer or self.kind != "sgd-momentum"
        given = {
            "tensor": self.randn(k, IN),
            "tuple": (self.randn(k, IN), self.randn(k)),
        }
        if init in given:
            argument = given[init]
        elif init == "callable":
            def argument(weight, bias):
                weight.fill_(0.25)
                bias.fill_(-0.5)
        else:
            argument = init
        rows = self.layer.grow(k, init=argument, optimizer=self.optimizer if with_optimizer else None)
        assert rows == range(len(self.shadow), len(self.shadow) + k)
        if not with_optimizer and past_capacity:
            self.layer.resize_optimizer_state(self.optimizer)
        weight, bias = self.layer.weight[rows.start:rows.stop], self.layer.bias[rows.start:rows.stop]
        expected = {
            "zeros": (torch.zeros(k, IN, dtype=DTYPE), torch.zeros(k, dtype=DTYPE)),
            "tensor": (given["tensor"], torch.zeros(k, dtype=DTYPE)),
            "tuple": given["tuple"],
            "callable": (torch.full((k, IN), 0.25, dtype=DTYPE), torch.full((k,), -0.5, dtype=DTYPE)),
        }
        if init == "mean":
            expected["mean"] = (
                torch.stack([r.weight for r in live]).mean(0).expand(k, IN),
                torch.stack([r.bias for r in live]).mean().expand(k),
            )
        if init == "default":
            bound = 1 / IN**0.5
            assert weight.abs().max() <= bound and bias.abs().max() <= bound
        else:
            torch.testing.assert_close(weight, expected[init][0], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(bias, expected[init][1], rtol=1e-12, atol=1e-12)
        self.shadow += [ShadowRow(weight[i], bias[i], self.kind) for i in range(k)]

    @precondition(lambda self: len(self.shadow) > 0)
    @rule(data=st.data(), live=st.booleans(), with_optimizer=st.booleans())
    def mask(self, data, live, with_optimizer):
        rows = data.draw(st.lists(st.integers(0, len(self.shadow) - 1), min_size=1, max_size=3))
        optimizer = self.optimizer if with_optimizer else None
        if live:
            self.layer.reactivate(rows, optimizer=optimizer)
        else:
            self.layer.deactivate(rows, optimizer=optimizer)
        for r in set(rows):
            self.shadow[r].live = live
            if with_optimizer:
                if live:
                    self.shadow[r].fresh_optimizer()
                else:
                    self.shadow[r].zero_state()

    @rule(steps=st.integers(1, 3))
    def train(self, steps):
        for _ in range(steps):
            x = self.randn(4, IN)
            target = self.randn(4, len(self.shadow))
            self.optimizer.zero_grad()
            out = self.layer(x)
            live = self.layer.active[: len(self.shadow)]
            if bool(live.any()):
                ((out[:, live] - target[:, live]) ** 2).sum().backward()
            for r, row in enumerate(self.shadow):
                row.optimizer.zero_grad()
                if row.live:
                    ((x @ row.weight + row.bias - target[:, r]) ** 2).sum().backward()
                else:
                    row.weight.grad = torch.zeros_like(row.weight)
                    row.bias.grad = torch.zeros_like(row.bias)
            self.optimizer.step()
            for row in self.shadow:
                row.optimizer.step()

    @rule()
    def rebuild_optimizer(self):
        self.optimizer = self.new_optimizer()
        for row in self.shadow:
            row.fresh_optimizer()

    @rule(extra=st.integers(0, 3), keep_optimizer=st.booleans())
    def checkpoint_round_trip(self, extra, keep_optimizer):
        buffer = io.BytesIO()
        torch.save({"layer": self.layer.state_dict(), "optimizer": self.optimizer.state_dict()}, buffer)
        buffer.seek(0)
        saved = torch.load(buffer)
        capacity = len(self.shadow) + extra
        layer = growop.GrowLinear(IN, 0, capacity=capacity, dtype=DTYPE)
        layer.load_state_dict(saved["layer"])
        self.layer = layer
        self.optimizer = self.new_optimizer()
        if keep_optimizer:
            self.optimizer.load_state_dict(saved["optimizer"])
            self.layer.resize_optimizer_state(self.optimizer)  # state of the saved capacity
        else:
            for row in self.shadow:
                row.fresh_optimizer()

    @rule(call=st.sampled_from(["grow-0", "mask-out-of-range", "bad-init-shape", "foreign-optimizer"]))
    def bad_call(self, call):
        before = [t.detach().clone() for t in (self.layer.weight, self.layer.bias, self.layer.active)]
        counts = (self.layer.out_features, self.layer._live_count, self.layer.capacity)
        other = torch.optim.SGD(growop.GrowLinear(IN, 1).parameters(), lr=0.1)
        calls = {
            "grow-0": (ValueError, lambda: self.layer.grow(0)),
            "mask-out-of-range": (IndexError, lambda: self.layer.deactivate([len(self.shadow)])),
            "bad-init-shape": (ValueError, lambda: self.layer.grow(2, init=torch.zeros(3, IN + 1))),
            "foreign-optimizer": (ValueError, lambda: self.layer.grow(1, optimizer=other)),
        }
        error, do = calls[call]
        with pytest.raises(error):
            do()
        after = (self.layer.weight, self.layer.bias, self.layer.active)
        assert all(torch.equal(a, b) for a, b in zip(before, after))
        assert (self.layer.out_features, self.layer._live_count, self.layer.capacity) == counts

    # ------------------------------------------------------------------ invariants

    @invariant()
    def bookkeeping(self):
        layer = self.layer
        used = len(self.shadow)
        assert layer.out_features == used <= layer.capacity
        assert layer._live_count == int(layer.active.sum())
        assert layer.active[:used].tolist() == [row.live for row in self.shadow]
        assert not bool(layer.active[used:].any())

    @invariant()
    def matches_shadow(self):
        for r, row in enumerate(self.shadow):
            torch.testing.assert_close(self.layer.weight[r], row.weight, rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(self.layer.bias[r], row.bias, rtol=1e-9, atol=1e-9)
        x = self.randn(2, IN)
        out = self.layer(x)
        assert out.shape == (2, len(self.shadow)) and torch.isfinite(out).all()
        for r, row in enumerate(self.shadow):
            if row.live:
                torch.testing.assert_close(out[:, r], x @ row.weight + row.bias, rtol=1e-9, atol=1e-9)
            else:
                assert (out[:, r] == torch.finfo(DTYPE).min).all()


GrowLinearMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("GROWOP_PROPERTY_EXAMPLES", "25")),
    stateful_step_count=15,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
TestGrowLinearAgainstShadow = GrowLinearMachine.TestCase
