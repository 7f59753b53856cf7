"""The ``torch.ops.growop`` operators: typed wrappers, fake kernels, batching rules,
autocast, and the strategy switch.

The kernels and the autograd formulas live in ``csrc/`` (autograd is C++, so a call does
not come back to Python between the op and its kernels, and it composes with ``torch.func``
and with gradients of any order). This file gives each operator its Python face: a fake
(meta) kernel, so it traces under ``torch.compile`` and runs on the meta device; a
``torch.func.vmap`` batching rule; and an autocast rule that makes ``masked_linear``
behave as ``F.linear`` does under ``torch.autocast``. Which dispatch key of each operator is
registered where, in C++ or here: the table at the top of ``csrc/ops/masked_linear.cpp``.

Strategy: each call is computed ``dense`` (one GEMM over the first ``width`` rows, dead
columns masked after) or ``gather`` (kernels whose work follows the live rows); ``auto``
picks per call by the rule in ``csrc/strategy.h``. The environment variable
``GROWOP_STRATEGY`` (read at import) and :func:`strategy` force one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

from growop import _extension

BUILD, _module = _extension.load()

_ops = torch.ops.growop
_masked_linear_op = _ops.masked_linear.default
# The extension module's direct binding of the same op, from either build.
_masked_linear_binding = _module.masked_linear

STRATEGIES = ("auto", "dense", "gather")


def _checked_strategy(name: str, where: str) -> str:
    if name not in STRATEGIES:
        raise ValueError(f"{where} must be one of {', '.join(STRATEGIES)}; got {name!r}")
    return name


# Read by every call. Under torch.compile the value is a constant of the graph, guarded:
# changing it recompiles once, and nothing else (grow, deactivate) touches it.
_strategy = _checked_strategy(os.environ.get("GROWOP_STRATEGY", "auto"), "GROWOP_STRATEGY")


def get_strategy() -> str:
    """The strategy in force: ``"auto"``, ``"dense"`` or ``"gather"``."""
    return _strategy


@contextlib.contextmanager
def strategy(name: str) -> Iterator[None]:
    """Forces how masked linears are computed inside the ``with`` block.

    ``"dense"``: one GEMM over the first ``width`` rows, dead columns masked after.
    ``"gather"``: kernels whose work follows the live rows. ``"auto"``: chosen per call.
    The previous strategy is restored on exit. Not thread-local.
    """
    global _strategy
    saved = _strategy
    _strategy = _checked_strategy(name, "growop.strategy")
    try:
        yield
    finally:
        _strategy = saved


def masked_linear(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    active: Tensor,
    width: int,
    mask_value: float | None = None,
    live_count: int | None = None,
    live_end: int | None = None,
) -> Tensor:
    """``out[..., j] = input @ weight[j] + bias[j]`` for live ``j < width``, else ``mask_value``.

    ``mask_value=None`` means the lowest finite value of the input's dtype. Two hints about
    the first ``width`` rows, where the caller knows them without reading the mask, neither
    ever changing the result: ``live_count``, how many are live, lets the ``auto`` strategy
    choose on CUDA without reading the mask; ``live_end``, a row from which on none is live,
    bounds the work (``live_count == live_end``: the live rows are exactly the first
    ``live_end``, one GEMM on them).
    """
    # Eager calls with plain tensors take the direct binding; tracing, tensor subclasses and
    # torch-function modes (the binding answers NotImplemented) take the op's Python face.
    if not torch.compiler.is_compiling():
        out = _masked_linear_binding(
            input, weight, bias, active, width, mask_value, _strategy, live_count, live_end
        )
        if out is not NotImplemented:
            return out
        if is_fx_symbolic_tracing():
            live_count = live_end = None  # a graph runs later, on the mask as it is then (the
            # binding drops the hints under torch.jit.trace likewise)
    # live_end only where given: a call without it is the call callers made before it
    # existed, and a graph traced from one reads the same.
    hints = (live_count,) if live_end is None else (live_count, live_end)
    return _masked_linear_op(input, weight, bias, active, width, mask_value, _strategy, *hints)


def masked_linear_backward(
    grad_output: Tensor,
    input: Tensor,
    weight: Tensor,
    active: Tensor,
    output_mask: tuple[bool, bool, bool] = (True, True, True),
    live_count: int | None = None,
    live_end: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``masked_linear`` for ``grad_output``: ``(grad_input, grad_weight, grad_bias)``.

    ``grad_weight`` is ``(capacity, in_features)`` and ``grad_bias`` ``(capacity,)``, both zero
    off the live rows. An output that ``output_mask`` does not ask for is an empty tensor.
    The hints as for :func:`masked_linear`, of the first ``grad_output.shape[-1]`` rows.
    """
    return _ops.masked_linear_backward.default(
        grad_output, input, weight, active, list(output_mask), _strategy, live_count, live_end
    )


