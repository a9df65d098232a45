"""Data side: transforms, webdataset datamodules (ranks, workers, corrupt data), converter, digits, tokens."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from datamodules import convert as convert_module
from datamodules import digits as digits_module
from datamodules.convert import convert_image_folder, encode_png
from datamodules.convert import main as convert_main
from datamodules.digits import DigitsDataModule, load_digits_arrays, prepare_digits
from datamodules.images import ImageDataModule
from datamodules.shards import count_samples, resolve_shards
from datamodules.tokens import PretokenizedJsonl, TokenDataModule, _npy_bytes, recaption, write_token_shards
from datamodules.transforms import decode_image, eval_transform, train_transform

# ---- helpers -------------------------------------------------------------------------------------------


def _image(seed: int, height: int = 12, width: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _write(tmp_path, name: str, samples: list[dict], per_shard: int) -> str:
    """Shards from raw webdataset samples; returns a brace pattern over them."""
    pattern = str(tmp_path / f"{name}-%04d.tar")
    with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0) as writer:
        for sample in samples:
            writer.write(sample)
        count = writer.shard
    return str(tmp_path / f"{name}-{{0000..{count - 1:04d}}}.tar")


def _class_samples(n: int, num_classes: int = 3) -> list[dict]:
    return [{"__key__": f"s{i:04d}", "png": encode_png(_image(i)), "cls": str(i % num_classes)} for i in range(n)]


def _keys_and_batches(loader) -> tuple[list[str], list[dict]]:
    batches = list(loader)
    return [key for batch in batches for key in batch["key"]], batches


# ---- transforms -----------------------------------------------------------------------------------------


def test_train_transform_shape_range_and_random_crop():
    image = Image.fromarray(_image(0, 40, 60))
    transform = train_transform(32, resize_shorter_edge=36, random_crop=True, random_flip=True)
    out = torch.stack([transform(image) for _ in range(8)])
    assert out.shape == (8, 3, 32, 32) and out.dtype == torch.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert not all(torch.equal(out[0], crop) for crop in out[1:]), "random crops/flips should vary"


def test_center_crop_is_the_middle_of_the_image():
    pixels = _image(1, 48, 64)
    expected = torch.from_numpy(pixels[8:40, 16:48].astype(np.float32) / 255.0).permute(2, 0, 1)
    # the shorter edge already has the requested size: no resampling, so the crop must match exactly
    out = train_transform(32, resize_shorter_edge=48, random_crop=False, random_flip=False)(Image.fromarray(pixels))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_eval_transform_resizes_shorter_edge_bicubic_then_centre_crops():
    image = Image.fromarray(_image(2, 48, 64))
    width = int(32 * 64 / 48)
    resized = np.asarray(image.resize((width, 32), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    left = int(round((width - 32) / 2))
    expected = torch.from_numpy(resized[:, left : left + 32]).permute(2, 0, 1)
    torch.testing.assert_close(eval_transform(32)(image), expected, rtol=0, atol=1.5 / 255)


def test_horizontal_flip_mirrors_width():
    image = Image.fromarray(_image(3, 16, 16))
    plain = train_transform(16, random_crop=False, random_flip=False)(image)
    flipping = train_transform(16, random_crop=False, random_flip=True)
    torch.manual_seed(0)
    outs = [flipping(image) for _ in range(16)]
    flipped = [torch.equal(out, plain.flip(-1)) for out in outs]
    unflipped = [torch.equal(out, plain) for out in outs]
    assert all(f or u for f, u in zip(flipped, unflipped)) and any(flipped) and any(unflipped)


def test_decode_image_gives_rgb_for_gray_and_rgba():
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
    rgb = np.asarray(decode_image(encode_png(gray)))
    assert rgb.shape == (8, 8, 3) and all(np.array_equal(rgb[..., c], gray) for c in range(3))
    rgba = Image.fromarray(np.dstack([_image(4, 8, 8), np.full((8, 8), 255, np.uint8)]), "RGBA")
    assert decode_image(encode_png(rgba)).mode == "RGB"


def test_transform_rejects_crop_larger_than_resize():
    with pytest.raises(ValueError, match="resize_shorter_edge"):
        train_transform(32, resize_shorter_edge=16)


# ---- image datamodule -----------------------------------------------------------------------------------


def test_class_labels_images_and_keys_decode(tmp_path):
    shards = _write(tmp_path, "cls", _class_samples(10), per_shard=4)
    dm = ImageDataModule(val_shards=shards, image_size=12, val_batch_size=4, num_workers=0, rank=0, world_size=1)
    dm.setup("validate")
    keys, batches = _keys_and_batches(dm.val_dataloader())
    assert sorted(keys) == [f"s{i:04d}" for i in range(10)]
    for batch in batches:
        assert batch["image"].dtype == torch.float32 and batch["class_id"].dtype == torch.long
        for key, label, image in zip(batch["key"], batch["class_id"], batch["image"]):
            index = int(key[1:])
            assert label.item() == index % 3
            # eval: 12x16 -> shorter edge 12 (unchanged), centre crop 12x12 of the PNG pixels
            expected = torch.from_numpy(_image(index)[:, 2:14].astype(np.float32) / 255).permute(2, 0, 1)
            torch.testing.assert_close(image, expected, rtol=0, atol=0)


def test_text_labels_decode(tmp_path):
    captions = ["a red cube", "zwei Katzen", "日本の山"]
    samples = [{"__key__": f"t{i}", "jpg": encode_png(_image(i)), "txt": c} for i, c in enumerate(captions)]
    dm = ImageDataModule(val_shards=_write(tmp_path, "txt", samples, 2), image_size=8, label_key="txt", num_workers=0)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert dict(zip(batch["key"], batch["text"])) == {f"t{i}": c for i, c in enumerate(captions)}
    assert "class_id" not in batch

    # captions for training, class-labelled shards (ImageNet val) for validation
    cls_shards = _write(tmp_path, "cv", _class_samples(3), 3)
    dm = ImageDataModule(val_shards=cls_shards, label_key="txt", val_label_key="cls", num_workers=0)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert batch["class_id"].tolist() == [0, 1, 2] and "text" not in batch and dm.skipped_samples == 0


@pytest.mark.parametrize("per_shard", [2, 7], ids=["many-shards", "fewer-shards-than-readers"])
def test_validation_reads_each_sample_exactly_once_over_2_ranks_x_2_workers(tmp_path, per_shard):
    shards = _write(tmp_path, "val", _class_samples(23), per_shard)  # 12 or 4 shards for 4 readers
    keys_per_rank = []
    for rank in range(2):
        dm = ImageDataModule(
            val_shards=shards, image_size=8, val_batch_size=3, num_workers=2, pin_memory=False, rank=rank, world_size=2
        )
        dm.setup("validate")
        keys_per_rank.append(_keys_and_batches(dm.val_dataloader())[0])
    all_keys = keys_per_rank[0] + keys_per_rank[1]
    assert len(all_keys) == len(set(all_keys)) == 23
    assert all(keys_per_rank), "every rank must get data"


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_rank_gets_the_same_number_of_full_train_batches(tmp_path, num_workers):
    samples = _class_samples(24)
    shards = [  # deliberately unequal shards
        _write(tmp_path, "a", samples[:5], 5),
        _write(tmp_path, "b", samples[5:22], 17),
        _write(tmp_path, "c", samples[22:], 2),
    ]
    lengths = []
    for rank in range(2):
        dm = ImageDataModule(
            train_shards=shards,
            image_size=8,
            batch_size=4,
            num_workers=num_workers,
            pin_memory=False,
            shuffle_buffer=8,
            shuffle_initial=4,
            samples_per_epoch=50,
            rank=rank,
            world_size=2,
        )
        dm.setup("fit")
        workers = max(num_workers, 1)
        assert dm.train_batches_per_rank == math.ceil(50 / (4 * 2 * workers)) * workers
        loader = dm.train_dataloader()
        batches = list(loader)
        assert len(batches) == len(loader) == dm.train_batches_per_rank
        assert all(batch["image"].shape == (4, 3, 8, 8) for batch in batches)
        lengths.append(len(batches))
    assert lengths[0] == lengths[1]


def test_samples_per_epoch_defaults_to_the_shard_count(tmp_path):
    shards = _write(tmp_path, "n", _class_samples(11), 4)
    assert count_samples(resolve_shards(shards)) == 11
    dm = ImageDataModule(train_shards=shards, image_size=8, batch_size=2, num_workers=0, rank=0, world_size=1)
    dm.setup("fit")
    assert dm.train_batches_per_rank == 5  # each sample at most once per epoch: 11 // 2 full batches


def test_a_configured_epoch_size_other_than_the_count_is_said(tmp_path, caplog):
    """A recipe's samples_per_epoch (ImageNet's) on one's own shards: the log says what an epoch then is."""
    shards = _write(tmp_path, "n", _class_samples(11), 4)
    said = {}
    for samples_per_epoch in (None, 11, 1281167):
        dm = ImageDataModule(
            train_shards=shards,
            image_size=8,
            batch_size=2,
            num_workers=0,
            rank=0,
            world_size=1,
            samples_per_epoch=samples_per_epoch,
        )
        caplog.clear()
        with caplog.at_level("INFO", logger="datamodules.shards"):
            dm.setup("fit")
        said[samples_per_epoch] = next(r.getMessage() for r in caplog.records if "counted 11" in r.getMessage())
    assert said[None] == said[11] == "ImageDataModule: counted 11 training samples in 3 shards"
    assert said[1281167].endswith(
        "; an epoch is samples_per_epoch=1281167 samples drawn from them, reshuffled per "
        "epoch (data.samples_per_epoch=null: each sample once per epoch)"
    )


