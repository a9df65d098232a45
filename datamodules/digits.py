"""The embedded offline dataset: scikit-learn's handwritten digits as 32x32 RGB shards.

`sklearn.datasets.load_digits` ships with scikit-learn (no download): 1797 grayscale 8x8 digits with
values 0..16, 10 classes. They are scaled to [0, 1], upsampled bilinearly to 32x32, quantised to uint8,
replicated to RGB, split deterministically into 1497 train / 300 val, and written once as PNG shards
into a cache folder (atomically: a temporary folder renamed into place).

`load_digits_arrays()` gives the very same pixels as numpy arrays for evaluation baselines.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from datamodules.convert import encode_png, write_shards
from datamodules.images import ImageDataModule

DIGITS_VERSION = "digits32-v1"  # name of the cache folder: change it whenever the written content changes
DIGITS_SIZE = 32
NUM_CLASSES = 10
NUM_VAL = 300
SPLIT_SEED = 0
_TRAIN_PER_SHARD = 250
_VAL_PER_SHARD = 100


def default_cache_dir() -> str:
    """$TITOK_LIGHTNING_CACHE, else ~/.cache/titok_lightning."""
    return os.environ.get("TITOK_LIGHTNING_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "titok_lightning"))


def _digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits: uint8 [1797, 32, 32] grayscale and int64 [1797] labels, in scikit-learn's order."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = torch.from_numpy(digits.images / 16.0).float().unsqueeze(1)
    upsampled = F.interpolate(pixels, size=(DIGITS_SIZE, DIGITS_SIZE), mode="bilinear", align_corners=False)
    images = (upsampled.squeeze(1).clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).numpy()
    return images, digits.target.astype(np.int64)


def digits_split(num_samples: int = 1797) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices) into scikit-learn's order; fixed seed, each sorted."""
    permutation = np.random.default_rng(SPLIT_SEED).permutation(num_samples)
    return np.sort(permutation[NUM_VAL:]), np.sort(permutation[:NUM_VAL])


@dataclass(frozen=True)
class DigitsArrays:
    """Pixels identical to what DigitsDataModule's eval batches hold (at image_size 32)."""

    train_images: np.ndarray  # float32 [1497, 3, 32, 32] in [0, 1]
    train_labels: np.ndarray  # int64 [1497]
    val_images: np.ndarray  # float32 [300, 3, 32, 32] in [0, 1]
    val_labels: np.ndarray  # int64 [300]


def load_digits_arrays() -> DigitsArrays:
    """The digits train/val split as arrays (no files involved)."""
    images, labels = _digits_uint8()
    rgb = np.repeat(images[:, None].astype(np.float32) / 255.0, 3, axis=1)
    train, val = digits_split(len(images))
    return DigitsArrays(rgb[train], labels[train], rgb[val], labels[val])


@dataclass(frozen=True)
class DigitsShards:
    root: str
    train: list[str]
    val: list[str]
    num_train: int
    num_val: int


def _shards_from_info(root: str) -> DigitsShards:
    with open(os.path.join(root, "info.json"), encoding="utf-8") as file:
        info = json.load(file)
    return DigitsShards(
        root=root,
        train=[os.path.join(root, name) for name in info["train_shards"]],
        val=[os.path.join(root, name) for name in info["val_shards"]],
        num_train=info["num_train"],
        num_val=info["num_val"],
    )


def _write_digits(folder: str) -> None:
    images, labels = _digits_uint8()
    info: dict = {"version": DIGITS_VERSION, "image_size": DIGITS_SIZE, "classes": [str(c) for c in range(10)]}
    for split, indices, per_shard in zip(
        ("train", "val"), digits_split(len(images)), (_TRAIN_PER_SHARD, _VAL_PER_SHARD)
    ):
        samples = (
            {
                "__key__": f"digit{index:04d}",
                "png": encode_png(np.repeat(images[index][:, :, None], 3, axis=2)),
                "cls": str(labels[index]),
            }
            for index in indices
        )
        shards = write_shards(samples, os.path.join(folder, f"{split}-%06d.tar"), per_shard, progress=False)
        info[f"{split}_shards"] = [os.path.basename(path) for path in shards]
        info[f"num_{split}"] = len(indices)
    with open(os.path.join(folder, "info.json"), "w", encoding="utf-8") as file:
        json.dump(info, file, indent=1)


def prepare_digits(cache_dir: str | None = None) -> DigitsShards:
    """Write the digits shards into `<cache_dir>/digits32-v1` unless already there; return their paths.

    Idempotent and safe against crashes and concurrent callers: shards are written into a temporary
    sibling folder that is renamed into place only when complete (`info.json` marks completion).
    """
    root = os.path.join(cache_dir or default_cache_dir(), DIGITS_VERSION)
    if os.path.exists(os.path.join(root, "info.json")):
        return _shards_from_info(root)
    if os.path.exists(root):
        raise RuntimeError(f"{root!r} exists but is not a complete digits dataset (no info.json); delete it")
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{DIGITS_VERSION}-", dir=parent)
    try:
        _write_digits(staging)
        try:
            os.rename(staging, root)
        except OSError:
            if not os.path.exists(os.path.join(root, "info.json")):
                raise  # not a lost race with another writer
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _shards_from_info(root)


class DigitsDataModule(ImageDataModule):
    """ImageDataModule over the embedded digits (prepared on first use; 1497 train / 300 val, 10 classes).

    Defaults suit 2 CPU cores: loading in the training process (num_workers=0), no random crop, no flip
    (mirrored digits are not digits). `image_size` other than 32 resizes bicubically.

    Args:
        cache_dir: parent folder of the shards (default: $TITOK_LIGHTNING_CACHE or ~/.cache/titok_lightning).
        samples_per_epoch: default: each of the 1497 training images once per epoch (full batches only).
        Others: as ImageDataModule.
    """

    def __init__(
        self,
        cache_dir: str | None = None,
        image_size: int = DIGITS_SIZE,
        batch_size: int = 64,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        random_flip: bool = False,
        samples_per_epoch: int | None = None,
        shuffle_buffer: int = 1500,
        shuffle_initial: int = 500,
        pin_memory: bool | None = None,
        seed: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        super().__init__(
            image_size=image_size,
            resize_shorter_edge=image_size,
            random_crop=False,
            random_flip=random_flip,
            label_key="cls",
            batch_size=batch_size,
            val_batch_size=val_batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            shuffle_buffer=shuffle_buffer,
            shuffle_initial=shuffle_initial,
            samples_per_epoch=samples_per_epoch,
            seed=seed,
            rank=rank,
            world_size=world_size,
        )
        self.cache_dir = cache_dir
        self.num_classes = NUM_CLASSES

    def prepare_data(self) -> None:
        prepare_digits(self.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        shards = prepare_digits(self.cache_dir)  # no-op once prepared; also covers use without a Trainer
        self.train_shards, self.val_shards = shards.train, shards.val
        super().setup(stage)
