"""growop finds the optimizers that hold a layer: grows and reactivates made without
``optimizer=`` act on each of them, an optimizer growop has not met catches up at its first
step, and optimizer state of another row count fits itself where the layer explains it."""

from __future__ import annotations

import copy
import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import growop
from growop.optim import row_step_correction

IN, OUT = 6, 4
LR = 0.01
DTYPE = torch.float64
IMPLEMENTATIONS = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def batch(t: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``t``'s inputs and targets, the same in every run (and every process)."""
    generator = torch.Generator().manual_seed(1000 + t)
    x = torch.randn(8, IN, generator=generator, dtype=DTYPE)
    y = torch.randn(8, 64, generator=generator, dtype=DTYPE)[:, :rows]
    return x, y


def live_loss(layer: growop.GrowLinear, t: int) -> torch.Tensor:
    """A loss per column, so that each row's gradient depends on that row alone."""
    x, y = batch(t, layer.out_features)
    out = layer(x)
    live = layer.active[: out.shape[-1]]
    return ((out[:, live] - y[:, live]) ** 2).sum()


class Training:
    """A GrowLinear under AdamW; step ``t`` always trains on ``batch(t)``."""

    def __init__(self, capacity: int = 16, **adamw):
        torch.manual_seed(0)
        self.layer = growop.GrowLinear(IN, OUT, capacity=capacity, dtype=DTYPE)
        self.adamw = {"lr": LR, **adamw}
        self.optimizer = torch.optim.AdamW(self.layer.parameters(), **self.adamw)
        self.t = 0

    def new_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.layer.parameters(), **self.adamw)

    def steps(self, n: int, optimizers=None, mirrors=()) -> None:
        """``n`` steps of ``optimizers`` (default: this run's), each fed the layer's
        gradients; every mirror (a row's own Parameters and optimizers) steps beside them."""
        optimizers = optimizers or [self.optimizer]
        for _ in range(n):
            for optimizer in optimizers:
                optimizer.zero_grad()
            live_loss(self.layer, self.t).backward()
            for mirror in mirrors:
                mirror.take_gradients(self.layer)
            for optimizer in optimizers:
                optimizer.step()
            for mirror in mirrors:
                mirror.step()
            self.t += 1

    def state_dict_copy(self, optimizer=None) -> dict:
        """The optimizer's state dict as a file would give it back (no shared tensors)."""
        buffer = io.BytesIO()
        torch.save((optimizer or self.optimizer).state_dict(), buffer)
        buffer.seek(0)
        return torch.load(buffer)


class Mirror:
    """Row ``row`` of a layer on Parameters of its own, under freshly created optimizers
    (one per optimizer of the layer, stepped in the same order)."""

    def __init__(self, layer: growop.GrowLinear, row: int, optimizers: int = 1, **adamw):
        self.row = row
        self.weight = layer.weight[row].detach().clone().requires_grad_()
        self.bias = layer.bias[row].detach().clone().requires_grad_()
        params, kwargs = [self.weight, self.bias], {"lr": LR, **adamw}
        self.optimizers = [torch.optim.AdamW(params, **kwargs) for _ in range(optimizers)]

    def take_gradients(self, layer: growop.GrowLinear) -> None:
        self.weight.grad = layer.weight.grad[self.row].clone()
        self.bias.grad = layer.bias.grad[self.row].clone()

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def error(self, layer: growop.GrowLinear) -> float:
        return max(
            (layer.weight[self.row] - self.weight).abs().max().item(),
            (layer.bias[self.row] - self.bias).abs().item(),
        )


def start_steps(optimizer, param) -> torch.Tensor | None:
    return optimizer.state[param].get("row_start", {}).get("step")


