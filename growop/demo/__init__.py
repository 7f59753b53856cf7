"""growop's demos: the main job, run as ``python -m growop.demo [--task digits|vocab]``.

- ``digits`` (the default, :mod:`growop.demo.digits`): class-incremental training on
  scikit-learn's digits, growop's in-place head growth against the copy recipe. Needs
  ``pip install "growop[demo]"``.
- ``vocab`` (:mod:`growop.demo.vocab`): adding tokens to a tiny Llama mid-training,
  growop's in-place resize against transformers'. Needs ``pip install "growop[demo,hf]"``.

``--help`` after the task lists its options. What both tasks share (optional imports,
the common options, one thread, the run's description, writing results) is in
:mod:`growop.demo.common`; measuring is :mod:`growop.measure`.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence
from typing import Any

from growop.demo.common import TASKS


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the task ``--task`` names (default ``digits``) with the other arguments; returns
    what it writes to ``results.json``."""
    chooser = argparse.ArgumentParser(prog="python -m growop.demo", add_help=False)
    chooser.add_argument("--task", choices=TASKS, default=TASKS[0])
    task, rest = chooser.parse_known_args(argv)
    return importlib.import_module(f"growop.demo.{task.task}").main(rest)
