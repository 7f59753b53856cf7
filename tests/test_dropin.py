"""What users' own code does to an nn.Linear, done to a GrowLinear.

One regression test per problem found by treating GrowLinear as an nn.Linear: deferred
initialisation, meta-device loading, tensor-only state dicts, swap-on-conversion, stale
optimizer state, and the tools that target nn.Linear by type.
"""

from __future__ import annotations

import copy
import os
import pickle
import warnings
import tempfile

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.utils import prune

import growop
from growop import GrowLinear


def grown_layer(seed=0, capacity=8):
    torch.manual_seed(seed)
    layer = GrowLinear(5, 3, capacity=capacity)
    layer.grow(2)
    layer.deactivate(1)
    return layer


def assert_constructed_state(layer: GrowLinear):
    """Mask, live count and seed as a constructor leaves them."""
    assert layer.active.tolist() == [i < layer.out_features for i in range(layer.capacity)]
    assert layer.live_count == layer.out_features == int(layer.active.sum())
    assert torch.isfinite(layer.weight).all()
    assert 0 <= int(layer._init_seed) < torch.iinfo(torch.int64).max


# ------------------------------------------------------------------ optimizer state


def test_masking_after_a_grow_past_capacity_zeroes_stale_state():
    layer = GrowLinear(5, 2, capacity=2)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        layer(torch.randn(4, 5)).pow(2).sum().backward()
        opt.step()
    layer.grow(1)  # past capacity, without the optimizer: growop met it, its state follows
    layer.deactivate([0], optimizer=opt)  # zeroes row 0
    layer.resize_optimizer_state(opt)
    assert opt.state[layer.weight]["momentum_buffer"].shape == layer.weight.shape
    before = layer.weight[0].detach().clone()
    opt.zero_grad()
    layer(torch.randn(4, 5)).pow(2).sum().backward()
    opt.step()
    assert torch.equal(layer.weight[0], before), "a masked row moved with stale momentum"


def test_optimizer_state_of_another_capacity_after_a_load_fits_itself():
    source = GrowLinear(5, 3, capacity=4)
    opt = torch.optim.SGD(source.parameters(), lr=0.1, momentum=0.9)
    source(torch.randn(2, 5)).sum().backward()
    opt.step()
    target = GrowLinear(5, 1, capacity=9)
    target.load_state_dict(source.state_dict())
    resumed = torch.optim.SGD(target.parameters(), lr=0.1, momentum=0.9)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))  # momentum of 4 rows
    x = torch.randn(2, 5)
    for layer, optimizer in ((source, opt), (target, resumed)):
        optimizer.zero_grad()
        layer(x).sum().backward()
        optimizer.step()
    assert resumed.state[target.weight]["momentum_buffer"].shape == (9, 5)
    assert torch.equal(target.weight[:3], source.weight[:3])


# ------------------------------------------------------------------ deferred initialisation


def test_to_empty_then_reset_parameters_leaves_a_constructed_layer():
    with torch.device("meta"):
        layer = GrowLinear(5, 3, capacity=8)
    layer.to_empty(device="cpu")
    layer.active.fill_(True)  # what uninitialised memory may hold
    layer._init_seed.fill_(-5)
    layer.reset_parameters()
    assert_constructed_state(layer)
    out = layer(torch.randn(2, 5))
    assert torch.isfinite(out).all() and out.shape == (2, 3)
    assert layer.grow(1) == range(3, 4)


