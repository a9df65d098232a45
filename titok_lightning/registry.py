"""Registry of named model variants (``titok_b64``, ``rar_b``, ...).

Every model file registers its variants at import time with :func:`register_model`; a variant maps
a name to a model class, the constructor keyword arguments of the official checkpoint, and where that
checkpoint is published. ``create_model(name, **overrides)`` builds one, overriding any argument
(tests use it to build tiny models).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn


@dataclass(frozen=True)
class ModelSpec:
    name: str
    model_cls: type[nn.Module]
    family: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    """Hugging Face source of the official weights: ``"owner/repo"`` or ``"owner/repo/file.bin"``."""
    tokens: str = ""
    """Human description of the token layout for the model-zoo table (e.g. ``"32 x VQ 4096"``)."""


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(
    name: str,
    model_cls: type[nn.Module],
    *,
    family: str,
    checkpoint: str | None = None,
    tokens: str = "",
    **kwargs: Any,
) -> ModelSpec:
    if name in _REGISTRY:
        raise ValueError(f"model variant {name!r} is registered twice")
    spec = ModelSpec(name, model_cls, family, dict(kwargs), checkpoint, tokens)
    _REGISTRY[name] = spec
    return spec


def _populate() -> None:
    importlib.import_module("titok_lightning.models")


def get_spec(name: str) -> ModelSpec:
    _populate()
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise KeyError(f"unknown model variant {name!r}; known variants: {known}")
    return _REGISTRY[name]


def list_models(family: str | None = None) -> list[str]:
    _populate()
    return sorted(n for n, s in _REGISTRY.items() if family is None or s.family == family)


def model_kwargs(name: str, **overrides: Any) -> dict[str, Any]:
    spec = get_spec(name)
    return {**spec.kwargs, **overrides}


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build variant ``name`` with random weights; ``overrides`` replace constructor arguments."""
    spec = get_spec(name)
    return spec.model_cls(**model_kwargs(name, **overrides))
