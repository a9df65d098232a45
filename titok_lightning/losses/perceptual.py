"""Frozen perceptual losses of the tokenizer recipes: LPIPS (VGG16), ConvNeXt-S logits, or a weighted mix.

The networks are frozen and stay in eval mode even when a parent module is put in training mode
(ConvNeXt-S has stochastic depth, LPIPS dropout): they measure, they do not learn.
"""

from __future__ import annotations

import os
import re
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import ConvNeXt_Small_Weights, VGG16_Weights, convnext_small

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CONVNEXT_INPUT_SIZE = 224

_FLOAT = r"(\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)"
_NAME_PATTERN = re.compile(rf"^(?:(lpips)|(convnext_s)|lpips-convnext_s-{_FLOAT}-{_FLOAT})$")


class PretrainedWeightsUnavailableError(RuntimeError):
    """Pretrained perceptual weights could not be loaded (typically: offline and not in the cache)."""


def parse_perceptual_name(model_name: str) -> tuple[float, float]:
    """``"lpips"`` -> (1, 0); ``"convnext_s"`` -> (0, 1); ``"lpips-convnext_s-A-B"`` -> (A, B)."""
    match = _NAME_PATTERN.match(model_name)
    if match is None:
        raise ValueError(
            f"unsupported perceptual loss {model_name!r}; use 'lpips', 'convnext_s' or 'lpips-convnext_s-<A>-<B>' "
            "(A, B: weights of the LPIPS and ConvNeXt-S terms)"
        )
    if match.group(1):
        return 1.0, 0.0
    if match.group(2):
        return 0.0, 1.0
    weight_lpips, weight_convnext = float(match.group(3)), float(match.group(4))
    if weight_lpips + weight_convnext <= 0:
        raise ValueError(f"perceptual loss weights must not both be zero, got {model_name!r}")
    return weight_lpips, weight_convnext


def _cached_weight_path(weights) -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))


def _ensure_cached(weights) -> None:
    """Download a torchvision weight file into the torch hub cache unless it is there already.

    Done before building the network, so that an offline machine fails at once with a clear error.
    """
    path = _cached_weight_path(weights)
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.hub.download_url_to_file(weights.url, path, progress=False)


def _build_lpips(pretrained: bool) -> nn.Module:
    try:
        import lpips
    except ImportError as err:
        raise ImportError("the LPIPS perceptual loss needs the `lpips` package: pip install lpips") from err
    if pretrained:
        _ensure_cached(VGG16_Weights.IMAGENET1K_V1)
    with warnings.catch_warnings():
        # lpips still passes torchvision's deprecated `pretrained=` flag.
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        # The linear layers (v0.1, "vgg") ship with the package; pnet_rand only concerns the VGG16 trunk.
        return lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=not pretrained, verbose=False)


def _build_convnext(pretrained: bool) -> nn.Module:
    if pretrained:
        _ensure_cached(ConvNeXt_Small_Weights.IMAGENET1K_V1)
    return convnext_small(weights=ConvNeXt_Small_Weights.IMAGENET1K_V1 if pretrained else None)


def _missing_weights_message(model_name: str, err: Exception) -> str:
    needed = []
    if "lpips" in model_name:
        needed.append(f"torchvision vgg16 VGG16_Weights.IMAGENET1K_V1 ({VGG16_Weights.IMAGENET1K_V1.url}) for LPIPS")
    if "convnext_s" in model_name:
        weights = ConvNeXt_Small_Weights.IMAGENET1K_V1
        needed.append(f"torchvision convnext_small ConvNeXt_Small_Weights.IMAGENET1K_V1 ({weights.url})")
    return (
        f"PerceptualLoss({model_name!r}) could not load its pretrained weights ({err}). Download "
        + " and ".join(needed)
        + f" into {os.path.join(torch.hub.get_dir(), 'checkpoints')} (set TORCH_HOME to move it); the LPIPS "
        "linear layers ship with the `lpips` package. Tests can build with pretrained=False (random weights)."
    )


class PerceptualLoss(nn.Module):
    """Per-sample perceptual distance between two image batches in [0, 1].

    ``model_name``: ``"lpips"`` (LPIPS-VGG16 v0.1), ``"convnext_s"`` (mean squared difference of
    torchvision ConvNeXt-S ImageNet logits, images resized to 224 with antialiasing and
    ImageNet-normalised) or ``"lpips-convnext_s-A-B"``, ``(A * lpips + B * convnext) / (A + B)``.
    ``pretrained=False`` builds random-weight backbones (tests); with ``pretrained=True`` missing
    weights raise :class:`PretrainedWeightsUnavailableError` naming what to download.

    ``forward(input, target)`` -> [B]; its batch mean is the reference's scalar loss.
    """

    def __init__(self, model_name: str = "convnext_s", pretrained: bool = True):
        super().__init__()
        self.weight_lpips, self.weight_convnext = parse_perceptual_name(model_name)
        try:
            self.lpips = _build_lpips(pretrained) if self.weight_lpips > 0 else None
            self.convnext = _build_convnext(pretrained) if self.weight_convnext > 0 else None
        except (OSError, RuntimeError) as err:  # URLError is an OSError
            raise PretrainedWeightsUnavailableError(_missing_weights_message(model_name, err)) from err
        self.register_buffer("imagenet_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("imagenet_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> PerceptualLoss:
        return super().train(False)

    def _convnext_logits(self, images: torch.Tensor) -> torch.Tensor:
        images = F.interpolate(images, size=CONVNEXT_INPUT_SIZE, mode="bilinear", align_corners=False, antialias=True)
        return self.convnext((images - self.imagenet_mean) / self.imagenet_std)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """input, target: [B, 3, H, W] in [0, 1] -> per-sample loss [B]."""
        if input.shape != target.shape or input.dim() != 4 or input.shape[1] != 3:
            raise ValueError(f"expected two [B, 3, H, W] images, got {tuple(input.shape)} and {tuple(target.shape)}")
        loss = input.new_zeros(input.shape[0])
        if self.lpips is not None:
            loss = loss + self.weight_lpips * self.lpips(input, target, normalize=True).flatten()
        if self.convnext is not None:
            squared = (self._convnext_logits(input) - self._convnext_logits(target)).pow(2)
            loss = loss + self.weight_convnext * squared.mean(dim=1)
        return loss / (self.weight_lpips + self.weight_convnext)