# ---------------------------------------------------------------------- grow and reactivate


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_rows_grown_at_step_1000_without_optimizer_take_a_fresh_first_step(implementation):
    """The issue's case: AdamW at step 1000, grow(5) without optimizer=. The new rows'
    first update is the learning rate (a fresh Adam's), as with optimizer=, not 2.5x it."""
    updates, weights = {}, {}
    for case in ("given", "found", "uncorrected"):
        run = Training(**IMPLEMENTATIONS[implementation], weight_decay=0.0)
        run.steps(1)
        for state in run.optimizer.state.values():
            state["step"].fill_(999)  # an optimizer at step 1000
        with row_step_correction(case != "uncorrected"):
            rows = run.layer.grow(5, optimizer=run.optimizer if case == "given" else None)
            before = run.layer.weight[rows.start:rows.stop].detach().clone()
            run.steps(1)
        updates[case] = ((run.layer.weight[rows.start:rows.stop] - before).abs() / LR).detach()
        weights[case] = run.layer.weight.detach().clone()
    # a fresh Adam's first step is lr * g / (|g| + eps)
    torch.testing.assert_close(updates["found"], torch.ones_like(updates["found"]), rtol=0, atol=1e-6)
    assert torch.equal(weights["found"], weights["given"])
    assert updates["uncorrected"].mean() > 2.4  # what the optimizer's shared counter gives


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_rows_grown_without_optimizer_follow_a_fresh_optimizer(implementation):
    run = Training(**IMPLEMENTATIONS[implementation])
    run.steps(30)
    mirrors = [Mirror(run.layer, row, **IMPLEMENTATIONS[implementation]) for row in run.layer.grow(2)]
    run.steps(10, mirrors=mirrors)
    mirrors += [Mirror(run.layer, row, **IMPLEMENTATIONS[implementation]) for row in run.layer.grow(13)]
    assert run.layer.capacity > 16  # the second grow reallocated
    run.steps(10, mirrors=mirrors)
    assert max(mirror.error(run.layer) for mirror in mirrors) < 1e-10


def test_reactivate_without_optimizer_starts_rows_fresh():
    run = Training()
    run.steps(20)
    run.layer.deactivate([1])  # no optimizer: the row's moments are kept
    run.steps(3)
    state = run.optimizer.state[run.layer.weight]
    assert (state["exp_avg"][1] != 0).all()
    run.layer.reactivate([1])
    # growop met the optimizer at its steps: the stale moments are gone at once
    assert (state["exp_avg"][1] == 0).all() and (state["exp_avg_sq"][1] == 0).all()
    assert start_steps(run.optimizer, run.layer.weight)[1] == 23
    mirror = Mirror(run.layer, 1)
    run.steps(10, mirrors=[mirror])
    assert mirror.error(run.layer) < 1e-10


def test_row_events_need_no_bisect_key(monkeypatch):
    """Python 3.9's bisect takes no key=: grows and reactivates under a stepped optimizer
    (given, found, or catching up after a load) work with it."""
    import bisect

    plain = bisect.bisect_right

    def bisect_right_of_python_3_9(a, x, lo=0, hi=None):
        return plain(a, x, lo, len(a) if hi is None else hi)

    monkeypatch.setattr(bisect, "bisect_right", bisect_right_of_python_3_9)
    run = Training()
    run.steps(3)
    rows = run.layer.grow(2, optimizer=run.optimizer)
    run.layer.deactivate([1])
    run.steps(2)
    run.layer.reactivate([1])
    saved = run.state_dict_copy()
    run.layer.grow(1)
    run.optimizer = run.new_optimizer()
    run.optimizer.load_state_dict(saved)
    run.steps(1)  # catches up with the last grow
    assert start_steps(run.optimizer, run.layer.weight)[[1, rows.start, rows.stop]].tolist() == [5, 3, 5]


