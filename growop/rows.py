"""Capacity rows: the one implementation behind every growable layer.

A growable layer allocates ``capacity`` rows in each of its row Parameters (a linear layer's
weight and bias, an embedding's weight) and keeps a bool mask ``active`` of the live rows.
:class:`RowSet` holds what several layers can share: the slots in use, the live count, and
the operations that change them (grow, deactivate, reactivate, reallocation past
capacity). Layers joined with :func:`grow_together` or :func:`tie` share one ``RowSet``, so
one call on any of them acts on all: the same new rows, the same mask, one reallocation,
and the optimizer's state handled once per Parameter (a tied Parameter counts once).

:class:`GrowRows` is the base class of the layers: it owns the mask buffer, the seed of
``init="default"`` rows, checkpoint fitting across capacities, and the public ``grow`` /
``deactivate`` / ``reactivate`` methods. A layer adds only what is its own: its row
Parameters (:meth:`GrowRows._row_params`), how a fresh row of them is drawn
(:meth:`GrowRows._draw_rows`), and its forward. Every optimizer interaction goes through
:mod:`growop.optim`.
"""

from __future__ import annotations

import functools
import math
import operator
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, Union

import torch
from torch import Tensor, nn

from growop import distributed, optim

# Past capacity, storage grows to at least this multiple of the old capacity, so a
# run of single-row grows reallocates O(log n) times.
GROWTH_FACTOR = 1.5

_UINT64 = (1 << 64) - 1

RowInit = Union[str, Tensor, tuple, Callable[..., None]]
Rows = Union[int, Iterable[int], Tensor]


def default_capacity(out_features: int) -> int:
    """Rows allocated when ``capacity`` is not given: 25% headroom, and at least 8 rows."""
    return out_features + max(8, math.ceil(out_features / 4))


def resolved_capacity(capacity: int | None, used: int, owner: str, used_name: str) -> int:
    """``capacity`` checked to hold the ``used`` rows, or :func:`default_capacity` of them."""
    if capacity is None:
        return default_capacity(used)
    capacity = checked_int(capacity, f"{owner}: capacity", 0)
    if capacity < used:
        raise ValueError(f"{owner}: capacity ({capacity}) must be >= {used_name} ({used})")
    return capacity


def new_seed() -> int:
    """A seed for ``grow(init="default")`` rows, drawn from the global RNG (so
    ``torch.manual_seed`` before construction fixes those rows too)."""
    return int(torch.randint(torch.iinfo(torch.int64).max, (), dtype=torch.int64))


def mask_version(mask: Tensor) -> int | None:
    """``mask._version``, or None for an inference tensor, which keeps no version counter
    (and can only be written inside inference mode, where growop's own writes happen)."""
    return None if mask.is_inference() else mask._version


def _outside_inference_mode(method):
    """Runs a RowSet ``method`` with inference mode off: what a grow makes (reallocated
    Parameters, masks, optimizer state) outlives the ``torch.inference_mode()`` block it may
    be called in, and inference tensors there would fail the training that follows. Layers
    whose own tensors are inference tensors (made under inference mode) stay in it: those
    can only be written there."""

    @functools.wraps(method)
    def run(row_set, *args, **kwargs):
        if not torch.is_inference_mode_enabled() or row_set.mask.is_inference() or any(
            p.is_inference() for p in row_set.params()
        ):
            return method(row_set, *args, **kwargs)
        with torch.inference_mode(False):
            return method(row_set, *args, **kwargs)

    return run


