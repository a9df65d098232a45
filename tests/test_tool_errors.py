"""The command-line tools (pretokenize, export, datamodules.convert, zoo) as a user meets them: ordinary mistakes end
in one line ``<program>: error: <message>`` on stderr with exit code 1 (argparse's own errors: 2), never a
traceback; and pretokenize does not resume a run whose tokenizer file now holds other weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from tests.test_configs import ROOT
from titok_lightning.loading import build_model


def run_tool(module: str, *args: str | Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    command = [sys.executable, "-m", module, *map(str, args)]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def one_line_error(result: subprocess.CompletedProcess, program: str, code: int = 1) -> str:
    """The error line of a tool that failed as it should: exit ``code``, no traceback, ``<program>: error:`` last."""
    assert result.returncode == code, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{program}: error: "), result.stderr[-3000:]
    return last


def tiny_tokenizer_checkpoint(path: Path, seed: int = 0) -> Path:
    """A tokenizer checkpoint in the layout of this project's tokenizer training, its weights drawn with ``seed``."""
    from tests.test_generator_training import TINY_TOKENIZERS

    spec = {k: v for k, v in TINY_TOKENIZERS["vq"].items() if k != "pretrained"}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(spec)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"hyper_parameters": {"tokenizer": spec}, "state_dict": state}, path)
    return path


def class_folders(root: Path, per_class: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


# ----------------------------------------------------------------------------------------------------- pretokenize
class Killed(BaseException):
    """Stands for the SIGKILL that ends a pretokenize run between two parts."""


def test_pretokenize_does_not_resume_when_the_tokenizer_file_holds_other_weights(tmp_path, monkeypatch, capsys):
    from titok_lightning import pretokenize

    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    ckpt = tiny_tokenizer_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    images = class_folders(tmp_path / "images")  # 6 images, 2 per part: 3 parts
    out = tmp_path / "tokens"
    arguments = ["--tokenizer", str(ckpt), "--data", str(images), "--out", str(out), "--no-flip", "--maxcount", "2"]
    arguments += ["--num-workers", "0", "--accelerator", "cpu"]

    # the first run is killed after its first part
    encode_part = pretokenize.encode_part

    def killed_after_one_part(tokenizer, part, index, *args):
        if index > 0:
            raise Killed
        return encode_part(tokenizer, part, index, *args)

    monkeypatch.setattr(pretokenize, "encode_part", killed_after_one_part)
    with pytest.raises(Killed):
        pretokenize.main(arguments)
    monkeypatch.setattr(pretokenize, "encode_part", encode_part)
    assert sorted(p.name for p in (out / "train.progress").glob("0*.json")) == ["000000.json"]
    assert not (out / "train.json").exists()

    # the tokenizer's run trained on: last.ckpt now holds other weights; the same command is refused
    tiny_tokenizer_checkpoint(ckpt, seed=1)
    error = one_line_error(run_tool("titok_lightning.pretokenize", *arguments), "pretokenize")
    assert error == (
        f"pretokenize: error: {out} holds an unfinished pretokenize run of split 'train' made with other tokenizer "
        f"weights ({ckpt} has changed since) (resumed, it would mix the tokens of two tokenizers); pass --overwrite "
        "to start afresh, or write to another --out"
    )
    assert sorted(p.name for p in (out / "train.progress").glob("0*.json")) == ["000000.json"]  # left as it was

    # the weights it was made with: it resumes
    tiny_tokenizer_checkpoint(ckpt, seed=0)
    capsys.readouterr()
    pretokenize.main(arguments)
    output = capsys.readouterr().out
    assert "resuming: 1 of rank 0's 3 parts are already done" in output
    assert "wrote 6 token samples in 3 shards" in output

    # complete, then the file changes again: refused too, not "nothing to do"
    tiny_tokenizer_checkpoint(ckpt, seed=1)
    with pytest.raises(FileExistsError, match=r"holds a complete pretokenize run of split 'train' made with other"):
        pretokenize.main(arguments)
    # another tokenizer path as well: both named
    other = tiny_tokenizer_checkpoint(tmp_path / "other.ckpt", seed=2)
    with pytest.raises(FileExistsError, match=r"made with another tokenizer's weights and other settings \(tokenizer"):
        pretokenize.main([*arguments, "--tokenizer", str(other)])


def test_pretokenize_mistakes_are_one_line(tmp_path):
    ckpt = tiny_tokenizer_checkpoint(tmp_path / "tok.ckpt")
    images = class_folders(tmp_path / "images", per_class=1)
    common = ["--out", tmp_path / "x", "--accelerator", "cpu", "--num-workers", "0"]

    missing_data = run_tool("titok_lightning.pretokenize", "--tokenizer", ckpt, "--data", "/nonexistent", *common)
    assert "/nonexistent" in one_line_error(missing_data, "pretokenize")

    missing_tokenizer = run_tool("titok_lightning.pretokenize", "--tokenizer", "/nope.ckpt", "--data", images, *common)
    assert "'/nope.ckpt' is neither an existing file" in one_line_error(missing_tokenizer, "pretokenize")

    (tmp_path / "config.yaml").write_text("model:\n  name: titok_b64\n")
    not_a_checkpoint = run_tool(
        "titok_lightning.pretokenize", "--tokenizer", tmp_path / "config.yaml", "--data", images, *common
    )
    assert f"{tmp_path / 'config.yaml'} is not a checkpoint written by torch.save" in one_line_error(
        not_a_checkpoint, "pretokenize"
    )

    usage = run_tool("titok_lightning.pretokenize", "--out", tmp_path / "x")  # argparse: exit 2, its own line
    assert "error: give --tokenizer and --data" in one_line_error(usage, "python -m titok_lightning.pretokenize", 2)


# ---------------------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize(
    "content",
    [b"a: 1\nb: [2]\n", b"model:\n  name: titok_b64\n", bytes(range(256)), b"", b"PK\x03\x04 a zip cut off"],
    ids=["yaml-indexerror", "yaml", "garbage", "empty", "cut-zip"],
)
def test_export_of_a_file_that_is_not_a_checkpoint_is_one_line(tmp_path, content):
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    error = one_line_error(run_tool("titok_lightning.export", path, tmp_path / "out"), "export")
    assert error.startswith(f"export: error: {path} is not a checkpoint written by torch.save (")
    assert not (tmp_path / "out").exists()


