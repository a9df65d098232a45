"""The ways the project is used, run as a user types them (the README's own command blocks, sweeps through the
basic and submitit launchers included, run in tests/test_readme.py): the SLURM submission script,
``<Module>.load_from_checkpoint`` and ``Trainer.validate/test(ckpt_path=...)`` for every LightningModule on
checkpoints written by train.py, the run folder's log and logger hyperparameters, one-line errors, declared
dependencies, the demo from another working directory."""

from __future__ import annotations

import csv
import hashlib
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
import yaml
from omegaconf import OmegaConf

import titok_lightning.lit.generator as lit_generator
import titok_lightning.lit.tokenizer as lit_tokenizer
from tests import test_generator_training as generators
from tests.test_configs import CONF, ROOT
from tests.test_generator_training import tiny_data  # noqa: F401 (fixture)
from tests.test_train import digits_cache, run, tiny_overrides  # noqa: F401 (fixture)


def train_py(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python train.py <args>`` started from ``cwd`` (outputs/ goes there)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    env.pop("PROJECT_ROOT", None)
    command = [sys.executable, str(ROOT / "train.py"), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------- launchers
def test_slurm_launcher_config_is_a_complete_submission(tmp_path, monkeypatch):
    """The README's SLURM command with ``--cfg all --resolve``; submitit turns its launcher node into the sbatch
    script (a fake ``srun`` on PATH: submitit only checks that it exists)."""
    submitit = pytest.importorskip("submitit")
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    result = train_py(
        "hydra/launcher=slurm",
        "trainer=slurm",
        "experiment=titok_b64",
        "hydra.launcher.nodes=2",
        "hydra.launcher.gpus_per_node=4",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.timeout_min=4320",
        "data.train_shards=/data/train",
        "data.val_shards=/data/val",
        "--cfg",
        "all",
        "--resolve",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    cfg = yaml.safe_load(result.stdout)
    assert (cfg["trainer"]["devices"], cfg["trainer"]["num_nodes"]) == (4, 2)
    params = dict(cfg["hydra"]["launcher"])
    assert params.pop("_target_") == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert params["submitit_folder"].startswith("./outputs/titok_b64/multiruns/")

    # what hydra-submitit-launcher does with these parameters before it submits
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    folder = tmp_path / params.pop("submitit_folder")
    executor = submitit.AutoExecutor(
        folder=folder, cluster="slurm", slurm_max_num_timeout=params.pop("max_num_timeout")
    )
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    script = executor._executor._make_submission_file_text("python train.py", "0")
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--signal=USR2@120", "--time=4320"):
        assert f"#SBATCH {line}\n" in script, line
    assert "#SBATCH --partition=gpu\n" in script


# ----------------------------------------------------------------------------------- load_from_checkpoint
TOKENIZER_EXPERIMENTS = {
    "PixelTokenizerModule": "demo",
    "TiTokStage1Module": "titok_s128",
    "TiTokStage2Module": "titok_s128_stage2",
    "TATiTokModule": "tatitok_bl32_vq",
}
GENERATOR_EXPERIMENTS = {
    "MaskGITModule": "maskgit_titok_b64",
    "RARModule": "rar_b",
    "MaskGenVQModule": "maskgen_vq_l_stage1",
    "MaskGenKLModule": "maskgen_kl_l_stage1",
}
ONE_STEP = ["trainer.max_steps=1", "trainer.limit_val_batches=0", "report_baseline=false"]


def test_every_lightning_module_is_covered():
    targets = {OmegaConf.load(path)._target_.rsplit(".", 1)[-1] for path in (CONF / "model").glob("*.yaml")}
    assert targets == set(TOKENIZER_EXPERIMENTS) | set(GENERATOR_EXPERIMENTS)
    classes = {
        name: cls
        for module in (lit_tokenizer, lit_generator)
        for name, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, L.LightningModule) and cls.__module__ == module.__name__
    }
    assert targets <= classes.keys()
    for name in classes.keys() - targets:  # the others are base classes of the trained ones
        assert any(issubclass(classes[target], classes[name]) for target in targets), name


def train_one_step(module_name: str, tmp_path: Path, digits_cache: str, tiny_data: dict):  # noqa: F811
    """A checkpoint written by train.py's train() for the experiment that trains ``module_name``, at tiny size."""
    if module_name in TOKENIZER_EXPERIMENTS:
        cfg, _ = run([*tiny_overrides(TOKENIZER_EXPERIMENTS[module_name]), *ONE_STEP], tmp_path, digits_cache)
    else:
        experiment = GENERATOR_EXPERIMENTS[module_name]
        edits = generators.tiny_overrides(experiment, tiny_data, tmp_path)
        cfg, _ = generators.run_experiment(experiment, edits, tmp_path, tuple(ONE_STEP))
    return cfg, Path(cfg.paths.checkpoint_dir) / "last.ckpt"


@pytest.mark.parametrize("module_name", [*TOKENIZER_EXPERIMENTS, *GENERATOR_EXPERIMENTS])
def test_load_from_checkpoint_without_a_trainer(module_name, tmp_path, digits_cache, tiny_data):  # noqa: F811
    cfg, ckpt = train_one_step(module_name, tmp_path, digits_cache, tiny_data)
    cls = hydra.utils.get_class(cfg.model._target_)
    assert cls.__name__ == module_name
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    for device in ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]:
        loaded = cls.load_from_checkpoint(ckpt, map_location=device)
        assert type(loaded) is cls and loaded._trainer is None and loaded.device.type == device
        state = loaded.state_dict()
        # every saved tensor (the EMA weights of the trained network, discriminator, buffers) comes back as saved;
        # what the file leaves out is the frozen helpers, rebuilt from their own source
        assert saved.keys() <= state.keys()
        assert all(key.startswith(loaded.frozen_prefixes()) for key in state.keys() - saved.keys())
        for key, value in saved.items():
            assert torch.equal(state[key].cpu(), value), key


def test_validate_and_test_with_ckpt_path_use_the_checkpoint(tmp_path, digits_cache):  # noqa: F811
    cfg, ckpt = train_one_step("PixelTokenizerModule", tmp_path, digits_cache, {})
    datamodule = hydra.utils.instantiate(cfg.data)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, limit_val_batches=2, limit_test_batches=2
    )
    expected = trainer.validate(lit_tokenizer.PixelTokenizerModule.load_from_checkpoint(ckpt), datamodule=datamodule)
    fresh = hydra.utils.instantiate(cfg.model)  # random weights until the checkpoint is loaded
    (validated,) = trainer.validate(fresh, datamodule=datamodule, ckpt_path=ckpt)
    assert validated["val/mse"] == expected[0]["val/mse"]
    (tested,) = trainer.test(hydra.utils.instantiate(cfg.model), datamodule=datamodule, ckpt_path=ckpt)
    assert tested["test/mse"] == expected[0]["val/mse"]  # the test loop reads the same held-out digits

    # and as typed: train.py evaluating a checkpoint without training, given as a file or as its run folder (the
    # folder's newest checkpoint, the same one here), never the untrained weights
    for weights in (f"ckpt_path={ckpt}", f"hydra.run.dir={cfg.paths.output_dir}"):
        result = tiny_demo(tmp_path, digits_cache, "train=false", "test=true", weights, "trainer.limit_test_batches=2")
        assert result.returncode == 0, result.stderr[-3000:]
        assert mse_printed_by_test(result.stdout) == pytest.approx(expected[0]["val/mse"], rel=1e-6), weights

    # with settings that build another model: one line naming the settings its run differs in
    other = tiny_demo(
        tmp_path, digits_cache, "train=false", "test=true", f"ckpt_path={ckpt}", "model.tokenizer.codebook_size=64"
    )
    assert other.returncode == 1 and "Traceback" not in other.stderr, other.stderr[-3000:]
    last = other.stderr.strip().splitlines()[-1]
    assert last.startswith(f"train.py: error: {ckpt} does not fit the model these settings build (size mismatch"), last
    assert "its run had other model settings (model.tokenizer.codebook_size: " in last and "-> 64" in last, last


