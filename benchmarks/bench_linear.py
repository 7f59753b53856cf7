"""GrowLinear against nn.Linear sized to the live rows, side by side in one run.

    python benchmarks/bench_linear.py            # every case (a few minutes on 2 cores)
    python benchmarks/bench_linear.py --quick    # the two small cases only

For each (batch, in_features, live rows) case and capacity (a multiple of the live rows),
with the live rows as one prefix and as a fragmented mask (the live rows drawn at random
from the first min(2 x live, capacity) rows: 50% density where the capacity allows), it
times, interleaving the providers so drift hits all of them alike:

- forward alone, and forward+backward with fresh gradients every step (zero_grad sets
  them to None, as training does), for:
  ``linear``   nn.Linear holding only the live rows (the baseline of every ratio);
  ``growop``   GrowLinear;
  ``slice``    F.linear on ``weight[:n]`` (prefix) or ``weight[idx]`` (fragmented) of the
               full-capacity Parameter: the plain approach without growop's kernels.
- ``zero_ms``: the time to write zeros over the rows that are not live, on memory already
  touched. A Parameter's gradient has its full shape, so those rows must be written every
  step; ``growop_excl`` is growop's forward+backward minus that time, against the baseline.
- grow latency: ``GrowLinear.grow(1)`` within capacity against
  ``growop.reference.add_output_nodes`` (a new nn.Linear with the rows copied).

Prints a table and writes every row to a CSV (``--csv``) with the machine, torch version
and date.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import platform
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import growop
from growop.reference import add_output_nodes

CASES = {
    "small": (256, 1024, 1000),
    "wide": (256, 1024, 10000),
    "vocab": (64, 4096, 32000),
}
CAPACITY_FACTORS = (1.25, 4.0, 16.0)


@dataclass
class Timing:
    median: float
    p20: float
    p80: float


def summarize(samples: list[float]) -> Timing:
    ordered = sorted(samples)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return Timing(statistics.median(ordered) * 1e3, pick(0.2) * 1e3, pick(0.8) * 1e3)


def interleaved(fns: dict, repeats: int) -> dict[str, Timing]:
    """Runs each function once per round, round-robin, after one warm-up round."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            gc.collect()
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if round_:
                samples[name].append(elapsed)
    return {name: summarize(s) for name, s in samples.items()}


def fragmented_mask(live: int, capacity: int, generator: torch.Generator) -> torch.Tensor:
    span = min(2 * live, capacity)
    rows = torch.randperm(span, generator=generator)[:live]
    active = torch.zeros(capacity, dtype=torch.bool)
    active[rows] = True
    return active


def build_layer(in_features: int, live: int, capacity: int, mask: str, gen) -> growop.GrowLinear:
    active = (
        torch.arange(capacity) < live if mask == "prefix" else fragmented_mask(live, capacity, gen)
    )
    out_features = int(active.nonzero().max()) + 1
    layer = growop.GrowLinear(in_features, out_features, capacity=capacity)
    with torch.no_grad():
        layer.active.copy_(active)
    return layer


def bench_case(name: str, factor: float, mask: str, repeats: int, gen) -> dict:
    batch, in_features, live = CASES[name]
    capacity = int(live * factor)
    layer = build_layer(in_features, live, capacity, mask, gen)
    live_rows = layer.active.nonzero().squeeze(1)
    weight, bias = layer.weight, layer.bias
    baseline = torch.nn.Linear(in_features, live)
    with torch.no_grad():
        baseline.weight.copy_(weight[live_rows])
        baseline.bias.copy_(bias[live_rows])
    x = torch.randn(batch, in_features, generator=gen)
    grad_growop = torch.randn(batch, layer.out_features, generator=gen)
    grad_live = torch.randn(batch, live, generator=gen)
    prefix = mask == "prefix"

    def slice_forward():
        if prefix:
            return F.linear(x, weight[:live], bias[:live])
        return F.linear(x, weight[live_rows], bias[live_rows])

    def step(forward, grad, params):
        # Each provider frees its own gradients inside its own timing, as
        # zero_grad() does in training: freeing a large gradient is not free.
        def run():
            forward().backward(grad)
            for p in params:
                p.grad = None
        return run

    with torch.no_grad():
        forward = interleaved(
            {"linear": lambda: baseline(x), "growop": lambda: layer(x), "slice": slice_forward},
            repeats,
        )
    params = [weight, bias]
    both = interleaved(
        {
            "linear": step(lambda: baseline(x), grad_live, list(baseline.parameters())),
            "growop": step(lambda: layer(x), grad_growop, params),
            "slice": step(slice_forward, grad_live, params),
        },
        repeats,
    )
    dead_rows = capacity - live
    warm = torch.zeros(dead_rows, in_features)
    zero = interleaved({"zero": warm.zero_}, repeats)["zero"]
    del warm

    base_fwd, base_both = forward["linear"].median, both["linear"].median
    return {
        "case": name,
        "batch": batch,
        "in": in_features,
        "live": live,
        "capacity": capacity,
        "factor": factor,
        "mask": mask,
        "fwd_linear_ms": base_fwd,
        "fwd_growop_ms": forward["growop"].median,
        "fwd_growop_p20_ms": forward["growop"].p20,
        "fwd_growop_p80_ms": forward["growop"].p80,
        "fwd_slice_ms": forward["slice"].median,
        "fwd_ratio": forward["growop"].median / base_fwd,
        "fwd_slice_ratio": forward["slice"].median / base_fwd,
        "fb_linear_ms": base_both,
        "fb_growop_ms": both["growop"].median,
        "fb_growop_p20_ms": both["growop"].p20,
        "fb_growop_p80_ms": both["growop"].p80,
        "fb_slice_ms": both["slice"].median,
        "fb_ratio": both["growop"].median / base_both,
        "fb_slice_ratio": both["slice"].median / base_both,
        "zero_ms": zero.median,
        "fb_ratio_excl_zero": (both["growop"].median - zero.median) / base_both,
    }


