"""Bad data and bad input: each fault is either skipped and counted, or refused with one line naming the cause.

Faults are injected the way a user meets them (unusual image files, broken shards, NaN losses, wrong numbers on the
command line), at tiny sizes.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.convert import convert_image_folder
from datamodules.transforms import decode_image
from tests.test_configs import ROOT


def png_bytes(image: Image.Image, **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save_args)
    return buffer.getvalue()


def test_sixteen_bit_png_is_scaled_not_clipped():
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)  # 8-bit 0, 1, 128, 255 times 257
    decoded = np.asarray(decode_image(png_bytes(Image.fromarray(values))))
    assert decoded.shape == (1, 4, 3)
    np.testing.assert_array_equal(decoded[..., 0], [[0, 1, 128, 255]])
    np.testing.assert_array_equal(decoded[..., 0], decoded[..., 2])


def test_transparent_images_are_composited_over_white():
    rgba = np.zeros((1, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (200, 0, 0, 255)  # opaque red
    rgba[0, 1] = (0, 0, 0, 0)  # fully transparent black: white after compositing, not black
    np.testing.assert_array_equal(
        np.asarray(decode_image(png_bytes(Image.fromarray(rgba)))), [[[200, 0, 0], [255] * 3]]
    )

    grey_alpha = Image.fromarray(np.array([[[50, 255], [50, 0]]], dtype=np.uint8), mode="LA")
    np.testing.assert_array_equal(np.asarray(decode_image(png_bytes(grey_alpha))), [[[50] * 3, [255] * 3]])

    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 0, 0, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    decoded = np.asarray(decode_image(png_bytes(palette, transparency=1)))
    np.testing.assert_array_equal(decoded, [[[10, 20, 30], [255] * 3]])


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [("1", 1, 255), ("L", 77, 77), ("CMYK", (0, 0, 0, 255), 0), ("P", 0, 0)],
)
def test_other_modes_convert_to_rgb(mode, value, expected):
    image = Image.new(mode, (3, 2), value)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    decoded = np.asarray(decode_image(buffer.getvalue()))
    assert decoded.shape == (2, 3, 3) and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - expected).max() <= 2  # JPEG rounding


@pytest.mark.parametrize("mode", ["F", "I"])
def test_images_of_unknown_range_are_rejected_by_mode(mode):
    buffer = io.BytesIO()
    Image.new(mode, (2, 2), 3).save(buffer, format="TIFF")
    with pytest.raises(ValueError, match=f"unsupported image mode '{mode}'"):
        decode_image(buffer.getvalue())


def test_converter_keeps_sixteen_bit_png_and_skips_float_tiff_by_name(tmp_path, caplog):
    folder = tmp_path / "images" / "class_a"
    folder.mkdir(parents=True)
    Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)).save(folder / "deep.png")
    Image.new("F", (4, 4), 0.5).save(folder / "float.tif")
    Image.new("LA", (4, 4), (9, 0)).save(folder / "clear.png")
    result = convert_image_folder(str(tmp_path / "images"), str(tmp_path / "out" / "s-%06d.tar"), progress=False)
    assert (result.num_samples, result.num_skipped) == (2, 1)
    assert "float.tif" in caplog.text and "unsupported image mode 'F'" in caplog.text

    import webdataset as wds

    images = [np.asarray(decode_image(sample["png"])) for sample in wds.WebDataset(result.shards, shardshuffle=False)]
    assert [int(image.min()) for image in images] == [255, 255]  # 16-bit white stays white; transparent -> white


# ------------------------------------------------------------------------------------------ training: NaN, config
def run_command(args: list[str], cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_nonfinite_skip_stops_after_a_bound_and_says_each_skip(tmp_path):
    from tests.test_train import tiny_overrides

    # a learning rate of 1e30 sends the weights to ~1e30 after the first step: every later loss is NaN
    diverging = ["model.optimizer.lr=1e30", "model.scheduler.warmup_steps=0"]
    bound = ["model.nonfinite=skip", "model.nonfinite_max_consecutive=3"]
    result = run_command(
        [sys.executable, "train.py", *tiny_overrides("demo"), *diverging, *bound, "trainer.max_steps=30"]
        + ["trainer.limit_val_batches=0", "report_baseline=false", f"hydra.run.dir={tmp_path}"]
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "non-finite gradient norm for the 'model' optimizer, step skipped (2 in a row, 2 in total" in output
    assert "3 steps in a row with a non-finite gradient norm" in output
    assert "model.nonfinite_max_consecutive" in output


def test_sample_grid_class_ids_are_checked_at_start(tmp_path):
    import hydra
    from hydra.errors import InstantiationException
    from omegaconf import OmegaConf, open_dict

    from tests.test_configs import compose_train
    from tests.test_generator_training import TINY_TOKENIZERS, tiny_generator_spec

    cfg = compose_train(["experiment=demo_generator", "model.tokenizer=null", "model.sample_grid.class_ids=[0,99]"])
    with open_dict(cfg):
        OmegaConf.update(cfg, "model.tokenizer", TINY_TOKENIZERS["vq"], merge=False)
        OmegaConf.update(cfg, "model.generator", tiny_generator_spec("MaskGITModule", "maskgit_titok_b64"), merge=False)
        cfg.model.generator.num_classes = 10
    with pytest.raises(
        InstantiationException, match=r"class_ids \[99\] are outside the generator's 10 classes \(0..9\)"
    ):
        hydra.utils.instantiate(cfg.model)
    cfg.model.sample_grid.class_ids = [0, 9]
    hydra.utils.instantiate(cfg.model)  # in range: builds
    cfg.model.sampling = {"num_step": 4}  # a typo the grid would only meet at its first step
    with pytest.raises(InstantiationException, match=r"model.sampling: \['num_step'\] are not settings of"):
        hydra.utils.instantiate(cfg.model)


# ----------------------------------------------------------------------------------------------------- sample.py
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("num_per_class=-3", "num_per_class must be a positive integer, got -3"),
        ("batch_size=0", "batch_size must be a positive integer, got 0"),
        ("num_classes=0", "num_classes must be a positive integer or null"),
    ],
)
def test_sample_numbers_are_checked_up_front(tmp_path, override, message):
    import sample
    from tests.test_generator_training import compose_sample

    with pytest.raises(ValueError, match=message):
        sample.run(compose_sample(["ckpt_path=/nonexistent.ckpt", override], tmp_path))


def test_sample_command_errors_are_one_line(tmp_path):
    result = run_command(
        [sys.executable, "sample.py", "ckpt_path=/nonexistent.ckpt", "num_per_class=0", f"hydra.run.dir={tmp_path}"]
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("sample.py: error: num_per_class must be a positive integer, got 0")
    )
    missing = run_command([sys.executable, "sample.py", "ckpt_path=/nonexistent.ckpt", f"hydra.run.dir={tmp_path}"])
    assert missing.returncode == 1 and "Traceback" not in missing.stderr, missing.stderr[-2000:]
    assert missing.stderr.strip().splitlines()[-1].startswith("sample.py: error: ")
    assert "/nonexistent.ckpt" in missing.stderr.strip().splitlines()[-1]
    typo = run_command([sys.executable, "sample.py", "ckpt_pth=/x.ckpt", f"hydra.run.dir={tmp_path}"])
    assert typo.returncode == 1 and typo.stderr.strip().splitlines() == [
        "sample.py: error: Could not override 'ckpt_pth'. To append to your config use +ckpt_pth=/x.ckpt "
        "(did you mean ckpt_path?)"
    ]


def test_sample_help_and_train_groups_say_what_sample_py_takes(tmp_path):
    # conf/ holds train.py's groups too: sample.py --help lists its own settings only, and a train.py group choice
    # (which Hydra would suggest to "append" as +model=..., a node sample.py never reads) is refused in one line
    help_text = run_command([sys.executable, "sample.py", "--help"]).stdout
    assert "ckpt_path: null" in help_text and "num_per_class:" in help_text
    assert "experiment:" not in help_text and "Configuration groups" not in help_text
    for arg in ("model=demo_generator", "+experiment=rar_b", "trainer=ddp"):
        result = run_command([sys.executable, "sample.py", arg, f"hydra.run.dir={tmp_path}"])
        group = arg.lstrip("+").split("=")[0]
        assert result.returncode == 1 and result.stderr.strip().splitlines() == [
            f"sample.py: error: {arg}: {group} is a config group of train.py, not of sample.py. The generator is "
            "ckpt_path=<.ckpt of a run> or generator=<registry name, file or HF repo>; data and trainer are settings "
            "here (data.val_shards=..., trainer.devices=...); python sample.py --help lists them all"
        ], result.stderr[-2000:]


def generator_checkpoint(path: Path, tokenizer_ckpt: Path, step: int, seed: int) -> Path:
    """A MaskGIT checkpoint in the layout of this project's generator training, as if saved at ``step``: weights of
    unit scale drawn from ``seed`` (a fresh init's small logits would let the sampling noise alone pick the tokens)."""
    from tests.test_generator_training import tiny_generator_spec
    from titok_lightning.loading import build_model

    spec = {**tiny_generator_spec("MaskGITModule", "maskgit_titok_b64"), "num_classes": 10}
    weights = torch.Generator().manual_seed(seed)
    state = {
        f"model.{k}": torch.randn(v.shape, generator=weights) if v.is_floating_point() else v
        for k, v in build_model(spec).state_dict().items()
    }
    hparams = {"generator": spec, "tokenizer": str(tokenizer_ckpt)}
    torch.save({"hyper_parameters": hparams, "state_dict": state, "global_step": step}, path)
    return path


def test_sample_settings_are_checked_before_any_image(tmp_path):
    import sample
    from tests.test_generator_training import compose_sample, tokenizer_checkpoint

    ckpt = generator_checkpoint(tmp_path / "last.ckpt", tokenizer_checkpoint(tmp_path / "tok.ckpt"), step=1, seed=0)
    out = tmp_path / "samples"
    overrides = [f"ckpt_path={ckpt}", f"output_dir={out}", "num_per_class=1", "trainer.accelerator=cpu"]
    with pytest.raises(ValueError, match=r"sampling: \['num_step'\] are not settings of ImageBert's sampler"):
        sample.run(compose_sample([*overrides, "++sampling.num_step=2"], tmp_path / "h"))
    assert not out.exists()


def test_sample_rerun_after_the_checkpoint_trained_further_refuses_then_regenerates(tmp_path):
    import sample
    from tests.test_generator_training import compose_sample, tokenizer_checkpoint

    tokenizer = tokenizer_checkpoint(tmp_path / "tokenizer.ckpt")
    ckpt = generator_checkpoint(tmp_path / "last.ckpt", tokenizer, step=40, seed=0)
    out = tmp_path / "samples"
    overrides = [f"ckpt_path={ckpt}", f"output_dir={out}", "num_per_class=1", "batch_size=10", "metrics.enabled=false"]
    overrides += ["trainer.accelerator=cpu", "++sampling.num_steps=2"]
    sample.run(compose_sample(overrides, tmp_path / "h1"))
    with np.load(out / "samples.npz") as data:
        first = data["arr_0"]

    generator_checkpoint(ckpt, tokenizer, step=80, seed=1)  # the run went on: same path, new weights
    with pytest.raises(
        ValueError, match=r"weights differ \(the generator's weights changed; checkpoint step 40 -> 80\)"
    ):
        sample.run(compose_sample(overrides, tmp_path / "h2"))
    sample.run(compose_sample([*overrides, "overwrite=true"], tmp_path / "h3"))
    with np.load(out / "samples.npz") as data:
        assert data["arr_0"].shape == first.shape and not np.array_equal(data["arr_0"], first)
    assert json.loads((out / "sample_config.json").read_text())["checkpoint_step"] == 80
    sample.run(compose_sample(overrides, tmp_path / "h4"))  # same weights again: resumes (nothing to generate)


def test_sample_command_stops_on_sigterm_and_keeps_whole_images(tmp_path):
    """scancel / preemption / timeout send SIGTERM: sample.py ends at once (Lightning's predict loop would go on),
    with 143, leaving only complete images (the same command resumes)."""
    import signal
    import time

    from tests.test_generator_training import tokenizer_checkpoint

    ckpt = generator_checkpoint(tmp_path / "last.ckpt", tokenizer_checkpoint(tmp_path / "tok.ckpt"), step=1, seed=0)
    out = tmp_path / "samples"
    command = [sys.executable, "sample.py", f"ckpt_path={ckpt}", f"output_dir={out}", "num_per_class=300"]
    command += ["batch_size=10", "metrics.enabled=false", "trainer.accelerator=cpu", "++sampling.num_steps=2"]
    command += [f"hydra.run.dir={tmp_path / 'h'}"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while not list(out.rglob("*.png")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert process.poll() is None, process.communicate()[0][-3000:]
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    written = list(out.rglob("*.png"))
    assert 0 < len(written) < 3000
    for path in written:
        Image.open(path).load()  # complete files only


# ------------------------------------------------------------------------------------------------ training data
def jpeg_shards(folder: Path, broken: set[int], count: int = 32) -> list[str]:
    """Two shards of 32x32 JPEGs; the samples in ``broken`` are cut after 40 bytes (a truncated download)."""
    from datamodules.convert import write_shards

    rng = np.random.default_rng(0)

    def jpeg(index: int) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, format="JPEG")
        return buffer.getvalue()[:40] if index in broken else buffer.getvalue()

    samples = ({"__key__": f"{i:05d}", "jpg": jpeg(i), "cls": str(i % 10)} for i in range(count))
    return write_shards(samples, str(folder / "train-%06d.tar"), maxcount=count // 2, progress=False)


def test_broken_jpegs_in_training_shards_are_a_logged_count_and_a_summary(tmp_path):
    from tests.test_train import tiny_overrides

    shards = jpeg_shards(tmp_path / "shards", broken={3, 11, 19})  # two in the first shard, one in the second
    data = ["data=imagenet", f"data.train_shards={tmp_path / 'shards'}", "data.val_shards=null", "data.image_size=32"]
    data += ["data.resize_shorter_edge=32", "data.samples_per_epoch=null", "data.num_workers=1", "data.batch_size=4"]
    run = tmp_path / "run"
    result = run_command(
        [sys.executable, "train.py", *[o for o in tiny_overrides("demo") if not o.startswith("data")], *data]
        + ["trainer.max_steps=12"]
        + ["trainer.log_every_n_steps=2", "report_baseline=false", f"hydra.run.dir={run}"]
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    warned = output.count("skipping unreadable sample")  # one warning line per skipped sample, from the worker
    assert warned > 0
    summary = next(line for line in output.splitlines() if line.startswith("data (all ranks): skipped"))
    assert f"skipped {warned} reads of unreadable samples ({warned} corrupt or truncated image)" in summary
    record = json.loads((run / "csv" / "skipped_samples.json").read_text())
    assert record["skipped_samples"] == warned and set(record["by_file"]) <= set(shards)
    assert record["by_file"][shards[0]] == output.count(f"of '{shards[0]}'")
    import csv

    with open(run / "csv" / "metrics.csv") as file:
        logged = [float(row["train/skipped_samples"]) for row in csv.DictReader(file) if row["train/skipped_samples"]]
    assert logged == sorted(logged) and 0 < logged[-1] <= warned


@pytest.mark.parametrize(
    "case, message",
    [
        ("truncated", r"shard '{shard}' is truncated or not a tar file .*samples_per_epoch"),
        ("too_few", r"32 training samples do not fill one batch of 32 on each of 2 readers .*lower the batch size"),
    ],
)
def test_unreadable_or_too_little_data_is_one_line_from_train_py(tmp_path, case, message):
    from tests.test_train import tiny_overrides

    shards = jpeg_shards(tmp_path / "shards", broken=set())
    batch_size = 4
    if case == "truncated":
        with open(shards[1], "r+b") as file:
            file.truncate(6000)  # a copy that stopped half-way
    else:
        batch_size = 32  # 32 samples, 2 DataLoader workers
    data = ["data=imagenet", f"data.train_shards={tmp_path / 'shards'}", "data.val_shards=null", "data.image_size=32"]
    data += ["data.resize_shorter_edge=32", "data.samples_per_epoch=null", "data.num_workers=2"]
    result = run_command(
        [sys.executable, "train.py", *[o for o in tiny_overrides("demo") if not o.startswith("data")], *data]
        + [f"data.batch_size={batch_size}", "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'run'}"]
    )
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("train.py: error: "), result.stderr[-3000:]
    assert re.search(message.format(shard=shards[1]), error), error


@pytest.mark.parametrize("first_label", [1, -1])
def test_class_labels_outside_the_generator_classes_are_refused_in_one_line(tmp_path, first_label):
    """1-based labels would train label 10 of 10 classes as the guidance's null class, and -1 as the mask token."""
    from datamodules.tokens import write_token_shards
    from tests.test_generator_training import tokenizer_checkpoint

    rng = np.random.default_rng(0)
    labelled = ({"class_id": i % 10 + first_label, "tokens": rng.integers(0, 16, 8)} for i in range(16))
    write_token_shards(labelled, str(tmp_path / "tokens" / "train-%06d.tar"), progress=False)
    wrong = 10 if first_label == 1 else -1
    tokenizer = tokenizer_checkpoint(tmp_path / "tokenizer.ckpt")
    result = run_command(
        [sys.executable, "train.py", "experiment=demo_generator"]
        + [f"model.tokenizer={tokenizer}", f"data.train_shards={tmp_path / 'tokens'}"]
        + ["data.batch_size=8", "data.samples_per_epoch=null", "trainer.max_steps=2", "model.generator.hidden_size=32"]
        + ["model.generator.intermediate_size=64", f"hydra.run.dir={tmp_path / 'run'}"]
    )
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(f"train.py: error: class labels [{wrong}] (samples ["), error
    assert "are outside the generator's 10 classes (0..9): relabel the data" in error


# ----------------------------------------------------------------------------------------------------- pretokenize
def test_pretokenize_skips_unreadable_images_resumes_after_a_kill_and_marks_completion(tmp_path):
    import signal
    import time

    from datamodules import TokenDataModule
    from tests.test_generator_training import tokenizer_checkpoint

    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for name in ("a", "b", "c"):
        (root / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    (root / "a" / "1.png").write_bytes(b"not an image")  # in the first part
    Image.fromarray(np.full((32, 32), 65535, dtype=np.uint16)).save(root / "b" / "deep.png")  # 16-bit: kept
    os.mkfifo(root / "c" / "z.png")  # the last part blocks on reading it: the run is killed there
    command = [
        sys.executable,
        "-m",
        "titok_lightning.pretokenize",
        "--tokenizer",
        str(tokenizer_checkpoint(tmp_path / "tok.ckpt")),
    ]
    command += ["--data", str(root), "--out", str(tmp_path / "tokens"), "--no-flip", "--maxcount", "4"]
    command += ["--num-workers", "0", "--accelerator", "cpu"]  # 14 images in 4 parts of 4
    progress = tmp_path / "tokens" / "train.progress"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while len(list(progress.glob("0*.json"))) < 3 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert sorted(p.name for p in progress.glob("0*.json")) == ["000000.json", "000001.json", "000002.json"]
    done = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "tokens").glob("*.tar")}
    assert sorted(done) == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]

    datamodule = TokenDataModule(train_shards=str(tmp_path / "tokens"), batch_size=2, num_workers=0)
    with pytest.raises(ValueError, match=r"incomplete \(3 of 4 parts done, no train.json\); rerun the same"):
        datamodule.setup("fit")

    (root / "c" / "z.png").unlink()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "c" / "z.png")
    result = run_command(command)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "resuming: 3 of rank 0's 4 parts are already done" in result.stdout
    assert "skipped 1 unreadable inputs (listed in train.json): " in result.stdout and "1.png" in result.stdout
    info = json.loads((tmp_path / "tokens" / "train.json").read_text())
    assert (info["num_samples"], info["num_skipped_inputs"]) == (13, 1)
    assert info["skipped"][0]["where"] == str(root / "a" / "1.png")
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "tokens").glob("*.tar") if p.name in done} == done
    assert not progress.exists()
    datamodule = TokenDataModule(val_shards=str(tmp_path / "tokens"), batch_size=13, num_workers=0)
    datamodule.setup("validate")
    assert len(next(iter(datamodule.val_dataloader()))["key"]) == 13


