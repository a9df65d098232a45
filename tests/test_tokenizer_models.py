"""Every tokenizer variant at tiny size: forward, backward, gradients, shape contracts; quantizer and
posterior math against independent computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from titok_lightning.models.maskgit_vqgan import MaskGITVQGAN
from titok_lightning.models.quantizers import DiagonalGaussianDistribution, VectorQuantizer
from titok_lightning.models.titok import TATiTok, TiTok, load_stage2_init
from titok_lightning.registry import create_model, get_spec, list_models

IMAGE, PATCH, TOKENS, TEXT_LEN, TEXT_DIM = 32, 8, 6, 5, 12
# 4 resolutions: the pixel decoder upsamples the 4x4 patch grid by 8 = PATCH.
TINY_PIXEL_VQGAN = dict(
    channel_mult=(1, 1, 1, 2),
    num_resolutions=4,
    dropout=0.0,
    hidden_channels=32,
    num_channels=3,
    num_res_blocks=1,
    resolution=IMAGE,
    z_channels=32,
)
TINY_VIT = dict(
    image_size=IMAGE,
    encoder_patch_size=PATCH,
    decoder_patch_size=PATCH,
    num_latent_tokens=TOKENS,
    encoder_width=32,
    encoder_depth=1,
    encoder_heads=2,
    decoder_width=40,
    decoder_depth=2,
    decoder_heads=4,
)
TOKENIZERS = list_models("tokenizer")


def tiny_overrides(name: str) -> dict:
    spec = get_spec(name)
    if spec.model_cls is MaskGITVQGAN:
        return {**TINY_PIXEL_VQGAN, "codebook_size": 16}
    overrides = dict(TINY_VIT, token_size=4 if spec.kwargs.get("quantize_mode") == "vae" else 6)
    if spec.kwargs.get("quantize_mode", "vq") == "vq":
        overrides["codebook_size"] = 16
    if spec.kwargs.get("is_legacy", True):
        overrides["num_proxy_codes"] = 16
    if spec.kwargs.get("finetune_decoder"):
        overrides.update(pixel_vqgan=TINY_PIXEL_VQGAN, pixel_codebook_size=16, pixel_codebook_dim=32)
    if spec.model_cls is TATiTok:
        overrides.update(text_context_length=TEXT_LEN, text_embed_dim=TEXT_DIM)
    return overrides


def tiny(name: str, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name, **{**tiny_overrides(name), **extra})


def decode_args(model) -> tuple:
    return (torch.randn(2, TEXT_LEN, TEXT_DIM),) if isinstance(model, TATiTok) else ()


def test_registry_lists_every_official_tokenizer():
    expected = {
        "titok_l32": "yucornetto/tokenizer_titok_l32_imagenet",
        "titok_b64": "yucornetto/tokenizer_titok_b64_imagenet",
        "titok_s128": "yucornetto/tokenizer_titok_s128_imagenet",
        "titok_bl64_vq8k": "yucornetto/tokenizer_titok_bl64_vq8k_imagenet",
        "titok_bl128_vq8k": "yucornetto/tokenizer_titok_bl128_vq8k_imagenet",
        "titok_sl256_vq8k": "yucornetto/tokenizer_titok_sl256_vq8k_imagenet",
        "titok_ll32_vae_c16": "yucornetto/tokenizer_titok_ll32_vae_c16_imagenet",
        "titok_bl64_vae_c16": "yucornetto/tokenizer_titok_bl64_vae_c16_imagenet",
        "titok_bl128_vae_c16": "yucornetto/tokenizer_titok_bl128_vae_c16_imagenet",
        "tatitok_bl32_vq": "turkeyju/tokenizer_tatitok_bl32_vq",
        "tatitok_bl64_vq": "turkeyju/tokenizer_tatitok_bl64_vq",
        "tatitok_bl128_vq": "turkeyju/tokenizer_tatitok_bl128_vq",
        "tatitok_bl32_vae": "turkeyju/tokenizer_tatitok_bl32_vae",
        "tatitok_bl64_vae": "turkeyju/tokenizer_tatitok_bl64_vae",
        "tatitok_sl128_vae": "turkeyju/tokenizer_tatitok_sl128_vae",
    }
    assert set(expected) <= set(TOKENIZERS)
    for name, checkpoint in expected.items():
        assert get_spec(name).checkpoint == checkpoint
    assert get_spec("maskgit_vqgan_f16_256").family == "pixel_tokenizer"
    # The official TiTok-L/B/S releases are stage-2 models.
    assert all(get_spec(n).kwargs["finetune_decoder"] for n in ("titok_l32", "titok_b64", "titok_s128"))


@pytest.mark.parametrize("name", TOKENIZERS)
def test_tokenizer_forward_backward(name: str):
    model = tiny(name).train()
    spec = get_spec(name)
    pixels = torch.rand(2, 3, IMAGE, IMAGE)
    extra = decode_args(model)
    out, info = model(pixels, *extra)

    stage1_legacy = spec.kwargs.get("is_legacy", True) and not spec.kwargs.get("finetune_decoder")
    assert out.shape == ((2, 16, IMAGE // PATCH, IMAGE // PATCH) if stage1_legacy else (2, 3, IMAGE, IMAGE))
    if model.quantize_mode == "vq":
        loss = out.square().mean() + info["quantizer_loss"]
    else:
        loss = out.square().mean() + info.kl().mean()
    assert torch.isfinite(loss)
    loss.backward()

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for n, p in model.named_parameters():
        if n in trainable:
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}: no gradient for {n}"
        else:
            assert p.grad is None, f"{name}: frozen {n} got a gradient"
    if spec.kwargs.get("finetune_decoder"):
        frozen = {n for n, _ in model.named_parameters()} - trainable
        assert frozen == {n for n, _ in model.named_parameters() if n.startswith(("encoder.", "quantize.", "latent"))}
        assert not model.encoder.training and not model.quantize.training and model.decoder.training
        assert all(float(info[k]) == 0.0 for k in ("quantizer_loss", "commitment_loss", "codebook_loss"))


@pytest.mark.parametrize("name", TOKENIZERS)
def test_tokenizer_shape_contracts(name: str):
    model = tiny(name).eval()
    pixels = torch.rand(2, 3, IMAGE, IMAGE)
    extra = decode_args(model)
    with torch.no_grad():
        z, info = model.encode(pixels)
        assert z.shape == (2, model.token_size, 1, TOKENS)
        if model.quantize_mode == "vq":
            ids = info["min_encoding_indices"]
            assert ids.shape == (2, 1, TOKENS) and ids.dtype == torch.long
            # The straight-through value equals the looked-up codes, so both decode paths agree.
            torch.testing.assert_close(model.decode_tokens(ids, *extra), model.decode(z, *extra))
            torch.testing.assert_close(model.decode_tokens(ids[:, 0], *extra), model.decode(z, *extra))
            with pytest.raises(TypeError):
                model.decode_tokens(ids.float(), *extra)
        else:
            assert isinstance(info, DiagonalGaussianDistribution)
            torch.testing.assert_close(model.decode_tokens(info.mean, *extra), model.decode(info.mean, *extra))
        with pytest.raises(ValueError):
            model.decode(z[..., :-1], *extra)


def test_maskgit_vqgan_contracts():
    model = create_model("maskgit_vqgan_f16_256", **tiny_overrides("maskgit_vqgan_f16_256"))
    assert not any(p.requires_grad for p in model.parameters())
    model.train()
    assert not model.training  # a frozen teacher stays in eval mode
    images = torch.rand(2, 3, IMAGE, IMAGE)
    codes = model.encode(images)
    assert codes.shape == (2, IMAGE // 8, IMAGE // 8) and codes.dtype == torch.long
    # Independent nearest-neighbour search over the encoder features.
    feats = model.encoder(images).permute(0, 2, 3, 1).reshape(-1, 32)
    expected = torch.cdist(feats, model.quantize.embedding.weight).argmin(dim=1)
    assert torch.equal(codes.flatten(), expected)
    recon = model.decode(codes)
    assert recon.shape == images.shape and recon.min() >= 0 and recon.max() <= 1
    assert torch.equal(model.decode(codes.flatten(1)), recon)
    one_hot = F.one_hot(codes, 16).permute(0, 3, 1, 2).float()
    torch.testing.assert_close(model.decode_soft(one_hot).clamp(0, 1), recon)
    with pytest.raises(ValueError):
        model.decode(codes.flatten(1)[:, :-1])


def test_vector_quantizer_l2_output_rounds_like_the_reference():
    """The reference normalises a contiguous [B, H, W, C] copy; normalising the permuted view rounds 1 ulp
    differently for some shapes (here C=6, N=3), which a training trajectory amplifies (stage 2's pixel decoder)."""
    generator = torch.Generator().manual_seed(1)
    quantizer = VectorQuantizer(codebook_size=10, token_size=6, use_l2_norm=True)
    quantizer.embedding.weight.data.copy_(torch.randn(10, 6, generator=generator))
    z = torch.randn(4, 6, 1, 3, generator=generator)
    zq, info = quantizer(z)
    features = F.normalize(z.permute(0, 2, 3, 1).contiguous(), dim=-1)
    codes = F.normalize(quantizer.embedding.weight.detach()[info["min_encoding_indices"]], dim=-1)
    assert torch.equal(zq, (features + (codes - features)).permute(0, 3, 1, 2))


def test_vector_quantizer_straight_through_and_lookup():
    torch.manual_seed(0)
    for use_l2_norm in (False, True):
        quantizer = VectorQuantizer(codebook_size=10, token_size=5, commitment_cost=0.3, use_l2_norm=use_l2_norm)
        nn_weight = torch.randn(10, 5)
        quantizer.embedding.weight.data.copy_(nn_weight)
        z = torch.randn(3, 5, 1, 7, requires_grad=True)
        zq, info = quantizer(z)

        feats = z.detach().permute(0, 2, 3, 1).reshape(-1, 5)
        codes = nn_weight
        if use_l2_norm:
            feats, codes = F.normalize(feats, dim=-1), F.normalize(codes, dim=-1)
        expected_ids = torch.cdist(feats, codes).argmin(dim=1)
        assert torch.equal(info["min_encoding_indices"].flatten(), expected_ids)
        selected = codes[expected_ids]
        torch.testing.assert_close(zq.detach().permute(0, 2, 3, 1).reshape(-1, 5), selected)
        mse = (selected - feats).square().mean()
        torch.testing.assert_close(info["codebook_loss"], mse)
        torch.testing.assert_close(info["commitment_loss"], 0.3 * mse)
        torch.testing.assert_close(info["quantizer_loss"], 1.3 * mse)

        lookup = quantizer.get_codebook_entry(info["min_encoding_indices"])
        torch.testing.assert_close(lookup.permute(0, 3, 1, 2), zq.detach())
        soft = F.one_hot(expected_ids, 10).float()
        torch.testing.assert_close(quantizer.get_codebook_entry(soft), selected)

        # Straight-through: d zq / d z is the identity (through the normalisation when l2-normed).
        upstream = torch.randn_like(zq)
        (grad,) = torch.autograd.grad(zq, z, upstream)
        if use_l2_norm:
            (expected_grad,) = torch.autograd.grad(F.normalize(z, dim=1), z, upstream)
        else:
            expected_grad = upstream
        torch.testing.assert_close(grad, expected_grad)


def test_clustering_vq_revives_dead_codes():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(codebook_size=8, token_size=4, clustering_vq=True).train()
    assert "embed_prob" in quantizer.state_dict()
    before = quantizer.embedding.weight.detach().clone()
    z = torch.randn(2, 4, 1, 16, requires_grad=True)
    zq, info = quantizer(z)
    (zq.square().mean() + info["quantizer_loss"]).backward()
    used = torch.bincount(info["min_encoding_indices"].flatten(), minlength=8).float() / 32
    torch.testing.assert_close(quantizer.embed_prob, 0.01 * used)
    # Each code moves towards its nearest feature, by exp(-(p * K * 10) / 0.01 - 1e-3).
    feats = z.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    nearest = feats[torch.cdist(feats, before).argmin(dim=0)]
    step = torch.exp(-(quantizer.embed_prob * 8 * 10) / 0.01 - 1e-3)[:, None]
    torch.testing.assert_close(quantizer.embedding.weight.detach(), before * (1 - step) + nearest * step)
    assert quantizer.embedding.weight.grad is not None
    quantizer.eval()
    quantizer(z)
    torch.testing.assert_close(quantizer.embed_prob, 0.01 * used)  # no update in eval mode


def test_diagonal_gaussian_matches_hand_computation():
    torch.manual_seed(0)
    params = torch.randn(2, 6, 1, 5) * 3
    params[0, 3:, 0, 0] = 50.0  # clamped log-variance
    posterior = DiagonalGaussianDistribution(params)
    mean, logvar = params[:, :3], params[:, 3:].clamp(-30, 20)
    torch.testing.assert_close(posterior.mean, mean)
    torch.testing.assert_close(posterior.logvar, logvar)
    std = torch.exp(0.5 * logvar)
    torch.testing.assert_close(posterior.std, std)
    reference = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean.double(), std.double()), torch.distributions.Normal(0.0, 1.0)
    ).sum(dim=(1, 2))
    torch.testing.assert_close(posterior.kl(), reference.float(), rtol=1e-5, atol=1e-4)
    assert posterior.kl().shape == (2, 5)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(posterior.sample(torch.Generator().manual_seed(3)), mean + std * noise)
    assert torch.equal(posterior.mode(), mean)

    fixed = DiagonalGaussianDistribution(params, deterministic=True)
    assert torch.equal(fixed.sample(), fixed.mean)
    assert torch.equal(fixed.kl(), torch.zeros(2, 5))
    with pytest.raises(ValueError):
        DiagonalGaussianDistribution(torch.randn(2, 5, 1, 4))


