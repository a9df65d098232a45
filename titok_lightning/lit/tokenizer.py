"""LightningModules that train the image tokenizers (thin: they wire a registry model, a loss and optimizers).

- :class:`TiTokStage1Module`: TiTok two-stage recipe, stage 1 (proxy codes of a frozen MaskGIT-VQGAN teacher).
- :class:`TiTokStage2Module`: stage 2 (frozen encoder/quantizer, pixel decoder from the teacher, GAN).
- :class:`PixelTokenizerModule`: single-stage TiTok (VQ or VAE) with pixel + perceptual + GAN losses.
- :class:`TATiTokModule`: single-stage TA-TiTok, decoder guided by a frozen CLIP text encoder.

``self.model`` is the tokenizer being trained (what EMA averages and what checkpoints' ``model.*`` hold);
frozen helpers (teacher, perceptual net, text encoder) are rebuilt from their own weights, not saved.
Every ``validation_step`` returns ``{"inputs", "reconstructions"}`` (both [B, 3, H, W] in [0, 1], the
reconstruction rounded to uint8 levels as the reference evaluator) plus ``"codes"`` [B, N] and
``"codebook_size"`` for VQ tokenizers, and logs ``val/mse`` (``test/mse`` in the test loop).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from titok_lightning.lit.base import OptimizerRole, TrainingModule
from titok_lightning.loading import build_model, load_spec, plain, read_weights
from titok_lightning.losses import ReconstructionLoss, Stage1Loss
from titok_lightning.models.discriminator import NLayerDiscriminator
from titok_lightning.text_encoder import CLIPTextEncoder

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ modules
class TokenizerModule(TrainingModule):
    """Shared part of the tokenizer modules: the model, validation outputs and metrics.

    Args:
        tokenizer: registry spec of the model to train, ``{"name": "titok_b64", **overrides}``.
        optimizer, scheduler, training: :class:`TrainingModule`'s arguments (``training``: max_grad_norm,
            accumulate_grad_batches, nonfinite, compile_modules, ...; conf/model/training/default.yaml).
    """

    def __init__(
        self, tokenizer: Mapping[str, Any], optimizer: Mapping[str, Any], scheduler: Mapping[str, Any], **training: Any
    ):
        super().__init__(plain(optimizer), plain(scheduler), **plain(training))
        self.save_hyperparameters(logger=False)
        self.model = build_model(plain(tokenizer))
        output_size = getattr(self.model, "output_size", None)
        if output_size is not None and output_size != self.model.image_size:  # the reference builds such models
            grid = self.model.decoder.grid_size
            raise ValueError(
                f"the decoder turns its {grid}x{grid} grid into {output_size}px images, the inputs are "
                f"{self.model.image_size}px: training compares the two (choose image and patch sizes that match)"
            )

    # subclasses: images [B, 3, H, W] in [0, 1] -> (reconstructions in image space, quantizer info)
    def reconstruct(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, Any]:
        images = batch["image"]
        reconstructions, info = self.reconstruct(batch)
        # The reference evaluator scores reconstructions clamped and rounded to 8-bit levels.
        reconstructions = torch.round(reconstructions.float().clamp(0.0, 1.0) * 255.0) / 255.0
        self.log(
            "test/mse" if self.trainer.testing else "val/mse",
            F.mse_loss(reconstructions, images.float()),
            on_epoch=True,
            sync_dist=True,
            batch_size=len(images),
        )
        outputs: dict[str, Any] = {"inputs": images, "reconstructions": reconstructions}
        if isinstance(info, Mapping) and "min_encoding_indices" in info:
            outputs["codes"] = info["min_encoding_indices"].reshape(len(images), -1)
            outputs["codebook_size"] = self.model.quantize.codebook_size
        return outputs

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, Any]:
        return self.validation_step(batch, batch_idx)

    def frozen_precision(self):
        """Frozen helpers run in fp32 as in the reference (they sit outside its autocast region)."""
        return torch.autocast(self.device.type, enabled=False)


class TiTokStage1Module(TokenizerModule):
    """TiTok stage 1: predict the frozen MaskGIT-VQGAN teacher's codes of the image ("proxy codes").

    Args:
        teacher: ``{"name": "maskgit_vqgan_f16_256", "pretrained": <source or null>, **overrides}``.
        loss: :class:`~titok_lightning.losses.Stage1Loss` arguments (``quantizer_weight``).
        teacher_dtype: ``"float32"`` (the reference) or ``"bfloat16"``: the teacher's encoder under bf16 autocast,
            its nearest-code search in fp32. Off until its codes are measured to agree with fp32 codes on >= 99.5% of
            positions with the official weights (``scripts/benchmark.py --rows teacher``).
        teacher_channels_last: run the teacher's convolutions in channels-last memory format.
    """

    def __init__(
        self,
        tokenizer: Mapping[str, Any],
        teacher: Mapping[str, Any],
        loss: Mapping[str, Any],
        teacher_dtype: str = "float32",
        teacher_channels_last: bool = False,
        **kwargs,
    ):
        super().__init__(tokenizer, **kwargs)
        if teacher_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"teacher_dtype must be 'float32' or 'bfloat16', got {teacher_dtype!r}")
        self.teacher = load_spec(teacher, "teacher")
        self.freeze("teacher")
        self.teacher_dtype = teacher_dtype
        self.teacher_channels_last = teacher_channels_last
        if teacher_channels_last:
            self.teacher.to(memory_format=torch.channels_last)
        self.loss = Stage1Loss(**plain(loss))
        _check_proxy_targets(self.model, self.teacher)

    def micro_step(self, batch: Mapping[str, Any]) -> None:
        images = batch["image"]
        target_codes = proxy_codes(self.teacher, images, self.teacher_dtype, self.teacher_channels_last)
        with self.optimizing("model"):
            logits, info = self.model(images)
            loss, logs = self.loss(target_codes, logits, info)
            self.backward_and_step("model", loss, logs)
        self.log_losses("train", logs, len(images), prog_bar=("total_loss",))

    def reconstruct(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, Any]:
        logits, info = self.model(batch["image"])
        with self.frozen_precision():
            return self.teacher.decode(logits.argmax(dim=1)), info


@torch.no_grad()
def proxy_codes(
    teacher: nn.Module, images: torch.Tensor, dtype: str = "float32", channels_last: bool = False
) -> torch.Tensor:
    """The MaskGIT-VQGAN teacher's codes [B, h, w] of images [B, 3, H, W] in [0, 1]: fp32 outside autocast as the
    reference, or (``dtype="bfloat16"``) the encoder under bf16 autocast and the nearest-code search in fp32."""
    images = images.float()
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    # enabled=False also switches off the training step's autocast; the nearest-code search runs in fp32 by itself
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        return teacher.encode(images)


def _check_proxy_targets(model: nn.Module, teacher: nn.Module) -> None:
    grid = model.image_size // teacher.downsample_factor
    decoder = model.decoder
    if not getattr(decoder, "is_legacy", False):
        raise ValueError("stage 1 trains a legacy TiTok (is_legacy=True, finetune_decoder=False)")
    if getattr(model, "finetune_decoder", False):
        raise ValueError("stage 1 needs finetune_decoder=False (stage 2 is TiTokStage2Module)")
    if decoder.grid_size != grid:
        raise ValueError(
            f"the TiTok decoder predicts a {decoder.grid_size}x{decoder.grid_size} grid but the teacher encodes "
            f"{model.image_size}px images into {grid}x{grid} codes: use decoder_patch_size = "
            f"{teacher.downsample_factor}"
        )
    num_proxy = decoder.ffn[-1].out_channels
    if num_proxy != teacher.quantize.codebook_size:
        raise ValueError(f"TiTok predicts {num_proxy} proxy codes, the teacher has {teacher.quantize.codebook_size}")


class PixelTokenizerModule(TokenizerModule):
    """Single-stage pixel tokenizer (TiTok ``is_legacy=False``, VQ or VAE): l1/l2 + perceptual + GAN + VQ/KL.

    Manual optimization with two AdamW (model, discriminator), each with its own schedule; the
    discriminator trains from ``loss.discriminator_start`` on and its schedule starts there.

    Args:
        loss: :class:`~titok_lightning.losses.ReconstructionLoss` arguments.
        discriminator: ``NLayerDiscriminator`` arguments (``{}``: the reference's).
        optimizer: also ``discriminator_lr``.
    """

    def __init__(
        self,
        tokenizer: Mapping[str, Any],
        loss: Mapping[str, Any],
        discriminator: Mapping[str, Any] | None = None,
        **kwargs,
    ):
        super().__init__(tokenizer, **kwargs)
        if "discriminator_lr" not in self.optimizer_cfg:
            raise ValueError("GAN training needs optimizer.discriminator_lr")
        loss = plain(loss)
        expected_mode = getattr(self.model, "quantize_mode", loss.get("quantize_mode", "vq"))
        if loss.get("quantize_mode", expected_mode) != expected_mode:
            raise ValueError(f"loss.quantize_mode={loss['quantize_mode']!r} but the model is {expected_mode!r}")
        loss["quantize_mode"] = expected_mode
        self.loss = ReconstructionLoss(**loss, discriminator=NLayerDiscriminator(**plain(discriminator or {})))
        if self.loss.perceptual is not None:
            self.freeze("loss.perceptual")

    def optimizer_roles(self) -> list[OptimizerRole]:
        return super().optimizer_roles() + [
            OptimizerRole(
                "discriminator",
                self.loss.discriminator,
                float(self.optimizer_cfg["discriminator_lr"]),
                start_step=self.loss.discriminator_start,
            )
        ]

    def decoder_inputs(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, ...]:
        """Extra inputs of ``self.model(images, *extra)`` (TA-TiTok: text features)."""
        return ()

    def micro_step(self, batch: Mapping[str, Any]) -> None:
        images = batch["image"]
        step = self.global_step  # both losses see the step of this batch (the model's step advances it)
        context = self.decoder_inputs(batch)
        with self.optimizing("model"):
            reconstructions, extra = self.model(images, *context)
            loss, logs = self.loss(images, reconstructions, extra, step, mode="generator")
            self.backward_and_step("model", loss, logs)
        if self.loss.should_train_discriminator(step):
            with self.optimizing("discriminator"):
                d_loss, d_logs = self.loss(images, reconstructions.detach(), extra, step, mode="discriminator")
                self.backward_and_step("discriminator", d_loss, d_logs)
            logs = {**logs, **d_logs}
        self.log_losses("train", logs, len(images), prog_bar=("total_loss", "reconstruction_loss"))

    def reconstruct(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, Any]:
        return self.model(batch["image"], *self.decoder_inputs(batch))


class TiTokStage2Module(PixelTokenizerModule):
    """TiTok stage 2: decoder fine-tuning in pixel space through the MaskGIT-VQGAN pixel decoder.

    The tokenizer spec must build a stage-2 TiTok (``finetune_decoder=True``: encoder, quantizer and latent
    tokens frozen). ``init_from`` (a stage-1 Lightning checkpoint or official stage-1 weight file) gives the
    TiTok weights; ``teacher`` (the MaskGIT-VQGAN) gives ``pixel_quantize`` / ``pixel_decoder``; the teacher
    is not kept. ``init_from=None`` trains from random weights (tests only; warned).
    """

    def __init__(
        self,
        tokenizer: Mapping[str, Any],
        teacher: Mapping[str, Any],
        init_from: str | None,
        loss: Mapping[str, Any],
        **kwargs,
    ):
        super().__init__(tokenizer, loss, **kwargs)
        if not getattr(self.model, "finetune_decoder", False):
            raise ValueError("stage 2 needs a tokenizer spec with finetune_decoder=True")
        pixel_tokenizer = load_spec(teacher, "pixel decoder source (teacher)")
        if init_from is None:
            log.warning("stage 2 without init_from: the TiTok encoder and decoder start from RANDOM weights")
            stage1 = {k: v for k, v in self.model.state_dict().items() if not k.startswith("pixel_")}
        else:
            stage1 = read_weights(init_from).state_dict
        from titok_lightning.models.titok import load_stage2_init

        load_stage2_init(self.model, stage1, pixel_tokenizer.state_dict())


class TATiTokModule(PixelTokenizerModule):
    """TA-TiTok: single-stage tokenizer whose decoder reads CLIP text features of the caption.

    Captions come from ``batch["text"]``; class-labelled batches (ImageNet validation) use
    ``class_prompt.format(class_names[class_id])`` as the reference does.

    Args:
        text_encoder: :class:`~titok_lightning.text_encoder.CLIPTextEncoder` arguments.
        class_names: ``"imagenet"`` (the 1000 WordNet names), a list, or ``None`` (captions required).
        class_prompt: template for class-labelled batches.
    """

    def __init__(
        self,
        tokenizer: Mapping[str, Any],
        loss: Mapping[str, Any],
        text_encoder: Mapping[str, Any],
        class_names: str | Sequence[str] | None = "imagenet",
        class_prompt: str = "A photo of a {}.",
        **kwargs,
    ):
        super().__init__(tokenizer, loss, **kwargs)
        self.text_encoder = CLIPTextEncoder(**plain(text_encoder))
        self.freeze("text_encoder")
        decoder = self.model.decoder
        if (self.text_encoder.context_length, self.text_encoder.width) != (
            decoder.text_context_length,
            decoder.text_guidance_proj.in_features,
        ):
            raise ValueError(
                f"text encoder gives [{self.text_encoder.context_length}, {self.text_encoder.width}] features, the "
                f"TA-TiTok decoder expects [{decoder.text_context_length}, {decoder.text_guidance_proj.in_features}]"
            )
        self.class_names = resolve_class_names(class_names)
        self.class_prompt = class_prompt

    def captions(self, batch: Mapping[str, Any]) -> list[str]:
        return batch_captions(batch, self.class_names, self.class_prompt)

    def decoder_inputs(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, ...]:
        with self.frozen_precision():
            return (self.text_encoder(self.captions(batch)).guidance,)


def batch_captions(batch: Mapping[str, Any], class_names: Sequence[str] | None, class_prompt: str) -> list[str]:
    """The captions TA-TiTok decodes ``batch`` with: its texts, or ``class_prompt`` filled with its classes' names."""
    if "text" in batch:
        return list(batch["text"])
    if "class_id" in batch and class_names is not None:
        return [class_prompt.format(class_names[i]) for i in batch["class_id"].tolist()]
    raise KeyError("TA-TiTok needs batch['text'], or batch['class_id'] with class_names set")


def resolve_class_names(class_names: str | Sequence[str] | None) -> list[str] | None:
    if class_names is None or isinstance(class_names, list | tuple):
        return None if class_names is None else list(class_names)
    if class_names == "imagenet":
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        return [info.index_to_description(i) for i in range(1000)]
    raise ValueError(f"class_names must be 'imagenet', a list of names or null, got {class_names!r}")
