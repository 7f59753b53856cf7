"""End-to-end tests of ``python -m growop.demo`` in its quick (smoke) mode."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from growop import GrowLinear, demo  # noqa: E402
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
    assert results["growop_er_ace"]["new_rows_trained"] is True


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


# ----------------------------------------------------------------------------- ER-ACE's loss


def _digit_net(old: int, new: int, seed: int = 0) -> digits.DigitNet:
    """A float64 DigitNet whose GrowLinear head had ``old`` classes and grew ``new`` more."""
    torch.manual_seed(seed)
    model = digits.DigitNet(old).double()
    model.head = GrowLinear.from_linear(model.head)
    if new:
        model.head.grow(new)
    return model


def _images(count: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(count, digits.IN_FEATURES, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _head_grads(loss: torch.Tensor, model: digits.DigitNet) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.autograd.grad(loss, [model.head.weight, model.head.bias])


def test_er_ace_gives_old_rows_no_gradient_from_a_new_images_sub_loss():
    """At a new stage (classes 0-1 old, 2-3 new), a batch of an old image and a new one: the
    loss is the batch's mean cross-entropy over all four classes plus the new image's
    cross-entropy over classes 2 and 3 only, whose gradient, worked out by hand, is
    ``(softmax - one-hot) x features`` on rows 2 and 3 and nothing on rows 0 and 1."""
    model = _digit_net(old=2, new=2)
    x, y = _images(2), torch.tensor([0, 3])
    loss = digits.er_ace_loss(model, x, y, range(2, 4))
    weight_grad, bias_grad = _head_grads(loss, model)

    replay = F.cross_entropy(model(x), y)  # what the growop method trains with
    expected_weight, expected_bias = _head_grads(replay, model)
    with torch.no_grad():
        features = model.body(x[1])
        logits = model.head.weight[2:4] @ features + model.head.bias[2:4]
        delta = torch.softmax(logits, 0) - torch.tensor([0.0, 1.0], dtype=torch.float64)
        sub_loss = torch.logsumexp(logits, 0) - logits[1]
    expected_weight[2:4] += delta[:, None] * features[None, :]
    expected_bias[2:4] += delta

    assert_close(loss.detach(), (replay + sub_loss).detach(), atol=1e-12, rtol=1e-12, what="loss")
    assert_close(weight_grad, expected_weight, atol=1e-12, rtol=1e-12, what="weight gradient")
    assert_close(bias_grad, expected_bias, atol=1e-12, rtol=1e-12, what="bias gradient")
    assert torch.count_nonzero(weight_grad[4:]) == 0 and torch.count_nonzero(bias_grad[4:]) == 0

    # The new image alone: its sub-loss adds nothing to the old rows' gradient, which is the
    # plain loss's (the full softmax's push on the old classes, and no more).
    alone = digits.er_ace_loss(model, x[1:], y[1:], range(2, 4))
    alone_weight, _ = _head_grads(alone, model)
    plain_weight, _ = _head_grads(F.cross_entropy(model(x[1:]), y[1:]), model)
    assert_close(alone_weight[:2], plain_weight[:2], atol=1e-12, rtol=1e-12, what="old rows")
    assert plain_weight[:2].abs().max() > 1e-3  # the plain loss does reach the old rows


def test_er_ace_at_the_first_stage_is_twice_the_plain_loss():
    """Every class is new: both terms are the plain cross-entropy over the live classes."""
    model = _digit_net(old=2, new=0)
    x, y = _images(6), torch.tensor([0, 1, 1, 0, 1, 0])
    loss = digits.er_ace_loss(model, x, y, range(0, 2))
    assert_close(loss.detach(), 2 * F.cross_entropy(model(x), y).detach(), atol=1e-12, rtol=1e-12)


def test_er_ace_without_images_of_the_new_classes_is_the_plain_loss():
    model = _digit_net(old=2, new=2)
    x, y = _images(3), torch.tensor([0, 1, 0])
    loss = digits.er_ace_loss(model, x, y, range(2, 4))
    assert torch.isfinite(loss)
    assert_close(loss.detach(), F.cross_entropy(model(x), y).detach(), atol=1e-12, rtol=1e-12)