_HOLD_A_LOADER = """
import multiprocessing, sys
from datamodules.images import ImageDataModule

dm = ImageDataModule(train_shards=sys.argv[1], image_size=8, batch_size=2, num_workers=2, pin_memory=False)
dm.setup("fit")
batches = iter(dm.train_dataloader())
next(batches)
print(*[worker.pid for worker in multiprocessing.active_children()], flush=True)
sys.stdin.readline()  # meanwhile the test signals the workers
next(batches)
print("workers alive", flush=True)
"""  # and exits holding the loader's iterator: multiprocessing stops its live workers with SIGTERM at exit


def test_workers_ignore_stop_signals_from_others_but_not_from_the_exiting_training_process(tmp_path):
    shards = _write(tmp_path, "w", _class_samples(12), 3)
    process = subprocess.Popen(
        [sys.executable, "-c", _HOLD_A_LOADER, shards],
        cwd=Path(__file__).parents[1],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        workers = [int(pid) for pid in process.stdout.readline().split()]
        assert len(workers) == 2, process.stderr.read() if process.poll() is not None else workers
        for pid in workers:  # as SLURM or a process-group kill would: the training process decides when to stop
            os.kill(pid, signal.SIGTERM)
            os.kill(pid, signal.SIGUSR1)
        out, err = process.communicate("\n", timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0 and out.strip() == "workers alive", err[-2000:]


def _corrupt_samples() -> list[dict]:
    good = _class_samples(6)
    good[1]["png"] = b"definitely not an image"
    good[4]["png"] = good[4]["png"][:40]  # truncated PNG
    return good


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_samples_are_skipped_and_counted_across_workers(tmp_path, num_workers):
    shards = _write(tmp_path, "bad", _corrupt_samples(), 3)  # one corrupt sample per shard/worker
    dm = ImageDataModule(val_shards=shards, image_size=8, num_workers=num_workers, pin_memory=False)
    dm.setup("validate")
    keys, _ = _keys_and_batches(dm.val_dataloader())
    assert sorted(keys) == ["s0000", "s0002", "s0003", "s0005"]
    assert dm.skipped_samples == 2


def test_missing_label_is_counted_and_a_broken_dataset_raises(tmp_path):
    samples = _class_samples(4)
    del samples[2]["cls"]
    dm = ImageDataModule(val_shards=_write(tmp_path, "nolabel", samples, 4), image_size=8, num_workers=0)
    dm.setup("validate")
    assert len(_keys_and_batches(dm.val_dataloader())[0]) == 3 and dm.skipped_samples == 1

    all_bad = [{"__key__": f"x{i}", "png": b"garbage", "cls": "0"} for i in range(6)]
    dm = ImageDataModule(
        val_shards=_write(tmp_path, "allbad", all_bad, 6), image_size=8, num_workers=0, max_consecutive_skips=3
    )
    dm.setup("validate")
    with pytest.raises(RuntimeError, match="in a row"):
        list(dm.val_dataloader())


def test_missing_or_empty_shards_fail_at_setup_naming_the_path(tmp_path):
    _write(tmp_path, "ok", _class_samples(2), 1)  # ok-0000.tar, ok-0001.tar
    missing = str(tmp_path / "nope-000000.tar")
    with pytest.raises(FileNotFoundError, match="nope-000000.tar"):
        ImageDataModule(train_shards=missing, num_workers=0).setup("fit")
    with pytest.raises(FileNotFoundError, match="ok-0002.tar"):
        ImageDataModule(val_shards=str(tmp_path / "ok-{0000..0002}.tar"), num_workers=0).setup("validate")
    with pytest.raises(FileNotFoundError, match="matches no file"):
        ImageDataModule(train_shards=str(tmp_path / "zz-*.tar"), num_workers=0).setup("fit")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no \\*.tar"):
        ImageDataModule(train_shards=str(tmp_path / "empty"), num_workers=0).setup("fit")
    with pytest.raises(ValueError, match="empty"):
        ImageDataModule(train_shards=[], num_workers=0).setup("fit")
    with pytest.raises(ValueError, match="train_shards"):
        ImageDataModule(val_shards=str(tmp_path), num_workers=0).setup("fit")
    assert resolve_shards(str(tmp_path)) == [str(tmp_path / "ok-0000.tar"), str(tmp_path / "ok-0001.tar")]


class _CountingModule(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.train_batches = 0
        self.val_keys: list[str] = []

    def training_step(self, batch, batch_idx):
        self.train_batches += 1
        return (batch["image"].mean() - self.weight) ** 2

    def validation_step(self, batch, batch_idx):
        self.val_keys.extend(batch["key"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("with_val", [True, False])
def test_trainer_runs_the_declared_number_of_batches(tmp_path, with_val):
    shards = _write(tmp_path, "fit", _class_samples(9), 4)
    dm = ImageDataModule(
        train_shards=shards,
        val_shards=shards if with_val else None,
        image_size=8,
        batch_size=2,
        num_workers=0,
        pin_memory=False,
        samples_per_epoch=7,
    )
    module = _CountingModule()
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=dm)
    assert trainer.num_training_batches == dm.train_batches_per_rank == module.train_batches == 4
    assert sorted(module.val_keys) == ([f"s{i:04d}" for i in range(9)] if with_val else [])


# ---- converter ------------------------------------------------------------------------------------------


def _image_folder(root) -> dict[str, tuple[np.ndarray, str]]:
    """root/{zebra,ant}/...: PNGs (one nested), a JPEG, a BMP (re-encoded), a corrupt file."""
    files = {}
    for folder, count in (("zebra", 3), ("ant", 2)):
        for i in range(count):
            path = root / folder / (f"sub/img{i}.png" if i == 2 else f"img{i}.png")
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = _image(len(files) + 10, 9, 7)
            Image.fromarray(pixels).save(path)
            files[str(path.relative_to(root))] = (pixels, folder)
    bmp = root / "ant" / "pic.bmp"
    Image.fromarray(_image(99, 5, 6)).save(bmp)
    files["ant/pic.bmp"] = (_image(99, 5, 6), "ant")
    Image.fromarray(_image(98, 8, 8)).save(root / "zebra" / "photo.jpg", quality=90)
    (root / "zebra" / "broken.png").write_bytes(b"\x89PNG not really")
    return files


def _read_raw(shards: list[str]) -> list[dict]:
    return list(wds.DataPipeline(wds.SimpleShardList(shards), wds.tarfile_to_samples()))


def test_converter_round_trips_images_and_labels_deterministically(tmp_path):
    root = tmp_path / "folder"
    files = _image_folder(root)
    result = convert_image_folder(str(root), str(tmp_path / "out" / "train-%03d.tar"), maxcount=3, progress=False)
    assert result.classes == ["ant", "zebra"] and result.num_skipped == 1 and result.num_samples == 7
    assert json.loads((tmp_path / "out" / "classes.json").read_text()) == ["ant", "zebra"]
    samples = _read_raw(result.shards)
    assert len(result.shards) == 3 and len(samples) == 7
    assert [s["__key__"] for s in samples] == sorted(s["__key__"] for s in samples)
    for sample in samples:
        meta = json.loads(sample["json"])
        if meta["filename"].endswith(".jpg"):
            assert "jpg" in sample and (meta["original_height"], meta["original_width"]) == (8, 8)
            continue
        pixels, folder = files[meta["filename"]]
        assert "png" in sample, "PNG kept, BMP re-encoded as PNG"
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(sample["png"]))), pixels)
        assert int(sample["cls"]) == result.classes.index(folder)
        assert (meta["original_height"], meta["original_width"]) == pixels.shape[:2]

    first_bytes = [open(path, "rb").read() for path in result.shards]
    with pytest.raises(FileExistsError, match="overwrite"):
        convert_image_folder(str(root), str(tmp_path / "out" / "train-%03d.tar"), progress=False)
    again = convert_image_folder(
        str(root), str(tmp_path / "out" / "train-%03d.tar"), maxcount=3, overwrite=True, progress=False
    )
    assert [open(path, "rb").read() for path in again.shards] == first_bytes

    # validation folder missing a class reuses the training order through --classes-from
    (root / "zebra").rename(tmp_path / "zebra_only")
    (tmp_path / "val").mkdir()
    (tmp_path / "zebra_only").rename(tmp_path / "val" / "zebra")
    val = convert_main(
        ["folder", str(tmp_path / "val"), str(tmp_path / "out" / "val-%03d.tar"), "--no-progress"]
        + ["--classes-from", str(tmp_path / "out" / "classes.json")]
    )
    assert {int(s["cls"]) for s in _read_raw(val.shards)} == {1}


def test_converter_cli_captions_tsv_and_jsonl(tmp_path):
    for i in range(3):
        Image.fromarray(_image(i, 6, 10)).save(tmp_path / f"c{i}.png")
    (tmp_path / "list.tsv").write_text("path\tcaption\tscore\nc0.png\tfirst one\t5.5\nc1.png\tsecond\t6.25\n")
    (tmp_path / "list.jsonl").write_text(json.dumps({"path": "c2.png", "caption": "third"}) + "\n")
    tsv = convert_main(["captions", str(tmp_path / "list.tsv"), str(tmp_path / "t-%02d.tar"), "--no-progress"])
    jsonl = convert_main(["captions", str(tmp_path / "list.jsonl"), str(tmp_path / "j-%02d.tar"), "--no-progress"])
    rows = [(s["txt"].decode(), json.loads(s["json"]).get("aesthetic_score")) for s in _read_raw(tsv.shards)]
    assert rows == [("first one", 5.5), ("second", 6.25)]
    (only,) = _read_raw(jsonl.shards)
    assert only["txt"] == b"third" and "aesthetic_score" not in json.loads(only["json"])

    # the resolution filter reads the converter's json: longer side 10 passes min 8, fails min 12
    for min_resolution, expected in ((8, 2), (12, 0)):
        dm = ImageDataModule(
            train_shards=tsv.shards,
            image_size=6,
            label_key="txt",
            batch_size=1,
            num_workers=0,
            samples_per_epoch=2,
            min_original_resolution=min_resolution,
            max_aspect_ratio=2.0,
        )
        dm.setup("fit")
        decode = dm.train_decoder()
        kept = [decode(sample) for sample in _read_raw(tsv.shards)]
        assert sum(item is not None for item in kept) == expected


def test_write_shards_rejects_bad_patterns_and_empty_input(tmp_path):
    with pytest.raises(ValueError, match="placeholder"):
        convert_module.write_shards([], str(tmp_path / "plain.tar"))
    with pytest.raises(ValueError, match="no samples"):
        convert_module.write_shards([], str(tmp_path / "e-%03d.tar"))
    assert not list(tmp_path.glob("e-*.tar"))


# ---- digits ---------------------------------------------------------------------------------------------


def test_digits_prepare_is_idempotent_atomic_and_matches_arrays(tmp_path, monkeypatch):
    def crash(folder):
        (open(os.path.join(folder, "train-000000.tar"), "wb")).close()
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(digits_module, "_write_digits", crash)
        with pytest.raises(OSError, match="disk full"):
            prepare_digits(str(tmp_path))
    assert os.listdir(tmp_path) == [], "a crash must leave nothing behind"

    shards = prepare_digits(str(tmp_path))
    assert (shards.num_train, shards.num_val) == (1497, 300)
    assert count_samples(shards.train) == 1497 and count_samples(shards.val) == 300
    stamps = {path: os.stat(path).st_mtime_ns for path in shards.train + shards.val}
    again = prepare_digits(str(tmp_path))
    assert again == shards and {path: os.stat(path).st_mtime_ns for path in stamps} == stamps
    assert sorted(os.listdir(tmp_path)) == [digits_module.DIGITS_VERSION]

    arrays = load_digits_arrays()
    assert arrays.train_images.shape == (1497, 3, 32, 32) and arrays.val_images.shape == (300, 3, 32, 32)
    assert arrays.train_images.min() >= 0 and arrays.train_images.max() <= 1
    assert set(np.unique(arrays.val_labels)) == set(range(10))
    dm = DigitsDataModule(cache_dir=str(tmp_path), val_batch_size=100)
    dm.setup("validate")
    batches = list(dm.val_dataloader())
    images = torch.cat([batch["image"] for batch in batches]).numpy()
    labels = torch.cat([batch["class_id"] for batch in batches]).numpy()
    np.testing.assert_array_equal(images, arrays.val_images)
    np.testing.assert_array_equal(labels, arrays.val_labels)


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory) -> str:
    cache = str(tmp_path_factory.mktemp("digits"))
    prepare_digits(cache)
    return cache