def test_pretokenize_shards_skip_broken_samples_and_truncated_tar_data(tmp_path, capsys):
    from tests.test_generator_training import tokenizer_checkpoint
    from titok_lightning import pretokenize

    shards = jpeg_shards(tmp_path / "shards", broken={2})
    with open(shards[1], "r+b") as file:
        file.truncate(6000)  # the second shard breaks off after a few samples
    tokens = tmp_path / "tokens"
    arguments = ["--tokenizer", str(tokenizer_checkpoint(tmp_path / "tok.ckpt")), "--data", str(tmp_path / "shards")]
    arguments += ["--out", str(tokens), "--no-flip", "--num-workers", "0", "--accelerator", "cpu", "--labels", "cls"]
    pretokenize.main(arguments)
    info = json.loads((tokens / "train.json").read_text())
    import webdataset as wds

    complete = [
        s for s in wds.tarfile_samples([{"url": shards[1]}], handler=lambda _: True) if {"jpg", "cls"} <= set(s)
    ]
    assert 0 < len(complete) < 16
    assert info["shards"] == ["train-000000.tar", "train-000001.tar"]
    assert [failure["where"] for failure in info["skipped"]] == [
        f"sample '00002' of {shards[0]}",
        f"tar data of {shards[1]}",
    ]
    assert info["num_samples"] == 15 + len(complete)

    # run again: nothing to do with the same settings, refused with others
    pretokenize.main(arguments)
    assert "already holds the complete split 'train'" in capsys.readouterr().out
    with pytest.raises(FileExistsError, match=r"a complete pretokenize run of split 'train' with other settings \("):
        pretokenize.main([*arguments, "--ten-crop"])


