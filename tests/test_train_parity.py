"""Training-trajectory parity with the reference's own training loop (issue 11).

Every fixture in ``$TITOK_TRAIN_PARITY_DIR`` (default ``../shared/train_parity``) is a few optimizer steps of
bytedance/1d-tokenizer's ``utils/train_utils.py`` on a tiny model: initial weights, the batch of every step, every
logged loss, the learning rate(s), the gradient norm before clipping, the EMA decay and the final weights (see the
directory's README). Each fixture is replayed here the way ``train.py`` trains: the experiment's Hydra config with
overrides derived from the fixture's ``reference_config`` / ``size_presets`` / ``patched_constants``, the
LightningModule from ``cfg.model``, the ``init/*`` weights through ``titok_lightning.convert``, ``Trainer.fit``
(fp32, deterministic, one thread) with the project's EMA callback, learning-rate monitor and a logger that keeps
every logged value.

Logged names: the reference's loss entry ``<name>`` is ``train/<name>`` here (the discriminator's entries too, in
the same record), ``grad_norm`` is ``train/grad_norm/model`` (``.../discriminator``), ``lr`` is
``lr/model/pg<i>`` (``lr/discriminator/pg<i>``, every parameter group), ``ema_decay`` is ``train/ema_decay`` and
RAR's ``random_ratio`` is ``train/random_ratio``.

The stage-1 and RAR trajectories also run under ``trainer=ddp_sim`` (2 CPU processes, each taking one half of every
batch): gradients are averaged over the ranks, so gradient norms, learning rates and final weights must match the
single-process fixture. Stage 2 under DDP: see :func:`test_stage2_lecam_running_means_follow_rank0_under_ddp`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import hydra
import pytest
import torch
from lightning.pytorch import Callback, LightningDataModule
from lightning.pytorch.loggers import Logger
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch.utils.data import DataLoader, IterableDataset

from tests.test_configs import ROOT, compose_train
from titok_lightning.convert import convert_reference_state_dict, load_reference_state_dict
from titok_lightning.models.maskgit_vqgan import MaskGITVQGAN
from titok_lightning.models.rar import RAR
from titok_lightning.models.titok import TiTok
from titok_lightning.overrides import override_value, set_overrides

FIXTURE_DIR = Path(os.environ.get("TITOK_TRAIN_PARITY_DIR", ROOT.parent / "shared" / "train_parity"))
FIXTURES = sorted(p.stem for p in FIXTURE_DIR.glob("*.json"))


# ------------------------------------------------------------------------------------------------------------------
# reference config -> this project's Hydra overrides (one function per case)
# ------------------------------------------------------------------------------------------------------------------
def _training_overrides(fixture: dict) -> list[str]:
    """Optimizer, schedule, clipping, accumulation, length and EMA: shared by every reference training loop."""
    ref = fixture["reference_config"]
    opt, sched, training = ref["optimizer"]["params"], ref["lr_scheduler"], ref["training"]
    if sched["params"]["learning_rate"] != opt["learning_rate"]:
        raise ValueError("the reference schedule's learning_rate differs from the optimizer's")
    overrides = [
        f"model.optimizer.lr={override_value(opt['learning_rate'])}",
        f"model.optimizer.betas={override_value([opt['beta1'], opt['beta2']])}",
        f"model.optimizer.weight_decay={override_value(opt['weight_decay'])}",
        f"model.optimizer.eps={override_value(opt.get('epsilon', 1e-8))}",
        f"model.scheduler.name={sched['scheduler']}",
        f"model.scheduler.warmup_steps={sched['params']['warmup_steps']}",
        f"model.scheduler.end_lr={override_value(sched['params']['end_lr'])}",
        f"model.max_grad_norm={override_value(training['max_grad_norm'])}",
        f"model.accumulate_grad_batches={training['gradient_accumulation_steps']}",
        # the schedule's length; the fixture's shorter run ends with its data (one epoch)
        f"trainer.max_steps={training['max_train_steps']}",
    ]
    return overrides + _ema_overrides(training["use_ema"], fixture.get("ema"))


def _ema_overrides(use_ema: bool, ema: dict | None) -> list[str]:
    """The reference's EMAModel settings (its decay is hard-coded in train_utils.py) -> the EMA callback."""
    if not use_ema:
        return ["callbacks.ema=null"]
    if ema.get("use_ema_warmup") or ema.get("min_decay", 0.0) != 0.0:
        raise ValueError(f"EMA settings without an equivalent here: {ema}")
    settings = {
        "_target_": "callbacks.EMACallback",
        "decay": ema["decay"],
        "start_step": ema["update_after_step"],
        "update_every_n_steps": ema["update_every"],
    }
    return [f"++callbacks.ema={override_value(settings)}"]


