"""Data side of titok-lightning: webdataset LightningDataModules, the shard converter, the digits demo data.

- ImageDataModule: image shards (class or caption labels) -> {"image", "class_id" | "text", "key"}.
- DigitsDataModule: scikit-learn's digits as 32x32 RGB shards, prepared offline on first use.
- TokenDataModule: pre-tokenized shards (or the reference's JSONL) -> {"tokens", labels}.
- `python -m datamodules.convert`: image folder / caption list -> shards.
"""

from datamodules.convert import convert_caption_list, convert_image_folder, write_shards
from datamodules.digits import DigitsArrays, DigitsDataModule, load_digits_arrays, prepare_digits
from datamodules.images import ImageDataModule
from datamodules.shards import ShardedDataModule, resolve_shards
from datamodules.tokens import PretokenizedJsonl, TokenDataModule, write_token_shards

__all__ = [
    "DigitsArrays",
    "DigitsDataModule",
    "ImageDataModule",
    "PretokenizedJsonl",
    "ShardedDataModule",
    "TokenDataModule",
    "convert_caption_list",
    "convert_image_folder",
    "load_digits_arrays",
    "prepare_digits",
    "resolve_shards",
    "write_shards",
    "write_token_shards",
]
