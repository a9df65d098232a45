"""The loggers' records across a restart in the same run folder, run as a user runs train.py (subprocesses, real
signals): ``csv/metrics.csv`` and TensorBoard's view of a run killed (before or after its first checkpoint) and
started again read as one uninterrupted run, a rerun of a finished run adds no record, and a run stopped by SIGTERM
and started again stays one W&B run (offline, no network)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

from tests.test_resume import ROOT, command, finish, kill, metric_rows, start, wait_for
from tests.test_train import digits_cache  # noqa: F401 (a fixture)
from titok_lightning.lit.resume import ResumableCSVLogger, ResumableWandbLogger, persistent_run_id

NO_PERIODIC_CHECKPOINT = "callbacks.model_checkpoint.every_n_train_steps=1000"  # only last.ckpt, when training ends
CSV_AND_TENSORBOARD = "logger=[csv,tensorboard]"  # Hydra's list of a group's options: both loggers


def rows_written(run_dir: Path) -> int:
    path = run_dir / "csv" / "metrics.csv"
    return max(len(path.read_text().splitlines()) - 1, 0) if path.exists() else 0


def tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar as TensorBoard shows it, (step, value) in order, read from all of the folder's event files by
    TensorBoard's own loader (which applies a restart's purge); without the wall-clock throughput."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: [(event.step, event.value) for event in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
        if tag != "train/samples_per_sec"
    }


def assert_same_tensorboard(run_dir: Path, reference: Path) -> None:
    got, expected = tensorboard_scalars(run_dir), tensorboard_scalars(reference)
    assert got.keys() == expected.keys()
    for tag, points in expected.items():
        assert [step for step, _ in got[tag]] == [step for step, _ in points], f"{tag}: no step twice"
        assert got[tag] == points, tag


def test_a_run_killed_before_its_first_checkpoint_starts_its_metrics_again(tmp_path, digits_cache):  # noqa: F811
    reference = tmp_path / "reference"
    finish(start(reference, digits_cache, NO_PERIODIC_CHECKPOINT, CSV_AND_TENSORBOARD))
    run_dir = tmp_path / "run"

    killed = start(run_dir, digits_cache, NO_PERIODIC_CHECKPOINT, CSV_AND_TENSORBOARD)
    wait_for(lambda: rows_written(run_dir) >= 2, killed, "two metrics rows")  # steps 4 and 9 (log_every_n_steps=5)
    kill(killed)
    assert not list((run_dir / "checkpoints").glob("*.ckpt")), "killed before any checkpoint: nothing to resume"
    assert rows_written(run_dir) >= 2

    output = finish(start(run_dir, digits_cache, NO_PERIODIC_CHECKPOINT, CSV_AND_TENSORBOARD))
    assert "resuming from" not in output
    got, expected = metric_rows(run_dir), metric_rows(reference)
    assert [row["step"] for row in got] == [row["step"] for row in expected], "no step twice"
    assert got == expected
    assert_same_tensorboard(run_dir, reference)


def test_a_run_killed_after_a_checkpoint_shows_each_step_once_in_tensorboard(tmp_path, digits_cache):  # noqa: F811
    reference = tmp_path / "reference"
    finish(start(reference, digits_cache, CSV_AND_TENSORBOARD))
    run_dir = tmp_path / "run"

    killed = start(run_dir, digits_cache, CSV_AND_TENSORBOARD)
    # a checkpoint at step 12, then the rows of steps 14 and 19 (and validation at 20): logged twice after the restart
    wait_for(lambda: rows_written(run_dir) >= 8, killed, "the rows of step 19")
    kill(killed)
    logged = [step for step, _ in tensorboard_scalars(run_dir)["train/total_loss"]]
    assert max(logged) >= 14, "logged after the checkpoint"

    output = finish(start(run_dir, digits_cache, CSV_AND_TENSORBOARD))
    assert "resuming from" in output
    assert metric_rows(run_dir) == metric_rows(reference)
    assert_same_tensorboard(run_dir, reference)


def test_running_a_finished_run_again_reports_without_adding_records(tmp_path, digits_cache):  # noqa: F811
    run_dir = tmp_path / "run"
    # every held-out batch in each validation: the report's validation is then logged (with a limit it is not)
    report = ("report_baseline=true", "trainer.limit_val_batches=1.0")
    first = finish(start(run_dir, digits_cache, CSV_AND_TENSORBOARD, *report))
    rows, scalars = metric_rows(run_dir), tensorboard_scalars(run_dir)
    assert rows[-1]["step"] == "35" and rows[-1]["val/mse"], "the report's validation of the final weights is logged"

    again = finish(start(run_dir, digits_cache, CSV_AND_TENSORBOARD, *report))
    assert "nothing left to train" in again
    report_line = next(line for line in first.splitlines() if line.startswith("Held-out reconstruction MSE"))
    assert report_line in again.splitlines(), "the report is printed again"
    assert metric_rows(run_dir) == rows
    assert tensorboard_scalars(run_dir) == scalars


# ------------------------------------------------------------------------------------------------------------- W&B
def wandb_env(tmp_path: Path) -> dict:
    """Offline W&B, its own settings and caches under tmp_path, and a server address that refuses connections: a
    network attempt fails instead of reaching wandb.ai."""
    home = tmp_path / "wandb-home"
    return {
        "WANDB_MODE": "offline",
        "WANDB_BASE_URL": "http://127.0.0.1:9",
        "WANDB_API_KEY": "",
        "WANDB_CONFIG_DIR": str(home / "config"),
        "WANDB_CACHE_DIR": str(home / "cache"),
        "WANDB_DATA_DIR": str(home / "data"),
        "WANDB_SILENT": "true",
    }


def start_wandb(run_dir: Path, cache: str, env: dict, *overrides: str) -> subprocess.Popen:
    """``start`` (same command) with logger=many_loggers (CSV, TensorBoard and W&B) in place of logger=csv."""
    args = [arg if arg != "logger=csv" else "logger=many_loggers" for arg in command(run_dir, cache, *overrides)]
    assert "logger=many_loggers" in args
    return subprocess.Popen(
        args,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def offline_run_ids(run_dir: Path) -> list[str]:
    """The ids of the W&B runs this folder's starts wrote: ``<run>/wandb/offline-run-<time>-<id>``, one per start."""
    return [path.name.rsplit("-", 1)[1] for path in sorted((run_dir / "wandb").glob("offline-run-*"))]


