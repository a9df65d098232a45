"""Parity runners and manifest resolvers for the generators (MaskGIT, RAR, MaskGen).

Layout: one ``run_<entry>(fixture)`` function per fixture entry and one ``resolve_<class>(config)``
function per reference class, grouped by family; the ``RUNNERS`` and ``MANIFEST_RESOLVERS`` dicts at the
bottom list them. To add a family, add its section and one line per entry to each dict.
"""

from __future__ import annotations

from typing import Any

import torch

from tests.parity_runners import Fixture, build_model
from titok_lightning.models.maskgen import MaskGenKL, MaskGenVQ
from titok_lightning.models.maskgit import ImageBert, MaskGITGenerator, UViTBert
from titok_lightning.models.rar import RAR
from titok_lightning.registry import get_spec, list_models

# ----------------------------------------------------------------------------------------------------------
# MaskGIT: ImageBert, UViTBert
# ----------------------------------------------------------------------------------------------------------


def _run_maskgit(cls: type[MaskGITGenerator], fixture: Fixture) -> dict[str, torch.Tensor]:
    model = build_model(cls, fixture)
    input_ids, condition = fixture.inputs["input_ids"], fixture.inputs["condition"]
    return {
        "logits": model(input_ids, condition, cond_drop_prob=0.0),
        "logits_uncond": model(input_ids, condition, cond_drop_prob=1.0),
    }


def run_imagebert(fixture: Fixture) -> dict[str, torch.Tensor]:
    return _run_maskgit(ImageBert, fixture)


def run_uvitbert(fixture: Fixture) -> dict[str, torch.Tensor]:
    return _run_maskgit(UViTBert, fixture)


_VIT_SIZE_LETTER = {"small": "s", "base": "b", "large": "l"}


def resolve_maskgit(config: dict) -> tuple[str, dict[str, Any]]:
    """TiTok configs name the tokenizer (size, tokens); the registry names the generator after it."""
    vq = config["model"]["vq_model"]
    return f"maskgit_titok_{_VIT_SIZE_LETTER[vq['vit_enc_model_size']]}{vq['num_latent_tokens']}", {}


# ----------------------------------------------------------------------------------------------------------
# RAR
# ----------------------------------------------------------------------------------------------------------


def run_rar(fixture: Fixture) -> dict[str, torch.Tensor]:
    model = build_model(RAR, fixture)
    input_ids, orders = fixture.inputs["input_ids"], fixture.inputs["orders"]
    condition = model.preprocess_condition(fixture.inputs["class_ids"], cond_drop_prob=0.0)
    out = {
        "condition": condition,
        "condition_dropped": model.preprocess_condition(fixture.inputs["class_ids"], cond_drop_prob=1.0),
    }
    out["logits_orders"], out["labels_orders"] = model.forward_fn(input_ids, condition, True, orders=orders)
    out["logits_raster"], out["labels_raster"] = model.forward_fn(input_ids, condition, True)
    prefix = fixture.meta["outputs"]["logits_sampling_prefix"]["shape"][1] - 1
    out["logits_sampling_prefix"] = model.forward_fn(input_ids[:, :prefix], condition, is_sampling=True)
    cache = model.make_kv_cache()
    num_calls = fixture.meta["outputs"]["logits_kv_cache_last"]["shape"][1]
    out["logits_kv_cache_last"] = torch.stack(
        [
            model.forward_fn(input_ids[:, :length], condition, is_sampling=True, kv_cache=cache)[:, -1]
            for length in range(num_calls)
        ],
        dim=1,
    )
    return out


_RAR_WIDTHS = {768: "rar_b", 1024: "rar_l", 1280: "rar_xl", 1408: "rar_xxl"}


def resolve_rar(config: dict) -> tuple[str, dict[str, Any]]:
    """The RAR config is RAR-B's; the README sets the other sizes' widths on top of it."""
    return _RAR_WIDTHS[config["model"]["generator"]["hidden_size"]], {}


# ----------------------------------------------------------------------------------------------------------
# MaskGen: MaskGen-VQ, MaskGen-KL
# ----------------------------------------------------------------------------------------------------------


def run_maskgen_vq(fixture: Fixture) -> dict[str, torch.Tensor]:
    model = build_model(MaskGenVQ, fixture)
    x = fixture.inputs
    # the reference's concat_micro_cond appends the score encoding whatever the micro_condition flag
    micro = model.encode_micro_condition(x["aesthetic_score"] * 100)
    return {
        "condition_pooled_with_micro": torch.cat([x["condition_pooled"].flatten(1), micro], dim=-1).unsqueeze(1),
        "logits": model(x["input_tokens"], x["condition"], x["condition_pooled"], x["aesthetic_score"]),
    }


def run_maskgen_kl(fixture: Fixture) -> dict[str, torch.Tensor]:
    model = build_model(MaskGenKL, fixture)
    x = fixture.inputs
    context, pooled = model.embed_condition(x["condition"], x["condition_pooled"], x["aesthetic_score"])
    z = model.forward_decoder(x["x"], x["mask"], context, pooled)
    return {
        "condition_proj": context,
        "micro_condition": model.encode_micro_condition(x["aesthetic_score"] * 100),
        "condition_pooled_proj": pooled.unsqueeze(1),
        "z": z,
        "diffloss_out": model.diffloss.net(x["diffusion_x"], x["diffusion_t"], z.flatten(0, 1)),
    }


def _resolve_maskgen(cls: type[MaskGenVQ] | type[MaskGenKL], config: dict) -> tuple[str, dict[str, Any]]:
    """The registry variant of the same class and architecture; sampling defaults that differ (stage-1
    configs use aesthetic score 6.0) become overrides."""
    kwargs = cls.kwargs_from_reference_config(config)
    for name in list_models("generator"):
        spec = get_spec(name)
        if spec.model_cls is cls and all(spec.kwargs.get(k) == kwargs[k] for k in ("embed_dim", "depth", "num_heads")):
            return name, {k: v for k, v in kwargs.items() if spec.kwargs.get(k, v) != v}
    raise KeyError(f"no registered {cls.__name__} variant with width {kwargs['embed_dim']}, depth {kwargs['depth']}")


def resolve_maskgen_vq(config: dict) -> tuple[str, dict[str, Any]]:
    return _resolve_maskgen(MaskGenVQ, config)


def resolve_maskgen_kl(config: dict) -> tuple[str, dict[str, Any]]:
    return _resolve_maskgen(MaskGenKL, config)


# ----------------------------------------------------------------------------------------------------------
# Registries
# ----------------------------------------------------------------------------------------------------------

RUNNERS: dict[str, Any] = {
    "imagebert": run_imagebert,
    "uvitbert": run_uvitbert,
    "rar": run_rar,
    "maskgen_vq": run_maskgen_vq,
    "maskgen_kl": run_maskgen_kl,
}

MANIFEST_RESOLVERS: dict[str, Any] = {
    "modeling.maskgit.ImageBert": resolve_maskgit,
    "modeling.maskgit.UViTBert": resolve_maskgit,
    "modeling.rar.RAR": resolve_rar,
    "modeling.maskgen.MaskGen_VQ": resolve_maskgen_vq,
    "modeling.maskgen.MaskGen_KL": resolve_maskgen_kl,
}
