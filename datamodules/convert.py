"""Write webdataset shards from an image folder or a caption list.

CLI:
    # ImageNet-style folder: one sub-folder per class; class index = position in sorted folder names.
    python -m datamodules.convert folder /data/imagenet/train /data/in1k/train-%06d.tar --maxcount 1000
    # validation: reuse the training class order so indices match
    python -m datamodules.convert folder /data/imagenet/val /data/in1k/val-%06d.tar \
        --classes-from /data/in1k/classes.json
    # captions: tsv (path<TAB>caption[<TAB>aesthetic score]) or jsonl ({"path", "caption", "aesthetic_score"})
    python -m datamodules.convert captions pairs.tsv /data/t2i/train-%06d.tar --image-root /data/images

Each sample: `<key>.<jpg|png|webp>` (source bytes kept verbatim; other formats re-encoded as PNG), `.cls`
or `.txt`, and `.json` with `filename`, `original_height`, `original_width` (+ `aesthetic_score`).
Keys are the running sample index (`%09d`), so the output order is the (sorted) input order.
Unreadable images are skipped with a warning and counted.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from glob import glob
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from datamodules.transforms import IMAGE_FILE_SUFFIXES, check_image_mode, image_files_under, to_rgb

log = logging.getLogger(__name__)

# Formats whose bytes are stored as they are (the reader decodes them); anything else becomes PNG.
_KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


@dataclass
class ConversionResult:
    """What a conversion wrote: shard paths, number of samples written and skipped, class names."""

    shards: list[str]
    num_samples: int
    num_skipped: int = 0
    classes: list[str] | None = None


def _check_pattern(out_pattern: str, overwrite: bool) -> None:
    try:
        out_pattern % 0
    except TypeError as error:
        raise ValueError(f"out_pattern {out_pattern!r} needs one shard-number placeholder such as %06d") from error
    existing = sorted(glob(re.sub(r"%0?\d*d", "*", out_pattern)))
    if existing and not overwrite:
        raise FileExistsError(
            f"{len(existing)} file(s) already match {out_pattern!r} (e.g. {existing[0]!r}); "
            "pass overwrite=True / --overwrite to replace them"
        )
    for path in existing:
        os.remove(path)  # stale shards from a larger earlier run would otherwise mix in


def write_shards(
    samples: Iterable[dict[str, Any]],
    out_pattern: str,
    maxcount: int = 1000,
    maxsize: float = 3e9,
    total: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> list[str]:
    """Write already-encoded webdataset samples (`__key__` plus extension -> bytes/str) into shards.

    Args:
        samples: dicts with `__key__` (no dots) and entries such as `png`, `cls`, `txt`, `json`.
        out_pattern: shard path with a placeholder, e.g. `out/train-%06d.tar`; its folder is created.
        maxcount / maxsize: start a new shard after this many samples / bytes.
        total: number of samples, for the progress bar only.
        overwrite: delete existing files matching the pattern first (otherwise raise FileExistsError).

    Returns:
        The shard paths written, in order. Raises ValueError when `samples` is empty.
    """
    _check_pattern(out_pattern, overwrite)
    os.makedirs(os.path.dirname(os.path.abspath(out_pattern)), exist_ok=True)
    shards: list[str] = []
    count = 0
    with wds.ShardWriter(
        out_pattern, maxcount=maxcount, maxsize=maxsize, post=shards.append, verbose=0, mtime=0
    ) as writer:
        for sample in tqdm(samples, total=total, disable=not progress, unit="sample", desc=out_pattern):
            if "." in sample["__key__"]:
                raise ValueError(f"sample key {sample['__key__']!r} contains a dot (webdataset splits keys there)")
            writer.write(sample)
            count += 1
    if count == 0:
        for path in shards:
            os.remove(path)
        raise ValueError(f"no samples to write to {out_pattern!r}")
    return shards


def encode_png(image: np.ndarray | Image.Image) -> bytes:
    """Lossless PNG bytes of a PIL image or a uint8 array [H, W] / [H, W, 3]."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"expected a uint8 image array, got {image.dtype}")
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _image_entry(data: bytes, verify: bool) -> tuple[str, bytes, int, int]:
    """(extension, bytes, height, width) for stored image bytes; unusual formats are re-encoded as PNG.

    Images whose mode the reader cannot convert to RGB (32-bit integer / float) raise ValueError here, so that
    they are skipped and named now rather than at training time.
    """
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        check_image_mode(image)
        extension = _KEPT_FORMATS.get(image.format)
        if verify or extension is None:
            image.load()  # full decode: truncated or corrupt files raise here
        if extension is None:
            return "png", encode_png(to_rgb(image)), height, width
    return extension, data, height, width