class RowSet:
    """The rows that one or more layers grow together.

    Holds the member layers, ``used`` (slots in use: rows ``< used`` have been grown) and
    ``live`` (rows that are live, ``== int(active.sum())``). Each member keeps its own copy
    of the mask in its ``active`` buffer (buffers do not stay shared across ``.to()``); this
    class keeps them equal and mirrors ``used`` and ``live`` into every member's attributes,
    so reading them never synchronises with a device.
    """

    def __init__(self, layer: GrowRows, used: int) -> None:
        self.members: list[GrowRows] = [layer]
        # (source, target, name): target.<name> is source.<name>, restored after loads.
        self.ties: list[tuple[GrowRows, GrowRows, str]] = []
        self.used = used
        self.live = used

    # ------------------------------------------------------------------ views

    @property
    def capacity(self) -> int:
        return self.members[0].capacity

    @property
    def mask(self) -> Tensor:
        return self.members[0].active

    def params(self) -> list[Tensor]:
        """Every member's row Parameters, each once (a tied Parameter counts once)."""
        seen: dict[int, Tensor] = {}
        for member in self.members:
            for param in member._row_params().values():
                if param is not None:
                    seen.setdefault(id(param), param)
        return list(seen.values())

    def _set_counts(self, used: int, live: int) -> None:
        self.used, self.live = used, live
        for member in self.members:
            setattr(member, member._used_attr, used)
            member._live_count = live
        self.note_masks()

    def note_masks(self) -> None:
        """Records each member's mask, and its version, after growop wrote it: a later
        version of the same tensor means something else wrote it (see :meth:`adopt_mask`);
        another tensor in its place was swapped in for a call (``functional_call``)."""
        for member in self.members:
            member._mask_seen = member.active
            member._mask_version = mask_version(member.active)

    def adopt_mask(self, member: GrowRows) -> None:
        """Counts (and the other members' masks) from ``member``'s mask, which something
        other than growop wrote: an EMA or ``AveragedModel`` update copies buffers, not the
        slots in use. ``live`` is exact; ``used`` becomes at least one past the last live
        row (slots past it that are dead cannot be told from slots never grown). Reads the
        mask on the host: a device sync, once per such write."""
        mask = member.active
        if mask.is_meta:
            self.note_masks()
            return
        rows = mask.nonzero()
        last = int(rows[-1]) + 1 if rows.numel() else 0
        with torch.no_grad():
            for other in self.members:
                if other is not member and other.active.shape == mask.shape:
                    other.active.copy_(mask)
        self._set_counts(max(self.used, last), rows.numel())

    def _write_mask(self, index, value: bool) -> None:
        with torch.no_grad():
            for member in self.members:
                if isinstance(index, slice):  # a grow: fill the view, no scalar tensor made
                    member.active[index].fill_(value)
                else:
                    member.active[index] = value

    # ------------------------------------------------------------------ operations

    def _checked_growth(self, rows_needed: int, optimizer, allow_reallocation: bool) -> list[Tensor]:
        """The members' Parameters, after the checks any growth to ``rows_needed`` rows in
        use passes (storage grown past capacity included); raises before anything changes."""
        params = self.params()
        distributed.check_not_flattened(params)
        optim.check_holds(optimizer, params)
        if rows_needed > self.capacity:
            reason = distributed.reallocation_error(
                self.capacity, rows_needed, params, bool(allow_reallocation)
            )
            if reason is not None:
                raise RuntimeError(reason)
        return params

    @_outside_inference_mode
    def reserve(self, capacity: int, optimizer, allow_reallocation: bool) -> None:
        capacity = checked_int(capacity, "reserve: capacity", 1)
        self._checked_growth(capacity, optimizer, allow_reallocation)
        if capacity > self.capacity:
            self.reallocate(capacity, optimizer)

    @_outside_inference_mode
    def grow(self, k: int, init: RowInit, optimizer, allow_reallocation: bool) -> range:
        k = checked_int(k, "grow: k", 1)
        start, stop = self.used, self.used + k
        params = self._checked_growth(stop, optimizer, allow_reallocation)
        # Within capacity, a built-in init writes straight into the unused slots
        # [start, stop): nothing is allocated, and nothing that can fail comes after the
        # write (the slots are not live until the mask below says so). Otherwise every
        # member's rows are made before anything changes.
        in_place = (
            stop <= self.capacity
            and isinstance(init, str)
            and not any(distributed.is_sharded(p) for p in params)
        )
        # A tied Parameter takes the rows of the first member that holds it (the source).
        new_rows: dict[int, tuple[Tensor, Tensor]] = {}
        for member in self.members:
            if all(p is None or id(p) in new_rows for p in member._row_params().values()):
                continue  # a tied member: its source made the rows of every Parameter it holds
            rows_made = member._initial_rows(k, init, into=start if in_place else None)
            for name, rows in rows_made.items():
                param = member._row_params()[name]
                if param is not None and rows is not None:
                    new_rows.setdefault(id(param), (param, rows))
        if stop > self.capacity:
            self.reallocate(max(default_capacity(stop), math.ceil(self.capacity * GROWTH_FACTOR)), optimizer)
        if not in_place:
            with torch.no_grad():
                for param, rows in new_rows.values():
                    distributed.write_rows_(param, start, rows)
        self._write_mask(slice(start, stop), True)
        self._set_counts(stop, self.live + k)
        if optimizer is not None:
            optim.reset_rows(optimizer, params, slice(start, stop))
            optim.start_rows(optimizer, params, torch.arange(start, stop))
        return range(start, stop)

    @_outside_inference_mode
    def set_live(self, rows: Rows, live: bool, optimizer, method: str) -> None:
        """Masks (``live=False``) or unmasks existing rows; with ``optimizer`` their state
        is zeroed, and unmasked rows start a fresh step count."""
        index = self.row_index(rows, method)
        params = self.params()
        distributed.check_not_flattened(params)
        optim.check_holds(optimizer, params)
        self._write_mask(index, live)
        self._set_counts(self.used, self._count_live())
        if optimizer is not None:
            optim.reset_rows(optimizer, params, index)
            if live:
                optim.start_rows(optimizer, params, index)

    @_outside_inference_mode
    def resize_optimizer_state(self, optimizer) -> None:
        params = self.params()
        optim.check_holds(optimizer, params)
        optim.resize_state(optimizer, params)

    def reallocate(self, capacity: int, optimizer) -> None:
        """Grows every member's storage to ``capacity`` rows, keeping the Parameter objects
        and the old rows bit-exact.

        The new tensors are all made before any is installed, so running out of memory
        leaves the layers as they were.
        """
        old = self.capacity
        params = self.params()
        datas, grads = [], []
        for param in params:
            data = param.new_zeros((capacity, *param.shape[1:]))
            data[:old].copy_(param.detach())
            datas.append(data)
            grad = None
            if param.grad is not None:
                grad = param.grad.new_zeros(data.shape)
                grad[:old].copy_(param.grad)
            grads.append(grad)
        masks = []
        for member in self.members:
            mask = member.active.new_zeros(capacity)
            mask[:old].copy_(member.active)
            masks.append(mask)

        for param, data, grad in zip(params, datas, grads):
            # Autograd caches the parameter's gradient accumulator, shape included, for as
            # long as any graph holds it, and only drops it when the dtype changes. Passing
            # through an empty tensor of another dtype makes the next graph build a new one.
            param.data = data.new_empty(0, dtype=_other_dtype(data.dtype))
            param.data = data
            if grad is not None:
                param.grad = grad
        for member, mask in zip(self.members, masks):
            member.active = mask
        self.note_masks()
        if optimizer is not None:
            optim.resize_state(optimizer, params)
        optim.note_reallocated(self)

    def reset_mask(self) -> None:
        """Every slot in use live again, as a freshly built layer's."""
        with torch.no_grad():
            for member in self.members:
                member.active.copy_(torch.arange(self.capacity, device=member.active.device) < self.used)
        self._set_counts(self.used, self.used)

    def after_load(self, loaded: GrowRows, used: int) -> None:
        """Makes the other members agree with ``loaded``'s freshly loaded mask."""
        for source, target, name in self.ties:
            if getattr(target, name) is not getattr(source, name):
                setattr(target, name, getattr(source, name))  # assign=True loads replace
        for member in self.members:
            if member is not loaded and not member.active.is_meta and not loaded.active.is_meta:
                if member.active.shape == loaded.active.shape:
                    with torch.no_grad():
                        member.active.copy_(loaded.active)
        live = used if loaded.active.is_meta else int(loaded.active.sum())
        self._set_counts(used, live)

    # ------------------------------------------------------------------ helpers

    def _count_live(self) -> int:
        return self.live if self.mask.is_meta else int(self.mask.sum())

    def row_index(self, rows: Rows, method: str) -> Tensor:
        """Validated row indices (``< used``) as a long tensor on the mask's device."""
        if isinstance(rows, Tensor):
            if rows.dtype == torch.bool or rows.is_floating_point() or rows.is_complex():
                raise TypeError(f"{method}: rows must be integer indices, got a {rows.dtype} tensor")
            if rows.dim() > 1:
                raise ValueError(f"{method}: rows must be 0-D or 1-D, got shape {tuple(rows.shape)}")
            index = rows.reshape(-1).to(device="cpu", dtype=torch.long)
        else:
            items = [rows] if not isinstance(rows, Iterable) else list(rows)
            try:
                index = torch.tensor([operator.index(r) for r in items], dtype=torch.long)
            except TypeError:
                raise TypeError(f"{method}: rows must be integer indices, got {rows!r}") from None
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.used):
            bad = index[(index < 0) | (index >= self.used)][0].item()
            raise IndexError(
                f"{method}: row {bad} is out of range; rows must be in "
                f"[0, {self.members[0]._used_attr}={self.used})"
            )
        return index.to(self.mask.device)


