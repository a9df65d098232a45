"""Token-prediction losses of the generators: masked (MaskGIT, MaskGen-VQ) and autoregressive (RAR).

Both return ``(loss, {"loss", "correct_tokens"})``; ``correct_tokens`` is the per-sample fraction of
argmax hits (on masked tokens for MLM) averaged over the batch, detached.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLMLoss(nn.Module):
    """Masked-token cross-entropy with label smoothing.

    ``forward(logits [B, N, V], targets [B, N] int64, weights [B, N] bool)``: ``weights`` marks the
    masked tokens (weight 1); the other tokens are weighted ``loss_weight_unmasked_token``; the loss
    is the weighted mean.
    """

    def __init__(self, label_smoothing: float = 0.1, loss_weight_unmasked_token: float = 0.1):
        super().__init__()
        self.label_smoothing = label_smoothing
        self.loss_weight_unmasked_token = loss_weight_unmasked_token

    @classmethod
    def from_reference_config(cls, config: Mapping[str, Any]) -> MLMLoss:
        losses = config["losses"]
        return cls(losses["label_smoothing"], losses["loss_weight_unmasked_token"])

    def forward(
        self, logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if logits.shape[:2] != targets.shape or weights.shape != targets.shape:
            raise ValueError(
                f"expected logits [B, N, V] with targets / weights [B, N], got {tuple(logits.shape)}, "
                f"{tuple(targets.shape)}, {tuple(weights.shape)}"
            )
        logits = logits.float()
        per_token = F.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), reduction="none", label_smoothing=self.label_smoothing
        ).view_as(targets)
        masked = weights.to(per_token.dtype)
        token_weights = (1.0 - masked) * self.loss_weight_unmasked_token + masked
        loss = (per_token * token_weights).sum() / (token_weights.sum() + 1e-8)
        hits = (logits.argmax(dim=-1) == targets).to(per_token.dtype) * masked
        correct_tokens = (hits.sum(dim=1) / (masked.sum(dim=1) + 1e-8)).mean()
        return loss, {"loss": loss.detach(), "correct_tokens": correct_tokens.detach()}


class ARLoss(nn.Module):
    """Next-token cross-entropy of RAR.

    ``forward(logits [B, N+1, V], labels [B, N] int64)``: ``logits`` as returned by RAR's
    ``forward_fn`` (the last position predicts past the end and is dropped).
    """

    @classmethod
    def from_reference_config(cls, config: Mapping[str, Any]) -> ARLoss:
        return cls()

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if logits.dim() != 3 or labels.shape != (logits.shape[0], logits.shape[1] - 1):
            raise ValueError(
                f"expected logits [B, N+1, V] and labels [B, N], got {tuple(logits.shape)}, {tuple(labels.shape)}"
            )
        logits = logits[:, :-1].float()
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        correct_tokens = (logits.argmax(dim=-1) == labels).float().mean(dim=1).mean()
        return loss, {"loss": loss.detach(), "correct_tokens": correct_tokens.detach()}
