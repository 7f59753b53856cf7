"""GrowEmbedding: an nn.Embedding whose vocabulary grows in place, alone and tied to a head."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import growop
from growop import GrowEmbedding

V, D, CAP = 10, 6, 16


def make(num=V, dim=D, capacity=CAP, dtype=torch.float64, **kwargs) -> GrowEmbedding:
    torch.manual_seed(0)
    return GrowEmbedding(num, dim, capacity=capacity, dtype=dtype, **kwargs)


def ids(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


# ----------------------------------------------------------------------------- basics


def test_is_an_nn_embedding_with_capacity_rows():
    emb = make(padding_idx=-2)
    assert isinstance(emb, nn.Embedding)
    assert emb.weight.shape == (CAP, D)
    assert emb.num_embeddings == V and emb.capacity == CAP and emb.embedding_dim == D
    assert emb.padding_idx == V - 2
    assert torch.count_nonzero(emb.weight[V - 2]) == 0
    assert emb.active.tolist() == [True] * V + [False] * (CAP - V)
    assert GrowEmbedding(100, 4).capacity == growop.default_capacity(100) == 125
    assert "capacity=16" in repr(emb)


def test_num_embeddings_changes_only_as_rows_grow():
    emb = make()
    emb.num_embeddings = V  # the value it has: code copying nn.Embedding's attributes
    with pytest.raises(AttributeError, match=r"num_embeddings is the number of row slots.*grow\(k\)"):
        emb.num_embeddings = V + 1
    assert emb.num_embeddings == emb.rows.used == emb.live_count == V
    with pytest.raises(IndexError, match="out of range"):
        emb(ids(V))
    emb.grow(2)
    assert emb.num_embeddings == emb.rows.used == V + 2 and emb(ids(V + 1)).shape == (1, D)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"capacity": 5}, ValueError, r"capacity \(5\) must be >= num_embeddings \(10\)"),
        ({"padding_idx": 10}, ValueError, r"padding_idx \(10\) must be < num_embeddings \(10\)"),
        ({"padding_idx": -11}, ValueError, "padding_idx must be >= -10"),
        ({"capacity": 2.5}, TypeError, "capacity must be an int"),
    ],
)
def test_constructor_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        GrowEmbedding(V, D, **kwargs)


def test_lookup_and_gradient_match_nn_embedding():
    plain = nn.Embedding(V, D, padding_idx=1, dtype=torch.float64)
    emb = GrowEmbedding.from_embedding(plain, capacity=CAP)
    x = torch.tensor([[0, 1, 9, 3], [3, 3, 1, 7]])
    assert torch.equal(emb(x), plain(x))
    emb(x).pow(2).sum().backward()
    plain(x).pow(2).sum().backward()
    assert torch.equal(emb.weight.grad[:V], plain.weight.grad)
    assert torch.count_nonzero(emb.weight.grad[V:]) == 0
    assert torch.count_nonzero(emb.weight.grad[1]) == 0  # the padding row


def test_construction_on_meta_computes_nothing():
    emb = GrowEmbedding(V, D, capacity=CAP, device="meta")
    assert emb.weight.is_meta and emb.weight.shape == (CAP, D) and emb.num_embeddings == V


# ----------------------------------------------------------------------------- ids that are not live


@pytest.mark.parametrize(
    "bad, match",
    [
        (V, rf"id {V} is out of range: ids must be in \[0, num_embeddings={V}\)"),
        (CAP - 1, rf"id {CAP - 1} is out of range"),
        (-1, r"id -1 is out of range"),
    ],
)
def test_ids_out_of_range_raise_index_error(bad, match):
    emb = make()
    with pytest.raises(IndexError, match=match):
        emb(ids(0, bad, 2))


def test_masked_row_raises_until_reactivated():
    emb = make()
    emb.deactivate([4])
    with pytest.raises(IndexError, match="id 4 is a deactivated row"):
        emb(ids([1, 2], [4, 5]))
    emb(ids(3, 5, 9))  # every other id still works
    emb.reactivate(4)
    assert torch.equal(emb(ids(4)), emb.weight[4:5])


def test_grown_ids_become_valid():
    emb = make()
    with pytest.raises(IndexError):
        emb(ids(V))
    emb.grow(2)
    assert emb.num_embeddings == V + 2
    assert torch.equal(emb(ids(V, V + 1)), emb.weight[V : V + 2])


def test_sparse_is_refused_clearly():
    with pytest.raises(ValueError, match="sparse=True"):
        GrowEmbedding.from_embedding(nn.Embedding(V, D, sparse=True))
    emb = make()
    emb.sparse = True
    with pytest.raises(RuntimeError, match="does not support sparse=True"):
        emb(ids(1))


def test_max_norm_and_scale_grad_by_freq_behave_as_nn_embedding():
    torch.manual_seed(1)
    plain = nn.Embedding(V, D, max_norm=1.0, scale_grad_by_freq=True, dtype=torch.float64)
    emb = GrowEmbedding.from_embedding(plain, capacity=CAP)
    before = emb.weight.detach().clone()
    x = ids(2, 2, 5)
    assert torch.equal(emb(x), plain(x))
    assert torch.equal(emb.weight[:V], plain.weight)  # the same rows renormalised in place
    assert torch.equal(emb.weight[V:], before[V:])  # rows that are not live untouched
    emb(x).sum().backward()
    plain(x).sum().backward()
    assert torch.equal(emb.weight.grad[:V], plain.weight.grad)


# ----------------------------------------------------------------------------- growing


def test_grow_within_capacity_keeps_the_parameter_and_storage():
    emb = make()
    param, ptr = emb.weight, emb.weight.data_ptr()
    old = emb.weight.detach().clone()
    assert emb.grow(3) == range(V, V + 3)
    assert emb.weight is param and emb.weight.data_ptr() == ptr
    assert torch.equal(emb.weight[:V], old[:V])
    assert emb.active[: V + 3].all() and not emb.active[V + 3 :].any()


def test_grow_inits():
    emb = make()
    emb.deactivate([0])
    live_mean = emb.weight[1:V].mean(0)
    emb.grow(2, init="mean")
    torch.testing.assert_close(emb.weight[V], live_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(emb.weight[V + 1], live_mean, rtol=0, atol=1e-12)
    emb.grow(1, init="zeros")
    assert torch.count_nonzero(emb.weight[V + 2]) == 0
    row = torch.arange(D, dtype=torch.float64)
    emb.grow(1, init=row)
    assert torch.equal(emb.weight[V + 3], row)
    emb.grow(1, init=lambda weight: weight.fill_(7.0))
    assert torch.equal(emb.weight[V + 4], torch.full((D,), 7.0, dtype=torch.float64))


def test_default_rows_are_standard_normal_and_follow_the_seed():
    a, b = make(capacity=4000), make(capacity=4000)
    a.grow(3000)
    torch.manual_seed(123)  # the global RNG at grow time does not matter
    b.grow(3000)
    assert torch.equal(a.weight, b.weight)
    rows = a.weight.detach()[V : V + 3000]
    assert abs(float(rows.mean())) < 0.02 and abs(float(rows.std()) - 1) < 0.02


def test_grow_past_capacity_keeps_the_parameter_and_old_rows():
    emb = make(capacity=V)
    param, old = emb.weight, emb.weight.detach().clone()
    emb.grow(2, init="zeros")
    assert emb.weight is param and emb.capacity >= V + 2
    assert torch.equal(emb.weight[:V], old)
    assert emb(ids(V + 1)).abs().sum() == 0


def test_grow_error_changes_nothing():
    emb = make()
    before = emb.state_dict()
    with pytest.raises(ValueError, match="unknown init"):
        emb.grow(2, init="nope")
    with pytest.raises(ValueError, match="must have shape"):
        emb.grow(2, init=torch.zeros(3, D))
    after = emb.state_dict()
    assert emb.num_embeddings == V and all(torch.equal(before[k], after[k]) for k in before)


# ----------------------------------------------------------------------------- optimizer


def _train(model_fn, params, steps, x):
    for _ in range(steps):
        params.zero_grad()
        model_fn(x).pow(2).sum().backward()
        params.step()


def test_adamw_state_of_old_rows_is_kept_and_new_rows_start_fresh():
    emb = make()
    opt = torch.optim.AdamW(emb.parameters(), lr=0.1)
    x = ids(0, 3, 5, 9)
    _train(emb, opt, 3, x)
    state = {k: v.clone() for k, v in opt.state[emb.weight].items() if isinstance(v, torch.Tensor) and v.dim() == 2}
    emb.grow(2, optimizer=opt)
    for name, value in state.items():
        assert torch.equal(opt.state[emb.weight][name][:V], value[:V]), name
        assert torch.count_nonzero(opt.state[emb.weight][name][V : V + 2]) == 0, name


def test_new_rows_train_as_a_fresh_adamw_would():
    emb = make()
    opt = torch.optim.AdamW(emb.parameters(), lr=0.05, weight_decay=0.1)
    x = ids(0, 3, 5, V, V + 1)
    _train(emb, opt, 5, x[:3])
    emb.grow(2, optimizer=opt)
    mirror = emb.weight[V : V + 2].detach().clone().requires_grad_()
    fresh = torch.optim.AdamW([mirror], lr=0.05, weight_decay=0.1)
    for _ in range(4):
        opt.zero_grad()
        emb(x).pow(2).sum().backward()
        mirror.grad = emb.weight.grad[V : V + 2].clone()
        opt.step()
        fresh.step()
    torch.testing.assert_close(emb.weight[V : V + 2], mirror, rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------- conversion and checkpoints


def test_to_embedding_and_from_pretrained():
    emb = make(padding_idx=2)
    emb.grow(2)
    plain = emb.to_embedding()
    assert type(plain) is nn.Embedding and plain.weight.shape == (V + 2, D)
    assert plain.padding_idx == 2
    x = ids(0, 2, V + 1)
    assert torch.equal(plain(x), emb(x))
    again = GrowEmbedding.from_pretrained(plain.weight.detach(), freeze=False, capacity=20)
    assert again.capacity == 20 and again.num_embeddings == V + 2 and again.weight.requires_grad
    assert torch.equal(again(x), emb(x))


def test_state_dict_round_trips_across_capacities_and_from_nn_embedding():
    emb = make()
    emb.grow(3)
    emb.deactivate([1])
    state = emb.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    for capacity in (CAP, V + 3, 40):
        other = GrowEmbedding(V, D, capacity=capacity, dtype=torch.float64)
        other.load_state_dict(state)
        assert other.num_embeddings == V + 3
        assert torch.equal(other.active[: V + 3], emb.active[: V + 3])
        assert not other.active[V + 3 :].any()
        assert torch.equal(other(ids(0, 2, V + 2)), emb(ids(0, 2, V + 2)))
        with pytest.raises(IndexError):
            other(ids(1))
    plain = nn.Embedding(7, D, dtype=torch.float64)
    other = GrowEmbedding(V, D, capacity=CAP, dtype=torch.float64)
    other.load_state_dict(plain.state_dict())
    assert other.num_embeddings == 7 and torch.equal(other(ids(6)), plain(ids(6)))


def test_a_state_dict_of_named_parameters_keeps_the_mask_and_reports_it_missing():
    """The embedding's own rows saved without the mask (`capacity` rows) are not taken as
    a stock checkpoint of `capacity` tokens: the rows load, the mask and counts stay."""
    emb = make()
    emb.grow(2)
    emb.deactivate([1])
    state = {name: p.detach().clone() for name, p in emb.named_parameters()}
    other = make()
    other.grow(2)
    other.deactivate([1])
    with torch.no_grad():
        other.weight.zero_()
    keys = other.load_state_dict(state, strict=False)
    assert keys.missing_keys == ["active", "_extra_state"]
    assert other.num_embeddings == V + 2 and other.live_count == V + 1
    assert torch.equal(other.active, emb.active) and torch.equal(other.weight, emb.weight)
    with pytest.raises(IndexError):
        other(ids(1))
    with pytest.raises(RuntimeError, match="Missing key"):
        other.load_state_dict(state)


# ----------------------------------------------------------------------------- tied and grown-together heads


def tied_pair(bias: bool = False):
    emb = make()
    head = growop.GrowLinear(D, V, bias=bias, capacity=CAP, dtype=torch.float64)
    growop.tie(emb, head)
    return emb, head


def test_tied_head_shares_the_parameter_rows_and_mask():
    emb, head = tied_pair()
    assert head.weight is emb.weight
    assert len(list(nn.ModuleList([emb, head]).parameters())) == 1
    head.grow(2, init="mean")  # a grow on either grows both
    assert emb.num_embeddings == head.out_features == V + 2
    emb.grow(1)
    assert emb.num_embeddings == head.out_features == V + 3
    assert torch.equal(emb.active, head.active)
    emb.deactivate([5])
    out = head(torch.randn(2, D, dtype=torch.float64))
    assert out.shape == (2, V + 3)
    assert (out[:, 5] == torch.finfo(torch.float64).min).all()
    with pytest.raises(IndexError, match="id 5 is a deactivated row"):
        emb(ids(5))


class TinyLM(nn.Module):
    def __init__(self, emb, head):
        super().__init__()
        self.emb, self.mix, self.head = emb, nn.Linear(D, D, dtype=torch.float64), head

    def forward(self, x):
        return self.head(torch.tanh(self.mix(self.emb(x))))


def test_tied_training_matches_a_plain_tied_model_across_a_grow():
    torch.manual_seed(0)
    plain_emb = nn.Embedding(V, D, dtype=torch.float64)
    plain_head = nn.Linear(D, V, bias=False, dtype=torch.float64)
    plain_head.weight = plain_emb.weight
    plain = TinyLM(plain_emb, plain_head)
    emb = GrowEmbedding.from_embedding(plain_emb, capacity=CAP)
    head = growop.GrowLinear(D, V, bias=False, capacity=CAP, dtype=torch.float64)
    growop.tie(emb, head)
    grown = TinyLM(emb, head)
    grown.mix.load_state_dict(plain.mix.state_dict())
    opt = torch.optim.SGD(grown.parameters(), lr=0.1, momentum=0.9)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    x = torch.tensor([[1, 4, 2], [7, 0, 3]])
    for model, optimizer in ((grown, opt), (plain, plain_opt)):
        for _ in range(3):
            optimizer.zero_grad()
            F.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
            optimizer.step()
    torch.testing.assert_close(emb.weight[:V], plain_emb.weight, rtol=0, atol=1e-12)
    assert len(opt.state) == len(list(grown.parameters())) == 3  # one state for the tied weight
    head.grow(1, optimizer=opt)
    x = torch.tensor([[1, V, 2], [V, 0, 3]])
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = F.cross_entropy(grown(x).flatten(0, 1), x.flatten())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_untied_pair_grows_together_each_with_its_own_rows():
    emb = make()
    head = growop.GrowLinear(D, V, capacity=CAP, dtype=torch.float64)
    growop.grow_together(emb, head)
    assert head.weight is not emb.weight
    emb_mean, head_mean = emb.weight[:V].mean(0), head.weight[:V].mean(0)
    emb.grow(2, init="mean")
    assert head.out_features == V + 2
    torch.testing.assert_close(emb.weight[V], emb_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(head.weight[V], head_mean, rtol=0, atol=1e-12)
    head.deactivate(3)
    with pytest.raises(IndexError):
        emb(ids(3))


def test_compiled_lookup_asserts_on_the_device_instead_of_syncing():
    emb = make()
    emb.deactivate([4])
    compiled = torch.compile(emb, backend="eager", fullgraph=True)
    assert torch.equal(compiled(ids(1, 9)), emb.weight[[1, 9]])
    for bad in (4, V, -1):
        with pytest.raises(RuntimeError, match="out of range or not live"):
            compiled(ids(1, bad))


@pytest.mark.parametrize("how", ["jit_trace", "fx", "export"])
def test_recorded_graphs_check_ids_against_the_mask_when_they_run(how):
    """A traced, symbolically traced or exported lookup runs later, on the mask as it is
    then: it refuses an id out of range, and one deactivated after recording (recorded
    while every row was live, so no Python branch may leave the mask check out)."""
    emb = make()
    example = ids(1, 2)
    if how == "jit_trace":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on Python values
            graph = torch.jit.trace(emb, example)
    elif how == "fx":
        graph = torch.fx.symbolic_trace(emb)
    else:
        graph = torch.export.export(emb, (example,)).module()
    torch.testing.assert_close(graph(ids(1, 9)), emb.weight[[1, 9]])
    emb.deactivate([4])
    for bad in (4, V, -1):
        with pytest.raises((RuntimeError, IndexError, AssertionError)):
            graph(ids(1, bad))


def test_lookup_follows_a_mask_copied_in_by_an_ema_update():
    source = make()
    copy_of_it = make()
    source.grow(2)
    source.deactivate([3])
    with torch.no_grad():
        copy_of_it.active.copy_(source.active)  # what AveragedModel does to buffers
    assert torch.equal(copy_of_it(ids(10, 11)), copy_of_it.weight[[10, 11]])
    with pytest.raises(IndexError, match="id 3 is a deactivated row"):
        copy_of_it(ids(3))
    assert (copy_of_it.num_embeddings, copy_of_it.live_count) == (12, 11)


def test_growing_past_capacity_between_lookup_and_backward_is_a_clear_error():
    """A lookup saves nothing autograd could check (GrowLinear's backward fails at once): a
    gradient of the old row count is caught at the optimizer's step, naming the cause."""
    emb = make(capacity=V + 1)
    opt = torch.optim.AdamW(emb.parameters())
    out = emb(ids(1, 2))
    emb.grow(3, optimizer=opt)
    out.sum().backward()
    with pytest.raises(RuntimeError, match=r"a backward ran through a forward made before the layer grew"):
        opt.step()
    opt.zero_grad()
    emb(ids(1, 2)).sum().backward()  # a lookup after the grow is fine
    opt.step()
