"""Base class of the class-conditional token generators (MaskGIT's ImageBert / UViTBert, RAR)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch
import torch.nn as nn

from titok_lightning.convert import FromReferenceConfig
from titok_lightning.sampling import class_condition_ids


class ClassConditionalGenerator(FromReferenceConfig, nn.Module):
    """Token space, class conditioning, sampler settings and reference-config reading shared by the
    class-conditional generators (MaskGIT, RAR).

    ``sampling`` is a ``sampling_cls`` dataclass or a dict of its fields; ``reference_sampling_fields`` are
    the fields read from the reference config's ``model.generator`` section when present.
    """

    sampling_cls: type
    reference_sampling_fields: tuple[str, ...]

    def __init__(
        self,
        codebook_size: int,
        image_seq_len: int,
        num_classes: int,
        class_label_dropout: float,
        sampling: Any,
    ):
        super().__init__()
        self.codebook_size = codebook_size
        self.image_seq_len = image_seq_len
        self.num_classes = num_classes
        self.class_label_dropout = class_label_dropout
        self.mask_token_id = codebook_size
        self.null_condition_id = codebook_size + 1 + num_classes
        self.vocab_size = codebook_size + num_classes + 2
        self.sampling = self.sampler_settings(sampling)

    def preprocess_condition(
        self, class_ids: torch.Tensor, cond_drop_prob: float = 0.0, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Class ids [B] -> condition token ids [B], replaced by the null class with ``cond_drop_prob``."""
        return class_condition_ids(class_ids, self.codebook_size, self.num_classes, cond_drop_prob, generator)

    def check_class_ids(self, class_ids: torch.Tensor) -> None:
        """Refuse class ids outside ``[0, num_classes)`` (one host sync per call): id ``num_classes`` would be the
        null (unconditional) class and -1 the mask token's condition, without a word."""
        if class_ids.numel() and (int(class_ids.min()) < 0 or int(class_ids.max()) >= self.num_classes):
            outside = sorted({int(i) for i in class_ids[(class_ids < 0) | (class_ids >= self.num_classes)]})
            raise ValueError(
                f"class ids {outside[:10]} are outside the generator's {self.num_classes} classes "
                f"(0..{self.num_classes - 1})"
            )

    def null_condition(self, batch_size: int, device: torch.device | None = None) -> torch.Tensor:
        return torch.full((batch_size,), self.null_condition_id, dtype=torch.long, device=device)

    @classmethod
    def kwargs_from_reference_config(cls, config: dict) -> dict[str, Any]:
        """Constructor kwargs from the reference's nested config (its ``model.generator`` section)."""
        gen = config["model"]["generator"]
        sampling = cls.sampling_cls(**{name: gen[name] for name in cls.reference_sampling_fields if name in gen})
        return dict(
            codebook_size=config["model"]["vq_model"]["codebook_size"],
            image_seq_len=gen["image_seq_len"],
            num_classes=gen["condition_num_classes"],
            class_label_dropout=gen.get("class_label_dropout", 0.1),
            hidden_size=gen["hidden_size"],
            num_layers=gen["num_hidden_layers"],
            num_heads=gen["num_attention_heads"],
            intermediate_size=gen["intermediate_size"],
            sampling=asdict(sampling),
        )

    @classmethod
    def sampler_settings(cls, sampling: Any) -> Any:
        """``sampling`` as a ``sampling_cls``: given as one, or as a dict of some of its fields (the others default)."""
        return sampling if isinstance(sampling, cls.sampling_cls) else cls.sampling_cls(**(sampling or {}))

    @classmethod
    def reference_sampling(cls, sampling: Any) -> dict[str, Any]:
        """The sampler settings of ``sampling`` that the reference config holds (``reference_sampling_fields``)."""
        settings = cls.sampler_settings(sampling)
        return {name: getattr(settings, name) for name in cls.reference_sampling_fields}

    @classmethod
    def reference_config(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The inverse of :meth:`kwargs_from_reference_config`."""
        sampling = cls.reference_sampling(kwargs["sampling"])
        generator = dict(
            image_seq_len=kwargs["image_seq_len"],
            condition_num_classes=kwargs["num_classes"],
            class_label_dropout=kwargs["class_label_dropout"],
            hidden_size=kwargs["hidden_size"],
            num_hidden_layers=kwargs["num_layers"],
            num_attention_heads=kwargs["num_heads"],
            intermediate_size=kwargs["intermediate_size"],
            **sampling,
        )
        return {"model": {"vq_model": {"codebook_size": kwargs["codebook_size"]}, "generator": generator}}
