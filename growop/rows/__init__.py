"""Capacity rows: the one implementation behind every growable layer.

A growable layer allocates ``capacity`` rows in each of its row Parameters (a linear layer's
weight and bias, an embedding's weight) and keeps a bool mask ``active`` of the live rows.

- :mod:`growop.rows.rowset`: :class:`RowSet`, the one owner of row state (slots in use,
  live count, masks) and of the operations that change it, shared by the layers that grow
  together; :class:`RowSetView`, its read-only view, ``layer.rows``.
- :mod:`growop.rows.layer`: :class:`GrowRows`, the layers' base class: the public
  ``grow`` / ``reserve`` / ``deactivate`` / ``reactivate`` API and the ``nn.Module`` hooks
  (device moves, ``reset_parameters``, checkpoints), each a call into the modules here.
- :mod:`growop.rows.history`: :class:`RowHistory`, a row set's past as optimizers need
  it (rows started at each event, row counts had).
- :mod:`growop.rows.shared`: :func:`grow_together` and :func:`tie`, which join row sets.
- :mod:`growop.rows.init`: the values of new rows (``init=``) and their seeds.
- :mod:`growop.rows.checkpoint`: the extra state, and state dicts across capacities.
- :mod:`growop.rows.capacity`: default capacity, and the capacity past it
  (:func:`grown_capacity`).

A layer adds only what is its own: its row Parameters, how a fresh row of them is drawn,
and its forward. Every optimizer interaction goes through :mod:`growop.optim`.
"""

from growop.rows.capacity import (
    GROWTH_FACTOR,
    checked_int,
    default_capacity,
    grown_capacity,
    resolved_capacity,
)
from growop.rows.init import RowInit
from growop.rows.layer import GrowRows
# RowSet here too: layers pickled before growop.rows was a package name it so.
from growop.rows.rowset import RowIndices, RowSet, RowSetView
from growop.rows.shared import grow_together, tie

__all__ = [
    "GROWTH_FACTOR",
    "GrowRows",
    "RowIndices",
    "RowInit",
    "RowSet",
    "RowSetView",
    "checked_int",
    "default_capacity",
    "grow_together",
    "grown_capacity",
    "resolved_capacity",
    "tie",
]
