"""Pre-tokenize an image dataset into token shards that ``datamodules.TokenDataModule`` streams.

    # ImageNet (class folders or class-labelled shards) with the MaskGIT-VQGAN, as RAR trains: ADM centre crop,
    # each image and its horizontal flip
    python -m titok_lightning.pretokenize --tokenizer maskgit_vqgan_f16_256 \
        --data /data/imagenet/train --out /data/in1k_maskgitvq --image-size 256
    # ten crops per image (LlamaGen), a tokenizer trained with this project (its EMA weights), 8 GPUs
    python -m titok_lightning.pretokenize --tokenizer outputs/.../checkpoints/last.ckpt \
        --data '/data/in1k/train-{000000..001281}.tar' --out /data/in1k_tokens --ten-crop --devices 8
    # captioned shards for MaskGen: tokens + caption + aesthetic score
    python -m titok_lightning.pretokenize --tokenizer tatitok_bl128_vq --data '/data/t2i/{00000..09999}.tar' \
        --out /data/t2i_tokens --labels txt
    # the reference's pre-tokenized JSONL (e.g. RAR's maskgitvq.jsonl) -> token shards
    python -m titok_lightning.pretokenize --from-jsonl maskgitvq.jsonl --out /data/in1k_maskgitvq

Each rank (``--devices``/``--num-nodes``, Lightning Fabric DDP) encodes its share of the data (every image exactly
once over all ranks and DataLoader workers) and streams ``<out>/<split>-r<rank>-<n>.tar``; rank 0 then writes
``<out>/<split>.json`` (tokenizer, token layout, sample count, shards). A sample is ``<key>.tokens.npy`` (VQ ids
[N] as int16/int32, or VAE posterior parameters [2C, N] as float16: mean then log-variance channels) with ``.cls``
or ``.txt`` and, for captions, ``.json`` holding ``aesthetic_score`` when the source has one. Augmented views get
keys ``<key>_flip`` / ``<key>_crop<i>``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset
from torchvision.transforms import functional as TF

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
LABELS = ("cls", "txt", "none")


# ----------------------------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------------------------


def adm_center_crop(image: Image.Image, size: int) -> Image.Image:
    """ADM's centre crop: halve with a box filter while the shorter side is >= 2 * size, resize the shorter side to
    ``size`` (bicubic), then crop the centre ``size`` x ``size``."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


class Views:
    """PIL RGB image -> float views [V, 3, size, size] in [0, 1].

    Default: the ADM centre crop, plus its horizontal flip when ``flip`` (V = 2, the reference's RAR data).
    ``ten_crop``: ADM centre crop to ``int(1.1 * size)``, then the four corners and the centre, each also flipped
    (V = 10, LlamaGen's augmentation).
    """

    def __init__(self, size: int, ten_crop: bool = False, flip: bool = True):
        self.size, self.ten_crop, self.flip = size, ten_crop, flip

    @property
    def suffixes(self) -> list[str]:
        if self.ten_crop:
            return [f"_crop{i}" for i in range(10)]
        return ["", "_flip"] if self.flip else [""]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if self.ten_crop:
            crops = TF.ten_crop(adm_center_crop(image, int(self.size * 1.1)), self.size)
            return torch.stack([TF.to_tensor(crop) for crop in crops])
        view = TF.to_tensor(adm_center_crop(image, self.size))
        return torch.stack([view, view.flip(-1)]) if self.flip else view[None]


# ----------------------------------------------------------------------------------------------------------
# Sources: every image exactly once over ranks x DataLoader workers
# ----------------------------------------------------------------------------------------------------------


def _reader_slot(rank: int, world_size: int) -> tuple[int, int]:
    from datamodules.shards import worker_slot

    worker, num_workers = worker_slot()
    return rank * num_workers + worker, world_size * num_workers


def _clean_key(key: str) -> str:
    return re.sub(r"[.\s]", "_", key)


class ImageFolderSource(IterableDataset):
    """Images under ``root``: class sub-folders (class index = position in the sorted names, as torchvision's
    ImageFolder and the reference) or, with ``labels="none"``, any image files."""

    def __init__(self, root: str, views: Views, labels: str, rank: int, world_size: int):
        super().__init__()
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root!r} does not exist")
        self.files: list[tuple[str, int | None]] = []
        if labels == "cls":
            self.classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
            if not self.classes:
                raise FileNotFoundError(f"{root!r} has no class sub-folders (use --labels none for a flat folder)")
            for index, name in enumerate(self.classes):
                self.files += [(path, index) for path in _images_under(os.path.join(root, name))]
        elif labels == "none":
            self.files = [(path, None) for path in _images_under(root)]
        else:
            raise ValueError("image folders carry class labels or none; captioned data must be shards")
        if not self.files:
            raise FileNotFoundError(f"no images under {root!r}")
        self.root, self.views, self.rank, self.world_size = root, views, rank, world_size

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        reader, readers = _reader_slot(self.rank, self.world_size)
        for path, class_id in itertools.islice(self.files, reader, None, readers):
            with Image.open(path) as image:
                sample: dict[str, Any] = {"views": self.views(image.convert("RGB"))}
            sample["key"] = _clean_key(os.path.splitext(os.path.relpath(path, self.root))[0])
            if class_id is not None:
                sample["class_id"] = class_id
            yield sample