# ------------------------------------------------------------------------- fake kernels


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


def _check_devices(op: str, weight: Tensor, **tensors: Tensor | None) -> None:
    """Every tensor on the weight's device, as the kernels check (csrc/checks.h). The fake
    kernel is also the meta one, which the dispatcher picks when any argument is on meta."""
    for name, t in tensors.items():
        torch._check(
            t is None or t.device == weight.device,
            lambda: f"{op}: {name} is on {t.device} but weight is on {weight.device}",
        )


def _check_input(input: Tensor, weight: Tensor) -> None:
    torch._check(
        input.dim() >= 1 and input.shape[-1] == weight.shape[1],
        lambda: f"input {tuple(input.shape)} does not match weight {tuple(weight.shape)}",
    )
    torch._check(input.dtype == weight.dtype, lambda: "input and weight dtypes must match")


# The names C++ prints for the dtypes (at::ScalarType), so that both checks read the same.
_DTYPE_NAMES = {torch.float32: "Float", torch.float64: "Double", torch.bfloat16: "BFloat16",
                torch.float16: "Half"}


def _check_mask_value(op: str, mask_value: float | None, dtype: torch.dtype) -> None:
    """The kernels' rule (csrc/checks.h, check_mask_value) with their message: the value of
    masked columns within the dtype's finite range, or inf, -inf or NaN."""
    if mask_value is None or dtype not in _DTYPE_NAMES:
        return
    info, name = torch.finfo(dtype), _DTYPE_NAMES[dtype]
    torch._check(
        info.min <= mask_value <= info.max or abs(mask_value) == float("inf") or mask_value != mask_value,
        lambda: f"{op}: mask_value {mask_value:g} cannot be converted to type {name} without overflow "
        f"({name} holds [{info.min:g}, {info.max:g}], inf and -inf); pass one of those, or None for "
        "the lowest finite value",
    )


def _check_hints(op: str, width, live_count: int | None, live_end: int | None) -> None:
    """The kernels' range checks of the hints (csrc/checks.h, check_hints), with their
    messages; whether a hint matches the mask only a kernel can tell."""
    if live_count is not None:
        torch._check(0 <= live_count <= width,
                     lambda: f"{op}: live_count must be in [0, {width}], got {live_count}")
    if live_end is not None:
        torch._check(0 <= live_end <= width, lambda: f"{op}: live_end must be in [0, {width}], got {live_end}")
    if live_count is not None and live_end is not None:
        torch._check(
            live_count <= live_end,
            lambda: f"{op}: live_count {live_count} exceeds live_end {live_end}: every live row lies below "
            f"live_end, so at most {live_end} are live; pass the exact count and a bound at or past the last "
            "live row, or None",
        )


