"""GrowEmbedding against nn.Embedding's own contract: PyTorch's module-test inputs for
nn.Embedding, torch.func (vmap, per-sample gradients, ensembles), the ids nn.Embedding
refuses and the exception types it raises."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap

from growop import GrowEmbedding

V, D, CAP = 10, 4, 16


def pair(padding_idx=None, dtype=torch.float64) -> tuple[nn.Embedding, GrowEmbedding]:
    """An nn.Embedding and a GrowEmbedding with its rows (and more capacity)."""
    torch.manual_seed(0)
    plain = nn.Embedding(V, D, padding_idx=padding_idx, dtype=dtype)
    return plain, GrowEmbedding.from_embedding(plain, capacity=CAP)


# ----------------------------------------------------------------------------- PyTorch's module tests

def _import_module_db():
    """PyTorch's own module tests, imported with the process-wide state left as it was:
    ``torch.testing._internal.common_utils`` freezes torch.backends' flags at import
    (``disable_global_flags``: setting ``torch.backends.cudnn.allow_tf32`` then raises) and
    replaces ``torch._C.ScriptFunction.__call__`` / ``ScriptMethod.__call__``. Imported here,
    not at the top, so that nothing changes while pytest collects every file."""
    calls = torch._C.ScriptFunction.__call__, torch._C.ScriptMethod.__call__
    try:
        # torch.backends' own context for changing its flags: it puts the freeze flag back
        # as it found it on exit (there is no public inverse of disable_global_flags).
        with torch.backends.__allow_nonbracketed_mutation(), warnings.catch_warnings():
            from torch.testing._internal.common_modules import ModuleErrorEnum, module_db
    finally:
        torch._C.ScriptFunction.__call__, torch._C.ScriptMethod.__call__ = calls
    return module_db, ModuleErrorEnum


@pytest.fixture(scope="module")
def embedding_info():
    """nn.Embedding's entry in PyTorch's module tests, and the enum of where an error occurs."""
    try:
        module_db, error_enum = _import_module_db()
    except ImportError as error:  # pragma: no cover - exercised only without expecttest
        pytest.skip(f"torch's module tests need expecttest (the test extra): {error}")
    return next(info for info in module_db if info.module_cls is nn.Embedding), error_enum


def _module_inputs(info, dtype: torch.dtype):
    return info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True, training=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_torch_module_inputs_for_nn_embedding_give_the_same_lookups_and_gradients(embedding_info, dtype):
    """Each constructor and forward input that PyTorch's own module tests use for
    nn.Embedding: GrowEmbedding built from the same arguments looks up the same rows, and
    the same gradients reach the live rows (none the rows past them)."""
    inputs = _module_inputs(embedding_info[0], dtype)
    assert inputs
    for sample in inputs:
        args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
        (ids,) = sample.forward_input.args
        torch.manual_seed(0)
        plain = nn.Embedding(*args, **kwargs, dtype=dtype)
        grown = GrowEmbedding(*args, **kwargs, dtype=dtype)
        assert grown.num_embeddings == plain.num_embeddings and grown.embedding_dim == plain.embedding_dim
        with torch.no_grad():
            grown.weight[: plain.num_embeddings].copy_(plain.weight)
        out, want = grown(ids), plain(ids)
        assert torch.equal(out, want), sample.desc
        upstream = torch.randn_like(want)
        out.backward(upstream)
        want.backward(upstream)
        assert torch.equal(grown.weight.grad[: plain.num_embeddings], plain.weight.grad), sample.desc
        assert torch.count_nonzero(grown.weight.grad[plain.num_embeddings :]) == 0, sample.desc
        batched = vmap(grown)(ids)  # the same inputs under torch.func.vmap
        assert torch.equal(batched, want.detach()), sample.desc


def test_torch_error_inputs_for_nn_embedding_raise_the_same_exception_types(embedding_info):
    """PyTorch's error inputs for nn.Embedding (an id out of range, float ids, a negative
    num_embeddings) raise exceptions of the type nn.Embedding raises there."""
    info, ModuleErrorEnum = embedding_info  # noqa: N806 - torch's enum, under its own name
    samples = info.module_error_inputs_func(
        info, device="cpu", dtype=torch.float32, requires_grad=False, training=True
    )
    assert samples
    for sample in samples:
        module_input = sample.module_error_input
        args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
        with pytest.raises(sample.error_type):
            layer = GrowEmbedding(*args, **kwargs)
            if sample.error_on == ModuleErrorEnum.FORWARD_ERROR:
                layer(*module_input.forward_input.args, **module_input.forward_input.kwargs)


# ----------------------------------------------------------------------------- torch.func


def test_vmap_over_ids_matches_nn_embedding_and_refuses_ids_that_are_not_live():
    plain, grown = pair()
    ids = torch.tensor([[1, 2, 9], [0, 0, 5], [7, 3, 3]])
    assert torch.equal(vmap(grown)(ids), vmap(plain)(ids))
    grown.deactivate([3])
    assert torch.equal(vmap(grown)(ids[:2]), plain(ids[:2]))
    # No host read under vmap: a refused id becomes one nn.Embedding refuses, on the CPU an
    # IndexError as for an id out of range.
    for bad in (3, V, CAP + 2, -1):
        with pytest.raises(IndexError):
            vmap(grown)(torch.tensor([[1, 2], [4, bad]]))


def _per_sample_weight_grads(module: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    params = {name: p.detach() for name, p in module.named_parameters()}
    buffers = dict(module.named_buffers())

    def loss(params, sample):
        return functional_call(module, (params, buffers), (sample.unsqueeze(0),)).pow(2).sum()

    return vmap(grad(loss), in_dims=(None, 0))(params, ids)["weight"]


def test_vmap_of_grad_gives_nn_embeddings_per_sample_gradients():
    plain, grown = pair(padding_idx=2)
    ids = torch.tensor([[1, 2, 9], [0, 7, 5], [4, 4, 3]])
    got = _per_sample_weight_grads(grown, ids)
    assert got.shape == (3, CAP, D)
    assert torch.equal(got[:, :V], _per_sample_weight_grads(plain, ids))
    assert torch.count_nonzero(got[:, V:]) == 0
    grown.grow(2)  # grown ids too: each sample's gradient is what its own backward gives
    ids = torch.tensor([[1, 2, 11], [10, 7, 5]])
    got = _per_sample_weight_grads(grown, ids)
    for index in range(len(ids)):
        weight = grown.weight.detach().clone().requires_grad_()
        F.embedding(ids[index : index + 1], weight, padding_idx=2).pow(2).sum().backward()
        assert torch.equal(got[index], weight.grad)


def test_stack_module_state_ensembles_as_nn_embedding_does():
    """``torch.func.stack_module_state`` ensembling, as docs/integrations.md shows for
    GrowLinear: each member's lookup is its own, masks included."""
    torch.manual_seed(0)
    members = [GrowEmbedding(V, D, capacity=CAP, dtype=torch.float64) for _ in range(3)]
    members[1].grow(3)
    members[2].grow(3)
    ids = torch.tensor([[1, 2, 12], [0, 11, 5]])
    with pytest.raises(IndexError):
        members[0](ids)  # 11 and 12 are not live in the first member
    members = members[1:]
    params, buffers = stack_module_state(members)
    base = copy.deepcopy(members[0]).to("meta")

    def run(params, buffers, ids):
        return functional_call(base, (params, buffers), (ids,))

    out = vmap(run, in_dims=(0, 0, None))(params, buffers, ids)
    assert torch.equal(out, torch.stack([member(ids) for member in members]))
    members[1].deactivate([5])  # one member's mask refuses an id: the ensemble refuses it
    params, buffers = stack_module_state(members)
    with pytest.raises(IndexError):
        vmap(run, in_dims=(0, 0, None))(params, buffers, ids)
    plain = [nn.Embedding(V, D, dtype=torch.float64) for _ in range(2)]
    plain_params, plain_buffers = stack_module_state(plain)
    grown = [GrowEmbedding.from_embedding(p, capacity=CAP) for p in plain]
    params, buffers = stack_module_state(grown)
    small = ids.clamp(max=V - 1)
    want = vmap(lambda p, b, x: functional_call(copy.deepcopy(plain[0]).to("meta"), (p, b), (x,)),
                in_dims=(0, 0, None))(plain_params, plain_buffers, small)
    got = vmap(run, in_dims=(0, 0, None))(params, buffers, small)
    assert torch.equal(got, want)