def _merge(layers: tuple[GrowRows, ...], what: str) -> RowSet:
    """One RowSet for ``layers`` (and every layer already sharing rows with them)."""
    if len(layers) < 2:
        raise ValueError(f"{what} needs at least two layers, got {len(layers)}")
    for layer in layers:
        if not isinstance(layer, GrowRows):
            raise TypeError(f"{what}: expected growop layers, got {type(layer).__name__}")
    first = layers[0]
    for layer in layers[1:]:
        if layer.capacity != first.capacity:
            raise ValueError(
                f"{what}: capacities differ ({type(first).__name__} has {first.capacity} rows, "
                f"{type(layer).__name__} has {layer.capacity}); build the layers with the same capacity"
            )
        if layer._rows.used != first._rows.used:
            raise ValueError(
                f"{what}: slots in use differ ({first._rows.used} and {layer._rows.used}); "
                "the layers must have grown to the same size"
            )
        if layer.active.device != first.active.device or (
            layer._live_count != first._live_count
            or not (first.active.is_meta or torch.equal(layer.active, first.active))
        ):
            raise ValueError(f"{what}: the layers' live rows differ; they must have the same mask")
    merged = first._rows
    for layer in layers[1:]:
        if layer._rows is merged:
            continue
        other = layer._rows
        merged.members.extend(m for m in other.members if m not in merged.members)
        merged.ties.extend(other.ties)
        for member in other.members:
            member._rows = merged
    return merged


