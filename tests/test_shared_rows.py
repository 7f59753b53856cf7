"""Layers sharing one row set: ``growop.grow_together`` (untied) and ``growop.tie``."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import growop
from growop.measure import measure_allocations


def heads(capacity=6, out=3, bias=True):
    torch.manual_seed(0)
    a = growop.GrowLinear(4, out, bias=bias, capacity=capacity, dtype=torch.float64)
    b = growop.GrowLinear(7, out, bias=bias, capacity=capacity, dtype=torch.float64)
    return a, b


def assert_in_step(*layers):
    first = layers[0]
    for layer in layers:
        assert layer.out_features == first.out_features
        assert layer.capacity == first.capacity
        assert torch.equal(layer.active, first.active)
        assert layer.live_count == int(layer.active.sum())


def train_step(optimizer, *layers):
    optimizer.zero_grad()
    loss = sum(layer(torch.randn(2, layer.in_features, dtype=torch.float64)).pow(2).sum() for layer in layers)
    loss.backward()
    optimizer.step()


def test_grow_together_grows_every_member_with_its_own_rows():
    a, b = heads()
    growop.grow_together(a, b)
    opt = torch.optim.Adam([*a.parameters(), *b.parameters()], lr=0.1)
    train_step(opt, a, b)
    assert b.grow(2, optimizer=opt) == range(3, 5)
    assert_in_step(a, b)
    assert a.out_features == 5 and a(torch.randn(1, 4, dtype=torch.float64)).shape == (1, 5)
    # each member drew its own nn.Linear rows: bounded by its own fan-in
    assert a.weight[3:5].abs().max() <= 1 / 4**0.5 and b.weight[3:5].abs().max() <= 1 / 7**0.5
    assert not torch.equal(a.weight[3:5, :4], b.weight[3:5, :4])
    for layer in (a, b):  # the optimizer state of the new rows of both layers is fresh
        assert opt.state[layer.weight]["exp_avg"][3:5].abs().sum() == 0
        assert opt.state[layer.weight]["row_start"]["step"][3:5].tolist() == [1, 1]
    a.deactivate([1], optimizer=opt)
    assert_in_step(a, b)
    assert not b.active[1]
    b.reactivate(1)
    assert_in_step(a, b)
    train_step(opt, a, b)


def test_grow_together_past_capacity_reallocates_every_member():
    a, b = heads(capacity=4)
    growop.grow_together(a, b)
    opt = torch.optim.SGD([*a.parameters(), *b.parameters()], lr=0.1, momentum=0.9)
    train_step(opt, a, b)
    weights = a.weight, b.weight
    a.grow(3, optimizer=opt)
    assert a.capacity == b.capacity > 4
    assert (a.weight, b.weight) == weights  # same Parameter objects
    assert opt.state[b.weight]["momentum_buffer"].shape == b.weight.shape
    assert_in_step(a, b)
    train_step(opt, a, b)


def test_grow_together_without_optimizer_resizes_the_state_of_every_member():
    a, b = heads(capacity=4)
    growop.grow_together(a, b)
    opt = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    train_step(opt, b)
    a.grow(3)  # past capacity, through a: b's state, in the optimizer growop met, follows
    assert opt.state[b.weight]["momentum_buffer"].shape == b.weight.shape
    train_step(opt, b)


@pytest.mark.parametrize("change", ["capacity", "out", "mask"])
def test_grow_together_refuses_layers_that_differ_and_changes_nothing(change):
    a, b = heads()
    other = {"capacity": lambda: heads(capacity=7)[1], "out": lambda: heads(out=2)[1]}
    if change == "mask":
        b.deactivate(0)
    else:
        b = other[change]()
    with pytest.raises(ValueError, match={"capacity": "capacities", "out": "slots", "mask": "live rows"}[change]):
        growop.grow_together(a, b)
    a.grow(1)
    assert b.out_features != a.out_features


def test_grow_together_refuses_non_growop_layers():
    a, _ = heads()
    with pytest.raises(TypeError, match="Linear"):
        growop.grow_together(a, nn.Linear(4, 3))
    with pytest.raises(ValueError, match="two"):
        growop.grow_together(a)


def test_grow_together_is_transitive():
    a, b = heads()
    c = growop.GrowLinear(2, 3, capacity=6)
    growop.grow_together(a, b)
    growop.grow_together(c, b)
    c.grow(1)
    assert_in_step(a, b, c)


def test_joined_layers_read_one_view_of_their_rows():
    a, b = heads()
    assert a.rows is not b.rows
    growop.grow_together(a, b)
    assert a.rows is b.rows and repr(a.rows) == "RowSetView(used=3, live=3, capacity=6, layers=2)"
    assert [id(p) for p in a.rows.params] == [id(p) for p in (a.weight, a.bias, b.weight, b.bias)]
    b.grow(1)
    b.deactivate([0])
    assert (a.rows.used, a.rows.live) == (a.out_features, a.live_count) == (4, 3)
    source, target = tied_pair()
    assert source.rows is target.rows
    assert [id(p) for p in target.rows.params] == [id(source.weight), id(source.bias)]  # the tied weight once


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_of_joined_layers_keep_one_row_set_of_their_own(how):
    source, target = tied_pair()
    a, b = heads()
    growop.grow_together(a, b)
    model = nn.ModuleList([source, target, a, b])
    copied = copy.deepcopy(model) if how == "deepcopy" else pickle.loads(pickle.dumps(model))
    new_source, new_target, new_a, new_b = copied
    assert new_target.weight is new_source.weight and new_source.rows is new_target.rows
    assert new_a.rows is new_b.rows and new_a.rows is not a.rows
    new_target.grow(1)
    new_b.grow(4)  # past capacity: both copies reallocated
    assert_in_step(new_source, new_target)
    assert_in_step(new_a, new_b)
    assert new_a.out_features == 7 and new_a.capacity > 6
    assert (source.out_features, a.out_features, a.capacity) == (3, 3, 6)  # the originals untouched


def tied_pair(capacity=6):
    torch.manual_seed(0)
    source = growop.GrowLinear(5, 3, capacity=capacity, dtype=torch.float64)
    target = growop.GrowLinear(5, 3, bias=False, capacity=capacity, dtype=torch.float64)
    growop.tie(source, target)
    return source, target


def test_tie_shares_the_weight_parameter_and_rows():
    source, target = tied_pair()
    assert target.weight is source.weight
    model = nn.ModuleList([source, target])
    assert len(list(model.parameters())) == 2  # shared weight + source's bias
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    train_step(opt, source, target)
    target.grow(2, optimizer=opt)
    assert_in_step(source, target)
    state = opt.state[source.weight]
    assert state["exp_avg"][3:5].abs().sum() == 0
    assert state["row_start"]["step"].tolist() == [0, 0, 0, 1, 1, 0]
    x = torch.randn(2, 5, dtype=torch.float64)
    torch.testing.assert_close(target(x), source(x) - source.bias[:5])
    target.grow(3, optimizer=opt)  # past capacity: one reallocation of the shared weight
    assert target.weight is source.weight and source.capacity == target.capacity > 6
    assert state is opt.state[source.weight] and opt.state[source.weight]["exp_avg"].shape == source.weight.shape
    train_step(opt, source, target)


def test_tie_refuses_mismatched_shapes_and_changes_nothing():
    a = growop.GrowLinear(5, 3, capacity=6)
    b = growop.GrowLinear(4, 3, capacity=6)
    weight = b.weight
    with pytest.raises(ValueError, match=r"\(6, 5\).*\(6, 4\)"):
        growop.tie(a, b)
    assert b.weight is weight
    a.grow(1)
    assert b.out_features == 3
    c = growop.GrowLinear(5, 4, capacity=6, dtype=torch.float64)
    with pytest.raises(ValueError, match="float32.*float64"):
        growop.tie(a, c)
    d = growop.GrowLinear(5, 3, capacity=6)
    with pytest.raises(ValueError, match="slots in use differ"):
        growop.tie(a, d)
    assert d.weight is not a.weight and d.rows is not a.rows


@pytest.mark.parametrize("assign", [False, True])
def test_tied_pair_state_dict_round_trip_keeps_the_tie(assign):
    source, target = tied_pair()
    source.grow(2)
    source.deactivate(1)
    saved = nn.ModuleList([source, target]).state_dict()
    device = "meta" if assign else None
    with torch.device(device or "cpu"):
        new_source = growop.GrowLinear(5, 1, capacity=6, dtype=torch.float64)
        new_target = growop.GrowLinear(5, 1, bias=False, capacity=6, dtype=torch.float64)
    growop.tie(new_source, new_target)
    nn.ModuleList([new_source, new_target]).load_state_dict(saved, assign=assign)
    assert new_target.weight is new_source.weight
    assert_in_step(new_source, new_target)
    assert new_source.active.tolist() == source.active.tolist()
    x = torch.randn(2, 5, dtype=torch.float64)
    torch.testing.assert_close(new_target(x), target(x))
    new_target.grow(1)
    assert_in_step(new_source, new_target)


@pytest.mark.parametrize("init", ["default", "zeros"])
@pytest.mark.parametrize("kind", ["linear", "embedding", "tied"])
def test_grow_within_capacity_allocates_nothing(kind, init):
    if kind == "linear":
        layer = growop.GrowLinear(64, 100, capacity=130)
    else:
        layer = growop.GrowEmbedding(100, 64, capacity=130)
    if kind == "tied":
        growop.tie(layer, growop.GrowLinear(64, 100, bias=False, capacity=130))
    weight = layer.weight.detach().clone()
    _, allocated, _ = measure_allocations(lambda: layer.grow(8, init=init))
    assert allocated == 0
    assert torch.equal(layer.weight[:100], weight[:100])  # old rows untouched
    assert bool(layer.active[:108].all()) and not bool(layer.active[108:].any())


@pytest.mark.parametrize("init", ["default", "mean", "zeros"])
def test_grow_within_capacity_in_place_rows_match_the_rows_made_aside(init):
    # The rows a grow writes straight into the weight are the ones it makes aside past
    # capacity, where it must: the same seeded draw, the same mean.
    in_place = growop.GrowLinear(16, 10, capacity=20)
    aside = growop.GrowLinear(16, 10, capacity=10)
    with torch.no_grad():
        aside.weight.copy_(in_place.weight[:10])
        aside.bias.copy_(in_place.bias[:10])
    aside._init_seed.copy_(in_place._init_seed)
    in_place.grow(3, init=init)
    aside.grow(3, init=init, allow_reallocation=True)
    assert in_place.capacity == 20 and aside.capacity > 10
    torch.testing.assert_close(in_place.weight[:13], aside.weight[:13], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(in_place.bias[:13], aside.bias[:13], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("init", ["default", "mean", "zeros"])
@pytest.mark.parametrize("capacity", [10, 6], ids=["within-capacity", "past-capacity"])
def test_tied_rows_of_a_head_with_a_bias_are_the_sources(capacity, init):
    """tie(embedding, head with a bias of its own), grown by 2 from 6 rows: the tied rows
    are the embedding's (its N(0, 1) draw, its mean), never the head's kaiming draw, within
    capacity (rows written in place) as past it (made aside); the head's bias rows are the
    ones the head alone makes."""
    torch.manual_seed(0)
    emb = growop.GrowEmbedding(6, 4, capacity=capacity)
    head = growop.GrowLinear(4, 6, bias=True, capacity=capacity)
    growop.tie(emb, head)
    emb_alone = growop.GrowEmbedding(6, 4, capacity=capacity)
    head_alone = growop.GrowLinear(4, 6, bias=True, capacity=capacity)
    with torch.no_grad():
        emb_alone.weight.copy_(emb.weight)
        head_alone.weight.copy_(emb.weight)
        head_alone.bias.copy_(head.bias)
    emb_alone._init_seed.copy_(emb._init_seed)
    head_alone._init_seed.copy_(head._init_seed)
    head.grow(2, init=init, allow_reallocation=True)
    for alone in (emb_alone, head_alone):
        alone.grow(2, init=init, allow_reallocation=True)
    torch.testing.assert_close(emb.weight[:8], emb_alone.weight[:8], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(head.bias[:8], head_alone.bias[:8], rtol=1e-6, atol=1e-6)
    if init == "default":
        assert emb.weight[6:8].abs().max() > 1 / 2  # the head's draw is within +-1/sqrt(4)


def test_grow_mean_in_place_skips_masked_rows():
    layer = growop.GrowLinear(8, 4, capacity=10)
    with torch.no_grad():
        layer.weight[:4] = torch.arange(4.0)[:, None]
    layer.deactivate([3])
    layer.grow(2, init="mean")
    torch.testing.assert_close(layer.weight[4:6], torch.full((2, 8), 1.0))  # mean of rows 0-2


def test_reserve_makes_room_ahead_and_keeps_everything_else():
    """reserve(capacity): one reallocation now, to exactly that many rows, for every joined
    layer; Parameters, old rows, live rows and the optimizer's state kept; the grows that
    follow allocate nothing; at or below the capacity it does nothing."""
    torch.manual_seed(0)
    head = growop.GrowLinear(4, 3, capacity=4)
    other = growop.GrowLinear(5, 3, capacity=4, bias=False)
    growop.grow_together(head, other)
    opt = torch.optim.Adam([*head.parameters(), *other.parameters()], lr=0.1)
    head(torch.randn(2, 4)).sum().backward()
    other(torch.randn(2, 5)).sum().backward()
    opt.step()
    weight, before = head.weight, head.weight.detach().clone()
    exp_avg = opt.state[head.weight]["exp_avg"].clone()

    head.reserve(10, optimizer=opt)
    assert head.capacity == other.capacity == 10 and head.weight is weight
    assert head.out_features == other.out_features == 3
    assert torch.equal(head.weight[:4], before) and torch.equal(head.weight[4:], torch.zeros(6, 4))
    assert head.active.tolist() == [True] * 3 + [False] * 7
    assert torch.equal(opt.state[head.weight]["exp_avg"][:4], exp_avg)
    assert opt.state[head.weight]["exp_avg"].shape == (10, 4)

    pointer = head.weight.data_ptr()
    head.grow(7, optimizer=opt)
    assert head.weight.data_ptr() == pointer and head.capacity == 10  # within the reserve
    head.reserve(8)
    head.reserve(10)
    assert head.capacity == 10 and head.weight.data_ptr() == pointer

    for bad in (0, -1, 2.5, "10"):
        with pytest.raises((TypeError, ValueError), match="reserve: capacity"):
            head.reserve(bad)
    assert head.capacity == 10
