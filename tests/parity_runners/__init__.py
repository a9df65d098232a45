"""Parity runners: how to rebuild each reference fixture entry with this project's code.

Every module here exports
- ``RUNNERS``: fixture name -> ``run(fixture) -> dict[str, Tensor]`` producing every output the
  fixture lists, built only from ``fixture.config`` / ``fixture.state_dict`` / ``fixture.inputs``;
- ``MANIFEST_RESOLVERS``: reference class -> ``resolve(manifest_config) -> (variant, overrides)``
  naming the registry variant whose full-size model must match an official checkpoint manifest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file

from titok_lightning.convert import load_reference_state_dict


@dataclass
class Fixture:
    name: str
    meta: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]

    @property
    def config(self) -> dict[str, Any]:
        return self.meta["reference_config"]

    @property
    def reference_document(self) -> dict[str, Any]:
        """The reference config with the fixture's ``size_presets`` and ``patched_constants`` at its top level, as
        ``FromReferenceConfig`` reads it (and as an exported ``config.json`` holds it)."""
        extras = {k: self.meta[k] for k in ("size_presets", "patched_constants") if self.meta.get(k)}
        return {**self.config, **extras}

    @classmethod
    def load(cls, json_path: Path) -> Fixture:
        meta = json.loads(json_path.read_text())
        tensors = load_file(str(json_path.with_suffix(".safetensors")))

        def section(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

        return cls(
            name=meta.get("name", json_path.stem),
            meta=meta,
            state_dict=section("state_dict/"),
            inputs=section("input/"),
            outputs=section("output/"),
        )


def build_model(model_cls: type, fixture: Fixture) -> nn.Module:
    """``model_cls`` built from the fixture's reference config (with its size presets and patched
    constants), the fixture's reference state dict loaded through the class's conversion; eval mode."""
    model = model_cls.from_reference_config(fixture.reference_document)
    return load_reference_state_dict(model, fixture.state_dict).eval()


def all_runners() -> dict[str, Any]:
    from tests.parity_runners import generators, losses, tokenizers

    runners: dict[str, Any] = {}
    for module in (tokenizers, losses, generators):
        runners.update(module.RUNNERS)
    return runners


def all_manifest_resolvers() -> dict[str, Any]:
    from tests.parity_runners import generators, tokenizers

    resolvers: dict[str, Any] = {}
    for module in (tokenizers, generators):
        resolvers.update(module.MANIFEST_RESOLVERS)
    return resolvers