@pytest.mark.parametrize("given", [True, False], ids=["optimizer-given", "optimizer-found"])
def test_rows_already_as_asked_keep_their_optimizer_state(given):
    """reactivate of a live row leaves the row alone: its moments and step count are kept.
    deactivate of a masked row with optimizer= zeroes its moments (the way to clear a row
    masked without one) and leaves its mask as it was."""
    run = Training()
    run.steps(2)
    run.layer.deactivate([3])  # without optimizer=: its moments decay but are kept
    run.steps(2)
    optimizer = run.optimizer if given else None
    state = run.optimizer.state[run.layer.weight]
    kept = {name: state[name].clone() for name in ("exp_avg", "exp_avg_sq")}
    assert (kept["exp_avg"][[0, 3]] != 0).all()

    run.layer.reactivate([0], optimizer=optimizer)  # live: nothing to do
    assert run.layer.live_count == 3
    assert start_steps(run.optimizer, run.layer.weight) is None
    for name, value in kept.items():
        assert torch.equal(state[name], value), name
    version = run.layer.active._version
    run.layer.deactivate([3], optimizer=run.optimizer)  # masked already: its state is zeroed
    assert run.layer.active._version == version, "the mask was rewritten"
    for name, value in kept.items():
        assert (state[name][3] == 0).all() and torch.equal(state[name][:3], value[:3]), name

    run.layer.reactivate([0, 3], optimizer=optimizer)  # row 3 starts fresh, row 0 keeps its own
    assert (state["exp_avg"][3] == 0).all() and torch.equal(state["exp_avg"][0], kept["exp_avg"][0])
    assert start_steps(run.optimizer, run.layer.weight)[[0, 3]].tolist() == [0, 4]
    run.layer.deactivate([1, 3], optimizer=run.optimizer)
    run.layer.deactivate([1, 2], optimizer=run.optimizer)  # row 1 masked already
    assert (state["exp_avg"][[1, 2, 3]] == 0).all() and torch.equal(state["exp_avg"][0], kept["exp_avg"][0])
    assert run.layer.active.tolist()[:4] == [True, False, False, False]


def test_two_optimizers_over_one_model_each_start_the_rows():
    """One optimizer for the head's weight, one for its bias and the layer below it."""
    torch.manual_seed(0)
    body = torch.nn.Linear(IN, IN, dtype=DTYPE)
    head = growop.GrowLinear(IN, OUT, capacity=16, dtype=DTYPE)
    weights = torch.optim.AdamW([head.weight], lr=LR)
    rest = torch.optim.AdamW([head.bias, *body.parameters()], lr=LR)

    def steps(n, start, mirrors=()):
        for t in range(start, start + n):
            x, y = batch(t, head.out_features)
            weights.zero_grad(), rest.zero_grad()
            ((head(torch.tanh(body(x))) - y) ** 2).sum().backward()
            for mirror in mirrors:
                mirror.take_gradients(head)
            weights.step(), rest.step()
            for mirror in mirrors:
                mirror.step()

    steps(12, 0)
    rows = head.grow(2)
    for optimizer, param in ((weights, head.weight), (rest, head.bias)):
        assert start_steps(optimizer, param)[rows.start:rows.stop].tolist() == [12, 12]
        assert (optimizer.state[param]["exp_avg"][rows.start:rows.stop] == 0).all()
    # Each row's mirror: its weight under one fresh AdamW and its bias under another, as
    # the two optimizers hold them (one AdamW over both is the same for elementwise Adam).
    mirrors = [Mirror(head, row) for row in rows]
    steps(10, 12, mirrors)
    assert max(mirror.error(head) for mirror in mirrors) < 1e-10


def test_two_optimizers_over_the_same_parameters_each_start_the_rows():
    run = Training()
    first = run.optimizer
    run.steps(8)
    second = run.new_optimizer()
    run.steps(4, optimizers=[first, second])  # second is 8 steps behind
    rows = run.layer.grow(2)
    assert start_steps(first, run.layer.weight)[rows.start] == 12
    assert start_steps(second, run.layer.weight)[rows.start] == 4
    mirrors = [Mirror(run.layer, row, optimizers=2) for row in rows]
    run.steps(10, optimizers=[first, second], mirrors=mirrors)
    assert max(mirror.error(run.layer) for mirror in mirrors) < 1e-10


class Wrapper(torch.optim.Optimizer):
    """An optimizer wrapper as accelerate's AcceleratedOptimizer is written: the real
    optimizer as ``.optimizer``, its state and groups shared, stepped from ``step``."""

    def __init__(self, optimizer):  # no Optimizer.__init__, as accelerate's
        self.optimizer = optimizer

    state = property(lambda self: self.optimizer.state)
    param_groups = property(lambda self: self.optimizer.param_groups)
    defaults = property(lambda self: self.optimizer.defaults)

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        return self.optimizer.step(closure)


