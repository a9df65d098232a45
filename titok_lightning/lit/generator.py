"""LightningModules that train the token generators (thin: a registry generator, a frozen tokenizer, a loss).

- :class:`MaskGITModule`: ImageBert / UViTBert, masked-token modelling (arccos masking, label dropout, MLM loss
  with label smoothing and a small weight on the unmasked tokens).
- :class:`RARModule`: RAR, next-token loss on a per-sample permuted order whose probability is annealed from 1
  to 0 with ``trainer.global_step``.
- :class:`MaskGenVQModule`: MaskGen-VQ, text-conditioned masked-token modelling; text features come from a frozen
  CLIP (penultimate-layer tokens + pooled projection), replaced by the empty caption's with ``text_drop_prob``;
  aesthetic-score micro-conditioning.
- :class:`MaskGenKLModule`: MaskGen-KL, per-token diffusion loss on VAE latents (posterior sample times the
  generator's ``scale_factor``).

Batches hold either pre-tokenized ``"tokens"`` (see ``datamodules.TokenDataModule``) or ``"image"`` (tokenized on
the fly by the frozen tokenizer: eval mode, no grad, fp32, not optimized, not averaged by EMA, not saved), plus
``"class_id"`` or ``"text"`` (and ``"aesthetic_score"`` for micro-conditioned MaskGen).

``self.model`` is the generator (what EMA averages and what checkpoints' ``model.*`` hold). Every
``sample_grid.every_n_steps`` optimizer steps (and at the end of training) rank 0 generates a grid for the
configured class ids / prompts with the EMA weights (in the trainer's precision) and writes it to
``<log dir>/images/generated_step_*.png`` and to image-capable loggers. :func:`generate_images` is the same
generation path, used by ``sample.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from torchvision.utils import make_grid, save_image

from titok_lightning.frozen_tokenizer import FrozenTokenizer, TokenizerSource, load_frozen_tokenizer
from titok_lightning.lit.base import TrainingModule, samples_in
from titok_lightning.loading import (
    TOKENIZER_WEIGHTS_KEY,
    build_model,
    has_random_weights,
    load_weights,
    plain,
    weights_fingerprint,
)
from titok_lightning.losses import ARLoss, MLMLoss
from titok_lightning.metrics import images_to_uint8
from titok_lightning.models.maskgen import MaskGenKL, MaskGenVQ
from titok_lightning.models.maskgit import MaskGITGenerator
from titok_lightning.models.rar import RAR
from titok_lightning.sampling import GraphCache
from titok_lightning.text_encoder import CLIPTextEncoder, TextFeatures

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# Frozen CLIP text conditions
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_captions(text_encoder: CLIPTextEncoder, captions: Sequence[str]) -> TextFeatures:
    """CLIP features of ``captions`` followed by those of the empty caption (the dropped / unconditional text),
    in fp32 outside autocast."""
    device = text_encoder.positional_embedding.device
    with torch.autocast(device.type, enabled=False):
        return text_encoder(list(captions) + [""])


# ----------------------------------------------------------------------------------------------------------
# Generation (training grids and sample.py)
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_images(
    generator: nn.Module,
    tokenizer: FrozenTokenizer,
    condition: torch.Tensor | Sequence[str],
    *,
    text_encoder: CLIPTextEncoder | None = None,
    aesthetic_score: float | torch.Tensor | None = None,
    sampling: Mapping[str, Any] | None = None,
    seed: int | torch.Generator | None = None,
    progress: bool = False,
    graphs: GraphCache | None = None,
) -> torch.Tensor:
    """Generate and decode images with the generator's sampler.

    Args:
        generator: a MaskGIT generator, RAR, MaskGen-VQ or MaskGen-KL (in eval mode).
        tokenizer: the frozen tokenizer whose tokens the generator models.
        condition: class ids long [B] (MaskGIT, RAR) or B captions (MaskGen).
        text_encoder: the frozen CLIP (MaskGen only).
        aesthetic_score: micro-condition (MaskGen; default the generator's ``sample_aesthetic_score``).
        sampling: sampler settings overriding the generator's defaults (e.g. ``guidance_scale``, ``num_steps``).
        seed: int seed or ``torch.Generator`` on the generator's device (reproducible samples).
        graphs: the MaskGIT / RAR sampler's CUDA graphs, kept for the next call (sample.py's batches).
    Returns:
        images float [B, 3, H, W] in [0, 1].
    """
    sampling = dict(sampling or {})
    if isinstance(generator, (MaskGITGenerator, RAR)):
        if not isinstance(condition, torch.Tensor):
            raise TypeError(f"{type(generator).__name__} is class-conditional: pass class ids [B]")
        tokens = generator.generate(condition, generator=seed, progress=progress, graphs=graphs, **sampling)
        return tokenizer.decode(tokens)
    if isinstance(generator, (MaskGenVQ, MaskGenKL)):
        if text_encoder is None or isinstance(condition, torch.Tensor):
            raise TypeError("MaskGen generators are text-conditional: pass captions and the CLIP text encoder")
        features = encode_captions(text_encoder, condition)
        text, text_pooled, guidance = (f[:-1] for f in features)
        null, null_pooled, _ = (f[-1:] for f in features)
        tokens = generator.generate(
            text,
            text_pooled,
            null,
            null_pooled,
            aesthetic_score=aesthetic_score,
            generator=seed,
            progress=progress,
            **sampling,
        )
        return tokenizer.decode(tokens, guidance if tokenizer.needs_text else None)
    raise TypeError(f"unsupported generator {type(generator).__name__}")


def log_image_grid(trainer, grid: torch.Tensor, name: str, tag: str) -> Path:
    """Write ``grid`` [3, H, W] in [0, 1] to ``<log dir>/images/<name>.png`` and to image-capable loggers (rank 0;
    call it on every rank: ``trainer.log_dir`` is a broadcast from rank 0)."""
    folder = Path(trainer.log_dir or trainer.default_root_dir) / "images"
    path = folder / f"{name}.png"
    if not trainer.is_global_zero:
        return path
    folder.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(tag, grid, global_step=trainer.global_step)
        elif isinstance(logger, WandbLogger):
            image = images_to_uint8(grid).permute(1, 2, 0).cpu().numpy()
            logger.log_image(key=tag, images=[image], step=trainer.global_step)
    return path


# ----------------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------------


class GeneratorModule(TrainingModule):
    """Shared part of the generator modules: model, frozen tokenizer, token fetching, sample grids.

    Args:
        generator: registry spec ``{"name": "rar_b", **overrides}``. Token-space arguments left ``null``
            (``codebook_size``, ``image_seq_len`` / ``num_tokens``, ``token_size``) are taken from the tokenizer;
            given ones must agree with it.
        tokenizer: the frozen tokenizer (see :func:`~titok_lightning.frozen_tokenizer.load_frozen_tokenizer`):
            needed for image batches and sample grids; ``None`` trains on tokens without grids.
        init_from: initial generator weights (MaskGen stage 2: the stage-1 result), a ``.ckpt`` or official file.
        sampling: sampler settings of the grids (override the generator's defaults).
        sample_grid: ``{every_n_steps, class_ids | prompts, images_per_condition, seed}``; ``every_n_steps``
            null or 0 disables the grids.
        optimizer, scheduler, training: :class:`TrainingModule`'s arguments (``training``: max_grad_norm,
            accumulate_grad_batches, nonfinite, compile_modules, ...; conf/model/training/default.yaml).
    """

    # generator constructor argument -> FrozenTokenizer attribute it must equal
    TOKEN_SPACE: Mapping[str, str] = {}

    def __init__(
        self,
        generator: Mapping[str, Any],
        optimizer: Mapping[str, Any],
        scheduler: Mapping[str, Any],
        tokenizer: TokenizerSource | None = None,
        init_from: str | None = None,
        sampling: Mapping[str, Any] | None = None,
        sample_grid: Mapping[str, Any] | None = None,
        **training: Any,
    ):
        super().__init__(plain(optimizer), plain(scheduler), **plain(training))
        tokenizer = _absolute_paths(plain(tokenizer))
        self.save_hyperparameters(logger=False)
        self.tokenizer = load_frozen_tokenizer(tokenizer) if tokenizer is not None else None
        spec = self._complete_token_space(dict(plain(generator)))
        # sample.py rebuilds the generator from the checkpoint: keep the completed spec and absolute paths
        self.hparams.generator, self.hparams.tokenizer = spec, tokenizer
        self.model = build_model(spec)
        if self.tokenizer is not None:
            self.freeze("tokenizer")
        if init_from is not None:
            load_weights(self.model, init_from)
        self.sampling = dict(plain(sampling) or {})
        self.sample_grid = dict(plain(sample_grid) or {})
        check_sampling(self.model, self.sampling, "model.sampling")  # else the grids fail at their first step
        self._check_sample_grid()

    # ------------------------------------------------------------------------------- the tokenizer's record
    @functools.cached_property
    def tokenizer_weights(self) -> str:
        """Fingerprint of the frozen tokenizer's weights (frozen: computed once)."""
        return weights_fingerprint(self.tokenizer)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.tokenizer is not None and not has_random_weights(self.hparams.tokenizer):
            # the tokenizer is saved as its source only, and a source can change (a tokenizer run continued into
            # the same last.ckpt): its weights' fingerprint tells a later load whether its codes are still these
            checkpoint[TOKENIZER_WEIGHTS_KEY] = self.tokenizer_weights

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a tokenizer source whose weights changed since the checkpoint was written (its codes are not the
        ones the generator learned); a tokenizer given instead of the recorded source is the caller's choice: warn."""
        super().on_load_checkpoint(checkpoint)
        recorded = checkpoint.get(TOKENIZER_WEIGHTS_KEY)
        if recorded is None or self.tokenizer is None or recorded == self.tokenizer_weights:
            return
        message = (
            f"the tokenizer {self.hparams.tokenizer} is not the one this generator checkpoint was trained with: its "
            "weights differ from those recorded in the checkpoint (a tokenizer run continued into the same file?), "
            "so its codes are not the ones the generator learned"
        )
        if (checkpoint.get("hyper_parameters") or {}).get("tokenizer") == self.hparams.tokenizer:
            raise TokenizerChangedError(f"{message}; point model.tokenizer at the tokenizer it was trained with")
        log.warning("%s; decoding with it as asked", message)

    # ---------------------------------------------------------------------------------------- token space
    def _complete_token_space(self, spec: dict[str, Any]) -> dict[str, Any]:
        if "name" not in spec:
            raise ValueError(f"the generator spec needs the registry variant 'name', got {spec}")
        from titok_lightning.registry import model_kwargs

        defaults = model_kwargs(spec["name"])
        for argument, attribute in self.TOKEN_SPACE.items():
            wanted = spec.get(argument, defaults.get(argument))
            have = None if self.tokenizer is None else getattr(self.tokenizer, attribute)
            if wanted is None and have is None:
                raise ValueError(f"generator.{argument} is null and there is no tokenizer to take it from")
            if wanted is not None and have is not None and wanted != have:
                raise ValueError(
                    f"generator.{argument}={wanted} but the tokenizer has {attribute}={have}: the generator must "
                    "model the tokenizer's tokens (set it to null to take the tokenizer's)"
                )
            spec[argument] = wanted if wanted is not None else have
        return spec

    def batch_tokens(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Pre-tokenized ``batch["tokens"]`` or the frozen tokenizer's tokens of ``batch["image"]``."""
        if "tokens" in batch:
            return batch["tokens"]
        if "image" in batch:
            if self.tokenizer is None:
                raise ValueError("the batch holds images but the module has no tokenizer (set model.tokenizer)")
            return self.tokenizer.encode(batch["image"])
        raise KeyError(f"a generator batch needs 'tokens' or 'image', got {sorted(batch)}")

    def vq_tokens(self, batch: Mapping[str, Any], num_tokens: int) -> torch.Tensor:
        tokens = self.batch_tokens(batch)
        if tokens.is_floating_point():
            raise TypeError("VQ generators need integer token ids (TokenDataModule token_dtype='int64' reads floats)")
        tokens = tokens.reshape(tokens.shape[0], -1).long()
        if tokens.shape[1] != num_tokens:
            raise ValueError(f"the batch has {tokens.shape[1]} tokens per image, the generator models {num_tokens}")
        return tokens

    # ------------------------------------------------------------------------------------ training steps
    def loss_terms(
        self, batch: Mapping[str, Any], generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, logged terms) of one batch; subclasses implement."""
        raise NotImplementedError

    def before_training_step(self) -> dict[str, float]:
        """Step-dependent state (RAR's randomness) set before the forward; returns values to log."""
        return {}

    def micro_step(self, batch: Mapping[str, Any]) -> None:
        extra = self.before_training_step()
        with self.optimizing("model"):
            loss, logs = self.loss_terms(batch)
            self.backward_and_step("model", loss, logs)
        self.log_losses("train", {**logs, **extra}, samples_in(batch), prog_bar=("loss",))

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        # the same masks / orders / label drops at every validation run, so the curve compares like with like
        generator = torch.Generator(self.device).manual_seed(batch_idx)
        _, logs = self.loss_terms(batch, generator)
        self.log_losses("val", logs, samples_in(batch))

    # --------------------------------------------------------------------------------------- sample grids
    def grid_conditions(self) -> torch.Tensor | list[str]:
        """Conditions of one grid row (class ids or prompts); subclasses implement."""
        raise NotImplementedError

    def generate(self, condition: torch.Tensor | list[str], seed: int) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] for ``condition`` with the grid's sampler settings."""
        return generate_images(self.model, self.tokenizer, condition, sampling=self.sampling, seed=seed)

    @torch.no_grad()
    def sample_grid_image(self) -> torch.Tensor:
        """A grid [3, H, W] in [0, 1]: one column per condition, ``images_per_condition`` rows."""
        condition = self.grid_conditions()
        per_condition = int(self.sample_grid.get("images_per_condition", 1))
        if isinstance(condition, torch.Tensor):
            repeated = condition.repeat(per_condition)
        else:
            repeated = list(condition) * per_condition
        was_training = self.model.training
        self.model.eval()
        try:
            images = self.generate(repeated, seed=int(self.sample_grid.get("seed", 0)))
        finally:
            self.model.train(was_training)
        return make_grid(images.float().cpu(), nrow=len(condition), padding=2)

    def _check_sample_grid(self) -> None:
        """Fail at start-up, not at the first grid (step 5000 in the recipes), on settings the grid cannot use."""
        every = self.sample_grid.get("every_n_steps") or 0
        per_condition = self.sample_grid.get("images_per_condition", 1)
        if every < 0 or per_condition < 1:
            raise ValueError(
                f"model.sample_grid: every_n_steps must be >= 0 and images_per_condition >= 1, got {every} and "
                f"{per_condition}"
            )
        if self._grid_due():
            self.check_grid_conditions()

    def check_grid_conditions(self) -> None:
        """Raise ValueError when the grid's class ids / prompts do not fit the generator; subclasses implement."""
        raise NotImplementedError

    def _grid_due(self) -> bool:
        every = self.sample_grid.get("every_n_steps")
        return bool(every) and self.tokenizer is not None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = self.global_step
        if self._grid_due() and step > 0 and step % int(self.sample_grid["every_n_steps"]) == 0:
            self._log_sample_grid()

    def on_train_end(self) -> None:
        if self._grid_due():
            self._log_sample_grid()

    def _log_sample_grid(self) -> None:
        # every rank samples (costs no wall time: the others would wait for rank 0 anyway, and under FSDP each
        # block's forward needs every rank's shard); rank 0 writes the grid
        with self._ema_weights(), self.trainer.precision_plugin.forward_context(), self.eager_compiled_modules():
            grid = self.sample_grid_image()
        log_image_grid(self.trainer, grid, f"generated_step_{self.global_step:07d}", "train/generated")

    @contextmanager
    def _ema_weights(self) -> Iterator[None]:
        # the EMA callback (callbacks/ sits above lit/: found by what it offers, not imported)
        ema = next((cb for cb in self.trainer.callbacks if hasattr(cb, "swapped_in")), None)
        with ema.swapped_in() if ema is not None else nullcontext():
            yield


def sampler_settings(generator: nn.Module) -> dict[str, str]:
    """The sampler settings ``generator.generate`` accepts (its ``sampling`` dataclass, or its keywords): name ->
    declared type, as written in the annotation (``"int"``, ``"float"``, ...)."""
    if dataclasses.is_dataclass(getattr(generator, "sampling", None)):
        return {field.name: str(field.type) for field in dataclasses.fields(generator.sampling)}
    inputs = {"condition", "condition_pooled", "null_condition", "null_condition_pooled", "aesthetic_score"}
    parameters = inspect.signature(generator.generate).parameters
    return {name: str(p.annotation) for name, p in parameters.items() if name not in {*inputs, "generator", "progress"}}


# declared type of a sampler setting -> the values it takes (a command line's 8 is an int, also for a float), in words
SETTING_VALUES = {
    "int": ((int,), "an integer"),
    "float": ((int, float), "a number"),
    "bool": ((bool,), "true or false"),
    "str": ((str,), "a string"),
}


def check_sampling(generator: nn.Module, sampling: Mapping[str, Any], key: str) -> None:
    """A clear error for ``sampling`` settings (config key ``key``) that ``generator``'s sampler does not take, or
    values it would refuse only at its first call (sample.py checks before it writes or removes any image)."""
    settings = sampler_settings(generator)
    unknown = sorted(set(sampling) - set(settings))
    if unknown:
        raise ValueError(
            f"{key}: {unknown} are not settings of {type(generator).__name__}'s sampler; it takes {sorted(settings)}"
        )
    for name, value in sampling.items():
        values, words = SETTING_VALUES.get(settings[name], (None, ""))
        if values and (not isinstance(value, values) or (isinstance(value, bool) and bool not in values)):
            raise ValueError(f"{key}.{name} must be {words}, got {value!r}")
    if dataclasses.is_dataclass(getattr(generator, "sampling", None)):
        try:  # the settings' own checks (num_steps >= 1, a known guidance_decay, ...)
            dataclasses.replace(generator.sampling, **sampling)
        except ValueError as error:
            raise ValueError(f"{key}: {error}") from None


def check_token_space(generator: nn.Module, tokenizer: FrozenTokenizer) -> None:
    """A clear error when ``tokenizer`` does not decode ``generator``'s tokens (another codebook or token count)."""
    modules = ((ClassConditionalModule, (MaskGITGenerator, RAR)), (MaskGenVQModule, MaskGenVQ))
    modules += ((MaskGenKLModule, MaskGenKL),)
    space = next((module.TOKEN_SPACE for module, models in modules if isinstance(generator, models)), {})
    for attribute, tokenizer_attribute in space.items():
        have, decoded = getattr(generator, attribute), getattr(tokenizer, tokenizer_attribute)
        if have != decoded:
            raise ValueError(
                f"the generator ({type(generator).__name__}) models {attribute}={have}, the tokenizer has "
                f"{tokenizer_attribute}={decoded}: give the tokenizer the generator was trained with"
            )


def _absolute_paths(spec: Any) -> Any:
    """Local checkpoint paths in a tokenizer source made absolute (sample.py may run elsewhere)."""
    if isinstance(spec, str) and os.path.exists(spec):
        return os.path.abspath(spec)
    if isinstance(spec, Mapping):
        return {k: _absolute_paths(v) if k in ("checkpoint", "pretrained") else v for k, v in spec.items()}
    return spec


class ClassLabelError(ValueError):
    """A batch's class labels are outside the generator's classes."""


class TokenizerChangedError(ValueError):
    """The tokenizer at a generator checkpoint's recorded source has other weights than it was trained with."""


class ClassConditionalModule(GeneratorModule):
    """Class-conditional generators: labels from ``batch["class_id"]``, grids over ``sample_grid.class_ids``."""

    TOKEN_SPACE = {"codebook_size": "codebook_size", "image_seq_len": "num_tokens"}

    def class_ids(self, batch: Mapping[str, Any]) -> torch.Tensor:
        if "class_id" not in batch:
            raise KeyError(f"class-conditional training needs batch['class_id'], got {sorted(batch)}")
        return batch["class_id"].long()

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Refuse labels outside ``0..num_classes-1`` while they are still on the host (no device sync): the
        condition ids would be other tokens' (``num_classes`` is the guidance's null class, -1 the mask token)."""
        labels = batch.get("class_id") if isinstance(batch, Mapping) else None
        if isinstance(labels, torch.Tensor) and labels.device.type == "cpu" and labels.numel():
            num_classes = self.model.num_classes
            outside = (labels < 0) | (labels >= num_classes)
            if bool(outside.any()):
                values = sorted({int(v) for v in labels[outside]})
                keys = [batch["key"][i] for i in outside.nonzero().flatten().tolist()] if "key" in batch else []
                raise ClassLabelError(
                    f"class labels {values[:10]} (samples {keys[:5]}) are outside the generator's {num_classes} "
                    f"classes (0..{num_classes - 1}): relabel the data (labels from 1?) or set "
                    "model.generator.num_classes"
                )
        return batch

    def check_grid_conditions(self) -> None:
        num_classes = self.model.num_classes
        outside = [i for i in self.sample_grid.get("class_ids") or [] if not 0 <= i < num_classes]
        if outside:
            raise ValueError(
                f"model.sample_grid.class_ids {outside} are outside the generator's {num_classes} classes "
                f"(0..{num_classes - 1})"
            )

    def grid_conditions(self) -> torch.Tensor:
        default = list(range(min(self.model.num_classes, 10)))
        return torch.tensor(self.sample_grid.get("class_ids") or default, dtype=torch.long, device=self.device)


class MaskGITModule(ClassConditionalModule):
    """MaskGIT generator training (ImageBert / UViTBert).

    Args:
        loss: :class:`~titok_lightning.losses.MLMLoss` arguments (``label_smoothing``,
            ``loss_weight_unmasked_token``). Label dropout is the generator's ``class_label_dropout``.
    """

    def __init__(self, generator: Mapping[str, Any], loss: Mapping[str, Any], **kwargs: Any):
        super().__init__(generator, **kwargs)
        if not isinstance(self.model, MaskGITGenerator):
            raise TypeError(f"MaskGITModule trains ImageBert / UViTBert, got {type(self.model).__name__}")
        self.loss = MLMLoss(**plain(loss))

    def loss_terms(self, batch, generator=None):
        tokens = self.vq_tokens(batch, self.model.image_seq_len)
        masked, mask = self.model.masking_input_tokens(tokens, generator)
        logits = self.model(masked, self.class_ids(batch), self.model.class_label_dropout, generator)
        return self.loss(logits, tokens, mask)


class RARModule(ClassConditionalModule):
    """RAR training: next-token loss over a random order per sample with probability ``random_ratio``, annealed
    from 1 to 0 between the generator's ``randomness_anneal_start`` and ``randomness_anneal_end`` optimizer steps
    (validation uses raster order only when the ratio has reached 0, exactly as training at that step)."""

    def __init__(self, generator: Mapping[str, Any], **kwargs: Any):
        super().__init__(generator, **kwargs)
        if not isinstance(self.model, RAR):
            raise TypeError(f"RARModule trains RAR, got {type(self.model).__name__}")
        self.loss = ARLoss()

    def before_training_step(self) -> dict[str, float]:
        return {"random_ratio": self.model.set_random_ratio_from_step(self.global_step)}

    def on_validation_epoch_start(self) -> None:
        self.model.set_random_ratio_from_step(self.global_step)

    def loss_terms(self, batch, generator=None):
        tokens = self.vq_tokens(batch, self.model.image_seq_len)
        condition = self.model.preprocess_condition(self.class_ids(batch), self.model.class_label_dropout, generator)
        logits, labels = self.model(tokens, condition, return_labels=True, generator=generator)
        return self.loss(logits, labels)


class TextConditionalModule(GeneratorModule):
    """MaskGen: captions from ``batch["text"]`` through a frozen CLIP, grids over ``sample_grid.prompts``.

    Args:
        text_encoder: :class:`~titok_lightning.text_encoder.CLIPTextEncoder` arguments.
    """

    def __init__(self, generator: Mapping[str, Any], text_encoder: Mapping[str, Any], **kwargs: Any):
        super().__init__(generator, **kwargs)
        if not isinstance(self.model, (MaskGenVQ, MaskGenKL)):
            raise TypeError(f"{type(self).__name__} trains MaskGen generators, got {type(self.model).__name__}")
        self.text_encoder = CLIPTextEncoder(**plain(text_encoder))
        self.freeze("text_encoder")
        expected = self.model.transformer.context_embed.in_features
        width = self.text_encoder.width
        if width != expected:
            raise ValueError(f"the text encoder gives {width}-d tokens, the generator expects {expected}")

    def text_conditions(
        self, batch: Mapping[str, Any], generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(text tokens [B, L, D], pooled [B, 1, P], aesthetic scores [B] or None) with caption dropout."""
        if "text" not in batch:
            raise KeyError(f"text-conditional training needs batch['text'], got {sorted(batch)}")
        features = encode_captions(self.text_encoder, batch["text"])  # last row: the empty caption
        tokens, pooled = self.model.drop_condition(
            features.condition[:-1],
            features.condition_pooled[:-1],
            features.condition[-1:],
            features.condition_pooled[-1:],
            generator,
        )
        aesthetic = None
        if self.model.micro_condition:
            if "aesthetic_score" not in batch:
                raise KeyError("the generator is micro-conditioned: batches need 'aesthetic_score'")
            aesthetic = batch["aesthetic_score"].float()
        return tokens, pooled, aesthetic

    def check_grid_conditions(self) -> None:
        if not self.sample_grid.get("prompts"):
            raise ValueError("model.sample_grid.prompts is empty: give the captions of the sample grid")

    def grid_conditions(self) -> list[str]:
        return list(self.sample_grid["prompts"])

    def generate(self, condition, seed):
        return generate_images(
            self.model, self.tokenizer, condition, text_encoder=self.text_encoder, sampling=self.sampling, seed=seed
        )


