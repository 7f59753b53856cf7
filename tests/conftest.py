"""What the tests share: dtypes and their tolerances, one comparison helper, masks, and the
``device`` and ``strategy`` fixtures."""

from __future__ import annotations

import os

import pytest
import torch

import growop

DTYPES = {"f32": torch.float32, "f64": torch.float64, "bf16": torch.bfloat16, "f16": torch.float16}
# (atol, rtol) for a result computed in the dtype against the float64 reference.
TOLERANCES = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (6e-2, 2e-2),
    torch.float16: (1e-2, 1e-2),
}

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


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """`actual` against `expected` within the tolerance of `dtype`; a failure names the first
    mismatched positions and their values."""
    atol, rtol = TOLERANCES[dtype]
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    bad = ~torch.isclose(actual, expected, atol=atol, rtol=rtol)
    if bad.any():
        where = bad.nonzero()[:5].tolist()
        pytest.fail(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements differ; first at {where}: "
            f"got {actual[bad][:5].tolist()}, expected {expected[bad][:5].tolist()}"
        )


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
        active = torch.rand(capacity, generator=generator) < 0.9
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
