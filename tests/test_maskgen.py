"""MaskGen-VQ / MaskGen-KL at tiny size: training step, diffusion loss, samplers, schedules, conversion."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from titok_lightning.convert import CheckpointMismatchError
from titok_lightning.lit.optim import build_adamw, uses_weight_decay
from titok_lightning.models.diffusion import GaussianDiffusion, cosine_betas, space_timesteps
from titok_lightning.models.maskgen import (
    DiffLoss,
    MaskGenKL,
    MaskGenVQ,
    interleaved_sin_cos_encoding,
    masking_ratio,
    sin_cos_encoding,
)
from titok_lightning.registry import create_model, get_spec, list_models

TEXT_DIM, TEXT_LEN, MICRO = 16, 5, 8
TINY = dict(embed_dim=32, depth=2, num_heads=2, text_embed_dim=TEXT_DIM, micro_condition_embed_dim=MICRO)
TINY_VQ = dict(TINY, codebook_size=32, num_tokens=8, num_classes=4)
TINY_KL = dict(TINY, token_size=4, num_tokens=8, diffloss_depth=2, diffloss_width=32, num_sampling_steps="8")


def text_features(batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=g), torch.randn(batch, 1, TEXT_DIM, generator=g)


def tiny_vq(**overrides) -> MaskGenVQ:
    torch.manual_seed(0)
    return create_model("maskgen_vq_l", **{**TINY_VQ, **overrides})


def tiny_kl(**overrides) -> MaskGenKL:
    torch.manual_seed(0)
    return create_model("maskgen_kl_l", **{**TINY_KL, **overrides})


def sharpened(model: torch.nn.Module) -> torch.nn.Module:
    """Larger random weights, so that outputs depend visibly on the text (std-0.02 and zero-initialised
    layers leave a tiny random model almost unconditional)."""
    torch.manual_seed(1)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model.eval()


def assert_every_parameter_has_a_gradient(model: torch.nn.Module) -> None:
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing}"
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradient for {bad}"


def test_official_variants_are_registered():
    names = set(list_models("generator"))
    assert {"maskgen_vq_l", "maskgen_vq_xl", "maskgen_kl_l", "maskgen_kl_xl"} <= names
    assert get_spec("maskgen_kl_xl").checkpoint == "turkeyju/generator_maskgen_kl_xl"
    assert get_spec("maskgen_vq_xl").kwargs["embed_dim"] == 1280


# ----------------------------------------------------------------------------------------------------
# Training forward / backward


@pytest.mark.parametrize("weight_tying", [True, False])
def test_vq_training_step_reaches_every_parameter(weight_tying):
    model = tiny_vq(weight_tying=weight_tying).train()
    tokens = torch.randint(0, 32, (3, 8))
    masked, mask = model.mask_tokens(tokens, generator=torch.Generator().manual_seed(1))
    assert mask.any(dim=1).all() and torch.equal(masked[mask], torch.full_like(masked[mask], model.mask_token_id))
    assert torch.equal(masked[~mask], tokens[~mask])
    condition, pooled = text_features(3)
    logits = model(masked, condition, pooled, aesthetic_score=torch.tensor([5.0, 6.0, 7.0]))
    assert logits.shape == (3, 8, 32)
    torch.nn.functional.cross_entropy(logits[mask], tokens[mask]).backward()
    assert_every_parameter_has_a_gradient(model)
    assert (model.lm_head is None) == weight_tying


def test_vq_tied_head_is_the_embedding_table():
    model = tiny_vq().eval()
    condition, pooled = text_features(2)
    ids = torch.randint(0, 33, (2, 8))
    context, cond = model.embed_condition(condition, pooled, 6.0)
    with torch.no_grad():
        hidden = model.transformer(model.embeddings(ids) + model.pos_embed, context, cond)
        torch.testing.assert_close(model.predict(ids, context, cond), hidden @ model.embeddings.weight[:32].T)
    assert "lm_head.weight" not in model.state_dict()


def test_vq_requires_an_aesthetic_score_when_micro_conditioned():
    model = tiny_vq()
    condition, pooled = text_features(2)
    with pytest.raises(ValueError, match="aesthetic_score"):
        model(torch.zeros(2, 8, dtype=torch.long), condition, pooled)
    plain = tiny_vq(micro_condition=False)
    assert plain(torch.zeros(2, 8, dtype=torch.long), condition, pooled).shape == (2, 8, 32)


def test_kl_training_step_reaches_every_parameter():
    model = tiny_kl().train()
    posterior = torch.randn(3, 2 * 4, 1, 8)
    latents = model.latents_from_posterior(posterior, generator=torch.Generator().manual_seed(0))
    assert latents.shape == (3, 8, 4)
    torch.testing.assert_close(
        model.tokens_from_latents(latents) * model.scale_factor, latents.transpose(1, 2)[:, :, None]
    )
    condition, pooled = text_features(3)
    loss, logs = model(latents, condition, pooled, torch.tensor([5.0, 6.0, 7.0]), torch.Generator().manual_seed(3))
    assert loss.ndim == 0 and torch.isfinite(loss) and torch.equal(logs["diff_loss"], loss.detach())
    loss.backward()
    assert_every_parameter_has_a_gradient(model)


def test_kl_random_mask_masks_the_same_count_in_every_row():
    model = tiny_kl()
    for seed in range(5):
        mask = model.random_mask(4, torch.device("cpu"), torch.Generator().manual_seed(seed))
        counts = mask.sum(dim=1)
        assert (counts >= 1).all() and (counts == counts[0]).all() and set(mask.unique().tolist()) <= {0.0, 1.0}


def test_kl_decoder_replaces_masked_latents_by_the_mask_token():
    model = tiny_kl().eval()
    condition, pooled = text_features(2)
    context, cond = model.embed_condition(condition, pooled, 6.0)
    latents = torch.randn(2, 8, 4)
    mask = torch.zeros(2, 8)
    mask[:, :3] = 1
    changed = latents.clone()
    changed[:, :3] = 100.0
    with torch.no_grad():
        torch.testing.assert_close(
            model.forward_decoder(latents, mask, context, cond), model.forward_decoder(changed, mask, context, cond)
        )
        assert not torch.allclose(
            model.forward_decoder(latents, mask * 0, context, cond),
            model.forward_decoder(changed, mask * 0, context, cond),
        )


# ----------------------------------------------------------------------------------------------------
# Gaussian diffusion


def test_cosine_schedule_matches_its_closed_form():
    betas = cosine_betas(1000)
    alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    expected = torch.tensor([alpha_bar((i + 1) / 1000) / alpha_bar(0) for i in range(1000)], dtype=torch.float64)
    cumprod = torch.cumprod(1 - betas, 0)
    torch.testing.assert_close(cumprod[:990], expected[:990], rtol=1e-9, atol=0)  # the last betas are clipped
    assert betas.max() <= 0.999


def test_respacing_keeps_the_original_noise_levels():
    assert space_timesteps(1000, "100")[:3] == [0, 10, 20] and space_timesteps(1000, "100")[-1] == 999
    assert len(space_timesteps(1000, "100")) == 100 and space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert len(space_timesteps(1000, "10,20")) == 30
    full, spaced = GaussianDiffusion.cosine(1000), GaussianDiffusion.cosine(1000, respacing="25")
    assert spaced.num_timesteps == 25
    torch.testing.assert_close(spaced.alphas_cumprod, full.alphas_cumprod[spaced.timestep_map], rtol=1e-9, atol=0)
    with pytest.raises(ValueError):
        space_timesteps(100, "200")


def test_training_loss_mse_term_is_the_noise_prediction_error():
    diffusion = GaussianDiffusion.cosine(1000)
    g = torch.Generator().manual_seed(0)
    x0, noise, eps = (torch.randn(16, 4, generator=g) for _ in range(3))
    t = torch.randint(0, 1000, (16,), generator=g)
    seen = {}

    def model_fn(x_t, ts):
        seen["x_t"], seen["t"] = x_t, ts
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)

    terms = diffusion.training_losses(model_fn, x0, t, noise=noise)
    alpha_bar = torch.cumprod(1 - cosine_betas(1000), 0)[t].float()[:, None]
    torch.testing.assert_close(seen["x_t"], alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise)
    assert torch.equal(seen["t"], t)
    torch.testing.assert_close(terms["mse"], (noise - eps).pow(2).mean(1))
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    assert (terms["vb"][t > 0] >= 0).all()


def test_vb_term_vanishes_for_the_true_posterior():
    """Predicting the true noise and the posterior variance (interpolation -1) gives the exact
    posterior: its KL is 0, while t = 0 keeps a positive decoder NLL."""
    diffusion = GaussianDiffusion.cosine(1000)
    x0, noise = torch.randn(8, 4).clamp(-0.9, 0.9), torch.randn(8, 4)
    t = torch.tensor([0, 1, 5, 50, 300, 600, 900, 999])
    terms = diffusion.training_losses(lambda x, ts: torch.cat([noise, -torch.ones_like(noise)], 1), x0, t, noise=noise)
    assert terms["mse"].abs().max() == 0
    assert terms["vb"][1:].abs().max() < 1e-3 and terms["vb"][0] > 0
    wrong = diffusion.training_losses(lambda x, ts: torch.cat([noise, torch.ones_like(noise)], 1), x0, t, noise=noise)
    assert (wrong["vb"][1:5] > 1e-6).all()  # late steps: posterior variance and beta nearly coincide


def test_diffusion_loss_decreases_when_trained():
    torch.manual_seed(0)
    head = DiffLoss(token_size=4, cond_dim=8, width=32, depth=2)
    g = torch.Generator().manual_seed(1)
    target, z = torch.randn(64, 4, generator=g), torch.randn(64, 8, generator=g)
    t, noise = torch.randint(0, 1000, (64,), generator=g), torch.randn(64, 4, generator=g)

    def fixed_loss():
        return head.train_diffusion.training_losses(lambda x, ts: head.net(x, ts, z), target, t, noise=noise)["loss"]

    before = fixed_loss().mean().item()
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
    for step in range(40):
        optimizer.zero_grad()
        head(target, z, generator=torch.Generator().manual_seed(step)).backward()
        optimizer.step()
    assert fixed_loss().mean().item() < 0.8 * before


def test_diffusion_loss_mask_weights_tokens():
    head = DiffLoss(token_size=4, cond_dim=8, width=16, depth=1)
    target, z = torch.randn(6, 4), torch.randn(6, 8)
    mask = torch.tensor([1.0, 0, 0, 1, 0, 0])
    g = torch.Generator().manual_seed(4)  # same draws as DiffLoss.forward: timesteps, then noise
    t = torch.randint(0, 1000, (6,), generator=g)
    per_token = head.train_diffusion.training_losses(lambda x, ts: head.net(x, ts, z), target, t, generator=g)["loss"]
    masked = head(target, z, mask, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(masked, per_token[[0, 3]].mean())


# ----------------------------------------------------------------------------------------------------
# Samplers


def test_vq_generate_is_seeded_and_in_range():
    model = tiny_vq().eval()
    condition, pooled = text_features(3)
    null_condition, null_pooled = text_features(1, seed=9)
    kwargs = dict(null_condition=null_condition, null_condition_pooled=null_pooled, num_steps=4)
    ids = model.generate(condition, pooled, generator=7, **kwargs)
    assert ids.shape == (3, 8) and ids.dtype == torch.long
    assert ((ids >= 0) & (ids < 32)).all()
    assert torch.equal(ids, model.generate(condition, pooled, generator=torch.Generator().manual_seed(7), **kwargs))
    assert not torch.equal(ids, model.generate(condition, pooled, generator=8, **kwargs))


@pytest.mark.parametrize("num_steps", [1, 3, 12])
def test_vq_generate_fills_every_token(num_steps):
    model = tiny_vq().eval()
    condition, pooled = text_features(2)
    ids = model.generate(condition, pooled, guidance_decay="none", guidance_scale=0.0, num_steps=num_steps, generator=0)
    assert (ids != model.mask_token_id).all()


def test_vq_guidance_scale_zero_is_unguided():
    """With the constant schedule at scale 0 the logits are the conditional ones: the null condition
    is never used."""
    model = sharpened(tiny_vq())
    condition, pooled = text_features(2)
    kwargs = dict(guidance_decay="none", guidance_scale=0.0, num_steps=4)
    plain = model.generate(condition, pooled, generator=3, **kwargs)
    null_a, null_b = text_features(1, seed=1), text_features(1, seed=2)
    assert torch.equal(plain, model.generate(condition, pooled, *null_a, generator=3, **kwargs))
    assert torch.equal(plain, model.generate(condition, pooled, *null_b, generator=3, **kwargs))
    guided = dict(kwargs, guidance_scale=30.0)
    assert not torch.equal(
        model.generate(condition, pooled, *null_a, generator=3, **guided),
        model.generate(condition, pooled, *null_b, generator=3, **guided),
    )
    with pytest.raises(ValueError, match="null_condition"):
        model.generate(condition, pooled, generator=3, **guided)


def test_vq_guidance_schedules():
    model = tiny_vq()
    for decay in ("linear", "cosine"):
        assert model.guidance_scale_at(1.0, 5.0, decay) == pytest.approx(5.0)
        assert model.guidance_scale_at(0.0, 5.0, decay) == pytest.approx(1.0)
    assert model.guidance_scale_at(0.3, 5.0, "none") == 5.0
    assert model.guidance_scale_at(0.0, 5.0, "flippedcosine") == pytest.approx(3.0)
    assert model.guidance_scale_at(1.0, 5.0, "flippedcosine") == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        model.guidance_scale_at(0.5, 5.0, "exp")


def test_kl_generate_is_seeded_and_shaped_for_the_tokenizer():
    model = tiny_kl().eval()
    condition, pooled = text_features(2)
    null_condition, null_pooled = text_features(1, seed=9)
    kwargs = dict(null_condition=null_condition, null_condition_pooled=null_pooled, num_steps=3)
    tokens = model.generate(condition, pooled, generator=5, **kwargs)
    assert tokens.shape == (2, 4, 1, 8) and torch.isfinite(tokens).all()
    assert torch.equal(tokens, model.generate(condition, pooled, generator=5, **kwargs))
    assert not torch.equal(tokens, model.generate(condition, pooled, generator=6, **kwargs))
    # guidance 1 runs without the null condition; more steps than tokens still decide every token once
    unguided = model.generate(condition, pooled, guidance_scale=1.0, num_steps=12, generator=5)
    assert unguided.shape == (2, 4, 1, 8) and torch.isfinite(unguided).all()
    with pytest.raises(ValueError, match="null_condition"):
        model.generate(condition, pooled, guidance_scale=2.0, generator=5)


def test_diffloss_guidance_scale_one_equals_unguided_sampling():
    torch.manual_seed(0)
    head = DiffLoss(token_size=4, cond_dim=8, width=16, depth=2, num_sampling_steps="10")
    for p in head.parameters():  # the zero-initialised output layers would make every sample pure noise
        torch.nn.init.normal_(p, std=0.2)
    z, z_null = torch.randn(5, 8), torch.randn(5, 8)
    plain = head.sample(z, temperature=0.9, generator=torch.Generator().manual_seed(1))
    same = head.sample(z, 0.9, guidance_scale=1.0, z_null=z_null, generator=torch.Generator().manual_seed(1))
    # equal up to rounding: the guided call runs the conditional and null halves as one batch of 10 (another matmul
    # blocking than 5), whose last-bit differences 10 denoising steps carry to samples of magnitude ~300
    torch.testing.assert_close(same, plain, rtol=1e-4, atol=1e-4)
    guided = head.sample(z, 0.9, guidance_scale=4.0, z_null=z_null, generator=torch.Generator().manual_seed(1))
    assert (guided - plain).abs().max() > 1e-2 * plain.abs().max()  # guidance is far above that rounding


# ----------------------------------------------------------------------------------------------------
# Schedules, encodings, conversion


@pytest.mark.parametrize("mode", ["arccos", "cosine", "linear", "root", "square"])
def test_masking_schedules_run_from_one_to_zero(mode):
    assert masking_ratio(0.0, mode) == pytest.approx(1.0) and masking_ratio(1.0, mode) == pytest.approx(0.0, abs=1e-7)
    grid = torch.linspace(0, 1, 11, dtype=torch.float64)
    values = masking_ratio(grid, mode)
    assert (values[1:] < values[:-1]).all()
    torch.testing.assert_close(values, torch.tensor([masking_ratio(float(r), mode) for r in grid], dtype=torch.float64))


def test_unknown_masking_schedule_is_an_error():
    with pytest.raises(ValueError, match="masking schedule"):
        masking_ratio(0.5, "exp")
    with pytest.raises(ValueError):
        MaskGenVQ(mask_schedule="exp", **TINY_VQ)


def test_micro_condition_encodings():
    x = torch.tensor([0.0, 550.0, 712.5])
    i = torch.arange(4, dtype=torch.float64)
    args = x.double()[:, None] * 1000.0 ** (-i / 4)
    torch.testing.assert_close(
        sin_cos_encoding(x, 8).double(), torch.cat([args.sin(), args.cos()], 1), atol=1e-4, rtol=0
    )
    args = x.double()[:, None] * 10000.0 ** (-2 * i / 8)
    interleaved = torch.stack([args.sin(), args.cos()], -1).flatten(1)
    torch.testing.assert_close(interleaved_sin_cos_encoding(x, 8).double(), interleaved, atol=1e-4, rtol=0)
    assert sin_cos_encoding(x, 7).shape == (3, 7) and (sin_cos_encoding(x, 7)[:, -1] == 0).all()


def test_tied_head_conversion():
    table = torch.randn(6, 4)
    convert = MaskGenVQ.convert_reference_state_dict
    assert set(convert({"embeddings.weight": table, "lm_head.weight": table.clone()})) == {"embeddings.weight"}
    assert torch.equal(convert({"lm_head.weight": table})["embeddings.weight"], table)
    with pytest.raises(CheckpointMismatchError, match="lm_head"):
        convert({"embeddings.weight": table, "lm_head.weight": table + 1})
    untied = convert({"embeddings.weight": table, "lm_head.weight": table[:3], "lm_head.bias": torch.zeros(3)})
    assert set(untied) == {"embeddings.weight", "lm_head.weight", "lm_head.bias"}


def test_from_reference_config():
    config = {
        "model": {
            "vq_model": {"quantize_mode": "vae", "token_size": 4, "num_latent_tokens": 8, "scale_factor": 0.5},
            "maskgen": dict(
                decoder_embed_dim=32, decoder_depth=3, decoder_num_heads=4, micro_condition=False,
                micro_condition_embed_dim=8, text_drop_prob=0.2,
            ),
        },
        "losses": {"diffloss_d": 1, "diffloss_w": 16},
    }  # fmt: skip
    model = MaskGenKL.from_reference_config(config)
    assert len(model.transformer.blocks) == 3 and model.transformer.blocks[-1].context_pre_only
    assert model.transformer.context_embed.in_features == 768 and model.transformer.pooled_embed.in_features == 768
    assert model.scale_factor == 0.5 and len(model.diffloss.net.res_blocks) == 1 and model.text_drop_prob == 0.2


def test_drop_condition_swaps_in_the_null_features():
    model = tiny_vq(text_drop_prob=0.5)
    condition, pooled = text_features(64)
    null_condition, null_pooled = text_features(1, seed=3)
    dropped, dropped_pooled = model.drop_condition(condition, pooled, null_condition, null_pooled, torch.Generator())
    is_null = (dropped == null_condition).flatten(1).all(1)
    assert torch.equal(is_null, (dropped_pooled == null_pooled).flatten(1).all(1))
    assert torch.equal(dropped[~is_null], condition[~is_null]) and 10 < int(is_null.sum()) < 54


def test_gradient_checkpointing_gives_the_same_gradients():
    tokens = torch.randint(0, 32, (2, 8))
    condition, pooled = text_features(2)
    grads = []
    for checkpointing in (False, True):
        model = tiny_vq(grad_checkpointing=checkpointing).train()
        model(tokens, condition, pooled, 6.0).logsumexp(-1).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("make", [tiny_vq, tiny_kl])
def test_weight_decay_follows_the_reference_rule_on_the_reference_names(make):
    # the reference decays cond_pooled_proj (VQ), text_emb and text_pooled_emb (KL): names without "embed", whereas
    # ours (transformer.*_embed) contain it
    model = make()
    _, decay = build_adamw(model, lr=1e-3, weight_decay=0.1).param_groups
    decayed = {id(p) for p in decay["params"]}
    seen, checked = set(), []
    # renamed keys keep their tensor objects; tensors the conversion splits or joins are not parameters there
    for name, tensor in type(model).to_reference_state_dict(model.state_dict(keep_vars=True)).items():
        if isinstance(tensor, nn.Parameter) and id(tensor) not in seen:  # a tied table: its first name, as the
            seen.add(id(tensor))  # reference's named_parameters()
            assert (id(tensor) in decayed) == uses_weight_decay(name, tensor), name
            checked.append(name)
    projections = ["text_embed_proj.weight", "cond_pooled_proj.weight"] if make is tiny_vq else ["text_emb.weight"]
    assert set(projections) <= set(checked) and len(checked) > 20
