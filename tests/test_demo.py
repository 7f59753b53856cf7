"""End-to-end tests of ``python -m growop.demo`` in its quick (smoke) mode."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from growop import demo  # noqa: E402
from growop.demo import digits  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_outputs(out: Path, stages: int) -> dict:
    """Both files exist and the JSON has every method with the documented fields."""
    assert (out / "results.json").is_file()
    assert (out / "accuracy.png").read_bytes()[:8] == PNG_MAGIC
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["stages"] == stages
    assert results["config"]["torch"] == torch.__version__
    for method in digits.METHODS:
        entry = results[method]
        assert len(entry["stage_acc"]) == stages
        assert all(0.0 <= a <= 1.0 for a in entry["stage_acc"])
        assert entry["final_acc"] == entry["stage_acc"][-1]
        assert len(entry["grow_seconds"]) == stages - 1
        assert all(s > 0 for s in entry["grow_seconds"])
        assert isinstance(entry["new_rows_trained"], bool)
    return results


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("quick")
    return demo.main(["--quick", "--out", str(out)]), out


def test_quick_run_writes_results_and_plot(quick_run):
    returned, out = quick_run
    written = _check_outputs(out, stages=5)
    assert returned == written


def test_only_the_kept_optimizer_leaves_new_rows_untrained(quick_run):
    results, _ = quick_run
    assert results["copy_keep_optimizer"]["new_rows_trained"] is False
    assert results["growop"]["new_rows_trained"] is True
    assert results["copy_new_optimizer"]["new_rows_trained"] is True
    assert results["growop_uncorrected"]["new_rows_trained"] is True


def test_same_seed_gives_same_accuracies(quick_run, tmp_path):
    first, _ = quick_run
    again = demo.main(["--quick", "--out", str(tmp_path)])
    for method in digits.METHODS:
        assert again[method]["stage_acc"] == first[method]["stage_acc"], method


def test_module_runs_as_a_script(quick_run, tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "growop.demo", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    assert "final" in completed.stdout
    results = _check_outputs(tmp_path, stages=5)
    # A separate process with the same seed reproduces the in-process run.
    first, _ = quick_run
    for method in digits.METHODS:
        assert results[method]["stage_acc"] == first[method]["stage_acc"], method


def test_two_stages(tmp_path):
    results = demo.main(["--quick", "--stages", "2", "--out", str(tmp_path)])
    _check_outputs(tmp_path, stages=2)
    assert results["config"]["stage_classes"] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert results["copy_keep_optimizer"]["new_rows_trained"] is False
    assert results["growop"]["new_rows_trained"] is True


def test_stage_split_is_near_equal():
    assert digits.stage_classes(3) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert [len(c) for c in digits.stage_classes(10)] == [1] * 10


def test_rejects_stage_counts_out_of_range(tmp_path):
    for stages in ("1", "11"):
        with pytest.raises(SystemExit):
            demo.main(["--quick", "--stages", stages, "--out", str(tmp_path)])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_cuda_without_cuda_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        demo.main(["--quick", "--device", "cuda", "--out", str(tmp_path)])
    assert "CUDA is not available" in capsys.readouterr().err


def test_missing_optional_dependency_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # makes `import tqdm` raise ImportError
    with pytest.raises(SystemExit, match=r"growop\[demo\]"):
        demo.main(["--quick", "--out", str(tmp_path)])
