"""Edge cases of the discriminator, the training losses, the perceptual loss and the LR schedule."""

from __future__ import annotations

import math
import urllib.error

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from titok_lightning.losses import (
    ARLoss,
    MLMLoss,
    PerceptualLoss,
    PretrainedWeightsUnavailableError,
    ReconstructionLoss,
    Stage1Loss,
)
from titok_lightning.models.discriminator import NLayerDiscriminator
from titok_lightning.models.quantizers import DiagonalGaussianDistribution
from titok_lightning.schedules import build_lr_scheduler, lr_lambda

B, H = 2, 32


class ConstantPerceptual(nn.Module):
    """Per-sample perceptual values that do not depend on the images (isolates the other terms)."""

    def __init__(self, values):
        super().__init__()
        self.register_buffer("values", torch.tensor(values))

    def forward(self, input, target):
        return self.values


class CallCounter:
    def __init__(self, module: nn.Module):
        self.calls = 0
        module.register_forward_hook(self)

    def __call__(self, module, args, output):
        self.calls += 1


def make_loss(**kwargs) -> ReconstructionLoss:
    torch.manual_seed(0)
    defaults = dict(
        reconstruction_loss="l1",
        perceptual_weight=0.5,
        discriminator_start=10,
        discriminator_factor=1.0,
        discriminator_weight=0.1,
        lecam_regularization_weight=0.01,
        lecam_ema_decay=0.9,
        discriminator=NLayerDiscriminator(hidden_channels=32, num_stages=1),
        perceptual_module=ConstantPerceptual([0.25, 0.75]),
    )
    defaults.update(kwargs)
    return ReconstructionLoss(**defaults)


def images(requires_grad: bool = False):
    gen = torch.Generator().manual_seed(1)
    inputs = torch.rand(B, 3, H, H, generator=gen)
    recon = torch.rand(B, 3, H, H, generator=gen).requires_grad_(requires_grad)
    return inputs, recon


def vq_extra():
    return {
        "quantizer_loss": torch.tensor(0.3),
        "commitment_loss": torch.tensor(0.2),
        "codebook_loss": torch.tensor(0.1),
    }


# ----------------------------------------------------------------------------------------------------------
# Discriminator
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 37])
@pytest.mark.parametrize("blur", [True, False])
def test_discriminator_shapes_and_gradients(size, blur):
    disc = NLayerDiscriminator(hidden_channels=32, num_stages=2, blur_resample=blur, blur_kernel_size=5)
    x = torch.rand(2, 3, size, size, requires_grad=True)
    logits = disc(x)
    assert logits.shape == (2, 1, 16, 16)
    logits.mean().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in disc.parameters())


def test_discriminator_blur_kernel_is_a_persistent_normalised_buffer():
    disc = NLayerDiscriminator(hidden_channels=32, num_stages=1, blur_kernel_size=3)
    kernel = disc.state_dict()["blocks.0.1.kernel"]
    assert kernel.shape == (1, 1, 3, 3)
    torch.testing.assert_close(kernel.sum(), torch.tensor(1.0))
    with pytest.raises(ValueError, match="blur_kernel_size"):
        NLayerDiscriminator(hidden_channels=32, blur_kernel_size=7)
    with pytest.raises(ValueError, match="multiple of 32"):
        NLayerDiscriminator(hidden_channels=48)


# ----------------------------------------------------------------------------------------------------------
# ReconstructionLoss: generator / discriminator modes, discriminator_start, LeCam
# ----------------------------------------------------------------------------------------------------------


def test_gan_is_off_and_discriminator_not_run_before_discriminator_start():
    loss = make_loss()
    counter = CallCounter(loss.discriminator)
    inputs, recon = images()
    total, logs = loss(inputs, recon, vq_extra(), global_step=9, mode="generator")
    assert counter.calls == 0
    assert logs["weighted_gan_loss"] == 0 and logs["discriminator_factor"] == 0
    expected = (inputs - recon).abs().mean() + 0.5 * 0.5 + 1.0 * 0.3  # l1 + perceptual + quantizer
    torch.testing.assert_close(total, expected)

    ema_before = loss.ema_real_logits_mean.clone()
    d_loss, d_logs = loss(inputs, recon, vq_extra(), global_step=9, mode="discriminator")
    assert counter.calls == 0 and d_loss == 0 and d_logs["lecam_loss"] == 0
    assert torch.equal(loss.ema_real_logits_mean, ema_before)
    assert not loss.should_train_discriminator(9) and loss.should_train_discriminator(10)