@pytest.mark.parametrize("make", ["meta_to_empty", "skip_init"])
def test_weights_copied_in_after_to_empty_work_as_for_nn_linear(make):
    """Code written for nn.Linear: build without initialising (on meta then to_empty, or
    skip_init), copy the weights in, go on. The mask and seed are not left as uninitialised
    memory: the slots in use are live, as the constructor makes them."""
    torch.manual_seed(3)
    weight, bias = torch.randn(3, 5), torch.randn(3)
    for _ in range(5):  # uninitialised memory differs from call to call
        if make == "skip_init":
            layer = torch.nn.utils.skip_init(GrowLinear, 5, 3, capacity=8)
        else:
            layer = GrowLinear(5, 3, capacity=8, device="meta").to_empty(device="cpu")
        with torch.no_grad():
            layer.weight[:3].copy_(weight)
            layer.bias[:3].copy_(bias)
        assert layer.active.tolist() == [True] * 3 + [False] * 5
        assert layer.live_count == 3 and 0 <= int(layer._init_seed) < torch.iinfo(torch.int64).max
        x = torch.randn(2, 5)
        torch.testing.assert_close(layer(x), F.linear(x, weight, bias))
        assert layer.grow(1) == range(3, 4)
    embedding = torch.nn.utils.skip_init(growop.GrowEmbedding, 6, 3, capacity=9)
    assert embedding.active.tolist() == [True] * 6 + [False] * 3 and embedding.live_count == 6


def test_to_empty_and_moves_keep_the_mask_and_seed():
    """Off meta, a move (to_empty included) keeps the mask, counts and seed as they were:
    deactivated rows stay masked, and the next grow draws the same rows."""
    layer = grown_layer()
    mask, seed = layer.active.clone(), int(layer._init_seed)
    twin = copy.deepcopy(layer)
    layer.to_empty(device="cpu")
    assert torch.equal(layer.active, mask) and int(layer._init_seed) == seed
    assert layer.live_count == int(mask.sum())
    layer.double().float()
    assert torch.equal(layer.active, mask)
    layer.grow(1)
    twin.grow(1)
    torch.testing.assert_close(layer.weight[5], twin.weight[5])


def test_reset_parameters_after_grows_makes_every_slot_live_again():
    layer = grown_layer()
    layer.reset_parameters()
    assert layer.out_features == 5
    assert_constructed_state(layer)


# ------------------------------------------------------------------ meta-device loading


def test_meta_build_then_assign_load_of_an_nn_linear_checkpoint_then_grow():
    torch.manual_seed(1)
    linear = nn.Linear(5, 4)
    with torch.device("meta"):
        layer = GrowLinear(5, 1, capacity=8)
    layer.load_state_dict(linear.state_dict(), assign=True)
    assert not layer.weight.is_meta and not layer.active.is_meta and not layer._init_seed.is_meta
    assert isinstance(layer.weight, nn.Parameter)
    assert layer.out_features == 4 and layer.live_count == 4 and layer.capacity == 8
    x = torch.randn(3, 5)
    torch.testing.assert_close(layer(x), linear(x))
    layer.grow(2)
    assert layer(x).shape == (3, 6) and torch.isfinite(layer(x)).all()


def test_meta_build_then_assign_load_of_a_growlinear_checkpoint_then_grow():
    source = grown_layer(capacity=8)
    with torch.device("meta"):
        layer = GrowLinear(5, 1, capacity=8)
    layer.load_state_dict(source.state_dict(), assign=True)
    assert layer.live_count == 4 and layer.out_features == 5
    x = torch.randn(3, 5)
    torch.testing.assert_close(layer(x), source(x))
    # the seed came with the checkpoint: both grow the same rows
    layer.grow(1)
    source.grow(1)
    torch.testing.assert_close(layer(x), source(x))


# ------------------------------------------------------------------ tensor-only state dicts


def test_load_pre_hooks_run_before_the_rows_are_fitted():
    """A pre-hook that renames keys works as on nn.Linear, at equal or other capacities."""
    def rename(module, state_dict, prefix, *args):
        state_dict[prefix + "weight"] = state_dict.pop(prefix + "w")
        state_dict[prefix + "bias"] = state_dict.pop(prefix + "b")

    weight, bias = torch.randn(3, 5), torch.randn(3)
    for capacity in (3, 8):
        layer = GrowLinear(5, 3, capacity=capacity)
        layer.register_load_state_dict_pre_hook(rename)
        stock = nn.Linear(5, 3)
        stock.register_load_state_dict_pre_hook(rename)
        for module in (layer, stock):
            module.load_state_dict({"w": weight, "b": bias})
        x = torch.randn(2, 5)
        torch.testing.assert_close(layer(x), stock(x))
        calls = []
        layer.register_load_state_dict_pre_hook(lambda *args: calls.append(1))
        layer.load_state_dict({"w": weight, "b": bias})
        assert calls == [1]  # once, not again inside nn.Module's part