def grow_together(*layers: GrowRows) -> None:
    """Makes ``layers`` grow as one: one mask, one live count, the same new rows.

    Each layer keeps its own Parameters and initialises its own new rows. Afterwards
    ``grow``, ``deactivate``, ``reactivate``, reallocation past capacity and optimizer
    state handling called on any of them act on all. The layers must have the same
    capacity, the same slots in use and the same live rows; otherwise this raises and
    changes nothing.
    """
    _merge(layers, "grow_together")


def tie(source: GrowRows, target: GrowRows) -> None:
    """Makes ``target.weight`` the very Parameter ``source.weight`` is, with one row set.

    The usual tie of a language model's output head to its input embedding. ``target``'s
    own weight is dropped: tie before building the optimizer. Shapes (capacity, row size),
    slots in use and live rows must match; otherwise this raises and changes nothing. After
    loading a checkpoint with ``assign=True`` the tie is restored.
    """
    for layer in (source, target):
        if not isinstance(layer, GrowRows):
            raise TypeError(f"tie: expected growop layers, got {type(layer).__name__}")
    if source.weight.shape != target.weight.shape:
        raise ValueError(
            f"tie: weight shapes differ: source {type(source).__name__} has "
            f"{tuple(source.weight.shape)}, target {type(target).__name__} has "
            f"{tuple(target.weight.shape)} (capacity, row size)"
        )
    if source.weight.dtype != target.weight.dtype or source.weight.device != target.weight.device:
        raise ValueError(
            f"tie: weights differ in dtype or device ({source.weight.dtype} on "
            f"{source.weight.device}, {target.weight.dtype} on {target.weight.device})"
        )
    rows = _merge((source, target), "tie")
    target.weight = source.weight
    rows.ties.append((source, target, "weight"))


