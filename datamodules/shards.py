"""WebDataset plumbing shared by the image and token datamodules.

Shard specifications, label decoding, counting of skipped (unreadable) samples across DataLoader workers,
exact rank x worker partitioning for evaluation, batch collation, and `ShardedDataModule`, the
LightningDataModule base that turns per-sample decoders into resampled training and exact
validation loaders.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import random
import re
import signal
import tarfile
import threading
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


SPLIT_SHARD = re.compile(r"^(.+)-\d+\.tar$")  # <split>-<number>.tar, as the converter and pretokenize write


class DataError(ValueError):
    """Data that cannot be read as configured (shards, their contents or how they divide into batches), found when
    a datamodule sets up: the command-line tools refuse it in one line."""


def resolve_shards(spec: ShardSpec | None, what: str = "shards") -> list[str]:
    """Expand a shard specification into a list of shard paths/URLs, checking that local ones exist.

    `spec` is a string or a list of strings; each string is a directory (all its `*.tar`, sorted; refused when
    they are the shards of several splits, `train-*.tar` and `val-*.tar`),
    a brace pattern (`data/train-{000000..000146}.tar`), a glob pattern, a file, or a remote URL
    (`https://`, `s3://`, `pipe:`; passed through unchecked).

    Raises:
        DataError: `spec` is None or an empty list, or a directory holds several splits.
        FileNotFoundError: a directory without shards, a pattern matching nothing, or a missing file;
            the message names the offending path and the pattern it came from.
    """
    if spec is None:
        raise DataError(f"{what}: no shards given")
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not items:
        raise DataError(f"{what}: the shard list is empty")
    shards: list[str] = []
    for item in items:
        item = os.path.expanduser(os.fspath(item))
        if _is_remote(item):
            shards.extend(braceexpand.braceexpand(item))
        elif os.path.isdir(item):
            found = sorted(glob(os.path.join(item, "*.tar")))
            if not found:
                raise FileNotFoundError(f"{what}: directory {item!r} contains no *.tar shards")
            splits = sorted({match.group(1) for f in found if (match := SPLIT_SHARD.match(os.path.basename(f)))})
            if len(splits) > 1:  # e.g. pretokenize's train-*.tar and val-*.tar in one --out folder
                example = os.path.join(item, f"{splits[0]}-*.tar")
                raise DataError(
                    f"{what}: directory {item!r} holds the shards of several splits ({', '.join(splits)}); "
                    f"name the one to read, e.g. '{example}'"
                )
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
            raise DataError(f"cannot count the samples of remote shard {path!r}; set samples_per_epoch")
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
            raise DataError(
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


# A sample's image entry (datamodules.convert stores other formats as PNG); the first one present is read.
SHARD_IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")


def image_bytes(sample: dict[str, Any]) -> bytes:
    """The encoded image of a raw sample; KeyError naming the entries it has when there is none."""
    field = next((name for name in SHARD_IMAGE_FIELDS if name in sample), None)
    if field is None:
        raise KeyError(f"no image ({'/'.join(SHARD_IMAGE_FIELDS)}) among {sorted(sample)}")
    return sample[field]


def aesthetic_score(sample: dict[str, Any]) -> float | None:
    """A raw sample's aesthetic score (its json's or its own ``aesthetic_score`` / ``aes_score`` entry), or None."""
    names = ("aesthetic_score", "aes_score")
    if "json" in sample:
        meta = json.loads(sample["json"])
        for name in names:
            if name in meta:
                return float(meta[name])
    for name in names:
        if name in sample:
            return float(sample[name])
    return None


def worker_slot() -> tuple[int, int]:
    """(worker id, number of workers) of the calling DataLoader worker; (0, 1) in the main process."""
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
_shielded_pid: int | None = None  # the worker process whose stop signals are filtered (set once per process)


def shield_worker_from_stop_signals(owner_pid: int) -> None:
    """In a DataLoader worker, ignore SIGTERM / SIGUSR1 / SIGUSR2 from anyone but `owner_pid`, the training process,
    and SIGINT from anyone.

    SLURM and ``kill`` of a process group signal the workers too, and a worker that died of it would turn the
    training process's checkpoint-and-stop into a crash (the training process stops its workers itself). The
    training process's own signal must still end the worker: ``multiprocessing`` terminates live workers with
    SIGTERM when the interpreter exits, and then waits for them (a worker ignoring it outright hung that exit).
    A plain handler cannot tell who sent a signal, so the worker blocks the signals and a thread reads each with
    its sender (``sigwaitinfo``); where that call is missing (macOS) the signals are ignored outright.
    """
    global _shielded_pid
    if torch.utils.data.get_worker_info() is None or _shielded_pid == os.getpid():
        return  # the main process, or a persistent worker starting another epoch
    _shielded_pid = os.getpid()
    # Ctrl+C reaches the terminal's whole process group: the training process saves and stops, its workers carry on
    # until it ends them (nothing sends them SIGINT otherwise)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        return
    for signum in STOP_SIGNALS:  # not SIG_IGN: an ignored signal may be discarded instead of waiting for the thread
        signal.signal(signum, _no_op_handler)
    # blocked before the thread starts: threads inherit the mask, so the signals reach no thread but that one
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    threading.Thread(target=_end_on_stop_signal_from, args=(owner_pid,), name="stop-signal-filter", daemon=True).start()


def _no_op_handler(signum: int, frame: Any) -> None:
    pass


def _end_on_stop_signal_from(owner_pid: int) -> None:
    while True:
        info = signal.sigwaitinfo(STOP_SIGNALS)
        if info.si_pid == owner_pid:
            os._exit(128 + info.si_signo)


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
        """int64 [len(sources) + 1, len(SKIP_REASONS)]: skipped reads per source file (last row: unknown file)."""
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
    return f"skipped {total} reads of unreadable samples ({reasons}); by file: {files}" + (
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


def stable_seed(*parts: Any) -> int:
    """A 63-bit seed from its parts, the same in every process and Python session (unlike ``hash``)."""
    digest = hashlib.blake2b("-".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class EpochPartition:
    """Which samples each reader (rank x DataLoader worker) reads in an epoch: a pure function of (seed, epoch).

    Every epoch permutes the shards (the same permutation on every rank). With per-shard sample counts (local
    shards) the permuted shards are one index space cut into `num_readers` equal contiguous ranges, so every
    sample belongs to exactly one reader per epoch; without counts (remote shards) the permuted shards are dealt
    out round-robin. A reader's part is a list of segments (url, samples to skip, samples to take or None).
    """

    def __init__(
        self,
        urls: Sequence[str],
        counts: Sequence[int] | None,
        num_readers: int,
        seed: int,
        handler: Callable[[BaseException], bool],
    ):
        if counts is None and len(urls) < num_readers:
            raise DataError(
                f"{len(urls)} remote shards cannot be dealt out to {num_readers} readers (ranks x workers): use "
                "more shards, fewer DataLoader workers, or local shards (their samples are counted and split)"
            )
        self.urls, self.counts, self.num_readers, self.seed = list(urls), counts, num_readers, seed
        self.handler = handler  # for unreadable tar data

    def read(self, epoch: int, reader: int) -> Iterator[dict[str, Any]]:
        """The raw samples of ``reader``'s part of ``epoch``, in shard order."""
        for url, skip, take in self.segments(epoch, reader):
            samples = wds.tarfile_samples([{"url": url}], handler=self.handler)
            yield from islice(samples, skip, None if take is None else skip + take)

    def segments(self, epoch: int, reader: int) -> list[tuple[str, int, int | None]]:
        order = np.random.default_rng(stable_seed(self.seed, "shards", epoch)).permutation(len(self.urls))
        if self.counts is None:
            return [(self.urls[i], 0, None) for i in order[reader :: self.num_readers]]
        total = sum(self.counts)
        begin, end = reader * total // self.num_readers, (reader + 1) * total // self.num_readers
        segments, offset = [], 0
        for i in order:
            lo, hi = max(begin, offset), min(end, offset + self.counts[i])
            if lo < hi:
                segments.append((self.urls[i], lo - offset, hi - lo))
            offset += self.counts[i]
        return segments


