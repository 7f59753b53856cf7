"""GrowLinear against nn.Linear sized to the live rows, side by side in one run.

    python benchmarks/bench_linear.py                  # every CPU set (several minutes)
    python benchmarks/bench_linear.py --sets heads     # the small heads only
    python benchmarks/bench_linear.py --sets fragmented --crossover   # fragmented masks, R*
    python benchmarks/bench_linear.py --device cuda   # the GPU benchmark (see main_cuda)

Each CPU set is a list of (batch, in_features, live rows) cases, each with a capacity and a
mask: ``heads``, the small heads at the default 25% headroom; ``fragmented``, every other
row live within 2N rows (capacity 2.5N) and four rows of five within 1.25N; ``grid``, the
earlier prefix / random-50% table over capacities 1.25x, 4x and 16x. It times, interleaving
the providers so drift hits all of them alike:

- forward alone (no_grad), and forward+backward with fresh gradients every step (zero_grad
  sets them to None, as training does), for:
  ``linear``   nn.Linear holding only the live rows (the baseline of every ratio);
  ``auto``, ``dense``, ``gather``   GrowLinear under each strategy (``growop.strategy``);
  ``slice``    F.linear on ``weight[:n]`` (prefix) or ``weight[idx]`` (fragmented) of the
               full-capacity Parameter: the plain approach without growop's kernels.
- ``--crossover``: dense against gather as width / live grows: how the CPU's R* was chosen.
- grow latency: ``GrowLinear.grow(1)`` within capacity against
  ``growop.reference.add_output_nodes`` (a new nn.Linear with the rows copied).

Prints a table and writes every row to a CSV (``--csv``) with the machine, torch version
and date.

``--device cuda`` measures growop's CUDA kernels instead (see :func:`main_cuda`): one
vocabulary-sized layer, (batch, in, live) = (8192, 4096, 32000), in bf16 and fp32, timed with
CUDA events, plus grow latency on the GPU. The CPU run is unchanged by it.
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
    "tiny": (128, 64, 10),
    "head": (128, 512, 100),
    "small": (256, 1024, 1000),
    "wide": (256, 1024, 10000),
    "vocab": (64, 4096, 32000),
}
CAPACITY_FACTORS = (1.25, 4.0, 16.0)
# What each set of the CPU run measures: (case, capacity factor, mask) triples.
SETS = {
    # per-call cost at the default headroom
    "heads": [(c, 1.25, "prefix") for c in ("tiny", "head")],
    # fragmented masks at 50% and 80% density
    "fragmented": [(c, 1.25, m) for c in ("wide", "vocab") for m in ("alt50", "frag80")],
    # every case, capacity and mask of the earlier tables
    "grid": [(c, f, m) for c in ("small", "wide", "vocab") for f in CAPACITY_FACTORS
             for m in ("prefix", "fragmented")],
}


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


def interleaved(fns: dict, repeats: int, inner: int = 1) -> dict[str, Timing]:
    """Runs each function `inner` times per round, round-robin, after one warm-up round;
    a sample is the time of one call."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            gc.collect()
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            elapsed = (time.perf_counter() - start) / inner
            if round_:
                samples[name].append(elapsed)
    return {name: summarize(s) for name, s in samples.items()}


def plain_slice_forward(x, weight, bias, live_rows, prefix: bool):
    """The approach without growop's kernels: F.linear on the live rows of the Parameter."""
    live = live_rows.numel()

    def forward():
        if prefix:
            return F.linear(x, weight[:live], bias[:live])
        return F.linear(x, weight[live_rows], bias[live_rows])

    return forward


def training_step(forward, grad, params):
    """Forward, backward, then the gradients freed: each provider frees its own inside its
    own timing, as zero_grad() does in training, since freeing a large gradient is not free."""

    def run():
        forward().backward(grad)
        for p in params:
            p.grad = None

    return run


STRATEGIES = ("auto", "dense", "gather")


def under(strategy: str, fn):
    """`fn` run under growop.strategy(strategy)."""

    def run():
        with growop.strategy(strategy):
            return fn()

    return run