class MaskGenVQModule(TextConditionalModule):
    """MaskGen-VQ training: masked-token modelling of TA-TiTok VQ ids with the MLM loss."""

    TOKEN_SPACE = {"codebook_size": "codebook_size", "num_tokens": "num_tokens"}

    def __init__(self, generator: Mapping[str, Any], text_encoder: Mapping[str, Any], loss: Mapping[str, Any], **kw):
        super().__init__(generator, text_encoder, **kw)
        if not isinstance(self.model, MaskGenVQ):
            raise TypeError(f"MaskGenVQModule trains MaskGen-VQ, got {type(self.model).__name__}")
        self.loss = MLMLoss(**plain(loss))

    def loss_terms(self, batch, generator=None):
        tokens = self.vq_tokens(batch, self.model.num_tokens)
        condition, pooled, aesthetic = self.text_conditions(batch, generator)
        masked, mask = self.model.mask_tokens(tokens, generator)
        return self.loss(self.model(masked, condition, pooled, aesthetic), tokens, mask)


class MaskGenKLModule(TextConditionalModule):
    """MaskGen-KL training: diffusion loss on VAE latents sampled from the stored posterior parameters and
    multiplied by the generator's ``scale_factor``."""

    TOKEN_SPACE = {"token_size": "token_size", "num_tokens": "num_tokens"}

    def __init__(self, generator: Mapping[str, Any], text_encoder: Mapping[str, Any], **kwargs: Any):
        super().__init__(generator, text_encoder, **kwargs)
        if not isinstance(self.model, MaskGenKL):
            raise TypeError(f"MaskGenKLModule trains MaskGen-KL, got {type(self.model).__name__}")

    def posterior_parameters(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """[B, 2C, 1, N] from image batches or stored [B, 2C, N] / [B, 2C, 1, N] moments."""
        params = self.batch_tokens(batch)
        if not params.is_floating_point():
            raise TypeError("MaskGen-KL needs continuous posterior parameters, got integer tokens")
        expected = (2 * self.model.token_size, self.model.num_tokens)
        params = params.float().reshape(params.shape[0], params.shape[1], 1, -1)
        if (params.shape[1], params.shape[3]) != expected:
            raise ValueError(
                f"expected posterior parameters [B, {expected[0]}, N={expected[1]}] (mean and log-variance channels), "
                f"got {tuple(params.shape)}"
            )
        return params

    def loss_terms(self, batch, generator=None):
        latents = self.model.latents_from_posterior(self.posterior_parameters(batch), generator)
        condition, pooled, aesthetic = self.text_conditions(batch, generator)
        loss, logs = self.model(latents, condition, pooled, aesthetic, generator)
        return loss, {"loss": logs["diff_loss"]}


__all__ = [
    "GeneratorModule",
    "MaskGITModule",
    "MaskGenKLModule",
    "MaskGenVQModule",
    "RARModule",
    "encode_captions",
    "generate_images",
]
