"""The values of new rows: ``grow``'s ``init=`` policies, and the seeds of ``"default"`` rows.

A layer's new rows are made before anything changes, so that a grow that fails leaves the
layer as it was; within capacity a built-in policy writes them straight into the unused
slots instead, allocating nothing. ``init="default"`` rows are drawn from a generator
seeded by the layer's ``_init_seed`` buffer and the first new row: the same on every
process, whatever the global RNG state when ``grow`` is called.

What a layer adds is its own: its row Parameters by name (``layer._row_params()``) and how
a fresh row of them is drawn (``layer._draw_rows(rows, generator)``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Union

import torch
from torch import Tensor

from growop import distributed

if TYPE_CHECKING:
    from growop.rows.layer import GrowRows

RowInit = Union[str, Tensor, tuple, Callable[..., None]]

_UINT64 = (1 << 64) - 1


def new_rows(
    layer: GrowRows, k: int, init: RowInit, used: int, live: int, in_place: bool
) -> dict[str, Tensor | None]:
    """``layer``'s rows ``used .. used + k`` for ``init``, by row Parameter name.

    ``used`` and ``live`` are the counts before the grow. Plain tensors on the layer's
    device, the same on every process for the built-in inits (``"mean"`` gathers sharded
    parameters, a collective under FSDP2). With ``in_place`` (a built-in ``init``,
    unsharded Parameters, the rows within capacity) the rows are written straight into
    the unused slots of the Parameters, after every check, and those slots are returned.
    """
    params = layer._row_params()
    shapes = {name: (k, *p.shape[1:]) for name, p in params.items() if p is not None}
    likes = {name: distributed.local(p.detach()) for name, p in params.items() if p is not None}
    first = next(iter(params))
    with torch.no_grad():
        if isinstance(init, str):
            check_builtin_init(init, live)
            if in_place:
                slots = {n: (likes[n][used : used + k] if n in shapes else None) for n in params}
                return _builtin_rows_into(layer, init, slots, used, live)
            if init == "default":
                return _default_rows(layer, used, shapes, likes)
            if init == "zeros":
                return {n: (likes[n].new_zeros(shapes[n]) if n in shapes else None) for n in params}
            out = {}
            for name, p in params.items():
                if p is None:
                    out[name] = None
                    continue
                mean = live_mean(distributed.full(p.detach()), layer.active, used, live)
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


def check_builtin_init(init: str, live: int) -> None:
    """Raises unless ``init`` is a built-in policy that can make rows with ``live`` live rows."""
    if init not in ("default", "zeros", "mean"):
        raise ValueError(
            f"grow: unknown init {init!r}; expected 'default', 'zeros', 'mean', "
            "a tensor, a tuple or a callable"
        )
    if init == "mean" and live == 0:
        raise ValueError("grow(init='mean') needs at least one live row")


def _builtin_rows_into(
    layer: GrowRows, init: str, slots: dict[str, Tensor | None], used: int, live: int
) -> dict[str, Tensor | None]:
    """Writes ``init``'s rows into ``slots`` (views of unused rows) without allocating."""
    if init == "zeros":
        for slot in slots.values():
            if slot is not None:
                slot.zero_()
    elif init == "mean":
        params = layer._row_params()
        for name, slot in slots.items():
            if slot is not None:
                _live_mean_into(params[name].detach(), layer.active, used, live, slot[0])
                slot[1:].copy_(slot[0].expand_as(slot[1:]))
    elif layer.weight.is_meta:
        pass  # on meta nothing is computed
    elif layer.weight.device.type == "cpu":
        layer._draw_rows(slots, _row_generator(layer, used))
    else:  # drawn on the CPU, as everywhere, so the rows do not depend on the device
        shapes = {n: tuple(v.shape) for n, v in slots.items() if v is not None}
        likes = {n: v for n, v in slots.items() if v is not None}
        for name, rows in _default_rows(layer, used, shapes, likes).items():
            if rows is not None:
                slots[name].copy_(rows)
    return slots


