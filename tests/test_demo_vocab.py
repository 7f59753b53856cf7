"""End-to-end test of ``python -m growop.demo --task vocab --quick``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("matplotlib")

from growop import demo  # noqa: E402
from growop.demo import digits, vocab  # noqa: E402
from growop.measure import PROFILER_NOISE  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("vocab")
    return demo.main(["--task", "vocab", "--quick", "--out", str(out)]), out


def test_writes_results_and_plot(quick_run):
    returned, out = quick_run
    assert (out / "vocab_loss.png").read_bytes()[:8] == PNG_MAGIC
    written = json.loads((out / "results.json").read_text())
    assert written == json.loads(json.dumps(returned))
    config = written["config"]
    assert config["task"] == "vocab" and config["quick"] is True
    assert config["new_tokens"] == list(vocab.NEW_WORDS)
    for method in vocab.METHODS:
        entry = written[method]
        assert entry["vocab_after"] == config["vocab_before"] + len(vocab.NEW_WORDS)
        assert entry["grow_seconds"] > 0 and entry["grow_bytes_allocated"] > 0
        assert entry["eval_steps"][0] == 0 and len(entry["eval_steps"]) == len(entry["new_text_loss"])


def test_the_old_optimizer_fails_and_is_reported(quick_run):
    results, _ = quick_run
    error = results["hf_old_optimizer"]["error"]
    assert error.startswith("RuntimeError at optimizer.step() after the grow")
    assert "must match the size of tensor" in error
    assert results["hf_old_optimizer"]["final_new_text_loss"] is None
    assert results["growop"]["error"] is None and results["hf_new_optimizer"]["error"] is None


def test_growop_trains_on_after_the_grow_and_allocates_less(quick_run):
    results, _ = quick_run
    growop, hf = results["growop"], results["hf_new_optimizer"]
    assert growop["eval_steps"][-1] == results["config"]["steps_after"]
    assert growop["final_new_text_loss"] < growop["new_text_loss"][0]
    # HF copies the whole embedding; growop writes the new rows only.
    assert growop["grow_bytes_allocated"] < hf["grow_bytes_allocated"] / 2


def test_digits_stays_the_default_task():
    args = digits.parse_args([])
    assert args.task == "digits" and args.stages == 5


def test_command_line_run_prints_the_table_and_no_profiler_noise(tmp_path):
    # The grow is measured under torch's profiler, which writes status lines to stderr from
    # C++ ("USDT ... profiler_start", "Memory block of unknown size ..."): none may show.
    completed = subprocess.run(
        [sys.executable, "-m", "growop.demo", "--task", "vocab", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    assert "hf_old_optimizer: RuntimeError at optimizer.step()" in completed.stdout
    lines = (completed.stdout + completed.stderr).splitlines()
    noise = [line for line in lines if PROFILER_NOISE.search(line) or "USDT" in line or "profil" in line.lower()]
    assert not noise, noise
    assert [line for line in completed.stderr.splitlines() if line.endswith(" ...")] == [
        f"{method} ..." for method in vocab.METHODS
    ]
