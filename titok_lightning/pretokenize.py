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

The input is cut into parts: chunks of an image folder (``--maxcount`` token samples each) or the input shards (one
output shard per input shard). Rank r of ``--devices``/``--num-nodes`` (Lightning Fabric DDP) encodes parts r,
r + world, ... into ``<out>/<split>-<part>.tar`` (written beside and renamed when complete, then recorded in
``<out>/<split>.progress/``); rank 0 then writes ``<out>/<split>.json`` (tokenizer, token layout, sample count,
shards, skipped inputs), which marks the output complete: ``TokenDataModule`` refuses a folder without it. The same
command run again after an interruption encodes only the missing parts (with other settings, or when the tokenizer's
weights differ from those the run began with, e.g. a ``last.ckpt`` that kept training, it refuses; pass
``--overwrite`` to start afresh). Unreadable images are skipped, counted and listed, as by ``datamodules.convert``.

A sample is ``<key>.tokens.npy`` (VQ ids [N] as int16/int32, or VAE posterior parameters [2C, N] as float16: mean
then log-variance channels) with ``.cls`` or ``.txt`` and, for captions, ``.json`` holding ``aesthetic_score`` when
the source has one. Augmented views get keys ``<key>_flip`` / ``<key>_crop<i>``.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torchvision.transforms import functional as TF
from tqdm import tqdm

log = logging.getLogger(__name__)

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
# Parts: the unit of work, of resuming and of output (one token shard each)
# ----------------------------------------------------------------------------------------------------------


def _clean_key(key: str) -> str:
    return re.sub(r"[.\s]", "_", key)


def list_image_folder(root: str, labels: str) -> list[tuple[str, int | None]]:
    """(path, class index or None) of the images under ``root``: class sub-folders (class index = position in the
    sorted names, as torchvision's ImageFolder, the reference and ``datamodules.convert``) or, with
    ``labels="none"``, any image files."""
    from datamodules.convert import list_image_folder as list_class_folders
    from datamodules.transforms import image_files_under

    if labels == "cls":
        return list_class_folders(root)[0]
    if labels != "none":
        raise ValueError("image folders carry class labels or none; captioned data must be shards")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root!r} does not exist")
    files = [(path, None) for path in image_files_under(root)]
    if not files:
        raise FileNotFoundError(f"no images under {root!r}")
    return files


def _failure(where: str, error: BaseException) -> dict[str, str]:
    return {"where": where, "error": f"{type(error).__name__}: {error}"}


class ImageFiles(Dataset):
    """One part of an image folder: item ``i`` is ``{"views", "key"[, "class_id"]}``, or ``{"where", "error"}`` for an
    image that cannot be read (it is skipped and counted, as the shard converter does)."""

    def __init__(self, files: list[tuple[str, int | None]], root: str, views: Views):
        self.files, self.root, self.views = files, root, views

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from datamodules.transforms import to_rgb

        path, class_id = self.files[index]
        try:
            with Image.open(path) as image:
                sample: dict[str, Any] = {"views": self.views(to_rgb(image))}
        except Exception as error:  # a broken file must not end a multi-hour job
            return _failure(path, error)
        sample["key"] = _clean_key(os.path.splitext(os.path.relpath(path, self.root))[0])
        if class_id is not None:
            sample["class_id"] = class_id
        return sample


