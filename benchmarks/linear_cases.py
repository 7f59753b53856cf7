"""What the CPU and CUDA GrowLinear benchmarks share: layers with a given mask beside the
nn.Linear that holds their live rows, the providers timed against it, the table's cells,
the CSV rows, and grow latency.

``bench_linear_cpu.py`` and ``bench_linear_cuda.py`` import it from this folder (Python
puts a script's own folder on its path); timing, ratios and CSV writing are
:mod:`growop.measure`.

Providers, each against ``linear`` (nn.Linear holding only the live rows, the baseline of
every ratio), forward alone (no_grad) and forward+backward with fresh gradients (each
provider frees its own, as ``zero_grad()`` does in training):

- ``auto``, ``dense``, ``gather``: GrowLinear under each ``growop.strategy``;
- ``static``: the layer with ``static_shape=True`` (output as wide as the capacity) under
  auto, where the capacity has at most 25% headroom (with a prefix mask: a head whose
  every slot below ``out_features`` is live);
- ``kernels`` (CUDA only): gather without a live count, the live-row kernels that CUDA
  graphs and ``torch.compile`` run;
- ``slice``: F.linear on ``weight[:n]`` (prefix) or ``weight[idx]`` (fragmented) of the
  full-capacity Parameter: the plain approach without growop's kernels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import growop
from growop.measure import Ratio, Timing, csv_row, format_ratio, ratio, time_call, time_interleaved
from growop.reference import add_output_nodes

STRATEGIES = ("auto", "dense", "gather")
# The static provider is timed where the capacity is at most this many times the live rows.
STATIC_HEADROOM = 1.25


# ----------------------------------------------------------------------------- masks


def regular_mask(live: int, capacity: int, density: float) -> torch.Tensor:
    """``live`` rows spread evenly at ``density`` from row 0: every other row at 0.5, four
    rows of every five at 0.8."""
    span = round(live / density)
    rows = (torch.arange(live) / density).floor().long()
    assert rows[-1] < span <= capacity and rows.unique().numel() == live
    active = torch.zeros(capacity, dtype=torch.bool)
    active[rows] = True
    return active


def random_mask(live: int, capacity: int, generator: torch.Generator) -> torch.Tensor:
    """``live`` rows drawn at random from the first ``min(2 live, capacity)`` rows: 50% dense
    where the capacity allows, 80% at 1.25x."""
    rows = torch.randperm(min(2 * live, capacity), generator=generator)[:live]
    active = torch.zeros(capacity, dtype=torch.bool)
    active[rows] = True
    return active


def spread_mask(live: int, capacity: int, generator: torch.Generator) -> torch.Tensor:
    """``live`` rows drawn at random from the whole capacity, the last row among them."""
    rows = torch.randperm(capacity - 1, generator=generator)[: live - 1]
    active = torch.zeros(capacity, dtype=torch.bool)
    active[rows] = True
    active[-1] = True
    return active


def make_mask(layout: str, live: int, capacity: int, generator: torch.Generator) -> torch.Tensor:
    """``prefix``; ``random`` (:func:`random_mask`); ``spread`` (:func:`spread_mask`);
    ``alt50`` or ``frag80`` (:func:`regular_mask`)."""
    if layout == "prefix":
        return torch.arange(capacity) < live
    if layout == "random":
        return random_mask(live, capacity, generator)
    if layout == "spread":
        return spread_mask(live, capacity, generator)
    return regular_mask(live, capacity, {"alt50": 0.5, "frag80": 0.8}[layout])


# ----------------------------------------------------------------------------- one case


@dataclass
class LinearCase:
    """A GrowLinear with a given mask, nn.Linear holding its live rows, an input and
    gradients for both outputs (and for the capacity-wide ``static_shape`` output)."""

    layer: growop.GrowLinear
    baseline: torch.nn.Linear
    live_rows: torch.Tensor
    x: torch.Tensor
    grad_growop: torch.Tensor
    grad_live: torch.Tensor
    grad_static: torch.Tensor

    @property
    def prefix(self) -> bool:
        return self.live_rows.numel() == self.layer.out_features

    @property
    def has_static(self) -> bool:
        """Whether the ``static`` provider applies: a capacity of at most 25% headroom over
        the live rows (its output is capacity wide)."""
        return self.layer.capacity <= STATIC_HEADROOM * self.live_rows.numel()


def build_case(
    batch: int,
    in_features: int,
    active: torch.Tensor,
    generator: torch.Generator,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    input_grad: bool = False,
) -> LinearCase:
    """The layer with ``active`` as its mask (its dead rows deactivated) and the
    rest of a :class:`LinearCase`. ``input_grad``: the input asks for its gradient, as a
    head's input does inside a network (forward+backward is then three GEMMs)."""
    capacity, live = active.numel(), int(active.sum())
    out_features = int(active.nonzero().max()) + 1
    layer = growop.GrowLinear(in_features, out_features, capacity=capacity, device=device, dtype=dtype)
    layer.deactivate((~active[:out_features]).nonzero().squeeze(1))
    live_rows = layer.active.nonzero().squeeze(1)
    baseline = torch.nn.Linear(in_features, live, device=device, dtype=dtype)
    with torch.no_grad():
        baseline.weight.copy_(layer.weight[live_rows])
        baseline.bias.copy_(layer.bias[live_rows])

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    x = randn(batch, in_features).requires_grad_(input_grad)
    grad_growop = randn(batch, out_features)
    grad_live = grad_growop[:, live_rows].contiguous()
    grad_static = torch.cat([grad_growop, randn(batch, capacity - out_features)], dim=1)
    return LinearCase(layer, baseline, live_rows, x, grad_growop, grad_live, grad_static)


