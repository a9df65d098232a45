"""Input | reconstruction grids of a tokenizer: of training images every ``every_n_steps`` optimizer steps (as the
reference's ``generate_every``) and of the first validation batch at a due validation, with the EMA weights when
EMACallback is active."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torchvision.utils import make_grid

from callbacks.ema import EMACallback
from titok_lightning.lit.generator import log_image_grid


def eager(pl_module: pl.LightningModule):
    """The module's compiled submodules run eagerly inside (a grid's batch is not the training step's shape)."""
    return getattr(pl_module, "eager_compiled_modules", nullcontext)()


class ImageLoggerCallback(Callback):
    """Grids with one row per key of ``image_keys`` (default: inputs on top, reconstructions below) and ``num_images``
    columns, written to ``<trainer.log_dir or default_root_dir>/images/`` and sent to the loggers that take images
    (TensorBoard ``add_image``, W&B ``log_image``); other loggers (CSV) get the file only.

    - Training (``train_step_XXXXXXX.png``, tag ``train/reconstructions``): every ``every_n_steps`` optimizer steps,
      the first ``num_images`` images of that step's batch through the module's ``reconstruct(batch)``, in eval mode
      with the EMA weights (every rank reconstructs, so that FSDP's sharded forward works; rank 0 writes).
    - Validation (``step_XXXXXXX.png``, tag ``tag``): the dict returned by ``validation_step`` for the first batch,
      at most every ``every_n_steps`` steps (the first validation always logs).

    Args:
        every_n_steps: optimizer steps between two training grids, and at least between two validation grids.
        num_images: number of columns.
        image_keys: keys of the validation_step output, each [B, 3, H, W] in [0, 1].
        tag: name under which the validation grid is sent to the loggers.
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
        self._last_logged_step: int | None = None
        self._pending = False

    # -- training images -------------------------------------------------------------------------------------------
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps or not callable(getattr(pl_module, "reconstruct", None)):
            return
        head = {name: value[: self.num_images] for name, value in batch.items()}
        ema = next((callback for callback in trainer.callbacks if isinstance(callback, EMACallback)), None)
        model = pl_module.model  # only the trained network changes mode: frozen helpers stay in eval
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), ema.swapped_in() if ema is not None else nullcontext():
                with trainer.precision_plugin.forward_context(), eager(pl_module):
                    reconstructions, _ = pl_module.reconstruct(head)
        finally:
            model.train(was_training)
        rows = [head["image"].float(), reconstructions.float().clamp(0, 1)]
        grid = make_grid(torch.cat(rows).cpu(), nrow=len(rows[0]), padding=2)
        log_image_grid(trainer, grid, f"train_step_{step:07d}", "train/reconstructions")

    # -- validation images -----------------------------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        due = self._last_logged_step is None or step - self._last_logged_step >= self.every_n_steps
        self._pending = not trainer.sanity_checking and due

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
        log_image_grid(trainer, grid, f"step_{trainer.global_step:07d}", self.tag)
        self._last_logged_step = trainer.global_step
