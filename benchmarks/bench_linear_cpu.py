"""GrowLinear against nn.Linear on the live rows, on the CPU, side by side in one run.

    python benchmarks/bench_linear_cpu.py                 # heads, fragmented masks, grow: ~2 min
    python benchmarks/bench_linear_cpu.py --quick         # the small heads only: ~15 s
    python benchmarks/bench_linear_cpu.py --sets vocab    # the vocabulary-sized rows: minutes each
    python benchmarks/bench_linear_cpu.py --sets grid     # capacities 1.25x to 16x: an hour or more
    python benchmarks/bench_linear_cpu.py --sets fragmented --crossover   # and how R* was chosen

A default run takes about 2 minutes on 2 cores of an AMD EPYC VM (one thread; more on a
loaded machine; the larger sets' times are estimates). Each set is a list of (case,
capacity factor, mask) runs; a case is (batch, in_features, live rows):

- ``heads`` (the default with ``fragmented``): the small heads (128, 64 -> 10) and
  (128, 512 -> 100) at the default 25% headroom with a prefix mask; their ``static``
  column is the same head with ``static_shape=True`` (output capacity wide);
- ``fragmented``: (256, 1024 -> 10000) with every other row live within 2N rows
  (capacity 2.5N) and with four rows of five live within 1.25N (capacity 1.5625N);
- ``vocab``: the same masks at (64, 4096 -> 32000);
- ``grid``: (256, 1024 -> 1000), (256, 1024 -> 10000) and (64, 4096 -> 32000) at
  capacities 1.25x, 4x and 16x, prefix and random masks (live rows drawn from the first
  2N rows).

Every provider (``linear_cases.py``: nn.Linear on the live rows, GrowLinear under each
strategy, ``static``, the plain slice) runs once per round, forward under no_grad and
forward+backward, rounds interleaved; a ratio is the median of the rounds' own ratios
over nn.Linear, flagged ``?`` or withheld (``noisy``) when its p20..p80 spread is too wide
(see growop.measure). Defaults that give trustworthy ratios on a small shared machine: one
thread, 11 rounds (7 for the large cases). Then ``grow(1)`` within capacity against
``growop.reference.add_output_nodes`` at (4096 -> 32000), and with ``--crossover`` dense
against gather as width / live grows (how the CPU's R* in csrc/strategy.h was chosen).

Rows go to benchmarks/out/bench_linear_cpu.csv (ignored by git) unless ``--csv`` names
another file. The GPU benchmark is bench_linear_cuda.py.
"""

from __future__ import annotations

import argparse
import gc

import torch

from growop.measure import (
    RATIO_LEGEND,
    apply_harness_options,
    benchmark_parser,
    csv_row,
    stamp,
    time_interleaved,
    write_csv,
)
from linear_cases import (
    GROW_HEADER,
    STRATEGIES,
    bench_grow,
    build_case,
    csv_rows,
    grow_line,
    grow_rows,
    make_mask,
    measure_case,
    ratio_cells,
    regular_mask,
    training_step,
    under,
)

BENCH = "bench_linear_cpu"
CASES = {
    "tiny": (128, 64, 10),
    "head": (128, 512, 100),
    "small": (256, 1024, 1000),
    "wide": (256, 1024, 10000),
    "vocab": (64, 4096, 32000),
}
CAPACITY_FACTORS = (1.25, 4.0, 16.0)
# mask name -> how its live rows lie (linear_cases.make_mask), and the capacity factor it
# needs where it is not the run's.
MASKS = {"prefix": "prefix", "fragmented": "random", "alt50": "alt50", "frag80": "frag80"}
MASK_CAPACITY = {"alt50": 2.5, "frag80": 1.5625}
SETS = {
    "heads": [(c, 1.25, "prefix") for c in ("tiny", "head")],
    "fragmented": [("wide", 1.25, m) for m in ("alt50", "frag80")],
    "vocab": [("vocab", 1.25, m) for m in ("alt50", "frag80")],
    "grid": [(c, f, m) for c in ("small", "wide", "vocab") for f in CAPACITY_FACTORS for m in ("prefix", "fragmented")],
}
DEFAULT_SETS = ("heads", "fragmented")
REPEATS, LARGE_REPEATS, QUICK_REPEATS = 11, 7, 7
# A case is large (LARGE_REPEATS rounds) when batch x in x live x capacity factor exceeds
# this: a forward+backward takes a second or more.
LARGE = 5e9
# A sample is the fastest of a few bursts of calls (growop.measure.time_interleaved): a
# burst is about BURST_WORK multiply-adds (a fraction of a millisecond), a sample up to
# MAX_BEST_OF bursts and about SAMPLE_WORK multiply-adds. Short bursts are what survive other
# processes on a small machine: a burst they interrupt is not the one kept.
BURST_WORK, SAMPLE_WORK, MAX_BEST_OF = 5e5, 1e9, 20
# grow(1) at (in, live rows), at these capacity factors (16x, 8 GiB, with --sets grid).
GROW_CASE = (4096, 32000)
GROW_FACTORS = (1.25, 4.0)
GROW_REPEATS = 7
CROSSOVER_RATIOS = (1.25, 1.5, 2.0, 3.0, 4.0, 8.0)
CROSSOVER_CASES = ((256, 1024, 1000), (64, 4096, 4000))
COLUMNS = (*STRATEGIES, "static", "slice")


