"""What the demo tasks share: optional imports, the common options, one thread, the run's
description, and writing the results and the plot."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import json
import platform
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

import growop
from growop.measure import device_name

# The demo's tasks, each a module of this package with a main(argv); the first is the default.
TASKS = ("digits", "vocab")


def require(module: str, package: str, extras: str) -> ModuleType:
    """Imports an optional dependency, or exits naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SystemExit(
            f"growop.demo needs {package}, which is not installed. Install the demo's "
            f'dependencies with: pip install "growop[{extras}]"  (or: pip install {package})'
        ) from None


def add_common_options(parser: argparse.ArgumentParser, *, default_out: str, quick: str) -> None:
    """``--seed``, ``--out`` and ``--quick`` (whose help says what it shortens)."""
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw in the run (default 0)")
    parser.add_argument("--out", type=Path, default=Path(default_out), help=f"output folder (default ./{default_out})")
    parser.add_argument("--quick", action="store_true", help=f"smoke mode: {quick}")


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one intra-op thread inside the block, the caller's setting restored after.

    The demos' models are tiny: more threads only add overhead, and on a busy machine make
    each step many times slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def describe_run(device: torch.device) -> dict[str, Any]:
    """The part of ``results.json``'s ``config`` every task writes: where and with what it ran."""
    return {
        "device": str(device),
        "device_name": device_name(device),
        "torch_threads": 1,
        "torch": torch.__version__,
        "growop": growop.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }


def write_results(out: Path, results: dict[str, Any]) -> Path:
    """Writes ``results`` to ``out/results.json`` (creating ``out``); returns the path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


def new_figure(extras: str):
    """A 7 x 4.5 inch figure and its axes on matplotlib's file-only backend."""
    matplotlib = require("matplotlib", "matplotlib", extras)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7, 4.5), dpi=120)


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
