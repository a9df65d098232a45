"""PatchGAN-style discriminator of the TiTok / TA-TiTok GAN fine-tuning (stage 2 and single stage).

A stem conv, ``num_stages`` strided stages (conv, blur or average-pool downsampling, GroupNorm,
LeakyReLU) that double the width each time, an adaptive max-pool to a fixed 16x16 grid and a small
head, giving one hinge logit per grid cell. Parameter names equal the reference's, so its
checkpoints load unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# Binomial taps of the separable low-pass filter applied before each stride-2 subsampling.
BLUR_TAPS = {3: (1.0, 2.0, 1.0), 4: (1.0, 3.0, 3.0, 1.0), 5: (1.0, 4.0, 6.0, 4.0, 1.0)}
# The reference pads for a 4-tap filter whatever the kernel size; outputs depend on it.
BLUR_PAD_TAPS = 4


def _same_pad(size: int, taps: int, stride: int) -> tuple[int, int]:
    """TF-style 'SAME' padding (before, after) of one spatial dimension."""
    total = max((math.ceil(size / stride) - 1) * stride + taps - size, 0)
    return total // 2, total - total // 2


class BlurDownsample(nn.Module):
    """Depthwise binomial blur followed by stride-2 subsampling (anti-aliased downsampling).

    The normalised 2D kernel is the persistent buffer ``kernel`` [1, 1, k, k].
    """

    def __init__(self, kernel_size: int = 4):
        super().__init__()
        if kernel_size not in BLUR_TAPS:
            raise ValueError(f"blur_kernel_size must be one of {sorted(BLUR_TAPS)}, got {kernel_size}")
        taps = torch.tensor(BLUR_TAPS[kernel_size])
        kernel = torch.outer(taps, taps)
        self.register_buffer("kernel", (kernel / kernel.sum())[None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = _same_pad(x.shape[-2], BLUR_PAD_TAPS, 2)
        left, right = _same_pad(x.shape[-1], BLUR_PAD_TAPS, 2)
        padding = (top, left)
        if top != bottom or left != right:
            x = F.pad(x, (left, right, top, bottom))
            padding = (0, 0)
        weight = self.kernel.to(x.dtype).expand(x.shape[1], -1, -1, -1)
        return F.conv2d(x, weight, stride=2, padding=padding, groups=x.shape[1])


def _same_conv(in_channels: int, out_channels: int, kernel_size: int) -> nn.Conv2d:
    # Stride-1 odd kernels: symmetric padding equals TF 'SAME' padding, without an extra F.pad copy.
    if kernel_size % 2 == 0:
        raise ValueError(f"same-padded convs need an odd kernel, got {kernel_size}")
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)


class NLayerDiscriminator(nn.Module):
    """Image discriminator: images [B, num_channels, H, W] (in [0, 1]) -> logits [B, 1, 16, 16].

    Stage ``i`` maps ``hidden_channels * 2**(i-1)`` (the stem's ``hidden_channels`` for ``i = 0``) to
    ``hidden_channels * 2**i`` channels and halves the resolution; every width must be a multiple of
    32 (GroupNorm with 32 groups). Weights use PyTorch's default conv initialisation, as the reference.
    """

    def __init__(
        self,
        num_channels: int = 3,
        hidden_channels: int = 128,
        num_stages: int = 3,
        blur_resample: bool = True,
        blur_kernel_size: int = 4,
    ):
        super().__init__()
        if num_stages < 1:
            raise ValueError("the discriminator needs at least one stage")
        if hidden_channels % 32:
            raise ValueError(f"hidden_channels must be a multiple of 32 (GroupNorm groups), got {hidden_channels}")
        self.block_in = nn.Sequential(_same_conv(num_channels, hidden_channels, 5), nn.LeakyReLU(0.1))
        blocks = []
        in_channels = hidden_channels
        for stage in range(num_stages):
            out_channels = hidden_channels * 2**stage
            downsample = BlurDownsample(blur_kernel_size) if blur_resample else nn.AvgPool2d(2, stride=2)
            blocks.append(
                nn.Sequential(
                    _same_conv(in_channels, out_channels, 3),
                    downsample,
                    nn.GroupNorm(32, out_channels),
                    nn.LeakyReLU(0.1),
                )
            )
            in_channels = out_channels
        self.blocks = nn.ModuleList(blocks)
        self.pool = nn.AdaptiveMaxPool2d((16, 16))
        self.to_logits = nn.Sequential(
            _same_conv(in_channels, in_channels, 1),
            nn.LeakyReLU(0.1),
            _same_conv(in_channels, 1, 5),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.block_in(images)
        for block in self.blocks:
            x = block(x)
        return self.to_logits(self.pool(x))

    @staticmethod
    def convert_reference_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Reference keys are this module's keys already."""
        return dict(state_dict)
