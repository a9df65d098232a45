"""Image grids from the first validation batch (with the EMA weights when EMACallback is active)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from torchvision.utils import make_grid, save_image

from titok_lightning.metrics import images_to_uint8


class ImageLoggerCallback(Callback):
    """Saves one grid per validation run, at most every ``every_n_steps`` training steps.

    The grid has one row per key of ``image_keys`` (default: inputs on top, reconstructions below) and
    ``num_images`` columns, taken from the dict returned by ``validation_step`` for the first batch on rank 0.
    It is written to ``<trainer.log_dir or default_root_dir>/images/step_XXXXXXX.png`` and sent to the loggers
    that take images (TensorBoard ``add_image``, W&B ``log_image``); other loggers (CSV) get the file only.

    Args:
        every_n_steps: minimum number of training steps between two grids (the first validation always logs).
        num_images: number of columns.
        image_keys: keys of the validation_step output, each [B, 3, H, W] in [0, 1].
        tag: name under which the grid is sent to the loggers.
    """

    def __init__(
        self,
        every_n_steps: int = 1000,
        num_images: int = 8,
        image_keys: tuple[str, ...] = ("inputs", "reconstructions"),
        tag: str = "val/reconstructions",
    ) -> None:
        if every_n_steps < 1 or num_images < 1:
            raise ValueError(f"every_n_steps and num_images must be >= 1, got {every_n_steps}, {num_images}")
        self.every_n_steps = every_n_steps
        self.num_images = num_images
        self.image_keys = tuple(image_keys)
        self.tag = tag
        self.image_dir: Path | None = None
        self._last_logged_step: int | None = None
        self._pending = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # trainer.log_dir broadcasts from rank 0, so every rank must read it (here, not in a rank-0-only branch).
        self.image_dir = Path(trainer.log_dir or trainer.default_root_dir) / "images"

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        due = self._last_logged_step is None or step - self._last_logged_step >= self.every_n_steps
        self._pending = trainer.is_global_zero and not trainer.sanity_checking and due

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._pending:
            return
        self._pending = False
        missing = [key for key in self.image_keys if not isinstance(outputs, dict) or key not in outputs]
        if missing:
            raise KeyError(
                f"ImageLoggerCallback needs validation_step to return {list(self.image_keys)}; missing {missing}"
            )
        rows = [outputs[key][: self.num_images].detach().float().clamp(0, 1).cpu() for key in self.image_keys]
        grid = make_grid(torch.cat(rows), nrow=rows[0].shape[0], padding=2)
        step = trainer.global_step
        self.image_dir.mkdir(parents=True, exist_ok=True)
        save_image(grid, self.image_dir / f"step_{step:07d}.png")
        self._last_logged_step = step
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(self.tag, grid, global_step=step)
            elif isinstance(logger, WandbLogger):
                image = images_to_uint8(grid).permute(1, 2, 0).numpy()
                logger.log_image(key=self.tag, images=[image], step=step)