def test_generator_gan_term_from_discriminator_start_reaches_only_the_reconstructions():
    loss = make_loss()
    counter = CallCounter(loss.discriminator)
    inputs, recon = images(requires_grad=True)
    total, logs = loss(inputs, recon, vq_extra(), global_step=10, mode="generator")
    assert counter.calls == 1
    with torch.no_grad():
        gan = -loss.discriminator(recon).mean()
    counter.calls = 0
    torch.testing.assert_close(logs["gan_loss"], gan)
    torch.testing.assert_close(logs["weighted_gan_loss"], 0.1 * 1.0 * gan)
    expected = (inputs - recon).abs().mean() + 0.25 + 0.3 + 0.1 * gan
    torch.testing.assert_close(total, expected)
    assert all(not v.requires_grad for v in logs.values())

    total.backward()
    assert recon.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss.discriminator.parameters())
    assert all(p.requires_grad for p in loss.discriminator.parameters()), "generator step must not freeze D"


def test_discriminator_mode_hinge_lecam_and_ema_update_by_hand():
    loss = make_loss()
    loss.ema_real_logits_mean.fill_(0.4)
    loss.ema_fake_logits_mean.fill_(-0.3)
    inputs, recon = images(requires_grad=True)
    with torch.no_grad():
        real, fake = loss.discriminator(inputs), loss.discriminator(recon)
    real_mean, fake_mean = real.mean().item(), fake.mean().item()
    hinge = 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean()).item()
    lecam = max(real_mean - (-0.3), 0.0) ** 2 + max(0.4 - fake_mean, 0.0) ** 2

    d_loss, logs = loss(inputs, recon, vq_extra(), global_step=10, mode="discriminator")
    assert math.isclose(logs["lecam_loss"].item(), 0.01 * lecam, rel_tol=1e-5)
    assert math.isclose(d_loss.item(), hinge + 0.01 * lecam, rel_tol=1e-5)
    assert math.isclose(logs["logits_real"].item(), real_mean, rel_tol=1e-5, abs_tol=1e-7)
    # EMA buffers: decay * old + (1 - decay) * batch mean, decay 0.9.
    assert math.isclose(loss.ema_real_logits_mean.item(), 0.9 * 0.4 + 0.1 * real_mean, rel_tol=1e-5)
    assert math.isclose(loss.ema_fake_logits_mean.item(), 0.9 * -0.3 + 0.1 * fake_mean, rel_tol=1e-5)

    d_loss.backward()
    assert recon.grad is None, "the discriminator step must not reach the tokenizer"
    assert all(p.grad is not None for p in loss.discriminator.parameters())


def test_lecam_buffers_persist_in_the_state_dict():
    loss = make_loss()
    loss(*images(), vq_extra(), global_step=10, mode="discriminator")
    state = loss.state_dict()
    assert {"ema_real_logits_mean", "ema_fake_logits_mean"} <= set(state)
    resumed = make_loss()
    resumed.load_state_dict(state)
    assert torch.equal(resumed.ema_fake_logits_mean, loss.ema_fake_logits_mean)
    assert "ema_real_logits_mean" not in make_loss(lecam_regularization_weight=0.0).state_dict()


def test_vae_branch_divides_reconstruction_by_exp_logvar_and_adds_kl():
    loss = make_loss(quantize_mode="vae", reconstruction_loss="l2", kl_weight=0.01, logvar_init=math.log(2.0))
    assert not loss.logvar.requires_grad
    inputs, recon = images()
    params = torch.randn(B, 8, 1, 5, generator=torch.Generator().manual_seed(2))
    posterior = DiagonalGaussianDistribution(params)
    total, logs = loss(inputs, recon, posterior, global_step=0)
    mean, logvar = params[:, :4], params[:, 4:]
    kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum() / B
    torch.testing.assert_close(logs["reconstruction_loss"], (inputs - recon).pow(2).mean() / 2)
    torch.testing.assert_close(logs["kl_loss"], 0.01 * kl)
    torch.testing.assert_close(total, (inputs - recon).pow(2).mean() / 2 + 0.25 + 0.01 * kl)
    assert "quantizer_loss" not in logs


