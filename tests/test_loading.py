"""titok_lightning.loading: one test per kind of weight source, and the offline behaviour.

Sources: registry name and Hugging Face repo id (both from a fake, offline Hugging Face cache), a local
``.safetensors`` / ``.bin`` / ``.pt`` file, a folder with ``config.json``, and a Lightning ``.ckpt`` of this project
(EMA and raw weights). Everything is tiny and offline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub.constants
import lightning as L
import pytest
import torch
from safetensors.torch import save_file

from callbacks import EMACallback
from tests.test_hub import reference_config, write_checkpoint
from titok_lightning import registry
from titok_lightning.loading import (
    PretrainedNotAvailableError,
    download_command,
    load_pretrained,
    load_spec,
    load_trained,
    load_weights,
)
from titok_lightning.models.maskgit_vqgan import MaskGITVQGAN
from titok_lightning.models.titok import TiTok

TINY_VQGAN = dict(
    channel_mult=(1, 1, 1, 1), num_resolutions=4, dropout=0.0, hidden_channels=32, num_channels=3, num_res_blocks=1,
    resolution=16, z_channels=32, codebook_size=8,
)  # fmt: skip
REPO = "tiny-owner/tiny-vqgan"
COMMIT = "0" * 40
REPO_ROOT = Path(__file__).resolve().parents[1]


def tiny_vqgan(seed: int) -> MaskGITVQGAN:
    torch.manual_seed(seed)
    return MaskGITVQGAN(**TINY_VQGAN).eval()


def assert_same_weights(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    ours = model.state_dict()
    assert ours.keys() == state_dict.keys()
    for key, value in state_dict.items():
        assert torch.equal(ours[key], value), key


def cache_file(cache: Path, repo_id: str, filename: str, write) -> None:
    """Put ``filename`` of ``repo_id`` into a Hugging Face cache folder as hf_hub_download leaves it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    write(snapshot / filename)


@pytest.fixture
def hf_cache(monkeypatch, tmp_path) -> Path:
    """An empty Hugging Face cache and no hub: a probe of it is refused at once."""
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    return cache


@pytest.fixture
def tiny_variant(monkeypatch):
    """A registry variant whose published checkpoint is the single file ``REPO/vqgan.bin``."""
    spec = registry.ModelSpec("tiny_vqgan_test", MaskGITVQGAN, "pixel_tokenizer", TINY_VQGAN, f"{REPO}/vqgan.bin")
    registry.list_models()  # populate first, so the real variants do not replace the patched dict later
    monkeypatch.setitem(registry._REGISTRY, spec.name, spec)
    return spec.name


def test_registry_name_from_the_offline_cache(hf_cache, tiny_variant):
    model = tiny_vqgan(0)
    cache_file(hf_cache, REPO, "vqgan.bin", lambda path: torch.save(model.state_dict(), path))
    loaded = load_pretrained(tiny_variant)
    assert type(loaded) is MaskGITVQGAN and not loaded.training
    assert_same_weights(loaded, model.state_dict())


def test_hf_repo_id_from_the_offline_cache(hf_cache):
    model = tiny_vqgan(1)
    cache_file(hf_cache, REPO, "model.safetensors", lambda path: save_file(model.state_dict(), str(path)))
    config = {"pixel_vqgan_conf": {k: v for k, v in TINY_VQGAN.items() if k != "codebook_size"}}
    config["quantizer"] = {"num_embeddings": 8, "embedding_dim": 32}
    cache_file(hf_cache, REPO, "config.json", lambda path: path.write_text(json.dumps(config)))
    loaded = load_pretrained(REPO)
    assert type(loaded) is MaskGITVQGAN
    assert_same_weights(loaded, model.state_dict())


@pytest.mark.parametrize("suffix", [".safetensors", ".bin", ".pt"])
def test_local_weight_file(tmp_path, suffix):
    model = tiny_vqgan(2)
    path = tmp_path / f"vqgan{suffix}"
    if suffix == ".safetensors":
        save_file(model.state_dict(), str(path))
    elif suffix == ".bin":
        torch.save(model.state_dict(), path)
    else:  # a training script's wrapper around the state dict
        torch.save({"state_dict": model.state_dict(), "epoch": 3}, path)
    loaded = load_spec({"name": "maskgit_vqgan_f16_256", "pretrained": str(path), **TINY_VQGAN})
    assert_same_weights(loaded, model.state_dict())
    # without a variant, the registry model that fits the keys (with the overrides) is found
    assert_same_weights(load_pretrained(path, **TINY_VQGAN), model.state_dict())