class ShardSamples(IterableDataset):
    """One input shard (image + ``cls`` or ``txt``, optional ``json`` / ``aes_score``), split over the DataLoader
    workers (worker ``w`` decodes every n-th sample); unreadable samples and tar data come out as
    ``{"where", "error"}`` items."""

    def __init__(self, url: str, views: Views, labels: str):
        super().__init__()
        self.url, self.views, self.labels = url, views, labels

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import webdataset as wds

        from datamodules.shards import worker_slot

        worker, num_workers = worker_slot()
        tar_errors: list[BaseException] = []
        raw_samples = wds.tarfile_samples([{"url": self.url}], handler=lambda error: tar_errors.append(error) or True)
        for index, raw in enumerate(raw_samples):
            if index % num_workers == worker:
                yield self._decode(raw)
            if worker == 0:  # every worker reads the whole tar: one reports its damage
                yield from (_failure(f"tar data of {self.url}", error) for error in tar_errors)
            tar_errors.clear()
        if worker == 0:
            yield from (_failure(f"tar data of {self.url}", error) for error in tar_errors)

    def _decode(self, raw: dict[str, Any]) -> dict[str, Any]:
        from datamodules.shards import aesthetic_score, decode_label, image_bytes
        from datamodules.transforms import decode_image

        try:
            sample: dict[str, Any] = {"views": self.views(decode_image(image_bytes(raw))), "key": raw["__key__"]}
            sample.update(decode_label(raw, None if self.labels == "none" else self.labels))
            score = aesthetic_score(raw) if self.labels == "txt" else None
            if score is not None:
                sample["aesthetic_score"] = score
        except Exception as error:  # a broken sample must not end a multi-hour job
            return _failure(f"sample {raw.get('__key__')!r} of {self.url}", error)
        sample["key"] = _clean_key(sample["key"])
        return sample


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    samples = [item for item in items if "views" in item]
    failures = [item for item in items if "views" not in item]
    views = torch.stack([s.pop("views") for s in samples]) if samples else None
    return {"views": views, "meta": samples, "failures": failures}


def plan_parts(args: argparse.Namespace, views: Views) -> list[Any]:
    """The parts of the input, in order: chunks of an image folder's files (``maxcount`` token samples each) or the
    input shards (one output shard per input shard)."""
    if len(args.data) == 1 and os.path.isdir(args.data[0]) and not _is_shard_dir(args.data[0]):
        files = list_image_folder(args.data[0], args.labels)
        per_part = max(1, args.maxcount // len(views.suffixes))
        return [files[start : start + per_part] for start in range(0, len(files), per_part)]
    from datamodules.shards import resolve_shards

    return resolve_shards(args.data, "--data")


def _is_shard_dir(path: str) -> bool:
    return any(name.endswith(".tar") for name in os.listdir(path))


# ----------------------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------------------


def _storable(tokens: torch.Tensor) -> np.ndarray:
    """VQ ids [N] stay integers; VAE posterior parameters [2C, 1, N] -> float16 [2C, N]."""
    if tokens.is_floating_point():
        return tokens.squeeze(-2).to(torch.float16).cpu().numpy()
    return tokens.cpu().numpy()


def encoded_samples(tokenizer, loader: Iterable[dict[str, Any]], views: Views, device: torch.device, failures: list):
    """Encode each batch of views and yield one token-shard sample per view; unreadable inputs go to ``failures``."""
    suffixes = views.suffixes
    for batch in loader:
        failures.extend(batch["failures"])
        if batch["views"] is None:
            continue
        images = batch["views"].to(device, non_blocking=True)
        tokens = tokenizer.encode(images.flatten(0, 1)).unflatten(0, images.shape[:2])
        for meta, per_view in zip(batch["meta"], tokens):
            for suffix, view_tokens in zip(suffixes, per_view):
                yield {**meta, "key": meta["key"] + suffix, "tokens": _storable(view_tokens)}


def _write_json(path: str, record: dict[str, Any]) -> None:
    """Written beside and renamed: a reader never sees half a file."""
    with open(path + ".partial", "w", encoding="utf-8") as file:
        json.dump(record, file, indent=1)
    os.replace(path + ".partial", path)


def encode_part(tokenizer, part: Any, index: int, args: argparse.Namespace, views: Views, device) -> dict[str, Any]:
    """Encode one part into ``<out>/<split>-<index>.tar`` (written beside and renamed when complete); returns its
    record: shard name (None when nothing was readable), samples written, unreadable inputs."""
    import webdataset as wds

    from datamodules.tokens import token_record

    if isinstance(part, str):
        dataset, workers = ShardSamples(part, views, args.labels), args.num_workers
    else:
        dataset, workers = ImageFiles(part, args.data[0], views), min(args.num_workers, len(part))
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=workers, collate_fn=_collate)
    failures: list[dict[str, str]] = []
    name = f"{args.split}-{index:06d}.tar"
    partial = os.path.join(args.out, name + ".partial")
    count = 0
    with wds.TarWriter(partial, mtime=0) as writer:
        for sample in encoded_samples(tokenizer, loader, views, device, failures):
            writer.write(token_record(sample, count))
            count += 1
    if count:
        os.replace(partial, os.path.join(args.out, name))
    else:
        os.remove(partial)
    for failure in failures:
        log.warning("skipping unreadable %s: %s", failure["where"], failure["error"])
    return {"shard": name if count else None, "samples": count, "skipped": failures}


