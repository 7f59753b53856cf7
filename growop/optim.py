"""Per-row step counts for Adam and AdamW, so rows added mid-training start fresh.

Adam keeps one step counter per Parameter and divides its moments by ``1 - beta ** step``.
A row that starts at global step ``t0`` (a :meth:`GrowLinear.grow` or ``reactivate`` with
``optimizer=``) has moments that were zero at ``t0``, so the correct divisor is
``1 - beta ** (step - t0)``; the shared counter makes its first updates several times too
large. Each GrowLinear records in its ``row_start_step`` buffer the optimizer step at which
each row started (0: from the beginning). Around every optimizer step, rows still young
enough for the difference to show in their dtype are updated again from their pre-step
values with their own step count, exactly as a freshly created optimizer would update
them. Every other row keeps the stock optimizer's update, bit for bit.

Covered: ``torch.optim.Adam`` and ``AdamW`` (any implementation: the correction works on
the state the step leaves), with or without ``amsgrad``, L2 or decoupled weight decay,
``maximize``. SGD needs no correction (its first momentum step equals a fresh one's when
``dampening`` is 0). Other optimizers get a one-time warning.
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from growop import distributed

# Layers that have rows still young enough to need correcting, by id.
_young_layers: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
# Pre-step values of young rows, per optimizer: {id(param): (rows, values, step_before)}.
_pending: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_warned_types: set = set()  # optimizer types (and other keys) warned about
_enabled = True


@contextlib.contextmanager
def row_step_correction(enabled: bool) -> Iterator[None]:
    """Turns the per-row correction on or off inside the ``with`` block (for comparisons)."""
    global _enabled
    previous, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = previous


def param_state(optimizer: torch.optim.Optimizer, param: Tensor) -> dict:
    """``optimizer``'s state for ``param``, empty if it has none (without adding an entry to
    the optimizer's defaultdict, as indexing would)."""
    return optimizer.state[param] if param in optimizer.state else {}


def optimizer_step(optimizer: torch.optim.Optimizer, param: Tensor) -> int:
    """The step count ``optimizer`` holds for ``param`` (0 before its first step)."""
    step = param_state(optimizer, param).get("step", 0)
    return int(step.item() if isinstance(step, Tensor) else step)


def start_rows(layer, rows: Tensor, optimizer: torch.optim.Optimizer) -> None:
    """Records that ``rows`` of ``layer`` start fresh now, under ``optimizer``."""
    step = optimizer_step(optimizer, layer.weight)
    with torch.no_grad():
        layer.row_start_step[rows] = step
    track(layer)


def track(layer) -> None:
    """Watches ``layer``'s rows that started after step 0 (after a grow or a load)."""
    young = (layer.row_start_step > 0).nonzero().squeeze(1)
    layer._young_rows = young
    if young.numel():
        _young_layers[id(layer)] = layer
    else:
        _young_layers.pop(id(layer), None)


def _warn_once(key, message: str) -> None:
    if key not in _warned_types:
        _warned_types.add(key)
        warnings.warn(message, stacklevel=4)


def _covered(optimizer: torch.optim.Optimizer) -> bool | None:
    """True: corrected; False: needs none; None: not covered."""
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return True
    if isinstance(optimizer, torch.optim.SGD):
        return all(group.get("dampening", 0) == 0 for group in optimizer.param_groups)
    return None


def _group_of(optimizer: torch.optim.Optimizer, param: Tensor) -> dict | None:
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return group
    return None


def _age_limit(beta: float, dtype: torch.dtype) -> float:
    """Steps after which ``beta ** steps`` no longer changes ``1 - beta ** step`` in dtype."""
    if beta <= 0:
        return 1
    return math.log(torch.finfo(dtype).eps / 4) / math.log(beta)


