"""A training step captured once in a CUDA graph keeps working across an in-capacity grow."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import capture_cuda_graph
from torch import nn

import growop


def _has_cuda_kernels() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        torch.ops.growop.masked_linear.default(
            torch.zeros(1, 1, device="cuda"), torch.zeros(1, 1, device="cuda"), None,
            torch.ones(1, dtype=torch.bool, device="cuda"), 1, None,
        )
    except (RuntimeError, NotImplementedError):
        return False
    return True


pytestmark = pytest.mark.skipif(not _has_cuda_kernels(), reason="needs a CUDA GPU and growop's CUDA kernels")


def test_cuda_graph_training_step_survives_a_grow():
    torch.manual_seed(0)
    device = torch.device("cuda")
    head = growop.GrowLinear(32, 4, capacity=12, static_shape=True)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), head).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, capturable=True)
    static_x = torch.randn(256, 16, device=device)
    static_y = torch.randint(0, 4, (256,), device=device)
    centers = torch.randn(6, 16, device=device) * 3

    def load_batch(num_classes: int) -> None:
        labels = torch.randint(0, num_classes, (256,), device=device)
        static_y.copy_(labels)
        static_x.copy_(centers[labels] + torch.randn(256, 16, device=device))

    def train_step() -> torch.Tensor:
        loss = F.cross_entropy(model(static_x), static_y)
        loss.backward()
        optimizer.step()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up, as torch.cuda.graphs recommends
            optimizer.zero_grad(set_to_none=True)
            load_batch(4)
            train_step()
    torch.cuda.current_stream().wait_stream(side)
    optimizer.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = train_step()

    for _ in range(50):
        load_batch(4)
        graph.replay()
    weight_ptr = head.weight.data_ptr()

    head.grow(2, optimizer=optimizer)  # in place: the captured graph stays valid
    assert head.weight.data_ptr() == weight_ptr
    new_rows = head.weight[4:6].detach().clone()
    losses = []
    for _ in range(150):
        load_batch(6)
        graph.replay()  # never re-captured
        losses.append(static_loss.item())
    assert not torch.equal(head.weight[4:6].detach(), new_rows), "the new rows must train"
    with torch.no_grad():
        load_batch(6)
        accuracy = (model(static_x).argmax(-1) == static_y).float().mean().item()
    assert accuracy > 0.8, accuracy
    assert sum(losses[-10:]) < sum(losses[:10])


def test_static_shape_forward_backward_graph_replays_after_grow_deactivate_reactivate(strategy):
    """Under every strategy (auto included, with the layer's live-count hint at capture), a
    static_shape layer's forward and backward raise no host sync, capture once, and replays
    match eager after each change of the mask."""
    torch.manual_seed(1)
    layer = growop.GrowLinear(64, 5, capacity=40, static_shape=True, device="cuda")
    x = torch.randn(128, 64, device="cuda", requires_grad=True)
    grad_out = torch.randn(128, 40, device="cuda")

    def step():
        out = layer(x)
        return (out, *torch.autograd.grad(out, (x, layer.weight, layer.bias), grad_out))

    graph, static = capture_cuda_graph(step)

    for change in (lambda: layer.grow(20), lambda: layer.deactivate([0, 7, 8]),
                   lambda: layer.reactivate(7), lambda: layer.grow(15)):
        change()
        graph.replay()
        torch.cuda.synchronize()
        expected = step()
        for got, want in zip(static, expected):
            torch.testing.assert_close(got, want)
