"""Optimizer-step overhead of GrowLinear's per-row step correction (growop/optim.py).

    python benchmarks/bench_optim.py           # (in, capacity) = (4096, 32000): ~11 GB of RAM, ~8 min
    python benchmarks/bench_optim.py --quick   # (512, 4000): ~0.5 GB, ~20 s

A default run takes about 8 minutes on 2 cores of an AMD EPYC VM (one thread) and holds
about 11 GB: five layers of 4096 x 32000 float32 at once, each with its gradient and two
Adam states (4 x 0.5 GB a layer). Check the machine's free memory first, or run ``--quick``.
(Measured at a quarter of the size, (4096, 8000): 3.2 GB, 1 min 54 s.)

Times ``Adam.step()`` and ``AdamW.step()`` on a GrowLinear with (in, capacity) as above,
interleaved in one run (growop.measure): with no young rows (the correction does
nothing), and with 10, 100 and 1,000 rows grown mid-training (each young row is updated
a second time, O(in_features) work). ``nn.Linear`` of the same size with the same
optimizer is the baseline; a ratio is the median of the rounds' own ratios, flagged ``?``
or withheld (``noisy``) when its spread is too wide. Rows go to
benchmarks/out/bench_optim.csv (ignored by git) unless ``--csv`` names another file.
"""

from __future__ import annotations

import argparse

import torch

import growop
from growop.measure import (
    RATIO_LEGEND,
    apply_harness_options,
    benchmark_parser,
    csv_row,
    format_ratio,
    ratio,
    stamp,
    time_interleaved,
    write_csv,
)

BENCH = "bench_optim"
# (in_features, capacity, live rows before the grows)
SIZES = {"full": (4096, 32000, 30000), "quick": (512, 4000, 2800)}
YOUNG = (0, 10, 100, 1000)
REPEATS, QUICK_REPEATS = 15, 7
# --quick's steps take milliseconds: a sample is the fastest of a few (growop.measure).
QUICK_BEST_OF = 5


def with_gradients(module: torch.nn.Module, optimizer_cls) -> torch.optim.Optimizer:
    """An optimizer over ``module`` that has taken one step (its state exists), gradients
    left in place for the steps to time."""
    optimizer = optimizer_cls(module.parameters(), lr=1e-3)
    for param in module.parameters():
        param.grad = torch.randn_like(param)
    optimizer.step()
    return optimizer


def step_cases(optimizer_cls, in_features: int, capacity: int, start: int) -> dict:
    """``optimizer.step`` of nn.Linear (in, capacity) and of GrowLinears with each count of
    young rows, by name."""
    torch.manual_seed(0)
    cases = {"nn.Linear": with_gradients(torch.nn.Linear(in_features, capacity), optimizer_cls).step}
    for young in YOUNG:
        layer = growop.GrowLinear(in_features, start, capacity=capacity)
        optimizer = with_gradients(layer, optimizer_cls)
        if young:
            layer.grow(young, optimizer=optimizer)
        cases[young] = optimizer.step
    return cases


def parse_args(argv) -> argparse.Namespace:
    parser = benchmark_parser(__file__, __doc__, repeats=REPEATS,
                              quick=f"(in, capacity) = {SIZES['quick'][:2]}, {QUICK_REPEATS} rounds: ~0.5 GB, ~20 s")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (QUICK_REPEATS if args.quick else REPEATS)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    csv_path = apply_harness_options(args)
    in_features, capacity, start = SIZES["quick" if args.quick else "full"]
    run_stamp = stamp("cpu")
    print(f"# {run_stamp}")
    print(f"# optimizer.step() on (in, capacity) = ({in_features}, {capacity}); {RATIO_LEGEND}")
    print(f"{'optimizer':10} {'young rows':>10} {'step ms':>9} {'vs none':>8} {'vs nn.Linear':>13}")
    rows = []
    for optimizer_cls in (torch.optim.Adam, torch.optim.AdamW):
        name = optimizer_cls.__name__
        # The layers live only as long as this call: one optimizer's five at a time.
        timings = time_interleaved(step_cases(optimizer_cls, in_features, capacity, start), args.repeats,
                                   best_of=QUICK_BEST_OF if args.quick else 1)
        for young in YOUNG:
            versus_none, versus_linear = ratio(timings[young], timings[0]), ratio(timings[young], timings["nn.Linear"])
            print(f"{name:10} {young:>10} {timings[young].median_ms:9.2f} "
                  f"{format_ratio(versus_none, 8, digits=3)} {format_ratio(versus_linear, 13, digits=3)}")
            case = f"{name} ({in_features}, {capacity}) {young} young rows"
            rows += [csv_row(BENCH, case, "growop", "step_time", "ms", timings[young]),
                     csv_row(BENCH, case, "growop", "ratio_vs_no_young_rows", "x", versus_none),
                     csv_row(BENCH, case, "growop", "ratio_vs_linear", "x", versus_linear)]
        rows.append(csv_row(BENCH, f"{name} ({in_features}, {capacity})", "nn.Linear", "step_time", "ms",
                            timings["nn.Linear"]))
    write_csv(csv_path, rows, run_stamp)
    print(f"\nrows appended to {csv_path}")


if __name__ == "__main__":
    main()
