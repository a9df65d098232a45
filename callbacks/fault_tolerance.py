"""Checkpoints that a run resumes from exactly, also after signals and errors.

`ResumableCheckpoint` is Lightning's ModelCheckpoint (periodic ``step_*.ckpt`` plus ``last.ckpt``) with:

- checkpoints written when everything of their step is done (its metrics logged, its validation run): at the start
  of the next batch, or when training ends; the resumed run continues with the next batch;
- every rank's random number generators (torch, CUDA, numpy, Python) in each checkpoint, restored when training
  resumes;
- SIGTERM, SIGUSR1 and SIGUSR2 (SLURM's warning before the time limit, ``hydra.launcher.signal_delay_s``): the ranks
  agree at the end of the current batch (with several ranks the next one: the agreement is read a batch late so
  that no step waits for it), write ``last.ckpt``, requeue the SLURM job when the signal is the warning
  (or say in one line that ``scontrol`` is not there), and exit with 128 + the signal's number (0 when requeued);
- an exception (e.g. ``NonFiniteLossError``) writes ``last.ckpt`` with the last complete step before it propagates
  (nothing when no step completed in this process):
  the failing batch's in-place buffer updates and random draws are undone, and if an optimizer already stepped
  within it nothing is saved (never a half step). Parameters a forward pass rewrites in place (the clustering
  quantizer's codebook refresh) keep the failing batch's rewrite;
- ``last.ckpt`` at the final step when training ends, whatever the periodic interval (a longer run in the same folder
  continues from it exactly, also when training ended with an epoch);
- the loggers flushed with every checkpoint, and on resume the rows a killed run logged after its checkpoint dropped
  (``ResumableCSVLogger``), so the metrics file reads as if the run had never stopped.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.trainer.states import TrainerFn
from tqdm import tqdm

from titok_lightning.lit.base import HostMirror, NonFiniteLossError

log = logging.getLogger(__name__)

STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")
REQUEUE_SIGNALS = ("SIGUSR1", "SIGUSR2")


class TrainingStopped(SystemExit):
    """Raised on every rank after a signal's checkpoint was written; the process exits with ``code``."""


