"""GrowLinear under data-parallel training: DDP (wrapped once) and FSDP2, on CPU with gloo.

Each real test starts two fresh processes (``run_on_ranks`` in ``conftest.py``: spawn, a
gloo group on the loopback interface, timeouts so a hang fails the test). Workers save what
they saw; the assertions run here.

The training is the same everywhere (:func:`train`): a few steps on 3 classes, every rank
grows 2 output rows with its global RNG deliberately different from the others', a few
steps on 5 classes. Each rank gets half the batch; the result must match one process
training on the whole batch.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import growop.distributed
from conftest import WORLD_SIZE, run_on_ranks
from growop import GrowLinear

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch built without distributed")


IN, HIDDEN, CLASSES, NEW, CAPACITY, BATCH, STEPS = 5, 8, 3, 2, 6, 8, 3
# Final weights of data-parallel and single-process training agree to this (float32).
ATOL = RTOL = 1e-5


# ----------------------------------------------------------------------------- the training


def make_model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(IN, HIDDEN), nn.Tanh(), GrowLinear(HIDDEN, CLASSES, capacity=CAPACITY)
    )


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)


def batches() -> tuple[torch.Tensor, torch.Tensor]:
    """``2 * STEPS`` batches: labels from the old classes, then from old and new."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2 * STEPS, BATCH, IN, generator=g)
    y = torch.cat(
        [
            torch.randint(CLASSES, (STEPS, BATCH), generator=g),
            torch.randint(CLASSES + NEW, (STEPS, BATCH), generator=g),
        ]
    )
    return x, y


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A plain copy of ``tensor``, gathered if it is an FSDP2 shard."""
    return growop.distributed.full(tensor.detach()).clone()


def train(model, layer: GrowLinear, opt, *, rank: int = 0, shard=slice(None), grow=None, after_grow=None):
    """STEPS steps, ``grow(layer, opt)`` with a per-rank global RNG, STEPS more steps.

    Returns the new rows as grown and the model as it ends.
    """
    x, y = batches()
    new_rows = None
    for step in range(2 * STEPS):
        if step == STEPS:
            torch.manual_seed(1000 + rank)  # ranks' global RNGs now differ on purpose
            rows = (grow or (lambda l, o: l.grow(NEW, optimizer=o)))(layer, opt)
            assert list(rows) == list(range(CLASSES, CLASSES + NEW))
            new_rows = full(layer.weight)[CLASSES : CLASSES + NEW], full(layer.bias)[CLASSES : CLASSES + NEW]
            if after_grow is not None:
                model = after_grow(model)
        opt.zero_grad()
        F.cross_entropy(model(x[step, shard]), y[step, shard]).backward()
        opt.step()
    return new_rows, model


def reference(grow=None) -> dict:
    """The same training in one process on the whole batch, from rank 0's initialisation."""
    model = make_model(seed=0)
    opt = make_optimizer(model)
    new_rows, model = train(model, model[2], opt, rank=0, grow=grow)
    return {"new_rows": new_rows, "state": tensor_state(model)}


def half_batch(rank: int) -> slice:
    size = BATCH // WORLD_SIZE
    return slice(rank * size, (rank + 1) * size)


def assert_matches_reference(results: list[dict], expected: dict) -> None:
    want_weight, want_bias = expected["new_rows"]
    for rank, result in enumerate(results):
        # Grown rows come from the layer's seed, not the (desynchronised) global RNG: exact.
        got_weight, got_bias = result["new_rows"]
        torch.testing.assert_close(got_weight, want_weight, atol=0, rtol=0, msg=f"rank {rank}: new weights")
        torch.testing.assert_close(got_bias, want_bias, atol=0, rtol=0, msg=f"rank {rank}: new biases")
        assert set(result["state"]) == set(expected["state"])
        for key, want in expected["state"].items():
            torch.testing.assert_close(
                result["state"][key], want, atol=ATOL, rtol=RTOL,
                msg=lambda m, key=key, rank=rank: f"rank {rank}, {key}: {m}",
            )


