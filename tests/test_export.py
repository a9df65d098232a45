"""Export to the official layout (config.json + model.safetensors with the reference's key names), on the parity
fixtures' models: the written keys and tensors are the reference's own, and this project's loader reads the folder
back to the same model with identical outputs."""

from __future__ import annotations

import json
import subprocess
import sys

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from tests.parity_runners import Fixture
from tests.test_parity import PARITY_DIR
from titok_lightning.convert import convert_reference_state_dict
from titok_lightning.export import main as export_main
from titok_lightning.export import reference_layout, save_reference
from titok_lightning.loading import build_model, load_pretrained
from titok_lightning.models.maskgen import MaskGenKL, MaskGenVQ
from titok_lightning.models.maskgit import ImageBert, UViTBert
from titok_lightning.models.maskgit_vqgan import MaskGITVQGAN
from titok_lightning.models.rar import RAR
from titok_lightning.models.titok import TATiTok, TiTok

EXPORTABLE = {
    "titok_vq_stage1": TiTok,
    "titok_vq_stage2": TiTok,
    "titok_vq_single": TiTok,
    "titok_vae": TiTok,
    "tatitok_vq": TATiTok,
    "tatitok_vae": TATiTok,
    "maskgit_vqgan": MaskGITVQGAN,
    "rar": RAR,
    "uvitbert": UViTBert,
    "imagebert": ImageBert,
    "maskgen_vq": MaskGenVQ,
    "maskgen_kl": MaskGenKL,
}


def fixture_model(name: str) -> tuple[type, dict, torch.nn.Module, Fixture]:
    fixture = Fixture.load(PARITY_DIR / f"{name}.json")
    model_cls = EXPORTABLE[name]
    kwargs = model_cls.kwargs_from_reference_config(fixture.reference_document)
    model = model_cls(**kwargs)
    model.load_state_dict(convert_reference_state_dict(model, fixture.state_dict))
    return model_cls, kwargs, model.eval(), fixture


def outputs(model: torch.nn.Module, fixture: Fixture) -> torch.Tensor:
    """One forward pass on the fixture's inputs, as its reference call (generators: logits; tokenizers: images)."""
    x = fixture.inputs
    torch.manual_seed(0)  # VAE tokenizers sample their posterior
    with torch.no_grad():
        if isinstance(model, MaskGITVQGAN):
            return model.decode(model.encode(x["pixels"]))
        if isinstance(model, TATiTok):
            return model(x["pixels"], x["text_guidance"])[0]
        if isinstance(model, TiTok):
            return model(x["pixels"])[0]
        if isinstance(model, MaskGenVQ):
            return model(x["input_tokens"], x["condition"], x["condition_pooled"], x["aesthetic_score"])
        if isinstance(model, MaskGenKL):
            context, pooled = model.embed_condition(x["condition"], x["condition_pooled"], x["aesthetic_score"])
            z = model.forward_decoder(x["x"], x["mask"], context, pooled)
            return model.diffloss.net(x["diffusion_x"], x["diffusion_t"], z.flatten(0, 1))
        if isinstance(model, RAR):
            condition = model.preprocess_condition(x["class_ids"], cond_drop_prob=0.0)
            return model.forward_fn(x["input_ids"], condition, True, orders=x["orders"])[0]
        return model(x["input_ids"], x["condition"], cond_drop_prob=0.0)


@pytest.mark.parametrize("name", sorted(EXPORTABLE))
def test_export_writes_the_reference_layout_and_reads_back(tmp_path, name):
    model_cls, kwargs, model, fixture = fixture_model(name)
    save_reference(model_cls, kwargs, model.state_dict(), tmp_path)

    written = load_file(str(tmp_path / "model.safetensors"))
    # the reference's key names and tensors (keys the reference saves but our models drop, e.g. RAR's causal mask,
    # are not written)
    assert set(written) <= set(fixture.state_dict), sorted(set(written) - set(fixture.state_dict))[:5]
    for key, tensor in written.items():
        assert torch.equal(tensor, fixture.state_dict[key]), key
    config = json.loads((tmp_path / "config.json").read_text())
    assert model_cls.kwargs_from_reference_config(config) == kwargs

    loaded = load_pretrained(tmp_path)
    assert type(loaded) is model_cls
    torch.testing.assert_close(outputs(loaded, fixture), outputs(model, fixture), rtol=0, atol=0)


