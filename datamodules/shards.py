"""WebDataset plumbing shared by the image and token datamodules.

Shard specifications, label decoding, counting of skipped (unreadable) samples across DataLoader workers,
exact rank x worker partitioning for evaluation, batch collation, and `ShardedDataModule`, the
LightningDataModule base that turns per-sample decoders into resampled training and exact
validation loaders.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import random
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from glob import glob
from itertools import islice
from typing import Any

import braceexpand
import lightning as L
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

log = logging.getLogger(__name__)

ShardSpec = str | os.PathLike | Sequence[str | os.PathLike]
SampleDecoder = Callable[[dict[str, Any]], dict[str, Any] | None]
LABEL_KEYS = ("cls", "txt", None)

# Streamed by webdataset's gopen; existence cannot be checked up front.
_REMOTE_PREFIXES = ("http://", "https://", "s3://", "gs://", "hf://", "pipe:")
# webdataset's sample key: the file name up to the first dot of its basename.
_KEY_AND_EXTENSION = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def _is_remote(url: str) -> bool:
    return url.startswith(_REMOTE_PREFIXES)


def resolve_shards(spec: ShardSpec | None, what: str = "shards") -> list[str]:
    """Expand a shard specification into a list of shard paths/URLs, checking that local ones exist.

    `spec` is a string or a list of strings; each string is a directory (all its `*.tar`, sorted),
    a brace pattern (`data/train-{000000..000146}.tar`), a glob pattern, a file, or a remote URL
    (`https://`, `s3://`, `pipe:`; passed through unchecked).

    Raises:
        ValueError: `spec` is None or an empty list.
        FileNotFoundError: a directory without shards, a pattern matching nothing, or a missing file;
            the message names the offending path and the pattern it came from.
    """
    if spec is None:
        raise ValueError(f"{what}: no shards given")
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not items:
        raise ValueError(f"{what}: the shard list is empty")
    shards: list[str] = []
    for item in items:
        item = os.path.expanduser(os.fspath(item))
        if _is_remote(item):
            shards.extend(braceexpand.braceexpand(item))
        elif os.path.isdir(item):
            found = sorted(glob(os.path.join(item, "*.tar")))
            if not found:
                raise FileNotFoundError(f"{what}: directory {item!r} contains no *.tar shards")
            shards.extend(found)
        else:
            for path in braceexpand.braceexpand(item):
                if any(char in path for char in "*?["):
                    matches = sorted(glob(path))
                    if not matches:
                        raise FileNotFoundError(f"{what}: pattern {path!r} (from {item!r}) matches no file")
                    shards.extend(matches)
                elif os.path.isfile(path):
                    shards.append(path)
                else:
                    raise FileNotFoundError(f"{what}: shard {path!r} (from {item!r}) does not exist")
    return shards


def count_samples(shards: Sequence[str]) -> int:
    """Number of samples in local tar shards, read from the member headers only (no payload).

    Counts runs of consecutive members sharing a webdataset key, as the reader groups them.
    """
    total = 0
    for path in shards:
        if _is_remote(path):
            raise ValueError(f"cannot count the samples of remote shard {path!r}; set samples_per_epoch")
        previous_key = None
        try:
            with tarfile.open(path) as tar:
                for member in tar:
                    match = _KEY_AND_EXTENSION.match(member.name)
                    if not member.isreg() or match is None:
                        continue
                    if match.group(1) != previous_key:
                        total += 1
                        previous_key = match.group(1)
        except (tarfile.TarError, EOFError) as error:
            raise ValueError(
                f"shard {path!r} is truncated or not a tar file ({error}); re-create it, leave it out of the shard "
                "list, or set samples_per_epoch to train without counting"
            ) from None
    return total


def check_label_key(name: str, value: str | None) -> None:
    if value not in LABEL_KEYS:
        raise ValueError(f"{name} must be one of {LABEL_KEYS}, got {value!r}")


def decode_label(sample: dict[str, Any], label_key: str | None) -> dict[str, Any]:
    """A raw sample's label: {"class_id": int} (label_key "cls"), {"text": str} ("txt") or {} (None)."""
    if label_key == "cls":
        return {"class_id": int(sample["cls"])}
    if label_key == "txt":
        return {"text": sample["txt"].decode("utf-8")}
    return {}


def worker_slot() -> tuple[int, int]:
    """(worker id, number of workers) of the calling DataLoader worker; (0, 1) in the main process."""
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


SKIP_REASONS = (
    "corrupt or truncated image",
    "unsupported or bad value",
    "missing entry",
    "unreadable tar data",
    "other",
)