def tiny_demo(tmp_path: Path, digits_cache: str, *overrides: str) -> subprocess.CompletedProcess:  # noqa: F811
    """``python train.py`` of the demo experiment at test size on the embedded digits, in ``tmp_path``."""
    return train_py(*tiny_overrides("demo"), f"data.cache_dir={digits_cache}", *overrides, cwd=tmp_path)


def mse_printed_by_test(stdout: str) -> float:
    """``test/mse`` from the table Lightning prints after ``trainer.test``."""
    match = re.search(r"test/mse\W+([0-9.e-]+)", stdout)
    assert match, stdout[-3000:]
    return float(match.group(1))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train=false"], "train=false with test=false does nothing"),
        (["ckpt_path=last"], "To continue a run pass hydra.run.dir=<its folder>"),
        (["ckpt_path=best"], "To continue a run pass hydra.run.dir=<its folder>"),
        (["trainer.max_steps=null"], "training needs a positive trainer.max_steps"),
        (["trainer.max_steps=-1"], "training needs a positive trainer.max_steps"),
        (["train=false", "test=true", "hydra.run.dir=empty-run"], "train=false test=true needs trained weights"),
        (["trainer.accumulate_grad_batches=2"], "(did you mean model.accumulate_grad_batches?)"),
        (["+trainer.accumulate_grad_batches=2"], "use model.accumulate_grad_batches"),
        (["trainer.gradient_clip_val=1.0"], "(did you mean model.max_grad_norm?)"),
        (["+trainer.gradient_clip_val=1.0"], "use model.max_grad_norm"),
        (["trainer.devices=2"], "without a strategy: Lightning's default DDP stops"),
        (["trainer.num_nodes=2"], "without a strategy: Lightning's default DDP stops"),
        (["trainer.precision=64-true"], "use 32-true, bf16-mixed or 16-mixed"),
        (["trainer.precision=bf16-true"], "use 32-true, bf16-mixed or 16-mixed"),
        (
            ["trainer.check_val_every_n_epoch=1", "trainer.val_check_interval=100000"],
            "Leave trainer.check_val_every_n_epoch=null (the interval counts optimizer steps across epochs)",
        ),
    ],
    ids=[
        "nothing-to-do",
        "last",
        "best",
        "max_steps-null",
        "max_steps-minus-one",
        "test-without-weights",
        "accumulate",
        "accumulate-added",
        "clip",
        "clip-added",
        "devices",
        "nodes",
        "double",
        "bf16-weights",
        "interval-within-epochs",
    ],
)
def test_settings_lightning_would_run_wrongly_are_refused_in_one_line(overrides, message, tmp_path, digits_cache):  # noqa: F811
    result = tiny_demo(tmp_path, digits_cache, *overrides)
    assert result.returncode == 1, result.stdout[-2000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("train.py: error:")]
    assert message in line
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.rglob("*.ckpt")), "nothing trained"


