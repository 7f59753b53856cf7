"""Stateful property test: a GrowLinear against a plain-tensor shadow model.

In the shadow, every slot in use is its own weight row and bias Parameter under its own
freshly created optimizer, the way the rows would train if each had been added to a model
of its own. Random sequences of grows (within and past capacity, every init), masking,
unmasking (each with or without ``optimizer=``), training steps under SGD with momentum,
Adam and AdamW, optimizer rebuilds, optimizer reloads from their own state dict, checkpoint
round trips across capacities and bad calls must keep the layer equal to its shadow, and
its bookkeeping (mask, live count, slots in use) consistent. Some runs train
two layers sharing one row set, every operation called on either: joined by
``growop.grow_together`` (in the shadow, each slot holds both layers' rows under one
optimizer, which for these optimizers is the same as one optimizer per layer), or tied by
``growop.tie`` (one weight row shared by both layers' outputs).

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
    """One slot in use: its own Parameters for each layer, and its own optimizer."""

    def __init__(self, rows: list, kind: str, tied: bool):
        self.weights = [weight.detach().clone().requires_grad_() for weight, _ in rows]
        if tied:
            self.weights = [self.weights[0]] * len(rows)
        self.biases = [None if bias is None else bias.detach().clone().requires_grad_() for _, bias in rows]
        self.live = True
        self.kind = kind
        self.fresh_optimizer()

    def params(self):
        unique = {id(p): p for p in self.weights + self.biases if p is not None}
        return list(unique.values())

    def fresh_optimizer(self):
        cls, kwargs, _ = OPTIMIZERS[self.kind]
        self.optimizer = cls(self.params(), **kwargs)

    def zero_state(self):
        for state in self.optimizer.state.values():
            for name in OPTIMIZERS[self.kind][2]:
                if name in state:
                    state[name].zero_()

    def output(self, i: int, x: torch.Tensor) -> torch.Tensor:
        out = x @ self.weights[i]
        return out if self.biases[i] is None else out + self.biases[i]


def fill_rows(weight, bias):
    weight.fill_(0.25)
    if bias is not None:
        bias.fill_(-0.5)


class GrowLinearMachine(RuleBasedStateMachine):
    @initialize(
        kind=st.sampled_from(sorted(OPTIMIZERS)),
        out=st.integers(0, 3),
        headroom=st.integers(0, 3),
        mode=st.sampled_from(["single", "together", "tied"]),
        seed=st.integers(0, 2**16),
    )
    def build(self, kind, out, headroom, mode, seed):
        torch.manual_seed(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.kind, self.mode = kind, mode
        self.layers = self.new_layers(out, out + headroom)
        self.shadow = [self.shadow_row(r) for r in range(out)]
        self.optimizer = self.new_optimizer()

    def new_layers(self, out, capacity):
        count = 1 if self.mode == "single" else 2
        biases = [True, self.mode != "tied"][:count]
        layers = [growop.GrowLinear(IN, out, bias=b, capacity=capacity, dtype=DTYPE) for b in biases]
        if self.mode == "together":
            growop.grow_together(*layers)
        elif self.mode == "tied":
            growop.tie(*layers)
        return layers

    def shadow_row(self, r):
        rows = [(layer.weight[r], None if layer.bias is None else layer.bias[r]) for layer in self.layers]
        return ShadowRow(rows, self.kind, self.mode == "tied")

    def pick(self, data):
        return self.layers[data.draw(st.integers(0, len(self.layers) - 1))]

    def new_optimizer(self):
        cls, kwargs, _ = OPTIMIZERS[self.kind]
        unique = {id(p): p for layer in self.layers for p in layer.parameters()}
        return cls(list(unique.values()), **kwargs)

    def randn(self, *shape):
        return torch.randn(*shape, generator=self.generator, dtype=DTYPE)

    # ------------------------------------------------------------------ rules

    @rule(data=st.data(), k=st.integers(1, 4), init=st.sampled_from(INITS), with_optimizer=st.booleans())
    def grow(self, data, k, init, with_optimizer):
        caller = self.pick(data)
        if init == "tuple" and self.mode == "tied":
            init = "tensor"  # a (weight, bias) tuple does not fit the biasless tied head
        if init == "mean" and not any(row.live for row in self.shadow):
            with pytest.raises(ValueError, match="live"):
                caller.grow(k, init="mean", optimizer=self.optimizer)
            return
        # Without optimizer=, growop finds the optimizer: at once where it has stepped since
        # it was built or loaded, at its next step otherwise.
        given = {"tensor": self.randn(k, IN), "tuple": (self.randn(k, IN), self.randn(k))}
        argument = given.get(init, fill_rows if init == "callable" else init)
        live = [row for row in self.shadow if row.live]
        rows = caller.grow(k, init=argument, optimizer=self.optimizer if with_optimizer else None)
        assert rows == range(len(self.shadow), len(self.shadow) + k)
        for i, layer in enumerate(self.layers):
            self.check_new_rows(i, layer, rows, init, given, live)
        self.shadow += [self.shadow_row(r) for r in rows]

    def check_new_rows(self, i, layer, rows, init, given, live):
        k = len(rows)
        weight = layer.weight[rows.start:rows.stop]
        bias = None if layer.bias is None else layer.bias[rows.start:rows.stop]
        expected = {
            "zeros": (torch.zeros(k, IN, dtype=DTYPE), torch.zeros(k, dtype=DTYPE)),
            "tensor": (given["tensor"], torch.zeros(k, dtype=DTYPE)),
            "tuple": given["tuple"],
            "callable": (torch.full((k, IN), 0.25, dtype=DTYPE), torch.full((k,), -0.5, dtype=DTYPE)),
        }
        if init == "mean":
            expected["mean"] = (
                torch.stack([r.weights[i] for r in live]).mean(0).expand(k, IN),
                torch.stack([r.biases[i] for r in live]).mean().expand(k) if bias is not None else None,
            )
        if init == "default":
            bound = 1 / IN**0.5
            assert weight.abs().max() <= bound and (bias is None or bias.abs().max() <= bound)
        else:
            torch.testing.assert_close(weight, expected[init][0], rtol=1e-12, atol=1e-12)
            if bias is not None:
                torch.testing.assert_close(bias, expected[init][1], rtol=1e-12, atol=1e-12)

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
        for r in set(rows):
            if self.shadow[r].live == live:
                continue  # already as asked: left alone, optimizer state included
            self.shadow[r].live = live
            if live:  # with or without optimizer=: unmasked rows start fresh
                self.shadow[r].fresh_optimizer()
            elif with_optimizer:  # masked rows' state is zeroed in the optimizer given only
                self.shadow[r].zero_state()

    @rule(steps=st.integers(1, 3))
    def train(self, steps):
        for _ in range(steps):
            x = self.randn(4, IN)
            targets = [self.randn(4, len(self.shadow)) for _ in self.layers]
            self.optimizer.zero_grad()
            live = self.layers[0].active[: len(self.shadow)]
            if bool(live.any()):
                loss = sum(
                    ((layer(x)[:, live] - target[:, live]) ** 2).sum()
                    for layer, target in zip(self.layers, targets)
                )
                loss.backward()
            else:  # every row masked: zero gradients, as the shadow's masked rows get
                for param in self.optimizer.param_groups[0]["params"]:
                    param.grad = torch.zeros_like(param)
            for r, row in enumerate(self.shadow):
                row.optimizer.zero_grad()
                if row.live:
                    sum(((row.output(i, x) - target[:, r]) ** 2).sum() for i, target in enumerate(targets)).backward()
                else:
                    for param in row.params():
                        param.grad = torch.zeros_like(param)
            self.optimizer.step()
            for row in self.shadow:
                row.optimizer.step()

    @rule()
    def rebuild_optimizer(self):
        self.optimizer = self.new_optimizer()
        for row in self.shadow:
            row.fresh_optimizer()

    @rule()
    def reload_optimizer(self):
        """A resume of the optimizer alone: a new one loads the state dict of the old and
        goes on exactly as the old would (the grows made before its first step included)."""
        buffer = io.BytesIO()
        torch.save(self.optimizer.state_dict(), buffer)
        buffer.seek(0)
        self.optimizer = self.new_optimizer()
        self.optimizer.load_state_dict(torch.load(buffer))

    @rule(extra=st.integers(0, 3), keep_optimizer=st.booleans())
    def checkpoint_round_trip(self, extra, keep_optimizer):
        buffer = io.BytesIO()
        layers = [layer.state_dict() for layer in self.layers]
        torch.save({"layers": layers, "optimizer": self.optimizer.state_dict()}, buffer)
        buffer.seek(0)
        saved = torch.load(buffer)
        self.layers = self.new_layers(0, len(self.shadow) + extra)  # joined, then loaded
        for layer, state in zip(self.layers, saved["layers"]):
            layer.load_state_dict(state)
        self.optimizer = self.new_optimizer()
        if keep_optimizer:  # state of the saved capacity: it fits itself at the next step
            self.optimizer.load_state_dict(saved["optimizer"])
            explained = {self.layers[0].capacity, saved["layers"][0]["weight"].shape[0]}
            if self.state_row_counts() - explained:
                # Saved before the optimizer's first step after an earlier resume: the state
                # still has that resume's row count, which these layers never had.
                with pytest.raises(RuntimeError, match="never had"):
                    self.optimizer.step()
                self.layers[-1].resize_optimizer_state(self.optimizer)  # the step it names
        else:
            for row in self.shadow:
                row.fresh_optimizer()

    def state_row_counts(self) -> set[int]:
        names = OPTIMIZERS[self.kind][2]
        states = [self.optimizer.state[p] for p in self.optimizer.param_groups[0]["params"] if p in self.optimizer.state]
        return {state[name].shape[0] for state in states for name in names if name in state}

    @rule(data=st.data(), call=st.sampled_from(["grow-0", "mask-out-of-range", "bad-init-shape", "foreign-optimizer"]))
    def bad_call(self, data, call):
        caller = self.pick(data)

        def snapshot():
            return [
                ([t.detach().clone() for t in (layer.weight, layer.bias, layer.active) if t is not None],
                 (layer.out_features, layer.live_count, layer.capacity))
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
        for layer in self.layers:
            assert layer.out_features == used <= layer.capacity == self.layers[0].capacity
            assert layer.live_count == int(layer.active.sum())
            assert layer.active[:used].tolist() == [row.live for row in self.shadow]
            assert not bool(layer.active[used:].any())
        if self.mode == "tied":
            assert self.layers[1].weight is self.layers[0].weight

    @invariant()
    def matches_shadow(self):
        x = self.randn(2, IN)
        for i, layer in enumerate(self.layers):
            for r, row in enumerate(self.shadow):
                torch.testing.assert_close(layer.weight[r], row.weights[i], rtol=1e-9, atol=1e-9)
                if layer.bias is not None:
                    torch.testing.assert_close(layer.bias[r], row.biases[i], rtol=1e-9, atol=1e-9)
            out = layer(x)
            assert out.shape == (2, len(self.shadow)) and torch.isfinite(out).all()
            for r, row in enumerate(self.shadow):
                if row.live:
                    torch.testing.assert_close(out[:, r], row.output(i, x), rtol=1e-9, atol=1e-9)
                else:
                    assert (out[:, r] == torch.finfo(DTYPE).min).all()


GrowLinearMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("GROWOP_PROPERTY_EXAMPLES", "30")),
    stateful_step_count=15,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
TestGrowLinearAgainstShadow = GrowLinearMachine.TestCase
