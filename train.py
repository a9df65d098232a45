"""Train a model with Lightning, configured by Hydra (conf/train.yaml).

    python train.py                                   # offline demo: small TiTok on the embedded digits (CPU)
    python train.py experiment=titok_b64 "data.train_shards='/data/in1k/train-{0000..0252}.tar'" "data.val_shards=..."
    python train.py experiment=titok_b64 trainer=ddp trainer.devices=8 ...
    python train.py experiment=titok_b64 trainer=fsdp trainer.devices=8 trainer.precision=bf16-mixed ...  # FSDP2
    python train.py -m model.optimizer.lr=1e-4,2e-4 debug=fdr           # sweep: one sub-folder per job
    python train.py -m hydra/launcher=slurm trainer=slurm experiment=titok_b64 hydra.launcher.nodes=2 ...

A run writes everything under its folder (``outputs/<task_name>/runs/<time>/``): ``.hydra/`` (composed and
resolved config), ``checkpoints/`` (``last.ckpt``, periodic ``step_*.ckpt`` and ``config.yaml``), ``csv/``
metrics, ``images/`` grids, ``train.log``. Started again in the same folder (``hydra.run.dir=<run>``) it
resumes exactly from its newest readable checkpoint; ``ckpt_path=<file>`` resumes from a given checkpoint. A
folder another live ``train.py`` trains in is refused.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import sys
import warnings

# Spinning OpenMP threads slow CPU training ~25x as soon as another process competes for the cores (measured on
# the 2-core demo machine); sleeping waiters cost little. Must be set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.model_helpers import is_overridden
from omegaconf import DictConfig, ListConfig, OmegaConf

from callbacks.fault_tolerance import ResumableCheckpoint
from datamodules.shards import DataError
from titok_lightning.cli import CONFIG_ERRORS, MOVED_KEYS, errors_in_one_line, restore_user_full_error, run_cli
from titok_lightning.lit.generator import ClassLabelError, TokenizerChangedError
from titok_lightning.lit.resume import (
    RunFolderInUseError,
    RunLock,
    find_resume_checkpoint,
    remove_temporary_files,
)
from titok_lightning.loading import NotACheckpointError, checkpoint_global_step

log = logging.getLogger("train")

# Expected with this project's design, not problems: frozen helpers (teacher, perceptual, text encoder) stay in
# eval mode, with manual optimization checkpoints hold the weights after the step they are numbered with, and the
# class-conditional generators check labels in on_before_batch_transfer (on the host), a hook no datamodule here has.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
warnings.filterwarnings("ignore", message="You have overridden `on_before_batch_transfer` in `LightningModule` but")


class MissingSettingError(ValueError):
    """A mandatory setting (``???`` in the config, e.g. a data path) was not given."""


class RunSettingError(ValueError):
    """Settings that cannot run as given: what to train or test from, or how long."""


class ChangedOnResumeError(ValueError):
    """A resumed run was given optimizer or schedule settings other than those its checkpoint was trained with."""


# Errors in what the user typed or configured: one line on stderr (HYDRA_FULL_ERROR=1: the whole traceback).
USER_ERRORS = (
    *CONFIG_ERRORS,
    ChangedOnResumeError,
    ClassLabelError,
    MissingSettingError,
    RunSettingError,
    FileNotFoundError,
    NotACheckpointError,
    RunFolderInUseError,
    DataError,
    TokenizerChangedError,
)


def job_config(cfg: DictConfig) -> DictConfig:
    """``cfg`` without the ``hydra`` node (present when composed with the compose API, e.g. in tests)."""
    return OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"]) if "hydra" in cfg else cfg


def example_setting(key: str) -> str:
    """``key=<example>`` quoted so that both the shell and Hydra's override parser accept it when pasted."""
    name = key.rsplit(".", 1)[-1]
    if name.endswith("_shards"):  # a brace pattern: Hydra needs it quoted, the shell needs that quote kept
        split = name.removesuffix("_shards")
        return f"\"{key}='/path/to/{split}-{{0000..0099}}.tar'\""
    return f"{key}=/path/to/{name.removesuffix('_jsonl')}.{'jsonl' if name.endswith('_jsonl') else 'ckpt'}"


