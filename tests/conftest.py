"""Helpers shared by the tests."""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE = 2
COLLECTIVE_TIMEOUT = 20  # seconds
TEST_TIMEOUT = 45  # seconds, for the whole spawn-run-join of one test


# ----------------------------------------------------------------------------- process harness
# Two fresh processes (spawn) joined in a gloo group through a FileStore in the test's tmp
# dir, with gloo bound to the loopback interface: no port is picked, nothing listens beyond
# 127.0.0.1. Every collective times out after COLLECTIVE_TIMEOUT seconds and every run after
# TEST_TIMEOUT, so a hang fails the test instead of blocking CI.


def _loopback_interface() -> str | None:
    return next((name for _, name in socket.if_nameindex() if name.startswith("lo")), None)


def _worker(rank: int, scenario, store_path: str, out_dir: str) -> None:
    interface = _loopback_interface()
    if interface is not None:
        os.environ["GLOO_SOCKET_IFNAME"] = interface
    torch.set_num_threads(1)  # two processes share the cores
    dist.init_process_group(
        "gloo",
        store=dist.FileStore(store_path, WORLD_SIZE),
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=timedelta(seconds=COLLECTIVE_TIMEOUT),
    )
    result = scenario(rank)
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()  # no rank tears the group down while another still uses it
    dist.destroy_process_group()


def run_on_ranks(scenario, tmp_path: Path, timeout: float = TEST_TIMEOUT) -> list[dict]:
    """Runs ``scenario(rank) -> dict`` in WORLD_SIZE processes; returns each rank's dict.

    A worker's exception fails the test with its traceback; a hang fails it after
    ``timeout`` seconds (default TEST_TIMEOUT), with the workers killed.
    """
    context = mp.start_processes(
        _worker,
        args=(scenario, str(tmp_path / "store"), str(tmp_path)),
        nprocs=WORLD_SIZE,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                pytest.fail(f"{scenario.__name__} did not finish in {timeout} s (a collective hung?)")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(5)
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]
