"""Data side of titok-lightning: webdataset LightningDataModules, the shard converter, the digits demo data.

- ImageDataModule (images.py): image shards (class or caption labels) -> {"image", "class_id" | "text", "key"}.
- DigitsDataModule (digits.py): scikit-learn's digits as 32x32 RGB shards, prepared offline on first use;
  load_digits_arrays gives the same pixels as arrays.
- TokenDataModule (tokens.py): pre-tokenized shards (or the reference's JSONL) -> {"tokens", labels};
  write_token_shards writes them.
- convert.py: image folder / caption list -> shards (CLI `python -m datamodules.convert`).
- shards.py: the shared webdataset plumbing and the ShardedDataModule base.

Names are imported on first access (PEP 562), so `python -m datamodules.convert` does not load Lightning
and Hydra targets such as `datamodules.ImageDataModule` resolve.
"""

import importlib

_EXPORTS = {
    "ImageDataModule": "datamodules.images",
    "DigitsDataModule": "datamodules.digits",
    "DigitsArrays": "datamodules.digits",
    "load_digits_arrays": "datamodules.digits",
    "prepare_digits": "datamodules.digits",
    "TokenDataModule": "datamodules.tokens",
    "PretokenizedJsonl": "datamodules.tokens",
    "write_token_shards": "datamodules.tokens",
    "convert_image_folder": "datamodules.convert",
    "convert_caption_list": "datamodules.convert",
    "write_shards": "datamodules.convert",
    "ShardedDataModule": "datamodules.shards",
    "resolve_shards": "datamodules.shards",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'datamodules' has no attribute {name!r}")
