"""How growop's figures are taken: time, memory, the machine, and the rows a benchmark writes.

The demos (``growop.demo``), the benchmarks (``benchmarks/``) and the tests all measure
through this module, so a figure means the same wherever it is printed. It is not part of
the layer API and ``import growop`` does not import it.

Time, several providers side by side::

    timings = time_interleaved({"linear": step_linear, "growop": step_growop}, repeats=11)
    timings["growop"].median_ms, timings["growop"].p20_ms, timings["growop"].p80_ms
    speed = ratio(timings["growop"], timings["linear"])   # per-round ratios: median, p20, p80
    format_ratio(speed)                                   # "1.07", "1.07?" or "noisy"

Every provider takes one sample per round, in an order that rotates each round, so drift
in the machine's speed (other jobs, clocks) falls on all of them alike; a sample can be
the fastest of a few bursts (``best_of``), so short calls survive a busy machine; a ratio
is the median of the rounds' own ratios. A ratio whose p20..p80 spread exceeds
``FLAG_SPREAD`` of it is printed with a ``?``; one whose spread exceeds the ratio itself is
withheld (``noisy``). On CUDA each call is timed with CUDA events.

Interleaved timing of several implementations of one function (a fused loss against
torch's, say) is the same call with those providers; :func:`time_call` times one call with
the device synchronised around it.

Memory, the bytes one call allocates and the most it holds at once above what was held
before it (here the extra peak of a forward+backward)::

    used = measure_allocations(lambda: loss_fn(x).backward(), device="cpu")   # or "cuda"
    used.seconds, used.allocated, used.peak

On the CPU it reads torch's memory profiler (quietly: the profiler's own status lines are
dropped from stderr, anything else written there passes through); on CUDA the caching
allocator's statistics.

Rows: ``csv_row(...)`` makes one row of the fixed long format every benchmark appends
(``CSV_FIELDS``: what was measured, its median, p20 and p80, the machine, torch and the
date); ``write_csv(path, rows)`` appends them. ``benchmark_parser`` makes a benchmark's
parser with ``--quick``, ``--repeats``, ``--threads`` and ``--csv`` (default:
``benchmarks/out/``, which git ignores); ``apply_harness_options`` sets the threads and
checks the CSV before the run.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import gc
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

# A ratio is printed with "?" when its p20..p80 spread exceeds this fraction of it, and
# withheld ("noisy") when the spread exceeds the ratio itself.
FLAG_SPREAD = 0.25
RATIO_LEGEND = (
    f"x = median of the per-round ratios; ? = their p20..p80 spread exceeds {FLAG_SPREAD:.0%} "
    "of the ratio; noisy = it exceeds the ratio itself (withheld: rerun with more --repeats, "
    "or on a quieter machine)"
)


# ----------------------------------------------------------------------------- the machine


def as_device(device: torch.device | str | None) -> torch.device:
    return torch.device("cpu" if device is None else device)


def synchronize(device: torch.device | str | None = None) -> None:
    """Waits for the device's queued work (CUDA); nothing on the CPU."""
    device = as_device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device | str | None = None) -> str:
    """The GPU's name, or the CPU model as Linux reports it."""
    device = as_device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine(device: torch.device | str | None = None) -> str:
    """The device's name, with torch's thread count on the CPU or CUDA's version on a GPU."""
    device = as_device(device)
    if device.type == "cuda":
        return f"{device_name(device)}, CUDA {torch.version.cuda}"
    threads = torch.get_num_threads()
    return f"{device_name(device)}, {threads} thread{'s' if threads != 1 else ''}"


@dataclass(frozen=True)
class Stamp:
    """Where and when a figure was taken: printed above a table, written with each row."""

    machine: str
    torch: str
    date: str

    def __str__(self) -> str:
        return f"{self.machine}; torch {self.torch}; {self.date}"


def stamp(device: torch.device | str | None = None) -> Stamp:
    return Stamp(describe_machine(device), torch.__version__, datetime.date.today().isoformat())


# ----------------------------------------------------------------------------- time


