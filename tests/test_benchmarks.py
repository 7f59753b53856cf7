"""The benchmark scripts' code paths, at toy sizes, on the CPU.

The GPU benchmark runs only where a GPU is lent, for a few minutes at a time; a Python error
in it would spend that time for nothing. These tests run its table, crossover, CSV and
profile code on the CPU with cases small enough to take a second, so they fail here first.
The CPU benchmark, bench_optim.py and bench_vocab.py run their quickest modes as a new user
would, from the command line. They check the code runs, its rows are complete and nothing
is written beside the tracked files, never any timing.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from growop.measure import CSV_FIELDS, PROFILER_NOISE

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
SCRIPTS = ("bench_linear_cpu", "bench_linear_cuda", "bench_optim", "bench_optim_hooks", "bench_vocab", "bench_loss")


def load(monkeypatch, name: str):
    """benchmarks/<name>.py as a module, with linear_cases.py registered under the name a
    script imports it by (Python finds it on the script's own folder when run)."""
    for module_name in ("linear_cases", name):
        spec = importlib.util.spec_from_file_location(module_name, BENCHMARKS / f"{module_name}.py")
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, module_name, module)  # dataclasses look their module up
        spec.loader.exec_module(module)
    return module


def run_script(name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python benchmarks/<name>.py *args`` in a fresh process that imports this checkout's
    growop."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{name}.py"), *args],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT,
    )
    assert completed.returncode == 0, completed.stderr
    return completed


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == CSV_FIELDS
        return list(reader)


@pytest.fixture
def bench_cuda(monkeypatch):
    """benchmarks/bench_linear_cuda.py with toy cases: (16, 8 -> 12) at capacities 15 (the
    25% headroom, prefix and random), 24 and 192, and (8, 6 -> 5) at 10."""
    module = load(monkeypatch, "bench_linear_cuda")
    toy = (16, 8, 12)
    monkeypatch.setattr(module, "CUDA_MASKS", {
        "prefix": (toy, 15, "prefix"),
        "fragmented": (toy, 15, "random"),
        "fragmented50": (toy, 24, "random"),
        "spread16": (toy, 192, "spread"),
        "small50": ((8, 6, 5), 10, "random"),
    })
    saved = torch.backends.cuda.matmul.allow_tf32
    yield module
    torch.backends.cuda.matmul.allow_tf32 = saved


def test_gpu_table_rows_crossover_and_csv_run_on_the_cpu(bench_cuda, tmp_path, capsys):
    gen = torch.Generator().manual_seed(0)
    rows = [bench_cuda.bench_cuda_case(dtype, mask, warmup=1, repeats=2, gen=gen, device="cpu")
            for dtype in ("bf16", "tf32") for mask in bench_cuda.CUDA_MASKS]
    assert not torch.backends.cuda.matmul.allow_tf32  # each row restores it
    for row in rows:
        assert row.width <= row.capacity and row.line().startswith(f"{row.dtype:5} {row.mask:12}")
        for provider in bench_cuda.COLUMNS:
            applies = provider != "static" or row.capacity <= 1.25 * row.case[2]
            for kind in ("fwd", "fb"):
                value = row.measured.ratio(kind, provider)
                assert (value is not None and value.median > 0) if applies else value is None, (row.label, provider)
        assert all(error > 0 for error in row.errors.values()) and set(row.errors) == {"auto", "gather", "kernels"}
    static_rows = [row.mask for row in rows if "static" in row.measured.both]
    assert static_rows == ["prefix", "fragmented"] * 2
    estimates = bench_cuda.crossover_estimates(rows)
    assert len(estimates) == 8 and "R* ~" in capsys.readouterr().out

    grow = bench_cuda.bench_grow(8, 12, 40, 2, best_of=3)
    assert len(grow["grow"].samples) == 2 and "copy" in grow
    with pytest.raises(ValueError, match="do not fit a capacity of 15"):
        bench_cuda.bench_grow(8, 12, 15, 2, best_of=3)

    written = [r for row in rows for r in row.csv_rows()] + bench_cuda.grow_rows("b", "grow", grow)
    path = bench_cuda.write_csv(tmp_path / "cuda.csv", written, bench_cuda.stamp("cpu"))
    back = read_rows(path)
    assert len(back) == len(written)
    assert {r["metric"] for r in back} == {
        "fwd_time", "fwd_ratio", "fb_time", "fb_ratio", "error_ratio", "grow_time", "grow_speedup"
    }