def skip_reason(error: BaseException, in_tar: bool = False) -> int:
    """Index in SKIP_REASONS of a failure (tar-level errors come from the reader's handler)."""
    if in_tar:
        return 3
    if isinstance(error, (OSError, SyntaxError, EOFError)):  # PIL raises these (and UnidentifiedImageError)
        return 0
    if isinstance(error, (ValueError, TypeError)):
        return 1
    return 2 if isinstance(error, KeyError) else 4


class SkipCounter:
    """Counts samples skipped as unreadable by source file and reason, summed over every DataLoader worker of a rank.

    The counts are a `multiprocessing.Array` ([file, reason], one extra row for errors whose file is unknown) created
    in the rank's main process (in `setup()`); DataLoader workers inherit it (fork or spawn), so `counts` read in the
    training process includes every worker. Ranks have separate counters: all-reduce with a sum for a global number.
    A tar that cannot be read further counts once (its remaining samples are unknown). `max_consecutive` failures in
    a row in one worker raise instead: that is a systematic problem (wrong format, a bug), not a few bad files.
    """

    def __init__(self, max_consecutive: int = 100, sources: Sequence[str] = ()):
        self.sources = list(sources)
        self._row = {url: row for row, url in enumerate(self.sources)}
        self._counts = multiprocessing.Array("q", (len(self.sources) + 1) * len(SKIP_REASONS))
        self.max_consecutive = max_consecutive
        self._consecutive = 0  # per process: each worker holds its own copy

    def counts(self) -> np.ndarray:
        """int64 [len(sources) + 1, len(SKIP_REASONS)]: skipped samples per source file (last row: unknown file)."""
        with self._counts.get_lock():
            flat = np.frombuffer(self._counts.get_obj(), dtype=np.int64).copy()
        return flat.reshape(len(self.sources) + 1, len(SKIP_REASONS))

    @property
    def value(self) -> int:
        return int(self.counts().sum())

    def reset(self) -> None:
        with self._counts.get_lock():
            self._counts[:] = [0] * len(self._counts)

    def record_success(self) -> None:
        self._consecutive = 0

    def _source_row(self, url: Any, error: BaseException) -> int:
        if url in self._row:
            return self._row[url]
        for arg in error.args:  # webdataset appends the url (or a text holding it) to tar-level errors
            if isinstance(arg, str) and arg in self._row:
                return self._row[arg]
        text = " ".join(str(arg) for arg in error.args)
        return next((row for row, source in enumerate(self.sources) if source in text), len(self.sources))

    def record_failure(self, error: BaseException, where: str, url: Any = None, in_tar: bool = False) -> None:
        cell = self._source_row(url, error) * len(SKIP_REASONS) + skip_reason(error, in_tar)
        with self._counts.get_lock():
            self._counts[cell] += 1
        self._consecutive += 1
        log.warning("skipping unreadable %s: %s: %s", where, type(error).__name__, error)
        if self._consecutive >= self.max_consecutive:
            raise RuntimeError(
                f"{self._consecutive} unreadable samples in a row (last: {where}: {type(error).__name__}: {error}); "
                "the data or the decoding is broken"
            ) from error

    def __call__(self, error: BaseException) -> bool:
        """webdataset handler for tar-level errors: count, warn, continue."""
        self.record_failure(error, "tar data", in_tar=True)
        return True


def skip_summary(counts: np.ndarray, sources: Sequence[str], max_files: int = 10) -> str:
    """Human-readable summary of `SkipCounter.counts()` (possibly summed over ranks): total, reasons, worst files."""
    total = int(counts.sum())
    if total == 0:
        return "skipped samples: none"
    reasons = ", ".join(f"{int(n)} {SKIP_REASONS[i]}" for i, n in enumerate(counts.sum(0)) if n)
    names = [*sources, "<unknown file>"]
    per_file = counts.sum(1)
    worst = [int(row) for row in np.argsort(-per_file, kind="stable") if per_file[row]][:max_files]
    files = "; ".join(f"{names[row]}: {int(per_file[row])}" for row in worst)
    more = len(np.flatnonzero(per_file)) - len(worst)
    return f"skipped {total} unreadable samples ({reasons}); by file: {files}" + (
        f"; {more} more files" if more else ""
    )