# ----------------------------------------------------------------------------------------------------------
# The job: prepare / resume, encode this rank's parts, mark the output complete
# ----------------------------------------------------------------------------------------------------------


def _prepare_output(args: argparse.Namespace, settings: dict[str, Any]) -> str:
    """Rank 0: "complete", "go", or the reason to stop. Wipes the split with --overwrite; a folder holding parts of
    an earlier run resumes only with the same settings."""
    done = os.path.join(args.out, f"{args.split}.json")
    progress = os.path.join(args.out, f"{args.split}.progress")
    outputs = glob.glob(os.path.join(glob.escape(args.out), f"{glob.escape(args.split)}-*.tar*"))
    if args.overwrite:
        for path in outputs:
            os.remove(path)
        if os.path.exists(done):
            os.remove(done)
        shutil.rmtree(progress, ignore_errors=True)
    elif os.path.isfile(done) or os.path.isfile(os.path.join(progress, "settings.json")):
        complete = os.path.isfile(done)
        with open(done if complete else os.path.join(progress, "settings.json"), encoding="utf-8") as file:
            previous = json.load(file)
        previous = previous.get("settings", {}) if complete else previous
        changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
        if changed:
            return _refusal(args, previous, settings, changed, complete)
        return "complete" if complete else "go"
    elif outputs and not os.path.isdir(progress):  # a run killed before its settings were written has no parts
        return (
            f"{len(outputs)} file(s) of split {args.split!r} already exist in {args.out} (e.g. {outputs[0]}) but no "
            f"record of a pretokenize run; pass --overwrite to replace them"
        )
    os.makedirs(progress, exist_ok=True)
    _write_json(os.path.join(progress, "settings.json"), settings)
    return "go"


def _refusal(
    args: argparse.Namespace, previous: dict[str, Any], settings: dict[str, Any], changed: list[str], complete: bool
) -> str:
    """Why an output folder holding an earlier run with other ``settings`` is not resumed, and what to do."""
    run = f"{args.out} holds {'a complete' if complete else 'an unfinished'} pretokenize run of split {args.split!r}"
    if "weights" not in changed:
        return f"{run} with other settings ({', '.join(changed)} differ); pass --overwrite to start afresh" + (
            "" if complete else " (or rerun it as it was)"
        )
    others = [key for key in changed if key != "weights"]
    also = f" and other settings ({', '.join(others)} differ)" if others else ""
    if "weights" not in previous:
        made = "that does not record its tokenizer's weights (it predates weight fingerprints)"
    elif previous.get("tokenizer") == settings.get("tokenizer"):
        made = f"made with other tokenizer weights ({settings['tokenizer']} has changed since)"
    else:
        made = "made with another tokenizer's weights"
    mix = "" if complete else " (resumed, it would mix the tokens of two tokenizers)"
    return f"{run} {made}{also}{mix}; pass --overwrite to start afresh, or write to another --out"


