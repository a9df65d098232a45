"""Sharded (FSDP2 ``DTensor``) and plain tensors seen alike: this rank's shard, the full tensor, a shard of a full one.

Below both ``lit/`` (which shards the models) and ``callbacks/`` (the EMA averages local shards and checkpoints full
tensors), so neither imports the other for them.
"""

from __future__ import annotations

import torch


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5 keeps it private (nothing is sharded there: trainer=fsdp needs torch >= 2.7)
        from torch.distributed._tensor import DTensor
    return DTensor


def is_sharded(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, _dtensor_type())


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded parameter or gradient (a view: in-place changes reach it); else the tensor."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def full_tensor(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Gather a tensor laid out like ``like``'s shard back to full size (a collective: call on every rank)."""
    if not is_sharded(like):
        return local
    mesh, placements = like.device_mesh, like.placements
    return _dtensor_type().from_local(local, mesh, placements, shape=like.shape, stride=like.stride()).full_tensor()


def shard_of(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's shard of ``full`` laid out like the sharded ``like`` (no communication); else ``full``."""
    if not is_sharded(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    full = full.to(device=like.device)
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()
