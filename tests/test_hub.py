"""load_pretrained, fully offline: reference-format checkpoints written to a temporary directory."""

from __future__ import annotations

import json
import re

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import save_file

from titok_lightning.convert import CheckpointMismatchError
from titok_lightning.hub import PretrainedNotAvailableError, find_variant, load_pretrained
from titok_lightning.loading import download_command
from titok_lightning.models.maskgit_vqgan import MaskGITVQGAN
from titok_lightning.models.titok import TATiTok, TiTok
from titok_lightning.registry import get_spec

SIZE_PRESETS = {"tiny": {"width": 32, "num_layers": 1, "num_heads": 2}}
TINY_PIXEL = dict(
    channel_mult=[1, 1, 1, 1], num_resolutions=4, dropout=0.0, hidden_channels=32, num_channels=3, num_res_blocks=1,
    resolution=16, z_channels=32,
)  # fmt: skip


def reference_config(**vq_model) -> dict:
    """A reference-style config.json (OmegaConf dump) for a tiny single-stage VQ tokenizer."""
    vq = dict(
        quantize_mode="vq", codebook_size=16, token_size=6, use_l2_norm=False, commitment_cost=0.25,
        vit_enc_model_size="tiny", vit_dec_model_size="tiny", vit_enc_patch_size=8, vit_dec_patch_size=8,
        num_latent_tokens=4, finetune_decoder=False, is_legacy=False,
    )  # fmt: skip
    vq.update(vq_model)
    return {
        "experiment": {"output_dir": "x"},
        "model": {"vq_model": vq},
        "dataset": {"preprocessing": {"crop_size": 16}},
        "size_presets": SIZE_PRESETS,
    }


def to_reference_keys(state_dict: dict) -> dict:
    """Our block names -> the reference's nn.MultiheadAttention / open_clip names."""
    rules = [
        (r"\.norm1\.", ".ln_1."),
        (r"\.norm2\.", ".ln_2."),
        (r"\.attn\.qkv\.weight$", ".attn.in_proj_weight"),
        (r"\.attn\.qkv\.bias$", ".attn.in_proj_bias"),
        (r"\.attn\.proj\.", ".attn.out_proj."),
        (r"\.mlp\.fc1\.", ".mlp.c_fc."),
        (r"\.mlp\.fc2\.", ".mlp.c_proj."),
    ]
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        out[key] = value.clone()
    return out


def write_checkpoint(directory, model, config: dict | None, filename: str = "model.safetensors") -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    state_dict = model.state_dict()
    # MaskGIT-VQGAN keys are the reference's already; ViT tokenizers use other block names.
    state_dict = to_reference_keys(state_dict) if isinstance(model, TiTok) else dict(state_dict)
    if filename.endswith(".safetensors"):
        save_file(state_dict, str(directory / filename))
    else:
        torch.save(state_dict, directory / filename)
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))
    return state_dict


def assert_same_weights(model, reference_model):
    ours, theirs = model.state_dict(), reference_model.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_hf_cache"))


def test_load_directory_with_config_picks_the_class_by_keys(tmp_path):
    config = reference_config()
    titok = TiTok.from_reference_config(config)
    write_checkpoint(tmp_path / "titok", titok, config)
    loaded = load_pretrained(str(tmp_path / "titok"))
    assert type(loaded) is TiTok and not loaded.training
    assert_same_weights(loaded, titok)

    # The same config with a text-guided decoder's weights is a TA-TiTok checkpoint.
    ta_config = reference_config(text_context_length=3, text_embed_dim=8)
    tatitok = TATiTok.from_reference_config(ta_config)
    write_checkpoint(tmp_path / "tatitok", tatitok, ta_config)
    loaded = load_pretrained(str(tmp_path / "tatitok" / "model.safetensors"))
    assert type(loaded) is TATiTok
    assert_same_weights(loaded, tatitok)


