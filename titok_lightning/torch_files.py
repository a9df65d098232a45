"""Reading a file of ``torch.save`` safely: ``torch.load(weights_only=True)`` on the CPU, and one clear error for a
file that is not one or is damaged.

Below the loading layer (``loading.py`` reads model weights with it) and beside ``metrics.py`` (the FID network's
weights), so neither imports upward for it.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch


class NotACheckpointError(ValueError):
    """A weights file that ``torch.save`` did not write, or a damaged one; the message names the file and why."""


# what ``torch.load(weights_only=True)`` raises for a damaged file that looks like one (text and other files that
# are neither a zip archive nor a pickle are refused before it reads them: its unpickler may fail on them with
# anything, IndexError included)
_NOT_LOADABLE = (pickle.UnpicklingError, EOFError)


def _not_a_checkpoint(path: Path) -> str | None:
    """Why the file ``path`` cannot be a file of ``torch.save`` (a zip archive, or a legacy-format pickle), or None."""
    with open(path, "rb") as file:
        head = file.read(4)
    if zipfile.is_zipfile(path) or head[:1] == b"\x80":  # pickle protocol >= 2
        return None
    if head.startswith(b"PK"):
        return "a zip archive without its end: cut off while copied or written?"
    return "neither a zip archive nor a pickle" if head else "the file is empty"


def _first_sentence(text: str) -> str:
    return text.strip().split("\n")[0].split(". ")[0].strip()


def _unpickler_says(error: BaseException) -> tuple[str, str]:
    """(error type, first sentence) of the unpickler's own error inside torch.load's: torch >= 2.5 chains it as the
    context, torch 2.4 quotes it after ``WeightsUnpickler error:``; without either, torch.load's own."""
    text = str(error)
    if isinstance(error.__context__, _NOT_LOADABLE):
        error, text = error.__context__, str(error.__context__)
    elif "WeightsUnpickler error: " in text:
        text = text.split("WeightsUnpickler error: ", 1)[1]
    return type(error).__name__, _first_sentence(text)


def torch_load(path: str | os.PathLike, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; a file that is not a checkpoint, or a damaged one, raises
    :class:`NotACheckpointError` naming it instead of torch's error (a page of ``weights_only`` advice that does not
    apply, or an IndexError)."""
    path = Path(path).expanduser()
    why = _not_a_checkpoint(path)
    if why is not None:
        raise NotACheckpointError(f"{path} is not a checkpoint written by torch.save ({why})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (*_NOT_LOADABLE, RuntimeError) as error:
        if isinstance(error, _NOT_LOADABLE):
            kind, sentence = _unpickler_says(error)
        elif str(error).startswith("PytorchStreamReader") or "unexpected EOF" in str(error):
            kind, sentence = None, _first_sentence(str(error))  # a zip archive's reader, or the legacy format's
        else:
            raise
        why = f"{kind}: {sentence}" if kind and sentence else kind or sentence
        if "Unsupported global" in sentence:
            raise NotACheckpointError(
                f"{path} holds objects that torch.load(weights_only=True) refuses ({why})"
            ) from error
        if kind is None or "unexpected EOF" in sentence:  # cut off (torch 2.4 reports the legacy EOF as unpickling)
            raise NotACheckpointError(
                f"{path} is not a complete checkpoint written by torch.save ({sentence})"
            ) from error
        raise NotACheckpointError(f"{path} is not a checkpoint written by torch.save ({why})") from error
