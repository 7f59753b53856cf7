"""Layers that share one row set: :func:`grow_together` and :func:`tie`.

Joined layers share one :class:`~growop.rows.rowset.RowSet`, so one call on any of them
acts on all: the same new rows, the same mask, one reallocation, and the optimizer's state
handled once per Parameter (a tied Parameter counts once).
"""

from __future__ import annotations

import torch

from growop.rows.layer import GrowRows
from growop.rows.rowset import RowSet


def grow_together(*layers: GrowRows) -> None:
    """Makes ``layers`` grow as one: one mask, one live count, the same new rows.

    Each layer keeps its own Parameters and initialises its own new rows. Afterwards
    ``grow``, ``deactivate``, ``reactivate``, reallocation past capacity and optimizer
    state handling called on any of them act on all. The layers must have the same
    capacity, the same slots in use and the same live rows; otherwise this raises and
    changes nothing.
    """
    _joined(layers, "grow_together")


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
    _joined((source, target), "tie").tie(source, target, "weight")


def _joined(layers: tuple[GrowRows, ...], what: str) -> RowSet:
    """One RowSet for ``layers`` (and every layer already sharing rows with them), after
    checking that they can share one; raises before anything changes."""
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
        if layer.rows.used != first.rows.used:
            raise ValueError(
                f"{what}: slots in use differ ({first.rows.used} and {layer.rows.used}); "
                "the layers must have grown to the same size"
            )
        if layer.active.device != first.active.device or (
            layer.live_count != first.live_count
            or not (first.active.is_meta or torch.equal(layer.active, first.active))
        ):
            raise ValueError(f"{what}: the layers' live rows differ; they must have the same mask")
    rows = first._rows
    for layer in layers[1:]:
        rows.join(layer._rows)
    return rows
