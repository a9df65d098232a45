"""Full-step speed of titok-lightning against the reference (bytedance/1d-tokenizer), row by row, in one process.

    python scripts/benchmark.py --reference .ref --out bench.json      # GPU: every row, then the train.py runs
    python scripts/benchmark.py --dry-run                              # CPU, micro sizes: checks the script itself

Training rows run this project's LightningModule step as ``train.py`` runs it (the experiment's Hydra config:
module, loss, optimizer roles, precision with its GradScaler, clipping, EMA callback, per-step logging to a CSV
logger), fed one synthetic batch already on the device; the step time is the median wall time from one training
batch start to the next, after warm-up. The reference side is ``bench_reference.py`` (next to
``reference_h200.json`` in ``../shared/bench``): its full steps mirror the reference's ``utils/train_utils.py`` loops
on a copy of the reference (``--reference``) with its own random weights. Both sides build the same architecture
from the same reference config; ours gets the converted weights of a reference network built here, and every row
first checks in fp32 (TF32 off) that the two implementations give the same outputs (speed does not depend on the
weights). Without the reference copy the rows print the stored figures of ``reference_h200.json`` (or, for a batch
it was not measured at, issue 12's table), marked "stored".

The stage-1 teacher is also timed in fp32 and bf16, each also channels-last (``model.teacher_dtype``,
``model.teacher_channels_last``), with the share of its codes equal to the fp32 ones (``--teacher-weights``).

Then (unless ``--no-train-runs``) ``train.py`` itself runs ``titok_b64``, ``titok_b64_stage2``, ``rar_b`` and
``maskgit_titok_l32`` on synthetic shards (as ``scripts/gpu_check.py``) and the steady-state img/s of each run's
metrics is printed.

With ``--profile [N]`` every row of ours runs its timed call once more under ``torch.profiler`` and prints (and
writes to the JSON) the top N kernels by device self time, their shares of the call's time and the number of kernel
launches: where the time goes.

With ``--precision-check EXPERIMENT`` three more ``train.py`` runs (``--precision-steps``, 300) show whether
``--precision-candidate`` (bf16-mixed) trains EXPERIMENT as its own precision does: its loss curve against the
recipe's precision with seed 0, within the difference between seeds 0 and 1 (issue 12: a recipe keeps the
reference's precision unless another one is shown to train the same).

With ``--budget-s S`` (seconds from the start) a row, the teacher or a ``train.py`` run starts only if its estimate
(``ESTIMATE_S``) still fits, so a device call with a hard limit ends with the figures it could take; the rows run
cheapest first, and what was left out is listed at the end and in the JSON (``skipped``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import importlib.util
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BENCH_DIRS = (ROOT.parent / "shared" / "bench", ROOT / ".device" / "bench")  # the second: copied for a GPU machine

# ------------------------------------------------------------------------------ reference configs (full size)
VQ_B64 = {
    "codebook_size": 4096,
    "token_size": 12,
    "use_l2_norm": True,
    "commitment_cost": 0.25,
    "vit_enc_model_size": "base",
    "vit_dec_model_size": "base",
    "vit_enc_patch_size": 16,
    "vit_dec_patch_size": 16,
    "num_latent_tokens": 64,
    "finetune_decoder": False,
}
VQ_L32 = dict(VQ_B64, vit_enc_model_size="large", vit_dec_model_size="large", num_latent_tokens=32)
VQ_L32["finetune_decoder"] = True
IMAGES_256 = {"preprocessing": {"crop_size": 256}}
GENERATOR_L = {
    "hidden_size": 768,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 3072,
    "dropout": 0.1,
    "attn_drop": 0.1,
    "class_label_dropout": 0.1,
    "condition_num_classes": 1000,
}
# relative paths: the reference's own files when it is imported
REFERENCE_CONFIGS: dict[str, tuple[str, dict]] = {
    "titok_b64_stage1": ("configs/training/TiTok/stage1/titok_b64.yaml", {"model": {"vq_model": VQ_B64}}),
    "titok_b64_stage2": (
        "configs/training/TiTok/stage2/titok_b64.yaml",
        {"model": {"vq_model": dict(VQ_B64, finetune_decoder=True)}},
    ),
    "rar_b": (
        "configs/training/generator/rar.yaml",
        {
            "model": {
                "vq_model": {"codebook_size": 1024, "token_size": 256, "num_latent_tokens": 256},
                "generator": dict(
                    GENERATOR_L,
                    image_seq_len=256,
                    randomize_temperature=1.0,
                    guidance_scale=16.0,
                    guidance_scale_pow=2.75,
                    use_checkpoint=False,
                    randomness_anneal_start=125000,
                    randomness_anneal_end=187500,
                ),
            }
        },
    ),
    "maskgit_l32": (
        "configs/infer/TiTok/titok_l32.yaml",
        {
            "model": {
                "vq_model": VQ_L32,
                "generator": dict(
                    GENERATOR_L,
                    model_type="ViT",
                    image_seq_len=32,
                    num_steps=8,
                    randomize_temperature=9.5,
                    guidance_scale=4.5,
                    guidance_decay="linear",
                ),
            }
        },
    ),
}
for _path, _config in REFERENCE_CONFIGS.values():
    _config["dataset"] = IMAGES_256
# --tiny: the shrinking of bench_reference.py --tiny-arch (TiTok "small" at 64 px, generators 2 x 128)
TINY_TITOK = {"model": {"vq_model": {"vit_enc_model_size": "small", "vit_dec_model_size": "small"}}}
TINY_TITOK["dataset"] = {"preprocessing": {"crop_size": 64}}
TINY_GENERATOR = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 512}
TINY_EDITS = {
    "titok_b64_stage1": TINY_TITOK,
    "titok_b64_stage2": TINY_TITOK,
    "rar_b": {"model": {"generator": dict(TINY_GENERATOR, image_seq_len=16), "vq_model": {"num_latent_tokens": 16}}},
    "maskgit_l32": {"model": {"generator": TINY_GENERATOR, **TINY_TITOK["model"]}, "dataset": TINY_TITOK["dataset"]},
}
# --dry-run: sizes far below any reference configuration (seconds on a CPU); no agreement check is possible there
MICRO_TITOK = {
    "image_size": 32,
    "encoder_patch_size": 8,
    "decoder_patch_size": 8,
    "encoder_width": 32,
    "encoder_depth": 1,
    "encoder_heads": 2,
    "decoder_width": 32,
    "decoder_depth": 1,
    "decoder_heads": 2,
    "num_latent_tokens": 4,
    "codebook_size": 16,
}
MICRO_VQGAN = {
    "hidden_channels": 32,
    "channel_mult": [1, 1, 1, 1],
    "num_resolutions": 4,
    "num_res_blocks": 1,
    "z_channels": 8,
    "resolution": 32,
}
MICRO_PIXEL = {"num_proxy_codes": 16, "pixel_codebook_size": 16, "pixel_codebook_dim": 8, "pixel_vqgan": MICRO_VQGAN}
MICRO_GENERATOR = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64, "codebook_size": 16}
# Dense bf16 tensor-core peak (vendor figures) for MFU.
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def merge(base: dict, edits: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in edits.items():
        out[key] = merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


@dataclass
class Row:
    """One line of the table: our side, the reference case (``bench_reference.py``) and its figure."""

    name: str
    family: str  # key of REFERENCE_CONFIGS
    kind: str  # train | sample | reconstruct
    batch: int
    ref_case: str
    ref_key: str = "images_per_s"
    goal: float = 2.0
    experiment: str = ""
    on_the_fly: bool = False  # generator rows: images tokenized inside the step
    issue_ref: float | None = None  # the reference figure of issue 12's table (one H200 run)


ROWS = [
    Row("titok_b64 stage1 full step", "titok_b64_stage1", "train", 32, "titok_b64_stage1_train", "images_per_s", 2.0,
        "titok_b64", issue_ref=228.0),
    Row("titok_b64 stage2 full step", "titok_b64_stage2", "train", 32, "titok_b64_stage2_train", "images_per_s", 2.0,
        "titok_b64_stage2", issue_ref=92.9),
    Row("RAR-B training", "rar_b", "train", 64, "rar_b_train", "images_per_s", 2.0, "rar_b", issue_ref=352.2),
    Row("MaskGIT-L32 training", "maskgit_l32", "train", 64, "maskgit_l32_train", "images_per_s", 2.0,
        "maskgit_titok_l32", issue_ref=569.0),
    Row("MaskGIT-L32 training + tokenizer", "maskgit_l32", "train", 64, "maskgit_l32_train",
        "with_tokenizer_images_per_s", 2.0, "maskgit_titok_l32", on_the_fly=True, issue_ref=411.0),
    Row("RAR-B sampling B=128", "rar_b", "sample", 128, "rar_b_sample", goal=5.0, issue_ref=23.6),
    Row("RAR-B sampling B=64", "rar_b", "sample", 64, "rar_b_sample", goal=5.0, issue_ref=13.6),
    Row("MaskGIT-L32 sampling B=64", "maskgit_l32", "sample", 64, "maskgit_l32_sample", goal=4.0, issue_ref=356.9),
    Row("TiTok-L32 reconstruction B=64", "maskgit_l32", "reconstruct", 64, "titok_l32_reconstruct",
        "bf16_images_per_s", 2.0, issue_ref=355.5),
]  # fmt: skip
TRAIN_RUNS = ("titok_b64", "titok_b64_stage2", "rar_b", "maskgit_titok_l32")


@dataclass
class Result:
    row: Row
    ref_ips: float | None = None
    ref_note: str = ""
    ref_peak: float | None = None
    ips: float | None = None
    peak: float | None = None
    flops_per_image: float | None = None
    agreement: str = "-"
    dtype: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ helpers
class Env:
    device = torch.device("cpu")
    args: argparse.Namespace
    br = None  # bench_reference module once the reference is imported
    start = time.perf_counter()
    skipped: list[str] = []  # parts left out by --budget-s


# Seconds each part takes on one H100/H200 (both implementations, our compilation included): estimates until a GPU
# run replaces them with the "(N s)" every part prints. --budget-s starts a part only if its estimate still fits.
ESTIMATE_S = {"train": 100.0, "sample": 60.0, "reconstruct": 90.0, "teacher": 30.0, "train_run": 120.0}


def seconds_left() -> float:
    budget = Env.args.budget_s
    return math.inf if budget is None else budget - (time.perf_counter() - Env.start)


def fits(part: str, name: str) -> bool:
    """Whether ``part`` still fits --budget-s; if not, ``name`` is listed as skipped and said so."""
    left = seconds_left()
    if left >= ESTIMATE_S[part]:
        return True
    Env.skipped.append(name)
    print(f"# {name}: skipped, {max(left, 0):.0f} s of --budget-s left (estimate {ESTIMATE_S[part]:.0f} s)", flush=True)
    return False


def sync() -> None:
    if Env.device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak() -> None:
    gc.collect()  # the previous row's networks
    if Env.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if Env.device.type == "cuda" else None


def time_calls(fn: Callable[[], object], warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, iters)):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


class KernelProfile:
    """One span (``start`` .. ``stop``) under ``torch.profiler`` (CPU, plus CUDA on a CUDA device; no shapes, stacks
    or memory: cheap) and where its time went, by event name. On CUDA: the device-side events (kernels, copies,
    memsets) by device time; on a CPU: every event by self CPU time (its time less that of the events inside it).

    The profiler's raw events are summed here instead of through ``key_averages()``: that builds a Python object
    and an op tree for every event, which took 88 s for one RAR sampling call at full depth (24 layers x 256 steps,
    1.3 million events; its own run took 3.6 s)."""

    def __init__(self):
        from torch.profiler import ProfilerActivity

        self.cuda = Env.device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self.prof = torch.profiler.profile(activities=activities)
        self.started = self.seconds = 0.0

    def start(self) -> None:
        sync()
        self.prof.start()
        self.started = time.perf_counter()

    def stop(self) -> None:
        sync()
        self.seconds = time.perf_counter() - self.started
        self.prof.stop()

    def summary(self, top: int, steps: int | None = None) -> dict[str, Any]:
        """``profile``: the ``top`` names by self time (count, self ms, share of the span's wall time);
        ``launches``: device-side events on CUDA, leaf aten ops on a CPU (``launches_per_step`` with ``steps``);
        ``profiled_ms``; ``busy``: all events' self time / the span (on CUDA: how busy the device was)."""
        from torch.autograd import DeviceType
        from torch.autograd.profiler_util import _filter_name  # the profiler's own bookkeeping events

        events = [e for e in self.prof.profiler.kineto_results.events() if not _filter_name(e.name())]
        if self.cuda:
            spans = [(e.name(), e.duration_ns(), True) for e in events if e.device_type() != DeviceType.CPU]
            launches = len(spans)
        else:
            spans = cpu_self_times(e for e in events if e.device_type() == DeviceType.CPU)
            launches = sum(1 for name, _, leaf in spans if leaf and name.startswith("aten::"))
        totals: dict[str, list[int]] = {}
        for name, ns, _ in spans:
            entry = totals.setdefault(name, [0, 0])
            entry[0] += 1
            entry[1] += ns
        span_ns = 1e9 * self.seconds
        ranked = sorted(((ns, count, name) for name, (count, ns) in totals.items() if ns > 0), reverse=True)
        out = {
            "profiled_ms": span_ns / 1e6,
            "busy": sum(ns for ns, _, _ in ranked) / span_ns,
            "launches": launches,
            "profile": [
                {"name": short_name(name), "count": count, "self_ms": ns / 1e6, "share": ns / span_ns}
                for ns, count, name in ranked[:top]
            ],
        }
        if steps:
            out["launches_per_step"] = launches / steps
        return out


def cpu_self_times(events) -> list[tuple[str, int, bool]]:
    """(name, self ns, leaf) of profiler CPU events: an event's duration less those of the events directly inside it
    on its thread; leaf: none inside it."""
    threads: dict[int, list[tuple[int, int, str]]] = {}
    for e in events:
        end = e.start_ns() + e.duration_ns()  # (torch < 2.5's events have no end_ns)
        threads.setdefault(e.start_thread_id(), []).append((e.start_ns(), -end, e.name()))
    out = []
    for spans in threads.values():
        spans.sort()  # by start, the enclosing (later ending) event first
        stack: list[list] = []  # open events: [end, name, self ns, leaf]
        for start, neg_end, name in spans:
            while stack and stack[-1][0] <= start:
                out.append(tuple(stack.pop()[1:]))
            if stack:
                stack[-1][2] += neg_end + start
                stack[-1][3] = False
            stack.append([-neg_end, name, -neg_end - start, True])
        out += [tuple(entry[1:]) for entry in reversed(stack)]
    return out


def short_name(name: str, width: int = 60) -> str:
    for noise in ("void ", "at::native::", "(anonymous namespace)::"):  # what kernel names of aten all start with
        name = name.replace(noise, "")
    return name if len(name) <= width else name[: width - 3] + "..."


def profile_call(fn: Callable[[], object], steps: int | None = None) -> dict[str, Any]:
    """``fn`` once more under the profiler (after its timing: warmed up, compiled)."""
    profile = KernelProfile()
    profile.start()
    try:
        fn()
    finally:
        profile.stop()
    return profile.summary(Env.args.profile, steps)


def add_profile(result: Result, summarize: Callable[[], dict[str, Any]]) -> None:
    """The row's profile, or why there is none: its figures are measured already and stay."""
    try:
        result.extra.update(summarize())
    except Exception as err:
        result.extra["profile_error"] = f"{type(err).__name__}: {str(err)[:300]}"


@contextlib.contextmanager
def strict_fp32():
    """fp32 without TF32: the agreement checks compare the implementations, not the matmul precision."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def agreement(ours: torch.Tensor, theirs: torch.Tensor) -> str:
    if not ours.is_floating_point():
        same = (ours == theirs).float().mean().item()
        return f"{same:.2%} ids equal"
    diff = (ours.float() - theirs.float()).abs().max().item()
    scale = theirs.float().abs().max().item()
    return f"max|diff| {diff:.1e} (of {scale:.1e})"


def reference_config(family: str) -> dict:
    path, inline = REFERENCE_CONFIGS[family]
    if Env.br is not None:  # the reference's own file (+ the same tiny edits as bench_reference --tiny-arch)
        from omegaconf import OmegaConf

        config = OmegaConf.to_container(OmegaConf.load(os.path.join(Env.br.Ref.dir, path)), resolve=True)
    else:
        config = copy.deepcopy(inline)
    return merge(config, TINY_EDITS[family]) if Env.args.tiny else config


def tokenizer_spec(name: str, config: dict, stage1: bool = False) -> dict:
    """Our TiTok spec for the reference config (``stage1``: the proxy-code model of stage 1)."""
    from titok_lightning.models.titok import TiTok

    config = copy.deepcopy(config)
    if stage1:
        config["model"]["vq_model"]["finetune_decoder"] = False
    spec = {"name": name, **TiTok.kwargs_from_reference_config(config)}
    if Env.args.micro:
        spec.update(MICRO_TITOK, **MICRO_PIXEL)
        if not spec.get("finetune_decoder"):
            spec.pop("pixel_vqgan")
    return spec


def teacher_spec() -> dict:
    """The frozen MaskGIT-VQGAN (random weights: nothing is downloaded)."""
    micro = {**MICRO_VQGAN, "codebook_size": 16} if Env.args.micro else {}
    return {"name": "maskgit_vqgan_f16_256", "pretrained": None, **micro}


def generator_spec(name: str, cls, config: dict) -> dict:
    spec = {"name": name, **cls.kwargs_from_reference_config(config)}
    if Env.args.micro:
        spec.update(MICRO_GENERATOR, image_seq_len=8 if cls.__name__ == "RAR" else MICRO_TITOK["num_latent_tokens"])
    return spec


def reference_model(kind: str, config: dict):
    """A reference network (random weights, nothing loaded) or None without the reference."""
    br = Env.br
    if br is None or Env.args.micro:
        return None
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(config)
    with br.offline_random_init(Env.device):
        if kind == "titok":
            model = br.Ref.titok.TiTok(cfg)
        elif kind == "teacher":
            model = br.Ref.titok.PretrainedTokenizer("unused.bin")
        elif kind == "rar":
            model = br.Ref.rar.RAR(cfg)
        else:
            model = br.Ref.maskgit.ImageBert(cfg)
    return model.to(Env.device).eval()


def convert_into(ours: torch.nn.Module, theirs: torch.nn.Module | None) -> None:
    if theirs is not None:
        from titok_lightning.convert import load_reference_state_dict

        load_reference_state_dict(ours, theirs.state_dict())


# -------------------------------------------------------------------------------------- our training rows
class StepTimer:
    """Lightning callback (built lazily: Lightning is imported only when a training row runs) timing every
    training batch from its start to the next batch's start, i.e. the whole loop iteration; with ``flops`` (a
    ``FlopCounterMode``) it also counts the FLOPs of the first batch (a warm-up batch)."""

    def __new__(cls, flops=None):
        from lightning.pytorch.callbacks import Callback

        class _Timer(Callback):
            def __init__(self):
                self.starts: list[float] = []
                self.flops = flops

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                sync()
                self._stop_counting()
                self.starts.append(time.perf_counter())
                if self.flops is not None and batch_idx == 0:
                    self.flops.__enter__()

            def on_train_end(self, trainer, pl_module):
                sync()
                self._stop_counting()
                self.starts.append(time.perf_counter())

            def _stop_counting(self):
                if self.flops is not None and len(self.starts) == 1:
                    self.flops.__exit__(None, None, None)

            def step_times(self) -> list[float]:
                return [b - a for a, b in zip(self.starts, self.starts[1:])]

        return _Timer()


class ProfileStep:
    """Lightning callback (built lazily, as ``StepTimer``) profiling training batch ``index`` from its start to the
    next batch's start: the span ``StepTimer`` times, inside the same ``fit`` (compiled and warmed up already; a
    second ``fit`` would rebuild the trainer and recompile), on a batch after the timed ones so that the profiler's
    overhead is in no timed step. Placed after the timer, whose reading at a batch start comes first."""

    def __new__(cls, profile: KernelProfile, index: int):
        from lightning.pytorch.callbacks import Callback

        class _Profile(Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if batch_idx == index:
                    profile.start()
                elif batch_idx == index + 1:
                    profile.stop()

        return _Profile()


class RepeatBatch:
    """The same device batch ``steps`` times (the reference side has no data loading either)."""

    def __init__(self, batch: dict, steps: int):
        self.batch, self.steps = batch, steps

    def __iter__(self):
        return (self.batch for _ in range(self.steps))

    def __len__(self) -> int:
        return self.steps


def compose_experiment(experiment: str, workdir: Path):
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}", *Env.args.override])
    with open_dict(cfg):
        cfg.paths.output_dir = str(workdir)
    return cfg


def training_module_and_batch(row: Row, workdir: Path):
    """(LightningModule config edits applied, the reference networks for the agreement check, a batch)."""
    import hydra
    from omegaconf import OmegaConf, open_dict

    from titok_lightning.models.maskgit import ImageBert
    from titok_lightning.models.rar import RAR

    config = reference_config(row.family)
    cfg = compose_experiment(row.experiment, workdir)
    device, batch_size = Env.device, row_batch(row)
    edits: dict[str, Any] = {}
    refs: dict[str, Any] = {}
    if row.family == "titok_b64_stage1":
        edits = {"model.tokenizer": tokenizer_spec("titok_b64", config), "model.teacher": teacher_spec()}
        refs = {"model": reference_model("titok", config), "teacher": reference_model("teacher", config)}
        batch = {"image": images(batch_size, edits["model.tokenizer"])}
    elif row.family == "titok_b64_stage2":
        edits = {
            "model.tokenizer": tokenizer_spec("titok_b64", config),
            "model.teacher": teacher_spec(),
            "model.init_from": str(random_stage1_checkpoint(config, workdir)),
            "model.loss.perceptual_pretrained": False,
            # the reference case times step discriminator_start: discriminator trained, GAN term on
            "model.loss.discriminator_start": 0,
        }
        if Env.args.micro:  # ConvNeXt-S at 224 px would be most of a CPU dry run
            edits["model.loss.perceptual_loss"] = None
        refs = {"model": reference_model("titok", config)}
        batch = {"image": images(batch_size, edits["model.tokenizer"])}
    elif row.family == "rar_b":
        edits = {"model.generator": generator_spec("rar_b", RAR, config), "model.tokenizer": None}
        refs = {"model": reference_model("rar", config)}
        batch = {"tokens": tokens(batch_size, edits["model.generator"])}
    else:
        edits = {"model.generator": generator_spec("maskgit_titok_l32", ImageBert, config), "model.tokenizer": None}
        edits["model.sample_grid.every_n_steps"] = 0
        refs = {"model": reference_model("maskgit", config)}
        batch = {"tokens": tokens(batch_size, edits["model.generator"])}
        if row.on_the_fly:
            edits["model.tokenizer"] = {**tokenizer_spec("titok_l32", config), "pretrained": None}
            refs["tokenizer"] = reference_model("titok", config)
            batch = {"image": images(batch_size, edits["model.tokenizer"])}
    batch["class_id"] = torch.randint(0, 1000, (batch_size,), device=device)
    with open_dict(cfg):
        for key, value in edits.items():
            OmegaConf.update(cfg, key, value, merge=False)
    module = hydra.utils.instantiate(cfg.model)
    convert_into(module.model, refs.get("model"))
    if "teacher" in refs:
        convert_into(module.teacher, refs["teacher"])
    if "tokenizer" in refs:
        convert_into(module.tokenizer.model, refs["tokenizer"])
    return cfg, module, refs, batch


def row_batch(row: Row) -> int:
    return min(row.batch, Env.args.tiny_batch) if Env.args.tiny else row.batch


def images(batch_size: int, tokenizer: dict) -> torch.Tensor:
    size = tokenizer["image_size"]
    return torch.rand(batch_size, 3, size, size, device=Env.device)


def tokens(batch_size: int, generator: dict) -> torch.Tensor:
    return torch.randint(0, generator["codebook_size"], (batch_size, generator["image_seq_len"]), device=Env.device)


def random_stage1_checkpoint(config: dict, workdir: Path) -> Path:
    """Stage 2's mandatory ``init_from``: a stage-1 checkpoint of random weights (the rows then load the converted
    reference weights over them)."""
    from titok_lightning.loading import build_model

    stage1 = build_model(tokenizer_spec("titok_b64", config, stage1=True))
    path = workdir / "stage1.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in stage1.state_dict().items()}, "hyper_parameters": {}}, path)
    return path


def no_reference_reason() -> str:
    return "dry run: micro sizes" if Env.args.micro else "no reference"


def train_agreement(row: Row, module, refs, batch) -> str:
    if refs.get("model") is None:
        return no_reference_reason()
    theirs, ours = refs["model"], module.model
    ours.to(Env.device).eval()
    with torch.no_grad(), strict_fp32():
        if row.family.startswith("titok"):
            x = batch["image"][:2]
            text = agreement(ours(x)[0], theirs(x)[0])
            if "teacher" in refs:
                module.teacher.to(Env.device)
                text += "; teacher codes " + agreement(
                    module.teacher.encode(x).flatten(1), refs["teacher"].encode(x).flatten(1)
                )
            return text
        if row.family == "rar_b":
            ids, n = batch["tokens"][:2], batch["tokens"].shape[1]
            cond = ours.preprocess_condition(batch["class_id"][:2], 0.0)
            orders = torch.stack([torch.randperm(n, device=Env.device) for _ in range(2)])
            return agreement(ours.forward_fn(ids, cond, orders=orders), theirs.forward_fn(ids, cond, orders=orders))
        ids = torch.randint(0, 4097, (2, ours.image_seq_len), device=Env.device)
        cond = batch["class_id"][:2]
        return agreement(ours(ids, cond, 0.0), theirs(ids, cond, cond_drop_prob=0.0))


def trainer_precision(cfg) -> str:
    precision = str(cfg.trainer.precision)
    if Env.device.type == "cpu" and precision.startswith("16"):
        return "bf16-mixed"  # CPU fp16 is impractically slow; bench_reference.py does the same on CPU
    return precision


def fit(cfg, module, batch, steps: int, workdir: Path, callbacks: list):
    import hydra
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    ema = cfg.callbacks.get("ema") if "callbacks" in cfg else None
    trainer = L.Trainer(
        accelerator=Env.device.type,
        devices=1,
        precision=trainer_precision(cfg),
        max_steps=steps,
        logger=CSVLogger(str(workdir), name="csv"),
        log_every_n_steps=int(cfg.trainer.log_every_n_steps),
        callbacks=([hydra.utils.instantiate(ema)] if ema else []) + callbacks,  # the timer last: EMA inside
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, train_dataloaders=RepeatBatch(batch, steps))
    return trainer


def compiles(module) -> bool:
    return bool(module.compile_modules) and Env.device.type == "cuda"


def count_step_flops(row: Row, workdir: Path) -> float:
    """FLOPs of one eager training step of a fresh module (the timed one is compiled)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg, module, _, batch = training_module_and_batch(row, workdir)
    module.compile_modules = ()
    counter = FlopCounterMode(display=False)
    fit(cfg, module, batch, 1, workdir, [StepTimer(counter)])
    return counter.get_total_flops() / len(batch["class_id"])


