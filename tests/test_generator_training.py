"""Generator training: experiment configs (composition, official parameter counts, the reference recipes),
fast_dev_run of every generator experiment at tiny size, the generator modules' semantics, pretokenize -> train ->
sample on tiny data, sample.py resume and npz layout, and FID / precision / recall sanity with an injected feature
extractor."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf, open_dict
from torch.utils.data import DataLoader

from datamodules.convert import encode_png, write_shards
from datamodules.shards import collate_samples
from datamodules.tokens import write_token_shards
from tests.test_configs import CONF, MANIFESTS, ROOT, compose_job, compose_train, needs_fsdp2
from titok_lightning.frozen_tokenizer import load_frozen_tokenizer
from titok_lightning.lit.generator import (
    MaskGenKLModule,
    MaskGenVQModule,
    MaskGITModule,
    RARModule,
    TokenizerChangedError,
)
from titok_lightning.loading import build_model
from titok_lightning.models.rar import RAR
from titok_lightning.registry import model_kwargs
from train import MissingSettingError, check_mandatory, train

# experiment -> (manifest holding the reference training config, manifest with the generator's parameter count)
MASKGIT = "training__generator__maskgit__generator.json"
RAR_MANIFEST = "training__generator__rar__generator.json"
MASKGEN = [f"maskgen_{k}_{s}_stage{t}" for k in ("vq", "kl") for s in ("l", "xl") for t in (1, 2)]
EXPERIMENTS = {
    "maskgit_titok_b64": (MASKGIT, MASKGIT),
    "maskgit_titok_l32": (MASKGIT, "infer__TiTok__titok_l32__generator.json"),
    "maskgit_titok_s128": (MASKGIT, "infer__TiTok__titok_s128__generator.json"),
    "rar_b": (RAR_MANIFEST, RAR_MANIFEST),
    "rar_l": (RAR_MANIFEST, None),
    "rar_xl": (RAR_MANIFEST, None),
    "rar_xxl": (RAR_MANIFEST, None),
    **{name: (f"training__MaskGen__{name}__generator.json",) * 2 for name in MASKGEN},
}
# README_RAR.md training commands: hidden size, layers, heads, MLP width; and the RAR paper's parameter counts (M)
RAR_SIZES = {
    "rar_b": (768, 24, 16, 3072, 261),
    "rar_l": (1024, 24, 16, 4096, 461),
    "rar_xl": (1280, 32, 16, 5120, 955),
    "rar_xxl": (1408, 40, 16, 6144, 1499),
}


def manifest(name: str) -> dict:
    path = MANIFESTS / name
    if not path.is_file():
        pytest.fail(f"missing parity manifest {path}")
    return json.loads(path.read_text())


def compose_experiment(experiment: str, overrides: tuple[str, ...] = ()):
    return compose_train([f"experiment={experiment}", *overrides])


# --------------------------------------------------------------------------------------------------- configs
def test_every_generator_experiment_exists():
    on_disk = {p.stem for p in (CONF / "experiment").glob("*.yaml")}
    assert set(EXPERIMENTS) | {"demo_generator"} <= on_disk


@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS))
def test_experiment_builds_full_size_generator_with_official_parameter_count(experiment):
    cfg = compose_experiment(experiment)
    spec = OmegaConf.to_container(cfg.model.generator, resolve=True)
    with torch.device("meta"):
        model = build_model(spec)
    num_parameters = sum(p.numel() for p in model.parameters())
    params_manifest = EXPERIMENTS[experiment][1]
    if params_manifest is not None:
        assert num_parameters == manifest(params_manifest)["num_parameters"]
    if experiment in RAR_SIZES:
        # independent of the registry: the reference config with the README's sizes, and the paper's count
        width, depth, heads, mlp, paper_millions = RAR_SIZES[experiment]
        config = manifest(RAR_MANIFEST)["config"]
        gen = config["model"]["generator"]
        gen.update(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads, intermediate_size=mlp)
        with torch.device("meta"):
            reference_sized = RAR.from_reference_config(config)
        assert num_parameters == sum(p.numel() for p in reference_sized.parameters())
        assert abs(num_parameters / 1e6 - paper_millions) < 1


def _expected_precision(mixed_precision: str) -> str:
    return {"fp16": "16-mixed", "bf16": "bf16-mixed", "no": "32-true"}[mixed_precision]


@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS))
def test_experiment_reproduces_reference_recipe(experiment):
    ref = manifest(EXPERIMENTS[experiment][0])["config"]
    cfg = compose_experiment(experiment)
    model, trainer, data, callbacks = cfg.model, cfg.trainer, cfg.data, cfg.callbacks
    opt, sched, training, exp = ref["optimizer"]["params"], ref["lr_scheduler"], ref["training"], ref["experiment"]

    assert model.optimizer.lr == opt["learning_rate"]
    assert list(model.optimizer.betas) == [opt["beta1"], opt["beta2"]]
    assert model.optimizer.weight_decay == opt["weight_decay"]
    assert (model.scheduler.name, model.scheduler.warmup_steps) == (sched["scheduler"], sched["params"]["warmup_steps"])
    assert model.scheduler.end_lr == sched["params"]["end_lr"]
    assert model.max_grad_norm == training["max_grad_norm"]
    assert model.accumulate_grad_batches == training["gradient_accumulation_steps"]
    assert trainer.max_steps == training["max_train_steps"]
    assert trainer.precision == _expected_precision(training["mixed_precision"])
    assert cfg.seed == training["seed"]
    assert (callbacks.get("ema") is not None) == training["use_ema"]
    if training["use_ema"]:
        assert callbacks.ema.decay == 0.999  # the reference's EMAModel(decay=0.999)
    assert callbacks.model_checkpoint.every_n_train_steps == exp["save_every"]
    assert trainer.val_check_interval == exp["eval_every"]
    assert model.sample_grid.every_n_steps == exp["generate_every"]
    assert trainer.log_every_n_steps == exp["log_every"]

    assert data.batch_size == training["per_gpu_batch_size"]
    assert data.num_workers == ref["dataset"]["params"]["num_workers_per_gpu"]
    assert data.samples_per_epoch == exp["max_train_examples"]

    generator = {**model_kwargs(model.generator.name), **OmegaConf.to_container(model.generator)}
    vq = ref["model"]["vq_model"]
    same_model = EXPERIMENTS[experiment][0] == EXPERIMENTS[experiment][1]  # else: sizes checked by parameter count
    if "generator" in ref["model"]:  # MaskGIT / RAR
        gen = ref["model"]["generator"]
        assert generator["class_label_dropout"] == gen["class_label_dropout"]
        assert generator["num_classes"] == gen["condition_num_classes"]
        if experiment != "maskgit_titok_s128":  # the reference's U-ViT ignores dropout
            assert (generator["dropout"], generator["attn_drop"]) == (gen["dropout"], gen["attn_drop"])
        for key in ("guidance_scale", "randomize_temperature", "guidance_scale_pow", "guidance_decay"):
            if key in gen:
                assert model.sampling[key] == gen[key], key
        if same_model:
            for key in ("hidden_size", "intermediate_size", "image_seq_len"):
                assert generator[key] == gen[key], key
            assert (generator["num_layers"], generator["num_heads"]) == (
                gen["num_hidden_layers"],
                gen["num_attention_heads"],
            )
            assert generator["codebook_size"] == vq["codebook_size"]
    if experiment.startswith("maskgit"):
        assert model.sampling.num_steps == ref["model"]["generator"]["num_steps"]
        assert model.tokenizer == experiment.removeprefix("maskgit_")
        if same_model:
            assert f"tokenizer_{model.tokenizer}.bin" == exp["tokenizer_checkpoint"]
        assert dict(model.loss) == ref["losses"]
        pre = ref["dataset"]["preprocessing"]
        assert (data.image_size, data.resize_shorter_edge) == (pre["crop_size"], pre["resize_shorter_edge"])
        assert (data.random_crop, data.random_flip) == (pre["random_crop"], pre["random_flip"])
        assert OmegaConf.is_missing(data, "train_shards") and OmegaConf.is_missing(data, "val_shards")
    if experiment.startswith("rar"):
        gen = ref["model"]["generator"]
        assert vq["pretrained_tokenizer_weight"] == "maskgit-vqgan-imagenet-f16-256.bin"
        assert model.tokenizer == "maskgit_vqgan_f16_256"
        width, depth, heads, mlp, _ = RAR_SIZES[experiment]
        sizes = ("hidden_size", "num_layers", "num_heads", "intermediate_size")
        assert tuple(generator[key] for key in sizes) == (width, depth, heads, mlp)
        anneal = (generator["randomness_anneal_start"], generator["randomness_anneal_end"])
        assert anneal == (gen["randomness_anneal_start"], gen["randomness_anneal_end"])
        assert OmegaConf.is_missing(data, "train_jsonl")
    if experiment.startswith("maskgen"):
        mg = ref["model"]["maskgen"]
        assert (generator["embed_dim"], generator["depth"], generator["num_heads"]) == (
            mg["decoder_embed_dim"],
            mg["decoder_depth"],
            mg["decoder_num_heads"],
        )
        for key in ("micro_condition", "micro_condition_embed_dim", "text_drop_prob", "sample_aesthetic_score"):
            assert generator[key] == mg[key], key
        assert generator["num_tokens"] == vq["num_latent_tokens"]
        assert model.sampling.guidance_scale == mg["cfg"] and model.sampling.num_steps == mg["num_iter"]
        assert data.label_key == "txt" and data.with_aesthetic_score == mg["micro_condition"]
        preprocessing = ref["dataset"]["preprocessing"]  # the reference reader's re-caption defaults
        recaption = preprocessing.get("use_recap_prob", 0.95) if preprocessing.get("preproc_recap", True) else 0.0
        assert data.recaption_prob == recaption
        assert OmegaConf.is_missing(data, "train_shards")
        assert OmegaConf.is_missing(model, "init_from") == ("init_weight" in exp)
        assert model.text_encoder.model_name == "ViT-L-14-336" and model.text_encoder.pretrained == "openai"
        if vq["quantize_mode"] == "vq":
            assert generator["codebook_size"] == vq["codebook_size"]
            assert model.sampling.randomize_temperature == mg["temperature"]
            assert dict(model.loss) == ref["losses"]
            assert model.tokenizer == "tatitok_bl128_vq"
        else:
            assert (generator["token_size"], generator["scale_factor"]) == (vq["token_size"], vq["scale_factor"])
            losses = ref["losses"]
            assert (generator["diffloss_depth"], generator["diffloss_width"]) == (
                losses["diffloss_d"],
                losses["diffloss_w"],
            )
            assert model.sampling.temperature == mg["temperature"]
            assert model.sampling.guidance_schedule == mg["cfg_schedule"]
            assert model.tokenizer == "tatitok_bl32_vae"
        tokenizer = model_kwargs(model.tokenizer)
        assert tokenizer["num_latent_tokens"] == vq["num_latent_tokens"]
        assert tokenizer["token_size"] == vq["token_size"]


def test_unset_paths_give_one_clear_error():
    for experiment, missing in [
        ("maskgit_titok_b64", r"data\.train_shards, data\.val_shards"),
        ("rar_l", r"data\.train_jsonl"),
        ("maskgen_vq_xl_stage1", r"data\.train_shards"),
        ("maskgen_kl_l_stage2", r"data\.train_shards, model\.init_from"),
    ]:
        with pytest.raises(MissingSettingError, match=missing):
            check_mandatory(compose_experiment(experiment))


# ------------------------------------------------------------------------------------------------ tiny setups
TINY_TITOK = {
    "image_size": 32,
    "encoder_patch_size": 8,
    "decoder_patch_size": 8,
    "num_latent_tokens": 8,
    "token_size": 4,
    "encoder_width": 32,
    "encoder_depth": 1,
    "encoder_heads": 2,
    "decoder_width": 32,
    "decoder_depth": 1,
    "decoder_heads": 2,
}
TINY_TOKENIZERS = {
    "vq": {"name": "titok_bl64_vq8k", "pretrained": None, **TINY_TITOK, "codebook_size": 16},
    "tatitok_vq": {"name": "tatitok_bl32_vq", "pretrained": None, **TINY_TITOK, "codebook_size": 16},
    "tatitok_vae": {"name": "tatitok_bl32_vae", "pretrained": None, **TINY_TITOK},
}
for _spec in ("tatitok_vq", "tatitok_vae"):
    TINY_TOKENIZERS[_spec]["text_embed_dim"] = 32
TINY_TEXT = {"text_cfg": {"width": 32, "heads": 2, "layers": 2, "embed_dim": 32}}
TINY_GENERATORS = {
    "MaskGITModule": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64},
    "RARModule": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64},
    "MaskGenVQModule": {"embed_dim": 32, "depth": 2, "num_heads": 2, "text_embed_dim": 32},
    "MaskGenKLModule": {
        "embed_dim": 32,
        "depth": 2,
        "num_heads": 2,
        "text_embed_dim": 32,
        "diffloss_depth": 1,
        "diffloss_width": 32,
        "num_sampling_steps": "4",
    },
}
# the tiny tokenizers' token space, given explicitly (checked against the tokenizer by the module)
TOKEN_SPACE = {
    "MaskGITModule": {"codebook_size": 16, "image_seq_len": 8},
    "RARModule": {"codebook_size": 16, "image_seq_len": 8},
    "MaskGenVQModule": {"codebook_size": 16, "num_tokens": 8},
    "MaskGenKLModule": {"token_size": 4, "num_tokens": 8},
}


def tiny_generator_spec(module: str, name: str) -> dict:
    return {"name": name, **TINY_GENERATORS[module], **TOKEN_SPACE[module]}


def random_images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> dict[str, str]:
    """Tiny shards of every kind the generator experiments read."""
    root = tmp_path_factory.mktemp("generator_data")
    rng = np.random.default_rng(0)
    images = random_images(16)
    image_samples = (
        {"__key__": f"{i:04d}", "png": encode_png(image), "cls": str(i % 10)} for i, image in enumerate(images)
    )
    write_shards(image_samples, str(root / "images" / "shard-%06d.tar"), progress=False)
    with open(root / "tokens.jsonl", "w") as file:  # the reference's pre-tokenized format
        for i in range(16):
            file.write(json.dumps({"class_id": i % 10, "tokens": rng.integers(0, 16, 8).tolist()}) + "\n")
    labelled = ({"class_id": i % 10, "tokens": rng.integers(0, 16, 8)} for i in range(16))
    write_token_shards(labelled, str(root / "tokens" / "shard-%06d.tar"), progress=False)
    captions = [{"text": f"a digit {i}", "aesthetic_score": 5.0 + i % 3} for i in range(16)]
    vq = ({**c, "tokens": rng.integers(0, 16, 8)} for c in captions)
    write_token_shards(vq, str(root / "t2i_vq" / "shard-%06d.tar"), progress=False)
    kl = ({**c, "tokens": rng.normal(size=(8, 8)).astype(np.float16)} for c in captions)  # [2 x token_size, N]
    write_token_shards(kl, str(root / "t2i_kl" / "shard-%06d.tar"), progress=False)
    folders = {name: str(root / name) for name in ("images", "tokens", "t2i_vq", "t2i_kl")}
    return folders | {"jsonl": str(root / "tokens.jsonl")}


def tiny_overrides(experiment: str, data: dict[str, str], tmp_path: Path) -> dict:
    """Config edits that shrink a generator experiment to seconds on a CPU (random frozen networks, tiny data)."""
    cfg = compose_experiment(experiment)
    module = cfg.model._target_.rsplit(".", 1)[-1]
    edits: dict = {
        "trainer.accelerator": "cpu",
        "trainer.devices": 1,
        "trainer.precision": "32-true",
        "data.batch_size": 4,
        "data.num_workers": 0,
        "data.samples_per_epoch": 16,
        "model.generator": tiny_generator_spec(module, cfg.model.generator.name),
        "model.sampling.num_steps": 2 if "num_steps" in cfg.model.sampling else None,
    }
    if module in ("MaskGITModule", "RARModule"):
        edits["model.tokenizer"] = TINY_TOKENIZERS["vq"]
    if module == "MaskGITModule":
        edits |= {"data.train_shards": data["images"], "data.val_shards": data["images"], "data.image_size": 32}
        edits["data.resize_shorter_edge"] = 32
    if module == "RARModule":
        edits |= {"data.train_jsonl": data["jsonl"], "data.val_shards": data["tokens"]}
    if module.startswith("MaskGen"):
        kind = "vq" if module == "MaskGenVQModule" else "kl"
        edits["model.tokenizer"] = TINY_TOKENIZERS[f"tatitok_{'vq' if kind == 'vq' else 'vae'}"]
        edits["model.text_encoder"] = TINY_TEXT
        edits |= {"data.train_shards": data[f"t2i_{kind}"], "data.val_shards": data[f"t2i_{kind}"]}
    if OmegaConf.is_missing(cfg.model, "init_from"):
        path = tmp_path / "stage1.ckpt"
        stage1 = build_model(edits["model.generator"])
        torch.save({"state_dict": {f"model.{k}": v for k, v in stage1.state_dict().items()}}, path)
        edits["model.init_from"] = str(path)
    return edits


def apply(cfg, edits: dict):
    with open_dict(cfg):
        for key, value in edits.items():
            if value is not None:
                OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def run_experiment(experiment: str, edits: dict, out: Path, extra: tuple[str, ...] = ()):
    cfg = apply(compose_train([f"experiment={experiment}", *extra], out), edits)
    return cfg, train(cfg)


# ------------------------------------------------------------------------------------------------ fast_dev_run
@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS))
def test_fast_dev_run(experiment, tiny_data, tmp_path):
    edits = tiny_overrides(experiment, tiny_data, tmp_path)
    _, metrics = run_experiment(experiment, edits, tmp_path, ("trainer.fast_dev_run=true",))
    assert "train/loss" in metrics and "val/loss" in metrics
    assert all(np.isfinite(v) for v in metrics.values())
    grids = list(tmp_path.rglob("generated_step_*.png"))
    assert grids, "no sample grid at the end of training"


def test_stage2_starts_from_the_stage1_weights(tiny_data, tmp_path):
    import hydra

    edits = tiny_overrides("maskgen_vq_l_stage2", tiny_data, tmp_path)
    cfg = apply(compose_train(["experiment=maskgen_vq_l_stage2"], tmp_path), edits)
    module = hydra.utils.instantiate(cfg.model)
    stage1 = torch.load(edits["model.init_from"], weights_only=True)["state_dict"]
    for key, value in module.model.state_dict().items():
        torch.testing.assert_close(value, stage1[f"model.{key}"], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ module semantics
def make_module(cls, name: str, **kwargs):
    module = cls.__name__
    tokenizer = TINY_TOKENIZERS["vq"] if module in ("MaskGITModule", "RARModule") else None
    if module.startswith("MaskGen"):
        tokenizer = TINY_TOKENIZERS["tatitok_vq" if module == "MaskGenVQModule" else "tatitok_vae"]
        kwargs.setdefault("text_encoder", TINY_TEXT)
    if module in ("MaskGITModule", "MaskGenVQModule"):
        kwargs.setdefault("loss", {"label_smoothing": 0.1, "loss_weight_unmasked_token": 0.1})
    generator = {**tiny_generator_spec(module, name), **kwargs.pop("generator", {})}
    return cls(
        generator=generator,
        tokenizer=kwargs.pop("tokenizer", tokenizer),
        optimizer={"lr": 1e-3},
        scheduler={"name": "constant", "warmup_steps": 0},
        **kwargs,
    )


def class_batches(count: int = 4, batch_size: int = 4, images: bool = False):
    rng = np.random.default_rng(1)
    samples = []
    for i in range(count * batch_size):
        sample = {"class_id": i % 10}
        if images:
            sample["image"] = torch.from_numpy(random_images(1, i)[0]).permute(2, 0, 1).float() / 255
        else:
            sample["tokens"] = torch.from_numpy(rng.integers(0, 16, 8))
        samples.append(sample)
    return DataLoader(samples, batch_size=batch_size, collate_fn=collate_samples)


def fit(module, loader, steps: int, callbacks=(), **trainer_kwargs):
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        **trainer_kwargs,
    )
    trainer.fit(module, loader)
    return trainer


def test_token_space_comes_from_the_tokenizer_and_must_agree():
    module = make_module(MaskGITModule, "maskgit_titok_b64", generator={"codebook_size": None, "image_seq_len": None})
    assert (module.model.codebook_size, module.model.image_seq_len) == (16, 8)
    assert module.hparams.generator["codebook_size"] == 16  # what sample.py rebuilds
    with pytest.raises(ValueError, match="codebook_size=32 but the tokenizer has codebook_size=16"):
        make_module(MaskGITModule, "maskgit_titok_b64", generator={"codebook_size": 32})


def test_image_batches_are_tokenized_like_pretokenized_ones():
    module = make_module(MaskGITModule, "maskgit_titok_b64").eval()
    batch = next(iter(class_batches(images=True)))
    tokens = module.tokenizer.encode(batch["image"])
    assert tokens.shape == (4, 8) and tokens.dtype == torch.long
    from_images = module.loss_terms(batch, torch.Generator().manual_seed(0))[0]
    from_tokens = module.loss_terms({"tokens": tokens, "class_id": batch["class_id"]}, torch.Generator().manual_seed(0))
    torch.testing.assert_close(from_images, from_tokens[0], rtol=0, atol=0)


def test_frozen_tokenizer_is_not_trained_averaged_or_saved(tmp_path):
    from callbacks import EMACallback

    module = make_module(MaskGITModule, "maskgit_titok_b64")
    before = {k: v.clone() for k, v in module.tokenizer.state_dict().items()}
    ema = EMACallback(decay=0.9)
    trainer = fit(module, class_batches(images=True), steps=3, callbacks=[ema])
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.model.parameters()}
    assert len(ema._ema) == len(list(module.model.parameters()))
    for key, value in module.tokenizer.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    assert not module.tokenizer.training and module.model.training
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert not any(k.startswith("tokenizer.") for k in checkpoint["state_dict"])
    assert not any(k.startswith("tokenizer.") for k in checkpoint["callbacks"]["EMACallback"]["raw_model_state"])


@pytest.mark.parametrize("cls, name", [(MaskGITModule, "maskgit_titok_b64"), (RARModule, "rar_b")])
def test_generator_training_logs_no_python_numbers(cls, name, logged_values):
    """A logged Python number becomes a blocking host-to-device copy on CUDA (see test_train): every
    training-time value, the EMA's included, is a tensor."""
    from callbacks import EMACallback

    fit(make_module(cls, name), class_batches(), steps=3, callbacks=[EMACallback(decay=0.9)])
    training = [(key, value) for key, value in logged_values if key.startswith("train/")]
    assert {"train/samples_per_sec", "train/ema_decay", "train/grad_norm/model"} <= {key for key, _ in training}
    assert all(isinstance(value, torch.Tensor) for _, value in training), training


