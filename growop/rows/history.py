"""``RowHistory``: what a row set's past tells an optimizer that was not there.

torch keeps no list of optimizers, so a grow or ``reactivate`` made without ``optimizer=``
cannot reach an optimizer that growop has not met yet: one resumed from a state dict and
not stepped since, or one not built yet. Such an optimizer catches up at its next step
(:mod:`growop.optim`), and this record is what it catches up from:

- which rows (re)started at which event, numbered from 1. An optimizer's per-row state
  carries the number of the last event it has taken in (:meth:`seen_by`), and the rows
  started after it are the ones to zero and to give their own step count;
- which row counts the layer's Parameters have had (``row_counts``: its capacities, and
  the row count of each checkpoint fitted into it), so that per-row optimizer state of
  one of them is fitted to the Parameters (padded or cut) rather than refused.

The event numbers are valid within one history, named by a random ``token``: a state dict
saved after event 5 and loaded into another optimizer of the same process has taken in
events 1..5. A history starts afresh (new token, no started rows) when its layers are
copied or unpickled and when row sets join; a checkpoint loaded into the layers clears
the started rows (the optimizer state saved beside it belongs with it) and keeps the rest.
"""

from __future__ import annotations

import bisect
import secrets

from torch import Tensor


class RowHistory:
    """The row starts and row counts of one row set (see the module docstring).

    Attributes:
        token: names this history; event numbers from another one mean nothing here.
        events: the number of the last event (0: none yet).
        row_counts: every row count the Parameters have had or were fitted from.
        reallocated: whether the Parameters were ever reallocated (a backward through a
            forward made before that would hand the optimizer a gradient of the old size).
    """

    def __init__(self, capacity: int) -> None:
        self.token = secrets.randbits(62)  # not random's: a seeded RNG would repeat it
        self.events = 0
        self.capacity = capacity
        self.row_counts = {capacity}
        self.reallocated = False
        # The rows started at each event (a slice, which a grow within capacity records
        # allocating nothing, or an index tensor), and beside them the event numbers, in
        # increasing order, which started_since bisects (bisect's key= is Python 3.10+).
        self._started: list[slice | Tensor] = []
        self._started_at: list[int] = []

    def restarted(self, rows: slice | Tensor) -> None:
        """Records an event: ``rows`` (a slice or an index tensor) start fresh now."""
        self.events += 1
        self._started.append(rows.cpu() if isinstance(rows, Tensor) else rows)
        self._started_at.append(self.events)

    def withdraw_last(self) -> None:
        """Forgets the rows of the last event, whose change did not happen (bringing the
        optimizers up to date raised). Its number stays taken: an optimizer may already
        have recorded it as taken in, and a later event must not pass for it."""
        self._started.pop()
        self._started_at.pop()

    def reallocated_to(self, capacity: int) -> None:
        self.capacity = capacity
        self.row_counts.add(capacity)
        self.reallocated = True

    def fitted_from(self, rows: int) -> None:
        """A checkpoint of ``rows`` rows was fitted to the Parameters."""
        self.row_counts.add(rows)

    def loaded(self) -> None:
        """A checkpoint was loaded: its rows are as it has them, and optimizer state loaded
        beside it belongs with it, so no earlier start applies to it."""
        self._started, self._started_at = [], []

    def renewed(self) -> RowHistory:
        """A new history for a copy of the layers, or for row sets that join: the same row
        counts, no events (state saved by an optimizer of the old history is taken as it is)."""
        renewed = RowHistory(self.capacity)
        renewed.row_counts = set(self.row_counts)
        renewed.reallocated = self.reallocated
        return renewed

    # ------------------------------------------------------------------ for optimizers

    def marker(self) -> tuple[int, int]:
        """What an optimizer's state records once it has taken in every event so far."""
        return (self.token, self.events)

    def seen_by(self, marker) -> int:
        """The last event of this history that state carrying ``marker`` has taken in: 0 for
        none, or for a marker of another history (state saved before this one began)."""
        if isinstance(marker, (tuple, list)) and len(marker) == 2 and marker[0] == self.token:
            return int(marker[1])
        return 0

    def started_since(self, event: int) -> list[slice | Tensor]:
        """The rows started after ``event``: slices and index tensors (CPU), which may overlap."""
        return self._started[bisect.bisect_right(self._started_at, event) :]
