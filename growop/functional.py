"""Functional form of growop's layers, in the style of ``torch.nn.functional``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from growop import ops


def masked_linear(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    active: Tensor,
    out_features: int | None = None,
    mask_value: float | None = None,
    live_count: int | None = None,
    live_end: int | None = None,
) -> Tensor:
    """A linear layer over the live rows of an over-provisioned weight.

    Args:
        input: ``(*, in_features)``.
        weight: ``(capacity, in_features)``.
        bias: ``(capacity,)`` or ``None``.
        active: bool ``(capacity,)``; ``True`` marks a live row.
        out_features: width of the result; rows ``>= out_features`` are ignored.
            ``None`` means ``capacity``.
        mask_value: the value of every column whose row is not live. ``None`` means the
            lowest finite value of the dtype (``torch.finfo(dtype).min``), which softmax and
            cross-entropy treat as probability zero while staying finite.
        live_count: the number of live rows among the first ``out_features``, if the caller
            knows it without reading ``active`` (``GrowLinear`` keeps it on the host). The
            ``auto`` strategy uses it to choose between dense and gather; on CUDA it also lets
            gather run cuBLAS on the packed live rows, and dense skip the masking pass when
            every row is live. It must be exact: the CUDA path checks it on the device (a
            wrong count is a device-side assert) and sets it aside while a CUDA graph is
            captured. Without it CUDA's ``auto`` takes dense; the CPU counts the mask itself
            and refuses a count that differs.
        live_end: a row from which on none below ``out_features`` is live (every live row
            lies below it), if the caller knows it (``GrowLinear`` passes its slots in use,
            ``rows.used``). CUDA then works on the first ``live_end`` rows only and fills the
            other columns once; with ``live_count == live_end`` as well (the live rows are
            exactly the first ``live_end``, as in a ``static_shape`` layer where nothing is
            deactivated) it is one GEMM of ``weight[:live_end]`` straight into the output's
            first columns, with no gather, copy or masking pass, forward and backward. Like
            ``live_count`` it never changes the result: both are checked against the mask
            where they shape the work (an error on the CPU, which reads the mask itself and
            refuses a wrong hint; a device-side assert on CUDA) and set aside while a CUDA
            graph is captured.

    Returns:
        ``(*, out_features)``: column ``j`` is ``input @ weight[j] + bias[j]`` where
        ``active[j]``, else ``mask_value``. Gradients are those of ``F.linear`` on the live
        rows; rows that are not live get zero gradient. See ``growop.strategy`` for how it is
        computed.
    """
    width = weight.shape[0] if out_features is None else out_features
    return ops.masked_linear(input, weight, bias, active, width, mask_value, live_count, live_end)


def linear_cross_entropy(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    *,
    active: Tensor,
    out_features: int | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    classes: range | Sequence[int] | Tensor | None = None,
    class_weight: Tensor | None = None,
    chunk_size: int | tuple[int, int] | None = None,
    live_count: int | None = None,
) -> Tensor:
    """Cross-entropy of a linear layer's logits over its live classes, never making the logits.

    The same value and gradients as ``F.cross_entropy(logits[..., C], t')`` where ``logits =
    F.linear(input, weight, bias)``, ``C`` are the classes of the softmax and ``t'`` each
    target's position in ``C``: columns of dead rows and of slots past ``out_features``
    never enter the softmax (nor does label smoothing spread onto them, which gives ``inf``
    when ``F.cross_entropy`` sees masked columns). The ``(tokens, capacity)`` logits are
    never made: tokens are taken a chunk at a time, so working memory is bounded by a chunk.
    With gradients enabled, a ``"mean"`` or ``"sum"`` loss (not float16, which recomputes
    them in the backward) computes its gradients in the forward and holds them until the
    backward (compute losses you will not backpropagate
    under ``torch.no_grad()``).

    Args:
        input: ``(*, in_features)``.
        weight: ``(capacity, in_features)``.
        target: ``(*)``, integer slot numbers in ``[0, out_features)``, or ``ignore_index``.
            Each must be live and in ``classes``: on the CPU anything else raises
            ``IndexError`` naming the target; on CUDA it is a device-side assert, as for
            ``nn.Embedding``. Soft (probability) targets are refused with a ``TypeError``:
            for them, compute the logits and use ``F.cross_entropy`` over the live columns.
        bias: ``(capacity,)`` or ``None``.
        active: bool ``(capacity,)``; ``True`` marks a live row.
        out_features: slots in use; rows ``>= out_features`` are never classes. ``None``
            means ``capacity``.
        ignore_index, reduction: as ``F.cross_entropy`` (``"mean"`` divides by the targets
            not ignored, weighted by ``class_weight``; every target ignored gives ``nan``).
        label_smoothing: in ``[0, 1]``, spread uniformly over the classes of the softmax.
        classes: restricts the softmax further to these live slots (a ``range``, a sequence
            or an integer tensor; each once): a sub-loss over, say, the newest classes only.
        class_weight: ``(out_features,)`` floating, a weight per slot, as
            ``F.cross_entropy``'s ``weight`` (not differentiated).
        chunk_size: tokens per chunk, or ``(tokens, classes)``; ``None`` chooses (a chunk's
            logits about twice the input's size, and at least 1024 tokens). It never
            changes the result beyond rounding.
        live_count: the live rows below ``out_features``, where the caller knows it without
            reading ``active`` (as for :func:`masked_linear`). On CUDA it lets the op gather
            only the live rows without a host sync; without it CUDA multiplies every row
            below ``out_features`` and masks the dead ones. It must be exact (checked on the
            device). The CPU reads the mask itself.

    Returns:
        The loss: a scalar for ``"mean"`` and ``"sum"``, ``(*)`` for ``"none"``; float32 for
        bfloat16/float16 input (as ``F.cross_entropy`` under autocast and transformers'
        losses give it), else the input's dtype. Under ``torch.autocast`` the product runs
        in the autocast dtype, as ``F.linear``'s.

    Gradients reach ``input``, ``weight`` and ``bias`` (rows outside the softmax get exactly
    zero). For ``"mean"`` and ``"sum"`` they are computed in the forward, chunk by chunk
    (the three products of ``nn.Linear`` + ``F.cross_entropy``, none recomputed), and scaled
    by the incoming gradient in the backward; for ``"none"``, and for float16 (so a gradient
    scaler's factor is applied before rounding), the backward recomputes the logits a chunk
    at a time. Second derivatives and forward-mode AD raise a clear error.
    """
    if reduction not in ops.REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {ops.REDUCTIONS}, got {reduction!r}")
    width = weight.shape[0] if out_features is None else out_features
    return ops.linear_cross_entropy(
        input,
        weight,
        bias,
        active,
        _class_indices(target),
        width,
        _classes_tensor(classes, weight.device),
        class_weight,
        ignore_index,
        reduction,
        float(label_smoothing),
        _chunk_size(chunk_size),
        live_count,
    )


def _class_indices(target: Tensor) -> Tensor:
    if not isinstance(target, Tensor):
        raise TypeError(f"linear_cross_entropy: target must be a tensor, got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex():
        raise TypeError(
            "linear_cross_entropy: target must hold class indices (an integer tensor); soft "
            f"(probability) targets are not supported, got {target.dtype}. For a distillation "
            "loss over a growing head, compute the logits (head(x)) and use F.cross_entropy "
            "over the live columns."
        )
    if target.dtype == torch.bool:
        raise TypeError("linear_cross_entropy: target must hold class indices, got a bool tensor")
    return target if target.dtype == torch.int64 else target.long()


def _classes_tensor(classes, device: torch.device) -> Tensor | None:
    if classes is None or isinstance(classes, Tensor):
        return classes
    if isinstance(classes, range):
        return torch.arange(classes.start, classes.stop, classes.step, dtype=torch.int64, device=device)
    return torch.tensor(list(classes), dtype=torch.int64, device=device).reshape(-1)


def _chunk_size(chunk_size) -> tuple[int, int]:
    sizes = (chunk_size, None) if chunk_size is None or isinstance(chunk_size, int) else tuple(chunk_size)
    if len(sizes) != 2 or not all(s is None or (isinstance(s, int) and s >= 1) for s in sizes):
        raise ValueError(
            "linear_cross_entropy: chunk_size must be None, a number of tokens >= 1, or "
            f"(tokens, classes), each >= 1 or None; got {chunk_size!r}"
        )
    return tuple(0 if s is None else s for s in sizes)