@pytest.mark.skipif(not hasattr(torch.compiler, "set_stance"), reason="eager sample grids need torch >= 2.6")
@pytest.mark.parametrize("cls, name", [(MaskGITModule, "maskgit_titok_b64"), (RARModule, "rar_b")])
def test_sample_grids_do_not_recompile_the_compiled_blocks(cls, name, tmp_path):
    """The GPU recipes compile the blocks for the training step; a sample grid's calls (other shapes, no grad, a
    KV cache) run them eagerly instead of compiling each block again (for RAR 11 more graphs at this size)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    graphs = []
    for every in (0, 1):  # without grids, then with a grid after every step
        torch._dynamo.reset()
        counters.clear()
        module = make_module(
            cls, name, compile_modules=["blocks"], compile_backend="aot_eager", sample_grid={"every_n_steps": every}
        )
        fit(module, class_batches(), steps=2, default_root_dir=tmp_path / str(every))
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] >= 1 and graphs[1] == graphs[0]
    assert len(list((tmp_path / "1").rglob("generated_step_*.png"))) >= 2  # the grids were made


class RatioProbe(L.Callback):
    def __init__(self):
        self.ratios: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.ratios.append(float(pl_module.model.random_ratio))


def test_rar_randomness_anneals_with_the_global_step():
    module = make_module(RARModule, "rar_b", generator={"randomness_anneal_start": 2, "randomness_anneal_end": 4})
    probe = RatioProbe()
    fit(module, class_batches(count=6), steps=6, callbacks=[probe])
    assert probe.ratios == [1.0, 1.0, 1.0, 0.5, 0.0, 0.0]  # steps 0..5: 1 until 2, linear to 0 at 4


def test_maskgen_drops_captions_to_the_empty_caption():
    from titok_lightning.lit.generator import encode_captions

    batch = {"text": ["a cat", "a dog"], "aesthetic_score": torch.tensor([5.0, 6.0])}
    module = make_module(MaskGenVQModule, "maskgen_vq_l")
    features = encode_captions(module.text_encoder, batch["text"])  # the captions' rows, then the empty caption's
    for drop, expected in ((0.0, slice(0, 2)), (1.0, slice(2, 3))):
        module.model.text_drop_prob = drop
        tokens, pooled, aesthetic = module.text_conditions(batch)
        torch.testing.assert_close(tokens, features.condition[expected].expand_as(tokens))
        torch.testing.assert_close(pooled, features.condition_pooled[expected].expand_as(pooled))
        torch.testing.assert_close(aesthetic, batch["aesthetic_score"])
    with pytest.raises(KeyError, match="aesthetic_score"):
        module.text_conditions({"text": ["a cat"]})


def test_maskgen_kl_reads_stored_posterior_moments():
    module = make_module(MaskGenKLModule, "maskgen_kl_l")
    mean = torch.randn(2, 4, 8)
    stored = torch.cat([mean, torch.full_like(mean, -30.0)], dim=1)  # [B, 2C, N], log-variance -30: std ~ 0
    params = module.posterior_parameters({"tokens": stored})
    assert params.shape == (2, 8, 1, 8)
    latents = module.model.latents_from_posterior(params)
    torch.testing.assert_close(latents, mean.transpose(1, 2) * module.model.scale_factor, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="posterior parameters"):
        module.posterior_parameters({"tokens": torch.randn(2, 6, 8)})


# ----------------------------------------------------------------------------------------- the whole pipeline
def tokenizer_checkpoint(path: Path, seed: int = 0) -> Path:
    """A tokenizer checkpoint in the layout of this project's tokenizer training (EMA weights in state_dict)."""
    spec = {k: v for k, v in TINY_TOKENIZERS["vq"].items() if k != "pretrained"}
    with torch.random.fork_rng(devices=[]):  # the same weights whatever ran before (some draws decode to flat images)
        torch.manual_seed(seed)
        model = build_model(spec)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"hyper_parameters": {"tokenizer": spec}, "state_dict": state}, path)
    return path


