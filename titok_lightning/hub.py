"""Loading official (reference-format) checkpoints: ``load_pretrained(name_or_source, **overrides)``.

A thin public entry point; the loading itself lives in :mod:`titok_lightning.loading` (see there for the sources).
"""

from titok_lightning.loading import (
    PretrainedNotAvailableError,
    constructor_defaults,
    find_variant,
    load_pretrained,
    read_weights,
)

__all__ = ["PretrainedNotAvailableError", "constructor_defaults", "find_variant", "load_pretrained", "read_weights"]
