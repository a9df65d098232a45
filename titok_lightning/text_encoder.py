"""Frozen CLIP text encoder (open_clip) giving TA-TiTok its per-token text features.

Real runs use OpenAI's ``ViT-L-14-336`` text transformer (width 768, 77 tokens). Tests build a tiny
random text tower of the same vocabulary and context length from ``text_cfg``; the BPE tokenizer ships
with open_clip and works offline either way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn


class PretrainedTextEncoderUnavailableError(RuntimeError):
    """The open_clip weights could not be loaded (typically: offline and not cached)."""


class CLIPTextEncoder(nn.Module):
    """Captions -> final-layer, final-LayerNorm token features [B, context_length, width] (no pooling).

    Args:
        model_name: open_clip architecture, also the tokenizer's name.
        pretrained: open_clip pretrained tag (``"openai"``) or a local weights file; ``None`` keeps random
            weights (tests).
        text_cfg: build only a text tower from this ``open_clip.model.CLIPTextCfg`` dict instead of the
            named architecture (random weights; e.g. ``{width: 32, heads: 2, layers: 1}`` for tests).
    """

    def __init__(
        self,
        model_name: str = "ViT-L-14-336",
        pretrained: str | None = "openai",
        text_cfg: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        import open_clip
        from open_clip.model import CLIPTextCfg, _build_text_tower

        self.tokenizer = open_clip.get_tokenizer(model_name)
        if text_cfg is not None:
            tower = _build_text_tower(embed_dim=int(text_cfg.get("width", 512)), text_cfg=CLIPTextCfg(**text_cfg))
        else:
            try:
                tower = open_clip.create_model(model_name, pretrained=pretrained)
            except Exception as err:  # download / cache errors come in many types
                raise PretrainedTextEncoderUnavailableError(
                    f"could not load open_clip {model_name!r} weights {pretrained!r} ({err}). Download them once "
                    f"with network access (open_clip.create_model({model_name!r}, pretrained={pretrained!r}) caches "
                    "them under ~/.cache/huggingface), pass a local file as `pretrained`, or use `text_cfg` / "
                    "pretrained=None for a random text tower (tests only)."
                ) from err
        self.token_embedding = tower.token_embedding
        self.positional_embedding = tower.positional_embedding
        self.transformer = tower.transformer
        self.ln_final = tower.ln_final
        self.register_buffer("attn_mask", tower.attn_mask, persistent=False)
        self.context_length = self.positional_embedding.shape[0]
        self.width = self.positional_embedding.shape[1]
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> CLIPTextEncoder:
        return super().train(False)  # frozen feature extractor

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Captions -> BPE token ids [B, context_length] (int64, on this module's device)."""
        return self.tokenizer(list(texts), context_length=self.context_length).to(self.positional_embedding.device)

    @torch.no_grad()
    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [B, L] -> features [B, L, width] after the final LayerNorm (the reference's text guidance)."""
        x = self.token_embedding(tokens) + self.positional_embedding
        batch_first = getattr(self.transformer, "batch_first", True)
        x = self.transformer(x if batch_first else x.transpose(0, 1), attn_mask=self.attn_mask)
        return self.ln_final(x if batch_first else x.transpose(0, 1))

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        """Captions -> features [B, context_length, width]."""
        return self.encode_tokens(self.tokenize(texts))
