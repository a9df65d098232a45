"""sample.py reruns into an existing output_dir (the conditions are part of the run's identity), a tokenizer
checkpoint given as ckpt_path, and the files / messages of mode=reconstruct."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_bad_data import generator_checkpoint, jpeg_shards, run_command
from tests.test_configs import ROOT
from tests.test_generator_training import (
    TINY_TEXT,
    TINY_TOKENIZERS,
    compose_sample,
    tiny_extractor,
    tiny_generator_spec,
    tokenizer_checkpoint,
)

FAST = ["metrics.enabled=false", "trainer.accelerator=cpu", "++sampling.num_steps=2"]


def maskgen_checkpoint(path: Path) -> Path:
    """A MaskGen-VQ checkpoint in the layout of this project's generator training: tiny generator, and a random tiny
    TA-TiTok and CLIP text tower (rebuilt identically on each run: sample.py seeds before building them)."""
    from titok_lightning.loading import build_model

    spec = tiny_generator_spec("MaskGenVQModule", "maskgen_vq_l")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        state = {f"model.{k}": v for k, v in build_model(spec).state_dict().items()}
    hparams = {
        "generator": spec,
        "tokenizer": TINY_TOKENIZERS["tatitok_vq"],
        "text_encoder": {"model_name": "ViT-L-14-336", "pretrained": None, **TINY_TEXT},
    }
    torch.save({"hyper_parameters": hparams, "state_dict": state, "global_step": 1}, path)
    return path


def images_of(out: Path) -> np.ndarray:
    with np.load(out / "samples.npz") as data:
        return data["arr_0"]


# ---------------------------------------------------------------------------------------- the run's conditions
def test_rerun_with_other_classes_but_as_many_images_is_refused(tmp_path):
    import sample

    ckpt = generator_checkpoint(tmp_path / "last.ckpt", tokenizer_checkpoint(tmp_path / "tok.ckpt"), step=1, seed=0)
    out = tmp_path / "samples"
    base = [f"ckpt_path={ckpt}", f"output_dir={out}", "batch_size=30", *FAST]
    sample.run(compose_sample([*base, "num_per_class=6"], tmp_path / "h1"))  # 10 classes x 6 = 60 images
    first = images_of(out)
    assert first.shape[0] == 60

    # 5 classes x 12 = 60 images too: resuming would report the old images (classes 0..9) as classes 0..4
    with pytest.raises(
        ValueError,
        match=r"holds samples made with other settings or another model: conditions differ \(conditions: "
        r"10 classes for 60 images, sha256 \w+ -> 5 classes for 60 images, sha256 \w+\); pass overwrite=true",
    ):
        sample.run(compose_sample([*base, "num_per_class=12", "num_classes=5"], tmp_path / "h2"))
    np.testing.assert_array_equal(images_of(out), first)  # left as it was

    sample.run(compose_sample([*base, "num_per_class=6"], tmp_path / "h3"))  # the same settings: resumes
    np.testing.assert_array_equal(images_of(out), first)
    sample.run(compose_sample([*base, "num_per_class=12", "num_classes=5", "overwrite=true"], tmp_path / "h4"))
    assert json.loads((out / "sample_config.json").read_text())["conditions"].startswith("5 classes for 60 images")


def test_rerun_with_edited_prompts_of_the_same_count_is_refused(tmp_path):
    import sample

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "samples"
    base = [f"ckpt_path={maskgen_checkpoint(tmp_path / 'maskgen.ckpt')}", f"output_dir={out}", "num_per_class=2"]
    base += [f"prompts_file={prompts}", "batch_size=4", *FAST]
    sample.run(compose_sample(base, tmp_path / "h1"))
    assert images_of(out).shape[0] == 4
    sample.run(compose_sample(base, tmp_path / "h2"))  # unchanged prompts (even re-written): resumes

    prompts.write_text("a green triangle\na yellow star\n")  # other captions, as many lines
    with pytest.raises(
        ValueError,
        match=r"conditions differ \(conditions: 2 prompts for 4 images, sha256 (\w+) -> "
        r"2 prompts for 4 images, sha256 (?!\1)\w+\)",
    ):
        sample.run(compose_sample(base, tmp_path / "h3"))


def test_conditions_identity_tells_classes_and_prompts_apart():
    from sample import conditions_identity

    assert conditions_identity(list(range(10)) * 6) == conditions_identity(list(range(10)) * 6)
    assert conditions_identity(list(range(10)) * 6) != conditions_identity(list(range(5)) * 12)
    assert conditions_identity(["a", "b"] * 2) != conditions_identity(["a", "c"] * 2)
    assert conditions_identity(["0", "1"]) != conditions_identity([0, 1])
    assert conditions_identity(["a", "b"] * 2).startswith("2 prompts for 4 images, sha256 ")


# ------------------------------------------------------------------------------------- a tokenizer's checkpoint
def test_tokenizer_checkpoint_as_ckpt_path_is_one_line(tmp_path):
    tokenizer = tokenizer_checkpoint(tmp_path / "last.ckpt")
    result = run_command([sys.executable, "sample.py", f"ckpt_path={tokenizer}", f"hydra.run.dir={tmp_path / 'h'}"])
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]  # after Lightning's "Seed set to 42"
    assert last.startswith(f"sample.py: error: ckpt_path={tokenizer} is a tokenizer checkpoint"), last
    assert "generation needs ckpt_path=<generator .ckpt" in last and f"mode=reconstruct tokenizer={tokenizer}" in last


@pytest.mark.parametrize("case", ["not_a_model", "not_the_variant", "tokenizer_as_generator", "generator_as_tokenizer"])
def test_weights_that_are_not_the_model_asked_for_are_one_line(tmp_path, case):
    tokenizer = tokenizer_checkpoint(tmp_path / "tokenizer.ckpt")
    generator = generator_checkpoint(tmp_path / "generator.ckpt", tokenizer, step=1, seed=0)
    torch.save({"x": torch.zeros(2)}, tmp_path / "plain.bin")
    args, expected = {
        "not_a_model": (["generator=plain.bin"], "no registered model fits the checkpoint plain.bin"),
        "not_the_variant": (
            ["generator=plain.bin", "generator_variant=rar_b", f"tokenizer={tokenizer}"],
            "plain.bin: checkpoint does not match RAR: missing keys (441)",
        ),
        "tokenizer_as_generator": (
            [f"generator={tokenizer}", f"tokenizer={tokenizer}"],
            f"generator={tokenizer} holds a model of class TiTok, not a generator (MaskGITGenerator, RAR",
        ),
        "generator_as_tokenizer": (
            [f"ckpt_path={generator}", f"tokenizer={generator}"],
            "the tokenizer given holds a model of class ImageBert, not a tokenizer",
        ),
    }[case]
    command = [sys.executable, str(ROOT / "sample.py"), *args, "num_per_class=1", *FAST]
    result = run_command([*command, f"hydra.run.dir={tmp_path / 'h'}"], cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("sample.py: error: ") and expected in last, last


def pngs(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png")}


def test_a_rerun_naming_the_checkpoint_by_another_path_resumes(tmp_path, monkeypatch):
    import sample

    tokenizer = tokenizer_checkpoint(tmp_path / "tokenizer.ckpt")
    (tmp_path / "run").mkdir()
    ckpt = generator_checkpoint(tmp_path / "run" / "last.ckpt", tokenizer, step=1, seed=0)
    settings = [f"output_dir={tmp_path / 'samples'}", "num_per_class=1", "batch_size=10", *FAST]
    sample.run(compose_sample([f"ckpt_path={ckpt}", *settings], tmp_path / "h1"))
    written = pngs(tmp_path / "samples" / "images")
    monkeypatch.chdir(tmp_path / "run")  # e.g. a SLURM script that starts elsewhere and spells the path relatively
    sample.run(compose_sample(["ckpt_path=last.ckpt", *settings], tmp_path / "h2"))
    assert pngs(tmp_path / "samples" / "images") == written and len(written) == 10
    # other numerics make other images: not mixed into these
    with pytest.raises(ValueError, match=r"other model: precision differ;"):
        sample.run(compose_sample(["ckpt_path=last.ckpt", *settings, "trainer.precision=64-true"], tmp_path / "h3"))


def test_use_ema_false_on_a_run_without_the_ema_callback_samples_its_only_weights(tmp_path):
    import sample

    # RAR's recipes train without the EMA callback: the checkpoint's weights are the training weights
    ckpt = generator_checkpoint(tmp_path / "last.ckpt", tokenizer_checkpoint(tmp_path / "tok.ckpt"), step=1, seed=0)
    images = {}
    for use_ema in ("true", "false"):
        out = tmp_path / f"ema-{use_ema}"
        settings = [f"ckpt_path={ckpt}", f"output_dir={out}", f"use_ema={use_ema}", "num_per_class=1", *FAST]
        sample.run(compose_sample(settings, tmp_path / f"h-{use_ema}"))
        with np.load(out / "samples.npz") as data:
            images[use_ema] = data["arr_0"]
    np.testing.assert_array_equal(images["true"], images["false"])


@pytest.mark.parametrize(
    "setting, message",
    [
        ("num_steps=0", "sampling: num_steps must be >= 1, got 0"),
        ("guidance_decay=bogus", "sampling: guidance_decay must be one of"),
        ("num_steps=abc", "sampling.num_steps must be an integer, got 'abc'"),
        ("num_steps=2.5", "sampling.num_steps must be an integer, got 2.5"),
        ("guidance_scale=abc", "sampling.guidance_scale must be a number, got 'abc'"),
    ],
)
def test_bad_sampler_values_are_refused_before_overwrite_removes_anything(tmp_path, setting, message):
    import sample

    ckpt = generator_checkpoint(tmp_path / "last.ckpt", tokenizer_checkpoint(tmp_path / "tok.ckpt"), step=1, seed=0)
    settings = [f"ckpt_path={ckpt}", f"output_dir={tmp_path / 'samples'}", "num_per_class=1", "batch_size=10", *FAST]
    sample.run(compose_sample(settings, tmp_path / "h1"))
    written = pngs(tmp_path / "samples" / "images")
    with pytest.raises(ValueError) as error:
        sample.run(compose_sample([*settings, f"++sampling.{setting}", "overwrite=true"], tmp_path / "h2"))
    assert str(error.value).startswith(message), str(error.value)
    assert pngs(tmp_path / "samples" / "images") == written and len(written) == 10


def test_a_tokenizer_of_other_tokens_or_a_moved_one_is_refused_before_any_image(tmp_path):
    import sample
    from titok_lightning.loading import build_model

    tokenizer = tokenizer_checkpoint(tmp_path / "tok.ckpt")
    ckpt = generator_checkpoint(tmp_path / "last.ckpt", tokenizer, step=1, seed=0)
    spec = {**{k: v for k, v in TINY_TOKENIZERS["vq"].items() if k != "pretrained"}, "codebook_size": 32}
    state = {f"model.{k}": v for k, v in build_model(spec).state_dict().items()}
    torch.save({"hyper_parameters": {"tokenizer": spec}, "state_dict": state}, tmp_path / "other.ckpt")
    settings = [f"ckpt_path={ckpt}", f"output_dir={tmp_path / 'samples'}", "num_per_class=1", *FAST]
    with pytest.raises(ValueError, match=r"models codebook_size=16, the tokenizer has codebook_size=32: give the"):
        sample.run(compose_sample([*settings, f"tokenizer={tmp_path / 'other.ckpt'}"], tmp_path / "h1"))
    tokenizer.rename(tmp_path / "moved.ckpt")
    with pytest.raises(FileNotFoundError, match=rf"the tokenizer recorded in ckpt_path={ckpt}, {tokenizer}, does"):
        sample.run(compose_sample(settings, tmp_path / "h2"))
    sample.run(compose_sample([*settings, f"tokenizer={tmp_path / 'moved.ckpt'}"], tmp_path / "h3"))
    assert len(pngs(tmp_path / "samples" / "images")) == 10


# ---------------------------------------------------------------------------------------------- mode=reconstruct
def reconstruct_overrides(tmp_path: Path) -> list[str]:
    jpeg_shards(tmp_path / "val", broken=set(), count=8)
    overrides = [f"tokenizer={tokenizer_checkpoint(tmp_path / 'tok.ckpt')}", "mode=reconstruct"]
    overrides += [f"data.val_shards={tmp_path / 'val'}", "data.num_workers=0", "batch_size=4", "metrics.is_splits=2"]
    return [*overrides, "trainer.accelerator=cpu"]


def test_reconstruction_of_a_tatitok_run_decodes_with_the_text_encoder_and_captions_of_its_run(tmp_path, monkeypatch):
    """The run's text encoder, class names and class prompt; before, the ImageNet names and sample.yaml's prompt
    captioned a run trained on other classes."""
    import sample
    from titok_lightning.loading import build_model

    # the run's text encoder: a tiny random CLIP tower; sample.yaml's default (OpenAI's ViT-L-14-336) is not at hand
    spec = {k: v for k, v in TINY_TOKENIZERS["tatitok_vq"].items() if k != "pretrained"}
    state = {f"model.{k}": v for k, v in build_model(spec).state_dict().items()}
    hparams = {"tokenizer": spec, "text_encoder": {"model_name": "ViT-L-14-336", "pretrained": None, **TINY_TEXT}}
    hparams |= {"class_names": [f"digit {i}" for i in range(10)], "class_prompt": "a drawing of the {}"}
    torch.save({"hyper_parameters": hparams, "state_dict": state}, tmp_path / "tatitok.ckpt")
    jpeg_shards(tmp_path / "val", broken=set(), count=8)
    captions = []
    original = sample.ReconstructionModule.captions

    def recorded(module, batch):
        captions.extend(original(module, batch))
        return captions[-len(batch["key"]) :]

    monkeypatch.setattr(sample.ReconstructionModule, "captions", recorded)
    overrides = [f"tokenizer={tmp_path / 'tatitok.ckpt'}", "mode=reconstruct", f"data.val_shards={tmp_path / 'val'}"]
    overrides += ["data.num_workers=0", "batch_size=4", "metrics.is_splits=2", "trainer.accelerator=cpu"]
    record = sample.run(compose_sample(overrides, tmp_path / "h"), feature_extractor=tiny_extractor)
    assert record["rfid"] >= 0.0
    assert captions == [f"a drawing of the digit {i}" for i in range(8)]


def no_inception_download(url: str, dst: str, progress: bool = True) -> None:
    raise OSError("no network")


def test_reconstruction_without_inception_weights_says_so_and_writes_json(tmp_path, capsys, monkeypatch):
    import sample

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # an empty cache, and no network
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_inception_download)
    run_dir = tmp_path / "run"
    results = sample.run(compose_sample(reconstruct_overrides(tmp_path), run_dir))
    output = capsys.readouterr().out
    assert "evaluator" not in output and "rfid" not in results
    assert "\nno Inception metrics (rFID, Inception Score): InceptionV3 (FID) weights not found at " in output
    assert "metrics.inception_weights_path=<file>" in output
    path = run_dir / "reconstruction_metrics.json"
    assert f"wrote {path}" in output
    record = json.loads(path.read_text())
    assert record["codebook_usage"] == results["codebook_usage"] and record["evaluator"] is None
    assert "metrics.inception_weights_path=<file>" in record["no_inception_metrics"]


@pytest.mark.parametrize("weights", ["missing", "text", "other tensors"])
def test_a_named_inception_weights_file_that_is_wrong_is_refused_before_any_image(tmp_path, weights):
    import sample

    path = tmp_path / "inception.pth"
    if weights == "text":
        path.write_text("not weights")
    elif weights == "other tensors":
        torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    ckpt = generator_checkpoint(tmp_path / "last.ckpt", tokenizer_checkpoint(tmp_path / "tok.ckpt"), step=1, seed=0)
    out = tmp_path / "samples"
    settings = [f"ckpt_path={ckpt}", f"output_dir={out}", "num_per_class=1", "trainer.accelerator=cpu"]
    settings += ["++sampling.num_steps=2", f"metrics.inception_weights_path={path}"]
    with pytest.raises(ValueError, match=rf"^metrics.inception_weights_path: .*{path.name}"):
        sample.run(compose_sample(settings, tmp_path / "h"))
    assert not list(out.glob("images/*.png"))
    with pytest.raises(ValueError, match=r"^metrics.inception_weights_path: "):  # mode=reconstruct as well
        sample.run(
            compose_sample([*reconstruct_overrides(tmp_path), f"metrics.inception_weights_path={path}"], tmp_path / "r")
        )


def test_a_missing_metrics_reference_is_refused_before_any_image(tmp_path):
    import sample

    ckpt = generator_checkpoint(tmp_path / "last.ckpt", tokenizer_checkpoint(tmp_path / "tok.ckpt"), step=1, seed=0)
    out = tmp_path / "samples"
    settings = [f"ckpt_path={ckpt}", f"output_dir={out}", "num_per_class=1", "trainer.accelerator=cpu"]
    settings += ["++sampling.num_steps=2", f"metrics.reference={tmp_path / 'nope.npz'}"]
    with pytest.raises(FileNotFoundError, match="metrics.reference=.*nope.npz does not exist"):
        sample.run(compose_sample(settings, tmp_path / "h"), feature_extractor=tiny_extractor)
    assert not list(out.glob("images/*.png"))


def test_reconstruction_names_the_evaluator_that_ran_and_writes_json_to_output_dir(tmp_path, capsys):
    import sample

    out = tmp_path / "recon"
    overrides = [*reconstruct_overrides(tmp_path), f"output_dir={out}"]
    results = sample.run(compose_sample(overrides, tmp_path / "run"), feature_extractor=tiny_extractor)
    output = capsys.readouterr().out
    assert "(evaluator: injected feature extractor" in output and "no Inception metrics" not in output
    record = json.loads((out / "reconstruction_metrics.json").read_text())
    assert record["rfid"] == results["rfid"] and record["evaluator"].startswith("injected feature extractor")
    assert record["skipped_images"] == 0 and record["no_inception_metrics"] is None
