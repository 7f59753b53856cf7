"""Per-step cost of growop's global optimizer step hooks (growop/optim.py).

    PYTHONPATH=. python benchmarks/bench_optim_hooks.py

torch runs growop's pre- and post-step hooks around every ``optimizer.step()`` in the
process, growop's or not. This times one call of both hooks, as a step makes it, for:

- ``no growop``: an optimizer over plain Parameters only, already seen once (every other
  optimizer of the process, at each of its steps);
- ``growop``: an optimizer over a GrowLinear and the same plain Parameters, up to date
  (no row event since its last step, no young rows);
- ``first sight``: the scan an optimizer costs the first time it steps, and again at its
  first step after a row event (a grow anywhere in the process);

each with 2 param groups (decay, no decay) of ``--params`` Parameters of 8 elements in all;
beside them, a whole ``AdamW.step()`` of the first optimizer (hooks included). Medians of
``torch.utils.benchmark.Timer.blocked_autorange``, in microseconds, one thread. The work
of the per-row correction itself (rows still young after a grow) is measured by
``benchmarks/bench_optim.py``.
"""

from __future__ import annotations

import argparse
import datetime
import platform

import torch
from torch.utils import benchmark

import growop
from growop import optim


def make_optimizer(params: int, with_growop: bool) -> torch.optim.Optimizer:
    plain = [torch.nn.Parameter(torch.zeros(8)) for _ in range(params - (2 if with_growop else 0))]
    if with_growop:
        head = growop.GrowLinear(8, 4, capacity=16)
        plain += list(head.parameters())
        make_optimizer.layers.append(head)  # alive as long as the optimizer is timed
    half = len(plain) // 2
    groups = [{"params": plain[:half]}, {"params": plain[half:], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=1e-3)


make_optimizer.layers = []


def hooks(optimizer: torch.optim.Optimizer) -> None:
    optim._before_step(optimizer, (), {})
    optim._after_step(optimizer, (), {})


def first_sight(optimizer: torch.optim.Optimizer) -> None:
    optim._known.pop(optimizer, None)
    optim._before_step(optimizer, (), {})


def step(optimizer: torch.optim.Optimizer) -> None:
    optimizer.step()


def microseconds(stmt, optimizer) -> float:
    timer = benchmark.Timer(stmt="f(o)", globals={"f": stmt, "o": optimizer}, num_threads=1)
    return timer.blocked_autorange(min_run_time=0.5).median * 1e6


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=int, nargs="+", default=[10, 300],
                        help="Parameters per optimizer (300: a 7B-parameter transformer's count)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"# {platform.processor() or platform.machine()}, 1 thread; torch {torch.__version__}; "
          f"growop {growop.__version__}; {datetime.date.today()}")
    print(f"{'params':>6} {'no growop us':>13} {'growop us':>10} {'first sight us':>15} {'AdamW.step us':>14}")
    for params in args.params:
        plain, grown = make_optimizer(params, False), make_optimizer(params, True)
        hooks(plain), hooks(grown)  # seen once
        for group in plain.param_groups:
            for param in group["params"]:
                param.grad = torch.ones_like(param)
        print(f"{params:>6} {microseconds(hooks, plain):13.2f} {microseconds(hooks, grown):10.2f} "
              f"{microseconds(first_sight, grown):15.1f} {microseconds(step, plain):14.1f}")


if __name__ == "__main__":
    main()
