"""Training through train.py on CPU with tiny models: fast_dev_run of every experiment, stage 1 -> stage 2 hand-over,
exact resume, DDP agreement, non-finite policy, gradient accumulation, multirun sweep."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import hydra
import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from tests.test_configs import CONF, EXPERIMENTS, ROOT, compose_train, needs_fsdp2
from titok_lightning.lit.base import NonFiniteLossError
from titok_lightning.loading import build_model, load_model_state_dict, load_pretrained
from titok_lightning.overrides import set_overrides
from titok_lightning.schedules import lr_lambda
from train import instantiate_datamodule, train

TINY_VIT = {
    "image_size": 32,
    "encoder_patch_size": 8,
    "decoder_patch_size": 8,
    "encoder_width": 32,
    "encoder_depth": 1,
    "encoder_heads": 2,
    "decoder_width": 32,
    "decoder_depth": 1,
    "decoder_heads": 2,
    "num_latent_tokens": 4,
    "token_size": 4,
    "codebook_size": 16,
}
# a 4-level MaskGIT-VQGAN: 32px images -> 4x4 codes, matching an 8-pixel TiTok patch
TINY_VQGAN = {
    "hidden_channels": 32,
    "channel_mult": [1, 1, 1, 1],
    "num_resolutions": 4,
    "num_res_blocks": 1,
    "z_channels": 8,
    "resolution": 32,
    "codebook_size": 16,
}
TINY_PIXEL = {"num_proxy_codes": 16, "pixel_codebook_size": 16, "pixel_codebook_dim": 8}
DIGIT_NAMES = "[zero,one,two,three,four,five,six,seven,eight,nine]"


def tiny_overrides(experiment: str, perceptual: bool = False) -> list[str]:
    """Shrink an experiment to seconds on a CPU: tiny model, digits data, batch 4, random frozen networks."""
    overrides = [
        f"experiment={experiment}",
        "data=digits",
        "data.batch_size=4",
        "data.val_batch_size=4",
        "logger=csv",
        "trainer=cpu",
        "trainer.precision=32-true",
        *set_overrides("model.tokenizer", TINY_VIT),
    ]
    model_target = OmegaConf.load(CONF / "model" / f"{_model_group(experiment)}.yaml")._target_
    if model_target.endswith(("Stage1Module", "Stage2Module")):
        overrides += ["model.teacher.pretrained=null", *set_overrides("model.teacher", TINY_VQGAN)]
        overrides += set_overrides("model.tokenizer", TINY_PIXEL)
    if model_target.endswith("Stage2Module"):
        overrides += ["model.init_from=null", *set_overrides("model.tokenizer.pixel_vqgan", _pixel_conf())]
    if model_target.endswith(("Stage2Module", "TATiTokModule", "PixelTokenizerModule")):
        overrides += ["++model.discriminator.hidden_channels=32", "++model.discriminator.num_stages=1"]
        overrides += ["model.loss.perceptual_pretrained=false"] if perceptual else ["model.loss.perceptual_loss=null"]
    if model_target.endswith("TATiTokModule"):
        overrides += [
            "model.text_encoder.pretrained=null",
            *set_overrides("model.text_encoder.text_cfg", {"width": 32, "heads": 2, "layers": 1}),
            "++model.tokenizer.text_embed_dim=32",
            f"model.class_names={DIGIT_NAMES}",
        ]
    return overrides


def _pixel_conf() -> dict:
    return {k: v for k, v in TINY_VQGAN.items() if k != "codebook_size"}


def _model_group(experiment: str) -> str:
    defaults = OmegaConf.load(CONF / "experiment" / f"{experiment}.yaml").get("defaults", [])
    for entry in defaults:
        if isinstance(entry, str):  # inherits another experiment
            return _model_group(entry)
        if "override /model" in entry:
            return entry["override /model"]
    raise AssertionError(f"{experiment} selects no model")


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory) -> str:
    """Digits shards written once per session (outside the user's cache)."""
    from datamodules.digits import prepare_digits

    folder = str(tmp_path_factory.mktemp("digits"))
    prepare_digits(folder)
    return folder


def run(overrides: list[str], out: Path, digits_cache: str):
    """Compose like the command line, then run train.train in-process; returns (cfg, metrics)."""
    cfg = compose_train([*overrides, f"data.cache_dir={digits_cache}"], out)
    return cfg, train(cfg)


# ----------------------------------------------------------------------------------------------- fast_dev_run
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_fast_dev_run(experiment, tmp_path, digits_cache):
    perceptual = experiment in ("titok_b64_stage2", "tatitok_bl32_vq")  # random ConvNeXt-S / LPIPS nets
    overrides = [*tiny_overrides(experiment, perceptual), "trainer.fast_dev_run=true"]
    overrides += ["callbacks.image_logger.every_n_steps=1"]  # its grid of training reconstructions after the step
    _, metrics = run(overrides, tmp_path, digits_cache)
    assert "train/total_loss" in metrics and "val/mse" in metrics
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    (grid,) = tmp_path.rglob("train_step_0000001.png")
    assert Image.open(grid).size[1] == 2 * 32 + 3 * 2  # inputs over reconstructions, 32px digits, padding 2


def test_tatitok_reads_captions_or_class_prompts(tmp_path, digits_cache):
    cfg = compose_train([*tiny_overrides("tatitok_bl32_vae"), f"data.cache_dir={digits_cache}"], tmp_path)
    module = hydra.utils.instantiate(cfg.model)
    assert module.captions({"text": ["a red car", "two cats"]}) == ["a red car", "two cats"]
    assert module.captions({"class_id": torch.tensor([3])}) == ["A photo of a three."]
    # what sample.py mode=reconstruct captions a run's checkpoint with (test_sample_reruns)
    from sample import CAPTION_SETTINGS

    assert set(CAPTION_SETTINGS) <= set(module.hparams) and module.hparams.class_names[3] == "three"
    (features,) = module.decoder_inputs({"text": ["a red car", "two cats"]})
    assert features.shape == (2, 77, 32) and not features.requires_grad
    images = torch.rand(2, 3, 32, 32)
    reconstructions, _ = module.reconstruct({"image": images, "text": ["a red car", "two cats"]})
    assert reconstructions.shape == images.shape


# --------------------------------------------------------------------------------------- stage 1 -> stage 2
def test_stage1_checkpoint_initialises_stage2(tmp_path, digits_cache, recwarn):
    teacher = build_model({"name": "maskgit_vqgan_f16_256", **TINY_VQGAN, "channel_mult": (1, 1, 1, 1)})
    teacher_file = tmp_path / "tiny_vqgan.pt"
    torch.save(teacher.state_dict(), teacher_file)

    stage1 = [*tiny_overrides("titok_s128"), f"model.teacher.pretrained={teacher_file}", "trainer.max_steps=2"]
    stage1 += ["trainer.val_check_interval=2", "trainer.limit_val_batches=1"]
    cfg1, _ = run(stage1, tmp_path / "stage1", digits_cache)
    ckpt = Path(cfg1.paths.checkpoint_dir) / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == 2
    assert not any(k.startswith("teacher.") for k in state["state_dict"]), "the teacher is saved twice"
    assert (Path(cfg1.paths.checkpoint_dir) / "config.yaml").is_file()
    # a fresh run: the config written into checkpoints/ must not trip ModelCheckpoint's "not empty" warning
    assert not [w for w in recwarn if "exists and is not empty" in str(w.message)]

    stage1_ema = load_model_state_dict(ckpt)
    restored = load_pretrained(ckpt)
    for key, value in restored.state_dict().items():
        torch.testing.assert_close(value, stage1_ema[key], rtol=0, atol=0)

    stage2 = [
        *tiny_overrides("titok_s128_stage2"),
        f"model.teacher.pretrained={teacher_file}",
        f"model.init_from={ckpt}",
    ]
    cfg2 = compose_train([*stage2, f"data.cache_dir={digits_cache}"], tmp_path / "stage2")
    module = hydra.utils.instantiate(cfg2.model)
    model_state = module.model.state_dict()
    for key, value in stage1_ema.items():  # encoder, quantizer, latent tokens, ViT decoder from stage 1 (EMA)
        torch.testing.assert_close(model_state[key], value, rtol=0, atol=0)
    for key, value in teacher.state_dict().items():  # pixel quantizer / decoder from the teacher
        if key.startswith(("quantize.", "decoder.")):
            torch.testing.assert_close(model_state[f"pixel_{key}"], value, rtol=0, atol=0)
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith(("encoder.", "quantize.", "latent_tokens")) for n in trainable)

    L.Trainer(accelerator="cpu", fast_dev_run=True, logger=False, enable_progress_bar=False).fit(
        module, datamodule=hydra.utils.instantiate(cfg2.data)
    )
    for key in ("encoder.ln_post.weight", "latent_tokens"):  # frozen in stage 2
        torch.testing.assert_close(module.model.state_dict()[key], stage1_ema[key], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------- resume
class StateProbe(L.Callback):
    """Saves the training state to ``path`` right after a (resumed) fit has restored everything."""

    def __init__(self, path: str):
        self.path = path

    def on_train_start(self, trainer, pl_module):
        ema = next(cb for cb in trainer.callbacks if type(cb).__name__ == "EMACallback")
        state = {
            "global_step": trainer.global_step,
            "optimizers": [opt.state_dict() for opt in trainer.optimizers],
            "schedulers": [config.scheduler.state_dict() for config in trainer.lr_scheduler_configs],
            "ema": [t.clone() for t in ema._ema],
            "state_dict": {k: v.clone() for k, v in pl_module.state_dict().items()},
        }
        torch.save(state, self.path)


def test_resume_restores_step_optimizers_schedules_ema_discriminator_and_lecam(tmp_path, digits_cache, recwarn):
    overrides = [
        *tiny_overrides("titok_b64_stage2", perceptual=True),
        "model.loss.discriminator_start=1",
        "trainer.limit_val_batches=0",
        "callbacks.model_checkpoint.every_n_train_steps=1",
    ]
    cfg, _ = run([*overrides, "trainer.max_steps=3"], tmp_path, digits_cache)
    saved = torch.load(Path(cfg.paths.checkpoint_dir) / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 3  # generator steps only (the discriminator's do not count)
    assert not any(k.startswith("loss.perceptual.") for k in saved["state_dict"])
    assert saved["state_dict"]["loss.ema_real_logits_mean"].abs().sum() > 0, "the discriminator never trained"

    # the same run folder again, longer: auto-resume from checkpoints/last.ckpt
    probe_file = tmp_path / "probe.pt"
    probe = f"+callbacks.probe={{_target_:tests.test_train.StateProbe,path:{probe_file}}}"
    run([*overrides, "trainer.max_steps=5", probe], tmp_path, digits_cache)
    restored = torch.load(probe_file, weights_only=False)
    assert restored["global_step"] == 3
    raw = saved["callbacks"]["EMACallback"]["raw_model_state"]
    for key, value in raw.items():  # training weights back in the model ...
        torch.testing.assert_close(restored["state_dict"][key], value, rtol=0, atol=0)
    for tensor, key in zip(restored["ema"], raw):  # ... and the EMA (saved as the state_dict) in the callback
        torch.testing.assert_close(tensor, saved["state_dict"][key].float(), rtol=0, atol=0)
    for key in [k for k in saved["state_dict"] if k.startswith("loss.")]:  # discriminator + LeCam buffers
        torch.testing.assert_close(restored["state_dict"][key], saved["state_dict"][key], rtol=0, atol=0)
    assert len(restored["optimizers"]) == len(saved["optimizer_states"]) == 2
    for got, expected in zip(restored["optimizers"], saved["optimizer_states"]):
        assert got["state"].keys() == expected["state"].keys() and got["state"]
        for index, slots in expected["state"].items():
            for name, value in slots.items():
                torch.testing.assert_close(got["state"][index][name], value, rtol=0, atol=0)
    for got, expected in zip(restored["schedulers"], saved["lr_schedulers"]):
        assert got["last_epoch"] == expected["last_epoch"] and got["_last_lr"] == expected["_last_lr"]
    final = torch.load(Path(cfg.paths.checkpoint_dir) / "last.ckpt", map_location="cpu", weights_only=True)
    assert final["global_step"] == 5
    # resuming in its own folder: Lightning's "checkpoint directory is not empty" is expected there, not shown
    assert not [w for w in recwarn if "exists and is not empty" in str(w.message)]


# ------------------------------------------------------------------------------------------------------- DDP
class WeightDump(L.Callback):
    """Each rank writes its model weights at the end of training."""

    def __init__(self, folder: str):
        self.folder = folder

    def on_train_end(self, trainer, pl_module):
        torch.save(pl_module.model.state_dict(), Path(self.folder) / f"rank{trainer.global_rank}.pt")


def test_ddp_spawn_two_cpu_processes_agree(tmp_path, digits_cache):
    dump = f"+callbacks.dump={{_target_:tests.test_train.WeightDump,folder:{tmp_path}}}"
    overrides = [*tiny_overrides("demo"), "trainer=ddp_sim", "trainer.max_steps=3", "trainer.limit_val_batches=0"]
    overrides += ["report_baseline=false"]  # no second round of spawned processes for the final validation
    cfg, _ = run([*overrides, dump], tmp_path, digits_cache)
    assert torch.load(Path(cfg.paths.checkpoint_dir) / "last.ckpt", weights_only=True)["global_step"] == 3
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for key, value in rank0.items():
        torch.testing.assert_close(rank1[key], value, rtol=0, atol=0)


def test_a_start_off_the_recipes_global_batch_says_how_to_reach_it(tmp_path, digits_cache):
    # experiment=titok_b64 (the reference's 8 GPUs x 32 = 256) at tiny size: batch 4 on one process warns with both
    # ways to reach 256; 32 x 4 accumulated x 2 DDP processes is 256 and says nothing
    def start(run_dir: Path, *overrides: str) -> str:
        command = [sys.executable, "train.py", *tiny_overrides("titok_b64"), f"data.cache_dir={digits_cache}"]
        command += ["trainer.max_steps=1", "trainer.limit_val_batches=0", "report_baseline=false"]
        command += [f"hydra.run.dir={run_dir}", *overrides]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
        return result.stdout + result.stderr

    warned = start(tmp_path / "one")
    assert (
        "global batch 4 (data.batch_size=4 x model.accumulate_grad_batches=1 x 1 process(es)) is not the 256 the "
        "recipe's learning rate, warm-up and steps are set for: use 64 processes (trainer.devices x trainer.num_nodes) "
        "or model.accumulate_grad_batches=64 on 1 process(es)"
    ) in warned
    reached = start(tmp_path / "two", "data.batch_size=32", "model.accumulate_grad_batches=4", "trainer=ddp_sim")
    assert "global batch" not in reached


def test_a_discriminator_schedule_on_two_processes_is_the_references_on_two(tmp_path, digits_cache):
    # the reference's discriminator schedule spans max_steps x P - discriminator_start process-steps, P per step
    # (see test_optim); train.py on 2 DDP processes builds it for P = 2
    overrides = [*tiny_overrides("titok_b64_stage2"), "trainer=ddp_sim", "trainer.max_steps=6"]
    overrides += ["model.loss.discriminator_start=2", "model.scheduler.warmup_steps=1", "trainer.limit_val_batches=0"]
    cfg, _ = run([*overrides, "report_baseline=false"], tmp_path, digits_cache)
    checkpoint = torch.load(Path(cfg.paths.checkpoint_dir) / "last.ckpt", weights_only=True)
    model_schedule, disc_schedule = checkpoint["lr_schedulers"]
    assert (model_schedule["last_epoch"], disc_schedule["last_epoch"]) == (6, 4)
    scheduler = cfg.model.scheduler
    for state, start, lr in (
        (model_schedule, 0, cfg.model.optimizer.lr),
        (disc_schedule, 2, cfg.model.optimizer.discriminator_lr),
    ):
        factor = lr_lambda(
            state["last_epoch"] * 2, "cosine", 2, 6 * 2 - start, cfg.model.optimizer.lr, scheduler.end_lr
        )
        assert state["_last_lr"][0] == pytest.approx(lr * factor, rel=1e-12)


# ------------------------------------------------------------------------------------------------------ FSDP
def _train_two_cpu_processes(run_dir: Path, digits_cache: str, *overrides: str) -> tuple[dict, str]:
    """train.py in a subprocess (the FSDP strategy launches its other rank by re-running the command)."""
    command = [
        sys.executable,
        "train.py",
        *tiny_overrides("demo"),
        "++model.tokenizer.clustering_vq=false",  # its codebook refresh draws per-rank random numbers
        f"data.cache_dir={digits_cache}",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "trainer.limit_val_batches=1",
        "report_baseline=false",
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return checkpoint, result.stdout + result.stderr


def test_fsdp_on_a_torch_without_fsdp2_is_refused_by_name(monkeypatch):
    from titok_lightning.lit.sharding import FullyShardedStrategy

    monkeypatch.setattr(torch, "__version__", "2.6.0+cu124")
    with pytest.raises(RuntimeError, match=r"trainer=fsdp needs torch >= 2.7 \(FSDP2\), this is torch 2.6.0\+cu124"):
        FullyShardedStrategy()
    monkeypatch.setattr(torch, "__version__", "2.10.0")  # compared as versions, not as text
    FullyShardedStrategy()


@needs_fsdp2
def test_fsdp_on_two_cpu_processes_matches_ddp_and_resumes(tmp_path, digits_cache):
    # a validation and a grid of training reconstructions at step 2 swap the sharded EMA in and out between steps
    # (training goes on with the raw weights); accumulation skips the gradient sync of the first micro-batch
    steps = ["trainer.max_steps=4", "trainer.val_check_interval=2", "model.accumulate_grad_batches=2"]
    steps += ["callbacks.image_logger.every_n_steps=2"]
    fsdp, output = _train_two_cpu_processes(tmp_path / "fsdp", digits_cache, "trainer=fsdp", *steps)
    assert "FSDP: 'model': 2 blocks sharded over 2 ranks, other layers replicated" in output
    ddp, _ = _train_two_cpu_processes(tmp_path / "ddp", digits_cache, "trainer=ddp_sim", *steps)
    assert fsdp["global_step"] == ddp["global_step"] == 4
    for step in (2, 4):
        fsdp_grid, ddp_grid = (
            np.asarray(Image.open(tmp_path / run / "csv" / "images" / f"train_step_000000{step}.png"))
            for run in ("fsdp", "ddp")
        )
        assert np.abs(fsdp_grid.astype(int) - ddp_grid.astype(int)).max() <= 1, step
    # same data per rank and the same averaged gradients: FSDP trains exactly what DDP trains; the checkpoint
    # holds full tensors (EMA in state_dict, training weights in the EMA callback state)
    fsdp_raw = fsdp["callbacks"]["EMACallback"]["raw_model_state"]
    ddp_raw = ddp["callbacks"]["EMACallback"]["raw_model_state"]
    assert fsdp_raw.keys() == ddp_raw.keys()
    for key, value in ddp_raw.items():
        # (float sums in another order: 3e-8 apart; an evaluation on stale gathered EMA weights: 1.5e-6)
        torch.testing.assert_close(fsdp_raw[key], value, rtol=0, atol=2e-7)
        torch.testing.assert_close(fsdp["state_dict"][key], ddp["state_dict"][key], rtol=0, atol=2e-7)
    moved = max((fsdp_raw[k] - fsdp["state_dict"][k]).abs().max().item() for k in fsdp_raw)
    assert moved > 1e-5  # the EMA lags the trained weights: training did change them

    resumed, _ = _train_two_cpu_processes(
        tmp_path / "fsdp", digits_cache, "trainer=fsdp", "trainer.max_steps=6", "model.accumulate_grad_batches=2"
    )
    assert resumed["global_step"] == 6
    assert resumed["callbacks"]["EMACallback"]["num_updates"] == 6


# ----------------------------------------------------------------------------------- non-finite, accumulation
def _demo_module_and_trainer(tmp_path, digits_cache, *overrides):
    # no clustering VQ: its codebook refresh in the forward pass would change weights without an optimizer step
    overrides = [*tiny_overrides("demo"), "++model.tokenizer.clustering_vq=false", *overrides]
    cfg = compose_train([*overrides, f"data.cache_dir={digits_cache}"], tmp_path)
    module = hydra.utils.instantiate(cfg.model)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    return module, trainer, instantiate_datamodule(cfg, module)


def _poison(module) -> None:
    """Make every generator loss NaN (as an overflowing run would)."""
    forward = module.loss.forward

    def nan_loss(*args, **kwargs):
        loss, logs = forward(*args, **kwargs)
        return loss * float("nan"), logs

    module.loss.forward = nan_loss


def test_nonfinite_loss_raises_before_weights_change(tmp_path, digits_cache):
    module, trainer, data = _demo_module_and_trainer(tmp_path, digits_cache)
    _poison(module)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match="non-finite gradient norm"):
        trainer.fit(module, datamodule=data)
    for key, value in module.model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_nonfinite_skip_policy_counts_and_keeps_weights(tmp_path, digits_cache):
    module, trainer, data = _demo_module_and_trainer(tmp_path, digits_cache, "model.nonfinite=skip")
    _poison(module)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer.fit(module, datamodule=data)
    assert int(module.skipped_steps) == 2 and trainer.global_step == 2
    for key, value in module.model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_training_steps_log_no_python_numbers(tmp_path, digits_cache, logged_values):
    """Lightning turns a logged Python number into a device tensor: on CUDA a blocking copy that waits for the
    device, at every step. Every training-time value is a tensor, and the throughput covers the batches run."""
    module, trainer, data = _demo_module_and_trainer(tmp_path, digits_cache)
    trainer.fit(module, datamodule=data)
    training = [(name, value) for name, value in logged_values if name.startswith("train/")]
    assert {"train/samples_per_sec", "train/total_loss", "train/grad_norm/model"} <= {name for name, _ in training}
    assert all(isinstance(value, torch.Tensor) for _, value in training), training
    (rate,) = [value for name, value in training if name == "train/samples_per_sec"]  # from the second batch on
    assert rate.device.type == "cpu" and 0 < float(rate) < math.inf


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronisation is a CUDA matter")
def test_cuda_16_mixed_steps_never_make_the_host_wait(tmp_path, digits_cache):
    """After warm-up, a 16-mixed step (fused AdamW under the GradScaler, clipping, EMA, logging between log steps)
    makes no call that waits for the device: torch's sync debug mode raises at the first one, naming it."""
    from callbacks import EMACallback

    class SyncErrors(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 3:
                torch.cuda.set_sync_debug_mode("error")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 6:
                torch.cuda.set_sync_debug_mode("default")

    module, _, data = _demo_module_and_trainer(tmp_path, digits_cache)
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        precision="16-mixed",
        max_steps=8,
        limit_val_batches=0,
        log_every_n_steps=1000,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[EMACallback(decay=0.99), SyncErrors()],
    )
    try:
        trainer.fit(module, datamodule=data)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert trainer.global_step == 8


def test_gradient_accumulation_steps_once_per_batch_of_micro_batches(tmp_path, digits_cache):
    # 3 micro-batches of 4 against one batch of 12: the same samples (the loader's batch is 12 either way), the same
    # mean gradient, so the same weights; one Lightning batch per optimizer step
    runs = {}
    for micro_batches, batch_size in ((3, 4), (1, 12)):
        overrides = [f"model.accumulate_grad_batches={micro_batches}", f"data.batch_size={batch_size}"]
        overrides.append("model.scheduler.warmup_steps=1")  # the second step at full learning rate
        L.seed_everything(0)
        module, trainer, data = _demo_module_and_trainer(tmp_path / str(micro_batches), digits_cache, *overrides)
        initial = {k: v.clone() for k, v in module.model.state_dict().items()}
        trainer.fit(module, datamodule=data)
        assert data.batch_size == 12
        assert trainer.global_step == 2
        assert trainer.fit_loop.epoch_loop.batch_progress.total.completed == 2
        assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 2  # the schedule advances once per step
        runs[micro_batches] = module.model.state_dict()
    assert max((runs[1][k] - value).abs().max().item() for k, value in initial.items()) > 1e-3
    for key, value in runs[1].items():
        torch.testing.assert_close(runs[3][key], value, rtol=1e-5, atol=1e-6)


def test_compile_option_keeps_state_dict_keys_and_trains(tmp_path, digits_cache):
    # the eager backend runs TorchDynamo without generating C++ code: fast on CPU, same code path otherwise
    compiled = ["model.compile_modules=[encoder,decoder]", "model.compile_backend=eager"]
    module, trainer, data = _demo_module_and_trainer(tmp_path, digits_cache, *compiled)
    keys = list(module.state_dict())
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 2
    assert list(module.state_dict()) == keys
    for name in ("encoder", "decoder"):
        assert getattr(module.model, name)._compiled_call_impl is not None, name
    assert module.model.quantize._compiled_call_impl is None  # only the named submodules
    assert any(not torch.equal(v, before[k]) for k, v in module.model.state_dict().items())


def test_gpu_recipes_compile_but_the_cpu_skips_inductor(tmp_path, digits_cache):
    assert compose_train(["experiment=titok_b64"]).model.compile_modules == ["encoder", "decoder"]
    stage2 = compose_train(["experiment=titok_b64_stage2"]).model.compile_modules
    assert stage2 == ["encoder", "decoder", "pixel_decoder"]  # names checked against the model: test_fast_dev_run
    module, trainer, data = _demo_module_and_trainer(tmp_path, digits_cache, "model.compile_modules=[encoder,decoder]")
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 2
    assert module.model.encoder._compiled_call_impl is None  # inductor on a CPU: eager, as the demo and tests


def test_fused_adamw_under_a_grad_scaler_clips_unscaled_gradients(tmp_path, digits_cache, monkeypatch):
    # the fused kernel is chosen on CUDA only; forced here to run the 16-mixed path of a fused AdamW on the CPU
    # (Lightning would turn precision="16-mixed" into bf16 on a CPU: the plugin is given explicitly)
    from lightning.pytorch.plugins import MixedPrecision

    import titok_lightning.lit.optim as optim

    results = {}
    for fused in (False, True):
        monkeypatch.setattr(optim, "fused_adamw_applies", lambda params, precision, fused=fused: fused)
        L.seed_everything(0)
        module, _, data = _demo_module_and_trainer(tmp_path / f"fused_{fused}", digits_cache)
        trainer = L.Trainer(
            accelerator="cpu",
            max_steps=3,
            plugins=[MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))],
            limit_val_batches=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
        )
        trainer.fit(module, datamodule=data)
        assert trainer.optimizers[0].defaults["fused"] is fused and trainer.precision_plugin.scaler is not None
        norm = float(trainer.callback_metrics["train/grad_norm/model"])
        results[fused] = norm, {k: v.clone() for k, v in module.model.state_dict().items()}
    (plain_norm, plain_weights), (fused_norm, fused_weights) = results[False], results[True]
    assert fused_norm == pytest.approx(plain_norm, rel=1e-3)  # a scaled norm would be ~65536 times larger
    for key, value in plain_weights.items():
        torch.testing.assert_close(fused_weights[key], value, rtol=1e-4, atol=1e-5)