def test_a_wrapped_optimizer_is_found_and_acted_on_once():
    plain, wrapped = Training(), Training()
    wrapped.optimizer = Wrapper(wrapped.optimizer)
    for run in (plain, wrapped):
        run.steps(6)
    plain.layer.grow(3, optimizer=plain.optimizer)
    wrapped.layer.grow(3)
    for run in (plain, wrapped):
        run.steps(6)
    assert torch.equal(wrapped.layer.weight, plain.layer.weight)
    assert torch.equal(
        start_steps(wrapped.optimizer, wrapped.layer.weight), start_steps(plain.optimizer, plain.layer.weight)
    )


# ---------------------------------------------------------------------- optimizers growop has not met


@pytest.mark.parametrize("past_capacity", [False, True], ids=["within", "past-capacity"])
def test_a_resumed_optimizer_not_yet_stepped_catches_up_with_a_grow(past_capacity):
    """A state dict loaded into a new optimizer, then a grow without optimizer=, then its
    first step: the same as the run that passed the optimizer to the grow."""
    capacity = OUT if past_capacity else 16
    given, found = Training(capacity), Training(capacity)
    for run in (given, found):
        run.steps(10)
        with torch.no_grad():  # stale state in the unused slots, which the grow must reset
            run.optimizer.state[run.layer.weight]["exp_avg"][OUT:] = 0.5
    given.layer.grow(3, optimizer=given.optimizer)
    saved = found.state_dict_copy()
    found.optimizer = found.new_optimizer()
    found.optimizer.load_state_dict(saved)
    found.layer.grow(3)  # growop has not met the new optimizer: it catches up at its step
    assert found.optimizer.state[found.layer.weight]["exp_avg"].shape[0] == capacity
    for run in (given, found):
        run.steps(6)
    assert torch.equal(found.layer.weight, given.layer.weight)
    assert torch.equal(found.layer.bias, given.layer.bias)
    assert torch.equal(
        start_steps(found.optimizer, found.layer.weight), start_steps(given.optimizer, given.layer.weight)
    )


def test_an_optimizer_growop_knows_catches_up_after_loading_an_older_state_dict():
    """A rollback: the optimizer (met, up to date) loads state saved before a grow."""
    run = Training()
    run.steps(10)
    with torch.no_grad():
        run.optimizer.state[run.layer.weight]["exp_avg"][OUT:] = 0.5  # stale, in unused slots
    saved = run.state_dict_copy()
    run.steps(2)
    rows = run.layer.grow(3)
    run.optimizer.load_state_dict(saved)  # from before the grow: its new rows hold 0.5
    # out of sync by the load itself, not only by the new state dict's id (which may be the old one's)
    assert growop.optim._known[run.optimizer].changes == -1
    run.optimizer.zero_grad()
    live_loss(run.layer, run.t).backward()
    grad = run.layer.weight.grad[rows.start:rows.stop].clone()
    run.optimizer.step()
    state = run.optimizer.state[run.layer.weight]
    torch.testing.assert_close(state["exp_avg"][rows.start:rows.stop], 0.1 * grad)  # from zero
    assert start_steps(run.optimizer, run.layer.weight)[rows.start:rows.stop].tolist() == [10] * 3


def test_an_optimizer_built_after_a_grow_is_stock_adamw():
    run = Training()
    run.steps(5)
    run.layer.grow(2)
    run.optimizer = run.new_optimizer()
    weight = run.layer.weight.detach().clone().requires_grad_()
    bias = run.layer.bias.detach().clone().requires_grad_()
    stock = torch.optim.AdamW([weight, bias], lr=LR)
    for t in range(5, 12):
        run.optimizer.zero_grad()
        live_loss(run.layer, t).backward()
        weight.grad, bias.grad = run.layer.weight.grad.clone(), run.layer.bias.grad.clone()
        run.optimizer.step()
        stock.step()
    assert torch.equal(run.layer.weight, weight) and torch.equal(run.layer.bias, bias)
    assert start_steps(run.optimizer, run.layer.weight) is None