def test_pretokenize_convert_and_fid_reference_read_the_same_image_files_of_a_folder(tmp_path):
    """An image folder becomes as many token samples as shards and FID reference images: pretokenize read only
    jpg/jpeg/png/webp files, so the BMP, TIFF and GIF files that datamodules.convert takes were left out without a
    word, and sample.py's reference folder ignored images in sub-folders (ImageNet's class folders)."""
    from datamodules.convert import main as convert_main
    from sample import load_reference
    from tests.test_generator_training import tokenizer_checkpoint
    from titok_lightning import pretokenize

    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for name, suffixes in {"a": ("png", "bmp"), "a/deeper": ("ppm",), "b": ("tif", "gif", "JPG")}.items():
        (root / name).mkdir(parents=True)
        for i, suffix in enumerate(suffixes):
            image = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
            image.save(root / name / f"{i}.{suffix}", format={"JPG": "JPEG", "tif": "TIFF"}.get(suffix))
    (root / "b" / "notes.txt").write_text("not an image")
    converted = convert_main(["folder", str(root), str(tmp_path / "shards" / "train-%06d.tar"), "--no-progress"])
    assert (converted.num_samples, converted.num_skipped) == (6, 0)
    assert load_reference(root)[1].shape == (6, 32, 32, 3)

    tokens = tmp_path / "tokens"
    arguments = ["--tokenizer", str(tokenizer_checkpoint(tmp_path / "tok.ckpt")), "--data", str(root)]
    pretokenize.main([*arguments, "--out", str(tokens), "--no-flip", "--num-workers", "0", "--accelerator", "cpu"])
    info = json.loads((tokens / "train.json").read_text())
    assert (info["num_samples"], info["num_skipped_inputs"]) == (6, 0)


