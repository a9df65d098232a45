"""AdamW parameter groups (the reference's weight-decay exclusions) and per-role schedules."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn as nn

from titok_lightning.lit.optim import (
    adamw_param_groups,
    build_adamw,
    build_scheduler,
    fused_adamw_applies,
    uses_weight_decay,
)
from titok_lightning.registry import create_model
from titok_lightning.schedules import build_lr_scheduler, lr_lambda


def test_weight_decay_groups_follow_the_reference_rule():
    model = create_model(
        "titok_bl64_vq8k",
        image_size=32,
        encoder_patch_size=8,
        decoder_patch_size=8,
        encoder_width=32,
        encoder_depth=1,
        encoder_heads=2,
        decoder_width=32,
        decoder_depth=1,
        decoder_heads=2,
        num_latent_tokens=4,
        token_size=4,
        codebook_size=16,
    )
    no_decay, decay = adamw_param_groups(model.named_parameters(), weight_decay=0.1)
    assert (no_decay["weight_decay"], decay["weight_decay"]) == (0.0, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    for name in ("latent_tokens", "decoder.mask_token", "encoder.positional_embedding", "quantize.embedding.weight"):
        assert name in no_decay_names, name
    assert "encoder.transformer.0.norm1.weight" in no_decay_names and "encoder.ln_pre.bias" in no_decay_names
    # substring rule, as the reference: the patch-embedding conv ("embed") is not decayed either
    assert "encoder.patch_embed.weight" in no_decay_names and "decoder.decoder_embed.weight" in no_decay_names
    assert (
        "encoder.transformer.0.attn.qkv.weight" in decay_names and "decoder.transformer.0.mlp.fc1.weight" in decay_names
    )
    assert all(p.ndim >= 2 for p in decay["params"])
    assert len(no_decay_names) + len(decay_names) == sum(1 for _ in model.parameters())


def test_frozen_parameters_are_left_out():
    layer = nn.Linear(3, 3)
    layer.bias.requires_grad_(False)
    optimizer = build_adamw(layer, lr=1e-3, betas=(0.9, 0.99), weight_decay=1e-4)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(params) == 1 and params[0] is layer.weight
    assert optimizer.defaults["betas"] == (0.9, 0.99)
    assert not uses_weight_decay("discriminator.blocks.0.norm.weight", torch.zeros(4, 4))


def test_discriminator_schedule_starts_at_its_own_step_with_the_model_shape():
    # the reference: discriminator lr follows the generator's base/end lr shape, over max_steps - start steps
    model_lr, disc_lr, end_lr, warmup, total = 1e-4, 2e-4, 1e-5, 5, 50
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(2, 2))], lr=disc_lr)
    schedule = build_scheduler(
        optimizer,
        total_steps=total + 7,
        start_step=7,
        name="cosine",
        warmup_steps=warmup,
        end_lr=end_lr,
        base_lr=model_lr,
    )
    rates = []
    for _ in range(total + 1):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    for step, rate in enumerate(rates):
        expected = disc_lr * lr_lambda(step, "cosine", warmup, total, model_lr, end_lr)
        assert math.isclose(rate, expected, rel_tol=1e-12)
    assert rates[0] == 0.0 and math.isclose(rates[warmup], disc_lr) and math.isclose(rates[-1], disc_lr * 0.1)


def test_schedules_count_as_the_reference_on_as_many_processes():
    # the reference (accelerate) sizes its schedules in process-steps, max_steps x P (a discriminator's less its
    # start, unscaled) with warm-up x P, and steps them P times per optimizer step: replayed with a LambdaLR of one
    # process's schedule stepped P times
    processes, total, start, warmup = 4, 60, 20, 5
    for start_step in (0, start):
        ours_opt, reference_opt = (torch.optim.AdamW([nn.Parameter(torch.zeros(2))], lr=2e-4) for _ in range(2))
        settings = {"name": "cosine", "end_lr": 1e-5, "base_lr": 1e-4}
        ours = build_scheduler(
            ours_opt, total_steps=total, start_step=start_step, processes=processes, warmup_steps=warmup, **settings
        )
        reference = build_lr_scheduler(
            reference_opt, warmup_steps=warmup * processes, total_steps=total * processes - start_step, **settings
        )
        single = build_scheduler(
            torch.optim.AdamW([nn.Parameter(torch.zeros(2))], lr=2e-4),
            total_steps=total,
            start_step=start_step,
            warmup_steps=warmup,
            **settings,
        )
        for _ in range(total - start_step):
            assert ours_opt.param_groups[0]["lr"] == reference_opt.param_groups[0]["lr"]
            ours.step()
            single.step()
            for _ in range(processes):
                reference.step()
        if start_step == 0:  # from step 0 the process count cancels
            assert math.isclose(ours.get_last_lr()[0], single.get_last_lr()[0], rel_tol=1e-12)
        else:  # a discriminator's ends higher: its start is not scaled (one process ends at end_lr)
            assert math.isclose(single.get_last_lr()[0], 2e-4 * 0.1, rel_tol=1e-9)
            assert ours.get_last_lr()[0] > 2 * single.get_last_lr()[0]


def test_fused_adamw_for_cuda_parameters_also_under_a_grad_scaler(monkeypatch):
    import titok_lightning.lit.optim as optim

    monkeypatch.setattr(optim, "is_sharded", lambda tensor: getattr(tensor, "sharded", False))
    cuda_param = SimpleNamespace(is_cuda=True)  # the decision reads only the device (and sharding)
    cpu_param = torch.zeros(2, requires_grad=True)
    for precision in ("bf16-mixed", "32-true", "bf16-true", "16-true", "16-mixed"):
        assert fused_adamw_applies([cuda_param, cuda_param], precision), precision
        assert not fused_adamw_applies([cuda_param, cpu_param], precision), precision
    sharded = SimpleNamespace(is_cuda=True, sharded=True)
    assert not fused_adamw_applies([sharded], "16-mixed")  # FSDP under a GradScaler: multi-tensor path
    assert fused_adamw_applies([sharded], "bf16-mixed")
    assert not fused_adamw_applies([cuda_param], None)
    assert not fused_adamw_applies([], "bf16-mixed")


def test_build_adamw_keeps_cpu_parameters_unfused():
    optimizer = build_adamw(nn.Linear(4, 4), lr=1e-3, precision="bf16-mixed")
    assert optimizer.defaults["fused"] is False


def test_fsdp_sharded_and_replicated_parameters_get_separate_groups(monkeypatch):
    # fused / multi-tensor AdamW kernels reject a list mixing DTensors and plain tensors: stand-in "sharded" = 2-D
    import titok_lightning.lit.optim as optim

    monkeypatch.setattr(optim, "is_sharded", lambda tensor: tensor.dim() == 2)
    module = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    optimizer = optim.build_adamw(module, lr=1e-3, weight_decay=0.05)
    kinds = [{p.dim() == 2 for p in group["params"]} for group in optimizer.param_groups]
    assert all(len(kind) == 1 for kind in kinds)  # one kind per group
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    assert decay_of[id(module[0].weight)] == 0.05 and decay_of[id(module[0].bias)] == 0.0
    assert sum(len(group["params"]) for group in optimizer.param_groups) == len(list(module.parameters()))
