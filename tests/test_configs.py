"""Hydra configs: every experiment composes, builds its full-size model with the official parameter count, and
reproduces the numbers of the reference's training config; trainer / launcher / debug configs compose."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from titok_lightning.lit.resume import AtomicCheckpointIO
from titok_lightning.lit.sharding import FullyShardedStrategy, fsdp2_available
from titok_lightning.loading import build_model, constructor_defaults
from titok_lightning.registry import get_spec, model_kwargs
from train import MissingSettingError, check_mandatory

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
MANIFESTS = ROOT.parent / "shared" / "parity" / "manifests"

# experiment -> manifest of the reference config it reproduces
REFERENCE = {
    **{f"titok_{m}": f"training__TiTok__stage1__titok_{m}__tokenizer.json" for m in ("s128", "b64", "l32")},
    **{f"titok_{m}_stage2": f"training__TiTok__stage2__titok_{m}__tokenizer.json" for m in ("s128", "b64", "l32")},
    **{
        name: f"training__TA-TiTok__{name}__tokenizer.json"
        for name in (
            "tatitok_bl32_vq",
            "tatitok_bl64_vq",
            "tatitok_bl128_vq",
            "tatitok_bl32_vae",
            "tatitok_bl64_vae",
            "tatitok_sl128_vae",
        )
    },
}
# the tokenizer experiments (generator experiments are tested elsewhere)
EXPERIMENTS = sorted([*REFERENCE, "demo"])

# trainer=fsdp (FSDP2) needs torch >= 2.7; the rest of the project runs on torch >= 2.4
needs_fsdp2 = pytest.mark.skipif(not fsdp2_available(), reason="trainer=fsdp needs torch >= 2.7 (FSDP2)")


def compose_train(overrides: list[str], tmp_path: Path | None = None):
    """Compose conf/train.yaml as `python train.py <overrides>` would, with the hydra node for ${hydra:...}."""
    return compose_job("train", overrides, tmp_path)


def compose_job(config_name: str, overrides: list[str], tmp_path: Path | None = None):
    """Compose conf/<config_name>.yaml as `python <config_name>.py <overrides>` would; with ``tmp_path``, the
    runtime folders Hydra would set point there."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    if tmp_path is not None:
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(tmp_path)
            cfg.hydra.runtime.cwd = str(tmp_path)
            cfg.paths.root_dir = str(tmp_path)  # outputs/ under the test's folder
            cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    return cfg


def manifest(experiment: str) -> dict:
    path = MANIFESTS / REFERENCE[experiment]
    if not path.is_file():
        pytest.fail(f"missing parity manifest {path}")
    return json.loads(path.read_text())


def test_every_reference_tokenizer_recipe_has_an_experiment():
    available = {p.stem for p in (CONF / "experiment").glob("*.yaml")}
    assert set(EXPERIMENTS) <= available, sorted(set(EXPERIMENTS) - available)


@pytest.mark.parametrize("experiment", sorted(REFERENCE))
def test_experiment_builds_full_size_model_with_official_parameter_count(experiment):
    cfg = compose_train([f"experiment={experiment}"])
    spec = OmegaConf.to_container(cfg.model.tokenizer, resolve=True)
    with torch.device("meta"):
        model = build_model(spec)
    num_parameters = sum(p.numel() for p in model.parameters())
    assert num_parameters == manifest(experiment)["num_parameters"]


def _expected_precision(mixed_precision: str) -> str:
    return {"fp16": "16-mixed", "bf16": "bf16-mixed", "no": "32-true"}[mixed_precision]