def test_partial_checkpoint_without_the_weight_loads_as_on_nn_linear():
    layer, stock = GrowLinear(4, 3, capacity=6), nn.Linear(4, 3)
    keys = [module.load_state_dict({"bias": torch.arange(3.0)}, strict=False) for module in (layer, stock)]
    assert keys[0].missing_keys == keys[1].missing_keys == ["weight"]
    torch.testing.assert_close(layer.bias[:3], stock.bias)


@pytest.mark.parametrize("source", [lambda: nn.Linear(4, 3), lambda: GrowLinear(4, 3, capacity=4)],
                         ids=["nn_linear", "growlinear"])
def test_a_load_that_fails_leaves_the_layer_as_it_was(source):
    """Rows of another size cannot load: the error names the shapes, and nothing of the
    layer changed (its slots in use, mask, bias and weight)."""
    layer = grown_layer()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    out_features, live = layer.out_features, layer.live_count
    with pytest.raises(RuntimeError, match=r"size mismatch for weight: copying a param with shape "
                                           r"torch.Size\(\[\d+, 4\]\) from checkpoint"):
        layer.load_state_dict(source().state_dict())
    assert (layer.out_features, layer.live_count) == (out_features, live)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_state_dict_holds_tensors_only():
    state = grown_layer().state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values()), {k: type(v) for k, v in state.items()}
    cloned = {k: v.detach().clone() for k, v in state.items()}
    fresh = GrowLinear(5, 1, capacity=8)
    fresh.load_state_dict(cloned)
    assert fresh.out_features == 5 and fresh.live_count == 4


def test_state_dict_survives_safetensors():
    safetensors_torch = pytest.importorskip("safetensors.torch")
    source = grown_layer()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "layer.safetensors")
        safetensors_torch.save_file(source.state_dict(), path)
        loaded = safetensors_torch.load_file(path)
    target = GrowLinear(5, 1, capacity=8)
    target.load_state_dict(loaded)
    x = torch.randn(2, 5)
    torch.testing.assert_close(target(x), source(x))


def test_ema_loop_over_state_dict_values():
    model = nn.Sequential(nn.Linear(4, 5), grown_layer())
    ema = copy.deepcopy(model)
    with torch.no_grad():  # timm ModelEmaV2's update
        for ema_v, model_v in zip(ema.state_dict().values(), model.state_dict().values()):
            ema_v.copy_(ema_v * 0.9 + (1 - 0.9) * model_v if ema_v.is_floating_point() else model_v)
    x = torch.randn(2, 4)
    torch.testing.assert_close(ema(x), model(x))


@pytest.mark.parametrize("use_buffers", [True, False])
def test_averaged_model_follows_grows_made_after_it_was_built(use_buffers):
    """AveragedModel (and EMA loops like it) copies buffers, the mask among them, but not
    the slots in use: the copy's counts follow the mask it was given."""
    from torch.optim.swa_utils import AveragedModel

    layer = GrowLinear(4, 3, capacity=8)
    ema = AveragedModel(layer, use_buffers=use_buffers)
    layer.grow(2)
    layer.deactivate([0])
    ema.update_parameters(layer)
    x = torch.randn(2, 4)
    assert ema(x).shape == layer(x).shape == (2, 5)
    assert ema.module.live_count == layer.live_count == 4
    torch.testing.assert_close(ema(x), layer(x))


def _copying_non_floats(average):
    """A multi_avg_fn that averages floating-point tensors with ``average`` and copies
    the others (the mask, the seed), as the README's Limits advise for use_buffers=True."""
    def update(averaged, current, num_averaged):
        if averaged[0].is_floating_point():
            average(averaged, current, num_averaged)
        else:
            for a, c in zip(averaged, current):
                a.copy_(c)
    return update