class ResumableCheckpoint(ModelCheckpoint):
    """ModelCheckpoint for exact resumption (see the module docstring).

    Args:
        signals: names of the signals that save and stop (default SIGTERM, SIGINT, SIGUSR1, SIGUSR2; a second
            SIGINT, i.e. Ctrl+C twice, stops at once without a checkpoint).
        requeue: after SIGUSR1/SIGUSR2 under SLURM, requeue the job with ``scontrol requeue``.
        Others: as ModelCheckpoint.

    ``resume_command`` (set by ``train.py``): the command that continues the run, printed when a signal stops it.
    """

    resume_command: str | None = None

    def __init__(self, *args, signals: tuple[str, ...] | list[str] = STOP_SIGNALS, requeue: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.signals = [signal.Signals[name] if isinstance(name, str) else signal.Signals(name) for name in signals]
        self.requeue = requeue
        self._received: int = 0  # signal number seen by this process (set in the handler)
        self._previous_handlers: dict[int, Any] = {}
        self._validated = False  # whether validation ran after the last complete batch
        # how a checkpoint written now is rewritten to read as saved at a batch boundary (None: as it is)
        self._rewrite: Callable[[dict[str, Any], bool], None] | None = None
        self._rng_to_restore: dict[str, Any] | None = None
        self._resumed = False
        self._optimizer_steps = 0
        self._batch_started_at: int | None = None  # optimizer steps when the running batch began
        self._saved_buffers: list[torch.Tensor] = []
        self._buffers_at_batch_start: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._rng_at_batch_start: dict[str, Any] = {}
        self._agreement = HostMirror()  # the ranks' pending stop-signal reduction
        self._flag: torch.Tensor | None = None  # this rank's signal, reduced in place over the ranks

    # ------------------------------------------------------------------------------------------------ signals
    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self._received:  # a second Ctrl+C: stop at once, without a checkpoint
            raise KeyboardInterrupt
        # Only note it: collectives and file writes are unsafe inside a handler, the batch end does them.
        if not self._received:
            log.info(
                "received %s: the run saves and stops at the end of this batch (with several ranks: the next one)%s",
                signal.Signals(signum).name,
                "; Ctrl+C again stops at once, without saving" if signum == signal.SIGINT else "",
            )
        self._received = signum

    def _install_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in self.signals:
            self._previous_handlers[signum] = signal.signal(signum, self._handle)

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous_handlers = {}

    def _agreed_signal(self, trainer: pl.Trainer) -> int:
        """The signal any rank received (the largest number), the same on every rank.

        With several ranks this is the agreement started at the previous batch's start, read now: reading this
        batch's reduction would make the host wait for the device to finish the previous step every step (the
        ranks stop one batch later instead). On CUDA the result travels to pinned memory behind an event that the
        device has long passed when the next batch starts.
        """
        if trainer.world_size == 1:
            return self._received
        agreed = int(self._agreement.read() or 0)
        if self._flag is None:
            self._flag = torch.zeros(1, dtype=torch.long, device=trainer.strategy.root_device)
        # fill_, not a new tensor from a Python value: a blocking host-to-device copy would wait for the stream
        flag = self._flag.fill_(self._received)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, async_op=True).wait()
        self._agreement.start(flag)  # wait() above only made the stream wait: the host reads it a batch later
        return agreed

    # ------------------------------------------------------------------------------------------- training hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install_handlers()
        self._agreement = HostMirror()
        for optimizer in trainer.optimizers:
            optimizer.register_step_post_hook(self._count_optimizer_step)
        self._resumed = trainer.ckpt_path is not None
        frozen = getattr(pl_module, "frozen_prefixes", tuple)()
        saved = set(pl_module.state_dict())
        self._saved_buffers = [b for n, b in pl_module.named_buffers() if n in saved and not n.startswith(frozen)]
        if self._rng_to_restore is not None:
            _set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None

    def _count_optimizer_step(self, *args: Any) -> None:
        self._optimizer_steps += 1

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        # the previous step is complete now (metrics logged, validation run): its checkpoint, and a signal's stop
        received = self._agreed_signal(trainer)
        self._rewrite = _as_if_saved_after_the_previous_batch
        try:
            super().on_train_batch_end(trainer, pl_module, None, None, batch_idx)  # the periodic checkpoint, if due
            if received:
                self._stop(trainer, received)
        finally:
            self._rewrite = None
        self._batch_started_at = self._optimizer_steps
        # the forward pass updates buffers in place (usage statistics, LeCam means): keep them for an error's save
        self._buffers_at_batch_start = [(buffer, buffer.detach().clone()) for buffer in self._saved_buffers]
        self._rng_at_batch_start = _rng_state()
        if self._resumed:  # the loop counters are final now: drop the rows the killed run logged after the checkpoint
            self._resumed = False
            first_step = trainer.fit_loop.epoch_loop._batches_that_stepped
            for logger in trainer.loggers:
                if hasattr(logger, "drop_steps_from"):  # ResumableCSVLogger, ResumableTensorBoardLogger
                    logger.drop_steps_from(first_step)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._batch_started_at = None
        self._validated = _validation_follows(trainer)  # saving waits for the start of the next batch

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.fast_dev_run:  # Lightning's on_train_end would still write last.ckpt, of a 1-step smoke run
            self._restore_handlers()
            return
        super().on_train_end(trainer, pl_module)
        # a longer run resuming from here continues the epoch's batches (max_steps ended it early) or the next epoch
        loop = trainer.fit_loop.epoch_loop
        within_the_epoch = loop.batch_progress.current.processed < trainer.num_training_batches
        self._rewrite = (
            _as_if_saved_after_the_previous_batch if within_the_epoch else _as_if_saved_as_the_next_epoch_starts
        )
        try:
            super().on_train_batch_end(trainer, pl_module, None, None, 0)  # the last step's periodic checkpoint
            if not self._should_skip_saving_checkpoint(trainer):  # the final weights, whatever the interval
                self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        finally:
            self._rewrite = None
        self._restore_handlers()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._restore_handlers()

    # ------------------------------------------------------------------------------------------------ stopping
    def _stop(self, trainer: pl.Trainer, signum: int) -> None:
        if self._last_global_step_saved != trainer.global_step or not self.last_model_path:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        name = signal.Signals(signum).name
        code = 128 + signum
        if trainer.is_global_zero:
            message = f"{name}: saved {self.last_model_path} at step {trainer.global_step}"
            if self.requeue and name in REQUEUE_SIGNALS and SLURMEnvironment.detect():
                requeued, note = _requeue_slurm_job()
                message += f"; {note}"
                code = 0 if requeued else code
            else:
                message += (
                    f"; to resume: {self.resume_command}"
                    if self.resume_command
                    else "; rerun in this run folder to resume"
                )
            _say(message)
        code = int(trainer.strategy.broadcast(code))
        raise TrainingStopped(code)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, (TrainingStopped, KeyboardInterrupt)) or trainer.state.fn != TrainerFn.FITTING:
            return
        if trainer.world_size > 1 and not isinstance(exception, NonFiniteLossError):
            # only an error that every rank raises at the same point (a NaN in all-reduced gradients) can be saved
            log.error("%s on one rank: no checkpoint (the ranks cannot meet to write one)", type(exception).__name__)
            return
        if self._batch_started_at is not None and self._optimizer_steps != self._batch_started_at:
            log.error("%s after an optimizer step of this batch: a half step is not saved", type(exception).__name__)
            return
        if self._optimizer_steps == 0:
            # nothing trained in this process (e.g. a data path that does not exist): the newest checkpoint, if any,
            # holds this state already, and an untrained last.ckpt in a new run folder would be taken for a result
            return
        mid_batch = self._batch_started_at is not None
        if mid_batch:  # back to the state at the start of the failing batch
            for buffer, value in self._buffers_at_batch_start:
                buffer.copy_(value)
            _set_rng_state(self._rng_at_batch_start)
        self._rewrite = _as_if_saved_after_the_previous_batch if mid_batch else None
        try:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        finally:
            self._rewrite = None
        if trainer.is_global_zero:
            _say(
                f"{type(exception).__name__}: saved {self.last_model_path} with the last complete step "
                f"({trainer.global_step}) before stopping"
            )

    # --------------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]):
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        state = _rng_state()
        if trainer.world_size > 1:
            states: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(states, state)
        else:
            states = [state]
        checkpoint["rng_states"] = states
        if self._rewrite is not None:
            self._rewrite(checkpoint, self._validated)
        for logger in trainer.loggers:
            logger.save()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "validated": self._validated}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._validated = state_dict.get("validated", False)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]):
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        states = checkpoint.get("rng_states")
        if states is not None and len(states) == trainer.world_size:
            self._rng_to_restore = states[trainer.global_rank]
        elif states is not None:
            log.warning(
                "the checkpoint holds the random state of %d ranks, this run has %d: random draws are not restored",
                len(states),
                trainer.world_size,
            )