def test_an_argument_the_reference_cannot_express_is_refused():
    model_cls, kwargs, model, _ = fixture_model("rar")
    eager = {**kwargs, "sampling": {**kwargs["sampling"], "kv_cache": False}}
    with pytest.raises(ValueError, match="RAR: the reference config cannot express sampling="):
        reference_layout(model_cls, eager, model.state_dict())


@pytest.mark.parametrize("name", ["rar", "imagebert"])
def test_sampler_settings_given_in_part_export_with_the_others_defaults(name):
    """A config naming some sampler fields (conf/model/demo_generator.yaml) builds the others' defaults: that model
    exports, and its config.json holds every reference field, the given ones as given."""
    model_cls, kwargs, model, _ = fixture_model(name)
    partial = {**kwargs, "sampling": {"guidance_scale": 2.5}}
    config, _ = reference_layout(model_cls, partial, model.state_dict())
    written = config["model"]["generator"]
    assert written["guidance_scale"] == 2.5
    assert set(model_cls.reference_sampling_fields) <= written.keys()


class TinyTraining(L.LightningModule):
    """A training run's checkpoint layout: ``hyper_parameters.tokenizer`` (registry spec) and ``model.*`` weights."""

    def __init__(self, tokenizer: dict):
        super().__init__()
        self.save_hyperparameters()
        self.model = build_model(tokenizer)


def test_export_command_on_a_checkpoint_trained_here(tmp_path, capsys):
    _, kwargs, model, fixture = fixture_model("titok_vq_single")
    spec = {"name": "titok_bl64_vq8k", **{k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}}
    module = TinyTraining(spec)
    module.model.load_state_dict(model.state_dict())
    trainer = L.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu", max_steps=0)
    trainer.strategy.connect(module)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)

    out = tmp_path / "export"
    result = subprocess.run(
        [sys.executable, "-m", "titok_lightning.export", str(ckpt), str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    torch.testing.assert_close(outputs(load_pretrained(out), fixture), outputs(model, fixture), rtol=0, atol=0)

    with pytest.raises(SystemExit) as exit_info:  # a bad path: one line, no traceback
        export_main([str(tmp_path / "missing.ckpt"), str(out)])
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert error.startswith("export: error:") and error.count("\n") == 1


class TinyGeneratorTraining(L.LightningModule):
    """A generator run's layout: ``hyper_parameters.generator`` (the trained model's spec) beside
    ``hyper_parameters.tokenizer`` (the frozen tokenizer), which may itself be a mapping."""

    def __init__(self, generator: dict, tokenizer: dict | str):
        super().__init__()
        self.save_hyperparameters()
        self.model = build_model(generator)


@pytest.mark.parametrize(
    "tokenizer",
    [{"checkpoint": "/runs/tok/checkpoints/last.ckpt"}, {"name": "titok_b64", "pretrained": None}, "titok_b64"],
)
def test_a_generator_checkpoint_exports_its_generator_whatever_form_its_tokenizer_took(tmp_path, tokenizer):
    _, kwargs, model, fixture = fixture_model("rar")
    spec = {"name": "rar_b", **{k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}}
    module = TinyGeneratorTraining(spec, tokenizer)
    module.model.load_state_dict(model.state_dict())
    trainer = L.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu", max_steps=0)
    trainer.strategy.connect(module)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)

    torch.testing.assert_close(outputs(load_pretrained(ckpt), fixture), outputs(model, fixture), rtol=0, atol=0)
    out = tmp_path / "export"
    export_main([str(ckpt), str(out)])
    torch.testing.assert_close(outputs(load_pretrained(out), fixture), outputs(model, fixture), rtol=0, atol=0)