def check_mandatory(cfg: DictConfig) -> None:
    """Raise one clear error listing every ``???`` setting left unset (data paths, init checkpoints), with a
    command to paste: the overrides given so far plus an example of each missing setting."""
    missing = sorted(OmegaConf.missing_keys(job_config(cfg)))
    if missing:
        given = [shlex.quote(o) for o in HydraConfig.get().overrides.task] if HydraConfig.initialized() else []
        command = " ".join(["python train.py", *given, *map(example_setting, missing)])
        raise MissingSettingError(f"mandatory settings are not set: {', '.join(missing)}; e.g. {command}")


def several_devices(devices: Any) -> bool:
    """Whether ``trainer.devices`` asks for more than one process per node (-1: all devices; "auto": one here)."""
    if isinstance(devices, ListConfig):
        return len(devices) > 1
    if isinstance(devices, str):
        return "," in devices.strip(",") or (devices.strip().lstrip("-").isdigit() and int(devices) not in (0, 1))
    return devices not in (0, 1)


# Lightning's names of the precisions these models train and evaluate in (fp32 weights; autocast where mixed)
TRAINED_PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16", "16-mixed", "16")


# Lightning's values for "off" of the settings that manual optimization cannot take (their keys: MOVED_KEYS)
LIGHTNING_OFF = {"trainer.accumulate_grad_batches": 1, "trainer.gradient_clip_val": None}


def check_run_settings(cfg: DictConfig) -> None:
    """Refuse in one line what Lightning would run wrongly or not at all: no optimizer-step count for the schedules,
    Lightning's ``last``/``best`` (a new run folder has neither), nothing to do, Trainer settings that manual
    optimization cannot take, several devices without the recipes' strategy, half or double precision weights;
    warn where an epoch or time limit ends training before the schedule does."""
    train, test = cfg.get("train", True), cfg.get("test", False)
    if not train and not test:
        raise RunSettingError("train=false with test=false does nothing: add test=true ckpt_path=<file.ckpt>")
    if cfg.get("ckpt_path") in ("last", "best"):
        raise RunSettingError(
            f"ckpt_path={cfg.ckpt_path}: Lightning looks for it in this start's run folder, which is new unless "
            "hydra.run.dir is given. To continue a run pass hydra.run.dir=<its folder> (its newest checkpoint is "
            "used), or give ckpt_path=<file.ckpt>"
        )
    moved = [key for key, unset in LIGHTNING_OFF.items() if cfg.trainer.get(key.split(".", 1)[1], unset) != unset]
    if moved:
        raise RunSettingError(
            f"{', '.join(moved)}: these models optimize manually (GAN and EMA steps), so Lightning does not apply "
            f"them; use {' and '.join(sorted({MOVED_KEYS[key] for key in moved}))}"
        )
    devices, nodes = cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1)
    if cfg.trainer.get("strategy") in (None, "auto") and (several_devices(devices) or nodes > 1):
        raise RunSettingError(
            f"trainer.devices={devices} trainer.num_nodes={nodes} without a strategy: Lightning's default DDP stops "
            "at the parameters these models leave without gradients in a step (generator and discriminator take "
            "turns); use trainer=ddp (trainer.accelerator=cpu for CPU processes) or trainer=fsdp"
        )
    precision = str(cfg.trainer.get("precision", "32-true"))
    if precision not in TRAINED_PRECISIONS:
        raise RunSettingError(
            f"trainer.precision={precision}: these models run their quantizers, losses and optimizer states in fp32; "
            "use 32-true, bf16-mixed or 16-mixed"
        )
    max_steps = cfg.trainer.get("max_steps")
    if train and (not isinstance(max_steps, int) or max_steps < 1):
        raise RunSettingError(
            f"trainer.max_steps={max_steps}: the learning-rate schedules are counted in optimizer steps, so training "
            "needs a positive trainer.max_steps (it may be combined with trainer.max_epochs or trainer.max_time)"
        )
    limits = [f"trainer.{key}={cfg.trainer[key]}" for key in ("max_epochs", "max_time") if cfg.trainer.get(key)]
    limits = [limit for limit in limits if limit != "trainer.max_epochs=-1"]
    if train and limits:
        log.warning(
            "%s may stop training before trainer.max_steps=%d, where the learning-rate schedule ends (it is sized "
            "for max_steps): set trainer.max_steps to the length you want",
            " and ".join(limits),
            max_steps,
        )