def titok_stage1_overrides(fixture: dict) -> list[str]:
    ref, sizes, patched = fixture["reference_config"], fixture["size_presets"], fixture["patched_constants"]
    tokenizer = TiTok.kwargs_from_reference_config({**ref, "size_presets": sizes, "patched_constants": patched})
    teacher = MaskGITVQGAN.kwargs_from_reference_config({"patched_constants": patched})
    return [
        "experiment=titok_b64",
        *set_overrides("model.tokenizer", tokenizer),
        "model.teacher.pretrained=null",  # init/teacher is loaded below
        *set_overrides("model.teacher", teacher),
        *set_overrides("model.loss", ref["losses"]),
        *_training_overrides(fixture),
    ]


def titok_stage2_overrides(fixture: dict) -> list[str]:
    ref, sizes, patched = fixture["reference_config"], fixture["size_presets"], fixture["patched_constants"]
    tokenizer = TiTok.kwargs_from_reference_config({**ref, "size_presets": sizes, "patched_constants": patched})
    pixel = MaskGITVQGAN.kwargs_from_reference_config({"patched_constants": patched})
    losses = dict(ref["losses"])
    if losses["perceptual_weight"] != 0:
        raise ValueError("the fixture needs the ImageNet ConvNeXt-S weights (perceptual_weight > 0)")
    losses["perceptual_loss"] = None  # weight 0: the reference adds exactly 0
    return [
        "experiment=titok_b64_stage2",
        *set_overrides("model.tokenizer", tokenizer),
        "model.init_from=null",  # init/model (stage-1 TiTok + pixel decoder) is loaded below
        "model.teacher.pretrained=null",
        *set_overrides("model.teacher", pixel),
        *set_overrides("model.loss", losses),
        *set_overrides("model.discriminator", patched.get("discriminator_kwargs", {})),
        f"model.optimizer.discriminator_lr={override_value(ref['optimizer']['params']['discriminator_learning_rate'])}",
        *_training_overrides(fixture),
    ]


def rar_overrides(fixture: dict) -> list[str]:
    ref = fixture["reference_config"]
    generator = RAR.kwargs_from_reference_config(ref)
    generator.pop("sampling")  # sample grids are off
    return [
        "experiment=rar_b",
        *set_overrides("model.generator", generator),
        "model.tokenizer=null",  # pre-tokenized batches; the token space comes from the generator spec
        "model.sample_grid.every_n_steps=null",
        *_training_overrides(fixture),
    ]


CASES = {
    "train_titok_stage1": titok_stage1_overrides,
    "train_titok_stage2": titok_stage2_overrides,
    "train_rar": rar_overrides,
}