def test_a_run_stopped_and_started_again_is_one_wandb_run(tmp_path, digits_cache):  # noqa: F811
    env = wandb_env(tmp_path)
    run_dir = tmp_path / "run"
    stopped = start_wandb(run_dir, digits_cache, env)
    wait_for(lambda: (run_dir / "checkpoints" / "step_00000006.ckpt").exists(), stopped, "step 6")
    os.killpg(stopped.pid, signal.SIGTERM)
    finish(stopped, expected_rc=128 + signal.SIGTERM)
    (first,) = offline_run_ids(run_dir)

    output = finish(start_wandb(run_dir, digits_cache, env))
    assert "resuming from" in output
    assert offline_run_ids(run_dir) == [first, first], "the restart continues the same W&B run"
    assert (run_dir / "wandb" / "run-id").read_text().strip() == first

    other = tmp_path / "other"
    finish(start_wandb(other, digits_cache, env, "trainer.max_steps=2"))
    (second,) = offline_run_ids(other)
    assert second != first, "another run folder is another W&B run"


# ------------------------------------------------------------------------------------------- the logic, in process
def test_the_run_id_is_kept_in_its_folder_and_an_explicit_id_wins(tmp_path):
    first = persistent_run_id(tmp_path / "a")
    assert first == persistent_run_id(tmp_path / "a") == (tmp_path / "a" / "wandb" / "run-id").read_text().strip()
    assert persistent_run_id(tmp_path / "b") != first
    assert re.fullmatch(r"[a-z0-9]{8}", first)
    logger = ResumableWandbLogger(save_dir=tmp_path / "a", offline=True)
    assert logger._wandb_init["id"] == first and logger._wandb_init["resume"] == "allow"
    explicit = ResumableWandbLogger(save_dir=tmp_path / "c", offline=True, id="given")
    assert explicit._wandb_init["id"] == "given" and not (tmp_path / "c" / "wandb" / "run-id").exists()


def test_dropping_every_row_starts_the_file_again_with_the_new_runs_columns(tmp_path):
    old = ResumableCSVLogger(tmp_path, name="csv", version="")
    old.log_metrics({"train/loss": 1.0}, step=4)
    old.log_metrics({"train/loss": 0.5, "val/mse": 0.1}, step=9)
    old.save()
    logger = ResumableCSVLogger(tmp_path, name="csv", version="")
    logger.drop_steps_from(0)
    logger.log_metrics({"train/loss": 2.0}, step=0)
    logger.save()
    rows = metric_rows(tmp_path)
    assert [row["train/loss"] for row in rows] == ["2.0"] and "val/mse" not in rows[0]
