"""AdamW with the reference's weight-decay groups, and its learning-rate schedule per optimizer.

Used by every LightningModule of the project (tokenizers and generators): one optimizer per role
(``"model"``, ``"discriminator"``), each with its own schedule counted in optimizer steps, so that
gradient accumulation does not stretch warm-up or decay.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn as nn

from titok_lightning.schedules import build_lr_scheduler
from titok_lightning.tensors import is_sharded

# Substrings of parameter names that the reference keeps out of weight decay (besides every 1-D parameter):
# LayerNorm gains ("ln", "norm", "gamma"), biases, embeddings and the learned latent / mask tokens.
NO_DECAY_NAME_PARTS = ("ln", "bias", "latent_tokens", "mask_token", "embedding", "norm", "gamma", "embed")


def uses_weight_decay(name: str, param: torch.Tensor) -> bool:
    """True when the reference applies weight decay to parameter ``name``."""
    return param.ndim >= 2 and not any(part in name for part in NO_DECAY_NAME_PARTS)


def adamw_param_groups(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    weight_decay: float,
    reference_name: Callable[[str], str] | None = None,
) -> list[dict]:
    """Two AdamW groups over the trainable parameters: ``[no decay, decay]`` (reference order).

    The reference's rule is a rule on its own parameter names: ``reference_name`` maps ours to them where they
    differ (a model's ``reference_parameter_name``). Frozen parameters (``requires_grad=False``) are left out; a
    parameter shared under two names is counted once.
    """
    seen: set[int] = set()
    no_decay, decay = [], []
    for name, param in named_parameters:
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        name = reference_name(name) if reference_name is not None else name
        (decay if uses_weight_decay(name, param) else no_decay).append(param)
    if not no_decay and not decay:
        raise ValueError("no trainable parameters for the optimizer (everything has requires_grad=False)")
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


# Trainer precisions whose GradScaler unscales gradients between backward and step (clipping happens in between).
GRAD_SCALER_PRECISIONS = ("16-mixed", "16")


def fused_adamw_applies(params: Iterable[torch.Tensor], precision: str | int | None) -> bool:
    """Whether the fused (single-kernel) AdamW is used: every parameter on CUDA, the trainer's ``precision`` known.

    Under a GradScaler (16-mixed) too, for unsharded parameters: ``TrainingModule.on_before_optimizer_step``
    unscales before clipping (Lightning leaves that to a fused optimizer's ``step``), and the scaler then hands
    the kernel its found-inf flag, so an overflow skips the step on the device without a host sync. Sharded
    (FSDP) parameters keep the multi-tensor path there. ``None`` (unknown precision) keeps the multi-tensor path.
    """
    if precision is None:
        return False
    params = list(params)
    if str(precision) in GRAD_SCALER_PRECISIONS and any(is_sharded(p) for p in params):
        return False
    return bool(params) and all(p.is_cuda for p in params)


def build_adamw(
    module: nn.Module,
    lr: float,
    betas: Sequence[float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    eps: float = 1e-8,
    precision: str | int | None = None,
) -> torch.optim.AdamW:
    """AdamW over ``module``'s trainable parameters with :func:`adamw_param_groups`.

    Fused when :func:`fused_adamw_applies` for the trainer's ``precision``; otherwise the default
    (multi-tensor on CUDA, per-parameter on CPU).
    """
    if len(betas) != 2:
        raise ValueError(f"betas must have two values, got {list(betas)}")
    reference_name = getattr(module, "reference_parameter_name", None)
    groups = split_sharded_groups(adamw_param_groups(module.named_parameters(), weight_decay, reference_name))
    fused = fused_adamw_applies((p for group in groups for p in group["params"]), precision)
    return torch.optim.AdamW(groups, lr=lr, betas=(float(betas[0]), float(betas[1])), eps=eps, fused=fused)


def split_sharded_groups(groups: list[dict]) -> list[dict]:
    """Under FSDP put the sharded (DTensor) and the replicated parameters of each group in separate groups with the
    same settings: the multi-tensor and fused AdamW kernels take one kind per call."""
    split = []
    for group in groups:
        sharded = [p for p in group["params"] if is_sharded(p)]
        replicated = [p for p in group["params"] if not is_sharded(p)]
        split += [{**group, "params": params} for params in (replicated, sharded) if params]
    return split


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    total_steps: int,
    name: str = "cosine",
    warmup_steps: int = 0,
    end_lr: float = 0.0,
    base_lr: float | None = None,
    start_step: int = 0,
    processes: int = 1,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up + cosine/constant schedule stepped once per optimizer step (see ``titok_lightning.schedules``),
    for an optimizer that steps from ``start_step`` (a discriminator) to ``total_steps``.

    ``base_lr`` is the rate whose multipliers are applied (defaults to the optimizer's lr); the
    reference runs the discriminator's schedule with the generator's ``base_lr`` / ``end_lr``.
    The schedule is counted as the reference's run on as many ``processes`` counts it: warm-up and length times the
    number of processes, less the (unscaled) start, advanced once per process at each step. For a schedule from
    step 0 the processes cancel; a discriminator's ends where the reference's on that many processes does.
    """
    if total_steps < 1:
        raise ValueError(
            f"the lr schedule needs the number of optimizer steps (got total_steps={total_steps}); "
            "set trainer.max_steps"
        )
    return build_lr_scheduler(
        optimizer,
        name=name,
        warmup_steps=warmup_steps * processes,
        total_steps=max(1, total_steps * processes - start_step),
        base_lr=base_lr,
        end_lr=end_lr,
        steps_per_call=processes,
    )