@pytest.mark.parametrize("experiment", sorted(REFERENCE))
def test_experiment_reproduces_reference_numbers(experiment):
    ref = manifest(experiment)["config"]
    cfg = compose_train([f"experiment={experiment}"])
    model, trainer, data, callbacks = cfg.model, cfg.trainer, cfg.data, cfg.callbacks
    opt, sched, train_ref, exp_ref = ref["optimizer"]["params"], ref["lr_scheduler"], ref["training"], ref["experiment"]

    # optimisation
    assert model.optimizer.lr == opt["learning_rate"]
    assert list(model.optimizer.betas) == [opt["beta1"], opt["beta2"]]
    assert model.optimizer.weight_decay == opt["weight_decay"]
    assert model.optimizer.eps == opt.get("epsilon", 1e-8)
    if "discriminator_learning_rate" in opt:
        assert model.optimizer.discriminator_lr == opt["discriminator_learning_rate"]
    assert sched["scheduler"] == model.scheduler.name
    assert model.scheduler.warmup_steps == sched["params"]["warmup_steps"]
    assert model.scheduler.end_lr == sched["params"]["end_lr"]
    assert model.max_grad_norm == train_ref["max_grad_norm"]
    assert model.accumulate_grad_batches == train_ref["gradient_accumulation_steps"]
    assert trainer.max_steps == train_ref["max_train_steps"]
    assert trainer.precision == _expected_precision(train_ref["mixed_precision"])
    assert cfg.seed == train_ref["seed"]
    assert ("ema" in callbacks) == train_ref["use_ema"]
    assert callbacks.ema.decay == 0.999  # the reference's EMAModel(decay=0.999)

    # cadence
    assert callbacks.model_checkpoint.every_n_train_steps == exp_ref["save_every"]
    assert trainer.val_check_interval == exp_ref["eval_every"]
    assert callbacks.image_logger.every_n_steps == exp_ref["generate_every"]
    assert trainer.log_every_n_steps == exp_ref["log_every"]

    # losses: every reference loss setting, under the same name
    for key, value in ref["losses"].items():
        assert model.loss[key] == value, key
    if "perceptual_loss" in ref["losses"]:
        assert model.loss.perceptual_pretrained is True

    # tokenizer architecture and quantizer settings
    vq = ref["model"]["vq_model"]
    spec = OmegaConf.to_container(model.tokenizer, resolve=True)
    name = spec.pop("name")
    kwargs = {**constructor_defaults(get_spec(name).model_cls), **model_kwargs(name, **spec)}
    assert kwargs["num_latent_tokens"] == vq["num_latent_tokens"]
    assert kwargs["token_size"] == vq["token_size"]
    assert kwargs["quantize_mode"] == vq.get("quantize_mode", "vq")
    assert kwargs["finetune_decoder"] == vq["finetune_decoder"]
    assert kwargs["is_legacy"] == vq.get("is_legacy", True)
    assert kwargs["image_size"] == ref["dataset"]["preprocessing"]["crop_size"]
    assert (kwargs["encoder_patch_size"], kwargs["decoder_patch_size"]) == (
        vq["vit_enc_patch_size"],
        vq["vit_dec_patch_size"],
    )
    if kwargs["quantize_mode"] == "vq":
        for key in ("codebook_size", "commitment_cost", "use_l2_norm"):
            assert kwargs[key] == vq[key], key
        assert kwargs.get("clustering_vq", False) == vq.get("clustering_vq", False)
    if "pretrained_tokenizer_weight" in vq:
        assert model.teacher.name == "maskgit_vqgan_f16_256"
        assert model.teacher.pretrained == "maskgit_vqgan_f16_256"
    if vq["finetune_decoder"]:
        assert OmegaConf.is_missing(model, "init_from")

    # data
    pre, params = ref["dataset"]["preprocessing"], ref["dataset"]["params"]
    assert data.batch_size == train_ref["per_gpu_batch_size"]
    assert data.image_size == pre["crop_size"]
    assert data.resize_shorter_edge == pre["resize_shorter_edge"]
    assert data.random_crop == pre["random_crop"]
    assert data.random_flip == pre["random_flip"]
    assert data.num_workers == params["num_workers_per_gpu"]
    assert data.samples_per_epoch == exp_ref["max_train_examples"]
    assert data.label_key == ("txt" if params.get("dataset_with_text_label") else "cls")
    assert data.get("val_label_key", "cls") == "cls"  # the reference validates on ImageNet val (class ids)
    if pre.get("res_ratio_filtering"):
        assert (data.min_original_resolution, data.max_aspect_ratio) == (256, 2.0)
    assert OmegaConf.is_missing(data, "train_shards") and OmegaConf.is_missing(data, "val_shards")


def test_unset_data_paths_give_one_clear_error():
    cfg = compose_train(["experiment=titok_b64"])
    with pytest.raises(MissingSettingError, match=r"data\.train_shards, data\.val_shards"):
        check_mandatory(cfg)


def test_default_is_the_offline_demo(tmp_path):
    cfg = compose_train([], tmp_path)
    assert cfg.task_name == "demo"
    assert cfg.data._target_ == "datamodules.DigitsDataModule"
    assert cfg.trainer.accelerator == "cpu"
    assert not cfg.callbacks.reconstruction_metrics.compute_fid  # no Inception download offline
    check_mandatory(cfg)


@pytest.mark.parametrize("trainer", ["cpu", "gpu", "ddp", "ddp_sim", pytest.param("fsdp", marks=needs_fsdp2)])
def test_trainer_configs_compose_and_strategies_instantiate(trainer, tmp_path):
    cfg = compose_train([f"trainer={trainer}"], tmp_path)
    strategy = cfg.trainer.get("strategy")
    if strategy is not None and not isinstance(strategy, str):
        strategy = hydra.utils.instantiate(strategy)
    if trainer == "fsdp":  # FSDP2: Lightning's FSDP1 strategy cannot run manual optimization
        assert isinstance(strategy, FullyShardedStrategy)
        assert not strategy._save_distributed_checkpoint  # single-file checkpoints


@pytest.mark.parametrize("debug", ["fdr", "overfit", "limit"])
def test_debug_configs_compose(debug, tmp_path):
    cfg = compose_train([f"debug={debug}"], tmp_path)
    assert cfg.task_name == "debug" and cfg.trainer.accelerator == "cpu"


@pytest.mark.parametrize("logger", ["csv", "tensorboard", "wandb", "many_loggers"])
def test_logger_configs_compose(logger, tmp_path):
    cfg = compose_train([f"logger={logger}"], tmp_path)
    if "wandb" in cfg.logger:
        assert cfg.logger.wandb.offline is True  # works with no account and no network


def test_slurm_launcher_and_trainer_compose(tmp_path):
    cfg = compose_train(
        [
            "experiment=titok_b64",
            "hydra/launcher=slurm",
            "trainer=slurm",
            "hydra.launcher.nodes=2",
            "hydra.launcher.gpus_per_node=4",
            "hydra.launcher.partition=gpu",
        ],
        tmp_path,
    )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.tasks_per_node == launcher.gpus_per_node == 4  # one task per GPU
    assert (launcher.nodes, launcher.partition) == (2, "gpu")
    assert launcher.max_num_timeout == 0 and launcher.signal_delay_s > 0
    assert (cfg.trainer.devices, cfg.trainer.num_nodes) == (4, 2)
    checkpoint_io, environment = hydra.utils.instantiate(cfg.trainer.plugins)
    assert isinstance(checkpoint_io, AtomicCheckpointIO)
    # the checkpoint callback saves and requeues on the launcher's signal (Lightning would save mid-step)
    assert not environment.auto_requeue
    checkpoint = hydra.utils.instantiate(cfg.callbacks.model_checkpoint)
    assert signal.SIGUSR2 in checkpoint.signals and checkpoint.requeue