class GrowRows(nn.Module):
    """Base of growop's layers: capacity rows, their mask, growing and checkpoints.

    Subclasses call :meth:`_init_rows` in ``__init__``, implement :meth:`_row_params` and
    :meth:`_draw_rows`, and name in ``_used_attr`` their attribute that counts the slots in
    use (``out_features``, ``num_embeddings``), which grows with :meth:`grow`.
    """

    _used_attr = "out_features"
    # The mask tensor and its version when growop last wrote it (RowSet.note_masks); the
    # class defaults stand for a layer unpickled from a version that did not record them.
    _mask_seen: Tensor | None = None
    _mask_version = -1

    active: Tensor
    _live_count: int

    def _init_rows(self, used: int, capacity: int, device) -> None:
        self.register_buffer("active", torch.arange(capacity, device=device) < used)
        # Seeds grow(init="default"): a buffer, so DDP broadcasts rank 0's at wrap time and
        # every rank draws the same new rows whatever its own RNG state. Saved in
        # _extra_state, so a resumed run grows the same rows.
        self.register_buffer(
            "_init_seed", torch.zeros((), dtype=torch.int64, device=device), persistent=False
        )
        self._rows = RowSet(self, used)
        self._live_count = used
        self._rows.note_masks()

    # ------------------------------------------------------------------ for subclasses

    def _row_params(self) -> dict[str, Tensor | None]:
        """This layer's row Parameters by name, in ``init`` tuple order (``None`` if absent)."""
        raise NotImplementedError

    def _draw_rows(self, rows: dict[str, Tensor], generator: torch.Generator | None) -> None:
        """Fills, in place, fresh rows for each of this layer's row Parameters."""
        raise NotImplementedError

    # ------------------------------------------------------------------ public

    @property
    def capacity(self) -> int:
        return self.weight.shape[0]

    def grow(
        self,
        k: int = 1,
        *,
        init: RowInit = "default",
        optimizer: torch.optim.Optimizer | None = None,
        allow_reallocation: bool = False,
    ) -> range:
        """Adds ``k`` live rows after the last slot in use; returns their indices.

        Within capacity nothing is allocated: the same Parameters, the same storage. Past
        capacity the storage grows to ``max(default_capacity(n), 1.5 x capacity)`` rows; the
        Parameter objects stay the same, old rows bit-exact, and with ``optimizer=`` its
        per-row state grows with them. Without it, an optimizer that already holds state for
        this layer raises a clear error at its next ``step()`` (see
        :meth:`resize_optimizer_state`).

        In data-parallel training every process calls ``grow`` with the same arguments at
        the same step. Within capacity this works under ``DistributedDataParallel`` (wrapped
        once, never re-wrapped) and FSDP2's ``fully_shard``. Past capacity it raises while
        ``torch.distributed`` runs more than one process, unless ``allow_reallocation=True``
        (and always under FSDP2).

        Layers joined by :func:`growop.grow_together` or :func:`growop.tie` grow together:
        each initialises its own Parameters' new rows with ``init``.

        Args:
            k: number of rows, ``>= 1``.
            init: how the new rows start:

                - ``"default"``: the layer's own initialisation (``nn.Linear``'s for
                  ``GrowLinear``), drawn from a generator seeded by the layer's seed (drawn
                  from the global RNG at construction or ``reset_parameters``) and the index
                  of the first new row. The rows do not depend on the global RNG state at the
                  time of the call, so every DDP rank draws the same rows;
                - ``"zeros"``: every row Parameter zero;
                - ``"mean"``: the mean of the live rows;
                - a Tensor ``(k, row size)`` or ``(row size,)``: the weight rows (others 0);
                - a tuple with one such tensor per row Parameter (``(weight, bias)`` for
                  ``GrowLinear``; bias ``(k,)`` or a scalar);
                - a callable that fills, in place, one ``(k, ...)`` tensor per row Parameter
                  (``init(weight, bias)``, ``bias`` ``None`` without bias).

                In distributed training, tensors and callables must give the same values on
                every process (for example, draw them from a ``torch.Generator`` seeded
                identically everywhere): growop cannot tell, and ranks that differ drift
                apart silently under DDP.
            optimizer: the optimizer that trains this layer. The new rows' state (momentum,
                Adam moments, ...) starts at zero and Adam/AdamW give them their own step
                count; old rows' state is untouched.
            allow_reallocation: permit growing past capacity while ``torch.distributed`` runs
                more than one process. Only for a model that is not wrapped in
                ``DistributedDataParallel``, or that you will wrap again after growing: DDP's
                gradient buckets do not follow reallocated parameters.

        After an error nothing has changed.
        """
        return self._rows.grow(k, init, optimizer, allow_reallocation)

    def reserve(
        self,
        capacity: int,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        allow_reallocation: bool = False,
    ) -> None:
        """Makes room for ``capacity`` rows now, so that the grows to come allocate nothing.

        At or below the current capacity it does nothing. Above it, the storage is
        reallocated once to exactly ``capacity`` rows, as a grow past capacity reallocates:
        the Parameter objects stay the same, old rows bit-exact, no row becomes live, and with
        ``optimizer=`` its per-row state grows with them. Layers joined by
        :func:`growop.grow_together` or :func:`growop.tie` are reallocated together. The
        checks are ``grow``'s: under ``torch.distributed`` with more than one process it
        raises unless ``allow_reallocation=True``. After an error nothing has changed.
        """
        self._rows.reserve(capacity, optimizer, allow_reallocation)

    def deactivate(self, rows: Rows, *, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Masks existing rows (slots in use): their outputs become masked.

        Weights are kept and positions never shift. With ``optimizer=`` the rows' optimizer
        state is zeroed, so momentum stops moving the masked rows; decay that does not
        depend on the gradient (AdamW's decoupled weight decay) still applies to them, as it
        does to any parameter.
        """
        self._rows.set_live(rows, False, optimizer, "deactivate")

    def reactivate(self, rows: Rows, *, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Unmasks rows (slots in use) with the weights they kept.

        With ``optimizer=`` their optimizer state starts fresh (zero), with a fresh step count.
        """
        self._rows.set_live(rows, True, optimizer, "reactivate")

    def resize_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Brings ``optimizer``'s per-row state for this layer to the current capacity.

        Needed only after a grow past capacity made without ``optimizer=``: state tensors of
        the old row count are padded with zeros (fresh state for the new rows); old rows'
        state is unchanged.
        """
        self._rows.resize_optimizer_state(optimizer)

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"{type(self).__name__} does not support torch.jit.script: its rows are managed "
            "from Python. Use torch.jit.trace or torch.export, or script the plain layer "
            "that to_linear() / to_embedding() returns."
        )

    def _live_count_for(self, active: Tensor) -> int | None:
        """The host-side live count where it describes ``active``, the mask a forward is
        given; eager forwards ask when ``active`` is not the mask growop last wrote, as it
        left it (checking that costs no sync). The layer's own mask written by something
        else (an EMA update copying buffers): the counts follow it
        (:meth:`RowSet.adopt_mask`). Another tensor in its place, swapped in for one call
        (``functional_call``, ``stack_module_state`` under ``vmap``): no count (None)."""
        if active is not self._mask_seen:
            if self._mask_seen is None and active is self._buffers.get("active"):
                self._rows.adopt_mask(self)  # unpickled from a version that kept no record
                return self._live_count
            return None
        if self._mask_version is not None and active._version != self._mask_version:
            self._rows.adopt_mask(self)
        return self._live_count

    # ------------------------------------------------------------------ device moves

    def _apply(self, fn, recurse=True):
        # Every .to(), .cuda(), .half() and to_empty() comes through here. to_empty (and
        # skip_init, which builds on meta and calls it) gives every buffer uninitialised
        # storage: right for values that get loaded or initialised next, wrong for the mask
        # and seed, which hold this layer's structure (code written for nn.Linear copies the
        # weights in and goes on). So each keeps its values across any move: copied from
        # the old tensor, or, coming from meta where they hold none, remade as the
        # constructor makes them.
        before = {name: self._buffers.get(name) for name in ("active", "_init_seed")}
        module = super()._apply(fn, recurse)
        self._keep_row_state(before["active"], before["_init_seed"])
        return module

    def _keep_row_state(self, old_active: Tensor | None, old_seed: Tensor | None) -> None:
        active, seed = self._buffers.get("active"), self._buffers.get("_init_seed")
        with torch.no_grad():
            if active is not None and old_active is not None and active is not old_active and not active.is_meta:
                if old_active.is_meta:  # a meta mask holds no pattern: every slot in use live
                    self._rows.reset_mask()
                else:
                    active.copy_(old_active)
                    self._rows.note_masks()
            if seed is not None and old_seed is not None and seed is not old_seed and not seed.is_meta:
                if old_seed.is_meta:
                    seed.fill_(new_seed())
                else:
                    seed.copy_(old_seed)

    # ------------------------------------------------------------------ reset

    def _reset_rows(self) -> None:
        """The mask and seed as the constructor leaves them (for ``reset_parameters``).

        Every slot in use is live again, and a new seed (:func:`new_seed`) draws later
        ``grow(init="default")`` rows. On meta nothing is computed, as in ``nn.Linear``.
        """
        if self.active.is_meta:
            return
        with torch.no_grad():
            self._init_seed.fill_(new_seed())
        self._rows.reset_mask()

    # ------------------------------------------------------------------ new rows

    def _initial_rows(
        self, k: int, init: RowInit, into: int | None = None
    ) -> dict[str, Tensor | None]:
        """This layer's new rows for ``init``, computed before anything changes.

        Plain tensors on the layer's device, the same on every process for the built-in
        inits (``"mean"`` gathers sharded parameters, a collective under FSDP2). With
        ``into`` (a built-in ``init``, unsharded Parameters, the rows within capacity) the
        rows are written straight into the unused slots ``into .. into + k`` of the
        Parameters, after every check, and those slots are returned.
        """
        params = self._row_params()
        shapes = {
            name: (k, *p.shape[1:]) for name, p in params.items() if p is not None
        }
        likes = {name: distributed.local(p.detach()) for name, p in params.items() if p is not None}
        first = next(iter(params))
        with torch.no_grad():
            if isinstance(init, str):
                if init not in ("default", "zeros", "mean"):
                    raise ValueError(
                        f"grow: unknown init {init!r}; expected 'default', 'zeros', 'mean', "
                        "a tensor, a tuple or a callable"
                    )
                if init == "mean" and self._rows.live == 0:
                    raise ValueError("grow(init='mean') needs at least one live row")
                if into is not None:
                    slots = {n: (likes[n][into : into + k] if n in shapes else None) for n in params}
                    return self._builtin_rows_into(init, slots)
                if init == "default":
                    return self._default_rows(k, shapes, likes)
                if init == "zeros":
                    return {n: (likes[n].new_zeros(shapes[n]) if n in shapes else None) for n in params}
                out = {}
                for name, p in params.items():
                    if p is None:
                        out[name] = None
                        continue
                    mean = _live_mean(distributed.full(p.detach()), self.active, self._rows)
                    out[name] = mean.expand(shapes[name]).clone()
                return out
            if isinstance(init, Tensor):
                out = {n: (likes[n].new_zeros(shapes[n]) if n in shapes else None) for n in params}
                out[first] = _rows_like(init, shapes[first], likes[first], "init")
                return out
            if isinstance(init, tuple):
                if len(init) != len(params):
                    names = ", ".join(params)
                    raise ValueError(f"grow: init tuple must be ({names}), got {len(init)} items")
                out = {}
                for (name, p), value in zip(params.items(), init):
                    if p is None:
                        if value is not None:
                            raise ValueError(f"grow: init gives a {name} but the layer has none")
                        out[name] = None
                    elif name == first:
                        out[name] = _rows_like(value, shapes[name], likes[name], "init weight")
                    else:
                        out[name] = _rows_like(torch.as_tensor(value), shapes[name], likes[name], f"init {name}")
                return out
            if callable(init):
                out = {n: (likes[n].new_zeros(shapes[n]) if n in shapes else None) for n in params}
                init(*out.values())
                for name, value in out.items():
                    if value is not None and value.shape != shapes[name]:
                        raise ValueError("grow: the init callable must fill its tensors in place")
                return out
        raise TypeError(f"grow: init must be a str, tensor, tuple or callable, got {type(init).__name__}")

    def _builtin_rows_into(self, init: str, slots: dict[str, Tensor | None]) -> dict[str, Tensor | None]:
        """Writes ``init``'s rows into ``slots`` (views of unused rows) without allocating."""
        if init == "zeros":
            for slot in slots.values():
                if slot is not None:
                    slot.zero_()
        elif init == "mean":
            for name, slot in slots.items():
                if slot is not None:
                    _live_mean_into(self._row_params()[name].detach(), self.active, self._rows, slot[0])
                    slot[1:].copy_(slot[0].expand_as(slot[1:]))
        elif self.weight.is_meta:
            pass  # on meta nothing is computed
        elif self.weight.device.type == "cpu":
            self._draw_rows(slots, self._row_generator())
        else:  # drawn on the CPU, as everywhere, so the rows do not depend on the device
            shapes = {n: tuple(v.shape) for n, v in slots.items() if v is not None}
            likes = {n: v for n, v in slots.items() if v is not None}
            for name, rows in self._default_rows(len(next(iter(likes.values()))), shapes, likes).items():
                if rows is not None:
                    slots[name].copy_(rows)
        return slots

    def _row_generator(self) -> torch.Generator:
        """The generator of ``init="default"`` rows grown from the next slot: seeded by the
        layer's seed and that slot, both the same on every DDP rank."""
        return torch.Generator().manual_seed(_row_seed(int(self._init_seed), self._rows.used))

    def _default_rows(self, k: int, shapes: dict, likes: dict) -> dict[str, Tensor | None]:
        """Rows ``used .. used + k`` drawn as the layer initialises, reproducibly.

        Drawn on the CPU from a generator seeded by the layer's seed and the first new row
        (both the same on every DDP rank), then moved: the rows do not depend on the global
        RNG at call time, nor on the device.
        """
        rows = {
            name: (torch.empty(shapes[name], dtype=likes[name].dtype) if name in shapes else None)
            for name in self._row_params()
        }
        if not self.weight.is_meta:
            self._draw_rows(rows, self._row_generator())
        return {n: (r.to(likes[n].device) if r is not None else None) for n, r in rows.items()}

    # ------------------------------------------------------------------ checkpoints

    def get_extra_state(self) -> Tensor:
        # Tensors only, so safetensors, EMA loops and clone-all-values code take the state
        # dict as it is: [slots in use, seed of init="default" rows].
        seed = 0 if self._init_seed.is_meta else int(self._init_seed)
        return torch.tensor([self._rows.used, seed], dtype=torch.int64)

    def set_extra_state(self, state: Any) -> None:
        # Called by load_state_dict after the parameters and buffers, the mask included.
        used, seed = _read_extra_state(state)
        if used > self.capacity:
            raise ValueError(
                f"{type(self).__name__}: checkpoint has {used} slots in use, "
                f"more than this layer's capacity {self.capacity}"
            )
        if seed is None and self._init_seed.is_meta:  # built on meta, a stock checkpoint
            seed = new_seed()
        if self._init_seed.is_meta:
            self._init_seed = torch.tensor(seed, dtype=torch.int64, device=self.weight.device)
        elif seed is not None:
            with torch.no_grad():
                self._init_seed.fill_(seed)
        self._rows.after_load(self, used)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # The load pre-hooks run first, as nn.Module runs them before it reads any key: a
        # hook that renames or converts keys does so before the rows are fitted. They are
        # set aside while nn.Module's part runs, so that each runs once.
        hooks = self._load_state_dict_pre_hooks
        for hook in hooks.values():
            hook(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        self._load_state_dict_pre_hooks = OrderedDict()
        try:
            if self._fit_checkpoint(state_dict, prefix, error_msgs):
                super()._load_from_state_dict(
                    state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
                )
        finally:
            self._load_state_dict_pre_hooks = hooks

    def _fit_checkpoint(self, state_dict: dict, prefix: str, error_msgs: list) -> bool:
        """Makes this layer's entries of ``state_dict`` fit its capacity, before they load.

        Per-row tensors of another row count are fitted (:meth:`_fit_rows_in_place`); a stock
        layer's checkpoint (no mask, no extra state) gets a mask with every row live. Returns
        False, with the errors recorded, where the checkpoint cannot load (a row of another
        size, more slots in use than the capacity): then nothing of this layer is loaded, so
        a failed load leaves it as it was.
        """
        # Written before per-row step counts moved into the optimizer's state: dropped, so
        # a strict load still accepts the checkpoint.
        state_dict.pop(prefix + "row_start_step", None)
        saved_rows, mismatched = {}, []
        for name, own in self._per_row_tensors().items():
            saved = state_dict.get(prefix + name)
            if not isinstance(saved, Tensor):
                continue
            if saved.dim() != own.dim() or saved.dim() == 0 or saved.shape[1:] != own.shape[1:]:
                mismatched.append(
                    f"size mismatch for {prefix}{name}: copying a param with shape {saved.shape} from "
                    f"checkpoint, the shape in current model is {own.shape}."
                )
            else:
                saved_rows[name] = saved.shape[0]
        if mismatched:
            error_msgs.extend(mismatched)
            return False
        if not saved_rows:
            return True
        first = next(iter(saved_rows))
        active_key, extra_key = prefix + "active", prefix + "_extra_state"
        if active_key not in state_dict and extra_key not in state_dict:
            # A stock layer's checkpoint (nn.Linear, nn.Embedding): every row is live.
            rows, device = saved_rows[first], state_dict[prefix + first].device
            state_dict[active_key] = torch.ones(rows, dtype=torch.bool, device=device)
            state_dict[extra_key] = torch.tensor([rows], dtype=torch.int64)
            saved_rows["active"] = rows
        extra = state_dict.get(extra_key)
        used = _read_extra_state(extra)[0] if extra is not None else None
        if used is not None and used > self.capacity:
            error_msgs.append(
                f"{type(self).__name__} {prefix or '(root)'}: checkpoint has {used} slots "
                f"in use, which does not fit this layer's capacity {self.capacity}"
            )
            return False
        if any(rows != self.capacity for rows in saved_rows.values()):
            self._fit_rows_in_place(state_dict, prefix, saved_rows)
            # an optimizer state dict saved beside it has the checkpoint's row count
            optim.note_reallocated(self._rows)
        return True

    def _per_row_tensors(self) -> dict[str, Tensor]:
        """The state-dict entries with one slice per row: the row Parameters and the mask."""
        tensors = {name: p for name, p in self._row_params().items() if p is not None}
        tensors["active"] = self.active
        return tensors

    def _fit_rows_in_place(self, state_dict: dict, prefix: str, saved_rows: dict[str, int]) -> None:
        """Rewrites a checkpoint's per-row tensors (``saved_rows``: name -> rows) to this
        layer's capacity.

        The first ``min(rows, capacity)`` rows come from the checkpoint; rows past the
        checkpoint keep this layer's own values (zero if it has none yet, on meta) and are
        not live.
        """
        current = self._per_row_tensors()
        for name, rows in saved_rows.items():
            own, key = current[name], prefix + name
            if rows == self.capacity:
                continue
            saved = state_dict[key]
            keep = min(rows, self.capacity)
            fitted = saved.new_zeros((self.capacity, *saved.shape[1:]))
            if name != "active" and not own.is_meta:
                fitted.copy_(own.detach())
            fitted[:keep].copy_(saved[:keep])
            state_dict[key] = fitted


def _live_mean(rows: Tensor, active: Tensor, row_set: RowSet) -> Tensor:
    """The mean of the live rows in one pass, without copying them (a vocabulary-sized
    weight is gigabytes): the mask-weighted sum of the slots in use (a matrix-vector
    product, several times faster than a reduction over rows) over the live count."""
    used = row_set.used
    weights = active[:used].to(device=rows.device, dtype=rows.dtype)
    return (weights @ rows[:used]) / row_set.live


def _live_mean_into(rows: Tensor, active: Tensor, row_set: RowSet, out: Tensor) -> None:
    """``out[:] =`` the mean of the live rows. Every slot in use live (a vocabulary grown
    and never masked) is a plain mean with ``out=``, which allocates nothing; otherwise the
    mask-weighted :func:`_live_mean`."""
    if row_set.live == row_set.used:
        torch.mean(rows[: row_set.used], 0, out=out)
    else:
        out.copy_(_live_mean(rows, active, row_set))


def _read_extra_state(state: Any) -> tuple[int, int | None]:
    """(slots in use, seed or None) from a tensor ``_extra_state`` or an older dict one."""
    if isinstance(state, dict):  # written by growop 0.1
        return int(state["out_features"]), None
    values = torch.as_tensor(state).reshape(-1).tolist()
    return int(values[0]), (int(values[1]) if len(values) > 1 else None)


def _row_seed(layer_seed: int, first_row: int) -> int:
    """A seed for the rows grown from ``first_row``: SplitMix64 of the pair.

    Mixing (rather than adding) keeps the streams of neighbouring layers and grows apart.
    """
    z = (layer_seed + (first_row + 1) * 0x9E3779B97F4A7C15) & _UINT64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _UINT64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _UINT64
    return z ^ (z >> 31)


def _rows_like(value: Tensor, shape: tuple, like: Tensor, what: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"grow: {what} must be a tensor, got {type(value).__name__}")
    if value.shape != shape and value.shape != shape[1:]:
        raise ValueError(f"grow: {what} must have shape {shape} or {shape[1:]}, got {tuple(value.shape)}")
    return value.detach().to(device=like.device, dtype=like.dtype).expand(shape).clone()


def checked_int(value: Any, what: str, minimum: int) -> int:
    """``value`` as an int ``>= minimum``; ``what`` names it in the error."""
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an int >= {minimum}, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an int >= {minimum}, got {value!r}") from None
    if value < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {value}")
    return value


def _other_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype != torch.float64 else torch.float32
