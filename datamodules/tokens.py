"""Pre-tokenized data: token shards (writer + LightningDataModule) and the reference's JSONL format.

Token shard sample: `<key>.tokens.npy` (an `np.save` array: int16/int32/int64 token ids, or float16/32
continuous tokens), `<key>.cls` (class index) or `<key>.txt` (caption), optionally `<key>.json` with
`aesthetic_score`. The reference's text-to-image shards are read too: `<key>.token.npy` holding a
headerless float16 buffer (`raw_token_dtype`) and `<key>.aes_score` as text.

Batches: {"tokens": ..., "class_id": long [B] | "text": list[str], "aesthetic_score": float32 [B]
(with_aesthetic_score=True), "key": list[str]}, where "tokens" is
  - VQ (discrete) tokens: long [B, N] (integer arrays, or float arrays with token_dtype="int64");
  - VAE (continuous) tokens: float32 [B, C, N], channels first, exactly as stored per sample. For
    MaskGen-KL the stored values are the posterior moments, C = 2 x token_size (mean channels, then
    log-variance channels), matching the reference's flat buffers read with tokens_shape=[2 * C, N].
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.convert import write_shards
from datamodules.shards import (
    SPLIT_SHARD,
    DataError,
    ResumableLoader,
    SampleDecoder,
    ShardedDataModule,
    ShardSpec,
    TrainPosition,
    TrainStream,
    aesthetic_score,
    check_label_key,
    decode_label,
    stable_seed,
)

_NPY_MAGIC = b"\x93NUMPY"
TOKEN_DTYPES = (None, "int64", "float32")


def _as_numpy(tokens: Any) -> np.ndarray:
    if isinstance(tokens, torch.Tensor):
        return tokens.detach().cpu().numpy()
    return np.asarray(tokens)


def _compact(tokens: np.ndarray) -> np.ndarray:
    """Integer ids in the smallest of int16/int32 that holds them; floats unchanged."""
    if not np.issubdtype(tokens.dtype, np.integer):
        if not np.issubdtype(tokens.dtype, np.floating):
            raise TypeError(f"tokens must be integer or floating point, got {tokens.dtype}")
        return tokens
    for dtype in (np.int16, np.int32):
        limits = np.iinfo(dtype)
        if tokens.size == 0 or (tokens.min() >= limits.min and tokens.max() <= limits.max):
            return tokens.astype(dtype)
    return tokens.astype(np.int64)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def write_token_shards(
    samples: Iterable[dict[str, Any]],
    out_pattern: str,
    maxcount: int = 10000,
    total: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> list[str]:
    """Write pre-tokenized samples into webdataset shards readable by TokenDataModule.

    Args:
        samples: dicts with "tokens" (numpy array or tensor: VQ ids [N], or continuous [C, N] channels
            first), and "class_id" (int) or "text" (str); optional "aesthetic_score" (float) and "key"
            (str without dots; default the running index as %09d). Integer ids are stored as int16 when
            they fit (else int32); floating tokens keep their dtype (float16 halves the size).
        out_pattern: e.g. `tokens/train-%06d.tar`.
        maxcount: samples per shard. total / progress: progress bar. overwrite: replace matching files.

    Returns:
        The shard paths written.
    """

    records = (token_record(sample, index) for index, sample in enumerate(samples))
    return write_shards(records, out_pattern, maxcount, total=total, progress=progress, overwrite=overwrite)


def token_record(sample: dict[str, Any], index: int) -> dict[str, Any]:
    """The webdataset sample of one pre-tokenized sample (see `write_token_shards`); key default: `index` as %09d."""
    record: dict[str, Any] = {
        "__key__": str(sample.get("key", f"{index:09d}")),
        "tokens.npy": _npy_bytes(_compact(_as_numpy(sample["tokens"]))),
    }
    if "class_id" in sample:
        record["cls"] = str(int(sample["class_id"]))
    if "text" in sample:
        record["txt"] = sample["text"]
    if "aesthetic_score" in sample:
        record["json"] = json.dumps({"aesthetic_score": float(sample["aesthetic_score"])})
    return record


def check_pretokenized_complete(urls: Sequence[str]) -> None:
    """Refuse shards of a `python -m titok_lightning.pretokenize` run that has not finished (it writes
    `<split>.json` last; until then its folder holds `<split>.progress/`): training would silently see a part."""
    checked = set()
    for url in urls:
        match = SPLIT_SHARD.match(os.path.basename(url))
        folder = os.path.dirname(url)
        if match is None or (folder, match.group(1)) in checked or not os.path.exists(url):
            continue
        split = match.group(1)
        checked.add((folder, split))
        progress = os.path.join(folder, f"{split}.progress")
        if os.path.isdir(progress) and not os.path.isfile(os.path.join(folder, f"{split}.json")):
            done = len([name for name in os.listdir(progress) if re.fullmatch(r"\d{6}\.json", name)])
            settings = os.path.join(progress, "settings.json")
            parts = "?"
            if os.path.isfile(settings):
                with open(settings, encoding="utf-8") as file:
                    parts = json.load(file)["parts"]
            raise DataError(
                f"{folder}: the pretokenize output of split {split!r} is incomplete ({done} of {parts} parts done, no "
                f"{split}.json); rerun the same pretokenize command to finish it"
            )


def decode_token_array(data: bytes, raw_dtype: str = "float16") -> np.ndarray:
    """`np.save` bytes -> array; headerless bytes (the reference's shards) -> 1-D array of `raw_dtype`."""
    if data.startswith(_NPY_MAGIC):
        return np.load(io.BytesIO(data), allow_pickle=False)
    return np.frombuffer(data, dtype=raw_dtype)


def _to_tensor(tokens: np.ndarray, token_dtype: str | None) -> torch.Tensor:
    """Integer ids -> long, floats -> float32, unless `token_dtype` forces one ("int64" checks integrality)."""
    wants_ids = token_dtype == "int64" or (token_dtype is None and np.issubdtype(tokens.dtype, np.integer))
    if wants_ids:
        if not np.issubdtype(tokens.dtype, np.integer) and not np.array_equal(tokens, np.round(tokens)):
            raise ValueError("token_dtype='int64' but the stored tokens are not whole numbers")
        return torch.from_numpy(tokens.astype(np.int64))
    return torch.from_numpy(tokens.astype(np.float32))


# the openings the reference strips from a re-caption (data/webdataset_reader.py, process_recap_text)
RECAPTION_OPENINGS = tuple(f"The image {verb}" for verb in ("depicts", "displays", "showcases", "features", "shows"))


def recaption(raw: bytes) -> str:
    """A sample's ``recap_txt`` as the reference trains on it: without an opening "The image depicts/shows/...",
    then capitalised."""
    text = raw.decode("utf-8").strip()
    for opening in RECAPTION_OPENINGS:
        if text.startswith(opening):
            text = text[len(opening) :].strip()
            return text[:1].upper() + text[1:]
    return text


class TokenSampleDecoder:
    """Raw token-shard sample -> {"tokens", "class_id" | "text", ["aesthetic_score"], "key"}.

    Every sample of one worker must have the same token shape (a mismatch is a corrupt sample). With
    ``recaption_prob`` a sample's ``recap_txt``, when it has one, replaces its caption with that probability (drawn from
    the torch generator, which the training stream seeds per sample).
    """

    def __init__(
        self,
        label_key: str | None,
        token_dtype: str | None,
        tokens_shape: Sequence[int] | None,
        raw_token_dtype: str,
        with_aesthetic_score: bool,
        recaption_prob: float = 0.0,
    ):
        self.label_key = label_key
        self.token_dtype = token_dtype
        self.tokens_shape = tuple(tokens_shape) if tokens_shape is not None else None
        self.raw_token_dtype = raw_token_dtype
        self.with_aesthetic_score = with_aesthetic_score
        self.recaption_prob = recaption_prob
        self._shape_seen: tuple[int, ...] | None = None

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        data = sample.get("tokens.npy", sample.get("token.npy"))
        if data is None:
            raise KeyError(f"no tokens.npy / token.npy among {sorted(sample)}")
        tokens = decode_token_array(data, self.raw_token_dtype)
        if self.tokens_shape is not None:
            tokens = tokens.reshape(self.tokens_shape)
        if self._shape_seen is None:
            self._shape_seen = tokens.shape
        elif tokens.shape != self._shape_seen:
            raise ValueError(f"token shape {tokens.shape} differs from earlier samples' {self._shape_seen}")
        decoded = {"tokens": _to_tensor(tokens, self.token_dtype), **decode_label(sample, self.label_key)}
        if "text" in decoded and "recap_txt" in sample and float(torch.rand(())) < self.recaption_prob:
            decoded["text"] = recaption(sample["recap_txt"])
        if self.with_aesthetic_score:
            score = aesthetic_score(sample)
            if score is None:
                raise KeyError("no aesthetic score (json aesthetic_score / aes_score entry)")
            decoded["aesthetic_score"] = score
        decoded["key"] = sample["__key__"]
        return decoded


class PretokenizedJsonl(Dataset):
    """Map-style dataset over the reference's pre-tokenized JSONL (`{"class_id": int, "tokens": [...]}` lines).

    Items: {"tokens": long [N] (nested token lists are flattened row-major), "class_id": int}. Line
    offsets are indexed once at construction; the file is opened lazily in each worker process.
    """

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"pre-tokenized jsonl {path!r} does not exist")
        self.path = path
        offsets = []
        with open(path, "rb") as file:
            position = 0
            for line in file:
                if line.strip():
                    offsets.append(position)
                position += len(line)
        if not offsets:
            raise DataError(f"pre-tokenized jsonl {path!r} is empty")
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self._file = None
        self._file_pid = None

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self._file is None or self._file_pid != os.getpid():  # a forked worker must not share the handle
            self._file, self._file_pid = open(self.path, "rb"), os.getpid()
        self._file.seek(int(self.offsets[index]))
        record = json.loads(self._file.readline())
        tokens = torch.as_tensor(record["tokens"], dtype=torch.long).reshape(-1)
        return {"tokens": tokens, "class_id": int(record["class_id"])}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_file": None, "_file_pid": None}


