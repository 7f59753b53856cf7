"""The benchmark scripts' code paths, at toy sizes on the CPU.

The GPU benchmark runs only where a GPU is lent, for a few minutes at a time; a Python error
in it would spend that time for nothing. These tests run its CUDA table, crossover, CSV and
profile code on the CPU with a (batch, in, live) small enough to take a second, so they fail
here first. They check the code runs and its rows are complete, never any timing.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def bench_linear(monkeypatch):
    """benchmarks/bench_linear.py with its CUDA case shrunk to (16, 8, 12), capacity 15."""
    spec = importlib.util.spec_from_file_location("bench_linear", BENCHMARKS / "bench_linear.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_linear", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    live = 12
    monkeypatch.setattr(module, "CUDA_CASE", (16, 8, live))
    monkeypatch.setattr(module, "CUDA_CAPACITY", 15)
    monkeypatch.setattr(module, "CUDA_MASKS", {
        "prefix": (15, "prefix"),
        "fragmented": (15, "fragmented"),
        "fragmented50": (2 * live, "fragmented"),
        "spread16": (16 * live, "fragmented"),
    })
    saved = torch.backends.cuda.matmul.allow_tf32
    yield module
    torch.backends.cuda.matmul.allow_tf32 = saved


def test_gpu_table_rows_crossover_and_csv_run_on_the_cpu(bench_linear, tmp_path, capsys):
    gen = torch.Generator().manual_seed(0)
    rows = [bench_linear.bench_cuda_case(dtype, mask, warmup=1, repeats=1, gen=gen, device="cpu")
            for dtype in ("bf16", "tf32") for mask in bench_linear.CUDA_MASKS]
    for row in rows:
        assert row["live"] == 12 and row["width"] <= row["capacity"]
        providers = [*bench_linear.CUDA_PROVIDERS, "slice"]
        for provider in providers:
            if provider == "static" and row["capacity"] != 15:
                assert math.isnan(row["fb_static_ratio"])  # only where capacity is CUDA_CAPACITY
                continue
            assert row[f"fwd_{provider}_ratio"] > 0 and row[f"fb_{provider}_ratio"] > 0, (row["mask"], provider)
        for provider in ("auto", "gather", "kernels"):
            assert math.isfinite(row[f"err_{provider}_x"]), (row["mask"], provider)
    bench_linear.cuda_crossover(rows)
    assert all("crossover_estimate" in row for row in rows if row["mask"] != "prefix")
    grow = bench_linear.bench_cuda_grow(repeats=2, device="cpu")
    assert grow["capacity"] == 15 and grow["speedup"] > 0
    path = tmp_path / "cuda.csv"
    bench_linear.write_cuda_csv(str(path), "a machine", rows, grow)
    with open(path, newline="") as f:
        written = list(csv.DictReader(f))
    assert [r["kind"] for r in written] == ["linear-cuda"] * len(rows) + ["grow-cuda"]
    assert written[0]["mask"] == "prefix" and float(written[-1]["speedup"]) == grow["speedup"]
    assert "R* ~" in capsys.readouterr().out


def test_profile_tables_run_on_the_cpu(bench_linear):
    gen = torch.Generator().manual_seed(1)
    text = bench_linear.profile_cuda_case("tf32", "fragmented50", gen, device="cpu", steps=1)
    assert "--- nn.Linear" in text and "--- GrowLinear" in text
    assert "growop::masked_linear" in text
    text = bench_linear.profile_cuda_case("bf16", "prefix", gen, device="cpu", steps=1, static_shape=True)
    assert "static_shape" in text and "growop::masked_linear_backward" in text
