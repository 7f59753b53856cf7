"""``GrowLinear``: a drop-in ``nn.Linear`` whose outputs can be added while it trains."""

from __future__ import annotations

import math
import operator
import weakref
from collections.abc import Callable, Iterable
from typing import Any, Union

import torch
from torch import Tensor, nn
from torch.nn.parameter import Parameter
from torch.optim.optimizer import register_optimizer_step_pre_hook

from growop import distributed, functional, optim

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

_UINT64 = (1 << 64) - 1

# Past capacity, storage grows to at least this multiple of the old capacity, so a
# run of single-row grows reallocates O(log n) times.
GROWTH_FACTOR = 1.5

RowInit = Union[str, Tensor, tuple, Callable[[Tensor, Union[Tensor, None]], None]]
Rows = Union[int, Iterable[int], Tensor]


def default_capacity(out_features: int) -> int:
    """Rows allocated when ``capacity`` is not given: 25% headroom, and at least 8 rows."""
    return out_features + max(8, math.ceil(out_features / 4))


# Parameters whose storage was reallocated by a GrowLinear without the optimizer at hand.
# Checked before every optimizer step, so state sized for the old capacity raises a clear
# error instead of failing deep inside the optimizer's arithmetic.
# Keyed by id: tensors compare element-wise, so they cannot be set members themselves.
_resized_without_optimizer: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _check_optimizer_state_sizes(optimizer, args, kwargs) -> None:
    if not _resized_without_optimizer:
        return
    for param in list(_resized_without_optimizer.values()):
        for name, value in optim.param_state(optimizer, param).items():
            if _is_row_state(value, param) and value.shape[0] != param.shape[0]:
                raise RuntimeError(
                    f"growop: {type(optimizer).__name__} holds state '{name}' of shape "
                    f"{tuple(value.shape)} for a GrowLinear parameter that now has shape "
                    f"{tuple(param.shape)}: the layer grew past its capacity without the "
                    "optimizer. Call layer.resize_optimizer_state(optimizer) once before "
                    "stepping (new rows start with fresh state), and pass optimizer= to "
                    "grow() from now on."
                )


register_optimizer_step_pre_hook(_check_optimizer_state_sizes)


def _is_row_state(value: Any, param: Tensor) -> bool:
    """Whether an optimizer state entry holds one slice per row of ``param``."""
    return (
        isinstance(value, Tensor)
        and value.dim() == param.dim()
        and value.dim() >= 1
        and value.shape[1:] == param.shape[1:]
    )