def test_load_bin_and_lightning_style_pt_with_variant_and_overrides(tmp_path):
    overrides = dict(
        image_size=16, encoder_patch_size=8, decoder_patch_size=8, num_latent_tokens=4, token_size=6,
        encoder_width=32, encoder_depth=1, encoder_heads=2, decoder_width=32, decoder_depth=1, decoder_heads=2,
        codebook_size=16, num_proxy_codes=16, pixel_vqgan=TINY_PIXEL, pixel_codebook_size=16, pixel_codebook_dim=32,
    )  # fmt: skip
    model = TiTok(**{**get_spec("titok_b64").kwargs, **overrides})
    state_dict = write_checkpoint(tmp_path, model, None, filename="titok.bin")
    loaded = load_pretrained(str(tmp_path / "titok.bin"), variant="titok_b64", **overrides)
    assert_same_weights(loaded, model)
    assert loaded.finetune_decoder and not any(p.requires_grad for p in loaded.encoder.parameters())

    torch.save({"state_dict": state_dict, "epoch": 3}, tmp_path / "titok.pt")
    assert_same_weights(load_pretrained(str(tmp_path / "titok.pt"), variant="titok_b64", **overrides), model)


def test_load_without_config_or_variant_searches_the_registry(tmp_path):
    pixel = MaskGITVQGAN(**TINY_PIXEL, codebook_size=16)
    write_checkpoint(tmp_path, pixel, None, filename="vqgan.bin")
    loaded = load_pretrained(str(tmp_path / "vqgan.bin"), **TINY_PIXEL, codebook_size=16)
    assert type(loaded) is MaskGITVQGAN
    assert_same_weights(loaded, pixel)


def test_mismatched_checkpoint_names_the_keys(tmp_path):
    config = reference_config()
    model = TiTok.from_reference_config(config)
    state_dict = to_reference_keys(model.state_dict())
    state_dict.pop("decoder.ln_post.weight")
    state_dict["decoder.extra_head.weight"] = torch.zeros(3)
    state_dict["quantize.embedding.weight"] = torch.zeros(17, 6)
    save_file(state_dict, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatchError) as err:
        load_pretrained(str(tmp_path), variant="titok_bl64_vq8k")
    message = str(err.value)
    assert "decoder.ln_post.weight" in message and "decoder.extra_head.weight" in message
    assert "quantize.embedding.weight" in message
    with pytest.raises(CheckpointMismatchError, match="no registered model fits"):
        load_pretrained(str(tmp_path))


@pytest.mark.parametrize(
    "source, named, local",
    [
        ("titok_l32", ["yucornetto/tokenizer_titok_l32_imagenet", "config.json", "model.safetensors"], "<DIR>"),
        (
            "turkeyju/tokenizer_tatitok_bl32_vae",
            ["turkeyju/tokenizer_tatitok_bl32_vae", "config.json", "model.safetensors"],
            "<DIR>",
        ),
        # a folder is read by the Hugging Face file names: a file of another name is loaded by its own path
        (
            "maskgit_vqgan_f16_256",
            ["fun-research/TiTok", "maskgit-vqgan-imagenet-f16-256.bin"],
            "<DIR>/maskgit-vqgan-imagenet-f16-256.bin",
        ),
    ],
)
def test_offline_gives_one_clear_error(offline, source, named, local):
    with pytest.raises(PretrainedNotAvailableError) as err:
        load_pretrained(source)
    message = str(err.value)
    for text in named:
        assert text in message
    repo = named[0]
    assert f"`{download_command(repo, named[1:])}`" in message and "HF_HUB_OFFLINE" in message
    assert f"add `--local-dir <DIR>` and load {local};" in message
    assert "\n" not in message
    assert err.value.__cause__ is None and (err.value.__context__ is None or err.value.__suppress_context__)


def test_unknown_source_lists_the_variants(tmp_path):
    with pytest.raises(PretrainedNotAvailableError, match="titok_l32"):
        load_pretrained(str(tmp_path / "missing.safetensors"))


def test_find_variant_ignores_mode_flags():
    kwargs = TiTok.kwargs_from_reference_config(
        {
            "model": {
                "vq_model": dict(
                    codebook_size=4096,
                    token_size=12,
                    use_l2_norm=True,
                    commitment_cost=0.0,
                    vit_enc_model_size="base",
                    vit_dec_model_size="base",
                    vit_enc_patch_size=16,
                    vit_dec_patch_size=16,
                    num_latent_tokens=64,
                    finetune_decoder=False,
                )  # fmt: skip
            },
            "dataset": {"preprocessing": {"crop_size": 256}},
        }
    )
    assert find_variant(TiTok, kwargs) == ("titok_b64", {"finetune_decoder": False, "commitment_cost": 0.0})
    with pytest.raises(LookupError, match="num_latent_tokens"):
        find_variant(TiTok, {**kwargs, "num_latent_tokens": 48})
