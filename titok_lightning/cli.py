"""Errors in what the user typed, for ``train.py`` and ``sample.py``: one line on stderr instead of a traceback.

Hydra prints a multi-line report for a bad override and a traceback for errors raised in the job. Both scripts
show such errors as ``<program>: error: <one line>`` (a mistyped key with the close keys it may have meant);
``HYDRA_FULL_ERROR=1`` shows the whole traceback. Hydra has no hook for this, hence this file.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from hydra.errors import HydraException, InstantiationException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

# Hydra reports composition errors itself unless HYDRA_FULL_ERROR=1; the scripts set it while composing and give the
# job the user's own setting back (DDP ranks and launched jobs inherit the environment)
USER_FULL_ERROR: str | None = os.environ.get("HYDRA_FULL_ERROR")
CONFIG_ERRORS = (HydraException, OmegaConfBaseException)


# Lightning settings that this project's manual optimization takes from its own keys
MOVED_KEYS = {
    "trainer.accumulate_grad_batches": "model.accumulate_grad_batches",
    "trainer.gradient_clip_val": "model.max_grad_norm",
    "trainer.gradient_clip_algorithm": "model.max_grad_norm",
}


def close_keys(error: BaseException) -> list[str]:
    """For an unknown config key (``trainer.max_step``): the existing keys beside it that it may be a typo of, or
    the project's own key for a Lightning setting (``trainer.accumulate_grad_batches``)."""
    parent, key, full_key = (getattr(error, name, None) for name in ("parent_node", "key", "full_key"))
    if full_key in MOVED_KEYS:
        return [MOVED_KEYS[full_key]]
    if not isinstance(parent, DictConfig) or not isinstance(key, str) or not full_key or key in parent:
        return []
    prefix = full_key.removesuffix(key) if full_key.endswith(key) else ""
    return [prefix + name for name in difflib.get_close_matches(key, [str(k) for k in parent.keys()], n=3)]


def one_line(error: BaseException) -> str:
    """An error as one line: Hydra's multi-line reports folded (option lists joined), instantiation errors by cause,
    an unknown key followed by the keys it may have meant."""
    if isinstance(error, InstantiationException) and error.__cause__ is not None:
        where = re.search(r"full_key: (\S+)", str(error))
        return (f"{where.group(1)}: " if where else "") + one_line(error.__cause__)
    parts: list[str] = []
    for line in str(error).split("\n"):
        if line.startswith("Config search path:"):
            break
        if line.startswith("\t") and parts:  # Hydra lists options one per tab-indented line
            parts[-1] += (" " if parts[-1].endswith(":") else ", ") + line.strip()
        elif line.strip():
            parts.append(line.strip())
    text = ""
    for part in parts:  # sentences follow with a space, other lines with "; "
        text += (" " if text.endswith((".", ":")) else "; ") + part if text else part
    cause = error.__cause__
    cause_key = getattr(cause, "full_key", None)
    if isinstance(cause, OmegaConfBaseException) and cause_key and f"'{cause_key}'" not in text:
        # the failing key lies inside the override's value (a nested mapping): Hydra's sentence names only the override
        text += f" ({str(cause).splitlines()[0]}: {cause_key})"
    suggestions = close_keys(cause if cause is not None else error)
    if suggestions:
        text += f" (did you mean {' or '.join(suggestions)}?)"
    return text


@contextmanager
def errors_in_one_line(program: str, errors: tuple[type[BaseException], ...]) -> Iterator[None]:
    """``errors`` end the program with one line on stderr, unless the user set HYDRA_FULL_ERROR=1."""
    try:
        yield
    except errors as error:
        if USER_FULL_ERROR == "1":
            raise
        sys.exit(f"{program}: error: {one_line(error)}")  # SystemExit: Hydra adds no report


def restore_user_full_error() -> None:
    """Inside the composed job: the user's HYDRA_FULL_ERROR again (see ``run_cli``)."""
    if USER_FULL_ERROR is None:
        os.environ.pop("HYDRA_FULL_ERROR", None)
    else:
        os.environ["HYDRA_FULL_ERROR"] = USER_FULL_ERROR


def run_cli(hydra_main: Callable[[], object], program: str) -> None:
    """Run a ``@hydra.main`` function with errors in the command line or the composed config shown as one line."""
    os.environ["HYDRA_FULL_ERROR"] = "1"  # composition errors: Hydra re-raises them instead of its own report
    with errors_in_one_line(program, CONFIG_ERRORS):
        hydra_main()