def test_folder_with_config_json(tmp_path):
    """A TiTok folder in the reference layout: config.json decides the architecture, keys are converted."""
    config = reference_config()
    model = TiTok.from_reference_config(config).eval()
    write_checkpoint(tmp_path, model, config)
    loaded = load_pretrained(tmp_path)
    assert type(loaded) is TiTok
    assert_same_weights(loaded, model.state_dict())
    images = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(loaded(images)[0], model(images)[0], rtol=0, atol=0)


class TinyTraining(L.LightningModule):
    """Trains a registry model as this project's modules do: ``self.model`` built from the saved spec."""

    def __init__(self, tokenizer: dict):
        super().__init__()
        self.save_hyperparameters()
        from titok_lightning.loading import build_model

        self.model = build_model(tokenizer).requires_grad_(True)  # the VQGAN is built frozen

    def training_step(self, batch, batch_idx):
        return sum(p.square().sum() for p in self.model.parameters())

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=0.05)


@pytest.fixture(scope="module")
def project_checkpoint(tmp_path_factory) -> tuple[Path, TinyTraining, EMACallback]:
    folder = tmp_path_factory.mktemp("project_ckpt")
    module = TinyTraining({"name": "maskgit_vqgan_f16_256", **TINY_VQGAN})
    ema = EMACallback(decay=0.5)
    trainer = L.Trainer(
        default_root_dir=folder, max_steps=4, callbacks=[ema], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader(torch.zeros(4, 1), batch_size=1))
    path = folder / "last.ckpt"
    trainer.save_checkpoint(path)
    return path, module, ema


def test_project_checkpoint_ema_weights(project_checkpoint):
    path, module, ema = project_checkpoint
    loaded = load_pretrained(path)
    assert type(loaded) is MaskGITVQGAN and not loaded.training
    for (name, _), averaged in zip(module.model.named_parameters(), ema._ema):
        assert torch.equal(loaded.state_dict()[name], averaged), name
    model, hparams = load_trained(path, "tokenizer")
    assert_same_weights(model, loaded.state_dict())
    assert hparams["tokenizer"]["name"] == "maskgit_vqgan_f16_256"
    with pytest.raises(ValueError, match="was not written by a generator module of this project"):
        load_trained(path, "generator")


def test_project_checkpoint_raw_weights(project_checkpoint):
    path, module, _ = project_checkpoint
    raw = load_pretrained(path, use_ema=False)
    assert_same_weights(raw, module.model.state_dict())
    assert not torch.equal(raw.quantize.embedding.weight, load_pretrained(path).quantize.embedding.weight)
    # init_from: a built model takes the checkpoint's weights strictly
    target = MaskGITVQGAN(**TINY_VQGAN)
    assert_same_weights(load_weights(target, path, use_ema=False), module.model.state_dict())


def test_missing_local_checkpoint_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    for source in ["outputs/run/checkpoints/last.ckpt", "elsewhere/last.ckpt"]:
        with pytest.raises(PretrainedNotAvailableError, match="neither an existing file"):
            load_pretrained(source)


def test_offline_without_hf_hub_offline_fails_at_once(hf_cache, tiny_variant):
    """The hub cannot be reached and nothing is cached: one fast error, not huggingface_hub's retries."""
    start = time.perf_counter()
    with pytest.raises(PretrainedNotAvailableError) as err:
        load_pretrained(tiny_variant)
    assert time.perf_counter() - start < 5
    message = str(err.value)
    assert "\n" not in message
    assert REPO in message and "vqgan.bin" in message and "cannot be reached" in message
    assert f"`{download_command(REPO, ['vqgan.bin'])}`" in message and "HF_HUB_OFFLINE" in message
    assert download_command(REPO, ["x"]).startswith(("hf download", "huggingface-cli download"))


def test_train_py_prints_the_offline_error_as_one_line(tmp_path):
    """As typed: a recipe whose frozen teacher is not cached, on a machine that cannot reach the hub."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_ENDPOINT="http://127.0.0.1:9")
    result = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "train.py"),
            "experiment=titok_b64",
            "data=digits",
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("train.py: error: model: ") and "Traceback" not in result.stderr
    assert "\\n" not in error and "PretrainedNotAvailableError(" not in error
    assert f"`{download_command('fun-research/TiTok', ['maskgit-vqgan-imagenet-f16-256.bin'])}`" in error
    assert "HF_HUB_OFFLINE" in error