def provider_timings(timer, baseline, layer, x, slice_forward, grad_live, grad_growop):
    """Forward alone (no autograd), then forward+backward, of nn.Linear, GrowLinear under
    each strategy, and the slice, each timed by ``timer`` (a dict of functions -> a dict of
    Timings)."""
    with torch.no_grad():
        forward = timer({
            "linear": lambda: baseline(x),
            **{s: under(s, lambda: layer(x)) for s in STRATEGIES},
            "slice": slice_forward,
        })
    params = [layer.weight, layer.bias]
    both = timer({
        "linear": training_step(lambda: baseline(x), grad_live, list(baseline.parameters())),
        **{s: under(s, training_step(lambda: layer(x), grad_growop, params)) for s in STRATEGIES},
        "slice": training_step(slice_forward, grad_live, params),
    })
    return forward, both


def fragmented_mask(live: int, capacity: int, generator: torch.Generator) -> torch.Tensor:
    span = min(2 * live, capacity)
    rows = torch.randperm(span, generator=generator)[:live]
    active = torch.zeros(capacity, dtype=torch.bool)
    active[rows] = True
    return active


def regular_mask(live: int, capacity: int, density: float) -> torch.Tensor:
    """`live` rows spread evenly at `density` from row 0: every other row at 0.5, four rows of
    every five at 0.8."""
    span = round(live / density)
    rows = (torch.arange(live) / density).floor().long()
    assert rows[-1] < span <= capacity and rows.unique().numel() == live
    active = torch.zeros(capacity, dtype=torch.bool)
    active[rows] = True
    return active


# mask name -> capacity factor it needs (None: the case's factor) and how rows lie.
MASKS = {
    "prefix": "prefix",
    "fragmented": "random 50%",
    "alt50": "every other row of 2N, capacity 2.5N",
    "frag80": "4 of every 5 rows of 1.25N, capacity 1.5625N",
}
MASK_CAPACITY = {"alt50": 2.5, "frag80": 1.5625}


def build_layer(in_features: int, live: int, capacity: int, mask: str, gen) -> growop.GrowLinear:
    if mask == "prefix":
        active = torch.arange(capacity) < live
    elif mask == "fragmented":
        active = fragmented_mask(live, capacity, gen)
    else:
        active = regular_mask(live, capacity, {"alt50": 0.5, "frag80": 0.8}[mask])
    out_features = int(active.nonzero().max()) + 1
    layer = growop.GrowLinear(in_features, out_features, capacity=capacity)
    with torch.no_grad():
        layer.active.copy_(active)
    layer._live_count = live  # the mask was set directly: the host-side count to match
    return layer


