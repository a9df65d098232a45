"""Generate images for evaluation (or reconstruct a validation set), configured by Hydra (conf/sample.yaml).

    python sample.py ckpt_path=outputs/rar_b/runs/<time>/checkpoints/last.ckpt      # a generator trained here (EMA)
    python sample.py generator=rar_xl metrics.reference=VIRTUAL_imagenet256_labeled.npz  # official weights
    python sample.py generator=maskgen_vq_l prompts_file=captions.txt num_per_class=4     # text-to-image
    python sample.py ckpt_path=... trainer.devices=8 trainer.strategy=ddp             # multi-GPU (DDP)
    python sample.py mode=reconstruct tokenizer=titok_b64 "data.val_shards='/data/in1k/val-{0000..0009}.tar'"

Generation follows the reference's protocol: ``num_per_class`` images of every class (50 x 1000 = 50,000 for
ImageNet; image ``i`` has class ``i % num_classes``), or of every prompt of ``prompts_file`` for MaskGen. Images are
written as ``<output_dir>/images/<i:06d>.png`` in chunks of ``batch_size``; chunk ``c`` is drawn from seed
``(seed, c)``, so the result depends neither on the number of devices nor on interruptions: a rerun with the same
settings (the class / prompt of every image included) skips the chunks already written. Then
``<output_dir>/samples.npz`` (``arr_0``: uint8 [N, H, W, 3], the sample batch of OpenAI's ADM evaluator) and the
metrics: FID / Inception Score (and precision / recall when real images are available) from torch-fidelity's
InceptionV3 against ``metrics.reference`` (ADM reference batch with ``mu``/``sigma`` and optionally ``arr_0``
images, or an .npz / folder of real images), saved to ``metrics.json``.
The evaluator that produced each number is printed; published ImageNet numbers come from the ADM evaluator.

``mode=reconstruct`` encodes and decodes ``data.val_shards`` with a tokenizer and reports rFID, Inception Score and
codebook usage / entropy (VQ), all ranks combined, printed and saved to ``reconstruction_metrics.json`` in
``output_dir`` (default: this run's Hydra folder).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import numpy as np
import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from titok_lightning.cli import CONFIG_ERRORS, errors_in_one_line, restore_user_full_error, run_cli
from titok_lightning.convert import CheckpointMismatchError
from titok_lightning.frozen_tokenizer import FrozenTokenizer, load_frozen_tokenizer
from titok_lightning.lit.generator import check_sampling, check_token_space, generate_images
from titok_lightning.lit.tokenizer import batch_captions, resolve_class_names
from titok_lightning.loading import (
    TOKENIZER_WEIGHTS_KEY,
    PretrainedNotAvailableError,
    checkpoint_global_step,
    load_pretrained,
    load_trained,
    plain,
    torch_load,
    weights_fingerprint,
)
from titok_lightning.metrics import (
    FeatureExtractor,
    FeatureStatistics,
    exact_float32,
    frechet_distance,
    images_to_uint8,
    inception_score,
    load_adm_reference_statistics,
    save_npz_for_adm,
)
from titok_lightning.models.maskgen import MaskGenKL, MaskGenVQ
from titok_lightning.models.maskgit import MaskGITGenerator
from titok_lightning.models.rar import RAR
from titok_lightning.sampling import GraphCache
from titok_lightning.text_encoder import CLIPTextEncoder, PretrainedTextEncoderUnavailableError

log = logging.getLogger("sample")
GENERATORS = (MaskGITGenerator, RAR, MaskGenVQ, MaskGenKL)

# official generator -> the tokenizer whose tokens it models
OFFICIAL_TOKENIZERS = {
    "maskgit_titok_l32": "titok_l32",
    "maskgit_titok_b64": "titok_b64",
    "maskgit_titok_s128": "titok_s128",
    **{f"rar_{size}": "maskgit_vqgan_f16_256" for size in ("b", "l", "xl", "xxl")},
    "maskgen_vq_l": "tatitok_bl128_vq",
    "maskgen_vq_xl": "tatitok_bl128_vq",
    "maskgen_kl_l": "tatitok_bl32_vae",
    "maskgen_kl_xl": "tatitok_bl32_vae",
}
CHUNK_SEED_STRIDE = 1_000_003


# ----------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------


def check_generator_checkpoint(path: str) -> str | None:
    """A one-line error for a ``.ckpt`` of this project that holds no generator, in particular a tokenizer's (train.py
    writes both, to paths that look alike); read memory-mapped, without its tensors. Missing files and other formats
    are left to :func:`load_trained`'s own errors. Returns the fingerprint of the tokenizer's weights the generator
    trained with, where the checkpoint records it."""
    if not (os.path.isfile(path) and zipfile.is_zipfile(path)):
        return None
    checkpoint = torch_load(path, mmap=True)
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, Mapping) else None
    hparams = hparams if isinstance(hparams, Mapping) else {}
    if isinstance(hparams.get("generator"), Mapping):
        return checkpoint.get(TOKENIZER_WEIGHTS_KEY)
    if isinstance(hparams.get("tokenizer"), Mapping):
        raise ValueError(
            f"ckpt_path={path} is a tokenizer checkpoint (train.py's tokenizer training), not a generator's: "
            "generation needs ckpt_path=<generator .ckpt of this project> or generator=<official name>; "
            f"to evaluate this tokenizer run sample.py mode=reconstruct tokenizer={path} data.val_shards=<shards>"
        )
    raise ValueError(
        f"ckpt_path={path} is not a generator checkpoint of this project (no hyper_parameters.generator): give the "
        ".ckpt of a generator training run, or generator=<official name / weight file>"
    )


CAPTION_SETTINGS = ("text_encoder", "class_names", "class_prompt")


def trained_caption_settings(path: str) -> dict[str, Any]:
    """The TA-TiTok settings (text encoder, class names, class prompt) that a ``.ckpt`` of this project was trained
    with, read without its tensors; empty for other files."""
    if not (os.path.isfile(path) and zipfile.is_zipfile(path)):
        return {}
    hparams = torch_load(path, mmap=True).get("hyper_parameters") or {}
    return {key: plain(hparams[key]) for key in CAPTION_SETTINGS if key in hparams}


def load_generation_models(cfg: DictConfig) -> tuple[nn.Module, FrozenTokenizer, nn.Module | None, str]:
    """(generator in eval mode, frozen tokenizer, CLIP text encoder or None, a name for the output folder)."""
    if (cfg.ckpt_path is None) == (cfg.generator is None):
        raise ValueError("give exactly one of ckpt_path=<generator .ckpt of this project> or generator=<official name>")
    text_encoder_spec = plain(cfg.text_encoder)
    trained_with = None  # the fingerprint of the tokenizer weights the generator trained with, where recorded
    if cfg.ckpt_path is not None:
        trained_with = check_generator_checkpoint(str(cfg.ckpt_path))
        generator, hparams = load_trained(cfg.ckpt_path, "generator", use_ema=cfg.use_ema)
        tokenizer_source = cfg.tokenizer if cfg.tokenizer is not None else hparams.get("tokenizer")
        text_encoder_spec = hparams.get("text_encoder", text_encoder_spec)
        name = f"{Path(cfg.ckpt_path).stem}"
    else:
        generator = load_pretrained(str(cfg.generator), variant=cfg.generator_variant)
        if not isinstance(generator, GENERATORS):
            raise ValueError(
                f"generator={cfg.generator} holds a model of class {type(generator).__name__}, not a generator "
                f"({', '.join(kind.__name__ for kind in GENERATORS)}): give a generator's weights"
            )
        tokenizer_source = cfg.tokenizer or OFFICIAL_TOKENIZERS.get(str(cfg.generator_variant or cfg.generator))
        name = Path(str(cfg.generator)).stem
    if tokenizer_source is None:
        raise ValueError("which tokenizer decodes this generator's tokens? set tokenizer=<name, file or .ckpt>")
    recorded = plain(tokenizer_source) if cfg.tokenizer is None else None
    if isinstance(recorded, str) and os.path.isabs(recorded) and not os.path.exists(recorded):
        raise FileNotFoundError(
            f"the tokenizer recorded in ckpt_path={cfg.ckpt_path}, {recorded}, does not exist (moved?): give "
            "tokenizer=<its path now>"
        )
    tokenizer = load_frozen_tokenizer(plain(tokenizer_source))
    check_token_space(generator, tokenizer)
    if trained_with is not None and weights_fingerprint(tokenizer) != trained_with:
        changed = (
            f"the tokenizer {tokenizer_source} has other weights than the generator of ckpt_path={cfg.ckpt_path} "
            "was trained with (recorded in the checkpoint; a tokenizer run continued into the same file?)"
        )
        if cfg.tokenizer is None:
            raise ValueError(
                f"{changed}: its codes are not the generator's. Give tokenizer=<the tokenizer it was trained with>, "
                f"or tokenizer={tokenizer_source} to decode with this one anyway"
            )
        log.warning("%s; decoding with it as asked", changed)
    text_encoder = None
    if isinstance(generator, (MaskGenVQ, MaskGenKL)):
        text_encoder = CLIPTextEncoder(**text_encoder_spec)
    return generator.eval().requires_grad_(False), tokenizer, text_encoder, name


# ----------------------------------------------------------------------------------------------------------
# Generation: chunks of the index range, one seed per chunk
# ----------------------------------------------------------------------------------------------------------


def sample_conditions(cfg: DictConfig, generator: nn.Module) -> list[int] | list[str]:
    """The condition of every image index: class ``i % num_classes`` or prompt ``i % num_prompts``."""
    if isinstance(generator, (MaskGITGenerator, RAR)):
        num_classes = cfg.num_classes or generator.num_classes
        if num_classes > generator.num_classes:  # check_numbers has refused num_classes < 1
            raise ValueError(f"num_classes={num_classes}, the generator has {generator.num_classes} classes")
        return list(range(num_classes)) * cfg.num_per_class
    if cfg.prompts_file is None:
        raise ValueError("text-to-image generators need prompts_file=<text file, one prompt per line>")
    with open(cfg.prompts_file, encoding="utf-8") as file:
        prompts = [line.strip() for line in file if line.strip()]
    if not prompts:
        raise ValueError(f"{cfg.prompts_file} holds no prompts")
    return prompts * cfg.num_per_class


def conditions_identity(conditions: Sequence[int | str]) -> str:
    """The conditions of a run for ``sample_config.json``: how many distinct classes / prompts, and a hash of the
    condition of every image index (class ids, or the prompts' text), so that a rerun with other classes or edited
    prompts (the same number of images) does not resume into, or report, the old images."""
    kind = "prompts" if any(isinstance(c, str) for c in conditions) else "classes"
    digest = hashlib.sha256(json.dumps(list(conditions), ensure_ascii=False).encode("utf-8")).hexdigest()[:16]
    return f"{len(dict.fromkeys(conditions))} {kind} for {len(conditions)} images, sha256 {digest}"


def image_path(folder: Path, index: int) -> Path:
    return folder / f"{index:06d}.png"


class Chunks(Dataset):
    """Chunks ``(chunk index, first image index, conditions)`` whose images are not all written yet."""

    def __init__(self, conditions: Sequence[int | str], batch_size: int, folder: Path):
        self.items = []
        for chunk, start in enumerate(range(0, len(conditions), batch_size)):
            end = min(start + batch_size, len(conditions))
            if not all(image_path(folder, i).is_file() for i in range(start, end)):
                self.items.append((chunk, start, list(conditions[start:end])))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]


class GenerationModule(L.LightningModule):
    """Predict loop body: generate one chunk with its own seed and write its PNGs (atomically)."""

    def __init__(
        self,
        generator: nn.Module,
        tokenizer: FrozenTokenizer,
        text_encoder: nn.Module | None,
        folder: Path,
        seed: int,
        sampling: Mapping[str, Any],
        aesthetic_score: float | None,
    ):
        super().__init__()
        self.generator, self.tokenizer, self.text_encoder = generator, tokenizer, text_encoder
        self.folder, self.seed, self.sampling, self.aesthetic_score = folder, seed, dict(sampling), aesthetic_score
        self.graphs = GraphCache()  # the sampler's CUDA graphs, captured in the first chunk and replayed after

    def predict_step(self, item, batch_idx: int) -> None:
        chunk, start, conditions = item
        if isinstance(conditions[0], str):
            condition = conditions
        else:
            condition = torch.tensor(conditions, dtype=torch.long, device=self.device)
        images = generate_images(
            self.generator,
            self.tokenizer,
            condition,
            text_encoder=self.text_encoder,
            aesthetic_score=self.aesthetic_score,
            sampling=self.sampling,
            seed=self.seed * CHUNK_SEED_STRIDE + chunk,
            graphs=self.graphs,
        )
        pixels = images_to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()
        for offset, array in enumerate(pixels):
            path = image_path(self.folder, start + offset)
            partial = path.with_suffix(".png.partial")
            Image.fromarray(array).save(partial, format="PNG")
            os.replace(partial, path)  # a killed run never leaves a truncated image that resuming would keep


def read_images(folder: Path, count: int) -> np.ndarray:
    """uint8 [count, H, W, 3] from ``<folder>/<i:06d>.png``; a clear error names missing files."""
    missing = [i for i in range(count) if not image_path(folder, i).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {count} images are missing in {folder} (e.g. {missing[:5]})")
    return np.stack([np.asarray(Image.open(image_path(folder, i)).convert("RGB")) for i in range(count)])


def check_output_identity(output_dir: Path, identity: dict[str, Any], overwrite: bool = False) -> None:
    """Refuse to resume into a folder written by other settings or another model (its images would be mixed into,
    or reported for, this one); with ``overwrite`` empty the folder instead and start afresh."""
    marker = output_dir / "sample_config.json"
    if marker.is_file():
        previous = json.loads(marker.read_text())
        if previous != identity:
            changed = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
            if not overwrite:
                detail = ""
                if "weights" not in previous:
                    detail = " (the folder predates weight fingerprints)"
                elif "weights" in changed:
                    steps = previous.get("checkpoint_step"), identity.get("checkpoint_step")
                    detail = f" (the generator's weights changed; checkpoint step {steps[0]} -> {steps[1]})"
                elif "tokenizer_weights" in changed:
                    detail = " (the tokenizer's weights changed)"
                elif "conditions" not in previous:
                    detail = " (the folder predates condition records)"
                elif "conditions" in changed:
                    detail = f" (conditions: {previous['conditions']} -> {identity['conditions']})"
                raise ValueError(
                    f"{output_dir} holds samples made with other settings or another model: {', '.join(changed)} "
                    f"differ{detail}; pass overwrite=true to regenerate them, or choose another output_dir"
                )
            print(f"overwrite=true: {', '.join(changed)} changed; removing the old samples of {output_dir}")
            for name in ("images", "samples.npz", "metrics.json", "sample_config.json"):
                path = output_dir / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    if not marker.is_file():
        output_dir.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(identity, indent=1))


def check_numbers(cfg: DictConfig) -> None:
    """One-line errors for counts that would otherwise fail deep inside (or silently mean something else)."""
    for key in ("num_per_class", "batch_size"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ValueError(f"{key} must be a positive integer, got {cfg[key]!r}")
    if cfg.num_classes is not None and (not isinstance(cfg.num_classes, int) or cfg.num_classes < 1):
        raise ValueError(f"num_classes must be a positive integer or null (all classes), got {cfg.num_classes!r}")


# ----------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def extract_features(
    extractor: FeatureExtractor, images: np.ndarray, batch_size: int = 250, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [N, H, W, 3] -> (features [N, D] float64, logits [N, C]) in batches, in exact float32 (no TF32,
    no autocast; as ``metrics.ImageMetricAccumulator``: reported figures do not depend on matmul settings)."""
    features, logits = [], []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(images[start : start + batch_size]).permute(0, 3, 1, 2)
        with exact_float32():
            batch_features, batch_logits = extractor(batch.to(device) if device is not None else batch)
        features.append(batch_features.double().cpu())
        logits.append(batch_logits.float().cpu())
    return torch.cat(features), torch.cat(logits)


def load_reference(path: str | os.PathLike) -> tuple[tuple[np.ndarray, np.ndarray] | None, np.ndarray | None]:
    """``(mu, sigma)`` and/or real images uint8 [M, H, W, 3] from an ADM reference batch, an .npz of images
    (``arr_0``) or a folder of images (sub-folders included, e.g. ImageNet's class folders)."""
    path = Path(path)
    if path.is_dir():
        from datamodules.transforms import image_files_under, to_rgb

        files = image_files_under(path)
        if not files:
            raise FileNotFoundError(f"no images in the reference folder {path} or its sub-folders")

        images = []
        for file in files:
            with Image.open(file) as image:
                images.append(np.asarray(to_rgb(image)))  # 16-bit / transparent images converted, not clipped
            if images[-1].shape != images[0].shape:
                raise ValueError(
                    f"reference image {file} is {images[-1].shape[1]}x{images[-1].shape[0]}, "
                    f"{os.path.basename(files[0])} is {images[0].shape[1]}x{images[0].shape[0]}: resize the reference "
                    "images to one size"
                )
        return None, np.stack(images)
    if not path.is_file():
        raise FileNotFoundError(f"metrics.reference {str(path)!r} does not exist")
    with np.load(path) as data:
        has_statistics = {"mu", "sigma"} <= set(data.files)
        images = data["arr_0"] if "arr_0" in data.files else None
    statistics = load_adm_reference_statistics(path) if has_statistics else None
    if statistics is None and images is None:
        raise KeyError(f"{path} has neither mu/sigma nor arr_0 images")
    return statistics, images


def evaluate_images(
    images: np.ndarray,
    extractor: FeatureExtractor,
    reference_statistics: tuple[np.ndarray, np.ndarray] | None = None,
    reference_images: np.ndarray | None = None,
    is_splits: int = 10,
    prc_neighborhood: int = 3,
    device: torch.device | None = None,
) -> dict[str, float]:
    """FID (against the reference statistics, or those of the reference images), Inception Score, and precision /
    recall (k-NN manifolds of torch-fidelity, on the same features) when reference images are given.

    Args:
        images: generated uint8 [N, H, W, 3].
        extractor: uint8 [B, 3, H, W] -> (features [B, D], logits [B, C]).
    """
    features, logits = extract_features(extractor, images, device=device)
    results: dict[str, float] = {}
    if len(images) >= is_splits:
        results["inception_score"], results["inception_score_std"] = inception_score(logits, splits=is_splits)
    real_features = None
    if reference_images is not None:
        real_features, _ = extract_features(extractor, reference_images, device=device)
        if reference_statistics is None:
            reference_statistics = _moments(real_features)
    if reference_statistics is not None:
        results["fid"] = frechet_distance(*_moments(features), *reference_statistics)
    if real_features is not None:
        from torch_fidelity.metric_prc import calculate_precision_recall_part

        precision, recall = calculate_precision_recall_part(
            features.float(), real_features.float(), neighborhood=prc_neighborhood
        )
        results["precision"], results["recall"] = float(precision), float(recall)
    return results


def _moments(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    statistics = FeatureStatistics()
    statistics.update(features)
    return statistics.mean_and_covariance()


def inception_evaluator(cfg: DictConfig, device: torch.device) -> tuple[FeatureExtractor, str] | None:
    """torch-fidelity's InceptionV3 with the TF-FID weights, or None (with the reason printed) when unavailable."""
    from titok_lightning.metrics import InceptionWeightsUnavailableError, load_inception_extractor

    try:
        extractor = load_inception_extractor(cfg.metrics.inception_weights_path, dtype=cfg.metrics.inception_dtype)
    except InceptionWeightsUnavailableError as error:
        if cfg.metrics.inception_weights_path is not None:  # a file the user named: a mistake, not a missing cache
            raise ValueError(f"metrics.inception_weights_path: {error}") from None
        print(f"metrics skipped: {error}")
        return None
    description = (
        f"torch-fidelity InceptionV3 (TF-FID weights, {cfg.metrics.inception_dtype} internals, float64 statistics); "
        "published ImageNet numbers use OpenAI's ADM evaluator on samples.npz"
    )
    return extractor.to(device).eval(), description


def report_metrics(
    cfg: DictConfig,
    images: np.ndarray,
    output_dir: Path,
    evaluator: tuple[FeatureExtractor, str] | None,
    device: torch.device,
) -> dict[str, Any]:
    """Compute, print and save (``metrics.json``) the metrics of the generated images."""
    if evaluator is None:
        return {}
    extractor, description = evaluator
    statistics, reference_images = (None, None)
    if cfg.metrics.reference is not None:
        statistics, reference_images = load_reference(cfg.metrics.reference)
    else:
        print("no metrics.reference: Inception Score only (FID / precision / recall need real statistics or images)")
    results = evaluate_images(
        images,
        extractor,
        statistics,
        reference_images,
        is_splits=cfg.metrics.is_splits,
        prc_neighborhood=cfg.metrics.prc_neighborhood,
        device=device,
    )
    record = {**results, "num_images": len(images), "evaluator": description, "reference": cfg.metrics.reference}
    (output_dir / "metrics.json").write_text(json.dumps(record, indent=1))
    print(f"evaluator: {description}")
    for key, value in results.items():
        print(f"  {key}: {value:.4f}")
    return record


# ----------------------------------------------------------------------------------------------------------
# Reconstruction mode
# ----------------------------------------------------------------------------------------------------------


class ReconstructionModule(L.LightningModule):
    """Validation loop body: encode/decode a batch; ``callbacks.ReconstructionMetricsCallback`` does the metrics."""

    def __init__(
        self,
        tokenizer: FrozenTokenizer,
        text_encoder: nn.Module | None = None,
        class_names: list[str] | None = None,
        class_prompt: str = "",
    ):
        super().__init__()
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.class_names, self.class_prompt = class_names, class_prompt

    def captions(self, batch: Mapping[str, Any]) -> list[str]:
        return batch_captions(batch, self.class_names, self.class_prompt)

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, Any]:
        images = batch["image"]
        guidance = None
        if self.tokenizer.needs_text:
            from titok_lightning.lit.generator import encode_captions

            guidance = encode_captions(self.text_encoder, self.captions(batch)).guidance[:-1]
        reconstructions, tokens = self.tokenizer.reconstruct(images, guidance)
        # the reference evaluator scores reconstructions rounded to 8-bit levels
        outputs = {"inputs": images, "reconstructions": torch.round(reconstructions * 255.0) / 255.0}
        if self.tokenizer.kind == "vq":
            outputs["codes"], outputs["codebook_size"] = tokens, self.tokenizer.codebook_size
        return outputs


def reconstruct(cfg: DictConfig, feature_extractor: FeatureExtractor | None = None) -> dict[str, float]:
    """Reconstruction metrics of ``cfg.tokenizer`` on ``cfg.data.val_shards``."""
    from callbacks import ReconstructionMetricsCallback
    from callbacks.skipped_samples import counts_over_ranks
    from datamodules import ImageDataModule

    if cfg.tokenizer is None:
        raise ValueError("mode=reconstruct needs tokenizer=<name, file or .ckpt>")
    if not cfg.data.val_shards:
        raise ValueError("mode=reconstruct needs data.val_shards=<the held-out images' shards>")
    tokenizer = load_frozen_tokenizer(plain(cfg.tokenizer), use_ema=cfg.use_ema)
    if tokenizer.needs_text:  # a TA-TiTok trained here decodes with the text encoder and captions of its run
        trained = trained_caption_settings(str(cfg.tokenizer))
        module = ReconstructionModule(
            tokenizer,
            CLIPTextEncoder(**trained.get("text_encoder", plain(cfg.text_encoder))),
            resolve_class_names(trained.get("class_names", "imagenet")),
            trained.get("class_prompt", cfg.data.class_prompt),
        )
    else:
        module = ReconstructionModule(tokenizer)
    datamodule = ImageDataModule(
        val_shards=cfg.data.val_shards,
        image_size=cfg.data.image_size or tokenizer.image_size,
        label_key=cfg.data.label_key,
        batch_size=cfg.batch_size,
        num_workers=cfg.data.num_workers,
    )
    # the evaluator is loaded here (not by the callback) to name it, or why there is none, with the results
    evaluator, no_inception = None, None
    if feature_extractor is not None:
        evaluator = "injected feature extractor (not comparable with published numbers)"
    elif cfg.metrics.enabled:
        from titok_lightning.metrics import InceptionWeightsUnavailableError, load_inception_extractor

        try:
            feature_extractor = load_inception_extractor(
                cfg.metrics.inception_weights_path, dtype=cfg.metrics.inception_dtype
            )
            evaluator = f"torch-fidelity InceptionV3 (TF-FID weights, {cfg.metrics.inception_dtype} internals)"
        except InceptionWeightsUnavailableError as error:
            if cfg.metrics.inception_weights_path is not None:  # a file the user named: a mistake
                raise ValueError(f"metrics.inception_weights_path: {error}") from None
            no_inception = str(error)
    else:
        no_inception = "metrics.enabled=false"
    metrics = ReconstructionMetricsCallback(
        feature_extractor=feature_extractor,
        compute_fid=feature_extractor is not None,
        compute_is=feature_extractor is not None,
        inception_weights_path=cfg.metrics.inception_weights_path,
        inception_dtype=cfg.metrics.inception_dtype,
        is_splits=cfg.metrics.is_splits,
        prefix="reconstruction",
    )
    trainer = L.Trainer(**plain(cfg.trainer), callbacks=[metrics], logger=False, enable_checkpointing=False)
    trainer.validate(module, datamodule=datamodule, verbose=False)
    results = dict(metrics.last_metrics)
    # unreadable validation images are skipped: say how many, or the metrics would silently cover fewer images
    skipped = counts_over_ranks(trainer, datamodule.skip_counter)
    if trainer.is_global_zero and skipped.sum():
        from datamodules.shards import skip_summary

        print(f"reconstruction data: {skip_summary(skipped, datamodule.skip_counter.sources)}")
    if trainer.is_global_zero:
        inception_ran = bool({"rfid", "inception_score"} & set(results))
        if inception_ran:
            print(f"reconstruction of {cfg.data.val_shards} with {cfg.tokenizer} (evaluator: {evaluator})")
        else:
            no_inception = no_inception or "fewer than 2 validation images"
            print(f"reconstruction of {cfg.data.val_shards} with {cfg.tokenizer}")
            print(f"no Inception metrics (rFID, Inception Score): {no_inception}")
        for key, value in results.items():
            print(f"  {key}: {value:.4f}")
        output_dir = Path(cfg.output_dir if cfg.output_dir is not None else cfg.paths.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        record = {
            **results,
            "evaluator": evaluator if inception_ran else None,
            "no_inception_metrics": None if inception_ran else no_inception,
            "tokenizer": str(cfg.tokenizer),
            "val_shards": plain(cfg.data.val_shards),
            "skipped_images": int(skipped.sum()),
        }
        path = output_dir / "reconstruction_metrics.json"
        path.write_text(json.dumps(record, indent=1))
        print(f"wrote {path}")
    return results


# ----------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------


def default_output_dir(cfg: DictConfig, name: str) -> Path:
    """Next to the training run for a checkpoint (``<run>/samples/<ckpt>-seed<s>``), else under outputs/."""
    if cfg.ckpt_path is not None:
        run = Path(cfg.ckpt_path).resolve().parent
        run = run.parent if run.name == "checkpoints" else run
        return run / "samples" / f"{name}-seed{cfg.seed}"
    return Path(cfg.paths.log_dir) / "samples" / f"{name}-seed{cfg.seed}"


def source_identity(cfg: DictConfig) -> str:
    """The generator's source for ``sample_config.json``: a local file by its absolute path, so that a rerun from
    another folder or with another spelling of the path resumes its images."""
    source = str(cfg.ckpt_path or cfg.generator)
    return str(Path(source).resolve()) if os.path.exists(source) else source


def checkpoint_step(ckpt_path: str | None) -> int | None:
    """The training step recorded in a Lightning checkpoint (for messages), None for other weight sources."""
    return None if ckpt_path is None else checkpoint_global_step(ckpt_path)


def generate(cfg: DictConfig, feature_extractor: FeatureExtractor | None = None) -> dict[str, Any]:
    """Generate every missing image, then (rank 0) write the npz and the metrics. Returns the metrics record."""
    generator, tokenizer, text_encoder, name = load_generation_models(cfg)
    conditions = sample_conditions(cfg, generator)
    sampling = plain(cfg.sampling) or {}
    check_sampling(generator, sampling, "sampling")  # before any image: a typo would fail at the first chunk
    output_dir = Path(cfg.output_dir) if cfg.output_dir is not None else default_output_dir(cfg, name)
    folder = output_dir / "images"
    trainer = L.Trainer(**plain(cfg.trainer), logger=False, enable_checkpointing=False)
    if trainer.is_global_zero:
        identity = {
            "source": source_identity(cfg),
            "seed": cfg.seed,
            "batch_size": cfg.batch_size,
            "sampling": sampling,
            "aesthetic_score": cfg.aesthetic_score,
            "num_images": len(conditions),
            # which class / prompt each image index has: num_classes, num_per_class, the prompts' text
            "conditions": conditions_identity(conditions),
            "use_ema": cfg.use_ema,
            # the numerics change the images too (bf16, TF32 matmuls): a resume must not mix two of them
            "precision": str(cfg.trainer.precision),
            "float32_matmul_precision": cfg.get("float32_matmul_precision"),
            # a checkpoint at the same path trained further, or its tokenizer's, must not reuse the old images
            "weights": weights_fingerprint(generator),
            "tokenizer_weights": weights_fingerprint(tokenizer),
            "checkpoint_step": checkpoint_step(cfg.ckpt_path),
        }
        check_output_identity(output_dir, identity, overwrite=cfg.overwrite)
        folder.mkdir(parents=True, exist_ok=True)
    trainer.strategy.barrier()
    chunks = Chunks(conditions, cfg.batch_size, folder)
    total_chunks = math.ceil(len(conditions) / cfg.batch_size)
    if trainer.is_global_zero:
        print(f"{len(conditions)} images in {total_chunks} chunks; {len(chunks)} to generate into {folder}")
    evaluator = None  # before any image: a wrong weights file or reference is not found after hours of sampling
    if trainer.is_global_zero and cfg.metrics.enabled:
        if cfg.metrics.reference is not None and not os.path.exists(str(cfg.metrics.reference)):
            raise FileNotFoundError(f"metrics.reference={cfg.metrics.reference} does not exist")
        if feature_extractor is not None:
            evaluator = (feature_extractor, "injected feature extractor (not comparable with published numbers)")
        else:
            evaluator = inception_evaluator(cfg, trainer.strategy.root_device)
    module = GenerationModule(generator, tokenizer, text_encoder, folder, cfg.seed, sampling, cfg.aesthetic_score)
    if len(chunks):
        loader = DataLoader(chunks, batch_size=1, collate_fn=lambda items: items[0])
        trainer.predict(module, dataloaders=loader, return_predictions=False)
    trainer.strategy.barrier()
    if not trainer.is_global_zero:
        return {}
    images = read_images(folder, len(conditions))
    if cfg.save_npz:
        save_npz_for_adm(output_dir / "samples.npz", images)
        print(f"wrote {output_dir / 'samples.npz'} (arr_0: uint8 {list(images.shape)})")
    if not cfg.metrics.enabled:
        return {}
    return report_metrics(cfg, images, output_dir, evaluator, trainer.strategy.root_device)


def run(cfg: DictConfig, feature_extractor: FeatureExtractor | None = None) -> dict[str, Any]:
    missing = sorted(key for key in OmegaConf.missing_keys(cfg) if not key.startswith("hydra"))
    if missing:
        raise ValueError(f"mandatory settings are not set: {', '.join(missing)}")
    L.seed_everything(cfg.seed, workers=True)
    if cfg.get("float32_matmul_precision"):
        torch.set_float32_matmul_precision(cfg.float32_matmul_precision)
    if cfg.mode not in ("generate", "reconstruct"):
        raise ValueError(f"mode must be generate or reconstruct, got {cfg.mode!r}")
    check_numbers(cfg)
    with torch.no_grad():
        return (reconstruct if cfg.mode == "reconstruct" else generate)(cfg, feature_extractor)


def exit_on_sigterm() -> None:
    """SIGTERM (``scancel``, preemption, ``timeout``) ends the run at once with 143. Lightning's predict loop only
    notes the signal; every image is renamed into place when complete, and the same command resumes."""

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


# Errors in what the user typed or configured: one line on stderr (HYDRA_FULL_ERROR=1: the whole traceback).
USER_ERRORS = (
    *CONFIG_ERRORS,
    ValueError,
    FileNotFoundError,
    PretrainedNotAvailableError,
    PretrainedTextEncoderUnavailableError,
    CheckpointMismatchError,
)

# conf/ also holds train.py's config groups, which sample.py composes none of (its data and trainer are settings)
TRAIN_GROUPS = ("callbacks", "data", "debug", "experiment", "logger", "model", "trainer")


def refuse_train_groups(args: Sequence[str]) -> None:
    """A train.py group choice (``model=demo_generator``, ``+experiment=rar_b``, ``trainer=ddp``) in one line; Hydra
    would ask for ``+model=...``, which adds a node that sample.py never reads."""
    for arg in args:
        key, equals, value = arg.partition("=")
        if equals and key.lstrip("+~") in TRAIN_GROUPS:
            sys.exit(
                f"sample.py: error: {arg}: {key.lstrip('+~')} is a config group of train.py, not of sample.py. The "
                "generator is ckpt_path=<.ckpt of a run> or generator=<registry name, file or HF repo>; data and "
                "trainer are settings here (data.val_shards=..., trainer.devices=...); python sample.py --help "
                "lists them all"
            )


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    restore_user_full_error()
    exit_on_sigterm()
    with errors_in_one_line("sample.py", USER_ERRORS):
        run(cfg)


if __name__ == "__main__":
    refuse_train_groups(sys.argv[1:])
    run_cli(main, "sample.py")