def _default_rows(layer: GrowRows, used: int, shapes: dict, likes: dict) -> dict[str, Tensor | None]:
    """Rows from ``used`` on, drawn as the layer initialises, reproducibly.

    Drawn on the CPU from a generator seeded by the layer's seed and the first new row
    (both the same on every DDP rank), then moved: the rows do not depend on the global
    RNG at call time, nor on the device.
    """
    rows = {
        name: (torch.empty(shapes[name], dtype=likes[name].dtype) if name in shapes else None)
        for name in layer._row_params()
    }
    if not layer.weight.is_meta:
        layer._draw_rows(rows, _row_generator(layer, used))
    return {n: (r.to(likes[n].device) if r is not None else None) for n, r in rows.items()}


def live_mean(rows: Tensor, active: Tensor, used: int, live: int) -> Tensor:
    """The mean of the live rows in one pass, without copying them (a vocabulary-sized
    weight is gigabytes): the mask-weighted sum of the slots in use (a matrix-vector
    product, several times faster than a reduction over rows) over the live count."""
    weights = active[:used].to(device=rows.device, dtype=rows.dtype)
    return (weights @ rows[:used]) / live


def _live_mean_into(rows: Tensor, active: Tensor, used: int, live: int, out: Tensor) -> None:
    """``out[:] =`` the mean of the live rows. Every slot in use live (a vocabulary grown
    and never masked) is a plain mean with ``out=``, which allocates nothing; otherwise the
    mask-weighted :func:`live_mean`."""
    if live == used:
        torch.mean(rows[:used], 0, out=out)
    else:
        out.copy_(live_mean(rows, active, used, live))


def _rows_like(value: Tensor, shape: tuple, like: Tensor, what: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"grow: {what} must be a tensor, got {type(value).__name__}")
    if value.shape != shape and value.shape != shape[1:]:
        raise ValueError(f"grow: {what} must have shape {shape} or {shape[1:]}, got {tuple(value.shape)}")
    return value.detach().to(device=like.device, dtype=like.dtype).expand(shape).clone()


# ---------------------------------------------------------------------- seeds


def new_seed() -> int:
    """A seed for ``grow(init="default")`` rows, drawn from the global RNG (so
    ``torch.manual_seed`` before construction fixes those rows too)."""
    return int(torch.randint(torch.iinfo(torch.int64).max, (), dtype=torch.int64))


def reseed_(seed: Tensor) -> None:
    """Gives the seed buffer ``seed`` a new value (:func:`new_seed`), as a constructor does."""
    with torch.no_grad():
        seed.fill_(new_seed())


def keep_seed(old: Tensor | None, new: Tensor | None) -> None:
    """After a device move made ``new`` the seed buffer in place of ``old``: the seed keeps
    its value (``to_empty`` leaves a new buffer uninitialised); coming from meta, where it
    holds none, a new one is drawn, as the constructor draws it."""
    if new is None or old is None or new is old or new.is_meta:
        return
    if old.is_meta:
        reseed_(new)
        return
    with torch.no_grad():
        new.copy_(old)


def _row_generator(layer: GrowRows, first_row: int) -> torch.Generator:
    """The generator of ``init="default"`` rows grown from ``first_row``: seeded by the
    layer's seed and that row, both the same on every DDP rank."""
    return torch.Generator().manual_seed(_row_seed(int(layer._init_seed), first_row))


def _row_seed(layer_seed: int, first_row: int) -> int:
    """A seed for the rows grown from ``first_row``: SplitMix64 of the pair.

    Mixing (rather than adding) keeps the streams of neighbouring layers and grows apart.
    """
    z = (layer_seed + (first_row + 1) * 0x9E3779B97F4A7C15) & _UINT64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _UINT64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _UINT64
    return z ^ (z >> 31)