def test_digits_incomplete_cache_folder_is_an_error(tmp_path):
    (tmp_path / digits_module.DIGITS_VERSION).mkdir()
    with pytest.raises(RuntimeError, match="info.json"):
        prepare_digits(str(tmp_path))


def test_digits_datamodule_trains_one_epoch_of_batches(digits_cache):
    dm = DigitsDataModule(cache_dir=digits_cache, batch_size=128, seed=0)
    dm.prepare_data()
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == dm.train_batches_per_rank == 1497 // 128  # full batches, each image at most once
    keys = [key for batch in batches for key in batch["key"]]
    assert len(set(keys)) == len(keys) == 1497 // 128 * 128
    batch = batches[0]
    assert batch["image"].shape == (128, 3, 32, 32) and batch["class_id"].max() < 10
    assert torch.equal(batch["image"][:, 0], batch["image"][:, 2]), "grayscale replicated to RGB"


# ---- tokens ---------------------------------------------------------------------------------------------


def test_token_shards_round_trip_vq_and_continuous(tmp_path):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 4096, (10, 16))
    write_token_shards(
        ({"tokens": torch.from_numpy(row), "class_id": i % 4} for i, row in enumerate(ids)),
        str(tmp_path / "vq-%03d.tar"),
        maxcount=4,
        progress=False,
    )
    dm = TokenDataModule(val_shards=str(tmp_path / "vq-{000..002}.tar"), val_batch_size=10, num_workers=0)
    dm.setup("validate")
    (batch,) = list(dm.val_dataloader())
    order = [int(key) for key in batch["key"]]
    assert batch["tokens"].dtype == torch.long and torch.equal(batch["tokens"], torch.from_numpy(ids[order]))
    assert batch["class_id"].tolist() == [i % 4 for i in order]
    assert np.load(io.BytesIO(_read_raw([str(tmp_path / "vq-000.tar")])[0]["tokens.npy"])).dtype == np.int16

    moments = rng.standard_normal((6, 8, 32)).astype(np.float16)  # [C, N] per sample
    samples = [{"tokens": m, "text": f"caption {i}", "aesthetic_score": 5 + i / 4} for i, m in enumerate(moments)]
    write_token_shards(samples, str(tmp_path / "kl-%03d.tar"), progress=False)
    dm = TokenDataModule(
        train_shards=str(tmp_path / "kl-000.tar"),
        label_key="txt",
        with_aesthetic_score=True,
        batch_size=3,
        num_workers=0,
        shuffle_buffer=6,
        shuffle_initial=6,
    )
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == dm.train_batches_per_rank == 2
    for batch in batches:
        assert batch["tokens"].shape == (3, 8, 32) and batch["tokens"].dtype == torch.float32
        for key, tokens, text, score in zip(batch["key"], batch["tokens"], batch["text"], batch["aesthetic_score"]):
            i = int(key)
            assert torch.equal(tokens, torch.from_numpy(moments[i].astype(np.float32)))
            assert text == f"caption {i}" and score.item() == pytest.approx(5 + i / 4)


