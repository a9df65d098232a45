"""Training losses of the image tokenizers (TiTok, TA-TiTok).

- :class:`Stage1Loss`: TiTok two-stage recipe, stage 1: cross-entropy on the MaskGIT-VQGAN "proxy
  codes" of the image plus the VQ loss.
- :class:`ReconstructionLoss`: pixel-space recipes (TiTok stage 2, single-stage TiTok / TA-TiTok, VQ
  or VAE): l1/l2 + perceptual + hinge GAN with LeCam regularisation + VQ loss or KL.

Both return ``(loss, logs)`` with ``logs`` a dict of detached tensors (never ``.item()``: logging
decides when to synchronise).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from titok_lightning.losses.perceptual import PerceptualLoss
from titok_lightning.models.discriminator import NLayerDiscriminator


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss ``0.5 * (E[relu(1 - D(real))] + E[relu(1 + D(fake))])`` -> scalar."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def lecam_loss(
    real_mean: torch.Tensor, fake_mean: torch.Tensor, ema_real_mean: torch.Tensor, ema_fake_mean: torch.Tensor
) -> torch.Tensor:
    """LeCam regulariser (Tseng et al. 2021) on mean logits and their EMAs -> scalar.

    ``mean(relu(real_mean - ema_fake_mean)^2) + mean(relu(ema_real_mean - fake_mean)^2)``: keeps
    the discriminator's real and fake predictions from drifting apart from each other's history.
    """
    return F.relu(real_mean - ema_fake_mean).pow(2).mean() + F.relu(ema_real_mean - fake_mean).pow(2).mean()


def copy_from_rank0(*buffers: torch.Tensor) -> None:
    """Give every rank rank 0's values of ``buffers`` (no-op in a single process).

    The reference's loss module is wrapped in DDP with ``broadcast_buffers=True``: each of its forward passes starts
    from rank 0's LeCam running means, which every rank then updates with its own logits (never all-reduced). Under
    Lightning's manual optimization DDP copies buffers only before the first step, so the loss does it itself.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for buffer in buffers:
            dist.broadcast(buffer, src=0)


def _detached_logs(**terms: torch.Tensor) -> dict[str, torch.Tensor]:
    return {name: value.detach() for name, value in terms.items()}


