"""What lets a run continue where it stopped: atomic checkpoint files, the choice of the checkpoint to resume from,
a lock on the run folder, a CSV logger that continues its file and a W&B logger that continues its run.

- `AtomicCheckpointIO` writes a checkpoint into a temporary file beside its target, fsyncs it and renames it into
  place, so a kill, a full disk or a temporary folder on another filesystem never leaves a truncated checkpoint.
- `find_resume_checkpoint` picks the newest checkpoint by the step recorded inside it, whatever its name (``last``,
  ``step_*``, SLURM's ``hpc_ckpt_*``), and falls back to the next one when a file cannot be read.
- `RunLock` refuses a second live process on the same run folder; the kernel releases it when its holder dies.
- `ResumableCSVLogger` appends to ``metrics.csv`` and drops the rows a killed run logged after its checkpoint (all
  of them when train.py starts from no checkpoint: a run killed before its first checkpoint starts again at step 0);
  `ResumableTensorBoardLogger` hides those steps from TensorBoard. Both offer ``drop_steps_from(step)``.
- `ResumableWandbLogger` keeps one W&B run per run folder: its id is persisted in the folder, so a restart there
  continues the same W&B run.
"""

from __future__ import annotations

import csv
import fcntl
import logging
import os
import secrets
import socket
import string
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only

from titok_lightning.loading import checkpoint_global_step

log = logging.getLogger(__name__)

TEMP_PREFIX = ".tmp-"  # temporary checkpoint files: <folder>/.tmp-<name>-<random>


# ------------------------------------------------------------------------------------------------ checkpoint files
class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose local writes are atomic: temporary file in the target's folder, ``fsync``,
    ``os.replace``, ``fsync`` of the folder. Remote paths (``s3://`` ...) keep Lightning's writer."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.parent / f"{TEMP_PREFIX}{target.name}-{secrets.token_hex(4)}"
        try:
            with open(temporary, "xb") as file:  # permissions from the umask, as a plain write would have
                self.write(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, target)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        _fsync_folder(target.parent)

    def write(self, checkpoint: dict[str, Any], file) -> None:
        """Serialise ``checkpoint`` into the open temporary ``file``."""
        torch.save(checkpoint, file)


def _fsync_folder(folder: Path) -> None:
    """Make a rename durable (some filesystems refuse to open a folder for this: then the rename has to do)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def remove_temporary_files(folders: Iterable[str | os.PathLike]) -> list[Path]:
    """Delete the temporary checkpoint files a killed writer left behind; returns them."""
    removed = []
    for folder in folders:
        for path in Path(folder).glob(f"{TEMP_PREFIX}*"):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def find_resume_checkpoint(folders: Iterable[str | os.PathLike]) -> tuple[Path | None, list[str]]:
    """The newest readable checkpoint in ``folders`` by its recorded step (ties: the newer file), and one line
    for each newer file that could not be read."""
    candidates = []
    for folder in folders:
        candidates += [path for path in Path(folder).glob("*.ckpt") if path.is_file()]
    problems, readable = [], []
    for path in candidates:
        try:
            step = checkpoint_global_step(path)
            if step is None:
                raise KeyError("global_step")
            readable.append((int(step), path.stat().st_mtime, path))
        except Exception as error:  # a truncated or foreign file is only a reason to look further
            problems.append((path, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"))
    if not readable:
        return None, [f"cannot read checkpoint {path} ({why})" for path, why in problems]
    step, mtime, best = max(readable)
    newer = [(path, why) for path, why in problems if path.stat().st_mtime > mtime]
    return best, [f"cannot read checkpoint {path} ({why}); resuming from {best} (step {step})" for path, why in newer]


# ------------------------------------------------------------------------------------------------------- run lock
class RunFolderInUseError(RuntimeError):
    """Another live process trains in this run folder."""


class RunLock:
    """An exclusive ``flock`` on ``<folder>/.lock`` for as long as the run lives (context manager).

    The kernel drops the lock when the holder exits or is killed, so a killed run never leaves it stale. The file
    names the holder (host and pid) for the refusal message. A forked child (a DataLoader worker) would share the
    lock and keep it for the seconds it outlives a killed run, so children let go of it at fork.
    """

    _held: set[int] = set()  # descriptors of the locks this process holds
    _fork_hook_registered = False

    @classmethod
    def _release_in_child(cls) -> None:
        devnull = os.open(os.devnull, os.O_RDONLY)
        for fd in cls._held:  # the descriptor stays valid (now /dev/null): the child's file object closes cleanly
            os.dup2(devnull, fd)
        os.close(devnull)
        cls._held.clear()

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / ".lock"
        self._file = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            file.seek(0)
            holder = file.read().strip() or "another process"
            file.close()
            raise RunFolderInUseError(
                f"run folder {self.path.parent} is in use by {holder}; wait for it to end, stop it, or choose "
                "another hydra.run.dir"
            ) from None
        file.seek(0)
        file.truncate()
        file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        file.flush()
        self._file = file
        if not RunLock._fork_hook_registered:
            os.register_at_fork(after_in_child=RunLock._release_in_child)
            RunLock._fork_hook_registered = True
        RunLock._held.add(file.fileno())
        return self

    def __exit__(self, *exc_info) -> None:
        if self._file is not None:
            RunLock._held.discard(self._file.fileno())
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


# ------------------------------------------------------------------------------------------------------ CSV logger
class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, but an existing ``metrics.csv`` is continued (its columns kept) instead of deleted."""

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="", encoding="utf-8") as file:
                self.metrics_keys = sorted(next(csv.reader(file), []))

    def drop_rows_from(self, step: int) -> int:
        """Remove the rows written at ``step`` or later (a killed run's steps after its checkpoint; all rows for a run
        that starts at step 0) from the file, not the rows this run logged and has not written yet; returns how many.
        With no row left the file goes too, so its header gets this run's columns only."""
        if not os.path.isfile(self.metrics_file_path):
            return 0
        with open(self.metrics_file_path, newline="", encoding="utf-8") as file:
            rows = list(csv.DictReader(file))
        kept = [row for row in rows if int(row["step"]) < step]
        if not kept:
            os.remove(self.metrics_file_path)
            self.metrics_keys = []
        elif len(kept) < len(rows):
            with open(self.metrics_file_path, "w", newline="", encoding="utf-8") as file:
                writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(kept)
        return len(rows) - len(kept)


