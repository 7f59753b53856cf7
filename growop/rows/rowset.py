"""``RowSet``: the one owner of row state, shared by the layers that grow together.

A layer's row state is the slots in use (``used``: rows ``< used`` have been grown), the
live count (``live == int(active.sum())``), its mask buffer ``active``, and the record of
that mask as growop last left it, and the rows' history (:class:`RowHistory`: which rows
started fresh at which event, the row counts the Parameters have had), from which an
optimizer that was not there catches up. All of it belongs to the layer's :class:`RowSet`,
which holds it for every layer joined with ``grow_together`` or ``tie`` and is the only
code that changes it: growing, masking and unmasking rows, reserving and reallocating
storage, resetting the mask, and following a mask that something other than growop wrote.
Every optimizer interaction goes through :mod:`growop.optim`, which each change of rows
calls (:func:`growop.optim.rows_changed`).

Code outside ``growop.rows`` reads row state through ``layer.rows`` (a
:class:`RowSetView`), ``layer.live_count`` and ``out_features`` / ``num_embeddings``; the
layers' forwards read ``used`` and ``live`` here directly, which costs no method call.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Iterable
from typing import TYPE_CHECKING, Union

import torch
from torch import Tensor

from growop import distributed, optim
from growop.rows.capacity import checked_int, grown_capacity
from growop.rows.history import RowHistory
from growop.rows.init import RowInit, check_builtin_init, new_rows

if TYPE_CHECKING:
    from growop.rows.layer import GrowRows

RowIndices = Union[int, Iterable[int], Tensor]


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
            p.is_inference() for p in row_set.params
        ):
            return method(row_set, *args, **kwargs)
        with torch.inference_mode(False):
            return method(row_set, *args, **kwargs)

    return run


class RowSet:
    """The rows that one or more layers grow together, and the one owner of their state.

    Holds the member layers, ``used`` and ``live`` (plain ints on the host, so that reading
    them never synchronises with a device). Each member keeps its own copy of the mask in
    its ``active`` buffer (buffers do not stay shared across ``.to()``); this class keeps
    them equal, and records on each member, in ``_mask_record``, the mask tensor and its
    version as it left them, so that a forward can tell in two reads whether the counts
    still describe the mask it is given (:meth:`live_count_for`). It also keeps the rows'
    ``history`` (:class:`~growop.rows.history.RowHistory`), which :mod:`growop.optim`
    reads. Nothing else writes ``used``, ``live``, the masks, their records or the history.

    What a member provides: its row Parameters (``_row_params()``), how a fresh row of them
    is drawn (``_draw_rows``, through :func:`growop.rows.init.new_rows`), its ``active``
    buffer, its ``capacity``, and the name of its count of slots in use (``_used_name``,
    for error messages).
    """

    def __init__(self, layer: GrowRows, used: int) -> None:
        self.members: list[GrowRows] = [layer]
        # (source, target, name): target.<name> is source.<name>, restored after loads.
        self.ties: list[tuple[GrowRows, GrowRows, str]] = []
        self.used = used
        self.live = used
        self.view = RowSetView(self)
        self.history = RowHistory(self.capacity)
        self._note_masks()
        optim.track(self)

    def __setstate__(self, state: dict) -> None:
        # Unpickled or deep-copied: the copy's rows have their own history from here on.
        self.__dict__.update(state)
        if "view" not in state:  # pickled by a version that kept no view
            self.view = RowSetView(self)
        history = state.get("history")
        self.history = history.renewed() if history is not None else RowHistory(self.capacity)
        optim.track(self)

    # ------------------------------------------------------------------ reading

    @property
    def capacity(self) -> int:
        return self.members[0].capacity

    @property
    def mask(self) -> Tensor:
        return self.members[0].active

    @property
    def params(self) -> list[Tensor]:
        """Every member's row Parameters, each once (a tied Parameter counts once)."""
        seen: dict[int, Tensor] = {}
        for member in self.members:
            for param in member._row_params().values():
                if param is not None:
                    seen.setdefault(id(param), param)
        return list(seen.values())

    def live_count_for(self, layer: GrowRows, active: Tensor) -> int | None:
        """The live count where it describes ``active``, the mask ``layer``'s forward is
        given; forwards check its common case themselves (the mask growop last wrote, as
        it left it, which costs no sync) and ask here otherwise. The layer's own mask
        written by something else (an EMA update copying buffers): the counts follow it
        (:meth:`_adopt_mask`). Another tensor in its place, swapped in for one call
        (``functional_call``, ``stack_module_state`` under ``vmap``): no count (None)."""
        seen, version = layer._mask_record
        if active is not seen:
            if seen is None and active is layer.active:
                self._adopt_mask(layer)  # unpickled from a version that kept no record
                return self.live
            return None
        if version is not None and active._version != version:
            self._adopt_mask(layer)
        return self.live

    # ------------------------------------------------------------------ operations

    @_outside_inference_mode
    def grow(self, k: int, init: RowInit, optimizer, allow_reallocation: bool) -> range:
        k = checked_int(k, "grow: k", 1)
        start, stop = self.used, self.used + k
        params = self._checked_growth(stop, optimizer, allow_reallocation)
        # Within capacity, a built-in init writes straight into the unused slots
        # [start, stop), allocating nothing; otherwise every member's rows are made aside
        # first. Either way the optimizers are brought up to date before any row is written
        # (the slots are unused: nothing reads them) and the mask and counts change last,
        # so an error leaves the rows as they were (past capacity, the storage grown, as
        # reserve grows it).
        in_place = (
            stop <= self.capacity
            and isinstance(init, str)
            and not any(distributed.is_sharded(p) for p in params)
        )
        if in_place:
            check_builtin_init(init, self.live)  # so that the write cannot fail
        # A tied Parameter takes the rows of the first member that holds it (the source). A
        # member sharing some of its Parameters with an earlier one (a tied head with a bias
        # of its own) makes its rows aside even within capacity, and only its own are
        # written: its draw would overwrite the source's rows, and it stays the draw it
        # makes past capacity.
        writers: list[GrowRows] = []  # members whose rows go straight into their slots
        aside: dict[int, tuple[Tensor, Tensor]] = {}  # rows made aside, by Parameter id
        claimed: set[int] = set()  # Parameters whose rows a member makes
        for member in self.members:
            row_params = {n: p for n, p in member._row_params().items() if p is not None}
            if all(id(p) in claimed for p in row_params.values()):
                continue  # a tied member: its source makes the rows of every Parameter it holds
            if in_place and not any(id(p) in claimed for p in row_params.values()):
                writers.append(member)
            else:
                for name, rows in new_rows(member, k, init, start, self.live, False).items():
                    param = row_params.get(name)
                    if param is not None and rows is not None and id(param) not in claimed:
                        aside[id(param)] = (param, rows)
            claimed.update(id(p) for p in row_params.values())
        if stop > self.capacity:
            self.reallocate(grown_capacity(self.capacity, stop))

        def write_rows() -> None:
            for member in writers:
                new_rows(member, k, init, start, self.live, True)
            with torch.no_grad():
                for param, rows in aside.values():
                    distributed.write_rows_(param, start, rows)

        self._restart(slice(start, stop), optimizer, write_rows)
        self._write_mask(slice(start, stop), True)
        self._set_counts(stop, self.live + k)
        return range(start, stop)

    @_outside_inference_mode
    def reserve(self, capacity: int, optimizer, allow_reallocation: bool) -> None:
        capacity = checked_int(capacity, "reserve: capacity", 1)
        self._checked_growth(capacity, optimizer, allow_reallocation)
        if capacity > self.capacity:
            self.reallocate(capacity)
            optim.rows_changed(self, optimizer)

    @_outside_inference_mode
    def set_live(self, rows: RowIndices, live: bool, optimizer, method: str) -> None:
        """Masks (``live=False``) or unmasks existing rows. Unmasked rows start fresh in
        ``optimizer`` and in every optimizer holding them (zero state, their own step
        count); masked rows' state is zeroed in ``optimizer`` only. Live rows given to
        reactivate are left alone, their optimizer state included; dead rows given to
        deactivate keep their mask, and their state in ``optimizer`` is zeroed all the same
        (so a row masked without ``optimizer=`` can have its moments cleared later)."""
        index = self._row_index(rows, method)
        params = self.params
        distributed.check_not_flattened(params)
        optim.check_holds(optimizer, params)
        if not live and optimizer is not None:
            optim.reset_rows(optimizer, params, index)
        if not self.mask.is_meta:  # on meta nothing is known of the rows: all are taken
            index = index[self.mask[index] != live]
            if index.numel() == 0:
                return
        if live:
            self._restart(index, optimizer)
        self._write_mask(index, live)
        self._set_counts(self.used, self._count_live())

    @_outside_inference_mode
    def resize_optimizer_state(self, optimizer) -> None:
        optim.check_holds(optimizer, self.params)
        optim.fit_given(self, optimizer)

    def reallocate(self, capacity: int) -> None:
        """Grows every member's storage to ``capacity`` rows, keeping the Parameter objects
        and the old rows bit-exact.

        The new tensors are all made before any is installed, so running out of memory
        leaves the layers as they were.
        """
        old = self.capacity
        params = self.params
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
        self._note_masks()
        self.history.reallocated_to(capacity)

    def reset_mask(self) -> None:
        """Every slot in use live again, as a freshly built layer's."""
        with torch.no_grad():
            for member in self.members:
                member.active.copy_(torch.arange(self.capacity, device=member.active.device) < self.used)
        self._set_counts(self.used, self.used)

    def keep_mask(self, old: Tensor | None, new: Tensor | None) -> None:
        """After a device move made ``new`` a member's mask in place of ``old``: the mask
        keeps its values (``to_empty`` leaves a new buffer uninitialised, and the mask holds
        the layer's structure); coming from meta, where it holds none, every slot in use is
        live, as the constructor makes it."""
        if new is None or old is None or new is old or new.is_meta:
            return
        if old.is_meta:
            self.reset_mask()
            return
        with torch.no_grad():
            new.copy_(old)
        self._note_masks()

    def loaded(self, layer: GrowRows, used: int) -> None:
        """After ``layer`` loaded a checkpoint with ``used`` slots in use: the ties hold
        again, the other members take its freshly loaded mask, and the counts follow it."""
        for source, target, name in self.ties:
            if getattr(target, name) is not getattr(source, name):
                setattr(target, name, getattr(source, name))  # assign=True loads replace
        for member in self.members:
            if member is not layer and not member.active.is_meta and not layer.active.is_meta:
                if member.active.shape == layer.active.shape:
                    with torch.no_grad():
                        member.active.copy_(layer.active)
        live = used if layer.active.is_meta else int(layer.active.sum())
        self._set_counts(used, live)
        self.history.loaded()

    def fitted_from(self, rows: int) -> None:
        """A checkpoint of ``rows`` rows is being fitted to this set's capacity: optimizer
        state saved beside it has that row count, and will be fitted too."""
        self.history.fitted_from(rows)

    # ------------------------------------------------------------------ joining

    def join(self, other: RowSet) -> None:
        """Makes ``other``'s members (and ties) members of this set."""
        if other is self:
            return
        self.members.extend(m for m in other.members if m not in self.members)
        self.ties.extend(other.ties)
        for member in other.members:
            member._rows = self
        # One history for the joined rows: each set's events meant its own rows.
        history = self.history.renewed()
        history.row_counts |= other.history.row_counts
        history.reallocated |= other.history.reallocated
        self.history = history
        optim.joined(self, other)

    def tie(self, source: GrowRows, target: GrowRows, name: str) -> None:
        """Makes ``target.<name>`` the very tensor ``source.<name>`` is, kept so across loads."""
        setattr(target, name, getattr(source, name))
        self.ties.append((source, target, name))

    # ------------------------------------------------------------------ internals

    def _restart(self, rows: slice | Tensor, optimizer, write_rows=None) -> None:
        """Records that ``rows`` start fresh, brings the optimizers up to date with it, then
        calls ``write_rows`` (a grow's new values), all before the caller makes the rows
        live. If any of it raises, the record is withdrawn: the rows, not made live, start
        nowhere later."""
        self.history.restarted(rows)
        try:
            optim.rows_changed(self, optimizer)
            if write_rows is not None:
                write_rows()
        except BaseException:
            self.history.withdraw_last()
            raise

    def _set_counts(self, used: int, live: int) -> None:
        self.used, self.live = used, live
        self._note_masks()

    def _note_masks(self) -> None:
        """Records each member's mask, and its version, after growop wrote it: a later
        version of the same tensor means something else wrote it (see :meth:`_adopt_mask`);
        another tensor in its place was swapped in for a call (``functional_call``)."""
        for member in self.members:
            member._mask_record = (member.active, mask_version(member.active))

    def _adopt_mask(self, layer: GrowRows) -> None:
        """Counts (and the other members' masks) from ``layer``'s mask, which something
        other than growop wrote: an EMA or ``AveragedModel`` update copies buffers, not the
        slots in use. ``live`` is exact; ``used`` becomes at least one past the last live
        row (slots past it that are dead cannot be told from slots never grown). Reads the
        mask on the host: a device sync, once per such write."""
        mask = layer.active
        if mask.is_meta:
            self._note_masks()
            return
        rows = mask.nonzero()
        last = int(rows[-1]) + 1 if rows.numel() else 0
        with torch.no_grad():
            for other in self.members:
                if other is not layer and other.active.shape == mask.shape:
                    other.active.copy_(mask)
        self._set_counts(max(self.used, last), rows.numel())

    def _write_mask(self, index, value: bool) -> None:
        with torch.no_grad():
            for member in self.members:
                if isinstance(index, slice):  # a grow: fill the view, no scalar tensor made
                    member.active[index].fill_(value)
                else:
                    member.active[index] = value

    def _checked_growth(self, rows_needed: int, optimizer, allow_reallocation: bool) -> list[Tensor]:
        """The members' Parameters, after the checks any growth to ``rows_needed`` rows in
        use passes (storage grown past capacity included); raises before anything changes."""
        params = self.params
        distributed.check_not_flattened(params)
        optim.check_holds(optimizer, params)
        if rows_needed > self.capacity:
            reason = distributed.reallocation_error(
                self.capacity, rows_needed, params, bool(allow_reallocation)
            )
            if reason is not None:
                raise RuntimeError(reason)
        return params

    def _count_live(self) -> int:
        return self.live if self.mask.is_meta else int(self.mask.sum())

    def _row_index(self, rows: RowIndices, method: str) -> Tensor:
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
                f"[0, {self.members[0]._used_name}={self.used})"
            )
        return index.to(self.mask.device)


class RowSetView:
    """A read-only view of a layer's rows, shared with the layers it grows together with:
    ``layer.rows``. Layers joined by ``growop.grow_together`` or ``growop.tie`` have the
    same view (``a.rows is b.rows``).

    Attributes:
        used: slots in use (rows ``< used`` have been grown): each member's
            ``out_features`` / ``num_embeddings``.
        live: live rows, ``int(active.sum())``, kept on the host: reading it never waits
            for a device.
        capacity: rows allocated.
        params: every member's row Parameters, each once (a tied Parameter counts once).
    """

    def __init__(self, row_set: RowSet) -> None:
        self._row_set = row_set

    @property
    def used(self) -> int:
        return self._row_set.used

    @property
    def live(self) -> int:
        return self._row_set.live

    @property
    def capacity(self) -> int:
        return self._row_set.capacity

    @property
    def params(self) -> tuple[Tensor, ...]:
        return tuple(self._row_set.params)

    def __repr__(self) -> str:
        layers = len(self._row_set.members)
        return (
            f"{type(self).__name__}(used={self.used}, live={self.live}, capacity={self.capacity}, "
            f"layers={layers})"
        )


def _other_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype != torch.float64 else torch.float32