def test_profile_tables_run_on_the_cpu(bench_cuda):
    gen = torch.Generator().manual_seed(1)
    text = bench_cuda.profile_cuda_case("tf32", "fragmented50", gen, device="cpu", steps=1)
    assert "--- nn.Linear" in text and "--- GrowLinear" in text
    assert "growop::masked_linear" in text
    text = bench_cuda.profile_cuda_case("bf16", "prefix", gen, device="cpu", steps=1, static_shape=True)
    assert "static_shape" in text and "growop::masked_linear_backward" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_gpu_benchmark_without_a_gpu_says_so(monkeypatch, tmp_path):
    module = load(monkeypatch, "bench_linear_cuda")
    with pytest.raises(SystemExit, match="needs a CUDA GPU.*bench_linear_cpu.py"):
        module.main(["--quick", "--csv", str(tmp_path / "x.csv")])


def test_cpu_crossover_times_dense_and_gather(monkeypatch, capsys):
    module = load(monkeypatch, "bench_linear_cpu")
    monkeypatch.setattr(module, "CROSSOVER_CASES", ((4, 8, 12),))
    rows = module.crossover(1, torch.Generator().manual_seed(0))
    assert [r["provider"] for r in rows] == ["dense", "gather"] * len(module.CROSSOVER_RATIOS)
    assert "(4, 8, 12)" in capsys.readouterr().out


def test_cpu_benchmark_quick_mode_prints_a_table_with_the_static_shape_column(tmp_path):
    out = tmp_path / "rows.csv"
    completed = run_script("bench_linear_cpu", "--quick", "--cases", "tiny", "--repeats", "2", "--csv", str(out))
    lines = completed.stdout.splitlines()
    header = next(line for line in lines if line.startswith("case"))
    assert "fwd static" in header and "f+b static" in header
    tiny = next(line for line in lines if line.startswith("tiny"))
    assert len(tiny.split()) == 5 + 2 * 5  # case, cap, width, mask, ms, then every column filled
    rows = read_rows(out)
    assert {r["provider"] for r in rows} == {"linear", "auto", "dense", "gather", "static", "slice"}
    assert {r["metric"] for r in rows if r["provider"] == "static"} == {"fwd_time", "fwd_ratio", "fb_time", "fb_ratio"}
    assert rows[0]["machine"].endswith("1 thread")  # the default


def test_optimizer_benchmark_says_what_it_needs_and_has_a_quick_mode(monkeypatch, capsys, tmp_path):
    with pytest.raises(SystemExit):
        load(monkeypatch, "bench_optim").parse_args(["--help"])
    help_text = capsys.readouterr().out
    assert "~11 GB of RAM, ~8 min" in help_text and "--quick" in help_text
    out = tmp_path / "optim.csv"
    completed = run_script("bench_optim", "--quick", "--repeats", "2", "--csv", str(out))
    table = [line.split() for line in completed.stdout.splitlines() if line.startswith(("Adam ", "AdamW "))]
    assert [(line[0], line[1]) for line in table] == [(o, y) for o in ("Adam", "AdamW") for y in ("0", "10", "100", "1000")]
    rows = read_rows(out)
    assert all("(512, 4000)" in r["case"] for r in rows)
    assert {r["metric"] for r in rows} == {"step_time", "ratio_vs_no_young_rows", "ratio_vs_linear"}


def test_optimizer_hooks_benchmark_quick_mode_times_every_case(tmp_path):
    out = tmp_path / "hooks.csv"
    completed = run_script("bench_optim_hooks", "--quick", "--repeats", "2", "--csv", str(out))
    table = [line.split() for line in completed.stdout.splitlines() if line.strip().startswith("10 ")]
    assert len(table) == 1 and len(table[0]) == 5 and all(float(v) > 0 for v in table[0][1:])
    rows = read_rows(out)
    assert [(r["provider"], r["metric"]) for r in rows] == [
        ("no growop", "hook_time"), ("growop", "hook_time"), ("first sight", "hook_time"), ("AdamW.step", "step_time")
    ]


