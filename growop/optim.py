"""Every interaction of growop's layers with an optimizer.

Rows change under an optimizer in four ways, each handled here and nowhere else:

- zeroing a row's state (momentum, Adam moments) when it is grown, masked or unmasked
  (:func:`reset_rows`);
- resizing per-row state after the storage grew past capacity (:func:`resize_state`), and
  refusing to step with state of the old size (:func:`note_reallocated`);
- per-row step counts for Adam and AdamW (:func:`start_rows`), described below;
- checking that an optimizer passed in holds the layer (:func:`check_holds`).

Per-row step counts. Adam keeps one step counter per Parameter and divides its moments by
``1 - beta ** step``. A row that starts at step ``t0`` of an optimizer (a ``grow`` or
``reactivate`` with ``optimizer=``) has moments that were zero at ``t0``, so the correct
divisor is ``1 - beta ** (step - t0)``; the shared counter makes its first updates several
times too large. The start steps belong to the optimizer whose counter they refer to, so
they live in its state, beside ``step``: ``optimizer.state[param]["row_start"]["step"]``, an
int64 tensor with one entry per row (0: from the beginning). They travel with the
optimizer's ``state_dict`` (a resumed run keeps correcting its young rows), and a new
optimizer, which has none, treats every row as fresh, as stock Adam would. (The inner key
is ``"step"`` because ``Optimizer.load_state_dict`` casts every other state tensor to the
parameter's dtype, which would round start steps in bfloat16.)

Around every step of an optimizer that holds start steps, rows still young enough for the
difference to show in their dtype are updated again from their pre-step values with their
own step count, exactly as a freshly created optimizer would update them. Every other row
keeps the stock optimizer's update, bit for bit. Covered: ``torch.optim.Adam`` and ``AdamW``
(any implementation: the correction works on the state the step leaves), with or without
``amsgrad``, L2 or decoupled weight decay, ``maximize``. SGD needs no correction (its first
momentum step equals a fresh one's when ``dampening`` is 0). Other optimizers get a
one-time warning.
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

START = "row_start"  # optimizer.state[param][START]["step"]: per-row start steps

# Per optimizer: (its state dict object, the params whose state holds start steps).
# Rescanned when load_state_dict replaces the state object.
_starts_by_optimizer: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Rows reallocated without the optimizer at hand (their layers' ``rows`` views): checked
# before every step, so state sized for the old capacity raises a clear error instead of
# failing deep inside the optimizer's arithmetic. Views, not Parameters: a weak reference
# to a Parameter would stop swap_tensors (torch.__future__.set_swap_module_params_on_conversion).
_reallocated: weakref.WeakSet = weakref.WeakSet()
# Pre-step values of young rows, per optimizer: {id(param): (param, group, rows, values, step)}.
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


def unwrap(optimizer):
    """The optimizer that steps and holds the state. Wrappers (accelerate's
    ``AcceleratedOptimizer``, which the Hugging Face Trainer holds, Lightning's) keep it as
    ``.optimizer`` and step it from their own ``step``."""
    for _ in range(8):
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is optimizer:
            break
        optimizer = inner
    return optimizer


def _is_wrapper(optimizer) -> bool:
    return unwrap(optimizer) is not optimizer


def check_holds(optimizer, params: list[Tensor]) -> None:
    """Raises unless ``optimizer`` is ``None`` or holds at least one of ``params``."""
    if optimizer is None:
        return
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    optimizer = unwrap(optimizer)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if not any(id(p) in held for p in params):
        raise ValueError("the optimizer given does not hold this layer's parameters")


# Factored statistics kept per column, whose shape can pass for one row's.
_PER_COLUMN_STATE = frozenset({"col_var"})  # torch.optim.Adafactor's, (1, in_features)


def is_row_state(value, param: Tensor, name: str | None = None) -> bool:
    """Whether optimizer state entry ``name`` holds one slice per row of ``param``:
    elementwise state (momentum, Adam's moments: ``param``'s shape, at this or an older row
    count), or a factored per-row statistic (Adafactor's ``row_var``, ``(rows, 1)``), but
    not a per-column one (Adafactor's ``col_var``, ``(1, in_features)``)."""
    if name in _PER_COLUMN_STATE:
        return False
    if not isinstance(value, Tensor) or value.dim() != param.dim() or value.dim() < 1:
        return False
    return value.shape[1:] == param.shape[1:] or all(size == 1 for size in value.shape[1:])


# ---------------------------------------------------------------------- rows and sizes


def resize_state(optimizer: torch.optim.Optimizer, params: list[Tensor]) -> None:
    """Brings per-row state (and start steps) to each parameter's row count.

    State of another row count is padded with zeros (fresh state for new rows) or cut; the
    rows both sizes have are unchanged.
    """
    optimizer = unwrap(optimizer)
    for param in params:
        state = param_state(optimizer, param)
        for name, value in list(state.items()):
            if is_row_state(value, param, name) and value.shape[0] != param.shape[0]:
                state[name] = _resized(value, param.shape[0])
        starts = _starts(state)
        if starts is not None and starts.shape[0] != param.shape[0]:
            state[START]["step"] = _resized(starts, param.shape[0])


def _resized(value: Tensor, rows: int) -> Tensor:
    resized = value.new_zeros((rows, *value.shape[1:]))
    keep = min(rows, value.shape[0])
    resized[:keep].copy_(value[:keep])
    return resized


def reset_rows(optimizer: torch.optim.Optimizer, params: list[Tensor], rows) -> None:
    """Zeroes ``rows`` of every per-row state of ``params`` in ``optimizer``.

    State left at an older row count (a grow past capacity without the optimizer) is
    resized first, so the rows are always zeroed, never skipped.
    """
    optimizer = unwrap(optimizer)
    resize_state(optimizer, params)
    with torch.no_grad():
        for param in params:
            for name, value in param_state(optimizer, param).items():
                if is_row_state(value, param, name):
                    distributed.zero_rows_(value, rows)


def note_reallocated(rows) -> None:
    """Records that the Parameters of ``rows`` (a layer's ``rows`` view) changed size, for
    the pre-step size check."""
    _reallocated.add(rows)


def _check_state_sizes(optimizer: torch.optim.Optimizer) -> None:
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for rows in list(_reallocated):
        for param in rows.params:
            grad = param.grad if id(param) in held else None
            if grad is not None and grad.shape != param.shape:
                raise RuntimeError(
                    f"growop: {type(optimizer).__name__} got a gradient of shape "
                    f"{tuple(grad.shape)} for a parameter of shape {tuple(param.shape)}: a "
                    "backward ran through a forward made before the layer grew past its "
                    "capacity (a lookup saves nothing that autograd could check). Run the "
                    "backward before growing; zero_grad() drops the stale gradient."
                )
            for name, value in param_state(optimizer, param).items():
                if is_row_state(value, param, name) and value.shape[0] != param.shape[0]:
                    raise RuntimeError(
                        f"growop: {type(optimizer).__name__} holds state '{name}' of shape "
                        f"{tuple(value.shape)} for a parameter that now has shape "
                        f"{tuple(param.shape)}: the layer grew past its capacity without the "
                        "optimizer. Call layer.resize_optimizer_state(optimizer) once before "
                        "stepping (new rows start with fresh state), and pass optimizer= to "
                        "grow() from now on."
                    )


# ---------------------------------------------------------------------- per-row steps


def _covered(optimizer: torch.optim.Optimizer) -> bool | None:
    """True: corrected; False: needs none; None: not covered."""
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return True
    if isinstance(optimizer, torch.optim.SGD):
        return all(group.get("dampening", 0) == 0 for group in optimizer.param_groups)
    return None


def _starts(state: dict) -> Tensor | None:
    """The per-row start steps in one parameter's state, as int64 on the CPU, or None."""
    entry = state.get(START)
    if not isinstance(entry, dict) or not isinstance(entry.get("step"), Tensor):
        return None
    starts = entry["step"]
    if starts.dtype != torch.int64 or starts.device.type != "cpu":
        # capturable/fused optimizers' load_state_dict moves "step" to float32 on the device
        starts = entry["step"] = starts.round().to(device="cpu", dtype=torch.int64)
    return starts


def start_rows(optimizer: torch.optim.Optimizer, params: list[Tensor], rows: Tensor) -> None:
    """Records that ``rows`` of ``params`` start fresh now, at ``optimizer``'s step (the
    wrapped optimizer's, whose own step runs the correction)."""
    optimizer = unwrap(optimizer)
    if _covered(optimizer) is False:
        return  # SGD: a fresh row's first step is already a fresh optimizer's
    rows = rows.to("cpu")
    for param in params:
        if param not in optimizer.state:
            continue  # never stepped: every row is fresh anyway
        state = optimizer.state[param]
        step = optimizer_step(optimizer, param)
        starts = _starts(state)
        if starts is None:
            if step == 0:
                continue
            starts = torch.zeros(param.shape[0], dtype=torch.int64)
            state[START] = {"step": starts}
        starts[rows] = step
        _young_params(optimizer)[id(param)] = param


def _young_params(optimizer: torch.optim.Optimizer) -> dict:
    """The params of ``optimizer`` whose state holds start steps, by id."""
    cached = _starts_by_optimizer.get(optimizer)
    if cached is not None and cached[0] is optimizer.state:
        return cached[1]
    found = {id(p): p for p, s in optimizer.state.items() if isinstance(s, dict) and START in s}
    _starts_by_optimizer[optimizer] = (optimizer.state, found)
    return found


def _group_of(optimizer: torch.optim.Optimizer, param: Tensor) -> dict | None:
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return group
    return None


def _warn_once(key, message: str) -> None:
    if key not in _warned_types:
        _warned_types.add(key)
        warnings.warn(message, stacklevel=4)


def _age_limit(beta: float, dtype: torch.dtype) -> float:
    """Steps after which ``beta ** steps`` no longer changes ``1 - beta ** step`` in dtype."""
    if beta <= 0:
        return 1
    return math.log(torch.finfo(dtype).eps / 4) / math.log(beta)


def _limit(group: dict, dtype: torch.dtype) -> float:
    beta1, beta2 = (float(b) for b in group["betas"])
    return max(_age_limit(beta1, dtype), _age_limit(beta2, dtype))


def _before_step(optimizer, args, kwargs) -> None:
    if _is_wrapper(optimizer):
        return  # the wrapped optimizer's own step runs the hooks
    if _reallocated:
        _check_state_sizes(optimizer)
    if not _enabled:
        return
    young_params = _young_params(optimizer)
    if not young_params:
        return
    covered = _covered(optimizer)
    for param in list(young_params.values()):
        group = _group_of(optimizer, param)
        if group is None:
            continue
        if covered is None:
            _warn_once(
                type(optimizer),
                f"growop: {type(optimizer).__name__} is not covered by growop's per-row "
                "step correction. Rows added mid-training are updated with the optimizer's "
                "shared state (their own state zeroed at grow); only Adam and AdamW also get "
                "fresh per-row bias correction.",
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
        state = optimizer.state[param]
        starts = _starts(state)
        if starts is None or starts.shape[0] != param.shape[0]:
            continue
        step = optimizer_step(optimizer, param)
        young = (starts > 0).nonzero().squeeze(1)
        rows = young[step + 1 - starts.index_select(0, young) < _limit(group, param.dtype)]
        if rows.numel() == 0:
            continue
        rows = rows.to(param.device)
        values = param.detach().index_select(0, rows)
        _pending.setdefault(optimizer, {})[id(param)] = (param, group, rows, values, step)


def _after_step(optimizer, args, kwargs) -> None:
    if _is_wrapper(optimizer):
        return
    pending = _pending.pop(optimizer, None)
    if pending:
        with torch.no_grad():
            for param, group, rows, before, step_before in pending.values():
                step = optimizer_step(optimizer, param)
                if step == step_before:  # the optimizer skipped this parameter
                    continue
                _redo_rows(optimizer, param, group, rows, before, step)
    if _covered(optimizer):
        _forget_old_rows(optimizer)


def _redo_rows(optimizer, param: Tensor, group: dict, rows: Tensor, before: Tensor, step: int) -> None:
    """The rows' update again, from their pre-step values, with per-row step counts."""
    state = optimizer.state[param]
    starts = _starts(state)
    ages = (step - starts.index_select(0, rows.cpu())).to(param.device)
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


def _forget_old_rows(optimizer) -> None:
    """Marks rows whose correction has fallen below rounding as ordinary (start 0), and
    drops the start steps of a parameter once none is young."""
    young_params = _young_params(optimizer)
    for key, param in list(young_params.items()):
        group = _group_of(optimizer, param)
        state = param_state(optimizer, param)
        starts = _starts(state)
        if group is None or starts is None:
            young_params.pop(key)
            continue
        step = optimizer_step(optimizer, param)
        young = starts > 0
        aged = young & (step - starts >= _limit(group, param.dtype))
        if bool(aged.any()):
            starts[aged] = 0
        if not bool((starts > 0).any()):
            del state[START]
            young_params.pop(key)


register_optimizer_step_pre_hook(_before_step)
register_optimizer_step_post_hook(_after_step)