def test_reference_folder_images_are_converted_and_sizes_checked(tmp_path):
    from sample import load_reference

    Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(tmp_path / "b.png")
    statistics, images = load_reference(tmp_path)
    assert statistics is None and images.shape == (2, 4, 4, 3) and images[0].min() == 255
    Image.fromarray(np.zeros((5, 4, 3), dtype=np.uint8)).save(tmp_path / "c.png")
    with pytest.raises(ValueError, match=r"reference image .*c.png is 4x5, a.png is 4x4: resize"):
        load_reference(tmp_path)


def test_reconstruction_mode_says_how_many_validation_images_it_skipped(tmp_path, capsys):
    import sample
    from tests.test_generator_training import compose_sample, tiny_extractor, tokenizer_checkpoint

    shards = jpeg_shards(tmp_path / "val", broken={5})
    overrides = [f"tokenizer={tokenizer_checkpoint(tmp_path / 'tok.ckpt')}", "mode=reconstruct"]
    overrides += [f"data.val_shards={tmp_path / 'val'}", "data.num_workers=0", "batch_size=8", "metrics.is_splits=2"]
    sample.run(compose_sample([*overrides, "trainer.accelerator=cpu"], tmp_path), feature_extractor=tiny_extractor)
    assert (
        "reconstruction data: skipped 1 reads of unreadable samples (1 corrupt or truncated image); "
        f"by file: {shards[0]}: 1" in capsys.readouterr().out
    )