@torch.library.register_fake("growop::masked_linear")
def _masked_linear_fake(input, weight, bias, active, width, mask_value=None, strategy="auto", live_count=None,
                        live_end=None):
    _check_devices("growop.masked_linear", weight, input=input, bias=bias, active=active)
    _check_mask(weight, active)
    _check_input(input, weight)
    _check_mask_value("growop.masked_linear", mask_value, weight.dtype)
    torch._check(0 <= width, lambda: f"width {width} must be >= 0")
    torch._check(width <= weight.shape[0], lambda: f"width {width} exceeds the capacity")
    _check_hints("growop.masked_linear", width, live_count, live_end)
    if bias is not None:
        torch._check(bias.shape == (weight.shape[0],), lambda: "bias must be (capacity,)")
    return input.new_empty((*input.shape[:-1], width))


@torch.library.register_fake("growop::masked_linear_backward")
def _masked_linear_backward_fake(
    grad_output, input, weight, active, output_mask, strategy="auto", live_count=None, live_end=None
):
    _check_devices("growop.masked_linear_backward", weight, grad_output=grad_output, input=input,
                   active=active)
    _check_mask(weight, active)
    _check_input(input, weight)
    torch._check(grad_output.shape[:-1] == input.shape[:-1], lambda: "grad_output does not match input")
    _check_hints("growop.masked_linear_backward", grad_output.shape[-1], live_count, live_end)
    capacity, in_features = weight.shape
    return (
        weight.new_empty(input.shape if output_mask[0] else (0,)),
        weight.new_empty((capacity if output_mask[1] else 0, in_features)),
        weight.new_empty((capacity if output_mask[2] else 0,)),
    )


# ----------------------------------------------------------------------- batching rules
#
# Only the leading-batch cases map onto one call: the op takes any number of leading
# dimensions of input (and grad_output), so a vmapped input is one more of them. Anything
# else (a vmapped weight, bias or mask, or per-sample weight gradients) runs the op once
# per slice. Either way torch.func's slow generic fallback, and its warning, never apply.


def _batch_first(t: Tensor, dim: int | None, size: int) -> Tensor:
    """`t` with its vmapped dimension first, or expanded to `size` there if it has none."""
    return t.expand(size, *t.shape) if dim is None else t.movedim(dim, 0)


def _vmapped(in_dims) -> list[bool]:
    """Which arguments vmap batches. A non-tensor argument's in_dim is None or, for a list,
    a list of Nones."""
    return [isinstance(d, int) for d in in_dims]


def _per_slice(op, info, in_dims, args):
    """The op on each slice of the vmapped dimension, results stacked along dim 0."""
    results = [
        op(*(a.select(d, b) if isinstance(d, int) else a for a, d in zip(args, in_dims)))
        for b in range(info.batch_size)
    ]
    if isinstance(results[0], tuple):
        return tuple(torch.stack(parts) for parts in zip(*results))
    return torch.stack(results)


@torch.library.register_vmap("growop::masked_linear")
def _masked_linear_vmap(info, in_dims, input, weight, bias, active, width, mask_value=None,
                        strategy="auto", live_count=None, live_end=None):
    args = (input, weight, bias, active, width, mask_value, strategy, live_count, live_end)
    op = _ops.masked_linear.default
    if not any(_vmapped(in_dims)[1:]):
        return op(input.movedim(in_dims[0], 0), *args[1:]), 0
    return _per_slice(op, info, in_dims, args), 0