def case_label(name: str, capacity: int, width: int, mask: str) -> str:
    batch, in_features, live = CASES[name]
    return f"{name} ({batch}, {in_features} -> {live}) capacity {capacity} width {width} {mask}"


def run_case(name: str, factor: float, mask: str, repeats: int, gen: torch.Generator) -> tuple:
    batch, in_features, live = CASES[name]
    capacity = int(live * MASK_CAPACITY.get(mask, factor))
    case = build_case(batch, in_features, make_mask(MASKS[mask], live, capacity, gen), gen)
    work = batch * in_features * live
    inner = max(1, int(BURST_WORK // work))
    best_of = max(1, min(MAX_BEST_OF, int(SAMPLE_WORK // (work * inner))))
    return case, measure_case(case, repeats, inner=inner, best_of=best_of)


def crossover(repeats: int, gen: torch.Generator) -> list[dict]:
    """Forward+backward under dense and under gather, for live rows spread evenly over
    width = R x live rows: where gather starts to win is the CPU's R* (csrc/strategy.h)."""
    print("\ndense vs gather, forward+backward ms, live rows spread evenly over width = R x live")
    print(f"{'case':18} " + " ".join(f"{'R=' + str(r):>14}" for r in CROSSOVER_RATIOS))
    rows = []
    for batch, in_features, live in CROSSOVER_CASES:
        cells = []
        for r in CROSSOVER_RATIOS:
            case = build_case(batch, in_features, regular_mask(live, round(live * r), 1 / r), gen)
            layer = case.layer
            layer.static_shape = True  # output as wide as the capacity, which is the width
            step = training_step(lambda: layer(case.x), case.grad_static, [layer.weight, layer.bias])
            t = time_interleaved({s: under(s, step) for s in ("dense", "gather")}, repeats)
            label = f"crossover ({batch}, {in_features} -> {live}) R={r}"
            rows += [csv_row(BENCH, label, s, "fb_time", "ms", timing) for s, timing in t.items()]
            cells.append(f"{t['dense'].median_ms:6.1f}/{t['gather'].median_ms:<7.1f}")
        print(f"{str((batch, in_features, live)):18} " + " ".join(f"{c:>14}" for c in cells), flush=True)
    return rows


def parse_args(argv) -> argparse.Namespace:
    parser = benchmark_parser(__file__, __doc__, repeats=REPEATS,
                              quick=f"the heads set only, {QUICK_REPEATS} rounds, no grow table (~15 s)")
    parser.add_argument("--sets", nargs="+", choices=list(SETS), default=None,
                        help=f"which runs (default: {' '.join(DEFAULT_SETS)})")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=None, help="only these cases of the sets")
    parser.add_argument("--crossover", action="store_true",
                        help="also time dense against gather across width / live (how R* was chosen)")
    parser.add_argument("--grow", action=argparse.BooleanOptionalAction, default=None,
                        help="the grow-latency table (default: on, off with --quick)")
    args = parser.parse_args(argv)
    if args.sets is None:
        args.sets = ["heads"] if args.quick else list(DEFAULT_SETS)
    if args.grow is None:
        args.grow = not args.quick
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    csv_path = apply_harness_options(args)
    runs = [run for name in args.sets for run in SETS[name]]
    if args.cases:
        runs = [run for run in runs if run[0] in args.cases]
    gen = torch.Generator().manual_seed(0)
    run_stamp = stamp("cpu")
    print(f"# {run_stamp}")
    print("# time / nn.Linear on the live rows; fwd under no_grad; f+b = forward+backward")
    print(f"# {RATIO_LEGEND}")
    header = (f"{'case':6} {'cap':>6} {'width':>6} {'mask':10} {'lin f+b ms':>10} "
              + " ".join(f"{'fwd ' + s:>10}" for s in COLUMNS) + " "
              + " ".join(f"{'f+b ' + s:>10}" for s in COLUMNS))
    print(header)
    rows = []
    for name, factor, mask in runs:
        batch, in_features, live = CASES[name]
        large = batch * in_features * live * factor > LARGE
        repeats = args.repeats or (QUICK_REPEATS if args.quick else LARGE_REPEATS if large else REPEATS)
        case, measured = run_case(name, factor, mask, repeats, gen)
        layer = case.layer
        rows += csv_rows(BENCH, case_label(name, layer.capacity, layer.out_features, mask), measured)
        print(f"{name:6} {layer.capacity:6} {layer.out_features:6} {mask:10} "
              f"{measured.both['linear'].median_ms:10.3f} "
              + ratio_cells(measured, "fwd", COLUMNS, 10) + " " + ratio_cells(measured, "fb", COLUMNS, 10),
              flush=True)
        del case, measured
        gc.collect()
    if args.crossover:
        rows += crossover(args.repeats or LARGE_REPEATS, gen)

    if args.grow:
        in_features, live = GROW_CASE
        print(f"\ngrow(1) within capacity vs add_output_nodes, (in, rows) = {GROW_CASE}")
        print(GROW_HEADER)
        factors = (*GROW_FACTORS, 16.0) if "grid" in args.sets else GROW_FACTORS
        for factor in factors:
            capacity = int(live * factor)
            timings = bench_grow(in_features, live, capacity, GROW_REPEATS)
            rows += grow_rows(BENCH, f"grow ({in_features} -> {live}) capacity {capacity}", timings)
            print(grow_line(capacity, timings), flush=True)
            gc.collect()

    write_csv(csv_path, rows, run_stamp)
    print(f"\nrows appended to {csv_path}")


if __name__ == "__main__":
    main()
