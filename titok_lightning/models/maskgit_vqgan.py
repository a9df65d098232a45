"""MaskGIT-VQGAN: the convolutional f16 pixel tokenizer used as TiTok's stage-1 teacher (proxy codes),
as the pixel decoder of stage-2 TiTok, and as RAR's tokenizer.

A VQGAN without attention layers: GroupNorm/SiLU residual blocks, average-pool downsampling, nearest
upsampling + conv. Module names follow the published checkpoint (``encoder.down.0.block.0.conv1``,
``decoder.up.4.upsample_conv``, ``quantize.embedding.weight``) so it loads without renaming.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from titok_lightning.convert import FromReferenceConfig
from titok_lightning.models.quantizers import VectorQuantizer
from titok_lightning.registry import register_model

# The published MaskGIT-VQGAN ImageNet f16 256x256 tokenizer (hard-coded in the reference).
MASKGIT_VQGAN_F16_256: dict[str, Any] = {
    "channel_mult": (1, 1, 2, 2, 4),
    "num_resolutions": 5,
    "dropout": 0.0,
    "hidden_channels": 128,
    "num_channels": 3,
    "num_res_blocks": 2,
    "resolution": 256,
    "z_channels": 256,
}


def _widths(channel_mult: Sequence[int], num_resolutions: int, hidden_channels: int) -> list[int]:
    """Channel width at each resolution, finest first."""
    if len(channel_mult) != num_resolutions:
        raise ValueError(f"channel_mult {tuple(channel_mult)} needs one entry per resolution ({num_resolutions})")
    return [hidden_channels * m for m in channel_mult]


def conv_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """Encoder/Decoder kwargs from a reference pixel config (``resolution`` only names the image size)."""
    return {k: (tuple(v) if k == "channel_mult" else v) for k, v in config.items() if k != "resolution"}


class ResnetBlock(nn.Module):
    """GroupNorm(32) -> SiLU -> 3x3 conv, twice, plus a residual.

    When the width changes, the published weights apply the 1x1 ``nin_shortcut`` to the block's
    *output* (not its input) and add that; this is reproduced, since the weights were trained so.
    """

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(32, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(32, out_channels, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.nin_shortcut = (
            nn.Conv2d(out_channels, out_channels, 1, bias=False) if in_channels != out_channels else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return h + (self.nin_shortcut(h) if self.nin_shortcut is not None else x)


def _res_blocks(in_channels: int, out_channels: int, num_blocks: int, dropout: float) -> nn.ModuleList:
    """``num_blocks`` residual blocks, the first one changing the width."""
    return nn.ModuleList(
        ResnetBlock(in_channels if i == 0 else out_channels, out_channels, dropout) for i in range(num_blocks)
    )


class DownsamplingBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_res_blocks: int, dropout: float, downsample: bool):
        super().__init__()
        self.block = _res_blocks(in_channels, out_channels, num_res_blocks, dropout)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return F.avg_pool2d(x, kernel_size=2, stride=2) if self.downsample else x


class UpsamplingBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_res_blocks: int, dropout: float, upsample: bool):
        super().__init__()
        self.block = _res_blocks(in_channels, out_channels, num_res_blocks, dropout)
        self.upsample_conv = nn.Conv2d(out_channels, out_channels, 3, padding=1) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        if self.upsample_conv is not None:
            x = self.upsample_conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


class Encoder(nn.Module):
    """Images [B, num_channels, H, W] -> latents [B, z_channels, H / 2^(R-1), W / 2^(R-1)]."""

    def __init__(
        self,
        channel_mult: Sequence[int] = MASKGIT_VQGAN_F16_256["channel_mult"],
        num_resolutions: int = 5,
        dropout: float = 0.0,
        hidden_channels: int = 128,
        num_channels: int = 3,
        num_res_blocks: int = 2,
        z_channels: int = 256,
    ):
        super().__init__()
        widths = _widths(channel_mult, num_resolutions, hidden_channels)
        self.conv_in = nn.Conv2d(num_channels, hidden_channels, 3, padding=1, bias=False)
        self.down = nn.ModuleList(
            DownsamplingBlock(
                hidden_channels if i == 0 else widths[i - 1],
                widths[i],
                num_res_blocks,
                dropout,
                downsample=i != num_resolutions - 1,
            )
            for i in range(num_resolutions)
        )
        self.mid = _res_blocks(widths[-1], widths[-1], num_res_blocks, dropout)
        self.norm_out = nn.GroupNorm(32, widths[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[-1], z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down:
            x = block(x)
        for block in self.mid:
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder(nn.Module):
    """Latents [B, z_channels, h, w] -> images [B, num_channels, h * 2^(R-1), w * 2^(R-1)] (unclamped).

    ``up[i]`` works at the resolution of ``down[i]``; they run from the coarsest (``up[R-1]``) to
    the finest (``up[0]``), as in the published weights.
    """

    def __init__(
        self,
        channel_mult: Sequence[int] = MASKGIT_VQGAN_F16_256["channel_mult"],
        num_resolutions: int = 5,
        dropout: float = 0.0,
        hidden_channels: int = 128,
        num_channels: int = 3,
        num_res_blocks: int = 2,
        z_channels: int = 256,
    ):
        super().__init__()
        widths = _widths(channel_mult, num_resolutions, hidden_channels)
        self.conv_in = nn.Conv2d(z_channels, widths[-1], 3, padding=1)
        self.mid = _res_blocks(widths[-1], widths[-1], num_res_blocks, dropout)
        self.up = nn.ModuleList(
            UpsamplingBlock(
                widths[min(i + 1, num_resolutions - 1)], widths[i], num_res_blocks, dropout, upsample=i != 0
            )
            for i in range(num_resolutions)
        )
        self.norm_out = nn.GroupNorm(32, widths[0], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[0], num_channels, 3, padding=1)
        self.upsample_factor = 2 ** (num_resolutions - 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z)
        for block in self.mid:
            x = block(x)
        for block in reversed(self.up):
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(x)))


def pixel_quantizer(codebook_size: int = 1024, codebook_dim: int = 256) -> VectorQuantizer:
    """The VQGAN's codebook: plain euclidean nearest neighbour (no l2 normalisation)."""
    return VectorQuantizer(codebook_size, codebook_dim, commitment_cost=0.25, use_l2_norm=False)