def check_global_batch(cfg: DictConfig, world_size: int) -> None:
    """Warn where a training start's global batch is not the one its recipe was tuned for in the reference (whose
    learning rate does not scale with the batch), with the settings that reach it."""
    reference = cfg.get("reference_global_batch")
    if not reference or not cfg.get("train", True):
        return
    batch, accumulate = cfg.data.batch_size, cfg.model.get("accumulate_grad_batches", 1)
    if batch * accumulate * world_size == reference:
        return
    ways = []
    if reference % (batch * accumulate) == 0:
        ways.append(f"{reference // (batch * accumulate)} processes (trainer.devices x trainer.num_nodes)")
    if reference % (batch * world_size) == 0:
        ways.append(f"model.accumulate_grad_batches={reference // (batch * world_size)} on {world_size} process(es)")
    log.warning(
        "global batch %d (data.batch_size=%d x model.accumulate_grad_batches=%d x %d process(es)) is not the %d the "
        "recipe's learning rate, warm-up and steps are set for%s",
        batch * accumulate * world_size,
        batch,
        accumulate,
        world_size,
        reference,
        f": use {' or '.join(ways)}" if ways else "",
    )


def interval_error(cfg: DictConfig, error: ValueError) -> RunSettingError | None:
    """Lightning's refusal of a validation interval longer than an epoch (``trainer.check_val_every_n_epoch`` set)
    as a setting error naming the keys; None for other errors."""
    found = re.search(
        r"`val_check_interval` \((\d+)\) must be less than or equal to .* training batches \((\d+)\)", str(error)
    )
    if found is None:
        return None
    interval, batches = found.groups()
    return RunSettingError(
        f"trainer.val_check_interval={interval} with trainer.check_val_every_n_epoch="
        f"{cfg.trainer.get('check_val_every_n_epoch')}: Lightning counts the interval within an epoch, which has "
        f"{batches} training batches here. Leave trainer.check_val_every_n_epoch=null (the interval counts optimizer "
        f"steps across epochs) or give trainer.val_check_interval <= {batches}"
    )


def checkpoint_to_test(cfg: DictConfig) -> str:
    """``ckpt_path``, else the run folder's newest readable checkpoint (``hydra.run.dir=<run>``); never the untrained
    weights."""
    found = (
        str(cfg.ckpt_path)
        if cfg.get("ckpt_path")
        else newest_checkpoint(cfg.paths.checkpoint_dir, cfg.paths.output_dir)
    )
    if found is None:
        raise RunSettingError(
            "train=false test=true needs trained weights: give ckpt_path=<file.ckpt>, or hydra.run.dir=<a run "
            f"folder with checkpoints> ({cfg.paths.checkpoint_dir} has none)"
        )
    changed_settings(cfg, found)  # refuses a checkpoint of another module
    if not cfg.get("ckpt_path"):
        log.info("testing %s", found)
    return found


def newest_checkpoint(*folders: str) -> str | None:
    """The newest readable checkpoint of a run's ``folders`` by recorded step, whatever its kind (``last``,
    ``step_*``, SLURM ``hpc_ckpt_*``), saying which newer files were unreadable."""
    found, problems = find_resume_checkpoint(folder for folder in folders if Path(folder).is_dir())
    for problem in problems:
        log.warning(problem)
    return None if found is None else str(found)