@pytest.mark.parametrize("case", ["default", "ema", "use_buffers-copying"])
def test_averaged_model_mask_follows_every_update(case):
    """Across several updates, grows, deactivations and reactivations: the EMA copy's mask
    and counts are the source's after each update (with the configurations the README
    names as working)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    layer = GrowLinear(4, 3, capacity=8)
    if case == "default":
        ema = AveragedModel(layer)
    elif case == "ema":
        ema = AveragedModel(layer, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    else:
        ema = AveragedModel(layer, multi_avg_fn=_copying_non_floats(get_ema_multi_avg_fn(0.9)), use_buffers=True)
    x = torch.randn(2, 4)
    changes = [lambda: None, lambda: layer.grow(2), lambda: layer.deactivate([0, 3]),
               lambda: layer.reactivate([0]), lambda: layer.grow(1)]
    for change in changes:
        change()
        ema.update_parameters(layer)
        assert torch.equal(ema.module.active, layer.active)
        assert ema(x).shape == layer(x).shape
        assert ema.module.live_count == layer.live_count
        assert int(ema.module._init_seed) == int(layer._init_seed)


def test_averaged_model_with_use_buffers_averages_the_mask():
    """What the README's Limits say of AveragedModel(use_buffers=True) with torch's own
    averages: the default raises on the bool mask at the second update; the EMA keeps a
    deactivated row live."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    layer = GrowLinear(4, 3, capacity=8)
    swa = AveragedModel(layer, use_buffers=True)
    swa.update_parameters(layer)
    with pytest.raises(RuntimeError, match="bool"):
        swa.update_parameters(layer)
    ema = AveragedModel(layer, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    ema.update_parameters(layer)
    layer.deactivate([0])
    ema.update_parameters(layer)
    assert not layer.active[0] and ema.module.active[0]


def test_ema_loop_follows_grows_made_after_the_copy():
    model = nn.Sequential(nn.Linear(4, 5), GrowLinear(5, 3, capacity=8))
    ema = copy.deepcopy(model)
    model[1].grow(1)
    with torch.no_grad():  # timm ModelEmaV2's update
        for ema_v, model_v in zip(ema.state_dict().values(), model.state_dict().values()):
            ema_v.copy_(ema_v * 0.9 + (1 - 0.9) * model_v if ema_v.is_floating_point() else model_v)
    x = torch.randn(2, 4)
    assert ema(x).shape == model(x).shape == (2, 4)


def test_a_layer_pickled_by_an_older_growop_follows_its_mask():
    """Layers pickled before growop kept a record of their mask and a view of their rows
    unpickle with both: the counts follow the mask as it was saved."""
    layer = grown_layer()  # 5 slots in use, row 1 masked
    # What an older version pickled: no mask record, no view, a mask it wrote itself.
    del layer.__dict__["_mask_record"], layer._rows.__dict__["view"]
    with torch.no_grad():
        layer.active[0] = False
    old = pickle.loads(pickle.dumps(layer))
    x = torch.randn(2, 5)
    assert torch.all(old(x)[:, :2] == torch.finfo(torch.float32).min)
    assert (old.rows.used, old.rows.live, old.live_count) == (5, 3, 3)
    old.grow(1)
    assert old.rows.live == 4 and old.active.tolist()[:6] == [False, False, True, True, True, True]


def test_a_mask_swapped_in_for_one_call_is_not_taken_for_the_layer_s_own():
    """functional_call and model ensembling (stack_module_state under vmap) hand forward
    another mask tensor for one call: it is followed as given, with no live count (which
    describes the layer's own mask), and the layer's counts stay as they were."""
    from torch.func import stack_module_state, vmap

    x = torch.randn(2, 4)
    layer = GrowLinear(4, 3, capacity=6)
    mask = layer.active.clone()
    mask[1] = False
    out = functional_call(layer, {"active": mask}, (x,))
    assert torch.all(out[:, 1] == torch.finfo(torch.float32).min) and torch.isfinite(out[:, [0, 2]]).all()
    assert layer.live_count == 3 and torch.isfinite(layer(x)).all()

    torch.manual_seed(0)
    models = [GrowLinear(4, 3, capacity=6) for _ in range(3)]
    models[1].deactivate([2])
    params, buffers = stack_module_state(models)
    ensemble = vmap(lambda p, b, x: functional_call(models[0], (p, b), (x,)), in_dims=(0, 0, None))
    outs = ensemble(params, buffers, x)
    for model, out in zip(models, outs):
        torch.testing.assert_close(out, model(x))

    embedding = growop.GrowEmbedding(5, 3, capacity=8)
    mask = embedding.active.clone()
    mask[2] = False
    with pytest.raises(IndexError, match="id 2 is a deactivated row"):
        functional_call(embedding, {"active": mask}, (torch.tensor([2]),))
    assert embedding(torch.tensor([2])).shape == (1, 3)


def test_layers_built_and_used_inside_inference_mode():
    """Inference tensors keep no version counter: a layer built, moved, grown and run
    entirely under torch.inference_mode() works, its tensors staying inference tensors."""
    with torch.inference_mode():
        layer = GrowLinear(4, 3, capacity=6)
        embedding = growop.GrowEmbedding(10, 4, capacity=12)
        layer.to_empty(device="cpu")
        layer.reset_parameters()
        layer.grow(1)
        layer.grow(4)  # past capacity
        layer.deactivate([0])
        embedding.grow(1)
        assert layer(torch.randn(2, 4)).shape == (2, 8)
        assert embedding(torch.tensor([10])).shape == (1, 4)
        assert layer.weight.is_inference() and layer.active.is_inference()


def test_grow_inside_inference_mode_leaves_trainable_tensors():
    """A grow called under torch.inference_mode() (say, while evaluating) makes no inference
    tensors: reallocated Parameters, masks and optimizer state still train."""
    layer = GrowLinear(4, 3, capacity=4)
    opt = torch.optim.Adam(layer.parameters())
    layer(torch.randn(2, 4)).sum().backward()
    opt.step()
    with torch.inference_mode():
        layer.grow(3, optimizer=opt)  # past capacity
        layer.deactivate([0], optimizer=opt)
    state = [v for v in opt.state[layer.weight].values() if isinstance(v, torch.Tensor)]
    assert not any(t.is_inference() for t in (layer.weight, layer.bias, layer.active, *state))
    opt.zero_grad()
    layer(torch.randn(2, 4)).sum().backward()
    opt.step()


def test_checkpoint_with_a_dict_extra_state_loads_strictly():
    source = grown_layer()
    state = dict(source.state_dict())
    state["_extra_state"] = {"out_features": 5, "version": 1}  # as growop 0.1 wrote it
    target = GrowLinear(5, 1, capacity=8)
    target.load_state_dict(state, strict=True)
    assert target.out_features == 5 and target.live_count == 4


# ------------------------------------------------------------------ swap on conversion


@pytest.fixture
def swap_on_conversion():
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    yield
    torch.__future__.set_swap_module_params_on_conversion(previous)


def test_to_after_a_grow_past_capacity_with_swap_on_conversion(swap_on_conversion):
    layer = GrowLinear(5, 2, capacity=2)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    layer(torch.randn(3, 5)).sum().backward()
    opt.step()
    layer.grow(3)  # past capacity, no optimizer
    layer.zero_grad(set_to_none=True)
    layer.to(torch.float64)
    assert layer.weight.dtype == torch.float64
    assert layer(torch.randn(2, 5, dtype=torch.float64)).shape == (2, 5)


# ------------------------------------------------------------------ tools that target nn.Linear


def test_is_an_nn_linear_and_init_loops_reach_it():
    model = nn.Sequential(nn.Linear(4, 5), GrowLinear(5, 3, capacity=6))
    assert isinstance(model[1], nn.Linear)

    def init(module):
        if isinstance(module, nn.Linear):
            nn.init.constant_(module.weight, 0.5)
            nn.init.zeros_(module.bias)

    model.apply(init)
    assert (model[1].weight == 0.5).all()
    assert model[1].out_features == 3 and model[1](torch.randn(2, 5)).shape == (2, 3)


@pytest.mark.parametrize("ours,theirs", [(GrowLinear, nn.Linear), (growop.GrowEmbedding, nn.Embedding)],
                         ids=["linear", "embedding"])
def test_constructor_takes_the_stock_arguments_in_the_stock_order(ours, theirs):
    """Every argument of the stock constructor, positional where it is, with its default;
    growop's own (capacity, ...) come after, keyword only."""
    import inspect

    stock = list(inspect.signature(theirs.__init__).parameters.values())[1:]
    own = list(inspect.signature(ours.__init__).parameters.values())[1:]
    assert [(p.name, p.kind, p.default) for p in own[: len(stock)]] == [
        (p.name, p.kind, p.default) for p in stock
    ]
    assert all(p.kind == p.KEYWORD_ONLY for p in own[len(stock):])


def test_positional_device_and_dtype_and_embedding_options():
    layer = GrowLinear(4, 3, True, "cpu", torch.float64)
    assert layer.weight.dtype == torch.float64 and layer.bias is not None
    emb = growop.GrowEmbedding(10, 3, None, 1.0, 1.0, True, capacity=12)
    assert (emb.max_norm, emb.norm_type, emb.scale_grad_by_freq) == (1.0, 1.0, True)
    ids = torch.tensor([1, 2, 1])
    emb(ids).sum().backward()
    assert torch.all(emb.weight.detach()[[1, 2]].norm(p=1, dim=1) <= 1.0 + 1e-6)
    with pytest.raises(ValueError, match="does not support sparse=True"):
        growop.GrowEmbedding(10, 3, sparse=True)
    start = torch.randn(5, 3)
    frozen = growop.GrowEmbedding(5, 3, _weight=start, _freeze=True, capacity=8)
    stock = nn.Embedding(5, 3, _weight=start, _freeze=True)
    assert not frozen.weight.requires_grad and not stock.weight.requires_grad
    torch.testing.assert_close(frozen(ids), stock(ids))
    assert torch.all(frozen.weight[5:] == 0) and frozen.active.tolist() == [True] * 5 + [False] * 3
    with pytest.raises(ValueError, match=r"_weight has shape \(4, 3\), expected"):
        growop.GrowEmbedding(5, 3, _weight=torch.randn(4, 3))


def test_from_linear_refuses_a_growlinear_clearly():
    with pytest.raises(TypeError, match="plain nn.Linear.*state_dict"):
        GrowLinear.from_linear(GrowLinear(4, 2, capacity=5))


def test_fsdp_module_wrap_policy_targets_it():
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    model = nn.Sequential(nn.Linear(4, 5), GrowLinear(5, 3, capacity=6))
    wrapped = ModuleWrapPolicy({nn.Linear})._run_policy(model, set(), {})
    assert model[1] in wrapped


def test_fsdp1_flattened_parameters_are_refused_clearly():
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    with tempfile.TemporaryDirectory() as folder:
        dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=0, world_size=1)
        try:
            model = nn.Sequential(nn.Linear(4, 5), GrowLinear(5, 3, capacity=6))
            head = model[1]
            fsdp = FullyShardedDataParallel(
                model, auto_wrap_policy=ModuleWrapPolicy({nn.Linear}), device_id=torch.device("cpu")
            )
            fsdp(torch.randn(2, 4))
            with pytest.raises(RuntimeError, match="FSDP1.*fully_shard"):
                head.grow(1)
            assert head.out_features == 3 and head.live_count == 3
        finally:
            dist.destroy_process_group()