def compose_sample(overrides: list[str], out: Path):
    return compose_job("sample", overrides, out)


def tiny_extractor(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random 'Inception': uint8 [B, 3, H, W] -> (features [B, 16], logits [B, 10])."""
    weight = torch.Generator().manual_seed(0)
    projection = torch.randn(3 * 8 * 8, 26, generator=weight)
    pooled = torch.nn.functional.adaptive_avg_pool2d(images.float() / 255.0, 8).flatten(1)
    out = pooled @ projection
    return out[:, :16], out[:, 16:]


def test_pretokenize_train_sample_resume(tmp_path):
    import sample
    from titok_lightning import pretokenize

    images = random_images(20, seed=3)
    samples = ({"__key__": f"img{i:03d}", "png": encode_png(a), "cls": str(i % 10)} for i, a in enumerate(images))
    shards = write_shards(samples, str(tmp_path / "images" / "train-%06d.tar"), progress=False)
    ckpt = tokenizer_checkpoint(tmp_path / "tokenizer.ckpt")

    # pretokenize: each image and its flip, tokens equal to the tokenizer's own encoding
    base = ["--tokenizer", str(ckpt), "--data", *shards, "--num-workers", "0", "--accelerator", "cpu"]
    pretokenize.main([*base, "--out", str(tmp_path / "tokens"), "--batch-size", "8"])
    info = json.loads((tmp_path / "tokens" / "train.json").read_text())
    assert (info["num_samples"], info["kind"], info["num_tokens"], info["codebook_size"]) == (40, "vq", 8, 16)
    from datamodules import TokenDataModule

    datamodule = TokenDataModule(val_shards=str(tmp_path / "tokens"), batch_size=40, num_workers=0)
    datamodule.setup("validate")
    batch = next(iter(datamodule.val_dataloader()))
    tokenizer = load_frozen_tokenizer(str(ckpt))
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    expected = tokenizer.encode(torch.cat([pixels, pixels.flip(-1)]))
    keys = [f"img{i:03d}" for i in range(20)] + [f"img{i:03d}_flip" for i in range(20)]
    by_key = dict(zip(batch["key"], batch["tokens"]))
    torch.testing.assert_close(torch.stack([by_key[k] for k in keys]), expected, rtol=0, atol=0)
    assert sorted(batch["class_id"].tolist()) == sorted([i % 10 for i in range(20)] * 2)

    pretokenize.main([*base, "--out", str(tmp_path / "ten"), "--ten-crop"])
    assert json.loads((tmp_path / "ten" / "train.json").read_text())["num_samples"] == 200

    # train the demo generator on them
    def train_generator(tokenizer: Path) -> None:
        settings = [
            "experiment=demo_generator",
            f"model.tokenizer={tokenizer}",
            f"data.train_shards={tmp_path / 'tokens'}",
            "data.batch_size=8",
            "trainer.max_steps=4",
            "trainer.val_check_interval=2",
            "model.sample_grid.every_n_steps=2",
            "callbacks.model_checkpoint.every_n_train_steps=2",
        ]
        train_cfg = compose_train(settings, tmp_path / "run")
        apply(train_cfg, {"model.generator.hidden_size": 32, "model.generator.intermediate_size": 64})
        train(train_cfg)

    train_generator(ckpt)
    run = tmp_path / "run"
    # its folder again with another tokenizer file: refused, the generator's token ids mean its own tokenizer's codes
    other = tmp_path / "other-tokenizer.ckpt"
    shutil.copy(ckpt, other)
    with pytest.raises(ValueError, match="with another tokenizer"):
        train_generator(other)
    assert sorted(p.name for p in run.rglob("generated_*.png")) == [
        "generated_step_0000002.png",
        "generated_step_0000004.png",
    ]

    # sample 2 per class (20 images) in chunks of 8, with metrics from the injected extractor
    reference = tmp_path / "reference.npz"
    np.savez(reference, arr_0=random_images(30, seed=9))
    overrides = [
        f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
        "num_per_class=2",
        "batch_size=8",
        f"metrics.reference={reference}",
        "metrics.is_splits=2",
        "trainer.accelerator=cpu",
    ]
    cfg = compose_sample(overrides, tmp_path / "sample_run")
    record = sample.run(cfg, feature_extractor=tiny_extractor)
    out = run / "samples" / "last-seed42"
    with np.load(out / "samples.npz") as data:
        assert data.files == ["arr_0"]
        first = data["arr_0"]
    assert first.dtype == np.uint8 and first.shape == (20, 32, 32, 3)
    assert {"fid", "inception_score", "precision", "recall"} <= set(record)
    assert json.loads((out / "metrics.json").read_text())["fid"] == record["fid"]

    # resume: drop part of chunk 1 (images 8..15); only that chunk is redrawn, identically (one seed per chunk)
    pngs = out / "images"
    times = {p.name: p.stat().st_mtime_ns for p in pngs.glob("*.png")}
    for index in (9, 12):
        (pngs / f"{index:06d}.png").unlink()
    sample.run(compose_sample(overrides, tmp_path / "sample_run2"), feature_extractor=tiny_extractor)
    with np.load(out / "samples.npz") as data:
        np.testing.assert_array_equal(data["arr_0"], first)
    changed = {p.name for p in pngs.glob("*.png") if p.stat().st_mtime_ns != times.get(p.name)}
    assert changed == {f"{i:06d}.png" for i in range(8, 16)}

    with pytest.raises(ValueError, match="other settings"):
        sample.run(compose_sample([*overrides, "seed=7", f"output_dir={out}"], tmp_path / "sample_run3"))

    # the tokenizer run goes on into the same file: the generator checkpoint's tokenizer is no longer the one it
    # learned the codes of. Sampling, loading and resuming refuse it; naming the file as tokenizer= decodes with it
    tokenizer_checkpoint(ckpt, seed=1)
    with pytest.raises(ValueError, match=r"the tokenizer .*tokenizer\.ckpt has other weights than the generator"):
        sample.run(compose_sample(overrides, tmp_path / "sample_run4"), feature_extractor=tiny_extractor)
    with pytest.raises(TokenizerChangedError, match="is not the one this generator checkpoint was trained with"):
        MaskGITModule.load_from_checkpoint(run / "checkpoints" / "last.ckpt", map_location="cpu")
    with pytest.raises(TokenizerChangedError):
        train_generator(ckpt)
    anyway = [*overrides, f"tokenizer={ckpt}"]
    with pytest.raises(ValueError, match=r"tokenizer_weights differ \(the tokenizer's weights changed\)"):
        sample.run(compose_sample(anyway, tmp_path / "sample_run5"), feature_extractor=tiny_extractor)
    sample.run(compose_sample([*anyway, "overwrite=true"], tmp_path / "sample_run6"), feature_extractor=tiny_extractor)
    with np.load(out / "samples.npz") as data:
        assert data["arr_0"].shape == first.shape and not np.array_equal(data["arr_0"], first)


# ------------------------------------------------------------------------------------------------------ metrics
def test_fid_is_zero_on_identical_sets_and_large_on_disjoint_ones():
    from sample import evaluate_images

    images = random_images(64, seed=1)
    same = evaluate_images(images, tiny_extractor, reference_images=images.copy(), is_splits=4)
    assert abs(same["fid"]) < 1e-6
    assert same["precision"] == same["recall"] == 1.0
    dark = (random_images(64, seed=2) // 4).astype(np.uint8)  # another distribution: dark images
    other = evaluate_images(images, tiny_extractor, reference_images=dark, is_splits=4)
    assert other["fid"] > 1.0 and other["fid"] > 1e6 * abs(same["fid"])
    assert other["precision"] < 0.1
    # reference statistics (ADM's mu / sigma) give the FID of the images they summarise
    features, _ = tiny_extractor(torch.from_numpy(dark).permute(0, 3, 1, 2))
    features = features.double()
    mu, sigma = features.mean(0), torch.cov(features.T)
    from_stats = evaluate_images(images, tiny_extractor, reference_statistics=(mu, sigma), is_splits=4)
    assert from_stats["fid"] == pytest.approx(other["fid"], rel=1e-6)


def test_generated_images_features_are_exact_float32_as_in_training(tmp_path):
    """sample.py's FID features are taken without TF32 or autocast, as ImageMetricAccumulator takes them in training
    and reconstruction: with sample.py's float32_matmul_precision=high they were TF32 matmuls on a GPU."""
    from sample import evaluate_images, load_reference

    seen = []

    def recording_extractor(images):
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.is_autocast_enabled("cpu")))
        return tiny_extractor(images)

    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            evaluate_images(random_images(8, seed=1), recording_extractor, reference_images=random_images(8, seed=2))
        assert torch.backends.cuda.matmul.allow_tf32  # restored
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    assert seen == [(False, False), (False, False)]

    # an ADM reference batch's statistics come through metrics' reader (float64; a file without them is named)
    np.savez(tmp_path / "ref.npz", mu=np.zeros(4, np.float32), sigma=np.eye(4, dtype=np.float32))
    (mu, sigma), images = load_reference(tmp_path / "ref.npz")
    assert mu.dtype == sigma.dtype == np.float64 and images is None


