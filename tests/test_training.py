"""GrowLinear under real optimizers: state kept across grows, fresh state for new rows.

Every test trains a small layer with a fixed seed, so losses and states are reproducible.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import assert_equal
from growop import GrowLinear
from growop.reference import add_output_nodes

IN, OUT, BATCH = 8, 3, 16

OPTIMIZERS = {
    "sgd-momentum": (lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9), ("momentum_buffer",)),
    "adam": (lambda params: torch.optim.Adam(params, lr=1e-2), ("exp_avg", "exp_avg_sq")),
    "adamw": (lambda params: torch.optim.AdamW(params, lr=1e-2), ("exp_avg", "exp_avg_sq")),
}


# ----------------------------------------------------------------------------- helpers


def regression_problem(seed=0, outputs=6):
    """Inputs and a linear teacher with more outputs than the layer starts with."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, IN, generator=g)
    teacher = torch.randn(outputs, IN, generator=g)
    return x, x @ teacher.T


def live_loss(layer: GrowLinear, x, y) -> torch.Tensor:
    live = layer.active[: layer.out_features].nonzero().squeeze(1)
    out = layer(x)
    return F.mse_loss(out[:, live], y[:, live])


def train(layer, opt, x, y, steps) -> list[float]:
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = live_loss(layer, x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def row_states(layer, opt, keys) -> dict:
    """Clones of every per-row optimizer state tensor of the layer, by (param name, key)."""
    states = {}
    for name, param in (("weight", layer.weight), ("bias", layer.bias)):
        for key in keys:
            states[name, key] = opt.state[param][key].detach().clone()
    return states


def make_layer(capacity, seed=0):
    torch.manual_seed(seed)
    return GrowLinear(IN, OUT, capacity=capacity)


# ----------------------------------------------------------------------------- grow within capacity


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_grow_within_capacity_keeps_old_state_and_zeroes_new(kind):
    make_opt, keys = OPTIMIZERS[kind]
    x, y = regression_problem()
    layer = make_layer(capacity=6)
    opt = make_opt(layer.parameters())
    train(layer, opt, x, y, 3)
    # Unused rows can carry stale state (coupled weight decay, an earlier deactivate
    # without optimizer=, ...). Plant some so that resetting the new rows is observable.
    with torch.no_grad():
        for param in (layer.weight, layer.bias):
            for key in keys:
                opt.state[param][key][OUT:].fill_(0.5)
    before = row_states(layer, opt, keys)
    params = {"weight": layer.weight, "bias": layer.bias}
    state_ptrs = {(name, key): opt.state[params[name]][key].data_ptr() for name, key in before}

    rows = layer.grow(2, optimizer=opt)

    assert rows == range(3, 5)
    after = row_states(layer, opt, keys)
    for k in before:
        assert opt.state[params[k[0]]][k[1]].data_ptr() == state_ptrs[k], f"{k} was reallocated"
        assert_equal(after[k][:OUT], before[k][:OUT], what=f"old rows of {k}")
        assert (after[k][3:5] == 0).all(), f"new rows of {k} are not fresh: {after[k][3:5]}"

    new_rows_before = layer.weight[3:5].detach().clone()
    losses = train(layer, opt, x, y, 25)
    assert (layer.weight[3:5] != new_rows_before).any(dim=1).all(), "new rows did not train"
    assert losses[-1] < 0.9 * losses[0], losses


# ----------------------------------------------------------------------------- grow past capacity


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_grow_past_capacity_resizes_optimizer_state(kind):
    make_opt, keys = OPTIMIZERS[kind]
    x, y = regression_problem()
    layer = make_layer(capacity=OUT)
    weight, bias = layer.weight, layer.bias
    opt = make_opt(layer.parameters())
    train(layer, opt, x, y, 3)
    before = row_states(layer, opt, keys)

    layer.grow(2, optimizer=opt)

    assert layer.weight is weight and layer.bias is bias
    assert opt.param_groups[0]["params"][0] is weight
    capacity = layer.capacity
    assert capacity > OUT
    after = row_states(layer, opt, keys)
    for k in before:
        assert after[k].shape[0] == capacity, f"{k}: {tuple(after[k].shape)}"
        assert_equal(after[k][:OUT], before[k], what=f"old rows of {k}")
        assert (after[k][OUT:] == 0).all(), f"rows past the old capacity of {k} are not zero"

    new_rows_before = layer.weight[OUT:5].detach().clone()
    losses = train(layer, opt, x, y, 30)
    assert (layer.weight[OUT:5] != new_rows_before).any(dim=1).all(), "new rows did not train"
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(math.isfinite(v) for v in losses)


def test_adafactor_factored_state_follows_rows_and_keeps_its_column_statistic():
    """Adafactor keeps a per-row statistic (row_var, (rows, 1)) and a per-column one
    (col_var, (1, in)) of a matrix: only the first follows rows (zeroed for new and masked
    rows, padded past capacity); the second keeps its shape, and training goes on."""
    x, y = regression_problem(outputs=OUT + 4)
    layer = make_layer(capacity=OUT + 1)
    opt = torch.optim.Adafactor(layer.parameters(), lr=1e-2)
    train(layer, opt, x, y, 3)
    col_var = opt.state[layer.weight]["col_var"].clone()
    row_var = opt.state[layer.weight]["row_var"].clone()
    layer.grow(1, optimizer=opt)
    layer.deactivate([0], optimizer=opt)
    state = opt.state[layer.weight]
    assert torch.equal(state["col_var"], col_var)
    assert state["row_var"][[0, OUT]].eq(0).all() and torch.equal(state["row_var"][1:OUT], row_var[1:OUT])
    assert opt.state[layer.bias]["variance"][[0, OUT]].eq(0).all()
    train(layer, opt, x, y, 2)
    layer.grow(3, optimizer=opt)  # past capacity
    assert state["row_var"].shape == (layer.capacity, 1) and state["col_var"].shape == (1, IN)
    assert opt.state[layer.bias]["variance"].shape == (layer.capacity,)
    losses = train(layer, opt, x, y, 5)
    assert all(math.isfinite(v) for v in losses)


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_one_row_layer_grows_past_capacity_with_its_state(kind):
    """A capacity-1 layer's state is (1, in): it is per-row state, resized past capacity
    (only Adafactor's per-column statistic keeps its one row)."""
    make_opt, keys = OPTIMIZERS[kind]
    x, y = regression_problem(outputs=3)
    torch.manual_seed(0)
    layer = GrowLinear(IN, 1, capacity=1)
    opt = make_opt(layer.parameters())
    train(layer, opt, x, y, 2)
    layer.grow(2, optimizer=opt)
    for key in keys:
        assert opt.state[layer.weight][key].shape == (layer.capacity, IN)
        assert opt.state[layer.bias][key].shape == (layer.capacity,)
    losses = train(layer, opt, x, y, 3)
    assert all(math.isfinite(v) for v in losses)


# ----------------------------------------------------------------------------- forgetting the optimizer


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_forgotten_optimizer_is_found_on_a_grow_past_capacity(kind):
    make_opt, keys = OPTIMIZERS[kind]
    x, y = regression_problem()
    layer = make_layer(capacity=OUT)
    opt = make_opt(layer.parameters())
    train(layer, opt, x, y, 2)
    before = row_states(layer, opt, keys)

    layer.grow(1)  # optimizer= forgotten, past capacity: growop met opt at its steps

    after = row_states(layer, opt, keys)
    for k in before:
        assert after[k].shape[0] == layer.capacity
        assert_equal(after[k][:OUT], before[k], what=f"old rows of {k}")
        assert (after[k][OUT:] == 0).all()
    opt.zero_grad()
    live_loss(layer, x, y).backward()
    weight_before_step = layer.weight.detach().clone()
    opt.step()
    assert (layer.weight[: OUT + 1] != weight_before_step[: OUT + 1]).any(dim=1).all()
    losses = train(layer, opt, x, y, 5)
    assert all(math.isfinite(v) for v in losses)


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_optimizer_created_after_grow_needs_nothing(kind):
    make_opt, _ = OPTIMIZERS[kind]
    x, y = regression_problem()
    layer = make_layer(capacity=OUT)
    layer.grow(2)  # past capacity, no optimizer exists yet
    opt = make_opt(layer.parameters())
    weight_before = layer.weight.detach().clone()
    losses = train(layer, opt, x, y, 10)
    assert (layer.weight[:5] != weight_before[:5]).any(dim=1).all()
    assert losses[-1] < losses[0]


# ----------------------------------------------------------------------------- the seed recipe


def blobs(classes, per_class=40, seed=0):
    """Gaussian blobs on a circle: class c is centred at angle 2*pi*c/5, radius 3."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for c in classes:
        angle = 2 * math.pi * c / 5
        centre = torch.tensor([3 * math.cos(angle), 3 * math.sin(angle)])
        xs.append(centre + 0.3 * torch.randn(per_class, 2, generator=g))
        ys.append(torch.full((per_class,), c))
    return torch.cat(xs), torch.cat(ys)


def fit(model, opt, x, y, steps):
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


def test_seed_recipe_new_classes_learn_with_the_same_optimizer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), GrowLinear(16, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x_old, y_old = blobs([0, 1, 2])
    fit(model, opt, x_old, y_old, 100)
    assert accuracy(model, x_old, y_old) > 0.95

    head = model[2]
    rows = head.grow(2, optimizer=opt)
    assert rows == range(3, 5)
    new_rows_before = head.weight[3:5].detach().clone()
    x_all, y_all = blobs(range(5), seed=1)
    x_new, y_new = blobs([3, 4], seed=2)
    assert accuracy(model, x_new, y_new) < 0.9  # not already solved by chance

    fit(model, opt, x_all, y_all, 200)

    assert (head.weight[3:5] != new_rows_before).any(dim=1).all(), "new head rows never trained"
    assert accuracy(model, x_new, y_new) > 0.9
    assert accuracy(model, *blobs([0, 1, 2], seed=3)) > 0.9


def test_usual_recipe_with_old_optimizer_never_trains_the_new_head():
    """Documents the bug growop fixes: a rebuilt nn.Linear is unknown to the old optimizer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    fit(model, opt, *blobs([0, 1, 2]), 50)

    model[2] = add_output_nodes(model[2], 2)
    head_w, head_b = model[2].weight.detach().clone(), model[2].bias.detach().clone()
    hidden_before = model[0].weight.detach().clone()
    fit(model, opt, *blobs(range(5), seed=1), 5)

    assert model[2].weight.grad is not None and model[2].weight.grad.abs().sum() > 0
    assert_equal(model[2].weight.detach(), head_w, what="rebuilt head weight")
    assert_equal(model[2].bias.detach(), head_b, what="rebuilt head bias")
    assert (model[0].weight != hidden_before).any(), "the optimizer did step the other layers"


# ----------------------------------------------------------------------------- deactivate with optimizer


def _deactivated_row_after_training(pass_optimizer: bool):
    x, y = regression_problem(outputs=4)
    torch.manual_seed(0)
    layer = GrowLinear(IN, 4, capacity=6)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    train(layer, opt, x, y, 3)
    layer.deactivate(1, optimizer=opt if pass_optimizer else None)
    weight_row, bias_row = layer.weight[1].detach().clone(), layer.bias[1].detach().clone()
    losses = train(layer, opt, x, y, 5)
    assert all(math.isfinite(v) for v in losses)
    return layer, weight_row, bias_row


def test_deactivate_with_optimizer_freezes_rows_under_adam():
    layer, weight_row, bias_row = _deactivated_row_after_training(pass_optimizer=True)
    assert_equal(layer.weight[1].detach(), weight_row, what="deactivated weight row")
    assert_equal(layer.bias[1].detach(), bias_row, what="deactivated bias row")
    assert (layer.weight.grad[1] == 0).all()


def test_deactivate_without_optimizer_lets_momentum_drift_rows():
    layer, weight_row, bias_row = _deactivated_row_after_training(pass_optimizer=False)
    assert (layer.weight[1] != weight_row).all(), "Adam momentum should keep moving the masked row"
    assert layer.bias[1] != bias_row


def test_reactivate_with_optimizer_starts_rows_fresh():
    x, y = regression_problem(outputs=4)
    torch.manual_seed(0)
    layer = GrowLinear(IN, 4, capacity=6)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    train(layer, opt, x, y, 3)
    layer.deactivate(2)  # no optimizer: the row's moments keep their values
    assert (opt.state[layer.weight]["exp_avg"][2] != 0).all()
    layer.reactivate(2, optimizer=opt)
    for key in ("exp_avg", "exp_avg_sq"):
        assert (opt.state[layer.weight][key][2] == 0).all()
        assert opt.state[layer.bias][key][2] == 0
        assert (opt.state[layer.weight][key][[0, 1, 3]] != 0).any(dim=1).all()