@dataclass(frozen=True)
class Timing:
    """Seconds per call, one sample per round in round order; summaries in milliseconds."""

    samples: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples) * 1e3

    @property
    def p20_ms(self) -> float:
        return quantile(self.samples, 0.2) * 1e3

    @property
    def p80_ms(self) -> float:
        return quantile(self.samples, 0.8) * 1e3


def quantile(samples: Sequence[float], q: float) -> float:
    """The sample at rank ``q`` (nearest rank below; p20 of 11 samples is the third)."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def time_call(fn: Callable[[], Any], device: torch.device | str | None = None) -> tuple[Any, float]:
    """``fn()`` once: its result and the seconds it took, the device synchronised around it."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def time_interleaved(
    fns: Mapping[str, Callable[[], Any]],
    repeats: int,
    *,
    warmup: int = 1,
    inner: int = 1,
    best_of: int = 1,
    device: torch.device | str | None = None,
) -> dict[str, Timing]:
    """Times every function in ``fns`` ``repeats`` times, round by round, after ``warmup``
    untimed rounds.

    In each round every function takes one sample, the functions in an order rotated by
    one each round, so no function always follows the same one. A sample is the fastest
    of ``best_of`` bursts of ``inner`` calls in a row, as the time of one call: a burst
    that another process interrupted is not the one kept, which is what makes short calls
    measurable on a busy machine (take ``best_of`` > 1 for calls of a few milliseconds or
    less; a long call is interrupted in every burst alike). On the CPU each burst is timed
    with the host clock; on CUDA with events recorded on the current stream, read after
    the last round. Python's garbage collector is paused meanwhile.
    """
    if min(repeats, inner, best_of) < 1 or warmup < 0:
        raise ValueError(
            f"repeats, inner and best_of must be >= 1 and warmup >= 0, got {repeats}, {inner}, {best_of}, {warmup}"
        )
    device = as_device(device)
    names = list(fns)
    on_gpu = device.type == "cuda"
    samples: dict[str, list] = {name: [] for name in names}
    with _garbage_collector_paused():
        for round_ in range(warmup + repeats):
            _take_round(fns, names[round_ % len(names):] + names[: round_ % len(names)],
                        samples if round_ >= warmup else None, inner, best_of, on_gpu)
    if on_gpu:
        torch.cuda.synchronize(device)
        samples = {n: [[s.elapsed_time(e) / 1e3 for s, e in b] for b in bs] for n, bs in samples.items()}
    return {name: Timing(tuple(min(b) / inner for b in bs)) for name, bs in samples.items()}


@contextlib.contextmanager
def _garbage_collector_paused() -> Iterator[None]:
    """No automatic garbage collection inside the block, as ``timeit`` does: a full one
    takes a tenth of a second with torch loaded and would land inside some sample."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _take_round(fns, order, samples, inner: int, best_of: int, on_gpu: bool) -> None:
    """One sample of each function in ``order``, appended to ``samples`` (None: warm-up)."""
    for name in order:
        fn = fns[name]
        bursts = []
        for _ in range(best_of):
            if on_gpu:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(inner):
                    fn()
                end.record()
                bursts.append((start, end))
            else:
                start_s = time.perf_counter()
                for _ in range(inner):
                    fn()
                bursts.append(time.perf_counter() - start_s)
        if samples is not None:
            samples[name].append(bursts)


# ----------------------------------------------------------------------------- ratios


@dataclass(frozen=True)
class Ratio:
    """A time over a baseline's: the median, and the p20 and p80 it spreads between."""

    median: float
    p20: float
    p80: float

    @property
    def spread(self) -> float:
        return self.p80 - self.p20

    @property
    def verdict(self) -> str:
        """``ok``, ``flagged`` (spread above ``FLAG_SPREAD`` of the ratio) or ``withheld``
        (spread above the ratio itself)."""
        if not self.spread <= self.median:  # NaN too
            return "withheld"
        return "flagged" if self.spread > FLAG_SPREAD * self.median else "ok"


