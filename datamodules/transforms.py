"""Image decoding and the train/eval transforms of the reference pipeline.

Transforms take an RGB PIL image and return float32 [3, H, W] in [0, 1] (no normalisation: the
tokenizers expect [0, 1]). Resizing is bicubic with antialiasing, done by PIL.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image
from torchvision import transforms

Image.MAX_IMAGE_PIXELS = None  # web-scale text-image data has very large images; they are resized anyway

# Image files the tools read from folders (datamodules.convert, pretokenize, sample.py's reference folder)
IMAGE_FILE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")


def image_files_under(folder: str | os.PathLike) -> list[str]:
    """Paths of the image files under ``folder`` and its sub-folders, in sorted tree order (the same order on every
    machine: a folder's files, then its sub-folders, each by name)."""
    found = []
    for directory, subdirectories, names in os.walk(folder):
        subdirectories.sort()
        found += [os.path.join(directory, name) for name in sorted(names) if name.lower().endswith(IMAGE_FILE_SUFFIXES)]
    return found


# Modes `convert("RGB")` maps faithfully; 16-bit and transparent modes need the handling in `to_rgb`.
_PLAIN_MODES = {"RGB", "L", "1", "P", "CMYK", "YCbCr", "LAB", "HSV"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_SUPPORTED_MODES = _PLAIN_MODES | _SIXTEEN_BIT_MODES | _ALPHA_MODES


def check_image_mode(image: Image.Image) -> None:
    """ValueError naming the mode when `to_rgb` cannot convert it (read from the header: no pixel decoding)."""
    if image.mode not in _SUPPORTED_MODES:
        raise ValueError(
            f"unsupported image mode {image.mode!r} (32-bit integer/float or exotic: value range unknown); "
            "convert such images to 8-bit RGB or 16-bit PNG"
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB version of `image`; ValueError for modes whose value range is unknown (I, F, ...).

    16-bit grayscale (mode I;16, e.g. 16-bit PNG) is scaled to 8 bit (`convert` would clip it to near-white);
    transparent images (RGBA, LA, PA, P with a transparent colour) are composited over white.
    """
    check_image_mode(image)
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.uint32)
        return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8)).convert("RGB")
    if image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes) -> Image.Image:
    """Decode encoded image bytes (JPEG/PNG/WebP/...) into an 8-bit RGB PIL image (see `to_rgb`).

    Decodes fully here so that truncated files fail now (and get skipped), not inside a transform.
    """
    image = Image.open(io.BytesIO(data))
    image.load()
    return to_rgb(image)


def train_transform(
    image_size: int, resize_shorter_edge: int | None = None, random_crop: bool = True, random_flip: bool = True
) -> transforms.Compose:
    """Training transform: resize the shorter edge, crop `image_size` (random or centre), optional h-flip.

    Returns a callable PIL RGB image -> float32 [3, image_size, image_size] in [0, 1].
    """
    shorter_edge = image_size if resize_shorter_edge is None else resize_shorter_edge
    if shorter_edge < image_size:
        raise ValueError(f"resize_shorter_edge ({shorter_edge}) must be >= image_size ({image_size})")
    steps = [
        transforms.Resize(shorter_edge, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
        transforms.RandomCrop(image_size) if random_crop else transforms.CenterCrop(image_size),
    ]
    if random_flip:
        steps.append(transforms.RandomHorizontalFlip())
    steps.append(transforms.ToTensor())
    return transforms.Compose(steps)


def eval_transform(image_size: int) -> transforms.Compose:
    """Evaluation transform: resize the shorter edge to `image_size`, centre crop, no augmentation.

    Resizing straight to the crop size (not to the training `resize_shorter_edge`) keeps reconstruction
    and FID numbers comparable with published ImageNet results.
    """
    return transforms.Compose(
        [
            transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
        ]
    )
