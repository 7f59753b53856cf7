"""GrowLinear's CUDA path against nn.Linear on the live rows, side by side in one run.

    python benchmarks/bench_linear_cuda.py             # every mask, bf16 and TF32: under 100 s on an H200
    python benchmarks/bench_linear_cuda.py --quick     # prefix and small50 in bf16 only
    python benchmarks/bench_linear_cuda.py --profile --dtypes bf16 --masks fragmented50 prefix small50

A default run takes under 100 s on an H200 (``benchmarks/device_check.sh`` runs it with
``--repeats 8`` in that budget, then the third line). A vocabulary-sized head, (batch, in, live) = (8192, 4096, 32000), with each
mask of ``CUDA_MASKS``: ``prefix`` (capacity 40000, the default headroom), ``fragmented``
(80% of 40000 live, at random), ``fragmented50`` (50% of 64000), ``spread16`` (6% of 512000,
where auto must take gather), and ``small50``, a thousand-class head (256, 1024 -> 1000)
at 50% of 2000: the smallest saving for which auto takes gather on CUDA.

Every provider (``linear_cases.py``; here also ``kernels``, gather's live-row kernels
without a live count) is timed with CUDA events, rounds interleaved after 3 warm-up
rounds; a ratio is the median of the rounds' own ratios over nn.Linear, flagged ``?`` or
withheld (``noisy``) when its p20..p80 spread is too wide (see growop.measure). The input
asks for its gradient, so forward+backward is three GEMMs. ``err x`` is growop's error
against float64 over nn.Linear's. Then R* estimated from the fragmented rows, and
``grow(1)`` within capacity against ``add_output_nodes`` in bf16. ``--profile`` prints,
instead of the table, where each forward+backward's GPU time goes, kernel by kernel.

Rows go to benchmarks/out/bench_linear_cuda.csv (ignored by git) unless ``--csv`` names
another file. The CPU benchmark is bench_linear_cpu.py.
"""

from __future__ import annotations

import argparse
import gc
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import growop
from growop.measure import RATIO_LEGEND, apply_harness_options, benchmark_parser, csv_row, stamp, write_csv
from linear_cases import (
    GROW_HEADER,
    STRATEGIES,
    LinearCase,
    Measured,
    bench_grow,
    build_case,
    csv_rows,
    grow_line,
    grow_rows,
    make_mask,
    measure_case,
    ratio_cells,
    training_step,
    under,
)

BENCH = "bench_linear_cuda"
VOCAB_CASE = (8192, 4096, 32000)  # (batch, in_features, live rows): an LM head's vocabulary
# bf16, and float32 as nn.Linear runs it on tensor cores (TF32 allowed); "fp32" is strict.
CUDA_DTYPES = {"bf16": torch.bfloat16, "tf32": torch.float32, "fp32": torch.float32}
# mask name -> ((batch, in, live), capacity, how the live rows lie: linear_cases.make_mask).
CUDA_MASKS = {
    "prefix": (VOCAB_CASE, 40000, "prefix"),
    "fragmented": (VOCAB_CASE, 40000, "random"),
    "fragmented50": (VOCAB_CASE, 2 * VOCAB_CASE[2], "random"),
    "spread16": (VOCAB_CASE, 16 * VOCAB_CASE[2], "spread"),
    "small50": ((256, 1024, 1000), 2000, "random"),
}
# The GrowLinear providers of the table: the three strategies through the layer (with its
# host-side live count, so gather runs cuBLAS on the packed live rows), the live-row
# kernels, static_shape (where the capacity has 25% headroom), then the plain slice.
COLUMNS = (*STRATEGIES, "kernels", "static", "slice")
ERROR_PROVIDERS = ("auto", "gather", "kernels")
# grow(1) at (in, live rows) within this capacity, in bf16.
GROW_CASE, GROW_CAPACITY = (4096, 32000), 40000
WARMUP, REPEATS, QUICK_REPEATS, GROW_REPEATS = 3, 10, 5, 10
QUICK = {"dtypes": ["bf16"], "masks": ["prefix", "small50"]}