class GrowLinear(nn.Module):
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
        capacity: rows allocated; default :func:`default_capacity` (25% headroom, at least
            8 rows). Must be ``>= out_features``.
        mask_value: value of the columns whose row is not live; ``None`` means
            ``torch.finfo(dtype).min``, which softmax and cross-entropy treat as probability
            zero while staying finite.
        static_shape: if ``True`` the output always has ``capacity`` columns (slots not yet
            grown are masked), so growing changes no shape: ``torch.compile`` and CUDA graphs
            see the same shapes before and after.
        device, dtype: as ``nn.Linear``; dtype is float32, float64, bfloat16 or float16.

    Attributes:
        weight: ``(capacity, in_features)`` Parameter.
        bias: ``(capacity,)`` Parameter, or ``None``.
        active: bool buffer ``(capacity,)``; rows ``>= out_features`` are never live.
        out_features: output slots in use; grows with :meth:`grow`.
        capacity: rows allocated.

    Shape:
        - Input: ``(*, in_features)``.
        - Output: ``(*, out_features)``, or ``(*, capacity)`` with ``static_shape=True``.
    """

    __constants__ = ["in_features"]

    in_features: int
    out_features: int
    weight: Tensor
    active: Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        capacity: int | None = None,
        mask_value: float | None = None,
        static_shape: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        in_features = _checked_int(in_features, "GrowLinear: in_features", 0)
        out_features = _checked_int(out_features, "GrowLinear: out_features", 0)
        capacity = (
            default_capacity(out_features)
            if capacity is None
            else _checked_int(capacity, "GrowLinear: capacity", 0)
        )
        if capacity < out_features:
            raise ValueError(
                f"GrowLinear: capacity ({capacity}) must be >= out_features ({out_features})"
            )
        resolved_dtype = torch.get_default_dtype() if dtype is None else dtype
        if resolved_dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"GrowLinear: dtype must be one of float32, float64, bfloat16, float16; "
                f"got {resolved_dtype}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.mask_value = mask_value
        self.static_shape = bool(static_shape)
        self.weight = Parameter(torch.empty((capacity, in_features), **factory_kwargs))
        if bias:
            self.bias = Parameter(torch.empty(capacity, **factory_kwargs))
        else:
            self.register_parameter("bias", None)
        self.register_buffer("active", torch.arange(capacity, device=device) < out_features)
        # The optimizer step at which each row started fresh (0: from the beginning); read
        # by growop.optim to give Adam-family optimizers per-row step counts.
        self.register_buffer("row_start_step", torch.zeros(capacity, dtype=torch.int64, device=device))
        # Seeds grow(init="default"): a buffer, so DDP broadcasts rank 0's at wrap time and
        # every rank draws the same new rows whatever its own RNG state; non-persistent, so
        # checkpoints keep the keys nn.Linear-style code expects.
        self.register_buffer(
            "_init_seed", torch.zeros((), dtype=torch.int64, device=device), persistent=False
        )
        self.reset_parameters()

    # ------------------------------------------------------------------ basics

    @property
    def capacity(self) -> int:
        return self.weight.shape[0]

    def reset_parameters(self) -> None:
        """Re-initialises every row as ``nn.Linear`` does; the mask is left as it is.

        Also draws, from the global RNG, the seed from which later ``grow(init="default")``
        rows are drawn, so ``torch.manual_seed`` before construction fixes those rows too.
        """
        _linear_init_(self.weight, self.bias, self.in_features)
        if not self._init_seed.is_meta:  # on meta nothing is computed, as in nn.Linear
            seed = torch.randint(torch.iinfo(torch.int64).max, (), dtype=torch.int64)
            self._init_seed.fill_(seed.item())

    def forward(self, input: Tensor) -> Tensor:
        if self.static_shape:
            return self._masked_linear(input, self.capacity)
        if torch.compiler.is_compiling():
            return _forward_with_dynamic_width(self, input)
        return self._masked_linear(input, self.out_features)

    def _masked_linear(self, input: Tensor, width: int) -> Tensor:
        # The host-side live count lets auto choose a strategy without a sync. Under compile
        # it is left out: an int that changes on every grow would be a guard, and a recompile.
        live_count = None if torch.compiler.is_compiling() else getattr(self, "_live_count", None)
        return functional.masked_linear(
            input,
            self.weight,
            self.bias,
            active=self.active,
            out_features=width,
            mask_value=self.mask_value,
            live_count=live_count,
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

    # ------------------------------------------------------------------ growing

    def grow(
        self,
        k: int = 1,
        *,
        init: RowInit = "default",
        optimizer: torch.optim.Optimizer | None = None,
        allow_reallocation: bool = False,
    ) -> range:
        """Adds ``k`` live output rows after the last slot in use; returns their indices.

        Within capacity nothing is allocated: the same Parameters, the same storage. Past
        capacity the storage grows to ``max(default_capacity(n), 1.5 x capacity)`` rows; the
        Parameter objects stay the same, old rows bit-exact, and with ``optimizer=`` its
        per-row state grows with them. Without it, an optimizer that already holds state for
        this layer raises a clear error at its next ``step()`` (see
        :meth:`resize_optimizer_state`).

        In data-parallel training every process calls ``grow`` with the same arguments at
        the same step. Within capacity this works under ``DistributedDataParallel`` (wrapped
        once, never re-wrapped) and FSDP2's ``fully_shard``. Past capacity it raises while
        ``torch.distributed`` runs more than one process, unless ``allow_reallocation=True``
        (and always under FSDP2).

        Args:
            k: number of rows, ``>= 1``.
            init: how the new rows start:

                - ``"default"``: ``nn.Linear``'s initialisation, drawn from a generator
                  seeded by the layer's seed (drawn from the global RNG at construction or
                  :meth:`reset_parameters`) and the index of the first new row. The rows do
                  not depend on the global RNG state at the time of the call, so every DDP
                  rank draws the same rows; ``torch.manual_seed`` before construction fixes
                  them;
                - ``"zeros"``: weight and bias zero;
                - ``"mean"``: the mean of the live rows (weight and bias);
                - a Tensor ``(k, in_features)`` or ``(in_features,)``: the weight rows (bias 0);
                - a tuple ``(weight, bias)`` of such tensors (bias ``(k,)`` or a scalar);
                - a callable ``init(weight, bias)`` that fills, in place, a ``(k, in_features)``
                  tensor and a ``(k,)`` tensor (``None`` without bias).

                In distributed training, tensors and callables must give the same values on
                every process (for example, draw them from a ``torch.Generator`` seeded
                identically everywhere): growop cannot tell, and ranks that differ drift
                apart silently under DDP.
            optimizer: the optimizer that trains this layer. The new rows' state (momentum,
                Adam moments, ...) starts at zero; old rows' state is untouched.
            allow_reallocation: permit growing past capacity while ``torch.distributed`` runs
                more than one process. Only for a model that is not wrapped in
                ``DistributedDataParallel``, or that you will wrap again after growing: DDP's
                gradient buckets do not follow reallocated parameters.

        After an error nothing has changed.
        """
        k = _checked_int(k, "grow: k", 1)
        _check_optimizer_holds(optimizer, self)
        start = self.out_features
        stop = start + k
        if stop > self.capacity:
            reason = distributed.reallocation_error(
                self.capacity, stop, self._params(), bool(allow_reallocation)
            )
            if reason is not None:
                raise RuntimeError(reason)
        weight_rows, bias_rows = self._initial_rows(k, init)
        if stop > self.capacity:
            self._reallocate(max(default_capacity(stop), math.ceil(self.capacity * GROWTH_FACTOR)), optimizer)
        with torch.no_grad():
            distributed.write_rows_(self.weight, start, weight_rows)
            if self.bias is not None:
                distributed.write_rows_(self.bias, start, bias_rows)
            self.active[start:stop] = True
        self.out_features = stop
        if optimizer is not None:
            self._reset_optimizer_rows(optimizer, slice(start, stop))
            optim.start_rows(self, torch.arange(start, stop), optimizer)
        return range(start, stop)

    def deactivate(self, rows: Rows, *, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Masks existing rows (``< out_features``): their columns output ``mask_value``.

        Weights are kept and column positions never shift. With ``optimizer=`` the rows'
        optimizer state is zeroed, so momentum stops moving the masked rows; decay that does
        not depend on the gradient (AdamW's decoupled weight decay) still applies to them, as
        it does to any parameter.
        """
        index = self._row_index(rows, "deactivate")
        _check_optimizer_holds(optimizer, self)
        with torch.no_grad():
            self.active[index] = False
        if optimizer is not None:
            self._reset_optimizer_rows(optimizer, index)

    def reactivate(self, rows: Rows, *, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Unmasks rows (``< out_features``) with the weights they kept.

        With ``optimizer=`` their optimizer state starts fresh (zero).
        """
        index = self._row_index(rows, "reactivate")
        _check_optimizer_holds(optimizer, self)
        with torch.no_grad():
            self.active[index] = True
        if optimizer is not None:
            self._reset_optimizer_rows(optimizer, index)
            optim.start_rows(self, index, optimizer)

    def resize_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Brings ``optimizer``'s per-row state for this layer to the current capacity.

        Needed only after a grow past capacity made without ``optimizer=``: state tensors of
        the old row count are padded with zeros (fresh state for the new rows); old rows'
        state is unchanged.
        """
        _check_optimizer_holds(optimizer, self)
        for param in self._params():
            state = optim.param_state(optimizer, param)
            for name, value in list(state.items()):
                if _is_row_state(value, param) and value.shape[0] != param.shape[0]:
                    resized = value.new_zeros(param.shape)
                    rows = min(value.shape[0], param.shape[0])
                    resized[:rows].copy_(value[:rows])
                    state[name] = resized

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
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
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

    # ------------------------------------------------------------------ checkpoints

    def get_extra_state(self) -> dict:
        return {"out_features": self.out_features, "version": 1}

    def set_extra_state(self, state: dict) -> None:
        out_features = int(state["out_features"])
        if out_features > self.capacity:
            raise ValueError(
                f"GrowLinear: checkpoint has out_features={out_features}, "
                f"more than this layer's capacity {self.capacity}"
            )
        self.out_features = out_features

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        weight_key, bias_key = prefix + "weight", prefix + "bias"
        active_key, extra_key = prefix + "active", prefix + "_extra_state"
        start_key = prefix + "row_start_step"
        weight = state_dict.get(weight_key)
        if isinstance(weight, Tensor) and weight.dim() == 2:
            rows = weight.shape[0]
            if active_key not in state_dict and extra_key not in state_dict:
                # An nn.Linear checkpoint: every row is a live output.
                state_dict[active_key] = torch.ones(rows, dtype=torch.bool)
                state_dict[extra_key] = {"out_features": rows, "version": 1}
            if start_key not in state_dict:
                # Written before per-row step counts: every row counts from the start.
                state_dict[start_key] = torch.zeros(rows, dtype=torch.int64)
            extra = state_dict.get(extra_key)
            out_features = extra.get("out_features") if isinstance(extra, dict) else None
            if out_features is not None and out_features > self.capacity:
                error_msgs.append(
                    f"GrowLinear {prefix or '(root)'}: checkpoint has out_features="
                    f"{out_features}, which does not fit this layer's capacity {self.capacity}"
                )
                return
            if rows != self.capacity:
                self._fit_rows_in_place(
                    state_dict, (weight_key, bias_key, active_key, start_key), rows
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        optim.track(self)

    def _fit_rows_in_place(self, state_dict: dict, keys: tuple, rows: int) -> None:
        """Rewrites a checkpoint's per-row tensors to this layer's capacity.

        The first ``min(rows, capacity)`` rows come from the checkpoint; rows past the
        checkpoint keep this layer's own values and are not live (mask and start steps 0).
        """
        keep = min(rows, self.capacity)
        current = dict(zip(keys, (self.weight, self.bias, self.active, self.row_start_step)))
        for key in keys:
            saved, own = state_dict.get(key), current[key]
            if not isinstance(saved, Tensor) or own is None or saved.dim() != own.dim():
                continue
            if saved.shape[1:] != own.shape[1:]:
                continue  # left for the usual size-mismatch error
            fitted = own.detach().clone()
            if key not in keys[:2]:
                fitted.zero_()
            fitted[:keep].copy_(saved[:keep])
            state_dict[key] = fitted

    # ------------------------------------------------------------------ internals

    def _params(self) -> list[Tensor]:
        return [p for p in (self.weight, self.bias) if p is not None]

    def _resolved_mask_value(self) -> float:
        if self.mask_value is not None:
            return self.mask_value
        return torch.finfo(self.weight.dtype).min

    def _initial_rows(self, k: int, init: RowInit) -> tuple[Tensor, Tensor | None]:
        """The new rows' values, computed before anything in the layer changes.

        Plain tensors on the layer's device, the same on every process for the built-in
        inits (``"mean"`` gathers sharded parameters, a collective under FSDP2).
        """
        like = distributed.local(self.weight.detach())
        has_bias = self.bias is not None
        shape = (k, self.in_features)
        with torch.no_grad():
            if isinstance(init, str):
                if init == "default":
                    weight, bias = self._default_rows(k)
                elif init == "zeros":
                    weight = like.new_zeros(shape)
                    bias = like.new_zeros(k) if has_bias else None
                elif init == "mean":
                    live = self.active.nonzero().squeeze(1)
                    if live.numel() == 0:
                        raise ValueError("grow(init='mean') needs at least one live row")
                    weight = distributed.full(self.weight.detach())
                    weight = weight.index_select(0, live).mean(0).expand(shape).clone()
                    bias = (
                        distributed.full(self.bias.detach()).index_select(0, live).mean().expand(k).clone()
                        if has_bias
                        else None
                    )
                else:
                    raise ValueError(
                        f"grow: unknown init {init!r}; expected 'default', 'zeros', 'mean', "
                        "a tensor, a (weight, bias) tuple or a callable"
                    )
            elif isinstance(init, Tensor):
                weight = _rows_like(init, shape, like, "init")
                bias = like.new_zeros(k) if has_bias else None
            elif isinstance(init, tuple):
                if len(init) != 2:
                    raise ValueError(f"grow: init tuple must be (weight, bias), got {len(init)} items")
                weight = _rows_like(init[0], shape, like, "init weight")
                if has_bias:
                    bias = _rows_like(torch.as_tensor(init[1]), (k,), like, "init bias")
                elif init[1] is not None:
                    raise ValueError("grow: init gives a bias but the layer has none")
                else:
                    bias = None
            elif callable(init):
                weight = like.new_zeros(shape)
                bias = like.new_zeros(k) if has_bias else None
                init(weight, bias)
                if weight.shape != shape or (bias is not None and bias.shape != (k,)):
                    raise ValueError("grow: the init callable must fill its tensors in place")
            else:
                raise TypeError(f"grow: init must be a str, tensor, tuple or callable, got {type(init).__name__}")
        return weight, bias

    def _default_rows(self, k: int) -> tuple[Tensor, Tensor | None]:
        """``nn.Linear``-initialised rows ``out_features .. out_features + k``, reproducibly.

        Drawn on the CPU from a generator seeded by the layer's seed and the first new row
        (both the same on every DDP rank), then moved: the rows do not depend on the global
        RNG at call time, nor on the device.
        """
        like = distributed.local(self.weight.detach())
        weight = torch.empty((k, self.in_features), dtype=like.dtype)
        bias = torch.empty(k, dtype=like.dtype) if self.bias is not None else None
        if not like.is_meta:
            generator = torch.Generator().manual_seed(
                _row_seed(int(self._init_seed), self.out_features)
            )
            _linear_init_(weight, bias, self.in_features, generator=generator)
        weight = weight.to(like.device)
        return weight, bias.to(like.device) if bias is not None else None

    def _reallocate(self, capacity: int, optimizer: torch.optim.Optimizer | None) -> None:
        """Grows the storage to ``capacity`` rows, keeping the Parameter objects and old rows.

        The new tensors are all made before any is installed, so running out of memory
        leaves the layer as it was.
        """
        old = self.capacity
        params = self._params()
        datas, grads = [], []
        for param in params:
            data = param.new_zeros((capacity, *param.shape[1:]))
            data[:old].copy_(param.detach())
            datas.append(data)
            grad = None
            if param.grad is not None:
                grad = param.grad.new_zeros(data.shape)
                grad[:old].copy_(param.grad)
            grads.append(grad)
        active = self.active.new_zeros(capacity)
        active[:old].copy_(self.active)
        row_start_step = self.row_start_step.new_zeros(capacity)
        row_start_step[:old].copy_(self.row_start_step)

        for param, data, grad in zip(params, datas, grads):
            # Autograd caches the parameter's gradient accumulator, shape included, for as
            # long as any graph holds it, and only drops it when the dtype changes. Passing
            # through an empty tensor of another dtype makes the next graph build a new one.
            param.data = data.new_empty(0, dtype=_other_dtype(data.dtype))
            param.data = data
            if grad is not None:
                param.grad = grad
        self.active = active
        self.row_start_step = row_start_step
        optim.track(self)
        if optimizer is not None:
            self.resize_optimizer_state(optimizer)
        else:
            for param in params:
                _resized_without_optimizer[id(param)] = param

    def _reset_optimizer_rows(self, optimizer: torch.optim.Optimizer, rows) -> None:
        with torch.no_grad():
            for param in self._params():
                for value in optim.param_state(optimizer, param).values():
                    if _is_row_state(value, param) and value.shape[0] == param.shape[0]:
                        distributed.zero_rows_(value, rows)

    def _row_index(self, rows: Rows, method: str) -> Tensor:
        """Validated row indices as a long tensor on the mask's device."""
        if isinstance(rows, Tensor):
            if rows.dtype == torch.bool or rows.is_floating_point() or rows.is_complex():
                raise TypeError(f"{method}: rows must be integer indices, got a {rows.dtype} tensor")
            if rows.dim() > 1:
                raise ValueError(f"{method}: rows must be 0-D or 1-D, got shape {tuple(rows.shape)}")
            index = rows.reshape(-1).to(device="cpu", dtype=torch.long)
        else:
            items = [rows] if not isinstance(rows, Iterable) else list(rows)
            try:
                index = torch.tensor([operator.index(r) for r in items], dtype=torch.long)
            except TypeError:
                raise TypeError(f"{method}: rows must be integer indices, got {rows!r}") from None
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.out_features):
            bad = index[(index < 0) | (index >= self.out_features)][0].item()
            raise IndexError(
                f"{method}: row {bad} is out of range; rows must be in [0, out_features="
                f"{self.out_features})"
            )
        return index.to(self.active.device)


def _forward_with_dynamic_width(layer: GrowLinear, input: Tensor) -> Tensor:
    """``layer.forward`` as ``torch.compile`` should trace it without ``static_shape``.

    Dynamo treats int attributes of modules as constants, so every grow would compile a new
    graph until ``recompile_limit`` (8) graphs exist, after which the model silently runs
    eagerly. Tracing ``out_features`` as an ordinary int instead lets automatic dynamic
    shapes apply: one recompile at the first grow, with a symbolic width, then none. The
    config patch is scoped to this call; torch without it keeps the constant behaviour.
    """
    patch = getattr(torch._dynamo, "patch_dynamo_config", None)  # imported: we are compiling
    if patch is None:
        return layer._masked_linear(input, layer.out_features)
    with patch(allow_unspec_int_on_nn_module=True):
        return layer._masked_linear(input, layer.out_features)


def _linear_init_(
    weight: Tensor, bias: Tensor | None, fan_in: int, generator: torch.Generator | None = None
) -> None:
    """``nn.Linear.reset_parameters`` for any number of rows."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
    if bias is not None:
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        nn.init.uniform_(bias, -bound, bound, generator=generator)


def _row_seed(layer_seed: int, first_row: int) -> int:
    """A seed for the rows grown from ``first_row``: SplitMix64 of the pair.

    Mixing (rather than adding) keeps the streams of neighbouring layers and grows apart.
    """
    z = (layer_seed + (first_row + 1) * 0x9E3779B97F4A7C15) & _UINT64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _UINT64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _UINT64
    return z ^ (z >> 31)


def _rows_like(value: Tensor, shape: tuple, like: Tensor, what: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"grow: {what} must be a tensor, got {type(value).__name__}")
    if value.shape != shape and value.shape != shape[1:]:
        raise ValueError(f"grow: {what} must have shape {shape} or {shape[1:]}, got {tuple(value.shape)}")
    return value.detach().to(device=like.device, dtype=like.dtype).expand(shape).clone()


def _check_optimizer_holds(optimizer, layer: GrowLinear) -> None:
    if optimizer is None:
        return
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if not any(id(p) in held for p in layer._params()):
        raise ValueError("the optimizer given does not hold this GrowLinear's parameters")


def _checked_int(value: Any, what: str, minimum: int) -> int:
    """``value`` as an int ``>= minimum``; ``what`` names it in the error."""
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an int >= {minimum}, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an int >= {minimum}, got {value!r}") from None
    if value < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {value}")
    return value


def _other_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype != torch.float64 else torch.float32
