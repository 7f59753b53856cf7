"""``GrowLinear``: a drop-in ``nn.Linear`` whose outputs can be added while it trains.

What a linear layer adds to capacity rows (:mod:`growop.rows`): its Parameters and their
initialisation, the masked forward, and conversion to and from ``nn.Linear``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.parameter import Parameter

from growop import functional, ops
from growop.rows import GrowRows, checked_int, default_capacity, resolved_capacity

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_ABSENT = object()


class GrowLinear(GrowRows, nn.Linear):
    r"""``nn.Linear`` with over-provisioned rows, so outputs can be added in place.

    ``capacity`` rows of weight are allocated once; the bool buffer ``active`` says which are
    live. Output column ``j`` is ``x @ weight[j] + bias[j]`` for a live row and
    ``mask_value`` otherwise. :meth:`grow` makes the next rows live: within capacity it
    allocates nothing and the Parameters, their ``data_ptr()``, the optimizer's state, DDP's
    buckets and compiled graphs all stay valid.

    Args:
        in_features: size of each input sample.
        out_features: output slots in use at the start (all live).
        bias: learn an additive bias, as ``nn.Linear``.
        device, dtype: as ``nn.Linear``; dtype is float32, float64, bfloat16 or float16.
        capacity: rows allocated; default :func:`default_capacity` (25% headroom, at least
            8 rows). Must be ``>= out_features``. This and the arguments after it are
            keyword only.
        mask_value: value of the columns whose row is not live; ``None`` means
            ``torch.finfo(dtype).min``, which softmax and cross-entropy treat as probability
            zero while staying finite.
        static_shape: if ``True`` the output always has ``capacity`` columns (slots not yet
            grown are masked), so growing changes no shape: ``torch.compile`` and CUDA graphs
            see the same shapes before and after.

    Attributes:
        weight: ``(capacity, in_features)`` Parameter.
        bias: ``(capacity,)`` Parameter, or ``None``.
        active: bool buffer ``(capacity,)``; rows ``>= out_features`` are never live.
        out_features: output slots in use; grows with :meth:`grow` (read-only).
        capacity: rows allocated.
        live_count: live rows, ``int(active.sum())``, kept on the host.
        rows: a read-only view of the rows (``used``, ``live``, ``capacity``, ``params``),
            shared with the layers this one grows together with.

    Shape:
        - Input: ``(*, in_features)``.
        - Output: ``(*, out_features)``, or ``(*, capacity)`` with ``static_shape=True``.
    """

    __constants__ = ["in_features"]

    in_features: int
    weight: Tensor
    active: Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        capacity: int | None = None,
        mask_value: float | None = None,
        static_shape: bool = False,
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        nn.Module.__init__(self)  # not nn.Linear.__init__: it allocates out_features rows
        in_features = checked_int(in_features, "GrowLinear: in_features", 0)
        out_features = checked_int(out_features, "GrowLinear: out_features", 0)
        capacity = resolved_capacity(capacity, out_features, "GrowLinear", "out_features")
        resolved_dtype = torch.get_default_dtype() if dtype is None else dtype
        if resolved_dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"GrowLinear: dtype must be one of float32, float64, bfloat16, float16; "
                f"got {resolved_dtype}"
            )
        self.in_features = in_features
        self.mask_value = mask_value
        self.static_shape = bool(static_shape)
        self.weight = Parameter(torch.empty((capacity, in_features), **factory_kwargs))
        if bias:
            self.bias = Parameter(torch.empty(capacity, **factory_kwargs))
        else:
            self.register_parameter("bias", None)
        self._init_rows(out_features, capacity, device)
        self.reset_parameters()

    # ------------------------------------------------------------------ basics

    @property
    def out_features(self) -> int:
        """Output slots in use; grows with :meth:`grow`."""
        return self._rows.used

    @out_features.setter
    def out_features(self, value: int) -> None:
        self._assign_used(value)

    def reset_parameters(self) -> None:
        """Leaves the layer as its constructor would: every row initialised as ``nn.Linear``
        does, every slot in use live, and a new seed for ``grow(init="default")`` rows.

        With ``to_empty()`` this is the deferred-initialisation recipe (build on meta,
        ``to_empty``, ``reset_parameters``) of FSDP2 and torchtitan.
        """
        _linear_init_(self.weight, self.bias, self.in_features)
        self._reset_rows()

    def forward(self, input: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            # The host-side hints (live count, slots in use) are left out under compile: an
            # int that changes on every grow would be a guard, and a recompile.
            if self.static_shape:
                return self._masked_linear(input, self.capacity, None)
            return _forward_with_dynamic_width(self, input)
        # Eager: the row tensors straight from the module's own dicts, where
        # nn.Module.__getattr__ would find them; three lookups through it cost about what a
        # small head's GEMM does. A tensor that is not there (a parametrization, weight_norm)
        # is read as an ordinary attribute. The hints let auto choose a strategy without a
        # device sync: the live count, and the slots in use, past which no row is live (with
        # static_shape and nothing deactivated, CUDA's one GEMM on the first rows).
        weight = self._parameters.get("weight")
        if weight is None:
            weight = self.weight
        bias = self._parameters.get("bias", _ABSENT)
        if bias is _ABSENT:
            bias = self.bias
        active = self._buffers.get("active")
        if active is None:
            active = self.active
        # RowSet.live_count_for, with its common case (the mask growop last wrote, as it
        # left it) inline: a method call is felt by a small head's forward. The counts are
        # read from the row set, which owns them.
        rows = self._rows
        seen, version = self._mask_record
        if active is seen and (version is None or active._version == version):
            live_count = rows.live
        else:
            live_count = rows.live_count_for(self, active)
        # Read after live_count_for, which follows a mask written elsewhere; both hints
        # describe the mask or neither is given.
        used = rows.used if live_count is not None else None
        width = weight.shape[0] if self.static_shape else rows.used
        return ops.masked_linear(input, weight, bias, active, width, self.mask_value, live_count, used)

    def _masked_linear(self, input: Tensor, width: int, live_count: int | None) -> Tensor:
        return functional.masked_linear(
            input,
            self.weight,
            self.bias,
            active=self.active,
            out_features=width,
            mask_value=self.mask_value,
            live_count=live_count,
        )

    def cross_entropy(
        self,
        input: Tensor,
        target: Tensor,
        *,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        classes=None,
        class_weight: Tensor | None = None,
        chunk_size=None,
    ) -> Tensor:
        """Cross-entropy of this layer's logits over its live classes, never making the logits.

        ``F.cross_entropy(self(input), target, ...)`` restricted to the live columns (and to
        ``classes``, live slots, when given), with label smoothing spread over those only,
        the same with or without ``static_shape``. ``target`` holds slots in
        ``[0, out_features)``; a target that is not live or not in ``classes`` raises
        ``IndexError`` on the CPU (a device-side assert on CUDA). ``class_weight`` has one
        entry per column of ``self(input)``. See :func:`growop.linear_cross_entropy`.
        """
        if torch.compiler.is_compiling():
            # No host-side live count (it would be a guard); with static_shape the width is
            # the capacity, so grows change nothing the graph sees.
            if self.static_shape:
                return self._cross_entropy(input, target, self.weight.shape[0], None, ignore_index,
                                           reduction, label_smoothing, classes, class_weight, chunk_size)
            return _with_dynamic_int_attributes(
                lambda: self._cross_entropy(input, target, self.out_features, None, ignore_index,
                                            reduction, label_smoothing, classes, class_weight, chunk_size)
            )
        # Eager: the slots in use and the host-side live count, so the rows past them (a
        # static_shape layer's unused slots) are not even looked at.
        width = self.out_features
        if class_weight is not None and self.static_shape and class_weight.shape[:1] == (self.capacity,):
            class_weight = class_weight[:width]
        live_count = self._rows.live_count_for(self, self.active)
        return self._cross_entropy(input, target, width, live_count, ignore_index, reduction,
                                   label_smoothing, classes, class_weight, chunk_size)

    def _cross_entropy(self, input, target, width, live_count, ignore_index, reduction,
                       label_smoothing, classes, class_weight, chunk_size) -> Tensor:
        return functional.linear_cross_entropy(
            input, self.weight, target, self.bias, active=self.active, out_features=width,
            ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
            classes=classes, class_weight=class_weight, chunk_size=chunk_size, live_count=live_count,
        )

    def extra_repr(self) -> str:
        text = (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"capacity={self.capacity}, bias={self.bias is not None}"
        )
        if self.static_shape:
            text += ", static_shape=True"
        if self.mask_value is not None:
            text += f", mask_value={self.mask_value}"
        return text

    # ------------------------------------------------------------------ conversion

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        capacity: int | None = None,
        *,
        mask_value: float | None = None,
        static_shape: bool = False,
    ) -> GrowLinear:
        """A ``GrowLinear`` with ``linear``'s rows, all live, on its device and dtype."""
        if not isinstance(linear, nn.Linear) or isinstance(linear, GrowRows):
            raise TypeError(
                f"from_linear expects a plain nn.Linear, got {type(linear).__name__}; a "
                "GrowLinear is growable already (to change its capacity, load its state_dict "
                "into a GrowLinear built with the capacity you want)"
            )
        weight = linear.weight
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            capacity=capacity,
            mask_value=mask_value,
            static_shape=static_shape,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            layer.weight[: linear.out_features].copy_(weight)
            if linear.bias is not None:
                layer.bias[: linear.out_features].copy_(linear.bias)
        layer.weight.requires_grad_(weight.requires_grad)  # a frozen layer stays frozen
        if linear.bias is not None:
            layer.bias.requires_grad_(linear.bias.requires_grad)
        return layer

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` giving the same outputs, for export or code without growop.

        It has ``out_features`` outputs (``capacity`` with ``static_shape``). A masked column
        becomes a zero weight row with bias ``mask_value`` (so a layer without bias gets one
        if any slot is masked). Inputs holding inf or NaN make such a column NaN, where this
        layer gives ``mask_value``.
        """
        width = self.capacity if self.static_shape else self.out_features
        live = self.active[:width]
        has_bias = self.bias is not None or not bool(live.all())
        weight = self.weight.detach()
        linear = nn.Linear(
            self.in_features, width, bias=has_bias, device=weight.device, dtype=weight.dtype
        )
        with torch.no_grad():
            linear.weight.copy_(torch.where(live[:, None], weight[:width], 0))
            if has_bias:
                bias = self.bias[:width] if self.bias is not None else weight.new_zeros(width)
                linear.bias.copy_(torch.where(live, bias, self._resolved_mask_value()))
        return linear

    # ------------------------------------------------------------------ rows

    def _row_params(self) -> dict[str, Tensor | None]:
        return {"weight": self.weight, "bias": self.bias}

    def _draw_rows(self, rows: dict[str, Tensor], generator: torch.Generator | None) -> None:
        _linear_init_(rows["weight"], rows["bias"], self.in_features, generator=generator)

    def _resolved_mask_value(self) -> float:
        if self.mask_value is not None:
            return self.mask_value
        return torch.finfo(self.weight.dtype).min


def _forward_with_dynamic_width(layer: GrowLinear, input: Tensor) -> Tensor:
    """``layer.forward`` as ``torch.compile`` should trace it without ``static_shape``.

    Dynamo treats int attributes of modules as constants, so every grow would compile a new
    graph until ``recompile_limit`` (8) graphs exist, after which the model silently runs
    eagerly. Tracing ``out_features`` as an ordinary int instead lets automatic dynamic
    shapes apply: one recompile at the first grow, with a symbolic width, then none. The
    config patch is scoped to this call; torch without it keeps the constant behaviour.
    """
    return _with_dynamic_int_attributes(lambda: layer._masked_linear(input, layer.out_features, None))


def _with_dynamic_int_attributes(call):
    """``call()`` with a module's int attributes traced as ints, not constants (see
    :func:`_forward_with_dynamic_width`)."""
    patch = getattr(torch._dynamo, "patch_dynamo_config", None)  # imported: we are compiling
    if patch is None:
        return call()
    with patch(allow_unspec_int_on_nn_module=True):
        return call()


def _linear_init_(
    weight: Tensor, bias: Tensor | None, fan_in: int, generator: torch.Generator | None = None
) -> None:
    """``nn.Linear.reset_parameters`` for any number of rows."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
    if bias is not None:
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        nn.init.uniform_(bias, -bound, bound, generator=generator)