def run_ours_train(row: Row, result: Result, workdir: Path) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    cfg, module, refs, batch = training_module_and_batch(row, workdir)
    result.agreement = train_agreement(row, module, refs, batch)
    del refs
    module.train()
    compiled = compiles(module)
    result.dtype = trainer_precision(cfg) + (f" compile {list(module.compile_modules)}" if compiled else "")
    warmup, iters = max(1, Env.args.warmup), Env.args.iters
    # FLOPs (forward and backward of every network, frozen ones included) counted on the first, eager, warm-up step
    counter = None if compiled else FlopCounterMode(display=False)
    timer = StepTimer(counter)
    callbacks, steps, profile = [timer], warmup + iters, None
    if Env.args.profile:  # two more batches: the profiled one and the one whose start ends its span
        profile = KernelProfile()
        callbacks.append(ProfileStep(profile, steps))
        steps += 2
    reset_peak()
    fit(cfg, module, batch, steps, workdir, callbacks)
    times = timer.step_times()[warmup : warmup + iters]
    result.ips = len(batch["class_id"]) / statistics.median(times)
    result.peak = peak_gib()
    result.extra["ms_per_step_mean"] = 1e3 * statistics.fmean(times)
    if profile:
        add_profile(result, functools.partial(profile.summary, Env.args.profile))
    del module
    batch_size = len(batch["class_id"])
    result.flops_per_image = count_step_flops(row, workdir) if compiled else counter.get_total_flops() / batch_size


