"""Reconstruction metrics over a validation run: rFID, Inception Score, codebook usage and entropy."""

from __future__ import annotations

import math
import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from titok_lightning import metrics
from titok_lightning.metrics import CodebookHistogram, FeatureExtractor, ImageMetricAccumulator


class ReconstructionMetricsCallback(Callback):
    """Consumes the dicts returned by ``validation_step`` and logs ``val/rfid``, ``val/inception_score``,
    ``val/codebook_usage`` and ``val/codebook_entropy`` at the end of each (non-sanity-check) validation run.

    Expected ``validation_step`` output: {"inputs": [B, 3, H, W] in [0, 1], "reconstructions": [B, 3, H, W] in
    [0, 1], optionally "codes": integer [B, N] with the int "codebook_size"}. Images are quantised to uint8 before
    the feature extractor, as the reference evaluator does. All ranks' statistics are combined before computing.

    Args:
        feature_extractor: callable uint8 [B, 3, H, W] -> (features [B, D], logits [B, C]); None loads
            torch-fidelity's InceptionV3 on first use. If its weights are unavailable (offline, not cached) the
            callback warns once, naming the file to download, and logs only the codebook metrics.
        compute_fid: log the rFID between inputs and reconstructions.
        compute_is: log the Inception Score of the reconstructions.
        every_n_epochs: compute during fitting only when current_epoch % every_n_epochs == 0.
        max_samples: stop accumulating after this many images in total (split evenly over ranks); None = all.
        inception_weights_path: local file with the InceptionV3 weights (default: the torch hub cache).
        inception_dtype: internal precision of the default extractor, "float64" (reference) or "float32".
        is_splits: number of splits of the Inception Score (torch-fidelity's 10).
        prefix: logged names are f"{prefix}/rfid" etc.
    """

    def __init__(
        self,
        feature_extractor: FeatureExtractor | None = None,
        compute_fid: bool = True,
        compute_is: bool = True,
        every_n_epochs: int = 1,
        max_samples: int | None = None,
        inception_weights_path: str | os.PathLike | None = None,
        inception_dtype: str = "float64",
        is_splits: int = 10,
        prefix: str = "val",
    ) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"max_samples must be >= 1 or None, got {max_samples}")
        self.feature_extractor = feature_extractor
        self.compute_fid = compute_fid
        self.compute_is = compute_is
        self.every_n_epochs = every_n_epochs
        self.max_samples = max_samples
        self.inception_weights_path = inception_weights_path
        self.inception_dtype = inception_dtype
        self.is_splits = is_splits
        self.prefix = prefix

        self.last_metrics: dict[str, float] = {}
        self._extractor_unavailable = False
        self._active = False
        self._images: ImageMetricAccumulator | None = None
        self._codebook: CodebookHistogram | None = None
        self._per_rank_budget: int | None = None
        self._num_seen = 0

    def _ensure_feature_extractor(self, device: torch.device) -> bool:
        if self.feature_extractor is None and not self._extractor_unavailable:
            try:
                self.feature_extractor = metrics.load_inception_extractor(
                    self.inception_weights_path, dtype=self.inception_dtype
                )
            except metrics.InceptionWeightsUnavailableError as error:
                self._extractor_unavailable = True
                rank_zero_warn(f"{error} Continuing without rFID / Inception Score.")
        if isinstance(self.feature_extractor, torch.nn.Module):
            self.feature_extractor.to(device)
        return self.feature_extractor is not None

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING
        self._active = not trainer.sanity_checking and (not fitting or trainer.current_epoch % self.every_n_epochs == 0)
        self._images = None
        self._codebook = None
        self._num_seen = 0
        if not self._active:
            return
        if (self.compute_fid or self.compute_is) and self._ensure_feature_extractor(pl_module.device):
            self._images = ImageMetricAccumulator(self.feature_extractor, self.compute_fid, self.compute_is)
        self._per_rank_budget = None if self.max_samples is None else math.ceil(self.max_samples / trainer.world_size)

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._active:
            return
        if not isinstance(outputs, dict) or "inputs" not in outputs or "reconstructions" not in outputs:
            raise TypeError(
                "ReconstructionMetricsCallback needs validation_step to return a dict with 'inputs' and "
                f"'reconstructions' (and optionally 'codes' + 'codebook_size'), got {type(outputs).__name__}"
            )
        inputs, reconstructions = outputs["inputs"], outputs["reconstructions"]
        if self._per_rank_budget is not None:
            remaining = self._per_rank_budget - self._num_seen
            if remaining <= 0:
                return
            inputs, reconstructions = inputs[:remaining], reconstructions[:remaining]
        self._num_seen += inputs.shape[0]
        if self._images is not None:
            self._images.update(reconstructions, inputs)
        if "codes" in outputs:
            if self._codebook is None:
                if "codebook_size" not in outputs:
                    raise KeyError("validation_step returned 'codes' without the int 'codebook_size'")
                self._codebook = CodebookHistogram(int(outputs["codebook_size"]), device=outputs["codes"].device)
            self._codebook.update(outputs["codes"][: inputs.shape[0]])

    def _image_metrics(self, images: ImageMetricAccumulator) -> dict[str, float]:
        if images.count < 2:
            rank_zero_warn(f"Only {images.count} validation image(s): skipping rFID / Inception Score.")
            return {}
        splits = min(self.is_splits, images.count)
        if splits < self.is_splits:
            rank_zero_warn(
                f"{images.count} validation images: Inception Score over {splits} splits, not {self.is_splits}."
            )
        computed = images.compute(is_splits=splits)
        renamed = {"fid": "rfid", "inception_score": "inception_score"}
        return {renamed[key]: value for key, value in computed.items() if key in renamed}

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active:
            return
        results = {}
        if self._images is not None:
            self._images.sync()
            results.update(self._image_metrics(self._images))
        if self._codebook is not None:
            self._codebook.sync()
            results["codebook_usage"] = self._codebook.usage()
            results["codebook_entropy"] = self._codebook.entropy()
        self.last_metrics = results
        for name, value in results.items():
            # Every rank holds the same synced value; sync_dist keeps Lightning's epoch-level reduction consistent.
            pl_module.log(f"{self.prefix}/{name}", value, sync_dist=True)
        self._images = None
        self._codebook = None