def ratio(timing: Timing, baseline: Timing, *, paired: bool = True) -> Ratio:
    """``timing`` over ``baseline``.

    ``paired`` (both from one :func:`time_interleaved`): the median, p20 and p80 of the
    rounds' own ratios, so drift between rounds cancels. Otherwise (measured one after the
    other): the ratio of the medians, between the most and least favourable pairing of the
    two p20/p80 (wider, as it should be).
    """
    if paired:
        if len(timing.samples) != len(baseline.samples):
            raise ValueError(
                f"paired ratio of {len(timing.samples)} samples over {len(baseline.samples)}: "
                "time both in one time_interleaved call, or pass paired=False"
            )
        per_round = [t / b for t, b in zip(timing.samples, baseline.samples)]
        return Ratio(statistics.median(per_round), quantile(per_round, 0.2), quantile(per_round, 0.8))
    return Ratio(
        timing.median_ms / baseline.median_ms,
        timing.p20_ms / baseline.p80_ms,
        timing.p80_ms / baseline.p20_ms,
    )


def format_ratio(value: Ratio, width: int = 0, digits: int = 2) -> str:
    """``1.07`` when the ratio can be read, ``1.07?`` when flagged, ``noisy`` when withheld;
    right-aligned to ``width``."""
    verdict = value.verdict
    if verdict == "withheld":
        text = "noisy"
    else:
        text = f"{value.median:.{digits}f}" + ("?" if verdict == "flagged" else "")
    return f"{text:>{width}}"


# ----------------------------------------------------------------------------- memory


class Allocations(NamedTuple):
    """What one call cost: ``seconds``, bytes ``allocated`` (every allocation summed) and
    the ``peak`` bytes held at once above what was held before the call."""

    seconds: float
    allocated: int
    peak: int


# torch's profiler writes these to the process's stderr from C++ on every start and stop,
# whatever KINETO_LOG_LEVEL says, and the second whenever a block allocated before the
# profile is freed inside it (such a free is then not counted: see measure_allocations).
PROFILER_NOISE = re.compile(
    r"^USDT:.*\] profiler_(start|stop)\s*$"
    r"|Memory block of unknown size was allocated before the profiling started"
)