@dataclass
class CudaRow:
    """One row of the table: the case, every provider's timings, and errors against float64."""

    dtype: str
    mask: str
    case: tuple[int, int, int]
    capacity: int
    width: int
    measured: Measured
    errors: dict[str, float]

    @property
    def label(self) -> str:
        batch, in_features, live = self.case
        return f"{self.dtype} {self.mask} ({batch}, {in_features} -> {live}) capacity {self.capacity} width {self.width}"

    def line(self) -> str:
        return (f"{self.dtype:5} {self.mask:12} {self.capacity:6} {self.measured.both['linear'].median_ms:10.2f} "
                + ratio_cells(self.measured, "fwd", COLUMNS, 12) + " "
                + ratio_cells(self.measured, "fb", COLUMNS, 12) + " "
                + " ".join(f"{self.errors[p]:14.2f}" for p in ERROR_PROVIDERS))

    def csv_rows(self) -> list[dict]:
        """Every provider's times and ratios, and the errors over nn.Linear's."""
        return csv_rows(BENCH, self.label, self.measured) + [
            csv_row(BENCH, self.label, p, "error_ratio", "x", e) for p, e in self.errors.items()
        ]


HEADER = (f"{'dtype':5} {'mask':12} {'cap':>6} {'lin f+b ms':>10} "
          + " ".join(f"{'fwd ' + s:>12}" for s in COLUMNS) + " "
          + " ".join(f"{'f+b ' + s:>12}" for s in COLUMNS) + " "
          + " ".join(f"{'err x ' + s:>14}" for s in ERROR_PROVIDERS))


def cuda_case(dtype_name: str, mask: str, gen: torch.Generator, device) -> LinearCase:
    """The layer of ``mask`` in ``dtype_name`` (TF32 allowed for "tf32" only), nn.Linear on
    its live rows, an input that asks for its gradient, and grad_outputs."""
    (batch, in_features, live), capacity, layout = CUDA_MASKS[mask]
    torch.backends.cuda.matmul.allow_tf32 = dtype_name == "tf32"
    active = make_mask(layout, live, capacity, gen)
    return build_case(batch, in_features, active, gen, device=device, dtype=CUDA_DTYPES[dtype_name], input_grad=True)


def relative_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    return ((got.double() - exact).norm() / exact.norm()).item()


def errors_against_float64(case: LinearCase) -> dict[str, float]:
    """Each of ``ERROR_PROVIDERS``' error on the live columns over nn.Linear's, both
    against the same function computed in float64."""
    layer, x, live_rows = case.layer, case.x, case.live_rows

    def kernels():  # gather without a live count: the live-row kernels
        with growop.strategy("gather"):
            return growop.functional.masked_linear(x, layer.weight, layer.bias, active=layer.active,
                                                   out_features=layer.out_features)

    with torch.no_grad():
        exact = F.linear(x.detach().double(), case.baseline.weight.double(), case.baseline.bias.double())
        theirs = relative_error(case.baseline(x), exact)
        calls = {"auto": lambda: layer(x), "gather": under("gather", lambda: layer(x)), "kernels": kernels}
        return {p: relative_error(calls[p]()[:, live_rows], exact) / theirs for p in ERROR_PROVIDERS}


