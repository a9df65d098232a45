"""Every registered generator variant builds at a tiny size, trains one step (every trainable parameter
gets a non-zero gradient, nothing is NaN) and evaluates.

Each model class needs an entry in ``TINY`` (constructor overrides) and ``TRAINING_LOSS`` (one training
step's loss on random data).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from titok_lightning.models.maskgen import MaskGenKL, MaskGenVQ
from titok_lightning.models.maskgit import ImageBert, MaskGITGenerator, UViTBert
from titok_lightning.models.rar import RAR
from titok_lightning.registry import create_model, get_spec, list_models

_TINY_TOKENS = dict(codebook_size=16, image_seq_len=8, num_classes=5)
_TINY_WIDTH = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)

TINY: dict[type[nn.Module], dict] = {
    ImageBert: {**_TINY_TOKENS, **_TINY_WIDTH},
    UViTBert: {**_TINY_TOKENS, **_TINY_WIDTH},
    RAR: {**_TINY_TOKENS, **_TINY_WIDTH},
}
_TINY_TEXT = dict(embed_dim=32, depth=2, num_heads=2, text_embed_dim=16, micro_condition_embed_dim=8)
TINY[MaskGenVQ] = {**_TINY_TEXT, "codebook_size": 16, "num_tokens": 8, "num_classes": 5}
TINY[MaskGenKL] = {**_TINY_TEXT, "token_size": 4, "num_tokens": 8, "diffloss_depth": 2, "diffloss_width": 32}


def _maskgit_loss(model: MaskGITGenerator, batch: int) -> torch.Tensor:
    ids = torch.randint(0, model.codebook_size, (batch, model.image_seq_len))
    classes = torch.randint(0, model.num_classes, (batch,))
    masked, mask = model.masking_input_tokens(ids)
    assert mask.any(dim=1).all() and torch.equal(masked[mask], torch.full_like(masked[mask], model.mask_token_id))
    logits = model(masked, classes, cond_drop_prob=0.5)
    assert logits.shape == (batch, model.image_seq_len, model.codebook_size)
    return F.cross_entropy(logits.flatten(0, 1), ids.flatten())


def _rar_loss(model: RAR, batch: int) -> torch.Tensor:
    model.set_random_ratio(0.5)
    ids = torch.randint(0, model.codebook_size, (batch, model.image_seq_len))
    condition = model.preprocess_condition(torch.randint(0, model.num_classes, (batch,)), cond_drop_prob=0.5)
    logits, labels = model(ids, condition, return_labels=True)
    assert logits.shape == (batch, model.image_seq_len + 1, model.codebook_size)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten())


def _text_condition(batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stand-ins for CLIP token features, the pooled feature and aesthetic scores."""
    return torch.randn(batch, 5, 16), torch.randn(batch, 1, 16), torch.rand(batch) * 10


def _maskgen_vq_loss(model: MaskGenVQ, batch: int) -> torch.Tensor:
    ids = torch.randint(0, model.codebook_size, (batch, model.num_tokens))
    masked, _ = model.mask_tokens(ids)
    return F.cross_entropy(model(masked, *_text_condition(batch)).flatten(0, 1), ids.flatten())


def _maskgen_kl_loss(model: MaskGenKL, batch: int) -> torch.Tensor:
    # seed 1 keeps some tokens visible, so the token projection receives a gradient
    latents = torch.randn(batch, model.num_tokens, model.token_size)
    return model(latents, *_text_condition(batch), generator=torch.Generator().manual_seed(1))[0]


TRAINING_LOSS: dict[type[nn.Module], Callable[[nn.Module, int], torch.Tensor]] = {
    ImageBert: _maskgit_loss,
    UViTBert: _maskgit_loss,
    RAR: _rar_loss,
    MaskGenVQ: _maskgen_vq_loss,
    MaskGenKL: _maskgen_kl_loss,
}

GENERATORS = list_models("generator")


def test_every_generator_class_has_a_tiny_configuration():
    missing = {get_spec(n).model_cls.__name__ for n in GENERATORS} - {cls.__name__ for cls in TINY}
    assert not missing, f"add TINY and TRAINING_LOSS entries for {sorted(missing)}"


def test_official_generators_are_registered():
    expected = {"maskgit_titok_l32", "maskgit_titok_b64", "maskgit_titok_s128", "rar_b", "rar_l", "rar_xl", "rar_xxl"}
    assert expected <= set(GENERATORS)
    assert get_spec("maskgit_titok_s128").model_cls is UViTBert
    assert get_spec("rar_xxl").checkpoint == "yucornetto/RAR/rar_xxl.bin"


@pytest.mark.parametrize("name", [n for n in GENERATORS if get_spec(n).model_cls in TINY])
def test_tiny_variant_trains_and_evaluates(name: str):
    torch.manual_seed(0)
    cls = get_spec(name).model_cls
    model = create_model(name, **TINY[cls])
    # Zero-initialised layers (adaLN-zero, gates) block gradients at init; give them small values.
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.02)
    model.train()
    loss = TRAINING_LOSS[cls](model, 3)
    assert torch.isfinite(loss)
    loss.backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name}: {pname} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{name}: {pname} has a non-finite gradient"
            assert p.grad.abs().sum() > 0, f"{name}: {pname} got a zero gradient"
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(TRAINING_LOSS[cls](model, 2))
