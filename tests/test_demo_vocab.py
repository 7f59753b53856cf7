"""End-to-end test of ``python -m growop.demo --task vocab --quick``."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("matplotlib")

from growop import demo, demo_vocab  # noqa: E402

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
    assert config["new_tokens"] == list(demo_vocab.NEW_WORDS)
    for method in demo_vocab.METHODS:
        entry = written[method]
        assert entry["vocab_after"] == config["vocab_before"] + len(demo_vocab.NEW_WORDS)
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
    args = demo.parse_args([])
    assert args.task == "digits" and args.stages == 5


def test_measure_allocations_counts_each_allocation_once_and_the_peak():
    import torch

    rows = torch.randn(1000, 64)
    _, allocated, peak = demo_vocab.measure_allocations(lambda: torch.cat([rows, rows]))
    assert allocated == peak == 2 * rows.nbytes  # one new tensor, not once per nested op

    def two_in_turn():
        first = torch.zeros(1000, 64)
        del first
        second = torch.zeros(1000, 64)
        del second

    _, allocated, peak = demo_vocab.measure_allocations(two_in_turn)
    assert allocated == 2 * rows.nbytes and peak == rows.nbytes