def bench_cuda_case(dtype_name: str, mask: str, warmup: int, repeats: int, gen, device="cuda") -> CudaRow:
    """One row of the table. On another device (a smoke test of this code) the same
    providers are timed with the host clock."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        case = cuda_case(dtype_name, mask, gen, device)
        errors = errors_against_float64(case)
        measured = measure_case(case, repeats, warmup=warmup, kernels=True)
        row = CudaRow(dtype_name, mask, CUDA_MASKS[mask][0], case.layer.capacity, case.layer.out_features,
                      measured, errors)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    del case
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def profile_cuda_case(dtype_name: str, mask: str, gen, device="cuda", steps: int = 3,
                      static_shape: bool = False) -> str:
    """Where GrowLinear's forward+backward (under auto) spends its time, kernel by kernel,
    beside nn.Linear's on the live rows: a torch.profiler table per provider, sorted by device
    time, over ``steps`` steps after a warm-up. Returns the tables as text."""
    from torch.profiler import ProfilerActivity, profile

    tf32 = torch.backends.cuda.matmul.allow_tf32
    case = cuda_case(dtype_name, mask, gen, device)
    layer, x = case.layer, case.x
    layer.static_shape = static_shape
    grad = case.grad_static if static_shape else case.grad_growop
    on_gpu = x.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    sort_by = "device_time_total" if on_gpu else "cpu_time_total"
    sections = []
    try:
        for name, step in (
            ("nn.Linear", training_step(lambda: case.baseline(x), case.grad_live, [*case.baseline.parameters(), x])),
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
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    del case, layer, x, grad
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return "\n".join(sections)


def crossover_estimates(rows: list[CudaRow]) -> dict[str, float]:
    """R* on this GPU from the fragmented rows: dense costs about width / live times the
    live rows' GEMMs, gather (packed) a fixed ratio g over them, so gather wins from
    R* = g x R / dense_ratio up. Prints a line per row; returns the estimates by label."""
    print("\ncrossover: R* = gather ratio x (width / live) / dense ratio, forward+backward")
    estimates = {}
    for row in rows:
        if row.mask == "prefix":
            continue
        r = row.width / row.case[2]
        dense, gather, kernels = (row.measured.ratio("fb", p).median for p in ("dense", "gather", "kernels"))
        estimates[row.label] = estimate = gather * r / dense
        print(f"{row.dtype:5} {row.mask:12} width/live {r:5.2f}: dense {dense:5.2f}x, "
              f"gather {gather:5.2f}x, kernels {kernels:5.2f}x -> R* ~ {estimate:4.2f}")
    return estimates


def parse_args(argv) -> argparse.Namespace:
    parser = benchmark_parser(__file__, __doc__, repeats=REPEATS, threads=False,
                              quick=f"{' and '.join(QUICK['masks'])} in bf16 only, {QUICK_REPEATS} rounds")
    parser.add_argument("--dtypes", nargs="+", choices=list(CUDA_DTYPES), default=None,
                        help="default: bf16 tf32")
    parser.add_argument("--masks", nargs="+", choices=list(CUDA_MASKS), default=None,
                        help="default: all")
    parser.add_argument("--profile", action="store_true",
                        help="instead of the table, where each forward+backward's GPU time goes, kernel by "
                             "kernel (torch.profiler), for --dtypes x --masks")
    args = parser.parse_args(argv)
    args.dtypes = args.dtypes or (QUICK["dtypes"] if args.quick else ["bf16", "tf32"])
    args.masks = args.masks or (QUICK["masks"] if args.quick else list(CUDA_MASKS))
    args.repeats = args.repeats or (QUICK_REPEATS if args.quick else REPEATS)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit(f"bench_linear_cuda.py needs a CUDA GPU; this torch ({torch.__version__}) sees none. "
                         "The CPU benchmark is benchmarks/bench_linear_cpu.py")
    csv_path = apply_harness_options(args)
    gen = torch.Generator().manual_seed(0)
    if args.profile:
        for dtype_name in args.dtypes:
            for mask in args.masks:
                print(profile_cuda_case(dtype_name, mask, gen), flush=True)
                if CUDA_MASKS[mask][1] <= 1.25 * CUDA_MASKS[mask][0][2]:
                    print(profile_cuda_case(dtype_name, mask, gen, static_shape=True), flush=True)
        return
    run_stamp = stamp("cuda")
    print(f"# {run_stamp}")
    print(f"# x = growop / nn.Linear on the live rows ({args.repeats} rounds of CUDA events); "
          "err x = growop's error / nn.Linear's, against float64")
    print(f"# {RATIO_LEGEND}")
    print(HEADER)
    rows, csv = [], []
    for dtype_name in args.dtypes:
        for mask in args.masks:
            row = bench_cuda_case(dtype_name, mask, warmup=WARMUP, repeats=args.repeats, gen=gen)
            rows.append(row)
            csv += row.csv_rows()
            print(row.line(), flush=True)
    for label, estimate in crossover_estimates(rows).items():
        csv.append(csv_row(BENCH, label, "gather", "crossover_estimate", "width/live", estimate))
    in_features, live = GROW_CASE
    print(f"\ngrow(1) within capacity vs add_output_nodes on {torch.cuda.get_device_name()}, bf16, "
          f"(in, rows) = {GROW_CASE}")
    print(GROW_HEADER)
    timings = bench_grow(in_features, live, GROW_CAPACITY, GROW_REPEATS, device="cuda", dtype=torch.bfloat16)
    print(grow_line(GROW_CAPACITY, timings), flush=True)
    csv += grow_rows(BENCH, f"grow bf16 ({in_features} -> {live}) capacity {GROW_CAPACITY}", timings)
    write_csv(csv_path, csv, run_stamp)
    print(f"\nrows appended to {csv_path}")


if __name__ == "__main__":
    main()