def test_vocab_benchmark_quick_mode_measures_without_profiler_noise(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "vocab.csv"
    completed = run_script("bench_vocab", "--quick", "--repeats", "1", "--csv", str(out))
    noise = [line for line in (completed.stdout + completed.stderr).splitlines()
             if PROFILER_NOISE.search(line) or "USDT" in line]
    assert not noise, noise
    providers = [line.split()[1] for line in completed.stdout.splitlines() if line.startswith("   8000")]
    assert providers == ["hf_mean", "hf_plain", "growop_mean", "growop_plain"]
    rows = read_rows(out)
    allocated = {r["provider"]: int(float(r["median"])) for r in rows if r["metric"] == "allocated"}
    assert allocated["hf_plain"] >= 8008 * 512 * 4 and allocated["growop_plain"] == 0


def test_loss_benchmark_quick_mode_measures_every_provider_on_both_masks(tmp_path):
    out = tmp_path / "loss.csv"
    completed = run_script("bench_loss", "--quick", "--repeats", "2", "--csv", str(out))
    # says whether Liger's column is there, and why not (on the CPU it never is)
    assert ("# liger_kernel is not installed: no liger column" in completed.stdout
            or "# Liger's fused loss runs on CUDA only: no liger column" in completed.stdout)
    for mask in ("prefix", "fragmented"):
        assert f"cap 1250 {mask}" in completed.stdout
    verdicts = [line for line in completed.stdout.splitlines() if line.strip().startswith("target fused")]
    assert len(verdicts) == 2 * 3
    rows = read_rows(out)
    assert {r["provider"] for r in rows} == {"linear", "chunked", "growop", "fused"}
    by_metric = {}
    for r in rows:
        by_metric.setdefault(r["metric"], set()).add((r["case"].rsplit(" ", 1)[1], r["provider"]))
    every = {(m, p) for m in ("prefix", "fragmented") for p in ("linear", "chunked", "growop", "fused")}
    assert by_metric["fb_time"] == by_metric["fb_extra_peak"] == every
    assert by_metric["fb_ratio_vs_chunked"] == every - {(m, "chunked") for m in ("prefix", "fragmented")}
    peaks = {(r["case"].rsplit(" ", 1)[1], r["provider"]): float(r["median"]) for r in rows
             if r["metric"] == "fb_extra_peak"}
    logits = 512 * 1000 * 4
    for mask in ("prefix", "fragmented"):
        # The plain path holds the logits, their log-softmax and their gradient; the fused
        # loss one chunk's buffer (at 512 tokens, a single chunk: the logits once).
        assert peaks[(mask, "linear")] >= 2 * logits
        assert logits <= peaks[(mask, "fused")] < peaks[(mask, "linear")]


def test_loss_benchmark_cuda_configuration_runs_on_the_cpu_at_toy_sizes(monkeypatch):
    """The --device cuda path (bfloat16, Liger where it runs) on the CPU: every provider's
    loss agrees with nn.Linear + F.cross_entropy's, and the table prints."""
    module = load(monkeypatch, "bench_loss")
    liger, note = module.liger_loss("cpu")
    assert liger is None and "no liger column" in note
    toy = module.Case(48, 16, 40, "bf16")
    for mask in module.MASKS:
        result = module.run_case(toy, mask, device="cpu", repeats=1, warmup=0)
        assert set(result.peak) == set(result.timings) == {"linear", "chunked", "growop", "fused"}
        assert any("fused <= 1.10x linear" in line for line in result.lines())
    with pytest.raises(AssertionError, match="fused's loss .* differs from linear's"):
        module.check_agreement({"linear": torch.tensor(2.0), "fused": torch.tensor(2.1)}, torch.bfloat16)


def test_loss_benchmark_llama_quick_mode_compares_stock_and_fused_memory(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "llama.csv"
    completed = run_script("bench_loss", "--quick", "--llama", "--csv", str(out))
    assert "make_growable(fused)" in completed.stdout
    peaks = {r["provider"]: float(r["median"]) for r in read_rows(out)}
    assert peaks["fused"] < peaks["stock"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_benchmark_says_how_long_it_takes_and_writes_to_an_ignored_folder(name, monkeypatch):
    module = load(monkeypatch, name)
    args = module.parse_args([])
    assert args.csv == BENCHMARKS / "out" / f"{name}.csv"
    assert "A default run takes " in module.__doc__  # how long, up front (the doc is --help's text)
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "check-ignore", "-q", str(args.csv)], cwd=ROOT)
    assert ignored.returncode == 0, f"{args.csv} is not ignored by git"


def test_device_check_invokes_the_gpu_benchmark_with_options_it_takes(monkeypatch):
    module = load(monkeypatch, "bench_linear_cuda")
    script = (BENCHMARKS / "device_check.sh").read_text().replace("\\\n", " ")
    invocations = [line.split("benchmarks/bench_linear_cuda.py", 1)[1] for line in script.splitlines()
                   if '"$PY" benchmarks/bench_linear_cuda.py' in line]
    assert len(invocations) == 2  # the table and the profile
    for options in invocations:
        words = options.split("2>&1")[0].split(">")[0].replace('"$LOGS/', '"/tmp/').replace('"', "").split()
        args = module.parse_args(words)
        assert set(args.masks) <= set(module.CUDA_MASKS) and set(args.dtypes) <= set(module.CUDA_DTYPES)

    loss = load(monkeypatch, "bench_loss")
    invocations = [line.split("benchmarks/bench_loss.py", 1)[1] for line in script.splitlines()
                   if '"$PY" benchmarks/bench_loss.py' in line]
    assert len(invocations) == 1  # the fused loss on the GPU
    words = invocations[0].split(">")[0].replace('"$LOGS/', '"/tmp/').replace('"', "").split()
    assert loss.parse_args(words).device == "cuda"
