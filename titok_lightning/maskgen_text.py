"""Caption encoding for the MaskGen generators with a frozen open_clip text tower.

MaskGen conditions on the text tokens *before* CLIP's last transformer block ("penultimate" features)
and on the pooled, projected text embedding; TA-TiTok's decoder takes the final, normalised tokens.
:class:`MaskGenTextEncoder` returns all three in one pass. Real runs use OpenAI's ``ViT-L-14-336``
(width 768, 77 tokens, projection 768); tests pass a small random ``open_clip`` text tower.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn as nn


class MaskGenTextFeatures(NamedTuple):
    condition: torch.Tensor
    """Penultimate-block token features [B, L, width] (MaskGen's text tokens)."""
    condition_pooled: torch.Tensor
    """Pooled, projected text embedding [B, 1, embed_dim] (MaskGen's pooled condition)."""
    guidance: torch.Tensor
    """Final-block tokens after the final LayerNorm [B, L, width] (TA-TiTok's text guidance)."""


class MaskGenTextEncoder(nn.Module):
    """Frozen open_clip text encoder: captions -> :class:`MaskGenTextFeatures`.

    Args:
        text_model: an ``open_clip`` ``CLIP`` model (its visual tower is dropped) or ``TextTransformer``;
            ``None`` loads ``model_name`` with ``pretrained`` weights.
        model_name: open_clip architecture, also names the BPE tokenizer (shipped with open_clip).
        pretrained: open_clip pretrained tag or a local weights file, used when ``text_model`` is None.
    """

    def __init__(
        self,
        text_model: nn.Module | None = None,
        model_name: str = "ViT-L-14-336",
        pretrained: str | None = "openai",
    ):
        super().__init__()
        import open_clip

        if text_model is None:
            try:
                text_model = open_clip.create_model(model_name, pretrained=pretrained)
            except Exception as err:  # missing cache / no network / bad file surface as many error types
                raise RuntimeError(
                    f"could not load the open_clip text encoder {model_name!r} with weights {pretrained!r}: {err}. "
                    f"MaskGen needs OpenAI's CLIP {model_name} text tower: download it once with network access "
                    f"(open_clip.create_model({model_name!r}, pretrained={pretrained!r}) caches it under "
                    "~/.cache/huggingface) or pass a local open_clip checkpoint file as `pretrained`."
                ) from err
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.token_embedding = text_model.token_embedding
        self.positional_embedding = text_model.positional_embedding
        self.transformer = text_model.transformer
        self.ln_final = text_model.ln_final
        self.text_projection = text_model.text_projection
        self.pool_type = getattr(text_model, "text_pool_type", getattr(text_model, "pool_type", "argmax"))
        self.eos_id = getattr(text_model, "text_eos_id", getattr(text_model, "eos_id", None))
        self.register_buffer("attn_mask", text_model.attn_mask, persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> MaskGenTextEncoder:
        return super().train(False)  # always a frozen feature extractor

    @property
    def context_length(self) -> int:
        return self.positional_embedding.shape[0]

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        """Captions -> BPE token ids [B, context_length] on this module's device."""
        ids = self.tokenizer(list(captions), context_length=self.context_length)
        return ids.to(self.positional_embedding.device)

    @torch.no_grad()
    def encode_tokens(self, ids: torch.Tensor) -> MaskGenTextFeatures:
        """Token ids [B, L] -> penultimate tokens, pooled projection and final normalised tokens."""
        from open_clip.transformer import text_global_pool

        dtype = self.transformer.get_cast_dtype()
        x = self.token_embedding(ids).to(dtype) + self.positional_embedding.to(dtype)
        if not getattr(self.transformer, "batch_first", True):
            raise ValueError("expected a batch-first open_clip text transformer")
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
        return MaskGenTextFeatures(penultimate, pooled.unsqueeze(1), final)

    def forward(self, captions: Sequence[str]) -> MaskGenTextFeatures:
        return self.encode_tokens(self.tokenize(captions))