@torch.library.register_vmap("growop::masked_linear_backward")
def _masked_linear_backward_vmap(info, in_dims, grad_output, input, weight, active, output_mask,
                                 strategy="auto", live_count=None, live_end=None):
    args = (grad_output, input, weight, active, output_mask, strategy, live_count, live_end)
    op = _ops.masked_linear_backward.default
    input_only = output_mask[0] and not output_mask[1] and not output_mask[2]
    if input_only and not any(_vmapped(in_dims)[2:]):
        grad_output, input = (
            _batch_first(t, d, info.batch_size) for t, d in zip((grad_output, input), in_dims[:2])
        )
        grads = op(grad_output, input, *args[2:])
        return grads, (0, None, None)
    return _per_slice(op, info, in_dims, args), (0, 0, 0)


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
    def masked_linear_autocast(input, weight, bias, active, width, mask_value=None,
                               strategy="auto", live_count=None, live_end=None):
        # torch.library.register_autocast fixes one dtype per device at registration, but
        # the context chooses it at run time (bfloat16 or float16 on either device), so the
        # kernel reads it from the context, as autocast's own kernels do.
        dtype = torch.get_autocast_dtype(device_type)
        input, weight, bias = (_autocast_cast(t, device_type, dtype) for t in (input, weight, bias))
        with torch.autocast(device_type, enabled=False):
            return _ops.masked_linear.default(
                input, weight, bias, active, width, mask_value, strategy, live_count, live_end
            )

    return masked_linear_autocast


for _device_type, _dispatch_key in AUTOCAST_DISPATCH_KEYS.items():
    torch.library.impl("growop::masked_linear", _dispatch_key, _autocast_kernel(_device_type))


# ------------------------------------------------------------------ linear cross-entropy
#
# ``linear_cross_entropy``: cross-entropy over the logits of the live rows, computed a chunk
# of tokens at a time so the logits are never made (schemas in
# csrc/ops/linear_cross_entropy.cpp, kernels in csrc/loss/, autograd in csrc/autograd/).
# Here: the typed wrapper, the fake kernels of its three ops, and its autocast rule.

REDUCTIONS = ("none", "mean", "sum")


