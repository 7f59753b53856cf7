"""Pure-PyTorch references: the tests' oracle and the benchmarks' baseline.

Nothing here is fast; everything here is obviously right.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def masked_linear(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    active: Tensor,
    width: int,
    mask_value: float | None = None,
) -> Tensor:
    """Reference of ``growop.ops.masked_linear``: ``F.linear`` on the live rows, gathered.

    Column ``j < width`` is ``input @ weight[j] + bias[j]`` where ``active[j]``, else
    ``mask_value`` (default: the lowest finite value of the dtype). Autograd through the
    gather gives every row that is not live a zero gradient.
    """
    if mask_value is None:
        mask_value = torch.finfo(input.dtype).min
    live = active[:width].nonzero().squeeze(1)
    out = input.new_full((*input.shape[:-1], width), mask_value)
    live_bias = bias.index_select(0, live) if bias is not None else None
    live_out = F.linear(input, weight.index_select(0, live), live_bias)
    return out.index_copy(-1, live, live_out)


def add_output_nodes(linear: nn.Linear, k: int) -> nn.Linear:
    """The usual recipe: a new, bigger ``nn.Linear`` with the old rows copied in.

    The new rows get ``nn.Linear``'s default initialisation. The returned module holds new
    Parameters, so an optimizer built on the old module does not update it.
    """
    old = linear.weight
    grown = nn.Linear(
        linear.in_features,
        linear.out_features + k,
        bias=linear.bias is not None,
        device=old.device,
        dtype=old.dtype,
    )
    with torch.no_grad():
        grown.weight[: linear.out_features].copy_(old)
        if linear.bias is not None:
            grown.bias[: linear.out_features].copy_(linear.bias)
    return grown


def linear_cross_entropy(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    active: Tensor,
    target: Tensor,
    width: int,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    classes=None,
    class_weight: Tensor | None = None,
) -> Tensor:
    """Reference of ``growop.linear_cross_entropy``: ``F.cross_entropy`` over the logits of
    the softmax's classes (the live rows below ``width``, or ``classes``), gathered, with each
    target moved to its class's column. bfloat16/float16 logits are made in their dtype and
    the loss in float32, as under autocast."""
    if classes is None:
        slots = active[:width].nonzero().squeeze(1)
    else:
        slots = torch.as_tensor(list(classes) if isinstance(classes, range) else classes, dtype=torch.long)
        slots = slots.to(weight.device).sort().values
    logits = F.linear(input, weight.index_select(0, slots), None if bias is None else bias.index_select(0, slots))
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()
    column = torch.full((max(width, 1),), -1, dtype=torch.long, device=weight.device)
    column[slots] = torch.arange(len(slots), device=weight.device)
    ignored = target == ignore_index
    moved = torch.where(ignored, -100, column[target.clamp(0, max(width - 1, 0))])
    loss = F.cross_entropy(
        logits.reshape(-1, len(slots)),
        moved.reshape(-1),
        weight=None if class_weight is None else class_weight[slots].to(logits.dtype),
        ignore_index=-100,
        reduction=reduction,
        label_smoothing=label_smoothing,
    )
    return loss.reshape(target.shape) if reduction == "none" else loss
