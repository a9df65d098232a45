"""Parity runners and manifest resolvers for the generators (MaskGIT, RAR, MaskGen).

Layout: one ``run_<entry>(fixture)`` function per fixture entry and one ``resolve_<class>(config)``
function per reference class, grouped by family; the ``RUNNERS`` and ``MANIFEST_RESOLVERS`` dicts at the
bottom list them. To add a family, add its section and one line per entry to each dict.
"""

from __future__ import annotations

from typing import Any

# ----------------------------------------------------------------------------------------------------------
# MaskGIT (ImageBert, UViTBert) and RAR: filled in by their models' commit.
# ----------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------
# Registries
# ----------------------------------------------------------------------------------------------------------

RUNNERS: dict[str, Any] = {}

MANIFEST_RESOLVERS: dict[str, Any] = {}
