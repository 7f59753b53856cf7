"""``GrowEmbedding``: a drop-in ``nn.Embedding`` whose vocabulary can be added while it trains."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from torch.nn.parameter import Parameter
from torch.nn.utils import skip_init

from growop.rows import GrowRows, checked_int, resolved_capacity


class EmbeddingArgumentError(ValueError, AssertionError):
    """A constructor argument that ``nn.Embedding`` refuses with an ``AssertionError`` (a
    ``padding_idx`` out of range, a ``_weight`` of another shape): a ``ValueError`` and an
    ``AssertionError`` both, so ``except`` clauses written for either still catch it."""


class NegativeSizeError(ValueError, RuntimeError):
    """A negative ``num_embeddings`` or ``embedding_dim``, which ``nn.Embedding`` refuses with
    a ``RuntimeError`` (a tensor of negative dimension): both, as :class:`EmbeddingArgumentError`."""


# The id dtypes F.embedding takes; any other reaches it unchecked, for nn.Embedding's own error.
_ID_DTYPES = (torch.int64, torch.int32)

_SPARSE_UNSUPPORTED = (
    "GrowEmbedding does not support sparse=True: its gradient would be a sparse "
    "(capacity, embedding_dim) tensor that growop's optimizer handling does not cover. Use a "
    "dense gradient (sparse=False)."
)


class GrowEmbedding(GrowRows, nn.Embedding):
    r"""``nn.Embedding`` with over-provisioned rows, so tokens can be added in place.

    ``capacity`` rows of weight are allocated once; the bool buffer ``active`` says which
    are live. :meth:`grow` makes the next rows live: within capacity it allocates no new
    storage, and the Parameter, its ``data_ptr()``, the optimizer's state and DDP's buckets
    stay valid. Rows, their mask, growing, reallocation and checkpoints are
    :mod:`growop.rows`'; this class adds the lookup.

    A lookup never reads a row that is not live: an id ``>= num_embeddings``, negative, or
    of a deactivated row raises ``IndexError`` on the CPU, as ``nn.Embedding`` does for an
    id out of range (on CUDA and under ``torch.compile`` it is a device-side assertion, as
    for ``nn.Embedding``, so the lookup never waits for the device).

    An output head can share this layer's rows: ``growop.tie(embedding, head)`` makes a
    :class:`GrowLinear`'s weight this layer's Parameter (a tied language-model head) and
    ``growop.grow_together(embedding, head)`` gives an untied head the same mask; either
    way one ``grow`` on any of them grows both.

    Args:
        num_embeddings: tokens in use at the start (all live).
        embedding_dim: size of each embedding vector.
        padding_idx: as ``nn.Embedding``: that row starts at zero and gets no gradient.
            Must be ``< num_embeddings`` (negative counts from ``num_embeddings``).
        max_norm, norm_type, scale_grad_by_freq: as ``nn.Embedding``; ``max_norm``
            renormalises only the rows looked up, which are live.
        sparse: must be ``False``: sparse gradients are not supported (raises).
        _weight, _freeze: as ``nn.Embedding``: the ``(num_embeddings, embedding_dim)`` rows
            to start from (the rows past them zero until grown), and whether the weight is
            frozen.
        device, dtype: as ``nn.Embedding``.
        capacity: rows allocated; default :func:`growop.default_capacity` (25% headroom, at
            least 8 rows). Must be ``>= num_embeddings``. Keyword only.

    Attributes:
        weight: ``(capacity, embedding_dim)`` Parameter.
        active: bool buffer ``(capacity,)``; rows ``>= num_embeddings`` are never live.
        num_embeddings: token slots in use; grows with :meth:`grow` (read-only). Ids below
            it are valid unless deactivated.
        capacity: rows allocated.
        live_count: live rows, ``int(active.sum())``, kept on the host.
        rows: a read-only view of the rows (``used``, ``live``, ``capacity``, ``params``),
            shared with the layers this one grows together with.

    Shape:
        - Input: ``(*)``, integer ids.
        - Output: ``(*, embedding_dim)``.
    """

    _used_name = "num_embeddings"

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
        _weight: Tensor | None = None,
        _freeze: bool = False,
        device=None,
        dtype=None,
        *,
        capacity: int | None = None,
    ) -> None:
        if sparse:
            raise ValueError(_SPARSE_UNSUPPORTED)
        if _weight is not None:
            device = _weight.device if device is None else device
            dtype = _weight.dtype if dtype is None else dtype
        factory_kwargs = {"device": device, "dtype": dtype}
        nn.Module.__init__(self)  # not nn.Embedding.__init__: it allocates num_embeddings rows
        num_embeddings = _size(num_embeddings, "num_embeddings")
        embedding_dim = _size(embedding_dim, "embedding_dim")
        capacity = resolved_capacity(capacity, num_embeddings, "GrowEmbedding", "num_embeddings")
        if padding_idx is not None:
            try:
                padding_idx = checked_int(padding_idx, "GrowEmbedding: padding_idx", -num_embeddings)
            except ValueError as error:
                raise EmbeddingArgumentError(str(error)) from None
            if padding_idx < 0:
                padding_idx += num_embeddings
            if padding_idx >= num_embeddings:
                raise EmbeddingArgumentError(
                    f"GrowEmbedding: padding_idx ({padding_idx}) must be < num_embeddings "
                    f"({num_embeddings})"
                )
        if _weight is not None and tuple(_weight.shape) != (num_embeddings, embedding_dim):
            raise EmbeddingArgumentError(
                f"GrowEmbedding: _weight has shape {tuple(_weight.shape)}, expected "
                f"(num_embeddings, embedding_dim) = ({num_embeddings}, {embedding_dim})"
            )
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.max_norm = max_norm
        self.norm_type = norm_type
        self.scale_grad_by_freq = scale_grad_by_freq
        self.sparse = False
        self.weight = Parameter(torch.empty((capacity, embedding_dim), **factory_kwargs),
                                requires_grad=not _freeze)
        self._init_rows(num_embeddings, capacity, device)
        if _weight is None:
            self.reset_parameters()
        else:  # as nn.Embedding: the given rows as they are; the rows past them zero
            self._reset_rows()
            with torch.no_grad():
                self.weight[:num_embeddings].copy_(_weight)
                self.weight[num_embeddings:].zero_()

    @property
    def num_embeddings(self) -> int:
        """Token slots in use; grows with :meth:`grow`."""
        return self._rows.used

    @num_embeddings.setter
    def num_embeddings(self, value: int) -> None:
        self._assign_used(value)

    def reset_parameters(self) -> None:
        """Leaves the layer as its constructor would: every row drawn as ``nn.Embedding``
        draws it (``N(0, 1)``, the padding row zero), every slot in use live, and a new seed
        for ``grow(init="default")`` rows."""
        nn.init.normal_(self.weight)
        self._fill_padding_idx_with_zero()
        self._reset_rows()

    def forward(self, input: Tensor) -> Tensor:
        if self.sparse:
            raise RuntimeError(_SPARSE_UNSUPPORTED)
        active = self._buffers.get("active")  # the tensor itself, also under torch.fx
        live_count = None
        if active is not None and not torch.compiler.is_compiling():
            # Counts follow a mask something else wrote; None for one swapped in for a call.
            live_count = self._rows.live_count_for(self, active)
        input = self._check_ids(input, live_count)
        return F.embedding(
            input,
            self.weight,
            self.padding_idx,
            self.max_norm,
            self.norm_type,
            self.scale_grad_by_freq,
            False,
        )

    def extra_repr(self) -> str:
        text = f"{self.num_embeddings}, {self.embedding_dim}, capacity={self.capacity}"
        if self.padding_idx is not None:
            text += f", padding_idx={self.padding_idx}"
        if self.max_norm is not None:
            text += f", max_norm={self.max_norm}"
        if self.norm_type != 2:
            text += f", norm_type={self.norm_type}"
        if self.scale_grad_by_freq:
            text += ", scale_grad_by_freq=True"
        return text

    # ------------------------------------------------------------------ conversion

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, capacity: int | None = None) -> GrowEmbedding:
        """A ``GrowEmbedding`` with ``embedding``'s rows, all live, on its device and dtype.

        Rows past them are zero until grown (``grow`` writes each new row's values).
        """
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"from_embedding expects an nn.Embedding, got {type(embedding).__name__}")
        if embedding.sparse:
            raise ValueError(
                "from_embedding: the embedding has sparse=True, which GrowEmbedding does not "
                "support (see GrowEmbedding); set embedding.sparse = False first"
            )
        weight = embedding.weight
        rows = embedding.num_embeddings
        # Built without drawing rows (a vocabulary-sized weight takes seconds to draw): the
        # live rows are copied and the rest zeroed, each written once.
        layer = skip_init(
            cls,
            rows,
            embedding.embedding_dim,
            embedding.padding_idx,
            capacity=capacity,
            device=weight.device,
            dtype=weight.dtype,
        )
        layer.max_norm = embedding.max_norm
        layer.norm_type = embedding.norm_type
        layer.scale_grad_by_freq = embedding.scale_grad_by_freq
        with torch.no_grad():
            layer.weight[:rows].copy_(weight)
            layer.weight[rows:].zero_()
        layer.weight.requires_grad_(weight.requires_grad)
        return layer

    @classmethod
    def from_pretrained(
        cls,
        embeddings: Tensor,
        freeze: bool = True,
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
        *,
        capacity: int | None = None,
    ) -> GrowEmbedding:
        """``nn.Embedding.from_pretrained`` with a ``capacity``: ``embeddings`` are the live rows."""
        plain = nn.Embedding.from_pretrained(
            embeddings, freeze, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse
        )
        return cls.from_embedding(plain, capacity)

    def to_embedding(self) -> nn.Embedding:
        """A plain ``nn.Embedding`` of the ``num_embeddings`` rows in use, for export.

        Deactivated rows are copied as they are: a plain embedding cannot refuse to look
        them up.
        """
        weight = self.weight.detach()
        embedding = nn.Embedding(
            self.num_embeddings,
            self.embedding_dim,
            self.padding_idx,
            self.max_norm,
            self.norm_type,
            self.scale_grad_by_freq,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            embedding.weight.copy_(weight[: self.num_embeddings])
        embedding.weight.requires_grad_(self.weight.requires_grad)
        return embedding

    # ------------------------------------------------------------------ rows

    def _row_params(self) -> dict[str, Tensor | None]:
        return {"weight": self.weight}

    def _draw_rows(self, rows: dict[str, Tensor], generator: torch.Generator | None) -> None:
        nn.init.normal_(rows["weight"], generator=generator)

    # ------------------------------------------------------------------ internals

    def _check_ids(self, input: Tensor, live_count: int | None) -> Tensor:
        """Raises unless every id is live, before any row is read; returns the ids.

        ``live_count`` is the layer's live count where it describes the mask, else None.
        Ids F.embedding does not take (not a tensor, a dtype other than int64 and int32)
        reach it unchecked, so the error is ``nn.Embedding``'s own. Under ``torch.func.vmap``
        (a vmap over ids, ``vmap(grad)``, ``stack_module_state`` ensembles) no value is read
        on the host, since the ids or the mask are batched: an id that is not live becomes
        one far out of range, which the lookup refuses as ``nn.Embedding`` refuses an id
        out of range (``IndexError`` on the CPU, a device-side assertion on CUDA).
        """
        fx_tracing = is_fx_symbolic_tracing()
        if not fx_tracing and (not isinstance(input, Tensor) or input.dtype not in _ID_DTYPES):
            return input
        recorded = torch.jit.is_tracing() or fx_tracing or torch.compiler.is_exporting()
        compiling = torch.compiler.is_compiling()
        batched = not (recorded or compiling) and _inside_vmap()
        if not (recorded or compiling):  # host counts, read only where nothing guards on them
            used = self._rows.used
            all_live = live_count == used
        if recorded or compiling or batched or input.device.type != "cpu":
            # No host synchronisation: a device-side assertion, as nn.Embedding's.
            capacity = self.weight.shape[0]
            if recorded or compiling:
                # The mask alone decides (rows past the slots in use are never live), with
                # no host count: a graph traced or exported runs later, on the mask as it
                # is then, and a compiled one has nothing to guard on, so grows never
                # recompile it.
                ok = (input >= 0) & (input < capacity) & self.active[input.clamp(0, capacity - 1)]
            else:
                ok = (input >= 0) & (input < used)
                if not all_live:
                    ok = ok & self.active[input.clamp(0, capacity - 1)]  # not in place: the mask may be batched
            if batched or torch.jit.is_tracing():
                # vmap has no batching rule for the assertion, and torch.jit.trace drops
                # ops whose results go unused, the assertion among them: an id that fails
                # the check becomes one the lookup refuses. Far below zero, not -1: with a
                # batched weight (an ensemble) vmap looks up ids offset by member * rows,
                # which would turn -1 into a row of the previous member.
                return torch.where(ok, input, torch.iinfo(input.dtype).min // 2)
            torch._assert_async(ok.all(), "GrowEmbedding: an id is out of range or not live")
            return input
        if input.numel() == 0:
            return input
        low, high = torch.aminmax(input)
        low, high = int(low), int(high)
        if low < 0 or high >= used:
            bad = low if low < 0 else high
            raise IndexError(
                f"GrowEmbedding: id {bad} is out of range: ids must be in [0, num_embeddings="
                f"{used})"
            )
        if not all_live:
            live = self.active[input]
            if not bool(live.all()):
                bad = int(input[~live].flatten()[0])
                raise IndexError(
                    f"GrowEmbedding: id {bad} is a deactivated row; reactivate({bad}) it "
                    "before looking it up"
                )
        return input


def _size(value, name: str) -> int:
    """A size argument, checked as :func:`checked_int` checks it; a negative one raises
    :class:`NegativeSizeError`, as ``nn.Embedding`` raises ``RuntimeError``."""
    try:
        return checked_int(value, f"GrowEmbedding: {name}", 0)
    except ValueError as error:
        raise NegativeSizeError(str(error)) from None


def _inside_vmap() -> bool:
    """Whether this runs inside ``torch.func.vmap``, where tensors may be batched and no
    value can be read on the host."""
    vmap = torch._C._functorch.TransformType.Vmap
    return any(level.key() == vmap for level in torch._C._functorch.get_interpreter_stack() or ())
