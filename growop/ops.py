"""The ``torch.ops.growop`` operators: typed wrappers, fake kernels and autograd.

The kernels live in ``csrc/``; this file gives each operator its Python face. Every
operator has a fake (meta) kernel, so it traces under ``torch.compile`` and runs on the
meta device, and ``masked_linear`` has an autograd formula whose backward is made of the
three registered backward operators, and an autocast rule that makes it behave as
``F.linear`` does under ``torch.autocast``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from growop import _extension

BUILD = _extension.load()

_ops = torch.ops.growop


def masked_linear(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    active: Tensor,
    width: int,
    mask_value: float | None = None,
) -> Tensor:
    """``out[..., j] = input @ weight[j] + bias[j]`` for live ``j < width``, else ``mask_value``.

    ``mask_value=None`` means the lowest finite value of the input's dtype.
    """
    return _ops.masked_linear.default(input, weight, bias, active, width, mask_value)


def masked_linear_backward_input(grad_output: Tensor, weight: Tensor, active: Tensor) -> Tensor:
    """Gradient of ``masked_linear`` with respect to ``input``."""
    return _ops.masked_linear_backward_input.default(grad_output, weight, active)


def masked_linear_backward_weight(grad_output: Tensor, input: Tensor, active: Tensor) -> Tensor:
    """Gradient with respect to ``weight``: shape ``(capacity, in_features)``, zero off the live rows."""
    return _ops.masked_linear_backward_weight.default(grad_output, input, active)


def masked_linear_backward_bias(grad_output: Tensor, active: Tensor) -> Tensor:
    """Gradient with respect to ``bias``: shape ``(capacity,)``, zero off the live rows."""
    return _ops.masked_linear_backward_bias.default(grad_output, active)


def _check_mask(weight: Tensor, active: Tensor) -> None:
    torch._check(weight.dim() == 2, lambda: f"weight must be 2-D, got shape {tuple(weight.shape)}")
    torch._check(
        active.dim() == 1 and active.dtype == torch.bool,
        lambda: f"active must be a 1-D bool tensor, got {active.dtype} {tuple(active.shape)}",
    )
    torch._check(
        active.shape[0] == weight.shape[0],
        lambda: f"active has {active.shape[0]} entries, weight has {weight.shape[0]} rows",
    )


@torch.library.register_fake("growop::masked_linear")
def _masked_linear_fake(input, weight, bias, active, width, mask_value):
    _check_mask(weight, active)
    torch._check(
        input.dim() >= 1 and input.shape[-1] == weight.shape[1],
        lambda: f"input {tuple(input.shape)} does not match weight {tuple(weight.shape)}",
    )
    torch._check(input.dtype == weight.dtype, lambda: "input and weight dtypes must match")
    torch._check(0 <= width, lambda: f"width {width} must be >= 0")
    torch._check(width <= weight.shape[0], lambda: f"width {width} exceeds the capacity")
    if bias is not None:
        torch._check(bias.shape == (weight.shape[0],), lambda: "bias must be (capacity,)")
    return input.new_empty((*input.shape[:-1], width))


@torch.library.register_fake("growop::masked_linear_backward_input")
def _backward_input_fake(grad_output, weight, active):
    _check_mask(weight, active)
    return grad_output.new_empty((*grad_output.shape[:-1], weight.shape[1]))


@torch.library.register_fake("growop::masked_linear_backward_weight")
def _backward_weight_fake(grad_output, input, active):
    torch._check(active.dim() == 1, lambda: "active must be 1-D")
    return input.new_empty((active.shape[0], input.shape[-1]))


@torch.library.register_fake("growop::masked_linear_backward_bias")
def _backward_bias_fake(grad_output, active):
    torch._check(active.dim() == 1, lambda: "active must be 1-D")
    return grad_output.new_empty((active.shape[0],))


def _setup_context(ctx, inputs, output):
    input, weight, bias, active, _width, _mask_value = inputs
    # Saving active lets autograd's version check catch a mask changed
    # between forward and backward instead of silently mixing two masks.
    ctx.save_for_backward(input, weight, active)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_output):
    input, weight, active = ctx.saved_tensors
    grad_input = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_input = masked_linear_backward_input(grad_output, weight, active)
    if ctx.needs_input_grad[1]:
        grad_weight = masked_linear_backward_weight(grad_output, input, active)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_bias = masked_linear_backward_bias(grad_output, active)
    return grad_input, grad_weight, grad_bias, None, None, None


torch.library.register_autograd(
    "growop::masked_linear", _backward, setup_context=_setup_context
)


# ----------------------------------------------------------------------------- autocast

# Devices whose autocast computes masked_linear in the autocast dtype, as F.linear does,
# and the dispatch key of each one's autocast.
AUTOCAST_DISPATCH_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}


def _autocast_cast(value, device_type: str, dtype: torch.dtype):
    """Autocast's rule for which arguments change dtype: floating tensors on the autocast
    device, except float64. The bool mask and the scalars stay as they are."""
    if (
        isinstance(value, Tensor)
        and value.is_floating_point()
        and value.dtype != torch.float64
        and value.device.type == device_type
    ):
        return value.to(dtype)
    return value


def _autocast_kernel(device_type: str):
    def masked_linear_autocast(input, weight, bias, active, width, mask_value):
        # torch.library.register_autocast fixes one dtype per device at registration, but
        # the context chooses it at run time (bfloat16 or float16 on either device), so the
        # kernel reads it from the context, as autocast's own kernels do.
        dtype = torch.get_autocast_dtype(device_type)
        input, weight, bias = (_autocast_cast(t, device_type, dtype) for t in (input, weight, bias))
        with torch.autocast(device_type, enabled=False):
            return _ops.masked_linear.default(input, weight, bias, active, width, mask_value)

    return masked_linear_autocast


for _device_type, _dispatch_key in AUTOCAST_DISPATCH_KEYS.items():
    torch.library.impl("growop::masked_linear", _dispatch_key, _autocast_kernel(_device_type))