def test_training_without_a_logger_runs(tmp_path, digits_cache):  # noqa: F811
    result = tiny_demo(
        tmp_path, digits_cache, "logger=none", "trainer.max_steps=2", "trainer.limit_val_batches=0", "hydra.run.dir=run"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "run" / "csv").exists()


def test_a_fast_dev_run_leaves_no_checkpoint_to_pick_up(tmp_path, digits_cache):  # noqa: F811
    """Lightning's smoke run: "checkpointing is suppressed". A 1-step last.ckpt would be the README's "newest run"."""
    result = tiny_demo(tmp_path, digits_cache, "trainer.fast_dev_run=true")
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs" / "demo" / "runs").iterdir()
    assert (run_dir / "train.log").is_file()
    assert not list(run_dir.rglob("*.ckpt")) and not (run_dir / "checkpoints" / "config.yaml").exists()


def test_an_epoch_limit_before_max_steps_is_named(tmp_path, digits_cache):  # noqa: F811
    result = tiny_demo(
        tmp_path, digits_cache, "++data.samples_per_epoch=8", "trainer.max_epochs=1", "trainer.limit_val_batches=0"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trainer.max_epochs=1 may stop training before trainer.max_steps=1000" in result.stdout + result.stderr


class BatchDigests(L.Callback):
    """Writes ``epoch batch_idx digest`` of every training batch's images to ``path`` (one line each)."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        digest = hashlib.md5(batch["image"].cpu().numpy().tobytes()).hexdigest()
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(f"{trainer.current_epoch} {batch_idx} {digest}\n")


def test_the_final_report_covers_every_held_out_image_whatever_limit_val_batches(tmp_path, digits_cache):  # noqa: F811
    # the report's MSE (final_metrics.json) against the test loop's on the same final weights and held-out digits;
    # the run's own validations see one batch, and their val/mse curve does not end with the report's value
    limits = ["trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.limit_val_batches=1"]
    result = tiny_demo(tmp_path, digits_cache, *limits, "test=true", "hydra.run.dir=run")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert report["val_mse"] == pytest.approx(mse_printed_by_test(result.stdout), rel=1e-6)
    logged = [
        row["val/mse"] for row in csv.DictReader(open(tmp_path / "run" / "csv" / "metrics.csv")) if row["val/mse"]
    ]
    assert len(logged) == 1 and float(logged[0]) != pytest.approx(report["val_mse"], rel=1e-6)


def test_debug_overfit_trains_on_the_same_batches_every_epoch(tmp_path, digits_cache):  # noqa: F811
    digests = tmp_path / "batches.txt"
    callback = f"+callbacks.digests={{_target_:tests.test_used_by.BatchDigests,path:{digests}}}"
    steps = ["trainer.max_steps=6", "trainer.limit_val_batches=1"]
    result = tiny_demo(tmp_path, digits_cache, "debug=overfit", *steps, callback)
    assert result.returncode == 0, result.stderr[-3000:]
    seen: dict[str, set[str]] = {}
    for line in digests.read_text().splitlines():
        _, batch_idx, digest = line.split()
        seen.setdefault(batch_idx, set()).add(digest)
    assert sorted(seen) == ["0", "1"] and len(digests.read_text().splitlines()) == 6  # 3 epochs of 2 batches
    assert all(len(digest) == 1 for digest in seen.values()), seen  # each epoch the same two batches
    assert seen["0"] != seen["1"]


def test_a_test_run_of_a_generator_is_refused_before_training(tiny_data, tmp_path):  # noqa: F811
    experiment = sorted(generators.EXPERIMENTS)[0]
    edits = generators.tiny_overrides(experiment, tiny_data, tmp_path)
    with pytest.raises(ValueError, match="has no test loop"):
        generators.run_experiment(experiment, edits, tmp_path, ("test=true",))
    assert not list(tmp_path.rglob("*.ckpt")), "refused before training"


# ----------------------------------------------------------------------------------- what a run folder holds
def test_run_folder_log_and_loggers_hold_the_composed_config(tmp_path, digits_cache):  # noqa: F811
    result = train_py(
        *tiny_overrides("demo"),
        "logger=many_loggers",
        "model.optimizer.lr=0.0007",
        "trainer.max_steps=2",
        "trainer.limit_val_batches=1",
        f"data.cache_dir={digits_cache}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs" / "demo" / "runs").iterdir()
    log = (run_dir / "train.log").read_text()
    assert "[lightning.pytorch.utilities.rank_zero][INFO] - GPU available: False" in log  # Lightning's
    assert "DigitsDataModule: counted 1497 training samples" in log  # the project's
    for hparams in (run_dir / "csv" / "hparams.yaml", run_dir / "tensorboard" / "hparams.yaml"):
        saved = OmegaConf.load(hparams)
        assert saved.model.optimizer.lr == 0.0007 and saved.trainer.max_steps == 2, hparams
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    session = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    assert session.hparams["model/optimizer/lr"].number_value == 0.0007
    (wandb_log,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    assert b"discriminator_lr" in wandb_log.read_bytes()  # the run config, in W&B's offline record file


# ------------------------------------------------------------------------------------------ bad overrides
def one_error_line(result: subprocess.CompletedProcess) -> str:
    """stderr's last line, after at most Lightning's start-up messages ("Seed set to 42", "GPU available: ...")."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    startup = ("Seed set to", "GPU available", "TPU available", "💡 Tip")
    assert all(line.startswith(startup) for line in lines[:-1]), result.stderr[-2000:]
    return lines[-1]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.optimizer.lr=abc"], "train.py: error: model: optimizer.lr must be a number, got 'abc'"),
        (["data.batch_size=abc"], "train.py: error: data: batch_size must be a positive integer, got 'abc'"),
        (["experiment=nope"], "train.py: error: In 'train': Could not find 'experiment/nope'; Available options in"),
        (  # a mistyped key: Hydra's advice to append it with + would only fail later, in Trainer(...)
            ["trainer.max_step=1"],
            "train.py: error: Could not override 'trainer.max_step'. To append to your config use "
            "+trainer.max_step=1 (did you mean trainer.max_steps or trainer.max_time or trainer.max_epochs?)",
        ),
        (  # the unknown key lies inside the override's value: named, with where it is
            ["experiment=maskgen_vq_l_stage1", "model.text_encoder={model_name:x,text_cfg:{width:32}}"],
            "train.py: error: Could not override 'model.text_encoder'. To append to your config use "
            "+model.text_encoder={model_name:x,text_cfg:{width:32}} (Key 'text_cfg' is not in struct: "
            "model.text_encoder.text_cfg)",
        ),
        (
            [
                "data=imagenet",
                "data.train_shards='/nope/train-{0..1}.tar'",
                "data.val_shards=/nope",
                "data.image_size=32",
            ],
            "train.py: error: ImageDataModule.train_shards: shard '/nope/train-0.tar' (from '/nope/train-{0..1}.tar') "
            "does not exist",
        ),
    ],
)
def test_bad_overrides_end_with_one_clear_line(overrides, message, tmp_path):
    assert one_error_line(train_py(*overrides, "trainer.max_steps=1", cwd=tmp_path)).startswith(message)
    # nothing was trained: no untrained last.ckpt that `ls -d runs/* | tail -1` would hand to sample.py or a resume
    assert not list(tmp_path.rglob("*.ckpt"))