class SkippingMap:
    """Pipeline stage applying a sample decoder; failures are counted and skipped, `None` drops silently."""

    def __init__(self, decode: SampleDecoder, counter: SkipCounter):
        self.decode = decode
        self.counter = counter

    def __call__(self, samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for sample in samples:
            try:
                decoded = self.decode(sample)
            except Exception as error:  # any decode failure is a bad sample; SkipCounter catches systematic ones
                where = f"sample {sample.get('__key__')!r} of {sample.get('__url__')!r}"
                self.counter.record_failure(error, where, sample.get("__url__"))
                continue
            self.counter.record_success()
            if decoded is not None:
                yield decoded


class WorkerShuffle:
    """Shuffle buffer whose generator differs per (rank, worker, epoch); reproducible when `seed` is set."""

    def __init__(self, bufsize: int, initial: int, seed: int | None, rank: int):
        self.bufsize, self.initial, self.seed, self.rank = bufsize, min(initial, bufsize), seed, rank
        self.epoch = -1

    def __call__(self, samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        self.epoch += 1
        if self.seed is None:
            rng = random.Random(os.urandom(16))
        else:
            rng = random.Random(f"{self.seed}-{self.rank}-{worker_slot()[0]}-{self.epoch}")
        return wds.shuffle(self.bufsize, self.initial, rng=rng)(samples)


class RankWorkerSeed:
    """Seed source for `wds.ResampledShards` that uses the datamodule's rank instead of the environment."""

    def __init__(self, rank: int):
        self.rank = rank

    def __call__(self) -> int:
        return self.rank * 1000 + worker_slot()[0]


class PartitionedSamples(IterableDataset):
    """Raw samples of `shards` split exactly over ranks x DataLoader workers: each sample read once overall.

    With at least one shard per reader (rank x worker) the shards are dealt out round-robin; with fewer,
    every reader scans all shards and keeps every n-th sample, so no reader is left empty and nothing is
    duplicated (each reader sees the same deterministic sample order).
    """

    def __init__(self, shards: Sequence[str], rank: int, world_size: int, handler: Callable[[BaseException], bool]):
        super().__init__()
        self.shards, self.rank, self.world_size, self.handler = list(shards), rank, world_size, handler

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = worker_slot()
        readers = self.world_size * num_workers
        reader = self.rank * num_workers + worker
        if len(self.shards) >= readers:
            yield from wds.tarfile_samples([{"url": url} for url in self.shards[reader::readers]], handler=self.handler)
        else:
            samples = wds.tarfile_samples([{"url": url} for url in self.shards], handler=self.handler)
            yield from islice(samples, reader, None, readers)


class FixedLengthIterable(IterableDataset):
    """An iterable with a declared `len()` (webdataset's `with_length` makes a class that cannot be pickled,
    which breaks spawn-started DataLoader workers)."""

    def __init__(self, iterable: Iterable, length: int):
        super().__init__()
        self.iterable, self.length = iterable, length

    def __iter__(self) -> Iterator:
        return iter(self.iterable)

    def __len__(self) -> int:
        return self.length


def collate_samples(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Collate decoded sample dicts: tensors/arrays stack, ints -> long [B], floats -> float32 [B], str -> list."""
    batch: dict[str, Any] = {}
    for name, first in samples[0].items():
        values = [sample[name] for sample in samples]
        if isinstance(first, torch.Tensor):
            batch[name] = torch.stack(values)
        elif isinstance(first, np.ndarray):
            batch[name] = torch.from_numpy(np.stack(values))
        elif isinstance(first, str):
            batch[name] = values
        elif isinstance(first, (int, np.integer)) and not isinstance(first, bool):
            batch[name] = torch.tensor(values, dtype=torch.long)
        elif isinstance(first, (float, np.floating)):
            batch[name] = torch.tensor(values, dtype=torch.float32)
        else:
            raise TypeError(f"cannot collate field {name!r} of type {type(first).__name__}")
    return batch


class ShardedDataModule(L.LightningDataModule):
    """Base LightningDataModule over webdataset shards; subclasses provide the per-sample decoders.

    Training: shards are resampled with replacement (`wds.ResampledShards`), samples pass a shuffle
    buffer, and each DataLoader worker yields `train_batches_per_rank / max(num_workers, 1)` full batches
    (`.with_epoch`), so every rank runs the same number of steps per epoch whatever the shard sizes.
    `train_batches_per_rank = ceil(samples_per_epoch / (batch_size * world_size * workers)) * workers`,
    which is also the train loader's `len()`.

    Validation/test (same shards): every sample exactly once over all ranks and workers
    (`PartitionedSamples`), last batch partial. Ranks may get different batch counts, so metrics should
    be reduced at epoch end (torchmetrics / `sync_dist`), not with per-step collectives.

    Unreadable samples are skipped, logged and counted by file and reason: `skip_counter` (this rank, all workers;
    `callbacks.SkippedSamplesCallback` logs the total and prints a summary at the end of training).
    """

    def __init__(
        self,
        train_shards: ShardSpec | None = None,
        val_shards: ShardSpec | None = None,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 8,
        pin_memory: bool | None = None,
        shuffle_buffer: int = 5000,
        shuffle_initial: int = 1000,
        samples_per_epoch: int | None = None,
        seed: int | None = None,
        max_consecutive_skips: int = 100,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        super().__init__()
        if batch_size < 1 or (val_batch_size is not None and val_batch_size < 1):
            raise ValueError(f"batch sizes must be positive, got {batch_size} / {val_batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither (then they come from the trainer)")
        if world_size is not None and not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.train_shards = train_shards
        self.val_shards = val_shards
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.shuffle_buffer = shuffle_buffer
        self.shuffle_initial = shuffle_initial
        self.samples_per_epoch = samples_per_epoch
        self.seed = seed
        self.max_consecutive_skips = max_consecutive_skips
        self._rank_override = rank
        self._world_size_override = world_size

        self.rank = 0
        self.world_size = 1
        self.train_urls: list[str] = []
        self.val_urls: list[str] = []
        self.train_batches_per_rank = 0
        self.skip_counter: SkipCounter | None = None

    # ---- subclass hooks --------------------------------------------------------------------------

    def train_decoder(self) -> SampleDecoder:
        raise NotImplementedError

    def val_decoder(self) -> SampleDecoder:
        raise NotImplementedError

    # ---- setup -----------------------------------------------------------------------------------

    @property
    def skipped_samples(self) -> int:
        """Samples skipped as unreadable on this rank since `setup()` (all DataLoader workers)."""
        return 0 if self.skip_counter is None else self.skip_counter.value

    def _distributed_context(self) -> tuple[int, int]:
        if self._rank_override is not None:
            return self._rank_override, self._world_size_override
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def setup(self, stage: str | None = None) -> None:
        """Resolve shards (clear error when missing), rank/world size and the per-rank batch count."""
        name = type(self).__name__
        self.rank, self.world_size = self._distributed_context()
        has_train = self.train_shards is not None or self._has_other_train_source()
        if stage == "fit" and not has_train:
            raise ValueError(f"{name}: stage 'fit' needs train_shards")
        if stage in ("validate", "test") and self.val_shards is None:
            raise ValueError(f"{name}: stage {stage!r} needs val_shards")
        if stage is None and not has_train and self.val_shards is None:
            raise ValueError(f"{name}: neither train_shards nor val_shards given")
        if self.train_shards is not None and stage in (None, "fit"):
            self.train_urls = resolve_shards(self.train_shards, f"{name}.train_shards")
            num_samples = self.samples_per_epoch
            if num_samples is None:
                num_samples = count_samples(self.train_urls)
                log.info("%s: counted %d training samples in %d shards", name, num_samples, len(self.train_urls))
            self.train_batches_per_rank = self._batches_per_rank(num_samples)
        if self.val_shards is not None and stage in (None, "fit", "validate", "test"):
            self.val_urls = resolve_shards(self.val_shards, f"{name}.val_shards")
        if self.skip_counter is None:  # once: the DataLoader workers of every loader share it
            self.skip_counter = SkipCounter(self.max_consecutive_skips, [*self.train_urls, *self.val_urls])

    def _has_other_train_source(self) -> bool:
        return False

    def _batches_per_rank(self, num_samples: int) -> int:
        if num_samples < 1:
            raise ValueError(f"{type(self).__name__}: samples_per_epoch must be positive, got {num_samples}")
        workers = max(self.num_workers, 1)
        return math.ceil(num_samples / (self.batch_size * self.world_size * workers)) * workers

    # ---- loaders ---------------------------------------------------------------------------------

    def _loader(self, dataset: IterableDataset) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=None,  # batched inside the pipeline: workers ship whole batches
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        if not self.train_urls:
            raise RuntimeError(f"{type(self).__name__}: call setup('fit') with train_shards first")
        workers = max(self.num_workers, 1)
        pipeline = wds.DataPipeline(
            wds.ResampledShards(
                self.train_urls,
                seed=self.seed or 0,
                worker_seed=RankWorkerSeed(self.rank),
                deterministic=self.seed is not None,
            ),
            wds.tarfile_to_samples(handler=self.skip_counter),
            WorkerShuffle(self.shuffle_buffer, self.shuffle_initial, self.seed, self.rank),
            SkippingMap(self.train_decoder(), self.skip_counter),
            wds.batched(self.batch_size, partial=False, collation_fn=collate_samples),
        )
        pipeline = pipeline.with_epoch(self.train_batches_per_rank // workers)  # per worker
        return self._loader(FixedLengthIterable(pipeline, self.train_batches_per_rank))

    def _eval_loader(self) -> DataLoader | list:
        if not self.val_urls:
            return []  # Lightning skips validation
        pipeline = wds.DataPipeline(
            PartitionedSamples(self.val_urls, self.rank, self.world_size, handler=self.skip_counter),
            SkippingMap(self.val_decoder(), self.skip_counter),
            wds.batched(self.val_batch_size, partial=True, collation_fn=collate_samples),
        )
        return self._loader(pipeline)

    def val_dataloader(self) -> DataLoader | list:
        return self._eval_loader()

    def test_dataloader(self) -> DataLoader | list:
        return self._eval_loader()