def file_sample(
    index: int,
    path: str,
    relative_to: str,
    class_id: int | None = None,
    caption: str | None = None,
    aesthetic_score: float | None = None,
    verify: bool = False,
) -> dict[str, Any]:
    """Encoded webdataset sample for one image file (key = `index` as %09d)."""
    with open(path, "rb") as file:
        extension, data, height, width = _image_entry(file.read(), verify)
    meta: dict[str, Any] = {
        "filename": os.path.relpath(path, relative_to),
        "original_height": height,
        "original_width": width,
    }
    if aesthetic_score is not None:
        meta["aesthetic_score"] = float(aesthetic_score)
    sample: dict[str, Any] = {"__key__": f"{index:09d}", extension: data, "json": json.dumps(meta)}
    if class_id is not None:
        sample["cls"] = str(class_id)
    if caption is not None:
        sample["txt"] = caption
    return sample


class _FileSamples:
    """Encoded samples of (path, labels) jobs in order; unreadable images are skipped, logged and counted."""

    def __init__(self, jobs: Sequence[tuple[str, dict[str, Any]]], root: str, verify: bool):
        self.jobs, self.root, self.verify = jobs, root, verify
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.jobs)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for index, (path, labels) in enumerate(self.jobs):
            try:
                yield file_sample(index, path, self.root, verify=self.verify, **labels)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
                self.skipped += 1
                log.warning("skipping unreadable image %s: %s: %s", path, type(error).__name__, error)


