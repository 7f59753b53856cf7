"""What the tests share: dtypes and their tolerances, one comparison helper, masks, the
``device`` and ``strategy`` fixtures, a tokenizer trained offline, the check that no test file
leaves a process-wide setting changed, and the harness that runs a scenario on two processes.

A test file imports what it needs from here (``from conftest import ...``), never from
another test file."""

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

import growop

DTYPES = {"f32": torch.float32, "f64": torch.float64, "bf16": torch.bfloat16, "f16": torch.float16}
# Tolerances, (atol, rtol) by dtype, each named for the comparison it bounds:
# a result computed in the dtype against the float64 reference (assert_close(..., dtype, ...));
TOLERANCES = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (6e-2, 2e-2),
    torch.float16: (1e-2, 1e-2),
}
# growop against the reference computed in the same dtype (the module's forward);
SAME_DTYPE_TOLERANCES = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (3e-2, 3e-2),
    torch.float16: (3e-3, 3e-3),
}
# GrowLinear against nn.Linear, both under torch.autocast to the dtype.
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16}
AUTOCAST_TOLERANCES = {torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}

NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=NEEDS_CUDA)]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Each test that takes it runs on the CPU and, where there is a GPU, on CUDA."""
    return request.param


# Every strategy, or only the one GROWOP_STRATEGY forces (CI runs the suite under each).
STRATEGIES = [os.environ["GROWOP_STRATEGY"]] if "GROWOP_STRATEGY" in os.environ else growop.ops.STRATEGIES


@pytest.fixture(params=STRATEGIES)
def strategy(request):
    """Each test that takes it runs under every strategy (``growop.strategy``), or under the
    one ``GROWOP_STRATEGY`` names."""
    with growop.strategy(request.param):
        yield request.param


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    dtype: torch.dtype | None = None,
    what: str = "tensor",
    *,
    atol: float | None = None,
    rtol: float | None = None,
) -> None:
    """``actual`` against ``expected`` element by element: ``|a - e| <= atol + rtol |e|``, or
    equal (infinities included; NaN never matches). A failure names the first mismatched
    positions and their values.

    With ``dtype``, the tolerance is ``TOLERANCES[dtype]``: a result computed in ``dtype``
    against the float64 reference, whatever the two tensors' dtypes. Without it, ``atol``
    and ``rtol`` (default 0: equal values) and the two must have the same dtype.
    """
    if dtype is not None:
        if atol is not None or rtol is not None:
            raise TypeError("assert_close: give dtype (for TOLERANCES[dtype]) or atol/rtol, not both")
        atol, rtol = TOLERANCES[dtype]
    else:
        assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
        atol, rtol = atol or 0.0, rtol or 0.0
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    bad = ~torch.isclose(a, e, atol=atol, rtol=rtol)
    if bad.any():
        positions = bad.nonzero()[:8].tolist()
        detail = ", ".join(f"{tuple(p)}: {a[tuple(p)].item()!r} vs {e[tuple(p)].item()!r}" for p in positions)
        pytest.fail(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements differ (atol={atol}, rtol={rtol}); "
            f"first at {detail}"
        )


def assert_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "tensor") -> None:
    """Equal values, shapes and dtypes (``assert_close`` with no tolerance)."""
    assert_close(actual, expected, what=what)


def make_mask(kind: str, capacity: int, generator: torch.Generator) -> torch.Tensor:
    """Masks that exercise each way the kernels cover live rows."""
    active = torch.zeros(capacity, dtype=torch.bool)
    if kind == "all":
        active[:] = True
    elif kind == "prefix":
        active[: capacity * 2 // 3] = True
    elif kind == "random":  # short runs only: every live row is gathered
        active = torch.rand(capacity, generator=generator) < 0.5
    elif kind == "dense":  # short runs, dense enough for whole-span weight gradients
        active = torch.rand(capacity, generator=generator) < 0.96
    elif kind == "mixed":  # long runs used in place plus fragments, several gather chunks
        active[:100] = True
        active[150:650] = torch.rand(500, generator=generator) < 0.6
        active[700:] = True
    elif kind == "sparse":  # width / live far beyond any crossover: auto gathers
        active[:: capacity // 4] = True
    elif kind == "single":
        active[capacity // 2] = True
    elif kind != "none":
        raise ValueError(kind)
    return active


# A capacity for each kind of mask that gives it several gather chunks where it has any.
CAPACITY = {
    "all": 90, "prefix": 90, "random": 300, "dense": 300, "mixed": 900, "sparse": 300, "single": 90,
    "none": 90,
}


def capture_cuda_graph(step):
    """Runs `step` once under ``torch.cuda.set_sync_debug_mode("error")``, so that any host
    synchronisation fails, once on a side stream as a warm-up (as torch.cuda.graphs
    recommends), then captures it: returns the graph and the outputs its replays rewrite."""
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    return graph, static


def train_bpe_tokenizer(lines: list[str], vocab_size: int = 300):
    """A byte-level BPE tokenizer trained offline on ``lines``, as a transformers tokenizer
    with ``<eos>`` as its end and padding token. ``tokenizers`` and ``transformers`` are
    optional extras, imported here only: the tests that call this skip without them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<eos>")