def _validation_follows(trainer: pl.Trainer) -> bool:
    """Whether Lightning validates right after the batch that just ended (its own test, from its loop)."""
    loop = trainer.fit_loop.epoch_loop
    if not trainer.enable_validation or loop._skip_next_val:
        return False
    return bool(loop._should_check_val_fx(trainer.fit_loop._data_fetcher))


def _as_if_saved_after_the_previous_batch(checkpoint: dict[str, Any], validated: bool) -> None:
    """Loop counters of a checkpoint written after the next batch started (or failed), or when max_steps closed the
    epoch early, rewritten to what Lightning writes when it saves right after a batch and its validation
    (``on_validation_end``), so the resumed run starts with the next batch of the same epoch, does not validate the
    saved step again, and logs at the same steps."""
    loop = checkpoint["loops"]["fit_loop"]
    for counters in (loop["epoch_progress"]["total"], loop["epoch_progress"]["current"]):
        counters.update(processed=counters["started"] - 1, completed=counters["started"] - 1)  # the epoch goes on
    progress = loop["epoch_loop.batch_progress"]
    for counters in (progress["total"], progress["current"]):
        done = counters["completed"]
        counters.update(ready=done, started=done, processed=done)
    if validated:  # Lightning's restart counts this step's logging once more when it skips the step's validation
        loop["epoch_loop.state_dict"]["_batches_that_stepped"] -= 1
    steps = loop["epoch_loop.manual_optimization.optim_step_progress"]
    for counters in (steps["total"], steps["current"]):
        counters["ready"] = counters["completed"]  # an optimizer step that raised was never taken


def _as_if_saved_as_the_next_epoch_starts(checkpoint: dict[str, Any], validated: bool) -> None:
    """Loop counters of a checkpoint written when training ended with an epoch's last batch, rewritten to those of
    the same step's checkpoint in a longer run (written as the next epoch's first batch starts). Lightning, resuming
    the finished epoch's counters, would count that epoch once more and start the data of the one after it."""
    loop = checkpoint["loops"]["fit_loop"]
    for counters in (loop["epoch_progress"]["total"], loop["epoch_progress"]["current"]):
        counters.update(ready=counters["completed"] + 1, started=counters["completed"] + 1)
    progress = loop["epoch_loop.batch_progress"]
    progress["current"].update(ready=0, started=0, processed=0, completed=0)
    progress["is_last_batch"] = False
    if validated:  # as in _as_if_saved_after_the_previous_batch
        loop["epoch_loop.state_dict"]["_batches_that_stepped"] -= 1


def _rng_state() -> dict[str, Any]:
    """This process's random generators, as tensors and numbers (loadable with ``weights_only=True``)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _requeue_slurm_job() -> tuple[bool, str]:
    """``scontrol requeue`` this job (array task included); returns (requeued, one line on what happened)."""
    job_id = os.environ.get("SLURM_JOB_ID", "")
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        job_id = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if shutil.which("scontrol") is None:
        return False, f"scontrol is not available, so SLURM job {job_id} was not requeued: resubmit it to resume"
    result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if result.returncode != 0:
        return False, f"scontrol requeue {job_id} failed ({result.stderr.strip()}): resubmit the job to resume"
    return True, f"requeued SLURM job {job_id}"


def _say(message: str) -> None:
    """One line on stdout that starts a line of its own: tqdm.write lifts the progress bar that shares stdout."""
    tqdm.write(message)
    sys.stdout.flush()
