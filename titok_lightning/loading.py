"""The one place that builds models and loads weights into them.

- spec -> model: :func:`build_model` (``{"name": <registry variant>, **overrides}``, random weights).
- source -> weights: :func:`read_weights`, safely (safetensors or ``torch.load(weights_only=True)``). A source is
  1. a registry variant name (``"titok_l32"``): its published checkpoint;
  2. a Hugging Face repo ``"owner/repo"`` (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``) or one
     file of it, ``"owner/repo/file.bin"``;
  3. a local weight file (``.safetensors``, ``.bin``, ``.pt``; a ``{"state_dict": ...}`` wrapper is unwrapped);
  4. a local folder with ``model.safetensors`` or ``pytorch_model.bin`` (and ``config.json``);
  5. a Lightning ``.ckpt`` written by this project's training: the weights of its ``model`` (EMA weights unless
     ``use_ema=False``) and the registry spec it was built from.
  Sources 1-4 hold the reference's key names (converted when loaded), 5 this project's.
- source -> model: :func:`load_pretrained` (the class and its arguments come from the checkpoint's spec or
  ``config.json``, a registry variant, or the registry's model that fits the keys), :func:`load_spec` for the
  ``{"name", "pretrained", **overrides}`` specs of the configs (frozen teacher, frozen tokenizer) and
  :func:`load_weights` to initialise a built model (``init_from``).
- Lightning checkpoint -> trained model: :func:`load_trained` (with the checkpoint's hyper-parameters), and
  :func:`load_model_state_dict` for the weights alone. The LightningModule itself: ``<Module>.load_from_checkpoint``.

Offline (``HF_HUB_OFFLINE=1``, or the hub cannot be reached), weights come from the Hugging Face cache only, and a
missing file fails at once with :class:`PretrainedNotAvailableError`, whose one-line message names the repository,
the files and the ``hf download`` command.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import socket
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, is_dataclass
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
from titok_lightning.registry import ModelSpec, create_model, get_spec, list_models
from titok_lightning.torch_files import NotACheckpointError, torch_load

log = logging.getLogger(__name__)

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
CONFIG_FILE = "config.json"
# Flags that select a training mode, not an architecture the checkpoint must match.
MODE_FLAGS = ("finetune_decoder", "clustering_vq", "commitment_cost")
# Where this project's checkpoints keep things: the trained network's weights under ``model.``, the registry spec
# it was built from under ``hyper_parameters[<role>]``, the EMA callback's training weights under its state key.
MODEL_PREFIX = "model."
# a generator's checkpoint also holds the frozen tokenizer's spec under "tokenizer": the generator comes first
SPEC_ROLES = ("generator", "tokenizer")
EMA_STATE_KEY = "EMACallback"
HUB_PROBE_TIMEOUT_S = 3.0


class PretrainedNotAvailableError(RuntimeError):
    """The weights could not be found locally nor downloaded; the message says what to fetch and where."""


# ---------------------------------------------------------------------------------------------------- specs


def plain(value: Any) -> Any:
    """OmegaConf containers -> plain dicts/lists (checkpoints stay loadable with ``weights_only=True``)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def lists_to_tuples(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    # YAML has no tuples; model constructors compare sizes such as channel_mult as tuples.
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


def build_model(spec: Mapping[str, Any]) -> nn.Module:
    """``{"name": <registry variant>, **overrides}`` -> model with random weights."""
    spec = dict(plain(spec))
    if "name" not in spec:
        raise ValueError(f"a model spec needs the registry variant 'name', got {spec}")
    return create_model(spec.pop("name"), **lists_to_tuples(spec))


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


def canonical(value: Any) -> Any:
    """A constructor argument in a comparable form: lists as tuples, dataclasses as dicts, recursively."""
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    if isinstance(value, Mapping):
        return {k: canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return tuple(canonical(v) for v in value)
    return value


def find_variant(
    model_cls: type, kwargs: Mapping[str, Any], mode_flags: Iterable[str] = MODE_FLAGS
) -> tuple[str, dict[str, Any]]:
    """The registry variant of ``model_cls`` whose architecture equals ``kwargs`` (missing registry
    arguments count as their constructor defaults), and the ``mode_flags`` overrides that turn it
    into exactly ``kwargs``. Raises ``LookupError`` naming the closest variants otherwise."""
    mode_flags = set(mode_flags)
    defaults = constructor_defaults(model_cls)
    wanted = {k: canonical(v) for k, v in kwargs.items()}
    misses = []
    for name in list_models():
        spec = get_spec(name)
        if spec.model_cls is not model_cls:
            continue
        full = {k: canonical(v) for k, v in {**defaults, **spec.kwargs}.items()}
        differing = sorted(k for k, v in wanted.items() if k not in mode_flags and full.get(k, object()) != v)
        if not differing:
            return name, {k: kwargs[k] for k in mode_flags if k in kwargs and wanted[k] != full.get(k)}
        misses.append(f"{name} (differs in {', '.join(differing)})")
    raise LookupError(f"no registered {model_cls.__name__} variant matches {dict(kwargs)}; tried: {'; '.join(misses)}")


# ------------------------------------------------------------------------------------------- Hugging Face


def _truthy_env(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_reachable() -> bool:
    """One TCP connection to the hub (or the proxy that reaches it), so that an offline machine fails at once
    instead of after huggingface_hub's retries (about 25 s per file)."""
    from urllib.parse import urlsplit
    from urllib.request import getproxies, proxy_bypass

    from huggingface_hub import constants

    url = urlsplit(constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    proxy = getproxies().get(url.scheme)
    if proxy and not proxy_bypass(host):
        proxy_url = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_url.hostname, proxy_url.port or 80
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError:
        return False
    return True


def download_command(repo_id: str, filenames: Iterable[str]) -> str:
    """The shell command of the installed huggingface_hub's CLI that downloads ``filenames`` of ``repo_id``
    (``hf`` since huggingface_hub 0.34, ``huggingface-cli`` before)."""
    import huggingface_hub

    major, minor = (int(part) for part in huggingface_hub.__version__.split(".")[:2])
    cli = "hf" if (major, minor) >= (0, 34) else "huggingface-cli"
    return f"{cli} download {repo_id} {' '.join(filenames)}"


def _not_cached(repo_id: str, filenames: list[str], reason: str) -> PretrainedNotAvailableError:
    from huggingface_hub import constants

    # a folder is read by its Hugging Face file names; a single file of another name is loaded by its path
    local = "<DIR>" if any(name in HF_WEIGHT_FILES for name in filenames) else f"<DIR>/{filenames[0]}"
    return PretrainedNotAvailableError(
        f"{' and '.join(filenames)} of the Hugging Face repo {repo_id} (https://huggingface.co/{repo_id}) "
        f"{'are' if len(filenames) > 1 else 'is'} not in the local cache ({constants.HF_HUB_CACHE}) and {reason}. "
        f"Download {'them' if len(filenames) > 1 else 'it'} on a machine with internet access with "
        f"`{download_command(repo_id, filenames)}` and copy the cache (HF_HOME) here, or add `--local-dir <DIR>` "
        f"and load {local}; with the files in the cache, HF_HUB_OFFLINE=1 skips the network."
    )


class _Hub:
    """Downloads of one load: the network is tried at most once; without it, only the cache is read."""

    def __init__(self) -> None:
        from huggingface_hub import constants

        self.offline_reason = (
            "HF_HUB_OFFLINE is set" if _truthy_env("HF_HUB_OFFLINE") or constants.HF_HUB_OFFLINE else None
        )
        self._probed = False

    def _local_only(self) -> bool:
        from huggingface_hub import constants

        if self.offline_reason is None and not self._probed:
            self._probed = True
            if not _hub_reachable():
                self.offline_reason = f"{constants.ENDPOINT} cannot be reached (offline?)"
        return self.offline_reason is not None

    def download(self, repo_id: str, filename: str) -> Path | None:
        """Path of ``filename`` of ``repo_id`` (cached or downloaded); None when the repo has no such file;
        None as well when offline and the file is not cached (the caller names what is missing)."""
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

        try:
            return Path(hf_hub_download(repo_id, filename, local_files_only=self._local_only()))
        except LocalEntryNotFoundError:  # not cached, and offline (or the hub failed to answer)
            if self.offline_reason is None:
                self.offline_reason = "the download failed"
            return None
        except EntryNotFoundError:  # the hub answered: no such file in the repo
            return None
        except RepositoryNotFoundError:
            raise PretrainedNotAvailableError(
                f"the Hugging Face repo {repo_id} does not exist or is not accessible (private or gated): "
                f"`{download_command(repo_id, [filename])}` fails as well until you have access"
            ) from None
        except OSError as err:  # network and HTTP errors
            raise PretrainedNotAvailableError(
                f"could not download {filename} of the Hugging Face repo {repo_id} ({type(err).__name__}: {err}); "
                f"try `{download_command(repo_id, [filename])}`"
            ) from None

    def fetch(self, repo_id: str, filename: str | None) -> tuple[Path, Path | None]:
        """(weights, config.json or None) of a repo, or (file, None) for one file of it."""
        if filename is not None:
            path = self.download(repo_id, filename)
            if path is None:
                raise self._missing(repo_id, [filename])
            return path, None
        config = self.download(repo_id, CONFIG_FILE)
        for name in HF_WEIGHT_FILES:
            path = self.download(repo_id, name)
            if path is not None:
                return path, config
        raise self._missing(repo_id, [CONFIG_FILE, HF_WEIGHT_FILES[0]])

    def _missing(self, repo_id: str, filenames: list[str]) -> PretrainedNotAvailableError:
        if self.offline_reason is None:
            return PretrainedNotAvailableError(f"the Hugging Face repo {repo_id} has none of {filenames}")
        return _not_cached(repo_id, filenames, self.offline_reason)


# ------------------------------------------------------------------------------------------------ weights


@dataclass
class Weights:
    """What a source holds. ``reference_format``: the reference's key names (converted on load) rather than this
    project's. ``config``: the reference config (``config.json``), if any. ``hyper_parameters``: those of this
    project's Lightning checkpoint (the registry spec of its model under ``"tokenizer"`` / ``"generator"``, and what
    else it was trained with), if any. ``origin``: where they came from, for messages."""

    state_dict: dict[str, torch.Tensor]
    reference_format: bool
    origin: str
    config: dict[str, Any] | None = None
    hyper_parameters: dict[str, Any] | None = None

    @property
    def spec(self) -> dict[str, Any] | None:
        """The registry spec of the checkpoint's model, if it is one of this project's."""
        hparams = self.hyper_parameters or {}
        return next((dict(hparams[role]) for role in SPEC_ROLES if isinstance(hparams.get(role), Mapping)), None)


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or of a pickled state dict loaded with ``weights_only=True`` (a
    ``{"state_dict": ...}`` wrapper is unwrapped)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as error:
            raise NotACheckpointError(f"{path} is not a complete safetensors file ({error})") from error
    return _tensors(torch_load(path), path)


def _tensors(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointMismatchError(f"{path} does not hold a state dict of tensors")
    return dict(obj)


def is_project_checkpoint(checkpoint: Any, path: Path) -> bool:
    """A Lightning checkpoint of this project's training: a ``.ckpt`` file, or any file with its hyper-parameters
    (``.bin`` / ``.pt`` files with a ``state_dict`` wrapper hold reference weights)."""
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("state_dict"), Mapping):
        return False
    return path.suffix == ".ckpt" or isinstance(checkpoint.get("hyper_parameters"), Mapping)


def checkpoint_model_state(
    checkpoint: Mapping[str, Any], use_ema: bool = True, origin: str = "the checkpoint"
) -> dict[str, torch.Tensor]:
    """Weights of ``pl_module.model`` in a Lightning checkpoint of this project, keys without ``model.``.

    With ``use_ema`` (default) these are the EMA weights when the run used the EMA callback (its checkpoints keep
    them in ``state_dict``), else the training weights that callback stores; a run without the EMA callback (RAR's
    recipes) has only its training weights, which both then are.
    """
    state_dict = dict(checkpoint["state_dict"])
    ema_state = checkpoint.get("callbacks", {}).get(EMA_STATE_KEY)
    if not use_ema and ema_state is not None:
        state_dict.update(ema_state["raw_model_state"])
    model_state = {k[len(MODEL_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(MODEL_PREFIX)}
    if not model_state:
        raise ValueError(f"no '{MODEL_PREFIX}*' keys in the state_dict of {origin}")
    return model_state


def load_model_state_dict(path: str | os.PathLike, use_ema: bool = True) -> dict[str, torch.Tensor]:
    """:func:`checkpoint_model_state` of the Lightning checkpoint file ``path``."""
    checkpoint = torch_load(path)
    return checkpoint_model_state(checkpoint, use_ema, os.fspath(path))


def checkpoint_global_step(path: str | os.PathLike) -> int | None:
    """The optimizer step a Lightning checkpoint was written at (memory-mapped: its tensors are not read)."""
    return torch_load(path, mmap=True).get("global_step")


def _read_config(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    config = json.loads(path.read_text())
    # huggingface_hub's mixin may nest the constructor's ``config`` argument one level down.
    if "model" not in config and isinstance(config.get("config"), Mapping):
        config = config["config"]
    return config


def _local_files(path: Path) -> tuple[Path, Path | None]:
    if path.is_dir():
        for name in HF_WEIGHT_FILES:
            if (path / name).is_file():
                config = path / CONFIG_FILE
                return path / name, config if config.is_file() else None
        raise PretrainedNotAvailableError(f"the folder {path} has none of {list(HF_WEIGHT_FILES)}")
    sibling = path.parent / CONFIG_FILE
    # A config.json next to a Hugging Face weight file belongs to it; next to anything else it may not.
    return path, sibling if path.name in HF_WEIGHT_FILES and sibling.is_file() else None


def _registry_checkpoint(name: str) -> str:
    spec = get_spec(name)
    if spec.checkpoint is None:
        raise PretrainedNotAvailableError(f"the variant {name!r} has no published checkpoint")
    return spec.checkpoint


def read_weights(source: str | os.PathLike, use_ema: bool = True) -> Weights:
    """The weights of a source (see the module docstring); ``use_ema`` applies to this project's ``.ckpt``."""
    source = os.fspath(source)
    if source in list_models():
        source = _registry_checkpoint(source)
    path = Path(source).expanduser()
    if path.exists():
        weights, config_path = _local_files(path)
        if weights.suffix == ".safetensors":
            return Weights(load_state_dict_file(weights), True, str(weights), _read_config(config_path))
        checkpoint = torch_load(weights)
        if is_project_checkpoint(checkpoint, weights):
            state = checkpoint_model_state(checkpoint, use_ema, str(weights))
            hparams = checkpoint.get("hyper_parameters")
            return Weights(state, False, str(weights), hyper_parameters=None if hparams is None else dict(hparams))
        return Weights(_tensors(checkpoint, weights), True, str(weights), _read_config(config_path))
    parts = source.strip("/").split("/")
    # a missing local path must not turn into a download: .ckpt files and paths under an existing folder are local
    looks_local = source.startswith((".", "/", "~")) or path.suffix == ".ckpt" or Path(parts[0]).is_dir()
    if len(parts) < 2 or looks_local or any(not p for p in parts):
        raise PretrainedNotAvailableError(
            f"{source!r} is neither an existing file or folder, a registered variant, nor a Hugging Face "
            f"'owner/repo[/file]' id. Registered variants: {', '.join(list_models())}"
        )
    repo_id = "/".join(parts[:2])
    weights, config_path = _Hub().fetch(repo_id, "/".join(parts[2:]) or None)
    return Weights(load_state_dict_file(weights), True, f"{source} ({weights})", _read_config(config_path))


def load_weights(model: nn.Module, source: str | os.PathLike | Weights, use_ema: bool = True) -> nn.Module:
    """Load the weights of ``source`` (or already read :class:`Weights`) into ``model`` strictly, reference key
    names converted; returns ``model``."""
    weights = source if isinstance(source, Weights) else read_weights(source, use_ema)
    try:
        if weights.reference_format:
            return load_reference_state_dict(model, weights.state_dict)
        check_state_dict(model, weights.state_dict)
    except CheckpointMismatchError as err:
        raise CheckpointMismatchError(f"{weights.origin}: {err}") from None
    model.load_state_dict(weights.state_dict, strict=True)
    return model


# --------------------------------------------------------------------------------------------- models


def _fits(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> bool:
    try:
        check_state_dict(model, convert_reference_state_dict(model, state_dict))
    except CheckpointMismatchError:
        return False
    return True


def _candidates(
    spec: ModelSpec | None, config: Mapping[str, Any] | None, overrides: Mapping[str, Any]
) -> list[tuple[type, dict[str, Any]]]:
    """(class, constructor kwargs) pairs to try, most specific first."""
    if spec is not None and config is None:
        return [(spec.model_cls, {**spec.kwargs, **overrides})]
    if config is None:
        return [(s.model_cls, {**s.kwargs, **overrides}) for s in (get_spec(n) for n in list_models())]
    classes = (
        [spec.model_cls] if spec is not None else list(dict.fromkeys(get_spec(n).model_cls for n in list_models()))
    )
    out = []
    for model_cls in classes:
        if not hasattr(model_cls, "kwargs_from_reference_config"):
            continue
        try:
            kwargs = model_cls.kwargs_from_reference_config(config)
        except (KeyError, TypeError, ValueError):
            continue
        out.append((model_cls, {**kwargs, **overrides}))
    return out


def _model_for_reference_weights(weights: Weights, spec: ModelSpec | None, overrides: Mapping[str, Any]) -> nn.Module:
    candidates = _candidates(spec, weights.config, overrides)
    fitting = candidates
    if len(candidates) > 1:
        fitting = []
        for model_cls, kwargs in candidates:
            try:
                with torch.device("meta"):
                    probe = model_cls(**kwargs)
            except (KeyError, TypeError, ValueError):
                continue
            if _fits(probe, weights.state_dict):
                fitting.append((model_cls, kwargs))
    if not fitting:
        raise CheckpointMismatchError(
            f"no registered model fits the checkpoint {weights.origin} "
            f"({'with' if weights.config else 'without'} a config.json); pass a registry variant name to see "
            f"which keys differ"
        )
    model_cls, kwargs = fitting[0]
    return model_cls(**kwargs)


def load_pretrained(
    name_or_source: str | os.PathLike, *, variant: str | None = None, use_ema: bool = True, **overrides: Any
) -> nn.Module:
    """Build a model and load weights into it; returns it in eval mode.

    ``name_or_source``: any source of :func:`read_weights`. ``variant`` names the registry variant of a checkpoint
    given by path or repo (its class, and its kwargs unless the checkpoint has a config.json). ``overrides`` replace
    constructor arguments (e.g. ``finetune_decoder=False``). A ``.ckpt`` of this project rebuilds the spec it was
    trained with (``use_ema=False``: its training weights instead of the EMA). Raises
    :class:`PretrainedNotAvailableError` when the weights cannot be found or downloaded,
    ``CheckpointMismatchError`` (naming missing / unexpected keys) when they do not fit.
    """
    name_or_source = os.fspath(name_or_source)
    spec = get_spec(variant) if variant is not None else None
    if variant is None and name_or_source in list_models():
        spec = get_spec(name_or_source)
    weights = read_weights(name_or_source, use_ema)
    if not weights.reference_format:
        if weights.spec is None and spec is None:
            raise KeyError(f"{weights.origin} names no model spec (hyper_parameters.tokenizer / .generator)")
        model_spec = {"name": spec.name, **overrides} if spec is not None else {**weights.spec, **overrides}
        return load_weights(build_model(model_spec), weights).eval()
    return load_weights(_model_for_reference_weights(weights, spec, lists_to_tuples(overrides)), weights).eval()


def load_trained(path: str | os.PathLike, role: str, use_ema: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """A Lightning checkpoint of this project -> (its trained model, rebuilt from ``hyper_parameters[role]``, in eval
    mode; the checkpoint's hyper-parameters: what else it was trained with). ``role``: ``"tokenizer"`` or
    ``"generator"``; ``use_ema=False``: the training weights instead of the EMA."""
    weights = read_weights(path, use_ema)
    hparams = weights.hyper_parameters or {}
    if not isinstance(hparams.get(role), Mapping):
        raise ValueError(f"{path} was not written by a {role} module of this project (no hyper_parameters.{role})")
    return load_weights(build_model(hparams[role]), weights).eval(), hparams


def load_spec(spec: Mapping[str, Any], what: str = "model", use_ema: bool = True) -> nn.Module:
    """A model spec of the configs -> model in eval mode.

    ``{"name": <variant>, "pretrained": <source>, **overrides}``: the weights of ``source`` (any source of
    :func:`read_weights`; a registry name names its own variant) in ``name`` with the overrides;
    ``{"name": <variant>, "pretrained": None, **overrides}``: random weights (tests and the offline demo only,
    warned); ``{"checkpoint": <.ckpt>}``: the model a training run of this project wrote. ``use_ema``: see
    :func:`load_pretrained`.
    """
    spec = dict(plain(spec))
    if "checkpoint" in spec:
        source = spec.pop("checkpoint")
        if spec:
            raise ValueError(f"a {what} checkpoint takes no overrides, got {sorted(spec)}")
        if not os.path.isfile(source):
            raise FileNotFoundError(f"{what} checkpoint {source!r} does not exist")
        return load_pretrained(source, use_ema=use_ema)
    if "name" not in spec and spec.get("pretrained") is None:
        raise ValueError(f"a {what} spec needs 'checkpoint', 'pretrained' or a registry 'name', got {spec}")
    source = spec.pop("pretrained", None)
    if source is None:
        log.warning("%s %r has RANDOM weights (pretrained=null): fine for tests and the demo only", what, spec["name"])
        return build_model(spec).eval()
    name = spec.pop("name", None)
    source = os.fspath(source)
    variant = None if source in list_models() else name
    return load_pretrained(source, variant=variant, use_ema=use_ema, **lists_to_tuples(spec))


# where a generator checkpoint records the weights_fingerprint of the frozen tokenizer it trained with
TOKENIZER_WEIGHTS_KEY = "tokenizer_weights"


def has_random_weights(spec: Any) -> bool:
    """Whether :func:`load_spec` builds ``spec`` with random weights (``pretrained: null``; tests and the demo)."""
    return isinstance(spec, Mapping) and "checkpoint" not in spec and spec.get("pretrained") is None


def weights_fingerprint(*modules: nn.Module) -> str:
    """Hash of every parameter and buffer of ``modules`` (names, dtypes, shapes, bytes): equal iff the weights are."""
    digest = hashlib.blake2b(digest_size=16)
    for module in modules:
        for name, tensor in module.state_dict().items():
            tensor = tensor.detach().cpu().contiguous()
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # no copy: the buffer itself
    return digest.hexdigest()
