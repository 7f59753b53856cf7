"""Checkpoints of growable layers: the extra state, and state dicts across capacities.

A layer's state dict holds tensors only: its row Parameters, the mask ``active`` and
``_extra_state``, ``[slots in use, seed of init="default" rows]``, so that safetensors,
EMA loops and clone-all-values code take it as it is. A checkpoint loads into a layer of
another capacity when its slots in use fit (:func:`fit_state_dict`), and so does a stock
``nn.Linear`` / ``nn.Embedding`` checkpoint (every row live; one of exactly ``capacity``
rows only into a layer with every slot live, since it cannot be told from the layer's own
rows saved without the mask) and one written by growop 0.1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from growop.rows.init import new_seed

if TYPE_CHECKING:
    from growop.rows.layer import GrowRows


def extra_state(layer: GrowRows) -> Tensor:
    """``layer``'s ``_extra_state``: ``[slots in use, seed of init="default" rows]``."""
    seed = 0 if layer._init_seed.is_meta else int(layer._init_seed)
    return torch.tensor([layer.rows.used, seed], dtype=torch.int64)


def load_extra_state(layer: GrowRows, state: Any) -> int:
    """Takes the seed from an ``_extra_state`` that ``load_state_dict`` gives ``layer``
    (after its Parameters and buffers, the mask included); returns the slots in use."""
    used, seed = read_extra_state(state)
    if used > layer.capacity:
        raise ValueError(
            f"{type(layer).__name__}: checkpoint has {used} slots in use, "
            f"more than this layer's capacity {layer.capacity}"
        )
    if seed is None and layer._init_seed.is_meta:  # built on meta, a stock checkpoint
        seed = new_seed()
    if layer._init_seed.is_meta:
        layer._init_seed = torch.tensor(seed, dtype=torch.int64, device=layer.weight.device)
    elif seed is not None:
        with torch.no_grad():
            layer._init_seed.fill_(seed)
    return used


def read_extra_state(state: Any) -> tuple[int, int | None]:
    """(slots in use, seed or None) from a tensor ``_extra_state`` or an older dict one."""
    if isinstance(state, dict):  # written by growop 0.1
        return int(state["out_features"]), None
    values = torch.as_tensor(state).reshape(-1).tolist()
    return int(values[0]), (int(values[1]) if len(values) > 1 else None)


def fit_state_dict(layer: GrowRows, state_dict: dict, prefix: str, error_msgs: list) -> bool:
    """Makes ``layer``'s entries of ``state_dict`` fit its capacity, before they load.

    Per-row tensors of another row count are fitted (:func:`_fit_rows`); a stock layer's
    checkpoint (no mask, no extra state) gets a mask with every row live, unless it has
    ``capacity`` rows while the layer has masked or unused slots: then it may as well be
    this layer's rows without their mask, so the tensors load as they are, the layer keeps
    its mask and counts, and ``active`` is reported missing. Returns False,
    with the errors recorded, where the checkpoint cannot load (a row of another size,
    more slots in use than the capacity): then nothing of the layer is loaded, so a failed
    load leaves it as it was.
    """
    # Written before per-row step counts moved into the optimizer's state: dropped, so
    # a strict load still accepts the checkpoint.
    state_dict.pop(prefix + "row_start_step", None)
    capacity = layer.capacity
    saved_rows, mismatched = {}, []
    for name, own in _per_row_tensors(layer).items():
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
        if _may_be_growop_rows(layer, saved_rows):
            # This layer's own rows without its mask (a state dict of named_parameters(),
            # as EMA code and "save the trainable parameters" write) reads the same as a
            # stock checkpoint of `capacity` outputs; taking the latter would bring masked
            # and never-grown rows to life. The tensors load, the mask and counts stay,
            # and the missing mask is reported (a strict load raises, naming it).
            return True
        # A stock layer's checkpoint (nn.Linear, nn.Embedding): every row is live.
        rows, device = saved_rows[first], state_dict[prefix + first].device
        state_dict[active_key] = torch.ones(rows, dtype=torch.bool, device=device)
        state_dict[extra_key] = torch.tensor([rows], dtype=torch.int64)
        saved_rows["active"] = rows
    extra = state_dict.get(extra_key)
    used = read_extra_state(extra)[0] if extra is not None else None
    if used is not None and used > capacity:
        error_msgs.append(
            f"{type(layer).__name__} {prefix or '(root)'}: checkpoint has {used} slots "
            f"in use, which does not fit this layer's capacity {capacity}"
        )
        return False
    if any(rows != capacity for rows in saved_rows.values()):
        _fit_rows(layer, state_dict, prefix, saved_rows)
        layer._rows.fitted_from(saved_rows[first])
    return True


def _may_be_growop_rows(layer: GrowRows, saved_rows: dict[str, int]) -> bool:
    """Whether mask-less tensors of ``saved_rows`` rows could be this layer's own rows
    rather than a stock layer's: they have ``capacity`` rows, and the layer is not in the
    one state where both readings agree (every one of its ``capacity`` rows live). A layer
    on the meta device has no rows of its own yet, so the tensors are a stock layer's."""
    capacity = layer.capacity
    if layer.active.is_meta or any(rows != capacity for rows in saved_rows.values()):
        return False
    return not (layer.rows.used == capacity and layer.rows.live == capacity)


def _per_row_tensors(layer: GrowRows) -> dict[str, Tensor]:
    """The state-dict entries with one slice per row: the row Parameters and the mask."""
    tensors = {name: p for name, p in layer._row_params().items() if p is not None}
    tensors["active"] = layer.active
    return tensors


def _fit_rows(layer: GrowRows, state_dict: dict, prefix: str, saved_rows: dict[str, int]) -> None:
    """Rewrites a checkpoint's per-row tensors (``saved_rows``: name -> rows) to
    ``layer``'s capacity, in ``state_dict``.

    The first ``min(rows, capacity)`` rows come from the checkpoint; rows past the
    checkpoint keep the layer's own values (zero if it has none yet, on meta) and are
    not live.
    """
    capacity = layer.capacity
    current = _per_row_tensors(layer)
    for name, rows in saved_rows.items():
        own, key = current[name], prefix + name
        if rows == capacity:
            continue
        saved = state_dict[key]
        keep = min(rows, capacity)
        fitted = saved.new_zeros((capacity, *saved.shape[1:]))
        if name != "active" and not own.is_meta:
            fitted.copy_(own.detach())
        fitted[:keep].copy_(saved[:keep])
        state_dict[key] = fitted
