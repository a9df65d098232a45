"""Write a model trained here in the official layout: ``python -m titok_lightning.export <ckpt> <out_dir>``.

``<out_dir>`` gets ``config.json`` (the reference's nested config, as its ``PyTorchModelHubMixin`` models save and
read it) and ``model.safetensors`` (the reference's key names): what ``from_pretrained`` of bytedance/1d-tokenizer
and this project's :func:`titok_lightning.loading.load_pretrained` read. Sizes the reference cannot name (ViT sizes
other than small / base / large, a smaller pixel decoder) go to the config's ``size_presets`` /
``patched_constants``, which only this project reads.

Both directions are checked before anything is written: the config must read back to exactly the model's
constructor arguments, and the state dict must convert back to exactly the model's; a family or an argument the
reference layout cannot express fails with the differences named.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from titok_lightning.cli import one_line
from titok_lightning.convert import convert_reference_state_dict
from titok_lightning.loading import (
    CONFIG_FILE,
    build_model,
    canonical,
    constructor_defaults,
    lists_to_tuples,
    load_weights,
    read_weights,
)
from titok_lightning.registry import model_kwargs

WEIGHTS_FILE = "model.safetensors"
ERRORS = (ValueError, KeyError, OSError, RuntimeError)  # a missing file, not a checkpoint of this project, ...


def reference_layout(
    model_cls: type, kwargs: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config.json, state dict with the reference's keys) of a ``model_cls`` built with ``kwargs`` (missing
    arguments: the constructor's defaults) holding ``state_dict``. Raises ValueError when either does not convert
    back exactly."""
    defaults = constructor_defaults(model_cls)
    full = {**defaults, **kwargs}
    try:
        config = model_cls.reference_config(full)
    except (AttributeError, NotImplementedError):
        raise ValueError(f"{model_cls.__name__} has no reference layout (not exportable yet)") from None
    back = {**defaults, **model_cls.kwargs_from_reference_config(config)}
    if hasattr(model_cls, "sampler_settings"):  # all sampler fields, a dict of some given or not (the rest default)
        full["sampling"], back["sampling"] = (asdict(model_cls.sampler_settings(x["sampling"])) for x in (full, back))
    differing = sorted(k for k in full.keys() | back.keys() if canonical(full.get(k)) != canonical(back.get(k)))
    if differing:
        raise ValueError(
            f"{model_cls.__name__}: the reference config cannot express "
            + ", ".join(f"{k}={full.get(k)!r} (reads back as {back.get(k)!r})" for k in differing)
        )
    reference = model_cls.to_reference_state_dict(state_dict)
    with torch.device("meta"):
        probe = model_cls(**full)
    converted = convert_reference_state_dict(probe, reference)
    wrong = sorted(set(converted) ^ set(state_dict)) or [
        k for k in state_dict if not torch.equal(converted[k], state_dict[k])
    ]
    if wrong:
        raise ValueError(f"{model_cls.__name__}: the reference key names do not convert back for {wrong[:10]}")
    return config, reference


def save_reference(
    model_cls: type, kwargs: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], out_dir: str | Path
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` of :func:`reference_layout` into ``out_dir``."""
    from safetensors.torch import save_file

    config, reference = reference_layout(model_cls, kwargs, state_dict)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=4))
    # safetensors refuses tensors sharing memory (tied weights): each key gets its own copy
    save_file({k: v.detach().cpu().clone().contiguous() for k, v in reference.items()}, str(out_dir / WEIGHTS_FILE))
    return out_dir


def export_checkpoint(ckpt_path: str | Path, out_dir: str | Path, use_ema: bool = True) -> Path:
    """The model of a Lightning checkpoint of this project (EMA weights unless ``use_ema=False``) in the official
    layout."""
    weights = read_weights(ckpt_path, use_ema)
    spec = weights.spec
    if weights.reference_format or spec is None:
        raise ValueError(f"{ckpt_path} is not a checkpoint trained here (no hyper_parameters.tokenizer / .generator)")
    spec = dict(spec)
    model = load_weights(build_model(spec), weights)
    kwargs = model_kwargs(spec.pop("name"), **lists_to_tuples(spec))
    return save_reference(type(model), kwargs, model.state_dict(), out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m titok_lightning.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a Lightning .ckpt written by train.py")
    parser.add_argument("out_dir", help="folder for config.json + model.safetensors")
    parser.add_argument("--raw-weights", action="store_true", help="the training weights instead of the EMA")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out_dir, use_ema=not args.raw_weights)
    except ERRORS as err:
        parser.exit(1, f"export: error: {one_line(err)}\n")
    print(f"wrote {out / CONFIG_FILE} and {out / WEIGHTS_FILE}")


if __name__ == "__main__":
    main()
