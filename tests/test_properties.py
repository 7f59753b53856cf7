"""Stateful property test: a GrowLinear against a plain-tensor shadow model.

In the shadow, every slot in use is its own weight row and bias Parameter under its own
freshly created optimizer, the way the rows would train if each had been added to a model
of its own. Random sequences of grows (within and past capacity, every init), masking,
unmasking, training steps under SGD with momentum, Adam and AdamW, optimizer rebuilds,
checkpoint round trips across capacities and bad calls must keep the layer equal to its
shadow, and its bookkeeping (mask, live count, slots in use) consistent. Half the runs
train two layers joined by ``growop.grow_together``, every operation called on either.

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
        pair=st.booleans(),
        seed=st.integers(0, 2**16),
    )
    def build(self, kind, out, headroom, pair, seed):
        torch.manual_seed(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.kind = kind
        self.layers = [
            growop.GrowLinear(IN, out, capacity=out + headroom, dtype=DTYPE) for _ in range(1 + pair)
        ]
        if pair:
            growop.grow_together(*self.layers)
        self.shadows = [
            [ShadowRow(layer.weight[r], layer.bias[r], kind) for r in range(out)] for layer in self.layers
        ]
        self.optimizer = self.new_optimizer()

    @property
    def shadow(self):
        return self.shadows[0]

    def pick(self, data):
        return self.layers[data.draw(st.integers(0, len(self.layers) - 1))]

    def all_rows(self):
        return [row for shadow in self.shadows for row in shadow]

    def new_optimizer(self):
        cls, kwargs, _ = OPTIMIZERS[self.kind]
        return cls([p for layer in self.layers for p in layer.parameters()], **kwargs)

    def randn(self, *shape):
        return torch.randn(*shape, generator=self.generator, dtype=DTYPE)

    # ------------------------------------------------------------------ rules

    @rule(data=st.data(), k=st.integers(1, 4), init=st.sampled_from(INITS), with_optimizer=st.booleans())
    def grow(self, data, k, init, with_optimizer):
        caller = self.pick(data)
        if init == "mean" and not any(row.live for row in self.shadow):
            with pytest.raises(ValueError, match="live"):
                caller.grow(k, init="mean", optimizer=self.optimizer)
            return
        past_capacity = len(self.shadow) + k > caller.capacity
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
        rows = caller.grow(k, init=argument, optimizer=self.optimizer if with_optimizer else None)
        assert rows == range(len(self.shadow), len(self.shadow) + k)
        if not with_optimizer and past_capacity:
            caller.resize_optimizer_state(self.optimizer)
        for layer, shadow in zip(self.layers, self.shadows):
            self.check_new_rows(layer, shadow, rows, init, given)

    def check_new_rows(self, layer, shadow, rows, init, given):
        k = len(rows)
        live = [row for row in shadow if row.live]
        weight, bias = layer.weight[rows.start:rows.stop], layer.bias[rows.start:rows.stop]
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
        shadow.extend(ShadowRow(weight[i], bias[i], self.kind) for i in range(k))

    @precondition(lambda self: len(self.shadow) > 0)
    @rule(data=st.data(), live=st.booleans(), with_optimizer=st.booleans())
    def mask(self, data, live, with_optimizer):
        rows = data.draw(st.lists(st.integers(0, len(self.shadow) - 1), min_size=1, max_size=3))
        optimizer = self.optimizer if with_optimizer else None
        caller = self.pick(data)
        if live:
            caller.reactivate(rows, optimizer=optimizer)
        else:
            caller.deactivate(rows, optimizer=optimizer)
        for shadow in self.shadows:
            for r in set(rows):
                shadow[r].live = live
                if with_optimizer:
                    if live:
                        shadow[r].fresh_optimizer()
                    else:
                        shadow[r].zero_state()

    @rule(steps=st.integers(1, 3))
    def train(self, steps):
        for _ in range(steps):
            x = self.randn(4, IN)
            target = self.randn(4, len(self.shadow))
            self.optimizer.zero_grad()
            live = self.layers[0].active[: len(self.shadow)]
            if bool(live.any()):
                loss = sum(((layer(x)[:, live] - target[:, live]) ** 2).sum() for layer in self.layers)
                loss.backward()
            for shadow in self.shadows:
                for r, row in enumerate(shadow):
                    row.optimizer.zero_grad()
                    if row.live:
                        ((x @ row.weight + row.bias - target[:, r]) ** 2).sum().backward()
                    else:
                        row.weight.grad = torch.zeros_like(row.weight)
                        row.bias.grad = torch.zeros_like(row.bias)
            self.optimizer.step()
            for row in self.all_rows():
                row.optimizer.step()

    @rule()
    def rebuild_optimizer(self):
        self.optimizer = self.new_optimizer()
        for row in self.all_rows():
            row.fresh_optimizer()

    @rule(extra=st.integers(0, 3), keep_optimizer=st.booleans())
    def checkpoint_round_trip(self, extra, keep_optimizer):
        buffer = io.BytesIO()
        layers = [layer.state_dict() for layer in self.layers]
        torch.save({"layers": layers, "optimizer": self.optimizer.state_dict()}, buffer)
        buffer.seek(0)
        saved = torch.load(buffer)
        capacity = len(self.shadow) + extra
        self.layers = [growop.GrowLinear(IN, 0, capacity=capacity, dtype=DTYPE) for _ in self.layers]
        for layer, state in zip(self.layers, saved["layers"]):
            layer.load_state_dict(state)
        if len(self.layers) > 1:
            growop.grow_together(*self.layers)
        self.optimizer = self.new_optimizer()
        if keep_optimizer:
            self.optimizer.load_state_dict(saved["optimizer"])
            self.layers[-1].resize_optimizer_state(self.optimizer)  # state of the saved capacity
        else:
            for row in self.all_rows():
                row.fresh_optimizer()

    @rule(data=st.data(), call=st.sampled_from(["grow-0", "mask-out-of-range", "bad-init-shape", "foreign-optimizer"]))
    def bad_call(self, data, call):
        caller = self.pick(data)

        def snapshot():
            return [
                ([t.detach().clone() for t in (layer.weight, layer.bias, layer.active)],
                 (layer.out_features, layer._live_count, layer.capacity))
                for layer in self.layers
            ]

        before = snapshot()
        other = torch.optim.SGD(growop.GrowLinear(IN, 1).parameters(), lr=0.1)
        calls = {
            "grow-0": (ValueError, lambda: caller.grow(0)),
            "mask-out-of-range": (IndexError, lambda: caller.deactivate([len(self.shadow)])),
            "bad-init-shape": (ValueError, lambda: caller.grow(2, init=torch.zeros(3, IN + 1))),
            "foreign-optimizer": (ValueError, lambda: caller.grow(1, optimizer=other)),
        }
        error, do = calls[call]
        with pytest.raises(error):
            do()
        for (tensors, counts), (tensors_after, counts_after) in zip(before, snapshot()):
            assert all(torch.equal(a, b) for a, b in zip(tensors, tensors_after))
            assert counts == counts_after

    # ------------------------------------------------------------------ invariants

    @invariant()
    def bookkeeping(self):
        used = len(self.shadow)
        for layer, shadow in zip(self.layers, self.shadows):
            assert len(shadow) == used
            assert layer.out_features == used <= layer.capacity == self.layers[0].capacity
            assert layer._live_count == int(layer.active.sum())
            assert layer.active[:used].tolist() == [row.live for row in shadow]
            assert not bool(layer.active[used:].any())

    @invariant()
    def matches_shadow(self):
        x = self.randn(2, IN)
        for layer, shadow in zip(self.layers, self.shadows):
            for r, row in enumerate(shadow):
                torch.testing.assert_close(layer.weight[r], row.weight, rtol=1e-9, atol=1e-9)
                torch.testing.assert_close(layer.bias[r], row.bias, rtol=1e-9, atol=1e-9)
            out = layer(x)
            assert out.shape == (2, len(shadow)) and torch.isfinite(out).all()
            for r, row in enumerate(shadow):
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
