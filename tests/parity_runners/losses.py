"""Parity runners for the discriminator, the training losses and the learning-rate schedule.

One ``run_<entry>(fixture)`` per fixture entry, each built only from the fixture's config, state
dict and inputs; ``RUNNERS`` at the bottom lists them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from tests.parity_runners import Fixture
from titok_lightning.convert import load_reference_state_dict
from titok_lightning.losses import ARLoss, MLMLoss, ReconstructionLoss, Stage1Loss, hinge_d_loss, lecam_loss
from titok_lightning.models.discriminator import NLayerDiscriminator
from titok_lightning.models.quantizers import DiagonalGaussianDistribution
from titok_lightning.schedules import build_lr_scheduler

# ----------------------------------------------------------------------------------------------------------
# GAN: discriminator, hinge loss, LeCam
# ----------------------------------------------------------------------------------------------------------


def run_discriminator(fixture: Fixture) -> dict[str, torch.Tensor]:
    model = load_reference_state_dict(NLayerDiscriminator(**fixture.config), fixture.state_dict).eval()
    return {"logits": model(fixture.inputs["images"])}


def run_loss_hinge_d(fixture: Fixture) -> dict[str, torch.Tensor]:
    return {"d_loss": hinge_d_loss(fixture.inputs["logits_real"], fixture.inputs["logits_fake"])}


def run_loss_lecam(fixture: Fixture) -> dict[str, torch.Tensor]:
    x = fixture.inputs
    real, fake = x["logits_real_mean"], x["logits_fake_mean"]
    ema_real, ema_fake = x["ema_logits_real_mean"], x["ema_logits_fake_mean"]
    return {
        "lecam_loss": lecam_loss(real, fake, ema_real, ema_fake),
        "lecam_loss_swapped": lecam_loss(fake, real, ema_fake, ema_real),
    }


# ----------------------------------------------------------------------------------------------------------
# Tokenizer losses
# ----------------------------------------------------------------------------------------------------------


def run_loss_recon_stage1(fixture: Fixture) -> dict[str, torch.Tensor]:
    x = fixture.inputs
    quantizer_result = {k: x[k] for k in ("quantizer_loss", "commitment_loss", "codebook_loss")}
    total, logs = Stage1Loss.from_reference_config(fixture.config)(
        x["target_codes"], x["reconstructions"], quantizer_result
    )
    return {"total_loss": total, **logs}


class _FixedPerceptual(nn.Module):
    """Stands in for the perceptual network: returns the fixture's per-sample values."""

    def __init__(self, per_sample: torch.Tensor):
        super().__init__()
        self.per_sample = per_sample

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.per_sample


def run_loss_single_stage_vae(fixture: Fixture) -> dict[str, torch.Tensor]:
    x = fixture.inputs
    module = ReconstructionLoss.from_reference_config(
        fixture.config, perceptual_module=_FixedPerceptual(x["perceptual_loss_per_sample"])
    )
    # The fixture saves only the loss module's own state (logvar), not its discriminator.
    incompatible = module.load_state_dict(fixture.state_dict, strict=False)
    assert not incompatible.unexpected_keys, incompatible.unexpected_keys
    posterior = DiagonalGaussianDistribution(x["posterior_parameters"])
    total, logs = module(x["inputs"], x["reconstructions"], posterior, 0, mode="generator")
    return {"total_loss": total, "kl_per_token": posterior.kl(), **logs}


# ----------------------------------------------------------------------------------------------------------
# Generator losses
# ----------------------------------------------------------------------------------------------------------


def run_loss_mlm(fixture: Fixture) -> dict[str, torch.Tensor]:
    x = fixture.inputs
    loss, logs = MLMLoss.from_reference_config(fixture.config)(x["logits"], x["targets"], x["weights"].bool())
    return {"loss": loss, "correct_tokens": logs["correct_tokens"]}


def run_loss_ar(fixture: Fixture) -> dict[str, torch.Tensor]:
    loss, logs = ARLoss.from_reference_config(fixture.config)(fixture.inputs["logits"], fixture.inputs["labels"])
    return {"loss": loss, "correct_tokens": logs["correct_tokens"]}


# ----------------------------------------------------------------------------------------------------------
# Learning-rate schedule
# ----------------------------------------------------------------------------------------------------------


def run_lr_schedule(fixture: Fixture) -> dict[str, torch.Tensor]:
    outputs = {}
    # one output lr_<name> per schedule in the config (the optimizer's entry is not one)
    for name in [k.removeprefix("lr_") for k in fixture.meta["outputs"] if k.startswith("lr_")]:
        args = fixture.config[name]
        optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=args["base_lr"])
        scheduler = build_lr_scheduler(
            optimizer,
            name=args["name"],
            warmup_steps=args["num_warmup_steps"],
            total_steps=args["num_training_steps"],
            base_lr=args["base_lr"],
            end_lr=args["end_lr"],
        )
        rates = []
        for _ in fixture.inputs["steps"].tolist():
            rates.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        # The schedule is plain float64 arithmetic: demand the reference's values bit for bit.
        expected = fixture.meta["exact_values"][name]
        mismatched = [k for k, (a, b) in enumerate(zip(rates, expected)) if a != b]
        assert len(rates) == len(expected) and not mismatched, f"lr_{name} differs in float64 at steps {mismatched}"
        outputs[f"lr_{name}"] = torch.tensor(rates, dtype=torch.float64).float()
    return outputs


# ----------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------

RUNNERS: dict[str, Any] = {
    "discriminator": run_discriminator,
    "loss_hinge_d": run_loss_hinge_d,
    "loss_lecam": run_loss_lecam,
    "loss_recon_stage1": run_loss_recon_stage1,
    "loss_single_stage_vae": run_loss_single_stage_vae,
    "loss_mlm": run_loss_mlm,
    "loss_ar": run_loss_ar,
    "lr_schedule": run_lr_schedule,
}
