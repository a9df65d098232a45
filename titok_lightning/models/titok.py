"""TiTok and TA-TiTok: 1D image tokenizers (ViT encoder -> N latent tokens -> ViT decoder).

The encoder appends N learnable latent tokens to the image patches and keeps only their outputs; the
decoder appends the (quantized) latents to a grid of mask tokens and predicts, per patch,
- legacy stage 1 (``is_legacy``): logits over the MaskGIT-VQGAN codebook ("proxy codes");
- legacy stage 2 (``finetune_decoder``): the same logits, softmax-mixed over the VQGAN codebook and
  decoded by the VQGAN pixel decoder (the ViT encoder, quantizer and latent tokens are frozen);
- single stage (``is_legacy=False``): RGB pixels directly.
TA-TiTok's decoder also attends to text features (CLIP), appended after the latent tokens.

Latents use the reference's "fake 2D" layout [B, C, 1, N].
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
from einops.layers.torch import Rearrange

from titok_lightning.convert import FromReferenceConfig, load_reference_state_dict, rename_keys
from titok_lightning.models.blocks import Block, init_trunc_normal
from titok_lightning.models.maskgit_vqgan import (
    MASKGIT_VQGAN_F16_256,
    Decoder,
    conv_kwargs,
    decode_code_distribution,
    pixel_quantizer,
)
from titok_lightning.models.quantizers import DiagonalGaussianDistribution, VectorQuantizer
from titok_lightning.registry import register_model

# The reference's ViT sizes: name -> (width, depth, heads).
VIT_SIZES: dict[str, tuple[int, int, int]] = {
    "small": (512, 8, 8),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}

# Reference nn.MultiheadAttention / open_clip block names -> blocks.Block names.
_REFERENCE_BLOCK_RENAMES = [
    (r"\.ln_1\.", ".norm1."),
    (r"\.ln_2\.", ".norm2."),
    (r"\.attn\.in_proj_weight$", ".attn.qkv.weight"),
    (r"\.attn\.in_proj_bias$", ".attn.qkv.bias"),
    (r"\.attn\.out_proj\.", ".attn.proj."),
    (r"\.mlp\.c_fc\.", ".mlp.fc1."),
    (r"\.mlp\.c_proj\.", ".mlp.fc2."),
]

# The inverse, limited to the transformer blocks (the pixel decoder has norm1/norm2 of its own).
_TO_REFERENCE_BLOCK_RENAMES = [
    (r"(\.transformer\.\d+)\.norm1\.", r"\1.ln_1."),
    (r"(\.transformer\.\d+)\.norm2\.", r"\1.ln_2."),
    (r"(\.transformer\.\d+)\.attn\.qkv\.weight$", r"\1.attn.in_proj_weight"),
    (r"(\.transformer\.\d+)\.attn\.qkv\.bias$", r"\1.attn.in_proj_bias"),
    (r"(\.transformer\.\d+)\.attn\.proj\.", r"\1.attn.out_proj."),
    (r"(\.transformer\.\d+)\.mlp\.fc1\.", r"\1.mlp.c_fc."),
    (r"(\.transformer\.\d+)\.mlp\.fc2\.", r"\1.mlp.c_proj."),
]


class _ViT(nn.Module):
    """Shared trunk of the encoder and decoder: class + positional embeddings, pre/post LayerNorms and
    ``depth`` pre-norm blocks (LayerNorm eps 1e-5, GELU)."""

    def __init__(
        self, width: int, depth: int, num_heads: int, image_size: int, patch_size: int, num_latent_tokens: int
    ):
        super().__init__()
        self.width = width
        # a remainder of image_size / patch_size is left out, as in the reference (the patch stride skips it)
        self.grid_size = grid_size = image_size // patch_size
        self.patch_size = patch_size
        self.num_latent_tokens = num_latent_tokens
        self.class_embedding = nn.Parameter(torch.empty(1, width))
        self.positional_embedding = nn.Parameter(torch.empty(grid_size**2 + 1, width))
        self.latent_token_positional_embedding = nn.Parameter(torch.empty(num_latent_tokens, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.ModuleList(Block(width, num_heads, mlp_ratio=4.0, norm_eps=1e-5) for _ in range(depth))
        self.ln_post = nn.LayerNorm(width)

    def init_weights(self) -> None:
        """Reference init: embeddings N(0, width^-1/2), linear/conv trunc-normal(0.02), unit LayerNorms;
        the fused qkv keeps nn.MultiheadAttention's own xavier-uniform init (the reference's trunc-normal
        pass does not reach it)."""
        for param in self.parameters(recurse=False):  # class / positional / mask-token embeddings
            nn.init.normal_(param, std=self.width**-0.5)
        self.apply(init_trunc_normal)
        for block in self.transformer:
            nn.init.xavier_uniform_(block.attn.qkv.weight)

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_pre(x)
        for block in self.transformer:
            x = block(x)
        return x


class TiTokEncoder(_ViT):
    """Images [B, 3, H, W] + latent tokens [N, width] -> latents [B, out_channels, 1, N]."""

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        width: int,
        depth: int,
        num_heads: int,
        num_latent_tokens: int,
        out_channels: int,
        is_legacy: bool,
    ):
        super().__init__(width, depth, num_heads, image_size, patch_size, num_latent_tokens)
        self.image_size = image_size
        self.out_channels = out_channels
        self.is_legacy = is_legacy
        self.patch_embed = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)
        self.conv_out = nn.Conv2d(width, out_channels, kernel_size=1)

    def forward(self, pixels: torch.Tensor, latent_tokens: torch.Tensor) -> torch.Tensor:
        b = pixels.shape[0]
        if tuple(pixels.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(f"expected images [B, 3, {self.image_size}, {self.image_size}], got {tuple(pixels.shape)}")
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)  # [B, g*g, W]
        x = torch.cat([self.class_embedding.expand(b, -1, -1).to(x.dtype), x], dim=1)
        x = x + self.positional_embedding.to(x.dtype)
        latents = (latent_tokens + self.latent_token_positional_embedding).to(x.dtype)
        x = self.run_blocks(torch.cat([x, latents.expand(b, -1, -1)], dim=1))
        x = self.ln_post(x[:, 1 + self.grid_size**2 :])  # [B, N, W]
        if self.is_legacy:
            # Published legacy checkpoints were trained with the [B, N, W] memory read as [B, W, N].
            x = x.reshape(b, self.width, self.num_latent_tokens, 1)
        else:
            x = x.transpose(1, 2).unsqueeze(-1)
        return self.conv_out(x).reshape(b, self.out_channels, 1, self.num_latent_tokens)


class TiTokDecoder(_ViT):
    """Latents [B, token_size, 1, N] -> per-patch outputs: proxy-code logits [B, num_proxy_codes, g, g]
    (``is_legacy``) or images [B, 3, H, W] (pixel head, unclamped)."""

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        width: int,
        depth: int,
        num_heads: int,
        num_latent_tokens: int,
        token_size: int,
        is_legacy: bool,
        num_proxy_codes: int = 1024,
    ):
        super().__init__(width, depth, num_heads, image_size, patch_size, num_latent_tokens)
        self.token_size = token_size
        self.is_legacy = is_legacy
        self.decoder_embed = nn.Linear(token_size, width)
        self.mask_token = nn.Parameter(torch.empty(1, 1, width))
        if is_legacy:
            self.ffn = nn.Sequential(
                nn.Conv2d(width, 2 * width, 1), nn.Tanh(), nn.Conv2d(2 * width, num_proxy_codes, 1)
            )
            self.conv_out = nn.Identity()
        else:
            self.ffn = nn.Sequential(
                nn.Conv2d(width, patch_size * patch_size * 3, 1),
                Rearrange("b (p1 p2 c) h w -> b c (h p1) (w p2)", p1=patch_size, p2=patch_size),
            )
            self.conv_out = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, z: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """``context`` [B, L, width] (already embedded) is appended after the latent tokens."""
        b, c, h, n = z.shape
        if c != self.token_size or h != 1 or n != self.num_latent_tokens:
            raise ValueError(
                f"expected latents [B, {self.token_size}, 1, {self.num_latent_tokens}], got {tuple(z.shape)}"
            )
        latents = self.decoder_embed(z.reshape(b, c, n).transpose(1, 2)) + self.latent_token_positional_embedding
        grid = self.grid_size**2
        queries = torch.cat([self.class_embedding, self.mask_token[0].expand(grid, -1)]) + self.positional_embedding
        parts = [queries.to(latents.dtype).expand(b, -1, -1), latents]
        if context is not None:
            parts.append(context.to(latents.dtype))
        x = self.run_blocks(torch.cat(parts, dim=1))
        x = self.ln_post(x[:, 1 : 1 + grid])
        x = x.transpose(1, 2).reshape(b, self.width, self.grid_size, self.grid_size)
        return self.conv_out(self.ffn(x))


class TATiTokDecoder(TiTokDecoder):
    """TiTok decoder that also attends to text features [B, text_context_length, text_embed_dim]."""

    def __init__(self, *args: Any, text_context_length: int = 77, text_embed_dim: int = 768, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.text_context_length = text_context_length
        self.text_guidance_proj = nn.Linear(text_embed_dim, self.width)
        self.text_guidance_positional_embedding = nn.Parameter(torch.empty(text_context_length, self.width))

    def init_weights(self) -> None:
        super().init_weights()
        # The reference adds the text projection after its init pass: PyTorch's default Linear init.
        self.text_guidance_proj.reset_parameters()

    def forward(self, z: torch.Tensor, text_guidance: torch.Tensor) -> torch.Tensor:
        if text_guidance.dim() != 3 or text_guidance.shape[1] != self.text_context_length:
            raise ValueError(
                f"expected text features [B, {self.text_context_length}, D], got {tuple(text_guidance.shape)}"
            )
        context = self.text_guidance_proj(text_guidance) + self.text_guidance_positional_embedding
        return super().forward(z, context)


class TiTok(FromReferenceConfig, nn.Module):
    """TiTok 1D tokenizer.

    ``quantize_mode="vq"``: tokens are ids into a ``codebook_size`` x ``token_size`` codebook;
    ``"vae"``: tokens are continuous ``token_size``-channel latents sampled from a diagonal Gaussian.
    ``finetune_decoder`` builds the legacy stage-2 model: encoder, quantizer and latent tokens are
    frozen (and stay in eval mode); the proxy-code logits are decoded through ``pixel_quantize`` /
    ``pixel_decoder`` (a MaskGIT-VQGAN quantizer and decoder configured by ``pixel_vqgan``).
    """

    def __init__(
        self,
        image_size: int = 256,
        encoder_patch_size: int = 16,
        decoder_patch_size: int = 16,
        num_latent_tokens: int = 32,
        token_size: int = 12,
        encoder_width: int = 1024,
        encoder_depth: int = 24,
        encoder_heads: int = 16,
        decoder_width: int = 1024,
        decoder_depth: int = 24,
        decoder_heads: int = 16,
        quantize_mode: str = "vq",
        codebook_size: int = 4096,
        commitment_cost: float = 0.25,
        use_l2_norm: bool = True,
        clustering_vq: bool = False,
        is_legacy: bool = True,
        finetune_decoder: bool = False,
        num_proxy_codes: int = 1024,
        pixel_vqgan: Mapping[str, Any] | None = None,
        pixel_codebook_size: int = 1024,
        pixel_codebook_dim: int = 256,
        **decoder_kwargs: Any,
    ):
        super().__init__()
        if quantize_mode not in ("vq", "vae"):
            raise ValueError(f"quantize_mode must be 'vq' or 'vae', got {quantize_mode!r}")
        if finetune_decoder and (quantize_mode != "vq" or not is_legacy):
            raise ValueError("finetune_decoder (stage 2) needs quantize_mode='vq' and is_legacy=True")
        pixel_vqgan = pixel_vqgan or MASKGIT_VQGAN_F16_256
        # Reconstructions may come out at another size than image_size (the reference builds and runs that);
        # training, which compares them with the inputs, checks `output_size`.
        if finetune_decoder and (
            num_proxy_codes != pixel_codebook_size or pixel_codebook_dim != pixel_vqgan["z_channels"]
        ):
            raise ValueError(
                f"stage 2 needs num_proxy_codes == pixel_codebook_size and pixel_codebook_dim == the pixel "
                f"decoder's z_channels; got {num_proxy_codes}, {pixel_codebook_size}, {pixel_codebook_dim}, "
                f"{pixel_vqgan['z_channels']}"
            )
        self.quantize_mode = quantize_mode
        self.finetune_decoder = finetune_decoder
        self.num_latent_tokens = num_latent_tokens
        self.token_size = token_size
        self.image_size = image_size

        self.encoder = TiTokEncoder(
            image_size,
            encoder_patch_size,
            encoder_width,
            encoder_depth,
            encoder_heads,
            num_latent_tokens,
            out_channels=2 * token_size if quantize_mode == "vae" else token_size,
            is_legacy=is_legacy,
        )
        self.decoder = self._build_decoder(
            image_size,
            decoder_patch_size,
            decoder_width,
            decoder_depth,
            decoder_heads,
            num_latent_tokens,
            token_size,
            is_legacy,
            num_proxy_codes,
            **decoder_kwargs,
        )
        self.latent_tokens = nn.Parameter(torch.empty(num_latent_tokens, encoder_width))
        if quantize_mode == "vq":
            self.quantize = VectorQuantizer(codebook_size, token_size, commitment_cost, use_l2_norm, clustering_vq)
        if finetune_decoder:
            self.pixel_quantize = pixel_quantizer(pixel_codebook_size, pixel_codebook_dim)
            self.pixel_decoder = Decoder(**conv_kwargs(pixel_vqgan))
        self.init_weights()
        if finetune_decoder:
            self.encoder.requires_grad_(False)
            self.quantize.requires_grad_(False)
            self.latent_tokens.requires_grad_(False)
            self.train(self.training)

    def _build_decoder(self, *args: Any, **kwargs: Any) -> TiTokDecoder:
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")
        return TiTokDecoder(*args)

    def init_weights(self) -> None:
        """The reference init: ViT parts as in ``_ViT.init_weights``, latent tokens N(0, width^-1/2), the
        codebook uniform(-1/K, 1/K), the pixel decoder PyTorch's default init."""
        self.encoder.init_weights()
        self.decoder.init_weights()
        nn.init.normal_(self.latent_tokens, std=self.encoder.width**-0.5)
        if self.quantize_mode == "vq":
            self.quantize.init_weights()
        if self.finetune_decoder:
            self.pixel_quantize.init_weights()
            for module in self.pixel_decoder.modules():
                if isinstance(module, (nn.Conv2d, nn.GroupNorm)):
                    module.reset_parameters()

    @property
    def output_size(self) -> int | None:
        """Side of the images ``decode`` returns (None for proxy-code logits, stage 1)."""
        if self.finetune_decoder:
            return self.decoder.grid_size * self.pixel_decoder.upsample_factor
        return None if self.decoder.is_legacy else self.decoder.grid_size * self.decoder.patch_size

    def train(self, mode: bool = True) -> TiTok:
        """Stage 2 keeps the frozen encoder and quantizer in eval mode."""
        super().train(mode)
        if self.finetune_decoder:
            self.encoder.eval()
            self.quantize.eval()
        return self

    # ---------------------------------------------------------------- public API

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Images [B, 3, H, W] in [0, 1] -> (latents [B, token_size, 1, N], info).

        VQ: straight-through quantized latents and a dict with ``quantizer_loss``, ``commitment_loss``,
        ``codebook_loss`` (zeros in stage 2) and ``min_encoding_indices`` [B, 1, N] (int64).
        VAE: a posterior sample and the :class:`DiagonalGaussianDistribution` itself.
        """
        if self.finetune_decoder:
            with torch.no_grad():
                z, info = self.quantize(self.encoder(pixels, self.latent_tokens))
            zero = torch.zeros((), device=z.device)
            return z, {**info, "quantizer_loss": zero, "commitment_loss": zero, "codebook_loss": zero}
        z = self.encoder(pixels, self.latent_tokens)
        if self.quantize_mode == "vq":
            return self.quantize(z)
        posterior = DiagonalGaussianDistribution(z)
        return posterior.sample(), posterior

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [B, token_size, 1, N] -> legacy stage 1: proxy-code logits [B, num_proxy_codes, g, g];
        otherwise images [B, 3, H, W] (not clamped; nominally [0, 1])."""
        decoded = self.decoder(z)
        if self.finetune_decoder:
            decoded = decode_code_distribution(self.pixel_quantize, self.pixel_decoder, decoded.softmax(dim=1))
        return decoded

    def tokens_to_latents(self, tokens: torch.Tensor) -> torch.Tensor:
        """VQ ids [B, N] or [B, 1, N] -> code latents [B, token_size, 1, N]; VAE latents pass through."""
        if self.quantize_mode == "vae":
            return tokens
        if tokens.is_floating_point():
            raise TypeError("VQ tokens must be integer code ids")
        if tokens.dim() == 3:
            tokens = tokens.squeeze(1)
        if tokens.dim() != 2:
            raise ValueError(f"expected token ids [B, N] or [B, 1, N], got shape {tuple(tokens.shape)}")
        return self.quantize.get_codebook_entry(tokens).transpose(1, 2).unsqueeze(2)

    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [B, N] / [B, 1, N] (VQ) or latents [B, token_size, 1, N] (VAE) -> as :meth:`decode`."""
        return self.decode(self.tokens_to_latents(tokens))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Images [B, 3, H, W] -> (``decode(encode(pixels))``, the info of :meth:`encode`)."""
        z, info = self.encode(pixels)
        return self.decode(z), info

    # ---------------------------------------------------------------- reference checkpoints

    @staticmethod
    def convert_reference_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return rename_keys(state_dict, _REFERENCE_BLOCK_RENAMES)

    @classmethod
    def kwargs_from_reference_config(
        cls,
        config: Mapping[str, Any],
    ) -> dict[str, Any]:
        """Constructor kwargs from the reference's nested config (``model.vq_model``, ``dataset``).

        A top-level ``size_presets`` adds ViT size names ({name: {width, num_layers, num_heads}});
        ``patched_constants`` replaces the reference's hard-coded pixel VQGAN config
        (``pixel_vqgan_conf``, ``pixel_codebook_size``, ``pixel_codebook_dim``) and the legacy head
        size (``legacy_proxy_codes``).
        """
        vq = config["model"]["vq_model"]
        sizes = dict(VIT_SIZES)
        for name, preset in (config.get("size_presets") or {}).items():
            sizes[name] = (preset["width"], preset["num_layers"], preset["num_heads"])
        enc, dec = sizes[vq["vit_enc_model_size"]], sizes[vq["vit_dec_model_size"]]
        patched = dict(config.get("patched_constants") or {})
        quantize_mode = vq.get("quantize_mode", "vq")
        kwargs: dict[str, Any] = dict(
            image_size=config["dataset"]["preprocessing"]["crop_size"],
            encoder_patch_size=vq["vit_enc_patch_size"],
            decoder_patch_size=vq["vit_dec_patch_size"],
            num_latent_tokens=vq["num_latent_tokens"],
            token_size=vq["token_size"],
            encoder_width=enc[0],
            encoder_depth=enc[1],
            encoder_heads=enc[2],
            decoder_width=dec[0],
            decoder_depth=dec[1],
            decoder_heads=dec[2],
            quantize_mode=quantize_mode,
            is_legacy=vq.get("is_legacy", True),
            finetune_decoder=vq.get("finetune_decoder", True),
        )
        # Sizes the reference hard-codes (MaskGIT-VQGAN f16-256, 1024 proxy codes) unless patched.
        for ours, theirs in [
            ("num_proxy_codes", "legacy_proxy_codes"),
            ("pixel_codebook_size", "pixel_codebook_size"),
            ("pixel_codebook_dim", "pixel_codebook_dim"),
        ]:
            if theirs in patched:
                kwargs[ours] = patched[theirs]
        if "pixel_vqgan_conf" in patched:
            kwargs["pixel_vqgan"] = {**patched["pixel_vqgan_conf"]}
            kwargs["pixel_vqgan"]["channel_mult"] = tuple(kwargs["pixel_vqgan"]["channel_mult"])
        if quantize_mode == "vq":
            kwargs.update(
                codebook_size=vq["codebook_size"],
                commitment_cost=vq["commitment_cost"],
                use_l2_norm=vq["use_l2_norm"],
                # TA-TiTok's; the reference's TiTok neither reads nor writes it (training only, as embed_prob)
                clustering_vq=vq.get("clustering_vq", False),
            )
        return kwargs

    @staticmethod
    def to_reference_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return rename_keys(state_dict, _TO_REFERENCE_BLOCK_RENAMES)

    @classmethod
    def reference_config(cls, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The inverse of :meth:`kwargs_from_reference_config`. ViT sizes the reference has no name for go to
        ``size_presets``, sizes it hard-codes (pixel decoder, proxy codes) to ``patched_constants``."""
        names = {size: name for name, size in VIT_SIZES.items()}
        presets: dict[str, dict[str, int]] = {}

        def size_name(role: str) -> str:
            size = (kwargs[f"{role}_width"], kwargs[f"{role}_depth"], kwargs[f"{role}_heads"])
            if size in names:
                return names[size]
            name = f"{role}_{size[0]}x{size[1]}x{size[2]}"
            presets[name] = dict(width=size[0], num_layers=size[1], num_heads=size[2])
            return name

        vq: dict[str, Any] = dict(
            quantize_mode=kwargs["quantize_mode"],
            vit_enc_model_size=size_name("encoder"),
            vit_dec_model_size=size_name("decoder"),
            vit_enc_patch_size=kwargs["encoder_patch_size"],
            vit_dec_patch_size=kwargs["decoder_patch_size"],
            num_latent_tokens=kwargs["num_latent_tokens"],
            token_size=kwargs["token_size"],
            is_legacy=kwargs["is_legacy"],
            finetune_decoder=kwargs["finetune_decoder"],
        )
        if kwargs["quantize_mode"] == "vq":
            vq.update(
                codebook_size=kwargs["codebook_size"],
                commitment_cost=kwargs["commitment_cost"],
                use_l2_norm=kwargs["use_l2_norm"],
                clustering_vq=kwargs["clustering_vq"],
            )
        patched: dict[str, Any] = {}
        if kwargs["num_proxy_codes"] != 1024:
            patched["legacy_proxy_codes"] = kwargs["num_proxy_codes"]
        pixel = dict(kwargs["pixel_vqgan"] or MASKGIT_VQGAN_F16_256)
        if {**pixel, "channel_mult": tuple(pixel["channel_mult"])} != MASKGIT_VQGAN_F16_256:
            patched["pixel_vqgan_conf"] = {**pixel, "channel_mult": list(pixel["channel_mult"])}
        for name, reference in [("pixel_codebook_size", 1024), ("pixel_codebook_dim", 256)]:
            if kwargs[name] != reference:
                patched[name] = kwargs[name]
        config: dict[str, Any] = {
            "model": {"vq_model": vq},
            "dataset": {"preprocessing": {"crop_size": kwargs["image_size"]}},
        }
        if presets:
            config["size_presets"] = presets
        if patched:
            config["patched_constants"] = patched
        return config


class TATiTok(TiTok):
    """TA-TiTok: TiTok whose decoder is conditioned on text features [B, text_context_length,
    text_embed_dim] (CLIP ViT-L/14 penultimate features in the paper). Single stage only."""

    def __init__(self, *args: Any, text_context_length: int = 77, text_embed_dim: int = 768, **kwargs: Any):
        if kwargs.get("finetune_decoder"):
            raise ValueError("TA-TiTok has no stage-2 (finetune_decoder) variant")
        kwargs.setdefault("is_legacy", False)
        super().__init__(*args, text_context_length=text_context_length, text_embed_dim=text_embed_dim, **kwargs)

    def _build_decoder(self, *args: Any, **kwargs: Any) -> TiTokDecoder:
        return TATiTokDecoder(*args, **kwargs)

    def decode(self, z: torch.Tensor, text_guidance: torch.Tensor) -> torch.Tensor:
        """Latents [B, token_size, 1, N] + text [B, L, D_text] -> images [B, 3, H, W] (not clamped)."""
        return self.decoder(z, text_guidance)

    def decode_tokens(self, tokens: torch.Tensor, text_guidance: torch.Tensor) -> torch.Tensor:
        """Token ids [B, N] / [B, 1, N] (VQ) or latents [B, token_size, 1, N] (VAE) + text -> images."""
        return self.decode(self.tokens_to_latents(tokens), text_guidance)

    def forward(self, pixels: torch.Tensor, text_guidance: torch.Tensor) -> tuple[torch.Tensor, Any]:
        z, info = self.encode(pixels)
        return self.decode(z, text_guidance), info

    @classmethod
    def kwargs_from_reference_config(
        cls,
        config: Mapping[str, Any],
    ) -> dict[str, Any]:
        kwargs = super().kwargs_from_reference_config(config)
        vq = config["model"]["vq_model"]
        kwargs.update(
            text_context_length=vq.get("text_context_length", 77),
            text_embed_dim=vq.get("text_embed_dim", 768),
        )
        return kwargs

    @classmethod
    def reference_config(cls, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        config = super().reference_config(kwargs)
        vq = config["model"]["vq_model"]
        vq.update(text_context_length=kwargs["text_context_length"], text_embed_dim=kwargs["text_embed_dim"])
        return config


def load_stage2_init(
    model: TiTok, stage1_state_dict: Mapping[str, torch.Tensor], pixel_tokenizer_state_dict: Mapping[str, torch.Tensor]
) -> TiTok:
    """Initialise a stage-2 TiTok from a stage-1 TiTok checkpoint plus the MaskGIT-VQGAN's quantizer and
    decoder (as ``pixel_quantize.*`` / ``pixel_decoder.*``), both in reference or this project's format.

    Loads strictly: every key of ``model`` must come from exactly one of the two checkpoints.
    """
    if not model.finetune_decoder:
        raise ValueError("load_stage2_init needs a stage-2 model (finetune_decoder=True)")
    stage1 = {k: v for k, v in stage1_state_dict.items() if not k.startswith(("pixel_quantize.", "pixel_decoder."))}
    pixel = {f"pixel_{k}": v for k, v in pixel_tokenizer_state_dict.items() if k.startswith(("quantize.", "decoder."))}
    return load_reference_state_dict(model, {**stage1, **pixel})


# ---------------------------------------------------------------- registry of official variants


def _vit(encoder: str, decoder: str) -> dict[str, int]:
    (ew, ed, eh), (dw, dd, dh) = VIT_SIZES[encoder], VIT_SIZES[decoder]
    return dict(
        encoder_width=ew, encoder_depth=ed, encoder_heads=eh, decoder_width=dw, decoder_depth=dd, decoder_heads=dh
    )


# Token type: (description for the model zoo, constructor kwargs).
_LEGACY_VQ = (
    "VQ 4096",
    dict(token_size=12, codebook_size=4096, use_l2_norm=True, is_legacy=True, finetune_decoder=True),
)
_VQ8K = ("VQ 8192", dict(token_size=64, codebook_size=8192, use_l2_norm=False, is_legacy=False))
_VAE16 = ("KL 16ch", dict(token_size=16, quantize_mode="vae", is_legacy=False))
_CHECKPOINTS = {TiTok: "yucornetto/tokenizer_{}_imagenet", TATiTok: "turkeyju/tokenizer_{}"}

for _cls, _name, _tokens, _sizes, (_tok_desc, _cfg) in [
    (TiTok, "titok_l32", 32, ("large", "large"), _LEGACY_VQ),
    (TiTok, "titok_b64", 64, ("base", "base"), _LEGACY_VQ),
    (TiTok, "titok_s128", 128, ("small", "small"), _LEGACY_VQ),
    (TiTok, "titok_bl64_vq8k", 64, ("base", "large"), _VQ8K),
    (TiTok, "titok_bl128_vq8k", 128, ("base", "large"), _VQ8K),
    (TiTok, "titok_sl256_vq8k", 256, ("small", "large"), _VQ8K),
    (TiTok, "titok_ll32_vae_c16", 32, ("large", "large"), _VAE16),
    (TiTok, "titok_bl64_vae_c16", 64, ("base", "large"), _VAE16),
    (TiTok, "titok_bl128_vae_c16", 128, ("base", "large"), _VAE16),
    (TATiTok, "tatitok_bl32_vq", 32, ("base", "large"), _VQ8K),
    (TATiTok, "tatitok_bl64_vq", 64, ("base", "large"), _VQ8K),
    (TATiTok, "tatitok_bl128_vq", 128, ("base", "large"), _VQ8K),
    (TATiTok, "tatitok_bl32_vae", 32, ("base", "large"), _VAE16),
    (TATiTok, "tatitok_bl64_vae", 64, ("base", "large"), _VAE16),
    (TATiTok, "tatitok_sl128_vae", 128, ("small", "large"), _VAE16),
]:
    register_model(
        _name,
        _cls,
        family="tokenizer",
        checkpoint=_CHECKPOINTS[_cls].format(_name),
        tokens=f"{_tokens} x {_tok_desc}",
        num_latent_tokens=_tokens,
        **_vit(*_sizes),
        **_cfg,
    )