@pytest.mark.parametrize("event", ["grow", "reactivate", "grow-then-new-optimizer"])
def test_a_state_dict_saved_after_the_rows_started_is_not_reset_when_loaded(event):
    """State saved after a grow or reactivate (and trained since) is loaded into a new
    optimizer: the rows keep that state, as in the uninterrupted run. (The runs go one
    after the other: a row event of one run brings the other's optimizer up to date too.)"""
    whole, resumed = Training(), Training()
    for run in (whole, resumed):
        run.steps(10)
        if event == "reactivate":
            run.layer.deactivate([2])
            run.steps(2)
            run.layer.reactivate([2])
        else:
            run.layer.grow(3)
        if event == "grow-then-new-optimizer":  # its state is made after the grow
            run.optimizer = run.new_optimizer()
        run.steps(3)
        if run is resumed:
            saved = run.state_dict_copy()
            run.optimizer = run.new_optimizer()
            run.optimizer.load_state_dict(saved)
        run.steps(5)
    assert torch.equal(resumed.layer.weight, whole.layer.weight)
    assert torch.equal(resumed.layer.bias, whole.layer.bias)


def test_state_of_a_row_count_the_layer_never_had_raises_naming_the_step():
    source = growop.GrowLinear(IN, 3, capacity=4, dtype=DTYPE)
    optimizer = torch.optim.AdamW(source.parameters(), lr=LR)
    live_loss(source, 0).backward()
    optimizer.step()
    target = growop.GrowLinear(IN, 3, capacity=9, dtype=DTYPE)  # source's checkpoint not loaded
    resumed = torch.optim.AdamW(target.parameters(), lr=LR)
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    live_loss(target, 1).backward()
    weight = target.weight.detach().clone()
    with pytest.raises(RuntimeError, match=r"'exp_avg' of shape \(4, 6\).*\(9, 6\).*never had 4 rows"
                       r".*model\.load_state_dict.*resize_optimizer_state\(optimizer\)"):
        resumed.step()
    assert torch.equal(target.weight, weight)  # nothing changed, and it raises again
    assert resumed.state[target.weight]["exp_avg"].shape == (4, IN)
    with pytest.raises(RuntimeError, match="never had 4 rows"):
        resumed.step()
    target.resize_optimizer_state(resumed)  # the step the error names
    resumed.step()
    assert resumed.state[target.weight]["exp_avg"].shape == (9, IN)
    assert not torch.equal(target.weight, weight)


def test_loading_the_checkpoint_the_state_was_saved_with_explains_its_row_count():
    source = growop.GrowLinear(IN, 3, capacity=4, dtype=DTYPE)
    optimizer = torch.optim.AdamW(source.parameters(), lr=LR)
    live_loss(source, 0).backward()
    optimizer.step()
    target = growop.GrowLinear(IN, 3, capacity=9, dtype=DTYPE)
    resumed = torch.optim.AdamW(target.parameters(), lr=LR)
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # before the model's
    target.load_state_dict(source.state_dict())
    for layer, each in ((source, optimizer), (target, resumed)):
        each.zero_grad()
        live_loss(layer, 1).backward()
        each.step()
    assert torch.equal(target.weight[:3], source.weight[:3])
    torch.testing.assert_close(resumed.state[target.weight]["exp_avg"][:4], optimizer.state[source.weight]["exp_avg"])
    assert (resumed.state[target.weight]["exp_avg"][4:] == 0).all()


# ---------------------------------------------------------------------- what it costs


def test_an_optimizer_is_scanned_at_first_sight_and_after_changes_only(monkeypatch):
    scans = []
    scan = growop.optim._growop_params
    monkeypatch.setattr(growop.optim, "_growop_params", lambda optimizer: scans.append(optimizer) or scan(optimizer))
    other = torch.nn.Linear(3, 3)
    plain = torch.optim.SGD(other.parameters(), lr=0.1)
    run = Training()
    for _ in range(4):
        other(torch.randn(2, 3)).sum().backward()
        plain.step()
    run.steps(4)
    assert scans.count(plain) == 1 and scans.count(run.optimizer) == 1
    run.layer.grow(1)  # the holder is brought up to date once; the other is left alone
    run.steps(3)
    plain.step()
    assert scans.count(plain) == 1 and scans.count(run.optimizer) == 2
    plain.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
    plain.step()
    assert scans.count(plain) == 2


# ---------------------------------------------------------------------- resumes across capacities