def test_legacy_and_fixed_token_layouts_differ_only_in_the_reshape():
    legacy = tiny("titok_b64", finetune_decoder=False).eval()
    fixed = tiny("titok_b64", finetune_decoder=False, is_legacy=False).eval()
    fixed.encoder.load_state_dict(legacy.encoder.state_dict())
    encoder, latent_tokens = legacy.encoder, legacy.latent_tokens
    pixels = torch.rand(1, 3, IMAGE, IMAGE)
    with torch.no_grad():
        patches = torch.cat([encoder.class_embedding[None], encoder.patch_embed(pixels).flatten(2).mT], dim=1)
        latents = latent_tokens + encoder.latent_token_positional_embedding
        x = encoder.run_blocks(torch.cat([patches + encoder.positional_embedding, latents[None]], dim=1))
        tokens = encoder.ln_post(x[:, -TOKENS:])  # [1, N, W]
        weight, bias = encoder.conv_out.weight[:, :, 0, 0], encoder.conv_out.bias
        # Fixed layout: the 1x1 conv acts on each token; legacy: on the [N, W] memory read as [W, N].
        per_token = tokens[0] @ weight.T + bias
        width_major = tokens.reshape(32, TOKENS).T @ weight.T + bias
        torch.testing.assert_close(fixed.encoder(pixels, latent_tokens)[0, :, 0].T, per_token)
        torch.testing.assert_close(encoder(pixels, latent_tokens)[0, :, 0].T, width_major)