# ------------------------------------------------------------------------------- our sampling / reconstruction
def run_ours_sample(row: Row, result: Result, workdir: Path) -> None:
    from titok_lightning.models.maskgit import ImageBert
    from titok_lightning.models.rar import RAR
    from titok_lightning.sampling import GraphCache

    config = reference_config(row.family)
    cls, kind = (RAR, "rar") if row.family == "rar_b" else (ImageBert, "maskgit")
    spec = generator_spec("unused", cls, config)
    spec.pop("name")
    ours = cls(**spec).to(Env.device).eval()
    theirs = reference_model(kind, config)
    convert_into(ours, theirs)
    batch = row_batch(row)
    labels = torch.randint(0, 1000, (batch,), device=Env.device)
    result.agreement = no_reference_reason()
    if theirs is not None:
        with torch.no_grad(), strict_fp32():
            ids = torch.randint(0, ours.codebook_size, (2, ours.image_seq_len), device=Env.device)
            if kind == "rar":
                cond = ours.preprocess_condition(labels[:2], 0.0)
                result.agreement = "forward " + agreement(ours.forward_fn(ids, cond), theirs.forward_fn(ids, cond))
            else:
                result.agreement = "forward " + agreement(ours(ids, labels[:2], 0.0), theirs(ids, labels[:2], 0.0))
        del theirs
    if kind == "maskgit":  # configs/infer/TiTok/titok_l32.yaml as sample_imagenet_titok.py passes it
        gen = config["model"]["generator"]
        settings = dict(
            num_steps=gen["num_steps"],
            guidance_scale=gen["guidance_scale"],
            guidance_decay=gen["guidance_decay"],
            randomize_temperature=gen["randomize_temperature"],
            softmax_temperature_annealing=True,
        )
    else:
        settings = {}  # RAR-B's official evaluation settings are the registry defaults
    # as sample.py runs it: fp32 with TF32 matmuls (its default), the CUDA graphs kept from one batch to the next
    # (captured in the warm-up call); bf16 autocast as a second figure
    graphs = GraphCache()
    for label, dtype in (("", None), ("bf16_", torch.bfloat16)):
        context = torch.autocast(Env.device.type, dtype=dtype) if dtype else contextlib.nullcontext()

        def sample(context=context) -> torch.Tensor:
            with context:
                return ours.generate(labels, generator=0, graphs=graphs, **settings)

        reset_peak()
        times = time_calls(sample, Env.args.sample_warmup, Env.args.sample_iters)
        if label:
            result.extra["bf16_img_per_s"] = batch / statistics.median(times)
        else:
            result.ips, result.peak = batch / statistics.median(times), peak_gib()
            if Env.args.profile:  # the row's figure: fp32; one token per step in RAR
                steps = settings["num_steps"] if kind == "maskgit" else ours.image_seq_len
                add_profile(result, functools.partial(profile_call, sample, steps))
    # the CUDA-graph lever, measured: one fp32 call with cuda_graph=False (on a CPU the same eager path), same ids?
    eager: list[torch.Tensor] = []
    without_graphs = functools.partial(ours.generate, labels, generator=0, cuda_graph=False, **settings)
    (seconds,) = time_calls(lambda: eager.append(without_graphs()), 0, 1)
    result.extra["no_cuda_graph_img_per_s"] = batch / seconds
    result.extra["cuda_graph_same_ids"] = bool(torch.equal(eager[0], ours.generate(labels, generator=0, **settings)))
    result.dtype = "fp32/TF32 (bf16 in notes)"


