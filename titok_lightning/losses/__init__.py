"""Training losses: tokenizer reconstruction / GAN losses, perceptual losses, generator token losses."""

from titok_lightning.losses.generator import ARLoss, MLMLoss
from titok_lightning.losses.perceptual import PerceptualLoss, PretrainedWeightsUnavailableError
from titok_lightning.losses.tokenizer import ReconstructionLoss, Stage1Loss, hinge_d_loss, lecam_loss

__all__ = [
    "ARLoss",
    "MLMLoss",
    "PerceptualLoss",
    "PretrainedWeightsUnavailableError",
    "ReconstructionLoss",
    "Stage1Loss",
    "hinge_d_loss",
    "lecam_loss",
]
