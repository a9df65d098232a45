"""Unreadable training data as numbers: the datamodule's skip counts in the logs and a summary at the end of fit."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from tqdm import tqdm


def counts_over_ranks(trainer: pl.Trainer, counter) -> np.ndarray:
    """A ``SkipCounter``'s counts summed over the ranks (a collective: call on every rank)."""
    counts = torch.from_numpy(counter.counts()).to(trainer.strategy.root_device)
    return trainer.strategy.reduce(counts, reduce_op="sum").cpu().numpy()


class SkippedSamplesCallback(Callback):
    """Logs ``train/skipped_samples`` (reads of unreadable samples skipped so far, summed over ranks, every
    ``trainer.log_every_n_steps`` batches; the DataLoader workers' reads, which run a few batches ahead of
    training) and, when training ends, prints how many were skipped, why and from which files, and writes the
    same to ``<log dir>/skipped_samples.json``.

    Reads the ``skip_counter`` of the datamodule (``datamodules.shards.ShardedDataModule``); does nothing for
    datamodules without one (e.g. the embedded digits). When training stops on an exception, this rank's summary is
    printed (no collective: the other ranks may be gone).
    """

    @staticmethod
    def _counter(trainer: pl.Trainer):
        return getattr(trainer.datamodule, "skip_counter", None)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        counter = self._counter(trainer)
        # on the batches whose metrics Lightning writes (the same on every rank): a value logged in between would be
        # written with a later step, and a resumed run, which never logged it, would write a different row
        if counter is None or not trainer._logger_connector.should_update_logs:
            return
        total = torch.tensor(float(counter.value), device=pl_module.device)
        pl_module.log("train/skipped_samples", total, on_step=True, on_epoch=False, sync_dist=True, reduce_fx="sum")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        counter = self._counter(trainer)
        if counter is None:
            return
        counts = counts_over_ranks(trainer, counter)
        if trainer.is_global_zero:
            self._report(trainer, counter, counts, "all ranks")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        counter = self._counter(trainer)
        if counter is not None and counter.value:
            self._report(trainer, counter, counter.counts(), f"rank {trainer.global_rank}, training stopped")

    @staticmethod
    def _report(trainer: pl.Trainer, counter, counts, scope: str) -> None:
        from datamodules.shards import SKIP_REASONS, skip_summary

        # not trainer.log_dir: it is a broadcast, and this runs on one rank (rank 0, or the failing rank)
        logger = trainer.loggers[0] if trainer.loggers else None
        folder = Path(getattr(logger, "log_dir", None) or trainer.default_root_dir)
        details = folder / "skipped_samples.json"
        tqdm.write(f"data ({scope}): {skip_summary(counts, counter.sources)} (details: {details})")
        names = [*counter.sources, "<unknown file>"]
        record = {
            "skipped_samples": int(counts.sum()),
            "by_reason": {reason: int(n) for reason, n in zip(SKIP_REASONS, counts.sum(0)) if n},
            "by_file": {names[row]: int(n) for row, n in enumerate(counts.sum(1)) if n},
            "scope": scope,
        }
        folder.mkdir(parents=True, exist_ok=True)
        details.write_text(json.dumps(record, indent=1))
