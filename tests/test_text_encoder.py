"""The frozen CLIP text encoder shared by TA-TiTok and MaskGen: features against open_clip's own forward."""

from __future__ import annotations

import pytest
import torch

from titok_lightning.text_encoder import CLIPTextEncoder, PretrainedTextEncoderUnavailableError

CAPTIONS = ["a photo of a cat", ""]


def open_clip_features(tower, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate-block tokens, final normalised tokens) computed by open_clip's own transformer."""
    with torch.no_grad():
        x = tower.token_embedding(ids) + tower.positional_embedding
        last = len(tower.transformer.resblocks) - 2
        final, (penultimate,) = tower.transformer.forward_intermediates(x, attn_mask=tower.attn_mask, indices=[last])
    return penultimate, tower.ln_final(final)


def test_features_match_open_clip_text_transformer():
    from open_clip.transformer import TextTransformer

    torch.manual_seed(0)
    tower = TextTransformer(context_length=77, vocab_size=49408, width=32, heads=2, layers=3, output_dim=24).eval()
    encoder = CLIPTextEncoder(text_model=tower)
    encoder.train()
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    assert (encoder.context_length, encoder.width) == (77, 32)
    ids = encoder.tokenize(CAPTIONS)
    features = encoder.encode_tokens(ids)
    assert features.condition.shape == features.guidance.shape == (2, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(features.condition_pooled, tower(ids)[:, None])
    penultimate, final = open_clip_features(tower, ids)
    torch.testing.assert_close(features.condition, penultimate)
    torch.testing.assert_close(features.guidance, final)


def test_clip_model_keeps_only_its_text_tower():
    from open_clip.model import CLIP

    torch.manual_seed(0)
    vision = {"image_size": 32, "patch_size": 16, "width": 32, "layers": 1, "head_width": 16}
    clip = CLIP(embed_dim=24, vision_cfg=vision, text_cfg={"width": 32, "heads": 2, "layers": 2}).eval()
    encoder = CLIPTextEncoder(text_model=clip)
    assert not any(name.startswith("visual") for name, _ in encoder.named_parameters())
    ids = encoder.tokenize(CAPTIONS)
    with torch.no_grad():
        torch.testing.assert_close(encoder(CAPTIONS).condition_pooled, clip.encode_text(ids)[:, None])


def test_text_cfg_builds_a_tiny_tower_with_a_projection():
    from open_clip.model import CLIPTextCfg, _build_text_tower

    cfg = {"width": 32, "heads": 2, "layers": 2}
    torch.manual_seed(0)
    encoder = CLIPTextEncoder(pretrained=None, text_cfg={**cfg, "embed_dim": 16})
    torch.manual_seed(0)
    tower = _build_text_tower(embed_dim=16, text_cfg=CLIPTextCfg(**cfg)).eval()
    features = encoder(CAPTIONS)
    ids = encoder.tokenize(CAPTIONS)
    assert features.condition_pooled.shape == (2, 1, 16)
    with torch.no_grad():
        torch.testing.assert_close(features.condition_pooled, tower(ids)[:, None])
    penultimate, final = open_clip_features(tower, ids)
    torch.testing.assert_close(features.condition, penultimate)
    torch.testing.assert_close(features.guidance, final)
    # the pooled size defaults to the width
    assert CLIPTextEncoder(text_cfg=cfg)(CAPTIONS).condition_pooled.shape == (2, 1, 32)


def test_ambiguous_tower_is_refused():
    from open_clip.transformer import TextTransformer

    tower = TextTransformer(width=32, heads=2, layers=1, output_dim=8)
    with pytest.raises(ValueError, match="not both"):
        CLIPTextEncoder(text_cfg={"width": 32, "heads": 2, "layers": 1}, text_model=tower)


def test_without_weights_names_what_to_download(monkeypatch):
    import open_clip

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(open_clip, "create_model", offline)
    with pytest.raises(PretrainedTextEncoderUnavailableError, match="ViT-L-14-336.*openai"):
        CLIPTextEncoder()