def bench_grow(factor: float, repeats: int) -> dict:
    in_features, live = 4096, 32000
    capacity = int(live * factor)
    layer = growop.GrowLinear(in_features, live, capacity=capacity)
    linear = torch.nn.Linear(in_features, live)
    grow_times, copy_times = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        layer.grow(1)
        grow_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        grown = add_output_nodes(linear, 1)
        copy_times.append(time.perf_counter() - start)
        del grown
    grow_ms, copy_ms = summarize(grow_times).median, summarize(copy_times).median
    return {"capacity": capacity, "factor": factor, "grow_ms": grow_ms, "copy_ms": copy_ms,
            "speedup": copy_ms / grow_ms}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the two small cases, fewer repeats")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=None)
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per measurement")
    parser.add_argument("--csv", default="benchmarks/bench_linear.csv")
    args = parser.parse_args(argv)
    cases = args.cases or (["small", "wide"] if args.quick else list(CASES))
    gen = torch.Generator().manual_seed(0)
    stamp = f"{machine()}; torch {torch.__version__}; {datetime.date.today()}"
    print(f"# {stamp}")

    rows = []
    header = (f"{'case':6} {'cap':>5} {'mask':10} {'fwd ms':>8} {'fwd x':>6} {'slice x':>7} "
              f"{'f+b ms':>8} {'f+b x':>6} {'slice x':>7} {'zero ms':>8} {'excl x':>6}")
    print(header)
    for name in cases:
        for factor in CAPACITY_FACTORS:
            for mask in ("prefix", "fragmented"):
                big = CASES[name][2] * factor * CASES[name][1] > 2e8
                repeats = args.repeats or (3 if big or args.quick else 7)
                row = bench_case(name, factor, mask, repeats, gen)
                rows.append(row)
                print(f"{name:6} {factor:>5} {mask:10} {row['fwd_growop_ms']:8.2f} {row['fwd_ratio']:6.2f} "
                      f"{row['fwd_slice_ratio']:7.2f} {row['fb_growop_ms']:8.2f} {row['fb_ratio']:6.2f} "
                      f"{row['fb_slice_ratio']:7.2f} {row['zero_ms']:8.2f} {row['fb_ratio_excl_zero']:6.2f}",
                      flush=True)
                gc.collect()

    print("\ngrow(1) within capacity vs add_output_nodes, (in, rows) = (4096, 32000)")
    print(f"{'cap':>7} {'grow ms':>9} {'copy ms':>9} {'speedup':>8}")
    grows = []
    for factor in CAPACITY_FACTORS:
        if args.quick and factor > 4:
            continue
        g = bench_grow(factor, 5)
        grows.append(g)
        print(f"{g['capacity']:7} {g['grow_ms']:9.3f} {g['copy_ms']:9.1f} {g['speedup']:8.0f}", flush=True)

    if args.csv:
        with open(args.csv, "a", newline="") as f:
            writer = csv.writer(f)
            for row in rows:
                writer.writerow(["linear", stamp, *row.values()])
            for g in grows:
                writer.writerow(["grow", stamp, *g.values()])
        print(f"\nrows appended to {args.csv}")


if __name__ == "__main__":
    main()
