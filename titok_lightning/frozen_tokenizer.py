"""A trained tokenizer seen from the generators: images -> tokens -> images, frozen, one interface.

Generators, pretokenization and ``sample.py`` use any of the project's tokenizers through
:class:`FrozenTokenizer`:

- MaskGIT-VQGAN (RAR's tokenizer): 2D codes flattened row-major to ``[B, h*w]``;
- TiTok (VQ; the stage-2 ``finetune_decoder`` models decode to pixels through the VQGAN decoder);
- TiTok / TA-TiTok VAE: the posterior parameters ``[B, 2C, 1, N]`` (mean, then log-variance), from which
  MaskGen-KL samples its training latents;
- TA-TiTok: decoding needs the caption's CLIP text features.

:func:`load_frozen_tokenizer` builds one through :mod:`titok_lightning.loading`: from a Lightning checkpoint of this
project (its EMA weights), an official checkpoint (registry name, file, folder or Hugging Face repo), or a registry
spec with random weights (tests and the offline demo only).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from titok_lightning.loading import load_pretrained, load_spec
from titok_lightning.models.maskgit_vqgan import MaskGITVQGAN
from titok_lightning.models.quantizers import DiagonalGaussianDistribution
from titok_lightning.models.titok import TATiTok, TiTok

TokenizerSource = str | os.PathLike | Mapping[str, Any]


class FrozenTokenizer(nn.Module):
    """Wraps a tokenizer in eval mode without gradients; runs it in fp32 (outside autocast) as the reference.

    Attributes:
        kind: ``"vq"`` (integer ids) or ``"vae"`` (continuous latents).
        num_tokens: tokens per image N.
        codebook_size: ids range ``[0, codebook_size)`` (VQ only, else None).
        token_size: channels C of a VAE latent token (VAE only, else None).
        image_size: side of the square images the tokenizer was trained on.
        needs_text: decoding takes text features (TA-TiTok).
    """

    def __init__(self, tokenizer: nn.Module):
        super().__init__()
        if isinstance(tokenizer, MaskGITVQGAN):
            grid = tokenizer.image_size // tokenizer.downsample_factor
            self.kind, self.num_tokens = "vq", grid * grid
            self.codebook_size, self.token_size = tokenizer.quantize.codebook_size, None
        elif isinstance(tokenizer, TiTok):
            if tokenizer.decoder.is_legacy and not tokenizer.finetune_decoder:
                raise ValueError(
                    "a stage-1 TiTok predicts proxy codes, not pixels: decoding to images (a generator's samples, "
                    "sample.py mode=reconstruct) needs the stage-2 tokenizer (a checkpoint of the stage-2 recipe, or "
                    "an official titok_* tokenizer); a stage-1 run's own validation reports its reconstructions"
                )
            self.kind, self.num_tokens = tokenizer.quantize_mode, tokenizer.num_latent_tokens
            self.codebook_size = tokenizer.quantize.codebook_size if self.kind == "vq" else None
            self.token_size = tokenizer.token_size if self.kind == "vae" else None
        else:
            raise ValueError(  # e.g. a generator's checkpoint given as the tokenizer: the two look alike
                f"the tokenizer given holds a model of class {type(tokenizer).__name__}, not a tokenizer "
                "(MaskGITVQGAN, TiTok or TATiTok): give a tokenizer's checkpoint, weight file or registry name"
            )
        self.image_size = tokenizer.image_size
        self.needs_text = isinstance(tokenizer, TATiTok)
        self.model = tokenizer.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> FrozenTokenizer:
        return super().train(False)

    def _fp32(self):
        return torch.autocast(self.model_device.type, enabled=False)

    @property
    def model_device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] -> VQ: ids long [B, N]; VAE: posterior parameters float [B, 2C, 1, N]."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
        with self._fp32():
            images = images.float()
            if isinstance(self.model, MaskGITVQGAN):
                return self.model.encode(images).flatten(1)
            if self.kind == "vq":
                _, info = self.model.encode(images)
                return info["min_encoding_indices"].reshape(images.shape[0], -1)
            _, posterior = self.model.encode(images)
            return posterior.parameters.float()

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, text_guidance: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens -> images [B, 3, H, W] clamped to [0, 1].

        Args:
            tokens: VQ ids [B, N]; VAE latents [B, C, 1, N] (a sample or a generator's output, unscaled).
            text_guidance: CLIP text features [B, L, D] for TA-TiTok (final-layer tokens), else None.
        """
        if self.needs_text and text_guidance is None:
            raise ValueError("TA-TiTok decodes with text features: pass text_guidance [B, L, D]")
        with self._fp32():
            if isinstance(self.model, MaskGITVQGAN):
                return self.model.decode(tokens)
            if self.kind == "vq" and tokens.is_floating_point():
                raise TypeError("VQ tokens must be integer ids")
            if self.kind == "vae" and (tokens.dim() != 4 or tokens.shape[1] != self.token_size):
                raise ValueError(f"expected VAE latents [B, {self.token_size}, 1, N], got {tuple(tokens.shape)}")
            extra = () if text_guidance is None else (text_guidance.float(),)
            tokens = tokens if self.kind == "vq" else tokens.float()
            return self.model.decode_tokens(tokens, *extra).clamp(0.0, 1.0)

    @torch.no_grad()
    def reconstruct(
        self, images: torch.Tensor, text_guidance: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images [B, 3, H, W] -> (reconstructions in [0, 1], tokens as :meth:`encode`). VAE tokenizers decode a
        posterior sample, as the reference evaluation does."""
        tokens = self.encode(images)
        latents = DiagonalGaussianDistribution(tokens).sample() if self.kind == "vae" else tokens
        return self.decode(latents, text_guidance), tokens


def load_frozen_tokenizer(source: TokenizerSource, use_ema: bool = True) -> FrozenTokenizer:
    """Build a :class:`FrozenTokenizer`.

    Args:
        source: any source of :func:`titok_lightning.loading.read_weights` (a Lightning ``.ckpt`` of this project's
            tokenizer training, with its EMA weights unless ``use_ema=False``; a registry name, weight file, folder or
            Hugging Face repo of official weights), or a spec of :func:`titok_lightning.loading.load_spec`:
            ``{"checkpoint": <.ckpt>}``, ``{"pretrained": <source>, "name": <variant>, **overrides}`` or
            ``{"name": <variant>, "pretrained": None, **overrides}`` (random weights: tests and demos only).
    """
    if isinstance(source, Mapping):
        return FrozenTokenizer(load_spec(source, "tokenizer", use_ema))
    return FrozenTokenizer(load_pretrained(source, use_ema=use_ema))
