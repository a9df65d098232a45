"""LightningDataModule over webdataset image shards (class-labelled or captioned).

A sample in a shard is `<key>.jpg|jpeg|png|webp` plus `<key>.cls` (class index as text) for class
datasets or `<key>.txt` (caption) for text-image datasets, and optionally `<key>.json` with
`original_height` / `original_width` for the resolution / aspect-ratio filter. `python -m
datamodules.convert` writes such shards.

Batches: {"image": float32 [B, 3, H, W] in [0, 1], "class_id": long [B] (label_key="cls") or
"text": list[str] (label_key="txt"), "key": list[str]}; validation batches follow `val_label_key`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import torch

from datamodules.shards import (
    SampleDecoder,
    ShardedDataModule,
    ShardSpec,
    check_label_key,
    decode_label,
    image_bytes,
)
from datamodules.transforms import decode_image, eval_transform, train_transform


class ImageSampleDecoder:
    """Raw webdataset sample -> {"image", "class_id" | "text", "key"}; None when filtered out.

    Raises on unreadable images or missing labels (the pipeline counts and skips those samples).
    """

    def __init__(
        self,
        transform: Callable[[Any], torch.Tensor],
        label_key: str | None,
        min_original_resolution: int | None = None,
        max_aspect_ratio: float | None = None,
    ):
        self.transform = transform
        self.label_key = label_key
        self.min_original_resolution = min_original_resolution
        self.max_aspect_ratio = max_aspect_ratio

    def _keep(self, sample: dict[str, Any]) -> bool:
        if self.min_original_resolution is None and self.max_aspect_ratio is None:
            return True
        if "json" not in sample:
            raise KeyError("the resolution filter needs a json entry with original_height/original_width")
        meta = json.loads(sample["json"])
        height, width = meta["original_height"], meta["original_width"]
        if self.min_original_resolution is not None and max(height, width) < self.min_original_resolution:
            return False
        if self.max_aspect_ratio is not None:
            ratio = height / width
            return 1.0 / self.max_aspect_ratio <= ratio <= self.max_aspect_ratio
        return True

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        if not self._keep(sample):
            return None
        image = self.transform(decode_image(image_bytes(sample)))
        return {"image": image, **decode_label(sample, self.label_key), "key": sample["__key__"]}


class ImageDataModule(ShardedDataModule):
    """Image shards -> resampled training batches and exact validation batches (see ShardedDataModule).

    Args:
        train_shards: training shards: a brace pattern (`/data/in1k/train-{000000..001281}.tar`), a glob,
            a directory of `*.tar`, or a list of those. Needed for `fit`.
        val_shards: validation/test shards, same forms. Optional for `fit` (no validation without).
        image_size: output crop size H = W.
        resize_shorter_edge: training resize of the shorter edge before cropping (default `image_size`).
            Evaluation always resizes the shorter edge to `image_size` and centre-crops.
        random_crop: training crop random (True) or centred (False).
        random_flip: random horizontal flip in training.
        label_key: "cls" (class index -> batch["class_id"]), "txt" (caption -> batch["text"]) or None.
        val_label_key: labels of the validation shards: "same" (as label_key), "cls", "txt" or None (images
            only; e.g. ImageNet val shards while training on captions).
        batch_size: per-device training batch size.
        val_batch_size: per-device evaluation batch size (default `batch_size`).
        num_workers: DataLoader workers per device (0: load in the training process).
        pin_memory: pin host memory (default: when CUDA is available).
        shuffle_buffer / shuffle_initial: shuffle buffer size, and samples buffered before the first yield.
        samples_per_epoch: training samples per epoch over all ranks (ImageNet: 1281167); default: counted
            from the shard headers at setup (slow for very large local datasets, impossible for remote).
        min_original_resolution / max_aspect_ratio: training-only filter on `json` original sizes (the
            reference's text-image filter: 256 and 2.0, i.e. longer side >= 256 and 0.5 <= h/w <= 2).
        seed: makes shard sampling and shuffling reproducible per (rank, worker, epoch); None: random.
        max_consecutive_skips: raise after this many unreadable samples in a row in one worker.
        rank / world_size: override the trainer's (tests, custom launchers); give both or neither.
    """

    def __init__(
        self,
        train_shards: ShardSpec | None = None,
        val_shards: ShardSpec | None = None,
        image_size: int = 256,
        resize_shorter_edge: int | None = None,
        random_crop: bool = True,
        random_flip: bool = True,
        label_key: str | None = "cls",
        val_label_key: str | None = "same",
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 8,
        pin_memory: bool | None = None,
        shuffle_buffer: int = 5000,
        shuffle_initial: int = 1000,
        samples_per_epoch: int | None = None,
        min_original_resolution: int | None = None,
        max_aspect_ratio: float | None = None,
        seed: int | None = None,
        max_consecutive_skips: int = 100,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        super().__init__(
            train_shards=train_shards,
            val_shards=val_shards,
            batch_size=batch_size,
            val_batch_size=val_batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            shuffle_buffer=shuffle_buffer,
            shuffle_initial=shuffle_initial,
            samples_per_epoch=samples_per_epoch,
            seed=seed,
            max_consecutive_skips=max_consecutive_skips,
            rank=rank,
            world_size=world_size,
        )
        check_label_key("label_key", label_key)
        if val_label_key != "same":
            check_label_key("val_label_key", val_label_key)
        if max_aspect_ratio is not None and max_aspect_ratio < 1.0:
            raise ValueError(f"max_aspect_ratio must be >= 1 (it bounds h/w and w/h), got {max_aspect_ratio}")
        self.save_hyperparameters(logger=False)
        self.image_size = image_size
        self.resize_shorter_edge = image_size if resize_shorter_edge is None else resize_shorter_edge
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.label_key = label_key
        self.val_label_key = label_key if val_label_key == "same" else val_label_key
        self.min_original_resolution = min_original_resolution
        self.max_aspect_ratio = max_aspect_ratio
        train_transform(image_size, self.resize_shorter_edge)  # validate the sizes at construction

    def train_decoder(self) -> SampleDecoder:
        transform = train_transform(self.image_size, self.resize_shorter_edge, self.random_crop, self.random_flip)
        return ImageSampleDecoder(transform, self.label_key, self.min_original_resolution, self.max_aspect_ratio)

    def val_decoder(self) -> SampleDecoder:
        return ImageSampleDecoder(eval_transform(self.image_size), self.val_label_key)
