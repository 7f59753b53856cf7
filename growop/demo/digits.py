"""Class-incremental learning on scikit-learn's digits: growop against the copy recipe.

Run ``python -m growop.demo`` (``--help`` for the options). The ten digit classes arrive in
stages; at each stage the classifier's head gains one output per new class and training
goes on over every image seen so far (cumulative replay). Five methods, four ways to grow
the head and one other loss, are trained on the same data, from the same weights, with the
same new rows, batches and step budget:

- ``growop``: a :class:`growop.GrowLinear` head and one Adam optimizer for the whole run,
  grown with ``head.grow(k, optimizer=opt)``; new rows get their own Adam step counts
  (``growop.optim``), so they start as a fresh Adam would start them;
- ``growop_uncorrected``: the same without per-row step counts: new rows are
  bias-corrected with the optimizer's shared step count, as stock Adam does;
- ``copy_keep_optimizer``: an ``nn.Linear`` head replaced by a bigger copy
  (:func:`growop.reference.add_output_nodes`) while the optimizer is kept. The optimizer
  still holds the old head's Parameters, so the new head never trains: a common mistake;
- ``copy_new_optimizer``: the same copy, then a fresh Adam over the model's parameters,
  which loses all Adam state (what continual-learning libraries do);
- ``growop_er_ace``: ``growop`` with ER-ACE's loss (:func:`er_ace_loss`): the batch's
  cross-entropy over every class seen, plus one over the current stage's classes only
  (``head.cross_entropy(..., classes=...)``, a sub-loss) for the batch's images of those
  classes. Only the loss differs from ``growop``.

It prints a test accuracy line per stage and method, a table and a summary computed from
the numbers, and writes ``results.json`` and ``accuracy.png`` to ``--out``.

Needs the optional dependencies: ``pip install "growop[demo]"`` (scikit-learn, matplotlib,
tqdm).

``python -m growop.demo --task vocab`` runs the other task, adding tokens to a tiny Llama
mid-training (:mod:`growop.demo.vocab`).
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from growop import GrowLinear
from growop.demo.common import (
    TASKS,
    add_common_options,
    describe_run,
    new_figure,
    one_thread,
    require,
    save_figure,
    write_results,
)
from growop.measure import time_call
from growop.optim import row_step_correction
from growop.reference import add_output_nodes

METHODS = ("growop", "growop_uncorrected", "copy_keep_optimizer", "copy_new_optimizer", "growop_er_ace")
NUM_CLASSES = 10
IN_FEATURES = 64  # 8x8 pixels
HIDDEN = 64
LEARNING_RATE = 3e-3
BATCH_SIZE = 64
STEPS_PER_STAGE = 200
QUICK_STEPS_PER_STAGE = 15
TEST_FRACTION = 0.3
DEFAULT_OUT = "growop-demo"
EXTRAS = "demo"


# ---------------------------------------------------------------------------- setup


@dataclass
class DigitsData:
    """The digits split into train and test, scaled to [0, 1], on the run's device.

    Labels are the digits themselves; classes arrive in the order 0, 1, ..., 9, so the
    head's output ``j`` is digit ``j`` and "classes seen" is always a prefix.
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


@dataclass
class MethodResult:
    """What one method did over the whole run."""

    stage_acc: list[float] = field(default_factory=list)
    grow_seconds: list[float] = field(default_factory=list)
    new_rows_trained: bool | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "stage_acc": self.stage_acc,
            "final_acc": self.stage_acc[-1],
            "grow_seconds": self.grow_seconds,
            "new_rows_trained": self.new_rows_trained,
        }