def test_reference_style_token_shards_headerless_float16(tmp_path):
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 2048, (4, 12)).astype(np.float16)  # the reference stores ids as raw float16
    samples = [
        {"__key__": f"r{i}", "token.npy": row.tobytes(), "txt": f"t{i}", "aes_score": f"{6 + i}"}
        for i, row in enumerate(ids)
    ]
    dm = TokenDataModule(
        val_shards=_write(tmp_path, "ref", samples, 4),
        label_key="txt",
        token_dtype="int64",
        tokens_shape=[3, 4],
        with_aesthetic_score=True,
        num_workers=0,
    )
    dm.setup("validate")
    (batch,) = list(dm.val_dataloader())
    assert torch.equal(batch["tokens"], torch.from_numpy(ids.astype(np.int64).reshape(4, 3, 4)))
    assert batch["aesthetic_score"].tolist() == [6.0, 7.0, 8.0, 9.0]


def test_recaption_strips_the_reference_openings_and_capitalises():
    assert recaption(b"The image depicts a cat on a mat.") == "A cat on a mat."
    assert recaption(b"  The image shows   two dogs ") == "Two dogs"
    assert recaption(b"The image features") == ""
    assert recaption(b"A photo of the image depicts") == "A photo of the image depicts"  # only an opening


def test_training_captions_are_replaced_by_recaptions_with_the_set_probability(tmp_path):
    ids = np.arange(4, dtype=np.int64)
    samples = [
        {
            "__key__": f"r{i:03d}",
            "tokens.npy": _npy_bytes(ids),
            "txt": f"alt {i}",
            "recap_txt": f"The image shows item {i}",
        }
        for i in range(200)
    ] + [{"__key__": f"p{i}", "tokens.npy": _npy_bytes(ids), "txt": f"plain {i}"} for i in range(40)]
    shards = _write(tmp_path, "cap", samples, 60)

    def captions(split: str, seed: int = 0) -> dict[str, str]:
        dm = TokenDataModule(
            train_shards=shards, val_shards=shards, label_key="txt", recaption_prob=0.9, seed=seed, num_workers=0,
            batch_size=8, rank=0, world_size=1,
        )  # fmt: skip
        dm.setup("fit")
        loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
        return {key: text for batch in loader for key, text in zip(batch["key"], batch["text"])}

    train = captions("train")
    assert len(train) == 240
    recaptioned = [key for key, text in train.items() if text.startswith("Item ")]
    assert all(train[key] == f"Item {key[1:].lstrip('0') or '0'}" for key in recaptioned)
    assert 0.8 < len(recaptioned) / 200 < 0.97  # drawn per sample (0.9); never for samples without a re-caption
    assert all(train[f"p{i}"] == f"plain {i}" for i in range(40))
    assert captions("train") == train and captions("train", seed=1) != train  # reproducible, seeded
    assert all(text.startswith(("alt ", "plain ")) for text in captions("val").values())  # evaluation: the captions


def test_pretokenized_jsonl_dataset_and_datamodule(tmp_path):
    path = tmp_path / "pretokenized.jsonl"
    rows = [{"class_id": i % 5, "tokens": [[i, i + 1], [i + 2, i + 3]]} for i in range(10)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    dataset = PretokenizedJsonl(str(path))
    assert len(dataset) == 10
    item = dataset[7]
    assert item["tokens"].tolist() == [7, 8, 9, 10] and item["class_id"] == 2
    dm = TokenDataModule(train_jsonl=str(path), batch_size=4, num_workers=0, rank=0, world_size=1)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == dm.train_batches_per_rank == 2
    assert batches[0]["tokens"].shape == (4, 4) and batches[0]["class_id"].dtype == torch.long
    with pytest.raises(ValueError, match="not both"):
        TokenDataModule(train_shards=str(path), train_jsonl=str(path))