def test_a_folder_with_the_shards_of_several_splits_is_refused_by_name(tmp_path):
    """pretokenize writes <split>-*.tar of every split into one --out folder: as data.train_shards that folder
    would feed the validation split into training, so it is refused with what to type instead."""
    folder = tmp_path / "tokens"
    folder.mkdir()
    for name in ("train-000000.tar", "train-000001.tar", "val-000000.tar"):
        (folder / name).write_bytes(b"")
    overrides = ["data=imagenet", f"data.train_shards={folder}", f"data.val_shards={folder}/val-000000.tar"]
    line = one_error_line(train_py(*overrides, "data.image_size=32", "trainer.max_steps=1", cwd=tmp_path))
    assert line == (
        f"train.py: error: ImageDataModule.train_shards: directory '{folder}' holds the shards of several splits "
        f"(train, val); name the one to read, e.g. '{folder}/train-*.tar'"
    )


def test_hydra_full_error_still_shows_the_traceback(tmp_path):
    result = train_py("model.optimizer.lr=abc", cwd=tmp_path, env={"HYDRA_FULL_ERROR": "1"})
    assert result.returncode == 1 and "Traceback (most recent call last)" in result.stderr


def test_missing_data_path_is_one_line_with_a_command_that_works_when_pasted(tmp_path):
    line = one_error_line(train_py("experiment=titok_b64", cwd=tmp_path))
    assert line.startswith("train.py: error: mandatory settings are not set: data.train_shards, data.val_shards")
    command = line.split("; e.g. ", 1)[1]
    assert command.startswith("python train.py experiment=titok_b64 ")
    # pasted into a shell (train.py from the checkout), it composes: the shell and Hydra's parser accept it
    pasted = command.replace("python train.py", f"{sys.executable} {ROOT / 'train.py'}", 1)
    shown = subprocess.run(
        ["bash", "-c", f"{pasted} --cfg job"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert shown.returncode == 0, shown.stderr[-2000:]
    data = yaml.safe_load(shown.stdout)["data"]
    assert data["train_shards"] == "/path/to/train-{0000..0099}.tar"
    assert data["val_shards"] == "/path/to/val-{0000..0099}.tar"


# ---------------------------------------------------------------------------------------------- dependencies
def test_every_directly_imported_package_is_declared():
    """Each third-party import of the library and its entry points names a distribution in pyproject.toml
    (dependencies, or an extra for the optional ones); tests' own imports are in the dev extra."""
    import ast
    import importlib.metadata

    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    optional = project["optional-dependencies"]

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}

    distributions = importlib.metadata.packages_distributions()
    local = {"titok_lightning", "datamodules", "callbacks", "train", "sample", "tests", "hydra_plugins"}

    def imported(paths) -> set[str]:
        found = set()
        for path in paths:
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    found |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.add(node.module.split(".")[0])
        third_party = found - set(sys.stdlib_module_names) - local - {"__future__"}
        return {distributions[name][0].lower().replace("_", "-") for name in third_party}

    library = [ROOT / "train.py", ROOT / "sample.py"]
    library += [p for d in ("titok_lightning", "datamodules", "callbacks") for p in (ROOT / d).rglob("*.py")]
    extras = names([r for extra, reqs in optional.items() if extra != "dev" for r in reqs])
    missing = imported(library) - names(project["dependencies"]) - extras
    assert not missing, f"imported but not declared in pyproject.toml: {sorted(missing)}"
    tests = [*(ROOT / "tests").rglob("*.py"), *(ROOT / "scripts").rglob("*.py")]
    missing = imported(tests) - names(project["dependencies"]) - names(optional["dev"])
    assert not missing, f"imported by tests/scripts but not in the dev extra: {sorted(missing)}"


# ------------------------------------------------------------------------------------------------------- demo
class FirstStageDone(Exception):
    """Stops the demo after its first stage."""


def test_demo_runs_from_any_working_directory(tmp_path, monkeypatch, digits_cache):  # noqa: F811
    """`python -m titok_lightning.demo` started outside the checkout: its first stage (train.py, at tiny size)
    runs and writes under the working directory's outputs/; the remaining stages with a failing check exit 1."""
    from titok_lightning import demo

    monkeypatch.chdir(tmp_path)
    results = []

    def first_stage_only(name, command, timings):
        tiny = [*tiny_overrides("demo"), *ONE_STEP, f"data.cache_dir={digits_cache}"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        results.append(subprocess.run([*command, *tiny], env=env, capture_output=True, text=True, timeout=600))
        raise FirstStageDone

    monkeypatch.setattr(demo, "run_stage", first_stage_only)
    with pytest.raises(FirstStageDone):
        demo.main([])
    assert results[0].returncode == 0, results[0].stderr[-3000:]
    (root,) = (tmp_path / "outputs" / "demo_pipeline").iterdir()
    tokenizer = root / "tokenizer" / "checkpoints" / "last.ckpt"
    assert tokenizer.is_file()

    # the rest as typed, with that one-step tokenizer and a one-step generator: its samples are noise to the digit
    # classifier, so the check prints FAIL and the demo exits 1 (scripts and CI must not read a failed demo as done)
    rest = [sys.executable, "-m", "titok_lightning.demo", "--root", str(tmp_path / "rest"), "--tokenizer"]
    rest += [str(tokenizer), "--num-per-class", "2", *ONE_STEP]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TITOK_LIGHTNING_CACHE": digits_cache}
    result = subprocess.run(rest, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-3000:]
    assert "(FAIL: the bar is 70%)" in result.stdout
    metrics = json.loads((tmp_path / "rest" / "demo_metrics.json").read_text())
    assert metrics["passed"] is False and metrics["num_samples"] == 20