def pretokenize(fabric, args: argparse.Namespace) -> None:
    """Encode this rank's parts (rank r takes parts r, r + world, ...), skipping those an interrupted run finished;
    then rank 0 writes ``<out>/<split>.json`` (token layout, counts, skipped inputs): the output is complete."""
    from titok_lightning.frozen_tokenizer import load_frozen_tokenizer
    from titok_lightning.loading import weights_fingerprint

    tokenizer = load_frozen_tokenizer(args.tokenizer, use_ema=not args.raw_weights)
    # a resume must find the same weights, not only the same path (a run's last.ckpt changes as it trains on)
    weights = weights_fingerprint(tokenizer)
    tokenizer = tokenizer.to(fabric.device)
    image_size = args.image_size or tokenizer.image_size
    views = Views(image_size, ten_crop=args.ten_crop, flip=args.flip)
    parts = plan_parts(args, views)
    info = {
        "tokenizer": str(args.tokenizer),
        "kind": tokenizer.kind,
        "num_tokens": tokenizer.num_tokens,
        "codebook_size": tokenizer.codebook_size,
        "token_size": tokenizer.token_size,
        "image_size": image_size,
        "views": views.suffixes,
        "labels": args.labels,
    }
    settings = {**info, "data": list(args.data), "maxcount": args.maxcount, "raw_weights": args.raw_weights}
    settings["weights"] = weights
    settings["parts"] = len(parts)
    os.makedirs(args.out, exist_ok=True)
    status = fabric.broadcast(_prepare_output(args, settings) if fabric.is_global_zero else None)
    if status == "complete":
        print(f"{args.out} already holds the complete split {args.split!r} ({args.split}.json); nothing to do")
        return
    if status != "go":
        raise FileExistsError(status)
    progress = os.path.join(args.out, f"{args.split}.progress")
    mine = range(fabric.global_rank, len(parts), fabric.world_size)
    todo = [i for i in mine if not os.path.isfile(os.path.join(progress, f"{i:06d}.json"))]
    if fabric.is_global_zero and len(todo) < len(mine):
        print(f"resuming: {len(mine) - len(todo)} of rank 0's {len(mine)} parts are already done")
    for index in tqdm(todo, disable=not fabric.is_global_zero, unit="part", desc=f"pretokenize {args.split}"):
        record = encode_part(tokenizer, parts[index], index, args, views, fabric.device)
        _write_json(os.path.join(progress, f"{index:06d}.json"), record)  # the part is done once this exists
    fabric.barrier()
    if fabric.is_global_zero:
        _finish(args, {**info, "settings": settings}, len(parts), progress)


def _finish(args: argparse.Namespace, info: dict[str, Any], num_parts: int, progress: str) -> None:
    """Rank 0, after every part: ``<split>.json`` (written last: it marks the output complete) and a summary."""
    records = []
    for index in range(num_parts):
        with open(os.path.join(progress, f"{index:06d}.json"), encoding="utf-8") as file:
            records.append(json.load(file))
    skipped = [failure for record in records for failure in record["skipped"]]
    info = {
        **info,
        "num_samples": sum(record["samples"] for record in records),
        "num_skipped_inputs": len(skipped),
        "skipped": skipped,
        "shards": [record["shard"] for record in records if record["shard"]],
    }
    _write_json(os.path.join(args.out, f"{args.split}.json"), info)
    shutil.rmtree(progress)
    print(f"wrote {info['num_samples']} token samples in {len(info['shards'])} shards to {args.out}")
    if skipped:
        shown = "; ".join(f"{failure['where']} ({failure['error']})" for failure in skipped[:5])
        more = f"; {len(skipped) - 5} more" if len(skipped) > 5 else ""
        print(f"skipped {len(skipped)} unreadable inputs (listed in {args.split}.json): {shown}{more}")


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
        prog="python -m titok_lightning.pretokenize",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawTextHelpFormatter,
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
    parser.add_argument(
        "--maxcount", type=int, default=10000, help="token samples per shard (image folders; one per input shard)"
    )
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument(
        "--overwrite", action="store_true", help="delete this split's shards (done or partial) and start afresh"
    )
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
    from titok_lightning.cli import errors_in_one_line
    from titok_lightning.convert import CheckpointMismatchError
    from titok_lightning.loading import PretrainedNotAvailableError

    # mistakes in what the user typed (a missing path, a file that is no tokenizer, an output of other settings):
    # one line on stderr (HYDRA_FULL_ERROR=1: the traceback)
    user_errors = (FileNotFoundError, FileExistsError, ValueError, PretrainedNotAvailableError, CheckpointMismatchError)
    with errors_in_one_line("pretokenize", user_errors):
        main()
