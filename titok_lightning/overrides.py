"""Python values as Hydra command-line overrides, for programs that launch ``train.py`` / ``sample.py`` (the tests,
``scripts/benchmark.py``): Hydra reads overrides only as strings in its own grammar."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def override_value(value: Any) -> str:
    """``value`` in Hydra's override grammar: null, true/false, [a,b], {k:v}, numbers and plain strings."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{override_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def set_overrides(prefix: str, values: Mapping[str, Any]) -> list[str]:
    """``++<prefix>.<key>=<value>`` for every item: set each key, whether or not the config has it yet."""
    return [f"++{prefix}.{key}={override_value(value)}" for key, value in values.items()]