class Stage1Loss(nn.Module):
    """Proxy-code classification loss of TiTok stage 1.

    ``forward(target_codes, logits, quantizer_result)``: ``logits`` [B, K, h, w] over the K teacher
    (MaskGIT-VQGAN) codes, ``target_codes`` the teacher's codes [B, h*w] or [B, h, w] (int64),
    ``quantizer_result`` the VQ result dict (``quantizer_loss``, ``commitment_loss``,
    ``codebook_loss`` scalars). Returns ``(mean cross-entropy + quantizer_weight * quantizer_loss, logs)``.
    """

    def __init__(self, quantizer_weight: float = 1.0):
        super().__init__()
        self.quantizer_weight = quantizer_weight

    @classmethod
    def from_reference_config(cls, config: Mapping[str, Any]) -> Stage1Loss:
        return cls(quantizer_weight=config["losses"]["quantizer_weight"])

    def forward(
        self, target_codes: torch.Tensor, logits: torch.Tensor, quantizer_result: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        batch_size, num_codes = logits.shape[:2]
        logits = logits.reshape(batch_size, num_codes, -1)
        if target_codes.numel() != batch_size * logits.shape[2]:
            raise ValueError(
                f"target codes {tuple(target_codes.shape)} do not match the {logits.shape[2]} logit positions "
                f"of logits {(batch_size, num_codes, logits.shape[2])}"
            )
        reconstruction_loss = F.cross_entropy(logits.float(), target_codes.reshape(batch_size, -1))
        quantizer_loss = self.quantizer_weight * quantizer_result["quantizer_loss"]
        total_loss = reconstruction_loss + quantizer_loss
        logs = _detached_logs(
            total_loss=total_loss,
            reconstruction_loss=reconstruction_loss,
            quantizer_loss=quantizer_loss,
            commitment_loss=quantizer_result["commitment_loss"],
            codebook_loss=quantizer_result["codebook_loss"],
        )
        return total_loss, logs


class ReconstructionLoss(nn.Module):
    """Pixel reconstruction + perceptual + GAN loss of the TiTok / TA-TiTok pixel-space recipes.

    Owns ``self.discriminator`` (train it with its own optimizer over ``discriminator.parameters()``)
    and ``self.perceptual`` (frozen, eval-only; keep it out of optimizers and EMA). All maths runs in
    fp32 with autocast off, as the reference.

    ``forward(inputs, reconstructions, extra, global_step, mode)``: images [B, 3, H, W] in [0, 1];
    ``extra`` is the quantizer result dict (``quantize_mode="vq"``: ``quantizer_loss``, and optionally
    ``commitment_loss`` / ``codebook_loss``) or the posterior (``"vae"``: anything with ``kl() -> [B, N]``,
    e.g. ``DiagonalGaussianDistribution``).

    - ``mode="generator"``: ``reconstruction_weight * l1|l2 (/ exp(logvar) for VAE)
      + perceptual_weight * perceptual + quantizer_weight * quantizer_loss | kl_weight * sum(kl) / B
      + discriminator_weight * factor * (-mean D(reconstructions))``; the GAN term is active
      (``factor = discriminator_factor``) from ``global_step >= discriminator_start`` and the
      discriminator is not run before. Gradients reach the reconstructions, never the discriminator.
    - ``mode="discriminator"``: ``factor * hinge(D(inputs), D(reconstructions))`` on detached images
      ``+ lecam_regularization_weight * LeCam``; updates the LeCam EMA buffers
      (``ema_real_logits_mean`` / ``ema_fake_logits_mean``, persistent so they resume; under DDP
      each step starts from rank 0's, see :func:`copy_from_rank0`). Before
      ``discriminator_start`` it returns a zero loss without running the discriminator: callers
      should skip the discriminator step then (:meth:`should_train_discriminator`).

    ``perceptual_module`` / ``discriminator`` replace the default networks (tests inject stubs or
    tiny ones); ``perceptual_pretrained=False`` builds the perceptual backbones with random weights.
    """

    def __init__(
        self,
        reconstruction_loss: str = "l2",
        reconstruction_weight: float = 1.0,
        perceptual_loss: str | None = "convnext_s",
        perceptual_weight: float = 0.1,
        quantize_mode: str = "vq",
        quantizer_weight: float = 1.0,
        kl_weight: float = 1e-6,
        logvar_init: float = 0.0,
        discriminator_start: int = 20000,
        discriminator_factor: float = 1.0,
        discriminator_weight: float = 0.1,
        lecam_regularization_weight: float = 0.0,
        lecam_ema_decay: float = 0.999,
        discriminator: nn.Module | None = None,
        perceptual_module: nn.Module | None = None,
        perceptual_pretrained: bool = True,
    ):
        super().__init__()
        if reconstruction_loss not in ("l1", "l2"):
            raise ValueError(f"reconstruction_loss must be 'l1' or 'l2', got {reconstruction_loss!r}")
        if quantize_mode not in ("vq", "vae"):
            raise ValueError(f"quantize_mode must be 'vq' or 'vae', got {quantize_mode!r}")
        self.reconstruction_loss = reconstruction_loss
        self.reconstruction_weight = reconstruction_weight
        self.perceptual_weight = perceptual_weight
        self.quantize_mode = quantize_mode
        self.quantizer_weight = quantizer_weight
        self.kl_weight = kl_weight
        self.discriminator_start = discriminator_start
        self.discriminator_factor = discriminator_factor
        self.discriminator_weight = discriminator_weight
        self.lecam_regularization_weight = lecam_regularization_weight
        self.lecam_ema_decay = lecam_ema_decay

        self.discriminator = discriminator if discriminator is not None else NLayerDiscriminator()
        if perceptual_module is None and perceptual_loss is not None and perceptual_weight > 0:
            perceptual_module = PerceptualLoss(perceptual_loss, pretrained=perceptual_pretrained)
        self.perceptual = perceptual_module
        if quantize_mode == "vae":
            # A fixed (not learned) log-variance scaling the reconstruction term, as the reference.
            self.logvar = nn.Parameter(torch.tensor(float(logvar_init)), requires_grad=False)
        if lecam_regularization_weight > 0:
            self.register_buffer("ema_real_logits_mean", torch.zeros(1))
            self.register_buffer("ema_fake_logits_mean", torch.zeros(1))

    @classmethod
    def from_reference_config(cls, config: Mapping[str, Any], **overrides: Any) -> ReconstructionLoss:
        """Build from the reference's nested config (``losses`` section and ``model.vq_model.quantize_mode``)."""
        losses = config["losses"]
        kwargs: dict[str, Any] = dict(
            reconstruction_loss=losses["reconstruction_loss"],
            reconstruction_weight=float(losses["reconstruction_weight"]),
            perceptual_loss=losses["perceptual_loss"],
            perceptual_weight=float(losses["perceptual_weight"]),
            quantize_mode=config.get("model", {}).get("vq_model", {}).get("quantize_mode", "vq"),
            quantizer_weight=float(losses["quantizer_weight"]),
            kl_weight=float(losses.get("kl_weight", 1e-6)),
            logvar_init=float(losses.get("logvar_init", 0.0)),
            discriminator_start=int(losses["discriminator_start"]),
            discriminator_factor=float(losses["discriminator_factor"]),
            discriminator_weight=float(losses["discriminator_weight"]),
            lecam_regularization_weight=float(losses["lecam_regularization_weight"]),
            lecam_ema_decay=float(losses.get("lecam_ema_decay", 0.999)),
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    def should_train_discriminator(self, global_step: int) -> bool:
        return global_step >= self.discriminator_start

    def forward(
        self,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        extra: Any,
        global_step: int,
        mode: str = "generator",
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if inputs.shape != reconstructions.shape:
            raise ValueError(f"inputs {tuple(inputs.shape)} and reconstructions {tuple(reconstructions.shape)} differ")
        with torch.autocast(device_type=inputs.device.type, enabled=False):
            inputs, reconstructions = inputs.float(), reconstructions.float()
            if mode == "generator":
                return self._generator_loss(inputs, reconstructions, extra, global_step)
            if mode == "discriminator":
                return self._discriminator_loss(inputs, reconstructions, global_step)
        raise ValueError(f"mode must be 'generator' or 'discriminator', got {mode!r}")

    def _discriminator_factor(self, global_step: int) -> float:
        return self.discriminator_factor if self.should_train_discriminator(global_step) else 0.0

    def _generator_loss(
        self, inputs: torch.Tensor, reconstructions: torch.Tensor, extra: Any, global_step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.reconstruction_loss == "l1":
            reconstruction_loss = F.l1_loss(inputs, reconstructions)
        else:
            reconstruction_loss = F.mse_loss(inputs, reconstructions)
        reconstruction_loss = reconstruction_loss * self.reconstruction_weight
        if self.quantize_mode == "vae":
            reconstruction_loss = reconstruction_loss / torch.exp(self.logvar)

        zero = inputs.new_zeros(())
        perceptual_loss = zero
        if self.perceptual is not None:
            perceptual_loss = self.perceptual_weight * self.perceptual(inputs, reconstructions).mean()

        factor = self._discriminator_factor(global_step)
        gan_loss = zero
        if factor > 0 and self.discriminator_weight > 0:
            # The discriminator's weights enter as constants: the generator step must not give them gradients.
            frozen = {name: t.detach() for name, t in self.discriminator.state_dict(keep_vars=True).items()}
            gan_loss = -functional_call(self.discriminator, frozen, (reconstructions,)).mean()
        weighted_gan_loss = self.discriminator_weight * factor * gan_loss

        logs: dict[str, torch.Tensor] = {}
        if self.quantize_mode == "vq":
            bottleneck_loss = self.quantizer_weight * extra["quantizer_loss"]
            logs.update(quantizer_loss=bottleneck_loss)
            logs.update({k: extra[k] for k in ("commitment_loss", "codebook_loss") if k in extra})
        else:
            kl = extra.kl()
            bottleneck_loss = self.kl_weight * (kl.sum() / kl.shape[0])
            logs.update(kl_loss=bottleneck_loss)

        total_loss = reconstruction_loss + perceptual_loss + bottleneck_loss + weighted_gan_loss
        logs.update(
            total_loss=total_loss,
            reconstruction_loss=reconstruction_loss,
            perceptual_loss=perceptual_loss,
            weighted_gan_loss=weighted_gan_loss,
            gan_loss=gan_loss,
            discriminator_factor=inputs.new_full((), factor),
            d_weight=inputs.new_full((), self.discriminator_weight),
        )
        return total_loss, _detached_logs(**logs)

    def _discriminator_loss(
        self, inputs: torch.Tensor, reconstructions: torch.Tensor, global_step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        factor = self._discriminator_factor(global_step)
        zero = inputs.new_zeros(())
        if factor == 0:
            return zero, dict(discriminator_loss=zero, logits_real=zero, logits_fake=zero, lecam_loss=zero)

        # One batched pass over real and fake images (GroupNorm is per sample, so this equals two passes).
        logits = self.discriminator(torch.cat([inputs, reconstructions]).detach())
        logits_real, logits_fake = logits.chunk(2)
        discriminator_loss = factor * hinge_d_loss(logits_real, logits_fake)

        lecam = zero
        if self.lecam_regularization_weight > 0:
            copy_from_rank0(self.ema_real_logits_mean, self.ema_fake_logits_mean)
            real_mean, fake_mean = logits_real.mean(), logits_fake.mean()
            lecam = self.lecam_regularization_weight * lecam_loss(
                real_mean, fake_mean, self.ema_real_logits_mean, self.ema_fake_logits_mean
            )
            with torch.no_grad():
                decay = self.lecam_ema_decay
                self.ema_real_logits_mean.mul_(decay).add_(real_mean, alpha=1 - decay)
                self.ema_fake_logits_mean.mul_(decay).add_(fake_mean, alpha=1 - decay)
        discriminator_loss = discriminator_loss + lecam

        logs = _detached_logs(
            discriminator_loss=discriminator_loss,
            logits_real=logits_real.mean(),
            logits_fake=logits_fake.mean(),
            lecam_loss=lecam,
        )
        return discriminator_loss, logs
