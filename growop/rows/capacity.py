"""How many rows a layer allocates: the default capacity, and the capacity past it."""

from __future__ import annotations

import math
import operator
from typing import Any

# Past capacity, storage grows to at least this multiple of the old capacity, so a
# run of single-row grows reallocates O(log n) times.
GROWTH_FACTOR = 1.5


def default_capacity(out_features: int) -> int:
    """Rows allocated when ``capacity`` is not given: 25% headroom, and at least 8 rows."""
    return out_features + max(8, math.ceil(out_features / 4))


def grown_capacity(capacity: int, needed: int) -> int:
    """The capacity that storage of ``capacity`` rows grows to when ``needed`` rows do not
    fit: ``max(default_capacity(needed), ceil(1.5 x capacity))``, which leaves room for the
    rows still to come."""
    return max(default_capacity(needed), math.ceil(capacity * GROWTH_FACTOR))


def resolved_capacity(capacity: int | None, used: int, owner: str, used_name: str) -> int:
    """``capacity`` checked to hold the ``used`` rows, or :func:`default_capacity` of them."""
    if capacity is None:
        return default_capacity(used)
    capacity = checked_int(capacity, f"{owner}: capacity", 0)
    if capacity < used:
        raise ValueError(f"{owner}: capacity ({capacity}) must be >= {used_name} ({used})")
    return capacity


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