SCRIPT = """
import sys, torch, growop
sys.path.insert(0, {tests!r})
from test_optim_discovery import plain_loop_model, plain_loop_steps
model = plain_loop_model(capacity=None)  # the default capacity of the grown head: not the run's
assert model[1].capacity != {capacity}
saved = torch.load({checkpoint!r})
model.load_state_dict(saved["model"])
optimizer = torch.optim.AdamW(model.parameters(), lr={lr})
optimizer.load_state_dict(saved["optimizer"])
plain_loop_steps(model, optimizer, range({start}, {stop}))
torch.save(model.state_dict(), {out!r})
"""


def plain_loop_model(capacity):
    torch.manual_seed(0)
    body = torch.nn.Linear(IN, IN, dtype=DTYPE)
    head = growop.GrowLinear(IN, OUT if capacity else OUT + 3, capacity=capacity, dtype=DTYPE)
    return torch.nn.Sequential(body, head)


def plain_loop_steps(model, optimizer, steps):
    for t in steps:
        x, y = batch(t, model[1].out_features)
        optimizer.zero_grad()
        ((model(x) - y) ** 2).sum().backward()
        optimizer.step()


def test_the_plain_pytorch_loop_resumes_in_a_fresh_process(tmp_path):
    """torch.save of the model's and the optimizer's state dicts after a grow made without
    optimizer=; a fresh process builds the model at its grown size (another capacity),
    loads both and continues exactly as the uninterrupted run."""
    model = plain_loop_model(capacity=10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    plain_loop_steps(model, optimizer, range(0, 6))
    model[1].grow(3)
    plain_loop_steps(model, optimizer, range(6, 9))
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, checkpoint)
    plain_loop_steps(model, optimizer, range(9, 15))

    out = tmp_path / "resumed.pt"
    script = SCRIPT.format(tests=str(Path(__file__).parent), capacity=10, checkpoint=str(checkpoint),
                           lr=LR, start=9, stop=15, out=str(out))
    root = Path(__file__).parent.parent
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=root, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr
    resumed = torch.load(out)
    for key, value in model.state_dict().items():
        if key.startswith("1.") and value.dim():  # the rows both capacities hold
            rows = min(value.shape[0], resumed[key].shape[0])
            assert torch.equal(resumed[key][:rows], value[:rows]), key
        elif value.dim():
            assert torch.equal(resumed[key], value), key


def tiny_llama(vocab: int, tied: bool, capacity: int | None):
    transformers = pytest.importorskip("transformers")
    from growop.transformers import make_growable

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    return make_growable(transformers.LlamaForCausalLM(config), capacity=capacity)


def llama_steps(model, optimizer, steps) -> list[float]:
    losses = []
    for t in steps:
        ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(t))
        optimizer.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("capacity", [50, 60], ids=["checkpoint-50-into-55", "checkpoint-60-into-55"])
def test_resume_into_a_llama_rebuilt_from_its_config_at_another_capacity(tied, capacity):
    """The issue's repro: a vocab-40 Llama made growable (capacity 50, or 60) steps with
    AdamW and resizes to 44 with optimizer=; both state dicts are saved. A model built with
    vocab_size=44 and made growable has the default capacity, 55. Loading both state dicts
    and stepping continues exactly as the uninterrupted run."""
    model = tiny_llama(40, tied, capacity)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    llama_steps(model, optimizer, range(0, 2))
    model.resize_token_embeddings(44, optimizer=optimizer)
    llama_steps(model, optimizer, range(2, 4))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    expected = llama_steps(model, optimizer, range(4, 8))

    buffer.seek(0)
    saved = torch.load(buffer)
    rebuilt = tiny_llama(44, tied, None)
    assert rebuilt.get_input_embeddings().capacity == 55
    rebuilt.load_state_dict(saved["model"])
    resumed = torch.optim.AdamW(rebuilt.parameters(), lr=1e-3)
    resumed.load_state_dict(saved["optimizer"])
    assert llama_steps(rebuilt, resumed, range(4, 8)) == expected
    embedding = rebuilt.get_input_embeddings()
    assert torch.equal(embedding.weight[:44], model.get_input_embeddings().weight[:44])
    assert resumed.state[embedding.weight]["exp_avg"].shape == (55, 32)
