"""``GrowRows``: the base class of growop's layers, glue between ``nn.Module`` and row state.

It registers the mask and seed buffers, gives the public API (``grow``, ``reserve``,
``deactivate``, ``reactivate``, ``resize_optimizer_state``, and the read-only ``capacity``,
``live_count`` and ``rows``), and hooks row state into what ``nn.Module`` does to every
module: device moves (``_apply``), ``reset_parameters`` and checkpoints. The work is done
by the layer's :class:`~growop.rows.rowset.RowSet`, :mod:`growop.rows.init` and
:mod:`growop.rows.checkpoint`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor, nn

from growop.rows import checkpoint
from growop.rows import init as row_init
from growop.rows.init import RowInit
from growop.rows.rowset import RowIndices, RowSet, RowSetView


class GrowRows(nn.Module):
    """Base of growop's layers: ``capacity`` rows, their mask, and growing them.

    Subclasses call :meth:`_init_rows` in ``__init__``, implement :meth:`_row_params` and
    :meth:`_draw_rows`, and name in ``_used_name`` their count of slots in use
    (``out_features``, ``num_embeddings``): a property reading ``self._rows.used``, whose
    setter is :meth:`_assign_used`. Row state lives in the layer's :class:`RowSet`,
    ``_rows``, which alone writes it (``_mask_record`` included).
    """

    _used_name = "out_features"
    # The RowSet's record of this layer's mask: (tensor, version) as growop last left it.
    # The class default stands for a layer unpickled from a version that kept no record.
    _mask_record: tuple[Tensor | None, int | None] = (None, -1)

    active: Tensor
    _rows: RowSet

    def _init_rows(self, used: int, capacity: int, device) -> None:
        self.register_buffer("active", torch.arange(capacity, device=device) < used)
        # Seeds grow(init="default"): a buffer, so DDP broadcasts rank 0's at wrap time and
        # every rank draws the same new rows whatever its own RNG state. Saved in
        # _extra_state, so a resumed run grows the same rows.
        self.register_buffer(
            "_init_seed", torch.zeros((), dtype=torch.int64, device=device), persistent=False
        )
        self._rows = RowSet(self, used)

    # ------------------------------------------------------------------ for subclasses

    def _row_params(self) -> dict[str, Tensor | None]:
        """This layer's row Parameters by name, in ``init`` tuple order (``None`` if absent)."""
        raise NotImplementedError

    def _draw_rows(self, rows: dict[str, Tensor], generator: torch.Generator | None) -> None:
        """Fills, in place, fresh rows for each of this layer's row Parameters."""
        raise NotImplementedError

    def _assign_used(self, value: int) -> None:
        """What assigning ``out_features`` / ``num_embeddings`` does: those read the row
        set's ``used``, which changes only as rows grow. Assigning the value it has is
        allowed (code written for the stock layer copies attributes across modules); any
        other raises, naming the fix."""
        if value != self._rows.used:
            raise AttributeError(
                f"{type(self).__name__}.{self._used_name} is the number of row slots in use "
                f"({self._rows.used}) and changes only as rows are grown: call grow(k) to add "
                "rows, deactivate(rows) to mask some. Nothing was changed."
            )

    # ------------------------------------------------------------------ public

    @property
    def capacity(self) -> int:
        """Rows allocated."""
        return self.weight.shape[0]

    @property
    def live_count(self) -> int:
        """Live rows, ``int(active.sum())``, kept on the host: reading it never waits for a
        device. After a write to ``active`` by something other than growop (an EMA update),
        it follows the mask from the layer's next forward."""
        return self._rows.live

    @property
    def rows(self) -> RowSetView:
        """A read-only view of this layer's rows (``used``, ``live``, ``capacity``,
        ``params``), the same object for every layer it grows together with."""
        return self._rows.view

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
        capacity the storage grows to ``max(default_capacity(n), 1.5 x capacity)`` rows
        (:func:`growop.rows.grown_capacity`); the Parameter objects stay the same, old rows
        bit-exact, and the per-row state of every optimizer holding them grows with them.

        ``optimizer=`` is optional: the new rows start fresh (zero state, and for Adam and
        AdamW their own step count) in every optimizer that holds this layer's Parameters,
        found by growop (see :mod:`growop.optim`): at once in those it has met (passed to a
        growop call, or stepped since they were built or loaded), at their next step in any
        other (one resumed from a state dict and not stepped yet). Old rows' state is
        untouched.

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
            optimizer: an optimizer that trains this layer, acted on whatever growop knows
                of it (its per-row state is fitted to the Parameters whatever its row
                count). Optional: growop finds the optimizers holding the layer.
            allow_reallocation: permit growing past capacity while ``torch.distributed`` runs
                more than one process. Only for a model that is not wrapped in
                ``DistributedDataParallel``, or that you will wrap again after growing: DDP's
                gradient buckets do not follow reallocated parameters.

        After an error nothing has changed (except that an error while bringing an
        optimizer's state up to date, past capacity, leaves the storage grown, as
        :meth:`reserve` grows it).
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
        the Parameter objects stay the same, old rows bit-exact, no row becomes live, and the
        per-row state of the optimizers holding them grows with them (as for ``grow``,
        ``optimizer=`` is optional). Layers joined by
        :func:`growop.grow_together` or :func:`growop.tie` are reallocated together. The
        checks are ``grow``'s: under ``torch.distributed`` with more than one process it
        raises unless ``allow_reallocation=True``. After an error nothing has changed.
        """
        self._rows.reserve(capacity, optimizer, allow_reallocation)

    def deactivate(self, rows: RowIndices, *, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Masks existing rows (slots in use): their outputs become masked.

        Weights are kept and positions never shift. With ``optimizer=`` the rows' state in
        that optimizer is zeroed, so momentum stops moving the masked rows; decay that does
        not depend on the gradient (AdamW's decoupled weight decay) still applies to them,
        as it does to any parameter. Without it no optimizer state changes: the rows start
        fresh when they are reactivated. Rows already masked stay masked; with
        ``optimizer=`` their state is zeroed too (how to clear a row masked without it).
        """
        self._rows.set_live(rows, False, optimizer, "deactivate")

    def reactivate(self, rows: RowIndices, *, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Unmasks rows (slots in use) with the weights they kept.

        Their state starts fresh (zero, with a fresh step count) in every optimizer holding
        them, found as for :meth:`grow`; ``optimizer=`` is optional. Rows already live are
        left as they are: their optimizer state is kept.
        """
        self._rows.set_live(rows, True, optimizer, "reactivate")

    def resize_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Brings ``optimizer``'s state for this layer up to date now, whatever its row count.

        Not needed in general: state of a row count this layer has had (an earlier capacity,
        a checkpoint loaded into it) fits itself at the optimizer's next step. Needed for
        state of a row count the layer never had, which the step refuses: state tensors are
        padded with zeros (fresh state for rows past them) or cut to the capacity; the rows
        both sizes have keep their state. Rows grown or reactivated since the state last
        took them in start fresh, as at a grow.
        """
        self._rows.resize_optimizer_state(optimizer)

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"{type(self).__name__} does not support torch.jit.script: its rows are managed "
            "from Python. Use torch.jit.trace or torch.export, or script the plain layer "
            "that to_linear() / to_embedding() returns."
        )

    # ------------------------------------------------------------------ nn.Module hooks

    def _apply(self, fn, recurse=True):
        # Every .to(), .cuda(), .half() and to_empty() comes through here. to_empty (and
        # skip_init, which builds on meta and calls it) gives every buffer uninitialised
        # storage: right for values that get loaded or initialised next, wrong for the mask
        # and seed, which hold this layer's structure (code written for nn.Linear copies the
        # weights in and goes on). So each keeps its values across any move.
        old_active, old_seed = self._buffers.get("active"), self._buffers.get("_init_seed")
        module = super()._apply(fn, recurse)
        self._rows.keep_mask(old_active, self._buffers.get("active"))
        row_init.keep_seed(old_seed, self._buffers.get("_init_seed"))
        return module

    def _reset_rows(self) -> None:
        """The mask and seed as the constructor leaves them (for ``reset_parameters``).

        Every slot in use is live again, and a new seed draws later ``grow(init="default")``
        rows. On meta nothing is computed, as in ``nn.Linear``.
        """
        if self.active.is_meta:
            return
        row_init.reseed_(self._init_seed)
        self._rows.reset_mask()

    def get_extra_state(self) -> Tensor:
        return checkpoint.extra_state(self)

    def set_extra_state(self, state: Any) -> None:
        # Called by load_state_dict after the parameters and buffers, the mask included.
        self._rows.loaded(self, checkpoint.load_extra_state(self, state))

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
            if checkpoint.fit_state_dict(self, state_dict, prefix, error_msgs):
                super()._load_from_state_dict(
                    state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
                )
        finally:
            self._load_state_dict_pre_hooks = hooks
