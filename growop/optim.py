"""Every interaction of growop's layers with an optimizer.

Rows change under an optimizer in four ways, each handled here and nowhere else:

- a row starts fresh (grown, or unmasked by ``reactivate``): its state (momentum, Adam
  moments) is zeroed, and Adam/AdamW give it its own step count (described below);
- the Parameters change row count (a grow past capacity, ``reserve``), or optimizer state
  of another row count is loaded (a checkpoint of another capacity): per-row state is
  fitted to the Parameters (padded with zeros, or cut);
- ``deactivate(optimizer=)`` zeroes the rows' state (:func:`reset_rows`);
- an optimizer passed in must hold the layer (:func:`check_holds`).

Which optimizers. A row event acts on the optimizer passed as ``optimizer=`` and on every
optimizer that growop knows to hold the layer's Parameters: those passed to any growop
call, and those that have stepped while holding a growop Parameter. torch keeps no list of
optimizers, so the way to meet them all is the global step hooks that
``torch.optim.Optimizer`` offers (``register_optimizer_step_pre_hook``): the pre-step hook
sees every optimizer at its next step, scans its Parameters once, and remembers it
(weakly) if it holds a growop layer. An optimizer that growop has not met when the rows
change (one resumed from a state dict and not stepped since, one built later) catches up
at its first step: the state it holds is brought to what it would be had it been passed
as ``optimizer=`` (see :mod:`growop.rows.history` for how its rows' past is kept).

- Each growop Parameter's state records the last row event it has taken in
  (``optimizer.state[param]["row_start"]["seen"]``: the history's token and event number,
  saved with ``state_dict()``), so rows (re)started after that event are zeroed and given
  their own step count, and nothing else is touched: state saved after a grow (and
  trained since) is never reset, in whichever optimizer it is loaded.
- Per-row state of another row count is fitted when the layer has had that row count
  (an earlier capacity, or the capacity of a checkpoint loaded into it): the Llama resume
  of a checkpoint at capacity 50 into a model rebuilt at capacity 55 just works. A row
  count the layer never had cannot be explained, and the step raises an error that names
  the shapes and what to do, having changed nothing.
- A backward through a forward made before a reallocation hands the optimizer a gradient
  of the old row count; the step raises an error naming it.

Why global hooks. Per-optimizer hooks would need growop to meet each optimizer first, and
the optimizers that need growop most are those it never met (resumed from a state dict,
or built in library code before a grow); no other torch mechanism reaches them. The cost
of the global hooks for an optimizer already seen, holding growop Parameters or not, is
one weak-dictionary lookup and a few comparisons per step: 1 to 2 microseconds, where an
``AdamW.step()`` over 10 small Parameters takes hundreds. An optimizer costs one scan of
its Parameters (20 to 85 microseconds for 10 to 300) at its first step, again only if its
param groups change and, for one holding growop Parameters, at its first step after a row
event. (Measured with ``benchmarks/bench_optim_hooks.py``; machine, date and figures in the
README's "Optimizers growop was not given".) An optimizer growop has met also gets one
hook of its own, on ``load_state_dict``, which marks it for a catch-up at its next step.

Per-row step counts. Adam keeps one step counter per Parameter and divides its moments by
``1 - beta ** step``. A row that starts at step ``t0`` of an optimizer has moments that
were zero at ``t0``, so the correct divisor is ``1 - beta ** (step - t0)``; the shared
counter makes its first updates several times too large. The start steps belong to the
optimizer whose counter they refer to, so they live in its state, beside ``step``:
``optimizer.state[param]["row_start"]["step"]``, an int64 tensor with one entry per row
(0: from the beginning). They travel with the optimizer's ``state_dict`` (a resumed run
keeps correcting its young rows), and a new optimizer, which has none, treats every row as
fresh, as stock Adam would. (The inner key is ``"step"`` because
``Optimizer.load_state_dict`` casts every other state tensor to the parameter's dtype,
which would round start steps in bfloat16; ``"seen"`` holds Python ints, which it keeps.)

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
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from growop import distributed

if TYPE_CHECKING:
    from growop.rows.history import RowHistory
    from growop.rows.rowset import RowSet

# optimizer.state[param][START]: {"step": per-row start steps, "seen": last row event taken in}
START = "row_start"

# Every row set alive (they register themselves), so that the step hook can tell growop's
# Parameters. Row sets, not Parameters: a weak reference to a Parameter would stop
# swap_tensors (torch.__future__.set_swap_module_params_on_conversion).
_row_sets: weakref.WeakSet = weakref.WeakSet()
# Bumped by every row event and every join: an optimizer holding growop Parameters is
# brought up to date (a scan of its Parameters and their state) at its next step.
_changes = 0
_known: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> _Known
_watched: weakref.WeakSet = weakref.WeakSet()  # optimizers with growop's load hook
_warned_types: set = set()  # optimizer types (and other keys) warned about
_enabled = True


class _Known:
    """What growop knows of one optimizer, as of its last catch-up."""

    __slots__ = ("wrapper", "state_id", "groups", "changes", "held", "watch", "young", "unmarked", "pending")

    def __init__(self, wrapper: bool = False) -> None:
        self.wrapper = wrapper  # steps through the optimizer it wraps, whose hooks do the work
        # id() of the optimizer's state dict, which load_state_dict replaces (its id, not the
        # dict: holding the old state would keep its tensors alive; see _watch_loads)
        self.state_id = 0
        self.groups: tuple = ()  # _groups_key: param groups added or replaced
        self.changes = -1  # _changes when last caught up
        self.held: list[Tensor] = []  # its growop Parameters
        self.watch: list[Tensor] = []  # those reallocated at some point (stale gradients)
        self.young: dict[int, Tensor] = {}  # those with start steps, by id
        self.unmarked: list[tuple[Tensor, RowHistory]] = []  # without state yet, rows with events
        self.pending: dict = {}  # pre-step values of young rows: {id: (param, group, rows, values, step)}


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


def check_holds(optimizer, params: list[Tensor]) -> None:
    """Raises unless ``optimizer`` is ``None`` or holds at least one of ``params``."""
    if optimizer is None:
        return
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    held = _param_ids(unwrap(optimizer))
    if not any(id(p) in held for p in params):
        raise ValueError("the optimizer given does not hold this layer's parameters")


def _param_ids(optimizer: torch.optim.Optimizer) -> set[int]:
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


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


# ---------------------------------------------------------------------- row sets


def track(row_set: RowSet) -> None:
    """Registers a row set (weakly): its Parameters are growop's."""
    _row_sets.add(row_set)


