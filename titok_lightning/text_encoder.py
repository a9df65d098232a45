"""Frozen CLIP text encoder (open_clip) shared by TA-TiTok and the MaskGen generators.

One pass over the caption gives every feature the two families read: MaskGen conditions on the tokens
*before* CLIP's last transformer block ("penultimate" features) and on the pooled, projected embedding;
TA-TiTok's decoder is guided by the final, normalised tokens. Real runs use OpenAI's ``ViT-L-14-336`` text
transformer (width 768, 77 tokens, projection 768). Tests build a tiny random text tower of the same
vocabulary and context length from ``text_cfg``; the BPE tokenizer ships with open_clip and works offline.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn as nn


class PretrainedTextEncoderUnavailableError(RuntimeError):
    """The open_clip weights could not be loaded (typically: offline and not cached)."""


class TextFeatures(NamedTuple):
    condition: torch.Tensor
    """Penultimate-block token features [B, L, width] (MaskGen's text tokens)."""
    condition_pooled: torch.Tensor
    """Pooled, projected text embedding [B, 1, embed_dim] (MaskGen's pooled condition)."""
    guidance: torch.Tensor
    """Final-block tokens after the final LayerNorm [B, L, width] (TA-TiTok's text guidance)."""


class CLIPTextEncoder(nn.Module):
    """Frozen open_clip text tower: captions -> :class:`TextFeatures`.

    The tower comes from (first match) ``text_model``, ``text_cfg`` or the named pretrained model.

    Args:
        model_name: open_clip architecture, also names the BPE tokenizer.
        pretrained: open_clip pretrained tag (``"openai"``) or a local weights file; ``None`` keeps random
            weights (tests).
        text_cfg: build only a random text tower from this ``open_clip.model.CLIPTextCfg`` dict, plus an optional
            ``embed_dim`` (pooled size, default ``width``); e.g. ``{width: 32, heads: 2, layers: 1}`` for tests.
        text_model: an ``open_clip`` ``CLIP`` model (its visual tower is dropped) or ``TextTransformer``.
    """

    def __init__(
        self,
        model_name: str = "ViT-L-14-336",
        pretrained: str | None = "openai",
        text_cfg: Mapping[str, Any] | None = None,
        text_model: nn.Module | None = None,
    ):
        super().__init__()
        import open_clip

        if text_model is not None and text_cfg is not None:
            raise ValueError("pass either an open_clip `text_model` or a `text_cfg`, not both")
        if text_cfg is not None:
            from open_clip.model import CLIPTextCfg, _build_text_tower

            cfg = dict(text_cfg)
            embed_dim = int(cfg.pop("embed_dim", cfg.get("width", 512)))
            text_model = _build_text_tower(embed_dim=embed_dim, text_cfg=CLIPTextCfg(**cfg))
        elif text_model is None:
            try:
                text_model = open_clip.create_model(model_name, pretrained=pretrained)
            except Exception as err:  # missing cache / no network / bad file surface as many error types
                raise PretrainedTextEncoderUnavailableError(
                    f"could not load the open_clip text encoder {model_name!r} with weights {pretrained!r} ({err}). "
                    f"Download them once with network access (open_clip.create_model({model_name!r}, "
                    f"pretrained={pretrained!r}) caches them under ~/.cache/huggingface), pass a local open_clip "
                    "checkpoint file as `pretrained`, or use `text_cfg` / pretrained=None for a random tower "
                    "(tests only)."
                ) from err
        if not getattr(text_model.transformer, "batch_first", True):
            raise ValueError("expected a batch-first open_clip text transformer (open_clip >= 2.24)")
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.token_embedding = text_model.token_embedding
        self.positional_embedding = text_model.positional_embedding
        self.transformer = text_model.transformer
        self.ln_final = text_model.ln_final
        self.text_projection = text_model.text_projection
        # CLIP names them text_pool_type / text_eos_id, TextTransformer pool_type / eos_id
        self.pool_type = getattr(text_model, "text_pool_type", getattr(text_model, "pool_type", "argmax"))
        self.eos_id = getattr(text_model, "text_eos_id", getattr(text_model, "eos_id", None))
        self.register_buffer("attn_mask", text_model.attn_mask, persistent=False)
        self.context_length, self.width = self.positional_embedding.shape
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> CLIPTextEncoder:
        return super().train(False)  # always a frozen feature extractor

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        """Captions -> BPE token ids [B, context_length] (int64, on this module's device)."""
        ids = self.tokenizer(list(captions), context_length=self.context_length)
        return ids.to(self.positional_embedding.device)

    @torch.no_grad()
    def encode_tokens(self, ids: torch.Tensor) -> TextFeatures:
        """Token ids [B, L] -> penultimate tokens, pooled projection and final normalised tokens."""
        from open_clip.transformer import text_global_pool

        dtype = self.transformer.get_cast_dtype()
        x = self.token_embedding(ids).to(dtype) + self.positional_embedding.to(dtype)
        for block in self.transformer.resblocks[:-1]:
            x = block(x, attn_mask=self.attn_mask)
        penultimate = x
        final = self.ln_final(self.transformer.resblocks[-1](x, attn_mask=self.attn_mask))
        pooled = text_global_pool(final, ids, self.pool_type, eos_token_id=self.eos_id)
        pooled = pooled[0] if isinstance(pooled, tuple) else pooled  # open_clip < 3 returned (pooled, tokens)
        if isinstance(self.text_projection, nn.Linear):
            pooled = self.text_projection(pooled)
        elif self.text_projection is not None:
            pooled = pooled @ self.text_projection
        return TextFeatures(penultimate, pooled.unsqueeze(1), final)

    def forward(self, captions: Sequence[str]) -> TextFeatures:
        """Captions -> :class:`TextFeatures` (token features [B, context_length, width])."""
        return self.encode_tokens(self.tokenize(captions))