# ----------------------------------------------------------------------------- providers


def under(strategy: str, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """``fn`` run under ``growop.strategy(strategy)``."""

    def run() -> torch.Tensor:
        with growop.strategy(strategy):
            return fn()

    return run


def training_step(forward: Callable[[], torch.Tensor], grad: torch.Tensor, params: Sequence[torch.Tensor]):
    """Forward, backward, then the gradients freed: each provider frees its own inside its
    own timing, as zero_grad() does in training, since freeing a large gradient is not free."""

    def run() -> None:
        forward().backward(grad)
        for p in params:
            p.grad = None

    return run


def providers(case: LinearCase, *, kernels: bool = False) -> tuple[dict, dict]:
    """The forward and the forward+backward functions of every provider that applies to
    ``case`` (see the module's docstring), ``linear`` first."""
    layer, x = case.layer, case.x
    weight, bias = layer.weight, layer.bias
    live = case.live_rows.numel()

    def slice_forward() -> torch.Tensor:
        if case.prefix:
            return F.linear(x, weight[:live], bias[:live])
        return F.linear(x, weight[case.live_rows], bias[case.live_rows])

    def static_forward() -> torch.Tensor:
        layer.static_shape = True
        try:
            return layer(x)
        finally:
            layer.static_shape = False

    def kernels_forward() -> torch.Tensor:  # gather without a live count
        with growop.strategy("gather"):
            return growop.functional.masked_linear(
                x, weight, bias, active=layer.active, out_features=layer.out_features
            )

    with_input = [x] if x.requires_grad else []
    params = [weight, bias, *with_input]
    forward = {"linear": lambda: case.baseline(x), **{s: under(s, lambda: layer(x)) for s in STRATEGIES}}
    both = {
        "linear": training_step(lambda: case.baseline(x), case.grad_live, [*case.baseline.parameters(), *with_input]),
        **{s: under(s, training_step(lambda: layer(x), case.grad_growop, params)) for s in STRATEGIES},
    }
    if kernels:
        forward["kernels"] = kernels_forward
        both["kernels"] = training_step(kernels_forward, case.grad_growop, params)
    if case.has_static:
        forward["static"] = static_forward
        both["static"] = training_step(static_forward, case.grad_static, params)
    forward["slice"] = slice_forward
    both["slice"] = training_step(slice_forward, case.grad_live, params)
    return forward, both


@dataclass
class Measured:
    """Forward and forward+backward timings of every provider of one case."""

    forward: dict[str, Timing]
    both: dict[str, Timing]

    def ratio(self, kind: str, provider: str) -> Ratio | None:
        """``kind`` ("fwd" or "fb") of ``provider`` over nn.Linear's, or None where it does
        not apply."""
        timings = self.forward if kind == "fwd" else self.both
        if provider not in timings:
            return None
        return ratio(timings[provider], timings["linear"])


def measure_case(
    case: LinearCase, repeats: int, *, warmup: int = 1, inner: int = 1, best_of: int = 1, kernels: bool = False
) -> Measured:
    """Every provider of ``case`` timed side by side (:func:`growop.measure.time_interleaved`
    on the case's device), forward alone under no_grad, then forward+backward."""
    forward_fns, both_fns = providers(case, kernels=kernels)
    timing = dict(warmup=warmup, inner=inner, best_of=best_of, device=case.x.device)
    with torch.no_grad():
        forward = time_interleaved(forward_fns, repeats, **timing)
    both = time_interleaved(both_fns, repeats, **timing)
    return Measured(forward, both)


# ----------------------------------------------------------------------------- table and rows


def ratio_cells(measured: Measured, kind: str, names: Sequence[str], width: int) -> str:
    """The ratio column of each provider in ``names``; blank where one does not apply."""
    cells = []
    for name in names:
        value = measured.ratio(kind, name)
        cells.append(" " * width if value is None else format_ratio(value, width))
    return " ".join(cells)


def csv_rows(bench: str, case: str, measured: Measured) -> list[dict]:
    """Each provider's forward and forward+backward time (ms) and ratio over nn.Linear."""
    rows = []
    for kind, timings in (("fwd", measured.forward), ("fb", measured.both)):
        for provider, timing in timings.items():
            rows.append(csv_row(bench, case, provider, f"{kind}_time", "ms", timing))
            if provider != "linear":
                rows.append(csv_row(bench, case, provider, f"{kind}_ratio", "x", measured.ratio(kind, provider)))
    return rows


# ----------------------------------------------------------------------------- grow latency


def bench_grow(
    in_features: int,
    live: int,
    capacity: int,
    repeats: int,
    *,
    best_of: int = 5,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, Timing]:
    """``grow(1)`` within capacity against ``add_output_nodes`` (a new nn.Linear with the rows
    copied), one warm-up call each, then ``repeats`` rounds of both in turn; the host clock
    around each call with the device synchronised (what a training loop waits for). A grow
    sample is the fastest of ``best_of`` grows (a fraction of a millisecond each, which a
    busy machine's interruptions would otherwise swamp); a copy takes long enough for one."""
    if live + repeats * best_of + 1 > capacity:
        raise ValueError(
            f"{repeats * best_of + 1} grows of one row from {live} do not fit a capacity of {capacity}"
        )
    layer = growop.GrowLinear(in_features, live, capacity=capacity, device=device, dtype=dtype)
    linear = torch.nn.Linear(in_features, live, device=device, dtype=dtype)
    layer.grow(1)
    add_output_nodes(linear, 1)
    grow, copy = [], []
    for _ in range(repeats):
        grow.append(min(time_call(lambda: layer.grow(1), device)[1] for _ in range(best_of)))
        grown, seconds = time_call(lambda: add_output_nodes(linear, 1), device)
        copy.append(seconds)
        del grown
    return {"grow": Timing(tuple(grow)), "copy": Timing(tuple(copy))}


GROW_HEADER = f"{'cap':>7} {'grow ms':>9} {'copy ms':>9} {'speedup':>8}"


def grow_line(capacity: int, timings: dict[str, Timing]) -> str:
    """A line of the grow table: the medians and copy / grow (the two were timed in turn)."""
    grow, copy = timings["grow"], timings["copy"]
    speedup = format_ratio(ratio(copy, grow, paired=True), 8, digits=0)
    return f"{capacity:7} {grow.median_ms:9.3f} {copy.median_ms:9.2f} {speedup}"


def grow_rows(bench: str, case: str, timings: dict[str, Timing]) -> list[dict]:
    return [
        csv_row(bench, case, "growop", "grow_time", "ms", timings["grow"]),
        csv_row(bench, case, "add_output_nodes", "grow_time", "ms", timings["copy"]),
        csv_row(bench, case, "growop", "grow_speedup", "x", ratio(timings["copy"], timings["grow"])),
    ]