class TrainPosition:
    """The training stream's position, shared by the rank's process and its DataLoader workers (fork or spawn):
    epoch, batches of it already consumed, and per worker role the raw samples its reader already consumed."""

    def __init__(self, num_roles: int):
        self._values = multiprocessing.Array("q", 2 + num_roles)

    def set(self, epoch: int, start: int, raw: Sequence[int]) -> None:
        with self._values.get_lock():
            self._values[:] = [epoch, start, *raw]

    def get(self) -> tuple[int, int, list[int]]:
        with self._values.get_lock():
            values = list(self._values)
        return values[0], values[1], values[2:]


class SeededDecoder:
    """Decode a sample with the torch RNG seeded from its position in the stream (``__index__``), leaving the
    process's RNG untouched: random crops and flips are a pure function of (seed, epoch, reader, position), so a
    resumed run draws the same augmentations without decoding the samples it skips."""

    def __init__(self, decode: SampleDecoder, seed: int, epoch: int, reader: int):
        self.decode, self.seed, self.epoch, self.reader = decode, seed, epoch, reader

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        index = sample["__index__"]
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only (the transforms' one): torch.manual_seed would also reseed the CUDA generators,
            # which fork_rng(devices=[]) does not restore, and costs ~0.3 ms a sample (it records a stack trace)
            torch.default_generator.manual_seed(stable_seed(self.seed, self.epoch, self.reader, index))
            decoded = self.decode(sample)
        return None if decoded is None else {**decoded, "__raw_end__": index + 1}


class TrainStream(IterableDataset):
    """One rank's training batches: `batches_per_reader` full batches from every reader of the rank per epoch.

    Worker `w` reads for role `(w + start) % workers` so that, after a resume `start` batches into an epoch, the
    DataLoader's round-robin over workers continues with the batch that comes next. A reader shuffles its part of
    the epoch (`EpochPartition`) with a buffer seeded by (seed, epoch, reader), skips the raw samples it consumed
    before the resume point without decoding them, and reads its part again (reshuffled) only when unreadable
    samples or `samples_per_epoch` ask for more than one pass. Each batch carries ``__raw_end__``, the raw samples
    its reader has consumed, which `ResumableLoader` keeps for checkpoints.
    """

    def __init__(self, module: ShardedDataModule, source, position: TrainPosition, decode: SampleDecoder):
        super().__init__()
        self.source, self.position, self.decode = source, position, decode  # source: EpochPartition-like
        self.rank, self.world_size, self.workers = module.rank, module.world_size, max(module.num_workers, 1)
        self.batches_per_reader = module.train_batches_per_rank // self.workers
        self.batch_size, self.seed = module.batch_size, module.stream_seed
        self.shuffle_buffer, self.shuffle_initial = module.shuffle_buffer, module.shuffle_initial
        self.counter = module.skip_counter
        self.owner_pid = os.getpid()  # the training process: its stop signals end the workers

    def __len__(self) -> int:
        return self.batches_per_reader * self.workers

    def _passes(self, epoch: int, reader: int) -> Iterator[dict[str, Any]]:
        rng = random.Random(stable_seed(self.seed, "buffer", epoch, reader))
        while True:
            found = False
            raw = self.source.read(epoch, reader)
            for sample in wds.shuffle(self.shuffle_buffer, self.shuffle_initial, rng=rng)(raw):
                found = True
                yield sample
            if not found:
                raise RuntimeError(f"training reader {reader} found no readable sample in its part of epoch {epoch}")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        shield_worker_from_stop_signals(self.owner_pid)
        worker, _ = worker_slot()
        epoch, start, raw_done = self.position.get()
        role = (worker + start) % self.workers
        reader = self.rank * self.workers + role
        remaining = self.batches_per_reader - len(range(role, start, self.workers))
        indexed = ({**sample, "__index__": index} for index, sample in enumerate(self._passes(epoch, reader)))
        decode = SkippingMap(SeededDecoder(self.decode, self.seed, epoch, reader), self.counter)
        samples = decode(islice(indexed, raw_done[role], None))
        for _ in range(remaining):
            batch = list(islice(samples, self.batch_size))
            if len(batch) < self.batch_size:
                return
            raw_end = batch[-1].pop("__raw_end__")
            for sample in batch[:-1]:
                del sample["__raw_end__"]
            yield {**collate_samples(batch), "__raw_end__": raw_end}


class ResumableLoader(DataLoader):
    """DataLoader over a `TrainStream` whose position is part of Lightning checkpoints (Lightning calls
    `state_dict` when saving and `load_state_dict` before the first batch of a resumed fit).

    The saved position is the one of the batches the trainer has finished (`consumed()`), not of those the
    DataLoader workers or Lightning's prefetching already produced. Ranks save their positions together (a
    collective: Lightning builds checkpoints on every rank) and each takes its own back.
    """

    def __init__(self, stream: TrainStream, consumed: Callable[[], tuple[int, int]] | None = None, **kwargs):
        super().__init__(stream, batch_size=None, **kwargs)
        self.consumed = consumed
        self._pending: tuple[int, int, list[int]] | None = None
        self._iterations = 0
        self._epoch, self._start = 0, 0
        self._raw_end: list[list[tuple[int, int]]] = []

    def __iter__(self) -> Iterator[dict[str, Any]]:
        stream: TrainStream = self.dataset
        epoch = self.consumed()[0] if self.consumed is not None else self._iterations
        epoch, start, raw = self._pending or (epoch, 0, [0] * stream.workers)
        self._pending, self._iterations = None, epoch + 1
        stream.position.set(epoch, start, raw)
        self._epoch, self._start = epoch, start
        self._raw_end = [[(-1, done)] for done in raw]  # per role: (batch index, raw samples consumed after it)
        # the DataLoader iterator (and its workers) starts now, when Lightning asks for it, not at the first batch
        return self._track(super().__iter__(), start)

    def _track(self, batches: Iterator[dict[str, Any]], index: int) -> Iterator[dict[str, Any]]:
        for batch in batches:
            history = self._raw_end[index % self.dataset.workers]
            history.append((index, batch.pop("__raw_end__")))
            del history[:-4]  # Lightning and the workers run only a few batches ahead of the trainer
            index += 1
            yield batch

    def _local_state(self) -> dict[str, Any]:
        batches = self.consumed()[1] if self.consumed is not None else self._start
        raw = [max(entry for entry in history if entry[0] < batches)[1] for history in self._raw_end]
        return {"epoch": self._epoch, "batches": batches, "raw_samples": raw}

    def state_dict(self) -> dict[str, Any]:
        state = self._local_state()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            states: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(states, state)
            return {"ranks": states}
        return {"ranks": [state]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        stream: TrainStream = self.dataset
        ranks = state_dict["ranks"]
        if len(ranks) != stream.world_size or len(ranks[0]["raw_samples"]) != stream.workers:
            log.warning(
                "the data position was saved by %d ranks x %d DataLoader workers, this run has %d x %d: epoch %d's "
                "data restarts from its beginning (the run is not an exact continuation)",
                len(ranks),
                len(ranks[0]["raw_samples"]),
                stream.world_size,
                stream.workers,
                ranks[0]["epoch"],
            )
            self._pending = (ranks[0]["epoch"], 0, [0] * stream.workers)
            return
        state = ranks[stream.rank]
        if state["batches"] >= len(stream):  # saved after the epoch's last batch: the next epoch starts
            self._pending = (state["epoch"] + 1, 0, [0] * stream.workers)
        else:
            self._pending = (state["epoch"], state["batches"], list(state["raw_samples"]))


class PartitionedSamples(IterableDataset):
    """Raw samples of `shards` split exactly over ranks x DataLoader workers: each sample read once overall.

    With at least one shard per reader (rank x worker) the shards are dealt out round-robin; with fewer,
    every reader scans all shards and keeps every n-th sample, so no reader is left empty and nothing is
    duplicated (each reader sees the same deterministic sample order).
    """

    def __init__(self, shards: Sequence[str], rank: int, world_size: int, handler: Callable[[BaseException], bool]):
        super().__init__()
        self.shards, self.rank, self.world_size, self.handler = list(shards), rank, world_size, handler
        self.owner_pid = os.getpid()  # the evaluating process: its stop signals end the workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        shield_worker_from_stop_signals(self.owner_pid)
        worker, num_workers = worker_slot()
        readers = self.world_size * num_workers
        reader = self.rank * num_workers + worker
        if len(self.shards) >= readers:
            yield from wds.tarfile_samples([{"url": url} for url in self.shards[reader::readers]], handler=self.handler)
        else:
            samples = wds.tarfile_samples([{"url": url} for url in self.shards], handler=self.handler)
            yield from islice(samples, reader, None, readers)


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

    Training: every epoch splits the shards' samples over the readers (ranks x DataLoader workers) as a pure
    function of (seed, epoch) (`EpochPartition`): local shards are counted and cut into equal parts, so each sample
    is read once per epoch over all ranks. Each reader shuffles its part (buffer seeded by seed, epoch and reader)
    and yields `train_batches_per_rank / max(num_workers, 1)` full batches, so every rank runs the same number of
    steps. `train_batches_per_rank` is `ceil(samples_per_epoch / (batch_size * readers)) * workers`, or without
    `samples_per_epoch` every counted sample at most once; it is also the train loader's `len()`. The loader's
    position (epoch, batches, raw samples per reader) is saved in Lightning checkpoints and a resumed run
    continues with exactly the batches the interrupted one would have seen (`ResumableLoader`).

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
        sizes = {"batch_size": batch_size, "val_batch_size": 1 if val_batch_size is None else val_batch_size}
        for name, size in sizes.items():  # a typo on the command line (batch_size=abc) arrives as a string
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"{name} must be a positive integer, got {size!r}")
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
        self.stream_seed = 0
        self.train_counts: list[int] | None = None
        self.train_position: TrainPosition | None = None
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
            raise DataError(f"{name}: stage 'fit' needs train_shards")
        if stage in ("validate", "test") and self.val_shards is None:
            raise DataError(f"{name}: stage {stage!r} needs val_shards")
        if stage is None and not has_train and self.val_shards is None:
            raise DataError(f"{name}: neither train_shards nor val_shards given")
        if self.train_shards is not None and stage in (None, "fit"):
            self.train_urls = resolve_shards(self.train_shards, f"{name}.train_shards")
            counts = None
            if not any(_is_remote(url) for url in self.train_urls):
                counts = [count_samples([url]) for url in self.train_urls]
                counted = f"{name}: counted {sum(counts)} training samples in {len(self.train_urls)} shards"
                if self.samples_per_epoch is not None and self.samples_per_epoch != sum(counts):
                    # a recipe's dataset size (ImageNet's 1281167) on other data: say what an epoch then is
                    counted += (
                        f"; an epoch is samples_per_epoch={self.samples_per_epoch} samples drawn from them, "
                        "reshuffled per epoch (data.samples_per_epoch=null: each sample once per epoch)"
                    )
                log.info(counted)
            elif self.samples_per_epoch is None:
                count_samples(self.train_urls)  # raises: remote shards need samples_per_epoch
            self.train_batches_per_rank = self._batches_per_rank(self.samples_per_epoch, counts)
            self.train_counts = counts
            self.stream_seed = self._shared_seed()
            self.train_position = TrainPosition(max(self.num_workers, 1))
        if self.val_shards is not None and stage in (None, "fit", "validate", "test"):
            self.val_urls = resolve_shards(self.val_shards, f"{name}.val_shards")
        if self.skip_counter is None:  # once: the DataLoader workers of every loader share it
            self.skip_counter = SkipCounter(self.max_consecutive_skips, [*self.train_urls, *self.val_urls])

    def _has_other_train_source(self) -> bool:
        return False

    def _batches_per_rank(self, num_samples: int | None, counts: Sequence[int] | None = None) -> int:
        """Batches per rank and epoch: `samples_per_epoch` rounded up to full batches on every reader, or, when
        it is not set, every counted sample at most once (the last partial batch of each reader is left out)."""
        workers = max(self.num_workers, 1)
        readers = self.world_size * workers
        if num_samples is None:
            per_reader = sum(counts) // readers // self.batch_size
            if per_reader < 1:
                raise DataError(
                    f"{type(self).__name__}: {sum(counts)} training samples do not fill one batch of "
                    f"{self.batch_size} on each of {readers} readers (ranks x workers); lower the batch size or "
                    "num_workers"
                )
            return per_reader * workers
        if num_samples < 1:
            raise DataError(f"{type(self).__name__}: samples_per_epoch must be positive, got {num_samples}")
        return math.ceil(num_samples / (self.batch_size * readers)) * workers

    def _shared_seed(self) -> int:
        """The data order's seed; without `seed`, a random one that every rank agrees on."""
        if self.seed is not None:
            return int(self.seed)
        seed = random.SystemRandom().getrandbits(62)
        if self.trainer is not None and self._rank_override is None:
            seed = self.trainer.strategy.broadcast(seed)
        return seed

    def _train_partition(self) -> EpochPartition:
        readers = self.world_size * max(self.num_workers, 1)
        return EpochPartition(self.train_urls, self.train_counts, readers, self.stream_seed, self.skip_counter)

    def _consumed(self) -> tuple[int, int]:
        """(epoch, batches of it the trainer finished): the training data's position in a checkpoint. Under
        ``trainer.overfit_batches`` every epoch is the data's epoch 0, so each one repeats the same first batches
        (Lightning can only turn off a sampler's shuffling; this stream reshuffles by epoch)."""
        epoch = 0 if self.trainer.overfit_batches else self.trainer.current_epoch
        return epoch, self.trainer.fit_loop.epoch_loop.batch_progress.current.processed

    # ---- loaders ---------------------------------------------------------------------------------

    def _loader(self, dataset: IterableDataset) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=None,  # batched inside the pipeline: workers ship whole batches
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            generator=self._loader_generator(),
        )

    @staticmethod
    def _loader_generator() -> torch.Generator:
        """A DataLoader draws its workers' seed when it starts iterating, from the global RNG unless given a generator:
        that draw would depend on when this process started its loaders, and a resumed run would differ (the data
        pipeline seeds its own randomness, so the value does not matter)."""
        return torch.Generator().manual_seed(0)

    def train_dataloader(self) -> DataLoader:
        if not self.train_urls:
            raise RuntimeError(f"{type(self).__name__}: call setup('fit') with train_shards first")
        return ResumableLoader(
            TrainStream(self, self._train_partition(), self.train_position, self.train_decoder()),
            consumed=self._consumed if self.trainer is not None else None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            generator=self._loader_generator(),
        )

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