def joined(row_set: RowSet, absorbed: RowSet) -> None:
    """``absorbed``'s layers now belong to ``row_set``: its Parameters are found there."""
    global _changes
    _row_sets.discard(absorbed)
    _changes += 1


def rows_changed(row_set: RowSet, optimizer=None) -> None:
    """After ``row_set``'s rows changed (a grow, ``reactivate``, a reallocation): brings the
    state of ``optimizer`` (passed in: fitted whatever its row count) and of every known
    optimizer holding the rows up to date now. Any other optimizer catches up at its next
    step, as does a known one whose state cannot be explained (its step raises)."""
    global _changes
    _changes += 1
    given = None if optimizer is None else unwrap(optimizer)
    if given is not None:
        fit_given(row_set, given)
    history, params = row_set.history, row_set.params
    for other, known in list(_known.items()):
        if other is given or known.wrapper:
            continue
        held = [p for p in params if any(p is q for q in known.held)]
        if held and not any(_unexplained(other, p, history) for p in held):
            for param in held:
                _bring_up_to_date(other, param, history)


def fit_given(row_set: RowSet, optimizer) -> None:
    """Brings ``optimizer``'s state for ``row_set`` up to date, fitting per-row state of any
    row count (the caller vouches for it: ``optimizer=``, ``resize_optimizer_state``), and
    remembers the optimizer, so that later row events act on it at once."""
    optimizer = unwrap(optimizer)
    params = row_set.params
    resize_state(optimizer, params)
    for param in params:
        _bring_up_to_date(optimizer, param, row_set.history)
    if optimizer not in _known:
        known = _known[optimizer] = _Known()
        known.held = [p for p, _ in _growop_params(optimizer)]


# ---------------------------------------------------------------------- rows and sizes


