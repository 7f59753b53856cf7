"""Optimizer-step overhead of GrowLinear's per-row step correction (growop/optim.py).

    python benchmarks/bench_optim.py

Times ``Adam.step()`` and ``AdamW.step()`` on a GrowLinear with (in, capacity) =
(4096, 32000), interleaved in one run: with no young rows (the correction does nothing),
and with 10, 100 and 1,000 rows grown mid-training (each young row is updated a second
time, O(in_features) work). ``nn.Linear`` of the same size with the same optimizer is the
baseline.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import torch

import growop

IN, CAPACITY, START = 4096, 32000, 30000


def layer_with_young_rows(young: int, optimizer_cls) -> tuple[growop.GrowLinear, torch.optim.Optimizer]:
    torch.manual_seed(0)
    layer = growop.GrowLinear(IN, START, capacity=CAPACITY)
    optimizer = optimizer_cls(layer.parameters(), lr=1e-3)
    layer.weight.grad = torch.randn_like(layer.weight)
    layer.bias.grad = torch.randn_like(layer.bias)
    optimizer.step()  # state exists, step 1
    if young:
        layer.grow(young, optimizer=optimizer)
    return layer, optimizer


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
          f"torch {torch.__version__}; {datetime.date.today()}")
    print(f"{'optimizer':10} {'young rows':>10} {'step ms':>9} {'vs none':>8} {'vs nn.Linear':>13}")
    for optimizer_cls in (torch.optim.Adam, torch.optim.AdamW):
        cases = {}
        linear = torch.nn.Linear(IN, CAPACITY)
        linear_opt = optimizer_cls(linear.parameters(), lr=1e-3)
        linear.weight.grad = torch.randn_like(linear.weight)
        linear.bias.grad = torch.randn_like(linear.bias)
        cases["nn.Linear"] = linear_opt.step
        for young in (0, 10, 100, 1000):
            layer, optimizer = layer_with_young_rows(young, optimizer_cls)
            cases[young] = optimizer.step
        samples = {name: [] for name in cases}
        names = list(cases)
        for round_ in range(args.repeats + 1):
            # A different order each round, so no case always follows the same one.
            order = names[round_ % len(names):] + names[: round_ % len(names)]
            for name in order:
                step = cases[name]
                start = time.perf_counter()
                step()
                if round_:
                    samples[name].append(time.perf_counter() - start)
        median = {name: statistics.median(s) * 1e3 for name, s in samples.items()}
        for name in (0, 10, 100, 1000):
            print(f"{optimizer_cls.__name__:10} {name:>10} {median[name]:9.2f} "
                  f"{median[name] / median[0]:8.3f} {median[name] / median['nn.Linear']:13.3f}")
        del cases, samples


if __name__ == "__main__":
    main()