def bench_case(name: str, factor: float, mask: str, repeats: int, gen) -> dict:
    batch, in_features, live = CASES[name]
    capacity = int(live * MASK_CAPACITY.get(mask, factor))
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
    # Small heads take microseconds: each sample times a loop of calls.
    inner = max(1, int(2e7 // (batch * in_features * live)))

    slice_forward = plain_slice_forward(x, weight, bias, live_rows, prefix)
    forward, both = provider_timings(
        lambda fns: interleaved(fns, repeats, inner), baseline, layer, x, slice_forward, grad_live,
        grad_growop,
    )
    base_fwd, base_both = forward["linear"].median, both["linear"].median
    row = {
        "case": name, "batch": batch, "in": in_features, "live": live, "capacity": capacity,
        "width": layer.out_features, "mask": mask, "fwd_linear_ms": base_fwd, "fb_linear_ms": base_both,
    }
    for provider in (*STRATEGIES, "slice"):
        row[f"fwd_{provider}_ms"] = forward[provider].median
        row[f"fwd_{provider}_ratio"] = forward[provider].median / base_fwd
        row[f"fb_{provider}_ms"] = both[provider].median
        row[f"fb_{provider}_p20_ms"] = both[provider].p20
        row[f"fb_{provider}_p80_ms"] = both[provider].p80
        row[f"fb_{provider}_ratio"] = both[provider].median / base_both
    return row


CROSSOVER_RATIOS = (1.25, 1.5, 2.0, 3.0, 4.0, 8.0)


def crossover(repeats: int, gen) -> list[dict]:
    """Forward+backward under dense and under gather, for live rows spread evenly over
    width = R x live rows, at (256, 1024, 1000) and (64, 4096, 4000): where gather starts to
    win is the CPU's R* (csrc/strategy.h)."""
    print("\ndense vs gather, forward+backward ms, live rows spread evenly over width = R x live")
    print(f"{'case':16} " + " ".join(f"{'R=' + str(r):>14}" for r in CROSSOVER_RATIOS))
    rows = []
    for batch, in_features, live in ((256, 1024, 1000), (64, 4096, 4000)):
        cells = []
        for ratio in CROSSOVER_RATIOS:
            capacity = round(live * ratio)
            active = regular_mask(live, capacity, 1 / ratio)
            layer = growop.GrowLinear(in_features, capacity, capacity=capacity)
            with torch.no_grad():
                layer.active.copy_(active)
            x = torch.randn(batch, in_features, generator=gen)
            grad = torch.randn(batch, capacity, generator=gen)
            params = [layer.weight, layer.bias]
            step = training_step(lambda: layer(x), grad, params)
            t = interleaved({s: under(s, step) for s in ("dense", "gather")}, repeats)
            rows.append({"case": "crossover", "batch": batch, "in": in_features, "live": live,
                         "ratio": ratio, "dense_ms": t["dense"].median, "gather_ms": t["gather"].median})
            cells.append(f"{t['dense'].median:6.1f}/{t['gather'].median:<7.1f}")
        print(f"{str((batch, in_features, live)):16} " + " ".join(f"{c:>14}" for c in cells), flush=True)
    return rows


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
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS),
                        help="which CPU cases (default: all)")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=None,
                        help="only these cases of the sets")
    parser.add_argument("--crossover", action="store_true",
                        help="also time dense against gather across width / live (how R* was chosen)")
    parser.add_argument("--grow", action=argparse.BooleanOptionalAction, default=True,
                        help="the grow-latency table")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per measurement")
    parser.add_argument("--csv", default=None,
                        help="CSV to append to (default benchmarks/bench_linear.csv, "
                             "or benchmarks/bench_linear_cuda.csv with --device cuda)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtypes", nargs="+", choices=list(CUDA_DTYPES), default=["bf16", "tf32"],
                        help="--device cuda only")
    parser.add_argument("--masks", nargs="+", choices=list(CUDA_MASKS), default=list(CUDA_MASKS),
                        help="--device cuda only")
    parser.add_argument("--profile", action="store_true",
                        help="--device cuda only: instead of the table, where each forward+backward's "
                             "GPU time goes, kernel by kernel (torch.profiler), for --dtypes x --masks")
    args = parser.parse_args(argv)
    if args.csv is None:
        args.csv = "benchmarks/bench_linear_cuda.csv" if args.device == "cuda" else "benchmarks/bench_linear.csv"
    if args.device == "cuda":
        main_cuda(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = [run for name in args.sets for run in SETS[name]]
    if args.cases:
        runs = [run for run in runs if run[0] in args.cases]
    gen = torch.Generator().manual_seed(0)
    stamp = f"{machine()}; torch {torch.__version__}; {datetime.date.today()}"
    print(f"# {stamp}")
    print("# x = time / nn.Linear on the live rows (median); fwd under no_grad; f+b = forward+backward")

    rows = []
    header = (f"{'case':6} {'cap':>6} {'width':>6} {'mask':10} {'lin f+b ms':>10} "
              + " ".join(f"{'fwd ' + s:>10}" for s in STRATEGIES) + " "
              + " ".join(f"{'f+b ' + s:>10}" for s in (*STRATEGIES, "slice")))
    print(header)
    for name, factor, mask in runs:
        big = CASES[name][2] * CASES[name][1] * factor > 2e8
        repeats = args.repeats or (3 if big or args.quick else 7)
        row = bench_case(name, factor, mask, repeats, gen)
        rows.append(row)
        print(f"{name:6} {row['capacity']:6} {row['width']:6} {mask:10} {row['fb_linear_ms']:10.3f} "
              + " ".join(f"{row[f'fwd_{s}_ratio']:10.2f}" for s in STRATEGIES) + " "
              + " ".join(f"{row[f'fb_{s}_ratio']:10.2f}" for s in (*STRATEGIES, "slice")), flush=True)
        gc.collect()
    if args.crossover:
        rows += crossover(args.repeats or 5, gen)

    if args.grow:
        print("\ngrow(1) within capacity vs add_output_nodes, (in, rows) = (4096, 32000)")
        print(f"{'cap':>7} {'grow ms':>9} {'copy ms':>9} {'speedup':>8}")
    grows = []
    for factor in CAPACITY_FACTORS if args.grow else ():
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


# ----------------------------------------------------------------------------- CUDA

CUDA_CASE = (8192, 4096, 32000)  # (batch, in_features, live rows): an LM head's vocabulary
CUDA_CAPACITY = 40000
# bf16, and float32 as nn.Linear runs it on tensor cores (TF32 allowed); "fp32" is strict.
CUDA_DTYPES = {"bf16": torch.bfloat16, "tf32": torch.float32, "fp32": torch.float32}
# mask name -> (capacity, how the live rows lie). "fragmented" draws the live rows from the whole
# capacity (80% density at 40000); "fragmented50" doubles the capacity for a 50% density;
# "spread16" spreads them over 16x the live rows (6% density), where auto must take gather.
CUDA_MASKS = {
    "prefix": (CUDA_CAPACITY, "prefix"),
    "fragmented": (CUDA_CAPACITY, "fragmented"),
    "fragmented50": (2 * CUDA_CASE[2], "fragmented"),
    "spread16": (16 * CUDA_CASE[2], "fragmented"),
}
# The GrowLinear providers of the CUDA table: the three strategies through the layer (with its
# host-side live count, so gather runs cuBLAS on the packed live rows), gather's live-row
# kernels (no live count: what CUDA graphs and static shapes without a count run), and the
# layer with static_shape=True (output as wide as the capacity) under auto.
CUDA_PROVIDERS = (*STRATEGIES, "kernels", "static")


def cuda_timings(fns: dict, warmup: int, repeats: int) -> dict[str, Timing]:
    """Each function timed with CUDA events, round-robin after `warmup` rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    torch.cuda.synchronize()
    events: dict[str, list] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events[name].append((start, end))
    torch.cuda.synchronize()
    return {name: summarize([s.elapsed_time(e) / 1e3 for s, e in pairs]) for name, pairs in events.items()}


def host_timings(fns: dict, warmup: int, repeats: int) -> dict[str, Timing]:
    """:func:`cuda_timings` with the host clock, for the CUDA table's code on another device."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: summarize(s) for name, s in samples.items()}


def relative_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    return ((got.double() - exact).norm() / exact.norm()).item()


def spread_mask(live: int, capacity: int, generator: torch.Generator) -> torch.Tensor:
    """`live` rows drawn at random from the whole capacity, the last row among them."""
    rows = torch.randperm(capacity - 1, generator=generator)[: live - 1]
    active = torch.zeros(capacity, dtype=torch.bool)
    active[rows] = True
    active[-1] = True
    return active


@dataclass
class CudaCase:
    """One layer of the CUDA table, its baseline and inputs (see :func:`cuda_case`)."""

    layer: growop.GrowLinear
    baseline: torch.nn.Linear
    live_rows: torch.Tensor
    out_features: int
    capacity: int
    x: torch.Tensor
    grad_growop: torch.Tensor
    grad_live: torch.Tensor


def cuda_case(dtype_name: str, mask: str, gen, device) -> CudaCase:
    """The CUDA_CASE layer with `mask`'s live rows (its host-side live count set to match),
    nn.Linear holding those rows, an input that asks for its gradient, and grad_outputs."""
    batch, in_features, live = CUDA_CASE
    capacity, layout = CUDA_MASKS[mask]
    dtype, device = CUDA_DTYPES[dtype_name], torch.device(device)
    torch.backends.cuda.matmul.allow_tf32 = dtype_name == "tf32"
    if layout == "prefix":
        active = torch.arange(capacity) < live
    elif capacity > 2 * live:
        active = spread_mask(live, capacity, gen)
    else:
        active = fragmented_mask(live, capacity, gen)
    out_features = int(active.nonzero().max()) + 1
    layer = growop.GrowLinear(in_features, out_features, capacity=capacity, device=device, dtype=dtype)
    with torch.no_grad():
        layer.active.copy_(active)
    layer._live_count = live  # the mask was set directly: the host-side count to match
    live_rows = layer.active.nonzero().squeeze(1)
    baseline = torch.nn.Linear(in_features, live, device=device, dtype=dtype)
    with torch.no_grad():
        baseline.weight.copy_(layer.weight[live_rows])
        baseline.bias.copy_(layer.bias[live_rows])
    # The input asks for its gradient, as a head's input does inside a network: forward+
    # backward is three GEMMs.
    x = torch.randn(batch, in_features, device=device, dtype=dtype, requires_grad=True)
    grad_growop = torch.randn(batch, out_features, device=device, dtype=dtype)
    grad_live = grad_growop[:, live_rows].contiguous()
    return CudaCase(layer, baseline, live_rows, out_features, capacity, x, grad_growop, grad_live)


def bench_cuda_case(dtype_name: str, mask: str, warmup: int, repeats: int, gen, device="cuda") -> dict:
    """One row of the CUDA table. On another device (a smoke test of this code) the same
    providers are timed with the host clock."""
    case = cuda_case(dtype_name, mask, gen, device)
    layer, baseline, live_rows, x = case.layer, case.baseline, case.live_rows, case.x
    grad_growop, grad_live, out_features, capacity = case.grad_growop, case.grad_live, case.out_features, case.capacity
    batch, in_features, live = CUDA_CASE
    dtype = CUDA_DTYPES[dtype_name]
    weight, bias = layer.weight, layer.bias
    layout = CUDA_MASKS[mask][1]
    # static_shape only where the capacity is the case's 40000: its output is capacity wide.
    static = capacity == CUDA_CAPACITY
    grad_static = torch.randn(batch, capacity, device=x.device, dtype=dtype) if static else None

    def kernels():  # gather without a live count: the live-row kernels
        with growop.strategy("gather"):
            return growop.functional.masked_linear(
                x, weight, bias, active=layer.active, out_features=out_features)

    def static_forward():
        layer.static_shape = True
        try:
            return layer(x)
        finally:
            layer.static_shape = False

    with torch.no_grad():  # the same function as nn.Linear, and as accurate
        exact = F.linear(x.detach().double(), baseline.weight.double(), baseline.bias.double())
        theirs = baseline(x)
        torch_err = relative_error(theirs, exact)
        errors = {}
        for provider, fn in (("auto", lambda: layer(x)), ("gather", under("gather", lambda: layer(x))),
                             ("kernels", kernels)):
            errors[provider] = relative_error(fn()[:, live_rows], exact) / torch_err
        del exact, theirs

    slice_forward = plain_slice_forward(x, weight, bias, live_rows, layout == "prefix")
    params = [weight, bias, x]
    forward_fns = {
        "linear": lambda: baseline(x),
        **{s: under(s, lambda: layer(x)) for s in STRATEGIES},
        "kernels": kernels,
        "static": static_forward,
        "slice": slice_forward,
    }
    both_fns = {
        "linear": training_step(lambda: baseline(x), grad_live, [*baseline.parameters(), x]),
        **{s: under(s, training_step(lambda: layer(x), grad_growop, params)) for s in STRATEGIES},
        "kernels": training_step(kernels, grad_growop, params),
        "static": training_step(static_forward, grad_static, params),
        "slice": training_step(slice_forward, grad_live, params),
    }
    if not static:
        del forward_fns["static"], both_fns["static"]
    timings = cuda_timings if x.device.type == "cuda" else host_timings
    with torch.no_grad():
        forward = timings(forward_fns, warmup, repeats)
    both = timings(both_fns, warmup, repeats)
    torch.backends.cuda.matmul.allow_tf32 = False
    flops = 2 * batch * in_features * live
    base_fwd, base_both = forward["linear"].median, both["linear"].median
    row = {
        "dtype": dtype_name, "mask": mask, "batch": batch, "in": in_features, "live": live,
        "capacity": capacity, "width": out_features, "fwd_linear_ms": base_fwd, "fb_linear_ms": base_both,
        "fwd_linear_tflops": flops / base_fwd / 1e9, "fb_linear_tflops": 3 * flops / base_both / 1e9,
    }
    nan = float("nan")
    for provider in (*CUDA_PROVIDERS, "slice"):
        fwd = forward[provider].median if provider in forward else nan
        fb = both[provider].median if provider in both else nan
        row[f"fwd_{provider}_ms"], row[f"fwd_{provider}_ratio"] = fwd, fwd / base_fwd
        row[f"fb_{provider}_ms"], row[f"fb_{provider}_ratio"] = fb, fb / base_both
    for provider, ratio in errors.items():
        row[f"err_{provider}_x"] = ratio
    del case, layer, baseline, x, grad_growop, grad_live, grad_static, forward_fns, both_fns
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def profile_cuda_case(dtype_name: str, mask: str, gen, device="cuda", steps: int = 3,
                      static_shape: bool = False) -> str:
    """Where GrowLinear's forward+backward (under auto) spends its time, kernel by kernel,
    beside nn.Linear's on the live rows: a torch.profiler table per provider, sorted by device
    time, over `steps` steps after a warm-up. Returns the tables as text."""
    from torch.profiler import ProfilerActivity, profile

    case = cuda_case(dtype_name, mask, gen, device)
    layer, x = case.layer, case.x
    layer.static_shape = static_shape
    grad = (torch.randn(x.shape[0], case.capacity, device=x.device, dtype=x.dtype)
            if static_shape else case.grad_growop)
    on_gpu = x.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    sort_by = "device_time_total" if on_gpu else "cpu_time_total"
    sections = []
    for name, step in (
        ("nn.Linear", training_step(lambda: case.baseline(x), case.grad_live,
                                    [*case.baseline.parameters(), x])),
        ("GrowLinear", training_step(lambda: layer(x), grad, [layer.weight, layer.bias, x])),
    ):
        step()
        if on_gpu:
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            for _ in range(steps):
                step()
            if on_gpu:
                torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by=sort_by, row_limit=14, max_name_column_width=60)
        sections.append(f"--- {name}, {dtype_name} {mask}{' static_shape' if static_shape else ''}, "
                        f"{steps} steps of forward+backward\n{table}")
    del case, layer, x, grad
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return "\n".join(sections)


