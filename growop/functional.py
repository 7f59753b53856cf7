"""Functional form of growop's layers, in the style of ``torch.nn.functional``."""

from __future__ import annotations

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