def run_ours_reconstruct(row: Row, result: Result, workdir: Path) -> None:
    from titok_lightning.models.titok import TiTok

    config = reference_config(row.family)
    spec = tokenizer_spec("unused", config)
    spec.pop("name")
    ours = TiTok(**spec).to(Env.device).eval()
    theirs = reference_model("titok", config)
    convert_into(ours, theirs)
    batch = row_batch(row)
    pixels = images(batch, spec)
    result.agreement = no_reference_reason()
    if theirs is not None:
        with torch.no_grad(), strict_fp32():
            ours_out = ours.decode_tokens(ours.encode(pixels[:2])[1]["min_encoding_indices"])
            theirs_out = theirs.decode_tokens(theirs.encode(pixels[:2])[1]["min_encoding_indices"])
            result.agreement = agreement(ours_out, theirs_out)
        del theirs

    @torch.no_grad()
    def run() -> torch.Tensor:
        with torch.autocast(Env.device.type, dtype=torch.bfloat16):
            return ours.decode_tokens(ours.encode(pixels)[1]["min_encoding_indices"]).clamp(0.0, 1.0)

    reset_peak()
    times = time_calls(run, Env.args.warmup, Env.args.iters)
    result.ips, result.peak, result.dtype = batch / statistics.median(times), peak_gib(), "bf16 autocast"
    if Env.args.profile:
        add_profile(result, functools.partial(profile_call, run))
    # levers for the row's goal, measured after its figure: the pixel decoder's convolutions in channels-last
    # (cuDNN's native bf16 layout), then also every network compiled (inductor: CUDA only); outputs against the above
    shipped = run()
    ours.pixel_decoder.to(memory_format=torch.channels_last)
    variants = {"channels_last": "channels-last pixel decoder"}
    if Env.device.type == "cuda":
        variants["compiled_channels_last"] = "+ compiled encoder, decoder, pixel decoder"
    for key, label in variants.items():
        if key.startswith("compiled"):
            for network in (ours.encoder, ours.decoder, ours.pixel_decoder):
                network.compile()
        times = time_calls(run, Env.args.warmup, Env.args.iters)
        difference = (run() - shipped).abs().max().item()
        result.extra[f"{key}_img_per_s"] = batch / statistics.median(times)
        result.extra[f"{key}_max_abs_diff"] = difference
        result.extra.setdefault("variant_labels", {})[key] = label