def cuda_crossover(rows: list[dict]) -> None:
    """R* on this GPU from the fragmented rows: dense costs about width / live times the
    live rows' GEMMs, gather (packed) a fixed ratio g over them, so gather wins from
    R* = g x R / dense_ratio up."""
    print("\ncrossover: R* = gather ratio x (width / live) / dense ratio, forward+backward")
    for row in rows:
        if row["mask"] == "prefix":
            continue
        r = row["width"] / row["live"]
        estimate = row["fb_gather_ratio"] * r / row["fb_dense_ratio"]
        row["crossover_estimate"] = estimate
        print(f"{row['dtype']:5} {row['mask']:12} width/live {r:5.2f}: dense {row['fb_dense_ratio']:5.2f}x, "
              f"gather {row['fb_gather_ratio']:5.2f}x, kernels {row['fb_kernels_ratio']:5.2f}x -> R* ~ {estimate:4.2f}")


def bench_cuda_grow(repeats: int, device="cuda") -> dict:
    """grow(1) within capacity against a new nn.Linear with the rows copied, on the GPU,
    host clock around each call with the device synchronised (what a training loop waits)."""
    in_features, live = CUDA_CASE[1], CUDA_CASE[2]
    device, dtype = torch.device(device), torch.bfloat16

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize()

    layer = growop.GrowLinear(in_features, live, capacity=CUDA_CAPACITY, device=device, dtype=dtype)
    linear = torch.nn.Linear(in_features, live, device=device, dtype=dtype)
    layer.grow(1)
    add_output_nodes(linear, 1)  # warm-up
    grow_times, copy_times = [], []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        layer.grow(1)
        synchronize()
        grow_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        grown = add_output_nodes(linear, 1)
        synchronize()
        copy_times.append(time.perf_counter() - start)
        del grown
    grow_ms, copy_ms = summarize(grow_times).median, summarize(copy_times).median
    return {"capacity": CUDA_CAPACITY, "grow_ms": grow_ms, "copy_ms": copy_ms, "speedup": copy_ms / grow_ms}