def test_a_step_the_grad_scaler_skips_leaves_the_lr_schedule_where_it_is(tmp_path, digits_cache):
    # 16-mixed (explicit plugin, as above): a first scale of 1e30 overflows the fp16 backward of step 1, the scaler
    # skips it and backs off to 1e4, and the 3 steps after it apply. The reference's scheduler (accelerate's) only
    # advances on applied steps: 3, while the trainer counts 4 steps.
    from lightning.pytorch.plugins import MixedPrecision

    L.seed_everything(0)
    module, _, data = _demo_module_and_trainer(tmp_path, digits_cache)
    scaler = torch.amp.GradScaler("cpu", init_scale=1e30, backoff_factor=1e-26)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=4,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler)],
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(module, datamodule=data)
    assert scaler.get_scale() == pytest.approx(1e4), "exactly one step overflowed and was skipped"
    assert trainer.global_step == 4
    schedule = module.lr_schedulers()[0]  # the model's (the discriminator's comes second)
    assert schedule.last_epoch == 3
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(schedule.lr_lambdas[0](3) * schedule.base_lrs[0])


def test_a_checkpoint_after_a_step_the_grad_scaler_skipped_holds_the_schedule_without_it(tmp_path, digits_cache):
    # whether the scaler skipped a step is read (without waiting) at the role's next step: a checkpoint written right
    # after a skipped step must already hold the schedule and the optimizer's rates without it
    from lightning.pytorch.plugins import MixedPrecision

    L.seed_everything(0)
    module, _, data = _demo_module_and_trainer(tmp_path, digits_cache)
    forward = module.loss.forward

    def nan_at_the_last_step(*args, **kwargs):
        loss, logs = forward(*args, **kwargs)
        return (loss * float("nan") if module.global_step == 3 else loss), logs

    module.loss.forward = nan_at_the_last_step
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=4,
        plugins=[MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=2.0**10))],
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(module, datamodule=data)
    assert trainer.precision_plugin.scaler.get_scale() == 2.0**9, "only the last step was skipped"
    trainer.save_checkpoint(tmp_path / "after_skip.ckpt")
    checkpoint = torch.load(tmp_path / "after_skip.ckpt", weights_only=True)
    schedule = module.lr_schedulers()[0]
    expected = schedule.lr_lambdas[0](3) * schedule.base_lrs[0]
    assert checkpoint["lr_schedulers"][0]["last_epoch"] == 3
    assert checkpoint["lr_schedulers"][0]["_last_lr"] == pytest.approx([expected] * len(schedule.base_lrs))
    assert [group["lr"] for group in checkpoint["optimizer_states"][0]["param_groups"]] == pytest.approx(
        [expected] * len(schedule.base_lrs)
    )
    assert schedule.last_epoch == 3 and trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(expected)