# ------------------------------------------------------------------------------------------------------------------
# fixture data, logging and state capture
# ------------------------------------------------------------------------------------------------------------------
def load_fixture(name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    return json.loads((FIXTURE_DIR / f"{name}.json").read_text()), load_file(FIXTURE_DIR / f"{name}.safetensors")


def section(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    prefix = prefix.rstrip("/") + "/"
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


class _RankSlices(IterableDataset):
    def __init__(self, batches: list[dict[str, torch.Tensor]], rank: int, world_size: int):
        self.batches, self.rank, self.world_size = batches, rank, world_size

    def __iter__(self):
        for batch in self.batches:
            size = len(next(iter(batch.values())))
            if size % self.world_size:
                raise ValueError(f"batch of {size} does not split over {self.world_size} ranks")
            part = size // self.world_size
            yield {k: v[self.rank * part : (self.rank + 1) * part] for k, v in batch.items()}


class FixtureBatches(LightningDataModule):
    """The fixture's batches, in the datamodules' format (``image`` / ``tokens`` + ``class_id``); under DDP every
    rank takes its contiguous part of every batch (the reference's per-GPU batches)."""

    def __init__(self, tensors: dict[str, torch.Tensor], steps: int):
        super().__init__()
        self.batches = [self._batch(section(tensors, f"batch/{i}")) for i in range(steps)]

    @staticmethod
    def _batch(fields: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "images" in fields:
            return {"image": fields["images"]}
        return {"tokens": fields["tokens"], "class_id": fields["class_ids"]}

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        return DataLoader(_RankSlices(self.batches, trainer.global_rank, trainer.world_size), batch_size=None)


class StepLogger(Logger):
    """Keeps every logged value; one record per training step (the learning rates logged at the start of a batch
    join the record of that batch, which ends with the model's gradient norm)."""

    def __init__(self):
        super().__init__()
        self.records: list[dict[str, float]] = []
        self._pending: dict[str, float] = {}

    @property
    def name(self) -> str:
        return "steps"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._pending.update({k: float(v) for k, v in metrics.items()})
        if "train/grad_norm/model" in metrics:
            self.records.append(self._pending)
            self._pending = {}


class Capture(Callback):
    """Per rank: one thread; the codes of every step (hooked on the loss' inputs), the LeCam
    buffers after every step, and at the end the weights, EMA, discriminator and logged records, saved to
    ``<folder>/rank<r>.pt``."""

    def __init__(self, folder: str):
        self.folder = folder
        self.derived: list[dict[str, torch.Tensor]] = []
        self.lecam: list[list[float]] = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        torch.set_num_threads(1)

    def on_fit_start(self, trainer, pl_module) -> None:
        pl_module.loss.register_forward_hook(self._record_codes, with_kwargs=True)

    def _record_codes(self, module, args, kwargs, output) -> None:
        if not args[0].is_floating_point():  # stage 1: loss(proxy codes, logits, quantizer info)
            self.derived.append({"proxy_codes": args[0].clone(), "indices": args[2]["min_encoding_indices"].clone()})
        elif kwargs.get("mode") == "generator" and "min_encoding_indices" in args[2]:  # stage 2 (not RAR)
            self.derived.append({"indices": args[2]["min_encoding_indices"].clone()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = pl_module.loss
        if hasattr(loss, "ema_real_logits_mean"):
            self.lecam.append([float(loss.ema_real_logits_mean), float(loss.ema_fake_logits_mean)])

    def on_train_end(self, trainer, pl_module) -> None:
        from callbacks.ema import EMACallback

        names = {id(p): name for name, p in pl_module.named_parameters()}
        state: dict[str, Any] = {
            "model": {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()},
            "records": next(lg for lg in trainer.loggers if isinstance(lg, StepLogger)).records,
            "derived": self.derived,
            "lecam": self.lecam,
            "groups": [[[names[id(p)] for p in g["params"]] for g in opt.param_groups] for opt in trainer.optimizers],
            "group_settings": [
                [(g["weight_decay"], g["initial_lr"], tuple(g["betas"]), g["eps"]) for g in opt.param_groups]
                for opt in trainer.optimizers
            ],
        }
        ema = next((cb for cb in trainer.callbacks if isinstance(cb, EMACallback)), None)
        if ema is not None:
            with ema.swapped_in():
                state["ema"] = {k: v.detach().clone() for k, v in pl_module.model.named_parameters()}
        discriminator = getattr(pl_module.loss, "discriminator", None)
        if discriminator is not None:
            state["discriminator"] = {k: v.detach().clone() for k, v in discriminator.state_dict().items()}
            # the buffers exist only with a LeCam weight > 0 (as in the reference)
            state["lecam_buffers"] = {
                k: getattr(pl_module.loss, k).clone()
                for k in ("ema_real_logits_mean", "ema_fake_logits_mean")
                if hasattr(pl_module.loss, k)
            }
        torch.save(state, Path(self.folder) / f"rank{trainer.global_rank}.pt")


# ------------------------------------------------------------------------------------------------------------------
# running a fixture the way train.py trains
# ------------------------------------------------------------------------------------------------------------------
def load_initial_weights(module, tensors: dict[str, torch.Tensor]) -> None:
    """``init/*`` through the project's reference-format loaders. The stage-1 teacher's file holds only what
    ``encode()`` uses (encoder, quantizer): its decoder stays random."""
    load_reference_state_dict(module.model, section(tensors, "init/model"))
    teacher = section(tensors, "init/teacher")
    if teacher:
        converted = convert_reference_state_dict(module.teacher, teacher)
        missing, unexpected = module.teacher.load_state_dict(converted, strict=False)
        assert not unexpected and all(k.startswith("decoder.") for k in missing), (missing, unexpected)
    discriminator = section(tensors, "init/discriminator")
    if discriminator:
        load_reference_state_dict(module.loss.discriminator, discriminator)
    with torch.no_grad():
        for name, value in section(tensors, "init/lecam").items():
            getattr(module.loss, name).copy_(value)


def run_fixture(name: str, tmp_path: Path, *overrides: str) -> tuple[dict, dict, Any, list[dict[str, Any]]]:
    """Train ``name``'s steps; returns the fixture, its tensors, the module and the captured state of every rank."""
    fixture, tensors = load_fixture(name)
    if fixture["case"] not in CASES:
        pytest.fail(f"{name}: unknown case {fixture['case']!r} (known: {sorted(CASES)})")
    cfg = compose_train(
        [
            *CASES[fixture["case"]](fixture),
            "trainer.accelerator=cpu",
            "trainer.precision=32-true",
            "trainer.deterministic=true",
            "trainer.max_epochs=1",
            "trainer.limit_val_batches=0",
            "trainer.log_every_n_steps=1",
            "++trainer.enable_checkpointing=false",
            "++trainer.enable_progress_bar=false",
            "++trainer.enable_model_summary=false",
            *overrides,
        ],
        tmp_path,
    )
    module = hydra.utils.instantiate(cfg.model)
    load_initial_weights(module, tensors)
    callbacks = [hydra.utils.instantiate(cfg.callbacks[key]) for key in ("ema", "lr_monitor") if cfg.callbacks[key]]
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=[*callbacks, Capture(str(tmp_path))], logger=StepLogger())
    trainer.fit(module, datamodule=FixtureBatches(tensors, fixture["steps"]))
    ranks = int(cfg.trainer.devices) if OmegaConf.select(cfg, "trainer.strategy") else 1
    return fixture, tensors, module, [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(ranks)]


# ------------------------------------------------------------------------------------------------------------------
# comparisons
# ------------------------------------------------------------------------------------------------------------------
def assert_close(actual: float, expected: float, tol: dict, what: str) -> None:
    bound = tol["atol"] + tol["rtol"] * abs(expected)
    assert abs(actual - expected) <= bound, f"{what}: {actual!r} vs reference {expected!r} (|diff| > {bound:.3g})"


def check_step_values(fixture: dict, records: list[dict[str, float]]) -> None:
    """Every per-step value of the fixture against the logged record of that step."""
    tol = fixture["atol_rtol"]
    assert len(records) == fixture["steps"], f"{len(records)} logged steps, the fixture has {fixture['steps']}"
    for expected, logged in zip(fixture["per_step"], records):
        step = expected["step"]
        roles = [("model", expected, "")]
        if expected.get("discriminator") is not None:
            roles.append(("discriminator", expected["discriminator"], "discriminator/"))
        for role, values, tol_prefix in roles:
            assert_close(
                logged[f"train/grad_norm/{role}"],
                values["grad_norm"],
                tol["grad_norm"],
                f"step {step} grad_norm/{role}",
            )
            lrs = [v for k, v in logged.items() if k.startswith(f"lr/{role}")]
            assert lrs, f"step {step}: no learning rate logged for {role}"
            for lr in lrs:
                assert_close(lr, values["lr"], tol["lr"], f"step {step} lr/{role}")
            for key, value in values["losses"].items():
                assert_close(logged[f"train/{key}"], value, tol["losses"][tol_prefix + key], f"step {step} {key}")
        if "ema_decay" in expected:
            assert_close(logged["train/ema_decay"], expected["ema_decay"], tol["ema_decay"], f"step {step} ema_decay")
        if "random_ratio" in expected:
            assert logged["train/random_ratio"] == expected["random_ratio"], f"step {step} random_ratio"


def _noise_masks(fixture: dict, network: str, reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reference-named masks of the rows with a mathematically zero gradient (README: noise-driven elements)."""
    rows = fixture.get("noise_driven_elements", {}).get("elements", {}).get(network, {})
    masks = {k: torch.zeros_like(v, dtype=torch.bool) for k, v in reference.items()}
    for key, (start, end) in rows.items():
        masks[key][start:end] = True
    return masks


def check_tensors(
    fixture: dict, target: torch.nn.Module, actual: dict, tensors: dict, network: str, tol_key: str
) -> None:
    """``final/<network>/*`` (reference names, converted by ``target``'s loader) against ``actual``; the noise-driven
    rows with the fixture's loose atol."""
    reference = section(tensors, f"final/{network}")
    expected = convert_reference_state_dict(target, reference)
    masks = convert_reference_state_dict(target, _noise_masks(fixture, network, reference))
    assert set(expected) == set(actual), sorted(set(expected) ^ set(actual))
    atol, noise_atol = fixture["atol_rtol"][tol_key]["atol"], fixture.get("noise_driven_elements", {}).get("atol")
    for key, value in expected.items():
        diff = (actual[key].float() - value.float()).abs()
        mask = masks[key]
        worst = diff[~mask].max().item() if (~mask).any() else 0.0
        assert worst <= atol, f"final/{network}/{key}: max |diff| {worst:.3g} > atol {atol}"
        if mask.any():
            assert diff[mask].max().item() <= noise_atol, f"final/{network}/{key}: noise-driven rows"


def check_finals(fixture: dict, tensors: dict, module, state: dict) -> None:
    check_tensors(fixture, module.model, state["model"], tensors, "model", "final_model")
    has_ema = any(k.startswith("final/ema/") for k in tensors)
    assert has_ema == ("ema" in state), "EMA present in only one of the fixture and the run"
    if has_ema:
        check_tensors(fixture, module.model, state["ema"], tensors, "ema", "final_ema")
    if "discriminator" in state:
        disc = module.loss.discriminator
        check_tensors(fixture, disc, state["discriminator"], tensors, "discriminator", "final_discriminator")
        for key, value in section(tensors, "final/lecam").items():
            diff = (state["lecam_buffers"][key] - value).abs().max().item()
            assert diff <= fixture["atol_rtol"]["final_lecam"]["atol"], f"final/lecam/{key}: |diff| {diff:.3g}"


def check_param_groups(fixture: dict, module, state: dict) -> None:
    """AdamW groups (which parameters get weight decay, with which settings) as the reference builds them."""
    for key, prefix, target in [
        ("optimizer", "model.", module.model),
        (
            "discriminator_optimizer",
            "loss.discriminator.",
            getattr(getattr(module, "loss", None), "discriminator", None),
        ),
    ]:
        if key not in fixture["optimizer"]:
            continue
        role = 0 if key == "optimizer" else 1
        expected = []
        for group in fixture["optimizer"][key]:
            names = convert_reference_state_dict(target, {n: torch.empty(0) for n in group["params"]})
            expected.append(sorted(prefix + n for n in names))
        actual = [sorted(g) for g in state["groups"][role]]
        assert actual == expected, f"{key}: AdamW parameter groups differ from the reference's"
        settings = [
            (g["weight_decay"], g["lr_initial"], tuple(g["betas"]), g["eps"]) for g in fixture["optimizer"][key]
        ]
        assert state["group_settings"][role] == settings, key


# ------------------------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FIXTURES)
def test_training_trajectory_matches_reference(name, tmp_path):
    fixture, tensors, module, (state,) = run_fixture(name, tmp_path, "trainer=cpu")
    check_param_groups(fixture, module, state)
    check_step_values(fixture, state["records"])
    for i, expected in enumerate(fixture["per_step"]):
        lecam = (expected.get("discriminator") or {}).get("lecam_ema_real_logits_mean")
        if lecam is not None:
            real, fake = state["lecam"][i]
            tol = fixture["atol_rtol"]["lecam_ema"]
            assert_close(real, lecam, tol, f"step {i} lecam ema_real")
            assert_close(fake, expected["discriminator"]["lecam_ema_fake_logits_mean"], tol, f"step {i} lecam ema_fake")
    for i in range(fixture["steps"]):
        for field, value in section(tensors, f"derived/{i}").items():
            assert torch.equal(state["derived"][i][field].reshape(value.shape), value), f"derived/{i}/{field}"
    check_finals(fixture, tensors, module, state)


def _fixture_case(name: str) -> str:
    return json.loads((FIXTURE_DIR / f"{name}.json").read_text())["case"]


@pytest.mark.parametrize("name", [n for n in FIXTURES if _fixture_case(n) != "train_titok_stage2"])
def test_ddp_two_processes_match_reference(name, tmp_path):
    """Two CPU processes, each with one half of every batch: the gradients are averaged over the ranks (the
    reference's multi-GPU semantics), so the run follows the single-process trajectory. Losses are logged per rank
    (means over that rank's half): their mean over the ranks is the batch's."""
    if load_fixture(name)[0]["batch_size"] % 2:
        pytest.skip(f"{name}: an odd batch does not split over 2 processes")
    fixture, tensors, module, states = run_fixture(name, tmp_path, "trainer=ddp_sim")
    assert len(states) == 2
    records = states[0]["records"]
    for i, record in enumerate(records):
        for key in fixture["per_step"][i]["losses"]:
            record[f"train/{key}"] = sum(s["records"][i][f"train/{key}"] for s in states) / len(states)
    check_step_values(fixture, records)
    for i in range(fixture["steps"]):
        for field, value in section(tensors, f"derived/{i}").items():
            halves = torch.cat([s["derived"][i][field] for s in states])
            assert torch.equal(halves.reshape(value.shape), value), f"derived/{i}/{field}"
    for key, value in states[0]["model"].items():
        assert torch.equal(states[1]["model"][key], value), f"ranks disagree on {key}"
    check_finals(fixture, tensors, module, states[0])


@pytest.mark.parametrize("name", [n for n in FIXTURES if _fixture_case(n) == "train_titok_stage2"])
def test_stage2_lecam_running_means_follow_rank0_under_ddp(name, tmp_path):
    """Rank-local state of the reference's stage 2 on several GPUs: the LeCam running means. Its loss module is
    wrapped in DDP (``accelerator.prepare(model, loss_module, ...)``) with the default ``broadcast_buffers=True``, so
    every forward first copies rank 0's buffers to all ranks; each rank then updates them with the means of its own
    logits (they are never all-reduced). Lightning's DDP copies buffers only before the first manual-optimization
    step, so the loss copies rank 0's means itself. Checked on every discriminator step: the LeCam loss of rank r uses
    rank 0's buffers after step i - 1, and rank r's buffers after step i are those times the decay plus rank r's
    logged mean logits times (1 - decay)."""
    fixture = load_fixture(name)[0]
    losses = fixture["reference_config"]["losses"]
    decay, weight, start = (
        losses["lecam_ema_decay"],
        losses["lecam_regularization_weight"],
        losses["discriminator_start"],
    )
    if weight == 0 or start >= fixture["steps"] or fixture["batch_size"] % 2:
        pytest.skip(f"{name}: no LeCam step to check on 2 processes")
    fixture, tensors, _, states = run_fixture(name, tmp_path, "trainer=ddp_sim")
    init = [float(section(tensors, "init/lecam")[k]) for k in ("ema_real_logits_mean", "ema_fake_logits_mean")]
    tol = {"atol": 1e-7, "rtol": 1e-5}
    for i in range(start, fixture["steps"]):
        prev_real, prev_fake = states[0]["lecam"][i - 1] if i > 0 else init
        for rank, state in enumerate(states):
            real, fake = state["records"][i]["train/logits_real"], state["records"][i]["train/logits_fake"]
            lecam = weight * (max(real - prev_fake, 0.0) ** 2 + max(prev_real - fake, 0.0) ** 2)
            assert_close(state["records"][i]["train/lecam_loss"], lecam, tol, f"rank {rank} step {i} lecam_loss")
            expected = [prev_real * decay + real * (1 - decay), prev_fake * decay + fake * (1 - decay)]
            for actual, value, what in zip(state["lecam"][i], expected, ("real", "fake")):
                assert_close(actual, value, tol, f"rank {rank} step {i} LeCam ema_{what}")
    assert states[0]["lecam"][-1] != states[1]["lecam"][-1], "LeCam running means were synchronised across ranks"