def test_loss_runs_in_fp32_under_autocast():
    loss = make_loss()
    inputs, recon = images()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, _ = loss(inputs.bfloat16(), recon.bfloat16(), vq_extra(), global_step=10)
        d_loss, _ = loss(inputs.bfloat16(), recon.bfloat16(), vq_extra(), global_step=10, mode="discriminator")
    assert total.dtype == torch.float32 and d_loss.dtype == torch.float32


def test_bad_arguments_are_rejected():
    loss = make_loss()
    with pytest.raises(ValueError, match="mode"):
        loss(*images(), vq_extra(), global_step=0, mode="critic")
    with pytest.raises(ValueError, match="differ"):
        loss(torch.rand(B, 3, 8, 8), torch.rand(B, 3, 16, 16), vq_extra(), global_step=0)
    with pytest.raises(ValueError, match="reconstruction_loss"):
        make_loss(reconstruction_loss="huber")
    with pytest.raises(ValueError, match="quantize_mode"):
        make_loss(quantize_mode="fsq")


def test_from_reference_config_reads_every_recipe_knob():
    # The `losses` section of the reference TA-TiTok VAE recipe (values as its YAML, strings included).
    config = {
        "model": {"vq_model": {"quantize_mode": "vae"}},
        "losses": {
            "discriminator_start": 200000,
            "quantizer_weight": 1.0,
            "discriminator_factor": 1.0,
            "discriminator_weight": 0.1,
            "perceptual_loss": "lpips-convnext_s-1.0-0.1",
            "perceptual_weight": 1.1,
            "reconstruction_loss": "l2",
            "reconstruction_weight": 1.0,
            "lecam_regularization_weight": 0.001,
            "kl_weight": "1e-6",
            "logvar_init": 0.0,
        },
    }
    loss = ReconstructionLoss.from_reference_config(
        config, perceptual_module=ConstantPerceptual([0.0, 0.0]), discriminator=nn.Identity()
    )
    assert loss.quantize_mode == "vae" and loss.kl_weight == 1e-6 and loss.discriminator_start == 200000
    assert loss.lecam_regularization_weight == 0.001 and loss.perceptual_weight == 1.1


# ----------------------------------------------------------------------------------------------------------
# Stage 1, MLM, AR
# ----------------------------------------------------------------------------------------------------------


def test_stage1_loss_takes_the_number_of_codes_from_the_logits():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(B, 7, 2, 3, generator=gen)
    codes = torch.randint(0, 7, (B, 2, 3), generator=gen)
    loss = Stage1Loss(quantizer_weight=0.5)
    total, logs = loss(codes, logits, vq_extra())
    log_probs = logits.log_softmax(dim=1)
    nll = -log_probs.gather(1, codes[:, None]).mean()
    torch.testing.assert_close(logs["reconstruction_loss"], nll)
    torch.testing.assert_close(total, nll + 0.5 * 0.3)
    torch.testing.assert_close(loss(codes.flatten(1), logits, vq_extra())[0], total)
    with pytest.raises(ValueError, match="logit positions"):
        loss(codes[:, :1], logits, vq_extra())


def test_mlm_loss_weights_and_masked_accuracy():
    logits = torch.full((1, 3, 4), -5.0)
    logits[0, 0, 1] = logits[0, 1, 2] = logits[0, 2, 0] = 5.0  # argmax: 1, 2, 0
    targets = torch.tensor([[1, 3, 0]])
    masked = torch.tensor([[True, True, False]])
    loss, logs = MLMLoss(label_smoothing=0.0, loss_weight_unmasked_token=0.5)(logits, targets, masked)
    per_token = F.cross_entropy(logits[0], targets[0], reduction="none")
    torch.testing.assert_close(loss, (per_token[0] + per_token[1] + 0.5 * per_token[2]) / 2.5)
    torch.testing.assert_close(logs["correct_tokens"], torch.tensor(0.5))  # the unmasked hit does not count
    _, logs = MLMLoss()(logits, targets, torch.zeros_like(masked))
    assert logs["correct_tokens"] == 0