def test_compile_option_rejects_unknown_submodules(tmp_path, digits_cache):
    module, trainer, data = _demo_module_and_trainer(tmp_path, digits_cache, "model.compile_modules=[encodr]")
    with pytest.raises(ValueError, match=r"'encodr' is not a submodule.*encoder.*decoder"):
        trainer.fit(module, datamodule=data)


# ----------------------------------------------------------------------------------------------------- sweep
def test_multirun_as_typed_writes_one_folder_per_job(tmp_path, digits_cache):
    # `python train.py -m trainer.max_steps=3 model.optimizer.lr=1e-4,2e-4` with only sizes and paths changed;
    # no hydra.sweep.dir: the sweep folder comes from the config (outputs/<task_name>/multiruns/<time>/<job>)
    command = [sys.executable, str(ROOT / "train.py"), "-m", "trainer.max_steps=2", "model.optimizer.lr=1e-4,2e-4"]
    command += [*tiny_overrides("demo"), "trainer.limit_val_batches=1", f"data.cache_dir={digits_cache}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PROJECT_ROOT", None)
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "demo" / "multiruns").iterdir()
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    learning_rates = sorted(
        OmegaConf.load(sweep / job / "checkpoints" / "config.yaml").model.optimizer.lr for job in "01"
    )
    assert learning_rates == [1e-4, 2e-4]
    for job in "01":
        assert torch.load(sweep / job / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