def _before_step(optimizer, args, kwargs) -> None:
    if not _young_layers or not _enabled:
        return
    covered = _covered(optimizer)
    for layer in list(_young_layers.values()):
        for param in layer._params():
            group = _group_of(optimizer, param)
            if group is None:
                continue
            if covered is None:
                _warn_once(
                    type(optimizer),
                    f"growop: {type(optimizer).__name__} is not covered by GrowLinear's "
                    "per-row step correction. Rows added mid-training are updated with the "
                    "optimizer's shared state (their own state zeroed at grow); only Adam "
                    "and AdamW also get fresh per-row bias correction.",
                )
                continue
            if not covered or param.grad is None:
                continue
            if distributed.is_sharded(param):
                _warn_once(
                    "sharded",
                    "growop: per-row step correction is not applied to sharded (FSDP2) "
                    "parameters; their new rows use the optimizer's shared step count.",
                )
                continue
            step = optimizer_step(optimizer, param)
            beta1, beta2 = group["betas"]
            limit = max(_age_limit(float(beta1), param.dtype), _age_limit(float(beta2), param.dtype))
            young = layer._young_rows
            rows = young[step + 1 - layer.row_start_step.index_select(0, young) < limit]
            if rows.numel() == 0:
                continue
            rows = rows.to(param.device)
            values = param.detach().index_select(0, rows)
            _pending.setdefault(optimizer, {})[id(param)] = (layer, param, group, rows, values, step)


def _after_step(optimizer, args, kwargs) -> None:
    pending = _pending.pop(optimizer, None)
    if pending:
        with torch.no_grad():
            for layer, param, group, rows, before, step_before in pending.values():
                step = optimizer_step(optimizer, param)
                if step == step_before:  # the optimizer skipped this parameter
                    continue
                _redo_rows(optimizer, layer.row_start_step, param, group, rows, before, step)
    for layer in list(_young_layers.values()):
        _forget_old_rows(layer, optimizer)


def _redo_rows(
    optimizer, starts: Tensor, param: Tensor, group: dict, rows: Tensor, before: Tensor, step: int
) -> None:
    """The rows' update again, from their pre-step values, with per-row step counts
    (``step`` minus the rows' entries in ``starts``, the layer's ``row_start_step``)."""
    state = optimizer.state[param]
    ages = (step - starts.index_select(0, rows.to(starts.device))).to(param.device)
    beta1, beta2 = (float(b) for b in group["betas"])
    lr, eps, weight_decay = float(group["lr"]), float(group["eps"]), float(group["weight_decay"])
    decoupled = group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW))

    shape = (-1,) + (1,) * (param.dim() - 1)
    ages = ages.to(torch.float64)
    bias_correction1 = (1 - beta1**ages).to(param.dtype).view(shape)
    bias_correction2_sqrt = (1 - beta2**ages).sqrt().to(param.dtype).view(shape)

    values = before.clone()
    if weight_decay != 0 and decoupled:
        values.mul_(1 - lr * weight_decay)
    second = state["max_exp_avg_sq"] if group.get("amsgrad", False) else state["exp_avg_sq"]
    denom = (second.index_select(0, rows).sqrt() / bias_correction2_sqrt).add_(eps)
    update = state["exp_avg"].index_select(0, rows) / denom
    values.sub_(update.mul_(lr / bias_correction1))
    param.index_copy_(0, rows, values)


def _forget_old_rows(layer, optimizer) -> None:
    """Marks rows whose correction has fallen below rounding as ordinary (start 0)."""
    group = _group_of(optimizer, layer.weight)
    if group is None or not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return
    step = optimizer_step(optimizer, layer.weight)
    beta1, beta2 = (float(b) for b in group["betas"])
    limit = max(_age_limit(beta1, layer.weight.dtype), _age_limit(beta2, layer.weight.dtype))
    young = layer._young_rows
    aged = step - layer.row_start_step.index_select(0, young) >= limit
    if not bool(aged.any()):
        return
    with torch.no_grad():
        layer.row_start_step[young[aged]] = 0
    layer._young_rows = young[~aged]
    if layer._young_rows.numel() == 0:
        _young_layers.pop(id(layer), None)


register_optimizer_step_pre_hook(_before_step)
register_optimizer_step_post_hook(_after_step)
