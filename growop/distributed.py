"""What ``GrowLinear`` needs to know about ``torch.distributed``: DDP buckets and FSDP2 shards.

Two concerns live here, so that ``modules.py`` stays about the layer itself:

- growing past capacity reallocates the parameters, which data-parallel wrappers cannot
  follow (:func:`reallocation_error`);
- under FSDP2 (``fully_shard``) the parameters and their optimizer state are ``DTensor``
  shards, and writing rows into them needs the DTensor API rather than slicing
  (:func:`write_rows_`, :func:`zero_rows_`, :func:`local`, :func:`full`).
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor


def _dtensor_class() -> type | None:
    # Importing torch.distributed.tensor costs about half a second. A DTensor can only
    # exist once something (FSDP2, user code) has imported it, so look, don't import.
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def is_sharded(tensor: Tensor | None) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (as FSDP2 makes every parameter it manages)."""
    dtensor = _dtensor_class()
    return dtensor is not None and isinstance(tensor, dtensor)


def world_size() -> int:
    """Processes in the default process group; 1 when ``torch.distributed`` is not running."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1
    return torch.distributed.get_world_size()


def reallocation_error(capacity: int, needed: int, params: list[Tensor], allow: bool) -> str | None:
    """Why the parameters may not be reallocated to hold ``needed`` rows, or ``None``.

    DDP builds its gradient buckets, and FSDP2 its shards, from the parameters' storage once,
    at wrap time. Reallocating replaces that storage behind their backs: DDP's buckets then
    no longer match the parameters (gradients stop being averaged correctly or the next
    backward fails), and FSDP2's shards stop being the parameters.
    """
    if any(is_sharded(p) for p in params):
        return (
            f"GrowLinear.grow: {needed} rows do not fit the capacity ({capacity}) and the "
            "parameters are sharded DTensors (FSDP2 fully_shard), whose storage FSDP owns: "
            "they cannot be reallocated in place. Create the layer with enough capacity "
            f"(GrowLinear(..., capacity={needed}) or more) before sharding it."
        )
    processes = world_size()
    if processes > 1 and not allow:
        return (
            f"GrowLinear.grow: {needed} rows do not fit the capacity ({capacity}), and growing "
            "past capacity reallocates the weight and bias. torch.distributed is running "
            f"{processes} processes: if this model is wrapped in DistributedDataParallel, the "
            "reallocation would invalidate DDP's gradient buckets, which were built for the "
            "old parameters. Nothing has been changed. Create the layer with enough capacity "
            f"(GrowLinear(..., capacity={needed}) or more) so that grows stay in place; or, if "
            "the model is not wrapped in DDP, or you will wrap it again after growing, pass "
            "allow_reallocation=True to grow()."
        )
    return None


def check_not_flattened(params: list[Tensor]) -> None:
    """Refuses row tensors that are not Parameters the layer owns.

    FSDP1 (``FullyShardedDataParallel``) replaces a wrapped module's parameters with views
    into its flat parameter, freed between forwards; a parametrization (``orthogonal``,
    ``spectral_norm``) makes ``weight`` a tensor computed from another. Writing rows into
    either would be lost or land in storage that is not the parameter. FSDP2
    (``fully_shard``) keeps each parameter whole as a DTensor and is supported.
    """
    for param in params:
        if not isinstance(param, torch.nn.Parameter) or getattr(param, "_fsdp_flattened", False):
            raise RuntimeError(
                f"growop: this layer's {tuple(param.shape)} row tensor is not a Parameter it "
                "owns: FSDP1 (FullyShardedDataParallel) has flattened it, or a "
                "parametrization (orthogonal, spectral_norm) computes it from another tensor. "
                "Rows cannot be grown, masked or unmasked in place. Grow before wrapping or "
                "parametrizing (or remove the parametrization, grow, and apply it again); for "
                "sharding use FSDP2 (torch.distributed.fsdp.fully_shard), which growop "
                "supports. Nothing has been changed."
            )


def local(tensor: Tensor) -> Tensor:
    """This process's part of ``tensor`` (the tensor itself unless it is a DTensor)."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def full(tensor: Tensor) -> Tensor:
    """The whole of ``tensor``; for a DTensor, gathered from every process (a collective)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def _replicated_like(value: Tensor, like: Tensor) -> Tensor:
    """``value``, the same on every process, as a replicated DTensor on ``like``'s mesh."""
    from torch.distributed.tensor import DTensor, Replicate

    mesh = like.device_mesh
    placements = [Replicate()] * mesh.ndim
    return DTensor.from_local(value, mesh, placements, run_check=False)


def _row_mask(rows, count: int, ndim: int, device: torch.device) -> Tensor:
    mask = torch.zeros(count, dtype=torch.bool, device=device)
    mask[rows] = True
    return mask.view(count, *([1] * (ndim - 1)))


def write_rows_(tensor: Tensor, start: int, values: Tensor) -> None:
    """``tensor[start:start + len(values)] = values`` in place, for a DTensor too.

    Slicing a DTensor gives a new tensor, so a sliced write would be lost; instead the
    rows are blended in with ``where`` and copied back, which keeps every shard in its own
    storage. ``values`` must be the same on every process.
    """
    stop = start + values.shape[0]
    if not is_sharded(tensor):
        tensor[start:stop].copy_(values)
        return
    part = local(tensor)
    whole = part.new_zeros(tensor.shape)
    whole[start:stop] = values.to(device=part.device, dtype=part.dtype)
    mask = _row_mask(slice(start, stop), tensor.shape[0], tensor.dim(), part.device)
    blended = torch.where(_replicated_like(mask, tensor), _replicated_like(whole, tensor), tensor)
    tensor.copy_(blended)


def zero_rows_(tensor: Tensor, rows) -> None:
    """``tensor[rows] = 0`` in place (``rows`` a slice or index tensor), for a DTensor too."""
    if not is_sharded(tensor):
        tensor[rows] = 0
        return
    mask = _row_mask(rows, tensor.shape[0], tensor.dim(), local(tensor).device)
    tensor.masked_fill_(_replicated_like(mask, tensor), 0)
