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


# ---------------------------------------------------------------------------------------------- mode=reconstruct
def reconstruct_overrides(tmp_path: Path) -> list[str]:
    jpeg_shards(tmp_path / "val", broken=set(), count=8)
    overrides = [f"tokenizer={tokenizer_checkpoint(tmp_path / 'tok.ckpt')}", "mode=reconstruct"]
    overrides += [f"data.val_shards={tmp_path / 'val'}", "data.num_workers=0", "batch_size=4", "metrics.is_splits=2"]
    return [*overrides, "trainer.accelerator=cpu"]


def test_reconstruction_without_inception_weights_says_so_and_writes_json(tmp_path, capsys):
    import sample

    missing = tmp_path / "no-inception.pth"
    run_dir = tmp_path / "run"
    overrides = [*reconstruct_overrides(tmp_path), f"metrics.inception_weights_path={missing}"]
    results = sample.run(compose_sample(overrides, run_dir))
    output = capsys.readouterr().out
    assert "evaluator" not in output and "rfid" not in results
    assert "\nno Inception metrics (rFID, Inception Score): InceptionV3 (FID) weights not found at " in output
    assert "metrics.inception_weights_path=<file>" in output
    path = run_dir / "reconstruction_metrics.json"
    assert f"wrote {path}" in output
    record = json.loads(path.read_text())
    assert record["codebook_usage"] == results["codebook_usage"] and record["evaluator"] is None
    assert "metrics.inception_weights_path=<file>" in record["no_inception_metrics"]


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