def main_cuda(args) -> None:
    if not torch.cuda.is_available():
        raise SystemExit(f"--device cuda: CUDA is not available to this torch ({torch.__version__})")
    gen = torch.Generator().manual_seed(0)
    name = torch.cuda.get_device_name()
    stamp = f"{name}; torch {torch.__version__}; CUDA {torch.version.cuda}; {datetime.date.today()}"
    print(f"# {stamp}")
    print(f"# (batch, in, live) = {CUDA_CASE}; x = growop / nn.Linear on the live rows (medians of "
          f"{args.repeats or 10} CUDA-event timings); err x = growop's error / nn.Linear's, against float64")
    header = (f"{'dtype':5} {'mask':12} {'cap':>6} {'lin f+b ms':>10} "
              + " ".join(f"{'fwd ' + s:>12}" for s in (*CUDA_PROVIDERS, "slice")) + " "
              + " ".join(f"{'f+b ' + s:>12}" for s in (*CUDA_PROVIDERS, "slice"))
              + " " + " ".join(f"{'err x ' + s:>14}" for s in ("auto", "gather", "kernels")))
    if args.profile:
        for dtype_name in args.dtypes:
            for mask in args.masks:
                print(profile_cuda_case(dtype_name, mask, gen), flush=True)
                if CUDA_MASKS[mask][0] == CUDA_CAPACITY:
                    print(profile_cuda_case(dtype_name, mask, gen, static_shape=True), flush=True)
        return
    print(header)
    rows = []
    for dtype_name in args.dtypes:
        for mask in args.masks:
            row = bench_cuda_case(dtype_name, mask, warmup=3, repeats=args.repeats or 10, gen=gen)
            rows.append(row)
            print(f"{dtype_name:5} {mask:12} {row['capacity']:6} {row['fb_linear_ms']:10.2f} "
                  + " ".join(f"{row[f'fwd_{s}_ratio']:12.2f}" for s in (*CUDA_PROVIDERS, "slice")) + " "
                  + " ".join(f"{row[f'fb_{s}_ratio']:12.2f}" for s in (*CUDA_PROVIDERS, "slice"))
                  + " " + " ".join(f"{row[f'err_{s}_x']:14.2f}" for s in ("auto", "gather", "kernels")),
                  flush=True)
    cuda_crossover(rows)
    print(f"\ngrow(1) within capacity vs add_output_nodes on {name}, bf16, (in, rows) = "
          f"({CUDA_CASE[1]}, {CUDA_CASE[2]})")
    g = bench_cuda_grow(repeats=10)
    print(f"{'cap':>7} {'grow ms':>9} {'copy ms':>9} {'speedup':>8}")
    print(f"{g['capacity']:7} {g['grow_ms']:9.3f} {g['copy_ms']:9.2f} {g['speedup']:8.0f}", flush=True)
    if args.csv:
        write_cuda_csv(args.csv, stamp, rows, g)
        print(f"\nrows appended to {args.csv}")


def write_cuda_csv(path: str, stamp: str, rows: list[dict], grow: dict) -> None:
    """One header line per run (columns vary with the providers measured), then its rows."""
    rows = [{"kind": "linear-cuda", "stamp": stamp, **row} for row in rows]
    rows.append({"kind": "grow-cuda", "stamp": stamp, **grow})
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