def test_reconstruction_mode_reports_rfid_and_codebook_usage(tiny_data, tmp_path):
    import sample

    ckpt = tokenizer_checkpoint(tmp_path / "tokenizer.ckpt")
    overrides = [f"tokenizer={ckpt}", "mode=reconstruct", f"data.val_shards={tiny_data['images']}"]
    overrides += ["data.num_workers=0", "batch_size=8", "metrics.is_splits=2", "trainer.accelerator=cpu"]
    results = sample.run(compose_sample(overrides, tmp_path), feature_extractor=tiny_extractor)
    assert {"rfid", "inception_score", "codebook_usage", "codebook_entropy"} <= set(results)
    assert 0 < results["codebook_usage"] <= 1 and results["rfid"] > 0


def test_demo_check_tells_digits_from_noise():
    from titok_lightning.demo import class_accuracy, fit_digit_classifier

    classifier, arrays = fit_digit_classifier()
    real, _ = class_accuracy(classifier, arrays.val_images, arrays.val_labels)
    noise, _ = class_accuracy(classifier, random_images(500, seed=5), np.arange(500) % 10)
    assert real > 0.9 and noise < 0.3  # the 70% bar sits between the two


@pytest.mark.parametrize("trainer", ["ddp_sim", pytest.param("fsdp", marks=needs_fsdp2)])
def test_generator_trains_on_two_cpu_processes_with_sample_grids(trainer, tiny_data, tmp_path):
    # sample grids need every rank (trainer.log_dir is a broadcast; FSDP blocks gather their shards in forward)
    ckpt = tokenizer_checkpoint(tmp_path / "tokenizer.ckpt")
    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        "train.py",
        "experiment=demo_generator",
        f"model.tokenizer={ckpt}",
        f"data.train_shards={tiny_data['tokens']}",
        f"data.val_shards={tiny_data['tokens']}",
        "data.batch_size=4",
        "++model.generator.hidden_size=32",
        "++model.generator.intermediate_size=64",
        f"trainer={trainer}",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "model.sample_grid.every_n_steps=2",
        f"hydra.run.dir={run_dir}",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    grids = sorted(path.name for path in run_dir.rglob("generated_*.png"))
    assert grids == ["generated_step_0000002.png", "generated_step_0000004.png"]
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 4