class ResumableCSVLogger(CSVLogger):
    """CSVLogger whose ``metrics.csv`` survives a resume: rows are appended, and the checkpoint callback drops the
    rows logged after the checkpoint the run resumed from (they are logged again).

    ``train.py`` drops all rows of a fit that starts from no checkpoint (a run killed before its first checkpoint
    and started again in its folder begins at step 0)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> _AppendingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def drop_steps_from(self, step: int) -> None:
        """Remove the rows of ``step`` and later from ``metrics.csv`` (they are logged again)."""
        dropped = self.experiment.drop_rows_from(step)
        if dropped:
            log.info("dropped %d rows of step %d or later from metrics.csv (they are logged again)", dropped, step)


# ---------------------------------------------------------------------------------------------- TensorBoard logger
class ResumableTensorBoardLogger(TensorBoardLogger):
    """TensorBoardLogger whose event files read as one run across restarts in the same folder (``version: ""``).

    A restarted run logs again the steps a killed run had logged after its checkpoint; TensorBoard would draw both.
    ``drop_steps_from`` writes the session-start event that ``SummaryWriter(purge_step=step)`` writes when it opens
    (TensorBoard then hides the earlier files' events at ``step`` or later), at the point where the step is known.
    The placeholder ``hp_metric`` (and the HParams summary) is logged at the folder's first start only: at step 0, a
    restart's would be a second point there."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._continues = bool(self._fs.glob(os.path.join(self.log_dir, "events.out.tfevents.*")))

    @rank_zero_only
    def drop_steps_from(self, step: int) -> None:
        """Hide the events logged at ``step`` or later by earlier starts (they are logged again)."""
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        self.experiment._get_file_writer().add_event(Event(step=step, session_log=SessionLog(status=SessionLog.START)))
        self._continues = self._continues and step > 0

    @rank_zero_only
    def log_hyperparams(self, params: Any, metrics: dict[str, Any] | None = None, step: int | None = None) -> None:
        if metrics is None and self._continues:
            metrics = {}  # hparams.yaml only: the earlier start's placeholder stands
        super().log_hyperparams(params, metrics=metrics, step=step)


# ---------------------------------------------------------------------------------------------------- W&B logger
RUN_ID_FILE = "run-id"  # <save_dir>/wandb/run-id: the W&B run id of the run folder
_ID_CHARACTERS = string.ascii_lowercase + string.digits  # as W&B's own ids


def persistent_run_id(save_dir: str | os.PathLike) -> str:
    """The W&B run id of the run folder ``save_dir``: read from ``<save_dir>/wandb/run-id``, or a new random one
    written there the first time (atomically: concurrent ranks or processes all get the id of the first writer)."""
    path = Path(save_dir) / "wandb" / RUN_ID_FILE
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.parent / f"{TEMP_PREFIX}{RUN_ID_FILE}-{secrets.token_hex(4)}"
        temporary.write_text("".join(secrets.choice(_ID_CHARACTERS) for _ in range(8)) + "\n", encoding="utf-8")
        try:
            os.link(temporary, path)  # fails if another process published its id first
        except FileExistsError:
            pass
        finally:
            temporary.unlink()
    return path.read_text(encoding="utf-8").strip()


class ResumableWandbLogger(WandbLogger):
    """WandbLogger that keeps one W&B run per run folder: without an explicit ``id``/``version``, the id is the one
    persisted in ``<save_dir>/wandb/run-id`` (created by the folder's first start), and Lightning's
    ``resume="allow"`` continues that run when the folder's run is started again; a new folder gets a new id.

    A logger class and not a config resolver: a resolver would have to be registered by everything that composes the
    config (train.py, the tests, sample.py) before the config is resolved. A persisted random id and not a hash of
    the folder's path: a path used again after its folder was deleted, or the same path on another machine, must not
    continue an unrelated W&B run."""

    def __init__(
        self,
        name: str | None = None,
        save_dir: str | os.PathLike | None = ".",
        version: str | None = None,
        *,
        dir: str | os.PathLike | None = None,
        id: str | None = None,
        **kwargs: Any,
    ):
        if id is None and version is None:  # WandbLogger's folder: save_dir, else dir
            id = persistent_run_id(save_dir if save_dir is not None else dir if dir is not None else ".")
        super().__init__(name=name, save_dir=save_dir, version=version, dir=dir, id=id, **kwargs)
