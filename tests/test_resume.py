"""Exact resume after faults, run as a user runs train.py (subprocesses, real signals): SIGKILL during training and
during a checkpoint write, an unreadable newest checkpoint, SIGTERM, an exception, a second process on the same run
folder; each resumed run ends with exactly the tensors and metrics of a run that was never interrupted, on one
process and on two DDP processes."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules.images import ImageDataModule
from datamodules.tokens import TokenDataModule
from tests.test_train import digits_cache, tiny_overrides  # noqa: F401 (digits_cache: a fixture)
from titok_lightning.lit.resume import AtomicCheckpointIO, RunLock

ROOT = Path(__file__).resolve().parents[1]
# 12 batches per epoch (2 DataLoader workers): kills land mid-epoch and runs cross epoch boundaries; checkpoints every
# 6 steps (12 and 24 end an epoch, 30 is validated), validation every 10; the final step 35 is in last.ckpt only
SETTINGS = [
    "++data.samples_per_epoch=48",
    "data.num_workers=2",
    "trainer.max_steps=35",
    "trainer.val_check_interval=10",
    "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=5",
    "callbacks.model_checkpoint.every_n_train_steps=6",
    "report_baseline=false",
    # its codebook refresh rewrites weights inside the forward pass, which the failing batch of an exception keeps
    "++model.tokenizer.clustering_vq=false",
]


def command(run_dir: Path, cache: str, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "train.py",
        *tiny_overrides("demo"),
        f"data.cache_dir={cache}",
        *SETTINGS,
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]


def start(run_dir: Path, cache: str, *overrides: str, env: dict | None = None) -> subprocess.Popen:
    """train.py in its own process group (a kill takes its DataLoader workers and DDP ranks along, as a node loss)."""
    return subprocess.Popen(
        command(run_dir, cache, *overrides),
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(process: subprocess.Popen, expected_rc: int = 0) -> str:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == expected_rc, output[-4000:]
    return output


def wait_for(predicate, process: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(
                f"train.py ended (rc {process.returncode}) before {what}: {process.stdout.read()[-3000:]}"
            )
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def kill(process: subprocess.Popen, signum: int = signal.SIGKILL) -> None:
    os.killpg(process.pid, signum)
    process.communicate(timeout=120)


def checkpoint(run_dir: Path, name: str = "last.ckpt") -> dict:
    return torch.load(run_dir / "checkpoints" / name, map_location="cpu", weights_only=True)


def assert_identical(got, expected, folders: tuple[str, str], path: str = "checkpoint") -> None:
    """Every tensor equal (torch.equal) and every other value equal, recursively; paths inside the two run folders
    (``folders``: got's, expected's) compare relative to them."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == expected.dtype, path
        assert torch.equal(got, expected), f"{path}: max difference {(got.double() - expected.double()).abs().max()}"
    elif isinstance(expected, dict):
        assert got.keys() == expected.keys(), f"{path}: keys {set(got) ^ set(expected)}"
        for key in expected:
            assert_identical(got[key], expected[key], folders, f"{path}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected), path
        for index, (a, b) in enumerate(zip(got, expected)):
            assert_identical(a, b, folders, f"{path}[{index}]")
    elif isinstance(expected, str):
        assert got.replace(folders[0], "<run>") == expected.replace(folders[1], "<run>"), path
    else:
        assert got == expected, f"{path}: {got!r} != {expected!r}"


def metric_rows(run_dir: Path) -> list[dict]:
    """csv/metrics.csv without the wall-clock throughput column."""
    with open(run_dir / "csv" / "metrics.csv", newline="") as file:
        return [{k: v for k, v in row.items() if k != "train/samples_per_sec"} for row in csv.DictReader(file)]


def assert_same_run(run_dir: Path, reference: Path) -> None:
    assert_identical(checkpoint(run_dir), checkpoint(reference), (str(run_dir), str(reference)))
    assert metric_rows(run_dir) == metric_rows(reference)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, digits_cache) -> Path:  # noqa: F811
    """The run that is never interrupted."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    finish(start(run_dir, digits_cache))
    return run_dir


def test_uninterrupted_run_writes_the_final_weights_and_one_metrics_row_per_log(reference):
    assert checkpoint(reference)["global_step"] == 35  # checkpoints every 6 steps, and the last step anyway
    steps = sorted({int(row["step"]) for row in metric_rows(reference)})
    assert steps == [4, 9, 14, 19, 24, 29, 34]
    names = sorted(path.name for path in (reference / "checkpoints").iterdir())
    assert names == ["config.yaml", "last.ckpt", *[f"step_{s:08d}.ckpt" for s in range(6, 31, 6)]]


class SlowCheckpointIO(AtomicCheckpointIO):
    """Writes the step-18 checkpoint into its temporary file, then waits (for the test's SIGKILL) before renaming."""

    def write(self, checkpoint, file) -> None:
        super().write(checkpoint, file)
        if checkpoint["global_step"] == 18:
            file.flush()
            time.sleep(600)


class PoisonAt(L.Callback):
    """From global step ``step`` on, every loss is NaN (as an overflowing run): NonFiniteLossError under raise."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and not hasattr(pl_module.loss, "_unpoisoned"):
            forward = pl_module.loss._unpoisoned = pl_module.loss.forward

            def nan_loss(*args, **kwargs):
                loss, logs = forward(*args, **kwargs)
                return loss * float("nan"), logs

            pl_module.loss.forward = nan_loss


def test_faults_one_after_another_each_resume_exactly(reference, tmp_path, digits_cache):  # noqa: F811
    run_dir = tmp_path / "run"

    # 1. SIGKILL during training
    first = start(run_dir, digits_cache)
    wait_for(lambda: (run_dir / "checkpoints" / "last.ckpt").exists(), first, "the step-6 checkpoint")
    kill(first)
    killed_at = checkpoint(run_dir)["global_step"]
    assert 6 <= killed_at < 18

    # 2. SIGKILL while the step-18 checkpoint is being written: the temporary file is left, no truncated checkpoint;
    # while that run lives, a second train.py on the same folder is refused in one line
    plugin = "trainer.plugins=[{_target_:tests.test_resume.SlowCheckpointIO}]"
    writer = start(run_dir, digits_cache, plugin)
    temporary = lambda: list((run_dir / "checkpoints").glob(".tmp-step_00000018.ckpt-*"))
    wait_for(temporary, writer, "the step-18 checkpoint write")
    second = subprocess.run(command(run_dir, digits_cache), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode != 0
    last_line = second.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"train.py: error: run folder {run_dir}") and f"pid {writer.pid}" in last_line
    kill(writer)
    assert temporary() and not (run_dir / "checkpoints" / "step_00000018.ckpt").exists()
    assert checkpoint(run_dir, "step_00000012.ckpt")["global_step"] == 12
    # the newest checkpoint unreadable anyway (e.g. written by a non-atomic tool): the run falls back and says so
    last = run_dir / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])

    # 3. SIGTERM: a checkpoint of the current step, exit code 143
    terminated = start(run_dir, digits_cache)
    wait_for(lambda: (run_dir / "checkpoints" / "step_00000018.ckpt").exists(), terminated, "step 18")
    os.killpg(terminated.pid, signal.SIGTERM)
    output = finish(terminated, expected_rc=128 + signal.SIGTERM)
    assert f"cannot read checkpoint {last}" in output and "resuming from" in output and "step_00000012.ckpt" in output
    assert not temporary(), "the interrupted write's temporary file is cleaned up"
    stopped_at = checkpoint(run_dir)["global_step"]
    assert stopped_at >= 18 and f"SIGTERM: saved {last} at step {stopped_at}" in output

    # 4. an exception (NaN loss under nonfinite=raise) in the batch after step 30 and its validation: the last
    # complete step is saved
    poison = "+callbacks.poison={_target_:tests.test_resume.PoisonAt,step:30}"
    output = finish(start(run_dir, digits_cache, poison), expected_rc=1)
    assert "NonFiniteLossError: saved" in output and checkpoint(run_dir)["global_step"] == 30

    # 5. the same command once more: the run ends as if nothing had happened
    finish(start(run_dir, digits_cache))
    assert_same_run(run_dir, reference)


@pytest.mark.parametrize("validated", [False, True])
def test_a_run_ended_with_an_epoch_and_extended_ends_as_one_run(validated, reference, tmp_path, digits_cache):  # noqa: F811
    """Training to max_steps=12 (the end of the first epoch; with validation at that step or not), then in the same
    folder to the recipe's 35 steps, the user's "train longer": the tensors and metrics of one 35-step run. Resuming
    the finished epoch's counters, Lightning counted that epoch again and the data skipped one."""
    settings = ["trainer.val_check_interval=6"] if validated else []
    if validated:
        reference = tmp_path / "reference"
        finish(start(reference, digits_cache, *settings))
    run_dir = tmp_path / "run"
    finish(start(run_dir, digits_cache, "trainer.max_steps=12", *settings))
    assert checkpoint(run_dir)["global_step"] == 12
    finish(start(run_dir, digits_cache, *settings))
    assert_same_run(run_dir, reference)


def train_py_children(process: subprocess.Popen) -> list[int]:
    """The other ranks' processes that Lightning's DDP launcher started from this one (``python train.py ...``)."""
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
    return [int(pid) for pid in children if b"train.py" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def test_ddp_run_stopped_by_one_rank_then_killed_on_both_ranks_resumes_exactly(tmp_path, digits_cache):  # noqa: F811
    # train.py's own DDP launch (as on GPUs), on 2 CPU processes; the clustering quantizer draws random numbers on
    # each rank: every rank's random state is restored
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]
    ddp += ["data.num_workers=0", "++model.tokenizer.clustering_vq=true"]
    reference = tmp_path / "reference"
    finish(start(reference, digits_cache, *ddp))
    run_dir = tmp_path / "run"

    # SIGTERM to rank 1 only (a preempted node): rank 0 learns it from the ranks' agreement and writes the checkpoint
    process = start(run_dir, digits_cache, *ddp)
    wait_for(lambda: (run_dir / "checkpoints" / "step_00000006.ckpt").exists(), process, "step 6")
    (rank1,) = train_py_children(process)
    os.kill(rank1, signal.SIGTERM)
    output = finish(process, expected_rc=128 + signal.SIGTERM)
    stopped_at = checkpoint(run_dir)["global_step"]
    assert 6 <= stopped_at < 35 and f"SIGTERM: saved {run_dir / 'checkpoints' / 'last.ckpt'}" in output

    # the resumed run, SIGKILLed on both ranks after its next periodic checkpoint
    process = start(run_dir, digits_cache, *ddp)
    next_save = run_dir / "checkpoints" / f"step_{(stopped_at // 6 + 1) * 6:08d}.ckpt"
    wait_for(next_save.exists, process, next_save.name)
    kill(process)
    assert checkpoint(run_dir)["global_step"] < 35
    finish(start(run_dir, digits_cache, *ddp))
    assert_same_run(run_dir, reference)
    states = checkpoint(run_dir)["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["ranks"]
    assert len(states) == len(checkpoint(run_dir)["rng_states"]) == 2  # each rank's data position and random state


def logged_steps(run_dir: Path) -> list[tuple[int, list[str]]]:
    """(step, the metrics written) of every row of csv/metrics.csv."""
    return [(int(row["step"]), sorted(key for key, value in row.items() if value)) for row in metric_rows(run_dir)]


def test_an_accumulating_run_counts_optimizer_steps_and_a_sigterm_saves_between_them(reference, tmp_path, digits_cache):  # noqa: F811
    """model.accumulate_grad_batches=2: the run validates, logs, checkpoints and draws images at the optimizer steps
    where a run without accumulation does; SIGTERM saves between optimizer steps (never part of an accumulated
    step), and the resumed run ends exactly as an uninterrupted one."""
    accumulate = "model.accumulate_grad_batches=2"
    uninterrupted = tmp_path / "uninterrupted"
    finish(start(uninterrupted, digits_cache, accumulate))
    assert checkpoint(uninterrupted)["global_step"] == 35
    assert logged_steps(uninterrupted) == logged_steps(reference)
    for folder in ("checkpoints", "csv/images"):
        assert sorted(p.name for p in (uninterrupted / folder).iterdir()) == sorted(
            p.name for p in (reference / folder).iterdir()
        ), folder

    run_dir = tmp_path / "run"
    process = start(run_dir, digits_cache, accumulate)
    wait_for(lambda: (run_dir / "checkpoints" / "step_00000012.ckpt").exists(), process, "step 12")
    os.killpg(process.pid, signal.SIGTERM)
    output = finish(process, expected_rc=128 + signal.SIGTERM)
    stopped_at = checkpoint(run_dir)["global_step"]
    assert 12 <= stopped_at < 35 and f"SIGTERM: saved {run_dir / 'checkpoints' / 'last.ckpt'}" in output
    finish(start(run_dir, digits_cache, accumulate))
    assert_same_run(run_dir, uninterrupted)


@pytest.mark.parametrize("source, num_workers", [("shards", 0), ("shards", 2), ("jsonl", 2)])
def test_loader_continues_mid_epoch_from_its_saved_position(tmp_path, source, num_workers):
    from tests.test_datamodules import _class_samples, _write

    if source == "shards":
        shards = [_write(tmp_path, "a", _class_samples(30)[:7], 7), _write(tmp_path, "b", _class_samples(30)[7:], 5)]
        settings = {"train_shards": shards, "image_size": 8, "shuffle_buffer": 8, "shuffle_initial": 4}
        make = ImageDataModule
    else:
        path = tmp_path / "tokens.jsonl"
        path.write_text("".join(json.dumps({"class_id": i % 3, "tokens": [i, i]}) + "\n" for i in range(30)))
        settings, make = {"train_jsonl": str(path)}, TokenDataModule
    module = make(**settings, batch_size=2, num_workers=num_workers, pin_memory=False, rank=0, world_size=1, seed=3)
    module.setup("fit")
    loader = module.train_dataloader()
    epochs = [[batch for batch in loader] for _ in range(2)]  # the uninterrupted order, two epochs
    assert len(epochs[0]) == len(loader) and epochs[0][0]["class_id"].tolist() != epochs[1][0]["class_id"].tolist()

    interrupted = module.train_dataloader()
    interrupted.consumed = lambda: (0, 5)  # the trainer finished 5 batches of epoch 0
    batches = iter(interrupted)
    for _ in range(6):  # Lightning and the workers run ahead of the trainer
        next(batches)
    state = interrupted.state_dict()
    resumed = module.train_dataloader()
    resumed.load_state_dict(state)
    rest = [batch for batch in resumed]
    assert len(rest) == len(loader) - 5
    for got, expected in zip(rest + [batch for batch in resumed], epochs[0][5:] + epochs[1]):
        assert got.keys() == expected.keys()
        for key in expected:
            value, reference = got[key], expected[key]
            assert torch.equal(value, reference) if isinstance(value, torch.Tensor) else value == reference


def test_a_run_started_without_a_run_folder_prints_the_command_that_resumes_it(tmp_path, digits_cache):  # noqa: F811
    """The README's plain form gets a new time-stamped folder at every start, so "the same command" would begin again
    at step 0: the stop message prints the command that continues this run, and that command, as printed, does."""
    plain = [arg for arg in command(tmp_path, digits_cache) if not arg.startswith("hydra.run.dir=")]
    process = subprocess.Popen(
        plain,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PROJECT_ROOT": str(tmp_path)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    step_6 = lambda: list(tmp_path.glob("outputs/*/runs/*/checkpoints/step_00000006.ckpt"))
    wait_for(step_6, process, "step 6")
    os.killpg(process.pid, signal.SIGTERM)
    output = finish(process, expected_rc=128 + signal.SIGTERM)
    (run_dir,) = (path.parents[1] for path in step_6())
    printed = re.search(r"to resume: (.+)", output).group(1)
    assert printed.startswith("python train.py ") and printed.endswith(f"hydra.run.dir={run_dir}")
    stopped_at = checkpoint(run_dir)["global_step"]

    resumed = subprocess.run(
        [sys.executable, *shlex.split(printed)[1:]],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {run_dir / 'checkpoints' / 'last.ckpt'}" in resumed.stderr + resumed.stdout
    assert 6 <= stopped_at < 35 and checkpoint(run_dir)["global_step"] == 35
    assert len(list(tmp_path.glob("outputs/*/runs/*"))) == 1


def test_a_run_killed_alone_can_restart_at_once_while_its_workers_wind_down(tmp_path, digits_cache):  # noqa: F811
    """The OOM killer (or `kill -9 <pid>`) ends the training process but not its DataLoader workers, which live on
    for seconds: they must not hold the run folder's lock, or the immediate restart is refused as "in use"."""
    run_dir = tmp_path / "run"
    process = start(run_dir, digits_cache)  # data.num_workers=2
    wait_for(lambda: (run_dir / "checkpoints" / "step_00000006.ckpt").exists(), process, "step 6")
    workers = [int(pid) for pid in Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()]
    assert workers, "the run has DataLoader worker processes"
    os.kill(process.pid, signal.SIGKILL)  # the training process only
    process.wait(timeout=60)  # not communicate(): the workers hold its stdout open until they end
    process.stdout.close()
    assert any(Path(f"/proc/{pid}").exists() for pid in workers), "a worker outlives the training process"
    with RunLock(run_dir):  # what the restart takes first: free although the workers still run
        pass
    restarted = subprocess.run(command(run_dir, digits_cache), cwd=ROOT, capture_output=True, text=True, timeout=600)
    for pid in workers:  # whatever is left of them
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert checkpoint(run_dir)["global_step"] == 35


def test_ctrl_c_saves_the_current_step_and_a_second_one_stops_at_once(tmp_path, digits_cache):  # noqa: F811
    """Ctrl+C (SIGINT to the terminal's process group, the DataLoader workers included) writes the current step like
    SIGTERM and exits 130; the same folder resumes it. Lightning alone would stop with the last periodic checkpoint."""
    run_dir = tmp_path / "run"
    process = start(run_dir, digits_cache)  # data.num_workers=2
    wait_for(lambda: (run_dir / "checkpoints" / "step_00000006.ckpt").exists(), process, "step 6")
    os.killpg(process.pid, signal.SIGINT)
    output = finish(process, expected_rc=128 + signal.SIGINT)
    stopped_at = checkpoint(run_dir)["global_step"]
    assert (
        6 <= stopped_at < 35 and f"SIGINT: saved {run_dir / 'checkpoints' / 'last.ckpt'} at step {stopped_at}" in output
    )
    finish(start(run_dir, digits_cache))
    assert checkpoint(run_dir)["global_step"] == 35

    from callbacks.fault_tolerance import ResumableCheckpoint

    callback = ResumableCheckpoint()
    callback._handle(signal.SIGINT, None)  # the first: noted, saved at the batch end
    with pytest.raises(KeyboardInterrupt):
        callback._handle(signal.SIGINT, None)


def test_resuming_with_other_optimizer_settings_is_refused_and_other_changes_are_named(tmp_path, digits_cache):  # noqa: F811
    """The optimizer states and the schedule come back from the checkpoint, so a new learning rate given on resume
    would apply in part (the restored base rates times the new schedule) or not at all: refused in one line. Other
    changes (a longer run) go ahead with a warning that names them."""
    run_dir = tmp_path / "run"
    finish(start(run_dir, digits_cache, "trainer.max_steps=12"))
    refused = subprocess.run(
        command(run_dir, digits_cache, "trainer.max_steps=12", "model.optimizer.lr=1e-3"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    last_line = refused.stderr.strip().splitlines()[-1]
    assert last_line.startswith("train.py: error: resuming ") and "model.optimizer.lr: 0.002 -> 0.001" in last_line
    assert checkpoint(run_dir)["global_step"] == 12

    output = finish(start(run_dir, digits_cache, "trainer.max_steps=18"))
    assert "resuming with a changed setting, trainer.max_steps: 12 -> 18 (the schedule is stretched" in output
    assert checkpoint(run_dir)["global_step"] == 18

    # a checkpoint of another model: named as such, not as other optimizer settings
    config = run_dir / "checkpoints" / "config.yaml"
    config.write_text(config.read_text().replace("PixelTokenizerModule", "MaskGITModule"))
    refused = subprocess.run(command(run_dir, digits_cache), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 1, refused.stderr[-3000:]
    assert "MaskGITModule" in refused.stderr and "this run trains" in refused.stderr