@contextlib.contextmanager
def _without_profiler_noise() -> Iterator[None]:
    """Sends file descriptor 2 to a temporary file for the block, then writes every line
    written there back to ``sys.stderr``, except torch's profiler status lines
    (``PROFILER_NOISE``): warnings and errors still show, after the block."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable descriptor 2: nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [
                line
                for line in captured.read().decode(errors="replace").splitlines(keepends=True)
                if not PROFILER_NOISE.search(line)
            ]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def measure_allocations(fn: Callable[[], Any], device: torch.device | str | None = None) -> Allocations:
    """Runs ``fn`` once and returns what it took: seconds, bytes allocated, peak bytes.

    CPU: torch's memory profiler. ``allocated`` sums every allocation torch made during the
    call, each event's own memory counted once (an op's total includes the ops it calls);
    ``peak`` is the highest net amount (allocations minus frees) reached, taking the
    profiler's allocation and free records in the order they happened, so a temporary an
    op frees before it returns counts while it lives (ordering whole events instead would
    count an op's frees at its start, before its children allocate). A block allocated
    before the call and freed inside it lowers the count only where an earlier profile saw
    it allocated (torch's profiler knows no other block's size); ``peak`` never falls below
    zero.
    CUDA: the caching allocator's statistics, the device synchronised around the call;
    ``peak`` is the most allocated at once during the call minus what was allocated
    before it. Host memory is not counted there.
    """
    device = as_device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        held = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_stats(device).get("allocated_bytes.all.allocated", 0)
        _, seconds = time_call(fn, device)
        after = torch.cuda.memory_stats(device).get("allocated_bytes.all.allocated", 0)
        return Allocations(seconds, after - before, torch.cuda.max_memory_allocated(device) - held)

    from torch.profiler import ProfilerActivity, profile

    with _without_profiler_noise():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            _, seconds = time_call(fn)
        total = sum(max(event.self_cpu_memory_usage, 0) for event in prof.events())
        # Each allocation and free as the profiler recorded it (what prof.events() folds into
        # its ops' totals), in time order.
        records = sorted(
            (record.start_ns(), record.nbytes())
            for record in prof.profiler.kineto_results.events()
            if record.name() == "[memory]"
        )
    peak = current = 0
    for _, change in records:
        current += change
        peak = max(peak, current)
    return Allocations(seconds, total, peak)


def format_bytes(n: float) -> str:
    """``512 B``, ``3.0 KiB``, ``1.5 MiB``, ``2.0 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- rows and options

# The one row format every benchmark appends: a run never changes the columns, so one CSV
# can hold every run of every benchmark.
CSV_FIELDS = ("bench", "case", "provider", "metric", "unit", "median", "p20", "p80", "machine", "torch", "date")


def csv_row(
    bench: str,
    case: str,
    provider: str,
    metric: str,
    unit: str,
    value: float | Timing | Ratio,
    p20: float | None = None,
    p80: float | None = None,
) -> dict[str, Any]:
    """One measurement as a row of ``CSV_FIELDS`` (the stamp is added by ``write_csv``). A
    :class:`Timing` gives its median, p20 and p80 in ms, a :class:`Ratio` its own."""
    if isinstance(value, Timing):
        value, p20, p80 = value.median_ms, value.p20_ms, value.p80_ms
    elif isinstance(value, Ratio):
        value, p20, p80 = value.median, value.p20, value.p80
    return {"bench": bench, "case": case, "provider": provider, "metric": metric, "unit": unit,
            "median": value, "p20": "" if p20 is None else p20, "p80": "" if p80 is None else p80}


def check_csv(path: Path) -> None:
    """Raises ``SystemExit`` now, before a run, if ``path`` exists with other columns."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open(newline="") as f:
        header = next(csv.reader(f), [])
    if tuple(header) != CSV_FIELDS:
        raise SystemExit(
            f"{path} holds rows of another format (its first line is {','.join(header)[:120]!r}); "
            f"benchmarks append rows of {','.join(CSV_FIELDS)}: pass another --csv path"
        )


def write_csv(path: Path | str, rows: Sequence[Mapping[str, Any]], run: Stamp) -> Path:
    """Appends ``rows`` (from :func:`csv_row`) to ``path`` with ``run``'s machine, torch and
    date, writing the header first into a new file; returns the path."""
    path = Path(path)
    check_csv(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({**row, "machine": run.machine, "torch": run.torch, "date": run.date})
    return path


def benchmark_parser(script: str, doc: str | None, *, repeats: int, quick: str, threads: bool = True) -> argparse.ArgumentParser:
    """The parser every benchmark starts from: ``python benchmarks/<script>`` as its name,
    the script's docstring ``doc`` as ``--help``'s text, and ``--quick`` (its help says what
    it runs and how long), ``--repeats`` (default ``repeats``), ``--threads`` (default 1;
    not for a GPU benchmark) and ``--csv`` (default ``out/<script's name>.csv`` beside the
    script, a folder git ignores)."""
    path = Path(script)
    parser = argparse.ArgumentParser(
        prog=f"python {path.parent.name}/{path.name}", description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--repeats", type=int, default=None, help=f"timed rounds per measurement (default {repeats})")
    if threads:
        parser.add_argument("--threads", type=int, default=1,
                            help="torch.set_num_threads (default 1: on a shared or small machine more "
                                 "threads make small GEMMs spin and ratios jump between runs)")
    csv_default = path.resolve().with_name("out") / f"{path.stem}.csv"
    parser.add_argument("--csv", type=Path, default=csv_default,
                        help=f"CSV to append rows to (default out/{csv_default.name} beside the script, "
                             "which git ignores)")
    return parser


def apply_harness_options(args: argparse.Namespace) -> Path:
    """Sets torch's threads from ``--threads`` and checks ``--csv`` before the run; returns it."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    check_csv(args.csv)
    return args.csv