def linear_cross_entropy(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    active: Tensor,
    target: Tensor,
    width: int,
    classes: Tensor | None = None,
    class_weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    chunk_size: tuple[int, int] = (0, 0),
    live_count: int | None = None,
) -> Tensor:
    """Cross-entropy of ``input @ weight[j] + bias[j]`` over the classes ``j`` of the softmax.

    The classes are the live rows below ``width``, restricted to ``classes`` (an int64
    tensor of slots) when given; ``target`` holds slots. ``chunk_size`` is ``(tokens,
    classes)`` per chunk, 0 for the op's choice. See :func:`growop.linear_cross_entropy`.
    """
    if live_count is not None and (is_fx_symbolic_tracing() or torch.jit.is_tracing()):
        live_count = None  # a recorded graph runs later, on the mask as it is then
    return _ops.linear_cross_entropy.default(
        input, weight, bias, active, target, width, classes, class_weight, ignore_index,
        reduction, label_smoothing, list(chunk_size), live_count,
    )


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """The loss's dtype, that of its softmax statistics: float32 for bfloat16/float16."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _check_loss_arguments(op, input, weight, bias, active, target, width, classes, class_weight,
                          reduction):
    """What the kernels check (csrc/loss/linear_cross_entropy_kernel.cpp), on shapes only."""
    _check_devices(op, weight, input=input, bias=bias, active=active, target=target,
                   classes=classes, class_weight=class_weight)
    _check_mask(weight, active)
    _check_input(input, weight)
    torch._check(0 <= width, lambda: f"{op}: width {width} must be >= 0")
    torch._check(width <= weight.shape[0], lambda: f"{op}: width {width} exceeds the capacity")
    if bias is not None:
        torch._check(bias.shape == (weight.shape[0],), lambda: f"{op}: bias must be (capacity,)")
    torch._check(target.dtype == torch.int64, lambda: f"{op}: target must be int64")
    torch._check(target.shape == input.shape[:-1], lambda: f"{op}: target does not match input")
    torch._check(reduction in REDUCTIONS, lambda: f"{op}: reduction must be one of {REDUCTIONS}")
    if classes is not None:
        torch._check(classes.dim() == 1, lambda: f"{op}: classes must be 1-D")
    if class_weight is not None:
        torch._check(class_weight.shape == (width,), lambda: f"{op}: class_weight must be (width,)")


def _loss_like(input: Tensor, target: Tensor, reduction: str) -> Tensor:
    shape = target.shape if reduction == "none" else ()
    return input.new_empty(shape, dtype=_loss_dtype(input.dtype))


def _gradients_like(input, weight, bias, output_mask):
    capacity, in_features = weight.shape
    return (
        weight.new_empty(input.shape if output_mask[0] else (0,)),
        weight.new_empty((capacity, in_features) if output_mask[1] else (0,)),
        weight.new_empty((capacity,) if output_mask[2] and bias is not None else (0,)),
    )


@torch.library.register_fake("growop::linear_cross_entropy")
def _linear_cross_entropy_fake(input, weight, bias, active, target, width, classes=None,
                               class_weight=None, ignore_index=-100, reduction="mean",
                               label_smoothing=0.0, chunk_size=(0, 0), live_count=None):
    _check_loss_arguments("growop.linear_cross_entropy", input, weight, bias, active, target,
                          width, classes, class_weight, reduction)
    return _loss_like(input, target, reduction)


@torch.library.register_fake("growop::_linear_cross_entropy_forward")
def _linear_cross_entropy_forward_fake(input, weight, bias, active, target, width, classes,
                                       class_weight, ignore_index, reduction, label_smoothing,
                                       chunk_size, live_count, output_mask):
    _check_loss_arguments("growop.linear_cross_entropy", input, weight, bias, active, target,
                          width, classes, class_weight, reduction)
    lse = input.new_empty((target.numel(),), dtype=_loss_dtype(input.dtype))
    return (_loss_like(input, target, reduction), lse,
            *_gradients_like(input, weight, bias, output_mask))


@torch.library.register_fake("growop::_linear_cross_entropy_backward")
def _linear_cross_entropy_backward_fake(grad_loss, input, weight, bias, active, target, lse, width,
                                        classes, class_weight, ignore_index, reduction,
                                        label_smoothing, chunk_size, live_count, output_mask):
    _check_loss_arguments("growop.linear_cross_entropy", input, weight, bias, active, target,
                          width, classes, class_weight, reduction)
    return _gradients_like(input, weight, bias, output_mask)


def _loss_autocast_kernel(device_type: str):
    def linear_cross_entropy_autocast(input, weight, bias, active, target, width, classes=None,
                                      class_weight=None, ignore_index=-100, reduction="mean",
                                      label_smoothing=0.0, chunk_size=(0, 0), live_count=None):
        # The product in the autocast dtype, as F.linear's; the softmax statistics and the
        # loss in float32, as F.cross_entropy's under autocast. class_weight stays as given.
        dtype = torch.get_autocast_dtype(device_type)
        input, weight, bias = (_autocast_cast(t, device_type, dtype) for t in (input, weight, bias))
        with torch.autocast(device_type, enabled=False):
            return _ops.linear_cross_entropy.default(
                input, weight, bias, active, target, width, classes, class_weight, ignore_index,
                reduction, label_smoothing, chunk_size, live_count,
            )

    return linear_cross_entropy_autocast


for _device_type, _dispatch_key in AUTOCAST_DISPATCH_KEYS.items():
    torch.library.impl("growop::linear_cross_entropy", _dispatch_key, _loss_autocast_kernel(_device_type))


# The loss is per sample under vmap: each op runs once per slice (a vmapped 'mean' or 'sum'
# is one loss per sample, so slices cannot share one call). The internal ops run under
# vmap(grad(...)), per-sample gradients, below the C++ autograd.
def _loss_vmap(op):
    def rule(info, in_dims, *args):
        return _per_slice(op, info, in_dims, args), 0

    return rule


for _name in ("linear_cross_entropy", "_linear_cross_entropy_forward", "_linear_cross_entropy_backward"):
    torch.library.register_vmap(f"growop::{_name}", _loss_vmap(getattr(_ops, _name).default))