# ----------------------------------------------------------------------------- what nn.Embedding refuses


def _error(call):
    try:
        call()
    except Exception as error:  # noqa: BLE001 - the point is which exception
        return error
    raise AssertionError("no exception")


@pytest.mark.parametrize("dtype", [torch.int16, torch.int8, torch.uint8, torch.float32, torch.bool])
@pytest.mark.parametrize("masked", [False, True], ids=["all_live", "masked"])
def test_ids_of_a_dtype_nn_embedding_refuses_get_its_own_error(dtype, masked):
    plain, grown = pair()
    if masked:  # the mask check would index the mask with these ids
        grown.deactivate([4])
    ids = torch.tensor([1, 0, 3]).to(dtype)
    want, got = _error(lambda: plain(ids)), _error(lambda: grown(ids))
    assert type(got) is type(want) and str(got) == str(want)


def test_ids_that_are_not_a_tensor_raise_nn_embeddings_type_error():
    plain, grown = pair()
    want, got = _error(lambda: plain([1, 2])), _error(lambda: grown([1, 2]))
    assert type(got) is type(want) is TypeError and str(got) == str(want)


def test_int32_ids_are_checked_and_looked_up():
    plain, grown = pair()
    ids = torch.tensor([1, 9, 0], dtype=torch.int32)
    assert torch.equal(grown(ids), plain(ids))
    grown.deactivate([9])
    with pytest.raises(IndexError, match="id 9 is a deactivated row"):
        grown(ids)


@pytest.mark.parametrize(
    "args, kwargs, growop_match",
    [
        ((-1, 3), {}, r"num_embeddings must be >= 0, got -1"),
        ((10, -2), {}, r"embedding_dim must be >= 0, got -2"),
        ((10, 3, 10), {}, r"padding_idx \(10\) must be < num_embeddings \(10\)"),
        ((10, 3, -11), {}, r"padding_idx must be >= -10, got -11"),
        ((10, 3), {"_weight": torch.zeros(4, 3)}, r"_weight has shape \(4, 3\), expected"),
    ],
    ids=["negative_rows", "negative_dim", "padding_past", "padding_before", "weight_shape"],
)
def test_constructor_errors_are_caught_by_nn_embeddings_except_clauses(args, kwargs, growop_match):
    """Each error is of the type nn.Embedding raises for the same arguments (RuntimeError,
    AssertionError), and still a ValueError, as growop raised before."""
    want = _error(lambda: nn.Embedding(*args, **kwargs))
    got = _error(lambda: GrowEmbedding(*args, **kwargs))
    assert isinstance(got, type(want)), (type(got), type(want))
    assert isinstance(got, ValueError)
    with pytest.raises(ValueError, match=growop_match):
        GrowEmbedding(*args, **kwargs)
