"""Loading official (reference-format) checkpoints: ``load_pretrained(name_or_source, **overrides)``.

Sources, in the order they are tried:
- a registry variant name (``"titok_l32"``): its published checkpoint, its class and kwargs;
- a local file (``.safetensors``, ``.bin``, ``.pt``, ``.ckpt``) or directory (``model.safetensors`` or
  ``pytorch_model.bin``, plus ``config.json`` if present);
- a Hugging Face repo ``"owner/repo"`` (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``)
  or one file in it, ``"owner/repo/file.bin"``.

The checkpoint's own ``config.json`` (the reference saves its OmegaConf config there) decides the
architecture when present; otherwise the registry kwargs do. Without a registry name the class is
found by building every registered family's candidate on the meta device and keeping the one whose
keys and shapes fit the checkpoint. Any registered class works if it offers
``convert_reference_state_dict`` and ``from_reference_config`` (``kwargs_from_reference_config`` as
well, to accept ``overrides`` together with a config).
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from titok_lightning.convert import (
    CheckpointMismatchError,
    check_state_dict,
    convert_reference_state_dict,
    load_reference_state_dict,
)
from titok_lightning.registry import ModelSpec, get_spec, list_models

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
CONFIG_FILE = "config.json"
# Flags that select a training mode, not an architecture the checkpoint must match.
MODE_FLAGS = ("finetune_decoder", "clustering_vq", "commitment_cost")


class PretrainedNotAvailableError(RuntimeError):
    """The weights could not be found locally nor downloaded; the message says what to fetch and where."""


# ---------------------------------------------------------------- registry matching


def constructor_defaults(model_cls: type) -> dict[str, Any]:
    """Keyword defaults of ``model_cls.__init__`` along its MRO (a subclass's defaults win)."""
    defaults: dict[str, Any] = {}
    for klass in reversed(model_cls.__mro__):
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        for name, param in inspect.signature(init).parameters.items():
            if param.default is not inspect.Parameter.empty:
                defaults[name] = param.default
    return defaults


def _canonical(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return tuple(_canonical(v) for v in value)
    return value


def find_variant(
    model_cls: type, kwargs: Mapping[str, Any], mode_flags: Iterable[str] = MODE_FLAGS
) -> tuple[str, dict[str, Any]]:
    """The registry variant of ``model_cls`` whose architecture equals ``kwargs`` (missing registry
    arguments count as their constructor defaults), and the ``mode_flags`` overrides that turn it
    into exactly ``kwargs``. Raises ``LookupError`` naming the closest variants otherwise."""
    mode_flags = set(mode_flags)
    defaults = constructor_defaults(model_cls)
    wanted = {k: _canonical(v) for k, v in kwargs.items()}
    misses = []
    for name in list_models():
        spec = get_spec(name)
        if spec.model_cls is not model_cls:
            continue
        full = {k: _canonical(v) for k, v in {**defaults, **spec.kwargs}.items()}
        differing = sorted(k for k, v in wanted.items() if k not in mode_flags and full.get(k, object()) != v)
        if not differing:
            return name, {k: kwargs[k] for k in mode_flags if k in kwargs and wanted[k] != full.get(k)}
        misses.append(f"{name} (differs in {', '.join(differing)})")
    raise LookupError(f"no registered {model_cls.__name__} variant matches {dict(kwargs)}; tried: {'; '.join(misses)}")


# ---------------------------------------------------------------- files


def _truthy_env(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _how_to_fetch(repo_id: str, filenames: list[str]) -> str:
    single_file = len(filenames) == 1 and filenames[0] not in HF_WEIGHT_FILES
    target = f"<DIR>/{filenames[0]}" if single_file else "<DIR>"
    return (
        f"Download it on a machine with internet access, e.g.\n"
        f"  huggingface-cli download {repo_id} {' '.join(filenames)} --local-dir <DIR>\n"
        f"(files at https://huggingface.co/{repo_id}), then load_pretrained('{target}') here, or copy the "
        f"Hugging Face cache (HF_HOME) so that hf_hub_download finds them offline."
    )


def _hf_download(repo_id: str, filename: str, *, local_only: bool = False) -> str | None:
    """Path of ``filename`` from ``repo_id`` (cached or downloaded); None if the repo has no such file."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return hf_hub_download(repo_id, filename, local_files_only=local_only or _truthy_env("HF_HUB_OFFLINE"))
    except LocalEntryNotFoundError:  # not cached and no way to reach the hub
        raise
    except EntryNotFoundError:  # the hub answered: no such file in the repo
        return None
    except RepositoryNotFoundError:
        raise PretrainedNotAvailableError(
            f"Hugging Face repo {repo_id!r} does not exist or is not accessible (private or gated). "
            + _how_to_fetch(repo_id, [filename])
        ) from None
    except OSError as err:  # network errors, HTTP errors
        raise PretrainedNotAvailableError(
            f"could not download {filename!r} from {repo_id!r} ({type(err).__name__}: {err}). "
            + _how_to_fetch(repo_id, [filename])
        ) from None


def _fetch_repo(repo_id: str, filename: str | None) -> tuple[Path, Path | None]:
    """(weights, config or None) of a Hugging Face repo, or of one file of it."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    wanted = [filename] if filename else list(HF_WEIGHT_FILES)
    config = None
    local_only = False
    if filename is None:
        try:
            config = _hf_download(repo_id, CONFIG_FILE)
        except LocalEntryNotFoundError:
            local_only = True  # offline / no network: the weights can only come from the cache
    try:
        for name in wanted:
            path = _hf_download(repo_id, name, local_only=local_only)
            if path is not None:
                return Path(path), Path(config) if config else None
    except LocalEntryNotFoundError:
        pass
    else:
        raise PretrainedNotAvailableError(f"Hugging Face repo {repo_id!r} has none of {wanted}.")
    files = wanted if filename else [CONFIG_FILE, wanted[0]]
    raise PretrainedNotAvailableError(
        f"{' / '.join(wanted)} of {repo_id!r} is not in the local Hugging Face cache and could not be "
        f"downloaded (offline or no network). " + _how_to_fetch(repo_id, files)
    )


def _local_files(path: Path) -> tuple[Path, Path | None]:
    if path.is_dir():
        for name in HF_WEIGHT_FILES:
            if (path / name).is_file():
                config = path / CONFIG_FILE
                return path / name, config if config.is_file() else None
        raise PretrainedNotAvailableError(f"directory {path} has none of {list(HF_WEIGHT_FILES)}")
    sibling = path.parent / CONFIG_FILE
    # A config.json next to a Hugging Face weight file belongs to it; next to anything else it may not.
    return path, sibling if path.name in HF_WEIGHT_FILES and sibling.is_file() else None


def resolve_files(source: str) -> tuple[Path, Path | None]:
    """(weights file, config.json or None) for a local path, ``owner/repo`` or ``owner/repo/file``."""
    path = Path(source).expanduser()
    if path.exists():
        return _local_files(path)
    parts = source.strip("/").split("/")
    if len(parts) < 2 or source.startswith((".", "/", "~")) or any(not p for p in parts):
        raise PretrainedNotAvailableError(
            f"{source!r} is neither a registered variant, an existing local path, nor a Hugging Face "
            f"'owner/repo[/file]' id. Registered variants: {', '.join(list_models())}"
        )
    repo_id = "/".join(parts[:2])
    return _fetch_repo(repo_id, "/".join(parts[2:]) or None)


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a pickled state dict loaded with ``weights_only=True``
    (a Lightning-style ``{"state_dict": ...}`` wrapper is unwrapped)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointMismatchError(f"{path} does not hold a state dict of tensors")
    return dict(obj)


def _read_config(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    config = json.loads(path.read_text())
    # huggingface_hub's mixin may nest the constructor's ``config`` argument one level down.
    if "model" not in config and isinstance(config.get("config"), Mapping):
        config = config["config"]
    return config


# ---------------------------------------------------------------- model construction


def _config_extras(config: Mapping[str, Any]) -> tuple[Any, Any]:
    """Optional top-level ``size_presets`` / ``patched_constants`` (as in the parity fixtures), which let
    a config.json describe sizes the reference's size names cannot."""
    return config.get("size_presets"), config.get("patched_constants")


def _kwargs_from_config(model_cls: type, config: Mapping[str, Any]) -> dict[str, Any] | None:
    make = getattr(model_cls, "kwargs_from_reference_config", None)
    return None if make is None else make(config, *_config_extras(config))


def _build(model_cls: type, kwargs: dict[str, Any] | None, config: Mapping[str, Any] | None) -> nn.Module:
    if kwargs is not None:
        return model_cls(**kwargs)
    return model_cls.from_reference_config(config, *_config_extras(config))


def _fits(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> bool:
    try:
        check_state_dict(model, convert_reference_state_dict(model, state_dict))
    except CheckpointMismatchError:
        return False
    return True


def _candidates(
    spec: ModelSpec | None, config: Mapping[str, Any] | None, overrides: Mapping[str, Any]
) -> list[tuple[type, dict[str, Any] | None]]:
    """(class, kwargs or None = build from ``config``) pairs to try, most specific first."""
    if spec is not None and config is None:
        return [(spec.model_cls, {**spec.kwargs, **overrides})]
    if config is None:
        return [(s.model_cls, {**s.kwargs, **overrides}) for s in (get_spec(n) for n in list_models())]
    classes = (
        [spec.model_cls] if spec is not None else list(dict.fromkeys(get_spec(n).model_cls for n in list_models()))
    )
    out = []
    for model_cls in classes:
        if not hasattr(model_cls, "from_reference_config"):
            continue
        try:
            kwargs = _kwargs_from_config(model_cls, config)
        except (KeyError, TypeError, ValueError):
            continue
        if kwargs is None and overrides:
            raise TypeError(f"{model_cls.__name__} cannot apply overrides {sorted(overrides)} to a reference config")
        out.append((model_cls, None if kwargs is None else {**kwargs, **overrides}))
    return out


def load_pretrained(name_or_source: str, *, variant: str | None = None, **overrides: Any) -> nn.Module:
    """Build a model and load official (reference-format) weights into it; returns it in eval mode.

    ``name_or_source``: a registry variant, a local checkpoint file or directory, ``"owner/repo"`` or
    ``"owner/repo/file"`` on Hugging Face. ``variant`` names the registry variant of a checkpoint given
    by path or repo (its class, and its kwargs unless the checkpoint has a config.json). ``overrides``
    replace constructor arguments (e.g. ``finetune_decoder=False``). Raises
    :class:`PretrainedNotAvailableError` when the weights cannot be found or downloaded,
    ``CheckpointMismatchError`` (naming missing / unexpected keys) when they do not fit.
    """
    spec = get_spec(variant) if variant is not None else None
    source = name_or_source
    if variant is None and name_or_source in list_models():
        spec = get_spec(name_or_source)
        if spec.checkpoint is None:
            raise PretrainedNotAvailableError(f"variant {spec.name!r} has no published checkpoint")
        source = spec.checkpoint
    weights, config_path = resolve_files(source)
    state_dict = load_state_dict_file(weights)
    config = _read_config(config_path)

    candidates = _candidates(spec, config, overrides)
    if len(candidates) == 1:
        model_cls, kwargs = candidates[0]
    else:
        fitting = []
        for model_cls, kwargs in candidates:
            try:
                with torch.device("meta"):
                    probe = _build(model_cls, kwargs, config)
            except (KeyError, TypeError, ValueError):
                continue
            if _fits(probe, state_dict):
                fitting.append((model_cls, kwargs))
        if not fitting:
            raise CheckpointMismatchError(
                f"no registered model fits the checkpoint {weights} "
                f"({'with' if config else 'without'} a config.json); pass a registry variant name to see "
                f"which keys differ"
            )
        model_cls, kwargs = fitting[0]
    model = _build(model_cls, kwargs, config)
    load_reference_state_dict(model, state_dict)
    return model.eval()