def test_reading_damaged_checkpoints_names_the_file_and_why(tmp_path):
    import fractions

    from titok_lightning.loading import NotACheckpointError, read_weights

    tiny_tokenizer_checkpoint(tmp_path / "ok.ckpt")
    data = (tmp_path / "ok.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    torch.save({"state_dict": {"x": fractions.Fraction(1, 3)}}, tmp_path / "objects.ckpt")
    (tmp_path / "legacy.ckpt").write_bytes(b"\x80\x02garbage")  # a pickle's opening, then nonsense
    weights = {"w": torch.zeros(64, 64)}
    torch.save(weights, tmp_path / "old.bin", _use_new_zipfile_serialization=False)  # torch's legacy format
    save_file(weights, tmp_path / "model.safetensors")
    for name in ("old.bin", "model.safetensors"):  # cut off in a copy
        (tmp_path / f"cut-{name}").write_bytes((tmp_path / name).read_bytes()[:8000])
    expected = {
        "cut.ckpt": "is not a checkpoint written by torch.save (a zip archive without its end",
        "objects.ckpt": "holds objects that torch.load(weights_only=True) refuses (UnpicklingError: Unsupported global",
        "legacy.ckpt": "is not a checkpoint written by torch.save (UnpicklingError: ",
        "cut-old.bin": "is not a complete checkpoint written by torch.save (unexpected EOF",
        "cut-model.safetensors": "is not a complete safetensors file (",
    }
    for name, message in expected.items():
        with pytest.raises(NotACheckpointError) as error:
            read_weights(tmp_path / name)
        assert str(error.value).startswith(f"{tmp_path / name} {message}"), str(error.value)
        assert "\n" not in str(error.value)
    assert read_weights(tmp_path / "ok.ckpt").spec["name"] == "titok_bl64_vq8k"


# --------------------------------------------------------------------------------------------------------- convert
def test_convert_mistakes_are_one_line(tmp_path):
    missing = run_tool("datamodules.convert", "folder", "/nonexist", tmp_path / "out" / "x-%06d.tar")
    assert "'/nonexist'" in one_line_error(missing, "convert")

    images = class_folders(tmp_path / "images", per_class=1)
    pattern = tmp_path / "out" / "train-%06d.tar"
    first = run_tool("datamodules.convert", "folder", images, pattern, "--no-progress")
    assert first.returncode == 0, first.stderr[-3000:]
    again = run_tool("datamodules.convert", "folder", images, pattern, "--no-progress")
    error = one_line_error(again, "convert")
    assert f"already match '{pattern}'" in error and "--overwrite" in error


# ------------------------------------------------------------------------------------------------------------- zoo
def test_zoo_help_and_unknown_options():
    shown = run_tool("titok_lightning.zoo", "--help")
    assert shown.returncode == 0 and shown.stdout.startswith("usage: python -m titok_lightning.zoo")
    assert "| name |" not in shown.stdout
    bogus = run_tool("titok_lightning.zoo", "--bogus")
    assert "unrecognized arguments: --bogus" in one_line_error(bogus, "python -m titok_lightning.zoo", 2)
    assert bogus.stdout == ""
    table = run_tool("titok_lightning.zoo")
    assert table.returncode == 0 and table.stdout.startswith("| name | family |")