def test_stage2_initialisation_from_stage1_and_pixel_tokenizer():
    stage1 = tiny("titok_b64", finetune_decoder=False)
    pixel_tokenizer = create_model("maskgit_vqgan_f16_256", **{**TINY_PIXEL_VQGAN, "codebook_size": 16})
    stage2 = tiny("titok_b64")
    load_stage2_init(stage2, stage1.state_dict(), pixel_tokenizer.state_dict())
    for key, value in stage1.state_dict().items():
        assert torch.equal(stage2.state_dict()[key], value), key
    assert torch.equal(stage2.pixel_quantize.embedding.weight, pixel_tokenizer.quantize.embedding.weight)
    assert torch.equal(stage2.pixel_decoder.conv_out.weight, pixel_tokenizer.decoder.conv_out.weight)
    # Stage-2 images equal the VQGAN decoding the softmax-mixed codes of the stage-1 proxy logits.
    pixels = torch.rand(1, 3, IMAGE, IMAGE)
    with torch.no_grad():
        z, _ = stage1.encode(pixels)
        expected = pixel_tokenizer.decode_soft(stage1.decode(z).softmax(dim=1))
        torch.testing.assert_close(stage2(pixels)[0], expected)


def test_stage2_pixel_decoder_may_upsample_the_grid_to_another_size():
    """The reference builds stage-2 models whose pixel decoder upsamples the decoder grid to another size than the
    input images (parity fixtures may hold one); stage-2 training, which compares with the inputs, refuses them."""
    import hydra

    from tests.test_configs import compose_train
    from tests.test_train import tiny_overrides

    # 3 resolutions upsample the 4x4 grid of the 8-pixel patches by 4: 16px images from 32px inputs
    pixel_vqgan = {**TINY_PIXEL_VQGAN, "channel_mult": (1, 1, 2), "num_resolutions": 3}
    model = tiny("titok_b64", pixel_vqgan=pixel_vqgan).eval()
    with torch.no_grad():
        images, _ = model(torch.rand(2, 3, IMAGE, IMAGE))
    assert images.shape == (2, 3, 16, 16)

    # train.py's stage 2 with a 4-pixel decoder patch: the tiny teacher's 8x upsampling makes 64px images
    cfg = compose_train([*tiny_overrides("titok_s128_stage2"), "model.tokenizer.decoder_patch_size=4"])
    with pytest.raises(hydra.errors.InstantiationException, match="8x8 grid into 64px images, the inputs are 32px"):
        hydra.utils.instantiate(cfg.model)