def list_image_folder(root: str, classes: Sequence[str] | None = None) -> tuple[list[tuple[str, int]], list[str]]:
    """(image path, class index) pairs of a class-per-folder tree, in sorted order, and the class names.

    Class index = position of the folder name in `classes` (default: the sorted folder names). Pass the
    training classes when listing a validation folder so that indices match; unknown folders raise.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root!r} does not exist")
    folders = sorted(name for name in os.listdir(root) if os.path.isdir(os.path.join(root, name)))
    if not folders:
        raise ValueError(f"image folder {root!r} has no class sub-folders")
    classes = list(folders if classes is None else classes)
    index_of = {name: index for index, name in enumerate(classes)}
    unknown = [name for name in folders if name not in index_of]
    if unknown:
        raise ValueError(f"folders {unknown[:5]} of {root!r} are not in the given class list")
    entries = [(path, index_of[folder]) for folder in folders for path in image_files_under(os.path.join(root, folder))]
    if not entries:
        raise ValueError(f"no images ({', '.join(IMAGE_FILE_SUFFIXES)}) under {root!r}")
    return entries, classes


def read_caption_list(list_file: str, image_root: str | None = None) -> list[tuple[str, str, float | None]]:
    """(image path, caption, aesthetic score or None) rows of a tsv or jsonl list, in file order.

    tsv: `path<TAB>caption[<TAB>score]` (a first row starting with `path` is a header); jsonl: objects
    with `path` (or `image`), `caption` (or `text`), optional `aesthetic_score` (or `aes_score`).
    Relative paths are taken from `image_root` (default: the list file's folder).
    """
    root = image_root if image_root is not None else os.path.dirname(os.path.abspath(list_file))
    rows = []
    with open(list_file, encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if list_file.endswith(".jsonl"):
                record = json.loads(line)
                path = record.get("path", record.get("image"))
                caption = record.get("caption", record.get("text"))
                score = record.get("aesthetic_score", record.get("aes_score"))
            else:
                fields = line.split("\t")
                if line_number == 1 and fields[0].strip().lower() == "path":
                    continue
                if len(fields) not in (2, 3):
                    raise ValueError(f"{list_file}:{line_number}: expected path<TAB>caption[<TAB>score]")
                path, caption = fields[0], fields[1]
                score = float(fields[2]) if len(fields) == 3 else None
            if path is None or caption is None:
                raise ValueError(f"{list_file}:{line_number}: missing path or caption")
            rows.append((os.path.join(root, path), caption, score))
    if not rows:
        raise ValueError(f"{list_file!r} lists no images")
    return rows


def _classes_json_is_new(path: str, classes: list[str]) -> bool:
    """False when `path` already holds `classes`; raises when it holds another list (indices would clash)."""
    if not os.path.exists(path):
        return True
    with open(path, encoding="utf-8") as file:
        if json.load(file) != classes:
            raise FileExistsError(f"{path!r} holds a different class list; remove it or use --classes-from")
    return False


def convert_image_folder(
    root: str,
    out_pattern: str,
    maxcount: int = 1000,
    classes: Sequence[str] | None = None,
    classes_json: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    verify: bool = False,
) -> ConversionResult:
    """Class-per-folder images -> shards with `cls` labels, plus a classes json (list of folder names).

    `classes_json` defaults to `classes.json` next to the shards; an existing one must hold the same list.
    """
    entries, class_names = list_image_folder(root, classes)
    classes_json = classes_json or os.path.join(os.path.dirname(out_pattern), "classes.json")
    write_classes = _classes_json_is_new(classes_json, class_names)  # checked before hours of conversion
    samples = _FileSamples([(path, {"class_id": label}) for path, label in entries], root, verify)
    shards = write_shards(samples, out_pattern, maxcount, total=len(samples), progress=progress, overwrite=overwrite)
    if write_classes:
        os.makedirs(os.path.dirname(os.path.abspath(classes_json)), exist_ok=True)
        with open(classes_json, "w", encoding="utf-8") as file:
            json.dump(class_names, file, indent=0)
    return ConversionResult(shards, len(samples) - samples.skipped, samples.skipped, class_names)


def convert_caption_list(
    list_file: str,
    out_pattern: str,
    image_root: str | None = None,
    maxcount: int = 1000,
    overwrite: bool = False,
    progress: bool = True,
    verify: bool = False,
) -> ConversionResult:
    """Images with captions (tsv/jsonl list, see `read_caption_list`) -> shards with `txt` and `json`."""
    rows = read_caption_list(list_file, image_root)
    root = image_root if image_root is not None else os.path.dirname(os.path.abspath(list_file))
    jobs = [(path, {"caption": caption, "aesthetic_score": score}) for path, caption, score in rows]
    samples = _FileSamples(jobs, root, verify)
    shards = write_shards(samples, out_pattern, maxcount, total=len(samples), progress=progress, overwrite=overwrite)
    return ConversionResult(shards, len(samples) - samples.skipped, samples.skipped)


def main(argv: Sequence[str] | None = None) -> ConversionResult:
    parser = argparse.ArgumentParser(prog="python -m datamodules.convert", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    folder = commands.add_parser("folder", help="class-per-folder images (ImageNet layout)")
    folder.add_argument("root", help="folder with one sub-folder per class")
    folder.add_argument("--classes-json", help="where to write the class list (default: next to the shards)")
    folder.add_argument("--classes-from", help="read the class order from this json (e.g. the training one)")
    captions = commands.add_parser("captions", help="tsv/jsonl list of images with captions")
    captions.add_argument("list_file", help="tsv (path, caption[, score]) or jsonl")
    captions.add_argument("--image-root", help="base folder of relative image paths (default: the list's folder)")
    for command in (folder, captions):
        command.add_argument("out_pattern", help="output shards, e.g. out/train-%%06d.tar")
        command.add_argument("--maxcount", type=int, default=1000, help="samples per shard")
        command.add_argument("--overwrite", action="store_true", help="replace existing shards")
        command.add_argument("--verify", action="store_true", help="fully decode every image (slower)")
        command.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    common = dict(maxcount=args.maxcount, overwrite=args.overwrite, progress=not args.no_progress, verify=args.verify)
    if args.command == "folder":
        classes = None
        if args.classes_from:
            with open(args.classes_from, encoding="utf-8") as file:
                classes = json.load(file)
        result = convert_image_folder(
            args.root, args.out_pattern, classes=classes, classes_json=args.classes_json, **common
        )
    else:
        result = convert_caption_list(args.list_file, args.out_pattern, image_root=args.image_root, **common)
    log.info("wrote %d samples (%d skipped) into %d shards", result.num_samples, result.num_skipped, len(result.shards))
    return result


if __name__ == "__main__":
    from titok_lightning.cli import errors_in_one_line

    # a missing input, shards already there, an empty or malformed list: one line (HYDRA_FULL_ERROR=1: the traceback)
    with errors_in_one_line("convert", (FileNotFoundError, FileExistsError, ValueError)):
        main()