class DigitNet(nn.Module):
    """``64 -> 64 -> ReLU -> head``; ``head`` is swapped or grown between stages."""

    def __init__(self, num_outputs: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(IN_FEATURES, HIDDEN), nn.ReLU())
        self.head: nn.Module = nn.Linear(HIDDEN, num_outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def seed_everything(seed: int) -> None:
    """Seeds Python's, NumPy's and torch's global generators.

    Batches and new head rows come from their own seeded ``torch.Generator``; this covers
    everything else (initial weights, the throwaway init inside the grow calls).
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def stage_classes(num_stages: int) -> list[list[int]]:
    """The ten classes split into ``num_stages`` near-equal consecutive groups."""
    return [part.tolist() for part in np.array_split(np.arange(NUM_CLASSES), num_stages)]


def load_data(seed: int, device: torch.device) -> DigitsData:
    """scikit-learn's 1,797 digits, with a stratified test split fixed by ``seed``."""
    datasets = require("sklearn.datasets", "scikit-learn", EXTRAS)
    model_selection = require("sklearn.model_selection", "scikit-learn", EXTRAS)
    digits = datasets.load_digits()
    x = digits.data.astype(np.float32) / 16.0  # pixel values are 0..16
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = model_selection.train_test_split(
        x, y, test_size=TEST_FRACTION, stratify=y, random_state=seed
    )

    def put(array: np.ndarray) -> Tensor:
        return torch.from_numpy(array).to(device)

    return DigitsData(put(x_train), put(y_train), put(x_test), put(y_test))


def build_model(num_outputs: int, device: torch.device) -> DigitNet:
    """The initial model every method starts from (each takes a deep copy)."""
    return DigitNet(num_outputs).to(device)


def draw_new_rows(
    stages: list[list[int]], seed: int, device: torch.device
) -> list[tuple[Tensor, Tensor]]:
    """The rows each grow adds, one ``(weight, bias)`` per grow, shared by all methods.

    ``nn.Linear``'s default initialisation (kaiming-uniform with ``a=sqrt(5)``, bias
    ``U(+-1/sqrt(fan_in))``, the same that ``grow(init="default")`` and
    ``add_output_nodes`` use), drawn from a generator of its own so every method's new rows
    are bit-identical whatever order the methods run in.
    """
    generator = torch.Generator().manual_seed(seed + 1)
    bound = 1.0 / HIDDEN**0.5
    rows = []
    for classes in stages[1:]:
        weight = torch.empty(len(classes), HIDDEN)
        nn.init.kaiming_uniform_(weight, a=5**0.5, generator=generator)
        bias = torch.empty(len(classes)).uniform_(-bound, bound, generator=generator)
        rows.append((weight.to(device), bias.to(device)))
    return rows


# ---------------------------------------------------------------------------- training


def evaluate(model: nn.Module, data: DigitsData, num_seen: int) -> float:
    """Test accuracy (0..1) on the test images of the first ``num_seen`` classes."""
    keep = data.y_test < num_seen
    model.eval()
    with torch.no_grad():
        predicted = model(data.x_test[keep]).argmax(dim=1)
    model.train()
    return (predicted == data.y_test[keep]).float().mean().item()


def er_ace_loss(model: DigitNet, x: Tensor, y: Tensor, new_classes: range) -> Tensor:
    """ER-ACE's loss on one batch (Caccia et al., "New Insights on Reducing Abrupt
    Representation Change in Online Continual Learning", ICLR 2022).

    The paper trains each step on an incoming batch (new images of the current task) and a
    replay batch drawn from a buffer of everything seen so far, the current task included.
    Its loss is the mean cross-entropy of the incoming images over the current classes only
    (so they never push the earlier classes' logits down) plus the mean cross-entropy of the
    replay images over every class, the two means added with equal weight. Here every batch
    is drawn from all images seen so far: the batch is the replay batch, and its images of
    ``new_classes`` (the current stage's) are the incoming ones. The loss is the batch's mean
    cross-entropy over every live class (what ``growop`` trains with) plus the mean, over
    those images, of a cross-entropy over ``new_classes`` only (the sub-loss,
    ``head.cross_entropy(..., classes=new_classes)``), added as the paper adds them.

    Where it departs from the paper: the incoming images are also in the replay batch (one
    step sees them in both terms; the paper's are other images), since all methods train on
    the same batches; and the paper's code keeps the classes present in the incoming batch
    and the ones not seen yet, where a grown head has only the stage's classes (both almost
    always in a batch of 64). At the first stage every class is new and the loss is twice
    the plain cross-entropy. The loss is larger than the other methods', which by itself
    changes nothing: Adam's step is the same, up to its eps, for a loss scaled by a constant.

    Splitting the batch instead, the current stage's images over their own classes only and
    the others over all, is not ER-ACE: nothing then teaches a new image to score its class
    above the earlier ones, and at the end of each stage almost none of the test images of
    its new classes is classified right (50% after the second stage, on seeds 0 to 3). The
    paper's code runs ER-ACE only with a replay that holds the current task.
    """
    features = model.body(x)
    incoming = (y >= new_classes.start) & (y < new_classes.stop)
    replay_mean = model.head.cross_entropy(features, y)
    ignored = -100  # the loss's ignore_index: the images of earlier classes
    incoming_sum = model.head.cross_entropy(
        features, y.masked_fill(~incoming, ignored), classes=new_classes, reduction="sum"
    )
    return replay_mean + incoming_sum / incoming.sum().clamp(min=1)


def _head_rows(head: nn.Module, rows: slice) -> tuple[Tensor, Tensor]:
    return head.weight[rows], head.bias[rows]


def grow_head(
    method: str,
    model: DigitNet,
    optimizer: torch.optim.Optimizer,
    new_rows: tuple[Tensor, Tensor],
) -> tuple[torch.optim.Optimizer, slice, float]:
    """Adds ``len(new_rows)`` outputs to ``model.head`` the way ``method`` does.

    Returns the optimizer to train with from now on, the new rows' slice in the head and
    the seconds the grow took. Each method's timed region is its own recipe, including its
    own default initialisation of the new rows. Afterwards, untimed, the new rows are
    overwritten with the shared ``new_rows``, so all heads start the stage with
    identical new rows (growop's Adam state for them is zero either way).
    """
    k = new_rows[0].shape[0]
    old_out = model.head.out_features

    def grow() -> torch.optim.Optimizer:
        if method.startswith("growop"):
            model.head.grow(k, optimizer=optimizer)
            return optimizer
        model.head = add_output_nodes(model.head, k)
        if method == "copy_new_optimizer":
            return torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
        return optimizer

    optimizer, seconds = time_call(grow, new_rows[0].device)

    rows = slice(old_out, old_out + k)
    with torch.no_grad():
        for param, value in zip(_head_rows(model.head, rows), new_rows):
            param.copy_(value)
    return optimizer, rows, seconds


def run_method(
    method: str,
    initial_model: DigitNet,
    data: DigitsData,
    stages: list[list[int]],
    new_rows: list[tuple[Tensor, Tensor]],
    steps_per_stage: int,
    seed: int,
    progress: Any,
) -> MethodResult:
    """Trains a copy of ``initial_model`` stage by stage, growing its head ``method``'s way.

    Every method draws its batches from a generator seeded with ``seed``, so all of them see
    the same images in the same order.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    model = copy.deepcopy(initial_model)
    if method.startswith("growop"):
        model.head = GrowLinear.from_linear(model.head)
    # growop_uncorrected: growop without per-row Adam step counts (growop.optim), so new
    # rows are bias-corrected with the optimizer's shared step count, as stock Adam does.
    corrected = method != "growop_uncorrected"
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    batches = torch.Generator().manual_seed(seed)
    result = MethodResult()
    num_seen = 0
    snapshot: tuple[Tensor, Tensor] | None = None
    last_rows = slice(0, 0)

    for stage, classes in enumerate(stages):
        if stage > 0:
            optimizer, last_rows, seconds = grow_head(method, model, optimizer, new_rows[stage - 1])
            result.grow_seconds.append(seconds)
            snapshot = tuple(t.detach().clone() for t in _head_rows(model.head, last_rows))
        new_classes = range(num_seen, num_seen + len(classes))
        num_seen += len(classes)
        seen = torch.nonzero(data.y_train < num_seen).squeeze(1)

        for _ in range(steps_per_stage):
            pick = torch.randint(len(seen), (BATCH_SIZE,), generator=batches)
            index = seen[pick.to(seen.device)]
            x, y = data.x_train[index], data.y_train[index]
            if method == "growop_er_ace":
                loss = er_ace_loss(model, x, y, new_classes)
            else:
                loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            with row_step_correction(corrected):
                optimizer.step()
            progress.update(1)

        accuracy = evaluate(model, data, num_seen)
        result.stage_acc.append(accuracy)
        grow_text = f"grow {result.grow_seconds[-1] * 1e3:7.3f} ms" if stage > 0 else "no grow"
        progress.write(
            f"{method:<20} stage {stage + 1}/{len(stages)}  classes 0-{num_seen - 1}  "
            f"test acc {accuracy:6.1%}  {grow_text}",
            file=sys.stdout,
        )

    if snapshot is not None:
        now = _head_rows(model.head, last_rows)
        result.new_rows_trained = not all(torch.equal(a, b) for a, b in zip(snapshot, now))
    return result


# ---------------------------------------------------------------------------- reporting


def format_table(results: dict[str, MethodResult], stages: list[list[int]]) -> str:
    """Methods by stages: test accuracy (%) on the classes seen so far, and total grow time."""
    seen = np.cumsum([len(c) for c in stages])
    stage_heads = [f"s{i + 1}:0-{n - 1}" for i, n in enumerate(seen)]
    width = max(8, *(len(h) for h in stage_heads))
    header = f"{'method':<20}" + "".join(f"{h:>{width}}" for h in stage_heads)
    header += f"{'final':>8}{'grow total':>13}"
    lines = [header, "-" * len(header)]
    for method, result in results.items():
        row = f"{method:<20}" + "".join(f"{100 * a:>{width}.1f}" for a in result.stage_acc)
        row += f"{100 * result.stage_acc[-1]:>7.1f}%"
        row += f"{1e3 * sum(result.grow_seconds):>10.3f} ms"
        lines.append(row)
    lines.append("(accuracy in %, on the test images of the classes seen so far)")
    return "\n".join(lines)


def _images(count: int) -> str:
    return f"{count} image" if count == 1 else f"{count} images"


def summarize(results: dict[str, MethodResult], num_test: int) -> str:
    """Two lines saying, from the numbers alone, which method ended best and what grows cost."""
    final = {m: r.stage_acc[-1] for m, r in results.items()}
    ranked = sorted(final, key=final.get, reverse=True)
    best = ranked[0]
    one_image = 100.0 / num_test
    gaps = ", ".join(
        f"{m} {100 * final[m]:.1f}% ({100 * (final[m] - final[best]):+.1f} points, "
        f"{_images(round((final[best] - final[m]) * num_test))} fewer)"
        for m in ranked[1:]
    )
    tied = [m for m in ranked[1:] if abs(final[m] - final[best]) * num_test < 0.5]
    first = (
        f"Final accuracy on all {num_test} test images (one image = {one_image:.2f} points): "
        f"{best} ended best at {100 * final[best]:.1f}%; {gaps}."
    )
    if tied:
        first += f" {', '.join(tied)} tied with {best}."
    if best != "growop" and "growop" not in tied:
        first += " growop did not come out on top in this run."
    untrained = [m for m, r in results.items() if r.new_rows_trained is False]
    totals = ", ".join(f"{m} {1e3 * sum(r.grow_seconds):.3f} ms" for m, r in results.items())
    second = f"Total grow time: {totals}."
    if untrained:
        second += f" New head rows never trained: {', '.join(untrained)}."
    return first + "\n" + second


def plot_accuracy(
    results: dict[str, MethodResult], stages: list[list[int]], path: Path, title_note: str
) -> None:
    """Writes a line plot of test accuracy per stage, one line per method, to ``path``."""
    seen = np.cumsum([len(c) for c in stages])
    x = np.arange(1, len(stages) + 1)
    styles = {
        "growop": dict(marker="o", linestyle="-", color="tab:blue"),
        "growop_uncorrected": dict(marker="D", linestyle=":", color="tab:purple"),
        "copy_keep_optimizer": dict(marker="s", linestyle="--", color="tab:red"),
        "copy_new_optimizer": dict(marker="^", linestyle="-.", color="tab:green"),
        "growop_er_ace": dict(marker="v", linestyle="-", color="tab:orange"),
    }
    fig, ax = new_figure(EXTRAS)
    # Methods often tie; a small sideways offset keeps every marker visible.
    offsets = np.linspace(-0.06, 0.06, len(results))
    for offset, (method, result) in zip(offsets, results.items()):
        ax.plot(
            x + offset,
            [100 * a for a in result.stage_acc],
            label=f"{method} (final {100 * result.stage_acc[-1]:.1f}%)",
            linewidth=2,
            markersize=7,
            **styles.get(method, {}),
        )
    ax.set_xticks(x, [f"{i}\n(0-{n - 1})" for i, n in zip(x, seen)])
    ax.set_xlabel("stage (digit classes seen so far)")
    ax.set_ylabel("test accuracy on classes seen (%)")
    # Zoom to the data (in steps of 5 points) so close methods stay distinguishable.
    lowest = min(100 * min(r.stage_acc) for r in results.values())
    ax.set_ylim(max(0.0, 5 * np.floor((lowest - 1) / 5)), 100.5)
    ax.grid(True, alpha=0.3)
    title = f"Class-incremental digits: growing the classifier head\n{title_note}"
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower left")
    save_figure(fig, path)


# ---------------------------------------------------------------------------- entry point


def check_device_supported(device: torch.device) -> None:
    """Exits with a clear message if this growop build cannot run ``GrowLinear`` on ``device``."""
    if device.type == "cpu":
        return
    try:
        GrowLinear(2, 2, device=device)(torch.zeros(1, 2, device=device))
    except (NotImplementedError, RuntimeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SystemExit(
            f"--device {device.type}: this growop build cannot run GrowLinear there ({reason}). "
            "Run with --device cpu, or rebuild growop with its CUDA kernels."
        ) from None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m growop.demo",
        description=(
            "Class-incremental training on scikit-learn's digits, comparing growop's in-place "
            "head growth with the copy-into-a-bigger-layer recipe."
        ),
    )
    parser.add_argument(
        "--stages", type=int, default=5, help="stages the 10 classes arrive in, 2..10 (default 5)"
    )
    add_common_options(
        parser,
        default_out=DEFAULT_OUT,
        quick=f"{QUICK_STEPS_PER_STAGE} steps per stage instead of {STEPS_PER_STAGE}",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--task",
        choices=TASKS,
        default="digits",
        help="digits (this task, the default) or vocab: adding tokens to a tiny Llama "
        "(python -m growop.demo --task vocab --help)",
    )
    args = parser.parse_args(argv)
    if not 2 <= args.stages <= NUM_CLASSES:
        parser.error(f"--stages must be between 2 and {NUM_CLASSES}, got {args.stages}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(
            f"--device cuda: CUDA is not available to this torch ({torch.__version__}); "
            "run with --device cpu"
        )
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the digits task; returns what it writes to ``results.json``."""
    args = parse_args(argv)
    tqdm = require("tqdm", "tqdm", EXTRAS).tqdm
    require("matplotlib", "matplotlib", EXTRAS)
    require("sklearn", "scikit-learn", EXTRAS)

    device = torch.device(args.device)
    check_device_supported(device)
    steps = QUICK_STEPS_PER_STAGE if args.quick else STEPS_PER_STAGE
    stages = stage_classes(args.stages)
    seed_everything(args.seed)
    data = load_data(args.seed, device)
    initial_model = build_model(len(stages[0]), device)
    new_rows = draw_new_rows(stages, args.seed, device)

    results: dict[str, MethodResult] = {}
    with one_thread(), tqdm(
        total=len(METHODS) * len(stages) * steps, desc="training", unit="step", file=sys.stderr
    ) as progress:
        for method in METHODS:
            progress.set_description(method)
            results[method] = run_method(
                method, initial_model, data, stages, new_rows, steps, args.seed, progress
            )

    print()
    print(format_table(results, stages))
    print()
    print(summarize(results, num_test=len(data.y_test)))

    config = {
        "stages": args.stages,
        "stage_classes": stages,
        "seed": args.seed,
        "steps": steps,
        "quick": args.quick,
        "batch_size": BATCH_SIZE,
        "optimizer": f"Adam(lr={LEARNING_RATE})",
        "model": f"{IN_FEATURES}->{HIDDEN} ReLU->head",
        "train_images": len(data.y_train),
        "test_images": len(data.y_test),
        **describe_run(device),
    }
    output: dict[str, Any] = {m: r.to_json() for m, r in results.items()}
    output["config"] = config

    write_results(args.out, output)
    note = f"{args.stages} stages, {steps} Adam steps/stage, batch {BATCH_SIZE}, seed {args.seed}"
    plot_accuracy(results, stages, args.out / "accuracy.png", note)
    print(f"\nWrote {args.out / 'results.json'} and {args.out / 'accuracy.png'}")
    return output


if __name__ == "__main__":
    main()
