"""Deprecated view of the variant registry (workers/variants.py), kept so older imports still work:
`VARIANT_OPTIONS` (name -> {option: default}) and `USES_D_OSC`, computed from the registry on each
access (a variant registered later is included). New code: `workers.variants`."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    from workers import variants

    if name == "VARIANT_OPTIONS":
        return variants.variant_options()
    if name == "USES_D_OSC":
        return variants.uses_d_osc()
    raise AttributeError(f"module 'workers.variant_options' has no attribute {name!r}")