def instantiate_datamodule(cfg: DictConfig, module: L.LightningModule) -> L.LightningDataModule:
    """``cfg.data`` with training batches of the module's ``accumulate_grad_batches`` micro-batches of
    ``data.batch_size`` samples (the reference's per-GPU batch): one training batch per optimizer step, which the
    module splits (see ``titok_lightning.lit.base``). Evaluation batches keep their size."""
    micro_batches, micro_batch_size = getattr(module, "accumulate_grad_batches", 1), cfg.data.batch_size
    if micro_batches == 1 or not isinstance(micro_batch_size, int):  # (the datamodule names a wrong batch_size)
        return hydra.utils.instantiate(cfg.data)
    val_batch_size = cfg.data.get("val_batch_size") or micro_batch_size
    return hydra.utils.instantiate(cfg.data, batch_size=micro_batch_size * micro_batches, val_batch_size=val_batch_size)


def route_lightning_logs() -> None:
    """Lightning, imported before Hydra configured logging, logs to its own console handler only; give its loggers
    the root logger's file handlers too, so that train.log holds Lightning's messages next to the project's."""
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    for name in ("lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        if logger.propagate:
            continue
        for handler in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
            logger.removeHandler(handler)  # the previous job's of a multirun (a closed handler would reopen its file)
        for handler in files:
            logger.addHandler(handler)


def instantiate_collection(cfg: DictConfig | None) -> list[Any]:
    """A config group holding several ``_target_`` entries (callbacks, loggers) -> list of objects."""
    if not cfg:
        return []
    return [hydra.utils.instantiate(node) for node in cfg.values() if node is not None and "_target_" in node]


# settings a resume restores from the checkpoint (optimizer states, the schedule's position and base rates): new
# values would apply in part or not at all, so they are refused rather than silently half-applied
RESTORED_ON_RESUME = ("model.optimizer", "model.scheduler")
# settings that name where this start writes, logs and what it resumes, not how the run trains
NOT_COMPARED_ON_RESUME = (
    "paths",
    "ckpt_path",
    "hydra",
    "logger",
    "trainer.default_root_dir",
    "callbacks.model_checkpoint.dirpath",
)


def flat_settings(node: Any, prefix: str = "") -> dict[str, Any]:
    """A resolved config as ``{"dotted.key": value}`` (lists are values)."""
    if not isinstance(node, dict):
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(flat_settings(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def changed_settings(cfg: DictConfig, ckpt_path: str) -> dict[str, str] | None:
    """The settings of this start that differ from those of the run that wrote ``ckpt_path`` (``config.yaml`` beside
    it), each described as ``key: old -> new``; None without that file. A checkpoint of another module is refused."""
    previous_file = Path(ckpt_path).parent / "config.yaml"
    if not previous_file.is_file():
        return None
    previous = flat_settings(OmegaConf.to_container(OmegaConf.load(previous_file), resolve=False))
    current = flat_settings(OmegaConf.to_container(job_config(cfg), resolve=True))
    if previous.get("model._target_") != current.get("model._target_"):
        raise ChangedOnResumeError(
            f"{ckpt_path} is a checkpoint of {previous.get('model._target_')} (task {previous.get('task_name')}); "
            f"this run {'tests' if not cfg.get('train', True) else 'trains'} {current.get('model._target_')}: "
            "give a checkpoint of this experiment"
        )
    return {
        key: f"{key}: {previous.get(key)!r} -> {current.get(key)!r}"
        for key in sorted(previous.keys() | current.keys())
        if previous.get(key) != current.get(key) and not key.startswith(NOT_COMPARED_ON_RESUME)
    }


def check_resumed_settings(cfg: DictConfig, ckpt_path: str) -> None:
    """Compare this start's settings with those of the run that wrote ``ckpt_path`` (``config.yaml`` beside it):
    refuse changed optimizer / schedule settings and a generator's changed tokenizer, say which other settings
    changed."""
    described = changed_settings(cfg, ckpt_path)
    if described is None:
        return
    changed = list(described)
    current = flat_settings(OmegaConf.to_container(job_config(cfg), resolve=True))
    if any(key.startswith("model.generator") for key in current):  # a generator is trained on its tokenizer's codes
        other_codes = [described[key] for key in changed if key.startswith("model.tokenizer")]
        if other_codes:
            raise ChangedOnResumeError(
                f"resuming {ckpt_path} with another tokenizer ({'; '.join(other_codes)}): the generator was trained "
                "on the codes of the run's own tokenizer, which another one's token ids do not mean. Start a new run "
                "folder (if the file only moved, give its old path or a link there)"
            )
    refused = [described[key] for key in changed if key.startswith(RESTORED_ON_RESUME)]
    if refused:
        raise ChangedOnResumeError(
            f"resuming {ckpt_path} with other optimizer or schedule settings ({'; '.join(refused)}): the "
            "checkpoint's optimizer states and schedule are restored, so these would not apply as written. Resume "
            "with the run's own settings, or start a new run folder"
        )
    for key in changed:
        note = " (the schedule is stretched to the new length from here on)" if key == "trainer.max_steps" else ""
        log.warning("resuming with a changed setting, %s%s", described[key], note)


def resolve_ckpt_path(cfg: DictConfig, trainer: L.Trainer) -> str | None:
    """Explicit ``ckpt_path`` wins; otherwise resume from the run folder's :func:`newest_checkpoint`. Either way the
    settings are compared with the resumed run's (:func:`check_resumed_settings`)."""
    if cfg.get("ckpt_path"):
        check_resumed_settings(cfg, str(cfg.ckpt_path))
        return str(cfg.ckpt_path)
    found = newest_checkpoint(cfg.paths.checkpoint_dir, trainer.default_root_dir)
    if found is None:
        return None
    log.info("resuming from %s", found)
    check_resumed_settings(cfg, found)
    return found


def resume_command(cfg: DictConfig) -> str:
    """The command that continues this run: its overrides with ``hydra.run.dir=<this run folder>`` (the default
    folder is new at every start) and without ``ckpt_path`` (which would win over the folder's newer checkpoints).
    A multirun job is continued alone this way."""
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in ("ckpt_path", "hydra.run.dir")]
    script = sys.argv[0] if Path(sys.argv[0]).name == "train.py" else "train.py"
    return shlex.join(["python", script, *kept, f"hydra.run.dir={Path(cfg.paths.output_dir).resolve()}"])


# run folder -> its lock, held until the process ends (a second train() in this process may reuse the folder)
_RUN_LOCKS: dict[str, RunLock] = {}


def hold_run_lock(cfg: DictConfig) -> None:
    """Refuse a run folder that another live process trains in (RunFolderInUseError), then clear the temporary
    checkpoint files a killed run left. Only the first process of a run takes the lock: other ranks, nodes and
    Lightning's re-launched workers share the folder."""
    folder = str(Path(cfg.paths.output_dir).resolve())
    if folder in _RUN_LOCKS or not _first_process_of_run():
        return
    _RUN_LOCKS[folder] = RunLock(folder).__enter__()
    for path in remove_temporary_files([cfg.paths.checkpoint_dir, folder]):
        log.info("removed %s, left by an interrupted checkpoint write", path)


def _first_process_of_run() -> bool:
    names = ["RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK"] + (["SLURM_PROCID"] if SLURMEnvironment.detect() else [])
    return all(int(os.environ.get(name) or 0) == 0 for name in names)


class SaveConfig(L.Callback):
    """Writes the resolved config next to the checkpoints (Hydra also keeps the composed one in .hydra/).

    At fit start, not before the trainer: ModelCheckpoint's setup warns that its folder "exists and is not empty",
    which on a fresh run would only ever be this file.
    """

    def __init__(self, resolved_config: dict, checkpoint_dir: str):
        # resolved here: Hydra's ${hydra:...} resolvers do not exist in processes started by ddp_spawn
        self.resolved_config = resolved_config
        self.checkpoint_dir = Path(checkpoint_dir)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and not trainer.fast_dev_run:  # a smoke run leaves a run's config as it was
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(OmegaConf.create(self.resolved_config), self.checkpoint_dir / "config.yaml")


def mean_image_baseline(datamodule: L.LightningDataModule) -> float | None:
    """Held-out MSE of predicting the mean training image (the embedded digits only; None otherwise)."""
    from datamodules.digits import DIGITS_SIZE, DigitsDataModule, load_digits_arrays

    if not isinstance(datamodule, DigitsDataModule) or datamodule.image_size != DIGITS_SIZE:
        return None
    arrays = load_digits_arrays()
    mean_image = arrays.train_images.mean(axis=0, keepdims=True)
    return float(((arrays.val_images - mean_image) ** 2).mean())


def report(
    cfg: DictConfig, trainer: L.Trainer, module: L.LightningModule, datamodule, logged: bool = True
) -> dict[str, float]:
    """Validate the final (EMA) weights on every held-out image and compare the reconstruction MSE with the mean-image
    baseline (skipped when validation is off, ``trainer.limit_val_batches=0``). It is logged as the last ``val/mse``
    unless ``logged=False`` (a rerun of a finished run: its row is there already) or the run's validations saw only
    ``limit_val_batches`` batches (the curve would end with a value of another set)."""
    baseline = mean_image_baseline(datamodule) if cfg.get("report_baseline") else None
    limit = trainer.limit_val_batches
    if baseline is None or limit == 0:
        return {}
    loggers = trainer.loggers
    every_batch = isinstance(limit, float) and limit == 1.0  # (the int 1 is one batch)
    trainer.loggers = loggers if logged and every_batch else []
    trainer.limit_val_batches = 1.0
    try:
        results = trainer.validate(module, datamodule=datamodule, verbose=False)
    finally:
        trainer.loggers, trainer.limit_val_batches = loggers, limit
    if not results or "val/mse" not in results[0]:  # no held-out data
        return {}
    mse = float(results[0]["val/mse"])
    metrics = {"val_mse": mse, "mean_image_mse": baseline, "ratio": mse / baseline}
    if trainer.is_global_zero:
        verdict = "PASS" if metrics["ratio"] <= 1 / 3 else "FAIL"
        print(
            f"\nHeld-out reconstruction MSE: {mse:.5f}   mean-image baseline: {baseline:.5f}   "
            f"ratio: {metrics['ratio']:.3f} ({verdict}: the bar is <= 0.333)\n"
            f"Run folder: {cfg.paths.output_dir}"
        )
        with open(Path(cfg.paths.output_dir) / "final_metrics.json", "w", encoding="utf-8") as file:
            json.dump(metrics, file, indent=1)
    return metrics


def train(cfg: DictConfig) -> dict[str, float]:
    """Instantiate data, model, callbacks, loggers and trainer from ``cfg``; fit, then optionally test."""
    check_mandatory(cfg)
    check_run_settings(cfg)
    test_ckpt_path = None if cfg.get("train", True) or not cfg.get("test", False) else checkpoint_to_test(cfg)
    if cfg.get("train", True):
        hold_run_lock(cfg)
    L.seed_everything(cfg.seed, workers=True)
    if cfg.get("float32_matmul_precision"):
        torch.set_float32_matmul_precision(cfg.float32_matmul_precision)

    module = hydra.utils.instantiate(cfg.model)
    datamodule = instantiate_datamodule(cfg, module)
    if cfg.get("test", False) and not is_overridden("test_step", module):  # before training, not after it
        raise RunSettingError(f"test=true: {type(module).__name__} has no test loop (it is for tokenizers)")
    callbacks = instantiate_collection(cfg.get("callbacks"))
    loggers = instantiate_collection(cfg.get("logger"))
    if not loggers:  # logger=none: the learning-rate monitor would refuse to start, having nowhere to write
        callbacks = [callback for callback in callbacks if not isinstance(callback, LearningRateMonitor)]
    hyperparameters = OmegaConf.to_container(job_config(cfg), resolve=True)
    callbacks.append(SaveConfig(hyperparameters, cfg.paths.checkpoint_dir))
    if cfg.get("train", True):
        command = resume_command(cfg)
        log.info("to resume this run after a stop or a crash: %s", command)
        for callback in callbacks:
            if isinstance(callback, ResumableCheckpoint):
                callback.resume_command = command
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    if trainer.is_global_zero and not trainer.fast_dev_run:
        check_global_batch(cfg, trainer.world_size)

    ckpt_path = resolve_ckpt_path(cfg, trainer) if cfg.get("train", True) else None
    if cfg.get("train", True) and ckpt_path is None:
        for logger in loggers:  # step 0: the records of a run killed before its first checkpoint would be doubled
            if hasattr(logger, "drop_steps_from"):  # before this start logs anything (its hyperparameters)
                logger.drop_steps_from(0)
    # the composed config reaches the loggers (W&B run config, TensorBoard hparams, CSV hparams.yaml); the
    # modules' own save_hyperparameters(logger=False) would show only their constructor arguments
    for logger in loggers:
        logger.log_hyperparams(hyperparameters)

    metrics: dict[str, float] = {}
    if cfg.get("train", True):
        start_step = checkpoint_global_step(ckpt_path) if ckpt_path is not None else 0
        with warnings.catch_warnings():
            if ckpt_path is not None and Path(ckpt_path).parent.resolve() == Path(cfg.paths.checkpoint_dir).resolve():
                # resuming in its own folder: of course the checkpoint folder is not empty
                warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            try:
                trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
            except ValueError as error:
                setting_error = interval_error(cfg, error)
                if setting_error is None:
                    raise
                raise setting_error from error
        trained = ckpt_path is None or trainer.global_step != start_step
        if not trained:
            log.info("%s is from step %d, where this run ends: nothing left to train", ckpt_path, start_step)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})
        if not trainer.fast_dev_run:
            metrics.update(report(cfg, trainer, module, datamodule, logged=trained))
    if cfg.get("test", False):
        try:
            results = trainer.test(module, datamodule=datamodule, ckpt_path=test_ckpt_path)
        except RuntimeError as error:
            if "Error(s) in loading state_dict" not in str(error):
                raise
            raise unfit_checkpoint_error(cfg, str(test_ckpt_path), error) from error
        for result in results:
            metrics.update(result)
    return metrics


def unfit_checkpoint_error(cfg: DictConfig, ckpt_path: str, error: RuntimeError) -> RunSettingError:
    """A checkpoint that does not fit the model of this start's settings, with the model settings its run differs in."""
    problem = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), str(error))
    described = changed_settings(cfg, ckpt_path) or {}
    model_changes = [text for key, text in described.items() if key.startswith("model.")]
    differ = f"; its run had other model settings ({'; '.join(model_changes[:8])})" if model_changes else ""
    return RunSettingError(
        f"{ckpt_path} does not fit the model these settings build ({problem[:300]}){differ}: test it with the "
        "settings it was trained with"
    )


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    restore_user_full_error()
    route_lightning_logs()
    with errors_in_one_line("train.py", USER_ERRORS):
        metrics = train(cfg)
    # a single number for Hydra sweepers (e.g. Optuna): the held-out reconstruction MSE when available
    value = metrics.get("val/mse", metrics.get("val_mse"))
    return None if value is None else float(value)


if __name__ == "__main__":
    run_cli(main, "train.py")
