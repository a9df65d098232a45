"""Fully sharded data parallel training (FSDP2) for the training modules.

Every module here trains with manual optimization, calling ``manual_backward`` inside ``training_step`` (GAN
training needs that). Lightning's ``FSDPStrategy`` (FSDP1) runs ``training_step`` inside the forward of the wrapped
root module, where a backward pass is not allowed (Lightning issue #19685), so FSDP goes through Lightning's
``ModelParallelStrategy`` and PyTorch's ``fully_shard`` (FSDP2) instead, which hooks individual submodules:

- the transformer blocks of every trainable network are sharded over the data-parallel ranks (they hold nearly all
  the parameters, gradients and optimizer state);
- the remaining small layers of those networks (embeddings, latent tokens, convolution stems, heads) and the
  discriminator stay replicated, and their gradients are averaged over the ranks before each optimizer step;
- frozen helpers (teacher, perceptual and text networks) stay replicated: they have no gradients or optimizer state.

Sharded parameters are ``DTensor``s; :mod:`titok_lightning.tensors` converts between their local shard and the full
tensor (for the EMA callback and for checkpoints, which hold full tensors, loadable without a process group).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.torch_version import TorchVersion

from titok_lightning.models.blocks import Block
from titok_lightning.models.maskgit import PostNormBlock
from titok_lightning.models.mmdit import JointTransformerBlock
from titok_lightning.models.rar import RARBlock
from titok_lightning.tensors import is_sharded

# the transformer blocks of every family: the units fully_shard gathers one at a time
SHARDED_BLOCK_TYPES: tuple[type[nn.Module], ...] = (Block, PostNormBlock, RARBlock, JointTransformerBlock)


FSDP2_MIN_TORCH = "2.7"


def fsdp2_available() -> bool:
    """Whether this torch has what ``trainer=fsdp`` uses: public ``fully_shard`` / ``FSDPModule`` and FSDP2 streams
    on any device (2.6), ``distribute_tensor(src_data_rank=None)`` for the EMA's shards on resume (2.7)."""
    return TorchVersion(str(torch.__version__)) >= FSDP2_MIN_TORCH


class FullyShardedStrategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` as plain FSDP: every process is one data-parallel rank (no tensor parallelism), and
    checkpoints are single files with full tensors, as with DDP (the EMA callback writes full tensors too, so
    per-rank distributed checkpoints are not offered). The LightningModule shards itself in ``configure_model``
    (see ``TrainingModule.configure_model``). ``kwargs``: ``process_group_backend``, ``timeout``."""

    def __init__(self, **kwargs) -> None:
        if not fsdp2_available():
            raise RuntimeError(
                f"trainer=fsdp needs torch >= {FSDP2_MIN_TORCH} (FSDP2), this is torch {torch.__version__}"
            )
        super().__init__(save_distributed_checkpoint=False, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()


def shard_blocks(module: nn.Module, mesh, block_types: tuple[type[nn.Module], ...] = SHARDED_BLOCK_TYPES) -> int:
    """``fully_shard`` every block of ``module`` (in place) over ``mesh``; returns how many were sharded."""
    from torch.distributed.fsdp import fully_shard

    blocks = [child for child in module.modules() if isinstance(child, block_types)]
    for block in blocks:
        # each block is its own FSDP root, which keeps its gathered parameters after a forward (until its backward or
        # release_gathered_parameters): an evaluation forward then needs no collective, so ranks with uneven numbers
        # of held-out batches (every held-out image once) do not wait on each other
        fully_shard(block, mesh=mesh)
    return len(blocks)


def release_gathered_parameters(module: nn.Module) -> None:
    """Reshard every FSDP block of ``module``. A block that keeps its gathered parameters after a forward without a
    backward (an evaluation) would run its next forward on those, not on its shards as they are now (after the EMA
    callback swapped weights in or out)."""
    from torch.distributed.fsdp import FSDPModule

    for child in module.modules():
        if isinstance(child, FSDPModule):
            child.reshard()


def set_gradient_sync(module: nn.Module, sync: bool) -> None:
    """Whether the sharded blocks of ``module`` reduce-scatter their gradients in this backward pass (off while
    accumulating: they keep full-size gradients until the last micro-batch, as DDP's ``no_sync``)."""
    from torch.distributed.fsdp import FSDPModule

    for child in module.modules():
        if isinstance(child, FSDPModule):
            child.set_requires_gradient_sync(sync, recurse=False)


@torch.no_grad()
def sync_and_clip_gradients(params: list[nn.Parameter], max_norm: float, group, device: torch.device) -> torch.Tensor:
    """Average the replicated parameters' gradients over ``group``, then clip all gradients to ``max_norm`` by
    their global norm (sharded gradients counted once over the ranks); returns that norm, equal on every rank."""
    replicated = [p.grad for p in params if p.grad is not None and not is_sharded(p.grad)]
    sharded = [p.grad.to_local() for p in params if p.grad is not None and is_sharded(p.grad)]
    world_size = dist.get_world_size(group)
    zero = torch.zeros((), device=device)
    if replicated and world_size > 1:
        flat = torch._utils._flatten_dense_tensors(replicated)
        dist.all_reduce(flat, group=group)
        flat /= world_size
        torch._foreach_copy_(replicated, torch._utils._unflatten_dense_tensors(flat, replicated))
    sharded_sq = torch.stack(torch._foreach_norm(sharded)).float().square().sum() if sharded else zero.clone()
    if world_size > 1:
        dist.all_reduce(sharded_sq, group=group)
    replicated_sq = torch.stack(torch._foreach_norm(replicated)).float().square().sum() if replicated else zero
    norm = (sharded_sq + replicated_sq).sqrt()
    if max_norm != float("inf") and (replicated or sharded):
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(replicated + sharded, scale)
    return norm