# ------------------------------------------------------------------------------------ the teacher option
TEACHER_ROW = "proxy-code teacher"
# label -> (model.teacher_dtype, model.teacher_channels_last); channels-last after the others (the teacher converts)
TEACHER_VARIANTS = {
    "fp32": ("float32", False),
    "bf16": ("bfloat16", False),
    "fp32_channels_last": ("float32", True),
    "bf16_channels_last": ("bfloat16", True),
}


def teacher_option(args) -> dict[str, Any]:
    """The stage-1 teacher (``model.teacher_dtype`` / ``model.teacher_channels_last``): img/s in fp32 (the
    reference), bf16, and each in channels-last, and the share of positions whose codes equal the fp32 ones (an
    option stays off unless >= 99.5% with the official weights; random weights say nothing)."""
    from titok_lightning.lit.tokenizer import proxy_codes

    spec = teacher_spec()
    if args.teacher_weights:
        from titok_lightning.hub import load_pretrained

        teacher, weights = load_pretrained(str(args.teacher_weights)), str(args.teacher_weights)
    else:
        from titok_lightning.registry import create_model

        teacher, weights = create_model(spec.pop("name"), **{k: v for k, v in spec.items() if k != "pretrained"}), ""
    teacher = teacher.to(Env.device).eval()
    batch, size = (2, 32) if args.micro else (32, 256)
    # smooth images (bicubic upsampled noise): codes of white noise would test nothing photo-like
    low = torch.rand(batch, 3, size // 16, size // 16, device=Env.device)
    pixels = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic").clamp(0, 1)
    fp32_codes = proxy_codes(teacher, pixels)
    out: dict[str, Any] = {"weights": weights or "random (agreement not meaningful)", "batch": batch}
    for label, (dtype, channels_last) in TEACHER_VARIANTS.items():
        if channels_last:
            teacher.to(memory_format=torch.channels_last)

        def run(dtype=dtype, channels_last=channels_last) -> torch.Tensor:
            return proxy_codes(teacher, pixels, dtype, channels_last)

        times = time_calls(run, args.warmup, args.iters)
        same = (run() == fp32_codes).float().mean().item()
        out[label] = {"img_per_s": batch / statistics.median(times), "codes_equal_fp32": same}
    return out


# ------------------------------------------------------------------------------------------- the reference
def find_bench_file(name: str) -> Path | None:
    return next((d / name for d in BENCH_DIRS if (d / name).is_file()), None)


def import_reference(path: Path | None) -> str:
    """Import bench_reference.py and, through it, the reference copy; returns why not, or ''."""
    module_path = find_bench_file("bench_reference.py")
    if module_path is None:
        return f"bench_reference.py not found in {', '.join(map(str, BENCH_DIRS))}"
    if path is None or not (path / "modeling" / "titok.py").is_file():
        return f"no reference copy at {path} (needs modeling/titok.py; pass --reference)"
    spec = importlib.util.spec_from_file_location("bench_reference", module_path)
    br = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(br)
    br.ARGS = br.parse_args(["--budget-s", "1e9", "--iters", str(Env.args.iters), "--warmup", str(Env.args.warmup)])
    br.ARGS.sample_iters, br.ARGS.sample_warmup = Env.args.sample_iters, Env.args.sample_warmup
    br.ARGS.tiny = br.ARGS.tiny_arch = Env.args.tiny
    br.ARGS.kv_off_batch = 0
    br.DEVICE = Env.device
    try:
        br.import_reference(str(path))
    except (ImportError, SystemExit) as err:
        return f"the reference does not import: {err}"
    Env.br = br
    return ""


_REFERENCE_RESULTS: dict[tuple[str, int], dict] = {}


def run_reference(row: Row, result: Result) -> None:
    br = Env.br
    batch = row_batch(row)
    key = (row.ref_case, batch)
    if key not in _REFERENCE_RESULTS:
        br.ARGS.tiny, br.ARGS.tiny_batch = True, batch  # bench_reference's batch = min(config batch, tiny_batch)
        reset_peak()
        torch.manual_seed(0)
        try:
            figures = br.CASE_FNS[row.ref_case]()
            figures.setdefault("peak_mem_GB", br.peak_gb())
        except Exception as err:
            figures = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
        _REFERENCE_RESULTS[key] = figures
    figures = _REFERENCE_RESULTS[key]
    result.ref_ips = figures.get(row.ref_key)
    result.ref_peak = figures.get("bf16_peak_mem_GB" if row.ref_key.startswith("bf16") else "peak_mem_GB")
    result.ref_note = figures.get("error", f"measured, {figures.get('dtype', '').split(' (')[0]}")


def stored_reference(row: Row, result: Result, stored: dict | None) -> None:
    figures = (stored or {}).get("results", {}).get(row.ref_case, {})
    ref_batch = figures.get("batch")
    if figures.get(row.ref_key) is None or ref_batch != row.batch:
        # measured at another batch (or not at all) there: the figure of issue 12's table (one H200 run)
        result.ref_ips, result.ref_note = row.issue_ref, "stored: issue 12's table (H200)"
        return
    result.ref_ips = figures[row.ref_key]
    result.ref_peak = figures.get("bf16_peak_mem_GB" if row.ref_key.startswith("bf16") else "peak_mem_GB")
    device = stored.get("env", {}).get("device_name", "?")
    result.ref_note = f"stored ({device}, batch {ref_batch})"


# -------------------------------------------------------------------------------------------- train.py runs
def train_run_overrides(experiment: str, data: dict[str, Path], steps: int, run_dir: Path, tiny: bool) -> list[str]:
    """Hydra overrides of one train.py run: synthetic data, random frozen networks, CSV metrics."""
    common = [
        f"experiment={experiment}",
        "logger=csv",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        "trainer.limit_val_batches=1",
        # each logged train/samples_per_sec covers that many steps; the logging step waits for the device
        f"trainer.log_every_n_steps={min(10, max(1, steps // 10))}",
        f"hydra.run.dir={run_dir}",
        "callbacks.model_checkpoint.every_n_train_steps=null",
    ]
    if experiment == "rar_b":
        common += [f"data.train_jsonl={data['jsonl']}", "model.tokenizer=null"]
    else:
        common += [f"data.train_shards={data['train']}", f"data.val_shards={data['val']}"]
    if experiment.startswith("titok"):
        common += [
            "model.teacher.pretrained=null",
            "callbacks.reconstruction_metrics.compute_fid=false",
            "callbacks.reconstruction_metrics.compute_is=false",
            f"callbacks.image_logger.every_n_steps={steps}",
        ]
    if experiment == "titok_b64_stage2":
        common += [f"model.init_from={data['stage1']}", "model.loss.perceptual_pretrained=false"]
        common += ["model.loss.discriminator_start=0"]
    if experiment == "maskgit_titok_l32":
        common += ["model.tokenizer={name:titok_l32,pretrained:null}", "model.sample_grid.every_n_steps=0"]
    common += [f"data.num_workers={0 if tiny else 8}"]
    if tiny:
        common += tiny_train_overrides(experiment)
    return common + Env.args.override


def nested_overrides(prefix: str, spec: dict) -> list[str]:
    from titok_lightning.overrides import override_value

    out = []
    for key, value in spec.items():
        if key in ("name", "pretrained", "sampling"):
            continue
        if isinstance(value, dict):
            out += nested_overrides(f"{prefix}.{key}", value)
        else:
            out.append(f"++{prefix}.{key}={override_value(value)}")
    return out


def tiny_train_overrides(experiment: str) -> list[str]:
    """CPU dry run: the rows' sizes (the generator's token space shrinks with them), batch 2, fp32."""
    from titok_lightning.models.maskgit import ImageBert
    from titok_lightning.models.rar import RAR

    out = ["trainer.accelerator=cpu", "trainer.precision=32-true", "data.batch_size=2", "data.samples_per_epoch=8"]
    if experiment.startswith("titok"):
        family = "titok_b64_stage2" if experiment.endswith("stage2") else "titok_b64_stage1"
        tokenizer = tokenizer_spec("titok_b64", reference_config(family))
        out += nested_overrides("model.tokenizer", tokenizer) + nested_overrides("model.teacher", teacher_spec())
        out += ["model.loss.perceptual_loss=null"] if family.endswith("stage2") else []
        out += [f"data.image_size={tokenizer['image_size']}", f"data.resize_shorter_edge={tokenizer['image_size']}"]
    elif experiment == "rar_b":
        out += nested_overrides("model.generator", generator_spec("rar_b", RAR, reference_config("rar_b")))
    else:
        config = reference_config("maskgit_l32")
        out += nested_overrides("model.generator", generator_spec("maskgit_titok_l32", ImageBert, config))
        tokenizer = tokenizer_spec("titok_l32", config)
        out += nested_overrides("model.tokenizer", tokenizer)
        out += [f"data.image_size={tokenizer['image_size']}", f"data.resize_shorter_edge={tokenizer['image_size']}"]
    return out


def write_train_data(workdir: Path, tiny: bool) -> dict[str, Path]:
    """Synthetic ImageNet-layout shards (gpu_check.py's), a JSONL of random RAR tokens, a random stage-1 ckpt."""
    from titok_lightning.models.rar import RAR

    gpu_check = _load_script("gpu_check")
    count = 16 if tiny else 512  # the training sets resample their shards: a few hundred images are enough
    train, val = gpu_check.make_shards(workdir, count, 8 if tiny else 128)
    rar = generator_spec("rar_b", RAR, reference_config("rar_b"))
    jsonl = workdir / "tokens.jsonl"
    generator = torch.Generator().manual_seed(0)
    with open(jsonl, "w", encoding="utf-8") as file:
        for index in range(count):
            ids = torch.randint(0, rar["codebook_size"], (rar["image_seq_len"],), generator=generator).tolist()
            file.write(json.dumps({"class_id": index % 1000, "tokens": ids}) + "\n")
    stage1 = random_stage1_checkpoint(reference_config("titok_b64_stage2"), workdir)
    return {"train": train, "val": val, "jsonl": jsonl, "stage1": stage1}


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_train_py(label: str, overrides: list[str], run_dir: Path) -> dict[str, Any]:
    """One ``train.py`` process, within --train-timeout and what is left of --budget-s; its figures from the run's
    metrics (``gpu_check.summarize``: img/s after warm-up, peak memory, the logged losses)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    command = [sys.executable, "train.py", *overrides]
    print(f"# train.py run ({label}): {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    try:
        proc = subprocess.run(
            command,
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=min(Env.args.train_timeout, seconds_left()),
        )
        returncode, tail = proc.returncode, proc.stderr[-2000:]
    except subprocess.TimeoutExpired:
        returncode, tail = "timeout", ""
    figures = {"returncode": returncode, "wall_s": time.perf_counter() - start}
    try:
        figures.update(_load_script("gpu_check").summarize(run_dir))
    except FileNotFoundError:
        figures["img_per_s"] = math.nan
    if returncode != 0:
        print(tail, flush=True)
    print(  # in the log as it happens: a call killed later keeps it
        f"# train.py run ({label}): rc {returncode}, {fmt(figures.get('img_per_s'))} img/s, "
        f"peak {fmt(figures.get('peak_gib'), '.2f')} GiB, {figures['wall_s']:.0f} s",
        flush=True,
    )
    return figures


def train_runs(args) -> dict[str, dict]:
    workdir = Path(args.workdir)
    data = write_train_data(workdir, args.tiny)
    results = {}
    for experiment in args.train_runs:
        if fits("train_run", f"train.py {experiment}"):
            run_dir = workdir / "runs" / experiment
            overrides = train_run_overrides(experiment, data, args.train_steps, run_dir, args.tiny)
            results[experiment] = run_train_py(experiment, overrides, run_dir)
    return results


PRECISION_WINDOWS = 6  # the loss curves are compared as means over this many equal spans of their logged steps


def window_means(values: list[float], windows: int) -> list[float]:
    bounds = [round(i * len(values) / windows) for i in range(windows + 1)]
    return [statistics.fmean(values[a:b]) for a, b in zip(bounds, bounds[1:]) if b > a]


def precision_check(args) -> dict[str, Any]:
    """Does ``--precision-candidate`` train ``--precision-check``'s recipe as the recipe's own precision does?

    Three ``train.py`` runs of --precision-steps on the same synthetic data: the recipe's precision with seeds 0 and
    1, the candidate with seed 0. Their logged losses are averaged over PRECISION_WINDOWS spans; the candidate trains
    the same when its largest span difference from the recipe's seed-0 run is no larger than the seed-1 run's (the
    run-to-run noise of another seed's initial weights and data order)."""
    experiment, candidate, steps = args.precision_check, args.precision_candidate, args.precision_steps
    workdir = Path(args.workdir)
    data = write_train_data(workdir, args.tiny)
    runs = {
        "recipe, seed 0": ["seed=0"],
        "recipe, seed 1": ["seed=1"],
        f"{candidate}, seed 0": ["seed=0", f"trainer.precision={candidate}"],
    }
    out: dict[str, Any] = {"experiment": experiment, "candidate": candidate, "steps": steps, "runs": {}}
    for label, extra in runs.items():
        if not fits("train_run", f"precision check: {label}"):
            return out
        run_dir = workdir / "precision" / label.replace(", ", "_").replace(" ", "")
        figures = run_train_py(label, train_run_overrides(experiment, data, steps, run_dir, args.tiny) + extra, run_dir)
        out["runs"][label] = figures
        if figures["returncode"] != 0 or not figures.get("losses"):
            out["error"] = f"{label}: return code {figures['returncode']}, {len(figures.get('losses', []))} losses"
            return out
    base, other, cand = (window_means(f["losses"], PRECISION_WINDOWS) for f in out["runs"].values())
    out["windows"] = {"recipe, seed 0": base, "recipe, seed 1": other, f"{candidate}, seed 0": cand}
    out["noise"] = max(abs(a - b) for a, b in zip(other, base))
    out["difference"] = max(abs(a - b) for a, b in zip(cand, base))
    out["trains_the_same"] = out["difference"] <= out["noise"]
    return out


def print_precision_check(check: dict[str, Any]) -> None:
    print(
        f"\nPrecision check: {check['experiment']}, {check['steps']} steps per train.py run, logged loss averaged "
        f"over {PRECISION_WINDOWS} spans of the run"
    )
    if "windows" not in check:
        print(f"  not complete: {check.get('error', 'skipped (--budget-s)')}")
        return
    labels = list(check["windows"])
    print(f"  {'span':<6}" + "".join(f"{label:>22}" for label in labels))
    for index, values in enumerate(zip(*check["windows"].values())):
        print(f"  {index + 1:<6}" + "".join(f"{value:>22.5f}" for value in values))
    verdict = "trains the same" if check["trains_the_same"] else "does NOT train the same"
    print(
        f"  largest span difference from the recipe's seed-0 run: seed 1 (run-to-run noise) {check['noise']:.5f}, "
        f"{check['candidate']} {check['difference']:.5f}: {check['candidate']} {verdict}"
    )


# ---------------------------------------------------------------------------------------------------- main
def fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def print_table(results: list[Result], peak_tflops: float | None) -> None:
    header = f"{'row':<34}{'batch':>6}{'reference':>11}{'ours':>10}{'ratio':>8}{'goal':>6}{'MFU':>7}"
    header += f"{'peak GiB ref/ours':>19}"
    print("\n" + header + "  fp32 agreement | our precision | reference figure")
    for r in results:
        ratio = r.ips / r.ref_ips if r.ips and r.ref_ips else None
        mfu = None
        if r.flops_per_image and r.ips and peak_tflops:
            mfu = r.flops_per_image * r.ips / (peak_tflops * 1e12)
        batch = row_batch(r.row)
        peaks = f"{fmt(r.ref_peak)}/{fmt(r.peak)}"
        print(
            f"{r.row.name:<34}{batch:>6}{fmt(r.ref_ips):>11}{fmt(r.ips):>10}{fmt(ratio, '.2f'):>8}"
            f"{r.row.goal:>5.1f}x{fmt(mfu, '.1%') if mfu is not None else '-':>7}{peaks:>19}  "
            f"{r.agreement} | {r.dtype} | {r.ref_note}"
        )
        if "bf16_img_per_s" in r.extra:
            print(f"{'':<34}{'':>6}{'':>11}{r.extra['bf16_img_per_s']:>10.1f}  (ours, bf16 autocast)")
        for key, label in r.extra.get("variant_labels", {}).items():
            figure, difference = r.extra[f"{key}_img_per_s"], r.extra[f"{key}_max_abs_diff"]
            print(f"{'':<34}{'':>6}{'':>11}{figure:>10.1f}  (ours, {label}; output max |diff| {difference:.2g})")
        if "no_cuda_graph_img_per_s" in r.extra:
            same = "the same ids" if r.extra["cuda_graph_same_ids"] else "OTHER ids than with graphs"
            print(f"{'':<34}{'':>6}{'':>11}{r.extra['no_cuda_graph_img_per_s']:>10.1f}  (ours, no CUDA graphs: {same})")
    print(
        "MFU = model FLOPs per image x img/s / peak. FLOPs per image: one eager training step of our module counted "
        "by torch.utils.flop_counter (forward and backward of every network, frozen teacher / tokenizer / perceptual "
        "net included, each counted once) / batch; peak: "
        + (f"{peak_tflops:g} TFLOP/s dense bf16." if peak_tflops else "unknown for this device (no MFU).")
    )


def print_profiles(results: list[Result]) -> None:
    profiled = [r for r in results if "profile" in r.extra or "profile_error" in r.extra]
    if not profiled:
        return
    cuda = Env.device.type == "cuda"
    ranked, launches, busy = (
        ("device-side events by device self time", "kernels", "device busy")
        if cuda
        else ("events by self CPU time", "leaf aten ops", "events' self time")
    )
    print(
        f"\nKernel profile: each row's timed call once more under torch.profiler (training rows: one batch, from its "
        f"start to the next's), top {Env.args.profile} {ranked}; share: of that call's wall time"
    )
    for r in profiled:
        x = r.extra
        if "profile_error" in x:
            print(f"## {r.row.name}: no profile ({x['profile_error']})")
            continue
        per_step = f" ({x['launches_per_step']:.1f} per decoding step)" if "launches_per_step" in x else ""
        timed = 1e3 * row_batch(r.row) / r.ips  # the profiled call is longer by the profiler's cost per event
        print(
            f"## {r.row.name}: {x['profiled_ms']:.1f} ms profiled ({timed:.1f} timed), {x['launches']} {launches}"
            f"{per_step}, {busy} {x['busy']:.0%}"
        )
        print(f"   {'self ms':>9}{'share':>8}{'count':>7}  name")
        for entry in x["profile"]:
            print(f"   {entry['self_ms']:>9.2f}{entry['share']:>8.1%}{entry['count']:>7}  {entry['name']}")


def write_report(
    args, device: str, why_not: str, results: list[Result], teacher: dict, runs: dict, precision: dict | None = None
) -> None:
    if not args.out:
        return
    payload = {
        "device": device,
        "torch": torch.__version__,
        "tiny": args.tiny,
        "override": args.override,
        "reference": "measured" if Env.br is not None else f"stored ({why_not})",
        "rows": [
            {
                "row": r.row.name,
                "reference_img_per_s": r.ref_ips,
                "img_per_s": r.ips,
                "flops_per_image": r.flops_per_image,
                "peak_gib": r.peak,
                "reference_peak_gib": r.ref_peak,
                "agreement": r.agreement,
                "precision": r.dtype,
                "reference_note": r.ref_note,
                **r.extra,
            }
            for r in results
        ],
        "teacher_option": teacher,
        "train_runs": runs,
        "precision_check": precision or {},
        "skipped": Env.skipped,
    }
    args.out.write_text(json.dumps(payload, indent=1, default=str))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, default=ROOT / ".ref", help="copy of bytedance/1d-tokenizer")
    parser.add_argument("--rows", nargs="+", default=None, help="substrings of row names to run (default: all)")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (bench_reference's --tiny-arch), batch 2")
    parser.add_argument("--tiny-batch", type=int, default=2)
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="CPU check of the script: micro sizes, batch 2, 1 warm-up + 2 timed steps",
    )
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--sample-warmup", type=int, default=1)
    parser.add_argument("--sample-iters", type=int, default=2)
    parser.add_argument(
        "--profile",
        type=int,
        nargs="?",
        const=15,
        default=0,
        metavar="N",
        help="after each row's timing, profile one more call: its top N kernels (default 15) and kernel launches",
    )
    parser.add_argument("--teacher-weights", type=Path, default=None, help="official MaskGIT-VQGAN weights file")
    parser.add_argument("--peak-tflops", type=float, default=None, help="for MFU (default: from the device name)")
    parser.add_argument("--train-runs", nargs="*", default=list(TRAIN_RUNS), help="train.py experiments ([]: none)")
    parser.add_argument("--no-train-runs", action="store_true")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--train-timeout", type=float, default=900.0, help="seconds per train.py run")
    parser.add_argument(
        "--precision-check",
        default=None,
        metavar="EXPERIMENT",
        help="train.py runs of EXPERIMENT: its precision with seeds 0 and 1, --precision-candidate with seed 0; "
        "prints whether the candidate's loss curve stays within the seeds' difference",
    )
    parser.add_argument("--precision-candidate", default="bf16-mixed")
    parser.add_argument("--precision-steps", type=int, default=300)
    parser.add_argument("--workdir", type=Path, default=None, help="synthetic shards and runs (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=None, help="write every figure as JSON")
    parser.add_argument(
        "--override",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="Hydra overrides for our side of every training row and train.py run, to measure a lever "
        "(e.g. model.compile_mode=reduce-overhead trainer.precision=bf16-mixed)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="seconds from the start: a row, the teacher or a train.py run starts only if its estimate still fits",
    )
    args = parser.parse_args(argv)
    if args.profile < 0:
        parser.error(f"--profile takes a positive number of kernels, got {args.profile}")
    args.micro = args.dry_run
    if args.dry_run:
        args.device, args.tiny = "cpu", True
        args.warmup, args.iters, args.sample_warmup, args.sample_iters = 1, 2, 0, 1
        args.train_steps = min(args.train_steps, 3)
        args.precision_steps = min(args.precision_steps, 6)
    if args.no_train_runs:
        args.train_runs = []
    return args


def main(argv=None) -> int:
    args = Env.args = parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    Env.device = torch.device(args.device)
    if Env.device.type == "cuda":
        # as the reference's training and sampling scripts (and this project's float32_matmul_precision: high)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name() if Env.device.type == "cuda" else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    rows = [r for r in ROWS if not args.rows or any(s in r.name for s in args.rows)]
    why_not = import_reference(args.reference) if rows else "no row selected"
    stored = None
    if rows and why_not:
        stored_path = find_bench_file("reference_h200.json")
        stored = json.loads(stored_path.read_text()) if stored_path else None
        print(f"# reference not run ({why_not}): reference figures are the STORED ones of {stored_path}", flush=True)
    print(f"# {name}, torch {torch.__version__}, {'tiny sizes' if args.tiny else 'full size'}", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        args.workdir = args.workdir or Path(tmp) / "train_runs"
        # under a budget the cheapest rows go first (the most rows measured); the table keeps the issue's order
        order = sorted(rows, key=lambda r: ESTIMATE_S[r.kind]) if args.budget_s is not None else rows
        for index, row in enumerate(order):
            if not fits(row.kind, row.name):
                continue
            result = Result(row)
            workdir = Path(tmp) / f"row{index}"
            workdir.mkdir()
            start = time.perf_counter()
            try:
                if Env.br is not None:
                    run_reference(row, result)
                else:
                    stored_reference(row, result, stored)
                {"train": run_ours_train, "sample": run_ours_sample, "reconstruct": run_ours_reconstruct}[row.kind](
                    row, result, workdir
                )
            except Exception as err:
                result.agreement = f"FAILED: {type(err).__name__}: {str(err)[:300]}"
            seconds = time.perf_counter() - start
            print(f"# {row.name}: ours {fmt(result.ips)} img/s, reference {fmt(result.ref_ips)} img/s "
                  f"({result.ref_note}); {result.agreement} ({seconds:.0f}s)", flush=True)  # fmt: skip
            results.append(result)
            write_report(args, name, why_not, results, {}, {})  # what is measured so far survives a killed run
        results.sort(key=lambda r: rows.index(r.row))
        if results:
            print_table(results, peak)
            print_profiles(results)
        teacher = {}
        if (not args.rows or any(s in TEACHER_ROW for s in args.rows)) and fits("teacher", TEACHER_ROW):
            teacher = teacher_option(args)
            print(f"\n{TEACHER_ROW}, batch {teacher['batch']}, weights: {teacher['weights']}")
            for label in TEACHER_VARIANTS:
                figures = teacher[label]
                print(
                    f"  {label:<20}{figures['img_per_s']:>10.1f} img/s   codes equal to fp32: "
                    f"{figures['codes_equal_fp32']:.2%}"
                )
        runs = train_runs(args) if args.train_runs else {}
        precision = precision_check(args) if args.precision_check else {}
    if runs:
        print(f"\ntrain.py runs on synthetic shards, {args.train_steps} steps each (steady-state: the last 80% of the "
              "logged train/samples_per_sec, median)")  # fmt: skip
        print(f"{'experiment':<22}{'rc':>8}{'img/s':>10}{'peak GiB':>10}{'wall s':>8}")
        for experiment, figures in runs.items():
            print(
                f"{experiment:<22}{figures['returncode']!s:>8}{fmt(figures.get('img_per_s')):>10}"
                f"{fmt(figures.get('peak_gib'), '.2f'):>10}{figures['wall_s']:>8.0f}"
            )
    if precision:
        print_precision_check(precision)
    write_report(args, name, why_not, results, teacher, runs, precision)
    failed = [r.row.name for r in results if r.ips is None or r.agreement.startswith("FAILED")]
    failed += [f"{r.row.name} (graph != eager ids)" for r in results if r.extra.get("cuda_graph_same_ids") is False]
    failed += [e for e, f in runs.items() if f["returncode"] != 0]
    failed += [f"precision check ({precision['error']})"] if "error" in precision else []
    if Env.skipped:
        print(f"# SKIPPED (--budget-s): {', '.join(Env.skipped)}", flush=True)
    if failed:
        print(f"# FAILED: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