def test_ar_loss_drops_the_last_position():
    logits = torch.randn(B, 5, 6)
    labels = logits[:, :-1].argmax(-1)
    loss, logs = ARLoss()(logits, labels)
    torch.testing.assert_close(loss, F.cross_entropy(logits[:, :-1].reshape(-1, 6), labels.flatten()))
    assert logs["correct_tokens"] == 1
    with pytest.raises(ValueError, match="N\\+1"):
        ARLoss()(logits[:, :-1], labels)


# ----------------------------------------------------------------------------------------------------------
# Perceptual loss
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def perceptual() -> PerceptualLoss:
    torch.manual_seed(0)
    return PerceptualLoss("lpips-convnext_s-1.0-0.1", pretrained=False)


def test_perceptual_loss_builds_frozen_random_backbones_offline(perceptual):
    assert isinstance(perceptual.convnext, torchvision.models.ConvNeXt)
    perceptual.train()
    assert not perceptual.training and not perceptual.convnext.training and not perceptual.lpips.training
    assert not any(p.requires_grad for p in perceptual.parameters())
    with torch.no_grad():
        loss = perceptual(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16))
    assert loss.shape == (1,) and torch.isfinite(loss).all() and (loss > 0).all()


def test_perceptual_loss_weights_lpips_and_convnext_terms(perceptual, monkeypatch):
    # A tiny stand-in for ConvNeXt-S keeps the check fast; it still sees the 224 resize and normalisation.
    torch.manual_seed(0)
    tiny = nn.Sequential(nn.Conv2d(3, 2, 56, stride=56), nn.Flatten()).requires_grad_(False)
    monkeypatch.setattr(perceptual, "convnext", tiny)
    x, y = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16, requires_grad=True)
    loss = perceptual(x, y)
    loss.sum().backward()
    assert y.grad.abs().sum() > 0

    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def logits(images):
        images = F.interpolate(images, size=224, mode="bilinear", align_corners=False, antialias=True)
        return tiny((images - mean) / std)

    with torch.no_grad():
        lpips_value = perceptual.lpips(2 * x - 1, 2 * y - 1).flatten()
        convnext_value = (logits(x) - logits(y)).pow(2).mean(dim=1)
        torch.testing.assert_close(loss, (lpips_value + 0.1 * convnext_value) / 1.1)
        torch.testing.assert_close(perceptual(x, x), torch.zeros(2), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name, needed", [("convnext_s", "convnext_small"), ("lpips", "vgg16")])
def test_perceptual_loss_offline_pretrained_request_names_what_to_download(monkeypatch, tmp_path, name, needed):
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError(f"no network for {url}")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty cache
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(PretrainedWeightsUnavailableError, match=needed) as info:
        PerceptualLoss(name, pretrained=True)
    assert "IMAGENET1K_V1" in str(info.value) and str(tmp_path / "checkpoints") in str(info.value)


def test_perceptual_loss_rejects_unknown_names():
    with pytest.raises(ValueError, match="unsupported perceptual loss"):
        PerceptualLoss("vgg", pretrained=False)


# ----------------------------------------------------------------------------------------------------------
# LR schedule
# ----------------------------------------------------------------------------------------------------------


def test_cosine_schedule_end_points_and_unclamped_tail():
    kw = dict(name="cosine", warmup_steps=10, total_steps=110, base_lr=1e-4, end_lr=1e-5)
    assert lr_lambda(0, **kw) == 0.0
    assert lr_lambda(5, **kw) == 0.5
    assert lr_lambda(10, **kw) == 1.0
    assert math.isclose(lr_lambda(60, **kw), (1e-5 + 9e-5 * 0.5) / 1e-4)
    assert math.isclose(lr_lambda(110, **kw), 0.1)
    # Not clamped past the end: one more decay length later the cosine is back at the top.
    assert math.isclose(lr_lambda(210, **kw), 1.0)


def test_constant_schedule_and_lambda_lr_integration():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2e-4)
    scheduler = build_lr_scheduler(optimizer, name="constant", warmup_steps=4, total_steps=100)
    rates = []
    for _ in range(7):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([0.0, 5e-5, 1e-4, 1.5e-4, 2e-4, 2e-4, 2e-4], rel=1e-12, abs=0)
    with pytest.raises(ValueError, match="unknown lr schedule"):
        build_lr_scheduler(optimizer, name="linear")