def _images_under(folder: str) -> list[str]:
    found = []
    for directory, _, names in os.walk(folder):
        found += [os.path.join(directory, n) for n in names if n.lower().rsplit(".", 1)[-1] in IMAGE_EXTENSIONS]
    return sorted(found)


class ShardSource(IterableDataset):
    """Samples of webdataset shards (image + ``cls`` or ``txt``, optional ``json`` / ``aes_score``); unreadable
    samples are skipped and counted (warning), as in training."""

    def __init__(self, shards: Any, views: Views, labels: str, rank: int, world_size: int):
        super().__init__()
        from datamodules.shards import SkipCounter, resolve_shards

        self.urls = resolve_shards(shards, "--data")
        self.views, self.labels, self.rank, self.world_size = views, labels, rank, world_size
        self.skipped = SkipCounter()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from datamodules.shards import PartitionedSamples
        from datamodules.transforms import decode_image

        for raw in PartitionedSamples(self.urls, self.rank, self.world_size, handler=self.skipped):
            try:
                extension = next(ext for ext in IMAGE_EXTENSIONS if ext in raw)
                sample: dict[str, Any] = {"views": self.views(decode_image(raw[extension])), "key": raw["__key__"]}
                if self.labels == "cls":
                    sample["class_id"] = int(raw["cls"])
                elif self.labels == "txt":
                    sample["text"] = raw["txt"].decode("utf-8")
                    score = _aesthetic_score(raw)
                    if score is not None:
                        sample["aesthetic_score"] = score
            except Exception as error:  # a broken sample must not end a multi-hour job
                self.skipped.record_failure(error, f"sample {raw.get('__key__')!r} of {raw.get('__url__')!r}")
                continue
            self.skipped.record_success()
            sample["key"] = _clean_key(sample["key"])
            yield sample


def _aesthetic_score(raw: dict[str, Any]) -> float | None:
    if "json" in raw:
        meta = json.loads(raw["json"])
        for name in ("aesthetic_score", "aes_score"):
            if name in meta:
                return float(meta[name])
    for name in ("aesthetic_score", "aes_score"):
        if name in raw:
            return float(raw[name])
    return None


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    batch = {"views": torch.stack([s.pop("views") for s in samples])}
    batch["meta"] = samples
    return batch


# ----------------------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------------------


def _storable(tokens: torch.Tensor) -> np.ndarray:
    """VQ ids [N] stay integers; VAE posterior parameters [2C, 1, N] -> float16 [2C, N]."""
    if tokens.is_floating_point():
        return tokens.squeeze(-2).to(torch.float16).cpu().numpy()
    return tokens.cpu().numpy()


def encoded_samples(tokenizer, loader: Iterable[dict[str, Any]], views: Views, device: torch.device):
    """Encode each batch of views and yield one token-shard sample per view (``write_token_shards`` input)."""
    suffixes = views.suffixes
    for batch in loader:
        images = batch["views"].to(device, non_blocking=True)
        tokens = tokenizer.encode(images.flatten(0, 1)).unflatten(0, images.shape[:2])
        for meta, per_view in zip(batch["meta"], tokens):
            for suffix, view_tokens in zip(suffixes, per_view):
                yield {**meta, "key": meta["key"] + suffix, "tokens": _storable(view_tokens)}