# ----------------------------------------------------------------------------- process-wide settings


def process_settings() -> dict[str, object]:
    """The process-wide settings one test file could change and leave changed for the files
    after it in the same run. ``torch.backends.flags_frozen()`` is among them: importing
    ``torch.testing._internal`` freezes the backends' flags (``disable_global_flags``), after
    which setting, say, ``torch.backends.cudnn.allow_tf32`` raises; the same import replaces
    TorchScript's call entry points."""
    backends = torch.backends
    return {
        "torch.backends.flags_frozen()": backends.flags_frozen(),
        "torch.backends.cuda.matmul.allow_tf32": backends.cuda.matmul.allow_tf32,
        "torch.backends.cudnn.allow_tf32": backends.cudnn.allow_tf32,
        "torch.backends.cudnn.benchmark": backends.cudnn.benchmark,
        "torch.backends.cudnn.deterministic": backends.cudnn.deterministic,
        "torch.backends.cudnn.enabled": backends.cudnn.enabled,
        "torch.backends.mkldnn.enabled": backends.mkldnn.enabled,
        "torch.get_float32_matmul_precision()": torch.get_float32_matmul_precision(),
        "torch.get_default_dtype()": torch.get_default_dtype(),
        "torch.are_deterministic_algorithms_enabled()": torch.are_deterministic_algorithms_enabled(),
        "torch.is_grad_enabled()": torch.is_grad_enabled(),
        "torch.get_num_threads()": torch.get_num_threads(),
        "torch._C.ScriptFunction.__call__": torch._C.ScriptFunction.__call__,
        "torch._C.ScriptMethod.__call__": torch._C.ScriptMethod.__call__,
    }


def changed_settings(before: dict[str, object], after: dict[str, object]) -> str:
    """``name: before -> after`` for each setting that differs, or ``""``."""
    return "; ".join(f"{name}: {before[name]!r} -> {after[name]!r}" for name in before if after[name] != before[name])


# Taken when pytest loads this file, before any test file is imported.
SETTINGS_AT_START = process_settings()


@pytest.fixture(autouse=True, scope="module")
def settings_left_as_found(request):
    """Each test file starts and ends with the process-wide settings the run started with:
    a change made while collecting fails the next file's first test, one left by a file
    fails its last test's teardown."""
    where = request.module.__name__
    changed = changed_settings(SETTINGS_AT_START, process_settings())
    assert not changed, f"before {where} ran, something (an import at collection?) changed: {changed}"
    yield
    changed = changed_settings(SETTINGS_AT_START, process_settings())
    assert not changed, f"{where} left process-wide settings changed (restore them in a fixture): {changed}"


# ----------------------------------------------------------------------------- processes

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