def test_quantize_dynamic_leaves_it_in_float_and_correct():
    model = nn.Sequential(nn.Linear(4, 5), grown_layer())
    x = torch.randn(2, 4)
    expected = model(x)
    for spec in (None, {nn.Linear}, {GrowLinear}):
        quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), spec, dtype=torch.qint8)
        assert type(quantized[1]) is GrowLinear
        assert quantized[1](model[0](x)).shape == expected.shape
        torch.testing.assert_close(quantized[1](model[0](x)), expected)


def test_peft_lora_wraps_it_and_refuses_to_run_across_a_grow():
    peft = pytest.importorskip("peft")

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(6, 5)
            self.head = GrowLinear(5, 3, capacity=6)

        def forward(self, x):
            return self.head(self.body(x))

    torch.manual_seed(0)
    model = peft.get_peft_model(Model(), peft.LoraConfig(target_modules=["head"], r=2, init_lora_weights=False))
    lora = model.base_model.model.head
    base = lora.base_layer
    assert isinstance(base, GrowLinear)
    x = torch.randn(2, 6)
    body = model.base_model.model.body
    expected = base(body(x)) + lora.lora_B["default"](lora.lora_A["default"](body(x))) * lora.scaling["default"]
    torch.testing.assert_close(model(x), expected)
    base.grow(1)  # the adapter's lora_B still has 3 outputs: an error, never a wrong result
    with pytest.raises(RuntimeError, match="size"):
        model(x)
    with pytest.raises(RuntimeError, match="size"):
        model.merge_and_unload()
    plain = model.unload()  # the documented way across a grow: unload, grow, apply anew
    assert plain.head is base and plain(x).shape == (2, 4)
    again = peft.get_peft_model(plain, peft.LoraConfig(target_modules=["head"], r=2))
    assert again(x).shape == (2, 4)


