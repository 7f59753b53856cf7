"""Stateful property test of GrowLinear.cross_entropy: random grows (within and past
capacity), deactivations and reactivations between training steps, each step's fused loss
and gradients against F.cross_entropy over the live columns (growop.reference), with random
reductions, label smoothing, class subsets, class weights, ignored targets and chunk sizes.

The budget is bounded for CI; raise ``GROWOP_PROPERTY_EXAMPLES`` to search longer.
"""

from __future__ import annotations

import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule  # noqa: E402

import growop  # noqa: E402
from growop import reference  # noqa: E402

IN = 4
DTYPE = torch.float64


class LossMachine(RuleBasedStateMachine):
    @initialize(out=st.integers(1, 6), headroom=st.integers(0, 4), static_shape=st.booleans(),
                bias=st.booleans(), seed=st.integers(0, 2**16))
    def build(self, out, headroom, static_shape, bias, seed):
        torch.manual_seed(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.head = growop.GrowLinear(IN, out, bias=bias, capacity=out + headroom,
                                      static_shape=static_shape, dtype=DTYPE)
        self.optimizer = torch.optim.SGD(self.head.parameters(), lr=0.5)
        self.last_grad = None

    def live(self) -> torch.Tensor:
        return self.head.active[: self.head.out_features].nonzero().squeeze(1)

    @rule(k=st.integers(1, 5))
    def grow(self, k):
        self.head.grow(k, optimizer=self.optimizer)

    @precondition(lambda self: len(self.live()) > 1)
    @rule(data=st.data())
    def deactivate(self, data):
        live = self.live().tolist()
        self.head.deactivate(data.draw(st.sampled_from(live)), optimizer=self.optimizer)

    @precondition(lambda self: len(self.live()) < self.head.out_features)
    @rule(data=st.data())
    def reactivate(self, data):
        dead = (~self.head.active[: self.head.out_features]).nonzero().squeeze(1).tolist()
        self.head.reactivate(data.draw(st.sampled_from(dead)), optimizer=self.optimizer)

    @rule(
        data=st.data(),
        tokens=st.integers(1, 9),
        reduction=st.sampled_from(["mean", "sum", "none"]),
        smoothing=st.sampled_from([0.0, 0.1, 0.5]),
        chunk=st.one_of(st.none(), st.tuples(st.integers(1, 4), st.integers(1, 5))),
        weighted=st.booleans(),
    )
    def train_step(self, data, tokens, reduction, smoothing, chunk, weighted):
        head, g = self.head, self.generator
        live = self.live()
        subset = data.draw(st.booleans())
        classes = live[torch.randperm(len(live), generator=g)[: data.draw(st.integers(1, len(live)))]]
        pool = classes if subset else live
        target = pool[torch.randint(len(pool), (tokens,), generator=g)]
        target[torch.rand(tokens, generator=g) < 0.2] = -100
        x = torch.randn(tokens, IN, generator=g, dtype=DTYPE)
        columns = head.capacity if head.static_shape else head.out_features
        class_weight = torch.rand(columns, generator=g, dtype=DTYPE) + 0.5 if weighted else None
        options = dict(reduction=reduction, label_smoothing=smoothing,
                       classes=classes.tolist() if subset else None)

        params = [p for p in (head.weight, head.bias) if p is not None]
        expected = reference.linear_cross_entropy(
            x, head.weight, head.bias, head.active, target, head.out_features,
            class_weight=None if class_weight is None else class_weight[: head.out_features], **options)
        expected_grads = torch.autograd.grad(expected.sum(), params)

        self.optimizer.zero_grad()
        loss = head.cross_entropy(x, target, class_weight=class_weight, chunk_size=chunk, **options)
        loss.sum().backward()
        torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-10, equal_nan=True)
        for p, e in zip(params, expected_grads):
            torch.testing.assert_close(p.grad, e, rtol=1e-10, atol=1e-10)
        self.last_grad = (head.weight.grad.clone(), pool if subset else live)
        self.optimizer.step()

    @invariant()
    def rows_outside_the_softmax_got_no_gradient(self):
        if getattr(self, "last_grad", None) is None:
            return
        grad, softmax = self.last_grad
        outside = torch.ones(grad.shape[0], dtype=torch.bool)
        outside[softmax] = False
        assert (grad[outside] == 0).all()


LossMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("GROWOP_PROPERTY_EXAMPLES", "25")),
    stateful_step_count=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_loss_machine = LossMachine.TestCase
