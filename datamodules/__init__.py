"""Data side of titok-lightning: webdataset LightningDataModules, the shard converter, the digits demo data.

Import from the modules (kept out of this file so that `python -m datamodules.convert` stays light):
- datamodules.images.ImageDataModule: image shards (class or caption labels) -> {"image", "class_id" | "text", "key"}.
- datamodules.digits.DigitsDataModule: scikit-learn's digits as 32x32 RGB shards, prepared offline on first use;
  datamodules.digits.load_digits_arrays for the same pixels as arrays.
- datamodules.tokens.TokenDataModule: pre-tokenized shards (or the reference's JSONL) -> {"tokens", labels};
  datamodules.tokens.write_token_shards writes them.
- datamodules.convert: image folder / caption list -> shards (CLI `python -m datamodules.convert`).
- datamodules.shards: the shared webdataset plumbing and the ShardedDataModule base.
"""