def test_image_size_need_not_be_a_multiple_of_the_patch_size():
    """As in the reference, the patch stride leaves a remainder out: 36px inputs, 8px patches -> 32px images.
    Single-stage training, which compares them with the inputs, refuses such a model."""
    import hydra

    from tests.test_configs import compose_train
    from tests.test_train import tiny_overrides

    model = TiTok(**{**TINY_VIT, "image_size": 36}, is_legacy=False).eval()
    with torch.no_grad():
        images, _ = model(torch.rand(2, 3, 36, 36))
    assert images.shape == (2, 3, 32, 32) and model.output_size == 32

    cfg = compose_train([*tiny_overrides("demo"), "++model.tokenizer.image_size=36"])
    with pytest.raises(hydra.errors.InstantiationException, match="into 32px images, the inputs are 36px"):
        hydra.utils.instantiate(cfg.model)


def test_invalid_configurations_raise():
    with pytest.raises(ValueError):
        TiTok(**TINY_VIT, token_size=6, quantize_mode="vae", finetune_decoder=True)
    with pytest.raises(ValueError):
        TiTok(**TINY_VIT, token_size=6, quantize_mode="fsq")
    with pytest.raises(ValueError):
        TATiTok(**TINY_VIT, token_size=6, finetune_decoder=True)
    model = tiny("tatitok_bl32_vq").eval()
    with pytest.raises(ValueError):
        model.decode_tokens(torch.zeros(2, TOKENS, dtype=torch.long), torch.randn(2, TEXT_LEN + 1, TEXT_DIM))