def tensor_state(model: nn.Module) -> dict:
    """The model's tensors, gathered where sharded (a collective under FSDP2)."""
    return {k: full(v) for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


# ----------------------------------------------------------------------------- DDP


def ddp_grow_within_capacity(rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    # Ranks start different; wrapping broadcasts rank 0's parameters and buffers, the
    # layer's init seed included.
    model = DDP(make_model(seed=rank))
    layer = model.module[2]
    opt = make_optimizer(model)
    params = [layer.weight, layer.bias]
    pointers = [p.data_ptr() for p in params]

    new_rows, trained = train(model, layer, opt, rank=rank, shard=half_batch(rank))

    assert trained is model, "the DDP wrapper must not be replaced"
    assert [layer.weight, layer.bias] == params and [p.data_ptr() for p in params] == pointers
    assert layer.out_features == CLASSES + NEW and layer.capacity == CAPACITY
    return {"new_rows": new_rows, "state": tensor_state(model.module)}


def test_ddp_grow_within_capacity_matches_single_process(tmp_path):
    results = run_on_ranks(ddp_grow_within_capacity, tmp_path)
    expected = reference()
    assert_matches_reference(results, expected)
    # The new rows trained: they moved from their initial values.
    grown = results[0]["state"]["2.weight"][CLASSES : CLASSES + NEW]
    assert (grown - expected["new_rows"][0]).abs().amax(1).min() > 1e-3


def ddp_grow_past_capacity(rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(make_model(seed=0))
    layer = model.module[2]
    opt = make_optimizer(model)
    too_many = CAPACITY - CLASSES + 1
    before = {k: v.clone() for k, v in layer.state_dict().items() if isinstance(v, torch.Tensor)}
    pointer = layer.weight.data_ptr()
    try:
        layer.grow(too_many, optimizer=opt)
        message = None
    except RuntimeError as error:
        message = str(error)
    unchanged = (
        layer.out_features == CLASSES
        and layer.capacity == CAPACITY
        and layer.weight.data_ptr() == pointer
        and all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items())
    )
    x, y = batches()  # and the same DDP model trains on
    F.cross_entropy(model(x[0, half_batch(rank)]), y[0, half_batch(rank)]).backward()
    opt.step()
    return {"message": message, "unchanged": unchanged, "state": tensor_state(model.module)}


def test_ddp_grow_past_capacity_raises_before_changing_anything(tmp_path):
    results = run_on_ranks(ddp_grow_past_capacity, tmp_path)
    for rank, result in enumerate(results):
        message = result["message"]
        assert message is not None, f"rank {rank}: grow past capacity under DDP did not raise"
        for phrase in ("capacity (6)", "DistributedDataParallel", "gradient buckets",
                       "Nothing has been changed", "capacity=7", "allow_reallocation=True"):
            assert phrase in message, f"rank {rank}: {phrase!r} missing from: {message}"
        assert result["unchanged"], f"rank {rank}: the layer changed before the error"
    for key, value in results[0]["state"].items():
        torch.testing.assert_close(results[1]["state"][key], value, atol=0, rtol=0, msg=key)


def _grow_past_capacity_allowed(layer, opt):
    return layer.grow(NEW + CAPACITY - CLASSES, optimizer=opt, allow_reallocation=True)[:NEW]


def ddp_reallocate_and_wrap_again(rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(make_model(seed=rank))
    layer = model.module[2]
    opt = make_optimizer(model)
    new_rows, model = train(
        model, layer, opt, rank=rank, shard=half_batch(rank),
        grow=_grow_past_capacity_allowed,
        after_grow=lambda wrapped: DDP(wrapped.module),  # new buckets for the new storage
    )
    assert layer.capacity > CAPACITY
    return {"new_rows": new_rows, "state": tensor_state(model.module)}


def test_ddp_allow_reallocation_then_wrap_again_matches_single_process(tmp_path):
    results = run_on_ranks(ddp_reallocate_and_wrap_again, tmp_path)
    assert_matches_reference(results, reference(grow=_grow_past_capacity_allowed))


# ----------------------------------------------------------------------------- FSDP2


def fsdp2_grow_within_capacity(rank: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # FSDP2 does not broadcast at wrap time: every rank must build the same model.
    model = make_model(seed=0)
    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model[2], mesh=mesh)
    fully_shard(model, mesh=mesh)
    layer = model[2]
    assert growop.distributed.is_sharded(layer.weight)
    opt = make_optimizer(model)
    new_rows, model = train(model, layer, opt, rank=rank, shard=half_batch(rank))
    state = tensor_state(model)

    # The other in-place row writes, on shards: a "mean" row (gathers the live rows) and
    # the optimizer state of a deactivated row.
    live_mean = full(layer.weight)[: layer.out_features].mean(0)
    row = layer.grow(1, init="mean", optimizer=opt).start
    mean_row = full(layer.weight)[row]
    layer.deactivate(0, optimizer=opt)
    momentum = full(opt.state[layer.weight]["momentum_buffer"])
    try:  # FSDP owns the storage: never reallocated, whatever the keyword says
        layer.grow(CAPACITY, allow_reallocation=True)
        message = None
    except RuntimeError as error:
        message = str(error)
    return {
        "new_rows": new_rows,
        "state": state,
        "mean_row": (mean_row, live_mean),
        "momentum": momentum,
        "message": message,
        "out_features": layer.out_features,
    }


def _has_fully_shard() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _has_fully_shard(), reason="FSDP2 (fsdp.fully_shard) needs torch >= 2.6")
def test_fsdp2_grow_within_capacity_matches_single_process(tmp_path):
    results = run_on_ranks(fsdp2_grow_within_capacity, tmp_path)
    assert_matches_reference(results, reference())
    for result in results:
        torch.testing.assert_close(*result["mean_row"], msg=lambda m: f"grow(init='mean'): {m}")
        momentum = result["momentum"]
        assert (momentum[0] == 0).all() and (momentum[1].abs() > 0).any(), "deactivate(optimizer=)"
        assert result["message"] is not None and "FSDP2" in result["message"], result["message"]
        assert result["out_features"] == CLASSES + NEW + 1


# ----------------------------------------------------------------------------- without processes


def test_world_size_is_one_without_a_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already running in this process")
    assert growop.distributed.world_size() == 1
    layer = GrowLinear(4, 2, capacity=2)
    layer.grow(3)  # no keyword needed
    assert layer.out_features == 5 and layer.capacity > 2


def test_allow_reallocation_with_several_processes(monkeypatch):
    monkeypatch.setattr(growop.distributed, "world_size", lambda: 2)
    layer = GrowLinear(4, 2, capacity=3)
    weight, pointer = layer.weight, layer.weight.data_ptr()
    state = {k: v.clone() for k, v in layer.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(RuntimeError, match="allow_reallocation=True"):
        layer.grow(2)
    assert layer.out_features == 2 and layer.capacity == 3 and layer.weight.data_ptr() == pointer
    for key, value in state.items():
        assert torch.equal(layer.state_dict()[key], value), key

    layer.grow(1)  # within capacity: allowed
    assert layer.out_features == 3 and layer.weight.data_ptr() == pointer
    assert layer.grow(2, allow_reallocation=True) == range(3, 5)
    assert layer.weight is weight and layer.capacity > 3


def test_init_callable_is_not_run_when_growth_is_refused(monkeypatch):
    monkeypatch.setattr(growop.distributed, "world_size", lambda: 2)
    layer = GrowLinear(4, 2, capacity=2)
    calls = []
    with pytest.raises(RuntimeError, match="capacity"):
        layer.grow(1, init=lambda w, b: calls.append(w))
    assert calls == []


# ----------------------------------------------------------------------------- grow's seed


def grown_rows(layer: GrowLinear, k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    grown = layer.grow(k)
    rows = slice(grown.start, grown.stop)
    return layer.weight[rows].detach().clone(), layer.bias[rows].detach().clone()


def test_default_rows_ignore_the_global_rng_at_grow_time():
    torch.manual_seed(0)
    first = GrowLinear(7, 2, capacity=20)
    torch.manual_seed(0)
    second = GrowLinear(7, 2, capacity=20)
    torch.manual_seed(1)
    rows_first = grown_rows(first)
    torch.manual_seed(2)
    rows_second = grown_rows(second)
    for got, want in zip(rows_second, rows_first):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_default_rows_follow_the_seed_at_construction_and_differ_per_grow_and_layer():
    torch.manual_seed(0)
    layer, other = GrowLinear(7, 2, capacity=20), GrowLinear(7, 2, capacity=20)
    torch.manual_seed(1)
    reseeded = GrowLinear(7, 2, capacity=20)
    rows = grown_rows(layer)[0]
    assert not torch.equal(rows, grown_rows(other)[0]), "two layers grew the same rows"
    assert not torch.equal(rows, grown_rows(reseeded)[0]), "another seed grew the same rows"
    assert not torch.equal(rows, grown_rows(layer)[0]), "a second grow repeated the first"


def test_copying_the_seed_buffer_makes_layers_grow_alike():
    """What DDP's broadcast at wrap time does for every rank."""
    torch.manual_seed(3)
    source = GrowLinear(7, 2, capacity=20)
    torch.manual_seed(4)
    target = GrowLinear(7, 2, capacity=20)
    target._init_seed.copy_(source._init_seed)
    for got, want in zip(grown_rows(target), grown_rows(source)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_reset_parameters_draws_a_new_seed_and_state_dict_keys_are_unchanged():
    torch.manual_seed(5)
    layer = GrowLinear(7, 2, capacity=20)
    assert "_init_seed" in dict(layer.named_buffers())
    assert set(layer.state_dict()) == {"weight", "bias", "active", "_extra_state"}
    seed = int(layer._init_seed)
    layer.reset_parameters()
    assert int(layer._init_seed) != seed
    assert layer.to(torch.float16)._init_seed.dtype == torch.int64
