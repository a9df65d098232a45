"""Parity runners and manifest resolvers for the tokenizers (TiTok, TA-TiTok, MaskGIT-VQGAN).

Every runner rebuilds the model from the fixture's reference config, size presets and patched
constants, loads the reference state dict through the model's conversion, and reproduces the
fixture's ``call`` (see its json).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from tests.parity_runners import Fixture, build_model
from titok_lightning.hub import find_variant
from titok_lightning.models.maskgit_vqgan import MaskGITVQGAN
from titok_lightning.models.titok import TATiTok, TiTok

MODEL_CLASSES = {
    "modeling.titok.TiTok": TiTok,
    "modeling.tatitok.TATiTok": TATiTok,
    "modeling.titok.PretrainedTokenizer": MaskGITVQGAN,
}


def _build(fixture: Fixture) -> Any:
    return build_model(MODEL_CLASSES[fixture.meta["reference_class"]], fixture)


def _noise_seed(fixture: Fixture) -> int:
    """The seed set right before the posterior sample (in the call pseudo-code / notes)."""
    text = f"{fixture.meta.get('call', '')} {fixture.meta.get('notes', '')}"
    match = re.search(r"torch\.manual_seed\((\d+)\)", text) or re.search(r"noise_seed\s*=\s*(\d+)", text)
    if match is None:
        raise ValueError(f"{fixture.name}: no noise seed in the fixture's call or notes")
    return int(match.group(1))


def _vq_encode(model: TiTok, pixels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    z_pre_quant = model.encoder(pixels, model.latent_tokens)
    z, info = model.encode(pixels)
    return z, {
        "z_pre_quant": z_pre_quant,
        "z_quantized": z,
        "indices": info["min_encoding_indices"],
        "quantizer_loss": info["quantizer_loss"],
        "commitment_loss": info["commitment_loss"],
        "codebook_loss": info["codebook_loss"],
    }


def _vae_encode(fixture: Fixture, model: TiTok, pixels: torch.Tensor) -> tuple[Any, dict[str, torch.Tensor]]:
    posterior_parameters = model.encoder(pixels, model.latent_tokens)
    seed = _noise_seed(fixture)
    torch.manual_seed(seed)
    z, posterior = model.encode(pixels)
    torch.manual_seed(seed)
    sample_noise = torch.randn(posterior.mean.shape)
    return posterior, {
        "posterior_parameters": posterior_parameters,
        "posterior_mean": posterior.mean,
        "posterior_logvar": posterior.logvar,
        "posterior_std": posterior.std,
        "sample_noise": sample_noise,
        "z_sample": z,
        "kl": posterior.kl(),
    }


# ----------------------------------------------------------------------------------------------------------
# TiTok
# ----------------------------------------------------------------------------------------------------------


def run_titok_vq_stage1(fixture: Fixture) -> dict[str, torch.Tensor]:
    model = _build(fixture)
    z, out = _vq_encode(model, fixture.inputs["pixels"])
    out["proxy_logits"] = model.decode(z)
    out["proxy_logits_from_indices"] = model.decode_tokens(out["indices"])
    return out


def run_titok_vq_stage2(fixture: Fixture) -> dict[str, torch.Tensor]:
    model = _build(fixture)
    z, out = _vq_encode(model, fixture.inputs["pixels"])
    out["decoder_logits"] = model.decoder(z)
    out["image"] = model.decode(z)
    out["image_from_tokens"] = model.decode_tokens(fixture.inputs["tokens"])
    return out


def run_titok_vq_single(fixture: Fixture) -> dict[str, torch.Tensor]:
    model = _build(fixture)
    z, out = _vq_encode(model, fixture.inputs["pixels"])
    out["image"] = model.decode(z)
    out["image_from_tokens"] = model.decode_tokens(fixture.inputs["tokens"])
    return out


def run_titok_vae(fixture: Fixture) -> dict[str, torch.Tensor]:
    model = _build(fixture)
    posterior, out = _vae_encode(fixture, model, fixture.inputs["pixels"])
    out["image"] = model.decode(posterior.mean)
    return out


# ----------------------------------------------------------------------------------------------------------
# TA-TiTok
# ----------------------------------------------------------------------------------------------------------


def run_tatitok_vq(fixture: Fixture) -> dict[str, torch.Tensor]:
    model = _build(fixture)
    text = fixture.inputs["text_guidance"]
    z, out = _vq_encode(model, fixture.inputs["pixels"])
    out["image"] = model.decode(z, text)
    out["image_from_tokens"] = model.decode_tokens(fixture.inputs["tokens"], text)
    return out


def run_tatitok_vae(fixture: Fixture) -> dict[str, torch.Tensor]:
    model = _build(fixture)
    text = fixture.inputs["text_guidance"]
    posterior, out = _vae_encode(fixture, model, fixture.inputs["pixels"])
    out["image"] = model.decode(posterior.mean, text)
    out["image_from_tokens"] = model.decode_tokens(fixture.inputs["latents"], text)
    return out


# ----------------------------------------------------------------------------------------------------------
# MaskGIT-VQGAN
# ----------------------------------------------------------------------------------------------------------


def run_maskgit_vqgan(fixture: Fixture) -> dict[str, torch.Tensor]:
    model = _build(fixture)
    pixels = fixture.inputs["pixels"]
    codes = model.encode(pixels)
    return {
        "hidden_states": model.encoder(pixels),
        "codes": codes.flatten(1),
        "image": model.decode(codes),
        "image_unclamped": model.decode_latents(model.lookup(codes)),
        "image_from_tokens": model.decode(fixture.inputs["tokens"]),
    }


# ----------------------------------------------------------------------------------------------------------
# Manifests: the registry variant with the manifest's architecture, mode flags as overrides
# ----------------------------------------------------------------------------------------------------------


def _resolver(model_cls: type):
    def resolve(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return find_variant(model_cls, model_cls.kwargs_from_reference_config(config))

    return resolve


# ----------------------------------------------------------------------------------------------------------
# Registries
# ----------------------------------------------------------------------------------------------------------

RUNNERS: dict[str, Any] = {
    "titok_vq_stage1": run_titok_vq_stage1,
    "titok_vq_stage2": run_titok_vq_stage2,
    "titok_vq_single": run_titok_vq_single,
    "titok_vae": run_titok_vae,
    "tatitok_vq": run_tatitok_vq,
    "tatitok_vae": run_tatitok_vae,
    "maskgit_vqgan": run_maskgit_vqgan,
}

MANIFEST_RESOLVERS: dict[str, Any] = {name: _resolver(cls) for name, cls in MODEL_CLASSES.items()}
