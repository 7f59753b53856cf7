"""Per-step cost of growop's global optimizer step hooks (growop/optim.py).

    python benchmarks/bench_optim_hooks.py           # 10 and 300 Parameters, ~10 s
    python benchmarks/bench_optim_hooks.py --quick   # 10 Parameters, ~5 s

A default run takes about 10 seconds on 2 cores of an AMD EPYC VM (one thread) and holds
a few MB.

torch runs growop's pre- and post-step hooks around every ``optimizer.step()`` in the
process, growop's or not. This times one call of both hooks, as a step makes it, for:

- ``no growop``: an AdamW over plain Parameters only, already seen once (every other
  optimizer of the process, at each of its steps);
- ``growop``: an AdamW over a GrowLinear and plain Parameters, up to date (no row event
  since its last step, no young rows);
- ``first sight``: the scan an optimizer costs at its first step, and a holder of growop
  Parameters at its first step after a row event (a grow anywhere in the process);

each over 2 param groups (decay, no decay) of 10 or 300 Parameters of 8 elements in all,
and beside them a whole ``AdamW.step()`` of the plain optimizer (hooks included). A hook
sample is the fastest of a few bursts of calls (growop.measure), in microseconds. The work
of the per-row correction itself (rows still young after a grow) is measured by
``benchmarks/bench_optim.py``. Rows go to benchmarks/out/bench_optim_hooks.csv (ignored
by git) unless ``--csv`` names another file.
"""

from __future__ import annotations

import argparse

import torch

import growop
from growop import optim
from growop.measure import apply_harness_options, benchmark_parser, csv_row, stamp, time_interleaved, write_csv

BENCH = "bench_optim_hooks"
PARAMS = {"full": (10, 300), "quick": (10,)}
REPEATS, QUICK_REPEATS = 15, 5
INNER, BEST_OF = 200, 5  # a hook call takes microseconds: a sample is the best of 5 bursts of 200
HOOK_CASES = ("no growop", "growop", "first sight")


def make_optimizer(params: int, with_growop: bool, keep: list) -> torch.optim.Optimizer:
    """An AdamW over ``params`` Parameters in two groups, gradients set, stepped once."""
    tensors = [torch.nn.Parameter(torch.zeros(8)) for _ in range(params - (2 if with_growop else 0))]
    if with_growop:
        head = growop.GrowLinear(8, 4, capacity=16)
        tensors += list(head.parameters())
        keep.append(head)  # its row set, which the hooks look Parameters up in, stays alive
    for tensor in tensors:
        tensor.grad = torch.ones_like(tensor)
    half = len(tensors) // 2
    optimizer = torch.optim.AdamW([{"params": tensors[:half]}, {"params": tensors[half:], "weight_decay": 0.0}])
    optimizer.step()  # seen once
    return optimizer


def hooks(optimizer: torch.optim.Optimizer) -> None:
    optim._before_step(optimizer, (), {})
    optim._after_step(optimizer, (), {})


def first_sight(optimizer: torch.optim.Optimizer) -> None:
    optim._known.pop(optimizer, None)
    optim._before_step(optimizer, (), {})


def parse_args(argv) -> argparse.Namespace:
    parser = benchmark_parser(__file__, __doc__, repeats=REPEATS,
                              quick=f"10 Parameters, {QUICK_REPEATS} rounds: ~5 s")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (QUICK_REPEATS if args.quick else REPEATS)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    csv_path = apply_harness_options(args)
    run_stamp = stamp("cpu")
    print(f"# {run_stamp}")
    print(f"{'params':>6} {'no growop us':>13} {'growop us':>10} {'first sight us':>15} {'AdamW.step us':>14}")
    rows, keep = [], []
    for params in PARAMS["quick" if args.quick else "full"]:
        plain, grown = make_optimizer(params, False, keep), make_optimizer(params, True, keep)
        timings = time_interleaved(
            {"no growop": lambda: hooks(plain), "growop": lambda: hooks(grown), "first sight": lambda: first_sight(grown)},
            args.repeats, inner=INNER, best_of=BEST_OF,
        )
        timings.update(time_interleaved({"AdamW.step": plain.step}, args.repeats, best_of=BEST_OF))
        us = {name: timing.median_ms * 1e3 for name, timing in timings.items()}
        print(f"{params:>6} {us['no growop']:13.2f} {us['growop']:10.2f} {us['first sight']:15.1f} "
              f"{us['AdamW.step']:14.1f}")
        case = f"AdamW over {params} Parameters"
        rows += [csv_row(BENCH, case, name, "hook_time", "ms", timings[name]) for name in HOOK_CASES]
        rows.append(csv_row(BENCH, case, "AdamW.step", "step_time", "ms", timings["AdamW.step"]))
    write_csv(csv_path, rows, run_stamp)
    print(f"\nrows appended to {csv_path}")


if __name__ == "__main__":
    main()