# ------------------------------------------------------------------ documented limits


def test_parametrized_weight_constrains_the_whole_capacity_and_refuses_to_grow():
    layer = GrowLinear(6, 2, capacity=4)
    nn.utils.parametrizations.orthogonal(layer)
    weight = layer.weight
    torch.testing.assert_close(weight @ weight.T, torch.eye(4), atol=1e-5, rtol=0)  # all 4 rows
    with pytest.raises(RuntimeError, match="parametrization"):
        layer.grow(1)
    assert layer.out_features == 2


def test_forward_uses_the_weight_and_bias_that_tools_put_in_place():
    """Eager forward reads the row tensors from the module's dicts for speed; where a tool
    moved them (parametrizations, pruning, functional_call), it must use the tool's tensors."""
    torch.manual_seed(0)
    x = torch.randn(3, 6)

    def expected(layer):
        return F.linear(x, layer.weight[:2], layer.bias[:2])

    scaled = GrowLinear(6, 2, capacity=4)
    nn.utils.parametrize.register_parametrization(scaled, "weight", _Scale(3.0))
    nn.utils.parametrize.register_parametrization(scaled, "bias", _Scale(-2.0))
    assert "weight" not in scaled._parameters
    torch.testing.assert_close(scaled(x), expected(scaled))
    torch.testing.assert_close(scaled.weight, 3.0 * scaled.parametrizations.weight.original)

    pruned = GrowLinear(6, 2, capacity=4)
    prune.l1_unstructured(pruned, "weight", amount=0.5)
    torch.testing.assert_close(pruned(x), expected(pruned))
    assert torch.count_nonzero(pruned.weight) == 12

    plain = GrowLinear(6, 2, capacity=4)
    swapped = {"weight": torch.randn(4, 6), "bias": torch.randn(4)}
    out = functional_call(plain, swapped, (x,))
    torch.testing.assert_close(out, F.linear(x, swapped["weight"][:2], swapped["bias"][:2]))


class _Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, t):
        return self.factor * t


def test_pruning_amount_counts_dead_rows():
    layer = GrowLinear(4, 2, capacity=8)
    prune.l1_unstructured(layer, "weight", amount=0.5)
    assert int((layer.weight_mask == 0).sum()) == 16  # half of 8 x 4, not of the 2 live rows


def test_trace_works_and_script_is_refused():
    layer = GrowLinear(4, 3, capacity=6)
    x = torch.randn(2, 4)
    traced = torch.jit.trace(layer, x)
    torch.testing.assert_close(traced(x), layer(x))
    # A traced or symbolically traced graph runs later, on the mask as it is then: no live
    # count is baked into it (on CUDA a stale one would be a device-side assert).
    call = next(n for n in traced.graph.nodes() if n.kind() == "growop::masked_linear")
    live_count = list(call.inputs())[-1].node()
    assert live_count.kind() == "prim::Constant" and live_count.output().type().kind() == "NoneType"
    assert "'auto', None)" in torch.fx.symbolic_trace(layer).code
    with pytest.raises(RuntimeError, match="torch.jit.script.*trace"):
        torch.jit.script(layer)
    with pytest.raises(RuntimeError, match="torch.jit.script"):
        torch.jit.script(torch.nn.Sequential(layer))