def resize_state(optimizer: torch.optim.Optimizer, params: list[Tensor]) -> None:
    """Brings per-row state (and start steps) to each parameter's row count.

    State of another row count is padded with zeros (fresh state for new rows) or cut; the
    rows both sizes have are unchanged.
    """
    optimizer = unwrap(optimizer)
    for param in params:
        _resize_param_state(param_state(optimizer, param), param)


def _resize_param_state(state: dict, param: Tensor) -> None:
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

    State left at another row count is resized first, so the rows are always zeroed,
    never skipped.
    """
    optimizer = unwrap(optimizer)
    resize_state(optimizer, params)
    for param in params:
        _zero_rows(param_state(optimizer, param), param, rows)


def _zero_rows(state: dict, param: Tensor, rows) -> None:
    with torch.no_grad():
        for name, value in state.items():
            if is_row_state(value, param, name):
                distributed.zero_rows_(value, rows)


def _unexplained(optimizer: torch.optim.Optimizer, param: Tensor, history: RowHistory) -> str | None:
    """Why ``optimizer``'s per-row state for ``param`` cannot be fitted to it (a row count
    its layer never had), or None."""
    for name, value in param_state(optimizer, param).items():
        if not is_row_state(value, param, name) or value.shape[0] == param.shape[0]:
            continue
        if value.shape[0] not in history.row_counts:
            counts = ", ".join(str(n) for n in sorted(history.row_counts))
            return (
                f"growop: {type(optimizer).__name__} holds state '{name}' of shape "
                f"{tuple(value.shape)} for a parameter of shape {tuple(param.shape)}, and its "
                f"layer never had {value.shape[0]} rows (it has had {counts}): the state was "
                "saved with a model of another capacity. Load that model's checkpoint into "
                "this model (model.load_state_dict) before stepping, and the state fits "
                "itself; or call layer.resize_optimizer_state(optimizer) once to keep the "
                f"state of the first {min(value.shape[0], param.shape[0])} rows and start "
                "the others fresh. Nothing was changed."
            )
    return None


def _check_gradients(optimizer: torch.optim.Optimizer, params: list[Tensor]) -> None:
    for param in params:
        grad = param.grad
        if grad is not None and grad.shape != param.shape:
            raise RuntimeError(
                f"growop: {type(optimizer).__name__} got a gradient of shape "
                f"{tuple(grad.shape)} for a parameter of shape {tuple(param.shape)}: a "
                "backward ran through a forward made before the layer grew past its "
                "capacity (a lookup saves nothing that autograd could check). Run the "
                "backward before growing; zero_grad() drops the stale gradient."
            )


def _bring_up_to_date(optimizer: torch.optim.Optimizer, param: Tensor, history: RowHistory) -> bool:
    """Fits ``optimizer``'s state for ``param`` to its row count (a count ``history`` has
    had), restarts the rows started after the last event the state has taken in, and
    records that it has taken in every event. Returns True where the state is yet to be
    made (by the optimizer's next step) and should then be marked."""
    state = param_state(optimizer, param)
    if not state:  # never stepped: every row is fresh anyway (and Adam makes its state
        return history.events > 0  # only while the entry is empty: nothing is written here)
    _resize_param_state(state, param)
    entry = state.get(START)
    seen = history.seen_by(entry.get("seen") if isinstance(entry, dict) else None)
    for rows in history.started_since(seen):
        _zero_rows(state, param, rows)
        _start_rows(optimizer, param, state, rows)
    _mark(state, history)
    return False


def _mark(state: dict, history: RowHistory) -> None:
    if history.events:
        state.setdefault(START, {})["seen"] = history.marker()


# ---------------------------------------------------------------------- meeting optimizers


def _groups_key(optimizer: torch.optim.Optimizer) -> tuple:
    return tuple((id(group["params"]), len(group["params"])) for group in optimizer.param_groups)


def _growop_params(optimizer: torch.optim.Optimizer) -> list[tuple[Tensor, RowHistory]]:
    """The growop Parameters ``optimizer`` holds, each with its row set's history."""
    ids = _param_ids(optimizer)
    held, seen = [], set()
    for row_set in list(_row_sets):
        for param in row_set.params:
            if id(param) in ids and id(param) not in seen:
                seen.add(id(param))
                held.append((param, row_set.history))
    return held


def _catch_up(optimizer) -> _Known:
    """Scans ``optimizer`` and brings its state for every growop Parameter it holds up to
    date; raises, changing nothing, where that state cannot be explained."""
    if unwrap(optimizer) is not optimizer:
        known = _known[optimizer] = _Known(wrapper=True)
        return known
    held = _growop_params(optimizer)
    watch = [param for param, history in held if history.reallocated]
    _check_gradients(optimizer, watch)
    for param, history in held:
        problem = _unexplained(optimizer, param, history)
        if problem is not None:
            raise RuntimeError(problem)
    known = _Known()
    known.state_id, known.groups, known.changes = id(optimizer.state), _groups_key(optimizer), _changes
    _watch_loads(optimizer)
    known.held, known.watch = [param for param, _ in held], watch
    for param, history in held:
        if _bring_up_to_date(optimizer, param, history):
            known.unmarked.append((param, history))
        if _starts(param_state(optimizer, param)) is not None:
            known.young[id(param)] = param
    _known[optimizer] = known
    return known


def _in_sync(optimizer, known: _Known) -> bool:
    if known.wrapper:
        return True
    if known.groups != _groups_key(optimizer):
        return False
    return not known.held or (known.changes == _changes and known.state_id == id(optimizer.state))


def _watch_loads(optimizer: torch.optim.Optimizer) -> None:
    """Has ``optimizer.load_state_dict`` put it out of sync (the new state dict may take
    the old one's id), once per optimizer."""
    if optimizer in _watched:
        return
    _watched.add(optimizer)
    with contextlib.suppress(AttributeError):  # an Optimizer subclass that skipped __init__
        optimizer.register_load_state_dict_post_hook(_after_load)


def _after_load(optimizer: torch.optim.Optimizer) -> None:
    known = _known.get(optimizer)
    if known is not None:
        known.changes = -1


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


def _start_rows(optimizer: torch.optim.Optimizer, param: Tensor, state: dict, rows) -> None:
    """Records that ``rows`` of ``param`` start fresh now, at ``optimizer``'s step."""
    if _covered(optimizer) is False:
        return  # SGD: a fresh row's first step is already a fresh optimizer's
    step = optimizer_step(optimizer, param)
    starts = _starts(state)
    if starts is None:
        if step == 0:
            return  # never stepped: every row is fresh anyway
        starts = torch.zeros(param.shape[0], dtype=torch.int64)
        state.setdefault(START, {})["step"] = starts
    starts[rows] = step  # rows: a slice or a CPU index tensor


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
    known = _known.get(optimizer)
    if known is None or not _in_sync(optimizer, known):
        known = _catch_up(optimizer)
    elif known.watch:
        _check_gradients(optimizer, known.watch)
    if known.wrapper or not known.young or not _enabled:
        return  # a wrapper: the wrapped optimizer's own step runs the hooks
    covered = _covered(optimizer)
    for param in list(known.young.values()):
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
        known.pending[id(param)] = (param, group, rows, values, step)


def _after_step(optimizer, args, kwargs) -> None:
    known = _known.get(optimizer)
    if known is None or known.wrapper:
        return
    if known.pending:
        pending, known.pending = known.pending, {}
        with torch.no_grad():
            for param, group, rows, before, step_before in pending.values():
                step = optimizer_step(optimizer, param)
                if step == step_before:  # the optimizer skipped this parameter
                    continue
                _redo_rows(optimizer, param, group, rows, before, step)
    if known.young and _covered(optimizer):
        _forget_old_rows(optimizer, known.young)
    if known.unmarked:
        _mark_new_state(optimizer, known)


def _mark_new_state(optimizer, known: _Known) -> None:
    """Marks the state a step made for Parameters whose rows had events before it: it was
    made fresh after them, so a state dict of it, loaded elsewhere, is not reset."""
    waiting = []
    for param, history in known.unmarked:
        state = param_state(optimizer, param)
        if state:
            _mark(state, history)
        else:
            waiting.append((param, history))
    known.unmarked = waiting


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


def _forget_old_rows(optimizer, young_params: dict) -> None:
    """Marks rows whose correction has fallen below rounding as ordinary (start 0), and
    drops the start steps of a parameter once none is young."""
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
            del state[START]["step"]
            if not state[START]:
                del state[START]
            young_params.pop(key)


register_optimizer_step_pre_hook(_before_step)
register_optimizer_step_post_hook(_after_step)
