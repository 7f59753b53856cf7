"""growop.measure: the timing, ratio, memory and CSV helpers the demos and benchmarks use."""

from __future__ import annotations

import csv
import os
import warnings

import pytest
import torch

from growop import measure
from growop.measure import PROFILER_NOISE, Ratio, Timing, format_ratio, measure_allocations, ratio


def test_measure_allocations_counts_each_allocation_once_and_the_peak():
    rows = torch.randn(1000, 64)
    _, allocated, peak = measure_allocations(lambda: torch.cat([rows, rows]))
    assert allocated == peak == 2 * rows.nbytes  # one new tensor, not once per nested op

    def two_in_turn():
        first = torch.zeros(1000, 64)
        del first
        second = torch.zeros(1000, 64)
        del second

    used = measure_allocations(two_in_turn)
    assert used.allocated == 2 * rows.nbytes and used.peak == rows.nbytes and used.seconds > 0


def test_measure_allocations_peak_counts_a_temporary_freed_inside_an_op():
    """F.cross_entropy's log-softmax is a (rows, classes) temporary that cross_entropy frees
    before it returns: it is held at the peak, though the op's own total is about zero."""
    logits = torch.randn(256, 1000)
    target = torch.randint(1000, (256,))
    used = measure_allocations(lambda: torch.nn.functional.cross_entropy(logits, target))
    assert used.peak >= logits.nbytes


def test_measure_allocations_drops_the_profilers_lines_and_keeps_everything_else(capfd):
    held = [torch.randn(4096)]  # allocated before the profile and freed inside it

    def call():
        held.pop()  # makes the profiler report "Memory block of unknown size ..."
        os.write(2, b"a line a kernel writes to stderr\n")
        warnings.warn("a warning raised inside the call")

    with pytest.warns(UserWarning, match="a warning raised inside the call"):
        measure_allocations(call)
    err = capfd.readouterr().err
    assert "a line a kernel writes to stderr" in err
    assert not [line for line in err.splitlines() if PROFILER_NOISE.search(line) or "USDT" in line], err


def test_the_profiler_noise_pattern_matches_what_torch_prints(capfd):
    # Without the filter the profiler does print these lines; were they to change, the
    # filter (and the test above) would no longer see them.
    from torch.profiler import ProfilerActivity, profile

    held = [torch.randn(4096)]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True):
        held.pop()
    lines = capfd.readouterr().err.splitlines()
    if not lines:
        pytest.skip(f"torch {torch.__version__}'s profiler prints nothing here")
    assert all(PROFILER_NOISE.search(line) for line in lines), lines


def test_time_interleaved_rotates_the_order_and_counts_rounds():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    timings = measure.time_interleaved(fns, repeats=3, warmup=1, inner=2)
    assert "".join(calls) == "aabbcc" + "bbccaa" + "ccaabb" + "aabbcc"
    assert all(len(t.samples) == 3 and t.median_ms >= 0 for t in timings.values())
    with pytest.raises(ValueError, match="repeats"):
        measure.time_interleaved(fns, repeats=0)


def test_a_sample_is_the_fastest_burst_as_one_calls_time(monkeypatch):
    # Bursts of two calls take 10 s, 4 s and 6 s on a fake clock: the sample is 2 s a call.
    ticks = iter([0.0, 10.0, 10.0, 14.0, 14.0, 20.0])
    monkeypatch.setattr(measure.time, "perf_counter", lambda: next(ticks))
    timings = measure.time_interleaved({"a": lambda: None}, repeats=1, warmup=0, inner=2, best_of=3)
    assert timings["a"].samples == (2.0,)


def test_timing_summaries_and_quantiles():
    timing = Timing(tuple(i / 1000 for i in (5, 1, 4, 2, 3, 9, 8, 7, 6, 10, 11)))
    assert timing.median_ms == pytest.approx(6.0)
    assert timing.p20_ms == pytest.approx(3.0) and timing.p80_ms == pytest.approx(9.0)


def test_paired_ratio_is_taken_round_by_round():
    # The machine slows down 10x halfway; each round's ratio stays 2.
    base = Timing((1.0, 1.0, 10.0, 10.0, 10.0))
    slow = Timing((2.0, 2.0, 20.0, 20.0, 20.0))
    paired = ratio(slow, base)
    assert (paired.median, paired.p20, paired.p80) == (2.0, 2.0, 2.0) and paired.verdict == "ok"
    apart = ratio(slow, base, paired=False)
    assert apart.median == pytest.approx(2.0) and apart.p20 < 1 < 10 < apart.p80
    with pytest.raises(ValueError, match="paired=False"):
        ratio(Timing((1.0,)), base)


def test_a_ratio_is_flagged_then_withheld_as_its_spread_grows():
    assert format_ratio(Ratio(1.07, 1.00, 1.10), 6) == "  1.07"
    assert format_ratio(Ratio(1.07, 0.90, 1.30)) == "1.07?"  # spread 0.40 > 25% of 1.07
    assert format_ratio(Ratio(1.07, 0.30, 7.56)) == "noisy"  # spread larger than the ratio
    assert Ratio(float("nan"), 1.0, 1.0).verdict == "withheld"


def test_csv_rows_append_under_one_header_and_another_format_is_refused(tmp_path):
    path = tmp_path / "out" / "bench.csv"
    run = measure.Stamp("a machine", "2.13.0", "2026-12-01")
    rows = [
        measure.csv_row("bench", "case", "linear", "fb_time", "ms", Timing((0.001, 0.002, 0.003))),
        measure.csv_row("bench", "case", "auto", "fb_ratio", "x", Ratio(1.1, 1.0, 1.2)),
        measure.csv_row("bench", "case", "auto", "allocated", "bytes", 42),
    ]
    measure.write_csv(path, rows[:2], run)
    measure.write_csv(path, rows[2:], run)
    with path.open(newline="") as f:
        written = list(csv.DictReader(f))
    assert list(written[0]) == list(measure.CSV_FIELDS)
    assert [r["metric"] for r in written] == ["fb_time", "fb_ratio", "allocated"]
    assert float(written[0]["median"]) == pytest.approx(2.0) and float(written[0]["p80"]) == pytest.approx(3.0)
    assert written[2]["p20"] == "" and written[2]["machine"] == "a machine"

    other = tmp_path / "old.csv"
    other.write_text("linear,some,positional,row\n")
    with pytest.raises(SystemExit, match="old.csv holds rows of another format"):
        measure.write_csv(other, rows, run)
    assert other.read_text() == "linear,some,positional,row\n"


def test_machine_description_names_the_cpu_and_threads():
    text = measure.describe_machine("cpu")
    threads = torch.get_num_threads()
    assert text.endswith(f", {threads} thread" + ("s" if threads != 1 else "")) and len(text) > 12
    assert str(measure.stamp()).count(";") == 2
