"""Conversion of reference-format (bytedance/1d-tokenizer) state dicts to this project's modules.

Each model class exposes ``convert_reference_state_dict(state_dict) -> state_dict`` (a pure key/tensor
mapping, usually a list of regex renames built with :func:`rename_keys`). :func:`load_reference_state_dict`
runs it and loads strictly, so a checkpoint of another model fails with the missing and unexpected keys
named instead of loading half the weights. :class:`FromReferenceConfig` gives a model class its
``from_reference_config``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn as nn

# Extras that older library versions saved as persistent buffers and that carry no information.
# They are dropped by name only; everything else must match exactly.
KNOWN_BENIGN_EXTRA_SUFFIXES = (
    "embeddings.position_ids",  # transformers < 4.31 BertEmbeddings
    "embeddings.token_type_ids",
)


class CheckpointMismatchError(RuntimeError):
    """The checkpoint does not fit the model: lists the missing, unexpected and mis-shaped keys."""


class FromReferenceConfig:
    """How every model family reads a reference config: ``kwargs_from_reference_config(config)`` -> constructor
    arguments, ``from_reference_config(config)`` -> model; and writes one (export): ``reference_config(kwargs)`` and
    ``to_reference_state_dict(state_dict)``, the inverses (a family without them cannot be exported).

    ``config`` is the reference's nested (OmegaConf) config as its ``config.json`` holds it; it may carry, at the top
    level, the parity fixtures' ``size_presets`` (extra ViT size names: ``{name: {width, num_layers, num_heads}}``)
    and ``patched_constants`` (sizes the reference hard-codes), for the families whose sizes the reference fixes.
    """

    @classmethod
    def kwargs_from_reference_config(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_reference_config(cls, config: Mapping[str, Any]) -> Any:
        return cls(**cls.kwargs_from_reference_config(config))

    @classmethod
    def reference_config(cls, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The reference config of the model built with ``kwargs`` (every constructor argument)."""
        raise NotImplementedError(f"{cls.__name__} has no export to the reference layout")

    @staticmethod
    def to_reference_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This project's keys -> the reference's; the identity where they are the same."""
        return dict(state_dict)


def rename_keys(state_dict: Mapping[str, torch.Tensor], rules: Iterable[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Apply every ``(pattern, replacement)`` regex rule, in order, to every key."""
    compiled = [(re.compile(p), r) for p, r in rules]
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        for pattern, repl in compiled:
            key = pattern.sub(repl, key)
        out[key] = value
    return out


def name_rules(pairs: Iterable[tuple[str, str]], to_reference: bool = False) -> list[tuple[str, str]]:
    """:func:`rename_keys` rules from ``(reference name, our name)`` pairs, one table for both directions: reference
    -> ours, or ours -> reference with ``to_reference``. A name ending in ``.`` renames a key prefix, any other a
    whole key; ``*`` stands for a block number."""

    def rule(source: str, target: str) -> tuple[str, str]:
        pattern = "^" + re.escape(source).replace(r"\*", r"(\d+)", 1) + ("" if source.endswith(".") else "$")
        return pattern, target.replace("*", r"\1", 1)

    return [rule(ours, ref) if to_reference else rule(ref, ours) for ref, ours in pairs]


def drop_benign_extras(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state_dict.items() if not k.endswith(KNOWN_BENIGN_EXTRA_SUFFIXES)}


def convert_reference_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict:
    converter = getattr(type(model), "convert_reference_state_dict", None)
    state_dict = drop_benign_extras(state_dict)
    return dict(state_dict) if converter is None else converter(state_dict)


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`CheckpointMismatchError` unless keys and shapes match ``model`` exactly."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state_dict)
        if tuple(expected[k].shape) != tuple(state_dict[k].shape)
    )
    if missing or unexpected or wrong_shape:

        def show(title: str, items: list[str]) -> str:
            head = ", ".join(items[:20]) + (f" ... (+{len(items) - 20} more)" if len(items) > 20 else "")
            return f"\n  {title} ({len(items)}): {head}" if items else ""

        raise CheckpointMismatchError(
            f"checkpoint does not match {type(model).__name__}:"
            + show("missing keys", missing)
            + show("unexpected keys", unexpected)
            + show("shape mismatches", wrong_shape)
        )


def load_reference_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Convert a reference-format state dict and load it strictly into ``model``."""
    converted = convert_reference_state_dict(model, state_dict)
    check_state_dict(model, converted)
    model.load_state_dict(converted, strict=True)
    return model