class TokenDataModule(ShardedDataModule):
    """Pre-tokenized shards (or the reference's JSONL) -> training batches; see ShardedDataModule.

    Args:
        train_shards / val_shards: token shards (brace pattern, glob, directory, or list), as ImageDataModule.
        train_jsonl: instead of train_shards, the reference's pre-tokenized JSONL (class-conditional);
            every epoch a permutation of its lines split over ranks x workers (each line at most once per epoch,
            full batches only), resumable like the shards (`JsonlPartition`).
        label_key: "cls" (-> "class_id"), "txt" (-> "text") or None.
        token_dtype: None (integer -> long, float -> float32), "int64" (e.g. VQ ids stored as float16 by
            the reference) or "float32".
        tokens_shape: reshape each sample's tokens (needed for headerless reference buffers, e.g.
            [2 * token_size, num_tokens] for MaskGen-KL moments); None keeps the stored shape.
        raw_token_dtype: dtype of headerless token buffers (the reference writes float16).
        with_aesthetic_score: add batch["aesthetic_score"] (samples without one are skipped and counted).
        recaption_prob: in training, the probability that a sample's re-caption (``recap_txt``, when it has one)
            replaces its caption, as the reference's text-to-image reader does (0.95 there; see `recaption`).
        Others (batch_size, num_workers, samples_per_epoch, seed, rank, world_size, ...): as ImageDataModule.
    """

    def __init__(
        self,
        train_shards: ShardSpec | None = None,
        val_shards: ShardSpec | None = None,
        train_jsonl: str | None = None,
        label_key: str | None = "cls",
        token_dtype: str | None = None,
        tokens_shape: Sequence[int] | None = None,
        raw_token_dtype: str = "float16",
        with_aesthetic_score: bool = False,
        recaption_prob: float = 0.0,
        batch_size: int = 64,
        val_batch_size: int | None = None,
        num_workers: int = 4,
        pin_memory: bool | None = None,
        shuffle_buffer: int = 5000,
        shuffle_initial: int = 1000,
        samples_per_epoch: int | None = None,
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
        if train_jsonl is not None and train_shards is not None:
            raise ValueError("give train_shards or train_jsonl, not both")
        check_label_key("label_key", label_key)
        if token_dtype not in TOKEN_DTYPES:
            raise ValueError(f"token_dtype must be one of {TOKEN_DTYPES}, got {token_dtype!r}")
        self.save_hyperparameters(logger=False)
        self.train_jsonl = train_jsonl
        self.label_key = label_key
        self.token_dtype = token_dtype
        self.tokens_shape = list(tokens_shape) if tokens_shape is not None else None
        self.raw_token_dtype = raw_token_dtype
        self.with_aesthetic_score = with_aesthetic_score
        if not 0.0 <= recaption_prob <= 1.0:
            raise ValueError(f"recaption_prob must be in [0, 1], got {recaption_prob!r}")
        self.recaption_prob = recaption_prob
        self.train_jsonl_dataset: PretokenizedJsonl | None = None

    def _decoder(self, recaption_prob: float = 0.0) -> SampleDecoder:
        return TokenSampleDecoder(
            self.label_key,
            self.token_dtype,
            self.tokens_shape,
            self.raw_token_dtype,
            self.with_aesthetic_score,
            recaption_prob,
        )

    def train_decoder(self) -> SampleDecoder:
        return self._decoder(self.recaption_prob)

    val_decoder = _decoder

    def _has_other_train_source(self) -> bool:
        return self.train_jsonl is not None

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        check_pretokenized_complete([*self.train_urls, *self.val_urls])
        if self.train_jsonl is not None and stage in (None, "fit"):
            self.train_jsonl_dataset = PretokenizedJsonl(self.train_jsonl)
            workers = max(self.num_workers, 1)
            readers = self.world_size * workers
            per_reader = len(self.train_jsonl_dataset) // readers // self.batch_size
            if per_reader < 1:
                raise DataError(
                    f"{self.train_jsonl}: {len(self.train_jsonl_dataset)} lines do not fill one batch of "
                    f"{self.batch_size} on each of {readers} readers (ranks x workers)"
                )
            self.train_batches_per_rank = per_reader * workers
            self.stream_seed = self._shared_seed()
            self.train_position = TrainPosition(workers)

    def _train_partition(self):
        if self.train_jsonl_dataset is None:
            return super()._train_partition()
        readers = self.world_size * max(self.num_workers, 1)
        return JsonlPartition(len(self.train_jsonl_dataset), readers, self.stream_seed)

    def train_dataloader(self) -> DataLoader:
        if self.train_jsonl_dataset is None:
            return super().train_dataloader()
        return ResumableLoader(
            TrainStream(self, self._train_partition(), self.train_position, JsonlLine(self.train_jsonl_dataset)),
            consumed=self._consumed if self.trainer is not None else None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            generator=self._loader_generator(),
        )


class JsonlPartition:
    """`EpochPartition` for the lines of a JSONL file: every epoch a permutation of the lines (seed, epoch), dealt out
    to the readers in equal parts. Samples are line numbers: reading happens when they are decoded (`JsonlLine`), so
    a resumed run skips lines without reading them."""

    def __init__(self, num_lines: int, num_readers: int, seed: int):
        self.num_lines, self.num_readers, self.seed = num_lines, num_readers, seed

    def read(self, epoch: int, reader: int) -> Iterator[dict[str, Any]]:
        order = np.random.default_rng(stable_seed(self.seed, "lines", epoch)).permutation(self.num_lines)
        for line in order[reader : self.num_lines - self.num_lines % self.num_readers : self.num_readers]:
            yield {"__key__": str(line), "line": int(line)}


class JsonlLine:
    """Decoder for `JsonlPartition` samples: the line's tokens and class."""

    def __init__(self, dataset: PretokenizedJsonl):
        self.dataset = dataset

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        return self.dataset[sample["line"]]
