"""Image decoding and the train/eval transforms of the reference pipeline.

Transforms take an RGB PIL image and return float32 [3, H, W] in [0, 1] (no normalisation: the
tokenizers expect [0, 1]). Resizing is bicubic with antialiasing, done by PIL.
"""

from __future__ import annotations

import io

from PIL import Image
from torchvision import transforms

Image.MAX_IMAGE_PIXELS = None  # web-scale text-image data has very large images; they are resized anyway


def decode_image(data: bytes) -> Image.Image:
    """Decode encoded image bytes (JPEG/PNG/WebP/...) into an RGB PIL image.

    Decodes fully here so that truncated files fail now (and get skipped), not inside a transform.
    Grayscale, palette, RGBA and CMYK images are converted to RGB.
    """
    image = Image.open(io.BytesIO(data))
    image.load()
    return image if image.mode == "RGB" else image.convert("RGB")


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