def pretokenize(fabric, args: argparse.Namespace) -> None:
    """One rank's work: encode its share, stream its shards, then (rank 0) write ``<out>/<split>.json``."""
    from datamodules.tokens import write_token_shards
    from titok_lightning.frozen_tokenizer import load_frozen_tokenizer

    tokenizer = load_frozen_tokenizer(args.tokenizer, use_ema=not args.raw_weights).to(fabric.device)
    image_size = args.image_size or tokenizer.image_size
    views = Views(image_size, ten_crop=args.ten_crop, flip=args.flip)
    if len(args.data) == 1 and os.path.isdir(args.data[0]) and not _is_shard_dir(args.data[0]):
        source = ImageFolderSource(args.data[0], views, args.labels, fabric.global_rank, fabric.world_size)
    else:
        source = ShardSource(args.data, views, args.labels, fabric.global_rank, fabric.world_size)
    loader = DataLoader(source, batch_size=args.batch_size, num_workers=args.num_workers, collate_fn=_collate)
    written = [0]

    def counted(samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for sample in samples:
            written[0] += 1
            yield sample

    samples = counted(encoded_samples(tokenizer, loader, views, fabric.device))
    first = next(samples, None)  # a rank may get no data (tiny datasets): then it writes no shard
    shards: list[str] = []
    pattern = os.path.join(args.out, f"{args.split}-r{fabric.global_rank:03d}-%06d.tar")
    total = len(source) * len(views.suffixes) // fabric.world_size if isinstance(source, ImageFolderSource) else None
    if first is not None:
        shards = write_token_shards(
            itertools.chain([first], samples),
            pattern,
            maxcount=args.maxcount,
            total=total,
            progress=fabric.is_global_zero,
            overwrite=args.overwrite,
        )
    total_written = fabric.all_reduce(torch.tensor(written[0], device=fabric.device), reduce_op="sum")
    all_shards = _gather_strings(fabric, shards)
    if fabric.is_global_zero:
        info = {
            "tokenizer": str(args.tokenizer),
            "kind": tokenizer.kind,
            "num_tokens": tokenizer.num_tokens,
            "codebook_size": tokenizer.codebook_size,
            "token_size": tokenizer.token_size,
            "image_size": image_size,
            "views": views.suffixes,
            "labels": args.labels,
            "num_samples": int(total_written),
            "shards": sorted(os.path.relpath(p, args.out) for p in all_shards),
        }
        with open(os.path.join(args.out, f"{args.split}.json"), "w", encoding="utf-8") as file:
            json.dump(info, file, indent=1)
        print(f"wrote {info['num_samples']} token samples in {len(info['shards'])} shards to {args.out}")
    skipped = getattr(source, "skipped", None)
    if skipped is not None and skipped.value:
        log.warning("rank %d skipped %d unreadable samples", fabric.global_rank, skipped.value)


def _is_shard_dir(path: str) -> bool:
    return any(name.endswith(".tar") for name in os.listdir(path))


def _gather_strings(fabric, strings: list[str]) -> list[str]:
    if fabric.world_size == 1:
        return list(strings)
    import torch.distributed as dist

    gathered: list[list[str] | None] = [None] * fabric.world_size
    dist.all_gather_object(gathered, list(strings))
    return [s for part in gathered for s in part]


def convert_jsonl(path: str, out: str, split: str, maxcount: int, overwrite: bool) -> list[str]:
    """The reference's pre-tokenized JSONL (``{"class_id", "tokens"}`` per line) -> token shards."""
    from datamodules.tokens import PretokenizedJsonl, write_token_shards

    records = PretokenizedJsonl(path)
    samples = ({**records[i], "key": f"{i:09d}"} for i in range(len(records)))
    return write_token_shards(
        samples, os.path.join(out, f"{split}-%06d.tar"), maxcount=maxcount, total=len(records), overwrite=overwrite
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--out", required=True, help="output folder of the token shards")
    parser.add_argument("--tokenizer", help="Lightning .ckpt of this project, registry name, weight file or HF repo")
    parser.add_argument(
        "--data", nargs="+", help="an image folder (class sub-folders), or shards (folders, brace patterns, globs)"
    )
    parser.add_argument("--from-jsonl", help="convert the reference's pre-tokenized JSONL instead of encoding")
    parser.add_argument("--split", default="train", help="shard name prefix (default: train)")
    parser.add_argument("--labels", choices=LABELS, default="cls", help="cls (class index), txt (caption) or none")
    parser.add_argument("--image-size", type=int, default=None, help="crop size (default: the tokenizer's)")
    parser.add_argument("--ten-crop", action="store_true", help="ten crops per image (LlamaGen augmentation)")
    parser.add_argument("--no-flip", dest="flip", action="store_false", help="do not add the flipped view")
    parser.add_argument("--raw-weights", action="store_true", help="a .ckpt's training weights instead of its EMA")
    parser.add_argument("--batch-size", type=int, default=64, help="images per device and step")
    parser.add_argument("--num-workers", type=int, default=8, help="DataLoader workers per device")
    parser.add_argument("--maxcount", type=int, default=10000, help="samples per shard")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--overwrite", action="store_true", help="replace existing shards of this split")
    args = parser.parse_args(argv)
    if args.from_jsonl is None and (args.tokenizer is None or args.data is None):
        parser.error("give --tokenizer and --data (or --from-jsonl)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.from_jsonl is not None:
        shards = convert_jsonl(args.from_jsonl, args.out, args.split, args.maxcount, args.overwrite)
        print(f"wrote {len(shards)} shards to {args.out}")
        return
    import lightning as L

    strategy = "ddp" if args.devices * args.num_nodes > 1 else "auto"
    fabric = L.Fabric(accelerator=args.accelerator, devices=args.devices, num_nodes=args.num_nodes, strategy=strategy)
    fabric.launch(pretokenize, args)


if __name__ == "__main__":
    main()