def decode_code_distribution(quantize: VectorQuantizer, decoder: Decoder, probs: torch.Tensor) -> torch.Tensor:
    """Code distributions [B, K, h, w] -> images [B, 3, H, W], not clamped: ``decoder`` sees the probability-weighted
    mix of ``quantize``'s code vectors (how TiTok stage 2 decodes its proxy-code logits)."""
    latents = quantize.get_codebook_entry(probs.movedim(1, -1)).movedim(-1, 1)
    return decoder(latents)


class MaskGITVQGAN(FromReferenceConfig, nn.Module):
    """MaskGIT-VQGAN pixel tokenizer (frozen in every use here; kept in eval mode).

    ``encode`` images [B, 3, H, W] in [0, 1] -> codes [B, h, w] (int64, h = H / 2^(R-1));
    ``decode`` codes [B, h, w] (or row-major [B, h*w] of a square grid) -> images in [0, 1].
    """

    def __init__(
        self,
        channel_mult: Sequence[int] = MASKGIT_VQGAN_F16_256["channel_mult"],
        num_resolutions: int = 5,
        dropout: float = 0.0,
        hidden_channels: int = 128,
        num_channels: int = 3,
        num_res_blocks: int = 2,
        resolution: int = 256,
        z_channels: int = 256,
        codebook_size: int = 1024,
    ):
        super().__init__()
        conv = dict(
            channel_mult=tuple(channel_mult),
            num_resolutions=num_resolutions,
            dropout=dropout,
            hidden_channels=hidden_channels,
            num_channels=num_channels,
            num_res_blocks=num_res_blocks,
            z_channels=z_channels,
        )
        self.encoder = Encoder(**conv)
        self.decoder = Decoder(**conv)
        self.quantize = pixel_quantizer(codebook_size, z_channels)
        self.image_size = resolution
        self.downsample_factor = 2 ** (num_resolutions - 1)
        self.eval()
        self.requires_grad_(False)

    def train(self, mode: bool = True) -> MaskGITVQGAN:
        return super().train(False)  # a frozen teacher: dropout stays off even inside a training module

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] -> nearest code ids [B, h, w] (int64)."""
        return self.quantize.nearest_indices(self.encoder(images))

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Code ids [B, h, w] or [B, h*w] (square grid) -> latents [B, z_channels, h, w]."""
        if codes.dim() == 2:
            side = math.isqrt(codes.shape[1])
            if side * side != codes.shape[1]:
                raise ValueError(f"flat codes {tuple(codes.shape)} do not form a square grid")
            codes = codes.view(codes.shape[0], side, side)
        if codes.dim() != 3:
            raise ValueError(f"expected codes [B, h, w] or [B, h*w], got shape {tuple(codes.shape)}")
        return self.quantize.get_codebook_entry(codes).permute(0, 3, 1, 2)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, z_channels, h, w] -> images [B, 3, H, W], not clamped."""
        return self.decoder(latents)

    def decode_soft(self, probs: torch.Tensor) -> torch.Tensor:
        """Code distributions [B, K, h, w] (e.g. a softmax over codes) -> images [B, 3, H, W], not clamped.

        The decoder sees the probability-weighted mix of code vectors (TiTok stage 2)."""
        return decode_code_distribution(self.quantize, self.decoder, probs)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Code ids [B, h, w] or [B, h*w] -> images [B, 3, H, W] clamped to [0, 1]."""
        return self.decoder(self.lookup(codes)).clamp(0.0, 1.0)

    def decode_tokens(self, codes: torch.Tensor) -> torch.Tensor:
        return self.decode(codes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruction through the codebook: images [B, 3, H, W] -> images in [0, 1]."""
        return self.decode(self.encode(images))

    @staticmethod
    def convert_reference_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return dict(state_dict)  # module names match the published checkpoint

    @classmethod
    def kwargs_from_reference_config(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        """Constructor kwargs from the fixtures' / manifests' ``{pixel_vqgan_conf, quantizer}`` dict (or
        from its ``patched_constants``); without either, the published f16-256 configuration."""
        patched = dict(config.get("patched_constants") or {})
        conv = dict(config.get("pixel_vqgan_conf") or patched.get("pixel_vqgan_conf") or MASKGIT_VQGAN_F16_256)
        quantizer = dict(config.get("quantizer") or {})
        codebook_size = quantizer.get("num_embeddings", patched.get("pixel_codebook_size", 1024))
        codebook_dim = quantizer.get("embedding_dim", patched.get("pixel_codebook_dim", conv["z_channels"]))
        if codebook_dim != conv["z_channels"]:
            raise ValueError(f"codebook dim {codebook_dim} differs from z_channels {conv['z_channels']}")
        return {**conv, "channel_mult": tuple(conv["channel_mult"]), "codebook_size": codebook_size}

    @classmethod
    def reference_config(cls, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        conv = {key: kwargs[key] for key in MASKGIT_VQGAN_F16_256}
        return {
            "pixel_vqgan_conf": {**conv, "channel_mult": list(conv["channel_mult"])},
            "quantizer": {"num_embeddings": kwargs["codebook_size"], "embedding_dim": conv["z_channels"]},
        }


register_model(
    "maskgit_vqgan_f16_256",
    MaskGITVQGAN,
    family="pixel_tokenizer",
    checkpoint="fun-research/TiTok/maskgit-vqgan-imagenet-f16-256.bin",
    tokens="16x16 x VQ 1024",
    **MASKGIT_VQGAN_F16_256,
    codebook_size=1024,
)
